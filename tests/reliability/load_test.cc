// A bounded load test of the real tscale-server binary on loopback: 32 clients, each with its own
// channel, train 4 models at once for a fixed time through both update paths (Forward(train) +
// Backward + UpdateCorrelation, and TrainStep), retry a share of their updates as a client
// would after a lost response, and read (Forward(inference), GetModel, GetScaleStats) between.
// On the models of odd index, TrainStep goes through a client whose attempts time out after
// 10 ms (about the p99 of a loaded 2-core machine), so that the library's own retries run too,
// against attempts the server may or may not have applied. Every client is connected before the
// load starts, so that the load measures calls, not 32 connections made at once.
//
// Asserts: no unexpected error (the expected ones are FAILED_PRECONDITION for a stale
// expected_step, a pass released by another client's update, or an update with nothing to
// apply); each model's step equals the number of updates answered as applied, and their steps
// are exactly 1..step (none applied twice, none lost). On the models trained through the client
// that cuts attempts short, a retried TrainStep refused with FAILED_PRECONDITION may have applied
// unbeknown to its client (another update followed it, so the retry is no longer replayed):
// there the steps nobody was told of must be at most those calls. The server's resident memory
// after warm-up and at the end differs by less than kRssGrowthBound; the server is SERVING and
// exits 0 on SIGTERM. Prints throughput and p50/p99 per RPC: figures, not assertions.
//
// Environment: TSCALE_SERVER_BIN (the server binary; default: beside this test),
// TSCALE_LOAD_SECONDS (default 15, or 300 with TSCALE_LONG=1), TSCALE_LOAD_CLIENTS (default 32),
// TSCALE_LOAD_MODELS (default 4).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"
#include "tests/integration/rpc_test_util.h"
#include "tests/unit/files.h"
#include "tscale/v1/trainer.grpc.pb.h"

extern char** environ;

namespace tscale {
namespace {

using testing::MlpSpec;

// Resident memory may grow this much from the end of warm-up to the end of the run. Generous on
// purpose: glibc's per-thread arenas and LibTorch's allocator caches settle at a level that
// depends on which worker thread ran which request, which can add tens of MiB once. A leak per
// call would not stay under it: at the ~4000 calls/s of a 2-core machine a 15 s run makes ~60000
// calls, so 64 MiB catches a leak of about 1 KiB per call (a request message, an activation
// tensor, a pass left behind), and the 300 s run one of about 60 bytes.
#if defined(__SANITIZE_ADDRESS__)
// ASan keeps freed memory in its quarantine (256 MiB by default) before reusing it: resident
// memory grows under a steady load with no leak at all.
constexpr int64_t kRssGrowthBound = int64_t{320} << 20;
#else
constexpr int64_t kRssGrowthBound = int64_t{64} << 20;
#endif

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

std::string ServerBinary() {
  if (const char* bin = std::getenv("TSCALE_SERVER_BIN"); bin != nullptr && *bin != '\0') {
    return bin;
  }
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return "tscale-server";
  std::string dir(self, n);
  return dir.substr(0, dir.rfind('/')) + "/tscale-server";
}

// The VmRSS of a process, in bytes; -1 when it cannot be read.
int64_t ResidentBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream in(line.substr(6));
      int64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
  }
  return -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream out;
  out << in.rdbuf();
  return out.str();
}

