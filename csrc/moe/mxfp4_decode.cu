// MXFP4 grouped GEMM for the decode regime (few rows per expert), bandwidth-bound on the weights.
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
// Design. Grid (ceil(N/32), slots + 1). Slot j < slots (= min(E, M)) serves the j-th expert that has
// rows (found on the device from the offsets: no host sync; CTAs without an expert return at once);
// the last slot writes the zero rows outside the groups. One CTA = 32 output columns x the whole K
// of one expert, for up to 16 rows at a time (a larger group loops over 16-row chunks). Its 8 warps
// are 2 column groups (16 columns = the M side of mma.sync) x 4 K-slices (each warp owns 2 of the 8
// chunks of every 256-K stage); the 4 partial sums are added in a fixed order at the end
// (deterministic). Weights, weight scales and activations stream through a 4-stage cp.async ring
// (16-byte coalesced loads; every weight byte is read from HBM exactly once per 16-row chunk).
// E2M1 -> e4m3 (w4a8, bit arithmetic, exact up to the factor 2^-6 undone in fp32) or -> bf16 (w4a16,
// a byte-permute table, exact) in registers; one m16n8k32 e4m3 MMA (or two m16n8k16 bf16 MMAs) per
// 32-K chunk with a zero accumulator gives dot32, which is scaled and added in fp32 as above.
//
// Inside one 32-chunk the MMA sums in its own order and the 4 K-slices are added at the end, so the
// fp32 accumulator differs from the reference's sequential chunk order by a few fp32 ulps; after the
// bf16 rounding most outputs are bit-identical, a few differ by one bf16 ulp.
#include <cuda_bf16.h>
#include <cstdint>
#include <stdexcept>

#include "../common/stream.h"

