// mHC hc_pre (spec §7) reading the streams from HBM exactly once: a grid-wide split-K kernel whose CTAs keep
// their slice of X in shared memory until y is written.
//
// Reference: python/v4kernels/reference/mhc.py::mhc_pre. Per token, X [4, d] bf16 (K = 4d):
//   mix = (fn @ X) * rsqrt(mean(X^2) + norm_eps)          fn [24, K] fp32
//   pre = sigmoid(mix[0:4] s0 + b) + eps;  post = 2 sigmoid(mix[4:8] s1 + b);  C = Sinkhorn(mix[8:24] s2 + b)
//   y   = bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3)
//
// Why this shape: y needs pre, pre needs all 4d products of the token, and a token's 4d values do not fit
// next to fn in one SM. The previous kernel (one K slice per CTA, consumers re-reading X for y) read X about
// 1.8 times from HBM and ran at 45-51% of the copy bandwidth. Here the CHANNEL axis is split: CTA j owns
// channels [j CH, (j + 1) CH) of all 4 streams, so it can write y for those channels from its own copy.
//
// Grid: NC CTAs (one per channel slice, all resident: cooperative launch), 15 warps each. Tiles of 64 tokens;
// every CTA walks every tile, stage tile % R of an R-deep shared-memory ring.
// * warps 4-5, loaders: cp.async of the tile's 64 x 4 row pieces (CH bf16 each; tokens past T and channels
//   past d zero-filled) into the stage, arriving on its `full` mbarrier (cp.async.mbarrier.arrive.noinc).
// * warps 0-3, MMA: warp w takes tokens 16w..16w+15. Per stream, mma.sync m16n8k16 (k8 for a CH % 16 tail)
//   of x against the CTA's fn slice held as three exact bf16 parts (fn = b0 + b1 + b2, so every product is
//   exact in fp32), a fresh accumulator per stream added in IEEE fp32 (a long MMA chain accumulates with
//   truncation); Σx^2 from the A fragments. The 24 partial sums + Σx^2 of each token go to a global ring
//   (slot tile % R, [64 tokens][NC][32] fp32) and arrive on the stage's `mma_done`; warp 14, the releaser,
//   waits for it and does one release-add (red.release.gpu) per CTA on cnt1[tile] (target NC).
// * warps 6-9, reducers: CTA j reduces tokens j, j + NC, j + 2 NC, ... (warp r every 4th of them, in
//   order). Wait cnt1[tile] (acquire), sum the NC partials (lane 8g + q: float4 q of CTAs g, g + 4, ..., in
//   order, then (g0 + g1) + (g2 + g3)), pre and post; publish pre as four (value, flag) 8-byte pairs in a
//   zeroed buffer (each pair single-copy atomic: no fence, no counter); then the 20 Sinkhorn iterations
//   (lanes 16-31, C[i][j] on lane 16 + 4i + j) and comb, off the y critical path.
// * warps 10-13, y: warp w takes token rows 16w..16w+15 of every tile: wait the stage's `full`, poll its
//   tokens' pre pairs until every flag is set, write y for the CTA's channels, release the stage (`empty`,
//   all 128 y threads arrive).
// Deadlock freedom: every wait is on an earlier step of the same tile or on a tile R back; reducers and y
// warps take tiles in order; all CTAs are resident (cudaLaunchAttributeCooperative).
// The partial ring slot of tile t is rewritten for tile t + R only after this CTA's y warps finished tile t,
// i.e. after every token of t had its pre published, which each reducer stores after (and computed from)
// its reads of the slot.
// Measured (H100, bench gpu_check_full_20261124-093653): 51.1% / 55.4% of HBM at T = 65536 for d = 4096 / 7168
// (previous kernel 48.2 / 48.9%), faster than the Triton kernel at every T from 1. Bound by the cycle of a ring
// stage (loads -> MMA -> grid-wide reduction -> y, ~15-19 us with the spread across CTAs) over the 12 / 6 stages
// shared memory holds, not by HBM (scripts/profile_mhc.py --trace). Tried and dropped: an L2 prefetch of the
// tile's contiguous block P tiles ahead (slower at P = 2, 4, 8); wgmma m64n24k16 with both operands in shared
// memory instead of the four mma.sync warps (34-36%: the MMA became the bottleneck); one MMA warp per stream
// with its fn fragments in registers (a 7th stage at d = 7168) and the streams summed warp by warp through
// shared memory (38.9 / 52.8%: the serialised exchange cost more than the stage gained).
// Numerics: a token's outputs depend on (d, NC) only (not on T or the other tokens); repeated calls give the
// same bytes (no atomics on data). Non-contracted fp32 arithmetic (__fmul_rn / __fadd_rn) where the
// reference rounds each operation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/sm90.h"
#include "../common/stream.h"

