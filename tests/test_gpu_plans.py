"""Plans (the cached launch path of a repeated call), CUDA graphs, torch's allocator, and the
GQA/MQA dK/dV reduction inside the dK/dV kernels.

A repeated call skips validation and planning (cuflash._gpu.plan), so these tests hold the replay
to the full path bit for bit, show that the cache never answers a call the full path would refuse
or treat differently (misaligned inputs, argument types), and capture calls into CUDA graphs
(a host synchronisation or an allocation outside the graph's pool would break the capture).
Marked gpu; skipped without one.
"""
from __future__ import annotations

import contextlib

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

import cuflash  # noqa: E402
from cuflash import _spec  # noqa: E402
from cuflash._gpu import plan  # noqa: E402
from test_gpu_backward import check_backward  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _draw(rng, dtype, *shapes):
    return [cupy.asarray(rng.standard_normal(s).astype(numpy.dtype(dtype))) for s in shapes]


def _bits(x):
    return cupy.asnumpy(cupy.ascontiguousarray(x)).tobytes()


@pytest.fixture
def resolutions(monkeypatch):
    """Counts the full path's validations (a replay makes none)."""
    counts = {"forward": 0, "backward": 0}
    real_forward, real_backward = _spec.resolve_forward, _spec.resolve_backward

    def forward(*args, **kwargs):
        counts["forward"] += 1
        return real_forward(*args, **kwargs)

    def backward(*args, **kwargs):
        counts["backward"] += 1
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(_spec, "resolve_forward", forward)
    monkeypatch.setattr(_spec, "resolve_backward", backward)
    return counts


CASES = [
    dict(q=(2, 4, 200, 64), k=(2, 4, 333, 64), options=dict(causal=True)),
    dict(q=(2, 8, 97, 128), k=(2, 2, 97, 128), options=dict(causal="top_left")),      # GQA
    dict(q=(1, 6, 150, 64), k=(1, 1, 150, 64), options=dict(window=(16, 3))),         # MQA
    dict(q=(3, 129, 32), k=(3, 1025, 32), options=dict(scale=0.3)),
    dict(q=(2, 2, 1, 256), k=(2, 2, 97, 256), options=dict(causal=True)),             # decode row
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['q']}x{c['k']}")
def test_a_replayed_call_equals_the_full_path_bit_for_bit(rng, dtype, case, resolutions):
    plan.forget()
    shapes = (case["q"], case["k"], case["k"], case["q"][:-1] + (case["k"][-1],))
    options = case["options"]
    first = _draw(rng, dtype, *shapes)
    cuflash.attention(*first[:3], **options)  # plans the signature
    out, lse = cuflash.attention(*first[:3], return_lse=True, **options)
    cuflash.attention_backward(first[3], *first[:3], out, lse, deterministic=True, **options)
    counts = dict(resolutions)

    second = _draw(rng, dtype, *shapes)  # fresh data, the same signature: replayed
    out, lse = cuflash.attention(*second[:3], return_lse=True, **options)
    grads = cuflash.attention_backward(second[3], *second[:3], out, lse, deterministic=True, **options)
    assert resolutions == counts, "a repeated signature was validated and planned again"

    plan.forget()  # the full path on the same data
    full_out, full_lse = cuflash.attention(*second[:3], return_lse=True, **options)
    full_grads = cuflash.attention_backward(second[3], *second[:3], full_out, full_lse, deterministic=True,
                                            **options)
    assert resolutions["forward"] == counts["forward"] + 1
    for ours, full in zip((out, lse, *grads), (full_out, full_lse, *full_grads)):
        assert ours.shape == full.shape and ours.dtype == full.dtype and _bits(ours) == _bits(full)


def _score_inputs(rng, case, dtype):
    """A case's bias (in the dtype it asks for: q's, or the kernels' score type) and mask, fresh
    random values."""
    bias = mask = None
    if "bias" in case:
        shape, kind = case["bias"]
        bias_dtype = dtype if kind == "q" else ("float64" if dtype == "float64" else "float32")
        bias = cupy.asarray(rng.standard_normal(shape).astype(numpy.dtype(bias_dtype)))
    if "mask" in case:
        mask = cupy.asarray(rng.random(case["mask"]) < 0.7)
        if case.get("padding"):  # key padding: each batch sees a prefix, one of them with a hole
            keys = case["mask"][-1]
            mask = cupy.asarray(numpy.arange(keys) < rng.integers(1, keys, size=case["mask"][:-1] + (1,)))
            mask[0, ..., 0] = False
    return bias, mask


def _replayed_and_full(call, draw, draw_modifiers, resolutions):
    """Plans ``call``'s signature on drawn inputs, then calls it on fresh ones (a replay), then
    on those again through the full path (the plans forgotten), which it must equal bit for bit.
    Returns (the validation counts before the replay, after it, the replay's results, its
    inputs)."""
    call(draw(), *draw_modifiers())
    counts = dict(resolutions)
    arrays, modifiers = draw(), draw_modifiers()
    replayed = call(arrays, *modifiers)
    replay_counts = dict(resolutions)
    plan.forget()
    full = call(arrays, *modifiers)
    assert resolutions["forward"] == replay_counts["forward"] + 1
    assert len(replayed) == len(full)
    for ours, theirs in zip(replayed, full):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and _bits(ours) == _bits(theirs)
    return counts, replay_counts, replayed, arrays


def _forward_backward(options, names):
    """``call(arrays, *modifiers)``: out, lse and the deterministic backward's gradients of
    ``arrays`` (q, k, v, dout) with the modifier arrays ``modifiers`` given as ``names``."""
    def call(arrays, *modifiers):
        q, k, v, dout = arrays
        given = dict(zip(names, modifiers), **options)
        out, lse = cuflash.attention(q, k, v, return_lse=True, **given)
        return (out, lse) + tuple(cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **given))
    return call


