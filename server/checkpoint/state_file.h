// A model's persistent state as one safetensors file (docs/state-format.md): tensors under the reference's
// state_dict keys, metadata `format` (tscale/1), `spec` (JSON), `step` and `crc32c` of the data
// section. The form of checkpoints and of ExportState / ImportState.
#ifndef TSCALE_SERVER_CHECKPOINT_STATE_FILE_H_
#define TSCALE_SERVER_CHECKPOINT_STATE_FILE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "server/checkpoint/safetensors.h"
#include "server/core/model.h"
#include "server/core/spec.h"

namespace tscale::checkpoint {

inline constexpr char kStateFormat[] = "tscale/1";

// A CPU tensor holding a copy of the view's bytes.
at::Tensor TensorFromView(const TensorView& view);

// The file's bytes. `extra` metadata is added as given (it cannot replace the keys above).
std::string EncodeState(const core::StateSnapshot& state, const core::ModelSpec& spec,
                        const std::map<std::string, std::string>& extra = {});

struct DecodedState {
  core::StateDict tensors;
  std::optional<core::ModelSpec> spec;  // from the metadata, when there
  std::optional<int64_t> step;          // from the metadata, when there
  std::map<std::string, std::string> metadata;
};

// Parses a state file. Metadata is optional: a file exported by the reference (no metadata)
// decodes too. InvalidArgument for a malformed file, a `format` other than tscale/1, a `spec` or
// `step` that does not parse; DataLoss when `crc32c` is present and does not match the data.
absl::StatusOr<DecodedState> DecodeState(std::string bytes);

}  // namespace tscale::checkpoint

#endif  // TSCALE_SERVER_CHECKPOINT_STATE_FILE_H_
