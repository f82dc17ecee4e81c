// server/group without the service: membership from flags and the environment, a group of one
// (Gloo on the host, NCCL on a GPU), and two ranks in one process over a real c10d TCPStore and
// Gloo process group on loopback, running the group's calls on core models.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "server/core/model.h"
#include "server/group/config.h"
#include "server/group/replica_group.h"

namespace tscale::group {
namespace {

using ::testing::HasSubstr;

std::function<std::optional<std::string>(const char*)> Env(
    std::map<std::string, std::string> vars) {
  return [vars](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

TEST(GroupConfigTest, FromFlags) {
  GroupFlags flags;
  flags.size = 3;
  flags.rank = 2;
  flags.store = "10.0.0.1:29500";
  flags.timeout_seconds = 7;
  auto config = ResolveGroupConfig(flags, Env({}), "host");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->has_value());
  EXPECT_EQ((*config)->size, 3);
  EXPECT_EQ((*config)->rank, 2);
  EXPECT_EQ((*config)->store_host, "10.0.0.1");
  EXPECT_EQ((*config)->store_port, 29500);
  EXPECT_EQ((*config)->timeout, absl::Seconds(7));
}

TEST(GroupConfigTest, FromTorchrunEnvironment) {
  auto config = ResolveGroupConfig(
      GroupFlags{},
      Env({{"WORLD_SIZE", "4"}, {"RANK", "1"}, {"MASTER_ADDR", "[::1]"}, {"MASTER_PORT", "1234"}}),
      "host");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->has_value());
  EXPECT_EQ((*config)->size, 4);
  EXPECT_EQ((*config)->rank, 1);
  EXPECT_EQ((*config)->store_host, "::1");
  EXPECT_EQ((*config)->store_port, 1234);
}

TEST(GroupConfigTest, RankFromAStatefulSetHostname) {
  GroupFlags flags;
  flags.size = 8;
  flags.store = "tscale-0.tscale:29500";
  flags.rank_from_hostname = true;
  auto config = ResolveGroupConfig(flags, Env({}), "tscale-group-5.tscale.ns.svc");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ((*config)->rank, 5);
  EXPECT_EQ(OrdinalOf("web-12"), 12);
  EXPECT_EQ(OrdinalOf("web"), std::nullopt);
}

TEST(GroupConfigTest, NoGroupAndErrorsNameTheFlag) {
  auto none = ResolveGroupConfig(GroupFlags{}, Env({}), "host");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  GroupFlags no_store;
  no_store.size = 2;
  no_store.rank = 0;
  EXPECT_THAT(std::string(ResolveGroupConfig(no_store, Env({}), "h").status().message()),
              HasSubstr("--group-store: expected HOST:PORT"));
  GroupFlags bad_rank = no_store;
  bad_rank.rank = 2;
  bad_rank.store = "h:1";
  EXPECT_THAT(std::string(ResolveGroupConfig(bad_rank, Env({}), "h").status().message()),
              HasSubstr("--group-rank: expected a rank in [0, 2), got 2"));
  EXPECT_THAT(
      std::string(
          ResolveGroupConfig(GroupFlags{}, Env({{"WORLD_SIZE", "x"}}), "h").status().message()),
      HasSubstr("WORLD_SIZE: expected an integer"));
  GroupFlags hostname = no_store;
  hostname.rank = -1;
  hostname.store = "h:1";
  hostname.rank_from_hostname = true;
  EXPECT_THAT(std::string(ResolveGroupConfig(hostname, Env({}), "plainhost").status().message()),
              HasSubstr("--group-rank-from-hostname: expected a hostname ending in -N"));
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

core::ModelSpec LinearSpec(int64_t in, int64_t out) {
  core::ModelSpec spec;
  core::LayerSpec layer;
  layer.name = "fc";
  core::TernaryLinearSpec linear;
  linear.in_features = in;
  linear.out_features = out;
  layer.kind = linear;
  spec.layers.push_back(layer);
  return spec;
}

GroupConfig OneRank() {
  GroupConfig config;
  config.size = 1;
  config.rank = 0;
  config.store_host = "127.0.0.1";
  config.store_port = FreePort();
  config.timeout = absl::Seconds(10);
  return config;
}

// A group of one on each device its backends serve (the host with Gloo; a GPU with NCCL, which
// carries every exchange in a build without Gloo): it forms, names its backend, and its
// TrainSteps go through the whole exchange and equal the single model's exactly (one rank: the
// same batch, the same sums).
TEST(GroupOfOne, TrainStepsThroughTheExchangeEqualOneModel) {
  std::vector<c10::Device> devices;
  if (ReplicaGroup::HasGloo()) devices.emplace_back(c10::kCPU);
  if (ReplicaGroup::HasNccl() && at::hasCUDA()) devices.emplace_back(c10::kCUDA, 0);
  if (devices.empty()) GTEST_SKIP() << "NCCL alone is compiled in and there is no GPU";
  for (const c10::Device& device : devices) {
    SCOPED_TRACE(device.str());
    auto group = ReplicaGroup::Start(OneRank(), device);
    ASSERT_TRUE(group->WaitFormed(absl::Seconds(60))) << device;
    const std::string backend = group->status().backend;
    if (device.is_cuda()) {
      EXPECT_THAT(backend, HasSubstr("nccl"));
    } else {
      EXPECT_EQ(backend, "gloo");
    }
    const core::ModelSpec spec = LinearSpec(32, 16);
    auto replica = core::Model::Create(spec, 5, device);
    auto single = core::Model::Create(spec, 5, device);
    ASSERT_TRUE(replica.ok()) << replica.status();
    ASSERT_TRUE(single.ok()) << single.status();
    at::Generator gen = at::detail::createCPUGenerator(11);
    for (int64_t step = 0; step < 10; ++step) {
      const at::Tensor x = at::randint(-3, 4, {6, 32}, gen).to(at::kFloat).to(device);
      const at::Tensor y = at::randint(-3, 4, {6, 16}, gen).to(at::kFloat).to(device);
      auto want = (*single)->TrainStep(x, y, core::Loss::kMse, step);
      ASSERT_TRUE(want.ok()) << want.status();
      CallHeader h;
      h.kind = CallKind::kTrainStep;
      h.model_id = "m";
      h.expected_step = step;
      h.model_step = (*replica)->step();
      h.batch = 6;
      h.loss = 1;
      double loss = 0;
      const absl::Status status = group->Run(h, [&](GroupCall& call) -> absl::Status {
        EXPECT_FALSE(call.local());
        const core::GroupStep group_step{call.combiner(), call.group_batch()};
        auto result = (*replica)->TrainStep(x, y, core::Loss::kMse, step, nullptr, &group_step);
        if (!result.ok()) return result.status();
        loss = result->loss;
        return absl::OkStatus();
      });
      ASSERT_TRUE(status.ok()) << status;
      EXPECT_NEAR(loss, want->loss, 1e-6 * want->loss);
      ASSERT_EQ(StateDigest((*replica)->ExportState()), StateDigest((*single)->ExportState()))
          << "step " << step;
    }
  }
}

class TwoRanks : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ReplicaGroup::HasGloo()) {
      // NCCL alone: one GPU per rank, and two ranks in one process would share one.
      GTEST_SKIP() << "two ranks in one process need Gloo, which this build lacks";
    }
    const int port = FreePort();
    for (int r = 0; r < 2; ++r) {
      GroupConfig config;
      config.size = 2;
      config.rank = r;
      config.store_host = "127.0.0.1";
      config.store_port = port;
      config.timeout = absl::Seconds(3);
      groups_.push_back(ReplicaGroup::Start(config));
    }
    for (auto& g : groups_) ASSERT_TRUE(g->WaitFormed(absl::Seconds(30)));
  }

