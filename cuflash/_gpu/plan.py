"""From a resolved Problem on CuPy arrays to one kernel launch.

``forward(problem)`` is the whole GPU forward path: pick the Variant (tiles.select), bring the
inputs into a layout the kernel can read (only when they are not already), describe every
tensor by element strides over the output's leading axes, fill the params struct, launch on
CuPy's current stream. No host synchronization happens anywhere on this path.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import sys
import threading
from collections.abc import Callable

import numpy

from .. import _dropout, _spec
from . import bias_grad, decode, kernels, launch_args, tiles, tma
from .launch_args import ARGS
from .variant import HelperKernel
from .params import (ALL_KEY_ROWS, BWD_PARAMS_DTYPE, BWD_TMA_MAPS, BWD_TMA_PARAMS_DTYPE, FWD_PARAMS_DTYPE,
                     FWD_TMA_PARAMS_DTYPE, MAX_BATCH_DIMS, OTHER_KEY_ROWS, PREFIX_KEY_ROWS, TMA_MAPS, field_offset,
                     pointer_words, set_dkv_group, set_row_shape)

LOG2E = 1.4426950408889634
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


def _cupy():
    import cupy

    return cupy


def plan_constant(host: numpy.ndarray):
    """A table a plan keeps on the device for all its calls (row offsets, plane indices), from
    CuPy's own pool whatever allocator the call that plans runs under. The caller's would be wrong
    for it: in a torch call that is torch's caching allocator, and a block of torch's kept past the
    call stays in a CUDA graph's private pool when that call is a graph's warm-up (torch.compile's
    ``reduce-overhead`` refuses a pool holding a block no output owns). Inside a capture (a first
    call of its signature being captured) CuPy's pool may not allocate, so the call's own
    allocator serves. Uploaded on the call's stream, ahead of the kernels that read it."""
    cupy = _cupy()
    if cupy.cuda.get_current_stream().is_capturing():
        return cupy.asarray(host)
    with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
        return cupy.asarray(host)


# --------------------------------------------------------------------------- layouts

