// TrainStep, drift statistics and the model registry.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <limits>

#include "server/core/model.h"
#include "server/core/registry.h"
#include "server/core/scale_stats.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using core::Loss;
using core::Model;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::SameState;
using testing::StatusIs;


core::ModelSpec MlpSpec() {
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 12, "out_features": 16, "group_size": 8}},
    {"name": "norm", "ternary_rms_norm": {"dim": 16, "group_size": 8}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 16, "out_features": 5, "bias": true}}]})");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

std::unique_ptr<Model> NewModel(uint64_t seed = 3) {
  auto m = Model::Create(MlpSpec(), seed, testing::TestDevice());
  EXPECT_TRUE(m.ok()) << m.status();
  return *std::move(m);
}

at::Tensor Randn(std::vector<int64_t> shape, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen);
}

at::Tensor Classes(int64_t batch, int64_t classes, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(classes, {batch}, gen, at::kLong);
}

// The loss's gradient w.r.t. y, as a client would compute it for Backward.
at::Tensor LossGrad(const at::Tensor& y, const at::Tensor& target, Loss loss) {
  c10::AutoGradMode grad_mode(true);
  at::Tensor leaf = y.detach().to(at::kCPU).requires_grad_(true);
  at::Tensor value = loss == Loss::kMse ? at::mse_loss(leaf, target)
                                        : at::cross_entropy_loss(leaf, target);
  return torch::autograd::grad({value}, {leaf})[0];
}

// Trains one model with TrainStep and another with Forward, Backward of the loss's gradient and
// UpdateCorrelation, on the same batches (`x` of each step from Input(step)); each step's output,
// loss and update figures and the final states must be equal.
// The models are MlpSpec()'s, or `spec`'s (12 inputs and 5 outputs too). On CUDA the TrainSteps
// from the third on replay a captured graph (ModelOptions::cuda_graphs), `graphed` of the six.
void ExpectTrainStepEqualsTheThreeCalls(Loss loss, int64_t batch, core::ComputeType compute,
                                        const std::function<at::Tensor(int)>& input,
                                        const core::ModelSpec& spec = MlpSpec(),
                                        int64_t graphed = 4) {
  core::ModelOptions options;
  options.compute = compute;
  auto a = Model::Create(spec, 3, testing::TestDevice(), options);
  auto b = Model::Create(spec, 3, testing::TestDevice(), options);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  Model* fused = a->get();
  Model* steps = b->get();
  for (int s = 0; s < 6; ++s) {
    SCOPED_TRACE(::testing::Message() << "step " << s << ", batch " << batch);
    const at::Tensor x = input(s);
    const at::Tensor t =
        loss == Loss::kMse ? Randn({batch, 5}, 200 + s) : Classes(batch, 5, 200 + s);
    auto r = fused->TrainStep(x, t, loss, s);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(r->update.replayed);
    EXPECT_EQ(r->update.step, s + 1);

    auto f = steps->Forward(x, true);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_TRUE(at::equal(r->output, f->output));
    // The loss computed where the model computes it, so that the reduction rounds alike.
    const at::Tensor y = f->output, td = t.to(y.device());
    const at::Tensor expected_loss =
        loss == Loss::kMse ? at::mse_loss(y, td) : at::cross_entropy_loss(y, td);
    EXPECT_EQ(r->loss, expected_loss.item<double>());
    ASSERT_TRUE(steps->Backward(f->pass_id, LossGrad(f->output, t, loss), false).ok());
    auto u = steps->UpdateCorrelation(s);
    ASSERT_TRUE(u.ok()) << u.status();
    ASSERT_EQ(u->layers.size(), r->update.layers.size());
    for (size_t i = 0; i < u->layers.size(); ++i) {
      EXPECT_EQ(u->layers[i].layer, r->update.layers[i].layer);
      EXPECT_EQ(u->layers[i].score_sum, r->update.layers[i].score_sum);
      EXPECT_EQ(u->layers[i].mean_abs_drift, r->update.layers[i].mean_abs_drift);
    }
  }
  EXPECT_TRUE(SameState(fused->ExportState().tensors, steps->ExportState().tensors));
  EXPECT_EQ(fused->graphed_steps(), testing::TestDevice().is_cuda() ? graphed : 0);
}

class TrainStepLossTest : public ::testing::TestWithParam<Loss> {};

// TrainStep is Forward + Backward of the loss's gradient + UpdateCorrelation, exactly.
TEST_P(TrainStepLossTest, EqualsTheThreeCalls) {
  ExpectTrainStepEqualsTheThreeCalls(GetParam(), 6, core::ComputeType::kFp32,
                                     [](int s) { return Randn({6, 12}, 100 + s); });
}

