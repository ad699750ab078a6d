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
// online softmax and the backward's P = exp(x - lse) take it with a multiplier of 1 — except
// ALiBi alone where the kernel asks for raw units (ModBodies::kRawAlibi, fp16/bf16 kernels):
// its score stays in the units of s, x = s - (slope / (scale unit)) |i + diag - j|, and is
// taken with the multiplier scale * unit as a plain score is, one FMUL less per score
// (RowScores::multiplier and exponent say which).
// The backward's chain rule needs dx / d(scale * s): 1 - tanh^2 under softcap, else 1
// (apply's `grad`); the bias's and ALiBi's terms do not depend on s. The bias's gradient is
// dS = P o (dP - delta) itself (BiasGrad, below).
//
// Bias and mask are read element by element at the pairs the kernels modify, through a
// GlobalPlanes: from global memory (the planes as the host laid them out: a broadcast axis at
// stride 0, L2 holding a bias shared by many rows), or from a shared-memory copy of the tile
// that a ScorePlaneStage brought in with the K/V pipeline (kernels that stage: the copies are
// in flight during the previous tile's MMAs instead of stalling the score step). Those pairs
// include rows past Lq and keys past Lk of a tile that crosses an end; they are not read there
// (the Mask hides them anyway). The tensor-core kernels add a bias without softcap before any of
// this (Hopper's warp-specialized ones, and fwd_tc, bwd_dkdv_tc, bwd_dq_tc where registers allow):
// the score MMA accumulates onto bias / scale (tile_tc.cuh's bias_into_scores,
// bias_into_transposed_scores), and bias_in_scores tells the bodies here to leave it out
// (for_bodies drops it from the planes they read).
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

// tanh, as the multiple `c tanh(x)` the score takes and 1 - tanh^2 (the backward's factor),
// from the argument times kArgument (ScoreMod folds it into its multiplier: one FMUL per score).
// Three forms, by the kernel's element type (kFastTanh):
//   kExpTanh (fp16 and TF32 kernels): with r = 1 / (e^{2x} + 1), tanh = 1 - 2r and
//       1 - tanh^2 = 4 r (1 - r) (no cancellation where tanh is near +-1): ex2.approx and a fast
//       divide, absolute error ~1e-7; c tanh = c - 2c r and 4 r (1 - r) = 4r - 4r r are one FFMA
//       each (-2c is hoisted). At e^{2x} = inf the divide gives r = 0 exactly, at 0 r = 1. Two
//       special-function (MUFU) ops per score beside the softmax's exponential: at d128 the
//       MUFU's 16 ops per SM clock then set the pace (about 1.5x a plain forward).
//   kApproxTanh (bf16 kernels): tanh.approx, one MUFU op, relative error 2^-11 — 4x below bf16's
//       own rounding of the score (2^-9), which a plain bf16 implementation pays on every score.
//       Not for fp16: its rounding is 2^-11 too, and tanh.approx's error is systematic where
//       rounding's averages out (measured: dsinks of a one-row float16 call at 5x a plain
//       float16 implementation's error).
//   kLibraryTanh (float32 and float64 kernels): the library's tanh, exact to their rounding.
enum TanhForm { kLibraryTanh, kExpTanh, kApproxTanh };

// The form for a tensor-core kernel of element type Element: fast for fp16, bf16 and one TF32
// product; the library's for float32 under precision "highest" (tc::tf32x3, its 3xTF32 and bf16x6
// kernels), whose scores keep float32's accuracy.
template <typename Element>
constexpr int kFastTanh = ptx::kIsBf16<Element> ? kApproxTanh : ptx::kIsTf32x3<Element> ? kLibraryTanh : kExpTanh;

