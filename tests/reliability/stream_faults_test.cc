// Clients that go away in the middle of a stream, against a real gRPC server on loopback:
// ImportState cancelled after part of the file (or after all of it, before the end of the
// stream), ExportState cancelled after its first chunk or left unread with the channel dropped.
// The server stays up, no model is imported in part or at all, the exported model is unchanged,
// and the next import and export work.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "client/cpp/client.h"
#include "tests/integration/rpc_test_util.h"
#include "tests/unit/test_util.h"
#include "server/service/server.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale {
namespace {

using testing::LinearSpec;


class StreamFaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.device = testing::TestDeviceName();
    auto server = service::Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    client_ = std::make_unique<client::Client>(NewChannel());
    // About 9 MiB of state (group size 1: one int64 corr_accum per weight): nine export chunks.
    v1::CreateModelRequest req;
    req.set_model_id("big");
    *req.mutable_spec() = LinearSpec(1024, 1024, 1);
    req.set_seed(1);
    ASSERT_TRUE(client_->CreateModel(req).ok());
    auto state = client_->ExportState("big");
    ASSERT_TRUE(state.ok()) << state.status();
    state_ = *std::move(state);
    ASSERT_GT(state_.size(), 8u << 20);
  }
  void TearDown() override { server_->Shutdown(std::chrono::seconds(5)); }

  // A channel of its own (its own connection), as another process would have.
  std::shared_ptr<grpc::Channel> NewChannel() {
    return testing::UnlimitedChannel(server_->address(), /*own_connection=*/true);
  }

  // The server is up, "big" is as it was, `id` holds no model, and a full import into `id` and
  // an export of it work.
  void ExpectIntact(const std::string& id) {
    auto serving = client_->Health();
    ASSERT_TRUE(serving.ok()) << serving.status();
    EXPECT_EQ(*serving, client::ServingStatus::kServing);
    EXPECT_EQ(client_->GetModel(id).status().code(), absl::StatusCode::kNotFound)
        << "a cancelled import left a model '" << id << "'";
    auto models = client_->ListModels();
    ASSERT_TRUE(models.ok());
    EXPECT_EQ(models->size(), 1u);
    auto again = client_->ExportState("big");
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(*again == state_) << "the exported state of 'big' changed";
    v1::ImportHeader header;
    header.set_model_id(id);
    auto imported = client_->ImportState(header, state_);
    ASSERT_TRUE(imported.ok()) << imported.status();
    auto copy = client_->ExportState(id);
    ASSERT_TRUE(copy.ok()) << copy.status();
    EXPECT_EQ(copy->size(), state_.size());
    ASSERT_TRUE(client_->DeleteModel(id).ok());
  }

  // Starts ImportState on a channel of its own, sends the header and the first `bytes` of the
  // state in 64 KiB chunks, then cancels without ending the stream.
  grpc::Status ImportThenCancel(const std::string& id, size_t bytes) {
    auto channel = NewChannel();
    auto stub = v1::TernaryTrainer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    auto writer = stub->ImportState(&ctx, &info);
    v1::ImportStateRequest header;
    header.mutable_header()->set_model_id(id);
    EXPECT_TRUE(writer->Write(header));
    for (size_t off = 0; off < bytes; off += 64 << 10) {
      v1::ImportStateRequest chunk;
      chunk.set_data(state_.substr(off, std::min<size_t>(64 << 10, bytes - off)));
      if (!writer->Write(chunk)) break;
    }
    ctx.TryCancel();
    return writer->Finish();
  }

  std::unique_ptr<service::Server> server_;
  std::unique_ptr<client::Client> client_;
  std::string state_;
};

TEST_F(StreamFaultsTest, ImportCancelledInTheMiddleImportsNothing) {
  for (size_t bytes : {size_t{0}, size_t{8}, state_.size() / 3, state_.size() - 1}) {
    SCOPED_TRACE(bytes);
    const grpc::Status s = ImportThenCancel("half", bytes);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
    ExpectIntact("half");
  }
}

