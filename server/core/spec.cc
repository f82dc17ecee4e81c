#include "server/core/spec.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/core/json_depth.h"
#include "server/core/json_keys.h"

namespace tscale::core {
namespace {

using nlohmann::json;

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class Validator {
 public:
  absl::Status Layers(const std::vector<LayerSpec>& layers, const std::string& path,
                      const std::string& prefix, int depth, int64_t* features,
                      std::string* producer) {
    if (layers.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, "layers: expected at least one layer, got none"));
    }
    std::set<std::string> names;
    for (size_t i = 0; i < layers.size(); ++i) {
      const LayerSpec& layer = layers[i];
      const std::string where = absl::StrCat(path, "layers[", i, "]");
      if (!ValidName(layer.name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ".name: expected 1-64 characters of [A-Za-z0-9_-], got '", layer.name, "'"));
      }
      if (!names.insert(layer.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ".name: expected a name unique among its siblings, got '",
                         layer.name, "' again"));
      }
      const std::string at = absl::StrCat(where, " (", layer.name, ")");
      const std::string full = prefix.empty() ? layer.name : absl::StrCat(prefix, ".", layer.name);
      absl::Status s = Layer(layer, at, full, depth, features, producer);
      if (!s.ok()) return s;
      *producer = absl::StrCat("the output of ", full);
    }
    return absl::OkStatus();
  }

  SpecSummary summary;

 private:
  absl::Status Dim(int64_t value, const std::string& field) {
    if (value < 1 || value > kMaxFeatures) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected 1 to ", kMaxFeatures, ", got ", value));
    }
    return absl::OkStatus();
  }

  absl::Status GroupSize(int32_t gs, const std::string& field) {
    if (gs < 0 || gs > kMaxGroupSize) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": expected 1 to ", kMaxGroupSize,
                                                     " (0 for the default ", kDefaultGroupSize,
                                                     "), got ", gs));
    }
    return absl::OkStatus();
  }

  absl::Status Chain(int64_t in, const std::string& field, int64_t* features,
                     const std::string& producer) {
    if (*features == 0) {  // the model's first layer defines its input
      *features = in;
      return absl::OkStatus();
    }
    if (in != *features) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected ", *features, " (", producer, "), got ", in));
    }
    return absl::OkStatus();
  }

  absl::Status AddWeights(int64_t weights, int64_t groups, const std::string& at) {
    if (weights > kMaxModelWeights - summary.ternary_params) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, ": the model would hold more than ", kMaxModelWeights, " weights"));
    }
    summary.ternary_params += weights;
    summary.groups += groups;
    return absl::OkStatus();
  }

  absl::Status Layer(const LayerSpec& layer, const std::string& at, const std::string& full,
                     int depth, int64_t* features, std::string* producer) {
    const std::string& what = *producer;
    if (const auto* l = std::get_if<TernaryLinearSpec>(&layer.kind)) {
      const std::string f = at + ".ternary_linear";
      absl::Status s = Dim(l->in_features, f + ".in_features");
      if (s.ok()) s = Dim(l->out_features, f + ".out_features");
      if (s.ok()) s = GroupSize(l->group_size, f + ".group_size");
      if (s.ok() && !(std::isfinite(l->threshold) && l->threshold >= 0)) {
        s = absl::InvalidArgumentError(absl::StrCat(
            f, ".threshold: expected a finite value >= 0 (0 for the default 0.05), got ",
            l->threshold));
      }
      if (s.ok()) s = Chain(l->in_features, f + ".in_features", features, what);
      if (!s.ok()) return s;
      // Both factors are below 2^31, so the product cannot overflow int64.
      const int64_t gs = l->group_size == 0 ? kDefaultGroupSize : l->group_size;
      s = AddWeights(l->in_features * l->out_features,
                     l->out_features * CeilDiv(l->in_features, gs), at);
      if (!s.ok()) return s;
      *features = l->out_features;
      summary.stateful_layers.push_back(full);
      return absl::OkStatus();
    }
    if (const auto* n = std::get_if<TernaryRMSNormSpec>(&layer.kind)) {
      const std::string f = at + ".ternary_rms_norm";
      absl::Status s = Dim(n->dim, f + ".dim");
      if (s.ok()) s = GroupSize(n->group_size, f + ".group_size");
      if (s.ok()) s = Chain(n->dim, f + ".dim", features, what);
      if (!s.ok()) return s;
      *features = n->dim;
      const int64_t gs = n->group_size == 0 ? kDefaultGroupSize : n->group_size;
      s = AddWeights(n->dim, CeilDiv(n->dim, gs), at);
      if (!s.ok()) return s;
      summary.stateful_layers.push_back(full);
      return absl::OkStatus();
    }
    if (const auto* a = std::get_if<ActivationSpec>(&layer.kind)) {
      if (a->kind != ActivationKind::kRelu && a->kind != ActivationKind::kGelu &&
          a->kind != ActivationKind::kSilu) {
        return absl::InvalidArgumentError(absl::StrCat(
            at, ".activation.kind: expected RELU, GELU or SILU, got ", ActivationName(a->kind)));
      }
      if (*features == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(at,
                         ": an activation cannot come first; the first layer must define the input "
                         "features (ternary_linear or ternary_rms_norm)"));
      }
      return absl::OkStatus();
    }
    if (const auto* r = std::get_if<ResidualSpec>(&layer.kind)) {
      if (depth >= kMaxResidualDepth) {
        return absl::InvalidArgumentError(absl::StrCat(
            at, ".residual: expected at most ", kMaxResidualDepth, " nested residual blocks"));
      }
      if (*features == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            at,
            ": a residual block cannot come first; the first layer must define the input "
            "features (ternary_linear or ternary_rms_norm)"));
      }
      const int64_t in = *features;
      std::string inner_producer = "the block's input";
      absl::Status s =
          Layers(r->layers, at + ".residual.", full, depth + 1, features, &inner_producer);
      if (!s.ok()) return s;
      if (*features != in) {
        return absl::InvalidArgumentError(absl::StrCat(at, ".residual: expected its layers to map ",
                                                       in, " features to ", in, ", got ", *features,
                                                       " at the end (", inner_producer, ")"));
      }
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(
        at, ": expected one of ternary_linear, ternary_rms_norm, activation, residual; got none"));
  }
};

