#include "server/metrics/metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <system_error>
#include <vector>

#include <c10/util/Exception.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "server/core/device.h"
#include "server/core/scale_stats.h"

namespace tscale::metrics {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

// RPC latency: from 100 us to a minute.
const prometheus::Histogram::BucketBoundaries& RpcBuckets() {
  static const auto* const kBuckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
      0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
  return *kBuckets;
}

// The API's methods, for the series created before their first event.
constexpr const char* kMethods[] = {
    "CreateModel",       "GetModel",    "ListModels",    "DeleteModel",     "Forward",
    "Backward",          "ReleasePasses", "UpdateCorrelation", "TrainStep", "SaveCheckpoint",
    "ListCheckpoints",   "RestoreCheckpoint", "ExportState", "ImportState", "GetScaleStats",
    "GetServerInfo"};

const prometheus::Histogram::BucketBoundaries& CheckpointBuckets() {
  static const auto* const kBuckets = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300};
  return *kBuckets;
}

std::string CodeName(absl::StatusCode code) {
  // gRPC's names (OK, INVALID_ARGUMENT, ...), as operators know them.
  std::string name = absl::StatusCodeToString(code);
  for (char& c : name) c = c == ' ' ? '_' : static_cast<char>(std::toupper(c));
  return name;
}

ClientMetric Gauge(std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  return m;
}

MetricFamily Family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

// The standard process_* series (the names Prometheus's client libraries use), read from /proc
// at each scrape; a series whose source cannot be read is left out.
std::vector<MetricFamily> ProcessFamilies() {
  std::vector<MetricFamily> out;
  auto add = [&out](const char* name, const char* help, MetricType type, double value) {
    MetricFamily f = Family(name, help, type);
    ClientMetric m;
    if (type == MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    f.metric.push_back(m);
    out.push_back(std::move(f));
  };
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  // Fields after the command, which is in parentheses and may hold spaces.
  const size_t close = stat.rfind(')');
  if (close != std::string::npos) {
    std::vector<std::string> f = absl::StrSplit(stat.substr(close + 2), ' ', absl::SkipEmpty());
    // f[0] is field 3 (state): utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    double utime = 0, stime = 0, start = 0, vsize = 0, rss = 0;
    if (f.size() > 21 && absl::SimpleAtod(f[11], &utime) && absl::SimpleAtod(f[12], &stime) &&
        absl::SimpleAtod(f[19], &start) && absl::SimpleAtod(f[20], &vsize) &&
        absl::SimpleAtod(f[21], &rss)) {
      add("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
          MetricType::Counter, (utime + stime) / ticks);
      add("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge,
          vsize);
      add("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge,
          rss * page);
      std::ifstream uptime_file("/proc/stat");
      std::string line;
      while (std::getline(uptime_file, line)) {
        double boot = 0;
        if (absl::StartsWith(line, "btime ") && absl::SimpleAtod(line.substr(6), &boot)) {
          add("process_start_time_seconds",
              "Start time of the process since unix epoch in seconds.", MetricType::Gauge,
              boot + start / ticks);
          break;
        }
      }
    }
  }
  std::error_code ec;
  int64_t fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++fds;
  }
  if (!ec) add("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, fds);
  rlimit limit = {};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    add("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge,
        static_cast<double>(limit.rlim_cur));
  }
  return out;
}

}  // namespace

// The per-model series, computed at each scrape from the models themselves, so that a deleted
// model's series disappear with it.
class Metrics::ModelCollector : public prometheus::Collectable {
 public:
  ModelCollector(const core::ModelRegistry* models, MetricsOptions options)
      : models_(models), options_(options) {}

