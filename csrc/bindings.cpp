// The one binding file of v4kernels._C: op schemas (namespace v4kernels_C) and their CUDA
// implementations, through PyTorch's stable C ABI so that one .so serves several torch versions.
// The public ops live in the `v4kernels` namespace (python/v4kernels/_dispatch.py); these are
// the CUDA backends they dispatch to. Shapes, dtypes and devices are checked in Python before
// any call lands here; the checks below only guard the C++ boundary.
#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/stream.h"

namespace v4k {
void act_quant_fp8_launch(const void* x, void* q, void* s, int64_t rows, int64_t cols, int64_t block,
                          int device, cudaStream_t stream);
void moe_mxfp4_decode_launch(const void* a, const void* a_scale, const void* w0, const void* ws0,
                             const void* w1, const void* ws1, const int* offsets, const int* row_ids,
                             const float* row_weights, void* out, int64_t E, int64_t N, int64_t K, int64_t M,
                             int64_t Ma, int64_t mode, double limit, cudaStream_t stream);
void mhc_pre_launch(const void* x, const void* fn, const void* base, const void* scale, void* part, void* cnt,
                    void* y, void* post, void* comb, void* pre, int64_t T, int64_t d, int64_t ch, int64_t stages,
                    void* trace, double norm_eps, double hc_eps, int64_t iters, int device,
                    cudaStream_t stream);
void sparse_attn_fwd_launch(const void* q, int64_t stride_qt, int64_t stride_qh, const int* tok_pos, const void* cache,
                            const int64_t* rows, const int64_t* scw, const int* nkeys, int64_t NK, const float* sink,
                            const float* cos, const float* sin, int64_t max_pos, void* out, int64_t stride_ot,
                            int64_t stride_oh, float* lse, int64_t stride_lt, float* po, float* pl, int64_t T,
                            int64_t H, int64_t num_splits, cudaStream_t stream);
void indexer_topk_fp4_launch(const void* q, const void* w, int w_f32, const void* cache, int64_t num_pages,
                             int64_t page_bytes, int64_t page_size, const int* bt, int64_t B, int64_t max_pages, const void* seq,
                             int seq_i64, const void* pos, int pos_i64, int64_t T, int64_t H, int64_t n_entries,
                             int64_t chunk, int64_t splits, int64_t M, long long* lists, int* ws,
                             cudaStream_t stream);
void indexer_merge_launch(const long long* lists, const int* ws, int64_t T, int64_t splits, int64_t M, int64_t chunk,
                          int64_t n_entries, int64_t topk, const void* seq, int seq_i64, const void* pos, int pos_i64,
                          int64_t B, const int* kvbt, int64_t kv_B, int64_t kv_max_pages, int64_t kv_page_size,
                          int* idx, int* lengths, int* rows, cudaStream_t stream);
}

namespace {

using torch::stable::Tensor;

// A failed check raises (ValueError in Python) with the message pieces concatenated. Built without iostreams: on
// the GPU machine a failing STD_TORCH_CHECK crashed the process (SIGSEGV in std::ostream while formatting its
// message, seen on the indexer binding), so no binding uses it.
inline void v4k_append(std::string&) {}
template <typename... Rest>
inline void v4k_append(std::string& s, const char* piece, Rest... rest) {
  s += piece;
  v4k_append(s, rest...);
}
template <typename... Pieces>
inline std::string v4k_concat(Pieces... pieces) {
  std::string s;
  v4k_append(s, pieces...);
  return s;
}
#define V4K_CHECK(cond, ...)                                               \
  do {                                                                     \
    if (!(cond)) throw std::invalid_argument(v4k_concat(__VA_ARGS__));     \
  } while (0)

void act_quant_fp8_out(Tensor x, int64_t block, Tensor q, Tensor s) {
  V4K_CHECK(x.is_cuda() && q.is_cuda() && s.is_cuda(), "act_quant_fp8_out: CUDA tensors expected");
  V4K_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(),
                  "act_quant_fp8_out: contiguous tensors expected");
  const int64_t cols = x.dim() == 0 ? 1 : x.size(x.dim() - 1);
  V4K_CHECK(cols % block == 0, "act_quant_fp8_out: last dim must be a multiple of block");
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const int device = x.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::act_quant_fp8_launch(x.data_ptr(), q.data_ptr(), s.data_ptr(), rows, cols, block, device,
                            v4k::current_stream(device));
}

