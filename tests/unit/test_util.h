// Helpers shared by the tests: locating test data, safetensors <-> tensors, golden cases.
#ifndef TSCALE_TESTS_UNIT_TEST_UTIL_H_
#define TSCALE_TESTS_UNIT_TEST_UTIL_H_

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "server/checkpoint/safetensors.h"
#include "server/checkpoint/state_file.h"
#include "server/core/device.h"
#include "server/core/layers.h"
#include "server/core/spec.h"

namespace tscale::testing {

// The device the core and service tests put their models on: $TSCALE_TEST_DEVICE, "cpu" unless set
// (ctest runs the same tests again with "cuda:0" in builds with CUDA). Without the device asked
// for, the test binary exits 77, which ctest counts as skipped.
inline std::string TestDeviceName() {
  const char* d = std::getenv("TSCALE_TEST_DEVICE");
  const std::string name = d != nullptr && *d != '\0' ? d : "cpu";
  if (name != "cpu" && !core::ParseDevice(name).ok()) {
    std::fprintf(stderr, "skipped: TSCALE_TEST_DEVICE=%s is not available here\n", name.c_str());
    std::exit(77);
  }
  return name;
}
inline c10::Device TestDevice() { return c10::Device(TestDeviceName()); }

inline const absl::Status& internal_status(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& internal_status(const absl::StatusOr<T>& s) {
  return s.status();
}

// Matches an absl::Status (or StatusOr) with this code and a message matching `msg`.
MATCHER_P2(StatusIs, code, msg, "") {
  const absl::Status& s = internal_status(arg);
  if (s.code() != code) {
    *result_listener << "status is " << s;
    return false;
  }
  return ::testing::ExplainMatchResult(msg, std::string(s.message()), result_listener);
}

// The tests' data folder: $TSCALE_TEST_DATA, else tests/data under the current directory.
inline std::string TestData(const std::string& rel) {
  const char* dir = std::getenv("TSCALE_TEST_DATA");
  return std::string(dir ? dir : "tests/data") + "/" + rel;
}

inline at::Tensor ToTensor(const checkpoint::TensorView& v) {
  return checkpoint::TensorFromView(v);
}

// Same keys, dtypes and values.
inline bool SameState(const core::StateDict& a, const core::StateDict& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end() || v.scalar_type() != it->second.scalar_type() || !at::equal(v, it->second))
      return false;
  }
  return true;
}

// The tensors whose names start with `prefix`, with the prefix removed.
inline core::StateDict StateWithPrefix(const checkpoint::SafetensorsFile& f,
                                       const std::string& prefix) {
  core::StateDict out;
  for (const auto& [name, view] : f.tensors()) {
    if (name.rfind(prefix, 0) == 0) out[name.substr(prefix.size())] = ToTensor(view);
  }
  return out;
}

// One golden case of the reference (tests/data/golden/README.md).
struct GoldenCase {
  std::string name;
  checkpoint::SafetensorsFile file;
  core::ModelSpec spec;
  int steps = 0;
  int backwards_per_update = 0;

  at::Tensor Get(const std::string& key) const {
    const checkpoint::TensorView* v = file.Find(key);
    EXPECT_NE(v, nullptr) << name << ": no tensor " << key;
    return v ? ToTensor(*v) : at::Tensor();
  }
  std::string Tag(int step, int pass) const {
    return backwards_per_update > 1 ? "step" + std::to_string(step) + ".pass" + std::to_string(pass)
                                    : "step" + std::to_string(step);
  }
};

inline GoldenCase LoadGolden(const std::string& name) {
  auto file = checkpoint::SafetensorsFile::ReadFile(TestData("golden/" + name + ".safetensors"));
  if (!file.ok()) {
    ADD_FAILURE() << file.status();
    std::abort();
  }
  const auto& md = file->metadata();
  auto spec = core::SpecFromJson(md.at("spec"));
  if (!spec.ok()) {
    ADD_FAILURE() << spec.status();
    std::abort();
  }
  const int steps = std::stoi(md.at("steps"));
  const int backwards = std::stoi(md.at("backwards_per_update"));
  return GoldenCase{name, *std::move(file), *std::move(spec), steps, backwards};
}

inline const std::vector<std::string>& GoldenCaseNames() {
  static const std::vector<std::string> names = {"linear_basic", "linear_ragged_bias",
                                                 "linear_gs16", "mlp", "grad_accum"};
  return names;
}

}  // namespace tscale::testing

#endif  // TSCALE_TESTS_UNIT_TEST_UTIL_H_
