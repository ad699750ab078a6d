"""merge_attention: attention over a union of key sets from the attentions over its parts.

S partial attentions of the same query rows, each over its own disjoint set of keys and
normalised over those keys (``attention(..., return_lse=True)``'s out and lse), give the
attention over all the keys:

    M = max_s lse_s,   w_s = exp(lse_s - M)   (0 where lse_s = -inf),   W = sum_s w_s
    lse = M + log(W),  out = sum_s (w_s / W) out_s

A row whose every lse_s is -inf saw no key in any part: out 0, lse -inf, as attention itself
gives it. The arithmetic is float32 (float64 for float64 outs); a NaN lse_s makes its row NaN, a
NaN in out_s the entries of its row it reaches, and a part whose lse_s is -inf is not read for
that row at all. The parts come stacked, ``(S, ..., Lq, Dv)`` and ``(S, ..., Lq)``, or as Python
sequences of S arrays. NumPy arrays run here; CuPy arrays (and CUDA DLPack arrays) run one
kernel (``_gpu/merge.py``).
"""
from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

import numpy

from . import _spec


@dataclasses.dataclass(frozen=True)
class _Parts:
    """One argument, converted: a stacked (S, ...) array, or the list of a sequence's S arrays."""

    data: Any  # numpy/cupy ndarray (stacked) or list of them
    count: int  # S
    shape: tuple  # one part's shape
    dtype: numpy.dtype

    def part(self, s: int):
        return self.data[s]


def merge_attention(outs, lses):
    """Merge S partial attentions over disjoint key sets into the attention over their union.

    Parameters
    ----------
    outs : array ``(S, ..., Lq, Dv)``, or a sequence of S arrays ``(..., Lq, Dv)``
        Each part's output, normalised over its own keys (``attention``'s ``out``): float16,
        bfloat16, float32 or float64, one dtype and shape for all parts.
    lses : array ``(S, ..., Lq)``, or a sequence of S arrays ``(..., Lq)``
        Each part's log-sum-exp (``attention(..., return_lse=True)``'s ``lse``): float32, or
        float64 for float64 outs; -inf where the part has no key for the row.

    NumPy arrays run on the CPU, CuPy arrays (or CUDA ``__dlpack__`` arrays, zero-copy) on
    their GPU; outs and lses must be of one kind and device.

    Returns
    -------
    ``(out, lse)``: out ``(..., Lq, Dv)`` in outs' dtype, lse ``(..., Lq)`` float32 (float64
    for float64), equal to attention over the union of the parts' keys; rows whose every lse is
    -inf give out 0 and lse -inf. Computed in float32 (float64 for float64).
    """
    outs, lses, xp = _resolve(outs, lses)
    if xp is numpy:
        return _merge_cpu(outs, lses)
    from ._gpu import merge

    return merge.merge(outs.data, lses.data, num_parts=outs.count, out_shape=outs.shape, dtype=outs.dtype,
                       lse_dtype=lses.dtype)


# --- validation ------------------------------------------------------------------------------


def _resolve(outs, lses):
    """Both arguments converted and checked: (outs parts, lses parts, numpy or cupy)."""
    named = []  # (name, object) of every array, for one kind/device check across them all
    layout = {}
    for name, value, axes in (("outs", outs, "..., Lq, Dv"), ("lses", lses, "..., Lq")):
        if _is_array(value):
            named.append((name, value))
            layout[name] = None
        elif isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
            if len(value) == 0:
                raise ValueError(f"{name} must hold at least one partial attention (S >= 1), got an empty "
                                 f"{type(value).__name__}")
            named.extend((f"{name}[{i}]", item) for i, item in enumerate(value))
            layout[name] = len(value)
        else:
            raise TypeError(f"{name} must be an array (S, {axes}) or a sequence of S arrays ({axes}), "
                            f"got {type(value).__name__}")
    arrays, xp = _spec._as_arrays(*named)
    count = layout["outs"] if layout["outs"] is not None else 1
    outs = _parts("outs", arrays[:count], layout["outs"] is not None, "..., Lq, Dv")
    lses = _parts("lses", arrays[count:], layout["lses"] is not None, "..., Lq")

    if outs.dtype not in _spec._float_dtypes():
        raise TypeError(f"outs must have dtype float16, bfloat16, float32 or float64, got {outs.dtype}")
    expected = numpy.dtype(numpy.float64 if outs.dtype == numpy.float64 else numpy.float32)
    if lses.dtype != expected:
        raise TypeError(f"lses must have dtype {expected} for {outs.dtype} outs (as attention(..., return_lse=True) "
                        f"returns it), got {lses.dtype}")
    if lses.count != outs.count:
        raise ValueError(f"lses must hold as many parts as outs: outs has S={outs.count}, lses has S={lses.count}")
    if lses.shape != outs.shape[:-1]:
        raise ValueError(f"the parts of lses must have the shape of those of outs without Dv, {outs.shape[:-1]} "
                         f"(..., Lq), got {lses.shape}")
    return outs, lses, xp


