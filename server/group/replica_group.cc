#include "server/group/replica_group.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <map>
#include <thread>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <utility>
#if TSCALE_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if TSCALE_WITH_NCCL
#include <cstdlib>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace tscale::group {
namespace {

// The process groups' common base: c10d::ProcessGroup in LibTorch 1.x, c10d::Backend (the
// collectives of one backend) from 2.0 on.
#if TORCH_VERSION_MAJOR >= 2
using Collectives = c10d::Backend;
#else
using Collectives = c10d::ProcessGroup;
#endif

constexpr int64_t kMagic = 0x7473636c67727031;  // "tsclgrp1": the header's layout
constexpr int kMessageWords = 32;               // 256 bytes of a refusal's message
// Header: magic, kind, model id's digest, digest, expected_step, model_step,
// batch, backwards, loss, status code, message length, message.
constexpr int kHeaderWords = 11 + kMessageWords;
// Vote: status code, payload (digest, or the loss's bits), the request's
// fingerprint (TrainStep), message length, message.
constexpr int kVoteWords = 4 + kMessageWords;
constexpr char kGenerationKey[] = "tscale/generation";

// The local address this host's route to host:port leaves from (a UDP socket connected there
// sends nothing); "127.0.0.1" when the host cannot be resolved or routed.
std::string LocalAddressTowards(const std::string& host, int port) {
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) {
    return "127.0.0.1";
  }
  std::string address = "127.0.0.1";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, SOCK_DGRAM, 0);
    if (fd < 0) continue;
    sockaddr_storage local = {};
    socklen_t len = sizeof(local);
    char text[INET6_ADDRSTRLEN] = {};
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      const void* raw =
          local.ss_family == AF_INET
              ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr)
              : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
      if (inet_ntop(local.ss_family, raw, text, sizeof(text)) != nullptr) address = text;
    }
    close(fd);
    if (address != "127.0.0.1" || a->ai_next == nullptr) break;
  }
  freeaddrinfo(found);
  return address;
}

std::string GenerationPrefix(int64_t generation) { return absl::StrCat("tscale/gen/", generation); }

// The backends a group forms: Gloo where compiled in, NCCL for CUDA models where compiled in.
std::string BackendName(bool use_nccl) {
#if TSCALE_WITH_GLOO
  return use_nccl ? "gloo+nccl" : "gloo";
#else
  (void)use_nccl;  // NCCL is the only backend
  return "nccl";
#endif
}

#if TSCALE_WITH_NCCL
// A collective that times out or fails must fail the call (an exception in wait()) and leave
// the server running: c10d's defaults from LibTorch 2.x tear the process down instead. Set only
// where the operator has not chosen otherwise.
void SetNcclErrorHandling() {
  setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);  // clean up only, never tear down
  setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);         // wait() throws at the timeout
}
#endif

std::vector<uint8_t> Bytes(int64_t value) {
  const std::string s = absl::StrCat(value);
  return std::vector<uint8_t>(s.begin(), s.end());
}

void PutMessage(const std::string& message, int64_t* words) {
  const size_t n = std::min(message.size(), sizeof(int64_t) * kMessageWords);
  words[0] = static_cast<int64_t>(n);
  std::memcpy(words + 1, message.data(), n);
}

std::string GetMessage(const int64_t* words) {
  const size_t n =
      std::min<size_t>(static_cast<size_t>(std::max<int64_t>(words[0], 0)), 8 * kMessageWords);
  return std::string(reinterpret_cast<const char*>(words + 1), n);
}

// How the other ranks answer when one refused its part: arguments that differ
// are the caller's to fix (FAILED_PRECONDITION); a rank that gave up (deadline,
// memory, shutdown) is worth a retry.
absl::StatusCode OthersCode(absl::StatusCode refused) {
  switch (refused) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kOutOfRange:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kAborted;
  }
}

}  // namespace

absl::string_view CallName(CallKind kind) {
  switch (kind) {
    case CallKind::kCreate:
      return "CreateModel";
    case CallKind::kImport:
      return "ImportState";
    case CallKind::kRestore:
      return "RestoreCheckpoint";
    case CallKind::kDelete:
      return "DeleteModel";
    case CallKind::kUpdate:
      return "UpdateCorrelation";
    case CallKind::kTrainStep:
      return "TrainStep";
  }
  return "unknown call";
}

