"""cuflash.attention_with_kvcache: attention over a KV cache with in-place append.

Each sequence's result is checked against the float64 dense reference (reference.score_mods_ref)
over its keys read from the cache by the test itself, position by position through the block
table (so a wrong gather, page order or offset cannot hide), with the new keys taken from k and
v, under tests/tolerance.py's rule. The append is checked byte for byte: after the call the
cache's whole buffer equals its copy from before with exactly the new slots written, so nothing
else changes (other sequences, positions past the new ones, spare pages, the padding of a
strided layout). Caches are contiguous ``(B, Hk, Lmax, D)`` or flash-attn's ``(B, Lmax, Hk, D)``
as a transposed view, or paged (random page order, spare pages, -1 past each sequence's pages,
page sizes 1/16/64/256 with Lmax not a multiple of the page).

GPU versions of the main cases are marked ``gpu`` (skipped without one).
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16") for the CPU backend)
import numpy
import pytest

import cuflash
from reference import dtype_of as _dtype, lse_dtype_of as _lse_dtype, score_mods_ref, to_numpy
from tolerance import assert_close

DTYPES = ["float16", "bfloat16", "float32", "float64"]


class Setup:
    """A cache with random contents everywhere (unused slots and spare pages included), its
    lengths, queries and new keys; host copies of everything as it was before the call."""

    def __init__(self, rng, dtype, *, seqlens, lnew, lq, capacity, heads_q=4, heads_k=2, d=16, dv=8, page_size=None,
                 layout="bhsd", spare_pages=3, xp=numpy):
        self.xp, self.dtype = xp, _dtype(dtype)
        self.seqlens = numpy.asarray(seqlens, numpy.int64)
        self.lnew, self.page_size = lnew, page_size
        batch = len(self.seqlens)
        self.batch = batch
        if page_size is None:
            slots = (batch, capacity)
            self.table = None
        else:
            max_pages = -(-capacity // page_size)
            num_pages = batch * max_pages + spare_pages
            table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
            used = -(-(self.seqlens + lnew) // page_size)
            table[numpy.arange(max_pages)[None, :] >= used[:, None]] = -1  # never read
            self.table = table.astype(numpy.int32)
            slots = (num_pages, page_size)

        def draw(shape):
            return rng.standard_normal(shape).astype(self.dtype)

        def cache(width):  # the buffer, and the (first, Hk, slot, width) view passed to cuflash
            if layout == "bshd":
                base = draw((slots[0], slots[1], heads_k, width))
                return base, base.transpose(0, 2, 1, 3)
            base = draw((slots[0], heads_k, slots[1], width))
            return base, base

        self.k_base, self.k_view = cache(d)
        self.v_base, self.v_view = cache(dv)
        self.q = draw((batch, heads_q, lq, d))
        self.k = draw((batch, heads_k, lnew, d))
        self.v = draw((batch, heads_k, lnew, dv))
        self.layout = layout
        self.before = [x.copy() for x in (self.k_base, self.v_base, self.q, self.k, self.v)]

    def slot(self, b, position):
        if self.table is None:
            return b, position
        return int(self.table[b, position // self.page_size]), position % self.page_size

    def keys(self, b):
        """(k, v) of sequence b after the append, (Hk, Lk, D): the old cache read slot by slot, then k and v."""
        k_old, v_old = (base.transpose(0, 2, 1, 3) if self.layout == "bshd" else base for base in self.before[:2])
        old = [self.slot(b, p) for p in range(int(self.seqlens[b]))]
        result = []
        for cache, new in ((k_old, self.k), (v_old, self.v)):
            rows = [cache[first, :, pos] for first, pos in old]
            stacked = numpy.stack(rows, axis=1) if rows else numpy.zeros(cache.shape[1:2] + (0,) + cache.shape[3:],
                                                                          cache.dtype)
            result.append(numpy.concatenate([stacked, new[b]], axis=1))
        return result

    def arguments(self, *, append=True, seqlens="array"):
        xp = self.xp
        arguments = dict(q=xp.asarray(self.q), k_cache=self.k_cache, v_cache=self.v_cache)
        if append:
            arguments.update(k=xp.asarray(self.k), v=xp.asarray(self.v))
        arguments["cache_seqlens"] = xp.asarray(self.seqlens.astype(numpy.int32)) if seqlens == "array" else seqlens
        if self.table is not None:
            arguments["block_table"] = xp.array(self.table)
        return arguments

    @property
    def k_cache(self):
        return self._device("k")

    @property
    def v_cache(self):
        return self._device("v")

    def _device(self, name):
        """The cache as passed: on the GPU, one device copy of the buffer kept for the test's life."""
        if self.xp is numpy:
            return getattr(self, f"{name}_view")
        if not hasattr(self, f"_{name}_device"):
            base = self.xp.asarray(getattr(self, f"{name}_base"))
            setattr(self, f"_{name}_device", (base, base.transpose(0, 2, 1, 3) if self.layout == "bshd" else base))
        return getattr(self, f"_{name}_device")[1]

    def buffers(self):
        """The caches' whole buffers now, on the host."""
        if self.xp is numpy:
            return self.k_base, self.v_base
        self.k_cache, self.v_cache  # noqa: B018 (make sure the device copies exist)
        return to_numpy(self._k_device[0]), to_numpy(self._v_device[0])

    def expected_buffers(self, appended=True):
        """The buffers as they must be: the copies from before with exactly the new slots written."""
        k_base, v_base = (x.copy() for x in self.before[:2])
        if appended:
            for base, new in ((k_base, self.k), (v_base, self.v)):
                view = base.transpose(0, 2, 1, 3) if self.layout == "bshd" else base
                for b in range(self.batch):
                    for t in range(self.lnew):
                        first, pos = self.slot(b, int(self.seqlens[b]) + t)
                        view[first, :, pos] = new[b, :, t]
        return k_base, v_base

    def assert_cache(self, appended=True):
        for name, actual, expected in zip(("k_cache", "v_cache"), self.buffers(), self.expected_buffers(appended)):
            assert actual.tobytes() == expected.tobytes(), f"{name}: bytes outside the new slots changed, or wrong"

    def assert_inputs_unchanged(self, q, k, v):
        for name, before, now in (("q", self.before[2], q), ("k", self.before[3], k), ("v", self.before[4], v)):
            if now is not None:
                assert to_numpy(now).tobytes() == before.tobytes(), f"{name} was modified"


