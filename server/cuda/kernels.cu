// The ternary layers' CUDA kernels: w_eff from packed trits, and per-group scores of a gradient.
//
// Arithmetic notes. log2 S is computed in the order and with the operations LibTorch's CUDA kernels
// use for the reference's expression `E.float() + corr_accum.float() / denom * 4.0`: int64 to float
// conversion, multiplication by the float reciprocal of the scalar denominator (LibTorch's division
// by a CPU scalar), multiplication by 4 and addition in separate roundings (__fmul_rn and __fadd_rn
// forbid contraction into a fused multiply-add), then exp2f. This file must not be built with
// --use_fast_math.
#include <cuda_bf16.h>

#include <type_traits>

#include "server/cuda/launch.h"

namespace tscale::cuda::detail {
namespace {

constexpr int kThreads = 256;
// Columns one block of the scores kernel covers: a multiple of every group size up to it, so that
// groups of such sizes never straddle two blocks.
constexpr int kScoreCols = 1024;
// Columns a thread handles at once: their loads are issued together, to hide memory latency.
constexpr int kBatch = 4;

// The five base-3 digits of each packed byte 0..242, two bits each (digit j at bits 2j, 2j+1). Each
// block copies it to shared memory, so that decoding a trit is a table read and a shift.
__constant__ unsigned short kDigits[243] = {
    0,   1,   2,   4,   5,   6,   8,   9,   10,  16,  17,  18,  20,  21,  22,  24,  25,  26,  32,
    33,  34,  36,  37,  38,  40,  41,  42,  64,  65,  66,  68,  69,  70,  72,  73,  74,  80,  81,
    82,  84,  85,  86,  88,  89,  90,  96,  97,  98,  100, 101, 102, 104, 105, 106, 128, 129, 130,
    132, 133, 134, 136, 137, 138, 144, 145, 146, 148, 149, 150, 152, 153, 154, 160, 161, 162, 164,
    165, 166, 168, 169, 170, 256, 257, 258, 260, 261, 262, 264, 265, 266, 272, 273, 274, 276, 277,
    278, 280, 281, 282, 288, 289, 290, 292, 293, 294, 296, 297, 298, 320, 321, 322, 324, 325, 326,
    328, 329, 330, 336, 337, 338, 340, 341, 342, 344, 345, 346, 352, 353, 354, 356, 357, 358, 360,
    361, 362, 384, 385, 386, 388, 389, 390, 392, 393, 394, 400, 401, 402, 404, 405, 406, 408, 409,
    410, 416, 417, 418, 420, 421, 422, 424, 425, 426, 512, 513, 514, 516, 517, 518, 520, 521, 522,
    528, 529, 530, 532, 533, 534, 536, 537, 538, 544, 545, 546, 548, 549, 550, 552, 553, 554, 576,
    577, 578, 580, 581, 582, 584, 585, 586, 592, 593, 594, 596, 597, 598, 600, 601, 602, 608, 609,
    610, 612, 613, 614, 616, 617, 618, 640, 641, 642, 644, 645, 646, 648, 649, 650, 656, 657, 658,
    660, 661, 662, 664, 665, 666, 672, 673, 674, 676, 677, 678, 680, 681, 682,
};

__device__ __forceinline__ void BuildDigitTable(unsigned short* table) {
  for (unsigned b = threadIdx.x; b < 243; b += blockDim.x) table[b] = kDigits[b];
}

// A thread's walk along one row: column c, its group g (and c - g gs), and its trit's packed byte
// and digit. Advancing by a fixed stride costs additions only; the divisions happen once, at the
// start of the row. Index is uint32_t when the layer has fewer than 2^31 weights, else uint64_t.
template <typename Index>
struct RowWalk {
  unsigned c, g, rem;
  Index byte;
  unsigned digit;
  // The stride, split once into groups and packed bytes.
  unsigned stride, stride_g, stride_rem;
  Index stride_byte;
  unsigned stride_digit;

  __device__ RowWalk(int64_t row, unsigned cols, unsigned start, unsigned step, unsigned gs)
      : c(start), stride(step) {
    g = c / gs;
    rem = c - g * gs;
    const Index n = static_cast<Index>(row) * static_cast<Index>(cols) + c;
    byte = n / 5;
    digit = static_cast<unsigned>(n - byte * 5);
    stride_g = step / gs;
    stride_rem = step - stride_g * gs;
    stride_byte = step / 5;
    stride_digit = step - static_cast<unsigned>(stride_byte) * 5;
  }
  __device__ __forceinline__ int Trit(const unsigned short* table, const uint8_t* packed) const {
    return static_cast<int>((table[packed[byte]] >> (2 * digit)) & 3u) - 1;
  }
  __device__ __forceinline__ void Next(unsigned gs) {
    c += stride;
    g += stride_g;
    rem += stride_rem;
    if (rem >= gs) {
      rem -= gs;
      ++g;
    }
    byte += stride_byte;
    digit += stride_digit;
    if (digit >= 5) {
      digit -= 5;
      ++byte;
    }
  }
};

// S of group g, in the reference's operations (see the file comment).
__device__ __forceinline__ float ScaleOf(const TernaryArgs& t, int64_t g) {
  float log2s = static_cast<float>(t.e[g]);
  if (t.scaled) {
    const float inv = t.inv_denom_at != nullptr ? *t.inv_denom_at : t.inv_denom;
    const float mean = __fmul_rn(static_cast<float>(t.corr_accum[g]), inv);
    log2s = __fadd_rn(log2s, __fmul_rn(mean, 4.0f));
  }
  return exp2f(log2s);
}

__global__ void ScaleKernel(TernaryArgs t, int64_t groups, float* scale) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    scale[g] = ScaleOf(t, g);
  }
}

