#include "server/service/server.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <climits>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/resource_quota.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "server/checkpoint/checkpointer.h"
#include "server/checkpoint/store.h"
#include "server/core/device.h"
#include "server/metrics/http_exposer.h"
#include "server/metrics/metrics.h"
#include "server/service/auth.h"
#include "server/service/trainer_service.h"
#include "server/service/worker_pool.h"
#if TSCALE_WITH_GROUP
#include "server/group/replica_group.h"
#endif

#ifndef TSCALE_VERSION
#define TSCALE_VERSION "unknown"
#endif

namespace tscale::service {
namespace {

std::string Hostname() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "";
  return name;
}


constexpr char kServiceName[] = "tscale.v1.TernaryTrainer";
// How long after its grace period the server waits for calls that are still computing to reach
// their commit point, where they are refused with UNAVAILABLE, before gRPC cancels them.
constexpr std::chrono::seconds kShutdownOverrun(30);
constexpr int64_t kMaxMessageBytesLimit = int64_t{1} << 30;
// Keepalive: how long the server waits for the answer to its ping before it closes the
// connection.
constexpr int kKeepaliveTimeoutMs = 20'000;
// Client pings (without data) closer together than this are strikes; after kMaxPingStrikes the
// server closes the connection (GOAWAY "too_many_pings"), so a client cannot flood it with pings.
// The project's clients ping every 60 s; 10 s leaves room for other well-behaved clients.
constexpr int kMinClientPingIntervalMs = 10'000;
constexpr int kMaxPingStrikes = 2;
// Threads gRPC itself may run for synchronous services (server reflection); the API's calls run
// on the worker threads.
constexpr int kMaxGrpcThreads = 64;

// Takes gRPC's server reflection out of one server. Linking the reflection library registers its
// plugin for every ServerBuilder of the process at static initialisation, so without this option
// reflection would be served whatever --reflection says.
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    const std::string name = grpc::reflection::ProtoServerReflectionPlugin().name();
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [&](const auto& plugin) { return plugin->name() == name; }),
                   plugins->end());
  }
};

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view flag) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) text.clear();
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": expected a readable PEM file, got '", path, "'"));
  }
  return text;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TlsCredentials(
    const ServerOptions& options) {
  if (options.tls_cert.empty() || options.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert, --tls-key: expected both (and --tls-client-ca only with them), got " +
        std::string(options.tls_cert.empty() ? "no --tls-cert" : "no --tls-key"));
  }
  auto cert = ReadPem(options.tls_cert, "tls-cert");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(options.tls_key, "tls-key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!options.tls_client_ca.empty()) {
    auto ca = ReadPem(options.tls_client_ca, "tls-client-ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(ssl);
}

absl::Status Positive(int64_t value, absl::string_view flag) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": expected > 0, got ", value));
}

}  // namespace

struct Server::Impl {
  std::unique_ptr<TokenAuth> auth;
  std::unique_ptr<metrics::Metrics> metrics;
  std::unique_ptr<metrics::HttpExposer> exposer;
  std::unique_ptr<checkpoint::CheckpointStore> store;
  std::unique_ptr<checkpoint::Checkpointer> checkpointer;
  bool checkpoint_on_shutdown = false;
  std::unique_ptr<WorkerPool> pool;
  std::unique_ptr<TrainerService> service;
#if TSCALE_WITH_GROUP
  class GroupHealth;
  std::unique_ptr<GroupHealth> group_health;
  std::unique_ptr<group::ReplicaGroup> group;
#endif
  std::string group_description;
  std::unique_ptr<grpc::Server> server;
  std::string host;
  absl::Mutex mu;
  bool shut_down ABSL_GUARDED_BY(mu) = false;
  absl::Notification done;
};

#if TSCALE_WITH_GROUP
// Reports the group's state to the metrics and to health checking: SERVING while formed.
class Server::Impl::GroupHealth final : public group::GroupObserver {
 public:
  explicit GroupHealth(metrics::Metrics* metrics) : metrics_(metrics) {}
  void Formed(bool formed, int) override {
    absl::MutexLock lock(&mu_);
    formed_ = formed;
    if (metrics_ != nullptr) metrics_->SetGroupFormed(formed);
    Apply();
  }
  void Exchanged(double seconds, int64_t bytes) override {
    if (metrics_ != nullptr) metrics_->ObserveGroupExchange(seconds, bytes);
  }
  void Synced(double seconds, int64_t bytes) override {
    if (metrics_ != nullptr) metrics_->ObserveGroupSync(seconds, bytes);
  }
  void CallFailed(absl::string_view reason) override {
    if (metrics_ != nullptr) metrics_->CountGroupFailure(reason);
  }
  // Health follows the group from now on; nullptr once shutting down.
  void Serve(grpc::Server* server) {
    absl::MutexLock lock(&mu_);
    server_ = server;
    Apply();
  }

