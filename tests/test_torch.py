"""cuflash.torch on CPU tensors (the NumPy backend): autograd, the drop-ins' semantics, torch.compile.

Gradients are checked by ``torch.autograd.gradcheck`` in float64 (finite differences, no
reference needed); the drop-ins are compared with torch's own SDPA (math, float64) and with the
project's dense reference. Skipped without torch.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy
import pytest

torch = pytest.importorskip("torch")

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from reference import attention_backward_ref, attention_ref  # noqa: E402
from tolerance import assert_close  # noqa: E402

F = torch.nn.functional


@pytest.fixture
def randt(rng):
    """Standard-normal torch tensors from the test's seeded generator (float64 unless told)."""

    def draw(*shape, dtype=torch.float64, requires_grad=False):
        tensor = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
        return tensor.requires_grad_(requires_grad)

    return draw


def _numpy(tensor):
    return tensor.detach().to(torch.float64).numpy()


# --- autograd: gradcheck in float64 ---------------------------------------------------------------

GRADCHECK_CASES = {
    # name: (q shape, k shape, v shape, options)
    "plain": ((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), {}),
    "causal_bottom_right_lq_gt_lk": ((1, 2, 6, 4), (1, 2, 4, 4), (1, 2, 4, 4), {"causal": True}),
    "causal_top_left": ((1, 2, 6, 4), (1, 2, 4, 4), (1, 2, 4, 4), {"causal": "top_left"}),
    "window": ((1, 2, 7, 4), (1, 2, 7, 4), (1, 2, 7, 4), {"window": (2, 1)}),
    "causal_window": ((1, 1, 6, 3), (1, 1, 8, 3), (1, 1, 8, 3), {"causal": True, "window": (2, -1)}),
    "gqa": ((2, 4, 5, 4), (2, 2, 5, 4), (2, 2, 5, 4), {"causal": True}),
    "mqa_and_batch_broadcast": ((3, 2, 5, 4), (1, 1, 5, 4), (1, 1, 5, 2), {"scale": 0.7}),
    "unbatched": ((5, 4), (6, 4), (6, 4), {"causal": True}),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case, randt):
    q_shape, k_shape, v_shape, options = GRADCHECK_CASES[case]
    inputs = tuple(randt(*shape, requires_grad=True) for shape in (q_shape, k_shape, v_shape))
    assert torch.autograd.gradcheck(lambda q, k, v: ct.attention(q, k, v, **options), inputs)


def test_gradients_match_the_dense_reference(randt):
    q, k, v = (randt(2, 4, 9, 8, requires_grad=True), randt(2, 2, 11, 8, requires_grad=True),
               randt(2, 2, 11, 6, requires_grad=True))
    options = dict(causal=True, window=(3, -1))
    out = ct.attention(q, k, v, **options)
    dout = randt(*out.shape)
    out.backward(dout)
    expected = attention_backward_ref(*(_numpy(x) for x in (dout, q, k, v)), **options)
    for name, tensor, reference in zip("qkv", (q, k, v), expected):
        assert tensor.grad.shape == tensor.shape
        assert_close(tensor.grad.numpy(), reference, dtype=numpy.float64, kind="grad", name=f"d{name}")


def test_lse_is_returned_without_gradient(randt):
    q = randt(1, 2, 5, 4, requires_grad=True)
    out, lse = ct.attention(q, q, q, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (1, 2, 5) and lse.dtype == torch.float64
    assert_close(lse.numpy(), attention_ref(*(_numpy(q),) * 3)[1], dtype=numpy.float64, kind="lse")


# --- scaled_dot_product_attention: torch's semantics -------------------------------------------

SDPA_CASES = {
    # name: (q shape, k shape, v shape, keyword arguments)
    "plain": ((2, 3, 7, 8), (2, 3, 7, 8), (2, 3, 7, 8), {}),
    "causal_lq_lt_lk": ((2, 3, 5, 8), (2, 3, 9, 8), (2, 3, 9, 4), {"is_causal": True}),
    "causal_lq_gt_lk": ((2, 3, 9, 8), (2, 3, 5, 8), (2, 3, 5, 8), {"is_causal": True}),
    "gqa": ((2, 8, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8), {"enable_gqa": True, "is_causal": True}),
    "mqa_without_enable_gqa": ((2, 4, 6, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}),
    "batch_broadcast": ((3, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8), {"scale": 0.3}),
    "three_dimensional": ((4, 6, 8), (4, 7, 8), (4, 7, 8), {"is_causal": True}),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_matches_torch_forward_and_backward(case, randt):
    q_shape, k_shape, v_shape, kwargs = SDPA_CASES[case]
    inputs = [randt(*shape, requires_grad=True) for shape in (q_shape, k_shape, v_shape)]
    ours = ct.scaled_dot_product_attention(*inputs, **kwargs)
    theirs = F.scaled_dot_product_attention(*inputs, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours.detach().numpy(), theirs.detach().numpy(), dtype=numpy.float64)
    dout = randt(*ours.shape)
    for name, mine, reference in zip("qkv", torch.autograd.grad(ours, inputs, dout),
                                     torch.autograd.grad(theirs, inputs, dout)):
        assert_close(mine.numpy(), reference.numpy(), dtype=numpy.float64, kind="grad", name=f"d{name}")


@pytest.fixture
def sdpa_counts():
    ct.SDPA_COUNTS.update(cuflash=0, torch=0, torch_reasons={})
    yield ct.SDPA_COUNTS
    ct.SDPA_COUNTS.update(cuflash=0, torch=0, torch_reasons={})


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_override_routes_torchs_sdpa_through_cuflash(case, randt, sdpa_counts):
    """Inside sdpa_override(), torch.nn.functional.scaled_dot_product_attention (as code calls it)
    is cuflash's drop-in: torch's results and gradients, counted; outside, torch's own again."""
    original = F.scaled_dot_product_attention
    q_shape, k_shape, v_shape, kwargs = SDPA_CASES[case]
    inputs = [randt(*shape, requires_grad=True) for shape in (q_shape, k_shape, v_shape)]
    theirs = original(*inputs, **kwargs)
    with ct.sdpa_override():
        assert torch.nn.functional.scaled_dot_product_attention is not original
        ours = torch.nn.functional.scaled_dot_product_attention(*inputs, **kwargs)
    assert F.scaled_dot_product_attention is original
    assert sdpa_counts == {"cuflash": 1, "torch": 0, "torch_reasons": {}}
    assert_close(ours.detach().numpy(), theirs.detach().numpy(), dtype=numpy.float64)
    dout = randt(*ours.shape)
    for name, mine, reference in zip("qkv", torch.autograd.grad(ours, inputs, dout),
                                     torch.autograd.grad(theirs, inputs, dout)):
        assert_close(mine.numpy(), reference.numpy(), dtype=numpy.float64, kind="grad", name=f"d{name}")


def test_sdpa_override_hands_what_cuflash_cannot_run_to_torch(randt, sdpa_counts):
    """A call cuflash cannot run (nested tensors) goes to the function the override replaced, counted
    by reason; blocks nest, the last to close restores it; an error in the block restores it too."""
    original = F.scaled_dot_product_attention
    q = randt(1, 2, 5, 4)
    nested = torch.nested.nested_tensor([randt(5, 2, 8), randt(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    with ct.sdpa_override():
        with ct.sdpa_override():
            theirs = F.scaled_dot_product_attention(nested, nested, nested)
        assert F.scaled_dot_product_attention is not original  # (the outer block is still open)
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # (dropout runs in cuflash)
    assert F.scaled_dot_product_attention is original
    for mine, reference in zip(theirs.unbind(), original(nested, nested, nested).unbind()):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    assert sdpa_counts == {"cuflash": 1, "torch": 1, "torch_reasons": {"a nested tensor": 1}}
    with pytest.raises(ZeroDivisionError), ct.sdpa_override():
        1 / 0
    assert F.scaled_dot_product_attention is original


def test_sdpa_override_reaches_torchs_multihead_attention(randt, sdpa_counts):
    """torch.nn.MultiheadAttention (need_weights=False) calls F.sdpa inside: under the override it
    runs cuflash, with torch's output and input gradient (a boolean mask in MHA's convention)."""
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    x = randt(2, 7, 32, requires_grad=True)
    hidden = torch.ones(7, 7, dtype=torch.bool).triu(1)  # (True = not allowed, MHA's convention)
    want = module(x, x, x, need_weights=False, attn_mask=hidden)[0]
    with ct.sdpa_override():
        got = module(x, x, x, need_weights=False, attn_mask=hidden)[0]
    assert sdpa_counts["cuflash"] == 1
    assert_close(got.detach().numpy(), want.detach().numpy(), dtype=numpy.float64)
    dout = randt(*got.shape)
    assert_close(torch.autograd.grad(got, x, dout)[0].numpy(), torch.autograd.grad(want, x, dout)[0].numpy(),
                 dtype=numpy.float64, kind="grad")


def test_sdpa_override_is_traced_into_a_compiled_graph(randt, sdpa_counts):
    """A function compiled (fullgraph) while the override is active calls cuflash's op, with
    torch's results and gradients; the counters stay out of the graph."""
    q, k, v = (randt(2, 4, 9, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def loss(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum()

    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    with ct.sdpa_override():
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert "cuflash.attention_fwd" in targets and sdpa_counts["cuflash"] == 0
    for mine, reference in zip(got, want):
        assert_close(mine.numpy(), reference.numpy(), dtype=numpy.float64, kind="grad")
    # Outside the block the same compiled function retraces (dynamo guards on F.sdpa): torch's own.
    targets.clear()
    compiled(q, k, v)
    assert "cuflash.attention_fwd" not in targets and any("scaled_dot_product_attention" in t for t in targets)


@pytest.mark.parametrize("heads_kv, enable_gqa", [(2, False), (3, True), (3, False)])
def test_sdpa_refuses_head_counts_as_torch_does(heads_kv, enable_gqa, randt):
    q, kv = randt(2, 8, 5, 4), randt(2, heads_kv, 5, 4)
    with pytest.raises(RuntimeError) as torch_error:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=enable_gqa)
    with pytest.raises(RuntimeError) as our_error:
        ct.scaled_dot_product_attention(q, kv, kv, enable_gqa=enable_gqa)
    assert str(our_error.value).startswith(str(torch_error.value).split(" (")[0].rstrip())


def test_sdpa_refuses_mixed_dtypes_as_torch_does(randt):
    q, k = randt(1, 2, 4, 4), randt(1, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="same dtype"):
        F.scaled_dot_product_attention(q, k, q)
    with pytest.raises(RuntimeError, match="same dtype"):
        ct.scaled_dot_product_attention(q, k, q)


@pytest.mark.parametrize("kwargs", [dict(is_causal="yes"), dict(is_causal=1), dict(is_causal=numpy.bool_(True)),
                                    dict(enable_gqa=None), dict(query="numpy"), dict(key=[[0.0]]), dict(value=None)],
                         ids=["causal-str", "causal-int", "causal-numpy-bool", "gqa-none", "query-numpy", "key-list",
                              "value-none"])
def test_sdpa_refuses_argument_types_as_torch_does(randt, kwargs):
    """torch's own argument parser decides: what it refuses, the drop-in refuses, in its words
    (less the "(position N)" torch adds for a positional argument)."""
    q = randt(1, 2, 4, 4)
    arguments = dict(query=q, key=q, value=q)
    arguments.update({name: q.numpy() if value == "numpy" else value for name, value in kwargs.items()})
    with pytest.raises(TypeError) as torchs:
        F.scaled_dot_product_attention(**arguments)
    with pytest.raises(TypeError) as ours:
        ct.scaled_dot_product_attention(**arguments)
    assert str(ours.value) == re.sub(r" \(position \d\)", "", str(torchs.value))


def test_sdpa_and_flash_attn_drop_as_cuflash_does(randt):
    """dropout_p reaches cuflash's dropout: its mask seeded from torch's generator (the same seed,
    the same result; the next draw, another mask), equal to cuflash.torch.attention's under the
    same generator state, and differentiable."""
    q, k, v = (randt(2, 4, 9, 8).requires_grad_() for _ in range(3))
    torch.manual_seed(3)
    sdpa = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(3)
    again = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    other = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(3)
    direct = ct.attention(q, k, v, causal="top_left", dropout_p=0.3)
    assert torch.equal(sdpa, again) and torch.equal(sdpa, direct) and not torch.equal(sdpa, other)
    assert not torch.equal(sdpa, ct.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.manual_seed(3)
    flash = ct.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(flash.transpose(1, 2), ct.attention(q, k, v, dropout_p=0.3))
    (sdpa * randt(*sdpa.shape)).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_dropout_matches_the_numpy_backend_with_gradients(rng):
    """cuflash.torch.attention with an explicit seed (an int, a 0-d tensor) is cuflash.attention's
    result on the same arrays, and its autograd gradients cuflash.attention_backward's."""
    q, k, v, dout = (rng.standard_normal(s) for s in ((2, 4, 17, 8), (2, 2, 23, 8), (2, 2, 23, 8), (2, 4, 17, 8)))
    kwargs = dict(causal=True, softcap=3.0, dropout_p=0.35)
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    out, lse = cuflash.attention(q, k, v, return_lse=True, dropout_seed=seed, **kwargs)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, dropout_seed=seed, **kwargs)
    for given in (seed, torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)):
        tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
        mine = ct.attention(tq, tk, tv, dropout_seed=given, **kwargs)  # (a tensor holds the seed's int64 bits)
        numpy.testing.assert_array_equal(mine.detach().numpy(), out)
        mine.backward(torch.tensor(dout))
        for got, want in zip((tq.grad, tk.grad, tv.grad), grads):
            numpy.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(TypeError, match="dropout_seed"):
        ct.attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), dropout_p=0.1, dropout_seed=torch.zeros(2))
    with pytest.raises(ValueError, match="dropout_p"):
        ct.attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), dropout_p=1.5)


def test_sdpa_attn_mask_has_torchs_semantics(rng):
    """attn_mask as torch: a boolean mask (True = takes part) and a float mask added to the scaled
    scores, broadcast, with gradients into a float mask that requires grad; both against torch's
    own SDPA in float64 on the CPU (rows keep at least one key: torch gives NaN where none is
    left, cuflash 0); attn_mask with is_causal is torch's documented error."""
    q, k, v = (torch.from_numpy(rng.standard_normal(s)).requires_grad_() for s in
               ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6)))
    boolean = torch.from_numpy(rng.random((2, 1, 5, 7)) > 0.4)
    boolean[..., 0] = True
    additive = torch.from_numpy(rng.standard_normal((3, 5, 7))).requires_grad_()
    dout = torch.from_numpy(rng.standard_normal((2, 3, 5, 6)))
    for attn_mask, is_causal in ((boolean, False), (additive, False)):
        inputs = (q, k, v) + ((attn_mask,) if attn_mask.requires_grad else ())
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=0.3, is_causal=is_causal)
        got = ct.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=0.3, is_causal=is_causal)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for ours, theirs in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal=True"):
        ct.scaled_dot_product_attention(q, k, v, attn_mask=boolean, is_causal=True)
    with pytest.raises(TypeError, match="argument 'attn_mask' must be Tensor"):
        ct.scaled_dot_product_attention(q, k, v, attn_mask=boolean.numpy())


