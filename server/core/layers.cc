#include "server/core/layers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/version.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/errors.h"
#include "server/core/trits.h"
#if TSCALE_WITH_CUDA
#include "server/cuda/kernels.h"
#endif

namespace tscale::core {
namespace {

// ATen's sign of a float: 0 for zeros (and NaN).
int8_t SignOf(float v) { return static_cast<int8_t>((0.0f < v) - (v < 0.0f)); }

// A pass over the groups of rows [0, n) of a [n, cols] matrix: fn(r, k, begin, end) for row r's
// group k, columns [begin, end). The rows are split between ATen's threads in tasks of about its
// grain size in elements, so that a small layer runs on the calling thread.
template <typename Fn>
void ForEachGroup(int64_t n, int64_t cols, int64_t group_size, const Fn& fn) {
  const int64_t gpr = (cols + group_size - 1) / group_size;
  const int64_t rows_per_task =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
  at::parallel_for(0, n, rows_per_task, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      for (int64_t k = 0; k < gpr; ++k) {
        fn(r, k, k * group_size, std::min(cols, (k + 1) * group_size));
      }
    }
  });
}

std::string Describe(at::ScalarType dtype, const std::vector<int64_t>& shape) {
  return absl::StrCat(DTypeName(dtype), " [", absl::StrJoin(shape, ", "), "]");
}

// The tensor `key` of `state`, checked to have exactly this dtype and shape.
absl::StatusOr<at::Tensor> Expect(const StateDict& state, const std::string& key,
                                  at::ScalarType dtype, const std::vector<int64_t>& shape) {
  auto it = state.find(key);
  if (it == state.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": expected ", Describe(dtype, shape), ", got nothing (missing)"));
  }
  const at::Tensor& t = it->second;
  if (t.scalar_type() != dtype || t.sizes() != at::IntArrayRef(shape)) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": expected ", Describe(dtype, shape), ", got ", DescribeTensor(t)));
  }
  return t.to(at::kCPU).contiguous();
}

}  // namespace

// ---------------------------------------------------------------- TernaryState

absl::StatusOr<TernaryState> TernaryState::FromWeights(const at::Tensor& w, double threshold,
                                                       int64_t group_size, int8_t e_init,
                                                       at::Device device) {
  TernaryState s;
  s.rows_ = w.size(0);
  s.cols_ = w.size(1);
  s.group_size_ = group_size;
  // The reference's _ternarize, in its operations: sign(x) * (|x| > threshold).
  at::Tensor t = (w.sign() * (w.abs() > threshold).to(w.scalar_type())).to(at::kChar);
  auto packed = PackTernary(t);
  if (!packed.ok()) return packed.status();
  s.packed_ = *std::move(packed);
  s.Place(t, device);
  s.e_ = at::full({s.groups()}, e_init, at::TensorOptions(at::kChar).device(device));
  s.corr_accum_ = at::zeros({s.groups()}, at::TensorOptions(at::kLong).device(device));
  s.step_counter_ = 0;
  return s;
}

