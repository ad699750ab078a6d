"""The GPU forward against the float64 dense reference: every dtype, head dim, length pair and
mask, GQA/MQA, broadcast leading axes, (B, L, H, D) views, guard regions, determinism, streams.

Run on a GPU machine with ``python -m pytest tests -q -m gpu``; skipped cleanly without one.
"""
from __future__ import annotations

import logging

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

from reference import attention_magnitudes, attention_ref, attention_ref_dtype
from tolerance import assert_close

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

import cuflash  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
HEAD_DIMS = [1, 3, 32, 59, 64, 80, 96, 111, 128, 160, 192, 256]
LENGTHS = [(1, 239), (97, 97), (113, 203), (203, 113), (128, 217), (1025, 1024), (2048, 2048)]
CAUSAL = [False, True, "top_left"]


def _inputs(rng, dtype, q_shape, k_shape, v_shape, magnitude=1.0):
    """Fresh random inputs (never zeros) on the GPU, and their float64 host copies."""
    host = [rng.standard_normal(s) * magnitude for s in (q_shape, k_shape, v_shape)]
    dev = [cupy.asarray(x.astype(numpy.dtype(dtype))) for x in host]
    exact = [cupy.asnumpy(x).astype(numpy.float64) for x in dev]  # what the kernel really sees
    return dev, exact


def _check(dtype, dev, exact, **options):
    """Run cuflash into a poisoned, guarded buffer; compare with the references."""
    q, k, v = dev
    ref_out, ref_lse = attention_ref(*exact, **options)
    # A poisoned buffer with a guard region before and after the output.
    guard = 257
    size = ref_out.size
    buf = cupy.full(size + 2 * guard, numpy.nan, dtype=numpy.dtype(dtype))
    out = buf[guard : guard + size].reshape(ref_out.shape)
    result, lse = cuflash.attention(q, k, v, out=out, return_lse=True, **options)
    assert result is out
    host_buf = cupy.asnumpy(buf).astype(numpy.float64)
    assert numpy.isnan(host_buf[:guard]).all() and numpy.isnan(host_buf[guard + size :]).all(), \
        "the kernel wrote outside its output"
    actual = cupy.asnumpy(out).astype(numpy.float64)
    baseline = None
    if dtype in ("float16", "bfloat16"):
        baseline = attention_ref_dtype(*exact, dtype=numpy.dtype(dtype), **options)[0]
    # Softmax turns a relative score error into an absolute one of that size times |score|.
    magnitude = attention_magnitudes(*exact, **options)
    assert_close(actual, ref_out, dtype=numpy.dtype(dtype), baseline=baseline, magnitude=magnitude, kind="out", name="out")
    lse_host = cupy.asnumpy(lse)
    assert lse.dtype == (numpy.float64 if dtype == "float64" else numpy.float32)
    assert_close(lse_host.astype(numpy.float64), ref_lse, dtype=lse_host.dtype, kind="lse", name="lse")


# The long pairs run at the main head dims; every head dim meets every odd pair.
SHAPES = [
    (d, lengths)
    for d in HEAD_DIMS
    for lengths in LENGTHS
    if lengths[0] * lengths[1] < 1024 * 1024 or d in (1, 64, 111, 128, 256)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,lengths", SHAPES, ids=lambda x: f"{x[0]}x{x[1]}" if isinstance(x, tuple) else f"d{x}")
@pytest.mark.parametrize("causal", CAUSAL, ids=str)
def test_shapes(rng, dtype, head_dim, lengths, causal):
    lq, lk = lengths
    dev, exact = _inputs(rng, dtype, (1, 2, lq, head_dim), (1, 2, lk, head_dim), (1, 2, lk, head_dim))
    _check(dtype, dev, exact, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(64, 32), (59, 111), (128, 256), (256, 1), (3, 64)], ids=str)
def test_head_dim_v_differs(rng, dtype, dims):
    d, dv = dims
    dev, exact = _inputs(rng, dtype, (2, 3, 130, d), (2, 3, 201, d), (2, 3, 201, dv))
    _check(dtype, dev, exact, causal=True)


WINDOWS = [(0, 0), (16, 0), (0, 16), (33, 47), (128, -1), (-1, 5), (200, 200)]


