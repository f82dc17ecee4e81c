// The server's limits through a real gRPC server on loopback: the device memory budget
// (--max-device-bytes) and the number of models (--max-models) for CreateModel, ImportState and
// RestoreCheckpoint; pending passes expiring (--pending-pass-ttl-seconds); requests cancelled or
// past their deadline changing nothing; the transport flags. The estimate and the expiry are also
// tested on the core, with a clock of the test's own.
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/checkpoint/state_file.h"
#include "server/core/model.h"
#include "server/core/registry.h"
#include "server/service/convert.h"
#include "server/service/server.h"
#include "server/service/trainer_service.h"
#include "server/service/worker_pool.h"
#include "tests/unit/files.h"
#include "tests/integration/rpc_test_util.h"
#include "tests/unit/test_util.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale {
namespace {

using testing::Floats;
using testing::GrpcIs;
using testing::MlpSpec;

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::tscale::testing::StatusIs;

// ---------------------------------------------------------------- helpers



int64_t Estimate(const v1::ModelSpec& spec) {
  auto core_spec = service::SpecFromProto(spec);
  EXPECT_TRUE(core_spec.ok()) << core_spec.status();
  auto bytes = core::Model::EstimateDeviceBytes(*core_spec);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.value_or(0);
}

// A deadline `after` from now; none when zero.
void SetDeadline(grpc::ClientContext* ctx, absl::Duration after) {
  if (after > absl::ZeroDuration()) ctx->set_deadline(absl::ToChronoTime(absl::Now() + after));
}


class LimitsTest : public ::testing::Test {
 protected:
  void Start(service::ServerOptions options) {
    if (server_) server_->Shutdown(std::chrono::milliseconds(0));
    options.listen = "127.0.0.1:0";
    options.device = testing::TestDeviceName();
    auto server = service::Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = testing::UnlimitedChannel(server_->address());
    stub_ = v1::TernaryTrainer::NewStub(channel_);
  }

  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::seconds(5));
  }

  grpc::Status Create(const std::string& id, const v1::ModelSpec& spec, uint64_t seed = 1) {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_model_id(id);
    *req.mutable_spec() = spec;
    req.set_seed(seed);
    v1::ModelInfo info;
    return stub_->CreateModel(&ctx, req, &info);
  }

  v1::ModelInfo Info(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetModelRequest req;
    req.set_model_id(id);
    v1::ModelInfo info;
    grpc::Status s = stub_->GetModel(&ctx, req, &info);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return info;
  }

  v1::ServerInfo ServerInfo() {
    grpc::ClientContext ctx;
    v1::ServerInfo info;
    grpc::Status s = stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return info;
  }

  int ModelCount() {
    grpc::ClientContext ctx;
    v1::ListModelsResponse list;
    EXPECT_TRUE(stub_->ListModels(&ctx, v1::ListModelsRequest(), &list).ok());
    return list.models_size();
  }

  grpc::Status Delete(const std::string& id) {
    grpc::ClientContext ctx;
    v1::DeleteModelRequest req;
    req.set_model_id(id);
    v1::DeleteModelResponse resp;
    return stub_->DeleteModel(&ctx, req, &resp);
  }

  // `deadline`: none when zero.
  grpc::Status Forward(const std::string& id, const v1::Tensor& x, bool train,
                       v1::ForwardResponse* resp,
                       absl::Duration deadline = absl::ZeroDuration()) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, deadline);
    v1::ForwardRequest req;
    req.set_model_id(id);
    *req.mutable_input() = x;
    req.set_train(train);
    return stub_->Forward(&ctx, req, resp);
  }

  grpc::Status Backward(const std::string& id, const std::string& pass, const v1::Tensor& g) {
    grpc::ClientContext ctx;
    v1::BackwardRequest req;
    req.set_model_id(id);
    req.set_pass_id(pass);
    *req.mutable_grad_output() = g;
    v1::BackwardResponse resp;
    return stub_->Backward(&ctx, req, &resp);
  }

  grpc::Status Update(const std::string& id, int64_t expected, v1::UpdateCorrelationResponse* r,
                      absl::Duration deadline = absl::ZeroDuration(),
                      grpc::ClientContext* given = nullptr) {
    grpc::ClientContext local;
    grpc::ClientContext& ctx = given ? *given : local;
    SetDeadline(&ctx, deadline);
    v1::UpdateCorrelationRequest req;
    req.set_model_id(id);
    req.set_expected_step(expected);
    return stub_->UpdateCorrelation(&ctx, req, r);
  }

  static v1::TrainStepRequest StepRequest(const std::string& id, int64_t batch, int64_t in,
                                          int64_t out, int64_t expected) {
    v1::TrainStepRequest req;
    req.set_model_id(id);
    *req.mutable_input() = Floats({batch, in});
    *req.mutable_target() = Floats({batch, out}, 0.5f);
    req.set_loss(v1::TrainStepRequest::MSE);
    req.set_expected_step(expected);
    return req;
  }

  grpc::Status TrainStep(const v1::TrainStepRequest& req,
                         absl::Duration deadline = absl::ZeroDuration()) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, deadline);
    v1::TrainStepResponse resp;
    return stub_->TrainStep(&ctx, req, &resp);
  }

  grpc::Status TrainStep(const std::string& id, int64_t batch, int64_t in, int64_t out,
                         int64_t expected, absl::Duration deadline = absl::ZeroDuration()) {
    return TrainStep(StepRequest(id, batch, in, out, expected), deadline);
  }

  grpc::Status Export(const std::string& id, std::string* bytes) {
    grpc::ClientContext ctx;
    v1::ExportStateRequest req;
    req.set_model_id(id);
    auto reader = stub_->ExportState(&ctx, req);
    v1::StateChunk chunk;
    bytes->clear();
    while (reader->Read(&chunk)) bytes->append(chunk.data());
    return reader->Finish();
  }

  grpc::Status Import(const std::string& id, const std::string& bytes, bool replace) {
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    auto writer = stub_->ImportState(&ctx, &info);
    v1::ImportStateRequest header;
    header.mutable_header()->set_model_id(id);
    header.mutable_header()->set_replace(replace);
    writer->Write(header);
    for (size_t off = 0; off < bytes.size(); off += 4096) {
      v1::ImportStateRequest data;
      data.set_data(bytes.substr(off, 4096));
      if (!writer->Write(data)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  // The state file ExportState gives.
  std::string State(const std::string& id) {
    std::string bytes;
    grpc::Status s = Export(id, &bytes);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return bytes;
  }
  // Whether the model holds the tensors and step of state file `bytes` (its metadata, which
  // names the model, aside).
  bool Holds(const std::string& id, const std::string& bytes) {
    auto mine = checkpoint::DecodeState(State(id));
    auto theirs = checkpoint::DecodeState(bytes);
    return mine.ok() && theirs.ok() && mine->step == theirs->step &&
           testing::SameState(mine->tensors, theirs->tensors);
  }

  std::unique_ptr<service::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TernaryTrainer::Stub> stub_;
};

// ---------------------------------------------------------------- the estimate (core)

core::ModelSpec CoreSpec(int64_t in = 12, int64_t hidden = 16, int64_t out = 5) {
  return *service::SpecFromProto(MlpSpec(in, hidden, out));
}

at::Tensor Input(int64_t batch, int64_t features) {
  return at::sin(at::arange(batch * features, at::kFloat).view({batch, features}) * 0.37);
}

// The estimate is what the model holds once it trains (decoded state, effective weights,
// gradient sums), and never less than a fresh model holds.
TEST(EstimateTest, MatchesTheBytesOfATrainingModel) {
  for (auto [in, hidden, out] : {std::tuple<int64_t, int64_t, int64_t>{12, 16, 5},
                                 {100, 70, 3},
                                 {64, 256, 10}}) {
    SCOPED_TRACE(absl::StrCat(in, "-", hidden, "-", out));
    const core::ModelSpec spec = CoreSpec(in, hidden, out);
    auto estimate = core::Model::EstimateDeviceBytes(spec);
    ASSERT_TRUE(estimate.ok()) << estimate.status();
    auto model = core::Model::Create(spec, 3, c10::Device(c10::kCPU));
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_GE(*estimate, (*model)->device_bytes());
    auto forward = (*model)->Forward(Input(4, in), /*train=*/true);
    ASSERT_TRUE(forward.ok()) << forward.status();
    ASSERT_TRUE((*model)->Backward(forward->pass_id, at::ones({4, out}), false).ok());
    // No pass pending: all the model holds is what the estimate counts.
    EXPECT_EQ((*model)->pending_bytes(), 0);
    EXPECT_EQ((*model)->device_bytes(), *estimate);
    ASSERT_TRUE((*model)->UpdateCorrelation(0).ok());
    EXPECT_GE(*estimate, (*model)->device_bytes());
  }
  core::ModelSpec bad = CoreSpec();
  std::get<core::TernaryLinearSpec>(bad.layers[0].kind).in_features = -1;
  EXPECT_THAT(core::Model::EstimateDeviceBytes(bad),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("in_features")));
}

// ---------------------------------------------------------------- pass expiry (core)

class ExpiryTest : public ::testing::Test {
 protected:
  std::unique_ptr<core::Model> NewModel(absl::Duration ttl, int64_t max_passes = 1024) {
    core::ModelOptions options;
    options.pending_pass_ttl = ttl;
    options.max_pending_passes = max_passes;
    options.clock = [this] { return now_; };
    auto model = core::Model::Create(CoreSpec(), 1, c10::Device(c10::kCPU), options);
    EXPECT_TRUE(model.ok()) << model.status();
    return *std::move(model);
  }
  absl::Time now_ = absl::FromUnixSeconds(1'000'000);
};

TEST_F(ExpiryTest, UnusedPassesAreReleasedAfterTheTtl) {
  auto model = NewModel(absl::Seconds(10));
  auto first = model->Forward(Input(2, 12), true);
  ASSERT_TRUE(first.ok());
  const int64_t first_bytes = model->pending_bytes();
  auto second = model->Forward(Input(3, 12), true);
  ASSERT_TRUE(second.ok());
  now_ += absl::Seconds(6);
  auto third = model->Forward(Input(2, 12), true);  // as large as the first
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(model->pending_passes(), 3);
  ASSERT_TRUE(model->Backward(second->pass_id, at::ones({3, 5}), false).ok());
  EXPECT_EQ(model->pending_bytes(), 2 * first_bytes);
  // 11 s after the first two: the first (unused) expires; the second was used already.
  now_ += absl::Seconds(5);
  EXPECT_EQ(model->pending_passes(), 1);
  EXPECT_EQ(model->pending_bytes(), first_bytes);
  EXPECT_THAT(model->Backward(first->pass_id, at::ones({2, 5}), false),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr(first->pass_id), HasSubstr("expired"),
                             HasSubstr("within 10 s"), HasSubstr("--pending-pass-ttl-seconds"))));
  // The pass still young works, and the update applies the passes used.
  ASSERT_TRUE(model->Backward(third->pass_id, at::ones({2, 5}), false).ok());
  EXPECT_EQ(model->pending_passes(), 0);
  EXPECT_EQ(model->pending_bytes(), 0);
  auto update = model->UpdateCorrelation(0);
  ASSERT_TRUE(update.ok()) << update.status();
  EXPECT_EQ(update->step, 1);
}