// ---- MXFP4 grouped GEMM, decode regime (csrc/moe/mxfp4_decode.cu) ----
// Python (v4kernels/cuda/moe.py) hands over byte views: a e4m3 as uint8 (mode 0) or bf16 (mode 1),
// e8m0 scales as uint8, int32 offsets / row ids, fp32 row weights; all contiguous, 16-byte aligned.
void check_mxfp4_weight(const char* name, const Tensor& w, const Tensor& ws, int64_t E, int64_t N, int64_t K) {
  V4K_CHECK(w.is_cuda() && ws.is_cuda() && w.is_contiguous() && ws.is_contiguous(), name,
                  ": contiguous CUDA tensors expected");
  V4K_CHECK(w.dim() == 3 && w.element_size() == 1 && w.size(0) == E && w.size(1) == N && w.size(2) == K / 2,
                  name, ": expected uint8 [E, N, K/2]");
  V4K_CHECK(ws.dim() == 3 && ws.element_size() == 1 && ws.size(0) == E && ws.size(1) == N &&
                      ws.size(2) == K / 32, name, " scale: expected e8m0 bytes [E, N, K/32]");
  V4K_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(ws.data_ptr()) % 16 == 0,
                  name, ": 16-byte aligned data expected");
}

void moe_mxfp4_decode_common(const Tensor& a, const std::optional<Tensor>& a_scale, const Tensor& w0,
                             const Tensor& ws0, const Tensor* w1, const Tensor* ws1, const Tensor& expert_offsets,
                             const std::optional<Tensor>& row_ids, const std::optional<Tensor>& row_weights,
                             int64_t mode, double limit, Tensor& out) {
  V4K_CHECK(mode == 0 || mode == 1, "moe_mxfp4_decode: mode must be 0 (w4a8) or 1 (w4a16)");
  V4K_CHECK(w0.dim() == 3, "moe_mxfp4_decode: w must be [E, N, K/2]");
  const int64_t E = w0.size(0), N = w0.size(1), K = 2 * w0.size(2);
  V4K_CHECK(K > 0 && K % 512 == 0, "moe_mxfp4_decode: K must be a positive multiple of 512");
  V4K_CHECK(E >= 1 && E <= 1024, "moe_mxfp4_decode: expected 1 <= E <= 1024 experts");
  check_mxfp4_weight("w", w0, ws0, E, N, K);
  if (w1 != nullptr) check_mxfp4_weight("w3", *w1, *ws1, E, N, K);
  V4K_CHECK(a.is_cuda() && a.is_contiguous() && a.dim() == 2 && a.size(1) == K &&
                      a.element_size() == (mode == 0 ? 1 : 2),
                  "moe_mxfp4_decode: a must be contiguous [Ma, K] e4m3 (w4a8) or bf16 (w4a16)");
  V4K_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0, "moe_mxfp4_decode: a must be 16-byte aligned");
  const int64_t Ma = a.size(0);
  const void* sp = nullptr;
  if (mode == 0) {
    V4K_CHECK(a_scale.has_value(), "moe_mxfp4_decode: w4a8 needs a_scale");
    const Tensor& s = *a_scale;
    V4K_CHECK(s.is_cuda() && s.is_contiguous() && s.dim() == 2 && s.size(0) == Ma && s.size(1) == K / 128 &&
                        s.element_size() == 1,
                    "moe_mxfp4_decode: a_scale must be contiguous e8m0 bytes [Ma, K/128]");
    sp = s.data_ptr();
  }
  V4K_CHECK(expert_offsets.is_cuda() && expert_offsets.is_contiguous() && expert_offsets.dim() == 1 &&
                      expert_offsets.size(0) == E + 1 && expert_offsets.element_size() == 4,
                  "moe_mxfp4_decode: expert_offsets must be contiguous int32 [E+1]");
  int64_t M = Ma;
  const int* rid = nullptr;
  if (row_ids.has_value()) {
    const Tensor& r = *row_ids;
    V4K_CHECK(r.is_cuda() && r.is_contiguous() && r.dim() == 1 && r.element_size() == 4,
                    "moe_mxfp4_decode: row_ids must be contiguous int32 [M]");
    M = r.size(0);
    rid = static_cast<const int*>(r.data_ptr());
  }
  const float* rw = nullptr;
  if (row_weights.has_value()) {
    const Tensor& r = *row_weights;
    V4K_CHECK(r.is_cuda() && r.is_contiguous() && r.dim() == 1 && r.size(0) == M && r.element_size() == 4,
                    "moe_mxfp4_decode: row_weights must be contiguous fp32 [M]");
    rw = static_cast<const float*>(r.data_ptr());
  }
  V4K_CHECK(out.is_cuda() && out.is_contiguous() && out.dim() == 2 && out.size(0) == M && out.size(1) == N &&
                      out.element_size() == 2,
                  "moe_mxfp4_decode: out must be contiguous bf16 [M, N]");
  const int device = out.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::moe_mxfp4_decode_launch(a.data_ptr(), sp, w0.data_ptr(), ws0.data_ptr(), w1 ? w1->data_ptr() : nullptr,
                               ws1 ? ws1->data_ptr() : nullptr, static_cast<const int*>(expert_offsets.data_ptr()),
                               rid, rw, out.data_ptr(), E, N, K, M, Ma, mode, limit, v4k::current_stream(device));
}

