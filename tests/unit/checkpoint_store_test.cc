// Checkpoint files on disk: atomic saves, listing, verified loads, damage of every kind, retention,
// the checkpointer's save/restore, and a round trip of a model of 100 million weights.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "server/checkpoint/checkpointer.h"
#include "server/checkpoint/store.h"
#include "server/core/model.h"
#include "server/core/registry.h"
#include "tests/unit/files.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using checkpoint::Checkpointer;
using checkpoint::CheckpointStore;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using testing::SameState;
using ::testing::SizeIs;
using testing::StatusIs;

const c10::Device kCpu(c10::kCPU);

core::ModelSpec Spec(int64_t in = 40, int64_t out = 24) {
  auto spec = core::SpecFromJson(
      absl::StrCat(R"({"layers": [{"name": "fc", "ternary_linear": {"in_features": )", in,
                   R"(, "out_features": )", out, R"(, "group_size": 16}}]})"));
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

std::shared_ptr<core::Model> NewModel(uint64_t seed = 1) {
  auto m = core::Model::Create(Spec(), seed, kCpu);
  EXPECT_TRUE(m.ok()) << m.status();
  return *std::move(m);
}

void Train(core::Model& m, int steps) {
  for (int i = 0; i < steps; ++i) {
    const int64_t s = m.step();
    auto f = m.Forward(at::randn({3, 40}), true);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(m.Backward(f->pass_id, at::randn({3, 24}), false).ok());
    ASSERT_TRUE(m.UpdateCorrelation(s).ok());
  }
}

std::string File(const core::Model& m) {
  return checkpoint::EncodeState(m.ExportState(), m.spec());
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A file whose JSON header was edited by `edit`, re-padded to keep it well formed.
std::string EditHeader(const std::string& file, const std::function<void(nlohmann::json&)>& edit) {
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(file[i]);
  nlohmann::json header = nlohmann::json::parse(file.substr(8, len));
  edit(header);
  std::string text = header.dump();
  while (text.size() % 8 != 0) text += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return out + text + file.substr(8 + len);
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tscale-store-XXXXXX";
    dir_ = mkdtemp(tmpl);
    auto store = CheckpointStore::Open(dir_, [this](const std::string& l) { log_.push_back(l); });
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }
  void TearDown() override { testing::RemoveAll(dir_); }

  // Saves `model` after each of `steps` training steps; returns the states saved, by step.
  std::map<int64_t, core::StateDict> SaveSteps(core::Model& m, int steps) {
    std::map<int64_t, core::StateDict> out;
    for (int i = 0; i < steps; ++i) {
      Train(m, 1);
      auto info = store_->Save("m", m.step(), File(m));
      EXPECT_TRUE(info.ok()) << info.status();
      out[m.step()] = m.ExportState().tensors;
    }
    return out;
  }
  std::string PathOf(int64_t step) const {
    return dir_ + "/m/" + checkpoint::CheckpointName(step) + ".safetensors";
  }

  std::string dir_;
  std::vector<std::string> log_;
  std::unique_ptr<CheckpointStore> store_;
};

TEST_F(StoreTest, SaveListLoad) {
  auto m = NewModel();
  auto saved = SaveSteps(*m, 3);
  // Only the final files: no temporary file is left behind.
  EXPECT_THAT(testing::ListDir(dir_ + "/m"),
              ElementsAre("step-00000001.safetensors", "step-00000002.safetensors",
                          "step-00000003.safetensors"));
  auto list = store_->List("m");
  ASSERT_TRUE(list.ok());
  ASSERT_THAT(*list, SizeIs(3));
  EXPECT_EQ((*list)[0].step, 1);
  EXPECT_EQ((*list)[2].name, "step-00000003");
  EXPECT_EQ((*list)[2].bytes, testing::FileSize(PathOf(3)));
  auto decoded = checkpoint::DecodeState(ReadAll(PathOf(3)));
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ((*list)[2].crc32c, decoded->metadata.at("crc32c"));

  auto newest = store_->Load("m", "");
  ASSERT_TRUE(newest.ok()) << newest.status();
  EXPECT_EQ(newest->info.step, 3);
  EXPECT_THAT(newest->skipped, IsEmpty());
  EXPECT_TRUE(SameState(newest->state.tensors, saved[3]));
  auto second = store_->Load("m", "step-00000002");
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(SameState(second->state.tensors, saved[2]));
  EXPECT_TRUE(store_->Load("m", "step-2.safetensors").ok());

  EXPECT_THAT(store_->Load("m", "step-00000007"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("no checkpoint 'step-00000007'")));
  EXPECT_THAT(store_->Load("m", "../m/step-00000001"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("name: expected")));
  EXPECT_THAT(store_->Load("../etc", ""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  EXPECT_THAT(store_->Load("none", ""), StatusIs(absl::StatusCode::kNotFound, HasSubstr("'none'")));
  EXPECT_THAT(store_->List("none"), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  EXPECT_THAT(store_->ModelIds(), ElementsAre("m"));
}

TEST_F(StoreTest, OpenRemovesStaleTemporaryFiles) {
  auto m = NewModel();
  SaveSteps(*m, 1);
  WriteAll(dir_ + "/m/.step-00000002.safetensors.tmp-123-0", "half a file");
  WriteAll(dir_ + "/m/notes.txt", "not ours: kept");
  log_.clear();
  auto reopened = CheckpointStore::Open(dir_, [this](const std::string& l) { log_.push_back(l); });
  ASSERT_TRUE(reopened.ok());
  EXPECT_FALSE(testing::Exists(dir_ + "/m/.step-00000002.safetensors.tmp-123-0"));
  EXPECT_TRUE(testing::Exists(dir_ + "/m/notes.txt"));
  EXPECT_THAT(log_, ElementsAre(HasSubstr("removed stale temporary file")));
  EXPECT_THAT(*(*reopened)->List("m"), SizeIs(1));
}

TEST_F(StoreTest, OpenRefusesAFileForAFolder) {
  WriteAll(dir_ + "/plain", "x");
  EXPECT_THAT(CheckpointStore::Open(dir_ + "/plain"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("is not a folder")));
  // Also as a folder above the store's.
  EXPECT_THAT(CheckpointStore::Open(dir_ + "/plain/a/b"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("is not a folder")));
}

// --checkpoint-dir A/B/C creates A, A/B and C, as mkdir -p would.
TEST_F(StoreTest, OpenCreatesMissingParentFolders) {
  const std::string nested = dir_ + "/a/b/c";
  auto store = CheckpointStore::Open(nested + "/");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE(testing::Exists(nested));
  auto m = NewModel();
  Train(*m, 1);
  ASSERT_TRUE((*store)->Save("m", m->step(), File(*m)).ok());
  EXPECT_THAT(testing::ListDir(nested + "/m"), ElementsAre("step-00000001.safetensors"));
  // A relative path too (from the working folder).
  char cwd[4096];
  ASSERT_NE(getcwd(cwd, sizeof cwd), nullptr);
  ASSERT_EQ(chdir(dir_.c_str()), 0);
  auto relative = CheckpointStore::Open("x/y");
  const bool made = testing::Exists(dir_ + "/x/y");
  ASSERT_EQ(chdir(cwd), 0);
  EXPECT_TRUE(relative.ok()) << relative.status();
  EXPECT_TRUE(made);
}

// Each kind of damage is detected: the named load is DataLoss; the newest-valid load falls back
// to the previous checkpoint and reports the damaged one.
class DamageTest : public StoreTest,
                   public ::testing::WithParamInterface<std::pair<const char*, int>> {};

TEST_P(DamageTest, IsDetected) {
  auto m = NewModel();
  auto saved = SaveSteps(*m, 2);
  const std::string path = PathOf(2);
  std::string file = ReadAll(path);
  const std::string kind = GetParam().first;
  if (kind == "flipped byte") {
    file[file.size() - 7] ^= 0x04;
  } else if (kind == "truncated") {
    file.resize(file.size() - 100);
  } else if (kind == "wrong crc") {
    file = EditHeader(file, [](nlohmann::json& h) { h["__metadata__"]["crc32c"] = "00000000"; });
  } else if (kind == "lying header") {
    // The header claims a shape the data does not have.
    file = EditHeader(file, [](nlohmann::json& h) {
      h["fc.corr_accum"]["shape"] = {h["fc.corr_accum"]["shape"][0].get<int64_t>() - 1};
    });
  } else if (kind == "lying step") {
    file = EditHeader(file, [](nlohmann::json& h) { h["__metadata__"]["step"] = "7"; });
  } else if (kind == "empty") {
    file.clear();
  }
  WriteAll(path, file);
  EXPECT_THAT(store_->Load("m", "step-00000002"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("step-00000002.safetensors")));
  auto fallback = store_->Load("m", "");
  ASSERT_TRUE(fallback.ok()) << fallback.status();
  EXPECT_EQ(fallback->info.step, 1);
  EXPECT_TRUE(SameState(fallback->state.tensors, saved[1]));
  ASSERT_THAT(fallback->skipped, SizeIs(1));
  EXPECT_THAT(fallback->skipped[0], HasSubstr("step-00000002.safetensors"));
}

INSTANTIATE_TEST_SUITE_P(Kinds, DamageTest,
                         ::testing::Values(std::pair<const char*, int>{"flipped byte", 0},
                                           std::pair<const char*, int>{"truncated", 0},
                                           std::pair<const char*, int>{"wrong crc", 0},
                                           std::pair<const char*, int>{"lying header", 0},
                                           std::pair<const char*, int>{"lying step", 0},
                                           std::pair<const char*, int>{"empty", 0}));

TEST_F(StoreTest, EveryFileDamagedIsDataLoss) {
  auto m = NewModel();
  SaveSteps(*m, 2);
  WriteAll(PathOf(1), "garbage");
  WriteAll(PathOf(2), "garbage");
  auto loaded = store_->Load("m", "");
  EXPECT_THAT(loaded, StatusIs(absl::StatusCode::kDataLoss,
                               AllOf(HasSubstr("step-00000001"), HasSubstr("step-00000002"))));
}

TEST_F(StoreTest, AcceptRefusingAStateCountsAsDamage) {
  auto m = NewModel();
  SaveSteps(*m, 2);
  auto loaded = store_->Load("m", "", [](const checkpoint::DecodedState& s) {
    return *s.step == 2 ? absl::DataLossError("refused") : absl::OkStatus();
  });
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->info.step, 1);
}

TEST_F(StoreTest, RetentionAndRemoval) {
  auto m = NewModel();
  SaveSteps(*m, 5);
  ASSERT_TRUE(store_->Prune("m", 2).ok());
  auto list = store_->List("m");
  ASSERT_THAT(*list, SizeIs(2));
  EXPECT_EQ((*list)[0].step, 4);
  ASSERT_TRUE(store_->RemoveAfter("m", 4).ok());
  EXPECT_THAT(*store_->List("m"), SizeIs(1));
  ASSERT_TRUE(store_->Remove("m").ok());
  EXPECT_FALSE(testing::Exists(dir_ + "/m"));
  EXPECT_THAT(store_->Remove("m"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("'m'")));
}

// A write that fails (here: beyond a file-size limit, as a full disk would) fails the save with
// a status naming the file, leaves no temporary file, and the earlier checkpoints stay valid.
TEST_F(StoreTest, WriteErrorLeavesEarlierCheckpoints) {
  auto m = NewModel();
  SaveSteps(*m, 1);
  Train(*m, 1);
  const std::string file = File(*m);
  struct rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  void (*old_handler)(int) = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = file.size() / 2;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  auto saved = store_->Save("m", m->step(), file);
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_THAT(saved, StatusIs(absl::StatusCode::kResourceExhausted,
                              AllOf(HasSubstr("writing"), HasSubstr(".tmp"))));
  for (const std::string& name : testing::ListDir(dir_ + "/m")) {
    EXPECT_THAT(name, ::testing::Not(HasSubstr(".tmp")));
  }
  auto loaded = store_->Load("m", "");
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->info.step, 1);
}

// ---------------------------------------------------------------- the checkpointer

TEST_F(StoreTest, CheckpointerSavesRestoresAndRewinds) {
  core::ModelRegistry registry;
  checkpoint::CheckpointPolicy policy;
  policy.keep = 0;
  Checkpointer ck(store_.get(), &registry, policy, {{"server_version", "test"}}, nullptr);
  auto m = NewModel(4);
  ASSERT_TRUE(registry.Add("m", m).ok());
  Train(*m, 2);
  auto info = ck.Save("m");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step, 2);
  const auto at2 = m->ExportState().tensors;
  auto decoded = checkpoint::DecodeState(ReadAll(info->path));
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->metadata.at("server_version"), "test");
  EXPECT_EQ(decoded->metadata.at("compute"), "COMPUTE_FP32");
  EXPECT_EQ(decoded->metadata.at("model_id"), "m");
  EXPECT_EQ(decoded->metadata.count("created"), 1u);

  // Only changed models are saved again.
  auto saved = ck.SaveChanged();
  ASSERT_TRUE(saved.ok());
  EXPECT_EQ(*saved, 0);
  Train(*m, 2);
  EXPECT_EQ(*ck.SaveChanged(), 1);

  // A new registry restores it exactly.
  core::ModelRegistry fresh;
  Checkpointer ck2(store_.get(), &fresh, policy, {},
                   [this](const std::string& l) { log_.push_back(l); });
  log_.clear();
  ck2.RestoreAll(kCpu, {});
  auto restored = fresh.Get("m");
  ASSERT_TRUE(restored.ok());
  EXPECT_EQ((*restored)->step(), 4);
  EXPECT_TRUE(SameState((*restored)->ExportState().tensors, m->ExportState().tensors));
  EXPECT_THAT(log_, ElementsAre(HasSubstr("restored model 'm'")));

  // Back to step 2 in place: refused while the step-4 checkpoint exists, which stays; history
  // goes only when asked (discard_newer), and then a restart comes back to step 2 as well.
  EXPECT_THAT(ck.Restore("m", "step-00000002", kCpu, {}, std::nullopt, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("step-00000004"), HasSubstr("new_model_id"),
                             HasSubstr("discard_newer"))));
  EXPECT_THAT(*store_->List("m"), SizeIs(2));
  EXPECT_EQ((*registry.Get("m"))->step(), 4);
  Checkpointer::RestoreTarget discard;
  discard.discard_newer = true;
  auto back = ck.Restore("m", "step-00000002", kCpu, {}, std::nullopt, nullptr, discard);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(SameState((*back)->ExportState().tensors, at2));
  EXPECT_EQ(*registry.Get("m"), *back);
  EXPECT_THAT(*store_->List("m"), SizeIs(1));
}

