// A model: an ordered list of layers built from a ModelSpec, with its training passes.
//
// Training protocol (docs/arithmetic.md, section 8): Forward(train) keeps what Backward needs and
// returns a pass id that belongs to the current step; Backward of a pass (once) adds its weight
// gradients to the step's float32 sums, in arrival order; UpdateCorrelation(expected_step) applies
// the sign of the sums to every ternary linear layer, advances the step and releases the step's
// passes. Updates are exactly-once: a retry of the update just applied returns its response again,
// marked replayed. A failing call changes nothing. All methods are thread-safe; calls on one model
// are serialised.
#ifndef TSCALE_SERVER_CORE_MODEL_H_
#define TSCALE_SERVER_CORE_MODEL_H_

#include <ATen/ATen.h>
#include <c10/core/Stream.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/core/combiner.h"
#include "server/core/layers.h"
#include "server/core/scale_stats.h"
#include "server/core/spec.h"

namespace tscale::core {

absl::string_view ComputeName(ComputeType compute);  // "COMPUTE_FP32", ...

struct ModelOptions {
  ComputeType compute = ComputeType::kFp32;
  // Training passes held for a Backward at once; a Forward beyond it is RESOURCE_EXHAUSTED.
  int64_t max_pending_passes = 1024;
  // Bytes of activations those passes may hold (estimated as their inputs and layer outputs).
  int64_t max_pending_bytes = int64_t{4} << 30;
  // A training pass not used by a Backward within this time is released (its activations freed);
  // its Backward is then FailedPrecondition. Zero: passes wait until the step's update.
  absl::Duration pending_pass_ttl = absl::Seconds(600);
  // The time passes are judged by; empty: absl::Now. Tests set a clock of their own.
  std::function<absl::Time()> clock;
  // On a CUDA device (built with the CUDA kernels): a TrainStep of a shape (batch, loss) seen
  // before is captured once as a CUDA graph and then replayed, one launch for the step's few
  // dozen operations; the same kernels on the same values, so the same bits. Off: every step is
  // launched operation by operation. No effect on the CPU.
  bool cuda_graphs = true;
};

// Asked right before an update commits (UpdateCorrelation, TrainStep): a non-OK status (e.g. the
// request was cancelled or its deadline passed) abandons the update with that status, changing
// nothing. After the check the update applies wholly.
using Interrupt = std::function<absl::Status()>;

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

// TrainStep's losses (docs/arithmetic.md, section 8), as PyTorch defines them by default.
enum class Loss {
  kMse = 1,           // mean over all elements of (y - target)^2; target float32 [batch, out]
  kCrossEntropy = 2,  // mean over the batch of -log softmax(y)[target]; target int64 [batch]
};

// What a model keeps of its last update to answer a retry of it (exactly once): the update's
// result and, when a TrainStep made it, the loss and the fingerprint of the request. A rank of a
// replica group keeps every rank's fingerprint, so that a member brought forward from a peer
// (Model::AdoptLastUpdate) can replay a retry of its own part.
struct LastUpdateRecord {
  UpdateResult update;
  bool train_step = false;
  double loss = 0;
  std::vector<uint64_t> fingerprints;  // one, or the group's in rank order (train_step only)
};

struct TrainStepResult {
  double loss = 0;
  at::Tensor output;  // float32 [batch, out_features] on the model's device; undefined on replay
  UpdateResult update;
};

struct ModelScaleStats {
  int64_t step = 0;
  std::vector<LayerScaleStats> layers;  // the ternary linear and RMSNorm layers, in spec order
};

// The persistent state at one step, on the CPU.
struct StateSnapshot {
  StateDict tensors;
  int64_t step = 0;
};

class Node;

}  // namespace tscale::core

namespace tscale::cuda {
class StepGraph;
}  // namespace tscale::cuda

