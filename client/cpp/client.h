// The C++ client of the tscale service: one typed, blocking method per RPC, each returning the
// server's answer or an absl::Status with the gRPC status's code and message.
//
// Deadlines: each attempt of a call has its own deadline (ClientOptions::timeout, or
// CallOptions::timeout), as in the Python client; CallOptions::deadline bounds a whole call,
// retries and backoff included. Messages: the channel sets no size limit of its own, so the
// server's limit (ServerInfo.max_message_bytes, RESOURCE_EXHAUSTED beyond it) is the one that
// applies.
//
// Retries. A call is retried, after an exponential backoff, when an attempt fails with UNAVAILABLE
// (the server could not be reached, went away, or refused the call while shutting down) or
// DEADLINE_EXCEEDED (the attempt's deadline passed), until RetryPolicy::retry_time (60 s by
// default: long enough for a server restart that restores its checkpoints) has passed since the
// call's first failure. Until the client has had its first answer from the server, at most 3
// retries are made, so that a wrong address fails within a second. A failure that retrying cannot
// mend is returned at once: a TLS set-up that does not match the server's (see
// DiagnoseConnection), UNAUTHENTICATED, any error the server answered with.
// Only calls that are safe to repeat are ever retried:
//   - reads: Health, GetServerInfo, GetModel, ListModels, GetScaleStats, ExportState,
//     ListCheckpoints;
//   - Forward with train = false (it changes nothing);
//   - UpdateCorrelation and TrainStep, which the server applies exactly once per expected_step:
//     the retry carries the same expected_step, and when the first attempt had in fact been
//     applied (its answer lost to a deadline or a broken connection) the server answers the retry
//     with the same response marked replayed = true (a replayed TrainStep carries no output). A
//     replayed response is a success. When such a call fails in a way that leaves its outcome
//     unknown (a deadline that passed while it was on its way, a connection lost), the error says
//     so and which step to read to find out.
//   - SaveCheckpoint (saving the same step again writes the same file).
// Never retried, because a lost reply would make a retry act twice or fail misleadingly:
// CreateModel, DeleteModel, Forward with train = true (it would leave an orphaned pass),
// Backward (its gradients would be summed twice), ImportState, RestoreCheckpoint.
//
// A Client is thread-safe; calls may run concurrently on one channel.
#ifndef TSCALE_CLIENT_CPP_CLIENT_H_
#define TSCALE_CLIENT_CPP_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

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
  // Attempts per call at most, the first included; 0: no cap (retry_time bounds them); 1
  // disables retries.
  int max_attempts = 0;
  // How long after a call's first failure it may still be retried: long enough by default for a
  // server restart that restores its checkpoints, so that a training loop rides through one. The
  // Python client's retry_seconds, the CLI's --retry-seconds.
  absl::Duration retry_time = absl::Seconds(60);
  // The wait before the first retry; each further retry waits `multiplier` times longer, up to
  // max_backoff. Each wait is lengthened by a random 0-20% (never shortened) so that clients
  // that failed together do not retry together.
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  double multiplier = 2.0;
  // When set, the longest one attempt may take, below the timeout; an attempt cut short by it
  // may be retried. With max_attempts set, the last attempt is not cut short: nothing would
  // follow it, so it may use the whole timeout.
  absl::Duration attempt_timeout = absl::ZeroDuration();
};

// TLS made by the client from PEM text, as the CLI's --tls, --tls-ca, --tls-cert, --tls-key and
// --tls-server-name give it. Unlike ready-made ClientOptions::credentials, the client can then
// tell a TLS set-up that does not match the server's (DiagnoseConnection).
struct TlsOptions {
  bool enabled = false;
  // The root certificates to trust; empty: the system's.
  std::string root_certs;
  // The client certificate chain and its key, for mutual TLS (both or neither).
  std::string cert_chain, private_key;
  // The name the server's certificate must hold, instead of the address's host: for a tunnel or
  // proxy whose address is not a name in the certificate (gRPC's grpc.ssl_target_name_override).
  std::string server_name;
};

struct ClientOptions {
  // The deadline of each attempt of a call, from the attempt's start.
  absl::Duration timeout = absl::Seconds(60);
  RetryPolicy retry;
  // TLS from PEM text; see TlsOptions.
  TlsOptions tls;
  // Ready-made channel credentials, used instead of `tls` when set; null and no `tls`: an
  // insecure channel (plaintext).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // When set, sent as `authorization: Bearer <token>` with every call.
  std::string auth_token;
  // Size of the data messages ImportState sends.
  int64_t import_chunk_bytes = int64_t{1} << 20;
  // Compresses every message this client sends with gzip, and asks the server to compress its
  // answers (call metadata tscale-compression: gzip). Pays on slow links for data that
  // compresses (integer-valued or sparse tensors); random floats barely shrink (docs/wire.md).
  bool gzip = false;
  // When set, called before each retry's wait with the number of the attempt that failed (from
  // 1), its status and the wait; for logging.
  std::function<void(int attempt, const absl::Status& status, absl::Duration wait)> on_retry;
};

// Per-call settings.
struct CallOptions {
  // Replaces ClientOptions::timeout for this call's attempts.
  std::optional<absl::Duration> timeout;
  // An absolute deadline of the whole call, retries included; an attempt's own deadline is the
  // earlier of this and its timeout.
  std::optional<absl::Time> deadline;
};

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class ServingStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN".
const char* ServingStatusName(ServingStatus status);

