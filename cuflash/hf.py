"""Hugging Face ``transformers`` (5.x) integration: cuflash as a registered attention implementation.

::

    import cuflash.hf
    name = cuflash.hf.register()                     # "cuattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    # or: model.set_attn_implementation(name)

``register`` adds two entries under the same name:

* ``transformers.AttentionInterface``: :func:`attention_forward`, which runs
  :func:`cuflash.torch.attention` on the ``(B, H, L, D)`` query/key/value the model passes,
  GQA straight through (no ``repeat_kv``), and returns ``(B, L, H, D)`` as SDPA's integration does;
* ``transformers.masking_utils.AttentionMaskInterface``: :func:`mask_function`, SDPA's mask
  (``sdpa_mask``), so that a causal batch without padding yields ``attention_mask=None`` (the
  ``is_causal`` skip) and a padded batch yields a real boolean mask. Without a registered mask
  function transformers hands a custom attention no mask at all, padding included. Additions
  for a batch without a cache (training, prefill): a causal *sliding-window* mask without
  padding is skipped too (``None``), the window coming from the ``sliding_window`` argument the
  model passes to the attention function (SDPA would materialise that mask); and inside
  ``torch.compile``, where ``sdpa_mask`` materialises every mask, a causal or causal
  sliding-window one is skipped, or reduced to its padding (see below).

Semantics mirror ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` exactly:
``is_causal`` is the ``is_causal`` keyword when given, else ``module.is_causal`` (default True),
and only applies when ``Lq > 1`` and there is no mask (a single decode query attends to every
key); a causal call with ``Lk > Lq`` (prefill into an empty static cache) keeps the first ``Lq``
keys; causal is top-left aligned (``causal="top_left"``); ``sliding_window=w`` is transformers'
``kv_idx > q_idx - w``, i.e. cuflash's ``window=(w - 1, 0)``.

Attention-logit softcapping (Gemma-2's ``softcap``) and attention sinks (gpt-oss's ``s_aux``, with
their gradient) run in cuflash, on CPU and CUDA tensors. Padded batches (left or right padding)
and packed ones (``position_ids`` restarting per document, ``DataCollatorWithFlattening``), causal,
sliding windows too, without a cache, run in cuflash, each sequence on its own tokens: the mask
SDPA's mask function built is checked to be exactly that pattern first. Generation from
left- or right-padded prompts too: each decoding step is one call over the whole batch, a key
mask hiding each row's padding in the cache, causal bottom-right. Bidirectional encoders'
padded batches (BERT-like: every query sees its row's real keys; ModernBERT's local layers, a
band ``|i - j| <= w`` too) run as a key mask and a window, the mask checked once per forward to
be exactly that pattern; any other mask runs in cuflash as given (boolean: True = visible;
floating: added to the scores), as SDPA reads it. T5's learned relative-position bias
(``position_bias``) runs in cuflash as its bias, with its gradient. A padding-free batch that
names its documents (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``:
``cu_seq_lens_q/_k``, ``max_length_q/_k``) runs as one packed call per layer, each document
attending to itself as in transformers' flash-attention integration (eagerly and inside
``torch.compile``, with the cache on or off; SDPA's integration ignores those arguments).
Continuous batching (``generate_batch``) runs through :func:`paged_attention_forward`. What
cuflash does not support falls back to SDPA's integration (same arguments), with a one-time
warning per reason: a mask of another dtype, tensors on a device other than CPU/CUDA. Attention
dropout (a model in training mode) runs in cuflash, its keep mask seeded from torch's generator
(``cuflash.torch.attention``): a padded batch that drops runs as its mask rather than sequence by
sequence, padding-free documents as their packed call. :data:`COUNTS` counts cuflash calls and
fallbacks (by reason) so that a test or a benchmark can check the routing really happened;
:func:`reset_counts` clears it.

Inside ``torch.compile`` (fullgraph included: compiled training steps, StaticCache decoding with
the forward compiled in ``mode="reduce-overhead"``) a mask reaches cuflash's attention op as it
is, whatever its pattern: the faster eager forms above need the mask's pattern read on the host,
which a traced graph cannot do (and a CUDA graph replay would skip). A causal or causal
sliding-window batch without a cache is the exception: :func:`mask_function` knows its pattern
without reading it, and hands over no mask (no padding) or the ``(B, Lk)`` padding mask alone
(causal or banded kernels with the keys' mask). Nothing this module or ``cuflash.torch``
remembers between calls is read while tracing, and :data:`COUNTS` counts eager calls only: a
value read in a traced function becomes a guard of its graph, recompiled whenever the value
changes.
"""
import dataclasses
import warnings
import weakref

try:
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                            causal_mask_function, sdpa_mask)
except ImportError as error:  # pragma: no cover - exercised only where transformers is missing
    raise ImportError(
        "cuflash.hf needs PyTorch and Hugging Face transformers 5.x: pip install torch 'transformers>=5'"
    ) from error

from . import torch as _cuflash_torch

__all__ = ["register", "attention_forward", "paged_attention_forward", "mask_function", "COUNTS", "reset_counts",
           "DEFAULT_NAME"]

DEFAULT_NAME = "cuattn"

