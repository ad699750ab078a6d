// Backward attention for float16 / bfloat16 on Hopper (sm_90a), over key tiles, warp-specialized:
// bwd_dkdv_wgmma.cu's algorithm and contract (its comment: S^T, dP^T, P^T, dS^T, dV, dK and dQ by
// fp32 REDs; a step's math is bwd_wgmma.cuh's, shared with it) with the loads taken off the warps
// that compute, as fwd_wgmma_ws.cu does for the forward, and above d64 dQ's adds too (the copy
// engine's bulk adds, dq_buffers below).
//
// A block has one producer warpgroup and two consumer warpgroups; consumer g owns keys
// [64g, 64g + 64) of the block's kBlockN = 128 (one wgmma M), its dK_g, dV_g in registers.
// - Producer warp 0 (one elected thread) asks the bulk tensor copy engine (TMA) for K and V once
//   and for Q_i, dO_i step after step (h, i) into a ring of kStages slots; producer warp 1 copies
//   the step's lse_i and delta_i (plain loads: a head's lse row need not be 16-byte aligned) and
//   arrives on the slot's "full" mbarrier with its 32 lanes, beside the copy engine's bytes. A
//   slot is refilled once the eight consumer warps have arrived on its "empty" mbarrier.
// - The consumers wait only on mbarriers and, for the dQ product, on one named barrier between
//   the two warpgroups (dS^T of both in shared memory) and one before dS^T is rewritten.
// Maps (BwdTmaParams, params.cuh; built by the host as the forward's): query rows past Lq read as
// zeros or as the next packed sequence's rows, and either way the tiles crossing Lq are masked
// (P = 0); key rows past Lk are zeroed in shared memory once (below), as the cp.async loaders of
// bwd_dkdv_wgmma zero-fill them.
// The gradient of a bias broadcast over the queries is summed per key here (BwdParams::dbias_keys):
// a block owns its keys and sees every query of a head that sees them, so the sums need neither
// a (rows, Lq, Lk) dS buffer nor atomics.
#include <cuda_fp16.h>
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

// dQ tiles on their way to dq_accum: fp32 rows of kHeadDim + 8 floats (the padding spreads a
// warp's rows over the banks), two buffers so that a step's tile is written while the copy engine
// still reads the previous one. At d64 none: there a step is half as long for the same 64 row
// copies, and the bulk adds measured 0.87-0.97x the consumers' own REDs (H200, session 16).
template <int kHeadDim>
constexpr int dq_buffers() { return kHeadDim > 64 ? 2 : 0; }
template <int kHeadDim>
constexpr int dq_stage_stride() { return kHeadDim + 8; }

