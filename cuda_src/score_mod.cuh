// ScoreMod: what happens to a score between Q K^T and the softmax. Softcap and ALiBi run in the
// kernels compiled with kScoreMods (the Variants of calls that have either); plain calls keep the
// scale folded into the softmax's exponent and never run the modifier code.
//
// For query i and key j of one attention row (batch..., head), with s = q_i . k_j raw from the
// MMA (cuflash/_cpu.py has the same order, and the float64 reference in tests/reference.py):
//   x = scale * s
//   x = softcap * tanh(x / softcap)           softcap > 0 (Gemma-2, Grok)
//   x = x + bias[.., i, j]                      an additive bias (AlphaFold's pair bias, Swin's)
//   x = x - slope * |i + diag - j|             ALiBi, the head's slope; diag as in the mask rule
//   x = -inf where mask[.., i, j] is false     a boolean mask (True = visible)
// then the positional mask (Mask::visible). The result is returned in the units of the kernel's
// exponential, times `unit` (log2(e) for the float kernels' exp2, 1 for float64's exp), so the
// online softmax and the backward's P = exp(x - lse) take it with a multiplier of 1.
// The backward's chain rule needs dx / d(scale * s): 1 - tanh^2 under softcap, else 1
// (apply's `grad`); the bias's and ALiBi's terms do not depend on s. The bias's gradient is
// dS = P o (dP - delta) itself (BiasGrad, below).
//
// Bias and mask are read element by element from global memory (the caller's arrays, any
// strides, a broadcast axis at stride 0: L2 holds a bias shared by many rows) at the pairs the
// kernels modify. Those include rows past Lq and keys past Lk of a tile that crosses an end;
// they are not read there (the Mask hides them anyway).
//
// A sink (gpt-oss) is not a modifier of a score but one more logit of the row, with no value:
// every forward kernel, plain or not, starts its softmax from it as if it had been seen
// (m_i = sink, l_i = 1), which puts it in the row's denominator and lse. The backward then
// needs nothing: P = exp(x - lse) already divides by it, and dsink = -sum_i exp(sink - lse_i)
// delta_i is summed by the host (plan.py).
#pragma once
#include "params.cuh"
#include "ptx.cuh"

namespace cuflash {

// tanh and 1 - tanh^2. kFast (fp16/bf16 kernels): with r = 1 / (e^{2x} + 1), tanh = 1 - 2r and
// 1 - tanh^2 = 4 r (1 - r) (no cancellation where tanh is near +-1): ex2.approx and a fast
// divide, absolute error ~1e-7 (tanh.approx, one MUFU instead of two, has a relative error of
// 2^-11: measured, dsinks of a one-row float16 call then drifts to 5x a plain float16
// implementation's error). At e^{2x} = inf the divide gives r = 0 exactly, at 0 r = 1.
// Otherwise the library's tanh (exact fp32 / fp64).
template <typename T, bool kFast>
struct Tanh;
template <>
struct Tanh<float, true> {
    float t, one_minus_t2;
    __device__ __forceinline__ explicit Tanh(float x) {
        const float r = __fdividef(1.f, ptx::ex2(x * 2.8853900817779268f) + 1.f);  // 2 log2(e)
        t = 1.f - 2.f * r;
        one_minus_t2 = 4.f * r * (1.f - r);
    }
};
template <>
struct Tanh<float, false> {
    float t, one_minus_t2;
    __device__ __forceinline__ explicit Tanh(float x) : t(tanhf(x)), one_minus_t2(fmaf(-t, t, 1.f)) {}
};
template <>
struct Tanh<double, false> {
    double t, one_minus_t2;
    __device__ __forceinline__ explicit Tanh(double x) : t(::tanh(x)), one_minus_t2(fma(-t, t, 1.0)) {}
};

// A compile-time flag as a value, for generic lambdas: decltype(flag)::value.
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

template <typename T, bool kFast, bool kCapped, bool kAlibi>
struct RowScores;

// T: the type the kernel computes scores in (float, or double for float64). kFast: tanh on the
// special-function unit (fp16/bf16 kernels only).
template <typename T, bool kFast = false>
struct ScoreMod {
    const FwdParams& params;  // the bias's and mask's strides and extents, read where used
    T mul;    // s's multiplier: scale * unit, or scale / softcap under softcap
    T cap;    // softcap * unit; 0: no softcap
    T slope;  // the head's ALiBi slope * unit; 0: none
    T unit;   // the exponent's units per natural unit (log2(e) or 1): the bias's multiplier
    int diag;
    int row;  // the attention row bh: where its bias and mask planes start (FwdParams::score_rows)

