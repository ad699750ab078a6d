// Split-KV decoding over a KV cache (flash-decoding) for float16 / bfloat16 on tensor cores.
//
// Decoding reads the whole cache for a handful of query rows: its limit is memory bandwidth,
// so the design is about reading every K/V byte once and keeping enough of them in flight.
//
//   decode_tc       one block per (sequence b, head block, row chunk, split s). A head block is
//                   heads_per_block query heads of one kv head (normally its whole GQA group):
//                   their rows (head, query i), heads_per_block * Lq of them, share every K/V tile
//                   the block reads, so K/V are read once per kv head, not once per query head.
//                   The keys of split s are a contiguous range of whole key tiles of the keys
//                   the block's rows may see (Mask::tiles), out of sequence b's
//                   cache_seqlens[b] + Lnew, a length read here, on the device. K/V tiles stream
//                   through shared memory kStages deep (cp.async), read in place through the
//                   block table when the cache is paged (each key row looks up its own page, so
//                   any page size works and a tile may straddle pages).
//   decode_combine  num_splits > 1: the splits' fp32 partials (out normalised over the split's
//                   keys, and its lse) merged into out (Element) and lse, as merge_attention.cu
//                   merges parts (its formula, in a fixed order: bitwise reproducible), fused
//                   with the rounding to Element (merge_attention reads parts of the output's
//                   own type, and fp32 partials keep the splits' rounding out of the result).
//
// Inside a block, 4 warps form a kWarpsM x kWarpsN grid over (16-row m tiles) x (key quarters
// of each key tile): few rows (Lq = 1) put all four warps on the same rows, each on its own
// keys of every tile, so the MMA work per tile is spread over four warps instead of idling
// three; their softmax states are merged through shared memory at the end, in a fixed order.
// The online softmax is softmax_tc.cuh's (fp32); the mask is mask.cuh's and the score
// modifiers score_mod.cuh's (softcap; ALiBi when a block holds one head, heads_per_block = 1,
// since its slope is per head; sinks per row, in split 0 only).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_prep.cuh"
#include "decode.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"
#include "softmax_tc.cuh"
#include "tile_tc.cuh"

#define CUFLASH_DECODE_THREADS 128

namespace cuflash {

// Keys per K/V tile: 64 at D 128, 128 at D 64, so that a tile is the same bytes (and the same
// MMAs per warp) at both widths. Each tile costs the loop a fixed toll (the pipeline's wait and
// barrier, the softmax's row bookkeeping) whatever its width: with 64-key tiles D 64 paid it
// twice per byte and ran at 2.4-3.1 TB/s where D 128 ran at 3.7-4.1 (session 32).
template <int kHeadDim>
constexpr int decode_block_n() { return kHeadDim <= 64 ? 128 : 64; }

// The dynamic shared memory of a decode_tc instantiation (cuflash/_gpu/decode.py computes the
// same): the block's Q rows, then kStages (K, V) tile pairs. The warps' softmax states are
// merged at the end through the K/V stages, which then hold no tile.
template <typename Element, int kHeadDim, int kWarpsM, int kStages>
constexpr unsigned decode_tc_smem_bytes() {
    return tc::SmemTile<16 * kWarpsM, kHeadDim>::kBytes +
           kStages * 2 * tc::SmemTile<decode_block_n<kHeadDim>(), kHeadDim>::kBytes;
}

// __launch_bounds__(128, 1): without the minimum of one block, ptxas capped some instantiations
// (d64 with 32 rows, sm_90a) at 128 registers and spilled; shared memory bounds the blocks per
// SM (two or three) before registers do.
template <typename Element, int kHeadDim, int kWarpsM, int kStages>
__global__ void __launch_bounds__(CUFLASH_DECODE_THREADS, 1) decode_tc(const DecodeParams p) {
    constexpr int kThreads = CUFLASH_DECODE_THREADS;
    constexpr int kWarpsN = kThreads / 32 / kWarpsM;
    constexpr int kBlockM = 16 * kWarpsM;             // rows per block
    constexpr int kBlockN = decode_block_n<kHeadDim>();  // keys per tile
    constexpr int kWarpN = kBlockN / kWarpsN;         // keys of a tile per warp
    constexpr int kNTilesS = kWarpN / 8;
    constexpr int kNTilesO = kHeadDim / 8;
    constexpr int kKStepsQK = kHeadDim / 16;
    constexpr int kKStepsPV = kWarpN / 16;
    static_assert(kWarpsM * kWarpsN * 32 == kThreads && kWarpN % 16 == 0, "a warp grid of whole k16 key steps");
    static_assert(kHeadDim % 16 == 0 && kStages >= 2, "whole k16 steps, a pipeline of two stages at least");

    using QTile = tc::SmemTile<kBlockM, kHeadDim>;
    using KVTile = tc::SmemTile<kBlockN, kHeadDim>;
    constexpr unsigned kStageBytes = 2 * KVTile::kBytes;
    constexpr unsigned kSmemBytes = decode_tc_smem_bytes<Element, kHeadDim, kWarpsM, kStages>();

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem);
    const unsigned kv_smem = q_smem + QTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp % kWarpsM, wn = warp / kWarpsM;

