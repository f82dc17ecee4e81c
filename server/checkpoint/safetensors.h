// safetensors: the file format of checkpoints and of ExportState / ImportState.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section. The JSON is
// an object mapping tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section), plus an optional "__metadata__" object of string values.
// This reader accepts only well-formed files: every malformed input gives an InvalidArgument
// status that says what was wrong, never a crash, and allocation is bounded by the input's size.
#ifndef TSCALE_SERVER_CHECKPOINT_SAFETENSORS_H_
#define TSCALE_SERVER_CHECKPOINT_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tscale::checkpoint {

enum class DType { kU8, kI8, kI32, kI64, kF32, kBF16, kF16 };

// "U8", "I8", "I32", "I64", "F32", "BF16", "F16".
absl::string_view DTypeName(DType dtype);
// The inverse of DTypeName; InvalidArgument naming the string for anything else.
absl::StatusOr<DType> ParseDType(absl::string_view name);
// Bytes per element.
size_t DTypeSize(DType dtype);

// Largest header accepted by the reader (as the reference safetensors implementation: 100 MB).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// One tensor of a parsed file: a view into the file's bytes.
struct TensorView {
  DType dtype;
  std::vector<int64_t> shape;
  absl::string_view data;  // exactly numel(shape) * DTypeSize(dtype) bytes, little-endian

  int64_t numel() const;
};

// A parsed, validated safetensors file. Owns its bytes; views stay valid while it lives.
class SafetensorsFile {
 public:
  // Validates everything: header length within the input and kMaxHeaderBytes, JSON syntax,
  // no duplicate keys, known dtypes, non-negative shapes whose byte size does not overflow,
  // offsets that match the shapes and tile the data section exactly (no holes, no overlaps),
  // metadata values that are strings.
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes);
  // Reads a whole file (its size is checked before anything is allocated) and parses it.
  static absl::StatusOr<SafetensorsFile> ReadFile(const std::string& path);

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorView* Find(absl::string_view name) const;
  // The bytes after the header (what the `crc32c` metadata of tscale checkpoints covers).
  absl::string_view data_section() const;
  uint64_t header_bytes() const { return header_bytes_; }

 private:
  SafetensorsFile() = default;
  // Held by pointer so that views survive moves of the file object.
  std::shared_ptr<const std::string> bytes_;
  uint64_t header_bytes_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorView> tensors_;
};

// Builds a safetensors file. Tensors are laid out by decreasing element size, then by name, so
// every tensor is aligned to its element size; the header is padded with spaces so the data
// section starts at a multiple of 8.
class SafetensorsWriter {
 public:
  // InvalidArgument when the name is empty, starts with "__", is already present, or the byte
  // count does not match the shape.
  absl::Status Add(std::string name, DType dtype, std::vector<int64_t> shape, std::string data);
  void SetMetadata(std::string key, std::string value);

  // The data section as Serialize() will write it.
  std::string DataSection() const;
  // The whole file.
  std::string Serialize() const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::string data;
  };
  std::vector<std::string> Order() const;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace tscale::checkpoint

#endif  // TSCALE_SERVER_CHECKPOINT_SAFETENSORS_H_
