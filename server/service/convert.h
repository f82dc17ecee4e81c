// Conversions between the API's messages and the core's types. Every error is InvalidArgument and
// names the request field, what was expected and what came.
#ifndef TSCALE_SERVER_SERVICE_CONVERT_H_
#define TSCALE_SERVER_SERVICE_CONVERT_H_

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/model.h"
#include "server/core/spec.h"
#include "tscale/v1/trainer.pb.h"

namespace tscale::service {

// Bytes of one element of `dtype`; 0 for DATA_TYPE_UNSPECIFIED and unknown values.
int64_t DataTypeSize(v1::DataType dtype);
std::string DataTypeName(int dtype);  // "FP32", ..., or the number of an unknown value

// How a tensor made from a message holds its data: a copy of its own, or a view of the message's
// bytes (no copy; valid only while the message lives unchanged, and only where the bytes are
// aligned for the dtype: otherwise a copy all the same).
enum class Hold { kCopy, kBorrow };

// A CPU tensor holding the message's data (a copy, or with Hold::kBorrow a view). Checks the
// dtype, the shape (dimensions >= 0, at most 8 of them, no overflow) and that data holds exactly
// prod(shape) * size(dtype) bytes. `field` names the tensor in errors, e.g. "input".
absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& t, absl::string_view field,
                                           Hold hold = Hold::kCopy);
// As above, and requires `dtype`.
absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& t, absl::string_view field,
                                           v1::DataType dtype, Hold hold = Hold::kCopy);
// Writes a tensor of a dtype the API has (any device, any layout) as a dense message.
void TensorToProto(const at::Tensor& tensor, v1::Tensor* out);
// A float tensor that may come as FP32, BF16 or FP16, as float32 (FP32 as sent; BF16 and FP16
// converted, exactly: every value of theirs is a float32).
absl::StatusOr<at::Tensor> FloatTensorFromProto(const v1::Tensor& t, absl::string_view field,
                                                Hold hold = Hold::kCopy);
// The dtype a response's float tensor is asked for in (`field`): FP32 for DATA_TYPE_UNSPECIFIED;
// FP32, BF16 or FP16; else InvalidArgument naming the field.
absl::StatusOr<v1::DataType> ResponseFloatType(int dtype, absl::string_view field);
// A float tensor as a message of `dtype` (FP32, BF16 or FP16), converted where it lies (on the
// GPU, before the copy to the host) with round-to-nearest-even.
void FloatTensorToProto(const at::Tensor& tensor, v1::DataType dtype, v1::Tensor* out);

absl::StatusOr<core::ModelSpec> SpecFromProto(const v1::ModelSpec& spec);
void SpecToProto(const core::ModelSpec& spec, v1::ModelSpec* out);

// UNSPECIFIED means FP32.
absl::StatusOr<core::ComputeType> ComputeFromProto(int compute);
v1::ComputeType ComputeToProto(core::ComputeType compute);

void ModelInfoToProto(absl::string_view model_id, const core::Model& model, v1::ModelInfo* out);
void UpdateToProto(const core::LayerUpdate& update, v1::LayerUpdate* out);
void ScaleStatsToProto(const core::LayerScaleStats& stats, v1::LayerScaleStats* out);

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_CONVERT_H_