TEST_F(ExpiryTest, ExpiredPassesMakeRoomAndAZeroTtlNeverExpires) {
  auto model = NewModel(absl::Seconds(10), /*max_passes=*/1);
  ASSERT_TRUE(model->Forward(Input(2, 12), true).ok());
  EXPECT_THAT(model->Forward(Input(2, 12), true),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("the limit is 1")));
  now_ += absl::Seconds(10);
  EXPECT_TRUE(model->Forward(Input(2, 12), true).ok());
  EXPECT_EQ(model->pending_passes(), 1);

  auto never = NewModel(absl::ZeroDuration());
  auto pass = never->Forward(Input(2, 12), true);
  ASSERT_TRUE(pass.ok());
  now_ += absl::Hours(24 * 365);
  EXPECT_EQ(never->pending_passes(), 1);
  EXPECT_TRUE(never->Backward(pass->pass_id, at::ones({2, 5}), false).ok());
}

// ---------------------------------------------------------------- interrupts (core)

TEST(InterruptTest, AnInterruptedUpdateChangesNothing) {
  auto model = core::Model::Create(CoreSpec(), 1, c10::Device(c10::kCPU));
  ASSERT_TRUE(model.ok());
  auto pass = (*model)->Forward(Input(2, 12), true);
  ASSERT_TRUE(pass.ok());
  ASSERT_TRUE((*model)->Backward(pass->pass_id, at::ones({2, 5}), false).ok());
  const core::StateSnapshot before = (*model)->ExportState();
  auto cancelled = [] { return absl::CancelledError("cancelled"); };
  EXPECT_THAT((*model)->UpdateCorrelation(0, cancelled),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
  EXPECT_THAT((*model)->TrainStep(Input(2, 12), at::zeros({2, 5}), core::Loss::kMse, 0, cancelled),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
  EXPECT_EQ((*model)->step(), 0);
  EXPECT_TRUE(testing::SameState(before.tensors, (*model)->ExportState().tensors));
  // The gradient sum of the Backward is still there: the update applies it now, not a replay.
  auto update = (*model)->UpdateCorrelation(0, [] { return absl::OkStatus(); });
  ASSERT_TRUE(update.ok()) << update.status();
  EXPECT_FALSE(update->replayed);
  EXPECT_EQ(update->step, 1);
}

// ---------------------------------------------------------------- the device budget

TEST_F(LimitsTest, CreateBeyondTheBudgetIsResourceExhausted) {
  const int64_t e = Estimate(MlpSpec());
  service::ServerOptions options;
  options.max_device_bytes = 2 * e + e / 2;  // room for two
  Start(options);
  ASSERT_TRUE(Create("a", MlpSpec()).ok());
  ASSERT_TRUE(Create("b", MlpSpec()).ok());
  EXPECT_THAT(Create("c", MlpSpec()),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr(absl::StrCat("model 'c' needs ", e, " bytes")),
                           HasSubstr(absl::StrCat("the models hold ", 2 * e, " bytes")),
                           HasSubstr(absl::StrCat("the budget is ", options.max_device_bytes)),
                           HasSubstr("--max-device-bytes"))));
  EXPECT_EQ(ModelCount(), 2);
  v1::ServerInfo info = ServerInfo();
  EXPECT_EQ(info.max_device_bytes(), options.max_device_bytes);
  EXPECT_EQ(info.device_bytes_in_use(), 2 * e);
  EXPECT_EQ(info.models(), 2);
  // A smaller model fits in what is left; deleting one makes room for another.
  EXPECT_TRUE(Create("small", MlpSpec(4, 4, 2)).ok());
  ASSERT_TRUE(Delete("a").ok());
  EXPECT_TRUE(Create("c", MlpSpec()).ok());
  EXPECT_EQ(ServerInfo().device_bytes_in_use(), 2 * e + Estimate(MlpSpec(4, 4, 2)));
}

