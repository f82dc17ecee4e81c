// Compute types and the layers' own GEMMs and kernels: FP32 keeps F.linear's bits, BF16 and TF32
// are opt-in and close to FP32, and on CUDA the fused kernels equal the reference's tensor
// expressions bit for bit.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "server/core/device.h"
#include "server/core/model.h"
#include "server/core/trits.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using core::ComputeType;
using core::Loss;
using core::Model;
using ::testing::HasSubstr;
using testing::StatusIs;

const c10::Device kCpu(c10::kCPU);

at::Tensor Randn(std::vector<int64_t> shape, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen);
}

core::ModelSpec LinearSpec(int64_t in, int64_t out, int64_t gs, bool bias = false) {
  core::ModelSpec spec;
  core::LayerSpec layer;
  layer.name = "fc";
  core::TernaryLinearSpec l;
  l.in_features = in;
  l.out_features = out;
  l.group_size = gs;
  l.bias = bias;
  layer.kind = l;
  spec.layers.push_back(layer);
  return spec;
}

core::ModelSpec MlpSpec() {
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 24, "out_features": 32, "group_size": 8}},
    {"name": "norm", "ternary_rms_norm": {"dim": 32, "group_size": 8}},
    {"name": "act", "activation": {"kind": "GELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 32, "out_features": 6, "bias": true}}]})");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

// A ternary linear layer of `rows` x `cols`, initialised from `seed`, in `compute`.
absl::StatusOr<core::TernaryLinear> NewLayer(int64_t rows, int64_t cols, int64_t gs,
                                             uint64_t seed, ComputeType compute,
                                             c10::Device device) {
  core::TernaryLinearSpec spec;
  spec.in_features = cols;
  spec.out_features = rows;
  spec.group_size = gs;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto layer = core::TernaryLinear::Init(spec, gen, device);
  if (layer.ok()) layer->SetCompute(compute);
  return layer;
}

bool BitEqual(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const at::Tensor ca = a.to(at::kCPU).contiguous(), cb = b.to(at::kCPU).contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// The layer's autograd node gives exactly what F.linear's autograd gives: output, input gradient
// and weight gradient, bit for bit, for ordinary shapes and the degenerate ones where LibTorch's
// backward formulas switch to column-major products.
TEST(ComputeTest, Fp32LayerEqualsLinearAutogradBitForBit) {
  struct Shape {
    int64_t batch, in, out, gs;
  };
  for (const Shape& sh : {Shape{5, 40, 12, 8}, Shape{1, 1, 7, 1}, Shape{3, 1, 4, 1},
                          Shape{1, 9, 1, 4}, Shape{17, 33, 65, 32}}) {
    SCOPED_TRACE(::testing::Message() << "batch " << sh.batch << " in " << sh.in << " out "
                                      << sh.out);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
    core::TernaryLinearSpec spec;
    spec.in_features = sh.in;
    spec.out_features = sh.out;
    spec.group_size = sh.gs;
    auto layer = core::TernaryLinear::Init(spec, gen, kCpu);
    ASSERT_TRUE(layer.ok()) << layer.status();
    const at::Tensor x0 = Randn({sh.batch, sh.in}, 1), g = Randn({sh.batch, sh.out}, 2);

    c10::AutoGradMode grad_mode(true);
    at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor w = layer->WeightLeaf();
    at::Tensor y = layer->Forward(x);
    auto grads = torch::autograd::grad({y}, {x, w}, {g});

    at::Tensor rx = x0.clone().requires_grad_(true);
    at::Tensor rw = w.detach().clone().requires_grad_(true);
    at::Tensor ry = at::linear(rx, rw);
    auto rgrads = torch::autograd::grad({ry}, {rx, rw}, {g});

    EXPECT_TRUE(BitEqual(y, ry));
    EXPECT_TRUE(BitEqual(grads[0], rgrads[0]));
    EXPECT_TRUE(BitEqual(grads[1], rgrads[1]));
  }
}

TEST(ComputeTest, Tf32IsRefusedOffCuda) {
  core::ModelOptions options;
  options.compute = ComputeType::kTf32;
  EXPECT_THAT(Model::Create(MlpSpec(), 1, kCpu, options),
              StatusIs(absl::StatusCode::kUnimplemented,
                       HasSubstr("compute: COMPUTE_TF32 runs on CUDA tensor cores; the model's "
                                 "device is cpu. Use COMPUTE_FP32 or COMPUTE_BF16")));
  auto fp32 = Model::Create(MlpSpec(), 1, kCpu);
  ASSERT_TRUE(fp32.ok());
  EXPECT_THAT(Model::Import(MlpSpec(), (*fp32)->ExportState().tensors, std::nullopt, kCpu,
                            options),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("COMPUTE_TF32")));
  options.compute = static_cast<ComputeType>(7);
  EXPECT_THAT(Model::Create(MlpSpec(), 1, kCpu, options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("compute: expected")));
}

// How far a faster mode is from FP32 after one forward and backward of the same model: the
// relative output error and the fraction of weight-gradient signs equal to FP32's.
struct Distance {
  double output_error = 0;
  double sign_agreement = 0;
};

Distance Compare(c10::Device device, ComputeType compute, int64_t batch) {
  const core::ModelSpec spec = LinearSpec(256, 128, 32);
  core::ModelOptions options;
  options.compute = compute;
  auto fast = Model::Create(spec, 5, device, options);
  auto exact = Model::Create(spec, 5, device);
  EXPECT_TRUE(fast.ok()) << fast.status();
  EXPECT_TRUE(exact.ok()) << exact.status();
  const at::Tensor x = Randn({batch, 256}, 8), g = Randn({batch, 128}, 9);
  auto f1 = (*fast)->Forward(x, true);
  auto f0 = (*exact)->Forward(x, true);
  EXPECT_TRUE(f1.ok() && f0.ok());
  EXPECT_EQ(f1->output.scalar_type(), at::kFloat);
  Distance d;
  d.output_error = ((f1->output - f0->output).abs().max() / f0->output.abs().max()).item<double>();
  EXPECT_TRUE((*fast)->Backward(f1->pass_id, g, false).ok());
  EXPECT_TRUE((*exact)->Backward(f0->pass_id, g, false).ok());
  // The weight-gradient signs decide the update: compare the scores they give.
  auto u1 = (*fast)->UpdateCorrelation(0);
  auto u0 = (*exact)->UpdateCorrelation(0);
  EXPECT_TRUE(u1.ok() && u0.ok());
  const at::Tensor c1 = (*fast)->ExportState().tensors.at("fc.corr_accum");
  const at::Tensor c0 = (*exact)->ExportState().tensors.at("fc.corr_accum");
  d.sign_agreement = c1.eq(c0).to(at::kDouble).mean().item<double>();
  return d;
}

TEST(ComputeTest, Bf16TrainsCloseToFp32OnCpu) {
  const Distance d = Compare(kCpu, ComputeType::kBf16, 64);
  // bfloat16 keeps 8 bits of mantissa: outputs within a few parts in a hundred of FP32's.
  EXPECT_GT(d.output_error, 0.0) << "BF16 computed exactly what FP32 did: not in bfloat16";
  EXPECT_LT(d.output_error, 0.05);
  // Most groups get the same score; gradients near zero may change sign.
  EXPECT_GT(d.sign_agreement, 0.8);
  std::printf("BF16 on cpu: output error %.3g, groups with FP32's score %.4f\n", d.output_error,
              d.sign_agreement);

  // A BF16 model trains through every path: passes, several Backward calls, TrainStep, export.
  core::ModelOptions options;
  options.compute = ComputeType::kBf16;
  auto m = Model::Create(MlpSpec(), 2, kCpu, options);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->compute(), ComputeType::kBf16);
  for (int i = 0; i < 2; ++i) {
    auto f = (*m)->Forward(Randn({4, 24}, 20 + i), true);
    ASSERT_TRUE(f.ok()) << f.status();
    auto gi = (*m)->Backward(f->pass_id, Randn({4, 6}, 30 + i), true);
    ASSERT_TRUE(gi.ok()) << gi.status();
    EXPECT_EQ(gi->scalar_type(), at::kFloat);
  }
  ASSERT_TRUE((*m)->UpdateCorrelation(0).ok());
  auto t = (*m)->TrainStep(Randn({4, 24}, 40), at::randint(6, {4}, at::kLong),
                           Loss::kCrossEntropy, 1);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(std::isfinite(t->loss));
  EXPECT_EQ((*m)->step(), 2);
  EXPECT_EQ((*m)->ExportState().tensors.at("fc1.step_counter").item<int64_t>(), 2);
}

