// The API's tensors (tscale.v1.Tensor) from and to plain buffers, without LibTorch; at_tensor.h
// converts them to and from at::Tensor.
//
// A v1::Tensor is dense, row-major and little-endian: its data holds exactly
// prod(shape) * size(dtype) bytes (an empty shape is a scalar of one element).
#ifndef TSCALE_CLIENT_CPP_TENSOR_H_
#define TSCALE_CLIENT_CPP_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/base/config.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tscale/v1/trainer.pb.h"

// The data is copied as the host's bytes; the API's are little-endian.
#ifndef ABSL_IS_LITTLE_ENDIAN
#error "tscale's client assumes a little-endian host"
#endif

namespace tscale::client {

namespace v1 = ::tscale::v1;

// Bytes per element; 0 for DATA_TYPE_UNSPECIFIED and values the API does not define.
size_t DataTypeSize(v1::DataType dtype);

// "FP32 [2, 64]": a tensor's dtype and shape, as error messages give them.
std::string DescribeTensor(const v1::Tensor& tensor);

// Checks that `tensor` is well formed: a defined dtype, no negative dimension, an element count
// whose byte size fits in int64, and exactly that many bytes of data. Returns the element count.
// InvalidArgument messages start with `field` (e.g. "input.shape[1]: expected >= 0, got -3").
absl::StatusOr<int64_t> ValidateTensor(const v1::Tensor& tensor, absl::string_view field = "tensor");

// The dtype that holds C++ type T: float (FP32), int8_t, uint8_t, int32_t, int64_t.
template <typename T>
struct DataTypeOf;
template <>
struct DataTypeOf<float> {
  static constexpr v1::DataType value = v1::FP32;
};
template <>
struct DataTypeOf<int8_t> {
  static constexpr v1::DataType value = v1::INT8;
};
template <>
struct DataTypeOf<uint8_t> {
  static constexpr v1::DataType value = v1::UINT8;
};
template <>
struct DataTypeOf<int32_t> {
  static constexpr v1::DataType value = v1::INT32;
};
template <>
struct DataTypeOf<int64_t> {
  static constexpr v1::DataType value = v1::INT64;
};

// A tensor of `shape` holding `values` in row-major order. InvalidArgument when a dimension is
// negative or prod(shape) != values.size().
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const float> values,
                                      absl::Span<const int64_t> shape);
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int8_t> values,
                                      absl::Span<const int64_t> shape);
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const uint8_t> values,
                                      absl::Span<const int64_t> shape);
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int32_t> values,
                                      absl::Span<const int64_t> shape);
absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const int64_t> values,
                                      absl::Span<const int64_t> shape);

namespace internal {
// ValidateTensor, and InvalidArgument unless the dtype is `expected`. Returns the element count.
absl::StatusOr<int64_t> CheckTensorOf(const v1::Tensor& tensor, v1::DataType expected,
                                      absl::string_view field);
}  // namespace internal

// The elements of a valid tensor of T's dtype, in row-major order (the shape is the caller's to
// read). InvalidArgument for another dtype or a malformed tensor.
template <typename T>
absl::StatusOr<std::vector<T>> TensorValues(const v1::Tensor& tensor,
                                            absl::string_view field = "tensor") {
  absl::StatusOr<int64_t> n = internal::CheckTensorOf(tensor, DataTypeOf<T>::value, field);
  if (!n.ok()) return n.status();
  std::vector<T> out(static_cast<size_t>(*n));
  if (!out.empty()) std::memcpy(out.data(), tensor.data().data(), out.size() * sizeof(T));
  return out;
}

// The elements of a floating-point tensor (FP32, BF16 or FP16) widened to float.
// InvalidArgument for an integer dtype or a malformed tensor.
absl::StatusOr<std::vector<float>> TensorFloats(const v1::Tensor& tensor,
                                                absl::string_view field = "tensor");

}  // namespace tscale::client

#endif  // TSCALE_CLIENT_CPP_TENSOR_H_
