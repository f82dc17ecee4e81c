#include "server/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/core/json_depth.h"

namespace tscale::checkpoint {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kMetadataKey = "__metadata__";
constexpr size_t kLengthPrefixBytes = 8;
// A valid header nests three levels (file object > tensor object > shape array). The limit keeps
// a few spare levels so that slightly wrong headers still get a specific message, while hostile
// deep nesting is rejected before the JSON parser allocates per level.
constexpr int kMaxJsonDepth = 16;
// Names and values quoted in messages are cut to this many bytes.
constexpr size_t kMaxQuotedBytes = 128;

constexpr DType kAllDTypes[] = {DType::kU8,  DType::kI8,   DType::kI32, DType::kI64,
                                DType::kF32, DType::kBF16, DType::kF16};

// 'text', truncated (at a UTF-8 character boundary) so that hostile names cannot blow up messages.
std::string Quote(absl::string_view text) {
  if (text.size() <= kMaxQuotedBytes) return absl::StrCat("'", text, "'");
  size_t cut = kMaxQuotedBytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0u) == 0x80u) --cut;
  return absl::StrCat("'", text.substr(0, cut), "'...");
}

// A JSON value as it appears in the header, shortened; containers by their type only.
std::string Describe(const Json& value) {
  if (value.is_object() || value.is_array()) return std::string(value.type_name());
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > kMaxQuotedBytes) text = absl::StrCat(text.substr(0, kMaxQuotedBytes), "...");
  return text;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// "I8 [24]": how messages name a tensor's type.
std::string TypeString(DType dtype, const std::vector<int64_t>& shape) {
  return absl::StrCat(DTypeName(dtype), " ", ShapeString(shape));
}

// Byte size of a tensor with non-negative dims; nullopt when it does not fit in int64. The product
// is checked in order (as the reference implementation does), so numel() of a valid view never
// overflows.
std::optional<int64_t> CheckedByteSize(DType dtype, const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(numel, dim, &numel)) return std::nullopt;
  }
  int64_t bytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(DTypeSize(dtype)), &bytes)) {
    return std::nullopt;
  }
  return bytes;
}

// A JSON integer that is >= 0 and fits in uint64 ("-0" counts); nullopt for anything else.
std::optional<uint64_t> AsUnsigned(const Json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v >= 0) return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

absl::Status HeaderError(absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors header: ", message));
}

absl::Status TensorError(absl::string_view name, absl::string_view message) {
  return HeaderError(absl::StrCat("tensor ", Quote(name), ": ", message));
}


// Parses the header JSON, rejecting duplicate keys in any object (nlohmann keeps the last one
// silently, which would let two readers disagree about a file).
absl::StatusOr<Json> ParseHeaderJson(absl::string_view text) {
  // nlohmann stops at a NUL byte as if the input ended there, which would accept arbitrary bytes
  // after it. Valid JSON never contains a raw NUL (inside strings it must be escaped).
  if (const size_t nul = text.find('\0'); nul != absl::string_view::npos) {
    return HeaderError(absl::StrCat("invalid JSON: NUL byte at header offset ", nul));
  }
  if (core::JsonNestingDepth(text) > kMaxJsonDepth) {
    return HeaderError(absl::StrCat("JSON nested deeper than ", kMaxJsonDepth, " levels"));
  }
  struct Frame {
    bool is_object;
    std::string key;  // last key seen in this object: names the enclosing entry in messages
    std::set<std::string> keys;
  };
  std::vector<Frame> frames;
  std::string duplicate_error;
  Json::parser_callback_t callback = [&](int /*depth*/, Json::parse_event_t event,
                                         Json& parsed) -> bool {
    switch (event) {
      case Json::parse_event_t::object_start:
        frames.push_back(Frame{true, {}, {}});
        break;
      case Json::parse_event_t::array_start:
        frames.push_back(Frame{false, {}, {}});
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        if (!frames.empty()) frames.pop_back();
        break;
      case Json::parse_event_t::key: {
        if (frames.empty() || !frames.back().is_object) break;
        Frame& frame = frames.back();
        frame.key = parsed.get<std::string>();
        if (!frame.keys.insert(frame.key).second && duplicate_error.empty()) {
          if (frames.size() == 1) {
            duplicate_error = absl::StrCat("duplicate key ", Quote(frame.key), " at the top level");
          } else {
            duplicate_error = absl::StrCat("duplicate key ", Quote(frame.key), " in ",
                                           Quote(frames[frames.size() - 2].key));
          }
        }
        break;
      }
      case Json::parse_event_t::value:
        break;
    }
    return true;
  };
  Json json;
  try {
    json = Json::parse(text.data(), text.data() + text.size(), callback,
                       /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::exception& e) {
    return HeaderError(absl::StrCat("invalid JSON: ", e.what()));
  }
  if (!duplicate_error.empty()) return HeaderError(duplicate_error);
  return json;
}

absl::Status ParseMetadata(const Json& value, std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) {
    return HeaderError(absl::StrCat("'", kMetadataKey, "' must be an object of string values, got ",
                                    Describe(value)));
  }
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return HeaderError(absl::StrCat("'", kMetadataKey, "' value of key ", Quote(key),
                                      " must be a string, got ", Describe(item)));
    }
    metadata->emplace(key, item.get<std::string>());
  }
  return absl::OkStatus();
}

