"""JAX adapter: cuflash on JAX arrays, through DLPack, eagerly.

``attention(q, k, v, **options)`` takes JAX arrays, hands them to :func:`cuflash.attention`
(``attention_varlen``, flash-attn's packed sequences: to :func:`cuflash.attention_varlen`)
without a copy (GPU: ``cupy.from_dlpack``; CPU: ``numpy.asarray``, which keeps bfloat16) and
returns JAX arrays on the same device (GPU: ``jax.dlpack.from_dlpack``). It is differentiable
with ``jax.grad`` / ``jax.vjp`` through a ``jax.custom_vjp`` whose backward is
:func:`cuflash.attention_backward` on the saved q, k, v, out and lse.

Under ``jax.jit`` (and ``vmap``, ``scan``, ``grad`` of a jitted function) :func:`attention`
is an XLA custom call (``cuflash._xla``: JAX's FFI, answered by Python through ctypes, so
nothing is built): the arguments are checked when the function is traced (from their shapes
and dtypes, so misuse is still a TypeError/ValueError naming the argument), and each execution
runs cuflash on XLA's own buffers, forward and backward: on a GPU its kernels on XLA's stream
(no copy to the host; the gradients are copied once into XLA's result buffers), on the CPU the
NumPy backend. Under ``vmap`` one call serves the whole batch (its axis lined up with cuflash's
broadcast leading axes; shared operands are broadcast, never copied, their gradients summed
once). A JAX whose FFI cannot take the target falls back to ``jax.pure_callback`` into the
NumPy backend (host copies). Attention dropout takes a JAX PRNG key as its seed
(``_dropout_seed``): the keep mask is then the same eagerly and under ``jit``, and a traced key
draws a new one per execution. :func:`attention_varlen` runs under a trace too when given
``max_seqlen_q`` and ``max_seqlen_k`` as ints (they size the grid; its traced lengths are read
when run on the CPU, trusted on a GPU); ``vmap`` runs it item by item.
"""
from __future__ import annotations

import contextlib
import importlib.util

try:
    import jax
    import jax.dlpack
except ImportError as error:  # pragma: no cover - exercised only where jax is missing
    raise ImportError("cuflash.jax needs JAX: pip install jax (jax[cuda12] or jax[cuda13] for GPUs)") from error

import numpy

from . import _api, _varlen, _xla

__all__ = ["attention", "attention_varlen"]

# CuPy's import (and cuflash's GPU modules) on a thread while the program goes on, where JAX has a
# CUDA plugin and CuPy is installed (kernels.import_ahead): a GPU program's first call would
# otherwise pay it inside its first step.
if any(importlib.util.find_spec(name) is not None for name in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
    from ._gpu import kernels as _kernels

    _kernels.import_ahead()


def attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
              bias=None, mask=None, deterministic=False, return_lse=False, precision=None, dropout_p=0.0,
              dropout_seed=None):
    """:func:`cuflash.attention` on JAX arrays; returns JAX arrays on the inputs' device.

    Differentiable in q, k, v, ``sinks`` and ``bias`` (``jax.grad``, ``jax.vjp``; dbias is the
    backend's deterministic reduction over bias's broadcast axes), outside ``jax.jit`` only.
    ``softcap``, ``alibi_slopes``, ``sinks``, ``bias`` and ``mask`` as :func:`cuflash.attention`
    (JAX arrays for the arrays; the boolean mask carries no gradient). ``deterministic`` applies
    to the backward, ``precision`` to both (as :func:`cuflash.attention`'s). With ``return_lse=True``
    it returns ``(out, lse)`` and is not differentiable (use it for inference).

    ``dropout_p`` (a Python float in [0, 1)) drops attention probabilities as
    :func:`cuflash.attention` does; ``dropout_seed`` is a JAX PRNG key (``jax.random.key`` or
    ``jax.random.PRNGKey``: the 64-bit seed is ``jax.random.bits(key, (2,), uint32)``, high word
    first) or an int in [0, 2^64). The backward drops what the forward dropped. Under ``jit`` a
    traced key gives each execution its own mask (split the key per step, as for any JAX
    randomness; its two words are read on the host, one small device-to-host copy per call on a
    GPU); an int seed is a constant of the trace (the same mask every execution). Under ``vmap``
    a dropping call runs item by item, so each item drops what it would alone.
    """
    for name, flag in (("deterministic", deterministic), ("return_lse", return_lse)):
        if not isinstance(flag, (bool, numpy.bool_)):  # checked now, not when jax.grad runs the backward
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    deterministic = bool(deterministic)
    seed, seed_words = _dropout_seed(dropout_p, dropout_seed)
    if any(isinstance(x, jax.core.Tracer) for x in (q, k, v, sinks, bias, mask, alibi_slopes, seed_words)):
        scalars = dict(scale=scale, causal=causal, window=window, softcap=softcap, precision=precision,
                       dropout_p=dropout_p, dropout_seed=seed)
        operands = (q, k, v, sinks, bias, alibi_slopes, mask, seed_words)
        shapes = _traced_results(operands, scalars)  # the arguments checked now, as eagerly
        if return_lse:
            return _traced_forward(operands, scalars, shapes)
        return _traced_differentiable(scalars, deterministic, shapes)(*operands)
    options = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, mask=mask,
                   precision=precision, dropout_p=dropout_p, dropout_seed=_seed_of(seed, seed_words))
    if return_lse:
        return _forward(q, k, v, sinks, options, bias)
    return _differentiable(options, deterministic)(q, k, v, sinks, bias)


