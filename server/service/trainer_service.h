// The TernaryTrainer service: thin handlers that convert a request, call the core on a worker
// thread, convert the result and map the status in one place.
#ifndef TSCALE_SERVER_SERVICE_TRAINER_SERVICE_H_
#define TSCALE_SERVER_SERVICE_TRAINER_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <c10/core/Device.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/checkpoint/checkpointer.h"
#include "server/core/registry.h"
#include "server/metrics/metrics.h"
#include "server/service/auth.h"
#include "server/service/worker_pool.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale::group {
class ReplicaGroup;
class GroupCall;
class GroupState;
}  // namespace tscale::group

namespace tscale::service {

struct TrainerOptions {
  c10::Device default_device = c10::Device(c10::kCPU);
  int64_t max_message_bytes = int64_t{256} << 20;
  int64_t max_import_bytes = int64_t{16} << 30;
  int stream_window = 8;     // TrainStream: steps read and not yet answered, at most
  core::ModelOptions model;  // pending-pass limits of every model
  core::RegistryLimits limits;  // models and their device bytes
};

class TrainerService final : public v1::TernaryTrainer::CallbackService {
 public:
  TrainerService(TrainerOptions options, WorkerPool* pool);

  // Enables the checkpoint calls and policies; call before serving.
  void set_checkpointer(checkpoint::Checkpointer* checkpointer) { checkpointer_ = checkpointer; }
  // Records every call's duration and outcome, and updates; call before serving.
  void set_metrics(metrics::Metrics* metrics) { metrics_ = metrics; }
  // Requires a bearer token of `auth` on every call of this service (health checks are another
  // service, and stay open); call before serving.
  void set_auth(const TokenAuth* auth) { auth_ = auth; }
  // Makes this server a rank of a replica group: its state-changing calls become group calls
  // (see server/group/replica_group.h); call before serving.
  void set_group(group::ReplicaGroup* group) { group_ = group; }
  // The models of this server as a replica group brings its ranks in line when it forms (their
  // inventory, state files, and installing a peer's); owned by the service.
  group::GroupState* group_state();
  core::ModelRegistry& registry() { return registry_; }
  // The server is shutting down: from `deadline` (the end of its grace period) on, calls not yet
  // past their commit point are refused with UNAVAILABLE (retryable, nothing applied).
  void StartShutdown(absl::Time deadline) { stop_at_.store(absl::ToUnixNanos(deadline)); }
  // Unary calls a worker is running now.
  int64_t running_calls() const { return running_.load(); }

