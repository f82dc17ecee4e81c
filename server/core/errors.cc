#include "server/core/errors.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tscale::core {

absl::Status TorchError(const c10::Error& e, absl::string_view what) {
  std::string msg = e.what_without_backtrace();
  if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
  const bool oom = absl::StrContains(msg, "out of memory") ||
                   absl::StrContains(msg, "can't allocate memory") ||
                   absl::StrContains(msg, "Out of memory");
  if (oom) return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory: ", msg));
  return absl::InternalError(absl::StrCat(what, ": ", msg));
}

std::string DTypeName(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "FP32";
    case at::kBFloat16:
      return "BF16";
    case at::kHalf:
      return "FP16";
    case at::kChar:
      return "INT8";
    case at::kByte:
      return "UINT8";
    case at::kInt:
      return "INT32";
    case at::kLong:
      return "INT64";
    default:
      break;
  }
  return std::string(c10::toString(type));
}

std::string DescribeTensor(const at::Tensor& t) {
  return absl::StrCat(DTypeName(t.scalar_type()), " [", absl::StrJoin(t.sizes(), ", "), "]");
}

}  // namespace tscale::core
