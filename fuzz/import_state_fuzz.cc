// Fuzzes ImportState's path from the uploaded file to a model: DecodeState (safetensors, metadata
// format/spec/step/crc32c) and then Model::Import of what decodes, on the CPU, as the service does.
//
// The input is a state file, after one leading byte of options:
//   bit 0: recompute the file's crc32c after parsing, so that mutations of the data section get
//          past the checksum to the state's own checks (the file is rewritten by the writer);
//   bit 1: when the file carries no spec, import it under a fixed two-layer spec (as a header spec
//          does) rather than stopping.
// Specs that declare more than kMaxFuzzWeights weights or features are not imported: a fuzz input
// of a few kilobytes cannot hold their state anyway, and building them would only measure memory.
//
// Invariants: refusals are InvalidArgument or DataLoss with a message; an imported model exports a
// state that encodes, decodes and imports again to the same state and step, and it runs a forward
// pass of the declared shape.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/strings/str_cat.h"
#include "fuzz/check.h"
#include "server/checkpoint/crc32c.h"
#include "server/checkpoint/safetensors.h"
#include "server/checkpoint/state_file.h"
#include "server/core/model.h"
#include "server/core/spec.h"

namespace tscale::fuzz {
namespace {

constexpr int64_t kMaxFuzzWeights = int64_t{1} << 16;
constexpr int64_t kMaxFuzzFeatures = 4096;

// The spec of tests/data/golden/linear_ragged_bias (whose state a seed carries without metadata).
constexpr char kFallbackSpec[] =
    R"({"layers": [{"name": "fc", "ternary_linear": {"in_features": 100, "out_features": 7,)"
    R"( "group_size": 32, "bias": true}}]})";

// The file rewritten with a matching crc32c, or the input unchanged when it does not parse.
std::string WithFixedChecksum(std::string bytes) {
  auto file = checkpoint::SafetensorsFile::Parse(bytes);
  if (!file.ok()) return bytes;
  checkpoint::SafetensorsWriter writer;
  for (const auto& [name, view] : file->tensors()) {
    if (!writer.Add(name, view.dtype, view.shape, std::string(view.data)).ok()) return bytes;
  }
  for (const auto& [key, value] : file->metadata()) writer.SetMetadata(key, value);
  writer.SetMetadata("crc32c", checkpoint::Crc32cHex(checkpoint::Crc32c(writer.DataSection())));
  return writer.Serialize();
}

bool SmallEnough(const core::SpecSummary& s) {
  if (s.ternary_params > kMaxFuzzWeights) return false;
  if (s.in_features > kMaxFuzzFeatures || s.out_features > kMaxFuzzFeatures) return false;
  return true;
}

// Every feature count in the spec, so that activations and residual blocks are bounded too.
bool SmallLayers(const std::vector<core::LayerSpec>& layers) {
  for (const core::LayerSpec& layer : layers) {
    if (const auto* l = std::get_if<core::TernaryLinearSpec>(&layer.kind)) {
      if (l->in_features > kMaxFuzzFeatures || l->out_features > kMaxFuzzFeatures) return false;
    } else if (const auto* n = std::get_if<core::TernaryRMSNormSpec>(&layer.kind)) {
      if (n->dim > kMaxFuzzFeatures) return false;
    } else if (const auto* r = std::get_if<core::ResidualSpec>(&layer.kind)) {
      if (!SmallLayers(r->layers)) return false;
    }
  }
  return true;
}

void CheckSameState(const core::StateSnapshot& a, const core::StateSnapshot& b) {
  FUZZ_CHECK(a.step == b.step, absl::StrCat("step ", a.step, " vs ", b.step));
  FUZZ_CHECK(a.tensors.size() == b.tensors.size(), "tensor count");
  for (const auto& [name, t] : a.tensors) {
    auto it = b.tensors.find(name);
    FUZZ_CHECK(it != b.tensors.end(), absl::StrCat("'", name, "' missing"));
    FUZZ_CHECK(t.scalar_type() == it->second.scalar_type() && t.sizes() == it->second.sizes() &&
                   at::equal(t, it->second),
               absl::StrCat("'", name, "' differs"));
  }
}

void CheckRefused(const absl::Status& s) {
  FUZZ_CHECK(
      s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kDataLoss,
      absl::StrCat("unexpected status: ", s.ToString()));
  FUZZ_CHECK(!s.message().empty(), "an error without a message");
}

void Run(uint8_t options, std::string bytes) {
  if (options & 1) bytes = WithFixedChecksum(std::move(bytes));
  auto decoded = checkpoint::DecodeState(std::move(bytes));
  if (!decoded.ok()) return CheckRefused(decoded.status());

  core::ModelSpec spec;
  if (decoded->spec.has_value()) {
    spec = *decoded->spec;
  } else if (options & 2) {
    spec = *core::SpecFromJson(kFallbackSpec);
  } else {
    return;
  }
  auto summary = core::ValidateSpec(spec);
  if (!summary.ok()) {
    // Import validates the same way.
    auto refused = core::Model::Import(spec, decoded->tensors, decoded->step, at::kCPU);
    FUZZ_CHECK(!refused.ok(), "Import accepted a spec that ValidateSpec refuses");
    return CheckRefused(refused.status());
  }
  if (!SmallEnough(*summary) || !SmallLayers(spec.layers)) return;

  auto model = core::Model::Import(spec, decoded->tensors, decoded->step, at::kCPU);
  if (!model.ok()) return CheckRefused(model.status());
  if (decoded->step.has_value()) {
    FUZZ_CHECK((*model)->step() == *decoded->step, "step not the file's");
  }

  const core::StateSnapshot state = (*model)->ExportState();
  auto again = checkpoint::DecodeState(checkpoint::EncodeState(state, (*model)->spec()));
  FUZZ_CHECK(again.ok(),
             absl::StrCat("exported state does not decode: ", again.status().ToString()));
  FUZZ_CHECK(again->spec.has_value() && again->step.has_value(), "exported metadata");
  auto reimported = core::Model::Import(*again->spec, again->tensors, again->step, at::kCPU);
  FUZZ_CHECK(reimported.ok(),
             absl::StrCat("exported state does not import: ", reimported.status().ToString()));
  CheckSameState(state, (*reimported)->ExportState());

  const at::Tensor input = at::ones({2, summary->in_features}, at::kFloat);
  auto forward = (*model)->Forward(input, /*train=*/false);
  FUZZ_CHECK(forward.ok(),
             absl::StrCat("forward of an imported model: ", forward.status().ToString()));
  FUZZ_CHECK(forward->output.dim() == 2 && forward->output.size(0) == 2 &&
                 forward->output.size(1) == summary->out_features,
             "forward output shape");
}

}  // namespace
}  // namespace tscale::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  at::set_num_threads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  tscale::fuzz::Run(data[0], std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  return 0;
}
