"""Packed variable-length batches (cuflash.attention_varlen and its backward) against the float64
reference applied to each sequence alone, on the CPU backend (and on the GPU where present)."""
from __future__ import annotations

import dataclasses

import numpy
import pytest

import cuflash
from reference import (attention_backward_ref, attention_ref, dtype_of, lse_dtype_of, score_mods_ref, to_numpy,
                       visible_mask)


def _packed(rng, lengths_q, lengths_k, heads_q=4, heads_k=2, d=8, dv=6, dtype=numpy.float64):
    q = rng.standard_normal((sum(lengths_q), heads_q, d)).astype(dtype)
    k = rng.standard_normal((sum(lengths_k), heads_k, d)).astype(dtype)
    v = rng.standard_normal((sum(lengths_k), heads_k, dv)).astype(dtype)
    cu_q = numpy.concatenate([[0], numpy.cumsum(lengths_q)]).astype(numpy.int32)
    cu_k = numpy.concatenate([[0], numpy.cumsum(lengths_k)]).astype(numpy.int32)
    return q, k, v, cu_q, cu_k


def _heads_first(x):
    return x.transpose(1, 0, 2)


CASES = [
    ([5, 0, 1, 17, 9], [7, 3, 1, 17, 0], dict()),
    ([5, 0, 1, 17, 9], [7, 3, 1, 17, 4], dict(causal=True)),
    ([12, 3, 30], [4, 20, 30], dict(causal="top_left", window=(3, 0))),
    ([8, 8], [8, 8], dict(window=(2, 2))),
]


@pytest.mark.parametrize("lengths_q, lengths_k, options", CASES, ids=lambda c: str(c) if isinstance(c, dict) else None)
def test_each_sequence_equals_its_own_dense_attention(rng, lengths_q, lengths_k, options):
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k)
    dout = rng.standard_normal((q.shape[0], q.shape[1], v.shape[2]))
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert out.shape == (q.shape[0], 4, 6) and lse.shape == (4, q.shape[0])
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    for b in range(len(lengths_q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb, db = (_heads_first(x) for x in (q[rows], k[keys], v[keys], dout[rows]))
        ref_out, ref_lse = attention_ref(qb, kb, vb, **options)
        numpy.testing.assert_allclose(_heads_first(out[rows]), ref_out, rtol=1e-12, atol=1e-13)
        numpy.testing.assert_array_equal(numpy.isinf(lse[:, rows]), numpy.isinf(ref_lse))
        finite = numpy.isfinite(ref_lse)
        numpy.testing.assert_allclose(lse[:, rows][finite], ref_lse[finite], rtol=1e-12)
        for got, want in zip((dq[rows], dk[keys], dv[keys]), attention_backward_ref(db, qb, kb, vb, **options)):
            numpy.testing.assert_allclose(_heads_first(got), want, rtol=1e-10, atol=1e-12)


def test_seqused_k_keeps_only_the_used_keys(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [4, 6], [9, 5])
    used = numpy.array([3, 5], numpy.int32)
    out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, causal=True)
    dq, dk, dv = cuflash.attention_varlen_backward(out, q, k, v, out, cuflash.attention_varlen(
        q, k, v, cu_q, cu_k, seqused_k=used, causal=True, return_lse=True)[1], cu_q, cu_k, seqused_k=used, causal=True)
    ref, _ = attention_ref(*(_heads_first(x) for x in (q[0:4], k[0:3], v[0:3])), causal=True)
    numpy.testing.assert_allclose(_heads_first(out[0:4]), ref, rtol=1e-12, atol=1e-13)
    assert (dk[3:9] == 0).all() and (dv[3:9] == 0).all()  # unused keys of sequence 0


def test_modifiers_per_sequence(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [6, 9], [6, 11])
    slopes = numpy.abs(rng.standard_normal((2, 4)))  # (B, Hq): flash-attn's per-sequence form
    sinks = rng.standard_normal(4)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, softcap=3.0, alibi_slopes=slopes,
                                        sinks=sinks, return_lse=True)
    dout = rng.standard_normal(out.shape)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, softcap=3.0,
                                              alibi_slopes=slopes, sinks=sinks)
    dsinks = 0
    for b in range(2):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref_out, _, ref_grads = score_mods_ref(*(_heads_first(x) for x in (q[rows], k[keys], v[keys], dout[rows])),
                                               causal=True, softcap=3.0, alibi_slopes=slopes[b], sinks=sinks)
        numpy.testing.assert_allclose(_heads_first(out[rows]), ref_out, rtol=1e-12, atol=1e-13)
        numpy.testing.assert_allclose(_heads_first(grads[0][rows]), ref_grads[0], rtol=1e-10, atol=1e-12)
        dsinks = dsinks + ref_grads[3]
    numpy.testing.assert_allclose(grads[3], dsinks, rtol=1e-10, atol=1e-12)


