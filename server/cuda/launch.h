// Raw launchers of the kernels in kernels.cu: device pointers and a stream, no LibTorch types, so
// that nvcc compiles no LibTorch header. Used by kernels.cc only.
#ifndef TSCALE_SERVER_CUDA_LAUNCH_H_
#define TSCALE_SERVER_CUDA_LAUNCH_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tscale::cuda::detail {

enum class Element { kFloat32, kBFloat16 };

struct TernaryArgs {
  const uint8_t* packed;
  const int8_t* e;
  const int64_t* corr_accum;
  // step > 0: log2 S = E + (corr_accum * inv_denom) * 4, inv_denom = 1 / (float)(step * gs); step
  // == 0: log2 S = E. With inv_denom_at, inv_denom is read there (device memory) when the kernel
  // runs: a captured CUDA graph then serves every later step (see StepGraph).
  bool scaled;
  float inv_denom;
  const float* inv_denom_at;
  int64_t rows, cols, group_size;
};

// `scale`: float [groups] of scratch for S per group.
cudaError_t LaunchEffectiveWeight(const TernaryArgs& t, Element out_type, void* out, float* scale,
                                  cudaStream_t stream);

// grad element (r, c) at grad + r * stride_row + c * stride_col; scores int64 [rows * groups/row].
cudaError_t LaunchScores(const TernaryArgs& t, Element grad_type, const void* grad,
                         int64_t stride_row, int64_t stride_col, int64_t* scores,
                         cudaStream_t stream);

// The packed route of small batches (kernels.cu, "Packed trits"): no w_eff, no [rows, cols]
// gradient. Operands are rounded as the compute type rounds them: bfloat16 (also the outputs of
// the forward and the input gradient, as a bfloat16 GEMM writes them) or TF32. kNone (float32 as
// it is) serves only the scores of one sample in FP32 (LaunchFactorScores).
enum class Rounding { kBFloat16, kTf32, kNone };

// The largest batch of the packed route, and the group sizes it takes: multiples of 32.
inline constexpr int64_t kMaxPackedBatch = 16;

struct PackedArgs {
  const uint8_t* packed;
  const float* scale;  // S per group, already rounded (LaunchScale)
  int64_t rows, cols, group_size;
  int batch;
  Rounding rounding;
};

// S per group into `scale` (float [groups]), rounded to the compute type's operand format.
cudaError_t LaunchScale(const TernaryArgs& t, Rounding rounding, float* scale,
                        cudaStream_t stream);

// y [batch, rows] = x [batch, cols] @ (S T)^T; x and y contiguous float32; `partial` is scratch
// of PackedLinearScratch(p) floats (none when it returns 0).
int64_t PackedLinearScratch(const PackedArgs& p);
cudaError_t LaunchPackedLinear(const PackedArgs& p, const float* x, float* y, float* partial,
                               cudaStream_t stream);

// grad_x [batch, cols] = g [batch, rows] @ (S T); `partial` is scratch of
// PackedInputGradientScratch(p) floats (none when it returns 0).
int64_t PackedInputGradientScratch(const PackedArgs& p);
cudaError_t LaunchPackedInputGradient(const PackedArgs& p, const float* g, float* grad_x,
                                      float* partial, cudaStream_t stream);

// Per-group scores of the weight gradient g^T x without forming it: for each weight, the sign of
// sum over the batch of g[b, r] x[b, c] (rounded operands, float32 sums in batch order), times
// T[r, c], summed over the group: int64 [rows * groups per row]. With Rounding::kNone (batch 1
// only), each gradient is the one float32 product g[r] x[c], rounded once as a GEMM rounds it,
// and `exact` (one bool, true before the launch) is set false where a nonzero factor is
// subnormal or a nonzero product is below 2^-125 (TernaryLinear::ScoresOfSample's bound);
// `exact` is unused otherwise.
cudaError_t LaunchFactorScores(const PackedArgs& p, const float* g, const float* x,
                               int64_t* scores, bool* exact, cudaStream_t stream);

}  // namespace tscale::cuda::detail

#endif  // TSCALE_SERVER_CUDA_LAUNCH_H_
