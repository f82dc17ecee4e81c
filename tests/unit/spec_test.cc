// ModelSpec validation (each error names the layer and field) and its JSON form.
#include "server/core/spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using core::ActivationKind;
using core::ActivationSpec;
using core::LayerSpec;
using core::ModelSpec;
using core::ResidualSpec;
using core::TernaryLinearSpec;
using core::TernaryRMSNormSpec;
using ::testing::HasSubstr;
using testing::StatusIs;

LayerSpec Linear(std::string name, int64_t in, int64_t out, int32_t gs = 0, bool bias = false) {
  return {std::move(name), TernaryLinearSpec{in, out, gs, 0.0f, bias}};
}
LayerSpec Norm(std::string name, int64_t dim, int32_t gs = 0) {
  return {std::move(name), TernaryRMSNormSpec{dim, gs}};
}
LayerSpec Act(std::string name, ActivationKind kind) {
  return {std::move(name), ActivationSpec{kind}};
}
LayerSpec Res(std::string name, std::vector<LayerSpec> layers) {
  return {std::move(name), ResidualSpec{std::move(layers)}};
}

ModelSpec Mlp() {
  return {{Linear("fc1", 64, 96), Norm("norm1", 96), Act("act1", ActivationKind::kSilu),
           Res("block0", {Linear("up", 96, 128), Act("gelu", ActivationKind::kGelu),
                          Linear("down", 128, 96)}),
           Linear("fc2", 96, 10, 16, true)}};
}

TEST(SpecTest, ValidSpecSummary) {
  auto s = core::ValidateSpec(Mlp());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->in_features, 64);
  EXPECT_EQ(s->out_features, 10);
  EXPECT_EQ(s->ternary_params, 64 * 96 + 96 + 96 * 128 + 128 * 96 + 96 * 10);
  EXPECT_EQ(s->groups, 96 * 2 + 3 + 128 * 3 + 96 * 4 + 10 * 6);
  EXPECT_THAT(s->stateful_layers,
              ::testing::ElementsAre("fc1", "norm1", "block0.up", "block0.down", "fc2"));
}

TEST(SpecTest, RejectsEmptyModel) {
  EXPECT_THAT(core::ValidateSpec(ModelSpec{}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers: expected at least one layer, got none")));
}

TEST(SpecTest, RejectsBrokenDimensionChain) {
  ModelSpec spec = {{Linear("fc1", 64, 96), Linear("fc2", 64, 10)}};
  EXPECT_THAT(core::ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (fc2).ternary_linear.in_features: expected 96 (the "
                                 "output of fc1), got 64")));
  ModelSpec norm = {{Linear("fc1", 64, 96), Norm("n", 95)}};
  EXPECT_THAT(core::ValidateSpec(norm),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (n).ternary_rms_norm.dim: expected 96")));
}

TEST(SpecTest, RejectsResidualThatChangesWidth) {
  ModelSpec spec = {{Linear("fc1", 8, 16), Res("block0", {Linear("up", 16, 32)})}};
  EXPECT_THAT(core::ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (block0).residual: expected its layers to map 16 "
                                 "features to 16, got 32")));
  ModelSpec inner = {{Linear("fc1", 8, 16), Res("block0", {Linear("up", 8, 16)})}};
  EXPECT_THAT(core::ValidateSpec(inner),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (block0).residual.layers[0] (up).ternary_linear."
                                 "in_features: expected 16 (the block's input), got 8")));
  ModelSpec empty = {{Linear("fc1", 8, 16), Res("block0", {})}};
  EXPECT_THAT(core::ValidateSpec(empty),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (block0).residual.layers: expected at least one")));
}

TEST(SpecTest, RejectsBadGroupSizes) {
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 8, 8, -1)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0] (fc).ternary_linear.group_size: expected 1 to 32767 "
                                 "(0 for the default 32), got -1")));
  EXPECT_THAT(
      core::ValidateSpec({{Norm("n", 8, 40000)}}),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("layers[0] (n).ternary_rms_norm.group_size: expected 1 to 32767")));
}

