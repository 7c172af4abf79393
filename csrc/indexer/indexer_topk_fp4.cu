// Lightning-indexer scores + per-chunk top-k over the paged FP4 key cache, sm_90a (Hopper).
//
// The `indexer_topk` op's CUDA backend (python/v4kernels/cuda/indexer.py): a scoring kernel that keeps each chunk's
// best keys, and a merge kernel (one CTA per query token, end of this file) that reduces the per-chunk lists to the
// final indices, lengths and KV rows.
//
// One CTA = one query token x one chunk of its visible entries [c_lo, c_hi). 160 threads:
//   * warp 4, the loader: per tile of 64 entries, one `cp.async.bulk` of the 64-byte code rows and one of the 4-byte
//     scale words per page the tile overlaps (pages are page_size * 68 bytes rounded up to 576: 16-byte aligned) (a 64-entry page: 2 copies), into an 8-stage ring on an mbarrier
//     (35 KB in flight per CTA, no registers held); the block-table entries of the chunk are staged in shared
//     memory once. Missing pages (-1 or >= num_pages) are not read; a 64-bit presence mask per stage tells the
//     consumers which entries are visible.
//   * warps 0-3, one consumer warpgroup: per tile, S[64 keys x H heads] = K Q^T with 4 wgmma m64nHk32 e4m3 (keys on
//     M so the head sum is thread-local but for two shuffles; K from registers, Q from shared memory). Each thread
//     converts its own A fragment straight from the raw rows: it owns rows g, g+8 and the 16 code bytes of scale
//     block (lane % 4) of each, i.e. the 32 elements of one block; the dot product does not care about the order of
//     k, so the A fragment takes them in the order that needs no shuffling (low nibbles in the first half of each
//     k32 step, high nibbles in the second) and Q is stored in shared memory in that same order. The next tile is
//     converted while the tensor cores work on this one. Epilogue: relu, head weights, head sum, the key's power of
//     two, and the tile's 64 ordering keys go to a shared-memory array of the chunk (uint32; 0 = not visible).
//   After the loop all 160 threads select the chunk's top M (radix select over the 32-bit keys: 256 bins over the
//   live key range per pass, ties at the cut resolved to the lower entry index by an ordered scan), sort them (bitonic, in shared memory)
//   and write the chunk's list: int64 ordering keys (score << 32 | ~entry), descending, SENT-padded.
//
// Numerics: the FP8 factorisation of the Triton kernel (python/v4kernels/triton/indexer.py, module doc): an FP4 key
// becomes the e4m3 values e2m1 * 2^(6 - (m - e_b)) (m = its largest block exponent; a block more than 2^11 below is
// flushed), the query head h is scaled by 2^(7 - E_h) and rounded to e4m3 (exact for FP4-exact queries), and the
// powers of two return outside the relu: score = 2^(m - 133) * sum_h relu(acc_h) * w_h * 2^(E_h - 7). The products
// are exact; the FP8 tensor core's accumulation and the fp32 head-sum order differ from Triton's in low bits.
// relu keeps NaN (max.NaN), as torch.relu; an e8m0 NaN scale (255) makes the key's score NaN; NaN orders as -inf.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/sm90.h"
#include "common/stream.h"

namespace v4k {
namespace {

constexpr int kBN = 64;                        // entries per tile (wgmma M)
constexpr int kStages = 8;                     // raw ring depth
constexpr int kRowBytes = 64;                  // FP4 code bytes per entry
constexpr int kStageBytes = kBN * (kRowBytes + 4);  // 4096 code bytes + 256 scale bytes
constexpr int kThreads = 160;                  // consumer warpgroup + loader warp
constexpr int kRadixBins = 256;
constexpr long long kSent = -9223372036854775807LL;  // INT64_MIN + 1: the padding of a list (below every key)

struct IdxParams {
  const __nv_bfloat16* q;  // [T, H, 128]
  const void* w;           // [T, H] fp32 or bf16
  const uint8_t* cache;    // [num_pages, page_size * 68]
  const int* bt;           // [B, max_pages]
  const void* seq;         // [T] int32 / int64
  const void* pos;         // [T] int32 / int64
  long long* lists;        // [T, splits, M]
  int* ws;                 // optional [T, n_entries] score workspace: signed monotone keys, INT_MIN = not visible
  int T, B, max_pages, num_pages, page_size, n_entries, chunk, splits, M;
  int w_f32, seq_i64, pos_i64;
  int npt;                 // page-table slots in shared memory
  int64_t page_bytes;
};

// shared-memory layout (offsets from a 1024-byte aligned base)
struct Layout {
  int q, ring, scores, pt, masks, full, empty, weff, hist, misc, total;
};
__host__ __device__ inline Layout make_layout(int H, int chunk, int npt) {
  Layout l;
  l.q = 0;                                  // H rows x 128 e4m3, 128-byte swizzle (1024-aligned)
  l.ring = H * 128;                         // kStages x (4096 codes + 256 scale words); the candidates alias it
  l.scores = l.ring + kStages * kStageBytes;  // chunk x uint32 ordering keys
  l.pt = l.scores + chunk * 4;              // page ids of the chunk
  l.masks = (l.pt + npt * 4 + 7) / 8 * 8;   // kStages x uint64 presence
  l.full = l.masks + kStages * 8;
  l.empty = l.full + kStages * 8;
  l.weff = l.empty + kStages * 8;           // H fp32: w_h * 2^(E_h - 7)
  l.hist = l.weff + H * 4;                  // 256 bins
  l.misc = l.hist + kRadixBins * 4;         // 16 ints
  l.total = l.misc + 16 * 4;
  return l;
}

// ---------------------------------------------------------------------------------------------- PTX helpers
// D[64 x N] (+)= A[64 x 32] B[N x 32]^T, e4m3, A in registers, B K-major in shared memory
template <int N>
struct Wgmma;
#define V4K_ACC8(i) "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
template <>
struct Wgmma<16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1;\n}\n"
        : V4K_ACC8(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
  }
};
template <>
struct Wgmma<32> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1;\n}\n"
        : V4K_ACC8(0), V4K_ACC8(8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
  }
};
template <>
struct Wgmma<64> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
        : V4K_ACC8(0), V4K_ACC8(8), V4K_ACC8(16), V4K_ACC8(24)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
  }
};
template <>
struct Wgmma<128> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : V4K_ACC8(0), V4K_ACC8(8), V4K_ACC8(16), V4K_ACC8(24), V4K_ACC8(32), V4K_ACC8(40), V4K_ACC8(48), V4K_ACC8(56)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
  }
};
#undef V4K_ACC8