// With one sample, TrainStep takes each layer's weight gradient in its two factors (no [out, in]
// gradient); the Backward of the three calls forms the whole gradient. Both compute types of
// every device, and TF32 where it runs.
TEST_P(TrainStepLossTest, OfOneSampleEqualsTheThreeCalls) {
  std::vector<core::ComputeType> computes = {core::ComputeType::kFp32, core::ComputeType::kBf16};
  if (testing::TestDevice().is_cuda()) computes.push_back(core::ComputeType::kTf32);
  for (core::ComputeType compute : computes) {
    SCOPED_TRACE(core::ComputeName(compute));
    ExpectTrainStepEqualsTheThreeCalls(GetParam(), 1, compute,
                                       [](int s) { return Randn({1, 12}, 300 + s); });
  }
}

// Products of the two factors that could underflow (inputs of the smallest subnormal float, whose
// product with any gradient below 1/2 rounds to zero): the factored scores would count a sign where
// the whole gradient has zero, so TrainStep takes the whole gradient for that step.
// One linear layer (no bias: weights drawn with std 0.1, so most trits are nonzero), so that the
// loss's gradient, mostly under 1/2, meets the tiny inputs.
TEST_P(TrainStepLossTest, OfOneSampleWithATinyInputEqualsTheThreeCalls) {
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc", "ternary_linear": {"in_features": 12, "out_features": 5,
                                      "group_size": 4}}]})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ExpectTrainStepEqualsTheThreeCalls(
      GetParam(), 1, core::ComputeType::kFp32,
      [](int s) {
        at::Tensor x = Randn({1, 12}, 400 + s);
        x.index_put_({0, at::indexing::Slice(0, 6)}, std::numeric_limits<float>::denorm_min());
        return x;
      },
      *spec, /*graphed=*/0);  // a graph's step whose factored scores could be inexact runs again
}