// A float rounded to a TF32 operand: 10 mantissa bits, to nearest, ties away from zero.
__device__ __forceinline__ float RoundTf32(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
#else
  return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xffffe000u);
#endif
}

__device__ __forceinline__ float RoundOperand(float v, Rounding r) {
  if (r == Rounding::kNone) return v;
  return r == Rounding::kBFloat16 ? __bfloat162float(__float2bfloat16_rn(v)) : RoundTf32(v);
}

// What a GEMM of the compute type writes: bfloat16 results (read back as float32), or float32.
__device__ __forceinline__ float RoundResult(float v, Rounding r) {
  return r == Rounding::kBFloat16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

__global__ void RoundedScaleKernel(TernaryArgs t, int64_t groups, Rounding rounding,
                                   float* scale) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    scale[g] = RoundOperand(ScaleOf(t, g), rounding);
  }
}

__device__ __forceinline__ void Store(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* out, int64_t i, float v) {
  out[i] = __float2bfloat16_rn(v);
}

// The base-3 digit `digit` (0..4) of a packed byte (0..242), minus 1, without branches (a loop
// whose length depends on the digit would diverge within a warp): byte / 3^digit as a
// multiplication by ceil(2^16 / 3^digit) and a shift, exact for bytes below 256; then mod 3 the
// same way.
__device__ __forceinline__ int TritOf(unsigned byte, unsigned digit) {
  const unsigned m = digit == 0   ? 65536u
                     : digit == 1 ? 21846u
                     : digit == 2 ? 7282u
                     : digit == 3 ? 2428u
                                  : 810u;
  const unsigned q = (byte * m) >> 16;
  return static_cast<int>(q - 3u * ((q * 21846u) >> 16)) - 1;
}

// Warps own spans of kSpan consecutive columns of one row; lane l takes columns l, l + 32, ...
// of its span, so that every load and store of a warp is contiguous. Warps need no shared memory
// and never wait for one another.
constexpr int kPerLane = 8;
constexpr int kSpan = 32 * kPerLane;

template <typename T, typename Index>
__global__ void EffectiveWeightKernel(TernaryArgs t, const float* scale, T* out) {
  const unsigned cols = static_cast<unsigned>(t.cols), gs = static_cast<unsigned>(t.group_size);
  const int64_t gpr = (t.cols + t.group_size - 1) / t.group_size;
  const unsigned spans_per_row = static_cast<unsigned>((t.cols + kSpan - 1) / kSpan);
  const unsigned lane = threadIdx.x % 32;
  // Spans along x (one per warp), rows along y; no division maps a warp to its place.
  const unsigned span = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (span >= spans_per_row) return;
  const unsigned c0 = span * kSpan;
  for (int64_t r = blockIdx.y; r < t.rows; r += gridDim.y) {
    const float* row_scale = scale + r * gpr;
    T* row_out = out + r * t.cols;
    RowWalk<Index> w(r, cols, c0 + lane, 32, gs);
    float s[kPerLane];
    unsigned code[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (w.c < cols) {
        s[k] = row_scale[w.g];
        code[k] = static_cast<unsigned>(t.packed[w.byte]) | (w.digit << 8);
      }
      w.Next(gs);
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const unsigned c = c0 + lane + 32 * k;
      if (c >= cols) break;
      // S * T.float(), as the reference multiplies: exact for T in {-1, 0, 1}.
      Store(row_out, c, __fmul_rn(s[k], static_cast<float>(TritOf(code[k] & 255u, code[k] >> 8))));
    }
  }
}

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Scores when groups are whole multiples of 32 columns: warps own spans of kSpan columns as in
// EffectiveWeightKernel; each 32-column step of a span lies in one group, so a warp sum gives its
// part, and a running sum per group is written when the group ends. Groups inside the span are
// stored; groups that cross a span's edge (gs not dividing kSpan) are added into zeroed scores.
template <typename T, typename Index>
__global__ void WarpScoresKernel(TernaryArgs t, const T* grad, int64_t stride_row,
                                 int64_t stride_col, unsigned long long* scores) {
  const unsigned cols = static_cast<unsigned>(t.cols), gs = static_cast<unsigned>(t.group_size);
  const int64_t gpr = (t.cols + t.group_size - 1) / t.group_size;
  const unsigned spans_per_row = static_cast<unsigned>((t.cols + kSpan - 1) / kSpan);
  const bool straddle = kSpan % gs != 0;
  const unsigned lane = threadIdx.x % 32;
  // Spans along x (one per warp), rows along y; no division maps a warp to its place.
  const unsigned span = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (span >= spans_per_row) return;
  const unsigned c0 = span * kSpan;
  for (int64_t r = blockIdx.y; r < t.rows; r += gridDim.y) {
    const T* row_grad = grad + r * stride_row;
    RowWalk<Index> w(r, cols, c0 + lane, 32, gs);
    float v[kPerLane];
    unsigned code[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      v[k] = 0.0f;
      code[k] = 1u;  // digit 0 of byte 1: trit 0
      if (w.c < cols) {
        v[k] = Load(row_grad, static_cast<int64_t>(w.c) * stride_col);
        code[k] = static_cast<unsigned>(t.packed[w.byte]) | (w.digit << 8);
      }
      w.Next(gs);
    }
    // The group of each 32-column step, advanced by additions: gs >= 32, so at most one more.
    unsigned g = c0 / gs, rem = c0 - g * gs, step_g = g;
    int acc = 0;
    auto flush = [&](unsigned group, int sum) {
      unsigned long long* out = &scores[r * gpr + group];
      const bool inside = !straddle || (static_cast<uint64_t>(group) * gs >= c0 &&
                                        min((static_cast<uint64_t>(group) + 1) * gs,
                                            static_cast<uint64_t>(cols)) <= c0 + kSpan);
      if (inside) {
        *out = static_cast<unsigned long long>(static_cast<int64_t>(sum));
      } else if (sum != 0) {
        atomicAdd(out, static_cast<unsigned long long>(static_cast<int64_t>(sum)));
      }
    };
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const unsigned c = c0 + 32 * k;  // the step's first column: warp-uniform
      if (c >= cols) break;
      const int product = ((v[k] > 0.0f) - (v[k] < 0.0f)) * TritOf(code[k] & 255u, code[k] >> 8);
      const int sum = __reduce_add_sync(0xffffffffu, product);
      if (step_g != g) {
        if (lane == 0) flush(g, acc);
        g = step_g;
        acc = 0;
      }
      acc += sum;
      rem += 32;
      if (rem >= gs) {
        rem -= gs;
        ++step_g;
      }
    }
    if (lane == 0) flush(g, acc);
  }
}