 private:
  void Apply() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (server_ == nullptr) return;
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    health->SetServingStatus(kServiceName, formed_);
    health->SetServingStatus(formed_);
  }
  metrics::Metrics* const metrics_;
  absl::Mutex mu_;
  bool formed_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Server* server_ ABSL_GUARDED_BY(mu_) = nullptr;
};
#endif


Server::Server() : impl_(std::make_unique<Impl>()) {}

Server::~Server() { Shutdown(std::chrono::milliseconds(0)); }

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.max_message_bytes < 1024 || options.max_message_bytes > kMaxMessageBytesLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-message-bytes: expected 1024 to ", kMaxMessageBytesLimit, ", got ",
                     options.max_message_bytes));
  }
  if (options.stream_window < 1 || options.stream_window > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--stream-window: expected 1 to 1024 steps, got ", options.stream_window));
  }
  for (auto [value, flag] : {std::pair<int64_t, const char*>{options.max_import_bytes,
                                                             "max-import-bytes"},
                             {options.max_pending_passes, "max-pending-passes"},
                             {options.max_pending_bytes, "max-pending-bytes"}}) {
    if (absl::Status s = Positive(value, flag); !s.ok()) return s;
  }
  for (auto [value, flag] :
       {std::pair<int64_t, const char*>{options.checkpoint_every_steps, "checkpoint-every-steps"},
        {options.checkpoint_every_seconds, "checkpoint-every-seconds"},
        {options.checkpoint_keep, "checkpoint-keep"},
        {options.deleted_retention_hours, "deleted-retention-hours"}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": expected >= 0, got ", value));
    }
  }
  if (options.metrics_max_layers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-max-layers: expected >= 1, got ",
                                                   options.metrics_max_layers));
  }
  for (auto [value, flag] :
       {std::pair<int64_t, const char*>{options.max_models, "max-models"},
        {options.max_device_bytes, "max-device-bytes"},
        {options.pending_pass_ttl_seconds, "pending-pass-ttl-seconds"}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": expected >= 0 (0: no limit), got ", value));
    }
  }
  if (options.keepalive_seconds < 0 || options.keepalive_seconds > 86400) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--keepalive-seconds: expected 0 (no pings) to 86400, got ", options.keepalive_seconds));
  }
  if (options.max_concurrent_streams < 1 || options.max_concurrent_streams > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("--max-concurrent-streams: expected 1 to ",
                                                   INT_MAX, ", got ",
                                                   options.max_concurrent_streams));
  }
  if (options.grpc_memory_bytes < 2 * options.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--grpc-memory-bytes: expected at least twice --max-message-bytes (",
        2 * options.max_message_bytes, "), got ", options.grpc_memory_bytes));
  }
  if (options.worker_threads < 0 || options.worker_threads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--worker-threads: expected 0 (automatic) to 1024, got ", options.worker_threads));
  }
  const size_t colon = options.listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == options.listen.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen: expected HOST:PORT, got '", options.listen, "'"));
  }
  TrainerOptions trainer;
  if (options.device.empty()) {
    trainer.default_device = core::DefaultDevice();
  } else {
    auto device = core::ParseDevice(options.device);
    if (!device.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--device: ", device.status().message()));
    }
    trainer.default_device = *device;
  }
  trainer.max_message_bytes = options.max_message_bytes;
  trainer.max_import_bytes = options.max_import_bytes;
  trainer.stream_window = static_cast<int>(options.stream_window);
  trainer.model.max_pending_passes = options.max_pending_passes;
  trainer.model.max_pending_bytes = options.max_pending_bytes;
  trainer.model.pending_pass_ttl = absl::Seconds(options.pending_pass_ttl_seconds);
  trainer.model.cuda_graphs = options.cuda_graphs;
  trainer.limits.max_models = options.max_models;
  trainer.limits.max_device_bytes = options.max_device_bytes;

  std::unique_ptr<Server> server(new Server());
  Impl& impl = *server->impl_;
  const int threads = options.worker_threads > 0
                          ? options.worker_threads
                          : std::max(4, static_cast<int>(std::thread::hardware_concurrency()));
  impl.pool = std::make_unique<WorkerPool>(threads);
  impl.service = std::make_unique<TrainerService>(trainer, impl.pool.get());
  impl.host = options.listen.substr(0, colon);

  if (!options.metrics_listen.empty()) {
    metrics::MetricsOptions metrics_options;
    metrics_options.max_layers_per_model = options.metrics_max_layers;
    impl.metrics = std::make_unique<metrics::Metrics>(&impl.service->registry(), metrics_options,
                                                      TSCALE_VERSION);
    impl.service->set_metrics(impl.metrics.get());
  }

  if (!options.checkpoint_dir.empty()) {
    auto log = [](const std::string& line) {
      std::cerr << "tscale-server: checkpoint: " << line << std::endl;
    };
    auto store = checkpoint::CheckpointStore::Open(options.checkpoint_dir, log,
                                                   absl::Hours(options.deleted_retention_hours));
    if (!store.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--checkpoint-dir: ", store.status().message()));
    }
    impl.store = *std::move(store);
    checkpoint::CheckpointPolicy policy;
    policy.every_steps = options.checkpoint_every_steps;
    policy.every_seconds = options.checkpoint_every_seconds;
    policy.keep = options.checkpoint_keep;
    impl.checkpointer = std::make_unique<checkpoint::Checkpointer>(
        impl.store.get(), &impl.service->registry(), policy,
        std::map<std::string, std::string>{{"server_version", TSCALE_VERSION}}, log);
    impl.checkpoint_on_shutdown = options.checkpoint_on_shutdown;
    if (impl.metrics != nullptr) {
      impl.checkpointer->set_observer([m = impl.metrics.get()](const char* op,
                                                               const std::string& model, bool ok,
                                                               double seconds) {
        m->ObserveCheckpoint(op, model, ok, seconds);
      });
    }
    // Models come back before the server listens: no request sees them missing.
    impl.checkpointer->RestoreAll(trainer.default_device, trainer.model);
    impl.service->set_checkpointer(impl.checkpointer.get());
  }

  auto group_config = group::ResolveGroupConfig(
      options.group,
      [](const char* name) -> std::optional<std::string> {
        const char* v = std::getenv(name);
        return v != nullptr ? std::optional<std::string>(v) : std::nullopt;
      },
      Hostname());
  if (!group_config.ok()) return group_config.status();
  if (group_config->has_value()) {
#if TSCALE_WITH_GROUP
    const group::GroupConfig& config = **group_config;
    if (!group::ReplicaGroup::HasGloo() && !trainer.default_device.is_cuda()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--group-size: this tscale-server's groups run over NCCL alone (its LibTorch came "
          "without Gloo's headers), which needs the models on a GPU: expected --device cuda or "
          "cuda:N, got ",
          trainer.default_device.str()));
    }
    if (impl.metrics != nullptr) impl.metrics->EnableGroup(config.size, config.rank);
    impl.group_health = std::make_unique<Impl::GroupHealth>(impl.metrics.get());
    impl.group_description = absl::StrCat("rank ", config.rank, " of ", config.size,
                                          ", store at ", config.store_host, ":",
                                          config.store_port);
    impl.group = group::ReplicaGroup::Start(
        config, trainer.default_device, impl.group_health.get(),
        [](const std::string& line) { std::cerr << "tscale-server: " << line << std::endl; },
        impl.service->group_state());
    impl.service->set_group(impl.group.get());