absl::StatusOr<TernaryState> TernaryState::Import(const StateDict& state, const std::string& name,
                                                  int64_t rows, int64_t cols, int64_t group_size,
                                                  at::Device device) {
  TernaryState s;
  s.rows_ = rows;
  s.cols_ = cols;
  s.group_size_ = group_size;
  const int64_t n = rows * cols;

  auto shape = Expect(state, name + "._T_shape", at::kLong, {2});
  if (!shape.ok()) return shape.status();
  const int64_t* sh = shape->data_ptr<int64_t>();
  if (sh[0] != rows || sh[1] != cols) {
    return absl::InvalidArgumentError(absl::StrCat(name, "._T_shape: expected [", rows, ", ",
                                                   cols, "], got [", sh[0], ", ", sh[1], "]"));
  }
  auto pad = Expect(state, name + "._T_pad", at::kLong, {});
  if (!pad.ok()) return pad.status();
  if (pad->item<int64_t>() != TritPad(n)) {
    return absl::InvalidArgumentError(absl::StrCat(name, "._T_pad: expected ", TritPad(n),
                                                   ", got ", pad->item<int64_t>()));
  }
  auto packed = Expect(state, name + ".T_packed", at::kByte, {PackedBytes(n)});
  if (!packed.ok()) return packed.status();
  auto trits = UnpackTernary(*packed, n, name + ".T_packed");
  if (!trits.ok()) return trits.status();
  auto e = Expect(state, name + ".E", at::kChar, {s.groups()});
  if (!e.ok()) return e.status();
  auto corr = Expect(state, name + ".corr_accum", at::kLong, {s.groups()});
  if (!corr.ok()) return corr.status();
  auto step = Expect(state, name + ".step_counter", at::kLong, {1});
  if (!step.ok()) return step.status();
  const int64_t step_counter = step->item<int64_t>();
  if (step_counter < 0 || step_counter > kMaxStep) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ".step_counter: expected a value within [0, 2^47 = ", kMaxStep, "], got ",
        step_counter));
  }
  // States the update rule cannot reach are refused: each step moves a group's corr_accum by at
  // most group_size, and E is set at initialisation within [kMinE, kMaxE] and never changes.
  const int64_t bound = step_counter > std::numeric_limits<int64_t>::max() / group_size
                            ? std::numeric_limits<int64_t>::max()
                            : step_counter * group_size;
  const int64_t worst = corr->numel() > 0 ? corr->abs().argmax().item<int64_t>() : 0;
  if (corr->numel() > 0 && std::abs(corr->data_ptr<int64_t>()[worst]) > bound) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ".corr_accum: expected values within ±step_counter * group_size = ±", bound,
        ", got ", corr->data_ptr<int64_t>()[worst], " at group ", worst));
  }
  if (e->numel() > 0) {
    const int64_t lo = e->min().item<int64_t>(), hi = e->max().item<int64_t>();
    if (lo < kMinE || hi > kMaxE) {
      return absl::InvalidArgumentError(absl::StrCat(name, ".E: expected values within [", kMinE,
                                                     ", ", kMaxE, "], got ",
                                                     lo < kMinE ? lo : hi));
    }
  }

  s.packed_ = packed->clone();
  s.Place(trits->view({rows, cols}), device);
  s.e_ = e->to(device, /*non_blocking=*/false, /*copy=*/true);
  s.corr_accum_ = corr->to(device, /*non_blocking=*/false, /*copy=*/true);
  s.step_counter_ = step_counter;
  return s;
}

void TernaryState::Export(const std::string& name, StateDict* out) const {
  (*out)[name + ".T_packed"] = packed_.clone();
  (*out)[name + "._T_shape"] = at::tensor(std::vector<int64_t>{rows_, cols_}, at::kLong);
  (*out)[name + "._T_pad"] = at::scalar_tensor(TritPad(rows_ * cols_), at::kLong);
  (*out)[name + ".E"] = e_.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  (*out)[name + ".corr_accum"] = corr_accum_.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  (*out)[name + ".step_counter"] = at::full({1}, step_counter_, at::kLong);
}

int64_t TernaryState::persistent_bytes() const {
  // T_packed + _T_shape + _T_pad + E + corr_accum + step_counter.
  return packed_.numel() + 2 * 8 + 8 + groups() + groups() * 8 + 8;
}

at::Tensor TernaryState::Log2Scale() const {
  at::Tensor e = e_.to(at::kFloat);
  if (step_counter_ > 0) {
    const int64_t denom = std::max<int64_t>(step_counter_ * group_size_, 1);
    at::Tensor mean_corr = corr_accum_.to(at::kFloat) / denom;
    e = e + mean_corr * 4.0;
  }
  return e;
}

void TernaryState::Place(const at::Tensor& trits, at::Device device) {
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) {
    packed_device_ = packed_.to(device);
    return;
  }
#endif
  trits_ = trits.to(device);
}

#if TSCALE_WITH_CUDA
cuda::TernaryView TernaryState::View() const {
  cuda::TernaryView view{&packed_device_, &e_, &corr_accum_, step_counter_, rows_, cols_,
                         group_size_};
  view.inv_denom_at = inv_denom_at_;
  return view;
}
#endif

