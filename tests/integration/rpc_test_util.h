// Requests and matchers shared by the tests that talk to a server through the generated stubs.
#ifndef TSCALE_TESTS_INTEGRATION_RPC_TEST_UTIL_H_
#define TSCALE_TESTS_INTEGRATION_RPC_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>

#include "tscale/v1/trainer.pb.h"

namespace tscale::testing {

// A float32 tensor of this shape with deterministic values of both signs:
// sin(start + step * i).
inline v1::Tensor Floats(const std::vector<int64_t>& shape, float start = 0.1f,
                         float step = 0.37f) {
  v1::Tensor t;
  t.set_dtype(v1::FP32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = std::sin(start + step * static_cast<float>(i));
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  return t;
}

// An int64 vector.
inline v1::Tensor Longs(const std::vector<int64_t>& v) {
  v1::Tensor t;
  t.set_dtype(v1::INT64);
  t.add_shape(static_cast<int64_t>(v.size()));
  t.set_data(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int64_t));
  return t;
}

// The values of a float32 tensor.
inline std::vector<float> Values(const v1::Tensor& t) {
  std::vector<float> v(t.data().size() / sizeof(float));
  std::memcpy(v.data(), t.data().data(), t.data().size());
  return v;
}

// in -> hidden (fc1) -> activation -> residual(hidden -> hidden (up)) -> RMSNorm(hidden) -> out
// (fc2): every kind of layer.
inline v1::ModelSpec MlpSpec(int64_t in = 12, int64_t hidden = 16, int64_t out = 5,
                             v1::Activation::Kind activation = v1::Activation::RELU,
                             int32_t fc1_group_size = 8, bool up_bias = true) {
  v1::ModelSpec spec;
  auto* fc1 = spec.add_layers();
  fc1->set_name("fc1");
  fc1->mutable_ternary_linear()->set_in_features(in);
  fc1->mutable_ternary_linear()->set_out_features(hidden);
  fc1->mutable_ternary_linear()->set_group_size(fc1_group_size);
  auto* act = spec.add_layers();
  act->set_name("act");
  act->mutable_activation()->set_kind(activation);
  auto* block = spec.add_layers();
  block->set_name("block");
  auto* up = block->mutable_residual()->add_layers();
  up->set_name("up");
  up->mutable_ternary_linear()->set_in_features(hidden);
  up->mutable_ternary_linear()->set_out_features(hidden);
  up->mutable_ternary_linear()->set_bias(up_bias);
  auto* norm = spec.add_layers();
  norm->set_name("norm");
  norm->mutable_ternary_rms_norm()->set_dim(hidden);
  auto* fc2 = spec.add_layers();
  fc2->set_name("fc2");
  fc2->mutable_ternary_linear()->set_in_features(hidden);
  fc2->mutable_ternary_linear()->set_out_features(out);
  return spec;
}

// One ternary linear layer "fc" (group size 0: the default).
inline v1::ModelSpec LinearSpec(int64_t in, int64_t out, int32_t group_size = 0) {
  v1::ModelSpec spec;
  auto* fc = spec.add_layers();
  fc->set_name("fc");
  fc->mutable_ternary_linear()->set_in_features(in);
  fc->mutable_ternary_linear()->set_out_features(out);
  fc->mutable_ternary_linear()->set_group_size(group_size);
  return spec;
}

// A plaintext channel to `address` without message-size limits on the client's side (the tests
// meet the server's own limits). With `own_connection`, it shares no connection with other
// channels, as a client in another process would not.
inline std::shared_ptr<grpc::Channel> UnlimitedChannel(const std::string& address,
                                                       bool own_connection = false) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  if (own_connection) args.SetInt("grpc.use_local_subchannel_pool", 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// Matches a grpc::Status with this code and a message matching `msg`.
MATCHER_P2(GrpcIs, code, msg, "") {
  if (arg.error_code() != code) {
    *result_listener << "status is " << arg.error_code() << ": " << arg.error_message();
    return false;
  }
  return ::testing::ExplainMatchResult(msg, arg.error_message(), result_listener);
}

}  // namespace tscale::testing

#endif  // TSCALE_TESTS_INTEGRATION_RPC_TEST_UTIL_H_
