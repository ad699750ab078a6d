"""PyTorch adapter: cuflash as a differentiable torch operator, plus drop-ins for SDPA and flash-attn.

- ``attention(q, k, v, ...)``: cuflash's own semantics ((..., L, D) layout, broadcasting, GQA,
  bottom-right ``causal``, ``window``) on torch tensors, with autograd.
- ``scaled_dot_product_attention``: ``torch.nn.functional.scaled_dot_product_attention``'s
  signature and semantics ((B, H, L, D), top-left ``is_causal``, ``enable_gqa``);
  ``sdpa_override()`` puts it in torch's place for a block (code that calls F.sdpa).
- ``flash_attn_func``: flash-attn 2's signature and semantics ((B, L, H, D), bottom-right
  ``causal``, ``window_size``); ``flash_attn_varlen_func`` its packed-sequence form, and
  ``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``, ``flash_attn_varlen_qkvpacked_func``
  and ``flash_attn_varlen_kvpacked_func`` the stacked-qkv/kv layouts, as views over those two.

How it is wired. Eager calls run a ``torch.autograd.Function``; under ``torch.compile`` the same
work runs as two ``torch.library.custom_op``s, ``cuflash::attention_fwd`` (returns out and lse)
and ``cuflash::attention_bwd``, each with a ``register_fake`` shape function, joined by
``register_autograd``, which compile traces with ``fullgraph=True`` and no graph break (the custom
op machinery costs tens of microseconds per call, which eager calls need not pay);
``flash_attn_varlen_func`` likewise runs as ``cuflash::attention_varlen_fwd`` / ``_bwd``,
``merge_attention`` as ``cuflash::merge_attention``, and
``flash_attn_with_kvcache`` as ``cuflash::flash_attn_with_kvcache`` (``_append`` with new keys,
declared as writing the caches). Nothing the adapter remembers between eager calls
is read while compile traces (a traced read would become a guard of the graph). Either way the
forward saves q, k, v, out and lse, and the backward calls cuflash's backward on them (the forward
never runs twice).

The fast path. On CUDA tensors a call looks its plan up by the tensors' dtypes, shapes, strides,
alignment, device and the options (``cuflash._gpu.plan``): a repeated call allocates its outputs
with torch (``torch.empty``) and launches on torch's current stream, with no CuPy array and no
DLPack crossing; a bias, a mask and softcap too (a bias's copy, where its layout needs one, by
torch ops; a key-padding mask's cut and dbias's sum by cuflash's kernels, launched as the
attention kernels are). The first call of a signature takes the full path below. Everything the torch
path allocates — outputs and workspaces, on either path — comes from torch's caching allocator,
so ``torch.cuda.max_memory_allocated`` sees it, CUDA graph capture puts it in the graph's pool,
and no second pool holds memory beside torch's.

Crossing. CUDA tensors reach CuPy through DLPack (``cupy.from_dlpack``, zero-copy, bfloat16
included) and the results come back through ``torch.from_dlpack``; the work runs on torch's
current stream of the tensor's device, and nothing synchronizes. CPU tensors run cuflash's NumPy
backend through ``numpy.from_dlpack`` / ``torch.from_numpy`` (NumPy has no bfloat16 in DLPack,
so bfloat16 crosses as its bits, int16, reinterpreted as ``ml_dtypes.bfloat16``).
"""
# No ``from __future__ import annotations``: custom_op reads the annotations to build the schema.
import contextlib
import functools
import math
import re
import sys
import threading
import types
import warnings
from typing import Optional, Tuple

try:
    import torch
    import torch.distributed as dist
except ImportError as error:  # pragma: no cover - exercised only where torch is missing
    raise ImportError(
        "cuflash.torch needs PyTorch (torch >= 2.4): pip install torch, or pip install 'cuflash[torch]'"
    ) from error

import numpy

from . import _api, _kvcache, _merge, _spec, _varlen
from . import distributed as _ring

__all__ = ["attention", "scaled_dot_product_attention", "sdpa_override", "SDPA_COUNTS", "flash_attn_func",
           "flash_attn_varlen_func",
           "flash_attn_with_kvcache",
           "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "merge_attention"]

# The op schemas carry ``causal`` as one of these names (a schema has no bool-or-str type).
_CAUSAL_BY_NAME = {"none": False, "bottom_right": "bottom_right", "top_left": "top_left"}


# --- the public functions ----------------------------------------------------------------------


def attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
              bias=None, mask=None, deterministic=False, return_lse=False, precision=None, dropout_p=0.0,
              dropout_seed=None):
    """:func:`cuflash.attention` on torch tensors, differentiable in q, k, v, ``sinks`` and ``bias``.

    Same shapes and semantics as :func:`cuflash.attention` (``(..., L, D)``, broadcasting,
    GQA by head count, ``causal`` True/"bottom_right"/"top_left", ``window=(left, right)``,
    ``softcap``, ``alibi_slopes`` and ``sinks`` tensors broadcastable to ``(..., Hq)``). CUDA tensors run cuflash's kernels on torch's current
    stream; CPU tensors run the NumPy backend. ``deterministic=True`` makes the backward bitwise
    reproducible. ``bias`` (float, broadcastable to ``(..., Hq, Lq, Lk)``, with autograd) and
    ``mask`` (bool, True = visible) as :func:`cuflash.attention`, on CPU and CUDA tensors, eagerly
    and inside ``torch.compile``.

    Returns ``out`` (q's dtype and device), or ``(out, lse)`` with ``return_lse=True``; lse
    (float32, float64 for float64 inputs) carries no gradient. ``precision`` as
    :func:`cuflash.attention`'s (forward and backward).

    ``dropout_p``: attention dropout as :func:`cuflash.attention`'s (applied whenever it is
    positive, as torch's SDPA does: pass 0 in evaluation). The keep mask's seed is drawn from
    torch's default generator on every call (``torch.manual_seed`` makes runs repeat) unless
    ``dropout_seed`` (an int, or a 0-d integer tensor) is given; the backward reuses it.
    """
    # Traced by torch.compile: no memo read or written (a traced read of one makes the graph guard
    # on the memo's contents, and any later call that adds an entry would recompile it).
    compiling = torch.compiler.is_compiling()
    causal_name, window_left, window_right, scale, softcap, deterministic, return_lse = _call_options(
        causal, window, scale, softcap, deterministic, return_lse, remember=not compiling)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, tensor)
    for name, tensor in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("bias", bias), ("mask", mask)):
        if tensor is not None:
            _check_tensor(name, tensor)
    precision = _precision(precision, q.dtype, remember=not compiling)
    options = (scale, causal_name, window_left, window_right, deterministic, softcap, alibi_slopes, precision)
    if compiling or q.device.type == "meta":
        # the seed as a traced tensor: a Python int would be a constant of the graph (one mask forever)
        rate, seed = _dropout_arguments(dropout_p, dropout_seed, as_tensor=True)
        out, lse = torch.ops.cuflash.attention_fwd(q, k, v, *options, rate, seed, sinks, bias, mask)
        return (out, lse) if return_lse else out
    dropout = None
    if not _api._no_dropout(dropout_p, dropout_seed):
        rate, seed = _dropout_arguments(dropout_p, dropout_seed)
        dropout = (rate, seed) if rate else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks, bias)):
        out, lse = _AttentionFunction.apply(q, k, v, sinks, bias, mask, options, dropout)
    else:
        out, lse = _forward(q, k, v, sinks, *options, bias=bias, mask=mask, dropout=dropout)
    return (out, lse) if return_lse else out


def _dropout_arguments(dropout_p, dropout_seed, as_tensor=False):
    """``(rate, seed)``: the rate checked as cuflash.attention checks it, and the seed given or, for
    a positive rate without one, drawn from torch's default generator (``torch.manual_seed`` makes
    it repeat); (0.0, None) for no dropout. The seed: a Python int in [0, 2^64), or with
    ``as_tensor`` a 0-d int64 CPU tensor holding its bits (the ops' argument, traced, never read
    while tracing)."""
    if isinstance(dropout_seed, torch.Tensor):
        if dropout_seed.dim() != 0 or dropout_seed.dtype.is_floating_point or dropout_seed.dtype.is_complex or (
                dropout_seed.dtype == torch.bool):
            raise TypeError(f"dropout_seed must be an int or a 0-d integer tensor, got a tensor of shape "
                            f"{tuple(dropout_seed.shape)} and dtype {dropout_seed.dtype}")
        seed = dropout_seed
    else:
        seed = None if dropout_seed is None else _spec.resolve_dropout_seed(dropout_seed)
    rate, _ = _spec.resolve_dropout(dropout_p, 0)  # the rate's checks and messages
    if rate == 0.0:
        return 0.0, None
    if seed is None:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if as_tensor:
        return rate, seed if isinstance(seed, torch.Tensor) else torch.tensor(
            seed - (1 << 64) if seed >= 1 << 63 else seed, dtype=torch.int64)
    return rate, _seed_of(seed) if isinstance(seed, torch.Tensor) else seed


def _seed_of(tensor):
    """A 0-d integer tensor's value as a seed in [0, 2^64) (an int64 holds the seed's bits)."""
    return int(tensor.item()) & ((1 << 64) - 1)