def _per_sequence(x, b, batch, heads_q):
    return None if x is None else numpy.broadcast_to(to_numpy(x).astype(numpy.float64), (batch, heads_q))[b]


def check(setup, out, lse, options, *, exact=False):
    """out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) against each sequence's float64 reference."""
    dtype = setup.dtype
    out, lse = to_numpy(out), to_numpy(lse)
    batch, heads_q = setup.q.shape[:2]
    assert out.shape == setup.q.shape[:3] + setup.v.shape[3:] and out.dtype == dtype
    assert lse.shape == setup.q.shape[:3] and lse.dtype == _lse_dtype(dtype.name)
    mods = {key: value for key, value in options.items() if key not in ("alibi_slopes", "sinks")}
    for b in range(batch):
        k, v = setup.keys(b)
        per = dict(mods, alibi_slopes=_per_sequence(options.get("alibi_slopes"), b, batch, heads_q),
                   sinks=_per_sequence(options.get("sinks"), b, batch, heads_q))
        ref_out, ref_lse = score_mods_ref(setup.q[b], k, v, **per)
        baseline = None
        if dtype.name in ("float16", "bfloat16"):
            baseline = score_mods_ref(setup.q[b], k, v, dtype=dtype, **per)[0]
        assert_close(out[b], ref_out, dtype=dtype, baseline=baseline, name=f"out[{b}]")
        assert_close(lse[b], ref_lse, dtype=_lse_dtype(dtype.name), kind="lse", name=f"lse[{b}]")


def _seqlens(rng, batch, capacity, lnew):
    """0 and the fullest length first, then random ones."""
    top = capacity - lnew
    return [0, top] + [int(x) for x in rng.integers(0, top + 1, batch - 2)]


# --- CPU: contiguous caches ------------------------------------------------------------------


@pytest.mark.parametrize("lq", [1, 5, 64])
@pytest.mark.parametrize("lnew", [0, 1, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_cache(rng, dtype, lnew, lq):
    for layout, causal in (("bhsd", False), ("bshd", True)):
        setup = Setup(rng, dtype, seqlens=_seqlens(rng, 4, 70, lnew), lnew=lnew, lq=lq, capacity=70, layout=layout)
        arguments = setup.arguments()
        out, lse = cuflash.attention_with_kvcache(**arguments, causal=causal, return_lse=True)
        setup.assert_cache()
        setup.assert_inputs_unchanged(arguments["q"], arguments["k"], arguments["v"])
        check(setup, out, lse, dict(causal=causal))


@pytest.mark.parametrize("heads", [(3, 1), (6, 3), (2, 2)], ids=["mqa", "gqa", "mha"])
def test_head_groups_and_equal_lengths(rng, heads):
    """All sequences of one length (an int cache_seqlens) share one dense call; MQA, GQA, MHA."""
    setup = Setup(rng, "float64", seqlens=[9, 9, 9], lnew=2, lq=3, capacity=12, heads_q=heads[0], heads_k=heads[1])
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(seqlens=9), causal=True, return_lse=True)
    setup.assert_cache()
    check(setup, out, lse, dict(causal=True))


# --- CPU: paged caches -----------------------------------------------------------------------


@pytest.mark.parametrize("lnew", [0, 1, 5])
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_cache(rng, dtype, page_size, lnew):
    capacity = 300  # not a multiple of any page size here but 1: the table has room for more
    slots = -(-capacity // page_size) * page_size
    seqlens = [0, slots - lnew, capacity - lnew] + [int(x) for x in rng.integers(0, capacity - lnew, 2)]
    layout = "bshd" if page_size in (16, 256) else "bhsd"
    lq = int(rng.choice([1, 4, 17]))
    setup = Setup(rng, dtype, seqlens=seqlens, lnew=lnew, lq=lq, capacity=capacity, page_size=page_size,
                  layout=layout)
    arguments = setup.arguments()
    table = arguments["block_table"].copy()
    out, lse = cuflash.attention_with_kvcache(**arguments, causal=True, return_lse=True)
    setup.assert_cache()
    setup.assert_inputs_unchanged(arguments["q"], arguments["k"], arguments["v"])
    assert (arguments["block_table"] == table).all()
    check(setup, out, lse, dict(causal=True))


@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_equal_lengths_and_gqa(rng, page_size):
    setup = Setup(rng, "float32", seqlens=[37, 37, 37], lnew=5, lq=6, capacity=100, page_size=page_size,
                  heads_q=6, heads_k=2, layout="bshd")
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(seqlens=37), window=(20, 0), return_lse=True)
    setup.assert_cache()
    check(setup, out, lse, dict(window=(20, 0)))


def test_views_of_a_contiguous_cache_no_copy(rng, monkeypatch):
    """The dense calls read a contiguous cache where it lies; neighbours of equal length take one
    call."""
    setup = Setup(rng, "float32", seqlens=[3, 8, 8], lnew=1, lq=2, capacity=16, layout="bshd")
    seen, dense = [], cuflash._api.forward

    def spy(problem, *args, **kwargs):
        seen.append(problem)
        return dense(problem, *args, **kwargs)

    monkeypatch.setattr(cuflash._api, "forward", spy)
    cuflash.attention_with_kvcache(**setup.arguments())
    assert [p.q.shape[0] for p in seen] == [1, 2]
    assert all(numpy.shares_memory(p.k, setup.k_base) and numpy.shares_memory(p.v, setup.v_base) for p in seen)
    seen.clear()
    cuflash.attention_with_kvcache(**setup.arguments(append=False, seqlens=9))
    assert len(seen) == 1 and numpy.shares_memory(seen[0].k, setup.k_base)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["causal-window", "mods", "mods-window"])
