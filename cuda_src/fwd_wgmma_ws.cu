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
// - Persistent blocks (up to d192: fwd_ws_persistent): the host launches at most one block per SM
//   and each walks several (row, query tile) tiles (schedule.cuh's TileWalk). The producer runs
//   ahead into the next tile, its Q into the other of two Q buffers and its first K/V tiles
//   into the rings, whose rounds count on across tiles, while the consumers finish the previous
//   tile's epilogue; a Q buffer is refilled once the consumers have stored the O they staged in
//   it. One block per tile is the same code walking one tile (d256, whose walk state spills).
// Score modifiers, bias and mask (kScoreMods), sinks and dropout (kDropout) are fwd_wgmma's
// (score_mod.cuh, dropout.cuh), except that a bias without softcap goes into S's accumulator
// before its MMA (tc::bias_into_scores).
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

// Q tiles: two where they fit beside the K/V rings (the next tile's Q lands while this tile's
// epilogue stages O in its own), else one. 227 KB: the most a block may have.
template <int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr int fwd_ws_q_buffers() {
    return 1024 + 2 * kHeadDim * (2 * kBlockM + 2 * kStages * kBlockN) + 8 * (4 + 4 * kStages) <= 227 * 1024 ? 2 : 1;
}

// Whether a block walks several tiles (the host then launches fewer blocks than tiles:
// tiles.persistent, plan._launch_of). Not at d256: its consumers' 240 registers hold O (128) and the step's
// S and P already, and the walk's state spills there.
template <int kHeadDim>
constexpr bool fwd_ws_persistent() { return kHeadDim <= 192; }

// The Q tiles, kStages K tiles and kStages V tiles in the 128-byte swizzled layout; the
// mbarriers (full and empty per Q tile, per K slot and per V slot); 1024 bytes to align the
// swizzle atoms.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned fwd_wgmma_ws_smem_bytes() {
    constexpr int kQBuffers = fwd_ws_q_buffers<kHeadDim, kBlockM, kBlockN, kStages>();
    return 1024 + 2 * kHeadDim * (kQBuffers * kBlockM + 2 * kStages * kBlockN) + 8 * (2 * kQBuffers + 4 * kStages);
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
template <int kQBuffers, int kStages>
struct WsBarriers {
    unsigned base;  // q_full[kQBuffers], q_empty[kQBuffers], k_full[kStages], k_empty, v_full, v_empty
    __device__ __forceinline__ unsigned q_full(int b) const { return base + 8 * b; }
    __device__ __forceinline__ unsigned q_empty(int b) const { return base + 8 * (kQBuffers + b); }
    __device__ __forceinline__ unsigned k_full(int slot) const { return base + 8 * (2 * kQBuffers + slot); }
    __device__ __forceinline__ unsigned k_empty(int slot) const { return base + 8 * (2 * kQBuffers + kStages + slot); }
    __device__ __forceinline__ unsigned v_full(int slot) const { return base + 8 * (2 * kQBuffers + 2 * kStages + slot); }
    __device__ __forceinline__ unsigned v_empty(int slot) const { return base + 8 * (2 * kQBuffers + 3 * kStages + slot); }
};

// Round n of a ring of `slots` (n = 0, 1, ... over the block's whole life): its full barrier
// completes phase n / slots in slot n % slots (parity below), and the slot is refilled for
// round n once the consumers have released round n - slots (phase n / slots - 1 of the empty
// barrier).
template <int kSlots>
__device__ __forceinline__ unsigned ring_parity(int n) { return static_cast<unsigned>(n / kSlots) & 1u; }

// One tile of the persistent walk (schedule.cuh's TileWalk): its row, first query row, the row's
// BatchIndex, and whether the launch has work for it (takes_row; a packed sequence's rows).
struct WsTile {
    int bh, m0;
    BatchIndex at;
    bool has_work;
};

