// The tile spans of a 2-D boolean mask (params.cuh's FwdParams::mask_spans, read by mask.cuh's
// MaskTiles), over 64 x 64 tiles of (queries, keys), for each distinct mask plane: each 64-row
// group's span of key tiles that hold a visible pair, [first, last) ((tile_cols, 0) for a group
// that sees none), then each 64-key group's span of query tiles, as (tile_rows - first, last)
// so that atomicMax builds it on a zeroed buffer ((0, 0): no row sees the group; max is
// order-free, so the spans are the same every run). The attention kernels never load the key
// tiles (forward, dQ) or query tiles (dK/dV) outside a block's span: a causal pattern, a band or
// a packed batch's documents given as a mask cost about what the rule they spell would.
// Planes are read where the kernels read them: plane p at plane_offsets[p] (elements of the
// laid-out mask, plan.py's ScoreInputs), rows row_stride apart, keys col_stride apart. One block
// per (plane, 64-row group), flattened as plane * tile_rows + group; each of its 256 threads
// reads a quarter of a row's 64 keys per tile, and the block's vote (__syncthreads_or) says
// whether the tile holds a visible pair. Rows past Lq and keys past Lk hide.
#define CUFLASH_MASK_TILES_THREADS 256

namespace cuflash {

__global__ void __launch_bounds__(CUFLASH_MASK_TILES_THREADS)
mask_tiles(const unsigned char* mask, const long long* plane_offsets, long long row_stride, long long col_stride,
           int seqlen_q, int seqlen_k, int tile_rows, int tile_cols, int* spans) {
    constexpr int kTile = 64, kParts = CUFLASH_MASK_TILES_THREADS / kTile, kPart = kTile / kParts;
    const int plane = blockIdx.x / tile_rows, group = blockIdx.x % tile_rows;
    const int i = group * kTile + threadIdx.x / kParts, part = threadIdx.x % kParts;
    const unsigned char* row = mask + plane_offsets[plane] + static_cast<long long>(i) * row_stride;
    int* key_span = spans + 2 * (static_cast<long long>(plane) * (tile_rows + tile_cols) + group);
    int* query_spans = spans + 2 * (static_cast<long long>(plane) * (tile_rows + tile_cols) + tile_rows);
    int first = tile_cols, last = 0;
    for (int t = 0; t < tile_cols; ++t) {
        const int j0 = t * kTile + part * kPart, j1 = min(j0 + kPart, seqlen_k);
        int seen = 0;
        if (i < seqlen_q)
            for (int j = j0; j < j1; ++j) seen |= row[j * col_stride];
        if (__syncthreads_or(seen)) {
            first = min(first, t);
            last = t + 1;
            if (threadIdx.x == 0) {
                atomicMax(query_spans + 2 * t, tile_rows - group);
                atomicMax(query_spans + 2 * t + 1, group + 1);
            }
        }
    }
    if (threadIdx.x == 0) {
        key_span[0] = first;
        key_span[1] = last;
    }
}

}  // namespace cuflash