namespace v4k {

namespace {

constexpr int kNMix = 24;
constexpr int kPartStride = 32;  // floats per (token, CTA) partial row: 24 mix sums, then Σx^2 at 24
constexpr int kTile = 64;        // tokens per tile
constexpr int kMmaWarps = 4, kLoadWarps = 2, kReduceWarps = 4, kYWarps = 4;
constexpr int kLoad0 = kMmaWarps, kReduce0 = kLoad0 + kLoadWarps, kY0 = kReduce0 + kReduceWarps;
constexpr int kRelease = kY0 + kYWarps;  // the warp that publishes the MMA warps' partials
constexpr int kWarps = kRelease + 1;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxStages = 16;

struct Params {
  const __nv_bfloat16* x;  // [T, 4, d]
  const float* fn;         // [24, 4d]
  const float* base;       // [24]
  const float* scale;      // [3]
  float* part;             // [R][64][NC][32]
  int* cnt;                // [n_tiles], zeroed: CTAs whose partials of the tile are written
  uint64_t* pre_flag;      // [T][4], zeroed: (pre bits, 1) pairs, written once per token by its reducer
  __nv_bfloat16* y;        // [T, d]
  float* post;             // [T, 4]
  float* comb;             // [T, 16]
  float* pre;              // [T, 4]
  int64_t* trace;          // nullptr, or [n_tiles][kTraceEvents + 2 NC] globaltimer stamps (profiling)
  int64_t T, d;
  int CH, NC, RS, R, n_tiles, iters;
  float norm_eps, hc_eps;
};

// 16 bytes global -> shared; src_bytes 0 zero-fills (rows past T, channels past d).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// arrive on `bar` once every earlier cp.async of this thread has landed (counts as one of the expected arrivals)
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t addr, uint32_t& r0) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(addr));
}

__device__ __forceinline__ void mma_k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Spin until *p >= target with a growing sleep (128 CTAs poll the same counter), on relaxed loads: an acquire
// load invalidates the whole L1 (CCTL.IVALL) each time, which ncu showed stalling the SM's other memory work.
// One acquire load once the count is reached orders the caller's later loads.
__device__ __forceinline__ void wait_count(const int* p, int target) {
  unsigned ns = 32;
  while (ld_relaxed(p) < target) {
    __nanosleep(ns);
    ns = ns < 256 ? 2 * ns : ns;
  }
  (void)ld_acquire(p);
}

__device__ __forceinline__ float sum_of_squares(uint32_t packed, float acc) {
  const float lo = __uint_as_float(packed << 16), hi = __uint_as_float(packed & 0xffff0000u);
  return fmaf(hi, hi, fmaf(lo, lo, acc));  // bf16 squares are exact in fp32: fma == mul + add here
}

__device__ __forceinline__ float sigmoid(float z) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z))); }

