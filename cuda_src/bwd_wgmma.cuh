// One step of the Hopper dK/dV kernels (bwd_dkdv_wgmma.cu, cp.async; bwd_dkdv_wgmma_ws.cu, TMA
// and warp specialization), after S^T = K_g Q_i^T and dP^T = V_g dO_i^T have landed in a
// warpgroup's registers: the math of bwd_dkdv_wgmma.cu's header comment, written once. The
// kernels differ in how Q_i, dO_i, lse_i and delta_i reach shared memory and how a slot is
// released, not in what a step computes.
#pragma once
#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {
namespace wgmma_bwd {

// S^T = K_g Q_i^T and dP^T = V_g dO_i^T (64 keys x kBlockM queries; the first k-step
// overwrites: nothing of the previous tile stays live; kBiasInSt: S^T is added to what st holds,
// the bias / scale, tc::bias_into_transposed_scores), issued, waited for and pinned: A = this
// warpgroup's 64 rows of K or V (from row ``first_key`` of their tiles), B = Q_i or dO_i, both
// K-major.
template <typename Element, int kBlockM, int kKSteps, typename KVTile, typename QTile, bool kBiasInSt = false>
__device__ __forceinline__ void transposed_scores(float (&st)[kBlockM / 8][4], float (&dpt)[kBlockM / 8][4],
                                                  unsigned k_tile, unsigned v_tile, unsigned q_tile, unsigned do_tile,
                                                  int first_key) {
    ptx::wgmma_fence();
    tc::wgmma_a_bt<Element, kKSteps, KVTile, QTile, kBiasInSt>(st, k_tile + first_key * 128, q_tile);
    tc::wgmma_a_bt<Element, kKSteps, KVTile, QTile>(dpt, v_tile + first_key * 128, do_tile);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_pin(st);
    ptx::wgmma_pin(dpt);
}

// Dropout of one step (dropout.cuh; the kernels' kDropout form): the keep bits of this lane's
// scores, drawn before the step's products land; dP^T o Z * scale before dS^T (so that dS = P o
// (Z o dP / q - delta)), then P^T o Z * scale for dV = (P o Z / q)^T dO. Nothing when the call
// drops nothing.
template <int kBlockM>
struct StepDropout {
    tc::DropBitsTransposed<kBlockM / 8> keep;
    bool drops;

