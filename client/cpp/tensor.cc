#include "client/cpp/tensor.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tscale::client {
namespace {

std::string DataTypeLabel(v1::DataType dtype) {
  const std::string& name = v1::DataType_Name(dtype);
  return name.empty() ? absl::StrCat("dtype ", static_cast<int>(dtype)) : name;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

template <typename T>
absl::StatusOr<v1::Tensor> Make(absl::Span<const T> values, absl::Span<const int64_t> shape) {
  bool zero = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape[", i, "]: expected >= 0, got ", shape[i]));
    }
    zero = zero || shape[i] == 0;
  }
  int64_t n = zero ? 0 : 1;
  for (size_t i = 0; i < shape.size() && n > 0; ++i) {
    // Compared before multiplying, so that a huge shape cannot overflow.
    if (n > std::numeric_limits<int64_t>::max() / shape[i]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape: ", ShapeString(shape), " has more elements than an int64 can count"));
    }
    n *= shape[i];
  }
  if (n != static_cast<int64_t>(values.size())) {
    return absl::InvalidArgumentError(absl::StrCat("values: expected ", n, " for shape ",
                                                   ShapeString(shape), ", got ",
                                                   values.size()));
  }
  v1::Tensor t;
  t.set_dtype(DataTypeOf<T>::value);
  for (int64_t d : shape) t.add_shape(d);
  t.mutable_data()->assign(reinterpret_cast<const char*>(values.data()),
                           values.size() * sizeof(T));
  return t;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t bits;
  if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // Inf or NaN
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float BFloat16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

size_t DataTypeSize(v1::DataType dtype) {
  switch (dtype) {
    case v1::FP32:
    case v1::INT32:
      return 4;
    case v1::BF16:
    case v1::FP16:
      return 2;
    case v1::INT8:
    case v1::UINT8:
      return 1;
    case v1::INT64:
      return 8;
    default:
      return 0;
  }
}

std::string DescribeTensor(const v1::Tensor& tensor) {
  return absl::StrCat(DataTypeLabel(tensor.dtype()), " ", ShapeString(tensor.shape()));
}

absl::StatusOr<int64_t> ValidateTensor(const v1::Tensor& tensor, absl::string_view field) {
  const size_t size = DataTypeSize(tensor.dtype());
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".dtype: expected one of FP32, BF16, FP16, INT8, UINT8, INT32, INT64, got ",
                     DataTypeLabel(tensor.dtype())));
  }
  const int64_t max_elements = std::numeric_limits<int64_t>::max() / static_cast<int64_t>(size);
  int64_t n = 1;
  bool overflow = false;
  for (int i = 0; i < tensor.shape_size(); ++i) {
    const int64_t d = tensor.shape(i);
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shape[", i, "]: expected >= 0, got ", d));
    }
    if (d == 0) {
      n = 0;
    } else if (!overflow && n != 0) {
      if (n > max_elements / d) {
        overflow = true;
      } else {
        n *= d;
      }
    }
  }
  // A zero dimension makes any size valid; without one, an overflowing size is never valid.
  if (overflow && n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: ", DescribeTensor(tensor),
                                                   " has more bytes than an int64 can count"));
  }
  const int64_t bytes = n * static_cast<int64_t>(size);
  if (static_cast<int64_t>(tensor.data().size()) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".data: expected ", bytes, " bytes (",
                                                   DescribeTensor(tensor), "), got ",
                                                   tensor.data().size()));
  }
  return n;
}

absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const float> values,
                                      absl::Span<const int64_t> shape) {
  return Make(values, shape);
}
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int8_t> values,
                                      absl::Span<const int64_t> shape) {
  return Make(values, shape);
}
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const uint8_t> values,
                                      absl::Span<const int64_t> shape) {
  return Make(values, shape);
}
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int32_t> values,
                                      absl::Span<const int64_t> shape) {
  return Make(values, shape);
}
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int64_t> values,
                                      absl::Span<const int64_t> shape) {
  return Make(values, shape);
}

namespace internal {

absl::StatusOr<int64_t> CheckTensorOf(const v1::Tensor& tensor, v1::DataType expected,
                                      absl::string_view field) {
  if (tensor.dtype() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: expected ",
                                                   DataTypeLabel(expected), ", got ",
                                                   DataTypeLabel(tensor.dtype())));
  }
  return ValidateTensor(tensor, field);
}

}  // namespace internal

absl::StatusOr<std::vector<float>> TensorFloats(const v1::Tensor& tensor,
                                                absl::string_view field) {
  const v1::DataType dtype = tensor.dtype();
  if (dtype != v1::FP32 && dtype != v1::BF16 && dtype != v1::FP16) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".dtype: expected FP32, BF16 or FP16, got ", DataTypeLabel(dtype)));
  }
  if (dtype == v1::FP32) return TensorValues<float>(tensor, field);
  absl::StatusOr<int64_t> n = ValidateTensor(tensor, field);
  if (!n.ok()) return n.status();
  std::vector<float> out(static_cast<size_t>(*n));
  const char* data = tensor.data().data();
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, data + 2 * i, 2);
    out[i] = dtype == v1::BF16 ? BFloat16ToFloat(h) : HalfToFloat(h);
  }
  return out;
}

}  // namespace tscale::client
