// Forward attention for float16 / bfloat16 on Hopper (sm_90a): FlashAttention-2's algorithm
// (fwd_tc.cu) on warpgroup MMAs.
//
//   O = softmax(Q K^T * scale) V,   lse = log(sum_j exp(Q K_j^T * scale))   (per query row)
//
// A block of kBlockM / 64 warpgroups owns kBlockM query rows of one (batch..., head); warpgroup g
// owns rows [64g, 64g + 64), one wgmma M. Q's tile is read once; K and V stream through shared
// memory in tiles of kBlockN keys, kStages deep (cp.async), in the 128-byte swizzled layout
// wgmma reads directly (tc::Sw128Tile). Per key tile j and warpgroup:
//
//   S    = Q_g K_j^T                       wgmma, A = Q_g, B = K_j (shared, K-major), fp32
//   online softmax: m_i, l_i, P            (softmax_tc.cuh: a warp's 16 rows are its m16 tile)
//   acc  = alpha * acc + P V_j             wgmma, A = P (registers), B = V_j (shared, MN-major)
//   O = acc / l_i,  lse = m_i + log l_i    (once, at the end)
//
// The accumulator layout of wgmma is, warp by warp, that of mma.sync m16n8: the softmax, the
// masking and the P packing are fwd_tc's, with one m16 tile per warp.
// D and Dv are zero-padded to kHeadDim by the loads; keys >= Lk and queries >= Lq are zero rows.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "softmax_tc.cuh"
#include "tile_tc.cuh"

namespace cuflash {

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow>
__global__ void __launch_bounds__(kWarps * 32, 1) fwd_wgmma(const FwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kKStepsQK = kHeadDim / 16;  // k16 steps of Q K^T
    constexpr int kKStepsPV = kBlockN / 16;   // k16 steps of P V
    static_assert(kBlockM == 64 * (kWarps / 4) && kWarps % 4 == 0, "one warpgroup per 64 query rows");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 128 && (kBlockN == 64 || kBlockN == 128),
                  "whole 64-column panels; wgmma N of 64 or 128");
    static_assert(kStages >= 2, "the K/V pipeline needs at least two stages");

    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;
    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;     // one K or V tile
    using OTile = tc::SmemTile<kBlockM, kHeadDim>;       // O on its way out (padded rows)
    constexpr unsigned kStageBytes = 2 * KVTile::kBytes;
    constexpr unsigned kSmemBytes = 1024 + QTile::kBytes + kStages * kStageBytes;  // == tiles.py; 1024: alignment
    static_assert(OTile::kBytes <= kStages * kStageBytes, "O leaves through the K/V stages");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    // Swizzle atoms start on 1024-byte boundaries (the descriptors' base offset is 0).
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned kv_smem = q_smem + QTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = warp / 4;
    // As fwd_tc: dense blocks in head-major order (one head's query tiles share K/V through L2),
    // window blocks x-fastest and the most-masked query tiles last.
    auto block_coord = [] {
        return kHasWindow ? tc::BlockCoord{ptx::block_index_x(), ptx::block_index_y()}
                          : tc::head_major_block(ptx::block_index_x(), ptx::block_index_y());
    };
    const auto [bh, m_index] = block_coord();
    const int m_block = kHasWindow ? gridDim.y - 1 - m_index : m_index;
    const int m0 = m_block * kBlockM;
    const int warp_row0 = group * 64 + (warp % 4) * 16;  // this warp's 16 query rows

