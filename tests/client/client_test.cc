// The C++ client against an in-process server: every call for real, the error codes, deadlines,
// retries, and the tensor conversions.
#include "client/cpp/client.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cpp/at_tensor.h"
#include "client/cpp/tensor.h"
#include "server/service/server.h"
#include "tests/unit/files.h"
#include "tests/unit/test_util.h"

namespace tscale::client {
namespace {

using ::testing::_;
using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::SizeIs;
using ::tscale::testing::StatusIs;

// Matches an ok absl::StatusOr whose value matches `inner`.
MATCHER_P(IsOkAndHolds, inner, "") {
  if (!arg.ok()) {
    *result_listener << "status is " << arg.status();
    return false;
  }
  return ::testing::ExplainMatchResult(inner, *arg, result_listener);
}

// 64 -> 32 (RELU) -> 10: groups 32 * 2 and 10 * 1.
v1::ModelSpec MlpSpec() {
  v1::ModelSpec spec;
  v1::Layer* fc1 = spec.add_layers();
  fc1->set_name("fc1");
  fc1->mutable_ternary_linear()->set_in_features(64);
  fc1->mutable_ternary_linear()->set_out_features(32);
  v1::Layer* act = spec.add_layers();
  act->set_name("act");
  act->mutable_activation()->set_kind(v1::Activation::RELU);
  v1::Layer* fc2 = spec.add_layers();
  fc2->set_name("fc2");
  fc2->mutable_ternary_linear()->set_in_features(32);
  fc2->mutable_ternary_linear()->set_out_features(10);
  return spec;
}

v1::CreateModelRequest CreateRequest(const std::string& id, uint64_t seed = 1) {
  v1::CreateModelRequest request;
  request.set_model_id(id);
  *request.mutable_spec() = MlpSpec();
  request.set_seed(seed);
  return request;
}

v1::Tensor Proto(const at::Tensor& t) {
  absl::StatusOr<v1::Tensor> p = ToProtoTensor(t);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : v1::Tensor();
}

at::Tensor Aten(const v1::Tensor& t) {
  absl::StatusOr<at::Tensor> a = FromProtoTensor(t);
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? *a : at::Tensor();
}

at::Tensor Input(int64_t batch, int64_t features, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({batch, features}, gen);
}

std::vector<int64_t> Shape(const v1::Tensor& t) { return {t.shape().begin(), t.shape().end()}; }

// A port on which nothing listens (bound, then released).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  return ntohs(addr.sin_port);
}

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.device = "cpu";
    auto server = service::Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(std::chrono::milliseconds(0));
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<Client>(server_->address());
  }

  // Creates `id` (deleting any earlier model of that id).
  v1::ModelInfo Create(const std::string& id, uint64_t seed = 1) {
    (void)client_->DeleteModel(id);
    absl::StatusOr<v1::ModelInfo> info = client_->CreateModel(CreateRequest(id, seed));
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : v1::ModelInfo();
  }

  // `steps` MSE train steps from the model's current step.
  void Train(const std::string& id, int steps) {
    absl::StatusOr<v1::ModelInfo> info = client_->GetModel(id);
    ASSERT_TRUE(info.ok()) << info.status();
    int64_t step = info->step();
    for (int i = 0; i < steps; ++i) {
      v1::TrainStepRequest request;
      request.set_model_id(id);
      *request.mutable_input() = Proto(Input(8, 64, 100 + step));
      *request.mutable_target() = Proto(Input(8, 10, 200 + step));
      request.set_loss(v1::TrainStepRequest::MSE);
      request.set_expected_step(step);
      absl::StatusOr<v1::TrainStepResponse> r = client_->TrainStep(request);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->step(), step + 1);
      step = r->step();
    }
  }

  static service::Server* server_;
  std::unique_ptr<Client> client_;
};

service::Server* ClientTest::server_ = nullptr;

// ------------------------------------------------------------------ server

TEST_F(ClientTest, HealthOfServerAndService) {
  EXPECT_THAT(client_->Health(""), IsOkAndHolds(ServingStatus::kServing));
  EXPECT_THAT(client_->Health(kTrainerServiceName), IsOkAndHolds(ServingStatus::kServing));
  EXPECT_THAT(client_->Health("no.such.Service"), StatusIs(absl::StatusCode::kNotFound, _));
}

TEST_F(ClientTest, ServerInfo) {
  absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->version().empty());
  EXPECT_EQ(info->default_device(), "cpu");
  EXPECT_THAT(info->devices(), ::testing::Contains("cpu"));
  EXPECT_EQ(info->max_message_bytes(), int64_t{256} << 20);
  EXPECT_EQ(info->max_pending_passes(), 1024);
  EXPECT_GT(info->max_pending_bytes(), 0);
}

// ------------------------------------------------------------------ models

TEST_F(ClientTest, CreateGetListDelete) {
  (void)client_->DeleteModel("crud");
  absl::StatusOr<v1::ModelInfo> created = client_->CreateModel(CreateRequest("crud"));
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->model_id(), "crud");
  EXPECT_EQ(created->device(), "cpu");
  EXPECT_EQ(created->step(), 0);
  EXPECT_EQ(created->in_features(), 64);
  EXPECT_EQ(created->out_features(), 10);
  EXPECT_EQ(created->ternary_params(), 64 * 32 + 32 * 10);
  EXPECT_EQ(created->groups(), 32 * 2 + 10);
  EXPECT_GT(created->persistent_bytes(), 0);
  EXPECT_EQ(created->pending_passes(), 0);
  EXPECT_EQ(created->spec().layers_size(), 3);

  absl::StatusOr<v1::ModelInfo> got = client_->GetModel("crud");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->SerializeAsString(), created->SerializeAsString());

  absl::StatusOr<std::vector<v1::ModelInfo>> models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  std::vector<std::string> ids;
  for (const v1::ModelInfo& m : *models) ids.push_back(m.model_id());
  EXPECT_THAT(ids, ::testing::Contains("crud"));

  EXPECT_THAT(client_->CreateModel(CreateRequest("crud")),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("crud")));

  EXPECT_TRUE(client_->DeleteModel("crud").ok());
  EXPECT_THAT(client_->GetModel("crud"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("crud")));
  EXPECT_THAT(client_->DeleteModel("crud"), StatusIs(absl::StatusCode::kNotFound, _));
  // Deleting checkpoints too needs a server that keeps them.
  v1::DeleteModelRequest with_checkpoints;
  with_checkpoints.set_model_id("crud");
  with_checkpoints.set_delete_checkpoints(true);
  EXPECT_THAT(client_->DeleteModel(with_checkpoints),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("--checkpoint-dir")));
}

