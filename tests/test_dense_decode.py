"""Dense calls with a few query rows a head on the decode kernel (cuflash/_gpu/decode.py's
``dense_reason`` / ``dense_forward`` / ``DenseDecodePlan``): which calls take it (without a GPU:
CuPy arrays over made-up addresses, never dereferenced), then on the GPU the routed calls against
the float64 reference (every option the kernel takes), their replays, q's memory order kept, and
the torch adapter's forward (replayed on torch's memory) with its backward."""
from __future__ import annotations

import dataclasses
import types

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

from reference import score_mods_ref, to_numpy
from tolerance import assert_close

import cuflash  # noqa: E402
from cuflash import _spec  # noqa: E402

_NEXT = [1 << 40]


def _fake(cupy, shape, dtype="float16", offset=0, strides=None):
    """A CuPy array at a made-up, 256-byte aligned address (+ ``offset`` bytes): its layout facts
    are real, its memory is never touched."""
    dtype = numpy.dtype(dtype)
    if strides is None:
        strides = tuple(int(numpy.prod(shape[i + 1:])) * dtype.itemsize for i in range(len(shape)))
    size = sum((n - 1) * s for n, s in zip(shape, strides)) + dtype.itemsize
    ptr = _NEXT[0]
    _NEXT[0] += -(-size // 256) * 256 + 256
    memory = cupy.cuda.UnownedMemory(ptr + offset, size, None, 0)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0), strides)


def _problem(cupy, lq=1, lk=4096, heads=(16, 2), d=128, dtype="float16", **changes):
    heads_q, heads_k = heads
    fields = dict(q=_fake(cupy, (2, heads_q, lq, d), dtype), k=_fake(cupy, (2, heads_k, lk, d), dtype),
                  v=_fake(cupy, (2, heads_k, lk, d), dtype), packed=None, bias=None, mask=None, out=None,
                  alibi_slopes=None, sinks=None, kv_group=heads_q // heads_k, seqlen_q=lq, seqlen_k=lk,
                  dropout_seed=None)
    fields.update(changes)
    return types.SimpleNamespace(**fields)


def test_which_dense_calls_the_decode_kernel_takes():
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import decode

    assert decode.dense_reason(_problem(cupy)) is None  # one decoding step, GQA 8:1
    assert decode.dense_reason(_problem(cupy, lq=8)) is None  # 8 x 8 = 64 rows: one row chunk
    assert decode.dense_reason(_problem(cupy, lq=64, heads=(4, 4))) is None  # MHA, 64 rows
    assert decode.dense_reason(_problem(cupy, lq=64, heads=(4, 4), alibi_slopes=object())) is None
    assert decode.dense_reason(_problem(cupy, lq=1, heads=(16, 16), d=64, dtype="bfloat16")) is None
    for changes, says in [
        (dict(lq=9), "72 rows a head block"),  # 9 x 8
        (dict(lq=65, heads=(4, 4)), "65 rows"),
        (dict(dtype="float32"), "dtype float32"),
        (dict(d=59), "head dims"),
        (dict(d=256), "head dims"),
        (dict(bias=object()), "a bias"),
        (dict(mask=object()), "a mask"),
        (dict(out=object()), "out="),
        (dict(packed=object()), "a packed batch"),
        (dict(lk=0), "no key"),
        (dict(dropout_seed=7), "dropout"),
    ]:
        reason = decode.dense_reason(_problem(cupy, **changes))
        assert reason is not None and says in reason, (changes, reason)
    p = _problem(cupy)
    # multi-query, one kv head: a head axis of 1 (which _spec resolves as a broadcast, kv_group 1)
    # or a view broadcast over q's heads (stride 0)
    assert _spec._broadcast_leading((2, 6), (2, 1), (2, 1))[2] == 1
    one = _problem(cupy, heads=(6, 1), kv_group=1)
    wide = _problem(cupy, heads=(6, 6), k=cupy.broadcast_to(one.k, (2, 6, 4096, 128)),
                    v=cupy.broadcast_to(one.v, (2, 6, 4096, 128)))
    for mqa in (one, wide):
        assert decode.dense_reason(mqa) is None
        k, v, group = decode._kv_heads(mqa)
        assert (k.shape, v.shape, group, k.data.ptr) == ((2, 1, 4096, 128), (2, 1, 4096, 128), 6, one.k.data.ptr)
        assert "72 rows" in decode.dense_reason(_problem(cupy, lq=12, heads=(6, 6), k=mqa.k, v=mqa.v, kv_group=1))
    assert "broadcast" in decode.dense_reason(_problem(cupy, k=p.k[:1], v=p.v[:1]))
    wide = _fake(cupy, (1, 2, 4096, 128), strides=(0, 4096 * 128 * 2, 256, 2))  # a batch axis of stride 0
    assert "broadcast" in decode.dense_reason(_problem(cupy, k=cupy.broadcast_to(wide, (2, 2, 4096, 128))))
    assert "in place" in decode.dense_reason(_problem(cupy, q=_fake(cupy, (2, 16, 1, 128), offset=2)))
    assert "k_cache's strides" in decode.dense_reason(_problem(cupy, k=_fake(cupy, (2, 2, 4096, 128), offset=2)))
    assert "not (B, H, L, D)" in decode.dense_reason(_problem(cupy, q=_fake(cupy, (16, 1, 128))))