// Timeline of a tile for profiling (scripts/profile_mhc.py --trace): CTA 0's steps, and the steps of the
// reducer of the tile's first token. Events: 0 loads issued, 1 MMA start, 2 partials stored, 3 released,
// 4 reducer sees cnt1, 5 pre published, 6 Sinkhorn done, 7 y (warp 0) has its pre, 8 y (warp 0) done;
// then every CTA's "loads issued" (9 + 2 c) and "released" (10 + 2 c).
constexpr int kTraceEvents = 9;
__device__ __forceinline__ void trace_event(const Params& p, int tile, int ev) {
  if (p.trace == nullptr) return;
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  p.trace[int64_t(tile) * (kTraceEvents + 2 * p.NC) + ev] = int64_t(t);
}

__device__ __forceinline__ int tile_tokens(const Params& p, int tile) {
  const int64_t left = p.T - int64_t(tile) * kTile;
  return left < kTile ? int(left) : kTile;
}

// ------------------------------------------------------------------------------------------------
// Shared memory: fn_s [3 parts][24][RS] and the stages [R][64 tokens][RS], bf16, row = (stream, channel) at
// stream * CH + channel; RS = 4 CH + 8, an odd number of 16-byte chunks, so the 8 rows an ldmatrix reads hit
// 8 different bank groups. Then the full / empty mbarriers.
// ------------------------------------------------------------------------------------------------
struct Smem {
  __nv_bfloat16* fn;
  __nv_bfloat16* x;
  uint64_t* full;
  uint64_t* empty;
  uint64_t* mma_done;  // per stage: the MMA warps' partials of the tile are written
  float4* pre;         // [4 y warps][16]: each y warp's copy of its 16 tokens' pre weights
};

__device__ void loader(const Params& p, const Smem& s, int tid) {  // tid in [0, 64)
  const int c0 = blockIdx.x * p.CH;
  const int chunks = p.CH / 8;             // 16-byte pieces per (token, stream) row
  const int per_tile = kTile * 4 * chunks;  // pieces per tile
  const int step_ch = (32 * kLoadWarps) % chunks, step_rs = (32 * kLoadWarps) / chunks;
  for (int tile = 0; tile < p.n_tiles; ++tile) {
    const int st = tile % p.R;
    if (tile >= p.R) mbar_wait(s.empty + st, ((tile / p.R) - 1) & 1);
    if (tid == 0) {
      if (blockIdx.x == 0) trace_event(p, tile, 0);
      trace_event(p, tile, kTraceEvents + 2 * blockIdx.x);
    }
    __nv_bfloat16* stage = s.x + size_t(st) * kTile * p.RS;
    // piece e = tid + 64 k: chunk e % chunks of row-stream e / chunks (stream rs & 3 of token rs >> 2)
    int ch = tid % chunks, rs = tid / chunks;
    for (int e = tid; e < per_tile; e += 32 * kLoadWarps) {
      const int i = rs & 3, r = rs >> 2;
      const int64_t tok = int64_t(tile) * kTile + r;
      const int c = c0 + ch * 8;
      const bool ok = tok < p.T && c < p.d;
      const __nv_bfloat16* src = ok ? p.x + (tok * 4 + i) * p.d + c : p.x;
      cp_async16(smem_u32(stage + r * p.RS + i * p.CH + ch * 8), src, ok ? 16 : 0);
      ch += step_ch;
      rs += step_rs;
      if (ch >= chunks) {
        ch -= chunks;
        ++rs;
      }
    }
    cp_async_arrive(smem_u32(s.full + st));
  }
}

