// A model: an ordered list of layers built from a ModelSpec, with its training passes.
//
// Training protocol (DESIGN.md §1): Forward(train) keeps what Backward needs and returns a pass id
// that belongs to the current step; Backward of a pass (once) adds its weight gradients to the
// step's float32 sums, in arrival order; UpdateCorrelation(expected_step) applies the sign of the
// sums to every ternary linear layer, advances the step and releases the step's passes. Updates are
// exactly-once: a retry of the update just applied returns its response again, marked replayed.
// A failing call changes nothing. All methods are thread-safe; calls on one model are serialised.
#ifndef TSCALE_SERVER_CORE_MODEL_H_
#define TSCALE_SERVER_CORE_MODEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/core/layers.h"
#include "server/core/spec.h"

namespace tscale::core {

struct ModelOptions {
  // Training passes held for a Backward at once; a Forward beyond it is RESOURCE_EXHAUSTED.
  int64_t max_pending_passes = 1024;
  // Bytes of activations those passes may hold (estimated as their inputs and layer outputs).
  int64_t max_pending_bytes = int64_t{4} << 30;
};

struct ForwardResult {
  at::Tensor output;    // float32 [batch, out_features], on the model's device
  std::string pass_id;  // empty unless train
  int64_t step = 0;     // the step the pass belongs to
};

struct LayerUpdate {
  std::string layer;          // full name
  int64_t score_sum = 0;      // sum over groups of the score subtracted from corr_accum
  double mean_abs_drift = 0;  // mean over groups of |log2 S - E| after the update
};

struct UpdateResult {
  int64_t step = 0;  // the model's step after the update
  bool replayed = false;
  std::vector<LayerUpdate> layers;  // one per ternary linear layer, in order
};

// The persistent state at one step, on the CPU.
struct StateSnapshot {
  StateDict tensors;
  int64_t step = 0;
};

class Node;

class Model {
 public:
  // A new model initialised as the reference does after torch.manual_seed(seed): layers draw
  // their random weights in spec order from one CPU generator, so the state does not depend on the
  // device. InvalidArgument for an invalid spec; ResourceExhausted when memory cannot be had.
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelSpec& spec, uint64_t seed,
                                                       c10::Device device,
                                                       ModelOptions options = {});
  // A model holding `state` (reference state_dict keys under the layers' full names; unknown keys
  // are ignored). Its step is `step` when given, else the ternary linear layers' step_counter;
  // every linear layer's step_counter must agree with it.
  static absl::StatusOr<std::unique_ptr<Model>> Import(const ModelSpec& spec,
                                                       const StateDict& state,
                                                       std::optional<int64_t> step,
                                                       c10::Device device,
                                                       ModelOptions options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // input: float32 [batch >= 1, in_features], any device. With train, NaN/Inf is refused and the
  // pass is kept for Backward.
  absl::StatusOr<ForwardResult> Forward(const at::Tensor& input, bool train);
  // grad_output: float32 of the pass's output shape, finite. grad_input is set when asked.
  // NotFound for an unknown pass; FailedPrecondition for a pass already used or released.
  absl::StatusOr<at::Tensor> Backward(absl::string_view pass_id, const at::Tensor& grad_output,
                                      bool want_grad_input);
  // Applies when expected_step equals the step; FailedPrecondition otherwise (or when no Backward
  // has run since the last update), except for the replay of the update just applied.
  absl::StatusOr<UpdateResult> UpdateCorrelation(int64_t expected_step);

  StateSnapshot ExportState() const;

  const ModelSpec& spec() const { return spec_; }  // defaults made explicit
  const SpecSummary& summary() const { return summary_; }
  c10::Device device() const { return device_; }
  int64_t persistent_bytes() const { return persistent_bytes_; }
  int64_t step() const;
  int64_t pending_passes() const;
  int64_t pending_bytes() const;

 private:
  struct Pass {
    int64_t step = 0;
    bool used = false;
    int64_t bytes = 0;
    at::Tensor input;                 // leaf that requires grad
    at::Tensor output;                // with its autograd graph
    std::vector<at::Tensor> weights;  // the w_eff leaves of the linear layers
  };
  struct Linear {
    std::string name;
    TernaryLinear* layer;
    at::Tensor grad_sum;  // float32 sum of this step's weight gradients
  };

  Model(ModelSpec spec, SpecSummary summary, c10::Device device, ModelOptions options);
  absl::Status Build(const StateDict* state, at::Generator* gen);
  at::Tensor Run(const at::Tensor& x, int64_t* activation_bytes);
  std::string NewPassId(int64_t step);
  absl::Status UnknownPass(absl::string_view pass_id) const;

  const ModelSpec spec_;
  const SpecSummary summary_;
  const c10::Device device_;
  const ModelOptions options_;
  const uint64_t nonce_;  // tells this model's pass ids from any other's
  std::vector<std::unique_ptr<Node>> nodes_;
  int64_t persistent_bytes_ = 0;

  mutable absl::Mutex mu_;
  std::vector<Linear> linears_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_pass_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t backwards_ ABSL_GUARDED_BY(mu_) = 0;  // Backward calls since the last update
  int64_t pending_passes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, Pass> passes_ ABSL_GUARDED_BY(mu_);
  std::optional<UpdateResult> last_update_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_MODEL_H_