    // The block's (sequence, head block, split, row chunk), row chunks fastest: the chunks of one
    // head block read the same keys, and neighbours in launch order find them in L2.
    // 32-bit arithmetic throughout: 64-bit division is a call, whose ABI costs spills here.
    const int hpb = static_cast<int>(p.heads_per_block), lq = static_cast<int>(p.seqlen_q);
    const int heads_q = static_cast<int>(p.heads_q), head_blocks = heads_q / hpb;
    const int chunks = static_cast<int>(p.row_chunks), splits = static_cast<int>(p.num_splits);
    int rest = blockIdx.x;
    const int chunk = rest % chunks;
    rest /= chunks;
    const int split = rest % splits;
    rest /= splits;
    const int h0 = (rest % head_blocks) * hpb;  // the block's first query head
    const int b = rest / head_blocks;
    const int hk = h0 / (heads_q / static_cast<int>(p.heads_k));

    const int rows = hpb * lq;  // row r: query head h0 + r / Lq, query i = r % Lq
    const int r0 = chunk * kBlockM;
    // The sequence's keys, cut into [0, capacity] (DecodeParams' bounds; the length first, so
    // that adding Lnew to any int32 cannot overflow).
    const int capacity = static_cast<int>(p.capacity);
    const int cached = p.cache_seqlens != nullptr ? p.cache_seqlens[b] : static_cast<int>(p.seqlen_fixed);
    const int seqlen_k = min(min(max(cached, 0), capacity) + static_cast<int>(p.new_keys), capacity);
    BatchIndex at(p.fwd, 0);  // fwd describes one row; the sequence's length and diagonal are its own
    at.seqlen_k = seqlen_k;
    at.diag = p.bottom_right ? seqlen_k - lq : 0;
    const Mask<true> mask(p.fwd, at);
    // The queries of the chunk's rows: all of [0, Lq) once it spans a head, else one run of them.
    int i_first = 0, i_count = lq;
    const int r_last = min(r0 + kBlockM, rows) - 1;
    if (r_last - r0 + 1 < lq && r0 % lq <= r_last % lq) {
        i_first = r0 % lq;
        i_count = r_last % lq - i_first + 1;
    }
    const TileRange range = mask.tiles(i_first, i_count, kBlockN);
    // Split s: whole tiles [first + s * per, first + (s + 1) * per) of the range (possibly none).
    const int per = (range.last - range.first + splits - 1) / splits;
    const int t_begin = min(range.first + split * per, range.last);
    const int t_end = min(t_begin + per, range.last);

    // ---- Q: the block's rows, gathered from their heads, once (cp.async group 0).
    const unsigned short* q = static_cast<const unsigned short*>(p.q) + b * p.q_batch_stride;
    for (int idx = tid; idx < kBlockM * QTile::kChunks; idx += kThreads) {
        const int row = idx / QTile::kChunks, c = idx % QTile::kChunks, r = r0 + row;
        const int valid = r < rows ? min(max(static_cast<int>(p.head_dim) - c * 8, 0), 8) : 0;
        const unsigned short* src =
            valid > 0 ? q + (h0 + r / lq) * p.q_head_stride + (r % lq) * p.q_row_stride + c * 8 : q;
        ptx::cp_async_16(q_smem + QTile::offset(row, c), src, 2 * valid);
    }
    ptx::cp_async_commit();

