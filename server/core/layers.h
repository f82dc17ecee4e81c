// The ternary layers: persistent integer state, initialisation, forward and correlation update,
// with the reference's arithmetic (docs/arithmetic.md, section 5): S_g = 2^(E_g + 4 corr_accum_g / (step gs)),
// w_eff = S (expanded over each group's columns) * T.
#ifndef TSCALE_SERVER_CORE_LAYERS_H_
#define TSCALE_SERVER_CORE_LAYERS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/spec.h"
#if TSCALE_WITH_CUDA
#include "server/cuda/kernels.h"
#endif

namespace tscale::core {

// Named persistent tensors (CPU), keyed by the reference's state_dict keys under the layer's full
// name, e.g. "fc1.corr_accum".
using StateDict = std::map<std::string, at::Tensor>;

// How a model computes its ternary linear layers (docs/arithmetic.md, section 8, compute types). FP32 is the reference's
// arithmetic, exact; TF32 (CUDA only) runs the GEMMs on tensor cores with float32 storage; BF16
// keeps w_eff and the GEMM operands in bfloat16 with float32 accumulation.
enum class ComputeType { kFp32 = 1, kTf32 = 2, kBf16 = 3 };

// E, the integer part of log2 S, as initialisation sets it (linear: [-8, 0]; RMSNorm: -4).
inline constexpr int kMinE = -8;
inline constexpr int kMaxE = 0;

// The largest batch a TrainStep takes on the packed route (TernaryLinear::Packed) in each mode,
// unless a layer is told otherwise (SetPackedBatchLimit). The CUDA kernels take batches up to 16;
// measured on H100s at 4096x4096 (bench/README.md), the kernels that decode a lane's trits from
// whole packed bytes beat the GEMMs with w_eff up to batch 4 in both modes (BF16 0.12-0.16 ms a
// step against 0.21, TF32 0.14-0.19 against 0.20), at an eighth of the peak memory or less; at
// batch 8 the GEMMs won (0.31-0.42 ms against 0.19-0.20).
inline constexpr int64_t kMaxPackedBatchBf16 = 4;
inline constexpr int64_t kMaxPackedBatchTf32 = 4;
// That default for a mode: 0 for FP32, which keeps cuBLAS's bits.
constexpr int64_t DefaultPackedBatchLimit(ComputeType compute) {
  return compute == ComputeType::kBf16   ? kMaxPackedBatchBf16
         : compute == ComputeType::kTf32 ? kMaxPackedBatchTf32
                                         : 0;
}

// The largest step a model counts to: 2^47 steps (at a million steps a second, four years), so
// that step_counter * group_size, which the scale divides by, stays far inside int64. States
// beyond it are refused, and an update at it is refused.
inline constexpr int64_t kMaxStep = int64_t{1} << 47;

// The state both ternary layers share: T (rows x cols trits), E and corr_accum per group,
// step_counter. Groups cover `group_size` consecutive columns of a row.
class TernaryState {
 public:
  // T_init = sign(w) * (|w| > threshold) of a float tensor w [rows, cols]; E filled with e_init.
  static absl::StatusOr<TernaryState> FromWeights(const at::Tensor& w, double threshold,
                                                  int64_t group_size, int8_t e_init,
                                                  at::Device device);
  // Reads and validates `<name>.T_packed`, `_T_shape`, `_T_pad`, `E`, `corr_accum`,
  // `step_counter` (dtypes, shapes, trit bytes, and values the update rule can reach:
  // |corr_accum| <= step_counter * group_size, E within [kMinE, kMaxE]). InvalidArgument names
  // the key.
  static absl::StatusOr<TernaryState> Import(const StateDict& state, const std::string& name,
                                             int64_t rows, int64_t cols, int64_t group_size,
                                             at::Device device);
  void Export(const std::string& name, StateDict* out) const;

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t group_size() const { return group_size_; }
  int64_t groups_per_row() const { return (cols_ + group_size_ - 1) / group_size_; }
  int64_t groups() const { return rows_ * groups_per_row(); }
  int64_t step_counter() const { return step_counter_; }
  const at::Tensor& corr_accum() const { return corr_accum_; }
  const at::Tensor& e() const { return e_; }
  // Bytes of the persistent tensors, as exported.
  int64_t persistent_bytes() const;
  // Bytes held on the device: trits (packed on CUDA, decoded elsewhere), E, corr_accum.
  int64_t device_bytes() const;

