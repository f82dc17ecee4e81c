// The model specification: the API's ModelSpec as plain C++ structs, its validation and its JSON
// form (field names as in the API's proto, e.g. {"layers": [{"name": "fc", "ternary_linear":
// {"in_features": 64, ...}}]}).
#ifndef TSCALE_SERVER_CORE_SPEC_H_
#define TSCALE_SERVER_CORE_SPEC_H_

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tscale::core {

inline constexpr int32_t kDefaultGroupSize = 32;
// Scores are summed per group in int16 by the reference; larger groups would overflow there.
inline constexpr int32_t kMaxGroupSize = 32767;
inline constexpr double kDefaultLinearThreshold = 0.05;
// Features of one layer: 2^31 - 1, the largest size every kernel indexes safely.
inline constexpr int64_t kMaxFeatures = (int64_t{1} << 31) - 1;
// Weights of one model: 2^40 (a trillion), far beyond any device, small enough that every
// derived byte count fits in int64.
inline constexpr int64_t kMaxModelWeights = int64_t{1} << 40;
// Nesting of residual blocks.
inline constexpr int kMaxResidualDepth = 32;

struct TernaryLinearSpec {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int32_t group_size = 0;  // 0 means kDefaultGroupSize
  float threshold = 0;     // ternarization threshold at initialisation; 0 means 0.05
  bool bias = false;       // an int32 bias buffer, as in the reference
};

struct TernaryRMSNormSpec {
  int64_t dim = 0;
  int32_t group_size = 0;  // 0 means kDefaultGroupSize
};

enum class ActivationKind { kUnspecified = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

struct ActivationSpec {
  ActivationKind kind = ActivationKind::kUnspecified;
};

struct LayerSpec;

// y = x + f(x), f applying the inner layers in order.
struct ResidualSpec {
  std::vector<LayerSpec> layers;
};

struct LayerSpec {
  std::string name;  // unique among siblings; [A-Za-z0-9_-], 1-64 characters
  std::variant<std::monostate, TernaryLinearSpec, TernaryRMSNormSpec, ActivationSpec, ResidualSpec>
      kind;
};

struct ModelSpec {
  std::vector<LayerSpec> layers;  // applied in order to a [batch, features] input
};

// What validation learns about a valid spec.
struct SpecSummary {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t ternary_params = 0;  // weights of the ternary linear and RMSNorm layers
  int64_t groups = 0;
  std::vector<std::string> stateful_layers;  // full names, in order
};

// Checks the spec: at least one layer; names valid and unique among siblings; every layer's kind
// set; positive features within kMaxFeatures; group sizes within [1, kMaxGroupSize] (0 meaning
// the default); thresholds finite and non-negative; each layer's input features equal to the
// previous layer's output; residual blocks non-empty and mapping n features to n; totals within
// kMaxModelWeights. Errors are InvalidArgument and name the layer by its path and the field,
// e.g. "layers[1] (fc2).ternary_linear.in_features: expected 96 (the output of fc1), got 64".
absl::StatusOr<SpecSummary> ValidateSpec(const ModelSpec& spec);

// The spec with defaults made explicit (group sizes). Apply to a valid spec.
ModelSpec NormalizeSpec(ModelSpec spec);

absl::string_view ActivationName(ActivationKind kind);  // "RELU", "GELU", "SILU", ...

// JSON with the proto's field names; also accepts the proto JSON mapping's lowerCamelCase names
// and activation kinds as numbers. Unknown fields are an error.
absl::StatusOr<ModelSpec> SpecFromJson(absl::string_view json);
std::string SpecToJson(const ModelSpec& spec);

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_SPEC_H_