def _op_dropout(dropout_p, dropout_seed):
    """The ops' ``dropout_p`` and ``dropout_seed`` (a 0-d integer tensor: _seed_of) as
    ``(rate, seed)`` for cuflash, or None without dropout."""
    if not dropout_p:
        return None
    return dropout_p, _seed_of(dropout_seed)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature).

    ``(..., H, L, E)`` layout; ``is_causal`` is top-left aligned (query i sees keys j <= i);
    leading axes broadcast; different query and key/value head counts need ``enable_gqa=True``
    (query head h reads key/value head ``h // (Hq // Hkv)``), exactly as torch. ``attn_mask``
    as torch: boolean (True = takes part) or float (added to the scaled scores, differentiable),
    broadcastable to ``(..., L, S)``, not together with ``is_causal`` (torch's error); CPU and
    CUDA tensors. A query row that sees no key gives 0 (torch gives NaN). ``dropout_p`` drops
    attention probabilities as torch does (whenever it is positive), with cuflash's keep mask
    (:func:`attention`'s: seeded from torch's generator), not torch's.
    """
    # torch's own argument checks, word for word: tensors, and bools that are Python bools.
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, "
                            f"not {_type_name(tensor)}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be bool, not {_type_name(flag)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument 'attn_mask' must be Tensor, "
                            f"not {_type_name(attn_mask)}")
        if is_causal:  # torch's documented rule (its error, word for word)
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
    if not (query.dtype == key.dtype == value.dtype):  # torch's own check, word for word
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    _check_sdpa_heads(query, key, value, enable_gqa)
    masks = {}
    if attn_mask is not None:
        masks = {"mask": attn_mask} if attn_mask.dtype == torch.bool else {"bias": attn_mask}
    return attention(query, key, value, scale=scale, causal="top_left" if is_causal else False, dropout_p=dropout_p,
                     **masks)


#: Calls of ``torch.nn.functional.scaled_dot_product_attention`` inside :func:`sdpa_override`:
#: ``{"cuflash": n, "torch": n, "torch_reasons": {reason: n}}`` (eager calls; reset by hand).
SDPA_COUNTS = {"cuflash": 0, "torch": 0, "torch_reasons": {}}
_SDPA_OVERRIDE = {"depth": 0, "previous": None}
_SDPA_OVERRIDE_LOCK = threading.Lock()
_SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _sdpa_unsupported(query, key, value, attn_mask, dropout_p):
    """Why :func:`sdpa_override` hands this call to torch's own SDPA, or None."""
    tensors = [t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor)]
    if len(tensors) < 3 or not isinstance(query, torch.Tensor):
        return None  # (torch's own argument errors, raised by the drop-in as torch raises them)
    if any(t.is_nested for t in tensors):
        return "a nested tensor"
    if any(t.device.type not in ("cpu", "cuda", "meta") for t in tensors):
        return f"tensors on {query.device.type}"
    if query.dtype not in _SDPA_DTYPES:
        return f"dtype {query.dtype}"
    return None


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention while :func:`sdpa_override` is active."""
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p)
    compiling = torch.compiler.is_compiling()
    if reason is not None:
        if not compiling:  # (a traced read of the counters would make the graph guard on them)
            SDPA_COUNTS["torch"] += 1
            SDPA_COUNTS["torch_reasons"][reason] = SDPA_COUNTS["torch_reasons"].get(reason, 0) + 1
        return _SDPA_OVERRIDE["previous"](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not compiling:
        SDPA_COUNTS["cuflash"] += 1
    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def sdpa_override():
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is cuflash's
    :func:`scaled_dot_product_attention` (torch's semantics), for code that calls it, e.g. timm,
    open_clip, diffusers and transformers' ``"sdpa"`` models::

        with cuflash.torch.sdpa_override():
            loss = model(x).loss      # every F.scaled_dot_product_attention call runs cuflash
            loss.backward()

    A call cuflash cannot run (nested tensors, another device or dtype) goes to
    the function it replaced, counted by reason in :data:`SDPA_COUNTS` with cuflash's calls.
    Eager and inside ``torch.compile``: what is traced while the block is open calls cuflash's op
    (dynamo guards on the function, so a compiled function called outside the block retraces with
    torch's). Process-wide: every thread sees the replacement while any block is open
    (blocks nest; the last to close restores the original). Code that bound the function before
    (``from torch.nn.functional import scaled_dot_product_attention``) keeps torch's."""
    functional = torch.nn.functional
    with _SDPA_OVERRIDE_LOCK:
        if _SDPA_OVERRIDE["depth"] == 0:
            _SDPA_OVERRIDE["previous"] = functional.scaled_dot_product_attention
            functional.scaled_dot_product_attention = _routed_sdpa
        _SDPA_OVERRIDE["depth"] += 1
    try:
        yield
    finally:
        with _SDPA_OVERRIDE_LOCK:
            _SDPA_OVERRIDE["depth"] -= 1
            if _SDPA_OVERRIDE["depth"] == 0:
                functional.scaled_dot_product_attention = _SDPA_OVERRIDE["previous"]
                _SDPA_OVERRIDE["previous"] = None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_func`` (same signature).

    ``q (B, Lq, H, D)``, ``k (B, Lk, Hk, D)``, ``v (B, Lk, Hk, Dv)`` with ``H % Hk == 0``
    (MQA/GQA); ``causal`` is bottom-right aligned; ``window_size=(left, right)``, -1 unbounded.
    Returns ``out (B, Lq, H, Dv)``, or ``(out, softmax_lse, None)`` with ``return_attn_probs``
    (lse ``(B, H, Lq)`` float32, as flash-attn; it carries no gradient). ``softcap`` (0: none) and
    ``alibi_slopes`` (``(H,)`` or ``(B, H)``) as flash-attn; ``dropout_p`` as flash-attn (its
    callers pass 0 in evaluation), with cuflash's keep mask seeded from torch's generator
    (:func:`attention`), so the third value of ``return_attn_probs`` is None as ever.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-dimensional (batch, seqlen, heads, head_dim), got shape {tuple(tensor.shape)}")
    # (B, L, H, D) -> (B, H, L, D) views: cuflash reads the strides, nothing is copied.
    scale, window, softcap = _flash_conventions(softmax_scale, causal, window_size, softcap)
    out, lse = attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
        causal=bool(causal), window=window, deterministic=bool(deterministic),
        softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True, dropout_p=dropout_p,
    )
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_varlen_func`` (same signature), differentiable in q,
    k and v: packed q ``(total_q, H, D)``, k and v ``(total_k, Hk, D)``, int32 ``cu_seqlens_*``
    ``(B + 1,)``; causal (bottom-right, per sequence) sets the window's right side to 0 as in
    flash-attn. Returns out ``(total_q, H, Dv)``, or ``(out, softmax_lse (H, total_q), None)``.
    cuflash.attention_varlen underneath (on CUDA tensors one launch per kernel for the whole batch).
    ``dropout_p`` as :func:`flash_attn_func`'s: a packed batch drops what the same sequences padded
    would (cuflash.attention_varlen's keep mask)."""
    for name, tensor in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, tensor)
    scale, window, softcap = _flash_conventions(softmax_scale, causal, window_size, softcap)
    options = dict(max_seqlen_q=_spec._integer("max_seqlen_q", max_seqlen_q),
                   max_seqlen_k=_spec._integer("max_seqlen_k", max_seqlen_k),
                   scale=scale, causal=bool(causal), window=window, softcap=softcap,
                   deterministic=bool(deterministic))
    rate, seed = _dropout_arguments(dropout_p, None, as_tensor=torch.compiler.is_compiling())
    if rate:
        options.update(dropout_p=rate, dropout_seed=seed)
    out, lse = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, None, alibi_slopes, None, options)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_qkvpacked_func`` (same signature): ``qkv (B, L, 3, H,
    D)`` is q, k and v stacked on axis 2. :func:`flash_attn_func` on the three views
    ``qkv.unbind(2)`` (no copy: cuflash reads the strides), so the gradient reaches ``qkv`` through
    autograd of the views, as one tensor of qkv's shape. Returns as :func:`flash_attn_func`."""
    q, k, v = _unpack("qkv", qkv, 3, "(batch, seqlen, 3, heads, head_dim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_kvpacked_func`` (same signature): ``q (B, Lq, H, D)``,
    ``kv (B, Lk, 2, Hk, D)`` (k and v stacked on axis 2, ``H % Hk == 0``). :func:`flash_attn_func` on
    the views ``kv.unbind(2)``, no copy; gradients reach ``kv`` through the views."""
    k, v = _unpack("kv", kv, 2, "(batch, seqlen_k, 2, heads_k, head_dim)")
    _check_with_packed(q, "kv", kv, 4, "(batch, seqlen_q, heads, head_dim)", batch_axis=True)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_varlen_qkvpacked_func`` (same signature): ``qkv
    (total, 3, H, D)`` packed sequences, ``cu_seqlens`` int32 ``(B + 1,)`` and ``max_seqlen`` for
    queries and keys alike. :func:`flash_attn_varlen_func` on the views ``qkv.unbind(1)``, no
    copy; gradients reach ``qkv`` through the views. Returns as :func:`flash_attn_varlen_func`."""
    q, k, v = _unpack("qkv", qkv, 3, "(total, 3, heads, head_dim)")
    _check_tensor("cu_seqlens", cu_seqlens)
    max_seqlen = _spec._integer("max_seqlen", max_seqlen)
    # The call below names cu_seqlens_q/_k and max_seqlen_q/_k; here the caller wrote one of each.
    with _renamed({"cu_seqlens_q": "cu_seqlens", "cu_seqlens_k": "cu_seqlens", "max_seqlen_q": "max_seqlen",
                   "max_seqlen_k": "max_seqlen"}):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                      return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash-attn 2's ``flash_attn_varlen_kvpacked_func`` (same signature): ``q
    (total_q, H, D)``, ``kv (total_k, 2, Hk, D)``. :func:`flash_attn_varlen_func` on the views
    ``kv.unbind(1)``, no copy; gradients reach ``kv`` through the views."""
    k, v = _unpack("kv", kv, 2, "(total_k, 2, heads_k, head_dim)")
    _check_with_packed(q, "kv", kv, 3, "(total_q, heads, head_dim)", batch_axis=False)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _unpack(name, packed, count, layout):
    """The ``count`` views of a packed tensor along its axis -3 (flash-attn's qkv/kv layouts),
    the tensor checked under the caller's name first: a tensor, its rank, the packed axis, a
    floating dtype cuflash runs."""
    _check_tensor(name, packed)
    rank = layout.count(",") + 1
    if packed.dim() != rank:
        raise ValueError(f"{name} must be {rank}-dimensional {layout}, got shape {tuple(packed.shape)}")
    if packed.shape[-3] != count:
        raise ValueError(f"{name} must have size {count} on axis {rank - 3} ({', '.join(name)} stacked) in the "
                         f"layout {layout}, got shape {tuple(packed.shape)}")
    if packed.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {packed.dtype}")
    return packed.unbind(-3)


def _check_with_packed(q, name, kv, rank, layout, batch_axis):
    """q against a packed kv, under the caller's names: rank, dtype, head dim, heads (Hq % Hk == 0)
    and, for the batched layout, the batch size."""
    _check_tensor("q", q)
    if q.dim() != rank:
        raise ValueError(f"q must be {rank}-dimensional {layout}, got shape {tuple(q.shape)}")
    if q.dtype != kv.dtype:
        raise TypeError(f"q and {name} must share one dtype, got q {q.dtype} and {name} {kv.dtype}")
    if q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"q's head dim must equal {name}'s: q has {q.shape[-1]}, {name} has {kv.shape[-1]}")
    heads_q, heads_k = q.shape[-2], kv.shape[-2]
    if heads_k == 0 or heads_q % heads_k:
        raise ValueError(f"q's {heads_q} heads must be a multiple of {name}'s {heads_k} (MQA/GQA: H % Hk == 0)")
    if batch_axis and q.shape[0] != kv.shape[0]:
        raise ValueError(f"q and {name} must have the same batch size, got {q.shape[0]} and {kv.shape[0]}")


@contextlib.contextmanager
def _renamed(names):
    """Argument errors raised inside re-worded with the caller's names for the arguments."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        renamed = pattern.sub(lambda match: names[match.group(1)], message)
        if renamed == message:
            raise
        raise type(error)(renamed) from None


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Drop-in for flash-attn 2's ``flash_attn_with_kvcache`` (same signature and semantics; no
    autograd, as flash-attn): q ``(B, Lq, H, D)``; caches ``(B_cache, Lmax, Hk, D)``, or pages
    ``(num_blocks, page_size, Hk, D)`` read through ``block_table`` ``(B, max_blocks)``; new ``k``,
    ``v`` ``(B, Lnew, Hk, D)`` are written into the cache in place at ``cache_seqlens[b] ..`` (after
    the rotary embedding, when ``rotary_cos``/``rotary_sin`` ``(seqlen_ro, rotary_dim / 2)`` are
    given: new keys at positions ``cache_seqlens[b] + i``, queries too under causal or a window,
    else all at ``cache_seqlens[b]``; ``rotary_interleaved`` pairs dims (0, 1), (2, 3), ... instead
    of the two halves). ``cache_batch_idx`` ``(B,)``: the cache row of each sequence;
    ``cache_leftpad`` ``(B,)``: keys before it are padding. Returns out ``(B, Lq, H, Dv)``, and
    ``softmax_lse`` ``(B, H, Lq)`` with ``return_softmax_lse``. :func:`cuflash.attention_with_kvcache`
    underneath (one call per sequence when ``cache_batch_idx`` or ``cache_leftpad`` is given).

    Values on the device: as :func:`cuflash.attention_with_kvcache`, a call on the decode kernel
    reads no value of a CUDA tensor on the host (no device sync): the caller guarantees lengths
    that fit the cache, pages of the cache, written pages not shared and rotary positions within
    ``rotary_cos`` (as flash-attn, which never checks them), and the kernels stay inside the cache
    and ``rotary_cos`` whatever they are. CUDA graphs: a decoding step can be captured with
    ``torch.cuda.graph`` (after a warm-up call of its shapes outside the capture); its replays
    follow the ``cache_seqlens``, ``block_table``, q, k and v the device holds then.
    ``cache_batch_idx`` and ``cache_leftpad`` are read on the host (they pick one call per
    sequence), so they cannot be captured. Inside ``torch.compile`` (fullgraph too) the call is
    one custom op, ``cuflash::flash_attn_with_kvcache`` (``..._append`` with new keys, which
    mutates the caches); an int ``cache_seqlens`` is a constant of the graph there (a tensor
    is not), and ``window_size`` must hold ints."""
    if torch.compiler.is_compiling():
        op = torch.ops.cuflash.flash_attn_with_kvcache if k is None else torch.ops.cuflash.flash_attn_with_kvcache_append
        as_int = cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor)
        out, lse = op(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, None if as_int else cache_seqlens,
                      int(cache_seqlens) if as_int else None, cache_batch_idx,
                      cache_leftpad, block_table, softmax_scale, bool(causal), int(window_size[0]), int(window_size[1]),
                      float(softcap), bool(rotary_interleaved), alibi_slopes, int(num_splits), bool(return_softmax_lse))
        return (out, lse) if return_softmax_lse else out
    known_key = None
    if rotary_cos is None and cache_batch_idx is None and cache_leftpad is None and alibi_slopes is None:
        known_key = _kv_signature(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                  (softmax_scale, causal, window_size, softcap, num_splits, return_softmax_lse))
        known = _KV_KNOWN.get(known_key) if known_key is not None else None
        if known is not None:
            result = known.run(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
            if result is not None:
                return result
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, tensor)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together, or neither")
    if cache_batch_idx is not None and block_table is not None:
        raise ValueError("cache_batch_idx cannot be used with block_table (a paged cache has no batch rows; "
                         "flash-attn refuses it too)")
    if cache_leftpad is not None and block_table is not None:
        raise NotImplementedError("cache_leftpad with a paged cache (block_table) is not supported yet")
    per_sequence = cache_batch_idx is not None or cache_leftpad is not None
    # (the capture query only where it matters: a CUDA runtime call per call otherwise)
    if per_sequence and q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("cache_batch_idx and cache_leftpad are read on the host (one call per sequence), which a CUDA "
                         "graph capture forbids: capture calls without them")
    scale, window, softcap = _flash_conventions(softmax_scale, causal, window_size, softcap)
    window = None if window == (-1, -1) else window
    batch = q.shape[0]
    if isinstance(cache_seqlens, torch.Tensor) or cache_seqlens is None or rotary_cos is not None or per_sequence:
        seqlens = _kvcache_lengths(cache_seqlens, batch, q.device)
    else:  # one length for every sequence, passed on as an int (no tensor made and filled per call)
        seqlens = _spec._integer("cache_seqlens", cache_seqlens, "or an int32 tensor (B,)")
    if rotary_cos is not None:
        with torch.no_grad():
            # flash-attn: queries at their own positions under causal or a window, else all at
            # cache_seqlens (one position for every query)
            q = _rotary(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row=window is not None)
            k = k if k is None else _rotary(k, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row=True)
    out = torch.empty(q.shape[:3] + (v_cache.shape[-1],), dtype=q.dtype, device=q.device)
    options = dict(scale=scale, window=window, softcap=softcap, num_splits=num_splits,
                   return_lse=bool(return_softmax_lse))

    def attend(q, caches, k, v, lengths, slopes, out):
        """One cuflash call on (B, L, H, D) tensors, seen heads-first (views, no copy)."""
        arrays = (*(_to_cuflash(t, _HEADS_FIRST) for t in (q, *caches)),
                  None if k is None else _to_cuflash(k, _HEADS_FIRST), None if v is None else _to_cuflash(v, _HEADS_FIRST),
                  lengths if isinstance(lengths, int) else _to_cuflash(lengths), _cuflash_or_none(block_table),
                  _cuflash_or_none(slopes), _to_cuflash(out, _HEADS_FIRST))
        q, k_cache, v_cache, k, v, lengths, table, slopes, out = arrays
        result = _kvcache.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths,
                                                 block_table=table, alibi_slopes=slopes, out=out, **options)
        if known_key is not None:  # (this signature's next calls: _KvKnown, where the decode kernel ran)
            _remember_kv(known_key, _kvcache.known_for(q, k_cache, v_cache, k, v, lengths, table, slopes, None, out,
                                                       precision=None, causal=False, **options), q.shape, out.shape)
        return result

    if per_sequence:  # (host values: read before anything runs)
        rows_of = _kvcache_rows(cache_batch_idx, batch, k_cache.shape[0], "cache_batch_idx", range(batch))
        pads = _kvcache_rows(cache_leftpad, batch, k_cache.shape[1] + 1, "cache_leftpad", [0] * batch)
    lses = []
    with _running_on(q):
        if not per_sequence:  # the whole batch at once: the caller's tensors as they are
            result = attend(q, (k_cache, v_cache), k, v, seqlens, alibi_slopes, out)
            if return_softmax_lse:
                lses.append(_to_torch(result[1]))
        else:  # with cache_batch_idx / cache_leftpad: one sequence at a time (its cache row, its padding)
            for b in range(batch):
                row, pad, part = rows_of[b], pads[b], slice(b, b + 1)

                def of(x):
                    return None if x is None else x[part]

                result = attend(of(q), [c[row:row + 1, pad:] for c in (k_cache, v_cache)], of(k), of(v),
                                (seqlens[part] - pad).contiguous(),
                                alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else of(alibi_slopes),
                                of(out))
                if return_softmax_lse:
                    lses.append(_to_torch(result[1]))
    if not return_softmax_lse:
        return out
    return out, (lses[0] if len(lses) == 1 else torch.cat(lses))


# --- flash_attn_with_kvcache's repeated signatures ------------------------------------------------
#
# A decoding loop calls flash_attn_with_kvcache with one signature layer after layer, step after
# step. Its first call takes the full path (checks, CuPy views, cuflash.attention_with_kvcache,
# which keeps that signature's decode launch: _kvcache._Known); the next ones launch the same
# layout from the tensors' addresses on torch's stream and allocator: no CuPy array, no device or
# stream switch, no check the signature already passed. What depends on a call's values is still
# checked: an int length's range, and with an append, that the caches share no memory with what
# the call reads (a call that fails either goes the full path, which raises).

_KV_KNOWN: dict = {}


def _kv_signature(q, k_cache, v_cache, k, v, cache_seqlens, block_table, options) -> tuple | None:
    """The torch-level key of a flash_attn_with_kvcache call (None: not keyed): ``options`` of
    plain types only, each tensor's dtype, shape, strides, device and 16-byte alignment (CUDA
    tensors on q's device only: the full path moves lengths from another device, a launch from
    addresses could not), an int length as ``int``."""
    scale, causal, window_size, softcap, num_splits, return_lse = options
    if not (_plain_flash_options(scale, causal, window_size, softcap) and type(num_splits) is int
            and type(return_lse) is bool):
        return None
    parts = [options, type(scale), type(softcap)]
    for t in (q, k_cache, v_cache, k, v, block_table, cache_seqlens):
        if t is None:
            parts.append(None)
        elif type(t) is torch.Tensor and t.is_cuda and (t is q or t.device == q.device):
            parts.append((t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16 == 0))
        elif t is cache_seqlens and type(t) is int:
            parts.append(int)
        else:
            return None
    return tuple(parts)


def _remember_kv(key, known, q_shape, out_shape) -> None:
    """Keep ``known`` (the CuPy API's _Known of this call, or None) for the torch key ``key``
    when its launch can run from addresses alone: the kernels write out in place and read q,
    the lengths and the table where they lie, no ALiBi or sinks, new keys read in place."""
    if known is None:
        return
    from ._gpu.decode import Part  # (loaded already: known's layout is decode's)

    layout = known.layout
    if (layout.own_out or layout.copy_q or layout.copy_lengths or layout.copy_table
            or layout.carve[1][Part.SLOPES] is not None or layout.carve[1][Part.SINKS] is not None
            or (known.append is not None and known.append.copy_new)):
        return
    if len(_KV_KNOWN) >= _MEMO_LIMIT:
        _KV_KNOWN.clear()
    _KV_KNOWN[key] = _KvKnown(known, (q_shape[0], q_shape[2], q_shape[1], out_shape[3]))


class _KvKnown:
    """A kept flash_attn_with_kvcache signature (see above): ``run`` launches it, or returns
    None where the full path must take the call."""

    def __init__(self, known, out_shape):
        self.known, self.out_shape = known, out_shape  # out (B, Lq, H, Dv), as flash-attn returns it
        from ._gpu.decode import Part

        part = known.layout.carve[1][Part.LSE]  # lse's (shape, dtype, offset) in the layout's allocation
        self.lse_shape, self.lse_bytes = part[0], (part[2], part[2] + 4 * math.prod(part[0]))

    def run(self, q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        known = self.known
        cache, layout, append = known.cache, known.layout, known.append
        index = q.device.index
        # The launch needs this device's context current on this thread: one that _running_on
        # made current here before (torch's current device the same).
        if index not in getattr(_ON_TORCH_STREAM, "ready", ()) or torch.cuda.current_device() != index:
            return None
        if type(cache_seqlens) is int:
            if not 0 <= cache_seqlens <= cache.capacity - cache.new:
                return None
            fixed, lengths = cache_seqlens, 0
        else:
            fixed = cache.capacity if cache.fixed is None else cache.fixed
            lengths = 0 if cache_seqlens is None else cache_seqlens.data_ptr()
        if append is not None and _kv_shares_memory((k_cache, v_cache), (q, k, v, cache_seqlens, block_table)):
            return None
        out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        memory = torch.empty(layout.carve[0], dtype=torch.uint8, device=q.device)
        table = 0 if block_table is None else block_table.data_ptr()
        params = _decode_params()(layout, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                                  memory.data_ptr(), lengths, table, fixed)
        stream = _current_raw_stream(index)
        if append is not None:
            append.launch(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), lengths, table, fixed,
                          stream)
        layout.launch(params, stream)
        if not known.return_lse:
            return out
        return out, memory[self.lse_bytes[0]:self.lse_bytes[1]].view(torch.float32).view(self.lse_shape)


def _kv_shares_memory(written, read) -> bool:
    """Whether the caches ``written`` share bytes with each other or with a tensor ``read`` (the
    byte ranges _kvcache checks the CuPy call's arrays by)."""
    def spans(tensors):
        return [(None, _spec._byte_bounds(t.data_ptr(), tuple(t.shape), tuple(s * t.element_size() for s in t.stride()),
                                          t.element_size()))
                for t in tensors if isinstance(t, torch.Tensor) and t.numel()]

    return _kvcache.first_shared(spans(written), spans(read), None, _kvcache.byte_ranges_overlap) is not None


_DECODE_PARAMS = None


def _decode_params():
    """cuflash._gpu.decode.params_for (imported on first use)."""
    global _DECODE_PARAMS
    if _DECODE_PARAMS is None:
        from ._gpu import decode

        _DECODE_PARAMS = decode.params_for
    return _DECODE_PARAMS


def _kvcache_lengths(cache_seqlens, batch, device):
    """flash-attn's cache_seqlens (an int, or an int32 tensor (B,)) as an int32 tensor (B,)."""
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required: each sequence's cache length (an int or an int32 tensor (B,))")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (batch,):
            raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape ({batch},), got "
                             f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
        return cache_seqlens if cache_seqlens.device == device else cache_seqlens.to(device)
    return torch.full((batch,), _spec._integer("cache_seqlens", cache_seqlens), dtype=torch.int32, device=device)


def _kvcache_rows(values, batch, bound, name, default):
    """cache_batch_idx or cache_leftpad as host ints, each in [0, bound) (None: ``default``)."""
    if values is None:
        return list(default)
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int32 or values.shape != (batch,):
        raise ValueError(f"{name} must be an int32 tensor of shape ({batch},)")
    host = values.tolist()
    if any(x < 0 or x >= bound for x in host):
        raise ValueError(f"{name} entries must be in [0, {bound}), got {host}")
    return host


def _rotary(x, cos, sin, offsets, interleaved, per_row):
    """flash-attn's rotary embedding of x ``(B, L, H, D)`` over its first ``2 * cos.shape[1]``
    dims, row i of sequence b at position ``offsets[b] + i`` (``offsets[b]`` for every row unless
    ``per_row``), computed in float32 (float64 for float64) and rounded once to x's dtype. On the
    CPU the positions are checked against cos's; on a GPU they are not read (no device sync, as
    the decode path reads no length): a position past cos's reads its last row, never beyond it."""
    half = cos.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 2 or 2 * half > x.shape[-1]:
        raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                         f"head dim {x.shape[-1]}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    steps = torch.arange(x.shape[1], device=x.device) if per_row else torch.zeros(x.shape[1], dtype=torch.long,
                                                                                  device=x.device)
    positions = offsets.to(x.device).long()[:, None] + steps[None, :]  # (B, L)
    if x.device.type == "cpu" and x.shape[1] and int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"rotary_cos/rotary_sin have {cos.shape[0]} positions; position {int(positions.max())} "
                         "is needed")
    positions = positions.clamp(0, max(cos.shape[0] - 1, 0))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = (t.to(x.device)[positions].to(compute)[:, :, None, :] for t in (cos, sin))  # (B, L, 1, half)
    part = x[..., :2 * half].to(compute)
    x1, x2 = (part[..., 0::2], part[..., 1::2]) if interleaved else (part[..., :half], part[..., half:])
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def merge_attention(outs, lses):
    """:func:`cuflash.merge_attention` on torch tensors, differentiable in outs and lses.

    ``outs`` ``(S, ..., Lq, Dv)`` and ``lses`` ``(S, ..., Lq)`` — each a tensor, or a sequence of
    S tensors without the S axis — are S partial attentions of the same queries over disjoint
    key sets (``attention(..., return_lse=True)``'s results). Returns ``(out, lse)``, the
    attention over the union, on the inputs' device: out in outs' dtype, lse float32 (float64
    for float64). CUDA tensors run cuflash's kernel on torch's current stream, CPU tensors the
    NumPy backend. The backward is written in torch operations: ``dout_s = c_s dout`` and
    ``dlse_s = c_s (dlse + rowsum(dout * (out_s - out)))`` with ``c_s = exp(lse_s - lse)``
    (0 where lse_s = -inf).
    """
    layouts, tensors = [], []
    for name, value in (("outs", outs), ("lses", lses)):
        if isinstance(value, torch.Tensor):
            _check_tensor(name, value)
            layouts.append(None)
            tensors.append(value)
        elif isinstance(value, (list, tuple)):
            for i, tensor in enumerate(value):
                _check_tensor(f"{name}[{i}]", tensor)
            layouts.append(len(value))
            tensors.extend(value)
        else:
            raise TypeError(f"{name} must be a torch.Tensor or a list or tuple of them, got {type(value).__name__}")
    if torch.compiler.is_compiling():  # one custom op on the stacked parts
        outs, lses = _split_parts(layouts[0], layouts[1], tensors)
        return torch.ops.cuflash.merge_attention(*(x if isinstance(x, torch.Tensor) else torch.stack(x)
                                                   for x in (outs, lses)))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _MergeFunction.apply(layouts[0], layouts[1], *tensors)
    return _merge_forward(*_split_parts(layouts[0], layouts[1], tensors))