  // Runs `call(rank)` on both ranks at once.
  std::vector<absl::Status> Both(const std::function<absl::Status(int)>& call) {
    std::vector<absl::Status> out(2);
    std::thread t0([&] { out[0] = call(0); });
    std::thread t1([&] { out[1] = call(1); });
    t0.join();
    t1.join();
    return out;
  }

  std::vector<std::unique_ptr<ReplicaGroup>> groups_;
};

TEST_F(TwoRanks, TrainStepsKeepTheReplicasIdentical) {
  const core::ModelSpec spec = LinearSpec(16, 8);
  std::vector<std::unique_ptr<core::Model>> replicas;
  for (int r = 0; r < 2; ++r) {
    auto m = core::Model::Create(spec, 9, c10::Device(c10::kCPU));
    ASSERT_TRUE(m.ok()) << m.status();
    replicas.push_back(*std::move(m));
  }
  auto single = core::Model::Create(spec, 9, c10::Device(c10::kCPU));
  ASSERT_TRUE(single.ok());
  at::Generator gen = at::detail::createCPUGenerator(3);
  for (int64_t step = 0; step < 10; ++step) {
    // Small integers, rows split 2 + 2: every float32 sum is exact whatever its order.
    const at::Tensor x = at::randint(-3, 4, {4, 16}, gen).to(at::kFloat);
    const at::Tensor y = at::randint(-3, 4, {4, 8}, gen).to(at::kFloat);
    auto want = (*single)->TrainStep(x, y, core::Loss::kMse, step);
    ASSERT_TRUE(want.ok()) << want.status();
    std::vector<double> losses(2);
    auto statuses = Both([&](int r) {
      CallHeader h;
      h.kind = CallKind::kTrainStep;
      h.model_id = "m";
      h.expected_step = step;
      h.model_step = replicas[r]->step();
      h.batch = 2;
      h.loss = 1;
      return groups_[r]->Run(h, [&](GroupCall& call) -> absl::Status {
        EXPECT_FALSE(call.local());
        EXPECT_EQ(call.group_batch(), 4);
        const core::GroupStep group{call.combiner(), call.group_batch()};
        auto result = replicas[r]->TrainStep(x.narrow(0, 2 * r, 2), y.narrow(0, 2 * r, 2),
                                             core::Loss::kMse, step, nullptr, &group);
        if (!result.ok()) return result.status();
        losses[r] = result->loss;
        return absl::OkStatus();
      });
    });
    ASSERT_TRUE(statuses[0].ok()) << statuses[0];
    ASSERT_TRUE(statuses[1].ok()) << statuses[1];
    EXPECT_DOUBLE_EQ(losses[0], losses[1]);
    EXPECT_EQ(StateDigest(replicas[0]->ExportState()), StateDigest(replicas[1]->ExportState()))
        << "step " << step;
    if (step == 0) {
      // Before the first update every scale is a power of two, and every sum exact: the group's
      // update is the single model's. (Later the scales are not, and the two sum in different
      // orders.)
      EXPECT_NEAR(losses[0], want->loss, 1e-6 * want->loss);
      EXPECT_EQ(StateDigest(replicas[0]->ExportState()), StateDigest((*single)->ExportState()));
    }
  }
}