# --- flash_attn_func: flash-attn 2's semantics -------------------------------------------------

FLASH_CASES = {
    # name: (Lq, Lk, heads_q, heads_kv, keyword arguments)
    "plain": (7, 7, 4, 4, {}),
    "causal_bottom_right": (5, 9, 4, 4, {"causal": True}),
    "causal_lq_gt_lk": (9, 5, 4, 2, {"causal": True}),
    "window": (8, 8, 4, 1, {"window_size": (2, 1)}),
    "causal_window_scale": (6, 10, 4, 2, {"causal": True, "window_size": (3, -1), "softmax_scale": 0.5}),
}


@pytest.mark.parametrize("case", FLASH_CASES)
def test_flash_attn_func_matches_the_dense_reference(case, randt):
    seqlen_q, seqlen_k, heads_q, heads_kv, kwargs = FLASH_CASES[case]
    q = randt(2, seqlen_q, heads_q, 8, requires_grad=True)  # (B, L, H, D)
    k = randt(2, seqlen_k, heads_kv, 8, requires_grad=True)
    v = randt(2, seqlen_k, heads_kv, 6, requires_grad=True)
    out, lse, probabilities = ct.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    assert out.shape == (2, seqlen_q, heads_q, 6) and lse.shape == (2, heads_q, seqlen_q)
    assert probabilities is None

    window = kwargs.get("window_size")
    options = dict(causal=kwargs.get("causal", False), window=None if window == (-1, -1) else window,
                   scale=kwargs.get("softmax_scale"))
    heads_first = [_numpy(x.transpose(1, 2)) for x in (q, k, v)]
    expected_out, expected_lse = attention_ref(*heads_first, **options)
    assert_close(_numpy(out.transpose(1, 2)), expected_out, dtype=numpy.float64, name="out")
    assert_close(lse.numpy(), expected_lse, dtype=numpy.float64, kind="lse", name="lse")

    dout = randt(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = attention_backward_ref(_numpy(dout.transpose(1, 2)), *heads_first, **options)
    for name, grad, reference in zip("qkv", grads, expected):
        assert_close(_numpy(grad.transpose(1, 2)), reference, dtype=numpy.float64, kind="grad", name=f"d{name}")


def test_flash_attn_func_takes_int_like_window_sizes(randt):
    """flash-attn's callers (and its own tests) pass window_size entries as 0-d tensors."""
    q = randt(1, 9, 2, 8)
    expected = ct.flash_attn_func(q, q, q, causal=True, window_size=(3, 0))
    for window in ((torch.tensor(3), torch.tensor(0)), (numpy.int64(3), numpy.int32(0)), [3, torch.tensor(0)]):
        torch.testing.assert_close(ct.flash_attn_func(q, q, q, causal=torch.tensor(True), window_size=window),
                                   expected, rtol=0, atol=0)
    for bad in ((torch.tensor(3.0), 0), (3, torch.tensor(False)), (torch.tensor([3]), 0)):
        with pytest.raises(TypeError, match="window"):
            ct.flash_attn_func(q, q, q, window_size=bad)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(-2, 0)), ValueError, r"window_size left must be >= -1 \(-1 = unbounded\), got -2"),
    (dict(window_size=(3, 1.5)), TypeError, r"window_size right must be an int \(-1 = unbounded\), got float"),
    (dict(window_size="ab"), TypeError, r"window_size must be a \(left, right\) pair of ints .*got str"),
    (dict(window_size=(3,)), ValueError, r"window_size must have exactly two entries \(left, right\), got 1"),
    (dict(softmax_scale=torch.tensor(0.5)), TypeError, r"softmax_scale must be a real number .*got Tensor"),
    (dict(softmax_scale=float("inf")), ValueError, r"softmax_scale must be finite, got inf"),
], ids=["window-left", "window-float", "window-str", "window-one", "scale-tensor", "scale-inf"])
@pytest.mark.parametrize("drop_in", ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
                                     "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
                                     "flash_attn_varlen_kvpacked_func"])