  std::vector<MetricFamily> Collect() const override {
    const auto start = std::chrono::steady_clock::now();
    // The drift's distribution at this scrape, as gauges in the histogram's series layout
    // (_bucket with le, _sum, _count): a snapshot of the state, not a count of events, so it
    // goes up and down and rate() over it means nothing. histogram_quantile() reads it as it
    // reads a histogram's buckets.
    constexpr char kSnapshot[] =
        " at this scrape: a snapshot of the layer's groups now, not a cumulative count (gauges; "
        "never rate() them). Learning layers only: RMSNorm layers are frozen, their drift stays "
        "0 (tscale stats lists them)";
    MetricFamily drift_bucket =
        Family("tscale_layer_scale_drift_bucket",
               absl::StrCat("Groups of a layer whose scale drift log2 S - E is at most le",
                            kSnapshot),
               MetricType::Gauge);
    MetricFamily drift_sum = Family(
        "tscale_layer_scale_drift_sum",
        absl::StrCat("Sum over a layer's groups of their scale drift log2 S - E", kSnapshot),
        MetricType::Gauge);
    MetricFamily drift_count =
        Family("tscale_layer_scale_drift_count",
               absl::StrCat("Groups of a layer (the drift's +Inf bucket)", kSnapshot),
               MetricType::Gauge);
    MetricFamily saturated =
        Family("tscale_layer_saturated_ratio",
               "Fraction of a layer's groups whose |drift| is within 1% of the rule's limit of 4",
               MetricType::Gauge);
    MetricFamily step = Family("tscale_model_step", "Completed correlation updates of a model",
                               MetricType::Gauge);
    MetricFamily passes = Family("tscale_model_pending_passes",
                                 "Training passes awaiting Backward", MetricType::Gauge);
    MetricFamily pending_bytes = Family("tscale_model_pending_bytes",
                                        "Activation bytes held by pending passes",
                                        MetricType::Gauge);
    MetricFamily persistent = Family("tscale_model_persistent_bytes",
                                     "Bytes of the model's all-integer persistent state",
                                     MetricType::Gauge);
    MetricFamily device = Family("tscale_model_device_bytes",
                                 "Bytes the model holds on its device now", MetricType::Gauge);
    MetricFamily info = Family("tscale_model_info", "A model's device and compute type",
                               MetricType::Gauge);
    MetricFamily count = Family("tscale_models", "Models held by the server", MetricType::Gauge);

    const auto models = models_->List();
    int64_t omitted = 0;
    for (const auto& [id, model] : models) {
      const std::string device_name = core::DeviceName(model->device());
      step.metric.push_back(Gauge({{"model", id}}, static_cast<double>(model->step())));
      passes.metric.push_back(
          Gauge({{"model", id}}, static_cast<double>(model->pending_passes())));
      pending_bytes.metric.push_back(
          Gauge({{"model", id}}, static_cast<double>(model->pending_bytes())));
      persistent.metric.push_back(
          Gauge({{"model", id}}, static_cast<double>(model->persistent_bytes())));
      device.metric.push_back(Gauge({{"device", device_name}, {"model", id}},
                                    static_cast<double>(model->device_bytes())));
      info.metric.push_back(Gauge({{"compute", std::string(core::ComputeName(model->compute()))},
                                   {"device", device_name},
                                   {"model", id}},
                                  1));
      core::ModelScaleStats stats;
      try {
        stats = model->ScaleStats(/*per_group=*/false);
      } catch (const c10::Error&) {
        // E.g. no device memory for the statistics: this scrape goes without them, counted.
        omitted += static_cast<int64_t>(model->summary().stateful_layers.size());
        continue;
      }
      int64_t shown = 0;
      for (const core::LayerScaleStats& l : stats.layers) {
        if (l.frozen) continue;
        if (shown == options_.max_layers_per_model) {
          ++omitted;
          continue;
        }
        ++shown;
        const std::vector<ClientMetric::Label> labels = {{"layer", l.layer}, {"model", id}};
        drift_count.metric.push_back(Gauge(labels, static_cast<double>(l.groups)));
        drift_sum.metric.push_back(Gauge(labels, l.drift_mean * static_cast<double>(l.groups)));
        const std::vector<double>& bounds = core::DriftBucketUpper();
        int64_t cumulative = 0;
        for (size_t b = 0; b <= bounds.size(); ++b) {
          cumulative += l.bucket_count[b];
          std::vector<ClientMetric::Label> with_le = labels;
          with_le.push_back({"le", b < bounds.size() ? absl::StrCat(bounds[b]) : "+Inf"});
          drift_bucket.metric.push_back(Gauge(std::move(with_le), static_cast<double>(cumulative)));
        }
        saturated.metric.push_back(Gauge(labels, l.saturated_fraction));
      }
    }
    count.metric.push_back(Gauge({}, static_cast<double>(models.size())));
    omitted_total_ += omitted;
    MetricFamily omitted_now = Family(
        "tscale_metrics_layers_omitted",
        "Layers left out of the drift series at this scrape (--metrics-max-layers)",
        MetricType::Gauge);
    omitted_now.metric.push_back(Gauge({}, static_cast<double>(omitted)));

    MetricFamily omitted_family =
        Family("tscale_metrics_layers_omitted_total",
               "Layer series left out by the per-model cap (--metrics-max-layers), summed over "
               "scrapes",
               MetricType::Counter);
    ClientMetric omitted_metric;
    omitted_metric.counter.value = static_cast<double>(omitted_total_.load());
    omitted_family.metric.push_back(omitted_metric);
    MetricFamily duration = Family("tscale_metrics_collect_duration_seconds",
                                   "Time the last scrape took to compute the models' series",
                                   MetricType::Gauge);
    duration.metric.push_back(Gauge(
        {}, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()));
    std::vector<MetricFamily> out = {drift_bucket, drift_sum,     drift_count, saturated,
                                     step,         passes,        pending_bytes, persistent,
                                     device,       info,          count,       omitted_family,
                                     omitted_now,  duration};
    for (MetricFamily& f : ProcessFamilies()) out.push_back(std::move(f));
    return out;
  }