TEST(SpecTest, RejectsBadNames) {
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 8, 8), Linear("fc", 8, 8)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1].name: expected a name unique among its siblings, got "
                                 "'fc' again")));
  EXPECT_THAT(core::ValidateSpec({{Linear("a.b", 8, 8)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0].name: expected 1-64 characters of [A-Za-z0-9_-], got "
                                 "'a.b'")));
  EXPECT_THAT(core::ValidateSpec({{Linear("", 8, 8)}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers[0].name")));
  // The same name in different blocks is fine: full names differ.
  ModelSpec nested = {{Linear("fc", 8, 8), Res("b", {Linear("fc", 8, 8)})}};
  EXPECT_TRUE(core::ValidateSpec(nested).ok());
}

TEST(SpecTest, RejectsMissingKindAndBadActivation) {
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 8, 8), LayerSpec{"x", std::monostate{}}}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (x): expected one of ternary_linear")));
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 8, 8), Act("a", ActivationKind::kUnspecified)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (a).activation.kind: expected RELU, GELU or SILU")));
  EXPECT_THAT(core::ValidateSpec({{Act("a", ActivationKind::kRelu), Linear("fc", 8, 8)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0] (a): an activation cannot come first")));
}

TEST(SpecTest, RejectsSizesThatOverflowOrCannotExist) {
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 0, 8)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0] (fc).ternary_linear.in_features: expected 1 to "
                                 "2147483647, got 0")));
  EXPECT_THAT(core::ValidateSpec({{Linear("fc", 8, int64_t{1} << 40)}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("out_features: expected 1 to 2147483647")));
  // Each layer fits, the model does not: 2 x 2^31 x 2^9 > 2^40.
  ModelSpec big = {
      {Linear("a", 1 << 9, (int64_t{1} << 31) - 1), Linear("b", (int64_t{1} << 31) - 1, 1 << 9)}};
  EXPECT_THAT(core::ValidateSpec(big),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[1] (b): the model would hold more than 1099511627776 "
                                 "weights")));
}

TEST(SpecTest, RejectsBadThreshold) {
  ModelSpec spec = {{Linear("fc", 8, 8)}};
  std::get<TernaryLinearSpec>(spec.layers[0].kind).threshold = -0.5f;
  EXPECT_THAT(core::ValidateSpec(spec),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0] (fc).ternary_linear.threshold: expected a finite "
                                 "value >= 0")));
}

TEST(SpecTest, RejectsDeepNesting) {
  LayerSpec inner = Linear("fc", 8, 8);
  for (int i = 0; i < 40; ++i) inner = Res("r", {inner});
  EXPECT_THAT(core::ValidateSpec({{Linear("in", 8, 8), inner}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("expected at most 32 nested residual blocks")));
}

TEST(SpecTest, JsonRoundTripAndGoldenSpecs) {
  ModelSpec spec = core::NormalizeSpec(Mlp());
  std::get<TernaryLinearSpec>(spec.layers[0].kind).threshold = 0.05f;
  const std::string json = core::SpecToJson(spec);
  EXPECT_THAT(json, HasSubstr("\"threshold\":0.05}"));
  auto back = core::SpecFromJson(json);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(core::SpecToJson(*back), json);

  auto golden = core::SpecFromJson(
      R"({"layers": [{"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 96,
          "group_size": 32, "bias": false}}, {"name": "norm1", "ternary_rms_norm": {"dim": 96,
          "group_size": 32}}, {"name": "act1", "activation": {"kind": "SILU"}}]})");
  ASSERT_TRUE(golden.ok()) << golden.status();
  ASSERT_EQ(golden->layers.size(), 3u);
  EXPECT_EQ(std::get<TernaryRMSNormSpec>(golden->layers[1].kind).dim, 96);
  EXPECT_EQ(std::get<ActivationSpec>(golden->layers[2].kind).kind, ActivationKind::kSilu);

  // The proto JSON mapping's names, 64-bit integers as strings and enum numbers.
  auto camel = core::SpecFromJson(
      R"({"layers": [{"name": "fc", "ternaryLinear": {"inFeatures": "8", "outFeatures": 4,
          "groupSize": 4}}, {"name": "a", "activation": {"kind": 1}}]})");
  ASSERT_TRUE(camel.ok()) << camel.status();
  EXPECT_EQ(std::get<TernaryLinearSpec>(camel->layers[0].kind).in_features, 8);
  EXPECT_EQ(std::get<ActivationSpec>(camel->layers[1].kind).kind, ActivationKind::kRelu);
}

