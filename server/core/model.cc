#include "server/core/model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Event.h>
#include <c10/core/GradMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "server/core/device.h"
#include "server/core/errors.h"
#if TSCALE_WITH_CUDA
#include "server/cuda/graph.h"
#endif

namespace tscale::core {

// ---------------------------------------------------------------- layers as graph nodes

class Node {
 public:
  virtual ~Node() = default;
  virtual at::Tensor Forward(const at::Tensor& x) = 0;
};

namespace {

// Tap: Model::Tap (a template parameter, since the type is private to Model).
template <typename Tap>
class LinearNode : public Node {
 public:
  explicit LinearNode(TernaryLinear layer)
      : layer(std::move(layer)), tap(std::make_shared<Tap>()) {}
  at::Tensor Forward(const at::Tensor& x) override {
    if (!tap->on) return layer.Forward(x);
    tap->input = x;
    return layer.Forward(x, &tap->pre_bias);
  }
  TernaryLinear layer;
  std::shared_ptr<Tap> tap;
};

class NormNode : public Node {
 public:
  explicit NormNode(TernaryRMSNorm layer) : layer(std::move(layer)) {}
  at::Tensor Forward(const at::Tensor& x) override { return layer.Forward(x); }
  TernaryRMSNorm layer;
};

class ActivationNode : public Node {
 public:
  explicit ActivationNode(ActivationKind kind) : kind_(kind) {}
  at::Tensor Forward(const at::Tensor& x) override {
    switch (kind_) {
      case ActivationKind::kRelu:
        return at::relu(x);
      case ActivationKind::kGelu:
        return at::gelu(x);  // the exact (erf) form
      case ActivationKind::kSilu:
      case ActivationKind::kUnspecified:  // refused by ValidateSpec
        break;
    }
    return at::silu(x);
  }

 private:
  ActivationKind kind_;
};

class ResidualNode : public Node {
 public:
  at::Tensor Forward(const at::Tensor& x) override {
    at::Tensor f = x;
    for (auto& node : children) f = node->Forward(f);
    return x + f;
  }
  std::vector<std::unique_ptr<Node>> children;
};

// Checked on the caller's tensor before it moves to the model's device: a request from the
// service arrives on the CPU, so this costs no device synchronisation. The service's tensors are
// dense float32: one pass over their bits (a float is finite unless its exponent bits are all
// ones) takes microseconds, where isfinite(t).all() allocates and dispatches two operators.
bool AllFinite(const at::Tensor& t) {
  if (t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous()) {
    const uint32_t* bits = static_cast<const uint32_t*>(t.data_ptr());
    uint32_t inf_or_nan = 0;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      inf_or_nan |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
    }
    return inf_or_nan == 0;
  }
  return at::isfinite(t).all().item<bool>();
}

// A stream of the device's pool for a model on a CUDA device; none on the CPU. Through c10's
// device-generic interface, so that the core needs no CUDA header and builds without CUDA.
std::optional<c10::Stream> ModelStream(c10::Device device) {
  if (!device.is_cuda()) return std::nullopt;
  return c10::impl::getDeviceGuardImpl(device.type())->getStreamFromGlobalPool(device);
}

// One call's work on its model's stream. Were every model's kernels queued on the device's one
// current stream, a small model's request would wait for the kernels of another model's long step
// queued before it; on streams of their own they run side by side. What keeps results exact:
//  - inputs the caller passes on the device may still be in the making on the caller's stream:
//    the model's stream waits for what that stream had queued, and their memory is marked as used
//    by the model's stream, so that it is not handed to other work while kernels still read it
//    (a training pass keeps its input beyond the call);
//  - on leaving, the calling thread waits for the model's stream: whatever the call hands back is
//    complete, on whatever stream the caller reads it, and no kernel of the call outlives it;
//  - a tensor handed back goes through Hand(): the caller may use it on its own stream after the
//    call, so its memory waits for that stream too before it is reused.
// On the CPU (no stream) it does nothing.
class StreamScope {
 public:
  explicit StreamScope(const std::optional<c10::Stream>& stream,
                       std::initializer_list<const at::Tensor*> inputs = {})
      : stream_(stream) {
    if (!stream_) return;
    const c10::impl::DeviceGuardImplInterface* impl =
        c10::impl::getDeviceGuardImpl(stream_->device_type());
    caller_ = impl->getStream(stream_->device());
    guard_.reset_stream(*stream_);
    bool waited = *caller_ == *stream_;
    try {
      for (const at::Tensor* t : inputs) {
        if (!t->defined() || t->device() != stream_->device()) continue;
        if (!waited) {
          c10::Event ready(stream_->device_type());
          ready.record(*caller_);
          ready.block(*stream_);
          waited = true;
        }
        impl->recordDataPtrOnStream(t->storage().data_ptr(), *stream_);
      }
    } catch (const c10::Error&) {
      // The device failed: the call's first use of it reports the error as the call's status.
    }
  }
  ~StreamScope() {
    if (!stream_) return;
    try {
      stream_->synchronize();
    } catch (const c10::Error&) {
      // A kernel that failed leaves a sticky error: the caller's next use of the device reports it.
    }
  }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

  at::Tensor Hand(at::Tensor t) const {
    if (stream_ && t.defined() && t.device() == stream_->device() && *caller_ != *stream_) {
      c10::impl::getDeviceGuardImpl(stream_->device_type())
          ->recordDataPtrOnStream(t.storage().data_ptr(), *caller_);
    }
    return t;
  }

 private:
  const std::optional<c10::Stream> stream_;
  std::optional<c10::Stream> caller_;  // the caller's current stream on the model's device
  c10::OptionalStreamGuard guard_;
};

// TF32 is a tensor-core format: it needs the CUDA kernels and a CUDA device.
absl::Status CheckCompute(ComputeType compute, c10::Device device) {
  if (compute != ComputeType::kFp32 && compute != ComputeType::kTf32 &&
      compute != ComputeType::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat("compute: expected COMPUTE_FP32, COMPUTE_TF32 or COMPUTE_BF16, got ",
                     static_cast<int>(compute)));
  }
  if (compute != ComputeType::kTf32) return absl::OkStatus();
#if TSCALE_WITH_CUDA
  if (device.is_cuda()) return absl::OkStatus();
#endif
  return absl::UnimplementedError(absl::StrCat(
      "compute: COMPUTE_TF32 runs on CUDA tensor cores",
      device.is_cuda() ? " and this server was built without its CUDA kernels" : "",
      "; the model's device is ", DeviceName(device), ". Use COMPUTE_FP32 or COMPUTE_BF16"));
}