// Scores for group sizes that are not multiples of 32. A block covers kScoreCols columns of one
// row: each thread takes the sign-times-trit products of its columns and sums them per group in
// shared memory; the block then writes its groups' sums (adds them, for groups straddling blocks).
// Integer sums: the result does not depend on order.
template <typename T, typename Index>
__global__ void ScoresKernel(TernaryArgs t, const T* grad, int64_t stride_row, int64_t stride_col,
                             unsigned long long* scores) {
  __shared__ unsigned short table[243];
  __shared__ int sums[kScoreCols + 1];
  BuildDigitTable(table);
  const unsigned cols = static_cast<unsigned>(t.cols), gs = static_cast<unsigned>(t.group_size);
  const int64_t gpr = (t.cols + t.group_size - 1) / t.group_size;
  const unsigned c0 = blockIdx.x * kScoreCols;
  const unsigned c1 = min(c0 + kScoreCols, cols);
  const unsigned g0 = c0 / gs;
  const unsigned ng = (c1 - 1) / gs - g0 + 1;  // at most kScoreCols + 1
  // Groups never straddle two blocks when gs divides the block's columns: each block then owns its
  // groups' scores and stores them; otherwise blocks add into zeroed scores.
  const bool whole_groups = kScoreCols % gs == 0;
  for (int64_t r = blockIdx.y; r < t.rows; r += gridDim.y) {
    for (unsigned i = threadIdx.x; i < ng; i += blockDim.x) sums[i] = 0;
    __syncthreads();
    const T* row_grad = grad + r * stride_row;
    if (c0 + threadIdx.x < c1) {
      RowWalk<Index> w(r, cols, c0 + threadIdx.x, blockDim.x, gs);
      while (w.c < c1) {
        // kBatch columns at a time: all their loads first, independent of each other.
        bool valid[kBatch];
        float v[kBatch];
        unsigned code[kBatch], keys[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          valid[k] = w.c < c1;
          if (valid[k]) {
            v[k] = Load(row_grad, static_cast<int64_t>(w.c) * stride_col);
            code[k] = static_cast<unsigned>(t.packed[w.byte]) | (w.digit << 8);
            keys[k] = w.g - g0;
          }
          w.Next(gs);
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          if (!valid[k]) break;
          const int trit =
              static_cast<int>((table[code[k] & 255u] >> (2 * (code[k] >> 8))) & 3u) - 1;
          const int product = ((v[k] > 0.0f) - (v[k] < 0.0f)) * trit;
          const unsigned key = keys[k];
          // Lanes of one group add among themselves first: one shared atomic per group and warp.
          const unsigned same = __match_any_sync(__activemask(), key);
          const int sum = __reduce_add_sync(same, product);
          if (sum != 0 && (threadIdx.x % 32) == static_cast<unsigned>(__ffs(same) - 1)) {
            atomicAdd(&sums[key], sum);
          }
        }
      }
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < ng; i += blockDim.x) {
      const int64_t sum = sums[i];
      unsigned long long* out = &scores[r * gpr + g0 + i];
      if (whole_groups) {
        *out = static_cast<unsigned long long>(sum);
      } else if (sum != 0) {
        atomicAdd(out, static_cast<unsigned long long>(sum));
      }
    }
    __syncthreads();
  }
}