__device__ void mma_warp(const Params& p, const Smem& s, int warp, int lane) {
  const int a_row = lane & 15, a_half = lane >> 4;  // A x4: row lane % 16, k half lane / 16
  const int a8_row = lane & 15;                     // A x2 (k8): rows 0-15 at k 0-7
  const int b_row = lane & 7, b_mat = lane >> 3;    // B x4: matrix lane / 8 = (pair, k half), row lane % 8
  const int part_elems = kNMix * p.RS;
  const int k16 = p.CH / 16, tail8 = p.CH % 16;
  for (int tile = 0; tile < p.n_tiles; ++tile) {
    const int st = tile % p.R;
    mbar_wait(s.full + st, (tile / p.R) & 1);
    if (blockIdx.x == 0 && warp == 0 && lane == 0) trace_event(p, tile, 1);
    const __nv_bfloat16* xs = s.x + size_t(st) * kTile * p.RS + warp * 16 * p.RS;
    // One accumulator per stream (four independent MMA chains), fresh per tile, added in IEEE fp32 after.
    float blk[4][3][4], ssq0 = 0.f, ssq1 = 0.f;  // rows lane / 4 and lane / 4 + 8 of the warp's 16
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 3; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) blk[i][j][e] = 0.f;
    for (int kk = 0; kk < k16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = i * p.CH + kk * 16;
        uint32_t a[4];
        ldmatrix_x4(smem_u32(xs + a_row * p.RS + col + a_half * 8), a[0], a[1], a[2], a[3]);
        ssq0 = sum_of_squares(a[2], sum_of_squares(a[0], ssq0));
        ssq1 = sum_of_squares(a[3], sum_of_squares(a[1], ssq1));
        uint32_t bf[9][2];  // (part q, n tile j) at 3 q + j; pairs (0,1), (2,3), (4,5), (6,7) by x4, 8 by x2
#pragma unroll
        for (int pr = 0; pr < 4; ++pr) {
          const int f = 2 * pr + (b_mat >> 1);
          const __nv_bfloat16* src = s.fn + (f / 3) * part_elems + ((f % 3) * 8 + b_row) * p.RS + col + (b_mat & 1) * 8;
          ldmatrix_x4(smem_u32(src), bf[2 * pr][0], bf[2 * pr][1], bf[2 * pr + 1][0], bf[2 * pr + 1][1]);
        }
        ldmatrix_x2(smem_u32(s.fn + 2 * part_elems + (16 + b_row) * p.RS + col + (b_mat & 1) * 8), bf[8][0], bf[8][1]);
#pragma unroll
        for (int q = 0; q < 3; ++q)
#pragma unroll
          for (int j = 0; j < 3; ++j) mma_k16(blk[i][j], a, bf[3 * q + j][0], bf[3 * q + j][1]);
      }
    }
    if (tail8) {  // the last 8 channels of a CH % 16 == 8 slice
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = i * p.CH + k16 * 16;
        uint32_t a0, a1;
        ldmatrix_x2(smem_u32(xs + a8_row * p.RS + col), a0, a1);
        ssq0 = sum_of_squares(a0, ssq0);
        ssq1 = sum_of_squares(a1, ssq1);
        uint32_t bf[9];
#pragma unroll
        for (int pr = 0; pr < 2; ++pr) {  // x4: four (q, j) at 4 pr + lane / 8
          const int f = 4 * pr + b_mat;
          const __nv_bfloat16* src = s.fn + (f / 3) * part_elems + ((f % 3) * 8 + b_row) * p.RS + col;
          ldmatrix_x4(smem_u32(src), bf[4 * pr], bf[4 * pr + 1], bf[4 * pr + 2], bf[4 * pr + 3]);
        }
        ldmatrix_x1(smem_u32(s.fn + 2 * part_elems + (16 + b_row) * p.RS + col), bf[8]);
#pragma unroll
        for (int q = 0; q < 3; ++q)
#pragma unroll
          for (int j = 0; j < 3; ++j) mma_k8(blk[i][j], a0, a1, bf[3 * q + j]);
      }
    }
    float acc[3][4];  // ((stream 0 + stream 1) + stream 2) + stream 3
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc[j][e] = __fadd_rn(__fadd_rn(__fadd_rn(blk[0][j][e], blk[1][j][e]), blk[2][j][e]), blk[3][j][e]);
    ssq0 += __shfl_xor_sync(0xffffffffu, ssq0, 1);
    ssq0 += __shfl_xor_sync(0xffffffffu, ssq0, 2);
    ssq1 += __shfl_xor_sync(0xffffffffu, ssq1, 1);
    ssq1 += __shfl_xor_sync(0xffffffffu, ssq1, 2);
    const int r0 = warp * 16 + (lane >> 2), col = 2 * (lane & 3);
    float* row0 = p.part + ((int64_t(st) * kTile + r0) * p.NC + blockIdx.x) * kPartStride;
    float* row1 = row0 + int64_t(8) * p.NC * kPartStride;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      __stcg(reinterpret_cast<float2*>(row0 + 8 * j + col), make_float2(acc[j][0], acc[j][1]));
      __stcg(reinterpret_cast<float2*>(row1 + 8 * j + col), make_float2(acc[j][2], acc[j][3]));
    }
    if ((lane & 3) == 0) {
      __stcg(row0 + kNMix, ssq0);
      __stcg(row1 + kNMix, ssq1);
    }
    if (blockIdx.x == 0 && warp == 0 && lane == 0) trace_event(p, tile, 2);
    mbar_arrive(s.mma_done + st);  // the releaser publishes them (its fence does not hold up the next tile)
  }
}

