// Checkpoints of the models a server holds: saving one now, the automatic policies (every N steps,
// every T seconds, at shutdown), retention, and restoring models from the store.
//
// A save copies the model's integer state under the model's lock (small: a few bytes per group
// and 1.6 bits per weight) and encodes and writes it outside, so the model trains on meanwhile and
// other models are never held up. Automatic saves run on one background thread.
#ifndef TSCALE_SERVER_CHECKPOINT_CHECKPOINTER_H_
#define TSCALE_SERVER_CHECKPOINT_CHECKPOINTER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <c10/core/Device.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/checkpoint/store.h"
#include "server/core/model.h"
#include "server/core/registry.h"

namespace tscale::checkpoint {

struct CheckpointPolicy {
  int64_t every_steps = 0;    // save when an update brings the step to a multiple; 0: off
  int64_t every_seconds = 0;  // save each model whose step changed, this often; 0: off
  int keep = 5;               // checkpoints kept per model, newest first; 0: all
};

// How a restore treats the model's other checkpoints.
struct RestoreTarget {
  // Non-empty: register the model under this id instead (a branch), which must hold no model
  // and no checkpoints; its first checkpoint is written at once, so the branch outlives a
  // restart. The source model and its files stay as they are.
  std::string new_model_id;
  // Restoring in place a checkpoint older than the model's newest: remove the later ones.
  // Without it such a restore is FailedPrecondition, so that history is never lost unasked.
  bool discard_newer = false;
};

class Checkpointer {
 public:
  // `metadata` is added to every file (e.g. server_version). `log` receives one line per event
  // worth an operator's attention (restores, skipped files, failed automatic saves).
  Checkpointer(CheckpointStore* store, core::ModelRegistry* registry, CheckpointPolicy policy,
               std::map<std::string, std::string> metadata,
               std::function<void(const std::string&)> log);
  ~Checkpointer();  // Stop()

  CheckpointStore& store() { return *store_; }

  // Called after every save and restore with its operation ("save", "restore"), model, outcome
  // and duration in seconds (-1 for a failure that took none: an automatic save dropped, a
  // damaged file skipped); for metrics. Set before use.
  using Observer = std::function<void(const char* operation, const std::string& model, bool ok,
                                      double seconds)>;
  void set_observer(Observer observer) { observer_ = std::move(observer); }

  // Saves the model's state now, then applies retention. Checkpoints of later steps are removed:
  // they belong to a history the model left (it was restored to an earlier step with
  // discard_newer, or its state was imported over). NotFound for an unknown model.
  absl::StatusOr<CheckpointInfo> Save(const std::string& model_id);

  // Restores every model of the store from its newest checkpoint that verifies and builds,
  // logging each file skipped and each model restored. Models already registered are left alone.
  void RestoreAll(c10::Device device, const core::ModelOptions& options);

  using RestoreTarget = checkpoint::RestoreTarget;

  // Loads a checkpoint (newest valid when `name` is empty), builds its model (with the file's
  // compute type unless `compute` is given) and registers it under `model_id` (or
  // `target.new_model_id`), replacing the model there. ResourceExhausted, with nothing changed,
  // when the model would take the registry beyond its limits.
  absl::StatusOr<std::shared_ptr<core::Model>> Restore(const std::string& model_id,
                                                       const std::string& name,
                                                       c10::Device device,
                                                       const core::ModelOptions& options,
                                                       std::optional<core::ComputeType> compute,
                                                       CheckpointInfo* info,
                                                       const RestoreTarget& target = {});

  // Call after an update brought `model_id` to `step`: when the step policy asks for a
  // checkpoint, copies the model's state now (so the file holds that step even if training goes
  // on) and queues the copy to be written in the background.
  void AfterUpdate(const std::string& model_id, int64_t step);
  // Forget what was saved of a model (it was deleted or replaced by another).
  void Forget(const std::string& model_id);
  // After the model was deleted from the registry: moves its checkpoints to the store's trash
  // (or removes them when `remove`), after any save of it in progress, and drops its queued
  // snapshots, so that no file of it is written after. NotFound when it has no checkpoints.
  absl::Status Discard(const std::string& model_id, bool remove);

  // Starts the background thread: queued saves and the time policy.
  void Start();
  // Stops it after the save in progress; queued saves are dropped. Idempotent.
  void Stop();

  // Saves every model whose step differs from its last checkpoint's. Returns the number saved;
  // failures are logged, and the first is returned after trying every model.
  absl::StatusOr<int> SaveChanged();

 private:
  void Loop();
  void Record(const std::string& model_id, int64_t step);
  absl::StatusOr<CheckpointInfo> SaveLocked(const std::string& model_id);
  // Encodes and writes a snapshot of `model`, then retention. Hold the model's lock.
  absl::StatusOr<CheckpointInfo> Write(const std::string& model_id, const core::Model& model,
                                       const core::StateSnapshot& snapshot);
  void Observe(const char* operation, const std::string& model_id, bool ok, absl::Time start);
  // Builds the model under a reservation of the registry's limits (replacing the model there
  // when `replace`), taken before the model is built and left in `reservation` for the Add.
  // The checkpoint is `model_id`'s; the model is reserved under `target_id`.
  absl::StatusOr<std::shared_ptr<core::Model>> Load(
      const std::string& model_id, const std::string& name, c10::Device device,
      core::ModelOptions options, std::optional<core::ComputeType> compute, CheckpointInfo* info,
      bool replace, std::optional<core::ModelRegistry::Reservation>* reservation,
      const std::string& target_id);
  // Restore with a new_model_id.
  absl::StatusOr<std::shared_ptr<core::Model>> RestoreAs(
      const std::string& model_id, const std::string& name, c10::Device device,
      const core::ModelOptions& options, std::optional<core::ComputeType> compute,
      CheckpointInfo* info, const RestoreTarget& target);
  // Held through a save or a restore of one model, so that its files change in step order.
  std::shared_ptr<absl::Mutex> ModelLock(const std::string& model_id);

  CheckpointStore* const store_;
  core::ModelRegistry* const registry_;
  const CheckpointPolicy policy_;
  const std::map<std::string, std::string> metadata_;
  const std::function<void(const std::string&)> log_;
  Observer observer_;

  absl::Mutex mu_;
  // The step of each model's newest checkpoint, and when it was written.
  struct Saved {
    int64_t step = -1;
    absl::Time when;
  };
  absl::flat_hash_map<std::string, Saved> saved_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<absl::Mutex>> model_locks_ ABSL_GUARDED_BY(mu_);
  // Snapshots taken by the step policy, awaiting their write.
  struct Pending {
    std::string model_id;
    std::shared_ptr<core::Model> model;
    core::StateSnapshot snapshot;
  };
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tscale::checkpoint

#endif  // TSCALE_SERVER_CHECKPOINT_CHECKPOINTER_H_