// Adds a weight gradient to a step's sum; sums of BF16 gradients are kept in float32.
at::Tensor AddGradient(const at::Tensor& sum, const at::Tensor& grad) {
  if (!sum.defined()) return grad;
  return sum.to(at::kFloat) + grad.to(at::kFloat);
}

// A 64-bit hash of `n` bytes continuing from `h`, the same in every process (a replica group's
// member compares fingerprints its peers computed): four multiply-xor lanes of 8-byte words.
uint64_t HashBytes(const void* data, size_t n, uint64_t h) {
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t lane[4] = {h ^ 0x243F6A8885A308D3ull, h ^ 0x13198A2E03707344ull,
                      h ^ 0xA4093822299F31D0ull, h ^ 0x082EFA98EC4E6C89ull};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      lane[k] = (lane[k] ^ w) * kMul;
      lane[k] ^= lane[k] >> 29;
    }
  }
  uint64_t out = n * kMul;
  for (; i < n; ++i) out = (out ^ p[i]) * kMul;
  for (uint64_t l : lane) out = ((out ^ l) * kMul) ^ (out >> 31);
  return out;
}

// t on `device`: t itself where it is there already, without dispatching an operator.
at::Tensor OnDevice(const at::Tensor& t, c10::Device device) {
  return t.device() == device ? t : t.to(device);
}

// Tells a retried TrainStep from another request: the bytes and shapes of its tensors and its
// loss.
uint64_t Fingerprint(const at::Tensor& input, const at::Tensor& target, Loss loss) {
  uint64_t h = static_cast<uint64_t>(loss);
  for (const at::Tensor& tensor : {input, target}) {
    const at::Tensor t = OnDevice(tensor, at::kCPU).contiguous();
    const std::vector<int64_t> sizes = t.sizes().vec();
    h = HashBytes(sizes.data(), sizes.size() * sizeof(int64_t), h);
    h = HashBytes(t.data_ptr(), t.nbytes(), h);
  }
  return h;
}

uint64_t RandomNonce() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

absl::Time Now(const ModelOptions& options) {
  return options.clock ? options.clock() : absl::Now();
}

}  // namespace

absl::string_view ComputeName(ComputeType compute) {
  switch (compute) {
    case ComputeType::kFp32:
      return "COMPUTE_FP32";
    case ComputeType::kTf32:
      return "COMPUTE_TF32";
    case ComputeType::kBf16:
      return "COMPUTE_BF16";
  }
  return "COMPUTE_TYPE_UNSPECIFIED";
}

// ---------------------------------------------------------------- construction

Model::Model(ModelSpec spec, SpecSummary summary, c10::Device device, ModelOptions options)
    : spec_(std::move(spec)),
      summary_(std::move(summary)),
      device_(device),
      stream_(ModelStream(device)),
      options_(options),
      nonce_(RandomNonce()) {}

Model::~Model() = default;

