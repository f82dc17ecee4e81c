// The models a server holds, by id. Requests take a shared reference to a model, so deleting or
// replacing one never pulls it from under a request in flight; its memory is freed when the last
// request using it ends.
//
// Limits: at most `max_models` models, and a budget of device bytes. A model is counted by
// Model::EstimateDeviceBytes of its spec (its decoded state, effective weights and gradient
// sums), which is known before the model is built: a new model reserves its room first, is
// built, and is then added under that reservation, so concurrent requests can never together
// pass the limits. Activations of pending training passes are not counted here; each model
// bounds them itself (ModelOptions::max_pending_bytes).
#ifndef TSCALE_SERVER_CORE_REGISTRY_H_
#define TSCALE_SERVER_CORE_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/core/model.h"

namespace tscale::core {

// Model ids: 1-64 characters of [A-Za-z0-9_.-], the first not '.' (ids name folders).
// InvalidArgument naming `field` otherwise.
absl::Status ValidateModelId(absl::string_view id, absl::string_view field = "model_id");

struct RegistryLimits {
  int64_t max_models = 0;        // 0: no limit
  int64_t max_device_bytes = 0;  // 0: no budget
};

class ModelRegistry {
 public:
  ModelRegistry() = default;
  explicit ModelRegistry(RegistryLimits limits) : limits_(limits) {}

  // Room for one model under one id, from before the model is built until Add registers it.
  // Dropped without Add, it gives the room back.
  class Reservation {
   public:
    Reservation(Reservation&& other) noexcept;
    Reservation& operator=(Reservation&&) = delete;
    ~Reservation();
    int64_t bytes() const { return bytes_; }

   private:
    friend class ModelRegistry;
    Reservation(ModelRegistry* registry, std::string id, int64_t bytes, bool replace,
                bool adds_model)
        : registry_(registry), id_(std::move(id)), bytes_(bytes), replace_(replace),
          adds_model_(adds_model) {}
    ModelRegistry* registry_;  // null once used or moved from
    std::string id_;
    int64_t bytes_;
    bool replace_;
    bool adds_model_;  // false when it replaces a model, which then counts as freed
  };

  // Reserves room for a model of `bytes` device bytes (Model::EstimateDeviceBytes) under `id`.
  // AlreadyExists when the id is taken (or being taken by another reservation), unless `replace`.
  // ResourceExhausted, with the figures and the server flag, when the models held and reserved
  // would then exceed max_models or max_device_bytes; a model that `replace` replaces counts as
  // freed (unless another reservation already replaces it).
  absl::StatusOr<Reservation> Reserve(absl::string_view id, int64_t bytes, bool replace);
  // Registers `model` under its reservation's id. AlreadyExists when the id was taken meanwhile
  // and the reservation does not replace.
  absl::Status Add(Reservation reservation, std::shared_ptr<Model> model);
  // Reserve (by the model's estimate) and Add in one call, for a model built already.
  absl::Status Add(absl::string_view id, std::shared_ptr<Model> model, bool replace = false);

  // NotFound when no model has this id.
  absl::StatusOr<std::shared_ptr<Model>> Get(absl::string_view id) const;
  // AlreadyExists when the id is taken: a cheap check before building a model for it.
  absl::Status CheckFree(absl::string_view id) const;
  // NotFound when no model has this id.
  absl::Status Remove(absl::string_view id);
  // Every model, ordered by id.
  std::vector<std::pair<std::string, std::shared_ptr<Model>>> List() const;
  size_t size() const;

  const RegistryLimits& limits() const { return limits_; }
  // Estimated device bytes of the models held plus those reserved for.
  int64_t device_bytes_in_use() const;

 private:
  void Release(const Reservation& reservation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Entry {
    std::shared_ptr<Model> model;
    int64_t bytes = 0;  // its estimate, as reserved
  };
  const RegistryLimits limits_;
  mutable absl::Mutex mu_;
  absl::btree_map<std::string, Entry> models_ ABSL_GUARDED_BY(mu_);
  int64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;      // of models_
  int64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // of outstanding reservations
  int64_t reserved_models_ ABSL_GUARDED_BY(mu_) = 0;  // reservations that add a model
  absl::flat_hash_map<std::string, int> reserving_ ABSL_GUARDED_BY(mu_);  // reservations per id
};

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_REGISTRY_H_