def test_flash_attn_drop_ins_name_their_own_arguments(randt, drop_in, kwargs, error, match):
    """flash-attn's window_size and softmax_scale are checked under those names, not cuflash's
    window and scale."""
    q = randt(1, 6, 2, 4, requires_grad=True)
    qkv = randt(1, 6, 3, 2, 4, requires_grad=True)
    before = [x.detach().clone() for x in (q, qkv)]
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(error, match=match):
        if drop_in == "flash_attn_func":
            ct.flash_attn_func(q, q, q, **kwargs)
        elif drop_in == "flash_attn_varlen_func":
            ct.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, **kwargs)
        elif drop_in == "flash_attn_qkvpacked_func":
            ct.flash_attn_qkvpacked_func(qkv, **kwargs)
        elif drop_in == "flash_attn_kvpacked_func":
            ct.flash_attn_kvpacked_func(q, qkv[:, :, 1:], **kwargs)
        elif drop_in == "flash_attn_varlen_qkvpacked_func":
            ct.flash_attn_varlen_qkvpacked_func(qkv[0], cu, 4, **kwargs)
        else:
            ct.flash_attn_varlen_kvpacked_func(q[0], qkv[0, :, 1:], cu, cu, 4, 4, **kwargs)
    for old, new in zip(before, (q, qkv)):
        assert torch.equal(new.detach(), old) and new.grad is None


def test_flash_attn_func_keeps_flash_attns_causal_window_rule(randt):
    """flash-attn sets the window's right side to 0 under causal; its drop-in does too (cuflash's
    own attention refuses the combination instead)."""
    q = randt(1, 9, 2, 8)
    torch.testing.assert_close(ct.flash_attn_func(q, q, q, causal=True, window_size=(3, 2)),
                               ct.flash_attn_func(q, q, q, causal=True, window_size=(3, 0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="window right must be 0 or -1 with causal"):
        ct.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), causal=True, window=(3, 2))


def test_flash_attn_func_reads_strided_views_of_packed_qkv(randt):
    qkv = randt(2, 6, 3, 4, 8, requires_grad=True)  # (B, L, 3, H, D), as flash_attn_qkvpacked_func
    q, k, v = qkv.unbind(dim=2)
    out = ct.flash_attn_func(q, k, v, causal=True)
    expected, _ = attention_ref(*(_numpy(x.transpose(1, 2)) for x in (q, k, v)), causal=True)
    assert_close(_numpy(out.transpose(1, 2)), expected, dtype=numpy.float64)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_flash_attn_func_says_what_it_does_not_support(randt):
    q = randt(1, 4, 2, 8)
    with pytest.raises(ValueError, match="4-dimensional"):
        ct.flash_attn_func(q[0], q[0], q[0])


# --- argument errors ----------------------------------------------------------------------------


def test_errors_name_the_argument(randt):
    q = randt(1, 2, 4, 4)
    with pytest.raises(ValueError, match="causal"):
        ct.attention(q, q, q, causal="sideways")
    with pytest.raises(TypeError, match="window"):
        ct.attention(q, q, q, window=3)
    with pytest.raises(ValueError, match="scale"):
        ct.attention(q, q, q, scale=float("inf"))
    with pytest.raises(TypeError, match="deterministic"):
        ct.attention(q, q, q, deterministic="yes")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ct.attention(q.numpy(), q, q)
    with pytest.raises(TypeError, match="dtype"):
        ct.attention(q.to(torch.int32), q.to(torch.int32), q.to(torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        ct.attention(q, randt(1, 2, 4, 5), q)


@pytest.mark.parametrize("valid, invalid, error, match", [
    (dict(causal=True), dict(causal=1), TypeError, "causal"),
    (dict(causal=False), dict(causal=0), TypeError, "causal"),
    (dict(scale=1), dict(scale=True), TypeError, "scale"),
    (dict(softcap=1.0), dict(softcap=True), TypeError, "softcap"),
    (dict(deterministic=True), dict(deterministic=1), TypeError, "deterministic"),
    (dict(return_lse=False), dict(return_lse=0), TypeError, "return_lse"),
    (dict(window=(2, 0)), dict(window=(2.0, 0)), TypeError, "window left"),
], ids=["causal-1", "causal-0", "scale-bool", "softcap-bool", "deterministic-1", "return_lse-0", "window-float"])
def test_resolved_options_are_remembered_by_spelling_never_by_equal_value(randt, valid, invalid, error, match):
    # attention() keeps the checked options of each spelling it has seen (torch._call_options):
    # a spelling equal to a valid one (1 == True, 2.0 == 2) must still be refused, every time.
    q = randt(1, 2, 4, 4)
    for _ in range(2):
        ct.attention(q, q, q, **valid)
        with pytest.raises(error, match=match):
            ct.attention(q, q, q, **invalid)


def test_a_remembered_precision_is_checked_against_each_calls_dtype(randt):
    q32, q64 = randt(1, 2, 4, 4, dtype=torch.float32), randt(1, 2, 4, 4)
    for _ in range(2):
        ct.attention(q32, q32, q32, precision="tf32")
        with pytest.raises(ValueError, match="precision='tf32' applies to float32"):
            ct.attention(q64, q64, q64, precision="tf32")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(softcap="5"), TypeError, "softcap must be a positive real number"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(sinks=[0.1, 0.2]), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks="torch-ints"), TypeError, "sinks must be a float array"),
    (dict(sinks="wrong-shape"), ValueError, "sinks must broadcast to the output's leading axes"),
    (dict(alibi_slopes=numpy.ones(2)), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes="wrong-shape"), ValueError, "alibi_slopes must broadcast"),
    (dict(window=(3, 2), causal=True), ValueError, "window right must be 0 or -1 with causal"),
    (dict(window=(torch.tensor(1.5), 0)), TypeError, "window left must be an int"),
], ids=["softcap-str", "softcap-0", "sinks-list", "sinks-int", "sinks-shape", "alibi-numpy", "alibi-shape",
        "causal-window", "window-float-tensor"])
def test_adapter_refuses_bad_modifiers_and_touches_nothing(randt, kwargs, error, match):
    q, k, v = (randt(1, 2, 4, 4, requires_grad=True) for _ in range(3))
    replacements = {"torch-ints": torch.ones(2, dtype=torch.int32), "wrong-shape": randt(3)}
    kwargs = {key: replacements.get(value, value) if isinstance(value, str) and key != "softcap" else value
              for key, value in kwargs.items()}
    before = [x.detach().clone() for x in (q, k, v)]
    with pytest.raises(error, match=match):
        ct.attention(q, k, v, **kwargs)
    for old, new in zip(before, (q, k, v)):
        assert torch.equal(old, new) and new.grad is None


def test_numpy_bools_are_bools_in_the_adapter(randt):
    q = randt(1, 2, 5, 4, requires_grad=True)
    out, lse = ct.attention(q, q, q, causal=numpy.bool_(True), deterministic=numpy.bool_(True),
                            return_lse=numpy.bool_(True))
    assert lse.shape == (1, 2, 5) and not lse.requires_grad
    out.sum().backward()
    assert q.grad is not None
    for name, value in (("deterministic", numpy.int64(1)), ("return_lse", "yes"), ("return_lse", None)):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got "):
            ct.attention(q, q, q, **{name: value})


# --- the custom ops and torch.compile -----------------------------------------------------------


def test_custom_ops_pass_torch_opcheck(randt):
    q, k, v = randt(2, 4, 5, 8, requires_grad=True), randt(2, 2, 7, 8), randt(2, 2, 7, 6)
    # softcap, alibi_slopes, precision, dropout_p, dropout_seed, sinks, bias, mask
    no_mods = (None, None, "highest", 0.0, None, None, None, None)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, (q, k, v, None, "bottom_right", 2, -1, False, *no_mods))
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, None, "bottom_right", 2, -1, False, *no_mods)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (randt(*out.shape), q.detach(), k, v, out.detach(), lse, None, "bottom_right", 2, -1, False,
                           *no_mods))
    sinks, slopes = randt(4, requires_grad=True), randt(4).abs()
    mods = (3.0, slopes, "highest", 0.0, None, sinks, None, None)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, (q, k, v, None, "bottom_right", 2, -1, False, *mods))
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, None, "bottom_right", 2, -1, False, *mods)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (randt(*out.shape), q.detach(), k, v, out.detach(), lse, None, "bottom_right", 2, -1, False,
                           3.0, slopes, "highest", 0.0, None, sinks.detach(), None, None))
    bias, mask = randt(1, 4, 5, 7, requires_grad=True), torch.from_numpy(numpy.arange(7) % 3 != 1)
    with_bias = (None, None, "highest", 0.0, None, None, bias, mask)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default,
                          (q, k, v, None, "bottom_right", 2, -1, False, *with_bias))
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, None, "bottom_right", 2, -1, False, *with_bias)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (randt(*out.shape), q.detach(), k, v, out.detach(), lse, None, "bottom_right", 2, -1, False,
                           None, None, "highest", 0.0, None, None, bias.detach(), mask))
    dropped = (None, None, "highest", 0.3, torch.tensor(20261205), None, bias, mask)  # (a fixed seed: repeatable)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, (q, k, v, None, "bottom_right", 2, -1, False, *dropped))
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, None, "bottom_right", 2, -1, False, *dropped)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (randt(*out.shape), q.detach(), k, v, out.detach(), lse, None, "bottom_right", 2, -1, False,
                           *dropped[:-2], bias.detach(), mask))