# Lengths that repeat (in runs and apart), with 0 and 1: the CPU backend runs each group of equal
# (query, key) counts as one dense call (_varlen._length_groups).
GROUPED_LENGTHS = ([5, 5, 0, 9, 5, 1, 9, 5, 0, 1, 5], [7, 7, 3, 9, 7, 1, 9, 7, 0, 1, 7])
GROUPED_OPTIONS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window-top-left": dict(causal="top_left", window=(2, 0)),
    "softcap-alibi-per-sequence-sinks": dict(causal=True, softcap=3.0, alibi_slopes="batch-heads", sinks=True),
    "alibi-per-head": dict(alibi_slopes="heads", window=(3, 1)),
    "dropout": dict(causal=True, dropout_p=0.3, dropout_seed=1234),
    "seqused": dict(seqused_k=[5, 7, 0, 9, 2, 1, 9, 7, 0, 0, 6], causal=True),
}


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name", GROUPED_OPTIONS)
def test_cpu_groups_of_equal_lengths_give_each_sequences_own_call_bit_for_bit(rng, name, dtype):
    """out, lse, dq, dk, dv of a packed batch on the CPU equal each sequence's own dense call bit for
    bit (its dropout rows b * H + h), whatever sequences share its lengths; dsinks their sum."""
    q, k, v, cu_q, cu_k = _packed(rng, *GROUPED_LENGTHS, dtype=dtype)
    batch, heads = len(GROUPED_LENGTHS[0]), q.shape[1]
    options = dict(GROUPED_OPTIONS[name])
    slopes = {"batch-heads": numpy.abs(rng.standard_normal((batch, heads))).astype(dtype),
              "heads": numpy.abs(rng.standard_normal(heads)).astype(dtype)}.get(options.pop("alibi_slopes", None))
    sinks = rng.standard_normal(heads).astype(dtype) if options.pop("sinks", False) else None
    used = options.pop("seqused_k", None)
    used = None if used is None else numpy.array(used, numpy.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, alibi_slopes=slopes, sinks=sinks,
                                        return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, seqused_k=used, alibi_slopes=slopes,
                                              sinks=sinks, **options)
    dsinks = dsinks_size = 0  # the sequences' dsinks summed, and the size of what was summed
    for b in range(batch):
        rows = slice(cu_q[b], cu_q[b + 1])
        keys = slice(cu_k[b], cu_k[b + 1] if used is None else cu_k[b] + used[b])
        qb, kb, vb, ob, db = (_heads_first(x) for x in (q[rows], k[keys], v[keys], out[rows], dout[rows]))
        mine = dict(options, alibi_slopes=None if slopes is None else slopes[b] if slopes.ndim == 2 else slopes,
                    sinks=sinks)
        if "dropout_seed" in mine:  # sequence b's head h is the keep mask's row b * H + h
            problem = cuflash._spec.resolve_forward(qb, kb, vb, return_lse=True, **mine)
            want_out, want_lse = cuflash._api.forward(dataclasses.replace(problem, dropout_first_row=b * heads))
            backward = cuflash._spec.resolve_backward(db, qb, kb, vb, ob, lse[:, rows], **mine)
            want = cuflash._api.backward(dataclasses.replace(backward, dropout_first_row=b * heads))
        else:
            want_out, want_lse = cuflash.attention(qb, kb, vb, return_lse=True, **mine)
            want = cuflash.attention_backward(db, qb, kb, vb, ob, lse[:, rows], **mine)
        assert numpy.array_equal(_heads_first(out[rows]), want_out) and numpy.array_equal(lse[:, rows], want_lse), b
        for got, w in zip((grads[0][rows], grads[1][keys], grads[2][keys]), want[:3]):
            assert numpy.array_equal(_heads_first(got), w), b
        dsinks = dsinks + (want[3] if sinks is not None else 0)
        dsinks_size = dsinks_size + (numpy.abs(want[3]) if sinks is not None else 0)
    if sinks is not None:
        # Summed in another order than the packed call's: the rounding scales with the terms, not
        # with their sum, which may cancel (a head's 0.0057 from terms near 1 was 2e-5 off relatively).
        tolerance = (1e-5 if dtype == numpy.float32 else 1e-12) * dsinks_size
        assert numpy.all(numpy.abs(grads[3] - dsinks) <= tolerance), (grads[3], dsinks, tolerance)


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q=numpy.array([0, 5, 3, 10], numpy.int32)), ValueError, "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=numpy.array([0, 5, 9, 11], numpy.int32)), ValueError, "total_q = 10"),
    (dict(cu_seqlens_k=numpy.array([0, 4, 8], numpy.int32)), ValueError, "cu_seqlens_k must have 4 entries"),
    (dict(cu_seqlens_q=numpy.array([0, 5, 9, 10], numpy.int64)), TypeError, "cu_seqlens_q must be a 1-D int32"),
    (dict(cu_seqlens_q=[0, 5, 9, 10]), TypeError, "cu_seqlens_q must be a numpy.ndarray"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q = 3 is smaller than the longest sequence"),
    (dict(seqused_k=numpy.array([1, 9, 1], numpy.int32)), ValueError, "seqused_k must be between 0"),
    (dict(q="2d"), ValueError, "q must be 3-D"),
], ids=["unsorted", "wrong-total", "entries", "int64", "list", "max-seqlen", "seqused", "q-2d"])
def test_bad_varlen_arguments_name_what_is_wrong(rng, change, error, match):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 4, 1], [4, 4, 4])
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if change.get("q") == "2d":
        change = dict(q=q[:, 0])
    arguments.update(change)
    with pytest.raises(error, match=match):
        cuflash.attention_varlen(**arguments)


def test_out_is_written_only_after_every_sequence_ran(rng, monkeypatch):
    """A sequence refused in its own dense call (the CPU's value checks run per sequence) leaves
    the caller's out= as it was, though the sequences before it ran."""
    q, k, v, cu_q, cu_k = _packed(rng, [5, 4, 1], [4, 4, 4])
    out = numpy.full((10, 4, 6), 7.0)
    dense, calls = cuflash._api.forward, []

    def refuse_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("refused")
        return dense(*args, **kwargs)

    monkeypatch.setattr(cuflash._api, "forward", refuse_the_second)  # (each sequence's dense run)
    with pytest.raises(ValueError, match="refused"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, out=out)
    assert (out == 7.0).all() and len(calls) == 2
    monkeypatch.setattr(cuflash._api, "forward", dense)
    result, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, out=out, return_lse=True)
    assert result is out
    numpy.testing.assert_array_equal(out, cuflash.attention_varlen(q, k, v, cu_q, cu_k))


