// Exact FlashAttention-2 forward for float64 on the fp64 tensor cores (DMMA).
//
// mma.sync m8n8k4 .f64 computes D = A B + D with IEEE fp64 fused multiply-adds, so the result
// is as exact as the DFMA kernel (fwd_simt) but runs on the tensor pipe: ~2x the DFMA peak on
// H100. The algorithm is the paper's: for each block of query rows, stream key/value tiles
// through shared memory, keep a running row maximum m_i and denominator l_i, rescale the
// output accumulator acc once per tile, normalise once at the end. Softmax is in fp64 with the
// exact double scale and the library exp() / log().
//
// Work split. A block of kWarps warps owns kBlockM query rows; a warp owns WM = kBlockM / kWarps
// of them (MT = WM / 8 row tiles of 8), every key of the tile and every output column. A warp
// therefore holds S as MT x NT 8x8 accumulator tiles (NT = kBlockN / 8) and acc as MT x DT
// (DT = kHeadDim / 8). In the accumulator layout lane (g = lane / 4, t = lane % 4) holds row g,
// columns 2t and 2t + 1 of each tile, so row reductions are two shuffles across the 4 lanes of
// a quad and the online-softmax rescale is thread-local.
//
// Index permutations (the trick that makes every operand one 16-byte load or a register).
// An inner product may visit its summation index in any order, as long as both operands agree.
//  * S = Q K^T: m8n8k4's A fragment is (row g, k = t) and B's (k = t, col g), so both operands
//    read "row g, element t of a 4-wide slice of d". Two consecutive k-steps instead read
//    d = 8c + 2t (step 0) and d = 8c + 2t + 1 (step 1): one double2 per lane feeds both.
//  * acc += P V: lane (g, t) holds P at keys 2t and 2t + 1 of each 8-key tile; A wants (row g,
//    k = t). Step e of the tile uses key 2t + e as its k = t, so P is consumed straight from
//    the S accumulators, and the V fragment (k = t, col g) is read at key 2t + e.
//  * Output columns: for a pair of 8-column tiles (2c, 2c + 1), tile column n is the actual
//    column 16c + 2n + (tile & 1), so a lane's V operands for both tiles are one double2
//    (columns 16c + 2g, 16c + 2g + 1). Lane (g, t) then holds actual columns 16c + 4t .. + 3.
//
// Shared memory, row-major, each row padded by 2 doubles (16 bytes): Q [kBlockM][kHeadDim + 2],
// K and V [kBlockN][kHeadDim + 2]. With that pitch the 16-byte fragment loads above put every
// quarter-warp on 8 distinct 16-byte bank groups (4 wavefronts per LDS.128: the minimum).
// Everything is zero-padded (past D, Dv, Lq, Lk), so no arithmetic touches uninitialised memory.
//
// Instruction shape. sm_80 has only m8n8k4 for fp64. sm_90 adds m16n8k8, which is exactly two
// row tiles times two k-steps of m8n8k4 in the same register layout (ptx::dmma_1688): with an
// even number of row tiles per warp the kernel issues that instead, a quarter of the MMA
// instructions (measured on H100, fp64 d64: 19 TF/s with m8n8k4 -> 25 TF/s).
//
// Copies are element-wise cp.async (simt::load_rows: any row stride, zero-fill, no registers),
// overlapped by phase as in fwd_simt: V_t lands during S_t = Q K_t^T, K_{t+1} during acc += P_t V_t.
#include "params.cuh"
#include "dmma_tile.cuh"
#include "mask.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "simt_tile.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned fwd_dmma_smem_bytes() {
    // Qs, Ks, Vs row-major, rows of kHeadDim + 2 doubles.
    return sizeof(Element) * (kBlockM + 2 * kBlockN) * (kHeadDim + 2);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false>