namespace v4k {

namespace {

constexpr int kThreads = 256;   // 8 warps
constexpr int kBN = 32;         // output columns per CTA
constexpr int kBK = 256;        // K per pipeline stage (8 chunks of 32)
constexpr int kChunksPerStage = kBK / 32;
constexpr int kRows = 16;       // activation rows per pass (2 MMA n8 blocks)
constexpr int kStages = 4;
constexpr int kWRowBytes = kBK / 2 + 16;  // 144: padded smem row of packed weights (conflict-free A reads)

enum Mode : int { kW4A8 = 0, kW4A16 = 1 };

template <int MODE>
struct Cfg {
  static constexpr int kActBytesPerK = MODE == kW4A8 ? 1 : 2;
  // Padded smem row of activations: 288 B (fp8) / 576 B (bf16) keeps the B-fragment loads conflict-free.
  static constexpr int kActRowBytes = kBK * kActBytesPerK + (MODE == kW4A8 ? 32 : 64);
};

template <int MODE, int NW>
struct Smem {
  static constexpr int kW = kBN * kWRowBytes;                  // 4608 per weight matrix
  static constexpr int kAct = kRows * Cfg<MODE>::kActRowBytes;  // 4608 / 9216
  static constexpr int kSc = kBN * kChunksPerStage;            // 256 per weight matrix
  static constexpr int kStage = NW * kW + kAct + NW * kSc;
  static constexpr int kRing = kStages * kStage;
  static constexpr int kRed = NW * 4 * kBN * kRows * 4;        // fp32 partials of the 4 K-slices
  // + activation scales (w4a8): kRows * (K/128) floats, sized at launch.
};

__device__ __forceinline__ float e8m0_to_float(uint32_t e) {
  if (e == 0xffu) return __uint_as_float(0x7fc00000u);  // NaN, as the reference
  if (e == 0u) return __uint_as_float(0x00400000u);     // 2^-127 (fp32 subnormal)
  return __uint_as_float(e << 23);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// 8 E2M1 codes (nibble i = k i) -> 8 e4m3 bytes of value E2M1 * 2^-6 (exact; 0.5 becomes an e4m3
// subnormal). lo = k0..k3, hi = k4..k7.
__device__ __forceinline__ void e2m1x8_to_e4m3(uint32_t x, uint32_t& lo, uint32_t& hi) {
  const uint32_t ev = x & 0x0f0f0f0fu;          // k0, k2, k4, k6
  const uint32_t od = (x >> 4) & 0x0f0f0f0fu;   // k1, k3, k5, k7
  const uint32_t fe = ((ev & 0x07070707u) << 2) | ((ev & 0x08080808u) << 4);
  const uint32_t fo = ((od & 0x07070707u) << 2) | ((od & 0x08080808u) << 4);
  lo = __byte_perm(fe, fo, 0x5140);
  hi = __byte_perm(fe, fo, 0x7362);
}

// 8 E2M1 codes -> 4 bf16x2 words p[j] = (k 2j, k 2j+1), exact values (no scale).
__device__ __forceinline__ void e2m1x8_to_bf16(uint32_t x, uint32_t p[4]) {
  // bf16 of |code| 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6: low bytes / high bytes as byte-permute tables.
  constexpr uint32_t kLo0 = 0xC0800000u, kLo1 = 0xC0804000u;
  constexpr uint32_t kHi0 = 0x3F3F3F00u, kHi1 = 0x40404040u;
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
  const uint8_t* a;        // [Ma, K] e4m3 bytes or bf16
  const uint8_t* a_scale;  // [Ma, K/128] e8m0 (w4a8) or null
  const uint8_t* w[2];     // [E, N, K/2]
  const uint8_t* ws[2];    // [E, N, K/32]
  const int* offsets;      // [E+1]
  const int* row_ids;      // [M] or null
  const float* row_weights;  // [M] or null
  __nv_bfloat16* out;      // [M, N]
  int E, N, K, M, Ma, slots;
  float limit;
};

// One 32-K chunk of one warp: A fragments for its 16 columns, dot32 against up to 16 rows, scaled add.
template <int MODE, int NW>
__device__ __forceinline__ void chunk_mma(const uint8_t* stage, int cg, int ci, int chunk, int nb_count,
                                          const float* sxs, int KB, float acc[NW][2][4]) {
  using S = Smem<MODE, NW>;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* act = stage + NW * S::kW;
  const uint8_t* sc = act + S::kAct;
  const int c0 = cg * 16 + g;  // tile columns c0 and c0 + 8
  // Activation fragment: row (nb*8 + g), actual k = 8t .. 8t+7 of the chunk.
  uint32_t b[2][4];
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    if (nb < nb_count) {
      const uint8_t* arow = act + (nb * 8 + g) * Cfg<MODE>::kActRowBytes;
      if (MODE == kW4A8) {
        const uint2 v = *reinterpret_cast<const uint2*>(arow + ci * 32 + 8 * t);
        b[nb][0] = v.x; b[nb][1] = v.y; b[nb][2] = 0u; b[nb][3] = 0u;
      } else {
        const uint4 v = *reinterpret_cast<const uint4*>(arow + ci * 64 + 16 * t);
        b[nb][0] = v.x; b[nb][1] = v.y; b[nb][2] = v.z; b[nb][3] = v.w;
      }
    }
  }
  float sx[2][2];
  if (MODE == kW4A8) {
    const int blk = chunk >> 2;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) sx[nb][j] = sxs[(nb * 8 + 2 * t + j) * KB + blk];
  }
#pragma unroll
  for (int m = 0; m < NW; ++m) {
    const uint8_t* wt = stage + m * S::kW;
    const uint32_t w_lo = *reinterpret_cast<const uint32_t*>(wt + c0 * kWRowBytes + ci * 16 + 4 * t);
    const uint32_t w_hi = *reinterpret_cast<const uint32_t*>(wt + (c0 + 8) * kWRowBytes + ci * 16 + 4 * t);
    const float sw0 = e8m0_to_float(sc[m * S::kSc + c0 * kChunksPerStage + ci]);
    const float sw1 = e8m0_to_float(sc[m * S::kSc + (c0 + 8) * kChunksPerStage + ci]);
    if (MODE == kW4A8) {
      // MMA k-slot 4t+i <-> actual k 8t+i; slot 16+4t+i <-> 8t+4+i (same map for A and B).
      uint32_t a[4];
      e2m1x8_to_e4m3(w_lo, a[0], a[2]);
      e2m1x8_to_e4m3(w_hi, a[1], a[3]);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        if (nb < nb_count) {
          float d[4];
          mma_e4m3(d, a, b[nb][0], b[nb][1]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float part = d[i] * 64.0f;  // undo the 2^-6 of the e4m3 weights (exact)
            acc[m][nb][i] = fmaf(part * sx[nb][i & 1], i < 2 ? sw0 : sw1, acc[m][nb][i]);
          }
        }
      }
    } else {
      // MMA h (k16): slots 2t,2t+1 <-> actual 8t+4h+{0,1}; slots 2t+8,2t+9 <-> 8t+4h+{2,3}.
      uint32_t plo[4], phi[4];
      e2m1x8_to_bf16(w_lo, plo);
      e2m1x8_to_bf16(w_hi, phi);
      const uint32_t a0[4] = {plo[0], phi[0], plo[1], phi[1]};
      const uint32_t a1[4] = {plo[2], phi[2], plo[3], phi[3]};
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        if (nb < nb_count) {
          const float z[4] = {0.f, 0.f, 0.f, 0.f};
          float d0[4], d[4];
          mma_bf16(d0, a0, b[nb][0], b[nb][1], z);
          mma_bf16(d, a1, b[nb][2], b[nb][3], d0);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[m][nb][i] = fmaf(d[i], i < 2 ? sw0 : sw1, acc[m][nb][i]);
        }
      }
    }
  }
}