# --- under a trace: an XLA custom call into cuflash (_xla), else a pure_callback -----------------

_OPERANDS = ("q", "k", "v", "sinks", "bias", "alibi_slopes", "mask", "dropout_seed")
# Each operand's trailing axes that are not leading axes: (L, D) of q, k, v; (Lq, Lk) of bias and
# mask; none of sinks and slopes, which are (..., Hq); the seed's two words. (lse's: (Lq,).)
_CORES = (2, 2, 2, 0, 2, 0, 2, 1)


# --- attention dropout's seed: an int, or a JAX PRNG key ------------------------------------------

def _dropout_seed(dropout_p, dropout_seed):
    """``(seed, words)``: an int-like seed as given (cuflash checks it) and None, or for a JAX PRNG
    key None and its uint32[2] seed words (a JAX array, traced under a trace). ``dropout_p`` must
    be concrete: the rate decides which kernels run."""
    if isinstance(dropout_p, jax.core.Tracer):
        raise TypeError("dropout_p must be a Python float in [0, 1), got a JAX tracer (the rate chooses the kernels: "
                        "pass it as a static value, not a traced one)")
    if not isinstance(dropout_seed, jax.Array):
        return dropout_seed, None
    dtype = dropout_seed.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (dtype == numpy.uint32 and dropout_seed.ndim == 1):
        try:
            return None, jax.random.bits(dropout_seed, (2,), numpy.uint32)
        except (TypeError, ValueError) as error:
            raise TypeError(f"dropout_seed must be one JAX PRNG key or an int in [0, 2^64), got an array of dtype "
                            f"{dtype} and shape {dropout_seed.shape} ({error})") from None
    if isinstance(dropout_seed, jax.core.Tracer):
        raise TypeError(f"dropout_seed under jax.jit, vmap or grad must be a JAX PRNG key (jax.random.key) or a "
                        f"Python int, got a traced array of dtype {dtype} and shape {dropout_seed.shape}")
    return numpy.asarray(dropout_seed), None  # a concrete 0-d integer array: cuflash checks it


def _seed_of(seed, words):
    """The dropout seed as cuflash takes it: ``seed``, or the int of a key's two words (an array
    of JAX, NumPy or CuPy: read on the host)."""
    if words is None:
        return seed
    high, low = words.tolist()
    return high << 32 | low


def _with_seed(arrays, scalars):
    """A traced call's keywords: its named operands with the seed's words (if any) as its int."""
    words = arrays.pop("dropout_seed", None)
    if words is None:
        return dict(arrays, **scalars)
    return {**arrays, **scalars, "dropout_seed": _seed_of(None, words)}


def _vmap_method(scalars):
    """A dropping call runs item by item under vmap: its keep mask is indexed by each item's own
    (batch, head) rows, so one call over the batch would drop other elements than the items alone."""
    return "sequential" if scalars.get("dropout_p") else "expand_dims"


