// FP8 e4m3 activation quantization with power-of-two (ue8m0) block scales.
//
// Reference: python/v4kernels/reference/quant.py::act_quant_fp8 (spec §2.2):
//   amax = max(max|x_blk|, 1e-4);  s = 2^ceil(log2(amax * (1/448)))  (exponent bits, +1 if mantissa != 0)
//   q    = e4m3_rne(clamp(x / s, -448, 448))
// BLOCK/8 lanes quantize one (row, block) group; x rows must be 16-byte aligned (checked in Python).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "../common/stream.h"

namespace v4k {

namespace {

// Biased e8m0 exponent of 2^ceil(log2(v)) for a positive normal float v.
__device__ __forceinline__ int ue8m0_ceil_exponent(float v) {
  uint32_t bits = __float_as_uint(v);
  int e = (bits >> 23) & 0xff;
  return e + ((bits & 0x7fffff) != 0);
}

// Each lane owns 8 consecutive values (one 16-byte load, one 8-byte store); BLOCK/8 lanes form a group.
template <int BLOCK>
__global__ void __launch_bounds__(256) act_quant_fp8_kernel(const __nv_bfloat16* __restrict__ x,
                                                            __nv_fp8_e4m3* __restrict__ q,
                                                            uint8_t* __restrict__ s, int64_t num_groups) {
  constexpr int EPT = 8;
  constexpr int LANES = BLOCK / EPT;  // 16, 8 or 4 lanes per (row, block) group
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = tid / LANES;
  const int sub = int(tid % LANES);
  // Whole warps stay alive for the shuffles; out-of-range groups compute on zeros and store nothing.
  const bool active = group < num_groups;

  float v[EPT];
  if (active) {
    const uint4 raw = *reinterpret_cast<const uint4*>(x + group * BLOCK + sub * EPT);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int i = 0; i < EPT; ++i) v[i] = __bfloat162float(h[i]);
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i) v[i] = 0.f;
  }

  // NaN-propagating amax so that a non-finite block gets a NaN scale (0xFF), as the reference.
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    float a = fabsf(v[i]);
    amax = (a > amax || a != a) ? a : amax;
  }
#pragma unroll
  for (int off = LANES / 2; off > 0; off >>= 1) {
    float o = __shfl_xor_sync(0xffffffffu, amax, off);
    amax = (o > amax || o != o) ? o : amax;
  }
  if (!active) return;

  uint8_t out[EPT];
  int exp_biased = 0xff;
  if (!(amax <= 3.0e38f)) {  // NaN or inf in the block: NaN scale, NaN values.
#pragma unroll
    for (int i = 0; i < EPT; ++i) out[i] = 0x7f;
  } else {
    amax = fmaxf(amax, 1e-4f);
    exp_biased = ue8m0_ceil_exponent(amax * (1.0f / 448.0f));
    const float inv_scale = __uint_as_float(uint32_t(254 - exp_biased) << 23);  // 2^(127 - exp), exact
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      const float y = fminf(fmaxf(v[i] * inv_scale, -448.f), 448.f);
      out[i] = __nv_fp8_e4m3(y).__x;  // round to nearest even
    }
  }
  if (sub == 0) s[group] = uint8_t(exp_biased);
  *reinterpret_cast<uint2*>(q + group * BLOCK + sub * EPT) = *reinterpret_cast<const uint2*>(out);
}

}  // namespace

void act_quant_fp8_launch(const void* x, void* q, void* s, int64_t rows, int64_t cols, int64_t block,
                          int device, cudaStream_t stream) {
  const int64_t num_groups = rows * (cols / block);
  if (num_groups == 0) return;
  constexpr int kThreads = 256;
  const int64_t threads_needed = num_groups * (block / 8);
  const int64_t grid = (threads_needed + kThreads - 1) / kThreads;
  auto xp = static_cast<const __nv_bfloat16*>(x);
  auto qp = static_cast<__nv_fp8_e4m3*>(q);
  auto sp = static_cast<uint8_t*>(s);
  switch (block) {
    case 32: act_quant_fp8_kernel<32><<<grid, kThreads, 0, stream>>>(xp, qp, sp, num_groups); break;
    case 64: act_quant_fp8_kernel<64><<<grid, kThreads, 0, stream>>>(xp, qp, sp, num_groups); break;
    case 128: act_quant_fp8_kernel<128><<<grid, kThreads, 0, stream>>>(xp, qp, sp, num_groups); break;
    default: throw std::runtime_error("act_quant_fp8: block must be 32, 64 or 128");
  }
  check_launch("act_quant_fp8_kernel");
}

}  // namespace v4k
