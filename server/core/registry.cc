#include "server/core/registry.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace tscale::core {

absl::Status ValidateModelId(absl::string_view id, absl::string_view field) {
  // Ids name folders of checkpoints: none may start with '.' ("." and ".." above all).
  bool valid = !id.empty() && id.size() <= 64 && id[0] != '.';
  for (char c : id) {
    valid = valid && (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' ||
                      c == '-');
  }
  if (valid) return absl::OkStatus();
  const std::string shown = id.size() > 80 ? absl::StrCat(id.substr(0, 80), "...") : std::string(id);
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": expected 1-64 characters of [A-Za-z0-9_.-], the first not '.', got '", absl::CEscape(shown), "' (",
      id.size(), " characters)"));
}

ModelRegistry::Reservation::Reservation(Reservation&& other) noexcept
    : registry_(std::exchange(other.registry_, nullptr)),
      id_(std::move(other.id_)),
      bytes_(other.bytes_),
      replace_(other.replace_),
      adds_model_(other.adds_model_) {}

ModelRegistry::Reservation::~Reservation() {
  if (registry_ == nullptr) return;
  absl::MutexLock lock(&registry_->mu_);
  registry_->Release(*this);
}

void ModelRegistry::Release(const Reservation& reservation) {
  reserved_bytes_ -= reservation.bytes_;
  if (reservation.adds_model_) --reserved_models_;
  auto it = reserving_.find(reservation.id_);
  if (--it->second == 0) reserving_.erase(it);
}

absl::StatusOr<ModelRegistry::Reservation> ModelRegistry::Reserve(absl::string_view id,
                                                                  int64_t bytes, bool replace) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(id);
  const bool taken = it != models_.end();
  const bool being_taken = reserving_.contains(id);
  if (!replace && (taken || being_taken)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "model_id: a model '", id, "' already exists", taken ? "" : " (it is being created)"));
  }
  // Only one of several concurrent replacements may count the old model as freed.
  const bool replaces = taken && !being_taken;
  const int64_t freed = replaces ? it->second.bytes : 0;
  const int64_t models = static_cast<int64_t>(models_.size()) + reserved_models_;
  if (limits_.max_models > 0 && !replaces && models + 1 > limits_.max_models) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "models: the server holds ", models_.size(), " models",
        reserved_models_ > 0 ? absl::StrCat(" and is creating ", reserved_models_) : "",
        ", the limit is ", limits_.max_models, " (--max-models); delete a model first"));
  }
  const int64_t in_use = held_bytes_ + reserved_bytes_;
  if (limits_.max_device_bytes > 0 && in_use - freed + bytes > limits_.max_device_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "device memory: model '", id, "' needs ", bytes, " bytes (estimated), the models hold ",
        in_use, " bytes",
        replaces ? absl::StrCat(" (", freed, " of them the model it replaces)") : "",
        ", the budget is ", limits_.max_device_bytes,
        " bytes (--max-device-bytes); delete models or raise the budget"));
  }
  reserved_bytes_ += bytes;
  if (!replaces) ++reserved_models_;
  ++reserving_[id];
  return Reservation(this, std::string(id), bytes, replace, !replaces);
}

absl::Status ModelRegistry::Add(Reservation reservation, std::shared_ptr<Model> model) {
  std::shared_ptr<Model> old;  // released after the lock
  absl::MutexLock lock(&mu_);
  Release(reservation);
  reservation.registry_ = nullptr;
  auto [it, inserted] = models_.try_emplace(reservation.id_, Entry{model, reservation.bytes_});
  if (!inserted) {
    if (!reservation.replace_) {
      return absl::AlreadyExistsError(
          absl::StrCat("model_id: a model '", reservation.id_, "' already exists"));
    }
    held_bytes_ -= it->second.bytes;
    old = std::exchange(it->second.model, std::move(model));
    it->second.bytes = reservation.bytes_;
  }
  held_bytes_ += reservation.bytes_;
  return absl::OkStatus();
}

absl::Status ModelRegistry::Add(absl::string_view id, std::shared_ptr<Model> model, bool replace) {
  auto bytes = Model::EstimateDeviceBytes(model->spec());
  if (!bytes.ok()) return bytes.status();
  auto reservation = Reserve(id, *bytes, replace);
  if (!reservation.ok()) return reservation.status();
  return Add(*std::move(reservation), std::move(model));
}

absl::StatusOr<std::shared_ptr<Model>> ModelRegistry::Get(absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(id);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id: no model '", id, "'"));
  }
  return it->second.model;
}

absl::Status ModelRegistry::CheckFree(absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  if (models_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("model_id: a model '", id, "' already exists"));
  }
  return absl::OkStatus();
}

absl::Status ModelRegistry::Remove(absl::string_view id) {
  std::shared_ptr<Model> old;
  absl::MutexLock lock(&mu_);
  auto it = models_.find(id);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id: no model '", id, "'"));
  }
  old = std::move(it->second.model);
  held_bytes_ -= it->second.bytes;
  models_.erase(it);
  return absl::OkStatus();
}

std::vector<std::pair<std::string, std::shared_ptr<Model>>> ModelRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, std::shared_ptr<Model>>> out;
  out.reserve(models_.size());
  for (const auto& [id, entry] : models_) out.emplace_back(id, entry.model);
  return out;
}

size_t ModelRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return models_.size();
}

int64_t ModelRegistry::device_bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return held_bytes_ + reserved_bytes_;
}

}  // namespace tscale::core
