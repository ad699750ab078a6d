// cuflash.merge_attention: S partial attentions of the same query rows over disjoint key sets,
// each normalised over its own keys, merged into the attention over the union.
//
//   M      = max_s lse_s                      (taken as 0 for the max when every lse_s is -inf)
//   w_s    = exp(lse_s - M)                   (0, and out_s not read, when lse_s = -inf)
//   W      = sum_s w_s                        (0 exactly when every lse_s is -inf: the max has w = 1)
//   lse    = M + log(W)                       (-inf when W = 0)
//   out    = sum_s (w_s / W) out_s            (0 when W = 0)
//
// in Accum (float for half, bfloat16 and float; double for double). A NaN lse_s makes its row's
// lse and out NaN; a NaN in out_s only the entries it reaches. A block of 256 threads owns
// 256 / lanes rows at a time: `lanes` consecutive threads (a power of two <= 32, so a row never
// leaves its warp) share a row, each keeping CUFLASH_MERGE_COLUMNS of its columns (in 16-byte
// chunks; a row's lanes read consecutive chunks) in registers while it walks the parts in order.
// Every row's out and lse are written once, by one group of threads, in a fixed order: the
// result is deterministic.
//
// Layout. With T = CUFLASH_MERGE_TABLE, part s of outs starts at outs[s] for s < T and at
// outs[T - 1] + (s - T + 1) * outs_part_stride after that (a stacked (S, ..., Lq, Dv) array fills
// the table with base + s * stride; a Python sequence of at most T arrays of one shape and
// strides gives its own pointers, no copy). Rows are the output's leading axes and Lq, described
// by up to CUFLASH_MERGE_DIMS axes (outermost first, padded in front with size 1) with strides
// in elements per input; only the last axis of outs is contiguous. out (rows, Dv) and lse (rows)
// are contiguous. Every field of MergeParams is 8 bytes wide, so its NumPy mirror
// (cuflash/_gpu/merge.py) has no padding to get wrong; tests/test_merge.py checks the offsets.
#include "bwd_prep.cuh"  // prep::AccumOf, prep::widen, prep::narrow

#define CUFLASH_MERGE_TABLE 16
#define CUFLASH_MERGE_DIMS 4
#define CUFLASH_MERGE_THREADS 256
#define CUFLASH_MERGE_COLUMNS 16  // per thread and pass: whole 16-byte chunks of every type

