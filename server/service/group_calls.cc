// The state-changing calls of a server in a replica group: each rank states what it received
// (CallHeader), the group checks that the ranks agree, and the call commits at the group's commit
// point (a vote, or the update's exchange). Thin: the checks and the exchange live in
// server/group, the arithmetic in the core.
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/checkpoint/state_file.h"
#include "server/service/convert.h"
#include "server/service/trainer_service.h"

#if TSCALE_WITH_GROUP
#include "server/group/replica_group.h"
#endif

namespace tscale::service {

#if TSCALE_WITH_GROUP

namespace {

// The header of a call on `model_id` by this rank: its model's step, or -1 without one; an
// invalid id is this rank's refusal.
group::CallHeader HeaderFor(group::CallKind kind, const std::string& model_id,
                            const core::ModelRegistry& registry) {
  group::CallHeader h;
  h.kind = kind;
  h.model_id = model_id;
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) {
    h.local = s;
    return h;
  }
  if (auto model = registry.Get(model_id); model.ok()) h.model_step = (*model)->step();
  return h;
}

// What GroupSync sends a member it brings forward: the state file, and the record of the update
// that made it (so that the member replays a retry of that update as its peers do). Layout:
// "tsrec001", the record's length (8 bytes), the record, the state file. The record: step,
// train_step, loss, the fingerprints (count, then each), the layers (count, then each: name's
// length, name, score_sum, mean_abs_drift), 8 bytes each number, native order (one build).
constexpr char kEnvelopeMagic[] = "tsrec001";

template <typename T>
void Put(std::string* out, T value) {
  out->append(reinterpret_cast<const char*>(&value), sizeof(value));
}

template <typename T>
bool Take(absl::string_view* in, T* value) {
  if (in->size() < sizeof(T)) return false;
  std::memcpy(value, in->data(), sizeof(T));
  in->remove_prefix(sizeof(T));
  return true;
}

std::string EncodeRecord(const core::LastUpdateRecord& r) {
  std::string out;
  Put<int64_t>(&out, r.update.step);
  Put<int64_t>(&out, r.train_step ? 1 : 0);
  Put<double>(&out, r.loss);
  Put<int64_t>(&out, static_cast<int64_t>(r.fingerprints.size()));
  for (uint64_t f : r.fingerprints) Put<uint64_t>(&out, f);
  Put<int64_t>(&out, static_cast<int64_t>(r.update.layers.size()));
  for (const core::LayerUpdate& l : r.update.layers) {
    Put<int64_t>(&out, static_cast<int64_t>(l.layer.size()));
    out.append(l.layer);
    Put<int64_t>(&out, l.score_sum);
    Put<double>(&out, l.mean_abs_drift);
  }
  return out;
}

absl::StatusOr<core::LastUpdateRecord> DecodeRecord(absl::string_view in) {
  core::LastUpdateRecord r;
  int64_t train_step = 0, count = 0;
  const auto bad = [] {
    return absl::DataLossError("the peer's record of its last update is cut");
  };
  if (!Take(&in, &r.update.step) || !Take(&in, &train_step) || !Take(&in, &r.loss) ||
      !Take(&in, &count) || count < 0 || static_cast<uint64_t>(count) > in.size() / 8) {
    return bad();
  }
  r.train_step = train_step != 0;
  r.fingerprints.resize(static_cast<size_t>(count));
  for (uint64_t& f : r.fingerprints) Take(&in, &f);
  if (!Take(&in, &count) || count < 0 || static_cast<uint64_t>(count) > in.size() / 24) {
    return bad();
  }
  for (int64_t i = 0; i < count; ++i) {
    core::LayerUpdate l;
    int64_t length = 0;
    if (!Take(&in, &length) || length < 0 || static_cast<uint64_t>(length) > in.size()) {
      return bad();
    }
    l.layer = std::string(in.substr(0, static_cast<size_t>(length)));
    in.remove_prefix(static_cast<size_t>(length));
    if (!Take(&in, &l.score_sum) || !Take(&in, &l.mean_abs_drift)) return bad();
    r.update.layers.push_back(std::move(l));
  }
  return r;
}

// A gate that votes with the digest of the state about to be committed.
std::function<absl::Status(const core::Model&)> VoteWithState(group::GroupCall& call) {
  return [&call](const core::Model& model) {
    return call.Vote(absl::OkStatus(), group::StateDigest(model.ExportState()));
  };
}

}  // namespace