__device__ __forceinline__ float relu_nan(float x) {  // max(x, 0) that keeps NaN (torch.relu)
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;\n" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// e4m3 tables of e2m1 magnitudes 0..3 (lo) and 4..7 (hi) times 2^s, s <= 6; s < -5 flushes the block to zero
__device__ __forceinline__ void e4m3_lut(int s, uint32_t& lo, uint32_t& hi) {
  const bool keep = s >= -5;
  lo = keep ? 0x3C383000u + static_cast<uint32_t>(s) * 0x08080800u : 0u;
  hi = keep ? 0x4C484440u + static_cast<uint32_t>(s) * 0x08080808u : 0u;
}
// 4 code bytes (8 nibbles; the low nibble of byte b is element 2b) -> e4m3 of the low nibbles (elements 0, 2, 4, 6)
// and of the high nibbles (1, 3, 5, 7): magnitudes by prmt lookups in the block's 8-byte table, signs OR-ed in
__device__ __forceinline__ void fp4x8_to_e4m3(uint32_t w, uint32_t lut_lo, uint32_t lut_hi, uint32_t& klo,
                                              uint32_t& khi) {
  const uint32_t m = w & 0x77777777u;
  const uint32_t s4 = m >> 4, s8 = m >> 8;
  uint32_t ylo, yhi, sl, sh, ml, mh;
  asm("lop3.b32 %0, %1, %2, 0x0F0F0F0F, 0xE4;\n" : "=r"(ylo) : "r"(m), "r"(s4));   // nibbles L0 L1 . . L2 L3
  asm("lop3.b32 %0, %1, %2, 0x0F0F0F0F, 0xE4;\n" : "=r"(yhi) : "r"(s4), "r"(s8));  // nibbles H0 H1 . . H2 H3
  asm("prmt.b32 %0, %1, %1, 0x3320;\n" : "=r"(sl) : "r"(ylo));
  asm("prmt.b32 %0, %1, %1, 0x3320;\n" : "=r"(sh) : "r"(yhi));
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(ml) : "r"(lut_lo), "r"(lut_hi), "r"(sl));
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(mh) : "r"(lut_lo), "r"(lut_hi), "r"(sh));
  klo = ml | ((w << 4) & 0x80808080u);
  khi = mh | (w & 0x80808080u);
}

// monotone uint32 of an fp32 score (NaN -> -inf, -0 -> +0); every visible key is > 0, 0 marks "not visible"
__device__ __forceinline__ uint32_t order_key(float s) {
  if (s != s) s = __int_as_float(0xFF800000);
  if (s == 0.0f) s = 0.0f;
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ long long pack_key(uint32_t k, int t) {
  return (static_cast<long long>(static_cast<int>(k ^ 0x80000000u)) << 32) |
         static_cast<long long>(static_cast<uint32_t>(~t));
}

__device__ __forceinline__ int load_index(const void* p, int i, int is64) {
  if (is64) {
    const long long v = static_cast<const long long*>(p)[i];
    return v < -1 ? -1 : (v > 0x7FFFFFFF ? 0x7FFFFFFF : static_cast<int>(v));
  }
  return static_cast<const int*>(p)[i];
}

// ---------------------------------------------------------------------------------------------- loader
__device__ __forceinline__ void loader(const IdxParams& p, uint8_t* sm, const Layout& L, int c_lo, int c_hi,
                                       int ntiles) {
  const int lane = threadIdx.x & 31;
  const int PS = p.page_size;
  const int pi0 = c_lo / PS;
  const int* pt = reinterpret_cast<const int*>(sm + L.pt);
  unsigned long long* masks = reinterpret_cast<unsigned long long*>(sm + L.masks);
  const uint32_t ring = smem_u32(sm + L.ring);
  for (int j = 0; j < ntiles; ++j) {
    const int s = j % kStages;
    const uint32_t full = smem_u32(sm + L.full + s * 8);
    if (j >= kStages) mbar_wait(smem_u32(sm + L.empty + s * 8), ((j / kStages) - 1) & 1);
    const int t0 = c_lo + j * kBN;
    const int tend = min(t0 + kBN, c_hi);
    // presence of entries t0 + lane, t0 + 32 + lane
    const int e0 = t0 + lane, e1 = t0 + 32 + lane;
    const bool v0 = e0 < tend && pt[e0 / PS - pi0] >= 0;
    const bool v1 = e1 < tend && pt[e1 / PS - pi0] >= 0;
    const unsigned m0 = __ballot_sync(0xFFFFFFFFu, v0), m1 = __ballot_sync(0xFFFFFFFFu, v1);
    // lane k copies the k-th page the tile overlaps: entries [a, b) of logical page lp
    const int lp = t0 / PS + lane;
    const int a = max(t0, lp * PS);
    const int b = min(tend, (lp + 1) * PS);
    const int pg = (a < b) ? pt[lp - pi0] : -1;
    const int n = (b - a + 3) & ~3;  // a whole number of 16-byte scale groups (stays inside the page and tile)
    const uint32_t bytes = (a < b && pg >= 0) ? static_cast<uint32_t>(n * (kRowBytes + 4)) : 0u;
    uint32_t total = bytes;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xFFFFFFFFu, total, o);
    if (lane == 0) {
      masks[s] = static_cast<unsigned long long>(m0) | (static_cast<unsigned long long>(m1) << 32);
      mbar_arrive_expect_tx(full, total);
    }
    __syncwarp();
    if (bytes) {
      const uint8_t* page = p.cache + static_cast<int64_t>(pg) * p.page_bytes;
      const int off = a - lp * PS;
      const uint32_t dst = ring + s * kStageBytes;
      bulk_load(dst + (a - t0) * kRowBytes, page + static_cast<int64_t>(off) * kRowBytes, n * kRowBytes, full);
      bulk_load(dst + kBN * kRowBytes + (a - t0) * 4, page + static_cast<int64_t>(PS) * kRowBytes + off * 4, n * 4,
                full);
    }
  }
}

