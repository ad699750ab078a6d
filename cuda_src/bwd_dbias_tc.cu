// The bias's gradient without a dS buffer (issue 15): for a bias shared by many attention rows
// (AlphaFold's pair bias over the MSA or triangle rows, Swin's over the windows), dbias sums
// dS = P o (dP - delta) over those rows. Writing every row's dS and summing it afterwards costs
// rows x Lq x Lk floats of memory (0.9 GB at triangle N = 384); here dS is recomputed tile by
// tile and summed on chip instead, from the same inputs the dQ kernel reads:
//
//   for each row r sharing the plane (a fixed order: the host's list):
//       S   = Q_i(r) K_j(r)^T,   x = the modified score (score_mod.cuh)
//       P   = exp2(x - lse_i(r) log2 e)               (0 where hidden or past Lq)
//       dP  = dO_i(r) V_j(r)^T
//       acc += P o (dP - delta_i(r))                  dS before softcap's factor, as BiasGrad
//
// One block owns one (Lq x Lk) tile (i, j) of one bias plane and one chunk of the plane's rows
// (BwdParams::dbias_rows: every row of plane p, then the next plane's; the host cuts each plane's
// rows into dbias_chunks chunks so that the grid fills the GPU). It writes its partial sum to
// dbias_sum (chunk, plane, Lq, Lk) in fp32; the host sums the chunks in a fixed order
// (bias_grad.cu) and rounds to the bias's type: no atomics, the same bits run after run.
// The rows stream through shared memory kStages deep (cp.async): Q_i, dO_i, lse_i, delta_i and
// K_j, V_j of row r per stage. The bias tile is the same for every row of the plane: it is read
// once, into shared memory (TilePlanes), not once per row. Warps split the tile's query rows, as
// in bwd_dq_tc.cu.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// Where a dbias block reads the scores' planes (score_mod.cuh's Planes interface): its bias tile
// from shared memory, kCols floats a row from (row0, col0), zeros outside Lq x Lk; a row's mask
// from global memory (the row's own plane, per row).
template <int kCols>
struct TilePlanes {
    static constexpr bool kZeroFilled = false;  // the mask's global reads keep their bounds test
    const float* bias_at;
    const unsigned char* mask_at;
    int row0, col0;
    __device__ __forceinline__ float bias(int i, int j, const FwdParams&) const { return bias_at[(i - row0) * kCols + (j - col0)]; }
    __device__ __forceinline__ bool visible(int i, int j, const FwdParams& p) const {
        return mask_at[i * p.mask_row_stride + j * p.mask_col_stride] != 0;
    }
};

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dbias_tc_smem_bytes() {
    // The bias tile (kBlockM x kBlockN floats), then per stage Q_i, dO_i, 2 * kBlockM floats (lse_i,
    // delta_i), K_j, V_j.
    constexpr int kWidth = kHeadDim * tc::Arith<Element>::kUnits;
    return kBlockM * kBlockN * 4 +
           kStages * (2 * tc::SmemTile<kBlockM, kWidth>::kBytes + 2 * kBlockM * 4 + 2 * tc::SmemTile<kBlockN, kWidth>::kBytes);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false>
__global__ void __launch_bounds__(kWarps * 32) bwd_dbias_tc(const BwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr int kUnits = Arith::kUnits;
    constexpr int kWidth = kHeadDim * kUnits;
    using Storage = typename Arith::Storage;
    using Units = const unsigned short*;
    constexpr int kThreads = kWarps * 32;
    constexpr int kRowsPerWarp = kBlockM / kWarps;
    constexpr int kMTiles = kRowsPerWarp / 16;
    constexpr int kNTiles = kBlockN / 8;
    constexpr int kKSteps = kHeadDim / Arith::kK;
    static_assert(kRowsPerWarp % 16 == 0 && kMTiles >= 1 && kBlockN % 16 == 0, "whole m16 tiles, pairs of n8 tiles");
    static_assert(kStages >= 2 && kThreads >= 2 * kBlockM, "a pipeline; one thread per lse / delta value");

    using QTile = tc::SmemTile<kBlockM, kWidth>;
    using KVTile = tc::SmemTile<kBlockN, kWidth>;
    constexpr unsigned kStatsAt = 2 * QTile::kBytes;          // lse_i then delta_i, in a stage
    constexpr unsigned kKAt = kStatsAt + 2 * kBlockM * 4;
    constexpr unsigned kStageBytes = kKAt + 2 * KVTile::kBytes;
    constexpr unsigned kBiasBytes = kBlockM * kBlockN * 4;
    static_assert(kBiasBytes + kStages * kStageBytes == bwd_dbias_tc_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>(),
                  "layout");

    extern __shared__ __align__(16) unsigned char smem_all[];
    if (ptx::dynamic_smem_size() < kBiasBytes + kStages * kStageBytes) __trap();
    float* const bias_tile = reinterpret_cast<float*>(smem_all);
    unsigned char* const smem = smem_all + kBiasBytes;  // the stages
    const unsigned smem0 = ptx::smem_addr(smem);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const FwdParams& f = p.fwd;
    const int plane = blockIdx.x / p.dbias_chunks, chunk = blockIdx.x % p.dbias_chunks;
    const int tiles_k = (f.seqlen_k + kBlockN - 1) / kBlockN;
    const int m_tile = blockIdx.y / tiles_k, n_tile = blockIdx.y % tiles_k;
    const int m0 = m_tile * kBlockM, n0 = n_tile * kBlockN, warp_row0 = warp * kRowsPerWarp;
    const int* rows = p.dbias_rows + static_cast<long long>(plane) * p.dbias_rows_per_plane;
    const int first = chunk * p.dbias_chunk_rows, last = min(p.dbias_rows_per_plane, first + p.dbias_chunk_rows);

    // Row t's tiles into stage t % kStages (all rows of a plane have the call's lengths; a
    // key-padding cut may shorten a row's keys: its loads zero-fill past it).
    auto load_row = [&](int t) {
        const unsigned slot = smem0 + (t % kStages) * kStageBytes;
        const BwdBatchIndex at(p, rows[t]);
        const tc::QueryTileLoader<kBlockM, kWidth, kThreads, QTile, kUnits> qdo(p, at);
        qdo.load(slot, slot + QTile::kBytes, smem + (t % kStages) * kStageBytes + kStatsAt, m_tile, tid);
        const tc::TileLoader<kBlockN, kWidth, kThreads> k_loader(
            reinterpret_cast<Units>(static_cast<const Storage*>(f.k) + at.k), f.k_row_stride * kUnits, f.head_dim * kUnits);
        const tc::TileLoader<kBlockN, kWidth, kThreads> v_loader(
            reinterpret_cast<Units>(static_cast<const Storage*>(f.v) + at.v), f.v_row_stride * kUnits, f.head_dim_v * kUnits);
        k_loader.load(slot + kKAt, n0, at.seqlen_k, tid);
        v_loader.load(slot + kKAt + KVTile::kBytes, n0, at.seqlen_k, tid);
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (first + s < last) load_row(first + s);
        ptx::cp_async_commit();
    }

    // The plane's bias tile, in the exponent's score type (float), zeros outside Lq x Lk: the
    // first row's planes (every row of the plane has the same bias). Published by the loop's
    // first barrier.
    const GlobalPlanes<float> first_planes = ScoreMod<float, kFastTanh<Element>>::row_planes(f, rows[first < last ? first : 0]);
    for (int e = tid; e < kBlockM * kBlockN; e += kThreads) {
        const int i = m0 + e / kBlockN, j = n0 + e % kBlockN;
        bias_tile[e] = first_planes.bias_at != nullptr && i < f.seqlen_q && j < f.seqlen_k ? first_planes.bias(i, j, f) : 0.f;
    }

    const unsigned a_lane = tc::a_lane<QTile>(warp_row0, lane);
    const unsigned b_lane = tc::bn_lane<KVTile>(lane);
    float acc[kMTiles][kNTiles][4];  // the sum of dS over this chunk's rows
    tc::zero(acc);

    for (int t = first; t < last; ++t) {
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // row t visible to all; everyone is done with the slot reloaded below
        if (t + kStages - 1 < last) load_row(t + kStages - 1);
        ptx::cp_async_commit();
        const int r = rows[t];
        const BwdBatchIndex at(p, r);
        const Mask<kHasWindow> mask(f, at);
        const TileRange range = mask.tiles(m0, kBlockM, kBlockN);
        if (n_tile < range.first || n_tile >= range.last) continue;  // no query of the tile sees a key of it
        // Tiles crossing a window edge, Lk or Lq take the per-element test.
        const bool masked = n_tile < range.full_first || n_tile >= range.full_last || m0 + kBlockM > at.seqlen_q;
        const unsigned slot = smem0 + (t % kStages) * kStageBytes;
        const float* stats = reinterpret_cast<const float*>(smem + (t % kStages) * kStageBytes + kStatsAt);

        // S = Q_i K_j^T, dP = dO_i V_j^T (as bwd_dq_tc.cu).
        float s[kMTiles][kNTiles][4], dp[kMTiles][kNTiles][4];
        tc::zero(s);
        tc::zero(dp);
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
            typename Arith::AFragment a[kMTiles];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) tc::load_a(slot + a_lane + QTile::offset(mt * 16, kk * 2), a[mt]);
            tc::mma_k16<Element, KVTile, false>(s, a, slot + kKAt + b_lane, 0, kk * 2);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) tc::load_a(slot + QTile::kBytes + a_lane + QTile::offset(mt * 16, kk * 2), a[mt]);
            tc::mma_k16<Element, KVTile, false>(dp, a, slot + kKAt + KVTile::kBytes + b_lane, 0, kk * 2);
        }

        // acc += P o (dP - delta_i), P of the modified score (the bias is there: every call of
        // this kernel has one) against row r's lse.
        float lse2[2 * kMTiles], delta[2 * kMTiles];
