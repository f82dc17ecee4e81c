#include "server/core/device.h"

#include <charconv>

#include <ATen/Context.h>
#include <torch/cuda.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace tscale::core {

int CudaDeviceCount() {
  if (!at::globalContext().hasCUDA()) return 0;
  return static_cast<int>(torch::cuda::device_count());
}

absl::StatusOr<c10::Device> ParseDevice(absl::string_view name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  int index = -1;
  if (name == "cuda") {
    index = 0;
  } else if (absl::StartsWith(name, "cuda:")) {
    absl::string_view digits = name.substr(5);
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (ec != std::errc() || end != digits.data() + digits.size() || index < 0) index = -1;
    if (index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device: expected cpu, cuda or cuda:N, got '", name, "'"));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("device: expected cpu, cuda or cuda:N, got '", name, "'"));
  }
  const int count = CudaDeviceCount();
  if (index >= count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device: '", name, "' is not available; this server has ", count, " CUDA device",
        count == 1 ? "" : "s", at::globalContext().hasCUDA() ? "" : " (built without CUDA)"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

c10::Device DefaultDevice() {
  return CudaDeviceCount() > 0 ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
}

std::string DeviceName(const c10::Device& device) {
  if (device.is_cpu()) return "cpu";
  return absl::StrCat(c10::DeviceTypeName(device.type(), /*lower_case=*/true), ":",
                      device.has_index() ? device.index() : 0);
}

}  // namespace tscale::core
