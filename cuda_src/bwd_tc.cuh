// Helpers of the fp16/bf16 backward kernels (bwd_dkdv_tc.cu, bwd_dq_tc.cu).
//
// The backward recomputes the probabilities from the forward's lse instead of storing them:
//   P_ij = exp(S_ij * scale - lse_i) = exp2(S_ij * scale_log2 - lse_i * log2(e))
// so a row's statistics are two floats: lse in log2 units and delta_i = rowsum(dO_i * O_i).
#pragma once
#include "bwd_prep.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "tile_tc.cuh"

namespace cuflash {
namespace tc {

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000u); }

// A row's lse in log2 units, ready for P = exp2(s - lse2). A row that sees no key has lse = -inf:
// it gets +inf, so P = exp2(-inf) = 0 exactly (never exp2(+inf) or NaN), whatever its scores.
__device__ __forceinline__ float lse_log2(float lse) {
    return lse == -pos_inf() ? pos_inf() : lse * 1.4426950408889634f;
}

// lse_log2 of query `row`, read from global memory; a row past Lq does not exist and gets +inf
// too. (The rule is restated, not a call of the overload above: ptxas schedules bwd_dq_tc
// differently through the extra call, and this form is the measured one.)
__device__ __forceinline__ float lse_log2(const float* lse, int row, int seqlen_q) {
    if (row >= seqlen_q) return pos_inf();
    const float v = lse[row];
    return v == -pos_inf() ? pos_inf() : v * 1.4426950408889634f;
}

// delta of query `row` (0 past Lq: its P is 0 anyway).
__device__ __forceinline__ float row_delta(const float* delta, int row, int seqlen_q) {
    return row < seqlen_q ? delta[row] : 0.f;
}

// lse_log2 and delta of this lane's rows `row` + {0, 8} of an m16 row tile.
__device__ __forceinline__ void row_stats(const float* lse, const float* delta_rows, int row, int seqlen_q,
                                          float (&lse2)[2], float (&delta)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        lse2[h] = lse_log2(lse, row + 8 * h, seqlen_q);
        delta[h] = row_delta(delta_rows, row + 8 * h, seqlen_q);
    }
}

// dS = P o (dP - delta_i) in place of dP, P = exp2(S * scale_log2 - lse2_i) recomputed (lse2 =
// +inf gives 0; on a masked tile a hidden pair 0): an m16 row tile's kNTiles n8 fragments, this
// lane's rows row0 + lane / 4 + {0, 8}, keys key0 + 8 nt + 2 (lane % 4) + {0, 1}.
template <int kNTiles, typename MaskT>
__device__ __forceinline__ void dscores_in_place(const float (&s)[kNTiles][4], float (&dp)[kNTiles][4],
                                                 float scale_log2, const float (&lse2)[2], const float (&delta)[2],
                                                 bool masked, const MaskT& mask, int row0, int key0, int lane) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float prob = ptx::ex2(fmaf(s[nt][e], scale_log2, -lse2[e / 2]));
            if (masked) {
                const int row = row0 + lane / 4 + 8 * (e / 2);
                const int key = key0 + nt * 8 + 2 * (lane % 4) + e % 2;
                if (!mask.visible(row, key)) prob = 0.f;
            }
            dp[nt][e] = prob * (dp[nt][e] - delta[e / 2]);
        }
}

// An accumulator fragment added into fp32 rows of ``width`` floats (REDs): rows ``row0`` +
// lane / 4 + {0, 8} below ``rows``, columns ``c0`` + 8 nt + 2 (lane % 4) + {0, 1} below the width,
// times ``factor``. An even width makes every (col, col + 1) pair 8-byte aligned: one vector RED;
// else element by element. dQ_i's part into dq_accum (unscaled: bwd_dq_convert multiplies by
// scale), and a split GQA group's dK and dV into their sums (bwd_dkdv_tc's epilogue; Hopper's
// add them from a stage, bwd_wgmma.cuh's add_dk_dv). On sm_80 a vector RED is two scalar ones
// (ptx::red_add_v2_f32).
template <int kN>
__device__ __forceinline__ void add_rows(float* dst_rows, const float (&frag)[kN / 8][4], int row0, int rows, int c0,
                                         int width, int lane, float factor = 1.f) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + lane / 4 + 8 * h;
        if (row < rows) {
            float* dst = dst_rows + (long long)row * width;
#pragma unroll
            for (int nt = 0; nt < kN / 8; ++nt) {
                const int col = c0 + nt * 8 + 2 * (lane % 4);
                if (width % 2 == 0) {
                    if (col < width) ptx::red_add_v2_f32(dst + col, frag[nt][2 * h] * factor, frag[nt][2 * h + 1] * factor);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (col + e < width) atomicAdd(dst + col + e, frag[nt][2 * h + e] * factor);
                }
            }
        }
    }
}

// The type a kernel of Element stores its results in: the element itself, float for TF32.
template <typename Element> struct StoredAs { using type = Element; };
template <> struct StoredAs<tf32> { using type = float; };

// The same fragment stored as a whole result (BwdParams::dq_direct): rows of `width` elements
// of type T (StoredAs) at `row_stride` apart, each value times `factor` and rounded once, as
// bwd_dq_convert rounds a sum.
template <typename T, int kN>
__device__ __forceinline__ void store_rows(T* dst_rows, long long row_stride, const float (&frag)[kN / 8][4], int row0, int rows,
                                           int c0, int width, int lane, float factor) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + lane / 4 + 8 * h;
        if (row < rows) {
            T* dst = dst_rows + row * row_stride;
#pragma unroll
            for (int nt = 0; nt < kN / 8; ++nt) {
                const int col = c0 + nt * 8 + 2 * (lane % 4);
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (col + e < width) dst[col + e] = prep::narrow<T>(frag[nt][2 * h + e] * factor);
            }
        }
    }
}

