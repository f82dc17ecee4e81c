// tscale-server: serves the TernaryTrainer API. Flags as the README's "The server" table lists them
// (--listen,
// --device, ...), given as `--flag value` or `--flag=value`.
//
// SIGTERM or SIGINT: the server stops accepting calls, finishes those in flight and exits 0.
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/service/server.h"

namespace {

int g_signal_pipe[2] = {-1, -1};

extern "C" void OnSignal(int signal) {
  const unsigned char byte = static_cast<unsigned char>(signal);
  const int saved = errno;
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &byte, 1);
  errno = saved;
}

struct Flag {
  std::string name;
  std::string value_name;
  std::string help;
  std::function<bool(absl::string_view)> set;  // false: not a valid value
};

template <typename Int>
std::function<bool(absl::string_view)> IntFlag(Int* out) {
  return [out](absl::string_view v) { return absl::SimpleAtoi(v, out); };
}

std::function<bool(absl::string_view)> BoolFlag(bool* out) {
  return [out](absl::string_view v) {
    if (v == "true" || v == "1") {
      *out = true;
    } else if (v == "false" || v == "0") {
      *out = false;
    } else {
      return false;
    }
    return true;
  };
}

std::function<bool(absl::string_view)> StringFlag(std::string* out) {
  return [out](absl::string_view v) {
    *out = std::string(v);
    return true;
  };
}