def test_sequences_of_one_length_share_a_call(rng, monkeypatch, name, paged):
    """Sequences of equal length run as one dense call (a contiguous cache's only as a run of
    neighbours, its views), each sequence's result bit for bit that of its own call."""
    setup = Setup(rng, "float32", seqlens=[7, 2, 7, 7, 2, 0], lnew=0, lq=3, capacity=12, heads_q=4, heads_k=2,
                  page_size=4 if paged else None)
    options = _options(rng, name, setup.batch, setup.q.shape[1])
    seen, dense = [], cuflash._api.forward

    def spy(problem, *args, **kwargs):
        seen.append(problem.q.shape[0])
        return dense(problem, *args, **kwargs)

    monkeypatch.setattr(cuflash._api, "forward", spy)
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(append=False), **options, return_lse=True)
    assert seen == ([3, 2, 1] if paged else [1, 1, 2, 1, 1])
    check(setup, out, lse, options)
    for b in range(setup.batch):
        alone = dict(options, **{key: options[key][b:b + 1] for key in ("alibi_slopes", "sinks")
                                 if key in options and options[key].ndim == 2})
        arguments = setup.arguments(append=False)
        arguments.update(q=arguments["q"][b:b + 1], cache_seqlens=arguments["cache_seqlens"][b:b + 1])
        if paged:
            arguments["block_table"] = arguments["block_table"][b:b + 1]
        else:
            arguments.update(k_cache=arguments["k_cache"][b:b + 1], v_cache=arguments["v_cache"][b:b + 1])
        out_b, lse_b = cuflash.attention_with_kvcache(**arguments, **alone, return_lse=True)
        assert out_b.tobytes() == out[b:b + 1].tobytes() and lse_b.tobytes() == lse[b:b + 1].tobytes(), b


@pytest.mark.parametrize("form", ["int", "numpy-int", "0-d", "array", "none"])
def test_cache_seqlens_forms(rng, form):
    setup = Setup(rng, "float64", seqlens=[12, 12], lnew=0, lq=3, capacity=12)
    value = {"int": 12, "numpy-int": numpy.int32(12), "0-d": numpy.array(12), "none": None}.get(form, "array")
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(append=False, seqlens=value), return_lse=True)
    check(setup, out, lse, {})
    setup.assert_cache(appended=False)


# --- options, splits, rows that see nothing ------------------------------------------------


OPTION_SETS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window=(6, 0)),
    "window-ahead": dict(window=(3, 2)),
    "top-left": dict(causal="top_left"),
    "mods": dict(causal=True, softcap=2.5, alibi="heads", sinks="batch-heads"),
    "mods-window": dict(window=(9, 4), alibi="batch-heads", sinks="heads", scale=0.4),
}


def _options(rng, name, batch, heads_q):
    options = dict(OPTION_SETS[name])
    shapes = {"heads": (heads_q,), "batch-heads": (batch, heads_q)}
    if "alibi" in options:
        options["alibi_slopes"] = rng.uniform(0.05, 0.5, shapes[options.pop("alibi")]).astype(numpy.float32)
    if "sinks" in options:
        options["sinks"] = rng.standard_normal(shapes[options.pop("sinks")]).astype(numpy.float32)
    return options


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", OPTION_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_splits_equal_the_unsplit_call(rng, dtype, name, paged):
    """num_splits 1, 2, 3 and 7 (more ranges than some sequences have keys) within tolerance of
    the reference, each bitwise reproducible; sequences of 0, 1, 2 and many keys."""
    setup = Setup(rng, dtype, seqlens=[0, 1, 2, 45, 61], lnew=0, lq=int(rng.choice([1, 9])), capacity=64,
                  page_size=16 if paged else None)
    options = _options(rng, name, setup.batch, setup.q.shape[1])
    arguments = setup.arguments(append=False)
    for splits in (0, 1, 2, 3, 7):
        out, lse = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
        check(setup, out, lse, options)
        again = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
        assert out.tobytes() == again[0].tobytes() and lse.tobytes() == again[1].tobytes(), splits
    setup.assert_cache(appended=False)


@pytest.mark.parametrize("splits", [1, 3])
def test_append_with_splits_and_modifiers(rng, splits):
    setup = Setup(rng, "float32", seqlens=[0, 30, 17], lnew=5, lq=5, capacity=40, page_size=16, layout="bshd")
    options = _options(rng, "mods", setup.batch, setup.q.shape[1])
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(), **options, num_splits=splits, return_lse=True)
    setup.assert_cache()
    check(setup, out, lse, options)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(0, 0)), dict(causal=True, sinks=True)],
                         ids=["causal", "window", "causal-sinks"])
def test_rows_that_see_no_key(rng, options, splits):
    """Lq larger than a sequence's keys: under the bottom-right diagonal its first rows see
    nothing and give out 0 and lse -inf (the sink with sinks); a sequence of no keys at all too."""
    setup = Setup(rng, "float32", seqlens=[0, 2, 6], lnew=1, lq=10, capacity=8)
    options = dict(options)
    if options.pop("sinks", False):
        options["sinks"] = rng.standard_normal(setup.q.shape[1]).astype(numpy.float32)
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(), **options, num_splits=splits, return_lse=True)
    check(setup, out, lse, options)
    for b, length in enumerate(setup.seqlens + setup.lnew):
        blind = slice(0, 10 - int(length))  # rows i with i + Lk - Lq < 0
        assert (out[b, :, blind] == 0).all()
        expected = -numpy.inf if "sinks" not in options else options["sinks"][:, None]
        assert (lse[b, :, blind] == expected).all()


def test_out_is_written_and_returned(rng):
    for seqlens in ([4, 9], [9, 9]):
        setup = Setup(rng, "float32", seqlens=seqlens, lnew=0, lq=3, capacity=10)
        out = numpy.full((2, 4, 3, 8), 7.0, numpy.float32)
        result = cuflash.attention_with_kvcache(**setup.arguments(append=False), out=out, num_splits=2)
        assert result is out
        assert out.tobytes() == cuflash.attention_with_kvcache(**setup.arguments(append=False),
                                                               num_splits=2).tobytes()
        result, lse = cuflash.attention_with_kvcache(**setup.arguments(append=False), out=out, return_lse=True)
        assert result is out and lse.shape == (2, 4, 3)