// The query side of one step of the key-tile kernels (bwd_dkdv_tc, bwd_dkdv_wgmma): Q_i and dO_i
// as kBlockM-row tiles (layout Tile), and the rows' lse and delta as 2 * kBlockM floats (thread
// t < kBlockM copies lse of row t, the next kBlockM threads delta; 4-byte copies: a head's lse
// row need not be 16-byte aligned). Rows past Lq read as 0; the kernels' per-element mask
// zeroes their P (tiles crossing Lq are masked). Asynchronous, like TileLoader. Elements of
// kUnits 16-bit units (Arith::kUnits: a float is two); kWidth = head dim * kUnits.
template <int kBlockM, int kWidth, int kThreads, typename Tile, int kUnits = 1>
struct QueryTileLoader {
    using Storage = typename SameSizeBits<2 * kUnits>::type;
    TileLoader<kBlockM, kWidth, kThreads, Tile> q, dout;
    const float* lse;
    const float* delta;
    int seqlen_q;

    __device__ __forceinline__ QueryTileLoader(const BwdParams& p, const BwdBatchIndex& at)
        : q(reinterpret_cast<const unsigned short*>(static_cast<const Storage*>(p.fwd.q) + at.q),
            p.fwd.q_row_stride * kUnits, p.fwd.head_dim * kUnits),
          dout(reinterpret_cast<const unsigned short*>(static_cast<const Storage*>(p.dout) + at.dout),
               p.dout_row_stride * kUnits, p.fwd.head_dim_v * kUnits),
          lse(static_cast<const float*>(p.fwd.lse) + at.lse),
          delta(static_cast<const float*>(p.delta) + at.lse),
          seqlen_q(at.seqlen_q) {}

    __device__ __forceinline__ bool aligned() const { return q.aligned(seqlen_q) && dout.aligned(seqlen_q); }

    // The loader of row bh + g, built from row bh's (params.cuh's HeadStep; as aligned).
    // Stepping the pointers held since the start costs fewer registers than rebuilding them
    // from BwdBatchIndex::head.
    __device__ __forceinline__ QueryTileLoader head(const BwdParams& p, int g) const {
        const HeadStep d(p, g);
        QueryTileLoader r = *this;
        r.q.base += d.q * kUnits;
        r.dout.base += d.dout * kUnits;
        r.lse += d.lse;
        r.delta += d.lse;  // delta is laid out like lse
        return r;
    }

    // Query tile i into q_smem, do_smem (shared addresses) and stats (lse then delta).
    __device__ __forceinline__ void load(unsigned q_smem, unsigned do_smem, void* stats, int i, int tid) const {
        q.load(q_smem, i * kBlockM, seqlen_q, tid);
        dout.load(do_smem, i * kBlockM, seqlen_q, tid);
        load_stats(stats, i, tid);
    }

    // Query tile i's lse, then its delta, into stats (2 kBlockM floats; threads tid < 2 kBlockM
    // copy one each; rows past Lq zero-filled).
    __device__ __forceinline__ void load_stats(void* stats, int i, int tid) const {
        if (tid < 2 * kBlockM) {
            const int row = i * kBlockM + tid % kBlockM;
            const float* src = (tid < kBlockM ? lse : delta) + (row < seqlen_q ? row : 0);
            ptx::cp_async_elem<4>(static_cast<unsigned char*>(stats) + 4 * tid, src, row < seqlen_q);
        }
    }
};

// The dK/dV kernels' pipeline start: cp.async groups in order (K, V), then the Q/dO of steps
// 0 .. kStages - 2 (load_qdo(t, step)), one group each, empty ones too, so that "at most
// kStages - 2 groups pending" at step t means K, V and step t have landed. Returns step 0.
template <int kStages, typename KLoader, typename VLoader, typename LoadQdo>
__device__ __forceinline__ HeadTileStep start_kv_pipeline(const KLoader& k_loader, const VLoader& v_loader,
                                                          unsigned k_smem, unsigned v_smem, int n0, int seqlen_k,
                                                          const TileRange& range, int heads, int tid,
                                                          LoadQdo&& load_qdo) {
    k_loader.load(k_smem, n0, seqlen_k, tid);
    v_loader.load(v_smem, n0, seqlen_k, tid);
    ptx::cp_async_commit();
    const HeadTileStep first_step(range.first, range.last, heads);
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
        const HeadTileStep s = first_step.after(t, range.first, range.last);
        if (s.g < heads) load_qdo(t, s);
        ptx::cp_async_commit();
    }
    return first_step;
}

// The deterministic dQ kernels' feeding warpgroup (bwd_dq_wgmma_x3.cu, _x6.cu), once per key tile
// j: tile j + 1's copies landed are split into the slot step j - 1 read (freed by its barrier),
// tile j + 2's copies issued (this thread's staged chunks are read), then the step's barrier
// with the multiplying warpgroup.
template <typename Unstage, typename Copy, typename Barrier>
__device__ __forceinline__ void feed_key_tiles(const TileRange& range, const Unstage& unstage_tile,
                                               const Copy& copy_tile, const Barrier& step_barrier) {
    for (int j = range.first; j < range.last; ++j) {
        ptx::cp_async_wait<0>();
        unstage_tile(j + 1);
        copy_tile(j + 2);
        ptx::cp_async_commit();
        step_barrier();
    }
    ptx::cp_async_wait<0>();
}

}  // namespace tc
}  // namespace cuflash