at::Tensor TernaryState::EffectiveWeight(at::ScalarType dtype) const {
#if TSCALE_WITH_CUDA
  if (fused()) return cuda::EffectiveWeight(View(), dtype);
#endif
  const int64_t gpr = groups_per_row();
  if (trits_.is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16)) {
    // One pass: the six operators of the expansion below (and a conversion in BF16) would cost
    // more than a small layer's product. Each float32 product is exact, and rounding it to
    // bfloat16 here is the rounding of ATen's conversion.
    const at::Tensor scale = Scale().contiguous(), trits = trits_.contiguous();
    at::Tensor w = at::empty({rows_, cols_}, at::TensorOptions(dtype));
    const float* s = scale.data_ptr<float>();
    const int8_t* t = trits.data_ptr<int8_t>();
    auto pass = [&](auto* out) {
      using Out = std::remove_pointer_t<decltype(out)>;
      ForEachGroup(rows_, cols_, group_size_, [&](int64_t r, int64_t k, int64_t b, int64_t e) {
        const float sk = s[r * gpr + k];
        for (int64_t c = b; c < e; ++c) {
          out[r * cols_ + c] = static_cast<Out>(sk * static_cast<float>(t[r * cols_ + c]));
        }
      });
    };
    if (dtype == at::kBFloat16) {
      pass(w.data_ptr<at::BFloat16>());
    } else {
      pass(w.data_ptr<float>());
    }
    return w;
  }
  at::Tensor s = Scale()
                     .view({rows_, gpr, 1})
                     .expand({rows_, gpr, group_size_})
                     .reshape({rows_, gpr * group_size_})
                     .narrow(1, 0, cols_);
  at::Tensor w = s * trits_.to(at::kFloat);
  return dtype == at::kFloat ? w : w.to(dtype);
}

at::Tensor TernaryState::Scores(const at::Tensor& grad) const {
#if TSCALE_WITH_CUDA
  if (fused()) return cuda::Scores(View(), grad);
#endif
  if (CpuScoresTake(grad)) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows_,
                "scores: expected a gradient [", rows_, ", ", cols_, "], got ", grad.sizes());
    return CpuScores(grad, 0);
  }
  return GroupSums(grad.sign().to(at::kChar) * trits_);
}

at::Tensor TernaryState::ScoresOfSignProduct(const at::Tensor& g, const at::Tensor& x) const {
  TORCH_CHECK(g.numel() == rows_ && x.numel() == cols_ && g.scalar_type() == at::kFloat &&
                  x.scalar_type() == at::kFloat,
              "scores of a sign product: expected float32 [", rows_, "] and [", cols_, "], got ",
              g.sizes(), " ", g.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
  const int64_t gpr = groups_per_row();
  if (!fused() && trits_.is_cpu() && g.is_cpu() && x.is_cpu()) {
    const at::Tensor gc = g.contiguous(), xc = x.contiguous(), trits = trits_.contiguous();
    const float* gp = gc.data_ptr<float>();
    const float* xp = xc.data_ptr<float>();
    const int8_t* t = trits.data_ptr<int8_t>();
    at::Tensor scores = at::empty({groups()}, at::kLong);
    int64_t* out = scores.data_ptr<int64_t>();
    ForEachGroup(rows_, cols_, group_size_, [&](int64_t r, int64_t k, int64_t begin, int64_t end) {
      const int64_t sign = SignOf(gp[r]);
      int64_t sum = 0;
      for (int64_t c = begin; c < end && sign != 0; ++c) sum += SignOf(xp[c]) * t[r * cols_ + c];
      out[r * gpr + k] = sign * sum;
    });
    return scores;
  }
  at::Tensor per_row;
#if TSCALE_WITH_CUDA
  if (fused()) per_row = cuda::Scores(View(), x.reshape({1, cols_}).expand({rows_, cols_}));
#endif
  if (!per_row.defined()) {
    per_row = GroupSums(trits_ * x.sign().to(at::kChar).view({1, cols_}));
  }
  return (per_row.view({rows_, gpr}) * g.sign().to(at::kLong).view({-1, 1})).flatten();
}

at::Tensor TernaryState::ScoresOfRows(const at::Tensor& grad_rows, int64_t first_row) const {
  const int64_t n = grad_rows.size(0);
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(1) == cols_ && first_row >= 0 &&
                  first_row + n <= rows_,
              "scores of rows: expected [n, ", cols_, "] within ", rows_, " rows, got ",
              grad_rows.sizes(), " from row ", first_row);
#if TSCALE_WITH_CUDA
  if (fused()) {
    // The kernel scores whole matrices: the other rows are zeros, whose scores are dropped.
    at::Tensor full = at::zeros({rows_, cols_}, grad_rows.options());
    full.narrow(0, first_row, n).copy_(grad_rows);
    const int64_t gpr = groups_per_row();
    return cuda::Scores(View(), full).narrow(0, first_row * gpr, n * gpr);
  }
#endif
  if (CpuScoresTake(grad_rows)) return CpuScores(grad_rows, first_row);
  return GroupSums(grad_rows.sign().to(at::kChar) * trits_.narrow(0, first_row, n));
}