def _stand_in(x):
    """A NumPy array of x's shape and dtype that holds no memory (every stride 0), or None."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return x  # not an array: cuflash's own check names it
    return numpy.broadcast_to(numpy.zeros((), dtype=numpy.dtype(x.dtype)), tuple(x.shape))


def _traced_results(operands, scalars):
    """The shapes and dtypes of (out, lse), from cuflash's forward problem for the operands'
    shapes and dtypes: the argument checks of an eager call, made once, when traced."""
    from . import _spec

    q, k, v, sinks, bias, slopes, mask, words = (_stand_in(x) for x in operands)
    scalars = dict(scalars, dropout_seed=0) if words is not None else scalars  # (a key's seed: any value will do)
    problem = _spec.resolve_forward(q, k, v, sinks=sinks, bias=bias, alibi_slopes=slopes, mask=mask, **scalars)
    return (jax.ShapeDtypeStruct(problem.out_shape, problem.dtype),
            jax.ShapeDtypeStruct(problem.lse_shape, problem.lse_dtype))


def _traced_call(key, function, shapes, operands, cores, result_cores, vmap_method):
    """``function(*operands, results=...)`` under a trace, returning arrays of ``shapes``.

    Where this JAX takes cuflash's custom call (``_xla``), XLA runs it on the operands' own
    buffers: on a GPU ``function`` gets CuPy arrays on XLA's stream (cuflash's kernels, no host
    copy), on the CPU NumPy arrays; ``results`` are the result buffers, which it may fill itself
    or return arrays to be copied in (the forwards do: a call with out= would not replay its plan). Elsewhere a pure_callback hands it
    NumPy arrays on the host. ``key``: the call's configuration (one custom-call id per key).

    Under ``vmap`` the call is made once for the whole batch (``vmap_method`` "expand_dims": the
    unbatched operands get a leading axis of 1, which cuflash broadcasts, never copied); ``cores``
    / ``result_cores``: each array's trailing axes that are not leading (batch and head) axes, so
    that the batch axis is lined up across arrays of different ranks (``_line_up``) as cuflash
    broadcasts leading axes. JAX takes every result as batched: a gradient cuflash summed over the
    batch (an unbatched operand's) goes to item 0, the other items' zero (JAX then sums them)."""
    present = tuple(i for i, x in enumerate(operands) if x is not None)
    ranks = tuple(operands[i].ndim for i in present) + tuple(len(s.shape) for s in shapes)
    cores = tuple(cores[i] for i in present) + tuple(result_cores)

    def place(values):
        full = [None] * len(operands)
        for i, value in zip(present, values):
            full[i] = value
        return full

    if _xla.available(jax):
        def make_callback():
            def callback(arrays, results, xp):
                lined = _line_up(list(arrays) + list(results), ranks, cores)
                arrays, results = lined[:len(arrays)], lined[len(arrays):]
                for target, value in zip(results, function(*place(arrays), results=results)):
                    _copy_into(xp, target, value)
            return callback

        return _xla.call(jax, (key, present, shapes, ranks), make_callback, shapes, *(operands[i] for i in present),
                         vmap_method=vmap_method)

    def on_host(*values):
        if values[0].ndim == ranks[0]:
            return tuple(numpy.asarray(r) for r in function(*place(values), results=None))
        results = [numpy.empty((values[0].shape[0],) + s.shape, s.dtype) for s in shapes]
        lined = _line_up(list(values) + results, ranks, cores)
        for target, value in zip(lined[len(values):], function(*place(lined[:len(values)]), results=None)):
            _copy_into(numpy, target, numpy.asarray(value))
        return tuple(results)

    return tuple(jax.pure_callback(on_host, shapes, *(operands[i] for i in present), vmap_method=vmap_method))


def _line_up(arrays, ranks, cores):
    """``arrays`` as traced (``ranks``), or under vmap (each one leading batch axis longer) with
    singleton axes after the batch axis so that every array's leading axes (its rank minus its
    ``cores`` trailing axes) end at the same place: right-aligned leading axes then broadcast
    the batch axis with the batch axis."""
    if not arrays or arrays[0].ndim == ranks[0]:
        return arrays
    leads = [rank - core for rank, core in zip(ranks, cores)]
    most = max(leads)
    return [a.reshape(a.shape[:1] + (1,) * (most - lead) + a.shape[1:]) for a, lead in zip(arrays, leads)]


def _copy_into(xp, target, value):
    """target[...] = value (same dtype; a device copy on the current stream for CuPy), nothing
    when value is target's memory (a result written in place). A value of one item for a
    target of a batch (a gradient summed over it, _traced_call) fills item 0, the rest 0."""
    if _address(xp, value) == _address(xp, target) and value.strides == target.strides:
        return
    if value.shape != target.shape:
        _copy_into(xp, target[:1], value)
        if xp is numpy:
            target[1:] = 0
        else:  # (a contiguous buffer's items 1..: one memset, whatever the dtype)
            xp.cuda.runtime.memsetAsync(target[1:].data.ptr, 0, target[1:].nbytes, xp.cuda.get_current_stream().ptr)
        return
    if xp is numpy or not value.flags.c_contiguous:
        target[...] = value
        return
    xp.cuda.runtime.memcpyAsync(target.data.ptr, value.data.ptr, value.nbytes, xp.cuda.runtime.memcpyDeviceToDevice,
                                xp.cuda.get_current_stream().ptr)


def _address(xp, array) -> int:
    return array.ctypes.data if xp is numpy else array.data.ptr


def _named(values):
    """The traced call's operands by cuflash's keyword names (None stays None)."""
    return dict(zip(_OPERANDS, values))


def _traced_forward(operands, scalars, shapes):
    """(out, lse) of cuflash on the traced operands (``shapes``: _traced_results')."""

    def forward(*values, results):
        # No out=: a call without one replays its plan (no validation or planning per execution,
        # the host cost that dominated a jitted forward); out is then copied into XLA's buffer
        # (one device copy, microseconds).
        arrays = _named(values)
        return _api.attention(arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), return_lse=True,
                              **_with_seed(arrays, scalars))

    key = ("forward", repr(sorted(scalars.items())))
    return _traced_call(key, forward, shapes, operands, _CORES, (2, 1), _vmap_method(scalars))