// One release per CTA and tile on cnt1 once the 128 MMA threads' partial stores are done. A release is
// cumulative: their stores -> mbarrier arrive (release.cta) / wait (acquire.cta) -> red.release.gpu.
__device__ void releaser(const Params& p, const Smem& s, int lane) {
  for (int tile = 0; tile < p.n_tiles; ++tile) {
    const int st = tile % p.R;
    mbar_wait(s.mma_done + st, (tile / p.R) & 1);
    if (lane == 0) {
      red_release_add(p.cnt + tile, 1);
      if (blockIdx.x == 0) trace_event(p, tile, 3);
      trace_event(p, tile, kTraceEvents + 2 * blockIdx.x + 1);
    }
  }
}

__device__ void reducer(const Params& p, int rwarp, int lane) {
  const float sc = lane < 24 ? p.scale[lane < 4 ? 0 : (lane < 8 ? 1 : 2)] : 0.f;
  const float bs = lane < 24 ? p.base[lane] : 0.f;
  // lane = 8 g + q sums columns 4q..4q+3 of CTAs g, g + 4, g + 8, ... (in order); then (g0 + g1) + (g2 + g3)
  const int q = lane & 7, g = lane >> 3;
  for (int64_t t = blockIdx.x + int64_t(rwarp) * p.NC; t < p.T; t += int64_t(kReduceWarps) * p.NC) {
    const int tile = int(t / kTile), r = int(t - int64_t(tile) * kTile);
    if (lane == 0) {
      wait_count(p.cnt + tile, p.NC);
      if (r == 0) trace_event(p, tile, 4);
    }
    __syncwarp();  // orders the other lanes' loads after lane 0's acquire
    const float4* src = reinterpret_cast<const float4*>(p.part + (int64_t(tile % p.R) * kTile + r) * p.NC * kPartStride) +
                        g * (kPartStride / 4) + q;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
    for (int c = g; c < p.NC; c += 4, src += kPartStride) {
      const float4 u = __ldcg(src);
      a.x = __fadd_rn(a.x, u.x);
      a.y = __fadd_rn(a.y, u.y);
      a.z = __fadd_rn(a.z, u.z);
      a.w = __fadd_rn(a.w, u.w);
    }
#pragma unroll
    for (int m = 8; m <= 16; m *= 2) {  // a + b == b + a: both lanes of a pair hold the same sum
      a.x = __fadd_rn(a.x, __shfl_xor_sync(0xffffffffu, a.x, m));
      a.y = __fadd_rn(a.y, __shfl_xor_sync(0xffffffffu, a.y, m));
      a.z = __fadd_rn(a.z, __shfl_xor_sync(0xffffffffu, a.z, m));
      a.w = __fadd_rn(a.w, __shfl_xor_sync(0xffffffffu, a.w, m));
    }
    // column n (lane n, n <= 24: 24 = Σx^2) from lane n / 4, component n % 4
    const int from = (lane >> 2) & 7;
    const float vx = __shfl_sync(0xffffffffu, a.x, from), vy = __shfl_sync(0xffffffffu, a.y, from);
    const float vz = __shfl_sync(0xffffffffu, a.z, from), vw = __shfl_sync(0xffffffffu, a.w, from);
    const int comp = lane & 3;
    const float v = comp == 0 ? vx : (comp == 1 ? vy : (comp == 2 ? vz : vw));
    const float ssq = __shfl_sync(0xffffffffu, v, kNMix);
    const float rr = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ssq, float(4 * p.d)), p.norm_eps)));
    const float z = __fadd_rn(__fmul_rn(__fmul_rn(v, rr), sc), bs);
    const float sg = sigmoid(z);
    if (lane < 4) {  // the y warps of every CTA poll these pairs: value and flag in one 8-byte store, no fence
      const float pw = __fadd_rn(sg, p.hc_eps);
      p.pre[t * 4 + lane] = pw;
      const uint64_t pair = uint64_t(__float_as_uint(pw)) | (uint64_t(1) << 32);
      asm volatile("st.relaxed.gpu.global.b64 [%0], %1;\n" ::"l"(p.pre_flag + t * 4 + lane), "l"(pair) : "memory");
    }
    if (lane >= 4 && lane < 8) p.post[t * 4 + lane - 4] = __fmul_rn(2.0f, sg);
    __syncwarp();
    if (lane == 0) {
      if (r == 0) trace_event(p, tile, 5);
    }

    // Sinkhorn on lanes 16-31: C[i][j] = z[8 + 4 i + j] on lane 16 + 4 i + j
    float c = __shfl_sync(0xffffffffu, z, (lane - 8) & 31);
    float m = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    float e = expf(__fadd_rn(c, -m));
    float rs = __fadd_rn(e, __shfl_xor_sync(0xffffffffu, e, 1));
    rs = __fadd_rn(rs, __shfl_xor_sync(0xffffffffu, rs, 2));
    c = __fadd_rn(__fdiv_rn(e, rs), p.hc_eps);
    float cs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 4));
    cs = __fadd_rn(cs, __shfl_xor_sync(0xffffffffu, cs, 8));
    c = __fdiv_rn(c, __fadd_rn(cs, p.hc_eps));
    for (int it = 1; it < p.iters; ++it) {
      rs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 1));
      rs = __fadd_rn(rs, __shfl_xor_sync(0xffffffffu, rs, 2));
      c = __fdiv_rn(c, __fadd_rn(rs, p.hc_eps));
      cs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 4));
      cs = __fadd_rn(cs, __shfl_xor_sync(0xffffffffu, cs, 8));
      c = __fdiv_rn(c, __fadd_rn(cs, p.hc_eps));
    }
    if (lane >= 16) p.comb[t * 16 + lane - 16] = c;
    if (lane == 16 && r == 0) trace_event(p, tile, 6);
  }
}