#else
    return absl::InvalidArgumentError(
        "--group-size: this tscale-server was built without replica groups (neither Gloo's "
        "headers nor c10d's NCCL were found at build time)");
#endif
  }

  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.tls_cert.empty() || !options.tls_key.empty() || !options.tls_client_ca.empty()) {
    auto tls = TlsCredentials(options);
    if (!tls.ok()) return tls.status();
    credentials = *tls;
  }
  if (!options.auth_token_file.empty()) {
    auto auth = TokenAuth::Load(options.auth_token_file);
    if (!auth.ok()) return auth.status();
    impl.auth = *std::move(auth);
    impl.service->set_auth(impl.auth.get());
  }

  grpc::EnableDefaultHealthCheckService(true);
  if (options.reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!options.reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  // Two servers on one port would split the clients between them.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(impl.service.get());
  // gRPC refuses messages far beyond the limit on its own; the handlers refuse those just beyond
  // it with a message that names the flag.
  const int64_t hard_limit = std::min<int64_t>(2 * options.max_message_bytes, INT_MAX);
  builder.SetMaxReceiveMessageSize(static_cast<int>(hard_limit));
  builder.SetMaxSendMessageSize(static_cast<int>(hard_limit));
  // Keepalive: pings reveal connections whose client vanished (a crashed host, a dropped NAT
  // entry), so that their calls are cancelled and their memory freed.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             options.keepalive_seconds > 0
                                 ? static_cast<int>(options.keepalive_seconds * 1000)
                                 : INT_MAX);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kKeepaliveTimeoutMs);
  // Training clients keep channels open between calls: their pings on idle connections are
  // welcome (at most one per kMinClientPingIntervalMs).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             kMinClientPingIntervalMs);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, kMaxPingStrikes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(options.max_concurrent_streams));
  grpc::ResourceQuota quota("tscale-server");
  quota.Resize(static_cast<size_t>(options.grpc_memory_bytes));
  quota.SetMaxThreads(kMaxGrpcThreads);
  builder.SetResourceQuota(quota);
  impl.server = builder.BuildAndStart();
  if (impl.server == nullptr || server->port_ == 0) {
    impl.pool->Stop();
    return absl::UnavailableError(
        absl::StrCat("--listen: cannot listen on ", options.listen,
                     " (address in use, or not an address of this machine)"));
  }
  if (impl.metrics != nullptr) {
    auto exposer = metrics::HttpExposer::Start(
        options.metrics_listen, [m = impl.metrics.get()] { return m->Scrape(); });
    if (!exposer.ok()) {
      impl.server->Shutdown();
      impl.pool->Stop();
      return exposer.status();
    }
    impl.exposer = *std::move(exposer);
  }
  grpc::HealthCheckServiceInterface* health = impl.server->GetHealthCheckService();
  health->SetServingStatus(kServiceName, true);
  health->SetServingStatus(true);