SCORE_CASES = [  # bias (shape, its dtype: q's or the score type's) and/or mask; widened or laid-out copies, or none
    dict(q=(1, 6, 4, 40, 32), k=(1, 6, 4, 40, 32), bias=((1, 1, 4, 40, 40), "score")),     # triangle, read in place
    dict(q=(1, 6, 4, 40, 32), k=(1, 6, 4, 40, 32), bias=((1, 1, 4, 40, 40), "q")),         # widened copy (16-bit)
    dict(q=(2, 8, 4, 49, 32), k=(2, 8, 4, 49, 32), bias=((1, 4, 49, 49), "score"),          # Swin: 49-wide rows copied
         mask=(8, 1, 49, 49), options=dict(softcap=20.0)),
    dict(q=(3, 4, 97, 64), k=(3, 4, 200, 64), mask=(3, 1, 1, 200), padding=True, options=dict(causal=True)),
    dict(q=(2, 4, 97, 64), k=(2, 4, 97, 64), options=dict(softcap=5.0)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCORE_CASES, ids=["triangle", "triangle-widened", "swin-softcap", "key-padding",
                                                   "softcap"])
def test_bias_mask_and_softcap_calls_replay_bit_for_bit(rng, dtype, case, resolutions):
    """Calls with a bias, a mask or softcap keep their plan too: a replay lays the planes out and
    cuts the padded keys again (plan.ScoreInputs.prepare) and equals the full path bit for bit,
    dbias included, on fresh data (new pointers, new mask: new cuts)."""
    if dtype in ("float32", "float64") and case.get("bias", (None, ""))[1] == "q":
        pytest.skip("a float32/float64 bias is the kernels' own type: nothing to widen")
    plan.forget()
    shapes = (case["q"], case["k"], case["k"], case["q"])
    call = _forward_backward(case.get("options", {}), ("bias", "mask"))
    counts, replay_counts, replayed, _ = _replayed_and_full(
        call, lambda: _draw(rng, dtype, *shapes), lambda: _score_inputs(rng, case, dtype), resolutions)
    assert replay_counts == counts, "a repeated signature was validated and planned again"
    assert len(replayed) == 5 + ("bias" in case)


PER_ROW_CASES = {  # q, k shapes; the slopes' and sinks' shapes (None: not given); options
    "alibi": dict(q=(2, 4, 97, 64), k=(2, 4, 130, 64), slopes=(4,), options=dict(causal=True)),
    "sinks": dict(q=(2, 4, 97, 64), k=(2, 4, 97, 64), sinks=(4,)),
    "alibi-per-batch-sinks-softcap-gqa": dict(q=(2, 8, 97, 128), k=(2, 2, 200, 128), slopes=(2, 8), sinks=(8,),
                                              options=dict(softcap=20.0, window=(60, 0))),
}


def _per_row_inputs(rng, case):
    """Fresh ALiBi slopes (float32, positive) and sinks (float32) of a PER_ROW_CASES case."""
    slopes = sinks = None
    if "slopes" in case:
        slopes = cupy.asarray(rng.uniform(0.01, 0.5, case["slopes"]).astype(numpy.float32))
    if "sinks" in case:
        sinks = cupy.asarray(rng.standard_normal(case["sinks"]).astype(numpy.float32))
    return slopes, sinks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(PER_ROW_CASES))
def test_alibi_and_sinks_calls_replay_bit_for_bit(rng, dtype, name, resolutions):
    """Calls with ALiBi slopes or sinks keep their plan: a replay makes the per-row arrays again
    from the call's own slopes and sinks (plan.PerRowInputs.prepare: new values each call here)
    and equals the full path bit for bit. The backward replays with ALiBi; with sinks it takes
    the full path (dsinks is computed after the launches), each call validated again."""
    case = PER_ROW_CASES[name]
    plan.forget()
    shapes = (case["q"], case["k"], case["k"], case["q"])
    call = _forward_backward(case.get("options", {}), ("alibi_slopes", "sinks"))
    counts, replay_counts, replayed, arrays = _replayed_and_full(
        call, lambda: _draw(rng, dtype, *shapes), lambda: _per_row_inputs(rng, case), resolutions)
    assert replay_counts["forward"] == counts["forward"], "a repeated forward signature was planned again"
    assert replay_counts["backward"] == counts["backward"] + ("sinks" in case)
    assert len(replayed) == 5 + ("sinks" in case)
    # The replay read this call's values: other slopes and sinks give another output.
    assert _bits(call(arrays, *_per_row_inputs(rng, case))[0]) != _bits(replayed[0])


def test_torch_alibi_and_sinks_calls_replay_on_torch_alone(rng, resolutions, monkeypatch):
    """cuflash.torch.attention with ALiBi slopes and sinks (requiring grad) on CUDA tensors: a
    repeated forward replays on torch's own terms (the per-row arrays made by torch's copy_ from
    torch's allocator, no CuPy crossing) and equals the full path and the CuPy API bit for bit;
    so does a forward+backward with ALiBi alone."""
    torch = _torch()
    import cuflash.torch as ct

    g = torch.Generator(device="cuda").manual_seed(3)

    def draw(*shape):
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    slopes = torch.rand(2, 8, device="cuda", generator=g) * 0.3
    sinks = torch.randn(8, device="cuda", generator=g).requires_grad_()
    plan.forget()
    with torch.no_grad():
        ct.attention(draw(2, 8, 97, 64), draw(2, 2, 97, 64), draw(2, 2, 97, 64), alibi_slopes=slopes, sinks=sinks,
                     causal=True)  # plans the forward's signature
    q, k, v = draw(2, 8, 97, 64), draw(2, 2, 97, 64), draw(2, 2, 97, 64)
    slopes, sinks = slopes + 0.05, (sinks + 1).detach().requires_grad_()
    counts, crossings = dict(resolutions), []
    with monkeypatch.context() as patch:
        for helper in ("_running_on", "_to_cuflash", "_to_torch"):
            real = getattr(ct, helper)
            patch.setattr(ct, helper, lambda *args, real=real, helper=helper: crossings.append(helper) or real(*args))
        with torch.no_grad():
            replayed = ct.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, causal=True)
    torch.cuda.synchronize()
    assert resolutions == counts, "a repeated signature was validated and planned again"
    assert crossings == [], "a replay crossed to CuPy"
    plan.forget()
    with torch.no_grad():
        full = ct.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, causal=True)
    theirs = cuflash.attention(*(cupy.from_dlpack(x) for x in (q, k, v)), alibi_slopes=cupy.from_dlpack(slopes),
                               sinks=cupy.from_dlpack(sinks.detach()), causal=True)
    cupy.cuda.Device().synchronize()
    assert torch.equal(replayed, full)
    assert _bits(cupy.from_dlpack(replayed)) == _bits(theirs)

    # forward + backward with ALiBi alone: both replay
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dout = draw(2, 8, 97, 64)

    def step():
        out = ct.attention(*leaves, alibi_slopes=slopes, causal=True, deterministic=True)
        return [out.detach().clone()] + [x.clone() for x in torch.autograd.grad(out, leaves, dout)]

    step()  # plans both
    counts, crossings = dict(resolutions), []
    with monkeypatch.context() as patch:
        for helper in ("_running_on", "_to_cuflash", "_to_torch"):
            real = getattr(ct, helper)
            patch.setattr(ct, helper, lambda *args, real=real, helper=helper: crossings.append(helper) or real(*args))
        replayed = step()
    assert resolutions == counts and crossings == []
    plan.forget()
    for got, again in zip(replayed, step()):
        assert torch.equal(got, again)