def test_a_batch_without_sequences_still_checks_and_shapes_everything(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [], [])
    sinks = rng.standard_normal(4)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True)
    assert out.shape == (0, 4, 6) and lse.shape == (4, 0) and lse.dtype == numpy.float64
    grads = cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, sinks=sinks)
    assert [g.shape for g in grads] == [(0, 4, 8), (0, 2, 8), (0, 2, 6), (4,)] and not grads[3].any()
    for options, error, match in [(dict(causal="sideways"), ValueError, "causal must be"),
                                  (dict(window=(-2, 0)), ValueError, "window left must be >= -1"),
                                  (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
                                  (dict(sinks=numpy.ones(3)), ValueError, "sinks must broadcast")]:
        with pytest.raises(error, match=match):
            cuflash.attention_varlen(q, k, v, cu_q, cu_k, **options)
        with pytest.raises(error, match=match):
            cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, **options)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, deterministic=None)


@pytest.mark.parametrize("change, error, match", [
    (dict(out=numpy.zeros((10, 4, 5))), ValueError, r"out must have shape \(10, 4, 6\) \(total_q, Hq, Dv\)"),
    (dict(out=numpy.zeros((10, 4, 6)).tolist()), TypeError, r"out must be a numpy\.ndarray like q, got list"),
    (dict(out="broadcast"), ValueError, r"out must not have overlapping elements"),
    (dict(q=(1, 2)), TypeError, r"q must be a numpy\.ndarray \(CPU\) or a cupy\.ndarray \(GPU\).*got tuple"),
], ids=["out-dv", "out-list", "out-broadcast", "q-tuple"])
def test_out_and_q_of_the_packed_forward(rng, change, error, match):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 4, 1], [4, 4, 4])
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if isinstance(change.get("out"), str):  # "broadcast"
        change = dict(out=numpy.lib.stride_tricks.as_strided(numpy.zeros(6), (10, 4, 6), (0, 0, 8)))
    arguments.update(change)
    with pytest.raises(error, match=match):
        cuflash.attention_varlen(**arguments)