// ---------------------------------------------------------------------------------------------- consumers
// The thread's A fragments of one tile (rows g, g+8; k32 step st: regs 4st..4st+3) and what the epilogue needs.
struct TileA {
  uint32_t a[16];
  float ks0, ks1;   // 2^(m - 133) of rows g, g+8 (NaN for an e8m0 NaN scale)
  bool in0, in1;    // visible
};

__device__ __forceinline__ void row_lut(uint32_t sw, int blk, uint32_t& lo, uint32_t& hi, float& ks) {
  uint32_t t = __vmaxu4(sw, sw >> 16);
  t = __vmaxu4(t, t >> 8);
  const int mx = static_cast<int>(t & 0xFF);
  const int eb = static_cast<int>((sw >> (8 * blk)) & 0xFF);
  e4m3_lut(6 - (mx - eb), lo, hi);
  // 2^(mx - 133) exactly: a normal float from mx >= 7, else 2^(mx + 20 - 127) * 2^-26 (a subnormal or 2^-133)
  const float p2 = __uint_as_float(static_cast<uint32_t>(mx >= 7 ? mx - 6 : mx + 20) << 23);
  ks = mx == 255 ? __int_as_float(0x7FC00000) : (mx >= 7 ? p2 : p2 * 1.4901161193847656e-08f);
}

__device__ __forceinline__ void load_tile(uint8_t* sm, const Layout& L, int j, TileA& A) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = warp * 16 + (lane >> 2), blk = lane & 3;
  const int s = j % kStages;
  mbar_wait(smem_u32(sm + L.full + s * 8), (j / kStages) & 1);
  const uint32_t raw = smem_u32(sm + L.ring + s * kStageBytes);
  const uint4 r0 = lds128(raw + g * kRowBytes + blk * 16);
  const uint4 r1 = lds128(raw + (g + 8) * kRowBytes + blk * 16);
  const uint32_t sw0 = lds32(raw + kBN * kRowBytes + g * 4);
  const uint32_t sw1 = lds32(raw + kBN * kRowBytes + (g + 8) * 4);
  const unsigned long long mask = *reinterpret_cast<const volatile unsigned long long*>(sm + L.masks + s * 8);
  A.in0 = (mask >> g) & 1;
  A.in1 = (mask >> (g + 8)) & 1;
  uint32_t lo0, hi0, lo1, hi1;
  row_lut(sw0, blk, lo0, hi0, A.ks0);
  row_lut(sw1, blk, lo1, hi1, A.ks1);
  const uint32_t w0[4] = {r0.x, r0.y, r0.z, r0.w}, w1[4] = {r1.x, r1.y, r1.z, r1.w};
#pragma unroll
  for (int st = 0; st < 4; ++st) {
    fp4x8_to_e4m3(w0[st], lo0, hi0, A.a[4 * st + 0], A.a[4 * st + 2]);
    fp4x8_to_e4m3(w1[st], lo1, hi1, A.a[4 * st + 1], A.a[4 * st + 3]);
  }
  mbar_arrive(smem_u32(sm + L.empty + s * 8));  // this thread's reads of the stage are done (every thread arrives)
}