template <bool kHasWindow, int kBlockM>
__device__ __forceinline__ WsTile ws_tile(const FwdParams& p, const TileWalk& walk, unsigned linear) {
    WsTile tile;
    const BlockCoord coord = walk.coord<kHasWindow>(p, linear);
    tile.bh = coord.bh;
    tile.m0 = coord.block * kBlockM;
    tile.has_work = takes_row(p, coord.bh);
    if (tile.has_work) {
        tile.at = BatchIndex(p, coord.bh);
        tile.has_work = tile.at.has_query_row(tile.m0);
    }
    return tile;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) fwd_wgmma_ws(const __grid_constant__ FwdTmaParams tp) {
    const FwdParams& p = tp.fwd;
    constexpr int kConsumers = kBlockM / 64;
    constexpr int kKStepsQK = kHeadDim / 16;
    constexpr int kKStepsPV = kBlockN / 16;
    constexpr int kPanels = kHeadDim / 64;
    constexpr int kQBuffers = fwd_ws_q_buffers<kHeadDim, kBlockM, kBlockN, kStages>();
    constexpr bool kPersistent = fwd_ws_persistent<kHeadDim>();
    static_assert(kWarps == 4 * (kConsumers + 1) && kBlockM % 64 == 0 && kConsumers <= 3,
                  "one producer warpgroup and one consumer warpgroup per 64 query rows");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256 && (kBlockN == 64 || kBlockN == 128),
                  "whole 64-column panels; wgmma N of 64 or 128 (P V: one per 128 columns of O)");
    static_assert(kStages >= 2, "K_{t+1} (S) and V_t (P V) are read while K_{t+2}, V_{t+1} land");

    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;
    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;
    constexpr unsigned kSmemBytes = fwd_wgmma_ws_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + kQBuffers * QTile::kBytes + 2 * kStages * KVTile::kBytes +
                                    8 * (2 * kQBuffers + 4 * kStages),
                  "1024: alignment");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned k_ring = q_smem + kQBuffers * QTile::kBytes;
    const unsigned v_ring = k_ring + kStages * KVTile::kBytes;
    const WsBarriers<kQBuffers, kStages> bars{v_ring + kStages * KVTile::kBytes};

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // The block's tiles (schedule.cuh's TileWalk: one per block when the grid is the tiles' grid;
    // fewer blocks walk several). The host takes this kernel for fewer than 2^31 tiles.
    const TileWalk walk(p);
    auto past_end = [&](unsigned wave, unsigned linear) { return linear >= walk.total || (!kPersistent && wave > 0); };

    // A packed sequence longer than the grid's hint: the rows no tile covers are poisoned by the
    // block of the row's last tile (params.cuh), before anything else.
    if (p.cu_seqlens_q != nullptr) {
        for (unsigned wave = 0;; ++wave) {
            const unsigned linear = walk.tile(wave);
            if (past_end(wave, linear)) break;
            const WsTile tile = ws_tile<kHasWindow, kBlockM>(p, walk, linear);
            if (tile.has_work)
                poison_uncovered_output<unsigned short, float>(p, tile.at, tile.m0 / kBlockM, p.query_tiles, kBlockM);
        }
    }

    if (tid == 0) {
#pragma unroll
        for (int b = 0; b < kQBuffers; ++b) {
            ptx::mbarrier_init(bars.q_full(b), 1);
            ptx::mbarrier_init(bars.q_empty(b), 4 * kConsumers);  // one arrival per consumer warp
        }
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            ptx::mbarrier_init(bars.k_full(s), 1);
            ptx::mbarrier_init(bars.v_full(s), 1);
            ptx::mbarrier_init(bars.k_empty(s), 4 * kConsumers);
            ptx::mbarrier_init(bars.v_empty(s), 4 * kConsumers);
        }
    }
    __syncthreads();  // the barriers exist before anyone waits on them

    if (warp < 4) {
        // ---- Producer warpgroup: one elected thread issues every copy, tile after tile: Q into
        // tile n's Q buffer (n % kQBuffers) once the consumers have released that buffer's last
        // tile, then K_t and V_t into the rings, their rounds counted over the block's tiles.
        ptx::setmaxnreg_dec<kProducerRegisters>();
        if (warp == 0 && ptx::elect_one()) {
            ptx::tma_prefetch_map(tp.q_map);
            ptx::tma_prefetch_map(tp.k_map);
            ptx::tma_prefetch_map(tp.v_map);
            int n = 0, round = 0;  // tiles with work so far; K/V tiles loaded so far
            for (unsigned wave = 0;; ++wave) {
                const unsigned linear = walk.tile(wave);
                if (past_end(wave, linear)) break;
                const WsTile tile = ws_tile<kHasWindow, kBlockM>(p, walk, linear);
                if (!tile.has_work) continue;
                const MapOrigin origin(p, tile.bh);  // params.cuh
                const int kv_head = p.kv_group_div.div(origin.head);
                const int qb = n % kQBuffers;
                if (n >= kQBuffers) ptx::mbarrier_wait(bars.q_empty(qb), ring_parity<kQBuffers>(n) ^ 1u);
                ptx::mbarrier_arrive_expect_tx(bars.q_full(qb), QTile::kBytes);
#pragma unroll
                for (int c = 0; c < kPanels; ++c)
                    ptx::tma_load_4d(q_smem + qb * QTile::kBytes + c * QTile::kPanelBytes, tp.q_map, bars.q_full(qb),
                                     64 * c, origin.q0 + tile.m0, origin.head, origin.batch);
                // Round r into its slot of one ring, once the slot's previous round has been released.
                auto load_tile = [&](int t, int r, unsigned ring, unsigned full, unsigned empty, const ptx::TensorMap& map) {
                    if (r >= kStages) ptx::mbarrier_wait(empty, ring_parity<kStages>(r) ^ 1u);
                    ptx::mbarrier_arrive_expect_tx(full, KVTile::kBytes);
#pragma unroll
                    for (int c = 0; c < kPanels; ++c)
                        ptx::tma_load_4d(ring + (r % kStages) * KVTile::kBytes + c * KVTile::kPanelBytes, map, full,
                                         64 * c, origin.k0 + t * kBlockN, kv_head, origin.batch);
                };
                // K_t and V_t in turn: the consumers need K_{t+1} before V_t.
                const TileRange range = Mask<kHasWindow, kScoreMods>(p, tile.at).tiles(tile.m0, kBlockM, kBlockN);
                for (int t = range.first; t < range.last; ++t, ++round) {
                    const int slot = round % kStages;
                    load_tile(t, round, k_ring, bars.k_full(slot), bars.k_empty(slot), tp.k_map);
                    load_tile(t, round, v_ring, bars.v_full(slot), bars.v_empty(slot), tp.v_map);
                }
                ++n;
            }
        }
        return;
    }

    // ---- Consumer warpgroups.
    ptx::setmaxnreg_inc<ws_consumer_registers<kConsumers>()>();
    // The consumer warpgroup, broadcast from lane 0: the compiler then knows it is the same in
    // every lane and keeps what derives from it (shared addresses, wgmma descriptors) in uniform
    // registers instead of rebuilding each descriptor per lane and moving it over per wgmma.
    const int group = __shfl_sync(0xffffffffu, warp / 4 - 1, 0);
    const int group_tid = tid - 128 * (group + 1);        // thread within it
    const int warp_row0 = group * 64 + (warp % 4) * 16;   // this warp's 16 query rows of the block
    // Named barriers: 1 + g, warpgroup g alone; 4 + g, g's turn to issue MMAs (ping-pong).
    const int own_barrier = 1 + group;
    // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q's sign bits are flipped
    // in shared memory (exact in f16/bf16), each warpgroup its own rows, order irrelevant.
    const float scale_log2 = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
    // Ping-pong: wait for this warpgroup's turn before issuing MMAs; pass the turn to the next
    // warpgroup (cyclically) after. Each turn barrier completes with the 128 threads of its
    // warpgroup waiting and the 128 of the one before arriving. The cycle runs on across a
    // block's tiles: the last warpgroup passes the turn as soon as it has issued a tile's last
    // P V, so warpgroup 0 issues the next tile's first S while the others finish the tile
    // (their last P V, the epilogue) instead of waiting for them. The last warpgroup seeds the
    // cycle once, and warpgroup 0 takes the turn left over at the end, so the barriers balance.
    constexpr bool kPingPong = CUFLASH_WS_PINGPONG && kConsumers > 1;
    auto my_turn = [&] {
        if (kPingPong) ptx::named_barrier_sync(4 + group, 256);
    };
    auto pass_turn = [&] {
        if (kPingPong) ptx::named_barrier_arrive(4 + (group + 1) % kConsumers, 256);
    };
    // A warp is done with a slot (its MMAs waited for): one arrival per warp.
    auto release = [&](unsigned empty_bar) { ptx::mbarrier_arrive_warp(empty_bar); };
    constexpr float kLog2e = 1.4426950408889634f;

    if (group == kConsumers - 1) pass_turn();  // the cycle's seed: warpgroup 0 goes first
    int n = 0, round = 0;  // as the producer's
    for (unsigned wave = 0;; ++wave) {
        const unsigned linear = walk.tile(wave);
        if (past_end(wave, linear)) break;
        const WsTile tile = ws_tile<kHasWindow, kBlockM>(p, walk, linear);
        if (!tile.has_work) continue;
        const int bh = tile.bh, m0 = tile.m0;
        const Mask<kHasWindow, kScoreMods> mask(p, tile.at);
        const TileRange range = mask.tiles(m0, kBlockM, kBlockN);
        const int qb = n % kQBuffers;
        const unsigned q_tile = q_smem + qb * QTile::kBytes;
        const unsigned q_group = q_tile + group * 64 * 128;  // its warpgroup's 64 rows of Q (every panel)

        ptx::mbarrier_wait(bars.q_full(qb), ring_parity<kQBuffers>(n));
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

        // Score modifiers (score_mod.cuh), as fwd_wgmma applies them; Q was negated for a negative
        // scale: |scale| here. A bias without softcap goes into S itself: each tile's S starts as
        // bias / |scale| (loaded a tile ahead, tc::bias_into_scores) and its MMA adds Q K^T.
        ScoreMod<float, kFastTanh<Element>> mod(p, bh, fabsf(static_cast<float>(p.scale)), kLog2e, mask.diag);
        mod.bias_in_scores = kScoreMods && tc::bias_goes_into_scores(p);
        auto issue_scores = [&](int slot, float (&s)[kBlockN / 8][4]) {
            if (kScoreMods && mod.bias_in_scores)
                tc::wgmma_a_bt<Element, kKStepsQK, QTile, KVTile, true>(s, q_group, k_ring + slot * KVTile::kBytes);
            else
                tc::wgmma_a_bt<Element, kKStepsQK, QTile, KVTile>(s, q_group, k_ring + slot * KVTile::kBytes);
        };
        auto load_bias = [&](int t, float (&s)[kBlockN / 8][4]) {  // (t: a key tile of this row block)
            if (kScoreMods && mod.bias_in_scores && t < range.last) tc::bias_into_scores(mod, s, m0 + warp_row0, t * kBlockN, lane);
        };
        auto modify = [&](auto peeled, int t, float (&s)[1][kBlockN / 8][4]) {  // (peeled: the first tile's)
            return tc::modify_forward_tile<kScoreMods, decltype(peeled)::value>(mod, s, m0 + warp_row0, t * kBlockN, lane,
                                                                                scale_log2);
        };
        auto mask_scores = [&](int t, float (&s)[1][kBlockN / 8][4]) {
            if (t < range.full_first || t >= range.full_last)
                tc::apply_mask(mask, s, m0 + warp_row0, t * kBlockN, lane, tc::neg_inf());
        };
        // Dropout on P_t (after update_stats: l_i sums the undropped P), while P_{t-1} V_{t-1} runs.
        auto drop = [&](int t, float (&s)[1][kBlockN / 8][4]) {
            if constexpr (kDropout) tc::drop_forward(p, bh, s, m0 + warp_row0, t * kBlockN, lane);
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
            const unsigned long long v_desc = KVTile::mn_major(v_ring + slot * KVTile::kBytes);
#pragma unroll
            for (int kk = 0; kk < kKStepsPV; ++kk) {
                ptx::Wgmma<kFirstCols>::template rs<Element, 1>(tc::n_tiles<0, kFirstCols / 8>(acc[0]), p_frag[kk],
                                                                 ptx::desc_advance(v_desc, kk * 2048));
                if constexpr (kHeadDim > 128)
                    ptx::Wgmma<kHeadDim - 128>::template rs<Element, 1>(
                        tc::n_tiles<16, (kHeadDim - 128) / 8>(acc[0]), p_frag[kk],
                        ptx::desc_advance(v_desc, 2 * KVTile::kPanelBytes + kk * 2048));
            }
        };

        // The loop of fwd_wgmma.cu (its comment): S_{t+1} and P_t V_t issued together, the softmax
        // of S_{t+1} while P_t V_t runs. Round r of the rings is this tile's key tile r - round.
        const int tiles = range.last - range.first;
        if (tiles > 0) {
            const int slot = round % kStages;
            load_bias(range.first, s[0]);
            ptx::mbarrier_wait(bars.k_full(slot), ring_parity<kStages>(round));
            my_turn();
            ptx::wgmma_fence();
            issue_scores(slot, s[0]);
            ptx::wgmma_commit();
            pass_turn();
            ptx::wgmma_wait<0>();
            ptx::wgmma_pin(s[0]);
            release(bars.k_empty(slot));
            const float c = modify(Flag<true>(), range.first, s);
            mask_scores(range.first, s);
            float alpha[1][2];
            softmax.update_stats(s, c, alpha);
            drop(range.first, s);
            pack_p();
            load_bias(range.first + 1, s[0]);
        }
        for (int i = 0; i + 1 < tiles; ++i) {
            const int r = round + i, next = (r + 1) % kStages, slot = r % kStages;
            ptx::mbarrier_wait(bars.k_full(next), ring_parity<kStages>(r + 1));
            ptx::mbarrier_wait(bars.v_full(slot), ring_parity<kStages>(r));
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
            const float c = modify(Flag<false>(), range.first + i + 1, s);
            mask_scores(range.first + i + 1, s);
            float alpha[1][2];
            const bool moved = softmax.update_stats(s, c, alpha);
            drop(range.first + i + 1, s);
            ptx::wgmma_wait<0>();  // P_t V_t
            ptx::wgmma_pin(acc[0]);
            release(bars.v_empty(slot));
            if (moved) softmax.rescale(acc, alpha);
            pack_p();
            load_bias(range.first + i + 2, s[0]);
        }
        if (tiles > 0) {
            const int r = round + tiles - 1, slot = r % kStages;
            ptx::mbarrier_wait(bars.v_full(slot), ring_parity<kStages>(r));
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
            pass_turn();
            ptx::wgmma_wait<0>();
            ptx::wgmma_pin(acc[0]);
            release(bars.v_empty(slot));
        }
        round += tiles;

        // ---- Epilogue: O = acc / l_i, staged in this warpgroup's own rows of its Q tile (its last
        // S MMA has completed; the other warpgroup reads only its own rows), then stored by the
        // warpgroup; the Q tile is released once read (fenced: the copy engine writes the next).
        float inv_l[1][2], lse[1][2];
        softmax.finish(inv_l, lse);
        const BatchIndex out_at(p, bh);  // recomputed: not held through the loop
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + lane / 4 + 8 * h;
#pragma unroll
            for (int nt = 0; nt < kHeadDim / 8; ++nt)
                tc::store_pair<Element, QTile>(q_tile, row, nt, lane, acc[0][nt][2 * h] * inv_l[0][h],
                                               acc[0][nt][2 * h + 1] * inv_l[0][h]);
            if (lane % 4 == 0 && m0 + row < out_at.seqlen_q) static_cast<float*>(p.lse)[out_at.lse + m0 + row] = lse[0][h];
        }
        ptx::named_barrier_sync(own_barrier, 128);
        const int row0 = m0 + group * 64;
        tc::store_tile_rows<64, kHeadDim, 128, 4, QTile>(q_group, static_cast<unsigned short*>(p.o) + out_at.o + row0 * p.o_row_stride,
                                                         p.o_row_stride, out_at.seqlen_q - row0, p.head_dim_v, group_tid);
        ptx::fence_proxy_async_shared();
        release(bars.q_empty(qb));
        ++n;
    }
    if (group == 0) my_turn();  // the last warpgroup's final pass (or the seed, without a tile)
}

}  // namespace cuflash
