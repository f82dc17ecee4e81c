#include "server/core/trits.h"

#include <array>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

namespace tscale::core {
namespace {

// Digits of every valid byte, first trit first, already shifted to {-1, 0, 1}.
struct DecodeTable {
  std::array<std::array<int8_t, kTritsPerByte>, kMaxPackedByte + 1> trits;
  constexpr DecodeTable() : trits() {
    for (int b = 0; b <= kMaxPackedByte; ++b) {
      int v = b;
      for (int i = 0; i < kTritsPerByte; ++i) {
        trits[b][i] = static_cast<int8_t>(v % 3 - 1);
        v /= 3;
      }
    }
  }
};
constexpr DecodeTable kDecode;

constexpr uint8_t kPow3[kTritsPerByte] = {1, 3, 9, 27, 81};

}  // namespace

int64_t PackedBytes(int64_t n_trits) { return (n_trits + kTritsPerByte - 1) / kTritsPerByte; }

int64_t TritPad(int64_t n_trits) { return PackedBytes(n_trits) * kTritsPerByte - n_trits; }

absl::Status PackTrits(absl::Span<const int8_t> trits, absl::Span<uint8_t> packed) {
  const int64_t n = static_cast<int64_t>(trits.size());
  if (static_cast<int64_t>(packed.size()) != PackedBytes(n)) {
    return absl::InvalidArgumentError(absl::StrCat("packed: expected ", PackedBytes(n),
                                                   " bytes for ", n, " trits, got ",
                                                   packed.size()));
  }
  for (int64_t byte = 0; byte < static_cast<int64_t>(packed.size()); ++byte) {
    unsigned value = 0;
    for (int i = 0; i < kTritsPerByte; ++i) {
      const int64_t pos = byte * kTritsPerByte + i;
      if (pos >= n) break;  // padding digit 0
      const int8_t t = trits[pos];
      if (t < -1 || t > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("trits[", pos, "]: expected -1, 0 or 1, got ", static_cast<int>(t)));
      }
      value += kPow3[i] * static_cast<unsigned>(t + 1);
    }
    packed[byte] = static_cast<uint8_t>(value);
  }
  return absl::OkStatus();
}

absl::Status UnpackTrits(absl::Span<const uint8_t> packed, absl::Span<int8_t> trits,
                         absl::string_view what) {
  const int64_t n = static_cast<int64_t>(trits.size());
  const int64_t bytes = static_cast<int64_t>(packed.size());
  if (bytes != PackedBytes(n)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected ", PackedBytes(n),
                                                   " bytes for ", n, " trits, got ", bytes));
  }
  const int64_t full = n / kTritsPerByte;
  for (int64_t byte = 0; byte < full; ++byte) {
    const uint8_t b = packed[byte];
    if (b > kMaxPackedByte) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", byte, "]: expected a byte <= ",
                                                     kMaxPackedByte, ", got ", b));
    }
    const auto& d = kDecode.trits[b];
    int8_t* out = trits.data() + byte * kTritsPerByte;
    for (int i = 0; i < kTritsPerByte; ++i) out[i] = d[i];
  }
  if (full < bytes) {  // the last byte carries padding digits, which must be 0 (trit -1)
    const uint8_t b = packed[full];
    if (b > kMaxPackedByte) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", full, "]: expected a byte <= ",
                                                     kMaxPackedByte, ", got ", b));
    }
    const int used = static_cast<int>(n - full * kTritsPerByte);
    const auto& d = kDecode.trits[b];
    for (int i = used; i < kTritsPerByte; ++i) {
      if (d[i] != -1) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, "[", full, "]: padding digits must be 0, got byte ", b, " for ", used,
            " trailing trits"));
      }
    }
    for (int i = 0; i < used; ++i) trits[full * kTritsPerByte + i] = d[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> PackTernary(const at::Tensor& trits) {
  if (trits.scalar_type() != at::kChar) {
    return absl::InvalidArgumentError(
        absl::StrCat("trits: expected an int8 tensor, got ", trits.toString()));
  }
  at::Tensor t = trits.to(at::kCPU).contiguous();
  at::Tensor packed = at::empty({PackedBytes(t.numel())}, at::kByte);
  absl::Status s = PackTrits(absl::MakeConstSpan(t.data_ptr<int8_t>(), t.numel()),
                             absl::MakeSpan(packed.data_ptr<uint8_t>(), packed.numel()));
  if (!s.ok()) return s;
  return packed;
}

absl::StatusOr<at::Tensor> UnpackTernary(const at::Tensor& packed, int64_t n_trits,
                                         absl::string_view what) {
  if (packed.scalar_type() != at::kByte || packed.dim() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected a 1-D uint8 tensor, got ", packed.toString(), " of ",
                     packed.dim(), " dimensions"));
  }
  at::Tensor p = packed.to(at::kCPU).contiguous();
  at::Tensor trits = at::empty({n_trits}, at::kChar);
  absl::Status s = UnpackTrits(absl::MakeConstSpan(p.data_ptr<uint8_t>(), p.numel()),
                               absl::MakeSpan(trits.data_ptr<int8_t>(), n_trits), what);
  if (!s.ok()) return s;
  return trits;
}

}  // namespace tscale::core