namespace cuflash {

struct MergeParams {
    const void* outs[CUFLASH_MERGE_TABLE];  // Element
    const void* lses[CUFLASH_MERGE_TABLE];  // Accum
    void* out;                              // Element, (rows, dv) contiguous
    void* lse;                              // Accum, (rows,) contiguous
    long long outs_part_stride;             // elements between parts past the table
    long long lses_part_stride;
    long long row_shape[CUFLASH_MERGE_DIMS];  // outermost first
    long long outs_row_stride[CUFLASH_MERGE_DIMS];
    long long lses_row_stride[CUFLASH_MERGE_DIMS];
    long long num_parts;
    long long rows;
    long long dv;
    long long lanes;  // threads per row: 1, 2, 4, ..., 32
};

template <typename T>
__device__ __forceinline__ const T* merge_part(const void* const* table, long long stride, long long s) {
    if (s < CUFLASH_MERGE_TABLE) return static_cast<const T*>(table[s]);
    return static_cast<const T*>(table[CUFLASH_MERGE_TABLE - 1]) + (s - (CUFLASH_MERGE_TABLE - 1)) * stride;
}

__device__ __forceinline__ float merge_exp(float x) { return expf(x); }
__device__ __forceinline__ double merge_exp(double x) { return exp(x); }
__device__ __forceinline__ float merge_log(float x) { return logf(x); }
__device__ __forceinline__ double merge_log(double x) { return log(x); }

// A chunk of the row at p, n elements of which are in the row: one 16-byte load when whole and
// aligned, else element by element (zeros past the row).
template <typename Element>
__device__ __forceinline__ prep::Chunk<Element> merge_load(const Element* p, long long n) {
    prep::Chunk<Element> x;
    if (n >= prep::Chunk<Element>::kSize && prep::aligned16(p)) {
        x.bits = __ldg(reinterpret_cast<const uint4*>(p));
    } else {
#pragma unroll
        for (int e = 0; e < prep::Chunk<Element>::kSize; ++e) x.e[e] = e < n ? p[e] : Element(0);
    }
    return x;
}

template <typename Element>
__device__ __forceinline__ void merge_store(Element* p, const prep::Chunk<Element>& x, long long n) {
    if (n >= prep::Chunk<Element>::kSize && prep::aligned16(p)) {
        *reinterpret_cast<uint4*>(p) = x.bits;
    } else {
#pragma unroll
        for (int e = 0; e < prep::Chunk<Element>::kSize; ++e)
            if (e < n) p[e] = x.e[e];
    }
}

template <typename Element>
__global__ void __launch_bounds__(CUFLASH_MERGE_THREADS) merge_attention(const MergeParams p) {
    using Accum = typename prep::AccumOf<Element>::type;
    constexpr int kVec = prep::Chunk<Element>::kSize;        // elements per 16-byte chunk
    constexpr int kChunks = CUFLASH_MERGE_COLUMNS / kVec;    // chunks per thread per pass
    static_assert(kChunks * kVec == CUFLASH_MERGE_COLUMNS, "whole chunks per pass");
    const Accum kNegInf = -static_cast<Accum>(__int_as_float(0x7f800000));

    // The pointer tables in shared memory: indexing the by-value argument with a run-time part
    // number would copy it to every thread's local memory.
    __shared__ const void* outs_table[CUFLASH_MERGE_TABLE];
    __shared__ const void* lses_table[CUFLASH_MERGE_TABLE];
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < CUFLASH_MERGE_TABLE; ++i) {
            outs_table[i] = p.outs[i];
            lses_table[i] = p.lses[i];
        }
    }
    __syncthreads();

    const int lanes = static_cast<int>(p.lanes);
    const int lane = threadIdx.x & (lanes - 1);
    const long long rows_per_block = CUFLASH_MERGE_THREADS / lanes;
    const long long dv = p.dv, parts = p.num_parts;
    Element* out = static_cast<Element*>(p.out);
    Accum* lse_out = static_cast<Accum*>(p.lse);

    for (long long row = blockIdx.x * rows_per_block + threadIdx.x / lanes; row < p.rows;
         row += static_cast<long long>(gridDim.x) * rows_per_block) {
        // The row's offsets in outs and lses (elements), from its index over the row axes.
        long long rest = row, o_off = 0, l_off = 0;
#pragma unroll
        for (int d = CUFLASH_MERGE_DIMS - 1; d > 0; --d) {
            const long long i = rest % p.row_shape[d];
            rest /= p.row_shape[d];
            o_off += i * p.outs_row_stride[d];
            l_off += i * p.lses_row_stride[d];
        }
        o_off += rest * p.outs_row_stride[0];
        l_off += rest * p.lses_row_stride[0];

        // M (fmax passes over NaN; a NaN lse_s then makes W, and so the row, NaN) and W.
        Accum m = kNegInf;
        for (long long s = 0; s < parts; ++s) m = fmax(m, merge_part<Accum>(lses_table, p.lses_part_stride, s)[l_off]);
        const Accum m_ref = m == kNegInf ? Accum(0) : m;
        Accum w_sum = 0;
        for (long long s = 0; s < parts; ++s) {
            const Accum l = merge_part<Accum>(lses_table, p.lses_part_stride, s)[l_off];
            if (l != kNegInf) w_sum += merge_exp(l - m_ref);
        }
        if (lane == 0) lse_out[row] = w_sum == Accum(0) ? kNegInf : m_ref + merge_log(w_sum);

        // Columns go in 16-byte chunks of kVec elements: the pass's chunk j * lanes + lane is this
        // thread's, so a row's lanes read consecutive 16 bytes each (one vector load where the
        // chunk is whole and aligned, element by element where it is not).
        Element* out_row = out + row * dv;
        for (long long c0 = 0; c0 < dv; c0 += static_cast<long long>(lanes) * CUFLASH_MERGE_COLUMNS) {
            Accum acc[kChunks][kVec];
#pragma unroll
            for (int j = 0; j < kChunks; ++j)
#pragma unroll
                for (int e = 0; e < kVec; ++e) acc[j][e] = 0;
            for (long long s = 0; s < parts; ++s) {
                const Accum l = merge_part<Accum>(lses_table, p.lses_part_stride, s)[l_off];
                if (l == kNegInf) continue;  // no key of this part for the row: its out is not read
                const Accum c = merge_exp(l - m_ref) / w_sum;
                const Element* src = merge_part<Element>(outs_table, p.outs_part_stride, s) + o_off;
#pragma unroll
                for (int j = 0; j < kChunks; ++j) {
                    const long long col = c0 + (static_cast<long long>(j) * lanes + lane) * kVec;
                    if (col >= dv) break;
                    const prep::Chunk<Element> x = merge_load(src + col, dv - col);
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[j][e] += c * prep::widen(x.e[e]);
                }
            }
#pragma unroll
            for (int j = 0; j < kChunks; ++j) {
                const long long col = c0 + (static_cast<long long>(j) * lanes + lane) * kVec;
                if (col >= dv) break;
                prep::Chunk<Element> y;
#pragma unroll
                for (int e = 0; e < kVec; ++e) y.e[e] = prep::narrow<Element>(acc[j][e]);
                merge_store(out_row + col, y, dv - col);
            }
        }
    }
}

}  // namespace cuflash
