"""cuflash.attention on NumPy arrays (the CPU backend) against the dense float64 reference.

Every semantic rule of the forward: sequence lengths (equal, Lq != Lk both ways), head dims
(D != Dv), the four dtypes, causal in both alignments, local windows (with rows that see no key),
GQA/MQA, broadcast leading axes, strided views, zero-size axes, scale, out= and return_lse.
Each run writes into an out= poisoned with NaN, also runs without out=, and checks that the
inputs were left alone.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy
import pytest

import cuflash
from cuflash import _cpu, _spec
from reference import attention_magnitudes, attention_ref, attention_ref_dtype, visible_mask
from tolerance import assert_close

DTYPES = [numpy.float16, ml_dtypes.bfloat16, numpy.float32, numpy.float64]
DTYPE_IDS = ["fp16", "bf16", "fp32", "fp64"]


def lse_dtype_for(dtype):
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


def same_values(a, b):
    return a.shape == b.shape and numpy.array_equal(numpy.asarray(a, numpy.float64), numpy.asarray(b, numpy.float64))


def check_attention(q, k, v, magnitude=None, **options):
    """Run cuflash.attention and hold it to the reference; returns (out, lse) for further checks."""
    dtype = numpy.dtype(q.dtype)
    originals = [x.copy() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(q, k, v, **options)

    out = numpy.full(ref_out.shape, numpy.nan, dtype)  # poisoned: every entry must be written
    with numpy.errstate(divide="raise", over="raise", invalid="raise"):  # no inf - inf, no 0/0
        returned, lse = cuflash.attention(q, k, v, return_lse=True, out=out, **options)
        fresh = cuflash.attention(q, k, v, **options)

    assert returned is out
    assert lse.shape == ref_lse.shape and lse.dtype == lse_dtype_for(dtype)
    assert fresh.shape == ref_out.shape and fresh.dtype == dtype and isinstance(fresh, numpy.ndarray)
    baseline = None if dtype == numpy.float64 else attention_ref_dtype(q, k, v, dtype, **options)[0]
    assert_close(out, ref_out, dtype=dtype, baseline=baseline, magnitude=magnitude, name="out")
    assert_close(lse, ref_lse, dtype=lse.dtype, kind="lse", name="lse")
    assert same_values(fresh, out), "out= and a freshly allocated result differ"
    for name, before, after in zip("qkv", originals, (q, k, v)):
        assert same_values(before, after), f"{name} was modified"
    return out, lse


SEQLENS = [(1, 1), (97, 97), (200, 200), (97, 200), (200, 97), (1, 200), (200, 1)]
HEAD_DIMS = [(1, 1), (3, 7), (59, 59), (111, 64), (256, 256)]
CAUSAL = [False, True, "top_left"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "top_left"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS, ids=[f"Lq{a}-Lk{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("head_dim, head_dim_v", HEAD_DIMS, ids=[f"D{a}-Dv{b}" for a, b in HEAD_DIMS])
def test_matches_reference(randn, seqlen_q, seqlen_k, head_dim, head_dim_v, causal, dtype):
    q = randn(2, seqlen_q, head_dim, dtype=dtype)
    k = randn(2, seqlen_k, head_dim, dtype=dtype)
    v = randn(2, seqlen_k, head_dim_v, dtype=dtype)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, head_dim, dtype, options",
    [
        (1025, 1025, 256, numpy.float32, dict(causal=True)),
        (1025, 1025, 64, ml_dtypes.bfloat16, dict(window=(300, 0))),
        (1025, 700, 111, numpy.float64, dict()),
        (300, 1025, 32, numpy.float16, dict(causal="top_left")),
    ],
    ids=["fp32-causal", "bf16-window", "fp64-Lq>Lk", "fp16-top_left-Lq<Lk"],
)
def test_long_sequences(randn, seqlen_q, seqlen_k, head_dim, dtype, options):
    q = randn(1, 2, seqlen_q, head_dim, dtype=dtype)
    k = randn(1, 2, seqlen_k, head_dim, dtype=dtype)
    v = randn(1, 2, seqlen_k, head_dim, dtype=dtype)
    check_attention(q, k, v, **options)


WINDOWS = [(-1, -1), (0, 0), (3, -1), (-1, 5), (16, 16), (0, -1), (-1, 0), (130, 2), (5, 300), (2000, 2000)]
WINDOW_SEQLENS = [(97, 97), (200, 97), (97, 200), (1, 1), (1, 300)]


@pytest.mark.parametrize("causal", CAUSAL, ids=["bottom_right", "causal", "top_left"])
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{a}_{b}" for a, b in WINDOWS])
@pytest.mark.parametrize("seqlen_q, seqlen_k", WINDOW_SEQLENS, ids=[f"Lq{a}-Lk{b}" for a, b in WINDOW_SEQLENS])
def test_windows(randn, seqlen_q, seqlen_k, window, causal):
    q = randn(2, seqlen_q, 24)
    k = randn(2, seqlen_k, 24)
    v = randn(2, seqlen_k, 40)
    if causal is not False and window[1] > 0:  # refused, not cut to 0 (tests/test_validation.py)
        with pytest.raises(ValueError, match="window right must be 0 or -1 with causal"):
            cuflash.attention(q, k, v, causal=causal, window=window)
        return
    check_attention(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_windows_in_every_dtype(randn, dtype):
    q, k, v = (randn(3, 150, 48, dtype=dtype) for _ in range(3))
    check_attention(q, k, v, window=(20, 7))
    check_attention(q, k, v, causal=True, window=(33, 0))


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, options",
    [
        (200, 97, dict(causal=True)),  # bottom-right, Lq > Lk: the first 103 rows see nothing
        (200, 97, dict(window=(0, 0))),  # the same 103 rows, plus a one-key band
        (200, 50, dict(causal="top_left", window=(10, 0))),  # rows past 59 are beyond every key
        (150, 150, dict(window=(-1, 0), causal="top_left")),  # nothing hidden: control case
        (40, 0, dict()),  # no keys at all
        (40, 0, dict(causal=True)),
    ],
    ids=["causal", "window00", "top_left-window", "control", "Lk0", "Lk0-causal"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_that_see_no_key_give_zero_and_minus_inf(randn, seqlen_q, seqlen_k, options, dtype):
    q = randn(2, 3, seqlen_q, 16, dtype=dtype)
    k = randn(2, 3, seqlen_k, 16, dtype=dtype)
    v = randn(2, 3, seqlen_k, 8, dtype=dtype)
    out, lse = check_attention(q, k, v, **options)
    blind = ~visible_mask(seqlen_q, seqlen_k, causal=options.get("causal", False), window=options.get("window")).any(axis=1)
    assert numpy.all(numpy.asarray(out, numpy.float64)[..., blind, :] == 0)
    assert numpy.all(lse[..., blind] == -numpy.inf)
    assert numpy.all(numpy.isfinite(lse[..., ~blind]))


@pytest.mark.parametrize(
    "q_shape, kv_shape, group",
    [
        ((2, 8), (2, 2), 4),  # GQA
        ((1, 6), (1, 3), 2),
        ((2, 4), (2, 1), 1),  # MQA: a kv head axis of 1 broadcasts
        ((6,), (3,), 2),  # no batch axis
        ((4,), (1,), 1),
    ],
    ids=["gqa4", "gqa2", "mqa", "gqa-no-batch", "mqa-no-batch"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_and_mqa(randn, q_shape, kv_shape, group, causal):
    seqlen_q, seqlen_k = 70, 90
    q = randn(*q_shape, seqlen_q, 32)
    k = randn(*kv_shape, seqlen_k, 32)
    v = randn(*kv_shape, seqlen_k, 20)
    out, _ = check_attention(q, k, v, causal=causal)
    # Query head h reads kv head h // group: the same as attending to that head alone.
    heads_kv = kv_shape[-1]
    for h in range(q_shape[-1]):
        kv_head = h // group if heads_kv > 1 else 0
        alone = cuflash.attention(q[..., h, :, :], k[..., kv_head, :, :], v[..., kv_head, :, :], causal=causal)
        numpy.testing.assert_allclose(out[..., h, :, :], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k_lead", [(2, 1), ()], ids=["k-one-head", "k-2d"])
def test_gqa_through_v_heads_when_k_has_one(randn, k_lead):
    # k's head axis of 1 (or none) broadcasts against v's 2; q's 6 heads then group by 3 onto those 2.
    q, k, v = randn(2, 6, 33, 16), randn(*k_lead, 45, 16), randn(2, 2, 45, 16)
    out, _ = check_attention(q, k, v)
    assert out.shape == (2, 6, 33, 16)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, lead",
    [
        ((2, 1, 4), (1, 3, 4), (3, 4), (2, 3, 4)),
        ((), (2, 3), (2, 3), (2, 3)),
        ((5,), (2, 1), (1, 5), (2, 5)),
        ((2, 1, 1), (3, 1), (1, 4), (2, 3, 4)),
    ],
    ids=["q-k-v-all-broadcast", "q-2d", "k-v-broadcast-each-other", "three-way"],
)
def test_broadcast_leading_axes(randn, q_shape, k_shape, v_shape, lead):
    q, k, v = randn(*q_shape, 50, 16), randn(*k_shape, 60, 16), randn(*v_shape, 60, 24)
    out, lse = check_attention(q, k, v, causal=True)
    assert out.shape == lead + (50, 24) and lse.shape == lead + (50,)


def test_non_contiguous_views(randn):
    # BSHD storage seen as BHSD, as transformer code does it.
    q = randn(2, 77, 3, 40).transpose(0, 2, 1, 3)
    k = randn(2, 90, 3, 40).transpose(0, 2, 1, 3)
    v = randn(2, 90, 3, 40).transpose(0, 2, 1, 3)
    check_attention(q, k, v, causal=True)
    # Negative strides along L and D, a strided slice of D, and Fortran order.
    check_attention(q[..., ::-1, :], k[..., ::-1], v[:, ::-1], window=(10, 10))
    check_attention(randn(2, 60, 64)[..., ::2], randn(2, 70, 64)[..., 1::2], numpy.asfortranarray(randn(2, 70, 9)))


def test_out_may_be_a_strided_view(randn):
    q, k, v = randn(2, 3, 50, 16), randn(2, 3, 60, 16), randn(2, 3, 60, 8)
    storage = numpy.full((2, 50, 3, 8), numpy.nan, numpy.float32)
    out = storage.transpose(0, 2, 1, 3)  # BSHD buffer written as BHSD
    returned = cuflash.attention(q, k, v, out=out)
    assert returned is out
    ref, _ = attention_ref(q, k, v)
    assert_close(storage.transpose(0, 2, 1, 3), ref, dtype=numpy.float32, baseline=attention_ref_dtype(q, k, v, numpy.float32)[0])


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 0, 16), (2, 30, 16), (2, 30, 8)),  # Lq = 0
        ((2, 30, 16), (2, 0, 16), (2, 0, 8)),  # Lk = 0: zeros and -inf
        ((0, 4, 30, 16), (0, 4, 30, 16), (0, 4, 30, 8)),  # batch = 0
        ((2, 0, 30, 16), (2, 0, 30, 16), (2, 0, 30, 8)),  # heads = 0
        ((2, 30, 0), (2, 40, 0), (2, 40, 8)),  # D = 0: every score 0, uniform softmax
        ((2, 30, 16), (2, 40, 16), (2, 40, 0)),  # Dv = 0: empty rows
    ],
    ids=["Lq0", "Lk0", "batch0", "heads0", "D0", "Dv0"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zero_size_axes(randn, q_shape, k_shape, v_shape, causal):
    q, k, v = randn(*q_shape), randn(*k_shape), randn(*v_shape)
    out, lse = check_attention(q, k, v, causal=causal)
    if q_shape[-1] == 0 and not causal:
        numpy.testing.assert_allclose(out, numpy.broadcast_to(v.mean(axis=-2, keepdims=True), out.shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.3, 2, numpy.float32(0.125), -0.5, numpy.int64(1), 0.0], ids=str)
def test_explicit_scale(randn, scale):
    q, k, v = randn(2, 40, 32), randn(2, 50, 32), randn(2, 50, 32)
    check_attention(q, k, v, scale=scale, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_scores_stay_finite(randn, dtype):
    # Scores in the hundreds: the running max keeps every exponent <= 0.
    q, k, v = (randn(2, 130, 64, dtype=dtype) for _ in range(3))
    q = (numpy.asarray(q, numpy.float32) * 8).astype(dtype)
    check_attention(q, k, v, scale=1.0, magnitude=attention_magnitudes(q, k, v, scale=1.0))


def test_return_lse_false_returns_only_out(randn):
    q, k, v = randn(2, 10, 8), randn(2, 12, 8), randn(2, 12, 8)
    result = cuflash.attention(q, k, v)
    assert isinstance(result, numpy.ndarray) and result.shape == (2, 10, 8)
    out = numpy.full((2, 10, 8), numpy.nan, numpy.float32)
    assert cuflash.attention(q, k, v, out=out, return_lse=False) is out


class CpuDlpackArray:
    """A foreign CPU array that speaks only DLPack (as a torch CPU tensor does)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_cpu_dlpack_objects_run_on_the_cpu_backend(randn):
    q, k, v = randn(2, 30, 16), randn(2, 40, 16), randn(2, 40, 16)
    out, lse = cuflash.attention(CpuDlpackArray(q), CpuDlpackArray(k), CpuDlpackArray(v), return_lse=True, causal=True)
    expected, expected_lse = cuflash.attention(q, k, v, return_lse=True, causal=True)
    assert isinstance(out, numpy.ndarray)
    assert same_values(out, expected) and same_values(lse, expected_lse)