TEST(ComputeTest, NonFiniteLossAppliesNothing) {
  auto m = Model::Create(LinearSpec(4, 3, 2), 1, kCpu);
  ASSERT_TRUE(m.ok());
  const core::StateDict before = (*m)->ExportState().tensors;
  // Finite inputs whose squared error overflows float32.
  const at::Tensor x = at::full({2, 4}, 3e38f), target = at::full({2, 3}, -3e38f);
  EXPECT_THAT((*m)->TrainStep(x, target, Loss::kMse, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("loss: the MSE loss of this batch is not finite")));
  EXPECT_EQ((*m)->step(), 0);
  EXPECT_TRUE(testing::SameState((*m)->ExportState().tensors, before));
}

// ---------------------------------------------------------------- CUDA

bool HaveCuda() { return core::CudaDeviceCount() > 0; }

// The reference's w_eff, in its tensor operations on the same device.
at::Tensor ReferenceWeight(const core::StateDict& s, const std::string& name, int64_t rows,
                           int64_t cols, int64_t gs, c10::Device device) {
  const int64_t step = s.at(name + ".step_counter").item<int64_t>();
  auto trits = core::UnpackTernary(s.at(name + ".T_packed"), rows * cols);
  EXPECT_TRUE(trits.ok());
  at::Tensor e = s.at(name + ".E").to(device).to(at::kFloat);
  if (step > 0) {
    e = e + s.at(name + ".corr_accum").to(device).to(at::kFloat) / std::max<int64_t>(step * gs, 1) *
                4.0;
  }
  const int64_t gpr = (cols + gs - 1) / gs;
  at::Tensor scale = at::exp2(e).view({rows, gpr}).repeat_interleave(gs, 1).narrow(1, 0, cols);
  return scale * trits->view({rows, cols}).to(device).to(at::kFloat);
}