    // The modifiers of attention row bh. `scale`: the scale the kernel applies to its raw
    // scores (the forwards negate Q for a negative scale and pass |scale|); `diag`: the row's
    // sequence's mask diagonal (Mask::diag).
    __device__ __forceinline__ ScoreMod(const FwdParams& p, int bh, T scale, T unit, int diag)
        : params(p), unit(unit), diag(diag) {
        const bool capped = p.softcap > 0.0;
        cap = capped ? static_cast<T>(p.softcap) * unit : T(0);
        mul = capped ? static_cast<T>(scale / static_cast<T>(p.softcap)) : scale * unit;
        slope = T(0);
        head(p, bh, unit);
    }

    // Move to attention row bh (a dK/dV block's next head of a GQA group): the slope, the
    // bias and the mask depend on the head.
    __device__ __forceinline__ void head(const FwdParams& p, int bh, T unit) {
        if (p.alibi_slopes != nullptr) slope = static_cast<const T*>(p.alibi_slopes)[bh] * unit;
        row = bh;
    }

    // Whether the scores change (softcap, a bias, ALiBi or a mask). With sinks alone they do
    // not: the kernels keep their plain path, the scale folded into the softmax's exponent.
    __device__ __forceinline__ bool modifies() const {
        return cap != T(0) || slope != T(0) || params.bias != nullptr || params.mask != nullptr;
    }

    // Runs body(score) with score a RowScores<T, kFast, kCapped, kAlibi> for the modifiers this
    // row has, and returns whether it ran (modifies()): the per-element code is compiled once per
    // combination and chosen per tile (a warp-uniform branch), so a score pays only for the
    // modifiers that are on. The row's bias and mask planes are read here, once per tile, not per
    // score. kSplitAlibi = false: two combinations, not three (ALiBi's FADD and FFMA run, with a
    // slope of 0 under softcap alone), for the backward kernels, whose loop bodies are long
    // already. A bias or mask alone runs the ALiBi combination with a slope of 0 (their own
    // reads, a run-time branch, dwarf its FADD): no combination is added for them.
    template <bool kSplitAlibi = true, typename Body>
    __device__ __forceinline__ bool dispatch(Body&& body) const {
        if (cap != T(0)) {
            if (!kSplitAlibi || slope != T(0) || params.bias != nullptr || params.mask != nullptr) body(scores<true, true>());
            else body(scores<true, !kSplitAlibi>());
            return true;
        }
        if (modifies()) {
            body(scores<false, true>());
            return true;
        }
        return false;
    }

    template <bool kCapped, bool kAlibi>
    __device__ __forceinline__ RowScores<T, kFast, kCapped, kAlibi> scores() const {
        return {*this, bias_plane(), mask_plane()};
    }

    // The modified score of raw s at (query i, key j) in the exponent's units, and grad =
    // dx / d(scale * s) (1 without softcap); kAlibi: ALiBi's term, the bias and the mask (dispatch).
    template <bool kCapped, bool kAlibi>
    __device__ __forceinline__ T apply(T s, int i, int j, T& grad, const T* bias, const unsigned char* mask) const {
        T x = s * mul;
        grad = T(1);
        if constexpr (kCapped) {
            const Tanh<T, kFast> th(x);
            x = cap * th.t;
            grad = th.one_minus_t2;
        }
        if constexpr (kAlibi) x = bias_and_mask(x - slope * distance(i, j), i, j, bias, mask);
        return x;
    }

    // Row bh's bias and mask planes (FwdParams::score_rows), or null: none.
    __device__ __forceinline__ const T* bias_plane() const {
        return params.bias != nullptr ? static_cast<const T*>(params.bias) + params.score_rows[2 * row] : nullptr;
    }
    __device__ __forceinline__ const unsigned char* mask_plane() const {
        return params.mask != nullptr ? params.mask + params.score_rows[2 * row + 1] : nullptr;
    }

