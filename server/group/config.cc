#include "server/group/config.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace tscale::group {
namespace {

absl::StatusOr<int> ParseInt(absl::string_view name, absl::string_view text, int lo, int hi) {
  int value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": expected an integer in [", lo, ", ", hi, "], got '", text, "'"));
  }
  return value;
}

}  // namespace

std::optional<int> OrdinalOf(absl::string_view hostname) {
  // A pod's hostname is its name: "<statefulset>-<ordinal>"; a FQDN's first
  // label is.
  hostname = hostname.substr(0, hostname.find('.'));
  const size_t dash = hostname.rfind('-');
  if (dash == absl::string_view::npos) return std::nullopt;
  int ordinal = 0;
  if (!absl::SimpleAtoi(hostname.substr(dash + 1), &ordinal) || ordinal < 0) return std::nullopt;
  return ordinal;
}

absl::StatusOr<std::optional<GroupConfig>> ResolveGroupConfig(
    const GroupFlags& flags, const std::function<std::optional<std::string>(const char*)>& env,
    absl::string_view hostname) {
  GroupConfig config;
  if (flags.size > 0) {
    config.size = flags.size;
  } else if (auto world = env("WORLD_SIZE"); world.has_value()) {
    auto size = ParseInt("WORLD_SIZE", *world, 1, 4096);
    if (!size.ok()) return size.status();
    config.size = *size;
  } else {
    if (flags.rank >= 0 || !flags.store.empty() || flags.rank_from_hostname) {
      return absl::InvalidArgumentError(
          "--group-size: expected the group's size with --group-rank, "
          "--group-store or "
          "--group-rank-from-hostname (or WORLD_SIZE in the environment), got "
          "none");
    }
    return std::optional<GroupConfig>();
  }
  if (config.size > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--group-size: expected at most 4096 servers, got ", config.size));
  }

  if (flags.rank >= 0) {
    config.rank = flags.rank;
  } else if (flags.rank_from_hostname) {
    auto ordinal = OrdinalOf(hostname);
    if (!ordinal.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--group-rank-from-hostname: expected a hostname ending "
                       "in -N (a StatefulSet pod's "
                       "ordinal), got '",
                       hostname, "'"));
    }
    config.rank = *ordinal;
  } else if (auto rank = env("RANK"); rank.has_value()) {
    auto r = ParseInt("RANK", *rank, 0, config.size - 1);
    if (!r.ok()) return r.status();
    config.rank = *r;
  } else if (config.size > 1) {
    return absl::InvalidArgumentError(
        "--group-rank: expected this server's "
        "rank (or RANK in the environment, or "
        "--group-rank-from-hostname), got none");
  }
  if (config.rank < 0 || config.rank >= config.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("--group-rank: expected a rank in [0, ", config.size, "), got ", config.rank));
  }

  std::string store = flags.store;
  absl::string_view store_name = "--group-store";
  if (store.empty()) {
    auto addr = env("MASTER_ADDR");
    auto port = env("MASTER_PORT");
    if (addr.has_value() && port.has_value()) {
      store = absl::StrCat(*addr, ":", *port);
      store_name = "MASTER_ADDR:MASTER_PORT";
    }
  }
  if (store.empty()) {
    if (config.size == 1) return std::optional<GroupConfig>();
    return absl::InvalidArgumentError(
        "--group-store: expected HOST:PORT of rank 0's rendezvous store (or "
        "MASTER_ADDR and "
        "MASTER_PORT in the environment), got none");
  }
  const size_t colon = store.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(store_name, ": expected HOST:PORT, got '", store, "'"));
  }
  auto port = ParseInt(store_name, absl::string_view(store).substr(colon + 1), 1, 65535);
  if (!port.ok()) return port.status();
  absl::string_view host = absl::string_view(store).substr(0, colon);
  // [v6]:port
  if (absl::ConsumePrefix(&host, "[")) absl::ConsumeSuffix(&host, "]");
  config.store_host = std::string(host);
  config.store_port = *port;

  if (flags.timeout_seconds < 1 || flags.timeout_seconds > 86400) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group-timeout-seconds: expected 1 to 86400 seconds, got ", flags.timeout_seconds));
  }
  config.timeout = absl::Seconds(flags.timeout_seconds);
  return std::optional<GroupConfig>(config);
}

}  // namespace tscale::group