// the accumulator is read only after the wait: these empty asm statements keep the compiler from hoisting the reads
template <int H>
__device__ __forceinline__ void fence_acc(float* acc) {
#pragma unroll
  for (int i = 0; i < H / 2; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

template <int H>
__device__ __forceinline__ void issue_mma(float* acc, const TileA& A, uint64_t qdesc) {
  wgmma_fence();
#pragma unroll
  for (int st = 0; st < 4; ++st) Wgmma<H>::run(acc, A.a + 4 * st, qdesc + ((st * 32) >> 4), st);
  wgmma_commit();
}

template <int H>
__device__ __forceinline__ void epilogue(float* acc, const TileA& A, const float* wc, uint32_t* scores, int j) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = warp * 16 + (lane >> 2);
  float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
  for (int n = 0; n < H / 8; ++n) {
    s0 = fmaf(relu_nan(acc[4 * n + 0]), wc[2 * n + 0], s0);
    s0 = fmaf(relu_nan(acc[4 * n + 1]), wc[2 * n + 1], s0);
    s1 = fmaf(relu_nan(acc[4 * n + 2]), wc[2 * n + 0], s1);
    s1 = fmaf(relu_nan(acc[4 * n + 3]), wc[2 * n + 1], s1);
  }
  s0 += __shfl_xor_sync(0xFFFFFFFFu, s0, 1);
  s1 += __shfl_xor_sync(0xFFFFFFFFu, s1, 1);
  s0 += __shfl_xor_sync(0xFFFFFFFFu, s0, 2);
  s1 += __shfl_xor_sync(0xFFFFFFFFu, s1, 2);
  if ((lane & 3) == 0) scores[j * kBN + g] = A.in0 ? order_key(s0 * A.ks0) : 0u;
  if ((lane & 3) == 1) scores[j * kBN + g + 8] = A.in1 ? order_key(s1 * A.ks1) : 0u;
}

template <int H>
__device__ __forceinline__ void consumer(uint8_t* sm, const Layout& L, int ntiles) {
  const int lane = threadIdx.x & 31;
  const float* weff = reinterpret_cast<const float*>(sm + L.weff);
  float wc[H / 4];  // weights of the thread's accumulator columns 8n + 2 (lane % 4) + {0, 1}
#pragma unroll
  for (int n = 0; n < H / 8; ++n) {
    wc[2 * n] = weff[8 * n + 2 * (lane & 3)];
    wc[2 * n + 1] = weff[8 * n + 2 * (lane & 3) + 1];
  }
  uint32_t* scores = reinterpret_cast<uint32_t*>(sm + L.scores);
  const uint64_t qdesc = sw128_desc(smem_u32(sm + L.q), 0, 1024);  // K-major: rows of 128 bytes
  float acc[H / 2];
#pragma unroll
  for (int i = 0; i < H / 2; ++i) acc[i] = 0.0f;
  TileA A0, A1;
  load_tile(sm, L, 0, A0);
  // two tiles per trip so the fragments of the tile in flight and of the next one stay in fixed registers
  // (no `break` in the loop: it makes ptxas serialise the wgmma pipeline)
  for (int j = 0; j < ntiles; j += 2) {
    issue_mma<H>(acc, A0, qdesc);
    if (j + 1 < ntiles) load_tile(sm, L, j + 1, A1);
    wgmma_wait0();
    fence_acc<H>(acc);
    epilogue<H>(acc, A0, wc, scores, j);
    if (j + 1 < ntiles) {
      issue_mma<H>(acc, A1, qdesc);
      if (j + 2 < ntiles) load_tile(sm, L, j + 2, A0);
      wgmma_wait0();
      fence_acc<H>(acc);
      epilogue<H>(acc, A1, wc, scores, j + 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------- selection
// Top M of the chunk's keys (scores[0, nt)), sorted descending, into lists[row, 0..M).
__device__ void select_topk(uint8_t* sm, const Layout& L, int nt, int c_lo, int M, long long* out) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t* keys = reinterpret_cast<const uint32_t*>(sm + L.scores);
  int* hist = reinterpret_cast<int*>(sm + L.hist);
  int* misc = reinterpret_cast<int*>(sm + L.misc);
  long long* cand = reinterpret_cast<long long*>(sm + L.ring);
  if (tid < 16) misc[tid] = tid == 6 ? -1 : 0;  // misc[5] / [6]: running max / min (unsigned) of a pass
  __syncthreads();
  int v = 0;
  for (int i = tid; i < nt; i += kThreads) v += keys[i] != 0u;
  atomicAdd(&misc[0], v);
  __syncthreads();
  const int visible = misc[0];
  // The cut: the keys above [rlo, rhi] are in; of those inside, all (all_in) or, when the range has narrowed to
  // one value, the first `need` by entry. Radix passes over the live range: 256 bins of (k - min) >> shift, the
  // shift fitted to max - min, so keys of similar scores (whose top bytes all agree) still spread over the bins.
  uint32_t rlo = 1u, rhi = 0xFFFFFFFFu;  // every visible key (> 0)
  int need = 0;
  bool all_in = true;
  if (visible > M) {
    need = M;
    all_in = false;
    for (int pass = 0; pass < 8; ++pass) {
      uint32_t mn = 0xFFFFFFFFu, mx = 0u;
      for (int i = tid; i < nt; i += kThreads) {
        const uint32_t k = keys[i];
        if (k >= rlo && k <= rhi) {
          mn = min(mn, k);
          mx = max(mx, k);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        mn = min(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, o));
        mx = max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
      }
      for (int i = tid; i < kRadixBins; i += kThreads) hist[i] = 0;
      if (lane == 0) {
        atomicMax(reinterpret_cast<unsigned*>(&misc[5]), mx);
        atomicMin(reinterpret_cast<unsigned*>(&misc[6]), mn);
      }
      __syncthreads();
      mn = static_cast<uint32_t>(misc[6]);
      mx = static_cast<uint32_t>(misc[5]);
      const uint32_t span = mx - mn;
      const int shift = span == 0u ? 0 : max(0, 32 - __clz(span) - 8);
      for (int i = tid; i < nt; i += kThreads) {
        const uint32_t k = keys[i];
        if (k >= mn && k <= mx && k >= rlo && k <= rhi) atomicAdd(&hist[(k - mn) >> shift], 1);
      }
      __syncthreads();
      if (warp == 0) {
        // lane l sums bins 255 - 8l .. 248 - 8l (from the top); exclusive prefix over the lanes
        int local = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) local += hist[255 - 8 * lane - i];
        int incl = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
          if (lane >= o) incl += y;
        }
        const int before = incl - local;
        if (before < need && need <= incl) {
          int above = before;
          for (int i = 0; i < 8; ++i) {
            const int bin = 255 - 8 * lane - i;
            const int c = hist[bin];
            if (above + c >= need) {
              misc[1] = bin;
              misc[2] = above;
              misc[3] = c;
              break;
            }
            above += c;
          }
        }
      }
      __syncthreads();
      const int bin = misc[1], above = misc[2], cnt = misc[3];
      rlo = mn + (static_cast<uint32_t>(bin) << shift);
      rhi = static_cast<uint32_t>(min(static_cast<unsigned long long>(mx),
                                      static_cast<unsigned long long>(rlo) + (1ull << shift) - 1ull));
      need -= above;
      if (tid == 0) {
        misc[5] = 0;   // running max / min of the next pass
        misc[6] = -1;
      }
      __syncthreads();  // misc / hist are rewritten by the next pass
      if (cnt == need) {
        all_in = true;
        break;
      }
      if (shift == 0) break;  // one key value; the first `need` of its entries
    }
  }
  // candidates: keys above the range by an atomic counter from 0; keys inside it after them in entry order
  const int n_above = visible > M ? M - need : visible;
  if (!all_in) {
    // ordered scan of the keys equal to the cut value rlo: thread tid owns entries [tid * per, (tid + 1) * per)
    const int per = (nt + kThreads - 1) / kThreads;
    const int lo = tid * per, hi = min(lo + per, nt);
    int c = 0;
    for (int i = lo; i < hi; ++i) c += keys[i] == rlo;
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) hist[warp] = incl;
    __syncthreads();
    int rank = incl - c;
    for (int w = 0; w < warp; ++w) rank += hist[w];
    for (int i = lo; i < hi && rank < need; ++i) {
      if (keys[i] == rlo) {
        cand[n_above + rank] = pack_key(rlo, c_lo + i);
        ++rank;
      }
    }
  }
  for (int i = tid; i < nt; i += kThreads) {
    const uint32_t k = keys[i];
    if (k > rhi || (all_in && k >= rlo)) cand[atomicAdd(&misc[4], 1)] = pack_key(k, c_lo + i);
  }
  __syncthreads();
  const int filled = visible > M ? M : visible;
  for (int i = filled + tid; i < M; i += kThreads) cand[i] = kSent;
  __syncthreads();
  // bitonic sort, descending
  for (int size = 2; size <= M; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (M >> 1); i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const long long x = cand[lo], y = cand[hi];
        const bool desc = (lo & size) == 0;
        if ((x < y) == desc) {
          cand[lo] = y;
          cand[hi] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i < M; i += kThreads) out[i] = cand[i];
}

// ---------------------------------------------------------------------------------------------- merge
// One CTA per query token: the top-k of the union of its chunk lists, sorted, -> indices, length, KV rows. Radix
// select over the candidates as they stream from L2 (each pass reads them again; 256 bins over the live 64-bit
// key range). A chunk whose list is full and whose last (smallest) listed key reaches the cut may hide more
// winners: a second round adds its other keys at or above that cut from the score workspace (exact: every key
// at or above the first cut is then a candidate, and the final cut is not below the first).
struct MergeParams {
  const long long* lists;  // [T, splits, M], sorted descending, SENT padded
  const int* ws;           // [T, n_entries] or null
  int* idx;                // [T, topk]
  int* lengths;            // [T]
  int* rows;               // [T, topk] or null
  const void* seq;
  const void* pos;
  const int* kvbt;         // [kv_B, kv_max_pages]
  int T, B, n_entries, splits, chunk, M, topk, KP;
  int kv_B, kv_max_pages, kv_page_size;
  int seq_i64, pos_i64;
};

constexpr int kMergeThreads = 256;
constexpr int kMaxKP = 2048;
constexpr int kSatBits = 4096;  // lists tracked one by one; beyond, every full list counts as saturated

__device__ __forceinline__ unsigned long long ukey(long long x) {  // order-preserving unsigned view
  return static_cast<unsigned long long>(x) ^ 0x8000000000000000ull;
}

constexpr int kMergeCandCap = 12288;  // listed candidates kept in shared memory (96 KB); more stream from L2

struct MergeShared {
  unsigned long long top[kMaxKP];
  unsigned long long wmin[kMergeThreads / 32], wmax[kMergeThreads / 32];
  int hist[kRadixBins];
  unsigned sat[kSatBits / 32];
  int misc[8];
};

// calls f(ukey) for every candidate: the listed keys of chunks [0, n_lists) and, in round 2, the workspace keys
// of saturated chunks below their list's last key
template <typename F>
__device__ __forceinline__ void for_each_candidate(const MergeParams& p, const MergeShared& sh,
                                                   const unsigned long long* cand, int r, int n_lists, int lim,
                                                   bool round2, F f) {
  const long long* lists = p.lists + static_cast<int64_t>(r) * p.splits * p.M;
  const int total = n_lists * p.M;
  if (cand != nullptr) {  // staged in shared memory (0 = SENT)
    for (int i = threadIdx.x; i < total; i += kMergeThreads) {
      const unsigned long long u = cand[i];
      if (u != 1ull) f(u);
    }
  } else {
    for (int i = threadIdx.x; i < total; i += kMergeThreads) {
      const long long x = lists[i];
      if (x != kSent) f(ukey(x));
    }
  }
  if (!round2) return;
  for (int sidx = 0; sidx < n_lists; ++sidx) {
    const bool sat = sidx < kSatBits ? ((sh.sat[sidx >> 5] >> (sidx & 31)) & 1u) : (lists[sidx * p.M + p.M - 1] != kSent);
    if (!sat) continue;
    const unsigned long long last = ukey(lists[sidx * p.M + p.M - 1]);
    const int lo = sidx * p.chunk, hi = min(lo + p.chunk, lim);
    for (int t = lo + threadIdx.x; t < hi; t += kMergeThreads) {
      const int sk = p.ws[static_cast<int64_t>(r) * p.n_entries + t];
      if (sk == static_cast<int>(0x80000000u)) continue;
      const unsigned long long u = ukey(pack_key(static_cast<uint32_t>(sk) ^ 0x80000000u, t));
      if (u < last) f(u);
    }
  }
}

// the smallest key of the `need` largest candidates (0 when there are at most `need`: take them all)
__device__ unsigned long long merge_cut(const MergeParams& p, MergeShared& sh, const unsigned long long* cand, int r,
                                        int n_lists, int lim, bool round2, int need) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned long long rlo = 0ull, rhi = ~0ull;
  for (int pass = 0; pass < 10; ++pass) {
    // count, min and max of the candidates in [rlo, rhi]
    unsigned long long mn = ~0ull, mx = 0ull;
    int cnt = 0;
    for_each_candidate(p, sh, cand, r, n_lists, lim, round2, [&](unsigned long long u) {
      if (u >= rlo && u <= rhi) {
        mn = min(mn, u);
        mx = max(mx, u);
        ++cnt;
      }
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mn = min(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, o));
      mx = max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
      cnt += __shfl_xor_sync(0xFFFFFFFFu, cnt, o);
    }
    for (int i = tid; i < kRadixBins; i += kMergeThreads) sh.hist[i] = 0;
    if (lane == 0) {
      sh.wmin[warp] = mn;
      sh.wmax[warp] = mx;
    }
    if (tid == 0) sh.misc[4] = 0;
    __syncthreads();
    if (lane == 0) atomicAdd(&sh.misc[4], cnt);
    mn = ~0ull;
    mx = 0ull;
    for (int w = 0; w < kMergeThreads / 32; ++w) {
      mn = min(mn, sh.wmin[w]);
      mx = max(mx, sh.wmax[w]);
    }
    __syncthreads();
    const int in_range = sh.misc[4];
    if (pass == 0 && in_range <= need) return 0ull;  // everything is in
    if (in_range == need) return mn;                  // all keys of the range are in
    const unsigned long long span = mx - mn;
    const int shift = span == 0ull ? 0 : max(0, 64 - __clzll(span) - 8);
    for_each_candidate(p, sh, cand, r, n_lists, lim, round2, [&](unsigned long long u) {
      if (u >= mn && u <= mx) atomicAdd(&sh.hist[(u - mn) >> shift], 1);
    });
    __syncthreads();
    if (warp == 0) {
      int local = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) local += sh.hist[255 - 8 * lane - i];
      int incl = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o) incl += y;
      }
      const int before = incl - local;
      if (before < need && need <= incl) {
        int above = before;
        for (int i = 0; i < 8; ++i) {
          const int bin = 255 - 8 * lane - i;
          const int c = sh.hist[bin];
          if (above + c >= need) {
            sh.misc[1] = bin;
            sh.misc[2] = above;
            sh.misc[3] = c;
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    const int bin = sh.misc[1], above = sh.misc[2], c = sh.misc[3];
    __syncthreads();
    rlo = mn + (static_cast<unsigned long long>(bin) << shift);
    rhi = shift == 0 ? rlo : min(mx, rlo + ((1ull << shift) - 1ull));
    need -= above;
    if (c == need || shift == 0) return rlo;  // keys are distinct: at shift 0 the bin is one key
  }
  return rlo;
}

__global__ void __launch_bounds__(kMergeThreads) indexer_merge_kernel(const __grid_constant__ MergeParams p) {
  __shared__ MergeShared sh;
  extern __shared__ unsigned long long cand_smem[];
  const int r = blockIdx.x, tid = threadIdx.x;
  const int seq = load_index(p.seq, r, p.seq_i64);
  const long long pos = p.pos_i64 ? static_cast<const long long*>(p.pos)[r] : static_cast<const int*>(p.pos)[r];
  long long lim64 = pos < 0 ? 0 : (pos + 1) / 4;
  if (lim64 > p.n_entries) lim64 = p.n_entries;
  if (seq < 0 || seq >= p.B) lim64 = 0;
  const int lim = static_cast<int>(lim64);
  const int n_lists = (lim + p.chunk - 1) / p.chunk;
  const long long* lists = p.lists + static_cast<int64_t>(r) * p.splits * p.M;
  // stage the listed candidates in shared memory when they fit (the radix passes read them several times)
  const unsigned long long* cand = nullptr;
  if (p.splits * p.M <= kMergeCandCap) {
    for (int i = tid; i < n_lists * p.M; i += kMergeThreads) cand_smem[i] = ukey(lists[i]);  // SENT -> 1
    cand = cand_smem;
    __syncthreads();
  }
  unsigned long long cut = merge_cut(p, sh, cand, r, n_lists, lim, false, p.topk);
  if (p.ws != nullptr) {
    // chunks whose whole list is at or above the cut may hide more winners
    for (int i = tid; i < kSatBits / 32; i += kMergeThreads) sh.sat[i] = 0u;
    if (tid == 0) sh.misc[5] = 0;
    __syncthreads();
    for (int sidx = tid; sidx < n_lists; sidx += kMergeThreads) {
      const long long last = lists[sidx * p.M + p.M - 1];
      if (last != kSent && ukey(last) >= cut) {
        if (sidx < kSatBits) atomicOr(&sh.sat[sidx >> 5], 1u << (sidx & 31));
        sh.misc[5] = 1;
      }
    }
    __syncthreads();
    if (sh.misc[5]) cut = merge_cut(p, sh, cand, r, n_lists, lim, true, p.topk);
  }
  // gather the keys at or above the cut (at most top-k: keys are distinct), sort them descending
  if (tid == 0) sh.misc[6] = 0;
  for (int i = tid; i < p.KP; i += kMergeThreads) sh.top[i] = 0ull;
  __syncthreads();
  for_each_candidate(p, sh, cand, r, n_lists, lim, p.ws != nullptr && sh.misc[5], [&](unsigned long long u) {
    if (u >= cut) {
      const int slot = atomicAdd(&sh.misc[6], 1);
      if (slot < p.KP) sh.top[slot] = u;
    }
  });
  __syncthreads();
  const int count = min(sh.misc[6], p.topk);
  for (int size = 2; size <= p.KP; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (p.KP >> 1); i += kMergeThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const unsigned long long x = sh.top[lo], y = sh.top[hi];
        if ((x < y) == ((lo & size) == 0)) {
          sh.top[lo] = y;
          sh.top[hi] = x;
        }
      }
      __syncthreads();
    }
  }
  const int64_t base = static_cast<int64_t>(r) * p.topk;
  for (int i = tid; i < p.topk; i += kMergeThreads) {
    int t = -1;
    if (i < count) t = static_cast<int>(~static_cast<uint32_t>(sh.top[i] & 0xFFFFFFFFull));
    p.idx[base + i] = t;
    if (p.rows != nullptr) {
      int row = -1;
      if (t >= 0 && seq >= 0 && seq < p.kv_B) {
        const int pidx = t / p.kv_page_size;
        if (pidx < p.kv_max_pages) {
          const int page = p.kvbt[static_cast<int64_t>(seq) * p.kv_max_pages + pidx];
          if (page >= 0) row = page * p.kv_page_size + (t - pidx * p.kv_page_size);
        }
      }
      p.rows[base + i] = row;
    }
  }
  if (tid == 0) p.lengths[r] = count;
}

