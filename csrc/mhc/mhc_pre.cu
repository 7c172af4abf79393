// mHC hc_pre (spec §7) in one HBM pass over the streams: warp-specialized persistent kernel.
//
// Reference: python/v4kernels/reference/mhc.py::mhc_pre. Per token, X [4d] bf16 (K = 4d):
//   mix = (fn @ X) * rsqrt(mean(X^2) + norm_eps)          fn [24, K] fp32
//   pre = sigmoid(mix[0:4] s0 + b) + eps;  post = 2 sigmoid(mix[4:8] s1 + b);  C = Sinkhorn(mix[8:24] s2 + b)
//   y   = bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3)
//
// Grid: one CTA per SM (all resident), 12 warps each:
// * warps 0-3, producers (CTAs below n_a only): K is cut into S slices of KS; CTA c owns slice c % S and
//   keeps it in shared memory for the whole kernel as three bf16 parts (fn = b0 + b1 + b2 exactly, so
//   every x * b product is exact in fp32). It walks token blocks of 64 (tile i = c, c + n_a, ...;
//   block i / S). Each producer warp owns 16 tokens of the block and runs its own cp.async ring
//   (4 stages of 16 tokens x 128 k) through mma.sync m16n8k16 (tokens = M, 24 mix rows = 3 n8 tiles,
//   3 parts); each 128-k stage goes to zeroed accumulators (one per part and n tile: nine short MMA
//   chains) whose sum (b0 + b1) + b2 is added to the running sum with IEEE adds (a long MMA chain accumulates with truncation, see the Triton kernel's notes). Σx^2 comes
//   from the A fragments. A finished tile writes 64 x 25 fp32 partials and releases a per-block
//   counter (one add per warp: target 4 S). A producer starts reading a block only while the
//   consumers are within `lag` blocks (~24 MB of X) of it, so that X is still in L2 when read back.
// * warps 4-11, consumers (every CTA), two groups of 4 warps, one token per group at a time: the
//   group's leader warp takes the token from a global queue (in order), waits for its block counter
//   (acquire), sums the S partials in slice order (lane n sums column n), writes post and the 16 comb
//   logits and hands pre to the group through shared memory, one token ahead (it prepares token n + 1
//   before its share of y(n)); the 128 threads compute y (8 columns per thread per 1024, X read back
//   from L2); tokens started are counted for the pacing. (One token per warp, 1056 tokens in flight, spread over too much X for the L2.)
// Then mhc_sinkhorn_kernel: the 20 Sinkhorn iterations, one token per thread.
// No atomics on data; the slices, their order and every reduction order are fixed by (d), so a
// token's outputs do not depend on T or on the other tokens, and repeated calls give the same bytes.
// Non-contracted fp32 arithmetic (__fmul_rn / __fadd_rn) where the reference rounds each operation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "../common/stream.h"

namespace v4k {

namespace {

constexpr int kNMix = 24;
constexpr int kPartStride = 32;  // floats per (tile, token) partial row: 24 mix sums, then Σx^2 at 24
constexpr int kBT = 64;          // tokens per producer tile
constexpr int kBK = 128;         // k per pipeline stage
constexpr int kStages = 4;
constexpr int kProducerWarps = 4;
constexpr int kConsumerWarps = 8;  // two groups of 4
constexpr int kThreads = 32 * (kProducerWarps + kConsumerWarps);
constexpr int kWarpStageBytes = 16 * kBK * 2;  // 16 tokens x 128 k bf16 = 4 KB

struct Params {
  const __nv_bfloat16* x;  // [T, K]
  const float* fn;         // [24, K]
  const float* base;       // [24]
  const float* scale;      // [3]
  float* part;             // [n_blocks * S * 64, 32]
  int* cnt;                // [n_blocks + 2]: per block, producer warps done; the token queue; tokens done
  __nv_bfloat16* y;        // [T, d]
  float* post;             // [T, 4]
  float* comb;             // [T, 16]
  float* zc;               // [T, 16]: the comb logits, for the Sinkhorn kernel
  float* pre;              // [T, 4] or nullptr
  int64_t T, d, K;
  int S, KS, n_a, n_blocks, iters, lag;  // lag: blocks a producer may run ahead of the tokens done
  float norm_eps, hc_eps;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes < 16 zero-fills the rest (K tails).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Swizzled offset (in elements) of k inside a row of `row_elems` bf16: 16-byte chunk c -> c ^ (row & 7),
// so the 8 rows an ldmatrix reads hit 8 different bank groups.
__device__ __forceinline__ int swz(int row, int k) { return (((k >> 3) ^ (row & 7)) << 3) | (k & 7); }

__device__ __forceinline__ float sum_of_squares(uint32_t packed, float acc) {
  const float lo = __uint_as_float(packed << 16), hi = __uint_as_float(packed & 0xffff0000u);
  return fmaf(hi, hi, fmaf(lo, lo, acc));  // bf16 squares are exact in fp32: fma == mul + add here
}

__device__ __forceinline__ float sigmoid(float z) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z))); }