 private:
  const core::ModelRegistry* const models_;
  const MetricsOptions options_;
  mutable std::atomic<int64_t> omitted_total_{0};
};

Metrics::Metrics(const core::ModelRegistry* models, MetricsOptions options, std::string version)
    : models_(models),
      options_(options),
      registry_(std::make_shared<prometheus::Registry>()),
      collector_(std::make_shared<ModelCollector>(models, options)) {
  rpc_duration_ = &prometheus::BuildHistogram()
                       .Name("tscale_rpc_duration_seconds")
                       .Help("Duration of API calls, by method and status code")
                       .Register(*registry_);
  rpc_errors_ = &prometheus::BuildCounter()
                     .Name("tscale_rpc_errors_total")
                     .Help("API calls that failed, by method and status code")
                     .Register(*registry_);
  updates_ = &prometheus::BuildCounter()
                  .Name("tscale_updates_total")
                  .Help("Correlation updates applied, by model and source")
                  .Register(*registry_);
  replayed_ = &prometheus::BuildCounter()
                   .Name("tscale_updates_replayed_total")
                   .Help("Update requests answered with the update already applied")
                   .Register(*registry_);
  checkpoint_duration_ = &prometheus::BuildHistogram()
                              .Name("tscale_checkpoint_duration_seconds")
                              .Help("Duration of checkpoint saves and restores")
                              .Register(*registry_);
  checkpoint_failures_ = &prometheus::BuildCounter()
                              .Name("tscale_checkpoint_failures_total")
                              .Help("Checkpoint saves and restores that failed")
                              .Register(*registry_);
  checkpoint_last_success_ = &prometheus::BuildGauge()
                                  .Name("tscale_checkpoint_last_success_timestamp_seconds")
                                  .Help("When a model's last checkpoint was written (Unix time)")
                                  .Register(*registry_);
  prometheus::BuildGauge()
      .Name("tscale_build_info")
      .Help("The server's version")
      .Register(*registry_)
      .Add({{"version", std::move(version)}})
      .Set(1);
  // Present from the start, so that rates and alerts see a zero rather than nothing.
  for (const char* op : {"save", "restore"}) {
    checkpoint_failures_->Add({{"operation", op}});
    checkpoint_duration_->Add({{"operation", op}}, CheckpointBuckets());
  }
  for (const char* method : kMethods) {
    for (absl::StatusCode code : {absl::StatusCode::kInternal, absl::StatusCode::kUnknown,
                                  absl::StatusCode::kUnavailable, absl::StatusCode::kDataLoss}) {
      rpc_errors_->Add({{"code", CodeName(code)}, {"method", method}});
    }
  }
}



Metrics::~Metrics() = default;