    // bh: the step's attention row; key_row: this lane's first key; m0: the step's first query.
    __device__ __forceinline__ StepDropout(const FwdParams& f, bool compiled, long long bh, int key_row, int m0,
                                           int lane)
        : drops(compiled && f.dropout_threshold) {
        if (drops) keep.draw(Dropout(f, bh), key_row, m0, lane);
    }
    __device__ __forceinline__ void apply(const FwdParams& f, float (&scores)[kBlockM / 8][4]) const {
        if (drops) keep.apply(scores, static_cast<float>(f.dropout_scale));
    }
};

// P^T = exp2(S^T * scale_log2 - lse_i log2 e), dS^T = P^T o (dP^T - delta_i), in place of S^T
// and dP^T (64 keys x kBlockM queries per warpgroup). This lane holds queries
// m0 + 8 nt + 2 (lane % 4) + {0, 1} of keys key0, key0 + 8; lse2_of(c), delta_of(c) read column c
// of the tile's lse_i in log2 units (tc::lse_log2: a row that sees no key gets +inf, so P = 0
// exactly; the caller converts, or stages it converted) and delta_i.
// ``masked``: the tile crosses the mask's edge, the keys' end or Lq (per-element test).
template <int kBlockM, typename Mod, typename MaskT, typename Lse2Of, typename DeltaOf>
__device__ __forceinline__ void probabilities_and_dscores(float (&st)[kBlockM / 8][4], float (&dpt)[kBlockM / 8][4],
                                                          const Mod& mod, bool modified, BiasGrad<float>& dbias,
                                                          const MaskT& mask, bool masked, int m0, int key0,
                                                          int seqlen_q, float scale_log2, int lane,
                                                          const Lse2Of& lse2_of, const DeltaOf& delta_of) {
    // Columns col and col + 1's lse_i (log2 units) and delta_i, read once per column pair of an n8
    // tile: both paths use them four times (read per score, the modifier bodies paid two shared
    // loads and the lse's -inf test per score: ALiBi's backward at 1.27x the plain one, d128)
    const auto column_stats = [&](int col, float (&lse2)[2], float (&delta)[2]) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            lse2[c] = lse2_of(col + c);
            delta[c] = delta_of(col + c);
        }
    };
    // Element e of the n8 tile whose first column is col: query query_of(col, e), key key_of(e).
    const auto query_of = [&](int col, int e) { return m0 + col + e % 2; };
    const auto key_of = [&](int e) { return key0 + 8 * (e / 2); };
    // Hidden (query, key) pairs and queries past Lq: P = 0 (masked tiles only; one branch a tile,
    // not a test per score: the exponent of a hidden pair is computed, then replaced).
    const auto hide = [&](int nt, int col) {
        if (!masked) return;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int query = query_of(col, e);
            if (query >= seqlen_q || !mask.visible(query, key_of(e))) st[nt][e] = 0.f;
        }
    };
    // dS^T of n8 tile nt into the bias gradient (a bias plane's, or a bias's the kernel put in
    // S^T) where ``stores``: one branch an n8 tile, not a test per score (ALiBi's body, which a
    // bias in S^T shares, paid ~4 instructions a score for that: ISETP, BSSY, BRA, BSYNC).
    const auto store_dbias = [&](bool stores, int nt, int col) {
        if (!stores) return;
#pragma unroll
        for (int e = 0; e < 4; ++e) dbias.store(query_of(col, e), key_of(e), dpt[nt][e]);
    };
    const bool plain = !(modified && mod.template dispatch<ModBodies::kPerModifier | ModBodies::kRawAlibi>([&](const auto& row_scores) {
        // Score modifiers (score_mod.cuh; the slope, bias and mask are the step's head's): P^T =
        // exp2(x - lse_i log2 e) of the modified score x in log2 units, 0 where hidden; dS^T =
        // P^T o (dP^T - delta_i) o dx / d(scale S). One branch for the whole tile, so the loop
        // stays one block. The pairs are near (query m0 + 2 (lane % 4), key key0).
        const auto score = row_scores.from(m0 + 2 * (lane % 4), key0);
        // dS is the bias gradient of a bias plane, or of a bias the kernel put in S^T (never under
        // softcap: tc::bias_goes_into_scores), so the softcap-alone body tests nothing per score.
        const bool stores_dbias = (score.has_planes || (!score.capped && mod.bias_in_scores)) && dbias.wanted();
#pragma unroll
        for (int nt = 0; nt < kBlockM / 8; ++nt) {
            const int col = nt * 8 + 2 * (lane % 4);
            float lse2[2], delta[2], grad[4];
            column_stats(col, lse2, delta);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                st[nt][e] = ptx::ex2(score.exponent(score(st[nt][e], query_of(col, e), key_of(e), grad[e]), lse2[e % 2]));
            hide(nt, col);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                dpt[nt][e] = st[nt][e] * (dpt[nt][e] - delta[e % 2]);
                // (The bodies that read planes test per score, beside their per-score loads: an
                // n8 tile's branch there made ptxas spill the d128 Variant.)
                if (score.has_planes && stores_dbias) dbias.store(query_of(col, e), key_of(e), dpt[nt][e]);
                if (score.capped) dpt[nt][e] *= grad[e];
            }
            // (Without planes a body stores only uncapped: dS^T has no cap's factor to precede.)
            if (!score.has_planes) store_dbias(stores_dbias, nt, col);
        }
    }));
    if (!plain) return;
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
        float lse2[2], delta[2];
        column_stats(col, lse2, delta);
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = ptx::ex2(fmaf(st[nt][e], scale_log2, -lse2[e % 2]));
        hide(nt, col);
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - delta[e % 2]);
        // A bias the kernel put in S^T (ScoreMod::bias_in_scores) leaves the modifier bodies; its
        // gradient is dS, stored here as they store it.
        store_dbias(mod.bias_in_scores && dbias.wanted(), nt, col);
    }
}

// A bias broadcast over the queries (BwdParams::dbias_keys): its gradient is dS summed over the
// queries, per key. This lane adds its keys' (key0, key0 + 8: rows of dS^T) scores of the step
// into sums[0], sums[1], columns in a fixed order. Hidden pairs and queries past Lq add 0 (their
// P^T is 0, so is dS^T).
template <int kBlockM>
__device__ __forceinline__ void add_key_sums(float (&sums)[2], const float (&dst)[kBlockM / 8][4]) {
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
        sums[0] += dst[nt][0] + dst[nt][1];
        sums[1] += dst[nt][2] + dst[nt][3];
    }
}