void moe_mxfp4_decode_gemm(Tensor a, std::optional<Tensor> a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets,
                           std::optional<Tensor> row_ids, int64_t mode, Tensor out) {
  moe_mxfp4_decode_common(a, a_scale, w, w_scale, nullptr, nullptr, expert_offsets, row_ids, std::nullopt, mode,
                          0.0, out);
}

void moe_mxfp4_decode_swiglu(Tensor a, std::optional<Tensor> a_scale, Tensor w1, Tensor w1_scale, Tensor w3,
                             Tensor w3_scale, Tensor expert_offsets, std::optional<Tensor> row_ids,
                             std::optional<Tensor> row_weights, int64_t mode, double swiglu_limit, Tensor out) {
  moe_mxfp4_decode_common(a, a_scale, w1, w1_scale, &w3, &w3_scale, expert_offsets, row_ids, row_weights, mode,
                          swiglu_limit, out);
}

// ---- mHC hc_pre, one pass over the streams (csrc/mhc/mhc_pre.cu) ----
// x bf16 [T, 4, d] (d % 16 == 0, 16-byte aligned), fn fp32 [24, 4d], base [24], scale [3]; the plan (channel
// slice `ch`, ring `stages`) comes from v4kernels/cuda/mhc.py; workspace: part fp32
// [>= stages * 64 * ceil(d / ch) * 32], cnt int32 [ceil(T / 64) rounded up to 4 + 8 T] zeroed (tile counters, then
// the per-token pre (value, flag) pairs); trace: optional int64
// [ceil(T / 64), 9 + 2 ceil(d / ch)] timeline (profiling).
void mhc_pre_out(Tensor x, Tensor fn, Tensor base, Tensor scale, double norm_eps, double hc_eps, int64_t iters,
                 int64_t ch, int64_t stages, Tensor part, Tensor cnt, Tensor y, Tensor post, Tensor comb,
                 Tensor pre, std::optional<Tensor> trace) {
  for (const Tensor* t : {&x, &fn, &base, &scale, &part, &cnt, &y, &post, &comb, &pre}) {
    V4K_CHECK(t->is_cuda() && t->is_contiguous(), "mhc_pre_out: contiguous CUDA tensors expected");
  }
  V4K_CHECK(x.dim() == 3 && x.size(1) == 4 && x.element_size() == 2, "mhc_pre_out: x must be bf16 [T, 4, d]");
  const int64_t T = x.size(0), d = x.size(2), K = 4 * d;
  V4K_CHECK(d > 0 && d % 16 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
            "mhc_pre_out: d must be a positive multiple of 16 and x 16-byte aligned");
  V4K_CHECK(fn.dim() == 2 && fn.size(0) == 24 && fn.size(1) == K && fn.element_size() == 4,
            "mhc_pre_out: fn must be fp32 [24, 4d]");
  V4K_CHECK(base.numel() == 24 && scale.numel() == 3 && base.element_size() == 4 && scale.element_size() == 4,
            "mhc_pre_out: base fp32 [24] and scale fp32 [3] expected");
  V4K_CHECK(ch > 0 && ch % 8 == 0 && stages >= 2 && stages <= 16,
            "mhc_pre_out: ch must be a positive multiple of 8 and stages in [2, 16], got ch=",
            std::to_string(ch).c_str(), " stages=", std::to_string(stages).c_str());
  const int64_t nc = (d + ch - 1) / ch, nt = (T + 63) / 64;
  V4K_CHECK(part.numel() >= stages * 64 * nc * 32 && part.element_size() == 4, "mhc_pre_out: part too small");
  V4K_CHECK(cnt.numel() >= (nt + 3) / 4 * 4 + 8 * T && cnt.element_size() == 4,
            "mhc_pre_out: cnt must be int32 [ceil(T / 64) rounded up to a multiple of 4, + 8 T]");
  V4K_CHECK(y.numel() == T * d && y.element_size() == 2 && post.numel() == T * 4 && comb.numel() == T * 16 &&
                pre.numel() == T * 4,
            "mhc_pre_out: outputs must be y bf16 [T, d], post / pre fp32 [T, 4], comb fp32 [T, 4, 4]");
  V4K_CHECK(!trace.has_value() || (trace->is_cuda() && trace->is_contiguous() && trace->element_size() == 8 &&
                                   trace->numel() >= nt * (9 + 2 * nc)),
            "mhc_pre_out: trace must be int64 [ceil(T / 64), 9 + 2 ceil(d / ch)] on the GPU");
  const int device = x.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::mhc_pre_launch(x.data_ptr(), fn.data_ptr(), base.data_ptr(), scale.data_ptr(), part.data_ptr(), cnt.data_ptr(),
                      y.data_ptr(), post.data_ptr(), comb.data_ptr(), pre.data_ptr(), T, d, ch, stages,
                      trace.has_value() ? trace->data_ptr() : nullptr, norm_eps,
                      hc_eps, iters, device, v4k::current_stream(device));
}