absl::Status Model::Build(const StateDict* state, at::Generator* gen) {
  // Depth-first in spec order, which is also the order the reference draws its random weights.
  struct Builder {
    Model* model;
    const StateDict* state;
    at::Generator* gen;

    absl::Status Layers(const std::vector<LayerSpec>& layers, const std::string& prefix,
                        std::vector<std::unique_ptr<Node>>* out) {
      for (const LayerSpec& spec : layers) {
        const std::string name = prefix.empty() ? spec.name : absl::StrCat(prefix, ".", spec.name);
        if (const auto* l = std::get_if<TernaryLinearSpec>(&spec.kind)) {
          auto layer = state ? TernaryLinear::Import(*l, *state, name, model->device_)
                             : TernaryLinear::Init(*l, *gen, model->device_);
          if (!layer.ok()) return layer.status();
          auto node = std::make_unique<LinearNode<Model::Tap>>(*std::move(layer));
          node->layer.SetCompute(model->options_.compute);
          model->persistent_bytes_ += node->layer.persistent_bytes();
          model->linears_.push_back({name, &node->layer, at::Tensor(), node->tap});
          model->stateful_.push_back({name, &node->layer.state(), /*frozen=*/false});
          out->push_back(std::move(node));
        } else if (const auto* n = std::get_if<TernaryRMSNormSpec>(&spec.kind)) {
          auto layer = state ? TernaryRMSNorm::Import(*n, *state, name, model->device_)
                             : TernaryRMSNorm::Init(*n, *gen, model->device_);
          if (!layer.ok()) return layer.status();
          auto node = std::make_unique<NormNode>(*std::move(layer));
          model->persistent_bytes_ += node->layer.persistent_bytes();
          model->stateful_.push_back({name, &node->layer.state(), /*frozen=*/true});
          model->norms_.push_back(&node->layer);
          out->push_back(std::move(node));
        } else if (const auto* a = std::get_if<ActivationSpec>(&spec.kind)) {
          out->push_back(std::make_unique<ActivationNode>(a->kind));
        } else if (const auto* r = std::get_if<ResidualSpec>(&spec.kind)) {
          auto node = std::make_unique<ResidualNode>();
          absl::Status s = Layers(r->layers, name, &node->children);
          if (!s.ok()) return s;
          out->push_back(std::move(node));
        }
      }
      return absl::OkStatus();
    }
  };
  StreamScope on_stream(stream_);  // the state is allocated and made on the model's stream
  absl::MutexLock lock(&mu_);
  Builder builder{this, state, gen};
  try {
    return builder.Layers(spec_.layers, "", &nodes_);
  } catch (const c10::Error& e) {
    return TorchError(e, absl::StrCat("allocating a model of ", summary_.ternary_params,
                                      " weights on ", DeviceName(device_)));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("allocating a model of ",
                                                     summary_.ternary_params, " weights on ",
                                                     DeviceName(device_), ": out of memory"));
  }
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelSpec& spec, uint64_t seed,
                                                     c10::Device device, ModelOptions options) {
  auto summary = ValidateSpec(spec);
  if (!summary.ok()) return summary.status();
  if (absl::Status s = CheckCompute(options.compute, device); !s.ok()) return s;
  std::unique_ptr<Model> model(new Model(NormalizeSpec(spec), *summary, device, options));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  absl::Status s = model->Build(nullptr, &gen);
  if (!s.ok()) return s;
  return model;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Import(const ModelSpec& spec, const StateDict& state,
                                                     std::optional<int64_t> step,
                                                     c10::Device device, ModelOptions options) {
  auto summary = ValidateSpec(spec);
  if (!summary.ok()) return summary.status();
  if (absl::Status s = CheckCompute(options.compute, device); !s.ok()) return s;
  if (step.has_value() && (*step < 0 || *step > kMaxStep)) {
    return absl::InvalidArgumentError(
        absl::StrCat("step: expected a value within [0, 2^47 = ", kMaxStep, "], got ", *step));
  }
  std::unique_ptr<Model> model(new Model(NormalizeSpec(spec), *summary, device, options));
  absl::Status s = model->Build(&state, nullptr);
  if (!s.ok()) return s;
  absl::MutexLock lock(&model->mu_);
  // The model's step: given, or the linear layers' step_counter; they must all agree.
  std::optional<int64_t> agreed = step;
  std::string source = "the step given with the state";
  for (const Linear& l : model->linears_) {
    const int64_t counter = l.layer->state().step_counter();
    if (!agreed.has_value()) {
      agreed = counter;
      source = absl::StrCat(l.name, ".step_counter");
    } else if (counter != *agreed) {
      return absl::InvalidArgumentError(absl::StrCat(l.name, ".step_counter: expected ", *agreed,
                                                     " (", source, "), got ", counter));
    }
  }
  model->step_ = agreed.value_or(0);
  return model;
}

// ---------------------------------------------------------------- training

namespace {

// The bytes of host tensors (contiguous) gathered into one block of page-locked memory, tensor i
// at offsets[i], each at a 16-byte boundary. From pageable memory each tensor would be a
// synchronous copy through the driver's staging buffer; the page-locked block comes from
// LibTorch's caching host allocator (no allocation once warm) and returns to it only once the
// copies from it have completed.
at::Tensor Gathered(const std::vector<at::Tensor>& tensors, std::vector<int64_t>* offsets) {
  int64_t bytes = 0;
  offsets->clear();
  for (const at::Tensor& t : tensors) {
    offsets->push_back(bytes);
    bytes += (t.nbytes() + 15) / 16 * 16;
  }
  at::Tensor host = at::empty({bytes}, at::TensorOptions(at::kByte).pinned_memory(true));
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::memcpy(static_cast<char*>(host.data_ptr()) + (*offsets)[i], tensors[i].data_ptr(),
                tensors[i].nbytes());
  }
  return host;
}

// Views of `block` (bytes) shaped as `tensors` at `offsets` (Gathered's).
std::vector<at::Tensor> ViewsOf(const at::Tensor& block, const std::vector<at::Tensor>& tensors,
                                const std::vector<int64_t>& offsets) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    out.push_back(block.narrow(0, offsets[i], static_cast<int64_t>(t.nbytes()))
                      .view(t.scalar_type())
                      .view(t.sizes()));
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> ToDevice(const std::vector<at::Tensor>& tensors, c10::Device device) {
  bool staged = device.is_cuda();
  int64_t bytes = 0;
  for (const at::Tensor& t : tensors) {
    staged = staged && t.defined() && t.is_cpu() && t.is_contiguous();
    if (t.defined()) bytes += t.nbytes();
  }
  if (!staged || bytes == 0) {
    std::vector<at::Tensor> out;
    for (const at::Tensor& t : tensors) out.push_back(t.defined() ? OnDevice(t, device) : t);
    return out;
  }
  std::vector<int64_t> offsets;
  const at::Tensor host = Gathered(tensors, &offsets);
  return ViewsOf(host.to(device, /*non_blocking=*/true), tensors, offsets);
}

at::Tensor Model::Run(const at::Tensor& x, int64_t* activation_bytes) {
  at::Tensor h = x;
  for (auto& node : nodes_) {
    h = node->Forward(h);
    *activation_bytes += h.numel() * static_cast<int64_t>(h.element_size());
  }
  return h;
}

std::string Model::NewPassId(int64_t step) {
  return absl::StrFormat("%016x-%d-%d", nonce_, step, next_pass_++);
}

absl::Status Model::CheckInput(const at::Tensor& input) const {
  if (!input.defined() || input.scalar_type() != at::kFloat || input.dim() != 2 ||
      input.size(0) < 1 || input.size(1) != summary_.in_features) {
    return absl::InvalidArgumentError(
        absl::StrCat("input: expected FP32 [batch >= 1, ", summary_.in_features, "], got ",
                     input.defined() ? DescribeTensor(input) : "nothing"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ForwardResult> Model::Forward(const at::Tensor& input, bool train) {
  if (absl::Status s = CheckInput(input); !s.ok()) return s;
  StreamScope on_stream(stream_, {&input});
  absl::MutexLock lock(&mu_);
  try {
    at::Tensor x = input.to(device_);
    if (!train) {
      c10::NoGradGuard no_grad;
      int64_t bytes = 0;
      return ForwardResult{on_stream.Hand(Run(x, &bytes)), "", step_};
    }
    ExpirePasses();  // expired passes make room
    if (pending_passes_ >= options_.max_pending_passes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "pending passes: the model holds ", pending_passes_, " passes awaiting Backward, the ",
          "limit is ", options_.max_pending_passes, "; run their Backward or UpdateCorrelation"));
    }
    if (!AllFinite(input)) {
      return absl::InvalidArgumentError("input: expected finite values, got NaN or Inf");
    }
    c10::AutoGradMode grad_mode(true);
    Pass pass;
    pass.step = step_;
    pass.created = Now(options_);
    pass.input = x.detach().requires_grad_(true);
    pass.bytes = x.numel() * static_cast<int64_t>(x.element_size());
    pass.output = Run(pass.input, &pass.bytes);
    if (pending_bytes_ + pass.bytes > options_.max_pending_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "pending bytes: this pass would keep ", pass.bytes, " bytes of activations with ",
          pending_bytes_, " already held; the limit is ", options_.max_pending_bytes,
          " bytes; run pending Backward calls or UpdateCorrelation first"));
    }
    for (const Linear& l : linears_) pass.weights.push_back(l.layer->WeightLeaf());
    ForwardResult result{on_stream.Hand(pass.output.detach()), NewPassId(step_), step_};
    pending_bytes_ += pass.bytes;
    ++pending_passes_;
    if (options_.pending_pass_ttl > absl::ZeroDuration()) {
      pass_order_.emplace_back(pass.created, result.pass_id);
    }
    passes_.emplace(result.pass_id, std::move(pass));
    return result;
  } catch (const c10::Error& e) {
    return TorchError(e, "forward");
  }
}

absl::Status Model::UnknownPass(absl::string_view pass_id) const {
  // Ids are "<nonce>-<step>-<n>": a pass of this model from an earlier step was released.
  std::vector<absl::string_view> parts = absl::StrSplit(pass_id, '-');
  uint64_t nonce = 0;
  int64_t step = 0;
  if (parts.size() == 3 && absl::SimpleHexAtoi(parts[0], &nonce) && nonce == nonce_ &&
      absl::SimpleAtoi(parts[1], &step) && step < step_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pass_id: pass '", pass_id, "' belongs to step ", step,
        " and was released when UpdateCorrelation advanced the model to step ", step_));
  }
  return absl::NotFoundError(absl::StrCat("pass_id: no pass '", pass_id, "' on this model"));
}

