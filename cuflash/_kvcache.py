"""Attention over a KV cache with in-place append (flash-attn's ``flash_attn_with_kvcache``).

``attention_with_kvcache(q, k_cache, v_cache, *, k, v, cache_seqlens, block_table, ...)``: q
``(B, Hq, Lq, D)``; a contiguous cache ``(B, Hk, Lmax, D)`` / ``(B, Hk, Lmax, Dv)``, or a paged one
``(num_pages, Hk, page_size, D / Dv)`` read through ``block_table`` (int32 ``(B, max_pages)``).
The new keys and values ``k``, ``v`` ``(B, Hk, Lnew, D / Dv)`` are written into the cache in place
at positions ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1``, then sequence b attends over its
keys ``[0, cache_seqlens[b] + Lnew)``. ``num_splits`` > 1 runs the keys in that many ranges and
merges the partial attentions (``merge_attention``'s rule).

Two paths, one contract. On the GPU, float16 and bfloat16 calls whose head dims are multiples of 8
up to 128 and whose caches are laid out in whole 16-byte chunks run the split-KV decode kernel
(``_gpu/decode.py``, ``cuda_src/decode_tc.cu``): one launch reads the cache in place (through the
block table when paged), each kv head's K/V once for its whole GQA group, the cache lengths on the
device, and splits the keys (plus one combine launch when split); the number of splits and the
grid come from shapes alone (B, the heads, Lq, Lmax, the SM count), never from the lengths.
Everything else (the CPU backend, float32/float64, other head dims or layouts, an empty batch)
runs the composition of dense calls: each sequence one dense ``attention`` (all sequences in one
call when their lengths are equal), on views of a contiguous cache and on a gather of the
sequence's keys from a paged one; a split runs one dense call per key range and then
``merge_attention``. The append is one scatter per cache on the CPU; on the GPU it is one launch
of ``cuda_src/kvcache_append.cu`` (``_gpu/kvcache_append.py``), which reads the lengths and the
block table on the device.

Values on the device. Every argument's kind, device, dtype, shape and layout is checked before
anything is written, and an int ``cache_seqlens`` (the caller's host value) against the cache.
The values of a device ``cache_seqlens`` and ``block_table`` are read on the host (a device
sync) only where the host needs them: the composition (and the CPU backend, where reading costs
nothing), which then checks them too (lengths past the cache, pages out of range or shared). The
GPU decode path never reads them: the append and the decode kernel read them on the device, as
flash-attn does, and a call queues its launches without waiting for the GPU (a decoding loop's
host runs ahead of its device). There the caller guarantees the values, as flash-attn's callers
do, and the kernels stay inside the cache whatever they are: the append skips a slot outside
the cache, the decode kernel clamps a length into [0, capacity] and a page id into the cache's
pages (the result is then wrong, but no access leaves the cache). The same holds under a CUDA
graph capture of CuPy's current stream (``cupy.cuda.Stream.begin_capture``, or
``torch.cuda.graph`` through cuflash.torch, which runs on torch's stream): the decode path runs
as outside one, and a replay follows the lengths, table, q, k and v the device holds then. The
composition needs the lengths (and a paged cache's table) on the host, so under capture it
refuses unless ``cache_seqlens`` is an int (or None) and the cache contiguous.
"""
from __future__ import annotations

import dataclasses

import numpy

from . import _api, _merge, _spec, _varlen


def _array_module(q):
    """numpy for a NumPy q, cupy for a CuPy one, as the packed calls dispatch; anything else is refused."""
    try:
        return _varlen._array_module(q)
    except TypeError:
        raise TypeError(f"q must be a numpy.ndarray (CPU) or a cupy.ndarray (GPU) of shape (B, Hq, Lq, D), "
                        f"got {type(q).__module__}.{type(q).__name__}") from None


def _check_kind(name, array, xp, device):
    """``array`` is the backend's ndarray (no conversion: the cache is written where it lies), on q's device."""
    if not isinstance(array, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, got "
                        f"{type(array).__module__}.{type(array).__name__}")
    if device is not None and array.device.id != device:
        raise ValueError(f"{name} must be on q's device {device}, got device {array.device.id}")


def _check_4d(name, array, axes):
    if array.ndim != 4:
        raise ValueError(f"{name} must be 4-D {axes}, got shape {tuple(array.shape)}")


def _host_values(array, xp):
    return numpy.asarray(array if xp is numpy else array.get())


def _bits(array):
    """The same memory as unsigned integers of the element's width: every copy, gather and
    scatter here moves bits (CuPy has no bfloat16 arithmetic of its own, and bits copy exactly)."""
    return array.view(numpy.dtype(f"u{array.itemsize}"))


