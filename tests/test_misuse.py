"""The misuse catalogue: wrong calls across every public entry point, each refused with the right
error type and a message that names the argument and what was expected, before anything the
caller owns is touched.

Every case runs against a fresh ``World``: the NumPy arrays of a dense call (q, k, v, an out=
buffer full of a sentinel, and the forward's out and lse with a dout for the backward), those of a
packed varlen call, torch tensors that require grad, and JAX arrays. After the call, every one of
them must be bit for bit what it was (torch tensors: values and no .grad). The cases here are
the ones tests/test_validation.py, test_score_mods.py, test_varlen.py, test_torch.py and
test_jax.py do not already hold; the second half checks that int-like arguments (NumPy integers,
0-d integer arrays and tensors) are accepted wherever an int is.

Cases marked xfail(strict=True) are defects of the library today; the reason says where.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy
import pytest

import cuflash

try:
    import torch
    import cuflash.torch as ct
except ImportError:  # the torch cases skip
    torch = ct = None

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import jax
    import jax.numpy as jnp
    import cuflash.jax as cj
except ImportError:  # the JAX cases skip
    jax = jnp = cj = None

SENTINEL = 7.0


class World:
    """Everything a case may pass, all owned by the caller: nothing may change."""

    def __init__(self, rng):
        def draw(*shape, dtype=numpy.float32):
            return rng.standard_normal(shape).astype(dtype)

        # dense: q (2, 3, 10, 8), k (2, 3, 12, 8), v (2, 3, 12, 6) -> out (2, 3, 10, 6)
        self.q, self.k, self.v = draw(2, 3, 10, 8), draw(2, 3, 12, 8), draw(2, 3, 12, 6)
        self.out_buf = numpy.full((2, 3, 10, 6), SENTINEL, numpy.float32)
        self.out, self.lse = cuflash.attention(self.q, self.k, self.v, return_lse=True)
        self.dout = draw(2, 3, 10, 6)
        self.sinks = draw(3)
        self.q16, self.k16, self.v16 = (x.astype(numpy.float16) for x in (self.q, self.k, self.v))
        self.out16, self.lse16 = cuflash.attention(self.q16, self.k16, self.v16, return_lse=True)
        self.q64, self.k64, self.v64 = (x.astype(numpy.float64) for x in (self.q, self.k, self.v))
        self.out64, self.lse64 = cuflash.attention(self.q64, self.k64, self.v64, return_lse=True)
        # packed varlen: 3 sequences, q (10, 4, 8), k (12, 2, 8), v (12, 2, 6) float64
        self.pq, self.pk, self.pv = draw(10, 4, 8, dtype=numpy.float64), draw(12, 2, 8, dtype=numpy.float64), draw(
            12, 2, 6, dtype=numpy.float64)
        self.cu_q = numpy.array([0, 5, 9, 10], numpy.int32)
        self.cu_k = numpy.array([0, 4, 8, 12], numpy.int32)
        self.pout_buf = numpy.full((10, 4, 6), SENTINEL)
        self.pout, self.plse = cuflash.attention_varlen(self.pq, self.pk, self.pv, self.cu_q, self.cu_k,
                                                        return_lse=True)
        self.pdout = draw(10, 4, 6, dtype=numpy.float64)
        self.same = draw(10, 4, 6, dtype=numpy.float64)  # q, k, v in one shape: out= could alias any
        self.read_only = numpy.full((10, 4, 6), SENTINEL)
        self.read_only.flags.writeable = False
        if torch is not None:
            def tensor(*shape, grad=True, dtype=torch.float64):
                return torch.from_numpy(rng.standard_normal(shape)).to(dtype).requires_grad_(grad)

            self.tq, self.tk, self.tv = (tensor(1, 2, 4, 4) for _ in range(3))  # (B, H, L, D)
            self.tb = tensor(1, 4, 2, 4)  # (B, L, H, D) for flash_attn_func
            self.tp = tensor(9, 2, 4)  # packed (total, H, D)
            self.t_cu = torch.tensor([0, 5, 9], dtype=torch.int32)
            self.t_out_buf = torch.full((2, 3, 10, 6), SENTINEL)  # float32, the dense call's out shape
        if jax is not None:
            self.jq, self.jk, self.jv = (jnp.asarray(draw(2, 4, 6, 8)) for _ in range(3))

    def owned(self):
        return {name: value for name, value in vars(self).items()
                if isinstance(value, numpy.ndarray) or (torch is not None and isinstance(value, torch.Tensor))
                or (jax is not None and isinstance(value, jax.Array))}

    def snapshot(self):
        shot = {}
        for name, value in self.owned().items():
            if isinstance(value, numpy.ndarray):
                shot[name] = value.tobytes()
            elif torch is not None and isinstance(value, torch.Tensor):
                shot[name] = value.detach().clone()
            else:
                shot[name] = numpy.asarray(value).tobytes()
        return shot

    def assert_unchanged(self, shot):
        for name, value in self.owned().items():
            if isinstance(value, numpy.ndarray):
                assert value.tobytes() == shot[name], f"{name} was modified"
            elif torch is not None and isinstance(value, torch.Tensor):
                assert torch.equal(value.detach(), shot[name]), f"{name} was modified"
                assert value.grad is None, f"{name} got a gradient"
            else:
                assert numpy.asarray(value).tobytes() == shot[name], f"{name} was modified"


def _lse_flash_layout(w):
    return numpy.ascontiguousarray(w.plse.T)  # flash-attn's (total_q, Hq) instead of (Hq, total_q)


def _varlen(w, **changes):
    arguments = dict(q=w.pq, k=w.pk, v=w.pv, cu_seqlens_q=w.cu_q, cu_seqlens_k=w.cu_k)
    arguments.update(changes)
    return cuflash.attention_varlen(**arguments)


def _varlen_backward(w, **changes):
    arguments = dict(dout=w.pdout, q=w.pq, k=w.pk, v=w.pv, out=w.pout, lse=w.plse, cu_seqlens_q=w.cu_q,
                     cu_seqlens_k=w.cu_k)
    arguments.update(changes)
    return cuflash.attention_varlen_backward(**arguments)


def _backward(w, **changes):
    arguments = dict(dout=w.dout, q=w.q, k=w.k, v=w.v, out=w.out, lse=w.lse)
    arguments.update(changes)
    return cuflash.attention_backward(**arguments)


def _vjp_then(w, dout):
    _, vjp = cuflash.attention_vjp(w.q, w.k, w.v, causal=True)
    return vjp(dout)


def _empty_batch(w, **options):
    """A packed call with no sequence at all: the options are still the caller's to get right."""
    empty = numpy.zeros(1, numpy.int32)
    return cuflash.attention_varlen(w.pq[:0], w.pk[:0], w.pv[:0], empty, empty, **options)