    // ---- K/V tiles: each thread keeps one 16-byte chunk column and walks rows kRowStep apart;
    // every key row finds its own address: its page (paged) or its sequence (contiguous), then its
    // slot. Keys >= Lk read as zeros. The pages of a tile's rows are read from the block table one
    // loop step before the copies that use them (fetch_pages), so that no step waits on a table
    // read before issuing its copies: measured, paged caches ran at 55-60% of contiguous ones
    // when every copy waited for its own table read. A row's page and its row within the page
    // are carried from tile to tile by additions, not divided out per row: a 32-bit division by
    // the run-time page size is ~20 instructions, 16 per thread per tile (page and row of 8
    // rows), which kept the paged loop at 0.57-0.72x of the contiguous one (256-key pages).
    constexpr int kRowStep = kThreads / KVTile::kChunks;
    constexpr int kRowsPerThread = kBlockN / kRowStep;
    static_assert(kThreads % KVTile::kChunks == 0 && kBlockN % kRowStep == 0, "whole rows per pass");
    const unsigned short* k_base = static_cast<const unsigned short*>(p.k_cache);
    const unsigned short* v_base = static_cast<const unsigned short*>(p.v_cache);
    const int kv_chunk = tid % KVTile::kChunks, kv_row0 = tid / KVTile::kChunks;
    const int k_valid = min(max(static_cast<int>(p.head_dim) - kv_chunk * 8, 0), 8);
    const int v_valid = min(max(static_cast<int>(p.head_dim_v) - kv_chunk * 8, 0), 8);
    const int* table = p.block_table != nullptr ? p.block_table + b * p.table_stride : nullptr;
    const int page_size = table != nullptr ? static_cast<int>(p.page_size) : 1;  // 32-bit: 64-bit division is a call
    const int last_page = static_cast<int>(p.num_pages) - 1;
    // Entry `index` of the sequence's table row, clamped into the cache's pages (DecodeParams' bounds).
    auto page_at = [&](int index) { return min(max(__ldg(table + index), 0), last_page); };
    // (page, row within it) of this thread's first row of the next tile fetch_pages reads, and
    // the advance of both per tile: once per thread, the only divisions for pages of kRowStep
    // rows or more
    const int first_key = t_begin * kBlockN + kv_row0;
    int next_page = first_key / page_size, next_row = first_key % page_size;
    const int tile_pages = kBlockN / page_size, tile_rows = kBlockN % page_size;
    int pages[kRowsPerThread];      // the fetched tile's rows: their page (paged caches)
    int positions[kRowsPerThread];  // ... and their row within it
    // Tile j's pages and rows; called for t_begin, t_begin + 1, ... in order (the page state
    // advances one tile per call), each load_kv(j) right after fetch_pages(j)'s results are in.
    // Contiguous caches read nothing here: load_kv addresses their rows from k_first / v_first. Pages
    // shorter than a row step (any size >= 1 is allowed: SGLang's caches use pages of one token)
    // take the division per row; from kRowStep rows on, a step wraps into the next page once at
    // most.
    auto fetch_pages = [&](int j) {
        if (table == nullptr) return;
        if (page_size < kRowStep) {
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) {
                const int key = j * kBlockN + kv_row0 + i * kRowStep;
                pages[i] = key < seqlen_k ? page_at(key / page_size) : 0;
                positions[i] = key % page_size;
            }
            return;
        }
        int page = next_page, row = next_row;
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            const int key = j * kBlockN + kv_row0 + i * kRowStep;
            pages[i] = key < seqlen_k ? page_at(page) : 0;
            positions[i] = row;
            row += kRowStep;
            if (row >= page_size) {
                row -= page_size;
                ++page;
            }
        }
        next_page += tile_pages;
        next_row += tile_rows;
        if (next_row >= page_size) {
            next_row -= page_size;
            ++next_page;
        }
    };
    // Where this thread's rows lie. Contiguous caches: its first K and V row of tile t_begin, tile
    // j's rows (j - t_begin) * kBlockN rows further and row i of a tile i * kRowStep rows further,
    // so a tile is addressed by additions; paged caches: each row at (its page, its row there).
    // Why it matters: decode_tc issued ~2.5x cuDNN's instructions for the same bytes (ncu,
    // session 31) and addressing each row by key cost 64-bit multiply-adds of three strides per
    // copy; with additions and whole copies below, 2.4x fewer (session 32).
    const unsigned short* k_head = k_base + hk * p.k_head_stride + kv_chunk * 8;
    const unsigned short* v_head = v_base + hk * p.v_head_stride + kv_chunk * 8;
    const long long k_row_step = kRowStep * p.k_row_stride, v_row_step = kRowStep * p.v_row_stride;
    const unsigned short* k_first = k_head + b * p.k_page_stride + (t_begin * kBlockN + kv_row0) * p.k_row_stride;
    const unsigned short* v_first = v_head + b * p.v_page_stride + (t_begin * kBlockN + kv_row0) * p.v_row_stride;
    const bool whole_chunks = k_valid == 8 && v_valid == 8;  // the thread's chunk inside D and Dv
    auto load_kv = [&](int j) {  // tile j, whose pages fetch_pages(j) read
        const unsigned slot = kv_smem + ((j - t_begin) % kStages) * kStageBytes;
        const long long k_tile = (j - t_begin) * kRowsPerThread * k_row_step;
        const long long v_tile = (j - t_begin) * kRowsPerThread * v_row_step;
        auto k_src = [&](int i) {
            return table != nullptr ? k_head + pages[i] * p.k_page_stride + positions[i] * p.k_row_stride
                                    : k_first + k_tile + i * k_row_step;
        };
        auto v_src = [&](int i) {
            return table != nullptr ? v_head + pages[i] * p.v_page_stride + positions[i] * p.v_row_stride
                                    : v_first + v_tile + i * v_row_step;
        };
        if (whole_chunks && (j + 1) * kBlockN <= seqlen_k) {  // every row a key: no zero fill
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) {
                const unsigned k_dst = slot + KVTile::offset(kv_row0 + i * kRowStep, kv_chunk);
                ptx::cp_async_16_line(k_dst, k_src(i));
                ptx::cp_async_16_line(k_dst + KVTile::kBytes, v_src(i));
            }
            return;
        }
        // The sequence's last tile, or a chunk past D or Dv: keys >= Lk and columns past D read as
        // zeros (from the cache's base address: a row past the sequence may lie past its pages).
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            const int row = kv_row0 + i * kRowStep;
            const bool valid = j * kBlockN + row < seqlen_k;
            const unsigned k_dst = slot + KVTile::offset(row, kv_chunk);
            ptx::cp_async_16(k_dst, valid ? k_src(i) : k_base, valid ? 2 * k_valid : 0);
            ptx::cp_async_16(k_dst + KVTile::kBytes, valid ? v_src(i) : v_base, valid ? 2 * v_valid : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (t_begin + s < t_end) {
            fetch_pages(t_begin + s);
            load_kv(t_begin + s);
        }
        ptx::cp_async_commit();
    }
    fetch_pages(t_begin + kStages - 1);  // the loop's first load

    // Q fragments of the warp's 16 rows, in registers for the whole loop. softmax(S * scale) with
    // scale < 0 is softmax((-S) * |scale|): Q's sign bits flip (exact) and the softmax takes
    // c = |scale| * log2(e) > 0, as in fwd_tc.cu.
    ptx::cp_async_wait<kStages - 1>();
    __syncthreads();
    const bool negate = p.fwd.scale_log2 < 0.f;
    unsigned q_regs[kKStepsQK][1][4];
    const unsigned q_lane = q_smem + tc::a_lane<QTile>(wm * 16, lane);