bool Small(const TernaryArgs& t) { return t.rows * t.cols < (int64_t{1} << 31); }

int64_t Blocks(int64_t work, int64_t per_block, int64_t cap) {
  const int64_t b = (work + per_block - 1) / per_block;
  return b < 1 ? 1 : (b > cap ? cap : b);
}

// The warp kernels' grid: kThreads / 32 spans per block along x, rows along y (striding).
dim3 SpanGrid(const TernaryArgs& t) {
  const int64_t spans = (t.cols + kSpan - 1) / kSpan;
  return dim3(static_cast<unsigned>(Blocks(spans, kThreads / 32, int64_t{1} << 30)),
              static_cast<unsigned>(t.rows < 65535 ? t.rows : 65535));
}



// ---------------------------------------------------------------- Packed trits, small batches
//
// For batches up to kMaxPackedBatch the step's three products read the packed trits and the
// rounded scales directly: the weight w = S T is made in registers, never stored. These products
// are thin (a batch of at most 16 against a [rows, cols] weight), so their time is the pass over
// the trits (0.2 bytes per weight); each thread keeps the whole batch in registers and uses every
// decoded trit for all of it. Sums run in a fixed order: results are the same from run to run.
// Group sizes are multiples of 32, so that the up to 16 columns a lane decodes at once (TritsAt)
// lie in one group.

// A lane's place in the packed trits (byte and digit), advanced by a fixed stride with additions.
struct TritCursor {
  uint64_t byte;
  unsigned digit;
  __device__ __forceinline__ void Start(uint64_t n) {
    byte = n / 5;
    digit = static_cast<unsigned>(n - byte * 5);
  }
  __device__ __forceinline__ void Advance(uint64_t stride_byte, unsigned stride_digit) {
    byte += stride_byte;
    digit += stride_digit;
    if (digit >= 5) {
      digit -= 5;
      ++byte;
    }
  }
};

// `count` (1 to 16) trits of one row from `at` on, two bits each from bit 0 (digit + 1): the
// packed bytes that hold them (at most four), each decoded by one read of `table` (kDigits).
__device__ __forceinline__ unsigned long long TritsAt(const unsigned* table, const uint8_t* packed,
                                                      int count, const TritCursor& at) {
  const unsigned d = at.digit;
  const unsigned last = (d + count - 1) / 5;  // the last byte these trits need: 0 to 3
  const uint8_t* bytes = packed + at.byte;
  unsigned long long v = table[bytes[0]];
  if (last >= 1) v |= static_cast<unsigned long long>(table[bytes[1]]) << 10;
  if (last >= 2) v |= static_cast<unsigned long long>(table[bytes[2]]) << 20;
  if (last >= 3) v |= static_cast<unsigned long long>(table[bytes[3]]) << 30;
  return v >> (2 * d);
}

// TritsAt, then `at` moved 16 trits on (3 bytes and 1 digit).
__device__ __forceinline__ unsigned long long SixteenTrits(const unsigned* table,
                                                           const uint8_t* packed, int count,
                                                           TritCursor& at) {
  const unsigned long long v = TritsAt(table, packed, count, at);
  at.Advance(3, 1);
  return v;
}

// Column c of a [batch, n] operand, rounded, into v (zeros past the batch, or where !in).
template <int kB>
__device__ __forceinline__ void LoadColumn(const PackedArgs& p, const float* m, int64_t n,
                                           int64_t c, bool in, float (&v)[kB]) {
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    v[b] = in && b < p.batch ? RoundOperand(m[b * n + c], p.rounding) : 0.0f;
  }
}