bool TernaryState::CpuScoresTake(const at::Tensor& grad) const {
  return !fused() && trits_.is_cpu() && grad.is_cpu() &&
         (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16);
}

at::Tensor TernaryState::CpuScores(const at::Tensor& grad, int64_t first_row) const {
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == cols_ && first_row >= 0 &&
                  first_row + grad.size(0) <= rows_,
              "scores: expected a gradient [n, ", cols_, "] within ", rows_, " rows, got ",
              grad.sizes(), " from row ", first_row);
  const at::Tensor gc = grad.contiguous(), trits = trits_.contiguous();
  const int64_t n = gc.size(0), gpr = groups_per_row();
  at::Tensor scores = at::empty({n * gpr}, at::kLong);
  int64_t* out = scores.data_ptr<int64_t>();
  const int8_t* t = trits.data_ptr<int8_t>() + first_row * cols_;
  auto pass = [&](const auto* g) {
    ForEachGroup(n, cols_, group_size_, [&](int64_t r, int64_t k, int64_t begin, int64_t end) {
      int64_t sum = 0;
      for (int64_t c = begin; c < end; ++c) {
        sum += SignOf(static_cast<float>(g[r * cols_ + c])) * t[r * cols_ + c];
      }
      out[r * gpr + k] = sum;
    });
  };
  if (gc.scalar_type() == at::kBFloat16) {
    pass(gc.data_ptr<at::BFloat16>());
  } else {
    pass(gc.data_ptr<float>());
  }
  return scores;
}

at::Tensor TernaryState::GroupSums(at::Tensor signed_t) const {
  const int64_t gpr = groups_per_row();
  const int64_t pad = gpr * group_size_ - cols_;
  if (pad > 0) signed_t = at::constant_pad_nd(signed_t, {0, pad});
  return signed_t.view({signed_t.size(0), gpr, group_size_})
      .sum(2, /*keepdim=*/false, at::kLong)
      .flatten();
}

at::Tensor TernaryState::Updated(const at::Tensor& scores, at::Tensor figures) const {
  TORCH_CHECK(scores.scalar_type() == at::kLong && scores.numel() == groups() &&
                  figures.scalar_type() == at::kLong && figures.numel() == 2 &&
                  figures.is_contiguous() && scores.device() == corr_accum_.device() &&
                  figures.device() == corr_accum_.device(),
              "update: expected int64 scores [", groups(), "] and figures [2] on ",
              corr_accum_.device(), ", got ", scores.sizes(), " ", scores.scalar_type(), " on ",
              scores.device(), " and ", figures.sizes(), " on ", figures.device());
  if (!corr_accum_.is_cpu()) {
    at::Tensor after = corr_accum_ - scores;
    figures.add_(at::stack({scores.sum(), after.abs().sum()}));
    return after;
  }
  const at::Tensor s = scores.contiguous(), corr = corr_accum_.contiguous();
  at::Tensor after = at::empty_like(corr);
  const int64_t* c = corr.data_ptr<int64_t>();
  const int64_t* v = s.data_ptr<int64_t>();
  int64_t* a = after.data_ptr<int64_t>();
  int64_t sum = 0, abs_sum = 0;
  for (int64_t i = 0, n = groups(); i < n; ++i) {
    a[i] = c[i] - v[i];
    sum += v[i];
    abs_sum += a[i] < 0 ? -a[i] : a[i];
  }
  int64_t* f = figures.data_ptr<int64_t>();
  f[0] += sum;
  f[1] += abs_sum;
  return after;
}

