// Statistics of the per-group scale drift of a ternary layer, drift = log2 S - E
// = 4 corr_accum / (step * group_size): what GetScaleStats returns and the metrics export.
#ifndef TSCALE_SERVER_CORE_SCALE_STATS_H_
#define TSCALE_SERVER_CORE_SCALE_STATS_H_

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace tscale::core {

// A group is saturated when |corr_accum / (step * group_size)| >= this: its drift is within 1% of
// the ±4 that the update rule can reach.
inline constexpr double kSaturatedRatio = 0.99;

// Upper bounds (inclusive, as Prometheus's `le`) of the drift histogram's buckets, ascending; a
// last bucket above the largest bound (+Inf) follows. The outermost bounds are ±4 * kSaturatedRatio,
// so the first and last buckets count the saturated groups.
const std::vector<double>& DriftBucketUpper();

struct LayerScaleStats {
  std::string layer;  // full name
  bool frozen = false;  // a layer nothing updates (RMSNorm): its drift is 0 by construction
  int64_t groups = 0;
  double drift_mean = 0, drift_min = 0, drift_max = 0, drift_abs_mean = 0;
  double saturated_fraction = 0;
  std::vector<int64_t> bucket_count;  // DriftBucketUpper().size() + 1 counts, not cumulative
  at::Tensor log2_scale;              // float32 [groups] on the CPU, when asked for
};

// The statistics of one layer from copies of its corr_accum (int64 [groups], any device) and E
// (int8 [groups]) at `step` (its step_counter), computed on their device with one transfer to the
// host. log2_scale, when asked, is computed as the forward computes it.
LayerScaleStats ComputeScaleStats(const std::string& layer, const at::Tensor& corr_accum,
                                  const at::Tensor& e, int64_t step, int64_t group_size,
                                  bool per_group);

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_SCALE_STATS_H_
