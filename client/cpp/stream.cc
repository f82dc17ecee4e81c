// Client::TrainStream: TrainSteps over one TrainStream, sent by a writer thread while this thread
// reads the answers; resumed from the model's step when the stream breaks.
#include <grpcpp/grpcpp.h>

#include <cmath>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"

namespace tscale::client {
namespace {

absl::Status WithStep(const absl::Status& status, absl::string_view what) {
  return absl::Status(status.code(), absl::StrCat(status.message(), " (", what, ")"));
}

}  // namespace

absl::Status Client::TrainStream(absl::string_view model_id, int64_t first_step,
                                 const std::function<std::optional<v1::TrainStepRequest>()>& next,
                                 const std::function<void(const v1::TrainStepResponse&)>& on_answer,
                                 const CallOptions& call) {
  int64_t step = first_step;
  if (step < 0) {
    auto info = GetModel(model_id, call);
    if (!info.ok()) return info.status();
    step = info->step();
  }
  const RetryPolicy& retry = options_.retry;
  absl::Mutex mu;
  std::deque<v1::TrainStepRequest> resend;      // to send first on the next stream, in order
  std::deque<v1::TrainStepRequest> unanswered;  // sent on this stream, not yet answered
  bool source_done = false;                     // `next` said there are no more steps
  std::optional<absl::Time> first_failure;
  absl::Duration backoff = retry.initial_backoff;
  for (;;) {
    grpc::ClientContext context;
    if (call.deadline.has_value()) context.set_deadline(absl::ToChronoTime(*call.deadline));
    if (!options_.auth_token.empty()) {
      context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.auth_token));
    }
    if (options_.gzip) {
      context.set_compression_algorithm(GRPC_COMPRESS_GZIP);
      context.AddMetadata("tscale-compression", "gzip");
    }
    auto stream = stub_->TrainStream(&context);
    std::thread writer([&] {
      for (;;) {
        std::optional<v1::TrainStepRequest> req;
        {
          absl::MutexLock lock(&mu);
          if (!resend.empty()) {
            req = std::move(resend.front());
            resend.pop_front();
          }
        }
        if (!req.has_value()) {
          if (source_done) break;
          req = next();
          if (!req.has_value()) {
            source_done = true;
            break;
          }
          req->set_model_id(std::string(model_id));
          req->set_expected_step(step++);
        }
        {
          absl::MutexLock lock(&mu);
          unanswered.push_back(*req);
        }
        if (!stream->Write(*req)) break;  // the stream ended: its status tells why
      }
      stream->WritesDone();
    });
    v1::TrainStepResponse response;
    while (stream->Read(&response)) {
      {
        absl::MutexLock lock(&mu);
        if (!unanswered.empty()) unanswered.pop_front();
      }
      first_failure.reset();
      answered_ = true;
      on_answer(response);
    }
    writer.join();
    const grpc::Status status = stream->Finish();
    std::vector<v1::TrainStepRequest> items;
    {
      absl::MutexLock lock(&mu);
      for (auto& r : unanswered) items.push_back(std::move(r));
      for (auto& r : resend) items.push_back(std::move(r));
      unanswered.clear();
      resend.clear();
    }
    if (status.ok()) {
      if (items.empty() && source_done) return absl::OkStatus();
      return absl::InternalError(
          absl::StrCat("TrainStream ended with ", items.size(), " steps unanswered"));
    }
    const absl::Status result = FromGrpcStatus(status);
    const grpc::StatusCode code = status.error_code();
    const bool transient = code == grpc::StatusCode::UNAVAILABLE ||
                           code == grpc::StatusCode::CANCELLED ||
                           code == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!transient) {
      if (items.empty()) return result;
      return WithStep(
          result, absl::StrCat("the step sent with expected_step ", items.front().expected_step(),
                               "; the ", items.size() - 1, " sent after it were not applied"));
    }
    const absl::Time now = absl::Now();
    if (!first_failure.has_value()) first_failure = now;
    const absl::Duration left = retry.retry_time - (now - *first_failure);
    const bool deadline_passed = call.deadline.has_value() && now >= *call.deadline;
    if (left <= absl::ZeroDuration() || deadline_passed) {
      if (items.empty()) return result;
      return WithStep(result,
                      absl::StrCat("the steps from expected_step ", items.front().expected_step(),
                                   " may have been applied: read the model's step"));
    }
    if (options_.on_retry) options_.on_retry(0, result, std::min(backoff, left));
    absl::SleepFor(std::min(backoff, left));
    backoff = std::min(backoff * retry.multiplier, retry.max_backoff);
    // Resume from the model's step: what the server applied is not sent again.
    auto info = GetModel(model_id, call);
    std::deque<v1::TrainStepRequest> keep;
    for (auto& r : items) {
      if (info.ok() && r.expected_step() < info->step() - 1) {
        // Applied before the break, its answer lost: the server keeps only the last update's
        // answer for a replay.
        v1::TrainStepResponse lost;
        lost.set_step(r.expected_step() + 1);
        lost.set_replayed(true);
        lost.set_loss(std::numeric_limits<double>::quiet_NaN());
        on_answer(lost);
      } else {
        keep.push_back(std::move(r));
      }
    }
    if (!info.ok() && !absl::IsUnavailable(info.status()) &&
        !absl::IsDeadlineExceeded(info.status())) {
      return info.status();
    }
    absl::MutexLock lock(&mu);
    resend = std::move(keep);
  }
}

}  // namespace tscale::client
