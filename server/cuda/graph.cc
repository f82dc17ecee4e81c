#include "server/cuda/graph.h"

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>

namespace tscale::cuda {
namespace {

// Captures take turns; each device has one stream for them. A model's stream comes from LibTorch's
// pool, which hands the same stream to several models: captured on it, another model's work
// queued meanwhile would land in the graph. No other work is queued on this one.
std::mutex& CaptureMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}

c10::cuda::CUDAStream CaptureStream(c10::DeviceIndex device) {
  static std::map<c10::DeviceIndex, cudaStream_t>* streams =
      new std::map<c10::DeviceIndex, cudaStream_t>;
  cudaStream_t& s = (*streams)[device];
  if (s == nullptr) {
    c10::cuda::CUDAGuard guard(device);
    // Non-blocking: the legacy default stream's implicit waits, which other threads' work may
    // cause, never reach a capture.
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  }
  return c10::cuda::getStreamFromExternal(s, device);
}

// `later` runs what it is given after what `earlier` has queued so far.
void Follow(const c10::cuda::CUDAStream& earlier, const c10::cuda::CUDAStream& later) {
  at::cuda::CUDAEvent done;
  done.record(earlier);
  done.block(later);
}

}  // namespace

struct StepGraph::Captured {
  at::cuda::CUDAGraph graph;
};

StepGraph::StepGraph(std::unique_ptr<Captured> captured) : captured_(std::move(captured)) {}

StepGraph::~StepGraph() = default;

std::shared_ptr<StepGraph> StepGraph::Capture(c10::Stream stream,
                                              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(CaptureMutex());
  const c10::cuda::CUDAStream caller(stream);
  const c10::cuda::CUDAStream side = CaptureStream(caller.device_index());
  Follow(caller, side);
  auto captured = std::make_unique<Captured>();
  {
    c10::cuda::CUDAStreamGuard guard(side);
    body();
    // Thread-local: only this thread's calls that would wait for the device break the capture;
    // other models' threads go on with theirs. LibTorch's autograd thread, which runs the
    // backward's kernels, queues them on this stream, so they are captured too.
    captured->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      body();
      captured->graph.capture_end();
    } catch (const c10::Error&) {
      // End the capture, and the allocator's routing of this stream's blocks to the graph's pool,
      // whichever of them the failure left open.
      cudaGraph_t partial = nullptr;
      if (cudaStreamEndCapture(side.stream(), &partial) == cudaSuccess && partial != nullptr) {
        cudaGraphDestroy(partial);
      }
      (void)cudaGetLastError();
      try {
        c10::cuda::CUDACachingAllocator::endAllocateToPool(caller.device_index(),
                                                           captured->graph.pool());
      } catch (const c10::Error&) {
        // Already ended by capture_end.
      }
      throw;
    }
  }
  Follow(side, caller);
  return std::shared_ptr<StepGraph>(new StepGraph(std::move(captured)));
}

void StepGraph::Replay(c10::Stream stream) const {
  c10::cuda::CUDAStreamGuard guard{c10::cuda::CUDAStream(stream)};
  captured_->graph.replay();
}

}  // namespace tscale::cuda