def _split_parts(outs_layout, lses_layout, tensors):
    """(outs, lses) from the flat tensor list: a layout of None is one stacked tensor, an int S
    that many parts."""
    count = 1 if outs_layout is None else outs_layout
    outs, lses = tensors[:count], tensors[count:]
    return (outs[0] if outs_layout is None else list(outs)), (lses[0] if lses_layout is None else list(lses))


def _merge_forward(outs, lses):
    """(out, lse) as torch tensors, on the device (and torch's stream) of the first part."""
    first = outs if isinstance(outs, torch.Tensor) else next(iter(outs), None)
    with _running_on(first) if first is not None else contextlib.nullcontext():  # none: merge says why
        arrays = [_to_cuflash(x) if isinstance(x, torch.Tensor) else [_to_cuflash(t) for t in x] for x in (outs, lses)]
        out, lse = _merge.merge_attention(*arrays)
        return _to_torch(out), _to_torch(lse)


class _MergeFunction(torch.autograd.Function):
    """merge_attention with its backward in torch operations (CPU or CUDA)."""

    @staticmethod
    def forward(ctx, outs_layout, lses_layout, *tensors):
        out, lse = _merge_forward(*_split_parts(outs_layout, lses_layout, tensors))
        ctx.layouts = (outs_layout, lses_layout)
        ctx.save_for_backward(*tensors, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        *tensors, out, lse = ctx.saved_tensors
        outs, lses = _split_parts(*ctx.layouts, tensors)
        grads = _merge_backward(*(x if isinstance(x, torch.Tensor) else torch.stack(x) for x in (outs, lses)), out, lse,
                                dout, dlse)
        grads = [g if layout is None else list(g.unbind(0)) for g, layout in zip(grads, ctx.layouts)]
        flat = [g for grad in grads for g in ([grad] if isinstance(grad, torch.Tensor) else grad)]
        return (None, None, *flat)


def _merge_backward(outs, lses, out, lse, dout, dlse):
    """(d_outs, d_lses) of merge_attention's stacked outs (S, ..., Lq, Dv) and lses (S, ..., Lq):
    d_outs_s = c_s dout, d_lses_s = c_s (dlse + rowsum(dout * (outs_s - out))), c_s = exp(lses_s -
    lse) (0 where lses_s = -inf)."""
    compute = lse.dtype
    absent = lses == -float("inf")
    lse_ref = torch.where(lse == -float("inf"), torch.zeros_like(lse), lse)
    c = torch.where(absent, torch.zeros_like(lses), torch.exp(lses - lse_ref))
    dout = dout.to(compute)
    d_outs = (c[..., None] * dout).to(outs.dtype)
    spread = (dout * (outs.to(compute) - out.to(compute))).sum(-1)
    d_lses = torch.where(absent, torch.zeros_like(c), c * ((0.0 if dlse is None else dlse) + spread))
    return d_outs, d_lses


@torch.library.custom_op("cuflash::merge_attention", mutates_args=())
def _merge_op(outs: torch.Tensor, lses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _merge_forward(outs, lses)
    return out.contiguous(), lse.contiguous()  # (as the shapes below promise)


@_merge_op.register_fake
def _merge_op_shapes(outs, lses):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:], dtype=_lse_dtype(outs.dtype))