@dataclasses.dataclass(frozen=True)
class _Cache:
    """The cache's shape facts and what the host knows of the lengths and the block table."""

    paged: bool
    batch: int
    heads_k: int
    capacity: int  # Lmax: slots per sequence (max_pages * page_size when paged)
    page_size: int  # 0 for a contiguous cache
    seqlens: numpy.ndarray | None  # (B,) int64, cache lengths before the append; None: not read (capture)
    new: int  # Lnew
    table: numpy.ndarray | None  # (B, max_pages) int64, host copy; None: contiguous, or not read (capture)
    fixed: int | None = None  # every sequence's length when cache_seqlens is an int or None, else None

    def slots(self, lengths_from, lengths_to):
        """(first index, position index) host arrays of slots [from_b, to_b) of every sequence,
        flattened sequence by sequence: the cache's leading index (sequence or page) and the
        position along the cache's sequence axis (within the page)."""
        counts = lengths_to - lengths_from
        seq = numpy.repeat(numpy.arange(self.batch), counts)
        starts = numpy.repeat(lengths_from - numpy.concatenate([[0], numpy.cumsum(counts)[:-1]]), counts)
        pos = numpy.arange(int(counts.sum())) + starts
        if not self.paged:
            return seq, pos
        return self.table[seq, pos // self.page_size], pos % self.page_size


def _resolve_cache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, xp, device, read_values=True) -> _Cache:
    """Check every array's kind, device, dtype and shape and every length and page id. With
    ``read_values`` False (the GPU decode kernel, a CUDA graph capture) the arrays of lengths and
    pages are not read: their values go unchecked (the caller guarantees them) and the _Cache
    holds None for them (an int length is the caller's host value: checked and kept)."""
    _check_4d("q", q, "(B, Hq, Lq, D)")
    batch, heads_q, _, head_dim = (int(n) for n in q.shape)
    paged = block_table is not None
    layout = "(num_pages, Hk, page_size, {})" if paged else "(B, Hk, Lmax, {})"
    for name, array, width in (("k_cache", k_cache, "D"), ("v_cache", v_cache, "Dv")):
        _check_kind(name, array, xp, device)
        _check_4d(name, array, layout.format(width))
    for name, array, width in (("k", k, "D"), ("v", v, "Dv")):
        if array is not None:
            _check_kind(name, array, xp, device)
            _check_4d(name, array, f"(B, Hk, Lnew, {width})")
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together (the new keys and their values), got only "
                         f"{'k' if v is None else 'v'}")
    dtypes = _spec._float_dtypes()
    if q.dtype not in dtypes:
        raise TypeError(f"q must have dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, array in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if array is not None and array.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {array.dtype}")

    lead = tuple(int(n) for n in k_cache.shape[:3])
    if tuple(v_cache.shape[:3]) != lead:
        axes = "(num_pages, Hk, page_size)" if paged else "(B, Hk, Lmax)"
        raise ValueError(f"v_cache's first three axes {axes} must equal k_cache's {lead}, "
                         f"got {tuple(v_cache.shape[:3])}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache's last axis (head dim D) must equal q's: q has D={head_dim}, "
                         f"k_cache has D={k_cache.shape[3]}")
    heads_k = lead[1]
    if heads_k < 1 or heads_q % heads_k:
        raise ValueError(f"k_cache's head axis (1) must divide q's: q has Hq={heads_q} heads, k_cache has "
                         f"Hk={heads_k} (GQA needs Hk >= 1 and Hq % Hk == 0)")
    for name, array in (("k_cache", k_cache), ("v_cache", v_cache)):
        if array.shape[3] > 1 and array.strides[3] != array.itemsize:
            raise ValueError(f"{name} must have a contiguous last axis (stride {array.itemsize} bytes), got "
                             f"strides {tuple(array.strides)}: any other axis may be strided, e.g. a "
                             f"(B, Lmax, Hk, D) cache as .transpose(0, 2, 1, 3)")

    new = 0
    if k is not None:
        expected_k = (batch, heads_k, int(k.shape[2]), head_dim)
        if tuple(k.shape) != expected_k:
            raise ValueError(f"k must have shape (B, Hk, Lnew, D) = {expected_k[:2]} + (Lnew, {head_dim}), "
                             f"got {tuple(k.shape)}")
        new = expected_k[2]
        expected_v = (batch, heads_k, new, int(v_cache.shape[3]))
        if tuple(v.shape) != expected_v:
            raise ValueError(f"v must have shape (B, Hk, Lnew, Dv) = {expected_v}, as k and v_cache give, "
                             f"got {tuple(v.shape)}")

    if paged:
        _check_kind("block_table", block_table, xp, device)
        if block_table.dtype != numpy.int32 or block_table.ndim != 2:
            raise TypeError(f"block_table must be a 2-D int32 array (B, max_pages), got {block_table.ndim}-D "
                            f"{block_table.dtype}")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (B, max_pages) with B = {batch} (q's batch), got "
                             f"{tuple(block_table.shape)}")
        page_size = lead[2]
        if page_size < 1:
            raise ValueError(f"k_cache's page_size (axis 2) must be at least 1, got shape {tuple(k_cache.shape)}")
        capacity = int(block_table.shape[1]) * page_size
    else:
        page_size = 0
        if lead[0] != batch:
            raise ValueError(f"k_cache must have shape (B, Hk, Lmax, D) with B = {batch} (q's batch), got "
                             f"{tuple(k_cache.shape)}; a paged cache needs block_table")
        capacity = lead[2]

    seqlens, fixed = _resolve_seqlens(cache_seqlens, xp, device, batch, capacity, new, paged, read_values=False)
    table = numpy.zeros(tuple(block_table.shape), numpy.int64) if paged and not batch else None  # nothing to read
    cache = _Cache(paged, batch, heads_k, capacity, page_size, seqlens, new, table, fixed)
    return _read_values(cache, cache_seqlens, block_table, xp, device, int(k_cache.shape[0])) if read_values else cache