// Restoring an older checkpoint as a new model (a branch) leaves the source's model and files
// alone, and writes the branch's first checkpoint so that a restart brings it back.
TEST_F(StoreTest, RestoreAsNewModelKeepsTheNewerCheckpoints) {
  core::ModelRegistry registry;
  checkpoint::CheckpointPolicy policy;
  policy.keep = 0;
  Checkpointer ck(store_.get(), &registry, policy, {}, nullptr);
  auto m = NewModel(5);
  ASSERT_TRUE(registry.Add("m", m).ok());
  Train(*m, 2);
  ASSERT_TRUE(ck.Save("m").ok());
  const auto at2 = m->ExportState().tensors;
  Train(*m, 2);
  ASSERT_TRUE(ck.Save("m").ok());

  Checkpointer::RestoreTarget branch;
  branch.new_model_id = "m-at-2";
  auto b = ck.Restore("m", "step-00000002", kCpu, {}, std::nullopt, nullptr, branch);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->step(), 2);
  EXPECT_TRUE(SameState((*b)->ExportState().tensors, at2));
  EXPECT_EQ(*registry.Get("m"), m);
  EXPECT_EQ(m->step(), 4);
  EXPECT_THAT(*store_->List("m"), SizeIs(2));
  auto branch_files = store_->List("m-at-2");
  ASSERT_TRUE(branch_files.ok()) << branch_files.status();
  ASSERT_THAT(*branch_files, SizeIs(1));
  EXPECT_EQ((*branch_files)[0].step, 2);

  // The branch trains on and saves without touching the source's later checkpoints.
  Train(**b, 3);
  ASSERT_TRUE(ck.Save("m-at-2").ok());
  EXPECT_THAT(*store_->List("m"), SizeIs(2));

  // Taken ids, the source's own id, and both options at once are refused, naming the field.
  EXPECT_THAT(ck.Restore("m", "", kCpu, {}, std::nullopt, nullptr, branch),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("new_model_id")));
  ASSERT_TRUE(registry.Remove("m-at-2").ok());
  EXPECT_THAT(ck.Restore("m", "", kCpu, {}, std::nullopt, nullptr, branch),
              StatusIs(absl::StatusCode::kAlreadyExists,
                       AllOf(HasSubstr("new_model_id"), HasSubstr("on disk"))));
  Checkpointer::RestoreTarget same;
  same.new_model_id = "m";
  EXPECT_THAT(ck.Restore("m", "", kCpu, {}, std::nullopt, nullptr, same),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("new_model_id")));
  Checkpointer::RestoreTarget both;
  both.new_model_id = "other";
  both.discard_newer = true;
  EXPECT_THAT(ck.Restore("m", "", kCpu, {}, std::nullopt, nullptr, both),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("discard_newer")));
}