@pytest.mark.parametrize("name, change, error, match", [
    ("dout", lambda a: a[:, :3], ValueError,
     r"dout must have the forward output's shape \(10, 4, 6\) \(total_q, Hq, Dv\)"),
    ("dout", lambda a: a.astype(numpy.float32), TypeError, r"dout must have q's dtype float64, got float32"),
    ("out", lambda a: a.tolist(), TypeError, r"out must be a numpy\.ndarray like q, got list"),
    ("lse", lambda a: a[None], ValueError,
     r"lse must have shape \(4, 10\) \(Hq, total_q\) in the packed layout, got \(1, 4, 10\)"),
    ("lse", lambda a: a.T, ValueError, r"got \(10, 4\) \(the transposed layout\)"),
], ids=["dout-heads", "dout-dtype", "out-list", "lse-3d", "lse-transposed"])
def test_backward_checks_the_packed_arrays_whole(rng, name, change, error, match):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 4, 1], [4, 4, 4])
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    arguments = dict(dout=out.copy(), q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    arguments[name] = change(arguments[name])
    with pytest.raises(error, match=match):
        cuflash.attention_varlen_backward(**arguments)


# --- GPU ----------------------------------------------------------------------------------------
# The packed kernels against score_mods_ref applied to each sequence alone (float64), packed back,
# under tests/tolerance.py's rule: float16/bfloat16 within 2x (out, lse) / 3x (gradients) of the
# plain implementation in that dtype (score_mods_ref's dtype= mode, per sequence, packed the same
# way); float32/float64 near their own rounding. Only semantics are checked (no launch count,
# tile or plan), so any implementation of the packed layout must pass. Exact zeros where the
# semantics give them: the out and dq rows of queries that see no key, the dk/dv rows of keys no
# query sees (or past seqused_k).
#
# The helpers take the array module (cupy; numpy runs the same checks on the CPU backend).

GPU_DTYPES = ["float16", "bfloat16", "float32", "float64"]

# name -> case. lengths: (lengths_q, lengths_k), or ("random", B, longest) drawn per run with a
# sequence of no queries (and Lk >= 2), one of no keys (and Lq >= 2), Lq = 1 and Lk = 1 forced in
# (so both Lq > Lk and Lq < Lk), or ("random-same", B, longest): Lq = Lk per sequence (0 and 1
# forced in). heads: (Hq, Hk); dims: (D, Dv). seqused: per-sequence list or "random".
# alibi: "heads" (Hq,) or "batch-heads" (B, Hq); sinks: (Hq,). hints: None (none given),
# "exact" (the true maxima), "larger" (above them), "q-only" (max_seqlen_q alone, larger).
# layout: "contiguous", "qkv" (q, k, v heads of one (total, Hq + 2 Hk, D) tensor, flash-attn's
# qkvpacked) or "offset" (misaligned slices of wider buffers, dout too). deterministic: the
# backward's flag (default: odd D).
VARLEN_GPU_CASES = {
    "mha-random": dict(lengths=("random", 9, 40), heads=(4, 4), dims=(64, 64)),
    "gqa-causal": dict(lengths=([0, 1, 5, 33, 17, 1, 0, 64], [3, 0, 1, 17, 40, 1, 0, 64]), heads=(8, 2),
                       dims=(128, 128), causal=True, hints="exact"),
    "mqa-top-left": dict(lengths=("random", 6, 50), heads=(4, 1), dims=(59, 59), causal="top_left"),
    "d3-window-w0": dict(lengths=("random", 7, 30), heads=(2, 2), dims=(3, 3), window=(4, 0)),
    "d3-causal-window": dict(lengths=("random", 5, 30), heads=(3, 3), dims=(3, 3), causal=True, window=(2, 0),
                             deterministic=False),
    "single-sequence": dict(lengths=([77], [130]), heads=(4, 2), dims=(64, 64), causal=True, hints="exact"),
    "long-d256": dict(lengths=([1025, 0, 3, 1, 17], [1025, 5, 0, 1, 30]), heads=(2, 1), dims=(256, 256),
                      causal=True),
    "long-keys-decode": dict(lengths=([1, 0, 1, 2, 1], [1025, 1, 0, 700, 1]), heads=(8, 2), dims=(128, 128),
                             hints="larger"),
    "dv-differs-window": dict(lengths=("random", 8, 45), heads=(8, 2), dims=(40, 24), window=(7, 3), scale=0.5),
    "softcap": dict(lengths=("random", 6, 60), heads=(4, 2), dims=(64, 64), softcap=2.0, causal=True),
    "alibi-heads": dict(lengths=("random", 6, 50), heads=(4, 4), dims=(59, 59), alibi="heads", causal=True),
    "alibi-batch-heads": dict(lengths=("random", 5, 50), heads=(4, 2), dims=(64, 64), alibi="batch-heads",
                              causal="top_left", deterministic=True),
    "alibi-window": dict(lengths=("random", 4, 40), heads=(8, 2), dims=(40, 24), alibi="batch-heads",
                         window=(6, 9)),
    "sinks": dict(lengths=([6, 0, 9, 1, 20, 3], [2, 7, 0, 1, 20, 9]), heads=(8, 2), dims=(64, 64), sinks=True,
                  causal=True),
    "all-modifiers": dict(lengths=("random", 7, 48), heads=(8, 2), dims=(128, 128), softcap=5.0, alibi="batch-heads",
                          sinks=True, causal=True, window=(16, 0), deterministic=True),
    "seqused": dict(lengths=([4, 6, 0, 3, 8, 1], [9, 5, 4, 20, 0, 7]), seqused=[3, 5, 2, 0, 0, 1], heads=(4, 2),
                    dims=(64, 64), causal=True),
    "seqused-sinks-mqa": dict(lengths=("random", 6, 40), seqused="random", heads=(4, 1), dims=(59, 59), sinks=True,
                              window=(5, -1), hints="exact"),
    "qkv-packed": dict(lengths=("random-same", 7, 50), heads=(4, 2), dims=(64, 64), layout="qkv", causal=True),
    "offset-views": dict(lengths=("random", 6, 50), heads=(8, 2), dims=(40, 24), layout="offset", window=(-1, 3)),
}


def _varlen_lengths(rng, spec):
    """(lengths_q, lengths_k) of a case (see VARLEN_GPU_CASES)."""
    if spec[0] not in ("random", "random-same"):
        return list(spec[0]), list(spec[1])
    kind, batch, longest = spec
    lengths_q = rng.integers(0, longest + 1, batch)
    at = rng.permutation(batch)
    if kind == "random-same":
        lengths_q[at[0]], lengths_q[at[1]] = 0, 1
        return lengths_q.tolist(), lengths_q.tolist()
    lengths_k = rng.integers(0, longest + 1, batch)
    lengths_q[at[0]], lengths_k[at[0]] = 0, max(lengths_k[at[0]], 2)  # no queries (Lq < Lk)
    lengths_q[at[1]], lengths_k[at[1]] = max(lengths_q[at[1]], 2), 0  # no keys (Lq > Lk)
    lengths_q[at[2]] = 1
    lengths_k[at[3]] = 1
    return lengths_q.tolist(), lengths_k.tolist()


def _varlen_seqused(rng, spec, lengths_k):
    """seqused_k's values (a list), or None; "random" draws each in [0, Lk_b] with a 0 and a full one."""
    if spec is None:
        return None
    if spec != "random":
        return list(spec)
    used = [int(rng.integers(0, n + 1)) for n in lengths_k]
    at = rng.permutation(len(used))
    used[at[0]] = 0
    used[at[1]] = lengths_k[at[1]]
    return used


def _varlen_buffers(rng, dtype, total_q, total_k, heads, dims, layout):
    """Host buffers in ``dtype`` and ``views(*buffers) -> (q, k, v, dout)``: the same slicing makes
    the device views from the buffers' device copies (every view's last axis is contiguous)."""
    (hq, hk), (d, dv) = heads, dims

    def draw(*shape):
        return rng.standard_normal(shape).astype(dtype)

    if layout == "contiguous":
        return ([draw(total_q, hq, d), draw(total_k, hk, d), draw(total_k, hk, dv), draw(total_q, hq, dv)],
                lambda q, k, v, dout: (q, k, v, dout))
    if layout == "qkv":
        assert total_q == total_k and d == dv
        return ([draw(total_q, hq + 2 * hk, d), draw(total_q, hq, dv)],
                lambda qkv, dout: (qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:], dout))
    assert layout == "offset"
    return ([draw(total_q, hq + 1, d + 3), draw(total_k, 2 * hk + 1, max(d, dv) + 2), draw(total_q, hq + 2, dv + 1)],
            lambda qb, kvb, dob: (qb[:, 1:, 1:1 + d], kvb[:, :hk, 2:2 + d], kvb[:, hk + 1:, 1:1 + dv],
                                  dob[:, 2:, :dv]))


def _varlen_options(rng, case, batch, heads_q, dtype):
    """The call's keyword arguments; ALiBi slopes and sinks in float32 (float64 for float64 inputs)."""
    param_dtype = numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32
    options = {key: case[key] for key in ("causal", "window", "softcap", "scale") if key in case}
    if "alibi" in case:
        shape = (heads_q,) if case["alibi"] == "heads" else (batch, heads_q)
        options["alibi_slopes"] = rng.uniform(0.05, 0.6, shape).astype(numpy.float32).astype(param_dtype)
    if case.get("sinks"):
        options["sinks"] = rng.standard_normal(heads_q).astype(numpy.float32).astype(param_dtype)
    return options