void TernaryState::Commit(at::Tensor after) {
  if (fused()) {
    corr_accum_.copy_(after);
  } else {
    corr_accum_ = std::move(after);
  }
  ++step_counter_;
}

bool TernaryState::PackedRouteServes(int64_t batch) const {
#if TSCALE_WITH_CUDA
  if (fused()) return cuda::PackedRouteServes(View(), batch);
#endif
  (void)batch;
  return false;
}

// ---------------------------------------------------------------- TernaryLinear

absl::StatusOr<TernaryLinear> TernaryLinear::Init(const TernaryLinearSpec& spec,
                                                  at::Generator& gen, at::Device device) {
  const int64_t in = spec.in_features, out = spec.out_features;
  const double init_std = spec.bias ? 0.02 : 0.1;
  const double threshold =
      spec.threshold == 0 ? kDefaultLinearThreshold : static_cast<double>(spec.threshold);
  // Python's round() rounds half to even, as nearbyint does in the default rounding mode.
  const double target = 0.5 * std::pow(static_cast<double>(in), -0.5);
  const double e_real = std::nearbyint(std::log2(std::max(target, std::ldexp(1.0, -8))));
  const int8_t e_init = static_cast<int8_t>(std::clamp<double>(e_real, kMinE, kMaxE));

  at::Tensor w = at::randn({out, in}, gen) * init_std;
  auto state = TernaryState::FromWeights(w, threshold, spec.group_size, e_init, device);
  if (!state.ok()) return state.status();
  TernaryLinear layer;
  layer.state_ = *std::move(state);
  if (spec.bias) layer.bias_ = at::zeros({out}, at::TensorOptions(at::kInt).device(device));
  return layer;
}

absl::StatusOr<TernaryLinear> TernaryLinear::Import(const TernaryLinearSpec& spec,
                                                    const StateDict& state,
                                                    const std::string& name, at::Device device) {
  auto st = TernaryState::Import(state, name, spec.out_features, spec.in_features,
                                 spec.group_size, device);
  if (!st.ok()) return st.status();
  TernaryLinear layer;
  layer.state_ = *std::move(st);
  const std::string bias_key = name + ".bias";
  if (spec.bias) {
    auto bias = Expect(state, bias_key, at::kInt, {spec.out_features});
    if (!bias.ok()) return bias.status();
    layer.bias_ = bias->to(device, /*non_blocking=*/false, /*copy=*/true);
  } else if (state.count(bias_key) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(bias_key, ": expected no bias (the spec's bias is false), got ",
                     DescribeTensor(state.at(bias_key))));
  }
  return layer;
}

void TernaryLinear::Export(const std::string& name, StateDict* out) const {
  state_.Export(name, out);
  if (bias_.defined()) {
    (*out)[name + ".bias"] = bias_.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  }
}

int64_t TernaryState::device_bytes() const {
  return (fused() ? packed_device_.nbytes() : trits_.nbytes()) + e_.nbytes() +
         corr_accum_.nbytes();
}

int64_t TernaryLinear::device_bytes() const {
  return state_.device_bytes() + (bias_.defined() ? bias_.nbytes() : 0) +
         (w_eff_.defined() ? w_eff_.nbytes() : 0) + (scale_.defined() ? scale_.nbytes() : 0);
}

int64_t TernaryLinear::persistent_bytes() const {
  return state_.persistent_bytes() + (bias_.defined() ? bias_.numel() * 4 : 0);
}

