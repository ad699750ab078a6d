"""Split-KV decoding over a KV cache on the GPU: ``cuda_src/decode_tc.cu``.

``plan(...)`` checks that the kernel can run a call (``supported`` says why not: the caller
then keeps the composition of dense calls), picks the instantiation, the head blocks, the row
chunks and the number of splits, and fills the by-value ``DecodeParams`` (``PARAMS_DTYPE``, its
NumPy mirror); ``DecodePlan.run()`` launches ``decode_tc`` (and ``decode_combine`` when the keys
are split) on CuPy's current stream, with no host synchronization: the cache lengths and the
block table are read by the kernel, on the device, and nothing the host decides (the grid, the
splits) depends on them, so the launches can be captured in a CUDA graph whose replays follow
the lengths and table the device holds then. Kernels compile like every other cuflash
kernel (``kernels.get_kernel``: NVRTC, memoized per device, CuPy's disk cache).

What the kernel runs: float16 and bfloat16; head dims D, Dv multiples of 8 up to 128; caches
(contiguous or paged, any page size) whose strides are whole 16-byte chunks and whose data are
16-byte aligned (cp.async copies 16 bytes); every mask, softcap, ALiBi and sinks. With ALiBi a
block holds one query head (the slope is per head), otherwise the whole GQA group of a kv head.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy

from .. import _dropout
from . import kernels, launch_args
from .launch_args import ARGS
from .params import FWD_PARAMS_DTYPE, MAX_BATCH_DIMS, pointer_words, set_row_shape
from .variant import CUDA_TYPES, HelperKernel

THREADS = 128   # CUFLASH_DECODE_THREADS
MAX_SPLITS = 64  # the heuristic's ceiling (num_splits=0)
MAX_GRID_X = 2**31 - 1
LOG2E = 1.4426950408889634
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)
_FLOAT32 = numpy.dtype(numpy.float32)  # (a dtype object, as every memory's empty takes: torch's maps its name)

_I8 = numpy.int64
_P = numpy.uint64
# The NumPy mirror of ``struct DecodeParams`` (cuda_src/decode.cuh): FwdParams, then 8-byte fields.
PARAMS_DTYPE = numpy.dtype(
    [("fwd", FWD_PARAMS_DTYPE)]
    + [(name, _P) for name in ("q", "k_cache", "v_cache", "o", "lse", "part_o", "part_lse", "cache_seqlens",
                               "block_table")]
    + [(name, _I8) for name in ("q_batch_stride", "q_head_stride", "q_row_stride",
                                "k_page_stride", "k_head_stride", "k_row_stride",
                                "v_page_stride", "v_head_stride", "v_row_stride",
                                "o_batch_stride", "o_head_stride", "o_row_stride", "table_stride",
                                "batch", "heads_q", "heads_k", "seqlen_q", "head_dim", "head_dim_v",
                                "seqlen_fixed", "new_keys", "page_size", "heads_per_block", "row_chunks",
                                "num_splits", "bottom_right", "capacity", "num_pages")],
    align=True,
)
# Word indices of a dense call's pointers (DenseDecodePlan.launch): its arrays, the partials, the
# per-row ALiBi slopes and sinks.
_DENSE_WORDS = pointer_words(PARAMS_DTYPE, ("q", "k_cache", "v_cache", "o", "lse"))
_PARTIALS_WORDS = pointer_words(PARAMS_DTYPE, ("part_o", "part_lse"))
_ROW_WORDS = {"alibi_slopes": pointer_words(PARAMS_DTYPE, ("fwd.alibi_slopes",))[0],
              "sinks": pointer_words(PARAMS_DTYPE, ("fwd.sinks",))[0]}


def _tile_bytes(rows: int, cols: int) -> int:
    """tc::SmemTile<rows, cols>::kBytes: rows of cols / 8 + 1 16-byte chunks (an odd pitch)."""
    return rows * (cols // 8 + 1) * 16


@dataclasses.dataclass(frozen=True)
class DecodeKernel:
    """One ``decode_tc`` instantiation, in the shape ``kernels`` compiles a Variant."""

    dtype: str     # float16 or bfloat16
    head_dim: int  # 64 or 128: the tile width covering D and Dv
    warps_m: int   # 1, 2 or 4: warps along the rows (16 each); the other 4 / warps_m split each key tile
    stages: int    # K/V pipeline depth
    arch: str

    kernel = "decode_tc"
    threads = THREADS

    @property
    def shared_mem(self) -> int:
        """decode_tc_smem_bytes: Q's rows, then the K/V stages."""
        return (_tile_bytes(16 * self.warps_m, self.head_dim)
                + self.stages * 2 * _tile_bytes(self.block_n, self.head_dim))

    @property
    def block_n(self) -> int:
        """decode_block_n: keys per tile (128 at D 64, 64 at D 128: the same bytes); splits are whole tiles."""
        return block_n_for(self.head_dim)

    @property
    def block_m(self) -> int:
        return 16 * self.warps_m

    @property
    def name_expression(self) -> str:
        return f"cuflash::decode_tc<{CUDA_TYPES[self.dtype]}, {self.head_dim}, {self.warps_m}, {self.stages}>"

    def __str__(self) -> str:
        return f"decode_tc[{self.dtype} d{self.head_dim} m{self.block_m} s{self.stages} sm_{self.arch}]"


