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
// and the columns of slice w / kKeyWarps, and adds only its slice's columns into dK and dV. The
// kSlices warps of a key group (w = key group + kKeyWarps slice) share S^T and dP^T (kShare,
// bwd_dkdv_dmma_shares): warp `slice` computes them over the whole head dim (both are sums over
// it) for its 1 / kSlices of the query tiles only (queries qs0 ..), P^T and dS^T on those, and the
// group exchanges them through its keys' columns of dSs (each warp writes its own query rows) at
// the group's own named barrier (id 1 + key group, kSlices warps): P first, then dS in its place,
// so dSs ends as dS by query row for dQ, as without slices. Tiles whose query tiles do not
// divide among the slices (one 8-query tile: sm_80 d224) have two slices, which split the
// products instead (kSplitProducts): the first slice's warp computes S^T, the second's dP^T, and
// they exchange them whole through the same columns (S, then dP); both then compute P^T and dS^T
// of every query, the first slice's warps store dS for dQ and for a bias's gradient
// (BiasGradIf). Either way every product of a step is issued once. The slices
// share the block's K_j, V_j, Q_i, dO_i in shared memory (one block per SM either way at these
// widths: twice the warps of a grid axis over the slices, the tiles loaded once). Each element of
// P^T and dS^T is the one product and expression either way, every sum keeps one fixed order:
// the deterministic path stays bitwise reproducible.
//
// Shared memory, row-major, rows padded by 2 doubles (fwd_dmma's pitch):
//   Ks, Vs [kBlockN][kHeadDim + 2]   Qs, dOs [kBlockM][kHeadDim + 2]
//   dSs [kBlockM][kBlockN + 2]       lse_s, delta_s [kBlockM]
// Everything is zero-padded (past D, Dv, Lq, Lk), so no arithmetic touches uninitialised memory.
// Per step: two block barriers (and three of each key group in sliced tiles);
// the next step's Q, dO, lse, delta stream in (cp.async) during the dQ product, as in
// bwd_dkdv_simt.
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

// Whether the column slices' warps of a key group share S^T and dP^T (each computes its 1 / slices
// of the query tiles and they exchange P^T and dS^T: the work split, above): sliced tiles whose
// 8-query tiles divide among the slices. The host's mirror: tiles.dkdv_dmma_shares.
constexpr bool bwd_dkdv_dmma_shares(int block_m, int block_n, int warps) {
    return bwd_dkdv_dmma_slices(block_n, warps) > 1 && (block_m / 8) % bwd_dkdv_dmma_slices(block_n, warps) == 0;
}

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
    // Whether the kSlices warps of a key group share S^T and dP^T (below), each computing kQs of
    // the QT query tiles; else (one query tile) each computes all of them.
    constexpr bool kShare = bwd_dkdv_dmma_shares(kBlockM, kBlockN, kWarps);
    constexpr int kQs = kShare ? QT / kSlices : QT;  // query tiles of S^T, dP^T a warp computes
    // Else two slices split the products (the first S^T, the second dP^T) and exchange them.
    constexpr bool kSplitProducts = kSlices == 2 && !kShare;
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
    static_assert(kSlices == 1 || kShare || kSlices == 2,
                  "sliced tiles share S^T, dP^T by query tiles (bwd_dkdv_dmma_shares) or by product (two slices)");
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
    const int qs0 = kShare ? (warp / kKeyWarps) * 8 * kQs : 0;  // its first query of S^T, dP^T

    const FwdParams& f = p.fwd;
    const int n0 = blockIdx.y * kBlockN;
    const int heads = p.heads_per_block;
    BwdBatchIndex at;  // the group's first row's
    if (!starts_key_block<T, T, kBlockN>(p, blockIdx.x * heads, blockIdx.y, n0, at)) return;  // params.cuh
    const bool with_dq = p.dq_accum != nullptr;
    const int Lq = at.seqlen_q, Lk = at.seqlen_k, D = f.head_dim, Dv = f.head_dim_v;

    const Mask<kHasWindow, kScoreMods> mask(f, at);
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
    const T* q_rows = Qs + (qs0 + g) * kLd + 2 * tq;          // Q[qs0 + 8 qi + g][8c + 2t ..]
    const T* do_rows = dOs + (qs0 + g) * kLd + 2 * tq;
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

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T on the warp's keys x every query of the tile (x
        // its kQs query tiles from qs0 where the key group shares them).
        T s[NK][kQs][2], dp[NK][kQs][2];
        dmma::zero(s);
        dmma::zero(dp);
        if constexpr (kSplitProducts) {
            // One query tile, nothing to share by queries: the group's two warps split the
            // products instead, the first slice's S^T, the second's dP^T, and exchange them whole
            // through the group's keys' columns of dSs (S, then dP in its place) at the group's
            // barrier; each then holds both, as if it had computed them.
            const int group_bar = 1 + key_warp;  // ids 1 .. kKeyWarps; 0 is __syncthreads'
            T x[NK][QT][2];
            dmma::zero(x);
            dmma::rows_times_rows<NK, QT, kHeadDim>(x, first_slice ? k_rows : v_rows, first_slice ? q_rows : do_rows,
                                                    kLd);
            if (first_slice) dmma::to_rows<NK, QT>(dSs + key_row, kLdS, x, tq);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);
            if (!first_slice) dmma::from_rows<NK, QT>(s, dSs + key_row, kLdS, tq);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);  // S read: the group's columns free
            if (!first_slice) dmma::to_rows<NK, QT>(dSs + key_row, kLdS, x, tq);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);  // dP written
            if (first_slice) dmma::from_rows<NK, QT>(dp, dSs + key_row, kLdS, tq);
