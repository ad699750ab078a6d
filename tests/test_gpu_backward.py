"""The GPU backward against the float64 analytic gradient: every dtype, head dim, length pair and
mask, GQA/MQA and broadcasting (gradients summed back to each input's shape), strided inputs and
dout, rows that see no key, large inputs, and bitwise determinism with ``deterministic=True``.

Run on a GPU machine with ``python -m pytest tests -q -m gpu``; skipped cleanly without one.
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

from reference import attention_backward_magnitudes, attention_backward_ref, attention_backward_ref_dtype
from tolerance import assert_close

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

import cuflash  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
HEAD_DIMS = [1, 3, 32, 59, 64, 80, 96, 111, 128, 160, 192, 256]
LENGTHS = [(1, 239), (97, 97), (113, 203), (203, 113), (128, 217), (1025, 1024), (2048, 2048)]


def _draw(rng, dtype, *shapes, magnitude=1.0):
    """Fresh random CuPy arrays (never zeros)."""
    return [cupy.asarray((rng.standard_normal(s) * magnitude).astype(numpy.dtype(dtype))) for s in shapes]


def _host(x):
    return cupy.asnumpy(x).astype(numpy.float64)


def check_backward(rng, dtype, q, k, v, *, deterministic=False, dout=None, large_scores=False, **options):
    """Forward on the GPU, backward from a random dout; hold (dq, dk, dv) to the reference."""
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    if dout is None:
        dout = cupy.asarray(rng.standard_normal(out.shape).astype(numpy.dtype(dtype)))
    inputs = [q, k, v, out, lse, dout]
    before = [cupy.asnumpy(x).tobytes() for x in inputs]
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
    assert [cupy.asnumpy(x).tobytes() for x in inputs] == before, "an input was modified"

    exact = [_host(x) for x in (dout, q, k, v)]
    references = attention_backward_ref(*exact, **options)
    magnitudes = attention_backward_magnitudes(*exact, large_scores=large_scores, **options)
    baselines = (None,) * 3
    if dtype in ("float16", "bfloat16"):
        baselines = attention_backward_ref_dtype(*exact, numpy.dtype(dtype), **options)
    for name, grad, x, reference, magnitude, baseline in zip("qkv", grads, (q, k, v), references, magnitudes, baselines):
        assert isinstance(grad, cupy.ndarray), f"d{name} is not a CuPy array"
        assert grad.shape == x.shape and grad.dtype == x.dtype, f"d{name}: {grad.shape} {grad.dtype}"
        assert_close(_host(grad), reference, dtype=numpy.dtype(dtype), baseline=baseline, magnitude=magnitude,
                     kind="grad", name=f"d{name}")
    return grads


SHAPES = [
    (d, lengths)
    for d in HEAD_DIMS
    for lengths in LENGTHS
    if lengths[0] * lengths[1] < 1024 * 1024 or d in (1, 64, 128, 256)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,lengths", SHAPES, ids=lambda x: f"{x[0]}x{x[1]}" if isinstance(x, tuple) else f"d{x}")
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
def test_backward_shapes(rng, dtype, head_dim, lengths, causal):
    lq, lk = lengths
    q, k, v = _draw(rng, dtype, (1, 2, lq, head_dim), (1, 2, lk, head_dim), (1, 2, lk, head_dim))
    check_backward(rng, dtype, q, k, v, causal=causal, deterministic=bool(head_dim % 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(64, 32), (59, 111), (128, 256), (256, 1), (3, 64)], ids=str)
def test_backward_head_dim_v_differs(rng, dtype, dims):
    d, dv = dims
    q, k, v = _draw(rng, dtype, (2, 3, 130, d), (2, 3, 201, d), (2, 3, 201, dv))
    check_backward(rng, dtype, q, k, v, causal=True)


# (window, causal) pairs; a positive right side with causal is refused (tests/test_validation.py).
BACKWARD_WINDOW_MASKS = [(w, c) for w in [(0, 0), (16, 0), (33, 47), (128, -1), (-1, 5)]
                         for c in (False, True, "top_left") if c is False or w[1] <= 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,causal", BACKWARD_WINDOW_MASKS, ids=str)
@pytest.mark.parametrize("lengths", [(97, 97), (113, 203), (203, 113)], ids=str)
def test_backward_windows(rng, dtype, window, lengths, causal):
    lq, lk = lengths
    q, k, v = _draw(rng, dtype, (2, lq, 64), (2, lk, 64), (2, lk, 64))
    check_backward(rng, dtype, q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 8, 150, 64), (2, 2, 150, 64)),        # GQA: dk, dv summed over groups of 4
        ((2, 6, 150, 128), (2, 1, 150, 128)),      # MQA
        ((3, 1, 4, 77, 32), (1, 5, 4, 99, 32)),    # broadcast leading axes both ways
        ((77, 96), (4, 3, 99, 96)),                # 2-D q: dq summed over 12 heads
        ((2, 1, 8, 1, 64), (2, 3, 4, 130, 64)),    # broadcast + GQA + a single query
    ],
    ids=["gqa", "mqa", "broadcast", "2d-q", "broadcast-gqa"],
)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_heads_and_broadcasting(rng, dtype, shapes, deterministic):
    qs, ks = shapes
    q, k, v = _draw(rng, dtype, qs, ks, ks)
    check_backward(rng, dtype, q, k, v, causal=True, deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_strided_inputs_and_dout(rng, dtype):
    b, l, h, d = 2, 333, 4, 64
    q, k, v, dout = (x.transpose(0, 2, 1, 3) for x in _draw(rng, dtype, *[(b, l, h, d)] * 4))
    check_backward(rng, dtype, q, k, v, dout=dout, causal=True)
    big = _draw(rng, dtype, (3, 211, 131))[0]
    q, k, v = big[:, :97, 1:60], big[:, 100:211, 3:62], big[::-1, 50:161, 5:20]
    check_backward(rng, dtype, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_rows_that_see_no_key(rng, dtype):
    q, k, v = _draw(rng, dtype, (2, 300, 64), (2, 100, 64), (2, 100, 64))
    dq, dk, dv = check_backward(rng, dtype, q, k, v, causal=True)
    dq = _host(dq)
    assert (dq[:, :200] == 0).all() and numpy.isfinite(dq).all()
    assert numpy.isfinite(_host(dk)).all() and numpy.isfinite(_host(dv)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 5, 17, 128])
def test_backward_large_magnitude_inputs(rng, dtype, length):
    q, k, v = _draw(rng, dtype, (2, 2, length, 64), (2, 2, length, 64), (2, 2, length, 64), magnitude=5.0)
    check_backward(rng, dtype, q, k, v, causal=True, large_scores=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_deterministic_is_bitwise_reproducible(rng, dtype):
    q, k, v, dout = _draw(rng, dtype, (2, 4, 517, 128), (2, 2, 517, 128), (2, 2, 517, 128), (2, 4, 517, 128))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for _ in range(50):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_backward_non_default_stream(rng, dtype):
    q, k, v = _draw(rng, dtype, (2, 4, 700, 64), (2, 4, 700, 64), (2, 4, 700, 64))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        check_backward(rng, dtype, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_attention_vjp_matches_the_explicit_backward(rng, dtype):
    q, k, v, dout = _draw(rng, dtype, (2, 4, 150, 64), (2, 2, 190, 64), (2, 2, 190, 64), (2, 4, 150, 64))
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, deterministic=True)
    expected_out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert cupy.array_equal(out.view(cupy.uint8), expected_out.view(cupy.uint8))
    expected = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for got, want in zip(vjp(dout), expected):
        assert cupy.array_equal(got.view(cupy.uint8), want.view(cupy.uint8))
