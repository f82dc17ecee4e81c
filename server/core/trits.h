// The 5-trits-per-byte codec of the persistent ternary weights.
//
// Byte format (the reference's): trit t in {-1, 0, +1} is the base-3 digit t + 1; five digits make
// one byte, the first trit least significant (byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4, at most
// 242); the sequence is zero-padded (digit 0) to a multiple of 5, pad = (-n) mod 5.
#ifndef TSCALE_SERVER_CORE_TRITS_H_
#define TSCALE_SERVER_CORE_TRITS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace at {
class Tensor;
}

namespace tscale::core {

inline constexpr int kTritsPerByte = 5;
inline constexpr uint8_t kMaxPackedByte = 242;  // 3^5 - 1

// Bytes needed for n trits.
int64_t PackedBytes(int64_t n_trits);
// The reference's pad: (-n) mod 5.
int64_t TritPad(int64_t n_trits);

// Packs trits (values in {-1, 0, 1}) into packed.size() == PackedBytes(trits.size()) bytes.
// InvalidArgument naming the first position holding another value, or a size mismatch.
absl::Status PackTrits(absl::Span<const int8_t> trits, absl::Span<uint8_t> packed);

// Unpacks packed bytes into trits.size() trits. InvalidArgument when a byte is above 242, when the
// sizes disagree, or when a padding digit of the last byte is not 0 (a non-canonical encoding).
// `what` names the source in error messages (e.g. "fc.T_packed").
absl::Status UnpackTrits(absl::Span<const uint8_t> packed, absl::Span<int8_t> trits,
                         absl::string_view what = "packed trits");

// Tensor forms. PackTernary: an int8 tensor of trits, any shape and device -> CPU uint8
// [PackedBytes(numel)]. UnpackTernary: uint8 [PackedBytes(n_trits)] -> CPU int8 [n_trits].
absl::StatusOr<at::Tensor> PackTernary(const at::Tensor& trits);
absl::StatusOr<at::Tensor> UnpackTernary(const at::Tensor& packed, int64_t n_trits,
                                         absl::string_view what = "packed trits");

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_TRITS_H_
