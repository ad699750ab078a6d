"""Context parallelism: ring attention over a communicator (issue 21), the algorithm and its CPU path.

Each of W ranks holds a shard of the sequence axis (-2) of q, k and v. ``layout="zigzag"`` cuts the
sequence into 2W chunks and gives rank r chunks r and 2W-1-r (under causal masking every rank
then has the same work); ``"contiguous"`` gives rank r chunk r of W. The forward runs W steps:
each rank attends its queries to the key/value block it holds, then passes the block to the
next rank and takes the previous rank's (``comm.sendrecv``); the partial attentions, each
normalised over its own keys, combine through the log-sum-exp merge (:func:`cuflash.merge_attention`).
Every (query chunk, key chunk) pair is one cuflash call whose mask diagonal is the chunks' global
offset (causal, windows and ALiBi see global positions); pairs the mask hides entirely are skipped.
A sink joins once, as one more partial (out 0, lse = sink). The backward sends the dK/dV
accumulators around the ring with their block and reuses the forward's global out and lse (no
forward recomputation); dsinks is each rank's own rows' sum, all-reduced.

The communicator: ``rank``, ``size``, ``sendrecv(arrays, dest, source)`` (send a tuple of arrays to
``dest``, return the tuple ``source`` sent) and ``allreduce_sum(array)``; optionally
``isendrecv(arrays, dest, source)``, the same exchange started and returned as a handle whose
``wait()`` gives the received tuple, which lets the ring overlap it with compute: the forward
passes each key/value block on while it computes on it, the backward sends the next key/value
block ahead and the dK/dV accumulators after each step's pairs (a communicator without it runs
each exchange at once, as ``sendrecv``). :class:`LoopbackComm` runs
N ranks as threads of one process (on NumPy arrays: the CPU path the tests use; on CuPy arrays: the
GPU kernels on one device); :class:`NcclComm` is one rank of a multi-process run (one GPU per
process) over CuPy's raw NCCL bindings, on CuPy arrays; ``cuflash.torch.distributed`` wraps a
``torch.distributed`` process group (gloo, NCCL) in the same four members and adds autograd.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy

from . import _api, _cpu, _merge, _spec

__all__ = ["ring_attention", "ring_attention_backward", "shard", "unshard", "LoopbackComm", "NcclComm"]

_LAYOUTS = ("zigzag", "contiguous")


def _own_chunks(world_size: int, rank: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in the order its shard stores them."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def _chunk_count(world_size: int, layout: str) -> int:
    return 2 * world_size if layout == "zigzag" else world_size


def _xp(x):
    """numpy for a NumPy array, cupy for anything else (a CuPy array: the GPU path)."""
    if isinstance(x, numpy.ndarray):
        return numpy
    import cupy

    return cupy


def shard(x, world_size: int, rank: int, *, layout: str = "zigzag"):
    """Rank ``rank``'s shard of the full sequence ``x`` (sequence axis -2) in ``layout``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    chunks = _chunk_count(world_size, layout)
    length = x.shape[-2]
    if length % chunks:
        raise ValueError(f"the sequence length {length} must be a multiple of {chunks} ({layout} over "
                         f"{world_size} ranks)")
    size = length // chunks
    parts = [x[..., c * size:(c + 1) * size, :] for c in _own_chunks(world_size, rank, layout)]
    return _xp(x).concatenate(parts, axis=-2)


def unshard(shards, *, layout: str = "zigzag"):
    """The full sequence from every rank's shard (``shards[r]`` is rank r's), as :func:`shard` cut it."""
    world_size = len(shards)
    per_rank = len(_own_chunks(world_size, 0, layout))
    size = shards[0].shape[-2] // per_rank
    pieces = {}
    for rank, part in enumerate(shards):
        for position, chunk in enumerate(_own_chunks(world_size, rank, layout)):
            pieces[chunk] = part[..., position * size:(position + 1) * size, :]
    return _xp(shards[0]).concatenate([pieces[c] for c in range(_chunk_count(world_size, layout))], axis=-2)