void Usage(const std::vector<Flag>& flags, std::ostream& os) {
  os << "Usage: tscale-server [flags]\n"
        "A gRPC training service for ternary-scale models.\n\nFlags:\n";
  for (const Flag& f : flags) {
    os << "  --" << f.name << " " << f.value_name << "\n      " << f.help << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  tscale::service::ServerOptions options;
  options.listen = "0.0.0.0:50051";
  int grace_seconds = 30;
  const std::vector<Flag> flags = {
      {"listen", "HOST:PORT",
       "address to serve the API on; port 0 picks a free port (default "
       "0.0.0.0:50051)",
       StringFlag(&options.listen)},
      {"device", "cpu|cuda|cuda:N",
       "default device of models (default: cuda:0 when a GPU is usable, else cpu)",
       StringFlag(&options.device)},
      {"max-message-bytes", "N",
       "largest request or response message; larger ones are RESOURCE_EXHAUSTED (default 256 MiB)",
       IntFlag(&options.max_message_bytes)},
      {"max-import-bytes", "N", "largest state file ImportState accepts (default 16 GiB)",
       IntFlag(&options.max_import_bytes)},
      {"stream-window", "N",
       "TrainStream: steps a stream may have read and not yet answered (default 8, at most 1024)",
       IntFlag(&options.stream_window)},
      {"max-pending-passes", "N",
       "per model: training passes held for a Backward at once (default 1024)",
       IntFlag(&options.max_pending_passes)},
      {"max-pending-bytes", "N",
       "per model: bytes of activations those passes may hold (default 4 GiB)",
       IntFlag(&options.max_pending_bytes)},
      {"worker-threads", "N", "threads running requests (default 0: max(4, hardware threads))",
       IntFlag(&options.worker_threads)},
      {"max-models", "N",
       "models the server holds at most; more are RESOURCE_EXHAUSTED (default 1024; 0: no limit)",
       IntFlag(&options.max_models)},
      {"max-device-bytes", "N",
       "budget of the models' device memory (decoded state, effective weights, gradient sums, "
       "as estimated from their specs); models beyond it are RESOURCE_EXHAUSTED (default 0: none)",
       IntFlag(&options.max_device_bytes)},
      {"cuda-graphs", "true|false",
       "on CUDA devices, replay each model's TrainSteps of a shape seen before from a captured "
       "CUDA graph: the same results, one launch a step; each shape's graph holds its step's "
       "temporaries on the device, at most 4 shapes a model (default true)",
       BoolFlag(&options.cuda_graphs)},
      {"pending-pass-ttl-seconds", "N",
       "a training pass no Backward used within N seconds is released (default 600; 0: never)",
       IntFlag(&options.pending_pass_ttl_seconds)},
      {"keepalive-seconds", "N",
       "ping connections idle this long and close those that do not answer within 20 s "
       "(default 60; 0: no pings)",
       IntFlag(&options.keepalive_seconds)},
      {"max-concurrent-streams", "N", "calls at once per connection (default 256)",
       IntFlag(&options.max_concurrent_streams)},
      {"grpc-memory-bytes", "N",
       "memory gRPC may use for buffers, all connections together; at least twice "
       "--max-message-bytes (default 4 GiB)",
       IntFlag(&options.grpc_memory_bytes)},
      {"checkpoint-dir", "DIR",
       "checkpoints: DIR/<model_id>/step-<step>.safetensors; models found there are restored at "
       "start (default: none)",
       StringFlag(&options.checkpoint_dir)},
      {"checkpoint-every-steps", "N",
       "checkpoint a model when an update brings its step to a multiple of N (default 0: off)",
       IntFlag(&options.checkpoint_every_steps)},
      {"checkpoint-every-seconds", "N",
       "checkpoint each model whose step changed, every N seconds (default 0: off)",
       IntFlag(&options.checkpoint_every_seconds)},
      {"checkpoint-keep", "K", "checkpoints kept per model, newest first (default 5; 0: all)",
       IntFlag(&options.checkpoint_keep)},
      {"checkpoint-on-shutdown", "true|false",
       "on SIGTERM, checkpoint every model that changed since its last checkpoint (default true)",
       BoolFlag(&options.checkpoint_on_shutdown)},
      {"deleted-retention-hours", "N",
       "a deleted model's checkpoints stay in DIR/.deleted/ this long, for RestoreCheckpoint "
       "with from_deleted (default 168; 0: until removed by hand)",
       IntFlag(&options.deleted_retention_hours)},
      {"metrics-listen", "HOST:PORT",
       "serve Prometheus metrics at http://HOST:PORT/metrics (default: none)",
       StringFlag(&options.metrics_listen)},
      {"metrics-max-layers", "N", "drift series exported per model (default 64)",
       IntFlag(&options.metrics_max_layers)},
      {"tls-cert", "FILE", "TLS: the server's certificate chain, PEM (with --tls-key)",
       StringFlag(&options.tls_cert)},
      {"tls-key", "FILE", "TLS: the server's private key, PEM", StringFlag(&options.tls_key)},
      {"tls-client-ca", "FILE",
       "mutual TLS: clients must present a certificate this CA (PEM) signed",
       StringFlag(&options.tls_client_ca)},
      {"auth-token-file", "FILE",
       "bearer tokens, one per line; calls must send 'authorization: Bearer <token>' (health "
       "checks excepted); SIGHUP reads the file again",
       StringFlag(&options.auth_token_file)},
      {"reflection", "true|false", "serve gRPC server reflection (default true)",
       BoolFlag(&options.reflection)},
      {"group-size", "N",
       "replica group: N servers train every model together (data-parallel over c10d); "
       "default: WORLD_SIZE from the environment, else no group",
       IntFlag(&options.group.size)},
      {"group-rank", "R", "replica group: this server's rank in [0, N) (default: RANK)",
       IntFlag(&options.group.rank)},
      {"group-store", "HOST:PORT",
       "replica group: where the ranks meet; rank 0 hosts the store there (default: "
       "MASTER_ADDR:MASTER_PORT)",
       StringFlag(&options.group.store)},
      {"group-timeout-seconds", "S",
       "replica group: how long a group call or the group's forming waits for every rank "
       "(default 60)",
       IntFlag(&options.group.timeout_seconds)},
      {"group-rank-from-hostname", "true|false",
       "replica group: the rank is the hostname's ordinal (a StatefulSet pod 'name-R'; default "
       "false)",
       BoolFlag(&options.group.rank_from_hostname)},
      {"shutdown-grace-seconds", "N",
       "on SIGTERM, how long in-flight calls may run before they are cancelled (default 30)",
       IntFlag(&grace_seconds)},
  };

  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      Usage(flags, std::cout);
      return 0;
    }
    const Flag* flag = nullptr;
    absl::string_view value;
    bool has_value = false;
    if (arg.substr(0, 2) == "--") {
      absl::string_view name = arg.substr(2);
      if (const size_t eq = name.find('='); eq != absl::string_view::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      for (const Flag& f : flags) {
        if (f.name == name) flag = &f;
      }
    }
    if (flag == nullptr) {
      std::cerr << "tscale-server: unknown argument '" << arg << "'\n";
      Usage(flags, std::cerr);
      return 2;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        std::cerr << "tscale-server: --" << flag->name << ": expected a value (" << flag->value_name
                  << "), got none\n";
        return 2;
      }
      value = argv[++i];
    }
    if (!flag->set(value)) {
      std::cerr << "tscale-server: --" << flag->name << ": expected " << flag->value_name
                << ", got '" << value << "'\n";
      return 2;
    }
  }
  if (grace_seconds < 0) {
    std::cerr << "tscale-server: --shutdown-grace-seconds: expected >= 0, got " << grace_seconds
              << "\n";
    return 2;
  }

  // A handler, not a signal mask: threads that libraries start before main (a BLAS pool) would
  // not block the signals, and one of them taking SIGTERM would kill the process. The handler
  // only writes the signal's number to a pipe, which this thread waits on.
  if (pipe(g_signal_pipe) != 0) {
    std::perror("tscale-server: pipe");
    return 1;
  }
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGHUP, &action, nullptr);
  // A file-size limit (ulimit -f) reached while writing a checkpoint must fail that save
  // (RESOURCE_EXHAUSTED), not kill the server: ignored, SIGXFSZ leaves write() to return EFBIG.
  signal(SIGXFSZ, SIG_IGN);

  auto server = tscale::service::Server::Start(options);
  if (!server.ok()) {
    std::cerr << "tscale-server: " << server.status().message() << std::endl;
    return server.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  // Scripts and tests read this line to learn the port.
  std::cout << "tscale-server: listening on " << (*server)->address() << std::endl;
  // What protects the port, in one line: a server started without what was meant is seen at once.
  const bool tls = !options.tls_cert.empty();
  const bool tokens = !options.auth_token_file.empty();
  std::cout << "tscale-server: security: TLS "
            << (tls ? absl::StrCat("on (--tls-cert ", options.tls_cert, ")")
                    : std::string("off (plaintext)"))
            << ", mutual TLS "
            << (!options.tls_client_ca.empty()
                    ? absl::StrCat("on (client certificates signed by --tls-client-ca ",
                                   options.tls_client_ca, ")")
                    : std::string("off"))
            << ", bearer tokens "
            << (tokens ? absl::StrCat("on (--auth-token-file ", options.auth_token_file, ")")
                       : std::string("off"))
            << (!tls && !tokens ? "; anyone who can reach the port can use every call" : "")
            << std::endl;
  if (!(*server)->group_description().empty()) {
    std::cout << "tscale-server: replica group: " << (*server)->group_description() << std::endl;
  }
  if ((*server)->metrics_port() != 0) {
    const std::string& m = options.metrics_listen;
    std::cout << "tscale-server: metrics on http://" << m.substr(0, m.rfind(':')) << ":"
              << (*server)->metrics_port() << "/metrics" << std::endl;
  }

  unsigned char signal = 0;
  for (;;) {
    if (read(g_signal_pipe[0], &signal, 1) != 1) {
      if (errno == EINTR) continue;
      std::perror("tscale-server: waiting for a signal");
      return 1;
    }
    if (signal != SIGHUP) break;
    const absl::Status reloaded = (*server)->ReloadTokens();
    std::cerr << "tscale-server: SIGHUP: "
              << (reloaded.ok() ? std::string("tokens read again")
                                : std::string(reloaded.message()) + "; the tokens in use stay")
              << std::endl;
  }
  std::cerr << "tscale-server: " << (signal == SIGTERM ? "SIGTERM" : "SIGINT")
            << ": finishing the calls in flight, then exiting" << std::endl;
  (*server)->Shutdown(std::chrono::seconds(grace_seconds));
  std::cerr << "tscale-server: stopped" << std::endl;
  return 0;
}