def test_custom_ops_promise_their_inputs_memory_order(randt):
    """transformers' flow: q, k, v are (B, L, H, D) projections seen as (B, H, L, D). The custom
    ops (torch.compile's path) return out in q's memory order and dq, dk, dv in q's, k's, v's, as
    the eager path does, and their fakes promise exactly those strides, so a compiled model
    transposes out back and reshapes the gradients without copies; compiled values equal eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    projections = [randt(2, 6, h, 8, requires_grad=True) for h in (4, 2, 2)]
    q, k, v = (x.detach().transpose(1, 2) for x in projections)
    options = (None, "bottom_right", 2, -1, False, None, None, "highest", 0.0, None, None, None, None)
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, *options)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    dout = randt(2, 6, 4, 8).transpose(1, 2)
    grads = torch.ops.cuflash.attention_bwd(dout, q, k, v, out, lse, *options)
    for grad, x in zip(grads[:3], (q, k, v)):
        assert grad.shape == x.shape and grad.stride() == x.stride()
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(x) for x in (q, k, v, dout)]
        fake_out, fake_lse = torch.ops.cuflash.attention_fwd(*fakes[:3], *options)
        fake_grads = torch.ops.cuflash.attention_bwd(fakes[3], *fakes[:3], fake_out, fake_lse, *options)
    assert (fake_out.stride(), fake_lse.stride()) == (out.stride(), lse.stride())
    for fake, real in zip(fake_grads, grads):
        assert (fake.shape, fake.stride()) == (real.shape, real.stride())
    # A broadcast k (MQA) lends no order: its gradient is C-contiguous, promised so.
    k_one = randt(2, 1, 6, 8).expand(2, 2, 6, 8)
    grads = torch.ops.cuflash.attention_bwd(dout, q, k_one, v, *torch.ops.cuflash.attention_fwd(q, k_one, v, *options),
                                            *options)
    assert grads[1].is_contiguous() and grads[0].stride() == q.stride()

    torch._dynamo.reset()

    def loss(*projections):
        q, k, v = (x.transpose(1, 2) for x in projections)
        return (ct.attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 6, -1) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(loss(*projections), projections)
    for ours, theirs in zip(torch.autograd.grad(compiled(*projections), projections), eager):
        torch.testing.assert_close(ours, theirs)


def test_score_modifiers_with_gradients_into_sinks(randt):
    """softcap, ALiBi and sinks through the torch adapter: gradcheck in float64 (sinks included),
    the values against the dense reference, and flash_attn_func's softcap / alibi_slopes."""
    from reference import score_mods_ref

    q, k, v = randt(2, 4, 6, 8, requires_grad=True), randt(2, 2, 7, 8, requires_grad=True), randt(2, 2, 7, 8,
                                                                                                 requires_grad=True)
    sinks, slopes = randt(4, requires_grad=True), randt(4).abs()

    def attend(q, k, v, sinks):
        return ct.attention(q, k, v, causal=True, softcap=2.5, alibi_slopes=slopes, sinks=sinks)

    assert torch.autograd.gradcheck(attend, (q, k, v, sinks))
    dout = randt(2, 4, 6, 8)
    out = attend(q, k, v, sinks)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    ref_out, _, ref_grads = score_mods_ref(*(_numpy(x) for x in (q, k, v, dout)), causal=True, softcap=2.5,
                                           alibi_slopes=_numpy(slopes), sinks=_numpy(sinks))
    numpy.testing.assert_allclose(_numpy(out), ref_out, rtol=1e-10, atol=1e-12)
    for grad, reference in zip(grads, ref_grads):
        numpy.testing.assert_allclose(_numpy(grad), reference, rtol=1e-9, atol=1e-11)

    bshd = [x.detach().transpose(1, 2) for x in (q, k, v)]
    flash = ct.flash_attn_func(*bshd, causal=True, softcap=2.5, alibi_slopes=slopes)
    ref_out, _ = score_mods_ref(*(_numpy(x) for x in (q, k, v)), causal=True, softcap=2.5, alibi_slopes=_numpy(slopes))
    numpy.testing.assert_allclose(_numpy(flash.transpose(1, 2)), ref_out, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="softcap"):
        ct.attention(q, k, v, softcap=-1.0)


