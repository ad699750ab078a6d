"""Additive bias and boolean masks (issue 15), forward and backward (dbias), against the dense
float64 reference (reference.score_mods_ref) under tests/tolerance.py's rule: the CPU backend on
NumPy arrays, and the GPU kernels on CuPy arrays (marked ``gpu``, skipped cleanly without one).

Order inside the score: s = scale q.k; softcap; + bias; + ALiBi; then the mask (causal/window
ANDed with ``mask``). dbias is dS of the score after softcap, summed over bias's broadcast axes.

The GPU runs the same checks (``check_against_reference(..., gpu=True)`` copies every input to
the device and the results back): every CASE in every dtype, AlphaFold's pair bias, Swin's
windows, CuPy views of any strides (stride-0 broadcasts, transposed, offset, negative strides),
rows that see no key, -inf biases, hidden NaN, the deterministic dbias bit for bit, gradient
order and bias_grad, out= in place, head dims 8-256 at odd lengths, 1025 keys; misuse on CuPy
arrays is refused naming the argument before anything launches.
"""
from __future__ import annotations

import tracemalloc

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

import cuflash
from cuflash import _cpu, _spec
from reference import score_mods_ref, sink_gradient_ref, to_numpy
from test_score_mods import test_bad_modifiers_are_refused_naming_the_argument as refused_like_a_modifier
from tolerance import EPS, assert_close

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _draw(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(numpy.dtype(dtype)) for s in shapes]


def _mask(rng, shape, kind, lead_q=None):
    """A boolean mask of ``shape``. kinds: "random" (70% visible); "holes" (random, plus a fully
    masked query row and a fully masked key column); "keypad" ((B, 1, 1, Lk): batch b sees its
    first lengths[b] keys, the last of several none)."""
    if kind == "keypad":
        batch, lk = shape[0], shape[-1]
        lengths = rng.integers(1, lk + 1, batch)
        if batch > 1:
            lengths[-1] = 0
        return numpy.arange(lk) < lengths.reshape((batch,) + (1,) * (len(shape) - 1))
    mask = rng.random(shape) < 0.7
    if kind == "holes":
        mask[..., min(3, shape[-2] - 1), :] = False
        mask[..., :, shape[-1] // 2] = False
    return mask


def _bias_dtype(dtype, wide):
    """q's dtype, or float32 for float16/bfloat16 when ``wide``."""
    return numpy.dtype(numpy.float32) if wide and numpy.dtype(dtype).itemsize == 2 else numpy.dtype(dtype)


def _cupy():
    return pytest.importorskip("cupy")


def _is_array(x) -> bool:
    return isinstance(x, numpy.ndarray) or type(x).__module__.split(".")[0] == "cupy"


def _bits(x) -> bytes:
    """The bytes of a NumPy or CuPy array's elements in C order (for bit-for-bit comparisons)."""
    return to_numpy(x).tobytes()


def check_against_reference(dtype, q, k, v, dout, *, gpu=False, deterministic=None, **kwargs):
    """Forward and backward (dq, dk, dv[, dbias][, dsinks]) against the float64 reference under
    tests/tolerance.py's rule (fp16/bf16 against the plain implementation in that dtype), with
    every argument left unchanged. Returns (out, lse, grads) as NumPy arrays.

    gpu: run cuflash on the GPU. Every NumPy array among the arguments (q, k, v, dout and the
    keywords' arrays: bias, mask, alibi_slopes, sinks) is copied there with cupy.asarray, CuPy
    arrays (views of any strides included) are taken as they are; the results come back with
    cupy.asnumpy, and the reference sees host copies of exactly what the kernels read. The check
    that nothing was modified reads the device arrays. dsinks follows test_score_mods's GPU rule
    (sink_gradient_ref of the kernels' out). deterministic: passed to the backward when given.
    """
    dtype = numpy.dtype(dtype)
    given = dict(q=q, k=k, v=v, dout=dout, **kwargs)
    if gpu:
        cupy = _cupy()
        args = {name: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for name, x in given.items()}
        host = {name: to_numpy(x) if _is_array(x) else x for name, x in args.items()}
        before = {name: _bits(x) for name, x in args.items() if isinstance(x, cupy.ndarray)}
    else:
        args = host = given
        before = {name: x.copy() for name, x in given.items() if isinstance(x, numpy.ndarray)}
    options = {name: x for name, x in args.items() if name not in ("q", "k", "v", "dout")}
    backward_options = {} if deterministic is None else dict(deterministic=deterministic)
    out, lse = cuflash.attention(args["q"], args["k"], args["v"], return_lse=True, **options)
    grads = cuflash.attention_backward(args["dout"], args["q"], args["k"], args["v"], out, lse, **options,
                                       **backward_options)
    for name, x in args.items():
        if name in before:
            if gpu:
                assert _bits(x) == before[name], f"{name} was modified"
            else:
                assert numpy.array_equal(before[name], x, equal_nan=True), f"{name} was modified"
    if gpu:
        assert all(isinstance(x, cupy.ndarray) for x in (out, lse, *grads)), "a result left the GPU"
        out, lse, grads = cupy.asnumpy(out), cupy.asnumpy(lse), tuple(cupy.asnumpy(g) for g in grads)

    q, k, v, dout = (host[name] for name in ("q", "k", "v", "dout"))
    kwargs = {name: x for name, x in host.items() if name not in ("q", "k", "v", "dout")}
    ref_out, ref_lse, ref_grads = score_mods_ref(q, k, v, dout, **kwargs)
    size_out, _, size_grads = score_mods_ref(q, k, v, dout, magnitudes=True, **kwargs)
    baseline = (None, None, (None,) * len(ref_grads))
    if dtype.itemsize == 2:
        baseline = score_mods_ref(q, k, v, dout, dtype=dtype, **kwargs)
    lse_dtype = numpy.float64 if dtype == numpy.float64 else numpy.float32
    assert out.dtype == dtype and lse.dtype == lse_dtype
    assert_close(out, ref_out, dtype=dtype, baseline=baseline[0], magnitude=size_out, name="out")
    assert_close(lse, ref_lse, dtype=lse_dtype, baseline=baseline[1], kind="lse", name="lse")

    names = ["dq", "dk", "dv"] + ["dbias"] * ("bias" in kwargs) + ["dsinks"] * ("sinks" in kwargs)
    owners = [q, k, v] + [kwargs.get("bias")] * ("bias" in kwargs) + [kwargs.get("sinks")] * ("sinks" in kwargs)
    assert len(grads) == len(names) == len(ref_grads)
    for name, grad, owner, reference, base, size in zip(names, grads, owners, ref_grads, baseline[2], size_grads):
        assert grad.shape == owner.shape and grad.dtype == owner.dtype, name
        if gpu and name == "dsinks":
            # As test_gpu_matches_the_reference (test_score_mods.py): dsinks' terms cancel, so it
            # is held to the backward's own arithmetic given the kernels' out and the exact lse.
            reference, size = sink_gradient_ref(dout, out, ref_lse, kwargs["sinks"])
            stored = max(grad.dtype, numpy.dtype(lse_dtype), key=lambda t: EPS[numpy.dtype(t).name])
            assert_close(grad, reference, dtype=stored, magnitude=size, kind="grad", name=name)
            continue
        assert_close(grad, reference, dtype=dtype, baseline=base, magnitude=size, kind="grad", name=name)
    return out, lse, grads


# (q, k, v shapes, bias shape or None, mask (shape, kind) or None, options); leading axes
# (batch..., heads), then (L, D).
CASES = [
    # head dims, Lq < Lk and Lq > Lk, bias broadcast along each axis in turn
    ((2, 3, 37, 8), (2, 3, 53, 8), (2, 3, 53, 8), (2, 3, 37, 53), None, {}),
    ((2, 3, 53, 16), (2, 3, 37, 16), (2, 3, 37, 16), (1, 3, 53, 37), None, dict(causal=True)),
    ((2, 3, 37, 24), (2, 3, 53, 24), (2, 3, 53, 24), (2, 1, 37, 53), None, dict(causal="top_left")),
    ((2, 3, 41, 32), (2, 3, 29, 32), (2, 3, 29, 32), (2, 3, 1, 29), None, dict(causal="top_left")),
    ((2, 3, 29, 48), (2, 3, 41, 48), (2, 3, 41, 48), (2, 3, 29, 1), None, dict(window=(7, 3))),
    ((2, 3, 33, 59), (2, 3, 47, 59), (2, 3, 47, 59), (47,), None, dict(causal=True, window=(9, 0))),
    ((2, 3, 47, 64), (2, 3, 33, 64), (2, 3, 33, 64), (47, 33), None, dict(window=(-1, 4))),
    ((2, 3, 30, 16), (2, 3, 31, 16), (2, 3, 31, 16), (), None, {}),                      # a 0-d bias
    # masks: random, fully masked rows and columns, key padding; with and without a bias
    ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 16), None, ((2, 3, 37, 53), "holes"), {}),
    ((3, 2, 45, 32), (3, 2, 45, 32), (3, 2, 45, 32), (3, 2, 45, 45), ((3, 1, 1, 45), "keypad"), dict(causal=True)),
    ((2, 4, 29, 8), (2, 4, 61, 8), (2, 4, 61, 8), (4, 29, 61), ((29, 61), "holes"), dict(causal="top_left")),
    ((2, 3, 50, 24), (2, 3, 19, 24), (2, 3, 19, 24), (2, 1, 1, 19), ((1, 3, 50, 1), "random"), dict(window=(4, 4))),
    # GQA / MQA / broadcast leading axes
    ((2, 6, 37, 16), (2, 2, 45, 16), (2, 2, 45, 16), (1, 6, 37, 45), ((2, 1, 37, 45), "holes"), dict(causal=True)),
    ((2, 4, 31, 32), (2, 1, 40, 32), (2, 1, 40, 32), (2, 4, 31, 40), ((2, 4, 1, 40), "random"), {}),
    ((3, 1, 4, 21, 8), (1, 2, 4, 26, 8), (1, 2, 4, 26, 8), (3, 2, 1, 21, 26), ((1, 2, 4, 21, 26), "holes"), {}),
    ((4, 21, 16), (4, 25, 16), (1, 25, 16), (4, 21, 25), ((21, 25), "random"), dict(causal=True)),  # 3-D
    # composed with softcap, ALiBi and sinks (bias after softcap, before ALiBi)
    ((2, 4, 37, 16), (2, 2, 53, 16), (2, 2, 53, 16), (2, 4, 37, 53), ((2, 1, 37, 53), "holes"),
     dict(softcap=2.0, alibi="heads", sinks="heads", causal=True)),
    ((2, 3, 45, 48), (2, 3, 33, 48), (2, 3, 33, 48), (1, 3, 1, 33), ((2, 1, 1, 33), "keypad"),
     dict(softcap=0.8, sinks="heads")),
    ((2, 2, 29, 64), (2, 2, 35, 64), (2, 2, 35, 64), (29, 35), ((2, 2, 29, 35), "holes"),
     dict(alibi="batch-heads", window=(6, 2))),
    # more than one block of queries and of keys (BLOCK_M = BLOCK_N = 128)
    ((1, 2, 150, 16), (1, 2, 290, 16), (1, 2, 290, 16), (1, 2, 1, 290), ((1, 1, 1, 290), "keypad"),
     dict(causal=True, sinks="heads")),
]


def _case_id(case):
    q, k, v, bias, mask, options = case
    parts = [f"q{'x'.join(map(str, q))}", f"k{'x'.join(map(str, k))}"]
    if bias is not None:
        parts.append(f"bias{'x'.join(map(str, bias)) or 'scalar'}")
    if mask is not None:
        parts.append(f"mask-{mask[1]}{'x'.join(map(str, mask[0]))}")
    return "-".join(parts + [str(key) for key in options])


def _options(rng, q_shape, options):
    """The call's keywords, with ALiBi slopes and sinks drawn for q's leading axes."""
    heads, lead = q_shape[-3], q_shape[:-2]
    out = {key: value for key, value in options.items() if key not in ("alibi", "sinks")}
    shapes = {"heads": (heads,), "batch-heads": lead}
    if "alibi" in options:
        out["alibi_slopes"] = rng.uniform(0.05, 0.6, shapes[options["alibi"]])
    if "sinks" in options:
        out["sinks"] = rng.standard_normal(shapes[options["sinks"]])
    return out


def _case_arguments(rng, dtype, case):
    """(q, k, v, dout) and the keywords of a CASE, drawn in ``dtype`` (NumPy arrays)."""
    q_shape, k_shape, v_shape, bias_shape, mask_spec, options = case
    q, k, v = _draw(rng, dtype, q_shape, k_shape, v_shape)
    (dout,) = _draw(rng, dtype, _spec.resolve_forward(q, k, v).out_shape)
    kwargs = _options(rng, q_shape, options)
    for name in ("alibi_slopes", "sinks"):  # q's dtype, or float32 for float16/bfloat16
        if name in kwargs:
            kwargs[name] = kwargs[name].astype(_bias_dtype(dtype, True))
    if bias_shape is not None:
        kwargs["bias"] = rng.standard_normal(bias_shape).astype(_bias_dtype(dtype, wide=len(bias_shape) % 2 == 0))
    if mask_spec is not None:
        kwargs["mask"] = _mask(rng, *mask_spec)
    return (q, k, v, dout), kwargs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_the_reference(rng, dtype, case):
    arrays, kwargs = _case_arguments(rng, dtype, case)
    check_against_reference(dtype, *arrays, **kwargs)


