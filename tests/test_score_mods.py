"""Score modifiers on the CPU backend: softcap, ALiBi and learnable sinks, forward and backward,
against the dense float64 reference (reference.score_mods_ref), and their argument checks.

On the GPU (marked ``gpu``): every dtype against the same reference under tests/tolerance.py's
rule, odd shapes, GQA/MQA, broadcast sinks, the deterministic dsinks, and agreement with the CPU
backend.
"""
from __future__ import annotations

import numpy
import pytest

import cuflash
from reference import score_mods_ref, sink_gradient_ref
from tolerance import assert_close_relative

def _draw(rng, dtype, *shapes, magnitude=1.0):
    return [(rng.standard_normal(s) * magnitude).astype(dtype) for s in shapes]


CASES = [  # (q shape, k shape, options)
    ((2, 4, 37, 16), (2, 4, 53, 16), dict(softcap=5.0)),
    ((2, 4, 37, 16), (2, 4, 53, 16), dict(softcap=0.7, causal=True)),
    ((2, 4, 53, 8), (2, 4, 37, 8), dict(alibi="heads", causal=True)),
    ((2, 4, 29, 8), (2, 4, 29, 8), dict(alibi="batch-heads", causal="top_left")),
    ((3, 4, 31, 8), (3, 2, 40, 8), dict(sinks="heads")),                       # GQA
    ((2, 6, 31, 8), (2, 1, 40, 8), dict(sinks="broadcast", window=(4, 2))),    # MQA, broadcast sinks
    ((2, 4, 30, 8), (2, 2, 12, 8), dict(sinks="heads", causal=True)),          # rows that see no key
    ((2, 4, 33, 12), (2, 2, 47, 12), dict(softcap=3.0, alibi="heads", sinks="heads", causal=True)),
    ((4, 21, 8), (4, 25, 8), dict(softcap=2.0, alibi="heads", sinks="heads")),  # 3-D: heads are axis 0
]


def _options(rng, dtype, q_shape, options):
    """The call's keyword arguments, with ALiBi slopes and sinks drawn for the leading shape."""
    lead = q_shape[:-2]
    heads = lead[-1]
    out = {key: value for key, value in options.items() if key not in ("alibi", "sinks")}
    shapes = {"heads": (heads,), "batch-heads": lead, "broadcast": (1,) * (len(lead) - 1) + (heads,)}
    if "alibi" in options:
        out["alibi_slopes"] = (rng.uniform(0.05, 0.6, shapes[options["alibi"]])).astype(dtype)
    if "sinks" in options:
        out["sinks"] = rng.standard_normal(shapes[options["sinks"]]).astype(dtype)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}" for k in c[2]) + f"-{c[0]}x{c[1]}")
def test_forward_and_backward_match_the_reference(rng, dtype, case):
    q_shape, k_shape, options = case
    q, k, v, dout = _draw(rng, dtype, q_shape, k_shape, k_shape, q_shape)
    kwargs = _options(rng, dtype, q_shape, options)
    inputs = [x.copy() for x in (q, k, v)] + [kwargs.get("sinks"), kwargs.get("alibi_slopes")]
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kwargs)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **kwargs)
    for before, after in zip(inputs, (q, k, v, kwargs.get("sinks"), kwargs.get("alibi_slopes"))):
        assert before is None or numpy.array_equal(before, after), "an input was modified"

    ref_out, ref_lse, ref_grads = score_mods_ref(q, k, v, dout, **kwargs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_relative(out, ref_out, dtype, "out")
    assert_close_relative(lse, ref_lse, dtype, "lse")
    assert len(grads) == (4 if "sinks" in kwargs else 3)
    for name, grad, reference, x in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads,
                                        (q, k, v, kwargs.get("sinks"))):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert_close_relative(grad, reference, dtype, name)


def test_a_row_that_sees_no_key_gives_zero_and_the_sink(rng):
    q, k, v = _draw(rng, "float64", (1, 2, 6, 4), (1, 2, 3, 4), (1, 2, 3, 4))
    sinks = numpy.array([0.5, -1.5])
    out, lse = cuflash.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert (out[:, :, :3] == 0).all()  # bottom-right causal, Lq = 6 > Lk = 3: rows 0-2 see nothing
    assert (lse[0, :, :3] == sinks[:, None]).all()
    assert numpy.isfinite(lse).all()


