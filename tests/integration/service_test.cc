// The TernaryTrainer service through a real gRPC server on loopback: every RPC, every error path,
// message limits, and concurrent clients with retried updates.
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "server/checkpoint/safetensors.h"
#include "server/checkpoint/state_file.h"
#include "server/service/server.h"
#include "tests/unit/files.h"
#include "tests/integration/rpc_test_util.h"
#include "tests/unit/test_util.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale {
namespace {

using testing::Floats;
using testing::GrpcIs;
using testing::Longs;
using testing::MlpSpec;
using testing::Values;

using ::testing::AllOf;
using ::testing::HasSubstr;

// ---------------------------------------------------------------- helpers






class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { Start({}); }

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

  void TearDown() override { server_->Shutdown(std::chrono::seconds(5)); }

  grpc::Status Create(const std::string& id, const v1::ModelSpec& spec, uint64_t seed = 1,
                      v1::ModelInfo* info = nullptr) {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_model_id(id);
    *req.mutable_spec() = spec;
    req.set_seed(seed);
    v1::ModelInfo local;
    return stub_->CreateModel(&ctx, req, info ? info : &local);
  }

  grpc::Status GetModel(const std::string& id, v1::ModelInfo* info) {
    grpc::ClientContext ctx;
    v1::GetModelRequest req;
    req.set_model_id(id);
    return stub_->GetModel(&ctx, req, info);
  }

  grpc::Status Forward(const std::string& id, const v1::Tensor& x, bool train,
                       v1::ForwardResponse* resp) {
    grpc::ClientContext ctx;
    v1::ForwardRequest req;
    req.set_model_id(id);
    *req.mutable_input() = x;
    req.set_train(train);
    return stub_->Forward(&ctx, req, resp);
  }

  grpc::Status Backward(const std::string& id, const std::string& pass, const v1::Tensor& g,
                        bool want_gi, v1::BackwardResponse* resp) {
    grpc::ClientContext ctx;
    v1::BackwardRequest req;
    req.set_model_id(id);
    req.set_pass_id(pass);
    *req.mutable_grad_output() = g;
    req.set_want_grad_input(want_gi);
    return stub_->Backward(&ctx, req, resp);
  }

  grpc::Status Update(const std::string& id, int64_t expected, v1::UpdateCorrelationResponse* r) {
    grpc::ClientContext ctx;
    v1::UpdateCorrelationRequest req;
    req.set_model_id(id);
    req.set_expected_step(expected);
    return stub_->UpdateCorrelation(&ctx, req, r);
  }

  grpc::Status TrainStep(const v1::TrainStepRequest& req, v1::TrainStepResponse* resp) {
    grpc::ClientContext ctx;
    return stub_->TrainStep(&ctx, req, resp);
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

  // Sends `messages` as they are (a header first, normally).
  grpc::Status ImportMessages(const std::vector<v1::ImportStateRequest>& messages,
                              v1::ModelInfo* info) {
    grpc::ClientContext ctx;
    auto writer = stub_->ImportState(&ctx, info);
    for (const auto& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Import(const v1::ImportHeader& header, const std::string& bytes,
                      v1::ModelInfo* info, size_t chunk = 1000) {
    std::vector<v1::ImportStateRequest> messages(1);
    *messages[0].mutable_header() = header;
    for (size_t off = 0; off < bytes.size(); off += chunk) {
      messages.emplace_back().set_data(bytes.substr(off, chunk));
    }
    return ImportMessages(messages, info);
  }

  // A TrainStep taking a while: model "big" (MlpSpec(2048, 2048, 16)) at this batch.
  grpc::Status BigTrainStep(int64_t batch) {
    v1::TrainStepRequest req;
    req.set_model_id("big");
    *req.mutable_input() = Floats({batch, 2048});
    *req.mutable_target() = Floats({batch, 16});
    req.set_loss(v1::TrainStepRequest::MSE);
    v1::TrainStepResponse resp;
    grpc::ClientContext ctx;
    return stub_->TrainStep(&ctx, req, &resp);
  }

  // One Forward(train) + Backward + UpdateCorrelation at `step`.
  void TrainOnce(const std::string& id, int64_t step) {
    v1::ForwardResponse f;
    ASSERT_TRUE(Forward(id, Floats({3, 12}, static_cast<float>(step)), true, &f).ok());
    v1::BackwardResponse b;
    ASSERT_TRUE(Backward(id, f.pass_id(), Floats({3, 5}, 1.0f + step), false, &b).ok());
    v1::UpdateCorrelationResponse u;
    ASSERT_TRUE(Update(id, step, &u).ok());
  }

  std::unique_ptr<service::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TernaryTrainer::Stub> stub_;
};

// ---------------------------------------------------------------- models

TEST_F(ServiceTest, CreateGetListDelete) {
  v1::ModelInfo info;
  ASSERT_TRUE(Create("m1", MlpSpec(), 7, &info).ok());
  EXPECT_EQ(info.model_id(), "m1");
  EXPECT_EQ(info.device(), testing::TestDeviceName());
  EXPECT_EQ(info.compute(), v1::COMPUTE_FP32);
  EXPECT_EQ(info.step(), 0);
  EXPECT_EQ(info.in_features(), 12);
  EXPECT_EQ(info.out_features(), 5);
  EXPECT_EQ(info.ternary_params(), 12 * 16 + 16 * 16 + 16 + 16 * 5);
  EXPECT_EQ(info.groups(), 16 * 2 + 16 * 1 + 1 + 5 * 1);
  EXPECT_GT(info.persistent_bytes(), 0);
  // Defaults come back explicit.
  EXPECT_EQ(info.spec().layers(4).ternary_linear().group_size(), 32);
  EXPECT_EQ(info.spec().layers(2).residual().layers(0).name(), "up");

  ASSERT_TRUE(Create("m0", MlpSpec(), 7).ok());
  v1::ModelInfo got;
  ASSERT_TRUE(GetModel("m1", &got).ok());
  EXPECT_EQ(got.SerializeAsString(), info.SerializeAsString());

  grpc::ClientContext ctx;
  v1::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(&ctx, v1::ListModelsRequest(), &list).ok());
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_EQ(list.models(0).model_id(), "m0");
  EXPECT_EQ(list.models(1).model_id(), "m1");

  grpc::ClientContext dctx;
  v1::DeleteModelRequest del;
  del.set_model_id("m1");
  v1::DeleteModelResponse dresp;
  ASSERT_TRUE(stub_->DeleteModel(&dctx, del, &dresp).ok());
  EXPECT_THAT(GetModel("m1", &got),
              GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("model_id: no model 'm1'")));
  grpc::ClientContext dctx2;
  EXPECT_THAT(stub_->DeleteModel(&dctx2, del, &dresp), GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("m1")));
}