// Issues the cp.async loads of pipeline stage s (K range [s*256, s*256+256)) into ring slot s % kStages,
// as one commit group (an empty one past the last stage, so that the wait counts stay uniform).
template <int MODE, int NW>
__device__ __forceinline__ void issue_stage(const Params& p, uint8_t* ring, int s, int nstages, int e, int n0,
                                            int nchunks, const int* s_rid) {
  using S = Smem<MODE, NW>;
  const int tid = threadIdx.x;
  if (s < nstages) {
    uint8_t* st = ring + (s % kStages) * S::kStage;
    const int64_t w_row_bytes = p.K / 2, ws_row_bytes = p.K / 32;
    const int act_row_bytes = p.K * Cfg<MODE>::kActBytesPerK;
    // weights: 32 rows x 8 pieces of 16 B (one 32-chunk each) per matrix; rows >= N / chunks >= K/32 -> 0
    {
      const int row = tid >> 3, piece = tid & 7;
      const int n = n0 + row, chunk = s * kChunksPerStage + piece;
      const bool ok = n < p.N && chunk < nchunks;
#pragma unroll
      for (int m = 0; m < NW; ++m) {
        const uint8_t* src = ok ? p.w[m] + (int64_t(e) * p.N + n) * w_row_bytes + chunk * 16 : p.w[m];
        cp_async16(st + m * S::kW + row * kWRowBytes + piece * 16, src, ok);
      }
    }
    // weight scales: 32 rows x 2 pieces of 4 B (4 chunks each; nchunks is a multiple of 4)
    if (tid < 64 * NW) {
      const int m = tid >> 6, row = (tid & 63) >> 1, half = tid & 1;
      const int n = n0 + row, chunk = s * kChunksPerStage + half * 4;
      const bool ok = n < p.N && chunk < nchunks;
      const uint8_t* src = ok ? p.ws[m] + (int64_t(e) * p.N + n) * ws_row_bytes + chunk : p.ws[m];
      cp_async4(st + NW * S::kW + S::kAct + m * S::kSc + row * kChunksPerStage + half * 4, src, ok);
    }
    // activations: 16 rows x 256 K in 16-byte pieces; missing rows and the K tail are zero-filled
    {
      constexpr int kPiecesPerRow = kBK * Cfg<MODE>::kActBytesPerK / 16;  // 16 or 32
#pragma unroll
      for (int idx = tid; idx < kRows * kPiecesPerRow; idx += kThreads) {
        const int row = idx / kPiecesPerRow, piece = idx % kPiecesPerRow;
        const int rid = s_rid[row];
        const int byte = s * kBK * Cfg<MODE>::kActBytesPerK + piece * 16;
        const bool ok = rid >= 0 && byte < act_row_bytes;
        const uint8_t* src = ok ? p.a + int64_t(rid) * act_row_bytes + byte : p.a;
        cp_async16(st + NW * S::kW + row * Cfg<MODE>::kActRowBytes + piece * 16, src, ok);
      }
    }
  }
  cp_async_commit();
}