def combine_kernel(dtype: str, arch: str) -> HelperKernel:
    """``decode_combine`` (in decode_tc.cu): the splits' fp32 partials merged into the output."""
    return HelperKernel("decode_tc", "decode_combine", dtype, arch, THREADS)


def bucket_for(head_dim: int, head_dim_v: int) -> int:
    """The head-dim bucket a decode kernel is compiled for: 64 or 128 columns."""
    return 64 if max(head_dim, head_dim_v) <= 64 else 128


def block_n_for(head_dim: int) -> int:
    """decode_block_n: 64 keys a tile at D 128, 128 at D 64 (a tile of the same bytes)."""
    return 128 if head_dim <= 64 else 64


def stages_for(head_dim: int, warps_m: int) -> int:
    """K/V stages: 3 (tiles of ~34 KiB K+V at both widths: two blocks fit an SM), but 2 for D 64's
    64-row blocks: their rows make the block compute-bound, and a third stage would leave room
    for one block per SM where it held two before its tiles grew to 128 keys."""
    return 2 if head_dim <= 64 and warps_m == 4 else 3


def warps_m_for(rows: int) -> int:
    """Warps along a head block's rows: 1 for up to 16 rows (all four warps then split every key
    tile four ways), 2 for up to 32, else 4 (64 rows a block, more rows in more row chunks)."""
    return 1 if rows <= 16 else 2 if rows <= 32 else 4


def kernels_for(dtype: str, head_dims, arch: str) -> list:
    """Every launch the decode path can make for ``dtype`` (float16, bfloat16) and head dims
    ``head_dims`` on ``arch``: decode_tc at each width bucket (64, 128) the dims fall in and each
    row block (1, 2, 4 warps), and decode_combine. What ``python -m cuflash warmup --inference``
    compiles ahead."""
    buckets = sorted({64 if d <= 64 else 128 for d in head_dims if 0 < d <= 128 and d % 8 == 0})
    out = [DecodeKernel(dtype, bucket, warps_m, stages_for(bucket, warps_m), arch)
           for bucket in buckets for warps_m in (1, 2, 4)]
    return out + [combine_kernel(dtype, arch)] if buckets else out


