// Backward attention for float16 / bfloat16 on tensor cores, over key tiles: dK, dV (and dQ by
// fp32 atomics). FlashAttention-2's backward with recomputation, on mma.sync.
//
// One block owns kBlockN keys of one (batch..., head): K_j, V_j stay in shared memory, dK_j and
// dV_j accumulate in fp32 registers, and the query tiles i that see a key of the block stream
// through shared memory (Q_i, dO_i, lse_i, delta_i; kStages deep, cp.async):
//
//   S^T  = K_j Q_i^T                            recompute the scores, transposed
//   P^T  = exp2(S^T * scale_log2 - lse_i log2 e)  (0 where masked, for rows past Lq or lse = -inf)
//   dV_j += P^T dO_i
//   dP^T = V_j dO_i^T
//   dS^T = P^T o (dP^T - delta_i)               delta_i = rowsum(dO_i o O_i), from bwd_delta
//   dK_j += dS^T Q_i
//   dQ_i += dS K_j                              fp32 atomics into dq_accum (when non-null)
//   dK_j *= scale                               (once, at the end; dQ's scale is bwd_dq_convert's)
//
// Warp layout. Computing the transposed products makes every key-side product register-local:
// warp w owns 16 keys (an m16 tile); its S^T, P^T, dP^T, dS^T tiles (16 keys x kBlockM queries)
// are mma accumulators, whose layout is the A operand of the next mma (P^T dO, dS^T Q), so P
// never touches shared memory. kDSplit = 16 kWarps / kBlockN warps share one 16-key slice and
// split dK_j, dV_j's columns (each recomputes the slice's S^T and dP^T): 1 for head dims <= 128,
// 2 above, where 16 keys x kHeadDim x (dK + dV) would not fit the register file.
// dQ_i = dS K_j needs dS with queries as rows: dS^T goes to shared memory (16-bit) once, and
// ldmatrix.trans reads it back transposed; warps then split dQ_i's (m16 x 32-column) units.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "tile_tc.cuh"