void NormalizeLayers(std::vector<LayerSpec>* layers) {
  for (LayerSpec& layer : *layers) {
    if (auto* l = std::get_if<TernaryLinearSpec>(&layer.kind)) {
      if (l->group_size == 0) l->group_size = kDefaultGroupSize;
    } else if (auto* n = std::get_if<TernaryRMSNormSpec>(&layer.kind)) {
      if (n->group_size == 0) n->group_size = kDefaultGroupSize;
    } else if (auto* r = std::get_if<ResidualSpec>(&layer.kind)) {
      NormalizeLayers(&r->layers);
    }
  }
}

// ---------------------------------------------------------------- JSON

// A valid spec nests 4 levels ({"layers": [{"ternary_linear": {...}}]}) plus 3 per residual block
// (the block's object, its "layers" array, the inner layer). Deeper JSON is refused before it is
// parsed: nlohmann's dump() recurses once per level, and error messages dump offending values, so
// a deep enough value would overflow the stack.
constexpr int kMaxJsonDepth = 4 + 3 * kMaxResidualDepth;

// Looks a field up by its proto name or its lowerCamelCase JSON name.
const json* Field(const json& obj, const char* proto_name, const char* camel_name) {
  auto it = obj.find(proto_name);
  if (it != obj.end()) return &*it;
  it = obj.find(camel_name);
  if (it != obj.end()) return &*it;
  return nullptr;
}

absl::Status CheckFields(const json& obj, const std::string& at,
                         std::initializer_list<std::pair<const char*, const char*>> known) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(at, ": expected a JSON object, got ", obj.type_name()));
  }
  for (const auto& [key, value] : obj.items()) {
    bool ok = false;
    for (const auto& [a, b] : known) ok = ok || key == a || key == b;
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(at, ": unknown field '", key, "'"));
    }
  }
  return absl::OkStatus();
}

// proto3 JSON writes 64-bit integers as strings; accept both forms.
absl::Status GetInt(const json* v, const std::string& field, int64_t lo, int64_t hi, int64_t* out) {
  if (v == nullptr) return absl::OkStatus();
  int64_t value = 0;
  if (v->is_number_integer()) {
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected an integer from ", lo, " to ", hi, ", got ", v->dump()));
    }
    value = v->get<int64_t>();
  } else if (v->is_string()) {
    const std::string& s = v->get_ref<const std::string&>();
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
    if (ec != std::errc() || end != s.data() + s.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected an integer, got \"", s, "\""));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": expected an integer, got ", v->dump()));
  }
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": expected an integer from ", lo, " to ", hi, ", got ", value));
  }
  *out = value;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerSpec>> LayersFromJson(const json& layers, const std::string& at,
                                                      int depth);

