// Exact FlashAttention-2 forward for float32 and float64, on the FFMA / DFMA pipes.
//
// No tensor cores: every product is an IEEE fp32 (or fp64) fused multiply-add, so the result
// is within that type's rounding of the float64 reference (never TF32). The algorithm is the
// paper's: for each block of query rows, stream key/value tiles through shared memory, keep a
// running row maximum m_i and denominator l_i, rescale the output accumulator acc once per
// tile, normalise once at the end.
//
// Work split. A block of kWarps warps owns kBlockM query rows. Each warp owns 2 * TM rows,
// as two "row groups" of 16 lanes; within a row group the 16 lanes split the columns. A lane
// therefore holds a TM x TN micro-tile of S (TN = kBlockN / 16) and a TM x TD micro-tile of
// the output (TD = kHeadDim / 16) for the SAME rows, so the online-softmax rescale of acc is
// purely thread-local and row reductions are four shuffles inside a half-warp.
//
// Register tiling, as in an SGEMM: per step k of the inner product a lane loads TM values of
// Q^T and TN values of K^T from shared memory (16-byte vectors) and issues TM * TN FMAs.
// The same holds for O += P V with P^T and V in shared memory.
//
// Shared memory (all tiles zero-padded, so no arithmetic ever touches uninitialised memory):
//   Qt [kHeadDim][kBlockM + pad]   Q transposed: a lane's TM rows are contiguous
//   Kt [kHeadDim][kBlockN + pad]   K transposed: a lane's TN keys are contiguous
//   Vs [kBlockN][kHeadDim + pad]   V as is:      a lane's TD columns are contiguous
//   Pt [kBlockN][kBlockM + pad]   P transposed: a lane's TM rows are contiguous
// pad = 16 bytes keeps every row 16-byte aligned and staggers rows by four banks, which makes
// the transposing copies below conflict-free.
//
// Pipelining (kStages == 1: one buffer each for K and V). Global -> shared copies are
// cp.async (no registers held, any alignment, zero-fill past the ends): V_t is fetched while
// S_t = Q K_t^T is computed, and K_{t+1} while O += P_t V_t is, so every copy hides behind
// half a tile of arithmetic with two barriers per tile.
#include "params.cuh"
#include "mask.cuh"
#include "ptx.cuh"
#include "simt_tile.cuh"