TEST_F(ClientTest, CreateRefusesABadSpec) {
  v1::CreateModelRequest request = CreateRequest("badspec");
  request.mutable_spec()->mutable_layers(2)->mutable_ternary_linear()->set_in_features(31);
  EXPECT_THAT(client_->CreateModel(request),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("in_features")));
  request = CreateRequest("bad id with spaces");
  EXPECT_THAT(client_->CreateModel(request),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
}

TEST_F(ClientTest, UnknownModelIsNotFound) {
  EXPECT_THAT(client_->GetModel("nope"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("nope")));
  EXPECT_THAT(client_->Forward("nope", Proto(Input(2, 64, 1)), false),
              StatusIs(absl::StatusCode::kNotFound, _));
  EXPECT_THAT(client_->UpdateCorrelation("nope", 0), StatusIs(absl::StatusCode::kNotFound, _));
  EXPECT_THAT(client_->ExportState("nope"), StatusIs(absl::StatusCode::kNotFound, _));
  EXPECT_THAT(client_->GetScaleStats("nope", false), StatusIs(absl::StatusCode::kNotFound, _));
}

// ------------------------------------------------------------------ training

TEST_F(ClientTest, ForwardBackwardUpdate) {
  Create("fbu");
  const at::Tensor x = Input(4, 64, 7);

  absl::StatusOr<v1::ForwardResponse> eval = client_->Forward("fbu", Proto(x), false);
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_EQ(eval->output().dtype(), v1::FP32);
  EXPECT_THAT(Shape(eval->output()), ElementsAre(4, 10));
  EXPECT_TRUE(eval->pass_id().empty());
  EXPECT_EQ(eval->step(), 0);

  absl::StatusOr<v1::ForwardResponse> pass = client_->Forward("fbu", Proto(x), true);
  ASSERT_TRUE(pass.ok()) << pass.status();
  EXPECT_FALSE(pass->pass_id().empty());
  // Training or not, the same input gives the same output at the same step.
  EXPECT_TRUE(at::equal(Aten(pass->output()), Aten(eval->output())));
  EXPECT_EQ(client_->GetModel("fbu")->pending_passes(), 1);

  // Before any Backward, there is nothing to update.
  EXPECT_THAT(client_->UpdateCorrelation("fbu", 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, _));

  absl::StatusOr<v1::BackwardResponse> back =
      client_->Backward("fbu", pass->pass_id(), Proto(at::ones({4, 10})), /*want_grad_input=*/true);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_THAT(Shape(back->grad_input()), ElementsAre(4, 64));
  // Once per pass.
  EXPECT_THAT(client_->Backward("fbu", pass->pass_id(), Proto(at::ones({4, 10})), false),
              StatusIs(absl::StatusCode::kFailedPrecondition, _));

  absl::StatusOr<v1::UpdateCorrelationResponse> update = client_->UpdateCorrelation("fbu", 0);
  ASSERT_TRUE(update.ok()) << update.status();
  EXPECT_EQ(update->step(), 1);
  EXPECT_FALSE(update->replayed());
  ASSERT_EQ(update->layers_size(), 2);
  EXPECT_EQ(update->layers(0).layer(), "fc1");
  EXPECT_EQ(update->layers(1).layer(), "fc2");

  // The retry of the update just applied: the same response, marked replayed.
  absl::StatusOr<v1::UpdateCorrelationResponse> replay = client_->UpdateCorrelation("fbu", 0);
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_TRUE(replay->replayed());
  EXPECT_EQ(replay->step(), 1);
  ASSERT_EQ(replay->layers_size(), 2);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(replay->layers(i).layer(), update->layers(i).layer());
    EXPECT_EQ(replay->layers(i).score_sum(), update->layers(i).score_sum());
    EXPECT_EQ(replay->layers(i).mean_abs_drift(), update->layers(i).mean_abs_drift());
  }

  // Any other step is stale (or ahead) and changes nothing.
  EXPECT_THAT(client_->UpdateCorrelation("fbu", 5),
              StatusIs(absl::StatusCode::kFailedPrecondition, _));
  // The update released the step's passes.
  EXPECT_THAT(client_->Backward("fbu", pass->pass_id(), Proto(at::ones({4, 10})), false),
              StatusIs(absl::StatusCode::kFailedPrecondition, _));
  EXPECT_THAT(client_->Backward("fbu", "no-such-pass", Proto(at::ones({4, 10})), false),
              StatusIs(absl::StatusCode::kNotFound, _));

  absl::StatusOr<v1::ModelInfo> info = client_->GetModel("fbu");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step(), 1);
  EXPECT_EQ(info->pending_passes(), 0);
  absl::StatusOr<v1::ForwardResponse> after = client_->Forward("fbu", Proto(x), false);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->step(), 1);
}