    const BatchIndex at(p, bh);
    const Mask<kHasWindow> mask(p);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // ---- Pipeline: cp.async groups are committed in order Q, tile first, ..., one per loop step
    // (empty groups too), so "wait until kStages-2 groups are pending" means "tile j has landed".
    const tc::TileLoader<kBlockM, kHeadDim, kThreads, QTile> q_loader(static_cast<const unsigned short*>(p.q) + at.q,
                                                                       p.q_row_stride, p.head_dim);
    const tc::TileLoader<kBlockN, kHeadDim, kThreads, KVTile> k_loader(static_cast<const unsigned short*>(p.k) + at.k,
                                                                        p.k_row_stride, p.head_dim);
    const tc::TileLoader<kBlockN, kHeadDim, kThreads, KVTile> v_loader(static_cast<const unsigned short*>(p.v) + at.v,
                                                                        p.v_row_stride, p.head_dim_v);
    if (!(q_loader.aligned(p.seqlen_q) && k_loader.aligned(p.seqlen_k) && v_loader.aligned(p.seqlen_k))) __trap();
    auto load_kv = [&](int j) {
        const unsigned slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;
        k_loader.load(slot, j * kBlockN, p.seqlen_k, tid);
        v_loader.load(slot + KVTile::kBytes, j * kBlockN, p.seqlen_k, tid);
    };
    q_loader.load(q_smem, m0, p.seqlen_q, tid);
    ptx::cp_async_commit();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (range.first + s < range.last) load_kv(range.first + s);
        ptx::cp_async_commit();
    }

    // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q is negated in shared memory
    // (exact in f16/bf16) so that the softmax sees c = |scale| * log2(e) > 0 (fwd_tc.cu).
    const float scale_log2 = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
    if (p.scale_log2 < 0.f) {
        ptx::cp_async_wait<kStages - 1>();  // this thread's Q copies have landed
        q_loader.negate(q_smem, tid);        // published by the first barrier below
    }

    // Operand forms (descriptors: tc::Sw128Tile): Q_g and K_j K-major, V_j MN-major.
    const unsigned q_group = q_smem + group * 64 * 128;  // this warpgroup's 64 rows of Q

    float acc[1][kHeadDim / 8][4];
    tc::zero(acc);
    tc::OnlineSoftmax<1> softmax;

    // Key tiles j in [range.first, range.last); those outside [full_first, full_last) are masked.
    for (int j = range.first; j < range.last; ++j) {
        const bool masked = j < range.full_first || j >= range.full_last;
        ptx::cp_async_wait<kStages - 2>();
        ptx::fence_proxy_async_shared();  // this thread's copies, visible to the tensor cores
        __syncthreads();  // tile j visible to all; everyone is done with the slot reloaded below
        if (j + kStages - 1 < range.last) load_kv(j + kStages - 1);
        ptx::cp_async_commit();
        const unsigned slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;

        // S = Q_g K_j^T (the first k-step overwrites S).
        float s[1][kBlockN / 8][4];
        ptx::wgmma_fence();
        ptx::Wgmma<kBlockN>::template ss<Element, 0, 0, false>(s[0], QTile::k_major(q_group), KVTile::k_major(slot));
#pragma unroll
        for (int kk = 1; kk < kKStepsQK; ++kk)
            ptx::Wgmma<kBlockN>::template ss<Element, 0, 0>(s[0], QTile::k_major(q_group + QTile::k_step(kk)),
                                                            KVTile::k_major(slot + KVTile::k_step(kk)));
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(s[0]);
        ptx::wgmma_pin(acc[0]);

        // -inf where the key is hidden (raw scores: the scale is folded into the softmax's FFMA).
        if (masked) {
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = m0 + warp_row0 + lane / 4 + 8 * (e / 2);
                    const int key = j * kBlockN + nt * 8 + 2 * (lane % 4) + e % 2;
                    if (!mask.visible(row, key)) s[0][nt][e] = tc::neg_inf();
                }
        }

        softmax.update(s, acc, scale_log2);

        // acc += P V_j, P packed to 16 bits: n8 tiles 2kk, 2kk+1 of S are P's k-step kk.
        unsigned a[kKStepsPV][4];
#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk) tc::pack_a<Element>(s[0][2 * kk], s[0][2 * kk + 1], a[kk]);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk)
            ptx::Wgmma<kHeadDim>::template rs<Element, 1>(acc[0], a[kk], KVTile::mn_major(slot + KVTile::kBytes + kk * 2048));
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();  // before the slot is reloaded (next step's barrier) and acc rescaled
        ptx::wgmma_pin(acc[0]);
    }

    // ---- Epilogue: O = acc / l_i in the output type, staged through shared memory as padded
    // rows (after a barrier: other warps may still read K/V), stored by the whole block as
    // 16-byte chunks where aligned.
    float inv_l[1][2], lse[1][2];
    softmax.finish(inv_l, lse);
    const BatchIndex out_at(p, block_coord().bh);  // recomputed: not held through the loop
    ptx::cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = warp_row0 + lane / 4 + 8 * h;
#pragma unroll
        for (int nt = 0; nt < kHeadDim / 8; ++nt) {
            const unsigned packed = ptx::pack2<Element>(acc[0][nt][2 * h] * inv_l[0][h], acc[0][nt][2 * h + 1] * inv_l[0][h]);
            ptx::st_shared_b32(kv_smem + OTile::offset(row, nt) + 4 * (lane % 4), packed);
        }
        if (lane % 4 == 0 && m0 + row < p.seqlen_q) static_cast<float*>(p.lse)[out_at.lse + m0 + row] = lse[0][h];
    }
    __syncthreads();
    tc::store_tile<kBlockM, kHeadDim, kThreads>(kv_smem, static_cast<unsigned short*>(p.o) + out_at.o + m0 * p.o_row_stride,
                                                p.o_row_stride, p.seqlen_q - m0, p.head_dim_v, tid);
}

}  // namespace cuflash
