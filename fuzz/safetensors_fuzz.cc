// Fuzzes the safetensors reader (checkpoints, ExportState / ImportState files) with any bytes.
//
// Invariants: a refused input gives InvalidArgument; an accepted one has views that lie in its
// data section, match their dtype and shape and tile the section exactly; and it survives a round
// trip through the writer (same tensors, same metadata) unless a tensor name is one the writer
// refuses (empty, or starting with "__").
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "fuzz/check.h"
#include "server/checkpoint/safetensors.h"

namespace tscale::fuzz {
namespace {

using checkpoint::DTypeName;
using checkpoint::DTypeSize;
using checkpoint::SafetensorsFile;
using checkpoint::SafetensorsWriter;
using checkpoint::TensorView;

void CheckViews(const SafetensorsFile& file) {
  const absl::string_view data = file.data_section();
  uint64_t covered = 0;
  for (const auto& [name, view] : file.tensors()) {
    for (int64_t dim : view.shape) FUZZ_CHECK(dim >= 0, absl::StrCat("tensor '", name, "'"));
    const uint64_t expected = static_cast<uint64_t>(view.numel()) * DTypeSize(view.dtype);
    FUZZ_CHECK(view.data.size() == expected,
               absl::StrCat("tensor '", name, "': ", view.data.size(), " bytes, expected ",
                            expected, " for ", DTypeName(view.dtype)));
    if (!view.data.empty()) {
      FUZZ_CHECK(view.data.data() >= data.data() &&
                     view.data.data() + view.data.size() <= data.data() + data.size(),
                 absl::StrCat("tensor '", name, "' lies outside the data section"));
    }
    covered += view.data.size();
  }
  // Tiling without holes or overlaps: the sizes add up to the section.
  FUZZ_CHECK(covered == data.size(),
             absl::StrCat("tensors cover ", covered, " of ", data.size(), " bytes"));
}

bool SameView(const TensorView& a, const TensorView& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.data == b.data;
}

void CheckRoundTrip(const SafetensorsFile& file) {
  SafetensorsWriter writer;
  for (const auto& [name, view] : file.tensors()) {
    const absl::Status s = writer.Add(name, view.dtype, view.shape, std::string(view.data));
    if (!s.ok()) {
      // The reader takes any JSON key as a tensor name; the writer reserves these.
      const bool reserved = name.empty() || absl::string_view(name).substr(0, 2) == "__";
      FUZZ_CHECK(reserved && s.code() == absl::StatusCode::kInvalidArgument,
                 absl::StrCat("writer refused tensor '", name, "': ", s.ToString()));
      return;
    }
  }
  for (const auto& [key, value] : file.metadata()) writer.SetMetadata(key, value);
  const std::string encoded = writer.Serialize();
  auto again = SafetensorsFile::Parse(encoded);
  FUZZ_CHECK(again.ok(),
             absl::StrCat("re-encoded file does not parse: ", again.status().ToString()));
  FUZZ_CHECK(again->metadata() == file.metadata(), "metadata changed in the round trip");
  FUZZ_CHECK(again->tensors().size() == file.tensors().size(), "tensor count changed");
  for (const auto& [name, view] : file.tensors()) {
    const TensorView* other = again->Find(name);
    FUZZ_CHECK(other != nullptr, absl::StrCat("tensor '", name, "' lost in the round trip"));
    FUZZ_CHECK(SameView(view, *other), absl::StrCat("tensor '", name, "' changed"));
  }
  // The writer aligns the data section to 8 bytes and each tensor to its element size.
  FUZZ_CHECK((8 + again->header_bytes()) % 8 == 0, "data section not 8-aligned");
  for (const auto& [name, view] : again->tensors()) {
    const size_t offset = static_cast<size_t>(view.data.data() - again->data_section().data());
    FUZZ_CHECK(view.data.empty() || offset % DTypeSize(view.dtype) == 0,
               absl::StrCat("tensor '", name, "' misaligned at ", offset));
  }
  // The writer's output is canonical: writing it again gives the same bytes.
  SafetensorsWriter second;
  for (const auto& [name, view] : again->tensors()) {
    FUZZ_CHECK(second.Add(name, view.dtype, view.shape, std::string(view.data)).ok(), name);
  }
  for (const auto& [key, value] : again->metadata()) second.SetMetadata(key, value);
  FUZZ_CHECK(second.Serialize() == encoded, "serialization is not deterministic");
}

}  // namespace
}  // namespace tscale::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = tscale::checkpoint::SafetensorsFile::Parse(
      std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) {
    FUZZ_CHECK_REFUSED(file.status(), absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(!file.status().message().empty(), "an error without a message");
    return 0;
  }
  tscale::fuzz::CheckViews(*file);
  tscale::fuzz::CheckRoundTrip(*file);
  return 0;
}
