// The tscale command line: commands, their options, and what they share (the client, error
// reporting). Exit codes: 0 success, 1 a failed call or operation, 2 a usage error.
#ifndef TSCALE_CLIENT_CPP_CLI_CLI_H_
#define TSCALE_CLIENT_CPP_CLI_CLI_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"
#include "client/cpp/group.h"

namespace tscale::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

struct OptionSpec {
  std::string name;   // "--seed"
  std::string value;  // what the value is, e.g. "N"; empty for a flag, which takes none
  std::string help;
};

// A command's arguments after parsing: positionals in order, options by name ("" for a flag).
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;

  bool Has(const std::string& name) const { return options.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& fallback = "") const;
};

// What a command runs with: the client (made on first use) and error reporting.
class Context {
 public:
  Context(std::string command, std::string server, client::ClientOptions options);

  const std::string& command() const { return command_; }
  const std::string& server() const { return server_; }
  client::Client& client();
  // With --servers A,B,...: the replica group's client (rank r at the r-th address); else null.
  client::ReplicaGroup* group();
  void set_servers(std::vector<std::string> servers) { servers_ = std::move(servers); }
  // With --retry-seconds: the replica group's retry time too.
  void set_group_retry_time(absl::Duration t) { group_retry_time_ = t; }
  // The API's field names that open the server's messages, each with what the user typed for it
  // on this command line (e.g. {"new_model_id", "--as"}); Fail puts the latter in their place.
  void set_field_names(std::vector<std::pair<std::string, std::string>> names) {
    field_names_ = std::move(names);
  }

  // Prints "tscale: <command>: <CODE>: <message>" to stderr; returns kExitFailure.
  int Fail(const absl::Status& status) const;
  // Prints "tscale: <command>: <message>" and a pointer to the command's help; returns kExitUsage.
  int Usage(absl::string_view message) const;

  // Option values as numbers; a usage error (printed, and *exit set to kExitUsage) when the
  // value is not a number in [min, max].
  bool GetInt(const Args& args, const std::string& name, int64_t fallback, int64_t min, int64_t max,
              int64_t* out, int* exit) const;

 private:
  std::string command_;
  std::string server_;
  client::ClientOptions options_;
  std::unique_ptr<client::Client> client_;
  std::vector<std::string> servers_;
  std::optional<absl::Duration> group_retry_time_;
  std::unique_ptr<client::ReplicaGroup> group_;
  std::vector<std::pair<std::string, std::string>> field_names_;
};

struct Command {
  std::string name;
  std::string synopsis;  // arguments after the name, e.g. "ID --spec FILE.json [--seed N]"
  std::string summary;   // one line
  std::string details;   // more text for `tscale <command> --help`; may be empty
  std::vector<OptionSpec> options;
  int min_positional = 0;
  int max_positional = 0;
  int (*run)(Context& context, const Args& args) = nullptr;
  // The API's fields this command's arguments fill, with the arguments' names: errors from the
  // server name the field ("new_model_id: ..."), the user typed the option ("--as").
  std::vector<std::pair<std::string, std::string>> fields;
};

// Every command, in the order the help lists them.
const std::vector<Command>& Commands();

// `tscale train` (train.cc).
int RunTrain(Context& context, const Args& args);

// Prints rows under a header, columns padded to their widest cell; the first column left-aligned,
// the others right-aligned.
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows);

}  // namespace tscale::cli

#endif  // TSCALE_CLIENT_CPP_CLI_CLI_H_
