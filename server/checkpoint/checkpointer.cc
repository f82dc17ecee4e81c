#include "server/checkpoint/checkpointer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/core/device.h"

namespace tscale::checkpoint {
namespace {

std::optional<core::ComputeType> ComputeFromName(const std::string& name) {
  for (core::ComputeType c :
       {core::ComputeType::kFp32, core::ComputeType::kTf32, core::ComputeType::kBf16}) {
    if (core::ComputeName(c) == name) return c;
  }
  return std::nullopt;
}

}  // namespace

Checkpointer::Checkpointer(CheckpointStore* store, core::ModelRegistry* registry,
                           CheckpointPolicy policy, std::map<std::string, std::string> metadata,
                           std::function<void(const std::string&)> log)
    : store_(store),
      registry_(registry),
      policy_(policy),
      metadata_(std::move(metadata)),
      log_(log ? std::move(log) : [](const std::string&) {}) {}

Checkpointer::~Checkpointer() { Stop(); }

void Checkpointer::Record(const std::string& model_id, int64_t step) {
  absl::MutexLock lock(&mu_);
  Saved& s = saved_[model_id];
  // Saves of one model may finish out of order; the newest step is what is on disk.
  if (step >= s.step) s = Saved{step, absl::Now()};
}

void Checkpointer::Forget(const std::string& model_id) {
  absl::MutexLock lock(&mu_);
  saved_.erase(model_id);
}

absl::Status Checkpointer::Discard(const std::string& model_id, bool remove) {
  const std::shared_ptr<absl::Mutex> model_lock = ModelLock(model_id);
  absl::MutexLock hold(model_lock.get());
  {
    absl::MutexLock lock(&mu_);
    saved_.erase(model_id);
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(),
                                [&](const Pending& p) { return p.model_id == model_id; }),
                 queue_.end());
  }
  return remove ? store_->Remove(model_id) : store_->MoveToTrash(model_id);
}

std::shared_ptr<absl::Mutex> Checkpointer::ModelLock(const std::string& model_id) {
  absl::MutexLock lock(&mu_);
  std::shared_ptr<absl::Mutex>& m = model_locks_[model_id];
  if (m == nullptr) m = std::make_shared<absl::Mutex>();
  return m;
}

void Checkpointer::Observe(const char* operation, const std::string& model_id, bool ok,
                           absl::Time start) {
  if (observer_) observer_(operation, model_id, ok, absl::ToDoubleSeconds(absl::Now() - start));
}

absl::StatusOr<CheckpointInfo> Checkpointer::Save(const std::string& model_id) {
  // Saves of one model are serialised, so that its snapshots reach the disk in step order.
  const std::shared_ptr<absl::Mutex> model_lock = ModelLock(model_id);
  absl::MutexLock hold(model_lock.get());
  const absl::Time start = absl::Now();
  auto info = SaveLocked(model_id);
  // An unknown model is the caller's mistake, not a failed checkpoint.
  if (info.status().code() != absl::StatusCode::kNotFound) {
    Observe("save", model_id, info.ok(), start);
  }
  return info;
}

absl::StatusOr<CheckpointInfo> Checkpointer::SaveLocked(const std::string& model_id) {
  auto model = registry_->Get(model_id);
  if (!model.ok()) return model.status();
  // The copy is taken under the model's lock; encoding and writing happen outside it.
  return Write(model_id, **model, (*model)->ExportState());
}

