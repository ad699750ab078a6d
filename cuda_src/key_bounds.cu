// The cut of a key-padding mask per attention row (params.cuh's FwdParams::key_bounds): the
// row's last visible key + 1 (0 where it hides every key), stored as ~cut where a key before the
// cut is hidden too (then the cut alone is not the row's mask and the modifier Variant runs it).
// The mask is read as the forward reads it: row bh's plane at score_rows[2 bh + 1] (plan.py), its
// first query row (a key-padding mask is the same for every query), keys col_stride apart.
// One warp per attention row: its lanes scan the keys 32 apart, then a butterfly takes the last
// visible key (max) and the count of visible ones (sum); the prefix test is count == cut.
// One launch instead of the dozen array operations it replaces (plan.py's host time).
#define CUFLASH_KEY_BOUNDS_THREADS 256

namespace cuflash {

__global__ void __launch_bounds__(CUFLASH_KEY_BOUNDS_THREADS)
key_bounds(const unsigned char* mask, const long long* score_rows, long long col_stride, int seqlen_k, long long rows,
           int* bounds) {
    const long long row = static_cast<long long>(blockIdx.x) * (CUFLASH_KEY_BOUNDS_THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps: the shuffles below see all 32 lanes
    const unsigned char* plane = mask + score_rows[2 * row + 1];
    int cut = 0, visible = 0;
    for (int j = lane; j < seqlen_k; j += 32)
        if (plane[j * col_stride]) {
            cut = j + 1;
            ++visible;
        }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        cut = max(cut, __shfl_xor_sync(0xffffffffu, cut, offset));
        visible += __shfl_xor_sync(0xffffffffu, visible, offset);
    }
    if (lane == 0) bounds[row] = visible == cut ? cut : ~cut;
}

}  // namespace cuflash