// K, V, dS^T, per stage Q_i and dO_i (swizzled), per stage lse_i and delta_i (2 * kBlockM floats),
// the dQ buffers, the mbarriers (K/V, full and empty per stage, dQ full and empty per buffer),
// 1024 bytes to align the swizzle atoms.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_wgmma_ws_smem_bytes() {
    return 1024 + 2 * tc::Sw128Tile<kBlockN, kHeadDim>::kBytes + tc::Sw128Tile<kBlockN, kBlockM>::kBytes +
           kStages * 2 * tc::Sw128Tile<kBlockM, kHeadDim>::kBytes + kStages * 2 * kBlockM * 4 +
           dq_buffers<kHeadDim>() * kBlockM * dq_stage_stride<kHeadDim>() * 4 +
           8 * (1 + 2 * kStages + 2 * dq_buffers<kHeadDim>());
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_wgmma_ws(const __grid_constant__ BwdTmaParams tp) {
    const BwdParams& p = tp.bwd;
    constexpr int kGroupKeys = 64;                            // keys per consumer warpgroup
    constexpr int kConsumerThreads = 256;
    constexpr bool kDqByRows = kBlockM == 128;
    constexpr int kDqN = kDqByRows ? kHeadDim : kHeadDim / 2;
    constexpr int kKStepsD = kHeadDim / 16;
    constexpr int kPanels = kHeadDim / 64;
    static_assert(kWarps == 12 && kBlockN == 2 * kGroupKeys, "a producer and two consumer warpgroups of 64 keys");
    static_assert(kBlockM == 64 || kBlockM == 128, "a query tile is one or two 64-column wgmma tiles");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 128 && kDqN % 32 == 0,
                  "whole 64-column panels; dQ per warpgroup one wgmma of N = 32, 64 or 128");
    static_assert(kBlockM % 32 == 0, "producer warp 1 copies kBlockM / 32 lse and delta values per lane");
    static_assert(kStages >= 2, "the Q/dO ring needs at least two slots");

    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;
    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;
    using DsTile = tc::Sw128Tile<kBlockN, kBlockM>;
    using StageTile = tc::SmemTile<kBlockN, kHeadDim>;
    constexpr unsigned kStageBytes = 2 * QTile::kBytes;
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;
    constexpr unsigned kTileBytes = 2 * KVTile::kBytes + DsTile::kBytes + kStages * kStageBytes;
    constexpr int kDqBuffers = dq_buffers<kHeadDim>();
    constexpr int kDqRing = kDqBuffers > 0 ? kDqBuffers : 1;  // the step -> buffer modulus (no buffer: unused)
    constexpr int kDqStride = dq_stage_stride<kHeadDim>();
    constexpr unsigned kDqTileBytes = kBlockM * kDqStride * 4;
    constexpr unsigned kSmemBytes = bwd_dkdv_wgmma_ws_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + kTileBytes + kStages * kStatBytes + kDqBuffers * kDqTileBytes +
                                    8 * (1 + 2 * kStages + 2 * kDqBuffers), "1024: alignment");
    static_assert((kStatBytes % 16) == 0 && (kDqStride * 4) % 16 == 0, "dQ rows start on 16 bytes for the bulk adds");
    static_assert(2 * StageTile::kBytes <= kTileBytes, "dK and dV leave through the tiles' space");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned align = (1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u;
    const unsigned k_smem = ptx::smem_addr(smem) + align;
    const unsigned v_smem = k_smem + KVTile::kBytes;
    const unsigned ds_smem = v_smem + KVTile::kBytes;
    const unsigned stage_smem = ds_smem + DsTile::kBytes;
    const unsigned stat_smem = k_smem + kTileBytes;
    const unsigned dq_smem = stat_smem + kStages * kStatBytes;
    // kv_full, full[kStages], empty[kStages], dq_full[kDqBuffers], dq_empty[kDqBuffers]
    const unsigned bar_smem = dq_smem + kDqBuffers * kDqTileBytes;
    auto kv_full = [&] { return bar_smem; };
    auto full = [&](int slot) { return bar_smem + 8 * (1 + slot); };
    auto empty = [&](int slot) { return bar_smem + 8 * (1 + kStages + slot); };
    auto dq_full = [&](int buffer) { return bar_smem + 8 * (1 + 2 * kStages + buffer); };
    auto dq_empty = [&](int buffer) { return bar_smem + 8 * (1 + 2 * kStages + kDqBuffers + buffer); };

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const auto [group_index, n_index] = key_tile_block<kHasWindow>(p);
    const int heads = p.heads_per_block;
    const int bh = group_index * heads;
    const int n0 = n_index * kBlockN;
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_key_block<unsigned short, float, kBlockN>(p, bh, n_index, n0, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, at.seqlen_q);
    const int steps = heads * (range.last - range.first);

    if (tid == 0) {
        ptx::mbarrier_init(kv_full(), 1);
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            ptx::mbarrier_init(full(s), 1 + 32);  // the copy engine's transaction, producer warp 1's lanes
            ptx::mbarrier_init(empty(s), 8);      // one arrival per consumer warp
        }
#pragma unroll
        for (int b = 0; b < kDqBuffers; ++b) {
            ptx::mbarrier_init(dq_full(b), 8);   // one arrival per consumer warp
            ptx::mbarrier_init(dq_empty(b), 1);  // producer warp 2, its reads done
        }
    }
    __syncthreads();
    // dQ's tiles leave through shared memory and the copy engine's bulk adds, off the consumers,
    // where every row of dq_accum starts on 16 bytes (D % 4 == 0); else the consumers add theirs
    // with REDs.
    float* const dq_head = p.dq_accum != nullptr ? static_cast<float*>(p.dq_accum) + at.dq_accum : nullptr;
    const bool bulk_dq = kDqBuffers > 0 && dq_head != nullptr && f.head_dim % 4 == 0;

    if (warp < 4) {
        // ---- Producer warpgroup.
        ptx::setmaxnreg_dec<24>();
        // Step t = (g, i) into slot t % kStages, once the slot's previous step has been released.
        auto wait_slot = [&](int t) {
            if (t >= kStages) ptx::mbarrier_wait(empty(t % kStages), (static_cast<unsigned>(t / kStages) & 1u) ^ 1u);
        };
        if (warp == 0 && ptx::elect_one()) {
            const MapOrigin origin(f, bh);  // params.cuh
            ptx::tma_prefetch_map(tp.q_map);
            ptx::tma_prefetch_map(tp.dout_map);
            ptx::mbarrier_arrive_expect_tx(kv_full(), 2 * KVTile::kBytes);
#pragma unroll
            for (int c = 0; c < kPanels; ++c) {
                ptx::tma_load_4d(k_smem + c * KVTile::kPanelBytes, tp.k_map, kv_full(), 64 * c, origin.k0 + n0,
                                 f.kv_group_div.div(origin.head), origin.batch);
                ptx::tma_load_4d(v_smem + c * KVTile::kPanelBytes, tp.v_map, kv_full(), 64 * c, origin.k0 + n0,
                                 f.kv_group_div.div(origin.head), origin.batch);
            }
            // The group's heads are consecutive query heads of one batch row: head + g.
            HeadTileStep step(range.first, range.last, heads);
            for (int t = 0; t < steps; ++t, step.advance(range.first, range.last)) {
                wait_slot(t);
                const unsigned slot = stage_smem + (t % kStages) * kStageBytes;
                ptx::mbarrier_arrive_expect_tx(full(t % kStages), kStageBytes);
                const int row = origin.q0 + step.i * kBlockM, head = origin.head + step.g, batch = origin.batch;
#pragma unroll
                for (int c = 0; c < kPanels; ++c) {
                    ptx::tma_load_4d(slot + c * QTile::kPanelBytes, tp.q_map, full(t % kStages), 64 * c, row, head, batch);
                    ptx::tma_load_4d(slot + QTile::kBytes + c * QTile::kPanelBytes, tp.dout_map, full(t % kStages), 64 * c,
                                     row, head, batch);
                }
            }
        } else if (warp == 1) {
            // lse_i and delta_i of each step: lane l copies rows l, l + 32, ...; lse_i in log2 units
            // (tc::lse_log2, here rather than once a key tile in each consumer); rows past Lq get
            // lse2 = +inf (P = 0; the mask zeroes them too: tiles crossing Lq are masked) and 0.
            const float* lse0 = static_cast<const float*>(f.lse) + at.lse;
            const float* delta0 = static_cast<const float*>(p.delta) + at.lse;  // delta is laid out like lse
            HeadTileStep step(range.first, range.last, heads);
            for (int t = 0; t < steps; ++t, step.advance(range.first, range.last)) {
                wait_slot(t);
                const long long head_offset = HeadStep(p, step.g).lse;
                const unsigned stats = stat_smem + (t % kStages) * kStatBytes;
#pragma unroll
                for (int r = lane; r < kBlockM; r += 32) {
                    const int row = step.i * kBlockM + r;
                    const bool real = row < at.seqlen_q;
                    ptx::st_shared_b32(stats + 4 * r, __float_as_uint(real ? tc::lse_log2(lse0[head_offset + row]) : tc::pos_inf()));
                    ptx::st_shared_b32(stats + 4 * (kBlockM + r), __float_as_uint(real ? delta0[head_offset + row] : 0.f));
                }
                ptx::mbarrier_arrive(full(t % kStages));  // release: the stores above come first
            }
        } else if (warp == 2 && bulk_dq) {
            // dQ_i of each step, once both consumer warpgroups have staged theirs: lane l adds rows
            // l, l + 32, ... below Lq (head_dim floats each) into dq_accum, then the buffer is free
            // as soon as the copy engine has read it.
            HeadTileStep step(range.first, range.last, heads);
            for (int t = 0; t < steps; ++t, step.advance(range.first, range.last)) {
                const int buffer = t % kDqRing;
                ptx::mbarrier_wait(dq_full(buffer), static_cast<unsigned>(t / kDqRing) & 1u);
                float* const rows = dq_head + HeadStep(p, step.g).dq_accum;
                const unsigned tile = dq_smem + buffer * kDqTileBytes;
#pragma unroll
                for (int r = lane; r < kBlockM; r += 32) {
                    const int row = step.i * kBlockM + r;
                    if (row < at.seqlen_q)
                        ptx::bulk_reduce_add_f32(rows + (long long)row * f.head_dim, tile + 4u * static_cast<unsigned>(r * kDqStride),
                                                 4u * static_cast<unsigned>(f.head_dim));
                }
                ptx::bulk_commit_group();
                ptx::bulk_wait_group_read<0>();
                ptx::mbarrier_arrive_warp(dq_empty(buffer));
            }
            ptx::bulk_wait_group<0>();  // the adds done before the block ends
        }
        return;
    }

    // ---- Consumer warpgroups.
    ptx::setmaxnreg_inc<240>();
    const int group = __shfl_sync(0xffffffffu, warp / 4 - 1, 0);  // uniform registers: fwd_wgmma_ws.cu says why
    const int consumer_tid = tid - 128;
    auto lane_key_row = [&] { return group * kGroupKeys + (warp % 4) * 16 + lane / 4; };

    float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];
    tc::zero(dk);
    tc::zero(dv);
    const float scale_log2 = f.scale_log2;

    constexpr float kLog2e = 1.4426950408889634f;
    ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), kLog2e, mask.diag);
    // A bias without softcap goes into S^T itself: each step's S^T starts as bias / scale
    // (tc::bias_into_transposed_scores, loaded before the wait for the step's Q and dO: a step
    // ahead, held through the dQ product, spills at d128) and its MMA adds K Q^T.
    mod.bias_in_scores = kScoreMods && tc::bias_goes_into_scores(f);
    const bool bias_in_st = kScoreMods && mod.bias_in_scores;
    BiasGrad<float> dbias(p, bh);
    const bool modified = kScoreMods && mod.modifies();
    // A bias broadcast over the queries: its gradient summed per key here (wgmma_bwd::add_key_sums)
    // rather than dS of every score stored (dbias null then).
    float* const dbias_keys = kScoreMods ? p.dbias_keys : nullptr;
    float key_sums[2] = {0.f, 0.f};

    ptx::mbarrier_wait(kv_full(), 0);
    // Keys past the sequence's end read as zeros, as bwd_dkdv_wgmma's loaders give them (a map
    // reads what the tensor holds there: the next packed sequence, the keys past a key-padding
    // cut): the kernel's dQ relies on K's rows there being 0 (their P is not masked in tiles that
    // only cross Lk), and V's keep dP finite.
    const int valid_keys = at.seqlen_k - n0;
    if (valid_keys < kBlockN) {
#pragma unroll
        for (int c = 0; c < kPanels; ++c)
            for (int chunk = 8 * valid_keys + consumer_tid; chunk < 8 * kBlockN; chunk += kConsumerThreads) {
                ptx::st_shared_v4(k_smem + c * KVTile::kPanelBytes + 16 * chunk, 0u, 0u, 0u, 0u);
                ptx::st_shared_v4(v_smem + c * KVTile::kPanelBytes + 16 * chunk, 0u, 0u, 0u, 0u);
            }
        ptx::fence_proxy_async_shared();
        ptx::named_barrier_sync(1, kConsumerThreads);
    }
    HeadTileStep step(range.first, range.last, heads);
    float st[kBlockM / 8][4], dpt[kBlockM / 8][4];  // S^T then P^T; dP^T then dS^T
    for (int t = 0; t < steps; ++t, step.advance(range.first, range.last)) {
        const int i = step.i, slot_index = t % kStages;
        // (drawn first: no accumulator of the step is live yet)
        const wgmma_bwd::StepDropout<kBlockM> dropout(f, kDropout, bh + step.g, n0 + lane_key_row(), i * kBlockM, lane);
        // (zeros otherwise: st is then written here on every path, never carried from the last step)
        if (bias_in_st) tc::bias_into_transposed_scores(f, bh + step.g, st, i * kBlockM, n0 + lane_key_row(), lane);
        else tc::zero(st);
        ptx::mbarrier_wait(full(slot_index), static_cast<unsigned>(t / kStages) & 1u);
        const bool masked = i < range.full_first || i >= range.full_last;
        const unsigned q_slot = stage_smem + slot_index * kStageBytes;
        const unsigned do_slot = q_slot + QTile::kBytes;
        const unsigned lse_s = stat_smem + slot_index * kStatBytes;
        const unsigned delta_s = lse_s + 4 * kBlockM;
        const int m0 = i * kBlockM;

        if (bias_in_st)
            wgmma_bwd::transposed_scores<Element, kBlockM, kKStepsD, KVTile, QTile, true>(st, dpt, k_smem, v_smem, q_slot,
                                                                                        do_slot, group * kGroupKeys);
        else
            wgmma_bwd::transposed_scores<Element, kBlockM, kKStepsD, KVTile, QTile>(st, dpt, k_smem, v_smem, q_slot,
                                                                                  do_slot, group * kGroupKeys);

        if (kScoreMods && heads > 1 && step.i == range.first) {
            mod.head(f, bh + step.g, kLog2e);
            dbias.head(bh + step.g);
        }
        auto lse2_of = [&](int col) { return __uint_as_float(ptx::ld_shared_b32(lse_s + 4 * col)); };  // (staged in log2 units)
        auto delta_of = [&](int col) { return __uint_as_float(ptx::ld_shared_b32(delta_s + 4 * col)); };
        dropout.apply(f, dpt);
        wgmma_bwd::probabilities_and_dscores<kBlockM>(st, dpt, mod, modified, dbias, mask, masked, m0,
                                                      n0 + lane_key_row(), at.seqlen_q, scale_log2, lane, lse2_of,
                                                      delta_of);
        dropout.apply(f, st);
        if (dbias_keys != nullptr) {
            if (i == range.first) key_sums[0] = key_sums[1] = 0.f;  // a head's first step
            wgmma_bwd::add_key_sums<kBlockM>(key_sums, dpt);
            if (i == range.last - 1)
                wgmma_bwd::store_key_sums(dbias_keys + static_cast<long long>(bh + step.g) * f.seqlen_k, key_sums,
                                          n0 + lane_key_row(), at.seqlen_k, lane);
        }
        unsigned dsa[kBlockM / 16][4];
        wgmma_bwd::accumulate_dv_dk<Element, kBlockM, kHeadDim, QTile>(dv, dk, st, dpt, q_slot, do_slot, dsa);

        if (dq_head != nullptr) {
            // dS^T to shared memory once both warpgroups are done with the previous step's (their
            // dQ products waited), then the dQ product over both halves (bwd_dkdv_wgmma.cu).
            ptx::named_barrier_sync(1, kConsumerThreads);
            wgmma_bwd::store_dst<kBlockM, DsTile>(ds_smem, dsa, group * kGroupKeys, warp, lane);
            ptx::named_barrier_sync(2, kConsumerThreads);
            const int q0 = kDqByRows ? group * 64 : 0, c0 = kDqByRows ? 0 : group * kDqN;
            float dq[kDqN / 8][4];
            wgmma_bwd::dq_product<Element, kBlockN, kDqN, DsTile, KVTile>(
                dq, ds_smem + (q0 / 64) * DsTile::kPanelBytes, k_smem + (c0 / 64) * KVTile::kPanelBytes + (c0 % 64) * 2);
            ptx::mbarrier_arrive_warp(empty(slot_index));  // Q_i, dO_i, lse_i, delta_i read
            if (bulk_dq) {  // staged for producer warp 2's bulk adds, once it has read the buffer's last tile
                const int buffer = t % kDqRing;
                if (t >= kDqRing)
                    ptx::mbarrier_wait(dq_empty(buffer), (static_cast<unsigned>(t / kDqRing) & 1u) ^ 1u);
                wgmma_bwd::stage_rows<kDqN, kDqStride>(dq_smem + buffer * kDqTileBytes, dq, q0 + (warp % 4) * 16, c0, lane);
                ptx::mbarrier_arrive_warp(dq_full(buffer));
            } else {
                tc::add_rows<kDqN>(dq_head + HeadStep(p, step.g).dq_accum, dq, m0 + q0 + (warp % 4) * 16,
                                        at.seqlen_q, c0, f.head_dim, lane);
            }
        } else {
            ptx::wgmma_wait<0>();
            ptx::mbarrier_arrive_warp(empty(slot_index));
        }
        ptx::wgmma_pin(dv);
        ptx::wgmma_pin(dk);
    }

    // ---- Epilogue: dK_g * scale and dV_g through shared memory (K, V and dS^T are free once both
    // warpgroups are past their last step), stored by the consumers; a slice of a split group adds
    // them into the group's fp32 sums instead.
    if (p.dkv_adds) {
        static_assert(kBlockN * (kHeadDim + 8) * 4 <= kTileBytes, "the sums' rows are staged in the tiles' space");
        const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);
        wgmma_bwd::add_dk_dv<kBlockN, kHeadDim, kConsumerThreads>(
            p, out_group, out_n_index, dk, dv, group * kGroupKeys + (warp % 4) * 16, k_smem, consumer_tid, lane,
            [] { ptx::named_barrier_sync(1, kConsumerThreads); });
        return;
    }
    ptx::named_barrier_sync(1, kConsumerThreads);
    const unsigned dk_stage = k_smem, dv_stage = k_smem + StageTile::kBytes;
    wgmma_bwd::stage_dk_dv<Element, kHeadDim, StageTile>(dk_stage, dv_stage, dk, dv, lane_key_row(),
                                                         static_cast<float>(f.scale), lane);
    ptx::named_barrier_sync(1, kConsumerThreads);
    const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);
    wgmma_bwd::store_dk_dv<kBlockN, kHeadDim, kConsumerThreads>(p, out_group, out_n_index, dk_stage, dv_stage,
                                                                consumer_tid);
}

}  // namespace cuflash
