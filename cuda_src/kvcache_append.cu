// attention_with_kvcache's append on the GPU: the new keys and values k, v (B, Hk, Lnew, D / Dv)
// written in place into the cache at positions cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1 of
// sequence b, through its block-table row when the cache is paged (position p lives in page
// block_table[b, p / page_size], slot p % page_size). The lengths and the table are read here, on
// the device, so the host never reads them: no synchronization, and the launch can be captured
// in a CUDA graph whose replays follow whatever lengths and table the device holds then.
//
// It moves bits, so one instantiation per element width serves every dtype of that width
// (Element: __half for 2 bytes, float for 4, double for 8; cuflash/_gpu/kvcache_append.py picks
// it). One warp per new row (b, h, t), its lanes along the row's D (then Dv) elements: the cache's
// last axis is contiguous, so a warp's stores are consecutive. Any strides otherwise (in elements):
// the new k and v, the cache's page/sequence, head and slot axes, cache_seqlens and the table.
//
// Rows whose slot falls outside the cache (a position < 0 or >= capacity, a page id < 0 or
// >= num_pages) are not written: the host checks that none does, except under graph capture,
// where the caller guarantees it; should it not hold, memory beyond the cache is left alone.
// Every field of AppendParams is 8 bytes wide, so its NumPy mirror (kvcache_append.py) has no
// padding to get wrong; tests/test_kvcache_capture.py checks the offsets.
#include <cuda_fp16.h>

#define CUFLASH_APPEND_THREADS 128

namespace cuflash {

struct AppendParams {
    const void* k;             // (B, Hk, Lnew, D) new keys
    const void* v;             // (B, Hk, Lnew, Dv) new values
    void* k_cache;             // contiguous: (B, Hk, Lmax, D); paged: (num_pages, Hk, page_size, D)
    void* v_cache;             // the same with Dv
    const int* cache_seqlens;  // (B,) on the device, or null: every sequence holds seqlen_fixed
    const int* block_table;    // (B, max_pages) on the device, or null: a contiguous cache
    long long k_batch_stride, k_head_stride, k_row_stride, k_col_stride;  // in elements
    long long v_batch_stride, v_head_stride, v_row_stride, v_col_stride;
    long long k_cache_page_stride, k_cache_head_stride, k_cache_row_stride;  // page (paged) or sequence
    long long v_cache_page_stride, v_cache_head_stride, v_cache_row_stride;
    long long seqlens_stride;                  // cache_seqlens' stride, in entries
    long long table_stride, table_col_stride;  // block_table's strides, in entries
    long long batch, heads_k, new_keys, head_dim, head_dim_v;
    long long seqlen_fixed;  // the cache length of every sequence when cache_seqlens is null
    long long page_size;     // paged: slots per page; contiguous: unused
    long long capacity;      // Lmax (max_pages * page_size when paged): positions past it are not written
    long long num_pages;     // paged: pages of the cache; contiguous: unused
};

template <int kBytes>
struct AppendWord;
template <>
struct AppendWord<2> {
    using type = unsigned short;
};
template <>
struct AppendWord<4> {
    using type = unsigned;
};
template <>
struct AppendWord<8> {
    using type = unsigned long long;
};

// One row of `width` elements from src (stride src_col) to dst (contiguous), by the warp's lanes.
template <typename Word>
__device__ __forceinline__ void append_row(Word* dst, const Word* src, long long src_col, int width, int lane) {
    for (int c = lane; c < width; c += 32) dst[c] = src[c * src_col];
}

template <typename Element>
__global__ void __launch_bounds__(CUFLASH_APPEND_THREADS) kvcache_append(const AppendParams p) {
    using Word = typename AppendWord<sizeof(Element)>::type;
    constexpr int kWarps = CUFLASH_APPEND_THREADS / 32;
    const int lane = threadIdx.x % 32;
    // 32-bit row arithmetic (the host keeps B * Hk * Lnew below 2^31): 64-bit division is a call.
    const int lnew = static_cast<int>(p.new_keys), heads_k = static_cast<int>(p.heads_k);
    const int rows = static_cast<int>(p.batch * p.heads_k * p.new_keys);
    const int page_size = static_cast<int>(p.page_size);
    for (int row = blockIdx.x * kWarps + threadIdx.x / 32; row < rows; row += gridDim.x * kWarps) {
        const int t = row % lnew, bh = row / lnew, h = bh % heads_k, b = bh / heads_k;
        const long long length =
            p.cache_seqlens != nullptr ? static_cast<long long>(p.cache_seqlens[b * p.seqlens_stride]) : p.seqlen_fixed;
        const long long position = length + t;
        if (position < 0 || position >= p.capacity) continue;
        long long first = b, slot = position;
        if (p.block_table != nullptr) {
            const int at = static_cast<int>(position) / page_size;
            first = p.block_table[b * p.table_stride + at * p.table_col_stride];
            slot = static_cast<int>(position) - at * page_size;
            if (first < 0 || first >= p.num_pages) continue;
        }
        const Word* k = static_cast<const Word*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride + t * p.k_row_stride;
        const Word* v = static_cast<const Word*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride + t * p.v_row_stride;
        Word* k_cache = static_cast<Word*>(p.k_cache) + first * p.k_cache_page_stride + h * p.k_cache_head_stride +
                        slot * p.k_cache_row_stride;
        Word* v_cache = static_cast<Word*>(p.v_cache) + first * p.v_cache_page_stride + h * p.v_cache_head_stride +
                        slot * p.v_cache_row_stride;
        append_row(k_cache, k, p.k_col_stride, static_cast<int>(p.head_dim), lane);
        append_row(v_cache, v, p.v_col_stride, static_cast<int>(p.head_dim_v), lane);
    }
}

}  // namespace cuflash
