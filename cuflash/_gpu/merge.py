"""merge_attention on the GPU: one launch of ``cuda_src/merge_attention.cu``.

The kernel reads the S parts where they lie: a stacked ``(S, ..., Lq, Dv)`` array through its
strides (any, but for a contiguous last axis), a Python sequence of at most ``TABLE`` arrays of
one shape and strides through a table of their pointers. Only what the kernel cannot address is
copied first: a last axis that is not contiguous, a longer sequence or one whose parts differ in
strides (stacked on the device), or rows spread over more than ``DIMS`` axes that do not merge.
The kernel is compiled like the attention kernels (``kernels.get_kernel``: NVRTC, the same
options and source digest, memoized per device, CuPy's disk cache) and launched through the
driver on CuPy's current stream, its arguments one by-value struct (``PARAMS_DTYPE``).
"""
from __future__ import annotations

import math

import numpy

from . import kernels, launch_args
from .launch_args import ARGS
from .plan import _merge_batch_axes
from .variant import HelperKernel

TABLE = 16     # CUFLASH_MERGE_TABLE: part pointers passed as they are
DIMS = 4       # CUFLASH_MERGE_DIMS: row axes the kernel walks by strides
THREADS = 256  # CUFLASH_MERGE_THREADS
COLUMNS = 16   # CUFLASH_MERGE_COLUMNS: columns of a row each thread keeps per pass (16-byte chunks)
MAX_GRID_X = 2**31 - 1

# The NumPy mirror of ``struct MergeParams``: every field 8 bytes wide, in the struct's order.
PARAMS_DTYPE = numpy.dtype(
    [
        ("outs", numpy.uint64, (TABLE,)),
        ("lses", numpy.uint64, (TABLE,)),
        ("out", numpy.uint64),
        ("lse", numpy.uint64),
        ("outs_part_stride", numpy.int64),
        ("lses_part_stride", numpy.int64),
        ("row_shape", numpy.int64, (DIMS,)),
        ("outs_row_stride", numpy.int64, (DIMS,)),
        ("lses_row_stride", numpy.int64, (DIMS,)),
        ("num_parts", numpy.int64),
        ("rows", numpy.int64),
        ("dv", numpy.int64),
        ("lanes", numpy.int64),
    ],
    align=True,
)


def merge_kernel(dtype: str, arch: str) -> HelperKernel:
    """The merge kernel for one dtype (a key of variant.CUDA_TYPES) and arch."""
    return HelperKernel("merge_attention", "merge_attention", dtype, arch, THREADS)


def lanes_for(dv: int) -> int:
    """Threads per row: the fewest (a power of two, at most a warp) that cover Dv in one pass."""
    lanes = 1
    while lanes < 32 and lanes * COLUMNS < dv:
        lanes *= 2
    return lanes