template <typename T, int kForm>
struct Tanh;
template <>
struct Tanh<float, kExpTanh> {
    static constexpr float kArgument = 2.8853900817779268f;  // 2 log2(e): ex2 of it is e^{2x}
    float r;
    __device__ __forceinline__ explicit Tanh(float scaled) : r(__fdividef(1.f, ptx::ex2(scaled) + 1.f)) {}
    __device__ __forceinline__ float times(float c) const { return fmaf(-2.f * c, r, c); }
    __device__ __forceinline__ float one_minus_t2() const {
        const float four_r = 4.f * r;
        return fmaf(-four_r, r, four_r);
    }
};
template <>
struct Tanh<float, kApproxTanh> {
    static constexpr float kArgument = 1.f;
    float t;
    __device__ __forceinline__ explicit Tanh(float x) : t(ptx::tanh_approx(x)) {}
    __device__ __forceinline__ float times(float c) const { return c * t; }
    __device__ __forceinline__ float one_minus_t2() const { return fmaf(-t, t, 1.f); }
};
template <typename T>
struct Tanh<T, kLibraryTanh> {
    static constexpr T kArgument = T(1);
    T t;
    __device__ __forceinline__ explicit Tanh(T x) : t(tanh_of(x)) {}
    __device__ __forceinline__ T times(T c) const { return c * t; }
    __device__ __forceinline__ T one_minus_t2() const { return fma(-t, t, T(1)); }

  private:
    static __device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
    static __device__ __forceinline__ double tanh_of(double x) { return ::tanh(x); }
};

// A compile-time flag as a value, for generic lambdas: decltype(flag)::value.
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// Which of a row's bias and mask planes a RowScores reads, fixed at compile time where dispatch
// split them (kBiasPlane, kMaskPlane, kBothPlanes) so that a score pays for exactly the reads its
// call has; kAnyPlanes checks at run time which exist (the combinations with softcap or ALiBi).
enum PlaneSet { kNoPlanes, kBiasPlane, kMaskPlane, kBothPlanes, kAnyPlanes };

// Which combinations of modifiers ScoreMod::dispatch compiles a body of their own for (every
// body is the caller's per-element code, unrolled over a fragment: more bodies, more code):
//   kByCap: two, softcap or not (ALiBi, bias and mask at run time);
//   kPerModifier: also softcap alone and ALiBi alone, with no bias or mask (Gemma-2, BLOOM):
//       neither then pays the other's term nor a test per score of planes it does not have;
//   kPerPlaneSet: also a bias, a mask, or both, without softcap or ALiBi (AlphaFold's pair
//       bias, Swin's bias and mask: at head dim 32 a score's own work matters as much as its
//       MMAs);
//   kAll: both;
// and, or-ed in (kPerModifier's), kRawAlibi: ALiBi alone returns its scores in the raw units of s
// (RowScores::raw_units; the fp16/bf16 kernels' choice: in fwd_tc's TF32 form it spills), in
// kernels of a fast tanh only (ScoreMod::kFast: its slope in raw units is a fast divide); the
// others' ALiBi-alone body stays in the exponent's units.
enum class ModBodies : unsigned { kByCap = 0, kPerModifier = 1, kPerPlaneSet = 2, kAll = 3, kRawAlibi = 4 };

__device__ __forceinline__ constexpr ModBodies operator|(ModBodies a, ModBodies b) {
    return static_cast<ModBodies>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}
__device__ __forceinline__ constexpr bool has_bodies(ModBodies bodies, ModBodies wanted) {
    return (static_cast<unsigned>(bodies) & static_cast<unsigned>(wanted)) != 0;
}

// Where ALiBi's distance |i + diag - j| is measured from. Pairs of an unrolled fragment are
// (i0 + a, j0 + b) with a, b compile-time constants once the origin is the fragment's first pair:
// d0 + (a - b) is then one FADD of an immediate, where i + diag and j would each be converted per
// row and column. Exact (integers below 2^24), so any origin gives the same distance.
template <typename T>
struct PairOrigin {
    int i0, j0;
    T d0;  // i0 + diag - j0
    __device__ __forceinline__ T distance(int i, int j) const { return d0 + static_cast<T>((i - i0) - (j - j0)); }
};

template <typename T, int kTanh, bool kCapped, bool kAlibi, int kPlanes, bool kRaw, typename Planes,
          bool kFromOrigin = false>
struct RowScores;