def test_a_failing_sequence_restores_the_cache(rng, monkeypatch):
    """Should a dense call refuse a sequence after the append (its values, on the CPU), the new
    slots are put back as they were and out= is untouched."""
    setup = Setup(rng, "float32", seqlens=[3, 7, 1], lnew=2, lq=2, capacity=12, page_size=4)
    out = numpy.full((3, 4, 2, 8), 7.0, numpy.float32)
    dense, calls = cuflash._api.forward, []

    def refuse_the_second(problem, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("refused")
        return dense(problem, *args, **kwargs)

    monkeypatch.setattr(cuflash._api, "forward", refuse_the_second)
    with pytest.raises(ValueError, match="refused"):
        cuflash.attention_with_kvcache(**setup.arguments(), out=out)
    setup.assert_cache(appended=False)
    assert (out == 7.0).all()


def test_a_batch_of_nothing(rng):
    setup = Setup(rng, "float64", seqlens=[], lnew=1, lq=3, capacity=5, page_size=2)
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(), sinks=numpy.ones(4), return_lse=True)
    assert out.shape == (0, 4, 3, 8) and lse.shape == (0, 4, 3)


# --- argument errors -------------------------------------------------------------------------


def _bad(name, change, error, match, paged=False):
    return pytest.param(change, error, match, paged, id=name)


def _f32(x):
    return x.astype(numpy.float32)


ERRORS = [
    _bad("q-3d", lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 4-D \(B, Hq, Lq, D\)"),
    _bad("q-list", lambda a: a.update(q=a["q"].tolist()), TypeError, r"q must be a numpy.ndarray \(CPU\) or a cupy"),
    _bad("k_cache-list", lambda a: a.update(k_cache=[1]), TypeError, r"k_cache must be a numpy.ndarray like q"),
    _bad("v_cache-dtype", lambda a: a.update(v_cache=_f32(a["v_cache"])), TypeError,
         r"v_cache must have q's dtype float64, got float32"),
    _bad("q-int", lambda a: a.update(q=a["q"].astype(numpy.int32)), TypeError, r"q must have dtype float16"),
    _bad("v_cache-lmax", lambda a: a.update(v_cache=a["v_cache"][:, :, :10]), ValueError,
         r"v_cache's first three axes \(B, Hk, Lmax\) must equal k_cache's \(3, 2, 12\)"),
    _bad("k_cache-batch", lambda a: a.update(k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2]), ValueError,
         r"k_cache must have shape \(B, Hk, Lmax, D\) with B = 3"),
    _bad("k_cache-d", lambda a: a.update(k_cache=a["k_cache"][..., :5]), ValueError,
         r"k_cache's last axis \(head dim D\) must equal q's"),
    _bad("gqa", lambda a: a.update(q=numpy.concatenate([a["q"], a["q"][:, :1]], axis=1)), ValueError,
         r"Hq=5 heads, k_cache has Hk=2"),
    _bad("strided-last-axis", lambda a: a.update(k_cache=numpy.repeat(a["k_cache"], 2, axis=-1)[..., ::2]),
         ValueError, r"k_cache must have a contiguous last axis"),
    _bad("k-without-v", lambda a: a.pop("v"), ValueError, r"k and v must be given together"),
    _bad("k-heads", lambda a: a.update(k=a["k"][:, :1]), ValueError, r"k must have shape \(B, Hk, Lnew, D\)"),
    _bad("v-lnew", lambda a: a.update(v=a["v"][:, :, :1]), ValueError, r"v must have shape \(B, Hk, Lnew, Dv\)"),
    _bad("k-dtype", lambda a: a.update(k=_f32(a["k"])), TypeError, r"k must have q's dtype float64"),
    _bad("seqlens-int64", lambda a: a.update(cache_seqlens=a["cache_seqlens"].astype(numpy.int64)), TypeError,
         r"cache_seqlens must be an int or a 1-D int32 array"),
    _bad("seqlens-float", lambda a: a.update(cache_seqlens=2.0), TypeError, r"cache_seqlens must be an int"),
    _bad("seqlens-length", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:2]), ValueError,
         r"cache_seqlens must have B = 3 entries"),
    _bad("seqlens-negative", lambda a: a["cache_seqlens"].__setitem__(1, -1), ValueError,
         r"cache_seqlens must be >= 0, got cache_seqlens\[1\] = -1"),
    # sequence 0 and 1 would fit: nothing may be written for them either
    _bad("seqlens-overflow-last", lambda a: a["cache_seqlens"].__setitem__(2, 11), ValueError,
         r"cache_seqlens\[2\] = 11 plus Lnew = 2 new keys needs 13 slots, but the cache holds Lmax = 12"),
    _bad("seqlens-none-append", lambda a: a.update(cache_seqlens=None), ValueError,
         r"cache_seqlens is required to append"),
    _bad("table-int64", lambda a: a.update(block_table=a["block_table"].astype(numpy.int64)), TypeError,
         r"block_table must be a 2-D int32 array", paged=True),
    _bad("table-batch", lambda a: a.update(block_table=a["block_table"][:2]), ValueError,
         r"block_table must have shape \(B, max_pages\) with B = 3", paged=True),
    _bad("table-page-range", lambda a: a["block_table"].__setitem__((2, 0), 99), ValueError,
         r"block_table\[2, 0\] = 99 is not a page of the cache", paged=True),
    _bad("table-shared-written-page", lambda a: a["block_table"].__setitem__((2, 0), a["block_table"][0, 1]),
         ValueError, r"block_table: page \d+ receives new keys but is used 2 times", paged=True),
    _bad("table-capacity", lambda a: a.update(block_table=a["block_table"][:, :2]), ValueError,
         r"but the cache holds max_pages \* page_size = 8", paged=True),
    _bad("splits-negative", lambda a: a.update(num_splits=-1), ValueError, r"num_splits must be >= 0"),
    _bad("splits-bool", lambda a: a.update(num_splits=True), TypeError, r"num_splits must be an int"),
    _bad("causal-ahead", lambda a: a.update(causal=True, window=(2, 1)), ValueError, r"window right must be 0"),
    _bad("sinks-shape", lambda a: a.update(sinks=numpy.ones(3)), ValueError, r"sinks must broadcast"),
    _bad("alibi-shape", lambda a: a.update(alibi_slopes=numpy.ones((2, 4))), ValueError,
         r"alibi_slopes must broadcast to the output's leading axes \(3, 4\)"),
    _bad("scale-inf", lambda a: a.update(scale=numpy.inf), ValueError, r"scale must be finite"),
    _bad("return_lse", lambda a: a.update(return_lse=1), TypeError, r"return_lse must be a bool"),
    _bad("read-only-cache", lambda a: a["k_cache"].setflags(write=False), ValueError,
         r"k_cache must be writeable to append"),
    _bad("broadcast-cache", lambda a: a.update(v_cache=numpy.lib.stride_tricks.as_strided(
        a["v_cache"][:1], a["v_cache"].shape, (0,) + a["v_cache"].strides[1:])),
         ValueError, r"v_cache must not have overlapping elements"),
    _bad("k-inside-cache", lambda a: a.update(k=a["k_cache"][:, :, :2]), ValueError,
         r"k_cache must not share memory with k"),
    _bad("caches-shared", lambda a: a.update(v_cache=a["k_cache"][..., :8]), ValueError,
         r"k_cache and v_cache must not share memory"),
    _bad("out-shape", lambda a: a.update(out=numpy.zeros((3, 4, 2, 16))), ValueError,
         r"out must have shape \(3, 4, 2, 8\) \(B, Hq, Lq, Dv\)"),
    _bad("out-dtype", lambda a: a.update(out=numpy.zeros((3, 4, 2, 8), numpy.float32)), TypeError,
         r"out must have q's dtype float64"),
    _bad("out-in-cache", lambda a: a.update(out=a["v_cache"].reshape(-1)[:192].reshape(3, 4, 2, 8)), ValueError,
         r"out must not share memory with v_cache"),
]


