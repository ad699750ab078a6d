"""cuflash.attention_backward on NumPy arrays against the dense float64 analytic gradient.

The reference gradient itself is first checked against central finite differences of the
reference forward, on small problems covering masks, rows that see no key, GQA and broadcasting.
Then the CPU backend's FlashAttention-2 backward is held to it in every dtype, with gradients
summed back onto broadcast and GQA-shared inputs, zero-size axes, and strided inputs.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy
import pytest

import cuflash
from reference import (
    attention_backward_magnitudes,
    attention_backward_ref,
    attention_backward_ref_dtype,
    attention_ref,
    visible_mask,
)
from tolerance import assert_close

DTYPES = [numpy.float16, ml_dtypes.bfloat16, numpy.float32, numpy.float64]
DTYPE_IDS = ["fp16", "bf16", "fp32", "fp64"]


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, options",
    [
        ((2, 5, 4), (2, 6, 4), (2, 6, 3), dict()),
        ((2, 7, 4), (2, 4, 4), (2, 4, 5), dict(causal=True)),  # rows 0-2 see no key
        ((1, 4, 6, 3), (1, 2, 6, 3), (1, 2, 6, 2), dict(causal="top_left", window=(2, 0))),  # GQA
        ((2, 1, 5, 3), (1, 3, 6, 3), (3, 6, 4), dict(window=(1, 2))),  # broadcasting
        ((3, 5, 3), (1, 5, 3), (3, 5, 2), dict(scale=0.7)),  # k shared by all heads, v not
        ((4, 5, 3), (5, 3), (2, 5, 2), dict(causal=True)),  # k a matrix, v's 2 heads GQA-shared
    ],
    ids=["full", "causal-blind-rows", "gqa-window", "broadcast", "mqa-k-only", "gqa-k-2d"],
)
def test_reference_gradient_matches_finite_differences(rng, q_shape, k_shape, v_shape, options):
    q, k, v = (rng.standard_normal(s) for s in (q_shape, k_shape, v_shape))
    out, _ = attention_ref(q, k, v, **options)
    dout = rng.standard_normal(out.shape)
    analytic = attention_backward_ref(dout, q, k, v, **options)

    def loss(q, k, v):
        return float((attention_ref(q, k, v, **options)[0] * dout).sum())

    step = 1e-6
    for index, (name, array) in enumerate(zip("qkv", (q, k, v))):
        numeric = numpy.zeros_like(array)
        for position in numpy.ndindex(array.shape):
            arrays = [q, k, v]
            plus, minus = array.copy(), array.copy()
            plus[position] += step
            minus[position] -= step
            arrays[index] = plus
            f_plus = loss(*arrays)
            arrays[index] = minus
            numeric[position] = (f_plus - loss(*arrays)) / (2 * step)
        assert analytic[index].shape == array.shape
        numpy.testing.assert_allclose(analytic[index], numeric, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


def check_backward(rng, q, k, v, **options):
    """Forward, then backward from a random dout; hold (dq, dk, dv) to the reference."""
    dtype = numpy.dtype(q.dtype)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    arrays = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    originals = {name: a.copy() for name, a in arrays.items()}

    with numpy.errstate(divide="raise", over="raise", invalid="raise"):
        grads = cuflash.attention_backward(**arrays, **options)
        again = cuflash.attention_backward(**arrays, **options, deterministic=True)

    references = attention_backward_ref(dout, q, k, v, **options)
    magnitudes = attention_backward_magnitudes(dout, q, k, v, **options)
    baselines = (None,) * 3 if dtype == numpy.float64 else attention_backward_ref_dtype(dout, q, k, v, dtype, **options)
    for name, grad, repeat, x, reference, magnitude, baseline in zip("qkv", grads, again, (q, k, v), references, magnitudes, baselines):
        assert isinstance(grad, numpy.ndarray) and grad.shape == x.shape and grad.dtype == dtype, f"d{name}"
        assert_close(grad, reference, dtype=dtype, baseline=baseline, magnitude=magnitude, kind="grad", name=f"d{name}")
        assert grad.tobytes() == repeat.tobytes(), f"d{name} differs between two runs"
    for name, array in arrays.items():
        assert array.tobytes() == originals[name].tobytes(), f"{name} was modified"
    return grads


SEQLENS = [(1, 1), (97, 97), (200, 97), (97, 200), (1, 200)]
HEAD_DIMS = [(1, 1), (3, 7), (59, 59), (111, 64), (256, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=["full", "causal", "top_left"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS, ids=[f"Lq{a}-Lk{b}" for a, b in SEQLENS])
def test_matches_reference(rng, randn, seqlen_q, seqlen_k, causal, dtype):
    for head_dim, head_dim_v in HEAD_DIMS:
        q = randn(2, seqlen_q, head_dim, dtype=dtype)
        k = randn(2, seqlen_k, head_dim, dtype=dtype)
        v = randn(2, seqlen_k, head_dim_v, dtype=dtype)
        check_backward(rng, q, k, v, causal=causal)


# (window, causal) pairs; a positive right side with causal is refused (tests/test_validation.py).
WINDOW_MASKS = [(w, c) for w in [(0, 0), (5, -1), (-1, 9), (40, 3), (130, 130)]
                for c in (False, True, "top_left") if c is False or w[1] <= 0]


@pytest.mark.parametrize("window,causal", WINDOW_MASKS, ids=str)
def test_windows(rng, randn, window, causal):
    for seqlen_q, seqlen_k in [(150, 150), (180, 70), (70, 180)]:
        q, k, v = randn(2, seqlen_q, 24), randn(2, seqlen_k, 24), randn(2, seqlen_k, 16)
        check_backward(rng, q, k, v, causal=causal, window=window)


def test_long_sequence(rng, randn):
    q, k, v = (randn(1, 2, 1025, 128) for _ in range(3))
    check_backward(rng, q, k, v, causal=True)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 8), (2, 2), (2, 2)),  # GQA: each kv head sums 4 query heads
        ((2, 4), (2, 1), (2, 1)),  # MQA
        ((6,), (1,), (2,)),  # k shared by all, v grouped by 3
        ((2, 6), (), (2, 3)),  # k a plain matrix, v grouped by 2
        ((2, 1, 4), (1, 3, 4), (3, 4)),  # broadcast leading axes both ways
        ((), (2, 3), (2, 3)),  # one query matrix against many heads: dq sums over all of them
    ],
    ids=["gqa", "mqa", "gqa-via-v", "gqa-k-2d", "broadcast", "q-2d"],
)
@pytest.mark.parametrize("dtype", [numpy.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_gradients_sum_over_shared_inputs(rng, randn, q_shape, k_shape, v_shape, dtype):
    q = randn(*q_shape, 60, 32, dtype=dtype)
    k = randn(*k_shape, 75, 32, dtype=dtype)
    v = randn(*v_shape, 75, 20, dtype=dtype)
    check_backward(rng, q, k, v, causal=True)
    check_backward(rng, q, k, v, window=(10, 20))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_that_see_no_key_get_no_gradient(rng, randn, dtype):
    q, k, v = randn(2, 150, 32, dtype=dtype), randn(2, 60, 32, dtype=dtype), randn(2, 60, 16, dtype=dtype)
    dq, _, _ = check_backward(rng, q, k, v, causal=True)
    blind = ~visible_mask(150, 60, causal=True).any(axis=1)
    assert blind.sum() == 90
    assert numpy.all(numpy.asarray(dq, numpy.float64)[:, blind] == 0)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 0, 16), (2, 30, 16), (2, 30, 8)),
        ((2, 30, 16), (2, 0, 16), (2, 0, 8)),
        ((0, 4, 30, 16), (0, 4, 30, 16), (0, 4, 30, 8)),
        ((2, 30, 0), (2, 40, 0), (2, 40, 8)),
        ((2, 30, 16), (2, 40, 16), (2, 40, 0)),
    ],
    ids=["Lq0", "Lk0", "batch0", "D0", "Dv0"],
)
def test_zero_size_axes(rng, randn, q_shape, k_shape, v_shape):
    q, k, v = randn(*q_shape), randn(*k_shape), randn(*v_shape)
    dq, dk, dv = check_backward(rng, q, k, v, causal=True)
    if q_shape[-2] == 0:
        assert not dk.any() and not dv.any()
    if k_shape[-2] == 0:
        assert not dq.any()


def test_strided_inputs(rng, randn):
    q = randn(2, 90, 3, 40).transpose(0, 2, 1, 3)
    k = randn(2, 110, 3, 40).transpose(0, 2, 1, 3)[..., ::-1, :]
    v = randn(2, 110, 3, 64).transpose(0, 2, 1, 3)[..., ::2]
    check_backward(rng, q, k, v, causal=True, window=(50, 0))


def test_every_mask_and_layout_in_every_dtype(rng, randn):
    """A broad sweep at small sizes: masks x dtypes x GQA/broadcast layouts."""
    layouts = [((2, 4), (2, 2)), ((1, 3), (2, 1)), ((3,), (3,))]
    masks = [dict(), dict(causal=True), dict(causal="top_left", window=(4, 0)), dict(window=(7, -1))]
    for (q_lead, kv_lead), options, dtype in itertools.product(layouts, masks, DTYPES):
        q = randn(*q_lead, 33, 20, dtype=dtype)
        k = randn(*kv_lead, 47, 20, dtype=dtype)
        v = randn(*kv_lead, 47, 12, dtype=dtype)
        check_backward(rng, q, k, v, **options)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["fp32", "fp64"])
def test_attention_vjp_matches_the_explicit_backward(rng, randn, dtype):
    q, k, v = randn(2, 3, 57, 40, dtype=dtype), randn(2, 1, 83, 40, dtype=dtype), randn(2, 1, 83, 24, dtype=dtype)
    options = dict(causal=True, window=(30, -1))
    out, vjp = cuflash.attention_vjp(q, k, v, **options)
    expected_out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    assert out.tobytes() == expected_out.tobytes()
    for _ in range(2):  # callable again, with a fresh cotangent
        dout = randn(*out.shape, dtype=dtype)
        grads = vjp(dout)
        expected = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
        for got, want, x in zip(grads, expected, (q, k, v)):
            assert got.shape == x.shape and got.tobytes() == want.tobytes()
        references = attention_backward_ref(dout, q, k, v, **options)
        magnitudes = attention_backward_magnitudes(dout, q, k, v, **options)
        for got, ref, mag in zip(grads, references, magnitudes):
            assert_close(got, ref, dtype=dtype, magnitude=mag, kind="grad")


# --- the backward's two passes on threads --------------------------------------------------------

TWO_PASS_CASES = {
    # name: (q shape, k shape, keyword arguments); "bias" takes the one pass (its dbias's order).
    # With more threads than leading rows the passes split the pairs ("one_row_*"); otherwise each
    # box of the leading axes (_cpu._lead_boxes, fewer as the threads are fewer) takes one pass.
    "one_row_dense": ((1, 1, 1025, 59), (1, 1, 600, 59), {}),
    "one_row_window_softcap_sinks": ((1, 1, 700, 16), (1, 1, 700, 16), {"window": (97, 3), "softcap": 5.0, "sinks": "sinks"}),
    "dense": ((2, 3, 1025, 59), (2, 3, 200, 59), {}),
    "causal_gqa_broadcast_k": ((2, 4, 700, 32), (1, 2, 700, 32), {"causal": True}),
    "window_softcap_sinks": ((2, 2, 513, 16), (2, 2, 513, 16), {"window": (97, 3), "softcap": 5.0, "sinks": "sinks"}),
    "mask_alibi": ((2, 2, 300, 8), (2, 2, 397, 8), {"mask": "mask", "alibi_slopes": "slopes"}),
    "bias": ((2, 2, 300, 8), (2, 2, 397, 8), {"bias": "bias"}),
}


@pytest.mark.parametrize("case", TWO_PASS_CASES)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_two_passes_on_threads_give_the_one_pass_result_bit_for_bit(case, dtype, randn, monkeypatch):
    """With enough threads the backward runs dK/dV per key tile, then dQ per query block, on
    threads; every gradient (dsinks too) is the one pass's bit for bit, whatever the count."""
    from cuflash import _cpu

    q_shape, k_shape, options = TWO_PASS_CASES[case]
    q = randn(*q_shape).astype(dtype)
    k, v = randn(*k_shape).astype(dtype), randn(*k_shape).astype(dtype)
    extra = {"sinks": randn(q_shape[1]).astype(dtype), "bias": randn(1, q_shape[1], q_shape[2], k_shape[2]).astype(dtype),
             "mask": randn(q_shape[0], 1, q_shape[2], k_shape[2]) > -1.0, "slopes": numpy.abs(randn(q_shape[1])).astype(dtype)}
    options = {name: extra[value] if isinstance(value, str) else value for name, value in options.items()}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dout = randn(*out.shape).astype(dtype)
    monkeypatch.setattr(_cpu, "TWO_PASS_THREADS", 2)
    key_tiles = []
    real_key_tile = _cpu._BoxBackward.key_tile
    monkeypatch.setattr(_cpu._BoxBackward, "key_tile", lambda box, keys: key_tiles.append(keys) or real_key_tile(box, keys))
    results = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("CUFLASH_CPU_THREADS", threads)
        results.append(cuflash.attention_backward(dout, q, k, v, out, lse, **options))
    assert bool(key_tiles) == case.startswith("one_row"), "the two passes run where the leading rows are too few"
    for grads in results[1:]:
        assert len(grads) == len(results[0])
        assert all(numpy.array_equal(mine, one) for mine, one in zip(grads, results[0]))