// Check and registration are one step: of many concurrent creates only those that fit pass.
TEST_F(LimitsTest, ConcurrentCreatesCannotTogetherPassTheBudget) {
  const v1::ModelSpec spec = MlpSpec(64, 256, 10);
  const int64_t e = Estimate(spec);
  service::ServerOptions options;
  options.max_device_bytes = 2 * e + e / 2;
  options.worker_threads = 8;
  Start(options);
  constexpr int kClients = 8;
  std::atomic<int> ok{0}, exhausted{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      grpc::Status s = Create(absl::StrCat("m", i), spec, i);
      if (s.ok()) ++ok;
      if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++exhausted;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 2);
  EXPECT_EQ(exhausted.load(), kClients - 2);
  EXPECT_EQ(ModelCount(), 2);
  EXPECT_EQ(ServerInfo().device_bytes_in_use(), 2 * e);
}

TEST_F(LimitsTest, ImportBeyondTheBudgetAndReplacing) {
  const int64_t e = Estimate(MlpSpec());
  const int64_t large_e = Estimate(MlpSpec(12, 64, 5));
  // The state of a larger model, made on a server without a budget.
  Start({});
  ASSERT_TRUE(Create("large", MlpSpec(12, 64, 5)).ok());
  const std::string large = State("large");

  service::ServerOptions options;
  options.max_device_bytes = 2 * e + e / 2;
  ASSERT_GT(large_e, options.max_device_bytes);
  Start(options);
  ASSERT_TRUE(Create("a", MlpSpec(), 1).ok());
  ASSERT_TRUE(Create("b", MlpSpec(), 2).ok());
  const std::string a = State("a");
  const std::string b = State("b");
  EXPECT_THAT(Import("c", a, false),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr(absl::StrCat("model 'c' needs ", e, " bytes")),
                           HasSubstr("--max-device-bytes"))));
  EXPECT_EQ(ModelCount(), 2);
  // Replacing b: b counts as freed.
  ASSERT_TRUE(Import("b", a, true).ok());
  EXPECT_TRUE(Holds("b", a));
  EXPECT_EQ(ServerInfo().device_bytes_in_use(), 2 * e);
  // A larger model does not fit even in b's place; b stays as it was.
  EXPECT_THAT(Import("b", large, true),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr(absl::StrCat("model 'b' needs ", large_e, " bytes")),
                           HasSubstr(absl::StrCat("(", e, " of them the model it replaces)")),
                           HasSubstr("--max-device-bytes"))));
  EXPECT_TRUE(Holds("b", a));
  EXPECT_EQ(ServerInfo().device_bytes_in_use(), 2 * e);
}