// A tensor entry before its bytes are located.
struct ParsedEntry {
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

absl::StatusOr<ParsedEntry> ParseEntry(const std::string& name, const Json& value,
                                       uint64_t data_size) {
  if (!value.is_object()) {
    return TensorError(name, absl::StrCat("expected an object with dtype, shape and data_offsets, "
                                          "got ",
                                          Describe(value)));
  }
  for (const auto& [key, unused] : value.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return TensorError(name, absl::StrCat("unknown field ", Quote(key),
                                            " (expected dtype, shape and data_offsets)"));
    }
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) {
      return TensorError(name, absl::StrCat("missing field '", field, "'"));
    }
  }

  ParsedEntry entry;
  const Json& dtype = value.at("dtype");
  if (!dtype.is_string()) {
    return TensorError(name, absl::StrCat("dtype must be a string, got ", Describe(dtype)));
  }
  absl::StatusOr<DType> parsed_dtype = ParseDType(dtype.get<std::string>());
  if (!parsed_dtype.ok()) return TensorError(name, parsed_dtype.status().message());
  entry.dtype = *parsed_dtype;

  const Json& shape = value.at("shape");
  if (!shape.is_array()) {
    return TensorError(name, absl::StrCat("shape must be an array of non-negative integers, got ",
                                          Describe(shape)));
  }
  entry.shape.reserve(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    const std::optional<uint64_t> dim = AsUnsigned(shape[i]);
    if (!dim.has_value() || *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(name, absl::StrCat("shape[", i,
                                            "] must be a non-negative integer up to INT64_MAX, "
                                            "got ",
                                            Describe(shape[i])));
    }
    entry.shape.push_back(static_cast<int64_t>(*dim));
  }
  const std::optional<int64_t> byte_size = CheckedByteSize(entry.dtype, entry.shape);
  if (!byte_size.has_value()) {
    return TensorError(name, absl::StrCat("byte size of ", TypeString(entry.dtype, entry.shape),
                                          " overflows 64 bits"));
  }

  const Json& offsets = value.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) {
    return TensorError(
        name, absl::StrCat("data_offsets must be an array of two unsigned integers [begin, end], "
                           "got ",
                           offsets.is_array() ? absl::StrCat("an array of ", offsets.size())
                                              : Describe(offsets)));
  }
  uint64_t bounds[2];
  for (size_t i = 0; i < 2; ++i) {
    const std::optional<uint64_t> bound = AsUnsigned(offsets[i]);
    if (!bound.has_value()) {
      return TensorError(name,
                         absl::StrCat("data_offsets[", i, "] must be an unsigned integer, got ",
                                      Describe(offsets[i])));
    }
    bounds[i] = *bound;
  }
  entry.begin = bounds[0];
  entry.end = bounds[1];
  if (entry.begin > entry.end) {
    return TensorError(name, absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                                          "]: begin is after end"));
  }
  if (entry.end > data_size) {
    return TensorError(name,
                       absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                                    "] end beyond the data section of ", data_size, " bytes"));
  }
  if (entry.end - entry.begin != static_cast<uint64_t>(*byte_size)) {
    return TensorError(
        name, absl::StrCat("data_offsets span ", entry.end - entry.begin, " bytes, expected ",
                           *byte_size, " (", TypeString(entry.dtype, entry.shape), ")"));
  }
  return entry;
}