// A tscale-server child process on 127.0.0.1:0, its output in a log file.
class ServerProcess {
 public:
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  void Start(const std::string& log) {
    log_ = log;
    const std::string bin = ServerBinary();
    ASSERT_TRUE(testing::Exists(bin)) << "no server binary at " << bin << " (TSCALE_SERVER_BIN)";
    std::vector<std::string> args = {bin, "--listen", "127.0.0.1:0", "--device", "cpu"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    const int rc = posix_spawn(&pid_, bin.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ASSERT_EQ(rc, 0) << "cannot start " << bin;
    const std::string marker = "tscale-server: listening on ";
    for (int i = 0; i < 1200; ++i) {
      const std::string text = ReadFile(log);
      const size_t at = text.find(marker);
      if (at != std::string::npos) {
        const size_t end = text.find_first_of(" \n", at + marker.size());
        if (end != std::string::npos) {
          address_ = text.substr(at + marker.size(), end - at - marker.size());
          return;
        }
      }
      int status = 0;
      ASSERT_EQ(waitpid(pid_, &status, WNOHANG), 0) << "the server exited at start:\n" << text;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    FAIL() << "the server printed no listening line in 120 s:\n" << ReadFile(log);
  }

  // SIGTERM; the exit status as waitpid gives it.
  int Stop() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

  pid_t pid() const { return pid_; }
  const std::string& address() const { return address_; }
  std::string log() const { return ReadFile(log_); }

 private:
  pid_t pid_ = -1;
  std::string address_;
  std::string log_;
};

v1::Tensor Floats(std::vector<int64_t> shape, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  v1::Tensor t;
  t.set_dtype(v1::FP32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  return t;
}

v1::Tensor Classes(int64_t batch, int64_t classes, std::mt19937_64& rng) {
  v1::Tensor t;
  t.set_dtype(v1::INT64);
  t.add_shape(batch);
  std::vector<int64_t> v(batch);
  for (int64_t& c : v) c = static_cast<int64_t>(rng() % classes);
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int64_t));
  return t;
}

constexpr int64_t kIn = 64, kHidden = 128, kOut = 10, kBatch = 16;


enum Rpc { kForwardTrain, kForwardInfer, kBackward, kUpdate, kTrainStep, kGetModel, kStats, kRpcs };
const char* kRpcNames[kRpcs] = {"Forward(train)", "Forward(infer)", "Backward",
                                "UpdateCorrelation", "TrainStep", "GetModel", "GetScaleStats"};

// What one client saw.
struct ClientResult {
  std::vector<double> latency_ms[kRpcs];
  int64_t calls = 0;
  int64_t expected_errors = 0;
  int64_t replayed = 0;
  int64_t library_retries = 0;
  // Per model: TrainStep calls refused after a library retry, which may or may not have applied.
  std::map<int, int64_t> unknown_outcome;
  std::vector<std::string> unexpected;
  // Per model: the steps that updates answered as applied (not replayed).
  std::map<int, std::vector<int64_t>> applied_steps;
};

class Worker {
 public:
  Worker(const std::string& address, int index, int models, absl::Time end)
      : model_(index % models), id_(absl::StrCat("load", model_)), end_(end),
        cut_attempts_(model_ % 2 == 1), rng_(1000 + index) {
    // Its own connection, as a client in another process would have.
    channel_ = testing::UnlimitedChannel(address, /*own_connection=*/true);
    client::ClientOptions options;
    options.timeout = absl::Seconds(60);
    client_ = std::make_unique<client::Client>(channel_, options);
    // Attempts cut short after 10 ms are retried (TrainStep is exactly-once by expected_step);
    // the last attempt may use what is left of the 60 s.
    options.retry.max_attempts = 8;
    options.retry.initial_backoff = absl::Milliseconds(5);
    options.retry.attempt_timeout = absl::Milliseconds(10);
    options.on_retry = [this](int, const absl::Status&, absl::Duration) {
      ++result_.library_retries;
    };
    retrying_ = std::make_unique<client::Client>(channel_, options);
  }

  // Opens the connection, waiting out failed attempts (gRPC retries them with backoff); false
  // when none succeeded within `timeout`. Done for every client before the load starts: a
  // connection attempt that fails while 32 clients connect at once would otherwise fail the
  // first call, and Forward(train) and Backward are never retried (their retry could act twice).
  bool Connect(absl::Duration timeout) {
    return channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout));
  }
  grpc_connectivity_state State() { return channel_->GetState(false); }

  void Run(absl::Time start) {
    start_ = start;
    while (absl::Now() < end_) {
      const int dice = static_cast<int>(rng_() % 10);
      if (dice < 4) {
        TrainStep();
      } else if (dice < 8) {
        ForwardBackwardUpdate();
      } else if (dice < 9) {
        auto r = Timed(kForwardInfer, [&] {
          return client_->Forward(id_, Floats({kBatch, kIn}, rng_), false).status();
        });
        Check(r, "Forward(infer)");
      } else if (rng_() % 2 == 0) {
        Check(Timed(kGetModel, [&] { return client_->GetModel(id_).status(); }), "GetModel");
      } else {
        Check(Timed(kStats, [&] { return client_->GetScaleStats(id_, false).status(); }),
              "GetScaleStats");
      }
    }
  }