// A deleted model's folder moves to the trash: a restart no longer restores it, nor does its id
// hold checkpoints, until it is taken back on purpose; expired trash is removed.
TEST_F(StoreTest, DeletedModelStaysDeletedUntilTakenBack) {
  core::ModelRegistry registry;
  checkpoint::CheckpointPolicy policy;
  policy.keep = 0;
  Checkpointer ck(store_.get(), &registry, policy, {}, nullptr);
  auto m = NewModel(6);
  ASSERT_TRUE(registry.Add("m", m).ok());
  Train(*m, 3);
  ASSERT_TRUE(ck.Save("m").ok());
  ASSERT_TRUE(registry.Remove("m").ok());
  ASSERT_TRUE(ck.Discard("m", /*remove=*/false).ok());
  EXPECT_FALSE(testing::Exists(dir_ + "/m"));
  EXPECT_THAT(store_->ModelIds(), IsEmpty());
  EXPECT_THAT(store_->List("m"), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  EXPECT_THAT(testing::ListDir(store_->TrashDir()), ElementsAre(::testing::StartsWith("m@")));

  core::ModelRegistry fresh;
  Checkpointer ck2(store_.get(), &fresh, policy, {}, nullptr);
  ck2.RestoreAll(kCpu, {});
  EXPECT_THAT(fresh.Get("m"), StatusIs(absl::StatusCode::kNotFound, ::testing::_));

  // Taken back on purpose, it restores at its step.
  ASSERT_TRUE(store_->TakeFromTrash("m").ok());
  auto back = ck2.Restore("m", "", kCpu, {}, std::nullopt, nullptr);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(SameState((*back)->ExportState().tensors, m->ExportState().tensors));
  EXPECT_THAT(store_->TakeFromTrash("m"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("from_deleted")));
  // Not over checkpoints of a model of the same id.
  ASSERT_TRUE(store_->MoveToTrash("m").ok());
  ASSERT_TRUE(store_->Save("m", 1, File(*NewModel(7))).ok());
  EXPECT_THAT(store_->TakeFromTrash("m"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("of its own")));
  ASSERT_TRUE(store_->Remove("m").ok());

  // Deleted twice in one second: both folders stay.
  ASSERT_TRUE(store_->Save("m", 1, File(*NewModel(7))).ok());
  const absl::Time now = absl::Now();
  ASSERT_TRUE(store_->MoveToTrash("m", now).ok());
  ASSERT_TRUE(store_->Save("m", 1, File(*NewModel(8))).ok());
  ASSERT_TRUE(store_->MoveToTrash("m", now).ok());
  EXPECT_THAT(testing::ListDir(store_->TrashDir()), SizeIs(3));

  // Past the retention (168 hours by default), the trash is emptied, at the next delete or
  // the next start.
  log_.clear();
  EXPECT_EQ(store_->ExpireTrash(now + absl::Hours(169)), 3);
  EXPECT_THAT(testing::ListDir(store_->TrashDir()), IsEmpty());
  EXPECT_THAT(log_, ElementsAre(HasSubstr("deleted model 'm'"), HasSubstr("deleted model 'm'"),
                                HasSubstr("deleted model 'm'")));
  ASSERT_TRUE(store_->Save("x", 1, File(*NewModel(7))).ok());
  ASSERT_TRUE(store_->MoveToTrash("x", now - absl::Hours(200)).ok());
  auto reopened = CheckpointStore::Open(dir_, nullptr);
  ASSERT_TRUE(reopened.ok());
  EXPECT_THAT(testing::ListDir(store_->TrashDir()), IsEmpty());
  // With a retention of 0 nothing expires.
  ASSERT_TRUE(store_->Save("x", 1, File(*NewModel(7))).ok());
  ASSERT_TRUE(store_->MoveToTrash("x", now - absl::Hours(2000)).ok());
  auto keep = CheckpointStore::Open(dir_, nullptr, absl::ZeroDuration());
  ASSERT_TRUE(keep.ok());
  EXPECT_THAT(testing::ListDir(store_->TrashDir()), SizeIs(1));
}

// A snapshot queued by the step policy is not written after its model was deleted: the folder
// would come back and, with it, the model at the next start.
TEST_F(StoreTest, QueuedSnapshotOfADeletedModelIsDropped) {
  core::ModelRegistry registry;
  checkpoint::CheckpointPolicy policy;
  policy.every_steps = 1;
  policy.keep = 0;
  Checkpointer ck(store_.get(), &registry, policy, {}, nullptr);
  auto m = NewModel(9);
  ASSERT_TRUE(registry.Add("m", m).ok());
  Train(*m, 1);
  ck.AfterUpdate("m", m->step());  // queued; the thread is not started yet
  ASSERT_TRUE(registry.Remove("m").ok());
  ck.Start();
  absl::SleepFor(absl::Milliseconds(300));
  ck.Stop();
  EXPECT_FALSE(testing::Exists(dir_ + "/m"));
}

TEST_F(StoreTest, StepPolicyRunsInTheBackground) {
  core::ModelRegistry registry;
  checkpoint::CheckpointPolicy policy;
  policy.every_steps = 2;
  policy.keep = 0;
  Checkpointer ck(store_.get(), &registry, policy, {}, nullptr);
  ck.Start();
  auto m = NewModel();
  ASSERT_TRUE(registry.Add("m", m).ok());
  for (int i = 0; i < 4; ++i) {
    Train(*m, 1);
    ck.AfterUpdate("m", m->step());
  }
  for (int i = 0; i < 100 && !testing::Exists(PathOf(4)); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ck.Stop();
  EXPECT_TRUE(testing::Exists(PathOf(4)));
  EXPECT_FALSE(testing::Exists(PathOf(1)));
  EXPECT_FALSE(testing::Exists(PathOf(3)));
}

// ---------------------------------------------------------------- a large model

TEST_F(StoreTest, RoundTripOfAHundredMillionWeights) {
  // 10240 x 10240 = 104,857,600 weights.
  auto spec = Spec(10240, 10240);
  const auto t0 = std::chrono::steady_clock::now();
  auto created = core::Model::Create(spec, 7, kCpu);
  ASSERT_TRUE(created.ok()) << created.status();
  std::shared_ptr<core::Model> m = *std::move(created);
  core::ModelRegistry registry;
  ASSERT_TRUE(registry.Add("m", m).ok());
  Checkpointer ck(store_.get(), &registry, {}, {}, nullptr);
  const auto t1 = std::chrono::steady_clock::now();
  auto info = ck.Save("m");
  const auto t2 = std::chrono::steady_clock::now();
  ASSERT_TRUE(info.ok()) << info.status();
  core::ModelRegistry fresh;
  Checkpointer ck2(store_.get(), &fresh, {}, {}, nullptr);
  ck2.RestoreAll(kCpu, {});
  const auto t3 = std::chrono::steady_clock::now();
  auto restored = fresh.Get("m");
  ASSERT_TRUE(restored.ok());
  EXPECT_TRUE(SameState((*restored)->ExportState().tensors, m->ExportState().tensors));
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  const double mb = info->bytes / 1e6;
  std::printf(
      "100M-weight model (%lld weights): file %.1f MB; create %.2f s; save %.3f s "
      "(%.0f MB/s, fsync included); restore %.3f s (%.0f MB/s, verify and build included)\n",
      static_cast<long long>(m->summary().ternary_params), mb, secs(t0, t1), secs(t1, t2),
      mb / secs(t1, t2), secs(t2, t3), mb / secs(t2, t3));
}

}  // namespace
}  // namespace tscale