uint64_t Fnv1a(absl::string_view bytes, uint64_t seed) {
  uint64_t h = seed;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t StateDigest(const core::StateSnapshot& state) {
  uint64_t h = Fnv1a(absl::StrCat("step=", state.step, ";"));
  for (const auto& [name, tensor] : state.tensors) {
    const at::Tensor t = tensor.contiguous();
    h = Fnv1a(absl::StrCat(name, ":", static_cast<int>(t.scalar_type()), ":",
                           absl::StrJoin(t.sizes(), ","), ";"),
              h);
    h = Fnv1a(absl::string_view(static_cast<const char*>(t.data_ptr()), t.nbytes()), h);
  }
  return h;
}

bool ReplicaGroup::HasNccl() {
#if TSCALE_WITH_NCCL
  return true;
#else
  return false;
#endif
}

bool ReplicaGroup::HasGloo() {
#if TSCALE_WITH_GLOO
  return true;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- membership

struct ReplicaGroup::Impl {
  GroupConfig config;
  bool use_nccl = false;
  // Where the control exchanges (headers, votes, the sync) run: the host with Gloo; the models'
  // GPU where NCCL is the only backend.
  at::Device control_device{at::kCPU};
  GroupObserver* observer = nullptr;
  GroupState* state = nullptr;

  // Serialises group calls: every rank runs them one at a time.
  absl::Mutex call_mu;

  mutable absl::Mutex mu;
  c10::intrusive_ptr<c10d::Store> store ABSL_GUARDED_BY(mu);
  c10::intrusive_ptr<Collectives> pg ABSL_GUARDED_BY(mu);    // headers, votes: Gloo, or NCCL
  c10::intrusive_ptr<Collectives> data ABSL_GUARDED_BY(mu);  // NCCL for CUDA models, when formed
  int64_t generation ABSL_GUARDED_BY(mu) = -1;
  bool formed ABSL_GUARDED_BY(mu) = false;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::vector<int> missing ABSL_GUARDED_BY(mu);
  // Process groups of past generations, destroyed by the watcher (their
  // destructors wait for their threads).
  std::vector<c10::intrusive_ptr<Collectives>> retired ABSL_GUARDED_BY(mu);
  std::thread watcher;
  absl::Notification exited;
  std::function<void(const std::string&)> log;

  void Log(const std::string& line) const {
    if (log) log(line);
  }
  std::chrono::milliseconds Timeout() const {
    return std::chrono::milliseconds(absl::ToInt64Milliseconds(config.timeout));
  }

  void Watch();
  void Form(const c10::intrusive_ptr<c10d::Store>& store, int64_t generation);
  // Brings every rank's models in line (see GroupState) over `pg`; an exception when a collective
  // fails.
  void Sync(Collectives& pg);
  // The call at `generation` failed in a collective: that process group is done
  // with.
  void Broken(int64_t generation, const std::string& why);
  std::string MissingText() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

std::unique_ptr<ReplicaGroup> ReplicaGroup::Start(GroupConfig config, at::Device device,
                                                  GroupObserver* observer,
                                                  std::function<void(const std::string&)> log,
                                                  GroupState* state) {
  auto impl = std::make_unique<Impl>();
  impl->state = state;
  impl->log = std::move(log);
  impl->config = std::move(config);
  impl->use_nccl = device.is_cuda() && HasNccl();
  // Without Gloo, NCCL carries the control exchanges too, on the models' GPU.
  if (!HasGloo()) impl->control_device = device;
  impl->observer = observer;
  std::shared_ptr<Impl> shared(std::move(impl));
  // The watcher holds the group's state too: a watcher still waiting for absent ranks when the
  // server stops is left to finish on its own (within the timeout) instead of holding it up.
  shared->watcher = std::thread([shared] {
    shared->Watch();
    shared->exited.Notify();
  });
  return std::unique_ptr<ReplicaGroup>(new ReplicaGroup(std::move(shared)));
}

ReplicaGroup::ReplicaGroup(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

ReplicaGroup::~ReplicaGroup() {
  {
    absl::MutexLock lock(&impl_->mu);
    impl_->stopping = true;
    impl_->observer = nullptr;  // the server's, gone with it
  }
  if (impl_->exited.WaitForNotificationWithTimeout(absl::Seconds(2))) {
    impl_->watcher.join();
  } else {
    impl_->watcher.detach();
  }
}

const GroupConfig& ReplicaGroup::config() const { return impl_->config; }

GroupStatus ReplicaGroup::status() const {
  absl::MutexLock lock(&impl_->mu);
  GroupStatus s;
  s.size = impl_->config.size;
  s.rank = impl_->config.rank;
  s.formed = impl_->formed;
  s.generation = impl_->generation;
  s.missing = impl_->missing;
  s.backend = BackendName(impl_->use_nccl);
  return s;
}

bool ReplicaGroup::WaitFormed(absl::Duration timeout) const {
  absl::MutexLock lock(&impl_->mu);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) { return impl_->formed; };
  return impl_->mu.AwaitWithTimeout(absl::Condition(&ready), timeout);
}

std::string ReplicaGroup::Impl::MissingText() const {
  if (missing.empty()) return "";
  return absl::StrCat("; rank", missing.size() > 1 ? "s " : " ", absl::StrJoin(missing, ", "),
                      " did not join");
}

void ReplicaGroup::Impl::Watch() {
  // Polls the store's generation: a rank whose call failed moves it on, and
  // every rank then forms the process group of the new generation. Bounded by
  // `stopping`.
  constexpr absl::Duration kPoll = absl::Milliseconds(50);
  int64_t store_failures = 0;
  while (true) {
    c10::intrusive_ptr<c10d::Store> s;
    int64_t mine = -1;
    bool is_formed = false;
    std::vector<c10::intrusive_ptr<Collectives>> old;
    {
      absl::MutexLock lock(&mu);
      old.swap(retired);
    }
    old.clear();  // may wait for their threads
    {
      absl::MutexLock lock(&mu);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return stopping; };
      mu.AwaitWithTimeout(absl::Condition(&stop), kPoll);
      if (stopping) break;
      s = store;
      mine = generation;
      is_formed = formed;
    }
    try {
      if (!s) {
        c10d::TCPStoreOptions options;
        options.port = static_cast<std::uint16_t>(config.store_port);
        options.isServer = config.rank == 0;
        options.waitWorkers = false;
        options.timeout = Timeout();
        s = c10::make_intrusive<c10d::TCPStore>(config.store_host, options);
        absl::MutexLock lock(&mu);
        store = s;
        // A new store (rank 0 restarted) counts generations from 0 again.
        generation = -1;
        formed = false;
        mine = -1;
        is_formed = false;
        Log(absl::StrCat("group: rank ", config.rank, " of ", config.size, " reached the store at ",
                         config.store_host, ":", config.store_port));
      }
      const int64_t current = s->add(kGenerationKey, 0);
      store_failures = 0;
      if (!is_formed || current != mine) Form(s, current);
    } catch (const std::exception& e) {
      if (store_failures++ % 100 == 0) {
        Log(absl::StrCat("group: rank ", config.rank, ": the store at ", config.store_host, ":",
                         config.store_port, " does not answer: ", e.what()));
      }
      absl::MutexLock lock(&mu);
      if (store.get() == s.get()) store.reset();
      if (formed && observer != nullptr) observer->Formed(false, config.size);
      formed = false;
      if (pg) retired.push_back(std::move(pg));
      if (data) retired.push_back(std::move(data));
    }
  }
  absl::MutexLock lock(&mu);
  pg.reset();
  data.reset();
  retired.clear();
}

void ReplicaGroup::Impl::Form(const c10::intrusive_ptr<c10d::Store>& s, int64_t gen) {
  // The ranks reach each other on the address this host reaches the store from (the hostname's
  // address, Gloo's default, may be one the others cannot reach: another namespace, a pod's).
  const std::string local_address = LocalAddressTowards(config.store_host, config.store_port);
  {
    absl::MutexLock lock(&mu);
    if (formed) {
      // A newer generation: this one's process group is stale.
      formed = false;
      if (observer != nullptr) observer->Formed(false, config.size);
    }
    if (pg) retired.push_back(std::move(pg));
    if (data) retired.push_back(std::move(data));
  }
  const std::string prefix = GenerationPrefix(gen);
  // A generation that another rank has formed did so without this rank (a member that restarted
  // or whose link was cut while the others stayed idle): it is over. Move every rank on to the
  // next one, which the formed ranks' watchers see within a poll, and form that.
  for (int r = 0; r < config.size; ++r) {
    if (r != config.rank && s->check({absl::StrCat(prefix, "/formed/", r)})) {
      Log(absl::StrCat("group: generation ", gen, " formed without rank ", config.rank,
                       "; moving the group on to generation ", gen + 1));
      s->compareSet(kGenerationKey, Bytes(gen), Bytes(gen + 1));
      return;
    }
  }
  s->set(absl::StrCat(prefix, "/joined/", config.rank), Bytes(1));
  try {
    c10::intrusive_ptr<Collectives> control, nccl;
#if TSCALE_WITH_GLOO
    auto options = c10d::ProcessGroupGloo::Options::create(Timeout());
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(local_address));
    control = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>(absl::StrCat(prefix, "/gloo"), s), config.rank,
        config.size, options);
#endif
#if TSCALE_WITH_NCCL
    if (use_nccl) {
      SetNcclErrorHandling();
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = Timeout();
      nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>(absl::StrCat(prefix, "/nccl"), s), config.rank,
          config.size, nccl_options);
      if (!control) control = nccl;
    }
#endif
    if (!control) {
      throw std::runtime_error(
          "no process group to form: this build's only backend is NCCL, for models on a GPU");
    }
    const auto sync_start = std::chrono::steady_clock::now();
    Sync(*control);
    s->set(absl::StrCat(prefix, "/formed/", config.rank), Bytes(1));
    absl::MutexLock lock(&mu);
    if (stopping) return;
    pg = std::move(control);
    data = std::move(nccl);
    generation = gen;
    formed = true;
    Log(absl::StrCat(
        "group: generation ", gen, " in line after ",
        std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start).count(),
        " s"));
    missing.clear();
    if (observer != nullptr) observer->Formed(true, config.size);
    Log(absl::StrCat("group: formed, generation ", gen, ", rank ", config.rank, " of ", config.size,
                     " (", BackendName(use_nccl), ")"));
  } catch (const std::exception& e) {
    std::vector<int> absent;
    for (int r = 0; r < config.size; ++r) {
      try {
        if (!s->check({absl::StrCat(prefix, "/joined/", r)})) absent.push_back(r);
      } catch (const std::exception&) {
        absent.push_back(r);
      }
    }
    absl::MutexLock lock(&mu);
    missing = std::move(absent);
    Log(absl::StrCat("group: generation ", gen, " did not form within ",
                     absl::FormatDuration(config.timeout), MissingText(), ": ", e.what()));
  }
}