namespace cuflash {

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow>
__global__ void __launch_bounds__(kWarps * 32) bwd_dkdv_tc(const BwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kDSplit = kWarps * 16 / kBlockN;  // warps per 16-key slice
    constexpr int kCols = kHeadDim / kDSplit;       // dK / dV columns of one warp
    constexpr int kNTilesQ = kBlockM / 8;           // n8 tiles of S^T (queries)
    constexpr int kNTilesD = kCols / 8;             // n8 tiles of this warp's dK, dV
    constexpr int kKStepsD = kHeadDim / 16;         // k16 steps of K Q^T and V dO^T
    constexpr int kKStepsQ = kBlockM / 16;          // k16 steps of P^T dO and dS^T Q
    constexpr int kKStepsN = kBlockN / 16;          // k16 steps of dS K
    constexpr int kDqCols = 32;                     // columns of one dQ work unit
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kRedV2 = true;                   // vector fp32 reductions exist from sm_90
#else
    constexpr bool kRedV2 = false;
#endif
    constexpr int kDqUnits = (kBlockM / 16) * (kHeadDim / kDqCols);
    static_assert(kDSplit == 1 || kDSplit == 2, "a 16-key slice is shared by one or two warps");
    static_assert(kDSplit * kBlockN == kWarps * 16, "warps tile the key block exactly");
    static_assert(kCols % 16 == 0 && kBlockM % 16 == 0 && kHeadDim % kDqCols == 0, "whole mma tiles");
    static_assert(kThreads >= 2 * kBlockM, "one thread per lse / delta value of a query tile");
    static_assert(kStages >= 2, "the Q/dO pipeline needs at least two stages");

    // K_j and V_j A-fragments of the warp's 16 keys stay in registers when they fit beside the
    // accumulators (dK, dV, S^T, dP^T); else ldmatrix re-reads them at every k-step.
    constexpr int kAccRegs = 2 * kNTilesD * 4 + 2 * kNTilesQ * 4;
    constexpr bool kKVInRegisters = kAccRegs + 2 * kKStepsD * 4 <= 160;
    // The k-loops of K Q^T and V dO^T unroll fully only when K/V come from registers (their index
    // must be static); else by 2: fully unrolled, ptxas hoists every ldmatrix of Q_i / dO_i and
    // runs out of registers (255 + spills at d=128), by 2 it does not and the loads still overlap.
    constexpr int kUnrollD = kKVInRegisters ? kKStepsD : 2;

    using KVTile = tc::SmemTile<kBlockN, kHeadDim>;  // K_j, V_j; they stage dK, dV at the end
    using QTile = tc::SmemTile<kBlockM, kHeadDim>;   // one Q_i or dO_i
    using DSTile = tc::SmemTile<kBlockN, kBlockM>;   // dS^T, 16-bit
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse2_i, then delta_i (fp32)
    constexpr unsigned kStageBytes = 2 * QTile::kBytes + kStatBytes;
    constexpr unsigned kSmemBytes = 2 * KVTile::kBytes + DSTile::kBytes + kStages * kStageBytes;  // == tiles.py

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned k_smem = ptx::smem_addr(smem);
    const unsigned v_smem = k_smem + KVTile::kBytes;
    const unsigned ds_smem = v_smem + KVTile::kBytes;
    const unsigned stage_smem = ds_smem + DSTile::kBytes;
    unsigned char* const stage_ptr = smem + 2 * KVTile::kBytes + DSTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int bh = blockIdx.x;
    const int n0 = blockIdx.y * kBlockN;
    const int key_w = (warp / kDSplit) * 16;     // the warp's keys, within the block
    const int col_w = (warp % kDSplit) * kCols;  // the warp's dK / dV columns
    const FwdParams& f = p.fwd;

    const BwdBatchIndex at(p, bh);
    const Mask<kHasWindow> mask(f);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, f.seqlen_q);

    const tc::TileLoader<kBlockN, kHeadDim, kThreads> k_loader(static_cast<const unsigned short*>(f.k) + at.k,
                                                                f.k_row_stride, f.head_dim);
    const tc::TileLoader<kBlockN, kHeadDim, kThreads> v_loader(static_cast<const unsigned short*>(f.v) + at.v,
                                                                f.v_row_stride, f.head_dim_v);
    const tc::TileLoader<kBlockM, kHeadDim, kThreads> q_loader(static_cast<const unsigned short*>(f.q) + at.q,
                                                                f.q_row_stride, f.head_dim);
    const tc::TileLoader<kBlockM, kHeadDim, kThreads> do_loader(
        static_cast<const unsigned short*>(p.dout) + at.dout, p.dout_row_stride, f.head_dim_v);
    if (!(k_loader.aligned(f.seqlen_k) && v_loader.aligned(f.seqlen_k) && q_loader.aligned(f.seqlen_q) &&
          do_loader.aligned(f.seqlen_q)))
        __trap();
    const float* lse_g = static_cast<const float*>(f.lse) + at.lse;
    const float* delta_g = static_cast<const float*>(p.delta) + at.lse;

    // One stage: Q_i, dO_i, and the rows' lse and delta (thread t < kBlockM copies lse of row t,
    // the next kBlockM threads delta; 4-byte copies: a head's lse row need not be 16-byte aligned).
    // Rows past Lq read as 0; the per-element mask zeroes their P (their tiles are masked).
    auto load_qdo = [&](int i) {
        const int slot_index = (i - range.first) % kStages;
        const unsigned slot = stage_smem + slot_index * kStageBytes;
        q_loader.load(slot, i * kBlockM, f.seqlen_q, tid);
        do_loader.load(slot + QTile::kBytes, i * kBlockM, f.seqlen_q, tid);
        if (tid < 2 * kBlockM) {
            const int row = i * kBlockM + tid % kBlockM;
            const float* src = (tid < kBlockM ? lse_g : delta_g) + (row < f.seqlen_q ? row : 0);
            ptx::cp_async_elem<4>(stage_ptr + slot_index * kStageBytes + 2 * QTile::kBytes + 4 * tid, src,
                                  row < f.seqlen_q);
        }
    };

