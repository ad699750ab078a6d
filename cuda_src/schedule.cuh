// Which (attention row, query tile) a forward block works on: the order in which the grid's
// blocks start.
//
// The grid is (B*H attention rows, query tiles) and the hardware starts blocks in x-fastest
// order, linear = x + y * gridDim.x. That index is renumbered in sections of
// p.heads_per_section rows: section after section; inside one, query tile after query tile,
// row fastest. The blocks running at any moment then span a few query tiles of one section:
// - the host sizes a section so that its K and V fit in half of L2, so each section's K/V
//   comes from memory about once. (With the raw x-fastest order at causal L = 1k, d128, the
//   256 heads' K/V, 128 MB, were swept from memory once per query tile: 60% of FA2's speed
//   with 64-row tiles.)
// - kHeaviestFirst (causal, windows): query tiles in reverse, so the tiles with the most keys
//   start first and the short ones fill the tail (longest processing time first).
// - Dense: one row per section, one row's query tiles back to back, reading the same K/V from
//   L2 (+8% at d128 L = 1k over the x-fastest order).
// The block index is read through ptx::block_index_*: callers recompute the coordinate in the
// epilogue rather than keep it in registers through the key loop.
#pragma once
#include "params.cuh"
#include "ptx.cuh"

namespace cuflash {

struct BlockCoord {
    int bh;     // attention row: (batch..., head)
    int block;  // tile along the grid's y axis (query tile; key tile in the backward's dK/dV)
};

// Tile ``linear`` of a grid_x by grid_y grid in sections of `section_rows` rows, 1 <=
// section_rows <= grid_x, section_rows * grid_y < 2^32 (the host caps it); 1 is plain row-major
// order (one row's tiles back to back).
// ``Index``: unsigned long long where the tiles may pass 2^32, else unsigned (cheaper division).
template <bool kHeaviestFirst, typename Index>
__device__ __forceinline__ BlockCoord scheduled_tile(int section_rows_, Index linear, unsigned grid_x, unsigned grid_y) {
    const unsigned section_rows = static_cast<unsigned>(section_rows_);
    const unsigned section_blocks = section_rows * grid_y;
    const unsigned section = static_cast<unsigned>(linear / section_blocks);
    const unsigned rest = static_cast<unsigned>(linear - static_cast<Index>(section) * section_blocks);
    const unsigned rows = min(section_rows, grid_x - section * section_rows);  // the last section may be short
    const unsigned m_index = rest / rows;
    return {static_cast<int>(section * section_rows + (rest - m_index * rows)),
            static_cast<int>(kHeaviestFirst ? grid_y - 1 - m_index : m_index)};
}

// This block's tile: one tile per block, the grid the tiles' grid.
template <bool kHeaviestFirst>
__device__ __forceinline__ BlockCoord scheduled_block(int section_rows) {
    // 64-bit: gridDim.x * gridDim.y may pass 2^32; the rest fits 32 bits.
    const unsigned long long linear =
        static_cast<unsigned long long>(ptx::block_index_y()) * gridDim.x + ptx::block_index_x();
    return scheduled_tile<kHeaviestFirst>(section_rows, linear, gridDim.x, gridDim.y);
}

// A forward block: masked (causal, windows) in sections, heaviest query tiles first; dense in
// row-major order (a compile-time 1, whatever the host passes: ptxas then folds the divisions).
template <bool kMasked>
__device__ __forceinline__ BlockCoord scheduled_block(const FwdParams& p) {
    return scheduled_block<kMasked>(kMasked ? p.heads_per_section : 1);
}

// A Hopper dK/dV block (bwd_dkdv_wgmma*.cu): {a group of p.heads_per_block attention rows, a key
// tile}, masked calls in sections of rows. Cheap to recompute where holding it through the main
// loop would cost registers (the epilogues).
template <bool kMasked>
__device__ __forceinline__ BlockCoord key_tile_block(const BwdParams& p) {
    return scheduled_block<false>(kMasked ? p.fwd.heads_per_section : 1);
}

// The tiles a persistent forward block walks (fwd_wgmma_ws.cu), in scheduled_block's order over
// the attention rows (the output's leading axes) by p.query_tiles query tiles, fewer than 2^31
// (the host checks). Wave after wave: in wave w the launch's blocks take tiles [w blocks,
// (w + 1) blocks), block b the b-th of them in even waves and the b-th from the end in odd ones
// (a snake). Under a mask the order is longest first, so each block's sum of tiles stays near
// the mean: a static longest-processing-time schedule. A grid of one block per tile is one
// wave: block b, tile b, as scheduled_block.
struct TileWalk {
    unsigned block, blocks, rows, query_tiles, total;
    __device__ __forceinline__ explicit TileWalk(const FwdParams& p)
        : block(ptx::block_index_y() * gridDim.x + ptx::block_index_x()), blocks(gridDim.x * gridDim.y),
          rows(static_cast<unsigned>(p.num_heads)), query_tiles(static_cast<unsigned>(p.query_tiles)) {
#pragma unroll
        for (int i = 0; i < CUFLASH_MAX_BATCH_DIMS; ++i) rows *= static_cast<unsigned>(p.batch_shape[i]);
        total = rows * query_tiles;
    }
    __device__ __forceinline__ unsigned tile(unsigned wave) const {
        return wave * blocks + ((wave & 1u) ? blocks - 1 - block : block);
    }
    template <bool kMasked>
    __device__ __forceinline__ BlockCoord coord(const FwdParams& p, unsigned linear) const {
        return scheduled_tile<kMasked>(kMasked ? p.heads_per_section : 1, linear, rows, query_tiles);
    }
};

// A dQ block (bwd_dq_tc, bwd_dq_simt): attention row blockIdx.x, its query tiles in reverse
// under a mask (the heaviest start first, as the forward's), else in order.
template <bool kMasked>
__device__ __forceinline__ BlockCoord query_tile_block() {
    return {static_cast<int>(blockIdx.x), static_cast<int>(kMasked ? gridDim.y - 1 - blockIdx.y : blockIdx.y)};
}

}  // namespace cuflash
