// Backward attention on tensor cores, over query tiles: dQ, without atomics (the deterministic
// path; bwd_dkdv_tc.cu then runs with dq_accum = null). float16 / bfloat16 on m16n8k16, float32
// under precision="tf32" on m16n8k8 TF32 (tile_tc.cuh's Arith, as fwd_tc.cu).
//
// One block owns kBlockM query rows of one (batch..., head): Q_i and dO_i stay in shared memory,
// lse_i and delta_i in registers, dQ_i accumulates in fp32 registers, and the key tiles j that
// the rows see stream through shared memory (K_j, V_j; kStages deep, cp.async):
//
//   S   = Q_i K_j^T                              recompute the scores
//   P   = exp2(S * scale_log2 - lse_i log2 e)    (0 where masked, past Lq, or lse = -inf)
//   dP  = dO_i V_j^T
//   dS  = P o (dP - delta_i)                     delta_i = rowsum(dO_i o O_i), from bwd_delta
//                                                (dropout: dP o Z / q, dropout.cuh)
//   dQ_i += dS K_j                               (dS from registers; K_j through ldmatrix.trans,
//                                                 by 32-bit loads on TF32: tc::mma_k8_rows)
//   dQ_i *= scale                                (once, at the end)
//
// The sum over j runs in a fixed order in one thread: bitwise reproducible.
// Warp w owns kBlockM / kWarps consecutive rows, as in fwd_tc.cu; S, P, dP, dS are mma
// accumulators, and the accumulator layout of dS is the A operand of dS K_j.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dq_tc_smem_bytes() {
    // Q and dO (Q stages dQ at the end), then kStages (K, V) tile pairs, rows of 16-bit units.
    constexpr int kWidth = kHeadDim * tc::Arith<Element>::kUnits;
    return 2 * tc::SmemTile<kBlockM, kWidth>::kBytes + kStages * 2 * tc::SmemTile<kBlockN, kWidth>::kBytes;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32) bwd_dq_tc(const BwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr bool kTf32 = Arith::kUnits == 2;        // float32 on TF32 tensor cores
    constexpr int kUnits = Arith::kUnits;             // 16-bit units per element
    constexpr int kWidth = kHeadDim * kUnits;         // a row's units in shared memory
    using Storage = typename Arith::Storage;
    using Units = const unsigned short*;
    constexpr int kThreads = kWarps * 32;
    constexpr int kRowsPerWarp = kBlockM / kWarps;
    constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
    constexpr int kNTilesS = kBlockN / 8;       // n8 tiles of S (keys)
    constexpr int kNTilesD = kHeadDim / 8;      // n8 tiles of dQ (columns)
    constexpr int kKStepsD = kHeadDim / Arith::kK;  // k16 (k8) steps of Q K^T and dO V^T
    constexpr int kKStepsN = kBlockN / Arith::kK;   // k16 (k8) steps of dS K
    static_assert(kRowsPerWarp % 16 == 0 && kMTiles >= 1, "each warp owns whole m16 tiles");
    static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles are multiples of 16");
    static_assert(kStages >= 2, "the K/V pipeline needs at least two stages");

    using QTile = tc::SmemTile<kBlockM, kWidth>;   // Q_i, dO_i; Q_i stages dQ at the end
    using KVTile = tc::SmemTile<kBlockN, kWidth>;  // one K or V tile
    constexpr unsigned kStageBytes = 2 * KVTile::kBytes;
    constexpr unsigned kSmemBytes = bwd_dq_tc_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 2 * QTile::kBytes + kStages * kStageBytes, "layout");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem);
    const unsigned do_smem = q_smem + QTile::kBytes;
    const unsigned kv_smem = do_smem + QTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const auto [bh, m_block] = query_tile_block<kHasWindow>();  // schedule.cuh
    const int m0 = m_block * kBlockM;
    const int warp_row0 = warp * kRowsPerWarp;
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_query_block<Storage, kBlockM>(p, bh, m_block, m0, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // Loaders and stores count in 16-bit units: kUnits per element (a float is two).
    const tc::TileLoader<kBlockM, kWidth, kThreads> q_loader(reinterpret_cast<Units>(static_cast<const Storage*>(f.q) + at.q),
                                                              f.q_row_stride * kUnits, f.head_dim * kUnits);
    const tc::TileLoader<kBlockM, kWidth, kThreads> do_loader(
        reinterpret_cast<Units>(static_cast<const Storage*>(p.dout) + at.dout), p.dout_row_stride * kUnits,
        f.head_dim_v * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kThreads> k_loader(reinterpret_cast<Units>(static_cast<const Storage*>(f.k) + at.k),
                                                              f.k_row_stride * kUnits, f.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kThreads> v_loader(reinterpret_cast<Units>(static_cast<const Storage*>(f.v) + at.v),
                                                              f.v_row_stride * kUnits, f.head_dim_v * kUnits);
    if (!(q_loader.aligned(at.seqlen_q) && do_loader.aligned(at.seqlen_q) && k_loader.aligned(at.seqlen_k) &&
          v_loader.aligned(at.seqlen_k)))
        __trap();
    auto load_kv = [&](int j) {
        const unsigned slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;
        k_loader.load(slot, j * kBlockN, at.seqlen_k, tid);
        v_loader.load(slot + KVTile::kBytes, j * kBlockN, at.seqlen_k, tid);
    };

    // ---- Pipeline: groups (Q_i, dO_i), K/V tile first, ..., one per loop step (as fwd_tc.cu).
    q_loader.load(q_smem, m0, at.seqlen_q, tid);
    do_loader.load(do_smem, m0, at.seqlen_q, tid);
    ptx::cp_async_commit();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (range.first + s < range.last) load_kv(range.first + s);
        ptx::cp_async_commit();
    }

    // Row statistics of this lane's rows (g and g+8 of each m-tile), while the tiles land.
    float lse2[kMTiles][2], delta[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
        tc::row_stats(static_cast<const float*>(f.lse) + at.lse, static_cast<const float*>(p.delta) + at.lse,
                      m0 + warp_row0 + mt * 16 + lane / 4, at.seqlen_q, lse2[mt], delta[mt]);

    // Per-lane ldmatrix addresses (as fwd_tc.cu). Q_i, dO_i (A): rows lane%16, chunk lane/16.
    // K_j, V_j as B with n = keys: rows (lane/16)*8 + lane%8, chunk (lane/8)%2. K_j as B with
    // k = keys (ldmatrix.trans): rows ((lane/8)%2)*8 + lane%8, chunk lane/16; on TF32 by 32-bit
    // loads (tc::k8_rows_lane). A TF32 k8 step has the byte geometry of a 16-bit k16 step: the
    // same lane addresses for Q, dO, K, V, the fragments rounded to TF32.
    const unsigned q_lane = q_smem + tc::a_lane<QTile>(warp_row0, lane);
    const unsigned do_lane = do_smem + tc::a_lane<QTile>(warp_row0, lane);
    const unsigned bn_lane = tc::bn_lane<KVTile>(lane);
    const unsigned bt_lane = kTf32 ? tc::k8_rows_lane<KVTile>(lane) : tc::bt_lane<KVTile>(lane);


    float acc[kMTiles][kNTilesD][4];  // dQ_i / scale
    tc::zero(acc);
    const float scale_log2 = f.scale_log2;
    ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), 1.4426950408889634f, mask.diag);  // with kScoreMods
    // A bias without softcap goes into S itself (as in bwd_dkdv_tc): each tile's S starts as
    // bias / scale and the MMA adds Q_i K_j^T.
    constexpr bool kBiasInS = kScoreMods;
    mod.bias_in_scores = kBiasInS && tc::bias_goes_into_scores(f);

    for (int j = range.first; j < range.last; ++j) {
        const bool masked = j < range.full_first || j >= range.full_last;
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // tile j visible to all; everyone is done with the slot reloaded below
        if (j + kStages - 1 < range.last) load_kv(j + kStages - 1);
        ptx::cp_async_commit();
        const unsigned k_slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;
        const unsigned v_slot = k_slot + KVTile::kBytes;

        // Dropout's keep bits of this tile (dropout.cuh), drawn before S and dP are live.
        tc::DropBits<kMTiles, kNTilesS> keep;
        const bool drops = kDropout && f.dropout_threshold;
        if (drops) keep.draw(Dropout(f, bh), m0 + warp_row0, j * kBlockN, lane);

        // S = Q_i K_j^T (+ bias / scale) and dP = dO_i V_j^T, side by side over the same k-steps (dims).
        float s[kMTiles][kNTilesS][4], dp[kMTiles][kNTilesS][4];
        if (kBiasInS && mod.bias_in_scores)
            tc::bias_into_scores(f, ScoreMod<float>::row_planes(f, bh), 1.f / static_cast<float>(f.scale), s,
                                 m0 + warp_row0, j * kBlockN, lane);
        else
            tc::zero(s);
        tc::zero(dp);
#pragma unroll
        for (int kk = 0; kk < kKStepsD; ++kk) {
            typename Arith::AFragment a[kMTiles];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) tc::load_a(q_lane + QTile::offset(mt * 16, kk * 2), a[mt]);
            tc::mma_k16<Element, KVTile, false>(s, a, k_slot + bn_lane, 0, kk * 2);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) tc::load_a(do_lane + QTile::offset(mt * 16, kk * 2), a[mt]);
            tc::mma_k16<Element, KVTile, false>(dp, a, v_slot + bn_lane, 0, kk * 2);
        }
        // Dropout: dP o Z * scale, so that dS = P o (Z o dP / q - delta_i) below.
        if (drops) keep.apply(dp, static_cast<float>(f.dropout_scale));

        // P = exp2(S * scale_log2 - lse2_i) (lse2 = +inf gives 0); dS = P o (dP - delta_i). With
        // score modifiers (score_mod.cuh): P = exp2(x - lse2_i) of the modified score x in log2
        // units, and dP becomes (dP - delta_i) o dx / d(scale S) in the bodies, which test no
        // score (dS = P o dP after them). The dropout Variants keep the fused form, dS made in
        // the body and the mask tested per score: the split one spilled two of them (fp16 d32 on
        // sm_80-89, TF32 d64 on sm_90a), and with only the mask test back in the body a third.
        constexpr bool kFusedBody = kDropout;
        bool modified = false;
        if constexpr (kScoreMods) {
            // (no origin for ALiBi's distance: at d64 its hoisted distances spill on sm_86/89)
            modified = mod.template dispatch<ModBodies::kByCap>([&](const auto& score) {
                tc::for_each(s, dp, m0 + warp_row0, j * kBlockN, lane, [&](float& x, float& y, int r, int row, int key) {
                    float grad;
                    const float x2 = score(x, row, key, grad);
                    if constexpr (kFusedBody) {
                        const float prob = masked && !mask.visible(row, key) ? 0.f : ptx::ex2(score.exponent(x2, lse2[r / 2][r % 2]));
                        y = prob * (y - delta[r / 2][r % 2]);
                    } else {
                        x = ptx::ex2(score.exponent(x2, lse2[r / 2][r % 2]));
                        y -= delta[r / 2][r % 2];
                    }
                    if (score.capped) y *= grad;
                });
            });
        }
        if (modified) {
            // Hidden (query, key) pairs: P = 0, masked tiles only, in their own loop (the bodies'
            // exponent of a hidden pair is computed, then replaced); dS = P o that scaled dP.
            if constexpr (!kFusedBody) {
                if (masked) tc::apply_mask(mask, s, m0 + warp_row0, j * kBlockN, lane, 0.f);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                    for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) dp[mt][nt][e] *= s[mt][nt][e];
            }
        } else {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float prob = ptx::ex2(fmaf(s[mt][nt][e], scale_log2, -lse2[mt][e / 2]));
                        if (masked) {
                            const int row = m0 + warp_row0 + mt * 16 + lane / 4 + 8 * (e / 2);
                            const int key = j * kBlockN + nt * 8 + 2 * (lane % 4) + e % 2;
                            if (!mask.visible(row, key)) prob = 0.f;
                        }
                        dp[mt][nt][e] = prob * (dp[mt][nt][e] - delta[mt][e / 2]);
                    }
        }

        // dQ_i += dS K_j