def test_torch_compile_fullgraph_with_sinks(randt):
    torch._dynamo.reset()

    def loss(q, k, v, sinks):
        return (ct.attention(q, k, v, causal=True, softcap=3.0, sinks=sinks) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [randt(2, 4, 6, 8, requires_grad=True), randt(2, 2, 6, 8, requires_grad=True),
              randt(2, 2, 6, 8, requires_grad=True), randt(4, requires_grad=True)]
    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for ours, theirs in zip(compiled_grads, eager):
        torch.testing.assert_close(ours, theirs)


def test_torch_compile_fullgraph_forward_and_backward(randt):
    # aot_eager exercises what matters here (dynamo without graph breaks, the fake shapes, the
    # autograd registration) without inductor's C++ compile of the surrounding ops.
    torch._dynamo.reset()

    def loss(q, k, v):
        return (ct.attention(q * 2, k, v, causal=True, window=(3, -1)) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [randt(2, 4, 6, 8, requires_grad=True), randt(2, 2, 6, 8, requires_grad=True),
              randt(2, 2, 6, 8, requires_grad=True)]
    eager_loss = loss(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for ours, theirs in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(ours, theirs)


def test_torch_compile_fullgraph_drop_ins(randt):
    torch._dynamo.reset()
    q = randt(2, 4, 6, 8)
    sdpa = torch.compile(lambda q: ct.scaled_dot_product_attention(q, q, q, is_causal=True), fullgraph=True,
                         backend="aot_eager")
    flash = torch.compile(lambda q: ct.flash_attn_func(q, q, q, causal=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(sdpa(q), F.scaled_dot_product_attention(q, q, q, is_causal=True))
    torch.testing.assert_close(flash(q), ct.flash_attn_func(q, q, q, causal=True))


def test_compiled_calls_compile_once_whatever_eager_calls_come_between(randt):
    """Nothing the adapter remembers between calls (its memos of resolved options) is read while
    torch.compile traces: a value read there becomes a guard of the graph, which eager calls with
    other options (new memo entries) would then fail, recompiling it at every call."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def calls(q):
        return (ct.attention(q, q, q, causal=True, window=(3, 0), scale=0.5)
                + ct.flash_attn_func(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), softmax_scale=0.5,
                                     window_size=(3, 3)).transpose(1, 2)
                + ct.scaled_dot_product_attention(q, q, q, is_causal=True))

    q = randt(2, 4, 6, 8)
    first = calls(q)
    for n in range(3):  # eager calls with options the memos have not seen
        ct.attention(q, q, q, window=(n, n), scale=0.25 + n)
        ct.flash_attn_func(q, q, q, softmax_scale=0.1 * (n + 1), window_size=(n, n), causal=True)
        torch.testing.assert_close(calls(q), first)
    assert counter.frame_count == 1


# --- crossing: DLPack on the CPU ----------------------------------------------------------------


def test_cpu_tensors_cross_without_a_copy(randt):
    q = randt(2, 3, 5, 4)
    assert numpy.shares_memory(ct._to_cuflash(q), q.numpy())
    view = randt(2, 5, 3, 4).transpose(1, 2)  # a strided view crosses as one
    array = ct._to_cuflash(view)
    assert array.strides == tuple(s * view.element_size() for s in view.stride())


def test_the_core_api_takes_torch_cpu_tensors_and_returns_numpy(randt):
    q, k, v = randt(2, 3, 5, 4), randt(2, 3, 6, 4), randt(2, 3, 6, 4)
    out = cuflash.attention(q, k, v, causal=True)
    assert isinstance(out, numpy.ndarray)
    numpy.testing.assert_array_equal(out, cuflash.attention(q.numpy(), k.numpy(), v.numpy(), causal=True))


def test_the_core_api_takes_torch_cpu_bfloat16_without_a_copy(randt):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = (randt(2, 3, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    q_view = cuflash._spec._as_array("q", q)  # NumPy's DLPack has no bfloat16: an int16 view
    assert q_view.dtype == ml_dtypes.bfloat16 and q_view.ctypes.data == q.data_ptr()
    assert q_view.strides == tuple(s * q.element_size() for s in q.stride())
    out = cuflash.attention(q, k, v, causal=True)
    as_numpy = [x.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for x in (q, k, v)]
    assert out.dtype == ml_dtypes.bfloat16
    numpy.testing.assert_array_equal(out.view(numpy.int16), cuflash.attention(*as_numpy, causal=True).view(numpy.int16))
    strided = randt(2, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2)  # a view crosses as one
    assert cuflash._spec._as_array("q", strided).ctypes.data == strided.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_core_api_refuses_tensors_that_require_grad(dtype, randt):
    q = randt(2, 3, 5, 8, dtype=dtype, requires_grad=True)
    with pytest.raises(TypeError, match="detach"):
        cuflash.attention(q, q.detach(), q.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_survive_the_crossing(dtype, randt):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = (randt(2, 3, 5, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    out = ct.attention(q, k, v, causal=True)
    assert out.dtype == dtype and out.device == q.device
    numpy_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else numpy.dtype(str(dtype).split(".")[1])
    as_numpy = [x.detach().to(torch.float64).numpy().astype(numpy_dtype) for x in (q, k, v)]
    expected = cuflash.attention(*as_numpy, causal=True)
    numpy.testing.assert_array_equal(out.detach().to(torch.float64).numpy(), expected.astype(numpy.float64))
    out.sum().backward()
    assert all(x.grad.dtype == dtype and x.grad.shape == x.shape for x in (q, k, v))


def test_empty_sequences(randt):
    q, kv = randt(1, 2, 3, 4, requires_grad=True), randt(1, 2, 0, 4, requires_grad=True)
    out, lse = ct.attention(q, kv, kv, return_lse=True)
    assert out.shape == (1, 2, 3, 4) and not out.any() and torch.isneginf(lse).all()
    out.sum().backward()
    assert not q.grad.any() and kv.grad.shape == kv.shape


def test_inputs_are_never_modified(randt):
    q, k, v = (randt(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    dout = randt(2, 4, 6, 8)
    before = [x.detach().clone() for x in (q, k, v, dout)]
    out = ct.attention(q, k, v, causal=True, window=(2, 0))
    out.backward(dout)
    for original, tensor in zip(before, (q, k, v, dout)):
        assert torch.equal(original, tensor)


def test_importing_without_torch_says_what_is_missing():
    code = "import sys; sys.modules['torch'] = None\ntry:\n import cuflash.torch\nexcept ImportError as e: print(e)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cuflash.torch needs PyTorch" in result.stdout


@pytest.mark.parametrize("cuda_build", [True, False])
def test_the_adapter_imports_cupy_ahead_on_a_thread_where_torch_has_cuda(cuda_build):
    """With a CUDA build of torch, importing cuflash.torch starts CuPy's import (and cuflash's GPU
    modules) on one daemon thread, then NVRTC's one-time start, so a program's first call pays
    neither; a fork waits for it (the child gets whole modules); CUFLASH_IMPORT_AHEAD=0 and a
    CPU build of torch start nothing."""
    pytest.importorskip("cupy")
    code = f"""
import os, sys, threading, torch
torch.version.cuda = {"'13.0'" if cuda_build else None}
import cuflash.torch
from cuflash._gpu import kernels
ahead = [t for t in threading.enumerate() if t.name == "cuflash-import-ahead"]
assert ahead == ([kernels._IMPORT_AHEAD] if kernels._IMPORT_AHEAD else []), ahead
started = kernels._IMPORT_AHEAD is not None
if started:
    first = kernels._IMPORT_AHEAD
    kernels.import_ahead()  # (once: a second call starts nothing)
    assert kernels._IMPORT_AHEAD is first and first.daemon
    pid = os.fork()  # waits for the import first
    if pid == 0:
        import cupy, cuflash._gpu.plan as plan
        os._exit(0 if hasattr(cupy, "ndarray") and hasattr(plan, "forward") else 3)
    assert not kernels._IMPORT_AHEAD.is_alive() and os.waitpid(pid, 0)[1] == 0
    assert kernels._NVRTC_STARTED  # (the thread's last step: NVRTC's one-time start)
print(started, "cupy" in sys.modules, sum(t.name == "cuflash-import-ahead" for t in threading.enumerate()))
"""
    for switch, expected in (("1", f"{cuda_build} {cuda_build} 0"), ("0", "False False 0")):
        env = dict(__import__("os").environ, CUFLASH_IMPORT_AHEAD=switch)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == expected.split(), (switch, result.stdout)


def test_flash_attn_varlen_func_matches_flash_attn_func_per_sequence(randt):
    lengths = [5, 1, 0, 9]
    cu = torch.tensor([0, 5, 6, 6, 15], dtype=torch.int32)
    q, k, v = (randt(15, 4, 8, requires_grad=True) for _ in range(3))
    out, lse, _ = ct.flash_attn_varlen_func(q, k, v, cu, cu, torch.tensor(9), 9, causal=True,
                                            window_size=(torch.tensor(3), torch.tensor(2)), return_attn_probs=True)
    assert out.shape == (15, 4, 8) and lse.shape == (4, 15)
    dout = randt(15, 4, 8)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        start += length
        if length == 0:
            continue
        parts = [x.detach()[rows].unsqueeze(0).requires_grad_() for x in (q, k, v)]
        expected = ct.flash_attn_func(*parts, causal=True, window_size=(3, 2))
        torch.testing.assert_close(out[rows], expected[0])
        expected_grads = torch.autograd.grad(expected, parts, dout[rows].unsqueeze(0))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got[rows], want[0])
    assert torch.autograd.gradcheck(
        lambda q, k, v: ct.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True),
        (q[:, :1, :3].detach().requires_grad_(), k[:, :1, :3].detach().requires_grad_(),
         v[:, :1, :3].detach().requires_grad_()))
    with pytest.raises(ValueError, match="max_seqlen_q = 4 is smaller"):
        ct.flash_attn_varlen_func(q, k, v, cu, cu, 4, 9)


# --- flash-attn 2's packed layouts: qkv / kv stacked, views over flash_attn_func / _varlen_func ---

PACKED_CU = [0, 5, 6, 6, 13]  # lengths 5, 1, 0, 7


def _packed_call(name, packed, rest, kwargs):
    """Calls one packed drop-in and the unpacked one it stands for on views of the same tensors.
    ``packed``: qkv or kv; ``rest``: q for the kv forms."""
    cu = torch.tensor(PACKED_CU, dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 9, 9, 11], dtype=torch.int32)
    drop_in = getattr(ct, name)
    if name == "flash_attn_qkvpacked_func":
        return drop_in(packed, **kwargs), ct.flash_attn_func(*packed.unbind(2), **kwargs)
    if name == "flash_attn_kvpacked_func":
        return drop_in(rest, packed, **kwargs), ct.flash_attn_func(rest, *packed.unbind(2), **kwargs)
    if name == "flash_attn_varlen_qkvpacked_func":
        return (drop_in(packed, cu, torch.tensor(7), **kwargs),
                ct.flash_attn_varlen_func(*packed.unbind(1), cu, cu, 7, 7, **kwargs))
    return (drop_in(rest, packed, cu, cu_k, numpy.int32(7), 6, **kwargs),
            ct.flash_attn_varlen_func(rest, *packed.unbind(1), cu, cu_k, 7, 6, **kwargs))


PACKED_SHAPES = {
    # name: (packed shape, q shape or None)
    "flash_attn_qkvpacked_func": ((2, 6, 3, 4, 8), None),
    "flash_attn_kvpacked_func": ((2, 9, 2, 2, 8), (2, 6, 4, 8)),
    "flash_attn_varlen_qkvpacked_func": ((13, 3, 4, 8), None),
    "flash_attn_varlen_kvpacked_func": ((11, 2, 2, 8), (13, 4, 8)),
}
PACKED_OPTIONS = [
    {},
    {"causal": True, "window_size": (torch.tensor(2), numpy.int64(0)), "softmax_scale": 0.4},
    {"window_size": (1, 2), "softcap": 2.5},
]


@pytest.mark.parametrize("kwargs", PACKED_OPTIONS, ids=["plain", "causal-window", "window-softcap"])
@pytest.mark.parametrize("name", PACKED_SHAPES)
def test_packed_drop_ins_equal_the_unpacked_calls_and_grads_reach_the_packed_tensor(name, kwargs, randt):
    """Bit for bit the unpacked call on views; the packed tensor's .grad is the unpacked call's
    gradients stacked back on its packed axis (MQA/GQA on the kv forms)."""
    packed_shape, q_shape = PACKED_SHAPES[name]
    packed = randt(*packed_shape, requires_grad=True)
    q = None if q_shape is None else randt(*q_shape, requires_grad=True)
    (out, lse, probabilities), (expected, expected_lse, _) = _packed_call(
        name, packed, q, dict(kwargs, return_attn_probs=True))
    assert probabilities is None and not lse.requires_grad
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    dout = randt(*out.shape)
    inputs = (packed,) if q is None else (packed, q)
    grads = torch.autograd.grad(out, inputs, dout)
    expected_grads = torch.autograd.grad(expected, inputs, dout)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape and torch.equal(got, want)
    _packed_call(name, packed, q, kwargs)[0].backward(dout)  # .backward() too: .grad lands on the packed tensor
    assert torch.equal(packed.grad, grads[0])


@pytest.mark.parametrize("name", PACKED_SHAPES)
def test_packed_drop_ins_gradcheck_into_the_packed_tensor(name, randt):
    packed_shape, q_shape = {  # small: gradcheck differentiates every entry
        "flash_attn_qkvpacked_func": ((1, 4, 3, 2, 3), None),
        "flash_attn_kvpacked_func": ((1, 5, 2, 1, 3), (1, 4, 2, 3)),  # MQA
        "flash_attn_varlen_qkvpacked_func": ((13, 3, 2, 3), None),
        "flash_attn_varlen_kvpacked_func": ((11, 2, 1, 3), (13, 2, 3)),
    }[name]
    packed = randt(*packed_shape, requires_grad=True)
    q = None if q_shape is None else randt(*q_shape, requires_grad=True)
    slopes = randt(2).abs()
    kwargs = {"causal": True, "window_size": (3, -1), "alibi_slopes": slopes}

    def call(*inputs):
        return _packed_call(name, inputs[0], inputs[1] if len(inputs) > 1 else None, kwargs)[0]

    assert torch.autograd.gradcheck(call, (packed,) if q is None else (packed, q))


@pytest.mark.parametrize("name", PACKED_SHAPES)
def test_packed_drop_ins_hand_views_of_the_packed_tensor_to_cuflash(name, randt, monkeypatch):
    """No copy in the forward: the q, k and v arrays cuflash receives share the packed tensor's
    memory (q's own for the kv forms)."""
    packed_shape, q_shape = PACKED_SHAPES[name]
    packed = randt(*packed_shape, requires_grad=True)
    q = None if q_shape is None else randt(*q_shape, requires_grad=True)
    crossed = []
    original = ct._to_cuflash
    monkeypatch.setattr(ct, "_to_cuflash", lambda tensor: crossed.append(original(tensor)) or crossed[-1])
    _packed_call(name, packed, q, {"causal": True})
    monkeypatch.setattr(ct, "_to_cuflash", original)
    crossed = crossed[:3]  # the drop-in runs first, and hands over q, k and v before anything else
    sources = [packed] * 3 if q is None else [q, packed, packed]
    for array, source in zip(crossed, sources):
        assert numpy.shares_memory(array, source.detach().numpy())


def test_packed_drop_ins_take_int_like_arguments(randt):
    qkv = randt(13, 3, 4, 8)
    cu = torch.tensor(PACKED_CU, dtype=torch.int32)
    expected = ct.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True, window_size=(2, 0))
    for max_seqlen, window in ((numpy.int64(7), (torch.tensor(2), torch.tensor(0))),
                               (torch.tensor(9, dtype=torch.int32), (numpy.int16(2), 0)), (7, [2, torch.tensor(0)])):
        torch.testing.assert_close(ct.flash_attn_varlen_qkvpacked_func(qkv, cu, max_seqlen, causal=True,
                                                                       window_size=window), expected, rtol=0, atol=0)
    for bad in (7.0, torch.tensor(7.0), torch.tensor([7]), True, None):
        with pytest.raises(TypeError, match="max_seqlen must be an int"):
            ct.flash_attn_varlen_qkvpacked_func(qkv, cu, bad)
    with pytest.raises(TypeError, match="window_size left must be an int"):
        ct.flash_attn_qkvpacked_func(randt(1, 4, 3, 2, 8), window_size=(torch.tensor(2.0), 0))


def _bad_packed_arguments(randt):
    """(drop-in, arguments, error, message) for misuse of the packed drop-ins, each named as the
    caller wrote it."""
    qkv5, qkv4 = randt(2, 6, 3, 4, 8), randt(13, 3, 4, 8)
    q4, kv5, q3, kv4 = randt(2, 6, 4, 8), randt(2, 9, 2, 2, 8), randt(13, 4, 8), randt(11, 2, 2, 8)
    cu, cu_k = torch.tensor(PACKED_CU, dtype=torch.int32), torch.tensor([0, 3, 9, 9, 11], dtype=torch.int32)
    return [
        ("flash_attn_qkvpacked_func", (qkv4,), ValueError, r"qkv must be 5-dimensional \(batch, seqlen, 3, heads"),
        ("flash_attn_qkvpacked_func", (kv5,), ValueError, r"qkv must have size 3 on axis 2 \(q, k, v stacked\)"),
        ("flash_attn_qkvpacked_func", (qkv5.numpy(),), TypeError, "qkv must be a torch.Tensor, got ndarray"),
        ("flash_attn_qkvpacked_func", (qkv5.to(torch.int32),), TypeError, "qkv must have dtype float16, .* got torch.int32"),
        ("flash_attn_kvpacked_func", (q4, qkv5), ValueError, r"kv must have size 2 on axis 2 \(k, v stacked\)"),
        ("flash_attn_kvpacked_func", (q4, kv4), ValueError, "kv must be 5-dimensional"),
        ("flash_attn_kvpacked_func", (q3, kv5), ValueError, r"q must be 4-dimensional \(batch, seqlen_q, heads"),
        ("flash_attn_kvpacked_func", (q4, kv5.float()), TypeError, "q and kv must share one dtype"),
        ("flash_attn_kvpacked_func", (q4, kv5[..., :4]), ValueError, "q's head dim must equal kv's: q has 8, kv has 4"),
        ("flash_attn_kvpacked_func", (q4, randt(2, 9, 2, 3, 8)), ValueError, "q's 4 heads must be a multiple of kv's 3"),
        ("flash_attn_kvpacked_func", (q4, kv5[:1]), ValueError, "q and kv must have the same batch size, got 2 and 1"),
        ("flash_attn_kvpacked_func", ("q", kv5), TypeError, "q must be a torch.Tensor"),
        ("flash_attn_varlen_qkvpacked_func", (qkv5, cu, 7), ValueError, r"qkv must be 4-dimensional \(total, 3, heads"),
        ("flash_attn_varlen_qkvpacked_func", (qkv4, cu.long(), 7), TypeError, "cu_seqlens must be a 1-D int32"),
        ("flash_attn_varlen_qkvpacked_func", (qkv4, cu.numpy(), 7), TypeError, "cu_seqlens must be a torch.Tensor"),
        ("flash_attn_varlen_qkvpacked_func", (qkv4, cu[:3], 7), ValueError, "cu_seqlens must be non-decreasing"),
        ("flash_attn_varlen_qkvpacked_func", (qkv4, cu, 6), ValueError, r"max_seqlen = 6 is smaller than the longest"),
        ("flash_attn_varlen_qkvpacked_func", (qkv4, cu, 7.5), TypeError, "max_seqlen must be an int"),
        ("flash_attn_varlen_kvpacked_func", (q3, kv5, cu, cu_k, 7, 6), ValueError, r"kv must be 4-dimensional \(total_k, 2"),
        ("flash_attn_varlen_kvpacked_func", (q3, kv4[:, :1], cu, cu_k, 7, 6), ValueError, "kv must have size 2 on axis 1"),
        ("flash_attn_varlen_kvpacked_func", (q4, kv4, cu, cu_k, 7, 6), ValueError, r"q must be 3-dimensional \(total_q"),
        ("flash_attn_varlen_kvpacked_func", (q3, kv4, cu, cu_k, 7, 5), ValueError, "max_seqlen_k = 5 is smaller"),
        ("flash_attn_varlen_kvpacked_func", (q3, kv4, cu, cu, 7, 6), ValueError, "cu_seqlens_k must be non-decreasing"),
    ]


def test_packed_drop_ins_name_the_callers_arguments(randt):
    for name, arguments, error, match in _bad_packed_arguments(randt):
        with pytest.raises(error, match=match):
            getattr(ct, name)(*arguments)


def test_packed_drop_ins_drop(randt):
    """The stacked and packed drop-ins pass dropout_p on (a seeded call repeats; 0 drops nothing)."""
    cu = torch.tensor([0, 4], dtype=torch.int32)
    q, kv, qkv = randt(4, 2, 8), randt(4, 2, 2, 8), randt(1, 4, 3, 2, 8)
    plain = ct.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 4, 4, 0.0)
    torch.manual_seed(1)
    dropped = ct.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 4, 4, 0.5)
    torch.manual_seed(1)
    assert torch.equal(dropped, ct.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 4, 4, 0.5))
    assert not torch.equal(dropped, plain)
    torch.manual_seed(2)
    stacked = ct.flash_attn_qkvpacked_func(qkv, dropout_p=0.5)
    assert not torch.equal(stacked, ct.flash_attn_qkvpacked_func(qkv))


def test_torch_compile_fullgraph_packed_drop_ins(randt):
    torch._dynamo.reset()

    def loss(qkv, q, kv):
        return (ct.flash_attn_qkvpacked_func(qkv, causal=True) ** 2).sum() + \
            (ct.flash_attn_kvpacked_func(q, kv, window_size=(2, 1)) ** 2).sum()

    inputs = [randt(2, 6, 3, 4, 8, requires_grad=True), randt(2, 5, 4, 8, requires_grad=True),
              randt(2, 7, 2, 2, 8, requires_grad=True)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(loss(*inputs), inputs)
    for ours, theirs in zip(torch.autograd.grad(compiled(*inputs), inputs), eager):
        torch.testing.assert_close(ours, theirs)


def test_bias_and_mask_on_cpu_tensors_with_autograd_into_bias(rng):
    """cuflash.torch.attention(bias=, mask=) on CPU tensors: the same values as cuflash.attention
    on the NumPy arrays, gradients into q, k, v, bias and sinks by gradcheck in float64 (a mask
    carries none), and a clear error inside torch.compile (eager only so far)."""
    import cuflash.torch as ct

    q = torch.from_numpy(rng.standard_normal((2, 3, 6, 5))).requires_grad_()
    k = torch.from_numpy(rng.standard_normal((2, 3, 7, 5))).requires_grad_()
    v = torch.from_numpy(rng.standard_normal((2, 3, 7, 4))).requires_grad_()
    bias = torch.from_numpy(rng.standard_normal((1, 3, 6, 7))).requires_grad_()  # shared over the batch
    sinks = torch.from_numpy(rng.standard_normal(3)).requires_grad_()
    mask = torch.from_numpy(rng.random((2, 1, 1, 7)) > 0.3)  # key padding
    mask[:, :, :, 0] = True
    options = dict(causal=True, softcap=2.0)
    out = ct.attention(q, k, v, bias=bias, mask=mask, sinks=sinks, **options)
    want = cuflash.attention(*(x.detach().numpy() for x in (q, k, v)), bias=bias.detach().numpy(),
                             mask=mask.numpy(), sinks=sinks.detach().numpy(), **options)
    numpy.testing.assert_array_equal(out.detach().numpy(), want)
    assert torch.autograd.gradcheck(lambda q, k, v, b, s: ct.attention(q, k, v, bias=b, mask=mask, sinks=s, **options),
                                    (q, k, v, bias, sinks))
    # Without a gradient to take, the plain path; a mask alone needs none.
    with torch.no_grad():
        numpy.testing.assert_array_equal(ct.attention(q, k, v, bias=bias, mask=mask, sinks=sinks, **options).numpy(),
                                         want)
    numpy.testing.assert_array_equal(
        ct.attention(q.detach(), k.detach(), v.detach(), mask=mask).numpy(),
        cuflash.attention(*(x.detach().numpy() for x in (q, k, v)), mask=mask.numpy()))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ct.attention(q, k, v, bias=bias.detach().numpy())
    # Inside torch.compile (fullgraph: no graph break) through the custom ops: the same values and
    # gradients, dbias included.
    compiled = torch.compile(lambda q, k, v, b, s: ct.attention(q, k, v, bias=b, mask=mask, sinks=s, **options),
                             fullgraph=True)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias, sinks)]
    out_compiled = compiled(*leaves)
    numpy.testing.assert_array_equal(out_compiled.detach().numpy(), want)
    dout = torch.from_numpy(numpy.random.default_rng(0).standard_normal(out_compiled.shape))
    out_compiled.backward(dout)
    eager_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias, sinks)]
    ct.attention(*eager_leaves[:3], bias=eager_leaves[3], mask=mask, sinks=eager_leaves[4], **options).backward(dout)
    for compiled_leaf, eager_leaf in zip(leaves, eager_leaves):
        numpy.testing.assert_array_equal(compiled_leaf.grad.numpy(), eager_leaf.grad.numpy())


