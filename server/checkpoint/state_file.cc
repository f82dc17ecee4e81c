#include "server/checkpoint/state_file.h"

#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/checkpoint/crc32c.h"

namespace tscale::checkpoint {
namespace {

struct DTypePair {
  DType file;
  at::ScalarType torch;
};
constexpr DTypePair kDTypes[] = {
    {DType::kU8, at::kByte},   {DType::kI8, at::kChar},      {DType::kI32, at::kInt},
    {DType::kI64, at::kLong},  {DType::kF32, at::kFloat},    {DType::kBF16, at::kBFloat16},
    {DType::kF16, at::kHalf},
};

at::ScalarType ToTorch(DType d) {
  for (const auto& p : kDTypes) {
    if (p.file == d) return p.torch;
  }
  return at::kByte;  // unreachable: every DType is listed
}

DType FromTorch(at::ScalarType t) {
  for (const auto& p : kDTypes) {
    if (p.torch == t) return p.file;
  }
  return DType::kU8;  // state tensors are all of the listed types
}

}  // namespace

at::Tensor TensorFromView(const TensorView& view) {
  at::Tensor t = at::empty(view.shape, ToTorch(view.dtype));
  if (!view.data.empty()) std::memcpy(t.data_ptr(), view.data.data(), view.data.size());
  return t;
}

std::string EncodeState(const core::StateSnapshot& state, const core::ModelSpec& spec,
                        const std::map<std::string, std::string>& extra) {
  SafetensorsWriter writer;
  for (const auto& [name, tensor] : state.tensors) {
    const at::Tensor t = tensor.to(at::kCPU).contiguous();
    std::string bytes(static_cast<const char*>(t.data_ptr()), t.nbytes());
    // Names and sizes come from a valid model; Add cannot fail here.
    (void)writer.Add(name, FromTorch(t.scalar_type()),
                     std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), std::move(bytes));
  }
  for (const auto& [k, v] : extra) writer.SetMetadata(k, v);
  writer.SetMetadata("format", kStateFormat);
  writer.SetMetadata("spec", core::SpecToJson(spec));
  writer.SetMetadata("step", absl::StrCat(state.step));
  writer.SetMetadata("crc32c", Crc32cHex(Crc32c(writer.DataSection())));
  return writer.Serialize();
}

absl::StatusOr<DecodedState> DecodeState(std::string bytes) {
  auto file = SafetensorsFile::Parse(std::move(bytes));
  if (!file.ok()) return file.status();
  DecodedState out;
  out.metadata = file->metadata();
  const auto& md = out.metadata;
  if (auto it = md.find("crc32c"); it != md.end()) {
    const std::string got = Crc32cHex(Crc32c(file->data_section()));
    if (it->second != got) {
      return absl::DataLossError(absl::StrCat("crc32c: the metadata says ", it->second,
                                              ", the data section has ", got));
    }
  }
  if (auto it = md.find("format"); it != md.end() && it->second != kStateFormat) {
    return absl::InvalidArgumentError(
        absl::StrCat("format: expected ", kStateFormat, ", got '", it->second, "'"));
  }
  if (auto it = md.find("spec"); it != md.end()) {
    auto spec = core::SpecFromJson(it->second);
    if (!spec.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata spec: ", spec.status().message()));
    }
    out.spec = *std::move(spec);
  }
  if (auto it = md.find("step"); it != md.end()) {
    int64_t step = 0;
    if (!absl::SimpleAtoi(it->second, &step) || step < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata step: expected an integer >= 0, got '", it->second, "'"));
    }
    out.step = step;
  }
  for (const auto& [name, view] : file->tensors()) out.tensors[name] = TensorFromView(view);
  return out;
}

}  // namespace tscale::checkpoint