// ---------------------------------------------------------------------------------------------- kernel
template <int H>
__global__ void __launch_bounds__(kThreads, H <= 64 ? 3 : 2) indexer_topk_fp4_kernel(const __grid_constant__ IdxParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* sm = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-aligned, still shared-space
  const Layout L = make_layout(H, p.chunk, p.npt);
  const int tok = static_cast<int>(blockIdx.x / p.splits);
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const int seq = load_index(p.seq, tok, p.seq_i64);
  const long long pos = p.pos_i64 ? static_cast<const long long*>(p.pos)[tok] : static_cast<const int*>(p.pos)[tok];
  long long lim = pos < 0 ? 0 : (pos + 1) / 4;
  if (lim > p.n_entries) lim = p.n_entries;
  if (seq < 0 || seq >= p.B) lim = 0;
  const int c_lo = split * p.chunk;
  if (c_lo >= lim) return;  // the merge reads no list of this chunk
  const int c_hi = static_cast<int>(min(static_cast<long long>(c_lo + p.chunk), lim));
  const int ntiles = (c_hi - c_lo + kBN - 1) / kBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- setup: barriers, the chunk's page ids, Q (e4m3, per-head power of two, k permuted) and head weights
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_u32(sm + L.full + s * 8), 1);
      mbar_init(smem_u32(sm + L.empty + s * 8), 128);  // the consumer threads
    }
  }
  {
    const int PS = p.page_size;
    const int pi0 = c_lo / PS, pi1 = (c_hi - 1) / PS;
    int* pt = reinterpret_cast<int*>(sm + L.pt);
    const int* bt_row = p.bt + static_cast<int64_t>(seq) * p.max_pages;
    for (int i = tid; i <= pi1 - pi0; i += kThreads) {
      const int lp = pi0 + i;
      const int pg = lp < p.max_pages ? bt_row[lp] : -1;
      pt[i] = (pg >= 0 && pg < p.num_pages) ? pg : -1;
    }
  }
  if (warp < 4) {
    // warp w converts heads w, w + 4, ..., 8 at a time: their 8-byte pieces are loaded first (one memory latency
    // per 8 heads, not per head)
    uint8_t* qs = sm + L.q;
    float* weff = reinterpret_cast<float*>(sm + L.weff);
    constexpr int kBatch = H / 4 < 8 ? H / 4 : 8;
#pragma unroll 1
    for (int h0 = warp; h0 < H; h0 += 4 * kBatch) {
      uint2 raw[kBatch];
      float wv[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t row = static_cast<int64_t>(tok) * H + h0 + 4 * i;
        raw[i] = *reinterpret_cast<const uint2*>(p.q + row * 128 + 4 * lane);
        wv[i] = p.w_f32 ? static_cast<const float*>(p.w)[row] : __bfloat162float(static_cast<const __nv_bfloat16*>(p.w)[row]);
      }
#pragma unroll
      for (int hi = 0; hi < kBatch; ++hi) {
        const int h = h0 + 4 * hi;
        float x[4];
        x[0] = __uint_as_float(raw[hi].x << 16);
        x[1] = __uint_as_float(raw[hi].x & 0xFFFF0000u);
        x[2] = __uint_as_float(raw[hi].y << 16);
        x[3] = __uint_as_float(raw[hi].y & 0xFFFF0000u);
        float amax = fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])), fmaxf(fabsf(x[2]), fabsf(x[3])));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
        int qexp = static_cast<int>((__float_as_uint(amax) >> 23) & 0xFF) - 127;
        qexp = min(max(qexp, -100), 100);
        const float up = __uint_as_float(static_cast<uint32_t>(134 - qexp) << 23);  // 2^(7 - E_h): |q| < 2^8
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int e = 4 * lane + i;  // element e sits at k = 32 st + c of the fragment order (file comment)
          const int tq = e >> 5, st = (e >> 3) & 3, r = e & 7;
          const int kb = 32 * st + (r & 1) * 16 + tq * 4 + (r >> 1);
          const __nv_fp8_e4m3 f8(x[i] * up);  // round to nearest, saturating
          qs[h * 128 + ((((kb >> 4) ^ (h & 7))) << 4) + (kb & 15)] = f8.__x;
        }
        if (lane == 0) weff[h] = wv[hi] * __uint_as_float(static_cast<uint32_t>(qexp + 120) << 23);  // w * 2^(E_h - 7)
      }
    }
    fence_proxy_async();  // Q stores -> visible to wgmma
  }
  __syncthreads();

  if (warp == 4) {
    loader(p, sm, L, c_lo, c_hi, ntiles);
  } else {
    consumer<H>(sm, L, ntiles);
  }
  __syncthreads();
  if (p.ws != nullptr) {  // the merge re-reads a chunk whose list of M may hide more winners
    const uint32_t* keys = reinterpret_cast<const uint32_t*>(sm + L.scores);
    for (int i = tid; i < min(p.chunk, p.n_entries - c_lo); i += kThreads)
      p.ws[static_cast<int64_t>(tok) * p.n_entries + c_lo + i] = static_cast<int>(((c_lo + i < c_hi) ? keys[i] : 0u) ^ 0x80000000u);
  }
  select_topk(sm, L, ntiles * kBN, c_lo, p.M, p.lists + (static_cast<int64_t>(tok) * p.splits + split) * p.M);
}