  // log2 S per group, float32, computed in the reference's order: corr_accum.float() /
  // max(step*gs, 1), * 4.0, + E.float() (E alone at step 0).
  at::Tensor Log2Scale() const;
  // S = exp2(Log2Scale()).
  at::Tensor Scale() const { return at::exp2(Log2Scale()); }
  // S * T as `dtype` (float32 or bfloat16) [rows, cols]. On CUDA one fused kernel reads the
  // packed trits; on the CPU one pass after S; elsewhere the reference's tensor operations. The
  // same bits every way: a trit is -1, 0 or 1, so each product is exact.
  at::Tensor EffectiveWeight(at::ScalarType dtype = at::kFloat) const;
  // Per-group score of a weight gradient (float32 or bfloat16 [rows, cols]): sum over the group's
  // columns of sign(grad) * T, int64 [groups]. On CUDA one fused kernel, without a sign tensor;
  // on the CPU one pass.
  at::Tensor Scores(const at::Tensor& grad) const;
  // Scores(grad) of a gradient whose entry [r, c] has the sign sign(g_r) sign(x_c) (g float32
  // [rows], x float32 [cols]), without forming it: on the CPU one pass over T; on CUDA the scores
  // kernel reads x as a stride-0 matrix and sign(g) multiplies its rows' scores; elsewhere
  // sign(x) multiplies T's rows, and sign(g) the sums.
  at::Tensor ScoresOfSignProduct(const at::Tensor& g, const at::Tensor& x) const;
  // The scores of rows [first_row, first_row + n) of a gradient, from those rows alone
  // (float32 [n, cols]): int64 [n * groups_per_row()], the part of Scores(grad) for those rows.
  at::Tensor ScoresOfRows(const at::Tensor& grad_rows, int64_t first_row) const;
  // The corr_accum an update by `scores` gives (corr_accum - scores, int64 [groups]), without
  // taking it; adds its two figures into `figures` (int64 [2] on the state's device, contiguous:
  // a slice of a larger tensor serves): the sum of the scores and the sum of |corr_accum -
  // scores|. On the CPU one pass, where the ATen expressions take five operators; on a device
  // those expressions.
  at::Tensor Updated(const at::Tensor& scores, at::Tensor figures) const;
  // Takes `after` (from Updated) as corr_accum; step_counter += 1. On CUDA corr_accum keeps its
  // memory (`after` is copied into it): a captured step graph reads it where it was captured.
  void Commit(at::Tensor after);
  // On CUDA: whether the kernels read the step's StepReciprocal from `at` (a float on the device)
  // instead of taking it from step_counter when launched (nullptr: from step_counter), for the
  // capture of a step graph, whose caller writes the value there before each replay.
  void ReadStepAt(const float* at) { inv_denom_at_ = at; }
  // Whether the CUDA kernels' packed route (products and scores straight from the packed trits)
  // can serve a batch: CUDA, batches up to the kernels' 16, group sizes that are multiples of 32.
  bool PackedRouteServes(int64_t batch) const;
#if TSCALE_WITH_CUDA
  // The state as the CUDA kernels read it; only when the kernels serve it (packed on the device).
  cuda::TernaryView View() const;
#endif