// TernaryState::Updated: corr_accum - scores and the update's two figures (added into the given
// ones), the state untouched until Commit takes the result; scores of another length refused.
void ExpectUpdatedEqualsTheExpressions(c10::Device device, int64_t rows, int64_t cols,
                                       int64_t gs) {
  SCOPED_TRACE(::testing::Message() << device << " " << rows << "x" << cols << " gs " << gs);
  auto layer = NewLayer(rows, cols, gs, 5, ComputeType::kFp32, device);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const int64_t groups = layer->state().groups();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(groups);
  const auto ints = [&](int64_t bound) {
    return at::randint(-bound, bound + 1, {groups}, gen, at::kLong).to(device);
  };
  layer->Apply(ints(int64_t{1} << 40));  // corr_accum far from zero, of both signs
  const at::Tensor before = layer->state().corr_accum().clone();
  const int64_t step = layer->state().step_counter();
  const at::Tensor scores = ints(gs);
  const at::Tensor figures =
      at::tensor({int64_t{5}, int64_t{-7}}, at::TensorOptions(at::kLong)).to(device);
  const at::Tensor after = layer->state().Updated(scores, figures);
  const at::Tensor expected = before - scores;
  EXPECT_TRUE(at::equal(after.cpu(), expected.cpu()));
  EXPECT_EQ(figures[0].item<int64_t>(), 5 + scores.sum().item<int64_t>());
  EXPECT_EQ(figures[1].item<int64_t>(), -7 + expected.abs().sum().item<int64_t>());
  EXPECT_TRUE(at::equal(layer->state().corr_accum().cpu(), before.cpu()));
  EXPECT_EQ(layer->state().step_counter(), step);
  EXPECT_THROW(layer->state().Updated(scores.narrow(0, 0, groups - 1), figures), c10::Error);
  layer->Commit(after);
  EXPECT_TRUE(at::equal(layer->state().corr_accum().cpu(), expected.cpu()));
  EXPECT_EQ(layer->state().step_counter(), step + 1);
}