absl::Status TrainerService::GroupCreateModel(const v1::CreateModelRequest& req,
                                              v1::ModelInfo* resp,
                                              const core::Interrupt& interrupt) {
  group::CallHeader h = HeaderFor(group::CallKind::kCreate, req.model_id(), registry_);
  // Every argument of the request (spec, seed, device, compute) must be the same on each rank.
  h.digest = group::Fnv1a(req.ShortDebugString());
  return group_->Run(h, [&](group::GroupCall& call) {
    return DoCreateModel(req, resp, interrupt, VoteWithState(call));
  });
}

absl::Status TrainerService::GroupImportState(const v1::ImportHeader& header, std::string data,
                                              v1::ModelInfo* resp,
                                              const core::Interrupt& interrupt) {
  group::CallHeader h = HeaderFor(group::CallKind::kImport, header.model_id(), registry_);
  h.digest = group::Fnv1a(data, group::Fnv1a(header.ShortDebugString()));
  return group_->Run(h, [&](group::GroupCall& call) {
    return DoImportState(header, std::move(data), resp, interrupt, VoteWithState(call));
  });
}

absl::Status TrainerService::GroupRestoreCheckpoint(const v1::RestoreCheckpointRequest& req,
                                                    v1::ModelInfo* resp) {
  group::CallHeader h = HeaderFor(group::CallKind::kRestore, req.model_id(), registry_);
  // The checkpoint each rank would restore: its name and contents' checksum must agree.
  if (h.local.ok()) {
    auto checkpoints = Checkpoints();
    if (!checkpoints.ok()) {
      h.local = checkpoints.status();
    } else if (auto list = (*checkpoints)->store().List(req.model_id()); list.ok()) {
      const checkpoint::CheckpointInfo* chosen = &list->back();
      for (const checkpoint::CheckpointInfo& info : *list) {
        if (info.name == req.name()) chosen = &info;
      }
      h.digest = group::Fnv1a(
          absl::StrCat(chosen->name, ":", chosen->crc32c, ":", req.device(), ":", req.compute()));
    }
  }
  return group_->Run(h, [&](group::GroupCall& call) -> absl::Status {
    auto before = registry_.Get(req.model_id());
    absl::Status restored = DoRestoreCheckpoint(req, resp);
    if (!restored.ok()) return restored;
    auto model = registry_.Get(req.model_id());
    absl::Status vote =
        model.ok() ? call.Vote(absl::OkStatus(), group::StateDigest((*model)->ExportState()))
                   : call.Vote(model.status(), 0);
    if (vote.ok()) return absl::OkStatus();
    // Another rank could not restore: the model this rank held before comes back.
    if (before.ok()) {
      (void)registry_.Add(req.model_id(), *before, /*replace=*/true);
    } else {
      (void)registry_.Remove(req.model_id());
    }
    resp->Clear();
    return vote;
  });
}

absl::Status TrainerService::GroupDeleteModel(const v1::DeleteModelRequest& req) {
  group::CallHeader h = HeaderFor(group::CallKind::kDelete, req.model_id(), registry_);
  h.digest = req.delete_checkpoints() ? 1 : 0;
  return group_->Run(h, [&](group::GroupCall& call) -> absl::Status {
    if (absl::Status s = call.Vote(absl::OkStatus(), 0); !s.ok()) return s;
    absl::Status deleted = DoDeleteModel(req);
    // A rank without the model converges with the others.
    return absl::IsNotFound(deleted) ? absl::OkStatus() : deleted;
  });
}