// The tile's pre weights of token rows [r0, r0 + 16) (< n) into pre_s, polling the reducers' (value, flag) pairs.
__device__ __forceinline__ void wait_pre(const Params& p, float4* pre_s, int64_t t0, int rows, int lane) {
  if (lane < rows) {
    const uint64_t* src = p.pre_flag + (t0 + lane) * 4;
    unsigned ns = 32;
    for (;;) {
      uint64_t a, b, c, d;
      asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];\n" : "=l"(a), "=l"(b) : "l"(src) : "memory");
      asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];\n" : "=l"(c), "=l"(d) : "l"(src + 2) : "memory");
      if ((a >> 32) & (b >> 32) & (c >> 32) & (d >> 32)) {  // each 8-byte pair is single-copy atomic
        pre_s[lane] = make_float4(__uint_as_float(uint32_t(a)), __uint_as_float(uint32_t(b)),
                                  __uint_as_float(uint32_t(c)), __uint_as_float(uint32_t(d)));
        break;
      }
      __nanosleep(ns);
      ns = ns < 256 ? 2 * ns : ns;
    }
  }
  __syncwarp();
}

__device__ void y_warp(const Params& p, const Smem& s, int ywarp, int lane) {
  const int chunks = p.CH / 8;
  const int c0 = blockIdx.x * p.CH;
  float4* pre_s = s.pre + ywarp * 16;
  const int r0 = ywarp * 16;  // warp w: token rows 16w .. 16w + 15 of every tile
  for (int tile = 0; tile < p.n_tiles; ++tile) {
    const int st = tile % p.R;
    const int rows = min(16, tile_tokens(p, tile) - r0);
    mbar_wait(s.full + st, (tile / p.R) & 1);
    if (rows > 0) wait_pre(p, pre_s, int64_t(tile) * kTile + r0, rows, lane);
    if (blockIdx.x == 0 && ywarp == 0 && lane == 0) trace_event(p, tile, 7);
    const __nv_bfloat16* stage = s.x + size_t(st) * kTile * p.RS;
#pragma unroll 2
    for (int e = lane; e < rows * chunks; e += 32) {
      const int rr = e / chunks, ch = e - rr * chunks;
      const int r = r0 + rr;
      const int c = c0 + ch * 8;
      if (c >= p.d) continue;
      const int64_t t = int64_t(tile) * kTile + r;
      const float4 pw = pre_s[rr];
      uint4 u[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) u[i] = *reinterpret_cast<const uint4*>(stage + r * p.RS + i * p.CH + ch * 8);
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float res[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          auto val = [&](int i) {
            const uint32_t pk = reinterpret_cast<const uint32_t*>(&u[i])[w];
            return h ? __uint_as_float(pk & 0xffff0000u) : __uint_as_float(pk << 16);
          };
          float a = __fmul_rn(pw.x, val(0));
          a = __fadd_rn(a, __fmul_rn(pw.y, val(1)));
          a = __fadd_rn(a, __fmul_rn(pw.z, val(2)));
          a = __fadd_rn(a, __fmul_rn(pw.w, val(3)));
          res[h] = a;
        }
        const __nv_bfloat162 pr = __floats2bfloat162_rn(res[0], res[1]);
        ow[w] = *reinterpret_cast<const uint32_t*>(&pr);
      }
      *reinterpret_cast<uint4*>(p.y + t * p.d + c) = o;
    }
    __syncwarp();  // pre_s is rewritten for the warp's next tile
    if (blockIdx.x == 0 && ywarp == 0 && lane == 0) trace_event(p, tile, 8);
    mbar_arrive(s.empty + st);
  }
}

