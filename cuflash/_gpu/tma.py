"""Tensor maps for the bulk tensor copy engine (TMA, compute capability 9.0+).

A kernel's ``cp.async.bulk.tensor`` (ptx.cuh section 10) reads a 128-byte tensor map: the
tensor's base address, its sizes and byte strides (innermost axis first, the innermost
contiguous), the box one copy moves, the shared-memory swizzle. The driver encodes it
(``cuTensorMapEncodeTiled``); CuPy does not wrap that call, so it is reached through ctypes in
the driver library CuPy itself runs on. A map travels to the kernel inside its params struct,
passed as a ``__grid_constant__`` (``ptx::TensorMap``, 64-byte aligned).

``TensorMapSpec`` is everything but the address, checked against the driver's rules before any
call (so a bad layout is a ValueError naming what is wrong, not a CUDA error); ``encode`` turns
a spec and an address into the 128 bytes; ``replace_address`` re-points encoded bytes at another
tensor of the same layout (``cuTensorMapReplaceAddress``), which is what a replayed plan needs per
call. Nothing here touches the GPU but ``encode`` and ``replace_address``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools

import numpy

MAP_BYTES = 128
MAX_RANK = 5
# cuda.h's CUtensorMapDataType for the dtypes cuflash reads, and their bytes.
DATA_TYPES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
ITEMSIZES = {"float16": 2, "float32": 4, "float64": 8, "bfloat16": 2}
# CUtensorMapSwizzle: bytes of the swizzle span (None: no swizzle) -> enum.
SWIZZLES = {None: 0, 32: 1, 64: 2, 128: 3}
_L2_PROMOTION_128B = 2  # CU_TENSOR_MAP_L2_PROMOTION_L2_128B
_OOB_FILL_ZERO = 0      # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: boxes past the tensor's end read zeros


@dataclasses.dataclass(frozen=True)
class TensorMapSpec:
    """A tensor map less its address. ``dims`` and ``box`` innermost first (the contiguous axis
    first), ``strides`` the byte strides of the outer axes (len(dims) - 1 of them)."""

    dtype: str
    dims: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int | None = None

    def __post_init__(self):
        _itemsize(self.dtype)
        rank = len(self.dims)
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"a tensor map has 1 to {MAX_RANK} axes, got {rank}")
        if len(self.box) != rank or len(self.strides) != rank - 1:
            raise ValueError(f"tensor map of {rank} axes needs {rank} box sizes and {rank - 1} strides, got "
                             f"{len(self.box)} and {len(self.strides)}")
        if any(not 1 <= n <= 2**32 for n in self.dims):
            raise ValueError(f"tensor map sizes must be in [1, 2^32], got {self.dims}")
        if any(s % 16 or not 0 < s < 2**40 for s in self.strides):
            raise ValueError(f"tensor map strides must be positive multiples of 16 bytes below 2^40, got {self.strides}")
        if any(not 1 <= b <= 256 for b in self.box):
            raise ValueError(f"tensor map box sizes must be in [1, 256], got {self.box}")
        inner = self.box[0] * self.itemsize
        if inner % 16:
            raise ValueError(f"a tensor map box's inner extent must be a multiple of 16 bytes, got {inner}")
        if self.swizzle not in SWIZZLES:
            raise ValueError(f"swizzle must be one of {', '.join(map(str, SWIZZLES))}, got {self.swizzle!r}")
        if self.swizzle is not None and inner > self.swizzle:
            raise ValueError(f"a {self.swizzle}-byte swizzle takes boxes of at most {self.swizzle} bytes per row, "
                             f"got {inner}")

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def box_bytes(self) -> int:
        """Bytes one copy of a whole box lands in shared memory (what its mbarrier expects)."""
        return self.itemsize * int(numpy.prod(self.box))

    @classmethod
    def of(cls, shape, strides, dtype: str, box, swizzle: int | None = None) -> TensorMapSpec:
        """The spec of an array of ``shape`` and byte ``strides`` (NumPy's order: outermost first),
        its last axis contiguous; ``box`` in the same order. Axes of length 1 keep a stride the
        driver accepts."""
        shape, strides, box = tuple(map(int, shape)), tuple(map(int, strides)), tuple(map(int, box))
        item = _itemsize(dtype)
        if len(shape) != len(strides) or len(box) != len(shape):
            raise ValueError(f"shape {shape}, strides {strides} and box {box} must have one entry per axis")
        if shape and shape[-1] > 1 and strides[-1] != item:
            raise ValueError(f"the innermost axis must be contiguous ({item}-byte stride), got {strides[-1]}")
        # A length-1 axis is never stepped: any valid stride does (16 bytes).
        outer = tuple(s if n > 1 else 16 for n, s in zip(shape[:-1], strides[:-1]))
        return cls(dtype, shape[::-1], outer[::-1], box[::-1], swizzle)


def _itemsize(dtype: str) -> int:
    if dtype not in DATA_TYPES:
        raise ValueError(f"tensor map dtype must be one of {', '.join(DATA_TYPES)}, got {dtype!r}")
    return ITEMSIZES[dtype]


@functools.lru_cache(maxsize=None)
def _library():
    """The CUDA driver library (the one CuPy runs on), initialised, with the two tensor-map calls
    typed."""
    lib = ctypes.CDLL("libcuda.so.1")
    status = lib.cuInit(0)  # idempotent; CuPy has done it already wherever a CuPy array exists
    if status != 0:
        raise RuntimeError(f"cuInit failed (CUresult {status})")
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
    lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                                           u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cuTensorMapReplaceAddress.restype = ctypes.c_int
    lib.cuTensorMapReplaceAddress.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _aligned_map() -> tuple[numpy.ndarray, numpy.ndarray]:
    """A 64-byte aligned 128-byte host buffer (the driver writes CUtensorMap there) and the
    uint8 array owning it."""
    raw = numpy.zeros(MAP_BYTES + 64, dtype=numpy.uint8)
    start = -raw.ctypes.data % 64
    return raw[start: start + MAP_BYTES], raw


def encode(spec: TensorMapSpec, address: int) -> bytes:
    """The 128 bytes of the tensor map of ``spec`` at device ``address`` (16-byte aligned)."""
    if address % 16:
        raise ValueError(f"a tensor map's base address must be 16-byte aligned, got {address:#x}")
    rank = len(spec.dims)
    out, _owner = _aligned_map()
    dims = (ctypes.c_uint64 * rank)(*spec.dims)
    strides = (ctypes.c_uint64 * max(rank - 1, 1))(*(spec.strides or (0,)))
    box = (ctypes.c_uint32 * rank)(*spec.box)
    steps = (ctypes.c_uint32 * rank)(*([1] * rank))
    status = _library().cuTensorMapEncodeTiled(
        out.ctypes.data, DATA_TYPES[spec.dtype], rank, ctypes.c_void_p(address), dims, strides, box, steps, 0,
        SWIZZLES[spec.swizzle], _L2_PROMOTION_128B, _OOB_FILL_ZERO)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {status}) for {spec} at {address:#x}")
    return out.tobytes()


def replace_address_in_place(map_address: int, address: int) -> None:
    """Re-point the encoded map at host address ``map_address`` (64-byte aligned, e.g. inside a
    params struct about to be launched) at device ``address``: a replayed plan's per-call cost."""
    if address % 16:
        raise ValueError(f"a tensor map's base address must be 16-byte aligned, got {address:#x}")
    status = _library().cuTensorMapReplaceAddress(ctypes.c_void_p(map_address), ctypes.c_void_p(address))
    if status != 0:
        raise RuntimeError(f"cuTensorMapReplaceAddress failed (CUresult {status}) at {address:#x}")


def replace_address(encoded: bytes, address: int) -> bytes:
    """``encoded`` re-pointed at ``address`` (same layout, another tensor)."""
    if address % 16:
        raise ValueError(f"a tensor map's base address must be 16-byte aligned, got {address:#x}")
    out, _owner = _aligned_map()
    out[:] = numpy.frombuffer(encoded, dtype=numpy.uint8)
    status = _library().cuTensorMapReplaceAddress(out.ctypes.data, ctypes.c_void_p(address))
    if status != 0:
        raise RuntimeError(f"cuTensorMapReplaceAddress failed (CUresult {status}) at {address:#x}")
    return out.tobytes()
