"""Argument validation and problem resolution (cuflash._spec), through the public functions.

Every misuse raises TypeError or ValueError with a message naming the argument, and raises
before anything the caller owns is touched: each call gets an out= filled with a sentinel that
must survive, and the inputs must come back unchanged. The second half checks what a valid call
resolves to: the mask's three ints, GQA grouping, shapes, dtypes, default scale.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import ml_dtypes
import numpy
import pytest

import cuflash
from cuflash import _spec
from reference import visible_mask

SENTINEL = 7.0


def base_arrays(rng, dtype=numpy.float32):
    """Valid q (2,3,10,8), k (2,3,12,8), v (2,3,12,6); out is (2,3,10,6)."""
    return (
        rng.standard_normal((2, 3, 10, 8)).astype(dtype),
        rng.standard_normal((2, 3, 12, 8)).astype(dtype),
        rng.standard_normal((2, 3, 12, 6)).astype(dtype),
    )


def snapshot(x):
    return x.copy() if isinstance(x, numpy.ndarray) else x


def assert_rejected(error, match, q, k, v, out=None, **options):
    """attention(q, k, v, out=out, **options) raises ``error`` matching ``match``, touching nothing."""
    if out is None:
        out = numpy.full((2, 3, 10, 6), SENTINEL, numpy.float32)
    before = [snapshot(x) for x in (q, k, v, out)]
    with pytest.raises(error, match=match):
        cuflash.attention(q, k, v, out=out, **options)
    for name, old, new in zip(("q", "k", "v", "out"), before, (q, k, v, out)):
        if isinstance(new, numpy.ndarray):
            assert old.tobytes() == new.tobytes(), f"{name} was modified"  # bit for bit, NaN included


class ForeignDlpack:
    """A DLPack object on some device, delegating the data to a NumPy array."""

    def __init__(self, array, device_type):
        self._array, self._device_type = array, device_type

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (self._device_type, 0)


# Each case: (id, replacement for q/k/v/option as a function of the valid (q, k, v), error, match).
ARRAY_CASES = [
    ("q-list", dict(q=lambda q, k, v: q.tolist()), TypeError, r"q must be a numpy\.ndarray, a cupy\.ndarray or a DLPack"),
    ("k-float", dict(k=lambda q, k, v: 3.0), TypeError, r"k must be a numpy\.ndarray"),
    ("v-numpy-scalar", dict(v=lambda q, k, v: numpy.float32(1)), TypeError, r"v must be a numpy\.ndarray"),
    ("q-None", dict(q=lambda q, k, v: None), TypeError, r"q must be a numpy\.ndarray"),
    ("q-opencl-dlpack", dict(q=lambda q, k, v: ForeignDlpack(q, 4)), TypeError, r"q lives on DLPack device type 4"),
    ("q-int32", dict(q=lambda q, k, v: q.astype(numpy.int32)), TypeError, r"q must have dtype float16, bfloat16, float32 or float64, got int32"),
    ("k-bool", dict(k=lambda q, k, v: k > 0), TypeError, r"k must have dtype .* got bool"),
    ("v-complex", dict(v=lambda q, k, v: v.astype(numpy.complex64)), TypeError, r"v must have dtype .* got complex64"),
    ("q-object", dict(q=lambda q, k, v: q.astype(object)), TypeError, r"q must have dtype .* got object"),
    ("k-float64", dict(k=lambda q, k, v: k.astype(numpy.float64)), TypeError, r"q, k and v must share one dtype"),
    ("v-bfloat16", dict(v=lambda q, k, v: v.astype(ml_dtypes.bfloat16)), TypeError, r"share one dtype.*v bfloat16"),
    ("q-1d", dict(q=lambda q, k, v: q.ravel()), ValueError, r"q must have at least 2 dimensions"),
    ("k-1d", dict(k=lambda q, k, v: k[0, 0, 0]), ValueError, r"k must have at least 2 dimensions"),
    ("v-0d", dict(v=lambda q, k, v: v[0, 0, 0, 0, ...]), ValueError, r"v must have at least 2 dimensions"),
    ("k-head-dim", dict(k=lambda q, k, v: k[..., :5]), ValueError, r"k's last axis \(head dim D\) must equal q's"),
    ("v-seqlen", dict(v=lambda q, k, v: v[..., :11, :]), ValueError, r"k and v must have the same number of keys"),
    ("q-batch", dict(q=lambda q, k, v: numpy.concatenate([q, q])), ValueError, r"leading axes of q .* do not broadcast"),
    ("k-v-batch", dict(v=lambda q, k, v: numpy.concatenate([v, v, v])[:3]), ValueError, r"leading axes of k \(2, 3\) and v \(3, 3\) do not broadcast"),
    ("heads-not-multiple", dict(k=lambda q, k, v: k[:, :2], v=lambda q, k, v: v[:, :2]), ValueError, r"GQA"),
    ("more-kv-heads", dict(q=lambda q, k, v: q[:, :1].repeat(2, axis=1), k=lambda q, k, v: k.repeat(2, axis=1)[:, :4], v=lambda q, k, v: v.repeat(2, axis=1)[:, :4]), ValueError, r"GQA"),
    ("D-too-wide", dict(q=lambda q, k, v: numpy.ones((2, 3, 10, 257), numpy.float32), k=lambda q, k, v: numpy.ones((2, 3, 12, 257), numpy.float32)), ValueError, r"D is 257; at most 256"),
    ("Dv-too-wide", dict(v=lambda q, k, v: numpy.ones((2, 3, 12, 300), numpy.float32)), ValueError, r"Dv is 300; at most 256"),
]


@pytest.mark.parametrize("replace, error, match", [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES])
def test_bad_arrays(rng, replace, error, match):
    q, k, v = base_arrays(rng)
    arrays = dict(q=q, k=k, v=v)
    arrays = {name: replace[name](q, k, v) if name in replace else array for name, array in arrays.items()}
    assert_rejected(error, match, **arrays)


OPTION_CASES = [
    ("scale-bool", dict(scale=True), TypeError, r"scale must be a real number"),
    ("scale-numpy-bool", dict(scale=numpy.bool_(True)), TypeError, r"scale must be a real number"),
    ("scale-array", dict(scale=numpy.array(0.5)), TypeError, r"scale must be a real number"),
    ("scale-str", dict(scale="0.5"), TypeError, r"scale must be a real number"),
    ("scale-complex", dict(scale=1j), TypeError, r"scale must be a real number"),
    ("scale-nan", dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("scale-inf", dict(scale=float("inf")), ValueError, r"scale must be finite"),
    ("scale-minus-inf", dict(scale=-numpy.inf), ValueError, r"scale must be finite"),
    ("scale-float32-inf", dict(scale=numpy.float32("inf")), ValueError, r"scale must be finite"),
    ("scale-huge-int", dict(scale=10**400), ValueError, r"scale must be finite"),
    # float32 scores (float16/bfloat16/float32 inputs): the kernels' scale * log2(e) must be a float32
    ("scale-beyond-float32", dict(scale=3e38), ValueError, r"scale must be finite in float32"),
    ("scale-beyond-float32-negative", dict(scale=-2.4e38), ValueError, r"scale must be finite in float32"),
    # a float32 scale whose scores overflow with these q, k (|q_i| |k_j| ~ 8): NumPy inputs are checked
    ("scale-overflows-the-scores", dict(scale=1e38), ValueError, r"scale 1e\+38 .* overflow the float32 scores"),
    ("sinks-plus-inf", dict(sinks=numpy.array([0.0, numpy.inf, 0.0], numpy.float32)), ValueError,
     r"sinks must be finite or -inf"),
    ("causal-str", dict(causal="yes"), ValueError, r"causal must be False, True, 'bottom_right' or 'top_left'"),
    ("causal-upper", dict(causal="TOP_LEFT"), ValueError, r"causal must be"),
    ("causal-int", dict(causal=1), TypeError, r"causal must be a bool"),
    ("causal-None", dict(causal=None), TypeError, r"causal must be a bool"),
    ("window-short", dict(window=(1,)), ValueError, r"window must have exactly two entries"),
    ("window-long", dict(window=(1, 2, 3)), ValueError, r"window must have exactly two entries"),
    ("window-left-below", dict(window=(-2, 0)), ValueError, r"window left must be >= -1"),
    ("window-right-below", dict(window=(0, -5)), ValueError, r"window right must be >= -1"),
    ("window-float", dict(window=(1.5, 2)), TypeError, r"window left must be an int"),
    ("window-str-entry", dict(window=(1, "2")), TypeError, r"window right must be an int"),
    ("window-bool-entry", dict(window=(True, 1)), TypeError, r"window left must be an int"),
    ("window-0d-float", dict(window=(numpy.array(1.0), 1)), TypeError, r"window left must be an int.*, got ndarray of dtype float64"),
    ("window-0d-bool", dict(window=(1, numpy.array(True))), TypeError, r"window right must be an int"),
    ("window-1d-entry", dict(window=(numpy.array([1]), 1)), TypeError, r"window left must be an int"),
    ("window-int", dict(window=5), TypeError, r"window must be None or a \(left, right\) tuple"),
    ("window-str", dict(window="ab"), TypeError, r"window must be None or a \(left, right\) tuple"),
    ("window-array", dict(window=numpy.array([1, 2])), TypeError, r"window must be None or a \(left, right\) tuple"),
    ("window-set", dict(window={1, 2}), TypeError, r"window must be None or a \(left, right\) tuple"),
    ("return_lse-int", dict(return_lse=1), TypeError, r"return_lse must be a bool"),
    ("return_lse-None", dict(return_lse=None), TypeError, r"return_lse must be a bool"),
]


@pytest.mark.parametrize("options, error, match", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_options(rng, options, error, match):
    assert_rejected(error, match, *base_arrays(rng), **options)


def _as_writeable_broadcast(shape):
    base = numpy.full(shape[-1:], SENTINEL, numpy.float32)
    return numpy.lib.stride_tricks.as_strided(base, shape=shape, strides=(0,) * (len(shape) - 1) + (4,))


OUT_CASES = [
    ("list", lambda q, k, v: numpy.full((2, 3, 10, 6), SENTINEL).tolist(), TypeError, r"out must be a numpy\.ndarray like q"),
    ("dlpack", lambda q, k, v: ForeignDlpack(numpy.full((2, 3, 10, 6), SENTINEL, numpy.float32), 1), TypeError, r"out must be a numpy\.ndarray"),
    ("dtype", lambda q, k, v: numpy.full((2, 3, 10, 6), SENTINEL, numpy.float64), TypeError, r"out must have q's dtype float32, got float64"),
    ("shape", lambda q, k, v: numpy.full((2, 3, 10, 8), SENTINEL, numpy.float32), ValueError, r"out must have shape \(2, 3, 10, 6\)"),
    ("shape-missing-axis", lambda q, k, v: numpy.full((3, 10, 6), SENTINEL, numpy.float32), ValueError, r"out must have shape"),
    ("read-only", lambda q, k, v: numpy.broadcast_to(numpy.float32(SENTINEL), (2, 3, 10, 6)), ValueError, r"out must be writeable"),
    ("self-overlapping", lambda q, k, v: _as_writeable_broadcast((2, 3, 10, 6)), ValueError, r"out must not have overlapping elements"),
]


@pytest.mark.parametrize("make_out, error, match", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_bad_out(rng, make_out, error, match):
    q, k, v = base_arrays(rng)
    assert_rejected(error, match, q, k, v, out=make_out(q, k, v))


@pytest.mark.parametrize("victim", ["q", "k", "v"])
@pytest.mark.parametrize("how", ["same-array", "partial-view"])
def test_out_must_not_share_memory_with_an_input(rng, victim, how):
    # Every array (2, 3, 10, 8) so that out could alias any of them.
    q, k, v = (rng.standard_normal((2, 3, 10, 8)).astype(numpy.float32) for _ in range(3))
    arrays = dict(q=q, k=k, v=v)
    if how == "same-array":
        out = arrays[victim]
    else:  # a buffer whose second half is the input and whose middle is out
        buffer = rng.standard_normal((2 * 480,)).astype(numpy.float32)
        arrays[victim] = buffer[480:].reshape(2, 3, 10, 8)
        out = buffer[240:720].reshape(2, 3, 10, 8)
    snapshot_inputs = {name: a.copy() for name, a in arrays.items()}
    with pytest.raises(ValueError, match=f"out must not share memory with {victim}"):
        cuflash.attention(arrays["q"], arrays["k"], arrays["v"], out=out)
    for name, array in arrays.items():
        assert numpy.array_equal(array, snapshot_inputs[name]), f"{name} was modified"


@pytest.mark.parametrize("victim", ["alibi_slopes", "sinks"])
def test_out_must_not_share_memory_with_a_per_head_array(rng, victim):
    """The same rule as for q, k and v: out= must not overlap alibi_slopes or sinks either."""
    q, k, v = base_arrays(rng)
    out = numpy.full((2, 3, 10, 6), SENTINEL, numpy.float32)
    per_head = out[0, :, 0, 0]  # (3,), inside out
    before = out.copy()
    with pytest.raises(ValueError, match=f"out must not share memory with {victim}"):
        cuflash.attention(q, k, v, out=out, **{victim: per_head})
    assert out.tobytes() == before.tobytes()
    # a disjoint per-head array is fine
    cuflash.attention(q, k, v, out=out, **{victim: per_head.copy()})


def test_out_interleaved_with_an_input_but_disjoint_is_accepted(rng):
    buffer = rng.standard_normal((2, 3, 10, 16)).astype(numpy.float32)
    q, out = buffer[..., :8], buffer[..., 8:]
    k, v = (rng.standard_normal((2, 3, 12, 8)).astype(numpy.float32) for _ in range(2))
    q_before = q.copy()
    assert cuflash.attention(q, k, v, out=out) is out
    assert numpy.array_equal(q, q_before)
    numpy.testing.assert_allclose(out, cuflash.attention(q_before, k, v), rtol=0, atol=0)


# --- backward ---------------------------------------------------------------------------------


def backward_arrays(rng):
    q, k, v = base_arrays(rng)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(numpy.float32)
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)


BACKWARD_CASES = [
    ("dout-shape", dict(dout=lambda a: a["dout"][..., :5]), ValueError, r"dout must have the forward output's shape \(2, 3, 10, 6\)"),
    ("dout-dtype", dict(dout=lambda a: a["dout"].astype(numpy.float64)), TypeError, r"dout must have q's dtype float32"),
    ("dout-list", dict(dout=lambda a: a["dout"].tolist()), TypeError, r"dout must be a numpy\.ndarray"),
    ("out-shape", dict(out=lambda a: a["out"][:1]), ValueError, r"out must have the forward output's shape"),
    ("out-dtype", dict(out=lambda a: a["out"].astype(numpy.float16)), TypeError, r"out must have q's dtype float32"),
    ("lse-dtype", dict(lse=lambda a: a["lse"].astype(numpy.float64)), TypeError, r"lse must have dtype float32"),
    ("lse-shape", dict(lse=lambda a: a["lse"][..., None]), ValueError, r"lse must have shape \(2, 3, 10\)"),
    ("lse-int", dict(lse=lambda a: a["lse"].astype(numpy.int32)), TypeError, r"lse must have dtype float32"),
    ("q-int", dict(q=lambda a: a["q"].astype(numpy.int8)), TypeError, r"q must have dtype"),
    ("k-head-dim", dict(k=lambda a: a["k"][..., :3]), ValueError, r"k's last axis"),
]


@pytest.mark.parametrize("replace, error, match", [c[1:] for c in BACKWARD_CASES], ids=[c[0] for c in BACKWARD_CASES])
def test_bad_backward_arguments(rng, replace, error, match):
    arrays = backward_arrays(rng)
    arrays.update({name: make(arrays) for name, make in replace.items()})
    before = {name: snapshot(a) for name, a in arrays.items()}
    with pytest.raises(error, match=match):
        cuflash.attention_backward(**arrays)
    for name, array in arrays.items():
        if isinstance(array, numpy.ndarray):
            assert before[name].tobytes() == array.tobytes(), f"{name} was modified"


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(deterministic=1), TypeError, r"deterministic must be a bool"),
        (dict(deterministic="yes"), TypeError, r"deterministic must be a bool"),
        (dict(scale=float("nan")), ValueError, r"scale must be finite"),
        (dict(scale=1e39), ValueError, r"scale must be finite in float32"),
        (dict(scale=1e38), ValueError, r"overflow the float32 scores"),
        (dict(sinks=numpy.full(3, numpy.inf, numpy.float32)), ValueError, r"sinks must be finite or -inf"),
        (dict(causal="diagonal"), ValueError, r"causal must be"),
        (dict(window=(0, -3)), ValueError, r"window right must be >= -1"),
    ],
    ids=["deterministic-int", "deterministic-str", "scale", "scale-float32", "scale-scores", "sinks-plus-inf",
         "causal", "window"],
)
def test_bad_backward_options(rng, options, error, match):
    with pytest.raises(error, match=match):
        cuflash.attention_backward(**backward_arrays(rng), **options)


# --- what a valid call resolves to ------------------------------------------------------------


@pytest.mark.parametrize(
    "causal, window, seqlen_q, seqlen_k, expected",
    [
        (False, None, 5, 7, (-1, -1, 2, False)),
        (True, None, 5, 7, (-1, 0, 2, True)),
        ("bottom_right", None, 7, 5, (-1, 0, -2, True)),
        ("top_left", None, 5, 7, (-1, 0, 0, True)),
        (numpy.bool_(True), None, 4, 4, (-1, 0, 0, True)),
        (False, (3, 4), 5, 7, (3, 4, 2, True)),
        (False, [2, 0], 5, 7, (2, 0, 2, True)),
        (True, (3, -1), 5, 7, (3, 0, 2, True)),
        ("top_left", (3, -1), 5, 7, (3, 0, 0, True)),
        (False, (-1, -1), 5, 7, (-1, -1, 2, False)),
        (False, (numpy.int64(3), numpy.int32(-1)), 5, 7, (3, -1, 2, True)),
        (False, (numpy.array(3), numpy.array(-1, numpy.int8)), 5, 7, (3, -1, 2, True)),  # 0-d arrays
        (False, (10**12, 5), 5, 7, (12, 5, 2, True)),  # wider than Lq + Lk: clamped, same mask
    ],
)
def test_mask_normalisation(causal, window, seqlen_q, seqlen_k, expected):
    q, k = numpy.ones((seqlen_q, 4), numpy.float32), numpy.ones((seqlen_k, 4), numpy.float32)
    p = _spec.resolve_forward(q, k, k, causal=causal, window=window)
    assert (p.window_left, p.window_right, p.diag_offset, p.has_window) == expected
    assert all(type(x) is int for x in (p.window_left, p.window_right, p.diag_offset))


@pytest.mark.parametrize("causal", [True, "bottom_right", "top_left", numpy.bool_(True)], ids=str)
@pytest.mark.parametrize("window", [(3, 4), (-1, 1), [0, 2], (numpy.int64(2), numpy.int32(5))], ids=str)
def test_causal_refuses_a_window_that_looks_ahead(rng, causal, window):
    """causal hides every key after the diagonal; a window reaching past it is a contradiction
    the caller should hear about, not have cut to 0 silently."""
    q = numpy.ones((5, 4), numpy.float32)
    with pytest.raises(ValueError, match=r"window right must be 0 or -1 with causal .* pass window="):
        cuflash.attention(q, q, q, causal=causal, window=window)
    for right in (0, -1):  # the two sides causal agrees with
        cuflash.attention(q, q, q, causal=causal, window=(window[0], right))


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (9, 9), (5, 13), (13, 5), (0, 4), (4, 0)])
def test_visible_agrees_with_the_reference_mask(seqlen_q, seqlen_k):
    q, k = numpy.ones((seqlen_q, 2), numpy.float32), numpy.ones((seqlen_k, 2), numpy.float32)
    windows = [None, (0, 0), (2, -1), (-1, 3), (1, 6), (20, 20), (0, -1)]
    for causal in (False, True, "bottom_right", "top_left"):
        for window in windows:
            if causal is not False and window is not None and window[1] > 0:
                continue  # refused (test_causal_refuses_a_window_that_looks_ahead)
            p = _spec.resolve_forward(q, k, k, causal=causal, window=window)
            got = p.visible(numpy.arange(seqlen_q)[:, None], numpy.arange(seqlen_k)[None, :])
            expected = visible_mask(seqlen_q, seqlen_k, causal=causal, window=window)
            assert numpy.array_equal(got, expected), (causal, window)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, lead, kv_lead, group",
    [
        ((2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 12), (2, 8), (2, 2), 4),
        ((2, 4, 5, 16), (2, 1, 7, 16), (2, 1, 7, 12), (2, 4), (2, 4), 1),
        ((6, 5, 16), (1, 7, 16), (2, 7, 12), (6,), (2,), 3),
        ((2, 1, 4, 5, 16), (1, 3, 4, 7, 16), (3, 4, 7, 12), (2, 3, 4), (2, 3, 4), 1),
        ((5, 16), (7, 16), (7, 12), (), (), 1),
        ((0, 5, 16), (0, 7, 16), (0, 7, 12), (0,), (0,), 1),
    ],
    ids=["gqa", "mqa", "gqa-via-v", "broadcast", "2d", "zero-heads"],
)
def test_problem_fields(q_shape, k_shape, v_shape, lead, kv_lead, group):
    q, k, v = (numpy.ones(s, ml_dtypes.bfloat16) for s in (q_shape, k_shape, v_shape))
    p = _spec.resolve_forward(q, k, v, return_lse=True)
    assert p.xp is numpy and p.q is q and p.k is k and p.v is v and p.out is None and p.return_lse
    assert p.dtype == numpy.dtype(ml_dtypes.bfloat16) and p.lse_dtype == numpy.float32
    assert (p.lead_shape, p.kv_lead_shape, p.kv_group) == (lead, kv_lead, group)
    assert (p.seqlen_q, p.seqlen_k, p.head_dim, p.head_dim_v) == (5, 7, 16, 12)
    assert p.out_shape == lead + (5, 12) and p.lse_shape == lead + (5,)
    assert p.scale == 0.25 and type(p.scale) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.scale = 1.0


@pytest.mark.parametrize(
    "scale, head_dim, expected",
    [(None, 64, 0.125), (None, 0, 1.0), (3, 8, 3.0), (numpy.float32(0.5), 8, 0.5), (-2.0, 8, -2.0), (numpy.int64(2), 8, 2.0)],
)
def test_scale_resolution(scale, head_dim, expected):
    q = numpy.ones((3, head_dim), numpy.float64)
    p = _spec.resolve_forward(q, q, q, scale=scale)
    assert p.scale == expected and type(p.scale) is float
    assert p.lse_dtype == numpy.float64


def test_backward_problem_carries_the_forward_results(rng):
    arrays = backward_arrays(rng)
    p = _spec.resolve_backward(**arrays, causal=True, deterministic=True)
    assert p.dout is arrays["dout"] and p.o is arrays["out"] and p.lse is arrays["lse"]
    assert p.deterministic is True and p.out is None and p.window_right == 0


def test_cpu_path_never_imports_cupy():
    code = (
        "import sys, numpy, cuflash\n"
        "x = numpy.ones((2, 4, 8), numpy.float32)\n"
        "cuflash.attention(x, x, x, causal=True)\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env_with_repo_on_path())


def _env_with_repo_on_path():
    import os
    import pathlib

    env = dict(os.environ)
    repo = str(pathlib.Path(cuflash.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env


class OperatorHijackingArray(numpy.ndarray):
    """An ndarray subclass whose arithmetic is not NumPy's (as numpy.matrix's * is not)."""

    def __matmul__(self, other):
        raise AssertionError("the subclass's operator was used")

    __rmatmul__ = __mul__ = __rmul__ = __matmul__


def test_ndarray_subclasses_compute_as_plain_arrays(rng):
    q, k, v = (rng.standard_normal((2, 6, 4)) for _ in range(3))
    expected = cuflash.attention(q, k, v, causal=True)
    hijacked = [x.view(OperatorHijackingArray) for x in (q, k, v)]
    result = cuflash.attention(*hijacked, causal=True)
    assert type(result) is numpy.ndarray and numpy.array_equal(result, expected)


@pytest.mark.parametrize("shape,strides,order", [
    ((2, 4, 97, 64), (97 * 4 * 64, 64, 4 * 64, 1), (0, 2, 1, 3)),     # (B, L, H, D) seen as (B, H, L, D)
    ((2, 4, 97, 64), (4 * 97 * 64, 97 * 64, 64, 1), None),             # C order itself
    ((1, 4, 97, 64), (7, 64, 4 * 64, 1), (0, 2, 1, 3)),                # a batch of one: its stride is free
    ((2, 1, 97, 64), (97 * 64, 5, 64, 1), None),                       # one head: C order after all
    ((2, 4, 97, 64), (97 * 4 * 96, 96, 4 * 96, 1), None),              # rows of 96 (a slice of D)
    ((2, 4, 97, 64), (0, 64, 4 * 64, 1), None),                        # a broadcast batch axis
    ((4, 97, 64), (64, 4 * 64, 2), None),                              # last axis not contiguous
    ((4, 97, 1), (1, 4, 1), (1, 0, 2)),                                # D = 1
])
def test_memory_order_names_whole_transposed_buffers_only(shape, strides, order):
    assert cuflash._spec.memory_order(shape, strides) == order


@pytest.mark.parametrize("shape,order", [
    ((2, 4, 97, 64), (0, 2, 1, 3)), ((2, 4, 97, 64), None), ((4, 97, 1), (1, 0, 2)), ((3, 1, 5), (1, 0, 2)),
    ((5,), None), ((), None),
])
def test_strides_in_order_lay_out_what_empty_in_order_does(shape, order):
    """strides_in_order (the torch adapter's empty_strided) against NumPy's strides of
    empty_in_order's buffer, in elements."""
    array = cuflash._spec.empty_in_order(numpy.empty, shape, numpy.float32, order)
    assert cuflash._spec.strides_in_order(shape, order) == tuple(s // 4 for s in array.strides)


def test_plan_keys_tell_the_modifier_arrays_apart():
    """A plan's key (``_api.plan_key_parts``, the CuPy API's and the torch adapter's) holds the
    bias, mask, ALiBi slopes and sinks that are given, and says which each one is: calls that
    differ only in which modifier an array of the same signature feeds never share a plan."""
    from cuflash import _api

    a, b = numpy.zeros(4, numpy.float32), numpy.ones((2, 4), numpy.float32)
    options = (None, False, None, None, None)
    keys = {
        "plain": _api.plan_key_parts(None, None, options),
        "bias": _api.plan_key_parts(a, None, options),
        "slopes": _api.plan_key_parts(None, None, options, per_row=(a, None)),
        "sinks": _api.plan_key_parts(None, None, options, per_row=(None, a)),
        "both": _api.plan_key_parts(None, None, options, per_row=(b, a)),
        "bias and sinks": _api.plan_key_parts(a, None, options, per_row=(None, a)),
    }
    assert keys["plain"][0] == () and keys["both"][0][0] is b and keys["both"][0][1] is a
    for name in ("bias", "slopes", "sinks"):
        assert len(keys[name][0]) == 1 and keys[name][0][0] is a
    assert len({options for _, options in keys.values()}) == len(keys), "two modifier sets share a key"
    assert _api.plan_key_parts(None, None, (None, 1, None, None, None), per_row=(a, None)) is None  # causal=1