absl::Status TrainerService::GroupUpdateCorrelation(const v1::UpdateCorrelationRequest& req,
                                                    v1::UpdateCorrelationResponse* resp,
                                                    const core::Interrupt& interrupt) {
  group::CallHeader h = HeaderFor(group::CallKind::kUpdate, req.model_id(), registry_);
  h.expected_step = req.expected_step();
  // A retry of the update this rank applied last is answered here, as a server alone would:
  // the other ranks applied it too, and may never send theirs.
  if (h.model_step >= 0 && h.model_step == req.expected_step() + 1) {
    return DoUpdateCorrelation(req, resp, interrupt);
  }
  std::shared_ptr<core::Model> model;
  if (auto m = registry_.Get(req.model_id()); m.ok()) {
    model = *m;
    h.backwards = model->backwards();
  }
  return group_->Run(h, [&](group::GroupCall& call) -> absl::Status {
    if (call.local()) return DoUpdateCorrelation(req, resp, interrupt);
    auto result = model->UpdateCorrelation(req.expected_step(), interrupt, call.combiner());
    if (!result.ok()) return result.status();
    UpdatedCorrelation(req.model_id(), *result, resp);
    return absl::OkStatus();
  });
}

absl::Status TrainerService::GroupTrainStep(const v1::TrainStepRequest& req,
                                            v1::TrainStepResponse* resp,
                                            const core::Interrupt& interrupt) {
  group::CallHeader h = HeaderFor(group::CallKind::kTrainStep, req.model_id(), registry_);
  h.expected_step = req.expected_step();
  h.loss = req.loss();
  auto args = ParseTrainStep(req);
  if (args.ok() && h.model_step >= 0 && h.model_step == req.expected_step() + 1) {
    return RunTrainStep(req, *args, resp, interrupt, nullptr);  // a replay, as for updates
  }
  if (args.ok()) {
    h.batch = args->input.dim() == 2 ? args->input.size(0) : 0;
    h.local = args->model->CheckTrainStep(args->input, args->target, args->loss);
  } else if (!absl::IsNotFound(args.status()) && h.local.ok()) {
    h.local = args.status();
  }
  return group_->Run(h, [&](group::GroupCall& call) -> absl::Status {
    if (call.local()) return RunTrainStep(req, *args, resp, interrupt, nullptr);
    const core::GroupStep step{call.combiner(), call.group_batch()};
    return RunTrainStep(req, *args, resp, interrupt, &step);
  });
}

class TrainerService::GroupSync final : public group::GroupState {
 public:
  explicit GroupSync(TrainerService* service) : service_(service) {}

  std::vector<Entry> Inventory() override {
    std::vector<Entry> out;
    for (const auto& [id, model] : service_->registry_.List()) {
      const core::StateSnapshot state = model->ExportState();
      out.push_back({id, state.step, group::StateDigest(state)});
    }
    return out;
  }

  absl::StatusOr<std::string> Encode(const std::string& model_id) override {
    auto model = service_->registry_.Get(model_id);
    if (!model.ok()) return model.status();
    // The record first: an update committed between the two would make the state newer than
    // the record, which the member then ignores (its digest check still holds the state).
    const std::optional<core::LastUpdateRecord> last = (*model)->LastUpdate();
    v1::ExportStateRequest req;
    req.set_model_id(model_id);
    auto state = service_->DoExportState(req);
    if (!state.ok()) return state.status();
    const std::string record = last.has_value() ? EncodeRecord(*last) : std::string();
    std::string out(kEnvelopeMagic, 8);
    Put<uint64_t>(&out, record.size());
    out += record;
    out += *state;
    return out;
  }

