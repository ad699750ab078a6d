// Register micro-tiles of the float32 / float64 kernels (fwd_simt.cu, bwd_simt.cuh): vectors
// of the element type and the copies between shared memory and registers.
#pragma once

namespace cuflash {
namespace simt {

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
    static __device__ __forceinline__ int col(int cg, int c) { return c * 16 * kVec + cg * kVec; }
};

}  // namespace simt
}  // namespace cuflash