__global__ void __launch_bounds__(kThreads, 1) mhc_pre_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Smem s;
  s.fn = reinterpret_cast<__nv_bfloat16*>(smem);
  s.x = s.fn + 3 * kNMix * p.RS;
  s.full = reinterpret_cast<uint64_t*>(s.x + size_t(p.R) * kTile * p.RS);
  s.empty = s.full + kMaxStages;
  s.mma_done = s.empty + kMaxStages;
  s.pre = reinterpret_cast<float4*>(s.mma_done + kMaxStages);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int i = 0; i < p.R; ++i) {
      mbar_init(s.full + i, 32 * kLoadWarps);
      mbar_init(s.empty + i, 32 * kYWarps);
      mbar_init(s.mma_done + i, 32 * kMmaWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  {  // the CTA's fn slice, split once into three exact bf16 parts; channels past d are zero
    const int c0 = blockIdx.x * p.CH;
    const int K = 4 * p.CH;
    for (int e = threadIdx.x; e < kNMix * K; e += kThreads) {
      const int n = e / K, k = e - n * K, i = k / p.CH, c = c0 + (k - i * p.CH);
      const float f = c < p.d ? __ldg(p.fn + int64_t(n) * 4 * p.d + int64_t(i) * p.d + c) : 0.f;
      const float b0 = __uint_as_float(__float_as_uint(f) & 0xffff0000u);
      const float r1 = f - b0;  // exact
      const float b1 = __uint_as_float(__float_as_uint(r1) & 0xffff0000u);
      const float b2 = r1 - b1;  // exact, <= 8 significant bits
      const int o = n * p.RS + k;
      s.fn[o] = __float2bfloat16_rz(b0);  // b0, b1 are bf16 values already; b2 fits in bf16 exactly
      s.fn[kNMix * p.RS + o] = __float2bfloat16_rz(b1);
      s.fn[2 * kNMix * p.RS + o] = __float2bfloat16_rn(b2);
    }
  }
  __syncthreads();
  if (warp < kLoad0) {
    mma_warp(p, s, warp, lane);
  } else if (warp < kReduce0) {
    loader(p, s, threadIdx.x - 32 * kLoad0);
  } else if (warp < kY0) {
    reducer(p, warp - kReduce0, lane);
  } else if (warp < kRelease) {
    y_warp(p, s, warp - kY0, lane);
  } else {
    releaser(p, s, lane);
  }
}

}  // namespace

