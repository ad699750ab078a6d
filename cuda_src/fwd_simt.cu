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
// therefore holds a TM x TN micro-tile of S (TN = kBlockN / 16: keys cg, cg + 16, ... of the
// tile, cg = the lane's column group) and a TM x TD micro-tile of the output (TD = kHeadDim / 16)
// for the SAME rows, so the online-softmax rescale of acc is purely thread-local and row
// reductions are four shuffles inside a half-warp.
//
// Register tiling, as in an SGEMM. S = Q K^T: per 16-byte run of d (kDVec values) a lane loads
// its TN keys' runs (one vector each) and, per d, its TM values of Q^T, then issues
// TM * TN * kDVec FMAs. O += P V: per key a lane loads TM values of P^T and TD of V (vectors).
//
// Shared memory (all tiles zero-padded, so no arithmetic ever touches uninitialised memory):
//   Qt [kHeadDim][kBlockM + pad]   Q transposed: a lane's TM rows are contiguous
//   Ks [kBlockN][kHeadDim + pad]   K as is:      a key's d-runs are contiguous
//   Vs [kBlockN][kHeadDim + pad]   V as is:      a lane's TD columns are contiguous
//   Pt [kBlockN][kBlockM + pad]    P transposed: a lane's TM rows are contiguous
// pad = 16 bytes keeps every row 16-byte aligned and staggers rows by four banks: the 16 lanes
// of a row group read 16 different key rows of Ks (and write 16 of Pt) in distinct banks, and
// the transposing copy of Q is conflict-free.
//
// Pipelining (kStages == 1: one buffer each for K and V). Global -> shared copies are
// cp.async (no registers held, zero-fill past the ends; 16-byte vectors where rows allow,
// else elements): V_t is fetched while S_t = Q K_t^T is computed, and K_{t+1} while
// O += P_t V_t is, so every copy hides behind half a tile of arithmetic with two barriers per tile.
#include "params.cuh"
#include "mask.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "simt_tile.cuh"

namespace cuflash {

namespace simt {
// Blocks per SM that ptxas must fit in registers, and the unroll of the two inner products.
// Two resident blocks let one block's softmax, barriers and copies hide behind the other's
// FMAs (measured +3% for fp32 d64 128x64, +7% for fp64 d64 64x32 on H100): asked for where
// the micro-tiles are small enough (<= 128 registers without spilling). Without
// any minimum ptxas caps these kernels at 128 registers and spills, so the rest ask for 1.
template <typename T, int TM, int TN, int TD, bool kHasWindow, bool kScoreMods>
struct Occupancy {
    static constexpr int kWords = sizeof(T) / 4;
    // The window's per-element test needs a few registers more: with both micro-tiles at the
    // limit (fp32 d64 128x64) the window variant takes one block per SM; score modifiers more
    // still (ptxas spills on some archs; a bias's and a mask's reads at fp32 d96, TM * TD = 24,
    // on sm_80): with either near the limit.
    static constexpr bool kTwo = kWords * TM * TD <= 32 && kWords * TM * TN <= 32 &&
                                 !(kHasWindow && kWords * TM * TD == 32 && kWords * TM * TN == 32) &&
                                 !(kScoreMods && (kWords * TM * TD >= 24 || kWords * TM * TN >= 24));
    static constexpr int kMinBlocks = kTwo ? 2 : 1;
    // Keys of P V per unrolled step: deeper unrolling lets the next keys' loads issue under the
    // current FFMAs. At 128 registers the window's per-element test leaves no room (ptxas
    // spills); fp32 d64 measured 2 -> 4 (two blocks) +3%, 4 -> 8 (one block) +2..5%.
    static constexpr int kUnroll = kMinBlocks >= 2 ? (kHasWindow ? 1 : 4) : 8;
    // d-runs of S = Q K^T per unrolled step, likewise (fp32 d64: +1..3%).
    static constexpr int kSUnroll = kMinBlocks >= 2 && kHasWindow ? 1 : 2;
};
}  // namespace simt

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned fwd_simt_smem_bytes() {
    // Qt [d][m], Ks and Vs [n][d], Pt [n][m], rows padded by 16 bytes.
    constexpr int kPad = 16 / sizeof(Element);
    return sizeof(Element) * (kHeadDim * (kBlockM + kPad) + 2 * kBlockN * (kHeadDim + kPad) + kBlockN * (kBlockM + kPad));
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32,
                                  (simt::Occupancy<Element, kBlockM / (2 * kWarps), kBlockN / 16, kHeadDim / 16, kHasWindow,
                                                   kScoreMods>::kMinBlocks))
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
    constexpr int kUnroll = simt::Occupancy<T, TM, TN, TD, kHasWindow, kScoreMods>::kUnroll;
    constexpr int kSUnroll = simt::Occupancy<T, TM, TN, TD, kHasWindow, kScoreMods>::kSUnroll;
    using ColsD = simt::Cols<T, TD>;
    constexpr int kDVec = 16 / sizeof(T);  // d values per 16-byte run of a K row (the copies' unit)
    static_assert(kHeadDim % kDVec == 0, "whole 16-byte runs of d");
    // d values per read of a K row in S = Q K^T: a 16-byte run, or 8 bytes where two blocks per SM
    // leave no room for TN 16-byte runs in registers (TD < 4, d32: ptxas spills otherwise).
    constexpr bool kTight = simt::Occupancy<T, TM, TN, TD, kHasWindow, kScoreMods>::kMinBlocks >= 2 && TD < 4;
    constexpr int kKRead = kTight ? 8 / int(sizeof(T)) : kDVec;

