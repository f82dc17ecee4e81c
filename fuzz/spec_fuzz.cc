// Fuzzes model specs: the API's ModelSpec (server/service/convert.cc SpecFromProto), the JSON form
// of state files' metadata (server/core/spec.cc SpecFromJson) and their validation (ValidateSpec).
//
// The first byte picks the form of the rest: even, a serialized v1::ModelSpec (protobuf wire
// format); odd, JSON text.
// Invariants: refusals are InvalidArgument with a message; a valid spec stays valid, with the same
// summary, after NormalizeSpec, after a JSON round trip and after a proto round trip, and both
// round trips give the same spec (compared by its JSON form).
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "fuzz/check.h"
#include "google/protobuf/stubs/logging.h"
#include "server/core/spec.h"
#include "server/service/convert.h"
#include "tscale/v1/trainer.pb.h"

namespace tscale::fuzz {
namespace {

bool SameSummary(const core::SpecSummary& a, const core::SpecSummary& b) {
  return a.in_features == b.in_features && a.out_features == b.out_features &&
         a.ternary_params == b.ternary_params && a.groups == b.groups &&
         a.stateful_layers == b.stateful_layers;
}

core::SpecSummary MustValidate(const core::ModelSpec& spec, const char* what) {
  auto summary = core::ValidateSpec(spec);
  FUZZ_CHECK(summary.ok(), absl::StrCat(what, ": ", summary.status().ToString(),
                                        "\n  spec: ", core::SpecToJson(spec)));
  return *summary;
}

void CheckValid(const core::ModelSpec& spec, const core::SpecSummary& summary) {
  FUZZ_CHECK(summary.in_features >= 1 && summary.in_features <= core::kMaxFeatures, "in_features");
  FUZZ_CHECK(summary.out_features >= 1 && summary.out_features <= core::kMaxFeatures,
             "out_features");
  FUZZ_CHECK(summary.ternary_params >= 0 && summary.ternary_params <= core::kMaxModelWeights,
             absl::StrCat("ternary_params ", summary.ternary_params));
  FUZZ_CHECK(summary.groups >= 0 && summary.groups <= summary.ternary_params, "groups");

  const core::ModelSpec normalized = core::NormalizeSpec(spec);
  FUZZ_CHECK(SameSummary(MustValidate(normalized, "normalized spec"), summary),
             "NormalizeSpec changed the summary");
  FUZZ_CHECK(core::SpecToJson(core::NormalizeSpec(normalized)) == core::SpecToJson(normalized),
             "NormalizeSpec is not idempotent");

  const std::string json = core::SpecToJson(spec);
  auto from_json = core::SpecFromJson(json);
  FUZZ_CHECK(from_json.ok(), absl::StrCat("SpecToJson output does not parse: ",
                                          from_json.status().ToString(), "\n  ", json));
  FUZZ_CHECK(core::SpecToJson(*from_json) == json,
             absl::StrCat("JSON round trip changed ", json, " to ", core::SpecToJson(*from_json)));
  FUZZ_CHECK(SameSummary(MustValidate(*from_json, "spec after JSON"), summary),
             "JSON round trip changed the summary");

  v1::ModelSpec proto;
  service::SpecToProto(spec, &proto);
  v1::ModelSpec reparsed;
  FUZZ_CHECK(reparsed.ParseFromString(proto.SerializeAsString()), "proto does not reparse");
  auto from_proto = service::SpecFromProto(reparsed);
  FUZZ_CHECK(from_proto.ok(),
             absl::StrCat("SpecToProto output refused: ", from_proto.status().ToString()));
  FUZZ_CHECK(
      core::SpecToJson(*from_proto) == json,
      absl::StrCat("proto round trip changed ", json, " to ", core::SpecToJson(*from_proto)));
}

void Check(const absl::StatusOr<core::ModelSpec>& spec) {
  if (!spec.ok()) {
    FUZZ_CHECK_REFUSED(spec.status(), absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(!spec.status().message().empty(), "an error without a message");
    return;
  }
  auto summary = core::ValidateSpec(*spec);
  if (!summary.ok()) {
    FUZZ_CHECK_REFUSED(summary.status(), absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(!summary.status().message().empty(), "an error without a message");
    return;
  }
  CheckValid(*spec, *summary);
}

}  // namespace
}  // namespace tscale::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  // Parsing logs every string field that is not UTF-8; the refusal is what is checked.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const char* rest = reinterpret_cast<const char*>(data + 1);
  if (data[0] % 2 == 0) {
    tscale::v1::ModelSpec proto;
    if (!proto.ParseFromArray(rest, static_cast<int>(size - 1))) return 0;
    tscale::fuzz::Check(tscale::service::SpecFromProto(proto));
  } else {
    tscale::fuzz::Check(tscale::core::SpecFromJson(absl::string_view(rest, size - 1)));
  }
  return 0;
}
