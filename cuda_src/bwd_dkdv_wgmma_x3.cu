// Backward attention for float32 under precision="highest" on Hopper (sm_90a): dK, dV (and dQ by
// fp32 atomics) over key tiles in 3xTF32 (tile_tc.cuh's tf32x3: every operand split into TF32 hi
// and lo halves, three products summed small ones first). The algorithm and the contract are
// bwd_dkdv_wgmma.cu's (FlashAttention-2's backward with recomputation, the scores transposed so
// that P^T and dS^T are accumulators laid out as the next products' A operands); what changes
// is the operands' form. TF32 wgmma reads K-major operands only, so every operand whose k index
// is a tensor's row is stored transposed (tc::KeysMajorLoader's tiles, in a_k8_of's k order
// within each 8): Q_i^T and dO_i^T for dK and dV, K^T for dQ.
//
// A block owns kBlockN = 64 keys of one key/value head and a group of heads_per_block query heads
// that read it (GQA; params.cuh's HeadTileStep walks them), in two warpgroups: warpgroup 0
// multiplies by the keys, warpgroup 1 feeds it and computes dQ. Per step (h, i), query tile i of
// kBlockM = 32 rows (d32: 64) of head h:
//
//   warpgroup 0                                   warpgroup 1
//   S^T  = K Q_i^T   SS, A = K, B = Q_i           Q_{i+1}, dO_{i+1} out of the staging tile
//   dP^T = V dO_i^T  SS, A = V, B = dO_i          (split; as they are and transposed) into the
//   P^T, dS^T (probabilities_and_dscores);        other slot; step i+2's rows into the staging
//   dS^T stored transposed (split);               tile
//   dV += P^T dO_i   RS, B = dO_i^T
//   dK += dS^T Q_i   RS, B = Q_i^T
//   ---------------------------------------------- barrier: dS complete; the next step's tiles
//   dV, dK land; FADD into the accumulators       dQ_i^T = K^T dS^T (RS, M = D: K^T's fragments
//                                                 held in registers; d32: dQ_i = dS K, SS, M =
//                                                 64 queries, K^T's tiles kept), added into
//                                                 dq_accum by REDs; step i+2's lse, delta
//   ---------------------------------------------- barrier: this step's products done
//
// (the d64 products: S^T and dP^T 64 keys x 32 queries, dV and dK 64 keys x D, dQ^T D x 32;
// dK *= scale once at the end, dQ's scale is bwd_dq_convert's). One warpgroup doing both sides
// ran at 0.8x the FFMA kernels: ~2,900 instructions a warp a step, one warp a scheduler, 43% of
// its cycles at barriers (ncu, benchmarks/NOTES.md, session 52).
// dV's and dK's products land in fresh fragments added to the accumulators by FADD each step
// (the tensor cores truncate as they accumulate: tile_tc.cuh's tf32x3).
// Shared memory (d64: 226 KB, one block a SM): K, V and dS in hi and lo tiles, two slots (steps t
// and t + 1) of Q_i, dO_i, Q_i^T, dO_i^T in hi and lo tiles, the staging tile of the next step's
// raw Q and dO rows (the prologue: K's; K^T passes through slot 1 on its way to warpgroup 1's
// registers; d32 keeps them, after the rest), two slots of lse_i and delta_i.
#include "bwd_tc.cuh"
#include "bwd_wgmma.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
// 1024 bytes of alignment; in floats, hi and lo each: K, V (kBlockN x D), two slots of Q_i, dO_i,
// Q_i^T, dO_i^T (kBlockM x D), dS (kBlockM x kBlockN); the staging tile (2 kBlockM x D floats);
// two slots of lse_i and delta_i (2 kBlockM floats each).
// d32 keeps K^T's hi and lo tiles too (kBlockN x D each).
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_wgmma_x3_smem_bytes() {
    return 1024 + 4 * (2 * ((kHeadDim < 64 ? 3 : 2) * kBlockN * kHeadDim + 8 * kBlockM * kHeadDim + kBlockM * kBlockN) +
                       2 * kBlockM * kHeadDim + 2 * 2 * kBlockM);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_wgmma_x3(const BwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroupThreads = 128;     // a warpgroup
    constexpr int kWidth = 2 * kHeadDim;  // a row's 16-bit units
    static_assert(Arith::kProducts == 3 && Arith::kUnits == 2, "float32 in 3xTF32");
    static_assert(!kScoreMods && !kDropout, "no modifiers, no dropout (tiles.py: FFMA serves them)");
    // d64: dQ_i^T = K^T dS^T (M = D = 64) from K^T's fragments in warpgroup 1's registers, 32-query
    // steps; d32: dQ_i = dS K (M = 64 queries a step; D = 32 cannot be an M) from the dS and K^T
    // tiles, 64-query steps (d32's tiles are half as wide: the same shared memory).
    constexpr bool kDqTransposed = kHeadDim == 64;
    static_assert(kWarps == 8 && kBlockN == 64 && kBlockM == (kDqTransposed ? 32 : 64) &&
                      (kHeadDim == 32 || kHeadDim == 64) && kStages == 1,
                  "two warpgroups on 64 keys (wgmma M), dQ's M 64, the staging tile one step ahead");

    using KVTile = tc::Sw128Tile<kBlockN, kWidth>;                 // K, V (keys x D)
    using QTile = tc::Sw128Tile<kBlockM, kWidth>;                  // Q_i, dO_i (queries x D)
    using KtLoader = tc::KeysMajorLoader<kBlockN, kHeadDim, kThreads>;       // K^T (D x keys), the whole block
    using QtLoader = tc::KeysMajorLoader<kBlockM, kHeadDim, kGroupThreads>;  // Q_i^T, dO_i^T (D x queries), warpgroup 1
    using KtTile = typename KtLoader::Tile;
    using QtTile = typename QtLoader::Tile;
    using DsTile = tc::Sw128Tile<kBlockM, 2 * kBlockN>;            // dS (queries x keys, keys in KtLoader's order)
    constexpr int kKStepsD = kWidth / 16;   // k8 steps over D (S^T, dP^T)
    constexpr int kKStepsM = kBlockM / 8;   // over a step's queries (dV, dK)
    constexpr int kKStepsN = kBlockN / 8;   // over the keys (dQ^T)
    constexpr unsigned kStagingBytes = 2 * QtLoader::kStagingBytes;  // Q's and dO's rows
    static_assert(KtLoader::kStagingBytes <= kStagingBytes, "K's rows pass through the staging tile too");
    static_assert(KtTile::kBytes == KVTile::kBytes && QtTile::kBytes == QTile::kBytes, "tile sizes");
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse_i, then delta_i
    constexpr unsigned kSmemBytes = bwd_dkdv_wgmma_x3_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + 2 * ((kDqTransposed ? 2 : 3) * KVTile::kBytes + 8 * QTile::kBytes + DsTile::kBytes) +
                                    kStagingBytes + 2 * kStatBytes, "1024: alignment");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    // Swizzle atoms start on 1024-byte boundaries. Each tile's lo half follows its hi half.
    const unsigned align = (1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u;
    const unsigned k_smem = ptx::smem_addr(smem) + align;
    const unsigned v_smem = k_smem + 2 * KVTile::kBytes;
    // Slot s from step_smem + 8s tiles: Q_i, dO_i, Q_i^T, dO_i^T, each hi then lo.
    const unsigned step_smem = v_smem + 2 * KVTile::kBytes;
    const unsigned ds_smem = step_smem + 16 * QTile::kBytes;
    static_assert(2 * KtTile::kBytes <= 4 * QTile::kBytes, "K^T passes through slot 1's Q_i, dO_i tiles");
    const unsigned staging = ds_smem + 2 * DsTile::kBytes;
    const unsigned kt_tiles = staging + kStagingBytes + 2 * kStatBytes;  // d32: K^T, hi and lo
    unsigned char* const stat_ptr = smem + align + (staging - k_smem) + kStagingBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // warpgroup; uniform registers: fwd_wgmma_ws.cu says why
    const int gtid = tid % kGroupThreads;                     // the thread within its warpgroup
    const int row0 = (warp % 4) * 16;  // this warp's rows of its warpgroup's products: row0 + lane / 4 + {0, 8}
    const auto [group_index, n_index] = key_tile_block<kHasWindow>(p);
    const int heads = p.heads_per_block;
    const int bh = group_index * heads;  // the group's first row
    const int n0 = n_index * kBlockN;
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_key_block<float, float, kBlockN>(p, bh, n_index, n0, at)) return;  // params.cuh
    const Mask<kHasWindow, false> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, at.seqlen_q);

    using Units = const unsigned short*;
    const tc::TileLoader<kBlockN, kWidth, kThreads, KVTile> v_loader(
        reinterpret_cast<Units>(static_cast<const float*>(f.v) + at.v), f.v_row_stride * 2, f.head_dim_v * 2);
    const KtLoader k_loader(static_cast<const float*>(f.k) + at.k, f.k_row_stride, f.head_dim);
    // (Q's and dO's alignment checks, and lse's and delta's copies: the rows go by KeysMajorLoader)
    const tc::QueryTileLoader<kBlockM, kWidth, kThreads, QTile, 2> query_rows(p, at);
    const tc::TileLoader<kBlockN, kWidth, kThreads, KVTile> k_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.k) + at.k), f.k_row_stride * 2, f.head_dim * 2);
    if (!(k_rows.aligned(at.seqlen_k) && v_loader.aligned(at.seqlen_k) && query_rows.aligned())) __trap();

    // Warpgroup 1: step (h, i)'s Q and dO rows into the staging tile (cp.async; the caller
    // commits).
    auto copy_rows = [&](const HeadTileStep& s) {
        const HeadStep d(p, s.g);
        const int m0 = s.i * kBlockM;
        const QtLoader q(static_cast<const float*>(f.q) + at.q + d.q, f.q_row_stride, f.head_dim);
        const QtLoader dout(static_cast<const float*>(p.dout) + at.dout + d.dout, p.dout_row_stride, f.head_dim_v);
        q.copy(staging, m0, at.seqlen_q, gtid);
        dout.copy(staging + QtLoader::kStagingBytes, m0, at.seqlen_q, gtid);
    };
    // Warpgroup 1: step (h, i)'s lse and delta into stat slot `slot` (cp.async; the caller commits).
    auto copy_stats = [&](const HeadTileStep& s, int slot) {
        query_rows.head(p, s.g).load_stats(stat_ptr + slot * kStatBytes, s.i, gtid);
    };
    // Slot `slot`'s Q_i tiles (hi, then lo); dO_i's, Q_i^T's, dO_i^T's follow, two tiles apart.
    auto slot_smem = [&](int slot) { return step_smem + slot * 8 * QTile::kBytes; };
    // Warpgroup 1: the staged step into slot `slot`, as it is and transposed.
    auto unstage_step = [&](int slot) {
        const QtLoader map(nullptr, 0, 0);  // (the staging map only: Q's and dO's are the same)
        const unsigned q = slot_smem(slot);
        // Q's and dO's staged tiles (side by side: copy_rows) together: both tiles' loads first.
        const unsigned rows[2] = {q, q + 2 * QTile::kBytes}, cols[2] = {q + 4 * QTile::kBytes, q + 6 * QTile::kBytes};
        map.template split_staged<QTile, true, 2>(staging, gtid, rows, cols);
        ptx::fence_proxy_async_shared();
    };

    // ---- Prologue: K (through the staging tile: K, and K^T into slot 1) and V (split in place) by
    // the block, then K^T's fragments, step 0 (and step 1's copies) by warpgroup 1.
    k_loader.copy(staging, n0, at.seqlen_k, tid);
    v_loader.load(v_smem, n0, at.seqlen_k, tid);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    const unsigned kt_smem = kDqTransposed ? slot_smem(1) : kt_tiles;
    k_loader.template split_staged<KVTile, true>(staging, tid, k_smem, kt_smem);
    ptx::fence_proxy_async_shared();
    v_loader.split(v_smem, v_smem + KVTile::kBytes, tid);
    ptx::fence_proxy_async_shared();
    __syncthreads();  // K's staged copies read by every thread before step 0's land there; K^T complete
    const HeadTileStep first_step(range.first, range.last, heads);
    // Warpgroup 1, d64: K^T's TF32 fragments, hi and lo, for dQ^T (rows: this warp's 16 of D).
    unsigned kt_hi[kDqTransposed ? kKStepsN : 1][4], kt_lo[kDqTransposed ? kKStepsN : 1][4];
    // Warpgroup 1's schedule (bwd_wgmma.cuh's Feeder: step t in slot t % 2).
    const auto feeder = wgmma_bwd::make_feeder(range, heads, copy_rows, copy_stats, unstage_step);
    if (group == 1) {
        if constexpr (kDqTransposed) {
            tc::a_k8_from<kKStepsN, KtTile>(kt_hi, kt_smem, row0, lane);
            tc::a_k8_from<kKStepsN, KtTile>(kt_lo, kt_smem + KtTile::kBytes, row0, lane);
        }
        feeder.first_steps(first_step);
    }
    __syncthreads();

    const bool with_dq = p.dq_accum != nullptr;
    // The loop's two barriers a step, of both warpgroups (each in its own copy of the loop: one
    // loop with role branches kept warpgroup 0's fresh dV, dK fragments live through warpgroup
    // 1's part, 144 bytes spilled).
    auto step_barrier = [] { ptx::named_barrier_sync(1, kThreads); };
    if (group == 1) {
        // Between the step's barriers: d64 dQ_i^T (rows D, columns the step's queries); d32 dQ_i
        // (rows queries, columns D).
        feeder.steps(first_step, step_barrier, [&](const HeadTileStep& step, const auto& copy_stats_ahead) {
            float dq[kDqTransposed ? kBlockM / 8 : kHeadDim / 8][4];
            if (with_dq) {
                tc::zero(dq);
                ptx::wgmma_fence();
                if constexpr (kDqTransposed)
                    tc::wgmma_rs_bt_x3<kKStepsN, DsTile>(dq, kt_hi, kt_lo, ds_smem, ds_smem + DsTile::kBytes);
                else
                    tc::wgmma_ss_bt_x3<kKStepsN, DsTile, KtTile>(dq, ds_smem, ds_smem + DsTile::kBytes, kt_smem,
                                                                 kt_smem + KtTile::kBytes);
                ptx::wgmma_commit();
            }
            copy_stats_ahead();
            if (!with_dq) return;
            ptx::wgmma_wait<0>();
            ptx::wgmma_pin(dq);
            float* const dq_rows = static_cast<float*>(p.dq_accum) + at.dq_accum + HeadStep(p, step.g).dq_accum;
            const int m0 = step.i * kBlockM;
            if constexpr (kDqTransposed) {
                wgmma_bwd::red_add_dq_transposed<kBlockM>(dq_rows, dq, m0, row0 + lane / 4, at.seqlen_q, f.head_dim,
                                                          lane);
            } else {
                tc::add_rows<kHeadDim>(dq_rows + (long long)m0 * f.head_dim, dq, row0, at.seqlen_q - m0, 0,
                                       f.head_dim, lane);
            }
        });
        return;
    }

    float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];  // 64 keys x D
    tc::zero(dk);
    tc::zero(dv);
    const float scale_log2 = f.scale_log2;
    constexpr float kLog2e = 1.4426950408889634f;
    const ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), kLog2e, mask.diag);
    BiasGrad<float> dbias(p, bh);
    int t = 0;
    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last), ++t) {
        const int m0 = step.i * kBlockM;
        const bool masked = step.i < range.full_first || step.i >= range.full_last;
        const float* lse_s = reinterpret_cast<const float*>(stat_ptr + (t % 2) * kStatBytes);
        const float* delta_s = lse_s + kBlockM;
        float st[1][kBlockM / 8][4], dpt[1][kBlockM / 8][4];  // S^T then P^T; dP^T then dS^T
        tc::zero(st);
        tc::zero(dpt);
        ptx::wgmma_fence();
        const unsigned q = slot_smem(t % 2), dout = q + 2 * QTile::kBytes;
        tc::wgmma_ss_bt_x3<kKStepsD, KVTile, QTile>(st[0], k_smem, k_smem + KVTile::kBytes, q, q + QTile::kBytes);
        tc::wgmma_ss_bt_x3<kKStepsD, KVTile, QTile>(dpt[0], v_smem, v_smem + KVTile::kBytes, dout,
                                                    dout + QTile::kBytes);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(st[0]);
        ptx::wgmma_pin(dpt[0]);
        wgmma_bwd::probabilities_and_dscores<kBlockM>(
            st[0], dpt[0], mod, false, dbias, mask, masked, m0, n0 + row0 + lane / 4, at.seqlen_q, scale_log2, lane,
            [&](int col) { return tc::lse_log2(lse_s[col]); }, [&](int col) { return delta_s[col]; });
        // P^T and dS^T as A fragments (n8 tile kk is k8 step kk: a_k8_of); dS^T stored
        // transposed, split, for dQ^T's B operand (dS: queries x keys in K^T's k order).
        typename Arith::AFragment pa[kKStepsM], dsa[kKStepsM];
#pragma unroll
        for (int kk = 0; kk < kKStepsM; ++kk) {
            typename Arith::AFragment a[1];
            tc::a_k8_of(a, st, kk);
            pa[kk] = a[0];
            tc::a_k8_of(a, dpt, kk);
            dsa[kk] = a[0];
        }
        if (with_dq) {
#pragma unroll
            for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int query = nt * 8 + 2 * (lane % 4) + e % 2;
                    const int pos = KtLoader::k_position(row0 + lane / 4 + 8 * (e / 2));
                    unsigned hi, lo;
                    tc::split_tf32(dpt[0][nt][e], hi, lo);
                    const unsigned off = DsTile::offset(query, pos / 4) + 4 * (pos % 4);
                    ptx::st_shared_b32(ds_smem + off, hi);
                    ptx::st_shared_b32(ds_smem + DsTile::kBytes + off, lo);
                }
            ptx::fence_proxy_async_shared();
        }
        // dV += P^T dO_i, dK += dS^T Q_i into fresh fragments (B: slot t % 2's dO_i^T, Q_i^T).
        float dv_step[kHeadDim / 8][4], dk_step[kHeadDim / 8][4];
        tc::zero(dv_step);
        tc::zero(dk_step);
        const unsigned qt = q + 4 * QTile::kBytes, dot = q + 6 * QTile::kBytes;
        ptx::wgmma_fence();
        tc::wgmma_rs_bt_x3<kKStepsM, QtTile>(dv_step, pa, dot, dot + QTile::kBytes);
        tc::wgmma_rs_bt_x3<kKStepsM, QtTile>(dk_step, dsa, qt, qt + QTile::kBytes);
        ptx::wgmma_commit();
        step_barrier();  // (warpgroup 1's first barrier of the step)
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(dv_step);
        ptx::wgmma_pin(dk_step);
        tc::add(dv, dv_step, dk, dk_step);
        step_barrier();  // (its second)
    }

    // ---- Epilogue (warpgroup 0).
    const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);  // recomputed: not held through the loop
    wgmma_bwd::write_float_dk_dv<kBlockN, kHeadDim>(p, out_group, out_n_index, dk, dv, row0, lane);
}

}  // namespace cuflash