absl::StatusOr<CheckpointInfo> Checkpointer::Write(const std::string& model_id,
                                                   const core::Model& model,
                                                   const core::StateSnapshot& snapshot) {
  std::map<std::string, std::string> extra = metadata_;
  extra["compute"] = std::string(core::ComputeName(model.compute()));
  extra["model_id"] = model_id;
  extra["created"] = absl::FormatTime(absl::RFC3339_sec, absl::Now(), absl::UTCTimeZone());
  const std::string file = EncodeState(snapshot, model.spec(), extra);
  auto info = store_->Save(model_id, snapshot.step, file);
  if (!info.ok()) return info.status();
  bool newest = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = saved_.find(model_id);
    newest = it == saved_.end() || snapshot.step >= it->second.step;
  }
  Record(model_id, snapshot.step);
  // Later checkpoints than the newest state belong to a history the model left (it was restored
  // to an earlier step); an older snapshot written late leaves them alone.
  if (newest) {
    if (absl::Status s = store_->RemoveAfter(model_id, snapshot.step); !s.ok()) {
      log_(absl::StrCat("removing later checkpoints of '", model_id, "': ", s.ToString()));
    }
  }
  if (absl::Status s = store_->Prune(model_id, policy_.keep); !s.ok()) {
    log_(absl::StrCat("retention of '", model_id, "': ", s.ToString()));
  }
  return info;
}

absl::StatusOr<std::shared_ptr<core::Model>> Checkpointer::Load(
    const std::string& model_id, const std::string& name, c10::Device device,
    core::ModelOptions options, std::optional<core::ComputeType> compute, CheckpointInfo* info,
    bool replace, std::optional<core::ModelRegistry::Reservation>* reservation,
    const std::string& target_id) {
  const absl::Time start = absl::Now();
  std::shared_ptr<core::Model> model;
  auto build = [&](const DecodedState& state) -> absl::Status {
    // Room in the registry first: a model beyond its limits is never built. (Not damage: the
    // store returns this status as it is.)
    reservation->reset();
    auto bytes = core::Model::EstimateDeviceBytes(*state.spec);
    if (!bytes.ok()) {
      return absl::DataLossError(absl::StrCat("its spec is not valid: ", bytes.status().message()));
    }
    auto reserved = registry_->Reserve(target_id, *bytes, replace);
    if (!reserved.ok()) return reserved.status();
    reservation->emplace(*std::move(reserved));
    core::ModelOptions o = options;
    if (compute.has_value()) {
      o.compute = *compute;
    } else if (auto it = state.metadata.find("compute"); it != state.metadata.end()) {
      o.compute = ComputeFromName(it->second).value_or(core::ComputeType::kFp32);
    }
    auto built = core::Model::Import(*state.spec, state.tensors, state.step, device, o);
    if (!built.ok()) {
      // A request for a compute type or device this server lacks is not damage of the file.
      if (built.status().code() == absl::StatusCode::kUnimplemented ||
          built.status().code() == absl::StatusCode::kResourceExhausted) {
        return built.status();
      }
      return absl::DataLossError(absl::StrCat("its state does not build a model: ",
                                              built.status().message()));
    }
    model = *std::move(built);
    return absl::OkStatus();
  };
  auto loaded = store_->Load(model_id, name, build);
  if (loaded.ok() || loaded.status().code() == absl::StatusCode::kDataLoss) {
    Observe("restore", model_id, loaded.ok(), start);
  }
  if (!loaded.ok()) return loaded.status();
  for (const std::string& s : loaded->skipped) {
    log_(absl::StrCat("skipped ", s));
    if (observer_) observer_("restore", model_id, false, -1);
  }
  if (info != nullptr) *info = loaded->info;
  return model;
}