TEST_F(LimitsTest, RestoreBeyondTheBudgetChangesNothing) {
  testing::TempDir dir;
  const int64_t e = Estimate(MlpSpec());
  const int64_t large_e = Estimate(MlpSpec(12, 64, 5));
  service::ServerOptions options;
  options.checkpoint_dir = dir.path();
  options.max_device_bytes = large_e + e / 2;
  Start(options);
  // "large" checkpointed at steps 1 and 2, then deleted (its checkpoints go to the trash).
  ASSERT_TRUE(Create("large", MlpSpec(12, 64, 5)).ok());
  for (int64_t step = 0; step < 2; ++step) {
    ASSERT_TRUE(TrainStep("large", 2, 12, 5, step).ok());
    grpc::ClientContext ctx;
    v1::SaveCheckpointRequest req;
    req.set_model_id("large");
    v1::CheckpointInfo info;
    ASSERT_TRUE(stub_->SaveCheckpoint(&ctx, req, &info).ok());
  }
  ASSERT_TRUE(Delete("large").ok());
  ASSERT_TRUE(Create("a", MlpSpec()).ok());
  ASSERT_TRUE(Create("b", MlpSpec()).ok());
  auto restore = [&](const std::string& name, bool from_deleted = false,
                     bool discard_newer = false) {
    grpc::ClientContext ctx;
    v1::RestoreCheckpointRequest req;
    req.set_model_id("large");
    req.set_name(name);
    req.set_from_deleted(from_deleted);
    req.set_discard_newer(discard_newer);
    v1::ModelInfo info;
    return stub_->RestoreCheckpoint(&ctx, req, &info);
  };
  // Taken back from the trash, the earlier checkpoint: refused for the budget before the model is
  // built, and the later checkpoint stays.
  EXPECT_THAT(restore("step-00000001", /*from_deleted=*/true),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr(absl::StrCat("model 'large' needs ", large_e, " bytes")),
                           HasSubstr(absl::StrCat("the models hold ", 2 * e, " bytes")),
                           HasSubstr("--max-device-bytes"))));
  EXPECT_TRUE(testing::Exists(dir.path() + "/large/step-00000002.safetensors"));
  EXPECT_EQ(ModelCount(), 2);
  ASSERT_TRUE(Delete("a").ok());
  ASSERT_TRUE(Delete("b").ok());
  ASSERT_TRUE(restore("").ok());
  EXPECT_EQ(Info("large").step(), 2);
  // Restoring over itself: the model replaced counts as freed.
  ASSERT_TRUE(restore("step-00000001", false, /*discard_newer=*/true).ok());
  EXPECT_EQ(Info("large").step(), 1);
  EXPECT_EQ(ServerInfo().device_bytes_in_use(), large_e);
}

