// MXFP4 grouped GEMM for the decode regime (few rows per expert), bound by the weight bytes.
//
// Reference: python/v4kernels/reference/moe.py (moe_grouped_gemm_mxfp4 / moe_grouped_swiglu_mxfp4,
// spec §2.3 and §8.2). Weights: w [E, N, K/2] packed E2M1 (low nibble = even k) with e8m0 scales
// w_scale [E, N, K/32]. Rows r in [off[e], off[e+1]) (offsets clamped to [0, M]) use expert e and
// read activation row rid = row_ids[r] (or r); rid outside [0, Ma) -> output row 0. Rows outside
// [off[0], off[E]) are written 0 too.
//
//   w4a8 : a = e4m3 [Ma, K] + e8m0 a_scale [Ma, K/128];
//          acc += ((dot32(xq, Wq) * sx[m, c/4]) * sW[n, c]) for every 32-K chunk c.
//   w4a16: a = bf16 [Ma, K];  acc += dot32(x, Wq) * sW[n, c]   (= x . dequant(W), fp32).
//   out  : bf16(acc)  or, fused SwiGLU with w1/w3 of the same columns:
//          g = bf16(acc1), u = bf16(acc3), out = bf16(silu(min(g, L)) * clamp(u, -L, L) * row_weight).
//
// Design (persistent, warp-specialised; sm_90a). Work = tiles of (expert, 16-row block of its
// group, output columns) x the whole K, numbered expert-major so that CTAs running side by side
// share an expert's activations in L2; the list is built on the device from the offsets (no host
// sync) and CTA i takes tiles i, i + grid, ... A tile has two "slots" of BN weight rows: w1 and w3
// of BN columns (SwiGLU) or 2 BN columns of the one weight (plain GEMM). One producer warp streams
// every tile's K in stages of 512: weights as TMA boxes of 128 B x BN rows (128-byte swizzle:
// conflict-free fragment loads), weight scales as 16 B x BN boxes, activation rows as 1-D bulk
// copies, and the metadata (row ids, routing weights, activation scales) into a ring of mbarrier
// stages that runs across tile boundaries, so HBM never waits for a tile's epilogue and the
// consumers never wait on global memory. Consumer warps = BN/16 column groups x K-slices (BN = 64:
// 4 x 2, BN = 48: 3 x 4, see launch_bn); per 32-K chunk a warp converts its 16 columns of both slots E2M1 -> e4m3 (w4a8; 7
// integer instructions per 8 codes, exact up to a factor 2^-6) or -> bf16 (w4a16, byte-permute
// table) in registers and runs an m16n8k32 e4m3 MMA (two m16n8k16 bf16 MMAs) per 8 rows with a
// zero accumulator: that is dot32. (On sm_90 the e4m3 mma.sync runs as F2FP conversions to f16 plus
// two HMMA.16816; the two slots share the activation half of that work.) The chunk's weight scale
// 2^(e-127) * 2^6 (the 2^6 undoes the conversion's 2^-6) is a single exponent write, (e+6) << 23,
// and the activation scale of w4a8, the same for the four chunks of a 128-K block, is applied once
// per block:
//   blk = sum over the block's chunks of dot32_c * 2^(e_c - 121);   acc += blk * sx.
// Scales e >= 249 (where 2^(e-121) overflows; 255 is NaN) take an exact path per stage and warp.
// The K-slices are added at the end in a fixed order (deterministic).
//
// Numerics: both scales are powers of two, so each chunk's product is exact as in the reference;
// only the order of the fp32 additions differs (inside the MMA, per 128-K block, across K-slices):
// a few fp32 ulps, after the bf16 rounding most outputs are bit-identical, some one bf16 ulp apart.
//
// Requirements (checked by the launcher; v4kernels/cuda/moe.py routes other shapes to Triton):
// K % 512 == 0 (TMA row strides of the scales are K/32 bytes, a multiple of 16), E <= 1024,
// E * N < 2^31, 16-byte aligned tensors.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "../common/sm90.h"
#include "../common/stream.h"

