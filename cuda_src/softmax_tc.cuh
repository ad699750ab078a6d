// Online softmax over the mma.sync accumulator layout (FlashAttention-2, fp32 throughout).
//
// A warp owns kMTiles tiles of 16 query rows. In an m16n8 accumulator, lane holds rows
// g = lane/4 and g + 8 (elements {0,1} and {2,3}), so each thread tracks 2 rows per m-tile, and
// the 4 lanes of a quad (lane/4 equal) share each row: row reductions are two xor-shuffles.
//
// Scores arrive raw, S = Q K^T (masked: -inf), with c = scale * log2(e) > 0 (the kernel
// negates Q when scale < 0). Then exp(S*scale - m) == exp2(S*c - m'), m' = m*c: the row max is
// taken on raw scores and each element costs one FFMA and one ex2 (FlashAttention-2's fold).
#pragma once
#include "ptx.cuh"

namespace cuflash {
namespace tc {

// -infinity: the score of a hidden key, the max of a row that has seen none, lse of such a row.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Lazy rescaling (as in FlashAttention-4): the reference max m_i of a warp's rows moves only when
// some row's tile max exceeds it by more than kRescaleLog2 (log2 units). Until then P = exp2(s - m_i)
// may reach 2^kRescaleLog2 = 256, harmless in fp32 (l_i, acc) and in f16/bf16 (P): the result
// (acc / l_i, and lse = m_i + log2 l_i) is the same function for any reference m_i >= the
// values seen so far minus kRescaleLog2. On random-like scores the max settles in the first
// tiles, so the acc *= alpha pass (kNTilesO * 4 FMULs per row pair per tile) is mostly skipped.
constexpr float kRescaleLog2 = 8.f;

template <int kMTiles>
struct OnlineSoftmax {
    float m_i[kMTiles][2];  // reference row max in log2 units (times c); -inf until the row sees a key
    float l_i[kMTiles][2];  // this lane's part of the running row sum of exp2(s*c - m_i)

    __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m_i[mt][h] = neg_inf();
                l_i[mt][h] = 0.f;
            }
    }

    // Start every row from a sink (score_mod.cuh): a logit already seen, with no value:
    // m_i = sink (log2 units), l_i = 2^0 = 1, held as 0.25 by each lane of the row's quad (finish
    // sums the four exactly). A sink of -inf is no sink: the constructor's state stays.
    __device__ __forceinline__ void start_from(float sink) {
        if (sink == neg_inf()) return;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m_i[mt][h] = sink;
                l_i[mt][h] = 0.25f;
            }
    }

    // One key tile. In: s = raw scores (masked: -inf), c > 0. Out: s holds P; acc and l_i are
    // rescaled when the reference max moves (warp-uniform decision, see kRescaleLog2):
    //   m_new = max(m_i, rowmax(s) * c)         only if some row has rowmax(s)*c > m_i + kRescaleLog2
    //   acc   = exp2(m_i - m_new) * acc,  l_i = exp2(m_i - m_new) * l_i,  m_i = m_new
    //   P     = exp2(s * c - m_i)               one FFMA + ex2
    //   l_i  += rowsum(P)                       (the caller then adds P V to acc)
    template <int kNTiles, int kNTilesO>
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc)[kMTiles][kNTilesO][4],
                                           float c) {
        float alpha[kMTiles][2];
        if (update_stats(s, c, alpha)) rescale(acc, alpha);
    }

    // update() without touching acc, for kernels whose acc is still being written by an
    // asynchronous MMA (fwd_wgmma): returns whether acc must be multiplied by alpha afterwards
    // (rescale), warp-uniform. m_i, l_i and P are final on return.
    // A row that has seen no key has m_i = -inf: exponents are taken against 0 instead, so that
    // exp2(-inf - (-inf)) = NaN never occurs; its P, l_i and acc stay exactly 0.
    template <int kNTiles>
    __device__ __forceinline__ bool update_stats(float (&s)[kMTiles][kNTiles][4], float c, float (&alpha)[kMTiles][2]) {
        float m_tile[kMTiles][2];
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float row_max = neg_inf();
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
                    row_max = fmaxf(row_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                m_tile[mt][h] = quad_max(row_max) * c;
                grow |= m_tile[mt][h] > m_i[mt][h] + kRescaleLog2;
            }
        const bool moved = __any_sync(0xffffffffu, grow);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                alpha[mt][h] = 1.f;
                if (moved) {
                    const float m_new = fmaxf(m_i[mt][h], m_tile[mt][h]);
                    alpha[mt][h] = ptx::ex2(m_i[mt][h] - (m_new == neg_inf() ? 0.f : m_new));
                    m_i[mt][h] = m_new;
                    l_i[mt][h] *= alpha[mt][h];
                }
            }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float m_ref = m_i[mt][h] == neg_inf() ? 0.f : m_i[mt][h];
                float row_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = ptx::ex2(fmaf(s[mt][nt][e], c, -m_ref));
                        row_sum += s[mt][nt][e];
                    }
                l_i[mt][h] += row_sum;
            }
        return moved;
    }

    // acc *= alpha, row by row (the second half of update()).
    template <int kNTilesO>
    static __device__ __forceinline__ void rescale(float (&acc)[kMTiles][kNTilesO][4], const float (&alpha)[kMTiles][2]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int nt = 0; nt < kNTilesO; ++nt) {
                    acc[mt][nt][2 * h] *= alpha[mt][h];
                    acc[mt][nt][2 * h + 1] *= alpha[mt][h];
                }
    }

    // After the last tile: out = acc / l, lse = ln(sum_j exp(S_j * scale)) = (m + log2 l) * ln 2.
    // A row that saw no key (l = 0) gets out = 0 and lse = -inf. Returns 1/l (or 0) per row.
    // The test is l != 0, not l > 0: a row whose scores hold NaN (or +inf) has l = NaN, and its
    // 1/l and lse must come out NaN as the reference's, not -inf ("saw no key"), which would let
    // the backward recompute finite probabilities for it.
    __device__ __forceinline__ void finish(float (&inv_l)[kMTiles][2], float (&lse)[kMTiles][2]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float l = quad_sum(l_i[mt][h]);
                const bool seen = l != 0.f;
                inv_l[mt][h] = seen ? 1.f / l : 0.f;
                lse[mt][h] = seen ? (m_i[mt][h] + log2f(l)) * 0.69314718055994531f : neg_inf();
            }
    }
};

}  // namespace tc
}  // namespace cuflash