// Where a row's bias (in the score type T) and mask (bytes, nonzero = visible) are read, at
// (query i, key j): null pointers where the call has none.
// GlobalPlanes: the row's planes in global memory, with the strides of the params `p`; never read
// outside Lq x Lk (kZeroFilled false).
template <typename T>
struct GlobalPlanes {
    static constexpr bool kZeroFilled = false;
    const T* bias_at;
    const unsigned char* mask_at;
    __device__ __forceinline__ T bias(int i, int j, const FwdParams& p) const {
        return bias_at[i * p.bias_row_stride + j * p.bias_col_stride];
    }
    __device__ __forceinline__ bool visible(int i, int j, const FwdParams& p) const {
        return mask_at[i * p.mask_row_stride + j * p.mask_col_stride] != 0;
    }
};
// StagedPlanes: a shared-memory tile of them whose first element is (row0, col0), rows kBiasPitch
// and kMaskPitch elements apart (ScorePlaneStage). Its entries outside Lq x Lk are zeros
// (kZeroFilled): reading them needs no bounds test, and what they give there (a bias of 0, a
// hidden key) is never used: the Mask hides keys past Lk, and rows past Lq are not stored.
template <typename T, int kBiasPitch, int kMaskPitch>
struct StagedPlanes {
    static constexpr bool kZeroFilled = true;
    const T* bias_at;
    const unsigned char* mask_at;
    int row0, col0;
    __device__ __forceinline__ const T* bias_address(int i, int j) const { return bias_at + (i - row0) * kBiasPitch + (j - col0); }
    __device__ __forceinline__ T bias(int i, int j, const FwdParams&) const { return *bias_address(i, j); }
    __device__ __forceinline__ bool visible(int i, int j, const FwdParams&) const {
        return mask_at[(i - row0) * kMaskPitch + (j - col0)] != 0;
    }
};

// T: the type the kernel computes scores in (float, or double for float64). kTanh: the form of
// softcap's tanh (TanhForm: kFastTanh<Element> in the tensor-core kernels); a fast one also
// marks the fp16/bf16 kernels' other shortcuts (fast divides, raw units).
template <typename T, int kTanh = kLibraryTanh>
struct ScoreMod {
    static constexpr bool kFast = kTanh != kLibraryTanh;
    const FwdParams& params;  // the bias's and mask's strides and extents, read where used
    T mul;    // s's multiplier: scale * unit, or scale / softcap * Tanh::kArgument under softcap
    T cap;    // softcap * unit; 0: no softcap
    T slope;  // the head's ALiBi slope * unit; 0: none
    T raw_slope;  // slope / mul: ALiBi's slope in the raw units of s (RowScores::raw_units, kFast)
    T unit;   // the exponent's units per natural unit (log2(e) or 1): the bias's multiplier
    int diag;
    int row;  // the attention row bh: where its bias and mask planes start (FwdParams::score_rows)
    // The kernel added the bias to S itself (tc::bias_into_scores: S = Q K^T + bias / scale, the
    // MMA's accumulator loaded with the bias): the bodies below neither read nor add it again.
    bool bias_in_scores = false;

    // The modifiers of attention row bh. `scale`: the scale the kernel applies to its raw
    // scores (the forwards negate Q for a negative scale and pass |scale|); `diag`: the row's
    // sequence's mask diagonal (Mask::diag).
    __device__ __forceinline__ ScoreMod(const FwdParams& p, int bh, T scale, T unit, int diag)
        : params(p), unit(unit), diag(diag) {
        const bool capped = p.softcap > 0.0;
        cap = capped ? static_cast<T>(p.softcap) * unit : T(0);
        mul = capped ? static_cast<T>(scale / static_cast<T>(p.softcap)) * Tanh<T, kTanh>::kArgument : scale * unit;
        slope = raw_slope = T(0);
        head(p, bh, unit);
    }

    // Move to attention row bh (a dK/dV block's next head of a GQA group): the slope, the
    // bias and the mask depend on the head.
    __device__ __forceinline__ void head(const FwdParams& p, int bh, T unit) {
        if (p.alibi_slopes != nullptr) {
            slope = static_cast<const T*>(p.alibi_slopes)[bh] * unit;
            // (a fast divide, 2 ulp: an IEEE one brings its slow-path call, and its registers,
            // into every kernel; the float64 kernels never take raw units)
            if constexpr (kFast) raw_slope = __fdividef(slope, mul);
        }
        row = bh;
    }