@pytest.mark.parametrize("change, error, match, paged", ERRORS)
def test_bad_arguments_name_what_is_wrong_and_change_nothing(rng, change, error, match, paged):
    setup = Setup(rng, "float64", seqlens=[3, 7, 1], lnew=2, lq=2, capacity=12, page_size=4 if paged else None)
    out = numpy.full((3, 4, 2, 8), 7.0)
    arguments = dict(setup.arguments(), out=out)
    change(arguments)
    with pytest.raises(error, match=match):
        cuflash.attention_with_kvcache(**arguments)
    setup.assert_cache(appended=False)
    setup.assert_inputs_unchanged(setup.q, setup.k, setup.v)
    assert (out == 7.0).all()


# --- GPU -------------------------------------------------------------------------------------


def _cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("lnew", [0, 1, 5])
@pytest.mark.parametrize("page_size", [None, 16, 64, 256], ids=["contiguous", "page16", "page64", "page256"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cache(rng, dtype, page_size, lnew):
    cupy = _cupy()
    capacity = 300
    for lq, causal, layout in ((1, False, "bshd"), (16, True, "bhsd"), (64, True, "bshd")):
        seqlens = [0, capacity - lnew] + [int(x) for x in rng.integers(0, capacity - lnew, 3)]
        setup = Setup(rng, dtype, seqlens=seqlens, lnew=lnew, lq=lq, capacity=capacity, page_size=page_size,
                      layout=layout, heads_q=8, heads_k=2, d=64, dv=64, xp=cupy)
        arguments = setup.arguments()
        out, lse = cuflash.attention_with_kvcache(**arguments, causal=causal, return_lse=True)
        assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
        setup.assert_cache()
        setup.assert_inputs_unchanged(arguments["q"], arguments["k"], arguments["v"])
        check(setup, out, lse, dict(causal=causal))


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["causal", "causal-window", "mods", "mods-window"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_splits(rng, dtype, name, paged):
    cupy = _cupy()
    setup = Setup(rng, dtype, seqlens=[0, 1, 200, 1000, 1000], lnew=0, lq=4, capacity=1024, heads_q=8, heads_k=1,
                  d=128, dv=128, page_size=64 if paged else None, xp=cupy)
    options = _options(rng, name, setup.batch, setup.q.shape[1])
    options = {key: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for key, x in options.items()}
    arguments = setup.arguments(append=False)
    for splits in (0, 1, 2, 3, 16):
        out, lse = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
        check(setup, out, lse, options)
        again = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
        assert to_numpy(out).tobytes() == to_numpy(again[0]).tobytes(), splits
        assert to_numpy(lse).tobytes() == to_numpy(again[1]).tobytes(), splits
    setup.assert_cache(appended=False)


@pytest.mark.gpu
def test_gpu_equal_lengths_out_and_errors(rng):
    cupy = _cupy()
    setup = Setup(rng, "float16", seqlens=[100, 100], lnew=3, lq=2, capacity=128, page_size=16, xp=cupy,
                  heads_q=4, heads_k=4, d=64, dv=64)
    out = cupy.full((2, 4, 2, 64), 7, cupy.float16)
    result, lse = cuflash.attention_with_kvcache(**setup.arguments(seqlens=100), out=out, causal=True,
                                                 return_lse=True, num_splits=2)
    assert result is out
    setup.assert_cache()
    check(setup, out, lse, dict(causal=True))
    bad = setup.arguments(append=False)
    bad["block_table"] = cupy.asarray(setup.table.astype(numpy.int64))
    with pytest.raises(TypeError, match="block_table must be a 2-D int32 array"):
        cuflash.attention_with_kvcache(**bad)
    bad = setup.arguments(append=False)
    bad["k_cache"] = to_numpy(bad["k_cache"])
    with pytest.raises(TypeError, match="k_cache must be a cupy.ndarray like q"):
        cuflash.attention_with_kvcache(**bad)


# --- the GPU decode kernel (cuda_src/decode_tc.cu) ---------------------------------------------
#
# float16 / bfloat16 calls with head dims that are multiples of 8 up to 128 run the split-KV decode
# kernel (cuflash/_gpu/decode.py). These tests make sure they do (a spy on decode.plan_call), poison
# everything the kernels write (out, lse, the splits' partials) with NaN before they run, and check
# against the float64 reference; each call runs twice to check bitwise reproducibility.

DECODE_DTYPES = ["float16", "bfloat16"]


def _poison(x):
    """Every bit set: NaN in every float format, so an entry the kernels leave unwritten fails."""
    bits = x.view(numpy.dtype(f"u{x.dtype.itemsize}"))
    bits.fill(numpy.iinfo(bits.dtype).max)


@pytest.fixture
def decode_spy(monkeypatch):
    """decode.plan_call wrapped (every call's plan goes through it, a known signature's too): the
    plans made (in order), with their outputs and partials poisoned."""
    from cuflash._gpu import decode

    plans, real = [], decode.plan_call

    def spy(*args, **kwargs):
        launch = real(*args, **kwargs)
        for x in (launch.out, launch.lse) + launch.workspace:
            _poison(x)
        plans.append(launch)
        return launch

    monkeypatch.setattr(decode, "plan_call", spy)
    return plans


def _run_twice(cupy, arguments, options, splits):
    out, lse = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
    again = cuflash.attention_with_kvcache(**arguments, **options, num_splits=splits, return_lse=True)
    assert to_numpy(out).tobytes() == to_numpy(again[0]).tobytes(), f"num_splits={splits}: out not reproducible"
    assert to_numpy(lse).tobytes() == to_numpy(again[1]).tobytes(), f"num_splits={splits}: lse not reproducible"
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 2), (8, 1), (4, 4)], ids=["gqa8", "mqa", "mha"])
@pytest.mark.parametrize("lnew", [0, 1, 5])
@pytest.mark.parametrize("page_size", [None, 16, 64, 256], ids=["contiguous", "page16", "page64", "page256"])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_gpu_decode_kernel(rng, decode_spy, dtype, page_size, lnew, heads):
    """Contiguous and paged caches (random page order, Lmax = 300 not a multiple of the page),
    lengths 0 .. Lmax - Lnew, Lq 1 / 5 / 64, D 64 and 128, num_splits 1 / 3 / 0."""
    cupy = _cupy()
    capacity = 300
    cases = ((1, 128, 0, False, "bshd"), (5, 64, 3, True, "bhsd"), (64, 128, 1, True, "bshd"), (16, 64, 0, True, "bhsd"))
    for lq, d, splits, causal, layout in cases:
        setup = Setup(rng, dtype, seqlens=_seqlens(rng, 5, capacity, lnew), lnew=lnew, lq=lq, capacity=capacity,
                      page_size=page_size, layout=layout, heads_q=heads[0], heads_k=heads[1], d=d, dv=d, xp=cupy)
        arguments = setup.arguments()
        before = len(decode_spy)
        out, lse = cuflash.attention_with_kvcache(**arguments, causal=causal, num_splits=splits, return_lse=True)
        assert len(decode_spy) == before + 1, "the decode kernel did not run"
        setup.assert_cache()
        setup.assert_inputs_unchanged(arguments["q"], arguments["k"], arguments["v"])
        check(setup, out, lse, dict(causal=causal))
        # Again without appending (the keys are in the cache now): bitwise the same, twice.
        arguments = setup.arguments(append=False)
        arguments["cache_seqlens"] = cupy.asarray((setup.seqlens + lnew).astype(numpy.int32))
        again, lse_again = _run_twice(cupy, arguments, dict(causal=causal), splits)
        if splits == 1 or lnew == 0:
            assert to_numpy(again).tobytes() == to_numpy(out).tobytes()
        else:  # other splits of the same keys (the tiles' ranges move with Lnew): within rounding
            check(setup, again, lse_again, dict(causal=causal))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 64], ids=["contiguous", "page64"])
