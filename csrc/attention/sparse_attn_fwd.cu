// Sparse / dense-compressed / window attention over the FP8 paged KV584 caches, sm_90a (Hopper).
//
// The attention loop of the `sparse_attn_*` ops' CUDA backend. The key-row translation (window ring, block
// tables, CSA index rows, HCA ranges -> byte offsets of cache rows + their 8 scale bytes, -1 = ignored key)
// and the split-KV combine are the Triton backend's kernels (python/v4kernels/triton/attention.py); this
// kernel replaces the Triton attention kernel between them, with the same inputs and outputs.
//
// One CTA = one query token x one split of its key list x a block of 64 heads (V4 attention is MQA: the 64
// heads are the wgmma M dimension and share each dequantised KV tile). Tiles of 32 keys. Three warpgroups:
//   * WG0 warp 0, the loader: per tile, lane k gets key k's row offset and scale word (cp.async, 6 tiles ahead) and
//     bulk-copies its 576-byte cache row (448 e4m3 bytes + 64 bf16 rope dims) into a 4-stage raw ring
//     (cp.async.bulk on an mbarrier: up to 4 tiles = 74 KB in flight per SM, no registers held).
//   * WG0 warps 1-3, the converters: raw row -> bf16 tile [8 chunks][32 keys][64 dims] in the 128-byte
//     swizzled layout wgmma reads (e4m3 -> f16x2 in one cvt, * 2^(e8m0 - 127) in fp32: exact, -> bf16), a
//     2-stage ring; ignored keys become zero rows, and a per-key mask.
//   * WG1 / WG2, the consumers: warpgroup w computes the partial S_w = Q[:, 256w..] K[:, 256w..]^T for all 64
//     heads x 32 keys (16 wgmma m64n32k16, Q and K from shared memory); the partials are exchanged through
//     shared memory and both warpgroups add the same two numbers (S = S_0 + S_1 in each). Then the base-2
//     online softmax in registers and O[:, 256w..] += bf16(P) V with 2 wgmma m64n256k16 (P from registers,
//     V = the same tile read N-major). The accumulator is 64 x 256 fp32 per warpgroup = 128 registers per
//     thread; O is rescaled only when a row max of the warp moved. Q (64 KB) is loaded by the consumers while
//     the first rows stream in.
//   Shared memory: Q 64 KB + bf16 ring 64 KB + raw ring 74 KB + S exchange 16 KB + rings of row offsets =
//   224 KB, one CTA per SM. Registers: the
//   producer warpgroup gives some to the consumers (setmaxnreg 112 / 192).
// Epilogue: as the Triton kernel (`_attn_kernel`): direct (one split) o = O / (l + 2^(sink*log2e - m)),
// lse, bf16 rounding, optional inverse RoPE of dims 448.. at the token's position; or fp32 partials
// O / l and m + log2 l for the combine.
//
// Numerics: as the Triton kernel (bf16 Q, K, V and P on the tensor cores, fp32 accumulation, exp2 with the
// scale folded into log2 units, l summed from the fp32 p); fp32 sums in another order.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/sm90.h"
#include "../common/stream.h"

