"""attention_with_kvcache's append on the GPU: one launch of ``cuda_src/kvcache_append.cu``.

The new keys and values go into the cache at each sequence's ``cache_seqlens[b] + t`` (through
its block-table row when paged), read by the kernel on the device: the host never reads the
lengths or the table, so the launch neither synchronizes nor stops a CUDA graph capture, and a
captured one follows the lengths and table the device holds at each replay. The kernel copies
bits, so one instantiation per element width (``WIDTHS``) serves every dtype. Compiled like
every other cuflash kernel (``kernels.get_kernel``), launched through the driver on CuPy's
current stream, its arguments one by-value struct (``PARAMS_DTYPE``).
"""
from __future__ import annotations

import dataclasses

import numpy

from . import kernels, launch_args
from .launch_args import ARGS
from .params import field_offset, pointer_words
from .variant import HelperKernel

THREADS = 128  # CUFLASH_APPEND_THREADS: a warp per new row
MAX_GRID_X = 2**31 - 1
MAX_ROWS = 2**31 - 1  # B * Hk * Lnew: the kernel counts rows in 32 bits
# The instantiation that copies elements of each width (its template's Element, by its dtype).
WIDTHS = {2: "float16", 4: "float32", 8: "float64"}

_P, _I8 = numpy.uint64, numpy.int64
# The NumPy mirror of ``struct AppendParams``: every field 8 bytes wide, in the struct's order.
PARAMS_DTYPE = numpy.dtype(
    [(name, _P) for name in ("k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table")]
    + [(name, _I8) for name in ("k_batch_stride", "k_head_stride", "k_row_stride", "k_col_stride",
                                "v_batch_stride", "v_head_stride", "v_row_stride", "v_col_stride",
                                "k_cache_page_stride", "k_cache_head_stride", "k_cache_row_stride",
                                "v_cache_page_stride", "v_cache_head_stride", "v_cache_row_stride",
                                "seqlens_stride", "table_stride", "table_col_stride",
                                "batch", "heads_k", "new_keys", "head_dim", "head_dim_v",
                                "seqlen_fixed", "page_size", "capacity", "num_pages")],
    align=True,
)
_POINTER_WORDS = pointer_words(PARAMS_DTYPE, ("k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table"))
_SEQLEN_FIXED_WORD = field_offset(PARAMS_DTYPE, "seqlen_fixed") // 8


def kernel(itemsize: int, arch: str) -> HelperKernel:
    """The append kernel for elements of ``itemsize`` bytes (2, 4 or 8) on ``arch``."""
    return HelperKernel("kvcache_append", "kvcache_append", WIDTHS[itemsize], arch, THREADS)


def _whole(array) -> bool:
    return all(s % array.itemsize == 0 for s in array.strides)


def _bits(array):
    return array.view(numpy.dtype(f"u{array.itemsize}"))