# bias shapes against q (2, 4, 97, 16), k (2, 2, 130, 16): broadcast along the batch, the heads, the
# queries, nothing; a GQA-split head axis
# (its GQA-grouped leading axes (2, 2, 2): the group axis is never cut), and the boxes each call takes
DBIAS_BOX_BIASES = {"over_batch": ((1, 4, 97, 130), 2), "over_heads": ((2, 1, 97, 130), 2),
                    "over_queries": ((2, 4, 1, 130), 4), "full": ((2, 4, 97, 130), 4), "shared": ((97, 130), 1)}


@pytest.mark.parametrize("bias_shape, boxes_per_call", DBIAS_BOX_BIASES.values(), ids=DBIAS_BOX_BIASES)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_dbias_over_boxes_of_the_leading_axes_on_threads(bias_shape, boxes_per_call, dtype, randn, monkeypatch):
    """With boxes of one leading row where bias allows (_cpu._lead_boxes keeps the axes bias
    broadcasts along whole, so no two boxes add into one region of dbias), the boxes' one passes
    run on threads: every gradient, dbias included, is the same bit for bit for any thread count,
    and equals the call with one box up to the order of dbias's sums."""
    from cuflash import _cpu

    q, dout = randn(2, 4, 97, 16).astype(dtype), randn(2, 4, 97, 16).astype(dtype)
    k, v = randn(2, 2, 130, 16).astype(dtype), randn(2, 2, 130, 16).astype(dtype)
    bias = randn(*bias_shape).astype(dtype)
    out, lse = cuflash.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    whole = cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, causal=True)
    monkeypatch.setattr(_cpu, "TILE_BYTES", 1)  # boxes of one leading row where bias allows
    boxes = []
    real_one_pass = _cpu._BoxBackward.one_pass
    monkeypatch.setattr(_cpu._BoxBackward, "one_pass", lambda box, dbias: boxes.append(box.box.shape) or real_one_pass(box, dbias))
    results = []
    for threads in ("1", "4"):
        monkeypatch.setenv("CUFLASH_CPU_THREADS", threads)
        results.append(cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, causal=True))
    assert len(boxes) == 2 * boxes_per_call, "a box per leading row, but along the axes bias broadcasts along"
    for mine, one in zip(results[1], results[0]):
        assert numpy.array_equal(mine, one)
    rtol = 1e-5 if dtype == numpy.float32 else 1e-12
    for mine, want in zip(results[0], whole):
        numpy.testing.assert_allclose(mine, want, rtol=rtol, atol=rtol * numpy.abs(want).max())