namespace v4k {
namespace {

constexpr int kHeads = 64;                    // heads per CTA: wgmma M
constexpr int kBN = 32;                       // keys per tile
constexpr int kStages = 2;                    // bf16 KV tile ring
constexpr int kRawStages = 4;                 // raw cache-row ring (bulk copies in flight)
constexpr int kRowBytes = 576;                // cache row data: 448 e4m3 + 64 bf16
constexpr int kRawPitch = kRowBytes + 16;     // raw rows 592 B apart: the converters' 16-byte reads of 32 rows
                                              // at one offset then hit 8 distinct bank groups
constexpr int kUnits = kRowBytes / 16;        // 16-byte pieces per row: 28 e4m3 + 8 rope
constexpr int kQChunkBytes = kHeads * 128;    // Q: [8 chunks][64 heads][64 dims] bf16, 128-byte swizzled rows
constexpr int kChunkBytes = kBN * 128;        // KV tile: [8 chunks][32 keys][64 dims]
constexpr int kTileBytes = 8 * kChunkBytes;
constexpr int kRawBytes = kBN * kRawPitch;
constexpr int kConverters = 96;               // warps 1-3 of the producer warpgroup
constexpr int kThreads = 384;
// Register budgets of the two roles. The CTA launches with 384 x 168 registers (64K / 384, rounded down to a
// multiple of 8); setmaxnreg.inc waits until the pool has the registers, so 128 P + 256 C <= 384 x 168 (more
// would deadlock the consumers).
#ifndef V4K_ATTN_PRODUCER_REGS
#define V4K_ATTN_PRODUCER_REGS 112
#endif
constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
constexpr int kProducerRegs = V4K_ATTN_PRODUCER_REGS;
constexpr int kConsumerRegs = (kThreads * kLaunchRegs - 128 * kProducerRegs) / 256 / 8 * 8;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= kThreads * kLaunchRegs, "register pool");
// shared memory map (offsets from a 1024-aligned base)
constexpr int kOffQ = 0;
constexpr int kOffKV = 8 * kQChunkBytes;                       // bf16 tiles [kStages]
constexpr int kOffRaw = kOffKV + kStages * kTileBytes;         // raw rows [kRawStages][32][592]
constexpr int kOffScw = kOffRaw + kRawStages * kRawBytes;      // int64 [kRawStages][32]: scale words
constexpr int kRowAhead = 6;                                   // tiles of row offsets / scale words in flight
constexpr int kRowRing = kRowAhead + 1;
constexpr int kOffRowRing = kOffScw + kRawStages * kBN * 8;    // int64 [kRowRing][2][32]: the loader's cp.async ring
constexpr int kOffXchg = kOffRowRing + kRowRing * 2 * kBN * 8; // float [2][16][128]: the consumers' partial S
constexpr int kOffMask = kOffXchg + 2 * 16 * 128 * 4;          // float [kStages][32]: 1 valid key, 0 ignored
constexpr int kOffBar = kOffMask + kStages * kBN * 4;          // raw_full, raw_empty [kRawStages]; kv_full, kv_empty [kStages]
constexpr int kSmemBytes = kOffBar + (2 * kRawStages + 2 * kStages) * 8 + 1024;  // + alignment slack
__host__ __device__ constexpr int bar_raw_full(int r) { return kOffBar + r * 8; }
__host__ __device__ constexpr int bar_raw_empty(int r) { return kOffBar + (kRawStages + r) * 8; }
__host__ __device__ constexpr int bar_kv_full(int s) { return kOffBar + (2 * kRawStages + s) * 8; }
__host__ __device__ constexpr int bar_kv_empty(int s) { return kOffBar + (2 * kRawStages + kStages + s) * 8; }

struct AttnParams {
  const __nv_bfloat16* q;
  int64_t stride_qt, stride_qh;
  const int* tok_pos;
  const uint8_t* cache;  // base of the lower cache; rows are byte offsets from it
  const int64_t* rows;
  const int64_t* scw;
  const int* nkeys;
  int64_t NK;
  const float* sink;  // nullable
  const float* cos;   // nullable (no inverse RoPE)
  const float* sin;
  int max_pos;
  __nv_bfloat16* out;
  int64_t stride_ot, stride_oh;
  float* lse;
  int64_t stride_lt;
  float* po;  // split partials (num_splits > 1)
  float* pl;
  int H, num_splits;
  float qk_scale;  // 512^-0.5 * log2(e)
};

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
// byte offset of 16-byte column `col` of row `row` inside a 128-byte-swizzled block of 128-byte rows
__device__ __forceinline__ uint32_t sw128_off(int row, int col) {
  return static_cast<uint32_t>(row * 128 + ((col ^ (row & 7)) << 4));
}

__device__ __forceinline__ void sts_v4(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
// two e4m3 (low byte first) * scale -> bf16x2, exact (e4m3 -> f16 is exact, the power-of-two scale in fp32)
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t two, float scale) {
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(static_cast<uint16_t>(two)));
  __half2 h = *reinterpret_cast<__half2*>(&h2);
  float2 f = __half22float2(h);
  __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
  return *reinterpret_cast<uint32_t*>(&b);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&b);
}
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// D[64 x 32] (+)= A[64 x 16] * B[32 x 16]^T, A and B K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n32k16_ss(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(accumulate));
}
// D[64 x 256] += A[64 x 16] * B[16 x 256], A in registers (bf16 fragments), B MN-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_rs_tnspb(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
// Keep the compiler from moving accesses of the accumulator registers across wgmma issue / wait.
__device__ __forceinline__ void fence_regs16(float* d) {
  asm volatile("" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])::"memory");
}
__device__ __forceinline__ void fence_regs128(float* d) {
  asm volatile("" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])::"memory");
}