  absl::Status Install(const std::string& model_id, std::string bytes, uint64_t digest) override {
    absl::string_view in(bytes);
    uint64_t record_size = 0;
    if (!absl::StartsWith(in, absl::string_view(kEnvelopeMagic, 8))) {
      return absl::DataLossError("the peer's state has no envelope (another tscale version?)");
    }
    in.remove_prefix(8);
    if (!Take(&in, &record_size) || record_size > in.size()) {
      return absl::DataLossError("the peer's state is cut");
    }
    std::optional<core::LastUpdateRecord> last;
    if (record_size > 0) {
      auto record = DecodeRecord(in.substr(0, record_size));
      if (!record.ok()) return record.status();
      last = *std::move(record);
    }
    in.remove_prefix(record_size);
    auto decoded = checkpoint::DecodeState(std::string(in));
    if (!decoded.ok()) return decoded.status();
    if (!decoded->spec.has_value()) {
      return absl::DataLossError("the peer's state file has no spec in its metadata");
    }
    core::ModelOptions options = service_->options_.model;
    if (auto it = decoded->metadata.find("compute"); it != decoded->metadata.end()) {
      v1::ComputeType compute;
      if (v1::ComputeType_Parse(it->second, &compute)) {
        auto c = ComputeFromProto(compute);
        if (c.ok()) options.compute = *c;
      }
    }
    auto model = core::Model::Import(*decoded->spec, decoded->tensors, decoded->step,
                                     service_->options_.default_device, options);
    if (!model.ok()) return model.status();
    std::shared_ptr<core::Model> shared = *std::move(model);
    const uint64_t got = group::StateDigest(shared->ExportState());
    if (got != digest) {
      return absl::DataLossError(
          absl::StrCat("the state received has digest ", got, ", the peer's is ", digest));
    }
    // A retry of the update that brought the peer here is replayed on this rank too. A record
    // that does not fit (of an older step, or without this rank's fingerprint) is left out: the
    // state is the group's all the same, and such a retry is refused as stale.
    if (last.has_value()) {
      (void)shared->AdoptLastUpdate(*last, static_cast<size_t>(service_->group_->config().rank));
    }
    if (absl::Status s = service_->registry_.Add(model_id, shared, /*replace=*/true); !s.ok()) {
      return s;
    }
    if (service_->checkpointer_ != nullptr) service_->checkpointer_->Forget(model_id);
    return absl::OkStatus();
  }

 private:
  TrainerService* const service_;
};

group::GroupState* TrainerService::group_state() {
  if (!group_sync_) group_sync_ = std::make_shared<GroupSync>(this);
  return group_sync_.get();
}

void TrainerService::GroupInfo(v1::ServerInfo* resp) const {
  if (group_ == nullptr) {
    resp->set_group_size(1);
    return;
  }
  const group::GroupStatus status = group_->status();
  resp->set_group_size(status.size);
  resp->set_group_rank(status.rank);
  resp->set_group_formed(status.formed);
  resp->set_group_generation(status.generation);
  for (int r : status.missing) resp->add_group_missing_ranks(r);
  resp->set_group_backend(status.backend);
}

#else  // !TSCALE_WITH_GROUP: built with neither Gloo nor NCCL; no group is ever set (server.cc).

namespace {
absl::Status NoGroups() {
  return absl::FailedPreconditionError(
      "group: this tscale-server was built without replica groups (neither Gloo's headers nor "
      "c10d's NCCL were found)");
}
}  // namespace

void TrainerService::GroupInfo(v1::ServerInfo* resp) const { resp->set_group_size(1); }
group::GroupState* TrainerService::group_state() { return nullptr; }
absl::Status TrainerService::GroupCreateModel(const v1::CreateModelRequest&, v1::ModelInfo*,
                                              const core::Interrupt&) {
  return NoGroups();
}
absl::Status TrainerService::GroupImportState(const v1::ImportHeader&, std::string, v1::ModelInfo*,
                                              const core::Interrupt&) {
  return NoGroups();
}
absl::Status TrainerService::GroupRestoreCheckpoint(const v1::RestoreCheckpointRequest&,
                                                    v1::ModelInfo*) {
  return NoGroups();
}
absl::Status TrainerService::GroupDeleteModel(const v1::DeleteModelRequest&) { return NoGroups(); }
absl::Status TrainerService::GroupUpdateCorrelation(const v1::UpdateCorrelationRequest&,
                                                    v1::UpdateCorrelationResponse*,
                                                    const core::Interrupt&) {
  return NoGroups();
}
absl::Status TrainerService::GroupTrainStep(const v1::TrainStepRequest&, v1::TrainStepResponse*,
                                            const core::Interrupt&) {
  return NoGroups();
}

#endif

}  // namespace tscale::service
