// tscale: the command line client. Parses the global options and the command's arguments by
// hand (options may come before or after the command; `--name value` or `--name=value`), then
// runs the command.
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/cpp/cli/cli.h"

namespace tscale::cli {
namespace {

constexpr char kDefaultServer[] = "127.0.0.1:50051";
constexpr char kDefaultPort[] = "50051";

// "HOST" means HOST:50051, as in the Python client: left to gRPC, a bare host name would mean
// port 443. Bracketed or bare IPv6 addresses get the port too; gRPC URIs ("dns:...",
// "unix:...", "ipv4:...") are left alone.
std::string WithDefaultPort(const std::string& address) {
  if (absl::StrContains(address, "://") || absl::StartsWith(address, "unix:") ||
      absl::StartsWith(address, "dns:") || absl::StartsWith(address, "ipv4:") ||
      absl::StartsWith(address, "ipv6:")) {
    return address;
  }
  if (absl::StartsWith(address, "[")) {
    return absl::EndsWith(address, "]") ? absl::StrCat(address, ":", kDefaultPort) : address;
  }
  const size_t colons = std::count(address.begin(), address.end(), ':');
  if (colons == 0) return absl::StrCat(address, ":", kDefaultPort);
  if (colons > 1) return absl::StrCat("[", address, "]:", kDefaultPort);  // bare IPv6
  return address;
}

// Whether a server address stays on this machine: loopback or a unix socket.
bool IsLocal(const std::string& address) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return true;
  }
  std::string host = address;
  for (absl::string_view scheme : {"dns:///", "ipv4:", "ipv6:"}) {
    if (absl::StartsWith(host, scheme)) host = host.substr(scheme.size());
  }
  if (absl::StartsWith(host, "[")) {
    host = host.substr(1, host.find(']') - 1);
  } else if (const size_t colon = host.rfind(':'); colon != std::string::npos) {
    host = host.substr(0, colon);
  }
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

bool AllLocal(const std::string& servers) {
  for (absl::string_view s : absl::StrSplit(servers, ',', absl::SkipEmpty())) {
    if (!IsLocal(WithDefaultPort(std::string(s)))) return false;
  }
  return true;
}

const std::vector<OptionSpec>& GlobalOptions() {
  static const std::vector<OptionSpec> options = {
      {"--server", "HOST[:PORT]",
       absl::StrCat("the server; port 50051 unless given (default: $TSCALE_SERVER, else ",
                    kDefaultServer, ")")},
      {"--servers", "A,B,...",
       "a replica group, rank r at the r-th address: create, info, train and delete go to every "
       "rank (train splits each batch across them); server-info asks each"},
      {"--timeout", "SECONDS", "deadline of each attempt of a call (default 60)"},
      {"--retry-seconds", "SECONDS",
       "how long after a call's first failure it may still be retried, when a retry is safe "
       "(default 60: a server restart that restores its checkpoints; 0: no retries)"},
      {"--auth-token-file", "FILE", "send the token in FILE as `authorization: Bearer <token>`"},
      {"--gzip", "", "compress requests and answers with gzip (pays on slow links)"},
      {"--tls", "", "use TLS, trusting the system's root certificates"},
      {"--tls-ca", "FILE", "use TLS, trusting the root certificates in FILE (PEM)"},
      {"--tls-cert", "FILE", "client certificate chain for mutual TLS (PEM; with --tls-key)"},
      {"--tls-key", "FILE", "the client certificate's private key (PEM)"},
      {"--tls-server-name", "NAME",
       "the name the server's certificate must hold, when the address is not one of its names "
       "(a tunnel, a proxy; implies --tls)"},
  };
  return options;
}

const OptionSpec* FindOption(const std::vector<OptionSpec>& options, absl::string_view name) {
  for (const OptionSpec& o : options) {
    if (o.name == name) return &o;
  }
  return nullptr;
}

void PrintOptions(std::ostream& out, const std::vector<OptionSpec>& options) {
  size_t width = 0;
  std::vector<std::string> heads;
  for (const OptionSpec& o : options) {
    heads.push_back(o.value.empty() ? o.name : absl::StrCat(o.name, " ", o.value));
    width = std::max(width, heads.back().size());
  }
  for (size_t i = 0; i < options.size(); ++i) {
    out << "  " << heads[i] << std::string(width - heads[i].size() + 2, ' ') << options[i].help
        << "\n";
  }
}

void PrintMainUsage(std::ostream& out) {
  out << "usage: tscale [--server HOST[:PORT]] [--timeout SECONDS] <command> [arguments]\n\n"
         "A command line client of the tscale training service.\n\ncommands:\n";
  size_t width = 0;
  for (const Command& c : Commands()) width = std::max(width, c.name.size());
  for (const Command& c : Commands()) {
    out << "  " << c.name << std::string(width - c.name.size() + 2, ' ') << c.summary << "\n";
  }
  out << "\nglobal options (before or after the command):\n";
  std::vector<OptionSpec> options = GlobalOptions();
  options.push_back({"--help, -h", "", "print this help, or with a command its own"});
  PrintOptions(out, options);
  out << "\nRun 'tscale <command> --help' for a command's arguments and options.\n"
         "Exit status: 0 success, 1 a failed call (the error is printed as\n"
         "'tscale: <command>: <CODE>: <message>'), 2 a usage error.\n";
}

void PrintCommandUsage(std::ostream& out, const Command& c) {
  out << "usage: tscale [global options] " << c.name << (c.synopsis.empty() ? "" : " ")
      << c.synopsis << "\n\n"
      << c.summary << "\n";
  if (!c.details.empty()) out << "\n" << c.details;
  if (!c.options.empty()) {
    out << "\noptions:\n";
    PrintOptions(out, c.options);
  }
  out << "\nglobal options: --server, --timeout, --retry-seconds, --auth-token-file, --tls... "
         "(see 'tscale --help')\n";
}

int UsageError(absl::string_view where, absl::string_view message) {
  std::cerr << "tscale: " << where << (where.empty() ? "" : ": ") << message << "\n";
  return kExitUsage;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(option, ": cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(option, ": reading ", path, " failed"));
  return ss.str();
}

int Main(int argc, char** argv) {
  std::vector<std::string> argList(argv + 1, argv + argc);
  const Command* command = nullptr;
  Args args;
  std::map<std::string, std::string> globals;
  bool help = false;
  bool only_positional = false;

  for (size_t i = 0; i < argList.size(); ++i) {
    const std::string& arg = argList[i];
    const std::string where = command ? command->name : "";
    if (only_positional || arg == "-" || !absl::StartsWith(arg, "-")) {
      if (command == nullptr && !only_positional) {
        if (arg == "help") {  // `tscale help [command]`
          help = true;
          continue;
        }
        for (const Command& c : Commands()) {
          if (c.name == arg) command = &c;
        }
        if (command == nullptr) {
          return UsageError("", absl::StrCat("unknown command '", arg,
                                             "' (see 'tscale --help' for the commands)"));
        }
        continue;
      }
      if (command == nullptr) {
        return UsageError("", "expected a command (see 'tscale --help')");
      }
      args.positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      help = true;
      continue;
    }
    std::string name = arg;
    std::optional<std::string> value;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const OptionSpec* spec = command ? FindOption(command->options, name) : nullptr;
    const bool global = spec == nullptr && (spec = FindOption(GlobalOptions(), name)) != nullptr;
    if (spec == nullptr) {
      return UsageError(where, absl::StrCat("unknown option ", name, " (see 'tscale ",
                                            command ? command->name + " " : "", "--help')"));
    }
    if (spec->value.empty() && value.has_value()) {
      return UsageError(where, absl::StrCat("option ", name, " takes no value"));
    }
    if (!spec->value.empty() && !value.has_value()) {
      if (i + 1 >= argList.size()) {
        return UsageError(where,
                          absl::StrCat("option ", name, " needs a value (", spec->value, ")"));
      }
      value = argList[++i];
    }
    (global ? globals : args.options)[name] = value.value_or("");
  }

  if (help) {
    if (command) {
      PrintCommandUsage(std::cout, *command);
    } else {
      PrintMainUsage(std::cout);
    }
    return kExitOk;
  }
  if (command == nullptr) {
    PrintMainUsage(std::cerr);
    return kExitUsage;
  }
  const int n = static_cast<int>(args.positional.size());
  if (n < command->min_positional || n > command->max_positional) {
    std::string expected = command->synopsis.empty() ? "no arguments" : command->synopsis;
    return UsageError(
        command->name,
        absl::StrCat(n < command->min_positional ? "missing arguments" : "too many arguments",
                     ": expected ", expected, " (see 'tscale ", command->name, " --help')"));
  }

  client::ClientOptions options;
  if (auto it = globals.find("--timeout"); it != globals.end()) {
    double seconds = 0;
    if (!absl::SimpleAtod(it->second, &seconds) || !(seconds > 0) || seconds > 1e9) {
      return UsageError(
          command->name,
          absl::StrCat("--timeout: expected a number of seconds > 0, got '", it->second, "'"));
    }
    options.timeout = absl::Seconds(seconds);
  }
  if (auto it = globals.find("--retry-seconds"); it != globals.end()) {
    double seconds = 0;
    if (!absl::SimpleAtod(it->second, &seconds) || !(seconds >= 0) || seconds > 1e9) {
      return UsageError(command->name,
                        absl::StrCat("--retry-seconds: expected a number of seconds >= 0, got '",
                                     it->second, "'"));
    }
    options.retry.retry_time = absl::Seconds(seconds);
    if (seconds == 0) options.retry.max_attempts = 1;
  }
  options.gzip = globals.count("--gzip") > 0;
  std::string server = kDefaultServer;
  if (const char* env = std::getenv("TSCALE_SERVER"); env != nullptr && *env != '\0') {
    server = env;
  }
  if (auto it = globals.find("--server"); it != globals.end()) server = it->second;
  if (server.empty()) return UsageError(command->name, "--server: expected HOST:PORT, got ''");
  server = WithDefaultPort(server);

  Context context(command->name, server, options);
  if (auto it = globals.find("--auth-token-file"); it != globals.end()) {
    absl::StatusOr<std::string> token = ReadWholeFile("--auth-token-file", it->second);
    if (!token.ok()) return context.Fail(token.status());
    options.auth_token = std::string(absl::StripAsciiWhitespace(*token));
  }
  const bool tls = globals.count("--tls") || globals.count("--tls-ca") ||
                   globals.count("--tls-cert") || globals.count("--tls-key") ||
                   globals.count("--tls-server-name");
  if (tls) {
    if (globals.count("--tls-cert") != globals.count("--tls-key")) {
      return UsageError(command->name, "--tls-cert and --tls-key go together");
    }
    options.tls.enabled = true;
    const std::pair<const char*, std::string*> files[] = {{"--tls-ca", &options.tls.root_certs},
                                                          {"--tls-cert", &options.tls.cert_chain},
                                                          {"--tls-key", &options.tls.private_key}};
    for (const auto& [flag, field] : files) {
      if (auto it = globals.find(flag); it != globals.end()) {
        absl::StatusOr<std::string> pem = ReadWholeFile(flag, it->second);
        if (!pem.ok()) return context.Fail(pem.status());
        *field = *std::move(pem);
      }
    }
    if (auto it = globals.find("--tls-server-name"); it != globals.end()) {
      if (it->second.empty()) {
        return UsageError(command->name, "--tls-server-name: expected a host name, got ''");
      }
      options.tls.server_name = it->second;
    }
  }
  // A token in plaintext can be read, and replayed, by anyone on the path. Loopback and unix
  // sockets stay on this machine (an SSH tunnel's local end among them).
  const bool local =
      globals.count("--servers") ? AllLocal(globals.at("--servers")) : IsLocal(server);
  if (!options.auth_token.empty() && !tls && !local) {
    std::cerr << "tscale: warning: --auth-token-file: the token goes to "
              << (globals.count("--servers") ? globals.at("--servers") : server)
              << " in plaintext, readable by anyone on the way; use TLS (--tls-ca FILE or "
                 "--tls)\n";
  }
  // Retries are worth a line: a slow command is then not a mystery.
  const std::string name = command->name;
  options.on_retry = [name](int attempt, const absl::Status& status, absl::Duration wait) {
    std::cerr << "tscale: " << name << ": attempt " << attempt << " failed ("
              << absl::StatusCodeToString(status.code()) << "); retrying in "
              << absl::FormatDuration(absl::Trunc(wait, absl::Milliseconds(1))) << "\n";
  };
  Context ready(command->name, server, options);
  ready.set_field_names(command->fields);
  if (globals.count("--retry-seconds")) ready.set_group_retry_time(options.retry.retry_time);
  if (auto it = globals.find("--servers"); it != globals.end()) {
    std::vector<std::string> servers = absl::StrSplit(it->second, ',', absl::SkipEmpty());
    for (std::string& s : servers) s = WithDefaultPort(s);
    if (servers.empty()) {
      return UsageError(command->name, "--servers: expected HOST:PORT,HOST:PORT,..., got ''");
    }
    if (globals.count("--server")) {
      return UsageError(command->name, "--server and --servers: give one of them");
    }
    static const char* const kGroupCommands[] = {"create", "info", "train", "delete",
                                                 "server-info"};
    if (std::find(std::begin(kGroupCommands), std::end(kGroupCommands), command->name) ==
        std::end(kGroupCommands)) {
      return UsageError(command->name,
                        "--servers: only create, info, train, delete and server-info go to a "
                        "replica group; use --server with one rank's address for the rest");
    }
    ready.set_servers(std::move(servers));
  }
  return command->run(ready, args);
}

}  // namespace
}  // namespace tscale::cli

int main(int argc, char** argv) { return tscale::cli::Main(argc, argv); }