  ClientResult& result() { return result_; }

 private:
  template <typename Fn>
  absl::Status Timed(Rpc rpc, Fn fn) {
    const absl::Time start = absl::Now();
    absl::Status s = fn();
    result_.latency_ms[rpc].push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    ++result_.calls;
    return s;
  }

  // An error the workload makes by design: clients of one model race for its steps.
  static bool Expected(const absl::Status& s) {
    if (s.code() != absl::StatusCode::kFailedPrecondition) return false;
    const absl::string_view m = s.message();
    return absl::StrContains(m, "expected_step: expected") ||
           absl::StrContains(m, "was released when UpdateCorrelation") ||
           absl::StrContains(m, "no Backward since step");
  }

  // Records an unexpected error; false for any error.
  bool Check(const absl::Status& s, absl::string_view what) {
    if (s.ok()) return true;
    if (Expected(s)) {
      ++result_.expected_errors;
    } else {
      result_.unexpected.push_back(absl::StrFormat(
          "%s at %.3f s: %s", what, absl::ToDoubleSeconds(absl::Now() - start_), s.ToString()));
    }
    return false;
  }

  void Applied(int64_t step) { result_.applied_steps[model_].push_back(step); }

  int64_t CurrentStep() {
    absl::StatusOr<v1::ModelInfo> info;
    const absl::Status s = Timed(kGetModel, [&] {
      info = client_->GetModel(id_);
      return info.status();
    });
    return Check(s, "GetModel") ? info->step() : -1;
  }

  void TrainStep() {
    const int64_t step = CurrentStep();
    if (step < 0) return;
    v1::TrainStepRequest req;
    req.set_model_id(id_);
    *req.mutable_input() = Floats({kBatch, kIn}, rng_);
    *req.mutable_target() = Classes(kBatch, kOut, rng_);
    req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
    req.set_expected_step(step);
    absl::StatusOr<v1::TrainStepResponse> r;
    const int64_t retries_before = result_.library_retries;
    if (!Check(Timed(kTrainStep, [&] {
                 r = (cut_attempts_ ? retrying_ : client_)->TrainStep(req);
                 return r.status();
               }),
               "TrainStep")) {
      // Refused after a retry of an attempt cut short: that attempt may have applied (the
      // server answers a retry with replayed only while no other update followed), so this
      // client cannot know whether its step counted.
      if (result_.library_retries != retries_before &&
          r.status().code() == absl::StatusCode::kFailedPrecondition) {
        ++result_.unknown_outcome[model_];
      }
      return;
    }
    // A TrainStep is replayed only for a retry of the same request: here the library's own
    // retry of an attempt it cut short, which the server had applied.
    if (r->replayed()) ++result_.replayed;
    Applied(r->step());
    // One in four: the retry a client makes when the answer was lost. It must be replayed
    // (or refused once another client has moved the model on); it must never apply again.
    if (rng_() % 4 == 0) {
      absl::StatusOr<v1::TrainStepResponse> again;
      if (Check(Timed(kTrainStep, [&] {
                  again = client_->TrainStep(req);
                  return again.status();
                }),
                "TrainStep retry")) {
        if (again->replayed()) {
          ++result_.replayed;
        } else {
          result_.unexpected.push_back("TrainStep retry applied again");
        }
      }
    }
  }

  void ForwardBackwardUpdate() {
    absl::StatusOr<v1::ForwardResponse> f;
    if (!Check(Timed(kForwardTrain, [&] {
                 f = client_->Forward(id_, Floats({kBatch, kIn}, rng_), true);
                 return f.status();
               }),
               "Forward(train)")) {
      return;
    }
    if (!Check(Timed(kBackward, [&] {
                 return client_->Backward(id_, f->pass_id(), Floats({kBatch, kOut}, rng_),
                                          rng_() % 2 == 0)
                     .status();
               }),
               "Backward")) {
      return;
    }
    const int attempts = rng_() % 4 == 0 ? 2 : 1;
    for (int attempt = 0; attempt < attempts; ++attempt) {
      absl::StatusOr<v1::UpdateCorrelationResponse> u;
      if (!Check(Timed(kUpdate, [&] {
                   u = client_->UpdateCorrelation(id_, f->step());
                   return u.status();
                 }),
                 "UpdateCorrelation")) {
        return;
      }
      if (u->replayed()) {
        // Another client's update of this step took our gradients, or our own retry.
        ++result_.replayed;
      } else if (attempt == 0) {
        Applied(u->step());
      } else {
        result_.unexpected.push_back("UpdateCorrelation retry applied again");
      }
    }
  }