TEST_F(ClientTest, BadInputsAreInvalidArgumentNamingTheField) {
  Create("bad");
  EXPECT_THAT(client_->Forward("bad", Proto(Input(2, 63, 1)), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input")));
  v1::Tensor short_data = Proto(Input(2, 64, 1));
  short_data.mutable_data()->resize(short_data.data().size() - 4);
  EXPECT_THAT(client_->Forward("bad", short_data, false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input")));
  v1::Tensor nan = Proto(at::full({2, 64}, NAN));
  EXPECT_THAT(client_->Forward("bad", nan, true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input")));

  absl::StatusOr<v1::ForwardResponse> pass = client_->Forward("bad", Proto(Input(2, 64, 1)), true);
  ASSERT_TRUE(pass.ok()) << pass.status();
  EXPECT_THAT(client_->Backward("bad", pass->pass_id(), Proto(at::ones({2, 9})), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("grad_output")));
}

TEST_F(ClientTest, TrainStepMse) {
  Create("mse");
  double first = 0, last = 0;
  for (int step = 0; step < 4; ++step) {
    v1::TrainStepRequest request;
    request.set_model_id("mse");
    *request.mutable_input() = Proto(Input(8, 64, step));
    *request.mutable_target() = Proto(at::zeros({8, 10}));
    request.set_loss(v1::TrainStepRequest::MSE);
    request.set_expected_step(step);
    request.set_want_output(true);
    absl::StatusOr<v1::TrainStepResponse> r = client_->TrainStep(request);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step(), step + 1);
    EXPECT_FALSE(r->replayed());
    EXPECT_TRUE(std::isfinite(r->loss()));
    EXPECT_GE(r->loss(), 0);
    ASSERT_EQ(r->layers_size(), 2);
    EXPECT_THAT(Shape(r->output()), ElementsAre(8, 10));
    // Against zero targets, the MSE is the mean square of the output.
    const at::Tensor y = Aten(r->output());
    EXPECT_NEAR(r->loss(), y.pow(2).mean().item<double>(), 1e-5 * (1 + r->loss()));
    if (step == 0) first = r->loss();
    last = r->loss();

    if (step == 3) {
      // The retry of the step just applied: replayed, the same loss, no output.
      absl::StatusOr<v1::TrainStepResponse> again = client_->TrainStep(request);
      ASSERT_TRUE(again.ok()) << again.status();
      EXPECT_TRUE(again->replayed());
      EXPECT_EQ(again->step(), 4);
      EXPECT_EQ(again->loss(), r->loss());
      EXPECT_FALSE(again->has_output());
      // A stale step fails and changes nothing.
      request.set_expected_step(1);
      EXPECT_THAT(client_->TrainStep(request), StatusIs(absl::StatusCode::kFailedPrecondition, _));
    }
  }
  EXPECT_GT(first, 0);
  EXPECT_GT(last, 0);
  EXPECT_EQ(client_->GetModel("mse")->step(), 4);
}

TEST_F(ClientTest, TrainStepCrossEntropy) {
  Create("ce");
  for (int step = 0; step < 3; ++step) {
    v1::TrainStepRequest request;
    request.set_model_id("ce");
    *request.mutable_input() = Proto(Input(6, 64, 50 + step));
    *request.mutable_target() =
        *MakeTensor(std::vector<int64_t>{0, 1, 2, 3, 9, 5}, std::vector<int64_t>{6});
    request.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
    request.set_expected_step(step);
    absl::StatusOr<v1::TrainStepResponse> r = client_->TrainStep(request);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step(), step + 1);
    EXPECT_TRUE(std::isfinite(r->loss()));
    EXPECT_GT(r->loss(), 0);
    EXPECT_FALSE(r->has_output());
  }
  // A class index beyond the outputs.
  v1::TrainStepRequest request;
  request.set_model_id("ce");
  *request.mutable_input() = Proto(Input(2, 64, 1));
  *request.mutable_target() = *MakeTensor(std::vector<int64_t>{0, 10}, std::vector<int64_t>{2});
  request.set_loss(v1::TrainStepRequest::CROSS_ENTROPY);
  request.set_expected_step(3);
  EXPECT_THAT(client_->TrainStep(request),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("target")));
  EXPECT_EQ(client_->GetModel("ce")->step(), 3);
}

TEST_F(ClientTest, LargeRequestsPassTheClientAndMeetTheServersLimit) {
  Create("large");
  // 5 MiB, beyond gRPC's default 4 MiB receive limit: only the server's limit applies.
  absl::StatusOr<v1::ForwardResponse> r =
      client_->Forward("large", Proto(at::zeros({20480, 64})), false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(Shape(r->output()), ElementsAre(20480, 10));

  service::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.device = "cpu";
  options.max_message_bytes = 64 << 10;
  auto small = service::Server::Start(options);
  ASSERT_TRUE(small.ok()) << small.status();
  Client client((*small)->address());
  ASSERT_TRUE(client.CreateModel(CreateRequest("m")).ok());
  EXPECT_THAT(client.Forward("m", Proto(at::zeros({512, 64})), false),
              StatusIs(absl::StatusCode::kResourceExhausted, _));
  (*small)->Shutdown(std::chrono::milliseconds(0));
}

// ------------------------------------------------------------------ state

TEST_F(ClientTest, ExportImportRoundTrip) {
  Create("orig", /*seed=*/3);
  Train("orig", 3);
  absl::StatusOr<std::string> state = client_->ExportState("orig");
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_GT(state->size(), 8u);

  // Small chunks, so that the import takes many messages.
  ClientOptions options;
  options.import_chunk_bytes = 100;
  Client chunked(server_->address(), options);
  (void)client_->DeleteModel("copy");
  v1::ImportHeader header;
  header.set_model_id("copy");
  absl::StatusOr<v1::ModelInfo> copy = chunked.ImportState(header, *state);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(copy->step(), 3);
  EXPECT_EQ(copy->groups(), 74);

  // The same state: the same tensors, byte for byte (the metadata names the model), and the
  // same outputs.
  absl::StatusOr<std::string> again = client_->ExportState("copy");
  ASSERT_TRUE(again.ok()) << again.status();
  auto original_file = checkpoint::SafetensorsFile::Parse(*state);
  auto copy_file = checkpoint::SafetensorsFile::Parse(*again);
  ASSERT_TRUE(original_file.ok()) << original_file.status();
  ASSERT_TRUE(copy_file.ok()) << copy_file.status();
  ASSERT_EQ(copy_file->tensors().size(), original_file->tensors().size());
  EXPECT_GE(original_file->tensors().size(), 12u);  // 6 buffers of 2 linear layers
  for (const auto& [name, view] : original_file->tensors()) {
    const checkpoint::TensorView* other = copy_file->Find(name);
    ASSERT_NE(other, nullptr) << name;
    EXPECT_EQ(other->dtype, view.dtype) << name;
    EXPECT_EQ(other->shape, view.shape) << name;
    EXPECT_EQ(other->data, view.data) << name;
  }
  EXPECT_EQ(copy_file->metadata().at("step"), "3");
  EXPECT_EQ(copy_file->metadata().at("spec"), original_file->metadata().at("spec"));
  const v1::Tensor x = Proto(Input(5, 64, 9));
  absl::StatusOr<v1::ForwardResponse> y1 = client_->Forward("orig", x, false);
  absl::StatusOr<v1::ForwardResponse> y2 = client_->Forward("copy", x, false);
  ASSERT_TRUE(y1.ok() && y2.ok());
  EXPECT_EQ(y1->output().data(), y2->output().data());

  // An existing id needs replace.
  EXPECT_THAT(client_->ImportState(header, *state),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("copy")));
  header.set_replace(true);
  Train("copy", 1);
  absl::StatusOr<v1::ModelInfo> replaced = client_->ImportState(header, *state);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(replaced->step(), 3);

  // Garbage, and a damaged data section.
  header.set_model_id("garbage");
  EXPECT_THAT(client_->ImportState(header, "not a safetensors file"),
              StatusIs(absl::StatusCode::kInvalidArgument, _));
  std::string damaged = *state;
  damaged.back() ^= 0x01;
  EXPECT_THAT(client_->ImportState(header, damaged), StatusIs(absl::StatusCode::kDataLoss, _));
  EXPECT_THAT(client_->GetModel("garbage"), StatusIs(absl::StatusCode::kNotFound, _));
}

TEST_F(ClientTest, ExportImportThroughFiles) {
  Create("file", /*seed=*/4);
  Train("file", 2);
  const std::string path = ::testing::TempDir() + "/tscale-client-test-state.safetensors";
  absl::StatusOr<int64_t> bytes = client_->ExportStateToFile("file", path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(static_cast<int64_t>(ss.str().size()), *bytes);
  EXPECT_EQ(ss.str(), *client_->ExportState("file"));

  (void)client_->DeleteModel("file-copy");
  v1::ImportHeader header;
  header.set_model_id("file-copy");
  header.set_device("cpu");
  absl::StatusOr<v1::ModelInfo> copy = client_->ImportStateFromFile(header, path);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(copy->step(), 2);
  EXPECT_EQ(copy->device(), "cpu");

  EXPECT_THAT(client_->ImportStateFromFile(header, path + ".missing"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr(".missing")));
  // A failed export leaves no file behind.
  const std::string none = ::testing::TempDir() + "/tscale-client-test-none.safetensors";
  EXPECT_THAT(client_->ExportStateToFile("nope", none), StatusIs(absl::StatusCode::kNotFound, _));
  EXPECT_FALSE(std::ifstream(none).good());
  EXPECT_FALSE(std::ifstream(none + ".tmp-export").good());
  std::remove(path.c_str());
}

TEST_F(ClientTest, ScaleStats) {
  Create("stats");
  Train("stats", 3);
  absl::StatusOr<v1::ScaleStats> stats = client_->GetScaleStats("stats", false);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->model_id(), "stats");
  EXPECT_EQ(stats->step(), 3);
  ASSERT_EQ(stats->layers_size(), 2);
  const int64_t groups[] = {64, 10};
  for (int i = 0; i < 2; ++i) {
    const v1::LayerScaleStats& l = stats->layers(i);
    EXPECT_EQ(l.layer(), i == 0 ? "fc1" : "fc2");
    EXPECT_EQ(l.groups(), groups[i]);
    EXPECT_LE(l.drift_min(), l.drift_mean());
    EXPECT_LE(l.drift_mean(), l.drift_max());
    EXPECT_GE(l.drift_abs_mean(), 0);
    EXPECT_GE(l.saturated_fraction(), 0);
    EXPECT_LE(l.saturated_fraction(), 1);
    EXPECT_EQ(l.bucket_upper_size(), l.bucket_count_size());
    int64_t total = 0;
    for (int64_t c : l.bucket_count()) total += c;
    EXPECT_EQ(total, l.groups());
    EXPECT_FALSE(l.has_log2_scale());
  }

  absl::StatusOr<v1::ScaleStats> per_group = client_->GetScaleStats("stats", true);
  ASSERT_TRUE(per_group.ok()) << per_group.status();
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<std::vector<float>> log2_scale =
        TensorValues<float>(per_group->layers(i).log2_scale());
    ASSERT_TRUE(log2_scale.ok()) << log2_scale.status();
    EXPECT_THAT(*log2_scale, SizeIs(groups[i]));
  }
}

TEST_F(ClientTest, CheckpointCallsReachTheServer) {
  Create("ckpt");
  // This server has no checkpoint folder: whatever it answers is an answer, not a transport error.
  const auto answered = AnyOf(absl::StatusCode::kOk, absl::StatusCode::kUnimplemented,
                              absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(client_->SaveCheckpoint("ckpt").status().code(), answered);
  EXPECT_THAT(client_->ListCheckpoints("ckpt").status().code(), answered);
  v1::RestoreCheckpointRequest restore;
  restore.set_model_id("ckpt");
  EXPECT_THAT(client_->RestoreCheckpoint(restore).status().code(),
              AnyOf(absl::StatusCode::kOk, absl::StatusCode::kUnimplemented,
                    absl::StatusCode::kFailedPrecondition, absl::StatusCode::kNotFound));
}

// ------------------------------------------------------------------ deadlines and retries

TEST_F(ClientTest, DeadlineAlreadyPassed) {
  CallOptions past;
  past.deadline = absl::Now() - absl::Seconds(1);
  EXPECT_THAT(client_->GetServerInfo(past), StatusIs(absl::StatusCode::kDeadlineExceeded, _));
  EXPECT_THAT(client_->ListModels(past), StatusIs(absl::StatusCode::kDeadlineExceeded, _));
  CallOptions zero;
  zero.timeout = absl::ZeroDuration();
  EXPECT_THAT(client_->Health("", zero), StatusIs(absl::StatusCode::kDeadlineExceeded, _));
  EXPECT_THAT(client_->ExportState("nope", zero), StatusIs(absl::StatusCode::kDeadlineExceeded, _));
  // The client's own timeout.
  ClientOptions options;
  options.timeout = absl::ZeroDuration();
  Client impatient(server_->address(), options);
  EXPECT_THAT(impatient.GetModel("x"), StatusIs(absl::StatusCode::kDeadlineExceeded, _));
}

// Attempts cut short by attempt_timeout are retried; the last attempt may use the rest of the
// call's deadline, so a server slower than attempt_timeout still answers.
TEST_F(ClientTest, TheLastAttemptIsNotCutShort) {
  Create("slow");
  ClientOptions options;
  options.retry.max_attempts = 2;
  options.retry.initial_backoff = absl::Milliseconds(1);
  options.retry.attempt_timeout = absl::Microseconds(1);  // shorter than any call
  std::atomic<int> retries{0};
  options.on_retry = [&](int, const absl::Status& status, absl::Duration) {
    EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded);
    ++retries;
  };
  Client client(server_->address(), options);
  // A batch large enough that no attempt answers within a microsecond.
  v1::TrainStepRequest request;
  request.set_model_id("slow");
  *request.mutable_input() = Proto(Input(4096, 64, 1));
  *request.mutable_target() = Proto(Input(4096, 10, 2));
  request.set_loss(v1::TrainStepRequest::MSE);
  request.set_expected_step(0);
  absl::StatusOr<v1::TrainStepResponse> r = client.TrainStep(request);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->step(), 1);  // applied once, by the first attempt or the second
  EXPECT_EQ(retries.load(), 1);
}

// An exactly-once call whose deadline passed on its way may have been applied: the error says
// so and which step tells; sending it again is answered as a replay when it was applied.
TEST_F(ClientTest, AnExactlyOnceCallCutByItsDeadlineSaysWhichStepToRead) {
  Create("cut");
  ClientOptions options;
  options.retry.max_attempts = 1;
  Client client(server_->address(), options);
  v1::TrainStepRequest request;
  request.set_model_id("cut");
  *request.mutable_input() = Proto(Input(4096, 64, 1));
  *request.mutable_target() = Proto(Input(4096, 10, 2));
  request.set_loss(v1::TrainStepRequest::MSE);
  request.set_expected_step(0);
  CallOptions hasty;
  hasty.timeout = absl::Milliseconds(1);  // shorter than sending and running the step
  EXPECT_THAT(client.TrainStep(request, hasty),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       AllOf(HasSubstr("TrainStep with expected_step 0 may have been applied"),
                             HasSubstr("1 means it was, 0 that it was not"))));
  absl::StatusOr<v1::TrainStepResponse> again = client.TrainStep(request);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->step(), 1);
  EXPECT_THAT(client.GetModel("cut"), IsOkAndHolds(::testing::Property(&v1::ModelInfo::step, 1)));
}

