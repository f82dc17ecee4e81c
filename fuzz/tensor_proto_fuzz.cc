// Fuzzes the decoding of the API's tensors (server/service/convert.cc: v1::Tensor -> at::Tensor),
// the first thing Forward, Backward and TrainStep do with a request.
//
// The first byte picks the form of the rest:
//   even: a serialized TrainStepRequest (protobuf wire format), whose input (FP32) and target
//         (any dtype, then FP32, then INT64) are decoded as the service decodes them;
//   odd:  a structured tensor, so that shapes and byte counts that nearly agree are reached:
//         dtype (1 byte, shifted so that negative and unknown values occur), rank (1 byte, up to
//         10, beyond the limit of 8), one byte per dimension (small sizes, or one of the edge
//         values of kEdgeDims), then the data.
// Invariants: a refused tensor gives InvalidArgument with a message that starts with the field's
// name; an accepted one is a CPU tensor of the dtype and shape of the message holding exactly its
// bytes, and TensorToProto gives the message back.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "fuzz/check.h"
#include "google/protobuf/stubs/logging.h"
#include "server/service/convert.h"
#include "tscale/v1/trainer.pb.h"

namespace tscale::fuzz {
namespace {

constexpr int64_t kEdgeDims[] = {
    -1,
    std::numeric_limits<int64_t>::min(),
    std::numeric_limits<int64_t>::max(),
    int64_t{1} << 31,
    int64_t{1} << 32,
    (int64_t{1} << 62) + 1,
    std::numeric_limits<int64_t>::max() / 8,
    std::numeric_limits<int64_t>::max() / 8 + 1,
    int64_t{1} << 20,
    3037000500,  // about sqrt(2^63): two of them overflow int64
    0,
    1,
    -(int64_t{1} << 40),
    255,
    65536,
    7,
};

void CheckDecoded(const v1::Tensor& message, const std::string& field,
                  const absl::StatusOr<at::Tensor>& decoded) {
  if (!decoded.ok()) {
    FUZZ_CHECK_REFUSED(decoded.status(), absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(absl::StartsWith(decoded.status().message(), field),
               absl::StrCat("message does not name '", field, "': ", decoded.status().message()));
    return;
  }
  const at::Tensor& t = *decoded;
  FUZZ_CHECK(t.device().is_cpu(), "decoded tensor not on the CPU");
  FUZZ_CHECK(t.is_contiguous(), "decoded tensor not contiguous");
  FUZZ_CHECK(t.dim() == message.shape_size(),
             absl::StrCat("rank ", t.dim(), " vs ", message.shape_size()));
  for (int i = 0; i < message.shape_size(); ++i) {
    FUZZ_CHECK(t.size(i) == message.shape(i), absl::StrCat("shape[", i, "]"));
  }
  FUZZ_CHECK(t.nbytes() == message.data().size(),
             absl::StrCat(t.nbytes(), " bytes decoded from ", message.data().size()));
  FUZZ_CHECK(message.data().empty() ||
                 std::memcmp(t.data_ptr(), message.data().data(), message.data().size()) == 0,
             "decoded bytes differ");
  FUZZ_CHECK(service::DataTypeSize(message.dtype()) == static_cast<int64_t>(t.element_size()),
             "element size");

  v1::Tensor back;
  service::TensorToProto(t, &back);
  FUZZ_CHECK(back.dtype() == message.dtype(),
             absl::StrCat("dtype ", back.dtype(), " vs ", message.dtype()));
  FUZZ_CHECK(back.shape_size() == message.shape_size(), "shape size after TensorToProto");
  for (int i = 0; i < back.shape_size(); ++i) {
    FUZZ_CHECK(back.shape(i) == message.shape(i), "shape after TensorToProto");
  }
  FUZZ_CHECK(back.data() == message.data(), "data after TensorToProto");
}

void Decode(const v1::Tensor& message, const std::string& field) {
  CheckDecoded(message, field, service::TensorFromProto(message, field));
}

void DecodeAs(const v1::Tensor& message, const std::string& field, v1::DataType dtype) {
  auto decoded = service::TensorFromProto(message, field, dtype);
  if (decoded.ok()) {
    FUZZ_CHECK(message.dtype() == dtype, "accepted a tensor of another dtype");
  }
  CheckDecoded(message, field, decoded);
}

void FromWire(const uint8_t* data, size_t size) {
  v1::TrainStepRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return;
  Decode(request.input(), "input");
  DecodeAs(request.input(), "input", v1::FP32);
  Decode(request.target(), "target");
  DecodeAs(request.target(), "target", v1::FP32);
  DecodeAs(request.target(), "target", v1::INT64);
}

void FromStructure(const uint8_t* data, size_t size) {
  size_t at = 0;
  auto next = [&]() -> uint8_t { return at < size ? data[at++] : 0; };
  v1::Tensor message;
  message.set_dtype(static_cast<v1::DataType>(static_cast<int>(next()) - 2));
  const int rank = next() % 11;
  for (int i = 0; i < rank; ++i) {
    const uint8_t b = next();
    constexpr int kEdges = sizeof(kEdgeDims) / sizeof(kEdgeDims[0]);
    message.add_shape(b >= 256 - kEdges ? kEdgeDims[b - (256 - kEdges)] : b % 8);
  }
  message.set_data(reinterpret_cast<const char*>(data) + at, size - at);
  Decode(message, "input");
  DecodeAs(message, "grad_output", v1::FP32);
}

}  // namespace
}  // namespace tscale::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  at::set_num_threads(1);
  // Parsing logs every string field that is not UTF-8; the refusal is what is checked.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] % 2 == 0) {
    tscale::fuzz::FromWire(data + 1, size - 1);
  } else {
    tscale::fuzz::FromStructure(data + 1, size - 1);
  }
  return 0;
}