 private:
  int64_t rows_ = 0, cols_ = 0, group_size_ = 0;
  // Per-group sums of signed trits int8 [n, cols] (n rows), int64 [n * groups_per_row()].
  at::Tensor GroupSums(at::Tensor signed_t) const;
  // On the CPU, GroupSums(sign(grad) * T's rows [first_row, first_row + n)) of a float32 or
  // bfloat16 grad [n, cols] in one pass, where ATen's expressions make three [n, cols] tensors;
  // CpuScoresTake says whether it takes `grad` (CPU, one of those dtypes, T decoded on the CPU).
  bool CpuScoresTake(const at::Tensor& grad) const;
  at::Tensor CpuScores(const at::Tensor& grad, int64_t first_row) const;
  // Puts T on `device`: packed for the CUDA kernels, else decoded.
  void Place(const at::Tensor& trits, at::Device device);

  // Whether the CUDA kernels serve this state: then T lives on the device only packed (0.2 bytes
  // per weight) and is decoded inside the kernels; otherwise it is decoded once to int8.
  bool fused() const { return packed_device_.defined(); }

  at::Tensor packed_;         // uint8 [PackedBytes(rows*cols)], CPU: the persistent form of T
  at::Tensor packed_device_;  // the same bytes on the CUDA device, when fused()
  at::Tensor trits_;          // int8 [rows, cols] on the device, unless fused()
  at::Tensor e_;           // int8 [groups] on the device
  at::Tensor corr_accum_;  // int64 [groups] on the device
  int64_t step_counter_ = 0;
  const float* inv_denom_at_ = nullptr;  // ReadStepAt
};

// Ternary linear layer: y = x @ w_eff^T (+ bias as float), in the layer's compute type.
class TernaryLinear {
 public:
  // The reference's initialisation: w = randn(out, in) * std (0.1, or 0.02 with bias), drawn from
  // `gen`; E = clamp(round(log2(max(0.5 / sqrt(in), 2^-8))), -8, 0), rounding half to even.
  static absl::StatusOr<TernaryLinear> Init(const TernaryLinearSpec& spec, at::Generator& gen,
                                            at::Device device);
  static absl::StatusOr<TernaryLinear> Import(const TernaryLinearSpec& spec,
                                              const StateDict& state, const std::string& name,
                                              at::Device device);
  void Export(const std::string& name, StateDict* out) const;

  // The compute type of Forward and of the weight gradient; FP32 unless set (before any Forward).
  void SetCompute(ComputeType compute);
  ComputeType compute() const { return compute_; }

  // w_eff of the current step (float32, or bfloat16 in BF16), computed once per step: a leaf
  // that requires grad, so that autograd returns d loss / d w_eff for it.
  const at::Tensor& WeightLeaf();
  // x: float32 [batch, in]. The GEMMs of the forward and of both gradients are those of
  // F.linear in FP32 (the same calls, so the same bits); TF32 and BF16 are opt-in. With
  // `pre_bias`, also the output before the bias: the tensor at which autograd's gradient of the
  // layer's product is taken (the g of g^T x). With `pre_bias` or without autograd, a batch the
  // packed route serves (Packed) runs on it: no w_eff, and autograd then gives no weight
  // gradient, only the gradients at the pre-bias output and the input (take the scores with
  // FactorScores).
  at::Tensor Forward(const at::Tensor& x, at::Tensor* pre_bias = nullptr);

  // Whether a batch runs on the packed route: BF16 or TF32 on CUDA, batches up to the packed
  // batch limit, group sizes that are multiples of 32. FP32 never does: it keeps cuBLAS's bits,
  // the reference's.
  bool Packed(int64_t batch) const;
  // The largest batch Packed() takes: DefaultPackedBatchLimit(compute) unless set, at most the
  // kernels' 16 (0: none; nullopt: the mode's default again). For benchmarks that find where
  // the route stops paying on a device, and tests of its kernels at every batch they take.
  void SetPackedBatchLimit(std::optional<int64_t> limit) { packed_batch_limit_ = limit; }
  // Whether a training step of this batch keeps the weight gradient in its two factors (one
  // sample, or the packed route): then FactorScores gives the update's scores.
  bool Factored(int64_t batch) const { return batch == 1 || Packed(batch); }

  // Per-group scores of the summed weight gradient (undefined: no gradient, scores 0).
  at::Tensor Scores(const at::Tensor& grad_sum) const;

