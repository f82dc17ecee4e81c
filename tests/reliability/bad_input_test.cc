// A battery of bad inputs over every RPC of tscale.v1.TernaryTrainer, through a real gRPC server
// on loopback: malformed tensors, invalid ids and specs, stale, used and foreign passes, wrong
// expected steps, corrupt and lying safetensors files, oversized messages. Each case names the
// gRPC code it must get and a substring naming the field; after the whole battery the server is
// still SERVING and nothing changed: every model's exported state is byte-identical, ListModels
// (steps, pending passes and bytes included) and the checkpoint folder are as they were.
//
// ListModels and GetServerInfo take no input; they are called before and after the battery.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"
#include "tests/integration/rpc_test_util.h"
#include "tests/unit/test_util.h"
#include "server/checkpoint/safetensors.h"
#include "server/service/server.h"
#include "tests/unit/files.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale {
namespace {

using testing::Floats;
using testing::LinearSpec;
using testing::Longs;
using testing::MlpSpec;

using Json = nlohmann::json;
using Code = grpc::StatusCode;

constexpr int64_t kMaxMessageBytes = 256 << 10;
constexpr int64_t kMaxImportBytes = 1 << 20;
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();

// ---------------------------------------------------------------- requests



// `t` with the float at `index` replaced.
v1::Tensor WithFloat(v1::Tensor t, int index, float value) {
  std::memcpy(t.mutable_data()->data() + 4 * index, &value, 4);
  return t;
}

v1::Tensor WithShape(v1::Tensor t, std::vector<int64_t> shape) {
  t.clear_shape();
  for (int64_t d : shape) t.add_shape(d);
  return t;
}



// ---------------------------------------------------------------- safetensors surgery

// A safetensors file split into its JSON header and its data section.
struct StFile {
  Json header;
  std::string data;
};

StFile Split(const std::string& bytes) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return {Json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

std::string Le64(uint64_t n) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out;
}

// The file with `header_text` as its header (padded with spaces to a multiple of 8).
std::string Join(std::string header_text, const std::string& data) {
  while (header_text.size() % 8 != 0) header_text.push_back(' ');
  return Le64(header_text.size()) + header_text + data;
}

std::string Join(const StFile& f) { return Join(f.header.dump(), f.data); }

// The file rebuilt by the project's writer from its tensors, after `edit` changed them; the
// metadata is kept except the CRC (which would no longer match).
std::string Rebuild(const std::string& bytes,
                    const std::function<void(std::string& name, checkpoint::DType& dtype,
                                             std::vector<int64_t>& shape, std::string& data,
                                             bool& keep)>& edit) {
  auto file = checkpoint::SafetensorsFile::Parse(bytes);
  EXPECT_TRUE(file.ok()) << file.status();
  checkpoint::SafetensorsWriter writer;
  for (const auto& [k, tv] : file->tensors()) {
    std::string name = k;
    checkpoint::DType dtype = tv.dtype;
    std::vector<int64_t> shape = tv.shape;
    std::string data(tv.data);
    bool keep = true;
    edit(name, dtype, shape, data, keep);
    if (keep) {
      EXPECT_TRUE(writer.Add(name, dtype, shape, data).ok()) << name;
    }
  }
  for (const auto& [k, v] : file->metadata()) {
    if (k != "crc32c") writer.SetMetadata(k, v);
  }
  return writer.Serialize();
}

// ---------------------------------------------------------------- the test

// One bad input: the call, the code it must get, and a substring of the message that names the
// field (or the tensor of a state file).
struct Case {
  std::string name;
  std::function<grpc::Status()> call;
  Code code;
  std::string field;
};

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.device = testing::TestDeviceName();
    options.max_message_bytes = kMaxMessageBytes;
    options.max_import_bytes = kMaxImportBytes;
    options.checkpoint_dir = dir_.path();
    options.checkpoint_on_shutdown = false;
    auto server = service::Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = testing::UnlimitedChannel(server_->address());
    stub_ = v1::TernaryTrainer::NewStub(channel_);
  }
  void TearDown() override { server_->Shutdown(std::chrono::seconds(5)); }

  // A context with a deadline, so that no case can hang the battery.
  static std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return ctx;
  }

  grpc::Status Create(const std::string& id, const v1::ModelSpec& spec, uint64_t seed = 1,
                      const std::string& device = "", int compute = 0) {
    v1::CreateModelRequest req;
    req.set_model_id(id);
    *req.mutable_spec() = spec;
    req.set_seed(seed);
    req.set_device(device);
    req.set_compute(static_cast<v1::ComputeType>(compute));
    v1::ModelInfo info;
    return stub_->CreateModel(Ctx().get(), req, &info);
  }
  grpc::Status GetModel(const std::string& id, v1::ModelInfo* info) {
    v1::GetModelRequest req;
    req.set_model_id(id);
    return stub_->GetModel(Ctx().get(), req, info);
  }
  grpc::Status Delete(const std::string& id, bool delete_checkpoints = false) {
    v1::DeleteModelRequest req;
    req.set_model_id(id);
    req.set_delete_checkpoints(delete_checkpoints);
    v1::DeleteModelResponse resp;
    return stub_->DeleteModel(Ctx().get(), req, &resp);
  }
  grpc::Status Forward(const std::string& id, const v1::Tensor& x, bool train,
                       v1::ForwardResponse* resp = nullptr) {
    v1::ForwardRequest req;
    req.set_model_id(id);
    *req.mutable_input() = x;
    req.set_train(train);
    v1::ForwardResponse local;
    return stub_->Forward(Ctx().get(), req, resp ? resp : &local);
  }
  grpc::Status Backward(const std::string& id, const std::string& pass, const v1::Tensor& g,
                        bool want_grad_input = false) {
    v1::BackwardRequest req;
    req.set_model_id(id);
    req.set_pass_id(pass);
    *req.mutable_grad_output() = g;
    req.set_want_grad_input(want_grad_input);
    v1::BackwardResponse resp;
    return stub_->Backward(Ctx().get(), req, &resp);
  }
  grpc::Status Update(const std::string& id, int64_t expected,
                      v1::UpdateCorrelationResponse* resp = nullptr) {
    v1::UpdateCorrelationRequest req;
    req.set_model_id(id);
    req.set_expected_step(expected);
    v1::UpdateCorrelationResponse local;
    return stub_->UpdateCorrelation(Ctx().get(), req, resp ? resp : &local);
  }
  v1::TrainStepRequest TrainReq(const std::string& id, int64_t step, float seed = 0.5f) {
    v1::TrainStepRequest req;
    req.set_model_id(id);
    *req.mutable_input() = Floats({4, 12}, seed);
    *req.mutable_target() = Longs({0, 1, 2, 4});
    req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
    req.set_expected_step(step);
    return req;
  }
  grpc::Status TrainStep(const v1::TrainStepRequest& req, v1::TrainStepResponse* resp = nullptr) {
    v1::TrainStepResponse local;
    return stub_->TrainStep(Ctx().get(), req, resp ? resp : &local);
  }
  grpc::Status Save(const std::string& id) {
    v1::SaveCheckpointRequest req;
    req.set_model_id(id);
    v1::CheckpointInfo info;
    return stub_->SaveCheckpoint(Ctx().get(), req, &info);
  }
  grpc::Status ListCheckpoints(const std::string& id, v1::ListCheckpointsResponse* resp) {
    v1::ListCheckpointsRequest req;
    req.set_model_id(id);
    return stub_->ListCheckpoints(Ctx().get(), req, resp);
  }
  grpc::Status Restore(const std::string& id, const std::string& name,
                       const std::string& device = "", int compute = 0) {
    v1::RestoreCheckpointRequest req;
    req.set_model_id(id);
    req.set_name(name);
    req.set_device(device);
    req.set_compute(static_cast<v1::ComputeType>(compute));
    v1::ModelInfo info;
    return stub_->RestoreCheckpoint(Ctx().get(), req, &info);
  }
  grpc::Status Export(const std::string& id, std::string* bytes) {
    v1::ExportStateRequest req;
    req.set_model_id(id);
    auto ctx = Ctx();
    auto reader = stub_->ExportState(ctx.get(), req);
    v1::StateChunk chunk;
    bytes->clear();
    while (reader->Read(&chunk)) bytes->append(chunk.data());
    return reader->Finish();
  }
  grpc::Status ImportMessages(const std::vector<v1::ImportStateRequest>& messages) {
    auto ctx = Ctx();
    v1::ModelInfo info;
    auto writer = stub_->ImportState(ctx.get(), &info);
    for (const auto& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }
  grpc::Status Import(const v1::ImportHeader& header, const std::string& bytes,
                      size_t chunk = 64 << 10) {
    std::vector<v1::ImportStateRequest> messages(1);
    *messages[0].mutable_header() = header;
    for (size_t off = 0; off < bytes.size(); off += chunk) {
      messages.emplace_back().set_data(bytes.substr(off, chunk));
    }
    return ImportMessages(messages);
  }
  grpc::Status ScaleStats(const std::string& id, bool per_group) {
    v1::GetScaleStatsRequest req;
    req.set_model_id(id);
    req.set_include_per_group(per_group);
    v1::ScaleStats stats;
    return stub_->GetScaleStats(Ctx().get(), req, &stats);
  }

  // Everything a bad input must not change.
  struct Snapshot {
    std::string models;                       // ListModels, serialized
    std::vector<std::string> states;          // ExportState of each model, in ListModels order
    std::vector<std::string> checkpoints;     // ListCheckpoints of each, serialized
    std::vector<std::string> files;           // the checkpoint folder: path and size
    int32_t server_models = 0;                // GetServerInfo.models
  };
  Snapshot Take() {
    Snapshot s;
    v1::ListModelsResponse list;
    EXPECT_TRUE(stub_->ListModels(Ctx().get(), v1::ListModelsRequest(), &list).ok());
    s.models = list.SerializeAsString();
    for (const v1::ModelInfo& m : list.models()) {
      std::string bytes;
      EXPECT_TRUE(Export(m.model_id(), &bytes).ok()) << m.model_id();
      s.states.push_back(bytes);
      v1::ListCheckpointsResponse cps;
      (void)ListCheckpoints(m.model_id(), &cps);
      s.checkpoints.push_back(cps.SerializeAsString());
    }
    for (const std::string& model_dir : testing::ListDir(dir_.path())) {
      const std::string path = dir_.path() + "/" + model_dir;
      s.files.push_back(model_dir);
      for (const std::string& f : testing::ListDir(path)) {
        s.files.push_back(absl::StrCat(model_dir, "/", f, " ", testing::FileSize(path + "/" + f)));
      }
    }
    v1::ServerInfo info;
    EXPECT_TRUE(stub_->GetServerInfo(Ctx().get(), v1::GetServerInfoRequest(), &info).ok());
    s.server_models = info.models();
    return s;
  }

  testing::TempDir dir_;
  std::unique_ptr<service::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TernaryTrainer::Stub> stub_;
};