// After a head's last step: the four lanes holding the same keys (lane / 4) combine their sums
// (butterfly shuffles: every lane ends with the same bits) and the first of them stores them at
// keys key0, key0 + 8 of ``row_sums`` (the attention row's Lk floats) below ``seqlen_k``. A block
// owns its keys and sees every query of the head that sees them: one store per key, no atomics.
__device__ __forceinline__ void store_key_sums(float* row_sums, const float (&sums)[2], int key0, int seqlen_k,
                                               int lane) {
    float total[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        total[h] = sums[h] + __shfl_xor_sync(0xffffffffu, sums[h], 1);
        total[h] += __shfl_xor_sync(0xffffffffu, total[h], 2);
    }
    if (lane % 4 == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (key0 + 8 * h < seqlen_k) row_sums[key0 + 8 * h] = total[h];
    }
}

// dV_g += P^T dO_i, dK_g += dS^T Q_i, issued and committed (not waited for): A = P^T, dS^T from
// registers as 16-bit fragments (n8 tiles 2kk, 2kk + 1, queries 16kk..16kk+15, are k-step kk's),
// B = dO_i, Q_i MN-major (k-step kk = query rows 16kk..16kk+15). dS^T's fragments are returned in
// ``dsa`` for the dQ product.
template <typename Element, int kBlockM, int kHeadDim, typename QTile>
__device__ __forceinline__ void accumulate_dv_dk(float (&dv)[kHeadDim / 8][4], float (&dk)[kHeadDim / 8][4],
                                                 const float (&pt)[kBlockM / 8][4], const float (&dst)[kBlockM / 8][4],
                                                 unsigned q_tile, unsigned do_tile, unsigned (&dsa)[kBlockM / 16][4]) {
    unsigned pa[kBlockM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
        tc::pack_a<Element>(pt[2 * kk], pt[2 * kk + 1], pa[kk]);
        tc::pack_a<Element>(dst[2 * kk], dst[2 * kk + 1], dsa[kk]);
    }
    const unsigned long long do_desc = QTile::mn_major(do_tile), q_desc = QTile::mn_major(q_tile);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
        ptx::Wgmma<kHeadDim>::template rs<Element, 1>(dv, pa[kk], ptx::desc_advance(do_desc, kk * 2048));
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
        ptx::Wgmma<kHeadDim>::template rs<Element, 1>(dk, dsa[kk], ptx::desc_advance(q_desc, kk * 2048));
    ptx::wgmma_commit();
}

// One k-step's fragment of store_dst (below), not fenced.
template <typename DsTile>
__device__ __forceinline__ void store_dst_step(unsigned ds_tile, const unsigned (&frag)[4], int kk, int first_key,
                                               int warp, int lane) {
    const int st_row = first_key + (warp % 4) * 16 + ((lane / 8) % 2) * 8 + lane % 8;
    ptx::stmatrix_x4(ds_tile + DsTile::offset(st_row, 2 * kk + lane / 16), frag[0], frag[1], frag[2], frag[3]);
}

// dS^T of this warpgroup to shared memory, one stmatrix per k-step fragment (matrices: keys
// 0-7 | 8-15 of query chunk 2kk, then of 2kk + 1; lane l addresses row l % 8 of matrix l / 8),
// fenced for the tensor cores' reads. The caller's barrier makes both halves visible.
template <int kBlockM, typename DsTile>
__device__ __forceinline__ void store_dst(unsigned ds_tile, const unsigned (&dsa)[kBlockM / 16][4], int first_key,
                                          int warp, int lane) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) store_dst_step<DsTile>(ds_tile, dsa[kk], kk, first_key, warp, lane);
    ptx::fence_proxy_async_shared();
}