def _save_merge_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _merge_op_backward(ctx, dout, dlse):
    return _merge_backward(*ctx.saved_tensors, dout, dlse)


torch.library.register_autograd("cuflash::merge_attention", _merge_op_backward, setup_context=_save_merge_for_backward)


_FLASH_CONVENTIONS: dict = {}  # (_flash_conventions' results by their plain-typed arguments: ~5 us a call)


def _flash_conventions(softmax_scale, causal, window_size, softcap):
    """flash-attn's scale, window and softcap in cuflash's terms, checked under flash-attn's names:
    ``window_size`` is a (left, right) pair of ints (0-d integer tensors too, as flash-attn's
    callers pass them), -1 unbounded; causal sets its right side to 0 (cuflash itself refuses a
    positive one); softcap 0 means none. Memoized, but not while torch.compile traces (as
    ``attention``'s options)."""
    key = None
    if _plain_flash_options(softmax_scale, causal, window_size, softcap) and not torch.compiler.is_compiling():
        key = (softmax_scale, type(softmax_scale), causal, window_size, softcap, type(softcap))
        resolved = _FLASH_CONVENTIONS.get(key)
        if resolved is not None:
            return resolved
    resolved = _flash_conventions_checked(softmax_scale, causal, window_size, softcap)
    if key is not None and len(_FLASH_CONVENTIONS) < _MEMO_LIMIT:
        _FLASH_CONVENTIONS[key] = resolved
    return resolved


def _plain_flash_options(softmax_scale, causal, window_size, softcap) -> bool:
    """flash-attn's options of exactly the types a memo key holds without ambiguity (a 0-d tensor
    or a list window is resolved, and checked, on every call)."""
    return (type(softmax_scale) in (float, int, type(None)) and type(causal) is bool and type(softcap) in (float, int)
            and type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int
            and type(window_size[1]) is int)