TORCH_SCORE_CASES = {  # q, k (v as k) shapes, dtype, bias (shape, dtype) and mask kind, options
    "pair-bias": dict(q=(2, 4, 4, 64, 32), k=(2, 4, 4, 64, 32), dtype="bfloat16", bias=((1, 1, 4, 64, 64), "float32"),
                      mask=((2, 1, 1, 64, 64), "random")),
    "widened-bias-key-padding": dict(q=(2, 4, 97, 64), k=(2, 4, 120, 64), dtype="bfloat16",
                                     bias=((2, 1, 97, 120), "bfloat16"), mask=((2, 1, 1, 120), "padding"),
                                     options=dict(causal=True)),
    "bias-over-queries": dict(q=(2, 4, 97, 64), k=(2, 2, 200, 64), dtype="float32", bias=((1, 4, 1, 200), "float32"),
                              options=dict(window=(50, 20))),
    "key-padding-split": dict(q=(3, 4, 97, 64), k=(3, 2, 200, 64), dtype="bfloat16", mask=((3, 1, 1, 200), "padding"),
                              options=dict(causal=True)),  # the mask alone: prefix rows on the plain kernels
    "softcap": dict(q=(2, 4, 97, 64), k=(2, 4, 97, 64), dtype="float16", options=dict(softcap=5.0)),
}


