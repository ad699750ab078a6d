// The backward's first launch, for every input type: the row term of dS and dQ's workspace.
//
//   delta_i = sum_d dO_id O_id        (Accum: float, double for double; laid out like lse)
//   dq_accum[bh, i, :] = 0            (when non-null: the dK/dV kernel adds dS K into it)
//
// One block owns kBlockM query rows of one (batch..., head); kLanes consecutive threads share a
// row, each summing every kLanes-th 16-byte chunk of it, then a shuffle tree adds the lanes.
// One pass over dO and O (both read once), where a chain of element-wise array operations would
// make several. kBlockN, kStages and kHasWindow are the Variant convention's and unused.
#include "bwd_prep.cuh"
#include "params.cuh"

namespace cuflash {

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow>
__global__ void __launch_bounds__(kWarps * 32) bwd_delta(const BwdParams p) {
    using Accum = typename prep::AccumOf<Element>::type;
    constexpr int kThreads = kWarps * 32;
    constexpr int kVec = prep::Chunk<Element>::kSize;
    constexpr int kChunks = kHeadDim / kVec;             // chunks of the widest row of the bucket
    constexpr int kLanes = kChunks < 8 ? kChunks : 8;    // threads per row
    constexpr int kSteps = (kChunks + kLanes - 1) / kLanes;
    constexpr int kRowsPerPass = kThreads / kLanes;
    static_assert(kHeadDim % kVec == 0 && (kLanes & (kLanes - 1)) == 0, "a power-of-two group of lanes per row");
    static_assert(kBlockM % kRowsPerPass == 0, "whole passes over the block's rows");

    const FwdParams& f = p.fwd;
    const int tid = threadIdx.x, lane_in_row = tid % kLanes;
    const int m0 = blockIdx.y * kBlockM;
    const BwdBatchIndex at(p, blockIdx.x);
    if (!at.has_query_row(m0)) return;  // a packed batch's shorter sequence
    // (a NaN delta makes the dK/dV kernel's terms of those rows NaN: it walks every row of the sequence)
    poison_uncovered_rows(static_cast<Accum*>(p.delta) + at.lse, 1, 1, at.seqlen_q, blockIdx.y, gridDim.y, kBlockM);
    const Element* o = static_cast<const Element*>(f.o) + at.o;
    const Element* dout = static_cast<const Element*>(p.dout) + at.dout;
    Accum* delta = static_cast<Accum*>(p.delta) + at.lse;

    for (int r = 0; r < kBlockM; r += kRowsPerPass) {
        const int row = m0 + r + tid / kLanes;
        Accum acc = 0;
        if (row < at.seqlen_q) {
            const Element* o_row = o + row * f.o_row_stride;
            const Element* do_row = dout + row * p.dout_row_stride;
#pragma unroll
            for (int s = 0; s < kSteps; ++s) {
                const int col = (s * kLanes + lane_in_row) * kVec;
                if (col < f.head_dim_v)
                    acc += prep::chunk_dot<Element, Accum>(do_row + col, o_row + col, f.head_dim_v - col);
            }
        }
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (lane_in_row == 0 && row < at.seqlen_q) delta[row] = acc;
    }

    // dq_accum rows [m0, m0 + kBlockM) of this head: one contiguous span (bh, Lq, D).
    if (p.dq_accum != nullptr) {
        const int rows = min(kBlockM, at.seqlen_q - m0);
        prep::zero_span<kThreads>(static_cast<Accum*>(p.dq_accum) + at.dq_accum + (long long)m0 * f.head_dim,
                                  rows * f.head_dim, tid);
    }
}

}  // namespace cuflash
