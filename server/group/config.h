// Membership of a replica group: how many servers, which one this is, where
// they meet. From the server's flags, or as torchrun and Kubeflow set the
// environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT), or with the rank
// taken from a StatefulSet pod's ordinal (the hostname's last
// "-N"). No LibTorch here: the server parses this before anything starts.
#ifndef TSCALE_SERVER_GROUP_CONFIG_H_
#define TSCALE_SERVER_GROUP_CONFIG_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tscale::group {

struct GroupConfig {
  int size = 1;
  int rank = 0;
  std::string store_host;  // rank 0 hosts the rendezvous store here (and every
                           // rank connects)
  int store_port = 0;
  absl::Duration timeout =
      absl::Seconds(60);  // a group call, or forming the group, waits this long
};

// What the flags said; unset fields fall back to the environment.
struct GroupFlags {
  int size = 0;                     // --group-size; 0: WORLD_SIZE, else no group
  int rank = -1;                    // --group-rank; -1: RANK, or the hostname's ordinal
  std::string store;                // --group-store HOST:PORT; empty: MASTER_ADDR:MASTER_PORT
  int timeout_seconds = 60;         // --group-timeout-seconds
  bool rank_from_hostname = false;  // --group-rank-from-hostname
};

// The group this server belongs to; nullopt when it serves alone (no size, or
// size 1 without a store). `env` reads an environment variable (nullopt when
// unset); `hostname` is this host's name. InvalidArgument names the flag or
// variable at fault.
absl::StatusOr<std::optional<GroupConfig>> ResolveGroupConfig(
    const GroupFlags& flags, const std::function<std::optional<std::string>(const char*)>& env,
    absl::string_view hostname);

// The ordinal of a StatefulSet pod's hostname ("tscale-3" -> 3), or nullopt.
std::optional<int> OrdinalOf(absl::string_view hostname);

}  // namespace tscale::group

#endif  // TSCALE_SERVER_GROUP_CONFIG_H_