    // ---- Pipeline: cp.async groups in order (K, V), Q/dO tile first, ..., one per loop step
    // (empty ones too): "at most kStages-2 pending" at step i means K, V and tile i have landed.
    k_loader.load(k_smem, n0, f.seqlen_k, tid);
    v_loader.load(v_smem, n0, f.seqlen_k, tid);
    ptx::cp_async_commit();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (range.first + s < range.last) load_qdo(range.first + s);
        ptx::cp_async_commit();
    }

    // Per-lane ldmatrix addresses (fragment layouts: ptx.cuh).
    //   A from rows (K_j, V_j: keys x dims):         rows lane%16, chunk lane/16
    //   B from rows, non-transposed (Q_i, dO_i as n = queries, k = dims): rows (lane/16)*8 + lane%8,
    //     chunk (lane/8)%2 -- also dS^T read transposed as A (k = keys, m = queries)
    //   B transposed (Q_i, dO_i, K_j as k = rows, n = dims): rows ((lane/8)%2)*8 + lane%8, chunk lane/16
    const unsigned a_lane = tc::a_lane<KVTile>(key_w, lane);
    const unsigned bn_lane = tc::bn_lane<QTile>(lane);
    const unsigned bt_lane = tc::bt_lane<QTile>(lane);
    const unsigned ds_a_lane = tc::bn_lane<DSTile>(lane);
    const unsigned k_bt_lane = tc::bt_lane<KVTile>(lane);

    unsigned k_regs[kKVInRegisters ? kKStepsD : 1][4], v_regs[kKVInRegisters ? kKStepsD : 1][4];
    if (kKVInRegisters) {
        ptx::cp_async_wait<kStages - 1>();  // K and V, not yet the Q/dO tiles
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kKStepsD; ++kk) {
            ptx::ldmatrix_x4(k_smem + a_lane + KVTile::offset(0, kk * 2), k_regs[kKVInRegisters ? kk : 0]);
            ptx::ldmatrix_x4(v_smem + a_lane + KVTile::offset(0, kk * 2), v_regs[kKVInRegisters ? kk : 0]);
        }
    }

    float dk[kNTilesD][4], dv[kNTilesD][4];