# (window, causal) pairs; a positive right side with causal is refused (tests/test_validation.py).
WINDOW_MASKS = [(w, c) for w in WINDOWS for c in (False, True, "top_left") if c is False or w[1] <= 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,causal", WINDOW_MASKS, ids=str)
@pytest.mark.parametrize("lengths", [(97, 97), (113, 203), (203, 113), (300, 20)], ids=str)
def test_windows(rng, dtype, window, lengths, causal):
    lq, lk = lengths
    dev, exact = _inputs(rng, dtype, (2, lq, 64), (2, lk, 64), (2, lk, 64))
    _check(dtype, dev, exact, window=window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 8, 150, 64), (2, 2, 150, 64)),        # GQA, groups of 4
        ((2, 6, 150, 128), (2, 1, 150, 128)),      # MQA
        ((3, 1, 4, 77, 32), (1, 5, 4, 99, 32)),    # broadcast leading axes both ways
        ((77, 96), (4, 3, 99, 96)),                # 2-D q against batched keys
        ((2, 1, 8, 1, 64), (2, 3, 4, 130, 64)),    # broadcast + GQA + single query
    ],
    ids=["gqa", "mqa", "broadcast", "2d-q", "broadcast-gqa"],
)
def test_heads_and_broadcasting(rng, dtype, shapes):
    qs, ks = shapes
    dev, exact = _inputs(rng, dtype, qs, ks, ks)
    _check(dtype, dev, exact, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bshd_views_run_without_copies(rng, dtype):
    b, l, h, d = 2, 333, 4, 64
    dev, _ = _inputs(rng, dtype, (b, l, h, d), (b, l, h, d), (b, l, h, d))
    views = [x.transpose(0, 2, 1, 3) for x in dev]
    exact = [cupy.asnumpy(x).astype(numpy.float64) for x in views]
    _check(dtype, views, exact, causal=True)
    # The same numbers through contiguous copies: bitwise identical.
    a = cuflash.attention(*views, causal=True)
    c = cuflash.attention(*[cupy.ascontiguousarray(x) for x in views], causal=True)
    assert cupy.array_equal(a.view(cupy.uint8), c.view(cupy.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_strides_and_offsets(rng, dtype):
    """Row strides that are not a whole number of vectors, a misaligned base, negative strides."""
    big = cupy.asarray(rng.standard_normal((3, 211, 131)).astype(numpy.dtype(dtype)))
    q = big[:, :97, 1:60]            # odd row stride, base offset by one element
    k = big[:, 100:211, 3:62]
    v = big[::-1, 50:161, 5:20]      # negative batch stride
    exact = [cupy.asnumpy(x).astype(numpy.float64) for x in (q, k, v)]
    _check(dtype, [q, k, v], exact)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_see_no_key(rng, dtype):
    dev, exact = _inputs(rng, dtype, (2, 300, 64), (2, 100, 64), (2, 100, 64))
    out, lse = cuflash.attention(*dev, causal=True, return_lse=True)
    out, lse = cupy.asnumpy(out).astype(numpy.float64), cupy.asnumpy(lse)
    assert (out[:, :200] == 0).all() and numpy.isneginf(lse[:, :200]).all()
    assert numpy.isfinite(out).all() and numpy.isfinite(lse[:, 200:]).all()
    _check(dtype, dev, exact, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_inputs(rng, dtype):
    dev, exact = _inputs(rng, dtype, (2, 2, 129, 64), (2, 2, 257, 64), (2, 2, 257, 64), magnitude=5.0)
    _check(dtype, dev, exact, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_runs_are_bitwise_identical(rng, dtype):
    dev, _ = _inputs(rng, dtype, (2, 4, 517, 128), (2, 4, 517, 128), (2, 4, 517, 128))
    first = cuflash.attention(*dev, causal=True)
    for _ in range(100):
        again = cuflash.attention(*dev, causal=True)
        assert cupy.array_equal(first.view(cupy.uint8), again.view(cupy.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_non_default_stream(rng, dtype):
    dev, exact = _inputs(rng, dtype, (4, 8, 1024, 64), (4, 8, 1024, 64), (4, 8, 1024, 64))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = cuflash.attention(*dev, causal=True)
        snapshot = out.copy()  # ordered after the kernel on the same stream
    stream.synchronize()
    ref, _ = attention_ref(*exact, causal=True)
    baseline = attention_ref_dtype(*exact, dtype=numpy.dtype(dtype), causal=True)[0] if dtype == "bfloat16" else None
    assert_close(cupy.asnumpy(snapshot).astype(numpy.float64), ref, dtype=numpy.dtype(dtype), baseline=baseline, kind="out")


def test_zero_size_axes():
    for shape_q, shape_k in [((2, 0, 64), (2, 5, 64)), ((0, 3, 64), (0, 5, 64)), ((2, 3, 64), (2, 0, 64))]:
        q = cupy.ones(shape_q, dtype=cupy.float16)
        k = cupy.ones(shape_k, dtype=cupy.float16)
        out, lse = cuflash.attention(q, k, k, return_lse=True)
        assert out.shape == shape_q[:-1] + (64,) and lse.shape == shape_q[:-1]
        if shape_k[-2] == 0 and out.size:
            assert (out == 0).all() and cupy.isneginf(lse).all()


def test_first_use_logs_compilation(caplog, rng):
    from cuflash._gpu import plan

    plan.forget()
    q = cupy.asarray(rng.standard_normal((1, 33, 32)).astype(numpy.float32))
    with caplog.at_level(logging.INFO, logger="cuflash"):
        cuflash.attention(q, q, q)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "compiling" in messages and "cached" in messages