namespace cuflash {
namespace simt {

// The softmax's exponential. float32 works in base 2: s is multiplied by scale * log2(e)
// (p.scale_log2, rounded once) and exponentiated with exp2f, the full-accuracy library function
// (2 ulp; not __expf, not fast-math); m_i is then in log2 units and lse = m_i ln 2 + log l_i.
// float64 works in base e with the exact double scale: p_ij = exp(s_ij * scale - m_i).
template <typename T> struct Math;
template <> struct Math<float> {
    static __device__ __forceinline__ float scale(const FwdParams& p) { return p.scale_log2; }
    static __device__ __forceinline__ float exp(float x) { return exp2f(x); }
    static __device__ __forceinline__ float lse(float m, float l) { return fmaf(m, 0.693147180559945309f, logf(l)); }
    static __device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
};
template <> struct Math<double> {
    static __device__ __forceinline__ double scale(const FwdParams& p) { return p.scale; }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double lse(double m, double l) { return m + ::log(l); }
    static __device__ __forceinline__ double neg_inf() { return -__longlong_as_double(0x7ff0000000000000ll); }
};

// Global -> shared copy of one element (zero-filled when !valid), through cp.async.
template <typename T>
__device__ __forceinline__ void copy_elem(T* dst, const T* src, bool valid) {
    ptx::cp_async_elem<sizeof(T)>(dst, src, valid);
}

}  // namespace simt

namespace simt {
// Blocks per SM that ptxas must fit in registers, and the unroll of the two inner products.
// Two resident blocks let one block's softmax, barriers and copies hide behind the other's
// FMAs (measured +3% for fp32 d64 128x64, +7% for fp64 d64 64x32 on H100): asked for where
// the micro-tiles are small enough (<= 128 registers without spilling). Without
// any minimum ptxas caps these kernels at 128 registers and spills, so the rest ask for 1.
// CUFLASH_SIMT_MIN_BLOCKS / CUFLASH_SIMT_UNROLL override both (experiments only).
template <typename T, int TM, int TN, int TD, bool kHasWindow>
struct Occupancy {
    static constexpr int kWords = sizeof(T) / 4;
    static constexpr bool kTwo = kWords * TM * TD <= 32 && kWords * TM * TN <= 32;
#ifdef CUFLASH_SIMT_MIN_BLOCKS
    static constexpr int kMinBlocks = CUFLASH_SIMT_MIN_BLOCKS;
#else
    static constexpr int kMinBlocks = kTwo ? 2 : 1;
#endif
#ifdef CUFLASH_SIMT_UNROLL
    static constexpr int kUnroll = CUFLASH_SIMT_UNROLL;
#else
    // At 128 registers the window's per-element test leaves no room to unroll (ptxas spills).
    static constexpr int kUnroll = kMinBlocks >= 2 ? (kHasWindow ? 1 : 2) : 4;
#endif
};
}  // namespace simt

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow>
__global__ void __launch_bounds__(kWarps * 32,
                                  (simt::Occupancy<Element, kBlockM / (2 * kWarps), kBlockN / 16, kHeadDim / 16, kHasWindow>::kMinBlocks))
    fwd_simt(const FwdParams p) {
    using T = Element;
    using M = simt::Math<T>;
    constexpr int kThreads = kWarps * 32;
    constexpr int TM = kBlockM / (2 * kWarps);  // query rows per lane
    constexpr int TN = kBlockN / 16;            // keys per lane
    constexpr int TD = kHeadDim / 16;           // output columns per lane
    static_assert(TM * 2 * kWarps == kBlockM && TM >= 1, "kBlockM = 2 * kWarps * TM");
    static_assert(TN * 16 == kBlockN && TD * 16 == kHeadDim, "kBlockN and kHeadDim are multiples of 16");
    static_assert(kHeadDim % 8 == 0 && kBlockN % 4 == 0 && kBlockM % 4 == 0, "copy mapping");
    static_assert(kStages == 1, "K and V are single-buffered and overlapped by phase");
    constexpr int kUnroll = simt::Occupancy<T, TM, TN, TD, kHasWindow>::kUnroll;
    using ColsN = simt::Cols<T, TN>;
    using ColsD = simt::Cols<T, TD>;

    constexpr int kPad = 16 / sizeof(T);
    constexpr int kLdQ = kBlockM + kPad;   // Qt and Pt row length
    constexpr int kLdK = kBlockN + kPad;   // Kt row length
    constexpr int kLdV = kHeadDim + kPad;  // Vs row length
    constexpr unsigned kSmemBytes = sizeof(T) * (kHeadDim * kLdQ + kHeadDim * kLdK + kBlockN * kLdV + kBlockN * kLdQ);

    // The host sizes dynamic shared memory from tiles.shared_memory_bytes; a mismatch would
    // silently overrun, so stop here instead.
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qt = reinterpret_cast<T*>(smem_raw);
    T* Kt = Qt + kHeadDim * kLdQ;
    T* Vs = Kt + kHeadDim * kLdK;
    T* Pt = Vs + kBlockN * kLdV;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int cg = lane & 15;                                  // column group inside the row group
    const int row0 = warp * 2 * TM + (lane >> 4) * TM;         // first of this lane's TM rows

    const int tile_m = kHasWindow ? int(gridDim.y) - 1 - int(blockIdx.y) : int(blockIdx.y);
    const int m0 = tile_m * kBlockM;
    const BatchIndex bi(p, blockIdx.x);
    const T* __restrict__ q = static_cast<const T*>(p.q) + bi.q;
    const T* __restrict__ k = static_cast<const T*>(p.k) + bi.k;
    const T* __restrict__ v = static_cast<const T*>(p.v) + bi.v;
    const int Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim, Dv = p.head_dim_v;

    const Mask<kHasWindow> mask(p);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // Transposing copy of a (rows x kHeadDim) slab of q or k into dst[d][row]. Each warp
    // instruction covers 8 consecutive d (one 32-byte sector of global memory) for 4 rows;
    // with rows padded by 16 bytes these 32 lanes land in 32 distinct banks.
    auto load_transposed = [&](T* dst, int ld, const T* src, long long row_stride, int row_base, int rows,
                               int row_limit) {
        constexpr int kDGroups = kHeadDim / 8;  // warp instructions per group of 4 rows
        if constexpr (kWarps % kDGroups == 0) {
            // Each lane keeps one column d and walks rows: the index math is a few adds.
            constexpr int kRowStep = 4 * (kWarps / kDGroups);
            const int d = (warp % kDGroups) * 8 + (lane & 7);
            int r = (warp / kDGroups) * 4 + (lane >> 3);
            const T* g = src + (long long)(row_base + r) * row_stride + d;
            const long long g_step = kRowStep * row_stride;
#pragma unroll 1
            for (; r < rows; r += kRowStep, g += g_step) {
                const bool ok = row_base + r < row_limit && d < D;
                simt::copy_elem(dst + d * ld + r, ok ? g : src, ok);
            }
        } else {
            const int total = rows * kHeadDim;
#pragma unroll 1
            for (int e = tid; e < total; e += kThreads) {
                const int w = e >> 5, l = e & 31;
                const int d = (w % kDGroups) * 8 + (l & 7);
                const int r = (w / kDGroups) * 4 + (l >> 3);
                const int gr = row_base + r;
                const bool ok = gr < row_limit && d < D;
                simt::copy_elem(dst + d * ld + r, ok ? src + (long long)gr * row_stride + d : src, ok);
            }
        }
    };
    // Straight copy of a V tile into Vs[j][d]: consecutive lanes, consecutive d. (A 16-byte
    // cp.async path for aligned rows measured no faster and cost the registers of the
    // two-blocks-per-SM fit, so V is copied by elements like Q and K.)
    auto load_v = [&](int n0) {
        if constexpr (kThreads % kHeadDim == 0) {
            // Each lane keeps one column d and walks keys.
            constexpr int kRowStep = kThreads / kHeadDim;
            const int d = tid % kHeadDim;
            int j = tid / kHeadDim;
            const T* g = v + (long long)(n0 + j) * p.v_row_stride + d;
            const long long g_step = kRowStep * p.v_row_stride;
#pragma unroll 1
            for (; j < kBlockN; j += kRowStep, g += g_step) {
                const bool ok = n0 + j < Lk && d < Dv;
                simt::copy_elem(Vs + j * kLdV + d, ok ? g : v, ok);
            }
        } else {
            constexpr int total = kBlockN * kHeadDim;
#pragma unroll 1
            for (int e = tid; e < total; e += kThreads) {
                const int j = e / kHeadDim, d = e % kHeadDim;
                const bool ok = n0 + j < Lk && d < Dv;
                simt::copy_elem(Vs + j * kLdV + d, ok ? v + (long long)(n0 + j) * p.v_row_stride + d : v, ok);
            }
        }
    };

    // Running statistics of the paper, per owned row: m_i = max_j s_ij (scaled), l_i = sum_j
    // exp(s_ij - m_i) (this lane's partial sum; reduced over the row group once at the end),
    // acc = sum_j exp(s_ij - m_i) v_j.
    T m_i[TM], l_i[TM], acc[TM][TD];
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        m_i[r] = M::neg_inf();
        l_i[r] = T(0);
#pragma unroll
        for (int c = 0; c < TD; ++c) acc[r][c] = T(0);
    }
    const T scale = M::scale(p);  // see Math: log2 units for float

