// Shared pieces of the exact FlashAttention-2 backward for float32 and float64 (FFMA / DFMA):
// bwd_dkdv_simt.cu (dK, dV and atomic dQ over key tiles) and bwd_dq_simt.cu (deterministic dQ
// over query tiles); their float64 twins on the fp64 tensor cores (bwd_dkdv_dmma.cu, bwd_dq_dmma.cu)
// share the loaders, the row statistics and the score modifiers' P and dS.
//
// Thread layout (both kernels, every product). A block of kWarps warps is 2 * kWarps "row
// groups" of 16 lanes; lane `cg` (0..15) of row group `rg` owns a TM x TN micro-tile of each
// product's output: TM consecutive rows rg * TM + r and TN columns. Two register-tiled
// product shapes cover the whole backward with every tile stored in shared memory AS IT LIES
// in global memory (rows of head_dim elements), so no tile is kept twice:
//
//   gemm_nt  C[m][n] += sum_k A[m][k] B[n][k]   the contraction runs along rows of both
//            operands (S = Q K^T, dP = dO V^T). Per step of 16 bytes of k a lane loads TM
//            vectors of A (its own rows: one address per row group, a broadcast) and TN
//            vectors of B. Columns are n = cg + 16 c, interleaved, so the 16 lanes of a row
//            group read 16 different rows of B; with rows padded by 16 bytes those land in
//            distinct banks (two wavefronts for 256 bytes, the minimum).
//   gemm_tn  C[m][n] += sum_k A[k][m] B[k][n]   the outer-product (SGEMM) form, for the
//            products that contract over rows (dV = P^T dO, dK = dS^T Q, dQ = dS K). Per k a
//            lane loads TM contiguous values of A (a broadcast) and its TN columns of B in
//            16-byte chunks (Cols below), TM * TN FMAs.
//
// Every padded row is 16 bytes longer than its data (kPad elements), which keeps each row
// 16-byte aligned and staggers consecutive rows by four banks.
#pragma once
#include "params.cuh"
#include "mask.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"
#include "simt_tile.cuh"