// ---- attention loop over the FP8 paged caches (csrc/attention/sparse_attn_fwd.cu) ----
// Python (v4kernels/cuda/attention.py) hands over the Triton key-row kernel's outputs: rows / scw int64 [T, NK]
// (byte offsets from `cache`'s data pointer, -1 = ignored), nkeys int32 [T]; q bf16 [T, H, 512] (last dim
// contiguous, 16-byte aligned rows); out bf16 [T, H, 512] or, when num_splits > 1, fp32 partials po
// [T, S, H, 512] and pl [T, S, H] for the combine kernel.
void sparse_attn_fwd(Tensor q, Tensor tok_pos, Tensor cache, Tensor rows, Tensor scw, Tensor nkeys,
                     std::optional<Tensor> sink, std::optional<Tensor> cos, std::optional<Tensor> sin, Tensor out,
                     Tensor lse, std::optional<Tensor> po, std::optional<Tensor> pl, int64_t num_splits) {
  V4K_CHECK(q.is_cuda() && q.dim() == 3 && q.size(2) == 512 && q.element_size() == 2 && q.stride(2) == 1,
                  "sparse_attn_fwd: q must be bf16 [T, H, 512] with a contiguous last dim");
  const int64_t T = q.size(0), H = q.size(1);
  V4K_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0,
                  "sparse_attn_fwd: q rows must be 16-byte aligned");
  V4K_CHECK(rows.is_contiguous() && scw.is_contiguous() && rows.dim() == 2 && rows.size(0) == T &&
                      rows.element_size() == 8 && scw.dim() == 2 && scw.size(0) == T && scw.size(1) == rows.size(1) &&
                      scw.element_size() == 8,
                  "sparse_attn_fwd: rows / scw must be contiguous int64 [T, NK]");
  V4K_CHECK(nkeys.is_contiguous() && nkeys.numel() == T && nkeys.element_size() == 4 && tok_pos.is_contiguous() &&
                      tok_pos.numel() == T && tok_pos.element_size() == 4,
                  "sparse_attn_fwd: nkeys / tok_pos must be contiguous int32 [T]");
  V4K_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0, "sparse_attn_fwd: cache must be 16-byte aligned");
  V4K_CHECK(out.dim() == 3 && out.size(0) == T && out.size(1) == H && out.size(2) == 512 &&
                      out.element_size() == 2 && out.stride(2) == 1 && out.stride(1) % 2 == 0 &&
                      out.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0,
                  "sparse_attn_fwd: out must be bf16 [T, H, 512] with a contiguous last dim, 4-byte aligned rows");
  V4K_CHECK(lse.dim() == 2 && lse.size(0) == T && lse.size(1) == H && lse.element_size() == 4 && lse.stride(1) == 1,
                  "sparse_attn_fwd: lse must be fp32 [T, H] with a contiguous last dim");
  V4K_CHECK(sink.has_value() ? (sink->is_contiguous() && sink->numel() >= H && sink->element_size() == 4) : true,
                  "sparse_attn_fwd: attn_sink must be contiguous fp32 [H]");
  V4K_CHECK(cos.has_value() == sin.has_value(), "sparse_attn_fwd: rope_cos and rope_sin go together");
  if (cos.has_value()) {
    V4K_CHECK(cos->is_contiguous() && sin->is_contiguous() && cos->dim() == 2 && cos->size(1) == 32 &&
                        sin->dim() == 2 && sin->size(0) == cos->size(0) && sin->size(1) == 32 &&
                        cos->element_size() == 4 && sin->element_size() == 4,
                    "sparse_attn_fwd: rope_cos / rope_sin must be contiguous fp32 [max_pos, 32]");
  }
  V4K_CHECK(num_splits >= 1 && num_splits <= 65535, "sparse_attn_fwd: num_splits must be in [1, 65535]");
  if (num_splits > 1) {
    V4K_CHECK(po.has_value() && pl.has_value() && po->is_contiguous() && pl->is_contiguous() &&
                        po->numel() == T * num_splits * H * 512 && pl->numel() == T * num_splits * H &&
                        po->element_size() == 4 && pl->element_size() == 4,
                    "sparse_attn_fwd: split partials must be contiguous fp32 po [T, S, H, 512] and pl [T, S, H]");
  }
  const int device = q.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::sparse_attn_fwd_launch(
      q.data_ptr(), q.stride(0), q.stride(1), static_cast<const int*>(tok_pos.data_ptr()), cache.data_ptr(),
      static_cast<const int64_t*>(rows.data_ptr()), static_cast<const int64_t*>(scw.data_ptr()),
      static_cast<const int*>(nkeys.data_ptr()), rows.size(1),
      sink.has_value() ? static_cast<const float*>(sink->data_ptr()) : nullptr,
      cos.has_value() ? static_cast<const float*>(cos->data_ptr()) : nullptr,
      sin.has_value() ? static_cast<const float*>(sin->data_ptr()) : nullptr, cos.has_value() ? cos->size(0) : 0,
      out.data_ptr(), out.stride(0), out.stride(1), static_cast<float*>(lse.data_ptr()), lse.stride(0),
      num_splits > 1 ? static_cast<float*>(po->data_ptr()) : nullptr,
      num_splits > 1 ? static_cast<float*>(pl->data_ptr()) : nullptr, T, H, num_splits, v4k::current_stream(device));
}