TEST_F(TwoRanks, UpdatesOfIntegerGradientsEqualOneModelExactly) {
  // Small-integer inputs and output gradients: the weight gradients are integers, their sums
  // exact in any order, and the group's state must be the single model's after every update.
  const core::ModelSpec spec = LinearSpec(24, 16);
  std::vector<std::unique_ptr<core::Model>> replicas;
  for (int r = 0; r < 2; ++r) replicas.push_back(*core::Model::Create(spec, 4, c10::kCPU));
  auto single = core::Model::Create(spec, 4, c10::Device(c10::kCPU));
  ASSERT_TRUE(single.ok());
  at::Generator gen = at::detail::createCPUGenerator(8);
  for (int64_t step = 0; step < 10; ++step) {
    for (int r = 0; r < 2; ++r) {
      for (int k = 0; k <= r; ++k) {  // rank 1 runs two passes, rank 0 one
        const at::Tensor x = at::randint(-3, 4, {3, 24}, gen).to(at::kFloat);
        const at::Tensor g = at::randint(-2, 3, {3, 16}, gen).to(at::kFloat);
        for (core::Model* m : {replicas[r].get(), single->get()}) {
          auto pass = m->Forward(x, /*train=*/true);
          ASSERT_TRUE(pass.ok()) << pass.status();
          ASSERT_TRUE(m->Backward(pass->pass_id, g, false).ok());
        }
      }
    }
    ASSERT_TRUE((*single)->UpdateCorrelation(step).ok());
    auto statuses = Both([&](int r) {
      CallHeader h;
      h.kind = CallKind::kUpdate;
      h.model_id = "m";
      h.expected_step = step;
      h.model_step = replicas[r]->step();
      h.backwards = replicas[r]->backwards();
      return groups_[r]->Run(h, [&](GroupCall& call) -> absl::Status {
        return replicas[r]->UpdateCorrelation(step, nullptr, call.combiner()).status();
      });
    });
    ASSERT_TRUE(statuses[0].ok()) << statuses[0];
    ASSERT_TRUE(statuses[1].ok()) << statuses[1];
    const uint64_t digest = StateDigest((*single)->ExportState());
    EXPECT_EQ(StateDigest(replicas[0]->ExportState()), digest) << "step " << step;
    EXPECT_EQ(StateDigest(replicas[1]->ExportState()), digest) << "step " << step;
  }
}

