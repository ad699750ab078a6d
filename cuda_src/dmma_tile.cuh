// Fragment products of the float64 kernels on the fp64 tensor cores (bwd_dkdv_dmma.cu,
// bwd_dq_dmma.cu, and fwd_dmma.cu's P V), in fwd_dmma.cu's register layout and index
// permutations (its notes):
//
//   mma.sync m8n8k4 .f64, lane (g = lane / 4, t = lane % 4):  A (row g, k = t),  B (k = t, col g),
//   C (row g, cols 2t and 2t + 1). A warp holds a product as MT x NT 8x8 accumulator tiles
//   c[mi][ni][2]. sm_90 multiplies pairs of row tiles in one m16n8k8 (ptx::dmma_1688).
//
// Two product shapes cover the backward, each with every operand one 16-byte shared load (or a
// register) per lane, on tiles stored row-major with rows of an even pitch `ld` (in doubles):
//   rows_times_rows  C += A B^T, the contraction along the rows of both operands (S = Q K^T,
//                    dP = dO V^T, and S^T = K Q^T, dP^T = V dO^T). Two k-steps read elements
//                    2t and 2t + 1 of an 8-wide slice of the contraction: one double2 per lane.
//   acc_times_rows   C += A B, A in the accumulator layout of an earlier product (P, dS, or their
//                    transposes), B row-major with the contraction down its rows (V, dO, Q, K):
//                    step e of a k tile takes the lane's accumulator at k = 2t + e as its A, and
//                    B at row 2t + e; output tile pair (2c, 2c + 1) holds columns 16c + 2g and
//                    16c + 2g + 1 in its column g, so one double2 of B feeds both. A lane then
//                    holds actual columns 16c + 4t .. 16c + 4t + 3 of its row (column()).
#pragma once
#include "ptx.cuh"

namespace cuflash {
namespace dmma {

// Whether MT row tiles go through m16n8k8 in pairs (sm_90: a quarter of the MMA instructions)
// rather than m8n8k4 one by one.
template <int MT>
constexpr bool pairs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return MT % 2 == 0;
#else
    return false;
#endif
}

template <int R, int C>
__device__ __forceinline__ void zero(double (&c)[R][C][2]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < C; ++j) c[r][j][0] = c[r][j][1] = 0.0;
}

// c[mi][ni] += A[8 mi .. 8 mi + 7][:kDepth] B[8 ni .. 8 ni + 7][:kDepth]^T. `a` and `b` point at
// this lane's element of the first row tile: row g, element 2t (a + 8 mi ld + 8 k is row tile
// mi at contraction step k). m8n8k4: every .x product of a step before its .y products, so
// consecutive DMMAs never share an accumulator. The steps unroll by 2, not fully: fully
// unrolled, ptxas hoists every step's loads ahead of the MMAs and the backward's accumulators
// spill. (fwd_dmma's S = Q K^T is this loop fully unrolled, written out there: through this
// function its machine code changes, though not its registers.)
template <int MT, int NT, int kDepth>
__device__ __forceinline__ void rows_times_rows(double (&c)[MT][NT][2], const double* a, const double* b, int ld) {
    static_assert(kDepth % 8 == 0, "steps of 8");
#pragma unroll 2
    for (int k = 0; k < kDepth / 8; ++k) {
        double2 af[MT], bf[NT];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) af[mi] = *reinterpret_cast<const double2*>(a + 8 * mi * ld + 8 * k);
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) bf[ni] = *reinterpret_cast<const double2*>(b + 8 * ni * ld + 8 * k);
        if constexpr (pairs<MT>()) {
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int mi = 0; mi < MT; mi += 2)
                    ptx::dmma_1688(c[mi][ni], c[mi + 1][ni], af[mi].x, af[mi + 1].x, af[mi].y, af[mi + 1].y, bf[ni].x,
                                   bf[ni].y);
        } else {
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) ptx::dmma_884(c[mi][ni], af[mi].x, bf[ni].x);
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) ptx::dmma_884(c[mi][ni], af[mi].y, bf[ni].y);
        }
    }
}