    constexpr int kPad = 16 / sizeof(T);
    constexpr int kLdQ = kBlockM + kPad;   // Qt and Pt row length
    constexpr int kLdKV = kHeadDim + kPad; // Ks and Vs row length
    constexpr unsigned kSmemBytes = fwd_simt_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();

    // The host sizes dynamic shared memory from tiles.shared_memory_bytes; a mismatch would
    // silently overrun, so stop here instead.
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qt = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qt + kHeadDim * kLdQ;
    T* Vs = Ks + kBlockN * kLdKV;
    T* Pt = Vs + kBlockN * kLdKV;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int cg = lane & 15;                                  // column group inside the row group
    const int row0 = warp * 2 * TM + (lane >> 4) * TM;         // first of this lane's TM rows

    const BlockCoord block = scheduled_block<kHasWindow>(p);  // schedule.cuh
    const int tile_m = block.block;
    const int m0 = tile_m * kBlockM;
    BatchIndex bi;
    if (!starts_block<T, T>(p, block.bh, tile_m, m0, kBlockM, bi)) return;  // params.cuh
    const T* __restrict__ q = static_cast<const T*>(p.q) + bi.q;
    const T* __restrict__ k = static_cast<const T*>(p.k) + bi.k;
    const T* __restrict__ v = static_cast<const T*>(p.v) + bi.v;
    const int Lq = bi.seqlen_q, Lk = bi.seqlen_k, D = p.head_dim, Dv = p.head_dim_v;

    const Mask<kHasWindow, kScoreMods> mask(p, bi);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // Transposing copy of a (rows x kHeadDim) slab of q into dst[d][row]. Each warp
    // instruction covers 8 consecutive d (one 32-byte sector of global memory) for 4 rows;
    // with rows padded by 16 bytes these 32 lanes land in 32 distinct banks.
    auto load_transposed = [&](T* dst, int ld, const T* src, long long row_stride, int row_base, int rows,
                               int row_limit) {
        constexpr int kDGroups = kHeadDim / 8;  // warp instructions per group of 4 rows
        if constexpr (kWarps % kDGroups == 0) {
            // Each lane keeps one column d and walks rows (simt_tile.cuh).
            constexpr int kRowStep = 4 * (kWarps / kDGroups);
            const int d = (warp % kDGroups) * 8 + (lane & 7);
            const int r0 = (warp / kDGroups) * 4 + (lane >> 3);
            simt::copy_down_column<kRowStep, sizeof(T)>(src, row_stride, row_base, r0, rows, row_limit, d, D,
                                                        [&](int r) { return dst + d * ld + r; });
        } else {
            const int total = rows * kHeadDim;
#pragma unroll 1
            for (int e = tid; e < total; e += kThreads) {
                const int w = e >> 5, l = e & 31;
                const int d = (w % kDGroups) * 8 + (l & 7);
                const int r = (w / kDGroups) * 4 + (l >> 3);
                const int gr = row_base + r;
                const bool ok = gr < row_limit && d < D;
                ptx::cp_async_elem<sizeof(T)>(dst + d * ld + r, ok ? src + (long long)gr * row_stride + d : src, ok);
            }
        }
    };
    // Straight copy of kBlockN rows (keys n0..) of k or v into dst[j][d], zero past `width` and
    // past Lk. Rows whose every 16-byte run is aligned (vec: width, row stride and base in whole
    // runs) go as 16-byte cp.async, four to eight times fewer copies; otherwise element by
    // element (simt::load_rows). Where the threads divide into whole runs, each lane keeps one
    // run and walks rows (simt_tile.cuh).
    auto load_kv = [&](T* dst, const T* src, long long row_stride, int n0, int width, bool vec) {
        constexpr int kRuns = kHeadDim / kDVec;
        if (vec && kThreads % kRuns != 0) {
#pragma unroll 1
            for (int e = tid; e < kBlockN * kRuns; e += kThreads) {
                const int j = e / kRuns, d = (e % kRuns) * kDVec;
                const bool ok = n0 + j < Lk && d < width;
                ptx::cp_async_16(ptx::smem_addr(dst + j * kLdKV + d), ok ? src + (long long)(n0 + j) * row_stride + d : src,
                                 ok ? 16 : 0);
            }
        } else if (vec) {
            const int d = (tid % kRuns) * kDVec;
            simt::copy_down_column<kThreads / kRuns, 16>(src, row_stride, n0, tid / kRuns, kBlockN, Lk, d, width,
                                                         [&](int j) { return dst + j * kLdKV + d; });
        } else {
            simt::load_rows<T, kHeadDim, kThreads>(dst, kLdKV, src, row_stride, n0, kBlockN, Lk, width, tid);
        }
    };
    auto whole_runs = [](const T* base, long long row_stride, int width) {
        return width % kDVec == 0 && row_stride % kDVec == 0 && (reinterpret_cast<unsigned long long>(base) & 15) == 0;
    };
    const bool k_vec = whole_runs(k, p.k_row_stride, D), v_vec = whole_runs(v, p.v_row_stride, Dv);