// y [batch, rows] = x [batch, cols] @ w^T. Lane l of a block owns row 32 blockIdx.x + l, and warp
// w the columns of slice 8 blockIdx.y + w (`per_slice` columns, whole groups): the lane walks
// them 16 at a time (SixteenTrits), x's column being the same for all lanes, and keeps kB sums.
// The block adds its warps' sums in warp order; where the columns take several blocks
// (gridDim.y > 1), each writes its sums to `partial` and PackedReduceKernel adds them in order.
template <int kB>
__global__ void __launch_bounds__(kThreads, 2) PackedLinearKernel(PackedArgs p, int64_t per_slice,
                                                                  const float* x, float* y,
                                                                  float* partial) {
  constexpr int kWarps = kThreads / 32;
  __shared__ unsigned table[243];
  __shared__ float sums[kWarps][kB][32];
  for (unsigned b = threadIdx.x; b < 243; b += blockDim.x) table[b] = kDigits[b];
  __syncthreads();
  const unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int64_t cols = p.cols, rows = p.rows, gs = p.group_size;
  const int64_t gpr = (cols + gs - 1) / gs;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool row_in = r < rows;
  const int64_t slice = static_cast<int64_t>(blockIdx.y) * kWarps + w;
  const int64_t begin = min(slice * per_slice, cols), end = min(begin + per_slice, cols);
  float acc[kB];
#pragma unroll
  for (int b = 0; b < kB; ++b) acc[b] = 0.0f;
  // A row past the end walks row 0's trits: its sums are not written.
  const int64_t rr = row_in ? r : 0;
  TritCursor at;
  at.Start(static_cast<uint64_t>(rr) * cols + begin);
  for (int64_t g0 = begin; g0 < end; g0 += gs) {
    const int64_t gend = min(g0 + gs, end);
    const float s = p.scale[rr * gpr + g0 / gs];
    for (int64_t c = g0; c < gend; c += 16) {
      const int count = gend - c < 16 ? static_cast<int>(gend - c) : 16;
      const unsigned long long code = SixteenTrits(table, p.packed, count, at);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        if (j >= count) break;
        float xv[kB];
        LoadColumn<kB>(p, x, cols, c + j, true, xv);
        const int t = static_cast<int>((code >> (2 * j)) & 3u) - 1;
        const float wt = __fmul_rn(s, static_cast<float>(t));
#pragma unroll
        for (int b = 0; b < kB; ++b) acc[b] = fmaf(wt, xv[b], acc[b]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kB; ++b) sums[w][b][lane] = acc[b];
  __syncthreads();
  for (int t = threadIdx.x; t < 32 * kB; t += kThreads) {
    const int b = t / 32, l = t % 32;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * 32 + l;
    if (row >= rows || b >= p.batch) continue;
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) total += sums[v][b][l];
    if (gridDim.y > 1) {
      partial[(static_cast<int64_t>(blockIdx.y) * p.batch + b) * rows + row] = total;
    } else {
      y[b * rows + row] = RoundResult(total, p.rounding);
    }
  }
}

// Rows of a chunk of the input gradient: a block's.
constexpr int64_t kChunkRows = 128;

// grad_x [batch, cols] = g [batch, rows] @ w. A block owns 32 kN columns, lane l the kN
// consecutive columns from kN l on (in one group: kN divides 32), and a chunk of kChunkRows
// rows, its warps taking every 8th row of it. Per row a lane decodes its kN trits from the packed
// bytes that hold them (TritsAt) and reads its group's scale once; g's column is the same address
// for all lanes. The warps' sums meet in shared memory and are added in warp order; with several
// chunks, each writes its partial sums and PackedReduceKernel adds them in chunk order.
template <int kB, int kN>
__global__ void __launch_bounds__(kThreads) PackedInputGradientKernel(PackedArgs p,
                                                                      const float* grad,
                                                                      float* out, bool partial) {
  static_assert(32 % kN == 0, "a lane's columns lie in one group");
  constexpr int kWarps = kThreads / 32;
  constexpr int kTileCols = 32 * kN;
  __shared__ unsigned table[243];
  __shared__ float sums[kWarps][kB][kTileCols];
  for (unsigned b = threadIdx.x; b < 243; b += blockDim.x) table[b] = kDigits[b];
  __syncthreads();
  const unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int64_t cols = p.cols, rows = p.rows;
  const int64_t gpr = (cols + p.group_size - 1) / p.group_size;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t c0 = tile0 + static_cast<int64_t>(lane) * kN;
  const int count = c0 < cols ? static_cast<int>(min(static_cast<int64_t>(kN), cols - c0)) : 0;
  const int64_t chunk0 = static_cast<int64_t>(blockIdx.y) * kChunkRows;
  const int64_t chunk1 = min(chunk0 + kChunkRows, rows);
  const int64_t group = min(c0, cols - 1) / p.group_size;
  // A warp's row steps are kWarps rows: its cursor moves kWarps * cols weights.
  const uint64_t stride = static_cast<uint64_t>(kWarps) * cols;
  const uint64_t stride_byte = stride / 5;
  const unsigned stride_digit = static_cast<unsigned>(stride - stride_byte * 5);
  float acc[kN][kB];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int b = 0; b < kB; ++b) acc[j][b] = 0.0f;
  }
  TritCursor at;
  at.Start(static_cast<uint64_t>(chunk0 + w) * cols + min(c0, cols - 1));
  for (int64_t r = chunk0 + w; r < chunk1; r += kWarps) {
    float gv[kB];
    LoadColumn<kB>(p, grad, rows, r, true, gv);
    if (count > 0) {
      const float s = p.scale[r * gpr + group];
      const unsigned long long code = TritsAt(table, p.packed, count, at);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const int t = static_cast<int>((code >> (2 * j)) & 3u) - 1;
        const float wt = __fmul_rn(s, static_cast<float>(t));
#pragma unroll
        for (int b = 0; b < kB; ++b) acc[j][b] = fmaf(wt, gv[b], acc[j][b]);
      }
    }
    at.Advance(stride_byte, stride_digit);
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int b = 0; b < kB; ++b) sums[w][b][lane * kN + j] = acc[j][b];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kB * kTileCols; idx += kThreads) {
    const int b = idx / kTileCols, cc = idx % kTileCols;
    const int64_t c = tile0 + cc;
    if (b >= p.batch || c >= cols) continue;
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) total += sums[k][b][cc];
    if (partial) {
      out[(static_cast<int64_t>(blockIdx.y) * p.batch + b) * cols + c] = total;
    } else {
      out[b * cols + c] = RoundResult(total, p.rounding);
    }
  }
}

