// One ternary linear layer's training step on a device: forward, input gradient, weight gradient
// and the correlation update, as the service runs them (TernaryLinear and its autograd node), for
// each shape, batch and compute type. Each row prints the step's time, the cuBLAS floor of the
// step's three GEMMs (forward, input gradient, weight gradient) in the same compute type measured
// in the same run, their ratio, the achieved TFLOP/s of the three GEMMs' work, the peak device
// memory of one step and what of it was already allocated when the step began (the layer's state
// and the batch; cuBLAS's workspaces are released before it, so that a step counts those its own
// GEMMs take, as the reference's count does), and for TF32 and BF16 how far they are from FP32: the
// fraction of weight-gradient signs of the mode's GEMM equal to FP32's (sign_agree), the fraction
// of group scores the step applied equal to FP32's (score_agree) and the largest output error
// relative to FP32's largest output; then the times of two of the step's kernels alone: w_eff from
// the state (weff_ms) and the per-group scores of a weight gradient (score_ms); with --model true,
// the time of a whole Model::TrainStep (MSE) on host tensors, as the service runs it (model_ms; -1
// without). Where TrainStep keeps the weight gradient in its two factors (batch 1; BF16 and TF32
// batches of the packed route on CUDA, which makes no w_eff either) so does the step; the floor
// still counts three GEMMs, and after a batch-1 row a line times the scores both ways.
// --packed-max-batch sets the layers' packed batch limit (TernaryLinear::SetPackedBatchLimit;
// default each mode's, DefaultPackedBatchLimit; 0 for none, at most 16): two runs that differ in
// it show where the packed route stops paying on a device. The model of --model keeps the
// default.
//
// Usage: layer_step [--device D] [--sizes 4096,8192] [--batches 1,16,256,4096,16384]
//                   [--computes FP32,TF32,BF16] [--group-size 32] [--seconds 0.5]
//                   [--model true|false] [--packed-max-batch N]
// Each measurement repeats until --seconds have passed (at least 5 times) after 3 warm-up steps.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/core/device.h"
#include "server/core/layers.h"
#include "server/core/model.h"
#if TSCALE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include "server/cuda/kernels.h"
#endif

namespace {

using tscale::core::ComputeType;

void Sync(const c10::Device& device) {
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#endif
  (void)device;
}

void ResetPeak(const c10::Device& device) {
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  (void)device;
}

// Frees cuBLAS's workspaces (one per stream that ran a GEMM, kept for the process's life), which
// earlier rows left: a GEMM of the next step takes its own again.
void ReleaseWorkspaces(const c10::Device& device) {
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) at::cuda::clearCublasWorkspaces();
#endif
  (void)device;
}

// Bytes allocated on the device: the peak since ResetPeak, or now; -1 off CUDA.
double AllocatedMiB(const c10::Device& device, bool peak) {
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto& bytes =
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return static_cast<double>(peak ? bytes.peak : bytes.current) / (1 << 20);
  }
#endif
  (void)device;
  (void)peak;
  return -1;
}

// Milliseconds per call of `fn`, after 3 warm-up calls, over at least 5 calls and `seconds`.
double TimeMs(const c10::Device& device, double seconds, const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  Sync(device);
  int64_t n = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    fn();
    ++n;
    if (n % 5 == 0 || n < 5) {
      Sync(device);
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  } while (n < 5 || elapsed < seconds);
  Sync(device);
  elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 1e3 * elapsed / static_cast<double>(n);
}

at::Tensor Mm(const at::Tensor& a, const at::Tensor& b, ComputeType compute) {
#if TSCALE_WITH_CUDA
  if (compute == ComputeType::kTf32) return tscale::cuda::MatmulTf32(a, b);
#endif
  (void)compute;
  return a.mm(b);
}

// The largest batch of the packed route (--packed-max-batch; unset: each mode's default).
std::optional<int64_t> packed_max_batch;