def _case(name, call, error, match, needs=None, defect=None):
    marks = []
    if needs == "torch":
        marks.append(pytest.mark.skipif(torch is None, reason="needs torch"))
    if needs == "jax":
        marks.append(pytest.mark.skipif(jax is None, reason="needs JAX"))
    if defect:
        marks.append(pytest.mark.xfail(strict=True, reason=defect))
    return pytest.param(call, error, match, id=name, marks=marks)


CASES = [
    # --- cuflash.attention --------------------------------------------------------------------
    _case("attention-causal-window-right-as-tensors",
          lambda w: cuflash.attention(w.q, w.k, w.v, causal=True, window=(torch.tensor(3), torch.tensor(1)),
                                      out=w.out_buf),
          ValueError, r"window right must be 0 or -1 with causal .* pass window=\(3, 0\)", needs="torch"),
    _case("attention-out-is-a-torch-tensor",
          lambda w: cuflash.attention(w.q, w.k, w.v, out=w.t_out_buf),
          TypeError, r"out must be a numpy\.ndarray like q", needs="torch"),
    _case("attention-sinks-list", lambda w: cuflash.attention(w.q, w.k, w.v, sinks=[0.0, 1.0, 2.0], out=w.out_buf),
          TypeError, r"sinks must be a numpy\.ndarray"),
    _case("attention-sinks-on-unbatched-call",
          lambda w: cuflash.attention(w.q[0, 0], w.k[0, 0], w.v[0, 0], sinks=w.sinks),
          ValueError, r"sinks must broadcast to the output's leading axes \(\) "),
    _case("attention-out-overlaps-sinks",
          lambda w: cuflash.attention(w.q, w.k, w.v, sinks=w.out_buf[0, :, 0, 0], out=w.out_buf),
          ValueError, r"out must not share memory with sinks"),
    _case("attention-sinks-plus-inf",
          lambda w: cuflash.attention(w.q, w.k, w.v, sinks=numpy.full(3, numpy.inf, numpy.float32), out=w.out_buf),
          ValueError, r"sinks must be .*finite|sinks .* \+inf"),
    # --- cuflash.attention_backward: tensors and options that no forward could have produced ---
    _case("backward-causal-window-right", lambda w: _backward(w, causal=True, window=(2, 1)),
          ValueError, r"window right must be 0 or -1 with causal"),
    _case("backward-lse-in-the-input-dtype",
          lambda w: cuflash.attention_backward(w.out16, w.q16, w.k16, w.v16, w.out16, w.lse16.astype(numpy.float16)),
          TypeError, r"lse must have dtype float32 \(as the forward returns it\), got float16"),
    _case("backward-float32-lse-for-float64",
          lambda w: cuflash.attention_backward(w.out64, w.q64, w.k64, w.v64, w.out64, w.lse64.astype(numpy.float32)),
          TypeError, r"lse must have dtype float64 \(as the forward returns it\), got float32"),
    _case("backward-lse-without-the-batch-axis", lambda w: _backward(w, lse=w.lse[0]),
          ValueError, r"lse must have shape \(2, 3, 10\) \(leading axes \+ \(Lq,\)\), got \(3, 10\)"),
    _case("backward-lse-None", lambda w: _backward(w, lse=None), TypeError, r"lse must be a numpy\.ndarray"),
    _case("backward-dout-None", lambda w: _backward(w, dout=None), TypeError, r"dout must be a numpy\.ndarray"),
    _case("backward-out-list", lambda w: _backward(w, out=w.out.tolist()), TypeError, r"out must be a numpy\.ndarray"),
    _case("backward-v-of-another-forward", lambda w: _backward(w, v=w.v[..., :5]),
          ValueError, r"out must have the forward output's shape \(2, 3, 10, 5\), got \(2, 3, 10, 6\)"),
    _case("backward-q-of-another-forward", lambda w: _backward(w, q=w.q[..., :9, :]),
          ValueError, r"out must have the forward output's shape \(2, 3, 9, 6\)"),
    _case("backward-kv-heads-not-dividing", lambda w: _backward(w, k=w.k[:, :2], v=w.v[:, :2]),
          ValueError, r"q's 3 heads are not a multiple of k/v's 2"),
    _case("backward-mixed-dtypes", lambda w: _backward(w, q=w.q64), TypeError, r"q, k and v must share one dtype"),
    _case("backward-scale-bool", lambda w: _backward(w, scale=True), TypeError, r"scale must be a real number"),
    # --- cuflash.attention_vjp -----------------------------------------------------------------
    _case("vjp-dout-shape", lambda w: _vjp_then(w, w.dout[..., :4]),
          ValueError, r"dout must have the forward output's shape \(2, 3, 10, 6\)"),
    _case("vjp-dout-dtype", lambda w: _vjp_then(w, w.dout.astype(numpy.float64)),
          TypeError, r"dout must have q's dtype float32, got float64"),
    _case("vjp-causal-window-right", lambda w: cuflash.attention_vjp(w.q, w.k, w.v, causal=True, window=(1, 2)),
          ValueError, r"window right must be 0 or -1 with causal"),
    _case("vjp-deterministic-str", lambda w: cuflash.attention_vjp(w.q, w.k, w.v, deterministic="yes"),
          TypeError, r"deterministic must be a bool"),
    # --- cuflash.attention_varlen ------------------------------------------------------------------
    _case("varlen-k-2d", lambda w: _varlen(w, k=w.pk[:, 0]), ValueError, r"k must be 3-D \(total tokens, heads"),
    _case("varlen-v-tokens", lambda w: _varlen(w, v=w.pv[:11]),
          ValueError, r"k and v must have the same number of tokens, got 12 and 11"),
    _case("varlen-cu-empty", lambda w: _varlen(w, cu_seqlens_q=w.cu_q[:0], cu_seqlens_k=w.cu_k[:0]),
          ValueError, r"cu_seqlens_q must be non-decreasing prefix sums from 0 to total_q = 10"),
    _case("varlen-cu-2d", lambda w: _varlen(w, cu_seqlens_q=w.cu_q[None]),
          TypeError, r"cu_seqlens_q must be a 1-D int32 array, got 2-D"),
    _case("varlen-cu-not-from-0", lambda w: _varlen(w, cu_seqlens_q=w.cu_q + 1),
          ValueError, r"cu_seqlens_q must be non-decreasing prefix sums from 0"),
    _case("varlen-cu-k-total", lambda w: _varlen(w, cu_seqlens_k=numpy.array([0, 4, 8, 11], numpy.int32)),
          ValueError, r"cu_seqlens_k must be non-decreasing prefix sums from 0 to total_k = 12"),
    _case("varlen-seqused-negative", lambda w: _varlen(w, seqused_k=numpy.array([1, -1, 1], numpy.int32)),
          ValueError, r"seqused_k must be between 0 and each sequence's key count"),
    _case("varlen-seqused-length", lambda w: _varlen(w, seqused_k=numpy.array([1, 1], numpy.int32)),
          ValueError, r"seqused_k must have 3 entries, got 2"),
    _case("varlen-seqused-int64", lambda w: _varlen(w, seqused_k=numpy.array([1, 1, 1])),
          TypeError, r"seqused_k must be a 1-D int32 array"),
    _case("varlen-max-seqlen-k-short", lambda w: _varlen(w, max_seqlen_k=3),
          ValueError, r"max_seqlen_k = 3 is smaller than the longest sequence \(4\)"),
    _case("varlen-max-seqlen-float", lambda w: _varlen(w, max_seqlen_q=5.0),
          TypeError, r"max_seqlen_q must be an int or None, got float"),
    _case("varlen-max-seqlen-bool", lambda w: _varlen(w, max_seqlen_k=True),
          TypeError, r"max_seqlen_k must be an int or None, got bool"),
    _case("varlen-alibi-3d", lambda w: _varlen(w, alibi_slopes=numpy.ones((1, 3, 4))),
          ValueError, r"alibi_slopes must have shape \(Hq,\) or \(B, Hq\) = \(3, Hq\)"),
    _case("varlen-alibi-other-batch", lambda w: _varlen(w, alibi_slopes=numpy.ones((2, 4))),
          ValueError, r"alibi_slopes must have shape \(Hq,\) or \(B, Hq\) = \(3, Hq\).*got \(2, 4\)"),
    _case("varlen-k-dtype", lambda w: _varlen(w, k=w.pk.astype(numpy.float32)),
          TypeError, r"q, k and v must share one dtype"),
    _case("varlen-causal-window-right", lambda w: _varlen(w, causal=True, window=(2, 1), out=w.pout_buf),
          ValueError, r"window right must be 0 or -1 with causal"),
    _case("varlen-q-list", lambda w: _varlen(w, q=w.pq.tolist()),
          TypeError, r"q must be a numpy\.ndarray"),
    _case("varlen-out-dtype", lambda w: _varlen(w, out=w.pout_buf.astype(numpy.float32)),
          TypeError, r"out must have q's dtype float64"),
    _case("varlen-out-is-q",
          lambda w: cuflash.attention_varlen(w.same, w.same[:, :2], w.same[:, :2], w.cu_q, w.cu_q, out=w.same),
          ValueError, r"out must not share memory with q"),
    _case("varlen-out-read-only", lambda w: _varlen(w, out=w.read_only),
          ValueError, r"out must be writeable"),
    _case("varlen-return-lse-int", lambda w: _varlen(w, return_lse=1),
          TypeError, r"return_lse must be a bool"),
    _case("varlen-scale-with-no-sequence", lambda w: _empty_batch(w, scale="0.5"),
          TypeError, r"scale must be a real number"),
    # --- cuflash.attention_varlen_backward ---------------------------------------------------------
    _case("varlen-backward-lse-in-flash-attn-layout", lambda w: _varlen_backward(w, lse=_lse_flash_layout(w)),
          ValueError, r"lse must have shape \(4, 10\)"),
    _case("varlen-backward-lse-dtype", lambda w: _varlen_backward(w, lse=w.plse.astype(numpy.float32)),
          TypeError, r"lse must have dtype float64"),
    _case("varlen-backward-dout-dv", lambda w: _varlen_backward(w, dout=w.pdout[..., :5]),
          ValueError, r"dout must have (the forward output's )?shape \(10, 4, 6\)"),
    _case("varlen-backward-dout-None", lambda w: _varlen_backward(w, dout=None),
          TypeError, r"dout must be a numpy\.ndarray"),
    _case("varlen-backward-out-tokens", lambda w: _varlen_backward(w, out=w.pout[:9]),
          ValueError, r"out must have (the forward output's )?shape \(10, 4, 6\)"),
    _case("varlen-backward-deterministic-str", lambda w: _varlen_backward(w, deterministic="no"),
          TypeError, r"deterministic must be a bool"),
    # --- cuflash.torch ----------------------------------------------------------------------------
    _case("torch-mixed-dtypes", lambda w: ct.attention(w.tq, w.tk.float(), w.tv),
          TypeError, r"q, k and v must share one dtype, got q float64, k float32", needs="torch"),
    _case("torch-kv-heads", lambda w: ct.attention(w.tq, w.tk[:, :1].expand(1, 3, 4, 4), w.tv[:, :1].expand(1, 3, 4, 4)),
          ValueError, r"q's 2 heads are not a multiple of k/v's 3", needs="torch"),
    _case("torch-q-1d", lambda w: ct.attention(w.tq[0, 0, 0], w.tk, w.tv),
          ValueError, r"q must have at least 2 dimensions", needs="torch"),
    _case("torch-scale-tensor", lambda w: ct.attention(w.tq, w.tk, w.tv, scale=torch.tensor(0.5)),
          TypeError, r"scale must be a real number", needs="torch"),
    _case("torch-causal-tensor", lambda w: ct.attention(w.tq, w.tk, w.tv, causal=torch.tensor(True)),
          TypeError, r"causal must be a bool or 'bottom_right' / 'top_left', got Tensor", needs="torch"),
    _case("torch-return-lse-int", lambda w: ct.attention(w.tq, w.tk, w.tv, return_lse=1),
          TypeError, r"return_lse must be a bool", needs="torch"),
    _case("sdpa-is-causal-str", lambda w: ct.scaled_dot_product_attention(w.tq, w.tk, w.tv, is_causal="yes"),
          TypeError, r"is_causal.* must be bool", needs="torch"),
    _case("sdpa-enable-gqa-int", lambda w: ct.scaled_dot_product_attention(w.tq, w.tk, w.tv, enable_gqa=1),
          TypeError, r"enable_gqa.* must be bool", needs="torch"),
    _case("sdpa-query-numpy", lambda w: ct.scaled_dot_product_attention(w.tq.detach().numpy(), w.tk, w.tv),
          TypeError, r"query.* must be (a )?(torch\.)?Tensor", needs="torch"),
    _case("sdpa-scale-str", lambda w: ct.scaled_dot_product_attention(w.tq, w.tk, w.tv, scale="0.5"),
          TypeError, r"scale must be a real number", needs="torch"),
    _case("flash-window-size-int", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, window_size=5),
          TypeError, r"window_size must be a \(left, right\)", needs="torch"),
    _case("flash-window-size-None", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, window_size=None),
          TypeError, r"window_size must be a \(left, right\)", needs="torch"),
    _case("flash-window-size-three", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, window_size=(1, 2, 3)),
          ValueError, r"window_size must have (exactly )?two entries", needs="torch"),
    _case("flash-softmax-scale-str", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, softmax_scale="0.5"),
          TypeError, r"softmax_scale", needs="torch"),
    _case("flash-softmax-scale-nan", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, softmax_scale=float("nan")),
          ValueError, r"scale must be finite", needs="torch"),
    _case("flash-alibi-list", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, alibi_slopes=[0.1, 0.2]),
          TypeError, r"alibi_slopes must be a torch\.Tensor, got list", needs="torch"),
    _case("flash-q-numpy", lambda w: ct.flash_attn_func(w.tb.detach().numpy(), w.tb, w.tb),
          TypeError, r"q must be a torch\.Tensor, got ndarray", needs="torch"),
    _case("flash-softcap-negative", lambda w: ct.flash_attn_func(w.tb, w.tb, w.tb, softcap=-1.0),
          ValueError, r"softcap must be a finite number > 0", needs="torch"),
    _case("flash-varlen-cu-int64", lambda w: ct.flash_attn_varlen_func(w.tp, w.tp, w.tp, w.t_cu.long(), w.t_cu, 5, 5),
          TypeError, r"cu_seqlens_q must be a 1-D int32 array, got 1-D int64", needs="torch"),
    _case("flash-varlen-max-seqlen-None", lambda w: ct.flash_attn_varlen_func(w.tp, w.tp, w.tp, w.t_cu, w.t_cu, None, 5),
          TypeError, r"max_seqlen_q must be an int, got NoneType", needs="torch"),
    _case("flash-varlen-q-4d", lambda w: ct.flash_attn_varlen_func(w.tp[None], w.tp, w.tp, w.t_cu, w.t_cu, 5, 5),
          ValueError, r"q must be 3-D \(total tokens, heads, head dim\)", needs="torch"),
    _case("flash-varlen-cu-list", lambda w: ct.flash_attn_varlen_func(w.tp, w.tp, w.tp, [0, 5, 9], w.t_cu, 5, 5),
          TypeError, r"cu_seqlens_q must be a torch\.Tensor, got list", needs="torch"),
    _case("flash-varlen-window-size-int",
          lambda w: ct.flash_attn_varlen_func(w.tp, w.tp, w.tp, w.t_cu, w.t_cu, 5, 5, window_size=3),
          TypeError, r"window_size must be a \(left, right\)", needs="torch"),
    # --- cuflash.jax ------------------------------------------------------------------------------
    _case("jax-q-numpy", lambda w: cj.attention(numpy.asarray(w.jq), w.jk, w.jv),
          TypeError, r"q must be a jax\.Array", needs="jax"),
    _case("jax-v-numpy", lambda w: cj.attention(w.jq, w.jk, numpy.asarray(w.jv)),
          TypeError, r"v must be a jax\.Array", needs="jax"),
    _case("jax-int-dtype", lambda w: cj.attention(*(x.astype(jnp.int32) for x in (w.jq, w.jk, w.jv))),
          TypeError, r"q must have dtype float16, bfloat16, float32 or float64, got int32", needs="jax"),
    _case("jax-kv-heads", lambda w: cj.attention(w.jq, w.jk[:, :3], w.jv[:, :3]),
          ValueError, r"q's 4 heads are not a multiple of k/v's 3", needs="jax"),
    _case("jax-scale-array", lambda w: cj.attention(w.jq, w.jk, w.jv, scale=jnp.float32(0.5)),
          TypeError, r"scale must be a real number", needs="jax"),
    _case("jax-sinks-numpy", lambda w: cj.attention(w.jq, w.jk, w.jv, sinks=numpy.zeros(4, numpy.float32)),
          TypeError, r"sinks must be a jax\.Array", needs="jax"),
    _case("jax-deterministic-str", lambda w: cj.attention(w.jq, w.jk, w.jv, deterministic="yes"),
          TypeError, r"deterministic must be a bool", needs="jax"),
    _case("jax-return-lse-int", lambda w: cj.attention(w.jq, w.jk, w.jv, return_lse=1),
          TypeError, r"return_lse must be a bool", needs="jax"),
]