def _read_values(cache: _Cache, cache_seqlens, block_table, xp, device, num_pages: int) -> _Cache:
    """``cache`` with the lengths and the block table read on the host (a device sync on the GPU)
    and checked: every length fits the cache, every page a sequence uses is a page of the cache
    and a page written into belongs to one sequence, once."""
    seqlens, fixed = _resolve_seqlens(cache_seqlens, xp, device, cache.batch, cache.capacity, cache.new, cache.paged)
    table = cache.table
    if cache.paged and table is None:
        table = _host_values(block_table, xp).astype(numpy.int64)
    cache = dataclasses.replace(cache, seqlens=seqlens, table=table, fixed=fixed)
    if cache.paged:
        _check_pages(cache, num_pages)
    return cache


def _resolve_seqlens(cache_seqlens, xp, device, batch, capacity, new, paged, read_values=True):
    """``(lengths, fixed)``: the (B,) int64 host array of the cache lengths before the append, each
    in [0, capacity - Lnew] (None for a device array not read: ``read_values`` False), and the
    one length of every sequence when cache_seqlens is an int or None (else None)."""
    where = f"max_pages * page_size = {capacity}" if paged else f"Lmax = {capacity}"
    if cache_seqlens is None:  # the whole cache holds keys
        if new:
            raise ValueError(f"cache_seqlens is required to append k and v: without it every sequence holds "
                             f"{where} keys and there is no slot left")
        return numpy.full(batch, capacity, dtype=numpy.int64), capacity
    if getattr(cache_seqlens, "ndim", 0) != 0:  # an array (B,)
        _check_kind("cache_seqlens", cache_seqlens, xp, device)
        if cache_seqlens.dtype != numpy.int32 or cache_seqlens.ndim != 1:
            raise TypeError(f"cache_seqlens must be an int or a 1-D int32 array (B,), got {cache_seqlens.ndim}-D "
                            f"{cache_seqlens.dtype}")
        if cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens must have B = {batch} entries (q's batch), got {cache_seqlens.shape[0]}")
        if not batch:  # nothing to read
            return numpy.zeros(0, numpy.int64), None
        if not read_values:  # the caller guarantees the lengths (the decode kernel bounds them)
            return None, None
        seqlens, fixed = _host_values(cache_seqlens, xp).astype(numpy.int64), None
    else:
        length = _spec._integer("cache_seqlens", cache_seqlens, "or a 1-D int32 array (B,)")
        if length < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {length}")
        seqlens, fixed = numpy.full(batch, length, dtype=numpy.int64), length
    for b in range(batch):
        if seqlens[b] < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{b}] = {seqlens[b]}")
        if seqlens[b] + new > capacity:
            raise ValueError(f"cache_seqlens[{b}] = {seqlens[b]} plus Lnew = {new} new keys needs "
                             f"{seqlens[b] + new} slots, but the cache holds {where}")
    return seqlens, fixed