void Metrics::EnableGroup(int size, int rank) {
  group_ = &prometheus::BuildGauge()
                .Name("tscale_group")
                .Help("Replica group: size (servers in the group), rank (this server's) and "
                      "formed (1 while the group's process group is formed, else 0)")
                .Register(*registry_);
  group_->Add({{"field", "size"}}).Set(size);
  group_->Add({{"field", "rank"}}).Set(rank);
  group_->Add({{"field", "formed"}}).Set(0);
  group_exchange_ = &prometheus::BuildHistogram()
                         .Name("tscale_group_exchange_seconds")
                         .Help("Time of one update's exchange across the replica group (the "
                               "vote, the reduce-scatter of gradients, the gather of scores)")
                         .Register(*registry_);
  group_exchange_->Add({}, RpcBuckets());
  group_bytes_ = &prometheus::BuildCounter()
                      .Name("tscale_group_exchange_bytes_total")
                      .Help("Bytes this rank sent in the updates' exchanges")
                      .Register(*registry_);
  group_bytes_->Add({});
  group_failures_ = &prometheus::BuildCounter()
                         .Name("tscale_group_call_failures_total")
                         .Help("Group calls that failed because of the group, by reason: "
                               "mismatch (the ranks' calls differ), refused (another rank "
                               "refused its part), unavailable (not formed, or a collective "
                               "failed)")
                         .Register(*registry_);
  for (const char* reason : {"mismatch", "refused", "unavailable"}) {
    group_failures_->Add({{"reason", reason}});
  }
  group_formations_ = &prometheus::BuildCounter()
                           .Name("tscale_group_formations_total")
                           .Help("Times the group formed: the first, and every re-formation "
                                 "after a member failed or came back")
                           .Register(*registry_);
  group_formations_->Add({});
  group_sync_seconds_ = &prometheus::BuildGauge()
                             .Name("tscale_group_sync_seconds")
                             .Help("Time the last formation took to bring the ranks' models in "
                                   "line (inventories, and state sent to a returning member)")
                             .Register(*registry_);
  group_sync_seconds_->Add({});
  group_sync_bytes_ = &prometheus::BuildCounter()
                           .Name("tscale_group_sync_bytes_total")
                           .Help("State bytes this rank received from a peer when the group "
                                 "formed (a member brought forward)")
                           .Register(*registry_);
  group_sync_bytes_->Add({});
}

void Metrics::ObserveGroupSync(double seconds, int64_t bytes_received) {
  if (group_sync_seconds_ == nullptr) return;
  group_sync_seconds_->Add({}).Set(seconds);
  group_sync_bytes_->Add({}).Increment(static_cast<double>(bytes_received));
}

void Metrics::SetGroupFormed(bool formed) {
  if (group_ == nullptr) return;
  group_->Add({{"field", "formed"}}).Set(formed ? 1 : 0);
  if (formed) group_formations_->Add({}).Increment();
}

void Metrics::ObserveGroupExchange(double seconds, int64_t bytes_sent) {
  if (group_exchange_ == nullptr) return;
  group_exchange_->Add({}, RpcBuckets()).Observe(seconds);
  group_bytes_->Add({}).Increment(static_cast<double>(bytes_sent));
}

void Metrics::CountGroupFailure(absl::string_view reason) {
  if (group_failures_ != nullptr) group_failures_->Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::ObserveRpc(absl::string_view method, absl::StatusCode code, double seconds) {
  const std::string code_name = CodeName(code);
  rpc_duration_->Add({{"code", code_name}, {"method", std::string(method)}}, RpcBuckets())
      .Observe(seconds);
  if (code != absl::StatusCode::kOk) {
    rpc_errors_->Add({{"code", code_name}, {"method", std::string(method)}}).Increment();
  }
}

void Metrics::CountUpdate(const std::string& model, bool train_step, bool replayed) {
  if (replayed) {
    replayed_->Add({{"model", model}}).Increment();
    return;
  }
  updates_->Add({{"model", model}, {"source", train_step ? "train_step" : "update_correlation"}})
      .Increment();
}

void Metrics::ObserveCheckpoint(absl::string_view operation, const std::string& model, bool ok,
                                double seconds) {
  const std::string op(operation);
  if (seconds >= 0) {
    checkpoint_duration_->Add({{"operation", op}}, CheckpointBuckets()).Observe(seconds);
  }
  if (!ok) {
    checkpoint_failures_->Add({{"operation", op}}).Increment();
  } else if (op == "save") {
    checkpoint_last_success_->Add({{"model", model}})
        .Set(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()));
  }
}

void Metrics::ForgetModel(const std::string& model) {
  for (const char* source : {"train_step", "update_correlation"}) {
    auto& c = updates_->Add({{"model", model}, {"source", source}});
    updates_->Remove(&c);
  }
  replayed_->Remove(&replayed_->Add({{"model", model}}));
  checkpoint_last_success_->Remove(&checkpoint_last_success_->Add({{"model", model}}));
}

std::string Metrics::Scrape() {
  // Each model's counters exist from its first scrape, at zero until their first event.
  for (const auto& [id, model] : models_->List()) {
    for (const char* source : {"train_step", "update_correlation"}) {
      updates_->Add({{"model", id}, {"source", source}});
    }
    replayed_->Add({{"model", id}});
  }
  std::vector<MetricFamily> families = registry_->Collect();
  std::vector<MetricFamily> models = collector_->Collect();
  families.insert(families.end(), std::make_move_iterator(models.begin()),
                  std::make_move_iterator(models.end()));
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

}  // namespace tscale::metrics