void TernaryLinear::SetCompute(ComputeType compute) {
  compute_ = compute;
  DropCaches();
}

bool TernaryLinear::Packed(int64_t batch) const {
  const int64_t limit = packed_batch_limit_.value_or(DefaultPackedBatchLimit(compute_));
  return compute_ != ComputeType::kFp32 && batch <= limit && state_.PackedRouteServes(batch);
}

const at::Tensor& TernaryLinear::WeightLeaf() {
  if (!w_eff_.defined()) {
    c10::NoGradGuard no_grad;
    w_eff_ = state_.EffectiveWeight(compute_ == ComputeType::kBf16 ? at::kBFloat16 : at::kFloat);
    w_eff_.requires_grad_(true);
  }
  return w_eff_;
}

namespace {

// a @ b in a compute type: FP32 and BF16 through LibTorch's matmul (BF16 operands give float32
// accumulation), TF32 through the CUDA kernels' per-call TF32 GEMM.
at::Tensor Matmul(const at::Tensor& a, const at::Tensor& b, ComputeType compute) {
#if TSCALE_WITH_CUDA
  if (compute == ComputeType::kTf32) return cuda::MatmulTf32(a, b);
#endif
  (void)compute;
  return a.mm(b);
}

// The weight gradient of g [batch, out] and x [batch, in], both already in the compute type's
// storage (bfloat16 in BF16): mm_mat2_backward of w^T (always column-major), transposed back.
at::Tensor WeightGradientOf(const at::Tensor& g, const at::Tensor& x, ComputeType compute) {
  return Matmul(g.t(), x, compute);
}

// y = x @ w^T with its two gradients, as one autograd node. In FP32 every GEMM is the call
// LibTorch's autograd makes for F.linear (mm and its mm_mat1/mm_mat2 backward formulas, including
// their choice for column-major operands), so outputs and gradients keep the reference's bits.
// In BF16 x is rounded once to bfloat16 and kept so for the weight gradient; the output and
// the input gradient come back as float32, the weight gradient as bfloat16 like w.
struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, int64_t compute_code) {
    const auto compute = static_cast<ComputeType>(compute_code);
    const at::Tensor xc = compute == ComputeType::kBf16 ? x.to(at::kBFloat16) : x;
    ctx->save_for_backward({xc, w});
    ctx->saved_data["compute"] = compute_code;
    at::Tensor y = Matmul(xc, w.t(), compute);
    return compute == ComputeType::kBf16 ? y.to(at::kFloat) : y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto compute = static_cast<ComputeType>(ctx->saved_data["compute"].toInt());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor g = compute == ComputeType::kBf16 ? grads[0].to(at::kBFloat16) : grads[0];
    at::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) {
      // mm_mat1_backward: a column-major input gets its gradient column-major.
      if (x.stride(0) == 1 && x.stride(1) == x.size(0)) {
        grad_x = Matmul(w.t(), g.t(), compute).t();
      } else {
        grad_x = Matmul(g, w, compute);
      }
      if (compute == ComputeType::kBf16) grad_x = grad_x.to(at::kFloat);
    }
    if (ctx->needs_input_grad(1)) grad_w = WeightGradientOf(g, x, compute);
    return {grad_x, grad_w, at::Tensor()};
  }
};

#if TSCALE_WITH_CUDA
// y = x @ (S T)^T on the packed route, with the input gradient as its backward. The weight is
// not an input of the node: the step takes the weight gradient's scores from its factors.
struct PackedLinearFunction : public torch::autograd::Function<PackedLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& packed, const at::Tensor& e,
                            const at::Tensor& corr_accum, const at::Tensor& scale,
                            int64_t rows, int64_t cols, int64_t group_size, bool bf16) {
    ctx->saved_data["packed"] = packed;
    ctx->saved_data["e"] = e;
    ctx->saved_data["corr_accum"] = corr_accum;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["bf16"] = bf16;
    const cuda::TernaryView view{&packed, &e, &corr_accum, 0, rows, cols, group_size};
    return cuda::PackedLinear(view, scale, x, bf16);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor packed = ctx->saved_data["packed"].toTensor();
      const at::Tensor e = ctx->saved_data["e"].toTensor();
      const at::Tensor corr_accum = ctx->saved_data["corr_accum"].toTensor();
      const cuda::TernaryView view{&packed,
                                   &e,
                                   &corr_accum,
                                   0,
                                   ctx->saved_data["rows"].toInt(),
                                   ctx->saved_data["cols"].toInt(),
                                   ctx->saved_data["group_size"].toInt()};
      grad_x = cuda::PackedInputGradient(view, ctx->saved_data["scale"].toTensor(), grads[0],
                                         ctx->saved_data["bf16"].toBool());
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
#endif

}  // namespace