# (dtype, dbias route) pairs: every dtype with the dS buffer and with a shared bias's gradient added
# per plane by the dK/dV kernels (plan._SharedBiasAdds, outside deterministic mode); 16-bit calls
# with a bias also with their gradient summed on chip (bwd_dbias_tc; plan.ON_CHIP_DBIAS_MIN_BYTES
# at 0 picks it at any size).
GPU_ROUTES = ([(dtype, route) for route in ("buffer", "adds") for dtype in DTYPES]
              + [(dtype, "on-chip") for dtype in ("float16", "bfloat16")])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dbias_route", GPU_ROUTES, ids=[f"{d}-{r}" for d, r in GPU_ROUTES])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_matches_the_reference(rng, dtype, case, dbias_route, monkeypatch):
    """Every CASE on the GPU, the deterministic backward and the default one in turn (the adds'
    route: the default one always); a bias's gradient from a dS buffer, added per plane, or
    summed on chip where the route is asked for (a call the route does not serve, e.g. a bias
    of one row, takes the buffer either way)."""
    from cuflash._gpu import plan

    if dbias_route != "adds":
        monkeypatch.setattr(plan, "SHARED_BIAS_ADDS_MAX_ROWS", 0)
    if dbias_route == "on-chip":
        monkeypatch.setattr(plan, "ON_CHIP_DBIAS_MIN_BYTES", 0)
    arrays, kwargs = _case_arguments(rng, dtype, case)
    deterministic = dbias_route != "adds" and bool(CASES.index(case) % 2)
    check_against_reference(dtype, *arrays, gpu=True, deterministic=deterministic, **kwargs)