namespace v4k {

namespace {

constexpr int kStageK = 512;                         // K per pipeline stage = 16 chunks of 32
constexpr int kChunks = kStageK / 32;
constexpr int kRows = 16;                            // rows of a tile (two n8 MMA blocks)
constexpr int kMaxExperts = 1024;
// Every consumer warp runs two 16-column A operands ("slots") per chunk, sharing the activation
// fragments between them: w1 and w3 of the same columns (SwiGLU), or, for a plain GEMM, columns
// [n0, n0 + BN) and [n0 + BN, n0 + 2 BN) of the one weight.
constexpr int kSlots = 2;
constexpr int kMaxStages = 8;
constexpr int kSmemBudget = 225 * 1024;

enum Mode : int { kW4A8 = 0, kW4A16 = 1 };

template <int MODE, int NW, int BN>
struct Layout {
  static constexpr int kCG = BN / 16;                    // column groups (16 columns = MMA M side)
  static constexpr int kKSplit = BN == 64 ? 2 : 4;       // K-slices
  static constexpr int kWarps = kCG * kKSplit;           // consumer warps: 8 (BN 64) or 12 (BN 48)
  static constexpr int kThreads = (kWarps + 1) * 32;     // + 1 producer warp
  static constexpr int kCPW = kChunks / kKSplit;        // chunks per warp and stage
  static_assert(BN == 48 || BN == 64, "slots of 48 or 64 columns: 4 or 8 chunks per warp and stage");
  static constexpr int kActBytes = MODE == kW4A8 ? 1 : 2;
  // activation row in smem: 512 K + 32 B (fp8) / 64 B (bf16) padding: conflict-free fragment loads
  static constexpr int kActRow = kStageK * kActBytes + (MODE == kW4A8 ? 32 : 64);
  static constexpr int kWBox = BN * 128;  // one TMA box: BN rows x 128 B (256 K)
  static constexpr int kSBox = BN * 16;   // BN rows x 16 chunk scales
  static constexpr int kWOff = 0;                          // [slot][half] weight boxes (1024-aligned)
  static constexpr int kSOff = kSlots * 2 * kWBox;         // [slot] scale boxes
  static constexpr int kAOff = kSOff + ((kSlots * kSBox + 127) / 128) * 128;  // [16] activation rows
  // metadata written by the producer: rid[16] (int), row weight[16], activation scales sx[16][4]
  // (the four 128-K blocks of the stage, fp32; w4a8)
  static constexpr int kMOff = kAOff + kRows * kActRow;
  static constexpr int kMeta = kRows * 4 * 6;
  static constexpr int kStage = ((kMOff + kMeta + 1023) / 1024) * 1024;
  static constexpr int kRedStride = BN + 4;  // padded rows of the K-slice partial sums
  static constexpr int kRed = kKSplit * kSlots * kRows * kRedStride * 4;
  static constexpr int kTileN = NW == 2 ? BN : kSlots * BN;  // output columns of a tile
  // + prefix of row blocks [E+1] and the clamped segment [lo, hi) of every expert
  static constexpr int kFixed = 1024 /* alignment slack */ + kRed + 4 * (3 * kMaxExperts + 1);
  // ring depth: as many stages as fit, at most 8 (w4a8 w13 at BN = 64: 4 stages, 128 KB of weights)
  static constexpr int kStagesFit = (kSmemBudget - kFixed) / kStage;
  static constexpr int kStages = kStagesFit > kMaxStages ? kMaxStages : kStagesFit;
  static_assert(kStages >= 2, "shared memory budget too small for two stages");
};

// ---- TMA (PTX); mbarriers and bulk copies: common/sm90.h ----
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
      : "memory");
}
template <int WARPS>
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(WARPS * 32) : "memory"); }

__device__ __forceinline__ float e8m0_to_float(uint32_t e) {
  if (e == 0xffu) return __uint_as_float(0x7fc00000u);  // NaN, as the reference
  if (e == 0u) return __uint_as_float(0x00400000u);     // 2^-127 (fp32 subnormal)
  return __uint_as_float(e << 23);
}

// 8 E2M1 codes (nibble i = k i) -> e4m3 bytes of value E2M1 * 2^-6 (exact). ev = codes k0, k2, k4, k6;
// od = k1, k3, k5, k7: the MMA k slots are permuted to match (see the B fragment in stage_compute).
// e4m3 byte = sign << 7 | magnitude(3 bits) << 2.
__device__ __forceinline__ void e2m1x8_to_e4m3(uint32_t x, uint32_t& ev, uint32_t& od) {
  od = ((x & 0x70707070u) >> 2) | (x & 0x80808080u);
  ev = ((x << 2) & 0x1c1c1c1cu) | ((x << 4) & 0x80808080u);
}

