// Threads that run requests, so that gRPC's own threads never block on a model.
#ifndef TSCALE_SERVER_SERVICE_WORKER_POOL_H_
#define TSCALE_SERVER_SERVICE_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace tscale::service {

class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  ~WorkerPool();  // Stop()

  // Queues `task`; false once Stop has begun (the task is not run).
  bool Submit(std::function<void()> task);
  // Runs every queued task, then joins the threads. Idempotent.
  void Stop();

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
  std::once_flag joined_;
};

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_WORKER_POOL_H_