def _traced_vjp(forward, backward):
    """A custom_vjp function of a traced call's operands: the primal ``forward(operands)[0]`` (of
    (out, lse)), the cotangents ``backward(operands, out, lse, dout)``."""

    @jax.custom_vjp
    def attend(*operands):
        return forward(operands)[0]

    def attend_forward(*operands):
        out, lse = forward(operands)
        return out, (operands, out, lse)

    def attend_backward(saved, dout):
        return backward(*saved, dout)

    attend.defvjp(attend_forward, attend_backward)
    return attend


def _traced_differentiable(scalars, deterministic, shapes):
    """attention under a trace as a custom_vjp of (q, k, v, sinks, bias, alibi_slopes, mask,
    dropout seed words), both directions traced calls (_traced_call); the slopes, the mask and the
    seed carry no cotangent."""

    def backward_call(operands, out, lse, dout):
        q, k, v, sinks, bias = operands[:5]
        wanted = [q, k, v] + [x for x in (bias, sinks) if x is not None]  # cuflash's order (_cotangents)
        grad_shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in wanted)

        def backward(dout, out, lse, *values, results):
            arrays = _named(values)
            q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
            return _api.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                           **_with_seed(arrays, scalars))

        key = ("backward", repr(sorted(scalars.items())), deterministic)
        result_cores = (2, 2, 2) + tuple(core for x, core in ((bias, 2), (sinks, 0)) if x is not None)
        grads = _traced_call(key, backward, grad_shapes, (dout, out, lse) + tuple(operands), (2, 2, 1) + _CORES,
                             result_cores, _vmap_method(scalars))
        return _cotangents(grads, sinks, bias) + (None, None, None)

    return _traced_vjp(lambda operands: _traced_forward(operands, scalars, shapes), backward_call)


