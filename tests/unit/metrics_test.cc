// The Prometheus metrics: exact drift buckets of a known state, the per-model cap, the call,
// update and checkpoint series, and the HTTP exposer.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "server/core/model.h"
#include "server/core/registry.h"
#include "server/metrics/http_exposer.h"
#include "server/metrics/metrics.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::StatusIs;


// Sample lines of the exposition, "name{labels}" -> value.
std::map<std::string, std::string> Samples(const std::string& text) {
  std::map<std::string, std::string> out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    out[std::string(line.substr(0, space))] = std::string(line.substr(space + 1));
  }
  return out;
}

core::ModelSpec OneLayer() {
  auto spec = core::SpecFromJson(
      R"({"layers": [{"name": "fc", "ternary_linear": {"in_features": 64, "out_features": 2}}]})");
  EXPECT_TRUE(spec.ok());
  return *spec;
}

// fc: 2 rows x 64 columns, groups of 32, at step 4: corr_accum -128, 0, 20, 127 gives drift
// -4, 0, 0.625, 3.96875.
std::shared_ptr<core::Model> KnownModel() {
  auto fresh = core::Model::Create(OneLayer(), 1, testing::TestDevice());
  EXPECT_TRUE(fresh.ok());
  core::StateDict state = (*fresh)->ExportState().tensors;
  state["fc.corr_accum"] = at::tensor({-128, 0, 20, 127}, at::kLong);
  state["fc.step_counter"] = at::tensor({4}, at::kLong);
  auto m = core::Model::Import(OneLayer(), state, std::nullopt, testing::TestDevice());
  EXPECT_TRUE(m.ok()) << m.status();
  return *std::move(m);
}

TEST(MetricsTest, ExactDriftBucketsOfAKnownState) {
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", KnownModel()).ok());
  metrics::Metrics metrics(&registry, {}, "1.2.3");
  auto s = Samples(metrics.Scrape());
  const std::string l = R"(layer="fc",model="m")";
  auto bucket = [&](const std::string& le) {
    return s["tscale_layer_scale_drift_bucket{" + l + ",le=\"" + le + "\"}"];
  };
  // Cumulative: -4 <= -3.96; 0 <= 0; 0.625 <= 1; 3.96875 only in +Inf.
  EXPECT_EQ(bucket("-3.96"), "1");
  EXPECT_EQ(bucket("-3"), "1");
  EXPECT_EQ(bucket("-0.125"), "1");
  EXPECT_EQ(bucket("0"), "2");
  EXPECT_EQ(bucket("0.5"), "2");
  EXPECT_EQ(bucket("1"), "3");
  EXPECT_EQ(bucket("3.96"), "3");
  EXPECT_EQ(bucket("+Inf"), "4");
  EXPECT_EQ(s["tscale_layer_scale_drift_count{" + l + "}"], "4");
  EXPECT_EQ(std::stod(s["tscale_layer_scale_drift_sum{" + l + "}"]), 0.59375);
  EXPECT_EQ(s["tscale_layer_saturated_ratio{" + l + "}"], "0.5");
  EXPECT_EQ(s[R"(tscale_model_step{model="m"})"], "4");
  EXPECT_EQ(s[R"(tscale_model_pending_passes{model="m"})"], "0");
  const std::string device = testing::TestDeviceName();
  EXPECT_EQ(s[R"(tscale_model_info{compute="COMPUTE_FP32",device=")" + device + R"(",model="m"})"],
            "1");
  EXPECT_EQ(s["tscale_models"], "1");
  EXPECT_EQ(s[R"(tscale_build_info{version="1.2.3"})"], "1");
  // Device bytes: the trits (128 decoded on the CPU; on CUDA 26 packed bytes, which the kernels
  // read), 4 E, 4 corr_accum of 8 bytes; no w_eff computed yet.
  const bool packed = device != "cpu";
  EXPECT_EQ(s[R"(tscale_model_device_bytes{device=")" + device + R"(",model="m"})"],
            packed ? "62" : "164");
  EXPECT_EQ(s[R"(tscale_model_persistent_bytes{model="m"})"],
            std::to_string(registry.Get("m").value()->persistent_bytes()));
}

TEST(MetricsTest, DriftIsASnapshotOfGaugesAndSaysSo) {
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", KnownModel()).ok());
  metrics::Metrics metrics(&registry, {}, "1.2.3");
  const std::string text = metrics.Scrape();
  // Not a histogram: its buckets are the groups now, not events counted since the start.
  for (const char* name : {"tscale_layer_scale_drift_bucket", "tscale_layer_scale_drift_sum",
                           "tscale_layer_scale_drift_count"}) {
    EXPECT_THAT(text, HasSubstr(absl::StrCat("# TYPE ", name, " gauge\n")));
  }
  EXPECT_THAT(text, Not(HasSubstr("# TYPE tscale_layer_scale_drift histogram")));
  EXPECT_THAT(text, HasSubstr("a snapshot of the layer's groups now, not a cumulative count"));
  EXPECT_THAT(text, HasSubstr("never rate() them"));
  EXPECT_THAT(text, HasSubstr("RMSNorm layers are frozen"));
}