// dQ_i's part of this warpgroup, dS K over the block's kBlockN keys (k-step kk = keys
// 16kk..16kk+15), into ``dq`` and waited for: A = dS (the dS^T tile MN-major, from its panel
// ``ds_panel``), B = K (MN-major, from column ``k_cols`` of its tile).
template <typename Element, int kBlockN, int kDqN, typename DsTile, typename KVTile>
__device__ __forceinline__ void dq_product(float (&dq)[kDqN / 8][4], unsigned ds_panel, unsigned k_cols) {
    const unsigned long long ds_desc = DsTile::mn_major(ds_panel), k_desc = KVTile::mn_major(k_cols);
    ptx::wgmma_fence();
    ptx::Wgmma<kDqN>::template ss<Element, 1, 1, false>(dq, ds_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < kBlockN / 16; ++kk)
        ptx::Wgmma<kDqN>::template ss<Element, 1, 1>(dq, ptx::desc_advance(ds_desc, kk * 2048),
                                                      ptx::desc_advance(k_desc, kk * 2048));
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_pin(dq);
}

// The epilogue's first half: this warpgroup's dK_g * scale and dV_g in the input type, into
// padded row tiles in shared memory (lane: keys key_row, key_row + 8; columns 8 nt + 2 (lane % 4)
// + {0, 1}). The caller's barriers bracket it (K, V and dS^T are free before; the tiles complete
// after).
template <typename Element, int kHeadDim, typename StageTile>
__device__ __forceinline__ void stage_dk_dv(unsigned dk_stage, unsigned dv_stage, const float (&dk)[kHeadDim / 8][4],
                                            const float (&dv)[kHeadDim / 8][4], int key_row, float scale, int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < kHeadDim / 8; ++nt) {
            const unsigned off = StageTile::offset(key_row + 8 * h, nt) + 4 * (lane % 4);
            ptx::st_shared_b32(dk_stage + off, ptx::pack2<Element>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale));
            ptx::st_shared_b32(dv_stage + off, ptx::pack2<Element>(dv[nt][2 * h], dv[nt][2 * h + 1]));
        }
}

// The epilogue's second half: the staged tiles stored as the key tile n_index of the group
// ``group``'s dK and dV (16-byte chunks where aligned, rows below Lk) by kThreads threads.
template <int kBlockN, int kHeadDim, int kThreads>
__device__ __forceinline__ void store_dk_dv(const BwdParams& p, int group, int n_index, unsigned dk_stage,
                                            unsigned dv_stage, int thread) {
    const BwdBatchIndex at(p, group * p.heads_per_block);
    const int n0 = n_index * kBlockN;
    tc::store_tile<kBlockN, kHeadDim, kThreads>(dk_stage, static_cast<unsigned short*>(p.dk) + at.dk + n0 * p.dk_row_stride,
                                                p.dk_row_stride, at.seqlen_k - n0, p.fwd.head_dim, thread);
    tc::store_tile<kBlockN, kHeadDim, kThreads>(dv_stage, static_cast<unsigned short*>(p.dv) + at.dv + n0 * p.dv_row_stride,
                                                p.dv_row_stride, at.seqlen_k - n0, p.fwd.head_dim_v, thread);
}

// The feeding warpgroup of the two-warpgroup float32 dK/dV kernels (bwd_dkdv_wgmma_x3.cu,
// bwd_dkdv_wgmma_x6.cu), whose other warpgroup multiplies: step t's tiles in step slot t % 2,
// its lse and delta in stat slot t % 2, the raw rows of a step ahead in the staging tiles.
// copy_rows(step) and copy_stats(step, slot) issue cp.async copies (committed here); unstage(slot)
// turns the staged rows into the slot's tiles (this thread's chunks: no barrier before).
// dQ_i^T's fragment added into dQ's float rows (dq_accum) by REDs: its rows are dQ's columns col0 +
// 8 (e / 2), its columns the step's queries m0 + 2 (lane % 4) + nt * 8 + e % 2; addressed from one
// pointer by 32-bit offsets, each RED predicated (no branch around it).
template <int kBlockM>
__device__ __forceinline__ void red_add_dq_transposed(float* dq_rows, const float (&dqt)[kBlockM / 8][4], int m0,
                                                      int col0, int seqlen_q, int head_dim, int lane) {
    const int query0 = m0 + 2 * (lane % 4);
    float* const dq_lane = dq_rows + (long long)query0 * head_dim + col0;
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int rows = nt * 8 + e % 2, cols = 8 * (e / 2);
            ptx::red_add_f32_if(query0 + rows < seqlen_q && col0 + cols < head_dim, dq_lane + rows * head_dim + cols,
                                dqt[nt][e]);
        }
}

template <typename CopyRows, typename CopyStats, typename Unstage>
struct Feeder {
    TileRange range;
    int heads;
    CopyRows copy_rows;
    CopyStats copy_stats;
    Unstage unstage;

