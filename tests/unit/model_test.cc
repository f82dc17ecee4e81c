// The model's training protocol, state import/export and error paths.
#include <atomic>
#include <fstream>
#include <functional>
#include <limits>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/core/device.h"
#include "server/core/model.h"
#include "server/core/trits.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using core::Model;
using core::ModelSpec;
using ::testing::HasSubstr;
using testing::SameState;
using testing::StatusIs;


ModelSpec SmallSpec() {
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 12, "out_features": 16, "group_size": 8}},
    {"name": "norm", "ternary_rms_norm": {"dim": 16, "group_size": 8}},
    {"name": "act", "activation": {"kind": "GELU"}},
    {"name": "block", "residual": {"layers": [
      {"name": "up", "ternary_linear": {"in_features": 16, "out_features": 16, "bias": true}},
      {"name": "relu", "activation": {"kind": "RELU"}}]}},
    {"name": "fc2", "ternary_linear": {"in_features": 16, "out_features": 5}}]})");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

std::unique_ptr<Model> NewModel(uint64_t seed = 1, core::ModelOptions options = {}) {
  auto m = Model::Create(SmallSpec(), seed, testing::TestDevice(), options);
  EXPECT_TRUE(m.ok()) << m.status();
  return *std::move(m);
}

at::Tensor Input(int64_t batch, int64_t features, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({batch, features}, gen);
}

// One step: a forward, a backward of a fixed gradient, an update.
void TrainStep(Model& m, uint64_t seed) {
  auto f = m.Forward(Input(4, 12, seed), true);
  ASSERT_TRUE(f.ok()) << f.status();
  auto b = m.Backward(f->pass_id, Input(4, 5, seed + 1000), false);
  ASSERT_TRUE(b.ok()) << b.status();
  auto u = m.UpdateCorrelation(m.step());
  ASSERT_TRUE(u.ok()) << u.status();
}

TEST(ModelTest, StateKeysAreTheReferenceStateDictKeys) {
  auto m = NewModel();
  const auto snap = m->ExportState();
  std::vector<std::string> keys;
  for (const auto& [k, v] : snap.tensors) keys.push_back(k);
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre(
                        "fc1.T_packed", "fc1._T_shape", "fc1._T_pad", "fc1.E", "fc1.corr_accum",
                        "fc1.step_counter", "norm.T_packed", "norm._T_shape", "norm._T_pad",
                        "norm.E", "norm.corr_accum", "norm.step_counter", "block.up.T_packed",
                        "block.up._T_shape", "block.up._T_pad", "block.up.E",
                        "block.up.corr_accum", "block.up.step_counter", "block.up.bias",
                        "fc2.T_packed", "fc2._T_shape", "fc2._T_pad", "fc2.E", "fc2.corr_accum",
                        "fc2.step_counter"));
  EXPECT_EQ(snap.tensors.at("block.up.bias").scalar_type(), at::kInt);
  EXPECT_EQ(snap.tensors.at("fc1.E").numel(), 16 * 2);
  // E init: round(log2(0.5 / sqrt(12))) = round(-2.79) = -3; in=16: log2(0.125) = -3.
  EXPECT_EQ(snap.tensors.at("fc1.E")[0].item<int>(), -3);
  EXPECT_EQ(snap.tensors.at("norm.E")[0].item<int>(), -4);
  EXPECT_EQ(m->persistent_bytes(),
            (core::PackedBytes(192) + 32 + 32 * 9) + (core::PackedBytes(16) + 32 + 2 * 9) +
                (core::PackedBytes(256) + 32 + 16 * 9 + 16 * 4) + (core::PackedBytes(80) + 32 + 5 * 9));
}

TEST(ModelTest, InitIsDeterministicForASeed) {
  EXPECT_TRUE(SameState(NewModel(5)->ExportState().tensors, NewModel(5)->ExportState().tensors));
  EXPECT_FALSE(SameState(NewModel(5)->ExportState().tensors, NewModel(6)->ExportState().tensors));
}

