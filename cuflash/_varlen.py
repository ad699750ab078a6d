"""Packed variable-length batches (flash-attn's varlen layout), on top of the dense calls.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)``: q ``(total_q, Hq, D)``, k
``(total_k, Hk, D)``, v ``(total_k, Hk, Dv)``; sequence b's queries ``q[cu_q[b]:cu_q[b+1]]`` see only
its keys ``k[cu_k[b]:cu_k[b+1]]`` (the first ``seqused_k[b]`` of them when given), with causal and
windows per sequence on its own lengths. On the GPU the whole batch runs in one launch per
kernel (the kernels read each sequence's offsets and lengths from cu_seqlens: cuda_src/params.cuh's
BatchIndex); the CPU backend runs one dense call per group of sequences of the same lengths
(``_length_groups``: stacked copies, a batch axis in front; a sequence alone in its group runs on
views of the packed arrays, no copy: the head axis of the packed layout is a stride).
"""
from __future__ import annotations

import dataclasses

import numpy

from . import _api, _spec


def _array_module(q):
    """numpy for a NumPy q, cupy for a CuPy one (imported only then); anything else is refused."""
    if isinstance(q, numpy.ndarray):
        return numpy
    if type(q).__module__.split(".")[0] == "cupy":
        import cupy

        if isinstance(q, cupy.ndarray):
            return cupy
    raise TypeError(f"q must be a numpy.ndarray (CPU) or a cupy.ndarray (GPU) in the packed layout, "
                    f"got {type(q).__name__}")


def _check_ints(name, array, xp, *, length=None):
    """An int32 1-D array of the backend's kind (and ``length`` entries), not read."""
    if not isinstance(array, xp.ndarray):
        kind = "numpy.ndarray" if xp is numpy else "cupy.ndarray"
        raise TypeError(f"{name} must be a {kind} like q, got {type(array).__name__}")
    if array.dtype != numpy.int32 or array.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int32 array, got {array.ndim}-D {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {array.shape[0]}")


def _host_ints(name, array, xp, *, length=None):
    """A device (or host) int32 1-D array's values on the host, checked."""
    _check_ints(name, array, xp, length=length)
    return [int(x) for x in (array if xp is numpy else array.get())]


def _prefix_sums(name, values, total, total_name):
    if not values or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] != total:
        raise ValueError(f"{name} must be non-decreasing prefix sums from 0 to {total_name} = {total}, "
                         f"got {values[:4]}{'...' if len(values) > 4 else ''}")


def _hint(name, hint, actual):
    if hint is None:
        return
    hint = _spec._integer(name, hint, "or None")
    if hint < actual:
        raise ValueError(f"{name} = {hint} is smaller than the longest sequence ({actual}): it must be at "
                         "least every sequence's length")


def _check_packed_inputs(q, k, v, xp):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, xp.ndarray):
            raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, got {type(x).__name__}")
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D (total tokens, heads, head dim) in the packed layout, "
                             f"got shape {tuple(x.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[0]} and {v.shape[0]}")


def _check_hinted(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, xp) -> list[int]:
    """The checks of a call whose lengths are trusted (both hints given; nothing read): the
    lengths' kinds, dtypes and sizes, the hints as ints >= 0. Returns the hints."""
    _check_ints("cu_seqlens_q", cu_seqlens_q, xp)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have at least one entry (B + 1 prefix sums)")
    _check_ints("cu_seqlens_k", cu_seqlens_k, xp, length=cu_seqlens_q.shape[0])
    if seqused_k is not None:
        _check_ints("seqused_k", seqused_k, xp, length=cu_seqlens_q.shape[0] - 1)
    hints = [_spec._integer(name, hint, "or None") for name, hint in
             (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k))]
    for name, hint in zip(("max_seqlen_q", "max_seqlen_k"), hints):
        if hint < 0:
            raise ValueError(f"{name} must be >= 0, got {hint}")
    if cu_seqlens_q.shape[0] == 1 and (q.shape[0] or k.shape[0]):
        raise ValueError(f"cu_seqlens_q with one entry is a batch of no sequence, but q and k have "
                         f"{q.shape[0]} and {k.shape[0]} tokens")
    return hints