def _alphafold_pair_bias(rng, dtype, gpu):
    batch, rows, heads, n, d = 1, 5, 4, 23, 32
    q, k, v, dout = _draw(rng, dtype, *[(batch, rows, heads, n, d)] * 4)
    bias = rng.standard_normal((batch, 1, heads, n, n)).astype(_bias_dtype(dtype, True))
    mask = rng.random((batch, rows, 1, 1, n)) < 0.85
    mask[0, 2] = False  # a row whose residues are all padding
    out, lse, grads = check_against_reference(dtype, q, k, v, dout, bias=bias, mask=mask, gpu=gpu)
    assert (out[0, 2] == 0).all() and (lse[0, 2] == -numpy.inf).all()
    for grad in grads[:3]:
        assert (grad[0, 2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_alphafold_pair_bias_shared_over_rows(rng, dtype):
    """Triangle attention's shape: q (B, rows, H, N, D), each row a sequence of N residues, a pair
    bias (B, 1, H, N, N) shared by every row (dbias summed over the rows), a residue mask."""
    _alphafold_pair_bias(rng, dtype, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_alphafold_pair_bias_shared_over_rows(rng, dtype):
    _alphafold_pair_bias(rng, dtype, gpu=True)


def _swin_windows(rng, dtype, gpu):
    batch, windows, heads, d = 2, 4, 3, 16
    q, k, v, dout = _draw(rng, dtype, *[(batch, windows, heads, 49, d)] * 4)
    bias = rng.standard_normal((1, heads, 49, 49)).astype(_bias_dtype(dtype, False))
    region = rng.integers(0, 3, (windows, 49))  # each token's region; tokens attend within theirs
    mask = (region[:, :, None] == region[:, None, :])[:, None]
    check_against_reference(dtype, q, k, v, dout, bias=bias, mask=mask, gpu=gpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swin_window_bias_and_shifted_window_mask(rng, dtype):
    """Swin: windows of 49 tokens, q (B, nW, H, 49, D), a learnable relative-position bias
    (1, H, 49, 49) shared by every window, the shifted windows' mask (nW, 1, 49, 49)."""
    _swin_windows(rng, dtype, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_swin_window_bias_and_shifted_window_mask(rng, dtype):
    _swin_windows(rng, dtype, gpu=True)


def test_bias_of_any_strides_and_broadcast_views(rng):
    """A transposed bias, a bias whose broadcast axes are stride-0 views (numpy.broadcast_to) and
    the compact one give the same forward bit for bit; dbias of the view has the view's shape,
    one entry per element, which sums back to the compact bias's gradient."""
    q, k, v, dout = _draw(rng, "float32", (2, 3, 40, 16), (2, 3, 57, 16), (2, 3, 57, 16), (2, 3, 40, 16))
    compact = rng.standard_normal((1, 3, 1, 57)).astype(numpy.float32)
    view = numpy.broadcast_to(compact, (2, 3, 40, 57))
    transposed = numpy.ascontiguousarray(numpy.broadcast_to(compact, (2, 3, 40, 57)).transpose(0, 1, 3, 2))
    transposed = transposed.transpose(0, 1, 3, 2)  # (2, 3, 40, 57) with keys as the slow axis
    results = [cuflash.attention(q, k, v, bias=b, causal=True, return_lse=True) for b in (compact, view, transposed)]
    for out, lse in results[1:]:
        assert out.tobytes() == results[0][0].tobytes() and lse.tobytes() == results[0][1].tobytes()
    out, lse = results[0]
    d_compact = cuflash.attention_backward(dout, q, k, v, out, lse, bias=compact, causal=True)[3]
    d_view = cuflash.attention_backward(dout, q, k, v, out, lse, bias=view, causal=True)[3]
    d_transposed = cuflash.attention_backward(dout, q, k, v, out, lse, bias=transposed, causal=True)[3]
    assert d_view.shape == (2, 3, 40, 57) and d_compact.shape == (1, 3, 1, 57)
    numpy.testing.assert_array_equal(d_view, d_transposed)
    numpy.testing.assert_allclose(d_view.sum(axis=(0, 2), keepdims=True), d_compact, rtol=1e-5, atol=1e-6)


def test_no_score_sized_buffer_for_broadcast_bias_and_mask(rng, monkeypatch):
    """A (1, H, Lq, Lk) bias given as a stride-0 view of (1, 1, 1, Lk) and a key-padding mask:
    forward and backward (bias_grad=False) allocate nothing near Lq x Lk. On one thread: each more
    thread holds one unit's temporaries more (bounded by _cpu.THREAD_MEMORY), nothing score-sized."""
    monkeypatch.setenv("CUFLASH_CPU_THREADS", "1")
    lq = lk = 1024
    q, k, v, dout = _draw(rng, "float32", *[(1, 2, lq, 8)] * 4)
    bias = numpy.broadcast_to(rng.standard_normal((1, 1, 1, lk)).astype(numpy.float32), (1, 2, lq, lk))
    mask = numpy.arange(lk)[None, None, None, :] < 900
    score_bytes = 2 * lq * lk * 4
    tracemalloc.start()
    try:
        out, lse = cuflash.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, mask=mask, bias_grad=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(grads) == 3
    assert peak < score_bytes / 4, f"peak {peak} bytes against {score_bytes} for the scores"


def test_key_padding_mask_skips_the_tiles_it_hides(rng, monkeypatch):
    """A key tile the caller's mask hides from every row of a block is never scored, and the
    result equals attention over the unpadded keys."""
    q, k, v, dout = _draw(rng, "float64", (2, 2, 130, 8), (2, 2, 600, 8), (2, 2, 600, 8), (2, 2, 130, 8))
    lengths = numpy.array([100, 300])
    mask = numpy.arange(600)[None, None, None, :] < lengths[:, None, None, None]
    calls = []
    real = _cpu._scores

    def counting(p, q_block, k_tile, rows, keys, mods):
        calls.append(keys)
        return real(p, q_block, k_tile, rows, keys, mods)

    monkeypatch.setattr(_cpu, "_scores", counting)
    # boxes of the leading axes (_cpu._lead_boxes) of one batch row each (one thread: boxes spread
    # over more threads would cut the heads too, each scoring the same tiles): each row skips its own
    monkeypatch.setenv("CUFLASH_CPU_THREADS", "1")
    monkeypatch.setattr(_cpu, "TILE_BYTES", 2 * _cpu.BLOCK_M * _cpu.BLOCK_N * 8)
    out, lse = cuflash.attention(q, k, v, mask=mask, return_lse=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, mask=mask)
    row_tiles = sum(-(-int(n) // _cpu.BLOCK_N) for n in lengths)  # the tiles holding each row's keys
    assert all(keys.start < 300 for keys in calls) and len(calls) == 2 * row_tiles * 2  # 2 query blocks, fwd and bwd
    monkeypatch.setattr(_cpu, "_scores", real)
    for b, n in enumerate(lengths):
        kb, vb = k[b, :, :n], v[b, :, :n]
        want_out, want_lse = cuflash.attention(q[b], kb, vb, return_lse=True)
        numpy.testing.assert_allclose(out[b], want_out, rtol=1e-13, atol=1e-14)
        numpy.testing.assert_allclose(lse[b], want_lse, rtol=1e-13, atol=1e-14)
        want = cuflash.attention_backward(dout[b], q[b], kb, vb, want_out, want_lse)
        numpy.testing.assert_allclose(grads[0][b], want[0], rtol=1e-12, atol=1e-13)
        numpy.testing.assert_allclose(grads[1][b, :, :n], want[1], rtol=1e-12, atol=1e-13)
        assert (grads[1][b, :, n:] == 0).all() and (grads[2][b, :, n:] == 0).all()


@pytest.mark.parametrize("sinks", [None, numpy.array([0.5, -1.0])])
def test_rows_that_see_no_key_give_zero_the_sink_and_no_gradient(rng, sinks):
    """Rows left without a visible key by the caller's mask (alone or with causal), or by a bias
    of -inf: out 0, lse -inf (or the sink), nothing NaN, no gradient through them."""
    q, k, v, dout = _draw(rng, "float64", (2, 2, 12, 8), (2, 2, 9, 8), (2, 2, 9, 8), (2, 2, 12, 8))
    mask = rng.random((2, 2, 12, 9)) < 0.6
    mask[:, :, 4] = False
    mask[1, 0, 7] = False
    bias = rng.standard_normal((2, 2, 12, 9))
    bias[0, 1, 9] = -numpy.inf
    kwargs = dict(bias=bias, mask=mask, causal="top_left", sinks=sinks)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **kwargs)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **kwargs)
    empty = numpy.zeros((2, 2, 12), bool)
    empty[:, :, 4] = empty[1, 0, 7] = empty[0, 1, 9] = True
    empty[..., 0] |= ~mask[..., 0, 0]  # top-left causal: row 0 sees key 0 only
    expected_lse = numpy.broadcast_to(-numpy.inf if sinks is None else sinks[None, :, None], (2, 2, 12))
    assert (out[empty] == 0).all() and (lse[empty] == expected_lse[empty]).all()
    assert all(numpy.isfinite(x).all() for x in (out, *grads))
    assert (grads[0][empty] == 0).all() and (grads[3][empty] == 0).all()
    assert (grads[3][~numpy.broadcast_to(mask, (2, 2, 12, 9))] == 0).all()  # dbias is 0 where masked


def test_minus_infinity_bias_hides_keys_as_the_mask_does(rng):
    q, k, v, dout = _draw(rng, "float64", (2, 3, 20, 8), (2, 3, 25, 8), (2, 3, 25, 8), (2, 3, 20, 8))
    mask = rng.random((2, 1, 20, 25)) < 0.5
    bias = numpy.where(mask, 0.0, -numpy.inf)
    by_mask = cuflash.attention(q, k, v, mask=mask, causal=True, return_lse=True)
    by_bias = cuflash.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    for a, b in zip(by_mask, by_bias):
        numpy.testing.assert_array_equal(a, b)
    grads_mask = cuflash.attention_backward(dout, q, k, v, *by_mask, mask=mask, causal=True)
    grads_bias = cuflash.attention_backward(dout, q, k, v, *by_bias, bias=bias, causal=True)
    for a, b in zip(grads_mask, grads_bias):
        numpy.testing.assert_array_equal(a, b)


def test_hidden_nan_in_bias_or_value_does_not_leak(rng):
    """A NaN bias entry or a NaN value behind the caller's mask takes no part in any row (nor in
    dbias, which is exactly 0 where masked)."""
    q, k, v, dout = _draw(rng, "float64", (1, 2, 10, 8), (1, 2, 14, 8), (1, 2, 14, 8), (1, 2, 10, 8))
    mask = numpy.ones((1, 2, 10, 14), bool)
    mask[..., 5] = False
    bias = rng.standard_normal((1, 2, 10, 14))
    clean = cuflash.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
    bias[..., 5] = numpy.nan
    v = v.copy()
    v[..., 5, :] = numpy.nan
    dirty = cuflash.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
    for a, b in zip(clean, dirty):
        numpy.testing.assert_array_equal(a, b)
    dbias = cuflash.attention_backward(dout, q, k, v, *dirty, bias=bias, mask=mask)[3]
    assert (dbias[..., 5] == 0).all() and numpy.isfinite(dbias).all()


def test_dbias_matches_finite_differences(rng):
    """dbias against central differences of the forward in float64, entry by entry, with the bias
    broadcast over batch and queries, over keys, or not at all, under softcap (whose factor dbias
    must not carry), ALiBi, sinks, a mask and GQA; dq, dk and dv along a random direction each."""
    q, k, v, dout = _draw(rng, "float64", (2, 2, 5, 4), (2, 1, 7, 4), (2, 1, 7, 4), (2, 2, 5, 4))
    mask = rng.random((2, 1, 5, 7)) < 0.8
    mask[1, 0, 2] = False
    kwargs = dict(softcap=1.5, alibi_slopes=numpy.array([0.3, 0.1]), sinks=numpy.array([0.2, -0.4]),
                  mask=mask, causal=True)
    step = 1e-6

    def loss(q, k, v, bias):
        return float((cuflash.attention(q, k, v, bias=bias, **kwargs) * dout).sum())

    for bias_shape in [(1, 2, 1, 7), (2, 2, 5, 7), (5, 1)]:
        bias = rng.standard_normal(bias_shape)
        out, lse = cuflash.attention(q, k, v, bias=bias, return_lse=True, **kwargs)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, **kwargs)
        numeric = numpy.zeros_like(bias)
        for position in numpy.ndindex(bias.shape):
            bump = numpy.zeros_like(bias)
            bump[position] = step
            numeric[position] = (loss(q, k, v, bias + bump) - loss(q, k, v, bias - bump)) / (2 * step)
        numpy.testing.assert_allclose(grads[3], numeric, rtol=1e-6, atol=1e-8, err_msg=f"dbias {bias_shape}")
        for index, x in enumerate((q, k, v)):
            direction = rng.standard_normal(x.shape)
            moved = [[q, k, v, bias], [q, k, v, bias]]
            moved[0][index], moved[1][index] = x + step * direction, x - step * direction
            numeric = (loss(*moved[0]) - loss(*moved[1])) / (2 * step)
            assert abs(numeric - (grads[index] * direction).sum()) <= 1e-6 * max(1.0, abs(numeric)), index


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_backward_is_bitwise_reproducible(rng, dtype):
    """The same call twenty times: every gradient, dbias of a broadcast bias included, bit for bit."""
    q, k, v, dout = _draw(rng, dtype, (2, 4, 150, 32), (2, 2, 200, 32), (2, 2, 200, 32), (2, 4, 150, 32))
    bias = rng.standard_normal((1, 4, 150, 200)).astype(numpy.float32)
    mask = _mask(rng, (2, 1, 1, 200), "keypad")
    kwargs = dict(bias=bias, mask=mask, causal=True, softcap=3.0, sinks=rng.standard_normal(4).astype(numpy.float32),
                  deterministic=True)
    out, vjp = cuflash.attention_vjp(q, k, v, **kwargs)
    first = vjp(dout)
    assert first[3].shape == bias.shape and first[3].dtype == numpy.float32
    for _ in range(19):
        again = vjp(dout)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


def test_gradient_order_and_bias_grad(rng):
    """(dq, dk, dv), then dbias when bias is given and bias_grad is true, then dsinks; through
    attention_backward and attention_vjp alike."""
    q, k, v, dout = _draw(rng, "float32", *[(2, 2, 9, 8)] * 4)
    bias = rng.standard_normal((2, 1, 9, 9)).astype(numpy.float32)
    sinks = numpy.array([0.1, 0.2], numpy.float32)
    out, lse = cuflash.attention(q, k, v, bias=bias, sinks=sinks, return_lse=True)
    full = cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, sinks=sinks)
    assert [g.shape for g in full] == [q.shape, k.shape, v.shape, bias.shape, sinks.shape]
    without = cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, sinks=sinks, bias_grad=False)
    assert len(without) == 4
    for a, b in zip(full[:3] + full[4:], without):
        assert a.tobytes() == b.tobytes()
    assert len(cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, bias_grad=numpy.bool_(False))) == 3
    assert len(cuflash.attention_backward(dout, q, k, v, out, lse, mask=bias > 0, bias_grad=True)) == 3
    vjp_out, vjp = cuflash.attention_vjp(q, k, v, bias=bias, sinks=sinks)
    assert vjp_out.tobytes() == out.tobytes()
    for a, b in zip(vjp(dout), full):
        assert a.tobytes() == b.tobytes()
    assert len(cuflash.attention_vjp(q, k, v, bias=bias, bias_grad=False)[1](dout)) == 3


def test_out_is_written_in_place_with_bias_and_mask(rng):
    q, k, v = _draw(rng, "float32", *[(2, 3, 11, 8)] * 3)
    bias = rng.standard_normal((3, 11, 11)).astype(numpy.float32)
    mask = rng.random((11, 11)) < 0.5
    out = numpy.full((2, 3, 11, 8), numpy.nan, numpy.float32)
    result = cuflash.attention(q, k, v, bias=bias, mask=mask, out=out)
    assert result is out
    assert out.tobytes() == cuflash.attention(q, k, v, bias=bias, mask=mask).tobytes()


@pytest.mark.gpu
def test_bias_and_mask_must_be_the_inputs_kind(rng):
    cupy = pytest.importorskip("cupy")
    host = _draw(rng, "float32", *[(1, 2, 8, 16)] * 3)
    device = [cupy.asarray(x) for x in host]
    with pytest.raises(TypeError, match="bias must be a NumPy"):
        cuflash.attention(*host, bias=cupy.zeros((8, 8), cupy.float32))
    with pytest.raises(TypeError, match="mask must be a CuPy"):
        cuflash.attention(*device, mask=numpy.ones((8, 8), bool))
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            other = cupy.zeros((8, 8), cupy.float32)
        with pytest.raises(ValueError, match="bias must be on q's device 0"):
            cuflash.attention(*device, bias=other)


class _OpenCLArray:
    """A DLPack array on a device cuflash does not run on (OpenCL); never read."""

    def __dlpack__(self, *args, **kwargs):
        raise AssertionError("read")

    def __dlpack_device__(self):
        return (4, 0)


BAD = [  # (keywords, error, message)
    (dict(bias=numpy.zeros((2, 4, 5, 7), numpy.float32)), ValueError, r"bias must broadcast to \(\.\.\., Hq, Lq, Lk\) = \(2, 4, 5, 6\)"),
    (dict(bias=numpy.zeros((3, 1, 1), numpy.float32)), ValueError, "bias must broadcast"),
    (dict(bias=numpy.zeros((1, 2, 4, 5, 6), numpy.float32)), ValueError, "bias must broadcast"),
    (dict(bias=numpy.zeros((2, 4, 5, 6), numpy.int32)), TypeError, "bias must be a float array of dtype float32"),
    (dict(bias=numpy.zeros((5, 6), bool)), TypeError, "bias must be a float array"),
    (dict(bias=numpy.zeros((5, 6), numpy.float64)), TypeError, r"bias must be a float array of dtype float32 \(q is"),
    (dict(bias=numpy.zeros((5, 6), numpy.float16)), TypeError, "bias must be a float array of dtype float32"),
    (dict(bias=numpy.zeros((5, 6), numpy.complex64)), TypeError, "bias must be a float array"),
    (dict(bias=[[0.0] * 6] * 5), TypeError, "bias must be a numpy.ndarray"),
    (dict(bias=_OpenCLArray()), TypeError, "bias lives on DLPack device type 4"),
    (dict(mask=_OpenCLArray()), TypeError, "mask lives on DLPack device type 4"),
    (dict(mask=numpy.ones((5, 6), numpy.float32)), TypeError, "mask must be a boolean array"),
    (dict(mask=numpy.ones((5, 6), numpy.uint8)), TypeError, "mask must be a boolean array"),
    (dict(mask=numpy.ones((5, 7), bool)), ValueError, r"mask must broadcast to \(\.\.\., Hq, Lq, Lk\)"),
    (dict(mask=numpy.ones((3, 4, 5, 6), bool)), ValueError, "mask must broadcast"),
    (dict(mask=[[True] * 6] * 5), TypeError, "mask must be a numpy.ndarray"),
]


@pytest.mark.parametrize("options, error, match", BAD, ids=[f"{list(b[0])[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_bias_or_mask_is_refused_naming_it(rng, options, error, match, monkeypatch):
    """attention (out= left as it was) and attention_backward as for the score modifiers, and
    attention_vjp before its forward runs."""
    refused_like_a_modifier(rng, options, error, match)
    q, k, v = _draw(rng, "float32", (2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8))
    monkeypatch.setattr(_cpu, "forward", lambda p: pytest.fail("the forward ran"))
    with pytest.raises(error, match=match):
        cuflash.attention_vjp(q, k, v, **options)


def test_bias_dtypes_follow_q(rng):
    """float16/bfloat16 take their own dtype or float32; float32 and float64 only their own."""
    for dtype, good, bad in (("float16", ("float16", "float32"), ("bfloat16", "float64")),
                             ("bfloat16", ("bfloat16", "float32"), ("float16", "float64")),
                             ("float32", ("float32",), ("float16", "float64")),
                             ("float64", ("float64",), ("float32",))):
        q, k, v = _draw(rng, dtype, *[(1, 2, 4, 8)] * 3)
        for name in good:
            cuflash.attention(q, k, v, bias=numpy.zeros((4, 4), numpy.dtype(name)))
        for name in bad:
            with pytest.raises(TypeError, match=f"bias must be a float array of dtype {dtype}"):
                cuflash.attention(q, k, v, bias=numpy.zeros((4, 4), numpy.dtype(name)))


@pytest.mark.parametrize("value", [1, 0, None, "yes", numpy.array(True), 1.0])
def test_bias_grad_must_be_a_bool(rng, value, monkeypatch):
    q, k, v = _draw(rng, "float32", *[(1, 2, 4, 8)] * 3)
    bias = numpy.zeros((4, 4), numpy.float32)
    out, lse = cuflash.attention(q, k, v, bias=bias, return_lse=True)
    with pytest.raises(TypeError, match="bias_grad must be a bool"):
        cuflash.attention_backward(out, q, k, v, out, lse, bias=bias, bias_grad=value)
    with pytest.raises(TypeError, match="bias_grad must be a bool"):
        cuflash.attention_backward(out, q, k, v, out, lse, bias_grad=value)  # checked without a bias too
    monkeypatch.setattr(_cpu, "forward", lambda p: pytest.fail("the forward ran"))
    with pytest.raises(TypeError, match="bias_grad must be a bool"):
        cuflash.attention_vjp(q, k, v, bias=bias, bias_grad=value)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_out_must_not_overlap_bias_or_mask(rng, backend, monkeypatch):
    xp = numpy if backend == "cpu" else _cupy()
    q, k, v = (xp.asarray(x) for x in _draw(rng, "float32", *[(1, 2, 4, 4)] * 3))
    if backend == "gpu":
        _forbid_launches(monkeypatch)
    storage = xp.zeros((1, 2, 4, 4), xp.float32)
    with pytest.raises(ValueError, match="out must not share memory with bias"):
        cuflash.attention(q, k, v, bias=storage, out=storage)
    raw = xp.zeros(4 * 4 * 8, xp.uint8)
    out = raw.view(xp.float32).reshape(1, 2, 4, 4)
    with pytest.raises(ValueError, match="out must not share memory with mask"):
        cuflash.attention(q, k, v, mask=raw[:16].view(bool).reshape(4, 4), out=out)
    assert not bool(raw.any()) and not bool(storage.any())


# --- the GPU kernels (CuPy arrays) ----------------------------------------------------------------


def _on_gpu(*arrays):
    """CuPy copies of NumPy arrays."""
    cupy = _cupy()
    return [cupy.asarray(x) for x in arrays]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_bias_of_any_strides_and_broadcast_views(rng, dtype):
    """As on the CPU, on CuPy views: the compact bias, a stride-0 broadcast (cupy.broadcast_to),
    a transposed copy, and a view with an offset, a stride of 2 and a negative stride into a
    NaN-filled buffer give the same forward bit for bit; dbias of a full-shape view has the
    view's shape, one entry per element (the same for every layout), and sums back to the
    compact bias's gradient. The buffer around the view is never read nor written."""
    cupy = _cupy()
    q, k, v, dout = _on_gpu(*_draw(rng, dtype, (2, 3, 40, 16), (2, 3, 57, 16), (2, 3, 57, 16), (2, 3, 40, 16)))
    compact = cupy.asarray(rng.standard_normal((1, 3, 1, 57)).astype(numpy.float32))
    view = cupy.broadcast_to(compact, (2, 3, 40, 57))
    assert view.strides[0] == view.strides[2] == 0
    transposed = cupy.ascontiguousarray(view.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # keys the slow axis
    buffer = cupy.asarray(numpy.full((3, 6, 50, 130), numpy.nan, numpy.float32))
    strided = buffer[1:, ::2, 45:5:-1, 3:117:2]
    assert strided.shape == (2, 3, 40, 57) and strided.strides[2] < 0
    strided[...] = view
    buffer_bits = _bits(buffer)
    biases = (compact, view, transposed, strided)

    results = [cuflash.attention(q, k, v, bias=b, causal=True, return_lse=True) for b in biases]
    for out, lse in results[1:]:
        assert _bits(out) == _bits(results[0][0]) and _bits(lse) == _bits(results[0][1])
    out, lse = results[0]
    d_compact, d_view, d_transposed, d_strided = (
        cupy.asnumpy(cuflash.attention_backward(dout, q, k, v, out, lse, bias=b, causal=True, deterministic=True)[3])
        for b in biases)
    assert _bits(buffer) == buffer_bits, "the buffer around the strided bias changed"
    assert d_compact.shape == (1, 3, 1, 57)
    assert d_view.shape == d_transposed.shape == d_strided.shape == (2, 3, 40, 57)
    assert all(d.dtype == numpy.float32 for d in (d_compact, d_view, d_transposed, d_strided))
    numpy.testing.assert_array_equal(d_view, d_transposed)
    numpy.testing.assert_array_equal(d_view, d_strided)
    numpy.testing.assert_allclose(d_view.astype(numpy.float64).sum(axis=(0, 2), keepdims=True), d_compact,
                                  rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_rows_that_see_no_key_give_zero_the_sink_and_no_gradient(rng, dtype, sinks):
    """Rows left without a visible key by the caller's mask (alone, or with top-left causal, in
    the first and in a later block of queries) or by a bias of -inf: out 0, lse -inf (or the
    sink, to the rounding of lse's dtype), nothing NaN, no gradient through them, dbias 0 where
    masked; everything else against the reference."""
    lq, lk = 140, 150
    q, k, v, dout = _draw(rng, dtype, (2, 2, lq, 32), (2, 2, lk, 32), (2, 2, lk, 32), (2, 2, lq, 32))
    mask = rng.random((2, 2, lq, lk)) < 0.6
    mask[:, :, 4] = mask[:, :, 135] = False
    mask[1, 0, 7] = False
    bias = rng.standard_normal((2, 2, lq, lk)).astype(_bias_dtype(dtype, True))
    bias[0, 1, 9] = -numpy.inf
    lse_dtype = numpy.dtype(numpy.float64 if dtype == "float64" else numpy.float32)
    kwargs = dict(bias=bias, mask=mask, causal="top_left")
    if sinks:
        kwargs["sinks"] = numpy.array([0.5, -1.0], lse_dtype)
    out, lse, grads = check_against_reference(dtype, q, k, v, dout, gpu=True, **kwargs)
    empty = numpy.zeros((2, 2, lq), bool)
    empty[:, :, 4] = empty[:, :, 135] = empty[1, 0, 7] = empty[0, 1, 9] = True
    empty[..., 0] |= ~mask[..., 0, 0]  # top-left causal: row 0 sees key 0 only
    assert (out[empty] == 0).all()
    if sinks:
        expected = numpy.broadcast_to(kwargs["sinks"][None, :, None], (2, 2, lq))[empty]
        numpy.testing.assert_allclose(lse[empty], expected, rtol=4 * EPS[lse_dtype.name], atol=0)
    else:
        assert (lse[empty] == -numpy.inf).all()
    assert all(numpy.isfinite(x.astype(numpy.float64)).all() for x in (out, *grads))
    assert (grads[0][empty] == 0).all() and (grads[3][empty] == 0).all()
    assert (grads[3][~mask] == 0).all()  # dbias is 0 where masked


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_gpu_minus_infinity_bias_hides_keys_as_the_mask_does(rng, dtype):
    """A bias of 0 / -inf and the boolean mask it spells: the same out, lse, dq, dk and dv
    (deterministic backward), bit for bit in float32/float64; in bfloat16 within a few units of
    the last place of each result's largest entry, since Hopper's kernels add such a bias in the
    score MMA's accumulator and scale it with S, where the mask's body scales S first (one
    rounding apart; the hidden keys give exactly 0 either way: dbias there is 0)."""
    q, k, v, dout = _on_gpu(*_draw(rng, dtype, (2, 3, 130, 64), (2, 3, 150, 64), (2, 3, 150, 64), (2, 3, 130, 64)))
    host_mask = rng.random((2, 1, 130, 150)) < 0.5
    mask = _on_gpu(host_mask)[0]
    bias = _on_gpu(numpy.where(host_mask, 0.0, -numpy.inf).astype(_bias_dtype(dtype, True)))[0]

    def same(a, b):
        if dtype != "bfloat16":
            assert _bits(a) == _bits(b)
            return
        sixteen_bit = to_numpy(b).dtype.itemsize == 2
        a, b = to_numpy(a).astype(numpy.float64), to_numpy(b).astype(numpy.float64)
        assert (numpy.isinf(a) == numpy.isinf(b)).all() and (a[numpy.isinf(a)] == b[numpy.isinf(b)]).all()
        finite = numpy.isfinite(b)
        units = 4 * (2.0**-8 if sixteen_bit else 2.0**-23)  # four of bf16 (float32: lse)
        assert numpy.abs(a - b)[finite].max() <= units * numpy.abs(b)[finite].max()

    by_mask = cuflash.attention(q, k, v, mask=mask, causal=True, return_lse=True)
    by_bias = cuflash.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    for a, b in zip(by_mask, by_bias):
        same(a, b)
    grads_mask = cuflash.attention_backward(dout, q, k, v, *by_mask, mask=mask, causal=True, deterministic=True)
    grads_bias = cuflash.attention_backward(dout, q, k, v, *by_bias, bias=bias, causal=True, deterministic=True)
    assert len(grads_mask) == 3 and len(grads_bias) == 4
    for a, b in zip(grads_mask, grads_bias):
        same(a, b)
    dbias = to_numpy(grads_bias[3])
    assert (dbias[~numpy.broadcast_to(host_mask, dbias.shape)] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_gpu_hidden_nan_in_bias_does_not_leak(rng, dtype):
    """A NaN bias entry behind the caller's mask (keys 5 and 170: in key tiles with visible keys)
    takes no part in any row: out, lse and every gradient are the clean call's bits, and dbias is
    exactly 0 where masked. (A NaN *value* row is another matter on the GPU: it reaches every
    query through P V's products, 0 x NaN, as in any tensor-core implementation; the CPU backend
    selects hidden pairs away instead.)"""
    q, k, v, dout = _draw(rng, dtype, (1, 2, 150, 64), (1, 2, 300, 64), (1, 2, 300, 64), (1, 2, 150, 64))
    hidden = [5, 170]
    mask = numpy.ones((1, 2, 150, 300), bool)
    mask[..., hidden] = False
    bias = rng.standard_normal((1, 2, 150, 300)).astype(_bias_dtype(dtype, True))
    dirty = bias.copy()
    dirty[..., hidden] = numpy.nan
    q, k, v, dout, bias, dirty, mask = _on_gpu(q, k, v, dout, bias, dirty, mask)
    results = []
    for b in (bias, dirty):
        out, lse = cuflash.attention(q, k, v, bias=b, mask=mask, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, bias=b, mask=mask, deterministic=True)
        results.append((out, lse) + tuple(grads))
    for a, b in zip(*results):
        assert _bits(a) == _bits(b)
    dbias = to_numpy(results[1][5])
    assert (dbias[..., hidden] == 0).all() and numpy.isfinite(dbias).all()


def test_key_padding_split_applies_to_the_mask_alone():
    """The plain Variants take a key-padding mask's prefix rows only when the mask is the call's
    only score modifier (plan._splits_key_padding): a bias or softcap keeps every row on the
    modifier kernels; masks that differ per query or per head are not cut."""
    from types import SimpleNamespace

    from cuflash._gpu import plan

    call = dict(mask=numpy.ones((3, 1, 1, 10), bool), packed=None, lead_shape=(3, 2), bias=None, softcap=None,
                alibi_slopes=None, dropout_seed=None)
    assert plan._splits_key_padding(SimpleNamespace(**call))
    assert plan._splits_key_padding(SimpleNamespace(**{**call, "mask": numpy.ones(10, bool)}))
    assert not plan._splits_key_padding(SimpleNamespace(**{**call, "bias": numpy.zeros(10)}))
    assert not plan._splits_key_padding(SimpleNamespace(**{**call, "softcap": 5.0}))
    assert not plan._splits_key_padding(SimpleNamespace(**{**call, "dropout_seed": 7}))  # (only kScoreMods drops)
    for per_row in (numpy.ones((3, 1, 4, 10), bool), numpy.ones((3, 2, 1, 10), bool)):
        assert not plan._pads_keys(SimpleNamespace(**{**call, "mask": per_row}))


@pytest.mark.gpu
def test_gpu_key_bounds_encode_each_rows_cut_and_whether_the_cut_alone_is_its_mask(rng):
    """cuda_src/key_bounds.cu through plan.ScoreInputs, as every call prepares its mask:
    per attention row, C order over the output's leading axes, the last visible key + 1 where
    the visible keys are a prefix (the plain kernels take the row), ~cut where a key before the
    cut is hidden (the modifier kernels take it), 0 where no key is visible; also through a
    strided view of the mask (a copy laid out for the kernels) and a (Lk,) mask (every row)."""
    import cupy

    from cuflash import _spec
    from cuflash._gpu import plan

    mask = numpy.zeros((3, 1, 1, 10), bool)  # batch 0: keys 0-6; 1: none; 2: 0-3 and 8 (holes)
    mask[0, ..., :7] = True
    mask[2, ..., :4] = True
    mask[2, ..., 8] = True
    q, k, v = _on_gpu(*_draw(rng, "float16", (3, 2, 5, 16), (3, 2, 10, 16), (3, 2, 10, 16)))
    wide = numpy.zeros((3, 1, 1, 20), bool)
    wide[..., ::2] = mask  # the same mask every other key: a view with key stride 2
    for m, expected in ((_on_gpu(mask)[0], [7, 7, 0, 0, ~9, ~9]), (_on_gpu(wide)[0][..., ::2], [7, 7, 0, 0, ~9, ~9]),
                        (_on_gpu(mask[0, 0, 0])[0], [7] * 6)):
        pointers, kept = plan.ScoreInputs(_spec.resolve_forward(q, k, v, mask=m)).prepare(plan.CUPY_MEMORY, None, m)
        bounds = kept[2]
        assert pointers[2] == bounds.data.ptr and pointers[3] == 0  # (a key-padding mask has no tile spans)
        assert bounds.dtype == cupy.int32 and bounds.shape == (6,)
        numpy.testing.assert_array_equal(cupy.asnumpy(bounds), expected)


from test_merge import pipeline  # noqa: E402,F401  (the fixture: test_pipeline's NVRTC check and PTX probe reader)


def _bias_grad_launches(dscores, shape, dtype, **cut):
    """dbias as cuda_src/bias_grad.cu computes it, step for step in NumPy, from the launches
    bias_grad.passes describes (``cut``: its split_below and min_chunk): per entry, the kept axes'
    offset, then the summed axes' terms in C order (the innermost in the inner loop, the others
    as an odometer), in float64."""
    from cuflash._gpu import bias_grad

    summed, dims = dscores.reshape(-1), bias_grad.DIMS
    for out_dtype, params, entries in bias_grad.passes(dscores.shape, shape, dtype, dscores.dtype, **cut):
        kept_shape, kept_stride, summed_shape, summed_stride = (
            params[name].tolist() for name in ("kept_shape", "kept_stride", "summed_shape", "summed_stride"))
        out = numpy.empty(entries, out_dtype)
        for entry in range(entries):
            start, rest = 0, entry
            for d in reversed(range(dims)):
                start, rest = start + rest % kept_shape[d] * kept_stride[d], rest // kept_shape[d]
            total, at, index = 0.0, 0, [0] * (dims - 1)
            for _ in range(0, int(params["terms"]), summed_shape[-1]):
                total += sum(float(summed[start + at + i * summed_stride[-1]]) for i in range(summed_shape[-1]))
                for d in reversed(range(dims - 1)):
                    at, index[d] = at + summed_stride[d], index[d] + 1
                    if index[d] < summed_shape[d]:
                        break
                    at, index[d] = at - summed_stride[d] * summed_shape[d], 0
            out[entry] = numpy.float64(total).astype(dscores.dtype)
        summed = out
    return summed.reshape(shape)


@pytest.mark.parametrize("grad_shape, shape", [
    ((2, 3, 4, 5), (1, 3, 4, 5)),        # over the batch (AlphaFold's pair bias, Swin's windows)
    ((2, 3, 4, 5), (3, 1, 5)),           # over the batch and the queries: kept and summed alternate
    ((2, 3, 4, 5), (4, 1)),              # over the keys too
    ((2, 1, 4, 5), (1, 1, 1, 5)),        # a unit axis of dS
    ((2, 3, 4, 5), ()),                  # a scalar bias: every score
    ((2, 3, 4, 5), (2, 3, 4, 5)),        # nothing summed: rounded only (16-bit) or dS itself
    ((2,) * 18, (2, 1) * 9),             # nine summed groups: two passes
    ((3, 2) * 9, (1, 2) * 9),
])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bias_grad_passes_sum_over_the_broadcast_axes(rng, grad_shape, shape, dtype):
    """bias_grad.passes (the launches of cuda_src/bias_grad.cu that turn dS into dbias), followed
    step for step on the host: the sum over the axes along which the bias was broadcast, in
    bias's shape, one launch unless more than DIMS - 1 summed groups alternate with kept ones;
    none where dS already is dbias."""
    from cuflash._gpu import bias_grad, plan

    dscores = rng.standard_normal(grad_shape).astype(numpy.float32)
    launches = bias_grad.passes(grad_shape, shape, dtype, numpy.float32)
    axes = plan._broadcast_axes(grad_shape, shape)
    assert len(launches) == (0 if not axes and dtype == "float32" else 1 + (len(grad_shape) > 16))
    got = _bias_grad_launches(dscores, shape, dtype) if launches else dscores.reshape(shape)
    want = dscores.astype(numpy.float64).sum(axis=axes, keepdims=True).reshape(shape)
    assert got.shape == shape and got.dtype == (numpy.dtype(dtype) if launches else numpy.float32)
    # one rounding to dtype (two for bfloat16: float64 -> float32 -> bfloat16), float32 roundings
    # of partial sums between passes
    magnitude = numpy.abs(dscores).astype(numpy.float64).sum(axis=axes, keepdims=True).reshape(shape)
    eps = float(numpy.finfo(numpy.float32).eps) if dtype == "float32" else 2.0**-8
    assert (numpy.abs(got.astype(numpy.float64) - want) <= 2 * eps * numpy.abs(want) + 4e-7 * magnitude).all()


@pytest.mark.parametrize("grad_shape, shape, cut, launches", [
    ((2, 3, 40, 6), (2, 1, 1, 6), dict(split_below=64, min_terms=100, min_chunk=8), 2),     # a key-padding-like bias
    ((2, 3, 40, 6), (1, 1, 1, 6), dict(split_below=64, min_terms=100, min_chunk=8), 2),     # batch and heads and queries
    ((4, 30, 5), (4, 1, 5), dict(split_below=1000, min_terms=30, min_chunk=4), 2),  # no divisor reaches 1000: the largest
    ((3, 2, 7, 5), (3, 1, 1, 5), dict(split_below=1000, min_terms=1, min_chunk=8), 1),  # a 14-term group: no chunk of 8
    ((2, 3, 40, 6), (), dict(split_below=64, min_terms=100, min_chunk=8), 2),               # a scalar bias
    ((8, 3, 20, 2, 6), (1, 3, 1, 2, 1), dict(split_below=64, min_terms=100, min_chunk=4), 2),  # summed and kept alternate
])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bias_grad_passes_cut_a_long_sum_over_few_entries(rng, grad_shape, shape, cut, launches, dtype):
    """Few dbias entries and many terms each (one thread per entry): bias_grad.passes cuts the
    longest summed group, a first pass summing chunks of it, a second the chunks' sums, in a
    fixed order; followed step for step on the host as above."""
    from cuflash._gpu import bias_grad, plan

    dscores = rng.standard_normal(grad_shape).astype(numpy.float32)
    assert len(bias_grad.passes(grad_shape, shape, dtype, numpy.float32, **cut)) == launches
    axes = plan._broadcast_axes(grad_shape, shape)
    got = _bias_grad_launches(dscores, shape, dtype, **cut)
    want = dscores.astype(numpy.float64).sum(axis=axes, keepdims=True).reshape(shape)
    magnitude = numpy.abs(dscores).astype(numpy.float64).sum(axis=axes, keepdims=True).reshape(shape)
    eps = float(numpy.finfo(numpy.float32).eps) if dtype == "float32" else 2.0**-8
    assert got.shape == shape and got.dtype == numpy.dtype(dtype)
    assert (numpy.abs(got.astype(numpy.float64) - want) <= 2 * eps * numpy.abs(want) + 4e-7 * magnitude).all()


def test_bias_grad_cut_leaves_short_sums_in_one_launch():
    """Below MIN_TERMS terms an entry's sum is short: no second launch for it."""
    from cuflash._gpu import bias_grad

    assert len(bias_grad.passes((2, 2, 97, 130), (2, 1, 1, 130), "bfloat16", numpy.float32)) == 1


def test_bias_grad_cut_gives_the_gpu_threads():
    """At the default threshold a (2, 1, 1, 4096) bias's gradient over 16 heads x 4096 queries
    runs on 65536 threads in its first pass, each summing 8192 terms (before the cut: 8192
    threads of 65536 terms)."""
    from cuflash._gpu import bias_grad

    first, second = bias_grad.passes((2, 16, 4096, 4096), (2, 1, 1, 4096), "bfloat16", numpy.float32)
    assert first[2] == 1 << 16 and int(first[1]["terms"]) == 8192
    assert second[2] == 2 * 4096 and int(second[1]["terms"]) == 8 and second[0] == numpy.dtype("bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_a_long_sum_over_few_entries_is_cut_and_reproducible(rng, dtype):
    """A (B, 1, 1, Lk) bias over 4 heads x 1100 queries (4400 terms per entry, 194 entries): at
    the default threshold its gradient takes the cut's two launches; against the float64
    reference, and the deterministic backward bit for bit three times."""
    from cuflash._gpu import bias_grad

    q, k, v, dout = _draw(rng, dtype, (2, 4, 1100, 32), (2, 4, 97, 32), (2, 4, 97, 32), (2, 4, 1100, 32))
    bias = rng.standard_normal((2, 1, 1, 97)).astype(_bias_dtype(dtype, wide=True))
    assert len(bias_grad.passes((2, 4, 1100, 97), bias.shape, bias.dtype, numpy.float32)) == 2
    check_against_reference(dtype, q, k, v, dout, bias=bias, gpu=True, deterministic=True)
    gq, gk, gv, gdout, gbias = _on_gpu(q, k, v, dout, bias)
    out, vjp = cuflash.attention_vjp(gq, gk, gv, bias=gbias, deterministic=True)
    first = [_bits(g) for g in vjp(gdout)]
    for _ in range(3):
        assert [_bits(g) for g in vjp(gdout)] == first


def test_bias_grad_kernel_compiles_offline_without_spills_and_its_struct_is_mirrored(pipeline):
    """cuda_src/bias_grad.cu for every bias dtype, sm_80 and sm_90a, through NVRTC without a GPU:
    no spills, no stack (the odometer stays in registers); BiasGradParams as bias_grad.PARAMS_DTYPE."""
    from cuflash._gpu import bias_grad, kernels, params

    for arch in ("80", "90a"):
        for dtype in DTYPES:
            build = kernels.compile_offline(bias_grad.kernel(dtype, arch))
            assert 0 < build.registers <= 255 and build.spill_bytes == 0 and build.stack_bytes == 0, build.log
    spec, mirror = bias_grad.kernel("float32", "80"), bias_grad.PARAMS_DTYPE
    source = kernels.kernel_source(spec) + "\n" + params.layout_probe_source("cuflash::BiasGradParams", mirror)
    offsets = pipeline._ptx_stored_constants(source, kernels.compile_options(spec) + ("-arch=compute_80",))
    assert offsets == {0: mirror.itemsize, **{i: mirror.fields[name][1] for i, name in enumerate(mirror.names, 1)}}


def _spelled_mask(kind, lq, lk, batch=2):
    """A (batch, 1, lq, lk) mask spelling a rule whose hidden tiles the tile spans skip: "causal"
    (bottom-right, as a mask), "band" (keys within 100 of the diagonal), "documents" (a packed
    batch's sequences, causal within each; a different cut per batch row), "sparse" (random
    visible pairs in a few 64 x 64 tiles only, the rest hidden whole; a query row with none)."""
    i, j = numpy.arange(lq)[:, None], numpy.arange(lk)[None, :]
    diag = lk - lq
    if kind == "causal":
        mask = numpy.broadcast_to(j <= i + diag, (batch, lq, lk))
    elif kind == "band":
        mask = numpy.broadcast_to(abs(j - i - diag) <= 100, (batch, lq, lk))
    elif kind == "documents":
        planes = []
        for b in range(batch):
            starts = numpy.sort(numpy.random.default_rng(b).choice(numpy.arange(1, min(lq, lk)), 3, replace=False))
            doc_q, doc_k = (numpy.searchsorted(starts, numpy.arange(n), "right") for n in (lq, lk))
            planes.append((doc_q[:, None] == doc_k[None, :]) & (j <= i))
        mask = numpy.stack(planes)
    else:
        rng = numpy.random.default_rng(7)
        tiles = rng.random((batch, -(-lq // 64), -(-lk // 64))) < 0.2
        mask = tiles.repeat(64, 1).repeat(64, 2)[:, :lq, :lk] & (rng.random((batch, lq, lk)) < 0.5)
        mask[:, min(5, lq - 1)] = False
    return numpy.ascontiguousarray(mask[:, None])


def test_which_masks_get_tile_spans():
    """plan._maps_mask_tiles: a mask over queries and keys, shared by the heads, of at least
    MASK_TILES_MIN queries and keys; not a key-padding mask (its cut serves), not one per head (a
    dK/dV block walks its group's heads with one span), not a short one, not without a mask."""
    from cuflash._gpu import plan

    q, k = numpy.zeros((2, 4, 200, 8), numpy.float16), numpy.zeros((2, 2, 333, 8), numpy.float16)
    def maps(mask, q=q, k=k):
        return plan._maps_mask_tiles(_spec.resolve_forward(q, k, k, mask=mask))
    assert maps(numpy.ones((2, 1, 200, 333), bool)) and maps(numpy.ones((200, 333), bool))
    assert maps(numpy.ones((1, 1, 200, 1), bool))  # (constant along the keys: still 2-D in the rule)
    assert not maps(numpy.ones((2, 4, 200, 333), bool))  # one per head
    assert not maps(numpy.ones((2, 1, 1, 333), bool))  # key padding
    assert not maps(numpy.ones((2, 1, 100, 333), bool), q=q[:, :, :100])  # fewer than 128 queries
    assert not plan._maps_mask_tiles(_spec.resolve_forward(q, k, k))


def _tile_spans(mask, tile=64):
    """plan._mask_spans' result for a (planes, Lq, Lk) mask, in NumPy: per plane, each row group's
    [first, last) key tiles with a visible pair ((cols, 0) for none), then each key group's query
    tiles as (rows - first, last) ((0, 0) for none)."""
    planes, lq, lk = mask.shape
    rows, cols = -(-lq // tile), -(-lk // tile)
    padded = numpy.zeros((planes, rows * tile, cols * tile), bool)
    padded[:, :lq, :lk] = mask
    seen = padded.reshape(planes, rows, tile, cols, tile).any(axis=(2, 4))
    spans = []
    for plane in seen:
        for g in range(rows):
            hits = numpy.flatnonzero(plane[g])
            spans += [hits[0], hits[-1] + 1] if hits.size else [cols, 0]
        for t in range(cols):
            hits = numpy.flatnonzero(plane[:, t])
            spans += [rows - hits[0], hits[-1] + 1] if hits.size else [0, 0]
    return numpy.array(spans, numpy.int32)


@pytest.mark.gpu
def test_gpu_mask_tile_spans_bound_the_tiles_holding_a_visible_pair(rng):
    """cuda_src/mask_tiles.cu through plan.ScoreInputs, as every call prepares a 2-D mask: per
    distinct mask plane (the batch's two here; heads share theirs), over 64 x 64 tiles, each row
    group's span of key tiles with a visible pair and each key group's span of query tiles (the
    same every run: built by atomicMax); also through a strided view of the mask (a copy laid out
    for the kernels), and for a mask whose rows or groups see nothing."""
    from cuflash._gpu import plan

    mask = _spelled_mask("sparse", 200, 333)
    q, k = _on_gpu(*_draw(rng, "float16", (2, 4, 200, 16), (2, 2, 333, 16)))
    wide = numpy.zeros((2, 1, 200, 666), bool)
    wide[..., ::2] = mask
    none = numpy.zeros_like(mask)
    for m, want in ((_on_gpu(mask)[0], _tile_spans(mask[:, 0])), (_on_gpu(wide)[0][..., ::2], _tile_spans(mask[:, 0])),
                    (_on_gpu(none)[0], _tile_spans(none[:, 0]))):
        for _ in range(2):
            pointers, kept = plan.ScoreInputs(_spec.resolve_forward(q, k, k, mask=m)).prepare(plan.CUPY_MEMORY, None, m)
            spans = kept[3]
            assert pointers[3] == spans.data.ptr and pointers[2] == 0
            numpy.testing.assert_array_equal(to_numpy(spans), want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1025, 1025), (200, 1025), (1025, 333)], ids=["square", "fewer-queries", "fewer-keys"])
@pytest.mark.parametrize("kind", ["causal", "band", "documents", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_masks_spelling_a_rule_skip_its_hidden_tiles(rng, dtype, kind, shape, monkeypatch):
    """A 2-D mask that spells a rule (a causal pattern, a band, a packed batch's documents, a few
    visible tiles) gets tile spans, and the kernels skip the tiles it hides whole outside them,
    forward, dQ and dK/dV: the results stay the reference's (GQA 4/2, a bias with its gradient beside the mask,
    rows and keys that see nothing), and the deterministic backward is bitwise reproducible."""
    from cuflash._gpu import plan

    made = []
    real = plan._mask_spans
    monkeypatch.setattr(plan, "_mask_spans", lambda *args: made.append(1) or real(*args))
    lq, lk = shape
    q, k, v, dout = _draw(rng, dtype, (2, 4, lq, 64), (2, 2, lk, 64), (2, 2, lk, 64), (2, 4, lq, 64))
    mask = _spelled_mask(kind, lq, lk)
    bias = rng.standard_normal((1, 4, lq, lk)).astype(_bias_dtype(dtype, True))
    check_against_reference(dtype, q, k, v, dout, gpu=True, mask=mask, bias=bias, deterministic=True)
    assert made, "no tile spans were made"
    gq, gk, gv, gdout, gmask, gbias = _on_gpu(q, k, v, dout, mask, bias)
    out, lse = cuflash.attention(gq, gk, gv, mask=gmask, return_lse=True)
    runs = [[_bits(g) for g in cuflash.attention_backward(gdout, gq, gk, gv, out, lse, mask=gmask, deterministic=True)]
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_mask_tiles_kernel_compiles_offline_without_spills():
    """cuda_src/mask_tiles.cu for sm_80 and sm_90a through NVRTC without a GPU: no spills, no stack."""
    from cuflash._gpu import kernels, plan
    from cuflash._gpu.variant import HelperKernel

    for arch in ("80", "90a"):
        build = kernels.compile_offline(HelperKernel("mask_tiles", "mask_tiles", None, arch, plan._MASK_TILES_THREADS))
        assert 0 < build.registers <= 255 and build.spill_bytes == 0 and build.stack_bytes == 0, build.log


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["atomic", "causal-deterministic"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_key_padding_mask_cuts_each_rows_keys(rng, dtype, causal):
    """A key-padding mask ((B, 1, 1, Lk)) cuts each row's keys at its last visible one: K and V
    past it are never read (NaN there reaches nothing), their dK/dV are 0, a batch that sees no
    key gives out 0, lse -inf and no gradient. Rows whose visible keys are a prefix run the plain
    kernels, a row with holes before its cut the modifier ones, in the same call; both equal the
    same mask given in full (B, H, Lq, Lk), which takes the general path (bfloat16: the two calls
    against each other; float32: each against the float64 reference; GQA: 4 query heads on 2 key
    heads; the causal call's backward is the deterministic one)."""
    cuts = [0, 77, 1, 200, 257]
    mask = numpy.arange(257)[None, None, None, :] < numpy.array(cuts)[:, None, None, None]
    mask[3, ..., [5, 130]] = False  # holes before the cut: batch 3 is not a prefix
    q, k, v, dout = _draw(rng, dtype, (5, 4, 97, 64), (5, 2, 257, 64), (5, 2, 257, 64), (5, 4, 97, 64))
    dirty_k, dirty_v = k.copy(), v.copy()
    for b, n in enumerate(cuts):
        k[b, :, n:] = 0
        v[b, :, n:] = 0
        dirty_k[b, :, n:] = numpy.nan
        dirty_v[b, :, n:] = numpy.nan
    full = numpy.broadcast_to(mask, (5, 4, 97, 257)).copy()
    options = dict(causal=causal)
    results = []
    for keys, values, m in ((dirty_k, dirty_v, mask), (k, v, full)):
        gq, gk, gv, gdout, gm = _on_gpu(q, keys, values, dout, m)
        out, lse = cuflash.attention(gq, gk, gv, mask=gm, return_lse=True, **options)
        grads = cuflash.attention_backward(gdout, gq, gk, gv, out, lse, mask=gm, deterministic=causal, **options)
        results.append([to_numpy(x) for x in (out, lse) + tuple(grads)])
    (out, lse, dq, dk, dv), want = results
    for name, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
        assert numpy.isfinite(x.astype(numpy.float64)).all(), f"{name} is not finite"
    assert (out[0] == 0).all() and (lse[0] == -numpy.inf).all() and (dq[0] == 0).all()
    for b, n in enumerate(cuts):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()
    if dtype == "float32":
        # Each call against the float64 reference under tests/tolerance.py's rule, not against
        # each other: they run different kernels (on Hopper the prefix rows' gradients are
        # 3xTF32's, the full mask's FFMA's), and where a gradient's terms cancel (batch 2's one
        # key: dS = P (dP - delta) = 0) each is its own rounding of 0, held to the terms' size.
        ref_out, ref_lse, ref_grads = score_mods_ref(q, k, v, dout, mask=full, **options)
        size_out, _, size_grads = score_mods_ref(q, k, v, dout, mask=full, magnitudes=True, **options)
        for call, result in zip(("key-padding mask", "full mask"), results):
            assert_close(result[0], ref_out, dtype=dtype, magnitude=size_out, name=f"{call}: out")
            assert_close(result[1], ref_lse, dtype=dtype, kind="lse", name=f"{call}: lse")
            for name, got, ref, size in zip(("dq", "dk", "dv"), result[2:], ref_grads, size_grads):
                assert_close(got, ref, dtype=dtype, magnitude=size, kind="grad", name=f"{call}: {name}")
        return
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        numpy.testing.assert_allclose(got.astype(numpy.float64), ref.astype(numpy.float64), err_msg=name,
                                      rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_shape", [(1, 4, 300, 517), (1, 4, 1, 517)], ids=["over-batch", "over-batch-and-queries"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_backward_is_bitwise_reproducible(rng, dtype, bias_shape):
    """The same deterministic backward fifty times: every gradient, dbias of a bias broadcast
    over the batch (and over three blocks of queries) included, bit for bit."""
    cupy = _cupy()
    q, k, v, dout = _on_gpu(*_draw(rng, dtype, (2, 4, 300, 64), (2, 2, 517, 64), (2, 2, 517, 64), (2, 4, 300, 64)))
    bias, mask, sinks = _on_gpu(rng.standard_normal(bias_shape).astype(numpy.float32),
                                _mask(rng, (2, 1, 1, 517), "keypad"), rng.standard_normal(4).astype(numpy.float32))
    out, vjp = cuflash.attention_vjp(q, k, v, bias=bias, mask=mask, causal=True, softcap=3.0, sinks=sinks,
                                     deterministic=True)
    first = vjp(dout)
    assert len(first) == 5 and isinstance(first[3], cupy.ndarray)
    assert first[3].shape == bias_shape and first[3].dtype == numpy.float32
    first = [_bits(g) for g in first]
    for _ in range(49):
        assert [_bits(g) for g in vjp(dout)] == first


# (the output's leading axes, the bias's leading axes): over the batch; over MSA rows with a
# batch axis kept; a 2-D bias (every row); one plane per row (nothing shared); a bias of heads only.
PLANE_CASES = [((6, 4), (1, 4)), ((3, 5, 2), (3, 1, 2)), ((4, 3), ()), ((2, 3), (2, 3)), ((2, 3, 4), (4,))]


@pytest.mark.parametrize("lead, planes_lead", PLANE_CASES, ids=[f"{a}-{b}" for a, b in PLANE_CASES])
def test_the_on_chip_dbias_route_groups_each_planes_rows_in_a_fixed_order(lead, planes_lead):
    """plan._plane_of_rows (the adds' plane per row, BwdParams::dbias_planes) and _rows_by_plane
    (bwd_dbias_tc's row list): the plane each row reads, planes in the bias's C order (dbias's);
    the rows of each plane, ascending within a plane; _chunks cuts a plane's rows into non-empty
    chunks that cover them."""
    from cuflash._gpu import plan

    rows, planes = plan._rows_by_plane(lead, planes_lead)
    plane_ids = numpy.arange(int(numpy.prod(planes_lead, dtype=numpy.int64))).reshape(planes_lead)
    plane_of_row = numpy.broadcast_to(plane_ids, lead).reshape(-1)  # row r reads plane plane_of_row[r]
    assert planes == plane_ids.size and rows.dtype == numpy.int32
    plane_of, planes_again = plan._plane_of_rows(lead, planes_lead)
    assert planes_again == planes and plane_of.dtype == numpy.int32 and plane_of.tolist() == plane_of_row.tolist()
    assert rows.tolist() == [r for j in range(planes) for r in numpy.flatnonzero(plane_of_row == j)]
    for per_plane in (1, 2, 7, 64, 255):
        for wanted in (0, 1, 3, 8, 1000):
            chunk_rows, chunks = plan._chunks(per_plane, wanted)
            assert 1 <= chunks <= max(1, min(wanted, per_plane)) and chunk_rows >= 1
            assert (chunks - 1) * chunk_rows < per_plane <= chunks * chunk_rows


SHARED_LEADS = [  # (q's leading axes, bias shape, Lq, Lk, packed, the bias's planes' shape or None)
    ((1, 8, 4), (1, 1, 4, 5, 7), 5, 7, False, (1, 1, 4)),  # triangle: shared by the rows
    ((8, 4), (4, 5, 7), 5, 7, False, (4,)),  # fewer axes than q's: right-aligned
    ((8, 4), (5, 7), 5, 7, False, ()),  # one plane for every row
    ((8, 4), (8, 4, 5, 7), 5, 7, False, None),  # a plane per row: dS is dbias
    ((8, 4), (1, 4, 1, 7), 5, 7, False, None),  # broadcast over the queries
    ((8, 4), (1, 4, 5, 1), 5, 7, False, None),  # ... over the keys
    ((8, 4), (1, 4, 5, 7), 5, 7, True, None),  # packed (varlen)
    ((4,), (1, 1, 5, 7), 5, 7, False, None),  # more axes than q's
]


class _SharedProblem:  # the fields of a problem that plan._shared_bias_lead and _SharedBiasAdds.of read
    def __init__(self, lead, bias_shape, lq, lk, packed, deterministic=False, returns_dbias=True):
        self.lead_shape, self.bias, self.seqlen_q, self.seqlen_k = lead, numpy.zeros(bias_shape), lq, lk
        self.packed, self.deterministic, self.returns_dbias = (object() if packed else None), deterministic, returns_dbias


@pytest.mark.parametrize("lead, bias_shape, lq, lk, packed, planes", SHARED_LEADS,
                         ids=[f"{c[0]}-bias{c[1]}-packed{c[4]}" for c in SHARED_LEADS])
def test_which_biases_share_their_planes(lead, bias_shape, lq, lk, packed, planes):
    """plan._shared_bias_lead: the bias's leading axes where it is full along the queries and keys
    and its planes are shared by several rows (the adds' and bwd_dbias_tc's routes), else None;
    _SharedBiasAdds.of declines the deterministic backward, a call without dbias, and planes shared
    by more rows than SHARED_BIAS_ADDS_MAX_ROWS."""
    from cuflash._gpu import plan

    assert plan._shared_bias_lead(_SharedProblem(lead, bias_shape, lq, lk, packed)) == planes
    sets = [(_Dkdv("bwd_dkdv_tc"), None)]
    assert plan._SharedBiasAdds.of(_SharedProblem(lead, bias_shape, lq, lk, packed, deterministic=True), sets) is None
    assert plan._SharedBiasAdds.of(_SharedProblem(lead, bias_shape, lq, lk, packed, returns_dbias=False), sets) is None
    if planes is not None:
        # bwd_dkdv_tc's d256 compiles no adds (kDbiasFromDs): its calls keep the other routes
        wide = [(_Dkdv("bwd_dkdv_tc", 256), None)]
        assert plan._SharedBiasAdds.of(_SharedProblem(lead, bias_shape, lq, lk, packed), wide) is None
        rows_per_plane = int(numpy.prod(lead)) // int(numpy.prod(planes, dtype=numpy.int64))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(plan, "SHARED_BIAS_ADDS_MAX_ROWS", rows_per_plane - 1)
            assert plan._SharedBiasAdds.of(_SharedProblem(lead, bias_shape, lq, lk, packed), sets) is None


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["on-chip", "adds"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_a_shared_bias_gradient_needs_no_buffer_of_every_rows_scores(rng, dtype, route, monkeypatch):
    """Triangle attention's shape (32 rows x 4 heads of 384 residues sharing a (1, 4, 384, 384)
    pair bias): dbias summed on chip (bwd_dbias_tc, deterministic) or added per plane by the
    dK/dV kernels (the default backward) keeps the backward's peak memory well below one (rows,
    heads, N, N) fp32 dS buffer, which the buffer route needs; the gradients are within the
    reference's rule (odd lengths, causal, a mask), the deterministic ones bitwise reproducible."""
    cupy = _cupy()
    from cuflash._gpu import plan

    monkeypatch.setattr(plan, "ON_CHIP_DBIAS_MIN_BYTES", 0)  # the route at any size (it starts at 1 GiB)
    deterministic = route == "on-chip"
    rows, heads, n, d = 32, 4, 384, 32
    q, k, v, dout = _on_gpu(*_draw(rng, dtype, *[(rows, heads, n, d)] * 4))
    bias = _on_gpu(rng.standard_normal((1, heads, n, n)).astype(numpy.float32))[0]
    out, lse = cuflash.attention(q, k, v, bias=bias, return_lse=True)
    pool = cupy.get_default_memory_pool()
    peak = [0]

    def tracking_malloc(size):
        memory = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory

    cupy.cuda.Device().synchronize()
    base = pool.used_bytes()
    plan.PLANS.clear()
    cupy.cuda.set_allocator(tracking_malloc)
    try:
        grads = [_bits(g) for g in cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias,
                                                              deterministic=deterministic)]
        first_peak = peak[0] - base
        again = [_bits(g) for g in cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias,
                                                              deterministic=deterministic)]  # a replay
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    score_buffer = rows * heads * n * n * 4
    assert first_peak < score_buffer / 2, (first_peak, score_buffer)
    routes = [type(entry.dbias[4]).__name__ for entry in list(plan.PLANS.values()) if getattr(entry, "dbias", None)]
    assert routes == ["_OnChipBiasSum" if deterministic else "_SharedBiasAdds"], routes
    if deterministic:
        assert grads == again
    # Odd lengths, causal, a mask and a second batch axis, against the reference.
    arrays = _draw(rng, dtype, (3, 5, 2, 97, 32), (3, 5, 2, 130, 32), (3, 5, 2, 130, 32), (3, 5, 2, 97, 32))
    check_against_reference(dtype, *arrays, bias=rng.standard_normal((3, 1, 2, 97, 130)).astype(numpy.float32),
                            mask=_mask(rng, (1, 5, 1, 97, 130), "holes"), causal=True, gpu=True,
                            deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_gradient_order_and_bias_grad(rng):
    """(dq, dk, dv), then dbias when bias is given and bias_grad is true, then dsinks; through
    attention_backward and attention_vjp alike (deterministic: the same bits call after call)."""
    cupy = _cupy()
    q, k, v, dout = _on_gpu(*_draw(rng, "float32", (2, 4, 70, 64), (2, 2, 90, 64), (2, 2, 90, 64), (2, 4, 70, 64)))
    bias = _on_gpu(rng.standard_normal((2, 1, 70, 90)).astype(numpy.float32))[0]
    sinks = _on_gpu(numpy.array([0.1, 0.2, -0.3, 0.4], numpy.float32))[0]
    out, lse = cuflash.attention(q, k, v, bias=bias, sinks=sinks, return_lse=True)
    backward = dict(bias=bias, sinks=sinks, deterministic=True)
    full = cuflash.attention_backward(dout, q, k, v, out, lse, **backward)
    assert all(isinstance(g, cupy.ndarray) for g in full)
    assert [g.shape for g in full] == [q.shape, k.shape, v.shape, bias.shape, sinks.shape]
    assert [g.dtype for g in full] == [numpy.dtype(numpy.float32)] * 5
    without = cuflash.attention_backward(dout, q, k, v, out, lse, bias_grad=False, **backward)
    assert len(without) == 4
    for a, b in zip(full[:3] + full[4:], without):
        assert _bits(a) == _bits(b)
    assert len(cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, bias_grad=numpy.bool_(False))) == 3
    assert len(cuflash.attention_backward(dout, q, k, v, out, lse, mask=bias > 0, bias_grad=True)) == 3
    vjp_out, vjp = cuflash.attention_vjp(q, k, v, bias=bias, sinks=sinks, deterministic=True)
    assert _bits(vjp_out) == _bits(out)
    for a, b in zip(vjp(dout), full):
        assert _bits(a) == _bits(b)
    assert len(cuflash.attention_vjp(q, k, v, bias=bias, bias_grad=False)[1](dout)) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_out_is_written_in_place_with_bias_and_mask(rng, dtype):
    """out= a view into a NaN-poisoned buffer: written in full (a fully masked row with 0s),
    nothing outside it, the same bits as a fresh output."""
    shape, guard = (2, 3, 37, 24), 131
    q, k, v = _on_gpu(*_draw(rng, dtype, shape, (2, 3, 53, 24), (2, 3, 53, 24)))
    bias, mask = _on_gpu(rng.standard_normal((3, 37, 53)).astype(_bias_dtype(dtype, True)),
                         _mask(rng, (37, 53), "holes"))
    size = int(numpy.prod(shape))
    buffer = _on_gpu(numpy.full(size + 2 * guard, numpy.nan, numpy.dtype(dtype)))[0]
    out = buffer[guard:guard + size].reshape(shape)
    result = cuflash.attention(q, k, v, bias=bias, mask=mask, causal=True, out=out)
    assert result is out
    whole = to_numpy(buffer).astype(numpy.float64)
    assert numpy.isnan(whole[:guard]).all() and numpy.isnan(whole[guard + size:]).all(), "written outside out"
    assert not numpy.isnan(whole[guard:guard + size]).any(), "out not written in full"
    assert (to_numpy(out)[..., 3, :] == 0).all()  # "holes": query row 3 sees no key
    assert _bits(out) == _bits(cuflash.attention(q, k, v, bias=bias, mask=mask, causal=True))


# Head dims x dtypes x odd length pairs (Lq < Lk, Lq > Lk, Lq = 1): each (head dim, dtype) meets
# two of the pairs, each head dim all four across the dtypes; the bias's and mask's broadcast
# forms, causal/window, GQA, the bias's dtype and the backward's determinism taken in turn.
HEAD_DIMS = [8, 16, 24, 32, 48, 59, 64, 128, 256]
SWEEP_LENGTHS = [(1, 200), (97, 97), (97, 200), (200, 97)]
SWEEP_VARIANTS = [  # (kv heads, bias shape, mask (shape, kind), options) from (B, Hq, Lq, Lk) = (2, 4, lq, lk)
    lambda lq, lk: (4, (2, 4, lq, lk), ((1, 4, lq, lk), "holes"), dict(causal=True)),
    lambda lq, lk: (2, (1, 4, lq, lk), ((2, 1, 1, lk), "keypad"), {}),
    lambda lq, lk: (4, (2, 1, 1, lk), ((lq, lk), "random"), dict(causal="top_left")),
    lambda lq, lk: (2, (4, lq, 1), ((2, 4, lq, lk), "holes"), dict(window=(40, 7))),
]
SWEEP = [
    pytest.param(dtype, d, SWEEP_LENGTHS[(i + j + 2 * t) % 4], (i + 2 * j + t) % 4, (i + t) % 2 == 0, t == 1,
                 id=f"{dtype}-d{d}-{'x'.join(map(str, SWEEP_LENGTHS[(i + j + 2 * t) % 4]))}-v{(i + 2 * j + t) % 4}")
    for i, d in enumerate(HEAD_DIMS)
    for j, dtype in enumerate(["float16", "bfloat16", "float32"])
    for t in (0, 1)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim, lengths, variant, wide, deterministic", SWEEP)
def test_gpu_head_dims_with_bias_and_mask_at_odd_lengths(rng, dtype, head_dim, lengths, variant, wide, deterministic):
    lq, lk = lengths
    kv_heads, bias_shape, (mask_shape, kind), options = SWEEP_VARIANTS[variant](lq, lk)
    q, k, v, dout = _draw(rng, dtype, (2, 4, lq, head_dim), (2, kv_heads, lk, head_dim), (2, kv_heads, lk, head_dim),
                          (2, 4, lq, head_dim))
    bias = rng.standard_normal(bias_shape).astype(_bias_dtype(dtype, wide))
    check_against_reference(dtype, q, k, v, dout, gpu=True, deterministic=deterministic, bias=bias,
                            mask=_mask(rng, mask_shape, kind), **options)


# The Hopper forward and backward (fwd_wgmma_ws, bwd_dkdv_wgmma_ws) add a bias without softcap
# into S's (S^T's) accumulator (tc::bias_into_scores, bias_into_transposed_scores):
# every form of plane it reads (contiguous keys in 8-byte pairs, broadcast rows, strided keys,
# an odd start), tiles crossing Lq and Lk, -inf entries, a negative scale, with ALiBi, a mask or
# a window beside it, and softcap (which keeps the bias in the modifier bodies).
ACCUMULATOR_BIASES = {  # form: (the bias's shape, its CuPy view of a host array of that shape)
    "keys": (lambda b, h, lq, lk: (b, 1, 1, lk), lambda cupy, x: cupy.asarray(x)),
    "pair": (lambda b, h, lq, lk: (1, h, lq, lk), lambda cupy, x: cupy.asarray(x)),
    "transposed": (lambda b, h, lq, lk: (b, h, lq, lk),
                   lambda cupy, x: cupy.asarray(numpy.ascontiguousarray(x.swapaxes(-1, -2))).swapaxes(-1, -2)),
    "odd-start": (lambda b, h, lq, lk: (h, lq, lk),
                  lambda cupy, x: cupy.asarray(numpy.concatenate([x[..., :1], x], axis=-1))[..., 1:]),
    "minus-inf": (lambda b, h, lq, lk: (1, h, lq, lk), lambda cupy, x: cupy.asarray(x)),
}
ACCUMULATOR_CASES = [  # (dtype, head dim, bias form, options)
    ("bfloat16", 128, "keys", {}),
    ("bfloat16", 128, "pair", dict(causal=True, scale=-0.07)),
    ("float16", 128, "transposed", dict(alibi="heads")),
    ("bfloat16", 64, "odd-start", dict(window=(70, 30))),
    ("float16", 64, "minus-inf", dict(mask="keypad")),
    ("bfloat16", 256, "pair", dict(softcap=4.0)),
    ("float16", 256, "keys", dict(causal="top_left", sinks="heads")),
    # The mma.sync kernels (fwd_tc, bwd_dkdv_tc, bwd_dq_tc): d32 from the staged tiles, d96 from
    # global memory (the tensor maps refused: fwd_tc runs the forward too).
    ("bfloat16", 32, "pair", dict(alibi="heads", mask="keypad")),
    ("float16", 32, "keys", dict(causal=True, scale=-0.11, deterministic=True)),
    ("bfloat16", 32, "transposed", dict(window=(70, 30), mask="keypad", deterministic=True)),
    ("float16", 96, "pair", dict(alibi="heads", no_maps=True)),
    ("bfloat16", 96, "odd-start", dict(causal=True, mask="keypad", no_maps=True, deterministic=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim, form, options", ACCUMULATOR_CASES,
                         ids=[f"{c[0]}-d{c[1]}-{c[2]}-{'-'.join(c[3]) or 'plain'}" for c in ACCUMULATOR_CASES])
def test_gpu_hopper_kernels_take_the_bias_into_their_accumulators(rng, dtype, head_dim, form, options, monkeypatch):
    """Lq = 200 and Lk = 333 (tiles crossing both ends), B 2, H 3, the bias in float32 and in q's
    dtype in turn, forward and backward (dbias included); on an H100/H200 the forward is
    fwd_wgmma_ws's from d64 and, at d64 and d128, the backward bwd_dkdv_wgmma_ws's; the others
    run the mma.sync kernels, which take the bias into their accumulators too."""
    cupy = _cupy()
    from cuflash._gpu import plan

    if options.get("no_maps"):
        monkeypatch.setattr(plan, "_tensor_maps", lambda *args, **kwargs: None)
    b, h, lq, lk = 2, 3, 200, 333
    q, k, v, dout = _draw(rng, dtype, (b, h, lq, head_dim), (b, h, lk, head_dim), (b, h, lk, head_dim),
                          (b, h, lq, head_dim))
    kwargs = _options(rng, q.shape, {key: value for key, value in options.items()
                                     if key not in ("mask", "no_maps", "deterministic")})
    for name in ("alibi_slopes", "sinks"):
        if name in kwargs:
            kwargs[name] = kwargs[name].astype(numpy.float32)
    if "mask" in options:
        kwargs["mask"] = _mask(rng, (b, 1, 1, lk), options["mask"])
    shape, view = ACCUMULATOR_BIASES[form]
    for wide in (True, False):
        bias = rng.standard_normal(shape(b, h, lq, lk))
        if form == "minus-inf":
            bias[rng.random(bias.shape) < 0.2] = -numpy.inf
        bias = view(cupy, bias.astype(_bias_dtype(dtype, wide)))
        assert (form in ("transposed", "odd-start")) != bias.flags.c_contiguous
        plan.PLANS.clear()
        check_against_reference(dtype, q, k, v, dout, gpu=True, bias=bias, deterministic=options.get("deterministic"),
                                **kwargs)
        if cupy.cuda.Device().compute_capability == "90":
            kernels = {getattr(launch.kernel, "name", "") for entry in list(plan.PLANS.values())
                       for launch in getattr(entry, "launches", ())}
            hopper = head_dim >= 64 and not options.get("no_maps")
            assert any(("fwd_wgmma_ws" if hopper else "fwd_tc") in name for name in kernels), kernels
            assert (head_dim > 128 and hopper) or any(
                ("bwd_dkdv_wgmma_ws" if hopper else "bwd_dkdv_tc") in name for name in kernels), kernels


# A bias broadcast over the queries has its gradient summed per key by bwd_dkdv_wgmma_ws itself
# (plan._sums_dbias_by_key, BwdParams::dbias_keys): GQA (two query heads a block), a window whose
# first key blocks see no query, one query row, a scalar bias with a negative scale, MQA with one
# value per attention row, a mask beside it.
KEY_SUM_CASES = [  # (dtype, head dim, (B, Hq, Hk, Lq, Lk), bias shape, options)
    ("bfloat16", 128, (2, 4, 2, 200, 333), (2, 1, 1, 333), dict(causal=True)),
    ("float16", 64, (1, 2, 2, 97, 1025), (2, 1, 1025), dict(window=(70, 30))),
    ("bfloat16", 64, (2, 2, 1, 1, 200), (2, 2, 1, 200), {}),
    ("float16", 128, (2, 2, 2, 97, 200), (), dict(scale=-0.09)),
    ("bfloat16", 64, (2, 4, 1, 200, 97), (2, 4, 1, 1), dict(causal="top_left")),
    ("float16", 128, (2, 2, 2, 200, 333), (333,), dict(mask="keypad", alibi="heads")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim, dims, bias_shape, options", KEY_SUM_CASES,
                         ids=[f"{c[0]}-d{c[1]}-{'x'.join(map(str, c[2]))}-bias{'x'.join(map(str, c[3]))}"
                              for c in KEY_SUM_CASES])
def test_gpu_a_bias_over_the_queries_is_summed_per_key_in_the_kernel(rng, dtype, head_dim, dims, bias_shape, options):
    """Against the float64 reference, in float32 and q's dtype, the deterministic backward twice
    bitwise; on an H100/H200 the replayable plan writes per-key sums (dbias_keys), not dS."""
    cupy = _cupy()
    from cuflash._gpu import plan

    b, hq, hk, lq, lk = dims
    q, k, v, dout = _draw(rng, dtype, (b, hq, lq, head_dim), (b, hk, lk, head_dim), (b, hk, lk, head_dim),
                          (b, hq, lq, head_dim))
    kwargs = _options(rng, q.shape, {key: value for key, value in options.items() if key != "mask"})
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = kwargs["alibi_slopes"].astype(numpy.float32)
    if "mask" in options:
        kwargs["mask"] = _mask(rng, (b, 1, 1, lk), options["mask"])
    for wide in (True, False):
        bias = cupy.asarray(rng.standard_normal(bias_shape).astype(_bias_dtype(dtype, wide)))
        plan.PLANS.clear()
        check_against_reference(dtype, q, k, v, dout, gpu=True, bias=bias, **kwargs)
        if cupy.cuda.Device().compute_capability == "90":
            fields = [entry.dbias[3] for entry in list(plan.PLANS.values()) if getattr(entry, "dbias", None)]
            assert fields == ["dbias_keys"], fields
        args = [cupy.asarray(x) for x in (q, k, v, dout)]
        device_kwargs = {name: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for name, x in kwargs.items()}
        out, lse = cuflash.attention(*args[:3], bias=bias, return_lse=True, **device_kwargs)
        first, second = (cuflash.attention_backward(args[3], *args[:3], out, lse, bias=bias, deterministic=True,
                                                    **device_kwargs) for _ in range(2))
        assert all(_bits(x) == _bits(y) for x, y in zip(first, second)), "the deterministic backward changed"


class _Dkdv:  # a launch's Variants as _sums_dbias_by_key and _SharedBiasAdds.of read them
    def __init__(self, kernel, head_dim=64, score_mods=True):
        from cuflash._gpu import tiles
        self.dkdv = tiles.SPECS[kernel].variant("float16", head_dim, False, "90a", score_mods=score_mods)


SUMS_BY_KEY = [  # (bias shape, keywords, the launches' dK/dV kernel, its kScoreMods form, summed per key)
    ((2, 1, 1, 9), {}, "bwd_dkdv_wgmma_ws", True, True),
    ((9,), {}, "bwd_dkdv_wgmma_ws", True, True),
    ((), {}, "bwd_dkdv_wgmma_ws", True, True),
    ((2, 4, 1, 1), {}, "bwd_dkdv_wgmma_ws", True, True),
    ((2, 1, 5, 9), {}, "bwd_dkdv_wgmma_ws", True, False),  # a query axis of its own
    ((5, 1), {}, "bwd_dkdv_wgmma_ws", True, False),
    ((2, 1, 1, 9), dict(softcap=3.0), "bwd_dkdv_wgmma_ws", True, False),  # dS^T carries softcap's factor
    ((2, 1, 1, 9), dict(bias_grad=False), "bwd_dkdv_wgmma_ws", True, False),
    ((2, 1, 1, 9), {}, "bwd_dkdv_wgmma", True, False),  # the maps refused: the twin stores dS
    ((2, 1, 1, 9), {}, "bwd_dkdv_tc", True, False),
]


@pytest.mark.parametrize("bias_shape, keywords, kernel, mods, expected", SUMS_BY_KEY)
def test_which_bias_gradients_the_dkdv_kernel_sums_per_key(bias_shape, keywords, kernel, mods, expected):
    from cuflash import _spec
    from cuflash._gpu import plan

    q = numpy.zeros((2, 4, 5, 64), numpy.float16)
    k = v = numpy.zeros((2, 4, 9, 64), numpy.float16)
    p = _spec.resolve_backward(q, q, k, v, q, numpy.zeros((2, 4, 5), numpy.float32),
                               bias=numpy.zeros(bias_shape, numpy.float32), **keywords)
    assert plan._sums_dbias_by_key(p, ((_Dkdv(kernel, score_mods=mods), None),)) == expected


LONG = [  # (dtype, head dim, Lq, bias shape, mask (shape, kind) or None, options); Lk = 1025, causal
    ("bfloat16", 128, 1025, (1, 2, 1025, 1025), ((2, 1, 1, 1025), "keypad"), dict(causal=True)),
    ("float32", 64, 1025, (2, 1, 1, 1025), ((1, 2, 1025, 1025), "holes"), dict(causal=True)),
    ("float16", 256, 200, (1, 2, 1, 1025), ((2, 1, 200, 1025), "random"), dict(causal=True, sinks="heads")),
    ("float64", 32, 1025, (1025, 1025), None, dict(causal="top_left")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim, lq, bias_shape, mask_spec, options", LONG,
                         ids=[f"{c[0]}-d{c[1]}-{c[2]}x1025" for c in LONG])
def test_gpu_1025_keys_causal(rng, dtype, head_dim, lq, bias_shape, mask_spec, options):
    """Nine key tiles, causal in both alignments, with a full, a key-broadcast and a
    query-broadcast bias, key padding, and sinks."""
    q, k, v, dout = _draw(rng, dtype, (2, 2, lq, head_dim), (2, 2, 1025, head_dim), (2, 2, 1025, head_dim),
                          (2, 2, lq, head_dim))
    kwargs = _options(rng, (2, 2, lq, head_dim), options)
    if "sinks" in kwargs:
        kwargs["sinks"] = kwargs["sinks"].astype(_bias_dtype(dtype, True))
    kwargs["bias"] = rng.standard_normal(bias_shape).astype(_bias_dtype(dtype, True))
    if mask_spec is not None:
        kwargs["mask"] = _mask(rng, *mask_spec)
    check_against_reference(dtype, q, k, v, dout, gpu=True, deterministic=dtype == "float32", **kwargs)


GPU_BAD = [  # (keywords from the cupy module, error, message); q (2, 4, 5, 8) float32, k and v (2, 4, 6, 8)
    pytest.param(lambda cp: dict(bias=cp.zeros((2, 4, 5, 6), cp.int32)), TypeError,
                 r"bias must be a float array of dtype float32 \(q is float32\), got int32", id="bias-int32"),
    pytest.param(lambda cp: dict(bias=cp.zeros((5, 6), cp.float64)), TypeError,
                 r"bias must be a float array of dtype float32 \(q is float32\), got float64", id="bias-float64"),
    pytest.param(lambda cp: dict(bias=cp.zeros((5, 6), bool)), TypeError, "bias must be a float array", id="bias-bool"),
    pytest.param(lambda cp: dict(bias=cp.zeros((2, 4, 5, 7), cp.float32)), ValueError,
                 r"bias must broadcast to \(\.\.\., Hq, Lq, Lk\) = \(2, 4, 5, 6\)", id="bias-shape"),
    pytest.param(lambda cp: dict(bias=cp.zeros((1, 2, 4, 5, 6), cp.float32)), ValueError, "bias must broadcast",
                 id="bias-extra-axis"),
    pytest.param(lambda cp: dict(bias=numpy.zeros((5, 6), numpy.float32)), TypeError,
                 r"bias must be a CuPy \(GPU\) array like q, got a numpy array", id="bias-on-the-host"),
    pytest.param(lambda cp: dict(bias=[[0.0] * 6] * 5), TypeError, "bias must be a numpy.ndarray, a cupy.ndarray",
                 id="bias-list"),
    pytest.param(lambda cp: dict(mask=cp.ones((5, 6), cp.float32)), TypeError, "mask must be a boolean array",
                 id="mask-float32"),
    pytest.param(lambda cp: dict(mask=cp.ones((5, 6), cp.uint8)), TypeError, "mask must be a boolean array",
                 id="mask-uint8"),
    pytest.param(lambda cp: dict(mask=cp.ones((3, 4, 5, 6), bool)), ValueError,
                 r"mask must broadcast to \(\.\.\., Hq, Lq, Lk\)", id="mask-shape"),
    pytest.param(lambda cp: dict(mask=numpy.ones((5, 6), bool)), TypeError,
                 r"mask must be a CuPy \(GPU\) array like q, got a numpy array", id="mask-on-the-host"),
]


def _forbid_launches(monkeypatch):
    """Any GPU plan building or running fails the test."""
    from cuflash._gpu import plan

    def launched(*args, **kwargs):
        pytest.fail("a GPU plan was built or run")

    monkeypatch.setattr(plan, "forward", launched)
    monkeypatch.setattr(plan, "backward", launched)
    monkeypatch.setattr(plan._Plan, "_run", launched)


@pytest.mark.gpu
@pytest.mark.parametrize("make, error, match", GPU_BAD)
def test_gpu_bad_bias_or_mask_is_refused_naming_it_before_any_launch(rng, make, error, match, monkeypatch):
    """attention (out= left as it was), attention_backward and attention_vjp on CuPy arrays
    refuse a bad bias or mask naming it, before anything is built or launched."""
    cupy = _cupy()
    q, k, v = _on_gpu(*_draw(rng, "float32", (2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8)))
    out = _on_gpu(numpy.full((2, 4, 5, 8), 7.0, numpy.float32))[0]
    lse = cupy.zeros((2, 4, 5), cupy.float32)
    options = make(cupy)
    _forbid_launches(monkeypatch)
    with pytest.raises(error, match=match):
        cuflash.attention(q, k, v, out=out, **options)
    assert bool((out == 7.0).all())
    with pytest.raises(error, match=match):
        cuflash.attention(q, k, v, return_lse=True, **options)
    with pytest.raises(error, match=match):
        cuflash.attention_backward(out, q, k, v, out, lse, **options)
    with pytest.raises(error, match=match):
        cuflash.attention_vjp(q, k, v, **options)




def test_a_forwards_preparation_is_kept_for_its_backward_only_while_small():
    """plan.Prepared (the torch adapter keeps a forward's bias and mask preparation for its
    backward): small() counts every array it holds (copies, the caller's planes, the cut; None
    for an absent one) against MAX_BYTES."""
    from cuflash._gpu import plan

    arrays = (numpy.zeros((4, 49, 64), numpy.float32), None, numpy.zeros(8, numpy.int32))
    held = sum(x.nbytes for x in arrays if x is not None)
    prepared = plan.Prepared(("signature",), (1, 0, 2), arrays)
    assert prepared.small() == (held <= plan.Prepared.MAX_BYTES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan.Prepared, "MAX_BYTES", held)
        assert prepared.small()
        patch.setattr(plan.Prepared, "MAX_BYTES", held - 1)
        assert not prepared.small()
