// Save and restore throughput of checkpoints for one large model.
//
// Usage: checkpoint_bench DIR [--rows N] [--cols N] [--repeat N]
// Saves the model's checkpoint into DIR (a fresh model folder), restores it as the server does at
// start (read, verify the CRC, rebuild the model), and prints MB/s for each, the best of --repeat.
#include <chrono>
#include <cstdio>
#include <string>

#include "server/checkpoint/checkpointer.h"
#include "server/checkpoint/store.h"
#include "server/core/model.h"
#include "server/core/registry.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: checkpoint_bench DIR [--rows N] [--cols N] [--repeat N]\n");
    return 2;
  }
  const std::string dir = argv[1];
  int64_t rows = 10240, cols = 10240;
  int repeat = 3;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--rows") rows = std::stoll(argv[i + 1]);
    else if (flag == "--cols") cols = std::stoll(argv[i + 1]);
    else if (flag == "--repeat") repeat = std::stoi(argv[i + 1]);
  }
  using tscale::core::Model;
  tscale::core::ModelSpec spec;
  spec.layers.push_back({"fc", tscale::core::TernaryLinearSpec{cols, rows, 0, 0, false}});
  auto created = Model::Create(spec, 1, c10::Device(c10::kCPU));
  if (!created.ok()) {
    std::fprintf(stderr, "checkpoint_bench: %s\n", created.status().ToString().c_str());
    return 1;
  }
  auto store = tscale::checkpoint::CheckpointStore::Open(dir);
  if (!store.ok()) {
    std::fprintf(stderr, "checkpoint_bench: %s\n", store.status().ToString().c_str());
    return 1;
  }
  (void)(*store)->Remove("bench");  // what an earlier run left
  tscale::core::ModelRegistry registry;
  (void)registry.Add("bench", *std::move(created));
  tscale::checkpoint::CheckpointPolicy policy;
  policy.keep = 1;
  tscale::checkpoint::Checkpointer checkpointer(store->get(), &registry, policy, {}, nullptr);
  using Clock = std::chrono::steady_clock;
  double best_save = 1e9, best_restore = 1e9;
  int64_t bytes = 0;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = Clock::now();
    auto info = checkpointer.Save("bench");
    const auto t1 = Clock::now();
    if (!info.ok()) {
      std::fprintf(stderr, "checkpoint_bench: %s\n", info.status().ToString().c_str());
      return 1;
    }
    bytes = info->bytes;
    tscale::core::ModelRegistry fresh;
    tscale::checkpoint::Checkpointer loader(store->get(), &fresh, policy, {}, nullptr);
    loader.RestoreAll(c10::Device(c10::kCPU), {});
    const auto t2 = Clock::now();
    if (!fresh.Get("bench").ok()) {
      std::fprintf(stderr, "checkpoint_bench: the model was not restored\n");
      return 1;
    }
    best_save = std::min(best_save, std::chrono::duration<double>(t1 - t0).count());
    best_restore = std::min(best_restore, std::chrono::duration<double>(t2 - t1).count());
  }
  const double mb = bytes / 1e6;
  std::printf("model %lld x %lld = %lld weights; checkpoint %.1f MB\n",
              static_cast<long long>(rows), static_cast<long long>(cols),
              static_cast<long long>(rows * cols), mb);
  std::printf("save    %.3f s  %7.0f MB/s  (snapshot, encode, CRC, write, fsync, rename)\n",
              best_save, mb / best_save);
  std::printf("restore %.3f s  %7.0f MB/s  (read, CRC, decode, validate, build the model)\n",
              best_restore, mb / best_restore);
  (void)(*store)->Remove("bench");
  return 0;
}