// 8 E2M1 codes -> 4 bf16x2 words p[j] = (k 2j, k 2j+1), values E2M1 * 2^-6 (exact).
__device__ __forceinline__ void e2m1x8_to_bf16(uint32_t x, uint32_t p[4]) {
  // bf16 of |code| 0..7 times 2^-6: 0, 2^-7, 2^-6, 1.5 2^-6, 2^-5, 1.5 2^-5, 2^-4, 1.5 2^-4 as
  // byte-permute tables of the low and the high bytes.
  constexpr uint32_t kLo0 = 0xC0800000u, kLo1 = 0xC0804000u;
  constexpr uint32_t kHi0 = 0x3C3C3C00u, kHi1 = 0x3D3D3D3Du;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t y = x >> (16 * h);  // codes k(4h) .. k(4h+3) in the low 16 bits
    const uint32_t sel = y & 0x7777u;
    const uint32_t lo = __byte_perm(kLo0, kLo1, sel);
    const uint32_t hi = __byte_perm(kHi0, kHi1, sel);
    uint32_t p0 = __byte_perm(lo, hi, 0x5140);
    uint32_t p1 = __byte_perm(lo, hi, 0x7362);
    p0 |= ((y << 12) & 0x00008000u) | ((y << 24) & 0x80000000u);  // signs of k0 (bit 3), k1 (bit 7)
    p1 |= ((y << 4) & 0x00008000u) | ((y << 16) & 0x80000000u);   // signs of k2 (bit 11), k3 (bit 15)
    p[2 * h] = p0;
    p[2 * h + 1] = p1;
  }
}

__device__ __forceinline__ void mma_e4m3(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f), "f"(0.f), "f"(0.f),
        "f"(0.f));
}

__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                         const float c[4]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ int clamp_off(int v, int M) { return v < 0 ? 0 : (v > M ? M : v); }

struct Params {
  const uint8_t* a;          // [Ma, K] e4m3 bytes or bf16
  const uint8_t* a_scale;    // [Ma, K/128] e8m0 (w4a8) or null
  const int* offsets;        // [E+1]
  const int* row_ids;        // [M] or null
  const float* row_weights;  // [M] or null
  __nv_bfloat16* out;        // [M, N]
  int E, N, K, M, Ma;
  float limit;
};

struct Maps {
  CUtensorMap w[2];   // [E*N, K/2] bytes, box 128 x BN, 128-byte swizzle
  CUtensorMap ws[2];  // [E*N, K/32] bytes, box 16 x BN
};

struct Tile {
  int e, r0, nrows, n0;
};

// Shared-memory tables built at kernel start: pre[e] = number of 16-row blocks of the experts before
// e (pre[E] = all), seg_lo/seg_hi = the clamped rows [lo, hi) of expert e.
struct Plan {
  const int* pre;
  const int* seg_lo;
  const int* seg_hi;
  int E, nblk, bn;
};

// Tile t of the expert-major order: row block w = t / nblk, columns (t % nblk) * BN.
__device__ __forceinline__ Tile tile_of(int t, const Plan& pl) {
  const int w = t / pl.nblk;
  int lo = 0, hi = pl.E;  // largest e with pre[e] <= w: it has rows (pre[e + 1] > w)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (pl.pre[mid] <= w) lo = mid; else hi = mid;
  }
  Tile tl;
  tl.e = lo;
  tl.r0 = pl.seg_lo[lo] + kRows * (w - pl.pre[lo]);
  tl.nrows = min(kRows, pl.seg_hi[lo] - tl.r0);
  tl.n0 = (t % pl.nblk) * pl.bn;
  return tl;
}

// Activation row of tile row `row` (-1: none or out of range) and its routing weight.
__device__ __forceinline__ void row_of(const Tile& tl, int row, const Params& p, int& rid, float& rw) {
  rid = -1;
  rw = 1.f;
  if (row < tl.nrows) {
    const int r = tl.r0 + row;
    rid = p.row_ids ? p.row_ids[r] : r;
    if (rid < 0 || rid >= p.Ma) rid = -1;
    if (p.row_weights) rw = p.row_weights[r];
  }
}