#pragma unroll
            for (int ki = 0; ki < NK; ++ki)
#pragma unroll
                for (int qi = 0; qi < QT; ++qi)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (first_slice) s[ki][qi][e] = x[ki][qi][e];
                        else dp[ki][qi][e] = x[ki][qi][e];
                    }
        } else {
            dmma::rows_times_rows<NK, kQs, kHeadDim>(s, k_rows, q_rows, kLd);
            dmma::rows_times_rows<NK, kQs, kHeadDim>(dp, v_rows, do_rows, kLd);
        }

        // P = exp(S * scale - lse_i) and dS = P o (dP - delta_i), in place of S^T and dP^T. Rows
        // past Lq or that saw no key give 0 (lse_for_row); on steps that cross an edge of the
        // visible region, masked pairs give 0. Lane (g, t) holds key 8 ki + g, queries qs0 + 8 qi +
        // 2t + e.
        const bool masked = step.i < range.full_first || step.i >= range.full_last;
        const int bh = blockIdx.x * heads + step.g;
        const ScoreMod<T> mod(f, bh, T(f.scale), T(1), mask.diag);
        if (kScoreMods && mod.modifies()) {  // softcap, bias, ALiBi or mask (not sinks alone)
            if constexpr (kScoreMods) {      // (plain Variants compile none of this)
                const auto stats = [&](int r, int c) {
                    const int row = qs0 + 8 * (c / 2) + 2 * tq + c % 2;
                    return simt_bwd::PairStats<T>{m0 + row, n0 + key_row + 8 * r,
                                                  simt_bwd::lse_for_row(lse_s[row], m0 + row < Lq), delta_s[row]};
                };
                if constexpr (kSlices == 1 || kShare)  // (shared: each pair in one warp)
                    simt_bwd::modified_p_ds(mod, mask, masked, reinterpret_cast<T(&)[NK][2 * kQs]>(s),
                                            reinterpret_cast<T(&)[NK][2 * kQs]>(dp), stats, BiasGrad<T>(p, bh));
                else  // the slices compute the same dS: the first stores it
                    simt_bwd::modified_p_ds(mod, mask, masked, reinterpret_cast<T(&)[NK][2 * QT]>(s),
                                            reinterpret_cast<T(&)[NK][2 * QT]>(dp), stats,
                                            BiasGradIf<T>(p, bh, first_slice));
            }
        } else {
#pragma unroll
            for (int qi = 0; qi < kQs; ++qi) {
                const int row = qs0 + 8 * qi + 2 * tq;
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

        if constexpr (kShare) {
            // The key group's warps exchange their query tiles' P^T and dS^T through the group's
            // keys' columns of dSs (each warp its own query rows), at the group's own barrier
            // (kSlices warps; the other groups run on), P first, then dS in its place:
            //   P part -> dSs | sync | dSs -> P^T | sync | dS part -> dSs, dV += P^T dO
            //   | sync | dSs -> dS^T, dK += dS^T Q.
            // dSs ends as dS by query row for the dQ product, as in unsliced tiles. Every element
            // is the one product and expression it was when each slice computed all of them: the
            // same values, in the same fixed order of every sum.
            const int group_bar = 1 + key_warp;  // ids 1 .. kKeyWarps; 0 is __syncthreads'
            dmma::to_rows<NK, kQs>(dSs + qs0 * kLdS + key_row, kLdS, s, tq);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);
            T x[NK][QT][2];  // P^T, then dS^T, of every query of the tile
            dmma::from_rows<NK, QT>(x, dSs + key_row, kLdS, tq);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);  // the group's P read: its columns free
            dmma::to_rows<NK, kQs>(dSs + qs0 * kLdS + key_row, kLdS, dp, tq);
            dmma::acc_times_rows<NK, QT, DT>(dV, x, do_cols, kLd);
            ptx::named_barrier_sync(group_bar, 32 * kSlices);  // the group's dS written
            dmma::from_rows<NK, QT>(x, dSs + key_row, kLdS, tq);
            dmma::acc_times_rows<NK, QT, DT>(dK, x, q_cols, kLd);
        } else {
            // dS by query row for the dQ product (every warp's keys; the first slice's).
            if (with_dq && first_slice) dmma::to_rows<NK, QT>(dSs + key_row, kLdS, dp, tq);

            // dV_j += P^T dO_i and dK_j += dS^T Q_i: P^T and dS^T straight from the accumulators.
            dmma::acc_times_rows<NK, QT, DT>(dV, s, do_cols, kLd);
            dmma::acc_times_rows<NK, QT, DT>(dK, dp, q_cols, kLd);
        }
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
    // write zeros. A slice of a split GQA group (BwdParams::dkv_adds) adds them into the group's
    // fp64 sums instead.
    T* __restrict__ dk = static_cast<T*>(p.dk) + at.dk;
    T* __restrict__ dv = static_cast<T*>(p.dv) + at.dv;
    const bool adds = p.dkv_adds;
    dmma::for_each_column(dK, tq, [&](int ki, int col, T x) {
        const int key = n0 + key_row + 8 * ki;
        col += c0;
        simt_bwd::store_or_add(dk + (long long)key * p.dk_row_stride + col, x * scale, key < Lk && col < D, adds);
    });
    dmma::for_each_column(dV, tq, [&](int ki, int col, T x) {
        const int key = n0 + key_row + 8 * ki;
        col += c0;
        simt_bwd::store_or_add(dv + (long long)key * p.dv_row_stride + col, x, key < Lk && col < Dv, adds);
    });
}

}  // namespace cuflash