// ---------------------------------------------------------------------------------------------- producer
// Warp 0: the loader. Lane k owns key k of each tile: its row offset and scale word arrive kRowAhead tiles ahead
// through a cp.async ring (the loader never waits on a global load), then one 576-byte bulk copy of the row
// into the raw ring (ignored keys: none), up to kRawStages tiles ahead of the converters.
__device__ __forceinline__ void loader(const AttnParams& p, uint8_t* sm, int t, int start, int end) {
  const int lane = threadIdx.x & 31;
  const uint32_t s_base = smem_u32(sm);
  int64_t* scw_s = reinterpret_cast<int64_t*>(sm + kOffScw);
  const int64_t* ring = reinterpret_cast<const int64_t*>(sm + kOffRowRing);
  const int64_t* rows_t = p.rows + static_cast<int64_t>(t) * p.NK;
  const int64_t* scw_t = p.scw + static_cast<int64_t>(t) * p.NK;
  const int ntiles = (end - start + kBN - 1) / kBN;
  // row offset / scale word of key `lane` of tile j -> ring slot j % kRowRing (keys past the end: -1)
  auto fetch = [&](int j) {
    const int key = start + j * kBN + lane;
    const uint32_t slot = s_base + kOffRowRing + (j % kRowRing) * 2 * kBN * 8 + lane * 8;
    if (key < end) {
      cp_async8(slot, rows_t + key);
      cp_async8(slot + kBN * 8, scw_t + key);
    } else {
      asm volatile("st.shared.v2.u32 [%0], {%1, %1};\nst.shared.v2.u32 [%2], {%1, %1};\n" ::"r"(slot), "r"(-1),
                   "r"(slot + kBN * 8)
                   : "memory");
    }
    cp_async_commit();  // one group per tile (possibly empty): wait_group counts tiles
  };
#pragma unroll 1
  for (int j = 0; j < kRowAhead; ++j) fetch(j);
  for (int it = 0; it < ntiles; ++it) {
    fetch(it + kRowAhead);
    cp_async_wait<kRowAhead>();  // tile it's words have landed (this lane's)
    const int64_t row = ring[(it % kRowRing) * 2 * kBN + lane];
    const int64_t sw = ring[(it % kRowRing) * 2 * kBN + kBN + lane];
    const int r = it % kRawStages;
    mbar_wait(s_base + bar_raw_empty(r), ((it / kRawStages) & 1) ^ 1);
    const bool valid = sw >= 0 && row >= 0;  // the rows kernel marks ignored keys in both words
    scw_s[r * kBN + lane] = valid ? sw : -1;
    const unsigned vmask = __ballot_sync(0xffffffffu, valid);
    __syncwarp();
    if (lane == 0) mbar_arrive_expect_tx(s_base + bar_raw_full(r), __popc(vmask) * kRowBytes);
    __syncwarp();
    if (valid) {
      bulk_load(s_base + kOffRaw + r * kRawBytes + lane * kRawPitch, p.cache + row, kRowBytes,
                s_base + bar_raw_full(r));
    }
  }
  cp_async_wait<0>();
}