// One stage of one consumer warp: its CPW chunks (c = kq*CPW + ci) x 2 slots x NB n8
// blocks of rows (NB = 1: rows 0-7, 2: rows 0-15). Chunk offsets are compile-time; the scale
// factors of the stage are decoded first. EXACT: the per-chunk factors 2^6 and 2^(e-127) are applied
// separately (some scale byte >= 249 in this warp's stage).
template <int MODE, int NW, int BN, int NB, bool EXACT>
__device__ __forceinline__ void stage_compute(const uint8_t* st, int cg, int kq,
                                              const uint32_t (&sw)[kSlots][2][(Layout<MODE, NW, BN>::kCPW + 3) / 4],
                                              float (&acc)[kSlots][2][4]) {
  using L = Layout<MODE, NW, BN>;
  constexpr int CPW = L::kCPW;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int c0 = kq * CPW;  // first chunk; CPW = 8: box half kq, units 0..7; CPW = 4: units 4 (kq & 1) + ci
  const uint8_t* wrow = st + L::kWOff + (c0 >> 3) * L::kWBox + (cg * 16 + g) * 128 + 4 * t;
  const uint8_t* arow = st + L::kAOff + g * L::kActRow + c0 * 32 * L::kActBytes + (MODE == kW4A8 ? 8 : 16) * t;
  const float* msx = reinterpret_cast<const float*>(st + L::kMOff + 2 * kRows * 4) + 2 * t * 4 + (c0 >> 2);

  // scale factors: f[m][r][ci] for rows g (r = 0) and g + 8 (r = 1)
  float f[kSlots][2][CPW];
#pragma unroll
  for (int m = 0; m < kSlots; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int ci = 0; ci < CPW; ++ci) {
        const uint32_t w = sw[m][r][ci >> 2];
        const int b = ci & 3;
        if (EXACT) {
          f[m][r][ci] = e8m0_to_float((w >> (8 * b)) & 0xffu);
        } else {
          const uint32_t w6 = w + 0x06060606u;  // e + 6 per byte (e <= 248: no carry)
          f[m][r][ci] = __uint_as_float((b < 3 ? w6 << (23 - 8 * b) : w6 >> 1) & 0x7f800000u);  // 2^(e-121)
        }
      }

  float blk[kSlots][NB][4];
#pragma unroll
  for (int ci = 0; ci < CPW; ++ci) {
    const int c = c0 + ci;
    const int uo = (((c & 7) ^ g) << 4);  // 128-byte swizzle: unit u of row r sits at u ^ (r & 7)
    // activation fragments (row nb*8 + g)
    uint32_t b[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const uint8_t* ap = arow + nb * 8 * L::kActRow + ci * 32 * L::kActBytes;
      if (MODE == kW4A8) {
        // slots 4t..4t+3 <-> k 8t, 8t+2, 8t+4, 8t+6; slots 16+4t.. <-> k 8t+1, 8t+3, 8t+5, 8t+7
        const uint2 v = *reinterpret_cast<const uint2*>(ap);
        b[nb][0] = __byte_perm(v.x, v.y, 0x6420);
        b[nb][1] = __byte_perm(v.x, v.y, 0x7531);
      } else {
        const uint4 v = *reinterpret_cast<const uint4*>(ap);
        b[nb][0] = v.x; b[nb][1] = v.y; b[nb][2] = v.z; b[nb][3] = v.w;
      }
    }
#pragma unroll
    for (int m = 0; m < kSlots; ++m) {
      const uint8_t* wp = wrow + m * 2 * L::kWBox + uo;
      const uint32_t w_lo = *reinterpret_cast<const uint32_t*>(wp);
      const uint32_t w_hi = *reinterpret_cast<const uint32_t*>(wp + 8 * 128);
      float d[NB][4];
      if (MODE == kW4A8) {
        uint32_t a[4];
        e2m1x8_to_e4m3(w_lo, a[0], a[2]);
        e2m1x8_to_e4m3(w_hi, a[1], a[3]);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mma_e4m3(d[nb], a, b[nb][0], b[nb][1]);
      } else {
        // MMA j (k16): slots 2t,2t+1 <-> k 8t+4j+{0,1}; slots 2t+8,2t+9 <-> k 8t+4j+{2,3}
        uint32_t plo[4], phi[4];
        e2m1x8_to_bf16(w_lo, plo);
        e2m1x8_to_bf16(w_hi, phi);
        const uint32_t a0[4] = {plo[0], phi[0], plo[1], phi[1]};
        const uint32_t a1[4] = {plo[2], phi[2], plo[3], phi[3]};
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          const float z[4] = {0.f, 0.f, 0.f, 0.f};
          float d0[4];
          mma_bf16(d0, a0, b[nb][0], b[nb][1], z);
          mma_bf16(d[nb], a1, b[nb][2], b[nb][3], d0);
        }
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float fc = f[m][i >> 1][ci];
          const float dd = EXACT ? d[nb][i] * 64.0f : d[nb][i];
          if (MODE == kW4A16) acc[m][nb][i] = fmaf(dd, fc, acc[m][nb][i]);
          else if ((ci & 3) == 0) blk[m][nb][i] = dd * fc;  // first chunk of a 128-K block
          else blk[m][nb][i] = fmaf(dd, fc, blk[m][nb][i]);
        }
    }
    // w4a8: end of a 128-K block -> promote with the activation scales of rows 2t, 2t+1 (+8)
    if (MODE == kW4A8 && ((ci & 3) == 3 || ci == CPW - 1)) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const float sx0 = msx[nb * 8 * 4 + (ci >> 2)];
        const float sx1 = msx[nb * 8 * 4 + 4 + (ci >> 2)];
#pragma unroll
        for (int m = 0; m < kSlots; ++m)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[m][nb][i] = fmaf(blk[m][nb][i], (i & 1) ? sx1 : sx0, acc[m][nb][i]);
      }
    }
  }
}

