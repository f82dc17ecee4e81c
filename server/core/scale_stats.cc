#include "server/core/scale_stats.h"

#include <algorithm>

#include <ATen/ATen.h>

namespace tscale::core {

const std::vector<double>& DriftBucketUpper() {
  static const std::vector<double>* const kBounds = new std::vector<double>{
      -4 * kSaturatedRatio, -3, -2, -1, -0.5, -0.25, -0.125, 0,
      0.125, 0.25, 0.5, 1, 2, 3, 4 * kSaturatedRatio};
  return *kBounds;
}

LayerScaleStats ComputeScaleStats(const std::string& layer, const at::Tensor& corr_accum,
                                  const at::Tensor& e, int64_t step, int64_t group_size,
                                  bool per_group) {
  LayerScaleStats out;
  out.layer = layer;
  out.groups = corr_accum.numel();
  const std::vector<double>& bounds = DriftBucketUpper();
  const double denom = static_cast<double>(std::max<int64_t>(step * group_size, 1));
  const at::Tensor ratio = step > 0 ? corr_accum.to(at::kDouble) / denom
                                    : at::zeros({out.groups}, corr_accum.options().dtype(at::kDouble));
  const at::Tensor drift = ratio * 4.0;
  const at::Tensor boundaries =
      at::tensor(bounds, at::TensorOptions(at::kDouble)).to(drift.device());
  const at::Tensor counts =
      at::bincount(at::bucketize(drift, boundaries), /*weights=*/{},
                   static_cast<int64_t>(bounds.size()) + 1);
  // Everything in one double vector, so that one copy brings it to the host.
  const at::Tensor summary =
      at::cat({at::stack({drift.mean(), drift.min(), drift.max(), drift.abs().mean(),
                          (ratio.abs() >= kSaturatedRatio).to(at::kDouble).mean()}),
               counts.to(at::kDouble)})
          .to(at::kCPU)
          .contiguous();
  const double* v = summary.data_ptr<double>();
  out.drift_mean = v[0];
  out.drift_min = v[1];
  out.drift_max = v[2];
  out.drift_abs_mean = v[3];
  out.saturated_fraction = v[4];
  for (size_t i = 0; i <= bounds.size(); ++i) {
    out.bucket_count.push_back(static_cast<int64_t>(v[5 + i]));
  }
  if (per_group) {
    at::Tensor log2_scale = e.to(at::kFloat);
    if (step > 0) log2_scale = log2_scale + (corr_accum.to(at::kFloat) / denom) * 4.0;
    out.log2_scale = log2_scale.to(at::kCPU).contiguous();
  }
  return out;
}

}  // namespace tscale::core