def assert_refused(world, call, error, match):
    """``call(world)`` raises ``error`` matching ``match``, and everything in ``world`` is as it was."""
    before = world.snapshot()
    with pytest.raises(error, match=match):
        call(world)
    world.assert_unchanged(before)


@pytest.mark.parametrize("call, error, match", CASES)
def test_misuse_is_refused_naming_the_argument_and_touching_nothing(rng, call, error, match):
    assert_refused(World(rng), call, error, match)


def test_the_catalogue_has_forty_distinct_cases():
    names = [case.id for case in CASES]
    assert len(set(names)) == len(names) >= 40


# --- int-like arguments are ints ---------------------------------------------------------------------

INT_LIKES = {
    "numpy-int64": lambda n: numpy.int64(n),
    "numpy-int32": lambda n: numpy.int32(n),
    "numpy-uint16": lambda n: numpy.uint16(n) if n >= 0 else numpy.int16(n),
    "0d-numpy": lambda n: numpy.array(n),
    "0d-torch-int64": lambda n: torch.tensor(n),
    "0d-torch-int32": lambda n: torch.tensor(n, dtype=torch.int32),
}


def _int_like(kind, n):
    if kind.startswith("0d-torch") and torch is None:
        pytest.skip("needs torch")
    return INT_LIKES[kind](n)