def _torch_score_inputs(torch, case, seed):
    """q, k, v (requiring grad), dout, bias (requiring grad) and mask of a TORCH_SCORE_CASES case."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=dtype, generator=g)
                     for shape in (case["q"], case["k"], case["k"], case["q"]))
    bias = mask = None
    if "bias" in case:
        shape, bias_dtype = case["bias"]
        bias = torch.randn(shape, device="cuda", generator=g).to(getattr(torch, bias_dtype)).requires_grad_()
    if "mask" in case:
        shape, kind = case["mask"]
        if kind == "padding":  # each batch a prefix of the keys, batch 0 with a hole too
            lengths = torch.randint(1, shape[-1], shape[:-1] + (1,), device="cuda", generator=g)
            mask = torch.arange(shape[-1], device="cuda") < lengths
            mask[0, ..., 0] = False
        else:
            mask = torch.rand(shape, device="cuda", generator=g) < 0.8
    return [x.requires_grad_() for x in (q, k, v)], dout, bias, mask


def _torch_score_call(ct, case, q, k, v, dout, bias, mask):
    """cuflash.torch.attention forward and backward (deterministic): out, dq, dk, dv(, dbias)."""
    out = ct.attention(q, k, v, bias=bias, mask=mask, deterministic=True, **case.get("options", {}))
    leaves = (q, k, v) + (() if bias is None else (bias,))
    return [out.detach().clone()] + [g.clone() for g in _torch().autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize("name", list(TORCH_SCORE_CASES))
def test_torch_bias_mask_and_softcap_calls_replay_on_torch_alone(rng, name, resolutions, monkeypatch):
    """cuflash.torch.attention with a bias (requiring grad), a mask or softcap on CUDA tensors: a
    repeated signature replays its plans on torch's own terms (no validation, no CuPy stream or
    allocator switch, no DLPack crossing: the bias laid out by torch ops, the key-padding cut and
    dbias's sum launched through the driver on torch's stream), its buffers from torch's caching
    allocator (max_memory_allocated sees dS, CuPy's pool does not grow); out, dq, dk, dv and dbias
    equal the full path's and the CuPy API's on the same data bit for bit."""
    torch = _torch()
    import cuflash.torch as ct

    case = TORCH_SCORE_CASES[name]
    plan.forget()
    first, first_dout, first_bias, first_mask = _torch_score_inputs(torch, case, 1)
    _torch_score_call(ct, case, *first, first_dout, first_bias, first_mask)  # plans the signature
    (q, k, v), dout, bias, mask = _torch_score_inputs(torch, case, 2)
    counts, crossings = dict(resolutions), []
    pool = cupy.get_default_memory_pool()
    torch.cuda.synchronize()
    used = pool.used_bytes()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with monkeypatch.context() as patch:
        for helper in ("_running_on", "_to_cuflash", "_to_torch"):
            real = getattr(ct, helper)
            patch.setattr(ct, helper, lambda *args, real=real, helper=helper: crossings.append(helper) or real(*args))
        replayed = _torch_score_call(ct, case, q, k, v, dout, bias, mask)
    torch.cuda.synchronize()
    assert resolutions == counts, "a repeated signature was validated and planned again"
    assert crossings == [], "a replay crossed to CuPy"
    assert pool.used_bytes() == used, "CuPy's pool grew: memory beside torch's allocator"
    if bias is not None:  # dS, (lead..., Lq, Lk) in float32
        assert torch.cuda.max_memory_allocated() - before >= 4 * q.shape[:-1].numel() * k.shape[-2]

    plan.forget()
    full = _torch_score_call(ct, case, q, k, v, dout, bias, mask)
    arrays = [cupy.from_dlpack(x.detach()) for x in (q, k, v, dout)]
    cbias, cmask = (None if x is None else cupy.from_dlpack(x.detach()) for x in (bias, mask))
    options = dict(bias=cbias, mask=cmask, **case.get("options", {}))
    out, lse = cuflash.attention(*arrays[:3], return_lse=True, **options)
    grads = cuflash.attention_backward(arrays[3], *arrays[:3], out, lse, deterministic=True, **options)
    cupy.cuda.Device().synchronize()
    assert len(replayed) == len(full) == 4 + (bias is not None) == 1 + len(grads)
    for got, again, theirs, label in zip(replayed, full, (out, *grads), ("out", "dq", "dk", "dv", "dbias")):
        assert torch.equal(got, again), f"{label}: the replay differs from the full path"
        assert got.dtype == again.dtype and tuple(got.shape) == theirs.shape
        assert _bits(cupy.from_dlpack(got)) == _bits(theirs), f"{label}: torch and CuPy differ"


def test_torch_cuda_graph_capture_of_bias_and_mask_calls(rng):
    """A training step with a widened bias requiring grad and a key-padding mask, captured into a
    torch CUDA graph (the planes' copies, the cut and dbias's sum on the capture stream, their
    buffers in the graph's pool) and replayed on new data: bit for bit the eager step's."""
    torch = _torch()
    import cuflash.torch as ct

    case = TORCH_SCORE_CASES["widened-bias-key-padding"]
    (q, k, v), dout, bias, mask = _torch_score_inputs(torch, case, 3)
    static = [q, k, v, bias]
    graph, g_out, g_grads = _captured_training_step(
        torch, static, lambda: ct.attention(q, k, v, bias=bias, mask=mask, deterministic=True, **case["options"]), dout)
    for seed in (4, 5):
        fresh_inputs, fresh_dout, fresh_bias, fresh_mask = _torch_score_inputs(torch, case, seed)
        with torch.no_grad():
            for x, y in zip((*static, dout, mask), (*fresh_inputs, fresh_bias, fresh_dout, fresh_mask)):
                x.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        eager_in = [x.detach().clone().requires_grad_() for x in static]
        eager_out = ct.attention(*eager_in[:3], bias=eager_in[3], mask=mask, deterministic=True, **case["options"])
        eager_out.backward(dout)
        assert torch.equal(g_out, eager_out)
        for ours, x in zip(g_grads, eager_in):
            assert torch.equal(ours, x.grad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_replays_stay_correct_on_the_atomic_path(rng, dtype):
    q, k, v = _draw(rng, dtype, (2, 4, 300, 64), (2, 2, 300, 64), (2, 2, 300, 64))
    for _ in range(3):  # the first call plans; the next two replay, each on fresh data
        check_backward(rng, dtype, q, k, v, causal=True)
        q, k, v = _draw(rng, dtype, q.shape, k.shape, v.shape)


def test_a_misaligned_view_never_reuses_an_aligned_plan(rng):
    plan.forget()
    shape = (2, 2, 128, 64)
    flat = _draw(rng, "float16", (2 * 2 * 128 * 64 + 1,))[0]
    aligned = flat[:-1].reshape(shape)
    odd = flat[1:].reshape(shape)  # the same shape and strides, 2 bytes off: needs the copying path
    cuflash.attention(aligned, aligned, aligned)
    cuflash.attention(aligned, aligned, aligned)
    got = cuflash.attention(odd, odd, odd)
    copy = cupy.ascontiguousarray(odd)
    assert _bits(got) == _bits(cuflash.attention(copy, copy, copy))


def test_alignment_is_keyed_per_array(rng, resolutions):
    """A bias read through a laid-out copy (misaligned) with q, k, v read in place, then the
    reverse: the second call must not replay the first's plan (which reads q in place)."""
    plan.forget()
    shape = (2, 2, 96, 32)
    flat = _draw(rng, "float16", (3 * 2 * 2 * 96 * 32 + 1,))[0]
    aligned = [flat[i * flat.size // 3: i * flat.size // 3 + 2 * 2 * 96 * 32].reshape(shape) for i in range(3)]
    odd = [flat[1: 2 * 2 * 96 * 32 + 1].reshape(shape)] * 3  # 2 bytes off
    bias_flat = cupy.asarray(rng.standard_normal(2 * 96 * 96 + 1).astype(numpy.float32))
    bias_aligned, bias_odd = bias_flat[:-1].reshape(2, 96, 96), bias_flat[1:].reshape(2, 96, 96)
    assert all(x.data.ptr % 16 == 0 for x in aligned) and all(x.data.ptr % 16 for x in odd)
    assert bias_aligned.data.ptr % 16 == 0 and bias_odd.data.ptr % 16
    cuflash.attention(*aligned, bias=bias_odd)  # planned: q, k, v in place, the bias copied
    counts = dict(resolutions)
    got = cuflash.attention(*odd, bias=bias_aligned)  # another signature: the full path copies q, k, v
    assert resolutions["forward"] == counts["forward"] + 1
    copies = [cupy.ascontiguousarray(x) for x in odd]
    assert _bits(got) == _bits(cuflash.attention(*copies, bias=bias_aligned))


def test_the_cache_never_answers_a_call_the_full_path_refuses(rng):
    q = _draw(rng, "float16", (1, 2, 64, 64))[0]
    cuflash.attention(q, q, q, causal=True, scale=1)
    cuflash.attention(q, q, q, causal=True, scale=1)
    with pytest.raises(TypeError, match="causal"):
        cuflash.attention(q, q, q, causal=1, scale=1)
    with pytest.raises(TypeError, match="scale"):
        cuflash.attention(q, q, q, causal=True, scale=True)
    cuflash.attention(q, q, q, window=(3, 0))
    with pytest.raises(TypeError, match="window"):
        cuflash.attention(q, q, q, window=(3, False))
    k = _draw(rng, "float32", (1, 2, 64, 64))[0]
    with pytest.raises(TypeError, match="dtype"):
        cuflash.attention(q, k, k, causal=True, scale=1)
    out, lse = cuflash.attention(q, q, q, return_lse=True)
    cuflash.attention_backward(out, q, q, q, out, lse)
    with pytest.raises(TypeError, match="deterministic"):
        cuflash.attention_backward(out, q, q, q, out, lse, deterministic=1)


SPLIT_SHAPES = [  # (Lq, Lk, D, Dv, options): tile edges, one tile per head, odd widths, masks
    (133, 201, 64, 64, dict(causal=True)),
    (17, 300, 59, 59, dict(window=(16, 3))),
    (1025, 97, 128, 128, dict(causal=True)),
    (70, 70, 96, 32, dict(causal="top_left")),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (6, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}d{s[2]}-{s[3]}")
def test_every_split_of_a_group_gives_the_same_gradients(rng, dtype, heads, shape, monkeypatch):
    """dK/dV blocks accumulate 1, some, or all query heads of a key/value head (the host picks
    by occupancy; here forced): each must match the reference, on both dQ paths."""
    hq, hkv = heads
    lq, lk, d, dv, options = shape
    group = hq // hkv
    q, k, v = _draw(rng, dtype, (2, hq, lq, d), (2, hkv, lk, d), (2, hkv, lk, dv))
    for per_block in sorted({1, max(1, group // 2), group}):
        plan.forget()
        # (the stored slices' rule, and the added slices' where the kernels add: 16-bit, atomic)
        monkeypatch.setattr(plan, "_heads_per_block", lambda group, rows, tiles, n=per_block: n)
        monkeypatch.setattr(plan, "_heads_per_block_adding", lambda group, rows, steps, n=per_block, **_: n)
        for deterministic in (False, True):
            check_backward(rng, dtype, q, k, v, deterministic=deterministic, **options)


# A split GQA group's slices added into sums by the dK/dV kernels (plan._adds_dkdv; 16-bit:
# bwd_dkdv_wgmma(_ws) on Hopper at d64/d128, bwd_dkdv_tc elsewhere, into fp32; float32 "highest":
# bwd_dkdv_wgmma_x3 on Hopper up to d64, bwd_dkdv_simt elsewhere, fp32; float64: bwd_dkdv_dmma or
# bwd_dkdv_simt, fp64): (q shape,
# k shape, Dv, options); "blhd": q, k, v, dout as (B, L, H, D) arrays seen as (B, H, L, D);
# "padding": a key-padding mask whose last batch row sees no key.
ADD_CASES = [
    ((2, 8, 200, 64), (2, 2, 333, 64), 64, dict(causal=True)),
    ((1, 6, 1025, 128), (1, 2, 97, 128), 128, dict(causal=True)),
    ((2, 4, 97, 59), (2, 1, 257, 59), 59, dict(window=(33, 47))),  # MQA by a head axis of 1; odd width: REDs
    ((2, 4, 130, 111), (2, 2, 201, 111), 111, dict(causal=True)),  # bucket 128, odd width: REDs
    ((2, 4, 99, 124), (2, 2, 150, 124), 124, dict(causal=True)),  # width 124 floats: bulk adds, 16-byte rows
    ((2, 4, 70, 64), (2, 2, 70, 64), 32, dict(causal="top_left")),  # D != Dv
    ((2, 4, 70, 96), (2, 2, 70, 96), 32, dict(causal="top_left")),  # bucket 96: bwd_dkdv_tc
    ((1, 4, 130, 256), (1, 2, 201, 256), 256, dict(causal=True, softcap=30.0)),  # bwd_dkdv_tc's modifier tile
    ((2, 4, 130, 128), (2, 2, 201, 128), 128, dict(softcap=20.0, alibi=True)),
    ((3, 4, 97, 64), (3, 2, 200, 64), 64, dict(padding=True, causal=True)),
    ((2, 6, 300, 128), (2, 3, 300, 128), 128, dict(blhd=True)),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: f"{c[0][1]}-{c[1][1]}-{c[0][2]}x{c[1][2]}d{c[0][3]}-"
                         + "-".join(c[3]))
def test_split_group_slices_added_in_the_kernel(rng, dtype, case, monkeypatch):
    """Slices of one head and of half the group added into the group's sums by the dK/dV
    blocks (checked to be the path taken unless deterministic), against the float64 reference, with modifiers, a key-padding mask, odd
    widths, D != Dv, strided inputs; the deterministic backward of the same call as well."""
    from test_bias_mask import check_against_reference

    q_shape, k_shape, dv, options = case
    options = dict(options)
    blhd, padding, alibi = (options.pop(name, False) for name in ("blhd", "padding", "alibi"))
    v_shape = k_shape[:-1] + (dv,)
    o_shape = q_shape[:-1] + (dv,)
    if blhd:  # drawn as (B, L, H, D), passed as its (B, H, L, D) view
        q, k, v, dout = (x.transpose(0, 2, 1, 3) for x in _draw(
            rng, dtype, *((s[0], s[2], s[1], s[3]) for s in (q_shape, k_shape, v_shape, o_shape))))
    else:
        q, k, v, dout = _draw(rng, dtype, q_shape, k_shape, v_shape, o_shape)
    if alibi:
        options["alibi_slopes"] = (2.0 ** -numpy.arange(1, q_shape[1] + 1)).astype(numpy.float32)
    if padding:
        lengths = numpy.array([k_shape[2], 37, 0][: k_shape[0]])
        options["mask"] = numpy.arange(k_shape[2]) < lengths.reshape(-1, 1, 1, 1)
    group = q_shape[1] // k_shape[1]
    adds, real = [], plan._adds_dkdv
    monkeypatch.setattr(plan, "_adds_dkdv", lambda *args: adds.append(real(*args)) or adds[-1])
    replayed, run = [], plan.BackwardPlan.run
    monkeypatch.setattr(plan.BackwardPlan, "run", lambda self, *a, **kw: replayed.append(self.dkv_sums) or run(self, *a, **kw))
    for per_block in sorted({1, group // 2} - {0}):
        plan.forget()
        monkeypatch.setattr(plan, "_heads_per_block_adding", lambda group, rows, steps, n=per_block, **_: n)
        monkeypatch.setattr(plan, "_heads_per_block", lambda group, rows, tiles, n=per_block: n)
        for call, deterministic in enumerate((False, False, True)):
            adds.clear()
            check_against_reference(dtype, q, k, v, dout, gpu=True, deterministic=deterministic, **options)
            # (the second call replays the first's plan where it can: the rules are not asked again)
            assert (adds or call == 1) and all(taken == (not deterministic) for taken in adds), adds
    if q_shape[-1] % 8 == 0 and not (blhd or padding or alibi):  # (inputs read in place: replayed)
        assert replayed and all(sums is not None for sums in replayed), replayed


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cupy_graph_capture_and_replay(rng, dtype):
    q, k, v, dout = _draw(rng, dtype, (2, 4, 256, 64), (2, 2, 256, 64), (2, 2, 256, 64), (2, 4, 256, 64))
    # Warm up: plans and kernels exist before the capture (compiling inside one is not possible).
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        g_out, g_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        g_grads = cuflash.attention_backward(dout, q, k, v, g_out, g_lse, causal=True, deterministic=True)
        graph = stream.end_capture()
    for _ in range(2):
        for x in (q, k, v, dout):
            x[...] = cupy.asarray(rng.standard_normal(x.shape).astype(numpy.dtype(dtype)))
        with stream:
            graph.launch()
        stream.synchronize()
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
        for ours, eager in zip((g_out, g_lse, *g_grads), (out, lse, *grads)):
            assert _bits(ours) == _bits(eager)


def _torch():
    return pytest.importorskip("torch")


def _captured_training_step(torch, leaves, attend, dout):
    """``(graph, out, grads)``: a step (``attend()``, then the backward of ``dout`` into ``leaves``)
    warmed up on a side stream (plans and kernels), then captured into a torch CUDA graph, whose
    replays write out and the grads in place."""
    def step():
        for x in leaves:
            x.grad = None
        out = attend()
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out, [x.grad for x in leaves]


def test_torch_calls_allocate_from_torch_only(rng):
    torch = _torch()
    import cuflash.torch as ct

    pool = cupy.get_default_memory_pool()
    for length in (300, 300, 301):  # a new signature (the full path), a replay, a new one
        q, k, v = (torch.randn(2, 4, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        torch.cuda.synchronize()
        used = pool.used_bytes()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = ct.attention(q, k, v, causal=True)
        assert torch.cuda.memory_allocated() - before >= out.numel() * 2 + 2 * 4 * length * 4  # out + lse
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        assert pool.used_bytes() == used, "CuPy's pool grew: memory beside torch's allocator"
        assert torch.cuda.max_memory_allocated() - before >= 3 * q.numel() * 2  # the gradients
        del q, k, v, out


def test_torch_plans_keep_none_of_torchs_memory(rng):
    """What a plan keeps for all its calls (the bias's and mask's row offsets, a shared bias's
    plane tables) is not torch's memory: after a signature's first forward and backward with a
    bias (its gradient summed over shared planes) and a mask, once the results are dropped, torch's
    allocator holds what it held before. A block kept past the call would sit in a CUDA graph's
    private pool when that call is the graph's warm-up (torch.compile's reduce-overhead refuses
    the graph)."""
    torch = _torch()
    import cuflash.torch as ct

    plan.forget()
    q, k, v = (torch.randn(2, 3, 4, 97, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(2, 1, 4, 97, 97, device="cuda", dtype=torch.float32, requires_grad=True)
    mask = torch.rand(97, 97, device="cuda") > 0.2
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for deterministic in (False, True):  # (the shared bias's adds, then its on-chip or dS sum)
        out = ct.attention(q, k, v, bias=bias, mask=mask, deterministic=deterministic)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
        assert all(bool(g.isfinite().all()) for g in grads)
        del out, grads
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before, "a plan kept a block of torch's"


def test_torch_cuda_graph_capture_and_replay(rng):
    torch = _torch()
    import cuflash.torch as ct

    shapes = [(2, 8, 256, 128), (2, 2, 256, 128), (2, 2, 256, 128)]
    static = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    dout = torch.randn(shapes[0], device="cuda", dtype=torch.bfloat16)
    graph, g_out, g_grads = _captured_training_step(
        torch, static, lambda: ct.attention(*static, causal=True, deterministic=True), dout)
    for _ in range(2):
        with torch.no_grad():
            for x in (*static, dout):
                x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        eager_in = [x.detach().clone().requires_grad_() for x in static]
        eager_out = ct.attention(*eager_in, causal=True, deterministic=True)
        eager_out.backward(dout)
        torch.testing.assert_close(g_out, eager_out, rtol=0, atol=0)
        for ours, x in zip(g_grads, eager_in):
            torch.testing.assert_close(ours, x.grad, rtol=0, atol=0)


def test_threads_on_their_own_streams_share_plans_safely(rng):
    """8 threads, each on its own CuPy stream, call the same signatures at once (plans are shared,
    the params bytes are per thread): every result equals the one computed alone."""
    import threading

    shapes = [(2, 4, 200, 64), (2, 2, 200, 64)]
    inputs = [_draw(rng, "bfloat16", shapes[0], shapes[1], shapes[1], shapes[0]) for _ in range(8)]
    expected = []
    for q, k, v, dout in inputs:  # alone, on the default stream
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        expected.append([out, *cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)])
    cupy.cuda.Device().synchronize()
    results, errors = [None] * 8, []

    def work(i):
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                q, k, v, dout = inputs[i]
                for _ in range(5):
                    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
                    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
                stream.synchronize()
            results[i] = [out, *grads]
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert _bits(a) == _bits(b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_arrays_on_the_second_gpu_are_computed_there(rng, dtype):
    """Inputs on GPU 1 while GPU 0 is current: the kernels load and launch on GPU 1 (the call makes
    it current), outputs and gradients live there, and each equals the same call on GPU 0 bit for
    bit, dense and packed, on the full path and on replays; a plan made for one device never
    answers the other (the current device is part of the signature, and the arrays' device)."""
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    host = [rng.standard_normal(s).astype(numpy.dtype(dtype)) for s in ((2, 8, 97, 64), (2, 2, 200, 64),
                                                                       (2, 2, 200, 64), (2, 8, 97, 64))]
    cu = numpy.array([0, 40, 40, 97 * 2], numpy.int32)  # a packed batch of three (one empty)
    results = {}
    for device in (0, 1, 0, 1):  # twice each: the second call of a device replays its plans
        with cupy.cuda.Device(device):
            q, k, v, dout = (cupy.asarray(x) for x in host)
            packed = [cupy.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]))
                      for x in (q, k[:, :, :97], v[:, :, :97], dout)]
            cu_d = cupy.asarray(cu)
        # GPU 0 current for the calls themselves
        with cupy.cuda.Device(0):
            out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
            grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
            pout, plse = cuflash.attention_varlen(*packed[:3], cu_d, cu_d, max_seqlen_q=154, max_seqlen_k=154,
                                                  causal=True, return_lse=True)
            pgrads = cuflash.attention_varlen_backward(packed[3], *packed[:3], pout, plse, cu_d, cu_d,
                                                       max_seqlen_q=154, max_seqlen_k=154, causal=True)
            arrays = (out, lse, *grads, pout, plse, *pgrads)
            assert all(x.device.id == device for x in arrays), "a result left the inputs' GPU"
            bits = [_bits(x) for x in arrays]
        results.setdefault(device, []).append(bits)
    for device, runs in results.items():
        assert runs[0] == runs[1], f"a replay on GPU {device} differs from its full path"
    assert results[0][0] == results[1][0], "GPU 1 computed something else than GPU 0"
    reference = cuflash.attention(*(x.astype(numpy.float64) for x in host[:3]), causal=True)
    from tolerance import assert_close

    with cupy.cuda.Device(1):
        q, k, v = (cupy.asarray(x) for x in host[:3])
    with cupy.cuda.Device(0):
        out = cuflash.attention(q, k, v, causal=True)
    baseline = None
    if dtype == "bfloat16":
        from reference import attention_ref_dtype

        baseline = attention_ref_dtype(*host[:3], numpy.dtype(dtype), causal=True)[0]
    assert_close(cupy.asnumpy(out), reference, dtype=numpy.dtype(dtype), baseline=baseline, name="out on GPU 1")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_outputs_and_gradients_keep_their_inputs_memory_order(rng, dtype, heads, resolutions):
    """(B, L, H, D) buffers passed as (B, H, L, D) views: out is laid out as q, dq as q, dk as k,
    dv as v (a caller's transpose back is contiguous, no copy), on the full path and on a
    replay, with the values of the same call on C-contiguous inputs."""
    hq, hk = heads
    q_buffer, k_buffer, v_buffer, dout_buffer = _draw(rng, dtype, (2, 97, hq, 64), (2, 130, hk, 64), (2, 130, hk, 64),
                                                      (2, 97, hq, 64))
    q, k, v, dout = (x.transpose(0, 2, 1, 3) for x in (q_buffer, k_buffer, v_buffer, dout_buffer))
    plain = [cupy.ascontiguousarray(x) for x in (q, k, v, dout)]
    want_out, want_lse = cuflash.attention(*plain[:3], causal=True, return_lse=True)
    want_grads = cuflash.attention_backward(plain[3], *plain[:3], want_out, want_lse, causal=True, deterministic=True)
    for replay in (False, True):
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
        assert out.transpose(0, 2, 1, 3).flags.c_contiguous, replay
        for name, grad, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            assert grad.shape == x.shape and grad.transpose(0, 2, 1, 3).flags.c_contiguous, (name, replay)
        assert _bits(out) == _bits(want_out) and _bits(lse) == _bits(want_lse), replay
        for grad, want in zip(grads, want_grads):
            assert _bits(grad) == _bits(want), replay
    assert resolutions == {"forward": 2, "backward": 2}  # the plain call's and the first round's: the second replayed


def test_a_broadcast_or_sliced_input_gets_c_contiguous_results(rng):
    """Only a whole transposed buffer lends its order: a broadcast key/value head axis (MQA) or
    a sliced q gives C-contiguous results, as before."""
    q_buffer, k, v = _draw(rng, "float16", (2, 64, 4, 96), (2, 1, 80, 64), (2, 1, 80, 64))
    q = q_buffer.transpose(0, 2, 1, 3)[..., :64]  # rows of 96: not a whole buffer
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    grads = cuflash.attention_backward(cupy.ones_like(out), q, k, v, out, lse)
    assert out.flags.c_contiguous and all(g.flags.c_contiguous for g in grads)


@contextlib.contextmanager
def _poisoned_allocations():
    """Every CuPy allocation in the block starts as 0xFF bytes (NaN in every float format), so an
    output element a kernel never writes shows up as NaN."""
    pool = cupy.get_default_memory_pool()

    def allocate(size):
        memory = pool.malloc(size)
        if size:
            cupy.cuda.runtime.memsetAsync(memory.ptr, 0xFF, size, cupy.cuda.get_current_stream().ptr)
        return memory

    cupy.cuda.set_allocator(allocate)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(pool.malloc)


# Rows whose every key fits one key tile of the dK/dV kernel (plan._stores_dq): (q shape, k shape,
# Dv, options, whether bwd_dkdv_tc stores dQ itself in 16-bit: d32 and d96 run on it on every
# arch; never in TF32, where the branch spilled).
SHORT_CASES = [
    ((3, 4, 49, 32), (3, 4, 49, 32), 32, {}, True),
    ((2, 3, 49, 32), (2, 3, 49, 32), 32, dict(bias=(1, 3, 49, 49), mask=(2, 1, 49, 49)), True),  # Swin
    ((2, 8, 1, 32), (2, 2, 128, 32), 32, dict(softcap=20.0), True),  # GQA; Lk = the d32 key tile
    ((2, 4, 200, 32), (2, 4, 61, 32), 32, dict(sinks=True, alibi=True), True),  # several query tiles
    ((2, 4, 70, 96), (2, 4, 100, 96), 96, {}, True),  # bucket 96: a 64 x 128 tile
    ((2, 4, 97, 32), (2, 4, 97, 32), 32, dict(causal=True), False),  # a window: rows may see no key
    ((2, 4, 97, 32), (2, 4, 200, 32), 32, {}, False),  # two key tiles
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda c: f"{c[0][2]}x{c[1][2]}d{c[0][3]}-" + "-".join(c[3]))
def test_short_rows_take_dq_from_the_dkdv_kernel(rng, dtype, case, monkeypatch):
    """Where one key tile holds every key, the dK/dV kernel stores dQ itself (no dq_accum, no
    conversion launch): against the float64 reference with every allocation poisoned (a dQ
    element left unwritten is NaN), bit for bit equal to the atomic path's dQ (one block's sum
    added once to zeros, then scaled and rounded as here), and taken by deterministic calls
    too. (float32 keeps the atomic route: tiles.py's stores_dq.)"""
    from test_bias_mask import check_against_reference

    q_shape, k_shape, dv, options, direct = case
    options = dict(options)
    heads = q_shape[1]
    q, k, v, dout = _draw(rng, dtype, q_shape, k_shape, k_shape[:-1] + (dv,), q_shape[:-1] + (dv,))
    if "bias" in options:
        options["bias"] = rng.standard_normal(options["bias"]).astype(numpy.float32)
        options["mask"] = rng.random(options["mask"]) < 0.7
    if options.pop("alibi", False):
        options["alibi_slopes"] = (2.0 ** -numpy.arange(1, heads + 1)).astype(numpy.float32)
    if options.pop("sinks", False):
        options["sinks"] = rng.standard_normal(heads).astype(numpy.float32)
    taken, real = [], plan._stores_dq
    monkeypatch.setattr(plan, "_stores_dq", lambda *args: taken.append(real(*args)) or taken[-1])
    plan.forget()
    with _poisoned_allocations():
        _, _, grads = check_against_reference(dtype, q, k, v, dout, gpu=True, **options)
    assert taken and all(t == direct for t in taken), taken
    dq = numpy.ascontiguousarray(grads[0]).tobytes()
    on_gpu = {n: (cupy.asarray(x) if isinstance(x, numpy.ndarray) else x) for n, x in options.items()}
    for route, rule, deterministic in (("deterministic", real, True), ("atomic", lambda *args: False, False)):
        plan.forget()
        taken.clear()
        monkeypatch.setattr(plan, "_stores_dq", lambda *args, rule=rule: taken.append(rule(*args)) or taken[-1])
        out, lse = cuflash.attention(q, k, v, return_lse=True, **on_gpu)
        other = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **on_gpu)
        assert taken == [direct and route == "deterministic"], (route, taken)
        if direct or route == "atomic":  # (the deterministic dQ kernel sums in its own order)
            assert _bits(other[0]) == dq, f"dQ differs from the {route} route's"
        # A replay of the plan: every gradient the same bits when deterministic, dQ in both routes
        # (one block adds each row's dQ; dK/dV sums of a split group and dbias may add in any order)
        again = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **on_gpu)
        compared = zip(again, other) if deterministic else [(again[0], other[0])]
        assert all(_bits(a) == _bits(b) for a, b in compared), f"the {route} route's replay differs"


# Every sequence within 64 queries and keys (plan._short_rows): float32's FFMA kernels take their
# 64 x 64 tile in buckets 32 and 64 (tiles.py's _SIMT_SHORT_TILES), else the long rows' tiles
# (forward and dQ 128 rows, dK/dV 128 keys where no modifier asks 64).
SHORT_FFMA_CASES = [
    ((3, 4, 49, 32), (3, 4, 49, 32), {}, True),
    ((2, 3, 49, 32), (2, 3, 49, 32), dict(bias=(1, 3, 49, 49), mask=(2, 1, 49, 49)), True),  # Swin
    ((2, 8, 1, 32), (2, 2, 64, 32), dict(softcap=20.0, causal=True), True),  # GQA, a decode-like row
    ((2, 4, 64, 59), (2, 4, 17, 59), dict(alibi=True, sinks=True, window=(5, 3)), True),  # bucket 64
    ((2, 4, 33, 24), (2, 4, 40, 24), dict(bias=(2, 4, 33, 40), scale=-0.4), True),
    ((2, 4, 65, 32), (2, 4, 49, 32), {}, False),  # one sequence past SHORT_ROWS: the long rows' tiles
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", SHORT_FFMA_CASES, ids=lambda c: f"{c[0][2]}x{c[1][2]}d{c[0][3]}-" + "-".join(c[2]))
def test_short_rows_float32_take_the_64_row_ffma_tiles(rng, case, deterministic, monkeypatch):
    """float32 (FFMA, precision "highest") on short rows: fwd_simt, bwd_dkdv_simt and (when
    deterministic) bwd_dq_simt at 64 x 64 against the float64 reference, every allocation
    poisoned; the tiles taken are checked (one sequence past SHORT_ROWS: the long rows' forward,
    3xTF32 at d32, and the backward's long-row tiles: dK/dV and the deterministic dQ in 3xTF32 on
    Hopper)."""
    from test_bias_mask import check_against_reference

    q_shape, k_shape, options, short = case
    options = dict(options)
    heads = q_shape[1]
    q, k, v, dout = _draw(rng, "float32", q_shape, k_shape, k_shape, q_shape)
    if "bias" in options:
        options["bias"] = rng.standard_normal(options["bias"]).astype(numpy.float32)
    if "mask" in options:
        options["mask"] = rng.random(options["mask"]) < 0.7
    if options.pop("alibi", False):
        options["alibi_slopes"] = (2.0 ** -numpy.arange(1, heads + 1)).astype(numpy.float32)
    if options.pop("sinks", False):
        options["sinks"] = rng.standard_normal(heads).astype(numpy.float32)
    forward, backward, real_forward, real_backward = [], [], plan.tiles.select, plan.tiles.select_backward
    monkeypatch.setattr(plan.tiles, "select", lambda *a, **kw: forward.append(real_forward(*a, **kw)) or forward[-1])
    monkeypatch.setattr(plan.tiles, "select_backward",
                        lambda *a, **kw: backward.append(real_backward(*a, **kw)) or backward[-1])
    plan.forget()
    with _poisoned_allocations():
        check_against_reference("float32", q, k, v, dout, gpu=True, deterministic=deterministic, **options)
    assert forward and backward, (forward, backward)
    hopper = plan.kernels.arch_for_capability(*map(int, cupy.cuda.Device().compute_capability)) == "90a"
    for variant in (forward if short else []) + [b.dkdv for b in backward] + [b.dq for b in backward]:
        if not short and hopper:  # long rows on Hopper: dK/dV and the deterministic dQ in 3xTF32
            dkdv = variant in [b.dkdv for b in backward]
            assert variant.kernel == ("bwd_dkdv_wgmma_x3" if dkdv else "bwd_dq_wgmma_x3"), variant
            continue
        assert variant.kernel.endswith("_simt"), variant
        if short:
            assert (variant.block_m, variant.block_n) == (64, 64), variant
    if not short:  # the long rows' forward without modifiers: 3xTF32 on tensor cores (up to d64)
        assert all(variant.kernel in ("fwd_tc", "fwd_wgmma") and variant.precision == "highest"
                   for variant in forward), forward