    // x plus the bias at (i, j), or -inf where the mask hides (i, j), from the row's planes; not
    // read outside Lq x Lk. (Addition commutes: the bias after ALiBi's term is the reference's
    // bias before it.)
    __device__ __forceinline__ T bias_and_mask(T x, int i, int j, const T* bias, const unsigned char* mask) const {
        const FwdParams& p = params;
        if ((bias != nullptr || mask != nullptr) && i < p.seqlen_q && j < p.seqlen_k) {
            if (bias != nullptr) x = fma(bias[i * p.bias_row_stride + j * p.bias_col_stride], unit, x);
            if (mask != nullptr && !mask[i * p.mask_row_stride + j * p.mask_col_stride])
                x = -static_cast<T>(__int_as_float(0x7f800000));
        }
        return x;
    }

    // ALiBi's |i + diag - j|, as a difference of T: exact (integers below 2^24), and the
    // conversions of i + diag and j are shared by a fragment's rows and columns, so an element
    // costs one FADD.
    __device__ __forceinline__ T distance(int i, int j) const {
        return fabs(static_cast<T>(i + diag) - static_cast<T>(j));
    }

    // Row bh's sink in the exponent's units (the softmax's starting logit), or -inf: none.
    static __device__ __forceinline__ T sink(const FwdParams& p, int bh, T unit) {
        return p.sinks != nullptr ? static_cast<const T*>(p.sinks)[bh] * unit : -static_cast<T>(__int_as_float(0x7f800000));
    }
};

// What ScoreMod::dispatch hands its body: one row's modifiers, the combination fixed, with the
// row's bias and mask planes at hand. score(s, i, j, grad): the modified score of raw s at
// (query i, key j) and grad = dx / d(scale * s).
template <typename T, bool kFast, bool kCapped, bool kAlibi>
struct RowScores {
    static constexpr bool capped = kCapped;
    const ScoreMod<T, kFast>& mod;
    const T* bias;              // the row's bias plane, or null
    const unsigned char* mask;  // the row's mask plane, or null

    __device__ __forceinline__ T operator()(T s, int i, int j, T& grad) const {
        return mod.template apply<kCapped, kAlibi>(s, i, j, grad, bias, mask);
    }
};

// The bias's gradient (BwdParams::dbias): the dK/dV kernels store dS = P o (dP - delta) (of
// the score after softcap, before its factor: the bias is added after the cap) of every pair
// of row bh that a block visits, 0 where hidden, into a contiguous (rows, Lq, Lk) buffer in
// the accumulation type that the host zeroed (pairs outside the blocks' tile ranges stay 0) and
// sums over bias's broadcast axes afterwards, in a fixed order: reproducible, no atomics.
template <typename T>
struct BiasGrad {
    const BwdParams& params;  // (a reference, never a pointer: that would copy the params to local memory)
    int row;                  // the attention row bh

    __device__ __forceinline__ BiasGrad(const BwdParams& p, int bh) : params(p), row(bh) {}

    __device__ __forceinline__ void head(int bh) { row = bh; }  // a dK/dV block's next head

    __device__ __forceinline__ bool wanted() const { return params.dbias != nullptr; }

    // dS of pair (i, j); `hidden`: the positional mask hides it (the kernel's P may not be 0 yet).
    __device__ __forceinline__ void store(int i, int j, T ds, bool hidden = false) const {
        const FwdParams& f = params.fwd;
        if (i < f.seqlen_q && j < f.seqlen_k && !hidden)
            static_cast<T*>(params.dbias)[(static_cast<long long>(row) * f.seqlen_q + i) * f.seqlen_k + j] = ds;
    }
};

// No bias gradient (the dQ kernels' share of modified_p_ds).
struct NoBiasGrad {
    __device__ __forceinline__ bool wanted() const { return false; }
    template <typename T>
    __device__ __forceinline__ void store(int, int, T, bool = false) const {}
};

}  // namespace cuflash