TEST(ModelTest, ExactlyOnceUpdateWithReplay) {
  auto m = NewModel();
  auto f = m->Forward(Input(3, 12, 1), true);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->step, 0);
  EXPECT_EQ(m->pending_passes(), 1);
  ASSERT_TRUE(m->Backward(f->pass_id, Input(3, 5, 2), false).ok());
  EXPECT_EQ(m->pending_passes(), 0);

  auto u = m->UpdateCorrelation(0);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->step, 1);
  EXPECT_FALSE(u->replayed);
  ASSERT_EQ(u->layers.size(), 3u);
  EXPECT_EQ(u->layers[1].layer, "block.up");
  const auto after = m->ExportState();

  // The retry of the same request: the same response, replayed, nothing applied again.
  auto again = m->UpdateCorrelation(0);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(again->step, 1);
  for (size_t i = 0; i < u->layers.size(); ++i) {
    EXPECT_EQ(again->layers[i].score_sum, u->layers[i].score_sum);
    EXPECT_EQ(again->layers[i].mean_abs_drift, u->layers[i].mean_abs_drift);
  }
  EXPECT_TRUE(SameState(after.tensors, m->ExportState().tensors));
  EXPECT_EQ(m->step(), 1);

  // Any other mismatch fails and changes nothing.
  EXPECT_THAT(m->UpdateCorrelation(5),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("expected_step: expected 1 (the model's step), got 5")));
  // Step 1 has had no Backward.
  EXPECT_THAT(m->UpdateCorrelation(1),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("no Backward since step 1 began")));
  EXPECT_TRUE(SameState(after.tensors, m->ExportState().tensors));
  EXPECT_EQ(m->step(), 1);
}

TEST(ModelTest, UpdateSubtractsScoresAndReportsDrift) {
  auto m = NewModel();
  const auto before = m->ExportState();
  auto f = m->Forward(Input(4, 12, 3), true);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(m->Backward(f->pass_id, Input(4, 5, 4), false).ok());
  auto u = m->UpdateCorrelation(0);
  ASSERT_TRUE(u.ok());
  const auto after = m->ExportState();
  for (const auto& lu : u->layers) {
    const at::Tensor corr = after.tensors.at(lu.layer + ".corr_accum");
    EXPECT_EQ(-(corr - before.tensors.at(lu.layer + ".corr_accum")).sum().item<int64_t>(),
              lu.score_sum)
        << lu.layer;
    EXPECT_EQ(after.tensors.at(lu.layer + ".step_counter").item<int64_t>(), 1);
    const int64_t gs = lu.layer == "fc1" ? 8 : 32;
    const double want = 4.0 * corr.abs().sum().item<int64_t>() / gs / corr.numel();
    EXPECT_DOUBLE_EQ(lu.mean_abs_drift, want) << lu.layer;
  }
  // The RMSNorm's state is frozen.
  EXPECT_TRUE(at::equal(after.tensors.at("norm.corr_accum"), before.tensors.at("norm.corr_accum")));
  EXPECT_EQ(after.tensors.at("norm.step_counter").item<int64_t>(), 0);
}

TEST(ModelTest, PassLifecycleErrors) {
  auto m = NewModel();
  auto f = m->Forward(Input(2, 12, 1), true);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(m->Backward(f->pass_id, Input(2, 5, 2), true).ok());
  EXPECT_THAT(m->Backward(f->pass_id, Input(2, 5, 2), true),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("was already used by a Backward")));
  EXPECT_THAT(m->Backward("nope", Input(2, 5, 2), true),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("pass_id: no pass 'nope'")));

  auto kept = m->Forward(Input(2, 12, 3), true);  // never backpropagated
  ASSERT_TRUE(kept.ok());
  ASSERT_TRUE(m->UpdateCorrelation(0).ok());
  EXPECT_EQ(m->pending_passes(), 0);
  EXPECT_THAT(m->Backward(kept->pass_id, Input(2, 5, 2), true),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("belongs to step 0 and was released when UpdateCorrelation "
                                 "advanced the model to step 1")));
  // Another model's pass id is unknown here.
  auto other = NewModel();
  auto of = other->Forward(Input(2, 12, 1), true);
  ASSERT_TRUE(of.ok());
  EXPECT_THAT(m->Backward(of->pass_id, Input(2, 5, 2), true),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("no pass")));

  // Inference passes are not kept.
  auto inf = m->Forward(Input(2, 12, 1), false);
  ASSERT_TRUE(inf.ok());
  EXPECT_TRUE(inf->pass_id.empty());
  EXPECT_EQ(m->pending_passes(), 0);
}