absl::StatusOr<std::shared_ptr<core::Model>> Checkpointer::Restore(
    const std::string& model_id, const std::string& name, c10::Device device,
    const core::ModelOptions& options, std::optional<core::ComputeType> compute,
    CheckpointInfo* info, const RestoreTarget& target) {
  const bool branch = !target.new_model_id.empty();
  if (branch) return RestoreAs(model_id, name, device, options, compute, info, target);
  const std::shared_ptr<absl::Mutex> model_lock = ModelLock(model_id);
  absl::MutexLock hold(model_lock.get());
  CheckpointInfo loaded;
  std::optional<core::ModelRegistry::Reservation> reservation;
  auto model = Load(model_id, name, device, options, compute, &loaded, /*replace=*/true,
                    &reservation, model_id);
  if (!model.ok()) return model.status();
  // Rewinding is an experiment, not a decision to drop what came after: the later checkpoints
  // go only when asked. (Kept beside the rewound model they would be overwritten step by step
  // as it trains on, and would bring it back at their step after a restart.)
  if (auto list = store_->List(model_id); list.ok() && list->back().step > loaded.step) {
    // With no name, the later files are the damaged ones Load skipped (and logged): the newest
    // valid checkpoint is the model's history, and the next save would remove them anyway.
    if (!target.discard_newer && !name.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "name: ", loaded.name, " is older than the newest checkpoint of '", model_id, "' (",
          list->back().name, ", ", list->size(), " checkpoints in all); restore it as a new model "
          "(new_model_id; the CLI's restore --as NEW_ID) to keep them, or with discard_newer "
          "(--discard-newer) to continue from it and remove the later ones"));
    }
    if (absl::Status s = store_->RemoveAfter(model_id, loaded.step); !s.ok()) return s;
  }
  if (absl::Status s = registry_->Add(*std::move(reservation), *model); !s.ok()) return s;
  Forget(model_id);
  {
    // Snapshots of the model it replaces must not be written after it.
    absl::MutexLock lock(&mu_);
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(),
                                [&](const Pending& p) { return p.model_id == model_id; }),
                 queue_.end());
  }
  Record(model_id, loaded.step);
  if (info != nullptr) *info = loaded;
  return model;
}

absl::StatusOr<std::shared_ptr<core::Model>> Checkpointer::RestoreAs(
    const std::string& model_id, const std::string& name, c10::Device device,
    const core::ModelOptions& options, std::optional<core::ComputeType> compute,
    CheckpointInfo* info, const RestoreTarget& target) {
  const std::string& new_id = target.new_model_id;
  if (absl::Status s = core::ValidateModelId(new_id, "new_model_id"); !s.ok()) return s;
  if (new_id == model_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "new_model_id: expected an id other than model_id's, got '", new_id,
        "' (leave it empty to restore in place)"));
  }
  if (target.discard_newer) {
    return absl::InvalidArgumentError(
        "discard_newer: a restore as a new model (new_model_id) removes no checkpoints; set one "
        "of the two");
  }
  // The branch's files, not the source's, change here.
  const std::shared_ptr<absl::Mutex> model_lock = ModelLock(new_id);
  absl::MutexLock hold(model_lock.get());
  if (auto list = store_->List(new_id); list.ok()) {
    return absl::AlreadyExistsError(absl::StrCat(
        "new_model_id: checkpoints of a model '", new_id, "' are on disk (newest ",
        list->back().name, "); choose another id, or delete that model with its checkpoints"));
  }
  if (registry_->Get(new_id).ok()) {
    return absl::AlreadyExistsError(absl::StrCat(
        "new_model_id: a model '", new_id, "' already exists; choose another id, or delete it"));
  }
  CheckpointInfo loaded;
  std::optional<core::ModelRegistry::Reservation> reservation;
  auto model = Load(model_id, name, device, options, compute, &loaded, /*replace=*/false,
                    &reservation, new_id);
  if (!model.ok()) return model.status();
  if (absl::Status s = registry_->Add(*std::move(reservation), *model); !s.ok()) return s;
  Forget(new_id);
  // The branch's first checkpoint: without it a restart would lose the branch, and the id would
  // stay free for another model.
  auto saved = Write(new_id, **model, (*model)->ExportState());
  if (!saved.ok()) {
    (void)registry_->Remove(new_id);
    return saved.status();
  }
  if (info != nullptr) *info = loaded;
  return model;
}

void Checkpointer::RestoreAll(c10::Device device, const core::ModelOptions& options) {
  for (const std::string& id : store_->ModelIds()) {
    if (registry_->Get(id).ok()) continue;
    CheckpointInfo info;
    std::optional<core::ModelRegistry::Reservation> reservation;
    auto model =
        Load(id, "", device, options, std::nullopt, &info, /*replace=*/false, &reservation, id);
    if (!model.ok()) {
      if (model.status().code() != absl::StatusCode::kNotFound) {
        log_(absl::StrCat("cannot restore model '", id, "': ", model.status().ToString()));
      }
      continue;
    }
    if (absl::Status s = registry_->Add(*std::move(reservation), *model); !s.ok()) {
      log_(absl::StrCat("cannot restore model '", id, "': ", s.ToString()));
      continue;
    }
    Record(id, info.step);
    log_(absl::StrCat("restored model '", id, "' from ", info.path, " (step ", info.step, ")"));
  }
}