TEST(MetricsTest, ProcessSeries) {
  core::ModelRegistry registry;
  metrics::Metrics metrics(&registry, {}, "1.2.3");
  auto s = Samples(metrics.Scrape());
  for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                           "process_virtual_memory_bytes", "process_open_fds",
                           "process_start_time_seconds", "process_max_fds"}) {
    ASSERT_EQ(s.count(name), 1u) << name;
  }
  EXPECT_GT(std::stod(s["process_resident_memory_bytes"]), 1 << 20);
  EXPECT_GE(std::stod(s["process_open_fds"]), 3);
  const double now = absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch());
  EXPECT_LT(std::abs(std::stod(s["process_start_time_seconds"]) - now), 3600);
  EXPECT_GE(std::stod(s["process_cpu_seconds_total"]), 0);
}

TEST(MetricsTest, LayersBeyondTheCapAreCountedNotExported) {
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "a", "ternary_linear": {"in_features": 8, "out_features": 8}},
    {"name": "b", "ternary_rms_norm": {"dim": 8}},
    {"name": "c", "ternary_linear": {"in_features": 8, "out_features": 4}}]})");
  ASSERT_TRUE(spec.ok());
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", *core::Model::Create(*spec, 1, testing::TestDevice())).ok());
  metrics::MetricsOptions options;
  options.max_layers_per_model = 1;
  metrics::Metrics metrics(&registry, options, "v");
  auto s = Samples(metrics.Scrape());
  EXPECT_EQ(s.count(R"(tscale_layer_scale_drift_count{layer="a",model="m"})"), 1u);
  // The RMSNorm is frozen (its drift is 0 by construction): not a drift series, not omitted.
  EXPECT_EQ(s.count(R"(tscale_layer_scale_drift_count{layer="b",model="m"})"), 0u);
  EXPECT_EQ(s.count(R"(tscale_layer_scale_drift_count{layer="c",model="m"})"), 0u);
  EXPECT_EQ(s["tscale_metrics_layers_omitted"], "1");
  EXPECT_EQ(s["tscale_metrics_layers_omitted_total"], "1");
  s = Samples(metrics.Scrape());
  EXPECT_EQ(s["tscale_metrics_layers_omitted"], "1");
  EXPECT_EQ(s["tscale_metrics_layers_omitted_total"], "2");
}

TEST(MetricsTest, CountersExistAtZeroBeforeTheirFirstEvent) {
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", KnownModel()).ok());
  metrics::Metrics metrics(&registry, {}, "v");
  auto s = Samples(metrics.Scrape());
  EXPECT_EQ(s[R"(tscale_updates_total{model="m",source="train_step"})"], "0");
  EXPECT_EQ(s[R"(tscale_updates_total{model="m",source="update_correlation"})"], "0");
  EXPECT_EQ(s[R"(tscale_updates_replayed_total{model="m"})"], "0");
  EXPECT_EQ(s[R"(tscale_rpc_errors_total{code="INTERNAL",method="TrainStep"})"], "0");
  EXPECT_EQ(s[R"(tscale_rpc_errors_total{code="DATA_LOSS",method="RestoreCheckpoint"})"], "0");
  EXPECT_EQ(s[R"(tscale_checkpoint_duration_seconds_count{operation="restore"})"], "0");
  EXPECT_EQ(s[R"(tscale_checkpoint_failures_total{operation="save"})"], "0");
  // A failure without a duration of its own is counted, not timed.
  metrics.ObserveCheckpoint("restore", "m", false, -1);
  s = Samples(metrics.Scrape());
  EXPECT_EQ(s[R"(tscale_checkpoint_failures_total{operation="restore"})"], "1");
  EXPECT_EQ(s[R"(tscale_checkpoint_duration_seconds_count{operation="restore"})"], "0");
}