TEST_F(BadInputTest, EveryRpcRefusesBadInputAndChangesNothing) {
  // ------------------------------------------------------------ the world the battery meets
  // "m": trained two steps (the last by TrainStep), checkpointed at step 1 and 2, holding one
  // pending pass P of the current step. "n": a second model with a pending pass whose Backward
  // ran (so UpdateCorrelation at its step would apply). "d": its only checkpoint damaged. "gone":
  // deleted, its checkpoint back on disk. "many": 80000 scale groups; "wide": 4096 outputs.
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  {
    v1::ForwardResponse f;
    ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
    ASSERT_TRUE(Backward("m", f.pass_id(), Floats({3, 5})).ok());
    ASSERT_TRUE(Update("m", 0).ok());
  }
  ASSERT_TRUE(Save("m").ok());
  // A pass released by the next update, and one already used.
  v1::ForwardResponse released;
  ASSERT_TRUE(Forward("m", Floats({2, 12}), true, &released).ok());
  const v1::TrainStepRequest last_train = TrainReq("m", 1);
  ASSERT_TRUE(TrainStep(last_train).ok());
  ASSERT_TRUE(Save("m").ok());
  v1::ForwardResponse used, pending;
  ASSERT_TRUE(Forward("m", Floats({2, 12}, 1.5f), true, &used).ok());
  ASSERT_TRUE(Backward("m", used.pass_id(), Floats({2, 5})).ok());
  // The Backward above makes an update at step 2 possible; a TrainStep at step 2 would apply too:
  // the battery must leave both so. P is the pending pass every grad_output case aims at.
  ASSERT_TRUE(Forward("m", Floats({3, 12}, 2.5f), true, &pending).ok());
  const std::string P = pending.pass_id();
  const int64_t kStep = 2;

  ASSERT_TRUE(Create("n", MlpSpec(), 4).ok());
  v1::ForwardResponse n_pass;
  ASSERT_TRUE(Forward("n", Floats({2, 12}), true, &n_pass).ok());

  ASSERT_TRUE(Create("d", LinearSpec(8, 4), 5).ok());
  ASSERT_TRUE(Save("d").ok());
  {
    const std::string path = dir_.path() + "/d/step-00000000.safetensors";
    FILE* f = fopen(path.c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    fseek(f, -3, SEEK_END);
    const int c = fgetc(f);
    fseek(f, -3, SEEK_END);
    fputc(c ^ 0x40, f);
    fclose(f);
  }
  ASSERT_TRUE(Create("gone", LinearSpec(8, 4), 6).ok());
  ASSERT_TRUE(Save("gone").ok());
  ASSERT_TRUE(Delete("gone").ok());
  {
    // Deleting moved its folder to the trash of deleted models; moved back by hand, its
    // checkpoint is on disk with no model loaded.
    const std::vector<std::string> trash = testing::ListDir(dir_.path() + "/.deleted");
    ASSERT_EQ(trash.size(), 1u);
    ASSERT_EQ(std::rename((dir_.path() + "/.deleted/" + trash[0]).c_str(),
                          (dir_.path() + "/gone").c_str()),
              0);
  }
  ASSERT_TRUE(Create("many", LinearSpec(2, 40000, 1), 7).ok());
  ASSERT_TRUE(Create("wide", LinearSpec(4, 4096), 8).ok());

  std::string good;  // m's state file
  ASSERT_TRUE(Export("m", &good).ok());
  const StFile split = Split(good);
  // A failed import must leave the model it would replace intact. ("m" has checkpoints on disk,
  // which refuse any import into its id; "n" has none, so every check of the file is reached.)
  v1::ImportHeader replace_n;
  replace_n.set_model_id("n");
  replace_n.set_replace(true);

  const Snapshot before = Take();

  // ------------------------------------------------------------ the cases
  std::vector<Case> cases;
  auto add = [&](std::string name, Code code, std::string field,
                 std::function<grpc::Status()> call) {
    cases.push_back({std::move(name), std::move(call), code, std::move(field)});
  };

  // Model ids, on every RPC that takes one.
  const std::vector<std::string> bad_ids = {
      "", std::string(65, 'a'), "a/b", "..", ".", ".hidden", "a b", "a\\b", "x\n", "caf\xc3\xa9",
      "a:b", "*", "m\t", std::string(100000, 'x')};
  for (const std::string& id : bad_ids) {
    const std::string tag = absl::StrCat("model_id '", id.substr(0, 12), "' (", id.size(), ")");
    add("CreateModel " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Create(id, MlpSpec()); });
    add("GetModel " + tag, Code::INVALID_ARGUMENT, "model_id", [=] {
      v1::ModelInfo info;
      return GetModel(id, &info);
    });
    add("DeleteModel " + tag, Code::INVALID_ARGUMENT, "model_id", [=] { return Delete(id); });
    add("DeleteModel+checkpoints " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Delete(id, true); });
    add("Forward " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Forward(id, Floats({2, 12}), true); });
    add("Backward " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Backward(id, P, Floats({3, 5})); });
    add("UpdateCorrelation " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Update(id, kStep); });
    add("TrainStep " + tag, Code::INVALID_ARGUMENT, "model_id", [=] {
      v1::TrainStepRequest req = TrainReq("m", kStep);
      req.set_model_id(id);
      return TrainStep(req);
    });
    add("SaveCheckpoint " + tag, Code::INVALID_ARGUMENT, "model_id", [=] { return Save(id); });
    add("ListCheckpoints " + tag, Code::INVALID_ARGUMENT, "model_id", [=] {
      v1::ListCheckpointsResponse resp;
      return ListCheckpoints(id, &resp);
    });
    add("RestoreCheckpoint " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return Restore(id, ""); });
    add("ExportState " + tag, Code::INVALID_ARGUMENT, "model_id", [=] {
      std::string bytes;
      return Export(id, &bytes);
    });
    add("ImportState " + tag, Code::INVALID_ARGUMENT, "header.model_id", [=] {
      v1::ImportHeader header;
      header.set_model_id(id);
      header.set_replace(true);
      return Import(header, good);
    });
    add("GetScaleStats " + tag, Code::INVALID_ARGUMENT, "model_id",
        [=] { return ScaleStats(id, true); });
  }
  // Well-formed ids of no model.
  add("GetModel unknown", Code::NOT_FOUND, "model_id", [=] {
    v1::ModelInfo info;
    return GetModel("nope", &info);
  });
  add("DeleteModel unknown", Code::NOT_FOUND, "'nope'", [=] { return Delete("nope"); });
  add("DeleteModel+checkpoints unknown", Code::NOT_FOUND, "model_id",
      [=] { return Delete("nope", true); });
  add("Forward unknown", Code::NOT_FOUND, "model_id",
      [=] { return Forward("nope", Floats({2, 12}), true); });
  add("Backward unknown", Code::NOT_FOUND, "model_id",
      [=] { return Backward("nope", P, Floats({3, 5})); });
  add("UpdateCorrelation unknown", Code::NOT_FOUND, "model_id", [=] { return Update("nope", 0); });
  add("TrainStep unknown", Code::NOT_FOUND, "model_id", [=] {
    return TrainStep(TrainReq("nope", 0));
  });
  add("SaveCheckpoint unknown", Code::NOT_FOUND, "'nope'", [=] { return Save("nope"); });
  add("ListCheckpoints unknown", Code::NOT_FOUND, "'nope'", [=] {
    v1::ListCheckpointsResponse resp;
    return ListCheckpoints("nope", &resp);
  });
  add("RestoreCheckpoint unknown", Code::NOT_FOUND, "'nope'", [=] { return Restore("nope", ""); });
  add("ExportState unknown", Code::NOT_FOUND, "model_id", [=] {
    std::string bytes;
    return Export("nope", &bytes);
  });
  add("GetScaleStats unknown", Code::NOT_FOUND, "model_id", [=] { return ScaleStats("nope", false); });
  // Ids that are taken, or held by checkpoints on disk.
  add("CreateModel taken", Code::ALREADY_EXISTS, "model_id", [=] { return Create("m", MlpSpec()); });
  add("CreateModel checkpointed id", Code::FAILED_PRECONDITION, "model_id",
      [=] { return Create("gone", LinearSpec(8, 4)); });
  add("ImportState taken without replace", Code::ALREADY_EXISTS, "model_id", [=] {
    v1::ImportHeader header;
    header.set_model_id("n");
    return Import(header, good);
  });
  add("ImportState checkpointed id", Code::FAILED_PRECONDITION, "model_id", [=] {
    v1::ImportHeader header;
    header.set_model_id("gone");
    return Import(header, good);
  });

  // Specs (CreateModel's and ImportState's header.spec).
  std::vector<std::pair<std::string, std::pair<v1::ModelSpec, std::string>>> bad_specs;
  auto spec_case = [&](std::string name, std::string field,
                       const std::function<void(v1::ModelSpec&)>& edit) {
    v1::ModelSpec spec = MlpSpec();
    edit(spec);
    bad_specs.push_back({std::move(name), {spec, std::move(field)}});
  };
  auto fc1 = [](v1::ModelSpec& s) { return s.mutable_layers(0)->mutable_ternary_linear(); };
  spec_case("no layers", "layers", [](v1::ModelSpec& s) { s.clear_layers(); });
  spec_case("no kind", "layers[1] (act)",
            [](v1::ModelSpec& s) { s.mutable_layers(1)->clear_activation(); });
  spec_case("empty name", "layers[0].name", [](v1::ModelSpec& s) { s.mutable_layers(0)->set_name(""); });
  spec_case("dotted name", "layers[0].name",
            [](v1::ModelSpec& s) { s.mutable_layers(0)->set_name("a.b"); });
  spec_case("long name", "layers[0].name",
            [](v1::ModelSpec& s) { s.mutable_layers(0)->set_name(std::string(65, 'n')); });
  spec_case("duplicate name", "layers[1].name",
            [](v1::ModelSpec& s) { s.mutable_layers(1)->set_name("fc1"); });
  spec_case("in_features 0", "fc1).ternary_linear.in_features",
            [&](v1::ModelSpec& s) { fc1(s)->set_in_features(0); });
  spec_case("in_features -1", "fc1).ternary_linear.in_features",
            [&](v1::ModelSpec& s) { fc1(s)->set_in_features(-1); });
  spec_case("in_features int64 max", "fc1).ternary_linear.in_features",
            [&](v1::ModelSpec& s) { fc1(s)->set_in_features(kInt64Max); });
  spec_case("out_features 0", "fc1).ternary_linear.out_features",
            [&](v1::ModelSpec& s) { fc1(s)->set_out_features(0); });
  spec_case("out_features int64 min", "fc1).ternary_linear.out_features",
            [&](v1::ModelSpec& s) { fc1(s)->set_out_features(kInt64Min); });
  spec_case("group_size -1", "fc1).ternary_linear.group_size",
            [&](v1::ModelSpec& s) { fc1(s)->set_group_size(-1); });
  spec_case("group_size huge", "fc1).ternary_linear.group_size",
            [&](v1::ModelSpec& s) { fc1(s)->set_group_size(1 << 30); });
  spec_case("threshold NaN", "fc1).ternary_linear.threshold",
            [&](v1::ModelSpec& s) { fc1(s)->set_threshold(std::nanf("")); });
  spec_case("threshold Inf", "fc1).ternary_linear.threshold",
            [&](v1::ModelSpec& s) { fc1(s)->set_threshold(INFINITY); });
  spec_case("threshold negative", "fc1).ternary_linear.threshold",
            [&](v1::ModelSpec& s) { fc1(s)->set_threshold(-0.5f); });
  spec_case("chain mismatch", "layers[4] (fc2).ternary_linear.in_features",
            [](v1::ModelSpec& s) { s.mutable_layers(4)->mutable_ternary_linear()->set_in_features(15); });
  spec_case("rms dim 0", "ternary_rms_norm.dim",
            [](v1::ModelSpec& s) { s.mutable_layers(3)->mutable_ternary_rms_norm()->set_dim(0); });
  spec_case("rms dim mismatch", "ternary_rms_norm.dim",
            [](v1::ModelSpec& s) { s.mutable_layers(3)->mutable_ternary_rms_norm()->set_dim(17); });
  spec_case("activation kind 9", "activation.kind", [](v1::ModelSpec& s) {
    s.mutable_layers(1)->mutable_activation()->set_kind(static_cast<v1::Activation::Kind>(9));
  });
  spec_case("activation kind -1", "activation.kind", [](v1::ModelSpec& s) {
    s.mutable_layers(1)->mutable_activation()->set_kind(static_cast<v1::Activation::Kind>(-1));
  });
  spec_case("activation unspecified", "activation.kind", [](v1::ModelSpec& s) {
    s.mutable_layers(1)->mutable_activation()->set_kind(v1::Activation::KIND_UNSPECIFIED);
  });
  spec_case("activation first", "layers[0] (act)", [](v1::ModelSpec& s) {
    s.mutable_layers()->SwapElements(0, 1);
  });
  spec_case("empty residual", "residual.layers", [](v1::ModelSpec& s) {
    s.mutable_layers(2)->mutable_residual()->clear_layers();
  });
  spec_case("residual changes width", "layers[2] (block).residual", [](v1::ModelSpec& s) {
    s.mutable_layers(2)->mutable_residual()->mutable_layers(0)->mutable_ternary_linear()
        ->set_out_features(8);
    s.mutable_layers(3)->mutable_ternary_rms_norm()->set_dim(8);
    s.mutable_layers(4)->mutable_ternary_linear()->set_in_features(8);
  });
  spec_case("residual nested too deep", "residual", [](v1::ModelSpec& s) {
    v1::Layer* at = s.mutable_layers(2);
    for (int i = 0; i < 40; ++i) {
      v1::Layer* inner = at->mutable_residual()->add_layers();
      inner->set_name(absl::StrCat("r", i));
      at = inner;
    }
    at->set_name("leaf");
    at->mutable_activation()->set_kind(v1::Activation::RELU);
  });
  spec_case("too many weights", "weights", [&](v1::ModelSpec& s) {
    s = LinearSpec(int64_t{1} << 21, int64_t{1} << 20);
  });
  for (const auto& [name, spec_field] : bad_specs) {
    const v1::ModelSpec spec = spec_field.first;
    const std::string field = spec_field.second;
    add("CreateModel spec " + name, Code::INVALID_ARGUMENT, field,
        [=] { return Create("fresh", spec); });
    add("ImportState header.spec " + name, Code::INVALID_ARGUMENT, field, [=] {
      v1::ImportHeader header = replace_n;
      *header.mutable_spec() = spec;
      return Import(header, good);
    });
  }
  add("CreateModel device", Code::INVALID_ARGUMENT, "device",
      [=] { return Create("fresh", MlpSpec(), 1, "tpu:0"); });
  add("CreateModel device cuda:-1", Code::INVALID_ARGUMENT, "cuda:-1",
      [=] { return Create("fresh", MlpSpec(), 1, "cuda:-1"); });
  add("CreateModel compute 42", Code::INVALID_ARGUMENT, "compute",
      [=] { return Create("fresh", MlpSpec(), 1, "", 42); });
  add("CreateModel compute -3", Code::INVALID_ARGUMENT, "compute",
      [=] { return Create("fresh", MlpSpec(), 1, "", -3); });
  add("RestoreCheckpoint device", Code::INVALID_ARGUMENT, "device",
      [=] { return Restore("m", "", "abacus"); });
  add("RestoreCheckpoint compute 42", Code::INVALID_ARGUMENT, "compute",
      [=] { return Restore("m", "", "", 42); });
  add("ImportState header.device", Code::INVALID_ARGUMENT, "device", [=] {
    v1::ImportHeader header = replace_n;
    header.set_device("gpu7");
    return Import(header, good);
  });
  add("ImportState header.compute", Code::INVALID_ARGUMENT, "compute", [=] {
    v1::ImportHeader header = replace_n;
    header.set_compute(static_cast<v1::ComputeType>(42));
    return Import(header, good);
  });

  // Tensors: each tensor field of each RPC, at the model's current step, so that a tensor that
  // slipped through would make a pass or apply an update.
  struct TensorCase {
    std::string name;
    v1::Tensor tensor;
    std::string field;  // after the field's own name
  };
  auto tensor_cases = [&](const v1::Tensor& good_tensor) {
    std::vector<int64_t> shape(good_tensor.shape().begin(), good_tensor.shape().end());
    std::vector<TensorCase> out;
    v1::Tensor t = good_tensor;
    t.set_dtype(v1::DATA_TYPE_UNSPECIFIED);
    out.push_back({"dtype unspecified", t, ".dtype"});
    t.set_dtype(static_cast<v1::DataType>(99));
    out.push_back({"dtype 99", t, ".dtype"});
    t.set_dtype(static_cast<v1::DataType>(-7));
    out.push_back({"dtype -7", t, ".dtype"});
    t = good_tensor;
    t.set_dtype(good_tensor.dtype() == v1::FP32 ? v1::INT32 : v1::FP32);
    out.push_back({"wrong dtype same size", t, ".dtype"});
    t.set_dtype(v1::FP16);
    // A float tensor may come as FP16 (docs/wire.md), but not with FP32's bytes.
    out.push_back({"FP16 with another dtype's bytes", t,
                   good_tensor.dtype() == v1::FP32 ? ".data: expected" : ".dtype"});
    t.set_dtype(v1::INT8);
    out.push_back({"wrong dtype INT8", t, ".dtype"});
    out.push_back({"empty tensor", v1::Tensor(), ".dtype"});
    t = good_tensor;
    t.mutable_data()->pop_back();
    out.push_back({"one byte short", t, ".data: expected"});
    t = good_tensor;
    t.mutable_data()->append(8, '\0');
    out.push_back({"bytes too many", t, ".data: expected"});
    t = good_tensor;
    t.clear_data();
    out.push_back({"no data", t, ".data: expected"});
    out.push_back({"negative dim", WithShape(good_tensor, {-shape[0], shape.back()}), ".shape[0]"});
    out.push_back({"int64 min dim", WithShape(good_tensor, {kInt64Min, 1}), ".shape[0]"});
    out.push_back({"dims overflow int64", WithShape(good_tensor, {int64_t{1} << 40, int64_t{1} << 40}),
                   ".shape"});
    out.push_back({"dims overflow bytes", WithShape(good_tensor, {kInt64Max / 2, 3}), ".shape"});
    out.push_back({"nine dims", WithShape(good_tensor, {1, 1, 1, 1, 1, 1, 1, 1, 1}), ".shape"});
    // Zero elements beside a huge dimension: the byte count is 0, the sizes are not.
    t = good_tensor;
    t.clear_data();
    out.push_back({"huge dim times zero", WithShape(t, {int64_t{1} << 62, 0}), ""});
    out.push_back({"zero times huge dim", WithShape(t, {0, int64_t{1} << 62}), ""});
    out.push_back({"zero rows", WithShape(t, {0, shape.back()}), ""});
    return out;
  };
  auto float_cases = [&](const v1::Tensor& good_tensor) {
    std::vector<int64_t> shape(good_tensor.shape().begin(), good_tensor.shape().end());
    std::vector<TensorCase> out = tensor_cases(good_tensor);
    const int64_t rows = shape[0], cols = shape[1];
    out.push_back({"rank 1", Floats({rows * cols}), ""});
    out.push_back({"rank 3", Floats({rows, 1, cols}), ""});
    v1::Tensor scalar = Floats({1});
    scalar.clear_shape();
    out.push_back({"rank 0", scalar, ""});
    out.push_back({"transposed", Floats({cols, rows}), ""});
    out.push_back({"one column more", Floats({rows, cols + 1}), ""});
    out.push_back({"NaN", WithFloat(good_tensor, 1, std::nanf("")), "finite"});
    out.push_back({"+Inf", WithFloat(good_tensor, 2, INFINITY), "finite"});
    out.push_back({"-Inf", WithFloat(good_tensor, 0, -INFINITY), "finite"});
    out.push_back({"FLT_MAX overflows", WithFloat(WithFloat(good_tensor, 0, 3e38f), 1, 3e38f), ""});
    return out;
  };

  for (const TensorCase& c : float_cases(Floats({3, 12}))) {
    // Large finite values make a valid Forward (they are not a bad input there).
    if (c.name == "FLT_MAX overflows") continue;
    const std::string field = c.field.empty() || c.field == "finite" ? "input" : "input" + c.field;
    add("Forward(train).input " + c.name, Code::INVALID_ARGUMENT, field,
        [=] { return Forward("m", c.tensor, true); });
    if (c.field != "finite") {  // inference of non-finite values is allowed (no state at stake)
      add("Forward.input " + c.name, Code::INVALID_ARGUMENT, field,
          [=] { return Forward("m", c.tensor, false); });
    }
  }
  // TrainStep's input: [4, 12], the target's batch.
  for (const TensorCase& c : float_cases(Floats({4, 12}))) {
    if (c.name == "FLT_MAX overflows") continue;
    const std::string field = c.field.empty() || c.field == "finite" ? "input" : "input" + c.field;
    add("TrainStep.input " + c.name, Code::INVALID_ARGUMENT, field, [=] {
      v1::TrainStepRequest req = TrainReq("m", kStep);
      *req.mutable_input() = c.tensor;
      return TrainStep(req);
    });
  }
  for (const TensorCase& c : float_cases(Floats({3, 5}))) {
    if (c.name == "FLT_MAX overflows") continue;
    const std::string field =
        c.field.empty() || c.field == "finite" ? "grad_output" : "grad_output" + c.field;
    for (bool want : {false, true}) {
      add(absl::StrCat("Backward.grad_output ", c.name, want ? " (grad_input)" : ""),
          Code::INVALID_ARGUMENT, field, [=] { return Backward("m", P, c.tensor, want); });
    }
  }
  {
    // MSE target: FP32 [4, 5].
    v1::TrainStepRequest mse = TrainReq("m", kStep);
    mse.set_loss(v1::TrainStepRequest::MSE);
    *mse.mutable_target() = Floats({4, 5});
    for (const TensorCase& c : float_cases(Floats({4, 5}))) {
      // Values whose squared error overflows: the loss is not finite, nothing applies.
      const std::string field = c.name == "FLT_MAX overflows" ? "loss"
                                : c.field.empty() || c.field == "finite" ? "target"
                                                                         : "target" + c.field;
      add("TrainStep(MSE).target " + c.name, Code::INVALID_ARGUMENT, field, [=] {
        v1::TrainStepRequest req = mse;
        *req.mutable_target() = c.tensor;
        return TrainStep(req);
      });
    }
    // Cross entropy: INT64 [4] class indices in [0, 5).
    std::vector<TensorCase> ce = tensor_cases(Longs({0, 1, 2, 3}));
    ce.push_back({"class 5", Longs({0, 1, 5, 3}), ""});
    ce.push_back({"class -1", Longs({0, -1, 2, 3}), ""});
    ce.push_back({"class int64 max", Longs({0, kInt64Max, 2, 3}), ""});
    ce.push_back({"class int64 min", Longs({kInt64Min, 1, 2, 3}), ""});
    ce.push_back({"batch 3", Longs({0, 1, 2}), ""});
    ce.push_back({"batch 5", Longs({0, 1, 2, 3, 4}), ""});
    v1::Tensor two_d = Longs({0, 1, 2, 3});
    two_d = WithShape(two_d, {4, 1});
    ce.push_back({"rank 2", two_d, ""});
    ce.push_back({"one-hot FP32", Floats({4, 5}), ".dtype"});
    for (const TensorCase& c : ce) {
      const std::string field = c.field.empty() ? "target" : "target" + c.field;
      add("TrainStep(CE).target " + c.name, Code::INVALID_ARGUMENT, field, [=] {
        v1::TrainStepRequest req = TrainReq("m", kStep);
        *req.mutable_target() = c.tensor;
        return TrainStep(req);
      });
    }
  }
  for (int loss : {0, 3, -1, 1000}) {
    add(absl::StrCat("TrainStep.loss ", loss), Code::INVALID_ARGUMENT, "loss", [=] {
      v1::TrainStepRequest req = TrainReq("m", kStep);
      req.set_loss(static_cast<v1::TrainStepRequest::Loss>(loss));
      return TrainStep(req);
    });
  }

  // Passes: stale, used, foreign, forged.
  std::string nonce = P.substr(0, P.find('-'));
  add("Backward released pass", Code::FAILED_PRECONDITION, "pass_id",
      [=] { return Backward("m", released.pass_id(), Floats({2, 5})); });
  add("Backward used pass", Code::FAILED_PRECONDITION, "pass_id",
      [=] { return Backward("m", used.pass_id(), Floats({2, 5})); });
  add("Backward another model's pass", Code::NOT_FOUND, "pass_id",
      [=] { return Backward("m", n_pass.pass_id(), Floats({2, 5})); });
  add("Backward pass of m on n", Code::NOT_FOUND, "pass_id",
      [=] { return Backward("n", P, Floats({3, 5})); });
  for (const std::string& forged :
       {std::string(), std::string("x"), nonce + "-9-0", nonce + "-2-999", nonce + "--1-0",
        nonce + "-99999999999999999999-0", std::string("--"), std::string(4000, '-'),
        std::string("\x01\x02", 2)}) {
    add("Backward forged pass '" + forged.substr(0, 24) + "'", Code::NOT_FOUND, "pass_id",
        [=] { return Backward("m", forged, Floats({3, 5})); });
  }
  // The pass's own shape is the only one Backward accepts.
  add("Backward grad_output of another batch", Code::INVALID_ARGUMENT, "grad_output",
      [=] { return Backward("m", P, Floats({2, 5})); });

  // Expected steps. (step - 1 is the retry of the last update: replayed, checked below.)
  for (int64_t step : {kStep + 1, kStep + 100, int64_t{-1}, kInt64Min, kInt64Max}) {
    add(absl::StrCat("UpdateCorrelation expected_step ", step), Code::FAILED_PRECONDITION,
        "expected_step", [=] { return Update("m", step); });
    add(absl::StrCat("TrainStep expected_step ", step), Code::FAILED_PRECONDITION,
        "expected_step", [=] { return TrainStep(TrainReq("m", step)); });
  }
  add("TrainStep retry of step 1 with other data", Code::FAILED_PRECONDITION, "expected_step",
      [=] { return TrainStep(TrainReq("m", kStep - 1, 9.0f)); });
  add("TrainStep retry of step 1 with another loss", Code::FAILED_PRECONDITION, "expected_step",
      [=] {
        v1::TrainStepRequest req = last_train;
        req.set_loss(v1::TrainStepRequest::MSE);
        *req.mutable_target() = Floats({4, 5});
        return TrainStep(req);
      });
  add("UpdateCorrelation without Backward", Code::FAILED_PRECONDITION, "Backward",
      [=] { return Update("n", 0); });
  add("UpdateCorrelation expected_step 1 on n", Code::FAILED_PRECONDITION, "expected_step",
      [=] { return Update("n", 1); });

  // Checkpoint names.
  // (The store also takes a step's name in other digits or with the file's suffix: "step-1" and
  // "step-00000001.safetensors" name step-00000001, and are no bad input.)
  for (const std::string& name :
       {std::string("../../etc/passwd"), std::string("step-"), std::string("step-0000000x"),
        std::string("step--1"), std::string("step-1234567890123456789"), std::string("/abs"),
        std::string(".step-00000001"), std::string("step-00000001.tmp"), std::string(300, 's'),
        std::string("step-00000001\n")}) {
    add("RestoreCheckpoint name '" + name.substr(0, 24) + "'", Code::INVALID_ARGUMENT, "name",
        [=] { return Restore("m", name); });
  }
  add("RestoreCheckpoint missing name", Code::NOT_FOUND, "step-00000009",
      [=] { return Restore("m", "step-00000009"); });
  add("RestoreCheckpoint no checkpoints", Code::NOT_FOUND, "'n'", [=] { return Restore("n", ""); });
  add("RestoreCheckpoint damaged", Code::DATA_LOSS, "step-00000000",
      [=] { return Restore("d", "step-00000000"); });
  add("RestoreCheckpoint only damaged", Code::DATA_LOSS, "step-00000000",
      [=] { return Restore("d", ""); });

  // ImportState streams.
  add("ImportState no message", Code::INVALID_ARGUMENT, "header", [=] { return ImportMessages({}); });
  add("ImportState header only", Code::INVALID_ARGUMENT, "data", [=] {
    return Import(replace_n, "");
  });
  add("ImportState data first", Code::INVALID_ARGUMENT, "header", [=] {
    std::vector<v1::ImportStateRequest> messages(2);
    messages[0].set_data(good);
    *messages[1].mutable_header() = replace_n;
    return ImportMessages(messages);
  });
  add("ImportState header between data", Code::INVALID_ARGUMENT, "ImportStateRequest[2]", [=] {
    std::vector<v1::ImportStateRequest> messages(4);
    *messages[0].mutable_header() = replace_n;
    messages[1].set_data(good.substr(0, 100));
    *messages[2].mutable_header() = replace_n;
    messages[3].set_data(good.substr(100));
    return ImportMessages(messages);
  });
  add("ImportState empty header", Code::INVALID_ARGUMENT, "header.model_id", [=] {
    std::vector<v1::ImportStateRequest> messages(2);
    messages[0].mutable_header();
    messages[1].set_data(good);
    return ImportMessages(messages);
  });

  // Corrupt and lying state files, each replacing "n".
  std::vector<std::pair<std::string, std::pair<std::string, std::pair<Code, std::string>>>> files;
  auto file_case = [&](std::string name, std::string bytes, Code code, std::string field) {
    files.push_back({std::move(name), {std::move(bytes), {code, std::move(field)}}});
  };
  auto header_case = [&](std::string name, const std::function<void(Json&)>& edit,
                         std::string field, Code code = Code::INVALID_ARGUMENT) {
    StFile f = split;
    edit(f.header);
    file_case(std::move(name), Join(f), code, std::move(field));
  };
  const uint64_t header_len = good.size() - 8 - split.data.size();
  file_case("4 bytes", good.substr(0, 4), Code::INVALID_ARGUMENT, "header length");
  file_case("length prefix only", good.substr(0, 8), Code::INVALID_ARGUMENT, "header length");
  file_case("header length past the end", Le64(good.size()) + good.substr(8),
            Code::INVALID_ARGUMENT, "header length");
  file_case("header length one past", Le64(good.size() - 8 + 1) + good.substr(8),
            Code::INVALID_ARGUMENT, "header length");
  file_case("header length 2^63", Le64(uint64_t{1} << 63) + good.substr(8),
            Code::INVALID_ARGUMENT, "header length");
  file_case("header length 2^64-1", Le64(~uint64_t{0}) + good.substr(8), Code::INVALID_ARGUMENT,
            "header length");
  file_case("header length 0", Le64(0) + good.substr(8), Code::INVALID_ARGUMENT, "header");
  file_case("header length short by 1", Le64(header_len - 1) + good.substr(8),
            Code::INVALID_ARGUMENT, "header");
  file_case("header length into the data", Le64(header_len + 8) + good.substr(8),
            Code::INVALID_ARGUMENT, "header");
  file_case("header not JSON", Join("{{{{ not json", split.data), Code::INVALID_ARGUMENT,
            "safetensors header");
  file_case("header JSON array", Join("[1, 2, 3]", split.data), Code::INVALID_ARGUMENT,
            "safetensors header");
  file_case("header JSON string", Join("\"x\"", split.data), Code::INVALID_ARGUMENT,
            "safetensors header");
  file_case("header with NUL", Join(std::string("{\"a\0\":1}", 9), split.data),
            Code::INVALID_ARGUMENT, "safetensors header");
  file_case("header nested deeply", Join(std::string(5000, '[') + std::string(5000, ']'), split.data),
            Code::INVALID_ARGUMENT, "safetensors header");
  {
    // Duplicate keys: the same tensor twice in the header text.
    std::string text = split.header.dump();
    const std::string entry = "\"fc2.E\":" + split.header["fc2.E"].dump();
    text.insert(1, entry + ",");
    file_case("duplicate tensor key", Join(text, split.data), Code::INVALID_ARGUMENT, "fc2.E");
  }
  file_case("truncated data", good.substr(0, good.size() - 5), Code::INVALID_ARGUMENT,
            "safetensors header");
  file_case("trailing bytes", good + std::string(8, '\0'), Code::INVALID_ARGUMENT,
            "safetensors header");
  header_case("offsets past the end",
              [&](Json& h) {
                h["fc2.corr_accum"]["data_offsets"][1] = split.data.size() + 8;
              },
              "fc2.corr_accum");
  header_case("offsets reversed",
              [&](Json& h) {
                auto& o = h["fc2.corr_accum"]["data_offsets"];
                Json b = o[0];
                o[0] = o[1];
                o[1] = b;
              },
              "fc2.corr_accum");
  header_case("offsets overlapping",
              [&](Json& h) { h["fc1.corr_accum"]["data_offsets"] = h["fc1.E"]["data_offsets"]; },
              "fc1");
  header_case("offsets negative",
              [&](Json& h) { h["fc2.E"]["data_offsets"][0] = -8; }, "fc2.E");
  header_case("offsets huge",
              [&](Json& h) { h["fc2.E"]["data_offsets"][1] = ~uint64_t{0}; }, "fc2.E");
  header_case("offsets not numbers",
              [&](Json& h) { h["fc2.E"]["data_offsets"] = {"a", "b"}; }, "fc2.E");
  header_case("dtype lies (I64 as I32)", [&](Json& h) { h["fc1.corr_accum"]["dtype"] = "I32"; },
              "fc1.corr_accum");
  header_case("dtype lies (I8 as I64)", [&](Json& h) { h["fc1.E"]["dtype"] = "I64"; }, "fc1.E");
  header_case("dtype unknown", [&](Json& h) { h["fc1.E"]["dtype"] = "F128"; }, "fc1.E");
  header_case("dtype not a string", [&](Json& h) { h["fc1.E"]["dtype"] = 7; }, "fc1.E");
  header_case("shape lies (doubled)",
              [&](Json& h) {
                auto& s = h["fc1.corr_accum"]["shape"];
                s[0] = s[0].get<int64_t>() * 2;
              },
              "fc1.corr_accum");
  header_case("shape negative", [&](Json& h) { h["fc1.E"]["shape"] = {-32}; }, "fc1.E");
  header_case("shape overflows", [&](Json& h) {
    h["fc1.E"]["shape"] = {uint64_t{1} << 62, uint64_t{1} << 62, 4};
  }, "fc1.E");
  header_case("shape fractional", [&](Json& h) { h["fc1.E"]["shape"] = {31.5}; }, "fc1.E");
  header_case("shape not an array", [&](Json& h) { h["fc1.E"]["shape"] = "32"; }, "fc1.E");
  header_case("missing data_offsets", [&](Json& h) { h["fc1.E"].erase("data_offsets"); }, "fc1.E");
  header_case("unknown entry field", [&](Json& h) { h["fc1.E"]["strides"] = {1}; }, "fc1.E");
  header_case("entry not an object", [&](Json& h) { h["fc1.E"] = 5; }, "fc1.E");
  header_case("metadata not strings", [&](Json& h) { h["__metadata__"]["step"] = 2; },
              "__metadata__");
  header_case("metadata not an object", [&](Json& h) { h["__metadata__"] = {1, 2}; },
              "__metadata__");
  header_case("crc32c lies", [&](Json& h) { h["__metadata__"]["crc32c"] = "00000000"; }, "crc32c",
              Code::DATA_LOSS);
  header_case("crc32c garbage", [&](Json& h) { h["__metadata__"]["crc32c"] = "zz"; }, "crc32c",
              Code::DATA_LOSS);
  header_case("format other", [&](Json& h) { h["__metadata__"]["format"] = "other/9"; }, "format");
  header_case("step negative", [&](Json& h) { h["__metadata__"]["step"] = "-5"; }, "step");
  header_case("step not a number", [&](Json& h) { h["__metadata__"]["step"] = "two"; }, "step");
  header_case("step beyond int64", [&](Json& h) {
    h["__metadata__"]["step"] = "99999999999999999999";
  }, "step");
  header_case("step disagrees with step_counter",
              [&](Json& h) { h["__metadata__"]["step"] = "7"; }, "step_counter");
  header_case("spec not JSON", [&](Json& h) { h["__metadata__"]["spec"] = "{layers: ["; }, "spec");
  header_case("spec invalid", [&](Json& h) {
    h["__metadata__"]["spec"] = R"({"layers":[{"name":"fc1","ternary_linear":{"in_features":-4,"out_features":2}}]})";
  }, "in_features");
  header_case("spec of another model", [&](Json& h) {
    h["__metadata__"]["spec"] = R"({"layers":[{"name":"fc1","ternary_linear":{"in_features":12,"out_features":24}}]})";
  }, "fc1");
  {
    std::string flipped = good;
    flipped[flipped.size() - 9] ^= 0x01;
    file_case("data byte flipped", flipped, Code::DATA_LOSS, "crc32c");
  }
  // Files that parse, with tensors that do not fit the spec.
  using checkpoint::DType;
  auto rebuilt = [&](std::string name, std::string field,
                     std::function<void(std::string&, DType&, std::vector<int64_t>&, std::string&,
                                        bool&)> edit) {
    file_case(std::move(name), Rebuild(good, edit), Code::INVALID_ARGUMENT, std::move(field));
  };
  rebuilt("tensor missing", "fc1.E",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string&, bool& keep) {
            keep = n != "fc1.E";
          });
  rebuilt("E wrong shape", "fc1.E",
          [](std::string& n, DType&, std::vector<int64_t>& s, std::string& d, bool&) {
            if (n == "fc1.E") {
              s = {s[0] - 1};
              d.pop_back();
            }
          });
  rebuilt("E wrong dtype", "fc1.E",
          [](std::string& n, DType& t, std::vector<int64_t>&, std::string&, bool&) {
            if (n == "fc1.E") t = DType::kU8;
          });
  rebuilt("E out of range", "fc1.E",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string& d, bool&) {
            if (n == "fc1.E") d[0] = 100;
          });
  rebuilt("corr_accum as F32", "fc1.corr_accum",
          [](std::string& n, DType& t, std::vector<int64_t>& s, std::string&, bool&) {
            if (n == "fc1.corr_accum") {
              t = DType::kF32;
              s.push_back(2);
            }
          });
  rebuilt("T_packed byte 255", "fc1.T_packed",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string& d, bool&) {
            if (n == "fc1.T_packed") d[3] = static_cast<char>(0xff);
          });
  rebuilt("T_packed one byte short", "fc1.T_packed",
          [](std::string& n, DType&, std::vector<int64_t>& s, std::string& d, bool&) {
            if (n == "fc1.T_packed") {
              s[0] -= 1;
              d.pop_back();
            }
          });
  rebuilt("_T_shape lies", "fc1._T_shape",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string& d, bool&) {
            if (n == "fc1._T_shape") std::swap(d[0], d[8]);
          });
  rebuilt("_T_pad lies", "fc1._T_pad",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string& d, bool&) {
            if (n == "fc1._T_pad") d[0] = 1;  // 12 x 16 trits need a pad of 3
          });
  rebuilt("bias wrong length", "block.up.bias",
          [](std::string& n, DType&, std::vector<int64_t>& s, std::string& d, bool&) {
            if (n == "block.up.bias") {
              s[0] += 1;
              d.append(4, '\0');
            }
          });
  rebuilt("step_counters disagree (no metadata step)", "step_counter",
          [](std::string& n, DType&, std::vector<int64_t>&, std::string& d, bool&) {
            if (n == "fc2.step_counter") d[0] = 9;
          });
  // Over the limits.
  file_case("beyond --max-import-bytes", good + std::string(kMaxImportBytes, ' '),
            Code::RESOURCE_EXHAUSTED, "--max-import-bytes");
  for (const auto& [name, rest] : files) {
    const std::string bytes = rest.first;
    const Code code = rest.second.first;
    const std::string field = rest.second.second;
    add("ImportState file " + name, code, field, [=] { return Import(replace_n, bytes); });
  }
  add("ImportState chunk beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED,
      "--max-message-bytes", [=] {
        return Import(replace_n, good + std::string(kMaxMessageBytes + 1, ' '), kMaxMessageBytes + 1);
      });

  // Oversized messages, in and out.
  const int64_t over_rows = kMaxMessageBytes / (12 * 4) + 16;
  add("Forward request beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED, "--max-message-bytes",
      [=] { return Forward("m", Floats({over_rows, 12}), true); });
  add("Forward request beyond gRPC's limit", Code::RESOURCE_EXHAUSTED, "",
      [=] { return Forward("m", Floats({3 * over_rows, 12}), true); });
  add("TrainStep request beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED,
      "--max-message-bytes", [=] {
        v1::TrainStepRequest req = TrainReq("m", kStep);
        *req.mutable_input() = Floats({over_rows, 12});
        std::vector<int64_t> classes(over_rows, 1);
        *req.mutable_target() = Longs(classes);
        return TrainStep(req);
      });
  add("Backward request beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED,
      "--max-message-bytes", [=] {
        return Backward("m", P, Floats({kMaxMessageBytes / 20 + 16, 5}));
      });
  add("CreateModel spec beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED,
      "--max-message-bytes", [=] {
        v1::ModelSpec spec = LinearSpec(4, 4);
        for (int i = 0; i < 30000; ++i) {
          auto* l = spec.add_layers();
          l->set_name(absl::StrCat("a", i));
          l->mutable_activation()->set_kind(v1::Activation::RELU);
        }
        return Create("huge-spec", spec);
      });
  add("GetModel id beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED, "--max-message-bytes",
      [=] {
        v1::ModelInfo info;
        return GetModel(std::string(kMaxMessageBytes + 10, 'a'), &info);
      });
  add("Forward response beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED, "output",
      [=] { return Forward("wide", Floats({20, 4}), true); });
  add("TrainStep response beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED, "output", [=] {
    v1::TrainStepRequest req;
    req.set_model_id("wide");
    *req.mutable_input() = Floats({20, 4});
    *req.mutable_target() = Longs(std::vector<int64_t>(20, 7));
    req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
    req.set_want_output(true);
    return TrainStep(req);
  });
  add("GetScaleStats per-group response beyond --max-message-bytes", Code::RESOURCE_EXHAUSTED,
      "per-group", [=] { return ScaleStats("many", true); });

  // ------------------------------------------------------------ run
  int passed = 0;
  std::map<std::string, int> per_rpc;  // by the RPC named first in the case
  for (const Case& c : cases) {
    ++per_rpc[c.name.substr(0, c.name.find_first_of(" .(+"))];
    const grpc::Status s = c.call();
    const bool ok = s.error_code() == c.code &&
                    s.error_message().find(c.field) != std::string::npos;
    if (ok) {
      ++passed;
    } else {
      ADD_FAILURE() << c.name << ": expected code " << c.code << " with '" << c.field
                    << "', got " << s.error_code() << ": " << s.error_message();
    }
  }
  // The retries the API answers as replays are no error, and change nothing either.
  {
    v1::UpdateCorrelationResponse u;
    ASSERT_TRUE(Update("m", kStep - 1, &u).ok());
    EXPECT_TRUE(u.replayed());
    EXPECT_EQ(u.step(), kStep);
    v1::TrainStepResponse t;
    ASSERT_TRUE(TrainStep(last_train, &t).ok());
    EXPECT_TRUE(t.replayed());
    EXPECT_EQ(t.step(), kStep);
  }

  // ------------------------------------------------------------ nothing changed, still serving
  client::Client health(channel_);
  auto serving = health.Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_EQ(*serving, client::ServingStatus::kServing);
  const Snapshot after = Take();
  EXPECT_EQ(after.models, before.models) << "ListModels changed";
  ASSERT_EQ(after.states.size(), before.states.size());
  int changed = 0;
  for (size_t i = 0; i < before.states.size(); ++i) {
    if (after.states[i] != before.states[i]) ++changed;
    if (after.checkpoints[i] != before.checkpoints[i]) ++changed;
  }
  EXPECT_EQ(changed, 0) << "exported states or checkpoint lists changed";
  EXPECT_EQ(after.files, before.files) << "the checkpoint folder changed";
  EXPECT_EQ(after.server_models, before.server_models);
  std::cout << "bad inputs tried: " << cases.size() << "; answered with the expected code and "
            << "field: " << passed << "; state changes: "
            << (changed + (after.models != before.models) + (after.files != before.files))
            << "; server SERVING after the battery\nper RPC:";
  for (const auto& [rpc, n] : per_rpc) std::cout << " " << rpc << " " << n;
  std::cout << " (ListModels and GetServerInfo take no input: compared before and after)\n";

  // The pending pass and the gradients summed at this step survived every refusal: they still
  // make the update they would have made.
  ASSERT_TRUE(Backward("m", P, Floats({3, 5}), true).ok());
  v1::UpdateCorrelationResponse u;
  ASSERT_TRUE(Update("m", kStep, &u).ok());
  EXPECT_FALSE(u.replayed());
  EXPECT_EQ(u.step(), kStep + 1);
}

}  // namespace
}  // namespace tscale