// Warps 1-3: the converters. Thread (warp 1 + w, lane k) converts pieces u = 3j + w (j = 0..11) of key k's raw
// row into the bf16 tile: e4m3 -> f16x2 (one cvt per 2) -> fp32 * 2^(e8m0 - 127) (exact) -> bf16x2; the rope
// pieces are copied. Ignored keys give zero rows. Then the per-key mask for the consumers.
__device__ __forceinline__ void converter(uint8_t* sm, int start, int end) {
  const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) - 1;  // w = 0..2
  const uint32_t s_base = smem_u32(sm);
  const int64_t* scw_s = reinterpret_cast<const int64_t*>(sm + kOffScw);
  float* kmask = reinterpret_cast<float*>(sm + kOffMask);
  const int key = lane, x = key & 7;  // x: the 128-byte swizzle of this key's tile rows
  int it = 0;
  for (int kb = start; kb < end; kb += kBN, ++it) {
    const int r = it % kRawStages, s = it % kStages;
    mbar_wait(s_base + bar_raw_full(r), (it / kRawStages) & 1);
    mbar_wait(s_base + bar_kv_empty(s), ((it / kStages) & 1) ^ 1);
    const int64_t sw = scw_s[r * kBN + key];
    if (w == 0) kmask[s * kBN + key] = sw >= 0 ? 1.f : 0.f;
    const uint32_t src = s_base + kOffRaw + r * kRawBytes + key * kRawPitch;
    const uint32_t krow = s_base + kOffKV + s * kTileBytes + key * 128;
#pragma unroll
    for (int j = 0; j < kUnits / 3; ++j) {
      const int u = 3 * j + w;  // warp-uniform
      uint4 v = make_uint4(0, 0, 0, 0);
      if (sw >= 0) v = lds_v4(src + u * 16);
      if (u < 28) {  // 16 e4m3 bytes = dims 16u .. 16u+15 = chunk u / 4, 16-byte columns 2(u%4), 2(u%4)+1
        const int c = u >> 2;
        const uint32_t e = static_cast<uint32_t>(sw >> (8 * c)) & 0xFF;
        float scale = __uint_as_float(e << 23);  // 2^(e - 127) (e = 0 gives 0, as the Triton kernel)
        if (e == 255) scale = __int_as_float(0x7fffffff);
        if (sw < 0) scale = 0.f;  // ignored key: zeros
        uint4 lo, hi;
        lo.x = e4m3x2_to_bf16x2(v.x, scale);
        lo.y = e4m3x2_to_bf16x2(v.x >> 16, scale);
        lo.z = e4m3x2_to_bf16x2(v.y, scale);
        lo.w = e4m3x2_to_bf16x2(v.y >> 16, scale);
        hi.x = e4m3x2_to_bf16x2(v.z, scale);
        hi.y = e4m3x2_to_bf16x2(v.z >> 16, scale);
        hi.z = e4m3x2_to_bf16x2(v.w, scale);
        hi.w = e4m3x2_to_bf16x2(v.w >> 16, scale);
        const uint32_t blk = krow + c * kChunkBytes;
        sts_v4(blk + (((u & 3) * 2) ^ x) * 16, lo);
        sts_v4(blk + (((u & 3) * 2 + 1) ^ x) * 16, hi);
      } else {  // 8 bf16 rope dims: chunk 7, column u - 28
        sts_v4(krow + 7 * kChunkBytes + ((u - 28) ^ x) * 16, v);
      }
    }
    fence_proxy_async();  // generic-proxy stores -> visible to wgmma (async proxy)
    mbar_arrive(s_base + bar_kv_full(s));
    mbar_arrive(s_base + bar_raw_empty(r));
  }
}

