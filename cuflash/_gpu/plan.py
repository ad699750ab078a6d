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
from .params import FWD_PARAMS_DTYPE, MAX_BATCH_DIMS

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
    variant = tiles.select(p.dtype.name, q.shape[-1], v.shape[-1], p.has_window, arch)
    vec = 16 // p.dtype.itemsize
    q, k, v = (_readable(x, vec) for x in (q, k, v))

    # The kernel writes o in place when the caller's out= (or our own allocation) allows it.
    target = out if out is not None and _vector_ok(out, vec) else None
    o = target if target is not None else cupy.empty(out_shape, dtype=p.dtype)
    if not _vector_ok(o, vec):  # only a fresh allocation of an odd width gets here
        o = _readable(cupy.empty(out_shape, dtype=p.dtype), vec)

    params = _fwd_params(p, variant, q, k, v, o, lse)
    grid_y = -(-p.seqlen_q // variant.block_m)
    kernel = kernels.get_kernel(variant)
    kernel(
        (params["_grid_x"], grid_y, 1),
        (variant.threads, 1, 1),
        (params["struct"],),
        shared_mem=tiles.shared_memory_bytes(variant),
    )
    if p.head_dim_v == 0:
        o = p.out if p.out is not None else o[..., :0]
    elif out is not None and o is not out:
        out[...] = o
        o = out
    elif not o.flags.c_contiguous:  # a padded buffer for an odd Dv: return a plain array
        o = cupy.ascontiguousarray(o)
    return o, lse


def _fwd_params(p, variant, q, k, v, o, lse) -> dict:
    lead = tuple(p.lead_shape)
    if lead:
        num_heads, batch_axes = lead[-1], list(lead[:-1])
    else:
        num_heads, batch_axes = 1, []

    tensors = {"q": q, "k": k, "v": v, "o": o}
    strides = {name: _element_strides(x, lead) for name, x in tensors.items()}
    strides["lse"] = _element_strides_contiguous(lse.shape)
    heads = {name: (s[-1] if lead else 0) for name, s in strides.items()}
    batch_strides = {name: s[:-1] if lead else [] for name, s in strides.items()}
    batch_shape, batch_strides = _merge_batch_axes(batch_axes, batch_strides)
    if len(batch_shape) > MAX_BATCH_DIMS:
        raise ValueError(
            f"cuflash: the leading axes {lead} need {len(batch_shape)} independent batch strides; "
            f"at most {MAX_BATCH_DIMS} are supported (make the inputs contiguous)"
        )
    grid_x = math.prod(batch_shape) * num_heads
    if grid_x > MAX_GRID_X:
        raise ValueError(f"cuflash: {grid_x} attention heads in one call exceed {MAX_GRID_X}")
    if -(-p.seqlen_q // variant.block_m) > MAX_GRID_Y:
        raise ValueError(f"cuflash: seqlen_q={p.seqlen_q} exceeds {MAX_GRID_Y * variant.block_m}")

    pad = MAX_BATCH_DIMS - len(batch_shape)
    s = numpy.zeros((), dtype=FWD_PARAMS_DTYPE)
    for name, x in (*tensors.items(), ("lse", lse)):
        s[name] = x.data.ptr
        s[f"{name}_batch_stride"] = [0] * pad + batch_strides[name]
        s[f"{name}_head_stride"] = heads[name]
    for name, x in tensors.items():
        s[f"{name}_row_stride"] = x.strides[-2] // x.dtype.itemsize
    s["batch_shape"] = [1] * pad + batch_shape
    s["num_heads"] = num_heads
    s["kv_group"] = p.kv_group
    s["seqlen_q"] = p.seqlen_q
    s["seqlen_k"] = p.seqlen_k
    s["head_dim"] = q.shape[-1]
    s["head_dim_v"] = v.shape[-1]
    s["window_left"] = p.window_left
    s["window_right"] = p.window_right
    s["diag_offset"] = p.diag_offset
    s["scale"] = p.scale
    s["scale_log2"] = p.scale * LOG2E
    return {"struct": s, "_grid_x": grid_x}


def _element_strides_contiguous(shape) -> list[int]:
    """Element strides of a C-contiguous (lead..., Lq) array's leading axes."""
    strides, acc = [], shape[-1]
    for n in reversed(shape[:-1]):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))
