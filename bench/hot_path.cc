// Where a TrainStep's time goes between the client's send and the core's step: each stage of the
// server's path timed alone, in this process, on the same request and model (one ternary linear
// layer, MSE), so that the stages can be set against rpc_latency's whole call over loopback. The
// stages, in the order the call meets them:
//
//   serialize request   the client's encoding of the TrainStepRequest (gRPC does it on send)
//   parse request       the server's decoding of those bytes (gRPC, before the handler)
//   tensors from proto  TensorFromProto of input and target, as TrainStep's handler takes them:
//                       views of the request's bytes (Hold::kBorrow), no copy
//   finite checks       input and target are finite, checked on the CPU as TrainStep does
//   fingerprint         the hash of input's and target's bytes that tells a retry from another
//                       request (once per applied step)
//   host to device      input and target to the model's device as TrainStep moves them
//                       (core::ToDevice: one page-locked block, one asynchronous copy), completed
//   core step           Model::TrainStep on the CPU tensors, as the service calls it: the three
//                       stages above, the forward, loss, backward, update and the step's one copy
//                       of its figures to the host
//   core step, device   Model::TrainStep on tensors already on the model's device
//   output to proto     TensorToProto of the step's output (to the host, and a copy)
//   serialize response  the server's encoding of the TrainStepResponse
// and three floors of a small step's fixed cost on the device, against which "core step" reads:
//   floor: one read     one kernel on a one-element tensor and its value read on the host
//   floor: 20 launches  twenty such kernels, then one read
//   floor: autograd     a two-kernel graph on a [64] leaf, its gradient by torch::autograd::grad
//                       (on CUDA through autograd's device thread), then one read
//
// With --ops true it then lists the operations of one more core step on device tensors, as
// LibTorch's dispatcher sees them (the outermost operation of each call on each thread, the
// backward's on autograd's threads included; the project's own CUDA kernels are not operations),
// with how often each ran: what a small step's fixed cost is made of. On CUDA that step is also
// the only range between cudaProfilerStart and cudaProfilerStop, so that
// `ncu --profile-from-start off ... hot_path ... --ops true` times its kernels alone.
//
// Usage: hot_path [--device D] [--in N] [--out N] [--batch B] [--compute FP32|TF32|BF16]
//                 [--iters N] [--warmup N] [--ops true|false] [--cuda-graphs true|false]
// --cuda-graphs is the model's ModelOptions::cuda_graphs (default true, as the server's): on CUDA
// the "core step" on host tensors then replays its captured graph; on device tensors it cannot.
// Prints the median and p99 of each stage in microseconds.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "server/core/device.h"
#include "server/core/model.h"
#include "server/service/convert.h"
#include "tscale/v1/trainer.pb.h"
#if TSCALE_WITH_CUDA
#include <cuda_profiler_api.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = tscale::v1;
namespace core = tscale::core;

v1::Tensor Tensor(const std::vector<int64_t>& shape, unsigned seed) {
  v1::Tensor t;
  t.set_dtype(v1::FP32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::vector<float> v(n);
  std::srand(seed);
  for (float& x : v) x = static_cast<float>(std::rand()) / RAND_MAX * 2.0f - 1.0f;
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  return t;
}

template <typename T>
T OrDie(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "hot_path: %s: %s\n", what, v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}

// A request's input and target as TrainStep's handler takes them: views of its bytes
// (Hold::kBorrow), no copy.
std::pair<at::Tensor, at::Tensor> InputAndTarget(const v1::TrainStepRequest& request) {
  return {OrDie(tscale::service::TensorFromProto(request.input(), "input", v1::FP32,
                                                 tscale::service::Hold::kBorrow),
                "input"),
          OrDie(tscale::service::TensorFromProto(request.target(), "target", v1::FP32,
                                                 tscale::service::Hold::kBorrow),
                "target")};
}

// As TrainStep checks its CPU tensors (model.cc): one pass over the bits of dense float32.
bool AllFinite(const at::Tensor& t) {
  const uint32_t* bits = static_cast<const uint32_t*>(t.data_ptr());
  uint32_t inf_or_nan = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    inf_or_nan |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  }
  return inf_or_nan == 0;
}

struct Stage {
  std::string name;
  std::vector<double> us;
};

