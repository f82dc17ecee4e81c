// The C++ client of the tscale service: one typed, blocking method per RPC, each returning the
// server's answer or an absl::Status with the gRPC status's code and message.
//
// Deadlines: every call has one overall deadline (ClientOptions::timeout, or CallOptions), retries
// and backoff included. Messages: the channel sets no size limit of its own, so the server's limit
// (ServerInfo.max_message_bytes, RESOURCE_EXHAUSTED beyond it) is the one that applies.
//
// Retries. A call is retried, after an exponential backoff, when an attempt fails with UNAVAILABLE
// (the server could not be reached or went away), or with DEADLINE_EXCEEDED of an attempt when
// RetryPolicy::attempt_timeout cut the attempt short and the overall deadline still allows another.
// Only calls that are safe to repeat are ever retried:
//   - reads: Health, GetServerInfo, GetModel, ListModels, GetScaleStats, ExportState,
//     ListCheckpoints;
//   - Forward with train = false (it changes nothing);
//   - UpdateCorrelation and TrainStep, which the server applies exactly once per expected_step:
//     the retry carries the same expected_step, and when the first attempt had in fact been
//     applied the server answers the retry with the same response marked replayed = true (a
//     replayed TrainStep carries no output). A replayed response is a success.
//   - SaveCheckpoint (saving the same step again writes the same file).
// Never retried, because a lost reply would make a retry act twice or fail misleadingly:
// CreateModel, DeleteModel, Forward with train = true (it would leave an orphaned pass),
// Backward (its gradients would be summed twice), ImportState, RestoreCheckpoint.
//
// A Client is thread-safe; calls may run concurrently on one channel.
#ifndef TSCALE_CLIENT_CPP_CLIENT_H_
#define TSCALE_CLIENT_CPP_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale::client {

namespace v1 = ::tscale::v1;

// The health service's name for the trainer (grpc.health.v1; "" is the server as a whole).
inline constexpr char kTrainerServiceName[] = "tscale.v1.TernaryTrainer";

struct RetryPolicy {
  // Attempts per call, the first included; 1 disables retries.
  int max_attempts = 4;
  // The wait before the first retry; each further retry waits `multiplier` times longer, up to
  // max_backoff. Each wait is lengthened by a random 0-20% (never shortened) so that clients
  // that failed together do not retry together.
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  double multiplier = 2.0;
  // The longest one attempt may take; an attempt cut short by it may be retried. The last
  // attempt, and every attempt when this is zero, may use what remains of the call's deadline.
  absl::Duration attempt_timeout = absl::ZeroDuration();
};

struct ClientOptions {
  // The deadline of each call, measured from its start, retries included.
  absl::Duration timeout = absl::Seconds(60);
  RetryPolicy retry;
  // null: an insecure channel (plaintext).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // When set, sent as `authorization: Bearer <token>` with every call.
  std::string auth_token;
  // Size of the data messages ImportState sends.
  int64_t import_chunk_bytes = int64_t{1} << 20;
  // When set, called before each retry's wait with the number of the attempt that failed (from
  // 1), its status and the wait; for logging.
  std::function<void(int attempt, const absl::Status& status, absl::Duration wait)> on_retry;
};

// Per-call settings.
struct CallOptions {
  // Replaces ClientOptions::timeout for this call.
  std::optional<absl::Duration> timeout;
  // An absolute deadline; with a timeout too, the earlier of the two applies.
  std::optional<absl::Time> deadline;
};

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class ServingStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN".
const char* ServingStatusName(ServingStatus status);

// The gRPC status as an absl::Status: same code, same message.
absl::Status FromGrpcStatus(const grpc::Status& status);

