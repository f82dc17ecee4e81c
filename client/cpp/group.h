// A client of a replica group: N tscale-servers (tscale-server --group-size N ...) that hold the
// same models and train them together. Group calls (CreateModel, DeleteModel, UpdateCorrelation,
// TrainStep, ImportState, RestoreCheckpoint) go to every rank at once, as the group requires;
// TrainStep splits its batch across the ranks by rows, and its answer carries the group's loss and
// step. A group call that failed on the group (UNAVAILABLE: not formed or re-forming; ABORTED:
// another call met it) changed nothing anywhere and is sent again to every rank, with the same
// expected_step, until `retry_time` has passed: updates are exactly-once on every rank. An error
// names the rank whose answer it is ("rank R: ...").
#ifndef TSCALE_CLIENT_CPP_GROUP_H_
#define TSCALE_CLIENT_CPP_GROUP_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"

namespace tscale::client {

class ReplicaGroup {
 public:
  // `addresses[r]` is rank r. Each rank's client gets `options` with its own retries off: the
  // group retries its calls on every rank together.
  explicit ReplicaGroup(const std::vector<std::string>& addresses, ClientOptions options = {},
                        absl::Duration retry_time = absl::Seconds(120));

  int size() const { return static_cast<int>(clients_.size()); }
  Client& rank(int r) { return *clients_[r]; }

  absl::StatusOr<std::vector<v1::ServerInfo>> GetServerInfo();
  // Every rank's ModelInfo; FailedPrecondition when the ranks' steps differ.
  absl::StatusOr<v1::ModelInfo> GetModel(absl::string_view model_id);

  absl::StatusOr<v1::ModelInfo> CreateModel(const v1::CreateModelRequest& request);
  absl::Status DeleteModel(const v1::DeleteModelRequest& request);
  absl::StatusOr<v1::UpdateCorrelationResponse> UpdateCorrelation(absl::string_view model_id,
                                                                  int64_t expected_step);
  // The request's input and target rows are split across the ranks (rank r takes rows
  // [n r / N, n (r + 1) / N)); InvalidArgument with fewer rows than ranks. The answer is rank 0's
  // (the group's loss and step), with every rank's output rows when want_output.
  absl::StatusOr<v1::TrainStepResponse> TrainStep(const v1::TrainStepRequest& request);

  // The rows [begin, end) of a [rows, ...] tensor.
  static absl::StatusOr<v1::Tensor> Rows(const v1::Tensor& t, int64_t begin, int64_t end);

 private:
  // fn(rank) on every rank at once; the lowest failing rank's error, named.
  absl::Status Each(const std::function<absl::Status(int)>& fn);
  // Each, again while the group fails with UNAVAILABLE or ABORTED, within retry_time_.
  absl::Status GroupCall(const std::function<absl::Status(int)>& fn);

  std::vector<std::unique_ptr<Client>> clients_;
  absl::Duration retry_time_;
};

}  // namespace tscale::client

#endif  // TSCALE_CLIENT_CPP_GROUP_H_