// ---------------------------------------------------------------- the number of models

TEST_F(LimitsTest, MaxModels) {
  service::ServerOptions options;
  options.max_models = 2;
  Start(options);
  ASSERT_TRUE(Create("a", MlpSpec()).ok());
  ASSERT_TRUE(Create("b", MlpSpec()).ok());
  EXPECT_THAT(Create("c", MlpSpec()),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr("the server holds 2 models"), HasSubstr("the limit is 2"),
                           HasSubstr("--max-models"))));
  const std::string a = State("a");
  EXPECT_THAT(Import("c", a, false),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("--max-models")));
  // Replacing takes no new place.
  EXPECT_TRUE(Import("b", a, true).ok());
  EXPECT_EQ(ModelCount(), 2);
  EXPECT_EQ(ServerInfo().max_models(), 2);
  ASSERT_TRUE(Delete("a").ok());
  EXPECT_TRUE(Create("c", MlpSpec()).ok());
}

// ---------------------------------------------------------------- pending passes expire

TEST_F(LimitsTest, UnusedPassesExpire) {
  service::ServerOptions options;
  options.pending_pass_ttl_seconds = 1;
  Start(options);
  EXPECT_EQ(ServerInfo().pending_pass_ttl_seconds(), 1);
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
  EXPECT_EQ(Info("m").pending_passes(), 1);
  EXPECT_GT(Info("m").pending_bytes(), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  // Released: the figures (which metrics read too) count it no more.
  EXPECT_EQ(Info("m").pending_passes(), 0);
  EXPECT_EQ(Info("m").pending_bytes(), 0);
  EXPECT_THAT(Backward("m", f.pass_id(), Floats({3, 5})),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION,
                     AllOf(HasSubstr(f.pass_id()), HasSubstr("expired"), HasSubstr("within 1 s"),
                           HasSubstr("--pending-pass-ttl-seconds"))));
  // A pass used in time trains as ever.
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
  ASSERT_TRUE(Backward("m", f.pass_id(), Floats({3, 5})).ok());
  v1::UpdateCorrelationResponse u;
  ASSERT_TRUE(Update("m", 0, &u).ok());
  EXPECT_EQ(u.step(), 1);
}