    if (range.first < range.last) {
        load_transposed(Qt, kLdQ, q, p.q_row_stride, m0, kBlockM, Lq);
        load_transposed(Kt, kLdK, k, p.k_row_stride, range.first * kBlockN, kBlockN, Lk);
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
        __syncthreads();
    }

    for (int t = range.first; t < range.last; ++t) {
        const int n0 = t * kBlockN;
        // V_t streams in while S_t is computed.
        load_v(n0);
        ptx::cp_async_commit();

        // S = Q K^T on this lane's TM x TN micro-tile: s[r][c] = sum_d Q[row r, d] K[key c, d].
        T s[TM][TN];
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
            for (int c = 0; c < TN; ++c) s[r][c] = T(0);
#pragma unroll kUnroll
        for (int d = 0; d < kHeadDim; ++d) {
            T a[TM], b[TN];
            simt::lds(a, Qt + d * kLdQ + row0);
#pragma unroll
            for (int ch = 0; ch < ColsN::kChunks; ++ch) {
                T bv[ColsN::kVec];
                simt::lds(bv, Kt + d * kLdK + ColsN::col(cg, ch));
#pragma unroll
                for (int u = 0; u < ColsN::kVec; ++u) b[ch * ColsN::kVec + u] = bv[u];
            }
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TN; ++c) s[r][c] = fma(a[r], b[c], s[r][c]);
        }