#pragma unroll
        for (int q = 0; q < 2 * kMTiles; ++q) {
            lse2[q] = tc::lse_log2(stats[warp_row0 + tc::slot_row(q, lane)]);
            delta[q] = stats[kBlockM + warp_row0 + tc::slot_row(q, lane)];
        }
        const ScoreMod<float, kFastTanh<Element>> mod(f, r, static_cast<float>(f.scale), 1.4426950408889634f, mask.diag);
        const TilePlanes<kBlockN> planes{bias_tile, mod.planes().mask_at, m0, n0};
        mod.template dispatch<ModBodies::kPerPlaneSet>([&](const auto& row_scores) {  // (a bias is always there)
            const auto score = tc::lane_scores(row_scores, m0 + warp_row0, n0, lane);
            tc::for_each_element<kMTiles, kNTiles>(m0 + warp_row0, n0, lane, [&](int mt, int nt, int e, int q, int row, int key) {
                float grad;
                const float x = score(s[mt][nt][e], row, key, grad);
                const bool hidden = masked && (row >= at.seqlen_q || !mask.visible(row, key));
                acc[mt][nt][e] += hidden ? 0.f : ptx::ex2(score.exponent(x, lse2[q])) * (dp[mt][nt][e] - delta[q]);
            });
        }, planes);
    }

    // This chunk's partial sum of the tile, rows past Lq and keys past Lk left out.
    float* out = static_cast<float*>(p.dbias_sum) +
                 (static_cast<long long>(chunk) * (gridDim.x / p.dbias_chunks) + plane) * f.seqlen_q * f.seqlen_k;
    tc::for_each_element<kMTiles, kNTiles>(m0 + warp_row0, n0, lane, [&](int mt, int nt, int e, int, int row, int key) {
        if (row < f.seqlen_q && key < f.seqlen_k) out[static_cast<long long>(row) * f.seqlen_k + key] = acc[mt][nt][e];
    });
}

}  // namespace cuflash