TEST(ComputeTest, UpdatedEqualsTheExpressions) {
  ExpectUpdatedEqualsTheExpressions(kCpu, 33, 257, 16);
  ExpectUpdatedEqualsTheExpressions(kCpu, 1, 1, 1);
}

// On CUDA, with a state of 4096x4096 too.
TEST(ComputeCudaTest, UpdatedEqualsTheExpressions) {
  if (!HaveCuda()) GTEST_SKIP() << "no CUDA device in this build or machine";
  const c10::Device cuda(c10::kCUDA, 0);
  ExpectUpdatedEqualsTheExpressions(cuda, 33, 257, 16);
  ExpectUpdatedEqualsTheExpressions(cuda, 1, 1, 1);
  ExpectUpdatedEqualsTheExpressions(cuda, 4096, 4096, 32);
}

// A layer's forward and update equal the reference's tensor expressions bit for bit on `device`
// (on CUDA the fused kernels, on the CPU its one-pass w_eff), for three steps of each shape.
// Ragged groups (cols not a multiple of gs), gs 1, and whole warps inside groups (gs a multiple
// of 32 over columns a multiple of 32: the scores kernel's warp-sum path), and groups wider than
// the row; groups straddling the kernels' 1024-column blocks: gs 48 over 2100 columns, gs 1 over
// 1500; a layer large enough that the CPU's pass is split between threads.
void ExpectLayerEqualsTheReferenceExpressions(c10::Device device) {
  struct Shape {
    int64_t rows, cols, gs;
  };
  for (const Shape& sh : {Shape{64, 100, 32}, Shape{7, 13, 1}, Shape{33, 257, 16},
                          Shape{3, 2100, 48}, Shape{2, 1500, 1}, Shape{40, 128, 32},
                          Shape{5, 2048, 64}, Shape{3, 1000, 96}, Shape{2, 1300, 512},
                          Shape{4, 20, 32}, Shape{300, 1000, 96}}) {
    SCOPED_TRACE(::testing::Message() << device << " " << sh.rows << "x" << sh.cols << " gs "
                                      << sh.gs);
    auto m = Model::Create(LinearSpec(sh.cols, sh.rows, sh.gs), 3, device);
    ASSERT_TRUE(m.ok()) << m.status();
    for (int64_t step = 0; step < 3; ++step) {
      auto f = (*m)->Forward(Randn({8, sh.cols}, 50 + step), true);
      ASSERT_TRUE(f.ok()) << f.status();
      const core::StateDict s = (*m)->ExportState().tensors;
      // Forward's output = x @ w_eff^T with the reference's w_eff.
      const at::Tensor w = ReferenceWeight(s, "fc", sh.rows, sh.cols, sh.gs, device);
      EXPECT_TRUE(BitEqual(f->output, at::linear(Randn({8, sh.cols}, 50 + step).to(device), w)));
      // The update's scores = the reference's sign(grad) * T summed per group.
      const at::Tensor g = Randn({8, sh.rows}, 60 + step).to(device);
      ASSERT_TRUE((*m)->Backward(f->pass_id, g, false).ok());
      const at::Tensor grad_w = g.t().mm(Randn({8, sh.cols}, 50 + step).to(device));
      auto trits = core::UnpackTernary(s.at("fc.T_packed"), sh.rows * sh.cols);
      at::Tensor signed_t =
          grad_w.sign().to(at::kChar) * trits->view({sh.rows, sh.cols}).to(device);
      const int64_t gpr = (sh.cols + sh.gs - 1) / sh.gs;
      signed_t = at::constant_pad_nd(signed_t, {0, gpr * sh.gs - sh.cols});
      const at::Tensor scores =
          signed_t.view({sh.rows, gpr, sh.gs}).sum(2, false, at::kLong).flatten().to(at::kCPU);
      ASSERT_TRUE((*m)->UpdateCorrelation(step).ok());
      EXPECT_TRUE(at::equal((*m)->ExportState().tensors.at("fc.corr_accum"),
                            s.at("fc.corr_accum") - scores));
    }
  }
}

