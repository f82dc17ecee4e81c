// Devices a model can live on: "cpu" always, "cuda" / "cuda:N" when the build and machine have them.
#ifndef TSCALE_SERVER_CORE_DEVICE_H_
#define TSCALE_SERVER_CORE_DEVICE_H_

#include <string>

#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tscale::core {

// "cpu", "cuda" (= "cuda:0") or "cuda:N". InvalidArgument for anything else, or for a CUDA
// device this process cannot use (no CUDA in the build, or N beyond the devices present).
absl::StatusOr<c10::Device> ParseDevice(absl::string_view name);

// cuda:0 when a CUDA device is usable, else cpu.
c10::Device DefaultDevice();

// "cpu", "cuda:0", ...
std::string DeviceName(const c10::Device& device);

int CudaDeviceCount();

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_DEVICE_H_