def _check_pages(cache: _Cache, num_pages: int):
    """Every page a sequence uses is a page of the cache; a page that receives new keys belongs to
    that sequence alone (and appears once in its row), so the writes never collide and never
    change another sequence's keys. Entries past a sequence's last page are not read."""
    table, size = cache.table, cache.page_size
    used = -(-(cache.seqlens + cache.new) // size)  # pages each sequence reads
    rows = numpy.repeat(numpy.arange(cache.batch), used)
    columns = numpy.arange(int(used.sum())) - numpy.repeat(numpy.cumsum(used) - used, used)
    pages = table[rows, columns]
    bad = numpy.flatnonzero((pages < 0) | (pages >= num_pages))
    if bad.size:
        b, j = int(rows[bad[0]]), int(columns[bad[0]])
        raise ValueError(f"block_table[{b}, {j}] = {table[b, j]} is not a page of the cache (0 <= page < num_pages "
                         f"= {num_pages}); sequence {b} uses its first {used[b]} pages")
    if not cache.new:
        return
    first, _ = cache.slots(cache.seqlens, cache.seqlens + cache.new)
    written = numpy.unique(first)
    counts = numpy.zeros(num_pages, dtype=numpy.int64)
    numpy.add.at(counts, pages, 1)
    shared = written[counts[written] > 1]
    if shared.size:
        page = int(shared[0])
        users = sorted({int(r) for r in rows[pages == page]})
        raise ValueError(f"block_table: page {page} receives new keys but is used {int(counts[page])} times "
                         f"(by sequences {users}): a page written into must belong to one sequence, once")


def _check_writable(cache_arrays, xp):
    """The caches can be written in place: writeable, no element twice (their memory's sharing:
    ``_check_sharing``)."""
    for name, array in cache_arrays:
        if xp is numpy and not array.flags.writeable:
            raise ValueError(f"{name} must be writeable to append k and v")
        if _spec._has_internal_overlap(array):
            raise ValueError(f"{name} must not have overlapping elements (a broadcast or self-overlapping view) "
                             "to append k and v")


def _check_sharing(xp, written, read, out):
    """Caches ``written`` into share no memory with each other or with anything ``read``; out
    (None: not given) none with any of them. ``written``, ``read``: (name, array or None) lists.
    On the GPU each array's byte range is computed once (CuPy's exact test runs kernels)."""
    if xp is numpy:  # exact (interleaved arrays share no memory)
        def span(array):
            return array

        def overlap(a, b):
            return _spec._overlaps(a, b, xp)
    else:
        def span(array):
            return _spec._byte_bounds(array.data.ptr, array.shape, array.strides, array.itemsize)

        overlap = byte_ranges_overlap
    written, read = ([(name, span(a)) for name, a in arrays if a is not None and a.size] for arrays in (written, read))
    shared = first_shared(written, read, ("out", span(out)) if out is not None and out.size else None, overlap)
    if shared is not None:
        name, other_name = shared
        if name == "out":
            raise ValueError(f"out must not share memory with {other_name}")
        if other_name in (cache for cache, _ in written):
            raise ValueError("k_cache and v_cache must not share memory to append k and v")
        raise ValueError(f"{name} must not share memory with {other_name} to append k and v")


def byte_ranges_overlap(a, b) -> bool:
    """Whether byte ranges ``[a0, a1)`` and ``[b0, b1)`` meet."""
    return a[0] < b[1] and b[0] < a[1]


def first_shared(written, read, out, overlap):
    """The first ``(name, other name)`` that share memory, else None: the two caches ``written``
    with each other, each with anything ``read``, ``out`` (a (name, span) pair, or None) with any
    of them. ``written``, ``read``: (name, span) lists; ``overlap(span, span)`` decides."""
    if len(written) == 2 and overlap(written[0][1], written[1][1]):
        return written[0][0], written[1][0]
    for name, span in written:
        for other_name, other in read:
            if overlap(span, other):
                return name, other_name
    if out is not None:
        for other_name, other in written + read:
            if overlap(out[1], other):
                return out[0], other_name
    return None


def _check_out(out, xp, device, problem, shape):
    """out= as cuflash.attention checks it: kind, dtype, shape, writeable, no self-overlap (its
    memory's sharing with the inputs: ``_check_sharing``)."""
    if not isinstance(out, xp.ndarray):
        raise TypeError(f"out must be a {xp.__name__}.ndarray like q, got {type(out).__module__}.{type(out).__name__}")
    if out.dtype != problem.dtype:
        raise TypeError(f"out must have q's dtype {problem.dtype}, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape} (B, Hq, Lq, Dv), got {tuple(out.shape)}")
    if xp is numpy and not out.flags.writeable:
        raise ValueError("out must be writeable")
    if device is not None and out.device.id != device:
        raise ValueError(f"out must be on q's device {device}, got device {out.device.id}")
    if _spec._has_internal_overlap(out):
        raise ValueError("out must not have overlapping elements (a broadcast or self-overlapping view)")


def _resolve_splits(num_splits) -> int:
    splits = _spec._integer("num_splits", num_splits, "(0: heuristic, 1: no split, n > 1: n key ranges)")
    if splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: heuristic, 1: no split, n > 1: n key ranges), got {splits}")
    return splits  # 0: the path's own heuristic (the composition's is 1, _gpu/decode.py's the SM count)


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens=None, block_table=None, scale=None,
                           causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None, return_lse=False,
                           num_splits=0, out=None, precision=None):
    """Attention of new queries over a KV cache, appending new keys and values to it in place.

    Parameters
    ----------
    q : array ``(B, Hq, Lq, D)``
        NumPy arrays run on the CPU, CuPy arrays on their GPU; every array argument must be of
        that kind (and device). float16, bfloat16, float32 or float64, the dtype of everything.
    k_cache, v_cache : arrays
        Without ``block_table``: ``(B, Hk, Lmax, D)`` and ``(B, Hk, Lmax, Dv)``. With it: pages
        ``(num_pages, Hk, page_size, D)`` and ``(num_pages, Hk, page_size, Dv)``, any page size
        >= 1. Any strides with a contiguous last axis: flash-attn's ``(B, Lmax, Hk, D)`` and
        ``(num_pages, page_size, Hk, D)`` caches pass as ``.transpose(0, 2, 1, 3)`` views. Hq must
        be a multiple of Hk (GQA: query head h reads cache head ``h // (Hq // Hk)``).
    k, v : arrays ``(B, Hk, Lnew, D)`` and ``(B, Hk, Lnew, Dv)``, optional
        New keys and values, written into the cache in place at positions ``cache_seqlens[b] ..
        cache_seqlens[b] + Lnew - 1`` of sequence b (through its block table row when paged)
        before attending. Exactly those slots change; the caller advances ``cache_seqlens``.
    cache_seqlens : int or int32 array ``(B,)``, optional
        Each sequence's cache length before the append; ``cache_seqlens[b] + Lnew`` must fit in
        Lmax (``max_pages * page_size`` when paged). None: the whole cache (no room to append).
    block_table : int32 array ``(B, max_pages)``, optional
        Sequence b's position p lives in page ``block_table[b, p // page_size]`` at slot
        ``p % page_size``. Only the entries of the pages a sequence uses are read (the rest may
        hold anything, e.g. -1); a page that receives new keys must belong to one sequence, once.
    scale, causal, window, softcap, alibi_slopes, sinks
        As in :func:`cuflash.attention`, per sequence: sequence b's query i and key j follow the
        rules there with ``Lk = cache_seqlens[b] + Lnew`` (causal is bottom-right per sequence).
        ``alibi_slopes`` and ``sinks`` broadcast to ``(B, Hq)``.
    return_lse : bool
        Also return lse ``(B, Hq, Lq)``, float32 (float64 for float64).
    num_splits : int
        1: one pass over the keys. n > 1: the keys of each sequence run in up to n ranges merged as
        :func:`cuflash.merge_attention` merges (the sink joins the first range only): equal to the
        unsplit result within rounding, bitwise reproducible for a fixed ``num_splits``. The decode
        kernel splits the keys its rows may see into n runs of whole key tiles (64 keys at D 128,
        128 at D 64; at most one range per tile of Lmax); the composition splits ``[0, Lk)`` into
        ``min(n, Lk)`` ranges ``[s * Lk // n, (s + 1) * Lk // n)``. 0 (the default): a
        heuristic; the decode kernel's takes the fewest splits whose blocks fill the GPU's last
        wave about as well as any count would, from B, the heads, Lq, Lmax and the SM count (at
        most 64 splits, at least two tiles each; none when the heads alone fill two waves), the
        composition's is 1.
    out : array ``(B, Hq, Lq, Dv)``, optional
        Written in place and returned, as in :func:`cuflash.attention`; it must not share memory
        with any input, the caches included.
    precision : {None, "highest", "ieee", "tf32"}
        As in :func:`cuflash.attention`.

    Every argument is checked before anything is written: an error leaves the caches and ``out``
    exactly as they were (should a dense call refuse a sequence for its values, the slots
    already written are restored before the error propagates). The values of a device
    ``cache_seqlens`` and ``block_table`` are checked where they are read on the host: on the
    CPU and on the GPU's composition. The GPU decode kernel's calls never read them (no device
    sync, as flash-attn): the caller guarantees that every ``cache_seqlens[b] + Lnew`` fits the
    cache, every page a sequence uses is a page of the cache and a page written into belongs to
    one sequence, once; should one not hold, the append skips a slot outside the cache and the
    kernel clamps a length into [0, capacity] and a page id into the cache's pages: the result is
    wrong, but no access leaves the cache. An int ``cache_seqlens`` is always checked.

    Cost. GPU float16/bfloat16 with D and Dv multiples of 8 up to 128 and caches in whole
    16-byte chunks: the device append (one launch that reads the lengths and the table on the
    device) and the split-KV decode kernel, one launch (two when split) that reads each kv head's
    keys and values once, in place, paged or not, and writes ``out`` in place when its last axis
    is contiguous; nothing waits for the device, and a repeated signature (a decoding loop's
    layers) skips the checks and planning its first call made. Otherwise (float32/float64 and
    the CPU backend included) the composition: the lengths and the table are read on the host (a
    device sync on the GPU), the append is one scatter per cache on the CPU (the device append on
    the GPU), a contiguous cache is read through views (no copy), a paged one is first gathered,
    sequence by sequence, into a ``(Lk, Hk, D)`` copy of its keys and values; sequences of equal
    lengths share one dense call, others run one each; each split range is one more dense call,
    plus one merge.

    CUDA graphs. While CuPy's current stream is capturing (``stream.begin_capture()``; under
    ``torch.cuda.graph`` too, through :func:`cuflash.torch.flash_attn_with_kvcache`), nothing is
    read on the host. The decode kernel's calls run as outside the capture and their replays
    follow the values the device holds then; the composition refuses (RuntimeError) unless
    ``cache_seqlens`` is an int (or None) and the cache contiguous. Warm up each shape outside
    the capture (kernels compile on first use). A CuPy capture takes the call's memory from
    CuPy's pool: keep the arrays the call returns alive while the graph is replayed (out and lse
    hold the call's workspace; with ``out=``, ask for and keep lse too); torch's capture keeps it
    all in the graph's pool.

    Returns
    -------
    out ``(B, Hq, Lq, Dv)``, or ``(out, lse)`` when ``return_lse``.
    """
    xp = _array_module(q)
    device = None if xp is numpy else q.device.id
    if xp is numpy:
        return _attention_with_kvcache(xp, device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale,
                                       causal, window, softcap, alibi_slopes, sinks, return_lse, num_splits, out, precision)
    from ._gpu import kernels

    with kernels.made_current(device):
        key = _signature(xp, (q, k_cache, v_cache, k, v, block_table, alibi_slopes, sinks, out), cache_seqlens,
                         (scale, causal, window, softcap, return_lse, num_splits, precision))
        known = _KNOWN.get(key) if key is not None else None
        if known is not None:
            return _decode_again(xp, device, known, q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                 alibi_slopes, sinks, out)
        return _attention_with_kvcache(xp, device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale,
                                       causal, window, softcap, alibi_slopes, sinks, return_lse, num_splits, out,
                                       precision, key)