// ---- lightning indexer: scores + per-chunk top-k over the paged FP4 key cache (csrc/indexer/indexer_topk_fp4.cu) ----
// Python (v4kernels/cuda/indexer.py) hands over q bf16 [T, H, 128] and weights [T, H] (fp32 or bf16), contiguous;
// the uint8 IDX_FP4 cache [num_pages, page_size * 68]; int32 block table [B, max_pages]; seq / pos int32 or int64
// [T]; lists int64 [T, splits, M] and the optional score workspace ws int32 [T, n_entries] (the Triton merge
// kernel's inputs).
void indexer_topk_fp4(Tensor q, Tensor w, Tensor cache, Tensor bt, Tensor seq, Tensor pos, int64_t page_size,
                      int64_t n_entries, int64_t chunk, Tensor lists, std::optional<Tensor> ws) {
  V4K_CHECK(q.is_cuda() && q.is_contiguous() && q.dim() == 3 && q.size(2) == 128 && q.element_size() == 2 &&
                      reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
                  "indexer_topk_fp4: q must be contiguous 16-byte aligned bf16 [T, H, 128]");
  const int64_t T = q.size(0), H = q.size(1);
  V4K_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == T && w.size(1) == H &&
                      (w.element_size() == 4 || w.element_size() == 2),
                  "indexer_topk_fp4: weights must be contiguous fp32 / bf16 [T, H]");
  V4K_CHECK(page_size >= 4 && page_size % 4 == 0, "indexer_topk_fp4: page_size must be a multiple of 4");
  V4K_CHECK(cache.is_contiguous() && cache.dim() == 2 && cache.element_size() == 1 &&
                cache.size(1) >= page_size * 68 && cache.size(1) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0,
            "indexer_topk_fp4: cache must be a contiguous 16-byte aligned uint8 [num_pages, page_bytes] "
            "(page_bytes >= page_size * 68, a multiple of 16)");
  V4K_CHECK(bt.is_contiguous() && bt.dim() == 2 && bt.element_size() == 4,
                  "indexer_topk_fp4: block_table must be contiguous int32 [B, max_pages]");
  V4K_CHECK(seq.is_contiguous() && seq.numel() == T && (seq.element_size() == 4 || seq.element_size() == 8) &&
                      pos.is_contiguous() && pos.numel() == T && (pos.element_size() == 4 || pos.element_size() == 8),
                  "indexer_topk_fp4: seq_ids / positions must be contiguous int32 / int64 [T]");
  V4K_CHECK(n_entries >= 0 && n_entries <= bt.size(1) * page_size && n_entries < (1LL << 31),
                  "indexer_topk_fp4: n_entries must be in [0, max_pages * page_size]");
  V4K_CHECK(lists.is_contiguous() && lists.dim() == 3 && lists.size(0) == T && lists.element_size() == 8,
                  "indexer_topk_fp4: lists must be contiguous int64 [T, splits, M]");
  V4K_CHECK(chunk > 0 && chunk % 64 == 0 && lists.size(1) * chunk >= n_entries,
                  "indexer_topk_fp4: chunk must be a multiple of 64 and splits * chunk must cover n_entries");
  V4K_CHECK(!ws.has_value() || (ws->is_contiguous() && ws->numel() == T * n_entries && ws->element_size() == 4),
            "indexer_topk_fp4: ws must be contiguous int32 [T, n_entries]");
  const int device = q.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::indexer_topk_fp4_launch(q.data_ptr(), w.data_ptr(), w.element_size() == 4, cache.data_ptr(), cache.size(0),
                               cache.size(1), page_size, static_cast<const int*>(bt.data_ptr()), bt.size(0), bt.size(1),
                               seq.data_ptr(), seq.element_size() == 8, pos.data_ptr(), pos.element_size() == 8, T, H,
                               n_entries, chunk, lists.size(1), lists.size(2),
                               static_cast<long long*>(lists.data_ptr()),
                               ws.has_value() ? static_cast<int*>(ws->data_ptr()) : nullptr,
                               v4k::current_stream(device));
}

