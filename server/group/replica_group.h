// A replica group: N tscale-server processes that hold the same models and
// train them together, data-parallel, over LibTorch's c10d: rank 0 hosts a
// TCPStore where the ranks meet, and their process group (Gloo; NCCL for CUDA
// models where LibTorch has it; NCCL alone where LibTorch comes without Gloo's
// headers, as PyTorch's wheels do) carries every exchange. No gRPC here: the
// service runs its state-changing calls through ReplicaGroup::Run.
//
// A group call (create, import, restore, delete, UpdateCorrelation, TrainStep)
// is the same request sent to every rank. The ranks first exchange a header
// (what call, on which model, with what arguments' digest, at which step):
// where they differ the call fails on every rank, naming what differs, before
// anything changes. Then each rank runs the call; the changes commit only after
// every rank's verdict has met (a vote), so that an update commits on every
// rank or on none. A collective that fails (a rank that never joins within the
// timeout, or dies) fails the call with UNAVAILABLE on the ranks it reached;
// the group then re-forms as a fresh process group under a new generation,
// without a restart of any server.
#ifndef TSCALE_SERVER_GROUP_REPLICA_GROUP_H_
#define TSCALE_SERVER_GROUP_REPLICA_GROUP_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/core/combiner.h"
#include "server/core/model.h"
#include "server/group/config.h"

namespace tscale::group {

enum class CallKind : int64_t {
  kCreate = 1,
  kImport = 2,
  kRestore = 3,
  kDelete = 4,
  kUpdate = 5,
  kTrainStep = 6,
};
absl::string_view CallName(CallKind kind);  // "CreateModel", ...

// What one rank says of a group call before it runs.
struct CallHeader {
  CallKind kind = CallKind::kCreate;
  std::string model_id;
  // Of the call's arguments that every rank must share: the spec, seed, device
  // and compute of a create; the state of an import; the checkpoint of a
  // restore. 0 where none.
  uint64_t digest = 0;
  int64_t expected_step = -1;  // UpdateCorrelation, TrainStep
  int64_t model_step = -1;     // this rank's model's step; -1 when it has no such model
  int64_t batch = 0;           // TrainStep: this rank's rows
  int64_t backwards = 0;       // UpdateCorrelation: this rank's Backward calls at the step
  int64_t loss = 0;            // TrainStep: the loss kind
  // Not OK when this rank refuses the call before it runs (an invalid
  // argument): the call fails on every rank.
  absl::Status local;
};

// Reports for metrics; called from the group's threads.
class GroupObserver {
 public:
  virtual ~GroupObserver() = default;
  virtual void Formed(bool formed, int size) = 0;
  // One update's exchange: its time and the bytes this rank sent.
  virtual void Exchanged(double seconds, int64_t bytes_sent) = 0;
  // The group formed and its ranks were brought in line: the time it took and the state bytes
  // this rank received from a peer (0 when every replica was already the same).
  virtual void Synced(double /*seconds*/, int64_t /*bytes_received*/) {}
  // A group call that failed because of the group: "mismatch" (the ranks' calls
  // differ), "refused" (another rank refused its part), "unavailable" (not
  // formed, or a collective failed).
  virtual void CallFailed(absl::string_view reason) = 0;
};

// What a rank holds, so that a member that comes back (empty, or from an older checkpoint) is
// brought forward from a live peer when the group forms. Implemented by the service.
class GroupState {
 public:
  struct Entry {
    std::string model_id;
    int64_t step = 0;
    uint64_t digest = 0;  // StateDigest of the model's state
  };
  virtual ~GroupState() = default;
  virtual std::vector<Entry> Inventory() = 0;
  // The model's state as a state file's bytes (what ExportState streams).
  virtual absl::StatusOr<std::string> Encode(const std::string& model_id) = 0;
  // Installs a state file's bytes as `model_id`, replacing the model there; an error, and
  // nothing installed, unless the installed state's digest is `digest`.
  virtual absl::Status Install(const std::string& model_id, std::string bytes, uint64_t digest) = 0;
};

// The group's view of one call, handed to the call's body on every rank.
class GroupCall {
 public:
  virtual ~GroupCall() = default;
  // True when each rank answers alone, with no exchange: every rank's model is
  // past the step (a replay) or not at it (its own error).
  virtual bool local() const = 0;
  // TrainStep: the rows of every rank's batch.
  virtual int64_t group_batch() const = 0;
  // For UpdateCorrelation and TrainStep: the update's exchange and vote.
  virtual core::UpdateCombiner* combiner() = 0;
  // The commit point of a create, import, restore or delete: every rank's
  // verdict (and digest of the state it would commit) meet. OK when every rank
  // may commit and the digests agree; then the body commits. Otherwise an error
  // naming the rank, and no rank commits.
  virtual absl::Status Vote(const absl::Status& local, uint64_t digest) = 0;
};

struct GroupStatus {
  int size = 1;
  int rank = 0;
  bool formed = false;
  int64_t generation = -1;   // of the process group in use; -1 before the first
  std::vector<int> missing;  // ranks that did not join the last attempt to form
  std::string backend;       // "gloo", "gloo+nccl", or "nccl"
};

class ReplicaGroup {
 public:
  // Starts joining the group in the background (rank 0 opens the store); Run
  // waits for it. `device`: the models' default device; on a GPU, where LibTorch
  // has c10d's NCCL, an NCCL process group carries the CUDA models' exchanges (and,
  // in a build without Gloo, every exchange). `log` receives a line for each
  // change of membership.
  // `state`, when given, is brought in line across the ranks each time the group forms: for
  // each model, the replica at the highest step (the lowest such rank's) is broadcast to every
  // rank that lacks it or holds another state, which installs it and checks its digest; only then
  // do group calls run.
  static std::unique_ptr<ReplicaGroup> Start(GroupConfig config, at::Device device = at::kCPU,
                                             GroupObserver* observer = nullptr,
                                             std::function<void(const std::string&)> log = {},
                                             GroupState* state = nullptr);
  ~ReplicaGroup();
  ReplicaGroup(const ReplicaGroup&) = delete;
  ReplicaGroup& operator=(const ReplicaGroup&) = delete;

  const GroupConfig& config() const;
  GroupStatus status() const;
  // True once formed, false when `timeout` passed first.
  bool WaitFormed(absl::Duration timeout) const;
  // Whether NCCL is compiled in (LibTorch with CUDA and c10d's NCCL).
  static bool HasNccl();
  // Whether Gloo is compiled in (its headers were found). Without it a group needs its models'
  // default device to be a GPU, and a group of N ranks N GPUs.
  static bool HasGloo();

  // Runs a group call (one at a time on this rank): the headers meet; where
  // they agree, `body` runs with the call's view, and must reach the group's
  // commit point (GroupCall::Vote or the combiner) unless local(); a body that
  // returns before it makes the group fail the call on every rank with its
  // status. UNAVAILABLE when the group is not formed within the timeout or a
  // collective fails.
  absl::Status Run(const CallHeader& header, const std::function<absl::Status(GroupCall&)>& body);

 private:
  struct Impl;
  explicit ReplicaGroup(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// A digest of a model's persistent state (its tensors' names, dtypes, shapes
// and bytes, and its step), equal on two ranks exactly when their states are
// byte-identical (barring collisions).
uint64_t StateDigest(const core::StateSnapshot& state);
// FNV-1a over `bytes`, continuing from `seed`.
uint64_t Fnv1a(absl::string_view bytes, uint64_t seed = 14695981039346656037ull);

}  // namespace tscale::group

#endif  // TSCALE_SERVER_GROUP_REPLICA_GROUP_H_
