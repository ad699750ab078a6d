// Exact FlashAttention-2 backward for float64 on the fp64 tensor cores (DMMA, mma.sync m8n8k4
// .f64; m16n8k8 on sm_90): dK, dV (and dQ by fp64 atomics) over key tiles. Every product is an
// IEEE fp64 fused multiply-add, as in bwd_dkdv_simt (the DFMA kernel), on the tensor pipe.
//
// A block owns kBlockN keys of one key/value head and a group of heads_per_block query heads
// that read it (attention rows bh0 + g, bh0 = blockIdx.x * heads_per_block; GQA): K_j, V_j stay in
// shared memory, dK_j and dV_j in registers, summed over every head of the group and written
// once, as the group's (params.cuh). The block walks the steps (g, i) -- head g, query tile i
// that can see a key of the block (Mask::query_tiles); heads outer -- recomputing
//
//   S^T  = K_j Q_i^T                 P^T  = exp(S^T * scale - lse_i)    (0 where masked)
//   dP^T = V_j dO_i^T                dS^T = P^T o (dP^T - delta_i)      delta_i from bwd_delta
//   dV_j += P^T dO_i                 dK_j += dS^T Q_i
//   dQ_i += dS K_j                   fp64 atomics into dq_accum (unscaled; bwd_dq_convert scales)
//   dK_j *= scale at the end.
// Under the score modifiers (kScoreMods, score_mod.cuh; head g's slope) P and dS come from the
// modified scores x once S and dP are both known: P = exp(x - lse_i), dS = P o (dP - delta_i) o
// dx / d(scale S), and dS into the bias's gradient where it is wanted (BiasGrad).
//
// Work split. Warp w owns keys [w WN, (w + 1) WN) of the block (NK = WN / 8 row tiles of 8) and
// computes S^T and dP^T transposed, keys x queries, over the whole query tile: then P^T and dS^T
// sit in the accumulator layout (lane (g, t): key g, queries 2t and 2t + 1 of each 8 x 8 tile),
// which is the A operand of dV += P^T dO and dK += dS^T Q as they are (dmma_tile.cuh's
// acc_times_rows, fwd_dmma's acc += P V): dK and dV never leave registers and need no shared
// round trip. Only dQ sums over the keys of every warp: dS goes to shared memory by query row,
// and the dQ contribution is split in units of kDqRows queries x kDqCols columns over the warps
// (dS as a row-major A, K_j as B), added with atomics.
//
// Column slices (heads above d160, where a warp's dK and dV of all columns pass the registers):
// a block of more warps than 8-key row tiles (8 kWarps > kBlockN) splits dK's and dV's columns
// into kSlices = 8 kWarps / kBlockN slices of kCols. Warp w owns keys of key group w % kKeyWarps
// and the columns of slice w / kKeyWarps: it computes S^T and dP^T of its keys over the whole
// head dim (both are sums over it), as the other slices' warps of the same keys do, then adds only
// its slice's columns into dK and dV. The slices share the block's K_j, V_j, Q_i, dO_i in shared
// memory (one block per SM either way at these widths: twice the warps of a grid axis over the
// slices, the tiles loaded once). dS is the same in every slice: the first slice's warps store it
// for dQ (which all warps then share over every column, as without slices) and for a bias's
// gradient (BiasGradIf). Every sum keeps one fixed order: the deterministic path stays bitwise
// reproducible.
//
// Shared memory, row-major, rows padded by 2 doubles (fwd_dmma's pitch):
//   Ks, Vs [kBlockN][kHeadDim + 2]   Qs, dOs [kBlockM][kHeadDim + 2]
//   dSs [kBlockM][kBlockN + 2]       lse_s, delta_s [kBlockM]
// Everything is zero-padded (past D, Dv, Lq, Lk), so no arithmetic touches uninitialised memory.
// Per step: two barriers; the next step's Q, dO, lse, delta stream in (cp.async) during the dQ
// product, as in bwd_dkdv_simt.
#include "bwd_simt.cuh"
#include "dmma_tile.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_dmma_smem_bytes() {
    // Ks, Vs, Qs, dOs [.][d + 2], dSs [m][n + 2], lse and delta [m].
    return sizeof(Element) * (2 * (kBlockN + kBlockM) * (kHeadDim + 2) + kBlockM * (kBlockN + 2) + 2 * kBlockM);
}

// The column slices of a tile (above): 8 kWarps / kBlockN where the block has more warps than
// 8-key row tiles, else 1. The host's mirror: tiles.dkdv_dmma_slices.
constexpr int bwd_dkdv_dmma_slices(int block_n, int warps) { return 8 * warps > block_n ? 8 * warps / block_n : 1; }