def _vector_ok(x, vec: int) -> bool:
    """True when ``x`` can be read with 16-byte vectors of ``vec`` elements per row chunk:
    the base address is 16-byte aligned and every stride but the last is a multiple of vec."""
    item = x.dtype.itemsize
    if x.strides[-1] != item and x.shape[-1] > 1:
        return False
    if x.data.ptr % 16:
        return False
    return all((s // item) % vec == 0 for s, n in zip(x.strides[:-1], x.shape[:-1]) if n > 1)


def _readable(x, vec: int):
    """``x`` itself when the kernel can read it in place, else an aligned, zero-padded copy.

    Only the last axis must be contiguous; batch, head and sequence strides are kernel
    arguments, so (B, L, H, D) views and broadcast axes cost nothing. A row width that is not
    a whole number of 16-byte vectors (D = 3, 59, ...) is padded with zeros once, here, so the
    kernel never needs a scalar tail path.
    """
    if _vector_ok(x, vec):
        return x
    cupy = _cupy()
    width = -(-x.shape[-1] // vec) * vec
    padded = cupy.zeros(x.shape[:-1] + (width,), dtype=x.dtype)
    padded[..., : x.shape[-1]] = x
    return padded[..., : x.shape[-1]]


def _element_strides(x, lead_shape: tuple[int, ...]) -> list[int]:
    """Strides in elements of x's leading axes over the output's leading shape (0 = broadcast).

    x's leading axes are right-aligned against lead_shape; where x has size 1 (or lacks the
    axis) the stride is 0. The head axis of k/v under GQA keeps its own stride (the kernel
    divides the query head by kv_group)."""
    item = x.dtype.itemsize
    x_lead = x.shape[:-2]
    x_strides = x.strides[:-2]
    pad = len(lead_shape) - len(x_lead)
    out = []
    for axis in range(len(lead_shape)):
        a = axis - pad
        if a < 0 or x_lead[a] == 1:
            out.append(0)
        else:
            out.append(x_strides[a] // item)
    return out


def _merge_batch_axes(shape: list[int], strides: dict[str, list[int]]):
    """Drop size-1 axes and merge neighbours that every tensor walks contiguously."""
    keep = [i for i, n in enumerate(shape) if n != 1]
    shape = [shape[i] for i in keep]
    strides = {name: [s[i] for i in keep] for name, s in strides.items()}
    i = len(shape) - 1
    while i > 0:
        if all(s[i - 1] == s[i] * shape[i] for s in strides.values()):
            shape[i - 1] *= shape[i]
            for s in strides.values():
                s[i - 1] = s[i]
                del s[i]
            del shape[i]
        i -= 1
    return shape, strides


# --------------------------------------------------------------------------- plans
#
# A plan is a call with every decision taken: the Variants and their compiled kernels, the
# grids, and the params struct's bytes but for the data pointers. The first call of a signature
# (dtypes, shapes, strides, alignment, options, device) validates, selects and builds; the API
# keeps the plan when that call needed no copies, and a repeated call then only allocates its
# outputs, writes their pointers into a copy of the bytes and launches.

class CupyMemory:
    """Where a plan's outputs and workspaces come from and which stream runs it: CuPy's memory
    pool and current stream. (The torch adapter passes torch's caching allocator and stream.)
    ``order``: the axes' order in memory (_spec.memory_order's), C order by default."""

    @staticmethod
    def empty(shape, dtype, order=None):
        return _spec.empty_in_order(_cupy().empty, shape, dtype, order)

    @staticmethod
    def zeros(shape, dtype, order=None):
        return _spec.empty_in_order(_cupy().zeros, shape, dtype, order)

    @staticmethod
    def pointer(array) -> int:
        return array.data.ptr

    @staticmethod
    def copy(target, source) -> None:
        """target[...] = source, broadcast and widened (exactly) to target's dtype."""
        target[...] = source if source.dtype == target.dtype else _widen(source, target.dtype)

    @staticmethod
    def narrow(target, source) -> None:
        """target[...] = source (float32) rounded to nearest even in target's dtype."""
        _narrow(source, out=target)

    @staticmethod
    def stream() -> int:
        return _cupy().cuda.get_current_stream().ptr


CUPY_MEMORY = CupyMemory()


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: object   # the cupy.RawKernel: keeps its module, and so `function`, loaded
    function: int    # its CUfunction handle
    grid_x: int      # the blocks launched
    grid_y: int
    threads: int
    shared_mem: int
    key_rows: int = ALL_KEY_ROWS  # FwdParams::key_rows: the rows of a key-padding mask it takes
    query_tiles: int = 0  # FwdParams::query_tiles: its query tiles per attention row


# A persistent kernel's tiles must number fewer than this (fwd_wgmma_ws.cu counts them in 32 bits).
MAX_PERSISTENT_TILES = 2**31


def _launch_of(variant, device: int, grid_x: int, length: int, tile: int, key_rows: int = ALL_KEY_ROWS) -> Launch:
    """Tiles (attention rows, tiles of ``tile`` over ``length``) of ``variant`` on ``device``: one
    block per tile, or, for a persistent Variant (tiles.persistent), at most one block per SM
    walking them (one block fills an SM: fwd_wgmma_ws takes all but a few of its registers)."""
    kernel = kernels.get_kernel(variant, device)
    grid = (grid_x, -(-length // tile))
    blocks = grid
    if tiles.persistent(variant):
        blocks = (min(grid[0] * grid[1], kernels.device_attribute("MultiProcessorCount")), 1)
    return Launch(kernel, kernel.kernel.ptr, *blocks, variant.threads, variant.shared_mem, key_rows, grid[1])


def _launch_helper(memory, kernel, blocks: int, threads: int, args) -> None:
    """One launch of a helper kernel (a ``kernels.get_kernel`` cupy.RawKernel taking scalars) on
    the memory's stream: ``args`` its pointers and 64-bit integers, a 32-bit integer in the low
    half of its slot (the driver reads 4 bytes there)."""
    if len(args) > len(ARGS.slots):
        raise ValueError(f"cuflash: a helper kernel takes at most {len(ARGS.slots)} arguments, got {len(args)}")
    ARGS.slots[: len(args)] = args
    launch_args.driver().launchKernel(kernel.kernel.ptr, blocks, 1, 1, threads, 1, 1, 0, memory.stream(),
                                      ARGS.slots_argv_ptr, 0)


_FWD_POINTERS = ("q", "k", "v", "o", "lse")
_BWD_POINTERS = tuple(f"fwd.{n}" for n in _FWD_POINTERS) + ("dout", "dq", "dk", "dv", "dq_accum", "delta")
_PACKED_POINTERS = ("cu_seqlens_q", "cu_seqlens_k", "seqused_k")  # a packed batch's, after the others
# Pointer words by (backward, packed).
_WORDS = {
    (False, False): pointer_words(FWD_PARAMS_DTYPE, _FWD_POINTERS),
    (False, True): pointer_words(FWD_PARAMS_DTYPE, _FWD_POINTERS + _PACKED_POINTERS),
    (True, False): pointer_words(BWD_PARAMS_DTYPE, _BWD_POINTERS),
    (True, True): pointer_words(BWD_PARAMS_DTYPE, _BWD_POINTERS + tuple(f"fwd.{n}" for n in _PACKED_POINTERS)),
}


# Where FwdParams (and BwdParams) sit inside each params struct, as field paths.
_FWD_PATH = {FWD_PARAMS_DTYPE: "", FWD_TMA_PARAMS_DTYPE: "fwd.", BWD_PARAMS_DTYPE: "fwd.", BWD_TMA_PARAMS_DTYPE: "bwd.fwd."}
_BWD_PATH = {BWD_PARAMS_DTYPE: "", BWD_TMA_PARAMS_DTYPE: "bwd."}
# A TMA struct's maps and the index of each one's tensor among a call's pointers (_FWD_POINTERS /
# _BWD_POINTERS order: q, k, v, ..., dout sixth).
_MAP_POINTERS = {FWD_TMA_PARAMS_DTYPE: dict(zip(TMA_MAPS, (0, 1, 2))),
                 BWD_TMA_PARAMS_DTYPE: dict(zip(BWD_TMA_MAPS, (0, 1, 2, 5)))}


def _words(dtype, backward: bool, packed: bool) -> numpy.ndarray:
    """Pointer words of a struct of ``dtype`` (_WORDS', found inside a TMA struct)."""
    path = (_BWD_PATH if backward else _FWD_PATH)[dtype]
    if not path:
        return _WORDS[backward, packed]
    names = (_BWD_POINTERS if backward else _FWD_POINTERS) + (
        tuple(("fwd." if backward else "") + n for n in _PACKED_POINTERS) if packed else ())
    return pointer_words(dtype, [path + n for n in names])


def _maps(dtype) -> tuple:
    """(byte offset, pointer index) of each tensor map of a struct of ``dtype`` (none: ())."""
    return tuple((field_offset(dtype, name), index) for name, index in _MAP_POINTERS.get(dtype, {}).items())


def _packed_pointers(memory, packed) -> tuple:
    """cu_seqlens_q, cu_seqlens_k and seqused_k's pointers (0 for no seqused_k) of a replayed
    packed call; ``packed`` is () for a dense one."""
    return tuple(0 if x is None else memory.pointer(x) for x in packed)


def _packed_shape(shape) -> tuple:
    """A packed batch's (tokens, H, D) allocation of the heads-first (H, tokens, D) ``shape``."""
    return (shape[1], shape[0]) + tuple(shape[2:])


class _Plan:
    """Launches sharing one params struct, replayable with other data pointers. ``maps``: the
    struct's tensor maps (FwdTmaParams) as (byte offset, index of the pointer among a call's
    pointers), each re-pointed at its tensor per call."""

    def __init__(self, struct, words: numpy.ndarray, launches: tuple[Launch, ...], score_inputs=None, per_row=None):
        self.template = numpy.frombuffer(struct.tobytes(), dtype=numpy.uint8).copy()
        self.maps = _maps(struct.dtype)
        # With a bias or mask, a call's pointers go on with ScoreInputs.prepare's; with ALiBi
        # slopes or sinks, then with PerRowInputs.prepare's.
        self.score_inputs, self.per_row = score_inputs, per_row
        fwd = _FWD_PATH[struct.dtype]
        for inputs in (score_inputs, per_row):
            if inputs is not None:
                words = numpy.concatenate([words, pointer_words(struct.dtype, [fwd + n for n in inputs.POINTERS])])
        self.words = words
        self.launches = launches
        self.key_rows_at = field_offset(struct.dtype, fwd + "key_rows") // 4
        self.query_tiles_at = field_offset(struct.dtype, fwd + "query_tiles") // 4
        # A plan of a call with dropout takes each call's seed (its rate is the plan's: in its key).
        threshold_at = field_offset(struct.dtype, fwd + "dropout_threshold")
        drops = int(self.template[threshold_at:threshold_at + 4].view(numpy.uint32)[0]) != 0
        self.seed_word = field_offset(struct.dtype, fwd + "dropout_seed") // 8 if drops else None

    def _modifier_pointers(self, memory, bias, mask, alibi_slopes, sinks, reuse=None,
                           keep=None) -> tuple[tuple, tuple]:
        """(the pointers ScoreInputs and PerRowInputs give for this call, the arrays they point
        into: to be kept until the launches are queued). ``reuse``: ScoreInputs.prepare's;
        ``keep``: a list that gets this call's ScoreInputs result as a ``Prepared`` (where small)."""
        pointers, kept = (), ()
        if self.score_inputs is not None:
            pointers, kept = self.score_inputs.prepare(memory, bias, mask, reuse)
            if keep is not None:
                prepared = Prepared(self.score_inputs.signature, pointers, kept)
                if prepared.small():
                    keep.append(prepared)
        if self.per_row is not None:
            rows = self.per_row.prepare(memory, alibi_slopes, sinks)
            pointers, kept = pointers + tuple(0 if x is None else memory.pointer(x) for x in rows), kept + rows
        return pointers, kept

    def _refuse(self, memory, dropout_seed) -> None:
        """A replay's refusals, made before it allocates, prepares or launches anything: a seed it
        was not made for (or none where it needs one), a dropping replay on a capturing stream
        (_refuse_captured_dropout's case: the graph would freeze one keep mask)."""
        _dropout.check_replay_seed(self.seed_word is not None, dropout_seed)
        if dropout_seed is not None and _cupy().cuda.runtime.streamIsCapturing(memory.stream()):
            raise RuntimeError(CAPTURED_DROPOUT)

    def _run(self, memory, pointers, dropout_seed=None) -> None:
        stream = memory.stream()
        ARGS.bytes[: self.template.size] = self.template
        ARGS.words[self.words] = pointers
        if dropout_seed is not None:
            ARGS.words[self.seed_word] = dropout_seed
        if self.maps:
            base = ARGS.bytes_ptr
            for offset, index in self.maps:
                tma.replace_address_in_place(base + offset, pointers[index])
        launch_kernel = launch_args.driver().launchKernel
        for launch in self.launches:
            ARGS.ints[self.key_rows_at] = launch.key_rows  # the driver copies the params at each launch
            ARGS.ints[self.query_tiles_at] = launch.query_tiles
            launch_kernel(launch.function, launch.grid_x, launch.grid_y, 1, launch.threads, 1, 1, launch.shared_mem,
                          stream, ARGS.argv_ptr, 0)


class ForwardPlan(_Plan):
    """The forward's launch (two under a split key-padding mask: ``_splits_key_padding``):
    ``run(memory, q, k, v)`` allocates out and lse and returns them. A
    packed batch's plan takes ``cu_seqlens_q, cu_seqlens_k, seqused_k`` (None: not given) after
    v and returns out in the packed layout (total_q, Hq, Dv), lse (Hq, total_q)."""

    def __init__(self, p, struct, launches: tuple[Launch, ...], score_inputs=None, per_row=None):
        packed = p.packed is not None
        super().__init__(struct, _words(struct.dtype, False, packed), launches, score_inputs, per_row)
        self.out_shape = _packed_shape(p.out_shape) if packed else p.out_shape
        self.out_order = _out_order(p, p.out_shape)
        self.lse_shape = p.lse_shape
        self.dtype, self.lse_dtype = p.dtype, p.lse_dtype
        # Backward plans that followed this one, by what their keys hold beyond its own (the
        # torch adapter's: cuflash.torch._backward): no whole-signature key built per backward.
        self.followers = {}

    def run(self, memory, q, k, v, *packed, bias=None, mask=None, alibi_slopes=None, sinks=None, keep=None,
            dropout_seed=None):
        """``keep``: a list that gets the bias's and mask's preparation for the backward
        (``Prepared``), where the call has either and they are small; ``dropout_seed``: this call's
        (a plan of a call with dropout: its key holds the rate)."""
        self._refuse(memory, dropout_seed)
        o = memory.empty(self.out_shape, self.dtype, self.out_order)
        lse = memory.empty(self.lse_shape, self.lse_dtype)
        ptr = memory.pointer
        scores, kept = self._modifier_pointers(memory, bias, mask, alibi_slopes, sinks, keep=keep)
        self._run(memory, (ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse)) + _packed_pointers(memory, packed) + scores,
                  dropout_seed)
        del kept  # (the launch is queued)
        return o, lse


class BackwardPlan(_Plan):
    """The backward's launches (delta, dK/dV, dQ or its conversion; dK/dV and dQ twice under a
    split key-padding mask): ``run(memory, dout, q, k, v, out, lse)`` allocates the
    gradients (in q's, k's and v's shapes: no sum is left to do) and one workspace (delta, then
    dq_accum unless deterministic: ``_workspace``). A packed batch's plan takes cu_seqlens_q,
    cu_seqlens_k and seqused_k after lse, and allocates the gradients in the packed layout
    (``zeroed``: those whose unstored rows must read 0, the keys past seqused_k)."""

    def __init__(self, struct, launches, shapes: dict, dtype, accum, workspace: tuple[int, int | None], *,
                 packed: bool = False, zeroed: tuple[str, ...] = (), score_inputs=None, per_row=None, dbias=None,
                 orders=None, dkv_sums=None):
        super().__init__(struct, _words(struct.dtype, True, packed), launches, score_inputs, per_row)
        self.shapes, self.dtype, self.accum = shapes, dtype, accum
        self.orders = orders or {}  # each gradient's memory order: its input's (_gradient_buffer)
        self.dkv_sums = dkv_sums  # a split GQA group's dK/dV sums (_DkvSums), or None
        self.workspace_size, self.dq_accum_offset = workspace
        self.zeroed = zeroed
        # With a bias's gradient: (the shape of what the kernels write, dS or bwd_dbias_tc's
        # partial sums; whether it starts zeroed; its _BiasGradient; the params field that points
        # at it; arrays the launches read, kept with the plan).
        self.dbias = dbias
        if dbias is not None:
            self.words = numpy.concatenate([self.words, pointer_words(struct.dtype, [_BWD_PATH[struct.dtype] + dbias[3]])])

    def run(self, memory, dout, q, k, v, o, lse, *packed, bias=None, mask=None, alibi_slopes=None, sinks=None,
            prepared=None, dropout_seed=None):
        """``prepared``: the forward's ``Prepared`` for this bias and mask (ForwardPlan.run's
        ``keep``), reused where it fits this plan; ``dropout_seed`` as ForwardPlan.run's."""
        self._refuse(memory, dropout_seed)
        ptr, shapes = memory.pointer, self.shapes

        def allocate(name):
            return (memory.zeros if name in self.zeroed else memory.empty)(shapes[name], self.dtype,
                                                                         self.orders.get(name))

        dq = allocate("dq")
        # (a split group's fp32 sums: rounded into dK, dV after the launches)
        dk, dv = self.dkv_sums.allocate(memory) if self.dkv_sums else (allocate("dk"), allocate("dv"))
        # Held until the launches are queued: freed at once, its memory would go to the next
        # allocation of this call (a bias or mask copy, dS), which the kernels then overwrite.
        workspace = memory.empty((self.workspace_size,), self.accum)
        delta = ptr(workspace)
        dq_accum = 0 if self.dq_accum_offset is None else delta + self.dq_accum_offset
        scores, kept = self._modifier_pointers(memory, bias, mask, alibi_slopes, sinks, reuse=prepared)
        dscores = None
        if self.dbias is not None:
            dscores = (memory.zeros if self.dbias[1] else memory.empty)(self.dbias[0], self.accum)
        self._run(memory, (ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse), ptr(dout), ptr(dq), ptr(dk), ptr(dv),
                           dq_accum, delta) + _packed_pointers(memory, packed) + scores
                  + (() if dscores is None else (ptr(dscores),)), dropout_seed)
        del kept, workspace  # (the launches are queued)
        if self.dkv_sums:
            dk, dv = self.dkv_sums.round(memory, dk, dv, self.dtype, self.orders)
        if dscores is None:
            return dq, dk, dv
        return dq, dk, dv, self.dbias[2].run(memory, dscores)


@dataclasses.dataclass(frozen=True)
class _DkvSums:
    """dK and dV of a GQA group whose query heads are split over blocks that add into them
    (BwdParams::dkv_adds): sums in the accumulation type (_accum: fp32, fp64 for float64) in k's
    and v's shapes, one zeroed buffer (v's part on a 256-byte boundary), rounded into the
    gradients after the launches."""

    k_shape: tuple
    v_shape: tuple
    accum: numpy.dtype

    def allocate(self, memory):
        k_size, v_size = math.prod(self.k_shape), math.prod(self.v_shape)
        v_start = -(-k_size * self.accum.itemsize // 256) * 256 // self.accum.itemsize
        sums = memory.zeros((v_start + v_size,), self.accum)
        return sums[:k_size].reshape(self.k_shape), sums[v_start:].reshape(self.v_shape)

    def round(self, memory, dk_sums, dv_sums, dtype, orders):
        """dK and dV in ``dtype``, laid out in ``orders`` (each its input's). Sums already in
        ``dtype`` and in C order (float32, float64 inputs) are the gradients themselves."""
        grads = []
        for name, sums in (("dk", dk_sums), ("dv", dv_sums)):
            order = orders.get(name)
            if self.accum == dtype and order is None:
                grads.append(sums)
                continue
            grad = memory.empty(tuple(sums.shape), dtype, order)
            memory.narrow(grad, sums)
            grads.append(grad)
        return tuple(grads)


def _workspace(delta_size: int, dq_accum_size: int | None, accum) -> tuple[int, int | None]:
    """(elements, byte offset of dq_accum or None) of the backward's one workspace: delta
    (lead..., Lq), then dq_accum (rows, Lq, D) on a 256-byte boundary."""
    if dq_accum_size is None:
        return delta_size, None
    offset = -(-delta_size * accum.itemsize // 256) * 256
    return offset // accum.itemsize + dq_accum_size, offset


# Plans by call signature (``signature``, or the torch adapter's own keys). Bounded: a program
# that calls with ever new shapes (varying sequence lengths) must not grow it without end.
PLANS: dict = {}
_MAX_PLANS = 4096
_PLANS_LOCK = threading.Lock()  # for the eviction: lookups need none (a dict read is atomic)


# Families of plans (decode.DenseDecodeFamily), by their calls' signature less k's and v's key
# count and strides (family_key): a decoding loop's next step, one key more in new arrays, is
# planned from its family without the full path.
FAMILIES: dict = {}


def remember(key, plan) -> None:
    if key is None or plan is None:
        return
    family = getattr(plan, "family", None)
    with _PLANS_LOCK:
        if len(PLANS) >= _MAX_PLANS:
            PLANS.pop(next(iter(PLANS)))  # the oldest entry
        PLANS[key] = plan
        if family is not None:
            if len(FAMILIES) >= _MAX_PLANS:
                FAMILIES.pop(next(iter(FAMILIES)))
            FAMILIES[family_key(key)] = family


def family_key(key) -> tuple:
    """A forward key (``signature``'s, or the torch adapter's of the same parts) less k's and v's
    key count (axis -2) and strides: ``(kind, options, q, k, v, ...)`` with each of k and v as
    (dtype, shape less Lk, the rest: alignment, device)."""
    kind, options, q, k, v = key[:5]
    return (kind, options, q) + tuple((x[0], tuple(x[1][:-2]) + tuple(x[1][-1:])) + tuple(x[3:]) for x in (k, v)) + (
        key[5:])


def family_plan(key, lengths, strides):
    """The plan of a forward call of ``key`` from its family (None: none, or one that cannot plan
    it): ``lengths`` and ``strides`` (in elements) of its k and v. Kept under ``key`` too."""
    family = FAMILIES.get(family_key(key))
    plan = None if family is None else family.plan_for(lengths, strides)
    if plan is not None:
        remember(key, plan)
    return plan


def kept_plan(key, k, v, element_strides):
    """The plan kept under ``key``, else, for a forward's key where plans were made by family (a
    decoding loop: one key more than a call before), its family's for k's and v's key counts and
    ``element_strides(k, v)`` (their strides in elements; None: not whole elements, no plan). The
    lookup of every planned call, CuPy's and the torch adapter's (each with its arrays' strides)."""
    plan = PLANS.get(key)
    if plan is None and FAMILIES and key[0] == "attention":
        strides = element_strides(k, v)
        if strides is not None:
            plan = family_plan(key, (k.shape[-2], v.shape[-2]), strides)
    return plan


def forget() -> None:
    """Drop every plan and compiled kernel of this process (the next calls rebuild them)."""
    PLANS.clear()
    FAMILIES.clear()
    kernels.forget()


def signature(kind: str, arrays, options) -> tuple | None:
    """The plan-cache key of a call on CuPy arrays: what decides its launches (the arrays' dtypes,
    shapes and strides, whether each base address is 16-byte aligned, the options, the current
    device), or None when an input is not a plain cupy.ndarray or not on the current device.
    Alignment is per array: a bias read in place and a q that needs copying must not share a key
    with the reverse (one flag for all would let the second call replay the first's plan and
    read the misaligned q in place)."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    ndarray = cupy.ndarray
    if any(type(x) is not ndarray for x in arrays):
        return None
    parts = [kind, options]
    device = cupy.cuda.runtime.getDevice()
    for x in arrays:
        memory = x.data
        if memory.device_id != device:  # the full path makes the arrays' device current (on_arrays_device)
            return None
        parts.append((x.dtype, x.shape, x.strides, memory.ptr % 16 == 0))
    parts.append(device)
    return tuple(parts)


def on_arrays_device(function):
    """Run ``function(problem, ...)`` with the problem's arrays' device current: kernels load for
    that device and launch on its current stream, outputs are allocated there, whichever device
    the caller had current (restored after). Calls whose arrays sit on the current device (the
    common case, and the only one a plan replays: ``signature``) pay one comparison."""
    @functools.wraps(function)
    def run(problem, *args, **kwargs):
        if problem.xp is numpy:  # not the GPU's: the function refuses it on its own terms
            return function(problem, *args, **kwargs)
        with kernels.made_current(problem.q.data.device_id):
            return function(problem, *args, **kwargs)
    return run


# --------------------------------------------------------------------------- forward

@on_arrays_device
def forward(problem, *, prefetch_backward: bool | None = None):
    """Run the forward on the GPU: ``(out, lse, plan)`` with CuPy arrays in the output shapes.

    ``prefetch_backward``: a backward will follow (inputs that require grad), so its kernels start
    compiling in the background beside the forward's own, where they are not built yet: False for
    the atomic backward's, True for the deterministic one's; None: no backward is expected.

    ``plan`` replays this call for any inputs of the same signature (``ForwardPlan.run``), or is
    None when this call needed something a replay would not redo (copies of unaligned inputs, a
    padded output, out=, an empty problem).
    """
    cupy = _cupy()
    p = problem
    _refuse_captured_dropout(cupy, p)
    out_shape, lse_shape = p.out_shape, p.lse_shape
    out = p.out
    mods = _modifies_scores(p)

    rows = math.prod(p.lead_shape) * p.seqlen_q
    if rows == 0 or p.seqlen_k == 0:
        # Nothing to compute, or no key at all: every row sees nothing (0, and -inf or its sink).
        lse = cupy.empty(lse_shape, dtype=p.lse_dtype)
        o = out if out is not None else _fresh_out(p, out_shape)
        o[...] = 0
        if p.sinks is None:
            lse[...] = -numpy.inf
        else:
            lse[...] = _per_row(p.sinks, p.lead_shape, p.lse_dtype).reshape(tuple(p.lead_shape) + (1,))
        return o, lse, None

    q, k, v = p.q, p.k, p.v
    # A zero-width head dim is the formula's edge, not an error: one zero column gives the
    # same scores (all 0) or the same empty output, so the kernel never sees width 0.
    if p.head_dim == 0:
        q = cupy.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
        k = cupy.zeros(k.shape[:-1] + (1,), dtype=k.dtype)
    if p.head_dim_v == 0:
        v = cupy.zeros(v.shape[:-1] + (1,), dtype=v.dtype)
        out_shape = out_shape[:-1] + (1,)
        out = None

    device = cupy.cuda.Device().id
    arch = _arch(device)

    short = _short_rows(p)

    def choose(tma_ok: bool):
        return _key_row_sets(p, lambda modified: tiles.select(p.dtype.name, q.shape[-1], v.shape[-1], p.has_window,
                                                              arch, _mean_visible_keys(p), modified, p.precision,
                                                              tma_ok, short, dropout))
    dropout = p.dropout_seed is not None
    if prefetch_backward is not None:
        backward_variants = tiles.select_backward(p.dtype.name, q.shape[-1], v.shape[-1], p.has_window, arch, mods,
                                                  p.precision, short=short, dropout=dropout)
        dq_direct = _stores_dq(p, [(backward_variants, None)], _longest(p)[1])
        kernels.prefetch(_backward_kernels(backward_variants, prefetch_backward, dq_direct), device)
    if decode.dense_reason(p) is None:  # a few query rows a head: the decode kernel (decode.py says why)
        return decode.dense_forward(p, CUPY_MEMORY, _fresh_out(p, out_shape), _out_order(p, out_shape))
    sets = choose(True)
    variant = sets[-1][0]  # the modifier Variant when there is one
    vec = 16 // p.dtype.itemsize
    inputs = (q, k, v)
    q, k, v = (_readable(x, vec) for x in inputs)
    plain = all(a is b for a, b in zip(inputs, (q, k, v))) and p.head_dim * p.head_dim_v > 0

    # The kernel writes o in place when the caller's out= (or our own allocation) allows it; a
    # packed batch's own allocation is in the packed layout, as its callers return it.
    target = out if out is not None and _vector_ok(out, vec) else None
    o = target if target is not None else _fresh_out(p, out_shape)
    if not _vector_ok(o, vec):  # only a fresh allocation of an odd width gets here
        o = _store_buffer(out_shape, out_shape[-1], p.dtype, vec)  # padded rows; nothing read before written
        plain = False
    lse = cupy.empty(lse_shape, dtype=p.lse_dtype)

    tensors = {"q": q, "k": k, "v": v, "o": o, "lse": lse}
    layout = _Layout(p, tensors, variant.block_m)
    # One struct serves every launch (a kernel taking FwdParams reads FwdTmaParams' first part),
    # so the TMA launches must share one tile: their maps' boxes.
    tma_launches = [f for f, _ in sets if tiles.SPECS[f.kernel].tma]
    maps = None
    if tma_launches:
        tiles_total = layout.grid_x * -(-_longest(p)[0] // tma_launches[0].block_m)
        if len({(f.block_m, f.block_n) for f in tma_launches}) == 1 and tiles_total < MAX_PERSISTENT_TILES:
            maps = _tensor_maps(p, layout, tma_launches[0])
        if maps is None:  # a layout the maps cannot describe
            sets = choose(False)
            variant = sets[-1][0]
            layout = _Layout(p, tensors, variant.block_m)
    kernels.prefetch([f for f, _ in sets], device)
    launches = tuple(_launch_of(f, device, layout.grid_x, _longest(p)[0], f.block_m, rows) for f, rows in sets)
    struct = _fwd_struct(p, layout, q, v, None if maps is None else maps[1])
    slopes, sinks, score_inputs, scores, kept = _fill_score_mods(struct, p)  # kept alive until the launch is queued
    if maps is not None:
        struct = _with_tensor_maps(struct, maps[0], (q, k, v))
    # A replay redoes the bias and mask (ScoreInputs.prepare) and the per-row slopes and sinks
    # (PerRowInputs.prepare).
    per_row = PerRowInputs.of(p)
    plan = ForwardPlan(p, struct, launches, score_inputs, per_row)
    plan._run(CUPY_MEMORY, tuple(x.data.ptr for x in (q, k, v, o, lse)) + _packed_pointers(CUPY_MEMORY, _packed_arrays(p))
              + scores + PerRowInputs.pointers(per_row, slopes, sinks), p.dropout_seed)
    del slopes, sinks, kept
    if p.head_dim_v == 0:
        o = p.out if p.out is not None else o[..., :0]
    elif out is not None and o is not out:
        out[...] = o
        o = out
    elif not _stored(p, o).flags.c_contiguous and (p.packed is not None or _spec.array_order(o) is None):
        # a padded buffer for an odd Dv: return a plain array (one in q's memory order is one)
        o = cupy.ascontiguousarray(o) if p.packed is None else _stored(p, cupy.ascontiguousarray(_stored(p, o)))
    return o, lse, (plan if plain and out is None else None)


CAPTURED_DROPOUT = ("cuflash: attention dropout inside a CUDA graph capture would replay the captured keep mask at "
                    "every replay (the seed is fixed when the graph is captured); run calls with dropout_p > 0 outside "
                    "the graph (torch.compile: not mode='reduce-overhead'), or pass dropout_p=0")


def _refuse_captured_dropout(cupy, p) -> None:
    """A call with dropout is refused while the stream captures a CUDA graph: its seed is a kernel
    argument fixed at capture, so every replay would drop the same probabilities (a training step
    whose masks never change), silently. (A kept plan's replay refuses it in ``_Plan._run``.)"""
    if p.dropout_seed is not None and cupy.cuda.get_current_stream().is_capturing():
        raise RuntimeError(CAPTURED_DROPOUT)


def _tensor_maps(p, layout: _Layout, variant, names=("q", "k", "v"), kv_group: int | None = None) -> tuple | None:
    """``(specs, kv_group)``: the TensorMapSpecs of q, k and v for a TMA Variant (fwd_wgmma_ws),
    4-d, innermost first (head dim, rows, heads, batch), boxes of 64 columns (one 128-byte
    swizzled panel) by the Variant's query or key tile, and the query heads per key/value head the
    kernel divides by (a key/value head axis broadcast to every query head is one head shared by
    all: MQA; the backward passes its own, _shared_kv_heads'). ``names``: the tensors, k and v read
    by the key tile, the others (q, dout) by the query tile. None where maps cannot describe the
    call: batch axes that do not merge into one, any other broadcast (stride 0) axis, or a stride
    the copy engine cannot take (a packed batch's maps span all its tokens: fwd_wgmma_ws.cu)."""
    packed = p.packed is not None
    # A packed batch's sequence axis (the last batch axis, stride 0) is no map axis: the kernel
    # adds each sequence's first row (cu_seqlens) to the rows.
    batch_axes = layout.batch_shape[:-1] if packed else layout.batch_shape
    if len(batch_axes) > (0 if packed else 1):
        return None
    batch = batch_axes[0] if batch_axes else 1
    if kv_group is None:
        kv_group = p.kv_group
        if kv_group == 1 and layout.heads["k"] == 0 and layout.heads["v"] == 0:
            kv_group = layout.num_heads  # (FwdParams' offsets are the same: head / kv_group times 0)
    kv_heads = layout.num_heads // kv_group
    specs = []
    for name in names:
        heads, box_rows = (kv_heads, variant.block_n) if name in ("k", "v") else (layout.num_heads, variant.block_m)
        x = layout.tensors[name]
        item = x.dtype.itemsize
        axes = ((x.shape[-2], x.strides[-2]), (heads, layout.heads[name] * item),
                (batch, layout.batch_strides[name][0] * item if batch_axes else 0))
        if any(n > 1 and not (0 < stride < 2**40 and stride % 16 == 0) for n, stride in axes):
            return None
        strides = tuple(stride if n > 1 else 16 for n, stride in axes)  # a length-1 axis is never stepped
        specs.append(tma.TensorMapSpec(p.dtype.name, (x.shape[-1],) + tuple(n for n, _ in axes), strides,
                                       (64, box_rows, 1, 1), swizzle=128))
    return tuple(specs), kv_group


def _with_tensor_maps(struct, specs, arrays):
    """FwdTmaParams or BwdTmaParams: ``struct`` (FwdParams or BwdParams) and the maps of
    ``specs`` at the arrays' addresses."""
    backward = struct.dtype == BWD_PARAMS_DTYPE
    s = numpy.zeros((), dtype=BWD_TMA_PARAMS_DTYPE if backward else FWD_TMA_PARAMS_DTYPE)
    s["bwd" if backward else "fwd"] = struct
    for name, spec, x in zip(BWD_TMA_MAPS if backward else TMA_MAPS, specs, arrays):
        s[name] = numpy.frombuffer(tma.encode(spec, x.data.ptr), dtype=numpy.uint64)
    return s


def _fresh_out(p, shape):
    """A new output of ``shape``: a packed batch's in the packed layout (tokens, H, Dv), as its
    callers return it, seen heads-first; a dense one in q's memory order (_out_order)."""
    cupy = _cupy()
    if p.packed is None:
        return CUPY_MEMORY.empty(shape, p.dtype, _out_order(p, shape))
    return _stored(p, cupy.empty(_packed_shape(shape), dtype=p.dtype))


def _out_order(p, shape) -> tuple[int, ...] | None:
    """The memory order of a dense call's output of ``shape``: q's (_spec.result_order)."""
    return None if p.packed is not None else _spec.result_order(p.q, shape, p.dtype.itemsize)


def _packed_arrays(p) -> tuple:
    """A packed batch's cu_seqlens_q, cu_seqlens_k and seqused_k (or None): the pointers a
    replayed plan writes after the others; () for a dense call."""
    if p.packed is None:
        return ()
    return p.packed.cu_seqlens_q, p.packed.cu_seqlens_k, p.packed.seqused_k


def _stored(p, x):
    """The array as the call stores it: a packed batch's (H, tokens, D) view as its (tokens, H, D)
    buffer; a dense call's as it is."""
    return x if p.packed is None else x.transpose(1, 0, 2)


def _modifies_scores(p) -> bool:
    """Softcap, a bias, ALiBi, a mask or dropout: the kScoreMods Variants run (the plain ones
    compile no dropout: dropout.cuh). Sinks alone run on the plain ones (every forward kernel
    starts its softmax from a sink; the backward needs nothing of them)."""
    return (p.softcap is not None or p.alibi_slopes is not None or p.bias is not None or p.mask is not None
            or p.dropout_seed is not None)


def _per_row(x, lead_shape, dtype):
    """A per-(batch..., head) array (ALiBi slopes, sinks) as one contiguous value per attention row
    (the output's leading axes flattened in C order, the kernels' row index bh), in ``dtype``."""
    cupy = _cupy()
    return cupy.ascontiguousarray(cupy.broadcast_to(_widen(x, dtype), tuple(lead_shape))).reshape(-1)


def _fill_score_mods(struct, p) -> tuple:
    """Write the score modifiers into a forward struct (cuda_src/score_mod.cuh): softcap, the
    per-row slopes and sinks in the kernels' score type (float32, float64 for float64), and the
    bias and mask (``ScoreInputs``). Returns ``(slopes, sinks, inputs, pointers, kept)``: the
    per-row slopes and sinks, the bias and mask's ScoreInputs (None without), the pointers it
    wrote (ScoreInputs.POINTERS' values, the tail of a replay's pointers; () without) and the
    arrays the bias and mask are read from; all must stay alive until the launch is queued."""
    if not (p.has_score_mods or p.bias is not None or p.mask is not None):
        return None, None, None, (), ()
    accum = _accum(p)
    slopes, sinks = (None if x is None else _per_row(x, _row_shape(p), accum) for x in (p.alibi_slopes, p.sinks))
    struct["softcap"] = 0.0 if p.softcap is None else p.softcap
    struct["alibi_slopes"] = 0 if slopes is None else slopes.data.ptr
    struct["sinks"] = 0 if sinks is None else sinks.data.ptr
    if p.bias is None and p.mask is None:
        return slopes, sinks, None, (), ()
    inputs = ScoreInputs(p)
    inputs.fill(struct)
    pointers, kept = inputs.prepare(CUPY_MEMORY, p.bias, p.mask)
    for name, pointer in zip(ScoreInputs.POINTERS, pointers):
        struct[name] = pointer
    return slopes, sinks, inputs, pointers, kept


_INT32_MAX = 2**31 - 1


class PerRowInputs:
    """A call's ALiBi slopes and sinks as the kernels read them (``_per_row``: one contiguous value
    per attention row, in the score type), made again by every call (``prepare``, from CuPy arrays
    or torch tensors alike: ``memory``) so that a plan replays calls that have them. What a
    signature fixes: which of the two there are, the rows' shape and the type."""

    POINTERS = ("alibi_slopes", "sinks")  # the FwdParams fields ``prepare`` gives, in order

    def __init__(self, p):
        self.shape, self.dtype = _row_shape(p), _accum(p)
        self.present = (p.alibi_slopes is not None, p.sinks is not None)

    @classmethod
    def of(cls, p):
        """The call's PerRowInputs, or None when it has neither slopes nor sinks."""
        return cls(p) if p.alibi_slopes is not None or p.sinks is not None else None

    def prepare(self, memory, alibi_slopes, sinks) -> tuple:
        """This call's per-row slopes and sinks (None for one the signature has not), made on
        ``memory``'s stream: to be kept until the launches are queued."""
        rows = []
        for x, present in zip((alibi_slopes, sinks), self.present):
            row = None
            if present:
                row = memory.empty(self.shape, self.dtype)
                memory.copy(row, x)
            rows.append(row)
        return tuple(rows)

    @staticmethod
    def pointers(per_row, *rows) -> tuple:
        """The POINTERS' values of per-row arrays ``rows`` (CuPy; None: 0), or () without
        PerRowInputs (the planning call's launch, whose arrays _fill_score_mods made)."""
        if per_row is None:
            return ()
        return tuple(0 if x is None else x.data.ptr for x in rows)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One call's ScoreInputs.prepare result, kept by the torch adapter from a forward to its
    backward (the same bias and mask, saved by autograd, which refuses them modified in place in
    between): the copies and the key-padding cut are made once per training step, not twice."""

    signature: tuple  # the ScoreInputs' that made it
    pointers: tuple
    arrays: tuple     # what the pointers point into: held as long as this

    # Kept from the forward to the backward where what it holds (copies, or the caller's own
    # planes) is at most this many bytes: small copies cost mostly host time (two launches
    # each); a large copy's memory would be held through the rest of the model's forward.
    MAX_BYTES = 16 << 20

    def small(self) -> bool:
        return sum(x.nbytes for x in self.arrays if x is not None) <= self.MAX_BYTES


class ScoreInputs:
    """A call's bias and mask as the kernels read them (params.cuh), split into what a signature
    fixes and what each call brings. Fixed (``fill``): each plane's ``_PlaneLayout``, its query and
    key strides in that layout, each attention row's element offset into the planes
    (``score_rows``, on the device, kept here) and the key-padding cut's kernel. Per call
    (``prepare``, on CuPy arrays or torch tensors alike: ``memory``): the planes' pointers (the
    caller's arrays, or their copies where the layout needs one: the same decision for every call
    of a signature, which covers dtypes, shapes, strides and alignment), a key-padding mask's
    cut (``_key_bounds``) and a 2-D mask's tile spans (``_mask_spans``), both computed on the device.
    Broadcast axes cost no copy."""

    POINTERS = ("bias", "mask", "key_bounds", "mask_spans")  # the FwdParams fields ``prepare`` gives, in order

    def __init__(self, p):
        cupy = _cupy()
        self.seqlen_q, self.seqlen_k = p.seqlen_q, p.seqlen_k
        self.count = math.prod(p.lead_shape)
        lead = tuple(p.lead_shape)
        self.layouts, self.strides, offsets, laid = {}, {}, [], {}
        for name, x, dtype in (("bias", p.bias, _accum(p)), ("mask", p.mask, None)):
            offset = numpy.zeros(lead, dtype=numpy.int64)
            if x is not None:
                layout = self.layouts[name] = _PlaneLayout.of(x, dtype or x.dtype, self.seqlen_q, self.seqlen_k)
                laid[name] = layout.lay_out(CUPY_MEMORY, x)
                strides = _broadcast_strides(layout.view(x) if layout.staged is None else laid[name])
                pad = len(lead) - (len(strides) - 2)
                for axis, stride in enumerate(strides[:-2]):
                    if stride:
                        size = lead[pad + axis]
                        offset = offset + (numpy.arange(size, dtype=numpy.int64) * stride).reshape(
                            (size,) + (1,) * (len(lead) - pad - axis - 1))
                self.strides[name] = strides[-2:]
            offsets.append(offset)
        self.score_rows = plan_constant(numpy.stack([o.reshape(-1) for o in offsets], axis=-1))  # (rows, 2)
        self.bounds_kernel = None
        if _pads_keys(p):
            spec = HelperKernel("key_bounds", "key_bounds", None, _arch(cupy.cuda.Device().id), _KEY_BOUNDS_THREADS)
            self.bounds_kernel = kernels.get_kernel(spec)
        self.tiles_kernel = None
        if _maps_mask_tiles(p):
            # The distinct mask planes among the attention rows (heads share theirs: _maps_mask_tiles)
            # and each row's: the spans are made once per plane.
            plane_offsets, plane_of_row = numpy.unique(offsets[1].reshape(-1), return_inverse=True)
            self.mask_plane_offsets = plan_constant(plane_offsets.astype(numpy.int64))
            self.mask_tile_planes = plan_constant(plane_of_row.reshape(-1).astype(numpy.int32))
            self.mask_tile_shape = (plane_offsets.size, -(-self.seqlen_q // MASK_TILE), -(-self.seqlen_k // MASK_TILE))
            spec = HelperKernel("mask_tiles", "mask_tiles", None, _arch(cupy.cuda.Device().id), _MASK_TILES_THREADS)
            self.tiles_kernel = kernels.get_kernel(spec)
        # The planes just laid out serve the constructing call's own prepare (a copy is not made
        # twice); taken there, and never kept past it.
        self._first = (p.bias, p.mask, laid)
        # What another ScoreInputs must share for its prepare's result to serve this one's calls
        # (``prepare``'s ``reuse``): the same layouts, the same cut, the same tile spans.
        self.signature = (tuple(sorted(self.layouts.items())), self.bounds_kernel is not None,
                          self.tiles_kernel is not None)

    def fill(self, struct) -> None:
        """The fixed fields: strides, score_rows and the tile spans' plane table and shape."""
        for name, (row_stride, col_stride) in self.strides.items():
            struct[f"{name}_row_stride"], struct[f"{name}_col_stride"] = row_stride, col_stride
        struct["score_rows"] = self.score_rows.data.ptr
        if self.tiles_kernel is not None:
            struct["mask_tile_planes"] = self.mask_tile_planes.data.ptr
            struct["mask_tile_rows"], struct["mask_tile_cols"] = self.mask_tile_shape[1:]

    def prepare(self, memory, bias, mask, reuse=None) -> tuple[tuple[int, int, int, int], tuple]:
        """(the POINTERS' values, the arrays they point into) for this call's bias and mask, any
        copy, the cut and the tile spans allocated from ``memory`` and made on its stream.
        ``reuse``: a ``Prepared`` of another plan for the same bias and mask (a forward's, handed
        to its backward), taken where its signature is this one's: nothing made again."""
        if reuse is not None and reuse.signature == self.signature:
            return reuse.pointers, reuse.arrays
        first, self._first = self._first, None
        if first is not None and first[0] is bias and first[1] is mask:
            planes = (first[2].get("bias"), first[2].get("mask"))
        else:
            planes = tuple(None if x is None else self.layouts[name].lay_out(memory, x)
                           for name, x in (("bias", bias), ("mask", mask)))
        pointers = tuple(0 if x is None else memory.pointer(x) for x in planes)
        bounds = None if self.bounds_kernel is None else _key_bounds(memory, self, pointers[1])
        spans = None if self.tiles_kernel is None else _mask_spans(memory, self, pointers[1])
        made = (bounds, spans)
        return pointers + tuple(0 if x is None else memory.pointer(x) for x in made), planes + made


@dataclasses.dataclass(frozen=True)
class _PlaneLayout:
    """How every call of a signature lays a bias (in the kernels' score type ``dtype``) or mask out
    for the kernels that stage its tiles in shared memory with 16-byte copies (score_mod.cuh's
    ScorePlaneStage): the key axis contiguous, the base and every stride of a non-broadcast axis
    a multiple of 16 bytes, query and key strides below 2^31 elements. A broadcast axis (stride 0,
    or 1 long) stays one element long, so it is never materialised; a plane constant along the
    keys gets its key axis (rare: such a bias does not change the softmax). The plane itself
    where it already is so (``staged`` None), else one copy of its compact form into rows padded
    to 16 bytes (a float16/bfloat16 bias is widened by that copy). Decided once, on the first
    call's array (``of``); applied to any call's array of the signature, a CuPy array or a torch
    tensor (``lay_out``)."""

    shape: tuple          # the plane as at least 2-D: (Lk,) and 0-d planes get unit axes (a view)
    index: tuple          # slices cutting its broadcast axes to one element (a view)
    staged: tuple | None  # the copy's allocation, rows padded to 16 bytes; None: read in place
    width: int            # the copy's key axis
    dtype: numpy.dtype    # the copy's dtype

    @classmethod
    def of(cls, x, dtype, seqlen_q: int, seqlen_k: int) -> _PlaneLayout:
        shape = (1,) * (2 - x.ndim) + tuple(x.shape)
        x = x.reshape(shape)
        index = tuple(slice(0, 1) if n > 1 and stride == 0 else slice(None) for n, stride in zip(x.shape, x.strides))
        x = x[index]
        dtype = numpy.dtype(dtype)
        item = dtype.itemsize
        width = seqlen_k if x.shape[-1] == 1 and seqlen_k > 1 else x.shape[-1]
        laid_out = (width == x.shape[-1] and x.dtype == dtype and x.data.ptr % 16 == 0
                    and (x.shape[-1] == 1 or x.strides[-1] == item)
                    and all(stride % 16 == 0 for n, stride in zip(x.shape[:-1], x.strides[:-1]) if n > 1)
                    and (0 if x.shape[-2] == 1 else abs(x.strides[-2] // item)) * seqlen_q + seqlen_k <= _INT32_MAX)
        staged = None if laid_out else x.shape[:-1] + (-(-width * item // 16) * 16 // item,)
        return cls(shape, index, staged, width, dtype)

    def view(self, x):
        """``x`` with unit axes in front and its broadcast axes cut (the same base address)."""
        return x.reshape(self.shape)[self.index]

    def lay_out(self, memory, x):
        """The plane the kernels read: ``x`` itself, or its copy from ``memory``."""
        if self.staged is None:
            return x
        # The stage copies whole 16-byte chunks, so a row's padding is read too (then masked): zero
        # it, so nothing uninitialised is ever read (compute-sanitizer initcheck).
        allocate = memory.zeros if self.staged[-1] > self.width else memory.empty
        plane = allocate(self.staged, self.dtype)[..., : self.width]
        memory.copy(plane, self.view(x))
        return plane


def _broadcast_strides(x) -> list[int]:
    """Element strides, 0 along a unit axis (read as broadcast)."""
    return [0 if n == 1 else s // x.dtype.itemsize for n, s in zip(x.shape, x.strides)]


def _pads_keys(p) -> bool:
    """Whether the mask is a key-padding mask: the same for every query and every head (a dK/dV
    block's heads must share their cut), so that each attention row's keys can be cut at its
    last visible one (``_key_bounds``)."""
    m = p.mask
    if m is None or p.packed is not None or m.ndim < 1:
        return False
    return (m.ndim < 2 or m.shape[-2] == 1) and (m.ndim < 3 or m.shape[-3] == 1)


def _splits_key_padding(p) -> bool:
    """Whether a key-padding mask is the call's only score modifier: then the rows whose visible
    keys are a prefix (right padding: the cut alone is their mask) run the plain Variant, and only
    the others the modifier one; the kernels learn which rows are theirs from key_bounds, on the
    device (FwdParams::key_rows), so the host never waits to look at the mask."""
    return (_pads_keys(p) and p.bias is None and p.softcap is None and p.alibi_slopes is None
            and p.dropout_seed is None)


def _key_row_sets(p, select) -> tuple:
    """(Variant(s), key_rows) of each launch of a kernel family: ``select(modified)`` picks them.
    One launch of all rows, except under a split key-padding mask (``_splits_key_padding``): the
    plain Variant(s) on the prefix rows, then the modifier one(s) on the others."""
    modified = _modifies_scores(p)
    if not _splits_key_padding(p):
        return ((select(modified), ALL_KEY_ROWS),)
    return ((select(False), PREFIX_KEY_ROWS), (select(True), OTHER_KEY_ROWS))


_KEY_BOUNDS_THREADS = 256  # CUFLASH_KEY_BOUNDS_THREADS: 8 attention rows per block
_MASK_TILES_THREADS = 256  # CUFLASH_MASK_TILES_THREADS
MASK_TILE = 64  # mask.cuh's kMaskTile: the tile spans' tiles are MASK_TILE queries x MASK_TILE keys
# Queries and keys below which a 2-D mask gets no tile spans: a block's rows would span all the
# query tiles, or its keys all the key tiles.
MASK_TILES_MIN = 2 * MASK_TILE


def _maps_mask_tiles(p) -> bool:
    """Whether the call's mask gets tile spans (cuda_src/mask_tiles.cu; mask.cuh's MaskTiles): a
    mask over queries and keys (a key-padding one has its cut instead), the same for every head
    (a dK/dV block walks its group's heads with one span of query tiles), no packed batch, and
    at least MASK_TILES_MIN queries and keys. (The kernels read the spans from sm_90 on: mask.cuh's
    kArchReadsMaskTiles; below, they are made and left unread, and every tile is computed.)"""
    m = p.mask
    if m is None or p.packed is not None or _pads_keys(p):
        return False
    heads_shared = m.ndim < 3 or m.shape[-3] == 1
    return heads_shared and min(p.seqlen_q, p.seqlen_k) >= MASK_TILES_MIN


def _key_bounds(memory, inputs: ScoreInputs, mask: int):
    """A key-padding mask's cut per attention row (``inputs.count`` rows, int32, C order over the
    output's leading axes; params.cuh's FwdParams::key_bounds): its last visible key + 1 (0 where
    it hides every key), as ~cut where a key before the cut is hidden. One launch of
    cuda_src/key_bounds.cu on the memory's stream, reading the mask plane at ``mask`` (laid out
    by ``_PlaneLayout``) where the kernels read it: through ``score_rows``, keys ``col_stride``
    apart. The host never looks at the mask."""
    bounds = memory.empty((inputs.count,), numpy.dtype(numpy.int32))
    blocks = -(-inputs.count // (_KEY_BOUNDS_THREADS // 32))
    _launch_helper(memory, inputs.bounds_kernel, blocks, _KEY_BOUNDS_THREADS,
                   (mask, inputs.score_rows.data.ptr, inputs.strides["mask"][1], inputs.seqlen_k, inputs.count,
                    memory.pointer(bounds)))
    return bounds


def _mask_spans(memory, inputs: ScoreInputs, mask: int):
    """A 2-D mask's tile spans (params.cuh's FwdParams::mask_spans): per distinct plane, over
    MASK_TILE x MASK_TILE tiles of (queries, keys), each row group's [first, last) key tiles with a
    visible pair, then each key group's query tiles as (rows - first, last); int32 pairs, zeroed
    first (the query spans are built by atomicMax). One launch of cuda_src/mask_tiles.cu on the
    memory's stream, reading the planes at ``mask`` (laid out by ``_PlaneLayout``) where the
    kernels read them. The host never looks at the mask."""
    planes, rows, cols = inputs.mask_tile_shape
    spans = memory.zeros((planes * 2 * (rows + cols),), numpy.dtype(numpy.int32))
    row_stride, col_stride = inputs.strides["mask"]
    _launch_helper(memory, inputs.tiles_kernel, planes * rows, _MASK_TILES_THREADS,
                   (mask, inputs.mask_plane_offsets.data.ptr, row_stride, col_stride, inputs.seqlen_q,
                    inputs.seqlen_k, rows, cols, memory.pointer(spans)))
    return spans


def _row_shape(p) -> tuple[int, ...]:
    """The shape of the kernels' attention rows (the grid's x axis; row bh in C order): the output's
    leading axes, behind the sequence axis of a packed batch."""
    return ((p.packed.batch,) if p.packed is not None else ()) + tuple(p.lead_shape)


def _short_rows(p) -> bool:
    """Whether no sequence of the call has more than tiles.SHORT_ROWS queries or keys (the
    families' short-row tiles, forward and backward)."""
    return max(_longest(p)) <= tiles.SHORT_ROWS


def _mean_rows(p) -> tuple[float, float]:
    """The query and key rows of one attention row on average: the call's, or a packed batch's
    mean per sequence (tile choice, launch order)."""
    if p.packed is None:
        return p.seqlen_q, p.seqlen_k
    sequences = max(p.packed.batch, 1)
    return p.seqlen_q / sequences, p.seqlen_k / sequences


def _longest(p) -> tuple[int, int]:
    """The query and key rows one attention row may have: what the grids cover."""
    if p.packed is None:
        return p.seqlen_q, p.seqlen_k
    return p.packed.max_seqlen_q, p.packed.max_seqlen_k


def _arch(device: int) -> str:
    return kernels.arch_for_capability(*map(int, _cupy().cuda.Device(device).compute_capability))


_PER_ROW = ("lse", "delta")  # one value per query row, C-contiguous (lead..., Lq)


class _Layout:
    """Every tensor of one launch described over the output's leading axes (batch..., heads).

    The batch axes are merged where every tensor walks them contiguously, so the kernel sees at
    most MAX_BATCH_DIMS of them; ``fill`` writes a tensor's pointer and strides into a struct.
    """

    def __init__(self, p, tensors: dict, block_m: int):
        lead = tuple(p.lead_shape)
        num_heads, batch_axes = (lead[-1], list(lead[:-1])) if lead else (1, [])
        strides = {}
        for name, x in tensors.items():
            # lse and delta are ours and C-contiguous (lead..., Lq); everything else is strided.
            strides[name] = (_element_strides_contiguous(x.shape) if name in _PER_ROW
                             else _element_strides(x, lead))
        self.heads = {name: (s[-1] if lead else 0) for name, s in strides.items()}
        batch = {name: (s[:-1] if lead else []) for name, s in strides.items()}
        if p.packed is not None:  # the sequence axis, last: its offsets come from cu_seqlens (params.cuh)
            batch_axes = batch_axes + [p.packed.batch]
            batch = {name: s + [0] for name, s in batch.items()}
        self.batch_shape, self.batch_strides = _merge_batch_axes(batch_axes, batch)
        if len(self.batch_shape) > MAX_BATCH_DIMS:
            raise ValueError(
                f"cuflash: the leading axes {lead} need {len(self.batch_shape)} independent batch "
                f"strides; at most {MAX_BATCH_DIMS} are supported (make the inputs contiguous)"
            )
        self.num_heads = num_heads
        self.grid_x = math.prod(self.batch_shape) * num_heads
        if self.grid_x > MAX_GRID_X:
            raise ValueError(f"cuflash: {self.grid_x} attention heads in one call exceed {MAX_GRID_X}")
        longest = max(_longest(p))
        if -(-longest // block_m) > MAX_GRID_Y:
            raise ValueError(f"cuflash: sequence length {longest} exceeds {MAX_GRID_Y * block_m}")
        self.tensors = tensors

    def fill(self, struct, name: str, *, rows: bool = True) -> None:
        x = self.tensors[name]
        pad = MAX_BATCH_DIMS - len(self.batch_shape)
        struct[name] = x.data.ptr
        struct[f"{name}_batch_stride"] = [0] * pad + self.batch_strides[name]
        struct[f"{name}_head_stride"] = self.heads[name]
        if rows:
            struct[f"{name}_row_stride"] = x.strides[-2] // x.dtype.itemsize


def _fwd_struct(p, layout: _Layout, q, v, kv_group: int | None = None):
    s = numpy.zeros((), dtype=FWD_PARAMS_DTYPE)
    for name in ("q", "k", "v", "o"):
        layout.fill(s, name)
    layout.fill(s, "lse", rows=False)
    set_row_shape(s, [1] * (MAX_BATCH_DIMS - len(layout.batch_shape)) + layout.batch_shape, layout.num_heads,
                  p.kv_group if kv_group is None else kv_group)
    s["seqlen_q"] = p.seqlen_q
    s["seqlen_k"] = p.seqlen_k
    s["head_dim"] = q.shape[-1]
    s["head_dim_v"] = v.shape[-1]
    s["window_left"] = p.window_left
    s["window_right"] = p.window_right
    s["diag_offset"] = p.diag_offset
    s["heads_per_section"] = _heads_per_section(p, layout.grid_x, (q.shape[-1] + v.shape[-1]) * q.dtype.itemsize)
    s["scale"] = p.scale
    # float32 for the 16/32-bit kernels (the scale's range is checked by _spec); the float64 kernels
    # read `scale`, and a float64 scale beyond float32 is clipped here rather than overflowing.
    s["scale_log2"] = min(max(p.scale * LOG2E, -_FLOAT32_MAX), _FLOAT32_MAX)
    if p.dropout_seed is not None:  # (dropout.cuh; _dropout.py holds the definition)
        s["dropout_threshold"] = _dropout.threshold(p.dropout_p)
        s["dropout_scale"] = _dropout.keep_scale(p.dropout_p)
        s["dropout_seed"] = p.dropout_seed
    if p.packed is not None:
        s["cu_seqlens_q"] = p.packed.cu_seqlens_q.data.ptr
        s["cu_seqlens_k"] = p.packed.cu_seqlens_k.data.ptr
        s["seqused_k"] = 0 if p.packed.seqused_k is None else p.packed.seqused_k.data.ptr
        s["diag_bottom_right"] = int(p.packed.bottom_right)
    return s


def _mean_visible_keys(p) -> float:
    """Mean number of keys a query row sees under the mask, over 17 evenly spaced rows (tiles.select
    gives short rows smaller tiles)."""
    if p.packed is not None:
        return _mean_rows(p)[1]
    if not p.has_window:
        return float(p.seqlen_k)
    total = 0
    for n in range(17):
        row = (p.seqlen_q - 1) * n // 16
        lo, hi = p.key_range(row, row + 1)
        total += max(hi - lo, 0)
    return total / 17


def _heads_per_section(p, grid_x: int, kv_row_bytes: int) -> int:
    """Attention rows per section of the forward's launch order (cuda_src/schedule.cuh): with a
    window or causal mask, as many rows as keep their K and V within half of L2 (a GQA group's
    rows share theirs); dense, 1 (one row's query tiles back to back)."""
    if not p.has_window:
        return 1
    kv_bytes = max(_mean_rows(p)[1], 1) * kv_row_bytes / p.kv_group
    # <= 65536 rows: a section's blocks (rows x at most MAX_GRID_Y tiles) stay below 2^32.
    return int(max(1, min(grid_x, 65536, kernels.device_attribute("L2CacheSize") // 2 // kv_bytes)))


def _element_strides_contiguous(shape) -> list[int]:
    """Element strides of a C-contiguous (lead..., Lq) array's leading axes."""
    strides, acc = [], shape[-1]
    for n in reversed(shape[:-1]):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))


# --------------------------------------------------------------------------- backward

@on_arrays_device
def backward(problem):
    """Gradients ``(dq, dk, dv, plan)`` on the GPU, each in its input's own shape and dtype.

    Three launches on CuPy's stream: bwd_delta (delta = rowsum(dO * O) in fp32 / fp64, and the
    dq_accum workspace zeroed), then one kernel over key tiles that computes dK, dV and, unless
    ``deterministic``, accumulates dQ / scale with atomics into dq_accum, then bwd_dq_convert
    (dQ = scale * dq_accum in the input dtype); with ``deterministic`` a kernel over query tiles
    computes dQ without atomics instead. Where one key tile holds every key (short rows), the
    dK/dV kernel stores dQ itself and neither runs (_stores_dq).

    GQA: a dK/dV block accumulates ``heads_per_block`` query heads of one key/value head on chip:
    the whole group, or slices of it where that balances the SMs' load better. The kernels add a
    slice's dK/dV into sums of the group in the accumulation type, rounded here (_DkvSums); with
    ``deterministic`` (the adds' order varies) or a packed batch, slices are stored and summed
    here. Gradients of broadcast
    inputs (an axis of 1 or missing) are summed here too. ``plan`` replays the call
    (``BackwardPlan.run``) when nothing was copied or summed, else None.
    """
    cupy = _cupy()
    p = problem
    _refuse_captured_dropout(cupy, p)
    q, k, v, o, dout = p.q, p.k, p.v, p.o, p.dout
    grads_shape = (q.shape, k.shape, v.shape)
    rows = math.prod(p.lead_shape) * p.seqlen_q
    if rows == 0 or p.seqlen_k == 0 or p.head_dim_v == 0:
        # No query, no key, or Dv == 0 (out is empty, so nothing depends on the scores): zero;
        # a sink's gradient still follows from lse and delta (0 when Dv == 0).
        grads = tuple(cupy.zeros(shape, dtype=p.dtype) for shape in grads_shape)
        if p.returns_dbias:
            grads += (cupy.zeros(p.bias.shape, dtype=p.bias.dtype),)
        if p.sinks is not None:
            delta = _widen(p.dout, _accum(p)) * _widen(p.o, _accum(p))
            grads += (_sink_gradient(p, cupy.ascontiguousarray(p.lse), delta.sum(axis=-1)),)
        return grads, None
    if p.head_dim == 0:  # all scores are 0: the same as one zero column, whose gradient is dropped
        q = cupy.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
        k = cupy.zeros(k.shape[:-1] + (1,), dtype=k.dtype)

    device = cupy.cuda.Device().id

    def choose(tma_ok: bool):
        return _key_row_sets(p, lambda modified: tiles.select_backward(p.dtype.name, q.shape[-1], v.shape[-1],
                                                                       p.has_window, _arch(device), modified,
                                                                       p.precision, tma_ok, _short_rows(p),
                                                                       p.dropout_seed is not None))
    sets = choose(True)
    variants = sets[-1][0]  # delta and the dQ conversion: any set's
    vec = 16 // p.dtype.itemsize
    inputs = (q, k, v, o, dout)
    q, k, v, o, dout = (_readable(x, vec) for x in inputs)
    # A replay redoes the bias and mask (ScoreInputs.prepare) and the per-row slopes
    # (PerRowInputs.prepare), not dsinks (computed after the launches: _sink_gradient).
    plain = all(a is b for a, b in zip(inputs, (q, k, v, o, dout))) and p.head_dim > 0 and p.sinks is None
    accum = _accum(p)
    lse = cupy.ascontiguousarray(p.lse)
    plain = plain and lse is p.lse

    # The query heads that share a key/value head: GQA's group, or all heads when k and v are
    # broadcast along the head axis (MQA); a dK/dV block accumulates heads_per_block of them.
    # Unless deterministic or packed (_adds_dkdv), the blocks of a split group add their slices
    # into sums of the whole group (_DkvSums); else each slice is stored and the host sums them
    # (_sum_to).
    lead = tuple(p.lead_shape)
    group = _shared_kv_heads(p, k, v)
    longest_q, longest_k = _longest(p)
    key_tiles = -(-longest_k // variants.dkdv.block_n)
    dq_direct = _stores_dq(p, sets, longest_k)
    adds = _adds_dkdv(p, group)
    if adds:
        per_block = _heads_per_block_adding(group, math.prod(_row_shape(p)),
                                            _query_tiles_per_key_tile(p, variants.dkdv.block_m, variants.dkdv.block_n),
                                            resident=lambda: _resident_blocks(variants.dkdv, device))
        adds = per_block < group
    else:
        per_block = _heads_per_block(group, math.prod(_row_shape(p)), key_tiles)
    dkv_sums = None
    if adds:  # the sums, (lead..., key/value heads, Lk, D) and (..., Dv), zeroed (_DkvSums)
        kv_lead = lead[:-1] + (lead[-1] // group,)
        dkv_sums = _DkvSums(kv_lead + k.shape[-2:], kv_lead + v.shape[-2:], accum)
        dk, dv = dkv_sums.allocate(CUPY_MEMORY)
    else:
        kv_lead = lead[:-1] + (lead[-1] // per_block,) if lead else lead
        dk = _gradient_buffer(p, kv_lead + k.shape[-2:], vec, zeroed=True, like=p.k)
        dv = _gradient_buffer(p, kv_lead + v.shape[-2:], vec, zeroed=True, like=p.v)
    dq = _gradient_buffer(p, lead + q.shape[-2:], vec, like=p.q)
    delta_shape = lead + (p.seqlen_q,)
    workspace = _workspace(math.prod(delta_shape),
                           None if p.deterministic or dq_direct else math.prod(lead) * p.seqlen_q * q.shape[-1], accum)
    buffer = cupy.empty(workspace[0], dtype=accum)
    delta = buffer[: math.prod(delta_shape)].reshape(delta_shape)
    dq_accum_ptr = 0 if workspace[1] is None else buffer.data.ptr + workspace[1]
    shapes = {"dq": _stored(p, dq).shape, "dk": _stored(p, dk).shape, "dv": _stored(p, dv).shape}
    # (a replay allocates each gradient C-contiguous or in its input's order: not a padded one;
    # with sums, rounds them into gradients of k's and v's shapes: nothing left to sum)
    plain = plain and all((_stored(p, g).flags.c_contiguous or _spec.array_order(g) is not None) and g.shape == s
                          for g, s in zip((dq,) if adds else (dq, dk, dv), grads_shape))
    plain = plain and (not adds or (dk.shape, dv.shape) == tuple(grads_shape[1:]))

    tensors = {"q": q, "k": k, "v": v, "o": o, "lse": lse, "dout": dout, "delta": delta,
               "dq": dq, "dk": dk, "dv": dv}
    layout = _Layout(p, tensors, min(min(f.dkdv.block_n, f.dq.block_m, f.delta.block_m) for f, _ in sets))
    # A TMA dK/dV kernel (bwd_dkdv_wgmma_ws) reads q, k, v and dout through maps, where they can
    # describe the layout (else its twin of the same tile, bwd_dkdv_wgmma); one struct serves every
    # launch, so the TMA launches must share a tile. Decided first: the dbias route depends on it.
    tma_dkdv = [f.dkdv for f, _ in sets if tiles.SPECS[f.dkdv.kernel].tma]
    maps = None
    if tma_dkdv:
        if len({(f.block_m, f.block_n) for f in tma_dkdv}) == 1:
            maps = _tensor_maps(p, layout, tma_dkdv[0], ("q", "k", "v", "dout"), kv_group=group)
        if maps is None:
            sets = choose(False)
            # (no TMA family stores dQ itself, so dq_direct was not chosen)
            assert not dq_direct
    # dbias: summed per key by the dK/dV kernel for a bias broadcast over the queries
    # (_sums_dbias_by_key), added per plane by the dK/dV kernels for a shared bias outside
    # deterministic mode (_SharedBiasAdds), on chip by bwd_dbias_tc where it can (_OnChipBiasSum),
    # else dS of every score (score_mod.cuh's BiasGrad); what the kernels write is summed into
    # the bias's shape after the launches by a _BiasGradient.
    by_key = _sums_dbias_by_key(p, sets)
    bias_adds = None if by_key else _SharedBiasAdds.of(p, sets)
    on_chip = (_OnChipBiasSum.of(p, q.shape[-1], v.shape[-1], device)
               if p.returns_dbias and not by_key and bias_adds is None else None)
    gradient = None
    if by_key:
        gradient = _BiasGradient(p, device, source_shape=lead + (1, p.seqlen_k))
    elif bias_adds is not None:
        gradient = _BiasGradient(p, device, source_shape=bias_adds.sum_shape, target=bias_adds.sum_shape)
    elif on_chip is not None:
        gradient = _BiasGradient(p, device, source_shape=on_chip.sum_shape, target=(1,) + on_chip.sum_shape[1:])
    elif p.returns_dbias:
        gradient = _BiasGradient(p, device)
    kernels.prefetch([kernel for f, _ in sets for kernel in _backward_kernels(f, p.deterministic, dq_direct)]
                     + (gradient.kernels if gradient is not None else [])
                     + ([on_chip.variant] if on_chip is not None else []), device)
    struct = numpy.zeros((), dtype=BWD_PARAMS_DTYPE)
    struct["fwd"] = _fwd_struct(p, layout, q, v, kv_group=group)
    for name in ("dout", "dq", "dk", "dv"):
        layout.fill(struct, name)
    struct["delta"] = delta.data.ptr
    struct["dq_accum"] = dq_accum_ptr
    set_dkv_group(struct, per_block, adds)
    struct["dq_direct"] = int(dq_direct)
    slopes, sinks, score_inputs, scores, kept = _fill_score_mods(struct["fwd"], p)  # kept alive until the launches are queued
    # dS, zeroed where some pairs are never visited (outside causal's or a window's tiles, past a
    # key-padding cut); per-key sums and the planes' sums always (a block that sees no query
    # stores none; the adds need a start).
    dscores_zeroed = by_key or bias_adds is not None or (
        (p.has_window or _skips_keys(p) or _maps_mask_tiles(p)) and on_chip is None)
    dscores = None
    if p.returns_dbias:
        dscores = (cupy.zeros if dscores_zeroed else cupy.empty)(gradient.source_shape, dtype=accum)
    dbias_field = "dbias_keys" if by_key else "dbias_sum" if on_chip is not None else "dbias"
    if dscores is not None:
        struct[dbias_field] = dscores.data.ptr
    if on_chip is not None:
        on_chip.fill(struct, dscores, device)
    if bias_adds is not None:
        bias_adds.fill(struct)
    # The dK/dV kernel's launch order under a mask (bwd_dkdv_wgmma.cu): sections of head groups
    # whose query side (Q, dO, dq_accum, lse, delta) fits in half of L2, heaviest key tiles first
    # inside each (schedule.cuh). A grid of at most four waves is one section: longest processing
    # time first over the whole grid. Sections there would start the last section's heaviest
    # tiles last, each of them a large share of an SM's work (GQA 16/8, 2x4096, causal: 512 blocks
    # of two heads, modelled 0.76 of the balanced time in sections of three rows, 0.98 in one).
    key_rows = layout.grid_x // per_block
    query_bytes = per_block * _mean_rows(p)[0] * ((q.shape[-1] + v.shape[-1]) * q.dtype.itemsize
                                            + q.shape[-1] * accum.itemsize + 2 * accum.itemsize)
    section = kernels.device_attribute("L2CacheSize") // 2 // max(query_bytes, 1)
    if key_rows * key_tiles <= 4 * kernels.device_attribute("MultiProcessorCount"):
        section = key_rows
    struct["fwd"]["heads_per_section"] = int(max(1, min(key_rows, 65536, section)))

    if maps is not None:
        struct = _with_tensor_maps(struct, maps[0], (q, k, v, dout))

    # Grids: (attention rows, query tiles) for delta, the dQ conversion and the deterministic
    # dQ kernel; (attention rows / heads_per_block, key tiles) for the dK/dV kernel.
    launches = (_launch_of(variants.delta, device, layout.grid_x, longest_q, variants.delta.block_m),)
    launches += tuple(_launch_of(f.dkdv, device, layout.grid_x // per_block, longest_k, f.dkdv.block_n, rows)
                      for f, rows in sets)
    if dq_direct:
        pass  # (the dK/dV kernel stored dQ)
    elif p.deterministic:
        launches += tuple(_launch_of(f.dq, device, layout.grid_x, longest_q, f.dq.block_m, rows) for f, rows in sets)
    else:
        launches += (_launch_of(variants.dq_convert, device, layout.grid_x, longest_q, variants.dq_convert.block_m),)
    if on_chip is not None:
        launches += (on_chip.launch,)
    zeroed = ("dk", "dv") if _skips_keys(p) else ()  # as _gradient_buffer
    orders = {} if p.packed is not None else {name: _spec.array_order(g) for name, g in (("dq", dq), ("dk", dk), ("dv", dv))}
    if adds:  # the gradients rounded from the sums are laid out as k and v (as _gradient_buffer's)
        orders.update(dk=_spec.result_order(p.k, grads_shape[1], p.dtype.itemsize),
                      dv=_spec.result_order(p.v, grads_shape[2], p.dtype.itemsize))
    per_row = PerRowInputs.of(p)
    plan = BackwardPlan(struct, launches, shapes, p.dtype, accum, workspace, packed=p.packed is not None, zeroed=zeroed,
                        score_inputs=score_inputs, per_row=per_row, orders=orders, dkv_sums=dkv_sums,
                        dbias=None if dscores is None else (dscores.shape, dscores_zeroed, gradient, dbias_field,
                                                            on_chip or bias_adds))
    plan._run(CUPY_MEMORY, tuple(x.data.ptr for x in (q, k, v, o, lse, dout, dq, dk, dv)) + (dq_accum_ptr, delta.data.ptr)
              + _packed_pointers(CUPY_MEMORY, _packed_arrays(p)) + scores + PerRowInputs.pointers(per_row, slopes, sinks)
              + (() if dscores is None else (dscores.data.ptr,)), p.dropout_seed)
    del kept

    if adds and plain:  # rounded from the sums as a replay rounds them
        dk, dv = dkv_sums.round(CUPY_MEMORY, dk, dv, p.dtype, orders)
    parts = 1 if adds else group // per_block  # of each key/value head's gradient, summed here
    dv = _sum_to(dv, grads_shape[2], parts, accum, p.dtype)
    if p.head_dim == 0:
        grads = cupy.zeros(grads_shape[0], dtype=p.dtype), cupy.zeros(grads_shape[1], dtype=p.dtype), dv
    else:
        grads = (_sum_to(dq, grads_shape[0], 1, accum, p.dtype),
                 _sum_to(dk, grads_shape[1], parts, accum, p.dtype), dv)
    if dscores is not None:
        grads += (gradient.run(CUPY_MEMORY, dscores),)
    if p.sinks is not None:  # (a packed batch's per-row sinks repeat per sequence: lse's rows are per head)
        grads += (_sink_gradient(p, lse, delta, sink_rows=sinks if p.packed is None else None),)
    return grads, (plan if plain else None)


def _accum(p) -> numpy.dtype:
    """The type the kernels accumulate in: float64 for float64 inputs, else float32."""
    return numpy.dtype(numpy.float64 if p.dtype == numpy.float64 else numpy.float32)


def _sink_gradient(p, lse, delta, sink_rows=None):
    """dsinks = -sum_i exp(sink - lse_i) delta_i per attention row (the sink's probability in row
    i times its dS, whose value is 0: cuda_src/score_mod.cuh), summed over the axes along which
    sinks was broadcast, in sinks' shape and dtype. ``sink_rows``: the per-row sinks the kernels
    read (_fill_score_mods), when at hand. CuPy's reductions have a fixed order: the result is
    the same run after run."""
    cupy = _cupy()
    accum = _accum(p)
    if sink_rows is None:
        sink_rows = _per_row(p.sinks, p.lead_shape, accum)
    sinks = sink_rows.reshape(tuple(p.lead_shape) + (1,))
    per_row = _spec.sink_gradient_per_row(cupy, sinks, lse.astype(accum, copy=False), delta.astype(accum, copy=False))
    shape = tuple(p.sinks.shape)
    axes = _broadcast_axes(per_row.shape, shape)
    summed = (per_row.sum(axis=axes, keepdims=True) if axes else per_row).reshape(shape)
    return _narrow(summed, out=cupy.empty(shape, dtype=p.sinks.dtype))


def _sums_dbias_by_key(p, sets) -> bool:
    """Whether the dK/dV kernel sums the bias's gradient over the queries itself, per attention
    row and key (BwdParams::dbias_keys, a ``(lead..., 1, Lk)`` fp32 buffer instead of dS of every
    score): a bias broadcast over the queries (its query axis 1 or missing) whose gradient is
    wanted, no softcap (the kernel's dS^T then is the bias's gradient), not packed, and every
    launch on a family that can (``KernelSpec.sums_dbias_by_key``: bwd_dkdv_wgmma_ws, whose maps
    the call's layout passed) in its kScoreMods form."""
    if not p.returns_dbias or p.packed is not None or p.softcap is not None:
        return False
    if p.bias.ndim >= 2 and p.bias.shape[-2] != 1:
        return False
    return all(tiles.SPECS[f.dkdv.kernel].sums_dbias_by_key and f.dkdv.score_mods for f, _ in sets)


class _BiasGradient:
    """dbias from dS (``(lead..., Lq, Lk)``, C-contiguous, in the accumulation type): summed over
    the axes along which the bias was broadcast, in bias's shape and dtype, by the launches of
    ``bias_grad.passes`` (cuda_src/bias_grad.cu: a fixed order, no atomics, the same result run
    after run) on the memory's stream, on the full path and on a replay alike; dS itself where
    nothing is summed or rounded. ``kernels``: what ``backward`` prefetches beside its own."""

    def __init__(self, p, device: int, source_shape: tuple | None = None, target: tuple | None = None):
        """``source_shape``: what the kernels wrote, dS ``(lead..., Lq, Lk)`` by default;
        ``target``: what it sums to (right-aligned: the axes where it has 1 or none are summed),
        the bias's shape by default. bwd_dbias_tc's partial sums ``(chunks, planes, Lq, Lk)``
        (_OnChipBiasSum) sum to ``(1, planes, Lq, Lk)``, the bias's own entries in C order; the
        dK/dV kernel's per-key sums ``(lead..., 1, Lk)`` (_sums_dbias_by_key) to the bias's shape."""
        self.shape = tuple(p.bias.shape)
        arch = _arch(device)
        self.device = device
        if source_shape is None:
            source_shape = tuple(p.lead_shape) + (p.seqlen_q, p.seqlen_k)
        if target is None:
            target = self.shape
        self.source_shape = source_shape  # the buffer the kernels write, allocated per call
        self.passes = [(bias_grad.kernel(dtype.name, arch), numpy.frombuffer(params.tobytes(), dtype=numpy.uint8).copy(),
                        -(-entries // bias_grad.THREADS), entries, dtype)
                       for dtype, params, entries in bias_grad.passes(source_shape, target, p.bias.dtype, _accum(p))]
        self.kernels = [spec for spec, *_ in self.passes]

    def run(self, memory, dscores):
        summed = dscores
        for spec, params, blocks, entries, dtype in self.passes:
            out = memory.empty((entries,), dtype)
            ARGS.bytes[: params.size] = params
            ARGS.words[:2] = memory.pointer(summed), memory.pointer(out)  # PARAMS_DTYPE's dscores, dbias
            launch_args.driver().launchKernel(kernels.function_pointer(spec, self.device), blocks, 1, 1,
                                              bias_grad.THREADS, 1, 1, 0, memory.stream(), ARGS.argv_ptr, 0)
            summed = out
        return summed.reshape(self.shape)


# The dS buffer size from which a shared bias's gradient is summed on chip (_OnChipBiasSum): below
# it the buffer route is faster (it costs the dK/dV kernel a store per score and one summing
# pass, while bwd_dbias_tc re-reads every row's Q, dO, K and V per tile: the backward 1.5-1.9x
# slower at triangle d32 on the H200), above it the buffer dominates the backward's memory (at
# triangle N = 384 it is 12x the inputs). A fixed size, not the free memory: a call's route, and
# so its bits, must not change from run to run.
ON_CHIP_DBIAS_MIN_BYTES = 1 << 30


class _OnChipBiasSum:
    """dbias summed on chip (cuda_src/bwd_dbias_tc.cu) instead of from a (rows, Lq, Lk) dS buffer,
    where the per-plane adds (_SharedBiasAdds) are not taken (deterministic=True, a dK/dV family
    without them): for a bias given in full along the queries and keys and shared by several
    attention rows (its leading axes broadcast: AlphaFold's pair bias over the MSA or triangle
    rows, Swin's over the windows), 16-bit inputs, head dims up to 128 (tiles.select_dbias). The
    rows of each of the bias's planes (its entries over the leading axes, in C order) are listed
    plane after plane in row order and cut into ``chunks`` equal chunks, enough blocks to fill the
    GPU; each block sums one chunk of one plane over one tile into ``(chunks, planes, Lq, Lk)``
    fp32 partial sums, which _BiasGradient adds in chunk order. Memory: the partial sums (chunks
    x the bias's entries) instead of every row's dS. ``of``: the route for a problem, or None."""

    def __init__(self, variant, rows, planes: int, chunks: int, chunk_rows: int, p):
        self.variant = variant
        self.rows = rows  # (planes * rows_per_plane,) int32 on the device: kept as long as the plan
        self.planes, self.chunks, self.chunk_rows = planes, chunks, chunk_rows
        self.sum_shape = (chunks, planes, p.seqlen_q, p.seqlen_k)
        self.tiles = -(-p.seqlen_q // variant.block_m) * -(-p.seqlen_k // variant.block_n)
        self.launch = None

    @classmethod
    def of(cls, p, head_dim: int, head_dim_v: int, device: int):
        planes_lead = _shared_bias_lead(p)
        if planes_lead is None:
            return None
        variant = tiles.select_dbias(p.dtype.name, head_dim, head_dim_v, _arch(device), p.dropout_seed is not None)
        if variant is None:
            return None
        if math.prod(p.lead_shape) * p.seqlen_q * p.seqlen_k * _accum(p).itemsize < ON_CHIP_DBIAS_MIN_BYTES:
            return None
        rows, planes = _rows_by_plane(tuple(p.lead_shape), planes_lead)
        per_plane = rows.size // planes
        tiles_total = planes * -(-p.seqlen_q // variant.block_m) * -(-p.seqlen_k // variant.block_n)
        chunk_rows, chunks = _chunks(per_plane, -(-4 * kernels.device_attribute("MultiProcessorCount") // tiles_total))
        return cls(variant, plan_constant(rows), planes, chunks, chunk_rows, p)

    def fill(self, struct, partial_sums, device: int) -> None:
        """Its fields of the params, and its launch (grid: planes x chunks, tiles)."""
        self.launch = _launch_of(self.variant, device, self.planes * self.chunks, self.tiles, 1)
        struct["dbias_sum"] = partial_sums.data.ptr
        struct["dbias_rows"] = self.rows.data.ptr
        struct["dbias_rows_per_plane"] = self.rows.size // self.planes
        struct["dbias_chunk_rows"] = self.chunk_rows
        struct["dbias_chunks"] = self.chunks


class _SharedBiasAdds:
    """dbias by atomic adds outside deterministic mode (BwdParams::dbias_planes, score_mod.cuh's
    BiasGrad): a bias given in full along the queries and keys and shared by several attention
    rows (a pair bias over the triangle or MSA rows, a window bias over the windows) takes every
    row's dS into its plane's sums, ``(planes, Lq, Lk)`` in the accumulation type, zeroed per
    call. No dS buffer of every score (at triangle N = 384, 906 MB) and no summing pass: a
    rounding one for a 16-bit bias. The adds' order, and so dbias's last bits, vary from run to
    run; deterministic=True keeps the fixed-order routes. ``of``: the route for a problem whose
    launches' dK/dV families add there (``KernelSpec.adds_dbias``), or None."""

    def __init__(self, plane_of_rows, planes: int, p):
        self.plane_of_rows = plane_of_rows  # (rows,) int32 on the device: kept as long as the plan
        self.sum_shape = (planes, p.seqlen_q, p.seqlen_k)

    @classmethod
    def of(cls, p, sets):
        if p.deterministic or not p.returns_dbias:
            return None
        if not all(tiles.SPECS[f.dkdv.kernel].adds_dbias(f.dkdv.head_dim) for f, _ in sets):
            return None
        planes_lead = _shared_bias_lead(p)
        if planes_lead is None:
            return None
        plane_of, planes = _plane_of_rows(tuple(p.lead_shape), planes_lead)
        if plane_of.size // planes > SHARED_BIAS_ADDS_MAX_ROWS:
            return None
        return cls(plan_constant(plane_of), planes, p)

    def fill(self, struct) -> None:
        struct["dbias_planes"] = self.plane_of_rows.data.ptr


# The most attention rows per bias plane that _SharedBiasAdds takes: each entry of a plane
# receives that many adds, serialised at L2 (Swin's window bias: 4096 rows a plane).
SHARED_BIAS_ADDS_MAX_ROWS = 1 << 20


def _shared_bias_lead(p) -> tuple | None:
    """The bias's leading axes (its planes' shape) where it is given in full along the queries
    and keys and each plane is shared by several attention rows (its leading axes broadcast to
    the output's; not packed); None for any other bias."""
    lead, bias_shape = tuple(p.lead_shape), tuple(p.bias.shape)
    if (p.packed is not None or len(bias_shape) < 2 or bias_shape[-2:] != (p.seqlen_q, p.seqlen_k)
            or len(bias_shape) - 2 > len(lead)):
        return None
    if math.prod(lead) // math.prod(bias_shape[:-2]) < 2:
        return None  # no row shares a plane: dS is dbias itself
    return bias_shape[:-2]


def _plane_of_rows(lead: tuple, planes_lead: tuple) -> tuple[numpy.ndarray, int]:
    """The bias plane each attention row reads, (rows,) int32 (rows in C order over ``lead``, the
    output's leading axes), and the number of planes: a bias whose leading axes are
    ``planes_lead`` (broadcastable to ``lead``) has one plane per entry of them, in C order, and
    row r reads the plane at r's coordinates (0 along a broadcast axis)."""
    planes_shape = (1,) * (len(lead) - len(planes_lead)) + tuple(planes_lead)
    coords = numpy.unravel_index(numpy.arange(math.prod(lead)), lead)
    plane_of = numpy.ravel_multi_index(tuple(c % n for c, n in zip(coords, planes_shape)), planes_shape)
    return plane_of.astype(numpy.int32), math.prod(planes_shape)


def _rows_by_plane(lead: tuple, planes_lead: tuple) -> tuple[numpy.ndarray, int]:
    """The attention rows grouped by the plane each reads (_plane_of_rows), and the number of
    planes: plane after plane, ascending within a plane (the fixed order of bwd_dbias_tc's sums)."""
    plane_of, planes = _plane_of_rows(lead, planes_lead)
    return numpy.argsort(plane_of, kind="stable").astype(numpy.int32), planes


def _chunks(per_plane: int, wanted: int) -> tuple[int, int]:
    """(rows per chunk, chunks) cutting a plane's ``per_plane`` rows into about ``wanted`` equal
    chunks (at least 1, at most one row each), none empty."""
    chunk_rows = -(-per_plane // max(1, min(wanted, per_plane)))
    return chunk_rows, -(-per_plane // chunk_rows)


def _backward_kernels(variants, deterministic: bool, dq_direct: bool = False) -> list:
    """The Variants a backward launches: delta, dK/dV, and dQ or the dQ conversion (neither where
    the dK/dV kernel stores dQ itself: _stores_dq)."""
    return [variants.delta, variants.dkdv] + ([] if dq_direct else [variants.dq if deterministic else variants.dq_convert])


def _stores_dq(p, sets, longest_k: int) -> bool:
    """Whether the dK/dV kernel stores dQ itself (BwdParams::dq_direct): where one key tile holds
    every key of a row, its block sums the row's whole dS K, so dQ needs no fp32 accumulator, no
    atomics and no conversion pass (windowed vision attention, short molecules: most of a short
    row's backward traffic besides its inputs). Only where every query tile is visited (no window,
    no key cut, no tile spans: a row that sees no key still gets its zeros), not for a packed batch, and for
    families that can (tiles.KernelSpec.stores_dq). Deterministic too: each dQ is written once."""
    return (not p.has_window and not _skips_keys(p) and not _maps_mask_tiles(p) and p.packed is None
            and all(tiles.SPECS[f.dkdv.kernel].stores_dq(f.dkdv.dtype, f.dkdv.head_dim) and longest_k <= f.dkdv.block_n
                    for f, _ in sets))


def _shared_kv_heads(p, k, v) -> int:
    """Query heads per key/value head: GQA's group; every query head when k and v both have a
    head axis of 1 (MQA); else 1."""
    if p.kv_group > 1 or not p.lead_shape:
        return p.kv_group
    heads = p.lead_shape[-1]
    mqa = heads > 1 and all(x.ndim >= 3 and x.shape[-3] == 1 for x in (k, v))
    return heads if mqa else 1


def _heads_per_block(group: int, rows: int, key_tiles: int) -> int:
    """Query heads per dK/dV block: the whole group, unless that leaves the GPU too few blocks on
    a problem big enough to fill it (a group's heads run one after another inside a block, so few
    key/value heads, e.g. MQA on one sequence, leave SMs idle): then the largest divisor of the
    group that gives one block per SM, the partial sums added here. Masked problems need no more:
    the whole-grid longest-first order (backward's key_rows) evens their unequal key tiles out, and
    splitting them further cost more than it gained (H200 bf16 d128 causal GQA 16/2, B*L = 16k:
    whole groups 1.43x split ones in fours at 1k, 1.08x at 4k; session 16). Small problems keep the
    whole group: their time is the host's, and partial sums would cost host work and a launch."""
    enough = kernels.device_attribute("MultiProcessorCount")
    # The whole group as long as its blocks fill nine SMs in ten: a wave a few blocks short costs
    # less than splitting (H200 bf16 d128 GQA 16/2, B2 L4096, 128 blocks on 132 SMs: whole groups
    # 1.65 ms dense, 1.49 causal; slices of four, their sums added here, 2.56 and 1.65).
    if (rows // group) * key_tiles >= 0.9 * enough or rows * key_tiles < 2 * enough:
        return group
    for heads in range(group - 1, 1, -1):
        if group % heads == 0 and (rows // heads) * key_tiles >= enough:
            return heads
    return 1


def _adds_dkdv(p, group: int) -> bool:
    """Whether a split GQA group's dK/dV blocks may add into shared sums (BwdParams::dkv_adds;
    every dK/dV family can: bwd_wgmma.cuh's add_dk_dv, bwd_dkdv_tc's add_rows, bwd_simt.cuh's
    store_or_add): the call is not ``deterministic`` (the adds' order varies run to run, as dQ's
    atomics do) and the batch is not packed (the sums are laid out per dense batch row)."""
    return group > 1 and not p.deterministic and p.packed is None


def _heads_per_block_adding(group: int, rows: int, steps: tuple[int, ...], *,
                            resident: int | Callable[[], int] = 1) -> int:
    """Query heads per dK/dV block when a split group's blocks add into shared sums (_adds_dkdv):
    the divisor of the group whose blocks finish first on this GPU (_finish_time), the larger one
    of two within 2% (fewer blocks load K and V and add into the sums). ``steps``: the query tiles
    each key tile sees (_query_tiles_per_key_tile); ``rows``: the query heads x batch rows;
    ``resident``: the dK/dV kernel's blocks per SM (_resident_blocks), or a function that asks
    for them, called only for a problem large enough to split (the driver's answer needs the
    kernel loaded, which a small problem's plan may never launch). Small problems keep the
    whole group, as _heads_per_block's: their time is the host's, and the sums cost a memset and
    two roundings."""
    sms = kernels.device_attribute("MultiProcessorCount")
    if rows * len(steps) < 2 * sms:
        return group
    return _fastest_split(group, rows, steps, sms, resident() if callable(resident) else resident)


_RESIDENT_BLOCKS: dict[tuple[object, int], int] = {}


def _resident_blocks(variant, device: int) -> int:
    """How many blocks of ``variant`` one SM holds at once (the driver's occupancy for its threads,
    registers and shared memory), at least 1; asked once per Variant and device (a backward that
    adds a split GQA group plans with it on every call that builds a plan)."""
    key = (variant, device)
    if key not in _RESIDENT_BLOCKS:
        from cupy_backends.cuda.api import driver

        _RESIDENT_BLOCKS[key] = max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernels.function_pointer(variant, device), variant.threads, variant.shared_mem))
    return _RESIDENT_BLOCKS[key]


# A dK/dV block's cost beyond its steps, in steps: loading K and V, filling the Q/dO pipeline
# and the epilogue; one more for the adds of a split group's slice (its kBlockN x (D + Dv)
# floats added into the sums: bwd_wgmma.cuh's add_dk_dv).
_BLOCK_OVERHEAD_STEPS = 2
_ADD_OVERHEAD_STEPS = 1


@functools.lru_cache(maxsize=256)
def _fastest_split(group: int, rows: int, steps: tuple[int, ...], sms: int, resident: int = 1) -> int:
    # A kernel that holds ``resident`` blocks per SM needs them all there to run at the SM's
    # speed (a lone block of the float64 d128 tile, 4 warps, leaves it mostly idle): each of the
    # sms x resident slots runs its blocks at 1 / resident of that speed. Measured (H200, float64
    # d128, two blocks per SM, B2 Hq16 L2048, causal GQA 16/2): whole groups of 8 in 256 blocks
    # 1.67x the MHA call's backward, slices of 2 1.00x; the model with one slot per SM saw them
    # equal and took the whole group.
    times = {}
    for per_block in (n for n in range(group, 0, -1) if group % n == 0):
        overhead = _BLOCK_OVERHEAD_STEPS + (_ADD_OVERHEAD_STEPS if per_block < group else 0)
        works = [per_block * s + overhead for s in steps if s > 0]
        times[per_block] = _finish_time(works, rows // per_block, sms * resident) * resident
    best = min(times.values())
    return max(n for n, t in times.items() if t <= 1.02 * best)


def _finish_time(works: list, copies: int, sms: int) -> float:
    """When the last of ``copies`` blocks of each work in ``works`` ends, one block per SM at a time,
    in the kernel's order, heaviest first (schedule.cuh: longest processing time first). Up to
    eight blocks per SM it is simulated (wave quantisation: equal blocks end together); beyond,
    the mean load or the heaviest block, whichever is longer."""
    blocks = copies * len(works)
    if not works:
        return 0.0
    if blocks > 8 * sms:
        return max(max(works), copies * sum(works) / sms)
    loads = [0.0] * sms
    for work in sorted(works, reverse=True):
        for _ in range(copies):
            heapq.heapreplace(loads, loads[0] + work)
    return max(loads)


def _query_tiles_per_key_tile(p, block_m: int, block_n: int) -> tuple[int, ...]:
    """How many query tiles of ``block_m`` rows see each key tile of ``block_n`` keys under the
    call's causal mask or window (all of them without one): a dK/dV block's steps per head."""
    return _visible_tile_counts(p.seqlen_q, p.seqlen_k, p.window_left, p.window_right, p.diag_offset, block_m, block_n)


@functools.lru_cache(maxsize=256)
def _visible_tile_counts(seqlen_q, seqlen_k, window_left, window_right, diag_offset, block_m, block_n):
    # Query tile i sees keys [lo_i, hi_i) (_spec's key_range), both ascending in i: the tiles seeing
    # key tile [a, b) are those with lo_i < b (a prefix) and hi_i > a (a suffix).
    starts = numpy.arange(0, seqlen_q, block_m, dtype=numpy.int64)
    stops = numpy.minimum(starts + block_m, seqlen_q)
    lo = numpy.zeros_like(starts)
    hi = numpy.full_like(starts, seqlen_k)
    if window_left >= 0:
        lo = numpy.maximum(lo, starts + diag_offset - window_left)
    if window_right >= 0:
        hi = numpy.minimum(hi, stops + diag_offset + window_right)
    a = numpy.arange(0, seqlen_k, block_n, dtype=numpy.int64)
    b = numpy.minimum(a + block_n, seqlen_k)
    counts = numpy.searchsorted(lo, b, side="left") - numpy.searchsorted(hi, a, side="right")
    return tuple(int(n) for n in numpy.maximum(counts, 0))


def _gradient_buffer(p, shape, vec: int, zeroed: bool = False, like=None):
    """A gradient's buffer, ``shape`` = (lead..., rows, width). A packed batch's is laid out as its
    input, (rows, heads, width), and returned as the heads-first view; a dense one in the memory
    order of ``like``, its input (_spec.result_order). Keys past
    a sequence's used length (seqused_k) or a key-padding mask's cut (``_key_bounds``) are never
    stored by the kernels, so with ``zeroed`` they read 0."""
    if p.packed is None:
        order = None if like is None else _spec.result_order(like, shape, p.dtype.itemsize)
        buffer = (_store_buffer(shape, shape[-1], p.dtype, vec) if order is None
                  else CUPY_MEMORY.empty(shape, p.dtype, order))
    else:
        heads, rows, width = shape
        buffer = _store_buffer((rows, heads, width), width, p.dtype, vec).transpose(1, 0, 2)
    if zeroed and _skips_keys(p):
        buffer[...] = 0
    return buffer


def _skips_keys(p) -> bool:
    """Whether the kernels leave some keys' dK/dV unstored: past seqused_k, or past a key-padding
    mask's cut."""
    return _pads_keys(p) or (p.packed is not None and p.packed.seqused_k is not None)


def _store_buffer(shape, width: int, dtype, vec: int):
    """A (possibly row-padded) buffer the kernels can store to with 16-byte vectors."""
    cupy = _cupy()
    if width % vec == 0:
        return cupy.empty(shape, dtype=dtype)
    padded = cupy.empty(shape[:-1] + (-(-width // vec) * vec,), dtype=dtype)
    return padded[..., :width]


def _broadcast_axes(grad_shape, shape) -> tuple[int, ...]:
    """The axes of a gradient of ``grad_shape`` that NumPy broadcasting added or stretched to get
    there from ``shape`` (right-aligned): the axes its adjoint sums over."""
    extra = len(grad_shape) - len(shape)
    return tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape) if n == 1 and grad_shape[extra + i] != 1)


def _sum_to(grad, shape, kv_group: int, accum, dtype):
    """Sum a gradient over the output's leading axes down to its input's ``shape``.

    NumPy broadcasting's adjoint: axes the input lacks or has as 1 are summed; under GQA the
    head axis splits into (kv heads, group) and the group is summed. Sums run in ``accum``.
    """
    cupy = _cupy()
    if grad.shape == tuple(shape) and grad.dtype == dtype:  # (a padded buffer becomes a plain array; one in its input's order stays)
        return grad if grad.flags.c_contiguous or _spec.array_order(grad) is not None else cupy.ascontiguousarray(grad)
    if kv_group > 1:  # (..., Hq, L, D) -> (..., Hkv, group, L, D), summed over the group
        members = grad.reshape(grad.shape[:-3] + (grad.shape[-3] // kv_group, kv_group) + grad.shape[-2:])
        g = _sum_group(members, accum) if kv_group <= _MEMBER_ADDS else _widen(members, accum).sum(axis=-3)
    else:
        g = _widen(grad, accum)
    axes = _broadcast_axes(g.shape[:-2], shape[:-2])
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    g = g.reshape(shape)
    result = cupy.empty(shape, dtype=dtype)
    _narrow(g, out=result)
    return result


# Partial sums up to this many are added member by member (_sum_group); more, by one reduction.
# H200, bf16 gradients (2, 16, 4096, 128) summed in 2 / 4 / 8 / 16 parts: member adds 0.14 /
# 0.16 / 0.25 / 0.44 ms, the widened buffer's reduction 0.29 / 0.28 / 0.27 / 0.27 ms.
_MEMBER_ADDS = 8


def _sum_group(members, accum):
    """``members`` (..., Hkv, group, L, D) summed over the group in ``accum``, member after member
    (a fixed order: deterministic): one elementwise add per member straight from its strided view,
    no widened copy of the whole buffer."""
    cupy = _cupy()
    total = cupy.zeros(members.shape[:-3] + members.shape[-2:], dtype=accum)
    for member in range(members.shape[-3]):
        part = members[..., member, :, :]
        if _is_bf16(part.dtype):
            _bf16_add()(part.view(cupy.uint16), total)
        else:
            cupy.add(total, part, out=total)
    return total


# bfloat16 has no CuPy arithmetic of its own: widen and narrow through its bits (the top half
# of a float32), rounding to nearest even, NaN kept quiet.
_BF16_NARROW = None
_BF16_ADD = None


def _bf16_add():
    """total += x for x bfloat16 (as its bits) and total float32 or float64."""
    cupy = _cupy()
    global _BF16_ADD
    if _BF16_ADD is None:
        _BF16_ADD = cupy.ElementwiseKernel(
            "uint16 bits", "T total", "total += (T)__uint_as_float(((unsigned int)bits) << 16);",
            "cuflash_add_bfloat16")
    return _BF16_ADD


def _is_bf16(dtype) -> bool:
    return numpy.dtype(dtype).name == "bfloat16"


def _widen(x, accum):
    cupy = _cupy()
    if _is_bf16(x.dtype):
        bits = x.view(cupy.uint16).astype(cupy.uint32) << 16
        return bits.view(cupy.float32).astype(accum, copy=False)
    return x.astype(accum, copy=False)


def _narrow(x, *, out):
    """out[...] = x rounded to out's dtype."""
    cupy = _cupy()
    global _BF16_NARROW
    if not _is_bf16(out.dtype):
        out[...] = x
        return out
    if _BF16_NARROW is None:
        _BF16_NARROW = cupy.ElementwiseKernel(
            "float32 x", "uint16 y",
            """
            unsigned int bits = __float_as_uint(x);
            if ((bits & 0x7fffffffu) > 0x7f800000u) { y = 0x7fc0; }
            else { y = (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); }
            """,
            "cuflash_float32_to_bfloat16",
        )
    _BF16_NARROW(x.astype(cupy.float32, copy=False), out.view(cupy.uint16))
    return out
