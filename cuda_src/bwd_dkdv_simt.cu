// Exact FlashAttention-2 backward for float32 and float64: dK, dV (and dQ by atomics) over
// key tiles, on the FFMA / DFMA pipes (never TF32).
//
// A block owns kBlockN keys of one key/value head and a group of heads_per_block query heads
// that read it (attention rows bh0 + g, bh0 = blockIdx.x * heads_per_block; GQA): K_j and V_j
// stay in shared memory, the accumulators dK_j and dV_j in registers, summed over every head of
// the group and written once, as the group's (params.cuh). The block walks the steps (g, i):
// head g, query tile i that can see a key of the block (Mask::query_tiles); heads outer, one
// sequence of steps, so the next step's tiles load during the dQ product even across a head
// boundary. It recomputes the attention probabilities from the forward's lse instead of
// storing them:
//
//   S   = Q_i K_j^T                 P  = exp(S * scale - lse_i)      (P = 0 where masked)
//   dV_j += P^T dO_i                dP = dO_i V_j^T
//   dS  = P o (dP - delta_i)        delta_i = rowsum(dO_i o O_i), precomputed by the host
//   dK_j += dS^T Q_i                dQ_i += dS K_j   (atomics, unscaled; the host scales)
//   dK_j *= scale at the end.
// Under the score modifiers (kScoreMods, score_mod.cuh; head g's slope) P and dS come from the
// modified scores x, once S and dP are both computed: P = exp(x - lse_i), dS = P o (dP - delta_i)
// o dx / d(scale S).
//
// Work split (bwd_simt.cuh): S and dP are computed transposed, as keys x queries micro-tiles
// (a lane's TM keys are the same as its rows of dK_j and dV_j); P and dS go to shared memory,
// then dV, dK (keys x head-dim micro-tiles) and the dQ contribution (queries x head-dim) are
// outer products over shared memory. Shared memory holds every tile once, as it lies in global
// memory (rows padded by 16 bytes):
//   Ks, Vs [kBlockN][kHeadDim + pad]   K_j, V_j: B of dQ += dS K, A of S^T / dP^T
//   Qs, dOs [kBlockM][kHeadDim + pad]  Q_i, dO_i: B of S^T / dP^T and of dK / dV
//   Ps, dSs [kBlockM][kBlockN + pad]   P, dS by query row: A of dV += P^T dO, dK += dS^T Q
//   dSt [kBlockN][kBlockM + pad]       dS by key: A of dQ += dS K
//   lse_s, delta_s [kBlockM]
//
// Per step: three barriers. The next step's Q, dO, lse, delta stream in (cp.async) while the
// dQ contribution of this one is computed and added.
#include "bwd_simt.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_simt_smem_bytes() {
    // Ks, Vs, Qs, dOs [.][d], Ps and dSs [m][n], dSt [n][m] (rows padded by 16 bytes), lse and
    // delta [m].
    constexpr int kPad = 16 / sizeof(Element);
    constexpr int kLdD = kHeadDim + kPad, kLdN = kBlockN + kPad, kLdM = kBlockM + kPad;
    return sizeof(Element) * (2 * kBlockN * kLdD + 2 * kBlockM * kLdD + 2 * kBlockM * kLdN + kBlockN * kLdM + 2 * kBlockM);
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, simt_bwd::Tuning<Element>::kMinBlocks) bwd_dkdv_simt(const BwdParams p) {
    using T = Element;
    using M = simt::Math<T>;
    constexpr int kThreads = kWarps * 32;
    constexpr int kGroups = 2 * kWarps;      // row groups of 16 lanes
    constexpr int TK = kBlockN / kGroups;    // keys per lane (rows of S^T, dK, dV)
    constexpr int TQ = kBlockM / 16;         // queries per lane in S^T (columns cg + 16 c)
    constexpr int TQr = kBlockM / kGroups;   // queries per lane in the dQ contribution (rows)
    constexpr int TD = kHeadDim / 16;        // head-dim columns per lane of dK, dV, dQ
    static_assert(TK * kGroups == kBlockN && TK >= 1, "kBlockN = 2 * kWarps * TK");
    static_assert(TQr * kGroups == kBlockM && TQr >= 1, "kBlockM = 2 * kWarps * TQr");
    static_assert(TQ * 16 == kBlockM && TD * 16 == kHeadDim, "kBlockM and kHeadDim are multiples of 16");
    static_assert(kStages == 1, "single-buffered: Q_{i+1} overlaps the dQ phase of tile i");
    constexpr int kUnroll = simt_bwd::Tuning<T>::kUnroll;

    constexpr int kPad = 16 / sizeof(T);
    constexpr int kLdD = kHeadDim + kPad;  // Ks, Vs, Qs, dOs row length
    constexpr int kLdN = kBlockN + kPad;   // Ps, dSs row length
    constexpr int kLdM = kBlockM + kPad;   // dSt row length
    constexpr unsigned kSmemBytes = bwd_dkdv_simt_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();

    // The host sizes dynamic shared memory from tiles.shared_memory_bytes; a mismatch would
    // silently overrun, so stop here instead.
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + kBlockN * kLdD;
    T* Qs = Vs + kBlockN * kLdD;
    T* dOs = Qs + kBlockM * kLdD;
    T* Ps = dOs + kBlockM * kLdD;
    T* dSs = Ps + kBlockM * kLdN;
    T* dSt = dSs + kBlockM * kLdN;
    T* lse_s = dSt + kBlockN * kLdM;
    T* delta_s = lse_s + kBlockM;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int cg = lane & 15;                     // column lane inside the row group
    const int rg = (tid >> 5) * 2 + (lane >> 4);  // row group
    const int key0 = rg * TK;                     // first of this lane's keys in the tile
    const int qrow0 = rg * TQr;                   // first of this lane's query rows in the dQ phase

    const FwdParams& f = p.fwd;
    const int n0 = blockIdx.y * kBlockN;
    const int heads = p.heads_per_block;
    BwdBatchIndex at;  // the group's first row's
    if (!starts_key_block<T, T, kBlockN>(p, blockIdx.x * heads, blockIdx.y, n0, at)) return;  // params.cuh
    const T* __restrict__ k = static_cast<const T*>(f.k) + at.k;
    const T* __restrict__ v = static_cast<const T*>(f.v) + at.v;
    const bool with_dq = p.dq_accum != nullptr;
    const int Lq = at.seqlen_q, Lk = at.seqlen_k, D = f.head_dim, Dv = f.head_dim_v;

    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, Lq);

    // Q_i, dO_i, lse_i, delta_i of step (g, i): head g's rows (BwdBatchIndex::head).
    auto load_query_tile = [&](const HeadTileStep& s) {
        simt_bwd::load_query_side<T, kHeadDim, kThreads>(Qs, dOs, kLdD, lse_s, delta_s, p, at.head(p, s.g),
                                                         s.i * kBlockM, kBlockM, Lq, D, Dv, tid);
        ptx::cp_async_commit();
    };

    // dK_j, dV_j: this lane's TK keys x TD columns (Cols<TD> layout).
    T dK[TK][TD], dV[TK][TD];