def _strides(array) -> list[int]:
    return [s // array.itemsize for s in array.strides]


def params(k, v, k_cache, v_cache, *, cache_seqlens, seqlen_fixed: int, block_table, capacity: int) -> numpy.ndarray:
    """The launch's struct: ``cache_seqlens`` the int32 (B,) device array (any stride) or None
    with ``seqlen_fixed`` for every sequence; ``block_table`` the int32 (B, max_pages) device
    array (any strides) or None for a contiguous cache; ``capacity`` Lmax (max_pages * page_size
    when paged). Every array's strides are whole elements (CuPy's, DLPack's always are)."""
    batch, heads_k, new, head_dim = (int(n) for n in k.shape)
    p = numpy.zeros((), dtype=PARAMS_DTYPE)
    p["k"], p["v"], p["k_cache"], p["v_cache"] = k.data.ptr, v.data.ptr, k_cache.data.ptr, v_cache.data.ptr
    for name, array in (("k", k), ("v", v)):
        for axis, stride in zip(("batch", "head", "row", "col"), _strides(array)):
            p[f"{name}_{axis}_stride"] = stride
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        for axis, stride in zip(("page", "head", "row"), _strides(cache)[:3]):
            p[f"{name}_{axis}_stride"] = stride
    if cache_seqlens is not None:
        p["cache_seqlens"], p["seqlens_stride"] = cache_seqlens.data.ptr, _strides(cache_seqlens)[0]
    if block_table is not None:
        p["block_table"] = block_table.data.ptr
        p["table_stride"], p["table_col_stride"] = _strides(block_table)
        p["page_size"], p["num_pages"] = int(k_cache.shape[2]), int(k_cache.shape[0])
    p["batch"], p["heads_k"], p["new_keys"] = batch, heads_k, new
    p["head_dim"], p["head_dim_v"] = head_dim, int(v.shape[3])
    p["seqlen_fixed"], p["capacity"] = seqlen_fixed, capacity
    return p


def append(k, v, k_cache, v_cache, *, cache_seqlens, seqlen_fixed: int, block_table, capacity: int) -> None:
    """Write ``k``, ``v`` (B, Hk, Lnew, D / Dv) into the caches in place (``params`` says what
    each argument is), on CuPy's current stream of the caches' device, with no host
    synchronization. The caller has checked the shapes, dtypes and devices (and, where it read
    them, the lengths and pages)."""
    launch_for(k, v, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
               capacity=capacity).run(k, v, k_cache, v_cache, cache_seqlens, block_table, seqlen_fixed)


def launch_for(k, v, k_cache, v_cache, *, cache_seqlens, block_table, capacity: int) -> "AppendLaunch":
    """The append's launch for this call's signature (the arrays' dtype, shapes and strides, the
    lengths' and table's strides, the capacity, the device), made once per signature: a caller
    that keeps it (a repeated signature of attention_with_kvcache) runs it with no lookup."""
    key = (k.dtype, k.shape, k.strides, v.shape, v.strides, k_cache.shape, k_cache.strides, v_cache.shape,
           v_cache.strides, None if cache_seqlens is None else cache_seqlens.strides,
           None if block_table is None else (block_table.shape, block_table.strides), capacity, k_cache.device.id)
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = _launch(k, v, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                          block_table=block_table, capacity=capacity)
    return launch


@dataclasses.dataclass(frozen=True)
class AppendLaunch:
    """What a signature's append needs: its params but for the pointers and the int length
    (``template``: AppendParams' bytes), the kernel, the grid (0: no row to append), and whether
    k and v, strided by parts of an element, are copied first."""

    template: bytes
    function: object
    grid: int
    copy_new: bool

    def run(self, k, v, k_cache, v_cache, cache_seqlens, block_table, seqlen_fixed: int) -> None:
        """The launch on CuPy's current stream, for arrays of this launch's signature."""
        if not self.grid:
            return
        import cupy

        if self.copy_new:  # (never through DLPack): a copy, laid out plainly
            k, v = (x if _whole(x) else cupy.ascontiguousarray(_bits(x)).view(x.dtype) for x in (k, v))
        self.launch(k.data.ptr, v.data.ptr, k_cache.data.ptr, v_cache.data.ptr,
                    0 if cache_seqlens is None else cache_seqlens.data.ptr,
                    0 if block_table is None else block_table.data.ptr, seqlen_fixed, cupy.cuda.get_current_stream().ptr)

    def launch(self, k: int, v: int, k_cache: int, v_cache: int, cache_seqlens: int, block_table: int,
               seqlen_fixed: int, stream: int) -> None:
        """The launch from the arrays' addresses (0: no such array) on ``stream`` (copy_new's
        copies already made: ``run``'s)."""
        # (The template's bytes in this thread's launch arguments: the pointers and the int length
        # are all that change.)
        ARGS.bytes[:PARAMS_DTYPE.itemsize] = numpy.frombuffer(self.template, dtype=numpy.uint8)
        ARGS.words[_POINTER_WORDS] = k, v, k_cache, v_cache, cache_seqlens, block_table
        ARGS.words[_SEQLEN_FIXED_WORD] = seqlen_fixed
        launch_args.driver().launchKernel(self.function.kernel.ptr, self.grid, 1, 1, THREADS, 1, 1, 0, stream,
                                          ARGS.argv_ptr, 0)


# Each signature's AppendLaunch, by ``launch_for``'s key; cleared when full (a process meets few).
_LAUNCHES: dict = {}
_MAX_LAUNCHES = 256


def _launch(k, v, k_cache, v_cache, *, cache_seqlens, block_table, capacity: int) -> AppendLaunch:
    """A new signature's AppendLaunch; its errors (too many rows, caches strided by parts of an
    element) are the signature's, raised before anything is kept or written."""
    import cupy

    rows = int(k.shape[0]) * int(k.shape[1]) * int(k.shape[2])
    if rows > MAX_ROWS:
        raise ValueError(f"k has B * Hk * Lnew = {rows} rows to append; the append kernel takes at most {MAX_ROWS}")
    if rows == 0:
        return AppendLaunch(b"", None, 0, False)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _whole(cache):
            raise ValueError(f"{name}'s strides {tuple(cache.strides)} must be whole elements to append on the GPU")
    copy_new = not (_whole(k) and _whole(v))
    plain = [x if _whole(x) else cupy.ndarray(x.shape, x.dtype, memptr=x.data) for x in (k, v)]  # (strides only)
    struct = params(*plain, k_cache, v_cache, cache_seqlens=cache_seqlens, seqlen_fixed=0, block_table=block_table,
                    capacity=capacity)
    device = k_cache.device.id
    arch = kernels.arch_for_capability(*map(int, cupy.cuda.Device(device).compute_capability))
    function = kernels.get_kernel(kernel(k.itemsize, arch), device)
    return AppendLaunch(struct.tobytes(), function, min(-(-rows // (THREADS // 32)), MAX_GRID_X), copy_new)