template <int H>
void launch(const IdxParams& p, cudaStream_t stream) {
  const Layout L = make_layout(H, p.chunk, p.npt);
  const int smem = L.total + 1024;
  const cudaError_t err = cudaFuncSetAttribute(indexer_topk_fp4_kernel<H>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("indexer_topk_fp4: cannot reserve ") + std::to_string(smem) +
                             " B of shared memory: " + cudaGetErrorString(err));
  }
  const long long grid = static_cast<long long>(p.T) * p.splits;
  indexer_topk_fp4_kernel<H><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  check_launch("indexer_topk_fp4_kernel");
}

}  // namespace

void indexer_topk_fp4_launch(const void* q, const void* w, int w_f32, const void* cache, int64_t num_pages,
                             int64_t page_bytes, int64_t page_size, const int* bt, int64_t B, int64_t max_pages, const void* seq,
                             int seq_i64, const void* pos, int pos_i64, int64_t T, int64_t H, int64_t n_entries,
                             int64_t chunk, int64_t splits, int64_t M, long long* lists, int* ws,
                             cudaStream_t stream) {
  if (T <= 0 || splits <= 0) return;
  if (chunk % kBN != 0 || chunk <= 0) throw std::invalid_argument("indexer_topk_fp4: chunk must be a positive multiple of 64");
  if (page_size % 4 != 0) throw std::invalid_argument("indexer_topk_fp4: page_size must be a multiple of 4");
  if (M < 16 || (M & (M - 1)) != 0 || M * 8 > kStages * kStageBytes)
    throw std::invalid_argument("indexer_topk_fp4: M must be a power of two in [16, 4096]");
  if (T * splits > 0x7FFFFFFFLL) throw std::invalid_argument("indexer_topk_fp4: too many (token, chunk) programs");
  IdxParams p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.w = w;
  p.cache = static_cast<const uint8_t*>(cache);
  p.bt = bt;
  p.seq = seq;
  p.pos = pos;
  p.lists = lists;
  p.ws = ws;
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(B);
  p.max_pages = static_cast<int>(max_pages);
  p.num_pages = static_cast<int>(num_pages);
  p.page_size = static_cast<int>(page_size);
  p.n_entries = static_cast<int>(n_entries);
  p.chunk = static_cast<int>(chunk);
  p.splits = static_cast<int>(splits);
  p.M = static_cast<int>(M);
  p.w_f32 = w_f32;
  p.seq_i64 = seq_i64;
  p.pos_i64 = pos_i64;
  p.npt = static_cast<int>(chunk / page_size + 2);
  p.page_bytes = page_bytes;
  switch (H) {
    case 16: launch<16>(p, stream); break;
    case 32: launch<32>(p, stream); break;
    case 64: launch<64>(p, stream); break;
    case 128: launch<128>(p, stream); break;
    default: throw std::invalid_argument("indexer_topk_fp4: heads must be 16, 32, 64 or 128");
  }
}