    // Whether the scores change (softcap, a bias, ALiBi or a mask). With sinks alone they do
    // not: the kernels keep their plain path, the scale folded into the softmax's exponent.
    __device__ __forceinline__ bool modifies() const {
        return cap != T(0) || slope != T(0) || adds_bias() || params.mask != nullptr;
    }

    // Whether the bodies add a bias (the call has one the kernel has not put in S already).
    __device__ __forceinline__ bool adds_bias() const { return params.bias != nullptr && !bias_in_scores; }

    // Runs body(score) with score a RowScores for the modifiers this row has, and returns whether
    // it ran (modifies()): the per-element code is compiled once per combination and chosen per
    // tile (a warp-uniform branch), so a score pays only for the modifiers that are on. The row's
    // bias and mask planes are read here, once per tile, not per score. kBodies (ModBodies) says
    // which combinations get a body of their own; the others share a general one (softcap or
    // not; ALiBi, bias and mask at run time: a slope of 0, planes tested per score).
    // `planes`: where the bias and mask are read (a staged tile's, ScorePlaneStage::planes), the
    // row's planes in global memory without (read in the branch taken: nothing is held where no
    // modifier runs).
    template <ModBodies kBodies = ModBodies::kAll, typename Body>
    __device__ __forceinline__ bool dispatch(Body&& body) const {
        return dispatch_on<kBodies>(body, [&] { return planes(); });
    }
    template <ModBodies kBodies = ModBodies::kAll, typename Body, typename Planes>
    __device__ __forceinline__ bool dispatch(Body&& body, const Planes& planes) const {
        return dispatch_on<kBodies>(body, [&] { return for_bodies(planes); });
    }
    template <ModBodies kBodies, typename Body, typename MakePlanes>
    __device__ __forceinline__ bool dispatch_on(Body&& body, MakePlanes&& planes) const {
        const bool bias = adds_bias(), mask = params.mask != nullptr;
        if constexpr (has_bodies(kBodies, ModBodies::kPerModifier)) {
            if (!bias && !mask) {  // softcap alone, ALiBi alone: no ALiBi term, no plane test
                if (cap != T(0) && slope == T(0)) {
                    body(scores<true, false, kNoPlanes>(planes()));
                    return true;
                }
                if (cap == T(0) && slope != T(0)) {  // (raw units: the fast kernels' shortcut)
                    body(scores<false, true, kNoPlanes, kFast && has_bodies(kBodies, ModBodies::kRawAlibi)>(planes()));
                    return true;
                }
            }
        }
        if (cap != T(0)) {
            body(scores<true, true, kAnyPlanes>(planes()));
            return true;
        }
        if (!modifies()) return false;
        if (!has_bodies(kBodies, ModBodies::kPerPlaneSet) || slope != T(0)) body(scores<false, true, kAnyPlanes>(planes()));
        else if (bias && mask) body(scores<false, false, kBothPlanes>(planes()));
        else if (bias) body(scores<false, false, kBiasPlane>(planes()));
        else body(scores<false, false, kMaskPlane>(planes()));
        return true;
    }

    template <bool kCapped, bool kAlibi, int kPlanes, bool kRaw = false, typename Planes>
    __device__ __forceinline__ RowScores<T, kTanh, kCapped, kAlibi, kPlanes, kRaw, Planes> scores(const Planes& planes) const {
        return {*this, planes, origin(0, 0)};
    }

    // The modified score of raw s at (query i, key j) in the exponent's units (kRaw: in s's,
    // RowScores::raw_units), and grad = dx / d(scale * s) (1 without softcap); kAlibi: ALiBi's
    // term (distance's kFromOrigin); kPlanes: the bias and mask planes read (dispatch).
    template <bool kCapped, bool kAlibi, int kPlanes, bool kRaw, bool kFromOrigin, typename Planes>
    __device__ __forceinline__ T apply(T s, int i, int j, T& grad, const Planes& planes, const PairOrigin<T>& origin) const {
        T x;
        grad = T(1);
        if constexpr (kRaw) {
            return fma(-raw_slope, fabs(distance<kFromOrigin>(i, j, origin)), s);
        }
        if constexpr (kCapped) {
            const Tanh<T, kTanh> th(s * mul);
            x = th.times(cap);
            grad = th.one_minus_t2();
        } else {
            x = s * mul;
        }
        if constexpr (kAlibi) x = fma(-slope, fabs(distance<kFromOrigin>(i, j, origin)), x);
        if constexpr (kPlanes != kNoPlanes) x = bias_and_mask<kPlanes>(x, i, j, planes);
        return x;
    }

