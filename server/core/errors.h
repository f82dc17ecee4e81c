// Converting LibTorch's exceptions into statuses, and describing tensors in error messages.
#ifndef TSCALE_SERVER_CORE_ERRORS_H_
#define TSCALE_SERVER_CORE_ERRORS_H_

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tscale::core {

// ResourceExhausted for an allocation that failed (host or device memory), Internal otherwise;
// the message starts with `what` and keeps LibTorch's first line.
absl::Status TorchError(const c10::Error& e, absl::string_view what);

// The API's name of a dtype ("FP32", "INT64", ...); LibTorch's for a dtype the API lacks.
std::string DTypeName(at::ScalarType type);

// "FP32 [2, 64]": a tensor's dtype and shape, as error messages give them.
std::string DescribeTensor(const at::Tensor& t);

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_ERRORS_H_
