"""The one dense reference every test compares against: attention written out the obvious way.

``attention_ref`` and ``attention_backward_ref`` compute in float64 NumPy from the whole score
matrix, with their own straightforward reading of the mask, GQA and broadcasting rules (nothing
from cuflash is imported, so a slip in cuflash's normalisation cannot hide in both).

``attention_ref_dtype`` and ``attention_backward_ref_dtype`` run the same dense formulas the way a
plain unfused implementation does in a lower precision (torch's math path): every matmul result
and the softmax rounded to the dtype. Their error against the float64 reference is the yardstick
tests/tolerance.py holds the fused algorithm to.
"""
from __future__ import annotations

import numpy


def dtype_of(name):
    """numpy.dtype of a dtype name, bfloat16 (ml_dtypes') included."""
    if name == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(name)


def lse_dtype_of(name):
    """The dtype cuflash returns lse in for inputs of dtype ``name``: float64 for float64, else float32."""
    return numpy.dtype(numpy.float64 if dtype_of(name) == numpy.float64 else numpy.float32)


def to_numpy(x):
    """A NumPy copy of a NumPy or CuPy array, in its own dtype."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.asnumpy(x)
    return numpy.array(x, copy=True)


def visible_mask(seqlen_q, seqlen_k, *, causal=False, window=None):
    """Bool (Lq, Lk): may query i see key j? Read straight off the public documentation.

    causal=True / "bottom_right" aligns the diagonal to the bottom-right corner (query i sees keys
    up to i + Lk - Lq), "top_left" to the top-left corner (keys up to i); window=(left, right)
    keeps keys within left before and right after that diagonal point (-1: no bound).
    """
    i = numpy.arange(seqlen_q)[:, None]
    j = numpy.arange(seqlen_k)[None, :]
    diagonal_key = i if causal == "top_left" else i + (seqlen_k - seqlen_q)
    mask = numpy.ones((seqlen_q, seqlen_k), dtype=bool)
    if window is not None:
        left, right = window
        if left != -1:
            mask &= j >= diagonal_key - left
        if right != -1:
            mask &= j <= diagonal_key + right
    if causal is not False:
        mask &= j <= diagonal_key
    return mask


def default_scale(head_dim):
    """1/sqrt(D); with D = 0 every score is 0 whatever the scale, and cuflash uses 1."""
    return 1.0 / numpy.sqrt(head_dim) if head_dim > 0 else 1.0


def _precision(dtype):
    """(work dtype, rounding): float64 exact; float32 in float32; float16/bfloat16 in float32,
    rounded to the dtype after each step, as a half-precision matmul with float32 accumulation."""
    dtype = numpy.dtype(dtype)
    if dtype == numpy.float64:
        return numpy.dtype(numpy.float64), lambda x: x
    if dtype == numpy.float32:
        return dtype, lambda x: x.astype(numpy.float32)
    return numpy.dtype(numpy.float32), lambda x: x.astype(dtype).astype(numpy.float32)


def _repeat_kv_heads(q, k, v):
    """k and v with GQA's kv heads repeated to q's head count; (k, v, group).

    GQA applies when the head axis (-3) of k and v broadcast together divides q's and differs
    from it, neither being 1; then each kv head h serves query heads h*group .. h*group+group-1.
    """
    kv_lead = numpy.broadcast_shapes(k.shape[:-2], v.shape[:-2])
    if q.ndim < 3 or not kv_lead:
        return k, v, 1
    heads_q, heads_kv = q.shape[-3], kv_lead[-1]
    if heads_q in (1, heads_kv) or heads_kv == 1:
        return k, v, 1
    group = heads_q // heads_kv

    def repeat(x):
        return numpy.repeat(x, group, axis=-3) if x.ndim >= 3 and x.shape[-3] == heads_kv else x

    return repeat(k), repeat(v), group


def _dense_probabilities(q, k, scale, mask, rounded):
    """(P, lse) of the dense masked softmax; rows with no visible key: P = 0, lse = -inf."""
    s = rounded(rounded(numpy.matmul(q, numpy.swapaxes(k, -1, -2))) * q.dtype.type(scale))
    s = numpy.where(mask, s, -numpy.inf)
    sees = mask.any(axis=-1)[:, None]
    row_max = numpy.where(sees, s.max(axis=-1, keepdims=True, initial=-numpy.inf), 0)
    e = numpy.exp(s - row_max)
    total = numpy.where(sees, e.sum(axis=-1, keepdims=True), 1)
    p = rounded(numpy.where(sees, e / total, 0))
    lse = numpy.where(sees, row_max + numpy.log(total), -numpy.inf)[..., 0]
    return p, lse


def _inputs(arrays, dtype):
    work, rounded = _precision(dtype)
    return [rounded(to_numpy(x).astype(numpy.float64).astype(work)) for x in arrays], rounded


def _lead(*arrays):
    return numpy.broadcast_shapes(*(x.shape[:-2] for x in arrays))


def _forward(q, k, v, dtype, scale, causal, window):
    (q, k, v), rounded = _inputs((q, k, v), dtype)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    k, v, _ = _repeat_kv_heads(q, k, v)
    lead = _lead(q, k, v)
    mask = visible_mask(q.shape[-2], k.shape[-2], causal=causal, window=window)
    p, lse = _dense_probabilities(q, k, scale, mask, rounded)
    out = rounded(numpy.matmul(p, v))
    out = numpy.broadcast_to(out, lead + out.shape[-2:]).astype(numpy.float64)
    lse = numpy.broadcast_to(lse, lead + lse.shape[-1:]).astype(numpy.float64)
    return out, lse


def attention_ref(q, k, v, *, scale=None, causal=False, window=None):
    """(out, lse) in float64: softmax(q k^T * scale, masked) v, dense."""
    return _forward(q, k, v, numpy.float64, scale, causal, window)


def attention_magnitudes(q, k, v, *, scale=None, causal=False, window=None):
    """Per-entry size of what out is built from, for the tolerance when scores are large.

    A relative rounding error eps in the scores is an absolute error eps * (|q| . |k|) * |scale|,
    which moves out_i by up to that times P |v|: so out_i's size is (P |v|)_i * (1 + max over
    visible j of (|q_i| . |k_j|) * |scale|). For unit-scale scores that is close to |out|.
    """
    q, k, v = (to_numpy(x).astype(numpy.float64) for x in (q, k, v))
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    k, v, _ = _repeat_kv_heads(q, k, v)
    mask = visible_mask(q.shape[-2], k.shape[-2], causal=causal, window=window)
    p, _ = _dense_probabilities(q, k, scale, mask, lambda x: x)
    score_size = numpy.where(mask, numpy.matmul(numpy.abs(q), numpy.swapaxes(numpy.abs(k), -1, -2)) * abs(scale), 0)
    size = numpy.matmul(p, numpy.abs(v)) * (1 + score_size.max(axis=-1, keepdims=True, initial=0))
    return numpy.broadcast_to(size, _lead(q, k, v) + size.shape[-2:])


def attention_ref_dtype(q, k, v, dtype, *, scale=None, causal=False, window=None):
    """(out, lse) of the plain unfused implementation in ``dtype``, as float64: the tolerance baseline."""
    return _forward(q, k, v, dtype, scale, causal, window)


def _reduce_to_shape(grad, shape):
    """Undo broadcasting: sum grad over the axes that broadcasting prepended or stretched."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def _backward(dout, q, k, v, dtype, scale, causal, window, magnitudes=False, large_scores=False):
    """Gradients of sum(out * dout), dense: dv = P^T dO; dP = dO v^T;
    dS = P * (dP - rowsum(P * dP)) (softmax's Jacobian); dq = dS k scale; dk = dS^T q scale.

    magnitudes=True runs the same formulas on absolute values (|dS| <= P (|dP| + rowsum(P |dP|)),
    and so on): the size of the terms each gradient sums, which bounds its rounding error even
    where cancellation makes the gradient itself tiny (a row with one key has dq = 0 exactly).
    With large_scores, P enters there as P * (1 + max visible (|q_i| . |k_j|) * |scale|): a
    relative rounding error eps in the recomputed scores is a relative error eps * |score| in P
    (as attention_magnitudes for out), which dominates once scores are far from unit scale.
    """
    shapes = [x.shape for x in (q, k, v)]
    (dout, q, k, v), rounded = _inputs((dout, q, k, v), dtype)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    k_full, v_full, group = _repeat_kv_heads(q, k, v)
    mask = visible_mask(q.shape[-2], k.shape[-2], causal=causal, window=window)
    p, _ = _dense_probabilities(q, k_full, scale, mask, rounded)
    if magnitudes:
        dout, q, k_full, v_full, scale = numpy.abs(dout), numpy.abs(q), numpy.abs(k_full), numpy.abs(v_full), abs(scale)
        if large_scores:
            score_size = numpy.where(mask, numpy.matmul(q, numpy.swapaxes(k_full, -1, -2)) * scale, 0)
            p = p * (1 + score_size.max(axis=-1, keepdims=True, initial=0))
    dp = rounded(numpy.matmul(dout, numpy.swapaxes(v_full, -1, -2)))
    row_term = (p * dp).sum(axis=-1, keepdims=True)
    ds = rounded(p * (dp + row_term if magnitudes else dp - row_term))
    dq = rounded(rounded(numpy.matmul(ds, k_full)) * q.dtype.type(scale))
    dk = rounded(rounded(numpy.matmul(numpy.swapaxes(ds, -1, -2), q)) * q.dtype.type(scale))
    dv = rounded(numpy.matmul(numpy.swapaxes(p, -1, -2), dout))

    def back_to_input(grad, shape, repeated):
        # numpy.repeat made `group` copies of each kv head, at heads h*group .. h*group+group-1.
        if repeated:
            grad = grad.reshape(grad.shape[:-3] + (grad.shape[-3] // group, group) + grad.shape[-2:]).sum(axis=-3)
        return _reduce_to_shape(grad, shape).astype(numpy.float64)

    def was_repeated(shape):
        return group > 1 and len(shape) >= 3 and shape[-3] != 1

    return (back_to_input(dq, shapes[0], False),
            back_to_input(dk, shapes[1], was_repeated(shapes[1])),
            back_to_input(dv, shapes[2], was_repeated(shapes[2])))


def attention_backward_ref(dout, q, k, v, *, scale=None, causal=False, window=None):
    """(dq, dk, dv) in float64, shaped like q, k, v: the analytic gradient of sum(out * dout)."""
    return _backward(dout, q, k, v, numpy.float64, scale, causal, window)


def attention_backward_magnitudes(dout, q, k, v, *, scale=None, causal=False, window=None, large_scores=False):
    """Per-entry size of the terms summed into (dq, dk, dv), for the tolerance's scale;
    large_scores: scores far from unit scale (see _backward)."""
    return _backward(dout, q, k, v, numpy.float64, scale, causal, window, magnitudes=True, large_scores=large_scores)


def attention_backward_ref_dtype(dout, q, k, v, dtype, *, scale=None, causal=False, window=None):
    """(dq, dk, dv) of the plain unfused backward in ``dtype``, as float64 (tolerance baseline)."""
    return _backward(dout, q, k, v, dtype, scale, causal, window)


def score_mods_ref(q, k, v, dout=None, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None,
                   sinks=None, bias=None, mask=None, dropout=None, dtype=numpy.float64, magnitudes=False):
    """Dense attention with score modifiers, bias and mask, and its gradients when ``dout`` is given.

    s = q k^T * scale; s = softcap * tanh(s / softcap); s += bias (broadcast to (..., Hq, Lq, Lk));
    s -= slope * |i + d - j| (ALiBi, d = Lk - Lq, or 0 under causal="top_left"); keys hidden by
    causal/window or by ``mask`` (bool, True = visible) at -inf; then a softmax over the row's
    scores and, with sinks, one more logit per head that carries no value. Returns (out, lse) or
    (out, lse, (dq, dk, dv[, dbias][, dsinks])) in the inputs' shapes, as float64; dbias is dS
    of the score after softcap (no softcap factor), summed over bias's broadcast axes.
    ``dtype``: float64, the reference; float16/bfloat16, the plain unfused implementation in that
    dtype (each step rounded, as _precision), the tolerance's baseline.
    ``magnitudes``: instead of the results, the size of the terms each one sums (out: P |v|
    times 1 + the largest visible |score| term, as attention_magnitudes; gradients: the backward's
    formulas on absolute values, as attention_backward_magnitudes), for the tolerance's
    ``magnitude``: dbias of a bias broadcast over keys sums a row's dS, which is 0 exactly.
    ``dropout``: ``(dropout_p, seed)``: P's entries dropped by cuflash._dropout's keep mask Z (the
    definition, checked against Philox's published answers in test_dropout.py) and the kept ones
    scaled by 1 / q: out = (P o Z / q) v, dv = (P o Z / q)^T dO, dS = P o (Z o dP / q - delta).
    """
    shapes = [x.shape for x in (q, k, v)]
    (q, k, v), rounded = _inputs((q, k, v), dtype)
    work = q.dtype.type
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    k_full, v_full, group = _repeat_kv_heads(q, k, v)
    lead = _lead(q, k_full, v_full)
    lq, lk = q.shape[-2], k.shape[-2]
    seen = visible_mask(lq, lk, causal=causal, window=window)
    if mask is not None:
        seen = seen & to_numpy(mask).astype(bool)
    raw = rounded(rounded(numpy.matmul(q, numpy.swapaxes(k_full, -1, -2))) * work(scale))
    s = raw
    if softcap is not None:
        s = rounded(work(softcap) * numpy.tanh(raw / work(softcap)))
    if bias is not None:
        s = rounded(s + to_numpy(bias).astype(numpy.float64).astype(q.dtype))
    if alibi_slopes is not None:
        slopes = numpy.broadcast_to(to_numpy(alibi_slopes).astype(numpy.float64), lead).astype(q.dtype)
        diagonal = 0 if causal == "top_left" else lk - lq
        distance = numpy.abs(numpy.arange(lq)[:, None] + diagonal - numpy.arange(lk)[None, :]).astype(q.dtype)
        s = rounded(s - slopes[..., None, None] * distance)
    s = numpy.broadcast_to(numpy.where(seen, s, -numpy.inf), lead + (lq, lk))
    sink = numpy.full(lead + (lq, 1), -numpy.inf, dtype=q.dtype)
    if sinks is not None:
        sink = numpy.broadcast_to(numpy.broadcast_to(to_numpy(sinks).astype(numpy.float64), lead)[..., None, None],
                                  lead + (lq, 1)).astype(q.dtype)
    logits = numpy.concatenate([s, sink], axis=-1)
    top = logits.max(axis=-1, keepdims=True)
    top = numpy.where(numpy.isfinite(top), top, 0)
    e = numpy.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    sees = total > 0
    p_all = numpy.where(sees, e / numpy.where(sees, total, 1), 0)
    lse = numpy.where(sees, top + numpy.log(numpy.where(sees, total, 1)), -numpy.inf)[..., 0]
    p = rounded(p_all[..., :lk])
    keep = None
    if dropout is not None:
        from cuflash import _dropout

        rows = numpy.arange(int(numpy.prod(lead)), dtype=numpy.uint64).reshape(lead)[..., None, None]
        keep = _dropout.keep_mask(dropout[1], dropout[0], rows, numpy.arange(lq)[:, None], numpy.arange(lk)[None, :])
        keep_scale = work(_dropout.keep_scale(dropout[0]))
    p_used = p if keep is None else rounded(numpy.where(keep, p * keep_scale, 0))  # what multiplies v
    out = result = rounded(numpy.matmul(p_used, v_full))
    if magnitudes:  # from here on, the same formulas on absolute values (see the docstring)
        score_size = numpy.where(seen, numpy.matmul(numpy.abs(q), numpy.swapaxes(numpy.abs(k_full), -1, -2))
                                 * abs(scale), 0)
        if bias is not None:
            size = numpy.abs(to_numpy(bias).astype(numpy.float64))
            score_size = score_size + numpy.where(seen & numpy.isfinite(size), size, 0)
        q, k_full, v_full, scale = numpy.abs(q), numpy.abs(k_full), numpy.abs(v_full), abs(scale)
        out = numpy.matmul(p_used, v_full)
        result = out * (1 + score_size.max(axis=-1, keepdims=True, initial=0))
    if dout is None:
        return result.astype(numpy.float64), lse.astype(numpy.float64)
    (dout,), _ = _inputs((numpy.broadcast_to(to_numpy(dout), out.shape),), dtype)
    if magnitudes:
        dout = numpy.abs(dout)
    delta = (dout * out).sum(axis=-1, keepdims=True)
    dv = rounded(numpy.matmul(numpy.swapaxes(p_used, -1, -2), dout))
    dp = rounded(numpy.matmul(dout, numpy.swapaxes(v_full, -1, -2)))
    if keep is not None:
        dp = numpy.where(keep, dp * keep_scale, 0)
    ds = p * (dp + (p * dp).sum(axis=-1, keepdims=True) if magnitudes else dp - delta)
    ds_bias = rounded(ds)
    if softcap is not None:
        ds = ds * (1 - numpy.tanh(raw / work(softcap)) ** 2)
    ds = rounded(ds)
    dq = rounded(rounded(numpy.matmul(ds, k_full)) * work(scale))
    dk = rounded(rounded(numpy.matmul(numpy.swapaxes(ds, -1, -2), q)) * work(scale))

    def back(grad, shape):
        if group > 1 and len(shape) >= 3 and shape[-3] != 1 and shape[-3] != grad.shape[-3]:
            grad = grad.reshape(grad.shape[:-3] + (grad.shape[-3] // group, group) + grad.shape[-2:]).sum(axis=-3)
        return _reduce_to_shape(grad, shape).astype(numpy.float64)

    grads = [back(dq, shapes[0]), back(dk, shapes[1]), back(dv, shapes[2])]
    if bias is not None:
        grads.append(_reduce_to_shape(ds_bias, numpy.shape(to_numpy(bias))).astype(numpy.float64))
    if sinks is not None:
        dsink = -(p_all[..., lk] * delta[..., 0]).sum(axis=-1)
        grads.append(_reduce_to_shape(dsink, numpy.shape(to_numpy(sinks))).astype(numpy.float64))
    return result.astype(numpy.float64), lse.astype(numpy.float64), tuple(grads)


def sink_gradient_ref(dout, out, lse, sinks):
    """(dsinks, magnitude) in float64 for a backward given ``out`` and ``lse`` (..., Lq): dsinks =
    -sum_i e^{sink - lse_i} (dout_i . out_i) per (batch..., head), summed to ``sinks``' shape, and
    the size of the terms it sums (sum_i e^{sink - lse_i} sum_d |dout_id out_id|), for the
    tolerance's ``magnitude``. Rows with lse = -inf contribute nothing."""
    dout, out, lse = (numpy.asarray(to_numpy(x), dtype=numpy.float64) for x in (dout, out, lse))
    sinks = numpy.asarray(to_numpy(sinks), dtype=numpy.float64)
    lead = lse.shape[:-1]
    sink_rows = numpy.broadcast_to(sinks, lead)[..., None]
    seen = numpy.isfinite(lse)
    p_sink = numpy.where(seen, numpy.exp(sink_rows - numpy.where(seen, lse, 0)), 0)
    terms = -(p_sink * (dout * out).sum(axis=-1)).sum(axis=-1)
    sizes = (p_sink * numpy.abs(dout * out).sum(axis=-1)).sum(axis=-1)
    return _reduce_to_shape(terms, sinks.shape), _reduce_to_shape(sizes, sinks.shape)