    // This row's bias and mask planes in global memory, as the bodies read them (for_bodies).
    __device__ __forceinline__ GlobalPlanes<T> planes() const { return for_bodies(row_planes(params, row)); }

    // Planes (global or a staged tile's) as the bodies read them: without the bias where the
    // kernel put it in S (bias_in_scores), so that no body adds it twice.
    template <typename Planes>
    __device__ __forceinline__ Planes for_bodies(Planes planes) const {
        if (bias_in_scores) planes.bias_at = nullptr;
        return planes;
    }

    // Row bh's bias and mask planes in global memory (FwdParams::score_rows).
    static __device__ __forceinline__ GlobalPlanes<T> row_planes(const FwdParams& p, int bh) {
        const T* bias = p.bias != nullptr ? static_cast<const T*>(p.bias) + p.score_rows[2 * bh] : nullptr;
        const unsigned char* mask = p.mask != nullptr ? p.mask + p.score_rows[2 * bh + 1] : nullptr;
        return {bias, mask};
    }

    // x plus the bias at (i, j), or -inf where the mask hides (i, j), of the planes kPlanes names
    // (kAnyPlanes: those the row has); global planes are not read outside Lq x Lk. (Addition
    // commutes: the bias after ALiBi's term is the reference's bias before it.)
    template <int kPlanes, typename Planes>
    __device__ __forceinline__ T bias_and_mask(T x, int i, int j, const Planes& planes) const {
        const FwdParams& p = params;
        const bool bias = kPlanes == kAnyPlanes ? planes.bias_at != nullptr : kPlanes == kBiasPlane || kPlanes == kBothPlanes;
        const bool mask = kPlanes == kAnyPlanes ? planes.mask_at != nullptr : kPlanes == kMaskPlane || kPlanes == kBothPlanes;
        if ((bias || mask) && (Planes::kZeroFilled || (i < p.seqlen_q && j < p.seqlen_k))) {
            if (bias) x = fma(planes.bias(i, j, p), unit, x);
            if (mask && !planes.visible(i, j, p)) x = -static_cast<T>(__int_as_float(0x7f800000));
        }
        return x;
    }

    // ALiBi's i + diag - j: from the origin the caller gave (kFromOrigin, RowScores::from), else
    // as the difference of the converted i + diag and j, shared by a fragment's rows and columns.
    // The same value (exact integers); the choice is the kernel's register budget's (bwd_dq_tc at
    // d64 spills with an origin on sm_86/89, without one on sm_80 unless the conversions are
    // shared as here).
    template <bool kFromOrigin>
    __device__ __forceinline__ T distance(int i, int j, const PairOrigin<T>& origin) const {
        if constexpr (kFromOrigin) return origin.distance(i, j);
        return static_cast<T>(i + diag) - static_cast<T>(j);
    }

    // The origin of a fragment's pairs whose first pair is (i0, j0) (RowScores::from).
    __device__ __forceinline__ PairOrigin<T> origin(int i0, int j0) const {
        return {i0, j0, static_cast<T>(i0 + diag - j0)};
    }

    // Row bh's sink in the exponent's units (the softmax's starting logit), or -inf: none.
    static __device__ __forceinline__ T sink(const FwdParams& p, int bh, T unit) {
        return p.sinks != nullptr ? static_cast<const T*>(p.sinks)[bh] * unit : -static_cast<T>(__int_as_float(0x7f800000));
    }
};