# Names transformers already gives a meaning: overriding them would change every model using them.
_RESERVED_NAMES = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                   "flash_attention_4"}

#: ``{"cuflash": n, "fallback": n, "fallback_reasons": {reason: n}}``, since import or reset_counts().
COUNTS = {"cuflash": 0, "fallback": 0, "fallback_reasons": {}}
_warned = set()


def reset_counts():
    """Zero :data:`COUNTS` and re-arm the one-time fallback warnings."""
    COUNTS["cuflash"] = 0
    COUNTS["fallback"] = 0
    COUNTS["fallback_reasons"] = {}
    _warned.clear()


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if "flash" in name:
        raise ValueError(
            f"name {name!r} contains 'flash': transformers treats any attention implementation whose "
            "name contains 'flash' as a flash-attention variant and tries to load flash_attn or a hub "
            "kernel for it; pick another name (the default is 'cuattn')"
        )
    if name.startswith("paged|"):
        raise ValueError(f"name {name!r}: the 'paged|' prefix is transformers' paged attention (continuous "
                         f"batching); register the plain name ({name[len('paged|'):]!r}), and register() adds "
                         "its 'paged|' form too")
    if "/" in name or ":" in name or "@" in name:
        raise ValueError(f"name {name!r} looks like a hub kernel reference ('org/repo[@rev][:fn]'); "
                         "transformers would try to download it; use a plain name such as 'cuattn'")
    if name in _RESERVED_NAMES:
        raise ValueError(f"name {name!r} is one of transformers' own implementations; registering "
                         "cuflash under it would replace it for every model; use e.g. 'cuattn'")


def register(name=DEFAULT_NAME):
    """Register cuflash's attention and SDPA's mask function under ``name``; returns ``name``.

    Afterwards ``attn_implementation=name`` (``from_config``, ``from_pretrained``,
    ``set_attn_implementation``) routes every attention call of a model that uses
    ``AttentionInterface`` through :func:`attention_forward`, and ``"paged|" + name`` (what
    transformers' continuous batching switches a model to) through :func:`paged_attention_forward`.
    Registering twice is harmless.
    Raises ValueError for a name transformers would not route to a custom function (any name
    containing "flash", a hub-kernel reference, a "paged|" name, a built-in name).
    """
    _check_name(name)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    # transformers' continuous batching (generate_batch, transformers serve) switches a model to
    # "paged|" + its implementation
    AttentionInterface.register(f"paged|{name}", paged_attention_forward)
    AttentionMaskInterface.register(f"paged|{name}", mask_function)
    return name


# --- the mask function ---------------------------------------------------------------------------


def _is_tracing(tensor=None):
    try:
        from transformers.utils.import_utils import is_tracing
    except ImportError:  # pragma: no cover - older layout
        return torch.compiler.is_compiling()
    return is_tracing(tensor)


def _is_sliding_causal(mask_fn, window, n, device):
    """Whether mask_fn is transformers' causal sliding window of this size (not a chunked mask, which
    also arrives with ``local_size``): evaluated on the first ``n`` positions, batch and head 0."""
    index = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    got = mask_fn(zero, zero, index[:, None], index[None, :])
    want = (index[None, :] <= index[:, None]) & (index[None, :] > index[:, None] - window)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool((got == want).all())