#pragma unroll
        for (int kk = 0; kk < kKStepsN; ++kk) {
            if constexpr (kTf32) {
                typename Arith::AFragment a[kMTiles];
                tc::a_k8_of(a, dp, kk);
                tc::mma_k8_rows<KVTile>(acc, a, k_slot + bt_lane, kk * 8, 0);
            } else {
                unsigned a[kMTiles][4];
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) tc::pack_a<Element>(dp[mt][2 * kk], dp[mt][2 * kk + 1], a[mt]);
                tc::mma_k16<Element, KVTile, true>(acc, a, k_slot + bt_lane, kk * 16, 0);
            }
        }
    }

    // ---- Epilogue: dQ_i = scale * acc in the input type, staged through this warp's own Q_i
    // rows (no other warp reads them) and stored as 16-byte chunks where aligned.
    ptx::cp_async_wait<0>();
    __syncthreads();
    const float scale = static_cast<float>(f.scale);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + mt * 16 + lane / 4 + 8 * h;
#pragma unroll
            for (int nt = 0; nt < kNTilesD; ++nt)
                tc::store_pair<Element, QTile>(q_smem, row, nt, lane, acc[mt][nt][2 * h] * scale,
                                               acc[mt][nt][2 * h + 1] * scale);
        }
    __syncwarp();
    const BwdBatchIndex out_at(p, ptx::block_index_x());  // recomputed: not held through the loop
    tc::store_rows<kRowsPerWarp, kWidth>(q_smem + QTile::offset(warp_row0, 0),
                                         reinterpret_cast<unsigned short*>(static_cast<Storage*>(p.dq) + out_at.dq) +
                                             (m0 + warp_row0) * p.dq_row_stride * kUnits,
                                         p.dq_row_stride * kUnits, out_at.seqlen_q - m0 - warp_row0, f.head_dim * kUnits,
                                         lane);
}

}  // namespace cuflash