// ---------------------------------------------------------------- deadlines and cancellation

// The service on a worker pool of the test's own, whose one thread the test can hold: requests
// then wait in the queue for as long as the test wants, whatever the machine's speed.
class QueuedTest : public LimitsTest {
 protected:
  void SetUp() override {
    service::TrainerOptions options;
    options.default_device = testing::TestDevice();
    service_ = std::make_unique<service::TrainerService>(options, &pool_);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    grpc_server_ = builder.BuildAndStart();
    ASSERT_NE(grpc_server_, nullptr);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::TernaryTrainer::NewStub(channel_);
  }
  void TearDown() override {
    Release();
    grpc_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    pool_.Stop();
  }
  // Holds the one worker until Release.
  void Hold() {
    ASSERT_TRUE(pool_.Submit([this] { release_.WaitForNotification(); }));
  }
  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
  }

  service::WorkerPool pool_{1};
  std::unique_ptr<service::TrainerService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  absl::Notification release_;
};

// A request whose deadline passes, or that its client cancels, while it waits for a worker is
// not run when a worker takes it up.
TEST_F(QueuedTest, RequestsExpiredOrCancelledInTheQueueAreNotRun) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
  ASSERT_TRUE(Backward("m", f.pass_id(), Floats({3, 5})).ok());
  const std::string before = State("m");

  Hold();
  v1::UpdateCorrelationResponse u;
  EXPECT_THAT(Update("m", 0, &u, absl::Milliseconds(200)),
              GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_));
  EXPECT_THAT(TrainStep("m", 3, 12, 5, 0, absl::Milliseconds(200)),
              GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_));
  EXPECT_THAT(Forward("m", Floats({3, 12}), true, &f, absl::Milliseconds(200)),
              GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_));
  // Cancelled by its client while queued (no deadline).
  grpc::ClientContext ctx;
  grpc::Status cancelled;
  std::thread caller([&] {
    v1::UpdateCorrelationResponse r;
    cancelled = Update("m", 0, &r, absl::ZeroDuration(), &ctx);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ctx.TryCancel();
  caller.join();
  EXPECT_EQ(cancelled.error_code(), grpc::StatusCode::CANCELLED) << cancelled.error_message();
  // The client knows at once; the server when the cancellation has crossed the connection.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  Release();

  // The worker takes the queued requests up in order, before the ones below: none of them ran.
  EXPECT_EQ(Info("m").step(), 0);
  EXPECT_EQ(Info("m").pending_passes(), 0);
  EXPECT_TRUE(State("m") == before) << "the state changed";
  // The update not applied applies now (not a replay), with the Backward from before.
  ASSERT_TRUE(Update("m", 0, &u).ok());
  EXPECT_FALSE(u.replayed());
  EXPECT_EQ(u.step(), 1);
}

// "wide": 16 -> 4096 -> RELU -> residual(4096 -> 4096) -> RMSNorm -> 16: small requests, long
// computations (about 70 GFLOP per 1024 rows forward, twice that backward), so that a request
// is taken up at once and then outlasts a short deadline.
constexpr int64_t kWide = 4096;

// A request taken up in time but whose deadline passes while it waits for its model or computes
// gives up right before it would commit: nothing is applied.
TEST_F(LimitsTest, UpdatesPastTheirDeadlineAtTheCommitApplyNothing) {
  service::ServerOptions options;
  options.worker_threads = 4;
  Start(options);
  ASSERT_TRUE(Create("wide", MlpSpec(16, kWide, 16)).ok());
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("wide", Floats({1, 16}), true, &f).ok());
  ASSERT_TRUE(Backward("wide", f.pass_id(), Floats({1, 16})).ok());
  const std::string before = State("wide");
  if (testing::TestDeviceName() != "cpu") {
    // On a GPU a forward holds its model only while it queues kernels, not while they run, so no
    // request can be made to wait for the model; the core's own tests cover the commit check.
    GTEST_SKIP() << "needs the models on the CPU, where computing holds the model";
  }
  // Requests long enough to outlast a 100 ms deadline several times over on this machine: sized
  // from the time of a 1024-row forward here (sizing only; nothing asserts a duration).
  const absl::Time t0 = absl::Now();
  {
    v1::ForwardResponse out;
    ASSERT_TRUE(Forward("wide", Floats({1024, 16}), false, &out).ok());
  }
  const double per_1024 = absl::ToDoubleSeconds(absl::Now() - t0);
  const int64_t rows = std::min<int64_t>(
      int64_t{1} << 18, 1024 * static_cast<int64_t>(std::ceil(0.5 / std::max(per_1024, 1e-4))));
  if (rows * per_1024 / 1024 < 0.3) {
    GTEST_SKIP() << "a forward of the largest request (" << rows << " rows) takes about "
                 << rows * per_1024 / 1024 << " s here: too short to outlast the deadline surely";
  }

  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "UpdateCorrelation" : "TrainStep");
    if (round == 0) {
      // A Forward without training (it changes nothing) holds the model for a long while; the
      // update, taken up by another worker at once, waits for the model past its deadline.
      const v1::Tensor input = Floats({rows, 16});
      std::thread blocker([&] {
        v1::ForwardResponse out;
        EXPECT_TRUE(Forward("wide", input, false, &out).ok());
      });
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      v1::UpdateCorrelationResponse u;
      EXPECT_THAT(Update("wide", 0, &u, absl::Milliseconds(100)),
                  GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_));
      blocker.join();
    } else {
      // The step's own forward and backward outlast its deadline.
      const v1::TrainStepRequest step = StepRequest("wide", rows, 16, 16, 0);
      EXPECT_THAT(TrainStep(step, absl::Milliseconds(100)),
                  GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_));
    }
    // The abandoned request still runs to its check: give it time to apply, were it to (it must
    // not).
    for (int i = 0; i < 100 && Info("wide").step() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(Info("wide").step(), 0);
    EXPECT_TRUE(State("wide") == before) << "the state changed";
  }
  v1::UpdateCorrelationResponse u;
  ASSERT_TRUE(Update("wide", 0, &u).ok());
  EXPECT_FALSE(u.replayed());
  EXPECT_EQ(u.step(), 1);
}