TEST_F(ServiceTest, CreateErrors) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  EXPECT_THAT(Create("m", MlpSpec()),
              GrpcIs(grpc::StatusCode::ALREADY_EXISTS, HasSubstr("model_id: a model 'm' already exists")));
  EXPECT_THAT(Create("", MlpSpec()), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                                         HasSubstr("model_id: expected 1-64 characters")));
  EXPECT_THAT(Create("a b", MlpSpec()), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("'a b'")));
  v1::ModelSpec bad = MlpSpec();
  bad.mutable_layers(4)->mutable_ternary_linear()->set_in_features(15);
  EXPECT_THAT(Create("x", bad),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("layers[4] (fc2).ternary_linear.in_features: expected 16")));
  v1::ModelSpec empty_kind = MlpSpec();
  empty_kind.mutable_layers(1)->clear_activation();
  EXPECT_THAT(Create("x", empty_kind),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("layers[1] (act)")));
  v1::ModelSpec bad_kind = MlpSpec();
  bad_kind.mutable_layers(1)->mutable_activation()->set_kind(static_cast<v1::Activation::Kind>(9));
  EXPECT_THAT(Create("x", bad_kind),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("activation.kind: expected RELU, GELU or SILU, got 9")));
  EXPECT_THAT(Create("x", v1::ModelSpec()), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("layers")));

  for (auto [device, expect] : {std::pair<const char*, const char*>{"tpu", "tpu"},
                                {"cuda:99", "cuda:99"}}) {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_model_id("x");
    *req.mutable_spec() = MlpSpec();
    req.set_device(device);
    v1::ModelInfo info;
    EXPECT_THAT(stub_->CreateModel(&ctx, req, &info),
                GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr(expect)));
  }
  // TF32 is a CUDA tensor-core format; on a CPU device it is refused.
  for (auto [compute, code, expect] :
       {std::tuple<int, grpc::StatusCode, const char*>{
            v1::COMPUTE_TF32, grpc::StatusCode::UNIMPLEMENTED,
            "compute: COMPUTE_TF32 runs on CUDA tensor cores"},
        {42, grpc::StatusCode::INVALID_ARGUMENT, "compute: expected COMPUTE_FP32"}}) {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_model_id("x");
    *req.mutable_spec() = MlpSpec();
    req.set_device("cpu");
    req.set_compute(static_cast<v1::ComputeType>(compute));
    v1::ModelInfo info;
    EXPECT_THAT(stub_->CreateModel(&ctx, req, &info), GrpcIs(code, HasSubstr(expect)));
  }
  // Nothing of the failures was kept.
  grpc::ClientContext ctx;
  v1::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(&ctx, v1::ListModelsRequest(), &list).ok());
  EXPECT_EQ(list.models_size(), 1);
}

TEST_F(ServiceTest, SameSeedSameModel) {
  ASSERT_TRUE(Create("a", MlpSpec(), 5).ok());
  ASSERT_TRUE(Create("b", MlpSpec(), 5).ok());
  ASSERT_TRUE(Create("c", MlpSpec(), 6).ok());
  v1::ForwardResponse a, b, c;
  ASSERT_TRUE(Forward("a", Floats({2, 12}), false, &a).ok());
  ASSERT_TRUE(Forward("b", Floats({2, 12}), false, &b).ok());
  ASSERT_TRUE(Forward("c", Floats({2, 12}), false, &c).ok());
  EXPECT_EQ(a.output().data(), b.output().data());
  EXPECT_NE(a.output().data(), c.output().data());
}

// ---------------------------------------------------------------- training

TEST_F(ServiceTest, ForwardBackwardUpdate) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
  EXPECT_EQ(f.output().dtype(), v1::FP32);
  EXPECT_THAT(f.output().shape(), ::testing::ElementsAre(3, 5));
  EXPECT_EQ(f.output().data().size(), 3u * 5 * 4);
  EXPECT_FALSE(f.pass_id().empty());
  EXPECT_EQ(f.step(), 0);

  v1::ModelInfo info;
  ASSERT_TRUE(GetModel("m", &info).ok());
  EXPECT_EQ(info.pending_passes(), 1);
  EXPECT_GT(info.pending_bytes(), 0);

  // Inference keeps no pass and gives the same output.
  v1::ForwardResponse inf;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), false, &inf).ok());
  EXPECT_TRUE(inf.pass_id().empty());
  EXPECT_EQ(inf.output().data(), f.output().data());

  v1::BackwardResponse b;
  ASSERT_TRUE(Backward("m", f.pass_id(), Floats({3, 5}), true, &b).ok());
  EXPECT_THAT(b.grad_input().shape(), ::testing::ElementsAre(3, 12));
  EXPECT_EQ(b.grad_input().data().size(), 3u * 12 * 4);
  v1::BackwardResponse no_gi;
  v1::ForwardResponse f2;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f2).ok());
  ASSERT_TRUE(Backward("m", f2.pass_id(), Floats({3, 5}), false, &no_gi).ok());
  EXPECT_FALSE(no_gi.has_grad_input());

  v1::UpdateCorrelationResponse u;
  ASSERT_TRUE(Update("m", 0, &u).ok());
  EXPECT_EQ(u.step(), 1);
  EXPECT_FALSE(u.replayed());
  ASSERT_EQ(u.layers_size(), 3);
  EXPECT_EQ(u.layers(0).layer(), "fc1");
  EXPECT_EQ(u.layers(1).layer(), "block.up");
  EXPECT_EQ(u.layers(2).layer(), "fc2");

  // The retry of that update is replayed, identically.
  v1::UpdateCorrelationResponse again;
  ASSERT_TRUE(Update("m", 0, &again).ok());
  EXPECT_TRUE(again.replayed());
  again.set_replayed(false);
  EXPECT_EQ(again.SerializeAsString(), u.SerializeAsString());
  ASSERT_TRUE(GetModel("m", &info).ok());
  EXPECT_EQ(info.step(), 1);
  EXPECT_EQ(info.pending_passes(), 0);

  // The output changed with the scales.
  v1::ForwardResponse after;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), false, &after).ok());
  EXPECT_EQ(after.step(), 1);
  EXPECT_NE(after.output().data(), inf.output().data());
}