MASK_CASES = [
    dict(causal=False),
    dict(causal=True),
    dict(causal="top_left"),
    dict(window=(5, 9)),
    dict(window=(0, 0), causal="top_left"),
    dict(window=(300, -1)),
    dict(window=(-1, 130)),
    dict(causal=True, window=(129, 0)),
]


@pytest.mark.parametrize("options", MASK_CASES, ids=str)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(300, 300), (129, 500), (500, 129), (1, 257)], ids=str)
def test_key_tiles_cover_every_visible_key_and_nothing_else(seqlen_q, seqlen_k, options):
    """A query block visits exactly the key tiles holding a key one of its rows can see."""
    q = numpy.ones((seqlen_q, 4), numpy.float32)
    k = numpy.ones((seqlen_k, 4), numpy.float32)
    problem = _spec.resolve_forward(q, k, k, **options)
    mask = visible_mask(seqlen_q, seqlen_k, causal=options.get("causal", False), window=options.get("window"))
    visited_total = 0
    for row_start in range(0, seqlen_q, _cpu.BLOCK_M):
        rows = slice(row_start, min(row_start + _cpu.BLOCK_M, seqlen_q))
        visited = list(_cpu._key_tiles(problem, rows))
        block_sees = mask[rows].any(axis=0)
        expected = [
            slice(start, min(start + _cpu.BLOCK_N, seqlen_k))
            for start in range(0, seqlen_k, _cpu.BLOCK_N)
            if block_sees[start : start + _cpu.BLOCK_N].any()
        ]
        assert visited == expected, f"rows {rows}"
        visited_total += len(visited)
    full_total = -(-seqlen_q // _cpu.BLOCK_M) * -(-seqlen_k // _cpu.BLOCK_N)
    if options == dict(causal=True) and seqlen_q == seqlen_k:
        assert visited_total < 0.75 * full_total  # causal skips the tiles above the diagonal


def test_every_dtype_combination_of_mask_and_layout_sample(randn):
    """A broad sweep at small sizes: masks x dtypes x GQA/broadcast layouts."""
    layouts = [((2, 4), (2, 2)), ((1, 3), (2, 1)), ((3,), (3,))]
    masks = [dict(), dict(causal=True), dict(causal="top_left", window=(4, 0)), dict(window=(7, -1))]
    for (q_lead, kv_lead), options, dtype in itertools.product(layouts, masks, DTYPES):
        q = randn(*q_lead, 33, 20, dtype=dtype)
        k = randn(*kv_lead, 47, 20, dtype=dtype)
        v = randn(*kv_lead, 47, 12, dtype=dtype)
        check_attention(q, k, v, **options)


def test_blas_runs_single_threaded_inside_a_call(monkeypatch, randn):
    """The tiles' small products with a multi-threaded BLAS stall when other work holds the cores
    (benchmarks/bench_cpu.py): the CPU backend limits BLAS to one thread for the call, and only
    for the call."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cuflash import _cpu

    seen = []
    real = _cpu._forward

    def recording(p):
        seen.append([lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"])
        return real(p)

    monkeypatch.setattr(_cpu, "_forward", recording)
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    q = randn(2, 40, 16)
    cuflash.attention(q, q, q)
    assert seen and all(n == 1 for n in seen[0])
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"] == before


def test_results_keep_a_transposed_inputs_memory_order(rng):
    """(B, L, H, D) buffers passed as (B, H, L, D) views: out, dq, dk, dv come back in that
    layout (as the GPU backend's: _spec.result_order), equal to the call's on C-order copies."""
    buffers = [rng.standard_normal(s) for s in ((2, 97, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 97, 4, 64))]
    q, k, v, dout = (x.transpose(0, 2, 1, 3) for x in buffers)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert out.transpose(0, 2, 1, 3).flags.c_contiguous
    assert all(g.transpose(0, 2, 1, 3).flags.c_contiguous for g in grads)
    copies = [numpy.ascontiguousarray(x) for x in (q, k, v, dout)]
    want_out, want_lse = cuflash.attention(*copies[:3], causal=True, return_lse=True)
    want = cuflash.attention_backward(copies[3], *copies[:3], want_out, want_lse, causal=True)
    numpy.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want):
        numpy.testing.assert_array_equal(g, w)
    odd = cuflash.attention(q[..., :3], k[..., :3], v[..., :3])  # rows of 3 floats: not whole 16 bytes
    assert odd.flags.c_contiguous


# --- the forward's query blocks on threads ------------------------------------------------------

THREADED_CASES = {
    # name: (q shape, k shape, keyword arguments)
    "dense": ((2, 3, 1025, 59), (2, 3, 200, 59), {}),
    "causal_gqa": ((1, 4, 700, 32), (1, 2, 700, 32), {"causal": True}),
    "window_softcap_sinks": ((2, 2, 513, 16), (2, 2, 513, 16),
                             {"window": (97, 3), "softcap": 5.0, "sinks": "sinks"}),
    "bias_mask_alibi": ((2, 2, 300, 8), (2, 2, 97, 8), {"bias": "bias", "mask": "mask", "alibi_slopes": "slopes"}),
}


@pytest.mark.parametrize("case", THREADED_CASES)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_threads_give_the_one_thread_result_bit_for_bit(case, dtype, randn, monkeypatch):
    """The forward's query blocks run on CUFLASH_CPU_THREADS threads (default: the cores available);
    out and lse are those of one thread bit for bit, for every option, whatever the count."""
    q_shape, k_shape, options = THREADED_CASES[case]
    q = randn(*q_shape).astype(dtype)
    k, v = randn(*k_shape).astype(dtype), randn(*k_shape).astype(dtype)
    extra = {"sinks": randn(q_shape[1]).astype(dtype), "bias": randn(1, q_shape[1], q_shape[2], k_shape[2]).astype(dtype),
             "mask": randn(q_shape[0], 1, 1, k_shape[2]) > -1.0, "slopes": numpy.abs(randn(q_shape[1])).astype(dtype)}
    options = {name: extra[value] if isinstance(value, str) else value for name, value in options.items()}
    results = []
    for threads in ("1", "3", "8"):
        monkeypatch.setenv("CUFLASH_CPU_THREADS", threads)
        results.append(cuflash.attention(q, k, v, return_lse=True, **options))
    for out, lse in results[1:]:
        assert numpy.array_equal(out, results[0][0]) and numpy.array_equal(lse, results[0][1])
    if set(options) <= {"causal", "window"}:  # (the modifiers have their reference in test_score_mods, test_bias_mask)
        assert_close(results[0][0], attention_ref(q, k, v, **options)[0], dtype=dtype)


def test_threads_are_bounded_by_their_temporaries(monkeypatch):
    """Many heads make large block temporaries: the threads are then fewer (THREAD_MEMORY beyond one
    thread's), so the backend's memory does not grow with the core count."""
    seen = []
    monkeypatch.setenv("CUFLASH_CPU_THREADS", "64")
    monkeypatch.setattr(_cpu, "THREAD_MEMORY", 3 << 20)
    monkeypatch.setattr(_cpu.concurrent.futures, "ThreadPoolExecutor",
                        lambda threads, **kw: seen.append(threads) or _Serial())
    _cpu._POOL.clear()
    _cpu._each(lambda block: None, list(range(10)), 1 << 20)  # 1 MiB a block: 1 + 3 threads
    _cpu._each(lambda block: None, list(range(10)), 8 << 20)  # larger than the budget: one thread
    _cpu._POOL.clear()
    assert seen == [4]


class _Serial:
    """A pool that runs what it is given at once (for counting the threads asked for)."""

    def submit(self, function, *args):
        import concurrent.futures

        future = concurrent.futures.Future()
        future.set_result(function(*args))
        return future


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_cpu_threads_must_be_a_positive_integer(value, randn, monkeypatch):
    monkeypatch.setenv("CUFLASH_CPU_THREADS", value)
    q = randn(1, 1, 300, 8).astype(numpy.float32)
    with pytest.raises(ValueError, match="CUFLASH_CPU_THREADS must be a positive integer"):
        cuflash.attention(q, q, q)


def test_a_forked_child_runs_the_threaded_forward(randn):
    """After a threaded call, a fork()ed child (a DataLoader worker) gets pools of its own: the
    parent's threads are not there (a pool without workers would wait forever)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork() here")
    q = randn(1, 2, 600, 16).astype(numpy.float32)
    want = cuflash.attention(q, q, q, causal=True)  # (the parent's pool is made here)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(_threaded_forward_in_child, (q,)).get(timeout=60)
    assert numpy.array_equal(got, want)


def _threaded_forward_in_child(q):
    return cuflash.attention(q, q, q, causal=True)