// out [n] = the parts' partial sums ([parts, n]) added in part order, rounded as the mode's
// GEMM writes its results.
__global__ void PackedReduceKernel(int64_t n, int64_t parts, Rounding rounding,
                                   const float* partial, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float total = 0.0f;
    for (int64_t k = 0; k < parts; ++k) total += partial[k * n + i];
    out[i] = RoundResult(total, rounding);
  }
}

// Scores of g^T x without forming it. Lane l of a warp owns rows r0 + l + 32 i (i < kRows) and
// walks one slice of their columns (whole groups, `per_slice` columns) 16 at a time: a row's 16
// trits come from four packed bytes, each decoded by one read of a table (its five base-3 digits,
// two bits each), and are then taken by shifts. Each weight's gradient is formed from the batch
// in registers (float32 sums in batch order, as before: the same bits), the column's x being the
// same for all lanes. A lane sums each of its groups alone: no reduction across lanes, and about
// a dozen instructions a weight at batch 1 (the layout of one trit a lane needed some 57).
// kCheck (one sample in float32): also clears *exact where a nonzero product could underflow.
template <int kB, int kRows, bool kCheck>
__global__ void __launch_bounds__(kThreads, 2) FactorScoresKernel(PackedArgs p, int64_t per_slice,
                                                               const float* grad,
                                                               const float* x,
                                                               int64_t* scores, bool* exact) {
  static_assert(!kCheck || kB == 1, "the underflow check is of one sample's products");
  __shared__ unsigned table[243];
  for (unsigned b = threadIdx.x; b < 243; b += blockDim.x) table[b] = kDigits[b];
  __syncthreads();
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const unsigned lane = threadIdx.x % 32;
  const int64_t cols = p.cols, rows = p.rows, gs = p.group_size;
  const int64_t slices = (cols + per_slice - 1) / per_slice;
  const int64_t r0 = warp / slices * (32 * kRows);
  if (r0 >= rows) return;
  const int64_t begin = warp % slices * per_slice, end = min(begin + per_slice, cols);
  const int64_t gpr = (cols + gs - 1) / gs;
  float gv[kRows][kB];
  int64_t r[kRows];
  bool row_in[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    r[i] = r0 + lane + 32 * i;
    row_in[i] = r[i] < rows;
    LoadColumn<kB>(p, grad, rows, min(r[i], rows - 1), row_in[i], gv[i]);
  }
  // Each row's place in the packed trits at column `begin` (a row past the end takes row 0's:
  // its gradient is zero, so its signs are too), moved 16 trits (3 bytes and 1 digit) a chunk.
  TritCursor at[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    at[i].Start(static_cast<uint64_t>(row_in[i] ? r[i] : 0) * cols + begin);
  }
  bool risky = false;
  for (int64_t g0 = begin; g0 < end; g0 += gs) {
    const int64_t gend = min(g0 + gs, end);
    int acc[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] = 0;
    for (int64_t c = g0; c < gend; c += 16) {
      const int count = gend - c < 16 ? static_cast<int>(gend - c) : 16;
      unsigned long long code[kRows];  // each row's trits of columns c .. c + count - 1
#pragma unroll
      for (int i = 0; i < kRows; ++i) code[i] = SixteenTrits(table, p.packed, count, at[i]);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        if (j >= count) break;
        float xv[kB];
        LoadColumn<kB>(p, x, cols, c + j, true, xv);
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          float dot = 0.0f;
#pragma unroll
          for (int b = 0; b < kB; ++b) dot = fmaf(gv[i][b], xv[b], dot);
          if (kCheck) {
            // The bound of TernaryLinear::ScoresOfSample: nonzero factors normal, products >=
            // 2^-125.
            const float fa = fabsf(gv[i][0]), fb = fabsf(xv[0]);
            risky |= fa != 0.0f && fb != 0.0f &&
                     !(fa >= 0x1p-126f && fb >= 0x1p-126f && fabsf(dot) >= 0x1p-125f);
          }
          const int t = static_cast<int>((code[i] >> (2 * j)) & 3u) - 1;
          acc[i] += ((dot > 0.0f) - (dot < 0.0f)) * t;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (row_in[i]) scores[r[i] * gpr + g0 / gs] = acc[i];
    }
  }
  if (kCheck && risky) *exact = false;
}

// Calls f with the smallest instantiated batch width that holds `batch`, as a compile-time
// constant.
template <typename F>
cudaError_t ForBatch(int batch, F&& f) {
  if (batch <= 1) return f(std::integral_constant<int, 1>{});
  if (batch <= 2) return f(std::integral_constant<int, 2>{});
  if (batch <= 4) return f(std::integral_constant<int, 4>{});
  if (batch <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, 16>{});
}

// Rows per lane of the scores kernel (32 such rows a warp): x's column, shared by the lanes, is
// used this many times; wide batches keep one, for registers.
constexpr int ScoreRowsPerLane(int b) { return b >= 8 ? 1 : 2; }