TEST_F(ServiceTest, TrainingErrors) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::ForwardResponse f;
  v1::BackwardResponse b;
  v1::UpdateCorrelationResponse u;
  EXPECT_THAT(Forward("nope", Floats({3, 12}), true, &f),
              GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("model_id: no model 'nope'")));
  EXPECT_THAT(Forward("m", Floats({3, 11}), true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("input: expected FP32 [batch >= 1, 12], got FP32 [3, 11]")));
  v1::Tensor wrong_bytes = Floats({3, 12});
  wrong_bytes.mutable_data()->pop_back();
  EXPECT_THAT(Forward("m", wrong_bytes, true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("input.data: expected 144 bytes (FP32 [3, 12]), got 143")));
  v1::Tensor as_int = Floats({3, 12});
  as_int.set_dtype(v1::INT32);
  EXPECT_THAT(Forward("m", as_int, true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("input.dtype: expected FP32, BF16 or FP16, got INT32")));
  v1::Tensor negative = Floats({3, 12});
  negative.set_shape(0, -3);
  EXPECT_THAT(Forward("m", negative, true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("input.shape[0]: expected a size >= 0, got -3")));
  EXPECT_THAT(Forward("m", v1::Tensor(), true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("input.dtype")));
  v1::Tensor nan = Floats({3, 12});
  const float bad = std::nanf("");
  std::memcpy(nan.mutable_data()->data() + 8, &bad, 4);
  EXPECT_THAT(Forward("m", nan, true, &f),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("input: expected finite values")));

  EXPECT_THAT(Update("m", 0, &u), GrpcIs(grpc::StatusCode::FAILED_PRECONDITION,
                                         HasSubstr("no Backward since step 0")));
  EXPECT_THAT(Backward("m", "no-such-pass", Floats({3, 5}), false, &b),
              GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("pass_id: no pass 'no-such-pass'")));

  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &f).ok());
  EXPECT_THAT(Backward("m", f.pass_id(), Floats({2, 5}), false, &b),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("grad_output: expected FP32 [3, 5] (the pass's output), got FP32 [2, 5]")));
  ASSERT_TRUE(Backward("m", f.pass_id(), Floats({3, 5}), false, &b).ok());
  EXPECT_THAT(Backward("m", f.pass_id(), Floats({3, 5}), false, &b),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("already used")));
  v1::ForwardResponse stale;
  ASSERT_TRUE(Forward("m", Floats({3, 12}), true, &stale).ok());
  EXPECT_THAT(Update("m", 3, &u), GrpcIs(grpc::StatusCode::FAILED_PRECONDITION,
                                         HasSubstr("expected_step: expected 0 (the model's step), got 3")));
  ASSERT_TRUE(Update("m", 0, &u).ok());
  EXPECT_THAT(Backward("m", stale.pass_id(), Floats({3, 5}), false, &b),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("released")));
  EXPECT_THAT(Update("m", 5, &u), GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("got 5")));
}

// Only RMSNorm and activations: no weight gradient to take, the input gradient still flows.
TEST_F(ServiceTest, ModelWithoutLinearLayers) {
  v1::ModelSpec spec;
  auto* norm = spec.add_layers();
  norm->set_name("norm");
  norm->mutable_ternary_rms_norm()->set_dim(8);
  auto* act = spec.add_layers();
  act->set_name("act");
  act->mutable_activation()->set_kind(v1::Activation::SILU);
  ASSERT_TRUE(Create("n", spec).ok());
  for (bool want_gi : {false, true}) {
    v1::ForwardResponse f;
    ASSERT_TRUE(Forward("n", Floats({2, 8}), true, &f).ok());
    v1::BackwardResponse b;
    ASSERT_TRUE(Backward("n", f.pass_id(), Floats({2, 8}), want_gi, &b).ok());
    EXPECT_EQ(b.has_grad_input(), want_gi);
  }
  v1::UpdateCorrelationResponse u;
  ASSERT_TRUE(Update("n", 0, &u).ok());
  EXPECT_EQ(u.step(), 1);
  EXPECT_EQ(u.layers_size(), 0);
}

TEST_F(ServiceTest, ImportChunksOfExactlyTheMessageLimit) {
  service::ServerOptions options;
  options.max_message_bytes = 2048;
  Start(options);
  ASSERT_TRUE(Create("m", MlpSpec(12, 64, 5), 3).ok());
  std::string bytes;
  ASSERT_TRUE(Export("m", &bytes).ok());
  ASSERT_GT(bytes.size(), 2 * 2048u);
  v1::ImportHeader header;
  header.set_model_id("copy");
  v1::ModelInfo info;
  ASSERT_TRUE(Import(header, bytes, &info, 2048).ok());
  header.set_model_id("copy2");
  EXPECT_THAT(Import(header, bytes, &info, 2049),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr("ImportStateRequest[1]: 2049 bytes"),
                           HasSubstr("--max-message-bytes"))));
}

TEST_F(ServiceTest, PendingPassLimit) {
  service::ServerOptions options;
  options.max_pending_passes = 2;
  Start(options);
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("m", Floats({2, 12}), true, &f).ok());
  ASSERT_TRUE(Forward("m", Floats({2, 12}), true, &f).ok());
  EXPECT_THAT(Forward("m", Floats({2, 12}), true, &f),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("the limit is 2")));
  // Inference is not limited by it.
  EXPECT_TRUE(Forward("m", Floats({2, 12}), false, &f).ok());
}

TEST_F(ServiceTest, TrainStepBothLosses) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::TrainStepRequest req;
  req.set_model_id("m");
  *req.mutable_input() = Floats({4, 12});
  *req.mutable_target() = Floats({4, 5}, 2.0f);
  req.set_loss(v1::TrainStepRequest::MSE);
  req.set_want_output(true);
  v1::TrainStepResponse r;
  ASSERT_TRUE(TrainStep(req, &r).ok());
  EXPECT_EQ(r.step(), 1);
  EXPECT_FALSE(r.replayed());
  EXPECT_GT(r.loss(), 0);
  EXPECT_THAT(r.output().shape(), ::testing::ElementsAre(4, 5));
  EXPECT_EQ(r.layers_size(), 3);
  // MSE as defined: mean of (y - target)^2 over all elements.
  const std::vector<float> y = Values(r.output()), t = Values(req.target());
  double mse = 0;
  for (size_t i = 0; i < y.size(); ++i) mse += (y[i] - t[i]) * (y[i] - t[i]);
  EXPECT_NEAR(r.loss(), mse / y.size(), 1e-6);

  v1::TrainStepResponse replay;
  ASSERT_TRUE(TrainStep(req, &replay).ok());
  EXPECT_TRUE(replay.replayed());
  EXPECT_EQ(replay.loss(), r.loss());
  EXPECT_EQ(replay.step(), 1);
  EXPECT_FALSE(replay.has_output());

  req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
  *req.mutable_target() = Longs({0, 4, 2, 1});
  req.set_expected_step(1);
  req.set_want_output(false);
  ASSERT_TRUE(TrainStep(req, &r).ok());
  EXPECT_EQ(r.step(), 2);
  EXPECT_FALSE(r.has_output());
  EXPECT_GT(r.loss(), 0);
}

TEST_F(ServiceTest, TrainStepErrors) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  v1::TrainStepRequest req;
  req.set_model_id("m");
  *req.mutable_input() = Floats({4, 12});
  *req.mutable_target() = Longs({0, 1, 2, 3});
  v1::TrainStepResponse r;
  EXPECT_THAT(TrainStep(req, &r), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                                         HasSubstr("loss: expected MSE or CROSS_ENTROPY, got LOSS_UNSPECIFIED")));
  req.set_loss(v1::TrainStepRequest::MSE);
  EXPECT_THAT(TrainStep(req, &r), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                                         HasSubstr("target.dtype: expected FP32, BF16 or FP16, got INT64")));
  req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
  *req.mutable_target() = Longs({0, 1, 7, 3});
  EXPECT_THAT(TrainStep(req, &r), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                                         HasSubstr("target: expected class indices in [0, 5), got 7")));
  *req.mutable_target() = Longs({0, 1, 2});
  EXPECT_THAT(TrainStep(req, &r), GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                                         HasSubstr("target: expected INT64 [4] class indices")));
  *req.mutable_target() = Longs({0, 1, 2, 3});
  req.set_expected_step(4);
  EXPECT_THAT(TrainStep(req, &r), GrpcIs(grpc::StatusCode::FAILED_PRECONDITION,
                                         HasSubstr("expected_step: expected 0")));
  v1::ModelInfo info;
  ASSERT_TRUE(GetModel("m", &info).ok());
  EXPECT_EQ(info.step(), 0);
}