def _capturing(xp) -> bool:
    """Whether CuPy's current stream is capturing a CUDA graph (torch's capture included:
    cuflash.torch runs on torch's current stream as CuPy's). Nothing is read from the device then:
    the capture refuses a device-to-host copy, and a value read would be baked into the graph."""
    if xp is numpy:
        return False
    return bool(xp.cuda.get_current_stream().is_capturing())


def _attention_with_kvcache(xp, device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, causal, window,
                            softcap, alibi_slopes, sinks, return_lse, num_splits, out, precision, key=None):
    """The full path: every check, then the decode kernel or the composition. ``key``: the
    call's signature (``_signature``), under which a call that took the decode kernel is kept."""
    # The values of the lengths and the table are read only where they are needed (the
    # composition), once the route is known: the decode kernel reads them on the device.
    cache = _resolve_cache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, xp, device, read_values=False)
    splits = _resolve_splits(num_splits)
    batch, heads_k, head_dim, head_dim_v = cache.batch, cache.heads_k, q.shape[3], v_cache.shape[3]
    # The options, checked once for the whole batch as cuflash.attention checks them (lead axes
    # (B, Hq)), on the new keys when there are some (their values too, on the CPU).
    k_probe = k if k is not None else xp.empty((batch, heads_k, 0, head_dim), dtype=q.dtype)
    v_probe = v if v is not None else xp.empty((batch, heads_k, 0, head_dim_v), dtype=q.dtype)
    options = dict(scale=scale, causal=causal, window=window, softcap=softcap, precision=precision)
    problem = _spec.resolve_forward(q, k_probe, v_probe, alibi_slopes=alibi_slopes, sinks=sinks,
                                    return_lse=return_lse, **options)
    if cache.new:
        _check_writable([("k_cache", k_cache), ("v_cache", v_cache)], xp)
    if out is not None:
        _check_out(out, xp, device, problem, (batch, q.shape[1], q.shape[2], head_dim_v))
    _check_addresses(xp, cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, out)

    reason = "the CPU backend" if xp is numpy else _decode_unsupported(q, k_cache, v_cache, cache)
    if reason is None:
        launch = _launch_decode(xp, cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal,
                                window, splits, out)
        result, lse = launch.out, launch.lse
        if key is not None:
            if len(_KNOWN) >= _MAX_KNOWN:
                _KNOWN.clear()
            append = (_append_launch(k, v, k_cache, v_cache, cache, _device_lengths(cache_seqlens, xp), block_table)
                      if cache.new else None)
            _KNOWN[key] = _Known(dataclasses.replace(cache, seqlens=None, table=None), problem.return_lse,
                                 launch.layout, append)
    else:
        unread = cache.seqlens is None or (cache.paged and cache.table is None)
        if unread and not _capturing(xp):
            cache = _read_values(cache, cache_seqlens, block_table, xp, device, int(k_cache.shape[0]))
        elif unread:
            raise RuntimeError(
                f"attention_with_kvcache under CUDA graph capture: this call runs as dense calls ({reason}), which "
                "read cache_seqlens and block_table on the host, and nothing can be read from the device during a "
                "capture. Captured calls must take the decode kernel (float16/bfloat16, head dims multiples of 8 "
                "up to 128, caches in whole 16-byte chunks), or pass cache_seqlens as an int with a contiguous cache")
        result, lse = _compose(xp, q, k, v, k_cache, v_cache, cache, problem, options, splits or 1,
                               cache_seqlens, block_table)
    return _returned(result, lse, out, problem.return_lse)