// Columns per warp of the scores kernel: at least 64, in whole groups (a 4096x4096 layer at
// batch 1 is then 4096 warps).
int64_t ScoreSliceColumns(int64_t group_size) {
  return group_size >= 64 ? group_size : 64 / group_size * group_size;
}

int64_t Chunks(const PackedArgs& p) { return (p.rows + kChunkRows - 1) / kChunkRows; }

// Columns a lane of the input gradient takes at batch width kB: 16 up to 2, then fewer, so that a
// lane keeps at most 32 sums (kN kB) and a block's sums fit in 32 KiB of shared memory.
constexpr int GradLaneColumns(int kB) { return kB <= 2 ? 16 : 32 / kB; }

// Columns per warp of the forward: 128, in whole groups; a block's 8 warps take 8 slices, and
// the columns take LinearParts blocks of each 32 rows (a 4096x4096 layer: 4 parts, 4096 warps).
int64_t LinearSliceColumns(int64_t group_size) {
  return group_size >= 128 ? group_size : 128 / group_size * group_size;
}
int64_t LinearParts(const PackedArgs& p) {
  const int64_t slices = (p.cols + LinearSliceColumns(p.group_size) - 1) /
                         LinearSliceColumns(p.group_size);
  return (slices + kThreads / 32 - 1) / (kThreads / 32);
}

}  // namespace

cudaError_t LaunchEffectiveWeight(const TernaryArgs& t, Element out_type, void* out, float* scale,
                                  cudaStream_t stream) {
  if (t.rows == 0 || t.cols == 0) return cudaSuccess;
  const int64_t groups = t.rows * ((t.cols + t.group_size - 1) / t.group_size);
  ScaleKernel<<<static_cast<unsigned>(Blocks(groups, kThreads, 1 << 16)), kThreads, 0, stream>>>(
      t, groups, scale);
  const dim3 grid = SpanGrid(t);
  const bool small = Small(t);
  if (out_type == Element::kFloat32) {
    auto* o = static_cast<float*>(out);
    if (small)
      EffectiveWeightKernel<float, uint32_t><<<grid, kThreads, 0, stream>>>(t, scale, o);
    else
      EffectiveWeightKernel<float, uint64_t><<<grid, kThreads, 0, stream>>>(t, scale, o);
  } else {
    auto* o = static_cast<__nv_bfloat16*>(out);
    if (small) {
      EffectiveWeightKernel<__nv_bfloat16, uint32_t><<<grid, kThreads, 0, stream>>>(t, scale, o);
    } else {
      EffectiveWeightKernel<__nv_bfloat16, uint64_t><<<grid, kThreads, 0, stream>>>(t, scale, o);
    }
  }
  return cudaGetLastError();
}