    // Before the loop: step 0 into slot 0 (and its stats), step 1's rows and stats on their way.
    __device__ __forceinline__ void first_steps(const HeadTileStep& first) const {
        if (first.g < heads) {
            copy_rows(first);
            copy_stats(first, 0);
        }
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
        if (first.g < heads) unstage(0);
        const HeadTileStep second = first.after(1, range.first, range.last);
        if (second.g < heads) {
            copy_rows(second);
            copy_stats(second, 1);
        }
        ptx::cp_async_commit();
    }

    // The loop, from step `first` on, between the multiplying side's two barriers a step
    // (barrier()): before the first, the next step into the other slot (read last by step t - 1's
    // products, before its second barrier) and step t + 2's rows into the staging tiles (here,
    // not after the barrier, where the other warpgroup waited for them: ncu, benchmarks/NOTES.md,
    // session 53); between them work(step, copy_stats_ahead), which calls copy_stats_ahead() once
    // its products are issued: step t + 2's lse and delta into stat slot t % 2 (step t's scores
    // are done with it) while they run.
    template <typename Barrier, typename Work>
    __device__ __forceinline__ void steps(const HeadTileStep& first, const Barrier& barrier, const Work& work) const {
        int t = 0;  // the step's number
        for (HeadTileStep step = first; step.g < heads; step.advance(range.first, range.last), ++t) {
            const HeadTileStep next = step.after(1, range.first, range.last);
            const HeadTileStep after_next = step.after(2, range.first, range.last);
            ptx::cp_async_wait<0>();
            if (next.g < heads) unstage((t + 1) % 2);
            if (after_next.g < heads) copy_rows(after_next);
            ptx::cp_async_commit();
            barrier();  // the multiplying side's scores done; the next step's tiles published
            work(step, [&] {
                if (after_next.g < heads) copy_stats(after_next, t % 2);
                ptx::cp_async_commit();
            });
            barrier();  // this step's products done: its slots free
        }
        ptx::cp_async_wait<0>();
    }
};
template <typename CopyRows, typename CopyStats, typename Unstage>
__device__ __forceinline__ Feeder<CopyRows, CopyStats, Unstage> make_feeder(const TileRange& range, int heads,
                                                                           CopyRows copy_rows, CopyStats copy_stats,
                                                                           Unstage unstage) {
    return {range, heads, copy_rows, copy_stats, unstage};
}

// The float32 dK/dV kernels' epilogue (bwd_dkdv_wgmma_x3.cu, bwd_dkdv_wgmma_x6.cu: one warpgroup
// holds the block's kBlockN = 64 keys, this warp rows row0 + lane / 4 + {0, 8}; columns c0 + ...
// of kN): dK * scale and dV of key tile n_index of the group ``group``, from the registers (rows
// below Lk, columns below D / Dv); a slice of a split group adds them into the group's sums instead.
template <int kBlockN, int kHeadDim>
__device__ __forceinline__ void write_float_dk_dv(const BwdParams& p, int group, int n_index,
                                                  const float (&dk)[kHeadDim / 8][4], const float (&dv)[kHeadDim / 8][4],
                                                  int row0, int lane, int c0 = 0) {
    const FwdParams& f = p.fwd;
    const BwdBatchIndex out(p, group * p.heads_per_block);
    const int n0 = n_index * kBlockN, rows = out.seqlen_k - n0;
    const float scale = static_cast<float>(f.scale);
    float* const dk_rows = static_cast<float*>(p.dk) + out.dk;
    float* const dv_rows = static_cast<float*>(p.dv) + out.dv;
    if (p.dkv_adds) {
        tc::add_rows<kHeadDim>(dk_rows + (long long)n0 * f.head_dim, dk, row0, rows, c0, f.head_dim, lane, scale);
        tc::add_rows<kHeadDim>(dv_rows + (long long)n0 * f.head_dim_v, dv, row0, rows, c0, f.head_dim_v, lane);
    } else {
        tc::store_rows<float, kHeadDim>(dk_rows + n0 * p.dk_row_stride, p.dk_row_stride, dk, row0, rows, c0, f.head_dim,
                                        lane, scale);
        tc::store_rows<float, kHeadDim>(dv_rows + n0 * p.dv_row_stride, p.dv_row_stride, dv, row0, rows, c0,
                                        f.head_dim_v, lane, 1.f);
    }
}