def resident_blocks(kernel: DecodeKernel) -> int:
    """Blocks of ``kernel`` one SM holds by shared memory (227 KiB a block at most, 228 KiB an SM
    with 1 KiB reserved per block on sm_80/sm_90): what a 'wave' counts."""
    return max(1, (228 * 1024) // (kernel.shared_mem + 1024))


@functools.lru_cache(maxsize=4096)  # (a dense decoding loop asks again with each new key)
def choose_splits(blocks: int, tiles: int, sms: int, per_sm: int) -> int:
    """num_splits = 0: the fewest splits whose blocks (``blocks`` per split) fill the waves of
    ``sms`` SMs holding ``per_sm`` each about as well as any count does (within 4% of the best
    fill), at most MAX_SPLITS and at least two key tiles per split (fewer would spend a split's
    pipeline start and its partial's write and read on one tile); none when the heads alone make
    two waves or more.

    Why the fill and not a number of waves: every block of a call reads the same number of keys,
    so blocks run in lock-step waves and a last wave a fraction full runs at that fraction of the
    bandwidth. Measured on an H200 (bf16 D128, Lq 1, 264 block slots; benchmarks/NOTES.md,
    session 20): 64 heads x 64k keys at 9 splits (576 blocks, 2.2 waves) 3.7 TB/s, at 4 (256
    blocks, one wave) 4.0; 8 x 256k at 64 splits (two waves) 3.4, at 32 (one wave) 3.7."""
    slots = sms * per_sm
    if blocks <= 0 or tiles <= 2 or blocks >= 2 * slots:  # two waves or more: the last one's loss is small
        return 1

    def fill(splits):
        launched = blocks * splits
        return launched / (-(-launched // slots) * slots)

    candidates = range(1, max(1, min(MAX_SPLITS, tiles // 2)) + 1)
    best = max(fill(s) for s in candidates)
    return min(s for s in candidates if fill(s) >= 0.96 * best)


def _elements(array):
    """Strides in elements, or None when one is not a whole number of elements."""
    item = array.dtype.itemsize
    return None if any(s % item for s in array.strides) else [s // item for s in array.strides]


def _in_whole_chunks(array) -> bool:
    """Whether the kernel's 16-byte copies (cp.async) can read a 16-bit (B or pages, H, L, D)
    array where it lies: strides of whole 16-byte chunks on the first three axes, a 16-byte
    aligned address. A cache must be (unsupported_reason); q is copied otherwise (plan)."""
    strides = _elements(array)
    return strides is not None and not any(s % 8 for s in strides[:3]) and array.data.ptr % 16 == 0


def unsupported_reason(q, k_cache, v_cache) -> str | None:
    """Why the decode kernel cannot run this call (None: it can). The layout facts only; the
    caller has validated the arguments."""
    if 0 in q.shape[:3]:
        return "no query rows"
    if q.dtype.name not in ("float16", "bfloat16"):
        return f"dtype {q.dtype}"
    d, dv = int(q.shape[3]), int(v_cache.shape[3])
    if d % 8 or dv % 8 or max(d, dv) > 128 or min(d, dv) == 0:
        return f"head dims D={d}, Dv={dv} (the kernel takes multiples of 8 up to 128)"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _in_whole_chunks(cache):
            return f"{name}'s strides {tuple(cache.strides)} or address are not whole 16-byte chunks"
    return None


@dataclasses.dataclass
class DecodePlan:
    """One call's launches, ready to run (again: a benchmark times ``run`` alone): its signature's
    layout and this call's params (the layout's with the call's data pointers)."""

    layout: "_Layout"
    params: numpy.ndarray
    keep: tuple  # device arrays the params point to (q or its copy, lse and its allocation, lengths, table)
    memory: object  # the plan's allocation (_carving's parts: out unless the caller's, lse, the partials, ...)
    out: object  # the caller's out= (written in place) or a view of the plan's allocation
    lse: object

    @property
    def splits(self) -> int:
        return self.layout.splits

    @property
    def workspace(self) -> tuple:
        """(part_o, part_lse) when split, else (): the splits' partials, as arrays (the launches
        take their addresses alone; tests poison them)."""
        return tuple(_part(self.memory, self.layout.carve, i) for i in (Part.PARTIAL_O, Part.PARTIAL_LSE)
                     ) if self.layout.splits > 1 else ()

    def run(self):
        import cupy

        self.layout.launch(self.params, cupy.cuda.get_current_stream().ptr)
        return self.out, self.lse


def writable_out(out) -> bool:
    """Whether the kernels can write the caller's ``out`` (B, Hq, Lq, Dv) in place: strides of
    whole elements, an even number of them on the first three axes, a contiguous last axis and a
    4-byte aligned start (the epilogue stores pairs of elements)."""
    strides = _elements(out)
    return (strides is not None and strides[3] == 1 and all(s % 2 == 0 for s in strides[:3])
            and out.data.ptr % 4 == 0)


class Part:
    """The parts of a layout's one device allocation (``_Layout.carve``), by index: out (where
    the plan owns it), lse, the splits' partial outs and lses, q's copy, the per-row ALiBi slopes
    and sinks, the lengths' and the block table's copies."""

    OUT, LSE, PARTIAL_O, PARTIAL_LSE, Q_COPY, SLOPES, SINKS, LENGTHS, TABLE = range(9)


def _carving(specs) -> tuple:
    """(bytes, parts) of one device allocation holding arrays of ``specs`` (``(shape, dtype)``
    each, or None for no array), each 256-byte aligned: a part is ``(shape, dtype, offset)`` or None."""
    parts, size = [], 0
    for spec in specs:
        if spec is None:
            parts.append(None)
            continue
        shape, dtype = tuple(spec[0]), numpy.dtype(spec[1])
        parts.append((shape, dtype, size))
        size += -(-math.prod(shape) * dtype.itemsize // 256) * 256
    return max(size, 1), tuple(parts)


def _part(memory, carving, index):
    """Part ``index`` of a ``_carving`` in its allocation ``memory``, as an array (None where the
    layout has no such part): whoever holds it holds the whole allocation."""
    import cupy

    part = carving[1][index]
    return None if part is None else cupy.ndarray(part[0], part[1], memptr=memory + part[2])


def _rows_into(cupy, target, x, lead):
    """target (float32, ``lead`` = (B, Hq) C order) = x (broadcastable to lead) widened, with no
    temporary array (a captured launch may read nothing that dies with the call): bfloat16 through
    its bits, any other float by the copy's cast."""
    source = cupy.broadcast_to(x, lead)
    if x.dtype.name == "bfloat16":  # a float32 is the bfloat16's bits, 16 places up
        bits = target.view(cupy.uint32).reshape(lead)
        bits[...] = source.view(cupy.uint16)
        cupy.left_shift(bits, 16, out=bits)
    else:
        target.reshape(lead)[...] = source


def plan(q, k_cache, v_cache, *, cache_seqlens, seqlen_fixed: int, new_keys: int, block_table, capacity: int,
         scale: float, window_left: int, window_right: int, bottom_right: bool, softcap, alibi_slopes, sinks,
         num_splits: int, out=None) -> DecodePlan:
    """The launches of one call (``unsupported_reason`` must have said None). ``cache_seqlens``:
    the int32 (B,) device array, or None with ``seqlen_fixed`` for every sequence; ``capacity``:
    Lmax (max_pages * page_size when paged): the grid and the split heuristic come from shapes
    alone (B, the heads, Lq, Lmax, the SM count), never from the lengths, which only the kernel
    reads; window sides unbounded as -1; ``alibi_slopes`` / ``sinks``: CuPy arrays broadcastable
    to (B, Hq), or None; ``num_splits``: 0 for the heuristic; ``out``: the caller's (B, Hq, Lq,
    Dv) array, written in place when ``writable_out``, else the plan's own.

    Everything else the launches read or write beyond the caller's arrays (the output unless the
    caller's, lse, the splits' partials, the per-row slopes and sinks, and copies of a q, lengths
    or table the kernel cannot read where they lie) is one allocation, of which the plan's ``out``
    and ``lse`` are views: holding either holds all of it, as a CUDA graph that captured the
    launches needs for as long as it is replayed. The copies are launches on the current stream
    (captured with the rest), so a replay reads the values the caller's arrays hold then."""
    own_out = out is None or not writable_out(out)
    copy_q = not _in_whole_chunks(q)
    copy_lengths = cache_seqlens is not None and cache_seqlens.strides[0] != 4
    copy_table = block_table is not None and (block_table.strides[1] != 4 or block_table.strides[0] % 4)
    # Everything the launch's shape and params hold but the data pointers (a decode loop repeats
    # one signature per layer: planned once, its calls only allocate, copy and launch).
    key = (q.dtype, q.shape, copy_q or q.strides, k_cache.shape, k_cache.strides, v_cache.shape, v_cache.strides,
           own_out or out.strides, cache_seqlens is None, copy_lengths, new_keys,
           None if block_table is None else (block_table.shape, copy_table or block_table.strides), capacity,
           scale, window_left, window_right, bottom_right, softcap, alibi_slopes is None, sinks is None, num_splits,
           q.device.id)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _layout(
            q, k_cache, v_cache, own_out=own_out, out=out, copy_q=copy_q, copy_lengths=copy_lengths,
            copy_table=copy_table, new_keys=new_keys, block_table=block_table,
            capacity=capacity, scale=scale, window_left=window_left, window_right=window_right,
            bottom_right=bottom_right, softcap=softcap, alibi=alibi_slopes is not None, sinks=sinks is not None,
            num_splits=num_splits)
    return plan_call(layout, q, k_cache, v_cache, cache_seqlens=cache_seqlens, seqlen_fixed=seqlen_fixed,
                     block_table=block_table, alibi_slopes=alibi_slopes, sinks=sinks, out=out)


def plan_call(layout: "_Layout", q, k_cache, v_cache, *, cache_seqlens, seqlen_fixed: int, block_table, alibi_slopes,
              sinks, out) -> DecodePlan:
    """``plan``'s per-call half, for the layout ``plan`` found for this call's signature (a caller
    that knows it, as a repeated signature's does, comes here directly): the allocation, the
    copies, this call's params."""
    import cupy

    own_out, copy_q, copy_lengths, copy_table = layout.own_out, layout.copy_q, layout.copy_lengths, layout.copy_table
    # One allocation for everything the launches write or read beyond the caller's arrays; arrays
    # made of the parts a call hands out or copies into (the partials' addresses are enough).
    memory = cupy.cuda.alloc(layout.carve[0])
    lse = _part(memory, layout.carve, Part.LSE)
    if own_out:
        out = _part(memory, layout.carve, Part.OUT)
    if copy_q:  # small: the queries, not the cache
        q_copy = _part(memory, layout.carve, Part.Q_COPY)
        q_copy.view(f"u{q.itemsize}")[...] = q.view(f"u{q.itemsize}")
        q = q_copy
    if copy_lengths:
        lengths = _part(memory, layout.carve, Part.LENGTHS)
        lengths[...] = cache_seqlens
        cache_seqlens = lengths
    if copy_table:
        table = _part(memory, layout.carve, Part.TABLE)
        table[...] = block_table
        block_table = table
    p = params_for(layout, q.data.ptr, k_cache.data.ptr, v_cache.data.ptr, out.data.ptr, memory.ptr,
                   0 if cache_seqlens is None else cache_seqlens.data.ptr,
                   0 if block_table is None else block_table.data.ptr, seqlen_fixed)
    lead = (int(q.shape[0]), int(q.shape[1]))
    for name, x, index in (("alibi_slopes", alibi_slopes, Part.SLOPES), ("sinks", sinks, Part.SINKS)):
        if x is not None:
            rows_of = _part(memory, layout.carve, index)
            _rows_into(cupy, rows_of, x, lead)
            p["fwd"][name] = rows_of.data.ptr
    keep = tuple(x for x in (q, lse, cache_seqlens, block_table) if x is not None)
    return DecodePlan(layout, p, keep, memory, out, lse)


def params_for(layout: "_Layout", q: int, k_cache: int, v_cache: int, out: int, memory: int, cache_seqlens: int,
               block_table: int, seqlen_fixed: int) -> numpy.ndarray:
    """``layout``'s DecodeParams with a call's addresses (0: no such array): q (or its copy),
    the caches, out, the layout's allocation ``memory`` (its lse and partials at their parts'
    offsets), the lengths and the table; ``seqlen_fixed`` a value, not a signature (a decoding
    loop's int length grows)."""
    # (A copy of the template's bytes viewed as the struct: numpy's copy of a nested structured
    # array walks its fields, ~35 us for DecodeParams; bytes copy in well under one.)
    p = numpy.frombuffer(bytearray(layout.template), dtype=PARAMS_DTYPE).reshape(())
    p["seqlen_fixed"] = seqlen_fixed
    p["q"], p["k_cache"], p["v_cache"], p["o"] = q, k_cache, v_cache, out
    p["lse"] = memory + layout.carve[1][Part.LSE][2]
    p["cache_seqlens"], p["block_table"] = cache_seqlens, block_table
    if layout.splits > 1:
        p["part_o"], p["part_lse"] = (memory + layout.carve[1][i][2] for i in (Part.PARTIAL_O, Part.PARTIAL_LSE))
    return p


# Layouts planned, by signature (plan's key); cleared when full (a process meets few signatures).
_LAYOUTS: dict = {}
_MAX_LAYOUTS = 256
_DENSE_LAYOUTS: dict = {}  # dense_forward's, by signature but Lk, k/v's strides: by key tiles


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What ``plan`` decides from a call's signature alone: the params but for the data pointers
    (``template``: DecodeParams' bytes), the kernels and grids, the splits, and the allocation's
    parts (``_carving``: out unless the caller's, lse, the splits' partials, the copies)."""

    template: bytes
    own_out: bool  # the plan allocates out (the caller gave none, or one the kernel cannot write)
    copy_q: bool  # the plan copies q, lengths, table where the kernel cannot read them in place
    copy_lengths: bool
    copy_table: bool
    kernel: object
    combine: object | None
    grid: int
    combine_grid: int
    shared_mem: int
    splits: int
    carve: tuple  # _carving's (bytes, parts) of the call's one allocation, its parts in Part's order

    def launch(self, params: numpy.ndarray, stream: int) -> None:
        """decode_tc, then decode_combine when split, on ``stream``, their one argument ``params``
        (a DecodeParams of this layout with a call's pointers)."""
        ARGS.bytes[:PARAMS_DTYPE.itemsize] = numpy.frombuffer(params, dtype=numpy.uint8)
        self.launch_filled(stream)

    def launch_filled(self, stream: int) -> None:
        """``launch`` of the params already in this thread's launch arguments (launch_args.ARGS:
        the driver copies them at each launch)."""
        launch_kernel = launch_args.driver().launchKernel
        launch_kernel(self.kernel.kernel.ptr, self.grid, 1, 1, THREADS, 1, 1, self.shared_mem, stream, ARGS.argv_ptr,
                      0)
        if self.combine is not None:
            launch_kernel(self.combine.kernel.ptr, self.combine_grid, 1, 1, THREADS, 1, 1, 0, stream, ARGS.argv_ptr, 0)


def _layout(q, k_cache, v_cache, *, own_out, out, copy_q, copy_lengths, copy_table, new_keys, block_table, capacity,
            scale, window_left, window_right, bottom_right, softcap, alibi, sinks, num_splits) -> _Layout:
    """``plan``'s decisions for a new signature (its arguments as plan's, the arrays' values unread)."""
    import cupy

    batch, heads_q, seqlen_q, head_dim = (int(n) for n in q.shape)
    heads_k, head_dim_v = int(k_cache.shape[1]), int(v_cache.shape[3])
    dtype = q.dtype.name
    group = heads_q // heads_k
    heads_per_block = 1 if alibi else group
    rows = heads_per_block * seqlen_q
    bucket = bucket_for(head_dim, head_dim_v)
    device = q.device.id
    arch = kernels.arch_for_capability(*map(int, cupy.cuda.Device(device).compute_capability))
    warps_m = warps_m_for(rows)
    spec = DecodeKernel(dtype, bucket, warps_m, stages_for(bucket, warps_m), arch)
    row_chunks = -(-rows // spec.block_m)
    blocks = batch * (heads_q // heads_per_block) * row_chunks
    tiles = -(-capacity // spec.block_n)
    if num_splits == 0:
        splits = choose_splits(blocks, tiles, kernels.device_attribute("MultiProcessorCount"), resident_blocks(spec))
    else:
        # More splits than tiles leave splits with no key at all: correct, but nothing to gain.
        splits = max(1, min(num_splits, max(tiles, 1)))
    splits = max(1, min(splits, MAX_GRID_X // max(blocks, 1)))

    total_rows = batch * heads_q * seqlen_q
    carve = _carving((
        ((batch, heads_q, seqlen_q, head_dim_v), q.dtype) if own_out else None,
        ((batch, heads_q, seqlen_q), numpy.float32),
        ((splits, total_rows, head_dim_v), numpy.float32) if splits > 1 else None,
        ((splits, total_rows), numpy.float32) if splits > 1 else None,
        (tuple(q.shape), q.dtype) if copy_q else None,
        ((batch * heads_q,), numpy.float32) if alibi else None,
        ((batch * heads_q,), numpy.float32) if sinks else None,
        ((batch,), numpy.int32) if copy_lengths else None,
        (tuple(block_table.shape), numpy.int32) if copy_table else None,
    ))

    p = numpy.zeros((), dtype=PARAMS_DTYPE)
    fwd = p["fwd"]
    set_row_shape(fwd, [1] * MAX_BATCH_DIMS, 1, 1)
    fwd["heads_per_section"] = 1
    fwd["window_left"], fwd["window_right"] = window_left, window_right
    fwd["scale"] = scale
    fwd["scale_log2"] = min(max(scale * LOG2E, -_FLOAT32_MAX), _FLOAT32_MAX)
    fwd["softcap"] = 0.0 if softcap is None else softcap
    # Strides in elements: of a copy (C order) where the kernel reads one, else the array's own.
    p["q_batch_stride"], p["q_head_stride"], p["q_row_stride"] = (
        _c_order_strides(q.shape) if copy_q else _elements(q))[:3]
    for name, cache in (("k", k_cache), ("v", v_cache)):
        strides = _elements(cache)
        p[f"{name}_page_stride"], p[f"{name}_head_stride"], p[f"{name}_row_stride"] = strides[:3]
    p["o_batch_stride"], p["o_head_stride"], p["o_row_stride"] = (
        _c_order_strides((batch, heads_q, seqlen_q, head_dim_v)) if own_out else _elements(out))[:3]
    if block_table is not None:
        p["table_stride"] = block_table.shape[1] if copy_table else block_table.strides[0] // block_table.itemsize
        p["page_size"] = int(k_cache.shape[2])
        p["num_pages"] = int(k_cache.shape[0])
    p["batch"], p["heads_q"], p["heads_k"], p["seqlen_q"] = batch, heads_q, heads_k, seqlen_q
    p["head_dim"], p["head_dim_v"] = head_dim, head_dim_v
    p["new_keys"] = new_keys
    p["heads_per_block"], p["row_chunks"], p["num_splits"] = heads_per_block, row_chunks, splits
    p["bottom_right"] = int(bottom_right)
    p["capacity"] = capacity

    combine, combine_grid = None, 0
    if splits > 1:
        combine = kernels.get_kernel(combine_kernel(dtype, arch), device)
        combine_grid = max(1, min(-(-total_rows // (THREADS // 32)), MAX_GRID_X))
    return _Layout(p.tobytes(), own_out, copy_q, copy_lengths, copy_table, kernels.get_kernel(spec, device), combine,
                   max(blocks * splits, 1), combine_grid, spec.shared_mem, splits, carve)


def _c_order_strides(shape) -> list:
    """Strides in elements of a C-order array of ``shape``."""
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= int(n)
    return strides[::-1]


# --- dense calls with few query rows (cuflash.attention) ---------------------------------------------
#
# A dense call whose queries are a few rows per head (a decoding step through transformers' own
# cache: one row over every key) runs on the forward kernels as one block per query head and
# 64-128 rows, nearly all padding, each block reading its kv head's K/V alone: B x Hq blocks,
# often far fewer than the SMs. The decode kernel takes the same call as a contiguous cache that
# every sequence fills (Lmax = Lk): a kv head's whole GQA group (times Lq) in one block, its K/V
# read once, the keys split over the SMs. Same rule, options and results (out and lse; the
# backward recomputes from them whichever kernel ran).

DENSE_MAX_ROWS = 64  # a head block's rows (query heads of a kv head x Lq): one row chunk of 64


def dense_reason(p) -> str | None:
    """Why a resolved dense call on the GPU (``_spec.Problem``) does not run on the decode kernel
    (None: it does): a (B, H, L, D) call with no bias, mask or packing, k and v per batch and kv
    head (no broadcast), one head block of at most DENSE_MAX_ROWS rows, a q the kernel reads in
    place, no out= (a replayable plan allocates its output), and what ``unsupported_reason`` says."""
    q = p.q
    if p.packed is not None or p.bias is not None or p.mask is not None or p.out is not None:
        return "a packed batch, a bias, a mask or out="
    if p.dropout_seed is not None:
        return "dropout"
    if p.seqlen_k == 0:
        return "no key"
    if q.ndim != 4 or p.k.ndim != 4 or p.v.ndim != 4:
        return "not (B, H, L, D)"
    k, v, group = _kv_heads(p)
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] * group != q.shape[1] or (
            v.shape[1] != k.shape[1]) or any(n > 1 and step == 0 for x in (k, v)
                                             for n, step in zip(x.shape[:2], x.strides[:2])):
        return "k or v broadcast along the batch or heads"
    rows = (1 if p.alibi_slopes is not None else group) * p.seqlen_q
    if rows > DENSE_MAX_ROWS:
        return f"{rows} rows a head block (at most {DENSE_MAX_ROWS})"
    reason = unsupported_reason(q, k, v)
    if reason is None and not _in_whole_chunks(q):
        reason = "a q the kernel cannot read in place (strides or address not whole 16-byte chunks)"
    return reason


def _kv_heads(p):
    """(k, v, group) of a (B, H, L, D) call as the decode kernel reads them. Multi-query
    attention, one kv head for all of q's heads, comes as a head axis of 1 (which _spec resolves
    as a broadcast, kv_group 1) or as a view broadcast over the heads (stride 0): either is that
    one head with every query head in its group."""
    k, v, group = p.k, p.v, p.kv_group
    if k.shape[1] > 1 and k.strides[1] == 0 and v.strides[1] == 0:
        k, v, group = k[:, :1], v[:, :1], group * k.shape[1]
    if group == 1 and k.shape[1] == v.shape[1] == 1:
        group = p.q.shape[1]
    return k, v, group


def dense_forward(p, memory, o, out_order):
    """``(o, lse, plan)`` of a dense call that ``dense_reason`` passed, on ``memory`` (plan's
    CUPY_MEMORY: where the planning call allocates and which stream it runs on). ``o``: the
    output the planning call allocated, in ``out_order`` (the memory order its replays allocate
    theirs in: its strides go into the plan). The plan carries its ``family`` (or None)."""
    k, v, _ = _kv_heads(p)
    options = (p.scale, p.window_left, p.window_right, p.diag_offset == p.seqlen_k - p.seqlen_q, p.softcap,
               p.alibi_slopes is not None, p.sinks is not None)
    plan = _dense_plan(p.q, k, v, o, out_order, tuple(p.lse_shape), p.dtype, p.seqlen_k, options)
    plan.family = DenseDecodeFamily.of(p, k, v, o, out_order, options)
    lse = memory.empty(p.lse_shape, _FLOAT32)
    plan.launch(memory, p.q, k, v, o, lse, p.alibi_slopes, p.sinks)
    return o, lse, plan


def _dense_plan(q, k, v, o, out_order, lse_shape, dtype, seqlen_k, options) -> "DenseDecodePlan":
    """The plan of a routed dense call (arrays, or _Facts: their layouts alone are read).
    ``options``: (scale, window_left, window_right, bottom_right, softcap, alibi?, sinks?)."""
    # A decoding loop's dense calls (transformers' caches) bring one key more, in new k and v
    # arrays, every step: the layout is kept for all lengths of as many key tiles (the splits,
    # grid and allocation are the tiles'), each plan its own length and k/v strides.
    tiles = -(-seqlen_k // block_n_for(bucket_for(q.shape[3], v.shape[3])))
    key = (q.shape, q.strides, q.dtype, q.device.id, k.shape[:2], v.shape[:2], v.shape[3], o.strides, options, tiles)
    layout = _DENSE_LAYOUTS.get(key)
    if layout is None:
        if len(_DENSE_LAYOUTS) >= _MAX_LAYOUTS:
            _DENSE_LAYOUTS.clear()
        scale, window_left, window_right, bottom_right, softcap, alibi, sinks = options
        layout = _DENSE_LAYOUTS[key] = _layout(
            q, k, v, own_out=False, out=o, copy_q=False, copy_lengths=False, copy_table=False, new_keys=0,
            block_table=None, capacity=seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
            bottom_right=bottom_right, softcap=softcap, alibi=alibi, sinks=sinks, num_splits=0)
    return DenseDecodePlan(layout, tuple(o.shape), out_order, lse_shape, dtype, seqlen_k,
                           _elements(k)[:3] + _elements(v)[:3])


class _Facts:
    """An array's layout without its memory (what ``_layout`` reads: shape, dtype, strides in
    bytes, device): a family plans a new Lk from them and keeps no caller's array alive."""

    def __init__(self, shape, dtype, strides, device):
        self.shape, self.dtype, self.strides, self.device = tuple(shape), dtype, tuple(strides), device


class DenseDecodeFamily:
    """Every key count Lk of one routed dense call (plan.py keeps it under the call's signature
    less k's and v's Lk and strides): a decoding loop over transformers' caches brings one key
    more each step in new k and v arrays, all else the same. ``plan_for`` checks what the new
    arrays alone can change and plans their Lk without resolving the call again.

    Only calls whose mask reads the same at every Lk have one: no left window (a window's sides
    are clamped to Lq + Lk), and under causal a diagonal that is told apart (Lk != Lq)."""

    def __init__(self, q, k, v, o, out_order, lse_shape, dtype, seqlen_q, options):
        self.q, self.o, self.out_order, self.lse_shape = q, o, out_order, lse_shape
        self.dtype, self.seqlen_q, self.options = dtype, seqlen_q, options
        self.kv_shapes = tuple((x.shape[0], x.shape[1], x.shape[3]) for x in (k, v))  # (B, Hk, D): heads collapsed
        self.broadcast_heads = False  # (of's: k and v came as views broadcast over q's heads)

    @classmethod
    def of(cls, p, k, v, o, out_order, options):
        """The family of a routed call (k, v: _kv_heads'; options: _dense_plan's), or None (a mask
        that moves with Lk)."""
        if p.window_left >= 0 or p.window_right > 0 or (p.window_right == 0 and p.seqlen_k == p.seqlen_q):
            return None
        device = p.q.device
        family = cls(_Facts(p.q.shape, p.dtype, p.q.strides, device), k, v,
                     _Facts(o.shape, o.dtype, o.strides, device), out_order, tuple(p.lse_shape), p.dtype, p.seqlen_q,
                     options)
        family.broadcast_heads = p.k.shape[1] != k.shape[1]
        return family

    def plan_for(self, lengths, strides):
        """The plan of this family's call with k and v of ``lengths`` (their Lk) and ``strides``
        (theirs, in elements, as given: k then v), or None where the full path must decide
        (lengths that differ or are 0, strides the kernel cannot read in place)."""
        seqlen_k = lengths[0]
        if seqlen_k < 1 or lengths[1] != seqlen_k:
            return None
        facts = []
        for (batch, heads, width), given in zip(self.kv_shapes, strides):
            batch_step, head_step, row_step, last = given
            if last != 1 or any(step % 8 for step in given[:3]) or (batch > 1 and batch_step == 0) or (
                    self.broadcast_heads and head_step != 0):
                return None  # (16-byte chunks in place; broadcasts other than the family's: the full path's)
            item = self.dtype.itemsize
            facts.append(_Facts((batch, heads, seqlen_k, width), self.dtype,
                                (batch_step * item, head_step * item, row_step * item, item), self.q.device))
        return _dense_plan(self.q, facts[0], facts[1], self.o, self.out_order, self.lse_shape, self.dtype, seqlen_k,
                           self.options)


class DenseDecodePlan:
    """A dense call's forward on the decode kernel, replayable as plan.ForwardPlan is:
    ``run(memory, q, k, v, alibi_slopes=, sinks=)`` allocates out (in ``out_order``) and lse on
    ``memory`` (CuPy's pool, or torch's through the torch adapter), the per-row slopes and sinks
    and the splits' partials, and launches on ``memory``'s stream."""

    def __init__(self, layout: _Layout, out_shape: tuple, out_order, lse_shape: tuple, dtype, seqlen_k: int,
                 kv_strides):
        """``kv_strides``: k's then v's (batch, head, row) strides in elements, and ``seqlen_k``,
        this signature's (``layout`` may be a shorter call's of as many key tiles)."""
        self.layout, self.out_shape, self.out_order = layout, out_shape, out_order
        self.lse_shape, self.dtype, self.seqlen_k = lse_shape, dtype, seqlen_k
        self.followers = {}  # backward plans that followed this one (the torch adapter's, as ForwardPlan's)
        self.family = None  # the DenseDecodeFamily planning this call's other Lk (dense_forward's)
        p = numpy.frombuffer(bytearray(layout.template), dtype=PARAMS_DTYPE).reshape(())
        p["seqlen_fixed"] = p["capacity"] = seqlen_k  # (every sequence holds all Lk keys)
        (p["k_page_stride"], p["k_head_stride"], p["k_row_stride"],
         p["v_page_stride"], p["v_head_stride"], p["v_row_stride"]) = kv_strides
        self.template = numpy.frombuffer(p.tobytes(), dtype=numpy.uint8)  # (DecodeParams' bytes)
        # Split: (splits, rows, Dv) partial outs, then (splits, rows) partial lse, in one allocation.
        total = math.prod(lse_shape)
        self.partials = (layout.splits * total * (out_shape[-1] + 1),) if layout.splits > 1 else None
        self.part_lse_bytes = 4 * layout.splits * total * out_shape[-1]

    def run(self, memory, q, k, v, *packed, bias=None, mask=None, alibi_slopes=None, sinks=None, keep=None,
            dropout_seed=None):
        """(out, lse) of a call of this plan's signature (``packed``, ``bias``, ``mask``, ``keep``,
        ``dropout_seed``: ForwardPlan.run's, never given here: dense_reason kept such calls off this
        kernel, and a dropping call's key holds its rate, so it never finds this plan)."""
        _dropout.check_replay_seed(False, dropout_seed)
        o = memory.empty(self.out_shape, self.dtype, self.out_order)
        lse = memory.empty(self.lse_shape, _FLOAT32)
        self.launch(memory, q, k, v, o, lse, alibi_slopes, sinks)
        return o, lse

    def launch(self, memory, q, k, v, o, lse, alibi_slopes, sinks) -> None:
        """The launches into ``o`` and ``lse``: this call's pointers in the layout's params (filled
        in this thread's launch arguments)."""
        ptr = memory.pointer
        rows = {}  # one float32 per (batch, query head) of the per-row inputs, as the kernel reads them
        if alibi_slopes is not None or sinks is not None:
            for name, x in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
                if x is not None:
                    rows[name] = memory.empty(self.lse_shape[:2], _FLOAT32)
                    memory.copy(rows[name], x)
        partials = None if self.partials is None else memory.empty(self.partials, _FLOAT32)
        ARGS.bytes[:self.template.size] = self.template
        ARGS.words[_DENSE_WORDS] = ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse)
        if partials is not None:
            at = ptr(partials)
            ARGS.words[_PARTIALS_WORDS] = at, at + self.part_lse_bytes
        for name, x in rows.items():
            ARGS.words[_ROW_WORDS[name]] = ptr(x)
        self.layout.launch_filled(memory.stream())
        del rows, partials  # (alive until the launches are queued)
