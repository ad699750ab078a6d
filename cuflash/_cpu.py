"""The NumPy backend: the same blocked online-softmax algorithm as the CUDA kernels.

Queries go in blocks of BLOCK_M rows, keys in tiles of BLOCK_N; a block never touches a key tile
that the mask hides from all of its rows (``Problem.key_range``), so causal and local attention
do a fraction of the dense work, exactly like the kernels. Each block keeps FlashAttention-2's
running statistics per query row: the max m_i, the sum l_i, and the unnormalised output acc,
and normalises once at the end. Everything is vectorised over the leading axes: plain matmul
broadcasting pairs q with k/v (GQA by splitting q's head axis into (Hkv, group), see
``_grouped``), so broadcast inputs are never copied.

Arithmetic is float64 for float64 inputs and float32 otherwise (float16/bfloat16 are widened,
as the kernels accumulate in float32). A row that sees no key gets out 0 and lse -inf, without
NaN or floating-point warnings: every exponent is taken against a finite reference max. A row
whose scores hold NaN (or +inf) gets out and lse NaN, and so do its gradients.

Non-finite values reach only the rows that see them: a key hidden from a row takes no part in
it, not even as 0 * NaN. Hidden scores are selected away (``_apply_mask``), and a tile that the
mask cuts whose P V product comes out non-finite is recomputed with the hidden pairs selected
away too (``_visible_product``); tiles without a hidden pair or without a bad value pay nothing
but one finiteness check of P V on the cut tiles. (The backward needs no such care: a gradient
entry that is finite in the reference may come out non-finite next to a bad value.)

Score modifiers (``_scores``): s = scale q.k, then softcap * tanh(s / softcap), then the caller's
additive bias, then ALiBi's -slope * |i + diag - j|, then the mask (the positional one ANDed with
the caller's boolean mask). A sink is one more logit per row with no value: the running
statistics start from it (m_i = sink, l_i = e^{sink - m_i} = 1) instead of from nothing.

Bias and mask are read a (rows, keys) block at a time from views of the caller's arrays
(``_score_operand``): an axis they broadcast along (size 1, or stride 0) is read once, never
stretched beyond the block, so no Lq x Lk buffer exists beyond the caller's own. A key tile that
the caller's mask hides from every row of a block is skipped, as the positional mask's tiles are
(a key-padding mask costs the unpadded keys only). The bias gradient (``_BiasGrad``) is dS of the
score after softcap (no softcap factor), summed over bias's broadcast axes block by block into a
buffer of bias's own shape, in a fixed order: bitwise reproducible.

BLAS runs single-threaded inside a call (threadpoolctl, where installed). The tiles' products are
small, and a multi-threaded BLAS synchronises its threads on every one of them: when other work
keeps the cores busy, each product waits for a descheduled thread, and a call that takes 0.1 s
idle took 26 s with two busy processes on a 2-core machine (benchmarks/bench_cpu.py). One thread
is also faster idle (0.10 vs 0.14 s there). The cores are used another way: the work is cut into
units, a box of the leading axes (``_lead_boxes``: about TILE_BYTES of scores a tile, and enough
boxes for the threads) times, in the forward, a query block; units run on a pool of threads
(``_each``; ``CUFLASH_CPU_THREADS``, default the cores available, fewer where their temporaries
would pass THREAD_MEMORY), each whole on one thread. A leading row's arithmetic is the same in any
box, so the result is bitwise the same for any thread count. The backward takes one pass per box;
where the boxes are too few for the threads (and there is no dbias) it runs two passes: each key
tile's dK and dV summed over its query blocks, then each query block's dQ over its key tiles —
every gradient entry the same terms in the same order as in the one pass, so bitwise its result,
for P and dS computed twice.

Tiles are held keys-major (``_keys_major``) and updated in place where nothing else holds them
(``_exp_shifted``, ``_added``): NumPy's reductions along a row and its first touch of new pages
cost more than the products otherwise (measured in benchmarks/NOTES.md, session 43).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import itertools
import math
import os
import threading

import numpy

from . import _dropout
from ._spec import BackwardProblem, Problem, empty_in_order, result_order, sink_gradient_per_row

BLOCK_M = 128  # query rows per block
BLOCK_N = 256  # keys per tile


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (built once: a scan of the process's
    libraries costs ~0.2 ms, a limit on a built controller ~8 us), or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _one_blas_thread():
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def forward(p: Problem):
    """(out, lse) for a validated problem: out in ``p.out_shape``/``p.dtype``, lse in ``p.lse_shape``/``p.lse_dtype``."""
    with _one_blas_thread():
        return _forward(p)


def _forward(p: Problem):
    compute = _compute_dtype(p)
    q, k, v = (x.astype(compute, copy=False) for x in (p.q, p.k, p.v))
    q, k, v, lead = _grouped(p, q, k, v)
    slopes, sinks = (_per_row(p, x, lead, compute) for x in (p.alibi_slopes, p.sinks))
    mods = _ScoreMods(p, slopes, lead)
    out = numpy.empty(lead + (p.seqlen_q, p.head_dim_v), compute)
    lse = numpy.empty(lead + (p.seqlen_q,), compute)

    def unit(work):
        box, rows = work
        at = box.index + (rows,)
        out[at], lse[at] = _forward_block(p, box.take(q)[..., rows, :], box.take(k), box.take(v), rows, box.shape,
                                          mods.within(box), box.take(sinks, trailing=1))

    boxes = _lead_boxes(p, lead, compute, len(_query_blocks(p)))
    # A unit's temporaries: S, P and two more of its (box, BLOCK_M, BLOCK_N) tiles at most.
    _each(unit, [(box, rows) for box in boxes for rows in _query_blocks(p)],
          4 * _tile_bytes(p, math.prod(boxes[0].shape), compute))
    return _like(p.q, out.reshape(p.out_shape), p.dtype), lse.reshape(p.lse_shape).astype(p.lse_dtype)


def _query_blocks(p: Problem) -> list[slice]:
    return [slice(start, min(start + BLOCK_M, p.seqlen_q)) for start in range(0, p.seqlen_q, BLOCK_M)]


# A unit of work is one box of the leading axes (``_LeadBox``) times one query block. Boxes are cut
# so that one (box, BLOCK_M, BLOCK_N) tile of scores holds about TILE_BYTES: large enough that the
# per-call cost of NumPy's ~20 operations a tile is paid on many rows at once, small enough that a
# batch of thousands of short rows makes many units for the threads and a unit's temporaries stay
# bounded (the sweep of sizes and tile shapes: benchmarks/NOTES.md, session 43).
TILE_BYTES = 4 << 20


class _LeadBox:
    """A box of the (GQA-grouped) leading axes: one slice per axis; ``take`` cuts an array
    broadcastable to ``lead + trailing axes`` to it (an axis the array broadcasts along stays 1)."""

    def __init__(self, index: tuple, shape: tuple):
        self.index, self.shape = index, shape

    def take(self, array, trailing: int = 2):
        if array is None:
            return None
        axes = array.ndim - trailing  # its leading axes, aligned to the right of lead's
        own = self.index[len(self.index) - axes:] if axes else ()
        return array[tuple(s if size != 1 else slice(None) for s, size in zip(own, array.shape))]


def _lead_boxes(p: Problem, lead: tuple, compute, units_per_box: int, spread: bool = True,
                whole_axes: frozenset = frozenset()) -> list[_LeadBox]:
    """Boxes covering ``lead`` in C order, each of at most TILE_BYTES of scores (at least one
    leading row) and, with ``spread``, small enough that the units (each box's ``units_per_box``)
    give every thread one. From the last axis back, axes are taken whole while they fit, the next
    one is cut, the ones before it are taken one index at a time. ``whole_axes`` and GQA's group
    axis (the last: a box's query heads are whole groups, which dbias maps back onto Hq) are never
    cut.

    Boxes change no bit of a leading row's results (each row's products, reductions and updates are
    its own), so they may follow the thread count; dbias, whose sums cross boxes, must not spread."""
    if math.prod(lead) == 0:
        return [_LeadBox((slice(None),) * len(lead), lead)]
    per_box = max(1, TILE_BYTES // _tile_bytes(p, 1, compute))
    if spread:
        boxes = -(-_threads() // max(1, units_per_box))
        per_box = min(per_box, max(1, -(-math.prod(lead) // boxes)))
    whole_axes = whole_axes | ({len(lead) - 1} if p.kv_group > 1 else set())
    steps = list(lead)
    inner = math.prod(lead[axis] for axis in whole_axes)
    cuttable = [axis for axis in reversed(range(len(lead))) if axis not in whole_axes]
    for n, axis in enumerate(cuttable):
        if inner * lead[axis] > per_box:
            steps[axis] = max(1, per_box // inner)
            for earlier in cuttable[n + 1:]:
                steps[earlier] = 1
            break
        inner *= lead[axis]
    boxes = []
    for starts in itertools.product(*(range(0, size, step) for size, step in zip(lead, steps))):
        index = tuple(slice(None) if step == size else slice(start, min(start + step, size))
                      for start, size, step in zip(starts, lead, steps))
        boxes.append(_LeadBox(index, tuple(len(range(size)[s]) for s, size in zip(index, lead))))
    return boxes


def _tile_bytes(p: Problem, leading_rows: int, compute) -> int:
    """One (rows, keys) tile of scores in the compute dtype for ``leading_rows`` rows of the
    leading axes (a box's: the first box is the largest)."""
    return leading_rows * max(1, min(BLOCK_M, p.seqlen_q)) * max(1, min(BLOCK_N, p.seqlen_k)) * compute.itemsize


def _threads() -> int:
    """The worker threads: ``CUFLASH_CPU_THREADS``, else the cores this process may run on."""
    given = os.environ.get("CUFLASH_CPU_THREADS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"CUFLASH_CPU_THREADS must be a positive integer (the CPU backend's threads), got "
                             f"{given!r}")
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_POOL: dict = {}  # {threads: ThreadPoolExecutor}, made on first use
_POOL_LOCK = threading.Lock()


def _forget_pools_in_child() -> None:
    """After fork(): the child has none of the parent's threads (a DataLoader worker calling the
    CPU backend would wait forever on a pool without workers), and the lock may have been held
    by one of them. New ones, made on first use."""
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


# The backward's two passes (each pair's P and dS computed twice: ~1.4x the one pass's work) pay
# where they give this many threads work (boxes times the fewer of query blocks and key tiles,
# memory allowing) and the boxes alone do not; otherwise each box takes one pass (bitwise the same
# result either way).
TWO_PASS_THREADS = 4

# What the threads' unit temporaries may hold together beyond one thread's (the backend's memory
# stays O(L): large units get fewer threads, not more memory).
THREAD_MEMORY = 512 << 20


def _workers(units: int, unit_bytes: int) -> int:
    """The threads ``_each`` runs ``units`` units of ``unit_bytes`` temporaries on."""
    return min(_threads(), units, 1 + THREAD_MEMORY // max(unit_bytes, 1))


def _each(work, units, unit_bytes: int) -> None:
    """``work(unit)`` for every unit, on up to ``_threads()`` threads (and no more than
    THREAD_MEMORY holds ``unit_bytes`` of temporaries for): the units are independent (each writes
    its own rows) and NumPy's products and ufuncs release the GIL, so they run side by side; each
    unit computes exactly what it would alone (BLAS on one thread inside it, the same operations in
    the same order), so the result is bitwise the same for any thread count. No barrier between
    units: a thread descheduled by other work delays only its own."""
    threads = _workers(len(units), unit_bytes)
    if threads <= 1:
        for unit in units:
            work(unit)
        return
    with _POOL_LOCK:
        pool = _POOL.get(threads)
        if pool is None:
            pool = _POOL[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cuflash-cpu")
    for future in [pool.submit(work, unit) for unit in units]:
        future.result()


def _like(x, result, dtype):
    """``result`` in ``dtype``, laid out as the GPU backend lays it out: in ``x``'s memory order
    where _spec.result_order gives one (a transposed (B, L, H, D) buffer's results come back in
    that layout), else C order."""
    order = result_order(x, result.shape, numpy.dtype(dtype).itemsize)
    if order is None:
        return result.astype(dtype)
    laid_out = empty_in_order(numpy.empty, result.shape, dtype, order)
    laid_out[...] = result
    return laid_out


def _forward_block(p: Problem, q_block, k, v, rows: slice, lead, mods, sinks):
    """One block of query rows against every key tile it can see (FlashAttention-2, forward)."""
    compute = q_block.dtype
    num_rows = rows.stop - rows.start
    m_i = numpy.full(lead + (num_rows,), -numpy.inf, compute)
    l_i = numpy.zeros(lead + (num_rows,), compute)
    if sinks is not None:  # the sink is the first logit every row has seen: m_i = sink, l_i = 1
        m_i[...] = sinks
        l_i[...] = numpy.where(sinks == -numpy.inf, 0, 1)
    acc = numpy.zeros(lead + (num_rows, p.head_dim_v), compute)

    for keys in _key_tiles(p, rows, mods):
        # S = Q_i K_j^T * scale, modified (softcap, bias, ALiBi), with hidden keys at -inf
        s, _, visible = _scores(p, q_block, k[..., keys, :], rows, keys, mods)
        # m_new = max(m_i, rowmax(S)); a row that has seen nothing yet keeps m_new = -inf, so
        # exponents are taken against m_ref = 0 there (its entries of S are -inf: exp gives 0).
        m_new = numpy.maximum(m_i, s.max(axis=-1))
        m_ref = numpy.where(m_new == -numpy.inf, 0, m_new)
        # P~ = exp(S - m_new);  alpha = exp(m_i - m_new) rescales what was summed so far
        p_tile = _exp_shifted(s, m_ref)
        alpha = numpy.exp(m_i - m_ref)
        # l_i = alpha l_i + rowsum(P~);  acc = alpha acc + P~ V_j (P~ dropped: the row sums are the
        # undropped ones)
        l_i = alpha * l_i + p_tile.sum(axis=-1)
        p_tile = mods.dropped(p_tile, mods.keep(rows, keys))
        v_tile = v[..., keys, :]
        pv = p_tile @ v_tile
        if visible is not None and not numpy.isfinite(pv).all():  # maybe 0 * NaN of a hidden key
            pv = _visible_product(p_tile, v_tile, visible)
        acc *= alpha[..., None]
        acc += pv
        m_i = m_new

    # O_i = acc / l_i;  lse_i = m_i + log(l_i).  l_i == 0 exactly when the row saw no key; a row
    # with a NaN score has l_i NaN, and so out and lse NaN (not the -inf of a row that saw nothing).
    unseen = l_i == 0
    l_safe = numpy.where(unseen, 1, l_i)
    out = acc / l_safe[..., None]
    lse = numpy.where(unseen, -numpy.inf, m_i + numpy.log(l_safe))
    return out, lse


def _exp_shifted(s, shift):
    """exp(S - shift[..., None]) in S's own memory (a tile _scores made fresh: nothing else holds
    it), unless the shift broadcasts S to a larger shape. Writing in place is not only an
    allocation saved: a new tile-sized array is new pages, and first touching them cost as much
    as the subtraction and the exponential together."""
    out = s if numpy.broadcast_shapes(s.shape, shift.shape + (1,)) == s.shape else None
    out = numpy.subtract(s, shift[..., None], out=out)
    return numpy.exp(out, out=out)


def _visible_product(p_tile, v_tile, visible):
    """P V over the visible (row, key) pairs only: the keys whose value holds NaN or inf are
    summed by hand with their hidden pairs selected away, the rest by matmul. Rows that cannot
    see a bad key get exactly the plain product of a clean call (their P is 0 at that key)."""
    bad = ~numpy.isfinite(v_tile).all(axis=-1)  # v's leading axes + (keys,)
    product = p_tile @ numpy.where(bad[..., None], 0, v_tile)
    columns = numpy.flatnonzero(bad.reshape(-1, bad.shape[-1]).any(axis=0))
    if columns.size == 0:  # P V overflowed from finite values: nothing hidden to take out
        return product
    v_bad = numpy.where(bad[..., columns, None], v_tile[..., columns, :], 0)
    terms = p_tile[..., columns, None] * v_bad[..., None, :, :]  # (..., rows, bad keys, Dv)
    return product + numpy.where(visible[..., columns, None], terms, 0).sum(axis=-2)


def backward(p: BackwardProblem):
    """(dq, dk, dv) in the shapes and dtype of q, k, v: FlashAttention-2's backward with recomputation.

    P is recomputed tile by tile from S and the forward's lse (never stored whole). Gradients are
    accumulated over the full broadcast leading shape and then summed back onto each input's own
    shape, as autograd does for broadcasting; GQA sums a kv head's query group. With a bias (and
    ``bias_grad``) dbias follows, then dsinks with sinks.
    """
    with _one_blas_thread():
        return _backward(p)


def _backward(p: BackwardProblem):
    compute = _compute_dtype(p)
    q, k, v, o, dout, lse = (x.astype(compute, copy=False) for x in (p.q, p.k, p.v, p.o, p.dout, p.lse))
    q_g, k_g, v_g, lead = _grouped(p, q, k, v)
    mods = _ScoreMods(p, _per_row(p, p.alibi_slopes, lead, compute), lead)
    dbias = _BiasGrad(p, compute) if p.returns_dbias else None
    o = o.reshape(lead + o.shape[-2:])
    dout = dout.reshape(lead + dout.shape[-2:])
    lse = lse.reshape(lead + lse.shape[-1:])
    # delta_i = rowsum(dO_i * O_i)  (= rowsum(P_i * dP_i), the softmax Jacobian's correction term)
    delta = (dout * o).sum(axis=-1)
    # A row that saw no key (and has no sink) has lse = -inf and all of its S at -inf: exp(S - 0)
    # = 0 there.
    lse_ref = numpy.where(lse == -numpy.inf, 0, lse)

    dq = numpy.zeros(lead + (p.seqlen_q, p.head_dim), compute)
    dk = numpy.zeros(lead + (p.seqlen_k, p.head_dim), compute)
    dv = numpy.zeros(lead + (p.seqlen_k, p.head_dim_v), compute)
    blocks = _query_blocks(p)
    # With dbias, boxes hold every index of the axes bias broadcasts along (dbias sums over them),
    # so that no two boxes add into one region of dbias, and do not follow the thread count: each
    # dbias entry is summed in one box, in its order, the same for any threads.
    broadcast = frozenset() if dbias is None else frozenset(
        axis for axis, (size, full) in enumerate(zip(mods.bias.shape[:-2], lead)) if size == 1 and full > 1)
    boxes = [_BoxBackward(p, box, blocks, mods, (q_g, k_g, v_g, dout, delta, lse_ref), (dq, dk, dv))
             for box in _lead_boxes(p, lead, compute, 1, spread=dbias is None, whole_axes=broadcast)]
    tile_bytes = 6 * _tile_bytes(p, math.prod(boxes[0].box.shape), compute)
    pairs = min(len(blocks), max(len(box.key_tiles) for box in boxes))
    one_pass = _workers(len(boxes), tile_bytes)
    if dbias is not None or one_pass >= TWO_PASS_THREADS or _workers(len(boxes) * pairs, tile_bytes) < TWO_PASS_THREADS:
        _each(lambda box: box.one_pass(dbias), boxes, tile_bytes)
    else:
        # Too few boxes for the threads: each key tile's dK_j, dV_j summed over its query blocks
        # (ascending), then each query block's dQ_i over its key tiles (ascending): every gradient
        # entry gets the same terms in the same order as in the one pass, so bitwise the same
        # result, for P and dS computed twice (each output owned by one thread, nothing added from
        # two at once).
        _each(lambda work: work[0].key_tile(work[1]), [(box, keys) for box in boxes for keys in box.key_tiles],
              tile_bytes)
        _each(lambda work: work[0].query_block(work[1]), [(box, rows) for box in boxes for rows in blocks], tile_bytes)

    grads = []
    for grad, grouped_input, original in ((dq, q_g, p.q), (dk, k_g, p.k), (dv, v_g, p.v)):
        grad = _sum_to_shape(grad, grouped_input.shape).reshape(original.shape)
        grads.append(_like(original, grad, p.dtype))
    if dbias is not None:
        grads.append(dbias.result())
    if p.sinks is not None:
        sinks = _per_row(p, p.sinks, lead, compute)
        dsinks = sink_gradient_per_row(numpy, sinks, lse, delta).reshape(p.lead_shape)
        grads.append(_sum_to_shape(dsinks, p.sinks.shape).reshape(p.sinks.shape).astype(p.sinks.dtype))
    return tuple(grads)


class _BoxBackward:
    """The backward over one box of the leading axes (``_LeadBox``): its pairs of (query block, key
    tile), the forward's tile skipping, and the gradients' views it adds into."""

    def __init__(self, p: BackwardProblem, box: _LeadBox, blocks, mods, inputs, grads):
        self.p, self.box = p, box
        self.mods = mods.within(box)
        self.q, self.k, self.v, self.dout = (box.take(x) for x in inputs[:4])
        self.delta, self.lse = (box.take(x, trailing=1) for x in inputs[4:])
        self.dq, self.dk, self.dv = (g[box.index] for g in grads)
        self.scale = self.q.dtype.type(p.scale)
        self.tiles = {rows.start: list(_key_tiles(p, rows, self.mods)) for rows in blocks}
        self.blocks = blocks
        self.key_tiles = sorted({keys.start: keys for tiles in self.tiles.values() for keys in tiles}.values(),
                                key=lambda keys: keys.start)

    def pair(self, rows, keys):
        """(P as dV takes it, dS, softcap's factor, visibility) of one (query block, key tile), dS
        before softcap's factor: P = exp(S - lse) with S recomputed and modified as in the forward
        (hidden keys give 0); dP = dO_i V_j^T; dS = P * (dP - delta_i). dbias takes this dS (the
        bias is added after softcap). Under dropout dV takes the dropped P (P o Z / q) and
        dS = P * (Z o dP / q - delta_i)."""
        s, d_capped, visible = _scores(self.p, self.q[..., rows, :], self.k[..., keys, :], rows, keys, self.mods)
        p_tile = _exp_shifted(s, self.lse[..., rows])
        keep = self.mods.keep(rows, keys)
        dp = self.mods.dropped(_keys_major(self.v[..., keys, :] @ numpy.swapaxes(self.dout[..., rows, :], -1, -2)),
                               keep)
        ds = _added(dp, -self.delta[..., rows, None])  # (dP has the box's whole shape: dO's)
        ds *= p_tile
        return self.mods.dropped(p_tile, keep), ds, d_capped, visible

    @staticmethod
    def capped(ds, d_capped):
        """dS through softcap: d(c tanh(s / c)) / ds = 1 - tanh^2(s / c)."""
        if d_capped is not None:
            ds *= d_capped  # (dS has the box's whole shape: dO's)
        return ds

    def add_dkdv(self, p_tile, ds, rows, keys):
        """dV_j += P^T dO_i;  dK_j += dS^T Q_i * scale."""
        self.dv[..., keys, :] += numpy.swapaxes(p_tile, -1, -2) @ self.dout[..., rows, :]
        dk = numpy.swapaxes(ds, -1, -2) @ self.q[..., rows, :]
        dk *= self.scale
        self.dk[..., keys, :] += dk

    def add_dq(self, ds, rows, keys):
        """dQ_i += dS K_j * scale."""
        dq = ds @ self.k[..., keys, :]
        dq *= self.scale
        self.dq[..., rows, :] += dq

    def one_pass(self, dbias):
        """Every pair once, query blocks outermost (the kernels loop key tiles outermost: each owns
        its dK_j, dV_j); dbias (a _BiasGrad, or None) takes each pair's dS in this order."""
        for rows in self.blocks:
            for keys in self.tiles[rows.start]:
                p_tile, ds, d_capped, visible = self.pair(rows, keys)
                if dbias is not None:
                    dbias.add(ds, visible, self.box, rows, keys)
                ds = self.capped(ds, d_capped)
                self.add_dq(ds, rows, keys)
                self.add_dkdv(p_tile, ds, rows, keys)

    def key_tile(self, keys):
        """dK_j and dV_j of one key tile, over its query blocks in order."""
        for rows in self.blocks:
            if any(tile.start == keys.start for tile in self.tiles[rows.start]):
                p_tile, ds, d_capped, _ = self.pair(rows, keys)
                self.add_dkdv(p_tile, self.capped(ds, d_capped), rows, keys)

    def query_block(self, rows):
        """dQ_i of one query block, over its key tiles in order."""
        for keys in self.tiles[rows.start]:
            _, ds, d_capped, _ = self.pair(rows, keys)
            self.add_dq(self.capped(ds, d_capped), rows, keys)


def _compute_dtype(p: Problem) -> numpy.dtype:
    return numpy.dtype(numpy.float64 if p.dtype == numpy.float64 else numpy.float32)


def _grouped(p: Problem, q, k, v):
    """(q, k, v, lead): views in which matmul broadcasting pairs every query head with its kv head.

    Without GQA these are the inputs themselves and ``lead`` is ``p.lead_shape``. With GQA (Hq =
    group * Hkv) q's head axis splits into (Hkv, group) and k/v get a unit group axis, so query
    head h = hkv * group + r meets kv head hkv = h // group; ``lead`` is then
    ``p.lead_shape[:-1] + (Hkv, group)``, which reshapes to and from ``p.lead_shape``.
    """
    if p.kv_group == 1:
        return q, k, v, p.lead_shape
    heads_kv = p.kv_lead_shape[-1]
    q = q.reshape(q.shape[:-3] + (heads_kv, p.kv_group) + q.shape[-2:])
    k = k[..., None, :, :]
    v = v[..., None, :, :]
    return q, k, v, p.lead_shape[:-1] + (heads_kv, p.kv_group)


def _per_row(p: Problem, values, lead, compute):
    """A per-(batch..., head) array (ALiBi slopes, sinks) broadcast to ``lead`` (GQA-grouped) with
    a trailing axis for the rows, or None."""
    if values is None:
        return None
    full = numpy.broadcast_to(values.astype(compute), p.lead_shape)
    return full.reshape(lead)[..., None]


class _ScoreMods:
    """What modifies a block's scores beyond q.k: ALiBi slopes (``_per_row``), and the caller's
    bias and mask as views broadcastable to the GQA-grouped ``lead + (Lq, Lk)`` (``_score_operand``);
    and what drops its probabilities (``dropped``)."""

    def __init__(self, p: Problem, slopes, lead):
        self.slopes = slopes
        self.bias = _score_operand(p.bias, p)
        self.mask = _score_operand(p.mask, p)
        self.dropout_p, self.dropout_seed = p.dropout_p, p.dropout_seed
        # With dropout, the attention rows' flat indices (_dropout.py's r) in the GQA-grouped lead:
        # query head h = hkv * group + g, so the grouped axes reshape from the flat order. (Not made
        # without dropout: a batch of many short rows would allocate them on every call.)
        self.rows = None if p.dropout_seed is None else numpy.arange(
            p.dropout_first_row, p.dropout_first_row + math.prod(p.lead_shape), dtype=numpy.uint64).reshape(lead)

    def within(self, box: _LeadBox) -> "_ScoreMods":
        """The same modifiers over one box of the leading axes."""
        mine = copy.copy(self)
        mine.slopes = box.take(self.slopes, trailing=1)
        mine.bias, mine.mask = box.take(self.bias), box.take(self.mask)
        mine.rows = box.take(self.rows, trailing=0)
        return mine

    def keep(self, rows: slice, keys: slice):
        """Dropout's keep mask Z over a (lead, rows, keys) block (_dropout.py), or None without dropout."""
        if self.dropout_seed is None:
            return None
        return _dropout.keep_block(self.dropout_seed, self.dropout_p, self.rows, rows, keys)

    def dropped(self, x, keep):
        """x o Z / q for a block's keep mask Z (``keep``), or x itself where it is None."""
        if keep is None:
            return x
        return numpy.where(keep, x * x.dtype.type(_dropout.keep_scale(self.dropout_p)), 0)

    def mask_block(self, rows: slice, keys: slice):
        """The caller's mask over (rows, keys), broadcastable to the block's scores; None: no mask."""
        return None if self.mask is None else _block(self.mask, rows, keys)


def _score_operand(array, p: Problem):
    """The caller's bias or mask as a view broadcastable to ``lead + (Lq, Lk)`` (GQA's split head
    axis included): leading axes of 1 prepended, every axis of stride 0 narrowed to size 1, so
    that a block read from it is never wider than what the caller stored. None stays None."""
    if array is None:
        return None
    array = array[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                        for size, stride in zip(array.shape, array.strides))]
    full = len(p.lead_shape) + 2
    array = array.reshape((1,) * (full - array.ndim) + array.shape)
    if p.kv_group > 1:  # the head axis (-3) splits as q's does: (Hkv, group), or (1, 1) if broadcast
        heads = array.shape[-3]
        split = (1, 1) if heads == 1 else (heads // p.kv_group, p.kv_group)
        array = array.reshape(array.shape[:-3] + split + array.shape[-2:])
    return array


def _block(array, rows: slice, keys: slice):
    """The (rows, keys) block of a bias, mask or dbias view of ``lead + (Lq or 1, Lk or 1)``: an
    axis of size 1 is broadcast, and taken whole."""
    return array[..., rows if array.shape[-2] != 1 else slice(None), keys if array.shape[-1] != 1 else slice(None)]


class _BiasGrad:
    """dbias, accumulated block by block in the compute dtype into a buffer of bias's own shape
    (leading 1s prepended), each block's dS summed over the axes along which bias broadcasts."""

    def __init__(self, p: BackwardProblem, compute):
        self.bias, self.group, self.full_lead = p.bias, p.kv_group, tuple(p.lead_shape)
        shape = tuple(p.bias.shape)
        self.grad = numpy.zeros((1,) * (len(self.full_lead) + 2 - len(shape)) + shape, compute)

    def add(self, ds, visible, box: _LeadBox, rows: slice, keys: slice):
        """Add one tile's dS (``box.shape + (rows, keys)``, GQA-grouped); a hidden pair adds exactly
        0, even where dS is NaN next to a hidden key's bad value."""
        if visible is not None:
            ds = numpy.where(visible, ds, 0)
        tile = ds.shape[-2:]
        index, shape = box.index, box.shape
        if self.group > 1:  # GQA's heads back as Hq: a box holds whole groups (_lead_boxes)
            heads = index[-2]
            index = index[:-2] + (slice(None) if heads.start is None else
                                  slice(heads.start * self.group, heads.stop * self.group),)
            shape = shape[:-2] + (shape[-2] * self.group,)
        ds = numpy.broadcast_to(ds, box.shape + tile).reshape(shape + tile)
        target = _block(_LeadBox(index, shape).take(self.grad), rows, keys)
        target += _sum_to_shape(ds, target.shape)

    def result(self):
        return self.grad.reshape(self.bias.shape).astype(self.bias.dtype)


def _scores(p: Problem, q_block, k_tile, rows: slice, keys: slice, mods: _ScoreMods):
    """(S, dS_modified/dS_raw or None, visible or None): S = scale Q K^T, then softcap, then the
    bias, then ALiBi, then the mask (hidden keys at -inf). The second value is softcap's derivative
    1 - tanh^2, for the backward's chain rule; the third the tile's visibility (rows, keys), or
    broadcastable to the block's scores with the caller's mask; None when nothing in it is hidden."""
    compute = q_block.dtype
    row_index = numpy.arange(rows.start, rows.stop)[:, None]
    s = _keys_major(k_tile @ numpy.swapaxes(q_block, -1, -2))
    s *= compute.type(p.scale)
    d_capped = None
    if p.softcap is not None:
        cap = compute.type(p.softcap)
        s /= cap
        t = numpy.tanh(s, out=s)
        d_capped = 1 - t * t
        t *= cap
    if mods.bias is not None:
        s = _added(s, _block(mods.bias, rows, keys).astype(compute, copy=False))
    if mods.slopes is not None:
        distance = numpy.abs(row_index + p.diag_offset - numpy.arange(keys.start, keys.stop)[None, :])
        s = _added(s, -(mods.slopes[..., None] * distance.astype(compute)))
    s, visible = _apply_mask(p, s, row_index, keys, mods.mask_block(rows, keys))
    return s, d_capped, visible


def _keys_major(s_transposed):
    """A (..., keys, rows) product seen as the (..., rows, keys) tile it is the transpose of.

    Tiles are computed as S^T = K Q^T and kept in that memory order, because NumPy reduces a
    contiguous row of 128 one element at a time but reduces across rows with SIMD over the
    contiguous axis: the row max of a (8, 128, 128) float32 tile took 210 us row-major, 30 us
    keys-major, against 340 us for the Q K^T product itself. Elementwise results keep their
    input's memory order, the products take either order, so the rest of the code reads as the
    math, in (rows, keys)."""
    return numpy.swapaxes(s_transposed, -1, -2)


def _added(s, x):
    """S + x, into S where x does not broadcast S to a larger shape (S is a fresh tile)."""
    if numpy.broadcast_shapes(s.shape, x.shape) != s.shape:
        return s + x
    s += x
    return s


def _key_tiles(p: Problem, rows: slice, mods: _ScoreMods | None = None):
    """Slices of BLOCK_N keys (aligned to BLOCK_N, as in the kernels) that rows may see: within
    the positional mask's key range, and not hidden whole by the caller's mask (``mods``)."""
    lo, hi = p.key_range(rows.start, rows.stop)
    first = max(lo, 0) // BLOCK_N * BLOCK_N
    for key_start in range(first, min(hi, p.seqlen_k), BLOCK_N):
        keys = slice(key_start, min(key_start + BLOCK_N, p.seqlen_k))
        mask = None if mods is None else mods.mask_block(rows, keys)
        if mask is None or mask.any():
            yield keys


def _apply_mask(p: Problem, s, row_index, keys: slice, mask=None):
    """(S with the keys hidden from each row set to -inf, the visibility: (rows, keys), or with the
    caller's ``mask`` block ANDed in, broadcastable to S); tiles seen whole pass through
    untouched, with visibility None."""
    visible = p.visible(row_index, numpy.arange(keys.start, keys.stop)[None, :])
    if mask is not None:
        visible = visible & mask
    if visible.all():
        return s, None
    if numpy.broadcast_shapes(s.shape, visible.shape) != s.shape:
        return numpy.where(visible, s, -numpy.inf), visible
    numpy.copyto(s, -numpy.inf, where=~visible)  # (in S's memory, keeping its order)
    return s, visible


def _sum_to_shape(grad, shape):
    """Sum a gradient over the axes broadcasting added or stretched, leaving ``shape``."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape))))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad
