// Backward attention for float32 under precision="highest" on Hopper (sm_90a) in bf16x6
// (tile_tc.cuh: every operand in three bfloat16 pieces, six products summed small ones first):
// dK, dV (and dQ by fp32 atomics) over key tiles. The algorithm, the contract and the operand
// forms are bwd_dkdv_wgmma.cu's (FlashAttention-2's backward with recomputation, the scores
// transposed so that P^T is an accumulator laid out as dV's A operand; Q_i, dO_i and K read
// MN-major where their rows are a product's k index), which bfloat16 allows and TF32 does not:
// where bwd_dkdv_wgmma_x3.cu stores Q_i and dO_i four times (hi and lo, as they are and
// transposed), this kernel stores them once, in three pieces (6 bytes a float against 16).
//
// A block owns kBlockN = 64 keys of one key/value head and a group of heads_per_block query heads
// that read it (GQA; params.cuh's HeadTileStep walks them), in two warpgroups: warpgroup 0
// multiplies by the keys, warpgroup 1 feeds it and computes dQ. Per step (h, i), query tile i of
// kBlockM = 64 rows of head h:
//
//   warpgroup 0                                   warpgroup 1
//   S^T  = K Q_i^T   SS, A = K, B = Q_i           Q_{i+1}, dO_{i+1} out of the staging tiles
//   dP^T = V dO_i^T  SS, A = V, B = dO_i          (split into pieces) into the other slot; step
//   P^T, dS^T (probabilities_and_dscores);        i+2's rows into the staging tiles
//   dS^T stored (split; keys x queries)
//   dV += P^T dO_i   RS, B = dO_i MN-major
//   dK += dS^T Q_i   SS, A = dS^T, B = Q_i MN-major
//   ---------------------------------------------- barrier: dS^T complete; the next step's tiles
//   dV, dK land; FADD into the accumulators       dQ_i = dS K (SS, A = dS^T's tile MN-major, B =
//                                                 K MN-major, M = 64 queries), added into
//                                                 dq_accum by REDs; step i+2's lse, delta
//   ---------------------------------------------- barrier: this step's products done
//
// dV's and dK's products land in fresh fragments added to the accumulators by FADD each step
// (the tensor cores truncate as they accumulate: tile_tc.cuh's tf32x3); dK *= scale once at the
// end, dQ's scale is bwd_dq_convert's. dK reads dS^T from shared memory (SS) rather than from
// registers: its three pieces' fragments (48 registers) beside P^T's would not fit.
// Shared memory (d64: 202 KB, one block a SM): K, V and dS^T in three piece tiles each, two
// slots (steps t and t + 1) of Q_i, dO_i in three piece tiles each, the float32 staging tiles of
// the next step's raw Q and dO rows (the prologue: K's and V's), two slots of lse_i and delta_i.
#include <cuda_bf16.h>

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
// 1024 bytes of alignment; bfloat16 piece tiles (three a tensor): K, V (kBlockN x D), dS^T
// (kBlockN x kBlockM), two slots of Q_i, dO_i (kBlockM x D); the float32 staging tiles of Q's
// and dO's rows (2 kBlockM x D floats); two slots of lse_i and delta_i (2 kBlockM floats each).
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_wgmma_x6_smem_bytes() {
    return 1024 + 2 * 3 * (2 * kBlockN * kHeadDim + kBlockN * kBlockM + 2 * 2 * kBlockM * kHeadDim) +
           4 * (2 * kBlockM * kHeadDim + 2 * 2 * kBlockM);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_wgmma_x6(const BwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroupThreads = 128;  // a warpgroup
    constexpr int kPieces = 3;
    static_assert(tc::Arith<Element>::kUnits == 2, "float32 (the Variant's Element names its precision)");
    static_assert(!kScoreMods && !kDropout, "no modifiers, no dropout (tiles.py: FFMA serves them)");
    static_assert(kWarps == 8 && kBlockN == 64 && kBlockM == 64 && kHeadDim == 64 && kStages == 1,
                  "two warpgroups on 64 keys (wgmma M) and 64-query steps (dQ's M), whole 128-byte rows");

    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;         // a piece of K or V (keys x D)
    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;          // a piece of Q_i or dO_i (queries x D)
    using DsTile = tc::Sw128Tile<kBlockN, kBlockM>;          // a piece of dS^T (keys x queries)
    using RawKVTile = tc::Sw128Tile<kBlockN, 2 * kHeadDim>;  // K's or V's floats (the prologue)
    using RawQTile = tc::Sw128Tile<kBlockM, 2 * kHeadDim>;   // Q_i's or dO_i's floats
    constexpr int kKStepsD = kHeadDim / 16;  // k16 steps over D (S^T, dP^T)
    constexpr int kKStepsM = kBlockM / 16;   // over a step's queries (dV, dK)
    constexpr int kKStepsN = kBlockN / 16;   // over the keys (dQ)
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse_i, then delta_i
    constexpr unsigned kSlotBytes = 2 * kPieces * QTile::kBytes;
    constexpr unsigned kStagingBytes = 2 * RawQTile::kBytes;
    static_assert(2 * RawKVTile::kBytes <= kStagingBytes, "K's and V's floats pass through the staging tiles");
    constexpr unsigned kSmemBytes = bwd_dkdv_wgmma_x6_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + kPieces * (2 * KVTile::kBytes + DsTile::kBytes) + 2 * kSlotBytes + kStagingBytes +
                                    2 * kStatBytes, "1024: alignment");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    // Swizzle atoms start on 1024-byte boundaries; a tensor's pieces follow each other.
    const unsigned align = (1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u;
    const unsigned k_smem = ptx::smem_addr(smem) + align;
    const unsigned v_smem = k_smem + kPieces * KVTile::kBytes;
    const unsigned ds_smem = v_smem + kPieces * KVTile::kBytes;
    const unsigned step_smem = ds_smem + kPieces * DsTile::kBytes;  // slot s: Q_i's pieces, then dO_i's
    const unsigned staging = step_smem + 2 * kSlotBytes;           // Q's floats, then dO's
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
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kThreads, RawKVTile> k_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.k) + at.k), f.k_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kThreads, RawKVTile> v_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.v) + at.v), f.v_row_stride * 2, f.head_dim_v * 2);
    // Q's and dO's rows and lse's and delta's, by warpgroup 1.
    const tc::QueryTileLoader<kBlockM, 2 * kHeadDim, kGroupThreads, RawQTile, 2> query_rows(p, at);
    if (!(k_rows.aligned(at.seqlen_k) && v_rows.aligned(at.seqlen_k) && query_rows.aligned())) __trap();

    // Warpgroup 1: step (h, i)'s Q and dO rows into the staging tiles (cp.async; the caller commits).
    auto copy_rows = [&](const HeadTileStep& s) {
        const auto rows = query_rows.head(p, s.g);
        rows.q.load(staging, s.i * kBlockM, at.seqlen_q, gtid);
        rows.dout.load(staging + RawQTile::kBytes, s.i * kBlockM, at.seqlen_q, gtid);
    };
    // Warpgroup 1: step (h, i)'s lse and delta into stat slot `slot` (cp.async; the caller commits).
    auto copy_stats = [&](const HeadTileStep& s, int slot) {
        query_rows.head(p, s.g).load_stats(stat_ptr + slot * kStatBytes, s.i, gtid);
    };
    auto slot_smem = [&](int slot) { return step_smem + slot * kSlotBytes; };
    // Warpgroup 1: the staged step into slot `slot`, split into pieces (the chunks this thread
    // copied: no barrier before), fenced for the tensor cores.
    auto unstage_step = [&](int slot) {
        const unsigned q = slot_smem(slot);
        query_rows.q.template split_pieces<QTile>(staging, q, gtid);
        query_rows.dout.template split_pieces<QTile>(staging + RawQTile::kBytes, q + kPieces * QTile::kBytes, gtid);
        ptx::fence_proxy_async_shared();
    };

    // ---- Prologue: K and V through the staging tiles into their pieces (the block), then step 0
    // (and step 1's copies) by warpgroup 1.
    k_rows.load(staging, n0, at.seqlen_k, tid);
    v_rows.load(staging + RawKVTile::kBytes, n0, at.seqlen_k, tid);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    k_rows.template split_pieces<KVTile>(staging, k_smem, tid);
    v_rows.template split_pieces<KVTile>(staging + RawKVTile::kBytes, v_smem, tid);
    ptx::fence_proxy_async_shared();
    __syncthreads();  // K's and V's floats read by every thread before step 0's land there
    const HeadTileStep first_step(range.first, range.last, heads);
    // Warpgroup 1's schedule (bwd_wgmma.cuh's Feeder: step t in slot t % 2).
    const auto feeder = wgmma_bwd::make_feeder(range, heads, copy_rows, copy_stats, unstage_step);
    if (group == 1) feeder.first_steps(first_step);
    __syncthreads();

    const bool with_dq = p.dq_accum != nullptr;
    // The loop's two barriers a step, of both warpgroups (each in its own copy of the loop, as
    // bwd_dkdv_wgmma_x3.cu's).
    auto step_barrier = [] { ptx::named_barrier_sync(1, kThreads); };
    if (group == 1) {
        // Between the step's barriers: dQ_i = dS K (rows the step's queries, this warp's 16: row0
        // + ..., columns D).
        feeder.steps(first_step, step_barrier, [&](const HeadTileStep& step, const auto& copy_stats_ahead) {
            float dq[kHeadDim / 8][4];
            if (with_dq) {
                tc::zero(dq);
                ptx::wgmma_fence();
                tc::wgmma_ss_x6<kKStepsN, DsTile, KVTile, 1, 1>(dq, ds_smem, k_smem);
                ptx::wgmma_commit();
            }
            copy_stats_ahead();
            if (with_dq) {
                ptx::wgmma_wait<0>();
                ptx::wgmma_pin(dq);
                float* const dq_rows = static_cast<float*>(p.dq_accum) + at.dq_accum + HeadStep(p, step.g).dq_accum;
                const int m0 = step.i * kBlockM;
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
        const unsigned q = slot_smem(t % 2), dout = q + kPieces * QTile::kBytes;
        float st[kBlockM / 8][4], dpt[kBlockM / 8][4];  // S^T then P^T; dP^T then dS^T
        tc::zero(st);
        tc::zero(dpt);
        ptx::wgmma_fence();
        tc::wgmma_ss_x6<kKStepsD, KVTile, QTile, 0, 0>(st, k_smem, q);
        tc::wgmma_ss_x6<kKStepsD, KVTile, QTile, 0, 0>(dpt, v_smem, dout);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(st);
        ptx::wgmma_pin(dpt);
        wgmma_bwd::probabilities_and_dscores<kBlockM>(
            st, dpt, mod, false, dbias, mask, masked, m0, n0 + row0 + lane / 4, at.seqlen_q, scale_log2, lane,
            [&](int col) { return tc::lse_log2(lse_s[col]); }, [&](int col) { return delta_s[col]; });
        // dS^T's pieces into their tiles (dK's A and dQ's), fenced, published to this warpgroup
        // (dK) and, by the step barrier, to warpgroup 1 (dQ).
#pragma unroll
        for (int kk = 0; kk < kKStepsM; ++kk) {
            unsigned dsa[kPieces][4];
            tc::pack_a_x3(dpt[2 * kk], dpt[2 * kk + 1], dsa);
#pragma unroll
            for (int i = 0; i < kPieces; ++i)
                wgmma_bwd::store_dst_step<DsTile>(ds_smem + i * DsTile::kBytes, dsa[i], kk, 0, warp, lane);
        }
        ptx::fence_proxy_async_shared();
        ptx::named_barrier_sync(2, kGroupThreads);  // dS^T's tiles complete for this warpgroup's dK
        // P^T's pieces as dV's A fragments (n8 tiles 2kk, 2kk + 1 are k16 step kk).
        unsigned pa[kKStepsM][kPieces][4];
#pragma unroll
        for (int kk = 0; kk < kKStepsM; ++kk) tc::pack_a_x3(st[2 * kk], st[2 * kk + 1], pa[kk]);
        // dV += P^T dO_i, dK += dS^T Q_i into fresh fragments.
        float dv_step[kHeadDim / 8][4], dk_step[kHeadDim / 8][4];
        tc::zero(dv_step);
        tc::zero(dk_step);
        ptx::wgmma_fence();
        tc::wgmma_rs_x6<kKStepsM, QTile, 1>(dv_step, pa, dout);
        tc::wgmma_ss_x6<kKStepsM, DsTile, QTile, 0, 1>(dk_step, ds_smem, q);
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