TEST(ModelTest, BadTensorsAreRefusedAndChangeNothing) {
  auto m = NewModel();
  const auto before = m->ExportState();
  EXPECT_THAT(m->Forward(Input(2, 11, 1), true),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input: expected FP32 [batch >= 1, 12], got FP32 [2, 11]")));
  EXPECT_THAT(m->Forward(at::zeros({2, 12}, at::kDouble), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got Double [2, 12]")));
  EXPECT_THAT(m->Forward(at::zeros({0, 12}), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got FP32 [0, 12]")));
  EXPECT_THAT(m->Forward(at::zeros({12}), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got FP32 [12]")));

  at::Tensor x = Input(2, 12, 1);
  x[1][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(m->Forward(x, true),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input: expected finite values, got NaN or Inf")));
  EXPECT_EQ(m->pending_passes(), 0);

  auto f = m->Forward(Input(2, 12, 1), true);
  ASSERT_TRUE(f.ok());
  at::Tensor g = Input(2, 5, 2);
  g[0][0] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(m->Backward(f->pass_id, g, false),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("grad_output: expected finite values, got NaN or Inf")));
  EXPECT_THAT(m->Backward(f->pass_id, Input(3, 5, 2), false),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("grad_output: expected FP32 [2, 5] (the pass's output), got "
                                 "FP32 [3, 5]")));
  // The refused Backward left the pass usable and applied nothing.
  EXPECT_THAT(m->UpdateCorrelation(0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no Backward")));
  ASSERT_TRUE(m->Backward(f->pass_id, Input(2, 5, 2), false).ok());
  EXPECT_TRUE(SameState(before.tensors, m->ExportState().tensors));
}

TEST(ModelTest, PendingLimits) {
  core::ModelOptions opts;
  opts.max_pending_passes = 2;
  auto m = NewModel(1, opts);
  ASSERT_TRUE(m->Forward(Input(1, 12, 1), true).ok());
  ASSERT_TRUE(m->Forward(Input(1, 12, 1), true).ok());
  EXPECT_THAT(m->Forward(Input(1, 12, 1), true),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("the model holds 2 passes awaiting Backward, the limit is 2")));
  EXPECT_TRUE(m->Forward(Input(1, 12, 1), false).ok());  // inference is not limited

  core::ModelOptions bytes;
  bytes.max_pending_bytes = 1000;
  auto b = NewModel(1, bytes);
  ASSERT_TRUE(b->Forward(Input(1, 12, 1), true).ok());
  EXPECT_THAT(b->Forward(Input(64, 12, 1), true),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("the limit is 1000 bytes")));
  EXPECT_EQ(b->pending_passes(), 1);
}

TEST(ModelTest, SeveralBackwardsSumBeforeTheSign) {
  // Two passes whose gradients cancel give zero scores; one of them alone does not.
  auto m = NewModel();
  at::Tensor x = Input(2, 12, 1), g = Input(2, 5, 2);
  auto f1 = m->Forward(x, true);
  auto f2 = m->Forward(x, true);
  ASSERT_TRUE(f1.ok() && f2.ok());
  ASSERT_TRUE(m->Backward(f1->pass_id, g, false).ok());
  ASSERT_TRUE(m->Backward(f2->pass_id, -g, false).ok());
  auto u = m->UpdateCorrelation(0);
  ASSERT_TRUE(u.ok());
  for (const auto& l : u->layers) EXPECT_EQ(l.score_sum, 0) << l.layer;
  EXPECT_EQ(u->layers[0].mean_abs_drift, 0);

  auto one = NewModel();
  auto f = one->Forward(x, true);
  ASSERT_TRUE(one->Backward(f->pass_id, g, false).ok());
  auto u1 = one->UpdateCorrelation(0);
  ASSERT_TRUE(u1.ok());
  EXPECT_GT(u1->layers[0].mean_abs_drift, 0);
}

TEST(ModelTest, ForwardComputesResidualsAndActivations) {
  auto m = NewModel(3);
  const auto st = m->ExportState().tensors;
  auto weight = [&](const std::string& name, int64_t rows, int64_t cols, int64_t gs) {
    at::Tensor t = core::UnpackTernary(st.at(name + ".T_packed"), rows * cols).value();
    at::Tensor s = at::exp2(st.at(name + ".E").to(at::kFloat));
    return s.view({rows, -1}).repeat_interleave(gs, 1).narrow(1, 0, cols) *
           t.view({rows, cols}).to(at::kFloat);
  };
  at::Tensor x = Input(3, 12, 9);
  at::Tensor h = at::matmul(x, weight("fc1", 16, 12, 8).t());
  h = h * at::rsqrt(h.pow(2).mean({-1}, true) + std::numeric_limits<float>::epsilon()) *
      weight("norm", 1, 16, 8).flatten();
  h = at::gelu(h);
  h = h + at::relu(at::matmul(h, weight("block.up", 16, 16, 32).t()));
  at::Tensor y = at::matmul(h, weight("fc2", 5, 16, 32).t());
  auto got = m->Forward(x, false);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(at::allclose(got->output.to(at::kCPU), y, 1e-5, 1e-6)) << got->output << y;
}

TEST(ModelTest, ExportImportRoundTripContinuesIdentically) {
  auto a = NewModel(4);
  TrainStep(*a, 10);
  TrainStep(*a, 20);
  const auto snap = a->ExportState();
  EXPECT_EQ(snap.step, 2);
  auto b = Model::Import(a->spec(), snap.tensors, std::nullopt, testing::TestDevice());
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->step(), 2);
  EXPECT_TRUE(SameState(snap.tensors, (*b)->ExportState().tensors));
  TrainStep(*a, 30);
  TrainStep(**b, 30);
  EXPECT_TRUE(SameState(a->ExportState().tensors, (*b)->ExportState().tensors));
  EXPECT_EQ((*b)->step(), 3);

  // Unknown keys are ignored.
  core::StateDict extra = snap.tensors;
  extra["optimizer.something"] = at::zeros({3});
  EXPECT_TRUE(Model::Import(a->spec(), extra, 2, testing::TestDevice()).ok());
}

TEST(ModelTest, ImportValidatesEveryTensor) {
  auto m = NewModel();
  TrainStep(*m, 1);
  const auto good = m->ExportState().tensors;
  const ModelSpec spec = m->spec();
  auto import_with = [&](const std::function<void(core::StateDict&)>& edit,
                         std::optional<int64_t> step = std::nullopt) {
    core::StateDict s;
    for (const auto& [k, v] : good) s[k] = v.clone();
    edit(s);
    return Model::Import(spec, s, step, testing::TestDevice()).status();
  };
  EXPECT_THAT(import_with([](auto& s) { s.erase("fc2.E"); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc2.E: expected INT8 [5], got nothing (missing)")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1.corr_accum"] = s["fc1.corr_accum"].to(at::kInt); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.corr_accum: expected INT64 [32], got INT32 [32]")));
  EXPECT_THAT(import_with([](auto& s) { s["block.up.E"] = at::zeros({15}, at::kChar); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("block.up.E: expected INT8 [16], got INT8 [15]")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1.T_packed"][7] = 243; }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.T_packed[7]: expected a byte <= 242, got 243")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1._T_shape"][0] = 12; }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1._T_shape: expected [16, 12], got [12, 12]")));
  EXPECT_THAT(import_with([](auto& s) { s["fc2._T_pad"].fill_(3); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc2._T_pad: expected 0, got 3")));
  EXPECT_THAT(import_with([](auto& s) { s["block.up.bias"] = at::zeros({16}, at::kLong); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("block.up.bias: expected INT32 [16], got INT64 [16]")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1.bias"] = at::zeros({16}, at::kInt); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.bias: expected no bias (the spec's bias is false)")));
  // Values the update rule cannot reach: after 1 step, |corr_accum| <= 1 * group_size (8).
  EXPECT_THAT(import_with([](auto& s) { s["fc1.corr_accum"][5] = 9; }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.corr_accum: expected values within ±step_counter * "
                                 "group_size = ±8, got 9 at group 5")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1.corr_accum"][0] = -9; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got -9 at group 0")));
  EXPECT_TRUE(import_with([](auto& s) { s["fc1.corr_accum"][5] = -8; }).ok());
  EXPECT_THAT(import_with([](auto& s) { s["norm.corr_accum"][1] = 1; }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("norm.corr_accum: expected values within ±step_counter * "
                                 "group_size = ±0, got 1 at group 1")));
  EXPECT_THAT(import_with([](auto& s) { s["fc2.E"][2] = 1; }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc2.E: expected values within [-8, 0], got 1")));
  EXPECT_THAT(import_with([](auto& s) { s["fc2.E"][0] = -100; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got -100")));
  EXPECT_THAT(import_with([](auto& s) { s["fc2.step_counter"].fill_(4); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc2.step_counter: expected 1 (fc1.step_counter), got 4")));
  EXPECT_THAT(import_with([](auto&) {}, 7),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.step_counter: expected 7 (the step given with the state), "
                                 "got 1")));
  EXPECT_THAT(import_with([](auto& s) { s["fc1.step_counter"].fill_(-1); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("fc1.step_counter: expected a value within [0, 2^47 = "
                                 "140737488355328], got -1")));
  // A step counter so large that step_counter * group_size would overflow the scale's divisor.
  EXPECT_THAT(import_with([](auto& s) { s["fc1.step_counter"].fill_(int64_t{1} << 62); }),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("got 4611686018427387904")));
  EXPECT_THAT(import_with([](auto&) {}, core::kMaxStep + 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("step: expected a value")));
  EXPECT_TRUE(import_with([](auto&) {}, 1).ok());
}

// A model at the largest step trains no further: the update is refused, the state unchanged.
TEST(ModelTest, UpdateAtTheLargestStepIsRefused) {
  auto m = NewModel();
  core::StateDict s = m->ExportState().tensors;
  for (auto& [key, t] : s) {
    if (key.size() > 13 && key.substr(key.size() - 13) == ".step_counter") t.fill_(core::kMaxStep);
  }
  auto at_max = Model::Import(m->spec(), s, std::nullopt, testing::TestDevice());
  ASSERT_TRUE(at_max.ok()) << at_max.status();
  auto f = (*at_max)->Forward(Input(4, 12, 1), true);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE((*at_max)->Backward(f->pass_id, Input(4, 5, 2), false).ok());
  EXPECT_THAT((*at_max)->UpdateCorrelation(core::kMaxStep),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("the largest this server counts to")));
  EXPECT_EQ((*at_max)->step(), core::kMaxStep);
  EXPECT_TRUE(SameState((*at_max)->ExportState().tensors, s));
}

TEST(ModelTest, ConcurrentClientsWithRetriedUpdatesLoseAndDoubleNothing) {
  auto m = NewModel();
  constexpr int kThreads = 4, kRounds = 25;
  std::atomic<int> applied{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        auto f = m->Forward(Input(2, 12, t * 100 + r), true);
        if (!f.ok()) continue;
        if (!m->Backward(f->pass_id, Input(2, 5, r), false).ok()) continue;  // released meanwhile
        // Every client tries to apply the step it trained in, twice (a retry).
        for (int attempt = 0; attempt < 2; ++attempt) {
          auto u = m->UpdateCorrelation(f->step);
          if (u.ok() && !u->replayed) applied++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(m->step(), applied.load());
  EXPECT_GT(applied.load(), 0);
  for (const auto& [k, v] : m->ExportState().tensors) {
    if (k.size() > 13 && k.substr(k.size() - 13) == ".step_counter" && k.rfind("norm", 0) != 0) {
      EXPECT_EQ(v.item<int64_t>(), applied.load()) << k;
    }
  }
}

TEST(DeviceTest, ParsesDeviceNames) {
  auto cpu = core::ParseDevice("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_TRUE(cpu->is_cpu());
  EXPECT_EQ(core::DeviceName(*cpu), "cpu");
  EXPECT_THAT(core::ParseDevice("gpu"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("device: expected cpu, cuda or cuda:N, got 'gpu'")));
  EXPECT_THAT(core::ParseDevice("cuda:x"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got 'cuda:x'")));
  EXPECT_THAT(core::ParseDevice("cuda:99"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("device: 'cuda:99' is not available")));
  if (core::CudaDeviceCount() == 0) {
    EXPECT_TRUE(core::DefaultDevice().is_cpu());
  } else {
    EXPECT_EQ(core::DeviceName(core::ParseDevice("cuda").value()), "cuda:0");
  }
}

}  // namespace
}  // namespace tscale

namespace tscale {
namespace {

TEST(ModelTest, ModelTooLargeForMemoryIsResourceExhausted) {
  // With overcommit "always", the allocation succeeds and the kernel kills the process when the
  // pages are touched: nothing a program can turn into a status.
  if (std::ifstream("/proc/sys/vm/overcommit_memory").get() == '1') {
    GTEST_SKIP() << "vm.overcommit_memory is 1 (always): an allocation beyond memory cannot fail";
  }
  // 2^39 weights pass validation but need terabytes for initialisation.
  const core::ModelSpec spec{{core::LayerSpec{
      "fc", core::TernaryLinearSpec{int64_t{1} << 8, (int64_t{1} << 31) - 1, 0, 0.0f, false}}}};
  EXPECT_THAT(core::Model::Create(spec, 1, c10::Device(c10::kCPU)),
              testing::StatusIs(absl::StatusCode::kResourceExhausted,
                                ::testing::HasSubstr("allocating a model of 549755813632 weights "
                                                     "on cpu: out of memory")));
}

}  // namespace
}  // namespace tscale

namespace tscale {
namespace {

// Training inputs are checked for NaN and Inf on the CPU by their bits: every kind of non-finite
// value is refused, in dense tensors and in others, and the extremes of the finite ones pass.
TEST(ModelTest, NonFiniteTrainingInputsAreRefused) {
  auto m = NewModel();
  const float bad[] = {std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN(),
                       -std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::signaling_NaN()};
  for (float v : bad) {
    at::Tensor x = Input(4, 12, 1);
    x[3][11] = v;
    EXPECT_THAT(m->Forward(x, true), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("expected finite values")))
        << v;
    at::Tensor xt = Input(12, 4, 1);
    xt[0][3] = v;
    EXPECT_THAT(m->Forward(xt.t(), true), StatusIs(absl::StatusCode::kInvalidArgument,
                                                   HasSubstr("expected finite values")))
        << v << " (not contiguous)";
  }
  at::Tensor x = Input(4, 12, 1);
  x[0][0] = std::numeric_limits<float>::max();
  x[1][1] = -std::numeric_limits<float>::max();
  x[2][2] = std::numeric_limits<float>::denorm_min();
  EXPECT_TRUE(m->Forward(x, true).ok());
}

// On a CUDA device each model's work runs on a stream of its own, so that one model's long step
// does not hold up another's kernels. The big model's TrainStep asks its interrupt once its
// forward and backward are queued and before anything waits for them; from there, the small
// model's Forward must come back while the big model's stream is still busy (on one shared stream
// it would have waited for those kernels), and both results must equal those of models run alone.
TEST(ModelTest, ModelsOnOneGpuDoNotWaitForEachOther) {
  const c10::Device device = testing::TestDevice();
  if (!device.is_cuda()) GTEST_SKIP() << "device streams: for models on a CUDA device";
  // Two 4096x4096 layers at batch 8192: about 1.6 TFLOP of FP32 GEMMs, tens of ms on any GPU,
  // against a small Forward's tens of microseconds.
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 4096, "out_features": 4096}},
    {"name": "fc2", "ternary_linear": {"in_features": 4096, "out_features": 4096}}]})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto big = Model::Create(*spec, 3, device);
  auto twin = Model::Create(*spec, 3, device);
  ASSERT_TRUE(big.ok() && twin.ok());
  auto small = NewModel();
  // Made on the test's own stream: the big model's stream must wait for them.
  const at::Tensor x = at::randn({8192, 4096}, at::TensorOptions().device(device));
  const at::Tensor target = at::randn({8192, 4096}, at::TensorOptions().device(device));
  const at::Tensor xs = Input(3, 12, 5);
  auto alone = small->Forward(xs, false);
  ASSERT_TRUE(alone.ok()) << alone.status();

  bool big_busy = false;
  at::Tensor small_out;
  auto step = (*big)->TrainStep(x, target, core::Loss::kMse, 0, [&]() -> absl::Status {
    // The current stream here is the big model's.
    const c10::Stream big_stream =
        c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
    auto f = small->Forward(xs, false);
    big_busy = !big_stream.query();
    if (!f.ok()) return f.status();
    small_out = f->output;
    return absl::OkStatus();
  });
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_TRUE(big_busy) << "the small model's Forward waited for the big model's kernels";
  ASSERT_TRUE(small_out.defined());
  EXPECT_TRUE(at::equal(small_out.cpu(), alone->output.cpu()));

  auto alone_step = (*twin)->TrainStep(x, target, core::Loss::kMse, 0);
  ASSERT_TRUE(alone_step.ok()) << alone_step.status();
  EXPECT_EQ(step->loss, alone_step->loss);
  EXPECT_TRUE(at::equal(step->output.cpu(), alone_step->output.cpu()));
  EXPECT_TRUE(SameState((*big)->ExportState().tensors, (*twin)->ExportState().tensors));
}

}  // namespace
}  // namespace tscale