// ------------------------------------------------------------------------------------------------
// Producer warp: GEMV partials of its 16 tokens for every tile of this CTA.
// ------------------------------------------------------------------------------------------------
__device__ void producer(const Params& p, const __nv_bfloat16* fn_s, __nv_bfloat16* x_s, int warp, int lane) {
  const int slice = blockIdx.x % p.S;
  const int ksteps = p.KS / kBK;
  const int n_tiles = p.n_blocks * p.S;
  const int my_tiles = blockIdx.x < n_tiles ? (n_tiles - blockIdx.x + p.n_a - 1) / p.n_a : 0;
  const int total = my_tiles * ksteps;
  __nv_bfloat16* ring = x_s + warp * kStages * (kWarpStageBytes / 2);

  // Stage `step` of this warp's flat (tile, k step) sequence: 16 rows x 16 chunks, 8 per lane.
  auto issue = [&](int step) {
    const int tile = step / ksteps, ks = step - tile * ksteps;
    const int i = blockIdx.x + tile * p.n_a;
    const int b = i / p.S;
    const int64_t k0 = int64_t(slice) * p.KS + int64_t(ks) * kBK;
    __nv_bfloat16* st = ring + (step % kStages) * (kWarpStageBytes / 2);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int idx = lane + 32 * c, r = idx >> 4, ch = idx & 15;
      const int64_t row = int64_t(b) * kBT + warp * 16 + r;
      const int64_t tok = row < p.T ? row : p.T - 1;  // rows past T: any valid row
      const int64_t k = k0 + ch * 8;
      const int64_t left = p.K - k;
      const int bytes = left >= 8 ? 16 : (left > 0 ? int(left) * 2 : 0);
      const __nv_bfloat16* src = p.x + tok * p.K + (bytes ? k : 0);
      cp_async16(smem_u32(st + r * kBK + swz(r, ch * 8)), src, bytes);
    }
    cp_async_commit();
  };
  // Pacing: the first stage of a tile of block b may load only once the consumers have finished
  // (b - lag) blocks' worth of tokens, so that X is still in L2 when they read it back (unpaced, the
  // producers ran ahead and the L2 hit rate was 23%). A warp waits (block = true) only for the step it
  // must compute next, i.e. after it released all its earlier tiles, so the wait cannot hold back a
  // block the consumers are waiting for; otherwise it just stops issuing ahead.
  auto paced = [&](int step, bool block) -> bool {
    const int tile = step / ksteps;
    if (step - tile * ksteps != 0) return true;
    const int b = (blockIdx.x + tile * p.n_a) / p.S;
    if (b <= p.lag) return true;
    const int want = (b - p.lag) * kBT;
    int ok = 1;
    if (lane == 0) {
      ok = ld_acquire(p.cnt + p.n_blocks + 1) >= want;
      while (block && !ok) {
        __nanosleep(256);
        ok = ld_acquire(p.cnt + p.n_blocks + 1) >= want;
      }
    }
    return __shfl_sync(0xffffffffu, ok, 0) != 0;
  };

  // Per-lane ldmatrix addresses. A (x, 16 x 16 at k step kk): lane -> row lane % 16, chunk 2 kk + lane / 16.
  const int a_row = lane & 15, a_half = lane >> 4;
  // B (fn part q, n tile j, 16 k): x4 covers two (q, j) pairs: lane -> matrix lane / 8 = (pair, k half), row lane % 8.
  const int b_row = lane & 7, b_mat = lane >> 3;
  const int fn_part_elems = kNMix * p.KS;

  float acc[3][4], ssq0 = 0.f, ssq1 = 0.f;  // rows lane / 4 and lane / 4 + 8 of the warp's 16