absl::StatusOr<LayerSpec> LayerFromJson(const json& j, const std::string& at, int depth) {
  absl::Status s = CheckFields(j, at,
                               {{"name", "name"},
                                {"ternary_linear", "ternaryLinear"},
                                {"ternary_rms_norm", "ternaryRmsNorm"},
                                {"activation", "activation"},
                                {"residual", "residual"}});
  if (!s.ok()) return s;
  LayerSpec layer;
  if (const json* name = Field(j, "name", "name")) {
    if (!name->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, ".name: expected a string, got ", name->dump()));
    }
    layer.name = name->get<std::string>();
  }
  int kinds = 0;
  if (const json* v = Field(j, "ternary_linear", "ternaryLinear")) {
    ++kinds;
    const std::string f = at + ".ternary_linear";
    s = CheckFields(*v, f,
                    {{"in_features", "inFeatures"},
                     {"out_features", "outFeatures"},
                     {"group_size", "groupSize"},
                     {"threshold", "threshold"},
                     {"bias", "bias"}});
    if (!s.ok()) return s;
    TernaryLinearSpec l;
    int64_t gs = 0;
    s = GetInt(Field(*v, "in_features", "inFeatures"), f + ".in_features", INT64_MIN, INT64_MAX,
               &l.in_features);
    if (s.ok()) {
      s = GetInt(Field(*v, "out_features", "outFeatures"), f + ".out_features", INT64_MIN,
                 INT64_MAX, &l.out_features);
    }
    if (s.ok())
      s = GetInt(Field(*v, "group_size", "groupSize"), f + ".group_size", INT32_MIN, INT32_MAX,
                 &gs);
    if (!s.ok()) return s;
    l.group_size = static_cast<int32_t>(gs);
    if (const json* t = Field(*v, "threshold", "threshold")) {
      if (!t->is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".threshold: expected a number, got ", t->dump()));
      }
      l.threshold = t->get<float>();
    }
    if (const json* b = Field(*v, "bias", "bias")) {
      if (!b->is_boolean()) {
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".bias: expected true or false, got ", b->dump()));
      }
      l.bias = b->get<bool>();
    }
    layer.kind = l;
  }
  if (const json* v = Field(j, "ternary_rms_norm", "ternaryRmsNorm")) {
    ++kinds;
    const std::string f = at + ".ternary_rms_norm";
    s = CheckFields(*v, f, {{"dim", "dim"}, {"group_size", "groupSize"}});
    if (!s.ok()) return s;
    TernaryRMSNormSpec n;
    int64_t gs = 0;
    s = GetInt(Field(*v, "dim", "dim"), f + ".dim", INT64_MIN, INT64_MAX, &n.dim);
    if (s.ok())
      s = GetInt(Field(*v, "group_size", "groupSize"), f + ".group_size", INT32_MIN, INT32_MAX,
                 &gs);
    if (!s.ok()) return s;
    n.group_size = static_cast<int32_t>(gs);
    layer.kind = n;
  }
  if (const json* v = Field(j, "activation", "activation")) {
    ++kinds;
    const std::string f = at + ".activation";
    s = CheckFields(*v, f, {{"kind", "kind"}});
    if (!s.ok()) return s;
    ActivationSpec a;
    if (const json* k = Field(*v, "kind", "kind")) {
      bool found = false;
      for (ActivationKind kind : {ActivationKind::kUnspecified, ActivationKind::kRelu,
                                  ActivationKind::kGelu, ActivationKind::kSilu}) {
        if ((k->is_string() && k->get<std::string>() == ActivationName(kind)) ||
            (k->is_number_integer() && k->get<int64_t>() == static_cast<int64_t>(kind))) {
          a.kind = kind;
          found = true;
        }
      }
      if (!found) {
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".kind: expected RELU, GELU or SILU, got ", k->dump()));
      }
    }
    layer.kind = a;
  }
  if (const json* v = Field(j, "residual", "residual")) {
    ++kinds;
    const std::string f = at + ".residual";
    if (depth >= kMaxResidualDepth) {
      return absl::InvalidArgumentError(
          absl::StrCat(f, ": expected at most ", kMaxResidualDepth, " nested residual blocks"));
    }
    s = CheckFields(*v, f, {{"layers", "layers"}});
    if (!s.ok()) return s;
    ResidualSpec r;
    if (const json* inner = Field(*v, "layers", "layers")) {
      auto layers = LayersFromJson(*inner, f + ".layers", depth + 1);
      if (!layers.ok()) return layers.status();
      r.layers = *std::move(layers);
    }
    layer.kind = std::move(r);
  }
  if (kinds > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        at, ": expected one of ternary_linear, ternary_rms_norm, activation, residual; got ",
        kinds));
  }
  return layer;
}