def _configured_window(config, local_size) -> bool:
    """Whether ``local_size`` is the model's sliding window (create_sliding_window_causal_mask's,
    ``config.sliding_window``) rather than a chunk size (create_chunked_causal_mask's,
    ``config.attention_chunk_size``): inside a trace the mask function cannot be evaluated to tell."""
    return (type(local_size) is int and getattr(config, "sliding_window", None) == local_size
            and getattr(config, "attention_chunk_size", None) != local_size)


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' ``sdpa_mask``, with shortcuts for a causal batch without a cache.

    ``None`` where SDPA's integration would run ``is_causal`` (or no mask at all); a boolean
    ``(B, 1, Lq, Lk)`` mask otherwise, which :func:`attention_forward` hands to SDPA. The shortcuts,
    all for ``Lq == Lk`` and no cache (a training step, a prefill), rely on such models passing
    ``sliding_window`` to the attention function (their flash-attention path needs it too):

    * a causal sliding-window mask without padding, the pattern verified to be the causal sliding
      window: ``None``;
    * inside ``torch.compile``, a causal mask, or a causal sliding-window one (``local_size`` the
      config's ``sliding_window``, which tells it from a chunked mask; the function cannot be
      evaluated in a trace): ``None`` without padding (sdpa_mask skips only the causal one, and
      only outside a trace, as it cannot read a padding mask's values there) and, with a padding
      mask, that ``(B, Lk)`` mask itself as booleans (:func:`attention_forward` reads a 2-D mask as
      "causal, the window if any, and these keys visible"). Otherwise the graph would build
      B x Lq x Lk booleans that every layer reads, all tiles computed, instead of running the
      causal kernels with a key-padding mask. The lengths are the graph's static sizes (sizes
      traced as symbols keep the full mask).

    And a bidirectional mask with padding (an encoder's batch, or a decoder's cross-attention to
    one; any lengths, no offsets): the padding as a ``(B, 1, 1, Lk)`` key mask, which SDPA
    broadcasts as the full mask and cuflash cuts each row's keys by (``None`` when nothing is
    padded, outside a trace, as sdpa_mask).
    """
    if mask_function is None:
        mask_function = causal_mask_function
    tracing = torch.compiler.is_compiling()
    no_cache = (allow_is_causal_skip and not kwargs.get("use_vmap", False)
                and all(type(n) is int for n in (q_length, kv_length, q_offset, kv_offset))
                and q_length == kv_length and q_offset == kv_offset == 0)
    known = no_cache and (mask_function is causal_mask_function if local_size is None else
                          tracing and _configured_window(kwargs.get("config"), local_size))
    if known and attention_mask is None:
        return None
    if known and tracing and attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length:
        return attention_mask.bool()
    if (mask_function is bidirectional_mask_function and local_size is None and attention_mask is not None
            and attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length
            and not kwargs.get("use_vmap", False) and q_offset == 0 and kv_offset == 0):
        # A bidirectional batch's padding (an encoder's; a decoder's cross-attention to it): the keys
        # alone, (B, 1, 1, Lk), which SDPA broadcasts as it would the full mask, instead of B x Lq x
        # Lk booleans every layer reads; none at all where nothing is padded, as sdpa_mask (which
        # cannot tell inside a trace).
        keys = attention_mask.bool()
        if not tracing and kwargs.get("allow_is_bidirectional_skip", False) and bool(keys.all()):
            return None
        return keys[:, None, None, :]
    arguments = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if (local_size is not None and allow_is_causal_skip and not kwargs.get("use_vmap", False)
            and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0
            and kv_offset == 0 and q_length == kv_length and kv_length >= local_size
            and not _is_tracing(attention_mask)):
        padding = attention_mask
        if padding is not None:
            padding = padding[:, -kv_length:] if padding.shape[-1] >= kv_length else None
        no_padding = attention_mask is None or (padding is not None and bool(padding.all()))
        device = kwargs.get("device", "cpu")
        if no_padding and _is_sliding_causal(mask_function, local_size, min(kv_length, local_size + 1), device):
            return None
    return sdpa_mask(**arguments)


# --- the attention function ----------------------------------------------------------------------


def _count(reason=None):
    """One call in COUNTS: cuflash's (``reason`` None) or a fallback to SDPA for ``reason``, warned
    once. Eager calls only: inside torch.compile a read of the counters would make the graph guard
    on their values, i.e. recompile at every call."""
    if torch.compiler.is_compiling():
        return
    if reason is None:
        COUNTS["cuflash"] += 1
        return
    COUNTS["fallback"] += 1
    COUNTS["fallback_reasons"][reason] = COUNTS["fallback_reasons"].get(reason, 0) + 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"cuflash.hf: {reason}, which cuflash does not support yet; this call and those "
                      "like it run transformers' SDPA attention instead (warned once)", stacklevel=4)


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    _count(reason)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


# The last mask's segments: every layer of a forward gets the same mask object. Kept for that
# object (a weak reference: the mask is not kept alive) and its version (an in-place change), not
# for its address, which a new mask of the same shape takes again once the old one is freed.
_LAST_SEGMENTS: list = []  # [(weakref to the mask, its version or None, sliding_window, segments)]
_LAST_FORM: list = []      # [(weakref to the mask, its version or None, None, _mask_form's result)]


def _remembered(memo, mask, key, compute):
    """``compute()``, or what it gave for this very mask (same object, same version) and ``key`` on
    the last call: transformers builds one mask per forward and hands it to every layer, so a
    mask's pattern is read on the host once per forward, not once per layer. (An inference tensor
    counts no versions: an in-place change to the same mask object between two calls goes unseen
    there; transformers makes a new mask for every forward.)"""
    version = None if mask.is_inference() else mask._version
    if memo:
        ref, last_version, last_key, result = memo[0]
        if ref() is mask and last_version == version and last_key == key:
            return result
    result = compute()
    memo[:] = [(weakref.ref(mask), version, key, result)]
    return result


def _segments(mask, sliding_window):
    """The sequences of a padded and/or packed causal batch, when ``mask`` is exactly SDPA's mask of
    one: ``(B, 1, L, L)`` boolean, key j visible to query i iff j is a real token (not padding)
    and ``start(i) <= j <= i`` with start(i) the first position of i's sequence (and ``j > i -
    sliding_window``). Padding on the left or right, and sequences packed back to back
    (``position_ids`` restarting, ``DataCollatorWithFlattening``) both have this form. Returns,
    per batch element, ``(start, end, key_start, key_end, alignment)`` per sequence: queries
    ``[start, end)`` against keys ``[key_start, key_end)``, causal with that alignment (top-left
    inside a sequence; key_end < end for right-padded queries, which see the sequence's real keys,
    as in SDPA's mask); rows outside every sequence see no key. With a cache (Lq < Lk): a
    _CacheKeys (_cache_segments: padding anywhere in the cache). None for any other mask (those
    run as _mask_form says). One host read per distinct mask.
    """
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] > mask.shape[3]
            or mask.numel() == 0):
        return None
    return _remembered(_LAST_SEGMENTS, mask, sliding_window, lambda: (
        _batch_segments(mask, sliding_window) if mask.shape[2] == mask.shape[3] else
        _cache_segments(mask, sliding_window)))


def _mask_form(mask, query):
    """cuflash's score options for an attention mask that is not a causal batch's (_segments): a
    dict of ``attention``'s keywords, or None for a mask of a dtype neither boolean nor floating.

    A boolean ``(B, 1, Lq, Lk)`` mask whose visible pairs are exactly "key j is one of batch row
    b's real keys, within a band ``i - left <= j <= i + right`` when Lq == Lk" (a bidirectional
    encoder's padded batch, BERT-like: every query sees its row's real keys; ModernBERT's local
    layers, ``|i - j| <= w``) runs as that window and a ``(B, 1, 1, Lk)`` key mask: the keys' cut
    and the window's tiles skipped, no Lq x Lk plane read. One host read per distinct mask. Any
    other mask runs as given (:func:`_mask_as_given`)."""
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] > 1:
        form = _remembered(_LAST_FORM, mask, None, lambda: _keys_in_band(mask))
        if form is not None:
            window, keys = form
            return dict(window=window, mask=keys)
    return _mask_as_given(mask, query)


def _keys_in_band(mask):
    """(window or None, (B, 1, 1, Lk) keys or None) when the boolean (B, 1, Lq, Lk) ``mask`` is
    exactly real keys x a band around the diagonal that holds it (Lq == Lk; any Lq: no band), else
    None. The band's sides are the widest the mask shows; a side as wide as the keys is unbounded
    (-1). Two host reads (the sides, then the verdict); one batch row at a time, so that no
    temporary outgrows a row's plane (a byte an entry)."""
    if mask.numel() == 0:  # (an empty batch or sequence: the call itself has nothing to compute)
        return None
    visible = mask[:, 0]
    q_length, kv_length = visible.shape[1:]
    keys = visible.any(dim=1)                                   # (B, Lk): keys some query sees
    window, band = None, None
    if q_length == kv_length:
        index = torch.arange(q_length, device=mask.device)
        sides = []
        for plane in visible:
            sees = plane.any(dim=1)                             # rows that see a key
            first = plane.to(torch.uint8).argmax(dim=1)         # each row's first visible key
            last = kv_length - 1 - plane.flip(-1).to(torch.uint8).argmax(dim=1)
            sides.append(torch.stack([torch.where(sees, index - first, -1).amax(),
                                      torch.where(sees, last - index, -1).amax()]))
        left, right = torch.stack(sides).amax(dim=0).tolist()
        if min(left, right) < 0:  # no key seen, or a band without the diagonal
            return None
        band = torch.ones(q_length, kv_length, dtype=torch.bool, device=mask.device).tril(right).triu(-left)
        window = tuple(-1 if side >= kv_length - 1 else side for side in (left, right))
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    for plane, row_keys in zip(visible, keys):
        expected = row_keys[None, :] if band is None else row_keys[None, :] & band
        same = same & (plane == expected).all()
    same, every = torch.stack([same, keys.all()]).tolist()
    if not same:
        return None
    return (None if window in (None, (-1, -1)) else window), (None if every else keys[:, None, None, :])