// ---------------------------------------------------------------- state

TEST_F(ServiceTest, ExportImportRoundTrip) {
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  for (int s = 0; s < 3; ++s) TrainOnce("m", s);
  std::string bytes;
  ASSERT_TRUE(Export("m", &bytes).ok());
  auto decoded = checkpoint::DecodeState(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->step, 3);
  ASSERT_TRUE(decoded->spec.has_value());
  EXPECT_EQ(decoded->metadata.at("format"), "tscale/1");
  EXPECT_EQ(decoded->metadata.at("compute"), "COMPUTE_FP32");
  EXPECT_EQ(decoded->metadata.at("model_id"), "m");
  EXPECT_TRUE(decoded->tensors.count("block.up.bias"));
  EXPECT_TRUE(decoded->tensors.count("norm.T_packed"));
  EXPECT_EQ(decoded->tensors.at("fc1.step_counter").item<int64_t>(), 3);

  v1::ImportHeader header;
  header.set_model_id("copy");
  v1::ModelInfo info;
  ASSERT_TRUE(Import(header, bytes, &info).ok());
  EXPECT_EQ(info.step(), 3);
  EXPECT_EQ(info.model_id(), "copy");
  // The copy computes what the original does, and trains on identically.
  v1::ForwardResponse a, b;
  ASSERT_TRUE(Forward("m", Floats({2, 12}), false, &a).ok());
  ASSERT_TRUE(Forward("copy", Floats({2, 12}), false, &b).ok());
  EXPECT_EQ(a.output().data(), b.output().data());
  TrainOnce("m", 3);
  TrainOnce("copy", 3);
  std::string x, y;
  ASSERT_TRUE(Export("m", &x).ok());
  ASSERT_TRUE(Export("copy", &y).ok());
  auto dx = checkpoint::DecodeState(x), dy = checkpoint::DecodeState(y);
  ASSERT_TRUE(dx.ok() && dy.ok());
  ASSERT_EQ(dx->tensors.size(), dy->tensors.size());
  for (const auto& [k, v] : dx->tensors) EXPECT_TRUE(v.equal(dy->tensors.at(k))) << k;

  // Replace: the id now holds the older state.
  header.set_replace(true);
  ASSERT_TRUE(Import(header, bytes, &info).ok());
  EXPECT_EQ(info.step(), 3);
  // Without replace, a taken id is refused.
  header.set_replace(false);
  EXPECT_THAT(Import(header, bytes, &info),
              GrpcIs(grpc::StatusCode::ALREADY_EXISTS, HasSubstr("'copy'")));
}

TEST_F(ServiceTest, ImportWithoutMetadataTakesTheSpecFromTheHeader) {
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  TrainOnce("m", 0);
  std::string bytes;
  ASSERT_TRUE(Export("m", &bytes).ok());
  auto decoded = checkpoint::DecodeState(bytes);
  ASSERT_TRUE(decoded.ok());
  // The file as the reference would write it: tensors only.
  auto file = checkpoint::SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(file.ok());
  checkpoint::SafetensorsWriter writer;
  for (const auto& [k, tv] : file->tensors()) {
    ASSERT_TRUE(writer.Add(k, tv.dtype, tv.shape, std::string(tv.data)).ok());
  }
  const std::string bare = writer.Serialize();
  v1::ImportHeader header;
  header.set_model_id("bare");
  v1::ModelInfo info;
  EXPECT_THAT(Import(header, bare, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("header.spec: expected a spec, in the header or in the file's")));
  *header.mutable_spec() = MlpSpec();
  ASSERT_TRUE(Import(header, bare, &info).ok());
  EXPECT_EQ(info.step(), 1);  // from the layers' step_counter
}

TEST_F(ServiceTest, ImportErrors) {
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  std::string bytes;
  ASSERT_TRUE(Export("m", &bytes).ok());
  v1::ModelInfo info;
  v1::ImportHeader header;
  header.set_model_id("x");

  // A flipped byte in the data section fails the CRC.
  std::string flipped = bytes;
  flipped[flipped.size() - 3] ^= 0x01;
  EXPECT_THAT(Import(header, flipped, &info), GrpcIs(grpc::StatusCode::DATA_LOSS, HasSubstr("crc32c")));
  EXPECT_THAT(Import(header, bytes.substr(0, bytes.size() / 2), &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, ::testing::_));
  EXPECT_THAT(Import(header, "", &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("data: expected a state file after the header, got no data")));
  // Messages out of order.
  std::vector<v1::ImportStateRequest> data_first(1);
  data_first[0].set_data(bytes);
  EXPECT_THAT(ImportMessages(data_first, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("header: expected the first message to hold the header, got data")));
  std::vector<v1::ImportStateRequest> two_headers(2);
  *two_headers[0].mutable_header() = header;
  *two_headers[1].mutable_header() = header;
  EXPECT_THAT(ImportMessages(two_headers, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT,
                     HasSubstr("ImportStateRequest[1]: expected data, got a second header")));
  EXPECT_THAT(ImportMessages({}, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("got no message")));
  v1::ImportHeader bad_id;
  bad_id.set_model_id("no/slash");
  EXPECT_THAT(Import(bad_id, bytes, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("header.model_id: expected 1-64")));
  v1::ImportHeader bad_device = header;
  bad_device.set_device("gpu7");
  EXPECT_THAT(Import(bad_device, bytes, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("gpu7")));
  // A spec that does not fit the file's tensors.
  v1::ImportHeader other_spec = header;
  *other_spec.mutable_spec() = MlpSpec(12, 24, 5);
  EXPECT_THAT(Import(other_spec, bytes, &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("fc1.")));
  // None of it created a model.
  EXPECT_THAT(GetModel("x", &info), GrpcIs(grpc::StatusCode::NOT_FOUND, ::testing::_));
}

TEST_F(ServiceTest, ImportSizeLimit) {
  service::ServerOptions options;
  options.max_import_bytes = 2000;
  Start(options);
  ASSERT_TRUE(Create("m", MlpSpec(12, 64, 5), 3).ok());
  std::string bytes;
  ASSERT_TRUE(Export("m", &bytes).ok());
  ASSERT_GT(bytes.size(), 2000u);
  v1::ImportHeader header;
  header.set_model_id("x");
  v1::ModelInfo info;
  EXPECT_THAT(Import(header, bytes, &info),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr("2000 bytes"), HasSubstr("--max-import-bytes"))));
}

