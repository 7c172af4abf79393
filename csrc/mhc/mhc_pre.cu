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
//   3 parts); each 128-k stage goes to a zeroed accumulator that is added to the running sum with an
//   IEEE add (a long MMA chain accumulates with truncation, see the Triton kernel's notes). Σx^2 comes
//   from the A fragments. A finished tile writes 64 x 25 fp32 partials and releases a per-block
//   counter (one add per warp: target 4 S).
// * warps 4-11, consumers (every CTA): take tokens from a global queue in order, wait for the token's
//   block counter (acquire), sum the S partials in slice order (lane n sums column n), compute
//   pre/post (lanes 0-7), y (all lanes, 8 bf16 per lane per 256 columns, X read back while the
//   producers' reads are still in L2) and the 20 Sinkhorn iterations on lanes 16-31 (C[i][j] on lane
//   16 + 4i + j: rows by xor 1/2 shuffles, columns by xor 4/8).
// Measured (H100, scripts/profile_mhc.py): 45-51% of the copy bandwidth at T >= 8192, 28-34% at
// T = 1024; 9-22% faster than the Triton streaming kernel at T = 1024 .. 65536 (both widths;
// bench_mhc, CUDA graphs). ncu (d = 4096, T = 8192): DRAM 69% busy but an L2 hit rate of 23%: the
// producers run ahead of the consumers and X is read about 1.8 times. Tried and reverted (commits c8f4802, 69da2af): pacing the producers to
// ~24 MB of X ahead of the tokens done, with consumer groups of 4 warps per token (fewer tokens in
// flight), nine independent MMA chains and the next token's weights prepared ahead: L2 hit rate 38%,
// +11% at d = 4096, T = 65536, but slower at T = 1024 and at d = 7168. Open: find what bounds the
// paced kernel (issue 0.32 per scheduler, DRAM 42%), e.g. consumer latency per token.
// No atomics on data; the slices, their order and every reduction order are fixed by (d), so a
// token's outputs do not depend on T or on the other tokens, and repeated calls give the same bytes.
// Non-contracted fp32 arithmetic (__fmul_rn / __fadd_rn) where the reference rounds each operation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "../common/sm90.h"
#include "../common/stream.h"

namespace v4k {

namespace {

constexpr int kNMix = 24;
constexpr int kPartStride = 32;  // floats per (tile, token) partial row: 24 mix sums, then Σx^2 at 24
constexpr int kBT = 64;          // tokens per producer tile
constexpr int kBK = 128;         // k per pipeline stage
constexpr int kStages = 4;
constexpr int kProducerWarps = 4;
constexpr int kConsumerWarps = 8;
constexpr int kThreads = 32 * (kProducerWarps + kConsumerWarps);
constexpr int kWarpStageBytes = 16 * kBK * 2;  // 16 tokens x 128 k bf16 = 4 KB

struct Params {
  const __nv_bfloat16* x;  // [T, K]
  const float* fn;         // [24, K]
  const float* base;       // [24]
  const float* scale;      // [3]
  float* part;             // [n_blocks * S * 64, 32]
  int* cnt;                // [n_blocks + 1]: per block, producer warps done; then the token queue
  __nv_bfloat16* y;        // [T, d]
  float* post;             // [T, 4]
  float* comb;             // [T, 16]
  float* pre;              // [T, 4] or nullptr
  int64_t T, d, K;
  int S, KS, n_a, n_blocks, iters;
  float norm_eps, hc_eps;
};

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
    if (step < total) {
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
    }
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
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

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  for (int step = 0; step < total; ++step) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // every lane's copies for `step` landed; every lane is done with the stage refilled next
    issue(step + kStages - 1);
    const int ks = step % ksteps;
    const __nv_bfloat16* st = ring + (step % kStages) * (kWarpStageBytes / 2);
    float blk[3][4];
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) blk[j][e] = 0.f;
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
        for (int j = 0; j < 3; ++j) mma_bf16(blk[j], a, bf[3 * q + j][0], bf[3 * q + j][1]);
    }
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = __fadd_rn(acc[j][e], blk[j][e]);

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
  cp_async_wait<0>();
}

// ------------------------------------------------------------------------------------------------
// Consumer warp: one token at a time from the queue.
// ------------------------------------------------------------------------------------------------
__device__ void consumer(const Params& p, int lane) {
  const int done = p.S * kProducerWarps;
  const int d = int(p.d);
  // per-lane constants: lane n < 24 holds mix column n
  const float sc = lane < 24 ? p.scale[lane < 4 ? 0 : (lane < 8 ? 1 : 2)] : 0.f;
  const float bs = lane < 24 ? p.base[lane] : 0.f;
  for (;;) {
    int t = 0;
    if (lane == 0) t = atomicAdd(p.cnt + p.n_blocks, 1);
    t = __shfl_sync(0xffffffffu, t, 0);
    if (t >= p.T) break;
    const int b = t / kBT, r = t - b * kBT;
    if (lane == 0) {
      while (ld_acquire(p.cnt + b) < done) __nanosleep(64);
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
    const float p0 = __shfl_sync(0xffffffffu, pw, 0), p1 = __shfl_sync(0xffffffffu, pw, 1);
    const float p2 = __shfl_sync(0xffffffffu, pw, 2), p3 = __shfl_sync(0xffffffffu, pw, 3);
    if (lane < 4 && p.pre != nullptr) p.pre[int64_t(t) * 4 + lane] = pw;
    if (lane >= 4 && lane < 8) p.post[int64_t(t) * 4 + lane - 4] = __fmul_rn(2.0f, sg);

    // y: lane covers 8 columns per 256; X read with evict-first loads (its last use)
    const __nv_bfloat16* xr = p.x + int64_t(t) * p.K;
    __nv_bfloat16* yr = p.y + int64_t(t) * d;
#pragma unroll 4
    for (int c0 = lane * 8; c0 < d; c0 += 256) {
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
    if (lane >= 16) p.comb[int64_t(t) * 16 + lane - 16] = c;
  }
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
  if (warp < kProducerWarps) {
    if (producer_cta) producer(p, fn_s, x_s, warp, lane);
  } else {
    consumer(p, lane);
  }
}

}  // namespace

int64_t mhc_pre_slice(int64_t K) { return K % 1024 == 0 || K > 4096 ? 1024 : (K > 256 ? 512 : 256); }

void mhc_pre_launch(const void* x, const void* fn, const void* base, const void* scale, void* part, void* cnt,
                    void* y, void* post, void* comb, void* pre, int64_t T, int64_t d, double norm_eps, double hc_eps,
                    int64_t iters, int device, cudaStream_t stream) {
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
  const size_t smem = size_t(3) * kNMix * p.KS * 2 + size_t(kProducerWarps) * kStages * kWarpStageBytes;
  static int smem_set[64] = {0};  // per device: the largest dynamic shared memory size allowed so far
  if (device >= 0 && device < 64 && smem_set[device] < int(smem)) {
    cudaFuncSetAttribute(mhc_pre_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    smem_set[device] = int(smem);
  }
  mhc_pre_kernel<<<sms, kThreads, smem, stream>>>(p);
  check_launch("mhc_pre_kernel");
}

}  // namespace v4k