namespace tscale::core {

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
  // Releases pending training passes: all of them when `pass_ids` is empty, else those (each
  // must be pending: NotFound or FailedPrecondition naming the first that is not, and nothing is
  // released). Returns how many were released.
  absl::StatusOr<int64_t> ReleasePasses(const std::vector<std::string>& pass_ids);
  // Applies when expected_step equals the step; FailedPrecondition otherwise (or when no Backward
  // has run since the last update), except for the replay of the update just applied.
  // `interrupt`, when given, is asked before the update commits (see Interrupt).
  // With `combiner` (a rank of a replica group), the update is the sign of the group's summed
  // gradients; a rank with no Backward since the step began brings zeros (the group refuses an
  // update that no rank has a Backward for).
  absl::StatusOr<UpdateResult> UpdateCorrelation(int64_t expected_step,
                                                 const Interrupt& interrupt = nullptr,
                                                 UpdateCombiner* combiner = nullptr);
  // Forward, loss, backward and update in one call, holding the model throughout. The update
  // takes the sign of this step's weight gradients summed with those of any Backward already run
  // at this step. Exactly once like UpdateCorrelation: a retry of the TrainStep just applied (same
  // expected_step, input, target and loss) returns its result again (replayed, without output);
  // another request with that stale expected_step is FailedPrecondition.
  // With `group` (a rank of a replica group), the loss is this rank's share of the group's mean
  // over group->group_batch rows, the update is the group's, and the loss returned is the
  // group's. `input` and `target` are read during the call only (no reference to them outlives
  // it), so they may view memory the caller owns, such as a request's bytes.
  absl::StatusOr<TrainStepResult> TrainStep(const at::Tensor& input, const at::Tensor& target,
                                            Loss loss, int64_t expected_step,
                                            const Interrupt& interrupt = nullptr,
                                            const GroupStep* group = nullptr);
  // The checks TrainStep makes of its arguments before it takes the model: InvalidArgument
  // naming the field, or OK.
  absl::Status CheckTrainStep(const at::Tensor& input, const at::Tensor& target, Loss loss) const;

  // Drift statistics of every stateful layer. The model is held only to copy corr_accum; the
  // statistics are computed after, so training is not held up.
  ModelScaleStats ScaleStats(bool per_group) const;

  StateSnapshot ExportState() const;
  // The record of the last update, when the model made one since it was created, imported or
  // restored (a replay needs it).
  std::optional<LastUpdateRecord> LastUpdate() const;
  // Takes a peer's record of the update that brought its replica to this model's step, so that a
  // retry of that update is replayed here as there; `rank` picks this replica's fingerprint.
  // InvalidArgument (nothing changed) when the record is of another step or has no fingerprint
  // at `rank`.
  absl::Status AdoptLastUpdate(const LastUpdateRecord& record, size_t rank);

  const ModelSpec& spec() const { return spec_; }  // defaults made explicit
  const SpecSummary& summary() const { return summary_; }
  c10::Device device() const { return device_; }
  ComputeType compute() const { return options_.compute; }
  int64_t persistent_bytes() const { return persistent_bytes_; }
  int64_t step() const;
  int64_t pending_passes() const;
  // Backward calls since the step began.
  int64_t backwards() const;
  int64_t pending_bytes() const;
  // Bytes the model holds on its device now: decoded state, caches, gradient sums, pending passes.
  int64_t device_bytes() const;
  // TrainSteps served by replaying a captured CUDA graph (ModelOptions::cuda_graphs), and the
  // shapes captured.
  int64_t graphed_steps() const;
  int64_t graphs() const;

  // The device bytes a model of `spec` holds while it trains, pending passes aside: the decoded
  // trits, E, corr_accum and bias, the step's effective weights and the gradient sums of its
  // linear layers. Computable before the model is built (for a memory budget); never less than
  // device_bytes() of that model without pending passes: equal for FP32 without the CUDA
  // kernels, more where those hold T packed or BF16 holds w_eff in two bytes. InvalidArgument
  // for an invalid spec.
  static absl::StatusOr<int64_t> EstimateDeviceBytes(const ModelSpec& spec);

 private:
  struct Pass {
    int64_t step = 0;
    bool used = false;
    bool expired = false;   // released unused after options_.pending_pass_ttl, or by ReleasePasses
    bool released = false;  // by ReleasePasses
    absl::Time created;
    int64_t bytes = 0;
    at::Tensor input;                 // leaf that requires grad
    at::Tensor output;                // with its autograd graph
    std::vector<at::Tensor> weights;  // the w_eff leaves of the linear layers
  };
  // What a linear layer's node keeps of a forward while `on`: its input and its pre-bias output,
  // for a TrainStep that takes the weight gradient of one sample in factored form.
  struct Tap {
    bool on = false;
    at::Tensor input, pre_bias;
  };
  struct Linear {
    std::string name;
    TernaryLinear* layer;
    at::Tensor grad_sum;  // float32 sum of this step's weight gradients
    std::shared_ptr<Tap> tap;
  };
  struct Stateful {
    std::string name;
    const TernaryState* state;
    bool frozen;  // RMSNorm: never updated
  };