// A TrainStep replayed from its shape's CUDA graph equals the same step launched operation by
// operation, bit for bit (output, loss, figures, state), in every compute type, on the packed
// route and off it; with other calls between the steps (an inference, the three calls' update,
// a step of another shape), a retry, and a step whose loss is not finite, which changes nothing.
TEST_P(TrainStepLossTest, GraphedStepsEqualStepsOpByOp) {
  if (!testing::TestDevice().is_cuda()) GTEST_SKIP() << "CUDA graphs: the models run on the CPU";
  const Loss loss = GetParam();
  // Group sizes of 32: BF16 and TF32 take batches up to 4 on the packed route.
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 96, "group_size": 32}},
    {"name": "act", "activation": {"kind": "GELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 96, "out_features": 5, "group_size": 32,
                                       "bias": true}}]})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  for (core::ComputeType compute :
       {core::ComputeType::kFp32, core::ComputeType::kTf32, core::ComputeType::kBf16}) {
    for (int64_t batch : {1, 3, 16}) {
      SCOPED_TRACE(::testing::Message() << core::ComputeName(compute) << ", batch " << batch);
      core::ModelOptions on, off;
      on.compute = off.compute = compute;
      off.cuda_graphs = false;
      auto a = Model::Create(*spec, 7, testing::TestDevice(), on);
      auto b = Model::Create(*spec, 7, testing::TestDevice(), off);
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      Model* graphed = a->get();
      Model* plain = b->get();
      auto target = [&](int64_t n, uint64_t seed) {
        return loss == Loss::kMse ? Randn({n, 5}, seed) : Classes(n, 5, seed);
      };
      auto step_both = [&](const at::Tensor& x, const at::Tensor& t) {
        const int64_t step = plain->step();
        auto r = graphed->TrainStep(x, t, loss, step);
        auto q = plain->TrainStep(x, t, loss, step);
        ASSERT_TRUE(r.ok() && q.ok()) << r.status() << q.status();
        EXPECT_TRUE(at::equal(r->output, q->output));
        EXPECT_EQ(r->loss, q->loss);
        ASSERT_EQ(r->update.layers.size(), q->update.layers.size());
        for (size_t i = 0; i < r->update.layers.size(); ++i) {
          EXPECT_EQ(r->update.layers[i].score_sum, q->update.layers[i].score_sum);
          EXPECT_EQ(r->update.layers[i].mean_abs_drift, q->update.layers[i].mean_abs_drift);
        }
        EXPECT_TRUE(SameState(graphed->ExportState().tensors, plain->ExportState().tensors));
      };
      for (int s = 0; s < 8; ++s) {
        SCOPED_TRACE(::testing::Message() << "step " << s);
        step_both(Randn({batch, 64}, 500 + s), target(batch, 600 + s));
        if (s != 4) continue;
        // Between graphed steps: an inference, an update by the three calls, another shape.
        const at::Tensor x = Randn({batch, 64}, 700);
        auto ya = graphed->Forward(x, false), yb = plain->Forward(x, false);
        ASSERT_TRUE(ya.ok() && yb.ok());
        EXPECT_TRUE(at::equal(ya->output, yb->output));
        for (Model* m : {graphed, plain}) {
          auto f = m->Forward(x, true);
          ASSERT_TRUE(f.ok()) << f.status();
          ASSERT_TRUE(m->Backward(f->pass_id, at::ones({batch, 5}), false).ok());
          ASSERT_TRUE(m->UpdateCorrelation(m->step()).ok());
        }
        step_both(Randn({batch + 1, 64}, 701), target(batch + 1, 702));
      }
      EXPECT_EQ(graphed->graphs(), 1);
      EXPECT_EQ(graphed->graphed_steps(), 6);
      EXPECT_EQ(plain->graphed_steps(), 0);

      // A retry of the last step is replayed, not run again.
      const at::Tensor x = Randn({batch, 64}, 507), t = target(batch, 607);
      auto retry = graphed->TrainStep(x, t, loss, graphed->step() - 1);
      ASSERT_TRUE(retry.ok()) << retry.status();
      EXPECT_TRUE(retry->update.replayed);

      // A loss that is not finite (MSE of outputs near the float's limit) stops the graphed step
      // before it commits, as it does the step launched operation by operation.
      if (loss == Loss::kMse) {
        const auto before = graphed->ExportState();
        const at::Tensor huge = Randn({batch, 64}, 800) * 1e30;
        const int64_t step = graphed->step();
        auto r = graphed->TrainStep(huge, target(batch, 801), loss, step);
        auto q = plain->TrainStep(huge, target(batch, 801), loss, step);
        EXPECT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
        EXPECT_THAT(q, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
        EXPECT_EQ(graphed->step(), step);
        EXPECT_TRUE(SameState(graphed->ExportState().tensors, before.tensors));
        step_both(Randn({batch, 64}, 802), target(batch, 803));
        EXPECT_EQ(graphed->graphed_steps(), 7);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Losses, TrainStepLossTest,
                         ::testing::Values(Loss::kMse, Loss::kCrossEntropy));

TEST(TrainStepTest, RetryIsReplayedAndChangesNothing) {
  auto m = NewModel();
  const at::Tensor x = Randn({4, 12}, 1), t = Classes(4, 5, 2);
  auto first = m->TrainStep(x, t, Loss::kCrossEntropy, 0);
  ASSERT_TRUE(first.ok()) << first.status();
  const auto state = m->ExportState();
  auto again = m->TrainStep(x, t, Loss::kCrossEntropy, 0);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->update.replayed);
  EXPECT_EQ(again->loss, first->loss);
  EXPECT_EQ(again->update.step, 1);
  EXPECT_FALSE(again->output.defined());
  EXPECT_EQ(m->step(), 1);
  EXPECT_TRUE(SameState(m->ExportState().tensors, state.tensors));
  // Older steps are not replayed.
  ASSERT_TRUE(m->TrainStep(x, t, Loss::kCrossEntropy, 1).ok());
  EXPECT_THAT(m->TrainStep(x, t, Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("expected_step: expected 2 (the model's step), got 0")));
}

TEST(TrainStepTest, OnlyTheSameRequestIsReplayed) {
  auto m = NewModel();
  const at::Tensor x = Randn({4, 12}, 1), t = Classes(4, 5, 2);
  ASSERT_TRUE(m->TrainStep(x, t, Loss::kCrossEntropy, 0).ok());
  // Another client's step with the same, now stale, expected_step: refused, not replayed.
  EXPECT_THAT(m->TrainStep(Randn({4, 12}, 9), t, Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("expected_step: expected 1 (the model's step), got 0")));
  EXPECT_THAT(m->TrainStep(x, Classes(4, 5, 3), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected_step")));
  EXPECT_THAT(m->TrainStep(x, at::one_hot(t, 5).to(at::kFloat), Loss::kMse, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected_step")));
  EXPECT_EQ(m->step(), 1);
}

TEST(TrainStepTest, AnUpdateCorrelationIsNotReplayedAsATrainStep) {
  auto m = NewModel();
  auto f = m->Forward(Randn({2, 12}, 1), true);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(m->Backward(f->pass_id, at::ones({2, 5}), false).ok());
  ASSERT_TRUE(m->UpdateCorrelation(0).ok());
  EXPECT_THAT(m->TrainStep(Randn({2, 12}, 1), Classes(2, 5, 1), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected_step")));
}

TEST(TrainStepTest, IncludesTheGradientsOfEarlierBackwardsOfTheStep) {
  const at::Tensor x1 = Randn({3, 12}, 5), g1 = Randn({3, 5}, 6);
  const at::Tensor x2 = Randn({3, 12}, 7), t2 = Randn({3, 5}, 8);
  auto a = NewModel();
  auto fa = a->Forward(x1, true);
  ASSERT_TRUE(a->Backward(fa->pass_id, g1, false).ok());
  ASSERT_TRUE(a->TrainStep(x2, t2, Loss::kMse, 0).ok());

  auto b = NewModel();
  auto fb1 = b->Forward(x1, true);
  ASSERT_TRUE(b->Backward(fb1->pass_id, g1, false).ok());
  auto fb2 = b->Forward(x2, true);
  ASSERT_TRUE(b->Backward(fb2->pass_id, LossGrad(fb2->output, t2, Loss::kMse), false).ok());
  ASSERT_TRUE(b->UpdateCorrelation(0).ok());
  EXPECT_TRUE(SameState(a->ExportState().tensors, b->ExportState().tensors));
}

TEST(TrainStepTest, BadRequestsChangeNothing) {
  auto m = NewModel();
  const auto before = m->ExportState();
  const at::Tensor x = Randn({4, 12}, 1);
  EXPECT_THAT(m->TrainStep(x, Randn({4, 4}, 1), Loss::kMse, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("target: expected FP32 [4, 5] for MSE, got FP32 [4, 4]")));
  EXPECT_THAT(m->TrainStep(x, Randn({4}, 1), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("target: expected INT64 [4] class indices for CROSS_ENTROPY, "
                                 "got FP32 [4]")));
  EXPECT_THAT(m->TrainStep(x, at::tensor({0, 1, 5, 2}, at::kLong), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("target: expected class indices in [0, 5), got 5")));
  EXPECT_THAT(m->TrainStep(x, at::tensor({0, -1, 1, 2}, at::kLong), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("got -1")));
  at::Tensor nan_x = x.clone();
  nan_x[1][3] = NAN;
  EXPECT_THAT(m->TrainStep(nan_x, Classes(4, 5, 1), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input: expected finite")));
  at::Tensor inf_t = Randn({4, 5}, 1);
  inf_t[0][0] = INFINITY;
  EXPECT_THAT(m->TrainStep(x, inf_t, Loss::kMse, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("target: expected finite")));
  EXPECT_THAT(m->TrainStep(Randn({4, 11}, 1), Classes(4, 5, 1), Loss::kCrossEntropy, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input: expected FP32")));
  EXPECT_THAT(m->TrainStep(x, Classes(4, 5, 1), Loss::kCrossEntropy, 3),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected_step")));
  EXPECT_EQ(m->step(), 0);
  EXPECT_TRUE(SameState(m->ExportState().tensors, before.tensors));
}

// ---------------------------------------------------------------- drift statistics

TEST(ScaleStatsTest, ExactForAKnownState) {
  // One linear layer of 2 rows x 64 columns, group size 32: four groups.
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc", "ternary_linear": {"in_features": 64, "out_features": 2}}]})");
  ASSERT_TRUE(spec.ok());
  auto fresh = Model::Create(*spec, 1, testing::TestDevice());
  ASSERT_TRUE(fresh.ok());
  core::StateDict state = (*fresh)->ExportState().tensors;
  // At step 4, groups of 32: ratio = corr / 128 -> -1, 0, 0.15625, 0.9921875; drift = 4 ratio.
  state["fc.corr_accum"] = at::tensor({-128, 0, 20, 127}, at::kLong);
  state["fc.step_counter"] = at::tensor({4}, at::kLong);
  auto m = Model::Import(*spec, state, std::nullopt, testing::TestDevice());
  ASSERT_TRUE(m.ok()) << m.status();

  core::ModelScaleStats stats = (*m)->ScaleStats(/*per_group=*/true);
  EXPECT_EQ(stats.step, 4);
  ASSERT_EQ(stats.layers.size(), 1u);
  const core::LayerScaleStats& l = stats.layers[0];
  EXPECT_EQ(l.layer, "fc");
  EXPECT_EQ(l.groups, 4);
  EXPECT_DOUBLE_EQ(l.drift_min, -4.0);
  EXPECT_DOUBLE_EQ(l.drift_max, 3.96875);
  EXPECT_DOUBLE_EQ(l.drift_mean, (-4.0 + 0 + 0.625 + 3.96875) / 4);
  EXPECT_DOUBLE_EQ(l.drift_abs_mean, (4.0 + 0 + 0.625 + 3.96875) / 4);
  EXPECT_DOUBLE_EQ(l.saturated_fraction, 0.5);  // -1 and 0.9921875 are >= 0.99 in magnitude
  // Bounds: -3.96 -3 -2 -1 -0.5 -0.25 -0.125 0 0.125 0.25 0.5 1 2 3 3.96 (+Inf).
  EXPECT_THAT(l.bucket_count, ElementsAre(1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1));
  ASSERT_TRUE(l.log2_scale.defined());
  const at::Tensor e = state["fc.E"].to(at::kFloat);
  const at::Tensor expected = e + at::tensor({-4.0f, 0.0f, 0.625f, 3.96875f});
  EXPECT_TRUE(at::equal(l.log2_scale, expected)) << l.log2_scale << expected;
}

TEST(ScaleStatsTest, FreshModelHasNoDrift) {
  auto m = NewModel();
  core::ModelScaleStats stats = m->ScaleStats(false);
  ASSERT_EQ(stats.layers.size(), 3u);  // fc1, norm, fc2 in spec order
  EXPECT_EQ(stats.layers[0].layer, "fc1");
  EXPECT_EQ(stats.layers[1].layer, "norm");
  EXPECT_EQ(stats.layers[2].layer, "fc2");
  for (const auto& l : stats.layers) {
    EXPECT_EQ(l.drift_abs_mean, 0);
    EXPECT_EQ(l.saturated_fraction, 0);
    EXPECT_FALSE(l.log2_scale.defined());
    // Drift 0 lands in the bucket whose upper bound is 0.
    EXPECT_EQ(l.bucket_count[7], l.groups);
  }
}

TEST(ScaleStatsTest, MatchesTheUpdatesDrift) {
  auto m = NewModel();
  auto r = m->TrainStep(Randn({8, 12}, 1), Classes(8, 5, 1), Loss::kCrossEntropy, 0);
  ASSERT_TRUE(r.ok());
  core::ModelScaleStats stats = m->ScaleStats(false);
  EXPECT_DOUBLE_EQ(stats.layers[0].drift_abs_mean, r->update.layers[0].mean_abs_drift);
  EXPECT_DOUBLE_EQ(stats.layers[2].drift_abs_mean, r->update.layers[1].mean_abs_drift);
}

// ---------------------------------------------------------------- registry

TEST(RegistryTest, ModelIds) {
  EXPECT_TRUE(core::ValidateModelId("model-1.v2_a").ok());
  EXPECT_TRUE(core::ValidateModelId(std::string(64, 'a')).ok());
  EXPECT_THAT(core::ValidateModelId(""),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("model_id: expected 1-64 characters of [A-Za-z0-9_.-], the "
                                 "first not '.', got ''")));
  for (const char* dots : {".", "..", ".hidden"}) {
    EXPECT_THAT(core::ValidateModelId(dots),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("the first not '.'")));
  }
  EXPECT_THAT(core::ValidateModelId(std::string(65, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("65 characters")));
  EXPECT_THAT(core::ValidateModelId("a/b", "header.model_id"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("header.model_id")));
}

TEST(RegistryTest, AddGetReplaceRemove) {
  core::ModelRegistry r;
  std::shared_ptr<Model> a = NewModel(1), b = NewModel(2);
  EXPECT_THAT(r.Get("a"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("no model 'a'")));
  ASSERT_TRUE(r.Add("a", a).ok());
  EXPECT_THAT(r.Add("a", b), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("'a'")));
  EXPECT_THAT(r.CheckFree("a"), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("'a'")));
  EXPECT_EQ(*r.Get("a"), a);
  ASSERT_TRUE(r.Add("a", b, /*replace=*/true).ok());
  EXPECT_EQ(*r.Get("a"), b);
  ASSERT_TRUE(r.Add("0", a).ok());
  auto list = r.List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].first, "0");
  EXPECT_EQ(list[1].first, "a");
  list.clear();
  ASSERT_TRUE(r.Remove("a").ok());
  EXPECT_THAT(r.Remove("a"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("'a'")));
  EXPECT_EQ(r.size(), 1u);
  // A request holding the model keeps it alive after removal; the registry's reference is gone.
  std::weak_ptr<Model> weak = b;
  b.reset();
  EXPECT_TRUE(weak.expired());
}

}  // namespace
}  // namespace tscale