tscale::core::TernaryLinear NewLayer(int64_t n, int64_t gs, ComputeType compute,
                                     const c10::Device& device) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  tscale::core::TernaryLinearSpec spec;
  spec.in_features = n;
  spec.out_features = n;
  spec.group_size = gs;
  auto layer = tscale::core::TernaryLinear::Init(spec, gen, device);
  if (!layer.ok()) {
    std::fprintf(stderr, "layer_step: %s\n", layer.status().ToString().c_str());
    std::exit(1);
  }
  layer->SetCompute(compute);
  layer->SetPackedBatchLimit(packed_max_batch);
  return *std::move(layer);
}

// The step: forward, both gradients, scores and update; returns the output, the weight gradient
// and the applied scores of the step when asked (for the comparison with FP32). Where a
// TrainStep keeps the weight gradient in its two factors (one sample, or BF16 and TF32 batches on
// the packed route: TernaryLinear::Factored), so does the step: the scores come from
// TernaryLinear::FactorScores and no [out, in] gradient is made (the packed route makes no w_eff
// either). A sample's exactness flag is checked on the first step of each shape (`check`);
// random normal inputs never clear it.
void Step(tscale::core::TernaryLinear& layer, const at::Tensor& x, const at::Tensor& g,
          at::Tensor* y_out = nullptr, at::Tensor* grad_w_out = nullptr,
          at::Tensor* scores_out = nullptr, bool check = false) {
  c10::AutoGradMode grad_mode(true);
  const at::Tensor xl = x.detach().requires_grad_(true);
  at::Tensor y, grad_w, scores;
  if (layer.Factored(x.size(0))) {
    at::Tensor pre_bias;
    y = layer.Forward(xl, &pre_bias);
    auto grads = torch::autograd::grad({y}, {xl, pre_bias}, {g});
    auto factored = layer.FactorScores(grads[1], x);
    if (check && factored.exact.defined() && !factored.exact.item<bool>()) {
      std::fprintf(stderr, "layer_step: a product of the sample's factors could underflow\n");
      std::exit(1);
    }
    if (grad_w_out != nullptr) grad_w = layer.WeightGradient(grads[1], x);
    scores = factored.scores;
  } else {
    const at::Tensor& w = layer.WeightLeaf();
    y = layer.Forward(xl);
    auto grads = torch::autograd::grad({y}, {xl, w}, {g});
    grad_w = grads[1];
    scores = layer.Scores(grad_w);
  }
  layer.Apply(scores);
  if (y_out != nullptr) *y_out = y.detach();
  if (grad_w_out != nullptr) *grad_w_out = grad_w;
  if (scores_out != nullptr) *scores_out = scores;
}

