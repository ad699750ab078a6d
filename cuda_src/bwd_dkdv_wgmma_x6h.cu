// Backward attention for float32 under precision="highest" on Hopper (sm_90a) in bf16x6 at head
// dims 97-128 (tile_tc.cuh's bf16x6): dK, dV (and dQ by fp32 atomics) over key tiles, where the
// 3xTF32 form does not fit (K and V in hi and lo tiles alone take 128 KB; with the transposed
// copies of Q_i and dO_i, 280 KB). bwd_dkdv_wgmma_x6.cu's algorithm and operand forms; what
// changes is who holds what: dK and dV (64 keys x 128 floats each) and their fresh step fragments
// do not fit one warpgroup's registers, so each of the two warpgroups owns one half of the head
// dim (h = the warpgroup: columns [64h, 64h + 64) of dK, dV and rows of dQ^T) and computes S^T and
// dP^T over the whole head dim itself (those two products twice a block: 6 of the step's MMA
// shares where one owner would issue 5). Per step (h, i), query tile i of kBlockM = 32 rows:
//
//   both warpgroups (each its half h)
//   S^T  = K Q_i^T          SS, A = K, B = Q_i (K-major)                  64 keys x 32 queries
//   dP^T = V dO_i^T         SS, A = V, B = dO_i
//   P^T, dS^T               (probabilities_and_dscores)
//   dS stored (split; queries x keys, transposed by stmatrix) into this warpgroup's own tile
//   dV_h += P^T dO_i,h      RS, B = dO_i's half h MN-major
//   dK_h += dS^T Q_i,h      SS, A = dS MN-major, B = Q_i's half h MN-major
//   dQ_i,h^T = K_h^T dS^T   SS, A = K's half h MN-major, B = dS K-major; REDs into dq_accum
//
// and, between them, the next step's Q and dO: their rows of step t + 2 loaded into registers at
// step t (global loads, no staging tile: the shared memory is full), split into pieces and stored
// into the free slot at step t + 1. One block barrier a step.
// Shared memory (216 KB, one block a SM): K and V in three piece tiles each (96 KB), two slots of
// Q_i and dO_i in pieces (96 KB), each warpgroup's dS tile in pieces (2 x 12 KB), two slots of
// lse_i and delta_i.
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "bwd_wgmma.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal. 1024 bytes of alignment; bfloat16 piece tiles (three a tensor): K, V
// (kBlockN x D), two slots of Q_i, dO_i (kBlockM x D), two dS tiles (kBlockM x kBlockN); two
// slots of lse_i and delta_i (2 kBlockM floats each).
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned bwd_dkdv_wgmma_x6h_smem_bytes() {
    return 1024 + 2 * 3 * (2 * kBlockN * kHeadDim + 2 * 2 * kBlockM * kHeadDim + 2 * kBlockM * kBlockN) +
           4 * 2 * 2 * kBlockM;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 1) bwd_dkdv_wgmma_x6h(const BwdParams p) {
    constexpr int kThreads = kWarps * 32;
    constexpr int kPieces = 3;
    constexpr int kHalf = kHeadDim / 2;  // a warpgroup's columns of dK, dV (rows of dQ^T)
    static_assert(tc::Arith<Element>::kUnits == 2, "float32 (the Variant's Element names its precision)");
    static_assert(!kScoreMods && !kDropout, "no modifiers, no dropout (tiles.py: FFMA serves them)");
    static_assert(kWarps == 8 && kBlockN == 64 && kBlockM == 32 && kHeadDim == 128 && kStages == 1,
                  "two warpgroups on 64 keys (wgmma M), each one half of D = 128, 32-query steps");

    using KVTile = tc::Sw128Tile<kBlockN, kHeadDim>;  // a piece of K or V (keys x D): two 64-column panels
    using QTile = tc::Sw128Tile<kBlockM, kHeadDim>;   // a piece of Q_i or dO_i (queries x D)
    using DsTile = tc::Sw128Tile<kBlockM, kBlockN>;   // a piece of dS (queries x keys)
    constexpr int kKStepsD = kHeadDim / 16;  // k16 steps over D (S^T, dP^T)
    constexpr int kKStepsM = kBlockM / 16;   // over a step's queries (dV, dK)
    constexpr int kKStepsN = kBlockN / 16;   // over the keys (dQ^T)
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse_i, then delta_i
    constexpr unsigned kSlotBytes = 2 * kPieces * QTile::kBytes;
    constexpr unsigned kSmemBytes = bwd_dkdv_wgmma_x6h_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    static_assert(kSmemBytes == 1024 + kPieces * (2 * KVTile::kBytes + 2 * DsTile::kBytes) + 2 * kSlotBytes + 2 * kStatBytes,
                  "1024: alignment");
    // A row's 16-byte chunks of floats, and each thread's share of a query tile's (kQChunks) and a
    // key tile's (kKChunks).
    constexpr int kRowChunks = kHeadDim / 4;
    constexpr int kQChunks = kBlockM * kRowChunks / kThreads, kKChunks = kBlockN * kRowChunks / kThreads;
    static_assert(kQChunks * kThreads == kBlockM * kRowChunks && kThreads % kRowChunks == 0, "whole chunks a thread");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned align = (1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u;
    const unsigned k_smem = ptx::smem_addr(smem) + align;
    const unsigned v_smem = k_smem + kPieces * KVTile::kBytes;
    const unsigned step_smem = v_smem + kPieces * KVTile::kBytes;  // slot s: Q_i's pieces, then dO_i's
    const unsigned ds_base = step_smem + 2 * kSlotBytes;           // warpgroup g's dS pieces
    unsigned char* const stat_ptr = smem + align + (ds_base - k_smem) + 2 * kPieces * DsTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // warpgroup = this half of D; uniform registers
    const int row0 = (warp % 4) * 16;  // this warp's rows of its warpgroup's products: row0 + lane / 4 + {0, 8}
    const unsigned ds_smem = ds_base + group * kPieces * DsTile::kBytes;
    const auto [group_index, n_index] = key_tile_block<kHasWindow>(p);
    const int heads = p.heads_per_block;
    const int bh = group_index * heads;
    const int n0 = n_index * kBlockN;
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;
    if (!starts_key_block<float, float, kBlockN>(p, bh, n_index, n0, at)) return;  // params.cuh
    const Mask<kHasWindow, false> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, at.seqlen_q);
    // lse's and delta's copies (the rows go by the loads below; the loaders' alignment test).
    const tc::QueryTileLoader<kBlockM, 2 * kHeadDim, kThreads, tc::Sw128Tile<kBlockM, 2 * kHeadDim>, 2> query_rows(p, at);
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kThreads, tc::Sw128Tile<kBlockN, 2 * kHeadDim>> k_rows(
        reinterpret_cast<const unsigned short*>(static_cast<const float*>(f.k) + at.k), f.k_row_stride * 2, f.head_dim * 2);
    const tc::TileLoader<kBlockN, 2 * kHeadDim, kThreads, tc::Sw128Tile<kBlockN, 2 * kHeadDim>> v_rows(
        reinterpret_cast<const unsigned short*>(static_cast<const float*>(f.v) + at.v), f.v_row_stride * 2, f.head_dim_v * 2);
    if (!(k_rows.aligned(at.seqlen_k) && v_rows.aligned(at.seqlen_k) && query_rows.aligned())) __trap();

    // This thread's chunk c (< kChunks) of a tile of rows: row (tid + c kThreads) / kRowChunks,
    // 16-byte chunk of floats (tid + c kThreads) % kRowChunks. Rows >= num_rows and columns >=
    // num_cols read as zeros.
    auto load_chunk = [&](const float* base, long long row_stride, int num_rows, int num_cols, int c) {
        const int idx = tid + c * kThreads, row = idx / kRowChunks, col = 4 * (idx % kRowChunks);
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < num_rows) {
            const float* src = base + row * row_stride + col;
            if (col + 4 <= num_cols) {
                v = *reinterpret_cast<const float4*>(src);
            } else {
                float* const e = &v.x;
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (col + j < num_cols) e[j] = src[j];
            }
        }
        return v;
    };
    // Chunk c's floats split into the three piece tiles at `pieces` (Tile: rows of kHeadDim
    // bfloat16), half of a piece's 16-byte chunk.
    auto store_pieces = [&](unsigned pieces, unsigned tile_bytes, auto tile, const float4& v, int c) {
        using Tile = decltype(tile);
        const int idx = tid + c * kThreads, row = idx / kRowChunks, chunk = idx % kRowChunks;
        unsigned lo[3], hi[3];
        tc::split_bf16x3(v.x, v.y, lo);
        tc::split_bf16x3(v.z, v.w, hi);
        const unsigned off = Tile::offset(row, chunk / 2) + 8 * (chunk % 2);
#pragma unroll
        for (int i = 0; i < kPieces; ++i) ptx::st_shared_v2(pieces + i * tile_bytes + off, lo[i], hi[i]);
    };

    // Step s's Q and dO rows, this thread's chunks, into registers (the caller stores them a step
    // later: store_step); copy_stats: its lse and delta into stat slot `slot` (cp.async; the
    // caller commits).
    float4 q_next[kQChunks], do_next[kQChunks];
    auto load_step = [&](const HeadTileStep& s) {
        const HeadStep d(p, s.g);
        const float* q = static_cast<const float*>(f.q) + at.q + d.q + (long long)s.i * kBlockM * f.q_row_stride;
        const float* dout = static_cast<const float*>(p.dout) + at.dout + d.dout + (long long)s.i * kBlockM * p.dout_row_stride;
        const int rows = at.seqlen_q - s.i * kBlockM;
#pragma unroll
        for (int c = 0; c < kQChunks; ++c) {
            q_next[c] = load_chunk(q, f.q_row_stride, rows, f.head_dim, c);
            do_next[c] = load_chunk(dout, p.dout_row_stride, rows, f.head_dim_v, c);
        }
    };
    auto copy_stats = [&](const HeadTileStep& s, int slot) {
        query_rows.head(p, s.g).load_stats(stat_ptr + slot * kStatBytes, s.i, tid);
    };
    auto slot_smem = [&](int slot) { return step_smem + slot * kSlotBytes; };
    auto store_step = [&](int slot) {  // the registers' step into slot `slot`, fenced
        const unsigned q = slot_smem(slot);
#pragma unroll
        for (int c = 0; c < kQChunks; ++c) {
            store_pieces(q, QTile::kBytes, QTile{}, q_next[c], c);
            store_pieces(q + kPieces * QTile::kBytes, QTile::kBytes, QTile{}, do_next[c], c);
        }
        ptx::fence_proxy_async_shared();
    };

    // ---- Prologue: K and V into their pieces; step 0 into slot 0 (and its lse and delta), step
    // 1's rows into the registers.
    {
        const float* k = static_cast<const float*>(f.k) + at.k + (long long)n0 * f.k_row_stride;
        const float* v = static_cast<const float*>(f.v) + at.v + (long long)n0 * f.v_row_stride;
        const int rows = at.seqlen_k - n0;
#pragma unroll 2
        for (int c = 0; c < kKChunks; ++c) {
            store_pieces(k_smem, KVTile::kBytes, KVTile{}, load_chunk(k, f.k_row_stride, rows, f.head_dim, c), c);
            store_pieces(v_smem, KVTile::kBytes, KVTile{}, load_chunk(v, f.v_row_stride, rows, f.head_dim_v, c), c);
        }
    }
    const HeadTileStep first_step(range.first, range.last, heads);
    if (first_step.g < heads) {
        load_step(first_step);
        copy_stats(first_step, 0);
        store_step(0);
    }
    const HeadTileStep second_step = first_step.after(1, range.first, range.last);
    if (second_step.g < heads) load_step(second_step);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async_shared();
    __syncthreads();

    float dk[kHalf / 8][4], dv[kHalf / 8][4];  // 64 keys x this half of D
    tc::zero(dk);
    tc::zero(dv);
    const bool with_dq = p.dq_accum != nullptr;
    const float scale_log2 = f.scale_log2;
    constexpr float kLog2e = 1.4426950408889634f;
    const ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), kLog2e, mask.diag);
    BiasGrad<float> dbias(p, bh);
    const unsigned long long k_desc = KVTile::k_major(k_smem), v_desc = KVTile::k_major(v_smem);
    // K's half h as dQ^T's A (MN-major: D along the rows' 128 bytes of panel h).
    const unsigned long long kt_desc = KVTile::mn_major(k_smem + group * KVTile::kPanelBytes);
    int t = 0;
    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last), ++t) {
        const int m0 = step.i * kBlockM;
        const bool masked = step.i < range.full_first || step.i >= range.full_last;
        const float* lse_s = reinterpret_cast<const float*>(stat_ptr + (t % 2) * kStatBytes);
        const float* delta_s = lse_s + kBlockM;
        const unsigned q = slot_smem(t % 2), dout = q + kPieces * QTile::kBytes;
        const HeadTileStep next = step.after(1, range.first, range.last);
        const HeadTileStep after_next = step.after(2, range.first, range.last);
        // The next step's lse and delta into the other stat slot (step t - 1's, read before the
        // last barrier by both warpgroups); landed by this step's end.
        if (next.g < heads) copy_stats(next, (t + 1) % 2);
        ptx::cp_async_commit();
        float st[kBlockM / 8][4], dpt[kBlockM / 8][4];  // S^T then P^T; dP^T then dS^T
        tc::zero(st);
        tc::zero(dpt);
        {
            const unsigned long long q_desc = QTile::k_major(q), do_desc = QTile::k_major(dout);
            ptx::wgmma_fence();
            tc::wgmma_ss_x6_desc<kKStepsD, KVTile, QTile, 0, 0>(st, k_desc, q_desc);
            tc::wgmma_ss_x6_desc<kKStepsD, KVTile, QTile, 0, 0>(dpt, v_desc, do_desc);
            ptx::wgmma_commit();
        }
        // While they run: the next step's rows (loaded at the step before) into the other slot,
        // whose readers (step t - 1's products) finished before the last barrier; then step t +
        // 2's rows into the registers.
        if (next.g < heads) store_step((t + 1) % 2);
        if (after_next.g < heads) load_step(after_next);
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(st);
        ptx::wgmma_pin(dpt);
        wgmma_bwd::probabilities_and_dscores<kBlockM>(
            st, dpt, mod, false, dbias, mask, masked, m0, n0 + row0 + lane / 4, at.seqlen_q, scale_log2, lane,
            [&](int col) { return tc::lse_log2(lse_s[col]); }, [&](int col) { return delta_s[col]; });
        // dS's pieces (queries x keys: each 8 x 8 block of dS^T's fragment stored transposed) into
        // this warpgroup's tile, published to its warps (dK's A, dQ^T's B).
#pragma unroll
        for (int kk = 0; kk < kKStepsM; ++kk) {
            unsigned dsa[kPieces][4];
            tc::pack_a_x3(dpt[2 * kk], dpt[2 * kk + 1], dsa);
            // Lane l: row l % 8 of matrix l / 8 = queries 16 kk + 8 (m / 2) + .., keys row0 + 8 (m % 2) + ..
            const int m = lane / 8, query = 16 * kk + 8 * (m / 2) + lane % 8, chunk = (row0 + 8 * (m % 2)) / 8;
#pragma unroll
            for (int i = 0; i < kPieces; ++i)
                ptx::stmatrix_x4<true>(ds_smem + i * DsTile::kBytes + DsTile::offset(query, chunk), dsa[i][0], dsa[i][1],
                                       dsa[i][2], dsa[i][3]);
        }
        ptx::fence_proxy_async_shared();
        ptx::named_barrier_sync(2 + group, 128);  // this warpgroup's dS tile complete
        unsigned pa[kKStepsM][kPieces][4];
#pragma unroll
        for (int kk = 0; kk < kKStepsM; ++kk) tc::pack_a_x3(st[2 * kk], st[2 * kk + 1], pa[kk]);
        float dv_step[kHalf / 8][4], dk_step[kHalf / 8][4];
        tc::zero(dv_step);
        tc::zero(dk_step);
        {
            // This half's columns of dO_i and Q_i: panel `group` of their tiles.
            const unsigned half = group * QTile::kPanelBytes;
            const unsigned long long do_mn = QTile::mn_major(dout + half), q_mn = QTile::mn_major(q + half);
            const unsigned long long ds_mn = DsTile::mn_major(ds_smem);
            ptx::wgmma_fence();
            tc::wgmma_rs_x6_desc<kKStepsM, QTile, 1>(dv_step, pa, do_mn);
            tc::wgmma_ss_x6_desc<kKStepsM, DsTile, QTile, 1, 1>(dk_step, ds_mn, q_mn);
            ptx::wgmma_commit();
        }
        ptx::wgmma_wait<0>();
        ptx::wgmma_pin(dv_step);
        ptx::wgmma_pin(dk_step);
        tc::add(dv, dv_step, dk, dk_step);
        // dQ_i,h^T after them (its fragment beside the fresh dV, dK ones spilled: 255 registers).
        if (with_dq) {
            float dqt[kBlockM / 8][4];
            tc::zero(dqt);
            const unsigned long long ds_k = DsTile::k_major(ds_smem);
            ptx::wgmma_fence();
            tc::wgmma_ss_x6_desc<kKStepsN, KVTile, DsTile, 1, 0>(dqt, kt_desc, ds_k);
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();
            ptx::wgmma_pin(dqt);
            // dQ_i^T's rows: this half's columns of dQ.
            float* const dq_rows = static_cast<float*>(p.dq_accum) + at.dq_accum + HeadStep(p, step.g).dq_accum;
            wgmma_bwd::red_add_dq_transposed<kBlockM>(dq_rows, dqt, m0, group * kHalf + row0 + lane / 4, at.seqlen_q,
                                                      f.head_dim, lane);
        }
        ptx::cp_async_wait<0>();
        __syncthreads();  // the next step's slot and stats complete; this step's tiles free
    }

    // ---- Epilogue: this half's columns of dK * scale and dV.
    const auto [out_group, out_n_index] = key_tile_block<kHasWindow>(p);  // recomputed: not held through the loop
    wgmma_bwd::write_float_dk_dv<kBlockN, kHalf>(p, out_group, out_n_index, dk, dv, row0, lane, group * kHalf);
}

}  // namespace cuflash