// The outermost operations dispatched while an OpCounter lives, on every thread, by name in the
// order first seen.
class OpCounter {
 public:
  OpCounter() {
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(&OpCounter::Start, &OpCounter::End)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
  ~OpCounter() { at::removeCallback(handle_); }
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;

  static std::vector<std::pair<std::string, int>> Counts() {
    std::lock_guard<std::mutex> lock(mu_);
    return counts_;
  }

 private:
  static std::unique_ptr<at::ObserverContext> Start(const at::RecordFunction& fn) {
    if (depth_++ == 0) {
      std::lock_guard<std::mutex> lock(mu_);
      const std::string name = fn.name();
      auto it = std::find_if(counts_.begin(), counts_.end(),
                             [&](const auto& c) { return c.first == name; });
      if (it == counts_.end()) counts_.emplace_back(name, 1);
      else ++it->second;
    }
    return nullptr;
  }
  static void End(const at::RecordFunction&, at::ObserverContext*) { --depth_; }

  at::CallbackHandle handle_;
  static inline thread_local int depth_ = 0;
  static inline std::mutex mu_;
  static inline std::vector<std::pair<std::string, int>> counts_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cpu", compute_name = "FP32";
  int64_t in = 4096, out = 4096, batch = 16;
  int iters = 200, warmup = 20;
  bool ops = false, graphs = true;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("usage: hot_path [--device D] [--in N] [--out N] [--batch B] "
                  "[--compute FP32|TF32|BF16] [--iters N] [--warmup N] [--ops true|false] "
                  "[--cuda-graphs true|false]\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "hot_path: %s: expected a value after it\n", flag.c_str());
      return 2;
    }
    const std::string value = argv[i + 1];
    if (flag == "--device") device_name = value;
    else if (flag == "--in") in = std::stoll(value);
    else if (flag == "--out") out = std::stoll(value);
    else if (flag == "--batch") batch = std::stoll(value);
    else if (flag == "--compute") compute_name = value;
    else if (flag == "--iters") iters = std::stoi(value);
    else if (flag == "--warmup") warmup = std::stoi(value);
    else if (flag == "--ops") ops = value == "true";
    else if (flag == "--cuda-graphs") graphs = value == "true";
    else {
      std::fprintf(stderr, "hot_path: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const c10::Device device = OrDie(core::ParseDevice(device_name), "--device");
  const core::ModelSpec spec{{core::LayerSpec{"fc", core::TernaryLinearSpec{in, out, 0, 0.0f, false}}}};
  core::ModelOptions options;
  options.cuda_graphs = graphs;
  if (compute_name == "FP32") options.compute = core::ComputeType::kFp32;
  else if (compute_name == "TF32") options.compute = core::ComputeType::kTf32;
  else if (compute_name == "BF16") options.compute = core::ComputeType::kBf16;
  else {
    std::fprintf(stderr, "hot_path: --compute: expected FP32, TF32 or BF16, got %s\n",
                 compute_name.c_str());
    return 2;
  }
  auto model = OrDie(core::Model::Create(spec, 1, device, options), "creating the model");

  v1::TrainStepRequest request;
  request.set_model_id("bench");
  *request.mutable_input() = Tensor({batch, in}, 1);
  *request.mutable_target() = Tensor({batch, out}, 3);
  request.set_loss(v1::TrainStepRequest::MSE);

  std::vector<Stage> stages;
  for (const char* name : {"serialize request", "parse request", "tensors from proto",
                           "finite checks", "fingerprint", "host to device", "core step",
                           "core step, device", "output to proto", "serialize response",
                           "floor: one read", "floor: 20 launches", "floor: autograd"}) {
    stages.push_back(Stage{name, {}});
  }
  auto timed = [&](size_t stage, bool record, const std::function<void()>& fn) {
    const auto t0 = Clock::now();
    fn();
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    if (record) stages[stage].us.push_back(us);
  };
  at::Tensor one = at::zeros({1}, at::TensorOptions(at::kFloat).device(device));
  const at::Tensor leaf = at::ones({64}, one.options()).requires_grad_(true);
  int64_t step = 0;
  for (int i = 0; i < warmup + iters; ++i) {
    const bool record = i >= warmup;
    request.set_expected_step(step);
    std::string wire;
    timed(0, record, [&] { request.SerializeToString(&wire); });
    v1::TrainStepRequest parsed;
    timed(1, record, [&] { parsed.ParseFromString(wire); });
    at::Tensor x, t;
    timed(2, record, [&] { std::tie(x, t) = InputAndTarget(parsed); });
    bool finite = false;
    timed(3, record, [&] { finite = AllFinite(x) && AllFinite(t); });
    if (!finite) return 1;
    size_t hash = 0;
    timed(4, record, [&] {
      hash = absl::HashOf(absl::string_view(static_cast<const char*>(x.data_ptr()), x.nbytes()),
                          x.sizes().vec(),
                          absl::string_view(static_cast<const char*>(t.data_ptr()), t.nbytes()),
                          t.sizes().vec(), 1);
    });
    if (hash == 0) std::printf("(a zero hash)\n");
    at::Tensor xd, td;
    timed(5, record, [&] {
      const std::vector<at::Tensor> moved = core::ToDevice({x, t}, device);
      xd = moved[0];
      td = moved[1];
      // Completed: a read of one element waits for the copies on the current stream.
      (void)xd[0][0].item<float>();
      (void)td[0][0].item<float>();
    });
    core::TrainStepResult result;
    timed(6, record, [&] {
      result = OrDie(model->TrainStep(x, t, core::Loss::kMse, step), "TrainStep");
    });
    step = result.update.step;
    core::TrainStepResult on_device;
    timed(7, record, [&] {
      on_device = OrDie(model->TrainStep(xd, td, core::Loss::kMse, step), "TrainStep on device");
    });
    step = on_device.update.step;
    v1::TrainStepResponse response;
    timed(8, record, [&] {
      tscale::service::TensorToProto(result.output, response.mutable_output());
    });
    response.set_loss(result.loss);
    response.set_step(result.update.step);
    std::string answer;
    timed(9, record, [&] { response.SerializeToString(&answer); });
    timed(10, record, [&] { (void)one.add_(1).item<float>(); });
    timed(11, record, [&] {
      for (int k = 0; k < 20; ++k) one.add_(1);
      (void)one.item<float>();
    });
    timed(12, record, [&] {
      c10::AutoGradMode grad_mode(true);
      const at::Tensor y = (leaf * 2).sum();
      (void)torch::autograd::grad({y}, {leaf})[0][0].item<float>();
    });
  }
  std::printf(
      "hot_path: %s, %s, layer %lldx%lld, batch %lld, %d iterations: request %zu bytes; "
      "steps replayed from a CUDA graph: %lld\n",
      core::DeviceName(device).c_str(), compute_name.c_str(), static_cast<long long>(in),
      static_cast<long long>(out), static_cast<long long>(batch), iters, request.ByteSizeLong(),
      static_cast<long long>(model->graphed_steps()));
  std::printf("%-20s %10s %10s\n", "stage (us)", "p50", "p99");
  for (Stage& s : stages) {
    std::sort(s.us.begin(), s.us.end());
    const double p50 = s.us[s.us.size() / 2];
    const double p99 = s.us[std::min(s.us.size() - 1, static_cast<size_t>(0.99 * s.us.size()))];
    std::printf("%-20s %10.1f %10.1f\n", s.name.c_str(), p50, p99);
  }
  if (ops) {
    const auto [x, t] = InputAndTarget(request);
    const std::vector<at::Tensor> moved = core::ToDevice({x, t}, device);
    std::vector<std::pair<std::string, int>> counts;
    {
      OpCounter counter;
#if TSCALE_WITH_CUDA
      if (device.is_cuda()) cudaProfilerStart();
#endif
      (void)OrDie(model->TrainStep(moved[0], moved[1], core::Loss::kMse, step), "TrainStep");
#if TSCALE_WITH_CUDA
      if (device.is_cuda()) cudaProfilerStop();
#endif
      counts = OpCounter::Counts();
    }
    int total = 0;
    for (const auto& c : counts) total += c.second;
    std::printf("operations of one core step on device tensors: %d\n", total);
    for (const auto& c : counts) std::printf("%6d  %s\n", c.second, c.first.c_str());
  }
  return 0;
}