def _flash_conventions_checked(softmax_scale, causal, window_size, softcap):
    if softmax_scale is not None:
        try:
            softmax_scale = _spec._resolve_scale(softmax_scale, 1)
        except (TypeError, ValueError) as error:  # "scale must ...": the drop-in's argument is softmax_scale
            raise type(error)(f"softmax_{error}") from None
    if not isinstance(window_size, (tuple, list)):
        raise TypeError(f"window_size must be a (left, right) pair of ints (-1 = unbounded), "
                        f"got {_type_name(window_size)}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must have exactly two entries (left, right), got {len(window_size)}")
    window = [_spec._integer(f"window_size {side}", size, "(-1 = unbounded)")
              for side, size in zip(("left", "right"), window_size)]
    for side, size in zip(("left", "right"), window):
        if size < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded), got {size}")
    if bool(causal):
        window[1] = 0
    return softmax_scale, tuple(window), (None if softcap == 0.0 else softcap)


def _varlen_forward(q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, options):
    """(out, lse) of attention_varlen on torch tensors (CPU or CUDA, torch's stream): a kept plan
    where one replays the call, else the full path."""
    forward_options = {key: value for key, value in options.items() if key != "deterministic"}
    packed = (cu_q, cu_k, seqused_k)
    key, plan, memory = _cached_varlen_plan("attention_varlen", (q, k, v), packed, alibi, sinks, options,
                                            ("deterministic",))
    if plan is not None:
        with _on_device(q.device):
            return plan.run(memory, q, k, v, *packed, alibi_slopes=alibi, sinks=sinks,
                            dropout_seed=options.get("dropout_seed"))
    with _running_on(q):
        arrays = [_to_cuflash(t) for t in (q, k, v, cu_q, cu_k)]
        out, lse = _varlen.forward(*arrays, key, seqused_k=_cuflash_or_none(seqused_k),
                                   alibi_slopes=_cuflash_or_none(alibi), sinks=_cuflash_or_none(sinks),
                                   return_lse=True, out=None, **forward_options)
        return _to_torch(out), _to_torch(lse)


def _varlen_backward(dout, q, k, v, cu_q, cu_k, seqused_k, out, lse, alibi, sinks, options):
    """[dq, dk, dv] (+ dsinks with sinks) of attention_varlen_backward on torch tensors."""
    tensors = (dout.contiguous(), q, k, v, out, lse)
    packed = (cu_q, cu_k, seqused_k)
    key, plan, memory = _cached_varlen_plan("attention_varlen_backward", tensors, packed, alibi, sinks, options, ())
    if plan is not None:
        with _on_device(q.device):
            return list(plan.run(memory, *tensors, *packed, alibi_slopes=alibi, sinks=sinks,
                                 dropout_seed=options.get("dropout_seed")))
    with _running_on(q):
        grads = _varlen.backward(*(_to_cuflash(t) for t in tensors + (cu_q, cu_k)), key,
                                 seqused_k=_cuflash_or_none(seqused_k), alibi_slopes=_cuflash_or_none(alibi),
                                 sinks=_cuflash_or_none(sinks), **options)
        return [_to_torch(g) for g in grads]


class _VarlenFunction(torch.autograd.Function):
    """attention_varlen forward and backward, eagerly (torch.compile: _varlen_fwd_op and
    _varlen_bwd_op below), differentiable in q, k, v and sinks."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, options):
        out, lse = _varlen_forward(q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, options)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, seqused_k, out, lse, alibi, sinks)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, cu_q, cu_k, seqused_k, out, lse, alibi, sinks = ctx.saved_tensors
        grads = _varlen_backward(dout, q, k, v, cu_q, cu_k, seqused_k, out, lse, alibi, sinks, ctx.options)
        dsinks = grads[3] if sinks is not None else None
        return grads[0], grads[1], grads[2], None, None, None, None, dsinks, None


def _varlen_attention(q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, options):
    """(out, lse) of a packed call with autograd: _VarlenFunction eagerly, the custom ops inside
    torch.compile. ``options``: attention_varlen's (max_seqlen_q, max_seqlen_k, scale, causal,
    window, softcap, deterministic)."""
    if torch.compiler.is_compiling():
        return torch.ops.cuflash.attention_varlen_fwd(q, k, v, cu_q, cu_k, seqused_k, alibi, sinks,
                                                      *_varlen_op_options(options))
    return _VarlenFunction.apply(q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, options)


def _cached_varlen_plan(kind, tensors, packed, alibi, sinks, options, ignored):
    """``_cached_plan`` for a packed call on CUDA tensors (the hints, ints, and softcap among the
    options in the key; ALiBi slopes and sinks beside the tensors, read again by each replay; a
    dropping call keyed by its rate, replayed with its own seed), else ``(None, None, None)``.
    ``ignored``: options that do not decide the launches (the forward's ``deterministic``)."""
    cu_q, cu_k, seqused_k = packed
    if not all(t.is_cuda for t in tensors + (cu_q, cu_k)):
        return None, None, None
    if _api.dropout_key(options.get("dropout_p", 0.0), options.get("dropout_seed")) is None:
        return None, None, None  # (a seed that is not an int in range: the full path refuses it)
    # (the rate is among the options; the seed is each call's)
    listed = tuple((name, value) for name, value in options.items() if name not in ignored + ("dropout_seed",))
    per_row = tuple(t for t in (alibi, sinks) if t is not None)
    return _cached_plan(kind, tensors + (cu_q, cu_k) + (() if seqused_k is None else (seqused_k,)) + per_row,
                        listed + (seqused_k is None, alibi is not None, sinks is not None))


# --- argument checks ----------------------------------------------------------------------------


def _flag(name, value):
    """A bool option (a NumPy bool too, as cuflash.attention takes it) as a Python bool."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return bool(value)


def _type_name(value):
    """``value``'s type as torch's argument errors name it: ``numpy.ndarray``, ``str``."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _check_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    # (is_cuda and friends: a tenth of the cost of tensor.device.type, on every call)
    if not (tensor.is_cuda or tensor.is_cpu or tensor.is_meta):  # meta: shape propagation only
        raise TypeError(f"{name} is on device {tensor.device}; cuflash runs on CPU and CUDA tensors")


# The resolved options of the calls seen, by how they were spelled (_api._plain_options' types
# only: a key never lets causal=1 or a float window pass as a valid spelling seen before). The
# checks cost ~15 us per call, as much as a planned launch; they are the same for every layer.
_CALL_OPTIONS: dict = {}
_PRECISIONS: dict = {}
_MEMO_LIMIT = 512  # distinct spellings kept (a program uses a handful)


def _call_options(causal, window, scale, softcap, deterministic, return_lse, remember=True):
    """(causal name, window_left, window_right, scale, softcap, deterministic, return_lse) with
    cuflash.attention's checks and messages; ``scale`` None stays None (the head dim decides).
    ``remember``: use the memo of resolved options (not while torch.compile traces)."""
    key = None
    if (remember and type(deterministic) is bool and type(return_lse) is bool
            and _api._plain_options(scale, causal, window, None, softcap)):
        key = (causal, window, scale, type(scale), softcap, type(softcap), deterministic, return_lse)
        resolved = _CALL_OPTIONS.get(key)
        if resolved is not None:
            return resolved
    causal_name, window_left, window_right = _mask_arguments(causal, window)
    if scale is not None:
        scale = _spec._resolve_scale(scale, 1)  # the same TypeError/ValueError as cuflash.attention
    resolved = (causal_name, window_left, window_right, scale, _spec._resolve_softcap(softcap),
                _flag("deterministic", deterministic), _flag("return_lse", return_lse))
    if key is not None and len(_CALL_OPTIONS) < _MEMO_LIMIT:
        _CALL_OPTIONS[key] = resolved
    return resolved


def _precision(precision, dtype, remember=True):
    """_spec.resolve_precision for inputs of torch ``dtype``; ``remember`` as _call_options'."""
    key = (precision, dtype) if remember and type(precision) in (str, type(None)) else None
    resolved = _PRECISIONS.get(key) if key is not None else None
    if resolved is None:
        resolved = _spec.resolve_precision(precision, str(dtype).removeprefix("torch."))
        if key is not None and len(_PRECISIONS) < _MEMO_LIMIT:
            _PRECISIONS[key] = resolved
    return resolved


def _mask_arguments(causal, window):
    """(causal name, window_left, window_right) for the op schema; cuflash's checks and messages."""
    _spec._normalise_mask(causal, window, 0, 0)  # raises for a bad causal/window, says which
    if isinstance(causal, str):
        causal_name = causal
    else:
        causal_name = "bottom_right" if causal else "none"
    if window is None:
        return causal_name, -1, -1
    left, right = (_spec._integer(f"window {side}", size) for side, size in zip(("left", "right"), window))
    return causal_name, left, right


def _check_sdpa_heads(query, key, value, enable_gqa):
    """torch SDPA's rule: head counts broadcast (equal, or 1) unless enable_gqa allows Hq % Hkv == 0.

    cuflash itself would run GQA whenever the counts divide; torch refuses without enable_gqa,
    and so must its drop-in. The messages are torch's.
    """
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
        return
    heads_q = query.size(-3)
    for heads_kv in (key.size(-3), value.size(-3)):
        if enable_gqa:
            if heads_kv == 0 or heads_q % heads_kv:
                raise RuntimeError("Number of heads in key and value must divide the number of heads in query")
        elif heads_q != heads_kv and 1 not in (heads_q, heads_kv):
            dimension = max(query.dim(), key.dim(), value.dim()) - 3
            raise RuntimeError(
                f"The size of tensor a ({heads_q}) must match the size of tensor b ({heads_kv}) at "
                f"non-singleton dimension {dimension} (different head counts need enable_gqa=True)"
            )


# --- crossing between torch and cuflash ---------------------------------------------------------


def _to_cuflash(tensor, axes=None):
    """A CuPy (CUDA) or NumPy (CPU) array sharing ``tensor``'s memory (bfloat16 included);
    ``axes``: that array's axes in this order (``transpose(axes)``'s view, made as one)."""
    # (DLPack refuses tensors that require grad: detached, the memory is the same)
    index = tensor.get_device() if tensor.is_cuda else None
    if index is not None and getattr(_ON_TORCH_STREAM, "device", None) == index:
        dtype = _cupy_dtypes().get(tensor.dtype)
        if dtype is not None and tensor.numel():
            return _cupy_view(tensor, dtype, index, axes)
        import cupy

        array = cupy.from_dlpack(_OnSharedStream(tensor.detach()))
    else:
        array = _spec._as_array("tensor", tensor.detach())
    return array if axes is None else array.transpose(axes)


def _cupy_view(tensor, dtype, device, axes=None):
    """A CuPy array over ``tensor``'s memory, made from its pointer, shape and strides (permuted
    by ``axes``): what ``cupy.from_dlpack`` makes, without the capsule (its export and parsing
    cost a few microseconds a tensor, five or more tensors a call). The array holds the tensor
    (the memory's owner) while it lives. Only inside ``_running_on``, where both libraries run on
    one stream (no handshake is owed)."""
    cuda = _cupy_cuda()
    shape, strides = tensor.shape, tensor.stride()
    key = (shape, strides, dtype, axes)
    layout = _VIEW_LAYOUTS.get(key)
    if layout is None:  # (CuPy's shape, its strides in bytes, the bytes spanned: a non-empty tensor)
        item = dtype.itemsize
        span = (sum((n - 1) * step for n, step in zip(shape, strides)) + 1) * item
        if axes is not None:
            shape, strides = [shape[a] for a in axes], [strides[a] for a in axes]
        if len(_VIEW_LAYOUTS) >= _MEMO_LIMIT:
            _VIEW_LAYOUTS.clear()
        layout = _VIEW_LAYOUTS[key] = (tuple(shape), tuple(step * item for step in strides), span)
    memory = cuda.UnownedMemory(tensor.data_ptr(), layout[2], tensor, device)
    return _CUPY.ndarray(layout[0], dtype, cuda.MemoryPointer(memory, 0), layout[1])


_VIEW_LAYOUTS: dict = {}  # _cupy_view's layouts by (torch shape, strides, dtype, axes): a few a program
_CUPY = None


def _cupy_cuda():
    """cupy.cuda (cupy imported once: the import statement costs a lookup on every call)."""
    global _CUPY
    if _CUPY is None:
        import cupy

        _CUPY = cupy
    return _CUPY.cuda


_CUPY_DTYPES: dict = {}


def _cupy_dtypes() -> dict:
    """torch dtype -> the NumPy dtype CuPy gives the same elements (bfloat16: ml_dtypes')."""
    if not _CUPY_DTYPES:
        pairs = [(torch.float16, numpy.float16), (torch.float32, numpy.float32), (torch.float64, numpy.float64),
                 (torch.int32, numpy.int32), (torch.int64, numpy.int64), (torch.int16, numpy.int16),
                 (torch.int8, numpy.int8), (torch.uint8, numpy.uint8), (torch.bool, numpy.bool_)]
        try:
            import ml_dtypes

            pairs.append((torch.bfloat16, ml_dtypes.bfloat16))
        except ImportError:  # (bfloat16 then goes through DLPack)
            pass
        _CUPY_DTYPES.update((t, numpy.dtype(n)) for t, n in pairs)
    return _CUPY_DTYPES


# The device whose torch stream CuPy runs on in this thread (inside _running_on), or None.
_ON_TORCH_STREAM = threading.local()
_HEADS_FIRST = (0, 2, 1, 3)  # flash-attn's (B, L, H, D) seen as cuflash's (B, H, L, D)


class _OnSharedStream:
    """A CUDA tensor handed to ``cupy.from_dlpack`` where both libraries already run on one stream
    (inside ``_running_on``): its capsule straight from torch's C++ exporter, without
    ``Tensor.__dlpack__``'s stream handshake (current-stream lookups and device-index parsing in
    Python: a quarter of a flash_attn_with_kvcache call's host time under cProfile, five tensors
    a call; benchmarks/NOTES.md, session 33). No event is needed: the consumer's stream is the
    producer's."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return torch.utils.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def _to_torch(array):
    """A torch tensor sharing the memory of a cuflash result (CuPy or NumPy array)."""
    if not isinstance(array, numpy.ndarray):
        return torch.from_dlpack(array)
    # torch.from_numpy takes any non-negative strides (a result in its input's memory order), but
    # warns on read-only arrays
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        array = numpy.array(array, order="K")
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@contextlib.contextmanager
def _running_on(tensor):
    """For a CUDA tensor: CuPy's current device is the tensor's, its stream is torch's current
    one, and whatever CuPy allocates comes from torch's caching allocator."""
    if tensor.device.type != "cuda":
        yield
        return
    import cupy

    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    outer = getattr(_ON_TORCH_STREAM, "device", None)
    # The device's primary context current on this thread: autograd's backward thread may have
    # none yet (torch sets its device lazily), and the driver calls (cuTensorMapEncodeTiled for
    # Hopper's TMA descriptors) need one; cudaSetDevice makes it current. (Tensors cross by their
    # pointers, _cupy_view, so no CuPy runtime call does it on the way.) Only when the device is
    # already the current one: otherwise cupy.cuda.Device sets it, and restores the caller's after.
    if cupy.cuda.runtime.getDevice() == index:
        cupy.cuda.runtime.setDevice(index)
    with cupy.cuda.Device(index), _current_cupy_stream(cupy, index), \
            cupy.cuda.using_allocator(_torch_allocator()):
        _ON_TORCH_STREAM.device = index
        ready = getattr(_ON_TORCH_STREAM, "ready", None)  # (devices whose context this thread made current)
        if ready is None:
            ready = _ON_TORCH_STREAM.ready = set()
        ready.add(index)
        try:
            yield
        finally:
            _ON_TORCH_STREAM.device = outer


_TORCH_ALLOCATOR = None


def _torch_allocator():
    """A CuPy allocator that takes its memory from torch's caching allocator, on torch's current
    stream of the device (so torch reuses a block only after that stream is done with it)."""
    global _TORCH_ALLOCATOR
    if _TORCH_ALLOCATOR is None:
        import cupy

        raw_alloc = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)

        def malloc(size, device_id):
            # CuPy allocates on its current device, which _running_on made torch's too: torch's
            # raw allocator on the current stream's handle, without caching_allocator_alloc's
            # device switch and Stream object (a few microseconds a call).
            if raw_alloc is not None and torch.cuda.current_device() == device_id:
                return raw_alloc(size, _current_raw_stream(device_id))
            return torch.cuda.caching_allocator_alloc(size, device_id, torch.cuda.current_stream(device_id))

        def free(pointer, device_id):
            # At interpreter exit torch may be torn down before CuPy frees what it still holds
            # (a plan's per-row offsets): that memory goes with the process anyway.
            if torch is not None and getattr(torch, "cuda", None) is not None:
                torch.cuda.caching_allocator_delete(pointer)

        _TORCH_ALLOCATOR = cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc
    return _TORCH_ALLOCATOR


