// The cost of a /metrics scrape on a model of 100 million weights, and what scrapes running
// back to back do to training steps on the same model.
//
// Usage: scrape_bench [--rows N] [--cols N] [--device D] [--steps N]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

#include "server/core/device.h"
#include "server/core/model.h"
#include "server/core/registry.h"
#include "server/metrics/metrics.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 10240, cols = 10240;
  int steps = 20;
  std::string device_name = "cpu";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--rows") rows = std::stoll(argv[i + 1]);
    else if (flag == "--cols") cols = std::stoll(argv[i + 1]);
    else if (flag == "--steps") steps = std::stoi(argv[i + 1]);
    else if (flag == "--device") device_name = argv[i + 1];
  }
  auto device = tscale::core::ParseDevice(device_name);
  if (!device.ok()) {
    std::fprintf(stderr, "scrape_bench: %s\n", device.status().ToString().c_str());
    return 2;
  }
  tscale::core::ModelSpec spec;
  spec.layers.push_back({"fc", tscale::core::TernaryLinearSpec{cols, rows, 0, 0, false}});
  auto created = tscale::core::Model::Create(spec, 1, *device);
  if (!created.ok()) {
    std::fprintf(stderr, "scrape_bench: %s\n", created.status().ToString().c_str());
    return 1;
  }
  std::shared_ptr<tscale::core::Model> model = *std::move(created);
  tscale::core::ModelRegistry registry;
  (void)registry.Add("big", model);
  tscale::metrics::Metrics metrics(&registry, {}, "bench");

  const at::Tensor x = at::randn({16, cols});
  const at::Tensor target = at::randn({16, rows});
  // One training step, timed.
  auto step = [&]() {
    const auto t0 = Clock::now();
    auto r = model->TrainStep(x, target, tscale::core::Loss::kMse, model->step());
    if (!r.ok()) std::abort();
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  };
  for (int i = 0; i < 3; ++i) step();  // warm-up; gives the drift something to show

  std::vector<double> scrape_ms;
  size_t bytes = 0;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = Clock::now();
    bytes = metrics.Scrape().size();
    scrape_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }

  std::vector<double> alone, with_scrapes;
  for (int i = 0; i < steps; ++i) alone.push_back(step());
  std::atomic<bool> stop{false};
  std::atomic<int> scrapes{0};
  std::thread scraper([&] {
    while (!stop) {
      metrics.Scrape();
      ++scrapes;
    }
  });
  for (int i = 0; i < steps; ++i) with_scrapes.push_back(step());
  stop = true;
  scraper.join();

  std::printf("model %lld x %lld = %lld weights, %lld groups, on %s\n",
              static_cast<long long>(rows), static_cast<long long>(cols),
              static_cast<long long>(rows * cols),
              static_cast<long long>(model->summary().groups), device_name.c_str());
  std::printf("scrape: median %.1f ms (min %.1f), %zu bytes of text\n", Median(scrape_ms),
              *std::min_element(scrape_ms.begin(), scrape_ms.end()), bytes);
  std::printf("TrainStep (batch 16): median %.1f ms alone, %.1f ms while %d scrapes ran back to "
              "back\n",
              Median(alone), Median(with_scrapes), scrapes.load());
  return 0;
}