// The gRPC status as an absl::Status: same code, same message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// What went wrong when a connection to `address` (HOST:PORT) could not be made, in words that
// say what to change, or nullopt when it looks like a transient failure (nothing listening, a
// server going away) or cannot be told. `grpc_message` is gRPC's text of the failure; where it is
// ambiguous ("Socket closed"), a TLS handshake of the client's own (OpenSSL, a few seconds at
// most) finds out: a plaintext client at a TLS server, a TLS client at a plaintext server, a
// server certificate that no trusted CA signed or that does not name the host, a client
// certificate missing or refused (mutual TLS). `tls` is the client's TLS set-up (disabled:
// plaintext); `tls_known` is false when the client uses credentials it cannot look into, which
// leaves only gRPC's text to go by.
std::optional<std::string> DiagnoseConnection(const std::string& address, const TlsOptions& tls,
                                              bool tls_known, absl::string_view grpc_message);

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
  absl::StatusOr<v1::ModelInfo> GetModel(absl::string_view model_id, const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::ModelInfo>> ListModels(const CallOptions& call = {});
  absl::Status DeleteModel(absl::string_view model_id, const CallOptions& call = {});
  // With the request's options, e.g. delete_checkpoints.
  absl::Status DeleteModel(const v1::DeleteModelRequest& request, const CallOptions& call = {});

  // Training. Forward is retried only when !train (see above).
  absl::StatusOr<v1::ForwardResponse> Forward(absl::string_view model_id, const v1::Tensor& input,
                                              bool train, const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(absl::string_view model_id,
                                                absl::string_view pass_id,
                                                const v1::Tensor& grad_output, bool want_grad_input,
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
  // TrainSteps over one TrainStream, sent without waiting for each answer: the requests `next`
  // gives (std::nullopt ends them; their input, target, loss, want_output and output_dtype), with
  // model_id and expected_step set here, counting up from `first_step` (-1: the model's step,
  // read first). `on_answer` receives each answer in order. The server applies the steps in that
  // order, each as TrainStep; the first that fails ends the stream, and its status (naming its
  // expected_step; nothing after it applied) is returned. A stream that breaks (UNAVAILABLE: a
  // restart, a dropped link) is resumed from the model's step within the retry policy's
  // retry_time: applied steps are not sent again (the last one is, and is answered as a replay);
  // one applied whose answer was lost before that is answered here with its step, replayed and
  // loss NaN. CallOptions::deadline bounds the whole stream; timeout does not apply.
  absl::Status TrainStream(absl::string_view model_id, int64_t first_step,
                           const std::function<std::optional<v1::TrainStepRequest>()>& next,
                           const std::function<void(const v1::TrainStepResponse&)>& on_answer,
                           const CallOptions& call = {});

  // State. ExportState collects the stream into the bytes of one safetensors file; a retry
  // starts the stream over and discards what came before.
  absl::StatusOr<std::string> ExportState(absl::string_view model_id, const CallOptions& call = {});
  // Writes the state to `path` (through a temporary file beside it, renamed when complete, so a
  // failed export leaves no partial file) and returns the bytes written.
  absl::StatusOr<int64_t> ExportStateToFile(absl::string_view model_id, const std::string& path,
                                            const CallOptions& call = {});
  // Sends `header`, then `state` in chunks of ClientOptions::import_chunk_bytes.
  absl::StatusOr<v1::ModelInfo> ImportState(const v1::ImportHeader& header, absl::string_view state,
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
  // An exactly-once call (UpdateCorrelation, TrainStep): its method and expected_step.
  struct ExactlyOnce {
    const char* method;
    int64_t expected_step;
  };
  // Runs attempts until one succeeds, the failure is not retryable, attempts or the retry time
  // run out or the call's deadline passes. `retryable`: whether the call is safe to repeat at
  // all. An exactly-once call is also retried after CANCELLED, which only a server that gave the
  // call up in its shutdown sends (this client never cancels a call), and its error says when
  // the update may have been applied.
  absl::Status Call(bool retryable, const CallOptions& call, const Attempt& attempt,
                    std::optional<ExactlyOnce> exactly_once = std::nullopt);
  // ExportState into `sink`; `restart` is called before each attempt's first chunk.
  absl::Status Export(absl::string_view model_id, const CallOptions& call,
                      const std::function<void()>& restart,
                      const std::function<absl::Status(absl::string_view)>& sink);
  // ImportState of the header, then of the chunks `next` gives until it returns an empty one.
  absl::StatusOr<v1::ModelInfo> Import(const v1::ImportHeader& header, const CallOptions& call,
                                       const std::function<absl::StatusOr<std::string>()>& next);

  ClientOptions options_;
  std::string address_;  // empty for a client over a caller's channel
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TernaryTrainer::Stub> stub_;
  // Whether the server has answered this client yet (see the retries above).
  std::atomic<bool> answered_{false};
};

// A channel to `address` with the options' credentials (or TLS) and no message size limits of its
// own.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           const ClientOptions& options);

}  // namespace tscale::client

#endif  // TSCALE_CLIENT_CPP_CLIENT_H_