// Whether a kBlockM x kHeadDim product splits into units of rows x cols that `warps` warps
// share evenly.
constexpr bool even_split(int block_m, int head_dim, int warps, int rows, int cols) {
    return block_m % rows == 0 && head_dim % cols == 0 && (block_m / rows) * (head_dim / cols) % warps == 0;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_dmma(const BwdParams p) {
    using T = Element;
    static_assert(sizeof(T) == 8, "DMMA is the float64 kernel");
    constexpr int kThreads = kWarps * 32;
    constexpr int kSlices = bwd_dkdv_dmma_slices(kBlockN, kWarps);  // column slices of dK, dV
    constexpr int kKeyWarps = kWarps / kSlices;  // warps per slice: each owns WN keys
    constexpr int kCols = kHeadDim / kSlices;    // columns of dK, dV per slice
    constexpr int WN = kBlockN / kKeyWarps;      // keys per warp: rows of S^T, dP^T, dK, dV
    constexpr int NK = WN / 8;                   // ... in 8-row tiles
    constexpr int QT = kBlockM / 8;              // 8-query tiles (columns of S^T, k tiles of dK, dV)
    constexpr int DT = kCols / 8;                // 8-column tiles of dK, dV
    // A unit of the dQ product: kDqRows queries x kDqCols columns, the largest of 16 x 32, 16 x 16,
    // 8 x 32 whose count the warps share evenly (16 rows: m16n8k8 on sm_90), else 8 x 16. Sliced
    // tiles take 16 columns at most: beside dK and dV of 128 columns (d256) a 16 x 32 unit's
    // accumulators spill 56-72 bytes on sm_90a.
    constexpr int kDqWidest = kSlices == 1 ? 32 : 16;
    constexpr int kDqRows = even_split(kBlockM, kHeadDim, kWarps, 16, kDqWidest) ||
                                    even_split(kBlockM, kHeadDim, kWarps, 16, 16) ? 16 : 8;
    constexpr int kDqCols = even_split(kBlockM, kHeadDim, kWarps, kDqRows, kDqWidest) ? kDqWidest : 16;
    constexpr int kDqUnits = (kBlockM / kDqRows) * (kHeadDim / kDqCols);
    static_assert(NK * 8 * kKeyWarps == kBlockN && NK >= 1, "kBlockN = 8 * NK * kWarps, or 8 kWarps / kSlices");
    static_assert(kSlices * kKeyWarps == kWarps && kCols * kSlices == kHeadDim && kCols % 16 == 0,
                  "whole slices of 16-column pairs");
    static_assert(QT * 8 == kBlockM && kHeadDim % 16 == 0, "kBlockM % 8 == 0, kHeadDim % 16 == 0");
    static_assert(kStages == 1, "single-buffered: Q_{i+1} overlaps the dQ product of step i");

    constexpr int kLd = kHeadDim + 2;  // Ks, Vs, Qs, dOs row pitch
    constexpr int kLdS = kBlockN + 2;  // dSs row pitch
    constexpr unsigned kSmemBytes = bwd_dkdv_dmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + kBlockN * kLd;
    T* Qs = Vs + kBlockN * kLd;
    T* dOs = Qs + kBlockM * kLd;
    T* dSs = dOs + kBlockM * kLd;
    T* lse_s = dSs + kBlockM * kLdS;
    T* delta_s = lse_s + kBlockM;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;  // fragment row (accumulator, A) / column (B)
    const int tq = lane & 3;  // position in the quad
    // The warp's key group and column slice (the first dK / dV column of its slice: c0).
    const int key_warp = kSlices == 1 ? warp : warp % kKeyWarps;
    const bool first_slice = kSlices == 1 || warp < kKeyWarps;
    const int c0 = kSlices == 1 ? 0 : (warp / kKeyWarps) * kCols;

    const FwdParams& f = p.fwd;
    const int n0 = blockIdx.y * kBlockN;
    const int heads = p.heads_per_block;
    BwdBatchIndex at;  // the group's first row's
    if (!starts_key_block<T, T, kBlockN>(p, blockIdx.x * heads, blockIdx.y, n0, at)) return;  // params.cuh
    const bool with_dq = p.dq_accum != nullptr;
    const int Lq = at.seqlen_q, Lk = at.seqlen_k, D = f.head_dim, Dv = f.head_dim_v;

    const Mask<kHasWindow> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, Lq);

    // Q_i, dO_i, lse_i, delta_i of step (g, i): head g's rows (BwdBatchIndex::head).
    auto load_query_tile = [&](const HeadTileStep& s) {
        simt_bwd::load_query_side<T, kHeadDim, kThreads>(Qs, dOs, kLd, lse_s, delta_s, p, at.head(p, s.g),
                                                         s.i * kBlockM, kBlockM, Lq, D, Dv, tid);
        ptx::cp_async_commit();
    };

    // This lane's fragments (dmma_tile.cuh): the warp's keys as A rows of S^T, dP^T; the queries
    // as B rows; Q, dO (the warp's slice of columns) and K as the row-major B of acc_times_rows.
    const int key_row = key_warp * WN + g;                    // + 8 ki: the lane's keys in the tile
    const T* k_rows = Ks + key_row * kLd + 2 * tq;            // K[key][8c + 2t ..]
    const T* v_rows = Vs + key_row * kLd + 2 * tq;
    const T* q_rows = Qs + g * kLd + 2 * tq;                  // Q[8 qi + g][8c + 2t ..]
    const T* do_rows = dOs + g * kLd + 2 * tq;
    const T* q_cols = Qs + 2 * tq * kLd + 2 * g + c0;         // Q[8 qi + 2t + e][c0 + 16c + 2g ..]
    const T* do_cols = dOs + 2 * tq * kLd + 2 * g + c0;
    const T* k_cols = Ks + 2 * tq * kLd + 2 * g;              // K[8 kt + 2t + e][16c + 2g ..]

    // dK_j, dV_j: the warp's NK key tiles x DT column tiles of its slice (columns permuted:
    // dmma::column, from c0).
    T dK[NK][DT][2], dV[NK][DT][2];
    dmma::zero(dK);
    dmma::zero(dV);
    const T scale = f.scale;  // exact and signed, as bwd_dkdv_simt's (simt::Math<double>)

    const HeadTileStep first_step(range.first, range.last, heads);
    if (first_step.g < heads) {
        // K_j, V_j: zero past Lk and past D / Dv, so padded keys and columns add exact zeros.
        simt::load_rows<T, kHeadDim, kThreads>(Ks, kLd, static_cast<const T*>(f.k) + at.k, f.k_row_stride, n0, kBlockN,
                                               Lk, D, tid);
        simt::load_rows<T, kHeadDim, kThreads>(Vs, kLd, static_cast<const T*>(f.v) + at.v, f.v_row_stride, n0, kBlockN,
                                               Lk, Dv, tid);
        load_query_tile(first_step);
    }

    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last)) {
        const int m0 = step.i * kBlockM;
        ptx::cp_async_wait<0>();  // Q_i, dO_i, lse_i, delta_i (and K_j, V_j the first time)
        __syncthreads();          // ... from every thread; the last step's readers of dSs are done

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T on the warp's keys x every query of the tile.
        T s[NK][QT][2], dp[NK][QT][2];
        dmma::zero(s);
        dmma::zero(dp);
        dmma::rows_times_rows<NK, QT, kHeadDim>(s, k_rows, q_rows, kLd);
        dmma::rows_times_rows<NK, QT, kHeadDim>(dp, v_rows, do_rows, kLd);

        // P = exp(S * scale - lse_i) and dS = P o (dP - delta_i), in place of S^T and dP^T. Rows
        // past Lq or that saw no key give 0 (lse_for_row); on steps that cross an edge of the
        // visible region, masked pairs give 0. Lane (g, t) holds key 8 ki + g, queries 8 qi + 2t + e.
        const bool masked = step.i < range.full_first || step.i >= range.full_last;
        const int bh = blockIdx.x * heads + step.g;
        const ScoreMod<T> mod(f, bh, T(f.scale), T(1), mask.diag);
        if (kScoreMods && mod.modifies()) {  // softcap, bias, ALiBi or mask (not sinks alone)
            if constexpr (kScoreMods) {      // (plain Variants compile none of this)
                const auto stats = [&](int r, int c) {
                    const int row = 8 * (c / 2) + 2 * tq + c % 2;
                    return simt_bwd::PairStats<T>{m0 + row, n0 + key_row + 8 * r,
                                                  simt_bwd::lse_for_row(lse_s[row], m0 + row < Lq), delta_s[row]};
                };
                if constexpr (kSlices == 1)
                    simt_bwd::modified_p_ds(mod, mask, masked, reinterpret_cast<T(&)[NK][2 * QT]>(s),
                                            reinterpret_cast<T(&)[NK][2 * QT]>(dp), stats, BiasGrad<T>(p, bh));
                else  // the slices compute the same dS: the first stores it
                    simt_bwd::modified_p_ds(mod, mask, masked, reinterpret_cast<T(&)[NK][2 * QT]>(s),
                                            reinterpret_cast<T(&)[NK][2 * QT]>(dp), stats,
                                            BiasGradIf<T>(p, bh, first_slice));
            }
        } else {
#pragma unroll
            for (int qi = 0; qi < QT; ++qi) {
                const int row = 8 * qi + 2 * tq;
                const double2 lse2 = *reinterpret_cast<const double2*>(lse_s + row);
                const double2 delta2 = *reinterpret_cast<const double2*>(delta_s + row);
                const T lse[2] = {simt_bwd::lse_for_row(lse2.x, m0 + row < Lq),
                                  simt_bwd::lse_for_row(lse2.y, m0 + row + 1 < Lq)};
                const T delta[2] = {delta2.x, delta2.y};
#pragma unroll
                for (int ki = 0; ki < NK; ++ki)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        T pv = ::exp(fma(s[ki][qi][e], scale, -lse[e]));
                        if (masked && !mask.visible(m0 + row + e, n0 + key_row + 8 * ki)) pv = T(0);
                        s[ki][qi][e] = pv;
                        dp[ki][qi][e] = pv * (dp[ki][qi][e] - delta[e]);
                    }
            }
        }

        // dS by query row for the dQ product (every warp's keys; the first slice's).
        if (with_dq && first_slice) {
#pragma unroll
            for (int ki = 0; ki < NK; ++ki)
#pragma unroll
                for (int qi = 0; qi < QT; ++qi)
#pragma unroll
                    for (int e = 0; e < 2; ++e) dSs[(8 * qi + 2 * tq + e) * kLdS + key_row + 8 * ki] = dp[ki][qi][e];
        }

        // dV_j += P^T dO_i and dK_j += dS^T Q_i: P^T and dS^T straight from the accumulators.
        dmma::acc_times_rows<NK, QT, DT>(dV, s, do_cols, kLd);
        dmma::acc_times_rows<NK, QT, DT>(dK, dp, q_cols, kLd);
        __syncthreads();  // dSs visible; Qs, dOs free

        // The next step's tiles (the next head's first when i is the last) land during the dQ product.
        const HeadTileStep next = step.after(1, range.first, range.last);
        if (next.g < heads) load_query_tile(next);

        // dQ_i += dS K_j (unscaled), added to head g's rows of the fp64 workspace with atomics.
        if (with_dq) {
            constexpr int MU = kDqRows / 8, CU = kDqCols / 8;
            T* __restrict__ dq_accum = static_cast<T*>(p.dq_accum) + at.head(p, step.g).dq_accum;
#pragma unroll 1
            for (int u = warp; u < kDqUnits; u += kWarps) {
                const int row0 = (u % (kBlockM / kDqRows)) * kDqRows, col0 = (u / (kBlockM / kDqRows)) * kDqCols;
                T acc[MU][CU][2];
                dmma::zero(acc);
#pragma unroll 2
                for (int kt = 0; kt < kBlockN / 8; ++kt) {
                    // dS[row0 + 8 mi + g][8 kt + 2t + e]: the A operand of k tile kt, one double2.
                    T a[MU][1][2];
#pragma unroll
                    for (int mi = 0; mi < MU; ++mi) {
                        const double2 x =
                            *reinterpret_cast<const double2*>(dSs + (row0 + 8 * mi + g) * kLdS + 8 * kt + 2 * tq);
                        a[mi][0][0] = x.x;
                        a[mi][0][1] = x.y;
                    }
                    dmma::acc_times_rows<MU, 1, CU>(acc, a, k_cols + 8 * kt * kLd + col0, kLd);
                }
                dmma::for_each_column(acc, tq, [&](int mi, int col, T x) {
                    const int row = m0 + row0 + 8 * mi + g;
                    if (row < Lq && col0 + col < D) atomicAdd(dq_accum + (long long)row * D + col0 + col, x);
                });
            }
        }
    }

    // dK_j = scale * sum dS^T Q (the softmax's scale); dV_j as is. Key tiles that no query sees
    // write zeros.
    T* __restrict__ dk = static_cast<T*>(p.dk) + at.dk;
    T* __restrict__ dv = static_cast<T*>(p.dv) + at.dv;
    dmma::for_each_column(dK, tq, [&](int ki, int col, T x) {
        const int key = n0 + key_row + 8 * ki;
        col += c0;
        if (key < Lk && col < D) dk[(long long)key * p.dk_row_stride + col] = x * scale;
    });
    dmma::for_each_column(dV, tq, [&](int ki, int col, T x) {
        const int key = n0 + key_row + 8 * ki;
        col += c0;
        if (key < Lk && col < Dv) dv[(long long)key * p.dv_row_stride + col] = x;
    });
}

}  // namespace cuflash