class _Pending:
    """A started exchange: ``wait()`` returns the received tuple (once)."""

    def __init__(self, wait):
        self._wait, self._received = wait, None

    def wait(self):
        if self._wait is not None:
            self._received, self._wait = self._wait(), None
        return self._received


def _start_exchange(comm, arrays, dest: int, source: int):
    """The exchange started on ``comm`` (its ``isendrecv``), or, for a communicator without one,
    run at once and handed back as done."""
    start = getattr(comm, "isendrecv", None)
    if start is not None:
        return start(arrays, dest, source)
    received = comm.sendrecv(arrays, dest, source)
    return _Pending(lambda: received)


class LoopbackComm:
    """One rank of N in-process ranks (threads) exchanging arrays through shared memory: the
    CPU stand-in for an NCCL communicator. ``LoopbackComm.run(size, fn)`` calls ``fn(comm)`` on
    every rank at once and returns the results in rank order (re-raising a rank's exception)."""

    def __init__(self, rank: int, size: int, shared):
        self.rank, self.size, self._shared = rank, size, shared
        self._sent = 0  # messages this rank started: every rank starts the ring's in the same order

    @classmethod
    def run(cls, size: int, fn):
        shared = {"barrier": threading.Barrier(size), "slots": {}}
        results, errors = [None] * size, [None] * size

        def body(rank):
            try:
                results[rank] = fn(cls(rank, size, shared))
            except BaseException as error:  # noqa: BLE001 - re-raised below, in the caller's thread
                errors[rank] = error
                shared["barrier"].abort()  # the others stop waiting for this rank

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The failing rank's own error, not the BrokenBarrierError it left the others with.
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        first = real[0] if real else next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def sendrecv(self, arrays, dest: int, source: int):
        return self.isendrecv(arrays, dest, source).wait()

    def isendrecv(self, arrays, dest: int, source: int):
        """Posts copies of ``arrays`` (their values now, as NCCL would read them) for ``dest``;
        ``wait()`` returns what ``source`` posted as the same message (the n-th started by each)."""
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        tag, self._sent = self._sent, self._sent + 1
        slots[(self.rank, dest, tag)] = tuple(None if a is None else a.copy() for a in arrays)

        def wait():
            barrier.wait()  # every rank has posted this message (each posts before it waits)
            return slots.pop((source, self.rank, tag))

        return _Pending(wait)

    def allreduce_sum(self, array):
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[("sum", self.rank)] = array.copy()
        barrier.wait()
        total = sum(slots[("sum", r)] for r in range(self.size))  # rank order: the same on every rank
        barrier.wait()
        if self.rank == 0:
            for r in range(self.size):
                del slots[("sum", r)]
        barrier.wait()
        return total


def _nccl_module():
    """CuPy's NCCL bindings (``cupy.cuda.nccl``), refused with the reason when CuPy found no NCCL
    library (a module-level function: the CPU unit test stands a fake in for it)."""
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy's NCCL bindings are unavailable: no NCCL library was found (CuPy's import "
                           "warning names the pip package for your CUDA, e.g. nvidia-nccl-cu12 / -cu13)")
    return nccl


def _address(array):
    """The address of a contiguous array's first byte: a CuPy array's device pointer; a NumPy
    array's host address, which only a stand-in communicator (the CPU unit test's) can use."""
    return array.ctypes.data if isinstance(array, numpy.ndarray) else array.data.ptr