def _mask_as_given(mask, query):
    """``attention``'s keywords for a mask as SDPA reads it: boolean, True = visible (``mask``);
    floating, added to the scores (``bias``). None for any other dtype."""
    if mask.dtype == torch.bool:
        return dict(mask=mask)
    return dict(bias=_as_bias(mask, query)) if mask.is_floating_point() else None


def _as_bias(bias, query):
    """A floating tensor added to the scores as cuflash takes a bias: in q's dtype, or float32
    beside 16-bit queries (converted where it is in another)."""
    wanted = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    return bias if bias.dtype in (wanted, query.dtype) else bias.to(wanted)


def _mask_reason(mask):
    return f"an attention mask of dtype {mask.dtype} (neither boolean nor floating) was passed"


def _window_and_causal(expected, index_q, index_k, offset, sliding_window):
    """expected & (j <= i + offset) [& j > i + offset - sliding_window], i and j broadcast."""
    expected = expected & (index_k <= index_q + offset)
    if sliding_window is not None:
        expected = expected & (index_k > index_q + offset - int(sliding_window))
    return expected


@dataclasses.dataclass(frozen=True)
class _CacheKeys:
    """Decoding over a cache: each batch row's queries (the cache's last Lq positions) see its
    real keys, causal bottom-right (and the window). ``real``: (B, Lk) bool. ``lengths``: where
    row b's keys are the cache's first n_b and its queries the last Lq of those (causal
    bottom-right by n_b, the window by the queries' own positions: a static cache, filled to n_b
    of its Lk slots), the (B,) int32 n_b, with ``visible`` the (B, Lq, Lk) mask itself; else
    None."""

    real: torch.Tensor
    lengths: torch.Tensor | None = None
    visible: torch.Tensor | None = None


def _cache_segments(mask, sliding_window):
    """Decoding over a cache: ``(B, 1, Lq, Lk)``, Lq < Lk. Either each row's keys are its first
    n_b, the queries its last Lq of them (key j visible to query i iff ``j <= i + n_b - Lq``, and
    the window: a static cache filled to n_b), or key j is visible to query i iff j is real (any
    set of keys per row: left padding, right padding with the new tokens after it) and ``j <= i +
    Lk - Lq`` (causal bottom-right, and the window). A _CacheKeys, or None."""
    q_length, kv_length = mask.shape[2], mask.shape[3]
    visible = mask[:, 0]
    real = visible.any(dim=1)                       # (B, Lk): keys some query of the row sees
    index_q = torch.arange(q_length, device=mask.device)[None, :, None]
    index_k = torch.arange(kv_length, device=mask.device)[None, None, :]
    lengths = torch.where(real, index_k[0] + 1, 0).amax(dim=1).to(torch.int32)  # (B,): past each row's last real key
    by_lengths = _window_and_causal(index_k < lengths[:, None, None], index_q, index_k,
                                    lengths[:, None, None] - q_length, sliding_window)
    expected = _window_and_causal(real[:, None, :], index_q, index_k, kv_length - q_length, sliding_window)
    # (both forms checked in one host read)
    filled, padded = torch.stack([(visible == x).all() for x in (by_lengths, expected)]).tolist()
    if filled:
        return _CacheKeys(real, lengths, visible)
    return _CacheKeys(real) if padded else None


def _batch_segments(mask, sliding_window):
    """_segments without a cache (Lq == Lk): padded and/or packed sequences."""
    length = mask.shape[-1]
    visible = mask[:, 0]
    sees = visible.any(dim=2)                       # (B, L): rows that see a key
    real = visible.any(dim=1)                       # (B, L): keys some row sees
    first = visible.int().argmax(dim=2)             # (B, L): each row's first visible key
    starts = [_sequence_starts(f, w, sliding_window) for f, w in zip(first.tolist(), sees.tolist())]
    lo = torch.tensor([[length if x is None else x for x in row] for row in starts], device=mask.device)
    index = torch.arange(length, device=mask.device)
    expected = _window_and_causal(real[:, None, :] & (index[None, None, :] >= lo[:, :, None]),
                                  index[None, :, None], index[None, None, :], 0, sliding_window)
    if not torch.equal(visible, expected):
        return None
    result = [_runs(row, row_real) for row, row_real in zip(starts, real.tolist())]
    return None if any(runs is None for runs in result) else result


def _sequence_starts(first, sees, window):
    """Per row, the first position of its sequence (None: the row sees no key). A row's first
    visible key is its sequence's start unless the window cut it (first == i - window + 1): then
    the row continues the sequence of the row before."""
    starts, current = [], None
    for i, (f, s) in enumerate(zip(first, sees)):
        if not s:
            starts.append(None)
            continue
        if current is None or window is None or f > i - int(window) + 1:
            current = f
        starts.append(current)
    return starts


def _runs(starts, real):
    """(start, end, start, key_end, "top_left") of one batch row's sequences from each row's sequence start (None:
    sees no key) and the real keys; None unless every sequence starts on its own first row (so
    that causal top-left inside it is the mask's rule) and its real keys are one run from there."""
    runs, length, i = [], len(starts), 0
    while i < length:
        start = starts[i]
        if start is None:
            i += 1
            continue
        end = i + 1
        while end < length and starts[end] == start:
            end += 1
        key_end = start
        while key_end < end and real[key_end]:
            key_end += 1
        if start != i or any(real[key_end:end]):
            return None
        runs.append((start, end, start, key_end, "top_left"))
        i = end
    return runs


def _packed_sequences(segments, q_length, kv_length):
    """The segments as one packed batch over the flattened rows (row (b, i) -> b * L + i): ``(cu_q,
    cu_k, used, alignment)``, every stretch of rows outside a sequence (padding) a sequence of its
    own with no used key (out 0). None when the segments' alignments differ or their key ranges do
    not follow each other (one varlen call takes neither)."""
    alignments = {run[4] for runs in segments for run in runs}
    if len(alignments) > 1:
        return None
    cu_q, cu_k, used = [0], [0], []

    def add(q_end, k_end, keys):
        cu_q.append(q_end)
        cu_k.append(k_end)
        used.append(keys)

    for b, runs in enumerate(segments):
        for start, end, key_start, key_end, _ in runs:
            q0, k0 = b * q_length + start, b * kv_length + key_start
            if q0 < cu_q[-1] or k0 < cu_k[-1]:
                return None
            if q0 > cu_q[-1] or k0 > cu_k[-1]:
                add(q0, k0, 0)
            add(b * q_length + end, b * kv_length + key_end, key_end - key_start)
        if cu_q[-1] < (b + 1) * q_length or cu_k[-1] < (b + 1) * kv_length:
            add((b + 1) * q_length, (b + 1) * kv_length, 0)
    return cu_q, cu_k, used, alignments.pop() if alignments else "top_left"


def _flattens(x):
    """Whether (B, H, L, D) -> (B * L, H, D) is a view (B's stride is L of L's)."""
    return x.shape[0] == 1 or x.stride(0) == x.shape[2] * x.stride(2)


