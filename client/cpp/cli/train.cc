// `tscale train`: TrainStep on synthetic data, with a progress bar on stderr.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cpp/at_tensor.h"
#include "client/cpp/cli/cli.h"

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
      std::cerr << "\r[" << std::string(filled, '#') << std::string(kBarWidth - filled, '.')
                << "] " << Line(done, step, loss, now) << "   " << (last ? "\n" : "")
                << std::flush;
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
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor teacher = at::randn({out, in}, gen) / std::sqrt(static_cast<double>(in));

  v1::TrainStepRequest request;
  request.set_model_id(id);
  request.set_loss(loss);
  const int64_t first_step = info->step();
  int64_t step = first_step;
  double first_loss = std::numeric_limits<double>::quiet_NaN(), last_loss = first_loss;
  v1::TrainStepResponse response;
  Progress progress(steps);
  for (int64_t i = 1; i <= steps; ++i) {
    const at::Tensor x = at::randn({batch, in}, gen);
    const at::Tensor logits = at::matmul(x, teacher.t());
    const at::Tensor target = loss == v1::TrainStepRequest::MSE ? logits : logits.argmax(1);
    absl::StatusOr<v1::Tensor> x_proto = client::ToProtoTensor(x);
    absl::StatusOr<v1::Tensor> target_proto = client::ToProtoTensor(target);
    if (!x_proto.ok()) return context.Fail(x_proto.status());
    if (!target_proto.ok()) return context.Fail(target_proto.status());
    *request.mutable_input() = *std::move(x_proto);
    *request.mutable_target() = *std::move(target_proto);
    request.set_expected_step(step);
    absl::StatusOr<v1::TrainStepResponse> result =
        group != nullptr ? group->TrainStep(request) : context.client().TrainStep(request);
    if (!result.ok()) {
      progress.Interrupt();
      return context.Fail(result.status());
    }
    response = *std::move(result);
    step = response.step();
    if (i == 1) first_loss = response.loss();
    last_loss = response.loss();
    progress.Update(i, step, last_loss);
  }

  const double seconds = progress.Seconds();
  std::cout << absl::StrFormat("trained %s: %d steps (step %d -> %d) in %.2f s, %.2f steps/s\n",
                               id, steps, first_step, step, seconds,
                               seconds > 0 ? steps / seconds : 0.0)
            << absl::StrFormat("loss (%s): first %.6g, last %.6g\n", loss_name, first_loss,
                               last_loss);
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
