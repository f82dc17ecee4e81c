// The tscale gRPC server: the TernaryTrainer service, standard health checking and reflection,
// on one listening address. Used by server/main.cc and, in-process, by the tests.
#ifndef TSCALE_SERVER_SERVICE_SERVER_H_
#define TSCALE_SERVER_SERVICE_SERVER_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/group/config.h"

namespace tscale::service {

struct ServerOptions {
  // HOST:PORT; port 0 picks a free port (see Server::port()).
  std::string listen = "127.0.0.1:50051";
  // Where models go when a request names no device: "cpu", "cuda", "cuda:N"; empty: cuda:0 when a
  // GPU is usable, else cpu.
  std::string device;
  // The largest request or response message (--max-message-bytes). Larger ones are
  // RESOURCE_EXHAUSTED, with a message naming the flag. At most 1 GiB.
  int64_t max_message_bytes = int64_t{256} << 20;
  // The largest state file ImportState accepts (--max-import-bytes).
  int64_t max_import_bytes = int64_t{16} << 30;
  // TrainStream's flow control (--stream-window): steps a stream may have read and not yet
  // answered. 1 to 1024.
  int64_t stream_window = 8;
  // Per model: training passes awaiting Backward, and the activation bytes they hold.
  int64_t max_pending_passes = 1024;
  int64_t max_pending_bytes = int64_t{4} << 30;
  // Threads running requests; 0: max(4, hardware threads).
  int worker_threads = 0;

  // Limits of the models held (--max-models, --max-device-bytes; 0: none). CreateModel,
  // ImportState and RestoreCheckpoint beyond them are RESOURCE_EXHAUSTED with the figures. A
  // model counts by its estimated device bytes (Model::EstimateDeviceBytes: decoded state,
  // effective weights, gradient sums); pending passes are bounded per model by the two above.
  // No budget by default: the device's own memory is the limit, and exceeding it is also
  // RESOURCE_EXHAUSTED; a budget leaves room for other processes on a shared device.
  int64_t max_models = 1024;
  int64_t max_device_bytes = 0;
  // A training pass no Backward used within this many seconds is released; 0: never. Ten
  // minutes: far longer than any forward-backward round trip, short enough that passes of
  // clients that went away do not hold memory until the next update.
  int64_t pending_pass_ttl_seconds = 600;
  // On CUDA devices, a model's TrainSteps of a shape seen before are replayed from a captured
  // CUDA graph (--cuda-graphs; core::ModelOptions::cuda_graphs): the same bits, one launch.
  bool cuda_graphs = true;

  // Transport (gRPC) settings.
  // The server pings each connection after this many idle seconds and closes it when no answer
  // comes within 20 s, so that the calls and memory of vanished clients are freed (0: no pings).
  int64_t keepalive_seconds = 60;
  // Streams (calls) at once per connection; more wait in the client. Requests are served by
  // the worker threads anyway; this bounds what one connection can queue.
  int64_t max_concurrent_streams = 256;
  // Memory gRPC may use for its buffers across all connections (a grpc::ResourceQuota); under
  // pressure it shrinks buffers and refuses new calls rather than exhausting the process. At
  // least twice --max-message-bytes, so that a largest request and response always fit.
  int64_t grpc_memory_bytes = int64_t{4} << 30;

  // Checkpoints (--checkpoint-dir); empty: none. At start every model found there is restored
  // from its newest valid checkpoint before the server listens.
  std::string checkpoint_dir;
  int64_t checkpoint_every_steps = 0;    // --checkpoint-every-steps; 0: off
  int64_t checkpoint_every_seconds = 0;  // --checkpoint-every-seconds; 0: off
  int checkpoint_keep = 5;               // --checkpoint-keep; 0: all
  bool checkpoint_on_shutdown = true;    // --checkpoint-on-shutdown
  // --deleted-retention-hours: how long a deleted model's checkpoints stay in the trash of
  // deleted models (DIR/.deleted/); 0: until removed by hand.
  int64_t deleted_retention_hours = 168;

  // Prometheus metrics at http://HOST:PORT/metrics (--metrics-listen); empty: none.
  std::string metrics_listen;
  int metrics_max_layers = 64;  // --metrics-max-layers: drift series per model

  // TLS: PEM files of the server's certificate chain and key (--tls-cert, --tls-key); with a
  // client CA (--tls-client-ca) clients must present a certificate it signed (mutual TLS).
  std::string tls_cert, tls_key, tls_client_ca;
  // Bearer tokens, one per line (--auth-token-file); empty: none required. Health checks stay
  // open so that probes work.
  std::string auth_token_file;
  bool reflection = true;  // --reflection
  // Replica group (--group-size, --group-rank, --group-store, --group-timeout-seconds,
  // --group-rank-from-hostname; else WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT): this server is
  // one rank of a group that trains every model together. Health is SERVING while the group is
  // formed.
  group::GroupFlags group;
};

class TrainerService;
class WorkerPool;

class Server {
 public:
  // Validates the options, binds the address and starts serving. InvalidArgument for a bad
  // option (naming its flag); Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();  // Shutdown with no grace, if not done

  // The port bound (useful with port 0).
  int port() const { return port_; }
  // The metrics port bound; 0 without metrics.
  int metrics_port() const;
  // "127.0.0.1:<port>" style address clients can use.
  std::string address() const;

  // Marks the service NOT_SERVING, stops accepting calls, lets in-flight calls finish until
  // `grace` has passed (then cancels them), checkpoints every model that changed since its last
  // checkpoint (when a checkpoint folder and checkpoint_on_shutdown are set), and stops the
  // workers. Idempotent.
  void Shutdown(std::chrono::milliseconds grace);
  // Blocks until Shutdown has completed.
  void Wait();
  // Reads --auth-token-file again (SIGHUP). OK without tokens; on an error the old ones stay.
  absl::Status ReloadTokens();
  // Unary calls being run by a worker now (for tests that act while a call runs).
  int64_t running_calls() const;
  // The group this server is a rank of: "rank R of N at HOST:PORT"; empty when alone.
  std::string group_description() const;

 private:
  Server();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_SERVER_H_
