// Checkpoints on disk (docs/state-format.md, section 5): DIR/<model_id>/step-<8-digit step>.safetensors, each written
// to a temporary file in the same folder, fsync'd, renamed into place and the folder fsync'd, so
// that a crash at any moment leaves either the old set of files or the new one, plus at most a
// temporary file that the next Open removes.
#ifndef TSCALE_SERVER_CHECKPOINT_STORE_H_
#define TSCALE_SERVER_CHECKPOINT_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/checkpoint/state_file.h"

namespace tscale::checkpoint {

struct CheckpointInfo {
  std::string model_id;
  std::string name;    // "step-00000042"
  std::string path;
  int64_t step = 0;
  int64_t bytes = 0;
  std::string crc32c;  // of the data section, as the file's metadata gives it
};

struct LoadedCheckpoint {
  CheckpointInfo info;
  DecodedState state;
  // Newer files passed over because they failed to verify: "<path>: <reason>".
  std::vector<std::string> skipped;
};

// "step-00000042"; more digits beyond 99999999.
std::string CheckpointName(int64_t step);

class CheckpointStore {
 public:
  // Creates `dir` when missing and removes stale temporary files of earlier runs, reporting each
  // to `log`. InvalidArgument when `dir` cannot be created or is not a folder.
  // Expired folders of deleted models (see MoveToTrash) are removed too.
  static absl::StatusOr<std::unique_ptr<CheckpointStore>> Open(
      const std::string& dir, std::function<void(const std::string&)> log = nullptr,
      absl::Duration deleted_retention = absl::Hours(168));

  const std::string& dir() const { return dir_; }

  // Writes `file` (a state file's bytes) as the checkpoint of `model_id` at `step`, atomically,
  // replacing one of the same step. Internal on an I/O error, naming the path and the error; the
  // checkpoints already there stay as they were.
  absl::StatusOr<CheckpointInfo> Save(absl::string_view model_id, int64_t step,
                                      absl::string_view file);

  // The model's checkpoints, oldest first, read from their headers (data not verified; files
  // whose header does not parse are left out). NotFound when there are none.
  absl::StatusOr<std::vector<CheckpointInfo>> List(absl::string_view model_id) const;

  // The model ids that have a folder.
  std::vector<std::string> ModelIds() const;

  // Loads and verifies (parse, CRC) the checkpoint `name`, or with an empty name the newest that
  // verifies, skipping damaged ones. `accept`, when given, is a further check of a decoded state
  // (e.g. that a model can be built from it); a state it refuses with DataLoss counts as damaged,
  // any other refusal ends the load with that status.
  // InvalidArgument for a malformed name; NotFound when there is no such checkpoint (or none at
  // all); DataLoss when the named one, or every one, is damaged.
  absl::StatusOr<LoadedCheckpoint> Load(
      absl::string_view model_id, absl::string_view name,
      const std::function<absl::Status(const DecodedState&)>& accept = nullptr) const;

  // Removes the model's folder and every checkpoint in it. NotFound when it has none.
  absl::Status Remove(absl::string_view model_id);

  // The trash of deleted models: DIR/.deleted/<model_id>@<unix seconds of the deletion>/. A
  // deleted model must stay deleted across restarts, yet its history must not vanish with one
  // command: its folder moves there whole (one rename), where neither the start-up restore nor
  // ModelIds nor List sees it, and it is removed once `deleted_retention` has passed (0: kept).
  // NotFound when the model has no folder. Expired folders are removed first.
  absl::Status MoveToTrash(absl::string_view model_id, absl::Time now = absl::Now());
  // Moves the model's most recently deleted folder back to DIR/<model_id>/. NotFound when the
  // trash holds none of it; FailedPrecondition when the model has checkpoints of its own.
  absl::Status TakeFromTrash(absl::string_view model_id);
  // Removes the trash folders older than the retention; logs each. Returns how many.
  int ExpireTrash(absl::Time now = absl::Now());
  std::string TrashDir() const;

  // Removes all but the newest `keep` checkpoints of the model (keep > 0).
  absl::Status Prune(absl::string_view model_id, int keep);
  // Removes the model's checkpoints of steps after `step`.
  absl::Status RemoveAfter(absl::string_view model_id, int64_t step);

 private:
  explicit CheckpointStore(std::string dir) : dir_(std::move(dir)) {}
  std::string ModelDir(absl::string_view model_id) const;

  const std::string dir_;
  absl::Duration deleted_retention_ = absl::Hours(168);
  std::function<void(const std::string&)> log_;
  // Serialises renames and removals within the store; writing the data happens outside it.
  mutable absl::Mutex mu_;
};

}  // namespace tscale::checkpoint

#endif  // TSCALE_SERVER_CHECKPOINT_STORE_H_