// NW = 1: plain GEMM; NW = 2: w1 and w3 with the SwiGLU epilogue.
template <int MODE, int NW, int BN>
__global__ void __launch_bounds__(Layout<MODE, NW, BN>::kThreads, 1)
    mxfp4_decode_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
  using L = Layout<MODE, NW, BN>;
  constexpr int STAGES = L::kStages;
  constexpr int kThreads = L::kThreads;
  constexpr int kConsumerWarps = L::kWarps;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* ring = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* red = reinterpret_cast<float*>(ring + STAGES * L::kStage);
  int* pre = reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(red) + L::kRed);  // [E+1]
  int* seg_lo = pre + kMaxExperts + 1;                                           // [E]
  int* seg_hi = seg_lo + kMaxExperts;                                            // [E]

  __shared__ __align__(8) uint64_t full_bar[STAGES], empty_bar[STAGES];
  __shared__ int s_warp_sum[kThreads / 32];
  __shared__ int s_rid[kRows];
  __shared__ float s_rw[kRows];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int M = p.M, N = p.N, K = p.K, E = p.E;
  const int nstages = K / kStageK;
  const int nblk = (N + L::kTileN - 1) / L::kTileN;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full_bar[s], 1);
      mbar_init(&empty_bar[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }

  // ---- prefix over experts of their 16-row blocks (all threads; E <= 1024 -> <= 4 experts each) ----
  {
    constexpr int kPer = (kMaxExperts + kThreads - 1) / kThreads;
    int cnt[kPer];
    int local = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = tid * kPer + j;
      int c = 0;
      if (e < E) {
        const int lo = clamp_off(p.offsets[e], M), hi = clamp_off(p.offsets[e + 1], M);
        seg_lo[e] = lo;
        seg_hi[e] = hi;
        c = hi > lo ? (hi - lo + kRows - 1) / kRows : 0;
      }
      cnt[j] = c;
      local += c;
    }
    int incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) s_warp_sum[warp] = incl;
    __syncthreads();
    int base = 0;
    for (int w = 0; w < warp; ++w) base += s_warp_sum[w];
    int run = base + incl - local;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = tid * kPer + j;
      if (e <= E) pre[e] = run;  // pre[E] = total
      run += cnt[j];
    }
    __syncthreads();  // pre[] and the barrier inits visible to all
  }
  const int ntiles = pre[E] * nblk;
  const Plan plan{pre, seg_lo, seg_hi, E, nblk, L::kTileN};

  if (warp == kConsumerWarps) {
    // ================= producer warp =================
    // Per stage: weight and scale boxes (lane 0), activation rows (lane r = tile row r), and the
    // metadata the consumers need (row ids, routing weights, activation scales of the stage), so that
    // the consumers never wait on global memory. Global reads of the metadata are issued a stage
    // (activation scales) or a tile (row ids) ahead.
    const int act_row_bytes = K * L::kActBytes;
    const int act_stage_bytes = kStageK * L::kActBytes;
    const int KB = K / 128;  // activation scales per row; a multiple of 4 (K % 512 == 0)
    int tix = blockIdx.x;
    if (tix >= ntiles) return;
    Tile cur = tile_of(tix, plan);
    int rid;
    float rw;
    row_of(cur, lane, p, rid, rw);
    uint32_t word = 0;  // e8m0 activation scales of the current stage (4 bytes: its four 128-K blocks)
    if (MODE == kW4A8 && rid >= 0) word = *reinterpret_cast<const uint32_t*>(p.a_scale + int64_t(rid) * KB);
    int it = 0;  // stage counter across tiles (ring position)
    while (true) {
      const int tnext = tix + gridDim.x;
      const bool has_next = tnext < ntiles;
      Tile nxt = cur;
      int rid_n = -1;
      float rw_n = 1.f;
      if (has_next) {
        nxt = tile_of(tnext, plan);
        row_of(nxt, lane, p, rid_n, rw_n);
      }
      const unsigned valid = __ballot_sync(0xffffffffu, rid >= 0);
      const uint32_t bytes = kSlots * (2 * L::kWBox + L::kSBox) + __popc(valid) * act_stage_bytes;
      const int wrow = cur.e * N + cur.n0;
      for (int s = 0; s < nstages; ++s, ++it) {
        uint32_t word_next = 0;
        if (MODE == kW4A8) {
          if (s + 1 < nstages) {
            if (rid >= 0) word_next = *reinterpret_cast<const uint32_t*>(p.a_scale + int64_t(rid) * KB + 4 * (s + 1));
          } else if (rid_n >= 0) {
            word_next = *reinterpret_cast<const uint32_t*>(p.a_scale + int64_t(rid_n) * KB);
          }
        }
        const int slot = it % STAGES;
        const int round = it / STAGES;
        if (round > 0) mbar_wait(&empty_bar[slot], (round - 1) & 1);
        uint8_t* st = ring + slot * L::kStage;
        if (lane < kRows) {
          int* mrid = reinterpret_cast<int*>(st + L::kMOff);
          float* mrw = reinterpret_cast<float*>(st + L::kMOff + kRows * 4);
          float* msx = reinterpret_cast<float*>(st + L::kMOff + 2 * kRows * 4);
          mrid[lane] = rid;
          mrw[lane] = rw;
          if (MODE == kW4A8) {
#pragma unroll
            for (int j = 0; j < 4; ++j) msx[lane * 4 + j] = rid >= 0 ? e8m0_to_float((word >> (8 * j)) & 0xffu) : 0.f;
          }
        }
        __syncwarp();  // metadata stores ordered before lane 0's arrive (release) on the full barrier
        if (lane == 0) {
          mbar_arrive_expect_tx(&full_bar[slot], bytes);
#pragma unroll
          for (int m = 0; m < kSlots; ++m) {
            const int row = wrow + (NW == 2 ? 0 : m * BN);  // NW = 1: both maps are the one weight
#pragma unroll
            for (int h = 0; h < 2; ++h)
              tma_load_2d(st + L::kWOff + (m * 2 + h) * L::kWBox, &maps.w[m], s * (kStageK / 2) + h * 128, row,
                          &full_bar[slot]);
            tma_load_2d(st + L::kSOff + m * L::kSBox, &maps.ws[m], s * kChunks, row, &full_bar[slot]);
          }
        }
        __syncwarp();
        if (rid >= 0)
          bulk_load(st + L::kAOff + lane * L::kActRow, p.a + int64_t(rid) * act_row_bytes + s * act_stage_bytes,
                    act_stage_bytes, &full_bar[slot]);
        word = word_next;
      }
      if (!has_next) break;
      tix = tnext;
      cur = nxt;
      rid = rid_n;
      rw = rw_n;
    }
    return;
  }

  // ================= consumer warps =================
  // rows outside [off[0], off[E]): zero (all CTAs, grid-stride)
  {
    const int lo = clamp_off(p.offsets[0], M), hi = clamp_off(p.offsets[E], M);
    const int64_t outside = int64_t(lo + (M - hi)) * N;
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int64_t idx = int64_t(blockIdx.x) * (kConsumerWarps * 32) + tid; idx < outside;
         idx += int64_t(gridDim.x) * (kConsumerWarps * 32)) {
      int64_t r = idx / N;
      const int n = int(idx % N);
      if (r >= lo) r += hi - lo;
      p.out[r * N + n] = zero;
    }
  }

  const int cg = warp % L::kCG;
  const int kq = warp / L::kCG;
  const int g = lane >> 2, t = lane & 3;
  constexpr int SW_WORDS = (L::kCPW + 3) / 4;
  int it = 0;
  for (int tix = blockIdx.x; tix < ntiles; tix += gridDim.x) {
    const Tile tl = tile_of(tix, plan);
    const int nb_count = tl.nrows > 8 ? 2 : 1;

    float acc[kSlots][2][4];
#pragma unroll
    for (int m = 0; m < kSlots; ++m)
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][nb][i] = 0.f;

    for (int s = 0; s < nstages; ++s, ++it) {
      const int slot = it % STAGES;
      mbar_wait(&full_bar[slot], (it / STAGES) & 1);
      const uint8_t* st = ring + slot * L::kStage;
      if (s == 0 && tid < kRows) {  // the tile's row ids and weights, for the epilogue
        s_rid[tid] = reinterpret_cast<const int*>(st + L::kMOff)[tid];
        s_rw[tid] = reinterpret_cast<const float*>(st + L::kMOff + kRows * 4)[tid];
      }
      // this warp's scale bytes: rows cg*16 + g and + 8, chunks kq*CPW .. +CPW-1
      uint32_t sw[kSlots][2][SW_WORDS];
      bool big = false;
#pragma unroll
      for (int m = 0; m < kSlots; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint8_t* srow = st + L::kSOff + m * L::kSBox + (cg * 16 + g + 8 * r) * 16 + kq * L::kCPW;
#pragma unroll
          for (int j = 0; j < SW_WORDS; ++j) {
            const uint32_t v = *reinterpret_cast<const uint32_t*>(srow + 4 * j);
            sw[m][r][j] = v;
            // some byte >= 249: 2^(e-121) is not a finite fp32 (255: NaN scale)
            big |= (v & ((v & 0x7f7f7f7fu) + 0x07070707u) & 0x80808080u) != 0u;
          }
        }
      const bool exact = __any_sync(0xffffffffu, big);
      if (nb_count == 2) {
        if (exact) stage_compute<MODE, NW, BN, 2, true>(st, cg, kq, sw, acc);
        else stage_compute<MODE, NW, BN, 2, false>(st, cg, kq, sw, acc);
      } else {
        if (exact) stage_compute<MODE, NW, BN, 1, true>(st, cg, kq, sw, acc);
        else stage_compute<MODE, NW, BN, 1, false>(st, cg, kq, sw, acc);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty_bar[slot]);
    }

    // ---- fixed-order sum of the K-slices, epilogue, store ----