void ReplicaGroup::Impl::Sync(Collectives& g) {
  if (state == nullptr) return;
  const auto start = std::chrono::steady_clock::now();
  constexpr int kIdWords = 8;                // model ids are at most 64 bytes
  constexpr int kEntryWords = 3 + kIdWords;  // id length, id, step, digest
  std::vector<GroupState::Entry> mine = state->Inventory();
  const int n = config.size;
  auto allgather = [&](const at::Tensor& t) {
    std::vector<at::Tensor> in{t.to(control_device).contiguous()};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < n; ++r) out[0].push_back(at::empty_like(in[0]));
    g.allgather(out, in)->wait();
    return at::stack(out[0]).cpu();
  };
  const at::Tensor counts =
      allgather(at::full({1}, static_cast<int64_t>(mine.size()), at::kLong)).flatten();
  const int64_t widest = counts.max().item<int64_t>();
  if (widest == 0) return;
  at::Tensor entries = at::zeros({widest, kEntryWords}, at::kLong);
  for (size_t i = 0; i < mine.size(); ++i) {
    int64_t* w = entries[static_cast<int64_t>(i)].data_ptr<int64_t>();
    const std::string& id = mine[i].model_id;
    w[0] = static_cast<int64_t>(std::min<size_t>(id.size(), 8 * kIdWords));
    std::memcpy(w + 1, id.data(), static_cast<size_t>(w[0]));
    w[1 + kIdWords] = mine[i].step;
    w[2 + kIdWords] = static_cast<int64_t>(mine[i].digest);
  }
  const at::Tensor all = allgather(entries);  // [n, widest, kEntryWords]
  struct Held {
    int rank;
    int64_t step;
    uint64_t digest;
  };
  std::map<std::string, std::vector<Held>> held;  // ordered: every rank walks the same order
  for (int r = 0; r < n; ++r) {
    for (int64_t i = 0; i < counts[r].item<int64_t>(); ++i) {
      const int64_t* w = all[r][i].data_ptr<int64_t>();
      std::string id(reinterpret_cast<const char*>(w + 1), static_cast<size_t>(w[0]));
      held[id].push_back({r, w[1 + kIdWords], static_cast<uint64_t>(w[2 + kIdWords])});
    }
  }
  int64_t received = 0;
  for (const auto& [id, holders] : held) {
    // The source: the highest step, the lowest rank at it. Never brings a replica back.
    Held best = holders[0];
    for (const Held& h : holders) {
      if (h.step > best.step) best = h;
    }
    std::vector<int> targets;
    for (int r = 0; r < n; ++r) {
      bool same = false;
      for (const Held& h : holders) {
        same = same || (h.rank == r && h.step == best.step && h.digest == best.digest);
      }
      if (!same) targets.push_back(r);
    }
    if (targets.empty()) continue;
    std::string bytes;
    if (config.rank == best.rank) {
      auto encoded = state->Encode(id);
      if (encoded.ok()) bytes = *std::move(encoded);
    }
    std::vector<at::Tensor> size{
        at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong).to(control_device)};
    c10d::BroadcastOptions options;
    options.rootRank = best.rank;
    g.broadcast(size, options)->wait();
    const int64_t length = size[0].item<int64_t>();
    if (length == 0) continue;  // the source could not encode it (deleted meanwhile)
    at::Tensor host = at::empty({length}, at::kByte);
    if (config.rank == best.rank) std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
    std::vector<at::Tensor> buffer{host.to(control_device)};
    g.broadcast(buffer, options)->wait();
    if (std::find(targets.begin(), targets.end(), config.rank) == targets.end()) continue;
    host = buffer[0].cpu();
    std::string state_bytes(static_cast<const char*>(host.data_ptr()), static_cast<size_t>(length));
    const absl::Status installed = state->Install(id, std::move(state_bytes), best.digest);
    received += length;
    Log(absl::StrCat("group: rank ", config.rank, ": model '", id, "' ",
                     installed.ok() ? "brought forward" : "NOT brought forward", " from rank ",
                     best.rank, " (step ", best.step, ", ", length, " bytes)",
                     installed.ok() ? "" : absl::StrCat(": ", installed.ToString())));
  }
  if (observer != nullptr) {
    observer->Synced(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), received);
  }
}

