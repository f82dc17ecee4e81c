// `tscale train`: TrainStep on synthetic data, with a progress bar on stderr.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cpp/cli/cli.h"
#include "client/cpp/tensor.h"

namespace tscale::cli {
namespace {

namespace v1 = ::tscale::v1;

constexpr int kBarWidth = 24;

class Progress {
 public:
  explicit Progress(int64_t total)
      : total_(total),
        tty_(isatty(STDERR_FILENO) == 1),
        every_(std::max<int64_t>(1, total / 10)),
        start_(std::chrono::steady_clock::now()) {}

  // After `done` of the total steps, the model at `step`, with the step's loss.
  void Update(int64_t done, int64_t step, double loss) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = done == total_;
    if (tty_) {
      // Redrawing costs little, but more than ~20 times a second is only flicker.
      if (!last && now - last_draw_ < std::chrono::milliseconds(50)) return;
      last_draw_ = now;
      const int filled = static_cast<int>(kBarWidth * done / total_);
      std::cerr << "\r[" << std::string(filled, '#') << std::string(kBarWidth - filled, '.') << "] "
                << Line(done, step, loss, now) << "   " << (last ? "\n" : "") << std::flush;
      drawn_ = !last;
    } else if (done % every_ == 0 || last) {
      std::cerr << "train: " << Line(done, step, loss, now) << "\n";
    }
  }

  // Ends a partly drawn bar so that an error message starts on its own line.
  void Interrupt() {
    if (drawn_) std::cerr << "\n";
    drawn_ = false;
  }

  double Seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::string Line(int64_t done, int64_t step, double loss,
                   std::chrono::steady_clock::time_point now) const {
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;
    return absl::StrFormat("%d/%d  step %d  loss %.6g  %.2f steps/s", done, total_, step, loss,
                           rate);
  }

  const int64_t total_;
  const bool tty_;
  const int64_t every_;
  const std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_{};
  bool drawn_ = false;
};

// Tells a loss that stopped moving: the mean of the last kWindow losses not at least 1% below
// the mean of the kWindow before.
class Plateau {
 public:
  static constexpr int kWindow = 50;

  // Adds a step's loss; true the first time the loss is seen to stall.
  bool Add(double loss) {
    losses_.push_back(loss);
    if (stalled_ || losses_.size() < 2 * kWindow) return false;
    const size_t n = losses_.size();
    double before = 0, last = 0;
    for (size_t i = n - 2 * kWindow; i < n - kWindow; ++i) before += losses_[i];
    for (size_t i = n - kWindow; i < n; ++i) last += losses_[i];
    before /= kWindow;
    last /= kWindow;
    if (last < before * 0.99) return false;
    before_ = before;
    last_ = last;
    stalled_ = true;
    return true;
  }
  bool stalled() const { return stalled_; }

  // One line: that the loss stalled, why it may, and what to try.
  std::string Advice() const {
    return absl::StrFormat(
        "train: the loss has stopped going down (mean %.6g over the last %d steps, %.6g over "
        "the %d before): only the per-group scales learn here, the ternary signs stay as "
        "initialised, and a deep model's outputs can be too small to learn from; try a "
        "shallower model, a smaller group_size, or a learning setup the rule can fit (README: "
        "\"What the learning rule can and cannot learn\")",
        last_, kWindow, before_, kWindow);
  }

 private:
  std::vector<double> losses_;
  bool stalled_ = false;
  double before_ = 0, last_ = 0;
};

}  // namespace

