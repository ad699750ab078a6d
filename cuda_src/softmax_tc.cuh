// Online softmax over the mma.sync accumulator layout (FlashAttention-2, fp32 throughout).
//
// A warp owns kMTiles tiles of 16 query rows. In an m16n8 accumulator, lane holds rows
// g = lane/4 and g + 8 (elements {0,1} and {2,3}), so each thread tracks 2 rows per m-tile, and
// the 4 lanes of a quad (lane/4 equal) share each row: row reductions are two xor-shuffles.
//
// Scores arrive in log2 units, s = S * scale * log2(e), so exp(S*scale - m) == exp2(s - m'):
// one ex2 per element, no multiply by log2(e) at the exponent.
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

template <int kMTiles>
struct OnlineSoftmax {
    float m_i[kMTiles][2];  // running row max of s (log2 units); -inf until the row sees a key
    float l_i[kMTiles][2];  // this lane's part of the running row sum of exp2(s - m_i)

    __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m_i[mt][h] = neg_inf();
                l_i[mt][h] = 0.f;
            }
    }

    // One key tile. In: s, scores in log2 units (masked: -inf). Out: s holds P = exp2(s - m_new),
    // and acc, l_i are rescaled to the new max:
    //   m_new = max(m_i, rowmax(s))
    //   P     = exp2(s - m_new)
    //   l_i   = exp2(m_i - m_new) * l_i + rowsum(P)
    //   acc   = exp2(m_i - m_new) * acc          (the caller then adds P V)
    // A row that has seen no key yet has m_new = -inf: exponents are taken against 0 instead, so
    // that exp2(-inf - (-inf)) = NaN never occurs; its P, l_i and acc stay exactly 0.
    template <int kNTiles, int kNTilesO>
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc)[kMTiles][kNTilesO][4]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float row_max = m_i[mt][h];
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
                    row_max = fmaxf(row_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                const float m_new = quad_max(row_max);
                const float m_ref = m_new == neg_inf() ? 0.f : m_new;
                const float alpha = ptx::ex2(m_i[mt][h] - m_ref);
                m_i[mt][h] = m_new;
                float row_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = ptx::ex2(s[mt][nt][e] - m_ref);
                        row_sum += s[mt][nt][e];
                    }
                l_i[mt][h] = alpha * l_i[mt][h] + row_sum;
#pragma unroll
                for (int nt = 0; nt < kNTilesO; ++nt) {
                    acc[mt][nt][2 * h] *= alpha;
                    acc[mt][nt][2 * h + 1] *= alpha;
                }
            }
    }

    // After the last tile: out = acc / l, lse = ln(sum_j exp(S_j * scale)) = (m + log2 l) * ln 2.
    // A row that saw no key (l = 0) gets out = 0 and lse = -inf. Returns 1/l (or 0) per row.
    __device__ __forceinline__ void finish(float (&inv_l)[kMTiles][2], float (&lse)[kMTiles][2]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float l = quad_sum(l_i[mt][h]);
                const bool seen = l > 0.f;
                inv_l[mt][h] = seen ? 1.f / l : 0.f;
                lse[mt][h] = seen ? (m_i[mt][h] + log2f(l)) * 0.69314718055994531f : neg_inf();
            }
    }
};

}  // namespace tc
}  // namespace cuflash