#pragma unroll
    for (int m = 0; m < kSlots; ++m)
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
        if (nb < nb_count)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int col = cg * 16 + g + (i < 2 ? 0 : 8);
            const int row = nb * 8 + 2 * t + (i & 1);
            red[((kq * kSlots + m) * kRows + row) * L::kRedStride + col] = acc[m][nb][i];
          }
    consumer_sync<kConsumerWarps>();
    for (int idx = tid; idx < tl.nrows * L::kTileN; idx += kConsumerWarps * 32) {
      const int row = idx / L::kTileN, col = idx % L::kTileN;
      const int n = tl.n0 + col;
      if (n < N) {
        // slot sums over the K-slices in a fixed order: NW = 2 both slots of column col, NW = 1 the one
        // slot that holds column col
        float v[kSlots];
#pragma unroll
        for (int m = 0; m < kSlots; ++m) {
          const int sm = NW == 2 ? m : col / BN;
          const int c = NW == 2 ? col : col % BN;
          float sum = 0.f;
#pragma unroll
          for (int q = 0; q < L::kKSplit; ++q) sum += red[((q * kSlots + sm) * kRows + row) * L::kRedStride + c];
          v[m] = sum;
        }
        float y;
        if (NW == 1) {
          y = v[0];
        } else {
          // g, u rounded to bf16 first; NaN-propagating clamps as torch.clamp.
          float gg = __bfloat162float(__float2bfloat16(v[0]));
          float uu = __bfloat162float(__float2bfloat16(v[1]));
          const float Lm = p.limit;
          gg = gg > Lm ? Lm : gg;
          uu = uu > Lm ? Lm : (uu < -Lm ? -Lm : uu);
          y = gg / (1.0f + expf(-gg)) * uu;
          y = y * s_rw[row];
        }
        if (s_rid[row] < 0) y = 0.f;
        p.out[int64_t(tl.r0 + row) * N + n] = __float2bfloat16(y);
      }
    }
    consumer_sync<kConsumerWarps>();  // red, s_rid and s_rw are rewritten by the next tile
  }
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q);
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error("moe_mxfp4_decode: cuTensorMapEncodeTiled not found in the CUDA driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// 2-D byte tensor [rows, inner] (row stride = inner bytes), box [box_rows, box_inner].
CUtensorMap byte_map(const void* base, uint64_t inner, uint64_t rows, uint32_t box_inner, uint32_t box_rows,
                     bool swizzle128) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {inner, rows};
  const cuuint64_t strides[1] = {inner};
  const cuuint32_t box[2] = {box_inner, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, elem,
      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("moe_mxfp4_decode: cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ")");
  return m;
}

int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

template <int MODE, int NW, int BN>
void launch(const Params& p, const void* const w[2], const void* const ws[2], cudaStream_t stream) {
  using L = Layout<MODE, NW, BN>;
  Maps maps;
  const uint64_t rows = uint64_t(p.E) * p.N;
  for (int m = 0; m < 2; ++m) {
    maps.w[m] = byte_map(w[m], p.K / 2, rows, 128, BN, true);
    maps.ws[m] = byte_map(ws[m], p.K / 32, rows, 16, BN, false);
  }
  const size_t smem = size_t(L::kStages) * L::kStage + L::kFixed;
  const int n_sm = sm_count();
  // upper bound of the tiles (16-row blocks <= min(E, M) + M / 16) without reading the offsets
  const int64_t blocks = int64_t(p.E < p.M ? p.E : p.M) + p.M / kRows;
  const int64_t tiles = blocks * ((p.N + L::kTileN - 1) / L::kTileN);
  const int grid = int(tiles < n_sm ? (tiles > 0 ? tiles : 1) : n_sm);
  auto kernel = mxfp4_decode_kernel<MODE, NW, BN>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("moe_mxfp4_decode: cannot reserve ") + std::to_string(smem) +
                             " B of shared memory: " + cudaGetErrorString(err));
  kernel<<<grid, L::kThreads, smem, stream>>>(p, maps);
  check_launch("mxfp4_decode_kernel");
}

