// The models a server holds, by id. Requests take a shared reference to a model, so deleting or
// replacing one never pulls it from under a request in flight; its memory is freed when the last
// request using it ends.
#ifndef TSCALE_SERVER_CORE_REGISTRY_H_
#define TSCALE_SERVER_CORE_REGISTRY_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/core/model.h"

namespace tscale::core {

// Model ids: 1-64 characters of [A-Za-z0-9_.-], the first not '.' (ids name folders).
// InvalidArgument naming `field` otherwise.
absl::Status ValidateModelId(absl::string_view id, absl::string_view field = "model_id");

class ModelRegistry {
 public:
  // NotFound when no model has this id.
  absl::StatusOr<std::shared_ptr<Model>> Get(absl::string_view id) const;
  // AlreadyExists when the id is taken, unless `replace`.
  absl::Status Add(absl::string_view id, std::shared_ptr<Model> model, bool replace = false);
  // AlreadyExists when the id is taken: a cheap check before building a model for it.
  absl::Status CheckFree(absl::string_view id) const;
  // NotFound when no model has this id.
  absl::Status Remove(absl::string_view id);
  // Every model, ordered by id.
  std::vector<std::pair<std::string, std::shared_ptr<Model>>> List() const;
  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  absl::btree_map<std::string, std::shared_ptr<Model>> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_REGISTRY_H_
