#include "client/cpp/client.h"

#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace tscale::client {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

// A wait of `backoff`, lengthened by a random 0-20%.
absl::Duration Jittered(absl::Duration backoff) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  std::uniform_real_distribution<double> extra(0.0, 0.2);
  return backoff * (1.0 + extra(rng));
}

int ClampMs(absl::Duration d) {
  return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 1, 3'600'000));
}

// Retries before the client's first answer from the server, when attempts are not capped: a
// wrong address or a server not started fails within a second (as in the Python client).
constexpr int kFirstContactRetries = 3;

// The error of an exactly-once call whose outcome it leaves unknown, saying so: the request may
// have reached the server and been applied before its answer was lost (a deadline that passed
// on the way back, a connection that broke). Errors that say nothing was applied (the server's
// refusals, a call that never started or never connected) are left as they are.
absl::Status UnknownOutcome(const absl::Status& status, absl::string_view method,
                            int64_t expected_step) {
  const absl::string_view message = status.message();
  const bool unknown = (absl::IsDeadlineExceeded(status) || absl::IsUnavailable(status) ||
                        absl::IsCancelled(status)) &&
                       !absl::StrContains(message, "nothing was") &&
                       !absl::StrContains(message, "before the call could start") &&
                       !absl::StrContains(message, "failed to connect") &&
                       !absl::StrContains(message, "DNS resolution failed");
  if (!unknown) return status;
  return absl::Status(
      status.code(),
      absl::StrCat(message, " (", method, " with expected_step ", expected_step,
                   " may have been applied: read the model's step (GetModel; the CLI's 'tscale "
                   "info ID'): ",
                   expected_step + 1, " means it was, ", expected_step,
                   " that it was not; sending it again with expected_step ", expected_step,
                   " is safe: the server answers it as a replay when it was applied)"));
}

}  // namespace

const char* ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
    case ServingStatus::kUnknown:
      break;
  }
  return "UNKNOWN";
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // gRPC's and Abseil's codes are both google.rpc.Code: the same numbers.
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           const ClientOptions& options) {
  grpc::ChannelArguments args;
  // No limit here: the server's own (ServerInfo.max_message_bytes) applies, with its message.
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Reconnect on the retry policy's schedule: with gRPC's default (1 s, growing to 120 s) a retry
  // soon after the server comes back would still find the channel waiting to reconnect.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, ClampMs(options.retry.initial_backoff));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, ClampMs(options.retry.initial_backoff));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ClampMs(options.retry.max_backoff));
  // Keepalive: a ping every 60 s, idle or not, and the connection given up when no answer comes
  // within 20 s; a call on a connection that died silently (a dropped NAT entry, a vanished
  // server) then fails fast and is retried instead of waiting out its deadline. tscale-server
  // accepts pings down to one per 10 s, so these are never counted against the client.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 60'000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20'000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // gRPC otherwise stops pinging after two pings without data in between.
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  std::shared_ptr<grpc::ChannelCredentials> credentials = options.credentials;
  if (credentials == nullptr && options.tls.enabled) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls.root_certs;
    ssl.pem_cert_chain = options.tls.cert_chain;
    ssl.pem_private_key = options.tls.private_key;
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls.server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls.server_name);
    }
  }
  if (credentials == nullptr) credentials = grpc::InsecureChannelCredentials();
  if (options.gzip) args.SetCompressionAlgorithm(GRPC_COMPRESS_GZIP);
  return grpc::CreateCustomChannel(address, credentials, args);
}

Client::Client(const std::string& address, ClientOptions options)
    : Client(MakeChannel(address, options), options) {
  address_ = address;
}

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::TernaryTrainer::NewStub(channel_)) {}

