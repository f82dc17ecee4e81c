// A small HTTP/1.1 server for /metrics, on ordinary threads. prometheus-cpp's own exposer
// (civetweb) cannot start its threads in a process that links LibTorch's CUDA library, whose
// thread-local storage does not fit civetweb's small fixed stacks; this one works everywhere.
// It serves GET (and HEAD) of /metrics and a short index at /; one connection at a time, each
// closed after its response.
#ifndef TSCALE_SERVER_METRICS_HTTP_EXPOSER_H_
#define TSCALE_SERVER_METRICS_HTTP_EXPOSER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace tscale::metrics {

class HttpExposer {
 public:
  // Listens on HOST:PORT (port 0: any free port; [::] or an IPv6 host in brackets) and answers
  // /metrics with what `scrape` returns. InvalidArgument for a malformed address, Unavailable
  // when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpExposer>> Start(const std::string& listen,
                                                            std::function<std::string()> scrape);
  ~HttpExposer();  // Stop()

  int port() const { return port_; }
  // Stops listening and joins the thread. Idempotent.
  void Stop();

 private:
  HttpExposer() = default;
  void Loop();
  void Serve(int fd);

  int listen_fd_ = -1;
  int port_ = 0;
  std::function<std::string()> scrape_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace tscale::metrics

#endif  // TSCALE_SERVER_METRICS_HTTP_EXPOSER_H_