#pragma unroll
  for (int j = 0; j < 3; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  int issued = 0;  // steps whose loads are issued (one cp.async group each)
  for (int step = 0; step < total; ++step) {
    __syncwarp();  // every lane is done with the stage of step - 1, which may be refilled now
    while (issued < total && issued < step + kStages && paced(issued, issued == step)) issue(issued++);
    const int ahead = issued - 1 - step;  // groups issued after this step's
    if (ahead >= 3) cp_async_wait<3>();
    else if (ahead == 2) cp_async_wait<2>();
    else if (ahead == 1) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncwarp();  // every lane's copies for `step` landed
    const int ks = step % ksteps;
    const __nv_bfloat16* st = ring + (step % kStages) * (kWarpStageBytes / 2);
    float blk[3][3][4];  // [part][n tile]: nine independent MMA chains (8 long) instead of three (24 long)
#pragma unroll
    for (int q = 0; q < 3; ++q)
#pragma unroll
      for (int j = 0; j < 3; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) blk[q][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(smem_u32(st + a_row * kBK + swz(a_row, (2 * kk + a_half) * 8)), a[0], a[1], a[2], a[3]);
      ssq0 = sum_of_squares(a[2], sum_of_squares(a[0], ssq0));
      ssq1 = sum_of_squares(a[3], sum_of_squares(a[1], ssq1));
      const int kcol = ks * kBK + kk * 16;  // k inside the slice
      // 9 (part, n tile) B fragments: pairs (0,1), (2,3), (4,5), (6,7) by x4, the 9th by x2; pair index = 3 q + j
      uint32_t bf[9][2];
#pragma unroll
      for (int pr = 0; pr < 4; ++pr) {
        const int f = 2 * pr + (b_mat >> 1);  // (q, j) = (f / 3, f % 3)
        const int row = (f % 3) * 8 + b_row;
        const __nv_bfloat16* src = fn_s + (f / 3) * fn_part_elems + row * p.KS + swz(row, kcol + (b_mat & 1) * 8);
        ldmatrix_x4(smem_u32(src), bf[2 * pr][0], bf[2 * pr][1], bf[2 * pr + 1][0], bf[2 * pr + 1][1]);
      }
      {
        const int row = 2 * 8 + b_row;  // f = 8: q = 2, j = 2
        const __nv_bfloat16* src = fn_s + 2 * fn_part_elems + row * p.KS + swz(row, kcol + (b_mat & 1) * 8);
        ldmatrix_x2(smem_u32(src), bf[8][0], bf[8][1]);
      }
#pragma unroll
      for (int q = 0; q < 3; ++q)
#pragma unroll
        for (int j = 0; j < 3; ++j) mma_bf16(blk[q][j], a, bf[3 * q + j][0], bf[3 * q + j][1]);
    }
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc[j][e] = __fadd_rn(acc[j][e], __fadd_rn(__fadd_rn(blk[0][j][e], blk[1][j][e]), blk[2][j][e]));

    if (ks == ksteps - 1) {  // tile done: partials of the warp's 16 tokens, then release
      const int i = blockIdx.x + (step / ksteps) * p.n_a;
      const int b = i / p.S;
      ssq0 += __shfl_xor_sync(0xffffffffu, ssq0, 1);
      ssq0 += __shfl_xor_sync(0xffffffffu, ssq0, 2);
      ssq1 += __shfl_xor_sync(0xffffffffu, ssq1, 1);
      ssq1 += __shfl_xor_sync(0xffffffffu, ssq1, 2);
      const int r0 = warp * 16 + (lane >> 2), col = 2 * (lane & 3);
      float* row0 = p.part + (int64_t(i) * kBT + r0) * kPartStride;
      float* row1 = row0 + 8 * kPartStride;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        *reinterpret_cast<float2*>(row0 + 8 * j + col) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(row1 + 8 * j + col) = make_float2(acc[j][2], acc[j][3]);
      }
      if ((lane & 3) == 0) {
        row0[kNMix] = ssq0;
        row1[kNMix] = ssq1;
      }
      __threadfence();
      __syncwarp();
      if (lane == 0) atomicAdd(p.cnt + b, 1);
#pragma unroll
      for (int j = 0; j < 3; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
      ssq0 = ssq1 = 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Consumer warp: one token at a time from the queue.
// ------------------------------------------------------------------------------------------------
// Per consumer group: the token being handed to the group's warps and its pre weights (two slots,
// alternating, so the leader can fill the next while the others still read the current one).
struct TokenSlot {
  int t;
  float pre[4];
};

// The leader warp (first of its group): weights of token t; returns pre on lanes 0-3.
__device__ __forceinline__ float token_weights(const Params& p, int t, int lane, float sc, float bs) {
  const int b = t / kBT, r = t - b * kBT;
  if (lane == 0) {
    while (ld_acquire(p.cnt + b) < p.S * kProducerWarps) __nanosleep(64);
  }
  __syncwarp();  // orders the other lanes' loads after lane 0's acquire
  // column sums over the S slices, in slice order (lane 24: Σx^2)
  float v = 0.f;
  if (lane <= kNMix) {
    const float* src = p.part + (int64_t(b) * p.S * kBT + r) * kPartStride + lane;
#pragma unroll 8
    for (int s = 0; s < p.S; ++s) v = __fadd_rn(v, __ldcg(src + int64_t(s) * kBT * kPartStride));
  }
  const float ssq = __shfl_sync(0xffffffffu, v, kNMix);
  const float rr = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ssq, float(p.K)), p.norm_eps)));
  const float z = __fadd_rn(__fmul_rn(__fmul_rn(v, rr), sc), bs);
  const float sg = sigmoid(z);
  const float pw = __fadd_rn(sg, p.hc_eps);  // pre on lanes 0-3
  if (lane < 4 && p.pre != nullptr) p.pre[int64_t(t) * 4 + lane] = pw;
  if (lane >= 4 && lane < 8) p.post[int64_t(t) * 4 + lane - 4] = __fmul_rn(2.0f, sg);
  if (lane >= 8 && lane < 24) p.zc[int64_t(t) * 16 + lane - 8] = z;  // Sinkhorn: mhc_sinkhorn_kernel
  return pw;
}

