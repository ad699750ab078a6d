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
// to the same S tile; only a 2-D boolean mask narrows these bounds, through its tile spans
// (kMaskTiles, below): a causal pattern, a band or a packed batch's documents given as a mask
// then load no more key tiles than the rule they spell would.
#pragma once
#include "params.cuh"

namespace cuflash {

struct TileRange {
    int first, full_first, full_last, last;  // key-tile indices, first <= full_first <= full_last <= last
};

__device__ __forceinline__ int div_floor(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int div_ceil(int a, int b) { return div_floor(a + b - 1, b); }
__device__ __forceinline__ int clampi(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// A 2-D mask's tile spans for one attention row (FwdParams::mask_spans, cuda_src/mask_tiles.cu),
// over kMaskTile x kMaskTile tiles of (queries, keys): each row group's span of key tiles with a
// visible pair, then each key group's span of query tiles. They narrow a block's span of keys
// to the tiles its rows see, and a block's span of queries to the tiles that see its keys: the
// span's ends only (a hidden tile between two visible ones is still loaded, and masked element
// by element).
constexpr int kMaskTile = 64;

struct MaskTiles {
    const int* spans;  // this row's plane: rows key spans, then cols query spans
    int rows, cols;

    // Row `row`'s plane (the call has spans: FwdParams::mask_spans is not null).
    __device__ __forceinline__ MaskTiles(const FwdParams& p, int row)
        : spans(p.mask_spans + 2ll * p.mask_tile_planes[row] * (p.mask_tile_rows + p.mask_tile_cols)),
          rows(p.mask_tile_rows), cols(p.mask_tile_cols) {}

    // [lo, hi) narrowed to the keys of the tiles that rows [r0, r1) see (empty where they see none).
    __device__ __forceinline__ void narrow_keys(int r0, int r1, int& lo, int& hi) const {
        int first = cols, last = 0;
        for (int g = r0 / kMaskTile; g < min((r1 + kMaskTile - 1) / kMaskTile, rows); ++g) {
            first = min(first, spans[2 * g]);
            last = max(last, spans[2 * g + 1]);
        }
        lo = max(lo, first * kMaskTile);
        hi = min(hi, last * kMaskTile);
    }

    // [lo, hi) narrowed to the queries of the tiles that see keys [c0, c1).
    __device__ __forceinline__ void narrow_queries(int c0, int c1, int& lo, int& hi) const {
        const int* query_spans = spans + 2 * rows;
        int first = rows, last = 0;
        for (int t = c0 / kMaskTile; t < min((c1 + kMaskTile - 1) / kMaskTile, cols); ++t) {
            first = min(first, rows - query_spans[2 * t]);
            last = max(last, query_spans[2 * t + 1]);
        }
        lo = max(lo, first * kMaskTile);
        hi = min(hi, last * kMaskTile);
    }
};

// Where the kernels read the tile spans: sm_90 on. On sm_8x five score-modifier Variants (fwd_tc
// and bwd_dq_tc at d64/d128, bwd_dkdv_dmma d160) sit at their register bound and spill with the
// lookup; there every tile of a 2-D mask is computed, as before (the host's spans go unread).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kArchReadsMaskTiles = false;
#else
constexpr bool kArchReadsMaskTiles = true;
#endif

// kMaskTiles: the Variant reads a 2-D mask's tile spans where the call gives them (the
// score-modifier Variants; the others never see a mask).
template <bool kHasWindow, bool kMaskTiles = false>
struct Mask {
    int seqlen_k, left, right, diag;
    // (kMaskTiles only, dead code otherwise: the tile spans are looked up where a span is narrowed,
    // so that nothing of them stays in registers through a kernel's loop)
    const FwdParams& params;
    int row;

    // The mask of one sequence (``seq``: its lengths, params.cuh's BatchIndex).
    __device__ __forceinline__ Mask(const FwdParams& p, const BatchIndex& seq)
        : seqlen_k(seq.seqlen_k), left(p.window_left), right(p.window_right), diag(seq.diag), params(p), row(seq.row) {}

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
        if constexpr (kMaskTiles && kArchReadsMaskTiles)
            if (params.mask_spans != nullptr) MaskTiles(params, row).narrow_keys(m0, m0 + block_m, lo, hi);
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
        if constexpr (kMaskTiles && kArchReadsMaskTiles)
            if (params.mask_spans != nullptr) MaskTiles(params, row).narrow_queries(n0, n0 + block_n, lo, hi);
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
