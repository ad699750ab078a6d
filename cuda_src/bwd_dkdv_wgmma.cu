// Backward attention for float16 / bfloat16 on Hopper (sm_90a), over key tiles: dK, dV (and dQ
// by fp32 atomics) with warpgroup MMAs. The algorithm and the contract are bwd_dkdv_tc.cu's
// (FlashAttention-2's backward with recomputation); what changes is who multiplies: wgmma reads
// its shared-memory operands itself (no ldmatrix), runs asynchronously beside the elementwise
// work, and a 64-row product is one instruction per k16 step for four warps.
//
// A block owns kBlockN = 128 keys of one key/value head and a group of heads_per_block query
// heads that read it (attention rows bh0 + h, h < heads_per_block; GQA); warpgroup g (warps
// 4g..4g+3) owns keys [64g, 64g + 64): K_g, V_g stay in shared memory, dK_g, dV_g in fp32
// registers, accumulated over every head of the group and written once, as the group's
// (params.cuh). The steps (h, i) -- head h (HeadTileStep::g; g names the warpgroup here),
// query tile i that sees a key of the block; heads outer -- stream Q_i, dO_i, lse_i, delta_i
// of head h through shared memory (kStages deep, cp.async, straight across head boundaries).
// Per step and warpgroup, with the scores transposed (keys are the M index of every product
// that keeps keys, so P^T and dS^T are accumulators laid out exactly as the next product's A
// operand):
//
//   S^T   = K_g Q_i^T                    wgmma, A = K_g, B = Q_i (shared, K-major)    64 x kBlockM
//   dP^T  = V_g dO_i^T                   wgmma, A = V_g, B = dO_i
//   P^T   = exp2(S^T * scale_log2 - lse_i log2 e)   per column (query); 0 where masked
//   dS^T  = P^T o (dP^T - delta_i)
//   dV_g += P^T dO_i                     wgmma, A = P^T (registers), B = dO_i (shared, MN-major)
//   dK_g += dS^T Q_i                     wgmma, A = dS^T (registers), B = Q_i (shared, MN-major)
//   dQ_i += dS K                         dS^T to shared memory, then the kBlockM x D tile of dQ
//                                        split over the two warpgroups (by columns for kBlockM =
//                                        64, by rows for 128): A = dS, B = K (shared, MN-major);
//                                        vector fp32 REDs into dq_accum (when non-null)
//   dK_g *= scale                        (once, at the end; dQ's scale is bwd_dq_convert's)
//
// Shared tiles use the 128-byte swizzled layout (tc::Sw128Tile) that wgmma reads conflict-free;
// one tile serves as K-major operand in one product and MN-major in another (Q_i, dO_i, K).
// Two barriers per step: one before the tile is read (it landed; every warpgroup is done
// with the previous dS^T), one between writing dS^T and the dQ product.
// The dropout form (kDropout: the kScoreMods form with dropout.cuh's keep mask) drops dP^T
// before dS^T and P^T before dV (bwd_wgmma.cuh's StepDropout; its bits in S^T's layout).
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

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_wgmma_smem_bytes() {
    // 1024 bytes of alignment, K, V and dS^T, per stage Q and dO (swizzled, unpadded), then per
    // stage 2 * kBlockM floats (lse, delta).
    return 1024 + 2 * tc::Sw128Tile<kBlockN, kHeadDim>::kBytes + tc::Sw128Tile<kBlockN, kBlockM>::kBytes +
           kStages * 2 * tc::Sw128Tile<kBlockM, kHeadDim>::kBytes + kStages * 2 * kBlockM * 4;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_wgmma(const BwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroupKeys = 64;                            // keys per warpgroup: one wgmma M
    constexpr bool kDqByRows = kBlockM == 128;                // how the two warpgroups split dQ_i
    constexpr int kDqN = kDqByRows ? kHeadDim : kHeadDim / 2;  // dQ columns per warpgroup
    constexpr int kKStepsD = kHeadDim / 16;                   // k16 steps of K Q^T and V dO^T
    static_assert(kWarps == 8 && kBlockN == 2 * kGroupKeys, "two warpgroups of 64 keys");
    static_assert(kBlockM == 64 || kBlockM == 128, "a query tile is one or two 64-column wgmma tiles");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 128 && kDqN % 32 == 0,
                  "whole 64-column panels; dQ per warpgroup one wgmma of N = 32, 64 or 128");
    static_assert(kThreads >= 2 * kBlockM, "one thread per lse / delta value of a query tile");
    static_assert(kStages >= 2, "the Q/dO pipeline needs at least two stages");

    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;  // K, V
    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;   // one Q_i or dO_i
    using DsTile = tc::Sw128Tile<kBlockN, kBlockM>;   // dS^T: keys x queries
    using StageTile = tc::SmemTile<kBlockN, kHeadDim>;  // dK, dV on their way out (padded rows)
    constexpr unsigned kStageBytes = 2 * QTile::kBytes;
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse_i, then delta_i (fp32)
    constexpr unsigned kTileBytes = 2 * KVTile::kBytes + DsTile::kBytes + kStages * kStageBytes;
    constexpr unsigned kSmemBytes = bwd_dkdv_wgmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + kTileBytes + kStages * kStatBytes, "1024: alignment");
    static_assert(2 * StageTile::kBytes <= kTileBytes, "dK and dV leave through the tiles' space");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    // Swizzle atoms start on 1024-byte boundaries (the descriptors' base offset is 0).
    const unsigned align = (1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u;
    const unsigned k_smem = ptx::smem_addr(smem) + align;
    const unsigned v_smem = k_smem + KVTile::kBytes;
    const unsigned ds_smem = v_smem + KVTile::kBytes;
    const unsigned stage_smem = ds_smem + DsTile::kBytes;
    unsigned char* const stat_ptr = smem + align + kTileBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // warpgroup; uniform registers: fwd_wgmma_ws.cu says why
    // The grid is (B*H / heads_per_block, key tiles), renumbered so that the key tiles that run
    // together read the same Q, dO and add into the same rows of dq_accum, which then stay in L2
    // instead of making a round trip to memory per key tile. Dense: one group's key tiles back to
    // back. Masked (causal, windows): key tiles differ in work (the first ones see the most
    // queries under causal), and a block runs heads_per_block heads one after another, so the
    // blocks go in sections of p.fwd.heads_per_section groups (sized by the host so that their
    // Q, dO and dq_accum fit in half of L2), key tile after key tile inside a section: the
    // heaviest first, the light ones fill the tail (bf16 d128 causal GQA 16/2: 0.76x of MHA with
    // the dense order).
    const auto [group_index, n_index] = key_tile_block<kHasWindow>(p);
    const int heads = p.heads_per_block;
    const int bh = group_index * heads;  // the group's first row
    const int n0 = n_index * kBlockN;
    // This lane's keys in dK, dV, S^T: key_row and key_row + 8 of the block (n0 + those globally).
    auto lane_key_row = [&] { return group * kGroupKeys + (warp % 4) * 16 + lane / 4; };
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_key_block<unsigned short, float, kBlockN>(p, bh, n_index, n0, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, at.seqlen_q);

    const tc::TileLoader<kBlockN, kHeadDim, kThreads, KVTile> k_loader(
        static_cast<const unsigned short*>(f.k) + at.k, f.k_row_stride, f.head_dim);
    const tc::TileLoader<kBlockN, kHeadDim, kThreads, KVTile> v_loader(
        static_cast<const unsigned short*>(f.v) + at.v, f.v_row_stride, f.head_dim_v);
    const tc::QueryTileLoader<kBlockM, kHeadDim, kThreads, QTile> qdo_loader(p, at);  // head 0's
    if (!(k_loader.aligned(at.seqlen_k) && v_loader.aligned(at.seqlen_k) && qdo_loader.aligned())) __trap();
    // Step number t = (h, i) into slot t % kStages.
    auto load_qdo = [&](int t, const HeadTileStep& s) {
        const int slot_index = t % kStages;
        const unsigned slot = stage_smem + slot_index * kStageBytes;
        qdo_loader.head(p, s.g).load(slot, slot + QTile::kBytes, stat_ptr + slot_index * kStatBytes, s.i, tid);
    };

    // ---- Pipeline (tc::start_kv_pipeline): K, V, then one cp.async group per loop step.
    const HeadTileStep first_step =
        tc::start_kv_pipeline<kStages>(k_loader, v_loader, k_smem, v_smem, n0, at.seqlen_k, range, heads, tid, load_qdo);

    // Operand forms (descriptors: tc::Sw128Tile): K-major K_g, V_g as A and Q_i, dO_i as B (S^T,
    // dP^T); MN-major Q_i, dO_i, K as B and dS^T as A (dV, dK, dQ).

    float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];  // dK_g, dV_g: 64 keys x kHeadDim per warpgroup
    tc::zero(dk);
    tc::zero(dv);
    const float scale_log2 = f.scale_log2;
    const bool with_dq = p.dq_accum != nullptr;
    // dq_accum's rows of the group's first head (head h's: HeadStep), the key tile's start and
    // the query tiles that cross the mask's edges, kept in shared memory rather than registers
    // (the first barrier of the loop publishes them).
    __shared__ float* dq_head_s;
    __shared__ int n0_s, full_first_s, full_last_s;
    if (tid == 0) {
        n0_s = n0;
        full_first_s = range.full_first;
        full_last_s = range.full_last;
        if (with_dq) dq_head_s = static_cast<float*>(p.dq_accum) + at.dq_accum;
    }

    // Score modifiers (score_mod.cuh), of head 0 until the walk moves to the next head: the
    // scores are modified before P (below).
    constexpr float kLog2e = 1.4426950408889634f;
    ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), kLog2e, mask.diag);
    BiasGrad<float> dbias(p, bh);
    const bool modified = kScoreMods && mod.modifies();

    // Steps t = (h, i): every head h of the group over query tiles i in [range.first, range.last);
    // tiles outside [full_first, full_last) cross the window, the keys' end or Lq and take the
    // per-element test (one block-uniform branch).
    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last)) {
        const int i = step.i;
        const int t = step.g * (range.last - range.first) + (i - range.first);  // the step's number
        const int slot_index = t % kStages;
        ptx::cp_async_wait<kStages - 2>();
        ptx::fence_proxy_async_shared();  // this thread's copies, visible to the tensor cores
        __syncthreads();  // step t visible to all; everyone is done with the slot reloaded below and with dS^T
        const HeadTileStep ahead = step.after(kStages - 1, range.first, range.last);
        if (ahead.g < heads) load_qdo(t + kStages - 1, ahead);
        ptx::cp_async_commit();
        const bool masked = i < full_first_s || i >= full_last_s;
        const unsigned q_slot = stage_smem + slot_index * kStageBytes;
        const unsigned do_slot = q_slot + QTile::kBytes;
        const float* lse_s = reinterpret_cast<const float*>(stat_ptr + slot_index * kStatBytes);
        const float* delta_s = lse_s + kBlockM;
        const int m0 = i * kBlockM;

        const wgmma_bwd::StepDropout<kBlockM> dropout(f, kDropout, bh + step.g, n0_s + lane_key_row(), m0, lane);
        float st[kBlockM / 8][4], dpt[kBlockM / 8][4];  // S^T then P^T; dP^T then dS^T
        wgmma_bwd::transposed_scores<Element, kBlockM, kKStepsD, KVTile, QTile>(st, dpt, k_smem, v_smem, q_slot, do_slot,
                                                                              group * kGroupKeys);

        if (kScoreMods && heads > 1 && step.i == range.first) {  // head g's slope, bias, mask and dbias
            mod.head(f, bh + step.g, kLog2e);
            dbias.head(bh + step.g);
        }
        // P^T and dS^T (bwd_wgmma.cuh; dropout's on either side), then dV_g += P^T dO_i, dK_g += dS^T Q_i.
        dropout.apply(f, dpt);
        wgmma_bwd::probabilities_and_dscores<kBlockM>(
            st, dpt, mod, modified, dbias, mask, masked, m0, n0_s + lane_key_row(), at.seqlen_q, scale_log2, lane,
            [&](int col) { return tc::lse_log2(lse_s[col]); }, [&](int col) { return delta_s[col]; });
        dropout.apply(f, st);
        unsigned dsa[kBlockM / 16][4];
        wgmma_bwd::accumulate_dv_dk<Element, kBlockM, kHeadDim, QTile>(dv, dk, st, dpt, q_slot, do_slot, dsa);

        if (with_dq) {
            // dS^T to shared memory while the tensor cores work, then dQ_i += dS K: this
            // warpgroup's rows [q0, q0 + 64) x columns [c0, c0 + kDqN).
            wgmma_bwd::store_dst<kBlockM, DsTile>(ds_smem, dsa, group * kGroupKeys, warp, lane);
            __syncthreads();  // dS^T of both warpgroups visible
            const int q0 = kDqByRows ? group * 64 : 0, c0 = kDqByRows ? 0 : group * kDqN;
            float dq[kDqN / 8][4];
            wgmma_bwd::dq_product<Element, kBlockN, kDqN, DsTile, KVTile>(
                dq, ds_smem + (q0 / 64) * DsTile::kPanelBytes, k_smem + (c0 / 64) * KVTile::kPanelBytes + (c0 % 64) * 2);
            tc::add_rows<kDqN>(dq_head_s + HeadStep(p, step.g).dq_accum, dq, m0 + q0 + (warp % 4) * 16,
                                    at.seqlen_q, c0, f.head_dim, lane);
        } else {
            ptx::wgmma_wait<0>();
        }
        ptx::wgmma_pin(dv);
        ptx::wgmma_pin(dk);
    }

    // ---- Epilogue: the group's dK_g * scale and dV_g in the input type, staged through shared
    // memory as padded row tiles (after a barrier: other warps may still read K, V, dS^T), then
    // stored by the whole block as 16-byte chunks where aligned. Key tiles no query sees store
    // zeros. A slice of a split group adds them into the group's fp32 sums instead.
    ptx::cp_async_wait<0>();
    if (p.dkv_adds) {
        static_assert(kBlockN * (kHeadDim + 8) * 4 <= kTileBytes, "the sums' rows are staged in the tiles' space");
        const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);
        wgmma_bwd::add_dk_dv<kBlockN, kHeadDim, kThreads>(p, out_group, out_n_index, dk, dv,
                                                          group * kGroupKeys + (warp % 4) * 16, k_smem, tid, lane,
                                                          [] { __syncthreads(); });
        return;
    }
    __syncthreads();
    const unsigned dk_stage = k_smem, dv_stage = k_smem + StageTile::kBytes;
    wgmma_bwd::stage_dk_dv<Element, kHeadDim, StageTile>(dk_stage, dv_stage, dk, dv, lane_key_row(),
                                                         static_cast<float>(f.scale), lane);
    __syncthreads();
    const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);  // recomputed: not held through the loop
    wgmma_bwd::store_dk_dv<kBlockN, kHeadDim, kThreads>(p, out_group, out_n_index, dk_stage, dv_stage, tid);
}

}  // namespace cuflash