// A group of 4 consumer warps (128 threads, named barrier `bar`) works on one token at a time: the
// leader warp takes it from the queue (the next one is fetched ahead), waits for its block, computes
// its weights and publishes them in `slots`; then all 128 threads compute y (8 columns per thread per
// 1024), X read back from L2 with evict-first loads (its last use).
__device__ void consumer_group(const Params& p, TokenSlot* slots, int gwarp, int lane, int bar) {
  const int d = int(p.d);
  const int gtid = gwarp * 32 + lane;
  const bool leader = gwarp == 0;
  // leader lanes n < 24 hold mix column n
  const float sc = lane < 24 ? p.scale[lane < 4 ? 0 : (lane < 8 ? 1 : 2)] : 0.f;
  const float bs = lane < 24 ? p.base[lane] : 0.f;
  // The leader fills the slot of token n + 1 (queue, wait, weights) before its share of y(n), so the
  // other warps' y(n) hides that latency.
  auto prepare = [&](TokenSlot* slot) {
    int t = 0;
    if (lane == 0) t = atomicAdd(p.cnt + p.n_blocks, 1);
    t = __shfl_sync(0xffffffffu, t, 0);
    if (lane == 0) slot->t = t;
    if (t < p.T) {
      const float pw = token_weights(p, t, lane, sc, bs);
      if (lane < 4) slot->pre[lane] = pw;
    }
  };
  if (leader) prepare(slots);
  for (int it = 0;; ++it) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(bar) : "memory");  // slot `it` filled; y(it - 1) done
    const TokenSlot* slot = slots + (it & 1);
    const int t = slot->t;
    if (t >= p.T) break;
    // pacing count: tokens whose y has started (counting at the end instead could leave a group's finished
    // token uncounted while its leader waits for the next block: a producer-consumer cycle)
    if (leader && lane == 0) atomicAdd(p.cnt + p.n_blocks + 1, 1);
    const float p0 = slot->pre[0], p1 = slot->pre[1], p2 = slot->pre[2], p3 = slot->pre[3];
    if (leader) prepare(slots + ((it + 1) & 1));  // its readers passed this iteration's barrier
    const __nv_bfloat16* xr = p.x + int64_t(t) * p.K;
    __nv_bfloat16* yr = p.y + int64_t(t) * d;