def traced_results(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, seqused_k=None,
                   alibi_slopes=None, **options):
    """For a caller that knows only shapes and dtypes (JAX under a trace; the arguments NumPy
    stand-ins of them): the checks of a call with both hints, nothing read, and ``((total_q, Hq,
    Dv), dtype), ((Hq, total_q), lse dtype)`` of its out and lse. ``options``: the forward's."""
    _check_packed_inputs(q, k, v, numpy)
    _check_hinted(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, numpy)
    batch = cu_seqlens_q.shape[0] - 1
    _slopes(alibi_slopes, batch)
    problem = _spec.resolve_forward(*_stand_ins(numpy, batch, alibi_slopes, q, k, v), alibi_slopes=alibi_slopes,
                                    **options)
    return ((q.shape[0], q.shape[1], v.shape[2]), problem.dtype), ((q.shape[1], q.shape[0]), problem.lse_dtype)


def _resolve(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, alibi_slopes):
    """(xp, per-sequence (q rows, key rows) slices, per-sequence ALiBi slopes or None). On the GPU
    with both max_seqlen hints, the lengths stay on the device (no read, no synchronisation): the
    slices are None and the grid covers the hints (the kernels fill rows past a too-small hint
    with NaN: params.cuh's poison_uncovered_rows)."""
    xp = _array_module(q)
    _check_packed_inputs(q, k, v, xp)
    if xp is not numpy and max_seqlen_q is not None and max_seqlen_k is not None:
        hints = _check_hinted(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, xp)
        return xp, None, _slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1), hints
    cu_q = _host_ints("cu_seqlens_q", cu_seqlens_q, xp)
    cu_k = _host_ints("cu_seqlens_k", cu_seqlens_k, xp, length=len(cu_q))
    _prefix_sums("cu_seqlens_q", cu_q, q.shape[0], "total_q")
    _prefix_sums("cu_seqlens_k", cu_k, k.shape[0], "total_k")
    batch = len(cu_q) - 1
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if seqused_k is not None:
        used = _host_ints("seqused_k", seqused_k, xp, length=batch)
        if any(u < 0 or u > n for u, n in zip(used, lengths_k)):
            raise ValueError(f"seqused_k must be between 0 and each sequence's key count, got {used[:4]}...")
        lengths_k = used
    _hint("max_seqlen_q", max_seqlen_q, max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0))
    _hint("max_seqlen_k", max_seqlen_k, max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0))
    spans = [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + lengths_k[b])) for b in range(batch)]
    lengths = [max((rows.stop - rows.start for rows, _ in spans), default=0), max(lengths_k, default=0)]
    return xp, spans, _slopes(alibi_slopes, batch), lengths


def _slopes(alibi_slopes, batch):
    """Per-sequence ALiBi slopes: (Hq,) for every sequence or (B, Hq), flash-attn's two forms."""
    if alibi_slopes is None:
        return None
    shape = tuple(getattr(alibi_slopes, "shape", ()))
    if len(shape) == 2 and shape[0] == batch:
        return [alibi_slopes[b] for b in range(batch)]
    if len(shape) == 1:
        return [alibi_slopes] * batch
    raise ValueError(f"alibi_slopes must have shape (Hq,) or (B, Hq) = ({batch}, Hq) in the varlen layout, "
                     f"got {shape}")