// Tensors must cover the data section exactly: sorted by (begin, end), each begins where the
// previous one ended. Zero-size tensors fit anywhere on that chain.
absl::Status CheckTiling(const std::map<std::string, ParsedEntry>& entries, uint64_t data_size) {
  std::vector<std::tuple<uint64_t, uint64_t, const std::string*>> ranges;
  ranges.reserve(entries.size());
  for (const auto& [name, entry] : entries) ranges.emplace_back(entry.begin, entry.end, &name);
  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a), *std::get<2>(a)) <
           std::tie(std::get<0>(b), std::get<1>(b), *std::get<2>(b));
  });
  uint64_t cursor = 0;
  std::string previous = "the start of the data section";
  for (const auto& [begin, end, name] : ranges) {
    if (begin != cursor) {
      return TensorError(
          *name, absl::StrCat("begins at byte ", begin, " but ", previous, " is at byte ", cursor,
                              begin > cursor ? absl::StrCat(" (a hole of ", begin - cursor,
                                                            " bytes; tensors must be contiguous)")
                                             : " (tensors overlap)"));
    }
    cursor = end;
    previous = absl::StrCat("the end of tensor ", Quote(*name));
  }
  if (cursor != data_size) {
    return HeaderError(absl::StrCat("tensors cover ", cursor, " bytes but the data section has ",
                                    data_size, " bytes (", data_size - cursor,
                                    " trailing bytes belong to no tensor)"));
  }
  return absl::OkStatus();
}

void AppendLe64(uint64_t value, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xFFu));
}

uint64_t LoadLe64(absl::string_view bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(bytes[i]);
  return value;
}

// Closes a file descriptor on every return path.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  ~FdCloser() { close(fd_); }

 private:
  int fd_;
};

}  // namespace

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kU8:
      return "U8";
    case DType::kI8:
      return "I8";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  for (DType dtype : kAllDTypes) {
    if (DTypeName(dtype) == name) return dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", Quote(name),
                                                 " (expected one of U8, I8, I32, I64, F32, BF16, "
                                                 "F16)"));
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kU8:
    case DType::kI8:
      return 1;
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kI32:
    case DType::kF32:
      return 4;
    case DType::kI64:
      return 8;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes) {
  // Everything below is checked against the input's size before any allocation depends on it.
  if (bytes.size() < kLengthPrefixBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: input has ", bytes.size(), " bytes, too short for the 8-byte header length"));
  }
  const uint64_t header_bytes = LoadLe64(bytes);
  if (header_bytes > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors: header length ", header_bytes,
                                                   " exceeds the limit of ", kMaxHeaderBytes,
                                                   " bytes"));
  }
  const uint64_t available = bytes.size() - kLengthPrefixBytes;
  if (header_bytes > available) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors: header length ", header_bytes,
                                                   " exceeds the ", available,
                                                   " bytes after the length prefix"));
  }
  const uint64_t data_size = available - header_bytes;

  SafetensorsFile file;
  file.bytes_ = std::make_shared<const std::string>(std::move(bytes));
  file.header_bytes_ = header_bytes;
  const absl::string_view all(*file.bytes_);
  const absl::string_view header = all.substr(kLengthPrefixBytes, header_bytes);
  const absl::string_view data = all.substr(kLengthPrefixBytes + header_bytes);

  absl::StatusOr<Json> json = ParseHeaderJson(header);
  if (!json.ok()) return json.status();
  if (!json->is_object()) {
    return HeaderError(
        absl::StrCat("expected a JSON object at the top level, got ", Describe(*json)));
  }

  std::map<std::string, ParsedEntry> entries;
  for (const auto& [key, value] : json->items()) {
    if (key == kMetadataKey) {
      if (absl::Status status = ParseMetadata(value, &file.metadata_); !status.ok()) return status;
      continue;
    }
    absl::StatusOr<ParsedEntry> entry = ParseEntry(key, value, data_size);
    if (!entry.ok()) return entry.status();
    entries.emplace(key, *std::move(entry));
  }
  if (absl::Status status = CheckTiling(entries, data_size); !status.ok()) return status;

  for (auto& [name, entry] : entries) {
    file.tensors_.emplace(name, TensorView{entry.dtype, std::move(entry.shape),
                                           data.substr(entry.begin, entry.end - entry.begin)});
  }
  return file;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::ReadFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("safetensors: cannot open '", path, "'"));
  }
  FdCloser closer(fd);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("safetensors: cannot stat '", path, "'"));
  }
  if (S_ISDIR(st.st_mode)) {
    return absl::ErrnoToStatus(EISDIR, absl::StrCat("safetensors: cannot read '", path, "'"));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors: '", path, "' is not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  std::string bytes;
  if (size > bytes.max_size()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("safetensors: '", path, "' has ", size, " bytes, too large to load"));
  }
  bytes.resize(static_cast<size_t>(size));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("safetensors: cannot read '", path, "'"));
    }
    if (n == 0) {
      return absl::DataLossError(absl::StrCat(
          "safetensors: '", path, "' shrank while reading: got ", done, " of ", size, " bytes"));
    }
    done += static_cast<size_t>(n);
  }
  absl::StatusOr<SafetensorsFile> file = Parse(std::move(bytes));
  if (!file.ok()) {
    return absl::Status(file.status().code(), absl::StrCat(path, ": ", file.status().message()));
  }
  return file;
}

