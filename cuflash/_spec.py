"""What the caller asked for: argument validation and problem resolution, shared by both backends.

``resolve_forward`` and ``resolve_backward`` turn the public arguments into a frozen ``Problem``:
arrays of one kind (NumPy or CuPy) and one floating dtype, the broadcast leading shape, the
sequence lengths and head dims, the GQA group, a finite ``scale`` (finite in float32 too, but for
float64 inputs), the mask normalised into three ints, and the caller's additive ``bias`` and
boolean ``mask`` (checked to broadcast to ``(..., Hq, Lq, Lk)``, never broadcast or copied here). Everything a caller can get wrong is
checked here, and all of it is checked before anything the caller owns (``out=``) is touched, so
the backends only ever see valid problems.

Values are read only from NumPy arrays (on CuPy arrays a host sync on every call would cost more
than it checks): a +inf sink, and a scale that with these q and k could overflow the scores
(``_check_score_range``), raise ValueError on the CPU; CuPy inputs are not checked for them.

The mask. Every mask (none, causal in either alignment, a local window, causal + window) is
``window_left``, ``window_right`` (-1 = unbounded on that side) and ``diag_offset``:

    key j is visible to query i  iff  0 <= j < Lk
                                      and (left  < 0 or j >= i + diag_offset - left)
                                      and (right < 0 or j <= i + diag_offset + right)

``diag_offset`` is Lk - Lq for the bottom-right diagonal (FlashAttention-2's causal, the default)
and 0 for the top-left one (torch's ``is_causal``). ``causal`` means ``right = 0``; a window whose
right side is positive is refused with causal rather than silently cut to 0.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from types import ModuleType
from typing import Any

import numpy

# The widest head dim (D or Dv) the kernels are built for; the CPU backend enforces it too so
# the two backends accept exactly the same problems.
MAX_HEAD_DIM = 256

# DLPack device types (dlpack.h, DLDeviceType).
_DLPACK_CPU = 1
_DLPACK_CUDA = 2

_CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")

_TooHardError = getattr(numpy, "exceptions", numpy).TooHardError  # numpy.exceptions is NumPy >= 1.25


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: identity, not ==
class PackedBatch:
    """A packed variable-length batch (flash-attn's varlen layout) run in one launch: the Problem
    then holds the heads-first views (H, total rows, D) of the packed arrays, and sequence b owns
    rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of the queries and [cu_seqlens_k[b], cu_seqlens_k[b]
    + its used length) of the keys, masked on its own lengths."""

    cu_seqlens_q: Any  # int32 (B + 1,), on the arrays' device
    cu_seqlens_k: Any  # int32 (B + 1,)
    seqused_k: Any  # int32 (B,), or None
    batch: int
    max_seqlen_q: int  # the longest sequence's length (the grid covers it)
    max_seqlen_k: int
    bottom_right: bool  # the mask's diagonal: each sequence's Lk - Lq (else 0, causal="top_left")


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: identity, not ==
class Problem:
    """One attention problem, validated. Arrays are the caller's (converted, never copied)."""

    xp: ModuleType  # numpy or cupy: the backend
    dtype: numpy.dtype  # of q, k, v and out
    q: Any
    k: Any
    v: Any
    lead_shape: tuple[int, ...]  # the output's leading axes: q's and k/v's, broadcast (GQA applied)
    kv_lead_shape: tuple[int, ...]  # k/v broadcast to lead_shape, except a head axis of Hq / kv_group
    seqlen_q: int
    seqlen_k: int
    head_dim: int  # D, of q and k
    head_dim_v: int  # Dv, of v and out
    kv_group: int  # query heads per kv head: query head h reads kv head h // kv_group
    scale: float
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded
    diag_offset: int
    has_window: bool  # window_left >= 0 or window_right >= 0
    # Score modifiers, in the order they act on s = scale * q.k: s = softcap * tanh(s / softcap);
    # s -= slope * |i + diag_offset - j| (ALiBi); then the mask. A sink joins each row's softmax
    # denominator as one more logit that carries no value.
    softcap: float | None
    alibi_slopes: Any  # float array broadcastable to lead_shape (..., Hq), or None
    sinks: Any  # float array broadcastable to lead_shape (..., Hq), or None
    out: Any  # the caller's out= array, or None
    return_lse: bool
    out_shape: tuple[int, ...]  # lead_shape + (Lq, Dv)
    lse_shape: tuple[int, ...]  # lead_shape + (Lq,)
    lse_dtype: numpy.dtype  # float64 for float64 inputs, else float32
    # The caller's arrays broadcastable to lead_shape + (Lq, Lk), as given (any strides): bias is
    # added to the (softcapped) score before ALiBi; mask (bool, True = visible) is ANDed with the
    # positional mask above.
    bias: Any = None
    mask: Any = None
    packed: PackedBatch | None = None  # a packed batch (GPU backend): per-sequence lengths and mask
    # How float32 products may be computed (resolve_precision): "highest", "ieee" or "tf32".
    precision: str = "highest"
    # Attention dropout (_dropout.py): the rate, and the seed of the keep mask (None: no dropout).
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    # The keep mask's index of the first attention row (the rest follow in C order): 0, but for a
    # packed batch's sequence b run alone by the CPU backend, b * H (the kernels' row index of a
    # packed batch is b * H + h, as the padded batch's: _varlen.py).
    dropout_first_row: int = 0

    @property
    def has_score_mods(self) -> bool:
        """Whether softcap, ALiBi or sinks modify the scores."""
        return self.softcap is not None or self.alibi_slopes is not None or self.sinks is not None

    def visible(self, i, j):
        """Whether key j is visible to query i; i and j broadcast like any NumPy index arrays."""
        seen = (i >= 0) & (i < self.seqlen_q) & (j >= 0) & (j < self.seqlen_k)
        if self.window_left >= 0:
            seen = seen & (j >= i + self.diag_offset - self.window_left)
        if self.window_right >= 0:
            seen = seen & (j <= i + self.diag_offset + self.window_right)
        return seen

    def key_range(self, row_start: int, row_stop: int) -> tuple[int, int]:
        """Keys [lo, hi) that any query row in [row_start, row_stop) may see; lo >= hi if none.

        Tiles outside this range hold no visible key for the block, so a blocked loop skips them.
        """
        lo, hi = 0, self.seqlen_k
        if row_start < row_stop:
            if self.window_left >= 0:
                lo = max(lo, row_start + self.diag_offset - self.window_left)
            if self.window_right >= 0:
                hi = min(hi, row_stop - 1 + self.diag_offset + self.window_right + 1)
        return lo, hi

    def result(self, o, lse):
        """What ``attention`` returns, given the backend's output ``o`` and ``lse``.

        With ``out=`` the output lands in the caller's array (the GPU backend writes there
        directly and passes ``out`` back as ``o``; the CPU backend's result is copied in).
        """
        if self.out is not None:
            if o is not self.out:
                self.out[...] = o
            o = self.out
        return (o, lse) if self.return_lse else o


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: identity, not ==
class BackwardProblem(Problem):
    """A ``Problem`` plus what the backward reads: dO, the forward's O and lse.

    ``out`` (the forward's out= buffer) is always None here; gradients come back in the shapes
    and dtype of q, k and v.
    """

    dout: Any = None
    o: Any = None  # the forward output, ``out_shape``
    lse: Any = None  # the forward's log-sum-exp, ``lse_shape``
    deterministic: bool = False
    bias_grad: bool = True  # with a bias: return dbias after (dq, dk, dv)

    @property
    def returns_dbias(self) -> bool:
        return self.bias is not None and self.bias_grad


def resolve_forward(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                    bias=None, mask=None, out=None, return_lse=False, precision=None, dropout_p=0.0,
                    dropout_seed=None) -> Problem:
    """Validate ``attention``'s arguments; raise TypeError/ValueError naming the bad one."""
    (q, k, v), xp = _as_arrays(("q", q), ("k", k), ("v", v))
    check_bool("return_lse", return_lse)
    fields = _resolve_shared(q, k, v, xp, scale=scale, causal=causal, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask, precision=precision,
                             dropout_p=dropout_p, dropout_seed=dropout_seed)
    if out is not None:
        _check_out(out, q, k, v, xp, fields)
    return Problem(**fields, out=out, return_lse=bool(return_lse))


def resolve_backward(dout, q, k, v, out, lse, *, scale=None, causal=False, window=None, softcap=None,
                     alibi_slopes=None, sinks=None, bias=None, mask=None, bias_grad=True,
                     deterministic=False, precision=None, dropout_p=0.0, dropout_seed=None) -> BackwardProblem:
    """Validate ``attention_backward``'s arguments; ``out`` and ``lse`` are the forward's results."""
    (dout, q, k, v, out, lse), xp = _as_arrays(("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse))
    check_deterministic(deterministic)
    check_bool("bias_grad", bias_grad)
    fields = _resolve_shared(q, k, v, xp, scale=scale, causal=causal, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask, precision=precision,
                             dropout_p=dropout_p, dropout_seed=dropout_seed)
    for name, array in (("out", out), ("dout", dout)):
        if array.dtype != fields["dtype"]:
            raise TypeError(f"{name} must have q's dtype {fields['dtype']}, got {array.dtype}")
        if tuple(array.shape) != fields["out_shape"]:
            raise ValueError(f"{name} must have the forward output's shape {fields['out_shape']}, got {tuple(array.shape)}")
    if lse.dtype != fields["lse_dtype"]:
        raise TypeError(f"lse must have dtype {fields['lse_dtype']} (as the forward returns it), got {lse.dtype}")
    if tuple(lse.shape) != fields["lse_shape"]:
        raise ValueError(f"lse must have shape {fields['lse_shape']} (leading axes + (Lq,)), got {tuple(lse.shape)}")
    return BackwardProblem(**fields, out=None, return_lse=False, dout=dout, o=out, lse=lse,
                           deterministic=bool(deterministic), bias_grad=bool(bias_grad))


def sink_gradient_per_row(xp, sinks, lse, delta):
    """dsinks of each attention row (its queries on the last axis of ``lse`` and ``delta``), before
    any sum over the axes sinks was broadcast along. A sink is one more logit with no value: its
    probability in row i is e^{sink - lse_i} and its dS is P_sink (0 - delta_i), so dsink =
    -sum_i e^{sink - lse_i} delta_i, 0 for rows with lse = -inf (they saw nothing, not even a sink).
    ``sinks`` broadcasts against ``lse``; ``xp`` is numpy or cupy. Every backend's backward and the
    ring's use this one definition."""
    seen = lse != -numpy.inf
    p_sink = xp.where(seen, xp.exp(sinks - xp.where(seen, lse, 0)), 0)
    return -(p_sink * delta).sum(axis=-1)


def check_deterministic(deterministic) -> None:
    """``deterministic`` must be a bool (or numpy.bool_): checked by the backward, and by
    ``attention_vjp`` before its forward runs."""
    check_bool("deterministic", deterministic)


def check_bool(name: str, value) -> None:
    """A flag (``return_lse``, ``deterministic``, ``bias_grad``) must be a bool or numpy.bool_."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


# --- arrays: kind, device, dtype -------------------------------------------------------------


def _as_arrays(*named):
    """Each (name, object) as a NumPy or CuPy array, all of one kind and (CuPy) one device."""
    arrays = [_as_array(name, obj) for name, obj in named]
    kinds = {name: _kind(a) for (name, _), a in zip(named, arrays)}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{name} is a {kind}.ndarray" for name, kind in kinds.items())
        raise TypeError(f"arrays must all be NumPy (CPU) or all CuPy (GPU): {described}")
    xp = numpy
    if next(iter(kinds.values())) == "cupy":
        import cupy

        xp = cupy
        devices = {name: a.device.id for (name, _), a in zip(named, arrays)}
        if len(set(devices.values())) > 1:
            described = ", ".join(f"{name} on device {d}" for name, d in devices.items())
            raise ValueError(f"arrays must all be on one CUDA device: {described}")
    return arrays, xp


def _kind(array) -> str:
    return "numpy" if isinstance(array, numpy.ndarray) else "cupy"


def _as_array(name: str, obj):
    """A numpy.ndarray or cupy.ndarray for ``obj``, sharing its memory.

    CuPy is imported only when an input is not NumPy, so the CPU backend works without it.
    Foreign arrays come in through DLPack only (never ``__cuda_array_interface__``).
    """
    if isinstance(obj, numpy.ndarray):
        # Subclasses (matrix, masked arrays) redefine operators; compute on the plain array.
        return obj if type(obj) is numpy.ndarray else obj.view(numpy.ndarray)
    if type(obj).__module__.split(".")[0] == "cupy":
        import cupy

        if isinstance(obj, cupy.ndarray):
            return obj
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__") and not isinstance(obj, numpy.generic):
        device_type = int(obj.__dlpack_device__()[0])
        if device_type == _DLPACK_CPU:
            try:
                return numpy.from_dlpack(obj)
            except (BufferError, RuntimeError, TypeError, ValueError) as error:
                array = _cpu_bfloat16(obj)
                if array is None:
                    raise TypeError(f"{name}: NumPy cannot import this CPU DLPack array: {error}") from error
                return array
        if device_type == _DLPACK_CUDA:
            try:
                import cupy
            except ImportError as error:
                raise TypeError(f"{name} is a CUDA DLPack array, which needs CuPy; install cupy") from error
            return cupy.from_dlpack(obj)
        raise TypeError(f"{name} lives on DLPack device type {device_type}; only CPU (1) and CUDA (2) are supported")
    raise TypeError(
        f"{name} must be a numpy.ndarray, a cupy.ndarray or a DLPack array (CPU or CUDA), got {type(obj).__name__}"
    )


def _cpu_bfloat16(obj):
    """A CPU bfloat16 array that numpy.from_dlpack refuses (NumPy has no bfloat16 in DLPack),
    as an ml_dtypes.bfloat16 view of the same memory; None if ``obj`` is not one."""
    if "bfloat16" not in str(getattr(obj, "dtype", "")):
        return None
    try:
        import ml_dtypes
    except ImportError as error:
        raise TypeError("bfloat16 arrays on the CPU need ml_dtypes; install ml_dtypes") from error
    if type(obj).__module__.split(".")[0] == "torch":
        import torch

        if obj.requires_grad:  # as torch's own DLPack export: no silent escape from autograd
            raise TypeError("a torch tensor that requires grad: pass tensor.detach(), or use cuflash.torch for autograd")
        # The same bytes as int16, which DLPack and NumPy both know: zero-copy either way.
        return numpy.from_dlpack(obj.view(torch.int16)).view(ml_dtypes.bfloat16)
    array = numpy.asarray(obj)  # JAX and others hand out ml_dtypes.bfloat16 through __array__
    return array if array.dtype == numpy.dtype(ml_dtypes.bfloat16) else None


def _float_dtypes() -> tuple[numpy.dtype, ...]:
    dtypes = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)]
    try:
        import ml_dtypes
    except ImportError:  # then no bfloat16 array can exist either
        pass
    else:
        dtypes.append(numpy.dtype(ml_dtypes.bfloat16))
    return tuple(dtypes)


def _check_dtypes(q, k, v) -> numpy.dtype:
    supported = _float_dtypes()
    for name, array in (("q", q), ("k", k), ("v", v)):
        if array.dtype not in supported:
            raise TypeError(
                f"{name} must have dtype float16, bfloat16, float32 or float64, got {array.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    return numpy.dtype(q.dtype)


# --- shapes, scale, mask ---------------------------------------------------------------------


def _resolve_shared(q, k, v, xp, *, scale, causal, window, softcap=None, alibi_slopes=None, sinks=None, bias=None,
                    mask=None, precision=None, dropout_p=0.0, dropout_seed=None) -> dict:
    """The Problem fields that forward and backward share (everything but out/return_lse)."""
    dropout_p, dropout_seed = resolve_dropout(dropout_p, dropout_seed)
    dtype = _check_dtypes(q, k, v)
    precision = resolve_precision(precision, dtype.name)
    for name, array in (("q", q), ("k", k), ("v", v)):
        if array.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, D), got shape {tuple(array.shape)}")
    seqlen_q, head_dim = q.shape[-2:]
    seqlen_k, head_dim_v = v.shape[-2:]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's last axis (head dim D) must equal q's: q has D={head_dim}, k has D={k.shape[-1]}")
    if k.shape[-2] != seqlen_k:
        raise ValueError(f"k and v must have the same number of keys (axis -2): k has {k.shape[-2]}, v has {seqlen_k}")
    for name, width in (("q/k head dim D", head_dim), ("v head dim Dv", v.shape[-1])):
        if width > MAX_HEAD_DIM:
            raise ValueError(f"{name} is {width}; at most {MAX_HEAD_DIM} is supported")
    lead_shape, kv_lead_shape, kv_group = _broadcast_leading(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    window_left, window_right, diag_offset = _normalise_mask(causal, window, seqlen_q, seqlen_k)
    device = None if xp is numpy else q.device.id
    scale = _resolve_scale(scale, head_dim, dtype)
    score_dtype = numpy.dtype(numpy.float64 if dtype == numpy.float64 else numpy.float32)
    softcap = _resolve_softcap(softcap)
    alibi_slopes = _per_head("alibi_slopes", alibi_slopes, xp, device, lead_shape)
    sinks = _per_head("sinks", sinks, xp, device, lead_shape)
    score_shape = tuple(lead_shape) + (int(seqlen_q), int(seqlen_k))
    bias = _per_score("bias", bias, xp, device, score_shape, _bias_dtypes(dtype))
    mask = _per_score("mask", mask, xp, device, score_shape, (numpy.dtype(bool),))
    if xp is numpy:  # reading values of CuPy arrays would cost a host sync on every call
        _check_sinks_values(sinks)
        _check_score_range(q, k, scale, score_dtype)
    return dict(
        xp=xp,
        dtype=dtype,
        q=q,
        k=k,
        v=v,
        lead_shape=lead_shape,
        kv_lead_shape=kv_lead_shape,
        seqlen_q=int(seqlen_q),
        seqlen_k=int(seqlen_k),
        head_dim=int(head_dim),
        head_dim_v=int(head_dim_v),
        kv_group=kv_group,
        scale=scale,
        window_left=window_left,
        window_right=window_right,
        diag_offset=diag_offset,
        has_window=window_left >= 0 or window_right >= 0,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        out_shape=lead_shape + (int(seqlen_q), int(head_dim_v)),
        lse_shape=lead_shape + (int(seqlen_q),),
        lse_dtype=score_dtype,
        bias=bias,
        mask=mask,
        precision=precision,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )


def resolve_dropout_seed(dropout_seed) -> int:
    """A dropout seed as a Python int in [0, 2^64) (int, NumPy integer, 0-d integer array or tensor)."""
    seed = _integer("dropout_seed", dropout_seed, "in [0, 2^64)")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"dropout_seed must be in [0, 2^64), got {seed}")
    return seed


def resolve_dropout(dropout_p, dropout_seed) -> tuple[float, int | None]:
    """``(dropout_p, dropout_seed)`` checked: a rate in [0, 1) (a Python or NumPy real, or a 0-d
    floating array or tensor) and, with a positive rate, an integer seed in [0, 2^64) (int, NumPy
    integer, 0-d integer array or tensor); ``(0.0, None)`` when nothing is dropped (a seed given
    with a zero rate is checked, then unused)."""
    if isinstance(dropout_p, (bool, numpy.bool_)) or not (isinstance(dropout_p, numbers.Real) or (
            getattr(dropout_p, "shape", None) == () and "float" in str(getattr(dropout_p, "dtype", "")))):
        described = type(dropout_p).__name__ + (f" of dtype {dropout_p.dtype}" if hasattr(dropout_p, "dtype") else "")
        raise TypeError(f"dropout_p must be a float in [0, 1), got {described}")
    rate = float(dropout_p)
    if not 0.0 <= rate < 1.0:  # (NaN fails too)
        raise ValueError(f"dropout_p must be in [0, 1), got {rate}")
    seed = None if dropout_seed is None else resolve_dropout_seed(dropout_seed)
    if rate == 0.0:
        return 0.0, None
    if seed is None:
        raise TypeError("dropout_seed is required when dropout_p > 0: an int in [0, 2^64), the same for the "
                        "forward and its backward")
    return rate, seed


PRECISIONS = ("highest", "ieee", "tf32")


def resolve_precision(precision, dtype_name: str) -> str:
    """``precision=``: how float32 inputs' products may be computed.

    - ``"highest"`` (None: the default): float32-accurate, whatever the kernel: the GPU forward
      runs 3xTF32 on tensor cores (three TF32 products per product, each step summed apart) for
      head dims up to 64 (on Hopper up to 128), where it is faster than FFMA (benchmarks/NOTES.md
      sessions 29, 52), and so does the backward on Hopper at head dims up to 64 (sessions 52-53); the
      FFMA kernels for other heads, short rows, score modifiers and the rest of the backward;
    - ``"ieee"``: FFMA only, IEEE float32 products and sums;
    - ``"tf32"``: one TF32 product (about 1e-3 relative) for speed; an opt-in, never chosen for
      the caller. The GPU forward and backward run on TF32 tensor cores (the backward for head
      dims up to 192; wider heads' backward on the FFMA kernels).
    float16, bfloat16 and float64 inputs take None or "highest" only (their kernels have one
    precision). The CPU backend computes every value in float32 (float64 for float64)."""
    if precision is None:
        return "highest"
    if not isinstance(precision, str):
        raise TypeError(f"precision must be None or one of {', '.join(map(repr, PRECISIONS))}, "
                        f"got {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))} (or None), got {precision!r}")
    if precision != "highest" and dtype_name != "float32":
        raise ValueError(f"precision={precision!r} applies to float32 inputs; {dtype_name} inputs take None or "
                         "'highest'")
    return precision


def _broadcast_leading(q_lead, k_lead, v_lead):
    """(lead_shape, kv_lead_shape, kv_group) for the leading axes of q, k and v.

    k and v broadcast with each other; the result broadcasts with q as in matmul, except on the
    head axis (-3 of the arrays) where Hq may be a multiple of Hkv (GQA, as torch's enable_gqa).
    """
    q_lead, k_lead, v_lead = tuple(map(int, q_lead)), tuple(map(int, k_lead)), tuple(map(int, v_lead))
    try:
        kv_lead = numpy.broadcast_shapes(k_lead, v_lead)
    except ValueError:
        raise ValueError(f"leading axes of k {k_lead} and v {v_lead} do not broadcast") from None
    kv_group = 1
    if q_lead and kv_lead:
        heads_q, heads_kv = q_lead[-1], kv_lead[-1]
        if heads_q != heads_kv and heads_q != 1 and heads_kv != 1:
            if heads_q == 0 or heads_kv == 0 or heads_q % heads_kv:
                raise ValueError(
                    f"leading axes of q {q_lead} and k/v {kv_lead} do not broadcast: on the head axis (-3), "
                    f"q's {heads_q} heads are not a multiple of k/v's {heads_kv} (GQA needs Hq % Hkv == 0)"
                )
            kv_group = heads_q // heads_kv
    try:
        if kv_group > 1:
            batch = numpy.broadcast_shapes(q_lead[:-1], kv_lead[:-1])
            return batch + (q_lead[-1],), batch + (kv_lead[-1],), kv_group
        lead = numpy.broadcast_shapes(q_lead, kv_lead)
    except ValueError:
        raise ValueError(f"leading axes of q {q_lead} and k/v {kv_lead} do not broadcast") from None
    return lead, lead, 1


# float16, bfloat16 and float32 inputs compute their scores in float32, and the kernels fold
# log2(e) into the scale (exp2 units): |scale| * log2(e) must be a finite float32.
_LOG2E = 1.4426950408889634
_MAX_FLOAT32_SCALE = float(numpy.finfo(numpy.float32).max) / _LOG2E


def _resolve_scale(scale, head_dim: int, dtype=None) -> float:
    """A finite float; for inputs of ``dtype`` other than float64 (None: not checked), at most
    float32's range / log2(e) in magnitude, as the scores and the kernels' scale are float32."""
    if scale is None:
        # With D == 0 every score is 0 whatever the scale; 1/sqrt(0) would turn them into NaN.
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, (bool, numpy.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (int or float) or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if dtype is not None and numpy.dtype(dtype) != numpy.float64 and abs(value) > _MAX_FLOAT32_SCALE:
        raise ValueError(
            f"scale must be finite in float32, the score type of {numpy.dtype(dtype).name} inputs "
            f"(|scale| * log2(e) <= float32's max, i.e. |scale| <= {_MAX_FLOAT32_SCALE:.4g}), got {scale!r}")
    return value


_SCORE_LIMITS = {numpy.dtype(t): float(numpy.finfo(t).max) / 2 for t in (numpy.float32, numpy.float64)}
_NATIVE_FLOATS = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def _check_score_range(q, k, scale: float, score_dtype: numpy.dtype) -> None:
    """Raise ValueError when a score, or q . k before scaling, could overflow ``score_dtype``.

    |scale * q_i . k_j| <= |scale| * |q_i| * |k_j| (Cauchy-Schwarz), so the bound
    max(1, |scale|) * max_i |q_i| * max_j |k_j| must stay within half the score type's largest
    value (room for the kernels' exp2 units, x log2(e)). Non-finite entries of q and k are left
    out: they propagate as documented. NumPy arrays only (CuPy's would need a host sync). Cost:
    nothing for float16 (its range bounds the scores already), else a max and a min per input
    (~7 us on small arrays), and row norms only when that coarse bound fails.
    """
    limit = _SCORE_LIMITS[score_dtype]
    factor = max(1.0, abs(scale))
    dtype_max = float(numpy.finfo(q.dtype).max) if q.dtype in _NATIVE_FLOATS else math.inf
    if factor * dtype_max * dtype_max * q.shape[-1] <= limit:  # float16: any values, any sane scale
        return
    q_max, k_max = _finite_abs_max(q), _finite_abs_max(k)
    if factor * q_max * k_max * q.shape[-1] <= limit:  # the norms are at most sqrt(D) * max |x|
        return
    with numpy.errstate(all="ignore"):
        bound = factor * _finite_max_norm(q, q_max) * _finite_max_norm(k, k_max)
    if bound > limit:
        if factor > 1:
            raise ValueError(
                f"scale {scale!r} with these q and k can overflow the {score_dtype.name} scores: |scale| * "
                f"max_i |q_i| * max_j |k_j| = {bound:.4g} exceeds {limit:.4g} (half of {score_dtype.name}'s "
                f"max); use a smaller scale or smaller q and k")
        raise ValueError(
            f"q . k can overflow the {score_dtype.name} scores before scale ({scale!r}) multiplies it: "
            f"max_i |q_i| * max_j |k_j| = {bound:.4g} exceeds {limit:.4g} (half of {score_dtype.name}'s max); "
            f"scale q and k down (and scale up)")


def _finite_abs_max(a) -> float:
    """max |a| over a's finite entries (0 for none): two plain reductions when all are finite."""
    if a.size == 0:
        return 0.0
    if a.dtype in _NATIVE_FLOATS:  # NaN passes their reductions silently
        top, bottom = float(numpy.maximum.reduce(a, axis=None)), float(numpy.minimum.reduce(a, axis=None))
    else:  # bfloat16's reductions warn on NaN
        with numpy.errstate(invalid="ignore"):
            top, bottom = float(numpy.maximum.reduce(a, axis=None)), float(numpy.minimum.reduce(a, axis=None))
    if math.isfinite(top) and math.isfinite(bottom):
        return max(abs(top), abs(bottom))
    finite = a[numpy.isfinite(a)]
    return float(numpy.abs(finite).max()) if finite.size else 0.0


def _finite_max_norm(a, a_max: float) -> float:
    """max over rows of the Euclidean norm of a's last axis, non-finite entries as 0, in float64
    (scaled by ``a_max`` = max |a| so that no square overflows)."""
    if a.size == 0 or a_max == 0:
        return 0.0
    x = a.astype(numpy.float64)
    x[~numpy.isfinite(x)] = 0
    x /= a_max
    return float(numpy.sqrt((x * x).sum(axis=-1)).max()) * a_max


def _check_sinks_values(sinks) -> None:
    """A sink of +inf would take every row's whole softmax (inf - inf in the running max: NaN);
    -inf (no sink) and NaN (propagates, as a NaN input) are allowed."""
    if sinks is not None and sinks.size and bool((sinks == numpy.inf).any()):
        raise ValueError("sinks must be finite or -inf (-inf: no sink), got +inf")


def _resolve_softcap(softcap) -> float | None:
    """None, or a finite float > 0 (s = softcap * tanh(s / softcap))."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, numpy.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive real number or None, got {type(softcap).__name__}")
    value = float(softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be a finite number > 0 (None: no capping), got {softcap!r}")
    return value


def _per_head(name: str, value, xp, device, lead_shape):
    """A float array of one value per (batch..., head), broadcastable to the output's leading axes
    ``lead_shape`` (flash-attn's (Hq,) and (B, Hq) both fit), of the inputs' kind and device."""
    if value is None:
        return None
    array = _like_inputs(name, value, xp, device)
    if array.dtype not in _float_dtypes():
        raise TypeError(f"{name} must be a float array (float16, bfloat16, float32 or float64), got {array.dtype}")
    if not _broadcasts_to(array, lead_shape):
        raise ValueError(f"{name} must broadcast to the output's leading axes {tuple(lead_shape)} "
                         f"(..., heads), got shape {tuple(array.shape)}")
    return array


def _broadcasts_to(array, shape) -> bool:
    """Whether ``array`` broadcasts to exactly ``shape`` (no axis added or stretched beyond it)."""
    try:
        return numpy.broadcast_shapes(tuple(array.shape), tuple(shape)) == tuple(shape)
    except ValueError:
        return False


def _like_inputs(name: str, value, xp, device):
    """``value`` as an array of the inputs' kind (NumPy or CuPy) and, for CuPy, q's device."""
    array = _as_array(name, value)
    if _kind(array) != ("numpy" if xp is numpy else "cupy"):
        where = "NumPy (CPU)" if xp is numpy else "CuPy (GPU)"
        raise TypeError(f"{name} must be a {where} array like q, got a {_kind(array)} array")
    if device is not None and array.device.id != device:
        raise ValueError(f"{name} must be on q's device {device}, got device {array.device.id}")
    return array


def _bias_dtypes(dtype: numpy.dtype) -> tuple[numpy.dtype, ...]:
    """The dtypes a bias may have with inputs of ``dtype``: theirs, or float32 for float16/bfloat16
    (whose scores are float32 anyway)."""
    if dtype.itemsize == 2:
        return dtype, numpy.dtype(numpy.float32)
    return (dtype,)


def _per_score(name: str, value, xp, device, score_shape, dtypes):
    """``bias`` or ``mask``: an array of one of ``dtypes``, broadcastable to ``score_shape``
    (the output's leading axes + (Lq, Lk)), of the inputs' kind and device; returned as given."""
    if value is None:
        return None
    array = _like_inputs(name, value, xp, device)
    if array.dtype not in dtypes:
        if name == "mask":
            raise TypeError(f"mask must be a boolean array (True = the key is visible), got dtype {array.dtype}; "
                            f"an additive float mask is a bias")
        allowed = " or ".join(d.name for d in dtypes)
        raise TypeError(f"bias must be a float array of dtype {allowed} (q is {dtypes[0].name}), got {array.dtype}")
    if not _broadcasts_to(array, score_shape):
        raise ValueError(f"{name} must broadcast to (..., Hq, Lq, Lk) = {tuple(score_shape)} (the output's leading "
                         f"axes, heads, queries, keys), got shape {tuple(array.shape)}")
    return array


def _normalise_mask(causal, window, seqlen_q: int, seqlen_k: int) -> tuple[int, int, int]:
    """(window_left, window_right, diag_offset) for the public ``causal`` and ``window``."""
    if isinstance(causal, (bool, numpy.bool_)):
        is_causal, alignment = bool(causal), "bottom_right"
    elif isinstance(causal, str):
        if causal not in _CAUSAL_ALIGNMENTS:
            raise ValueError(f"causal must be False, True, 'bottom_right' or 'top_left', got {causal!r}")
        is_causal, alignment = True, causal
    else:
        raise TypeError(f"causal must be a bool or 'bottom_right' / 'top_left', got {type(causal).__name__}")

    left, right = -1, -1
    if window is not None:
        if not isinstance(window, (tuple, list)):
            raise TypeError(f"window must be None or a (left, right) tuple of ints, got {type(window).__name__}")
        if len(window) != 2:
            raise ValueError(f"window must have exactly two entries (left, right), got {len(window)}")
        sizes = [_integer(f"window {side}", size, "(-1 = unbounded)") for side, size in zip(("left", "right"), window)]
        for side, size in zip(("left", "right"), sizes):
            if size < -1:
                raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {size}")
        if is_causal and sizes[1] > 0:
            raise ValueError(
                f"window right must be 0 or -1 with causal (causal hides every key after the diagonal), "
                f"got {sizes[1]}: pass window=({sizes[0]}, 0), or causal=False for a window that looks ahead")
        # A side wider than Lq + Lk never excludes a key; clamping it keeps it in the kernels' int32.
        left, right = (min(size, seqlen_q + seqlen_k) for size in sizes)
    if is_causal:
        right = 0
    diag_offset = seqlen_k - seqlen_q if alignment == "bottom_right" else 0
    return left, right, diag_offset


def _integer(name: str, value, note: str = "") -> int:
    """``value`` as a Python int: an int, a NumPy integer, or a 0-d integer array or tensor
    (flash-attn's callers pass ``window_size`` entries as 0-d tensors); never a bool."""
    if not isinstance(value, (bool, numpy.bool_)) and "bool" not in str(getattr(value, "dtype", "")):
        if isinstance(value, numbers.Integral):
            return int(value)
        if getattr(value, "shape", None) == () or getattr(value, "ndim", None) == 0:
            try:
                return operator.index(value)
            except TypeError:  # a 0-d float array or tensor
                pass
    described = type(value).__name__ + (f" of dtype {value.dtype}" if hasattr(value, "dtype") else "")
    raise TypeError(f"{name} must be an int{' ' + note if note else ''}, got {described}")


# --- out= ------------------------------------------------------------------------------------


def _check_out(out, q, k, v, xp, fields) -> None:
    """out must be writeable, q's kind, dtype and device, the output's exact shape, and disjoint from inputs."""
    if not isinstance(out, xp.ndarray):  # never converted: the result must land in this very array
        raise TypeError(f"out must be a {xp.__name__}.ndarray like q, got {type(out).__module__}.{type(out).__name__}")
    if out.dtype != fields["dtype"]:
        raise TypeError(f"out must have q's dtype {fields['dtype']}, got {out.dtype}")
    if tuple(out.shape) != fields["out_shape"]:
        raise ValueError(f"out must have shape {fields['out_shape']} (leading axes + (Lq, Dv)), got {tuple(out.shape)}")
    if xp is numpy and not out.flags.writeable:
        raise ValueError("out must be writeable")
    if xp is not numpy and out.device.id != q.device.id:
        raise ValueError(f"out must be on q's device {q.device.id}, got device {out.device.id}")
    if _has_internal_overlap(out):
        raise ValueError("out must not have overlapping elements (a broadcast or self-overlapping view)")
    for name, array in (("q", q), ("k", k), ("v", v), ("alibi_slopes", fields.get("alibi_slopes")),
                        ("sinks", fields.get("sinks")), ("bias", fields.get("bias")), ("mask", fields.get("mask"))):
        if array is not None and _overlaps(out, array, xp):
            raise ValueError(f"out must not share memory with {name}")


def _overlaps(a, b, xp) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    if xp is numpy:
        try:
            return bool(numpy.shares_memory(a, b, max_work=1 << 16))
        except _TooHardError:  # undecided within the work bound: assume the worst
            return bool(numpy.may_share_memory(a, b))
    # CuPy's exact shares_memory runs kernels over every element; a byte-range test is enough.
    a_lo, a_hi = _byte_bounds(a.data.ptr, a.shape, a.strides, a.itemsize)
    b_lo, b_hi = _byte_bounds(b.data.ptr, b.shape, b.strides, b.itemsize)
    return a_lo < b_hi and b_lo < a_hi


def _byte_bounds(ptr: int, shape, strides, itemsize: int) -> tuple[int, int]:
    """[lo, hi) of the bytes a non-empty strided array touches."""
    key = (tuple(shape), tuple(strides), itemsize)
    reach = _REACHES.get(key)
    if reach is None:  # (a loop per array per call otherwise: a decoding loop's calls repeat their shapes)
        lo = hi = 0
        for extent, stride in zip(shape, strides):
            step = (extent - 1) * stride
            lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
        if len(_REACHES) >= 1024:
            _REACHES.clear()
        reach = _REACHES[key] = (lo, hi + itemsize)
    return ptr + reach[0], ptr + reach[1]


_REACHES: dict = {}  # (shape, strides, itemsize) -> the bytes below and past an array's pointer it touches


def _has_internal_overlap(array) -> bool:
    """Conservative: True unless each axis's stride clears everything the smaller axes span."""
    if array.size == 0:
        return False
    axes = sorted((abs(s), n) for n, s in zip(array.shape, array.strides) if n > 1)
    span = array.itemsize
    for stride, extent in axes:
        if stride < span:
            return True
        span = stride * (extent - 1) + span
    return False


def memory_order(shape, strides) -> tuple[int, ...] | None:
    """The order of an array's axes in memory, outermost first, when the array is a transposed
    view of a whole C-contiguous buffer that keeps its last axis last (a (B, L, H, D) buffer seen
    as (B, H, L, D)); None when it is C-contiguous itself or anything else (broadcast, sliced,
    padded rows). ``strides`` in elements. Axes of length 1 have no place in memory: they go
    first. The GPU plans allocate outputs and gradients in their inputs' order (``empty(...,
    order=)``), as NumPy's ``empty_like`` keeps an input's: a caller that transposes back gets a
    contiguous array and copies nothing (transformers' ``out.transpose(1, 2).contiguous()``, the
    reshapes of its gradients), as with torch's own attention kernels.
    """
    ndim = len(shape)
    if ndim < 2 or (shape[-1] > 1 and strides[-1] != 1):
        return None
    ones = [a for a in range(ndim - 1) if shape[a] == 1]
    order = sorted((a for a in range(ndim - 1) if shape[a] > 1), key=lambda a: (-strides[a], a))
    expected = shape[-1]
    for axis in reversed(order):
        if strides[axis] != expected:
            return None
        expected *= shape[axis]
    full = tuple(ones + order + [ndim - 1])
    return None if list(full[len(ones):-1]) == sorted(full[len(ones):-1]) else full


def strides_in_order(shape, order) -> tuple[int, ...]:
    """Element strides of a whole buffer of ``shape`` whose axes lie in memory in ``order``
    (memory_order's, outermost first; None: C order): what empty_in_order lays out, for
    allocators that take strides (the torch adapter's torch.empty_strided)."""
    strides, step = [0] * len(shape), 1
    for axis in reversed(order if order is not None else range(len(shape))):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


def array_order(x) -> tuple[int, ...] | None:
    """memory_order of a NumPy or CuPy array (strides in bytes)."""
    return memory_order(tuple(x.shape), tuple(s // x.itemsize for s in x.strides))


def empty_in_order(allocate, shape, dtype, order):
    """``allocate(shape, dtype)`` (a NumPy or CuPy allocator) laid out in ``order``
    (memory_order's; None: C order), seen in ``shape``."""
    if order is None:
        return allocate(shape, dtype)
    buffer = allocate(tuple(shape[a] for a in order), dtype)
    return buffer.transpose(tuple(int(a) for a in numpy.argsort(order)))


def result_order(x, shape, itemsize: int) -> tuple[int, ...] | None:
    """The memory order of a result of ``shape`` (items of ``itemsize`` bytes) that stands for
    ``x`` (out for q, dq for q, dk for k, dv for v): x's (memory_order), where the result has x's
    axes (its last may differ in length) and whole 16-byte rows (the GPU kernels' vector stores);
    else None, C order. Both backends lay their results out by this rule."""
    return layout_order(tuple(x.shape), tuple(s // x.itemsize for s in x.strides), shape, itemsize)


def layout_order(x_shape, x_strides, shape, itemsize: int) -> tuple[int, ...] | None:
    """result_order from x's shape and strides (in elements): the torch adapter's custom ops
    promise their results' layout to torch.compile by it before any result exists."""
    if len(shape) != len(x_shape) or tuple(shape[:-1]) != tuple(x_shape[:-1]) or (shape[-1] * itemsize) % 16:
        return None
    return memory_order(x_shape, x_strides)