#pragma unroll
    for (int nt = 0; nt < kNTilesD; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;
    // C = X_j Y_i^T (16 keys x kBlockM queries per warp) for X_j = K_j or V_j (from registers or
    // from x_smem) and Y_i = Q_i or dO_i (the stage slot at y_slot).
    auto kv_times_t = [&](float(&c)[kNTilesQ][4], unsigned x_smem, unsigned(&x_regs)[kKVInRegisters ? kKStepsD : 1][4],
                          unsigned y_slot) {
        tc::zero(c);
#pragma unroll kUnrollD
        for (int kk = 0; kk < kKStepsD; ++kk) {
            unsigned a_smem[4];
            if (!kKVInRegisters) ptx::ldmatrix_x4(x_smem + a_lane + KVTile::offset(0, kk * 2), a_smem);
            const unsigned(&a)[4] = kKVInRegisters ? x_regs[kKVInRegisters ? kk : 0] : a_smem;
            tc::mma_k16<Element, QTile, false>(c, a, y_slot + bn_lane, 0, kk * 2);
        }
    };
    const float scale_log2 = f.scale_log2;
    const bool with_dq = p.dq_accum != nullptr;

    // Query tiles i in [range.first, range.last); those outside [full_first, full_last) cross
    // the window, the keys' end or Lq and take the per-element test (one warp-uniform branch).
    for (int i = range.first; i < range.last; ++i) {
        const bool masked = i < range.full_first || i >= range.full_last;
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // tile i visible to all; everyone is done with the slot reloaded below and with dS^T
        if (i + kStages - 1 < range.last) load_qdo(i + kStages - 1);
        ptx::cp_async_commit();
        const unsigned q_slot = stage_smem + ((i - range.first) % kStages) * kStageBytes;
        const unsigned do_slot = q_slot + QTile::kBytes;
        const float* lse_s =
            reinterpret_cast<const float*>(stage_ptr + ((i - range.first) % kStages) * kStageBytes + 2 * QTile::kBytes);
        const float* delta_s = lse_s + kBlockM;
        const int m0 = i * kBlockM;

        // S^T = K_j Q_i^T  (16 keys x kBlockM queries per warp)
        float s[kNTilesQ][4];
        kv_times_t(s, k_smem, k_regs, q_slot);

        // P^T = exp2(S^T * scale_log2 - lse_i * log2 e): one FFMA and one ex2 per element. A row
        // that sees no key has lse = -inf: taken as +inf, so that P = exp2(-inf) = 0 exactly.
        // Hidden (query, key) pairs and rows past Lq (masked tiles only) are set to 0 after.
#pragma unroll
        for (int nt = 0; nt < kNTilesQ; ++nt) {
            const float2 lse = *reinterpret_cast<const float2*>(lse_s + nt * 8 + 2 * (lane % 4));
            const float l0 = lse.x == -tc::pos_inf() ? tc::pos_inf() : lse.x * 1.4426950408889634f;
            const float l1 = lse.y == -tc::pos_inf() ? tc::pos_inf() : lse.y * 1.4426950408889634f;
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = ptx::ex2(fmaf(s[nt][e], scale_log2, -(e % 2 ? l1 : l0)));
        }
        if (masked) {
#pragma unroll
            for (int nt = 0; nt < kNTilesQ; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = m0 + nt * 8 + 2 * (lane % 4) + e % 2;
                    const int key = n0 + key_w + lane / 4 + 8 * (e / 2);
                    if (row >= f.seqlen_q || !mask.visible(row, key)) s[nt][e] = 0.f;
                }
        }

        // dV_j += P^T dO_i  (P^T from registers; dO_i as B through ldmatrix.trans)
#pragma unroll
        for (int kk = 0; kk < kKStepsQ; ++kk) {
            unsigned a[4];
            tc::pack_a<Element>(s[2 * kk], s[2 * kk + 1], a);
            tc::mma_k16<Element, QTile, true>(dv, a, do_slot + bt_lane, kk * 16, col_w / 8);
        }

        // dP^T = V_j dO_i^T
        float dp[kNTilesQ][4];
        kv_times_t(dp, v_smem, v_regs, do_slot);

        // dS^T = P^T o (dP^T - delta_i), in place of dP^T
#pragma unroll
        for (int nt = 0; nt < kNTilesQ; ++nt) {
            const float2 d2 = *reinterpret_cast<const float2*>(delta_s + nt * 8 + 2 * (lane % 4));
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - (e % 2 ? d2.y : d2.x));
        }

        // dK_j += dS^T Q_i
#pragma unroll
        for (int kk = 0; kk < kKStepsQ; ++kk) {
            unsigned a[4];
            tc::pack_a<Element>(dp[2 * kk], dp[2 * kk + 1], a);
            tc::mma_k16<Element, QTile, true>(dk, a, q_slot + bt_lane, kk * 16, col_w / 8);
        }

        if (with_dq) {
            // dS^T to shared memory, 16-bit, one copy per 16-key slice.
            if (warp % kDSplit == 0) {
#pragma unroll
                for (int nt = 0; nt < kNTilesQ; ++nt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        ptx::st_shared_b32(ds_smem + DSTile::offset(key_w + lane / 4 + 8 * h, nt) + 4 * (lane % 4),
                                           ptx::pack2<Element>(dp[nt][2 * h], dp[nt][2 * h + 1]));
            }
            __syncthreads();

            // dQ_i += dS K_j: dS (queries x keys) is dS^T read through ldmatrix.trans; K_j as B
            // through ldmatrix.trans (k = keys). Units of (16 queries x kDqCols columns) over warps,
            // added to dq_accum with fp32 atomics (unscaled: bwd_dq_convert multiplies by scale).
            float* dq_g = static_cast<float*>(p.dq_accum) + (long long)ptx::block_index_x() * f.seqlen_q * f.head_dim;
#pragma unroll 1
            for (int u = warp; u < kDqUnits; u += kWarps) {
                const int mt = u % (kBlockM / 16), chunk = u / (kBlockM / 16);
                float acc[kDqCols / 8][4];
                tc::zero(acc);
#pragma unroll
                for (int kk = 0; kk < kKStepsN; ++kk) {
                    unsigned a[4];
                    ptx::ldmatrix_x4_trans(ds_smem + ds_a_lane + DSTile::offset(kk * 16, mt * 2), a);
                    tc::mma_k16<Element, KVTile, true>(acc, a, k_smem + k_bt_lane, kk * 16, chunk * (kDqCols / 8));
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m0 + mt * 16 + lane / 4 + 8 * h;
                    if (row < f.seqlen_q) {
                        float* dst = dq_g + (long long)row * f.head_dim;
#pragma unroll
                        for (int nt = 0; nt < kDqCols / 8; ++nt) {
                            const int col = chunk * kDqCols + nt * 8 + 2 * (lane % 4);
                            // An even D makes every (col, col+1) pair 8-byte aligned: one vector RED
                            // on sm_90 (half the atomic instructions); else element by element.
                            if (kRedV2 && f.head_dim % 2 == 0) {
                                if (col < f.head_dim) ptx::red_add_v2_f32(dst + col, acc[nt][2 * h], acc[nt][2 * h + 1]);
                            } else {
#pragma unroll
                                for (int e = 0; e < 2; ++e)
                                    if (col + e < f.head_dim) atomicAdd(dst + col + e, acc[nt][2 * h + e]);
                            }
                        }
                    }
                }
            }
        }
    }

    // ---- Epilogue: dK_j * scale and dV_j in the input type, staged through the K_j / V_j tiles
    // (after a barrier: other warps may still read them), then stored by the whole block as
    // 16-byte chunks where aligned. Key tiles that no query sees store zeros.
    ptx::cp_async_wait<0>();
    __syncthreads();
    const float scale = static_cast<float>(f.scale);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = key_w + lane / 4 + 8 * h;
#pragma unroll
        for (int nt = 0; nt < kNTilesD; ++nt) {
            const unsigned off = KVTile::offset(key, col_w / 8 + nt) + 4 * (lane % 4);
            ptx::st_shared_b32(k_smem + off, ptx::pack2<Element>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale));
            ptx::st_shared_b32(v_smem + off, ptx::pack2<Element>(dv[nt][2 * h], dv[nt][2 * h + 1]));
        }
    }
    __syncthreads();
    const BwdBatchIndex out_at(p, ptx::block_index_x());  // recomputed: not held through the loop
    tc::store_tile<kBlockN, kHeadDim, kThreads>(k_smem, static_cast<unsigned short*>(p.dk) + out_at.dk + n0 * p.dk_row_stride,
                                                p.dk_row_stride, f.seqlen_k - n0, f.head_dim, tid);
    tc::store_tile<kBlockN, kHeadDim, kThreads>(v_smem, static_cast<unsigned short*>(p.dv) + out_at.dv + n0 * p.dv_row_stride,
                                                p.dv_row_stride, f.seqlen_k - n0, f.head_dim_v, tid);
}

}  // namespace cuflash