  // The weight gradient g^T x of output gradients g [batch, out] at the pre-bias output and
  // inputs x [batch, in], in the compute type, as the layer's autograd node computes it.
  at::Tensor WeightGradient(const at::Tensor& g, const at::Tensor& x) const;

  // The scores of one sample's weight gradient (g [1, out], x [1, in]) without forming it: with
  // one sample, grad_w[r, c] is the single product g_r x_c, and its sign is sign(g_r) sign(x_c)
  // whenever the product cannot underflow to zero. Then score_g = sign(g_r) * sum over the
  // group's columns of sign(x_c) T[r, c]: no [out, in] gradient, no GEMM. `exact` (a 0-dim bool
  // tensor on the device, so that reading it can wait for the step's one synchronisation) is
  // true when every nonzero |g_r| and |x_c| is a normal float and the smallest product is at
  // least 2^-125: then no compute type's rounding of the operands or the product can reach zero,
  // and `scores` equals Scores(WeightGradient(g, x)) exactly. When false, use that instead.
  struct SampleScores {
    at::Tensor scores;
    at::Tensor exact;
  };
  SampleScores ScoresOfSample(const at::Tensor& g, const at::Tensor& x) const;
  // The scores of the weight gradient g^T x from its factors g [batch, out] (at the pre-bias
  // output) and x [batch, in], for a batch that Factored() says: on the packed route one fused
  // kernel (`exact` undefined: the compute type is not exact anyway); one sample in FP32 on a
  // layout the packed kernels take, the same kernel in float32 with the bound of ScoresOfSample
  // checked inside it; else ScoresOfSample.
  SampleScores FactorScores(const at::Tensor& g, const at::Tensor& x) const;
  // corr_accum -= scores, step_counter += 1; the next forward computes the new w_eff.
  void Apply(const at::Tensor& scores);
  // TernaryState::Commit: `after` from state().Updated as corr_accum, step_counter += 1.
  void Commit(at::Tensor after);
  // Forgets the current step's w_eff and S (computed again when next needed), so that a step
  // graph's capture computes them inside the graph.
  void DropCaches();
  // TernaryState::ReadStepAt.
  void ReadStepAt(const float* at) { state_.ReadStepAt(at); }

  const TernaryState& state() const { return state_; }
  int64_t persistent_bytes() const;
  // Bytes held on the device, the current step's w_eff included.
  int64_t device_bytes() const;

 private:
  TernaryState state_;
  at::Tensor bias_;   // int32 [out] on the device, or undefined
  at::Tensor w_eff_;  // cache of the current step, undefined when stale
  at::Tensor scale_;  // the packed route's S per group of the current step, undefined when stale
  ComputeType compute_ = ComputeType::kFp32;
  std::optional<int64_t> packed_batch_limit_;  // unset: DefaultPackedBatchLimit(compute_)
};

// Ternary RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (S * T). Its state is frozen: nothing updates
// it, and gradients flow through it to earlier layers.
class TernaryRMSNorm {
 public:
  // T from randn(dim) * 0.02 with threshold 0.01, E = -4.
  static absl::StatusOr<TernaryRMSNorm> Init(const TernaryRMSNormSpec& spec, at::Generator& gen,
                                             at::Device device);
  static absl::StatusOr<TernaryRMSNorm> Import(const TernaryRMSNormSpec& spec,
                                               const StateDict& state, const std::string& name,
                                               at::Device device);
  void Export(const std::string& name, StateDict* out) const { state_.Export(name, out); }

  at::Tensor Forward(const at::Tensor& x);
  const TernaryState& state() const { return state_; }
  int64_t persistent_bytes() const { return state_.persistent_bytes(); }
  int64_t device_bytes() const { return state_.device_bytes() + weight_.nbytes(); }

 private:
  TernaryState state_;
  at::Tensor weight_;  // S * T, float32 [dim]: constant, since the state never changes
};

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_LAYERS_H_
