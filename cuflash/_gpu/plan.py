"""From a resolved Problem on CuPy arrays to one kernel launch.

``forward(problem)`` is the whole GPU forward path: pick the Variant (tiles.select), bring the
inputs into a layout the kernel can read (only when they are not already), describe every
tensor by element strides over the output's leading axes, fill the params struct, launch on
CuPy's current stream. No host synchronization happens anywhere on this path.
"""
from __future__ import annotations

import math

import numpy

from . import kernels, tiles
from .params import BWD_PARAMS_DTYPE, FWD_PARAMS_DTYPE, MAX_BATCH_DIMS

LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


def _cupy():
    import cupy

    return cupy


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


# --------------------------------------------------------------------------- forward

def forward(problem):
    """Run the forward on the GPU. Returns (out, lse) as CuPy arrays in the output shapes."""
    cupy = _cupy()
    p = problem
    out_shape, lse_shape = p.out_shape, p.lse_shape
    lse = cupy.empty(lse_shape, dtype=p.lse_dtype)
    out = p.out

    rows = math.prod(p.lead_shape) * p.seqlen_q
    if rows == 0 or p.seqlen_k == 0:
        # Nothing to compute, or no key at all: every row sees nothing (0 and -inf).
        o = out if out is not None else cupy.empty(out_shape, dtype=p.dtype)
        o[...] = 0
        lse[...] = -numpy.inf
        return o, lse

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

    device = cupy.cuda.Device()
    arch = kernels.arch_for_capability(*map(int, device.compute_capability))
    variant = tiles.select(p.dtype.name, q.shape[-1], v.shape[-1], p.has_window, arch, _mean_visible_keys(p))
    vec = 16 // p.dtype.itemsize
    q, k, v = (_readable(x, vec) for x in (q, k, v))

    # The kernel writes o in place when the caller's out= (or our own allocation) allows it.
    target = out if out is not None and _vector_ok(out, vec) else None
    o = target if target is not None else cupy.empty(out_shape, dtype=p.dtype)
    if not _vector_ok(o, vec):  # only a fresh allocation of an odd width gets here
        o = _readable(cupy.empty(out_shape, dtype=p.dtype), vec)

    layout = _Layout(p, {"q": q, "k": k, "v": v, "o": o, "lse": lse}, variant.block_m)
    _launch(variant, layout.grid_x, p.seqlen_q, variant.block_m, _fwd_struct(p, layout, q, v))
    if p.head_dim_v == 0:
        o = p.out if p.out is not None else o[..., :0]
    elif out is not None and o is not out:
        out[...] = o
        o = out
    elif not o.flags.c_contiguous:  # a padded buffer for an odd Dv: return a plain array
        o = cupy.ascontiguousarray(o)
    return o, lse


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
        longest = max(p.seqlen_q, p.seqlen_k)
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


def _fwd_struct(p, layout: _Layout, q, v):
    s = numpy.zeros((), dtype=FWD_PARAMS_DTYPE)
    for name in ("q", "k", "v", "o"):
        layout.fill(s, name)
    layout.fill(s, "lse", rows=False)
    s["batch_shape"] = [1] * (MAX_BATCH_DIMS - len(layout.batch_shape)) + layout.batch_shape
    s["num_heads"] = layout.num_heads
    s["kv_group"] = p.kv_group
    s["seqlen_q"] = p.seqlen_q
    s["seqlen_k"] = p.seqlen_k
    s["head_dim"] = q.shape[-1]
    s["head_dim_v"] = v.shape[-1]
    s["window_left"] = p.window_left
    s["window_right"] = p.window_right
    s["diag_offset"] = p.diag_offset
    s["heads_per_section"] = _heads_per_section(p, layout.grid_x, (q.shape[-1] + v.shape[-1]) * q.dtype.itemsize)
    s["scale"] = p.scale
    s["scale_log2"] = p.scale * LOG2E
    return s


