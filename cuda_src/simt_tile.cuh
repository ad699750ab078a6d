// Register micro-tiles of the float32 / float64 kernels (fwd_simt.cu, bwd_simt.cuh): vectors
// of the element type, the copies between shared memory and registers, the columns of a
// micro-tile, the exponential's units (Math), score modifiers on a tile, and the element-wise
// global -> shared copies (the last two also fwd_dmma.cu's).
#pragma once
#include "dropout.cuh"
#include "params.cuh"
#include "ptx.cuh"

namespace cuflash {
namespace simt {

// The exponential and its units, one convention for the forward's softmax and the backward's
// recomputation of P. float32 works in base 2 with c = scale * log2(e) (p.scale_log2, rounded
// once) and exp2f, the full-accuracy library function (2 ulp; not __expf, not fast-math), so
// an exponent is one FMA; float64 works in base e with the exact double scale.
//   forward:  p_ij = exp(s_ij c - m_i), c = softmax_scale(p) = |scale| (the kernel negates Q when
//             scale < 0), at least the smallest normal number so that -inf * c stays -inf;
//             m_i in the exponent's units, lse = lse(m_i, l_i) in natural log.
//   backward: P_ij = exp(s_ij score_scale(p) - lse_unit(lse_i)), the signed scale.
// With score modifiers (score_mod.cuh) the kernels modify the scores into the exponent's units
// (its `unit`: log2(e) for float, 1 for double) and take c = 1 instead.
template <typename T> struct Math;
template <> struct Math<float> {
    static __device__ __forceinline__ float softmax_scale(const FwdParams& p) { return fmaxf(fabsf(p.scale_log2), 1.17549435e-38f); }
    static __device__ __forceinline__ float score_scale(const FwdParams& p) { return p.scale_log2; }
    static __device__ __forceinline__ float exp(float x) { return exp2f(x); }
    static __device__ __forceinline__ float lse(float m, float l) { return fmaf(m, 0.693147180559945309f, logf(l)); }
    static __device__ __forceinline__ float lse_unit(float lse) { return lse * 1.4426950408889634f; }
    static __device__ __forceinline__ float unit() { return 1.4426950408889634f; }
    static __device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }
    static __device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
};
template <> struct Math<double> {
    static __device__ __forceinline__ double softmax_scale(const FwdParams& p) { return fmax(fabs(p.scale), 2.2250738585072014e-308); }
    static __device__ __forceinline__ double score_scale(const FwdParams& p) { return p.scale; }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double lse(double m, double l) { return m + ::log(l); }
    static __device__ __forceinline__ double lse_unit(double lse) { return lse; }
    static __device__ __forceinline__ double unit() { return 1.0; }
    static __device__ __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000ll); }
    static __device__ __forceinline__ double neg_inf() { return -__longlong_as_double(0x7ff0000000000000ll); }
};

// 16- and 8-byte vectors of T: float4 / float2 for float, double2 / double for double (a
// vector of the element's own type, so the compiler keeps the registers of the array).
template <typename T> struct Vec;
template <> struct Vec<float> { using V16 = float4; using V8 = float2; };
template <> struct Vec<double> { using V16 = double2; using V8 = double; };

// N contiguous elements from 16-byte-aligned shared memory into registers, in the widest
// vectors the length allows (LDS.128 wherever possible).
template <typename T, int N>
__device__ __forceinline__ void lds(T (&dst)[N], const T* src) {
    constexpr int kBytes = N * sizeof(T);
    if constexpr (kBytes % 16 == 0) {
        constexpr int kPer = 16 / sizeof(T);
#pragma unroll
        for (int i = 0; i < N / kPer; ++i) {
            const typename Vec<T>::V16 v = reinterpret_cast<const typename Vec<T>::V16*>(src)[i];
            if constexpr (kPer == 4) {
                dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
            } else {
                dst[2 * i] = v.x; dst[2 * i + 1] = v.y;
            }
        }
    } else if constexpr (sizeof(T) == 4 && kBytes % 8 == 0) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const float2 v = reinterpret_cast<const float2*>(src)[i];
            dst[2 * i] = v.x; dst[2 * i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = src[i];
    }
}