// ---------------------------------------------------------------------------------------------- consumer
__device__ __forceinline__ void consumer(const AttnParams& p, uint8_t* sm, int t, int split, int hb, int start,
                                         int end, int wg) {
  const int tid = threadIdx.x & 127;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const uint32_t s_base = smem_u32(sm);
  const float* kmask = reinterpret_cast<const float*>(sm + kOffMask);
  float* xchg = reinterpret_cast<float*>(sm + kOffXchg);

  // wgmma descriptors of stage 0 at this warpgroup's dims: Q and K (K-major), V (N-major)
  const uint64_t qdesc0 = sw128_desc(s_base + kOffQ + 4 * wg * kQChunkBytes, 16, 1024);
  const uint64_t kdesc0 = sw128_desc(s_base + kOffKV + 4 * wg * kChunkBytes, 16, 1024);
  const uint64_t vdesc0 = sw128_desc(s_base + kOffKV + 4 * wg * kChunkBytes, kChunkBytes, 1024);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // this thread's partial row sums (its 16 columns per tile); quad-summed at the end

  int it = 0;
  for (int kb = start; kb < end; kb += kBN, ++it) {
    const int s = it % kStages;
    mbar_wait(s_base + bar_kv_full(s), (it / kStages) & 1);
    float sc[16];  // S [64 heads x 32 keys]: n8 block j holds keys 8j + 2tq + {0, 1} of rows g, g + 8
#pragma unroll
    for (int i = 0; i < 16; ++i) sc[i] = 0.f;
    fence_regs16(sc);
    wgmma_fence();
    const uint64_t kdesc = kdesc0 + static_cast<uint64_t>(s * (kTileBytes >> 4));
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {  // this warpgroup's 256 dims, 16 per step: chunk 4wg + kk / 4, column kk % 4
      // descriptor + (byte offset >> 4): the start-address field (addresses < 256 KB: no carry out of it)
      wgmma_m64n32k16_ss(sc, qdesc0 + (((kk >> 2) * kQChunkBytes + (kk & 3) * 32) >> 4),
                         kdesc + (((kk >> 2) * kChunkBytes + (kk & 3) * 32) >> 4), kk > 0);
    }
    wgmma_commit();
    wgmma_wait0();
    fence_regs16(sc);
    // S = the two warpgroups' partial sums (dims 0..255 + dims 256..511), exchanged through shared memory; both
    // add the same two numbers, so both hold the same S
    consumer_sync();  // the other warpgroup has read the previous tile's partials
#pragma unroll
    for (int i = 0; i < 16; ++i) xchg[(wg * 16 + i) * 128 + tid] = sc[i];
    consumer_sync();
#pragma unroll
    for (int i = 0; i < 16; ++i) sc[i] += xchg[((1 - wg) * 16 + i) * 128 + tid];

    // online softmax in log2 units; rows g and g + 8 of this warp's 16 heads
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = kmask[s * kBN + 8 * j + 2 * tq + (e & 1)] != 0.f;
        const float x = ok ? sc[4 * j + e] * p.qk_scale : -INFINITY;
        sc[4 * j + e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], msafe[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mn = fmaxf(m[r], mx[r]);
      msafe[r] = mn == -INFINITY ? 0.f : mn;
      alpha[r] = exp2f(m[r] - msafe[r]);
      m[r] = mn;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float pe = exp2f(sc[i] - msafe[(i >> 1) & 1]);
      sc[i] = pe;
      l[(i >> 1) & 1] += pe;
    }
    uint32_t pa[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {  // keys 16kk .. 16kk+15 = n8 blocks 2kk, 2kk+1 -> the A fragment of k step kk
      pa[kk][0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
      pa[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
      pa[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
      pa[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
    if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {  // no row max of the warp moved: O as is
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= alpha[(i >> 1) & 1];
    }
    fence_regs128(o);
    wgmma_fence();
    const uint64_t vdesc = vdesc0 + static_cast<uint64_t>(s * (kTileBytes >> 4));
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      // V = the tile read N-major: 64-dim chunks 4wg .. 4wg+3 (LBO = one chunk block), keys 16kk.. (8 keys per 1 KB)
      wgmma_m64n256k16_rs_tnspb(o, pa[kk], vdesc + ((kk * 2048) >> 4));
    }
    wgmma_commit();
    wgmma_wait0();
    fence_regs128(o);
    mbar_arrive(s_base + bar_kv_empty(s));
  }

  // ---- epilogue
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int pos = p.tok_pos[t];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int head = hb * kHeads + warp * 16 + g + 8 * r;
    if (head >= p.H) continue;
    const bool has = l[r] > 0.f;
    const float ms = has ? m[r] : 0.f;
    const float lse2 = ms + log2f(has ? l[r] : 1.f);
    if (p.num_splits == 1) {
      float denom = l[r];
      if (p.sink != nullptr) denom += exp2f(p.sink[head] * 1.4426950408889634f - ms);
      const float inv = has ? 1.f / denom : 0.f;  // one division per row; o * inv is within 1 ulp of o / denom
      if (wg == 0 && tq == 0) p.lse[t * p.stride_lt + head] = has ? lse2 * 0.6931471805599453f : INFINITY;
      __nv_bfloat16* orow = p.out + t * p.stride_ot + head * p.stride_oh + 256 * wg;
      const bool rope = p.cos != nullptr && pos >= 0 && pos < p.max_pos;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int d = 8 * j + 2 * tq;  // within this warpgroup's 256 dims
        float x = round_bf16(o[4 * j + 2 * r] * inv);
        float y = round_bf16(o[4 * j + 2 * r + 1] * inv);
        if (wg == 1 && j >= 24 && rope) {  // dims 448.. : rotate by conj(freqs_cis[pos]) after the bf16 cast
          const int pr = (d - 192) >> 1;    // pair index (256 + d - 448) / 2
          const float cs = p.cos[static_cast<int64_t>(pos) * 32 + pr];
          const float sn = p.sin[static_cast<int64_t>(pos) * 32 + pr];
          const float x2 = x * cs + y * sn;
          const float y2 = y * cs - x * sn;
          x = round_bf16(x2);
          y = round_bf16(y2);
        }
        *reinterpret_cast<__nv_bfloat162*>(orow + d) = __floats2bfloat162_rn(x, y);
      }
    } else {
      const int64_t prow = (static_cast<int64_t>(t) * p.num_splits + split) * p.H + head;
      if (wg == 0 && tq == 0) p.pl[prow] = has ? lse2 : -INFINITY;
      float* dst = p.po + prow * 512 + 256 * wg;
      const float inv = has ? 1.f / l[r] : 0.f;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int d = 8 * j + 2 * tq;
        float2 v;
        v.x = o[4 * j + 2 * r] * inv;
        v.y = o[4 * j + 2 * r + 1] * inv;
        *reinterpret_cast<float2*>(dst + d) = v;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) sparse_attn_fwd_kernel(const __grid_constant__ AttnParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* sm = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int t = blockIdx.x, split = blockIdx.y, hb = blockIdx.z;
  const uint32_t s_base = smem_u32(sm);

  if (threadIdx.x == 0) {
    for (int r = 0; r < kRawStages; ++r) {
      mbar_init(s_base + bar_raw_full(r), 1);              // the loader's expect_tx arrival + the copies' bytes
      mbar_init(s_base + bar_raw_empty(r), kConverters);
    }
    for (int s = 0; s < kStages; ++s) {
      mbar_init(s_base + bar_kv_full(s), kConverters);
      mbar_init(s_base + bar_kv_empty(s), 256);           // the consumer threads
    }
  }
  __syncthreads();  // barriers initialised

  // this split's key range (as the Triton kernel: whole tiles per split)
  const int n = p.nkeys[t];
  const int per = (n + p.num_splits - 1) / p.num_splits;
  const int chunk = (per + kBN - 1) / kBN * kBN;
  const int start = split * chunk;
  const int end = min(start + chunk, n);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x < 32) {
      loader(p, sm, t, start, end);
    } else {
      converter(sm, start, end);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    // Q [64 heads][512] -> shared memory [8 chunks][64 heads][64 dims], swizzled (heads >= H: zeros); all loads
    // of a thread first, then its stores
    const int ct = threadIdx.x - 128;
    uint4 v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int idx = i * 256 + ct, h = idx >> 6, unit = idx & 63, head = hb * kHeads + h;
      v[i] = make_uint4(0, 0, 0, 0);
      if (head < p.H) v[i] = *reinterpret_cast<const uint4*>(p.q + t * p.stride_qt + head * p.stride_qh + unit * 8);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int idx = i * 256 + ct, h = idx >> 6, unit = idx & 63;
      sts_v4(s_base + kOffQ + (unit >> 3) * kQChunkBytes + sw128_off(h, unit & 7), v[i]);
    }
    fence_proxy_async();
    asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the two consumer warpgroups
    consumer(p, sm, t, split, hb, start, end, wg - 1);
  }
}

}  // namespace

void sparse_attn_fwd_launch(const void* q, int64_t stride_qt, int64_t stride_qh, const int* tok_pos, const void* cache,
                            const int64_t* rows, const int64_t* scw, const int* nkeys, int64_t NK, const float* sink,
                            const float* cos, const float* sin, int64_t max_pos, void* out, int64_t stride_ot,
                            int64_t stride_oh, float* lse, int64_t stride_lt, float* po, float* pl, int64_t T,
                            int64_t H, int64_t num_splits, cudaStream_t stream) {
  if (T <= 0 || H <= 0) return;
  if (num_splits < 1 || num_splits > 65535) throw std::invalid_argument("sparse_attn_fwd: num_splits out of range");
  // set on every launch (the attribute is per device; a cheap driver call, allowed under graph capture)
  cudaError_t err = cudaFuncSetAttribute(sparse_attn_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kSmemBytes);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sparse_attn_fwd: cannot reserve ") + std::to_string(kSmemBytes) +
                             " B of shared memory: " + cudaGetErrorString(err));
  }
  AttnParams p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.stride_qt = stride_qt;
  p.stride_qh = stride_qh;
  p.tok_pos = tok_pos;
  p.cache = static_cast<const uint8_t*>(cache);
  p.rows = rows;
  p.scw = scw;
  p.nkeys = nkeys;
  p.NK = NK;
  p.sink = sink;
  p.cos = cos;
  p.sin = sin;
  p.max_pos = static_cast<int>(max_pos);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.stride_ot = stride_ot;
  p.stride_oh = stride_oh;
  p.lse = lse;
  p.stride_lt = stride_lt;
  p.po = po;
  p.pl = pl;
  p.H = static_cast<int>(H);
  p.num_splits = static_cast<int>(num_splits);
  p.qk_scale = static_cast<float>(0.044194173824159216 * 1.4426950408889634);  // 512^-0.5 * log2(e), as Triton's
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(num_splits), static_cast<unsigned>((H + kHeads - 1) / kHeads));
  sparse_attn_fwd_kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  check_launch("sparse_attn_fwd_kernel");
}

}  // namespace v4k