def _differentiable(options, deterministic):
    """A custom_vjp function of (q, k, v, sinks, bias) for one set of options (cheap: built per
    call); sinks and bias may be None (an empty pytree: no cotangent)."""

    @jax.custom_vjp
    def attend(q, k, v, sinks, bias):
        return _forward(q, k, v, sinks, options, bias)[0]

    def attend_forward(q, k, v, sinks, bias):
        out, lse = _forward(q, k, v, sinks, options, bias)
        return out, (q, k, v, sinks, bias, out, lse)

    def attend_backward(saved, dout):
        q, k, v, sinks, bias, out, lse = saved
        device = _device_of(q)
        arrays = [_to_cuflash(x, f"saved {name}") for name, x in zip("qkv", (q, k, v))]
        # JAX may hand the cotangent over on its default device (a GPU) for CPU inputs.
        dout = jax.device_put(dout, device)
        arrays += [_to_cuflash(dout, "dout"), _to_cuflash(out, "out"), _to_cuflash(lse, "lse")]
        q_, k_, v_, dout_, out_, lse_ = arrays
        with _cupy_device(device):
            grads = _api.attention_backward(dout_, q_, k_, v_, out_, lse_, deterministic=deterministic,
                                            **_cuflash_options(options, sinks, bias))
        return _cotangents([_to_jax(g, device) for g in grads], sinks, bias)

    attend.defvjp(attend_forward, attend_backward)
    return attend


def _cotangents(grads, sinks, bias):
    """cuflash's gradients (dq, dk, dv, then dbias with a bias, then dsinks with sinks) as the
    custom_vjp's cotangents of (q, k, v, sinks, bias)."""
    grads = list(grads)
    dbias = grads.pop(3) if bias is not None else None
    dsinks = grads.pop(3) if sinks is not None else None
    return tuple(grads[:3]) + (dsinks, dbias)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, seqused_k=None,
                     scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                     deterministic=False, return_lse=False, precision=None, dropout_p=0.0, dropout_seed=None):
    """:func:`cuflash.attention_varlen` on JAX arrays (flash-attn's packed layout); returns JAX
    arrays on the inputs' device.

    q ``(total_q, Hq, D)``, k ``(total_k, Hk, D)``, v ``(total_k, Hk, Dv)``, ``cu_seqlens_*`` int32
    ``(B + 1,)`` and ``seqused_k`` int32 ``(B,)`` JAX arrays on q's device; the options as
    :func:`cuflash.attention_varlen` (``alibi_slopes`` ``(Hq,)`` or ``(B, Hq)``, ``sinks`` JAX
    arrays). Differentiable in q, k, v and ``sinks`` (``jax.grad``, ``jax.vjp``) through a
    ``jax.custom_vjp`` whose backward is :func:`cuflash.attention_varlen_backward`; the lengths
    carry no gradient. Under ``jax.jit`` (``vmap``, ``scan``: each item a call) the lengths may
    be traced and ``max_seqlen_q`` / ``max_seqlen_k`` must be ints (they size the grid; on a GPU
    the lengths are then trusted, not read, as flash-attn trusts them). With ``return_lse=True`` it returns ``(out,
    lse)`` (lse ``(Hq, total_q)``) and is not differentiable (use it for inference). ``dropout_p`` and
    ``dropout_seed`` (a JAX PRNG key or an int) as :func:`attention`'s; a sequence drops what it
    drops padded alone in a batch (cuflash.attention_varlen's rule); a traced key needs the hints.
    """
    for name, flag in (("deterministic", deterministic), ("return_lse", return_lse)):
        if not isinstance(flag, (bool, numpy.bool_)):  # checked now, not when jax.grad runs the backward
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    # Traced lengths need the traced call; so do traced arrays under a jit (the hints then given).
    # Without hints, arrays traced by an eager jax.grad / jax.vjp take the eager path below.
    hinted = type(max_seqlen_q) is int and type(max_seqlen_k) is int
    seed, seed_words = _dropout_seed(dropout_p, dropout_seed)
    if (any(isinstance(x, jax.core.Tracer) for x in (cu_seqlens_q, cu_seqlens_k, seqused_k))
            or (hinted and any(isinstance(x, jax.core.Tracer) for x in (q, k, v, sinks, alibi_slopes, seed_words)))):
        scalars = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale, causal=causal,
                       window=window, softcap=softcap, precision=precision, dropout_p=dropout_p, dropout_seed=seed)
        operands = (q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, seed_words)
        shapes = _traced_varlen_results(operands, scalars)
        if return_lse:
            return _traced_varlen_forward(operands, scalars, shapes)
        return _traced_differentiable_varlen(scalars, bool(deterministic), shapes)(*operands)
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("seqused_k", seqused_k),
                    ("dropout_seed", seed_words)):
        if x is not None or name in ("cu_seqlens_q", "cu_seqlens_k"):
            _check_concrete(x, name)
    options = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale, causal=causal, window=window,
                   softcap=softcap, alibi_slopes=alibi_slopes, precision=precision, dropout_p=dropout_p,
                   dropout_seed=_seed_of(seed, seed_words))
    lengths = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k)
    if return_lse:
        return _varlen_forward(q, k, v, sinks, lengths, options)
    return _differentiable_varlen(lengths, options, bool(deterministic))(q, k, v, sinks)