# --- flash_attn_with_kvcache ----------------------------------------------------------------------


def _rotary_ref(x, angles, positions, interleaved):
    """Rotary embedding by complex multiplication: dims (0, 1), (2, 3), ... (interleaved) or the
    two halves of the first 2 * angles.shape[1] dims form z, turned by exp(i * angle[position])."""
    half = angles.shape[1]
    x = x.copy()
    part = x[..., :2 * half]
    z = (part[..., 0::2] + 1j * part[..., 1::2]) if interleaved else (part[..., :half] + 1j * part[..., half:])
    z = z * numpy.exp(1j * angles[positions])[:, :, None, :]  # positions (B, L)
    if interleaved:
        part[..., 0::2], part[..., 1::2] = z.real, z.imag
    else:
        part[..., :half], part[..., half:] = z.real, z.imag
    return x


@pytest.mark.parametrize("layout", ["plain", "paged", "batch_idx", "leftpad"])
@pytest.mark.parametrize("rotary", [None, "interleaved", "halves"])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 0)), (True, (4, 0))])
def test_flash_attn_with_kvcache_matches_a_reference(rng, layout, rotary, causal, window):
    """flash-attn's semantics on CPU tensors in float64: the new keys/values (rotated) land in
    the cache in place at cache_seqlens[b] (only there), and each sequence attends over keys
    [leftpad, cache_seqlens + Lnew) of its cache row, causal/windows bottom-right, queries rotated
    at their own positions under causal or a window, else all at cache_seqlens."""
    batch, lq, heads, heads_k, d, lmax, lnew, page = 3, 3, 4, 2, 16, 32, 2, 8
    cache_rows = batch + 2 if layout == "batch_idx" else batch
    q = rng.standard_normal((batch, lq, heads, d))
    k_new, v_new = (rng.standard_normal((batch, lnew, heads_k, d)) for _ in range(2))
    k_cache, v_cache = (rng.standard_normal((cache_rows, lmax, heads_k, d)) for _ in range(2))
    leftpad = rng.integers(0, 6, batch) if layout == "leftpad" else numpy.zeros(batch, int)
    seqlens = numpy.array([rng.integers(lp, lmax - lnew + 1) for lp in leftpad])
    rows = rng.permutation(cache_rows)[:batch] if layout == "batch_idx" else numpy.arange(batch)
    angles = rng.uniform(0, 2 * numpy.pi, (lmax + lq, 4))  # rotary_dim 8 of 16

    # reference: rotate, append, attend over each sequence's keys
    local = causal or window != (-1, -1)
    q_ref, k_ref = q, k_new
    if rotary:
        steps = numpy.arange(lq) if local else numpy.zeros(lq, int)
        q_ref = _rotary_ref(q, angles, seqlens[:, None] + steps[None, :], rotary == "interleaved")
        k_ref = _rotary_ref(k_new, angles, seqlens[:, None] + numpy.arange(lnew)[None, :], rotary == "interleaved")
    k_cache_ref, v_cache_ref = k_cache.copy(), v_cache.copy()
    for b in range(batch):
        k_cache_ref[rows[b], seqlens[b]:seqlens[b] + lnew] = k_ref[b]
        v_cache_ref[rows[b], seqlens[b]:seqlens[b] + lnew] = v_new[b]
    ref_window = None if window == (-1, -1) else window
    refs = [attention_ref(*(x.transpose(1, 0, 2) for x in (q_ref[b], k_cache_ref[rows[b], leftpad[b]:seqlens[b] + lnew],
                                                           v_cache_ref[rows[b], leftpad[b]:seqlens[b] + lnew])),
                          causal=causal, window=ref_window) for b in range(batch)]

    t = torch.from_numpy
    kwargs = dict(k=t(k_new), v=t(v_new), cache_seqlens=t(seqlens.astype(numpy.int32)), causal=causal,
                  window_size=window, return_softmax_lse=True)
    if rotary:
        kwargs.update(rotary_cos=t(numpy.cos(angles)), rotary_sin=t(numpy.sin(angles)),
                      rotary_interleaved=rotary == "interleaved")
    if layout == "batch_idx":
        kwargs["cache_batch_idx"] = t(rows.astype(numpy.int32))
    if layout == "leftpad":
        kwargs["cache_leftpad"] = t(leftpad.astype(numpy.int32))
    caches = [t(k_cache.copy()), t(v_cache.copy())]
    if layout == "paged":  # the same cache cut in pages of 8 rows, stored in a random page order
        pages_per_row = lmax // page
        order = rng.permutation(batch * pages_per_row + 3)
        table = order[:batch * pages_per_row].reshape(batch, pages_per_row)
        paged = [numpy.full((len(order), page, heads_k, d), numpy.nan) for _ in range(2)]
        for store, cache in zip(paged, (k_cache, v_cache)):
            store[table.reshape(-1)] = cache.reshape(batch * pages_per_row, page, heads_k, d)
        caches = [t(store) for store in paged]
        kwargs["block_table"] = t(table.astype(numpy.int32))
    out, lse = ct.flash_attn_with_kvcache(t(q), *caches, **kwargs)

    assert out.shape == (batch, lq, heads, d) and lse.shape == (batch, heads, lq)
    for b in range(batch):
        numpy.testing.assert_allclose(out[b].numpy().transpose(1, 0, 2), refs[b][0], rtol=1e-12, atol=1e-13)
        numpy.testing.assert_allclose(lse[b].numpy(), refs[b][1], rtol=1e-12, atol=1e-13)
    if layout == "paged":
        caches = [c.numpy()[table.reshape(-1)].reshape(batch, lmax, heads_k, d) for c in caches]
        assert numpy.isnan(paged[0][order[batch * pages_per_row:]]).all()  # pages nobody owns: untouched
    else:
        caches = [c.numpy() for c in caches]
    written = numpy.zeros(k_cache.shape[:2], bool)
    for b in range(batch):
        written[rows[b], seqlens[b]:seqlens[b] + lnew] = True
    for cache, ref in zip(caches, (k_cache_ref, v_cache_ref)):  # in place, exactly those slots
        numpy.testing.assert_array_equal(cache[~written], ref[~written])
        # (the rotated keys: the same rotation by another formula, within rounding)
        numpy.testing.assert_allclose(cache[written], ref[written], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(2, 1), softcap=3.0),
                                     dict(causal=True, alibi_slopes="slopes", deterministic=True)],
                         ids=["causal", "window-softcap", "alibi"])
