// Mask: which keys a query may see. It owns both the loop bounds over key tiles and the
// per-element predicate, so a kernel never re-derives either.
//
// Visibility of key j to query i (see params.cuh):
//   0 <= j < Lk  and  i + diag - left <= j  (left >= 0)  and  j <= i + diag + right  (right >= 0)
// For a block of query rows [m0, m0 + BM) and key tiles of width BN, the key tiles split into
//   [first, full_first)       masked: they cross the window's left edge
//   [full_first, full_last)   every (row, key) pair visible: no per-element test at all
//   [full_last, last)         masked: they cross the diagonal / right edge or the end of Lk
// Tiles outside [first, last) are never loaded: causal does about half the work.
// The score modifiers (score_mod.cuh: softcap, an additive bias, ALiBi, a boolean mask) apply
// to the same S tile; they never change these bounds.
#pragma once
#include "params.cuh"

namespace cuflash {

struct TileRange {
    int first, full_first, full_last, last;  // key-tile indices, first <= full_first <= full_last <= last
};

__device__ __forceinline__ int div_floor(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int div_ceil(int a, int b) { return div_floor(a + b - 1, b); }
__device__ __forceinline__ int clampi(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <bool kHasWindow>
struct Mask {
    int seqlen_k, left, right, diag;

    // The mask of one sequence (``seq``: its lengths, params.cuh's BatchIndex).
    __device__ __forceinline__ Mask(const FwdParams& p, const BatchIndex& seq)
        : seqlen_k(seq.seqlen_k), left(p.window_left), right(p.window_right), diag(seq.diag) {}

    __device__ __forceinline__ bool visible(int i, int j) const {
        bool ok = j < seqlen_k;
        if (kHasWindow) {
            if (left >= 0) ok = ok && j >= i + diag - left;
            if (right >= 0) ok = ok && j <= i + diag + right;
        }
        return ok;
    }

    // Whether either window edge is bounded (causal included). A Variant with the window's tests
    // (kHasWindow: also every score-modifier Variant) runs calls without one too; a block-uniform
    // test of this lets their masked tiles test only the end of the keys (tc::apply_mask).
    __device__ __forceinline__ bool windowed() const { return kHasWindow && (left >= 0 || right >= 0); }

    // Rows [m0, m0 + block_m) against key tiles of width block_n.
    __device__ __forceinline__ TileRange tiles(int m0, int block_m, int block_n) const {
        const int num_tiles = div_ceil(seqlen_k, block_n);
        // Keys that a whole block may touch, [lo, hi); and the keys every row sees, [full_lo, full_hi).
        int lo = 0, hi = seqlen_k, full_lo = 0, full_hi = seqlen_k;
        if (kHasWindow) {
            const int m_last = m0 + block_m - 1;
            if (left >= 0) {
                lo = m0 + diag - left;
                full_lo = m_last + diag - left;
            }
            if (right >= 0) {
                hi = m_last + diag + right + 1;
                full_hi = min(m0 + diag + right + 1, seqlen_k);
            }
        }
        TileRange r;
        r.first = clampi(div_floor(lo, block_n), 0, num_tiles);
        r.last = clampi(div_ceil(hi, block_n), r.first, num_tiles);
        r.full_first = clampi(div_ceil(full_lo, block_n), r.first, r.last);
        r.full_last = clampi(div_floor(full_hi, block_n), r.full_first, r.last);
        return r;
    }

    // The transpose, for the backward: keys [n0, n0 + block_n) against query tiles of height
    // block_m over seqlen_q rows. [first, last) holds every query tile with a row that sees a
    // key of the block; [full_first, full_last) those whose every (row, key) pair is visible.
    // Rows i >= seqlen_q never count as visible, so a tile crossing seqlen_q is masked.
    __device__ __forceinline__ TileRange query_tiles(int n0, int block_n, int block_m, int seqlen_q) const {
        const int num_tiles = div_ceil(seqlen_q, block_m);
        const int n_last = min(n0 + block_n, seqlen_k) - 1;  // last real key of the block
        // Rows that may see some key of the block, [lo, hi); rows that see all of them, [full_lo, full_hi).
        int lo = 0, hi = seqlen_q, full_lo = 0, full_hi = seqlen_q;
        if (kHasWindow) {
            if (right >= 0) {  // j <= i + diag + right  <=>  i >= j - diag - right
                lo = n0 - diag - right;
                full_lo = n_last - diag - right;
            }
            if (left >= 0) {   // j >= i + diag - left   <=>  i <= j - diag + left
                hi = n_last - diag + left + 1;
                full_hi = min(n0 - diag + left + 1, seqlen_q);
            }
        }
        TileRange r;
        r.first = clampi(div_floor(lo, block_m), 0, num_tiles);
        r.last = clampi(div_ceil(hi, block_m), r.first, num_tiles);
        if (n0 + block_n > seqlen_k) {  // the key block crosses the end of the keys: all masked
            r.full_first = r.full_last = r.last;
        } else {
            r.full_first = clampi(div_ceil(full_lo, block_m), r.first, r.last);
            r.full_last = clampi(div_floor(full_hi, block_m), r.full_first, r.last);
        }
        return r;
    }
};

}  // namespace cuflash