def _is_array(value) -> bool:
    """An array cuflash converts (NumPy, CuPy or any DLPack array) rather than a sequence of them."""
    if isinstance(value, numpy.ndarray) or type(value).__module__.split(".")[0] == "cupy":
        return True
    return hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__")


def _parts(name: str, arrays: list, sequence: bool, axes: str) -> _Parts:
    """The converted arrays of one argument as _Parts; ``axes`` names a part's axes, of which
    it needs at least the named ones (all but "...")."""
    min_ndim = axes.count(",")
    if not sequence:
        (array,) = arrays
        if array.ndim < min_ndim + 1:
            raise ValueError(f"{name} must have at least {min_ndim + 1} dimensions (S, {axes}), "
                             f"got shape {tuple(array.shape)}")
        if array.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one partial attention (S >= 1), got shape "
                             f"{tuple(array.shape)}")
        return _Parts(array, int(array.shape[0]), tuple(map(int, array.shape[1:])), numpy.dtype(array.dtype))
    first = arrays[0]
    for i, array in enumerate(arrays):
        if array.ndim < min_ndim:
            raise ValueError(f"{name}[{i}] must have at least {min_ndim} dimension{'s' * (min_ndim > 1)} ({axes}), "
                             f"got shape {tuple(array.shape)}")
        if array.dtype != first.dtype:
            raise TypeError(f"the parts of {name} must share one dtype: {name}[0] is {first.dtype}, "
                            f"{name}[{i}] is {array.dtype}")
        if array.shape != first.shape:
            raise ValueError(f"the parts of {name} must share one shape: {name}[0] has {tuple(first.shape)}, "
                             f"{name}[{i}] has {tuple(array.shape)}")
    return _Parts(list(arrays), len(arrays), tuple(map(int, first.shape)), numpy.dtype(first.dtype))


# --- the CPU backend -------------------------------------------------------------------------


def _merge_cpu(outs: _Parts, lses: _Parts):
    """The merge in NumPy, part by part (no (S, ..., Lq, Dv) temporary), in lses' dtype."""
    compute = lses.dtype
    lse_parts = [lses.part(s) for s in range(lses.count)]
    with numpy.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = numpy.maximum.reduce(lse_parts) if len(lse_parts) > 1 else lse_parts[0]
        m_ref = numpy.where(m == -numpy.inf, 0, m).astype(compute)
        absent = [lse == -numpy.inf for lse in lse_parts]
        weights = [numpy.where(skip, 0, numpy.exp(lse - m_ref)).astype(compute) for lse, skip in zip(lse_parts, absent)]
        total = weights[0].copy()
        for w in weights[1:]:
            total += w
        empty = total == 0
        lse = numpy.where(empty, -numpy.inf, m_ref + numpy.log(numpy.where(empty, 1, total))).astype(compute)
        acc = numpy.zeros(outs.shape, compute)
        for s, (w, skip) in enumerate(zip(weights, absent)):
            c = (w / total)[..., None]
            acc += numpy.where(skip[..., None], 0, c * outs.part(s).astype(compute, copy=False))
    return acc.astype(outs.dtype), lse
