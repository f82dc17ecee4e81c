#include "client/cpp/group.h"

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"

namespace tscale::client {

ReplicaGroup::ReplicaGroup(const std::vector<std::string>& addresses, ClientOptions options,
                           absl::Duration retry_time)
    : retry_time_(retry_time) {
  options.retry.max_attempts = 1;
  for (const std::string& a : addresses) clients_.push_back(std::make_unique<Client>(a, options));
}

absl::Status ReplicaGroup::Each(const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> statuses(clients_.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < size(); ++r) {
    threads.emplace_back([&statuses, &fn, r] { statuses[r] = fn(r); });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < size(); ++r) {
    if (!statuses[r].ok()) {
      return absl::Status(statuses[r].code(), absl::StrCat("rank ", r, ": ", statuses[r].message()));
    }
  }
  return absl::OkStatus();
}

absl::Status ReplicaGroup::GroupCall(const std::function<absl::Status(int)>& fn) {
  const absl::Time deadline = absl::Now() + retry_time_;
  absl::Duration wait = absl::Milliseconds(200);
  while (true) {
    absl::Status s = Each(fn);
    if (s.ok() || (!absl::IsUnavailable(s) && !absl::IsAborted(s)) ||
        absl::Now() + wait > deadline) {
      return s;
    }
    absl::SleepFor(wait);
    wait = std::min(wait * 2, absl::Seconds(2));
  }
}

absl::StatusOr<std::vector<v1::ServerInfo>> ReplicaGroup::GetServerInfo() {
  std::vector<v1::ServerInfo> infos(clients_.size());
  absl::Status s = Each([&](int r) -> absl::Status {
    auto info = clients_[r]->GetServerInfo();
    if (!info.ok()) return info.status();
    infos[r] = *std::move(info);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return infos;
}

absl::StatusOr<v1::ModelInfo> ReplicaGroup::GetModel(absl::string_view model_id) {
  std::vector<v1::ModelInfo> infos(clients_.size());
  absl::Status s = Each([&](int r) -> absl::Status {
    auto info = clients_[r]->GetModel(model_id);
    if (!info.ok()) return info.status();
    infos[r] = *std::move(info);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  for (int r = 1; r < size(); ++r) {
    if (infos[r].step() != infos[0].step()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the replicas of '", model_id, "' are at different steps: rank 0 at ",
                       infos[0].step(), ", rank ", r, " at ", infos[r].step()));
    }
  }
  return infos[0];
}

absl::StatusOr<v1::ModelInfo> ReplicaGroup::CreateModel(const v1::CreateModelRequest& request) {
  std::vector<v1::ModelInfo> infos(clients_.size());
  absl::Status s = GroupCall([&](int r) -> absl::Status {
    auto info = clients_[r]->CreateModel(request);
    if (!info.ok()) return info.status();
    infos[r] = *std::move(info);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return infos[0];
}

absl::Status ReplicaGroup::DeleteModel(const v1::DeleteModelRequest& request) {
  return GroupCall([&](int r) { return clients_[r]->DeleteModel(request); });
}

absl::StatusOr<v1::UpdateCorrelationResponse> ReplicaGroup::UpdateCorrelation(
    absl::string_view model_id, int64_t expected_step) {
  std::vector<v1::UpdateCorrelationResponse> out(clients_.size());
  absl::Status s = GroupCall([&](int r) -> absl::Status {
    auto resp = clients_[r]->UpdateCorrelation(model_id, expected_step);
    if (!resp.ok()) return resp.status();
    out[r] = *std::move(resp);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out[0];
}

absl::StatusOr<v1::Tensor> ReplicaGroup::Rows(const v1::Tensor& t, int64_t begin, int64_t end) {
  if (t.shape_size() < 1) {
    return absl::InvalidArgumentError("tensor: expected at least one dimension to split by rows");
  }
  const int64_t rows = t.shape(0);
  if (begin < 0 || end > rows || begin > end) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor: rows [", begin, ", ", end, ") of ", rows, " rows"));
  }
  const int64_t row_bytes = rows == 0 ? 0 : static_cast<int64_t>(t.data().size()) / rows;
  v1::Tensor out;
  out.set_dtype(t.dtype());
  out.add_shape(end - begin);
  for (int i = 1; i < t.shape_size(); ++i) out.add_shape(t.shape(i));
  out.set_data(t.data().substr(static_cast<size_t>(begin * row_bytes),
                               static_cast<size_t>((end - begin) * row_bytes)));
  return out;
}

absl::StatusOr<v1::TrainStepResponse> ReplicaGroup::TrainStep(
    const v1::TrainStepRequest& request) {
  const int n = size();
  const int64_t rows = request.input().shape_size() > 0 ? request.input().shape(0) : 0;
  if (rows < n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input: expected at least one row per rank (", n, " ranks), got ", rows, " rows"));
  }
  std::vector<v1::TrainStepRequest> parts(n, request);
  for (int r = 0; r < n; ++r) {
    const int64_t begin = rows * r / n, end = rows * (r + 1) / n;
    auto input = Rows(request.input(), begin, end);
    if (!input.ok()) return input.status();
    auto target = Rows(request.target(), begin, end);
    if (!target.ok()) return target.status();
    *parts[r].mutable_input() = *std::move(input);
    *parts[r].mutable_target() = *std::move(target);
  }
  std::vector<v1::TrainStepResponse> out(n);
  absl::Status s = GroupCall([&](int r) -> absl::Status {
    auto resp = clients_[r]->TrainStep(parts[r]);
    if (!resp.ok()) return resp.status();
    out[r] = *std::move(resp);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  v1::TrainStepResponse result = out[0];
  if (request.want_output() && out[0].has_output()) {
    v1::Tensor* output = result.mutable_output();
    int64_t total = 0;
    std::string data;
    for (const v1::TrainStepResponse& o : out) {
      total += o.output().shape_size() > 0 ? o.output().shape(0) : 0;
      data += o.output().data();
    }
    output->set_shape(0, total);
    output->set_data(std::move(data));
  }
  for (const v1::TrainStepResponse& o : out) result.set_replayed(result.replayed() && o.replayed());
  return result;
}

}  // namespace tscale::client