TEST(ComputeTest, LayerEqualsTheReferenceExpressions) {
  ExpectLayerEqualsTheReferenceExpressions(kCpu);
}

// w_eff in float32 and bfloat16 is the reference's S * T and its conversion, bit for bit, with
// scales of fractional exponents (corr_accum moved by updates), whose float32 mantissas bfloat16
// must round.
TEST(ComputeTest, EffectiveWeightEqualsTheReferenceInEachDtype) {
  struct Shape {
    int64_t rows, cols, gs;
  };
  for (const Shape& sh : {Shape{7, 13, 1}, Shape{33, 257, 16}, Shape{300, 1000, 96}}) {
    SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " gs " << sh.gs);
    auto layer = NewLayer(sh.rows, sh.cols, sh.gs, 9, ComputeType::kFp32, kCpu);
    ASSERT_TRUE(layer.ok()) << layer.status();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(10);
    for (int step = 0; step < 3; ++step) {
      layer->Apply(at::randint(-sh.gs, sh.gs + 1, {layer->state().groups()}, gen, at::kLong));
    }
    core::StateDict s;
    layer->Export("fc", &s);
    const at::Tensor w = ReferenceWeight(s, "fc", sh.rows, sh.cols, sh.gs, kCpu);
    const at::Tensor w_bf16 = w.to(at::kBFloat16);
    EXPECT_FALSE(BitEqual(w_bf16.to(at::kFloat), w)) << "no scale for bfloat16 to round";
    EXPECT_TRUE(BitEqual(layer->state().EffectiveWeight(at::kFloat), w));
    EXPECT_TRUE(BitEqual(layer->state().EffectiveWeight(at::kBFloat16), w_bf16));
  }
}

TEST(ComputeCudaTest, FusedKernelsEqualTheReferenceExpressions) {
  if (!HaveCuda()) GTEST_SKIP() << "no CUDA device in this build or machine";
  ExpectLayerEqualsTheReferenceExpressions(c10::Device(c10::kCUDA, 0));
}

TEST(ComputeCudaTest, Tf32AndBf16AreCloseToFp32) {
  if (!HaveCuda()) GTEST_SKIP() << "no CUDA device in this build or machine";
  const c10::Device cuda(c10::kCUDA, 0);
  for (ComputeType compute : {ComputeType::kTf32, ComputeType::kBf16}) {
    const Distance d = Compare(cuda, compute, 64);
    EXPECT_GT(d.output_error, 0.0) << core::ComputeName(compute) << " computed FP32's bits";
    EXPECT_LT(d.output_error, 0.05) << core::ComputeName(compute);
    EXPECT_GT(d.sign_agreement, 0.8) << core::ComputeName(compute);
    std::printf("%s on cuda: output error %.3g, groups with FP32's score %.4f\n",
                std::string(core::ComputeName(compute)).c_str(), d.output_error,
                d.sign_agreement);
  }
}