@pytest.mark.parametrize("kind", list(INT_LIKES))
def test_int_like_window_entries_are_accepted(rng, kind):
    q, k, v = (rng.standard_normal((2, 9, 8)).astype(numpy.float32) for _ in range(3))
    expected = cuflash.attention(q, k, v, causal=True, window=(3, -1))
    window = (_int_like(kind, 3), _int_like(kind, -1) if not kind.startswith("numpy-uint") else -1)
    numpy.testing.assert_array_equal(cuflash.attention(q, k, v, causal=True, window=window), expected)
    out, lse = cuflash.attention(q, k, v, causal=True, window=(3, -1), return_lse=True)
    grads = cuflash.attention_backward(out, q, k, v, out, lse, causal=True, window=window)
    for got, want in zip(grads, cuflash.attention_backward(out, q, k, v, out, lse, causal=True, window=(3, -1))):
        numpy.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", list(INT_LIKES))
def test_int_like_max_seqlen_and_windows_are_accepted_by_varlen(rng, kind):
    q, k, v = (rng.standard_normal((10, 2, 8)) for _ in range(3))
    cu = numpy.array([0, 5, 9, 10], numpy.int32)
    expected = cuflash.attention_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_k=5, window=(2, 0))
    got = cuflash.attention_varlen(q, k, v, cu, cu, max_seqlen_q=_int_like(kind, 5), max_seqlen_k=_int_like(kind, 7),
                                   window=(_int_like(kind, 2), _int_like(kind, 0)))
    numpy.testing.assert_array_equal(got, expected)