def test_flash_attn_varlen_func_inside_torch_compile(rng, options):
    """flash_attn_varlen_func compiled with fullgraph (cuflash's varlen custom ops and their
    autograd): out and the gradients of q, k, v those of the eager call, one graph for batches
    of other sequence boundaries (cu_seqlens tensors of the same length)."""
    import torch._dynamo.testing

    t = torch.from_numpy
    q, k, v = (t(rng.standard_normal((12, h, 8))).requires_grad_() for h in (4, 2, 2))
    if options.get("alibi_slopes") == "slopes":
        options = dict(options, alibi_slopes=t(rng.uniform(0.1, 1.0, 4)))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    def call(q, k, v, cu_q, cu_k):
        return ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, **options)

    compiled = torch.compile(call, backend=counter, fullgraph=True)
    for bounds in ([0, 3, 12], [0, 9, 12], [0, 5, 12]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        dout = t(rng.standard_normal((12, 4, 8)))
        results = []
        for function in (call, compiled):
            out = function(q, k, v, cu, cu)
            results.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert counter.frame_count == 1


@pytest.mark.parametrize("append", [False, True], ids=["read", "append"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_flash_attn_with_kvcache_inside_torch_compile(rng, append, paged):
    """A decoding loop's step compiled with ``fullgraph=True`` (cuflash's kv-cache custom op, the
    appending one declaring the caches it writes): one graph for every step (the lengths a tensor,
    their values new each step), out and lse those of the eager call, and the caches written in
    place exactly as the eager call writes them."""
    import torch._dynamo.testing

    batch, heads, heads_k, d, lmax, page = 2, 4, 2, 16, 24, 8
    t = torch.from_numpy
    extra = {}
    if paged:  # pages of 8 rows; each sequence's pages in reverse order of the store
        pages = batch * lmax // page
        k_cache, v_cache = (rng.standard_normal((pages, page, heads_k, d)) for _ in range(2))
        extra["block_table"] = t(numpy.arange(pages)[::-1].reshape(batch, lmax // page).astype(numpy.int32).copy())
    else:
        k_cache, v_cache = (rng.standard_normal((batch, lmax, heads_k, d)) for _ in range(2))
    caches = {mode: [t(k_cache.copy()), t(v_cache.copy())] for mode in ("eager", "compiled")}
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    def step(q, k_cache, v_cache, k, v, lengths):
        return ct.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths, causal=True,
                                          softmax_scale=0.3, return_softmax_lse=True, **extra)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for position in (5, 6, 9):
        q = t(rng.standard_normal((batch, 1, heads, d)))
        new = [t(rng.standard_normal((batch, 1, heads_k, d))) if append else None for _ in range(2)]
        lengths = torch.tensor([position, position + 3], dtype=torch.int32)
        want = step(q, *caches["eager"], *new, lengths)
        got = compiled(q, *caches["compiled"], *new, lengths)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(caches["compiled"], caches["eager"]):
            assert torch.equal(a, b)
    if append:  # (the steps really wrote the caches)
        assert not torch.equal(caches["eager"][0], t(k_cache))
    assert counter.frame_count == 1


def test_flash_attn_with_kvcache_argument_errors(randt):
    q, k_cache, v_cache = randt(2, 1, 4, 8), randt(2, 16, 2, 8), randt(2, 16, 2, 8)
    with pytest.raises(ValueError, match="k and v must be given together"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, k=randt(2, 1, 2, 8), cache_seqlens=3)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache)
    with pytest.raises(ValueError, match="cache_seqlens must be an int or an int32 tensor"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, rotary_cos=randt(16, 2))
    with pytest.raises(ValueError, match="rotary_cos/rotary_sin have 4 positions"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5, rotary_cos=randt(4, 2), rotary_sin=randt(4, 2))
    with pytest.raises(ValueError, match="cache_batch_idx entries must be in"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3,
                                   cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_batch_idx cannot be used with block_table"):
        ct.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, block_table=torch.zeros(2, 1, dtype=torch.int32),
                                   cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))


def test_flash_attn_func_returns_a_contiguous_b_l_h_d_output_and_gradients():
    """flash-attn's own layout: out (B, L, H, D) contiguous (``.view`` works, as flash-attn's),
    and q, k, v's gradients in their tensors' layout; values as the same call's on copies."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, h, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = ct.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (2, 37, 4, 16) and out.is_contiguous()
    out.view(2, 37, 64).square().sum().backward()
    assert all(x.grad.is_contiguous() for x in (q, k, v))
    copies = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    want = ct.flash_attn_func(*copies, causal=True)
    want.reshape(2, 37, 64).square().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for x, c in zip((q, k, v), copies):
        torch.testing.assert_close(x.grad, c.grad, rtol=0, atol=0)


@pytest.mark.parametrize("current", [1, 0], ids=["same-device", "other-device"])
def test_running_on_makes_the_tensors_context_current_without_moving_the_callers_device(monkeypatch, current):
    """_running_on on a CUDA tensor of device 1 (no GPU: CuPy's runtime and device context stood
    in for): when device 1 is already current it calls cudaSetDevice(1) (its primary context
    current on this thread: autograd's backward thread may have none), else it leaves the switch
    and its undoing to cupy.cuda.Device; either way the caller's device is current after."""
    cupy = pytest.importorskip("cupy")
    import contextlib
    import types

    state = {"device": current, "set": []}

    def set_device(index):
        state["set"].append(index)
        state["device"] = index

    class Device:  # cupy.cuda.Device's switch and restore
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous = state["device"]
            if self.previous != self.index:
                set_device(self.index)

        def __exit__(self, *exc):
            if state["device"] != self.previous:
                set_device(self.previous)

    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: state["device"])
    monkeypatch.setattr(cupy.cuda.runtime, "setDevice", set_device)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(cupy.cuda, "using_allocator", lambda allocator: contextlib.nullcontext())
    monkeypatch.setattr(ct, "_current_cupy_stream", lambda cupy, index: contextlib.nullcontext())
    monkeypatch.setattr(ct, "_torch_allocator", lambda: None)
    tensor = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=1))
    with ct._running_on(tensor):
        assert state["device"] == 1 and ct._ON_TORCH_STREAM.device == 1
    assert state["device"] == current
    assert state["set"] == ([1] if current == 1 else [1, 0])
    assert getattr(ct._ON_TORCH_STREAM, "device", None) is None