@dataclasses.dataclass
class _LengthGroup:
    """Sequences of one packed batch with the same query and key counts, run by the CPU backend as
    one dense call: each packed array's rows of those sequences stacked into a batch axis in front
    (``stack``), the call's results written back to their rows (``scatter``). A group of one takes
    views, no copy, and no batch axis."""

    spans: list  # the members' (query rows, key rows) slices
    members: list  # their sequence indices

    def _rows(self, side: int):
        return [span[side] for span in self.spans]

    def stack(self, array, side: int, heads_first: bool = False):
        """(n, H, rows, ...) of a packed array's rows (side 0: query rows, 1: key rows), heads first;
        ``heads_first``: the array is (H, tokens) already (lse)."""
        take = (lambda rows: array[:, rows]) if heads_first else (lambda rows: _heads_first(array[rows]))
        if len(self.spans) == 1:
            return take(self._rows(side)[0])
        return numpy.stack([take(rows) for rows in self._rows(side)])

    def scatter(self, target, result, side: int, heads_first: bool = False):
        """Write the call's ``result`` (n, H, rows, ...) back into the packed ``target``."""
        for i, rows in enumerate(self._rows(side)):
            part = result if len(self.spans) == 1 else result[i]
            if heads_first:
                target[:, rows] = part
            else:
                target[rows] = _heads_first(part)

    def slopes(self, slopes):
        """The members' ALiBi slopes ((n, Hq), or one sequence's), or None."""
        if slopes is None:
            return None
        if len(self.members) == 1:
            return slopes[self.members[0]]
        return numpy.stack([slopes[b] for b in self.members])


def equal_groups(keys, consecutive: bool) -> list[list[int]]:
    """Indices of ``keys`` grouped by equal key, groups in order of first sight; with ``consecutive``
    a group takes only a run of neighbouring indices."""
    groups: list[list[int]] = []
    joinable: dict = {}  # key -> the group an index of that key joins
    for i, key in enumerate(keys):
        group = joinable.get(key)
        if group is None or (consecutive and group[-1] != i - 1):
            group = joinable[key] = []
            groups.append(group)
        group.append(i)
    return groups


def _length_groups(spans, consecutive: bool) -> list[_LengthGroup]:
    """The packed batch's sequences grouped by (query count, key count), in order of first sight;
    with ``consecutive`` a group takes only a run of neighbouring sequences (dropout numbers a
    call's attention rows on from its first sequence's: ``Problem.dropout_first_row``)."""
    counts = [(rows.stop - rows.start, keys.stop - keys.start) for rows, keys in spans]
    return [_LengthGroup([spans[b] for b in members], members) for members in equal_groups(counts, consecutive)]


def _heads_first(x):
    """(tokens, H, D) -> the (H, tokens, D) view."""
    return x.transpose(1, 0, 2)


def _stand_ins(xp, batch, alibi_slopes, *arrays):
    """Empty heads-first stand-ins of one sequence for each packed array ((tokens, H, D) -> (H, 0, D);
    lse (H, tokens) -> (H, 0)), with a leading batch axis when the ALiBi slopes are (B, Hq): the
    dense checks then see every option as each sequence's call will, even when there is none."""
    stand_ins = [_heads_first(x[:0]) if x.ndim == 3 else x[:, :0] for x in arrays]
    if alibi_slopes is not None and len(alibi_slopes.shape) == 2:
        stand_ins = [xp.broadcast_to(x, (batch,) + tuple(x.shape)) for x in stand_ins]
    return stand_ins