template <typename T, int N>
__device__ __forceinline__ void sts(T* dst, const T (&src)[N]) {
    constexpr int kBytes = N * sizeof(T);
    if constexpr (kBytes % 16 == 0) {
        constexpr int kPer = 16 / sizeof(T);
#pragma unroll
        for (int i = 0; i < N / kPer; ++i) {
            typename Vec<T>::V16 v;
            if constexpr (kPer == 4) {
                v.x = src[4 * i]; v.y = src[4 * i + 1]; v.z = src[4 * i + 2]; v.w = src[4 * i + 3];
            } else {
                v.x = src[2 * i]; v.y = src[2 * i + 1];
            }
            reinterpret_cast<typename Vec<T>::V16*>(dst)[i] = v;
        }
    } else if constexpr (sizeof(T) == 4 && kBytes % 8 == 0) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) reinterpret_cast<float2*>(dst)[i] = make_float2(src[2 * i], src[2 * i + 1]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = src[i];
    }
}

// C = 0 for a lane's micro-tile.
template <typename T, int R, int C>
__device__ __forceinline__ void zero(T (&c)[R][C]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < C; ++j) c[r][j] = T(0);
}

// f(x, r, c) for every element x = a[r][c] of a micro-tile; f(x, y, r, c) over two of one shape.
template <typename T, int R, int C, typename F>
__device__ __forceinline__ void for_each(T (&a)[R][C], F&& f) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < C; ++c) f(a[r][c], r, c);
}
template <typename T, int R, int C, typename F>
__device__ __forceinline__ void for_each(T (&a)[R][C], T (&b)[R][C], F&& f) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < C; ++c) f(a[r][c], b[r][c], r, c);
}

// A score's query row and key (the arguments of ScoreMod and Mask).
struct QK {
    int query, key;
};

// Softcap and ALiBi (score_mod.cuh) on a lane's tile of raw scores a[r][c], element (r, c) being
// the pair at(r, c) (a QK): the scores become the modified ones, in the exponent's units (the
// softmax's c = 1), and true is returned. Without either (no modifier, or sinks alone) the tile
// stays raw and false is returned: the kernel applies its scale as usual. (No bodies of their
// own for softcap or ALiBi alone: fwd_dmma's d128 tile spills with them.)
template <typename Mod, typename T, int R, int C, typename At>
__device__ __forceinline__ bool modify_scores(const Mod& mod, T (&a)[R][C], At&& at) {
    return mod.template dispatch<ModBodies::kPerPlaneSet>([&](const auto& score) {
        for_each(a, [&](T& x, int r, int c) {
            const QK e = at(r, c);
            T grad;
            x = score(x, e.query, e.key, grad);
        });
    });
}

// Dropout's keep bits (dropout.cuh) of a lane's micro-tile, element (r, c) being the pair
// at(r, c) (a QK): one Philox call per element (a lane's keys are 16 apart in the forward, and the
// FFMA kernels' products dwarf the draws), in a loop that is not unrolled (one copy of Philox's
// code; unrolled, the tiles' register counts rose by up to 80 and spilled), the bits in one
// 64-bit register; apply() then scales the kept elements by `scale` (1 / the keep probability,
// in T) and zeroes the others.
template <int R, int C>
struct DropBits {
    static_assert(R * C <= 64, "a lane's keep bits fit one 64-bit register");
    unsigned long long bits;

    template <typename At>
    __device__ __forceinline__ void draw(const Dropout& dropout, At&& at) {
        bits = 0ull;
#pragma unroll 1
        for (int e = 0; e < R * C; ++e) {
            const QK pair = at(e / C, e % C);
            const unsigned long long kept = Dropout::draw_of(dropout.draws(pair.query, pair.key), pair.key) >= dropout.threshold;
            bits |= kept << e;
        }
    }