def _varlen_reference(q, k, v, dout, cu_q, cu_k, used, options, *, dtype=numpy.float64, magnitudes=False):
    """score_mods_ref of each sequence alone, packed back: [out, lse, dq, dk, dv, dsinks or None]
    as float64. Keys past seqused_k belong to no sequence: 0 gradients. ``dtype`` and
    ``magnitudes``: score_mods_ref's (the baseline in a lower precision; the terms' sizes)."""
    q, k, v, dout = (to_numpy(x) for x in (q, k, v, dout))
    heads_q = q.shape[1]
    out = numpy.zeros((q.shape[0], heads_q, v.shape[2]))
    lse = numpy.zeros((heads_q, q.shape[0]))
    dq, dk, dv = (numpy.zeros(x.shape) for x in (q, k, v))
    dsinks = None if options.get("sinks") is None else numpy.zeros(numpy.shape(options["sinks"]))
    slopes = options.get("alibi_slopes")
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + used[b])
        kwargs = dict(options)
        if slopes is not None and slopes.ndim == 2:
            kwargs["alibi_slopes"] = slopes[b]
        o, l, grads = score_mods_ref(*(_heads_first(x) for x in (q[rows], k[keys], v[keys], dout[rows])),
                                     dtype=dtype, magnitudes=magnitudes, **kwargs)
        out[rows], lse[:, rows] = _heads_first(o), l
        dq[rows], dk[keys], dv[keys] = (_heads_first(g) for g in grads[:3])
        if dsinks is not None:
            dsinks += numpy.abs(grads[3]) if magnitudes else grads[3]
    return [out, lse, dq, dk, dv, dsinks]


def _varlen_structural_zeros(cu_q, cu_k, used, options):
    """(queries that see no key, keys no query sees or past seqused_k): bool masks over the packed
    rows, from each sequence's own mask (reference.visible_mask)."""
    blind = numpy.zeros(cu_q[-1], bool)
    unseen = numpy.ones(cu_k[-1], bool)
    for b in range(len(cu_q) - 1):
        mask = visible_mask(cu_q[b + 1] - cu_q[b], used[b], causal=options.get("causal", False),
                            window=options.get("window"))
        blind[cu_q[b]:cu_q[b + 1]] = ~mask.any(axis=1)
        unseen[cu_k[b]:cu_k[b] + used[b]] = ~mask.any(axis=0)
    return blind, unseen


def _varlen_hints(mode, lengths_q, lengths_k):
    """(max_seqlen_q, max_seqlen_k) for a case's hints mode."""
    longest_q, longest_k = max(lengths_q, default=0), max(lengths_k, default=0)
    return {None: (None, None), "exact": (longest_q, longest_k), "larger": (longest_q + 37, longest_k + 100),
            "q-only": (longest_q + 5, None)}[mode]


def _varlen_problem(rng, xp, dtype, case):
    """Everything one case's calls need: host views and device arrays of the same values, the
    offsets, seqused_k and the options (host and device)."""
    dtype = dtype_of(dtype)
    lengths_q, lengths_k = _varlen_lengths(rng, case["lengths"])
    used = _varlen_seqused(rng, case.get("seqused"), lengths_k)
    cu_q = numpy.concatenate([[0], numpy.cumsum(lengths_q)]).astype(numpy.int32)
    cu_k = numpy.concatenate([[0], numpy.cumsum(lengths_k)]).astype(numpy.int32)
    buffers, views = _varlen_buffers(rng, dtype, int(cu_q[-1]), int(cu_k[-1]), case["heads"], case["dims"],
                                     case.get("layout", "contiguous"))
    device_buffers = [xp.asarray(x) for x in buffers]
    options = _varlen_options(rng, case, len(lengths_q), case["heads"][0], dtype)
    device_options = {key: xp.asarray(x) if isinstance(x, numpy.ndarray) else x for key, x in options.items()}
    return dict(dtype=dtype, lengths_q=lengths_q, lengths_k=lengths_k, cu_q=cu_q, cu_k=cu_k,
                used=lengths_k if used is None else used, host=views(*buffers), device=views(*device_buffers),
                buffers=buffers, device_buffers=device_buffers, options=options, device_options=device_options,
                offsets=dict(cu_seqlens_q=xp.asarray(cu_q), cu_seqlens_k=xp.asarray(cu_k),
                             seqused_k=None if used is None else xp.asarray(numpy.array(used, numpy.int32))))


def _varlen_expected(problem):
    """(references, baselines or Nones, magnitudes), each [out, lse, dq, dk, dv, dsinks]."""
    arguments = (*problem["host"], problem["cu_q"], problem["cu_k"], problem["used"], problem["options"])
    references = _varlen_reference(*arguments)
    baselines = [None] * 6
    if problem["dtype"].itemsize == 2:
        baselines = _varlen_reference(*arguments, dtype=problem["dtype"])
    return references, baselines, _varlen_reference(*arguments, magnitudes=True)


def _assert_varlen_close(results, problem, expected, names=("out", "lse", "dq", "dk", "dv", "dsinks")):
    """tolerance.assert_close for each result present (a None is skipped), named as ``names``."""
    from tolerance import EPS, assert_close

    dtype = problem["dtype"]
    references, baselines, magnitudes = expected
    for name, actual, reference, baseline, magnitude in zip(names, results, references, baselines, magnitudes):
        if actual is None:
            continue
        if name == "out":
            assert_close(actual, reference, dtype=dtype, baseline=baseline, magnitude=magnitude, name=name)
        elif name == "lse":
            assert_close(actual, reference, dtype=lse_dtype_of(dtype.name), baseline=baseline, kind="lse", name=name)
        else:
            # dsinks is stored in sinks' dtype but sums terms made in q's: as precise as the coarser
            precision = max(numpy.dtype(actual.dtype), dtype, key=lambda t: EPS[numpy.dtype(t).name])
            assert_close(actual, reference, dtype=precision, baseline=baseline, magnitude=magnitude, kind="grad",
                         name=name)