# Under a trace: the packed call as a traced call (_traced_call), on the operands (q, k, v, sinks,
# cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout seed words). Both hints must be ints: they size the
# grid, and the lengths are not known when traced (nor read when run on a GPU).
_VARLEN_OPERANDS = ("q", "k", "v", "sinks", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "alibi_slopes",
                    "dropout_seed")


def _traced_varlen_results(operands, scalars):
    """(out, lse) shapes and dtypes of a traced packed call, checked as an eager GPU call with both
    hints checks its arguments (nothing is read)."""
    for name in ("max_seqlen_q", "max_seqlen_k"):
        if type(scalars[name]) is not int:
            raise TypeError(f"{name} must be an int under jax.jit, vmap and scan (it sizes the grid and the "
                            f"sequence lengths are traced), got {type(scalars[name]).__name__}")
    arrays = dict(zip(_VARLEN_OPERANDS, (_stand_in(x) for x in operands)))
    if arrays.pop("dropout_seed") is not None:
        scalars = dict(scalars, dropout_seed=0)  # (a key's seed: any value will do)
    (out_shape, dtype), (lse_shape, lse_dtype) = _varlen.traced_results(
        arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), arrays.pop("cu_seqlens_q"), arrays.pop("cu_seqlens_k"),
        **arrays, **scalars)
    return jax.ShapeDtypeStruct(out_shape, dtype), jax.ShapeDtypeStruct(lse_shape, lse_dtype)


def _traced_varlen_forward(operands, scalars, shapes):
    def forward(*values, results):  # (no out=: as _traced_forward's, so that the plan replays)
        arrays = dict(zip(_VARLEN_OPERANDS, values))
        return _varlen.attention_varlen(arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), arrays.pop("cu_seqlens_q"),
                                        arrays.pop("cu_seqlens_k"), return_lse=True, **_with_seed(arrays, scalars))

    key = ("varlen forward", repr(sorted(scalars.items())))
    return _traced_call(key, forward, shapes, operands, (0,) * len(operands), (0, 0), "sequential")


def _traced_differentiable_varlen(scalars, deterministic, shapes):
    """attention_varlen under a trace as a custom_vjp of its operands (_VARLEN_OPERANDS): q, k, v
    and sinks get cotangents, the lengths, slopes and seed none."""

    def backward_call(operands, out, lse, dout):
        sinks = operands[3]
        wanted = [x for x in operands[:4] if x is not None]
        grad_shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in wanted)

        def backward(dout, out, lse, *values, results):
            arrays = dict(zip(_VARLEN_OPERANDS, values))
            return _varlen.attention_varlen_backward(
                dout, arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), out, lse, arrays.pop("cu_seqlens_q"),
                arrays.pop("cu_seqlens_k"), deterministic=deterministic, **_with_seed(arrays, scalars))

        key = ("varlen backward", repr(sorted(scalars.items())), deterministic)
        grads = _traced_call(key, backward, grad_shapes, (dout, out, lse) + tuple(operands),
                             (0,) * (3 + len(operands)), (0,) * len(grad_shapes), "sequential")
        return tuple(grads[:3]) + ((grads[3],) if sinks is not None else (None,)) + (None,) * 5

    return _traced_vjp(lambda operands: _traced_varlen_forward(operands, scalars, shapes), backward_call)


