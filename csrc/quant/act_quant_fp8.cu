// FP8 e4m3 activation quantization with power-of-two (ue8m0) block scales.
//
// Reference: python/v4kernels/reference/quant.py::act_quant_fp8 (spec §2.2):
//   amax = max(max|x_blk|, 1e-4);  s = 2^ceil(log2(amax * (1/448)))  (exponent bits, +1 if mantissa != 0)
//   q    = e4m3_rne(clamp(x / s, -448, 448))
// One warp quantizes one (row, block) group; each lane holds BLOCK/32 consecutive values.
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

template <int BLOCK>
__global__ void act_quant_fp8_kernel(const __nv_bfloat16* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                                     uint8_t* __restrict__ s, int64_t num_groups) {
  constexpr int EPT = BLOCK / 32;  // elements per lane
  const int lane = threadIdx.x & 31;
  const int64_t group = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (group >= num_groups) return;
  const __nv_bfloat16* xg = x + group * BLOCK + lane * EPT;

  float v[EPT];
#pragma unroll
  for (int i = 0; i < EPT; ++i) v[i] = __bfloat162float(xg[i]);

  // NaN-propagating amax so that a non-finite block gets a NaN scale (0xFF), as the reference.
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    float a = fabsf(v[i]);
    amax = (a > amax || a != a) ? a : amax;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float o = __shfl_xor_sync(0xffffffffu, amax, off);
    amax = (o > amax || o != o) ? o : amax;
  }

  uint8_t* sg = s + group;
  __nv_fp8_e4m3* qg = q + group * BLOCK + lane * EPT;
  if (!(amax <= 3.0e38f)) {  // NaN or inf in the block: scale is e8m0 NaN, values NaN.
    if (lane == 0) *sg = 0xff;
#pragma unroll
    for (int i = 0; i < EPT; ++i) qg[i].__x = 0x7f;
    return;
  }
  amax = fmaxf(amax, 1e-4f);
  const int exp_biased = ue8m0_ceil_exponent(amax * (1.0f / 448.0f));
  const float inv_scale = __uint_as_float(uint32_t(254 - exp_biased) << 23);  // 2^(127 - exp)
  if (lane == 0) *sg = uint8_t(exp_biased);
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    float y = fminf(fmaxf(v[i] * inv_scale, -448.f), 448.f);
    qg[i] = __nv_fp8_e4m3(y);  // round to nearest even, saturating
  }
}

}  // namespace

void act_quant_fp8_launch(const void* x, void* q, void* s, int64_t rows, int64_t cols, int64_t block,
                          int device, cudaStream_t stream) {
  const int64_t num_groups = rows * (cols / block);
  if (num_groups == 0) return;
  constexpr int kWarps = 8;
  const int64_t grid = (num_groups + kWarps - 1) / kWarps;
  auto xp = static_cast<const __nv_bfloat16*>(x);
  auto qp = static_cast<__nv_fp8_e4m3*>(q);
  auto sp = static_cast<uint8_t*>(s);
  switch (block) {
    case 32: act_quant_fp8_kernel<32><<<grid, kWarps * 32, 0, stream>>>(xp, qp, sp, num_groups); break;
    case 64: act_quant_fp8_kernel<64><<<grid, kWarps * 32, 0, stream>>>(xp, qp, sp, num_groups); break;
    case 128: act_quant_fp8_kernel<128><<<grid, kWarps * 32, 0, stream>>>(xp, qp, sp, num_groups); break;
    default: throw std::runtime_error("act_quant_fp8: block must be 32, 64 or 128");
  }
  check_launch("act_quant_fp8_kernel");
}

}  // namespace v4k