// What ScoreMod::dispatch hands its body: one row's modifiers, the combination fixed, with the
// row's bias and mask planes at hand. score(s, i, j, grad): the modified score of raw s at
// (query i, key j) and grad = dx / d(scale * s).
template <typename T, int kTanh, bool kCapped, bool kAlibi, int kPlanes, bool kRaw, typename Planes, bool kFromOrigin>
struct RowScores {
    static constexpr bool capped = kCapped;
    // Whether the row may have a bias (and so a bias gradient) or a mask: the bodies of softcap
    // or ALiBi alone have none (ModBodies::kPerModifier).
    static constexpr bool has_planes = kPlanes != kNoPlanes;
    // Whether the score comes back in the raw units of s (ALiBi alone, ModBodies::kRawAlibi: the
    // scale stays the softmax's multiplier, as for a plain score) or the exponent's.
    static constexpr bool raw_units = kRaw;
    static_assert(!kRaw || (kTanh != kLibraryTanh && kAlibi && !kCapped && kPlanes == kNoPlanes), "raw units are ALiBi's alone");
    const ScoreMod<T, kTanh>& mod;
    Planes planes;  // where the row's bias and mask are read (GlobalPlanes or StagedPlanes)
    PairOrigin<T> origin;  // (kFromOrigin: set by from())

    // These scores, to be asked for pairs near (i0, j0): a fragment's first pair (PairOrigin).
    __device__ __forceinline__ RowScores<T, kTanh, kCapped, kAlibi, kPlanes, kRaw, Planes, true> from(int i0, int j0) const {
        return {mod, planes, mod.origin(i0, j0)};
    }

    __device__ __forceinline__ T operator()(T s, int i, int j, T& grad) const {
        return mod.template apply<kCapped, kAlibi, kPlanes, raw_units, kFromOrigin>(s, i, j, grad, planes, origin);
    }

    // The softmax's multiplier of the scores operator() returns (the exponent is x times it).
    __device__ __forceinline__ T multiplier() const { return raw_units ? mod.mul : T(1); }

    // The exponent x * multiplier() - lse of a score x that operator() returned (one FFMA or FADD).
    __device__ __forceinline__ T exponent(T x, T lse) const { return raw_units ? fma(x, mod.mul, -lse) : x - lse; }
};

// Whether a kernel with score modifiers stages its bias and mask tiles in shared memory
// (ScorePlaneStage), by head-dim bucket: the smallest, where a score has the fewest MMAs to
// hide its bias and mask reads behind (triangle attention, Swin: D = 32) and the K/V stages are
// small beside the planes'. Wider heads keep their shared memory (tiles, blocks per SM) for K
// and V and read the planes from global memory. tiles.py mirrors it.
template <bool kScoreMods, int kHeadDim>
constexpr bool stages_score_planes() {
    return kScoreMods && kHeadDim <= 32;
}

// A kRows x kCols tile of a row's bias (T) and mask (bytes) planes per pipeline stage, copied by
// a block's threads with 16-byte cp.async in the commit group of the K/V (or Q/dO) tile of the
// same scores. The host lays the planes out for it (plan.py's _plane_layout): the key axis
// contiguous, the plane, its query stride and every row's offset in 16-byte units; a broadcast
// query axis (stride 0) reads one row for all. Elements outside Lq x Lk are zero-filled, never
// read. Row pitches: bias kCols * sizeof(T) + 32 bytes, so that the 8 rows x 4 column pairs of
// an m16n8 fragment's read hit distinct banks per phase (8-byte reads of float, 16-byte of
// double); mask kCols + 16 bytes (8 rows of 2-byte reads in distinct words).
template <typename T, int kRows, int kCols>
struct ScorePlaneStage {
    static constexpr int kBiasPitch = kCols * static_cast<int>(sizeof(T)) + 32;
    static constexpr int kMaskPitch = kCols + 16;
    static constexpr unsigned kBiasBytes = kRows * kBiasPitch;
    static constexpr unsigned kBytes = kBiasBytes + kRows * kMaskPitch;
    static_assert((kCols * sizeof(T)) % 16 == 0 && kCols % 16 == 0, "whole 16-byte chunks per row");

    using Staged = StagedPlanes<T, kBiasPitch / static_cast<int>(sizeof(T)), kMaskPitch>;

    // What the host promised of row planes `global`: 16-byte aligned rows with a contiguous key
    // axis (or one key).
    static __device__ __forceinline__ bool aligned(const GlobalPlanes<T>& global, const FwdParams& p) {
        return aligned_plane(global.bias_at, p.bias_row_stride, p.bias_col_stride, p) &&
               aligned_plane(global.mask_at, p.mask_row_stride, p.mask_col_stride, p);
    }