TEST_F(TwoRanks, HeadersThatDifferFailOnBothRanksAndTheBodyNeverRuns) {
  bool ran = false;
  auto statuses = Both([&](int r) {
    CallHeader h;
    h.kind = CallKind::kCreate;
    h.model_id = "m";
    h.digest = 100 + r;  // another seed on rank 1
    return groups_[r]->Run(h, [&](GroupCall&) {
      ran = true;
      return absl::OkStatus();
    });
  });
  EXPECT_FALSE(ran);
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("rank 1's spec, seed, device or compute"));
  }
}

TEST_F(TwoRanks, ARefusalAtTheVoteFailsTheOtherRankToo) {
  auto statuses = Both([&](int r) {
    CallHeader h;
    h.kind = CallKind::kCreate;
    h.model_id = "m";
    return groups_[r]->Run(h, [&](GroupCall& call) {
      return call.Vote(r == 1 ? absl::ResourceExhaustedError("no memory") : absl::OkStatus(), 7);
    });
  });
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kAborted) << statuses[0];
  EXPECT_THAT(std::string(statuses[0].message()), HasSubstr("rank 1 refused to commit"));
}

TEST_F(TwoRanks, ACallOneRankNeverJoinsFailsWithinTheTimeoutAndTheGroupReforms) {
  CallHeader h;
  h.kind = CallKind::kDelete;
  h.model_id = "m";
  h.model_step = 0;
  const absl::Time start = absl::Now();
  absl::Status alone = groups_[0]->Run(h, [](GroupCall&) { return absl::OkStatus(); });
  EXPECT_EQ(alone.code(), absl::StatusCode::kUnavailable) << alone;
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  // Both ranks move to the next generation and meet again.
  ASSERT_TRUE(groups_[0]->WaitFormed(absl::Seconds(30)));
  for (int i = 0; i < 100 && (groups_[0]->status().generation < 1 ||
                              groups_[1]->status().generation < 1 || !groups_[1]->status().formed);
       ++i) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_GE(groups_[0]->status().generation, 1);
  auto statuses = Both([&](int r) {
    return groups_[r]->Run(h, [&](GroupCall& call) { return call.Vote(absl::OkStatus(), 0); });
  });
  EXPECT_TRUE(statuses[0].ok()) << statuses[0];
  EXPECT_TRUE(statuses[1].ok()) << statuses[1];
}

}  // namespace
}  // namespace tscale::group