TEST(MetricsTest, CallsUpdatesAndCheckpoints) {
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", KnownModel()).ok());
  metrics::Metrics metrics(&registry, {}, "v");
  metrics.ObserveRpc("Forward", absl::StatusCode::kOk, 0.002);
  metrics.ObserveRpc("Forward", absl::StatusCode::kInvalidArgument, 0.0001);
  metrics.CountUpdate("m", /*train_step=*/true, /*replayed=*/false);
  metrics.CountUpdate("m", /*train_step=*/false, /*replayed=*/false);
  metrics.CountUpdate("m", /*train_step=*/false, /*replayed=*/true);
  metrics.ObserveCheckpoint("save", "m", true, 0.5);
  metrics.ObserveCheckpoint("restore", "m", false, 0.1);
  auto s = Samples(metrics.Scrape());
  EXPECT_EQ(s[R"(tscale_rpc_duration_seconds_count{code="OK",method="Forward"})"], "1");
  EXPECT_EQ(s[R"(tscale_rpc_duration_seconds_bucket{code="OK",method="Forward",le="0.0025"})"],
            "1");
  EXPECT_EQ(s[R"(tscale_rpc_duration_seconds_bucket{code="OK",method="Forward",le="0.001"})"],
            "0");
  EXPECT_EQ(s[R"(tscale_rpc_errors_total{code="INVALID_ARGUMENT",method="Forward"})"], "1");
  EXPECT_EQ(s.count(R"(tscale_rpc_errors_total{code="OK",method="Forward"})"), 0u);
  EXPECT_EQ(s[R"(tscale_updates_total{model="m",source="train_step"})"], "1");
  EXPECT_EQ(s[R"(tscale_updates_total{model="m",source="update_correlation"})"], "1");
  EXPECT_EQ(s[R"(tscale_updates_replayed_total{model="m"})"], "1");
  EXPECT_EQ(s[R"(tscale_checkpoint_duration_seconds_count{operation="save"})"], "1");
  EXPECT_EQ(s[R"(tscale_checkpoint_failures_total{operation="save"})"], "0");
  EXPECT_EQ(s[R"(tscale_checkpoint_failures_total{operation="restore"})"], "1");
  EXPECT_GT(std::stod(s[R"(tscale_checkpoint_last_success_timestamp_seconds{model="m"})"]), 1.7e9);

  // A deleted model's series go.
  ASSERT_TRUE(registry.Remove("m").ok());
  metrics.ForgetModel("m");
  const std::string text = metrics.Scrape();
  EXPECT_THAT(text, Not(HasSubstr(R"(model="m")")));
  EXPECT_THAT(text, HasSubstr("tscale_models 0"));
}

// ---------------------------------------------------------------- HTTP

// The whole response to `request` sent to 127.0.0.1:port.
std::string Http(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "connect failed";
  }
  (void)!send(fd, request.data(), request.size(), 0);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) out.append(buf, n);
  close(fd);
  return out;
}

TEST(HttpExposerTest, ServesMetrics) {
  int scrapes = 0;
  auto exposer = metrics::HttpExposer::Start("127.0.0.1:0", [&] {
    ++scrapes;
    return std::string("tscale_models 3\n");
  });
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const int port = (*exposer)->port();
  ASSERT_GT(port, 0);
  const std::string ok = Http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(ok, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(ok, HasSubstr("Content-Length: 16\r\n"));
  EXPECT_THAT(ok, HasSubstr("\r\n\r\ntscale_models 3\n"));
  EXPECT_THAT(Http(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n"), HasSubstr("200 OK"));
  const std::string head = Http(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_THAT(head, HasSubstr("200 OK"));
  EXPECT_THAT(head, Not(HasSubstr("tscale_models")));
  EXPECT_THAT(Http(port, "GET /other HTTP/1.1\r\n\r\n"), HasSubstr("404 Not Found"));
  EXPECT_THAT(Http(port, "POST /metrics HTTP/1.1\r\n\r\n"), HasSubstr("405"));
  EXPECT_THAT(Http(port, "nonsense\r\n\r\n"), HasSubstr("400 Bad Request"));
  EXPECT_EQ(scrapes, 3);
  // Still serving after all that.
  EXPECT_THAT(Http(port, "GET /metrics HTTP/1.1\r\n\r\n"), HasSubstr("200 OK"));
  (*exposer)->Stop();
  EXPECT_EQ(Http(port, "GET /metrics HTTP/1.1\r\n\r\n"), "connect failed");
}

TEST(HttpExposerTest, BadAddresses) {
  EXPECT_THAT(metrics::HttpExposer::Start("nowhere", [] { return std::string(); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--metrics-listen: expected HOST:PORT, got 'nowhere'")));
  auto first = metrics::HttpExposer::Start("127.0.0.1:0", [] { return std::string(); });
  ASSERT_TRUE(first.ok());
  EXPECT_THAT(metrics::HttpExposer::Start("127.0.0.1:" + std::to_string((*first)->port()),
                                          [] { return std::string(); }),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("cannot listen")));
}

}  // namespace
}  // namespace tscale