void indexer_merge_launch(const long long* lists, const int* ws, int64_t T, int64_t splits, int64_t M, int64_t chunk,
                          int64_t n_entries, int64_t topk, const void* seq, int seq_i64, const void* pos, int pos_i64,
                          int64_t B, const int* kvbt, int64_t kv_B, int64_t kv_max_pages, int64_t kv_page_size,
                          int* idx, int* lengths, int* rows, cudaStream_t stream) {
  if (T <= 0) return;
  int kp = 16;
  while (kp < topk) kp <<= 1;
  if (kp > kMaxKP) throw std::invalid_argument("indexer_merge: topk must be at most 2048");
  MergeParams p;
  p.lists = lists;
  p.ws = ws;
  p.idx = idx;
  p.lengths = lengths;
  p.rows = rows;
  p.seq = seq;
  p.pos = pos;
  p.kvbt = kvbt;
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(B);
  p.n_entries = static_cast<int>(n_entries);
  p.splits = static_cast<int>(splits);
  p.chunk = static_cast<int>(chunk);
  p.M = static_cast<int>(M);
  p.topk = static_cast<int>(topk);
  p.KP = kp;
  p.kv_B = static_cast<int>(kv_B);
  p.kv_max_pages = static_cast<int>(kv_max_pages);
  p.kv_page_size = static_cast<int>(kv_page_size);
  p.seq_i64 = seq_i64;
  p.pos_i64 = pos_i64;
  const int smem = splits * M <= kMergeCandCap ? static_cast<int>(splits * M * 8) : 0;
  const cudaError_t err = cudaFuncSetAttribute(indexer_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               kMergeCandCap * 8);
  if (err != cudaSuccess) throw std::runtime_error(std::string("indexer_merge: ") + cudaGetErrorString(err));
  indexer_merge_kernel<<<static_cast<unsigned>(T), kMergeThreads, smem, stream>>>(p);
  check_launch("indexer_merge_kernel");
}

}  // namespace v4k