at::Tensor TernaryLinear::Forward(const at::Tensor& x, at::Tensor* pre_bias) {
#if TSCALE_WITH_CUDA
  const bool grad = c10::GradMode::is_enabled();
  if ((pre_bias != nullptr || !grad) && x.dim() == 2 && Packed(x.size(0))) {
    const bool bf16 = compute_ == ComputeType::kBf16;
    if (!scale_.defined()) scale_ = cuda::PackedScale(state_.View(), bf16);
    const cuda::TernaryView view = state_.View();
    at::Tensor y =
        PackedLinearFunction::apply(x, *view.packed, *view.e, *view.corr_accum, scale_, view.rows,
                                    view.cols, view.group_size, bf16);
    // The gradient at the pre-bias output is taken even where nothing before it needs one.
    if (grad && !y.requires_grad()) y.requires_grad_(true);
    if (pre_bias != nullptr) *pre_bias = y;
    if (bias_.defined()) y = y + bias_.to(at::kFloat);
    return y;
  }
#endif
  at::Tensor y = LinearFunction::apply(x, WeightLeaf(), static_cast<int64_t>(compute_));
  if (pre_bias != nullptr) *pre_bias = y;
  if (bias_.defined()) y = y + bias_.to(at::kFloat);
  return y;
}

at::Tensor TernaryLinear::WeightGradient(const at::Tensor& g, const at::Tensor& x) const {
  if (compute_ == ComputeType::kBf16) {
    return WeightGradientOf(g.to(at::kBFloat16), x.to(at::kBFloat16), compute_);
  }
  return WeightGradientOf(g, x, compute_);
}

TernaryLinear::SampleScores TernaryLinear::ScoresOfSample(const at::Tensor& g,
                                                          const at::Tensor& x) const {
  TORCH_CHECK(g.dim() == 2 && g.size(0) == 1 && g.size(1) == state_.rows() && x.dim() == 2 &&
                  x.size(0) == 1 && x.size(1) == state_.cols(),
              "scores of a sample: expected g [1, ", state_.rows(), "] and x [1, ",
              state_.cols(), "], got ", g.sizes(), " and ", x.sizes());
  // Float32 vectors; on the CPU without an operator where they already are (the step's case).
  auto as_vector = [](const at::Tensor& t) {
    return t.is_cpu() && t.scalar_type() == at::kFloat ? t : t.detach().to(at::kFloat).flatten();
  };
  const at::Tensor gf = as_vector(g), xf = as_vector(x);
  const double normal = std::ldexp(1.0, -126), product = std::ldexp(1.0, -125);
  at::Tensor exact;
  if (gf.is_cpu() && xf.is_cpu()) {
    // On the CPU one pass over each factor's values: a handful of tensor operations would cost
    // more than the rest of a small layer's step.
    auto smallest = [](const at::Tensor& v) {
      const at::Tensor c = v.contiguous();
      const float* p = c.data_ptr<float>();
      double m = INFINITY;
      for (int64_t i = 0, n = c.numel(); i < n; ++i) {
        const double a = std::fabs(static_cast<double>(p[i]));
        if (a > 0 && a < m) m = a;
      }
      return m;
    };
    const double gmin = smallest(gf), xmin = smallest(xf);
    exact = at::scalar_tensor(gmin >= normal && xmin >= normal && gmin * xmin >= product,
                              at::TensorOptions(at::kBool));
  } else {
    // The smallest nonzero magnitude of each factor (infinity when all are zero).
    auto smallest = [](const at::Tensor& v) {
      const at::Tensor a = v.abs();
      return at::where(a > 0, a, at::full({}, INFINITY, a.options())).min().to(at::kDouble);
    };
    const at::Tensor gmin = smallest(gf), xmin = smallest(xf);
    exact = gmin.ge(normal).logical_and(xmin.ge(normal)).logical_and((gmin * xmin).ge(product));
  }
  return {state_.ScoresOfSignProduct(gf, xf), exact};
}