    template <typename T>
    __device__ __forceinline__ void apply(T (&a)[R][C], T scale) const {
        for_each(a, [&](T& x, int r, int c) { x = (bits >> (r * C + c)) & 1ull ? x * scale : T(0); });
    }
};

// Columns of a lane's micro-tile: TW columns as TW / kVec chunks of kVec adjacent ones; chunk c
// of lane-column cg starts at c * 16 * kVec + cg * kVec, so for a fixed chunk the 16 lanes of a
// row group read one contiguous 16 * kVec run (two wavefronts for LDS.128, the minimum).
template <typename T, int TW>
struct Cols {
    static constexpr int kVec = (TW * sizeof(T)) % 16 == 0 && (16 / sizeof(T)) <= TW
                                    ? int(16 / sizeof(T))
                                    : ((TW * sizeof(T)) % 8 == 0 && (8 / sizeof(T)) <= TW ? int(8 / sizeof(T)) : 1);
    static constexpr int kChunks = TW / kVec;
    static_assert(TW % kVec == 0, "micro-tile width");
    // The first column of chunk c.
    static __device__ __forceinline__ int chunk(int cg, int c) { return c * 16 * kVec + cg * kVec; }
    // The column of the lane's i-th value.
    static __device__ __forceinline__ int col(int cg, int i) { return chunk(cg, i / kVec) + i % kVec; }
};

// One thread's share of a global -> shared copy that walks down a column: rows r, r + kRowStep, ...
// below `rows` of column d, row r of the tile being global row row_base + r and landing at
// dst_of(r), in cp.async of kBytes (the element's size, or 16 for a 16-byte run). An element
// exists where row_base + r < row_limit and d < width; one that does not is zero-filled, src
// itself standing in as the source address. The source pointer advances by one add per row: no
// index multiply in the loop.
template <int kRowStep, int kBytes, typename T, typename DstOf>
__device__ __forceinline__ void copy_down_column(const T* src, long long row_stride, int row_base, int r, int rows,
                                                 int row_limit, int d, int width, DstOf&& dst_of) {
    const T* g = src + (long long)(row_base + r) * row_stride + d;
    const long long g_step = kRowStep * row_stride;
#pragma unroll 1
    for (; r < rows; r += kRowStep, g += g_step) {
        const bool ok = row_base + r < row_limit && d < width;
        if constexpr (kBytes == 16)
            ptx::cp_async_16(ptx::smem_addr(dst_of(r)), ok ? g : src, ok ? 16 : 0);
        else
            ptx::cp_async_elem<kBytes>(dst_of(r), ok ? g : src, ok);
    }
}

// Global -> shared copy of `rows` rows of kWidth elements (row r of the tile is global row
// row_base + r): dst[r * ld + d] = src[(row_base + r) * row_stride + d], zero for d >= width or
// row_base + r >= row_limit. Element-sized cp.async: any row stride, no registers held;
// consecutive lanes copy consecutive d, so each warp instruction reads whole sectors. The tiles
// of fwd_dmma and the backward, and fwd_simt's K and V rows that are not in whole 16-byte runs.
template <typename T, int kWidth, int kThreads>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, long long row_stride, int row_base, int rows,
                                          int row_limit, int width, int tid) {
    if constexpr (kThreads % kWidth == 0) {
        // Each thread keeps one column and walks rows.
        const int d = tid % kWidth;
        copy_down_column<kThreads / kWidth, sizeof(T)>(src, row_stride, row_base, tid / kWidth, rows, row_limit, d,
                                                       width, [&](int r) { return dst + r * ld + d; });
    } else {
        const int total = rows * kWidth;
#pragma unroll 1
        for (int e = tid; e < total; e += kThreads) {
            const int r = e / kWidth, d = e % kWidth;
            const bool ok = row_base + r < row_limit && d < width;
            ptx::cp_async_elem<sizeof(T)>(dst + r * ld + d, ok ? src + (long long)(row_base + r) * row_stride + d : src,
                                          ok);
        }
    }
}

}  // namespace simt
}  // namespace cuflash