absl::StatusOr<at::Tensor> Model::Backward(absl::string_view pass_id, const at::Tensor& grad_output,
                                           bool want_grad_input) {
  StreamScope on_stream(stream_, {&grad_output});
  absl::MutexLock lock(&mu_);
  ExpirePasses();
  auto it = passes_.find(pass_id);
  if (it == passes_.end()) return UnknownPass(pass_id);
  Pass& pass = it->second;
  if (pass.released) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pass_id: pass '", pass_id, "' was released by ReleasePasses; run Forward again"));
  }
  if (pass.expired) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pass_id: pass '", pass_id, "' expired: no Backward used it within ",
        absl::ToInt64Seconds(options_.pending_pass_ttl),
        " s of its Forward (--pending-pass-ttl-seconds), so it was released; run Forward again"));
  }
  if (pass.used) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pass_id: pass '", pass_id, "' was already used by a Backward (one per pass)"));
  }
  if (!grad_output.defined() || grad_output.scalar_type() != at::kFloat ||
      grad_output.sizes() != pass.output.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_output: expected ", DescribeTensor(pass.output), " (the pass's output), got ",
        grad_output.defined() ? DescribeTensor(grad_output) : "nothing"));
  }
  try {
    at::Tensor g = grad_output.to(device_);
    if (!AllFinite(grad_output)) {
      return absl::InvalidArgumentError("grad_output: expected finite values, got NaN or Inf");
    }
    std::vector<at::Tensor> inputs = pass.weights;
    if (want_grad_input) inputs.push_back(pass.input);
    std::vector<at::Tensor> grads;
    // A model without linear layers has no weight gradient to take; autograd needs an input.
    if (!inputs.empty()) {
      c10::AutoGradMode grad_mode(true);
      grads = torch::autograd::grad({pass.output}, inputs, {g}, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);
    }
    // The graph is spent whatever follows; the pass is used.
    pass.used = true;
    pass.input.reset();
    pass.output.reset();
    pass.weights.clear();
    pending_bytes_ -= pass.bytes;
    --pending_passes_;
    for (size_t i = 0; i < linears_.size(); ++i) {
      at::Tensor& sum = linears_[i].grad_sum;
      if (!grads[i].defined()) continue;
      sum = AddGradient(sum, grads[i]);
    }
    ++backwards_;
    if (!want_grad_input) return at::Tensor();
    at::Tensor gi = grads.back();
    return on_stream.Hand(gi.defined() ? gi
                                       : at::zeros({g.size(0), summary_.in_features}, g.options()));
  } catch (const c10::Error& e) {
    return TorchError(e, "backward");
  }
}

absl::StatusOr<int64_t> Model::ReleasePasses(const std::vector<std::string>& pass_ids) {
  absl::MutexLock lock(&mu_);
  ExpirePasses();
  std::vector<Pass*> chosen;
  if (pass_ids.empty()) {
    for (auto& [id, pass] : passes_) {
      if (!pass.used && !pass.expired) chosen.push_back(&pass);
    }
  } else {
    absl::flat_hash_map<std::string, bool> seen;
    for (const std::string& id : pass_ids) {
      auto it = passes_.find(id);
      if (it == passes_.end()) return UnknownPass(id);
      if (it->second.used || it->second.expired) {
        return absl::FailedPreconditionError(
            absl::StrCat("pass_ids: pass '", id, "' is not pending (",
                         it->second.used       ? "a Backward used it"
                         : it->second.released ? "it was released already"
                                               : "it expired",
                         "); nothing was released"));
      }
      if (!seen.emplace(id, true).second) continue;
      chosen.push_back(&it->second);
    }
  }
  for (Pass* pass : chosen) {
    // Kept as a marker, like an expired pass, so that a late Backward says why it is gone.
    pass->expired = true;
    pass->released = true;
    pass->input.reset();
    pass->output.reset();
    pass->weights.clear();
    pending_bytes_ -= pass->bytes;
    --pending_passes_;
  }
  return static_cast<int64_t>(chosen.size());
}

absl::StatusOr<UpdateResult> Model::UpdateCorrelation(int64_t expected_step,
                                                      const Interrupt& interrupt,
                                                      UpdateCombiner* combiner) {
  StreamScope on_stream(stream_);
  absl::MutexLock lock(&mu_);
  if (expected_step != step_) {
    if (last_update_.has_value() && expected_step == step_ - 1) {
      UpdateResult replay = *last_update_;
      replay.replayed = true;
      return replay;
    }
    return absl::FailedPreconditionError(absl::StrCat("expected_step: expected ", step_,
                                                      " (the model's step), got ", expected_step));
  }
  if (backwards_ == 0 && combiner == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("update: no Backward since step ", step_, " began; nothing to apply"));
  }
  // The last moment to give up: nothing has changed yet, and from here the update applies wholly.
  if (interrupt) {
    if (absl::Status s = interrupt(); !s.ok()) return s;
  }
  auto result = ApplyUpdate({}, nullptr, nullptr, combiner);
  if (result.ok()) last_train_.reset();
  return result;
}

absl::StatusOr<std::vector<at::Tensor>> Model::CombinedScores(const std::vector<at::Tensor>& extra,
                                                              StepLoss* loss,
                                                              UpdateCombiner* combiner) {
  UpdateCombiner::Local local;
  for (size_t i = 0; i < linears_.size(); ++i) {
    at::Tensor sum = linears_[i].grad_sum;
    if (i < extra.size() && extra[i].defined()) sum = AddGradient(sum, extra[i]);
    local.grad_sums.push_back(sum);
    local.states.push_back(&linears_[i].layer->state());
  }
  // The verdict goes to the vote before anything is exchanged: a loss that is not finite stops
  // the update on every rank.
  if (loss != nullptr) {
    local.loss = loss->value.detach().to(at::kDouble).item<double>();
    local.fingerprint = loss->fingerprint;
    if (!std::isfinite(local.loss)) {
      local.status = absl::InvalidArgumentError(absl::StrCat(
          "loss: the ", loss->kind == Loss::kMse ? "MSE" : "CROSS_ENTROPY",
          " loss of this rank's batch is not finite (", local.loss, "); nothing was applied"));
    }
  }
  if (step_ >= kMaxStep) {
    local.status = absl::FailedPreconditionError(absl::StrCat(
        "update: the model is at step ", step_, ", the largest this server counts to (2^47)"));
  }
  auto combined = combiner->Combine(std::move(local));
  if (!combined.ok()) return combined.status();
  if (loss != nullptr) {
    loss->host = combined->loss;
    loss->group_fingerprints = std::move(combined->fingerprints);
  }
  return std::move(combined->scores);
}

