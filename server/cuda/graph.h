// A training step captured as a CUDA graph: its few dozen kernels and copies launched again with
// one call. Where a step's arithmetic takes microseconds (small layers, small batches), launching
// its operations one by one costs more than running them.
//
// What a replay does is what the capture recorded, on the same memory: the caller keeps the
// captured step's inputs and outputs (its tensors stay allocated in the graph's private memory
// pool) and writes each step's inputs into the same tensors before replaying. Values the host
// passed to a kernel when it was launched (a step count, a shape) are the capture's; what changes
// between steps must be read from device memory (TernaryView::inv_denom_at).
#ifndef TSCALE_SERVER_CUDA_GRAPH_H_
#define TSCALE_SERVER_CUDA_GRAPH_H_

#include <c10/core/Stream.h>

#include <functional>
#include <memory>

namespace tscale::cuda {

class StepGraph {
 public:
  // Captures the work `body` queues on the device of `stream`. `body` runs twice: once uncaptured,
  // so that what is set up lazily on first use (cuBLAS's workspace, the allocator's blocks) is
  // set up outside the capture, then captured. Both runs are on a stream kept for captures, after
  // everything `stream` had queued and before anything queued on it later. One capture runs at a
  // time in the process, in the capturing thread's mode: other threads' work on other streams
  // goes on meanwhile. `body` must not wait for the device (no copies to the host, no reads of
  // values). Throws c10::Error where the capture fails; the device is then as before.
  static std::shared_ptr<StepGraph> Capture(c10::Stream stream, const std::function<void()>& body);

  // Queues the captured work on `stream`.
  void Replay(c10::Stream stream) const;

  ~StepGraph();
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

 private:
  struct Captured;
  explicit StepGraph(std::unique_ptr<Captured> captured);
  std::unique_ptr<Captured> captured_;
};

}  // namespace tscale::cuda

#endif  // TSCALE_SERVER_CUDA_GRAPH_H_