def _c_contiguous(array):
    """``array`` itself when C-contiguous, else a C-contiguous copy (its shape kept: 0-d stays 0-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _current_stream(xp):
    """The stream NCCL work is enqueued on: CuPy's current stream (where cuflash's kernels run), 0 for NumPy."""
    return 0 if xp is numpy else xp.cuda.get_current_stream().ptr


class NcclComm:
    """One rank of ``size`` processes, one GPU each, over NCCL through CuPy's raw bindings
    (``cupy.cuda.nccl``): the communicator :func:`ring_attention` needs for a multi-process run on
    CuPy arrays.

    ``NcclComm(communicator, rank, size)`` wraps a ``cupy.cuda.nccl.NcclCommunicator`` of one device
    per process (created while that process's device is current, e.g. after
    ``cupy.cuda.Device(local_rank).use()``). :meth:`from_unique_id` creates that communicator from
    ``cupy.cuda.nccl.get_unique_id()``, drawn once on rank 0 and handed to every rank by the caller
    (a multiprocessing queue, MPI, a file); :meth:`from_cupyx` takes it out of a
    ``cupyx.distributed.NCCLBackend``.

    - ``sendrecv(arrays, dest, source)`` moves every array of the tuple as raw bytes
      (``NCCL_UINT8``, count = nbytes: any dtype, bfloat16 included, needs no NCCL type), and posts
      every send and receive of the tuple inside one ``groupStart()``/``groupEnd()``: the ring's
      send-to-next and receive-from-previous, issued by every rank at once, cannot deadlock. The
      receive buffers are ``empty_like`` the (C-contiguous) arrays sent: both sides must pass arrays
      of the same shapes and dtypes, as the ring does. A non-contiguous array is copied to a
      C-contiguous one first; ``None`` entries are not sent and come back as ``None``. With
      dest == source == rank (a world of one) it returns copies and calls no NCCL.
    - ``allreduce_sum(array)``: NCCL's ``allReduce`` with ``NCCL_SUM`` in the array's own dtype
      (float16, float32, float64; bfloat16 where CuPy names ``NCCL_BFLOAT16``; int32, int64), out
      of place into a new array; every rank gets the same result. The ring uses it for dsinks
      (float32 or float64).

    ``isendrecv`` runs the sends and receives on the communicator's own stream, ordered after the
    current stream's work by an event and waited for by the current stream (an event: no host
    synchronization), so the ring's kernels overlap them; ``allreduce_sum`` is enqueued on CuPy's
    current stream, where cuflash's kernels run. The buffers come from CuPy's memory pool, whose
    reuse is ordered on the current stream, so keep one current stream through a ring_attention
    call.

    Environment: on the team's lent multi-GPU machines keep NVLink multicast (NVLS) off, setting
    ``NCCL_NVLS_ENABLE=0`` in every process before its communicator is created (NCCL reads it then).
    """

    def __init__(self, communicator, rank: int, size: int):
        rank, size = int(rank), int(size)
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, size) for a size of at least 1, got rank {rank} of {size}")
        # A NcclCommunicator knows its own rank and size: a mismatch would hang the ring, not fail.
        for name, want, method in (("rank", rank, "rank_id"), ("size", size, "size")):
            have = getattr(communicator, method, None)
            if callable(have) and int(have()) != want:
                raise ValueError(f"the communicator's {name} is {int(have())}, not the {name} {want} given")
        self.communicator, self.rank, self.size = communicator, rank, size
        self._streams = {}  # device -> this communicator's stream there (isendrecv)

    @classmethod
    def from_unique_id(cls, unique_id, rank: int, size: int):
        """A new NCCL communicator for rank ``rank`` of ``size`` on the current CuPy device;
        ``unique_id``: ``cupy.cuda.nccl.get_unique_id()`` drawn on one rank and given to all.
        Every rank must call this (it blocks until all have)."""
        nccl = _nccl_module()
        return cls(nccl.NcclCommunicator(int(size), unique_id, int(rank)), rank, size)

    @classmethod
    def from_cupyx(cls, backend):
        """The NCCL communicator of a ``cupyx.distributed.NCCLBackend`` (``init_process_group``'s).
        Reads its private members as CuPy 13/14 name them: ``_comm`` (the NcclCommunicator),
        ``rank`` and ``_n_devices`` (the world size)."""
        try:
            return cls(backend._comm, backend.rank, backend._n_devices)
        except AttributeError as error:
            raise TypeError(f"expected a cupyx.distributed.NCCLBackend with _comm, rank and _n_devices, got "
                            f"{type(backend).__name__} ({error})") from None

    def _check_kind(self, array):
        if isinstance(array, numpy.ndarray) and type(self.communicator).__module__.startswith("cupy"):
            raise TypeError("NcclComm moves CuPy (GPU) arrays; got a NumPy array (use LoopbackComm on the CPU)")

    def sendrecv(self, arrays, dest: int, source: int):
        return self.isendrecv(arrays, dest, source).wait()

    def isendrecv(self, arrays, dest: int, source: int):
        """``sendrecv`` started: on CuPy arrays the sends and receives run on this communicator's own
        stream, after what the current stream has queued (an event), so the ring's kernels go on
        beside them; ``wait()`` makes the current stream wait for them (an event, no host sync)
        and returns the received arrays. The arrays sent are held until then: freed earlier,
        their memory could be reused by the current stream while NCCL still reads it."""
        if dest == self.rank and source == self.rank:
            copies = tuple(None if a is None else a.copy() for a in arrays)
            return _Pending(lambda: copies)
        nccl = _nccl_module()
        outgoing, incoming = [], []
        for array in arrays:
            if array is None:
                outgoing.append(None)
                incoming.append(None)
                continue
            self._check_kind(array)
            array = _c_contiguous(array)
            outgoing.append(array)
            incoming.append(_xp(array).empty_like(array, order="C"))
        sent = [(a, b) for a, b in zip(outgoing, incoming) if a is not None and a.nbytes]
        if not sent:
            return _Pending(lambda: tuple(incoming))
        xp = _xp(sent[0][0])
        side = self._side_stream(xp)
        if side is not None:
            side.wait_event(xp.cuda.get_current_stream().record())
        stream = 0 if xp is numpy else (side.ptr if side is not None else _current_stream(xp))
        nccl.groupStart()
        try:
            for send, receive in sent:
                self.communicator.send(_address(send), send.nbytes, nccl.NCCL_UINT8, int(dest), stream)
                self.communicator.recv(_address(receive), receive.nbytes, nccl.NCCL_UINT8, int(source), stream)
        finally:
            nccl.groupEnd()
        done = side.record() if side is not None else None

        def wait():
            if done is not None:
                xp.cuda.get_current_stream().wait_event(done)
            outgoing.clear()  # (ordered after the sends on the current stream from here on)
            return tuple(incoming)

        return _Pending(wait)

    def _side_stream(self, xp):
        """This communicator's stream for CuPy arrays on the current device (None for NumPy: the
        unit test's stand-in NCCL runs on the host)."""
        if xp is numpy:
            return None
        device = xp.cuda.Device().id
        if device not in self._streams:
            self._streams[device] = xp.cuda.Stream(non_blocking=True)
        return self._streams[device]

    def allreduce_sum(self, array):
        self._check_kind(array)
        xp = _xp(array)
        array = _c_contiguous(array)
        if self.size == 1 or not array.size:
            return array.copy()
        nccl = _nccl_module()
        types = {numpy.dtype(name): getattr(nccl, constant, None) for name, constant in (
            ("float16", "NCCL_FLOAT16"), ("float32", "NCCL_FLOAT32"), ("float64", "NCCL_FLOAT64"),
            ("int32", "NCCL_INT32"), ("int64", "NCCL_INT64"))}
        if getattr(nccl, "NCCL_BFLOAT16", None) is not None:
            try:
                import ml_dtypes
            except ImportError:
                pass
            else:
                types[numpy.dtype(ml_dtypes.bfloat16)] = nccl.NCCL_BFLOAT16
        nccl_type = types.get(numpy.dtype(array.dtype))
        if nccl_type is None:
            raise TypeError(f"allreduce_sum: no NCCL type for {array.dtype} here; supported: "
                            f"{sorted(str(t) for t, c in types.items() if c is not None)}")
        total = xp.empty_like(array, order="C")
        self.communicator.allReduce(_address(array), _address(total), array.size, nccl_type, nccl.NCCL_SUM,
                                    _current_stream(xp))
        return total

def _check_shards(q, k, v, comm, layout):
    per_rank = len(_own_chunks(comm.size, comm.rank, layout))
    if q.shape[-2] != k.shape[-2] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"q, k and v must hold shards of the same sequence (equal lengths on axis -2), got "
                         f"{q.shape[-2]}, {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[-2] % per_rank:
        raise ValueError(f"a {layout} shard holds {per_rank} equal chunks: its length {q.shape[-2]} must be a "
                         f"multiple of {per_rank}")
    return q.shape[-2] // per_rank


def _rows(x, position, size):
    return x[..., position * size:(position + 1) * size, :]


def _pairs(comm, layout, holder, size):
    """(query position, key position, diagonal offset) of this rank's query chunks against the
    chunks of rank ``holder``'s block: the offset a - b of their global starts."""
    own, theirs = _own_chunks(comm.size, comm.rank, layout), _own_chunks(comm.size, holder, layout)
    return [(qi, ki, (a - b) * size) for qi, a in enumerate(own) for ki, b in enumerate(theirs)]


def _window_sides(comm, size, layout, causal, window):
    """(left, right) of the mask over the whole sequence: a chunk pair's own resolution would clamp
    a side to its two chunks' lengths, which only holds for its own diagonal."""
    total = size * _chunk_count(comm.size, layout)
    left, right, _ = _spec._normalise_mask(causal, window, total, total)
    return left, right


def _pair_problem(problem, diag, sides):
    """A chunk pair's problem: the resolved options with the pair's global diagonal and the
    sequence's window sides; None when the mask hides every key of the pair."""
    problem = dataclasses.replace(problem, diag_offset=diag, window_left=sides[0], window_right=sides[1])
    lo, hi = problem.key_range(0, problem.seqlen_q)
    return problem if lo < hi else None


def ring_attention(q, k, v, *, comm, causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
                   sinks=None, layout="zigzag", return_lse=False):
    """Attention of this rank's queries over the whole sequence, the key/value blocks passed
    around the ring. q, k, v: this rank's shards (``shard``); returns out (and lse) as shards."""
    size = _check_shards(q, k, v, comm, layout)
    mods = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    sides = _window_sides(comm, size, layout, causal, window)
    xp = _xp(q)
    own = _own_chunks(comm.size, comm.rank, layout)
    partials = [[] for _ in own]
    block, holder = (k, v), comm.rank
    ring = dict(dest=(comm.rank + 1) % comm.size, source=(comm.rank - 1) % comm.size)
    for step in range(comm.size):
        # The block moves on while this step computes on it (the last step keeps it).
        passing = _start_exchange(comm, block, **ring) if step < comm.size - 1 else None
        for qi, ki, diag in _pairs(comm, layout, holder, size):
            problem = _spec.resolve_forward(_rows(q, qi, size), _rows(block[0], ki, size), _rows(block[1], ki, size),
                                            return_lse=True, **mods)
            problem = _pair_problem(problem, diag, sides)
            if problem is not None:
                partials[qi].append(_api.forward(problem))
        if passing is not None:
            block, holder = passing.wait(), (holder - 1) % comm.size
    checked = _spec.resolve_forward(_rows(q, 0, size), _rows(k, 0, size), _rows(v, 0, size), sinks=sinks,
                                    return_lse=True, **mods)
    outs, lses = [], []
    for parts in partials:
        if checked.sinks is not None:  # the sink: one more logit per row, carrying no value
            sink = xp.broadcast_to(xp.asarray(checked.sinks)[..., None], checked.lse_shape).astype(checked.lse_dtype)
            parts = parts + [(xp.zeros(checked.out_shape, dtype=checked.dtype), sink)]
        if not parts:  # the mask leaves these queries no key anywhere
            parts = [(xp.zeros(checked.out_shape, dtype=checked.dtype),
                      xp.full(checked.lse_shape, -numpy.inf, dtype=checked.lse_dtype))]
        out, lse = _merge.merge_attention([o for o, _ in parts], [l for _, l in parts])
        outs.append(out.astype(checked.dtype, copy=False))
        lses.append(lse)
    out, lse = xp.concatenate(outs, axis=-2), xp.concatenate(lses, axis=-1)
    return (out, lse) if return_lse else out


def ring_attention_backward(dout, q, k, v, out, lse, *, comm, causal=False, scale=None, window=None, softcap=None,
                            alibi_slopes=None, sinks=None, layout="zigzag", deterministic=False):
    """(dq, dk, dv[, dsinks]) of :func:`ring_attention` for this rank's shards: each pair's
    backward with the forward's global out and lse; dK/dV accumulate (in float32, float64 for
    float64) while travelling a step behind their block, and end back home after W sends."""
    size = _check_shards(q, k, v, comm, layout)
    mods = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    sides = _window_sides(comm, size, layout, causal, window)
    xp = _xp(q)
    accum = numpy.float64 if q.dtype == numpy.float64 else numpy.float32
    own = _own_chunks(comm.size, comm.rank, layout)
    dq = [None] * len(own)
    block, holder = (k, v), comm.rank
    accumulators = (xp.zeros(k.shape, dtype=accum), xp.zeros(v.shape, dtype=accum))  # dK, dV of the block
    arriving = None  # the accumulators of the block in hand, on their way from the previous rank
    ring = dict(dest=(comm.rank + 1) % comm.size, source=(comm.rank - 1) % comm.size)
    for step in range(comm.size):
        # K and V move on while this step computes (the last step keeps them); dK and dV follow
        # once this step has added to them, and come in during the next step's pairs.
        passing = _start_exchange(comm, block, **ring) if step < comm.size - 1 else None
        pairs = []
        for qi, ki, diag in _pairs(comm, layout, holder, size):
            rows = [_rows(x, qi, size) for x in (dout, q)]
            problem = _spec.resolve_backward(rows[0], rows[1], _rows(block[0], ki, size), _rows(block[1], ki, size),
                                             _rows(out, qi, size), lse[..., qi * size:(qi + 1) * size],
                                             deterministic=deterministic, **mods)
            problem = _pair_problem(problem, diag, sides)
            if problem is not None:
                pairs.append((qi, ki, _api.backward(problem)))
        if arriving is not None:
            accumulators = arriving.wait()
        dk, dv = accumulators
        for qi, ki, grads in pairs:  # in pair order, as every run adds them: reproducible
            dq[qi] = grads[0].astype(accum) if dq[qi] is None else dq[qi] + grads[0]
            dk[..., ki * size:(ki + 1) * size, :] += grads[1]
            dv[..., ki * size:(ki + 1) * size, :] += grads[2]
        arriving = _start_exchange(comm, (dk, dv), **ring)  # the last one takes them home
        if passing is not None:
            block, holder = passing.wait(), (holder - 1) % comm.size
    dk, dv = arriving.wait()
    dq = xp.concatenate([g if g is not None else xp.zeros(_rows(q, 0, size).shape, dtype=accum) for g in dq], axis=-2)
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    if sinks is None:
        return grads
    checked = _spec.resolve_forward(_rows(q, 0, size), _rows(k, 0, size), _rows(v, 0, size), sinks=sinks, **mods)
    # dsinks = -sum_i exp(sink - lse_i) delta_i over every row of every rank (cuda_src/score_mod.cuh)
    delta = (dout.astype(accum) * out.astype(accum)).sum(axis=-1)
    sink_rows = xp.broadcast_to(xp.asarray(checked.sinks, dtype=accum)[..., None], lse.shape)
    per_row = _spec.sink_gradient_per_row(xp, sink_rows, lse.astype(accum), delta)
    mine = _cpu._sum_to_shape(per_row, numpy.shape(checked.sinks))
    return grads + (comm.allreduce_sum(mine).astype(checked.sinks.dtype),)