// An accumulator fragment (times ``factor``) into a row-major fp32 tile in shared memory (rows of
// kStride floats; 8 floats of padding per row put a warp's 8 rows on distinct banks), for one
// bulk add per row: dQ_i's part of this warpgroup into dq_accum (bwd_dkdv_wgmma_ws.cu), a split
// group's dK, dV into their sums (add_dk_dv). Rows row0 + lane / 4 + {0, 8}, columns
// c0 + 8 nt + 2 (lane % 4) + {0, 1}.
template <int kN, int kStride>
__device__ __forceinline__ void stage_rows(unsigned tile, const float (&frag)[kN / 8][4], int row0, int c0, int lane,
                                           float factor = 1.f) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned row = tile + 4u * static_cast<unsigned>((row0 + lane / 4 + 8 * h) * kStride);
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
            ptx::st_shared_v2(row + 4u * static_cast<unsigned>(c0 + nt * 8 + 2 * (lane % 4)),
                              __float_as_uint(frag[nt][2 * h] * factor), __float_as_uint(frag[nt][2 * h + 1] * factor));
    }
    ptx::fence_proxy_async_shared();  // for the copy engine's reads
}

// The epilogue when a GQA group's query heads are split over blocks (BwdParams::dkv_adds): the
// block's dK * scale and dV added into its key/value head's fp32 sums (contiguous rows of D and
// Dv floats; the host zeroes them and rounds them to the input type after). Each in turn is
// staged as padded fp32 rows at ``stage`` (kBlockN x (kHeadDim + 8) floats of shared memory the
// block's loop no longer reads) and added by the copy engine, a bulk add per row below Lk issued
// by thread ``thread`` = that row (one operation per row, where REDs from the registers take one
// per lane and column pair); a width that is not whole 16-byte chunks is added element by
// element from the stage, in a loop the compiler keeps rolled: REDs from the registers, unrolled
// over the fragment, were a fifth of bwd_dkdv_wgmma_ws's compile time (benchmarks/NOTES.md,
// session 51) for a path only odd head dims take. ``sync``: a barrier of the kThreads threads
// that hold the tile.
template <int kBlockN, int kHeadDim, int kThreads, typename Sync>
__device__ __forceinline__ void add_dk_dv(const BwdParams& p, int group, int n_index, const float (&dk)[kHeadDim / 8][4],
                                          const float (&dv)[kHeadDim / 8][4], int key_row0, unsigned stage,
                                          int thread, int lane, const Sync& sync) {
    constexpr int kStride = kHeadDim + 8;
    static_assert(kThreads >= kBlockN, "one thread per row's bulk add");
    const BwdBatchIndex at(p, group * p.heads_per_block);
    const int n0 = n_index * kBlockN, rows = min(kBlockN, at.seqlen_k - n0);
    auto add = [&](float* sums, const float (&frag)[kHeadDim / 8][4], int width, float factor) {
        float* const dst = sums + (long long)n0 * width;
        sync();  // the stage is free: the loop's reads, or the previous gradient's adds, are done
        stage_rows<kHeadDim, kStride>(stage, frag, key_row0, 0, lane, factor);
        sync();
        if (width % 4 == 0) {
            if (thread < rows) {
                ptx::bulk_reduce_add_f32(dst + (long long)thread * width,
                                         stage + 4u * static_cast<unsigned>(thread * kStride), 4u * static_cast<unsigned>(width));
                ptx::bulk_commit_group();
                ptx::bulk_wait_group_read<0>();
            }
        } else {
#pragma unroll 1
            for (int e = thread; e < rows * width; e += kThreads) {  // element e of the rows: dst[e]
                const int row = e / width, col = e - row * width;
                atomicAdd(dst + e, __uint_as_float(ptx::ld_shared_b32(stage + 4u * static_cast<unsigned>(row * kStride + col))));
            }
        }
    };
    add(static_cast<float*>(p.dk) + at.dk, dk, p.fwd.head_dim, static_cast<float>(p.fwd.scale));
    add(static_cast<float*>(p.dv) + at.dv, dv, p.fwd.head_dim_v, 1.f);
    ptx::bulk_wait_group<0>();  // the adds done before the block ends
}

}  // namespace wgmma_bwd
}  // namespace cuflash
