// Shared pieces of the backward's two memory-bound kernels around the main ones, for every
// input type (half, bfloat16, float, double):
//   bwd_delta.cu       delta_i = rowsum(dO_i o O_i), and dq_accum's rows zeroed, before dK/dV
//   bwd_dq_convert.cu  dQ = scale * dq_accum in the input type, after dK/dV
// Both move 16-byte chunks (16 / sizeof(Element) elements) where a chunk is whole and aligned,
// element by element otherwise (odd widths, unaligned views), and sum in Accum: float for the
// 16- and 32-bit types, double for double (the exact path keeps its precision).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "params.cuh"

namespace cuflash {
namespace prep {

template <typename Element>
struct AccumOf {
    using type = float;
};
template <>
struct AccumOf<double> {
    using type = double;
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Element -> Accum (exact) and Accum -> Element (round to nearest even).
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename Element>
__device__ __forceinline__ Element narrow(typename AccumOf<Element>::type x);
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }

// One 16-byte chunk of elements, viewable as raw bits for vector loads and stores.
template <typename Element>
union Chunk {
    static constexpr int kSize = 16 / sizeof(Element);
    uint4 bits;
    Element e[kSize];
};

// sum_e a[e] * b[e] over the chunk's first min(n, kSize) elements, in Accum.
template <typename Element, typename Accum>
__device__ __forceinline__ Accum chunk_dot(const Element* a, const Element* b, int n) {
    constexpr int kSize = Chunk<Element>::kSize;
    Chunk<Element> ca, cb;
    if (n >= kSize && aligned16(a) && aligned16(b)) {
        ca.bits = __ldg(reinterpret_cast<const uint4*>(a));
        cb.bits = __ldg(reinterpret_cast<const uint4*>(b));
    } else {
#pragma unroll
        for (int e = 0; e < kSize; ++e) {
            ca.e[e] = e < n ? a[e] : Element(0);
            cb.e[e] = e < n ? b[e] : Element(0);
        }
    }
    Accum acc = 0;
#pragma unroll
    for (int e = 0; e < kSize; ++e) acc += widen(ca.e[e]) * widen(cb.e[e]);
    return acc;
}

// x[0, n) = 0 by kThreads threads: 16-byte stores when x is 16-byte aligned, the tail and
// unaligned spans element by element.
template <int kThreads, typename T>
__device__ __forceinline__ void zero_span(T* x, int n, int tid) {
    constexpr int kPer = 16 / sizeof(T);
    int head = 0;
    if (aligned16(x)) {
        const int vectors = n / kPer;
        for (int i = tid; i < vectors; i += kThreads) reinterpret_cast<uint4*>(x)[i] = make_uint4(0, 0, 0, 0);
        head = vectors * kPer;
    }
    for (int i = head + tid; i < n; i += kThreads) x[i] = T(0);
}

}  // namespace prep
}  // namespace cuflash