def _check_addresses(xp, cache: _Cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, out):
    """The checks that depend on the arrays' memory, not their shapes: caches written into share
    no memory with each other or anything the call reads, out none with any input."""
    read = [("q", q), ("k", k), ("v", v), ("alibi_slopes", problem.alibi_slopes), ("sinks", problem.sinks),
            ("cache_seqlens", cache_seqlens if isinstance(cache_seqlens, xp.ndarray) else None),
            ("block_table", block_table)]
    caches = [("k_cache", k_cache), ("v_cache", v_cache)]
    if cache.new:
        _check_sharing(xp, caches, read, out)
    elif out is not None:
        _check_sharing(xp, [], read + caches, out)


def _launch_decode(xp, cache: _Cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window,
                   splits, out, known=None):
    """The decode kernel's plan, run (its out and lse are the call's): the plan (allocations,
    kernels) first, so that an error there leaves the caches as they were; then the device append
    and the launches, none reading a value on the host. ``known``: the signature's _Known (its
    layout and append), when known."""
    launch = _decode(xp, q, k_cache, v_cache, cache, problem, causal, window, cache_seqlens, block_table, splits, out,
                     None if known is None else known.layout)
    if cache.new:
        _append_on_device(k, v, k_cache, v_cache, cache, cache_seqlens, block_table,
                          None if known is None else known.append)
    launch.run()
    return launch


def _returned(result, lse, out, return_lse):
    """The call's result: out (written in place when the kernels did not write it) and lse."""
    if out is not None and result is not out:
        _bits(out)[...] = _bits(result)
        result = out
    return (result, lse) if return_lse else result


# Calls on CuPy arrays that took the decode kernel, by signature (``_signature``): what their full
# path resolved from shapes, dtypes, layouts, alignment and options alone. A repeated signature
# (a decoding loop's call, layer after layer) checks only what depends on this call's int length
# (if one) and addresses (overlaps with the caches and out), then plans and launches. Cleared when full (a process meets few signatures).
_KNOWN: dict = {}
_MAX_KNOWN = 256


@dataclasses.dataclass(frozen=True)
class _Known:
    cache: _Cache  # the shape facts (the lengths' and table's values: None, never read)
    return_lse: bool
    layout: object  # the decode kernel's launch for this signature (_gpu/decode.py's _Layout)
    append: object  # the device append's (_gpu/kvcache_append.py's AppendLaunch), None without new keys


def _signature(xp, arrays, cache_seqlens, options) -> tuple | None:
    """A call's key: the options (only of types a key holds without ambiguity: True == 1 would
    let causal=1, an error, replay causal=True), each array's dtype, shape, strides, 16-byte
    alignment and device (None where not given), whether cache_seqlens is an int or its array's
    facts, the current device. None (not kept) for anything else: NumPy arrays, foreign arrays, lists."""
    scale, causal, window, softcap, return_lse, num_splits, precision = options
    if not (_api._plain_options(scale, causal, window, precision, softcap) and type(return_lse) is bool
            and type(num_splits) is int):
        return None
    ndarray = xp.ndarray
    parts = [options, xp.cuda.runtime.getDevice()]
    for x in arrays + (cache_seqlens,):
        if x is None:
            parts.append(None)
        elif type(x) is ndarray:
            data = x.data  # (a new MemoryPointer per access)
            parts.append((x.dtype, x.shape, x.strides, data.ptr % 16 == 0, data.device_id))
        elif x is cache_seqlens and type(x) is int:
            parts.append(int)  # (its value is read per call: a decoding loop's length grows every step)
        else:
            return None
    return tuple(parts)