def test_gpu_decode_layout_is_planned_once_per_signature(rng, decode_spy, page_size):
    """A repeated signature (a decode loop's calls, layer after layer) is planned once: later calls
    on other arrays (other pointers, lengths, pages and values) reuse its layout and read their
    own data."""
    from cuflash._gpu import decode

    cupy = _cupy()
    for call in range(3):
        setup = Setup(rng, "float16", seqlens=_seqlens(rng, 3, 300, 1), lnew=1, lq=2, capacity=300,
                      page_size=page_size, layout="bshd", heads_q=8, heads_k=2, d=64, dv=64, xp=cupy)
        layouts = len(decode._LAYOUTS)
        out, lse = cuflash.attention_with_kvcache(**setup.arguments(), causal=True, return_lse=True)
        assert len(decode_spy) == call + 1, "the decode kernel did not run"
        setup.assert_cache()
        check(setup, out, lse, dict(causal=True))
        if call:
            assert len(decode._LAYOUTS) == layouts, "a repeated signature was planned again"
    # The same shapes with the lengths in a strided array (which the kernel reads from a copy):
    # another signature, not the layout above with no room for the copy.
    arguments = setup.arguments(append=False)
    lengths = cupy.zeros(2 * len(setup.seqlens), dtype=cupy.int32)
    lengths[::2] = cupy.asarray(numpy.asarray(setup.seqlens) + 1)
    arguments["cache_seqlens"] = lengths[::2]
    out, lse = cuflash.attention_with_kvcache(**arguments, causal=True, return_lse=True)
    check(setup, out, lse, dict(causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_gpu_a_known_signature_checks_its_int_length_and_gives_the_full_paths_bits(rng, monkeypatch, page_size):
    """A repeated signature takes the short path (_kvcache._decode_again): the same bits as the
    full path on the same arrays; an int length is checked on it too (a bad one raises before
    anything is written). Neither path reads a device length or page on the host."""
    from cuflash import _kvcache

    cupy = _cupy()
    monkeypatch.setattr(_kvcache, "_host_values", lambda *a: pytest.fail("a host read on the decode path"))
    again = []
    real = _kvcache._decode_again
    monkeypatch.setattr(_kvcache, "_decode_again", lambda *a, **kw: again.append(1) or real(*a, **kw))
    setup = Setup(rng, "float16", seqlens=[30, 0, 41], lnew=1, lq=1, capacity=64, page_size=page_size,
                  heads_q=8, heads_k=2, d=64, dv=64, layout="bshd", xp=cupy)
    options = dict(causal=True, return_lse=True, num_splits=2)
    arguments = setup.arguments()
    first = cuflash.attention_with_kvcache(**arguments, **options)  # the full path, kept
    setup.assert_cache()
    check(setup, *first, dict(causal=True))
    _kvcache._KNOWN.clear()
    for _ in range(2):  # full path, then the known signature, on the same arrays (the append rewrites the same slots)
        out, lse = cuflash.attention_with_kvcache(**arguments, **options)
        assert to_numpy(out).tobytes() == to_numpy(first[0]).tobytes()
        assert to_numpy(lse).tobytes() == to_numpy(first[1]).tobytes()
    assert len(again) == 1
    # An int length is read per call (a decoding loop's grows every step): 5, then 7 on the known
    # signature, each over its own keys (the bits of the same call with the lengths in an array),
    # and 64 + Lnew = 65 refused there before the append writes anything.
    fixed = dict(arguments, k=None, v=None)
    for length, calls in ((5, 1), (7, 2)):
        got = cuflash.attention_with_kvcache(**dict(fixed, cache_seqlens=length), **options)
        assert len(again) == calls
        lengths = cupy.full(3, length, dtype=cupy.int32)
        want = cuflash.attention_with_kvcache(**dict(fixed, cache_seqlens=lengths), **options)
        assert all(to_numpy(g).tobytes() == to_numpy(w).tobytes() for g, w in zip(got, want))
    cuflash.attention_with_kvcache(**dict(arguments, cache_seqlens=9), **options)  # full path (an int, k and v)
    before = [to_numpy(b).copy() for b in setup.buffers()]
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 64 plus Lnew = 1 new keys needs 65 slots"):
        cuflash.attention_with_kvcache(**dict(arguments, cache_seqlens=64), **options)
    assert len(again) == 4  # (the array-length call of 7 was known too)
    assert all(to_numpy(a).tobytes() == b.tobytes() for a, b in zip(setup.buffers(), before))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 8, 24, 48, 80])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_gpu_decode_kernel_any_page_size(rng, decode_spy, dtype, page_size):
    """Page sizes other than 16/64/256: shorter than the kernel's row step (1 and, at D 64, 8: a
    division per row), exactly one row step (8 at D 128), and sizes that neither divide nor are
    multiples of a key tile (24, 48, 80: the page and row carried from tile to tile wrap at
    rows that move from tile to tile); split ranges that start inside a page (num_splits 3)."""
    cupy = _cupy()
    capacity = 300
    for lq, d, splits, lnew in ((1, 128, 3, 0), (5, 64, 3, 3), (1, 64, 1, 1), (4, 128, 0, 0)):
        setup = Setup(rng, dtype, seqlens=_seqlens(rng, 5, capacity, lnew), lnew=lnew, lq=lq, capacity=capacity,
                      page_size=page_size, layout="bshd", heads_q=4, heads_k=2, d=d, dv=d, xp=cupy)
        arguments = setup.arguments()
        before = len(decode_spy)
        out, lse = cuflash.attention_with_kvcache(**arguments, causal=True, num_splits=splits, return_lse=True)
        assert len(decode_spy) == before + 1, "the decode kernel did not run"
        setup.assert_cache()
        check(setup, out, lse, dict(causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["plain", "causal-window", "window-ahead", "top-left", "mods", "mods-window"])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_gpu_decode_options(rng, decode_spy, dtype, name, paged):
    """Windows, both causal alignments, softcap, ALiBi (one head per block) and sinks, GQA 4:1,
    sequences of 0, 1, 200 and 1000 keys, num_splits 1 / 3 / 0 / 64 (more than some have tiles)."""
    cupy = _cupy()
    setup = Setup(rng, dtype, seqlens=[0, 1, 200, 1000, 997], lnew=3, lq=int(rng.choice([1, 4, 9])), capacity=1024,
                  heads_q=8, heads_k=2, d=128, dv=64, page_size=64 if paged else None, xp=cupy)
    options = _options(rng, name, setup.batch, setup.q.shape[1])
    options = {key: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for key, x in options.items()}
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(), **options, num_splits=1, return_lse=True)
    setup.assert_cache()
    check(setup, out, lse, options)
    arguments = setup.arguments(append=False)
    arguments["cache_seqlens"] = cupy.asarray((setup.seqlens + 3).astype(numpy.int32))
    for splits in (1, 3, 0, 64):
        out, lse = _run_twice(cupy, arguments, options, splits)
        check(setup, out, lse, options)
    assert len(decode_spy) == 9 and any(plan.splits > 1 for plan in decode_spy)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sink", "sinks"])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_gpu_decode_rows_that_see_nothing(rng, decode_spy, dtype, sinks, splits):
    """A sequence of no keys (cache_seqlens 0, Lnew 0) and rows before the bottom-right diagonal:
    out 0 and lse -inf, or the row's sink."""
    cupy = _cupy()
    setup = Setup(rng, dtype, seqlens=[0, 2, 6, 0], lnew=0, lq=10, capacity=100, heads_q=8, heads_k=2, d=64, dv=64,
                  page_size=16, xp=cupy)
    options = dict(causal=True)
    if sinks:
        options["sinks"] = cupy.asarray(rng.standard_normal(8).astype(numpy.float32))
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(append=False), **options, num_splits=splits,
                                              return_lse=True)
    assert len(decode_spy) == 1
    check(setup, out, lse, options)
    out, lse = to_numpy(out), to_numpy(lse)
    for b, length in enumerate(setup.seqlens):
        blind = slice(0, 10 - int(length))
        assert (out[b, :, blind].astype(numpy.float32) == 0).all()
        expected = to_numpy(options["sinks"])[:, None] if sinks else -numpy.inf
        assert (lse[b, :, blind] == expected).all()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [59, 256], ids=["odd-d", "d256"])
