// CUDA kernels of the ternary layers, built only when CUDA and a CUDA LibTorch are found
// (TSCALE_WITH_CUDA). Every function takes and returns tensors on one CUDA device and runs on its
// current stream; none synchronises with the host.
//
// Trits are read in their persistent packed form (5 per byte, docs/arithmetic.md, section 3) straight from device
// memory: 0.2 bytes per weight instead of a decoded int8 copy.
#ifndef TSCALE_SERVER_CUDA_KERNELS_H_
#define TSCALE_SERVER_CUDA_KERNELS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tscale::cuda {

// The shape and state of one ternary layer as the kernels need it.
struct TernaryView {
  const at::Tensor* packed;      // uint8 [ceil(rows*cols/5)] on the device
  const at::Tensor* e;           // int8 [groups]
  const at::Tensor* corr_accum;  // int64 [groups]
  int64_t step = 0;
  int64_t rows = 0, cols = 0, group_size = 0;
  // When set (a float on the device; step > 0), the kernels read StepReciprocal there when they
  // run instead of taking it from `step` when launched: a CUDA graph captured at one step then
  // serves the later ones, its caller writing each step's value there before a replay.
  const float* inv_denom_at = nullptr;
};

// 1 / (float)max(step * group_size, 1): the factor by which the kernels multiply corr_accum in S,
// as LibTorch's CUDA kernels divide by a scalar.
float StepReciprocal(int64_t step, int64_t group_size);

// w_eff = S * T as `dtype` (float32 or bfloat16) [rows, cols], S = 2^(E + 4 corr_accum / (step gs))
// per group, computed as LibTorch's CUDA kernels compute the reference's expression (the division
// by the scalar as a multiplication by its float32 reciprocal), so that float32 w_eff is
// bit-identical to the reference's on the same GPU.
at::Tensor EffectiveWeight(const TernaryView& t, at::ScalarType dtype);

// Per-group scores of a weight gradient (float32 or bfloat16 [rows, cols], any strides): sum over
// the group's columns of sign(grad) * T, as int64 [groups]. No sign tensor is made.
at::Tensor Scores(const TernaryView& t, const at::Tensor& grad);

// a @ b for float32 matrices on tensor cores in TF32 (inputs rounded to 10-bit mantissas, float32
// accumulation), whatever LibTorch's global TF32 setting is: a per-call choice, so that a TF32
// model never changes the arithmetic of an FP32 model running at the same time.
at::Tensor MatmulTf32(const at::Tensor& a, const at::Tensor& b);

// The packed route of small batches: a layer's products and scores straight from the packed
// trits and S per group, without w_eff or an [rows, cols] weight gradient. It serves batches up to
// 16 in the BF16 and TF32 compute types (operands rounded as theirs are: `bf16`, else TF32) for
// group sizes that are multiples of 32.
bool PackedRouteServes(const TernaryView& t, int64_t batch);
// S per group rounded to the compute type's operands: float32 [groups].
at::Tensor PackedScale(const TernaryView& t, bool bf16);
// y = x @ (S T)^T, float32 [batch, rows] (values rounded to bfloat16 in BF16, as its GEMM writes).
at::Tensor PackedLinear(const TernaryView& t, const at::Tensor& scale, const at::Tensor& x,
                        bool bf16);
// g @ (S T), float32 [batch, cols] (rounded to bfloat16 in BF16).
at::Tensor PackedInputGradient(const TernaryView& t, const at::Tensor& scale, const at::Tensor& g,
                               bool bf16);
// Per-group scores of the weight gradient g^T x (g [batch, rows], x [batch, cols]) without forming
// it: the sign of each weight's gradient summed over the batch (float32, in batch order, of the
// rounded factors), times T, summed per group, as int64 [groups].
at::Tensor FactorScores(const TernaryView& t, const at::Tensor& g, const at::Tensor& x, bool bf16);
// The scores of one sample's weight gradient (g [1, rows], x [1, cols]) in float32, the FP32
// compute type's (the kernel of FactorScores, the layouts PackedRouteServes takes at batch 1):
// each gradient is the one product g[r] x[c], rounded once as the FP32 GEMM rounds it. `exact`, a
// 0-dim bool on the device, is false where a nonzero factor is subnormal or a nonzero product
// is below 2^-125 (then a GEMM's handling of subnormals could give another sign).
struct SampleScores {
  at::Tensor scores;
  at::Tensor exact;
};
SampleScores Float32SampleScores(const TernaryView& t, const at::Tensor& g, const at::Tensor& x);

}  // namespace tscale::cuda

#endif  // TSCALE_SERVER_CUDA_KERNELS_H_