void ReplicaGroup::Impl::Broken(int64_t gen, const std::string& why) {
  c10::intrusive_ptr<c10d::Store> s;
  {
    absl::MutexLock lock(&mu);
    if (generation != gen) return;
    if (formed && observer != nullptr) observer->Formed(false, config.size);
    formed = false;
    if (pg) retired.push_back(std::move(pg));
    if (data) retired.push_back(std::move(data));
    s = store;
  }
  Log(absl::StrCat("group: generation ", gen, " failed (", why, "); re-forming"));
  if (!s) return;
  try {
    // Moves every rank on to the next generation, once, whichever rank saw the
    // failure first.
    s->compareSet(kGenerationKey, Bytes(gen), Bytes(gen + 1));
  } catch (const std::exception& e) {
    Log(absl::StrCat("group: the store did not answer: ", e.what()));
  }
}

// ---------------------------------------------------------------- calls

namespace {

// The words of one rank's header.
std::vector<int64_t> EncodeHeader(const CallHeader& h) {
  std::vector<int64_t> w(kHeaderWords, 0);
  w[0] = kMagic;
  w[1] = static_cast<int64_t>(h.kind);
  w[2] = static_cast<int64_t>(Fnv1a(h.model_id));
  w[3] = static_cast<int64_t>(h.digest);
  w[4] = h.expected_step;
  w[5] = h.model_step;
  w[6] = h.batch;
  w[7] = h.backwards;
  w[8] = h.loss;
  w[9] = static_cast<int64_t>(h.local.code());
  PutMessage(std::string(h.local.message()), w.data() + 10);
  return w;
}

struct Decision {
  bool local = false;
  int64_t group_batch = 0;
};

// What every rank decides from every rank's header; the same on each, but for
// which rank's error is its own.
absl::StatusOr<Decision> Agree(const CallHeader& mine, int my_rank, const at::Tensor& all,
                               int size) {
  const int64_t* w = all.data_ptr<int64_t>();
  auto word = [&](int r, int i) { return w[r * kHeaderWords + i]; };
  const absl::string_view call = CallName(mine.kind);
  const std::string on = absl::StrCat(call, " on '", mine.model_id, "'");
  for (int r = 0; r < size; ++r) {
    if (word(r, 0) != kMagic) {
      return absl::FailedPreconditionError(
          absl::StrCat("group: rank ", r,
                       " runs another version of tscale-server (its header is not this "
                       "one's); every rank must run the same version"));
    }
  }
  // Different calls met: two clients' calls reached the ranks in different
  // orders.
  for (int r = 0; r < size; ++r) {
    if (word(r, 1) != word(0, 1) || word(r, 2) != word(0, 2)) {
      return absl::AbortedError(absl::StrCat(
          "group: rank ", my_rank, " ran ", on, " while rank ", r == my_rank ? 0 : r,
          " ran another call (", CallName(static_cast<CallKind>(word(r == my_rank ? 0 : r, 1))),
          "): every rank must receive the same calls in the same order; "
          "nothing was applied, "
          "retry"));
    }
  }
  // A rank that refused before running.
  for (int r = 0; r < size; ++r) {
    const auto code = static_cast<absl::StatusCode>(word(r, 9));
    if (code == absl::StatusCode::kOk) continue;
    if (r == my_rank) return mine.local;
    return absl::Status(OthersCode(code), absl::StrCat("group: rank ", r, " refused its part of ",
                                                       on, ": ", absl::StatusCodeToString(code),
                                                       ": ", GetMessage(&w[r * kHeaderWords + 10]),
                                                       "; nothing was applied on any rank"));
  }
  for (int r = 1; r < size; ++r) {
    if (word(r, 3) != word(0, 3)) {
      absl::string_view what = mine.kind == CallKind::kCreate    ? "spec, seed, device or compute"
                               : mine.kind == CallKind::kImport  ? "state"
                               : mine.kind == CallKind::kRestore ? "checkpoint"
                                                                 : "arguments";
      return absl::FailedPreconditionError(
          absl::StrCat("group: ", on, ": rank ", r, "'s ", what,
                       " differs from rank 0's; every rank must "
                       "receive the same request; nothing was applied on any rank"));
    }
  }
  Decision d;
  if (mine.kind == CallKind::kDelete) {
    bool any = false;
    for (int r = 0; r < size; ++r) any = any || word(r, 5) >= 0;
    if (!any) {
      return absl::NotFoundError(
          absl::StrCat("model_id: no model '", mine.model_id, "' on any rank of the group"));
    }
    return d;
  }
  if (mine.kind != CallKind::kUpdate && mine.kind != CallKind::kTrainStep) return d;
  for (int r = 0; r < size; ++r) {
    if (word(r, 5) < 0) {
      return r == my_rank
                 ? absl::NotFoundError(absl::StrCat("model_id: no model '", mine.model_id, "'"))
                 : absl::FailedPreconditionError(
                       absl::StrCat("group: rank ", r, " has no model '", mine.model_id,
                                    "'; the replicas differ; nothing was applied on any "
                                    "rank"));
    }
  }
  for (int r = 1; r < size; ++r) {
    if (word(r, 4) != word(0, 4)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expected_step: rank 0 received ", word(0, 4), ", rank ", r, " received ", word(r, 4),
          "; every rank must receive the same ", call, "; nothing was applied on any rank"));
    }
    if (word(r, 8) != word(0, 8)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "loss: rank ", r, "'s loss differs from rank 0's; every rank must receive the same ",
          call, "; nothing was applied on any rank"));
    }
  }
  for (int r = 1; r < size; ++r) {
    if (word(r, 5) != word(0, 5)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "group: the replicas of '", mine.model_id, "' are at different steps (rank 0 at ",
          word(0, 5), ", rank ", r, " at ", word(r, 5), "); nothing was applied on any rank"));
    }
  }
  // Every rank at another step than expected: each answers as its model does
  // (the replay of the update just applied, or the model's own error), with
  // nothing exchanged.
  if (word(0, 5) != mine.expected_step) {
    d.local = true;
    return d;
  }
  if (mine.kind == CallKind::kUpdate) {
    int64_t backwards = 0;
    for (int r = 0; r < size; ++r) backwards += word(r, 7);
    if (backwards == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("update: no Backward on any rank of the group since step ",
                       mine.expected_step, " began; nothing to apply"));
    }
  }
  for (int r = 0; r < size; ++r) d.group_batch += word(r, 6);
  return d;
}

}  // namespace