// The whole file arrived but the stream never ended: the client gave up, so nothing is imported
// (the import runs only on the client's end of the stream, never on a cancellation).
TEST_F(StreamFaultsTest, ImportCancelledAfterTheWholeFileImportsNothing) {
  for (int i = 0; i < 3; ++i) {
    const grpc::Status s = ImportThenCancel("whole", state_.size());
    EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
    // Give a wrongly started import the time to land before looking.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ExpectIntact("whole");
  }
}

TEST_F(StreamFaultsTest, ImportIntoAnExistingIdCancelledLeavesItAsItWas) {
  for (size_t bytes : {state_.size() / 2, state_.size()}) {
    auto channel = NewChannel();
    auto stub = v1::TernaryTrainer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    auto writer = stub->ImportState(&ctx, &info);
    v1::ImportStateRequest header;
    header.mutable_header()->set_model_id("big");
    header.mutable_header()->set_replace(true);
    ASSERT_TRUE(writer->Write(header));
    // Another model's state, so that a replacement would show.
    v1::CreateModelRequest other;
    other.set_model_id("other");
    *other.mutable_spec() = LinearSpec(1024, 1024, 1);
    other.set_seed(99);
    ASSERT_TRUE(client_->CreateModel(other).ok());
    auto other_state = client_->ExportState("other");
    ASSERT_TRUE(other_state.ok());
    ASSERT_TRUE(client_->DeleteModel("other").ok());
    for (size_t off = 0; off < bytes; off += 64 << 10) {
      v1::ImportStateRequest chunk;
      chunk.set_data(other_state->substr(off, std::min<size_t>(64 << 10, bytes - off)));
      if (!writer->Write(chunk)) break;
    }
    ctx.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ExpectIntact("copy");
  }
}

TEST_F(StreamFaultsTest, ExportCancelledAfterTheFirstChunk) {
  for (int i = 0; i < 3; ++i) {
    auto channel = NewChannel();
    auto stub = v1::TernaryTrainer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ExportStateRequest req;
    req.set_model_id("big");
    auto reader = stub->ExportState(&ctx, req);
    v1::StateChunk chunk;
    ASSERT_TRUE(reader->Read(&chunk));
    EXPECT_GT(chunk.data().size(), 0u);
    ctx.TryCancel();
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    ExpectIntact("copy");
  }
}

// The client reads nothing and its channel goes away while the server still has chunks to send.
TEST_F(StreamFaultsTest, ExportToAClientThatDropsItsChannel) {
  for (int i = 0; i < 3; ++i) {
    {
      auto channel = NewChannel();
      auto stub = v1::TernaryTrainer::NewStub(channel);
      auto ctx = std::make_unique<grpc::ClientContext>();
      ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      v1::ExportStateRequest req;
      req.set_model_id("big");
      auto reader = stub->ExportState(ctx.get(), req);
      v1::StateChunk chunk;
      ASSERT_TRUE(reader->Read(&chunk));
      // Stop reading: the deadline ends the call with the server's writes unread; then the
      // stream, its context, the stub and the channel are all dropped.
      const grpc::Status s = reader->Finish();
      EXPECT_FALSE(s.ok());
      std::cout << "export left unread ended with " << s.error_code() << ": " << s.error_message()
                << "\n";
    }
    ExpectIntact("copy");
  }
  // Many at once, with an import running meanwhile.
  std::vector<std::thread> readers;
  for (int i = 0; i < 8; ++i) {
    readers.emplace_back([this] {
      auto channel = NewChannel();
      auto stub = v1::TernaryTrainer::NewStub(channel);
      grpc::ClientContext ctx;
      v1::ExportStateRequest req;
      req.set_model_id("big");
      auto reader = stub->ExportState(&ctx, req);
      v1::StateChunk chunk;
      (void)reader->Read(&chunk);
      ctx.TryCancel();
      (void)reader->Finish();
    });
  }
  v1::ImportHeader header;
  header.set_model_id("during");
  EXPECT_TRUE(client_->ImportState(header, state_).ok());
  for (auto& t : readers) t.join();
  ASSERT_TRUE(client_->DeleteModel("during").ok());
  ExpectIntact("copy");
}

}  // namespace
}  // namespace tscale