size_t mhc_pre_smem_bytes(int64_t ch, int64_t stages) {
  const int64_t rs = 4 * ch + 8;
  return size_t(3 * kNMix * rs * 2 + stages * kTile * rs * 2 + 3 * kMaxStages * 8 + kTile * 16);
}

void mhc_pre_launch(const void* x, const void* fn, const void* base, const void* scale, void* part, void* cnt,
                    void* y, void* post, void* comb, void* pre, int64_t T, int64_t d, int64_t ch, int64_t stages,
                    void* trace, double norm_eps, double hc_eps, int64_t iters, int device,
                    cudaStream_t stream) {
  if (T == 0) return;
  Params p;
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.fn = static_cast<const float*>(fn);
  p.base = static_cast<const float*>(base);
  p.scale = static_cast<const float*>(scale);
  p.part = static_cast<float*>(part);
  p.cnt = static_cast<int*>(cnt);
  p.pre_flag = reinterpret_cast<uint64_t*>(static_cast<int*>(cnt) + ((T + kTile - 1) / kTile + 3) / 4 * 4);
  p.y = static_cast<__nv_bfloat16*>(y);
  p.post = static_cast<float*>(post);
  p.comb = static_cast<float*>(comb);
  p.pre = static_cast<float*>(pre);
  p.trace = static_cast<int64_t*>(trace);
  p.T = T;
  p.d = d;
  p.CH = int(ch);
  p.NC = int((d + ch - 1) / ch);
  p.RS = int(4 * ch + 8);
  p.R = int(stages);
  p.n_tiles = int((T + kTile - 1) / kTile);
  p.iters = int(iters);
  p.norm_eps = float(norm_eps);
  p.hc_eps = float(hc_eps);
  if (ch <= 0 || ch % 8 != 0 || stages < 2 || stages > kMaxStages)
    throw std::invalid_argument("mhc_pre: channel slice must be a positive multiple of 8 and 2..16 stages");
  int sms = 0, smem_max = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const size_t smem = mhc_pre_smem_bytes(ch, stages);
  if (p.NC > sms || smem > size_t(smem_max))
    throw std::invalid_argument("mhc_pre: " + std::to_string(p.NC) + " channel slices / " + std::to_string(smem) +
                                " bytes of shared memory do not fit this GPU (" + std::to_string(sms) + " SMs, " +
                                std::to_string(smem_max) + " bytes)");
  static int smem_set[64] = {0};  // per device: the largest dynamic shared memory size allowed so far
  if (device >= 0 && device < 64 && smem_set[device] < int(smem)) {
    cudaFuncSetAttribute(mhc_pre_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    smem_set[device] = int(smem);
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.NC);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // the CTAs wait on each other: all must be resident
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, mhc_pre_kernel, p);
  check_launch("mhc_pre_kernel");
}

}  // namespace v4k