def test_gpu_decode_routes_what_it_does_not_take(rng, decode_spy, d):
    """Head dims the kernel does not take run the composition, with the same results."""
    cupy = _cupy()
    setup = Setup(rng, "bfloat16", seqlens=[0, 40, 70], lnew=1, lq=2, capacity=80, heads_q=4, heads_k=1, d=d, dv=d,
                  page_size=16, xp=cupy)
    out, lse = cuflash.attention_with_kvcache(**setup.arguments(), causal=True, num_splits=3, return_lse=True)
    assert not decode_spy
    setup.assert_cache()
    check(setup, out, lse, dict(causal=True))


@pytest.mark.gpu
def test_gpu_decode_out_and_strided_queries(rng, decode_spy):
    """out= is written in place; a q whose rows are not 16-byte chunks is copied, not refused."""
    cupy = _cupy()
    setup = Setup(rng, "float16", seqlens=[100, 37], lnew=2, lq=3, capacity=128, page_size=32, xp=cupy,
                  heads_q=4, heads_k=2, d=64, dv=64)
    arguments = setup.arguments()
    wide = cupy.zeros(arguments["q"].shape[:3] + (65,), cupy.float16)
    wide[..., 1:] = arguments["q"]
    arguments["q"] = wide[..., 1:]  # rows start 2 bytes into 16-byte chunks
    out = cupy.full((2, 4, 3, 64), 7, cupy.float16)
    result, lse = cuflash.attention_with_kvcache(**arguments, out=out, causal=True, return_lse=True, num_splits=2)
    assert result is out and len(decode_spy) == 1
    check(setup, out, lse, dict(causal=True))


