"""The public functions: validate and resolve (``_spec``), then run on the inputs' device.

NumPy inputs run the embedded NumPy backend (``_cpu``); CuPy arrays, and any CUDA array that
exports ``__dlpack__``, run the CUDA kernels (``_gpu.plan``). Both backends receive the same
resolved ``Problem``, so every semantic rule lives in one place.
"""
from __future__ import annotations

import numpy

from . import _cpu, _spec


def attention(q, k, v, *, scale=None, causal=False, window=None, return_lse=False, out=None):
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
        ``causal="top_left"``); ``-1`` leaves that side unbounded. ``causal`` sets ``right=0``.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores, shape ``(..., Lq)``, natural log,
        float32 (float64 for float64 inputs); ``-inf`` for rows that see no key.
    out : array, optional
        Written in place and returned: shape ``(..., Lq, Dv)``, q's dtype, same device kind,
        not overlapping an input.

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse``.
    """
    problem = _spec.resolve_forward(
        q, k, v, scale=scale, causal=causal, window=window, out=out, return_lse=return_lse
    )
    if problem.xp is numpy:
        o, lse = _cpu.forward(problem)
    else:
        from ._gpu import plan

        o, lse = plan.forward(problem)
    return problem.result(o, lse)


def attention_backward(dout, q, k, v, out, lse, *, scale=None, causal=False, window=None,
                       deterministic=False):
    """Gradients ``(dq, dk, dv)`` of :func:`attention` given ``dout``, its ``out`` and ``lse``.

    The options must be those of the forward call. Gradients come back in each input's own
    shape and dtype, summed over every broadcast axis and GQA group. ``deterministic=True``
    makes the GPU result bitwise reproducible run after run.
    """
    problem = _spec.resolve_backward(
        dout, q, k, v, out, lse, scale=scale, causal=causal, window=window,
        deterministic=deterministic,
    )
    if problem.xp is numpy:
        return _cpu.backward(problem)
    from ._gpu import plan

    return plan.backward(problem)


def attention_vjp(q, k, v, *, scale=None, causal=False, window=None, deterministic=False):
    """Forward now, backward later: ``(out, vjp)`` where ``vjp(dout)`` returns ``(dq, dk, dv)``.

    The forward's ``out`` and ``lse`` are kept for the backward, which never re-runs the
    forward. ``vjp`` may be called several times (with different ``dout``).
    """
    out, lse = attention(q, k, v, scale=scale, causal=causal, window=window, return_lse=True)

    def vjp(dout):
        return attention_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, window=window,
                                  deterministic=deterministic)

    return out, vjp
