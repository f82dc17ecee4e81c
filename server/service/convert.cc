#include "server/service/convert.h"

#include <cstring>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/device.h"
#include "server/core/scale_stats.h"

namespace tscale::service {
namespace {

constexpr int kMaxDims = 8;

struct DTypeInfo {
  v1::DataType proto;
  at::ScalarType torch;
  int64_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {v1::FP32, at::kFloat, 4}, {v1::BF16, at::kBFloat16, 2}, {v1::FP16, at::kHalf, 2},
    {v1::INT8, at::kChar, 1},  {v1::UINT8, at::kByte, 1},    {v1::INT32, at::kInt, 4},
    {v1::INT64, at::kLong, 8},
};

const DTypeInfo* FindProto(int dtype) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.proto == dtype) return &d;
  }
  return nullptr;
}

const DTypeInfo* FindTorch(at::ScalarType type) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.torch == type) return &d;
  }
  return nullptr;
}

std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status LayersFromProto(const google::protobuf::RepeatedPtrField<v1::Layer>& in,
                             const std::string& path, std::vector<core::LayerSpec>* out) {
  for (int i = 0; i < in.size(); ++i) {
    const v1::Layer& l = in[i];
    core::LayerSpec layer;
    layer.name = l.name();
    switch (l.kind_case()) {
      case v1::Layer::kTernaryLinear: {
        const v1::TernaryLinear& p = l.ternary_linear();
        layer.kind = core::TernaryLinearSpec{p.in_features(), p.out_features(), p.group_size(),
                                             p.threshold(), p.bias()};
        break;
      }
      case v1::Layer::kTernaryRmsNorm:
        layer.kind = core::TernaryRMSNormSpec{l.ternary_rms_norm().dim(),
                                              l.ternary_rms_norm().group_size()};
        break;
      case v1::Layer::kActivation: {
        const int kind = l.activation().kind();
        if (kind < 0 || kind > static_cast<int>(core::ActivationKind::kSilu)) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, "[", i, "] (", l.name(),
                           ").activation.kind: expected RELU, GELU or SILU, got ", kind));
        }
        layer.kind = core::ActivationSpec{static_cast<core::ActivationKind>(kind)};
        break;
      }
      case v1::Layer::kResidual: {
        core::ResidualSpec r;
        absl::Status s = LayersFromProto(l.residual().layers(),
                                         absl::StrCat(path, "[", i, "].residual.layers"), &r.layers);
        if (!s.ok()) return s;
        layer.kind = std::move(r);
        break;
      }
      case v1::Layer::KIND_NOT_SET:
        break;  // ValidateSpec names the layer whose kind is missing
    }
    out->push_back(std::move(layer));
  }
  return absl::OkStatus();
}

void LayersToProto(const std::vector<core::LayerSpec>& in,
                   google::protobuf::RepeatedPtrField<v1::Layer>* out) {
  for (const core::LayerSpec& layer : in) {
    v1::Layer* l = out->Add();
    l->set_name(layer.name);
    if (const auto* p = std::get_if<core::TernaryLinearSpec>(&layer.kind)) {
      v1::TernaryLinear* t = l->mutable_ternary_linear();
      t->set_in_features(p->in_features);
      t->set_out_features(p->out_features);
      t->set_group_size(p->group_size);
      t->set_threshold(p->threshold);
      t->set_bias(p->bias);
    } else if (const auto* n = std::get_if<core::TernaryRMSNormSpec>(&layer.kind)) {
      l->mutable_ternary_rms_norm()->set_dim(n->dim);
      l->mutable_ternary_rms_norm()->set_group_size(n->group_size);
    } else if (const auto* a = std::get_if<core::ActivationSpec>(&layer.kind)) {
      l->mutable_activation()->set_kind(static_cast<v1::Activation::Kind>(a->kind));
    } else if (const auto* r = std::get_if<core::ResidualSpec>(&layer.kind)) {
      LayersToProto(r->layers, l->mutable_residual()->mutable_layers());
    }
  }
}

}  // namespace

int64_t DataTypeSize(v1::DataType dtype) {
  const DTypeInfo* d = FindProto(dtype);
  return d ? d->size : 0;
}

std::string DataTypeName(int dtype) {
  if (v1::DataType_IsValid(dtype)) return v1::DataType_Name(static_cast<v1::DataType>(dtype));
  return absl::StrCat(dtype);
}

absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& t, absl::string_view field,
                                           Hold hold) {
  const DTypeInfo* d = FindProto(t.dtype());
  if (d == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".dtype: expected one of FP32, BF16, FP16, INT8, UINT8, INT32, INT64, ",
                     "got ", DataTypeName(t.dtype())));
  }
  if (t.shape_size() > kMaxDims) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: expected at most ", kMaxDims,
                                                   " dimensions, got ", t.shape_size()));
  }
  int64_t elements = 1;
  for (int i = 0; i < t.shape_size(); ++i) {
    const int64_t n = t.shape(i);
    if (n < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape[", i,
                                                     "]: expected a size >= 0, got ", n));
    }
    // Bound the element count so that the byte count below cannot overflow.
    if (n > 0 && elements > std::numeric_limits<int64_t>::max() / 8 / n) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shape: ", ShapeString(t.shape()), " has more elements than any message holds"));
    }
    elements *= n;
  }
  const int64_t bytes = elements * d->size;
  if (static_cast<int64_t>(t.data().size()) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".data: expected ", bytes, " bytes (", DataTypeName(t.dtype()), " ",
        ShapeString(t.shape()), "), got ", t.data().size()));
  }
  std::vector<int64_t> sizes(t.shape().begin(), t.shape().end());
  const char* data = t.data().data();
  if (hold == Hold::kBorrow && bytes > 0 &&
      reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(d->size) == 0) {
    return at::from_blob(const_cast<char*>(data), sizes, at::TensorOptions(d->torch));
  }
  at::Tensor out = at::empty(sizes, at::TensorOptions(d->torch));
  if (bytes > 0) std::memcpy(out.data_ptr(), t.data().data(), bytes);
  return out;
}

absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& t, absl::string_view field,
                                           v1::DataType dtype, Hold hold) {
  if (t.dtype() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: expected ", DataTypeName(dtype),
                                                   ", got ", DataTypeName(t.dtype())));
  }
  return TensorFromProto(t, field, hold);
}

void TensorToProto(const at::Tensor& tensor, v1::Tensor* out) {
  const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  const DTypeInfo* d = FindTorch(t.scalar_type());
  out->set_dtype(d ? d->proto : v1::DATA_TYPE_UNSPECIFIED);
  out->clear_shape();
  for (int64_t n : t.sizes()) out->add_shape(n);
  out->set_data(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
}

absl::StatusOr<at::Tensor> FloatTensorFromProto(const v1::Tensor& t, absl::string_view field,
                                                Hold hold) {
  if (t.dtype() != v1::FP32 && t.dtype() != v1::BF16 && t.dtype() != v1::FP16) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".dtype: expected FP32, BF16 or FP16, got ", DataTypeName(t.dtype())));
  }
  auto tensor = TensorFromProto(t, field, hold);
  if (!tensor.ok() || t.dtype() == v1::FP32) return tensor;
  return tensor->to(at::kFloat);
}

absl::StatusOr<v1::DataType> ResponseFloatType(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DATA_TYPE_UNSPECIFIED:
    case v1::FP32:
      return v1::FP32;
    case v1::BF16:
      return v1::BF16;
    case v1::FP16:
      return v1::FP16;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": expected FP32, BF16 or FP16, got ", DataTypeName(dtype)));
}

void FloatTensorToProto(const at::Tensor& tensor, v1::DataType dtype, v1::Tensor* out) {
  const DTypeInfo* d = FindProto(dtype);
  TensorToProto(d != nullptr ? tensor.detach().to(d->torch) : tensor, out);
}

absl::StatusOr<core::ModelSpec> SpecFromProto(const v1::ModelSpec& spec) {
  core::ModelSpec out;
  absl::Status s = LayersFromProto(spec.layers(), "layers", &out.layers);
  if (!s.ok()) return s;
  return out;
}

void SpecToProto(const core::ModelSpec& spec, v1::ModelSpec* out) {
  out->Clear();
  LayersToProto(spec.layers, out->mutable_layers());
}

absl::StatusOr<core::ComputeType> ComputeFromProto(int compute) {
  switch (compute) {
    case v1::COMPUTE_TYPE_UNSPECIFIED:
    case v1::COMPUTE_FP32:
      return core::ComputeType::kFp32;
    case v1::COMPUTE_TF32:
      return core::ComputeType::kTf32;
    case v1::COMPUTE_BF16:
      return core::ComputeType::kBf16;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "compute: expected COMPUTE_FP32, COMPUTE_TF32 or COMPUTE_BF16, got ", compute));
}

v1::ComputeType ComputeToProto(core::ComputeType compute) {
  switch (compute) {
    case core::ComputeType::kFp32:
      return v1::COMPUTE_FP32;
    case core::ComputeType::kTf32:
      return v1::COMPUTE_TF32;
    case core::ComputeType::kBf16:
      return v1::COMPUTE_BF16;
  }
  return v1::COMPUTE_TYPE_UNSPECIFIED;
}

void ModelInfoToProto(absl::string_view model_id, const core::Model& model, v1::ModelInfo* out) {
  out->set_model_id(std::string(model_id));
  SpecToProto(model.spec(), out->mutable_spec());
  out->set_device(core::DeviceName(model.device()));
  out->set_compute(ComputeToProto(model.compute()));
  out->set_step(model.step());
  out->set_ternary_params(model.summary().ternary_params);
  out->set_persistent_bytes(model.persistent_bytes());
  out->set_pending_passes(static_cast<int32_t>(model.pending_passes()));
  out->set_pending_bytes(model.pending_bytes());
  out->set_groups(model.summary().groups);
  out->set_in_features(model.summary().in_features);
  out->set_out_features(model.summary().out_features);
}

void UpdateToProto(const core::LayerUpdate& update, v1::LayerUpdate* out) {
  out->set_layer(update.layer);
  out->set_score_sum(update.score_sum);
  out->set_mean_abs_drift(update.mean_abs_drift);
}

void ScaleStatsToProto(const core::LayerScaleStats& stats, v1::LayerScaleStats* out) {
  out->set_layer(stats.layer);
  out->set_groups(stats.groups);
  out->set_drift_mean(stats.drift_mean);
  out->set_drift_min(stats.drift_min);
  out->set_drift_max(stats.drift_max);
  out->set_drift_abs_mean(stats.drift_abs_mean);
  out->set_saturated_fraction(stats.saturated_fraction);
  for (double b : core::DriftBucketUpper()) out->add_bucket_upper(b);
  out->add_bucket_upper(std::numeric_limits<double>::infinity());
  for (int64_t c : stats.bucket_count) out->add_bucket_count(c);
  if (stats.log2_scale.defined()) TensorToProto(stats.log2_scale, out->mutable_log2_scale());
}

}  // namespace tscale::service