TEST_F(ServiceTest, ExportUnknownModel) {
  std::string bytes;
  EXPECT_THAT(Export("nope", &bytes), GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("'nope'")));
}

TEST_F(ServiceTest, ExportOfALargeModelStreamsInChunks) {
  ASSERT_TRUE(Create("big", MlpSpec(1024, 2048, 10), 1).ok());
  grpc::ClientContext ctx;
  v1::ExportStateRequest req;
  req.set_model_id("big");
  auto reader = stub_->ExportState(&ctx, req);
  v1::StateChunk chunk;
  int chunks = 0;
  std::string bytes;
  while (reader->Read(&chunk)) {
    ++chunks;
    EXPECT_LE(chunk.data().size(), 1u << 20);
    bytes += chunk.data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_GT(chunks, 1);
  EXPECT_TRUE(checkpoint::DecodeState(bytes).ok());
}

// ---------------------------------------------------------------- statistics, server, limits

TEST_F(ServiceTest, ScaleStats) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  for (int s = 0; s < 4; ++s) TrainOnce("m", s);
  grpc::ClientContext ctx;
  v1::GetScaleStatsRequest req;
  req.set_model_id("m");
  req.set_include_per_group(true);
  v1::ScaleStats stats;
  ASSERT_TRUE(stub_->GetScaleStats(&ctx, req, &stats).ok());
  EXPECT_EQ(stats.model_id(), "m");
  EXPECT_EQ(stats.step(), 4);
  ASSERT_EQ(stats.layers_size(), 4);  // fc1, block.up, norm, fc2
  EXPECT_EQ(stats.layers(0).layer(), "fc1");
  EXPECT_EQ(stats.layers(1).layer(), "block.up");
  EXPECT_EQ(stats.layers(2).layer(), "norm");
  for (const auto& l : stats.layers()) {
    EXPECT_EQ(l.bucket_upper_size(), l.bucket_count_size());
    EXPECT_TRUE(std::isinf(l.bucket_upper(l.bucket_upper_size() - 1)));
    int64_t total = 0;
    for (int64_t c : l.bucket_count()) total += c;
    EXPECT_EQ(total, l.groups());
    EXPECT_LE(l.drift_min(), l.drift_mean());
    EXPECT_LE(l.drift_mean(), l.drift_max());
    EXPECT_EQ(l.log2_scale().dtype(), v1::FP32);
    EXPECT_THAT(l.log2_scale().shape(), ::testing::ElementsAre(l.groups()));
  }
  EXPECT_EQ(stats.layers(2).drift_abs_mean(), 0);  // RMSNorm state is frozen
  EXPECT_GT(stats.layers(0).drift_abs_mean(), 0);

  grpc::ClientContext ctx2;
  req.set_model_id("nope");
  EXPECT_THAT(stub_->GetScaleStats(&ctx2, req, &stats), GrpcIs(grpc::StatusCode::NOT_FOUND, ::testing::_));
}

TEST_F(ServiceTest, ServerInfo) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  grpc::ClientContext ctx;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(info.default_device(), testing::TestDeviceName());
  EXPECT_THAT(info.devices(), ::testing::Contains("cpu"));
  EXPECT_EQ(info.max_message_bytes(), 256 << 20);
  EXPECT_EQ(info.max_pending_passes(), 1024);
  EXPECT_EQ(info.models(), 1);
}

TEST_F(ServiceTest, CheckpointCallsNeedACheckpointFolder) {
  ASSERT_TRUE(Create("m", MlpSpec()).ok());
  grpc::ClientContext ctx;
  v1::SaveCheckpointRequest req;
  req.set_model_id("m");
  v1::CheckpointInfo info;
  EXPECT_THAT(stub_->SaveCheckpoint(&ctx, req, &info),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("--checkpoint-dir")));
  grpc::ClientContext dctx;
  v1::DeleteModelRequest del;
  del.set_model_id("m");
  del.set_delete_checkpoints(true);
  v1::DeleteModelResponse dresp;
  EXPECT_THAT(stub_->DeleteModel(&dctx, del, &dresp),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("--checkpoint-dir")));
}

class CheckpointServiceTest : public ServiceTest {
 protected:
  void SetUp() override { StartWith({}); }
  void StartWith(service::ServerOptions options) {
    options.checkpoint_dir = dir_.path();
    Start(options);
  }
  grpc::Status Save(const std::string& id, v1::CheckpointInfo* info) {
    grpc::ClientContext ctx;
    v1::SaveCheckpointRequest req;
    req.set_model_id(id);
    return stub_->SaveCheckpoint(&ctx, req, info);
  }
  grpc::Status List(const std::string& id, v1::ListCheckpointsResponse* resp) {
    grpc::ClientContext ctx;
    v1::ListCheckpointsRequest req;
    req.set_model_id(id);
    return stub_->ListCheckpoints(&ctx, req, resp);
  }
  grpc::Status Restore(const std::string& id, const std::string& name, v1::ModelInfo* info,
                       bool discard_newer = false) {
    grpc::ClientContext ctx;
    v1::RestoreCheckpointRequest req;
    req.set_model_id(id);
    req.set_name(name);
    req.set_discard_newer(discard_newer);
    return stub_->RestoreCheckpoint(&ctx, req, info);
  }
  grpc::Status Delete(const std::string& id, bool delete_checkpoints) {
    grpc::ClientContext ctx;
    v1::DeleteModelRequest req;
    req.set_model_id(id);
    req.set_delete_checkpoints(delete_checkpoints);
    v1::DeleteModelResponse resp;
    return stub_->DeleteModel(&ctx, req, &resp);
  }
  // The model's tensors, exported.
  core::StateDict State(const std::string& id) {
    std::string bytes;
    EXPECT_TRUE(Export(id, &bytes).ok());
    auto decoded = checkpoint::DecodeState(bytes);
    EXPECT_TRUE(decoded.ok()) << decoded.status();
    return decoded.ok() ? decoded->tensors : core::StateDict();
  }

  testing::TempDir dir_;
};