// A TernaryTrainer whose first TrainStep applies but answers late (as over a slow link), and which
// answers a repeat of the same expected_step as the server does: a replay.
class LateAnswerTrainer final : public v1::TernaryTrainer::Service {
 public:
  grpc::Status TrainStep(grpc::ServerContext*, const v1::TrainStepRequest* request,
                         v1::TrainStepResponse* response) override {
    size_t calls = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      expected_steps_.push_back(request->expected_step());
      calls = expected_steps_.size();
    }
    response->set_step(request->expected_step() + 1);
    if (calls == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(800));  // applied; the answer is late
    } else {
      response->set_replayed(true);
    }
    return grpc::Status::OK;
  }
  std::vector<int64_t> expected_steps() {
    std::lock_guard<std::mutex> lock(mu_);
    return expected_steps_;
  }

 private:
  std::mutex mu_;
  std::vector<int64_t> expected_steps_;
};

// The retry of an exactly-once call whose attempt ran past its deadline finds out by itself what
// happened: it sends the same expected_step, and the server answers it as a replay.
TEST(ClientRetryTest, AnExactlyOnceCallPastItsDeadlineIsRetriedIntoTheReplay) {
  LateAnswerTrainer trainer;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&trainer);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ClientOptions options;  // the default retries
  options.timeout = absl::Milliseconds(300);
  options.retry.initial_backoff = absl::Milliseconds(700);  // the late answer goes first
  Client client(absl::StrCat("127.0.0.1:", port), options);
  v1::TrainStepRequest request;
  request.set_model_id("m");
  request.set_expected_step(41);
  absl::StatusOr<v1::TrainStepResponse> r = client.TrainStep(request);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->step(), 42);
  EXPECT_TRUE(r->replayed());
  EXPECT_THAT(trainer.expected_steps(), ElementsAre(41, 41));
  server->Shutdown(std::chrono::system_clock::now());
}