#pragma unroll
    for (int kk = 0; kk < kKStepsQK; ++kk) {
        ptx::ldmatrix_x4(q_lane + QTile::offset(0, kk * 2), q_regs[kk][0]);
#pragma unroll
        for (int e = 0; e < 4; ++e) q_regs[kk][0][e] ^= negate ? tc::Arith<Element>::kSignBits : 0u;
    }
    const float scale_log2 = fmaxf(fabsf(p.fwd.scale_log2), 1.17549435e-38f);

    // This lane's two rows (slots r = 0, 1 of tc::for_each's numbering): their queries, for the mask.
    int query[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) query[h] = (r0 + wm * 16 + tc::slot_row(h, lane)) % lq;

    float acc[1][kNTilesO][4];
    tc::zero(acc);
    tc::OnlineSoftmax<1> softmax;
    constexpr float kLog2e = 1.4426950408889634f;
    // ALiBi's slope is that of the block's one head (the host sets heads_per_block = 1 with ALiBi).
    const ScoreMod<float, kFastTanh<Element>> mod(p.fwd, b * heads_q + h0, fabsf(static_cast<float>(p.fwd.scale)),
                                    kLog2e, at.diag);
    // Sinks: each row's own (its head's), one logit of the whole row, so in split 0 only and in one
    // warp of the row's key quarters; the merges carry it into the result. OnlineSoftmax's
    // start_from takes one sink for all its rows; here the rows of a tile span heads.
    if (p.fwd.sinks != nullptr && split == 0 && wn == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = min(r0 + wm * 16 + tc::slot_row(h, lane), rows - 1);
            const float sink = mod.sink(p.fwd, b * heads_q + h0 + r / lq, kLog2e);
            if (sink != tc::neg_inf()) {
                softmax.m_i[0][h] = sink;
                softmax.l_i[0][h] = 0.25f;  // the quad's four lanes sum to 2^0
            }
        }
    }

    const unsigned k_lane = tc::bn_lane<KVTile>(lane);
    const unsigned v_lane = KVTile::kBytes + tc::bt_lane<KVTile>(lane);
    for (int j = t_begin; j < t_end; ++j) {
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // tile j visible to all; everyone is done with the slot reloaded below
        if (j + kStages - 1 < t_end) {
            load_kv(j + kStages - 1);
            fetch_pages(j + kStages);  // read during this step's MMAs, used by the next step's load
        }
        ptx::cp_async_commit();
        const unsigned slot = kv_smem + ((j - t_begin) % kStages) * kStageBytes;
        const int key0 = j * kBlockN + wn * kWarpN;  // the warp's first key

        float s[1][kNTilesS][4];
        tc::zero(s);
#pragma unroll
        for (int kk = 0; kk < kKStepsQK; ++kk)
            tc::mma_k16<Element, KVTile, false>(s, q_regs[kk], slot + k_lane, wn * kWarpN, kk * 2);

        // Score modifiers: the rows' queries are r0 + row when the block holds one head (ALiBi's
        // distance needs them); softcap alone never reads them.
        const float c = tc::modify_scores<ModBodies::kAll | ModBodies::kRawAlibi>(mod, s, r0 + wm * 16, key0, lane, scale_log2);
        if (j < range.full_first || j >= range.full_last) {
            tc::for_each(s, 0, key0, lane, [&](float& x, int r, int, int key) {
                if (!mask.visible(query[r], key)) x = tc::neg_inf();
            });
        }
        softmax.update(s, acc, c);

#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk) {
            unsigned a[1][4];
            tc::pack_a<Element>(s[0][2 * kk], s[0][2 * kk + 1], a[0]);
            tc::mma_k16<Element, KVTile, true>(acc, a, slot + v_lane, wn * kWarpN + kk * 16, 0);
        }
    }
    ptx::cp_async_wait<0>();
    __syncthreads();  // every tile consumed: the stages now hold the warps' states

    // ---- Merge the key quarters of a row (warps wn > 0 into wn = 0, in order): each lane's
    // state is stored lane-major by the lane that holds the same rows and columns in warp wn = 0.
    if constexpr (kWarpsN > 1) {
        constexpr int kRegs = 4 + kNTilesO * 4;  // m_i, l_i (2 rows each), acc
        float* state = reinterpret_cast<float*>(smem + QTile::kBytes);
        static_assert(kWarpsM * (kWarpsN - 1) * kRegs * 32 * 4 <= kStages * kStageBytes, "states fit the stages");
        auto at_reg = [&](int w, int reg) -> float& { return state[((w * kWarpsM + wm) * kRegs + reg) * 32 + lane]; };
        if (wn > 0) {
            const int w = wn - 1;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                at_reg(w, h) = softmax.m_i[0][h];
                at_reg(w, 2 + h) = softmax.l_i[0][h];
            }
#pragma unroll
            for (int nt = 0; nt < kNTilesO; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) at_reg(w, 4 + nt * 4 + e) = acc[0][nt][e];
        }
        __syncthreads();
        if (wn > 0) return;