absl::Status Client::Call(bool retryable, const CallOptions& call, const Attempt& attempt,
                          std::optional<ExactlyOnce> exactly_once) {
  const RetryPolicy& retry = options_.retry;
  const absl::Duration timeout = call.timeout.value_or(options_.timeout);
  const absl::Time call_deadline = call.deadline.value_or(absl::InfiniteFuture());
  const int max_attempts = retryable ? std::max(0, retry.max_attempts) : 1;
  absl::Duration backoff = retry.initial_backoff;
  std::optional<absl::Time> first_failure;
  for (int n = 1;; ++n) {
    // gRPC would send a call whose deadline is just now, and the server might answer it in time.
    const absl::Time deadline = std::min(absl::Now() + timeout, call_deadline);
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError("deadline exceeded before the call could start");
    }
    grpc::ClientContext context;
    absl::Time attempt_deadline = deadline;
    // The last attempt (when they are capped) is not cut short: nothing would follow it, so it
    // may use the whole timeout.
    if (retry.attempt_timeout > absl::ZeroDuration() && (max_attempts == 0 || n < max_attempts)) {
      attempt_deadline = std::min(deadline, absl::Now() + retry.attempt_timeout);
    }
    if (attempt_deadline != absl::InfiniteFuture()) {
      context.set_deadline(absl::ToChronoTime(attempt_deadline));
    }
    if (!options_.auth_token.empty()) {
      context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.auth_token));
    }
    if (options_.gzip) {
      context.set_compression_algorithm(GRPC_COMPRESS_GZIP);
      context.AddMetadata("tscale-compression", "gzip");
    }
    const grpc::Status status = attempt(context);
    if (status.ok()) {
      answered_ = true;
      return absl::OkStatus();
    }

    const grpc::StatusCode code = status.error_code();
    const bool transient = code == grpc::StatusCode::UNAVAILABLE ||
                           code == grpc::StatusCode::DEADLINE_EXCEEDED ||
                           (code == grpc::StatusCode::CANCELLED && exactly_once.has_value());
    if (!transient) answered_ = true;  // the server's own answer
    absl::Status result = FromGrpcStatus(status);
    // A TLS set-up that does not match the server's fails every attempt alike: said plainly,
    // and not retried.
    if (code == grpc::StatusCode::UNAVAILABLE) {
      std::optional<std::string> diagnosis = DiagnoseConnection(
          address_, options_.tls, options_.credentials == nullptr, status.error_message());
      if (diagnosis.has_value()) return absl::UnavailableError(*diagnosis);
    }
    if (exactly_once.has_value()) {
      result = UnknownOutcome(result, exactly_once->method, exactly_once->expected_step);
    }
    const absl::Time now = absl::Now();
    if (!first_failure.has_value()) first_failure = now;
    const bool may_retry =
        max_attempts == 0 ? (answered_ || n <= kFirstContactRetries) : n < max_attempts;
    if (!transient || !may_retry) return result;
    const absl::Duration left = retry.retry_time - (now - *first_failure);
    if (left <= absl::ZeroDuration()) return result;
    const absl::Duration wait = std::min(Jittered(backoff), left);
    // A retry that could not start before the call's deadline would only turn this error into
    // DEADLINE_EXCEEDED; the real cause is more useful.
    if (now + wait >= call_deadline) return result;
    if (options_.on_retry) options_.on_retry(n, result, wait);
    absl::SleepFor(wait);
    backoff = std::min(backoff * retry.multiplier, retry.max_backoff);
  }
}