std::vector<at::Tensor> Model::StepScores(const std::vector<at::Tensor>& extra,
                                          const std::vector<at::Tensor>* sample_inputs,
                                          std::vector<at::Tensor>* exact) {
  std::vector<at::Tensor> scores;
  exact->assign(linears_.size(), at::Tensor());
  for (size_t i = 0; i < linears_.size(); ++i) {
    const bool given = i < extra.size() && extra[i].defined();
    if (sample_inputs != nullptr && given) {
      auto sample = linears_[i].layer->FactorScores(extra[i], (*sample_inputs)[i]);
      scores.push_back(sample.scores);
      (*exact)[i] = sample.exact;
      continue;
    }
    at::Tensor sum = linears_[i].grad_sum;
    if (given) sum = AddGradient(sum, extra[i]);
    scores.push_back(linears_[i].layer->Scores(sum));
  }
  return scores;
}

// The figures of the update, and on a device the loss and the exactness flags of factored scores,
// in one tensor, for one copy to the host: the loss's float64 bits and the flags ride along as
// int64s (on the CPU they are read where they are). Each layer's corr_accum after the update is
// made with its two figures (TernaryState::Updated) and taken only at the commit.
at::Tensor Model::UpdateFigures(const std::vector<at::Tensor>& scores,
                                const std::vector<at::Tensor>& exact, const at::Tensor* loss,
                                std::vector<at::Tensor>* after) {
  const bool on_host = device_.is_cpu();
  after->assign(linears_.size(), at::Tensor());
  int64_t n = 2 * static_cast<int64_t>(linears_.size()) + (loss != nullptr && !on_host ? 1 : 0);
  for (const at::Tensor& e : exact) n += e.defined() && !on_host ? 1 : 0;
  if (n == 0) return at::Tensor();
  const at::Tensor stats = at::zeros({n}, at::TensorOptions(at::kLong).device(device_));
  for (size_t i = 0; i < linears_.size(); ++i) {
    (*after)[i] = linears_[i].layer->state().Updated(
        scores[i], stats.narrow(0, 2 * static_cast<int64_t>(i), 2));
  }
  int64_t k = 2 * static_cast<int64_t>(linears_.size());
  for (const at::Tensor& e : exact) {
    if (e.defined() && !on_host) stats.narrow(0, k++, 1).copy_(e.reshape({1}));
  }
  if (loss != nullptr && !on_host) {
    stats.narrow(0, k, 1).copy_(loss->detach().to(at::kDouble).view(at::kLong).reshape({1}));
  }
  return stats;
}

absl::StatusOr<UpdateResult> Model::CommitUpdate(const at::Tensor& host,
                                                 const std::vector<at::Tensor>& after,
                                                 StepLoss* loss) {
  if (loss != nullptr) {
    if (device_.is_cpu()) {
      loss->host = loss->value.item<double>();
    } else {
      std::memcpy(&loss->host, host.data_ptr<int64_t>() + host.numel() - 1, sizeof(double));
    }
    if (!std::isfinite(loss->host)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "loss: the ", loss->kind == Loss::kMse ? "MSE" : "CROSS_ENTROPY",
          " loss of this batch is not finite (", loss->host, "); nothing was applied"));
    }
  }
  UpdateResult result;
  result.step = step_ + 1;
  for (size_t i = 0; i < linears_.size(); ++i) {
    Linear& l = linears_[i];
    l.layer->Commit(after[i]);
    l.grad_sum.reset();
    const TernaryState& st = l.layer->state();
    const int64_t* v = host.data_ptr<int64_t>() + 2 * i;
    // |drift| = 4 |corr_accum| / (step gs), averaged over the groups.
    const double denom = static_cast<double>(st.step_counter()) * st.group_size() * st.groups();
    result.layers.push_back({l.name, v[0], 4.0 * static_cast<double>(v[1]) / denom});
  }
  step_ = result.step;
  passes_.clear();
  pending_passes_ = 0;
  pending_bytes_ = 0;
  backwards_ = 0;
  last_update_ = result;
  return result;
}

absl::StatusOr<UpdateResult> Model::ApplyUpdate(const std::vector<at::Tensor>& extra,
                                                StepLoss* loss,
                                                const std::vector<at::Tensor>* sample_inputs,
                                                UpdateCombiner* combiner) {
  if (step_ >= kMaxStep && combiner == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "update: the model is at step ", step_, ", the largest this server counts to (2^47)"));
  }
  try {
    // Compute everything first, then commit: an error leaves the state as it was.
    std::vector<at::Tensor> scores, exact(linears_.size());
    if (combiner != nullptr) {
      auto combined = CombinedScores(extra, loss, combiner);
      if (!combined.ok()) return combined.status();
      scores = *std::move(combined);
    } else {
      scores = StepScores(extra, sample_inputs, &exact);
    }
    // With a combiner the loss was the group's, agreed before the exchange.
    StepLoss* host_loss = combiner == nullptr ? loss : nullptr;
    std::vector<at::Tensor> after;
    auto figures = [&] {
      at::Tensor stats = UpdateFigures(
          scores, exact, host_loss != nullptr ? &host_loss->value : nullptr, &after);
      return stats.defined() ? stats.to(at::kCPU) : stats;
    };
    at::Tensor host = figures();
    // Where a sample's factored scores could differ from the whole gradient's (a product that
    // could underflow), take them from the whole gradient, and the figures again.
    bool refigure = false;
    for (size_t i = 0, k = 2 * linears_.size(); i < exact.size(); ++i) {
      if (!exact[i].defined()) continue;
      if (device_.is_cpu() ? !exact[i].item<bool>() : host.data_ptr<int64_t>()[k++] == 0) {
        scores[i] = linears_[i].layer->Scores(
            linears_[i].layer->WeightGradient(extra[i], (*sample_inputs)[i]));
        refigure = true;
      }
      exact[i].reset();
    }
    if (refigure) host = figures();
    return CommitUpdate(host, after, host_loss);
  } catch (const c10::Error& e) {
    return TorchError(e, "update");
  }
}