  const int model_;
  const std::string id_;
  const absl::Time end_;
  // The models of odd index are trained through the client that cuts attempts short.
  const bool cut_attempts_;
  std::mt19937_64 rng_;
  absl::Time start_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<client::Client> retrying_;
  ClientResult result_;
};

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

TEST(LoadTest, ClientsTrainingModelsAtOnce) {
  const int seconds = EnvInt("TSCALE_LOAD_SECONDS", EnvInt("TSCALE_LONG", 0) ? 300 : 15);
  const int clients = EnvInt("TSCALE_LOAD_CLIENTS", 32);
  const int models = EnvInt("TSCALE_LOAD_MODELS", 4);
  ASSERT_GE(clients, models);
  testing::TempDir dir;
  ServerProcess server;
  ASSERT_NO_FATAL_FAILURE(server.Start(dir.path() + "/server.log"));
  client::Client admin(server.address());
  for (int m = 0; m < models; ++m) {
    v1::CreateModelRequest req;
    req.set_model_id(absl::StrCat("load", m));
    *req.mutable_spec() = MlpSpec(kIn, kHidden, kOut, v1::Activation::SILU, 0, false);
    req.set_seed(m);
    ASSERT_TRUE(admin.CreateModel(req).ok());
  }

  // Warm-up: a fifth of the run (at least 3 s), with the same load, so that thread pools,
  // arenas and caches reach their working size before the first measurement.
  const int warmup_s = std::max(3, seconds / 5);
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Seconds(warmup_s + seconds);
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < clients; ++i) {
    workers.push_back(std::make_unique<Worker>(server.address(), i, models, end));
    ASSERT_TRUE(workers.back()->Connect(absl::Seconds(60)))
        << "client " << i << " could not connect to " << server.address() << " in 60 s (state "
        << workers.back()->State() << "); the server's log:\n" << server.log();
  }
  std::vector<std::thread> threads;
  for (auto& w : workers) threads.emplace_back([&w, start] { w->Run(start); });
  std::this_thread::sleep_for(std::chrono::seconds(warmup_s));
  const int64_t rss_warm = ResidentBytes(server.pid());
  std::vector<int64_t> samples = {rss_warm};
  while (absl::Now() < end) {
    std::this_thread::sleep_for(std::chrono::seconds(std::max(1, seconds / 10)));
    samples.push_back(ResidentBytes(server.pid()));
  }
  for (auto& t : threads) t.join();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
  const int64_t rss_end = ResidentBytes(server.pid());
  samples.push_back(rss_end);

  // ---------------------------------------------------------------- correctness
  ClientResult all;
  for (auto& w : workers) {
    ClientResult& r = w->result();
    for (int k = 0; k < kRpcs; ++k) {
      all.latency_ms[k].insert(all.latency_ms[k].end(), r.latency_ms[k].begin(),
                               r.latency_ms[k].end());
    }
    all.calls += r.calls;
    all.expected_errors += r.expected_errors;
    all.replayed += r.replayed;
    all.library_retries += r.library_retries;
    all.unexpected.insert(all.unexpected.end(), r.unexpected.begin(), r.unexpected.end());
    for (auto& [m, n] : r.unknown_outcome) all.unknown_outcome[m] += n;
    for (auto& [m, steps] : r.applied_steps) {
      all.applied_steps[m].insert(all.applied_steps[m].end(), steps.begin(), steps.end());
    }
  }
  if (!all.unexpected.empty()) {
    std::string shown;
    for (size_t i = 0; i < all.unexpected.size() && i < 20; ++i) {
      absl::StrAppend(&shown, "\n  ", all.unexpected[i]);
    }
    ADD_FAILURE() << all.unexpected.size() << " unexpected errors (times from the start of the "
                  << "load), the first 20 by client:" << shown;
  }
  int64_t updates = 0;
  for (int m = 0; m < models; ++m) {
    auto info = admin.GetModel(absl::StrCat("load", m));
    ASSERT_TRUE(info.ok()) << info.status();
    std::vector<int64_t>& steps = all.applied_steps[m];
    std::sort(steps.begin(), steps.end());
    std::vector<int64_t> want(info->step());
    for (int64_t s = 0; s < info->step(); ++s) want[s] = s + 1;
    // Every update answered as applied is distinct and within the model's steps; the updates
    // nobody was told of are at most the calls whose outcome the client could not know (none
    // on the models trained without cut attempts).
    const int64_t unknown = all.unknown_outcome[m];
    const int64_t untold = info->step() - static_cast<int64_t>(steps.size());
    EXPECT_TRUE(std::adjacent_find(steps.begin(), steps.end()) == steps.end())
        << "model load" << m << ": an update was answered as applied twice";
    EXPECT_TRUE(steps.empty() || (steps.front() >= 1 && steps.back() <= info->step()))
        << "model load" << m;
    EXPECT_GE(untold, 0) << "model load" << m;
    EXPECT_LE(untold, unknown) << "model load" << m;
    std::cout << absl::StrFormat(
        "model load%d: step %d; %d updates answered as applied; %d calls of unknown outcome "
        "(retried, then refused), %d of them applied\n",
        m, info->step(), steps.size(), unknown, untold);
    if (unknown == 0 && steps != want) {
      std::vector<int64_t> missing, twice;
      std::set_difference(want.begin(), want.end(), steps.begin(), steps.end(),
                          std::back_inserter(missing));
      std::set_difference(steps.begin(), steps.end(), want.begin(), want.end(),
                          std::back_inserter(twice));
      ADD_FAILURE() << "model load" << m << ": the applied updates' steps are not exactly 1.."
                    << info->step() << "; missing " << ::testing::PrintToString(missing)
                    << ", applied twice or beyond " << ::testing::PrintToString(twice);
    }
    EXPECT_GT(info->step(), 0);
    updates += info->step();
  }
  auto serving = admin.Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_EQ(*serving, client::ServingStatus::kServing);

  // ---------------------------------------------------------------- figures
  std::cout << absl::StrFormat(
      "load: %d clients, %d models, %.1f s (%d s warm-up): %d calls, %.0f calls/s; %d updates "
      "applied (%.0f/s), %d replayed, %d retried by the client library, %d expected refusals "
      "(races), %d unexpected errors\n",
      clients, models, elapsed, warmup_s, all.calls, all.calls / elapsed, updates,
      updates / elapsed, all.replayed, all.library_retries, all.expected_errors,
      all.unexpected.size());
  std::cout << absl::StrFormat("%-18s %9s %9s %9s %9s\n", "rpc", "calls", "calls/s", "p50 ms",
                               "p99 ms");
  for (int k = 0; k < kRpcs; ++k) {
    std::vector<double>& v = all.latency_ms[k];
    const size_t n = v.size();
    std::cout << absl::StrFormat("%-18s %9d %9.0f %9.2f %9.2f\n", kRpcNames[k], n, n / elapsed,
                                 Percentile(v, 0.5), Percentile(v, 0.99));
  }
  std::string series;
  for (int64_t s : samples) absl::StrAppend(&series, s >> 20, " ");
  std::cout << absl::StrFormat(
      "server VmRSS: %d MiB after warm-up, %d MiB at the end (growth %+d KiB; bound %d MiB); "
      "samples MiB: %s\n",
      rss_warm >> 20, rss_end >> 20, (rss_end - rss_warm) >> 10, kRssGrowthBound >> 20, series);

  // ---------------------------------------------------------------- memory
  ASSERT_GT(rss_warm, 0);
  ASSERT_GT(rss_end, 0);
  EXPECT_LT(rss_end - rss_warm, kRssGrowthBound)
      << "the server's resident memory grew under a steady load";

  const int status = server.Stop();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the server did not exit 0 on SIGTERM (wait status " << status << "); its log:\n"
      << server.log();
}

}  // namespace
}  // namespace tscale