def _attention_of_segments(query, key, value, segments, scaling, window, softcap, sinks):
    """cuflash on every sequence of every batch row (_segments: queries [q0, q1) against keys
    [k0, k1), causal with the given alignment); rows outside every sequence (left padding) 0.
    Returns (B, Lq, H, Dv): the whole batch in one packed call (flash-attn's varlen layout over the
    flattened rows; sinks with their gradient); over a KV cache (``segments`` a _CacheKeys: a
    (B, H, L, D) cache does not flatten without copying it whole at every step), one call whose
    key mask hides each row's padding (_attention_over_cache); else one call per sequence."""
    if isinstance(segments, _CacheKeys):
        return _attention_over_cache(query, key, value, segments, scaling, window, softcap, sinks).transpose(1, 2)
    packed = None
    if query.shape[2] == key.shape[2] or all(_flattens(x) for x in (query, key, value)):
        packed = _packed_sequences(segments, query.shape[2], key.shape[2])
    if packed is not None:
        cu_q, cu_k, used, alignment = packed
        batch, heads, q_length = query.shape[:3]

        def rows(x):  # (B, H, L, D) -> (B * L, H, D): a view of the projections' (B, L, H, D)
            return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])

        ints = [torch.tensor(x, dtype=torch.int32, device=query.device) for x in (cu_q, cu_k, used)]
        options = dict(max_seqlen_q=max(b - a for a, b in zip(cu_q, cu_q[1:])),
                       max_seqlen_k=max(b - a for a, b in zip(cu_k, cu_k[1:])),
                       scale=scaling, causal=alignment, window=window, softcap=softcap)
        out, _ = _cuflash_torch._VarlenFunction.apply(rows(query), rows(key), rows(value), *ints, None, sinks,
                                                      options)
        return out.view(batch, q_length, heads, value.shape[-1])
    return _attention_of_sequences(query, key, value, segments, scaling, window, softcap, sinks).transpose(1, 2)


def _attention_over_cache(query, key, value, cache: _CacheKeys, scaling, window, softcap, sinks):
    """_attention_of_segments over a cache in one call: a (B, 1, 1, Lk) key mask hides each row's
    padding, causal bottom-right (a row's queries are the cache's last positions); a row with no
    real key gives 0. (B, H, Lq, Dv). A cache filled to n_b per row (``cache.lengths``): the
    kv-cache decode path over its first n_b keys (flash_attn_with_kvcache: the decode kernel on
    the GPU reads no more of the cache), where no gradient or sinks are asked for; else the mask
    itself."""
    if cache.lengths is not None:
        if sinks is None and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                                or value.requires_grad)):
            out = _cuflash_torch.flash_attn_with_kvcache(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cache_seqlens=cache.lengths,
                softmax_scale=scaling, causal=True, window_size=(-1, -1) if window is None else window,
                softcap=softcap or 0.0)
            return out.transpose(1, 2)
        return _cuflash_torch.attention(query, key, value, scale=scaling, softcap=softcap, sinks=sinks,
                                        mask=cache.visible[:, None])
    return _cuflash_torch.attention(query, key, value, scale=scaling, causal="bottom_right", window=window,
                                    softcap=softcap, sinks=sinks, mask=cache.real[:, None, None, :])