TernaryLinear::SampleScores TernaryLinear::FactorScores(const at::Tensor& g,
                                                        const at::Tensor& x) const {
#if TSCALE_WITH_CUDA
  if (g.dim() == 2 && Packed(g.size(0))) {
    return {cuda::FactorScores(state_.View(), g.detach(), x.detach(),
                               compute_ == ComputeType::kBf16),
            at::Tensor()};
  }
  if (compute_ == ComputeType::kFp32 && g.dim() == 2 && g.size(0) == 1 &&
      state_.PackedRouteServes(1)) {
    auto sample = cuda::Float32SampleScores(state_.View(), g.detach(), x.detach());
    return {std::move(sample.scores), std::move(sample.exact)};
  }
#endif
  return ScoresOfSample(g, x);
}

at::Tensor TernaryLinear::Scores(const at::Tensor& grad_sum) const {
  if (!grad_sum.defined()) {
    return at::zeros({state_.groups()}, at::TensorOptions(at::kLong).device(state_.e().device()));
  }
  return state_.Scores(grad_sum);
}

void TernaryLinear::Apply(const at::Tensor& scores) { Commit(state_.corr_accum() - scores); }

void TernaryLinear::Commit(at::Tensor after) {
  state_.Commit(std::move(after));
  DropCaches();
}

void TernaryLinear::DropCaches() {
  w_eff_.reset();
  scale_.reset();
}

// ---------------------------------------------------------------- TernaryRMSNorm

namespace {
constexpr double kNormInitStd = 0.02;
constexpr double kNormThreshold = 0.01;
constexpr int8_t kNormE = -4;
}  // namespace

absl::StatusOr<TernaryRMSNorm> TernaryRMSNorm::Init(const TernaryRMSNormSpec& spec,
                                                    at::Generator& gen, at::Device device) {
  at::Tensor w = at::randn({spec.dim}, gen) * kNormInitStd;
  auto state = TernaryState::FromWeights(w.view({1, spec.dim}), kNormThreshold, spec.group_size,
                                         kNormE, device);
  if (!state.ok()) return state.status();
  TernaryRMSNorm layer;
  layer.state_ = *std::move(state);
  layer.weight_ = layer.state_.EffectiveWeight().flatten();
  return layer;
}

absl::StatusOr<TernaryRMSNorm> TernaryRMSNorm::Import(const TernaryRMSNormSpec& spec,
                                                      const StateDict& state,
                                                      const std::string& name,
                                                      at::Device device) {
  auto st = TernaryState::Import(state, name, 1, spec.dim, spec.group_size, device);
  if (!st.ok()) return st.status();
  TernaryRMSNorm layer;
  layer.state_ = *std::move(st);
  layer.weight_ = layer.state_.EffectiveWeight().flatten();
  return layer;
}

at::Tensor TernaryRMSNorm::Forward(const at::Tensor& x) {
  // F.rms_norm(x, (dim,)) with eps = float32 machine epsilon. LibTorch 2.4 and later have the
  // operation itself (on CUDA a fused kernel): use it, so that the reference on the same LibTorch
  // and device gives the same bits. Older ones get its definition, in its operations.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::rms_norm(x, {x.size(-1)}, std::nullopt, std::nullopt) * weight_;
#else
  const double eps = std::numeric_limits<float>::epsilon();
  at::Tensor norm = x.mul(at::rsqrt(x.pow(2).mean({-1}, /*keepdim=*/true).add(eps)));
  return norm * weight_;
#endif
}

}  // namespace tscale::core
