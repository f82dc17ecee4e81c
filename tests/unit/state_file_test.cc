// A model's state through a safetensors file and back: keys, metadata, CRC, and a state exported
// by the reference importing into the core.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/checkpoint/crc32c.h"
#include "server/checkpoint/safetensors.h"
#include "server/checkpoint/state_file.h"
#include "server/core/model.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using ::testing::HasSubstr;
using testing::StatusIs;

const c10::Device kCpu(c10::kCPU);

TEST(StateFileTest, RoundTripThroughSafetensors) {
  testing::GoldenCase c = testing::LoadGolden("mlp");
  auto model = core::Model::Import(c.spec, testing::StateWithPrefix(c.file, "final."),
                                   std::nullopt, kCpu);
  ASSERT_TRUE(model.ok()) << model.status();
  const core::StateSnapshot snap = (*model)->ExportState();
  const std::string bytes = checkpoint::EncodeState(snap, (*model)->spec(), {{"note", "x"}});

  auto file = checkpoint::SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((8 + file->header_bytes()) % 8, 0u);
  const auto& md = file->metadata();
  EXPECT_EQ(md.at("format"), "tscale/1");
  EXPECT_EQ(md.at("step"), "5");
  EXPECT_EQ(md.at("note"), "x");
  EXPECT_EQ(md.at("crc32c"), checkpoint::Crc32cHex(checkpoint::Crc32c(file->data_section())));
  EXPECT_NE(file->Find("fc1.corr_accum"), nullptr);
  EXPECT_NE(file->Find("norm1.T_packed"), nullptr);

  auto decoded = checkpoint::DecodeState(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_TRUE(decoded->spec.has_value());
  EXPECT_EQ(core::SpecToJson(*decoded->spec), core::SpecToJson((*model)->spec()));
  EXPECT_EQ(decoded->step, 5);
  auto back = core::Model::Import(*decoded->spec, decoded->tensors, decoded->step, kCpu);
  ASSERT_TRUE(back.ok()) << back.status();
  const auto again = (*back)->ExportState();
  ASSERT_EQ(again.tensors.size(), snap.tensors.size());
  for (const auto& [k, v] : snap.tensors) EXPECT_TRUE(at::equal(again.tensors.at(k), v)) << k;
}

TEST(StateFileTest, AReferenceStateWithoutMetadataImports) {
  // The golden final state as the reference's state_dict would be saved: no metadata at all.
  testing::GoldenCase c = testing::LoadGolden("linear_ragged_bias");
  checkpoint::SafetensorsWriter w;
  for (const auto& [name, view] : c.file.tensors()) {
    if (name.rfind("final.", 0) == 0) {
      ASSERT_TRUE(w.Add(name.substr(6), view.dtype, view.shape, std::string(view.data)).ok());
    }
  }
  auto decoded = checkpoint::DecodeState(w.Serialize());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_FALSE(decoded->spec.has_value());
  EXPECT_FALSE(decoded->step.has_value());
  auto model = core::Model::Import(c.spec, decoded->tensors, decoded->step, kCpu);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->step(), c.steps);  // from the layers' step_counter
}

TEST(StateFileTest, DetectsDamage) {
  auto model = core::Model::Create(testing::LoadGolden("linear_basic").spec, 1, kCpu);
  ASSERT_TRUE(model.ok());
  const std::string good = checkpoint::EncodeState((*model)->ExportState(), (*model)->spec());

  std::string flipped = good;
  flipped[flipped.size() - 3] ^= 0x10;  // a byte of the data section
  EXPECT_THAT(checkpoint::DecodeState(flipped),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("crc32c: the metadata says")));

  EXPECT_THAT(checkpoint::DecodeState(good.substr(0, good.size() - 1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("safetensors")));

  checkpoint::SafetensorsWriter w;
  w.SetMetadata("format", "other/2");
  EXPECT_THAT(checkpoint::DecodeState(w.Serialize()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("format: expected tscale/1, got 'other/2'")));
  checkpoint::SafetensorsWriter s;
  s.SetMetadata("step", "-3");
  EXPECT_THAT(checkpoint::DecodeState(s.Serialize()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("metadata step: expected an integer >= 0, got '-3'")));
  checkpoint::SafetensorsWriter j;
  j.SetMetadata("spec", "{\"layers\": 3}");
  EXPECT_THAT(checkpoint::DecodeState(j.Serialize()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("metadata spec: layers: expected a JSON array")));
}

}  // namespace
}  // namespace tscale
