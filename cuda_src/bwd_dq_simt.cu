// Exact FlashAttention-2 backward for float32 and float64: deterministic dQ over query tiles,
// on the FFMA / DFMA pipes (never TF32). Used when the caller asks for reproducible results:
// no atomics, every sum in a fixed order.
//
// A block owns kBlockM query rows of one (batch..., head): Q_i, dO_i, lse_i, delta_i in shared
// memory, the accumulator dQ_i in registers, and walks the key tiles j those rows may see
// (Mask::tiles), recomputing
//
//   S  = Q_i K_j^T             P  = exp(S * scale - lse_i)   (P = 0 where masked)
//   dP = dO_i V_j^T            dS = P o (dP - delta_i)
//   dQ_i += dS K_j             and dQ_i *= scale at the end.
// Under the score modifiers (kScoreMods, score_mod.cuh) P and dS come from the modified scores x,
// once S and dP are both computed: P = exp(x - lse_i), dS = P o (dP - delta_i) o dx / d(scale S).
//
// Work split (bwd_simt.cuh): S and dP are queries x keys micro-tiles (a lane's TM queries are
// its rows of dQ_i too, keys cg + 16 c); dS goes to shared memory transposed (dSt[key][row],
// the lane's TM rows contiguous), then dQ_i += dS K_j is an outer product over the keys.
// Shared memory, rows padded by 16 bytes:
//   Qs, dOs [kBlockM][kHeadDim + pad]   Ks, Vs [kBlockN][kHeadDim + pad]
//   dSt [kBlockN][kBlockM + pad]        lse_s, delta_s [kBlockM]
//
// Per key tile: three barriers; V_{j+1} streams in during dQ += dS K_j, K_{j+1} after it.
#include "bwd_simt.cuh"
#include "schedule.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dq_simt_smem_bytes() {
    // Qs, dOs, Ks, Vs [.][d], dSt [n][m] (rows padded by 16 bytes), lse and delta [m].
    constexpr int kPad = 16 / sizeof(Element);
    constexpr int kLdD = kHeadDim + kPad, kLdM = kBlockM + kPad;
    return sizeof(Element) * (2 * kBlockM * kLdD + 2 * kBlockN * kLdD + kBlockN * kLdM + 2 * kBlockM);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, simt_bwd::Tuning<Element>::kMinBlocks) bwd_dq_simt(const BwdParams p) {
    using T = Element;
    using M = simt::Math<T>;
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroups = 2 * kWarps;    // row groups of 16 lanes
    constexpr int TM = kBlockM / kGroups;  // query rows per lane
    constexpr int TN = kBlockN / 16;       // keys per lane in S, dP (columns cg + 16 c)
    constexpr int TD = kHeadDim / 16;      // dQ columns per lane
    static_assert(TM * kGroups == kBlockM && TM >= 1, "kBlockM = 2 * kWarps * TM");
    static_assert(TN * 16 == kBlockN && TD * 16 == kHeadDim, "kBlockN and kHeadDim are multiples of 16");
    static_assert(kStages == 1, "single-buffered: V_{j+1} overlaps the dQ product of tile j");
    constexpr int kUnroll = simt_bwd::Tuning<T>::kUnroll;

    constexpr int kPad = 16 / sizeof(T);
    constexpr int kLdD = kHeadDim + kPad;  // Qs, dOs, Ks, Vs row length
    constexpr int kLdM = kBlockM + kPad;   // dSt row length
    constexpr unsigned kSmemBytes = bwd_dq_simt_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();

    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* dOs = Qs + kBlockM * kLdD;
    T* Ks = dOs + kBlockM * kLdD;
    T* Vs = Ks + kBlockN * kLdD;
    T* dSt = Vs + kBlockN * kLdD;
    T* lse_s = dSt + kBlockN * kLdM;
    T* delta_s = lse_s + kBlockM;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int cg = lane & 15;
    const int row0 = ((tid >> 5) * 2 + (lane >> 4)) * TM;  // first of this lane's TM query rows

    const FwdParams& f = p.fwd;
    const auto [bh, tile_m] = query_tile_block<kHasWindow>();  // schedule.cuh
    const int m0 = tile_m * kBlockM;
    BwdBatchIndex at;
    if (!starts_query_block<T, kBlockM>(p, bh, tile_m, m0, at)) return;  // params.cuh
    const T* __restrict__ q = static_cast<const T*>(f.q) + at.q;
    const T* __restrict__ k = static_cast<const T*>(f.k) + at.k;
    const T* __restrict__ v = static_cast<const T*>(f.v) + at.v;
    const T* __restrict__ dout = static_cast<const T*>(p.dout) + at.dout;
    const T* __restrict__ lse = static_cast<const T*>(f.lse) + at.lse;
    const T* __restrict__ delta = static_cast<const T*>(p.delta) + at.lse;
    const int Lq = at.seqlen_q, Lk = at.seqlen_k, D = f.head_dim, Dv = f.head_dim_v;

    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    T dQ[TM][TD];
    simt::zero(dQ);
    const T scale = M::score_scale(f);
    const ScoreMod<T> mod(f, bh, T(f.scale), M::unit(), mask.diag);
    const bool modified = kScoreMods && mod.modifies();  // softcap, bias, ALiBi or mask (not sinks alone)

    if (range.first < range.last) {
        simt_bwd::load_rows<T, kHeadDim, kThreads>(Qs, kLdD, q, f.q_row_stride, m0, kBlockM, Lq, D, tid);
        simt_bwd::load_rows<T, kHeadDim, kThreads>(dOs, kLdD, dout, p.dout_row_stride, m0, kBlockM, Lq, Dv, tid);
        simt_bwd::load_row_stats<T, kThreads>(lse_s, delta_s, lse, delta, m0, kBlockM, Lq, tid);
        const int n0 = range.first * kBlockN;
        simt_bwd::load_rows<T, kHeadDim, kThreads>(Ks, kLdD, k, f.k_row_stride, n0, kBlockN, Lk, D, tid);
        simt_bwd::load_rows<T, kHeadDim, kThreads>(Vs, kLdD, v, f.v_row_stride, n0, kBlockN, Lk, Dv, tid);
        ptx::cp_async_commit();
    }

    for (int t = range.first; t < range.last; ++t) {
        const int n0 = t * kBlockN;
        ptx::cp_async_wait<0>();  // K_j, V_j (and Q_i, dO_i, lse_i, delta_i the first time)
        __syncthreads();

        // S = Q_i K_j^T on this lane's TM rows x TN keys (keys cg + 16 c).
        T s[TM][TN];
        simt::zero(s);
        simt_bwd::gemm_nt<T, TM, TN, kHeadDim, kUnroll>(s, Qs + row0 * kLdD, kLdD, Ks + cg * kLdD, kLdD);

        // P = exp(S * scale - lse_i): 0 for rows past Lq or that saw no key, and for masked
        // pairs on tiles that cross an edge of the visible region (keys past Lk included).
        // Under the score modifiers S stays raw until dP is known (below).
        const bool masked = t < range.full_first || t >= range.full_last;
        if (!modified) {
#pragma unroll
            for (int r = 0; r < TM; ++r) {
                const T lse_r = simt_bwd::lse_for_row(lse_s[row0 + r], m0 + row0 + r < Lq);
#pragma unroll
                for (int c = 0; c < TN; ++c) {
                    T pv = M::exp(fma(s[r][c], scale, -lse_r));
                    if (masked && !mask.visible(m0 + row0 + r, n0 + cg + 16 * c)) pv = T(0);
                    s[r][c] = pv;
                }
            }
        }

        // dP = dO_i V_j^T; dS = P o (dP - delta_i).
        T ds[TM][TN];
        simt::zero(ds);
        simt_bwd::gemm_nt<T, TM, TN, kHeadDim, kUnroll>(ds, dOs + row0 * kLdD, kLdD, Vs + cg * kLdD, kLdD);
        // Dropout (dropout.cuh): dP o Z * scale, so that dS = P o (Z o dP / q - delta_i).
        if (kDropout && f.dropout_threshold) {
            simt::DropBits<TM, TN> keep;
            keep.draw(Dropout(f, bh), [&](int r, int c) { return simt::QK{m0 + row0 + r, n0 + cg + 16 * c}; });
            keep.apply(ds, static_cast<T>(f.dropout_scale));
        }
        if (modified) {
            if constexpr (kScoreMods) {  // (plain Variants compile none of this)
                T lse_r[TM], delta_r[TM];
#pragma unroll
                for (int r = 0; r < TM; ++r) {
                    lse_r[r] = simt_bwd::lse_for_row(lse_s[row0 + r], m0 + row0 + r < Lq);
                    delta_r[r] = delta_s[row0 + r];
                }
                simt_bwd::modified_p_ds(mod, mask, masked, s, ds, [&](int r, int c) {
                    return simt_bwd::PairStats<T>{m0 + row0 + r, n0 + cg + 16 * c, lse_r[r], delta_r[r]};
                });
            }
        } else {
#pragma unroll
            for (int r = 0; r < TM; ++r) {
                const T delta_r = delta_s[row0 + r];
#pragma unroll
                for (int c = 0; c < TN; ++c) ds[r][c] = s[r][c] * (ds[r][c] - delta_r);
            }
        }

        // dS by key, the lane's TM rows contiguous: one vector store per key.
#pragma unroll
        for (int c = 0; c < TN; ++c) {
            T col[TM];
#pragma unroll
            for (int r = 0; r < TM; ++r) col[r] = ds[r][c];
            simt_bwd::sts(dSt + (cg + 16 * c) * kLdM + row0, col);
        }
        __syncthreads();  // dS visible; nobody reads V_j any more
        if (t + 1 < range.last) {
            simt_bwd::load_rows<T, kHeadDim, kThreads>(Vs, kLdD, v, f.v_row_stride, n0 + kBlockN, kBlockN, Lk, Dv, tid);
            ptx::cp_async_commit();
        }

        // dQ_i += dS K_j: a sum over the tile's keys.
        simt_bwd::gemm_tn<T, TM, TD, kBlockN, kUnroll>(dQ, dSt + row0, kLdM, Ks, kLdD, cg);
        __syncthreads();  // K_j and dSt free
        if (t + 1 < range.last) {
            simt_bwd::load_rows<T, kHeadDim, kThreads>(Ks, kLdD, k, f.k_row_stride, n0 + kBlockN, kBlockN, Lk, D, tid);
            ptx::cp_async_commit();
        }
    }

    // dQ_i = scale * sum_j dS K_j. Rows that see no key write zeros.
    const T sm_scale = T(f.scale);
    T* __restrict__ dq = static_cast<T*>(p.dq) + at.dq;
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        const int row = m0 + row0 + r;
        if (row < Lq) {
            T* dq_row = dq + (long long)row * p.dq_row_stride;
#pragma unroll
            for (int c = 0; c < TD; ++c) {
                const int col = simt::Cols<T, TD>::col(cg, c);
                if (col < D) dq_row[col] = dQ[r][c] * sm_scale;
            }
        }
    }
}

}  // namespace cuflash