def test_sinks_of_minus_infinity_are_no_sinks(rng):
    q, k, v = _draw(rng, "float64", (2, 3, 9, 8), (2, 3, 11, 8), (2, 3, 11, 8))
    plain = cuflash.attention(q, k, v, causal=True, return_lse=True)
    sunk = cuflash.attention(q, k, v, causal=True, return_lse=True, sinks=numpy.full(3, -numpy.inf))
    for a, b in zip(plain, sunk):
        numpy.testing.assert_array_equal(a, b)


def test_sinks_gradient_is_deterministic_and_summed_over_broadcast_axes(rng):
    q, k, v, dout = _draw(rng, "float32", (3, 4, 17, 8), (3, 4, 17, 8), (3, 4, 17, 8), (3, 4, 17, 8))
    sinks = rng.standard_normal((1, 4)).astype(numpy.float32)
    out, lse = cuflash.attention(q, k, v, sinks=sinks, return_lse=True)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, sinks=sinks, deterministic=True)
    again = cuflash.attention_backward(dout, q, k, v, out, lse, sinks=sinks, deterministic=True)
    assert first[3].shape == (1, 4) and first[3].dtype == numpy.float32
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()


def test_attention_vjp_returns_dsinks(rng):
    q, k, v, dout = _draw(rng, "float64", (2, 2, 10, 8), (2, 2, 10, 8), (2, 2, 10, 8), (2, 2, 10, 8))
    sinks = numpy.array([0.3, -0.2])
    out, vjp = cuflash.attention_vjp(q, k, v, softcap=4.0, sinks=sinks)
    expected_out, expected_lse = cuflash.attention(q, k, v, softcap=4.0, sinks=sinks, return_lse=True)
    numpy.testing.assert_array_equal(out, expected_out)
    grads = vjp(dout)
    for got, want in zip(grads, cuflash.attention_backward(dout, q, k, v, out, expected_lse, softcap=4.0, sinks=sinks)):
        numpy.testing.assert_array_equal(got, want)


BAD = [
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap must be a positive real number"),
    (dict(softcap="5"), TypeError, "softcap must be a positive real number"),
    (dict(alibi_slopes=numpy.ones(5)), ValueError, r"alibi_slopes must broadcast to the output's leading axes \(2, 4\)"),
    (dict(alibi_slopes=numpy.ones((3, 4))), ValueError, "alibi_slopes must broadcast"),
    (dict(alibi_slopes=numpy.ones(4, numpy.int32)), TypeError, "alibi_slopes must be a float array"),
    (dict(alibi_slopes=[0.1, 0.2, 0.3, 0.4]), TypeError, "alibi_slopes must be a numpy.ndarray"),
    (dict(sinks=numpy.ones((4, 1))), ValueError, "sinks must broadcast"),
    (dict(sinks=numpy.ones(4, bool)), TypeError, "sinks must be a float array"),
    (dict(sinks=numpy.ones(4, numpy.complex64)), TypeError, "sinks must be a float array"),
]