def _check_packed(name, array, xp, dtype, shape, shape_rule, dtype_rule="q's dtype {}"):
    """A packed dout, out or lse: the backend's array kind, ``dtype`` and the whole batch's ``shape``."""
    if not isinstance(array, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, got {type(array).__name__}")
    if array.dtype != dtype:
        raise TypeError(f"{name} must have {dtype_rule.format(dtype)}, got {array.dtype}")
    if tuple(array.shape) != shape:
        transposed = " (the transposed layout)" if tuple(array.shape) == shape[::-1] else ""
        raise ValueError(f"{name} must have {shape_rule.format(shape)} in the packed layout, "
                         f"got {tuple(array.shape)}{transposed}")


def _packed_layout(xp, grad):
    """A gradient from the heads-first problem back in the packed layout (tokens, H, D): the
    kernels store into packed buffers, so this is a view unless GQA's partial sums made a new one."""
    grad = _heads_first(grad)
    return grad if grad.flags.c_contiguous else xp.ascontiguousarray(grad)


def _packed_problem(resolve, arrays, checked, longest, cu_seqlens_q, cu_seqlens_k, seqused_k, causal, *rest,
                    **options):
    """The whole packed batch as one GPU problem: ``resolve`` (_spec's forward or backward) over the
    heads-first views of the packed ``arrays`` (lse, in ``rest``, is heads-first already), with the
    options ``checked`` resolved per sequence (ALiBi's (B, Hq) slopes only fit that way) and the
    lengths the grid covers (``longest``: queries, keys) for the kernels (_spec.PackedBatch)."""
    problem = resolve(*(_heads_first(x) for x in arrays), *rest, causal=causal, **options)
    batch = cu_seqlens_q.shape[0] - 1
    packed = _spec.PackedBatch(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, batch=batch,
        max_seqlen_q=longest[0], max_seqlen_k=longest[1],
        bottom_right=causal != "top_left")
    return dataclasses.replace(problem, alibi_slopes=checked.alibi_slopes, packed=packed)


def _plan_key(kind, arrays, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, options, per_row,
              dropped):
    """The plan-cache key of a packed call on CuPy arrays that can replay a plan (both hints as
    ints, so nothing is read back; the options of _api's plain types, ending with precision and
    softcap: _api.plan_key_parts), or None. The hints are part of the key: they size the grid.
    ``per_row``: (alibi_slopes, sinks), read again by each replay (the key holds their layouts);
    ``dropped``: _api.dropout_key's (the rate; each replay takes its call's seed), None: not keyed."""
    if type(max_seqlen_q) is not int or type(max_seqlen_k) is not int or dropped is None:
        return None
    parts = _api.plan_key_parts(None, None, options, per_row=per_row)
    if parts is None:
        return None
    packed = (cu_seqlens_q, cu_seqlens_k) + (() if seqused_k is None else (seqused_k,))
    plans = _api._plans()
    return plans.signature(kind, tuple(arrays) + packed + parts[0],
                           parts[1] + (max_seqlen_q, max_seqlen_k, seqused_k is None) + dropped)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, seqused_k=None,
                     scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                     return_lse=False, out=None, precision=None, dropout_p=0.0, dropout_seed=None):
    """Attention over packed sequences; ``(out, lse)`` with ``return_lse`` (lse ``(Hq, total_q)``).

    On the GPU with both ``max_seqlen_q`` and ``max_seqlen_k``, nothing is read back: the prefix
    sums (and seqused_k) are trusted, as flash-attn trusts them, and the rows a too-small hint
    leaves uncovered come out NaN (here and in the backward). Otherwise they are read and checked,
    and a hint smaller than a real length raises ValueError.

    The options are checked once for the whole batch, as :func:`cuflash.attention` checks them
    (so also when there is no sequence), and ``out=`` as there (kind, dtype, the packed shape
    ``(total_q, Hq, Dv)``, writeable, no overlap with an input). ``out`` is written only once every
    sequence has run: a sequence refused for its values (an overflowing scale, on the CPU) leaves
    it as it was.

    A repeated GPU call with both hints (ints) and no ``out=`` replays the plan of its signature
    (arrays' dtypes, shapes, strides, alignment, the options and hints; the ALiBi slopes and sinks
    read again, a dropping call's own seed), as :func:`cuflash.attention` does. ``precision``,
    ``dropout_p`` and ``dropout_seed`` as :func:`cuflash.attention`'s; sequence b's head h is
    attention row ``b * H + h`` of the keep mask, its queries and keys counted from the
    sequence's first, so a packed batch drops exactly what the same sequences padded into a
    ``(B, H, L, D)`` batch drop.
    """
    key = None
    if out is None and type(return_lse) is bool:
        key = _plan_key("attention_varlen", (q, k, v), cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                        max_seqlen_k, (scale, causal, window, precision, softcap), (alibi_slopes, sinks),
                        _api.dropout_key(dropout_p, dropout_seed))
        cached = _api._plans().PLANS.get(key) if key is not None else None
        if cached is not None:
            result, lse = cached.run(_api._plans().CUPY_MEMORY, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                     alibi_slopes=alibi_slopes, sinks=sinks, dropout_seed=dropout_seed)
            return (result, lse) if return_lse else result
    return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, key, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                   seqused_k=seqused_k, scale=scale, causal=causal, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, out=out, precision=precision,
                   dropout_p=dropout_p, dropout_seed=dropout_seed)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, key=None, *, max_seqlen_q=None, max_seqlen_k=None, seqused_k=None,
            scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None, return_lse=False,
            out=None, precision=None, dropout_p=0.0, dropout_seed=None):
    """:func:`attention_varlen`'s full path (validation, planning, the launch); a GPU plan that
    can replay the call is kept under ``key`` (None: not kept). The torch adapter calls it with
    its own keys."""
    xp, spans, slopes, longest = _resolve(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                          alibi_slopes)
    batch = cu_seqlens_q.shape[0] - 1
    problem = _spec.resolve_forward(*_stand_ins(xp, batch, alibi_slopes, q, k, v), scale=scale, causal=causal,
                                    window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                    return_lse=return_lse, precision=precision, dropout_p=dropout_p,
                                    dropout_seed=dropout_seed)
    shape = (q.shape[0], q.shape[1], v.shape[2])
    if out is not None:
        _check_packed("out", out, xp, problem.dtype, shape, "shape {} (total_q, Hq, Dv)")
        # The rest as cuflash.attention checks out=: writeable, no self-overlap, no input shared.
        fields = {field.name: getattr(problem, field.name) for field in dataclasses.fields(problem)}
        _spec._check_out(out, q, k, v, xp, dict(fields, out_shape=shape))
    if xp is not numpy:
        packed = _packed_problem(_spec.resolve_forward, (q, k, v), problem, longest, cu_seqlens_q, cu_seqlens_k,
                                 seqused_k, causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                                 return_lse=True, out=None if out is None else _heads_first(out), precision=precision,
                                 dropout_p=problem.dropout_p, dropout_seed=problem.dropout_seed)
        result, lse = _api.forward(packed, key)
        # The packed layout: out itself, or the forward's own allocation (made in that layout).
        result = out if out is not None else _heads_first(result)
        return (result, lse) if problem.return_lse else result
    result = xp.empty(shape, dtype=q.dtype)
    lse = xp.empty((q.shape[1], q.shape[0]), dtype=problem.lse_dtype)
    for group in _length_groups(spans, consecutive=problem.dropout_seed is not None):
        stacked = [group.stack(x, side) for x, side in ((q, 0), (k, 1), (v, 1))]
        sequences = _spec.resolve_forward(*stacked, scale=scale, causal=causal, window=window, softcap=softcap,
                                          alibi_slopes=group.slopes(slopes), sinks=sinks, return_lse=True,
                                          precision=precision, dropout_p=problem.dropout_p,
                                          dropout_seed=problem.dropout_seed)
        o, l = _api.forward(dataclasses.replace(sequences, dropout_first_row=group.members[0] * q.shape[1]))
        group.scatter(result, o, 0)
        group.scatter(lse, l, 0, heads_first=True)
    if out is not None:
        out[...] = result
        result = out
    return (result, lse) if problem.return_lse else result


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, seqused_k=None, scale=None, causal=False, window=None, softcap=None,
                              alibi_slopes=None, sinks=None, deterministic=False, precision=None, dropout_p=0.0,
                              dropout_seed=None):
    """``(dq, dk, dv)`` of :func:`attention_varlen` (``dsinks`` after them with sinks); keys past
    ``seqused_k`` get zero gradients. ``dout`` and ``out`` are ``(total_q, Hq, Dv)`` and ``lse``
    ``(Hq, total_q)``, as the forward returns them; all is checked before any sequence runs.
    Repeated GPU calls replay plans as :func:`attention_varlen`'s do; ``dropout_p`` and
    ``dropout_seed``: the forward's."""
    key = None
    if type(deterministic) is bool:
        arrays = (dout, q, k, v, out, lse)
        key = _plan_key("attention_varlen_backward", arrays, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                        max_seqlen_k, (scale, causal, window, deterministic, precision, softcap),
                        (alibi_slopes, sinks), _api.dropout_key(dropout_p, dropout_seed))
        cached = _api._plans().PLANS.get(key) if key is not None else None
        if cached is not None:
            return cached.run(_api._plans().CUPY_MEMORY, *arrays, cu_seqlens_q, cu_seqlens_k, seqused_k,
                              alibi_slopes=alibi_slopes, sinks=sinks, dropout_seed=dropout_seed)
    return backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key, max_seqlen_q=max_seqlen_q,
                    max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, scale=scale, causal=causal, window=window,
                    softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, deterministic=deterministic,
                    precision=precision, dropout_p=dropout_p, dropout_seed=dropout_seed)


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key=None, *, max_seqlen_q=None, max_seqlen_k=None,
             seqused_k=None, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
             deterministic=False, precision=None, dropout_p=0.0, dropout_seed=None):
    """:func:`attention_varlen_backward`'s full path; the GPU plan is kept under ``key``."""
    xp, spans, slopes, longest = _resolve(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                          alibi_slopes)
    dtype = _spec._check_dtypes(q, k, v)
    shape = (q.shape[0], q.shape[1], v.shape[2])
    for name, array in (("dout", dout), ("out", out)):
        _check_packed(name, array, xp, dtype, shape, "the forward output's shape {} (total_q, Hq, Dv)")
    lse_dtype = numpy.dtype(numpy.float64 if dtype == numpy.float64 else numpy.float32)
    _check_packed("lse", lse, xp, lse_dtype, shape[1::-1], "shape {} (Hq, total_q)",
                  "dtype {} (as the forward returns it)")
    stand_ins = _stand_ins(xp, cu_seqlens_q.shape[0] - 1, alibi_slopes, dout, q, k, v, out, lse)
    problem = _spec.resolve_backward(*stand_ins,
                                     scale=scale, causal=causal, window=window, softcap=softcap,
                                     alibi_slopes=alibi_slopes, sinks=sinks, deterministic=deterministic,
                                     precision=precision, dropout_p=dropout_p, dropout_seed=dropout_seed)
    if xp is not numpy:
        packed = _packed_problem(_spec.resolve_backward, (dout, q, k, v, out), problem, longest, cu_seqlens_q,
                                 cu_seqlens_k, seqused_k, causal, lse, scale=scale, window=window, softcap=softcap,
                                 sinks=sinks, deterministic=deterministic, precision=precision,
                                 dropout_p=problem.dropout_p, dropout_seed=problem.dropout_seed)
        grads = _api.backward(packed, key)
        return tuple(_packed_layout(xp, g) for g in grads[:3]) + tuple(grads[3:])
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    dsinks = None
    for group in _length_groups(spans, consecutive=problem.dropout_seed is not None):
        stacked = [group.stack(x, side) for x, side in ((dout, 0), (q, 0), (k, 1), (v, 1), (out, 0))]
        stacked.append(group.stack(lse, 0, heads_first=True))
        sequences = _spec.resolve_backward(*stacked, scale=scale, causal=causal, window=window, softcap=softcap,
                                           alibi_slopes=group.slopes(slopes), sinks=sinks, deterministic=deterministic,
                                           precision=precision, dropout_p=problem.dropout_p,
                                           dropout_seed=problem.dropout_seed)
        grads = _api.backward(dataclasses.replace(sequences, dropout_first_row=group.members[0] * q.shape[1]))
        for grad, target, side in zip(grads[:3], (dq, dk, dv), (0, 1, 1)):
            group.scatter(target, grad, side)
        if sinks is not None:
            dsinks = grads[3] if dsinks is None else dsinks + grads[3]
    if sinks is None:
        return dq, dk, dv
    return dq, dk, dv, dsinks if dsinks is not None else xp.zeros_like(problem.sinks)
