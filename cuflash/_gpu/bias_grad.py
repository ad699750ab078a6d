"""dbias on the GPU: dS summed over the bias's broadcast axes by ``cuda_src/bias_grad.cu``.

The backward's dK/dV kernels write dS of every score to a C-contiguous ``(lead..., Lq, Lk)``
buffer in the accumulation type; dbias is that buffer summed over the axes along which the bias
was broadcast, in the bias's shape and dtype. ``passes`` describes the launches that do it (none
where nothing is summed or rounded: dS is dbias), each one by-value ``PARAMS_DTYPE`` struct;
``plan._BiasGradient`` launches them through the driver on the memory's stream, so a call on
CuPy arrays and one on torch tensors give the same bits (one thread per entry, a fixed order,
no atomics). Nothing here touches the GPU.
"""
from __future__ import annotations

import math

import numpy

from .variant import HelperKernel

DIMS = 8       # CUFLASH_BIAS_GRAD_DIMS: kept axes, and summed axes, one launch walks
THREADS = 256  # CUFLASH_BIAS_GRAD_THREADS

# The NumPy mirror of ``struct BiasGradParams``: every field 8 bytes wide, in the struct's order.
PARAMS_DTYPE = numpy.dtype(
    [
        ("dscores", numpy.uint64),
        ("dbias", numpy.uint64),
        ("entries", numpy.int64),
        ("terms", numpy.int64),
        ("kept_shape", numpy.int64, (DIMS,)),
        ("kept_stride", numpy.int64, (DIMS,)),
        ("summed_shape", numpy.int64, (DIMS,)),
        ("summed_stride", numpy.int64, (DIMS,)),
    ],
    align=True,
)


def kernel(dtype: str, arch: str) -> HelperKernel:
    """The kernel writing ``dtype`` (a key of variant.CUDA_TYPES; it reads that type's Accum)."""
    return HelperKernel("bias_grad", "bias_grad", dtype, arch, THREADS)


def groups(grad_shape, shape) -> list[tuple[int, bool]]:
    """dS's axes longer than 1 as ``(size, summed)``, outermost first, neighbours of one kind
    merged (dS is C-contiguous, so they always merge): summed where ``shape`` (right-aligned,
    the bias's) is 1 or lacks the axis."""
    padded = (1,) * (len(grad_shape) - len(shape)) + tuple(shape)
    return _merged((n, b == 1) for n, b in zip(grad_shape, padded))


def _merged(axes) -> list[tuple[int, bool]]:
    """``(size, summed)`` axes, outermost first, without those of size 1 and with neighbours of
    one kind merged into one group."""
    merged: list[tuple[int, bool]] = []
    for n, summed in axes:
        if n == 1:
            continue
        if merged and merged[-1][1] == summed:
            merged[-1] = (merged[-1][0] * n, summed)
        else:
            merged.append((n, summed))
    return merged


# One thread per dbias entry sums its terms one after another: a gradient of few entries and
# many terms (a (B, 1, 1, Lk) bias over heads and queries: B x Lk threads, each summing H x Lq
# terms) would leave most of the GPU idle. Below this many entries the longest summed group is
# cut (``_cut``): a first pass keeps its outer part and sums its inner part, a second sums the
# outer part. The cut depends on the shapes alone, so a call's order of additions, and its bits,
# are the same run after run.
SPLIT_BELOW_ENTRIES = 1 << 16
MIN_TERMS = 4096  # an entry's terms, from which a cut is worth its second launch
MIN_CHUNK = 64  # terms of the cut group a first-pass thread sums, at least


