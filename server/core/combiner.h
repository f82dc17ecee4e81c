// How a model's update is combined with those of its replicas. A replica group
// (server/group) implements UpdateCombiner over its process group; the core
// calls it at the one point of an update where every rank must meet, and knows
// nothing of how the ranks talk.
#ifndef TSCALE_SERVER_CORE_COMBINER_H_
#define TSCALE_SERVER_CORE_COMBINER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/core/layers.h"

namespace tscale::core {

class UpdateCombiner {
 public:
  virtual ~UpdateCombiner() = default;

  // What this rank brings to an update.
  struct Local {
    // Per ternary linear layer, in order: this rank's float32 sum of weight
    // gradients [out, in] on the model's device, or undefined when it has none
    // (zeros).
    std::vector<at::Tensor> grad_sums;
    // The layers' states (the trits the scores take), in the same order.
    std::vector<const TernaryState*> states;
    // This rank's share of the group's loss (TrainStep: its mean loss times its
    // part of the group's batch); 0 for UpdateCorrelation.
    double loss = 0;
    // TrainStep: the fingerprint of this rank's request (what tells its retry from
    // another request); 0 for UpdateCorrelation.
    uint64_t fingerprint = 0;
    // This rank's verdict: OK to commit, or why it cannot (a loss that is not
    // finite, a request cancelled or past its deadline). Every rank calls
    // Combine even when this is not OK.
    absl::Status status;
  };
  struct Combined {
    // Per layer: the scores of the group's summed gradient, int64 [groups] on
    // the model's device, the same on every rank.
    std::vector<at::Tensor> scores;
    double loss = 0;  // the group's loss: the sum of the ranks' shares, in rank order
    std::vector<uint64_t> fingerprints;  // every rank's Local::fingerprint, in rank order
  };

  // Every rank's verdict first: when one is not OK, every rank returns an error
  // (this rank's own, or one that names the rank that refused) and no rank
  // commits. Then the group's scores. An error here leaves the model as it was;
  // after OK the update must commit.
  virtual absl::StatusOr<Combined> Combine(Local local) = 0;
};

// A TrainStep taken by one rank of a group: this rank's batch is a part of
// `group_batch` rows, its loss gradient is its share of the group's mean, and
// the update goes through `combiner`.
struct GroupStep {
  UpdateCombiner* combiner = nullptr;
  int64_t group_batch = 0;
};

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_COMBINER_H_
