"""The one tolerance rule: how close a result must be to the float64 reference.

    max |actual - reference|  <=  factor * max |baseline - reference|  +  slack * eps(dtype) * size

- ``baseline`` is the plain unfused implementation run in the same dtype
  (``reference.attention_ref_dtype``): a fused kernel must be within ``factor`` (2 for outputs,
  3 for gradients, which chain more rounding) of the error a straightforward implementation in
  that precision makes. Required for float16/bfloat16, whose rounding dominates; optional for
  float32/float64.
- ``eps(dtype)`` is the dtype's machine epsilon (2^-10 float16, 2^-7 bfloat16, 2^-23 float32,
  2^-52 float64) and ``size`` is max |reference| (at least 1 for lse, an absolute log-scale
  quantity: a score error d shifts lse by about d however small lse itself is). Gradients pass
  ``magnitude``, the size of the terms they sum (reference.attention_backward_magnitudes): a
  gradient can cancel to 0 (one visible key gives dq = 0) while its rounding error cannot.
  Outputs may pass one too (reference.attention_magnitudes) when scores are far from unit scale:
  softmax turns a relative score error eps into an absolute one of eps * |score|.
- ``slack`` covers what a baseline cannot: the final rounding to the output dtype (float16 and
  bfloat16: 1 ulp at the largest value), and for float32/float64 a different summation order over
  D and Lk (64 ulps: about 8e-6 relative to the largest value for float32, 1.4e-14 for float64;
  the CPU backend measures under 10).

NaN never passes. Infinities (lse of rows that see no key is -inf) must match exactly, sign and
position; only finite entries are compared numerically.
"""
from __future__ import annotations

import numpy

from reference import to_numpy

FACTOR = {"out": 2.0, "lse": 2.0, "grad": 3.0}
SLACK_ULPS = {"float16": 1, "bfloat16": 1, "float32": 64, "float64": 64}
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def assert_close(actual, reference, *, dtype, baseline=None, magnitude=None, kind="out", name="result"):
    """Raise AssertionError unless ``actual`` meets the rule above for the precision ``dtype``.

    dtype: the precision the result was computed in (q's dtype for out and gradients; the lse
    dtype, float32 or float64, for lse). kind: "out", "lse" or "grad". magnitude: optional
    array of the size of the terms summed into each entry (reference.attention_magnitudes,
    reference.attention_backward_magnitudes); when given, ``size`` is its max if that is larger.
    """
    dtype_name = numpy.dtype(dtype).name
    if dtype_name not in EPS:
        raise ValueError(f"no tolerance for dtype {dtype_name}")
    if kind not in FACTOR:
        raise ValueError(f"kind must be one of {sorted(FACTOR)}, got {kind!r}")
    if dtype_name in ("float16", "bfloat16") and baseline is None:
        raise ValueError(f"{dtype_name} results need a baseline (reference.attention_ref_dtype)")

    actual = to_numpy(actual).astype(numpy.float64)
    reference = numpy.asarray(reference, dtype=numpy.float64)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape}, expected {reference.shape}"
    assert not numpy.isnan(reference).any(), f"{name}: the reference itself has NaN"
    assert not numpy.isnan(actual).any(), f"{name}: {int(numpy.isnan(actual).sum())} NaN entries"

    infinite = numpy.isinf(reference)
    mismatched = (numpy.isinf(actual) != infinite) | (infinite & (actual != reference))
    assert not mismatched.any(), (
        f"{name}: infinities differ from the reference at {int(mismatched.sum())} entries, "
        f"first at {tuple(int(i) for i in numpy.argwhere(mismatched)[0])}"
    )
    finite = ~infinite
    if not finite.any():
        return
    error = numpy.abs(actual[finite] - reference[finite]).max()
    size = numpy.abs(reference[finite]).max()
    if magnitude is not None:
        size = max(size, numpy.abs(numpy.asarray(magnitude, dtype=numpy.float64)).max())
    if kind == "lse":
        size = max(size, 1.0)
    bound = SLACK_ULPS[dtype_name] * EPS[dtype_name] * size
    baseline_error = 0.0
    if baseline is not None:
        baseline = to_numpy(baseline).astype(numpy.float64)
        baseline_error = numpy.abs(baseline[finite] - reference[finite]).max()
        bound += FACTOR[kind] * baseline_error
    assert error <= bound, (
        f"{name} ({dtype_name}, {kind}): max abs error {error:.3e} > bound {bound:.3e} "
        f"(baseline error {baseline_error:.3e}, max |reference| {size:.3e})"
    )


# The CPU backend's float32/float64 results against the float64 reference where both compute the
# same formulas (score modifiers, dropout): relative to the largest reference entry (at least 1).
CPU_RELATIVE = {"float32": 2e-5, "float64": 1e-12}


def assert_close_relative(actual, expected, dtype, name):
    """``actual`` within CPU_RELATIVE[dtype] x max(|expected|, 1) of ``expected``, infinities equal."""
    actual, expected = numpy.asarray(actual, numpy.float64), numpy.asarray(expected, numpy.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    infinite = numpy.isinf(expected)
    assert (numpy.isinf(actual) == infinite).all() and (actual[infinite] == expected[infinite]).all(), name
    finite = ~infinite
    size = max(numpy.abs(expected[finite]).max(initial=0), 1.0)
    error = numpy.abs(actual[finite] - expected[finite]).max(initial=0)
    assert error <= CPU_RELATIVE[numpy.dtype(dtype).name] * size, f"{name}: error {error:.3g} at size {size:.3g}"