  grpc::ServerUnaryReactor* CreateModel(grpc::CallbackServerContext* ctx,
                                        const v1::CreateModelRequest* req,
                                        v1::ModelInfo* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* ctx,
                                     const v1::GetModelRequest* req, v1::ModelInfo* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteModel(grpc::CallbackServerContext* ctx,
                                        const v1::DeleteModelRequest* req,
                                        v1::DeleteModelResponse* resp) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx,
                                    const v1::ForwardRequest* req,
                                    v1::ForwardResponse* resp) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* ctx,
                                     const v1::BackwardRequest* req,
                                     v1::BackwardResponse* resp) override;
  grpc::ServerUnaryReactor* ReleasePasses(grpc::CallbackServerContext* ctx,
                                          const v1::ReleasePassesRequest* req,
                                          v1::ReleasePassesResponse* resp) override;
  grpc::ServerUnaryReactor* UpdateCorrelation(grpc::CallbackServerContext* ctx,
                                              const v1::UpdateCorrelationRequest* req,
                                              v1::UpdateCorrelationResponse* resp) override;
  grpc::ServerUnaryReactor* TrainStep(grpc::CallbackServerContext* ctx,
                                      const v1::TrainStepRequest* req,
                                      v1::TrainStepResponse* resp) override;
  grpc::ServerBidiReactor<v1::TrainStepRequest, v1::TrainStepResponse>* TrainStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerWriteReactor<v1::StateChunk>* ExportState(
      grpc::CallbackServerContext* ctx, const v1::ExportStateRequest* req) override;
  grpc::ServerReadReactor<v1::ImportStateRequest>* ImportState(grpc::CallbackServerContext* ctx,
                                                               v1::ModelInfo* resp) override;
  grpc::ServerUnaryReactor* GetScaleStats(grpc::CallbackServerContext* ctx,
                                          const v1::GetScaleStatsRequest* req,
                                          v1::ScaleStats* resp) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* req,
                                          v1::ServerInfo* resp) override;
  // Checkpoints on the server's disk: FAILED_PRECONDITION without --checkpoint-dir.
  grpc::ServerUnaryReactor* SaveCheckpoint(grpc::CallbackServerContext* ctx,
                                           const v1::SaveCheckpointRequest* req,
                                           v1::CheckpointInfo* resp) override;
  grpc::ServerUnaryReactor* ListCheckpoints(grpc::CallbackServerContext* ctx,
                                            const v1::ListCheckpointsRequest* req,
                                            v1::ListCheckpointsResponse* resp) override;
  grpc::ServerUnaryReactor* RestoreCheckpoint(grpc::CallbackServerContext* ctx,
                                              const v1::RestoreCheckpointRequest* req,
                                              v1::ModelInfo* resp) override;


 private:
  class ExportReactor;
  class ImportReactor;
  class TrainStreamReactor;

  // Runs `fn` on a worker and finishes the call with its status.
  template <typename Fn>
  grpc::ServerUnaryReactor* Dispatch(grpc::CallbackServerContext* ctx, absl::string_view method,
                                     const google::protobuf::Message& request, Fn fn);

  absl::Status CheckSize(int64_t bytes, absl::string_view what) const;
  // Unauthenticated unless the call carries an accepted token (or no tokens are required).
  absl::Status Authorize(const grpc::CallbackServerContext* ctx) const;
  absl::StatusOr<c10::Device> DeviceFor(const std::string& name) const;
  absl::StatusOr<std::shared_ptr<core::Model>> Find(const std::string& model_id) const;

  // Asked with the model built, right before it is registered: a replica group's commit point.
  using CommitGate = std::function<absl::Status(const core::Model&)>;
  absl::Status DoCreateModel(const v1::CreateModelRequest& req, v1::ModelInfo* resp,
                             const core::Interrupt& interrupt, const CommitGate& gate = nullptr);
  absl::Status DoForward(const v1::ForwardRequest& req, v1::ForwardResponse* resp);
  absl::Status DoBackward(const v1::BackwardRequest& req, v1::BackwardResponse* resp);
  // A TrainStep's arguments, converted and checked. input and target may view the request's
  // bytes (Hold::kBorrow): use them only while the request lives.
  struct TrainArgs {
    std::shared_ptr<core::Model> model;
    core::Loss loss = core::Loss::kMse;
    at::Tensor input, target;
  };
  absl::StatusOr<TrainArgs> ParseTrainStep(const v1::TrainStepRequest& req) const;
  // With `group` (a group TrainStep that applies), the update is the group's.
  absl::Status RunTrainStep(const v1::TrainStepRequest& req, const TrainArgs& args,
                            v1::TrainStepResponse* resp, const core::Interrupt& interrupt,
                            const core::GroupStep* group);
  absl::Status DoTrainStep(const v1::TrainStepRequest& req, v1::TrainStepResponse* resp,
                           const core::Interrupt& interrupt);
  absl::StatusOr<std::string> DoExportState(const v1::ExportStateRequest& req);
  absl::Status DoImportState(const v1::ImportHeader& header, std::string data,
                             v1::ModelInfo* resp, const core::Interrupt& interrupt,
                             const CommitGate& gate = nullptr);
  absl::Status DoUpdateCorrelation(const v1::UpdateCorrelationRequest& req,
                                   v1::UpdateCorrelationResponse* resp,
                                   const core::Interrupt& interrupt);
  // The group calls (with a replica group): the same calls, run through the group.
  absl::Status GroupCreateModel(const v1::CreateModelRequest& req, v1::ModelInfo* resp,
                                const core::Interrupt& interrupt);
  absl::Status GroupImportState(const v1::ImportHeader& header, std::string data,
                                v1::ModelInfo* resp, const core::Interrupt& interrupt);
  absl::Status GroupRestoreCheckpoint(const v1::RestoreCheckpointRequest& req,
                                      v1::ModelInfo* resp);
  absl::Status GroupDeleteModel(const v1::DeleteModelRequest& req);
  absl::Status GroupUpdateCorrelation(const v1::UpdateCorrelationRequest& req,
                                      v1::UpdateCorrelationResponse* resp,
                                      const core::Interrupt& interrupt);
  // GetServerInfo's group fields.
  void GroupInfo(v1::ServerInfo* resp) const;
  absl::Status GroupTrainStep(const v1::TrainStepRequest& req, v1::TrainStepResponse* resp,
                              const core::Interrupt& interrupt);
  absl::Status DoGetScaleStats(const v1::GetScaleStatsRequest& req, v1::ScaleStats* resp);
  absl::Status DoDeleteModel(const v1::DeleteModelRequest& req);
  absl::Status DoSaveCheckpoint(const v1::SaveCheckpointRequest& req, v1::CheckpointInfo* resp);
  absl::Status DoListCheckpoints(const v1::ListCheckpointsRequest& req,
                                 v1::ListCheckpointsResponse* resp);
  absl::Status DoRestoreCheckpoint(const v1::RestoreCheckpointRequest& req, v1::ModelInfo* resp);
  // FailedPrecondition without a checkpoint folder.
  absl::StatusOr<checkpoint::Checkpointer*> Checkpoints() const;
  // A new model may take `model_id` only when no checkpoints of another model hold it.
  absl::Status CheckNoCheckpoints(const std::string& model_id) const;
  // After an UpdateCorrelation: Updated, and the response.
  void UpdatedCorrelation(const std::string& model_id, const core::UpdateResult& result,
                          v1::UpdateCorrelationResponse* resp);
  // After an update that applied: the step policy, metrics.
  void Updated(const std::string& model_id, int64_t step, bool replayed, bool train_step);
  // Maps the status and records the call's duration.
  grpc::Status Finished(absl::string_view method, const absl::Status& status,
                        absl::Time start) const;

  const TrainerOptions options_;
  WorkerPool* const pool_;
  core::ModelRegistry registry_;
  checkpoint::Checkpointer* checkpointer_ = nullptr;
  metrics::Metrics* metrics_ = nullptr;
  const TokenAuth* auth_ = nullptr;
  group::ReplicaGroup* group_ = nullptr;
  class GroupSync;
  std::shared_ptr<GroupSync> group_sync_;
  std::atomic<int64_t> stop_at_{0};  // Unix nanoseconds; 0 while serving
  std::atomic<int64_t> running_{0};
};

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_TRAINER_SERVICE_H_
