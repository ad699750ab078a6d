// Forward attention for float16 / bfloat16 on Hopper (sm_90a), warp-specialized: fwd_wgmma.cu's
// algorithm with the loads taken off the warps that compute (FlashAttention-3's design).
//
//   O = softmax(Q K^T * scale) V,   lse = log(sum_j exp(Q K_j^T * scale))   (per query row)
//
// A block has one producer warpgroup and kBlockM / 64 consumer warpgroups; consumer g owns query
// rows [64g, 64g + 64) of the block's kBlockM, one wgmma M.
// - The producer (one thread of its first warp) asks the bulk tensor copy engine (TMA, ptx.cuh
//   section 10) for Q once, then for K_t and V_t tile after tile into two rings of kStages slots;
//   each copy completes on its slot's "full" mbarrier, and a slot is refilled once every consumer
//   warp has arrived on its "empty" mbarrier. It then gives most of its registers to the consumers
//   (setmaxnreg): it holds a few addresses and counters, they hold S, P and the accumulator.
// - The consumers run fwd_wgmma's loop unchanged in substance (the softmax of S_{t+1} while the
//   tensor cores compute P_t V_t), waiting on mbarriers instead of cp.async groups and block
//   barriers, so neither copy instructions nor block-wide barriers sit between their MMAs.
// - Ping-pong (CUFLASH_WS_PINGPONG, on by default): the consumer warpgroups take turns to issue
//   their MMAs (named barriers, in a cycle), so one's softmax runs while another's MMAs occupy
//   the tensor cores, rather than all competing for them at once and then all idling in softmax.
// Score modifiers, bias and mask (kScoreMods) and sinks are fwd_wgmma's (score_mod.cuh).
// The maps (FwdTmaParams, params.cuh) address (head dim, row, head, batch): rows past a tensor's
// end and columns past D arrive as zeros, as the cp.async loaders' zero-fill gives fwd_wgmma. A
// packed batch's maps span all its tokens (batch 1), so a tile past a sequence's end reads the
// next sequence's rows; and a key-padding cut or seqused_k ends a sequence's keys inside its
// tensor. Such keys get -inf scores from the mask and zeroed V rows (before the last P V), query
// rows past the end are never stored. The host takes this kernel wherever the maps describe the
// layout (plan._tensor_maps: batch axes merged into one; no broadcast axis but a shared key/value
// head); everything else runs fwd_wgmma or fwd_tc.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "softmax_tc.cuh"
#include "tile_tc.cuh"

#ifndef CUFLASH_WS_PINGPONG
#define CUFLASH_WS_PINGPONG 1
#endif

namespace cuflash {

// Q, kStages K tiles and kStages V tiles in the 128-byte swizzled layout; the mbarriers (one
// for Q, full and empty per K slot and per V slot); 1024 bytes to align the swizzle atoms.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned fwd_wgmma_ws_smem_bytes() {
    return 1024 + 2 * kHeadDim * (kBlockM + 2 * kStages * kBlockN) + 8 * (1 + 4 * kStages);
}

// Registers per thread after the reallocation: the producer keeps kProducerRegisters, the
// consumers share the rest of the SM's 64K (one block per SM; multiples of 8).
constexpr int kProducerRegisters = 24;
template <int kConsumers>
constexpr int ws_consumer_registers() {
    return (65536 / 128 - kProducerRegisters) / kConsumers / 8 * 8 > 240 ? 240
                                                                          : (65536 / 128 - kProducerRegisters) / kConsumers / 8 * 8;
}

// The shared-memory mbarriers of one block, by role.
template <int kStages>
struct WsBarriers {
    unsigned base;  // q_full, then k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages]
    __device__ __forceinline__ unsigned q_full() const { return base; }
    __device__ __forceinline__ unsigned k_full(int slot) const { return base + 8 * (1 + slot); }
    __device__ __forceinline__ unsigned k_empty(int slot) const { return base + 8 * (1 + kStages + slot); }
    __device__ __forceinline__ unsigned v_full(int slot) const { return base + 8 * (1 + 2 * kStages + slot); }
    __device__ __forceinline__ unsigned v_empty(int slot) const { return base + 8 * (1 + 3 * kStages + slot); }
};