TEST_F(CheckpointServiceTest, SaveListRestore) {
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  std::vector<core::StateDict> states;
  for (int s = 0; s < 3; ++s) {
    TrainOnce("m", s);
    v1::CheckpointInfo info;
    ASSERT_TRUE(Save("m", &info).ok());
    EXPECT_EQ(info.model_id(), "m");
    EXPECT_EQ(info.step(), s + 1);
    EXPECT_EQ(info.name(), absl::StrFormat("step-%08d", s + 1));
    EXPECT_EQ(info.crc32c().size(), 8u);
    EXPECT_EQ(info.bytes(),
              testing::FileSize(dir_.path() + "/m/" + info.name() + ".safetensors"));
    states.push_back(State("m"));
  }
  v1::ListCheckpointsResponse list;
  ASSERT_TRUE(List("m", &list).ok());
  ASSERT_EQ(list.checkpoints_size(), 3);
  EXPECT_EQ(list.checkpoints(0).step(), 1);
  EXPECT_EQ(list.checkpoints(2).name(), "step-00000003");

  // Into a new id: created, at the checkpoint's state.
  v1::ModelInfo info;
  ASSERT_TRUE(Restore("m", "step-00000003", &info).ok());
  EXPECT_EQ(info.step(), 3);
  EXPECT_TRUE(testing::SameState(State("m"), states[2]));
  // Into the existing model, back to step 2: refused while a later checkpoint exists, unless
  // asked to discard it; then it is gone (history continues from the one restored), and training
  // on from there replaces it.
  EXPECT_THAT(Restore("m", "step-00000002", &info),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION, HasSubstr("discard_newer")));
  ASSERT_TRUE(List("m", &list).ok());
  EXPECT_EQ(list.checkpoints_size(), 3);
  ASSERT_TRUE(Restore("m", "step-00000002", &info, /*discard_newer=*/true).ok());
  EXPECT_EQ(info.step(), 2);
  EXPECT_TRUE(testing::SameState(State("m"), states[1]));
  ASSERT_TRUE(List("m", &list).ok());
  EXPECT_EQ(list.checkpoints_size(), 2);
  // No name: the newest valid.
  TrainOnce("m", 2);
  ASSERT_TRUE(Restore("m", "", &info).ok());
  EXPECT_EQ(info.step(), 2);

  EXPECT_THAT(Restore("m", "step-00000009", &info),
              GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("no checkpoint 'step-00000009'")));
  EXPECT_THAT(Restore("m", "../../etc/passwd", &info),
              GrpcIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("name: expected a checkpoint name")));
  EXPECT_THAT(Restore("other", "", &info),
              GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("no checkpoints of 'other'")));
  EXPECT_THAT(List("other", &list), GrpcIs(grpc::StatusCode::NOT_FOUND, ::testing::_));
  v1::CheckpointInfo ci;
  EXPECT_THAT(Save("other", &ci), GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("'other'")));
}