__global__ void __launch_bounds__(kWarps * 32, 1) fwd_dmma(const FwdParams p) {
    using T = Element;
    static_assert(sizeof(T) == 8, "DMMA is the float64 kernel");
    constexpr int kThreads = kWarps * 32;
    constexpr int WM = kBlockM / kWarps;  // query rows per warp
    constexpr int MT = WM / 8;            // 8-row tiles per warp
    constexpr int NT = kBlockN / 8;       // 8-key tiles
    constexpr int DT = kHeadDim / 8;      // 8-column tiles of the output
    static_assert(MT * 8 * kWarps == kBlockM && MT >= 1, "kBlockM = 8 * MT * kWarps");
    static_assert(NT * 8 == kBlockN && kHeadDim % 16 == 0, "kBlockN % 8 == 0, kHeadDim % 16 == 0");
    static_assert(kStages == 1, "K and V are single-buffered and overlapped by phase");
    // sm_90 multiplies pairs of row tiles with one m16n8k8 (ptx::dmma_1688) instead of four
    // m8n8k4: same operands, same layout, a quarter of the instructions.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kPairs = MT % 2 == 0;
#else
    constexpr bool kPairs = false;
#endif

    constexpr int kLd = kHeadDim + 2;  // row pitch of Qs, Ks, Vs (see the bank note above)
    constexpr unsigned kSmemBytes = fwd_dmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();

    // The host sizes dynamic shared memory from tiles.shared_memory_bytes; a mismatch would
    // silently overrun, so stop here instead.
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + kBlockM * kLd;
    T* Vs = Ks + kBlockN * kLd;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;  // fragment row (accumulator) / column (B operand)
    const int tq = lane & 3;  // position in the quad

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

    // This lane's fragment bases (see the index permutations above).
    const T* q_frag = Qs + (warp * WM + g) * kLd + 2 * tq;  // + 8 mi kLd + 8c: Q[row][8c + 2t ..]
    const T* k_frag = Ks + g * kLd + 2 * tq;                 // + 8 ni kLd + 8c: K[key][8c + 2t ..]
    const T* v_frag = Vs + 2 * tq * kLd + 2 * g;             // + (8 ni + e) kLd + 16c: V[key 2t+e][16c + 2g ..]

    // Score modifiers (score_mod.cuh), in natural units (unit 1).
    const ScoreMod<T> mod(p, block.bh, p.scale, T(1), mask.diag);
    const T neg_inf = -__longlong_as_double(0x7ff0000000000000ll);
    const T sink = mod.sink(p, block.bh, T(1));  // any Variant: sinks alone run the plain ones

    // Running statistics of the paper, per owned row (one per row tile: row g of tile mi):
    // m_i = max_j s_ij (scaled), l_i = sum_j exp(s_ij - m_i) (this lane's partial sum, reduced
    // over the quad once at the end), acc = sum_j exp(s_ij - m_i) v_j. A sink is a logit
    // already seen: m_i = sink, l_i = 1 (1/4 in each lane of the quad).
    T m_i[MT], l_i[MT], acc[MT][DT][2];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
        m_i[mi] = sink;
        l_i[mi] = sink == neg_inf ? T(0) : T(0.25);
#pragma unroll
        for (int di = 0; di < DT; ++di) acc[mi][di][0] = acc[mi][di][1] = T(0);
    }
    // Score modifiers replace the scale: the scores are modified instead (scale = 1).
    const T scale = kScoreMods && mod.modifies() ? T(1) : p.scale;

    if (range.first < range.last) {
        simt::load_rows<T, kHeadDim, kThreads>(Qs, kLd, q, p.q_row_stride, m0, kBlockM, Lq, D, tid);
        simt::load_rows<T, kHeadDim, kThreads>(Ks, kLd, k, p.k_row_stride, range.first * kBlockN, kBlockN, Lk, D, tid);
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
        __syncthreads();
    }

    for (int t = range.first; t < range.last; ++t) {
        const int n0 = t * kBlockN;
        // V_t streams in while S_t is computed.
        simt::load_rows<T, kHeadDim, kThreads>(Vs, kLd, v, p.v_row_stride, n0, kBlockN, Lk, Dv, tid);
        ptx::cp_async_commit();

        // S = Q K^T:  s_ij = sum_d Q[i, d] K[j, d], 8 d per step c (two DMMA k-steps, see above).
        // m8n8k4 path: all .x products of a step before its .y products, so consecutive DMMAs
        // never share an accumulator.
        T s[MT][NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int ni = 0; ni < NT; ++ni) s[mi][ni][0] = s[mi][ni][1] = T(0);
#pragma unroll
        for (int c = 0; c < kHeadDim / 8; ++c) {
            double2 a[MT], b[NT];
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) a[mi] = *reinterpret_cast<const double2*>(q_frag + 8 * mi * kLd + 8 * c);
#pragma unroll
            for (int ni = 0; ni < NT; ++ni) b[ni] = *reinterpret_cast<const double2*>(k_frag + 8 * ni * kLd + 8 * c);
            if constexpr (kPairs) {
#pragma unroll
                for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                    for (int mi = 0; mi < MT; mi += 2)
                        ptx::dmma_1688(s[mi][ni], s[mi + 1][ni], a[mi].x, a[mi + 1].x, a[mi].y, a[mi + 1].y, b[ni].x,
                                       b[ni].y);
            } else {
#pragma unroll
                for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) ptx::dmma_884(s[mi][ni], a[mi].x, b[ni].x);
#pragma unroll
                for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) ptx::dmma_884(s[mi][ni], a[mi].y, b[ni].y);
            }
        }

        // Scale (or modify: score_mod.cuh), and on tiles that cross an edge of the visible
        // region, mask: s_ij = -inf for keys j the query i may not see (also keys past Lk).
        // Interior tiles skip the test.
        // Lane (g, t) holds row 8 mi + g, keys 8 ni + 2t + {0, 1} of the warp's tile.
        const bool masked = t < range.full_first || t >= range.full_last;
        if constexpr (kScoreMods) {
            simt::modify_scores(mod, reinterpret_cast<T(&)[MT][2 * NT]>(s), [&](int mi, int c) {
                return simt::QK{m0 + warp * WM + 8 * mi + g, n0 + 8 * (c / 2) + 2 * tq + c % 2};
            });
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int ni = 0; ni < NT; ++ni) {
                s[mi][ni][0] *= scale;
                s[mi][ni][1] *= scale;
            }
        if (masked) {
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
                const int row = m0 + warp * WM + 8 * mi + g;
#pragma unroll
                for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (!mask.visible(row, n0 + 8 * ni + 2 * tq + e)) s[mi][ni][e] = neg_inf;
            }
        }

        // Online softmax:  m_new = max(m_i, max_j s_ij);  alpha = exp(m_i - m_new);
        //   p_ij = exp(s_ij - m_new);  l_i = alpha l_i + sum_j p_ij;  acc = alpha acc.
        // A row that has seen no visible key keeps m = -inf; it subtracts 0 instead, so every
        // p stays exp(-inf) = 0 and alpha = 0, never NaN.
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            T mx = s[mi][0][0];
#pragma unroll
            for (int ni = 0; ni < NT; ++ni) mx = max(mx, max(s[mi][ni][0], s[mi][ni][1]));
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const T m_new = max(m_i[mi], mx);
            const T m_use = m_new == neg_inf ? T(0) : m_new;
            const T alpha = ::exp(m_i[mi] - m_use);
            m_i[mi] = m_new;
            T sum = T(0);
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    s[mi][ni][e] = ::exp(s[mi][ni][e] - m_use);
                    sum += s[mi][ni][e];
                }
            l_i[mi] = fma(l_i[mi], alpha, sum);
