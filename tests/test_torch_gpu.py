"""cuflash.torch on CUDA tensors: precision against SDPA, streams, torch.compile, training, crossing.

fp16/bf16 results are held to tests/tolerance.py's rule: the reference is torch's SDPA (math
backend) in float64, the baseline the plain unfused implementation in the dtype
(reference.attention_ref_dtype). Marked gpu; skipped without torch or without its CUDA.
"""
from __future__ import annotations

import numpy
import pytest

torch = pytest.importorskip("torch")

import cuflash  # noqa: E402
from reference import (  # noqa: E402
    attention_backward_magnitudes,
    attention_backward_ref_dtype,
    attention_ref_dtype,
    visible_mask,
)
from tolerance import assert_close  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device"),
]

F = torch.nn.functional


@pytest.fixture
def ct():
    import cuflash.torch

    return cuflash.torch


@pytest.fixture
def randc(rng):
    """Standard-normal CUDA tensors from the test's seeded generator."""

    def draw(*shape, dtype=torch.float16, requires_grad=False):
        tensor = torch.from_numpy(rng.standard_normal(shape)).to(device="cuda", dtype=dtype)
        return tensor.requires_grad_(requires_grad)

    return draw


def _sdpa_math_float64(q, k, v, dout, **kwargs):
    """(out, dq, dk, dv) of torch's math SDPA in float64: the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, dout.to(torch.float64))
    return [x.detach().cpu().numpy() for x in (out, *grads)]


def _numpy(tensor):
    return tensor.detach().to(torch.float64).cpu().numpy()


def _check_against_sdpa(dtype, out, grads, q, k, v, dout, sdpa_kwargs, ref_options):
    """Hold out and (dq, dk, dv) (heads-first layout) to the tolerance rule (16-bit results
    against the plain same-dtype implementation's error, float32/float64 near their rounding)."""
    wide = {torch.float32: numpy.float32, torch.float64: numpy.float64}.get(dtype)
    numpy_dtype = wide or (numpy.float16 if dtype == torch.float16 else pytest.importorskip("ml_dtypes").bfloat16)
    reference = _sdpa_math_float64(q, k, v, dout, **sdpa_kwargs)
    arrays = [_numpy(x) for x in (q, k, v)]
    baseline_out = None if wide else attention_ref_dtype(*arrays, numpy_dtype, **ref_options)[0]
    assert_close(_numpy(out), reference[0], dtype=numpy_dtype, baseline=baseline_out, name="out")
    baseline_grads = ((None,) * 3 if wide
                      else attention_backward_ref_dtype(_numpy(dout), *arrays, numpy_dtype, **ref_options))
    magnitudes = attention_backward_magnitudes(_numpy(dout), *arrays, **ref_options)
    for name, grad, expected, baseline, magnitude in zip("qkv", grads, reference[1:], baseline_grads, magnitudes):
        assert grad.dtype == dtype
        assert_close(_numpy(grad), expected, dtype=numpy_dtype, baseline=baseline, magnitude=magnitude,
                     kind="grad", name=f"d{name}")


def _check_against_score_mods_ref(dtype, results, names, host, **options):
    """A CUDA call's results (out, then its cotangents), named by ``names``, under the tolerance
    rule against reference.score_mods_ref(*host, **options) (host: q, k, v, dout as NumPy arrays);
    float16/bfloat16 judged by the plain same-dtype implementation's error."""
    import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16"))
    from reference import score_mods_ref

    np_dtype = numpy.dtype(str(dtype).replace("torch.", ""))
    ref_out, _, ref_grads = score_mods_ref(*host, **options)
    if np_dtype.itemsize == 2:
        base_out, _, base_grads = score_mods_ref(*host, dtype=np_dtype, **options)
    else:
        base_out, base_grads = None, (None,) * len(ref_grads)
    for name, got, want, base in zip(names, results, (ref_out, *ref_grads), (base_out, *base_grads)):
        assert got.device.type == "cuda", name
        assert_close(_numpy(got), want, dtype=np_dtype, baseline=base, kind="out" if name == "out" else "grad", name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_drop_in_forward_and_backward(dtype, ct, randc):
    q = randc(2, 8, 160, 64, dtype=dtype, requires_grad=True)
    k = randc(2, 2, 200, 64, dtype=dtype, requires_grad=True)
    v = randc(2, 2, 200, 64, dtype=dtype, requires_grad=True)
    kwargs = dict(is_causal=True, enable_gqa=True)
    out = ct.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.dtype == dtype and out.device == q.device
    dout = randc(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_against_sdpa(dtype, out, grads, q, k, v, dout, kwargs, dict(causal="top_left"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_split_gqa_group_sums_replay_on_torch_memory(dtype, layout, ct, randc, monkeypatch):
    """GQA 8/2 with one query head per dK/dV block (forced): the blocks add into fp32 (fp64)
    sums, which a replay allocates and rounds on torch's memory (plan._DkvSums; in float32 and
    float64 in k's C order the sums are the gradients); dK and dV of the first call and of two
    replays match the reference and come back in k's and v's layout."""
    from cuflash._gpu import plan

    monkeypatch.setattr(plan, "_heads_per_block_adding", lambda group, rows, steps, **_: 1)
    monkeypatch.setattr(plan, "_heads_per_block", lambda group, rows, tiles: 1)
    plan.forget()
    replays, run = [], plan.BackwardPlan.run
    monkeypatch.setattr(plan.BackwardPlan, "run", lambda self, *a, **kw: replays.append(self.dkv_sums) or run(self, *a, **kw))
    shapes = [(2, 8, 300, 64), (2, 2, 250, 64), (2, 2, 250, 64)]
    if layout == "blhd":  # (B, L, H, D) tensors seen as (B, H, L, D), as transformers hands them
        q, k, v = (randc(b, n, h, d, dtype=dtype).transpose(1, 2).requires_grad_() for b, h, n, d in shapes)
    else:
        q, k, v = (randc(*shape, dtype=dtype, requires_grad=True) for shape in shapes)
    kwargs = dict(is_causal=True, enable_gqa=True)
    dout = randc(2, 8, 300, 64, dtype=dtype)
    for _ in range(3):
        out = ct.scaled_dot_product_attention(q, k, v, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        _check_against_sdpa(dtype, out, grads, q, k, v, dout, kwargs, dict(causal="top_left"))
        for grad, x in zip(grads[1:], (k, v)):
            assert grad.stride() == x.stride()
    assert len(replays) >= 2 and all(sums is not None for sums in replays), replays


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_func_forward_and_backward(dtype, ct, randc):
    q = randc(2, 128, 4, 64, dtype=dtype, requires_grad=True)  # (B, L, H, D)
    k = randc(2, 192, 2, 64, dtype=dtype, requires_grad=True)
    v = randc(2, 192, 2, 64, dtype=dtype, requires_grad=True)
    out = ct.flash_attn_func(q, k, v, causal=True, window_size=(48, -1))
    dout = randc(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    heads_first = [x.transpose(1, 2) for x in (q, k, v, out, dout, *grads)]
    mask = torch.from_numpy(visible_mask(128, 192, causal=True, window=(48, -1))).cuda()
    kwargs = dict(attn_mask=mask, enable_gqa=True)
    _check_against_sdpa(dtype, heads_first[3], heads_first[5:], *heads_first[:3], heads_first[4], kwargs,
                        dict(causal=True, window=(48, -1)))


def test_runs_on_torch_current_stream_without_synchronizing(ct, randc, monkeypatch):
    from cuflash._gpu import plan

    seen = []
    real_run = plan._Plan._run

    def recording_run(self, memory, pointers, dropout_seed=None):
        seen.append((memory.stream(), torch.cuda.current_device()))
        return real_run(self, memory, pointers, dropout_seed)

    monkeypatch.setattr(plan._Plan, "_run", recording_run)
    q_old, q_new = randc(1, 4, 256, 64), randc(1, 4, 256, 64)
    expected = ct.attention(q_new, q_new, q_new)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = q_old.clone()
        torch.cuda._sleep(50_000_000)  # keep the stream busy: a kernel on another stream would overtake
        q.copy_(q_new)
        out = ct.attention(q, q, q)
    assert seen[-1] == (side.cuda_stream, torch.cuda.current_device())
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_compile_fullgraph(ct, randc):
    torch._dynamo.reset()

    def loss(q, k, v):
        return ct.attention(q, k, v, causal=True).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [randc(2, 4, 128, 64, requires_grad=True), randc(2, 2, 128, 64, requires_grad=True),
              randc(2, 2, 128, 64, requires_grad=True)]
    eager = loss(*inputs), *torch.autograd.grad(loss(*inputs), inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    for ours, theirs in zip((compiled_loss, *compiled_grads), eager):
        torch.testing.assert_close(ours, theirs)


class _TinyAttentionLayer(torch.nn.Module):
    def __init__(self, attend, width=64, heads=4):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attend(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


def test_training_steps_follow_sdpa(ct, randc, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # both sides in true float32
    torch.manual_seed(0)
    ours = _TinyAttentionLayer(ct.scaled_dot_product_attention).cuda()
    theirs = _TinyAttentionLayer(F.scaled_dot_product_attention).cuda()
    theirs.load_state_dict(ours.state_dict())
    x, target = randc(4, 96, 64, dtype=torch.float32), randc(4, 96, 64, dtype=torch.float32)
    losses = {}
    for name, model in (("cuflash", ours), ("sdpa", theirs)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[name] = []
        for _ in range(5):
            optimizer.zero_grad()
            with sdpa_kernel(SDPBackend.MATH):
                loss = F.mse_loss(model(x), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["cuflash"][-1] < losses["cuflash"][0]
    numpy.testing.assert_allclose(losses["cuflash"], losses["sdpa"], rtol=1e-4)


def test_bfloat16_crosses_both_ways_without_a_copy(ct, randc):
    import cupy

    q = randc(2, 4, 64, 64, dtype=torch.bfloat16)
    array = ct._to_cuflash(q)
    assert array.dtype.name == "bfloat16" and array.data.ptr == q.data_ptr()
    back = ct._to_torch(array)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == q.data_ptr()
    out = ct.attention(q, q, q)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    torch.testing.assert_close(out, torch.from_dlpack(cuflash.attention(array, array, array)), rtol=0, atol=0)
    assert isinstance(array, cupy.ndarray)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.bool])
def test_inside_running_on_tensors_cross_as_views_of_their_pointer(ct, dtype):
    """_to_cuflash inside _running_on builds the array from the tensor's pointer, shape and strides
    (_cupy_view): the same array as cupy.from_dlpack gives for views with an offset, transposes
    and broadcast strides, holding the tensor; an empty tensor still crosses (by DLPack)."""
    import cupy

    base = torch.arange(2 * 5 * 7 * 6, device="cuda").reshape(2, 5, 7, 6).to(dtype)
    views = [base, base[1:, :, 2:].transpose(1, 2), base[..., ::2], base[:, :1].expand(2, 4, 7, 6), base[:, :, :0]]
    with ct._running_on(base):
        for view in views:
            array = ct._to_cuflash(view)
            expected = cupy.from_dlpack(view.contiguous() if view.numel() == 0 else view)
            assert isinstance(array, cupy.ndarray) and array.dtype == expected.dtype
            assert array.shape == tuple(view.shape)
            if view.numel():
                assert array.data.ptr == view.data_ptr() and array.strides == expected.strides
                assert torch.is_tensor(array.data.mem._owner) and array.data.mem._owner.data_ptr() == view.data_ptr()
                assert (array.view(cupy.uint8 if dtype == torch.bool else array.dtype) ==
                        expected.view(cupy.uint8 if dtype == torch.bool else expected.dtype)).all()


def test_the_core_api_takes_torch_cuda_tensors_and_returns_cupy(randc):
    import cupy

    q, k, v = randc(2, 4, 100, 64), randc(2, 4, 120, 64), randc(2, 4, 120, 64)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    expected, expected_lse = cuflash.attention(*(cupy.from_dlpack(x) for x in (q, k, v)), causal=True, return_lse=True)
    cupy.testing.assert_array_equal(out, expected)
    cupy.testing.assert_array_equal(lse, expected_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_score_modifiers_on_cuda_match_the_cpu_backend(ct, randc, dtype, compiled):
    """softcap, ALiBi and sinks on CUDA tensors (eager and through torch.compile's custom ops),
    with autograd into q, k, v and sinks, against the same call on float64 CPU tensors."""
    q, k, v = (randc(2, 4, 77, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    slopes = torch.linspace(0.05, 0.5, 4, device="cuda")
    sinks = torch.randn(4, device="cuda", dtype=dtype).requires_grad_()
    dout = randc(2, 4, 77, 64, dtype=dtype)

    def call(q, k, v, sinks, slopes):
        return ct.attention(q, k, v, causal=True, softcap=4.0, alibi_slopes=slopes, sinks=sinks)

    run = torch.compile(call, fullgraph=True) if compiled else call
    out = run(q, k, v, sinks, slopes)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    assert all(x.dtype == dtype for x in (out, *grads))
    _check_against_score_mods_ref(dtype, (out, *grads), ("out", "dq", "dk", "dv", "dsinks"),
                                  [_numpy(x) for x in (q, k, v, dout)], causal=True, softcap=4.0,
                                  alibi_slopes=_numpy(slopes), sinks=_numpy(sinks))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bias_and_mask_on_cuda_with_the_gradient_into_bias(ct, randc, rng, dtype, compiled):
    """An AlphaFold-style pair bias broadcast over the batch (float32 for bfloat16 inputs, with
    autograd) and a key-padding mask that leaves one batch no key, on CUDA tensors, eager and
    through torch.compile's custom ops: out and every cotangent (q, k, v, bias) under the
    tolerance rule against the float64 reference; the batch that sees nothing gives 0."""
    q, k, v = (randc(3, 4, 77, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = randc(1, 4, 77, 77, dtype=torch.float32).requires_grad_()
    mask = torch.arange(77, device="cuda").view(1, 1, 1, 77) < torch.tensor([77, 30, 0], device="cuda").view(3, 1, 1, 1)
    dout = randc(3, 4, 77, 64, dtype=dtype)

    def call(q, k, v, bias, mask):
        return ct.attention(q, k, v, causal=True, bias=bias, mask=mask)

    run = torch.compile(call, fullgraph=True) if compiled else call
    out = run(q, k, v, bias, mask)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    assert (out[2] == 0).all() and torch.isfinite(out).all()
    assert all(x.dtype == dtype for x in (out, *grads[:3])) and grads[3].dtype == torch.float32
    _check_against_score_mods_ref(dtype, (out, *grads), ("out", "dq", "dk", "dv", "dbias"),
                                  [_numpy(x) for x in (q, k, v, dout)], causal=True, bias=_numpy(bias),
                                  mask=mask.cpu().numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_float_attn_mask_with_grad_and_bool_mask_on_cuda(ct, randc, dtype):
    """torch's semantics for attn_mask on CUDA: a float mask (q's dtype) is added, with autograd
    into it; a boolean one (True takes part) hides keys. Under the tolerance rule against the
    float64 reference, the plain same-dtype implementation as the baseline."""
    q, k, v = (randc(2, 4, 97, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = randc(2, 4, 97, 64, dtype=dtype)
    additive = randc(2, 1, 97, 97, dtype=dtype, requires_grad=True)
    boolean = torch.rand(2, 1, 97, 97, device="cuda") < 0.8
    boolean[..., 0] = True  # every row sees a key (torch would give NaN where cuflash gives 0)
    host = [_numpy(x) for x in (q, k, v, dout)]
    for attn_mask, options in ((additive, dict(bias=_numpy(additive))), (boolean, dict(mask=boolean.cpu().numpy()))):
        leaves = (q, k, v) + ((attn_mask,) if attn_mask.dtype != torch.bool else ())
        out = ct.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        grads = torch.autograd.grad(out, leaves, dout)
        assert all(x.dtype == dtype for x in (out, *grads))
        _check_against_score_mods_ref(dtype, (out, *grads), ("out", "dq", "dk", "dv", "dmask"), host, **options)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_with_kvcache_on_cuda(ct, rng, paged, dtype):
    """flash_attn_with_kvcache on CUDA tensors (rotary, GQA, causal, append in place): against the
    same call on CPU tensors in float64 under tolerance.py's rule (the baseline: that call in the
    same dtype on the CPU), and the cache written in place on the device."""
    batch, lq, heads, heads_k, d, lmax, lnew, page = 3, 4, 8, 2, 64, 64, 2, 16
    host = {name: rng.standard_normal(shape) for name, shape in (
        ("q", (batch, lq, heads, d)), ("k", (batch, lnew, heads_k, d)), ("v", (batch, lnew, heads_k, d)),
        ("k_cache", (batch, lmax, heads_k, d)), ("v_cache", (batch, lmax, heads_k, d)))}
    angles = rng.uniform(0, 2 * numpy.pi, (lmax + lq, 16))
    seqlens = torch.tensor(rng.integers(0, lmax - lnew + 1, batch), dtype=torch.int32)
    table = torch.from_numpy(rng.permutation(batch * lmax // page).reshape(batch, lmax // page).astype(numpy.int32))

    def run(device, tensor_dtype):
        t = {name: torch.from_numpy(x).to(tensor_dtype) for name, x in host.items()}
        if paged:  # the same caches cut in pages, in the table's order
            for name in ("k_cache", "v_cache"):
                pages = t[name].reshape(batch * lmax // page, page, heads_k, d)
                store = torch.empty_like(pages)
                store[table.reshape(-1).long()] = pages
                t[name] = store
        t = {name: x.to(device) for name, x in t.items()}
        out, lse = ct.flash_attn_with_kvcache(
            t["q"], t["k_cache"], t["v_cache"], k=t["k"], v=t["v"], cache_seqlens=seqlens.to(device), causal=True,
            rotary_cos=torch.from_numpy(numpy.cos(angles)).to(device, tensor_dtype),
            rotary_sin=torch.from_numpy(numpy.sin(angles)).to(device, tensor_dtype),
            block_table=table.to(device) if paged else None, return_softmax_lse=True)
        return out.cpu().double().numpy(), lse.cpu().double().numpy(), t["k_cache"].cpu().double().numpy()

    gpu, ref, baseline = run("cuda", dtype), run("cpu", torch.float64), run("cpu", dtype)
    precision = numpy.dtype(numpy.float16) if dtype == torch.float16 else _bf16()
    assert_close(gpu[0], ref[0], dtype=precision, baseline=baseline[0], name="out")
    assert_close(gpu[1], ref[1], dtype=numpy.float32, baseline=baseline[1], kind="lse", name="lse")
    # the rotated keys appended in place on the device (the rest of the cache as it was)
    assert_close(gpu[2], ref[2], dtype=precision, baseline=baseline[2], name="k_cache")


def test_flash_attn_varlen_func_compiled_equals_eager(ct, randc):
    """flash_attn_varlen_func (bf16, GQA 8/2, D 128, causal, deterministic) compiled by inductor
    with fullgraph: out and dq, dk, dv equal the eager call's bit for bit (the same kernels)."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 300, 1000, 1024], dtype=torch.int32, device="cuda")
    q, k, v = (randc(1024, h, 128, dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    dout = randc(1024, 8, 128, dtype=torch.bfloat16)

    def call(q, k, v):
        return ct.flash_attn_varlen_func(q, k, v, cu, cu, 700, 700, causal=True, deterministic=True)

    results = []
    for function in (call, torch.compile(call, fullgraph=True)):
        out = function(q, k, v)
        results.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_flash_attn_with_kvcache_compiled_decoding_steps_equal_eager_ones(ct, randc, mode):
    """A decoding step (append one token, attend over the cache; bf16, GQA 8/2, D 128) compiled
    by inductor with fullgraph, and in mode="reduce-overhead" (CUDA graphs): every step's out and
    lse and the caches afterwards equal the eager steps' bit for bit (the same kernels run)."""
    torch._dynamo.reset()
    batch, heads, heads_k, d, lmax = 2, 8, 2, 128, 256
    caches = {name: [randc(batch, lmax, heads_k, d, dtype=torch.bfloat16) for _ in range(2)]
              for name in ("eager", "compiled")}
    caches["compiled"] = [c.clone() for c in caches["eager"]]

    def step(q, k_cache, v_cache, k, v, lengths):
        out, lse = ct.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths, causal=True,
                                              return_softmax_lse=True)
        return out.clone(), lse.clone()  # (a CUDA graph's next replay reuses its outputs)

    compiled = torch.compile(step, mode=mode, fullgraph=True)
    lengths = torch.tensor([100, 37], dtype=torch.int32, device="cuda")
    for _ in range(4):
        q = randc(batch, 1, heads, d, dtype=torch.bfloat16)
        k, v = (randc(batch, 1, heads_k, d, dtype=torch.bfloat16) for _ in range(2))
        want = step(q, *caches["eager"], k, v, lengths)
        got = compiled(q, *caches["compiled"], k, v, lengths)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(torch.equal(a, b) for a, b in zip(caches["compiled"], caches["eager"]))
        lengths += 1


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("lengths", ["tensor", "int"])
def test_flash_attn_with_kvcache_repeated_signatures_launch_as_the_full_path_does(ct, rng, monkeypatch, paged,
                                                                                lengths):
    """A decoding loop's repeated signature (ct._KvKnown: launched from the tensors' addresses)
    gives the bits of the full path's call, step by step (out, lse, the caches it appends to),
    and runs for every call but each signature's first; calls whose values the kept signature
    cannot vouch for (an int length past the cache, new keys inside the cache) go the full path,
    which refuses them."""
    batch, heads, heads_k, d, lmax, page = 2, 16, 4, 128, 256, 64
    host = [rng.standard_normal((batch, lmax, heads_k, d)) for _ in range(2)]
    table = torch.from_numpy(rng.permutation(batch * lmax // page).reshape(batch, lmax // page).astype(numpy.int32))
    steps = [(torch.from_numpy(rng.standard_normal((batch, 1, heads, d))).to("cuda", torch.float16),
              *(torch.from_numpy(rng.standard_normal((batch, 1, heads_k, d))).to("cuda", torch.float16)
                for _ in range(2))) for _ in range(5)]
    ran = []
    real_run = ct._KvKnown.run
    monkeypatch.setattr(ct._KvKnown, "run", lambda self, *a: ran.append(1) or real_run(self, *a))

    def loop(keep):
        caches = [torch.from_numpy(x).to("cuda", torch.float16) for x in host]
        if paged:
            caches = [c.reshape(batch * lmax // page, page, heads_k, d)[torch.argsort(table.reshape(-1)).cuda()]
                      for c in caches]
        results = []
        ct._KV_KNOWN.clear()
        for i, (q, k, v) in enumerate(steps):
            if not keep:
                ct._KV_KNOWN.clear()
            length = 100 + i if lengths == "int" else torch.tensor([100 + i, 37 + i], dtype=torch.int32, device="cuda")
            out, lse = ct.flash_attn_with_kvcache(q, *caches, k=k, v=v, cache_seqlens=length, causal=True,
                                                  block_table=table.cuda() if paged else None,
                                                  return_softmax_lse=True)
            results.append((out.clone(), lse.clone()))
        return results, caches

    full, full_caches = loop(keep=False)
    ran.clear()
    kept, kept_caches = loop(keep=True)
    assert len(ran) == len(steps) - 1  # (the first call of the signature took the full path)
    for (a, b), (c, e) in zip(full, kept):
        assert torch.equal(a, c) and torch.equal(b, e)
    assert all(torch.equal(a, b) for a, b in zip(full_caches, kept_caches))
    q, k, v = steps[0]
    before = [c.clone() for c in kept_caches]
    if lengths == "int":  # past the cache
        with pytest.raises(ValueError, match="cache_seqlens"):
            ct.flash_attn_with_kvcache(q, *kept_caches, k=k, v=v, cache_seqlens=lmax, causal=True,
                                       block_table=table.cuda() if paged else None, return_softmax_lse=True)
    else:  # new keys laid out as the loop's, in the cache's first bytes
        inside = kept_caches[0].view(-1)[:k.numel()].view(k.shape)
        with pytest.raises(ValueError, match="must not share memory"):
            ct.flash_attn_with_kvcache(q, *kept_caches, k=inside, v=v,
                                       cache_seqlens=torch.tensor([3, 4], dtype=torch.int32, device="cuda"),
                                       causal=True, block_table=table.cuda() if paged else None,
                                       return_softmax_lse=True)
    assert len(ran) == len(steps)  # (the kept signature was asked, and left the call to the full path)
    assert all(torch.equal(a, b) for a, b in zip(before, kept_caches))


def test_flash_attn_with_kvcache_rotary_positions_past_cos_read_its_last_row_on_cuda(ct, rng):
    """On CUDA the rotary positions are not read on the host (no sync): a position past
    rotary_cos's rows reads its last row, never beyond it: the bits of the same call with cos and
    sin padded by copies of their last row (the CPU refuses it: test_torch)."""
    batch, lq, heads, d, lmax = 2, 3, 4, 32, 40
    q, k_cache, v_cache = (torch.from_numpy(rng.standard_normal(shape)).to("cuda", torch.float16)
                           for shape in ((batch, lq, heads, d), (batch, lmax, heads, d), (batch, lmax, heads, d)))
    seqlens = torch.tensor([30, 37], dtype=torch.int32, device="cuda")  # positions up to 39
    angles = torch.from_numpy(rng.uniform(0, 2 * numpy.pi, (20, 8))).to("cuda", torch.float16)
    padded = torch.cat([angles, angles[-1:].expand(lmax + lq - 20, 8)])
    outs = [ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                                       rotary_cos=table.cos(), rotary_sin=table.sin())
            for table in (angles, padded)]
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1])


def _bf16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


def test_outputs_and_gradients_keep_the_projections_layout(ct):
    """transformers' flow: q, k, v are (B, L, H, D) projections seen as (B, H, L, D); out and the
    gradients come back in the same memory order, so transposing out back and reshaping the
    gradients to the projections' shape copy nothing (as torch's SDPA kernels), and the values
    equal those of the same call on contiguous copies."""
    torch.manual_seed(0)
    projections = [torch.randn(2, 128, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (8, 2, 2)]
    q, k, v = (x.transpose(1, 2) for x in projections)
    out = ct.attention(q, k, v, causal=True)
    back = out.transpose(1, 2)
    assert back.is_contiguous()
    back.reshape(2, 128, -1).float().square().sum().backward()
    for x in projections:
        assert x.grad.is_contiguous()
    copies = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in projections]
    want = ct.attention(*copies, causal=True)
    want.transpose(1, 2).reshape(2, 128, -1).float().square().sum().backward()
    assert torch.equal(out, want)
    for x, c in zip(projections, copies):
        assert torch.equal(x.grad, c.grad.transpose(1, 2))


def test_backward_plans_follow_the_forward_plan(ct, randc):
    """A repeated call's backward finds its plan through the forward plan that ran
    (ForwardPlan.followers, one entry per gradient layout and option set): every kind of dout —
    in out's layout, in another layout, a stride-0 expansion, with deterministic=True — gives the
    reference's gradients on the first call (the whole-signature key) and on the repeats (the
    follower), and the forward plan holds one follower per kind that needs its own plan."""
    dtype = torch.bfloat16
    q = randc(2, 8, 160, 64, dtype=dtype)
    k, v = randc(2, 2, 200, 64, dtype=dtype), randc(2, 2, 200, 64, dtype=dtype)
    douts = {
        "out's layout": (randc(2, 8, 160, 64, dtype=dtype), False),
        "transposed": (randc(2, 160, 8, 64, dtype=dtype).transpose(1, 2), False),
        "expanded": (torch.full((), 0.5, device="cuda", dtype=dtype).expand(2, 8, 160, 64), False),
        "deterministic": (randc(2, 8, 160, 64, dtype=dtype), True),
    }
    forward_plans = set()
    for repeat in range(3):
        for name, (dout, deterministic) in douts.items():
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = ct.attention(*inputs, causal="top_left", deterministic=deterministic)
            if repeat:
                assert out.grad_fn.plan is not None, name  # the forward replayed a plan
                forward_plans.add(id(out.grad_fn.plan))
            grads = torch.autograd.grad(out, inputs, dout)
            _check_against_sdpa(dtype, out, grads, q, k, v, dout, dict(is_causal=True, enable_gqa=True),
                                dict(causal="top_left"))
    assert len(forward_plans) == 1  # deterministic is no part of the forward's key
    followers = out.grad_fn.plan.followers
    # (the expansion is made dense in out's layout: it shares the first kind's plan)
    assert len(followers) == 3, list(followers)
    assert {key[0] for key in followers} == {False, True}


def test_backward_reuses_the_forwards_bias_and_mask_preparation(ct, randc, rng, monkeypatch):
    """A replayed training step lays a bias and mask out (their 16-byte-row copies: a bfloat16
    bias widened, a 49-key padding mask padded) and cuts the key padding once, in the forward,
    and its backward reuses them (plan.Prepared): the gradients are bitwise those of a step that
    lays them out again, and over a large preparation (above Prepared.MAX_BYTES) the backward
    makes its own."""
    from cuflash._gpu import plan

    dtype = torch.bfloat16
    q, k, v, dout = (randc(4, 2, 49, 32, dtype=dtype) for _ in range(4))
    bias = randc(2, 49, 49, dtype=dtype).requires_grad_()
    keys = torch.from_numpy(rng.integers(20, 50, (4, 1, 1, 1)))
    mask = (torch.arange(49).reshape(1, 1, 1, 49) < keys).cuda()  # key padding: a cut per row
    copies = []
    lay_out = plan._PlaneLayout.lay_out

    def counted(self, memory, x):
        copies.append(self.staged is not None)
        return lay_out(self, memory, x)

    monkeypatch.setattr(plan._PlaneLayout, "lay_out", counted)
    key_bounds = plan._key_bounds

    def counted_cut(*args):
        copies.append("cut")
        return key_bounds(*args)

    monkeypatch.setattr(plan, "_key_bounds", counted_cut)

    def step():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)] + [bias]
        out = ct.attention(*inputs[:3], bias=bias, mask=mask, deterministic=True)
        return [_bits(g) for g in (out, *torch.autograd.grad(out, inputs, dout))]

    first = step()  # plans built (the full path)
    copies.clear()
    shared = step()  # replayed: laid out by the forward only
    assert copies == [True, True, "cut"], copies
    monkeypatch.setattr(plan.Prepared, "MAX_BYTES", -1)
    copies.clear()
    apart = step()
    assert copies == [True, True, "cut"] * 2, copies
    assert shared == apart == first


def _bits(tensor):
    return tensor.detach().cpu().view(torch.int16 if tensor.element_size() == 2 else torch.int32).numpy().tobytes()
