// Transport security and tokens through a real server on loopback: TLS, mutual TLS, bearer
// tokens (constant-time, re-read on demand), and options that are refused with the flag named.
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/service/auth.h"
#include "server/service/server.h"
#include "tests/unit/files.h"
#include "tests/unit/test_util.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace tscale {
namespace {

using ::testing::HasSubstr;
using testing::StatusIs;

std::string Read(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void Write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::trunc) << text;
}

// One call that needs the service: GetServerInfo, with an optional token.
grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel, const std::string& token = "") {
  auto stub = v1::TernaryTrainer::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!token.empty()) ctx.AddMetadata("authorization", token);
  v1::ServerInfo info;
  return stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
}

std::unique_ptr<service::Server> Start(service::ServerOptions options) {
  options.listen = "127.0.0.1:0";
  options.device = testing::TestDeviceName();
  auto server = service::Server::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    const std::string script = std::string(std::getenv("TSCALE_TEST_SCRIPTS") ?: "tests/integration") +
                               "/make_test_certs.sh";
    ASSERT_EQ(std::system(("bash " + script + " " + dir_->path()).c_str()), 0);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Path(const std::string& name) { return dir_->path() + "/" + name; }

  // client: "" for no client certificate, else the name of one ("client": signed by ca.pem;
  // "stranger": signed by other-ca.pem).
  static std::shared_ptr<grpc::Channel> TlsChannel(const std::string& address,
                                                   const std::string& client,
                                                   const std::string& ca = "ca.pem") {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Read(Path(ca));
    if (!client.empty()) {
      ssl.pem_private_key = Read(Path(client + ".key"));
      ssl.pem_cert_chain = Read(Path(client + ".pem"));
    }
    return grpc::CreateChannel(address, grpc::SslCredentials(ssl));
  }

  static testing::TempDir* dir_;
};

testing::TempDir* SecurityTest::dir_ = nullptr;

TEST_F(SecurityTest, Tls) {
  service::ServerOptions options;
  options.tls_cert = Path("server.pem");
  options.tls_key = Path("server.key");
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(Call(TlsChannel(server->address(), "")).ok());
  // Plaintext to a TLS server, or a server certificate from an unknown CA: no connection.
  EXPECT_EQ(Call(grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()))
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(TlsChannel(server->address(), "", "other-ca.pem")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, MutualTls) {
  service::ServerOptions options;
  options.tls_cert = Path("server.pem");
  options.tls_key = Path("server.key");
  options.tls_client_ca = Path("ca.pem");
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(Call(TlsChannel(server->address(), "client")).ok());
  // No client certificate, or one from a CA the server does not trust: refused.
  EXPECT_EQ(Call(TlsChannel(server->address(), "")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(TlsChannel(server->address(), "stranger")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, BadTlsOptionsNameTheFlag) {
  service::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.tls_cert = Path("server.pem");
  EXPECT_THAT(service::Server::Start(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no --tls-key")));
  options.tls_key = Path("server.csr.missing");
  EXPECT_THAT(service::Server::Start(options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--tls-key: expected a readable PEM file")));
  options.tls_key = Path("server.key");
  options.tls_client_ca = Path("server.ext");
  EXPECT_THAT(service::Server::Start(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--tls-client-ca")));
}

TEST_F(SecurityTest, BearerTokens) {
  Write(Path("tokens"), "# operators\nalpha-token\n\n  beta-token  \n");
  service::ServerOptions options;
  options.auth_token_file = Path("tokens");
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  EXPECT_TRUE(Call(channel, "Bearer alpha-token").ok());
  EXPECT_TRUE(Call(channel, "Bearer beta-token").ok());
  const grpc::Status none = Call(channel);
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(none.error_message(), HasSubstr("got none"));
  for (const char* bad : {"Bearer alpha", "Bearer alpha-token2", "alpha-token", "Basic alpha-token",
                          "Bearer # operators"}) {
    const grpc::Status s = Call(channel, bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad;
    EXPECT_THAT(s.error_message(), ::testing::Not(HasSubstr("alpha"))) << bad;
  }
  // Streams are guarded too.
  {
    auto stub = v1::TernaryTrainer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ExportStateRequest req;
    req.set_model_id("m");
    auto reader = stub->ExportState(&ctx, req);
    v1::StateChunk chunk;
    while (reader->Read(&chunk)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    auto stub = v1::TernaryTrainer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    auto writer = stub->ImportState(&ctx, &info);
    v1::ImportStateRequest header;
    header.mutable_header()->set_model_id("m");
    writer->Write(header);
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // The file read again: the new token in, the old ones out; a bad file keeps the tokens in use.
  Write(Path("tokens"), "gamma-token\n");
  ASSERT_TRUE(server->ReloadTokens().ok());
  EXPECT_TRUE(Call(channel, "Bearer gamma-token").ok());
  EXPECT_EQ(Call(channel, "Bearer alpha-token").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  Write(Path("tokens"), "# nothing\n");
  EXPECT_THAT(server->ReloadTokens(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected at least one token")));
  EXPECT_TRUE(Call(channel, "Bearer gamma-token").ok());
}

TEST_F(SecurityTest, TokenFileErrors) {
  service::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.auth_token_file = Path("no-such-file");
  EXPECT_THAT(service::Server::Start(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--auth-token-file: cannot read")));
  Write(Path("empty-tokens"), "\n# none\n");
  options.auth_token_file = Path("empty-tokens");
  EXPECT_THAT(service::Server::Start(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected at least one token")));
}

TEST(TokenAuthTest, ComparesWholeTokens) {
  testing::TempDir dir;
  Write(dir.path() + "/t", "abc\n");
  auto auth = service::TokenAuth::Load(dir.path() + "/t");
  ASSERT_TRUE(auth.ok());
  EXPECT_TRUE((*auth)->Check("Bearer abc").ok());
  for (const char* bad : {"Bearer ab", "Bearer abcd", "Bearer ", "Bearer", "", "bearer abc"}) {
    EXPECT_THAT((*auth)->Check(bad), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_))
        << bad;
  }
}

}  // namespace
}  // namespace tscale