    // Score modifiers (score_mod.cuh). Q is negated for a negative scale: |scale| here.
    const ScoreMod<T> mod(p, block.bh, static_cast<T>(p.scale < 0 ? -p.scale : p.scale), M::unit(), mask.diag);
    const T sink = mod.sink(p, block.bh, M::unit());  // any Variant: sinks alone run the plain ones

    // Running statistics of the paper, per owned row: m_i = max_j s_ij (scaled), l_i = sum_j
    // exp(s_ij - m_i) (this lane's partial sum; reduced over the row group once at the end),
    // acc = sum_j exp(s_ij - m_i) v_j. A sink is a logit already seen: m_i = sink, l_i = 1
    // (1/16 in each lane of the row group).
    T m_i[TM], l_i[TM], acc[TM][TD];
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        m_i[r] = sink;
        l_i[r] = sink == M::neg_inf() ? T(0) : T(0.0625);
#pragma unroll
        for (int c = 0; c < TD; ++c) acc[r][c] = T(0);
    }
    // c of simt::Math: |scale|, log2 units for float; 1 for modified scores (score_mod.cuh).
    const T scale = kScoreMods && mod.modifies() ? T(1) : M::softmax_scale(p);

    if (range.first < range.last) {
        load_transposed(Qt, kLdQ, q, p.q_row_stride, m0, kBlockM, Lq);
        load_kv(Ks, k, p.k_row_stride, range.first * kBlockN, D, k_vec);
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
        __syncthreads();
        // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q is negated (exactly),
        // so that the row max can be taken on the raw scores (the scale folds into the FMA of p).
        if (p.scale < 0) {
            for (int e = tid; e < kHeadDim * kLdQ; e += kThreads) Qt[e] = -Qt[e];
            __syncthreads();
        }
    }

    for (int t = range.first; t < range.last; ++t) {
        const int n0 = t * kBlockN;
        // V_t streams in while S_t is computed.
        load_kv(Vs, v, p.v_row_stride, n0, Dv, v_vec);
        ptx::cp_async_commit();

        // S = Q K^T on this lane's TM x TN micro-tile: s[r][c] = sum_d Q[row r, d] K[key cg + 16c, d],
        // d ascending.
        T s[TM][TN];
        simt::zero(s);
#pragma unroll kSUnroll
        for (int d0 = 0; d0 < kHeadDim; d0 += kKRead) {
            T b[TN][kKRead];
#pragma unroll
            for (int c = 0; c < TN; ++c) simt::lds(b[c], Ks + (cg + 16 * c) * kLdKV + d0);
#pragma unroll
            for (int dd = 0; dd < kKRead; ++dd) {
                T a[TM];
                simt::lds(a, Qt + (d0 + dd) * kLdQ + row0);
#pragma unroll
                for (int r = 0; r < TM; ++r)
#pragma unroll
                    for (int c = 0; c < TN; ++c) s[r][c] = fma(a[r], b[c][dd], s[r][c]);
            }
        }

        // Score modifiers (score_mod.cuh): the scores in the exponent's units (scale = 1).
        if constexpr (kScoreMods)
            simt::modify_scores(mod, s, [&](int r, int c) { return simt::QK{m0 + row0 + r, n0 + cg + 16 * c}; });

        // On tiles that cross an edge of the visible region, mask: s_ij = -inf for keys j the
        // query i may not see (also keys past Lk). Interior tiles skip the test. Scores stay
        // raw (unless modified): the scale is applied in the exponent.
        const bool masked = t < range.full_first || t >= range.full_last;
        if (masked) {
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TN; ++c)
                    if (!mask.visible(m0 + row0 + r, n0 + cg + 16 * c)) s[r][c] = M::neg_inf();
        }

        // Online softmax (c = scale, see above):  m_new = max(m_i, c max_j s_ij);
        //   alpha = exp(m_i - m_new);  p_ij = exp(s_ij c - m_new);  l_i = alpha l_i + sum_j p_ij;
        //   acc = alpha acc.
        // A row that has seen no visible key keeps m = -inf; it subtracts 0 instead, so every
        // p stays exp(-inf) = 0 and alpha = 0, never NaN.