class _TorchMemory:
    """A plan's outputs and workspaces as torch tensors on ``device``, launched on torch's
    current stream there (``cuflash._gpu.plan`` runs plans on any such memory)."""

    def __init__(self, device):
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.dtypes = {}

    def _dtype(self, dtype):
        torch_dtype = self.dtypes.get(dtype)
        if torch_dtype is None:
            torch_dtype = self.dtypes[dtype] = getattr(torch, dtype.name)
        return torch_dtype

    def empty(self, shape, dtype, order=None):
        """``order``: the axes' order in memory, outermost first (_spec.memory_order's): outputs
        and gradients laid out as their inputs, as torch's own kernels lay them out."""
        return _empty_strided_in_order(shape, order, self._dtype(dtype), self.device)

    def zeros(self, shape, dtype, order=None):
        if order is None:
            return torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)
        return self.empty(shape, dtype, order).zero_()

    @staticmethod
    def pointer(tensor):
        return tensor.data_ptr()

    @staticmethod
    def copy(target, source):
        """target[...] = source, broadcast and widened (exactly) to target's dtype."""
        target.copy_(source)

    @staticmethod
    def narrow(target, source):
        """target[...] = source (float32) rounded to nearest even in target's dtype."""
        target.copy_(source)

    def stream(self):
        return _current_raw_stream(self.index)


def _current_raw_stream(index):
    """torch's current stream on device ``index`` as a CUstream handle (torch's internal accessor
    where it exists: a tenth of the cost of building a torch.cuda.Stream object per call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_MEMORY: dict = {}
_gpu_plan = None


def _cached_plan(kind, tensors, options):
    """``(key, plan, memory)`` for a call on CUDA tensors: the plan planned before for this
    signature (None if none was) and the torch memory to run it on. The key: the tensors' dtypes,
    shapes, strides and device, whether each base address is 16-byte aligned (per tensor, as
    ``plan.signature``: a bias copied for its alignment and a q read in place must not share a
    key with the reverse), the options."""
    global _gpu_plan
    if _gpu_plan is None:
        from ._gpu import plan

        _gpu_plan = plan
    parts = [kind, options]
    for t in tensors:
        parts.append((t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16 == 0))
    key = tuple(parts)
    plan = _gpu_plan.kept_plan(key, tensors[1], tensors[2], _strides)
    if plan is None:
        return key, None, None
    device = tensors[0].device
    memory = _MEMORY.get(device)
    if memory is None:
        memory = _MEMORY[device] = _TorchMemory(device)
    return key, plan, memory


def _strides(*tensors):
    """The tensors' strides (torch's are in elements)."""
    return [t.stride() for t in tensors]


def _on_device(device):
    """The launch needs the tensor's device current (its kernels live in that device's context)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _cuflash_or_none(tensor):
    return None if tensor is None else _to_cuflash(tensor)


def _forward(q, k, v, sinks, scale, causal, window_left, window_right, deterministic, softcap=None, alibi=None,
             precision="highest", needs_grad=False, bias=None, mask=None, dropout=None):
    """(out, lse) as torch tensors: a cached plan on CUDA tensors, else cuflash's full path."""
    return _planned_forward(q, k, v, sinks, scale, causal, window_left, window_right, softcap, alibi, precision,
                            deterministic if needs_grad else None, bias, mask, dropout=dropout)[:2]


def _planned_forward(q, k, v, sinks, scale, causal, window_left, window_right, softcap, alibi, precision,
                     prefetch_backward, bias, mask, keep=None, dropout=None):
    """(out, lse, the cached plan that ran, or None where the full path did); ``prefetch_backward``
    as _api.forward's; ``keep``: ForwardPlan.run's (the bias's and mask's preparation for the
    backward, where a cached plan ran); ``dropout``: ``(rate, seed)`` or None (a kept plan of the
    rate replays with the call's seed)."""
    window = (window_left, window_right)
    options = (scale, _CAUSAL_BY_NAME[causal], window, precision, softcap)
    key, plan, memory = _cached_attention_plan("attention", (q, k, v), bias, mask, options, per_row=(alibi, sinks),
                                               extra=_api.dropout_key(*(dropout or (0.0, None))))
    if plan is not None:
        with _on_device(q.device):
            return plan.run(memory, q, k, v, bias=bias, mask=mask, alibi_slopes=alibi, sinks=sinks, keep=keep,
                            dropout_seed=dropout[1] if dropout else None) + (plan,)
    with _running_on(q):
        problem = _spec.resolve_forward(
            *(_to_cuflash(t) for t in (q, k, v)), scale=scale, causal=options[1], window=window, softcap=softcap,
            alibi_slopes=_cuflash_or_none(alibi), sinks=_cuflash_or_none(sinks), bias=_cuflash_or_none(bias),
            mask=_cuflash_or_none(mask), return_lse=True, precision=precision,
            **({} if dropout is None else dict(dropout_p=dropout[0], dropout_seed=dropout[1])),
        )
        out, lse = _api.forward(problem, key, prefetch_backward=prefetch_backward)
        return _to_torch(out), _to_torch(lse), None