// Slot width: 64 columns (8 consumer warps) when that gives at least 2.5 tiles per SM, else 48 (12
// consumer warps; few experts: decode of a small batch). Measured on the H100 (profile_moe_decode.py
// --widths): with 64 experts 64 columns beat 48 by 6-12%; with 6 experts of one token each 48 columns
// took 27.2 / 15.1 / 61.9 us for Flash W1W3 / Flash W2 / Pro W1W3 against 32.5 / 17.4 / 75.7 for 64
// (Pro W2, 2.5 tiles per SM at 64: 38.3 against 36.7). 32- and 16-column slots (8 warps, 4 and 2
// chunks per warp and stage) were never the fastest. V4K_MOE_DECODE_BN=48|64 forces one (profiling).
template <int MODE, int NW>
void launch_bn(const Params& p, const void* const w[2], const void* const ws[2], cudaStream_t stream) {
  int bn = 0;
  if (const char* env = std::getenv("V4K_MOE_DECODE_BN")) bn = std::atoi(env);
  if (bn != 48 && bn != 64) {
    const int64_t blocks = int64_t(p.E < p.M ? p.E : p.M) + p.M / kRows;
    const int t64 = Layout<MODE, NW, 64>::kTileN;
    bn = 2 * blocks * ((p.N + t64 - 1) / t64) >= 5 * int64_t(sm_count()) ? 64 : 48;
  }
  if (bn == 64) launch<MODE, NW, 64>(p, w, ws, stream);
  else launch<MODE, NW, 48>(p, w, ws, stream);
}

}  // namespace

