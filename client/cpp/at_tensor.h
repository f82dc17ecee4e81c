// Conversions between the API's tensors (tscale.v1.Tensor) and LibTorch's at::Tensor, for every
// dtype of the API: FP32 <-> Float, BF16 <-> BFloat16, FP16 <-> Half, INT8 <-> Char,
// UINT8 <-> Byte, INT32 <-> Int, INT64 <-> Long.
#ifndef TSCALE_CLIENT_CPP_AT_TENSOR_H_
#define TSCALE_CLIENT_CPP_AT_TENSOR_H_

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tscale/v1/trainer.pb.h"

namespace tscale::client {

namespace v1 = ::tscale::v1;

// The scalar type of a dtype; InvalidArgument for DATA_TYPE_UNSPECIFIED or an unknown value.
absl::StatusOr<c10::ScalarType> ToScalarType(v1::DataType dtype);
// The dtype of a scalar type; InvalidArgument for one the API has no dtype for (e.g. Double, Bool).
absl::StatusOr<v1::DataType> ToDataType(c10::ScalarType type);

// The tensor's elements in row-major order; a non-contiguous tensor, or one on another device,
// is first made contiguous on the CPU. InvalidArgument for an undefined tensor or a scalar type
// the API has no dtype for.
absl::StatusOr<v1::Tensor> ToProtoTensor(const at::Tensor& tensor);

// A contiguous CPU tensor owning a copy of the data. InvalidArgument, naming `field` and what
// was wrong, for a malformed tensor (see ValidateTensor in tensor.h).
absl::StatusOr<at::Tensor> FromProtoTensor(const v1::Tensor& tensor,
                                           absl::string_view field = "tensor");

}  // namespace tscale::client

#endif  // TSCALE_CLIENT_CPP_AT_TENSOR_H_