#if TSCALE_WITH_GROUP
  // In a group, SERVING while the group is formed.
  if (impl.group_health != nullptr) impl.group_health->Serve(impl.server.get());
#endif
  if (impl.checkpointer != nullptr) impl.checkpointer->Start();
  return server;
}

std::string Server::group_description() const { return impl_->group_description; }

int64_t Server::running_calls() const {
  return impl_->service != nullptr ? impl_->service->running_calls() : 0;
}

std::string Server::address() const { return absl::StrCat(impl_->host, ":", port_); }

int Server::metrics_port() const { return impl_->exposer ? impl_->exposer->port() : 0; }

void Server::Shutdown(std::chrono::milliseconds grace) {
  {
    absl::MutexLock lock(&impl_->mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
  }
#if TSCALE_WITH_GROUP
  if (impl_->group_health != nullptr) impl_->group_health->Serve(nullptr);
#endif
  const auto end_of_grace = std::chrono::system_clock::now() + grace;
  if (impl_->service != nullptr) impl_->service->StartShutdown(absl::FromChrono(end_of_grace));
  if (impl_->server != nullptr) {
    impl_->server->GetHealthCheckService()->SetServingStatus(false);
    // Calls still running when the grace ends are refused at their commit point (UNAVAILABLE)
    // as soon as they reach it; gRPC cancels (CANCELLED) only what still runs long after.
    impl_->server->Shutdown(end_of_grace + kShutdownOverrun);
  }
  if (impl_->checkpointer != nullptr) {
    impl_->checkpointer->Stop();
    if (impl_->checkpoint_on_shutdown) {
      auto saved = impl_->checkpointer->SaveChanged();
      std::cerr << "tscale-server: checkpoint: at shutdown, "
                << (saved.ok() ? absl::StrCat("saved ", *saved, " changed model(s)")
                               : absl::StrCat("saving failed: ", saved.status().ToString()))
                << std::endl;
    }
  }
  if (impl_->pool != nullptr) impl_->pool->Stop();
#if TSCALE_WITH_GROUP
  impl_->group.reset();  // leaves the group: the others' calls fail until it is back
#endif
  // Last: the final state stays scrapeable until the end.
  if (impl_->exposer != nullptr) impl_->exposer->Stop();
  impl_->done.Notify();
}

void Server::Wait() { impl_->done.WaitForNotification(); }

absl::Status Server::ReloadTokens() {
  return impl_->auth != nullptr ? impl_->auth->Reload() : absl::OkStatus();
}

}  // namespace tscale::service