# --- the decode kernel without a GPU: its struct's mirror, and its instantiations compile -------


from test_merge import pipeline  # noqa: E402,F401  (the fixture: test_pipeline's NVRTC check and PTX probe reader)


@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split"])
def test_a_decode_plan_launches_its_layouts_kernels_on_the_current_stream(monkeypatch, split):
    """DecodePlan.run without a GPU (the driver's launch recorded): decode_tc with the layout's
    grid and shared memory, then, when split, decode_combine with its grid and none, both on
    CuPy's current stream with one argument, the address of this thread's launch arguments
    holding this plan's params."""
    import ctypes

    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver

    from cuflash._gpu import decode

    launches = []  # each launch's arguments, then the one kernel argument's bytes (read at the launch)
    size = decode.PARAMS_DTYPE.itemsize
    monkeypatch.setattr(driver, "launchKernel", lambda *args: launches.append(
        args + (ctypes.string_at(ctypes.c_uint64.from_address(args[9]).value, size),)))
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: type("Stream", (), {"ptr": 4242})())

    def kernel(ptr):
        return type("Kernel", (), {"kernel": type("Function", (), {"ptr": ptr})()})()

    params = numpy.zeros((), dtype=decode.PARAMS_DTYPE)
    layout = decode._Layout(params.tobytes(), True, False, False, False, kernel(11), kernel(22) if split else None,
                            512, 9 if split else 0, 98304, 4 if split else 1, decode._carving(()))
    call = params.copy()
    call["q"], call["o"], call["seqlen_fixed"] = 0x7000, 0x9000, 77  # (a call's params, not the layout's)
    plan = decode.DecodePlan(layout, call, (), None, "out", "lse")
    assert plan.run() == ("out", "lse") and plan.splits == layout.splits
    expected = [(11, 512, 98304)] + ([(22, 9, 0)] if split else [])
    assert [(a[0], a[1], a[7]) for a in launches] == expected
    for args in launches:
        assert args[2:7] == (1, 1, decode.THREADS, 1, 1) and args[8] == 4242 and args[10] == 0
        assert args[11] == call.tobytes()


def test_decode_params_struct_matches_its_numpy_mirror(pipeline):
    from cuflash._gpu import decode, kernels, params

    spec = decode.combine_kernel("float16", "80")
    source = '#include "decode.cuh"\n' + params.layout_probe_source("cuflash::DecodeParams", decode.PARAMS_DTYPE)
    stored = pipeline._ptx_stored_constants(source, kernels.compile_options(spec) + ("-arch=compute_80",))
    expected = {0: decode.PARAMS_DTYPE.itemsize}
    expected.update({i: decode.PARAMS_DTYPE.fields[name][1] for i, name in enumerate(decode.PARAMS_DTYPE.names, start=1)})
    assert stored == expected


def _decode_kernels(arch):
    from cuflash._gpu import decode

    kernels = [k for dtype in DECODE_DTYPES for k in decode.kernels_for(dtype, (64, 128), arch)]
    assert len(kernels) == 2 * (2 * 3 + 1)  # per dtype: two widths x three row blocks, and the combine
    return kernels


@pytest.mark.parametrize("arch", ["80", "90a"])
def test_decode_kernels_compile_offline_without_spills(pipeline, arch):
    from cuflash._gpu import kernels

    for spec in _decode_kernels(arch):
        build = kernels.compile_offline(spec)
        assert 0 < build.registers <= 255 and build.spill_bytes == 0 and build.stack_bytes == 0, f"{spec}: {build.log}"
        assert len(build.cubin) > 0


def test_decode_smem_formula_is_the_kernels_own(pipeline):
    from cuflash._gpu import decode, kernels

    specs = [s for s in _decode_kernels("80") if isinstance(s, decode.DecodeKernel)]
    lines = ['extern "C" __global__ void cuflash_smem_probe(long long* out) {']
    for i, s in enumerate(specs):
        args = (variant_types()[s.dtype], s.head_dim, s.warps_m, s.stages)
        lines.append(f"    out[{i}] = (long long)cuflash::decode_tc_smem_bytes<{', '.join(map(str, args))}>();")
    source = kernels.kernel_source(specs[0]) + "\n" + "\n".join(lines) + "\n}\n"
    options = kernels.compile_options(specs[0]) + ("-arch=compute_80", "--device-as-default-execution-space")
    assert pipeline._ptx_stored_constants(source, options) == {i: s.shared_mem for i, s in enumerate(specs)}
    assert all(decode.resident_blocks(s) >= 1 and s.shared_mem <= 227 * 1024 for s in specs)


def variant_types():
    from cuflash._gpu.variant import CUDA_TYPES

    return CUDA_TYPES


def test_decode_split_heuristic():
    from cuflash._gpu import decode

    # 264 slots: the fewest splits that fill the waves within 4% of the best fill
    assert decode.choose_splits(blocks=8, tiles=4096, sms=132, per_sm=2) == 32  # 256 blocks, one wave
    assert decode.choose_splits(blocks=1, tiles=4096, sms=132, per_sm=2) == 62  # 64 (the most) fills 24%
    assert decode.choose_splits(blocks=2048, tiles=4096, sms=132, per_sm=2) == 1
    assert decode.choose_splits(blocks=600, tiles=4096, sms=132, per_sm=2) == 1  # two waves and more
    assert decode.choose_splits(blocks=300, tiles=4096, sms=132, per_sm=2) == 6  # 1800 of 1848 slots
    assert decode.choose_splits(blocks=64, tiles=64, sms=132, per_sm=2) == 4  # not 9: 576 blocks, 2.2 waves
    assert decode.choose_splits(blocks=256, tiles=256, sms=132, per_sm=2) == 1
    assert decode.choose_splits(blocks=8, tiles=6, sms=132, per_sm=2) == 3   # two tiles a split at least
    assert decode.choose_splits(blocks=8, tiles=1, sms=132, per_sm=2) == 1
