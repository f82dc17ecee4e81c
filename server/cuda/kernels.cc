#include "server/cuda/kernels.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <algorithm>
#include <limits>

#include "server/cuda/launch.h"

namespace tscale::cuda {
namespace {

detail::TernaryArgs Args(const TernaryView& t) {
  TORCH_CHECK(
      t.packed->is_cuda() && t.packed->scalar_type() == at::kByte && t.packed->is_contiguous(),
      "packed trits: expected a contiguous uint8 CUDA tensor");
  TORCH_CHECK(t.e->scalar_type() == at::kChar && t.e->is_contiguous(), "E: expected int8");
  TORCH_CHECK(t.corr_accum->scalar_type() == at::kLong && t.corr_accum->is_contiguous(),
              "corr_accum: expected int64");
  TORCH_CHECK(t.rows > 0 && t.cols > 0 && t.cols <= std::numeric_limits<int32_t>::max() &&
                  t.group_size > 0,
              "ternary kernels: expected rows > 0, 0 < cols < 2^31 and group_size > 0, got rows ",
              t.rows, ", cols ", t.cols, ", group_size ", t.group_size);
  detail::TernaryArgs a;
  a.packed = t.packed->data_ptr<uint8_t>();
  a.e = t.e->data_ptr<int8_t>();
  a.corr_accum = t.corr_accum->data_ptr<int64_t>();
  a.scaled = t.step > 0;
  a.inv_denom = StepReciprocal(t.step, t.group_size);
  TORCH_CHECK(t.inv_denom_at == nullptr || t.step > 0,
              "ternary kernels: a scale read from device memory needs a step > 0, got ", t.step);
  a.inv_denom_at = t.inv_denom_at;
  a.rows = t.rows;
  a.cols = t.cols;
  // A group wider than a row is the whole row: the same groups, with sizes the kernels' 32-bit
  // column arithmetic holds. The scale's denominator above keeps the real group size.
  a.group_size = std::min(t.group_size, t.cols);
  return a;
}

detail::Element ElementOf(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "ternary kernels: expected float32 or bfloat16, got ", dtype);
  return dtype == at::kFloat ? detail::Element::kFloat32 : detail::Element::kBFloat16;
}

// How cuBLAS (column-major) sees a row-major logical matrix m [r, c]: either as its transpose
// stored with leading dimension ld (row-major storage), or as itself (column-major storage).
struct Operand {
  at::Tensor t;
  bool column_major = false;
  int64_t ld = 1;
};

Operand AsOperand(const at::Tensor& m) {
  const int64_t r = m.size(0), c = m.size(1);
  if (m.stride(1) == 1 && m.stride(0) >= std::max<int64_t>(c, 1)) {
    return {m, false, m.stride(0)};
  }
  if (m.stride(0) == 1 && m.stride(1) >= std::max<int64_t>(r, 1)) {
    return {m, true, m.stride(1)};
  }
  at::Tensor contiguous = m.contiguous();
  return {contiguous, false, std::max<int64_t>(c, 1)};
}

detail::Rounding RoundingOf(bool bf16) {
  return bf16 ? detail::Rounding::kBFloat16 : detail::Rounding::kTf32;
}

detail::PackedArgs Packed(const TernaryView& t, const float* scale, int64_t batch,
                          detail::Rounding rounding) {
  TORCH_CHECK(PackedRouteServes(t, batch), "packed route: a [", t.rows, ", ", t.cols,
              "] layer of group size ", t.group_size, " at batch ", batch,
              ": expected a batch of 1 to ", detail::kMaxPackedBatch,
              " and a group size that is a multiple of 32");
  const detail::TernaryArgs a = Args(t);
  detail::PackedArgs p;
  p.packed = a.packed;
  p.scale = scale;
  p.rows = a.rows;
  p.cols = a.cols;
  p.group_size = a.group_size;
  p.batch = static_cast<int>(batch);
  p.rounding = rounding;
  return p;
}

const float* ScaleData(const TernaryView& t, const at::Tensor& scale) {
  TORCH_CHECK(scale.is_cuda() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == t.e->numel(),
              "packed route: expected the layer's scales, float32 [", t.e->numel(), "]");
  return scale.data_ptr<float>();
}

// A [batch, n] operand of the packed route as contiguous float32 on the layer's device.
at::Tensor Operand2d(const at::Tensor& m, int64_t n, const TernaryView& t, const char* what) {
  TORCH_CHECK(m.dim() == 2 && m.size(1) == n, "packed route: ", what, " of shape ", m.sizes(),
              " for a [", t.rows, ", ", t.cols, "] layer");
  TORCH_CHECK(m.device() == t.packed->device(), "packed route: ", what, " on ", m.device(),
              ", trits on ", t.packed->device());
  return m.to(at::kFloat).contiguous();
}

// Float scratch of a kernel's second pass (partial sums added in order): allocated only where the
// launch needs it (`floats` > 0); data() is then its pointer, else null.
class Scratch {
 public:
  Scratch(int64_t floats, const at::TensorOptions& options)
      : t_(floats > 0 ? at::empty({floats}, options.dtype(at::kFloat)) : at::Tensor()) {}
  float* data() const { return t_.defined() ? t_.data_ptr<float>() : nullptr; }