int RunTrain(Context& context, const Args& args) {
  int exit = kExitOk;
  int64_t steps = 0, batch = 0;
  if (!context.GetInt(args, "--steps", 100, 1, int64_t{1} << 40, &steps, &exit)) return exit;
  if (!context.GetInt(args, "--batch", 32, 1, int64_t{1} << 24, &batch, &exit)) return exit;
  uint64_t seed = 0;
  if (args.Has("--seed") && !absl::SimpleAtoi(args.Get("--seed"), &seed)) {
    return context.Usage(
        absl::StrCat("--seed: expected an unsigned integer, got '", args.Get("--seed"), "'"));
  }
  const std::string loss_name = args.Get("--loss", "mse");
  v1::TrainStepRequest::Loss loss;
  if (loss_name == "mse") {
    loss = v1::TrainStepRequest::MSE;
  } else if (loss_name == "ce" || loss_name == "cross_entropy") {
    loss = v1::TrainStepRequest::CROSS_ENTROPY;
  } else {
    return context.Usage(absl::StrCat("--loss: expected mse or ce, got '", loss_name, "'"));
  }

  const std::string& id = args.positional[0];
  // With --servers, a replica group: each step's batch is split across its ranks.
  client::ReplicaGroup* group = context.group();
  absl::StatusOr<v1::ModelInfo> info =
      group != nullptr ? group->GetModel(id) : context.client().GetModel(id);
  if (!info.ok()) return context.Fail(info.status());
  const int64_t in = info->in_features();
  const int64_t out = info->out_features();
  if (in <= 0 || out <= 0) {
    return context.Fail(absl::FailedPreconditionError(absl::StrCat(
        "model ", id, " has ", in, " input and ", out, " output features; cannot train it")));
  }

  // The teacher is drawn first, so that it depends on the seed alone.
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(in));
  std::vector<float> teacher(static_cast<size_t>(out * in));
  for (float& w : teacher) w = normal(gen) * scale;
  std::vector<float> x(static_cast<size_t>(batch * in)), logits(static_cast<size_t>(batch * out));
  std::vector<int64_t> classes(static_cast<size_t>(batch));
  Plateau plateau;

  const int64_t first_step = info->step();
  int64_t step = first_step;
  double first_loss = std::numeric_limits<double>::quiet_NaN(), last_loss = first_loss;
  v1::TrainStepResponse response;
  Progress progress(steps);
  // The next batch of the teacher's data, as a request (model id and expected_step aside).
  auto make_request = [&]() -> absl::StatusOr<v1::TrainStepRequest> {
    for (float& v : x) v = normal(gen);
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = &x[static_cast<size_t>(b * in)];
      for (int64_t o = 0; o < out; ++o) {
        const float* w = &teacher[static_cast<size_t>(o * in)];
        float sum = 0;
        for (int64_t k = 0; k < in; ++k) sum += row[k] * w[k];
        logits[static_cast<size_t>(b * out + o)] = sum;
      }
      const float* l = &logits[static_cast<size_t>(b * out)];
      classes[static_cast<size_t>(b)] = std::max_element(l, l + out) - l;
    }
    absl::StatusOr<v1::Tensor> x_proto = client::MakeTensor(absl::MakeConstSpan(x), {batch, in});
    absl::StatusOr<v1::Tensor> target_proto =
        loss == v1::TrainStepRequest::MSE
            ? client::MakeTensor(absl::MakeConstSpan(logits), {batch, out})
            : client::MakeTensor(absl::MakeConstSpan(classes), {batch});
    if (!x_proto.ok()) return x_proto.status();
    if (!target_proto.ok()) return target_proto.status();
    v1::TrainStepRequest request;
    request.set_model_id(id);
    request.set_loss(loss);
    *request.mutable_input() = *std::move(x_proto);
    *request.mutable_target() = *std::move(target_proto);
    return request;
  };
  int64_t answered = 0;
  auto on_answer = [&](const v1::TrainStepResponse& r) {
    response = r;
    step = r.step();
    ++answered;
    if (answered == 1) first_loss = r.loss();
    last_loss = r.loss();
    progress.Update(answered, step, last_loss);
    if (plateau.Add(last_loss)) {
      progress.Interrupt();
      std::cerr << plateau.Advice() << "\n";
    }
  };
  absl::Status failed;
  if (group != nullptr) {
    // A replica group: one TrainStep at a time, each split across the ranks.
    for (int64_t i = 1; i <= steps && failed.ok(); ++i) {
      absl::StatusOr<v1::TrainStepRequest> request = make_request();
      if (!request.ok()) return context.Fail(request.status());
      request->set_expected_step(step);
      absl::StatusOr<v1::TrainStepResponse> result = group->TrainStep(*request);
      if (result.ok()) {
        on_answer(*result);
      } else {
        failed = result.status();
      }
    }
  } else {
    // One server: the steps go over a TrainStream, sent without waiting for each answer.
    absl::Status made;
    int64_t produced = 0;
    failed = context.client().TrainStream(
        id, first_step,
        [&]() -> std::optional<v1::TrainStepRequest> {
          if (produced == steps || !made.ok()) return std::nullopt;
          absl::StatusOr<v1::TrainStepRequest> request = make_request();
          if (!request.ok()) {
            made = request.status();
            return std::nullopt;
          }
          ++produced;
          return *std::move(request);
        },
        on_answer);
    if (failed.ok() && !made.ok()) return context.Fail(made);
  }
  if (!failed.ok()) {
    progress.Interrupt();
    const int exit = context.Fail(failed);
    // Where to go on from: the step of the last answer, unless the failed step may have been
    // applied after all (the error then says so, and which step tells).
    std::cerr << absl::StrFormat(
        "train: stopped after %d of %d steps: the last step applied brought %s to step %d; the "
        "failed one (expected_step %d) was not applied unless the error says it may have "
        "been ('tscale info %s' shows the model's step)\n",
        answered, steps, id, step, step, id);
    return exit;
  }

  const double seconds = progress.Seconds();
  std::cout << absl::StrFormat("trained %s: %d steps (step %d -> %d) in %.2f s, %.2f steps/s\n", id,
                               steps, first_step, step, seconds,
                               seconds > 0 ? steps / seconds : 0.0)
            << absl::StrFormat("loss (%s): first %.6g, last %.6g\n", loss_name, first_loss,
                               last_loss);
  if (plateau.stalled()) std::cout << plateau.Advice() << "\n";
  if (response.layers_size() > 0) {
    std::cout << "mean |drift| per layer:\n";
    std::vector<std::vector<std::string>> rows;
    for (const v1::LayerUpdate& l : response.layers()) {
      rows.push_back({"  " + l.layer(), absl::StrFormat("%.6g", l.mean_abs_drift())});
    }
    PrintTable({"  LAYER", "MEAN_ABS_DRIFT"}, rows);
  }
  return kExitOk;
}

}  // namespace tscale::cli
