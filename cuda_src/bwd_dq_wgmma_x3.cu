// Backward attention for float32 under precision="highest" on Hopper (sm_90a), over query tiles:
// dQ without atomics (the deterministic path, beside bwd_dkdv_wgmma_x3.cu run with dq_accum =
// null), in 3xTF32 (tile_tc.cuh's tf32x3). The algorithm and the contract are bwd_dq_tc.cu's:
//
//   S   = Q_i K_j^T                              wgmma SS, A = Q_i (hi, lo), B = K_j
//   dP  = dO_i V_j^T                             wgmma SS, A = dO_i, B = V_j
//   P   = exp2(S * scale_log2 - lse_i log2 e)    (0 where hidden, past Lq, or lse = -inf)
//   dS  = P o (dP - delta_i)
//   dQ_i += dS K_j                               wgmma RS, A = dS (registers, a_k8_of), B = K_j^T
//   dQ_i *= scale                                (once, at the end)
//
// A block of two warpgroups owns kBlockM = 64 query rows of one (batch..., head): warpgroup 0
// multiplies (Q_i, dO_i stay in shared memory, lse_i and delta_i in registers, dQ_i in fp32
// registers, each key tile's product landing in a fresh fragment added by FADD: the tensor cores
// truncate as they accumulate); warpgroup 1 feeds it: the key tiles j of kBlockN = 32 keys that
// the rows see are copied raw into a staging tile (cp.async, two tiles ahead) and split out of
// it into one of two slots (K_j and V_j as they are, K_j^T transposed through
// tc::KeysMajorLoader's map) while warpgroup 0 works on the other. One barrier a step publishes
// the next slot and frees the current one. The sum over j runs in a fixed order in one thread:
// bitwise reproducible. (bwd_dkdv_wgmma_x3.cu: why two warpgroups.)
#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
// 1024 bytes of alignment; in floats, hi and lo each: Q_i, dO_i (kBlockM x D), two slots of K_j,
// V_j, K_j^T (kBlockN x D); the staging tile (K_j's and V_j's raw rows).
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dq_wgmma_x3_smem_bytes() {
    return 1024 + 4 * (2 * (2 * kBlockM * kHeadDim + 2 * 3 * kBlockN * kHeadDim) + 2 * kBlockN * kHeadDim);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dq_wgmma_x3(const BwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroupThreads = 128;    // a warpgroup
    constexpr int kWidth = 2 * kHeadDim;  // a row's 16-bit units
    static_assert(Arith::kProducts == 3 && Arith::kUnits == 2, "float32 in 3xTF32");
    static_assert(!kScoreMods && !kDropout, "no modifiers, no dropout (tiles.py: FFMA serves them)");
    static_assert(kWarps == 8 && kBlockM == 64 && kBlockN == 32 && (kHeadDim == 32 || kHeadDim == 64) && kStages == 1,
                  "two warpgroups on 64 query rows (wgmma M), 32-key steps, the staging tile two steps ahead");

    using QTile = tc::Sw128Tile<kBlockM, kWidth>;                       // Q_i, dO_i
    using KVTile = tc::Sw128Tile<kBlockN, kWidth>;                      // K_j, V_j
    using KtLoader = tc::KeysMajorLoader<kBlockN, kHeadDim, kGroupThreads>;  // K_j^T (D x keys); V_j's map too
    using KtTile = typename KtLoader::Tile;
    constexpr int kKStepsD = kWidth / 16;  // k8 steps over D (S, dP)
    constexpr int kKStepsN = kBlockN / 8;  // over a tile's keys (dQ)
    static_assert(KtTile::kBytes == KVTile::kBytes, "a slot is six tiles of one size");
    constexpr unsigned kSlotBytes = 6 * KVTile::kBytes;  // K_j, V_j, K_j^T, hi then lo each
    constexpr unsigned kSmemBytes = bwd_dq_wgmma_x3_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + 4 * QTile::kBytes + 2 * kSlotBytes + 2 * KtLoader::kStagingBytes, "layout");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned do_smem = q_smem + 2 * QTile::kBytes;
    const unsigned slots = do_smem + 2 * QTile::kBytes;
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
    const tc::TileLoader<kBlockM, kWidth, kThreads, QTile> q_loader(
        reinterpret_cast<Units>(static_cast<const float*>(f.q) + at.q), f.q_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockM, kWidth, kThreads, QTile> do_loader(
        reinterpret_cast<Units>(static_cast<const float*>(p.dout) + at.dout), p.dout_row_stride * 2, f.head_dim_v * 2);
    const KtLoader k_loader(static_cast<const float*>(f.k) + at.k, f.k_row_stride, f.head_dim);
    const KtLoader v_loader(static_cast<const float*>(f.v) + at.v, f.v_row_stride, f.head_dim_v);
    const tc::TileLoader<kBlockN, kWidth, kThreads, KVTile> k_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.k) + at.k), f.k_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockN, kWidth, kThreads, KVTile> v_rows(
        reinterpret_cast<Units>(static_cast<const float*>(f.v) + at.v), f.v_row_stride * 2, f.head_dim_v * 2);
    if (!(q_loader.aligned(at.seqlen_q) && do_loader.aligned(at.seqlen_q) && k_rows.aligned(at.seqlen_k) &&
          v_rows.aligned(at.seqlen_k)))
        __trap();

    // Warpgroup 1: key tile j's K and V rows into the staging tile (cp.async; the caller commits).
    auto copy_tile = [&](int j) {
        if (j >= range.last) return;
        k_loader.copy(staging, j * kBlockN, at.seqlen_k, gtid);
        v_loader.copy(staging + KtLoader::kStagingBytes, j * kBlockN, at.seqlen_k, gtid);
    };
    // Warpgroup 1: the staged tile j (this thread's copies, landed) split into TF32 halves into
    // its slot: K_j and V_j as they are, K_j^T transposed; fenced for the tensor cores (the
    // step's barrier publishes them).
    auto unstage_tile = [&](int j) {
        if (j >= range.last) return;
        const unsigned slot = slot_smem(j, range.first);
        const unsigned k_tile = slot, v_tile = slot + 2 * KVTile::kBytes, kt_tile = slot + 4 * KVTile::kBytes;
        k_loader.template split_staged<KVTile, true>(staging, gtid, k_tile, kt_tile);
        v_loader.template split_staged<KVTile, false>(staging + KtLoader::kStagingBytes, gtid, v_tile, 0);
        ptx::fence_proxy_async_shared();
    };

    // ---- Prologue: Q_i, dO_i by the block (split in place: hi, lo beside it); warpgroup 1 the
    // first key tile into slot 0 and the second's copies.
    q_loader.load(q_smem, m0, at.seqlen_q, tid);
    do_loader.load(do_smem, m0, at.seqlen_q, tid);
    ptx::cp_async_commit();
    if (group == 1) {
        copy_tile(range.first);
        ptx::cp_async_commit();
    }
    ptx::cp_async_wait<0>();
    q_loader.split(q_smem, q_smem + QTile::kBytes, tid);
    do_loader.split(do_smem, do_smem + QTile::kBytes, tid);
    ptx::fence_proxy_async_shared();
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
        const unsigned slot = slot_smem(j, range.first);
        const unsigned k_tile = slot, v_tile = slot + 2 * KVTile::kBytes, kt_tile = slot + 4 * KVTile::kBytes;
        float s[1][kBlockN / 8][4], dp[1][kBlockN / 8][4];
        tc::zero(s);
        tc::zero(dp);
        ptx::wgmma_fence();
        tc::wgmma_ss_bt_x3<kKStepsD, QTile, KVTile>(s[0], q_smem, q_smem + QTile::kBytes, k_tile, k_tile + KVTile::kBytes);
        tc::wgmma_ss_bt_x3<kKStepsD, QTile, KVTile>(dp[0], do_smem, do_smem + QTile::kBytes, v_tile,
                                                    v_tile + KVTile::kBytes);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(s[0]);
        ptx::wgmma_pin(dp[0]);
        tc::dscores_in_place(s[0], dp[0], scale_log2, lse2, delta, masked, mask, m0 + row0, j * kBlockN, lane);
        // dQ_i += dS K_j into a fresh fragment (A: dS's n8 tile kk is k8 step kk, a_k8_of; B: K_j^T).
        typename Arith::AFragment dsa[kKStepsN];
#pragma unroll
        for (int kk = 0; kk < kKStepsN; ++kk) {
            typename Arith::AFragment a[1];
            tc::a_k8_of(a, dp, kk);
            dsa[kk] = a[0];
        }
        float dq_step[kHeadDim / 8][4];
        tc::zero(dq_step);
        ptx::wgmma_fence();
        tc::wgmma_rs_bt_x3<kKStepsN, KtTile>(dq_step, dsa, kt_tile, kt_tile + KtTile::kBytes);
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