#pragma unroll
    for (int r = 0; r < TK; ++r)
#pragma unroll
        for (int c = 0; c < TD; ++c) dK[r][c] = dV[r][c] = T(0);
    const T scale = M::score_scale(f);  // log2 units for float (simt::Math)

    const HeadTileStep first_step(range.first, range.last, heads);
    if (first_step.g < heads) {
        // K_j, V_j: zero past Lk and past D / Dv, so padded keys and columns add exact zeros.
        simt_bwd::load_rows<T, kHeadDim, kThreads>(Ks, kLdD, k, f.k_row_stride, n0, kBlockN, Lk, D, tid);
        simt_bwd::load_rows<T, kHeadDim, kThreads>(Vs, kLdD, v, f.v_row_stride, n0, kBlockN, Lk, Dv, tid);
        load_query_tile(first_step);
    }

    // Steps (g, i): every head g of the group over query tiles i in [range.first, range.last).
    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last)) {
        const int i = step.i;
        const int m0 = i * kBlockM;
        ptx::cp_async_wait<0>();  // Q_i, dO_i, lse_i, delta_i (and K_j, V_j the first time)
        __syncthreads();          // ... from every thread; the last tile's readers of P, dS are done

        // S^T = K_j Q_i^T on this lane's TK keys x TQ queries (queries cg + 16 c).
        T s[TK][TQ];
        simt::zero(s);
        simt_bwd::gemm_nt<T, TK, TQ, kHeadDim, kUnroll>(s, Ks + key0 * kLdD, kLdD, Qs + cg * kLdD, kLdD);

        // P = exp(S * scale - lse_i), recomputed exactly as the forward normalised it. Rows past
        // Lq or that saw no key give 0 (lse_for_row); on tiles crossing an edge of the visible
        // region, masked pairs give 0. Interior tiles skip the per-element test.
        T lse_c[TQ], delta_c[TQ];
#pragma unroll
        for (int c = 0; c < TQ; ++c) {
            const int row = cg + 16 * c;
            lse_c[c] = simt_bwd::lse_for_row(lse_s[row], m0 + row < Lq);
            delta_c[c] = delta_s[row];
        }
        // Under the score modifiers (head g's slope) S^T stays raw until dP^T is known (below).
        const bool masked = i < range.full_first || i >= range.full_last;
        const ScoreMod<T> mod(f, blockIdx.x * heads + step.g, T(f.scale), M::unit(), mask.diag);
        const bool modified = kScoreMods && mod.modifies();  // softcap, bias, ALiBi or mask (not sinks alone)
        if (!modified) {
#pragma unroll
            for (int r = 0; r < TK; ++r)
#pragma unroll
                for (int c = 0; c < TQ; ++c) {
                    T pv = M::exp(fma(s[r][c], scale, -lse_c[c]));
                    if (masked && !mask.visible(m0 + cg + 16 * c, n0 + key0 + r)) pv = T(0);
                    s[r][c] = pv;
                }
        }

        // dP^T = V_j dO_i^T on the same micro-tile; dS = P o (dP - delta_i).
        T ds[TK][TQ];
        simt::zero(ds);
        simt_bwd::gemm_nt<T, TK, TQ, kHeadDim, kUnroll>(ds, Vs + key0 * kLdD, kLdD, dOs + cg * kLdD, kLdD);
        // Dropout (dropout.cuh): dP o Z * scale, so that dS = P o (Z o dP / q - delta); P o Z * scale
        // for dV below, once dS is made.
        simt::DropBits<TK, TQ> keep;
        const bool drops = kDropout && f.dropout_threshold;
        if (drops) {
            keep.draw(Dropout(f, blockIdx.x * heads + step.g),
                      [&](int r, int c) { return simt::QK{m0 + cg + 16 * c, n0 + key0 + r}; });
            keep.apply(ds, static_cast<T>(f.dropout_scale));
        }
        if (modified) {
            if constexpr (kScoreMods) {  // (plain Variants compile none of this)
                simt_bwd::modified_p_ds(mod, mask, masked, s, ds, [&](int r, int c) {
                    return simt_bwd::PairStats<T>{m0 + cg + 16 * c, n0 + key0 + r, lse_c[c], delta_c[c]};
                }, BiasGrad<T>(p, blockIdx.x * heads + step.g));
            }
        } else {
#pragma unroll
            for (int r = 0; r < TK; ++r)
#pragma unroll
                for (int c = 0; c < TQ; ++c) ds[r][c] = s[r][c] * (ds[r][c] - delta_c[c]);
        }

        if (drops) keep.apply(s, static_cast<T>(f.dropout_scale));

        // P and dS by query row (a lane's TK keys are contiguous: one vector store per query),
        // and dS by key for the dQ product.
#pragma unroll
        for (int c = 0; c < TQ; ++c) {
            T pcol[TK], dcol[TK];
#pragma unroll
            for (int r = 0; r < TK; ++r) {
                pcol[r] = s[r][c];
                dcol[r] = ds[r][c];
            }
            simt_bwd::sts(Ps + (cg + 16 * c) * kLdN + key0, pcol);
            simt_bwd::sts(dSs + (cg + 16 * c) * kLdN + key0, dcol);
        }
#pragma unroll
        for (int r = 0; r < TK; ++r)
#pragma unroll
            for (int c = 0; c < TQ; ++c) dSt[(key0 + r) * kLdM + cg + 16 * c] = ds[r][c];
        __syncthreads();  // P, dS visible

        // dV_j += P^T dO_i and dK_j += dS^T Q_i: sums over the tile's query rows.
        simt_bwd::gemm_tn2<T, TK, TD, kBlockM, kUnroll>(dV, Ps + key0, dOs, dK, dSs + key0, Qs, kLdN, kLdD, cg);
        __syncthreads();  // Qs, dOs free

        // The next step's tiles (the next head's first when i is the last) land during the dQ product.
        const HeadTileStep next = step.after(1, range.first, range.last);
        if (next.g < heads) load_query_tile(next);

        // dQ_i += dS K_j (unscaled), added to head g's rows of the fp32 / fp64 workspace with atomics.
        if (with_dq) {
            T* __restrict__ dq_accum = static_cast<T*>(p.dq_accum) + at.head(p, step.g).dq_accum;
            T dq[TQr][TD];
            simt::zero(dq);
            simt_bwd::gemm_tn<T, TQr, TD, kBlockN, kUnroll>(dq, dSt + qrow0, kLdM, Ks, kLdD, cg);
#pragma unroll
            for (int r = 0; r < TQr; ++r) {
                const int row = m0 + qrow0 + r;
                if (row < Lq) {
                    T* dst = dq_accum + (long long)row * D;
#pragma unroll
                    for (int c = 0; c < TD; ++c) {
                        const int col = simt::Cols<T, TD>::col(cg, c);
                        if (col < D) atomicAdd(dst + col, dq[r][c]);
                    }
                }
            }
        }
    }

    // dK_j = scale * sum_i dS^T Q_i (the softmax's scale, in the input's units); dV_j as is.
    // Key tiles that no query sees write zeros. A slice of a split GQA group (BwdParams::dkv_adds)
    // adds them into the group's sums instead (in T: the host zeroed them).
    const T sm_scale = T(f.scale);
    T* __restrict__ dk = static_cast<T*>(p.dk) + at.dk;
    T* __restrict__ dv = static_cast<T*>(p.dv) + at.dv;
    const bool adds = p.dkv_adds;
#pragma unroll
    for (int r = 0; r < TK; ++r) {
        const int key = n0 + key0 + r;
        if (key < Lk) {
            T* dk_row = dk + (long long)key * p.dk_row_stride;
            T* dv_row = dv + (long long)key * p.dv_row_stride;
#pragma unroll
            for (int c = 0; c < TD; ++c) {
                const int col = simt::Cols<T, TD>::col(cg, c);
                simt_bwd::store_or_add(dk_row + col, dK[r][c] * sm_scale, col < D, adds);
                simt_bwd::store_or_add(dv_row + col, dV[r][c], col < Dv, adds);
            }
        }
    }
}

}  // namespace cuflash