// The packed route (BF16 and TF32, batches up to the layer's packed batch limit, group sizes
// that are multiples of 32): the forward, the input gradient and the scores come from the packed
// trits without w_eff, close to the w_eff route's products (the same rounded operands, sums in
// another order), the same from run to run, and at batch 1 the scores equal the whole gradient's.
// Batches beyond the limit (each mode's DefaultPackedBatchLimit; the kernels take up to 16), and
// group sizes the kernels do not take, are refused by Packed().
TEST(ComputeCudaTest, PackedRouteIsCloseToTheWeightRoute) {
  if (!HaveCuda()) GTEST_SKIP() << "no CUDA device in this build or machine";
  const c10::Device cuda(c10::kCUDA, 0);
  struct Shape {
    int64_t rows, cols, gs;
    bool served;
  };
  // 300 rows: the input gradient's row chunks (128) are added by a second kernel; 2100 columns:
  // the forward's column parts (1024 columns each) too; 257 columns: a ragged last group and a
  // partial chunk of 16; 33 rows: a partial warp of rows; gs 64 over 40 columns is one group of
  // 40: refused.
  for (const Shape& sh : {Shape{64, 96, 32, true}, Shape{300, 1000, 64, true},
                          Shape{40, 2100, 32, true}, Shape{33, 257, 32, true},
                          Shape{5, 40, 64, false}, Shape{8, 48, 16, false}}) {
    for (ComputeType compute : {ComputeType::kBf16, ComputeType::kTf32}) {
      for (int64_t batch : {1, 3, 16, 17}) {
        SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " gs " << sh.gs << " "
                                          << core::ComputeName(compute) << " batch " << batch);
        auto layer = NewLayer(sh.rows, sh.cols, sh.gs, 11, compute, cuda);
        ASSERT_TRUE(layer.ok()) << layer.status();
        // A step on, so that S comes from corr_accum.
        layer->Apply(layer->Scores(Randn({sh.rows, sh.cols}, 90).to(cuda)));
        ASSERT_EQ(layer->Packed(batch),
                  sh.served && batch <= core::DefaultPackedBatchLimit(compute));
        layer->SetPackedBatchLimit(16);
        const bool served = sh.served && batch <= 16;
        ASSERT_EQ(layer->Packed(batch), served);
        ASSERT_EQ(layer->Factored(batch), served || batch == 1);
        if (!served) continue;
        const bool bf16 = compute == ComputeType::kBf16;
        const at::Tensor x = Randn({batch, sh.cols}, 91).to(cuda);
        const at::Tensor g = Randn({batch, sh.rows}, 92).to(cuda);
        const at::Tensor w = layer->state().EffectiveWeight(at::kFloat);
        auto round = [&](const at::Tensor& t) {
          return bf16 ? t.to(at::kBFloat16).to(at::kFloat) : t;
        };
        auto relative = [](const at::Tensor& a, const at::Tensor& b) {
          return ((a - b).abs().max() / b.abs().max()).item<double>();
        };
        const double tolerance = bf16 ? 1.6e-2 : 2e-3;
        // Forward without autograd: no w_eff is made.
        const int64_t before = layer->device_bytes();
        at::Tensor y;
        {
          c10::NoGradGuard no_grad;
          y = layer->Forward(x);
        }
        EXPECT_LT(layer->device_bytes() - before, sh.rows * sh.cols) << "w_eff was made";
        EXPECT_LT(relative(y, round(x).mm(round(w).t())), tolerance);
        // The same bits again.
        {
          c10::NoGradGuard no_grad;
          EXPECT_TRUE(BitEqual(layer->Forward(x), y));
        }
        // With autograd: the input gradient through the packed node.
        c10::AutoGradMode grad_mode(true);
        const at::Tensor xl = x.detach().requires_grad_(true);
        at::Tensor pre_bias;
        const at::Tensor yl = layer->Forward(xl, &pre_bias);
        EXPECT_TRUE(BitEqual(yl.detach(), y));
        auto grads = torch::autograd::grad({yl}, {xl, pre_bias}, {g});
        EXPECT_LT(relative(grads[0], round(g).mm(round(w))), tolerance);
        EXPECT_TRUE(BitEqual(grads[1], g));
        // The scores from the factors against those of the whole gradient in the compute type.
        const auto factored = layer->FactorScores(g, x);
        EXPECT_FALSE(factored.exact.defined());
        const at::Tensor whole = layer->Scores(layer->WeightGradient(g, x)).to(at::kCPU);
        const at::Tensor mine = factored.scores.to(at::kCPU);
        EXPECT_TRUE(at::equal(layer->FactorScores(g, x).scores.to(at::kCPU), mine));
        EXPECT_GT(whole.abs().sum().item<int64_t>(), 0);
        if (batch == 1) {
          EXPECT_TRUE(at::equal(mine, whole));
        } else {
          EXPECT_GT(mine.eq(whole).to(at::kDouble).mean().item<double>(), 0.97);
        }
      }
    }
  }
}