namespace cuflash {
namespace simt_bwd {

using simt::Cols;  // (simt_tile.cuh, like Math)
using simt::Math;
using simt::lds;
using simt::load_rows;
using simt::sts;
template <typename T>
constexpr int kVec16 = int(16 / sizeof(T));  // elements per 16 bytes: 4 floats, 2 doubles

// C[r][c] += sum_{k < K} A[r * lda + k] * B[c * 16 * ldb + k]: A is offset to the lane's first
// row, B to row cg (the lane's first column). K is a multiple of 16 bytes of elements.
template <typename T, int TM, int TN, int K, int kUnroll>
__device__ __forceinline__ void gemm_nt(T (&acc)[TM][TN], const T* A, int lda, const T* B, int ldb) {
    constexpr int V = kVec16<T>;
    static_assert(K % V == 0, "contraction length in 16-byte steps");
#pragma unroll kUnroll
    for (int k = 0; k < K; k += V) {
        T a[TM][V], b[TN][V];
#pragma unroll
        for (int r = 0; r < TM; ++r) lds(a[r], A + r * lda + k);
#pragma unroll
        for (int c = 0; c < TN; ++c) lds(b[c], B + c * 16 * ldb + k);
#pragma unroll
        for (int u = 0; u < V; ++u)
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TN; ++c) acc[r][c] = fma(a[r][u], b[c][u], acc[r][c]);
    }
}

// The B operand of gemm_tn at step k: the lane's TN columns of row k, in 16- or 8-byte chunks.
template <typename T, int TN>
__device__ __forceinline__ void load_cols(T (&b)[TN], const T* row, int cg) {
    using C = Cols<T, TN>;
#pragma unroll
    for (int ch = 0; ch < C::kChunks; ++ch) {
        T v[C::kVec];
        lds(v, row + C::chunk(cg, ch));
#pragma unroll
        for (int u = 0; u < C::kVec; ++u) b[ch * C::kVec + u] = v[u];
    }
}

// C[r][c] += sum_{k < K} A[k * lda + r] * B[k * ldb + col(c)]: A offset to the lane's first row.
template <typename T, int TM, int TN, int K, int kUnroll>
__device__ __forceinline__ void gemm_tn(T (&acc)[TM][TN], const T* A, int lda, const T* B, int ldb, int cg) {
#pragma unroll kUnroll
    for (int k = 0; k < K; ++k) {
        T a[TM], b[TN];
        lds(a, A + k * lda);
        load_cols(b, B + k * ldb, cg);
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
            for (int c = 0; c < TN; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
    }
}

// Two gemm_tn products over the same k in one loop (dV += P^T dO and dK += dS^T Q): one pass
// over k, so the loop overhead and the A/B address arithmetic are shared.
template <typename T, int TM, int TN, int K, int kUnroll>
__device__ __forceinline__ void gemm_tn2(T (&acc0)[TM][TN], const T* A0, const T* B0, T (&acc1)[TM][TN], const T* A1,
                                         const T* B1, int lda, int ldb, int cg) {
#pragma unroll kUnroll
    for (int k = 0; k < K; ++k) {
        T a0[TM], b0[TN], a1[TM], b1[TN];
        lds(a0, A0 + k * lda);
        load_cols(b0, B0 + k * ldb, cg);
        lds(a1, A1 + k * lda);
        load_cols(b1, B1 + k * ldb, cg);
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
            for (int c = 0; c < TN; ++c) {
                acc0[r][c] = fma(a0[r], b0[c], acc0[r][c]);
                acc1[r][c] = fma(a1[r], b1[c], acc1[r][c]);
            }
    }
}

// lse and delta of rows [m0, m0 + rows) into shared memory (zero past Lq; the reader treats
// those rows as seeing nothing).
template <typename T, int kThreads>
__device__ __forceinline__ void load_row_stats(T* lse_s, T* delta_s, const T* lse, const T* delta, int m0, int rows,
                                               int Lq, int tid) {
#pragma unroll 1
    for (int e = tid; e < 2 * rows; e += kThreads) {
        const int r = e < rows ? e : e - rows;
        const bool ok = m0 + r < Lq;
        const T* src = e < rows ? lse : delta;
        ptx::cp_async_elem<sizeof(T)>((e < rows ? lse_s : delta_s) + r, ok ? src + m0 + r : src, ok);
    }
}

// The query side of query rows [m0, m0 + rows) of attention row `at` (BwdBatchIndex: its
// head's q, dout, lse and delta) into shared memory: Q and dO as rows of kWidth elements, ld
// apart (zero past Lq, D and Dv), lse and delta (load_row_stats). Asynchronous: the caller commits.
template <typename T, int kWidth, int kThreads>
__device__ __forceinline__ void load_query_side(T* Qs, T* dOs, int ld, T* lse_s, T* delta_s, const BwdParams& p,
                                                const BwdBatchIndex& at, int m0, int rows, int Lq, int D, int Dv,
                                                int tid) {
    const FwdParams& f = p.fwd;
    load_rows<T, kWidth, kThreads>(Qs, ld, static_cast<const T*>(f.q) + at.q, f.q_row_stride, m0, rows, Lq, D, tid);
    load_rows<T, kWidth, kThreads>(dOs, ld, static_cast<const T*>(p.dout) + at.dout, p.dout_row_stride, m0, rows, Lq,
                                   Dv, tid);
    load_row_stats<T, kThreads>(lse_s, delta_s, static_cast<const T*>(f.lse) + at.lse,
                                static_cast<const T*>(p.delta) + at.lse, m0, rows, Lq, tid);
}

// lse of row i in the exponent's units, +inf where the row has no probability mass: rows past
// Lq and rows that saw no key (lse = -inf). exp(s - (+inf)) = 0, so such rows give P = 0
// (and dS = 0) without a NaN from -inf - (-inf).
template <typename T>
__device__ __forceinline__ T lse_for_row(T lse, bool row_ok) {
    using M = Math<T>;
    return row_ok && lse != -M::inf() ? M::lse_unit(lse) : M::inf();
}

// One (query, key) pair of a lane's micro-tile, with the query's lse (in the exponent's units,
// lse_for_row) and delta.
template <typename T>
struct PairStats {
    int query, key;
    T lse, delta;
};

// P and dS of a lane's micro-tile under the score modifiers (score_mod.cuh; the caller checked
// ScoreMod::modifies), in place of the raw S and dP, element (r, c) being the pair at(r, c):
//   P = exp(x - lse) of the modified score x, 0 where hidden (tested only when `masked`)
//   dS = P o (dP - delta) o dx / d(scale S)
// and P o (dP - delta) into `dbias` when it is wanted (the dK/dV kernel's).
template <typename Mod, typename MaskT, typename T, int R, int C, typename At, typename Grad = NoBiasGrad>
__device__ __forceinline__ void modified_p_ds(const Mod& mod, const MaskT& mask, bool masked, T (&s)[R][C],
                                              T (&dp)[R][C], At&& at, const Grad& dbias = Grad()) {
    mod.template dispatch<ModBodies::kByCap>([&](const auto& score) {
        simt::for_each(s, dp, [&](T& x, T& y, int r, int c) {
            const PairStats<T> e = at(r, c);
            T grad;
            const T modified = score(x, e.query, e.key, grad);
            x = masked && !mask.visible(e.query, e.key) ? T(0) : Math<T>::exp(score.exponent(modified, e.lse));
            y = x * (y - e.delta);
            if (dbias.wanted()) dbias.store(e.query, e.key, y);
            if (score.capped) y *= grad;
        });
    });
}

// One element of a dK/dV block's result (the FFMA and DMMA dK/dV kernels' epilogues): stored,
// or, for a slice of a split GQA group (BwdParams::dkv_adds), added into the group's sums, which
// the host zeroed and keeps in T (fp32 / fp64): the slices' adds land in any order, as dQ's do.
template <typename T>
__device__ __forceinline__ void store_or_add(T* dst, T x, bool in_bounds, bool adds) {
    if (!in_bounds) return;
    if (adds)
        atomicAdd(dst, x);
    else
        *dst = x;
}

// Register and unroll budget: one block per SM lets ptxas use up to 255 registers per thread
// (the shared memory of the preferred tiles allows one or two blocks anyway); the inner
// products unroll by kUnroll.
template <typename T>
struct Tuning {
    static constexpr int kMinBlocks = 1;
    static constexpr int kUnroll = sizeof(T) == 4 ? 2 : 1;
};

}  // namespace simt_bwd
}  // namespace cuflash