def _differentiable_varlen(lengths, options, deterministic):
    """attention_varlen as a custom_vjp function of (q, k, v, sinks); the lengths (integer arrays,
    no cotangent) and options are closed over, as the dense one closes over its options."""

    @jax.custom_vjp
    def attend(q, k, v, sinks):
        return _varlen_forward(q, k, v, sinks, lengths, options)[0]

    def attend_forward(q, k, v, sinks):
        out, lse = _varlen_forward(q, k, v, sinks, lengths, options)
        return out, (q, k, v, sinks, out, lse)

    def attend_backward(saved, dout):
        q, k, v, sinks, out, lse = saved
        device = _device_of(q)
        dout = jax.device_put(dout, device)  # JAX may hand it over on its default device
        arrays = [_to_cuflash(x, name) for name, x in (("dout", dout), ("saved q", q), ("saved k", k),
                                                       ("saved v", v), ("out", out), ("lse", lse))]
        with _cupy_device(device):
            grads = _varlen.attention_varlen_backward(*arrays, deterministic=deterministic,
                                                      **_varlen_arguments(lengths, options, sinks))
        grads = tuple(_to_jax(g, device) for g in grads)
        return grads if sinks is not None else grads + (None,)

    attend.defvjp(attend_forward, attend_backward)
    return attend


def _varlen_arguments(lengths, options, sinks):
    """The lengths and options of a varlen call as cuflash's keywords, arrays as cuflash arrays."""
    arguments = _cuflash_options(options, sinks)
    for name, value in lengths.items():
        arguments[name] = None if value is None else _to_cuflash(value, name)
    return arguments


def _varlen_forward(q, k, v, sinks, lengths, options):
    device = _device_of(q)
    arrays = [_to_cuflash(x, name) for name, x in zip("qkv", (q, k, v))]
    arguments = _varlen_arguments(lengths, options, sinks)
    cu_q, cu_k = arguments.pop("cu_seqlens_q"), arguments.pop("cu_seqlens_k")
    with _cupy_device(device):
        out, lse = _varlen.attention_varlen(*arrays, cu_q, cu_k, return_lse=True, **arguments)
    return _to_jax(out, device), _to_jax(lse, device)


def _cuflash_options(options, sinks, bias=None):
    """The options with their arrays (ALiBi slopes, sinks, and a dense call's bias and mask) as
    cuflash arrays."""
    out = dict(options)
    arrays = [("alibi_slopes", options["alibi_slopes"]), ("sinks", sinks)]
    if "mask" in options:
        arrays += [("bias", bias), ("mask", options["mask"])]
    for name, value in arrays:
        out[name] = None if value is None else _to_cuflash(value, name)
    return out


def _forward(q, k, v, sinks, options, bias=None):
    device = _device_of(q)
    arrays = [_to_cuflash(x, name) for name, x in zip("qkv", (q, k, v))]
    with _cupy_device(device):
        out, lse = _api.attention(*arrays, return_lse=True, **_cuflash_options(options, sinks, bias))
    return _to_jax(out, device), _to_jax(lse, device)


def _device_of(x):
    _check_concrete(x, "q")
    devices = x.devices()
    if len(devices) != 1:
        raise ValueError(f"q lives on {len(devices)} devices; cuflash.jax takes single-device arrays")
    return next(iter(devices))


def _check_concrete(x, name):
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} is a JAX tracer: cuflash.jax.attention_varlen runs under jax.jit, vmap and scan only with "
            "max_seqlen_q and max_seqlen_k given as ints (they size the grid); else call it outside them"
        )
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")


def _to_cuflash(x, name):
    """A CuPy (GPU) or NumPy (CPU) array sharing the memory of the JAX array ``x``."""
    _check_concrete(x, name)
    platform = next(iter(x.devices())).platform
    if platform == "cpu":
        return numpy.asarray(x)  # zero-copy on CPU, and bfloat16 stays ml_dtypes.bfloat16
    if platform in ("gpu", "cuda"):
        import cupy

        return cupy.from_dlpack(x)
    raise TypeError(f"{name} lives on a {platform} device; cuflash runs on CPU and CUDA GPUs")


def _to_jax(array, device):
    """A JAX array on ``device`` for a cuflash result: DLPack from CuPy, device_put from NumPy."""
    if isinstance(array, numpy.ndarray):
        return jax.device_put(array, device)
    if not array.flags.c_contiguous:  # JAX imports row-major buffers only (results of strided inputs
        array = array.copy()          # keep those inputs' order: _spec.result_order)
    return jax.dlpack.from_dlpack(array)


def _cupy_device(device):
    """CuPy's current device set to the JAX device's, for GPU arrays; nothing for CPU ones."""
    if device.platform == "cpu":
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(getattr(device, "local_hardware_id", device.id))