#pragma unroll 4
    for (int c0 = gtid * 8; c0 < d; c0 += 1024) {
      uint4 u[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) u[s] = __ldcs(reinterpret_cast<const uint4*>(xr + int64_t(s) * d + c0));
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float res[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          auto val = [&](int s) {
            const uint32_t pk = reinterpret_cast<const uint32_t*>(&u[s])[w];
            return h ? __uint_as_float(pk & 0xffff0000u) : __uint_as_float(pk << 16);
          };
          float a = __fmul_rn(p0, val(0));
          a = __fadd_rn(a, __fmul_rn(p1, val(1)));
          a = __fadd_rn(a, __fmul_rn(p2, val(2)));
          a = __fadd_rn(a, __fmul_rn(p3, val(3)));
          res[h] = a;
        }
        const __nv_bfloat162 pr = __floats2bfloat162_rn(res[0], res[1]);
        ow[w] = *reinterpret_cast<const uint32_t*>(&pr);
      }
      *reinterpret_cast<uint4*>(yr + c0) = o;
    }
  }
}

// Sinkhorn of the comb logits, one token per thread: row softmax + eps, column normalisation, then
// (iters - 1) x (rows, columns); 4-term sums as (c0 + c1) + (c2 + c3), IEEE divisions.
__global__ void __launch_bounds__(128) mhc_sinkhorn_kernel(const float* __restrict__ zc, float* __restrict__ comb,
                                                           int64_t T, int iters, float eps) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float c[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(zc + t * 16) + q);
    c[4 * q] = v.x, c[4 * q + 1] = v.y, c[4 * q + 2] = v.z, c[4 * q + 3] = v.w;
  }
  auto sum4 = [](float a, float b, float c_, float d_) { return __fadd_rn(__fadd_rn(a, b), __fadd_rn(c_, d_)); };
  auto rows = [&]() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = __fadd_rn(sum4(c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]), eps);