// One call's exchanges over the process group of one generation.
class CallImpl final : public GroupCall, public core::UpdateCombiner {
 public:
  CallImpl(const GroupConfig& config, at::Device control_device, c10::intrusive_ptr<Collectives> pg,
           c10::intrusive_ptr<Collectives> data, const CallHeader& header, Decision decision,
           GroupObserver* observer)
      : config_(config),
        control_device_(control_device),
        pg_(std::move(pg)),
        data_(std::move(data)),
        header_(header),
        decision_(decision),
        observer_(observer) {}

  bool local() const override { return decision_.local; }
  int64_t group_batch() const override { return decision_.group_batch; }
  core::UpdateCombiner* combiner() override { return this; }
  bool met() const { return met_; }
  const std::string& failure() const { return failure_; }

  absl::Status Vote(const absl::Status& local, uint64_t digest) override {
    auto votes = Votes(local, static_cast<int64_t>(digest), 0);
    if (!votes.ok()) return votes.status();
    const int64_t* w = votes->data_ptr<int64_t>();
    for (int r = 1; r < config_.size; ++r) {
      if (w[r * kVoteWords + 1] != w[1]) {
        return absl::FailedPreconditionError(absl::StrCat(
            "group: ", CallName(header_.kind), " on '", header_.model_id, "': rank ", r,
            "'s resulting state differs from rank 0's (its "
            "digest); nothing was applied on any "
            "rank"));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Combined> Combine(Local local) override;

 private:
  // Every rank's verdict: the votes [size, kVoteWords] when every rank's status
  // is OK, else this rank's error or one naming the rank that refused.
  absl::StatusOr<at::Tensor> Votes(const absl::Status& local, int64_t payload, int64_t fingerprint);
  // Allgather of equal-sized CPU or CUDA tensors, run on `device`, the result on `mine`'s device;
  // UNAVAILABLE (and the group re-forms) when the collective fails.
  absl::StatusOr<at::Tensor> Allgather(Collectives& pg, const at::Tensor& mine, at::Device device);
  absl::Status Failed(absl::string_view what, const std::exception& e);

  const GroupConfig& config_;
  const at::Device control_device_;
  c10::intrusive_ptr<Collectives> pg_, data_;
  const CallHeader& header_;
  const Decision decision_;
  GroupObserver* observer_;
  bool met_ = false;
  std::string failure_;  // a collective failed: the group must re-form
};

absl::Status CallImpl::Failed(absl::string_view what, const std::exception& e) {
  failure_ = e.what();
  const size_t eol = failure_.find('\n');
  if (eol != std::string::npos) failure_.resize(eol);
  return absl::UnavailableError(
      absl::StrCat("group: ", CallName(header_.kind), " on '", header_.model_id, "': the group's ",
                   what, " failed (", failure_, "): a rank did not join within ",
                   absl::FormatDuration(config_.timeout),
                   ", or died, or its link broke; nothing was applied "
                   "on this rank; the group re-forms and the call can be retried"));
}

absl::StatusOr<at::Tensor> CallImpl::Allgather(Collectives& pg, const at::Tensor& mine,
                                               at::Device device) {
  std::vector<at::Tensor> in{mine.to(device).contiguous()};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < config_.size; ++r) out[0].push_back(at::empty_like(in[0]));
  try {
    pg.allgather(out, in)->wait();
  } catch (const std::exception& e) {
    return Failed("exchange", e);
  }
  return at::stack(out[0]).to(mine.device());
}

absl::StatusOr<at::Tensor> CallImpl::Votes(const absl::Status& local, int64_t payload,
                                           int64_t fingerprint) {
  met_ = true;
  at::Tensor mine = at::zeros({kVoteWords}, at::kLong);
  int64_t* w = mine.data_ptr<int64_t>();
  w[0] = static_cast<int64_t>(local.code());
  w[1] = payload;
  w[2] = fingerprint;
  PutMessage(std::string(local.message()), w + 3);
  auto all = Allgather(*pg_, mine, control_device_);
  if (!all.ok()) return all.status();
  const int64_t* v = all->data_ptr<int64_t>();
  for (int r = 0; r < config_.size; ++r) {
    const auto code = static_cast<absl::StatusCode>(v[r * kVoteWords]);
    if (code == absl::StatusCode::kOk) continue;
    if (r == config_.rank) return local;
    return absl::Status(
        OthersCode(code),
        absl::StrCat("group: rank ", r, " refused to commit ", CallName(header_.kind), " on '",
                     header_.model_id, "': ", absl::StatusCodeToString(code), ": ",
                     GetMessage(v + r * kVoteWords + 3), "; nothing was applied on any rank"));
  }
  return all->view({config_.size, kVoteWords});
}

absl::StatusOr<core::UpdateCombiner::Combined> CallImpl::Combine(Local local) {
  const auto start = std::chrono::steady_clock::now();
  double loss = local.loss;
  int64_t loss_bits = 0;
  std::memcpy(&loss_bits, &loss, sizeof(loss));
  auto votes = Votes(local.status, loss_bits, static_cast<int64_t>(local.fingerprint));
  if (!votes.ok()) return votes.status();
  Combined combined;
  const int64_t* v = votes->data_ptr<int64_t>();
  for (int r = 0; r < config_.size; ++r) {
    double share = 0;
    std::memcpy(&share, v + r * kVoteWords + 1, sizeof(share));
    combined.loss += share;
    combined.fingerprints.push_back(static_cast<uint64_t>(v[r * kVoteWords + 2]));
  }

  const int n = config_.size, me = config_.rank;
  const size_t layers = local.states.size();
  if (layers == 0) return combined;
  // Rank r owns rows [R r / n, R (r + 1) / n) of a layer of R rows: it sums
  // those rows of every rank's gradient (reduce-scatter, as an all-to-all) and
  // scores them; then every rank gathers every rank's scores (integers, far
  // smaller than the gradient).
  auto first_row = [n](int64_t rows, int r) { return rows * r / n; };
  const at::Device model_device = local.states[0]->corr_accum().device();
  const bool on_data = data_ && model_device.is_cuda();
  const at::Device wire = on_data ? model_device : control_device_;
  Collectives& data_pg = on_data ? *data_ : *pg_;

  std::vector<at::Tensor> parts;
  std::vector<int64_t> in_splits(n, 0);
  bool small = true;  // scores fit int16: |score| <= group size
  for (int j = 0; j < n; ++j) {
    for (size_t l = 0; l < layers; ++l) {
      const core::TernaryState& st = *local.states[l];
      small = small && st.group_size() <= 32767;
      const int64_t a = first_row(st.rows(), j), b = first_row(st.rows(), j + 1);
      at::Tensor rows =
          local.grad_sums[l].defined()
              ? local.grad_sums[l].narrow(0, a, b - a).to(wire, at::kFloat)
              : at::zeros({b - a, st.cols()}, at::TensorOptions(wire).dtype(at::kFloat));
      parts.push_back(rows.reshape({-1}));
      in_splits[j] += (b - a) * st.cols();
    }
  }
  const at::Tensor send = at::cat(parts);
  parts.clear();
  const int64_t mine_total = in_splits[me];
  at::Tensor recv = at::empty({n * mine_total}, send.options());
  // alltoall_base may take its split vectors (Gloo moves them): it gets copies.
  std::vector<int64_t> out_splits(n, mine_total), send_splits = in_splits;
  try {
    data_pg.alltoall_base(recv, const_cast<at::Tensor&>(send), out_splits, send_splits)->wait();
  } catch (const std::exception& e) {
    return Failed("reduce-scatter of the gradients", e);
  }
  // The owner sums its rows in rank order.
  at::Tensor sum = recv.narrow(0, 0, mine_total).clone();
  for (int r = 1; r < n; ++r) sum.add_(recv.narrow(0, r * mine_total, mine_total));
  recv = at::Tensor();

  // This rank's scores, every layer's in order.
  const at::ScalarType score_type = small ? at::kShort : at::kInt;
  std::vector<at::Tensor> my_scores;
  int64_t offset = 0;
  auto chunk_of = [&](int r) {  // a rank's count of scores
    int64_t k = 0;
    for (size_t l = 0; l < layers; ++l) {
      const core::TernaryState& st = *local.states[l];
      k += (first_row(st.rows(), r + 1) - first_row(st.rows(), r)) * st.groups_per_row();
    }
    return k;
  };
  for (size_t l = 0; l < layers; ++l) {
    const core::TernaryState& st = *local.states[l];
    const int64_t a = first_row(st.rows(), me), b = first_row(st.rows(), me + 1);
    const at::Tensor rows = sum.narrow(0, offset, (b - a) * st.cols()).view({b - a, st.cols()});
    offset += (b - a) * st.cols();
    my_scores.push_back(st.ScoresOfRows(rows.to(model_device), a).to(wire, score_type));
  }
  int64_t widest = 0;
  for (int r = 0; r < n; ++r) widest = std::max(widest, chunk_of(r));
  at::Tensor packed = at::zeros({widest}, at::TensorOptions(wire).dtype(score_type));
  if (chunk_of(me) > 0) packed.narrow(0, 0, chunk_of(me)).copy_(at::cat(my_scores));
  // As bytes: Gloo has no int16 collectives, and bytes are bytes.
  auto gathered = Allgather(data_pg, packed.view(at::kByte), wire);
  if (!gathered.ok()) return gathered.status();
  *gathered = gathered->view(score_type);
  // Unpack: layer l's scores are every rank's part of it, in rank order.
  std::vector<int64_t> at_rank(n, 0);
  for (size_t l = 0; l < layers; ++l) {
    const core::TernaryState& st = *local.states[l];
    std::vector<at::Tensor> pieces;
    for (int r = 0; r < n; ++r) {
      const int64_t k =
          (first_row(st.rows(), r + 1) - first_row(st.rows(), r)) * st.groups_per_row();
      pieces.push_back((*gathered)[r].narrow(0, at_rank[r], k));
      at_rank[r] += k;
    }
    combined.scores.push_back(at::cat(pieces).to(model_device, at::kLong));
  }
  if (observer_ != nullptr) {
    const int64_t element = small ? 2 : 4;
    int64_t sent = 0;
    for (int j = 0; j < n; ++j) {
      if (j != me) sent += in_splits[j] * 4;
    }
    // A ring allgather sends n - 1 chunks; the votes are a ring allgather of
    // their own.
    sent += (n - 1) * (widest * element + kVoteWords * 8);
    observer_->Exchanged(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), sent);
  }
  return combined;
}

absl::Status ReplicaGroup::Run(const CallHeader& header,
                               const std::function<absl::Status(GroupCall&)>& body) {
  Impl& g = *impl_;
  absl::MutexLock call_lock(&g.call_mu);
  c10::intrusive_ptr<Collectives> pg, data;
  c10::intrusive_ptr<c10d::Store> store;
  int64_t gen = -1;
  {
    absl::MutexLock lock(&g.mu);
    auto ready = [&g]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g.mu) { return g.formed || g.stopping; };
    g.mu.AwaitWithTimeout(absl::Condition(&ready), g.config.timeout);
    if (!g.formed) {
      if (g.observer != nullptr) g.observer->CallFailed("unavailable");
      return absl::UnavailableError(absl::StrCat(
          "group: ", CallName(header.kind), " on '", header.model_id, "': the group of ",
          g.config.size, " is not formed", g.MissingText(), "; retry once every rank is up"));
    }
    pg = g.pg;
    data = g.data;
    store = g.store;
    gen = g.generation;
  }
  const at::Tensor mine = at::tensor(EncodeHeader(header), at::kLong).to(g.control_device);
  auto all = [&]() -> absl::StatusOr<at::Tensor> {
    std::vector<at::Tensor> in{mine};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < g.config.size; ++r) out[0].push_back(at::empty_like(mine));
    try {
      pg->allgather(out, in)->wait();
    } catch (const std::exception& e) {
      std::string why = e.what();
      if (why.find('\n') != std::string::npos) why.resize(why.find('\n'));
      g.Broken(gen, why);
      return absl::UnavailableError(absl::StrCat(
          "group: ", CallName(header.kind), " on '", header.model_id,
          "': the other ranks did not join the call within ",
          absl::FormatDuration(g.config.timeout), ", or one died or its link broke (", why,
          "); every rank must receive the call; nothing was applied; the group "
          "re-forms and the call can be retried"));
    }
    return at::cat(out[0]).cpu();
  }();
  if (!all.ok()) {
    if (g.observer != nullptr) g.observer->CallFailed("unavailable");
    return all.status();
  }
  auto decision = Agree(header, g.config.rank, *all, g.config.size);
  if (!decision.ok()) {
    if (g.observer != nullptr) g.observer->CallFailed(header.local.ok() ? "mismatch" : "refused");
    return decision.status();
  }
  CallImpl run(g.config, g.control_device, pg, data, header, *decision, g.observer);
  absl::Status status = body(run);
  if (!decision->local && !run.met()) {
    // The body stopped before the commit point: the others are waiting there
    // for this rank.
    (void)run.Vote(
        status.ok() ? absl::InternalError("the call stopped before its commit point") : status, 0);
  }
  if (!run.failure().empty()) {
    g.Broken(gen, run.failure());
    if (g.observer != nullptr) g.observer->CallFailed("unavailable");
  } else if (!status.ok() && g.observer != nullptr && run.met() &&
             absl::StrContains(status.message(), "group: rank")) {
    g.observer->CallFailed("refused");
  }
  return status;
}

}  // namespace tscale::group