  Model(ModelSpec spec, SpecSummary summary, c10::Device device, ModelOptions options);
  absl::Status Build(const StateDict* state, at::Generator* gen);
  at::Tensor Run(const at::Tensor& x, int64_t* activation_bytes);
  std::string NewPassId(int64_t step);
  absl::Status CheckInput(const at::Tensor& input) const;
  // The update from this step's gradient sums plus `extra` (one per linear layer, or empty);
  // commits only when everything has been computed. With `sample_inputs` (one per linear layer),
  // `extra` holds instead the gradients at the layers' pre-bias outputs of a pass whose inputs
  // these are (one sample, or a batch on the packed route: TernaryLinear::Factored), and no
  // gradient sums are pending: the scores then come from TernaryLinear::FactorScores, or from
  // the whole gradient where a sample's factored scores cannot be exact.
  // A TrainStep's loss (a 0-dim device tensor) travels to the host with the update's figures, in
  // the step's one synchronisation; a loss that is not finite stops the update before it commits.
  struct StepLoss {
    at::Tensor value;
    Loss kind;
    double host = 0;
    uint64_t fingerprint = 0;                  // of the TrainStep's request
    std::vector<uint64_t> group_fingerprints;  // with a combiner: every rank's
  };
  // With `combiner`, the scores are the group's (see UpdateCombiner), and `loss` holds this
  // rank's share of the group's loss; the group's comes back in loss->host.
  absl::StatusOr<UpdateResult> ApplyUpdate(const std::vector<at::Tensor>& extra,
                                           StepLoss* loss = nullptr,
                                           const std::vector<at::Tensor>* sample_inputs = nullptr,
                                           UpdateCombiner* combiner = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The group's scores of this step's gradient sums plus `extra`, and the group's loss.
  absl::StatusOr<std::vector<at::Tensor>> CombinedScores(const std::vector<at::Tensor>& extra,
                                                         StepLoss* loss, UpdateCombiner* combiner)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a TrainStep of `batch` rows takes each linear layer's weight gradient in its two
  // factors: no group, no gradient sums pending, and every layer Factored(batch).
  bool FactoredStep(int64_t batch, const GroupStep* group) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The forward of a TrainStep on the device tensors x and t, its loss (into step_loss) and the
  // gradients ApplyUpdate takes (with `factored`, at the linear layers' pre-bias outputs, their
  // inputs in sample_inputs).
  void StepGradients(const at::Tensor& x, const at::Tensor& t, Loss loss, const GroupStep* group,
                     bool factored, at::Tensor* output, StepLoss* step_loss,
                     std::vector<at::Tensor>* grads, std::vector<at::Tensor>* sample_inputs)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The scores of an update without a combiner (ApplyUpdate's `extra` and `sample_inputs`);
  // exact[i] is set where layer i's scores came from a sample's factors (TernaryLinear::
  // SampleScores::exact).
  std::vector<at::Tensor> StepScores(const std::vector<at::Tensor>& extra,
                                     const std::vector<at::Tensor>* sample_inputs,
                                     std::vector<at::Tensor>* exact)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The update's figures on the model's device, int64: each layer's two (TernaryState::Updated,
  // whose corr_accum after the update goes to after[i]), then on a device the flags of `exact`
  // that are defined and the bits of the float64 `loss` when given (on the CPU those are read
  // where they are). Undefined when there is nothing to count.
  at::Tensor UpdateFigures(const std::vector<at::Tensor>& scores,
                           const std::vector<at::Tensor>& exact, const at::Tensor* loss,
                           std::vector<at::Tensor>* after) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Commits an update whose figures `host` (UpdateFigures on the host) and corr_accums `after`
  // are computed: unless `loss` (which then gets the loss's value) is not finite, which changes
  // nothing.
  absl::StatusOr<UpdateResult> CommitUpdate(const at::Tensor& host,
                                            const std::vector<at::Tensor>& after, StepLoss* loss)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A TrainStep of one shape captured as a CUDA graph (ModelOptions::cuda_graphs).
  struct Graphed {
    int64_t seen = 0;      // steps of the shape so far
    bool failed = false;   // its capture failed: the shape runs operation by operation
    std::shared_ptr<cuda::StepGraph> graph;
    // What the graph reads, on the device: the step's input and target and each linear layer's
    // StepReciprocal, in one block that each step's one copy from the host fills.
    at::Tensor inputs;
    // What it leaves there: the model's output, UpdateFigures and the corr_accums after.
    at::Tensor output, figures;
    std::vector<at::Tensor> after;
    int64_t flags = 0;  // exactness flags among the figures
  };
  // Whether a TrainStep can be served by a graph: CUDA, graphs on, no group, host tensors, no
  // gradient sums pending, linear layers past step 0 (the scale's formula at step 0 differs).
  bool GraphServes(const at::Tensor& input, const at::Tensor& target,
                   const GroupStep* group) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The TrainStep by its shape's graph, captured on the shape's second step; nullopt where it
  // must run operation by operation instead (a shape's first step, a capture that failed, too
  // many shapes, a sample's factored scores that could be inexact). Nothing commits unless the
  // result is a value.
  absl::StatusOr<std::optional<TrainStepResult>> GraphedTrainStep(
      const at::Tensor& input, const at::Tensor& target, Loss loss, uint64_t fingerprint,
      const Interrupt& interrupt) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UnknownPass(absl::string_view pass_id) const;
  // Releases the passes older than the TTL that no Backward used. Also from const accessors, so
  // that the figures they report (and metrics read) never count an expired pass.
  void ExpirePasses() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ModelSpec spec_;
  const SpecSummary summary_;
  const c10::Device device_;
  // On a CUDA device, the stream this model's work runs on (one of the device's pool, so that
  // models run in parallel); none on the CPU. See StreamScope in model.cc.
  const std::optional<c10::Stream> stream_;
  const ModelOptions options_;
  const uint64_t nonce_;  // tells this model's pass ids from any other's
  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<Stateful> stateful_;  // in spec order
  std::vector<const TernaryRMSNorm*> norms_;
  int64_t persistent_bytes_ = 0;

  mutable absl::Mutex mu_;
  std::vector<Linear> linears_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_pass_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t backwards_ ABSL_GUARDED_BY(mu_) = 0;  // Backward calls since the last update
  // Mutable: passes expire with time, also while a const accessor looks (ExpirePasses).
  mutable int64_t pending_passes_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  mutable absl::flat_hash_map<std::string, Pass> passes_ ABSL_GUARDED_BY(mu_);
  // Ids of the passes in creation order (with their creation time), for ExpirePasses; ids of
  // passes used or released meanwhile are dropped when they reach the front.
  mutable std::deque<std::pair<absl::Time, std::string>> pass_order_ ABSL_GUARDED_BY(mu_);
  std::optional<UpdateResult> last_update_ ABSL_GUARDED_BY(mu_);
  // When a TrainStep made the last update: its loss, and a fingerprint of its request (input,
  // target, loss), so that only a retry of that same request is replayed.
  struct LastTrainStep {
    double loss = 0;
    uint64_t fingerprint = 0;
    std::vector<uint64_t> fingerprints;  // the group's, in rank order; just this one alone
  };
  std::optional<LastTrainStep> last_train_ ABSL_GUARDED_BY(mu_);
  // By (batch, loss); at most kMaxGraphs shapes (model.cc).
  std::map<std::pair<int64_t, Loss>, Graphed> graphs_ ABSL_GUARDED_BY(mu_);
  int64_t graphed_steps_ ABSL_GUARDED_BY(mu_) = 0;
};

// Tensors on `device`: on a CUDA device, host tensors go in one asynchronous copy on the current
// stream (their bytes gathered into one block of page-locked memory, then views of the block on
// the device); otherwise each as Tensor::to does it.
std::vector<at::Tensor> ToDevice(const std::vector<at::Tensor>& tensors, c10::Device device);

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_MODEL_H_