// NW = 1: plain GEMM; NW = 2: w1 and w3 with the SwiGLU epilogue.
template <int MODE, int NW>
__global__ void __launch_bounds__(kThreads) mxfp4_decode_kernel(const __grid_constant__ Params p) {
  using S = Smem<MODE, NW>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* ring = smem;
  float* red = reinterpret_cast<float*>(smem + S::kRing);
  float* sxs = reinterpret_cast<float*>(smem + S::kRing + S::kRed);  // [kRows][KB] (w4a8)

  __shared__ int s_warp_count[kThreads / 32];
  __shared__ int s_expert;
  __shared__ int s_rid[kRows];
  __shared__ float s_rw[kRows];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * kBN;
  const int slot = blockIdx.y;
  const int M = p.M, N = p.N, K = p.K;

  // ---- last slot: zero the rows outside [off[0], off[E]) for this CTA's columns ----
  if (slot == p.slots) {
    const int lo = clamp_off(p.offsets[0], M), hi = clamp_off(p.offsets[p.E], M);
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int64_t idx = tid; idx < int64_t(M) * kBN; idx += kThreads) {
      const int r = int(idx / kBN), n = n0 + int(idx % kBN);
      if ((r < lo || r >= hi) && n < N) p.out[int64_t(r) * N + n] = zero;
    }
    return;
  }

  // ---- find the slot-th expert with rows (in increasing expert order) ----
  if (tid == 0) s_expert = -1;
  __syncthreads();
  int seen = 0;
  for (int base = 0; base < p.E; base += kThreads) {
    const int e = base + tid;
    bool has = false;
    if (e < p.E) has = clamp_off(p.offsets[e + 1], M) > clamp_off(p.offsets[e], M);
    const unsigned bal = __ballot_sync(0xffffffffu, has);
    if (lane == 0) s_warp_count[warp] = __popc(bal);
    __syncthreads();
    int before = seen, total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      const int c = s_warp_count[w];
      if (w < warp) before += c;
      total += c;
    }
    before += __popc(bal & ((1u << lane) - 1u));
    if (has && before == slot) s_expert = e;
    seen += total;
    __syncthreads();  // s_expert visible; s_warp_count free for the next round
    if (s_expert >= 0 || seen > slot) break;
  }
  const int e = s_expert;
  if (e < 0) return;  // fewer experts with rows than slots: nothing to do (uniform exit)
  const int r_begin = clamp_off(p.offsets[e], M), r_end = clamp_off(p.offsets[e + 1], M);

  const int cg = warp & 1;   // column group: tile columns cg*16 .. cg*16+15
  const int kq = warp >> 1;  // K-slice: chunks 2kq, 2kq+1 of every stage
  const int nchunks = K / 32, KB = K / 128;
  const int nstages = (K + kBK - 1) / kBK;

  for (int rb = r_begin; rb < r_end; rb += kRows) {
    const int nrows = min(kRows, r_end - rb);
    const int nb_count = nrows > 8 ? 2 : 1;
    if (tid < kRows) {
      int rid = -1;
      float rw = 1.f;
      if (tid < nrows) {
        const int r = rb + tid;
        rid = p.row_ids ? p.row_ids[r] : r;
        if (rid < 0 || rid >= p.Ma) rid = -1;
        if (p.row_weights) rw = p.row_weights[r];
      }
      s_rid[tid] = rid;
      s_rw[tid] = rw;
    }
    __syncthreads();
    if (MODE == kW4A8) {
      for (int idx = tid; idx < kRows * KB; idx += kThreads) {
        const int row = idx / KB, blk = idx % KB;
        const int rid = s_rid[row];
        sxs[idx] = rid >= 0 ? e8m0_to_float(p.a_scale[int64_t(rid) * KB + blk]) : 0.f;
      }
    }

    float acc[NW][2][4];
#pragma unroll
    for (int m = 0; m < NW; ++m)
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][nb][i] = 0.f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue_stage<MODE, NW>(p, ring, s, nstages, e, n0, nchunks, s_rid);
    for (int s = 0; s < nstages; ++s) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage s landed for everyone; ring slot (s-1) % kStages is free
      issue_stage<MODE, NW>(p, ring, s + kStages - 1, nstages, e, n0, nchunks, s_rid);
      const uint8_t* st = ring + (s % kStages) * S::kStage;
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int ci = 2 * kq + cc;
        const int chunk = s * kChunksPerStage + ci;
        if (chunk < nchunks) chunk_mma<MODE, NW>(st, cg, ci, chunk, nb_count, sxs, KB, acc);
      }
    }
    cp_async_wait<0>();

    // ---- fixed-order reduction of the 4 K-slices, epilogue, store ----
    {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int m = 0; m < NW; ++m)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int col = cg * 16 + g + (i < 2 ? 0 : 8);
            const int row = nb * 8 + 2 * t + (i & 1);
            red[((m * 4 + kq) * kRows + row) * kBN + col] = acc[m][nb][i];
          }
    }
    __syncthreads();
    for (int idx = tid; idx < kRows * kBN; idx += kThreads) {
      const int row = idx / kBN, col = idx % kBN;
      const int n = n0 + col;
      if (row < nrows && n < N) {
        float v[NW];
#pragma unroll
        for (int m = 0; m < NW; ++m) {
          float sum = 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) sum += red[((m * 4 + q) * kRows + row) * kBN + col];
          v[m] = sum;
        }
        float y;
        if (NW == 1) {
          y = v[0];
        } else {
          // g, u rounded to bf16 first; NaN-propagating clamps as torch.clamp.
          float gg = __bfloat162float(__float2bfloat16(v[0]));
          float uu = __bfloat162float(__float2bfloat16(v[NW - 1]));
          const float L = p.limit;
          gg = gg > L ? L : gg;
          uu = uu > L ? L : (uu < -L ? -L : uu);
          y = gg / (1.0f + expf(-gg)) * uu;
          y = y * s_rw[row];
        }
        if (s_rid[row] < 0) y = 0.f;
        p.out[int64_t(rb + row) * N + n] = __float2bfloat16(y);
      }
    }
    __syncthreads();  // red, s_rid, sxs and the ring are reused by the next row chunk
  }
}

