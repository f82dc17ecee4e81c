// The server's Prometheus metrics (docs/metrics.md). Names are a contract for dashboards:
//   tscale_layer_scale_drift{model,layer}            histogram over a layer's groups of log2 S - E,
//                                                     computed at scrape time (_count = groups)
//   tscale_layer_saturated_ratio{model,layer}        fraction of groups with |drift| >= 3.96
//   tscale_model_step{model}                         completed correlation updates
//   tscale_model_pending_passes{model}, tscale_model_pending_bytes{model}
//   tscale_model_persistent_bytes{model}             the all-integer state
//   tscale_model_device_bytes{model,device}          what the model holds on its device now
//   tscale_model_info{model,device,compute}          1
//   tscale_models                                    models held
//   tscale_updates_total{model,source}               updates applied (source: update_correlation,
//                                                     train_step); tscale_updates_replayed_total{model}
//   tscale_rpc_duration_seconds{method,code}         histogram of every call
//   tscale_rpc_errors_total{method,code}             calls that failed, by code
//   tscale_checkpoint_duration_seconds{operation}    histogram (save, restore)
//   tscale_checkpoint_failures_total{operation}
//   tscale_checkpoint_last_success_timestamp_seconds{model}
//   tscale_metrics_layers_omitted                    layers left out of the drift series now, by
//                                                     --metrics-max-layers (or a failed computation)
//   tscale_metrics_layers_omitted_total              the same, summed over scrapes
//   tscale_metrics_collect_duration_seconds          the last scrape's collection time
//   tscale_build_info{version}                       1
// Drift series cover the layers that learn (ternary linear); RMSNorm layers are frozen, their
// drift 0 by construction. Counters are created at zero before their first event (per model at
// each scrape, per method for the server-side error codes), so rate() sees every event.
// There is never a label per group: a layer's groups are summarised by its histogram.
#ifndef TSCALE_SERVER_METRICS_METRICS_H_
#define TSCALE_SERVER_METRICS_METRICS_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/core/registry.h"

namespace prometheus {
class Registry;
template <typename T>
class Family;
class Counter;
class Histogram;
class Gauge;
}  // namespace prometheus

namespace tscale::metrics {

struct MetricsOptions {
  // Per model, the layers whose drift series are exported; the rest are counted as omitted.
  int max_layers_per_model = 64;
};

class Metrics {
 public:
  Metrics(const core::ModelRegistry* models, MetricsOptions options, std::string version);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished call: its method (e.g. "Forward"), status and duration.
  void ObserveRpc(absl::string_view method, absl::StatusCode code, double seconds);
  // An update that applied (or was replayed).
  void CountUpdate(const std::string& model, bool train_step, bool replayed);
  // A checkpoint save or restore; seconds < 0 for a failure that took no time of its own (an
  // automatic save dropped, a damaged file skipped), which is counted but not timed.
  void ObserveCheckpoint(absl::string_view operation, const std::string& model, bool ok,
                         double seconds);
  // A model is gone: its own series go with it.
  void ForgetModel(const std::string& model);

  // Replica groups: this server is rank `rank` of a group of `size` (the group's series exist
  // from then on); the group is formed or not; one update's exchange (its time and the bytes this
  // rank sent); a group call that failed because of the group ("mismatch", "refused",
  // "unavailable").
  void EnableGroup(int size, int rank);
  void SetGroupFormed(bool formed);
  void ObserveGroupExchange(double seconds, int64_t bytes_sent);
  // The group formed and its ranks were brought in line: the time that took and the state bytes
  // this rank received from a peer.
  void ObserveGroupSync(double seconds, int64_t bytes_received);
  void CountGroupFailure(absl::string_view reason);

  // The text exposition format (version 0.0.4) of every metric, the models' computed now.
  std::string Scrape();

 private:
  class ModelCollector;

  const core::ModelRegistry* const models_;
  const MetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<ModelCollector> collector_;
  prometheus::Family<prometheus::Histogram>* rpc_duration_;
  prometheus::Family<prometheus::Counter>* rpc_errors_;
  prometheus::Family<prometheus::Counter>* updates_;
  prometheus::Family<prometheus::Counter>* replayed_;
  prometheus::Family<prometheus::Histogram>* checkpoint_duration_;
  prometheus::Family<prometheus::Counter>* checkpoint_failures_;
  prometheus::Family<prometheus::Gauge>* checkpoint_last_success_;
  prometheus::Family<prometheus::Gauge>* group_ = nullptr;
  prometheus::Family<prometheus::Histogram>* group_exchange_ = nullptr;
  prometheus::Family<prometheus::Counter>* group_bytes_ = nullptr;
  prometheus::Family<prometheus::Counter>* group_failures_ = nullptr;
  prometheus::Family<prometheus::Counter>* group_formations_ = nullptr;
  prometheus::Family<prometheus::Gauge>* group_sync_seconds_ = nullptr;
  prometheus::Family<prometheus::Counter>* group_sync_bytes_ = nullptr;
};

}  // namespace tscale::metrics

#endif  // TSCALE_SERVER_METRICS_METRICS_H_
