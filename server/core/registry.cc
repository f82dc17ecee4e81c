#include "server/core/registry.h"

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

absl::StatusOr<std::shared_ptr<Model>> ModelRegistry::Get(absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(id);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id: no model '", id, "'"));
  }
  return it->second;
}

absl::Status ModelRegistry::CheckFree(absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  if (models_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("model_id: a model '", id, "' already exists"));
  }
  return absl::OkStatus();
}

absl::Status ModelRegistry::Add(absl::string_view id, std::shared_ptr<Model> model, bool replace) {
  std::shared_ptr<Model> old;  // released after the lock
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = models_.try_emplace(std::string(id), model);
  if (!inserted) {
    if (!replace) {
      return absl::AlreadyExistsError(
          absl::StrCat("model_id: a model '", id, "' already exists"));
    }
    old = std::exchange(it->second, std::move(model));
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
  old = std::move(it->second);
  models_.erase(it);
  return absl::OkStatus();
}

std::vector<std::pair<std::string, std::shared_ptr<Model>>> ModelRegistry::List() const {
  absl::MutexLock lock(&mu_);
  return {models_.begin(), models_.end()};
}

size_t ModelRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return models_.size();
}

}  // namespace tscale::core