// Tile i of the key range (i = t - first) lives in slot i % kStages; its full barrier completes
// phase i / kStages there (parity below), and the producer refills the slot for tile i once
// the consumers have released tile i - kStages (phase i / kStages - 1 of the empty barrier).
template <int kStages>
__device__ __forceinline__ unsigned ring_parity(int i) { return static_cast<unsigned>(i / kStages) & 1u; }

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false>
__global__ void __launch_bounds__(kWarps * 32, 1) fwd_wgmma_ws(const __grid_constant__ FwdTmaParams tp) {
    const FwdParams& p = tp.fwd;
    constexpr int kConsumers = kBlockM / 64;
    constexpr int kKStepsQK = kHeadDim / 16;
    constexpr int kKStepsPV = kBlockN / 16;
    constexpr int kPanels = kHeadDim / 64;
    static_assert(kWarps == 4 * (kConsumers + 1) && kBlockM % 64 == 0 && kConsumers <= 3,
                  "one producer warpgroup and one consumer warpgroup per 64 query rows");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256 && (kBlockN == 64 || kBlockN == 128),
                  "whole 64-column panels; wgmma N of 64 or 128 (P V: one per 128 columns of O)");
    static_assert(kStages >= 2, "K_{t+1} (S) and V_t (P V) are read while K_{t+2}, V_{t+1} land");

    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;
    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;
    constexpr unsigned kSmemBytes = fwd_wgmma_ws_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + QTile::kBytes + 2 * kStages * KVTile::kBytes + 8 * (1 + 4 * kStages),
                  "1024: alignment");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned k_ring = q_smem + QTile::kBytes;
    const unsigned v_ring = k_ring + kStages * KVTile::kBytes;
    const WsBarriers<kStages> bars{v_ring + kStages * KVTile::kBytes};

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const auto [bh, m_block] = scheduled_block<kHasWindow>(p);  // schedule.cuh
    const int m0 = m_block * kBlockM;
    BatchIndex at;
    if (!starts_block<unsigned short, float>(p, bh, m_block, m0, kBlockM, at)) return;  // params.cuh
    const Mask<kHasWindow> mask(p, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    if (tid == 0) {
        ptx::mbarrier_init(bars.q_full(), 1);
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            ptx::mbarrier_init(bars.k_full(s), 1);
            ptx::mbarrier_init(bars.v_full(s), 1);
            ptx::mbarrier_init(bars.k_empty(s), 4 * kConsumers);  // one arrival per consumer warp
            ptx::mbarrier_init(bars.v_empty(s), 4 * kConsumers);
        }
    }
    __syncthreads();  // the barriers exist before anyone waits on them

    if (warp < 4) {
        // ---- Producer warpgroup: one elected thread issues every copy.
        ptx::setmaxnreg_dec<kProducerRegisters>();
        if (warp == 0 && ptx::elect_one()) {
            const BatchCoords coords(p, bh);
            const int head = coords.head, kv_head = head / p.kv_group;
            // A packed batch's maps span all its tokens: sequence b starts at row q0 (k0) of them.
            int batch = coords.batch[CUFLASH_MAX_BATCH_DIMS - 1], q0 = 0, k0 = 0;
            if (p.cu_seqlens_q != nullptr) {
                const PackedSequence seq(p, coords);
                q0 = seq.q0;
                k0 = seq.k0;
                batch = 0;
            }
            ptx::tma_prefetch_map(tp.q_map);
            ptx::tma_prefetch_map(tp.k_map);
            ptx::tma_prefetch_map(tp.v_map);
            ptx::mbarrier_arrive_expect_tx(bars.q_full(), QTile::kBytes);
#pragma unroll
            for (int c = 0; c < kPanels; ++c)
                ptx::tma_load_4d(q_smem + c * QTile::kPanelBytes, tp.q_map, bars.q_full(), 64 * c, q0 + m0, head, batch);
            // Tile t into its slot of one ring, once the slot's previous tile has been released.
            auto load_tile = [&](int t, int i, int slot, unsigned ring, unsigned full, unsigned empty,
                                 const ptx::TensorMap& map) {
                if (i >= kStages) ptx::mbarrier_wait(empty, ring_parity<kStages>(i) ^ 1u);
                ptx::mbarrier_arrive_expect_tx(full, KVTile::kBytes);
#pragma unroll
                for (int c = 0; c < kPanels; ++c)
                    ptx::tma_load_4d(ring + slot * KVTile::kBytes + c * KVTile::kPanelBytes, map, full, 64 * c,
                                     k0 + t * kBlockN, kv_head, batch);
            };
            // K_t and V_t in turn: the consumers need K_{t+1} before V_t.
            for (int t = range.first; t < range.last; ++t) {
                const int i = t - range.first, slot = i % kStages;
                load_tile(t, i, slot, k_ring, bars.k_full(slot), bars.k_empty(slot), tp.k_map);
                load_tile(t, i, slot, v_ring, bars.v_full(slot), bars.v_empty(slot), tp.v_map);
            }
        }
        return;
    }

    // ---- Consumer warpgroups.
    ptx::setmaxnreg_inc<ws_consumer_registers<kConsumers>()>();
    const int group = warp / 4 - 1;                       // consumer warpgroup
    const int group_tid = tid - 128 * (group + 1);        // thread within it
    const int warp_row0 = group * 64 + (warp % 4) * 16;   // this warp's 16 query rows of the block
    const unsigned q_group = q_smem + group * 64 * 128;  // its warpgroup's 64 rows of Q (every panel)
    // Named barriers: 1 + g, warpgroup g alone; 4 + g, g's turn to issue MMAs (ping-pong).
    const int own_barrier = 1 + group;

    ptx::mbarrier_wait(bars.q_full(), 0);
    // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q's sign bits are flipped
    // in shared memory (exact in f16/bf16), each warpgroup its own rows, order irrelevant.
    const float scale_log2 = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
    if (p.scale_log2 < 0.f) {
        constexpr unsigned kSign = tc::Arith<Element>::kSignBits;
#pragma unroll
        for (int c = 0; c < kPanels; ++c)
            for (int chunk = group_tid; chunk < 64 * 8; chunk += 128) {
                const unsigned addr = q_group + c * QTile::kPanelBytes + chunk * 16;
                const uint4 x = ptx::ld_shared_v4(addr);
                ptx::st_shared_v4(addr, x.x ^ kSign, x.y ^ kSign, x.z ^ kSign, x.w ^ kSign);
            }
        ptx::fence_proxy_async_shared();
        ptx::named_barrier_sync(own_barrier, 128);
    }

    auto issue_scores = [&](int slot, float (&s)[kBlockN / 8][4]) {
        tc::wgmma_a_bt<Element, kKStepsQK, QTile, KVTile>(s, q_group, k_ring + slot * KVTile::kBytes);
    };
    // Score modifiers (score_mod.cuh), as fwd_wgmma applies them; Q was negated for a negative
    // scale: |scale| here.
    constexpr float kLog2e = 1.4426950408889634f;
    const ScoreMod<float, true> mod(p, bh, fabsf(static_cast<float>(p.scale)), kLog2e, mask.diag);
    auto modify = [&](int t, float (&s)[1][kBlockN / 8][4]) {
        if constexpr (kScoreMods) return tc::modify_scores(mod, s, m0 + warp_row0, t * kBlockN, lane, scale_log2);
        return scale_log2;
    };
    auto mask_scores = [&](int t, float (&s)[1][kBlockN / 8][4]) {
        if (t < range.full_first || t >= range.full_last)
            tc::apply_mask(mask, s, m0 + warp_row0, t * kBlockN, lane, tc::neg_inf());
    };
    // A warp is done with a slot (its MMAs waited for): one arrival per warp.
    auto release = [&](unsigned empty_bar) { ptx::mbarrier_arrive_warp(empty_bar); };
    // Ping-pong: wait for this warpgroup's turn before issuing MMAs; pass the turn to the next
    // warpgroup (cyclically) after. Each turn barrier completes with the 128 threads of its
    // warpgroup waiting and the 128 of the one before arriving.
    constexpr bool kPingPong = CUFLASH_WS_PINGPONG && kConsumers > 1;
    auto my_turn = [&] {
        if (kPingPong) ptx::named_barrier_sync(4 + group, 256);
    };
    auto pass_turn = [&] {
        if (kPingPong) ptx::named_barrier_arrive(4 + (group + 1) % kConsumers, 256);
    };

    float acc[1][kHeadDim / 8][4];
    tc::zero(acc);
    tc::OnlineSoftmax<1> softmax;
    if (p.sinks != nullptr) softmax.start_from(mod.sink(p, bh, kLog2e));
    float s[1][kBlockN / 8][4];
    unsigned p_frag[kKStepsPV][4];
    auto pack_p = [&] {
#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk) tc::pack_a<Element>(s[0][2 * kk], s[0][2 * kk + 1], p_frag[kk]);
    };
    // O's columns [0, 128) and, past d128, [128, kHeadDim) (panels 2 on): one wgmma each, N <= 128.
    constexpr int kFirstCols = kHeadDim < 128 ? kHeadDim : 128;
    auto issue_pv = [&](int slot) {
        const unsigned v_tile = v_ring + slot * KVTile::kBytes;
#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk) {
            ptx::Wgmma<kFirstCols>::template rs<Element, 1>(tc::n_tiles<0, kFirstCols / 8>(acc[0]), p_frag[kk],
                                                             KVTile::mn_major(v_tile + kk * 2048));
            if constexpr (kHeadDim > 128)
                ptx::Wgmma<kHeadDim - 128>::template rs<Element, 1>(tc::n_tiles<16, (kHeadDim - 128) / 8>(acc[0]), p_frag[kk],
                                                                     KVTile::mn_major(v_tile + 2 * KVTile::kPanelBytes + kk * 2048));
        }
    };

    // The loop of fwd_wgmma.cu (its comment): S_{t+1} and P_t V_t issued together, the softmax
    // of S_{t+1} while P_t V_t runs. The last warpgroup hands warpgroup 0 the first turn.
    const int tiles = range.last - range.first;
    if (tiles > 0 && group == kConsumers - 1) pass_turn();
    if (tiles > 0) {
        ptx::mbarrier_wait(bars.k_full(0), 0);
        my_turn();
        ptx::wgmma_fence();
        issue_scores(0, s[0]);
        ptx::wgmma_commit();
        pass_turn();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(s[0]);
        release(bars.k_empty(0));
        const float c = modify(range.first, s);
        mask_scores(range.first, s);
        float alpha[1][2];
        softmax.update_stats(s, c, alpha);
        pack_p();
    }
    for (int i = 0; i + 1 < tiles; ++i) {
        const int next = (i + 1) % kStages, slot = i % kStages;
        ptx::mbarrier_wait(bars.k_full(next), ring_parity<kStages>(i + 1));
        ptx::mbarrier_wait(bars.v_full(slot), ring_parity<kStages>(i));
        my_turn();
        ptx::wgmma_fence();
        issue_scores(next, s[0]);
        ptx::wgmma_commit();
        issue_pv(slot);
        ptx::wgmma_commit();
        pass_turn();

        ptx::wgmma_wait<1>();  // S_{t+1}
        ptx::wgmma_pin(s[0]);
        release(bars.k_empty(next));
        const float c = modify(range.first + i + 1, s);
        mask_scores(range.first + i + 1, s);
        float alpha[1][2];
        const bool moved = softmax.update_stats(s, c, alpha);
        ptx::wgmma_wait<0>();  // P_t V_t
        ptx::wgmma_pin(acc[0]);
        release(bars.v_empty(slot));
        if (moved) softmax.rescale(acc, alpha);
        pack_p();
    }
    if (tiles > 0) {
        const int slot = (tiles - 1) % kStages;
        ptx::mbarrier_wait(bars.v_full(slot), ring_parity<kStages>(tiles - 1));
        // Keys past the sequence's end: a map reads whatever the tensor holds there (the keys
        // past a key-padding cut or seqused_k, the next sequence of a packed batch). Their P is
        // 0, but 0 x NaN is NaN in the MMA, so each warpgroup zeroes those rows of the last V
        // tile before its P V (both write the same zeros; only this tile can cross the end).
        const int valid_keys = mask.seqlen_k - (range.last - 1) * kBlockN;
        if (valid_keys < kBlockN) {
            const unsigned v_tile = v_ring + slot * KVTile::kBytes;
#pragma unroll
            for (int c = 0; c < kPanels; ++c)
                for (int chunk = 8 * valid_keys + group_tid; chunk < 8 * kBlockN; chunk += 128)
                    ptx::st_shared_v4(v_tile + c * KVTile::kPanelBytes + 16 * chunk, 0u, 0u, 0u, 0u);
            ptx::fence_proxy_async_shared();
            ptx::named_barrier_sync(own_barrier, 128);
        }
        my_turn();
        ptx::wgmma_fence();
        issue_pv(slot);
        ptx::wgmma_commit();
        if (group != kConsumers - 1) pass_turn();  // the last passes none: warpgroup 0 has no turn left
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(acc[0]);
    }

    // ---- Epilogue: O = acc / l_i, staged in this warpgroup's own rows of Q (its last S MMA has
    // completed; the other warpgroup reads only its own rows), then stored by the warpgroup.
    float inv_l[1][2], lse[1][2];
    softmax.finish(inv_l, lse);
    const BatchIndex out_at(p, scheduled_block<kHasWindow>(p).bh);  // recomputed: not held through the loop
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = warp_row0 + lane / 4 + 8 * h;
#pragma unroll
        for (int nt = 0; nt < kHeadDim / 8; ++nt)
            tc::store_pair<Element, QTile>(q_smem, row, nt, lane, acc[0][nt][2 * h] * inv_l[0][h], acc[0][nt][2 * h + 1] * inv_l[0][h]);
        if (lane % 4 == 0 && m0 + row < out_at.seqlen_q) static_cast<float*>(p.lse)[out_at.lse + m0 + row] = lse[0][h];
    }
    ptx::named_barrier_sync(own_barrier, 128);
    const int row0 = m0 + group * 64;
    tc::store_tile_rows<64, kHeadDim, 128, 4, QTile>(q_group, static_cast<unsigned short*>(p.o) + out_at.o + row0 * p.o_row_stride,
                                                     p.o_row_stride, out_at.seqlen_q - row0, p.head_dim_v, group_tid);
}

}  // namespace cuflash