@pytest.mark.parametrize("options, error, match", BAD, ids=[f"{list(b[0])[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_modifiers_are_refused_naming_the_argument(rng, options, error, match):
    q, k, v = _draw(rng, "float32", (2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8))
    out = numpy.full((2, 4, 5, 8), 7.0, numpy.float32)
    with pytest.raises(error, match=match):
        cuflash.attention(q, k, v, out=out, **options)
    assert (out == 7.0).all()
    lse = numpy.zeros((2, 4, 5), numpy.float32)
    with pytest.raises(error, match=match):
        cuflash.attention_backward(out, q, k, v, out, lse, **options)


GPU_CASES = CASES + [  # odd lengths and head dims, Lq != Lk both ways, large softcaps, negative scale
    ((1, 2, 97, 59), (1, 2, 200, 59), dict(softcap=1.0, causal=True)),
    ((1, 4, 200, 111), (1, 2, 97, 111), dict(alibi="heads", sinks="heads", causal=True)),
    ((1, 2, 1025, 128), (1, 2, 1025, 128), dict(softcap=30.0, alibi="heads", sinks="heads")),
    ((2, 2, 1, 256), (2, 2, 1025, 256), dict(softcap=5.0, sinks="batch-heads", window=(100, -1))),
    ((1, 8, 333, 64), (1, 1, 333, 64), dict(sinks="heads", window=(64, 0))),
    ((1, 2, 97, 3), (1, 2, 97, 3), dict(alibi="heads", causal="top_left")),
    ((1, 2, 64, 1), (1, 2, 80, 1), dict(softcap=0.5)),
    ((1, 2, 200, 64), (1, 2, 1025, 64), dict(softcap=2.0, alibi="heads", scale=-0.3)),
    # Gemma-2's cap with scores across tanh's whole bend (|scale s| / cap ~ 1): bf16's tanh.approx
    # (a systematic 2^-11) summed over long rows
    ((1, 2, 300, 128), (1, 2, 2048, 128), dict(softcap=50.0, scale=4.0, sinks="heads", causal=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{k}" for k in c[2]) + f"-{c[0]}x{c[1]}")
def test_gpu_matches_the_reference(rng, dtype, case):
    """The GPU kernels with modifiers against the float64 reference, under the repository's
    tolerance rule (tests/tolerance.py): fp16/bf16 within 2x (3x for gradients) of a plain
    implementation in that dtype; fp32/fp64 near their own rounding. The deterministic backward
    (odd head dims) and the atomic one (even) both run."""
    _check_on_gpu(rng, dtype, case)


# Softcap alone at the head dims of every 16-bit forward family: its own body, which in bf16
# returns tanh in raw units with the cap as the softmax's multiplier (score_mod.cuh's
# ModBodies::kRawUnits; fp16 keeps log2 units); Lq != Lk, dense, causal and a negative scale.
FAMILY_CASES = [((1, 2, 300, d), (1, 2, 1500, d), options) for d in (64, 128)
                for options in (dict(softcap=1.5), dict(softcap=1.5, causal=True), dict(softcap=3.0, scale=-0.2))]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["fwd_tc", "fwd_wgmma", "fwd_wgmma_ws"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: "-".join(f"{k}" for k in c[2]) + f"-d{c[0][-1]}")
def test_gpu_softcap_alone_matches_the_reference_on_each_forward_family(rng, monkeypatch, family, dtype, case):
    """Each family forced by trimming tiles.FORWARD to it and those after it (the Hopper ones run on
    compute capability 9.0 only), fresh plans, and checked to be the one that ran."""
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import plan, tiles

    if family != "fwd_tc" and cupy.cuda.Device().compute_capability != "90":
        pytest.skip(f"{family} runs on compute capability 9.0 only")
    order = (tiles.FWD_WGMMA_WS, tiles.FWD_WGMMA, tiles.FWD_TC)
    start = [spec.kernel for spec in order].index(family)
    monkeypatch.setattr(tiles, "FORWARD", {**tiles.FORWARD, dtype: order[start:]})
    monkeypatch.setattr(plan, "PLANS", {})
    ran, select = [], tiles.select
    monkeypatch.setattr(tiles, "select", lambda *args, **kwargs: ran.append(select(*args, **kwargs)) or ran[-1])
    _check_on_gpu(rng, dtype, case)
    assert ran and {variant.kernel for variant in ran} == {family}, ran


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_softcap_keeps_the_non_finite_rules(rng, dtype, head_dim):
    """Under softcap (tanh.approx on the special-function unit): a NaN in one query row makes that
    row's out and lse NaN and reaches no other row;
    rows that see no key (causal, Lq > Lk) give out 0 and lse -inf exactly; the other rows match
    the float64 reference under the tolerance rule."""
    cupy = pytest.importorskip("cupy")
    import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16"))
    from tolerance import assert_close

    lq, lk, nan_row = 300, 260, 250
    host = _draw(rng, numpy.dtype(dtype), (1, 2, lq, head_dim), (1, 2, lk, head_dim), (1, 2, lk, head_dim))
    host[0][0, 1, nan_row, 3] = numpy.nan
    options = dict(softcap=5.0, causal=True)
    out, lse = cuflash.attention(*(cupy.asarray(x) for x in host), return_lse=True, **options)
    out, lse = cupy.asnumpy(out).astype(numpy.float64), cupy.asnumpy(lse)
    unseen = lq - lk  # rows 0 .. lq - lk - 1 see no key (causal's diagonal at Lk - Lq)
    assert numpy.isnan(out[0, 1, nan_row]).all() and numpy.isnan(lse[0, 1, nan_row])
    assert (out[:, :, :unseen] == 0).all() and (lse[:, :, :unseen] == -numpy.inf).all()
    rows = numpy.ones(lq, bool)
    rows[:unseen] = False
    rows[nan_row] = False
    finite = [x.copy() for x in host]
    finite[0][0, 1, nan_row, 3] = 0
    ref_out, ref_lse = score_mods_ref(*finite, **options)
    base_out, base_lse = score_mods_ref(*finite, dtype=numpy.dtype(dtype), **options)
    for head in range(2):
        keep = rows if head == 1 else numpy.arange(lq) >= unseen
        assert_close(out[0, head, keep], ref_out[0, head, keep], dtype=numpy.dtype(dtype),
                     baseline=base_out[0, head, keep], name=f"out of head {head}")
        assert_close(lse[0, head, keep], ref_lse[0, head, keep], dtype=numpy.float32,
                     baseline=base_lse[0, head, keep], kind="lse", name=f"lse of head {head}")


def _check_on_gpu(rng, dtype, case):
    """test_gpu_matches_the_reference's check of one case: forward (out, lse) and backward."""
    cupy = pytest.importorskip("cupy")
    import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16"))
    from reference import attention_backward_magnitudes
    from tolerance import EPS, assert_close

    q_shape, k_shape, options = case
    host = _draw(rng, numpy.dtype(dtype), q_shape, k_shape, k_shape, q_shape)
    kwargs = _options(rng, numpy.float32, q_shape, options)
    q, k, v, dout = (cupy.asarray(x) for x in host)
    gpu_kwargs = {key: cupy.asarray(value) if isinstance(value, numpy.ndarray) else value
                  for key, value in kwargs.items()}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **gpu_kwargs)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=bool(q_shape[-1] % 2), **gpu_kwargs)

    ref_out, ref_lse, ref_grads = score_mods_ref(*host, **kwargs)
    baseline = (None, None, (None,) * 4)
    if dtype in ("float16", "bfloat16"):
        baseline = score_mods_ref(*host, dtype=numpy.dtype(dtype), **kwargs)
    plain = {key: kwargs[key] for key in ("scale", "causal", "window") if key in kwargs}
    magnitudes = attention_backward_magnitudes(*(host[3], *host[:3]), **plain) + (None,)
    lse_dtype = numpy.float64 if dtype == "float64" else numpy.float32
    assert_close(cupy.asnumpy(out), ref_out, dtype=numpy.dtype(dtype), baseline=baseline[0], name="out")
    assert_close(cupy.asnumpy(lse), ref_lse, dtype=lse_dtype, baseline=baseline[1], kind="lse", name="lse")
    assert len(grads) == (4 if "sinks" in kwargs else 3)
    for name, grad, reference, base, magnitude, x in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, baseline[2],
                                                         magnitudes, (q, k, v, gpu_kwargs.get("sinks"))):
        assert isinstance(grad, cupy.ndarray) and grad.shape == x.shape and grad.dtype == x.dtype, name
        if name == "dsinks":
            # dsinks = -sum_i e^{sink - lse_i} (dout_i . out_i) with the out and lse the backward
            # was given: its terms cancel to a small sum (measured: float16, 1025 rows, |terms| 198
            # summing to -0.056), so the rounding of out in q's dtype, which out's own check bounds,
            # moves it by eps(q's dtype) * 198 / sqrt(rows), far beyond a plain implementation's
            # luckier draw; likewise lse's error (bf16's tanh.approx under softcap), which lse's own
            # check bounds, scales every term. The reference therefore takes the kernels' out and
            # lse, and what is left, the backward's own arithmetic, is held to the rounding of the
            # coarser of its arithmetic (float32; float64 for float64 inputs) and sinks' dtype,
            # which stores it.
            reference, magnitude = sink_gradient_ref(host[3], cupy.asnumpy(out), cupy.asnumpy(lse), kwargs["sinks"])
            stored = max(grad.dtype, numpy.dtype(lse_dtype), key=lambda t: EPS[numpy.dtype(t).name])
            assert_close(cupy.asnumpy(grad), reference, dtype=stored, magnitude=magnitude, kind="grad", name=name)
            continue
        # dsinks is stored in sinks' dtype but sums terms made of the output in q's dtype: it is
        # as precise as the coarser of the two (fp16/bf16 inputs: their rounding, not float32's)
        precision = max(grad.dtype, numpy.dtype(dtype), key=lambda t: EPS[numpy.dtype(t).name])
        assert_close(cupy.asnumpy(grad), reference, dtype=precision,
                     baseline=base, magnitude=magnitude, kind="grad", name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_sinks_gradient_is_bitwise_reproducible(rng, dtype):
    cupy = pytest.importorskip("cupy")
    import ml_dtypes  # noqa: F401

    q, k, v, dout = (cupy.asarray(x) for x in _draw(rng, numpy.dtype(dtype), *[(2, 4, 300, 64)] * 4))
    sinks = cupy.asarray(rng.standard_normal((1, 4)).astype(numpy.float32))
    out, lse = cuflash.attention(q, k, v, causal=True, softcap=3.0, sinks=sinks, return_lse=True)
    runs = [cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, softcap=3.0, sinks=sinks,
                                       deterministic=True) for _ in range(3)]
    assert runs[0][3].shape == (1, 4) and runs[0][3].dtype == numpy.float32
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@pytest.mark.gpu
def test_gpu_modifiers_agree_with_the_cpu_backend(rng):
    """One call on both backends (float64): the same semantics, to float64 rounding."""
    cupy = pytest.importorskip("cupy")
    q, k, v, dout = _draw(rng, "float64", (2, 4, 70, 40), (2, 2, 90, 40), (2, 2, 90, 40), (2, 4, 70, 40))
    kwargs = dict(softcap=2.5, alibi_slopes=rng.uniform(0.1, 0.5, 4), sinks=rng.standard_normal((2, 4)),
                  causal=True, window=(30, -1))
    cpu = cuflash.attention(q, k, v, return_lse=True, **kwargs)
    cpu_grads = cuflash.attention_backward(dout, q, k, v, *cpu, **kwargs)
    gpu_kwargs = {key: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for key, x in kwargs.items()}
    gpu = cuflash.attention(*(cupy.asarray(x) for x in (q, k, v)), return_lse=True, **gpu_kwargs)
    gpu_grads = cuflash.attention_backward(*(cupy.asarray(x) for x in (dout, q, k, v)), *gpu, **gpu_kwargs)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), (*cpu, *cpu_grads), (*gpu, *gpu_grads)):
        assert_close_relative(cupy.asnumpy(b), a, "float64", name)


def test_gradients_match_finite_differences(rng):
    """The analytic backward (and so the reference's formulas) against central differences of the
    forward, in float64, for every input of a call with all three modifiers."""
    q, k, v, dout = _draw(rng, "float64", (1, 2, 5, 4), (1, 1, 7, 4), (1, 1, 7, 4), (1, 2, 5, 4))
    sinks = numpy.array([0.2, -0.4])
    kwargs = dict(softcap=1.5, alibi_slopes=numpy.array([0.3, 0.1]), sinks=sinks, causal=True)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kwargs)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **kwargs)

    def loss(q, k, v, sinks):
        return float((cuflash.attention(q, k, v, **{**kwargs, "sinks": sinks}) * dout).sum())

    inputs = [q, k, v, sinks]
    for index, (x, grad) in enumerate(zip(inputs, grads)):
        numeric = numpy.zeros_like(x)
        for position in numpy.ndindex(x.shape):
            bumped = [y.copy() for y in inputs]
            bumped[index][position] += 1e-6
            up = loss(*bumped)
            bumped[index][position] -= 2e-6
            numeric[position] = (up - loss(*bumped)) / 2e-6
        numpy.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"input {index}")