def passes(grad_shape, shape, dtype, accum, split_below: int = SPLIT_BELOW_ENTRIES, min_terms: int = MIN_TERMS,
           min_chunk: int = MIN_CHUNK) -> list[tuple[numpy.dtype, numpy.ndarray, int]]:
    """The launches that turn dS (``grad_shape``, ``accum``) into dbias (``shape``, ``dtype``):
    ``[(the dtype it writes, its params struct with null pointers, entries)]``, each reading the
    previous one's ``(entries,)`` output (the first reads dS). One launch, unless the summed
    axes alternate with kept ones more than ``DIMS - 1`` times (then each pass but the last sums
    the innermost ``DIMS - 1`` summed groups into an ``accum`` buffer), or there are fewer than
    ``split_below`` entries of at least ``min_terms`` terms (then two: ``_cut``). Empty where
    nothing is summed and ``dtype`` is ``accum``."""
    dtype, accum = numpy.dtype(dtype), numpy.dtype(accum)
    axes = groups(grad_shape, shape)
    cut = _cut(axes, split_below, min_terms, min_chunk)
    if cut is None:
        return _passes_over(axes, dtype, accum)
    at, outer = cut
    size = axes[at][0]
    first = axes[:at] + [(outer, False), (size // outer, True)] + axes[at + 1:]
    # The first passes' output: their kept groups in order, the cut's outer part among them (where
    # the cut group was), which the last pass sums.
    rest = _merged((n, i == at) for i, (n, summed) in enumerate(first) if not summed)
    return _passes_over(first, accum, accum) + _passes_over(rest, dtype, accum)


def _cut(axes, split_below: int, min_terms: int, min_chunk: int) -> tuple[int, int] | None:
    """(index of the summed group to cut, its outer part's size) when the kept groups give fewer
    than ``split_below`` entries of ``min_terms`` or more terms: the longest summed group, cut at
    the smallest divisor that brings the entries to ``split_below`` while its inner part keeps
    ``min_chunk`` terms (else the largest that keeps them); None when nothing is worth cutting."""
    entries = math.prod(n for n, summed in axes if not summed)
    terms = math.prod(n for n, summed in axes if summed)
    # (the cut adds a kept group: one pass must still walk every group of the first)
    if entries >= split_below or terms < min_terms or len(axes) >= DIMS:
        return None
    at = max((i for i, (_, summed) in enumerate(axes) if summed), key=lambda i: axes[i][0])
    size = axes[at][0]
    divisors = [d for d in range(2, size // min_chunk + 1) if size % d == 0]
    if not divisors:
        return None
    enough = [d for d in divisors if entries * d >= split_below]
    return at, (enough[0] if enough else divisors[-1])


def _passes_over(axes, dtype, accum) -> list[tuple[numpy.dtype, numpy.ndarray, int]]:
    """``passes`` over the groups ``axes`` (``groups``' form), without a cut."""
    result = []
    while True:
        summed_at = [i for i, (_, summed) in enumerate(axes) if summed]
        if not summed_at and dtype == accum and not result:
            return result
        last = len(summed_at) <= DIMS - 1
        first = 0 if last else summed_at[-(DIMS - 1)]
        # Outside the groups it sums, a pass sees one kept axis (a group before `first` is kept).
        part = ([(math.prod(n for n, _ in axes[:first]), False)] if first else []) + axes[first:]
        strides = [math.prod(n for n, _ in part[i + 1:]) for i in range(len(part))]
        kept = [(n, s) for (n, summed), s in zip(part, strides) if not summed]
        summed = [(n, s) for (n, summed), s in zip(part, strides) if summed]
        params = numpy.zeros((), dtype=PARAMS_DTYPE)
        for name, dims in (("kept", kept), ("summed", summed)):
            pad = DIMS - len(dims)
            params[f"{name}_shape"] = [1] * pad + [n for n, _ in dims]
            params[f"{name}_stride"] = [0] * pad + [s for _, s in dims]
        entries = math.prod(n for n, _ in kept)
        params["entries"], params["terms"] = entries, math.prod(n for n, _ in summed)
        result.append((dtype if last else accum, params, entries))
        if last:
            return result
        # What is left: the groups before `first`, the last of them (kept) joined by the kept
        # groups this pass leaves behind.
        axes = axes[: first - 1] + [(axes[first - 1][0] * (entries // part[0][0]), False)]
