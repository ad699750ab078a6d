// Exact FlashAttention-2 backward for float64 on the fp64 tensor cores (DMMA): deterministic dQ
// over query tiles (the reproducible path: no atomics, every sum in a fixed order; bwd_dkdv_dmma
// then runs with dq_accum = null). The DMMA twin of bwd_dq_simt.
//
// A block owns kBlockM query rows of one (batch..., head): Q_i, dO_i, lse_i, delta_i in shared
// memory, dQ_i in registers, and walks the key tiles j those rows may see (Mask::tiles):
//
//   S  = Q_i K_j^T             P  = exp(S * scale - lse_i)   (P = 0 where masked)
//   dP = dO_i V_j^T            dS = P o (dP - delta_i)
//   dQ_i += dS K_j             and dQ_i *= scale at the end.
// Under the score modifiers (kScoreMods, score_mod.cuh) P and dS come from the modified scores x,
// once S and dP are both computed: P = exp(x - lse_i), dS = P o (dP - delta_i) o dx / d(scale S).
//
// Work split: fwd_dmma's. Warp w owns kBlockM / kWarps query rows (MT 8-row tiles), every key
// of the tile and every column of dQ; S and dP are accumulators in dmma_tile.cuh's layout, and
// the accumulator layout of dS is the A operand of dQ += dS K_j as it is (acc_times_rows: no
// shared round trip). Shared memory, rows padded by 2 doubles:
//   Qs, dOs [kBlockM][kHeadDim + 2]   Ks, Vs [kBlockN][kHeadDim + 2]   lse_s, delta_s [kBlockM]
// Per key tile: three barriers; V_{j+1} streams in during dQ += dS K_j, K_{j+1} after it.
#include "bwd_simt.cuh"
#include "dmma_tile.cuh"
#include "schedule.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dq_dmma_smem_bytes() {
    // Qs, dOs, Ks, Vs [.][d + 2], lse and delta [m].
    return sizeof(Element) * (2 * (kBlockM + kBlockN) * (kHeadDim + 2) + 2 * kBlockM);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dq_dmma(const BwdParams p) {
    using T = Element;
    static_assert(sizeof(T) == 8, "DMMA is the float64 kernel");
    constexpr int kThreads = kWarps * 32;
    constexpr int WM = kBlockM / kWarps;  // query rows per warp
    constexpr int MT = WM / 8;            // ... in 8-row tiles
    constexpr int NT = kBlockN / 8;       // 8-key tiles
    constexpr int DT = kHeadDim / 8;      // 8-column tiles of dQ
    static_assert(MT * 8 * kWarps == kBlockM && MT >= 1, "kBlockM = 8 * MT * kWarps");
    static_assert(NT * 8 == kBlockN && kHeadDim % 16 == 0, "kBlockN % 8 == 0, kHeadDim % 16 == 0");
    static_assert(kStages == 1, "single-buffered: V_{j+1} overlaps the dQ product of tile j");

    constexpr int kLd = kHeadDim + 2;  // row pitch of every tile
    constexpr unsigned kSmemBytes = bwd_dq_dmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* dOs = Qs + kBlockM * kLd;
    T* Ks = dOs + kBlockM * kLd;
    T* Vs = Ks + kBlockN * kLd;
    T* lse_s = Vs + kBlockN * kLd;
    T* delta_s = lse_s + kBlockM;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int tq = lane & 3;

    const FwdParams& f = p.fwd;
    const auto [bh, tile_m] = query_tile_block<kHasWindow>();  // schedule.cuh
    const int m0 = tile_m * kBlockM;
    BwdBatchIndex at;
    if (!starts_query_block<T, kBlockM>(p, bh, tile_m, m0, at)) return;  // params.cuh
    const T* __restrict__ k = static_cast<const T*>(f.k) + at.k;
    const T* __restrict__ v = static_cast<const T*>(f.v) + at.v;
    const int Lq = at.seqlen_q, Lk = at.seqlen_k, D = f.head_dim, Dv = f.head_dim_v;

    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // This lane's fragments (dmma_tile.cuh): its rows of Q and dO as A, keys as B rows; K as the
    // row-major B of dS K.
    const int row_base = warp * WM + g;               // + 8 mi: the lane's rows in the tile
    const T* q_rows = Qs + row_base * kLd + 2 * tq;   // Q[row][8c + 2t ..]
    const T* do_rows = dOs + row_base * kLd + 2 * tq;
    const T* k_rows = Ks + g * kLd + 2 * tq;          // K[8 ni + g][8c + 2t ..]
    const T* v_rows = Vs + g * kLd + 2 * tq;
    const T* k_cols = Ks + 2 * tq * kLd + 2 * g;      // K[8 ni + 2t + e][16c + 2g ..]

    T dQ[MT][DT][2];
    dmma::zero(dQ);
    const T scale = f.scale;  // exact and signed (simt::Math<double>)
    const ScoreMod<T> mod(f, bh, T(f.scale), T(1), mask.diag);
    const bool modified = kScoreMods && mod.modifies();  // softcap, bias, ALiBi or mask (not sinks alone)

    if (range.first < range.last) {
        simt_bwd::load_query_side<T, kHeadDim, kThreads>(Qs, dOs, kLd, lse_s, delta_s, p, at, m0, kBlockM, Lq, D, Dv,
                                                         tid);
        const int n0 = range.first * kBlockN;
        simt::load_rows<T, kHeadDim, kThreads>(Ks, kLd, k, f.k_row_stride, n0, kBlockN, Lk, D, tid);
        simt::load_rows<T, kHeadDim, kThreads>(Vs, kLd, v, f.v_row_stride, n0, kBlockN, Lk, Dv, tid);
        ptx::cp_async_commit();
    }

    for (int t = range.first; t < range.last; ++t) {
        const int n0 = t * kBlockN;
        ptx::cp_async_wait<0>();  // K_j, V_j (and Q_i, dO_i, lse_i, delta_i the first time)
        __syncthreads();

        // S = Q_i K_j^T and dP = dO_i V_j^T on the warp's rows x every key of the tile.
        T s[MT][NT][2], dp[MT][NT][2];
        dmma::zero(s);
        dmma::zero(dp);
        dmma::rows_times_rows<MT, NT, kHeadDim>(s, q_rows, k_rows, kLd);
        dmma::rows_times_rows<MT, NT, kHeadDim>(dp, do_rows, v_rows, kLd);

        // P = exp(S * scale - lse_i), dS = P o (dP - delta_i), in place of S and dP: 0 for rows
        // past Lq or that saw no key, and for masked pairs on tiles that cross an edge of the
        // visible region. Lane (g, t) holds row 8 mi + g, keys 8 ni + 2t + e.
        const bool masked = t < range.full_first || t >= range.full_last;
        if (modified) {
            if constexpr (kScoreMods) {  // (plain Variants compile none of this)
                simt_bwd::modified_p_ds(mod, mask, masked, reinterpret_cast<T(&)[MT][2 * NT]>(s),
                                        reinterpret_cast<T(&)[MT][2 * NT]>(dp), [&](int r, int c) {
                    const int row = row_base + 8 * r;
                    return simt_bwd::PairStats<T>{m0 + row, n0 + 8 * (c / 2) + 2 * tq + c % 2,
                                                  simt_bwd::lse_for_row(lse_s[row], m0 + row < Lq), delta_s[row]};
                });
            }
        } else {
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
                const int row = row_base + 8 * mi;
                const T lse = simt_bwd::lse_for_row(lse_s[row], m0 + row < Lq);
                const T delta = delta_s[row];
#pragma unroll
                for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        T pv = ::exp(fma(s[mi][ni][e], scale, -lse));
                        if (masked && !mask.visible(m0 + row, n0 + 8 * ni + 2 * tq + e)) pv = T(0);
                        dp[mi][ni][e] = pv * (dp[mi][ni][e] - delta);
                    }
            }
        }
        __syncthreads();  // nobody reads V_j any more
        if (t + 1 < range.last) {
            simt::load_rows<T, kHeadDim, kThreads>(Vs, kLd, v, f.v_row_stride, n0 + kBlockN, kBlockN, Lk, Dv, tid);
            ptx::cp_async_commit();
        }

        // dQ_i += dS K_j: dS straight from the accumulators.
        dmma::acc_times_rows<MT, NT, DT>(dQ, dp, k_cols, kLd);
        __syncthreads();  // K_j free
        if (t + 1 < range.last) {
            simt::load_rows<T, kHeadDim, kThreads>(Ks, kLd, k, f.k_row_stride, n0 + kBlockN, kBlockN, Lk, D, tid);
            ptx::cp_async_commit();
        }
    }

    // dQ_i = scale * sum_j dS K_j. Rows that see no key write zeros. (dq's offset recomputed, not
    // held through the loop: at d96 on sm_90a those two registers spilled.)
    T* __restrict__ dq = static_cast<T*>(p.dq) + BwdBatchIndex(p, query_tile_block<kHasWindow>().bh).dq;
    dmma::for_each_column(dQ, tq, [&](int mi, int col, T x) {
        const int row = m0 + row_base + 8 * mi;
        if (row < Lq && col < D) dq[(long long)row * p.dq_row_stride + col] = x * scale;
    });
}

}  // namespace cuflash