 private:
  at::Tensor t_;
};

}  // namespace

float StepReciprocal(int64_t step, int64_t group_size) {
  // LibTorch divides a CUDA tensor by a CPU scalar as a multiplication by the scalar's reciprocal,
  // computed on the host in the tensor's float type.
  const int64_t denom = std::max<int64_t>(step * group_size, 1);
  return 1.0f / static_cast<float>(denom);
}

bool PackedRouteServes(const TernaryView& t, int64_t batch) {
  const int64_t gs = std::min(t.group_size, t.cols);
  return batch >= 1 && batch <= detail::kMaxPackedBatch && t.rows > 0 && t.cols > 0 &&
         t.cols <= std::numeric_limits<int32_t>::max() && gs % 32 == 0;
}

at::Tensor PackedScale(const TernaryView& t, bool bf16) {
  const c10::cuda::CUDAGuard guard(t.packed->device());
  at::Tensor scale = at::empty({t.e->numel()}, t.packed->options().dtype(at::kFloat));
  C10_CUDA_CHECK(detail::LaunchScale(Args(t), RoundingOf(bf16), scale.data_ptr<float>(),
                                     at::cuda::getCurrentCUDAStream()));
  return scale;
}

at::Tensor PackedLinear(const TernaryView& t, const at::Tensor& scale, const at::Tensor& x,
                        bool bf16) {
  const c10::cuda::CUDAGuard guard(t.packed->device());
  const at::Tensor xf = Operand2d(x, t.cols, t, "input");
  const detail::PackedArgs p = Packed(t, ScaleData(t, scale), xf.size(0), RoundingOf(bf16));
  at::Tensor y = at::empty({xf.size(0), t.rows}, xf.options());
  Scratch partial(detail::PackedLinearScratch(p), xf.options());
  C10_CUDA_CHECK(detail::LaunchPackedLinear(p, xf.data_ptr<float>(), y.data_ptr<float>(),
                                            partial.data(), at::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor PackedInputGradient(const TernaryView& t, const at::Tensor& scale, const at::Tensor& g,
                               bool bf16) {
  const c10::cuda::CUDAGuard guard(t.packed->device());
  const at::Tensor gf = Operand2d(g, t.rows, t, "output gradient");
  const detail::PackedArgs p = Packed(t, ScaleData(t, scale), gf.size(0), RoundingOf(bf16));
  at::Tensor grad_x = at::empty({gf.size(0), t.cols}, gf.options());
  Scratch partial(detail::PackedInputGradientScratch(p), gf.options());
  C10_CUDA_CHECK(detail::LaunchPackedInputGradient(p, gf.data_ptr<float>(),
                                                   grad_x.data_ptr<float>(), partial.data(),
                                                   at::cuda::getCurrentCUDAStream()));
  return grad_x;
}

namespace {

// LaunchFactorScores's scores of g^T x, with the rounding of its operands; `exact` as it says.
at::Tensor ScoresOfFactors(const TernaryView& t, const at::Tensor& g, const at::Tensor& x,
                           detail::Rounding rounding, bool* exact) {
  const c10::cuda::CUDAGuard guard(t.packed->device());
  const at::Tensor gf = Operand2d(g, t.rows, t, "output gradient");
  const at::Tensor xf = Operand2d(x, t.cols, t, "input");
  TORCH_CHECK(gf.size(0) == xf.size(0), "factor scores: a batch of ", gf.size(0),
              " output gradients and ", xf.size(0), " inputs");
  // No scale: the signs of the gradient do not depend on it.
  const detail::PackedArgs p = Packed(t, nullptr, gf.size(0), rounding);
  at::Tensor scores = at::empty({t.e->numel()}, gf.options().dtype(at::kLong));
  C10_CUDA_CHECK(detail::LaunchFactorScores(p, gf.data_ptr<float>(), xf.data_ptr<float>(),
                                            scores.data_ptr<int64_t>(), exact,
                                            at::cuda::getCurrentCUDAStream()));
  return scores;
}

}  // namespace

at::Tensor FactorScores(const TernaryView& t, const at::Tensor& g, const at::Tensor& x,
                        bool bf16) {
  return ScoresOfFactors(t, g, x, RoundingOf(bf16), nullptr);
}

SampleScores Float32SampleScores(const TernaryView& t, const at::Tensor& g, const at::Tensor& x) {
  TORCH_CHECK(g.dim() == 2 && g.size(0) == 1 && x.dim() == 2 && x.size(0) == 1,
              "scores of a sample: expected g [1, ", t.rows, "] and x [1, ", t.cols, "], got ",
              g.sizes(), " and ", x.sizes());
  const c10::cuda::CUDAGuard guard(t.packed->device());
  at::Tensor exact = at::ones({}, t.packed->options().dtype(at::kBool));
  at::Tensor scores =
      ScoresOfFactors(t, g, x, detail::Rounding::kNone, exact.data_ptr<bool>());
  return {std::move(scores), std::move(exact)};
}

at::Tensor EffectiveWeight(const TernaryView& t, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(t.packed->device());
  at::Tensor out = at::empty({t.rows, t.cols}, t.packed->options().dtype(dtype));
  at::Tensor scale = at::empty({t.e->numel()}, t.packed->options().dtype(at::kFloat));
  C10_CUDA_CHECK(detail::LaunchEffectiveWeight(Args(t), ElementOf(dtype), out.data_ptr(),
                                               scale.data_ptr<float>(),
                                               at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor Scores(const TernaryView& t, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == t.rows && grad.size(1) == t.cols,
              "scores: gradient of shape ", grad.sizes(), " for a [", t.rows, ", ", t.cols,
              "] layer");
  TORCH_CHECK(grad.device() == t.packed->device(), "scores: gradient on ", grad.device(),
              ", trits on ", t.packed->device());
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t gpr = (t.cols + t.group_size - 1) / t.group_size;
  at::Tensor scores = at::empty({t.rows * gpr}, grad.options().dtype(at::kLong));
  C10_CUDA_CHECK(detail::LaunchScores(Args(t), ElementOf(grad.scalar_type()), grad.data_ptr(),
                                      grad.stride(0), grad.stride(1), scores.data_ptr<int64_t>(),
                                      at::cuda::getCurrentCUDAStream()));
  return scores;
}

at::Tensor MatmulTf32(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "tf32 matmul: shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(
      a.is_cuda() && b.is_cuda() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
      "tf32 matmul: expected float32 CUDA tensors");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor c = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return c;
  if (k == 0) return c.zero_();
  // Row-major C = A B is column-major C^T = B^T A^T.
  const Operand ob = AsOperand(b), oa = AsOperand(a);
  const float alpha = 1.0f, beta = 0.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasStatus_t status = cublasGemmEx(
      handle, ob.column_major ? CUBLAS_OP_T : CUBLAS_OP_N,
      oa.column_major ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
      static_cast<int>(k), &alpha, ob.t.data_ptr<float>(), CUDA_R_32F, static_cast<int>(ob.ld),
      oa.t.data_ptr<float>(), CUDA_R_32F, static_cast<int>(oa.ld), &beta, c.data_ptr<float>(),
      CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "tf32 matmul: cublasGemmEx failed with status ",
              static_cast<int>(status));
  return c;
}

}  // namespace tscale::cuda