absl::StatusOr<ServingStatus> Client::Health(absl::string_view service, const CallOptions& call) {
  // grpc.health.v1.HealthCheckRequest is {string service = 1}; Debian ships no C++ stubs of the
  // health service, so the call goes through the generic stub with the bytes encoded here.
  google::protobuf::UnknownFieldSet request_fields;
  if (!service.empty()) request_fields.AddLengthDelimited(1, std::string(service));
  std::string request_bytes;
  request_fields.SerializeToString(&request_bytes);

  grpc::GenericStub generic(channel_);
  std::string response_bytes;
  absl::Status status = Call(/*retryable=*/true, call, [&](grpc::ClientContext& context) {
    grpc::Slice slice(request_bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    grpc::Status result;
    absl::Notification done;
    generic.UnaryCall(&context, kHealthCheckMethod, grpc::StubOptions(), &request, &response,
                      [&](grpc::Status s) {
                        result = std::move(s);
                        done.Notify();
                      });
    done.WaitForNotification();
    if (result.ok()) {
      std::vector<grpc::Slice> slices;
      response_bytes.clear();
      if (response.Dump(&slices).ok()) {
        for (const grpc::Slice& s : slices) {
          response_bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
        }
      }
    }
    return result;
  });
  if (!status.ok()) return status;

  // HealthCheckResponse is {ServingStatus status = 1}, an enum: a varint.
  google::protobuf::UnknownFieldSet response_fields;
  if (!response_fields.ParseFromString(response_bytes)) {
    return absl::InternalError("health: the response does not parse as a HealthCheckResponse");
  }
  int64_t value = 0;  // absent: UNKNOWN
  for (int i = 0; i < response_fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = response_fields.field(i);
    if (f.number() == 1 && f.type() == google::protobuf::UnknownField::TYPE_VARINT) {
      value = static_cast<int64_t>(f.varint());
    }
  }
  if (value < 0 || value > 3) return ServingStatus::kUnknown;
  return static_cast<ServingStatus>(value);
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(const CallOptions& call) {
  v1::ServerInfo response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ModelInfo> Client::CreateModel(const v1::CreateModelRequest& request,
                                                  const CallOptions& call) {
  v1::ModelInfo response;
  absl::Status status = Call(false, call, [&](grpc::ClientContext& context) {
    return stub_->CreateModel(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ModelInfo> Client::GetModel(absl::string_view model_id,
                                               const CallOptions& call) {
  v1::GetModelRequest request;
  request.set_model_id(std::string(model_id));
  v1::ModelInfo response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->GetModel(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<std::vector<v1::ModelInfo>> Client::ListModels(const CallOptions& call) {
  v1::ListModelsResponse response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  });
  if (!status.ok()) return status;
  return std::vector<v1::ModelInfo>(response.models().begin(), response.models().end());
}

absl::Status Client::DeleteModel(absl::string_view model_id, const CallOptions& call) {
  v1::DeleteModelRequest request;
  request.set_model_id(std::string(model_id));
  return DeleteModel(request, call);
}

absl::Status Client::DeleteModel(const v1::DeleteModelRequest& request, const CallOptions& call) {
  v1::DeleteModelResponse response;
  return Call(false, call, [&](grpc::ClientContext& context) {
    return stub_->DeleteModel(&context, request, &response);
  });
}

absl::StatusOr<v1::ForwardResponse> Client::Forward(absl::string_view model_id,
                                                    const v1::Tensor& input, bool train,
                                                    const CallOptions& call) {
  v1::ForwardRequest request;
  request.set_model_id(std::string(model_id));
  *request.mutable_input() = input;
  request.set_train(train);
  v1::ForwardResponse response;
  absl::Status status = Call(!train, call, [&](grpc::ClientContext& context) {
    return stub_->Forward(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::BackwardResponse> Client::Backward(absl::string_view model_id,
                                                      absl::string_view pass_id,
                                                      const v1::Tensor& grad_output,
                                                      bool want_grad_input,
                                                      const CallOptions& call) {
  v1::BackwardRequest request;
  request.set_model_id(std::string(model_id));
  request.set_pass_id(std::string(pass_id));
  *request.mutable_grad_output() = grad_output;
  request.set_want_grad_input(want_grad_input);
  v1::BackwardResponse response;
  absl::Status status = Call(false, call, [&](grpc::ClientContext& context) {
    return stub_->Backward(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ReleasePassesResponse> Client::ReleasePasses(
    absl::string_view model_id, const std::vector<std::string>& pass_ids, const CallOptions& call) {
  v1::ReleasePassesRequest request;
  request.set_model_id(std::string(model_id));
  for (const std::string& id : pass_ids) request.add_pass_ids(id);
  v1::ReleasePassesResponse response;
  absl::Status status = Call(pass_ids.empty(), call, [&](grpc::ClientContext& context) {
    return stub_->ReleasePasses(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::UpdateCorrelationResponse> Client::UpdateCorrelation(absl::string_view model_id,
                                                                        int64_t expected_step,
                                                                        const CallOptions& call) {
  v1::UpdateCorrelationRequest request;
  request.set_model_id(std::string(model_id));
  request.set_expected_step(expected_step);
  v1::UpdateCorrelationResponse response;
  // Exactly once by expected_step: a retry of an applied update comes back replayed.
  absl::Status status = Call(
      true, call,
      [&](grpc::ClientContext& context) {
        return stub_->UpdateCorrelation(&context, request, &response);
      },
      ExactlyOnce{"UpdateCorrelation", expected_step});
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::TrainStepResponse> Client::TrainStep(const v1::TrainStepRequest& request,
                                                        const CallOptions& call) {
  v1::TrainStepResponse response;
  // Exactly once by expected_step, as UpdateCorrelation.
  absl::Status status = Call(
      true, call,
      [&](grpc::ClientContext& context) { return stub_->TrainStep(&context, request, &response); },
      ExactlyOnce{"TrainStep", request.expected_step()});
  if (!status.ok()) return status;
  return response;
}

absl::Status Client::Export(absl::string_view model_id, const CallOptions& call,
                            const std::function<void()>& restart,
                            const std::function<absl::Status(absl::string_view)>& sink) {
  v1::ExportStateRequest request;
  request.set_model_id(std::string(model_id));
  absl::Status local;  // a failure of the sink, which ends the call
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    restart();
    std::unique_ptr<grpc::ClientReader<v1::StateChunk>> reader =
        stub_->ExportState(&context, request);
    v1::StateChunk chunk;
    while (reader->Read(&chunk)) {
      local = sink(chunk.data());
      if (!local.ok()) {
        context.TryCancel();
        break;
      }
    }
    grpc::Status s = reader->Finish();
    // Not retryable, whatever the cancelled stream reported.
    if (!local.ok()) return grpc::Status(grpc::StatusCode::ABORTED, "export: stopped");
    return s;
  });
  if (!local.ok()) return local;
  return status;
}

absl::StatusOr<std::string> Client::ExportState(absl::string_view model_id,
                                                const CallOptions& call) {
  std::string out;
  absl::Status status = Export(
      model_id, call, [&] { out.clear(); },
      [&](absl::string_view data) {
        out.append(data.data(), data.size());
        return absl::OkStatus();
      });
  if (!status.ok()) return status;
  return out;
}

absl::StatusOr<int64_t> Client::ExportStateToFile(absl::string_view model_id,
                                                  const std::string& path,
                                                  const CallOptions& call) {
  const std::string tmp = absl::StrCat(path, ".tmp-export");
  std::ofstream file;
  int64_t written = 0;
  // The OS's reason (no such folder, permission denied, disk full) is what the user can act on.
  // errno is read right after the failing file operation: gRPC's own calls change it later.
  int err = 0;
  auto write_error = [&] {
    return absl::InternalError(
        absl::StrCat("export: writing ", tmp, " failed",
                     err != 0 ? absl::StrCat(": ", std::strerror(err)) : ""));
  };
  absl::Status status = Export(
      model_id, call,
      [&] {
        if (file.is_open()) file.close();
        file.clear();
        errno = 0;
        file.open(tmp, std::ios::binary | std::ios::trunc);
        err = file.is_open() ? 0 : errno;
        written = 0;
      },
      [&](absl::string_view data) {
        if (!file.is_open()) return write_error();
        errno = 0;
        if (!file.write(data.data(), data.size())) {
          err = errno;
          return write_error();
        }
        written += static_cast<int64_t>(data.size());
        return absl::OkStatus();
      });
  if (status.ok()) {
    errno = 0;
    file.close();
    if (!file) {
      err = errno;
      status = write_error();
    }
  }
  if (status.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(
        absl::StrCat("export: renaming ", tmp, " to ", path, " failed: ", std::strerror(errno)));
  }
  if (!status.ok()) {
    if (file.is_open()) file.close();
    std::remove(tmp.c_str());
    return status;
  }
  return written;
}

absl::StatusOr<v1::ModelInfo> Client::Import(
    const v1::ImportHeader& header, const CallOptions& call,
    const std::function<absl::StatusOr<std::string>()>& next) {
  v1::ModelInfo response;
  absl::Status local;  // a failure to read the input, which ends the call
  absl::Status status = Call(false, call, [&](grpc::ClientContext& context) {
    std::unique_ptr<grpc::ClientWriter<v1::ImportStateRequest>> writer =
        stub_->ImportState(&context, &response);
    v1::ImportStateRequest message;
    *message.mutable_header() = header;
    // A failed Write means the stream is over; Finish tells why.
    bool open = writer->Write(message);
    while (open) {
      absl::StatusOr<std::string> chunk = next();
      if (!chunk.ok()) {
        local = chunk.status();
        context.TryCancel();
        break;
      }
      if (chunk->empty()) break;
      message.set_data(*std::move(chunk));
      open = writer->Write(message);
    }
    if (local.ok()) writer->WritesDone();
    grpc::Status s = writer->Finish();
    if (!local.ok()) return grpc::Status(grpc::StatusCode::ABORTED, "import: stopped");
    return s;
  });
  if (!local.ok()) return local;
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ModelInfo> Client::ImportState(const v1::ImportHeader& header,
                                                  absl::string_view state,
                                                  const CallOptions& call) {
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(1, options_.import_chunk_bytes));
  size_t offset = 0;
  return Import(header, call, [&]() -> absl::StatusOr<std::string> {
    const absl::string_view part = state.substr(offset, chunk);
    offset += part.size();
    return std::string(part);
  });
}

absl::StatusOr<v1::ModelInfo> Client::ImportStateFromFile(const v1::ImportHeader& header,
                                                          const std::string& path,
                                                          const CallOptions& call) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("import: cannot open ", path));
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(1, options_.import_chunk_bytes));
  return Import(header, call, [&]() -> absl::StatusOr<std::string> {
    std::string buffer(chunk, '\0');
    file.read(buffer.data(), static_cast<std::streamsize>(chunk));
    if (file.bad()) return absl::DataLossError(absl::StrCat("import: reading ", path, " failed"));
    buffer.resize(static_cast<size_t>(file.gcount()));
    return buffer;
  });
}

absl::StatusOr<v1::CheckpointInfo> Client::SaveCheckpoint(absl::string_view model_id,
                                                          const CallOptions& call) {
  v1::SaveCheckpointRequest request;
  request.set_model_id(std::string(model_id));
  v1::CheckpointInfo response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->SaveCheckpoint(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<std::vector<v1::CheckpointInfo>> Client::ListCheckpoints(absl::string_view model_id,
                                                                        const CallOptions& call) {
  v1::ListCheckpointsRequest request;
  request.set_model_id(std::string(model_id));
  v1::ListCheckpointsResponse response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->ListCheckpoints(&context, request, &response);
  });
  if (!status.ok()) return status;
  return std::vector<v1::CheckpointInfo>(response.checkpoints().begin(),
                                         response.checkpoints().end());
}

absl::StatusOr<v1::ModelInfo> Client::RestoreCheckpoint(const v1::RestoreCheckpointRequest& request,
                                                        const CallOptions& call) {
  v1::ModelInfo response;
  absl::Status status = Call(false, call, [&](grpc::ClientContext& context) {
    return stub_->RestoreCheckpoint(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ScaleStats> Client::GetScaleStats(absl::string_view model_id,
                                                     bool include_per_group,
                                                     const CallOptions& call) {
  v1::GetScaleStatsRequest request;
  request.set_model_id(std::string(model_id));
  request.set_include_per_group(include_per_group);
  v1::ScaleStats response;
  absl::Status status = Call(true, call, [&](grpc::ClientContext& context) {
    return stub_->GetScaleStats(&context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

}  // namespace tscale::client