def test_numpy_bools_are_bools_for_the_core_api(rng):
    q, k, v = (rng.standard_normal((2, 7, 8)) for _ in range(3))
    out, lse = cuflash.attention(q, k, v, causal=numpy.bool_(True), return_lse=numpy.bool_(True))
    grads = cuflash.attention_backward(out, q, k, v, out, lse, causal=True, deterministic=numpy.bool_(True))
    _, vjp = cuflash.attention_vjp(q, k, v, causal=True, deterministic=numpy.bool_(False))
    for got, want in zip(vjp(out), grads):
        numpy.testing.assert_array_equal(got, want)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("kind", list(INT_LIKES))
def test_int_like_arguments_of_the_torch_adapter(rng, kind):
    q = torch.from_numpy(rng.standard_normal((1, 2, 9, 8))).requires_grad_()
    expected = ct.attention(q, q, q, causal=True, window=(3, 0))
    got = ct.attention(q, q, q, causal=True, window=(_int_like(kind, 3), _int_like(kind, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    packed = q.detach()[0].transpose(0, 1).contiguous()  # (9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    want = ct.flash_attn_varlen_func(packed, packed, packed, cu, cu, 5, 5, causal=True, window_size=(2, 0))
    got = ct.flash_attn_varlen_func(packed, packed, packed, cu, cu, _int_like(kind, 5), _int_like(kind, 5),
                                    causal=True, window_size=(_int_like(kind, 2), _int_like(kind, 0)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_numpy_bool_deterministic_in_the_torch_adapter(rng):
    q = torch.from_numpy(rng.standard_normal((1, 2, 5, 4))).requires_grad_()
    ct.attention(q, q, q, deterministic=numpy.bool_(True)).sum().backward()
    assert q.grad is not None


@pytest.mark.skipif(jax is None, reason="needs JAX")
@pytest.mark.parametrize("kind", ["numpy-int64", "0d-numpy", "0d-jax"])
def test_int_like_window_entries_in_the_jax_adapter(rng, kind):
    q = jnp.asarray(rng.standard_normal((2, 9, 8)).astype(numpy.float32))
    expected = cj.attention(q, q, q, causal=True, window=(3, 0))
    make = (lambda n: jnp.array(n)) if kind == "0d-jax" else INT_LIKES[kind]
    got = cj.attention(q, q, q, causal=True, window=(make(3), make(0)))
    numpy.testing.assert_array_equal(numpy.asarray(got), numpy.asarray(expected))


# --- checks that only the GPU path has ------------------------------------------------------------------


class GpuWorld:
    """CuPy arrays of the dense call (and a packed one), a CuPy out= buffer, the forward's results."""

    def __init__(self, rng):
        import cupy

        self.cupy = cupy
        self.host = World(rng)
        for name in ("q", "k", "v", "out_buf", "dout", "out", "lse", "sinks", "pq", "pk", "pv", "cu_q", "cu_k"):
            setattr(self, name, cupy.asarray(getattr(self.host, name)))
        self.out, self.lse = cuflash.attention(self.q, self.k, self.v, return_lse=True)
        self.same = cupy.asarray(self.host.q[..., :6])  # (2, 3, 10, 6): out's shape, usable as v (Lk = 10, Dv = 6)

    def snapshot(self):
        shot = {name: self.cupy.asnumpy(x).tobytes() for name, x in vars(self).items()
                if isinstance(x, self.cupy.ndarray)}
        return shot, self.host.snapshot()

    def assert_unchanged(self, shots):
        shot, host = shots
        for name, x in vars(self).items():
            if isinstance(x, self.cupy.ndarray):
                assert self.cupy.asnumpy(x).tobytes() == shot[name], f"{name} was modified"
        self.host.assert_unchanged(host)


def _two_devices():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")


def _on_device_1(x):
    import cupy

    with cupy.cuda.Device(1):
        return cupy.asarray(cupy.asnumpy(x))


GPU_CASES = [
    pytest.param(lambda g: cuflash.attention(g.q, g.host.k, g.host.v, out=g.out_buf),
                 TypeError, r"arrays must all be NumPy \(CPU\) or all CuPy \(GPU\): q is a cupy\.ndarray, k is a "
                 r"numpy\.ndarray", id="mixed-kinds"),
    pytest.param(lambda g: cuflash.attention(g.q, g.k, g.v, out=g.host.out_buf),
                 TypeError, r"out must be a cupy\.ndarray like q", id="numpy-out-for-gpu-inputs"),
    pytest.param(lambda g: cuflash.attention(g.q, g.k, g.v, out=g.out_buf.astype("float64")),
                 TypeError, r"out must have q's dtype float32, got float64", id="gpu-out-dtype"),
    pytest.param(lambda g: cuflash.attention(g.q[..., :6], g.k[..., :10, :6], g.same, out=g.same),
                 ValueError, r"out must not share memory with v", id="gpu-out-is-v"),
    pytest.param(lambda g: cuflash.attention(g.q, g.k, g.v, sinks=g.host.sinks),
                 TypeError, r"sinks must be a CuPy \(GPU\) array like q, got a numpy array", id="numpy-sinks"),
    pytest.param(lambda g: cuflash.attention_backward(g.dout, g.q, g.k, g.v, g.out, g.host.lse),
                 TypeError, r"arrays must all be NumPy \(CPU\) or all CuPy \(GPU\).*lse is a numpy\.ndarray",
                 id="backward-numpy-lse"),
    pytest.param(lambda g: cuflash.attention_backward(g.dout, g.q, g.k, g.v, g.out, g.lse.astype("float64")),
                 TypeError, r"lse must have dtype float32", id="backward-gpu-lse-dtype"),
    pytest.param(lambda g: cuflash.attention_varlen(g.pq, g.pk, g.pv, g.host.cu_q, g.cu_k),
                 TypeError, r"cu_seqlens_q must be a cupy\.ndarray like q", id="varlen-numpy-cu-seqlens"),
    pytest.param(lambda g: (_two_devices(), cuflash.attention(g.q, _on_device_1(g.k), g.v)),
                 ValueError, r"arrays must all be on one CUDA device", id="inputs-on-two-devices"),
    pytest.param(lambda g: (_two_devices(), cuflash.attention(g.q, g.k, g.v, out=_on_device_1(g.out_buf))),
                 ValueError, r"out must be on q's device 0, got device 1", id="out-on-another-device"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("call, error, match", GPU_CASES)
def test_gpu_misuse_is_refused_naming_the_argument_and_touching_nothing(rng, call, error, match):
    assert_refused(GpuWorld(rng), call, error, match)


@pytest.mark.gpu
@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_tensors_on_cpu_and_cuda_together_are_refused(rng):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    q = torch.from_numpy(rng.standard_normal((1, 2, 8, 16))).float()
    before = q.clone()
    with pytest.raises(TypeError, match=r"arrays must all be NumPy \(CPU\) or all CuPy \(GPU\)"):
        ct.attention(q.cuda(), q, q)
    assert torch.equal(q, before)