    // The tile at (row0, col0) of row planes `global` into the stage at shared address `smem`, by
    // thread `tid` of kThreads (asynchronous: the caller commits, waits and synchronises).
    template <int kThreads>
    static __device__ __forceinline__ void load(unsigned smem, const GlobalPlanes<T>& global, const FwdParams& p, int row0,
                                                int col0, int tid) {
        if (global.bias_at != nullptr) load_plane<kThreads, kBiasPitch>(smem, global.bias_at, p.bias_row_stride, p, row0, col0, tid);
        if (global.mask_at != nullptr)
            load_plane<kThreads, kMaskPitch>(smem + kBiasBytes, global.mask_at, p.mask_row_stride, p, row0, col0, tid);
    }

    // The stage at generic address `stage` (derived from the kernel's shared array) as the
    // planes of its tile at (row0, col0); the planes the call lacks stay null.
    static __device__ __forceinline__ Staged planes(const unsigned char* stage, const FwdParams& p, int row0, int col0) {
        return {p.bias != nullptr ? reinterpret_cast<const T*>(stage) : nullptr, p.mask != nullptr ? stage + kBiasBytes : nullptr,
                row0, col0};
    }

  private:
    template <typename V>
    static __device__ __forceinline__ bool aligned_plane(const V* at, int row_stride, int col_stride, const FwdParams& p) {
        if (at == nullptr) return true;
        const bool rows = p.seqlen_q <= 1 || (static_cast<long long>(row_stride) * sizeof(V)) % 16 == 0;
        return (reinterpret_cast<unsigned long long>(at) & 15ull) == 0 && rows && (p.seqlen_k <= 1 || col_stride == 1);
    }

    template <int kThreads, int kPitch, typename V>
    static __device__ __forceinline__ void load_plane(unsigned smem, const V* at, int row_stride, const FwdParams& p, int row0,
                                                      int col0, int tid) {
        constexpr int kItem = static_cast<int>(sizeof(V));
        constexpr int kChunks = kCols * kItem / 16;  // per row
        const long long row_bytes = static_cast<long long>(row_stride) * kItem;
        const unsigned char* tile = reinterpret_cast<const unsigned char*>(at) + row0 * row_bytes + col0 * kItem;
        const int rows_left = p.seqlen_q - row0, valid_bytes = (p.seqlen_k - col0) * kItem;
        // Each thread keeps one chunk column and walks rows kRowStep apart with one pointer (as
        // tc::TileLoader): its column's bounds once, a row test and an add per chunk.
        static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0, "whole rows per pass");
        constexpr int kRowStep = kThreads / kChunks;
        const int chunk = tid % kChunks, row_first = tid / kChunks;
        const int valid_cols = min(max(valid_bytes - chunk * 16, 0), 16);
        const unsigned char* src = tile + row_first * row_bytes + chunk * 16;
#pragma unroll
        for (int i = 0; i < kRows / kRowStep; ++i) {
            const int row = row_first + i * kRowStep;
            const int valid = row < rows_left ? valid_cols : 0;
            // A chunk with nothing to read points at the tile's first element: any valid address.
            ptx::cp_async_16(smem + row * kPitch + chunk * 16, valid > 0 ? src : tile, valid);
            src += kRowStep * row_bytes;
        }
    }
};

// A pipeline stage's share of a Variant's shared memory for its bias and mask tiles of kRows x
// kCols scores: ScorePlaneStage's where the Variant stages them (kStaged: stages_score_planes,
// or a kernel's narrower rule), else none.
template <bool kStaged, int kRows, int kCols>
constexpr unsigned plane_stage_bytes() {
    return kStaged ? ScorePlaneStage<float, kRows, kCols>::kBytes : 0u;
}
template <bool kScoreMods, int kHeadDim, int kRows, int kCols>
constexpr unsigned staged_plane_bytes() {
    return plane_stage_bytes<stages_score_planes<kScoreMods, kHeadDim>(), kRows, kCols>();
}