cudaError_t LaunchScores(const TernaryArgs& t, Element grad_type, const void* grad,
                         int64_t stride_row, int64_t stride_col, int64_t* scores,
                         cudaStream_t stream) {
  const int64_t groups = t.rows * ((t.cols + t.group_size - 1) / t.group_size);
  if (groups == 0) return cudaSuccess;
  auto* out = reinterpret_cast<unsigned long long*>(scores);
  const bool small = Small(t);
  // Groups that straddle two warps' or blocks' columns are added in parts into zeroed scores
  // (two's complement: adding int64 values as unsigned 64-bit integers gives the int64 sum).
  const bool warp_kernel = t.group_size % 32 == 0;
  if ((warp_kernel ? kSpan : kScoreCols) % t.group_size != 0) {
    const cudaError_t err = cudaMemsetAsync(scores, 0, groups * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
  }
  if (warp_kernel) {
    const dim3 blocks = SpanGrid(t);
    if (grad_type == Element::kFloat32) {
      const auto* g = static_cast<const float*>(grad);
      if (small) {
        WarpScoresKernel<float, uint32_t>
            <<<blocks, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
      } else {
        WarpScoresKernel<float, uint64_t>
            <<<blocks, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
      }
    } else {
      const auto* g = static_cast<const __nv_bfloat16*>(grad);
      if (small) {
        WarpScoresKernel<__nv_bfloat16, uint32_t>
            <<<blocks, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
      } else {
        WarpScoresKernel<__nv_bfloat16, uint64_t>
            <<<blocks, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
      }
    }
    return cudaGetLastError();
  }
  // Blocks take several rows each (up to 4096 row slots), so that the table copy amortises.
  const dim3 grid(static_cast<unsigned>((t.cols + kScoreCols - 1) / kScoreCols),
                  static_cast<unsigned>(t.rows < 4096 ? t.rows : 4096));
  if (grad_type == Element::kFloat32) {
    const auto* g = static_cast<const float*>(grad);
    if (small) {
      ScoresKernel<float, uint32_t>
          <<<grid, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
    } else {
      ScoresKernel<float, uint64_t>
          <<<grid, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
    }
  } else {
    const auto* g = static_cast<const __nv_bfloat16*>(grad);
    if (small) {
      ScoresKernel<__nv_bfloat16, uint32_t>
          <<<grid, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
    } else {
      ScoresKernel<__nv_bfloat16, uint64_t>
          <<<grid, kThreads, 0, stream>>>(t, g, stride_row, stride_col, out);
    }
  }
  return cudaGetLastError();
}

cudaError_t LaunchScale(const TernaryArgs& t, Rounding rounding, float* scale,
                        cudaStream_t stream) {
  const int64_t groups = t.rows * ((t.cols + t.group_size - 1) / t.group_size);
  if (groups == 0) return cudaSuccess;
  RoundedScaleKernel<<<static_cast<unsigned>(Blocks(groups, kThreads, 1 << 16)), kThreads, 0,
                       stream>>>(t, groups, rounding, scale);
  return cudaGetLastError();
}

int64_t PackedLinearScratch(const PackedArgs& p) {
  const int64_t parts = LinearParts(p);
  return parts > 1 ? parts * p.batch * p.rows : 0;
}

cudaError_t LaunchPackedLinear(const PackedArgs& p, const float* x, float* y, float* partial,
                               cudaStream_t stream) {
  if (p.rows == 0 || p.batch == 0) return cudaSuccess;
  if (p.cols == 0) return cudaMemsetAsync(y, 0, sizeof(float) * p.batch * p.rows, stream);
  const int64_t parts = LinearParts(p), row_blocks = (p.rows + 31) / 32;
  if (parts > 65535 || row_blocks > (int64_t{1} << 31) - 1) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(parts));
  const cudaError_t err = ForBatch(p.batch, [&](auto width) {
    constexpr int kB = decltype(width)::value;
    PackedLinearKernel<kB><<<grid, kThreads, 0, stream>>>(p, LinearSliceColumns(p.group_size),
                                                          x, y, partial);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || parts == 1) return err;
  const int64_t n = p.batch * p.rows;
  PackedReduceKernel<<<static_cast<unsigned>(Blocks(n, kThreads, 1 << 16)), kThreads, 0,
                       stream>>>(n, parts, p.rounding, partial, y);
  return cudaGetLastError();
}

int64_t PackedInputGradientScratch(const PackedArgs& p) {
  const int64_t chunks = Chunks(p);
  return chunks > 1 ? chunks * p.batch * p.cols : 0;
}

cudaError_t LaunchPackedInputGradient(const PackedArgs& p, const float* g, float* grad_x,
                                      float* partial, cudaStream_t stream) {
  if (p.cols == 0 || p.batch == 0) return cudaSuccess;
  if (p.rows == 0) return cudaMemsetAsync(grad_x, 0, sizeof(float) * p.batch * p.cols, stream);
  const int64_t chunks = Chunks(p);
  const bool split = chunks > 1;
  const cudaError_t err = ForBatch(p.batch, [&](auto width) {
    constexpr int kB = decltype(width)::value;
    constexpr int kN = GradLaneColumns(kB);
    const dim3 grid(static_cast<unsigned>((p.cols + 32 * kN - 1) / (32 * kN)),
                    static_cast<unsigned>(chunks));
    PackedInputGradientKernel<kB, kN>
        <<<grid, kThreads, 0, stream>>>(p, g, split ? partial : grad_x, split);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || !split) return err;
  const int64_t n = p.batch * p.cols;
  PackedReduceKernel<<<static_cast<unsigned>(Blocks(n, kThreads, 1 << 16)), kThreads, 0,
                       stream>>>(n, chunks, p.rounding, partial, grad_x);
  return cudaGetLastError();
}

cudaError_t LaunchFactorScores(const PackedArgs& p, const float* g, const float* x,
                               int64_t* scores, bool* exact, cudaStream_t stream) {
  const int64_t groups = p.rows * ((p.cols + p.group_size - 1) / p.group_size);
  if (groups == 0) return cudaSuccess;
  if (p.batch == 0) return cudaMemsetAsync(scores, 0, sizeof(int64_t) * groups, stream);
  const bool check = p.rounding == Rounding::kNone;
  if (check && (p.batch != 1 || exact == nullptr)) return cudaErrorInvalidValue;
  return ForBatch(p.batch, [&](auto width) {
    constexpr int kB = decltype(width)::value;
    constexpr int kRows = ScoreRowsPerLane(kB);
    const int64_t per_slice = ScoreSliceColumns(p.group_size);
    const int64_t warps =
        (p.rows + 32 * kRows - 1) / (32 * kRows) * ((p.cols + per_slice - 1) / per_slice);
    const int64_t blocks = (warps + kThreads / 32 - 1) / (kThreads / 32);
    if (blocks > (int64_t{1} << 31) - 1) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(blocks));
    if constexpr (kB == 1) {
      if (check) {
        FactorScoresKernel<kB, kRows, true>
            <<<grid, kThreads, 0, stream>>>(p, per_slice, g, x, scores, exact);
        return cudaGetLastError();
      }
    }
    FactorScoresKernel<kB, kRows, false>
        <<<grid, kThreads, 0, stream>>>(p, per_slice, g, x, scores, nullptr);
    return cudaGetLastError();
  });
}

}  // namespace tscale::cuda::detail