#pragma unroll
      for (int j = 0; j < 4; ++j) c[4 * i + j] = __fdiv_rn(c[4 * i + j], s);
    }
  };
  auto cols = [&]() {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float s = __fadd_rn(sum4(c[j], c[4 + j], c[8 + j], c[12 + j]), eps);
#pragma unroll
      for (int i = 0; i < 4; ++i) c[4 * i + j] = __fdiv_rn(c[4 * i + j], s);
    }
  };
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float m = fmaxf(fmaxf(c[4 * i], c[4 * i + 1]), fmaxf(c[4 * i + 2], c[4 * i + 3]));
    float e[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = expf(__fadd_rn(c[4 * i + j], -m));
    const float s = sum4(e[0], e[1], e[2], e[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) c[4 * i + j] = __fadd_rn(__fdiv_rn(e[j], s), eps);
  }
  cols();
  for (int it = 1; it < iters; ++it) {
    rows();
    cols();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
    reinterpret_cast<float4*>(comb + t * 16)[q] = make_float4(c[4 * q], c[4 * q + 1], c[4 * q + 2], c[4 * q + 3]);
}

__global__ void __launch_bounds__(kThreads, 1) mhc_pre_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* fn_s = reinterpret_cast<__nv_bfloat16*>(smem);  // [3][24][KS], rows swizzled
  __nv_bfloat16* x_s = fn_s + 3 * kNMix * p.KS;                    // [4 warps][stages][16][128], swizzled
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool producer_cta = blockIdx.x < p.n_a;
  if (producer_cta) {  // the CTA's fn slice, split once into three exact bf16 parts
    const int slice = blockIdx.x % p.S;
    for (int e = threadIdx.x; e < kNMix * p.KS; e += kThreads) {
      const int n = e / p.KS, k = e - n * p.KS;
      const int64_t kg = int64_t(slice) * p.KS + k;
      const float f = kg < p.K ? __ldg(p.fn + int64_t(n) * p.K + kg) : 0.f;
      const float b0 = __uint_as_float(__float_as_uint(f) & 0xffff0000u);
      const float r1 = f - b0;  // exact
      const float b1 = __uint_as_float(__float_as_uint(r1) & 0xffff0000u);
      const float b2 = r1 - b1;  // exact, <= 8 significant bits
      const int o = n * p.KS + swz(n, k);
      fn_s[o] = __float2bfloat16_rz(b0);  // b0, b1 are bf16 values already; b2 fits in bf16 exactly
      fn_s[kNMix * p.KS + o] = __float2bfloat16_rz(b1);
      fn_s[2 * kNMix * p.KS + o] = __float2bfloat16_rn(b2);
    }
  }
  __syncthreads();
  __shared__ TokenSlot slots[kConsumerWarps / 4][2];
  if (warp < kProducerWarps) {
    if (producer_cta) producer(p, fn_s, x_s, warp, lane);
  } else {
    const int g = (warp - kProducerWarps) / 4;
    consumer_group(p, slots[g], (warp - kProducerWarps) % 4, lane, 1 + g);
  }
}

}  // namespace

int64_t mhc_pre_slice(int64_t K) { return K % 1024 == 0 || K > 4096 ? 1024 : (K > 256 ? 512 : 256); }

void mhc_pre_launch(const void* x, const void* fn, const void* base, const void* scale, void* part, void* cnt,
                    void* zc, void* y, void* post, void* comb, void* pre, int64_t T, int64_t d, double norm_eps,
                    double hc_eps, int64_t iters, int device, cudaStream_t stream) {
  if (T == 0) return;
  Params p;
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.fn = static_cast<const float*>(fn);
  p.base = static_cast<const float*>(base);
  p.scale = static_cast<const float*>(scale);
  p.part = static_cast<float*>(part);
  p.cnt = static_cast<int*>(cnt);
  p.y = static_cast<__nv_bfloat16*>(y);
  p.post = static_cast<float*>(post);
  p.comb = static_cast<float*>(comb);
  p.zc = static_cast<float*>(zc);
  p.pre = static_cast<float*>(pre);
  p.T = T;
  p.d = d;
  p.K = 4 * d;
  p.KS = int(mhc_pre_slice(p.K));
  p.S = int((p.K + p.KS - 1) / p.KS);
  p.n_blocks = int((T + kBT - 1) / kBT);
  p.iters = int(iters);
  p.norm_eps = float(norm_eps);
  p.hc_eps = float(hc_eps);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (p.S > sms) throw std::runtime_error("mhc_pre: K / slice exceeds the SM count");
  p.n_a = (sms / p.S) * p.S;
  // ~24 MB of X between the tokens done and the newest block read (L2: 50 MB on the H100, shared with
  // the partials and y)
  p.lag = int(std::max<int64_t>(2, (int64_t(24) << 20) / (kBT * 2 * p.K)));
  const size_t smem = size_t(3) * kNMix * p.KS * 2 + size_t(kProducerWarps) * kStages * kWarpStageBytes;
  static int smem_set[64] = {0};  // per device: the largest dynamic shared memory size allowed so far
  if (device >= 0 && device < 64 && smem_set[device] < int(smem)) {
    cudaFuncSetAttribute(mhc_pre_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    smem_set[device] = int(smem);
  }
  mhc_pre_kernel<<<sms, kThreads, smem, stream>>>(p);
  check_launch("mhc_pre_kernel");
  mhc_sinkhorn_kernel<<<unsigned((T + 127) / 128), 128, 0, stream>>>(p.zc, p.comb, T, p.iters, p.hc_eps);
  check_launch("mhc_sinkhorn_kernel");
}

}  // namespace v4k