// TrainStep of a BF16 or TF32 model at a batch of the packed route trains close to FP32.
TEST(ComputeCudaTest, PackedTrainStepTrainsCloseToFp32) {
  if (!HaveCuda()) GTEST_SKIP() << "no CUDA device in this build or machine";
  const c10::Device cuda(c10::kCUDA, 0);
  auto spec = core::SpecFromJson(R"({"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 128, "out_features": 96, "group_size": 32}},
    {"name": "act", "activation": {"kind": "GELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 96, "out_features": 64, "bias": true,
                                       "group_size": 32}}]})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  for (ComputeType compute : {ComputeType::kBf16, ComputeType::kTf32}) {
    SCOPED_TRACE(core::ComputeName(compute));
    const int64_t batch = core::DefaultPackedBatchLimit(compute);
    core::ModelOptions options;
    options.compute = compute;
    auto fast = Model::Create(*spec, 4, cuda, options);
    auto exact = Model::Create(*spec, 4, cuda);
    ASSERT_TRUE(fast.ok() && exact.ok());
    for (int64_t step = 0; step < 5; ++step) {
      const at::Tensor x = Randn({batch, 128}, 100 + step), t = Randn({batch, 64}, 200 + step);
      auto a = (*fast)->TrainStep(x, t, Loss::kMse, step);
      auto b = (*exact)->TrainStep(x, t, Loss::kMse, step);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_NEAR(a->loss, b->loss, 0.02 * b->loss);
    }
    const auto sa = (*fast)->ExportState().tensors, sb = (*exact)->ExportState().tensors;
    for (const char* key : {"fc1.corr_accum", "fc2.corr_accum"}) {
      const double agree = sa.at(key).eq(sb.at(key)).to(at::kDouble).mean().item<double>();
      EXPECT_GT(agree, 0.8) << key;
      std::printf("%s packed TrainStep, 5 steps of batch %lld: %s equal to FP32's in %.4f of "
                  "groups\n",
                  std::string(core::ComputeName(compute)).c_str(), static_cast<long long>(batch),
                  key, agree);
    }
    EXPECT_EQ(sa.at("fc2.step_counter").item<int64_t>(), 5);
  }
}

