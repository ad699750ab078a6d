// Backward attention for float32 under precision="highest" on Hopper (sm_90a), over query tiles:
// dQ without atomics (the deterministic path, beside the dK/dV kernels run with dq_accum = null),
// in bf16x6 (tile_tc.cuh: three bfloat16 pieces an operand, six products small first). The
// algorithm, the contract and the two warpgroups are bwd_dq_wgmma_x3.cu's; bfloat16 operands may
// be MN-major, so dQ_i += dS K_j reads K_j as it is stored (no K_j^T tile), and a key tile is
// split once, into three pieces, where 3xTF32 splits it into hi and lo twice (as it is and
// transposed):
//
//   S   = Q_i K_j^T                              wgmma SS, A = Q_i, B = K_j (K-major)
//   dP  = dO_i V_j^T                             wgmma SS, A = dO_i, B = V_j
//   P   = exp2(S * scale_log2 - lse_i log2 e)    (0 where hidden, past Lq, or lse = -inf)
//   dS  = P o (dP - delta_i)
//   dQ_i += dS K_j                               wgmma RS, A = dS (registers, pack_a_x3), B = K_j MN-major
//   dQ_i *= scale                                (once, at the end)
//
// Shared memory (d64: 113 KB): Q_i and dO_i in pieces, two slots of K_j and V_j in pieces, the
// staging tiles of a key tile's raw rows (the prologue: Q_i's and dO_i's pass through the slots).
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal. 1024 bytes of alignment; bfloat16 piece tiles (three a tensor): Q_i,
// dO_i (kBlockM x D), two slots of K_j, V_j (kBlockN x D); the float32 staging tiles of K_j's and
// V_j's rows.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dq_wgmma_x6_smem_bytes() {
    return 1024 + 2 * 3 * (2 * kBlockM * kHeadDim + 2 * 2 * kBlockN * kHeadDim) + 4 * 2 * kBlockN * kHeadDim;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dq_wgmma_x6(const BwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroupThreads = 128;  // a warpgroup
    constexpr int kPieces = 3;
    static_assert(tc::Arith<Element>::kUnits == 2, "float32 (the Variant's Element names its precision)");
    static_assert(!kScoreMods && !kDropout, "no modifiers, no dropout (tiles.py: FFMA serves them)");
    static_assert(kWarps == 8 && kBlockM == 64 && kBlockN == 32 && (kHeadDim == 64 || kHeadDim == 128) && kStages == 1,
                  "two warpgroups on 64 query rows (wgmma M), 32-key steps, whole 128-byte rows of pieces");

    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;          // a piece of Q_i or dO_i
    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;         // a piece of K_j or V_j
    using RawQTile = tc::Sw128Tile<kBlockM, 2 * kHeadDim>;   // Q_i's or dO_i's floats (the prologue)
    using RawKVTile = tc::Sw128Tile<kBlockN, 2 * kHeadDim>;  // K_j's or V_j's floats
    constexpr int kKStepsD = kHeadDim / 16;  // k16 steps over D (S, dP)
    constexpr int kKStepsN = kBlockN / 16;   // over a tile's keys (dQ)
    constexpr unsigned kSlotBytes = 2 * kPieces * KVTile::kBytes;  // K_j's pieces, then V_j's
    constexpr unsigned kSmemBytes = bwd_dq_wgmma_x6_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + 2 * kPieces * QTile::kBytes + 2 * kSlotBytes + 2 * RawKVTile::kBytes, "layout");
    static_assert(2 * RawQTile::kBytes <= 2 * kSlotBytes, "Q_i's and dO_i's floats pass through the slots");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned do_smem = q_smem + kPieces * QTile::kBytes;
    const unsigned slots = do_smem + kPieces * QTile::kBytes;
    const unsigned staging = slots + 2 * kSlotBytes;  // K_j's raw rows, then V_j's
    auto slot_smem = [&](int j, int first) { return slots + ((j - first) % 2) * kSlotBytes; };

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // warpgroup; uniform registers: fwd_wgmma_ws.cu says why
    const int gtid = tid % kGroupThreads;
    const int row0 = (warp % 4) * 16;  // this warp's rows of its warpgroup's products: row0 + lane / 4 + {0, 8}
    const auto [bh, m_block] = query_tile_block<kHasWindow>();  // schedule.cuh
    const int m0 = m_block * kBlockM;
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_query_block<float, kBlockM>(p, bh, m_block, m0, at)) return;  // params.cuh
    const Mask<kHasWindow, false> mask(f, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    using Units = const unsigned short*;
    const tc::TileLoader<kBlockM, 2 * kHeadDim, kThreads, RawQTile> q_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.q) + at.q), f.q_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockM, 2 * kHeadDim, kThreads, RawQTile> do_rows(
        reinterpret_cast<Units>(static_cast<const float*>(p.dout) + at.dout), p.dout_row_stride * 2, f.head_dim_v * 2);
    // K_j's and V_j's rows, by warpgroup 1.
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kGroupThreads, RawKVTile> k_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.k) + at.k), f.k_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kGroupThreads, RawKVTile> v_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.v) + at.v), f.v_row_stride * 2, f.head_dim_v * 2);
    if (!(q_rows.aligned(at.seqlen_q) && do_rows.aligned(at.seqlen_q) && k_rows.aligned(at.seqlen_k) &&
          v_rows.aligned(at.seqlen_k)))
        __trap();

    // Warpgroup 1: key tile j's K and V rows into the staging tiles (cp.async; the caller commits).
    auto copy_tile = [&](int j) {
        if (j >= range.last) return;
        k_rows.load(staging, j * kBlockN, at.seqlen_k, gtid);
        v_rows.load(staging + RawKVTile::kBytes, j * kBlockN, at.seqlen_k, gtid);
    };
    // Warpgroup 1: the staged tile j (this thread's copies, landed) split into pieces into its
    // slot, fenced for the tensor cores (the step's barrier publishes them).
    auto unstage_tile = [&](int j) {
        if (j >= range.last) return;
        const unsigned slot = slot_smem(j, range.first);
        k_rows.template split_pieces<KVTile>(staging, slot, gtid);
        v_rows.template split_pieces<KVTile>(staging + RawKVTile::kBytes, slot + kPieces * KVTile::kBytes, gtid);
        ptx::fence_proxy_async_shared();
    };

    // ---- Prologue: Q_i's and dO_i's rows through the slots into their pieces (the block);
    // warpgroup 1 the first key tile into slot 0 and the second's copies.
    q_rows.load(slots, m0, at.seqlen_q, tid);
    do_rows.load(slots + RawQTile::kBytes, m0, at.seqlen_q, tid);
    if (group == 1) copy_tile(range.first);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    q_rows.template split_pieces<QTile>(slots, q_smem, tid);
    do_rows.template split_pieces<QTile>(slots + RawQTile::kBytes, do_smem, tid);
    ptx::fence_proxy_async_shared();
    __syncthreads();  // the slots' floats read: slot 0 free
    if (group == 1) {
        unstage_tile(range.first);
        copy_tile(range.first + 1);
        ptx::cp_async_commit();
    }
    __syncthreads();

    auto step_barrier = [] { ptx::named_barrier_sync(1, kThreads); };
    if (group == 1) {  // (each warpgroup its own copy of the loop: bwd_dkdv_wgmma_x3.cu says why)
        tc::feed_key_tiles(range, unstage_tile, copy_tile, step_barrier);
        return;
    }

    // Warpgroup 0: the rows' statistics (this lane's rows row0 + lane / 4 + {0, 8}).
    float lse2[2], delta[2];
    tc::row_stats(static_cast<const float*>(f.lse) + at.lse, static_cast<const float*>(p.delta) + at.lse,
                  m0 + row0 + lane / 4, at.seqlen_q, lse2, delta);
    float dq[kHeadDim / 8][4];  // dQ_i / scale
    tc::zero(dq);
    const float scale_log2 = f.scale_log2;
    for (int j = range.first; j < range.last; ++j) {
        const bool masked = j < range.full_first || j >= range.full_last;
        const unsigned k_tile = slot_smem(j, range.first), v_tile = k_tile + kPieces * KVTile::kBytes;
        float s[1][kBlockN / 8][4], dp[1][kBlockN / 8][4];
        tc::zero(s);
        tc::zero(dp);
        ptx::wgmma_fence();
        tc::wgmma_ss_x6<kKStepsD, QTile, KVTile, 0, 0>(s[0], q_smem, k_tile);
        tc::wgmma_ss_x6<kKStepsD, QTile, KVTile, 0, 0>(dp[0], do_smem, v_tile);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(s[0]);
        ptx::wgmma_pin(dp[0]);
        tc::dscores_in_place(s[0], dp[0], scale_log2, lse2, delta, masked, mask, m0 + row0, j * kBlockN, lane);
        // dQ_i += dS K_j into a fresh fragment (A: dS's n8 tiles 2kk, 2kk + 1 are k16 step kk, in
        // pieces; B: K_j MN-major, k16 step kk its keys 16kk..16kk+15).
        unsigned dsa[kKStepsN][kPieces][4];
#pragma unroll
        for (int kk = 0; kk < kKStepsN; ++kk) tc::pack_a_x3(dp[0][2 * kk], dp[0][2 * kk + 1], dsa[kk]);
        float dq_step[kHeadDim / 8][4];
        tc::zero(dq_step);
        ptx::wgmma_fence();
        tc::wgmma_rs_x6<kKStepsN, KVTile, 1>(dq_step, dsa, k_tile);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(dq_step);
        tc::add(dq, dq_step);
        step_barrier();  // this slot free; the next one published
    }

    // ---- Epilogue (warpgroup 0): dQ_i = scale * dq in float32, from the registers (rows below
    // Lq, columns below D).
    const BwdBatchIndex out_at(p, ptx::block_index_x());  // recomputed: not held through the loop
    tc::store_rows<float, kHeadDim>(static_cast<float*>(p.dq) + out_at.dq + (long long)m0 * p.dq_row_stride,
                                    p.dq_row_stride, dq, row0, out_at.seqlen_q - m0, 0, f.head_dim, lane,
                                    static_cast<float>(f.scale));
}

}  // namespace cuflash
