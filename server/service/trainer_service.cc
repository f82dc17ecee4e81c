#include "server/service/trainer_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "server/checkpoint/state_file.h"
#include "server/core/device.h"
#include "server/service/convert.h"
#include "server/service/status.h"

#ifndef TSCALE_VERSION
#define TSCALE_VERSION "unknown"
#endif

namespace tscale::service {
namespace {

// ExportState's chunks: large enough to stream fast, far below any message limit.
constexpr int64_t kChunkBytes = int64_t{1} << 20;
// What a response carries besides its tensors, generously.
constexpr int64_t kEnvelopeBytes = 4096;

// The rows of a [rows, cols] tensor, to size the response to it; 0 for any other shape (the model
// refuses those). Not simply size(0): a tensor of no elements may claim any first dimension,
// e.g. [2^62, 0], whose product with a layer's width would overflow. A [rows, cols] tensor
// within the message limit has fewer than 2^28 rows, so rows * width * 4 fits in int64.
int64_t Rows(const at::Tensor& t, int64_t cols) {
  return t.dim() == 2 && t.size(1) == cols ? t.size(0) : 0;
}

// OK while the call is live; DeadlineExceeded once its deadline has passed, Cancelled once the
// client cancelled it or went away. Asked when a worker takes a request up and right before a
// request changes state, so that such a request changes nothing. The deadline is compared here:
// gRPC does not mark a call cancelled the moment its deadline passes.
absl::Status Interrupted(const grpc::CallbackServerContext* ctx,
                         const std::atomic<int64_t>* stop_at) {
  // Once the server's grace period has ended, a call not past its commit point is refused with
  // UNAVAILABLE, which clients retry (against the server once it is back), and nothing applies;
  // the server waits for such calls to answer rather than letting gRPC cancel them (CANCELLED,
  // which clients do not retry).
  if (stop_at != nullptr) {
    const int64_t at = stop_at->load(std::memory_order_relaxed);
    if (at != 0 && (absl::ToUnixNanos(absl::Now()) >= at || ctx->IsCancelled())) {
      return absl::UnavailableError(
          "the server is shutting down; nothing was applied; retry (the server may be "
          "restarting)");
    }
  }
  if (ctx->deadline() <= std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError(
        "deadline: the request's deadline passed before it could apply; nothing was changed");
  }
  if (ctx->IsCancelled()) {
    return absl::CancelledError(
        "the client cancelled the request before it could apply; nothing was changed");
  }
  return absl::OkStatus();
}

core::Interrupt InterruptOf(const grpc::CallbackServerContext* ctx,
                            const std::atomic<int64_t>* stop_at) {
  return [ctx, stop_at] { return Interrupted(ctx, stop_at); };
}

}  // namespace

TrainerService::TrainerService(TrainerOptions options, WorkerPool* pool)
    : options_(std::move(options)), pool_(pool), registry_(options_.limits) {}

// ---------------------------------------------------------------- plumbing

namespace {

// A client that asks for compressed answers (metadata "tscale-compression: gzip", which the
// clients send with their compression option; gRPC keeps its own grpc-encoding headers from the
// application) gets them in gzip; the others get them as they are.
void AnswerInKind(grpc::CallbackServerContext* ctx) {
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find("tscale-compression");
  if (it != metadata.end() && absl::string_view(it->second.data(), it->second.size()) == "gzip") {
    ctx->set_compression_algorithm(GRPC_COMPRESS_GZIP);
  }
}

}  // namespace

template <typename Fn>
grpc::ServerUnaryReactor* TrainerService::Dispatch(grpc::CallbackServerContext* ctx,
                                                   absl::string_view method,
                                                   const google::protobuf::Message& request,
                                                   Fn fn) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  AnswerInKind(ctx);
  const absl::Time start = absl::Now();
  if (absl::Status auth = Authorize(ctx); !auth.ok()) {
    reactor->Finish(Finished(method, auth, start));
    return reactor;
  }
  absl::Status size = CheckSize(static_cast<int64_t>(request.ByteSizeLong()), "request");
  if (!size.ok()) {
    reactor->Finish(Finished(method, size, start));
    return reactor;
  }
  const bool queued =
      pool_->Submit([this, ctx, reactor, method, start, fn = std::move(fn)]() mutable {
        // A request cancelled or past its deadline while it waited is not run.
        absl::Status interrupted = Interrupted(ctx, &stop_at_);
        running_.fetch_add(1);
        absl::Status status = interrupted.ok() ? fn() : interrupted;
        running_.fetch_sub(1);
        reactor->Finish(Finished(method, status, start));
      });
  if (!queued) {
    reactor->Finish(Finished(method, absl::UnavailableError("the server is shutting down"), start));
  }
  return reactor;
}

grpc::Status TrainerService::Finished(absl::string_view method, const absl::Status& status,
                                      absl::Time start) const {
  if (metrics_ != nullptr) {
    metrics_->ObserveRpc(method, status.code(), absl::ToDoubleSeconds(absl::Now() - start));
  }
  return ToGrpcStatus(status, method);
}

absl::Status TrainerService::Authorize(const grpc::CallbackServerContext* ctx) const {
  if (auth_ == nullptr) return absl::OkStatus();
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return auth_->Check("");
  return auth_->Check(absl::string_view(it->second.data(), it->second.size()));
}