// lists int64 [T, splits, M] (sorted, SENT padded) and ws int32 [T, n_entries] from indexer_topk_fp4; seq / pos
// as there; B = block-table rows; kvbt int32 [kv_B, kv_max_pages] or none; idx int32 [T, topk], lengths int32 [T],
// rows int32 [T, topk] (or [T, 0] without kvbt).
void indexer_merge(Tensor lists, std::optional<Tensor> ws, int64_t chunk, int64_t n_entries, int64_t topk, Tensor seq,
                   Tensor pos, int64_t B, std::optional<Tensor> kvbt, int64_t kv_page_size, Tensor idx, Tensor lengths,
                   Tensor rows) {
  V4K_CHECK(lists.is_cuda() && lists.is_contiguous() && lists.dim() == 3 && lists.element_size() == 8,
            "indexer_merge: lists must be contiguous int64 [T, splits, M]");
  const int64_t T = lists.size(0);
  V4K_CHECK(chunk > 0 && lists.size(1) * chunk >= n_entries && n_entries < (1LL << 31),
            "indexer_merge: splits * chunk must cover n_entries");
  V4K_CHECK(topk >= 1 && topk <= 2048, "indexer_merge: topk must be in [1, 2048]");
  V4K_CHECK(!ws.has_value() || (ws->is_contiguous() && ws->numel() == T * n_entries && ws->element_size() == 4),
            "indexer_merge: ws must be contiguous int32 [T, n_entries]");
  V4K_CHECK(seq.is_contiguous() && seq.numel() == T && (seq.element_size() == 4 || seq.element_size() == 8) &&
                pos.is_contiguous() && pos.numel() == T && (pos.element_size() == 4 || pos.element_size() == 8),
            "indexer_merge: seq_ids / positions must be contiguous int32 / int64 [T]");
  V4K_CHECK(idx.is_contiguous() && idx.numel() == T * topk && idx.element_size() == 4 && lengths.is_contiguous() &&
                lengths.numel() == T && lengths.element_size() == 4,
            "indexer_merge: idx must be int32 [T, topk] and lengths int32 [T]");
  if (kvbt.has_value()) {
    V4K_CHECK(kvbt->is_contiguous() && kvbt->dim() == 2 && kvbt->element_size() == 4 && kv_page_size >= 1 &&
                  rows.is_contiguous() && rows.numel() == T * topk && rows.element_size() == 4,
              "indexer_merge: kv_block_table must be int32 [kv_B, kv_max_pages] with rows int32 [T, topk]");
  }
  const int device = lists.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::indexer_merge_launch(
      static_cast<const long long*>(lists.data_ptr()), ws.has_value() ? static_cast<const int*>(ws->data_ptr()) : nullptr,
      T, lists.size(1), lists.size(2), chunk, n_entries, topk, seq.data_ptr(), seq.element_size() == 8, pos.data_ptr(),
      pos.element_size() == 8, B, kvbt.has_value() ? static_cast<const int*>(kvbt->data_ptr()) : nullptr,
      kvbt.has_value() ? kvbt->size(0) : 0, kvbt.has_value() ? kvbt->size(1) : 0, kv_page_size,
      static_cast<int*>(idx.data_ptr()), static_cast<int*>(lengths.data_ptr()),
      kvbt.has_value() ? static_cast<int*>(rows.data_ptr()) : nullptr, v4k::current_stream(device));
}

}  // namespace