def _attention_of_sequences(query, key, value, segments, scaling, window, softcap, sinks):
    """_attention_of_segments one call per sequence; (B, H, Lq, Dv)."""
    length = query.shape[2]
    rows = []
    for b, runs in enumerate(segments):
        pieces, cursor = [], 0
        for start, end, key_start, key_end, alignment in runs:
            if start > cursor:
                pieces.append(query.new_zeros(1, query.shape[1], start - cursor, value.shape[-1]))
            pieces.append(_cuflash_torch.attention(query[b:b + 1, :, start:end], key[b:b + 1, :, key_start:key_end],
                                                   value[b:b + 1, :, key_start:key_end], scale=scaling,
                                                   causal=alignment, window=window, softcap=softcap, sinks=sinks))
            cursor = end
        if cursor < length:
            pieces.append(query.new_zeros(1, query.shape[1], length - cursor, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0)


def _unsupported(query, key, value, softcap, kwargs):
    """Why cuflash cannot run this call (a reason for the warning), or None."""
    if any(t.device.type not in ("cpu", "cuda") for t in (query, key, value)):
        return f"the tensors are on {query.device.type}, not CPU or CUDA"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value are not 4-dimensional (batch, heads, seq, dim)"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        return f"the head counts ({query.shape[1]} query, {key.shape[1]} key/value) are not GQA-compatible"
    return None


def _window_of(sliding_window, kv_length):
    """cuflash's window for transformers' ``sliding_window`` (``kv_idx > q_idx - sliding_window``),
    None where it hides no key of ``kv_length``."""
    if sliding_window is None or not 0 < sliding_window < kv_length:
        return None
    return (int(sliding_window) - 1, 0)


def _causal_with_visible_keys(keys_visible, q_length, window):
    """mask_function's 2-D form, ``(B, Lk)`` keys visible under the causal rule (``Lq == Lk``) and
    ``window`` (cuflash's, or None), as the ``(B, 1, Lq, Lk)`` boolean mask sdpa_mask builds."""
    if q_length != keys_visible.shape[-1]:
        raise ValueError(f"a 2-D attention_mask {tuple(keys_visible.shape)} is cuflash.hf.mask_function's form of a "
                         f"batch without a cache: as many queries as keys, got {q_length} queries")
    rule = torch.ones(q_length, keys_visible.shape[-1], dtype=torch.bool, device=keys_visible.device).tril()
    if window is not None:
        rule = rule.triu(-window[0])
    return rule & keys_visible[:, None, None, :]


def _traced_with_mask(module, query, key, value, attention_mask, scaling, dropout, softcap, is_causal, sliding_window,
                      kwargs):
    """attention_forward's call with a mask inside torch.compile: the mask itself, whatever its
    pattern, through cuflash's attention op (boolean: True = visible; floating: added to the
    scores), with no host read of its values (a traced graph cannot make one, and a CUDA graph
    replays without one: transformers' StaticCache decoding under ``mode="reduce-overhead"``).
    The eager path's faster forms (each sequence on its own tokens, the kv-cache kernel over a
    static cache's filled keys) need the mask's pattern on the host first. The mask holds the
    causal rule and any sliding window, as for SDPA; but for mask_function's 2-D form (a padded
    causal batch without a cache), causal kernels (with the layer's ``sliding_window``) and the
    keys' mask (their fully hidden key tiles skipped)."""
    visible_keys = attention_mask.dim() == 2
    window = _window_of(sliding_window, key.shape[2]) if visible_keys else None
    scores = (dict(causal="top_left", window=window, mask=attention_mask[:, None, None, :]) if visible_keys
              else _mask_as_given(attention_mask, query))
    reason = _unsupported(query, key, value, softcap, kwargs)
    if reason is None and scores is None:
        reason = _mask_reason(attention_mask)
    if reason is not None:
        if visible_keys:
            attention_mask = _causal_with_visible_keys(attention_mask, query.shape[2], window)
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    return _with_scores(query, key, value, scaling, softcap, kwargs, scores, dropout)


def _with_scores(query, key, value, scaling, softcap, kwargs, scores, dropout=0.0):
    """One cuflash call with the score options of a mask or of the causal rule (``scores``:
    attention's keywords) and the module's attention ``dropout`` (transformers passes 0 in
    evaluation), counted; transformers' (B, Lq, Hq, Dv) contiguous output. A
    ``position_bias`` (T5's learned relative-position bias, ``(1, H, Lq, Lk)``: its gradient too,
    summed over the batch deterministically) is the call's bias, plus a floating mask's values
    where there is one, as SDPA's integration adds them; cut to the keys the call sees (a prefill
    into an empty static cache keeps the first Lq)."""
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        position_bias = position_bias[..., : key.shape[2]]
        given = scores.get("bias")
        scores = dict(scores, bias=_as_bias(position_bias if given is None else position_bias + given, query))
    _count()
    out = _cuflash_torch.attention(query, key, value, scale=scaling, softcap=softcap or None, sinks=kwargs.get("s_aux"),
                                   **({"dropout_p": float(dropout)} if dropout else {}), **scores)
    return out.transpose(1, 2).contiguous(), None


def _collated_documents(query, kwargs):
    """The documents a padding-free batch names (``DataCollatorWithFlattening(return_flash_attn_
    kwargs=True)``: ``cu_seq_lens_q``/``_k`` and ``max_length_q``/``_k`` beside the flattened
    tokens), as (cu_q, cu_k int32 on q's device, max_q, max_k); None unless all four are given."""
    given = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if any(value is None for value in given):
        return None
    cu_q, cu_k = (t.to(device=query.device, dtype=torch.int32) for t in given[:2])
    return cu_q, cu_k, int(given[2]), int(given[3])


def _attention_of_documents(module, query, key, value, documents, scaling, softcap, sliding_window, is_causal,
                            kwargs, dropout=0.0):
    """Attention within each document of a padding-free batch (_collated_documents), as
    transformers' flash-attention integration computes it: the (B, L) tokens flattened, one packed
    call (causal per document by the module's rule; ``sliding_window`` as flash-attention's
    ``window_size``, ``(w - 1, w - 1)`` cut to ``(w - 1, 0)`` under causal); whatever mask the
    model built from the same documents is not read. Eager and traced alike (no host read).
    Returns (B, Lq, Hq, Dv)."""
    cu_q, cu_k, max_q, max_k = documents
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    if sliding_window is not None and 0 < sliding_window < key.shape[0] * key.shape[2]:
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    batch, heads, length = query.shape[:3]

    def rows(x):  # (B, H, L, D) -> (B * L, H, D): a view of the projections' (B, L, H, D)
        return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])

    options = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, scale=scaling, causal="top_left" if causal else False,
                   window=window, softcap=softcap or None)
    if dropout:  # (the module's attention dropout: its seed drawn from torch's generator, traced when compiling)
        rate, seed = _cuflash_torch._dropout_arguments(float(dropout), None, as_tensor=torch.compiler.is_compiling())
        options.update(dropout_p=rate, dropout_seed=seed)
    out, _ = _cuflash_torch._varlen_attention(rows(query), rows(key), rows(value), cu_q, cu_k, None, None,
                                              kwargs.get("s_aux"), options)
    return out.view(batch, length, heads, value.shape[-1])