// With one stream per connection, a call waits while another call holds the connection's stream.
TEST_F(LimitsTest, MaxConcurrentStreamsHoldsCallsOfOneConnection) {
  service::ServerOptions options;
  options.max_concurrent_streams = 1;
  Start(options);
  ServerInfo();  // the client has learnt the server's settings
  // An ImportState that has sent its header and waits: its stream stays open.
  grpc::ClientContext import_ctx;
  v1::ModelInfo imported;
  auto writer = stub_->ImportState(&import_ctx, &imported);
  v1::ImportStateRequest header;
  header.mutable_header()->set_model_id("m");
  ASSERT_TRUE(writer->Write(header));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(500)));
    v1::ServerInfo info;
    EXPECT_THAT(stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info),
                GrpcIs(grpc::StatusCode::DEADLINE_EXCEEDED, ::testing::_))
        << "a second call ran beside the first on a one-stream connection";
  }
  writer->WritesDone();
  EXPECT_THAT(writer->Finish(), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("data")));
  // The stream is free again.
  EXPECT_EQ(ServerInfo().models(), 0);
}

TEST(ServerOptionsTest, BadLimitsAreRefusedNamingTheFlag) {
  struct Case {
    std::function<void(service::ServerOptions*)> set;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {[](service::ServerOptions* o) { o->max_models = -1; }, "--max-models: expected >= 0"},
      {[](service::ServerOptions* o) { o->max_device_bytes = -5; },
       "--max-device-bytes: expected >= 0"},
      {[](service::ServerOptions* o) { o->pending_pass_ttl_seconds = -1; },
       "--pending-pass-ttl-seconds: expected >= 0"},
      {[](service::ServerOptions* o) { o->keepalive_seconds = 86401; },
       "--keepalive-seconds: expected 0 (no pings) to 86400, got 86401"},
      {[](service::ServerOptions* o) { o->max_concurrent_streams = 0; },
       "--max-concurrent-streams: expected 1 to"},
      {[](service::ServerOptions* o) { o->grpc_memory_bytes = 1 << 20; },
       "--grpc-memory-bytes: expected at least twice --max-message-bytes"},
  };
  for (const Case& c : cases) {
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.device = "cpu";
    c.set(&options);
    EXPECT_THAT(service::Server::Start(options),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.expect)));
  }
}