const TensorView* SafetensorsFile::Find(absl::string_view name) const {
  const auto it = tensors_.find(std::string(name));
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::string_view SafetensorsFile::data_section() const {
  if (bytes_ == nullptr) return {};
  return absl::string_view(*bytes_).substr(kLengthPrefixBytes + header_bytes_);
}

absl::Status SafetensorsWriter::Add(std::string name, DType dtype, std::vector<int64_t> shape,
                                    std::string data) {
  if (name.empty()) return absl::InvalidArgumentError("safetensors writer: empty tensor name");
  if (absl::string_view(name).substr(0, 2) == "__") {
    return absl::InvalidArgumentError(absl::StrCat("safetensors writer: tensor ", Quote(name),
                                                   ": names starting with \"__\" are reserved"));
  }
  try {
    // The header is JSON, so a name that is not valid UTF-8 could not be written faithfully.
    (void)Json(name).dump();
  } catch (const Json::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: tensor ", Quote(name), ": name is not valid UTF-8"));
  }
  if (entries_.count(name) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: tensor ", Quote(name), " is already present"));
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors writer: tensor ", Quote(name),
                                                     ": shape[", i, "] is ", shape[i],
                                                     ", expected a non-negative dimension"));
    }
  }
  const std::optional<int64_t> byte_size = CheckedByteSize(dtype, shape);
  if (!byte_size.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors writer: tensor ", Quote(name),
                                                   ": byte size of ", TypeString(dtype, shape),
                                                   " overflows 64 bits"));
  }
  if (data.size() != static_cast<uint64_t>(*byte_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: tensor ", Quote(name), ": data has ", data.size(),
                     " bytes, expected ", *byte_size, " (", TypeString(dtype, shape), ")"));
  }
  entries_.emplace(std::move(name), Entry{dtype, std::move(shape), std::move(data)});
  return absl::OkStatus();
}

void SafetensorsWriter::SetMetadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

std::vector<std::string> SafetensorsWriter::Order() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  // Names come sorted from the map; a stable sort by decreasing element size keeps that as the
  // tie-break. With no padding, every tensor then starts at a multiple of its element size.
  std::stable_sort(names.begin(), names.end(), [this](const std::string& a, const std::string& b) {
    return DTypeSize(entries_.at(a).dtype) > DTypeSize(entries_.at(b).dtype);
  });
  return names;
}

std::string SafetensorsWriter::DataSection() const {
  size_t total = 0;
  for (const auto& [name, entry] : entries_) total += entry.data.size();
  std::string data;
  data.reserve(total);
  for (const std::string& name : Order()) data += entries_.at(name).data;
  return data;
}

std::string SafetensorsWriter::Serialize() const {
  const std::vector<std::string> order = Order();
  // ordered_json keeps "__metadata__" first and the tensors in layout order, for readability.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata_) metadata[key] = value;
    header[std::string(kMetadataKey)] = std::move(metadata);
  }
  uint64_t offset = 0;
  for (const std::string& name : order) {
    const Entry& entry = entries_.at(name);
    const uint64_t end = offset + entry.data.size();
    header[name] = {{"dtype", std::string(DTypeName(entry.dtype))},
                    {"shape", entry.shape},
                    {"data_offsets", {offset, end}}};
    offset = end;
  }
  // Names were validated as UTF-8 in Add; metadata (SetMetadata cannot fail) that is not valid
  // UTF-8 gets U+FFFD replacements rather than an exception.
  std::string json = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  // Pad so that the data section (after the 8-byte length and the header) starts 8-aligned.
  json.append((8 - json.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(kLengthPrefixBytes + json.size() + offset);
  AppendLe64(json.size(), &out);
  out += json;
  for (const std::string& name : order) out += entries_.at(name).data;
  return out;
}

}  // namespace tscale::checkpoint
