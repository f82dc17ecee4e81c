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
  // == 0: log2 S = E.
  bool scaled;
  float inv_denom;
  int64_t rows, cols, group_size;
};

// `scale`: float [groups] of scratch for S per group.
cudaError_t LaunchEffectiveWeight(const TernaryArgs& t, Element out_type, void* out, float* scale,
                                  cudaStream_t stream);

// grad element (r, c) at grad + r * stride_row + c * stride_col; scores int64 [rows * groups/row].
cudaError_t LaunchScores(const TernaryArgs& t, Element grad_type, const void* grad,
                         int64_t stride_row, int64_t stride_col, int64_t* scores,
                         cudaStream_t stream);

}  // namespace tscale::cuda::detail

#endif  // TSCALE_SERVER_CUDA_LAUNCH_H_