def _backward(dout, q, k, v, out, lse, sinks, scale, causal, window_left, window_right, deterministic, softcap=None,
              alibi=None, precision="highest", bias=None, mask=None, bias_grad=False, forward_plan=None,
              prepared=None, dropout=None):
    """(dq, dk, dv) as torch tensors in q's, k's and v's shapes, then dbias (with bias and
    bias_grad) and dsinks (with sinks); cached plans as ``_forward``. ``forward_plan``: the cached
    plan that computed out and lse (or None), which remembers the backward plans that followed it;
    ``prepared``: its preparation of bias and mask (BackwardPlan.run's), or None; ``dropout`` the
    forward's ``(rate, seed)``, or None."""
    tensors = (dout, q, k, v, out, lse)
    seed = dropout[1] if dropout else None
    if forward_plan is not None:
        # Everything else the backward's plan key holds (q, k, v, bias, mask, slopes and sinks,
        # the options but these, out's and lse's layouts) the forward plan fixed: what follows
        # it is looked up by this short key, not by the whole signature's (tens of microseconds).
        follower = (deterministic, bias_grad, dout.dtype, dout.stride(), dout.data_ptr() % 16 == 0)
        plan = forward_plan.followers.get(follower)
        if plan is not None:
            with _on_device(q.device):
                return plan.run(_MEMORY[q.device], *tensors, bias=bias, mask=mask, alibi_slopes=alibi, sinks=sinks,
                                prepared=prepared, dropout_seed=seed)
    window = (window_left, window_right)
    options = (scale, _CAUSAL_BY_NAME[causal], window, deterministic, precision, softcap)
    key, plan, memory = _cached_attention_plan("attention_backward", tensors, bias, mask, options, bias_grad,
                                               per_row=(alibi, sinks), extra=_api.dropout_key(*(dropout or (0.0, None))))
    if plan is not None:
        if forward_plan is not None and len(forward_plan.followers) < _MAX_FOLLOWERS:
            forward_plan.followers[follower] = plan
        with _on_device(q.device):
            return plan.run(memory, *tensors, bias=bias, mask=mask, alibi_slopes=alibi, sinks=sinks, prepared=prepared,
                            dropout_seed=seed)
    with _running_on(q):
        problem = _spec.resolve_backward(
            *(_to_cuflash(t) for t in tensors), scale=scale, causal=options[1], window=window, softcap=softcap,
            alibi_slopes=_cuflash_or_none(alibi), sinks=_cuflash_or_none(sinks), bias=_cuflash_or_none(bias),
            mask=_cuflash_or_none(mask), bias_grad=bias_grad, deterministic=deterministic, precision=precision,
            **({} if dropout is None else dict(dropout_p=dropout[0], dropout_seed=dropout[1])),
        )
        return tuple(_to_torch(g) for g in _api.backward(problem, key))


# Backward plans a forward plan remembers (one per gradient layout and option set that followed it).
_MAX_FOLLOWERS = 8


def _cached_attention_plan(kind, tensors, bias, mask, options, bias_grad=False, per_row=(), extra=()):
    """``_cached_plan`` for a dense call on CUDA tensors, keyed as the CuPy API keys it
    (``_api.plan_key_parts``: bias, mask, ALiBi slopes and sinks beside the inputs, softcap and what is given among the
    options), else ``(None, None, None)``: a plan replays any of them on torch's allocator and
    stream, a bias's layout, a key-padding mask's cut and dbias included."""
    parts = _api.plan_key_parts(bias, mask, options, bias_grad, per_row) if tensors[0].is_cuda else None
    if parts is None or extra is None:  # (extra: _api.dropout_key's; None: not keyed)
        return None, None, None
    return _cached_plan(kind, tensors + parts[0], parts[1] + extra)


# CuPy's view of each torch stream met, by (device, CUstream handle): made once, not per call
# (a torch.cuda.Stream object and a CuPy stream each cost microseconds). A view does not own its
# CUDA stream, so a handle that torch reuses for a new stream is still named right; bounded,
# cleared when full.
_CUPY_STREAMS: dict = {}


def _current_cupy_stream(cupy, index):
    """torch's current stream on device ``index``, as a CuPy stream."""
    handle = _current_raw_stream(index)
    stream = _CUPY_STREAMS.get((index, handle))
    if stream is None:
        if len(_CUPY_STREAMS) >= 64:
            _CUPY_STREAMS.clear()
        stream = _CUPY_STREAMS[index, handle] = _cupy_stream(cupy, torch.cuda.current_stream(index), index)
    return stream


def _cupy_stream(cupy, torch_stream, device_index):
    """torch's stream as a CuPy stream: the CUDA stream protocol where both sides have it."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(torch_stream)
    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream in favour of from_external
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the custom ops -----------------------------------------------------------------------------


class _AttentionFunction(torch.autograd.Function):
    """The eager path: forward and backward as plain calls (see the module's docstring).
    Inputs: q, k, v, sinks, bias, mask (each may be None), then the options as one tuple (scale,
    causal, window_left, window_right, deterministic, softcap, alibi_slopes, precision: one
    argument, not eight, for the engine to look at), then dropout's (rate, seed) or None:
    differentiable in q, k, v, sinks and bias."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, bias, mask, options, dropout=None):
        scale, causal, window_left, window_right, deterministic, softcap, alibi, precision = options
        needs_grad = any(ctx.needs_input_grad[:5])
        # The bias's and mask's copies and cut, made once for the forward and its backward.
        keep = [] if needs_grad and (bias is not None or mask is not None) else None
        out, lse, ctx.plan = _planned_forward(
            q, k, v, sinks, scale, causal, window_left, window_right, softcap, alibi, precision,
            deterministic if needs_grad else None, bias, mask, keep, dropout)
        ctx.dropout = dropout
        ctx.prepared = keep[0] if keep else None
        ctx.save_for_backward(q, k, v, out, lse, sinks, bias, mask)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        # lse carries no gradient: without this the engine would allocate and zero one per call.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:  # out took no part in what is differentiated
            return (None,) * 8
        q, k, v, out, lse, sinks, bias, mask = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[4]
        grads = list(_backward(_dense(dout, out), q, k, v, out, lse, sinks, *ctx.options, bias=bias, mask=mask,
                               bias_grad=bias_grad, forward_plan=ctx.plan, prepared=ctx.prepared,
                               dropout=ctx.dropout))
        ctx.prepared = None  # (a second backward, retain_graph, lays them out again)
        dbias = grads.pop(3) if bias_grad else None
        dsinks = grads[3] if sinks is not None else None
        return tuple(grads[:3]) + (dsinks, dbias, None, None, None)


def _dense(tensor, like=None):
    """``tensor`` itself when it covers its memory once with a contiguous last axis (C order or a
    transposed view of it), else a contiguous copy. A gradient such as that of out.sum() arrives
    as a stride-0 expansion; one in out's own layout (``like``: transformers' transpose of out)
    is read in place, with no layout test."""
    if like is not None and tensor.stride() == like.stride():
        return tensor
    if tensor.is_contiguous() or _memory_order(tensor) is not None:
        return tensor
    return tensor.contiguous()


def _memory_order(tensor):
    """_spec.memory_order of a torch tensor."""
    return _spec.memory_order(tuple(tensor.shape), tuple(tensor.stride()))


def _empty_in_order(shape, order, dtype, device):
    """An empty tensor laid out in ``order`` (_spec.memory_order's; None: C order); its shape
    may hold symbolic sizes (torch.compile's fake results)."""
    if order is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_permuted(shape, order, dtype=dtype, device=device)


def _empty_strided_in_order(shape, order, dtype, device):
    """_empty_in_order for a plan's outputs (integer sizes), through torch.empty_strided: on an
    H200's host 2.1 us a call against empty_permuted's 3.1 and torch.empty's 5.6 (six of them
    in a forward and backward)."""
    return torch.empty_strided(shape, _strides_in_order(tuple(shape), order), dtype=dtype, device=device)


# The strides of a plan's output layouts, remembered (a plan asks for the same few per call).
_strides_in_order = functools.lru_cache(maxsize=1024)(_spec.strides_in_order)


def _result_order(x, shape, dtype):
    """The memory order of the result of ``shape`` and ``dtype`` that stands for ``x`` (out and dq
    for q, dk for k, dv for v), as both backends lay it out (_spec.result_order)."""
    return _spec.layout_order(tuple(x.shape), tuple(x.stride()), tuple(shape), dtype.itemsize)


def _empty_result(x, shape, dtype):
    """An empty result laid out as the backends lay out the one standing for ``x``: the custom
    ops' fakes promise torch.compile the layouts their real results have (_as_promised)."""
    return _empty_in_order(shape, _result_order(x, shape, dtype), dtype, x.device)


def _as_promised(result, x):
    """``result`` (standing for ``x``) in the layout _empty_result promised: itself where it has
    it (a result in a transposed input's order stays one, with no copy), else a copy."""
    order = _result_order(x, result.shape, result.dtype)
    if order is None:
        return result.contiguous()
    if _memory_order(result) == order:
        return result
    return _empty_in_order(result.shape, order, result.dtype, result.device).copy_(result)


@torch.library.custom_op("cuflash::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], causal: str,
                   window_left: int, window_right: int, deterministic: bool, softcap: Optional[float],
                   alibi_slopes: Optional[torch.Tensor], precision: str, dropout_p: float,
                   dropout_seed: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    # ``deterministic`` is for the backward; the forward carries it so autograd can read it.
    out, lse = _forward(q, k, v, sinks, scale, causal, window_left, window_right, deterministic, softcap, alibi_slopes,
                        precision, bias=bias, mask=mask, dropout=_op_dropout(dropout_p, dropout_seed))
    # The fake below promises out in q's memory order (a transposed q's, as transformers passes
    # it: no copy then) and a contiguous lse; make sure the real ones are laid out so.
    return _as_promised(out, q), lse.contiguous()


@_attention_fwd.register_fake
def _attention_fwd_shapes(q, k, v, scale, causal, window_left, window_right, deterministic, softcap, alibi_slopes,
                          precision, dropout_p, dropout_seed, sinks, bias, mask):
    lead_shape, _, _ = _spec._broadcast_leading(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = _empty_result(q, tuple(lead_shape) + (q.shape[-2], v.shape[-1]), q.dtype)
    lse = q.new_empty(lead_shape + (q.shape[-2],), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("cuflash::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: Optional[float], causal: str, window_left: int, window_right: int,
                   deterministic: bool, softcap: Optional[float], alibi_slopes: Optional[torch.Tensor],
                   precision: str, dropout_p: float, dropout_seed: Optional[torch.Tensor],
                   sinks: Optional[torch.Tensor], bias: Optional[torch.Tensor], mask: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = list(_backward(dout, q, k, v, out, lse, sinks, scale, causal, window_left, window_right, deterministic,
                           softcap, alibi_slopes, precision, bias=bias, mask=mask, bias_grad=bias is not None,
                           dropout=_op_dropout(dropout_p, dropout_seed)))
    # A custom op returns a fixed number of tensors: dsinks and dbias are empty without sinks / bias.
    dbias = grads.pop(3) if bias is not None else q.new_empty(0)
    dsinks = grads[3] if sinks is not None else q.new_empty(0)
    return tuple(_as_promised(g, x) for g, x in zip(grads[:3], (q, k, v))) + (dsinks.contiguous(), dbias.contiguous())


@_attention_bwd.register_fake
def _attention_bwd_shapes(dout, q, k, v, out, lse, scale, causal, window_left, window_right, deterministic, softcap,
                          alibi_slopes, precision, dropout_p, dropout_seed, sinks, bias, mask):
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0)
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty(0)
    return tuple(_empty_result(x, x.shape, x.dtype) for x in (q, k, v)) + (dsinks, dbias)


def _save_for_backward(ctx, inputs, output):
    q, k, v, *options, sinks, bias, mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, bias, mask)
    ctx.options = options  # scale, causal, window_left, window_right, deterministic, softcap, alibi_slopes, precision,
    # dropout_p, dropout_seed
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, sinks, bias, mask = ctx.saved_tensors
    # A gradient such as that of out.sum() arrives as a stride-0 expansion; give cuflash rows.
    # One in out's own layout (transformers' transpose of out) is read in place.
    dq, dk, dv, dsinks, dbias = torch.ops.cuflash.attention_bwd(_dense(dout, out), q, k, v, out, lse, *ctx.options,
                                                                sinks, bias, mask)
    return ((dq, dk, dv) + (None,) * len(ctx.options) + (dsinks if sinks is not None else None,)
            + (dbias if bias is not None else None, None))


torch.library.register_autograd(
    "cuflash::attention_fwd", _attention_backward, setup_context=_save_for_backward
)


# Packed (varlen) calls inside torch.compile: _VarlenFunction's work as two custom ops joined by
# register_autograd, their causal and window spelled as the attention ops' (_mask_arguments).


def _varlen_op_options(options) -> tuple:
    """attention_varlen's options dict as the ops' arguments (max_seqlen_q, max_seqlen_k, scale,
    causal name, window_left, window_right, softcap, deterministic, dropout_p, dropout_seed: a 0-d
    int64 tensor, traced, or None)."""
    causal_name, window_left, window_right = _mask_arguments(options["causal"], options.get("window"))
    return (int(options["max_seqlen_q"]), int(options["max_seqlen_k"]), options.get("scale"), causal_name,
            window_left, window_right, options.get("softcap"), bool(options.get("deterministic", False)),
            float(options.get("dropout_p", 0.0)), options.get("dropout_seed"))


def _varlen_options(max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, deterministic,
                    dropout_p=0.0, dropout_seed=None):
    """_varlen_op_options' inverse (the seed as cuflash's int)."""
    options = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale, causal=_CAUSAL_BY_NAME[causal],
                   window=(window_left, window_right), softcap=softcap, deterministic=deterministic)
    dropout = _op_dropout(dropout_p, dropout_seed)
    if dropout is not None:
        options.update(dropout_p=dropout[0], dropout_seed=dropout[1])
    return options


@torch.library.custom_op("cuflash::attention_varlen_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, seqused_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                   sinks: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: Optional[float],
                   causal: str, window_left: int, window_right: int, softcap: Optional[float],
                   deterministic: bool, dropout_p: float, dropout_seed: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks, _varlen_options(
        max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, deterministic, dropout_p,
        dropout_seed))
    return out.contiguous(), lse.contiguous()  # (as the shapes below promise)


@_varlen_fwd_op.register_fake
def _varlen_fwd_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks, *options):
    return (q.new_empty(q.shape[:2] + (v.shape[-1],)),
            q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("cuflash::attention_varlen_bwd", mutates_args=())
def _varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                   seqused_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                   sinks: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: Optional[float],
                   causal: str, window_left: int, window_right: int, softcap: Optional[float],
                   deterministic: bool, dropout_p: float, dropout_seed: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, out, lse, alibi_slopes, sinks,
                             _varlen_options(max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right,
                                             softcap, deterministic, dropout_p, dropout_seed))
    dsinks = grads[3] if sinks is not None else q.new_empty(0)  # (a fixed number of tensors)
    return tuple(g.contiguous() for g in grads[:3]) + (dsinks.contiguous(),)


@_varlen_bwd_op.register_fake
def _varlen_bwd_shapes(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks, *options):
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0)
    return tuple(x.new_empty(x.shape) for x in (q, k, v)) + (dsinks,)