#pragma unroll
            for (int di = 0; di < DT; ++di) {
                acc[mi][di][0] *= alpha;
                acc[mi][di][1] *= alpha;
            }
        }

        ptx::cp_async_wait<0>();  // V_t (this thread's part)
        __syncthreads();          // all of V_t visible; nobody reads K_t any more
        if (t + 1 < range.last) {
            // K_{t+1} streams in while acc += P V_t is computed.
            simt::load_rows<T, kHeadDim, kThreads>(Ks, kLd, k, p.k_row_stride, n0 + kBlockN, kBlockN, Lk, D, tid);
            ptx::cp_async_commit();
        }

        // acc += P V:  acc[i, c] += sum_j P[i, j] V[j, c]. P is the S accumulators themselves:
        // step e of key tile ni takes this lane's p at key 8 ni + 2t + e as its A operand
        // (dmma_tile.cuh).
        dmma::acc_times_rows<MT, NT, DT>(acc, s, v_frag, kLd);

        ptx::cp_async_wait<0>();  // K_{t+1}
        __syncthreads();          // K_{t+1} visible; Vs free for the next tile
    }

    // Single normalisation: O = acc / l_i, lse = m_i + log(l_i). A row that saw no key has
    // l_i = 0: it writes O = 0 and lse = -inf (with a sink: l_i = 1, O = 0 and lse = sink). A row
    // whose scores hold NaN has l_i = NaN: != 0 lets it through, so O and lse are NaN (softmax_tc.cuh).
    T* __restrict__ o = static_cast<T*>(p.o) + bi.o;
    T* __restrict__ lse = static_cast<T*>(p.lse) + bi.lse;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
        T l = l_i[mi];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = m0 + warp * WM + 8 * mi + g;
        if (row < Lq) {
            T* orow = o + (long long)row * p.o_row_stride;
#pragma unroll
            for (int c = 0; c < DT / 2; ++c) {
                // Actual columns 16c + 4t + {0, 1, 2, 3}: (tile 2c, col 2t), (2c + 1, 2t),
                // (2c, 2t + 1), (2c + 1, 2t + 1) in the permuted layout.
                const T out[4] = {acc[mi][2 * c][0], acc[mi][2 * c + 1][0], acc[mi][2 * c][1], acc[mi][2 * c + 1][1]};
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int col = 16 * c + 4 * tq + u;
                    if (col < Dv) orow[col] = l != T(0) ? out[u] / l : T(0);
                }
            }
            if (tq == 0) lse[row] = l != T(0) ? m_i[mi] + ::log(l) : neg_inf;
        }
    }
}

}  // namespace cuflash