#pragma unroll 1
        for (int w = 0; w < kWarpsN - 1; ++w) {
            float alpha[2], beta[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // Two softmax states over disjoint keys: both rescaled to the larger reference max
                // (a row with no key has -inf there, and contributes exactly 0).
                const float m_other = at_reg(w, h), m_new = fmaxf(softmax.m_i[0][h], m_other);
                const float m_ref = m_new == tc::neg_inf() ? 0.f : m_new;
                alpha[h] = ptx::ex2(softmax.m_i[0][h] - m_ref);
                beta[h] = ptx::ex2(m_other - m_ref);
                softmax.m_i[0][h] = m_new;
                softmax.l_i[0][h] = softmax.l_i[0][h] * alpha[h] + at_reg(w, 2 + h) * beta[h];
            }
#pragma unroll
            for (int nt = 0; nt < kNTilesO; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[0][nt][e] = acc[0][nt][e] * alpha[e / 2] + at_reg(w, 4 + nt * 4 + e) * beta[e / 2];
        }
    }

    // ---- Epilogue (warps wn = 0): out = acc / l and lse per row, to the result (one split) or
    // to the split's fp32 partial.
    float inv_l[1][2], lse[1][2];
    softmax.finish(inv_l, lse);
    if (p.fwd.sinks != nullptr && split == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // A row whose state is still its sink's alone (m = the sink, l = 1: no key added to it)
            // has lse = the sink exactly, as attention defines it; (m + log2 l) * ln 2 would round
            // the sink's trip through log2 units.
            const int r = min(r0 + wm * 16 + tc::slot_row(h, lane), rows - 1), bh = b * heads_q + h0 + r / lq;
            if (inv_l[0][h] == 1.f && softmax.m_i[0][h] == mod.sink(p.fwd, bh, kLog2e))
                lse[0][h] = static_cast<const float*>(p.fwd.sinks)[bh];
        }
    }
    const long long rows_total = p.batch * p.heads_q * lq;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + wm * 16 + tc::slot_row(h, lane);
        if (r >= rows) continue;
        const int head = h0 + r / lq, i = r % lq;
        const long long row = (static_cast<long long>(b) * heads_q + head) * lq + i;  // (B, Hq, Lq) C order
        if (p.part_o == nullptr) {
            Element* o = static_cast<Element*>(p.o) + b * p.o_batch_stride + head * p.o_head_stride + i * p.o_row_stride;
#pragma unroll
            for (int nt = 0; nt < kNTilesO; ++nt) {
                const int col = nt * 8 + 2 * (lane % 4);
                if (col < p.head_dim_v)  // Dv is even: the pair is whole
                    *reinterpret_cast<unsigned*>(o + col) =
                        ptx::pack2<Element>(acc[0][nt][2 * h] * inv_l[0][h], acc[0][nt][2 * h + 1] * inv_l[0][h]);
            }
            if (lane % 4 == 0) p.lse[row] = lse[0][h];
        } else {
            float* o = p.part_o + (split * rows_total + row) * p.head_dim_v;
#pragma unroll
            for (int nt = 0; nt < kNTilesO; ++nt) {
                const int col = nt * 8 + 2 * (lane % 4);
                if (col < p.head_dim_v)
                    *reinterpret_cast<float2*>(o + col) =
                        make_float2(acc[0][nt][2 * h] * inv_l[0][h], acc[0][nt][2 * h + 1] * inv_l[0][h]);
            }
            if (lane % 4 == 0) p.part_lse[split * rows_total + row] = lse[0][h];
        }
    }
}