STABLE_TORCH_LIBRARY(v4kernels_C, m) {
  m.def("act_quant_fp8_out(Tensor x, int block, Tensor(a!) q, Tensor(b!) s) -> ()");
  m.def("moe_mxfp4_decode_gemm(Tensor a, Tensor? a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets, "
        "Tensor? row_ids, int mode, Tensor(a!) out) -> ()");
  m.def("moe_mxfp4_decode_swiglu(Tensor a, Tensor? a_scale, Tensor w1, Tensor w1_scale, Tensor w3, "
        "Tensor w3_scale, Tensor expert_offsets, Tensor? row_ids, Tensor? row_weights, int mode, "
        "float swiglu_limit, Tensor(a!) out) -> ()");
  m.def("mhc_pre_out(Tensor x, Tensor fn, Tensor base, Tensor scale, float norm_eps, float hc_eps, int iters, "
        "int ch, int stages, "
        "Tensor(a!) part, Tensor(b!) cnt, Tensor(c!) y, Tensor(d!) post, Tensor(e!) comb, Tensor(f!) pre, "
        "Tensor(g!)? trace) -> ()");
  m.def("sparse_attn_fwd(Tensor q, Tensor tok_pos, Tensor cache, Tensor rows, Tensor scw, Tensor nkeys, "
        "Tensor? sink, Tensor? cos, Tensor? sin, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? po, Tensor(d!)? pl, "
        "int num_splits) -> ()");
  m.def("indexer_topk_fp4(Tensor q, Tensor w, Tensor cache, Tensor bt, Tensor seq, Tensor pos, int page_size, "
        "int n_entries, int chunk, Tensor(a!) lists, Tensor(b!)? ws=None) -> ()");
  m.def("indexer_merge(Tensor lists, Tensor? ws, int chunk, int n_entries, int topk, Tensor seq, Tensor pos, int B, "
        "Tensor? kvbt, int kv_page_size, Tensor(a!) idx, Tensor(b!) lengths, Tensor(c!) rows) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(v4kernels_C, CUDA, m) {
  m.impl("act_quant_fp8_out", TORCH_BOX(&act_quant_fp8_out));
  m.impl("moe_mxfp4_decode_gemm", TORCH_BOX(&moe_mxfp4_decode_gemm));
  m.impl("moe_mxfp4_decode_swiglu", TORCH_BOX(&moe_mxfp4_decode_swiglu));
  m.impl("mhc_pre_out", TORCH_BOX(&mhc_pre_out));
  m.impl("sparse_attn_fwd", TORCH_BOX(&sparse_attn_fwd));
  m.impl("indexer_topk_fp4", TORCH_BOX(&indexer_topk_fp4));
  m.impl("indexer_merge", TORCH_BOX(&indexer_merge));
}

// Importing v4kernels._C runs the static registrations above; the module itself is empty.
static struct PyModuleDef v4k_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&v4k_module); }