// ---------------------------------------------------------------- the binary's flags

struct ProcessRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

ProcessRun RunServer(const std::string& args) {
  const char* binary = std::getenv("TSCALE_SERVER_BIN");
  ProcessRun run;
  FILE* pipe = popen(absl::StrCat(binary ? binary : "tscale-server", " ", args, " 2>&1").c_str(),
                     "r");
  if (pipe == nullptr) return run;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.output.append(buffer, n);
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

TEST(ServerFlagsTest, HelpListsTheLimitsAndBadValuesNameTheFlag) {
  const ProcessRun help = RunServer("--help");
  ASSERT_EQ(help.exit_code, 0) << help.output;
  for (const char* flag : {"--max-models", "--max-device-bytes", "--pending-pass-ttl-seconds",
                           "--keepalive-seconds", "--max-concurrent-streams",
                           "--grpc-memory-bytes"}) {
    EXPECT_THAT(help.output, HasSubstr(flag));
  }
  for (auto [args, expect] : {
           std::pair<const char*, const char*>{"--max-models=-1", "--max-models: expected >= 0"},
           {"--max-models many", "--max-models: expected N, got 'many'"},
           {"--max-device-bytes -1", "--max-device-bytes: expected >= 0"},
           {"--pending-pass-ttl-seconds=soon", "--pending-pass-ttl-seconds: expected N"},
           {"--keepalive-seconds 100000", "--keepalive-seconds: expected 0 (no pings) to 86400"},
           {"--max-concurrent-streams 0", "--max-concurrent-streams: expected 1 to"},
           {"--grpc-memory-bytes 1024", "--grpc-memory-bytes: expected at least twice"},
       }) {
    const ProcessRun run = RunServer(absl::StrCat("--listen 127.0.0.1:0 --device cpu ", args));
    EXPECT_EQ(run.exit_code, 2) << args << ": " << run.output;
    EXPECT_THAT(run.output, HasSubstr(expect)) << args;
  }
}

}  // namespace
}  // namespace tscale