// c[mi][.] += A[8 mi ..][8 kt ..] B[8 kt ..][:16 CP] over kt < KT, A the accumulators a[mi][kt]
// (row g, k = 2t + e in a[mi][kt][e]), B row-major: `b` points at this lane's B element, row 2t
// and column 2g (b + (8 kt + e) ld + 16 c: k = 8 kt + 2t + e, output tile pair c). CT = 2 CP
// output tiles, in the permuted column order (column()).
template <int MT, int KT, int CT>
__device__ __forceinline__ void acc_times_rows(double (&c)[MT][CT][2], const double (&a)[MT][KT][2], const double* b,
                                               int ld) {
    static_assert(CT % 2 == 0, "output tiles in pairs");
    if constexpr (pairs<MT>()) {
        // Both k-steps of k tile kt at once: k = 2t (e = 0) and 2t + 1 (e = 1).
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int cp = 0; cp < CT / 2; ++cp) {
                const double2 b0 = *reinterpret_cast<const double2*>(b + (8 * kt) * ld + 16 * cp);
                const double2 b1 = *reinterpret_cast<const double2*>(b + (8 * kt + 1) * ld + 16 * cp);
#pragma unroll
                for (int mi = 0; mi < MT; mi += 2) {
                    ptx::dmma_1688(c[mi][2 * cp], c[mi + 1][2 * cp], a[mi][kt][0], a[mi + 1][kt][0], a[mi][kt][1],
                                   a[mi + 1][kt][1], b0.x, b1.x);
                    ptx::dmma_1688(c[mi][2 * cp + 1], c[mi + 1][2 * cp + 1], a[mi][kt][0], a[mi + 1][kt][0],
                                   a[mi][kt][1], a[mi + 1][kt][1], b0.y, b1.y);
                }
            }
    } else {
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int cp = 0; cp < CT / 2; ++cp) {
                    const double2 bv = *reinterpret_cast<const double2*>(b + (8 * kt + e) * ld + 16 * cp);
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) {
                        ptx::dmma_884(c[mi][2 * cp], a[mi][kt][e], bv.x);
                        ptx::dmma_884(c[mi][2 * cp + 1], a[mi][kt][e], bv.y);
                    }
                }
    }
}

// An accumulator-layout tile c[mi][ni] (lane (g, t): row 8 mi + g, columns 8 ni + 2t + e) to and
// from its transpose in a row-major tile of pitch ld: `t` points at this lane's element of row 0,
// column g (c[mi][ni][e] at t[(8 ni + 2t + e) ld + 8 mi]; bwd_dkdv_dmma's S^T, dS^T in dSs by query
// row). Scalar accesses, lane (g, t) at double g + 2t ld: distinct banks in each half warp where
// ld = 2 (mod 8) (dSs's pitch block_n + 2).
template <int MT, int NT>
__device__ __forceinline__ void to_rows(double* t, int ld, const double (&c)[MT][NT][2], int tq) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) t[(8 * ni + 2 * tq + e) * ld + 8 * mi] = c[mi][ni][e];
}

template <int MT, int NT>
__device__ __forceinline__ void from_rows(double (&c)[MT][NT][2], const double* t, int ld, int tq) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) c[mi][ni][e] = t[(8 * ni + 2 * tq + e) * ld + 8 * mi];
}

// The actual column of acc_times_rows's output element c[.][ct][e] held by lane (g, t).
__device__ __forceinline__ int column(int ct, int e, int tq) { return 16 * (ct / 2) + 4 * tq + 2 * e + (ct & 1); }

// f(mi, column, value) for every element of a lane's acc_times_rows output (row 8 mi + g).
template <int MT, int CT, typename F>
__device__ __forceinline__ void for_each_column(const double (&c)[MT][CT][2], int tq, F&& f) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ct = 0; ct < CT; ++ct)
#pragma unroll
            for (int e = 0; e < 2; ++e) f(mi, column(ct, e, tq), c[mi][ct][e]);
}

}  // namespace dmma
}  // namespace cuflash