// The bias's gradient (BwdParams::dbias): the dK/dV kernels store dS = P o (dP - delta) (of
// the score after softcap, before its factor: the bias is added after the cap) of every pair
// of row bh that a block visits, 0 where hidden, into a contiguous (rows, Lq, Lk) buffer in
// the accumulation type, which the host sums over bias's broadcast axes afterwards, in a fixed
// order: reproducible, no atomics. Without a window or a key-padding cut the blocks visit every
// pair; otherwise the host zeroes the buffer first (the pairs outside the tile ranges stay 0).
// Outside deterministic mode a bias plane shared by several rows (BwdParams::dbias_planes)
// takes the rows' dS by atomic adds instead: a buffer of the bias's size, not of every score,
// and no summing pass; the order of the adds, and so the last bits, vary from run to run.
// kAdds: the kernel compiles that path (tiles.py's KernelSpec.adds_dbias says where it does).
template <typename T, bool kAdds = true>
struct BiasGrad {
    const BwdParams& params;  // (a reference, never a pointer: that would copy the params to local memory)
    int row;                  // the attention row bh, or the bias plane it reads (dbias_planes)

    __device__ __forceinline__ BiasGrad(const BwdParams& p, int bh) : params(p), row(target(p, bh)) {}

    __device__ __forceinline__ void head(int bh) { row = target(params, bh); }  // a dK/dV block's next head

    __device__ __forceinline__ bool wanted() const { return params.dbias != nullptr; }

    // dS of pair (i, j); `hidden`: the positional mask hides it (the kernel's P may not be 0 yet): 0.
    __device__ __forceinline__ void store(int i, int j, T ds, bool hidden = false) const {
        const FwdParams& f = params.fwd;
        if (i < f.seqlen_q && j < f.seqlen_k) {
            T* at = entry(i, j);
            const T value = hidden ? T(0) : ds;
            if (adds(params))
                atomicAdd(at, value);
            else
                *at = value;
        }
    }

    // dS of pairs (i, j) and (i, j + 1), j even (an mma accumulator's two columns; T = float):
    // one 8-byte store or vector add where both keys exist and Lk is even (the pair is then
    // 8-byte aligned: the buffer starts on 256 bytes), else element by element.
    __device__ __forceinline__ void store_pair(int i, int j, float ds0, float ds1) const {
        const FwdParams& f = params.fwd;
        if (i >= f.seqlen_q || j >= f.seqlen_k) return;
        if (j + 1 < f.seqlen_k && f.seqlen_k % 2 == 0) {
            float* at = entry(i, j);
            if (adds(params))
                ptx::red_add_v2_f32(at, ds0, ds1);
            else
                *reinterpret_cast<float2*>(at) = make_float2(ds0, ds1);
        } else {
            store(i, j, ds0);
            store(i, j + 1, ds1);
        }
    }

  private:
    // Whether dS is added into a shared plane's sums (BwdParams::dbias_planes), not stored.
    static __device__ __forceinline__ bool adds(const BwdParams& p) { return kAdds && p.dbias_planes != nullptr; }

    static __device__ __forceinline__ int target(const BwdParams& p, int bh) { return adds(p) ? p.dbias_planes[bh] : bh; }

    // Pair (i, j)'s entry of this row's (or plane's) Lq x Lk scores in the buffer.
    __device__ __forceinline__ T* entry(int i, int j) const {
        const FwdParams& f = params.fwd;
        return static_cast<T*>(params.dbias) + (static_cast<long long>(row) * f.seqlen_q + i) * f.seqlen_k + j;
    }
};

// BiasGrad where several warps compute the same dS (bwd_dkdv_dmma's column slices): only the
// `owner` stores it.
template <typename T>
struct BiasGradIf : BiasGrad<T> {
    bool owner;

    __device__ __forceinline__ BiasGradIf(const BwdParams& p, int bh, bool owns) : BiasGrad<T>(p, bh), owner(owns) {}

    __device__ __forceinline__ bool wanted() const { return owner && BiasGrad<T>::wanted(); }
};

// No bias gradient (the dQ kernels' share of modified_p_ds).
struct NoBiasGrad {
    __device__ __forceinline__ bool wanted() const { return false; }
    template <typename T>
    __device__ __forceinline__ void store(int, int, T, bool = false) const {}
};

}  // namespace cuflash