def known_for(q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks, out, *, scale, causal,
              window, softcap, return_lse, num_splits, precision) -> "_Known | None":
    """The _Known that a call of these arguments (CuPy arrays, as attention_with_kvcache's) made
    or met, or None (not a decode-kernel call, or not keyed): what an adapter that keeps its own
    keys (cuflash.torch's) replays from."""
    import cupy

    key = _signature(cupy, (q, k_cache, v_cache, k, v, block_table, alibi_slopes, sinks, out), cache_seqlens,
                     (scale, causal, window, softcap, return_lse, num_splits, precision))
    return None if key is None else _KNOWN.get(key)


@dataclasses.dataclass(frozen=True)
class _Replayed:
    """What _check_addresses and _decode read of a problem, for a known signature's call (its
    launch's layout fixes the rest)."""
    alibi_slopes: object
    sinks: object


def _decode_again(xp, device, known: _Known, q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes,
                  sinks, out):
    """A known signature's call: the checks of this call's int length (if one) and addresses, the
    plan, the device append, the launch (the full path's decode route, less what the signature fixed)."""
    cache = known.cache
    seqlens, fixed = _resolve_seqlens(cache_seqlens, xp, device, cache.batch, cache.capacity, cache.new, cache.paged,
                                      read_values=False)  # (an int length is the caller's host value: checked)
    if seqlens is not None or fixed != cache.fixed:  # (a device array's: None and None, as kept)
        cache = dataclasses.replace(cache, seqlens=seqlens, fixed=fixed)
    problem = _Replayed(alibi_slopes, sinks)
    _check_addresses(xp, cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, out)
    launch = _launch_decode(xp, cache, problem, q, k_cache, v_cache, k, v, cache_seqlens, block_table, None, None,
                            None, out, known)  # (its layout holds the mask, the splits, the options)
    return _returned(launch.out, launch.lse, out, known.return_lse)


def _compose(xp, q, k, v, k_cache, v_cache, cache: _Cache, problem, options, splits, cache_seqlens, block_table):
    """(out, lse) from dense calls, after the append (one scatter per cache on the CPU, the
    device append on the GPU); should a dense call fail, the new slots are put back as they were."""
    # Views with the cache's sequence (or page-slot) axis second: slot (first, pos) is row [first, pos].
    k_rows, v_rows = (c.transpose(0, 2, 1, 3) for c in (k_cache, v_cache))
    saved = None
    if cache.new:
        first, pos = (_index(x, xp) for x in cache.slots(cache.seqlens, cache.seqlens + cache.new))
        saved = [(_bits(rows), _bits(rows)[first, pos]) for rows in (k_rows, v_rows)]  # copies, for a rollback
        if xp is numpy:
            for (rows, _), new in zip(saved, (k, v)):
                rows[first, pos] = _bits(new).transpose(0, 2, 1, 3).reshape((-1,) + (new.shape[1], new.shape[3]))
        else:
            _append_on_device(k, v, k_cache, v_cache, cache, cache_seqlens, block_table)
    try:
        return _attend_all(xp, q, k_rows, v_rows, cache, problem, options, splits)
    except BaseException:
        for rows, old in saved or ():
            rows[first, pos] = old
        raise


def _decode_unsupported(q, k_cache, v_cache, cache: _Cache) -> str | None:
    """Why the GPU decode kernel does not take this call (None: it does)."""
    from ._gpu import decode

    if cache.batch == 0:
        return "an empty batch"
    return decode.unsupported_reason(q, k_cache, v_cache)


def _device_lengths(cache_seqlens, xp):
    """The caller's (B,) device array of lengths, or None (an int, or None: ``_Cache.fixed``)."""
    return cache_seqlens if isinstance(cache_seqlens, xp.ndarray) and cache_seqlens.ndim == 1 else None


def _append_on_device(k, v, k_cache, v_cache, cache: _Cache, cache_seqlens, block_table, launch=None):
    """k and v into the caches by ``cuda_src/kvcache_append.cu``: the kernel reads the lengths and
    the block table where they lie (no host value, no synchronization). ``launch``: the
    signature's (``_append_launch``), when known."""
    import cupy

    lengths = _device_lengths(cache_seqlens, cupy)
    if launch is None:
        launch = _append_launch(k, v, k_cache, v_cache, cache, lengths, block_table)
    launch.run(k, v, k_cache, v_cache, lengths, block_table, cache.fixed or 0)


def _append_launch(k, v, k_cache, v_cache, cache: _Cache, lengths, block_table):
    """The device append's launch for this call's signature (_gpu/kvcache_append.py's)."""
    from ._gpu import kvcache_append

    return kvcache_append.launch_for(k, v, k_cache, v_cache, cache_seqlens=lengths, block_table=block_table,
                                     capacity=cache.capacity)


