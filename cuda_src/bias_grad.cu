// dbias (issue 15): dS of every score, as the dK/dV kernels write it (score_mod.cuh's BiasGrad:
// (lead..., Lq, Lk), C-contiguous, in Accum), summed over the axes along which the bias was
// broadcast and rounded to the bias's type. One thread per dbias entry adds its terms one after
// another in a fixed order (the summed axes in C order) in double, then rounds once to Accum and
// once to the bias's type: no atomics, so the same bits run after run, on CuPy arrays and torch
// tensors alike (both launch this kernel: cuflash/_gpu/bias_grad.py).
//
// Axes. dS's axes longer than 1, neighbours of one kind merged (kept: dbias has them; summed:
// the bias was broadcast along them), split into the kept and the summed ones, each outermost
// first and padded in front with size 1 (stride 0), up to CUFLASH_BIAS_GRAD_DIMS of each
// (bias_grad.py sums in passes beyond that). Entry e of dbias (C order over the kept axes) starts
// at the kept axes' offset; its terms walk the summed axes, the innermost one in the inner loop,
// the others as an odometer. Adjacent threads take adjacent entries: where the keys are kept
// (a bias broadcast over batch or heads) their loads are adjacent too. Every field of
// BiasGradParams is 8 bytes wide, so its NumPy mirror (bias_grad.PARAMS_DTYPE) has no padding.
#include "bwd_prep.cuh"  // prep::AccumOf, prep::narrow

#define CUFLASH_BIAS_GRAD_DIMS 8
#define CUFLASH_BIAS_GRAD_THREADS 256

namespace cuflash {

struct BiasGradParams {
    const void* dscores;  // Accum
    void* dbias;          // Element, (entries,) contiguous
    long long entries;    // the kept axes' product
    long long terms;      // the summed axes' product: terms per entry
    long long kept_shape[CUFLASH_BIAS_GRAD_DIMS];  // outermost first
    long long kept_stride[CUFLASH_BIAS_GRAD_DIMS];  // in elements of dscores
    long long summed_shape[CUFLASH_BIAS_GRAD_DIMS];
    long long summed_stride[CUFLASH_BIAS_GRAD_DIMS];
};

template <typename Element>
__global__ void __launch_bounds__(CUFLASH_BIAS_GRAD_THREADS) bias_grad(const BiasGradParams params) {
    using Accum = typename prep::AccumOf<Element>::type;
    constexpr int kDims = CUFLASH_BIAS_GRAD_DIMS;
    const long long entry = static_cast<long long>(blockIdx.x) * CUFLASH_BIAS_GRAD_THREADS + threadIdx.x;
    if (entry >= params.entries) return;
    long long start = 0, rest = entry;
#pragma unroll
    for (int d = kDims - 1; d >= 0; --d) {
        const long long n = params.kept_shape[d];
        if (n > 1) {
            start += (rest % n) * params.kept_stride[d];
            rest /= n;
        }
    }
    const Accum* scores = static_cast<const Accum*>(params.dscores) + start;
    const long long inner = params.summed_shape[kDims - 1];
    const long long inner_stride = params.summed_stride[kDims - 1];
    long long index[kDims - 1] = {};  // the outer summed axes' odometer
    long long at = 0;
    double sum = 0.0;
    for (long long t = 0; t < params.terms; t += inner) {
        for (long long i = 0; i < inner; ++i) sum += static_cast<double>(scores[at + i * inner_stride]);
#pragma unroll
        for (int d = kDims - 2; d >= 0; --d) {
            at += params.summed_stride[d];
            if (++index[d] < params.summed_shape[d]) break;
            at -= params.summed_stride[d] * params.summed_shape[d];
            index[d] = 0;
        }
    }
    static_cast<Element*>(params.dbias)[entry] = prep::narrow<Element>(static_cast<Accum>(sum));
}

}  // namespace cuflash