struct RetryLog {
  std::atomic<int> retries{0};
  ClientOptions Options(int max_attempts, absl::Duration initial_backoff) {
    ClientOptions options;
    options.retry.max_attempts = max_attempts;
    options.retry.initial_backoff = initial_backoff;
    options.retry.multiplier = 2;
    options.on_retry = [this](int, const absl::Status& status, absl::Duration) {
      EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
      ++retries;
    };
    return options;
  }
};

TEST(ClientRetryTest, NothingListeningIsUnavailableAfterMaxAttempts) {
  const std::string address = absl::StrCat("127.0.0.1:", FreePort());
  RetryLog log;
  Client client(address, log.Options(3, absl::Milliseconds(100)));
  const absl::Time start = absl::Now();
  EXPECT_THAT(client.ListModels(), StatusIs(absl::StatusCode::kUnavailable, _));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(log.retries, 2);
  // Waits of 100 ms and 200 ms, each lengthened by at most 20%.
  EXPECT_GE(took, absl::Milliseconds(300));

  // Safe to repeat: reads, Forward without train, UpdateCorrelation, TrainStep.
  log.retries = 0;
  EXPECT_THAT(client.Forward("m", v1::Tensor(), false),
              StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.UpdateCorrelation("m", 0), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.Health(), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.ExportState("m"), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_EQ(log.retries, 8);

  // Never repeated: one attempt each.
  log.retries = 0;
  EXPECT_THAT(client.CreateModel(CreateRequest("m")), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.DeleteModel("m"), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.Forward("m", v1::Tensor(), true), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_THAT(client.Backward("m", "p", v1::Tensor(), false),
              StatusIs(absl::StatusCode::kUnavailable, _));
  v1::ImportHeader header;
  header.set_model_id("m");
  EXPECT_THAT(client.ImportState(header, "x"), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_EQ(log.retries, 0);
}

TEST(ClientRetryTest, RetriesStopAtTheCallsDeadline) {
  const std::string address = absl::StrCat("127.0.0.1:", FreePort());
  RetryLog log;
  Client client(address, log.Options(100, absl::Milliseconds(100)));
  CallOptions call;
  call.deadline = absl::Now() + absl::Milliseconds(500);
  const absl::Time start = absl::Now();
  // The last error is the cause (UNAVAILABLE), not the deadline the waits ran into.
  EXPECT_THAT(client.GetServerInfo(call), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_GE(log.retries, 1);
  EXPECT_LT(log.retries, 5);
}

// Before the server has ever answered, a few retries only: a wrong address is not waited on for
// the whole retry time.
TEST(ClientRetryTest, AServerNeverReachedFailsFast) {
  const std::string address = absl::StrCat("127.0.0.1:", FreePort());
  RetryLog log;
  ClientOptions options = log.Options(0, absl::Milliseconds(10));  // no cap: the defaults
  Client client(address, options);
  const absl::Time start = absl::Now();
  EXPECT_THAT(client.GetServerInfo(), StatusIs(absl::StatusCode::kUnavailable, _));
  EXPECT_EQ(log.retries, 3);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// Once the server has answered, retries go on until retry_time has passed since the first
// failure, however many attempts that takes.
TEST(ClientRetryTest, RetryTimeBoundsTheRetries) {
  service::ServerOptions server_options;
  server_options.listen = "127.0.0.1:0";
  server_options.device = "cpu";
  auto server = service::Server::Start(server_options);
  ASSERT_TRUE(server.ok()) << server.status();
  RetryLog log;
  ClientOptions options = log.Options(0, absl::Milliseconds(20));
  options.retry.multiplier = 1;
  options.retry.retry_time = absl::Seconds(1);
  Client client((*server)->address(), options);
  ASSERT_TRUE(client.GetServerInfo().ok());
  (*server)->Shutdown(std::chrono::milliseconds(0));
  const absl::Time start = absl::Now();
  EXPECT_THAT(client.GetServerInfo(), StatusIs(absl::StatusCode::kUnavailable, _));
  const absl::Duration took = absl::Now() - start;
  EXPECT_GE(took, absl::Seconds(1));
  EXPECT_LT(took, absl::Seconds(4));
  EXPECT_GT(log.retries, 10);  // far beyond the first contact's 3
}

// A TrainStep running when its server shuts down (no grace) is refused at its commit point with
// UNAVAILABLE, nothing applied; the client's retries ride through the restart of the server on
// the same port from its checkpoints, and the step applies exactly once.
TEST(ClientRetryTest, ATrainStepRidesThroughAServerRestart) {
  testing::TempDir checkpoints;
  const int port = FreePort();
  service::ServerOptions server_options;
  server_options.listen = absl::StrCat("127.0.0.1:", port);
  server_options.device = "cpu";
  server_options.checkpoint_dir = checkpoints.path();
  auto first = service::Server::Start(server_options);
  ASSERT_TRUE(first.ok()) << first.status();

  std::atomic<int> retries{0};
  ClientOptions options;  // the default retries: 60 s of them
  options.on_retry = [&](int, const absl::Status&, absl::Duration) { ++retries; };
  Client client(absl::StrCat("127.0.0.1:", port), options);
  v1::CreateModelRequest create;
  create.set_model_id("big");
  v1::Layer* fc = create.mutable_spec()->add_layers();
  fc->set_name("fc");
  fc->mutable_ternary_linear()->set_in_features(2048);
  fc->mutable_ternary_linear()->set_out_features(2048);
  ASSERT_TRUE(client.CreateModel(create).ok());
  v1::TrainStepRequest request;
  request.set_model_id("big");
  *request.mutable_input() = Proto(Input(512, 2048, 1));
  *request.mutable_target() = Proto(Input(512, 2048, 2));
  request.set_loss(v1::TrainStepRequest::MSE);
  request.set_expected_step(0);
  ASSERT_THAT(client.TrainStep(request),
              IsOkAndHolds(::testing::Property(&v1::TrainStepResponse::step, 1)));

  request.set_expected_step(1);
  absl::StatusOr<v1::TrainStepResponse> result;
  std::thread caller([&] { result = client.TrainStep(request); });
  // Shut down while the step computes (bounded: 60 s).
  for (int i = 0; i < 6000 && (*first)->running_calls() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GT((*first)->running_calls(), 0) << "the step never ran";
  (*first)->Shutdown(std::chrono::milliseconds(0));  // checkpoints the model, at step 1
  first->reset();
  // Down for longer than a few retries take (4 attempts, the old default, last under 1 s).
  std::this_thread::sleep_for(std::chrono::seconds(2));
  auto second = service::Server::Start(server_options);
  ASSERT_TRUE(second.ok()) << second.status();
  caller.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->step(), 2);
  EXPECT_FALSE(result->replayed());
  EXPECT_GE(retries.load(), 1);
  EXPECT_THAT(client.GetModel("big"), IsOkAndHolds(::testing::Property(&v1::ModelInfo::step, 2)));
  (*second)->Shutdown(std::chrono::milliseconds(0));
}

TEST(ClientRetryTest, ARetryReachesAServerThatCameUp) {
  const int port = FreePort();
  RetryLog log;
  Client client(absl::StrCat("127.0.0.1:", port), log.Options(20, absl::Milliseconds(100)));
  std::unique_ptr<service::Server> server;
  std::thread starter([&] {
    absl::SleepFor(absl::Milliseconds(400));
    service::ServerOptions options;
    options.listen = absl::StrCat("127.0.0.1:", port);
    options.device = "cpu";
    auto started = service::Server::Start(options);
    ASSERT_TRUE(started.ok()) << started.status();
    server = *std::move(started);
  });
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  starter.join();
  EXPECT_TRUE(info.ok()) << info.status();
  EXPECT_GE(log.retries, 1);
  if (server) server->Shutdown(std::chrono::milliseconds(0));
}

// ------------------------------------------------------------------ tensors

TEST(TensorTest, EveryDtypeRoundTripsThroughAten) {
  const std::pair<at::ScalarType, v1::DataType> types[] = {
      {at::kFloat, v1::FP32}, {at::kBFloat16, v1::BF16}, {at::kHalf, v1::FP16},
      {at::kChar, v1::INT8},  {at::kByte, v1::UINT8},    {at::kInt, v1::INT32},
      {at::kLong, v1::INT64}};
  for (const auto& [type, dtype] : types) {
    SCOPED_TRACE(c10::toString(type));
    const at::Tensor t = (at::randn({3, 5}) * 50).to(type);
    absl::StatusOr<v1::Tensor> proto = ToProtoTensor(t);
    ASSERT_TRUE(proto.ok()) << proto.status();
    EXPECT_EQ(proto->dtype(), dtype);
    EXPECT_THAT(Shape(*proto), ElementsAre(3, 5));
    EXPECT_EQ(proto->data().size(), 15 * t.element_size());
    EXPECT_THAT(ValidateTensor(*proto), IsOkAndHolds(15));
    absl::StatusOr<at::Tensor> back = FromProtoTensor(*proto);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->scalar_type(), type);
    EXPECT_TRUE(at::equal(*back, t));
    EXPECT_THAT(ToScalarType(dtype), IsOkAndHolds(type));
    EXPECT_THAT(ToDataType(type), IsOkAndHolds(dtype));
    if (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) {
      absl::StatusOr<std::vector<float>> floats = TensorFloats(*proto);
      ASSERT_TRUE(floats.ok()) << floats.status();
      const at::Tensor wide = t.to(at::kFloat).contiguous();
      EXPECT_EQ(*floats, std::vector<float>(wide.data_ptr<float>(), wide.data_ptr<float>() + 15));
    }
  }
}

TEST(TensorTest, LayoutAndShapes) {
  // Non-contiguous: the proto holds the row-major elements of the logical tensor.
  const at::Tensor base = at::arange(12, at::kFloat).reshape({3, 4});
  const at::Tensor transposed = base.t();
  ASSERT_FALSE(transposed.is_contiguous());
  absl::StatusOr<v1::Tensor> proto = ToProtoTensor(transposed);
  ASSERT_TRUE(proto.ok()) << proto.status();
  EXPECT_THAT(Shape(*proto), ElementsAre(4, 3));
  EXPECT_THAT(TensorValues<float>(*proto),
              IsOkAndHolds(ElementsAre(0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11)));
  EXPECT_TRUE(at::equal(*FromProtoTensor(*proto), transposed));

  // A scalar (no dimensions, one element) and an empty tensor.
  absl::StatusOr<v1::Tensor> scalar = ToProtoTensor(at::scalar_tensor(2.5, at::kDouble));
  EXPECT_THAT(scalar.status(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("Double")));
  scalar = ToProtoTensor(at::scalar_tensor(2.5, at::kFloat));
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_EQ(scalar->shape_size(), 0);
  EXPECT_THAT(TensorValues<float>(*scalar), IsOkAndHolds(ElementsAre(2.5f)));
  EXPECT_EQ(FromProtoTensor(*scalar)->dim(), 0);
  absl::StatusOr<v1::Tensor> empty = ToProtoTensor(at::zeros({0, 7}, at::kLong));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->data().empty());
  EXPECT_THAT(FromProtoTensor(*empty)->sizes().vec(), ElementsAre(0, 7));

  EXPECT_THAT(ToProtoTensor(at::Tensor()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("defined")));
  EXPECT_THAT(ToProtoTensor(at::ones({2}, at::kBool)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("Bool")));
}

TEST(TensorTest, MalformedProtoTensorsAreRejected) {
  v1::Tensor t = *MakeTensor(std::vector<float>(6, 1.0f), std::vector<int64_t>{2, 3});
  t.mutable_data()->resize(20);
  EXPECT_THAT(FromProtoTensor(t, "input"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input.data: expected 24 bytes (FP32 [2, 3]), got 20")));
  EXPECT_THAT(TensorValues<float>(t), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("tensor.data: expected 24 bytes")));

  t = *MakeTensor(std::vector<float>(6, 1.0f), std::vector<int64_t>{2, 3});
  t.set_shape(1, -3);
  EXPECT_THAT(FromProtoTensor(t, "input"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input.shape[1]: expected >= 0, got -3")));

  t = *MakeTensor(std::vector<float>(6, 1.0f), std::vector<int64_t>{2, 3});
  t.set_dtype(v1::DATA_TYPE_UNSPECIFIED);
  EXPECT_THAT(
      FromProtoTensor(t, "input"),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input.dtype: expected one of FP32")));
  t.set_dtype(static_cast<v1::DataType>(42));
  EXPECT_THAT(ValidateTensor(t), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("42")));

  // A shape whose byte count overflows int64 is not taken for a valid one.
  v1::Tensor huge;
  huge.set_dtype(v1::INT64);
  for (int64_t d : {int64_t{1} << 32, int64_t{1} << 32}) huge.add_shape(d);
  EXPECT_THAT(ValidateTensor(huge),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("more bytes than an int64")));
  // ... unless a zero dimension makes it empty.
  huge.add_shape(0);
  EXPECT_THAT(ValidateTensor(huge), IsOkAndHolds(0));
}

TEST(TensorTest, PlainBuffers) {
  absl::StatusOr<v1::Tensor> f = MakeTensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->dtype(), v1::FP32);
  EXPECT_EQ(DescribeTensor(*f), "FP32 [2, 3]");
  EXPECT_THAT(TensorValues<float>(*f), IsOkAndHolds(ElementsAre(1, 2, 3, 4, 5, 6)));
  EXPECT_TRUE(at::equal(*FromProtoTensor(*f), at::arange(1, 7, at::kFloat).reshape({2, 3})));

  EXPECT_THAT(TensorValues<int8_t>(*MakeTensor(std::vector<int8_t>{-1, 0, 1}, {3})),
              IsOkAndHolds(ElementsAre(-1, 0, 1)));
  EXPECT_THAT(TensorValues<uint8_t>(*MakeTensor(std::vector<uint8_t>{255}, {1, 1})),
              IsOkAndHolds(ElementsAre(255)));
  EXPECT_THAT(TensorValues<int32_t>(*MakeTensor(std::vector<int32_t>{-7, 7}, {2})),
              IsOkAndHolds(ElementsAre(-7, 7)));
  EXPECT_THAT(TensorValues<int64_t>(*MakeTensor(std::vector<int64_t>{int64_t{1} << 40}, {})),
              IsOkAndHolds(ElementsAre(int64_t{1} << 40)));

  EXPECT_THAT(TensorValues<int64_t>(*f), StatusIs(absl::StatusCode::kInvalidArgument,
                                                  HasSubstr("dtype: expected INT64, got FP32")));
  EXPECT_THAT(MakeTensor(std::vector<float>{1, 2, 3}, {2, 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("values: expected 4")));
  EXPECT_THAT(MakeTensor(std::vector<float>{1, 2}, {2, -1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape[1]")));
  EXPECT_THAT(TensorFloats(*MakeTensor(std::vector<int32_t>{1}, {1})),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("INT32")));
  EXPECT_EQ(DataTypeSize(v1::BF16), 2u);
  EXPECT_EQ(DataTypeSize(v1::DATA_TYPE_UNSPECIFIED), 0u);
}

TEST(StatusTest, GrpcStatusKeepsCodeAndMessage) {
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  EXPECT_THAT(FromGrpcStatus(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "stale")),
              StatusIs(absl::StatusCode::kFailedPrecondition, "stale"));
  EXPECT_THAT(FromGrpcStatus(grpc::Status(grpc::StatusCode::DATA_LOSS, "crc")),
              StatusIs(absl::StatusCode::kDataLoss, "crc"));
}

TEST_F(ClientTest, TrainStreamEqualsTrainStepsAndStopsAtTheFirstFailure) {
  Create("streamed", 6);
  Create("unary", 6);
  auto request_of = [](int64_t k, int64_t width) {
    v1::TrainStepRequest request;
    *request.mutable_input() = Proto(Input(8, width, 300 + k));
    *request.mutable_target() = Proto(Input(8, 10, 400 + k));
    request.set_loss(v1::TrainStepRequest::MSE);
    return request;
  };
  int64_t produced = 0;
  std::vector<v1::TrainStepResponse> answers;
  absl::Status s = client_->TrainStream(
      "streamed", 0,
      [&]() -> std::optional<v1::TrainStepRequest> {
        if (produced == 12) return std::nullopt;
        return request_of(produced++, 64);
      },
      [&](const v1::TrainStepResponse& r) { answers.push_back(r); });
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(answers.size(), 12u);
  for (int64_t k = 0; k < 12; ++k) {
    v1::TrainStepRequest request = request_of(k, 64);
    request.set_model_id("unary");
    request.set_expected_step(k);
    absl::StatusOr<v1::TrainStepResponse> r = client_->TrainStep(request);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(answers[k].step(), k + 1);
    EXPECT_EQ(answers[k].loss(), r->loss()) << "step " << k;
  }
  // The same state: the same outputs, bit for bit.
  const v1::Tensor probe = Proto(Input(16, 64, 999));
  auto streamed = client_->Forward("streamed", probe, false);
  auto unary = client_->Forward("unary", probe, false);
  ASSERT_TRUE(streamed.ok() && unary.ok());
  EXPECT_EQ(streamed->output().data(), unary->output().data());

  // The fourth step's input is too narrow: the stream ends with its error, naming its
  // expected_step, and nothing after it applies.
  produced = 0;
  answers.clear();
  s = client_->TrainStream(
      "streamed", -1,
      [&]() -> std::optional<v1::TrainStepRequest> {
        if (produced == 8) return std::nullopt;
        const int64_t k = produced++;
        return request_of(k, k == 3 ? 63 : 64);
      },
      [&](const v1::TrainStepResponse& r) { answers.push_back(r); });
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected_step 15")));
  EXPECT_EQ(answers.size(), 3u);
  EXPECT_EQ(client_->GetModel("streamed")->step(), 15);
}

TEST_F(ClientTest, AGzipClientGetsTheSameAnswers) {
  Create("gz", 3);
  Train("gz", 2);
  ClientOptions options;
  options.gzip = true;
  Client gzip(server_->address(), options);
  auto plain = client_->ExportState("gz");
  auto zipped = gzip.ExportState("gz");
  ASSERT_TRUE(plain.ok() && zipped.ok()) << plain.status() << zipped.status();
  EXPECT_EQ(*plain, *zipped);
  const v1::Tensor probe = Proto(Input(4, 64, 7));
  auto a = client_->Forward("gz", probe, false);
  auto b = gzip.Forward("gz", probe, false);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->output().data(), b->output().data());
}

}  // namespace
}  // namespace tscale::client