        // Scale, and on tiles that cross an edge of the visible region, mask: s_ij = -inf for
        // keys j the query i may not see (also keys past Lk). Interior tiles skip the test.
        const bool masked = t < range.full_first || t >= range.full_last;
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
            for (int c = 0; c < TN; ++c) s[r][c] *= scale;
        if (masked) {
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int ch = 0; ch < ColsN::kChunks; ++ch)
#pragma unroll
                    for (int u = 0; u < ColsN::kVec; ++u) {
                        const int j = n0 + ColsN::col(cg, ch) + u;
                        if (!mask.visible(m0 + row0 + r, j)) s[r][ch * ColsN::kVec + u] = M::neg_inf();
                    }
        }

        // Online softmax:  m_new = max(m_i, max_j s_ij);  alpha = exp(m_i - m_new);
        //   p_ij = exp(s_ij - m_new);  l_i = alpha l_i + sum_j p_ij;  acc = alpha acc.
        // A row that has seen no visible key keeps m = -inf; it subtracts 0 instead, so every
        // p stays exp(-inf) = 0 and alpha = 0, never NaN.
#pragma unroll
        for (int r = 0; r < TM; ++r) {
            T mx = s[r][0];
#pragma unroll
            for (int c = 1; c < TN; ++c) mx = max(mx, s[r][c]);
#pragma unroll
            for (int off = 8; off >= 1; off >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const T m_new = max(m_i[r], mx);
            const T m_use = m_new == M::neg_inf() ? T(0) : m_new;
            const T alpha = M::exp(m_i[r] - m_use);
            m_i[r] = m_new;
            T sum = T(0);
#pragma unroll
            for (int c = 0; c < TN; ++c) {
                s[r][c] = M::exp(s[r][c] - m_use);
                sum += s[r][c];
            }
            l_i[r] = fma(l_i[r], alpha, sum);
#pragma unroll
            for (int c = 0; c < TD; ++c) acc[r][c] *= alpha;
        }

        // P to shared memory, transposed (Pt[key][row]) so the P V loop reads a lane's TM rows
        // as one vector. The previous tile's readers of Pt finished at the last barrier.
#pragma unroll
        for (int ch = 0; ch < ColsN::kChunks; ++ch)
#pragma unroll
            for (int u = 0; u < ColsN::kVec; ++u) {
                T col[TM];
#pragma unroll
                for (int r = 0; r < TM; ++r) col[r] = s[r][ch * ColsN::kVec + u];
                simt::sts(Pt + (ColsN::col(cg, ch) + u) * kLdQ + row0, col);
            }

        ptx::cp_async_wait<0>();  // V_t (this thread's part)
        __syncthreads();      // all of V_t and P visible; nobody reads K_t any more
        if (t + 1 < range.last) {
            // K_{t+1} streams in while O += P V_t is computed.
            load_transposed(Kt, kLdK, k, p.k_row_stride, n0 + kBlockN, kBlockN, Lk);
            ptx::cp_async_commit();
        }

        // acc += P V:  acc[r][c] += sum_j P[row r, j] V[j, col c].
#pragma unroll kUnroll
        for (int j = 0; j < kBlockN; ++j) {
            T a[TM], b[TD];
            simt::lds(a, Pt + j * kLdQ + row0);
#pragma unroll
            for (int ch = 0; ch < ColsD::kChunks; ++ch) {
                T bv[ColsD::kVec];
                simt::lds(bv, Vs + j * kLdV + ColsD::col(cg, ch));
#pragma unroll
                for (int u = 0; u < ColsD::kVec; ++u) b[ch * ColsD::kVec + u] = bv[u];
            }
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TD; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
        }

        ptx::cp_async_wait<0>();  // K_{t+1}
        __syncthreads();      // K_{t+1} visible; Vs and Pt free for the next tile
    }

    // Single normalisation: O = acc / l_i, lse = m_i + log(l_i). A row that saw no key has
    // l_i = 0: it writes O = 0 and lse = -inf.
    T* __restrict__ o = static_cast<T*>(p.o) + bi.o;
    T* __restrict__ lse = static_cast<T*>(p.lse) + bi.lse;
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        T l = l_i[r];
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        const T inv = l > T(0) ? T(1) / l : T(0);
        const int row = m0 + row0 + r;
        if (row < Lq) {
            T* orow = o + (long long)row * p.o_row_stride;
#pragma unroll
            for (int ch = 0; ch < ColsD::kChunks; ++ch)
#pragma unroll
                for (int u = 0; u < ColsD::kVec; ++u) {
                    const int c = ColsD::col(cg, ch) + u;
                    if (c < Dv) orow[c] = acc[r][ch * ColsD::kVec + u] * inv;
                }
            if (cg == 0) lse[row] = l > T(0) ? M::lse(m_i[r], l) : M::neg_inf();
        }
    }
}

}  // namespace cuflash