def _mean_visible_keys(p) -> float:
    """Mean number of keys a query row sees under the mask, over 17 evenly spaced rows (tiles.select
    gives short rows smaller tiles)."""
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
    kv_bytes = p.seqlen_k * kv_row_bytes / p.kv_group
    # <= 65536 rows: a section's blocks (rows x at most MAX_GRID_Y tiles) stay below 2^32.
    return int(max(1, min(grid_x, 65536, _l2_bytes() // 2 // kv_bytes)))


_L2_BYTES: dict[int, int] = {}


def _l2_bytes() -> int:
    """L2 cache size of CuPy's current device (queried once per device)."""
    device = _cupy().cuda.Device()
    if device.id not in _L2_BYTES:
        _L2_BYTES[device.id] = int(device.attributes["L2CacheSize"])
    return _L2_BYTES[device.id]


def _launch(variant, grid_x: int, length: int, tile: int, struct) -> None:
    """One launch on CuPy's current stream: grid (attention rows, tiles of ``tile`` over ``length``).

    The params struct goes to the driver as a pointer to its bytes (CPointer): handed over as a
    NumPy structured scalar, CuPy would rebuild the dtype's description on every launch (30 us,
    a sixth of a small call). The driver copies the bytes at launch; ``struct`` outlives it.
    """
    kernels.get_kernel(variant)(
        (grid_x, -(-length // tile), 1),
        (variant.threads, 1, 1),
        (_struct_arg(struct),),
        shared_mem=tiles.shared_memory_bytes(variant),
    )


def _struct_arg(struct):
    try:
        from cupy.cuda.function import CPointer
    except ImportError:  # a CuPy without it: the (slower) structured scalar
        return struct
    return CPointer(struct.ctypes.data)


def _element_strides_contiguous(shape) -> list[int]:
    """Element strides of a C-contiguous (lead..., Lq) array's leading axes."""
    strides, acc = [], shape[-1]
    for n in reversed(shape[:-1]):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))


# --------------------------------------------------------------------------- backward

def backward(problem):
    """Gradients (dq, dk, dv) on the GPU, each in its input's own shape and dtype.

    Three launches on CuPy's stream: bwd_delta (delta = rowsum(dO * O) in fp32 / fp64, and the
    dq_accum workspace zeroed), then one kernel over key tiles that computes dK, dV per query
    head and, unless ``deterministic``, accumulates dQ / scale with atomics into dq_accum, then
    bwd_dq_convert (dQ = scale * dq_accum in the input dtype); with ``deterministic`` a kernel
    over query tiles computes dQ without atomics instead. Per-query-head dK/dV (GQA) and
    gradients of broadcast inputs are summed here.
    """
    cupy = _cupy()
    p = problem
    q, k, v, o, dout = p.q, p.k, p.v, p.o, p.dout
    grads_shape = (q.shape, k.shape, v.shape)
    rows = math.prod(p.lead_shape) * p.seqlen_q
    if rows == 0 or p.seqlen_k == 0 or p.head_dim_v == 0:
        # No query, no key, or Dv == 0 (out is empty, so nothing depends on the scores): zero.
        return tuple(cupy.zeros(shape, dtype=p.dtype) for shape in grads_shape)
    if p.head_dim == 0:  # all scores are 0: the same as one zero column, whose gradient is dropped
        q = cupy.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
        k = cupy.zeros(k.shape[:-1] + (1,), dtype=k.dtype)

    arch = kernels.arch_for_capability(*map(int, cupy.cuda.Device().compute_capability))
    variants = tiles.select_backward(p.dtype.name, q.shape[-1], v.shape[-1], p.has_window, arch)
    vec = 16 // p.dtype.itemsize
    q, k, v, o, dout = (_readable(x, vec) for x in (q, k, v, o, dout))
    accum = numpy.float64 if p.dtype == numpy.float64 else numpy.float32
    lse = cupy.ascontiguousarray(p.lse)

    # dK, dV per query head over the output's leading axes ("expanded"); dQ likewise. delta is
    # laid out like lse; dq_accum is (bh, Lq, D), zeroed by bwd_delta.
    lead = tuple(p.lead_shape)
    delta = cupy.empty(lead + (p.seqlen_q,), dtype=accum)
    dk = _gradient_buffer(lead + k.shape[-2:], k.shape[-1], p.dtype, vec)
    dv = _gradient_buffer(lead + v.shape[-2:], v.shape[-1], p.dtype, vec)
    dq = _gradient_buffer(lead + q.shape[-2:], q.shape[-1], p.dtype, vec)
    dq_accum = None if p.deterministic else cupy.empty(
        (math.prod(lead), p.seqlen_q, q.shape[-1]), dtype=accum)

    tensors = {"q": q, "k": k, "v": v, "o": o, "lse": lse, "dout": dout, "delta": delta,
               "dq": dq, "dk": dk, "dv": dv}
    layout = _Layout(p, tensors, min(variants.dkdv.block_n, variants.dq.block_m, variants.delta.block_m))
    struct = numpy.zeros((), dtype=BWD_PARAMS_DTYPE)
    struct["fwd"] = _fwd_struct(p, layout, q, v)
    for name in ("dout", "dq", "dk", "dv"):
        layout.fill(struct, name)
    struct["delta"] = delta.data.ptr
    struct["dq_accum"] = 0 if dq_accum is None else dq_accum.data.ptr

    # Grids: (attention rows, query tiles) for delta, the dQ conversion and the deterministic
    # dQ kernel; (attention rows, key tiles) for the dK/dV kernel.
    _launch(variants.delta, layout.grid_x, p.seqlen_q, variants.delta.block_m, struct)
    _launch(variants.dkdv, layout.grid_x, p.seqlen_k, variants.dkdv.block_n, struct)
    last = variants.dq if p.deterministic else variants.dq_convert
    _launch(last, layout.grid_x, p.seqlen_q, last.block_m, struct)

    dv = _sum_to(dv, grads_shape[2], p.kv_group, accum, p.dtype)
    if p.head_dim == 0:
        return cupy.zeros(grads_shape[0], dtype=p.dtype), cupy.zeros(grads_shape[1], dtype=p.dtype), dv
    return (
        _sum_to(dq, grads_shape[0], 1, accum, p.dtype),
        _sum_to(dk, grads_shape[1], p.kv_group, accum, p.dtype),
        dv,
    )


def _gradient_buffer(shape, width: int, dtype, vec: int):
    """A (possibly row-padded) buffer the kernels can store to with 16-byte vectors."""
    cupy = _cupy()
    if width % vec == 0:
        return cupy.empty(shape, dtype=dtype)
    padded = cupy.empty(shape[:-1] + (-(-width // vec) * vec,), dtype=dtype)
    return padded[..., :width]


def _sum_to(grad, shape, kv_group: int, accum, dtype):
    """Sum a gradient over the output's leading axes down to its input's ``shape``.

    NumPy broadcasting's adjoint: axes the input lacks or has as 1 are summed; under GQA the
    head axis splits into (kv heads, group) and the group is summed. Sums run in ``accum``.
    """
    cupy = _cupy()
    out_ndim = len(shape)
    if grad.shape == tuple(shape):
        return grad if grad.flags.c_contiguous else cupy.ascontiguousarray(grad)
    g = _widen(grad, accum)
    if kv_group > 1:  # (..., Hq, L, D) -> (..., Hkv, group, L, D), summed over the group
        g = g.reshape(g.shape[:-3] + (g.shape[-3] // kv_group, kv_group) + g.shape[-2:]).sum(axis=-3)
    extra = g.ndim - out_ndim
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape[:-2]) if n == 1 and g.shape[extra + i] != 1
    )
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    g = g.reshape(shape)
    result = cupy.empty(shape, dtype=dtype)
    _narrow(g, out=result)
    return result


# bfloat16 has no CuPy arithmetic of its own: widen and narrow through its bits (the top half
# of a float32), rounding to nearest even, NaN kept quiet.
_BF16_NARROW = None


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