absl::Status Model::CheckTrainStep(const at::Tensor& input, const at::Tensor& target,
                                   Loss loss) const {
  if (absl::Status s = CheckInput(input); !s.ok()) return s;
  const int64_t batch = input.size(0);
  const int64_t out = summary_.out_features;
  if (loss == Loss::kMse) {
    if (!target.defined() || target.scalar_type() != at::kFloat || target.dim() != 2 ||
        target.size(0) != batch || target.size(1) != out) {
      return absl::InvalidArgumentError(
          absl::StrCat("target: expected FP32 [", batch, ", ", out, "] for MSE, got ",
                       target.defined() ? DescribeTensor(target) : "nothing"));
    }
  } else if (loss == Loss::kCrossEntropy) {
    if (!target.defined() || target.scalar_type() != at::kLong || target.dim() != 1 ||
        target.size(0) != batch) {
      return absl::InvalidArgumentError(
          absl::StrCat("target: expected INT64 [", batch, "] class indices for CROSS_ENTROPY, got ",
                       target.defined() ? DescribeTensor(target) : "nothing"));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("loss: expected MSE or CROSS_ENTROPY, got ", static_cast<int>(loss)));
  }
  return absl::OkStatus();
}

bool Model::FactoredStep(int64_t batch, const GroupStep* group) const {
  return group == nullptr && !linears_.empty() &&
         std::all_of(linears_.begin(), linears_.end(), [batch](const Linear& l) {
           return !l.grad_sum.defined() && l.layer->Factored(batch);
         });
}