absl::Status TrainerService::CheckSize(int64_t bytes, absl::string_view what) const {
  if (bytes <= options_.max_message_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      what, ": ", bytes, " bytes, beyond the server's limit of ", options_.max_message_bytes,
      " bytes per message (--max-message-bytes); send smaller batches"));
}

absl::StatusOr<c10::Device> TrainerService::DeviceFor(const std::string& name) const {
  if (name.empty()) return options_.default_device;
  return core::ParseDevice(name);
}

absl::StatusOr<std::shared_ptr<core::Model>> TrainerService::Find(
    const std::string& model_id) const {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  return registry_.Get(model_id);
}

// ---------------------------------------------------------------- models

absl::Status TrainerService::DoCreateModel(const v1::CreateModelRequest& req,
                                           v1::ModelInfo* resp,
                                           const core::Interrupt& interrupt,
                                           const CommitGate& gate) {
  if (absl::Status s = core::ValidateModelId(req.model_id()); !s.ok()) return s;
  auto spec = SpecFromProto(req.spec());
  if (!spec.ok()) return spec.status();
  auto device = DeviceFor(req.device());
  if (!device.ok()) return device.status();
  auto compute = ComputeFromProto(req.compute());
  if (!compute.ok()) return compute.status();
  // Refuse a taken id before spending memory on the model; Add checks again.
  if (absl::Status s = registry_.CheckFree(req.model_id()); !s.ok()) return s;
  if (absl::Status s = CheckNoCheckpoints(req.model_id()); !s.ok()) return s;
  // Room within --max-models and --max-device-bytes is reserved before the model is built.
  auto bytes = core::Model::EstimateDeviceBytes(*spec);
  if (!bytes.ok()) return bytes.status();
  auto reservation = registry_.Reserve(req.model_id(), *bytes, /*replace=*/false);
  if (!reservation.ok()) return reservation.status();
  core::ModelOptions options = options_.model;
  options.compute = *compute;
  auto model = core::Model::Create(*spec, req.seed(), *device, options);
  if (!model.ok()) return model.status();
  std::shared_ptr<core::Model> shared = *std::move(model);
  if (absl::Status s = interrupt(); !s.ok()) return s;
  if (gate) {
    if (absl::Status s = gate(*shared); !s.ok()) return s;
  }
  if (absl::Status s = registry_.Add(*std::move(reservation), shared); !s.ok()) return s;
  ModelInfoToProto(req.model_id(), *shared, resp);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainerService::CreateModel(grpc::CallbackServerContext* ctx,
                                                      const v1::CreateModelRequest* req,
                                                      v1::ModelInfo* resp) {
  return Dispatch(ctx, "CreateModel", *req, [this, ctx, req, resp] {
    if (group_ != nullptr) return GroupCreateModel(*req, resp, InterruptOf(ctx, &stop_at_));
    return DoCreateModel(*req, resp, InterruptOf(ctx, &stop_at_));
  });
}

grpc::ServerUnaryReactor* TrainerService::GetModel(grpc::CallbackServerContext* ctx,
                                                   const v1::GetModelRequest* req,
                                                   v1::ModelInfo* resp) {
  return Dispatch(ctx, "GetModel", *req, [this, req, resp]() -> absl::Status {
    auto model = Find(req->model_id());
    if (!model.ok()) return model.status();
    ModelInfoToProto(req->model_id(), **model, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TrainerService::ListModels(grpc::CallbackServerContext* ctx,
                                                     const v1::ListModelsRequest* req,
                                                     v1::ListModelsResponse* resp) {
  return Dispatch(ctx, "ListModels", *req, [this, resp] {
    for (const auto& [id, model] : registry_.List()) ModelInfoToProto(id, *model, resp->add_models());
    return absl::OkStatus();
  });
}

absl::Status TrainerService::DoDeleteModel(const v1::DeleteModelRequest& req) {
  if (absl::Status s = core::ValidateModelId(req.model_id()); !s.ok()) return s;
  if (req.delete_checkpoints()) {
    auto checkpoints = Checkpoints();
    if (!checkpoints.ok()) return checkpoints.status();
    absl::Status removed = registry_.Remove(req.model_id());
    absl::Status files = (*checkpoints)->Discard(req.model_id(), /*remove=*/true);
    if (metrics_ != nullptr) metrics_->ForgetModel(req.model_id());
    if (removed.ok() || files.ok()) return absl::OkStatus();
    return absl::NotFoundError(
        absl::StrCat("model_id: no model '", req.model_id(), "', loaded or checkpointed"));
  }
  absl::Status removed = registry_.Remove(req.model_id());
  if (checkpointer_ != nullptr) {
    // A deleted model stays deleted: its checkpoints go to the trash of deleted models (kept for
    // --deleted-retention-hours; RestoreCheckpoint with from_deleted takes them back), so the
    // next start does not restore it. Files of a model that was not loaded go there too.
    absl::Status files = checkpointer_->Discard(req.model_id(), /*remove=*/false);
    if (!files.ok() && !absl::IsNotFound(files)) {
      return absl::Status(files.code(), absl::StrCat(
          removed.ok() ? "the model is deleted, but " : "",
          "its checkpoints could not move to the trash of deleted models, so a restart would "
          "bring it back; retry DeleteModel: ", files.message()));
    }
    if (files.ok() && !removed.ok()) removed = absl::OkStatus();
  }
  if (removed.ok() && metrics_ != nullptr) metrics_->ForgetModel(req.model_id());
  return removed;
}

grpc::ServerUnaryReactor* TrainerService::DeleteModel(grpc::CallbackServerContext* ctx,
                                                      const v1::DeleteModelRequest* req,
                                                      v1::DeleteModelResponse*) {
  return Dispatch(ctx, "DeleteModel", *req, [this, req] {
    return group_ != nullptr ? GroupDeleteModel(*req) : DoDeleteModel(*req);
  });
}

// ---------------------------------------------------------------- training

absl::Status TrainerService::DoForward(const v1::ForwardRequest& req, v1::ForwardResponse* resp) {
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  auto input = FloatTensorFromProto(req.input(), "input");
  if (!input.ok()) return input.status();
  auto output_dtype = ResponseFloatType(req.output_dtype(), "output_dtype");
  if (!output_dtype.ok()) return output_dtype.status();
  // Refuse an answer too large to send before the pass exists.
  const int64_t batch = Rows(*input, (*model)->summary().in_features);
  if (absl::Status s = CheckSize(batch * (*model)->summary().out_features * 4 + kEnvelopeBytes,
                                 "the response's output");
      !s.ok()) {
    return s;
  }
  auto result = (*model)->Forward(*input, req.train());
  if (!result.ok()) return result.status();
  FloatTensorToProto(result->output, *output_dtype, resp->mutable_output());
  resp->set_pass_id(result->pass_id);
  resp->set_step(result->step);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainerService::Forward(grpc::CallbackServerContext* ctx,
                                                  const v1::ForwardRequest* req,
                                                  v1::ForwardResponse* resp) {
  return Dispatch(ctx, "Forward", *req, [this, req, resp] { return DoForward(*req, resp); });
}

absl::Status TrainerService::DoBackward(const v1::BackwardRequest& req,
                                        v1::BackwardResponse* resp) {
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  auto grad = FloatTensorFromProto(req.grad_output(), "grad_output");
  if (!grad.ok()) return grad.status();
  auto grad_input_dtype = ResponseFloatType(req.grad_input_dtype(), "grad_input_dtype");
  if (!grad_input_dtype.ok()) return grad_input_dtype.status();
  if (req.want_grad_input()) {
    const int64_t batch = Rows(*grad, (*model)->summary().out_features);
    if (absl::Status s = CheckSize(batch * (*model)->summary().in_features * 4 + kEnvelopeBytes,
                                   "the response's grad_input");
        !s.ok()) {
      return s;
    }
  }
  auto grad_input = (*model)->Backward(req.pass_id(), *grad, req.want_grad_input());
  if (!grad_input.ok()) return grad_input.status();
  if (req.want_grad_input()) {
    FloatTensorToProto(*grad_input, *grad_input_dtype, resp->mutable_grad_input());
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainerService::Backward(grpc::CallbackServerContext* ctx,
                                                   const v1::BackwardRequest* req,
                                                   v1::BackwardResponse* resp) {
  return Dispatch(ctx, "Backward", *req, [this, req, resp] { return DoBackward(*req, resp); });
}

grpc::ServerUnaryReactor* TrainerService::ReleasePasses(grpc::CallbackServerContext* ctx,
                                                        const v1::ReleasePassesRequest* req,
                                                        v1::ReleasePassesResponse* resp) {
  return Dispatch(ctx, "ReleasePasses", *req, [this, req, resp]() -> absl::Status {
    auto model = Find(req->model_id());
    if (!model.ok()) return model.status();
    std::vector<std::string> ids(req->pass_ids().begin(), req->pass_ids().end());
    auto released = (*model)->ReleasePasses(ids);
    if (!released.ok()) return released.status();
    resp->set_released(*released);
    resp->set_pending_passes((*model)->pending_passes());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TrainerService::UpdateCorrelation(
    grpc::CallbackServerContext* ctx, const v1::UpdateCorrelationRequest* req,
    v1::UpdateCorrelationResponse* resp) {
  return Dispatch(ctx, "UpdateCorrelation", *req, [this, ctx, req, resp] {
    if (group_ != nullptr) return GroupUpdateCorrelation(*req, resp, InterruptOf(ctx, &stop_at_));
    return DoUpdateCorrelation(*req, resp, InterruptOf(ctx, &stop_at_));
  });
}

absl::Status TrainerService::DoUpdateCorrelation(const v1::UpdateCorrelationRequest& req,
                                                 v1::UpdateCorrelationResponse* resp,
                                                 const core::Interrupt& interrupt) {
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  // The request may wait for the model behind others; it gives up if cancelled meanwhile.
  auto result = (*model)->UpdateCorrelation(req.expected_step(), interrupt);
  if (!result.ok()) return result.status();
  UpdatedCorrelation(req.model_id(), *result, resp);
  return absl::OkStatus();
}

void TrainerService::UpdatedCorrelation(const std::string& model_id,
                                        const core::UpdateResult& result,
                                        v1::UpdateCorrelationResponse* resp) {
  Updated(model_id, result.step, result.replayed, /*train_step=*/false);
  resp->set_step(result.step);
  resp->set_replayed(result.replayed);
  for (const core::LayerUpdate& u : result.layers) UpdateToProto(u, resp->add_layers());
}

absl::StatusOr<TrainerService::TrainArgs> TrainerService::ParseTrainStep(
    const v1::TrainStepRequest& req) const {
  TrainArgs args;
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  args.model = *std::move(model);
  v1::DataType target_dtype;
  switch (req.loss()) {
    case v1::TrainStepRequest::MSE:
      args.loss = core::Loss::kMse;
      target_dtype = v1::FP32;
      break;
    case v1::TrainStepRequest::CROSS_ENTROPY:
      args.loss = core::Loss::kCrossEntropy;
      target_dtype = v1::INT64;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "loss: expected MSE or CROSS_ENTROPY, got ",
          v1::TrainStepRequest::Loss_IsValid(req.loss())
              ? v1::TrainStepRequest::Loss_Name(req.loss())
              : absl::StrCat(static_cast<int>(req.loss()))));
  }
  // Views of the request's bytes, not copies: the request outlives the step, and
  // Model::TrainStep keeps no reference to its tensors.
  auto input = FloatTensorFromProto(req.input(), "input", Hold::kBorrow);
  if (!input.ok()) return input.status();
  args.input = *std::move(input);
  auto target = target_dtype == v1::FP32
                    ? FloatTensorFromProto(req.target(), "target", Hold::kBorrow)
                    : TensorFromProto(req.target(), "target", target_dtype, Hold::kBorrow);
  if (!target.ok()) return target.status();
  args.target = *std::move(target);
  if (absl::Status s = ResponseFloatType(req.output_dtype(), "output_dtype").status(); !s.ok()) {
    return s;
  }
  if (req.want_output()) {
    const int64_t batch = Rows(args.input, args.model->summary().in_features);
    if (absl::Status s =
            CheckSize(batch * args.model->summary().out_features * 4 + kEnvelopeBytes,
                      "the response's output");
        !s.ok()) {
      return s;
    }
  }
  return args;
}

absl::Status TrainerService::RunTrainStep(const v1::TrainStepRequest& req, const TrainArgs& args,
                                          v1::TrainStepResponse* resp,
                                          const core::Interrupt& interrupt,
                                          const core::GroupStep* group) {
  auto result = args.model->TrainStep(args.input, args.target, args.loss, req.expected_step(),
                                      interrupt, group);
  if (!result.ok()) return result.status();
  Updated(req.model_id(), result->update.step, result->update.replayed, /*train_step=*/true);
  resp->set_loss(result->loss);
  resp->set_step(result->update.step);
  resp->set_replayed(result->update.replayed);
  for (const core::LayerUpdate& u : result->update.layers) UpdateToProto(u, resp->add_layers());
  if (req.want_output() && result->output.defined()) {
    FloatTensorToProto(result->output, *ResponseFloatType(req.output_dtype(), "output_dtype"),
                       resp->mutable_output());
  }
  return absl::OkStatus();
}

absl::Status TrainerService::DoTrainStep(const v1::TrainStepRequest& req,
                                         v1::TrainStepResponse* resp,
                                         const core::Interrupt& interrupt) {
  auto args = ParseTrainStep(req);
  if (!args.ok()) return args.status();
  return RunTrainStep(req, *args, resp, interrupt, nullptr);
}

grpc::ServerUnaryReactor* TrainerService::TrainStep(grpc::CallbackServerContext* ctx,
                                                    const v1::TrainStepRequest* req,
                                                    v1::TrainStepResponse* resp) {
  return Dispatch(ctx, "TrainStep", *req, [this, ctx, req, resp] {
    if (group_ != nullptr) return GroupTrainStep(*req, resp, InterruptOf(ctx, &stop_at_));
    return DoTrainStep(*req, resp, InterruptOf(ctx, &stop_at_));
  });
}

// TrainStream: reads steps while fewer than the window are in flight, runs them one at a time in
// the order read (each on a worker, as a TrainStep), and writes their answers in that order. The
// first step that fails ends the stream with its status once the answers before it are written;
// the steps read after it are dropped. Every decision is taken under mu_; the gRPC operations are
// started after it is released, and Finish is the last thing a callback does.
class TrainerService::TrainStreamReactor final
    : public grpc::ServerBidiReactor<v1::TrainStepRequest, v1::TrainStepResponse> {
 public:
  TrainStreamReactor(TrainerService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), window_(std::max(1, service->options_.stream_window)) {
    AnswerInKind(ctx);
    if (absl::Status auth = service->Authorize(ctx); !auth.ok()) {
      finished_ = true;
      Finish(service_->Finished("TrainStream", auth, start_));
      return;
    }
    Act(Decide());
  }

  void OnReadDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok) {
        read_done_ = true;
      } else if (absl::Status s = service_->CheckSize(
                     static_cast<int64_t>(incoming_.ByteSizeLong()),
                     absl::StrCat("TrainStream request ", read_));
                 !s.ok()) {
        Fail(s);
      } else if (!failed_.has_value()) {
        ++read_;
        pending_.push_back(std::move(incoming_));
        incoming_.Clear();
      }
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) Fail(absl::CancelledError("the client stopped reading the stream's answers"));
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnDone() override { delete this; }

 private:
  struct Actions {
    bool read = false;
    v1::TrainStepRequest* run = nullptr;  // a step to hand to a worker
    v1::TrainStepResponse* write = nullptr;
    std::optional<absl::Status> finish;
  };

  void Fail(absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!failed_.has_value()) failed_ = std::move(s);
    pending_.clear();
  }

  Actions Decide() {
    absl::MutexLock lock(&mu_);
    return DecideLocked();
  }

  Actions DecideLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Actions a;
    if (finished_) return a;
    // A server shutting down ends its streams after the step in flight: the client resumes from
    // the model's step once the server is back.
    if (service_->stop_at_.load(std::memory_order_relaxed) != 0) {
      Fail(absl::UnavailableError(
          "the server is shutting down; the steps not yet answered were not applied; resume "
          "from the model's step (the server may be restarting)"));
    }
    const int64_t in_flight = static_cast<int64_t>(pending_.size() + to_write_.size()) +
                              (running_ ? 1 : 0) + (writing_ ? 1 : 0);
    if (!reading_ && !read_done_ && !failed_.has_value() && in_flight < window_) {
      reading_ = true;
      a.read = true;
    }
    if (!running_ && !pending_.empty() && !failed_.has_value()) {
      running_ = true;
      current_ = std::move(pending_.front());
      pending_.pop_front();
      a.run = &current_;
    }
    if (!writing_ && !to_write_.empty()) {
      writing_ = true;
      written_ = std::move(to_write_.front());
      to_write_.pop_front();
      a.write = &written_;
    }
    const bool idle = !running_ && !writing_ && to_write_.empty();
    if (idle && (failed_.has_value() || (read_done_ && pending_.empty()))) {
      finished_ = true;
      a.finish = failed_.value_or(absl::OkStatus());
    }
    return a;
  }

  void Act(const Actions& a) {
    if (a.read) StartRead(&incoming_);
    if (a.write != nullptr) StartWrite(a.write);
    if (a.run != nullptr) Run(a.run);
    if (a.finish.has_value()) Finish(service_->Finished("TrainStream", *a.finish, start_));
  }

  void Run(v1::TrainStepRequest* req) {
    const bool queued = service_->pool_->Submit([this, req] {
      const absl::Time start = absl::Now();
      absl::Status s = Interrupted(ctx_, &service_->stop_at_);
      v1::TrainStepResponse resp;
      if (s.ok()) {
        const core::Interrupt interrupt = InterruptOf(ctx_, &service_->stop_at_);
        s = service_->group_ != nullptr ? service_->GroupTrainStep(*req, &resp, interrupt)
                                        : service_->DoTrainStep(*req, &resp, interrupt);
      }
      if (service_->metrics_ != nullptr) {
        service_->metrics_->ObserveRpc("TrainStream", s.code(),
                                       absl::ToDoubleSeconds(absl::Now() - start));
      }
      Actions actions;
      {
        absl::MutexLock lock(&mu_);
        running_ = false;
        if (s.ok()) {
          to_write_.push_back(std::move(resp));
        } else {
          Fail(s);
        }
        actions = DecideLocked();
      }
      Act(actions);
    });
    if (!queued) {
      Actions actions;
      {
        absl::MutexLock lock(&mu_);
        running_ = false;
        Fail(absl::UnavailableError("the server is shutting down; nothing was applied"));
        actions = DecideLocked();
      }
      Act(actions);
    }
  }

  TrainerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  const int64_t window_;
  const absl::Time start_ = absl::Now();
  v1::TrainStepRequest incoming_;  // the read in progress
  absl::Mutex mu_;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool read_done_ ABSL_GUARDED_BY(mu_) = false;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int64_t read_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<absl::Status> failed_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::TrainStepRequest> pending_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::TrainStepResponse> to_write_ ABSL_GUARDED_BY(mu_);
  v1::TrainStepRequest current_;   // the step a worker runs
  v1::TrainStepResponse written_;  // the answer being written
};

grpc::ServerBidiReactor<v1::TrainStepRequest, v1::TrainStepResponse>* TrainerService::TrainStream(
    grpc::CallbackServerContext* ctx) {
  return new TrainStreamReactor(this, ctx);
}

// ---------------------------------------------------------------- state

absl::StatusOr<std::string> TrainerService::DoExportState(const v1::ExportStateRequest& req) {
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  core::StateSnapshot snapshot = (*model)->ExportState();
  return checkpoint::EncodeState(
      snapshot, (*model)->spec(),
      {{"compute", std::string(core::ComputeName((*model)->compute()))},
       {"model_id", req.model_id()},
       {"server_version", TSCALE_VERSION}});
}

// Encodes the state on a worker, then writes it in chunks, one at a time.
class TrainerService::ExportReactor final : public grpc::ServerWriteReactor<v1::StateChunk> {
 public:
  ExportReactor(TrainerService* service, grpc::CallbackServerContext* ctx,
                const v1::ExportStateRequest& req)
      : service_(service),
        chunk_bytes_(std::min(kChunkBytes, service->options_.max_message_bytes - 64)) {
    AnswerInKind(ctx);
    if (absl::Status auth = service->Authorize(ctx); !auth.ok()) {
      Finish(service_->Finished("ExportState", auth, start_));
      return;
    }
    const bool queued = service->pool_->Submit([this, service, ctx, req] {
      if (absl::Status s = Interrupted(ctx, &service->stop_at_); !s.ok()) {
        Finish(service_->Finished("ExportState", s, start_));
        return;
      }
      auto bytes = service->DoExportState(req);
      if (!bytes.ok()) {
        Finish(service_->Finished("ExportState", bytes.status(), start_));
        return;
      }
      bytes_ = *std::move(bytes);
      WriteNext();
    });
    if (!queued) Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(service_->Finished("ExportState",
                                absl::CancelledError("the client stopped reading"), start_));
      return;
    }
    WriteNext();
  }
  void OnDone() override { delete this; }

 private:
  void WriteNext() {
    if (offset_ >= bytes_.size()) {
      Finish(service_->Finished("ExportState", absl::OkStatus(), start_));
      return;
    }
    const size_t n = std::min<size_t>(chunk_bytes_, bytes_.size() - offset_);
    chunk_.set_data(bytes_.data() + offset_, n);
    offset_ += n;
    StartWrite(&chunk_);
  }

  TrainerService* const service_;
  const absl::Time start_ = absl::Now();
  // Within the message limit, with room for the message's own few bytes.
  const int64_t chunk_bytes_;
  std::string bytes_;
  size_t offset_ = 0;
  v1::StateChunk chunk_;
};

grpc::ServerWriteReactor<v1::StateChunk>* TrainerService::ExportState(
    grpc::CallbackServerContext* ctx, const v1::ExportStateRequest* req) {
  return new ExportReactor(this, ctx, *req);
}

absl::Status TrainerService::DoImportState(const v1::ImportHeader& header, std::string data,
                                           v1::ModelInfo* resp,
                                           const core::Interrupt& interrupt,
                                           const CommitGate& gate) {
  auto device = DeviceFor(header.device());
  if (!device.ok()) return device.status();
  auto compute = ComputeFromProto(header.compute());
  if (!compute.ok()) return compute.status();
  auto decoded = checkpoint::DecodeState(std::move(data));
  if (!decoded.ok()) return decoded.status();
  core::ModelSpec spec;
  if (header.has_spec()) {
    auto s = SpecFromProto(header.spec());
    if (!s.ok()) return s.status();
    spec = *std::move(s);
  } else if (decoded->spec.has_value()) {
    spec = *decoded->spec;
  } else {
    return absl::InvalidArgumentError(
        "header.spec: expected a spec, in the header or in the file's __metadata__.spec; got "
        "neither");
  }
  if (absl::Status s = CheckNoCheckpoints(header.model_id()); !s.ok()) return s;
  // Room within --max-models and --max-device-bytes (the model replaced counts as freed) is
  // reserved before the model is built.
  auto bytes = core::Model::EstimateDeviceBytes(spec);
  if (!bytes.ok()) return bytes.status();
  auto reservation = registry_.Reserve(header.model_id(), *bytes, header.replace());
  if (!reservation.ok()) return reservation.status();
  core::ModelOptions options = options_.model;
  options.compute = *compute;
  auto model = core::Model::Import(spec, decoded->tensors, decoded->step, *device, options);
  if (!model.ok()) return model.status();
  std::shared_ptr<core::Model> shared = *std::move(model);
  if (absl::Status s = interrupt(); !s.ok()) return s;
  if (gate) {
    if (absl::Status s = gate(*shared); !s.ok()) return s;
  }
  if (absl::Status s = registry_.Add(*std::move(reservation), shared); !s.ok()) return s;
  if (checkpointer_ != nullptr) checkpointer_->Forget(header.model_id());
  ModelInfoToProto(header.model_id(), *shared, resp);
  return absl::OkStatus();
}

// Reads the header, then the file's chunks up to --max-import-bytes, then imports on a worker.
class TrainerService::ImportReactor final
    : public grpc::ServerReadReactor<v1::ImportStateRequest> {
 public:
  ImportReactor(TrainerService* service, grpc::CallbackServerContext* ctx, v1::ModelInfo* resp)
      : service_(service), ctx_(ctx), resp_(resp) {
    if (absl::Status auth = service->Authorize(ctx); !auth.ok()) {
      Finish(service_->Finished("ImportState", auth, start_));
      return;
    }
    StartRead(&message_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Complete();
      return;
    }
    absl::Status s = Take();
    if (!s.ok()) {
      Finish(service_->Finished("ImportState", s, start_));
      return;
    }
    StartRead(&message_);
  }
  void OnDone() override { delete this; }

 private:
  absl::Status Take() {
    const int64_t index = messages_++;
    // A data message is judged by its payload, so that chunks of exactly the limit pass.
    const int64_t size = message_.part_case() == v1::ImportStateRequest::kData
                             ? static_cast<int64_t>(message_.data().size())
                             : static_cast<int64_t>(message_.ByteSizeLong());
    if (absl::Status s =
            service_->CheckSize(size, absl::StrCat("ImportStateRequest[", index, "]"));
        !s.ok()) {
      return s;
    }
    if (index == 0) {
      if (message_.part_case() != v1::ImportStateRequest::kHeader) {
        return absl::InvalidArgumentError(
            "header: expected the first message to hold the header, got data");
      }
      header_ = message_.header();
      if (absl::Status s = core::ValidateModelId(header_.model_id(), "header.model_id"); !s.ok()) {
        return s;
      }
      // A taken id is refused before the file is sent, unless it is to be replaced.
      if (!header_.replace()) return service_->registry_.CheckFree(header_.model_id());
      return absl::OkStatus();
    }
    if (message_.part_case() != v1::ImportStateRequest::kData) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ImportStateRequest[", index, "]: expected data, got a second header"));
    }
    if (static_cast<int64_t>(data_.size() + message_.data().size()) >
        service_->options_.max_import_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "data: the state file exceeds the server's limit of ",
          service_->options_.max_import_bytes, " bytes (--max-import-bytes)"));
    }
    data_.append(message_.data());
    return absl::OkStatus();
  }

  void Complete() {
    if (messages_ == 0) {
      Finish(service_->Finished(
          "ImportState",
          absl::InvalidArgumentError(
              "header: expected a first message holding the header, got no message"),
          start_));
      return;
    }
    if (data_.empty()) {
      Finish(service_->Finished(
          "ImportState",
          absl::InvalidArgumentError("data: expected a state file after the header, got no data"),
          start_));
      return;
    }
    // A stream the client cancelled also ends in a failed read: Interrupted tells it from the
    // end of the file, and a cancelled import imports nothing.
    const bool queued = service_->pool_->Submit([this] {
      absl::Status s = Interrupted(ctx_, &service_->stop_at_);
      if (s.ok()) {
        s = service_->group_ != nullptr
                ? service_->GroupImportState(header_, std::move(data_), resp_,
                                             InterruptOf(ctx_, &service_->stop_at_))
                : service_->DoImportState(header_, std::move(data_), resp_,
                                          InterruptOf(ctx_, &service_->stop_at_));
      }
      Finish(service_->Finished("ImportState", s, start_));
    });
    if (!queued) Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  }

  TrainerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  v1::ModelInfo* const resp_;
  const absl::Time start_ = absl::Now();
  v1::ImportStateRequest message_;
  v1::ImportHeader header_;
  std::string data_;
  int64_t messages_ = 0;
};

grpc::ServerReadReactor<v1::ImportStateRequest>* TrainerService::ImportState(
    grpc::CallbackServerContext* ctx, v1::ModelInfo* resp) {
  return new ImportReactor(this, ctx, resp);
}

// ---------------------------------------------------------------- statistics, server

absl::Status TrainerService::DoGetScaleStats(const v1::GetScaleStatsRequest& req,
                                             v1::ScaleStats* resp) {
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  if (req.include_per_group()) {
    if (absl::Status s = CheckSize((*model)->summary().groups * 4 + kEnvelopeBytes,
                                   "the response's per-group scales");
        !s.ok()) {
      return s;
    }
  }
  core::ModelScaleStats stats = (*model)->ScaleStats(req.include_per_group());
  resp->set_model_id(req.model_id());
  resp->set_step(stats.step);
  for (const core::LayerScaleStats& l : stats.layers) ScaleStatsToProto(l, resp->add_layers());
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainerService::GetScaleStats(grpc::CallbackServerContext* ctx,
                                                        const v1::GetScaleStatsRequest* req,
                                                        v1::ScaleStats* resp) {
  return Dispatch(ctx, "GetScaleStats", *req,
                  [this, req, resp] { return DoGetScaleStats(*req, resp); });
}

// ---------------------------------------------------------------- checkpoints

absl::StatusOr<checkpoint::Checkpointer*> TrainerService::Checkpoints() const {
  if (checkpointer_ == nullptr) {
    return absl::FailedPreconditionError(
        "checkpoints: this server keeps none (start it with --checkpoint-dir); ExportState and "
        "ImportState save and restore a model's state as a file");
  }
  return checkpointer_;
}

absl::Status TrainerService::CheckNoCheckpoints(const std::string& model_id) const {
  if (checkpointer_ == nullptr) return absl::OkStatus();
  auto list = checkpointer_->store().List(model_id);
  if (!list.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "model_id: checkpoints of a model '", model_id, "' are on disk (newest ", list->back().name,
      "); RestoreCheckpoint brings that model back (tscale restore ID), DeleteModel with "
      "delete_checkpoints removes them (tscale delete ID --delete-checkpoints)"));
}

void TrainerService::Updated(const std::string& model_id, int64_t step, bool replayed,
                             bool train_step) {
  if (checkpointer_ != nullptr && !replayed) checkpointer_->AfterUpdate(model_id, step);
  if (metrics_ != nullptr) metrics_->CountUpdate(model_id, train_step, replayed);
}

namespace {

void CheckpointInfoToProto(const checkpoint::CheckpointInfo& info, v1::CheckpointInfo* out) {
  out->set_model_id(info.model_id);
  out->set_name(info.name);
  out->set_step(info.step);
  out->set_bytes(info.bytes);
  out->set_crc32c(info.crc32c);
}

}  // namespace

absl::Status TrainerService::DoSaveCheckpoint(const v1::SaveCheckpointRequest& req,
                                              v1::CheckpointInfo* resp) {
  auto checkpoints = Checkpoints();
  if (!checkpoints.ok()) return checkpoints.status();
  auto model = Find(req.model_id());
  if (!model.ok()) return model.status();
  auto info = (*checkpoints)->Save(req.model_id());
  if (!info.ok()) return info.status();
  CheckpointInfoToProto(*info, resp);
  return absl::OkStatus();
}

absl::Status TrainerService::DoListCheckpoints(const v1::ListCheckpointsRequest& req,
                                               v1::ListCheckpointsResponse* resp) {
  auto checkpoints = Checkpoints();
  if (!checkpoints.ok()) return checkpoints.status();
  if (absl::Status s = core::ValidateModelId(req.model_id()); !s.ok()) return s;
  auto list = (*checkpoints)->store().List(req.model_id());
  if (!list.ok()) return list.status();
  for (const checkpoint::CheckpointInfo& info : *list) {
    CheckpointInfoToProto(info, resp->add_checkpoints());
  }
  return absl::OkStatus();
}

absl::Status TrainerService::DoRestoreCheckpoint(const v1::RestoreCheckpointRequest& req,
                                                 v1::ModelInfo* resp) {
  auto checkpoints = Checkpoints();
  if (!checkpoints.ok()) return checkpoints.status();
  if (absl::Status s = core::ValidateModelId(req.model_id()); !s.ok()) return s;
  auto device = DeviceFor(req.device());
  if (!device.ok()) return device.status();
  std::optional<core::ComputeType> compute;
  if (req.compute() != v1::COMPUTE_TYPE_UNSPECIFIED) {
    auto c = ComputeFromProto(req.compute());
    if (!c.ok()) return c.status();
    compute = *c;
  }
  // A group's restore rolls back, and compares, the model under model_id on every rank.
  if (group_ != nullptr && (!req.new_model_id().empty() || req.from_deleted())) {
    return absl::UnimplementedError(absl::StrCat(
        !req.new_model_id().empty() ? "new_model_id" : "from_deleted",
        ": not available on a server in a replica group; restore in place"));
  }
  if (req.from_deleted()) {
    if (absl::Status s = (*checkpoints)->store().TakeFromTrash(req.model_id()); !s.ok()) return s;
  }
  checkpoint::Checkpointer::RestoreTarget target;
  target.new_model_id = req.new_model_id();
  target.discard_newer = req.discard_newer();
  auto model = (*checkpoints)->Restore(req.model_id(), req.name(), *device, options_.model,
                                       compute, nullptr, target);
  if (!model.ok()) return model.status();
  ModelInfoToProto(req.new_model_id().empty() ? req.model_id() : req.new_model_id(), **model,
                   resp);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainerService::SaveCheckpoint(grpc::CallbackServerContext* ctx,
                                                         const v1::SaveCheckpointRequest* req,
                                                         v1::CheckpointInfo* resp) {
  return Dispatch(ctx, "SaveCheckpoint", *req,
                  [this, req, resp] { return DoSaveCheckpoint(*req, resp); });
}

grpc::ServerUnaryReactor* TrainerService::ListCheckpoints(grpc::CallbackServerContext* ctx,
                                                          const v1::ListCheckpointsRequest* req,
                                                          v1::ListCheckpointsResponse* resp) {
  return Dispatch(ctx, "ListCheckpoints", *req,
                  [this, req, resp] { return DoListCheckpoints(*req, resp); });
}

grpc::ServerUnaryReactor* TrainerService::RestoreCheckpoint(
    grpc::CallbackServerContext* ctx, const v1::RestoreCheckpointRequest* req,
    v1::ModelInfo* resp) {
  return Dispatch(ctx, "RestoreCheckpoint", *req, [this, req, resp] {
    return group_ != nullptr ? GroupRestoreCheckpoint(*req, resp) : DoRestoreCheckpoint(*req, resp);
  });
}

grpc::ServerUnaryReactor* TrainerService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                        const v1::GetServerInfoRequest* req,
                                                        v1::ServerInfo* resp) {
  return Dispatch(ctx, "GetServerInfo", *req, [this, resp] {
    resp->set_version(TSCALE_VERSION);
    resp->set_default_device(core::DeviceName(options_.default_device));
    resp->add_devices("cpu");
    for (int i = 0; i < core::CudaDeviceCount(); ++i) resp->add_devices(absl::StrCat("cuda:", i));
    resp->set_max_message_bytes(options_.max_message_bytes);
    resp->set_stream_window(options_.stream_window);
    resp->set_max_pending_passes(options_.model.max_pending_passes);
    resp->set_max_pending_bytes(options_.model.max_pending_bytes);
    resp->set_models(static_cast<int32_t>(registry_.size()));
    resp->set_max_models(options_.limits.max_models);
    resp->set_max_device_bytes(options_.limits.max_device_bytes);
    resp->set_device_bytes_in_use(registry_.device_bytes_in_use());
    resp->set_pending_pass_ttl_seconds(absl::ToInt64Seconds(options_.model.pending_pass_ttl));
    GroupInfo(resp);
    return absl::OkStatus();
  });
}

}  // namespace tscale::service