def _save_varlen_for_backward(ctx, inputs, output):
    q, k, v, cu_q, cu_k, seqused_k, alibi, sinks, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, seqused_k, alibi, sinks)
    ctx.options = options
    ctx.mark_non_differentiable(output[1])


def _varlen_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, seqused_k, alibi, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.cuflash.attention_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                                                 seqused_k, alibi, sinks, *ctx.options)
    return (dq, dk, dv, None, None, None, None, dsinks if sinks is not None else None) + (None,) * len(ctx.options)


torch.library.register_autograd("cuflash::attention_varlen_fwd", _varlen_op_backward,
                                setup_context=_save_varlen_for_backward)


# flash_attn_with_kvcache inside torch.compile: the eager function as a custom op, in two forms
# (with new keys the caches are written in place, which the op declares; without, it mutates
# nothing, so compile's functionalization has no cache to copy). The schema fixes flash-attn's
# loose argument types: cache_seqlens as a tensor or an int, window_size as two ints.


def _kvcache_op_shapes(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int,
                       cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_left, window_right,
                       softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse):
    out = q.new_empty(q.shape[:3] + (v_cache.shape[-1],))
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if return_softmax_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=_lse_dtype(q.dtype))


def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                cache_seqlens: Optional[torch.Tensor], cache_seqlens_int: Optional[int],
                cache_batch_idx: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
                block_table: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool, window_left: int,
                window_right: int, softcap: float, rotary_interleaved: bool, alibi_slopes: Optional[torch.Tensor],
                num_splits: int, return_softmax_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    result = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens if cache_seqlens is not None else
        cache_seqlens_int, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, (window_left, window_right),
        softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
    if return_softmax_lse:
        return result[0], result[1].contiguous()
    return result, q.new_empty(0, dtype=_lse_dtype(q.dtype))  # (an op returns a fixed number of tensors)


for _name, _mutates in (("flash_attn_with_kvcache", ()), ("flash_attn_with_kvcache_append", ("k_cache", "v_cache"))):
    torch.library.custom_op(f"cuflash::{_name}", mutates_args=_mutates)(_kvcache_op).register_fake(
        _kvcache_op_shapes)


# --- ring attention over a torch.distributed process group: cuflash.torch.distributed -----------


class ProcessGroupComm:
    """The ring's communicator (rank, size, sendrecv, allreduce_sum) over a torch process group,
    on cuflash arrays (NumPy for CPU tensors, CuPy for CUDA ones) seen as tensors without a copy."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _peer(self, rank):
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def sendrecv(self, arrays, dest, source):
        return self.isendrecv(arrays, dest, source).wait()

    def isendrecv(self, arrays, dest, source):
        """The exchange started (``batch_isend_irecv``: NCCL runs it on its own stream); ``wait()``
        waits for it (on CUDA, the current stream waits) and returns the received arrays. The
        tensors sent are held until then."""
        if dest == self.rank and source == self.rank:
            copies = tuple(a.copy() for a in arrays)
            return _ring._Pending(lambda: copies)
        sent = [_to_torch(a) for a in arrays]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self._peer(dest), self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self._peer(source), self.group) for t in received]
        requests = dist.batch_isend_irecv(ops)

        def wait():
            for request in requests:
                request.wait()
            sent.clear()
            return tuple(_to_cuflash(t) for t in received)

        return _ring._Pending(wait)

    def allreduce_sum(self, array):
        tensor = _to_torch(array.copy())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return _to_cuflash(tensor)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, comm, options, deterministic):
        with _running_on(q):
            out, lse = _ring.ring_attention(*(_to_cuflash(t) for t in (q, k, v)), comm=comm,
                                                   sinks=_cuflash_or_none(sinks), return_lse=True, **options)
            out, lse = _to_torch(out), _to_torch(lse)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.comm, ctx.options, ctx.deterministic = comm, options, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        with _running_on(q):
            grads = _ring.ring_attention_backward(
                *(_to_cuflash(t) for t in (dout.contiguous(), q, k, v, out, lse)), comm=ctx.comm,
                sinks=_cuflash_or_none(sinks), deterministic=ctx.deterministic, **ctx.options)
            grads = [_to_torch(g) for g in grads]
        return grads[0], grads[1], grads[2], (grads[3] if sinks is not None else None), None, None, None


def _ring_attention(q, k, v, *, comm=None, causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
                   sinks=None, layout="zigzag", deterministic=False, return_lse=False):
    """:func:`cuflash.distributed.ring_attention` on this rank's shards (torch tensors) over the
    process group ``comm`` (None: the default group), differentiable in q, k, v and sinks.
    Returns out, or ``(out, lse)`` with ``return_lse`` (lse carries no gradient)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, tensor)
    if comm is not None and not isinstance(comm, dist.ProcessGroup):
        raise TypeError(f"comm must be a torch.distributed ProcessGroup or None (the default group), got "
                        f"{type(comm).__name__}")
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=_cuflash_or_none(alibi_slopes), layout=layout)
    out, lse = _RingFunction.apply(q, k, v, sinks, ProcessGroupComm(comm), options,
                                   _flag("deterministic", deterministic))
    return (out, lse) if return_lse else out


# ``cuflash.torch.distributed``: the torch face of cuflash.distributed (a namespace module, so that
# ``cuflash.torch.distributed.ring_attention`` reads as the issue names it).
distributed = types.ModuleType(f"{__name__}.distributed", "Ring attention over a torch.distributed process group, "
                               "with autograd: ring_attention(q, k, v, *, comm=None, ...), comm a ProcessGroup.")
distributed.ring_attention = _ring_attention
distributed.ProcessGroupComm = ProcessGroupComm
sys.modules[distributed.__name__] = distributed

# CuPy's import (and cuflash's GPU modules) on a thread while the program goes on (builds its
# model): a CUDA build of torch only, where CuPy is installed (kernels.import_ahead).
if torch.version.cuda is not None:
    from ._gpu import kernels as _kernels

    _kernels.import_ahead()
