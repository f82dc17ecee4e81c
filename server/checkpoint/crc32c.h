// CRC-32C (Castagnoli), as used by the `crc32c` metadata of tscale checkpoints.
#ifndef TSCALE_SERVER_CHECKPOINT_CRC32C_H_
#define TSCALE_SERVER_CHECKPOINT_CRC32C_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace tscale::checkpoint {

// CRC-32C of data, continuing from crc (0 for a fresh computation): Crc32c(b, Crc32c(a)) equals
// Crc32c(a + b). Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(absl::string_view data, uint32_t crc = 0);

// 8 lower-case hex digits.
std::string Crc32cHex(uint32_t crc);

}  // namespace tscale::checkpoint

#endif  // TSCALE_SERVER_CHECKPOINT_CRC32C_H_
