// The backward's last launch on the atomic path, for every input type:
//
//   dQ_i = scale * dq_accum[bh, i, :]    rounded to Element once, stored with dq's strides
//
// (the dK/dV kernel adds dS K unscaled). One block owns kBlockM query rows of one
// (batch..., head); each thread converts whole 16-byte output chunks, reading their Accum
// values as 16-byte vectors when the row allows. kBlockN, kStages and kHasWindow are the Variant
// convention's and unused.
#include "bwd_prep.cuh"
#include "params.cuh"

namespace cuflash {

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow>
__global__ void __launch_bounds__(kWarps * 32) bwd_dq_convert(const BwdParams p) {
    using Accum = typename prep::AccumOf<Element>::type;
    constexpr int kThreads = kWarps * 32;
    constexpr int kVec = prep::Chunk<Element>::kSize;   // output elements per chunk
    constexpr int kChunks = kHeadDim / kVec;
    constexpr int kTotal = kBlockM * kChunks;
    constexpr int kLoads = kVec * sizeof(Accum) / 16;   // 16-byte loads of Accum per chunk
    static_assert(kHeadDim % kVec == 0 && kTotal % kThreads == 0, "whole chunks over whole passes");

    const FwdParams& f = p.fwd;
    const int m0 = blockIdx.y * kBlockM;
    const BwdBatchIndex at(p, blockIdx.x);
    if (!at.has_query_row(m0)) return;  // a packed batch's shorter sequence
    poison_uncovered_query_grads<Element, kBlockM>(p, at, blockIdx.y);
    const Accum* accum = static_cast<const Accum*>(p.dq_accum) + at.dq_accum;
    Element* dq = static_cast<Element*>(p.dq) + at.dq;
    const Accum scale = static_cast<Accum>(f.scale);

#pragma unroll 4
    for (int idx = threadIdx.x; idx < kTotal; idx += kThreads) {
        const int row = m0 + idx / kChunks, col = (idx % kChunks) * kVec;
        if (row >= at.seqlen_q || col >= f.head_dim) continue;
        const Accum* src = accum + (long long)row * f.head_dim + col;
        const int n = f.head_dim - col;
        Accum x[kVec];
        if (n >= kVec && prep::aligned16(src)) {
#pragma unroll
            for (int l = 0; l < kLoads; ++l) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + l);
                const Accum* w = reinterpret_cast<const Accum*>(&v);
#pragma unroll
                for (int e = 0; e < 16 / int(sizeof(Accum)); ++e) x[l * (16 / sizeof(Accum)) + e] = w[e];
            }
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) x[e] = e < n ? src[e] : Accum(0);
        }
        prep::Chunk<Element> out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) out.e[e] = prep::narrow<Element>(scale * x[e]);
        Element* dst = dq + row * p.dq_row_stride + col;
        if (n >= kVec && prep::aligned16(dst)) {
            *reinterpret_cast<uint4*>(dst) = out.bits;
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e)
                if (e < n) dst[e] = out.e[e];
        }
    }
}

}  // namespace cuflash
