"""Packed variable-length batches (cuflash.attention_varlen and its backward) against the float64
reference applied to each sequence alone, on the CPU backend (and on the GPU where present)."""
from __future__ import annotations

import numpy
import pytest

import cuflash
from reference import attention_backward_ref, attention_ref, score_mods_ref


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
    dense, calls = cuflash._api.attention, []

    def refuse_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("refused")
        return dense(*args, **kwargs)

    monkeypatch.setattr(cuflash._api, "attention", refuse_the_second)
    with pytest.raises(ValueError, match="refused"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, out=out)
    assert (out == 7.0).all()
    monkeypatch.setattr(cuflash._api, "attention", dense)
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