void Checkpointer::AfterUpdate(const std::string& model_id, int64_t step) {
  if (policy_.every_steps <= 0 || step % policy_.every_steps != 0) return;
  auto model = registry_->Get(model_id);
  if (!model.ok()) return;
  Pending pending{model_id, *model, (*model)->ExportState()};
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(pending));
  // Writes that fall behind cannot pile up copies without end.
  constexpr size_t kMaxQueued = 8;
  if (queue_.size() > kMaxQueued) {
    log_(absl::StrCat("automatic checkpoint of '", queue_.front().model_id, "' at step ",
                      queue_.front().snapshot.step, " dropped: writes are falling behind"));
    if (observer_) observer_("save", queue_.front().model_id, false, -1);
    queue_.pop_front();
  }
}

absl::StatusOr<int> Checkpointer::SaveChanged() {
  int saved = 0;
  absl::Status first;
  for (const auto& [id, model] : registry_->List()) {
    int64_t last = -1;
    {
      absl::MutexLock lock(&mu_);
      if (auto it = saved_.find(id); it != saved_.end()) last = it->second.step;
    }
    if (model->step() == last) continue;
    auto info = Save(id);
    if (info.ok()) {
      ++saved;
    } else {
      log_(absl::StrCat("saving '", id, "': ", info.status().ToString()));
      if (first.ok()) first = info.status();
    }
  }
  if (!first.ok()) return first;
  return saved;
}

void Checkpointer::Start() {
  if (thread_.joinable()) return;
  if (policy_.every_steps <= 0 && policy_.every_seconds <= 0) return;
  thread_ = std::thread([this] { Loop(); });
}

void Checkpointer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Checkpointer::Loop() {
  const absl::Duration period = absl::Seconds(policy_.every_seconds);
  // The time policy is checked at least this often (and never more than every 100 ms).
  const absl::Duration tick =
      policy_.every_seconds > 0 ? std::clamp(period / 4, absl::Milliseconds(100), absl::Seconds(1))
                                : absl::Seconds(1);
  for (;;) {
    std::optional<Pending> next;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](Checkpointer* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
                                 return c->stopping_ || !c->queue_.empty();
                               },
                               this),
                           tick);
      if (stopping_) return;
      if (!queue_.empty()) {
        next = std::move(queue_.front());
        queue_.pop_front();
      }
    }
    if (next.has_value()) {
      const std::shared_ptr<absl::Mutex> model_lock = ModelLock(next->model_id);
      absl::MutexLock hold(model_lock.get());
      // A model deleted (or replaced) since its snapshot was queued must not get a file again:
      // a deleted model's folder would reappear and bring it back at the next start.
      if (auto current = registry_->Get(next->model_id);
          !current.ok() || *current != next->model) {
        continue;
      }
      const absl::Time start = absl::Now();
      auto info = Write(next->model_id, *next->model, next->snapshot);
      Observe("save", next->model_id, info.ok(), start);
      if (!info.ok()) {
        log_(absl::StrCat("automatic checkpoint of '", next->model_id, "': ",
                          info.status().ToString()));
      }
      continue;
    }
    if (policy_.every_seconds <= 0) continue;
    const absl::Time now = absl::Now();
    for (const auto& [id, model] : registry_->List()) {
      bool due = false;
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
        auto it = saved_.find(id);
        due = it == saved_.end() ||
              (it->second.step != model->step() && now - it->second.when >= period);
      }
      if (!due) continue;
      auto info = Save(id);
      if (!info.ok() && info.status().code() != absl::StatusCode::kNotFound) {
        log_(absl::StrCat("automatic checkpoint of '", id, "': ", info.status().ToString()));
      }
    }
  }
}

}  // namespace tscale::checkpoint