// One sample's weight gradient in its two factors: TernaryLinear::ScoresOfSample gives exactly the
// scores of the whole gradient g^T x, in every compute type, on the test device (CPU, or cuda:0
// through the scores kernel with a stride-0 gradient), for ragged groups, groups straddling the
// kernels' blocks, groups wider than the row, and a layer whose CPU pass is split between threads.
TEST(ComputeTest, ScoresOfASampleEqualTheWholeGradients) {
  const c10::Device device = testing::TestDevice();
  std::vector<ComputeType> computes = {ComputeType::kFp32, ComputeType::kBf16};
  if (device.is_cuda()) computes.push_back(ComputeType::kTf32);
  struct Shape {
    int64_t rows, cols, gs;
  };
  for (const Shape& sh : {Shape{64, 100, 32}, Shape{7, 13, 1}, Shape{33, 257, 16},
                          Shape{3, 2100, 48}, Shape{40, 128, 32}, Shape{2, 1300, 512},
                          Shape{4, 20, 32}, Shape{300, 1000, 96}}) {
    for (ComputeType compute : computes) {
      SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " gs " << sh.gs << " "
                                        << core::ComputeName(compute));
      auto layer = NewLayer(sh.rows, sh.cols, sh.gs, 7, compute, device);
      ASSERT_TRUE(layer.ok()) << layer.status();
      at::Tensor g = Randn({1, sh.rows}, 70).to(device), x = Randn({1, sh.cols}, 71).to(device);
      // Zeros in both factors: their products are zero, and so are their signs.
      g.index_put_({0, 0}, 0.0f);
      x.index_put_({0, 1}, 0.0f);
      const at::Tensor whole = layer->Scores(layer->WeightGradient(g, x));
      EXPECT_GT(whole.abs().sum().item<int64_t>(), 0);
      // Both ways: the tensor expressions, and what a step takes (FactorScores: in FP32 on CUDA
      // the packed scores kernel in float32 where the group size is a multiple of 32).
      for (const auto& sample : {layer->ScoresOfSample(g, x), layer->FactorScores(g, x)}) {
        if (sample.exact.defined()) {
          EXPECT_TRUE(sample.exact.item<bool>());
        }
        EXPECT_TRUE(at::equal(sample.scores.to(at::kCPU), whole.to(at::kCPU)));
      }
    }
  }
}

// Where a product of the factors could underflow, ScoresOfSample and FP32's FactorScores say so:
// there the factored scores can differ from the whole gradient's (a sign counted where the
// product is zero).
TEST(ComputeTest, ScoresOfASampleSayWhenAProductCouldUnderflow) {
  const c10::Device device = testing::TestDevice();
  core::TernaryLinearSpec spec;
  spec.in_features = 96;
  spec.out_features = 64;
  spec.group_size = 32;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(8);
  auto layer = core::TernaryLinear::Init(spec, gen, device);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const at::Tensor g = (Randn({1, 64}, 80) * 1e-3).to(device);
  // 1e-44 * |g| < 2^-150 rounds to zero: the whole gradient's column is zero.
  at::Tensor x = Randn({1, 96}, 81);
  x.index_put_({0, at::indexing::Slice(0, 32)}, 1e-44f);
  x = x.to(device);
  using Way = core::TernaryLinear::SampleScores (core::TernaryLinear::*)(const at::Tensor&,
                                                                         const at::Tensor&) const;
  // The tensor expressions count sign(g) sign(x) there (FP32's kernel takes the rounded product's
  // sign, which can equal the whole gradient's; only its flag is promised).
  const at::Tensor whole = layer->Scores(layer->WeightGradient(g, x));
  EXPECT_FALSE(at::equal(layer->ScoresOfSample(g, x).scores.to(at::kCPU), whole.to(at::kCPU)));
  for (Way way : {&core::TernaryLinear::ScoresOfSample, &core::TernaryLinear::FactorScores}) {
    auto scores_of = [&](const at::Tensor& a, const at::Tensor& b) {
      return ((*layer).*way)(a, b);
    };
    EXPECT_FALSE(scores_of(g, x).exact.item<bool>());
    // A subnormal factor (or a product under 2^-125) is refused even where no product
    // underflows: the bound does not depend on how a compute type treats subnormals.
    at::Tensor sub = Randn({1, 96}, 82);
    sub.index_put_({0, 5}, 1e-40f);
    EXPECT_FALSE(scores_of(g, sub.to(device)).exact.item<bool>());
    EXPECT_FALSE(scores_of(g, (Randn({1, 96}, 83) * 1e-36).to(device)).exact.item<bool>());
    // All-zero gradients of normal inputs: nothing can underflow, and every score is zero.
    auto zero = scores_of(at::zeros({1, 64}, g.options()), Randn({1, 96}, 84).to(device));
    EXPECT_TRUE(zero.exact.item<bool>());
    EXPECT_EQ(zero.scores.abs().sum().item<int64_t>(), 0);
  }
}

}  // namespace
}  // namespace tscale