@pytest.mark.parametrize("axes", [None, (0, 2, 1, 3)])
def test_cupy_views_of_tensors_carry_their_layout_and_owner(axes):
    """_cupy_view without a GPU (a CPU tensor's address stands for a device one: UnownedMemory
    makes no CUDA call): the view's shape and byte strides, permuted by ``axes``, its address,
    the bytes it spans and the tensor it holds; a second view of the same layout (its memo) alike."""
    pytest.importorskip("cupy")
    base = torch.zeros(3, 40, 5, 16, dtype=torch.float16)
    tensors = [base[:, 2:39:2], base.transpose(1, 2), base[1:2, :7]]
    for tensor in tensors + tensors:  # (the second pass through the memo)
        view = ct._cupy_view(tensor, numpy.dtype(numpy.float16), 0, axes)
        order = axes or range(4)
        assert view.shape == tuple(tensor.shape[a] for a in order)
        assert view.strides == tuple(2 * tensor.stride()[a] for a in order)
        assert view.data.ptr == tensor.data_ptr() and view.data.mem._owner is tensor  # (holds it alive)
        last = sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride()))
        assert view.data.mem.size == 2 * (last + 1)


def test_kv_signatures_key_only_plain_calls_on_cuda_tensors():
    """ct._kv_signature (flash_attn_with_kvcache's kept signatures) keys nothing it could confuse:
    options of other types (a list window, a 0-d tensor scale) and tensors off CUDA give None."""
    q, cache = torch.zeros(1, 1, 2, 8), torch.zeros(1, 4, 2, 8)
    plain = (None, True, (-1, -1), 0.0, 0, False)
    assert ct._kv_signature(q, cache, cache, None, None, 3, None, plain) is None  # (CPU tensors)
    for options in [(None, True, [-1, -1], 0.0, 0, False), (torch.tensor(0.5), True, (-1, -1), 0.0, 0, False),
                    (None, 1, (-1, -1), 0.0, 0, False), (None, True, (-1, -1), 0.0, 0, 1)]:
        assert ct._kv_signature(q, cache, cache, None, None, 3, None, options) is None


def test_a_kept_kvcache_signature_launches_from_the_tensors_addresses(monkeypatch):
    """ct._KvKnown.run without a GPU (CPU tensors' addresses stand for device ones; the launches
    recorded): out and the layout's allocation from torch, the params holding this call's
    addresses, the lse a view of its part of the allocation, the append launched before the
    decode kernel on the same stream with the same length; an int length past the cache, new keys
    in a cache's memory, caches sharing one memory, or a thread that never made the device's context current: None (the
    full path takes the call)."""
    pytest.importorskip("cupy")
    import types

    from cuflash._gpu import decode

    launched = []
    monkeypatch.setattr(decode._Layout, "launch", lambda self, params, stream: launched.append(
        ("decode", params.copy(), stream)))
    monkeypatch.setattr(ct._ON_TORCH_STREAM, "ready", {None}, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(ct, "_current_raw_stream", lambda index: 77)
    carve = decode._carving((None, ((2, 16, 1), numpy.float32), None, None, None, None, None, None, None))
    layout = decode._Layout(numpy.zeros((), dtype=decode.PARAMS_DTYPE).tobytes(), False, False, False, False,
                            None, None, 8, 0, 1024, 1, carve)
    append = types.SimpleNamespace(copy_new=False, launch=lambda *args: launched.append(("append", args)))
    known = types.SimpleNamespace(cache=types.SimpleNamespace(capacity=64, new=1, fixed=None), layout=layout,
                                  append=append, return_lse=True)
    kept = ct._KvKnown(known, (2, 1, 16, 128))
    q = torch.zeros(2, 1, 16, 128, dtype=torch.float16)
    k_cache, v_cache = (torch.zeros(2, 64, 4, 128, dtype=torch.float16) for _ in range(2))
    k, v = (torch.zeros(2, 1, 4, 128, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([5, 9], dtype=torch.int32)

    out, lse = kept.run(q, k_cache, v_cache, k, v, lengths, None)
    assert out.shape == (2, 1, 16, 128) and out.dtype == torch.float16
    assert lse.shape == (2, 16, 1) and lse.dtype == torch.float32
    (kind, args), (_, p, stream) = launched
    assert kind == "append" and args == (k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                         lengths.data_ptr(), 0, 64, 77) and stream == 77
    assert (p["q"], p["k_cache"], p["v_cache"], p["o"], p["lse"]) == (
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lse.data_ptr())
    assert p["cache_seqlens"] == lengths.data_ptr() and p["block_table"] == 0 and p["seqlen_fixed"] == 64

    launched.clear()
    kept.run(q, k_cache, v_cache, k, v, 10, None)  # an int length: the kernel's fixed length, no lengths array
    assert launched[0][1][4:7] == (0, 0, 10) and launched[1][1]["seqlen_fixed"] == 10
    launched.clear()
    inside = k_cache.view(-1)[:k.numel()].view(k.shape)
    assert kept.run(q, k_cache, v_cache, k, v, 64, None) is None  # 64 + 1 new key past Lmax 64
    assert kept.run(q, k_cache, v_cache, inside, v, lengths, None) is None
    assert kept.run(q, k_cache, k_cache, k, v, lengths, None) is None  # the two caches one memory
    assert kept.run(q, k_cache, v_cache, k, v_cache.view(-1)[-k.numel():].view(k.shape), lengths, None) is None
    assert launched == []
    monkeypatch.setattr(ct._ON_TORCH_STREAM, "ready", set())
    assert kept.run(q, k_cache, v_cache, k, v, lengths, None) is None and launched == []


def test_flash_attn_varlen_func_drops_as_attention_varlen(rng):
    """flash_attn_varlen_func(dropout_p) draws its seed from torch's generator and drops what
    cuflash.attention_varlen drops with that seed; its gradients are attention_varlen_backward's."""
    lengths = [9, 1, 14]
    cu = numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int32)
    q, k, v, dout = (rng.standard_normal((sum(lengths), 4, 8)) for _ in range(4))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tcu = torch.from_numpy(cu)
    torch.manual_seed(9)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(9)
    out = ct.flash_attn_varlen_func(tq, tk, tv, tcu, tcu, 14, 14, dropout_p=0.4, causal=True)
    expected, lse = cuflash.attention_varlen(q, k, v, cu, cu, causal=True, dropout_p=0.4, dropout_seed=seed,
                                             return_lse=True)
    numpy.testing.assert_array_equal(out.detach().numpy(), expected)
    out.backward(torch.tensor(dout))
    grads = cuflash.attention_varlen_backward(dout, q, k, v, expected, lse, cu, cu, causal=True, dropout_p=0.4,
                                              dropout_seed=seed)
    for got, want in zip((tq.grad, tk.grad, tv.grad), grads):
        numpy.testing.assert_array_equal(got.numpy(), want)