template <int MODE, int NW>
void launch(const Params& p, cudaStream_t stream) {
  using S = Smem<MODE, NW>;
  const int KB = p.K / 128;
  const size_t smem = size_t(S::kRing) + S::kRed + (MODE == kW4A8 ? size_t(kRows) * KB * 4 : 0);
  auto kernel = mxfp4_decode_kernel<MODE, NW>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("v4kernels._C: mxfp4 decode: cannot reserve ") +
                             std::to_string(smem) + " B of shared memory: " + cudaGetErrorString(err));
  }
  const dim3 grid((p.N + kBN - 1) / kBN, p.slots + 1);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_launch("mxfp4_decode_kernel");
}

}  // namespace

// mode: 0 = w4a8 (a e4m3 bytes + a_scale e8m0), 1 = w4a16 (a bf16). w1/ws1 null for the plain GEMM.
void moe_mxfp4_decode_launch(const void* a, const void* a_scale, const void* w0, const void* ws0,
                             const void* w1, const void* ws1, const int* offsets, const int* row_ids,
                             const float* row_weights, void* out, int64_t E, int64_t N, int64_t K, int64_t M,
                             int64_t Ma, int64_t mode, double limit, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (K <= 0 || K % 128 != 0) throw std::runtime_error("moe_mxfp4_decode: K must be a positive multiple of 128");
  if (E < 1 || E >= 65535) throw std::runtime_error("moe_mxfp4_decode: expected 1 <= E < 65535");
  if (M >= (int64_t(1) << 31) || N >= (int64_t(1) << 31) || K >= (int64_t(1) << 30) || Ma >= (int64_t(1) << 31))
    throw std::runtime_error("moe_mxfp4_decode: sizes out of the int32 range");
  if (mode != kW4A8 && mode != kW4A16) throw std::runtime_error("moe_mxfp4_decode: mode must be 0 (w4a8) or 1 (w4a16)");
  // No activation rows: every row is empty. Checked first: `a` and `a_scale` then hold no valid
  // address (an empty tensor's data pointer may be null).
  if (Ma == 0) {
    cudaError_t err = cudaMemsetAsync(out, 0, size_t(M) * size_t(N) * 2, stream);
    if (err != cudaSuccess) throw std::runtime_error(std::string("moe_mxfp4_decode: memset failed: ") + cudaGetErrorString(err));
    return;
  }
  if (mode == kW4A8 && a_scale == nullptr) throw std::runtime_error("moe_mxfp4_decode: w4a8 needs a_scale");
  Params p;
  p.a = static_cast<const uint8_t*>(a);
  p.a_scale = static_cast<const uint8_t*>(a_scale);
  p.w[0] = static_cast<const uint8_t*>(w0);
  p.ws[0] = static_cast<const uint8_t*>(ws0);
  p.w[1] = static_cast<const uint8_t*>(w1 ? w1 : w0);
  p.ws[1] = static_cast<const uint8_t*>(ws1 ? ws1 : ws0);
  p.offsets = offsets;
  p.row_ids = row_ids;
  p.row_weights = row_weights;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.E = int(E);
  p.N = int(N);
  p.K = int(K);
  p.M = int(M);
  p.Ma = int(Ma);
  p.slots = int(E < M ? E : M);
  p.limit = float(limit);
  const bool swiglu = w1 != nullptr;
  if (mode == kW4A8) {
    if (swiglu) launch<kW4A8, 2>(p, stream); else launch<kW4A8, 1>(p, stream);
  } else {
    if (swiglu) launch<kW4A16, 2>(p, stream); else launch<kW4A16, 1>(p, stream);
  }
}

}  // namespace v4k