def _decode(xp, q, k_cache, v_cache, cache: _Cache, problem, causal, window, cache_seqlens, block_table, splits, out,
            layout=None):
    """The GPU decode kernel's plan for this call (``DecodePlan.run`` launches it): made from shapes
    and the caller's device arrays alone, with no host read: the kernel reads the lengths (the
    caller's device array) and the block table where they lie. ``layout``: the signature's, when
    a known signature's call knows it (then the options went into it, and ``splits`` is unused)."""
    from ._gpu import decode

    lengths = _device_lengths(cache_seqlens, xp)
    fixed = cache.capacity if cache.fixed is None else cache.fixed
    modifiers = [x if x is None or type(x) is xp.ndarray else xp.asarray(x)
                 for x in (problem.alibi_slopes, problem.sinks)]
    if layout is not None:
        return decode.plan_call(layout, q, k_cache, v_cache, cache_seqlens=lengths, seqlen_fixed=fixed,
                                block_table=block_table, alibi_slopes=modifiers[0], sinks=modifiers[1], out=out)
    # The window as the whole cache sees it: the problem's sides were clamped against the new
    # keys alone (Lq + Lnew), which would cut a window that the cached keys extend; clamped
    # against Lq + Lmax instead, a side still never excludes a key it would not. The alignment:
    # a diagonal of Lk - Lq (bottom-right) or 0, asked of the same rule with Lq = 0, Lk = 1.
    left, right, _ = _spec._normalise_mask(causal, window, int(q.shape[2]), cache.capacity)
    bottom_right = _spec._normalise_mask(causal, window, 0, 1)[2] == 1
    return decode.plan(q, k_cache, v_cache, cache_seqlens=lengths, seqlen_fixed=fixed, new_keys=cache.new,
                       block_table=block_table, capacity=cache.capacity, scale=problem.scale, window_left=left,
                       window_right=right, bottom_right=bottom_right, softcap=problem.softcap,
                       alibi_slopes=modifiers[0], sinks=modifiers[1], num_splits=splits, out=out)


def _index(host, xp):
    return host if xp is numpy else xp.asarray(host)


def _attend_all(xp, q, k_rows, v_rows, cache: _Cache, problem, options, splits):
    """(out, lse) of every sequence: one dense call (or one per split) per group of sequences with
    the same length. A contiguous cache's groups are runs of neighbours, read where they lie (a
    gather would copy every key the call reads); a paged cache's keys are gathered anyway, so its
    groups take every sequence of a length."""
    lengths = (cache.seqlens + cache.new).tolist()
    groups = _varlen.equal_groups(lengths, consecutive=not cache.paged)
    if len(groups) <= 1:
        return _attend_group(xp, q, k_rows, v_rows, cache, problem, options, splits, groups[0] if groups else [],
                             lengths[0] if groups else 0)
    result = xp.empty(problem.out_shape, dtype=problem.dtype)
    lse = xp.empty(problem.lse_shape, dtype=problem.lse_dtype)
    for members in groups:
        o, l = _attend_group(xp, q, k_rows, v_rows, cache, problem, options, splits, members, lengths[members[0]])
        rows = _batch_index(members, cache.paged, xp)
        _bits(result)[rows] = _bits(o)
        lse[rows] = l
    return result, lse


def _batch_index(members: list, paged: bool, xp):
    """An index of the batch axis taking ``members``: a slice where they are a run of neighbours
    (always in a contiguous cache's groups: views), else an index array."""
    if not paged:
        return slice(members[0], members[-1] + 1) if members else slice(0, 0)
    return _index(numpy.array(members, dtype=numpy.int64), xp)


def _attend_group(xp, q, k_rows, v_rows, cache: _Cache, problem, options, splits, members: list, length: int):
    """(out, lse) of the sequences ``members`` (a run of neighbours when the cache is contiguous:
    views), all ``length`` keys long."""
    index = _batch_index(members, cache.paged, xp)
    if cache.paged:  # a gather of the sequences' keys, (len(members) * length, Hk, D)
        pos = numpy.arange(length)
        first = _index(cache.table[members][:, pos // cache.page_size].reshape(-1), xp)
        pos = _index(numpy.tile(pos % cache.page_size, len(members)), xp)
        k_b, v_b = (_gather(rows, first, pos).reshape((len(members), length) + tuple(rows.shape[2:]))
                    for rows in (k_rows, v_rows))
    else:
        k_b, v_b = k_rows[index, :length], v_rows[index, :length]
    lead = (cache.batch, q.shape[1])
    slopes, sinks = (None if x is None else xp.broadcast_to(x, lead)[index] for x in (problem.alibi_slopes,
                                                                                       problem.sinks))
    return _attend(q[index], k_b.transpose(0, 2, 1, 3), v_b.transpose(0, 2, 1, 3), slopes, sinks, options, splits)


def _gather(rows, first, pos):
    """A copy of rows[first, pos] (one row per index pair), through the bits."""
    return _bits(rows)[first, pos].view(rows.dtype)


def _attend(q, k, v, slopes, sinks, options, splits):
    """(out, lse) of dense attention over all of k's keys, in ``splits`` key ranges merged.

    Range [a, c) runs the whole problem's mask and ALiBi on its own keys: the resolved problem
    with the keys sliced and the diagonal moved left by a (key j of the range is key a + j), so
    every range keeps the windows and causal diagonal of the whole sequence. The sink is one
    logit of the whole row's softmax: it joins the first range only, and the merge's weights
    carry it into the result.
    """
    whole = _spec.resolve_forward(q, k, v, alibi_slopes=slopes, sinks=sinks, return_lse=True, **options)
    length = whole.seqlen_k
    count = max(1, min(splits, length))
    if count == 1:
        return _api.forward(whole)
    outs, lses = [], []
    for s in range(count):
        a, c = s * length // count, (s + 1) * length // count
        part = dataclasses.replace(whole, k=k[..., a:c, :], v=v[..., a:c, :], seqlen_k=c - a,
                                   diag_offset=whole.diag_offset - a, sinks=whole.sinks if s == 0 else None)
        o, l = _api.forward(part)
        outs.append(o)
        lses.append(l)
    return _merge.merge_attention(outs, lses)
