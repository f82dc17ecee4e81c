// RPC latency of the training calls over loopback gRPC: Forward(train), Backward, UpdateCorrelation
// and TrainStep on one ternary linear layer; prints p50 / p99 / mean per call. GetServerInfo, which
// takes the same path through the service (a worker thread, the metrics) and touches no model, is
// the fixed cost of a call.
//
// Usage: rpc_latency [--server HOST:PORT] [--in N] [--out N] [--batch B] [--iters N] [--warmup N]
//                    [--device D]
// Without --server it starts a server in this process on 127.0.0.1 (any free port); requests still
// cross the loopback TCP stack and are serialised as for a remote client.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "server/service/server.h"
#include "tscale/v1/trainer.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = tscale::v1;

v1::Tensor Tensor(const std::vector<int64_t>& shape, unsigned seed) {
  v1::Tensor t;
  t.set_dtype(v1::FP32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::vector<float> v(n);
  std::srand(seed);
  for (float& x : v) x = static_cast<float>(std::rand()) / RAND_MAX * 2.0f - 1.0f;
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  return t;
}

struct Series {
  std::string name;
  std::vector<double> ms;
  void Print() const {
    std::vector<double> s = ms;
    std::sort(s.begin(), s.end());
    auto at = [&](double q) {
      return s[std::min(s.size() - 1, static_cast<size_t>(std::ceil(q * s.size())) - 1)];
    };
    double mean = 0;
    for (double x : s) mean += x;
    mean /= s.size();
    std::printf("%-18s %8zu %10.3f %10.3f %10.3f %10.3f\n", name.c_str(), s.size(), at(0.5),
                at(0.99), mean, s.back());
  }
};

void Check(const grpc::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "rpc_latency: %s: %d: %s\n", what, s.error_code(),
                 s.error_message().c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string address, device = "cpu";
  int64_t in = 1024, out = 1024, batch = 16;
  int iters = 200, warmup = 20;
  constexpr char kUsage[] =
      "usage: rpc_latency [--server HOST:PORT] [--in N] [--out N] [--batch B] [--iters N] "
      "[--warmup N] [--device D]\n"
      "RPC latency of Forward(train), Backward, UpdateCorrelation, TrainStep and GetServerInfo\n"
      "over loopback gRPC (p50 / p99 / mean in ms). Without --server it starts a server in this\n"
      "process on 127.0.0.1 (defaults: --in 1024 --out 1024 --batch 16 --iters 200 --warmup 20\n"
      "--device cpu).\n";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) {
      std::fprintf(stderr, "rpc_latency: %s: expected a value\n%s", argv[i], kUsage);
      return 2;
    }
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--server") address = value;
    else if (flag == "--device") device = value;
    else if (flag == "--in") in = std::stoll(value);
    else if (flag == "--out") out = std::stoll(value);
    else if (flag == "--batch") batch = std::stoll(value);
    else if (flag == "--iters") iters = std::stoi(value);
    else if (flag == "--warmup") warmup = std::stoi(value);
    else {
      std::fprintf(stderr, "rpc_latency: unknown flag %s\n%s", flag.c_str(), kUsage);
      return 2;
    }
  }
  std::unique_ptr<tscale::service::Server> server;
  if (address.empty()) {
    tscale::service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    auto started = tscale::service::Server::Start(options);
    if (!started.ok()) {
      std::fprintf(stderr, "rpc_latency: %s\n", started.status().ToString().c_str());
      return 1;
    }
    server = *std::move(started);
    address = server->address();
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto stub = v1::TernaryTrainer::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));

  const std::string id = "bench-" + std::to_string(in) + "x" + std::to_string(out);
  {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_model_id(id);
    req.set_device(device);
    auto* l = req.mutable_spec()->add_layers();
    l->set_name("fc");
    l->mutable_ternary_linear()->set_in_features(in);
    l->mutable_ternary_linear()->set_out_features(out);
    v1::ModelInfo info;
    Check(stub->CreateModel(&ctx, req, &info), "CreateModel");
    std::printf("model %s on %s: %lld weights, batch %lld, server %s\n", id.c_str(),
                info.device().c_str(), static_cast<long long>(info.ternary_params()),
                static_cast<long long>(batch), address.c_str());
  }
  const v1::Tensor x = Tensor({batch, in}, 1), g = Tensor({batch, out}, 2);
  v1::Tensor target = Tensor({batch, out}, 3);
  Series fwd{"Forward(train)", {}}, bwd{"Backward", {}}, upd{"UpdateCorrelation", {}},
      step{"TrainStep", {}}, inf{"Forward(infer)", {}}, info{"GetServerInfo", {}};
  int64_t model_step = 0;
  auto timed = [](Series* s, bool record, const std::function<void()>& fn) {
    const auto t0 = Clock::now();
    fn();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (record) s->ms.push_back(ms);
  };
  for (int i = 0; i < warmup + iters; ++i) {
    const bool record = i >= warmup;
    v1::ForwardResponse f;
    timed(&fwd, record, [&] {
      grpc::ClientContext ctx;
      v1::ForwardRequest req;
      req.set_model_id(id);
      *req.mutable_input() = x;
      req.set_train(true);
      Check(stub->Forward(&ctx, req, &f), "Forward");
    });
    timed(&bwd, record, [&] {
      grpc::ClientContext ctx;
      v1::BackwardRequest req;
      req.set_model_id(id);
      req.set_pass_id(f.pass_id());
      *req.mutable_grad_output() = g;
      req.set_want_grad_input(true);
      v1::BackwardResponse r;
      Check(stub->Backward(&ctx, req, &r), "Backward");
    });
    timed(&upd, record, [&] {
      grpc::ClientContext ctx;
      v1::UpdateCorrelationRequest req;
      req.set_model_id(id);
      req.set_expected_step(model_step);
      v1::UpdateCorrelationResponse r;
      Check(stub->UpdateCorrelation(&ctx, req, &r), "UpdateCorrelation");
      model_step = r.step();
    });
    timed(&step, record, [&] {
      grpc::ClientContext ctx;
      v1::TrainStepRequest req;
      req.set_model_id(id);
      *req.mutable_input() = x;
      *req.mutable_target() = target;
      req.set_loss(v1::TrainStepRequest::MSE);
      req.set_expected_step(model_step);
      v1::TrainStepResponse r;
      Check(stub->TrainStep(&ctx, req, &r), "TrainStep");
      model_step = r.step();
    });
    timed(&inf, record, [&] {
      grpc::ClientContext ctx;
      v1::ForwardRequest req;
      req.set_model_id(id);
      *req.mutable_input() = x;
      v1::ForwardResponse r;
      Check(stub->Forward(&ctx, req, &r), "Forward");
    });
    timed(&info, record, [&] {
      grpc::ClientContext ctx;
      v1::ServerInfo r;
      Check(stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &r), "GetServerInfo");
    });
  }
  std::printf("%-18s %8s %10s %10s %10s %10s\n", "call (ms)", "n", "p50", "p99", "mean", "max");
  for (const Series* s : {&fwd, &bwd, &upd, &step, &inf, &info}) s->Print();
  if (server) server->Shutdown(std::chrono::seconds(5));
  return 0;
}