// mode: 0 = w4a8 (a e4m3 bytes + a_scale e8m0), 1 = w4a16 (a bf16). w1/ws1 null for the plain GEMM.
void moe_mxfp4_decode_launch(const void* a, const void* a_scale, const void* w0, const void* ws0,
                             const void* w1, const void* ws1, const int* offsets, const int* row_ids,
                             const float* row_weights, void* out, int64_t E, int64_t N, int64_t K, int64_t M,
                             int64_t Ma, int64_t mode, double limit, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (K <= 0 || K % kStageK != 0) throw std::runtime_error("moe_mxfp4_decode: K must be a positive multiple of 512");
  if (E < 1 || E > kMaxExperts) throw std::runtime_error("moe_mxfp4_decode: expected 1 <= E <= 1024");
  if (M >= (int64_t(1) << 31) || E * N >= (int64_t(1) << 31) || K >= (int64_t(1) << 20) || Ma >= (int64_t(1) << 31))
    throw std::runtime_error("moe_mxfp4_decode: sizes out of range (M, E*N, Ma < 2^31, K < 2^20)");
  if (mode != kW4A8 && mode != kW4A16) throw std::runtime_error("moe_mxfp4_decode: mode must be 0 (w4a8) or 1 (w4a16)");
  // No activation rows: every row is empty. Checked first: `a` and `a_scale` then hold no valid
  // address (an empty tensor's data pointer may be null).
  if (Ma == 0) {
    cudaError_t err = cudaMemsetAsync(out, 0, size_t(M) * size_t(N) * 2, stream);
    if (err != cudaSuccess) throw std::runtime_error(std::string("moe_mxfp4_decode: memset failed: ") + cudaGetErrorString(err));
    return;
  }
  if (mode == kW4A8 && (a_scale == nullptr || reinterpret_cast<uintptr_t>(a_scale) % 4 != 0))
    throw std::runtime_error("moe_mxfp4_decode: w4a8 needs a 4-byte aligned a_scale");
  Params p;
  p.a = static_cast<const uint8_t*>(a);
  p.a_scale = static_cast<const uint8_t*>(a_scale);
  p.offsets = offsets;
  p.row_ids = row_ids;
  p.row_weights = row_weights;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.E = int(E);
  p.N = int(N);
  p.K = int(K);
  p.M = int(M);
  p.Ma = int(Ma);
  p.limit = float(limit);
  const void* const w[2] = {w0, w1 ? w1 : w0};
  const void* const ws[2] = {ws0, ws1 ? ws1 : ws0};
  const bool swiglu = w1 != nullptr;
  if (mode == kW4A8) {
    if (swiglu) launch_bn<kW4A8, 2>(p, w, ws, stream); else launch_bn<kW4A8, 1>(p, w, ws, stream);
  } else {
    if (swiglu) launch_bn<kW4A16, 2>(p, w, ws, stream); else launch_bn<kW4A16, 1>(p, w, ws, stream);
  }
}

}  // namespace v4k