std::vector<int64_t> Ints(const std::string& list) {
  std::vector<int64_t> out;
  for (absl::string_view s : absl::StrSplit(list, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      std::fprintf(stderr, "layer_step: expected positive integers, got '%s'\n", list.c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name, sizes = "4096,8192", batches = "1,16,256,4096,16384",
                           computes = "FP32,TF32,BF16";
  int64_t gs = 32;
  double seconds = 0.5;
  bool with_model = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--device") device_name = value;
    else if (flag == "--sizes") sizes = value;
    else if (flag == "--batches") batches = value;
    else if (flag == "--computes") computes = value;
    else if (flag == "--group-size") gs = std::stoll(value);
    else if (flag == "--seconds") seconds = std::stod(value);
    else if (flag == "--model") with_model = value == "true";
    else if (flag == "--packed-max-batch") packed_max_batch = std::stoll(value);
    else {
      std::fprintf(stderr, "layer_step: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  auto device = device_name.empty() ? tscale::core::DefaultDevice()
                                    : tscale::core::ParseDevice(device_name);
  if (!device.ok()) {
    std::fprintf(stderr, "layer_step: %s\n", device.status().ToString().c_str());
    return 2;
  }
  std::vector<ComputeType> modes;
  for (absl::string_view c : absl::StrSplit(computes, ',')) {
    if (c == "FP32") modes.push_back(ComputeType::kFp32);
    else if (c == "TF32") modes.push_back(ComputeType::kTf32);
    else if (c == "BF16") modes.push_back(ComputeType::kBf16);
    else {
      std::fprintf(stderr, "layer_step: --computes: expected FP32, TF32 or BF16, got '%s'\n",
                   std::string(c).c_str());
      return 2;
    }
  }
#if !TSCALE_WITH_CUDA
  modes.erase(std::remove(modes.begin(), modes.end(), ComputeType::kTf32), modes.end());
#endif
  if (packed_max_batch && (*packed_max_batch < 0 || *packed_max_batch > 16)) {
    std::fprintf(stderr, "layer_step: --packed-max-batch: expected 0 to 16, got %lld\n",
                 static_cast<long long>(*packed_max_batch));
    return 2;
  }
  const std::string packed =
      packed_max_batch ? absl::StrCat(*packed_max_batch)
                       : absl::StrCat("BF16 ", tscale::core::kMaxPackedBatchBf16, ", TF32 ",
                                      tscale::core::kMaxPackedBatchTf32);
  std::printf("device %s, group size %lld, packed route up to batch %s; ms per step; floor = "
              "the three GEMMs in cuBLAS (or ATen on CPU)\n",
              tscale::core::DeviceName(*device).c_str(), static_cast<long long>(gs),
              packed.c_str());
  std::printf("%6s %6s %5s %10s %10s %6s %8s %9s %9s %10s %11s %9s %8s %8s %9s\n", "size",
              "batch", "mode", "step_ms", "floor_ms", "ratio", "TFLOP/s", "peak_MiB",
              "resid_MiB", "sign_agree", "score_agree", "out_err", "weff_ms", "score_ms",
              "model_ms");
  const at::TensorOptions f32 = at::TensorOptions(at::kFloat).device(*device);
  for (int64_t n : Ints(sizes)) {
    for (int64_t b : Ints(batches)) {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(2);
      const at::Tensor x = at::randn({b, n}, gen).to(*device);
      const at::Tensor g = at::randn({b, n}, gen).to(*device);
      // How far each mode is from FP32 on the layer's first step: measured first, and their
      // tensors freed, so that the peak memory below is the step's alone.
      struct Distance {
        double sign_agree = 1, score_agree = 1, out_err = 0;
      };
      std::vector<Distance> distance(modes.size());
      {
        at::Tensor y32, gw32, s32;
        {
          auto layer = NewLayer(n, gs, ComputeType::kFp32, *device);
          Step(layer, x, g, &y32, &gw32, &s32, /*check=*/true);
        }
        const double y32_max = y32.abs().max().item<double>();
        for (size_t i = 0; i < modes.size(); ++i) {
          if (modes[i] == ComputeType::kFp32) continue;
          auto layer = NewLayer(n, gs, modes[i], *device);
          at::Tensor y, gw, sc;
          Step(layer, x, g, &y, &gw, &sc, /*check=*/true);
          distance[i] = {
              gw.to(at::kFloat).sign().eq(gw32.sign()).to(at::kDouble).mean().item<double>(),
              sc.eq(s32).to(at::kDouble).mean().item<double>(),
              (y - y32).abs().max().item<double>() / y32_max};
        }
      }
      for (size_t i = 0; i < modes.size(); ++i) {
        const ComputeType mode = modes[i];
        const double agree = distance[i].sign_agree, err = distance[i].out_err;
        const double score_agree = distance[i].score_agree;
        auto layer = NewLayer(n, gs, mode, *device);
        Step(layer, x, g);  // step > 0 from here: S from corr_accum, as in training
        Sync(*device);
        ReleaseWorkspaces(*device);
        ResetPeak(*device);
        const double resident = AllocatedMiB(*device, /*peak=*/false);
        Step(layer, x, g);
        Sync(*device);
        const double peak = AllocatedMiB(*device, /*peak=*/true);
        const double step_ms = TimeMs(*device, seconds, [&] { Step(layer, x, g); });

        // The floor: the same three GEMMs on ready operands of the mode's type.
        const at::ScalarType t = mode == ComputeType::kBf16 ? at::kBFloat16 : at::kFloat;
        const at::Tensor xw = x.to(t), gw = g.to(t);
        const at::Tensor w = at::randn({n, n}, f32).to(t);
        const double floor_ms = TimeMs(*device, seconds, [&] {
          Mm(xw, w.t(), mode);
          Mm(gw, w, mode);
          Mm(gw.t(), xw, mode);
        });
        // Two of the step's own kernels alone: w_eff from the state, and the scores of a gradient.
        const at::ScalarType wt = mode == ComputeType::kBf16 ? at::kBFloat16 : at::kFloat;
        const double weff_ms =
            TimeMs(*device, seconds / 4, [&] { layer.state().EffectiveWeight(wt); });
        const at::Tensor grad = at::randn({n, n}, f32).to(wt);
        const double scores_ms = TimeMs(*device, seconds / 4, [&] { layer.Scores(grad); });
        // The whole of Model::TrainStep (MSE) as the service calls it: host tensors in, the loss
        // and update figures back on the host, output left on the device.
        double model_ms = -1;
        if (with_model) {
          tscale::core::ModelSpec spec;
          tscale::core::LayerSpec ls;
          ls.name = "fc";
          tscale::core::TernaryLinearSpec l;
          l.in_features = n;
          l.out_features = n;
          l.group_size = gs;
          ls.kind = l;
          spec.layers.push_back(ls);
          tscale::core::ModelOptions options;
          options.compute = mode;
          auto model = tscale::core::Model::Create(spec, 1, *device, options);
          if (!model.ok()) {
            std::fprintf(stderr, "layer_step: %s\n", model.status().ToString().c_str());
            return 1;
          }
          const at::Tensor hx = x.to(at::kCPU), ht = g.to(at::kCPU);
          int64_t step = 0;
          model_ms = TimeMs(*device, seconds / 2, [&] {
            auto r = (*model)->TrainStep(hx, ht, tscale::core::Loss::kMse, step++);
            if (!r.ok()) std::fprintf(stderr, "layer_step: %s\n", r.status().ToString().c_str());
          });
        }
        // At batch 1: the scores of the weight gradient from its two factors, against forming the
        // gradient and taking its scores (the way of larger batches).
        double factored_ms = -1, whole_ms = -1;
        if (b == 1) {
          const at::Tensor gy = g.to(at::kFloat);
          factored_ms = TimeMs(*device, seconds / 4, [&] { layer.FactorScores(gy, x); });
          whole_ms = TimeMs(*device, seconds / 4,
                            [&] { layer.Scores(layer.WeightGradient(gy, x)); });
        }
        const double tflops = 3 * 2.0 * b * n * n / (step_ms * 1e-3) / 1e12;
        std::printf(
            "%6lld %6lld %5s %10.3f %10.3f %6.2f %8.1f %9.1f %9.1f %10.5f %11.5f %9.2e %8.3f %8.3f "
            "%9.3f\n",
            static_cast<long long>(n), static_cast<long long>(b),
            mode == ComputeType::kFp32   ? "FP32"
            : mode == ComputeType::kTf32 ? "TF32"
                                         : "BF16",
            step_ms, floor_ms, step_ms / floor_ms, tflops, peak, resident, agree, score_agree, err,
            weff_ms,
            scores_ms, model_ms);
        if (b == 1) {
          std::printf("%6s %6s %5s   batch-1 weight-gradient scores: %.3f ms from the factors, "
                      "%.3f ms through the whole gradient\n",
                      "", "", "", factored_ms, whole_ms);
        }
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