TEST_F(CheckpointServiceTest, DamagedCheckpointIsDataLoss) {
  ASSERT_TRUE(Create("m", MlpSpec(), 3).ok());
  for (int s = 0; s < 2; ++s) {
    TrainOnce("m", s);
    v1::CheckpointInfo info;
    ASSERT_TRUE(Save("m", &info).ok());
  }
  const std::string newest = dir_.path() + "/m/step-00000002.safetensors";
  {
    std::fstream f(newest, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    char c;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(-5, std::ios::end);
    f.write(&c, 1);
  }
  v1::ModelInfo info;
  EXPECT_THAT(Restore("m", "step-00000002", &info),
              GrpcIs(grpc::StatusCode::DATA_LOSS, AllOf(HasSubstr("step-00000002"), HasSubstr("crc32c"))));
  // Without a name the damaged newest is skipped.
  ASSERT_TRUE(Restore("m", "", &info).ok());
  EXPECT_EQ(info.step(), 1);
}

TEST_F(CheckpointServiceTest, RestartRestoresEveryModelAndShutdownSavesTheLastSteps) {
  ASSERT_TRUE(Create("a", MlpSpec(), 1).ok());
  ASSERT_TRUE(Create("b", MlpSpec(), 2).ok());
  for (int s = 0; s < 3; ++s) TrainOnce("a", s);
  TrainOnce("b", 0);
  const core::StateDict a = State("a"), b = State("b");
  // A restart: the shutdown saves both, the new server restores both before it listens.
  StartWith({});
  v1::ModelInfo info;
  ASSERT_TRUE(GetModel("a", &info).ok());
  EXPECT_EQ(info.step(), 3);
  ASSERT_TRUE(GetModel("b", &info).ok());
  EXPECT_EQ(info.step(), 1);
  EXPECT_TRUE(testing::SameState(State("a"), a));
  EXPECT_TRUE(testing::SameState(State("b"), b));
  // Nothing changed: the next shutdown writes nothing new.
  const auto before = testing::ModifiedNs(dir_.path() + "/a/step-00000003.safetensors");
  StartWith({});
  EXPECT_EQ(testing::ModifiedNs(dir_.path() + "/a/step-00000003.safetensors"), before);
}

TEST_F(CheckpointServiceTest, NoShutdownSaveWhenTurnedOff) {
  service::ServerOptions options;
  options.checkpoint_on_shutdown = false;
  StartWith(options);
  ASSERT_TRUE(Create("m", MlpSpec(), 1).ok());
  TrainOnce("m", 0);
  v1::CheckpointInfo ci;
  ASSERT_TRUE(Save("m", &ci).ok());
  TrainOnce("m", 1);
  StartWith(options);
  v1::ModelInfo info;
  ASSERT_TRUE(GetModel("m", &info).ok());
  EXPECT_EQ(info.step(), 1);
}

TEST_F(CheckpointServiceTest, StepPolicyAndRetention) {
  service::ServerOptions options;
  options.checkpoint_every_steps = 2;
  options.checkpoint_keep = 2;
  options.checkpoint_on_shutdown = false;
  StartWith(options);
  ASSERT_TRUE(Create("m", MlpSpec(), 1).ok());
  for (int s = 0; s < 7; ++s) TrainOnce("m", s);
  // Saves run in the background; wait for the last one (step 6) and its retention.
  v1::ListCheckpointsResponse list;
  for (int i = 0; i < 100; ++i) {
    list.Clear();
    if (List("m", &list).ok() && list.checkpoints_size() == 2 &&
        list.checkpoints(1).step() == 6) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(list.checkpoints_size(), 2);
  EXPECT_EQ(list.checkpoints(0).step(), 4);
  EXPECT_EQ(list.checkpoints(1).step(), 6);
}

TEST_F(CheckpointServiceTest, TimePolicySavesChangedModelsOnly) {
  service::ServerOptions options;
  options.checkpoint_every_seconds = 1;
  options.checkpoint_on_shutdown = false;
  StartWith(options);
  ASSERT_TRUE(Create("m", MlpSpec(), 1).ok());
  TrainOnce("m", 0);
  TrainOnce("m", 1);
  v1::ListCheckpointsResponse list;
  for (int i = 0; i < 60; ++i) {
    if (List("m", &list).ok() && list.checkpoints(list.checkpoints_size() - 1).step() == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GT(list.checkpoints_size(), 0);
  EXPECT_EQ(list.checkpoints(list.checkpoints_size() - 1).step(), 2);
  const auto written =
      testing::ModifiedNs(dir_.path() + "/m/step-00000002.safetensors");
  std::this_thread::sleep_for(std::chrono::milliseconds(2200));
  EXPECT_EQ(testing::ModifiedNs(dir_.path() + "/m/step-00000002.safetensors"),
            written);
}

TEST_F(CheckpointServiceTest, CheckpointedIdsAreNotTakenByNewModels) {
  ASSERT_TRUE(Create("m", MlpSpec(), 1).ok());
  v1::CheckpointInfo ci;
  ASSERT_TRUE(Save("m", &ci).ok());
  // Checkpoints of a model that is not loaded (here: copied in) keep a new model off the id...
  ASSERT_EQ(mkdir((dir_.path() + "/n").c_str(), 0755), 0);
  {
    std::ifstream in(dir_.path() + "/m/" + ci.name() + ".safetensors", std::ios::binary);
    std::ofstream(dir_.path() + "/n/" + ci.name() + ".safetensors", std::ios::binary)
        << in.rdbuf();
  }
  EXPECT_THAT(Create("n", MlpSpec(), 2),
              GrpcIs(grpc::StatusCode::FAILED_PRECONDITION,
                     AllOf(HasSubstr("checkpoints of a model 'n' are on disk"),
                           HasSubstr("delete_checkpoints"))));
  // ...until they are deleted too (the model need not be loaded).
  ASSERT_TRUE(Delete("n", true).ok());
  EXPECT_FALSE(testing::Exists(dir_.path() + "/n"));
  EXPECT_TRUE(Create("n", MlpSpec(), 2).ok());
  EXPECT_THAT(Delete("ghost", true), GrpcIs(grpc::StatusCode::NOT_FOUND, HasSubstr("'ghost'")));
  // A model deleted without delete_checkpoints frees its id at once: its checkpoints went to
  // the trash of deleted models, whence from_deleted takes them back.
  ASSERT_TRUE(Delete("m", false).ok());
  EXPECT_FALSE(testing::Exists(dir_.path() + "/m"));
  EXPECT_EQ(testing::ListDir(dir_.path() + "/.deleted").size(), 1u);
  ASSERT_TRUE(Create("m", MlpSpec(), 2).ok());
  ASSERT_TRUE(Delete("m", false).ok());
  grpc::ClientContext ctx;
  v1::RestoreCheckpointRequest req;
  req.set_model_id("m");
  req.set_from_deleted(true);
  v1::ModelInfo info;
  // The most recent deletion: the second model, which had no checkpoint, left nothing; so the
  // first one's come back.
  ASSERT_TRUE(stub_->RestoreCheckpoint(&ctx, req, &info).ok());
  EXPECT_EQ(info.step(), 0);
}

TEST_F(ServiceTest, MessageSizeLimitNamesTheFlag) {
  service::ServerOptions options;
  options.max_message_bytes = 64 << 10;
  Start(options);
  ASSERT_TRUE(Create("m", MlpSpec(1024, 16, 5)).ok());
  v1::ForwardResponse f;
  // 20 x 1024 floats = 80 KiB: beyond the limit, within gRPC's own hard limit.
  EXPECT_THAT(Forward("m", Floats({20, 1024}), false, &f),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr("request"), HasSubstr("--max-message-bytes"),
                           HasSubstr("65536"))));
  // Far beyond: gRPC refuses it before the handler; still RESOURCE_EXHAUSTED.
  EXPECT_THAT(Forward("m", Floats({100, 1024}), false, &f),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED, ::testing::_));
  // A response that would be too large is refused before the pass is made.
  ASSERT_TRUE(Create("wide", MlpSpec(4, 16, 4096)).ok());
  EXPECT_THAT(Forward("wide", Floats({8, 4}), true, &f),
              GrpcIs(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     AllOf(HasSubstr("output"), HasSubstr("--max-message-bytes"))));
  v1::ModelInfo info;
  ASSERT_TRUE(GetModel("wide", &info).ok());
  EXPECT_EQ(info.pending_passes(), 0);
  EXPECT_TRUE(Forward("m", Floats({4, 1024}), false, &f).ok());
}

TEST(ServerTest, BadOptionsNameTheFlag) {
  service::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.max_message_bytes = 10;
  EXPECT_THAT(service::Server::Start(options).status().message(),
              HasSubstr("--max-message-bytes: expected 1024"));
  options.max_message_bytes = 1 << 20;
  options.device = "abacus";
  EXPECT_THAT(service::Server::Start(options).status().message(), HasSubstr("--device"));
  options.device = "cpu";
  options.listen = "nowhere";
  EXPECT_THAT(service::Server::Start(options).status().message(),
              HasSubstr("--listen: expected HOST:PORT, got 'nowhere'"));
  options.listen = "127.0.0.1:0";
  options.max_pending_passes = 0;
  EXPECT_THAT(service::Server::Start(options).status().message(),
              HasSubstr("--max-pending-passes: expected > 0"));
}

TEST(ServerTest, AddressInUse) {
  service::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.device = "cpu";
  auto first = service::Server::Start(options);
  ASSERT_TRUE(first.ok());
  options.listen = (*first)->address();
  auto second = service::Server::Start(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(second.status().message(), HasSubstr("--listen: cannot listen on"));
}

// ---------------------------------------------------------------- concurrency

// Several clients train several models at once, through both update paths, and retry every
// update as a client would after a lost response. Each model's step must equal the number of
// updates that applied (not replayed), and every retry must be replayed or refused. A TrainStep
// is replayed only for its own retry; an UpdateCorrelation racing another client's for the same
// step may be answered with that update (replayed), which its gradients were part of.
TEST_F(ServiceTest, ConcurrentClientsWithRetriedUpdates) {
  constexpr int kModels = 3, kClientsPerModel = 3, kAttempts = 12;
  for (int m = 0; m < kModels; ++m) ASSERT_TRUE(Create("m" + std::to_string(m), MlpSpec(), m).ok());
  std::atomic<int> applied[kModels] = {};
  std::atomic<int> replayed{0}, bad{0}, joined{0};
  absl::Mutex mu;
  std::vector<std::string> bad_statuses;
  std::vector<std::thread> clients;
  for (int m = 0; m < kModels; ++m) {
    for (int c = 0; c < kClientsPerModel; ++c) {
      clients.emplace_back([&, m, c] {
        // Each client has its own channel, as separate processes would.
        auto channel = testing::UnlimitedChannel(server_->address(), /*own_connection=*/true);
        auto stub = v1::TernaryTrainer::NewStub(channel);
        const std::string id = "m" + std::to_string(m);
        for (int i = 0; i < kAttempts; ++i) {
          grpc::ClientContext gctx;
          v1::GetModelRequest greq;
          greq.set_model_id(id);
          v1::ModelInfo info;
          if (!stub->GetModel(&gctx, greq, &info).ok()) {
            ++bad;
            continue;
          }
          const int64_t step = info.step();
          bool ok = false;
          auto retry_ok = [&](const grpc::Status& s, bool was_replayed) {
            // The retry of an applied update: replayed, or refused when others moved on.
            if (s.ok() && was_replayed) {
              ++replayed;
            } else if (s.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
              ++bad;
            }
          };
          if ((c + i) % 2 == 0) {
            v1::TrainStepRequest req;
            req.set_model_id(id);
            *req.mutable_input() = Floats({4, 12}, static_cast<float>(1000 * m + 100 * c + i));
            *req.mutable_target() = Longs({0, 1, 2, 3});
            req.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
            req.set_expected_step(step);
            for (int attempt = 0; attempt < 2; ++attempt) {
              grpc::ClientContext ctx;
              v1::TrainStepResponse resp;
              grpc::Status s = stub->TrainStep(&ctx, req, &resp);
              if (attempt == 0) {
                ok = s.ok() && !resp.replayed();
                if (!ok && s.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
                  ++bad;
                  absl::MutexLock lock(&mu);
                  bad_statuses.push_back(absl::StrCat(s.error_code(), ": ", s.error_message()));
                }
                if (!ok) break;
              } else {
                retry_ok(s, resp.replayed());
              }
            }
          } else {
            grpc::ClientContext fctx;
            v1::ForwardRequest freq;
            freq.set_model_id(id);
            *freq.mutable_input() = Floats({2, 12}, static_cast<float>(i * c));
            freq.set_train(true);
            v1::ForwardResponse f;
            if (!stub->Forward(&fctx, freq, &f).ok()) {
              ++bad;
              continue;
            }
            grpc::ClientContext bctx;
            v1::BackwardRequest breq;
            breq.set_model_id(id);
            breq.set_pass_id(f.pass_id());
            *breq.mutable_grad_output() = Floats({2, 5}, static_cast<float>(i));
            v1::BackwardResponse b;
            grpc::Status bs = stub->Backward(&bctx, breq, &b);
            if (!bs.ok()) {
              // Another client's update released the pass: expected under contention.
              if (bs.error_code() != grpc::StatusCode::FAILED_PRECONDITION) ++bad;
              continue;
            }
            v1::UpdateCorrelationRequest ureq;
            ureq.set_model_id(id);
            ureq.set_expected_step(f.step());
            for (int attempt = 0; attempt < 2; ++attempt) {
              grpc::ClientContext ctx;
              v1::UpdateCorrelationResponse resp;
              grpc::Status s = stub->UpdateCorrelation(&ctx, ureq, &resp);
              if (attempt == 0) {
                ok = s.ok() && !resp.replayed();
                if (s.ok() && resp.replayed()) ++joined;
                if (!s.ok() && s.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
                  ++bad;
                  absl::MutexLock lock(&mu);
                  bad_statuses.push_back(absl::StrCat(s.error_code(), ": ", s.error_message()));
                }
                if (!ok) break;
              } else {
                retry_ok(s, resp.replayed());
              }
            }
          }
          if (ok) ++applied[m];
        }
      });
    }
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(bad.load(), 0) << ::testing::PrintToString(bad_statuses);
  EXPECT_GT(replayed.load(), 0);
  int total = 0;
  for (int m = 0; m < kModels; ++m) {
    v1::ModelInfo info;
    ASSERT_TRUE(GetModel("m" + std::to_string(m), &info).ok());
    EXPECT_EQ(info.step(), applied[m].load()) << "model m" << m;
    EXPECT_GT(applied[m].load(), 0);
    total += applied[m].load();
  }
  std::cout << "concurrency: " << total << " updates applied, " << replayed.load()
            << " retries replayed, " << joined.load() << " updates joined another client's\n";
}

// A long request on one model does not hold up requests on another. The big model steps back to
// back while the small model's Forwards are timed; those that began and were answered within one
// big step must take a small part of a big step. Were the small model held up by the big one
// (a lock, a worker, a device queue), they would take about what remained of that step. Both
// times come from the same run, so the test holds on any machine, fast or slow.
TEST_F(ServiceTest, DifferentModelsRunInParallel) {
  ASSERT_TRUE(Create("big", MlpSpec(2048, 2048, 16), 1).ok());
  ASSERT_TRUE(Create("small", MlpSpec(), 1).ok());
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  std::atomic<int64_t> big_calls{0};  // odd while a big step is in flight
  std::atomic<bool> stop{false};
  std::vector<double> big_ms;  // written by the big thread only, read after it joined
  grpc::Status big_status;
  std::thread big([&] {
    for (int64_t step = 0; !stop; ++step) {
      v1::TrainStepRequest req;  // made before the step counts as in flight
      req.set_model_id("big");
      *req.mutable_input() = Floats({1024, 2048}, 0.1f + static_cast<float>(step));
      *req.mutable_target() = Floats({1024, 16});
      req.set_loss(v1::TrainStepRequest::MSE);
      req.set_expected_step(step);
      v1::TrainStepResponse resp;
      const Clock::time_point start = Clock::now();
      ++big_calls;
      big_status = TrainStep(req, &resp);
      ++big_calls;
      big_ms.push_back(ms_since(start));
      if (!big_status.ok()) return;
    }
  });
  constexpr size_t kSamples = 20;
  std::vector<double> small_ms;
  const Clock::time_point give_up = Clock::now() + std::chrono::seconds(300);
  while (small_ms.size() < kSamples && Clock::now() < give_up) {
    const int64_t before = big_calls;
    const Clock::time_point start = Clock::now();
    v1::ForwardResponse f;
    const grpc::Status s = Forward("small", Floats({2, 12}), false, &f);
    const double ms = ms_since(start);
    if (!s.ok()) {
      ADD_FAILURE() << "small Forward: " << s.error_message();
      break;
    }
    if (before % 2 == 1 && big_calls == before) small_ms.push_back(ms);
  }
  stop = true;
  big.join();
  ASSERT_TRUE(big_status.ok()) << big_status.error_message();
  ASSERT_EQ(small_ms.size(), kSamples) << "too few small Forwards answered within a big step";
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double small = median(small_ms), big_step = median(big_ms);
  std::cout << "small Forward during a big step: median " << small << " ms; big step: median "
            << big_step << " ms over " << big_ms.size() << " steps\n";
  EXPECT_LT(small, big_step / 10) << "the small model's Forward waited for the big TrainStep";
}

// A request in flight when the server shuts down still completes.
TEST_F(ServiceTest, ShutdownFinishesCallsInFlight) {
  ASSERT_TRUE(Create("big", MlpSpec(2048, 2048, 16), 1).ok());
  std::atomic<bool> done{false};
  grpc::Status status;
  std::thread caller([&] {
    status = BigTrainStep(512);
    done = true;
  });
  // Shut down once the step runs (its request has arrived whole: a call still arriving when
  // the server shuts down is cancelled by gRPC, not run).
  for (int i = 0; i < 6000 && server_->running_calls() == 0 && !done; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_FALSE(done) << "the step finished before the server could be shut down during it";
  server_->Shutdown(std::chrono::seconds(60));
  caller.join();
  EXPECT_TRUE(done);
  EXPECT_TRUE(status.ok()) << status.error_message();
  v1::ForwardResponse f;
  EXPECT_THAT(Forward("big", Floats({1, 2048}), false, &f),
              GrpcIs(grpc::StatusCode::UNAVAILABLE, ::testing::_));
}

}  // namespace
}  // namespace tscale