absl::StatusOr<std::vector<LayerSpec>> LayersFromJson(const json& layers, const std::string& at,
                                                      int depth) {
  if (!layers.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(at, ": expected a JSON array, got ", layers.type_name()));
  }
  std::vector<LayerSpec> out;
  for (size_t i = 0; i < layers.size(); ++i) {
    auto layer = LayerFromJson(layers[i], absl::StrCat(at, "[", i, "]"), depth);
    if (!layer.ok()) return layer.status();
    out.push_back(*std::move(layer));
  }
  return out;
}

// The shortest decimal that reads back as the same float (0.05f -> 0.05, not 0.0500000007).
double ShortestFloat(float f) {
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), f);
  if (ec != std::errc()) return f;
  double d = f;
  std::from_chars(buf, end, d);
  return d;
}

json LayersToJson(const std::vector<LayerSpec>& layers) {
  json out = json::array();
  for (const LayerSpec& layer : layers) {
    json j;
    j["name"] = layer.name;
    if (const auto* l = std::get_if<TernaryLinearSpec>(&layer.kind)) {
      json v = {{"in_features", l->in_features},
                {"out_features", l->out_features},
                {"group_size", l->group_size},
                {"bias", l->bias}};
      if (l->threshold != 0) v["threshold"] = ShortestFloat(l->threshold);
      j["ternary_linear"] = v;
    } else if (const auto* n = std::get_if<TernaryRMSNormSpec>(&layer.kind)) {
      j["ternary_rms_norm"] = {{"dim", n->dim}, {"group_size", n->group_size}};
    } else if (const auto* a = std::get_if<ActivationSpec>(&layer.kind)) {
      j["activation"] = {{"kind", std::string(ActivationName(a->kind))}};
    } else if (const auto* r = std::get_if<ResidualSpec>(&layer.kind)) {
      j["residual"] = {{"layers", LayersToJson(r->layers)}};
    }
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace

absl::StatusOr<SpecSummary> ValidateSpec(const ModelSpec& spec) {
  Validator v;
  int64_t features = 0;
  std::string producer = "the model's input";
  absl::Status s = v.Layers(spec.layers, "", "", 0, &features, &producer);
  if (!s.ok()) return s;
  // The model's input is the first layer's.
  const LayerSpec& first = spec.layers.front();
  if (const auto* l = std::get_if<TernaryLinearSpec>(&first.kind)) {
    v.summary.in_features = l->in_features;
  } else if (const auto* n = std::get_if<TernaryRMSNormSpec>(&first.kind)) {
    v.summary.in_features = n->dim;
  }
  v.summary.out_features = features;
  return v.summary;
}

ModelSpec NormalizeSpec(ModelSpec spec) {
  NormalizeLayers(&spec.layers);
  return spec;
}

absl::string_view ActivationName(ActivationKind kind) {
  switch (kind) {
    case ActivationKind::kRelu:
      return "RELU";
    case ActivationKind::kGelu:
      return "GELU";
    case ActivationKind::kSilu:
      return "SILU";
    case ActivationKind::kUnspecified:
      break;
  }
  return "KIND_UNSPECIFIED";
}

absl::StatusOr<ModelSpec> SpecFromJson(absl::string_view text) {
  if (JsonNestingDepth(text) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(absl::StrCat("spec: expected JSON nested at most ",
                                                   kMaxJsonDepth, " levels (", kMaxResidualDepth,
                                                   " residual blocks), got deeper"));
  }
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError("spec: expected JSON, got text that does not parse");
  }
  // nlohmann keeps the last of two equal keys; a spec saying two things is refused instead.
  if (std::optional<std::string> duplicate = FindDuplicateKey(text); duplicate.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("spec: ", *duplicate));
  }
  absl::Status s = CheckFields(j, "spec", {{"layers", "layers"}});
  if (!s.ok()) return s;
  ModelSpec spec;
  if (const json* layers = Field(j, "layers", "layers")) {
    auto parsed = LayersFromJson(*layers, "layers", 0);
    if (!parsed.ok()) return parsed.status();
    spec.layers = *std::move(parsed);
  }
  return spec;
}

std::string SpecToJson(const ModelSpec& spec) {
  json j;
  j["layers"] = LayersToJson(spec.layers);
  return j.dump();
}

}  // namespace tscale::core
