// DecodeParams: the one by-value argument of the split-KV decode kernels (decode_tc.cu).
//
// Python mirrors it as a NumPy structured dtype (cuflash/_gpu/decode.py): `fwd` is a FwdParams
// (cuflash/_gpu/params.py's mirror), every field after it is 8 bytes wide, so the mirror has no
// padding of its own to get wrong; tests/test_kvcache.py compiles a probe of every offset.
#pragma once
#include "params.cuh"

namespace cuflash {

struct DecodeParams {
    // What the shared mask and score-modifier code reads (mask.cuh's Mask, score_mod.cuh's
    // ScoreMod): window_left / window_right (unbounded: -1), scale, scale_log2, softcap,
    // alibi_slopes and sinks (float, one per attention row b * Hq + h, or null). batch_shape is
    // all ones and num_heads = kv_group = 1, so that BatchIndex(fwd, 0) is well defined; every
    // tensor pointer and stride of fwd is unused (0).
    FwdParams fwd;

    const void* q;        // (B, Hq, Lq, D), strides below, last axis contiguous
    const void* k_cache;  // contiguous: (B, Hk, Lmax, D); paged: (num_pages, Hk, page_size, D)
    const void* v_cache;  // the same with Dv
    void* o;              // (B, Hq, Lq, Dv) Element: the result when num_splits == 1
    float* lse;           // (B, Hq, Lq) contiguous: the result when num_splits == 1
    float* part_o;        // (num_splits, B * Hq * Lq, Dv) fp32 partials when num_splits > 1, else null
    float* part_lse;      // (num_splits, B * Hq * Lq) fp32
    const int* cache_seqlens;  // (B,) on the device, or null: every sequence holds seqlen_fixed
    const int* block_table;    // (B, max_pages) on the device, or null: a contiguous cache

    long long q_batch_stride, q_head_stride, q_row_stride;  // in elements
    long long k_page_stride, k_head_stride, k_row_stride;   // page (paged) or sequence (contiguous)
    long long v_page_stride, v_head_stride, v_row_stride;
    long long o_batch_stride, o_head_stride, o_row_stride;
    long long table_stride;  // block_table's row stride, in entries

    long long batch, heads_q, heads_k, seqlen_q, head_dim, head_dim_v;
    long long seqlen_fixed;     // the cache length of every sequence when cache_seqlens is null
    long long new_keys;         // Lnew: sequence b attends over cache_seqlens[b] + new_keys keys
    long long page_size;        // paged: slots per page (any >= 1); contiguous: unused
    long long heads_per_block;  // query heads whose rows one block holds (divides Hq / Hk)
    long long row_chunks;       // blocks along the rows of one head block (heads_per_block * Lq rows)
    long long num_splits;       // key ranges per sequence
    long long bottom_right;     // 1: the diagonal of sequence b is its Lk - Lq; 0: top-left (0)
    // Bounds on values the host may not have checked (under graph capture it reads none): a
    // sequence's keys are cut at capacity and a page id is clamped into [0, num_pages), so that
    // bad lengths or pages give a wrong result, never an access outside the cache.
    long long capacity;         // Lmax (max_pages * page_size when paged)
    long long num_pages;        // paged: pages of the cache; contiguous: unused
};

}  // namespace cuflash
