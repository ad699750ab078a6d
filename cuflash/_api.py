"""The public functions: validate and resolve (``_spec``), then run on the inputs' device.

NumPy inputs run the embedded NumPy backend (``_cpu``); CuPy arrays, and any CUDA array that
exports ``__dlpack__``, run the CUDA kernels (``_gpu.plan``). Both backends receive the same
resolved ``Problem``, so every semantic rule lives in one place.

A repeated GPU call is cheap: the first call of a signature (dtypes, shapes, strides, alignment,
options, device) is validated and planned, and its plan is kept; a call with the same signature
then only allocates and launches (``_gpu.plan.signature``). Arguments of unusual types (a list as
window, a NumPy integer as scale, ...) always take the full path.
"""
from __future__ import annotations

import numpy

from . import _cpu, _spec

_gpu_plan = None


def _plans():
    """cuflash._gpu.plan, imported on first GPU use (CPU-only programs never load it)."""
    global _gpu_plan
    if _gpu_plan is None:
        from ._gpu import plan

        _gpu_plan = plan
    return _gpu_plan


def _plain_options(scale, causal, window, precision=None, softcap=None) -> bool:
    """Options of exactly the types a plan key can hold without ambiguity (True == 1 as a key:
    a cached causal=True must not answer causal=1, which is an error)."""
    return (type(scale) in (float, int, type(None)) and type(causal) in (bool, str)
            and type(precision) in (str, type(None)) and type(softcap) in (float, int, type(None))
            and (window is None or (type(window) is tuple and len(window) == 2
                                    and type(window[0]) is int and type(window[1]) is int)))


def _no_dropout(dropout_p, dropout_seed) -> bool:
    """Whether a call plainly drops nothing (any other value is resolved)."""
    return type(dropout_p) in (float, int) and not dropout_p and dropout_seed is None


def dropout_key(dropout_p, dropout_seed) -> tuple | None:
    """What a plan key holds of a call's dropout: () for none, (rate,) for a float rate in (0, 1)
    with an int seed in [0, 2^64) (the plan drops at that rate, the seed is each call's: its
    ``run``'s ``dropout_seed``); None for any other spelling (never keyed: the full path checks it)."""
    if _no_dropout(dropout_p, dropout_seed):
        return ()
    if type(dropout_p) is float and 0.0 < dropout_p < 1.0 and type(dropout_seed) is int and 0 <= dropout_seed < 1 << 64:
        return (dropout_p,)
    return None


def attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
              bias=None, mask=None, return_lse=False, out=None, precision=None, dropout_p=0.0, dropout_seed=None):
    """Exact attention ``softmax(q @ swapaxes(k, -1, -2) * scale, masked) @ v``.

    Parameters
    ----------
    q, k, v : arrays of shape ``(..., Lq, D)``, ``(..., Lk, D)``, ``(..., Lk, Dv)``
        NumPy arrays run on the CPU; CuPy arrays (or any CUDA ``__dlpack__`` array, converted
        zero-copy) on their GPU. One dtype for all three: float16, bfloat16, float32 or
        float64. Leading axes broadcast as in ``matmul`` (a key/value head axis of 1 is MQA).
        GQA: when the key/value head axis (-3) divides the query's, query head ``h`` reads
        key/value head ``h // (Hq // Hkv)``.
    scale : float, optional
        Multiplies the scores; defaults to ``1 / sqrt(D)``.
    causal : bool or {"bottom_right", "top_left"}
        ``True`` (= ``"bottom_right"``, FlashAttention-2's convention): query ``i`` sees key
        ``j`` iff ``j <= i + Lk - Lq``. ``"top_left"`` (torch's ``is_causal``): ``j <= i``.
        With Lq < Lk (3 queries, 5 keys; ``x`` visible)::

            bottom_right        top_left
              k0 k1 k2 k3 k4      k0 k1 k2 k3 k4
          q0   x  x  x  .  .   q0  x  .  .  .  .
          q1   x  x  x  x  .   q1  x  x  .  .  .
          q2   x  x  x  x  x   q2  x  x  x  .  .

        With Lq > Lk (5 queries, 3 keys): under ``bottom_right`` rows q0 and q1 see no key
        and output 0 with lse ``-inf``::

            bottom_right        top_left
              k0 k1 k2            k0 k1 k2
          q0   .  .  .         q0  x  .  .
          q1   .  .  .         q1  x  x  .
          q2   x  .  .         q2  x  x  x
          q3   x  x  .         q3  x  x  x
          q4   x  x  x         q4  x  x  x

    window : (left, right), optional
        Local attention around the same diagonal: key ``j`` is visible to query ``i`` iff
        ``i + d - left <= j <= i + d + right`` with ``d = Lk - Lq`` (``0`` under
        ``causal="top_left"``); ``-1`` leaves that side unbounded. ``causal`` sets ``right=0`` (a
        positive ``right`` with ``causal`` is an error).
    softcap : float > 0, optional
        Caps the scaled scores smoothly: ``s = softcap * tanh(s / softcap)`` (Gemma-2, Grok).
    alibi_slopes : float array broadcastable to the leading axes ``(..., Hq)``, optional
        ALiBi: adds ``-slope * |i + d - j|`` to the (capped) score of query i and key j, ``d`` as
        in the mask rule. No gradient.
    sinks : float array broadcastable to the leading axes ``(..., Hq)``, optional
        Learnable attention sinks (gpt-oss): one logit per head that joins every row's softmax
        denominator and carries no value, ``out_i = sum_j e^{s_ij} v_j / (e^{sink} + sum_j
        e^{s_ij})`` and ``lse_i = log(e^{sink} + sum_j e^{s_ij})``; a row that sees no key gives
        out 0 and lse = sink.
        The three modifiers run on both backends, every dtype, forward and backward.
    bias : float array broadcastable to ``(..., Hq, Lq, Lk)``, optional
        Added to the (softcapped) score of query i and key j, before ALiBi: AlphaFold's pair
        bias ``(B, 1, H, N, N)``, Swin's ``(1, H, 49, 49)``, a float attention mask. The output's
        leading axes, heads, queries, keys; any strides, broadcast axes never materialised. dtype:
        q's, or float32 for float16/bfloat16 inputs. ``-inf`` entries hide keys like ``mask``.
    mask : bool array broadcastable to ``(..., Hq, Lq, Lk)``, optional
        True = the key is visible (torch SDPA's convention), ANDed with ``causal`` and
        ``window``: a key-padding mask is ``(B, 1, 1, Lk)``. A row left without a visible key
        outputs 0 with lse ``-inf`` (or its sink).
        Both backends take bias and mask. On the GPU a float16/bfloat16 bias is widened to
        float32 once per call (its broadcast axes not materialised; a bias or mask whose rows
        are not 16-byte aligned is copied likewise). dbias: by default a bias given in full along
        Lq and Lk and shared by several attention rows takes each row's dS by float atomic adds
        into its own entries (no buffer of every score; the last bits vary run to run); with
        ``deterministic=True``, and for any other bias, it is summed from dS of every score in a
        fixed order (no atomics: reproducible), through a float32 (float64) buffer of the
        output's ``(..., Hq, Lq, Lk)``.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores, shape ``(..., Lq)``, natural log,
        float32 (float64 for float64 inputs); ``-inf`` for rows that see no key.
    out : array, optional
        Written in place and returned: shape ``(..., Lq, Dv)``, q's dtype, same device kind,
        not overlapping an input (bias and mask included).
    precision : {None, "highest", "ieee", "tf32"}
        How float32 products may be computed: ``"highest"`` (None, the default) float32-accurate;
        ``"ieee"`` FFMA only; ``"tf32"`` one TF32 product (~1e-3 relative) for speed: the GPU
        forward and backward on TF32 tensor cores. float16, bfloat16 and float64 take None or
        "highest" only.
    dropout_p : float in [0, 1)
        Attention dropout: each probability of ``softmax(S)`` is dropped with this rate and the
        kept ones scaled by ``1 / (1 - rate)``, ``out = (P o Z / (1 - rate)) V``; lse is the
        undropped one. The keep mask is a pure function of ``dropout_seed`` and each score's
        (attention row, query, key) index (Philox4x32-10, ``cuflash._dropout``): the same on
        both backends, for any tiling, so the CPU backend reproduces a GPU call's mask exactly.
        The rate is realised to 2^-16 (the threshold of 16-bit draws), and the scale is that of
        the rate realised, so the result is an unbiased estimate of the undropped one.
    dropout_seed : int in [0, 2^64)
        Required when ``dropout_p > 0``; pass the same seed (and rate) to the backward.

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse``.
    """
    key = None
    dropped = dropout_key(dropout_p, dropout_seed)
    if out is None and type(return_lse) is bool and dropped is not None:
        key, cached = cached_plan("attention", (q, k, v), bias, mask, (scale, causal, window, precision, softcap),
                                  per_row=(alibi_slopes, sinks), extra=dropped)
        if cached is not None:
            o, lse = cached.run(_plans().CUPY_MEMORY, q, k, v, bias=bias, mask=mask, alibi_slopes=alibi_slopes,
                                sinks=sinks, dropout_seed=dropout_seed)
            return (o, lse) if return_lse else o
    problem = _spec.resolve_forward(
        q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        sinks=sinks, bias=bias, mask=mask, out=out, return_lse=return_lse, precision=precision,
        dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    return problem.result(*forward(problem, key))


def cached_plan(kind: str, arrays: tuple, bias, mask, options: tuple, bias_grad: bool = False, per_row=(),
                extra=()):
    """``(key, plan)`` of a call on CuPy arrays: its plan-cache key (``_gpu.plan.signature`` over
    the arrays and ``plan_key_parts``, then ``extra``: ``dropout_key``'s) and the plan kept under
    it, or None; key None when the call cannot be keyed (``plan_key_parts``, or arrays that are not
    plain CuPy arrays of this device)."""
    parts = plan_key_parts(bias, mask, options, bias_grad, per_row)
    if parts is None:
        return None, None
    plans = _plans()
    key = plans.signature(kind, arrays + parts[0], parts[1] + extra)
    if key is None:
        return None, None
    return key, plans.kept_plan(key, arrays[1], arrays[2], _element_strides)


def _element_strides(*arrays):
    """CuPy arrays' byte strides in elements, or None where one is not a whole number of them."""
    strides = []
    for x in arrays:
        size = x.itemsize
        if any(step % size for step in x.strides):
            return None
        strides.append(tuple(step // size for step in x.strides))
    return strides


def plan_key_parts(bias, mask, options: tuple, bias_grad: bool = False, per_row=()):
    """What a call's plan key holds beside its inputs: ``(the bias, mask, ALiBi slopes and sinks
    where given, the options)``, the options being ``options`` (scale, causal, window,
    [deterministic,] precision, softcap) and which of those arrays and bias's gradient are there;
    None when the call is never keyed (options of unusual types). ``per_row``: (alibi_slopes,
    sinks), whose values a replay reads again (plan.PerRowInputs); ``bias_grad``: the backward's.
    The CuPy API's keys (``cached_plan``) and the torch adapter's are made of these."""
    if type(bias_grad) is not bool or not _plain_options(options[0], options[1], options[2], options[-2], options[-1]):
        return None
    # (plain loops, no generators: this runs on every planned call)
    present = []
    flags = [bias_grad and bias is not None]
    for x in (bias, mask) + tuple(per_row):
        flags.append(x is not None)
        if x is not None:
            present.append(x)
    return tuple(present), options + tuple(flags)


def forward(problem, key=None, *, prefetch_backward: bool | None = None):
    """``(out, lse)`` of a resolved problem on its backend; the GPU plan is kept under ``key``
    (None: not kept). The full path of ``attention``, and of the torch adapter.
    ``prefetch_backward``: None, or the ``deterministic`` of the backward that will follow (its
    kernels then start compiling in the background)."""
    if problem.xp is numpy:
        return _cpu.forward(problem)
    plans = _plans()
    o, lse, plan = plans.forward(problem, prefetch_backward=prefetch_backward)
    plans.remember(key, plan)
    return o, lse


def attention_backward(dout, q, k, v, out, lse, *, scale=None, causal=False, window=None, softcap=None,
                       alibi_slopes=None, sinks=None, bias=None, mask=None, bias_grad=True, deterministic=False,
                       precision=None, dropout_p=0.0, dropout_seed=None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention` given ``dout``, its ``out`` and ``lse``,
    followed by ``dbias`` when ``bias`` is given and ``bias_grad`` is true, then ``dsinks`` when
    ``sinks`` is given (each in its argument's shape and dtype).

    The options must be those of the forward call. Gradients come back in each input's own
    shape and dtype, summed over every broadcast axis and GQA group. ``dbias`` is dS of the score
    after softcap (``P * (dP - delta)``, 0 where hidden), summed over bias's broadcast axes: in
    the score type (float32, float64 for float64) on the CPU, on the GPU in float64 in a fixed
    order, or by default, for a bias shared by several rows, by float atomic adds in the score
    type. ``deterministic=True`` makes the GPU result, dbias included, bitwise reproducible run
    after run (the CPU backend always is). ``precision``, ``dropout_p`` and ``dropout_seed`` as
    :func:`attention`'s (the forward's seed: the backward recomputes its keep mask).
    """
    key = None
    dropped = dropout_key(dropout_p, dropout_seed)
    if type(deterministic) is bool and dropped is not None:
        arrays = (dout, q, k, v, out, lse)
        key, cached = cached_plan("attention_backward", arrays, bias, mask,
                                  (scale, causal, window, deterministic, precision, softcap), bias_grad=bias_grad,
                                  per_row=(alibi_slopes, sinks), extra=dropped)
        if cached is not None:
            return cached.run(_plans().CUPY_MEMORY, *arrays, bias=bias, mask=mask, alibi_slopes=alibi_slopes, sinks=sinks,
                              dropout_seed=dropout_seed)
    problem = _spec.resolve_backward(
        dout, q, k, v, out, lse, scale=scale, causal=causal, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask, bias_grad=bias_grad,
        deterministic=deterministic, precision=precision, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    return backward(problem, key)


def backward(problem, key=None):
    """``(dq, dk, dv)`` of a resolved backward problem, then ``dbias`` when it returns one and
    ``dsinks`` when it has sinks; the GPU plan is kept under ``key``."""
    if problem.xp is numpy:
        return _cpu.backward(problem)
    plans = _plans()
    grads, plan = plans.backward(problem)
    plans.remember(key, plan)
    return grads


def attention_vjp(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                  bias=None, mask=None, bias_grad=True, deterministic=False, precision=None, dropout_p=0.0,
                  dropout_seed=None):
    """Forward now, backward later: ``(out, vjp)`` where ``vjp(dout)`` returns ``(dq, dk, dv)``
    (then ``dbias`` with ``bias`` and ``bias_grad``, and ``dsinks`` with ``sinks``).

    The forward's ``out`` and ``lse`` are kept for the backward, which never re-runs the
    forward. ``vjp`` may be called several times (with different ``dout``).
    """
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask, dropout_p=dropout_p,
                dropout_seed=dropout_seed)
    _spec.check_deterministic(deterministic)  # every option is checked before the forward runs
    _spec.check_bool("bias_grad", bias_grad)
    problem = _spec.resolve_forward(q, k, v, scale=scale, causal=causal, window=window, return_lse=True,
                                    precision=precision, **mods)
    # A backward will follow: its kernels compile in the background beside the forward's.
    out, lse = forward(problem, prefetch_backward=deterministic)

    def vjp(dout):
        return attention_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, window=window,
                                  bias_grad=bias_grad, deterministic=deterministic, precision=precision, **mods)

    return out, vjp