class Client {
 public:
  // A client of the server at `address` (HOST:PORT, or any gRPC target), over a new channel made
  // with the options' credentials and no message size limit. Connects lazily: an unreachable
  // server shows as UNAVAILABLE from the first call.
  explicit Client(const std::string& address, ClientOptions options = {});
  // A client over an existing channel (its credentials and limits are the caller's).
  explicit Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Standard health checking: the status of `service` ("" for the server, kTrainerServiceName
  // for the trainer). NotFound when the server does not know the service.
  absl::StatusOr<ServingStatus> Health(absl::string_view service = "",
                                       const CallOptions& call = {});
  absl::StatusOr<v1::ServerInfo> GetServerInfo(const CallOptions& call = {});

  // Models.
  absl::StatusOr<v1::ModelInfo> CreateModel(const v1::CreateModelRequest& request,
                                            const CallOptions& call = {});
  absl::StatusOr<v1::ModelInfo> GetModel(absl::string_view model_id,
                                         const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::ModelInfo>> ListModels(const CallOptions& call = {});
  absl::Status DeleteModel(absl::string_view model_id, const CallOptions& call = {});
  // With the request's options, e.g. delete_checkpoints.
  absl::Status DeleteModel(const v1::DeleteModelRequest& request, const CallOptions& call = {});

  // Training. Forward is retried only when !train (see above).
  absl::StatusOr<v1::ForwardResponse> Forward(absl::string_view model_id, const v1::Tensor& input,
                                              bool train, const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(absl::string_view model_id,
                                                absl::string_view pass_id,
                                                const v1::Tensor& grad_output,
                                                bool want_grad_input,
                                                const CallOptions& call = {});
  // Releases the model's pending training passes (all when pass_ids is empty). Retried only
  // when releasing all (a repeat releases nothing more).
  absl::StatusOr<v1::ReleasePassesResponse> ReleasePasses(absl::string_view model_id,
                                                          const std::vector<std::string>& pass_ids,
                                                          const CallOptions& call = {});
  absl::StatusOr<v1::UpdateCorrelationResponse> UpdateCorrelation(absl::string_view model_id,
                                                                  int64_t expected_step,
                                                                  const CallOptions& call = {});
  absl::StatusOr<v1::TrainStepResponse> TrainStep(const v1::TrainStepRequest& request,
                                                  const CallOptions& call = {});

  // State. ExportState collects the stream into the bytes of one safetensors file; a retry
  // starts the stream over and discards what came before.
  absl::StatusOr<std::string> ExportState(absl::string_view model_id,
                                          const CallOptions& call = {});
  // Writes the state to `path` (through a temporary file beside it, renamed when complete, so a
  // failed export leaves no partial file) and returns the bytes written.
  absl::StatusOr<int64_t> ExportStateToFile(absl::string_view model_id, const std::string& path,
                                            const CallOptions& call = {});
  // Sends `header`, then `state` in chunks of ClientOptions::import_chunk_bytes.
  absl::StatusOr<v1::ModelInfo> ImportState(const v1::ImportHeader& header,
                                            absl::string_view state,
                                            const CallOptions& call = {});
  // As ImportState, reading the file chunk by chunk (it is never held whole in memory).
  // NotFound when the file cannot be opened.
  absl::StatusOr<v1::ModelInfo> ImportStateFromFile(const v1::ImportHeader& header,
                                                    const std::string& path,
                                                    const CallOptions& call = {});

  // Checkpoints on the server's disk (a server without a checkpoint folder refuses them).
  absl::StatusOr<v1::CheckpointInfo> SaveCheckpoint(absl::string_view model_id,
                                                    const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::CheckpointInfo>> ListCheckpoints(absl::string_view model_id,
                                                                  const CallOptions& call = {});
  absl::StatusOr<v1::ModelInfo> RestoreCheckpoint(const v1::RestoreCheckpointRequest& request,
                                                  const CallOptions& call = {});

  absl::StatusOr<v1::ScaleStats> GetScaleStats(absl::string_view model_id, bool include_per_group,
                                               const CallOptions& call = {});

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // The generated stub, for what the typed calls do not cover (no deadline or retries applied).
  v1::TernaryTrainer::Stub& stub() { return *stub_; }
  const ClientOptions& options() const { return options_; }

 private:
  // One attempt: fills the context's metadata, runs, returns the gRPC status.
  using Attempt = std::function<grpc::Status(grpc::ClientContext&)>;
  // Runs attempts until one succeeds, the failure is not retryable, attempts run out or the
  // deadline passes. `retryable`: whether the call is safe to repeat at all.
  // `exactly_once` (UpdateCorrelation, TrainStep): also retried after CANCELLED, which only a
  // server that gave the call up in its shutdown sends (this client never cancels a call).
  absl::Status Call(bool retryable, const CallOptions& call, const Attempt& attempt,
                    bool exactly_once = false);
  // ExportState into `sink`; `restart` is called before each attempt's first chunk.
  absl::Status Export(absl::string_view model_id, const CallOptions& call,
                      const std::function<void()>& restart,
                      const std::function<absl::Status(absl::string_view)>& sink);
  // ImportState of the header, then of the chunks `next` gives until it returns an empty one.
  absl::StatusOr<v1::ModelInfo> Import(
      const v1::ImportHeader& header, const CallOptions& call,
      const std::function<absl::StatusOr<std::string>()>& next);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TernaryTrainer::Stub> stub_;
};

// A channel to `address` with the options' credentials and no message size limits of its own.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           const ClientOptions& options);

}  // namespace tscale::client

#endif  // TSCALE_CLIENT_CPP_CLIENT_H_