// The splits' partials of every row (b, h, i) merged, one warp per row, lane l owning columns
// 4l .. 4l + 3 of every 128: M = max_s lse_s, w_s = exp(lse_s - M), lse = M + log(sum_s w_s),
// out = sum_s (w_s / W) out_s (merge_attention.cu's rule: a split whose lse is -inf adds nothing;
// a row no split saw gives 0 and -inf). Lane t of a run of 32 splits computes split t's weight
// once and the lanes take it by shuffle: no split's lse is read per column, and the loads of
// the splits' outs are independent (a decode of few heads merges few rows, each over up to 64
// splits: read one after another, its loads' latencies made the merge 24 us of a 300 us call,
// ncu session 32). W sums by a fixed shuffle tree and out in split order: for a fixed
// num_splits bitwise reproducible. (__launch_bounds__'s minimum of one block: without it ptxas held
// the sm_80 build at 32 registers and spilled.)
template <typename Element>
__global__ void __launch_bounds__(CUFLASH_DECODE_THREADS, 1) decode_combine(const DecodeParams p) {
    constexpr int kWarps = CUFLASH_DECODE_THREADS / 32;
    constexpr unsigned kAll = 0xffffffffu;
    const int lane = threadIdx.x % 32;
    const int lq = static_cast<int>(p.seqlen_q), dv = static_cast<int>(p.head_dim_v);
    const int splits = static_cast<int>(p.num_splits);
    // Rows are counted in 32 bits (the host keeps B * Hq * Lq below 2^31): 64-bit division is a
    // call whose ABI spills here.
    const int rows_total = static_cast<int>(p.batch * p.heads_q) * lq, heads_q = static_cast<int>(p.heads_q);
    for (int row = blockIdx.x * kWarps + threadIdx.x / 32; row < rows_total; row += gridDim.x * kWarps) {
        const float* lses = p.part_lse + row;  // split s at lses[s * rows_total]
        float m = tc::neg_inf();
        for (int s = lane; s < splits; s += 32) m = fmaxf(m, lses[static_cast<long long>(s) * rows_total]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(kAll, m, offset));
        const float m_ref = m == tc::neg_inf() ? 0.f : m;
        float w_sum = 0.f;
        for (int s = lane; s < splits; s += 32) {
            const float l = lses[static_cast<long long>(s) * rows_total];
            if (l != tc::neg_inf()) w_sum += expf(l - m_ref);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) w_sum += __shfl_xor_sync(kAll, w_sum, offset);
        const float inv_sum = w_sum == 0.f ? 0.f : __frcp_rn(w_sum);
        const int i = row % lq, bh = row / lq, head = bh % heads_q, b = bh / heads_q;
        Element* out = static_cast<Element*>(p.o) + b * p.o_batch_stride + head * p.o_head_stride + i * p.o_row_stride;
        if (lane == 0) p.lse[row] = w_sum == 0.f ? tc::neg_inf() : m_ref + logf(w_sum);
        for (int c0 = 0; c0 < dv; c0 += 128) {  // (Dv is a multiple of 8: a lane's 4 columns are whole)
            const int col = c0 + 4 * lane;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int s0 = 0; s0 < splits; s0 += 32) {
                const float l = s0 + lane < splits ? lses[static_cast<long long>(s0 + lane) * rows_total] : tc::neg_inf();
                const float w_lane = l == tc::neg_inf() ? 0.f : expf(l - m_ref) * inv_sum;
                const int n = min(32, splits - s0);
                const float* src = p.part_o + (static_cast<long long>(s0) * rows_total + row) * dv + col;
                const long long split_stride = static_cast<long long>(rows_total) * dv;
#pragma unroll 4
                for (int t = 0; t < n; ++t) {
                    const float w = __shfl_sync(kAll, w_lane, t);
                    if (col < dv) {
                        // Every split's partial row is written (decode_tc's epilogue), so the load
                        // is unconditional and only its use is not: a split of weight 0 adds 0.
                        const float4 x = *reinterpret_cast<const float4*>(src + t * split_stride);
                        if (w != 0.f) {
                            acc[0] += w * x.x;
                            acc[1] += w * x.y;
                            acc[2] += w * x.z;
                            acc[3] += w * x.w;
                        }
                    }
                }
            }
            if (col < dv) {
#pragma unroll
                for (int e = 0; e < 4; ++e) out[col + e] = prep::narrow<Element>(acc[e]);
            }
        }
    }
}

}  // namespace cuflash