def paged_attention_forward(module, query, key, value, attention_mask, cache=None, cu_seq_lens_q=None,
                            cu_seq_lens_k=None, max_seqlen_q=None, max_seqlen_k=None, block_table=None, scaling=None,
                            dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """transformers' paged attention-function signature (continuous batching: ``generate_batch``,
    ``transformers serve``), run by cuflash: the step's new keys and values written into the paged
    cache (``cache.update``, transformers' own), then one packed call over every request's
    queries against its keys, causal bottom-right (a request's new tokens are its last), a sliding
    layer's window ``(w - 1, 0)`` (``sliding_window`` as the model passes it, else the module's),
    softcap and sinks as in :func:`attention_forward`. ``query``
    ``(1, Hq, total_q, D)``; returns ``(attn_output (total_q, Hq, Dv), None)``. The mask is not
    read (the packed call's lengths are the requests' own). Transformers keeps its single-query
    decode path (``block_table``) to flash-attention names: should one be passed, the keys are
    read through the block table by :func:`cuflash.torch.flash_attn_with_kvcache`, as there."""
    if cache is None:
        raise ValueError("cuflash.hf.paged_attention_forward was called without a paged attention cache: it serves "
                         "transformers' continuous batching (generate_batch), which passes one")
    sliding_window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    window = (int(sliding_window) - 1, 0) if sliding_window else (-1, -1)
    if isinstance(cu_seq_lens_k, dict):  # one per layer type in a model with sliding layers
        layer_type = "full_attention" if window == (-1, -1) else "sliding_attention"
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    _count()
    if block_table is not None:
        from transformers.integrations.flash_paged import _paged_decode_forward

        return _paged_decode_forward(module, query, key, value, cache, cu_seq_lens_k, window,
                                     _cuflash_torch.flash_attn_with_kvcache, block_table), None
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    options = dict(max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k),
                   scale=module.scaling if scaling is None else scaling, causal=True,
                   window=None if window == (-1, -1) else window, softcap=softcap or None)
    out, _ = _cuflash_torch._varlen_attention(query.transpose(1, 2).squeeze(0), key, value,
                                              cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32), None,
                                              None, kwargs.get("s_aux"), options)
    return out, None


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function signature, run by cuflash.

    ``query (B, Hq, Lq, D)``, ``key``/``value (B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``; returns
    ``(attn_output (B, Lq, Hq, Dv) contiguous, None)``. See the module docstring for the rules and
    the fallbacks.
    """
    documents = _collated_documents(query, kwargs)
    if documents is not None:
        reason = _unsupported(query, key, value, softcap, kwargs)
        if reason is not None:
            return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        _count()
        return _attention_of_documents(module, query, key, value, documents, scaling, softcap, sliding_window,
                                       is_causal, kwargs, dropout).contiguous(), None
    if attention_mask is not None and torch.compiler.is_compiling():
        return _traced_with_mask(module, query, key, value, attention_mask, scaling, dropout, softcap, is_causal,
                                 sliding_window, kwargs)
    if attention_mask is not None and attention_mask.dim() == 2:  # (mask_function's traced form, called eagerly)
        attention_mask = _causal_with_visible_keys(attention_mask.bool(), query.shape[2],
                                                   _window_of(sliding_window, key.shape[2]))
    # (The sequences' packed call takes no position_bias; a (B, 1, 1, Lk) key mask has no segments;
    # with dropout the mask form runs, its keep mask indexed as the padded batch's.)
    segments = None
    if (attention_mask is not None and kwargs.get("position_bias") is None and not dropout
            and attention_mask.shape[-2] == query.shape[2]):
        segments = _segments(attention_mask, sliding_window)
    scores = None if attention_mask is None or segments is not None else _mask_form(attention_mask, query)
    reason = _unsupported(query, key, value, softcap, kwargs)
    if reason is None and attention_mask is not None and segments is None and scores is None:
        reason = _mask_reason(attention_mask)
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if scores is not None:  # any other mask: its pattern's form, or the mask itself
        return _with_scores(query, key, value, scaling, softcap, kwargs, scores, dropout)
    if segments is not None:  # padded and/or packed: every sequence on its own tokens
        window = (int(sliding_window) - 1, 0) if sliding_window is not None else None
        _count()
        out = _attention_of_segments(query, key, value, segments, scaling, window, softcap or None,
                                     kwargs.get("s_aux"))
        return out.contiguous(), None

    q_length, kv_length = query.shape[2], key.shape[2]
    # SDPA integration's rule, word for word: the keyword wins over the module's attribute, and
    # causal masking only applies to more than one query without a mask.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and kv_length > q_length:  # prefill into an empty static cache: the rest is masked anyway
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    window = _window_of(sliding_window, key.shape[2]) if causal else None
    return _with_scores(query, key, value, scaling, softcap, kwargs,
                        dict(causal="top_left" if causal else False, window=window), dropout)