#pragma unroll
        for (int r = 0; r < TM; ++r) {
            T mx = s[r][0];
#pragma unroll
            for (int c = 1; c < TN; ++c) mx = max(mx, s[r][c]);
#pragma unroll
            for (int off = 8; off >= 1; off >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const T m_new = max(m_i[r], mx * scale);
            const T m_use = m_new == M::neg_inf() ? T(0) : m_new;
            const T alpha = M::exp(m_i[r] - m_use);
            m_i[r] = m_new;
            T sum = T(0);
#pragma unroll
            for (int c = 0; c < TN; ++c) {
                s[r][c] = M::exp(fma(s[r][c], scale, -m_use));
                sum += s[r][c];
            }
            l_i[r] = fma(l_i[r], alpha, sum);
#pragma unroll
            for (int c = 0; c < TD; ++c) acc[r][c] *= alpha;
        }

        // Dropout (dropout.cuh): P o Z * scale for P V; l_i has summed the undropped P.
        if (kDropout && p.dropout_threshold) {
            simt::DropBits<TM, TN> keep;
            keep.draw(Dropout(p, block.bh), [&](int r, int c) { return simt::QK{m0 + row0 + r, n0 + cg + 16 * c}; });
            keep.apply(s, static_cast<T>(p.dropout_scale));
        }

        // P to shared memory, transposed (Pt[key][row]) so the P V loop reads a lane's TM rows
        // as one vector. The previous tile's readers of Pt finished at the last barrier.
#pragma unroll
        for (int c = 0; c < TN; ++c) {
            T col[TM];
#pragma unroll
            for (int r = 0; r < TM; ++r) col[r] = s[r][c];
            simt::sts(Pt + (cg + 16 * c) * kLdQ + row0, col);
        }

        ptx::cp_async_wait<0>();  // V_t (this thread's part)
        __syncthreads();      // all of V_t and P visible; nobody reads K_t any more
        if (t + 1 < range.last) {
            // K_{t+1} streams in while O += P V_t is computed.
            load_kv(Ks, k, p.k_row_stride, n0 + kBlockN, D, k_vec);
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
                simt::lds(bv, Vs + j * kLdKV + ColsD::chunk(cg, ch));
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
    // l_i = 0: it writes O = 0 and lse = -inf (with a sink: l_i = 1, O = 0 and lse = sink). A row
    // whose scores hold NaN has l_i = NaN: != 0 lets it through, so O and lse are NaN (softmax_tc.cuh).
    T* __restrict__ o = static_cast<T*>(p.o) + bi.o;
    T* __restrict__ lse = static_cast<T*>(p.lse) + bi.lse;
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        T l = l_i[r];
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        const T inv = l != T(0) ? T(1) / l : T(0);
        const int row = m0 + row0 + r;
        if (row < Lq) {
            T* orow = o + (long long)row * p.o_row_stride;
#pragma unroll
            for (int ch = 0; ch < ColsD::kChunks; ++ch)
#pragma unroll
                for (int u = 0; u < ColsD::kVec; ++u) {
                    const int c = ColsD::chunk(cg, ch) + u;
                    if (c < Dv) orow[c] = acc[r][ch * ColsD::kVec + u] * inv;
                }
            if (cg == 0) lse[row] = l != T(0) ? M::lse(m_i[r], l) : M::neg_inf();
        }
    }
}

}  // namespace cuflash