void Model::StepGradients(const at::Tensor& x, const at::Tensor& t, Loss loss,
                          const GroupStep* group, bool factored, at::Tensor* output,
                          StepLoss* step_loss, std::vector<at::Tensor>* grads,
                          std::vector<at::Tensor>* sample_inputs) {
  const int64_t batch = x.size(0);
  std::vector<at::Tensor> weights;
  c10::AutoGradMode grad_mode(true);
  // The taps hold only this forward, and are off again whatever happens in it.
  auto taps_off = absl::MakeCleanup([this] {
    for (const Linear& l : linears_) *l.tap = Tap();
  });
  for (const Linear& l : linears_) {
    if (!factored) weights.push_back(l.layer->WeightLeaf());
    l.tap->on = factored;
  }
  int64_t bytes = 0;
  *output = Run(x, &bytes);
  std::vector<at::Tensor> at_outputs;
  if (factored) {
    for (const Linear& l : linears_) {
      at_outputs.push_back(l.tap->pre_bias);
      sample_inputs->push_back(l.tap->input.detach());
    }
  }
  std::move(taps_off).Invoke();
  step_loss->value =
      loss == Loss::kMse ? at::mse_loss(*output, t) : at::cross_entropy_loss(*output, t);
  step_loss->kind = loss;
  // A rank's share of the group's mean: its mean times its part of the group's rows (both
  // losses are means over rows, MSE over every element of them).
  if (group != nullptr && group->group_batch != batch) {
    step_loss->value = step_loss->value *
                       (static_cast<double>(batch) / static_cast<double>(group->group_batch));
  }
  if (!linears_.empty()) {
    *grads = torch::autograd::grad({step_loss->value}, factored ? at_outputs : weights, {},
                                   /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
  }
  *output = output->detach();
}

absl::StatusOr<TrainStepResult> Model::TrainStep(const at::Tensor& input, const at::Tensor& target,
                                                 Loss loss, int64_t expected_step,
                                                 const Interrupt& interrupt,
                                                 const GroupStep* group) {
  if (absl::Status s = CheckTrainStep(input, target, loss); !s.ok()) return s;
  const int64_t batch = input.size(0);
  const int64_t out = summary_.out_features;
  if (group != nullptr && group->group_batch < batch) {
    return absl::InvalidArgumentError(absl::StrCat("group batch: expected at least this rank's ",
                                                   batch, " rows, got ", group->group_batch));
  }
  StreamScope on_stream(stream_, {&input, &target});
  absl::MutexLock lock(&mu_);
  if (expected_step != step_) {
    if (last_update_.has_value() && last_train_.has_value() && expected_step == step_ - 1 &&
        last_train_->fingerprint == Fingerprint(input, target, loss)) {
      TrainStepResult replay;
      replay.loss = last_train_->loss;
      replay.update = *last_update_;
      replay.update.replayed = true;
      return replay;
    }
    return absl::FailedPreconditionError(absl::StrCat("expected_step: expected ", step_,
                                                      " (the model's step), got ", expected_step));
  }
  try {
    if (!AllFinite(input)) {
      return absl::InvalidArgumentError("input: expected finite values, got NaN or Inf");
    }
    if (loss == Loss::kMse && !AllFinite(target)) {
      return absl::InvalidArgumentError("target: expected finite values, got NaN or Inf");
    }
    if (loss == Loss::kCrossEntropy) {
      const at::Tensor range = at::stack({target.min(), target.max()}).to(at::kCPU);
      const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
      if (lo < 0 || hi >= out) {
        return absl::InvalidArgumentError(absl::StrCat("target: expected class indices in [0, ",
                                                       out, "), got ", lo < 0 ? lo : hi));
      }
    }
    const uint64_t fingerprint = Fingerprint(input, target, loss);
    if (GraphServes(input, target, group)) {
      auto graphed = GraphedTrainStep(input, target, loss, fingerprint, interrupt);
      if (!graphed.ok()) return graphed.status();
      if (graphed->has_value()) {
        TrainStepResult& result = **graphed;
        result.output = on_stream.Hand(result.output);
        last_train_ = LastTrainStep{result.loss, fingerprint, {fingerprint}};
        return std::move(result);
      }
    }
    const std::vector<at::Tensor> on_device = ToDevice({input, target}, device_);
    TrainStepResult result;
    StepLoss step_loss;
    step_loss.fingerprint = fingerprint;
    std::vector<at::Tensor> grads;
    // One sample (or, in BF16 and TF32 on CUDA, a batch the packed route takes) and no
    // pending gradient sums: each linear layer's weight gradient is taken in its two factors (the
    // gradient at the layer's pre-bias output and its input) instead of an [out, in] matrix;
    // autograd then runs no weight-gradient GEMM, and the packed route makes no w_eff either.
    const bool factored = FactoredStep(batch, group);
    std::vector<at::Tensor> sample_inputs;
    StepGradients(on_device[0], on_device[1], loss, group, factored, &result.output, &step_loss,
                  &grads, &sample_inputs);
    result.output = on_stream.Hand(result.output);
    // As in UpdateCorrelation: the forward and backward changed nothing; the update is all.
    if (interrupt) {
      if (absl::Status s = interrupt(); !s.ok()) return s;
    }
    auto update = ApplyUpdate(grads, &step_loss, factored ? &sample_inputs : nullptr,
                              group != nullptr ? group->combiner : nullptr);
    if (!update.ok()) return update.status();
    result.loss = step_loss.host;
    result.update = *std::move(update);
    std::vector<uint64_t> fingerprints = std::move(step_loss.group_fingerprints);
    if (fingerprints.empty()) fingerprints.push_back(step_loss.fingerprint);
    last_train_ = LastTrainStep{result.loss, step_loss.fingerprint, std::move(fingerprints)};
    return result;
  } catch (const c10::Error& e) {
    return TorchError(e, "train step");
  }
}

// ---------------------------------------------------------------- CUDA graphs of TrainStep

namespace {

// Shapes a model keeps graphs of: a training run steps with one batch size, or a few; each graph
// holds its step's temporaries in its own memory pool.
constexpr size_t kMaxGraphs = 4;

}  // namespace

bool Model::GraphServes(const at::Tensor& input, const at::Tensor& target,
                        const GroupStep* group) const {
#if TSCALE_WITH_CUDA
  if (!options_.cuda_graphs || !stream_ || group != nullptr || linears_.empty() ||
      step_ >= kMaxStep || !input.is_cpu() || !input.is_contiguous() || !target.is_cpu() ||
      !target.is_contiguous()) {
    return false;
  }
  return std::all_of(linears_.begin(), linears_.end(), [](const Linear& l) {
    return !l.grad_sum.defined() && l.layer->state().step_counter() > 0;
  });
#else
  (void)input;
  (void)target;
  (void)group;
  return false;
#endif
}

absl::StatusOr<std::optional<TrainStepResult>> Model::GraphedTrainStep(
    const at::Tensor& input, const at::Tensor& target, Loss loss, uint64_t fingerprint,
    const Interrupt& interrupt) {
#if TSCALE_WITH_CUDA
  const std::pair<int64_t, Loss> key{input.size(0), loss};
  if (!graphs_.count(key) && graphs_.size() >= kMaxGraphs) return std::nullopt;
  Graphed& g = graphs_[key];
  if (g.failed || ++g.seen < 2) return std::nullopt;
  // Each layer's StepReciprocal of this step, which the kernels of S read in the graph.
  std::vector<float> reciprocals;
  for (const Linear& l : linears_) {
    reciprocals.push_back(
        cuda::StepReciprocal(l.layer->state().step_counter(), l.layer->state().group_size()));
  }
  const std::vector<at::Tensor> host = {
      input, target,
      at::from_blob(reciprocals.data(), {static_cast<int64_t>(reciprocals.size())}, at::kFloat)};
  std::vector<int64_t> offsets;
  const at::Tensor staged = Gathered(host, &offsets);
  if (!g.graph) {
    g.inputs = at::empty({staged.numel()}, at::TensorOptions(at::kByte).device(device_));
  }
  g.inputs.copy_(staged, /*non_blocking=*/true);
  if (!g.graph) {
    // x, target and the reciprocals as the captured step reads them: views of g.inputs.
    const std::vector<at::Tensor> in = ViewsOf(g.inputs, host, offsets);
    const bool factored = FactoredStep(input.size(0), nullptr);
    auto body = [&] {
      for (size_t i = 0; i < linears_.size(); ++i) {
        linears_[i].layer->DropCaches();
        linears_[i].layer->ReadStepAt(in[2].data_ptr<float>() + i);
      }
      StepLoss step_loss;
      std::vector<at::Tensor> grads, sample_inputs, exact;
      StepGradients(in[0], in[1], loss, nullptr, factored, &g.output, &step_loss, &grads,
                    &sample_inputs);
      const std::vector<at::Tensor> scores =
          StepScores(grads, factored ? &sample_inputs : nullptr, &exact);
      g.figures = UpdateFigures(scores, exact, &step_loss.value, &g.after);
      g.flags = std::count_if(exact.begin(), exact.end(),
                              [](const at::Tensor& e) { return e.defined(); });
    };
    // The layers read the step from device memory in the graph only; their caches hold what the
    // capture made, which the replay below fills and the commit drops.
    auto restore = absl::MakeCleanup([this] {
      for (const Linear& l : linears_) l.layer->ReadStepAt(nullptr);
    });
    try {
      g.graph = cuda::StepGraph::Capture(*stream_, body);
    } catch (const c10::Error&) {
      for (const Linear& l : linears_) l.layer->DropCaches();
      g = Graphed();
      g.failed = true;
      return std::nullopt;
    }
  }
  g.graph->Replay(*stream_);
  TrainStepResult result;
  result.output = g.output.clone();
  const at::Tensor figures = g.figures.to(at::kCPU);  // the step's one synchronisation
  const int64_t* flag = figures.data_ptr<int64_t>() + 2 * linears_.size();
  if (std::any_of(flag, flag + g.flags, [](int64_t f) { return f == 0; })) return std::nullopt;
  if (interrupt) {
    if (absl::Status s = interrupt(); !s.ok()) return s;
  }
  StepLoss step_loss;
  step_loss.kind = loss;
  step_loss.fingerprint = fingerprint;
  auto update = CommitUpdate(figures, g.after, &step_loss);
  if (!update.ok()) return update.status();
  ++graphed_steps_;
  result.loss = step_loss.host;
  result.update = *std::move(update);
  return result;
#else
  (void)input;
  (void)target;
  (void)loss;
  (void)fingerprint;
  (void)interrupt;
  return std::nullopt;
#endif
}

int64_t Model::graphed_steps() const {
  absl::MutexLock lock(&mu_);
  return graphed_steps_;
}

int64_t Model::graphs() const {
  absl::MutexLock lock(&mu_);
  return std::count_if(graphs_.begin(), graphs_.end(),
                       [](const auto& entry) { return entry.second.graph != nullptr; });
}

// ---------------------------------------------------------------- state

std::optional<LastUpdateRecord> Model::LastUpdate() const {
  absl::MutexLock lock(&mu_);
  if (!last_update_.has_value()) return std::nullopt;
  LastUpdateRecord record;
  record.update = *last_update_;
  record.update.replayed = false;
  if (last_train_.has_value()) {
    record.train_step = true;
    record.loss = last_train_->loss;
    record.fingerprints = last_train_->fingerprints;
  }
  return record;
}

absl::Status Model::AdoptLastUpdate(const LastUpdateRecord& record, size_t rank) {
  absl::MutexLock lock(&mu_);
  if (record.update.step != step_) {
    return absl::InvalidArgumentError(absl::StrCat("last update: expected a record of step ", step_,
                                                   ", got step ", record.update.step));
  }
  if (record.train_step && rank >= record.fingerprints.size()) {
    return absl::InvalidArgumentError(absl::StrCat("last update: expected a fingerprint for rank ",
                                                   rank, ", got ", record.fingerprints.size()));
  }
  last_update_ = record.update;
  last_update_->replayed = false;
  if (record.train_step) {
    last_train_ = LastTrainStep{record.loss, record.fingerprints[rank], record.fingerprints};
  } else {
    last_train_.reset();
  }
  return absl::OkStatus();
}

StateSnapshot Model::ExportState() const {
  StreamScope on_stream(stream_);
  absl::MutexLock lock(&mu_);
  StateSnapshot snap;
  snap.step = step_;
  struct Exporter {
    StateDict* out;
    void Nodes(const std::vector<std::unique_ptr<Node>>& nodes,
               const std::vector<LayerSpec>& layers, const std::string& prefix) {
      for (size_t i = 0; i < nodes.size(); ++i) {
        const std::string name =
            prefix.empty() ? layers[i].name : absl::StrCat(prefix, ".", layers[i].name);
        if (auto* l = dynamic_cast<const LinearNode<Tap>*>(nodes[i].get())) {
          l->layer.Export(name, out);
        } else if (auto* n = dynamic_cast<const NormNode*>(nodes[i].get())) {
          n->layer.Export(name, out);
        } else if (auto* r = dynamic_cast<const ResidualNode*>(nodes[i].get())) {
          Nodes(r->children, std::get<ResidualSpec>(layers[i].kind).layers, name);
        }
      }
    }
  };
  Exporter{&snap.tensors}.Nodes(nodes_, spec_.layers, "");
  return snap;
}

ModelScaleStats Model::ScaleStats(bool per_group) const {
  struct Copy {
    const Stateful* layer;
    at::Tensor corr_accum;
    int64_t step;
  };
  std::vector<Copy> copies;
  ModelScaleStats out;
  StreamScope on_stream(stream_);  // the copies are made, and read, on the model's stream
  {
    absl::MutexLock lock(&mu_);
    out.step = step_;
    for (const Stateful& st : stateful_) {
      copies.push_back({&st, st.state->corr_accum().clone(), st.state->step_counter()});
    }
  }
  // E and the shapes never change after construction; only corr_accum needed the lock.
  for (const Copy& c : copies) {
    const TernaryState& st = *c.layer->state;
    out.layers.push_back(
        ComputeScaleStats(c.layer->name, c.corr_accum, st.e(), c.step, st.group_size(), per_group));
    out.layers.back().frozen = c.layer->frozen;
  }
  return out;
}

int64_t Model::step() const {
  absl::MutexLock lock(&mu_);
  return step_;
}

int64_t Model::pending_passes() const {
  absl::MutexLock lock(&mu_);
  ExpirePasses();
  return pending_passes_;
}

int64_t Model::backwards() const {
  absl::MutexLock lock(&mu_);
  return backwards_;
}

int64_t Model::pending_bytes() const {
  absl::MutexLock lock(&mu_);
  ExpirePasses();
  return pending_bytes_;
}

int64_t Model::device_bytes() const {
  absl::MutexLock lock(&mu_);
  ExpirePasses();
  int64_t bytes = pending_bytes_;
  for (const Linear& l : linears_) {
    bytes += l.layer->device_bytes() + (l.grad_sum.defined() ? l.grad_sum.nbytes() : 0);
  }
  for (const TernaryRMSNorm* n : norms_) bytes += n->device_bytes();
  return bytes;
}

void Model::ExpirePasses() const {
  if (options_.pending_pass_ttl <= absl::ZeroDuration()) return;
  const absl::Time cutoff = Now(options_) - options_.pending_pass_ttl;
  // Passes are created in time order: the front is the oldest.
  while (!pass_order_.empty()) {
    const auto& [created, id] = pass_order_.front();
    auto it = passes_.find(id);
    if (it != passes_.end() && !it->second.used && !it->second.expired) {
      if (created > cutoff) break;
      // Kept as a marker, so that its Backward says why it is gone.
      Pass& pass = it->second;
      pass.expired = true;
      pass.input.reset();
      pass.output.reset();
      pass.weights.clear();
      pending_bytes_ -= pass.bytes;
      --pending_passes_;
    }
    pass_order_.pop_front();
  }
}

absl::StatusOr<int64_t> Model::EstimateDeviceBytes(const ModelSpec& spec) {
  if (auto summary = ValidateSpec(spec); !summary.ok()) return summary.status();
  // What Build allocates and training adds, layer by layer, in the largest form any compute type
  // takes (int8 trits, float32 w_eff and gradient sums): keep in step with the layers'
  // device_bytes() (tests hold the two equal for FP32 on the CPU after a training step).
  struct Estimator {
    int64_t bytes = 0;
    void Layers(const std::vector<LayerSpec>& layers) {
      for (const LayerSpec& layer : layers) {
        if (const auto* l = std::get_if<TernaryLinearSpec>(&layer.kind)) {
          const int64_t gs = l->group_size > 0 ? l->group_size : kDefaultGroupSize;
          const int64_t weights = l->in_features * l->out_features;
          const int64_t groups = l->out_features * ((l->in_features + gs - 1) / gs);
          // int8 trits; float32 w_eff and gradient sum; int8 E and int64 corr_accum per group.
          bytes += weights * (1 + 4 + 4) + groups * (1 + 8) + (l->bias ? 4 * l->out_features : 0);
        } else if (const auto* n = std::get_if<TernaryRMSNormSpec>(&layer.kind)) {
          const int64_t gs = n->group_size > 0 ? n->group_size : kDefaultGroupSize;
          const int64_t groups = (n->dim + gs - 1) / gs;
          // int8 trits and the float32 S * T it multiplies by.
          bytes += n->dim * (1 + 4) + groups * (1 + 8);
        } else if (const auto* r = std::get_if<ResidualSpec>(&layer.kind)) {
          Layers(r->layers);
        }
      }
    }
  };
  Estimator estimator;
  estimator.Layers(spec.layers);
  return estimator.bytes;
}

}  // namespace tscale::core