# --- GPU ----------------------------------------------------------------------------------------


@pytest.fixture
def routed(monkeypatch):
    """decode.dense_forward wrapped: the calls planned on the decode kernel, counted, from no kept
    plan or family (another test's family of the same signature but Lk would plan this test's
    first call without dense_forward)."""
    from cuflash._gpu import decode, plan

    monkeypatch.setattr(plan, "PLANS", {})
    monkeypatch.setattr(plan, "FAMILIES", {})
    calls, real = [], decode.dense_forward
    monkeypatch.setattr(decode, "dense_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _inputs(cupy, rng, dtype, batch, heads, lq, lk, d, layout="bhld"):
    heads_q, heads_k = heads
    arrays = []
    for h, length in ((heads_q, lq), (heads_k, lk), (heads_k, lk)):
        host = rng.standard_normal((batch, length, h, d) if layout == "blhd" else (batch, h, length, d))
        x = cupy.asarray(host.astype(numpy.dtype(dtype)))
        arrays.append(x.transpose(0, 2, 1, 3) if layout == "blhd" else x)
    return arrays


def _check(dtype, q, k, v, out, lse, options):
    exact = [to_numpy(x).astype(numpy.float64) for x in (q, k, v)]
    host = {name: None if x is None else to_numpy(x).astype(numpy.float64) for name, x in options.items()
            if name in ("alibi_slopes", "sinks")}
    plain = {name: x for name, x in options.items() if name not in host}
    ref_out, ref_lse = score_mods_ref(*exact, **plain, **host)
    baseline_out, baseline_lse = score_mods_ref(*exact, **plain, **host, dtype=numpy.dtype(dtype))
    assert_close(to_numpy(out).astype(numpy.float64), ref_out, dtype=numpy.dtype(dtype), baseline=baseline_out,
                 name="out")
    # lse is float32, but its scores are q's precision: bf16 kernels take softcap's tanh on the special-function
    # unit (score_mod.cuh, relative error 2^-11), which 64 float32 ulps alone did not always cover (two seeds in
    # 384 cases, 2026-12-04). The same-dtype baseline's lse error bounds it, as in test_score_mods.
    assert_close(to_numpy(lse).astype(numpy.float64), ref_lse, dtype=numpy.float32, baseline=baseline_lse,
                 kind="lse", name="lse")


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "top-left": dict(causal="top_left"),
    "window": dict(window=(100, 3)),
    "softcap": dict(softcap=5.0, scale=0.3),
    "negative-scale": dict(scale=-0.2, causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("lq, lk", [(1, 1), (1, 97), (3, 1025), (8, 200), (1, 20000)])
@pytest.mark.parametrize("heads", [(16, 2), (4, 4), (6, 1)], ids=["gqa8", "mha", "mqa6"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_routed_calls_match_the_reference_and_replay_their_bits(rng, routed, dtype, heads, lq, lk, option):
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import decode

    options = OPTIONS[option]
    d = 64 if heads == (4, 4) else 128
    q, k, v = _inputs(cupy, rng, dtype, 2, heads, lq, lk, d)
    expected_route = (heads[0] // heads[1]) * lq <= decode.DENSE_MAX_ROWS
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    assert len(routed) == int(expected_route)
    _check(dtype, q, k, v, out, lse, options)
    again = cuflash.attention(q, k, v, return_lse=True, **options)  # the kept plan (no dense_forward)
    assert len(routed) == int(expected_route)
    assert to_numpy(again[0]).tobytes() == to_numpy(out).tobytes()
    assert to_numpy(again[1]).tobytes() == to_numpy(lse).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_routed_alibi_and_sinks_are_read_again_by_each_replay(rng, routed, dtype):
    cupy = pytest.importorskip("cupy")
    q, k, v = _inputs(cupy, rng, dtype, 3, (8, 2), 2, 3000, 128)
    for _ in range(2):  # planned, then replayed with other values of the same signature
        slopes = cupy.asarray(rng.uniform(0.01, 0.2, 8).astype(numpy.float32))
        sinks = cupy.asarray(rng.standard_normal((3, 8)).astype(numpy.float32))
        out, lse = cuflash.attention(q, k, v, causal=True, alibi_slopes=slopes, sinks=sinks, return_lse=True)
        _check(dtype, q, k, v, out, lse, dict(causal=True, alibi_slopes=slopes, sinks=sinks))
    assert len(routed) == 1


@pytest.mark.gpu
def test_gpu_routed_output_keeps_qs_memory_order(rng, routed):
    cupy = pytest.importorskip("cupy")
    q, k, v = _inputs(cupy, rng, "bfloat16", 2, (16, 4), 1, 777, 128, layout="blhd")
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert len(routed) == 1
    assert out.transpose(0, 2, 1, 3).flags.c_contiguous  # (B, L, H, D) in memory, as q
    _check("bfloat16", q, k, v, out, lse, {})


@pytest.mark.gpu
def test_gpu_torch_decode_step_forward_on_the_decode_kernel_and_its_gradients(rng, routed):
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    shapes = [(2, 16, 1, 128), (2, 2, 1500, 128), (2, 2, 1500, 128)]
    host = [rng.standard_normal(s) for s in shapes]
    tensors = [torch.tensor(x, dtype=torch.bfloat16, device="cuda", requires_grad=True) for x in host]
    dout = torch.tensor(rng.standard_normal(shapes[0]), dtype=torch.bfloat16, device="cuda")
    results = []
    for _ in range(2):  # planned, then replayed on torch's memory
        out = ct.attention(*tensors)
        grads = torch.autograd.grad(out, tensors, dout)
        results.append((out, grads))
    assert len(routed) == 1
    assert torch.equal(results[0][0], results[1][0])
    exact = [x.detach().double() for x in tensors]
    ref = torch.nn.functional.scaled_dot_product_attention(*exact, enable_gqa=True)
    ref_grads = torch.autograd.grad(
        torch.nn.functional.scaled_dot_product_attention(*(x.requires_grad_() for x in exact), enable_gqa=True),
        exact, dout.double())
    assert torch.allclose(results[1][0].double(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(results[1][1], ref_grads):
        assert torch.allclose(got.double(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("splits", [1, 3])
def test_a_dense_decode_plan_fills_its_params_from_this_calls_memory(monkeypatch, splits):
    """DenseDecodePlan.run without a GPU (a memory that hands out made-up addresses, the driver's
    launches recorded with the params they were given): out and lse allocated in the plan's
    shapes and order, this call's q/k/v/out/lse addresses, every sequence's length Lk, the
    per-row slopes and sinks copied into (B, Hq) float32 rows, and with splits the partial outs
    then the partial lse in one workspace; the layout's template (q's strides, options) kept, its
    length and k/v strides the plan's (a layout serves every Lk of as many key tiles)."""
    import ctypes

    pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver

    from cuflash._gpu import decode

    params = []
    monkeypatch.setattr(driver, "launchKernel", lambda *args: params.append(
        numpy.frombuffer(ctypes.string_at(ctypes.c_uint64.from_address(args[9]).value, decode.PARAMS_DTYPE.itemsize),
                         dtype=decode.PARAMS_DTYPE)[0].copy()))

    class Memory:
        def __init__(self):
            self.next, self.made, self.copies = 1 << 40, [], []

        def empty(self, shape, dtype, order=None):
            assert isinstance(dtype, numpy.dtype), dtype  # (torch's memory maps a dtype object's name)
            array = types.SimpleNamespace(shape=tuple(shape), dtype=dtype, order=order, ptr=self.next)
            self.next += 1 << 20
            self.made.append(array)
            return array

        @staticmethod
        def pointer(array):
            return array.ptr

        def copy(self, target, source):
            self.copies.append((target, source))

        @staticmethod
        def stream():
            return 77

    template = numpy.zeros((), dtype=decode.PARAMS_DTYPE)
    template["q_head_stride"], template["fwd"]["scale"] = 640, 0.125
    kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=5))
    layout = decode._Layout(template.tobytes(), False, False, False, False, kernel, kernel if splits > 1 else None,
                            16 * splits, 4 if splits > 1 else 0, 4096, splits, decode._carving(()))
    template["capacity"], template["k_row_stride"] = 2999, 7  # (a shorter call's layout: replaced below)
    layout = dataclasses.replace(layout, template=template.tobytes())
    kv_strides = (3000 * 256, 3000 * 128, 128, 3000 * 512, 3000 * 256, 256)
    plan = decode.DenseDecodePlan(layout, (2, 8, 1, 128), (0, 2, 1, 3), (2, 8, 1), numpy.dtype("float16"), 3000,
                                  kv_strides)
    memory = Memory()
    q, k, v = (types.SimpleNamespace(ptr=p) for p in (100, 200, 300))
    slopes, sinks = object(), object()
    o, lse = plan.run(memory, q, k, v, alibi_slopes=slopes, sinks=sinks)
    assert (o.shape, o.dtype, o.order) == ((2, 8, 1, 128), numpy.float16, (0, 2, 1, 3))
    assert (lse.shape, lse.dtype) == ((2, 8, 1), numpy.float32)
    rows = [target for target, _ in memory.copies]
    assert [source for _, source in memory.copies] == [slopes, sinks]
    assert all(r.shape == (2, 8) and r.dtype == numpy.float32 for r in rows)
    assert len(params) == (2 if splits > 1 else 1)  # decode_tc, then decode_combine
    for p in params:
        assert (p["q"], p["k_cache"], p["v_cache"], p["o"], p["lse"]) == (100, 200, 300, o.ptr, lse.ptr)
        assert p["seqlen_fixed"] == p["capacity"] == 3000 and p["q_head_stride"] == 640 and p["fwd"]["scale"] == 0.125
        assert tuple(int(p[f"{x}_{axis}_stride"]) for x in "kv" for axis in ("page", "head", "row")) == kv_strides
        assert (p["fwd"]["alibi_slopes"], p["fwd"]["sinks"]) == (rows[0].ptr, rows[1].ptr)
        if splits > 1:
            (workspace,) = [a for a in memory.made if a.shape == (splits * 16 * 129,)]
            assert p["part_o"] == workspace.ptr and p["part_lse"] == workspace.ptr + 4 * splits * 16 * 128
        else:
            assert p["part_o"] == 0 and p["part_lse"] == 0


def _routed_problem(cupy, lq=1, lk=4096, causal=True, window_left=-1, **changes):
    """A resolved routed call as dense_forward sees it (_problem plus the mask and options)."""
    p = _problem(cupy, lq=lq, lk=lk, **changes)
    p.window_left, p.window_right = window_left, 0 if causal else -1
    p.diag_offset, p.scale, p.softcap = lk - lq, 0.125, None
    p.dtype, p.lse_shape = p.q.dtype, p.q.shape[:3]
    return p


def test_a_decoding_family_plans_the_next_key_counts_without_the_full_path(monkeypatch):
    """DenseDecodeFamily: which routed calls have one (a mask that reads the same at every Lk),
    what plan_for refuses (the full path decides), and its plans: the new Lk and k/v strides in
    their params, one layout per count of key tiles (64 keys at D 128)."""
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import decode

    built = []

    def layout(q, k, v, **kw):  # the layout's template from the options _dense_plan passes
        built.append((k.shape[2], kw["capacity"]))
        template = numpy.zeros((), dtype=decode.PARAMS_DTYPE)
        template["fwd"]["window_right"], template["bottom_right"] = kw["window_right"], kw["bottom_right"]
        kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=5))
        return decode._Layout(template.tobytes(), False, False, False, False, kernel, None, 16, 0, 4096, 1,
                              decode._carving(()))

    monkeypatch.setattr(decode, "_layout", layout)
    monkeypatch.setattr(decode, "_DENSE_LAYOUTS", {})
    family_of = decode.DenseDecodeFamily.of

    def family(p):
        k, v, _ = decode._kv_heads(p)
        o = _fake(cupy, p.q.shape[:3] + (128,))
        options = (p.scale, p.window_left, p.window_right, p.diag_offset == p.seqlen_k - p.seqlen_q, None, False,
                   False)
        return family_of(p, k, v, o, None, options)

    assert family(_routed_problem(cupy, window_left=100)) is None  # (a side clamped to Lq + Lk)
    assert family(_routed_problem(cupy, lq=1, lk=1)) is None  # causal with Lk == Lq: which diagonal?
    assert family(_routed_problem(cupy, lq=1, lk=1, causal=False)) is not None
    f = family(_routed_problem(cupy))
    def rows(lk):  # (B, Hk=2, Lk, 128) contiguous, in elements
        return (2 * lk * 128, lk * 128, 128, 1)

    for lengths, strides in [((4097, 4098), (rows(4097), rows(4098))), ((0, 0), (rows(0), rows(0))),
                             ((4097, 4097), ((2 * 4097 * 128, 4097 * 128, 128, 2), rows(4097))),
                             ((4097, 4097), ((2 * 4097 * 128, 4097 * 128, 132, 1), rows(4097))),
                             ((4097, 4097), ((0, 4097 * 128, 128, 1), rows(4097)))]:
        assert f.plan_for(lengths, strides) is None, (lengths, strides)
    plans = {lk: f.plan_for((lk, lk), (rows(lk), rows(lk))) for lk in (4097, 4100, 4160, 4161)}
    assert built == [(4097, 4097), (4161, 4161)]  # 4097..4160: 65 tiles of 64 keys; 4161: 66
    for lk, plan in plans.items():
        p = numpy.frombuffer(plan.template, dtype=decode.PARAMS_DTYPE)[0]
        assert plan.seqlen_k == p["seqlen_fixed"] == p["capacity"] == lk and plan.family is None
        assert (p["k_head_stride"], p["v_page_stride"], p["k_row_stride"]) == (lk * 128, 2 * lk * 128, 128)
        assert p["fwd"]["window_right"] == 0 and p["bottom_right"] == 1
    # one kv head broadcast over q's heads (a stride-0 view): its family takes such views only
    one = _routed_problem(cupy, heads=(6, 1), kv_group=1)
    wide = _routed_problem(cupy, heads=(6, 6), kv_group=1, k=cupy.broadcast_to(one.k, (2, 6, 4096, 128)),
                           v=cupy.broadcast_to(one.v, (2, 6, 4096, 128)))
    f = family(wide)
    view = (4097 * 128, 0, 128, 1)
    assert f.broadcast_heads and f.plan_for((4097, 4097), ((4097 * 128, 128, 128, 1), view)) is None
    assert f.plan_for((4097, 4097), (view, view)).layout is not None
    assert not family(one).broadcast_heads


def test_family_keys_leave_out_k_and_vs_key_count_and_strides(monkeypatch):
    """plan.family_key on both key formats (CuPy's signature: dtype, shape, strides, alignment;
    the torch adapter's: dtype, shape, stride, device, alignment), and family_plan: a remembered
    plan's family plans a call of another Lk, kept under that call's own key."""
    pytest.importorskip("cupy")
    from cuflash._gpu import plan

    f16 = numpy.dtype("float16")
    q = (f16, (2, 16, 1, 128), (4096, 256, 4096, 2), True)

    def cupy_key(lk):
        kv = (f16, (2, 2, lk, 128), (lk * 512, lk * 256, 256, 2), True)
        return ("attention", ("options",), q, kv, kv, 0)

    def torch_key(lk):
        kv = (f16, (2, 2, lk, 128), (lk * 256, lk * 128, 128, 1), "cuda:0", True)
        return ("attention", ("options",), q, kv, kv)

    for key in (cupy_key, torch_key):
        assert plan.family_key(key(4096)) == plan.family_key(key(5000)) != plan.family_key(key(5000)[:4] + (q,))
    assert plan.family_key(cupy_key(7))[3] == (f16, (2, 2, 128), True)
    assert plan.family_key(torch_key(7))[3] == (f16, (2, 2, 128), "cuda:0", True)

    asked = []

    class Family:
        def plan_for(self, lengths, strides):
            asked.append((lengths, strides))
            return types.SimpleNamespace(family=None) if lengths[0] > 0 else None

    monkeypatch.setattr(plan, "PLANS", {})
    monkeypatch.setattr(plan, "FAMILIES", {})
    plan.remember(cupy_key(4096), types.SimpleNamespace(family=Family()))
    assert plan.family_plan(torch_key(4097), (4097, 4097), ("s", "s")) is None  # another format: no family
    made = plan.family_plan(cupy_key(4097), (4097, 4097), ("k strides", "v strides"))
    assert asked == [((4097, 4097), ("k strides", "v strides"))] and plan.PLANS[cupy_key(4097)] is made
    assert plan.family_plan(cupy_key(4098), (0, 0), ("k", "v")) is None and cupy_key(4098) not in plan.PLANS


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_a_decoding_loop_plans_each_step_from_its_family(rng, routed, causal):
    """transformers' decoding, in CuPy: each step one key more, in new k and v arrays (over 64
    keys: a new tile count, a new layout), planned from the first step's family (dense_forward
    once), every step against the reference: a step whose k is a view of a longer cache (its
    head stride) too, and one whose rows the kernel cannot read in place (132 elements apart),
    which the family leaves to the full path (the flash kernels)."""
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import plan

    q = _inputs(cupy, rng, "bfloat16", 2, (16, 2), 1, 1, 128)[0]
    for step, lk in enumerate(range(1000, 1070, 3)):
        _, k, v = _inputs(cupy, rng, "bfloat16", 2, (16, 2), 1, lk, 128)
        if step == 5:
            wide = _inputs(cupy, rng, "bfloat16", 2, (16, 2), 1, lk + 40, 128)[1]
            k = wide[:, :, :lk]  # (the head stride of lk + 40 keys)
        if step == 6:
            k = _inputs(cupy, rng, "bfloat16", 2, (16, 2), 1, lk, 132)[1][..., :128]
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
        _check("bfloat16", q, k, v, out, lse, dict(causal=causal))
    assert len(routed) == 1 and plan.FAMILIES


@pytest.mark.gpu
def test_gpu_torch_decoding_loop_on_the_family_matches_sdpa(rng, routed):
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    q = torch.tensor(rng.standard_normal((1, 32, 1, 128)), dtype=torch.float16, device="cuda")
    cache = torch.tensor(rng.standard_normal((2, 1, 8, 700, 128)), dtype=torch.float16, device="cuda")
    with torch.no_grad():
        for lk in range(500, 700, 7):
            k, v = cache[0, :, :, :lk].contiguous(), cache[1, :, :, :lk].contiguous()  # (as torch.cat makes them)
            out = ct.attention(q, k, v)
            want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                    enable_gqa=True)
            assert torch.allclose(out.double(), want, atol=2e-3, rtol=2e-3), lk
    assert len(routed) == 1


@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split"])
def test_a_dense_plan_launches_with_the_calls_addresses_in_its_params(monkeypatch, split):
    """DenseDecodePlan.launch without a GPU (the driver's launch recorded, memory handing out
    fake addresses): decode_tc (and decode_combine when split) on the memory's stream, their one
    argument the plan's params with this call's q, k, v, o and lse, the partials' two parts in one
    allocation, the per-row ALiBi slopes copied as float32 (no sinks: 0), the plan's Lk and
    k/v strides."""
    import ctypes

    pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver

    from cuflash._gpu import decode

    size = decode.PARAMS_DTYPE.itemsize
    launches = []
    monkeypatch.setattr(driver, "launchKernel", lambda *args: launches.append(
        (args[0], args[1], args[8], ctypes.string_at(ctypes.c_uint64.from_address(args[9]).value, size))))

    class Memory:  # the plan's memory interface: allocations at fake addresses, copies recorded
        def __init__(self):
            self.next, self.copies = 1 << 20, []

        def empty(self, shape, dtype, order=None):
            self.next += 1 << 16
            return types.SimpleNamespace(ptr=self.next, shape=shape, dtype=dtype)

        def pointer(self, x):
            return x.ptr

        def copy(self, target, source):
            self.copies.append((target, source))

        def stream(self):
            return 4242

    def kernel(ptr):
        return types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=ptr))

    splits = 4 if split else 1
    layout = decode._Layout(numpy.zeros((), dtype=decode.PARAMS_DTYPE).tobytes(), False, False, False, False,
                            kernel(11), kernel(22) if split else None, 512, 9 if split else 0, 98304, splits,
                            decode._carving(()))
    strides = (8 * 1000 * 128, 1000 * 128, 128, 8 * 1000 * 128, 1000 * 128, 128)
    plan = decode.DenseDecodePlan(layout, (2, 16, 1, 128), None, (2, 16, 1), numpy.dtype(numpy.float16), 1000,
                                  strides)
    memory = Memory()
    q, k, v, o, lse, slopes = (types.SimpleNamespace(ptr=0x1000 * (i + 1)) for i in range(6))
    plan.launch(memory, q, k, v, o, lse, slopes, None)
    assert [(f, grid, stream) for f, grid, stream, _ in launches] == [(11, 512, 4242)] + (
        [(22, 9, 4242)] if split else [])
    (rows, source), = memory.copies
    assert source is slopes and rows.shape == (2, 16) and rows.dtype == numpy.float32
    for *_, raw in launches:
        p = numpy.frombuffer(raw, dtype=decode.PARAMS_DTYPE)[0]
        assert (p["q"], p["k_cache"], p["v_cache"], p["o"], p["lse"]) == (q.ptr, k.ptr, v.ptr, o.ptr, lse.ptr)
        assert p["fwd"]["alibi_slopes"] == rows.ptr and p["fwd"]["sinks"] == 0
        assert p["seqlen_fixed"] == p["capacity"] == 1000
        assert (p["k_page_stride"], p["k_head_stride"], p["k_row_stride"],
                p["v_page_stride"], p["v_head_stride"], p["v_row_stride"]) == strides
        if split:
            partials = memory.next  # (the last allocation)
            assert (p["part_o"], p["part_lse"]) == (partials, partials + 4 * splits * 32 * 128)
        else:
            assert p["part_o"] == p["part_lse"] == 0