def _check_varlen_case(rng, xp, dtype, case, *, poisoned_out=False):
    """Forward (return_lse) and backward of one case on ``xp``'s backend, against the per-sequence
    references; returns the problem and (out, lse, grads) for further checks."""
    problem = _varlen_problem(rng, xp, dtype, case)
    dtype = problem["dtype"]
    q, k, v, dout = problem["device"]
    offsets, options = problem["offsets"], problem["device_options"]
    hints = dict(zip(("max_seqlen_q", "max_seqlen_k"),
                     _varlen_hints(case.get("hints"), problem["lengths_q"], problem["lengths_k"])))
    heads_q, dim_v = q.shape[1], v.shape[2]
    deterministic = case.get("deterministic", bool(case["dims"][0] % 2))
    before = [to_numpy(x).tobytes() for x in problem["device_buffers"]]

    out = None
    if poisoned_out:  # NaN everywhere, with a NaN guard before and after
        guard, size = 257, q.shape[0] * heads_q * dim_v
        buffer = xp.full(size + 2 * guard, numpy.nan, dtype=dtype)
        out = buffer[guard:guard + size].reshape(q.shape[0], heads_q, dim_v)
    result, lse = cuflash.attention_varlen(q, k, v, **offsets, **hints, **options, return_lse=True, out=out)
    if poisoned_out:
        assert result is out
        host_buffer = to_numpy(buffer).astype(numpy.float64)
        assert numpy.isnan(host_buffer[:guard]).all() and numpy.isnan(host_buffer[guard + size:]).all(), \
            "the forward wrote outside out="
    grads = cuflash.attention_varlen_backward(dout, q, k, v, result, lse, **offsets, **hints, **options,
                                              deterministic=deterministic)
    assert [to_numpy(x).tobytes() for x in problem["device_buffers"]] == before, "an input was modified"

    assert isinstance(result, xp.ndarray) and result.shape == (q.shape[0], heads_q, dim_v) and result.dtype == dtype
    assert isinstance(lse, xp.ndarray) and lse.shape == (heads_q, q.shape[0]) and lse.dtype == lse_dtype_of(dtype.name)
    sinks = options.get("sinks")
    assert len(grads) == (3 if sinks is None else 4)
    for name, grad, x in zip(("dq", "dk", "dv", "dsinks"), grads, (q, k, v, sinks)):
        assert isinstance(grad, xp.ndarray), f"{name} is a {type(grad).__name__}"
        assert grad.shape == x.shape and grad.dtype == x.dtype, f"{name}: {grad.shape} {grad.dtype}"
    host_results = [to_numpy(x) for x in (result, lse, *grads)] + [None] * (4 - len(grads))  # dsinks or None
    _assert_varlen_close(host_results, problem, _varlen_expected(problem))

    # Exact zeros: out and dq of queries that see no key, dk and dv of keys that no query sees.
    blind, unseen = _varlen_structural_zeros(problem["cu_q"], problem["cu_k"], problem["used"], problem["options"])
    out_host, lse_host, dq, dk, dv = host_results[:5]
    assert (out_host[blind] == 0).all(), "out rows of queries that see no key are not 0"
    assert (dq[blind] == 0).all(), "dq rows of queries that see no key are not 0"
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all(), "dk/dv rows of keys no query sees are not 0"
    if sinks is None:
        assert numpy.isneginf(lse_host[:, blind]).all(), "lse of queries that see no key is not -inf"
    return problem, (result, lse, grads), (blind, unseen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", list(VARLEN_GPU_CASES.values()), ids=list(VARLEN_GPU_CASES))
def test_gpu_varlen_matches_each_sequence_alone(rng, dtype, case):
    """Every dtype, head dims (odd, D != Dv, 3 to 256), GQA/MQA/MHA, random lengths with 0 and 1
    on both sides, one long sequence among short ones, causal both ways, windows, seqused_k,
    softcap, ALiBi in both forms, sinks, strided views, hints: out, lse and every gradient."""
    cupy = pytest.importorskip("cupy")
    _check_varlen_case(rng, cupy, dtype, case)


HINT_CASE = dict(lengths=([300, 0, 1, 7, 130, 2], [290, 6, 0, 1, 257, 2]), heads=(4, 2), dims=(64, 64), causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("hints", [None, "exact", "larger", "q-only"], ids=str)
def test_gpu_varlen_max_seqlen_hints_at_or_above_the_lengths(rng, dtype, hints):
    """max_seqlen hints equal to the longest sequences, larger than them, one of them or none:
    the same results (each against the reference)."""
    cupy = pytest.importorskip("cupy")
    _check_varlen_case(rng, cupy, dtype, dict(HINT_CASE, hints=hints))


def _nan_or_close(actual, problem, expected, index, allowed_rows, name, row_axis):
    """Entries may be NaN (a too-small hint's poison) only in ``allowed_rows`` (a bool mask over
    the packed rows, on ``row_axis``); every finite entry must meet the tolerance rule."""
    actual = to_numpy(actual).astype(numpy.float64)
    nan = numpy.isnan(actual)
    rows_with_nan = nan.any(axis=tuple(a for a in range(actual.ndim) if a != row_axis))
    assert not (rows_with_nan & ~allowed_rows).any(), f"{name}: NaN in a sequence within the hints"
    reference = expected[0][index]
    patched = numpy.where(nan, reference, actual)
    _assert_varlen_close([patched if i == index else None for i in range(6)], problem, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("short", ["q", "k", "both"])
def test_gpu_varlen_too_small_hint_raises_or_gives_nan(rng, dtype, deterministic, short):
    """A max_seqlen hint below a real length: ValueError, or NaN in the long sequence's results
    (forward and backward); never a wrong finite value, and the other sequences stay right."""
    cupy = pytest.importorskip("cupy")
    problem = _varlen_problem(rng, cupy, dtype, HINT_CASE)
    q, k, v, dout = problem["device"]
    offsets, options = problem["offsets"], problem["device_options"]
    exact_q, exact_k = max(problem["lengths_q"]), max(problem["lengths_k"])
    hints = dict(max_seqlen_q=64 if short in ("q", "both") else exact_q,
                 max_seqlen_k=64 if short in ("k", "both") else exact_k)
    # The sequences longer than a hint, over the packed query rows and key rows.
    cu_q, cu_k = problem["cu_q"], problem["cu_k"]
    affected = [b for b in range(len(cu_q) - 1)
                if cu_q[b + 1] - cu_q[b] > hints["max_seqlen_q"] or cu_k[b + 1] - cu_k[b] > hints["max_seqlen_k"]]
    assert affected
    rows_q, rows_k = numpy.zeros(cu_q[-1], bool), numpy.zeros(cu_k[-1], bool)
    for b in affected:
        rows_q[cu_q[b]:cu_q[b + 1]] = True
        rows_k[cu_k[b]:cu_k[b + 1]] = True
    expected = _varlen_expected(problem)

    try:
        out, lse = cuflash.attention_varlen(q, k, v, **offsets, **hints, **options, return_lse=True)
    except ValueError:
        pass
    else:
        _nan_or_close(out, problem, expected, 0, rows_q, "out", 0)
        _nan_or_close(lse, problem, expected, 1, rows_q, "lse", 1)
    out, lse = cuflash.attention_varlen(q, k, v, **offsets, **options, return_lse=True)  # right: no hints
    try:
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, **offsets, **hints, **options,
                                                  deterministic=deterministic)
    except ValueError:
        return
    for index, name, grad, rows in zip((2, 3, 4), ("dq", "dk", "dv"), grads, (rows_q, rows_k, rows_k)):
        _nan_or_close(grad, problem, expected, index, rows, name, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
def test_gpu_varlen_out_poisoned_with_nan_is_fully_written(rng, dtype, sinks):
    """out= full of NaN (with NaN guards around it): every row written, none outside, sequences
    without keys (or with seqused_k 0) give out 0 and lse -inf, or with sinks lse = the sink."""
    cupy = pytest.importorskip("cupy")
    case = dict(lengths=([3, 0, 5, 1, 40, 2, 9], [0, 4, 7, 0, 33, 1, 6]), seqused=[0, 4, 0, 0, 30, 1, 6],
                heads=(8, 2), dims=(64, 64), causal=True, sinks=sinks)
    problem, (out, lse, _), (blind, _) = _check_varlen_case(rng, cupy, dtype, case, poisoned_out=True)
    no_keys = numpy.zeros(problem["cu_q"][-1], bool)
    for b, used in enumerate(problem["used"]):
        no_keys[problem["cu_q"][b]:problem["cu_q"][b + 1]] = used == 0
    assert no_keys.sum() == 3 + 5 + 1 and blind[no_keys].all()
    out, lse = to_numpy(out).astype(numpy.float64), to_numpy(lse).astype(numpy.float64)
    assert (out[no_keys] == 0).all()
    if sinks:
        expected = numpy.broadcast_to(problem["options"]["sinks"].astype(numpy.float64)[:, None], lse.shape)
        numpy.testing.assert_allclose(lse[:, no_keys], expected[:, no_keys], rtol=1e-6, atol=1e-6)
    else:
        assert numpy.isneginf(lse[:, no_keys]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("causal", [True, "top_left"], ids=str)
def test_gpu_varlen_keyless_queries_and_unseen_keys_get_zero_gradients(rng, dtype, causal):
    """Sequences of no keys (or seqused_k 0): dq 0; no queries: dk, dv 0; keys past every query's
    window or causal limit, and past seqused_k: dk, dv 0; dsinks of such rows 0."""
    cupy = pytest.importorskip("cupy")
    case = dict(lengths=([7, 0, 4, 12, 3, 20], [0, 9, 4, 30, 25, 6]), seqused=[0, 9, 0, 28, 25, 6], heads=(4, 2),
                dims=(64, 64), causal=causal, window=(3, 0), sinks=True)
    problem, (_, _, grads), (blind, unseen) = _check_varlen_case(rng, cupy, dtype, case)
    cu_q, cu_k = problem["cu_q"], problem["cu_k"]
    assert blind[cu_q[0]:cu_q[1]].all() and blind[cu_q[2]:cu_q[3]].all()  # no keys, seqused_k 0
    assert unseen[cu_k[1]:cu_k[2]].all() and unseen[cu_k[2]:cu_k[3]].all()  # no queries, seqused_k 0
    assert unseen[cu_k[3] + 28:cu_k[4]].all() and unseen[cu_k[3]:cu_k[4]].sum() > 2  # past seqused_k, window
    dq, dk, dv = (to_numpy(g).astype(numpy.float64) for g in grads[:3])
    assert (dq[blind] == 0).all() and (dk[unseen] == 0).all() and (dv[unseen] == 0).all()
    assert numpy.isfinite(dq).all() and numpy.isfinite(dk).all() and numpy.isfinite(dv).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_varlen_deterministic_backward_is_bitwise_reproducible(rng, dtype):
    """GQA (groups of 4) with sinks, long enough that key tiles of one sequence and query heads of
    one group meet in the same dk/dv and dq rows: three runs, identical bits."""
    cupy = pytest.importorskip("cupy")
    case = dict(lengths=([300, 0, 1, 129, 77], [257, 5, 0, 300, 77]), heads=(8, 2), dims=(64, 64), causal=True,
                sinks=True)
    problem = _varlen_problem(rng, cupy, dtype, case)
    q, k, v, dout = problem["device"]
    offsets, options = problem["offsets"], problem["device_options"]
    out, lse = cuflash.attention_varlen(q, k, v, **offsets, **options, return_lse=True)
    runs = [cuflash.attention_varlen_backward(dout, q, k, v, out, lse, **offsets, **options, deterministic=True)
            for _ in range(3)]
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv", "dsinks"), runs[0], run):
            assert to_numpy(a).tobytes() == to_numpy(b).tobytes(), f"{name} differs between runs"
    _assert_varlen_close([None, None] + [to_numpy(g) for g in runs[0]], problem, _varlen_expected(problem))


# A repeated packed call of one signature (shapes, strides, options, hints) replays the first
# call's plan (cuflash._gpu.plan): the pointers of the new arrays and the new offsets must reach
# every launch. Each call gets new values and new lengths (a permutation of the same lengths, so
# the totals, the batch and the hints stay), and is checked against its own reference.
REPLAY_CASES = {
    "gqa-causal": dict(lengths=([0, 1, 5, 33, 17, 1, 64], [3, 0, 1, 17, 40, 1, 64]), heads=(8, 2), dims=(64, 64),
                       causal=True),
    "seqused-window": dict(lengths=([4, 6, 0, 3, 8, 1], [9, 5, 4, 20, 0, 7]), seqused="random", heads=(4, 2),
                           dims=(128, 128), window=(5, 2)),
    "top-left-d59": dict(lengths=([130, 2, 0, 77], [60, 9, 4, 200]), heads=(4, 1), dims=(59, 59), causal="top_left"),
    # (the slopes and sinks are read again by each replay; the backward with sinks takes the full path)
    "softcap-alibi-sinks": dict(lengths=([5, 0, 77, 1, 33], [9, 3, 60, 1, 40]), heads=(4, 2), dims=(64, 64),
                                causal=True, softcap=15.0, alibi="sequences", sinks=True),
    "softcap-alibi-heads": dict(lengths=([40, 7, 0, 2], [33, 7, 5, 90]), heads=(4, 4), dims=(96, 96), softcap=4.0,
                                alibi="heads", window=(20, 3)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", list(REPLAY_CASES.values()), ids=list(REPLAY_CASES))
def test_gpu_varlen_repeated_calls_replay_with_new_offsets_and_values(rng, dtype, case, deterministic):
    cupy = pytest.importorskip("cupy")
    from cuflash._gpu import plan

    lengths_q, lengths_k = case["lengths"]
    hints = (max(lengths_q) + 3, max(lengths_k))  # the same for every call: part of the signature
    plans_before = None
    for call in range(3):
        order = rng.permutation(len(lengths_q))
        this = dict(case, lengths=([lengths_q[i] for i in order], [lengths_k[i] for i in order]),
                    deterministic=deterministic)
        problem = _varlen_problem(rng, cupy, dtype, this)
        q, k, v, dout = problem["device"]
        offsets, options = problem["offsets"], problem["device_options"]
        kwargs = dict(offsets, **options, max_seqlen_q=hints[0], max_seqlen_k=hints[1])
        out, lse = cuflash.attention_varlen(q, k, v, **kwargs, return_lse=True)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, **kwargs, deterministic=deterministic)
        assert out.flags.c_contiguous and all(g.flags.c_contiguous for g in grads)
        results = [to_numpy(x) for x in (out, lse, *grads)]
        _assert_varlen_close(results + [None], problem, _varlen_expected(problem))
        blind, unseen = _varlen_structural_zeros(problem["cu_q"], problem["cu_k"], problem["used"],
                                                 problem["options"])
        assert (results[0][blind] == 0).all() and (results[2][blind] == 0).all()
        assert (results[3][unseen] == 0).all() and (results[4][unseen] == 0).all(), \
            "dk/dv of unseen keys (past seqused_k too) not 0 on a replay"
        if call == 0:
            plans_before = len(plan.PLANS)
    assert len(plan.PLANS) == plans_before, "a call of the same signature planned again instead of replaying"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_torch_varlen_replays_equal_the_cupy_calls(rng, dtype):
    """flash_attn_varlen_func's replayed plans (torch's allocator and stream) against CuPy's full
    path on the same tensors: bitwise equal out, lse and (deterministic) gradients, call after
    call with new offsets."""
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import cuflash.torch as cft

    torch_dtype = getattr(torch, dtype)
    lengths = [0, 1, 5, 33, 17, 1, 64, 40]
    for call in range(3):
        order = rng.permutation(len(lengths))
        cu = torch.tensor(numpy.concatenate([[0], numpy.cumsum([lengths[i] for i in order])]), dtype=torch.int32,
                          device="cuda")
        total = int(cu[-1])
        q, k, v = (torch.randn(total, heads, 64, dtype=torch_dtype, device="cuda", requires_grad=True)
                   for heads in (8, 2, 2))
        dout = torch.randn(total, 8, 64, dtype=torch_dtype, device="cuda")
        out, lse, _ = cft.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, causal=True, deterministic=True,
                                                 return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        arrays = [cupy.from_dlpack(t.detach()) for t in (q, k, v, cu)]
        expected = cuflash.attention_varlen(*arrays[:3], arrays[3], arrays[3], max_seqlen_q=70, max_seqlen_k=70,
                                            causal=True, return_lse=True)
        expected_grads = cuflash.attention_varlen_backward(cupy.from_dlpack(dout), *arrays[:3], *expected,
                                                           arrays[3], arrays[3], max_seqlen_q=70, max_seqlen_k=70,
                                                           causal=True, deterministic=True)
        for name, actual, reference in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv),
                                           (*expected, *expected_grads)):
            assert actual.is_contiguous(), name
            assert to_numpy(cupy.from_dlpack(actual.detach())).tobytes() == to_numpy(reference).tobytes(), \
                f"{name} differs from the CuPy call (call {call})"