def merge(outs, lses, *, num_parts: int, out_shape: tuple, dtype, lse_dtype):
    """``(out, lse)`` as new contiguous CuPy arrays. ``outs``: a stacked ``(S, ..., Lq, Dv)``
    CuPy array or a list of S ``(..., Lq, Dv)`` ones (one shape and dtype, validated); ``lses``
    likewise without Dv. No host synchronization."""
    import cupy

    device = (outs if isinstance(outs, cupy.ndarray) else outs[0]).device.id
    with cupy.cuda.Device(device):
        out = cupy.empty(out_shape, dtype=dtype)
        lse = cupy.empty(out_shape[:-1], dtype=lse_dtype)
        rows, dv = math.prod(out_shape[:-1]), out_shape[-1]
        if rows == 0:
            return out, lse
        outs = _addressable(outs, last_axis=True)
        lses = _addressable(lses, last_axis=False)
        row_shape = list(out_shape[:-1])
        shape, strides = _row_axes(row_shape, outs, lses, dv)
        if len(shape) > DIMS:  # rows the kernel cannot walk: lay both inputs out plainly
            outs, lses = (_stack(x) for x in (outs, lses))
            shape, strides = _row_axes(row_shape, outs, lses, dv)

        params = numpy.zeros((), dtype=PARAMS_DTYPE)
        for name, parts in (("outs", outs), ("lses", lses)):
            table, part_stride = _pointer_table(parts, num_parts)
            params[name][: len(table)] = table
            params[f"{name}_part_stride"] = part_stride
        pad = DIMS - len(shape)
        params["row_shape"] = [1] * pad + shape
        params["outs_row_stride"] = [0] * pad + strides["outs"]
        params["lses_row_stride"] = [0] * pad + strides["lses"]
        params["out"], params["lse"] = out.data.ptr, lse.data.ptr
        lanes = lanes_for(dv)
        params["num_parts"], params["rows"], params["dv"], params["lanes"] = num_parts, rows, dv, lanes

        arch = kernels.arch_for_capability(*map(int, cupy.cuda.Device(device).compute_capability))
        kernel = kernels.get_kernel(merge_kernel(numpy.dtype(dtype).name, arch), device)
        grid = min(-(-rows // (THREADS // lanes)), MAX_GRID_X)
        ARGS.bytes[:PARAMS_DTYPE.itemsize] = numpy.frombuffer(params, dtype=numpy.uint8)
        launch_args.driver().launchKernel(kernel.kernel.ptr, grid, 1, 1, THREADS, 1, 1, 0,
                                          cupy.cuda.get_current_stream().ptr, ARGS.argv_ptr, 0)
        return out, lse


def _addressable(x, *, last_axis: bool):
    """``x`` (stacked array or list of parts) itself when the kernel can read it in place, else
    a stacked copy: every stride a whole number of elements, the last axis of outs contiguous,
    and a list's parts at most TABLE of one layout."""
    parts = [x] if not isinstance(x, list) else x
    item = parts[0].dtype.itemsize
    readable = all(s % item == 0 for p in parts for s in p.strides)
    if last_axis:
        readable = readable and all(p.shape[-1] <= 1 or p.strides[-1] == item for p in parts)
    if isinstance(x, list):
        readable = readable and len(x) <= TABLE and all(p.strides == x[0].strides for p in x)
    return x if readable else _stack(x)


def _stack(x):
    """One C-contiguous ``(S, ...)`` array of the parts, copied on the device. The copy runs on
    unsigned integers of the element's width: CuPy has no bfloat16 arithmetic of its own."""
    import cupy

    first = x if not isinstance(x, list) else x[0]
    bits = numpy.dtype(f"uint{8 * first.dtype.itemsize}")
    if not isinstance(x, list):
        return cupy.ascontiguousarray(x.view(bits)).view(first.dtype)
    return cupy.stack([p.view(bits) for p in x]).view(first.dtype)


def _element_strides(x, axes: slice) -> list[int]:
    """The row axes' strides, in elements, of a stacked array (after its part axis) or of a
    list's parts (one layout)."""
    if isinstance(x, list):
        array, offset = x[0], 0
    else:
        array, offset = x, 1
    strides = array.strides[offset:]
    return [s // array.dtype.itemsize for s in strides][axes]


def _row_axes(row_shape: list[int], outs, lses, dv: int):
    """The row axes (the output's leading axes and Lq), size-1 axes dropped and neighbours that
    both inputs walk contiguously merged: ``(shape, {"outs": strides, "lses": strides})``."""
    strides = {"outs": _element_strides(outs, slice(0, -1)), "lses": _element_strides(lses, slice(None))}
    shape, strides = _merge_batch_axes(list(row_shape), strides)
    if not shape:  # a single row
        return [1], {"outs": [0], "lses": [0]}
    return shape, strides


def _pointer_table(x, num_parts: int) -> tuple[list[int], int]:
    """(the first min(S, TABLE) part pointers, the part stride in elements past them)."""
    if isinstance(x, list):
        return [p.data.ptr for p in x], 0
    item = x.dtype.itemsize
    stride = x.strides[0] // item
    return [x.data.ptr + s * x.strides[0] for s in range(min(num_parts, TABLE))], stride
