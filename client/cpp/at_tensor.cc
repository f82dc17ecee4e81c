#include "client/cpp/at_tensor.h"

#include <cstring>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "client/cpp/tensor.h"

namespace tscale::client {

absl::StatusOr<c10::ScalarType> ToScalarType(v1::DataType dtype) {
  switch (dtype) {
    case v1::FP32:
      return at::kFloat;
    case v1::BF16:
      return at::kBFloat16;
    case v1::FP16:
      return at::kHalf;
    case v1::INT8:
      return at::kChar;
    case v1::UINT8:
      return at::kByte;
    case v1::INT32:
      return at::kInt;
    case v1::INT64:
      return at::kLong;
    default:
      break;
  }
  const std::string& name = v1::DataType_Name(dtype);
  return absl::InvalidArgumentError(
      absl::StrCat("dtype: expected one of FP32, BF16, FP16, INT8, UINT8, INT32, INT64, got ",
                   name.empty() ? absl::StrCat(static_cast<int>(dtype)) : name));
}

absl::StatusOr<v1::DataType> ToDataType(c10::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return v1::FP32;
    case at::kBFloat16:
      return v1::BF16;
    case at::kHalf:
      return v1::FP16;
    case at::kChar:
      return v1::INT8;
    case at::kByte:
      return v1::UINT8;
    case at::kInt:
      return v1::INT32;
    case at::kLong:
      return v1::INT64;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor: expected Float, BFloat16, Half, Char, Byte, Int or Long elements, got ",
          c10::toString(type)));
  }
}

absl::StatusOr<v1::Tensor> ToProtoTensor(const at::Tensor& tensor) {
  if (!tensor.defined()) return absl::InvalidArgumentError("tensor: expected a defined tensor");
  absl::StatusOr<v1::DataType> dtype = ToDataType(tensor.scalar_type());
  if (!dtype.ok()) return dtype.status();
  at::Tensor cpu;
  try {
    cpu = tensor.to(at::kCPU).contiguous();
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tensor: copying to the CPU failed: ", e.what_without_backtrace()));
  }
  v1::Tensor out;
  out.set_dtype(*dtype);
  for (int64_t d : cpu.sizes()) out.add_shape(d);
  const size_t bytes = static_cast<size_t>(cpu.numel()) * cpu.element_size();
  if (bytes > 0) {
    out.mutable_data()->assign(static_cast<const char*>(cpu.data_ptr()), bytes);
  }
  return out;
}

absl::StatusOr<at::Tensor> FromProtoTensor(const v1::Tensor& tensor, absl::string_view field) {
  absl::StatusOr<int64_t> n = ValidateTensor(tensor, field);
  if (!n.ok()) return n.status();
  absl::StatusOr<c10::ScalarType> type = ToScalarType(tensor.dtype());
  if (!type.ok()) return type.status();
  const std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  at::Tensor out;
  try {
    out = at::empty(shape, at::TensorOptions().dtype(*type).device(at::kCPU));
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat(field, ": cannot allocate ",
                                                     DescribeTensor(tensor), ": ",
                                                     e.what_without_backtrace()));
  }
  if (!tensor.data().empty()) {
    std::memcpy(out.data_ptr(), tensor.data().data(), tensor.data().size());
  }
  return out;
}

}  // namespace tscale::client