TEST(SpecTest, JsonErrorsNameTheField) {
  EXPECT_THAT(core::SpecFromJson("{"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("spec: expected JSON")));
  EXPECT_THAT(
      core::SpecFromJson(R"({"layer": []})"),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("spec: unknown field 'layer'")));
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [{"name": "fc", "ternary_linear":
              {"in_features": "x"}}]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0].ternary_linear.in_features: expected an integer, got "
                                 "\"x\"")));
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [{"name": "a", "activation": {"kind": "TANH"}}]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layers[0].activation.kind: expected RELU, GELU or SILU, got "
                                 "\"TANH\"")));
  EXPECT_THAT(
      core::SpecFromJson(R"({"layers": [{"name": "a", "activation": {}, "residual": {}}]})"),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers[0]: expected one of")));
  EXPECT_THAT(
      core::SpecFromJson(R"({"layers": [{"name": "fc", "ternary_linear":
              {"group_size": 4294967296}}]})"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("group_size: expected an integer from -2147483648 to 2147483647")));
}

// A key given twice in one object is refused, naming the key and the object it is in: a parser
// that kept the last one would read {"in_features": 64, "in_features": 32} as 32 without a word.
TEST(SpecTest, DuplicateKeysAreRefusedNamingTheKeyAndWhere) {
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [{"name": "a", "activation": {"kind": "RELU"}},
              {"name": "fc", "ternary_linear": {"in_features": 64, "out_features": 8,
               "in_features": 32}}]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("spec: duplicate key 'in_features' in layers[1].ternary_linear")));
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [], "layers": []})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("spec: duplicate key 'layers' at the top level")));
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [{"name": "a", "name": "b",
              "activation": {"kind": "RELU"}}]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("spec: duplicate key 'name' in layers[0]")));
  // The same key in different objects is no duplicate.
  auto ok = core::SpecFromJson(R"({"layers": [{"name": "a", "activation": {"kind": "RELU"}},
              {"name": "b", "activation": {"kind": "GELU"}}]})");
  EXPECT_TRUE(ok.ok()) << ok.status();
}

// Found by fuzzing: a spec whose JSON nests a few hundred thousand levels (in a state file's
// metadata, up to the header limit) overflowed the stack when an error message dumped the value.
TEST(SpecTest, JsonNestedTooDeepIsRefusedBeforeParsing) {
  const int levels = 300000;
  const std::string deep = std::string(levels, '[') + std::string(levels, ']');
  EXPECT_THAT(core::SpecFromJson(R"({"layers": [{"name": )" + deep + "}]}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("spec: expected JSON nested at most 100 levels")));
  // Brackets inside strings do not count.
  auto in_string = core::SpecFromJson(R"({"layers": [{"name": ")" + deep + R"("}]})");
  ASSERT_TRUE(in_string.ok()) << in_string.status();
  EXPECT_EQ(in_string->layers[0].name, deep);
  // The deepest valid spec, 32 nested residual blocks, still parses.
  LayerSpec inner = Linear("fc", 8, 8);
  for (int i = 0; i < 32; ++i) inner = Res("r", {inner});
  const ModelSpec spec{{Linear("in", 8, 8), inner}};
  ASSERT_TRUE(core::ValidateSpec(spec).ok());
  auto back = core::SpecFromJson(core::SpecToJson(spec));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(core::SpecToJson(*back), core::SpecToJson(spec));
}

}  // namespace
}  // namespace tscale
