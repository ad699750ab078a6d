"""attention_with_kvcache with no host value: the device append and CUDA graph capture (issue 17).

On the GPU the new keys and values are written by ``cuda_src/kvcache_append.cu``, which reads
``cache_seqlens`` and ``block_table`` on the device, and the decode kernel's plan comes from
shapes alone; so while CuPy's current stream is capturing, a call reads nothing on the host (the
value checks are skipped, the caller guarantees the values) and a captured decoding step replays
with whatever lengths, block table, q, k and v the device holds then.

Without a GPU: the append kernel compiles (every element width, sm_80 and sm_90a, no spills) and
its struct's NumPy mirror matches; the capture query reads CuPy's current stream; under a capture
(the query monkeypatched) only the checks of values are skipped (every other misuse in
test_kvcache.ERRORS still raises its error) and nothing is read on the host (``_host_values``
raises), the composition refusing what it cannot run without the values before writing anything.
GPU tests (marked ``gpu``): the device append equals the host scatter byte for byte (and the CPU
backend's call), a capture-mode call reads nothing on the host and gives the checked call's bits,
and decoding steps captured with ``cupy.cuda.Graph`` and ``torch.cuda.graph`` replay as eager
calls on the new values do.
"""
from __future__ import annotations

import copy
import types

import numpy
import pytest

import cuflash
from cuflash import _kvcache
from reference import to_numpy
import test_merge
from test_kvcache import DTYPES, ERRORS, Setup, _cupy, _seqlens, check

pipeline = test_merge.pipeline  # the fixture: test_pipeline's NVRTC check and PTX probe reader

DECODE_DTYPES = ["float16", "bfloat16"]
# The ERRORS cases that need the values of cache_seqlens or block_table: the only checks a capture skips.
VALUE_CHECKS = {"seqlens-negative", "seqlens-overflow-last", "table-page-range", "table-shared-written-page",
                "table-capacity"}


def _bits(x):
    return x.view(numpy.dtype(f"u{x.dtype.itemsize}"))


def _no_host_read(monkeypatch, capturing=True):
    """Any host read of a length or page fails; with ``capturing``, the capture query says yes."""
    def refuse(array, xp):
        raise AssertionError("a host read of cache_seqlens or block_table")

    if capturing:
        monkeypatch.setattr(_kvcache, "_capturing", lambda xp: True)
    monkeypatch.setattr(_kvcache, "_host_values", refuse)


def _host_twin(setup):
    """A NumPy Setup with the same inputs and a copy of the caches as they were before any call."""
    twin = copy.copy(setup)
    twin.xp = numpy
    twin.k_base, twin.v_base = (x.copy() for x in setup.before[:2])
    twin.k_view, twin.v_view = (b.transpose(0, 2, 1, 3) if setup.layout == "bshd" else b
                                for b in (twin.k_base, twin.v_base))
    return twin


# --- without a GPU -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["80", "90a"])
@pytest.mark.parametrize("itemsize", [2, 4, 8], ids=["2-byte", "4-byte", "8-byte"])
def test_append_kernel_compiles_offline_without_spills(pipeline, itemsize, arch):
    from cuflash._gpu import kernels, kvcache_append

    build = kernels.compile_offline(kvcache_append.kernel(itemsize, arch))
    assert len(build.cubin) > 0
    assert 0 < build.registers <= 255 and build.spill_bytes == 0 and build.stack_bytes == 0, build.log


def test_append_params_struct_matches_its_numpy_mirror(pipeline):
    from cuflash._gpu import kernels, kvcache_append, params

    spec = kvcache_append.kernel(2, "80")
    mirror = kvcache_append.PARAMS_DTYPE
    source = kernels.kernel_source(spec) + "\n" + params.layout_probe_source("cuflash::AppendParams", mirror)
    stored = pipeline._ptx_stored_constants(source, kernels.compile_options(spec) + ("-arch=compute_80",))
    expected = {0: mirror.itemsize}
    expected.update({i: mirror.fields[name][1] for i, name in enumerate(mirror.names, start=1)})
    assert stored == expected


def test_one_append_kernel_per_element_width():
    from cuflash._gpu import kvcache_append

    specs = {dtype: kvcache_append.kernel(numpy.dtype(dtype).itemsize, "90a")
             for dtype in ("float16", "float32", "float64")}
    assert specs["float16"].name_expression == "cuflash::kvcache_append<__half>"  # bfloat16's too: 2 bytes
    assert len({s.name_expression for s in specs.values()}) == 3


@pytest.mark.parametrize("capturing", [False, True])
def test_capture_query_asks_cupys_current_stream(capturing):
    stream = types.SimpleNamespace(is_capturing=lambda: capturing)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: stream))
    assert _kvcache._capturing(fake_cupy) is capturing
    assert _kvcache._capturing(numpy) is False


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_resolve_cache_under_capture_reads_and_checks_no_value(rng, monkeypatch, paged):
    """read_values=False: lengths past the cache, pages out of range and shared written pages go
    unchecked (the caller's guarantee), nothing is read, and the _Cache knows no value; the same
    arguments with read_values=True raise the contract's error."""
    setup = Setup(rng, "float64", seqlens=[3, 7, 1], lnew=2, lq=2, capacity=12, page_size=4 if paged else None)
    arguments = setup.arguments()
    if paged:
        arguments["block_table"][2, 0] = 99  # not a page
    else:
        arguments["cache_seqlens"][1] = 11  # 11 + 2 > 12
    names = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens")
    values = [arguments[name] for name in names] + [arguments.get("block_table")]
    with pytest.raises(ValueError, match="is not a page of the cache" if paged else "needs 13 slots"):
        _kvcache._resolve_cache(*values, numpy, None)
    monkeypatch.setattr(_kvcache, "_host_values", lambda *a: pytest.fail("a host read with read_values=False"))
    cache = _kvcache._resolve_cache(*values, numpy, None, read_values=False)
    assert cache.seqlens is None and cache.table is None and cache.fixed is None
    assert (cache.capacity, cache.new, cache.paged) == (12, 2, paged)
    # An int length is the caller's host value: still checked, and known.
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 11 plus Lnew = 2"):
        _kvcache._resolve_cache(*values[:5], 11, values[6], numpy, None, read_values=False)
    assert _kvcache._resolve_cache(*values[:5], 4, values[6], numpy, None, read_values=False).fixed == 4


@pytest.mark.parametrize("change, error, match, paged", ERRORS)
def test_under_capture_only_the_value_checks_are_skipped(rng, monkeypatch, request, change, error, match, paged):
    """Every misuse of test_kvcache.ERRORS under a capture (emulated on the CPU backend: the
    capture query monkeypatched): the shape, dtype, layout and option errors are raised as
    outside one; the value errors are not checked (nothing is read), and the CPU backend, which
    needs the values, refuses before anything is written."""
    _no_host_read(monkeypatch)
    setup = Setup(rng, "float64", seqlens=[3, 7, 1], lnew=2, lq=2, capacity=12, page_size=4 if paged else None)
    out = numpy.full((3, 4, 2, 8), 7.0)
    arguments = dict(setup.arguments(), out=out)
    change(arguments)
    if request.node.callspec.id in VALUE_CHECKS:
        error, match = RuntimeError, "under CUDA graph capture: this call runs as dense calls"
    with pytest.raises(error, match=match):
        cuflash.attention_with_kvcache(**arguments)
    setup.assert_cache(appended=False)
    assert (out == 7.0).all()


def test_the_value_checks_skipped_under_capture_are_cases_of_errors():
    assert VALUE_CHECKS <= {p.id for p in ERRORS}


def test_under_capture_an_int_length_with_a_contiguous_cache_still_composes(rng, monkeypatch):
    """The composition needs the lengths on the host: an int gives them (no device value), so a
    captured call runs and equals the checked one, cache included; a paged cache's table it
    cannot read, so a paged call refuses and writes nothing."""
    setup = Setup(rng, "float64", seqlens=[9, 9, 9], lnew=2, lq=3, capacity=12)
    twin = _host_twin(setup)
    expected = cuflash.attention_with_kvcache(**twin.arguments(seqlens=9), causal=True, return_lse=True)
    _no_host_read(monkeypatch)
    got = cuflash.attention_with_kvcache(**setup.arguments(seqlens=9), causal=True, return_lse=True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected))
    setup.assert_cache()
    paged = Setup(rng, "float64", seqlens=[9, 9, 9], lnew=2, lq=3, capacity=12, page_size=4)
    with pytest.raises(RuntimeError, match="pass cache_seqlens as an int with a contiguous cache"):
        cuflash.attention_with_kvcache(**paged.arguments(seqlens=9))
    paged.assert_cache(appended=False)


# --- GPU: the device append ------------------------------------------------------------------


def _capacity(setup, capacity):
    return capacity if setup.table is None else setup.table.shape[1] * setup.page_size


def _flash_layout(cupy, host):
    """A device copy of host (B, H, L, D) laid out (B, L, H, D), passed as the (B, H, L, D) view."""
    return cupy.asarray(numpy.ascontiguousarray(host.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("lnew", [0, 1, 5])
@pytest.mark.parametrize("page_size", [None, 16, 64], ids=["contiguous", "page16", "page64"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_device_append_equals_the_host_scatter_byte_for_byte(rng, dtype, page_size, lnew):
    """kvcache_append.append (every element width) on contiguous and paged caches (random page
    order, spare pages, flash-attn's (B, L, H, D) layout for page 16), GQA, new k/v as strided
    views: the caches' whole buffers equal the expected ones byte for byte (exactly the new slots
    written) and the CPU backend's append of the same inputs."""
    from cuflash._gpu import kvcache_append

    cupy = _cupy()
    capacity = 300
    setup = Setup(rng, dtype, seqlens=_seqlens(rng, 5, capacity, lnew), lnew=lnew, lq=1, capacity=capacity,
                  page_size=page_size, layout="bshd" if page_size == 16 else "bhsd", heads_q=8, heads_k=2, d=64,
                  dv=32, xp=cupy)
    arguments = setup.arguments()
    k, v = (_flash_layout(cupy, x) for x in (setup.k, setup.v))
    kvcache_append.append(k, v, setup.k_cache, setup.v_cache, cache_seqlens=arguments["cache_seqlens"],
                          seqlen_fixed=0, block_table=arguments.get("block_table"),
                          capacity=_capacity(setup, capacity))
    setup.assert_cache()
    twin = _host_twin(setup)
    cuflash.attention_with_kvcache(**twin.arguments())
    for name, gpu, cpu in zip(("k_cache", "v_cache"), setup.buffers(), twin.buffers()):
        assert gpu.tobytes() == cpu.tobytes(), f"{name}: the device append differs from the host scatter"


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_gpu_device_append_with_one_int_length_and_strided_indices(rng, page_size):
    """An int length (no device array: seqlen_fixed), then strided lengths and a table read through
    its column stride: the same slots as contiguous index arrays give."""
    from cuflash._gpu import kvcache_append

    cupy = _cupy()
    setup = Setup(rng, "bfloat16", seqlens=[37, 37, 37], lnew=3, lq=1, capacity=100, page_size=page_size,
                  heads_q=4, heads_k=2, d=64, dv=64, xp=cupy)
    arguments = setup.arguments()
    table = arguments.get("block_table")
    kvcache_append.append(arguments["k"], arguments["v"], setup.k_cache, setup.v_cache, cache_seqlens=None,
                          seqlen_fixed=37, block_table=table, capacity=_capacity(setup, 100))
    setup.assert_cache()

    setup = Setup(rng, "float32", seqlens=[0, 50, 97], lnew=3, lq=1, capacity=100, page_size=page_size, heads_q=4,
                  heads_k=2, d=8, dv=16, xp=cupy)
    lengths = cupy.zeros(6, cupy.int32)
    lengths[::2] = cupy.asarray(setup.seqlens.astype(numpy.int32))
    if page_size is not None:
        wide = cupy.full((setup.batch, 2 * setup.table.shape[1]), -7, cupy.int32)
        wide[:, ::2] = cupy.asarray(setup.table)
        table = wide[:, ::2]
    arguments = setup.arguments()
    kvcache_append.append(arguments["k"], arguments["v"], setup.k_cache, setup.v_cache, cache_seqlens=lengths[::2],
                          seqlen_fixed=0, block_table=table if page_size else None, capacity=_capacity(setup, 100))
    setup.assert_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_gpu_device_append_leaves_memory_past_the_cache_alone(rng, page_size):
    """A violated guarantee (what a capture does not check): slots past the capacity and page ids
    outside the cache are skipped, the slots inside written, nothing else changed."""
    from cuflash._gpu import kvcache_append

    cupy = _cupy()
    setup = Setup(rng, "float16", seqlens=[0, 0, 0], lnew=5, lq=1, capacity=64, page_size=page_size, heads_q=2,
                  heads_k=2, d=16, dv=16, spare_pages=0, xp=cupy)
    capacity = _capacity(setup, 64)
    lengths = numpy.array([capacity - 2, -3, 10])  # 2 slots inside; 2 inside (positions 0, 1); 5 inside
    arguments = setup.arguments()
    table = arguments.get("block_table")
    if page_size is not None:  # every entry a page (the Setup's are -1 past the pages used), but one
        host = rng.permutation(setup.table.size).reshape(setup.table.shape).astype(numpy.int32)
        host[2, 0] = host.size + 5  # sequence 2's first page: outside the cache (positions 10 .. 14)
        setup.table = host
        table[...] = cupy.asarray(host)
    kvcache_append.append(arguments["k"], arguments["v"], setup.k_cache, setup.v_cache,
                          cache_seqlens=cupy.asarray(lengths.astype(numpy.int32)), seqlen_fixed=0, block_table=table,
                          capacity=capacity)
    expected = [x.copy() for x in setup.before[:2]]
    for base, new in zip(expected, (setup.k, setup.v)):
        for b, length in enumerate(lengths):
            for t in range(5):
                position = int(length) + t
                if not 0 <= position < capacity or (page_size is not None and b == 2):
                    continue
                first, slot = setup.slot(b, position)
                base[first, :, slot] = new[b, :, t]
    for name, actual, want in zip(("k_cache", "v_cache"), setup.buffers(), expected):
        assert actual.tobytes() == want.tobytes(), f"{name}: a slot outside the cache was written, or one inside not"


# --- GPU: no host value under capture ----------------------------------------------------------


def _device_copy(cupy, x):
    return cupy.asarray(_bits(x)).view(x.dtype) if isinstance(x, numpy.ndarray) else _bits(x).copy().view(x.dtype)


def _put(target, host):
    """target (a device array) = host, in place, bit for bit (its address stays the captured one)."""
    import cupy

    _bits(target)[...] = cupy.asarray(_bits(numpy.ascontiguousarray(host)))


def _device_twin(cupy, setup):
    """Copies of the setup's device caches as they are now: (their buffers, the views passed)."""
    bases = [_device_copy(cupy, base) for base in (setup._k_device[0], setup._v_device[0])]
    return bases, [b.transpose(0, 2, 1, 3) if setup.layout == "bshd" else b for b in bases]


def _same_caches(setup, bases):
    return all(_same_bits(ours, twin) for ours, twin in zip((setup._k_device[0], setup._v_device[0]), bases))


def _same_bits(a, b):
    return to_numpy(_bits(a)).tobytes() == to_numpy(_bits(b)).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("indices", ["contiguous", "strided"], ids=["contiguous-indices", "strided-indices"])
@pytest.mark.parametrize("page_size", [None, 64], ids=["contiguous", "page64"])
def test_gpu_call_under_capture_reads_nothing_on_the_host_and_gives_the_checked_bits(rng, monkeypatch, page_size,
                                                                                      indices):
    """On a stream that is not capturing, with the capture query monkeypatched to say it is and
    every host read of the lengths or pages failing: the decode call (append, splits, sinks,
    out= written in place) gives the bits the checked call gives, caches included; strided
    lengths and table (copied by the plan, read through their strides by the append) too. A
    float32 call (the composition, which needs the values) refuses and writes nothing."""
    cupy = _cupy()
    setup = Setup(rng, "float16", seqlens=_seqlens(rng, 4, 200, 5), lnew=5, lq=3, capacity=200, page_size=page_size,
                  heads_q=8, heads_k=2, d=64, dv=64, xp=cupy)
    arguments = setup.arguments()
    if indices == "strided":
        lengths = cupy.zeros(8, cupy.int32)
        lengths[1::2] = arguments["cache_seqlens"]
        arguments["cache_seqlens"] = lengths[1::2]
        if page_size is not None:
            wide = cupy.zeros((setup.batch, 3 * setup.table.shape[1]), cupy.int32)
            wide[:, ::3] = arguments["block_table"]
            arguments["block_table"] = wide[:, ::3]
    options = dict(causal=True, num_splits=3, return_lse=True, sinks=cupy.asarray(rng.standard_normal(8), cupy.float32))
    bases, (k_twin, v_twin) = _device_twin(cupy, setup)
    expected = cuflash.attention_with_kvcache(**dict(arguments, k_cache=k_twin, v_cache=v_twin), **options)
    _no_host_read(monkeypatch)
    out = cupy.full(expected[0].shape, 7, cupy.float16)
    got = cuflash.attention_with_kvcache(**arguments, **options, out=out)
    assert got[0] is out
    assert _same_bits(got[0], expected[0]) and _same_bits(got[1], expected[1])
    setup.assert_cache()
    assert _same_caches(setup, bases)
    check(setup, got[0], got[1], dict(causal=True, sinks=options["sinks"]))

    wide = Setup(rng, "float32", seqlens=[3, 9], lnew=1, lq=1, capacity=16, page_size=None if page_size is None else 8,
                 heads_q=2, heads_k=1, d=16, dv=16, xp=cupy)
    with pytest.raises(RuntimeError, match="under CUDA graph capture"):
        cuflash.attention_with_kvcache(**wide.arguments())
    wide.assert_cache(appended=False)


# --- GPU: captured decoding steps ------------------------------------------------------------


def _new_step(rng, setup, capacity):
    """New host lengths, block table (a fresh random page order), q, k and v for the setup."""
    seqlens = numpy.array(_seqlens(rng, setup.batch, capacity, setup.lnew))
    rng.shuffle(seqlens)
    table = None
    if setup.table is not None:
        pages = rng.permutation(setup.table.size + 3)[:setup.table.size]
        table = pages.reshape(setup.table.shape).astype(numpy.int32)
    draw = [rng.standard_normal(x.shape).astype(x.dtype) for x in (setup.q, setup.k, setup.v)]
    return seqlens, table, draw


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 0], ids=["one-split", "heuristic-splits"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_cupy_graph_replays_a_decode_step_with_new_lengths_table_and_keys(rng, dtype, page_size, splits):
    """A decode call (append, GQA 4:1, causal, sinks in q's dtype) captured with
    stream.begin_capture / end_capture; then, three times: new lengths, a new block table, new q,
    k and v written in place on the device, the graph launched. Each replay appends at the new
    lengths through the new table (the buffers byte for byte), matches the float64 reference, and
    equals bit for bit an eager call on the same values over a copy of the caches."""
    cupy = _cupy()
    capacity = 256
    setup = Setup(rng, dtype, seqlens=_seqlens(rng, 4, capacity, 1), lnew=1, lq=1, capacity=capacity,
                  page_size=page_size, layout="bshd" if page_size else "bhsd", heads_q=8, heads_k=2, d=64, dv=64,
                  spare_pages=3, xp=cupy)
    arguments = setup.arguments()
    sinks = rng.standard_normal(8).astype(setup.dtype)
    options = dict(causal=True, num_splits=splits, return_lse=True, sinks=cupy.asarray(sinks))
    stream = cupy.cuda.Stream(non_blocking=True)
    # The setup's arrays were copied in on the null stream, with which a non-blocking stream does
    # not synchronize: let those copies land before the call reads them on `stream`.
    cupy.cuda.Device().synchronize()
    with stream:
        cuflash.attention_with_kvcache(**arguments, **options)  # warm-up: kernels compile outside the capture
        stream.synchronize()
        stream.begin_capture()
        g_out, g_lse = cuflash.attention_with_kvcache(**arguments, **options)
        graph = stream.end_capture()
    for _ in range(3):
        seqlens, table, (q, k, v) = _new_step(rng, setup, capacity)
        _put(arguments["cache_seqlens"], seqlens.astype(numpy.int32))
        if table is not None:
            _put(arguments["block_table"], table)
        for name, x in (("q", q), ("k", k), ("v", v)):
            _put(arguments[name], x)
        setup.seqlens, setup.table, setup.q, setup.k, setup.v = seqlens, table, q, k, v
        setup.before = list(setup.buffers()) + [q, k, v]
        bases, (k_twin, v_twin) = _device_twin(cupy, setup)
        cupy.cuda.Device().synchronize()
        graph.launch(stream=stream)
        stream.synchronize()
        setup.assert_cache()
        check(setup, g_out, g_lse, dict(causal=True, sinks=sinks))
        out, lse = cuflash.attention_with_kvcache(**dict(arguments, k_cache=k_twin, v_cache=v_twin), **options)
        assert _same_bits(g_out, out) and _same_bits(g_lse, lse), "the replay differs from the eager call"
        assert _same_caches(setup, bases)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_torch_cuda_graph_replays_flash_attn_with_kvcache(rng, paged):
    """cuflash.torch.flash_attn_with_kvcache (rotary embedding, append, GQA 4:1, causal, bf16)
    captured with torch.cuda.graph after a warm-up on a side stream; then, three times: new
    lengths, block table, q, k and v copied in place, the graph replayed. out, lse and the
    caches equal bit for bit an eager call on the same values over copies of the caches, and
    the replay wrote the cache (at the new lengths: the eager call appends there)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import cuflash.torch as ct

    batch, heads, heads_k, d, lq, lnew, page, lmax = 4, 8, 2, 64, 1, 1, 16, 128

    def draw(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(numpy.float32)).to("cuda", torch.bfloat16)

    max_pages = lmax // page
    num_pages = batch * max_pages + 3

    def new_table():
        order = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
        return torch.from_numpy(order.astype(numpy.int32)).cuda()

    def new_lengths():
        return torch.from_numpy(rng.integers(0, lmax - lnew + 1, batch).astype(numpy.int32)).cuda()

    cache_shape = (num_pages, page, heads_k, d) if paged else (batch, lmax, heads_k, d)
    k_cache, v_cache = draw(*cache_shape), draw(*cache_shape)
    q, k, v = draw(batch, lq, heads, d), draw(batch, lnew, heads_k, d), draw(batch, lnew, heads_k, d)
    seqlens, table = new_lengths(), new_table() if paged else None
    angles = rng.uniform(0, 2 * numpy.pi, (lmax + lq, 16))
    cos, sin = (torch.from_numpy(f(angles)).to("cuda", torch.bfloat16) for f in (numpy.cos, numpy.sin))

    def step(k_cache, v_cache):
        return ct.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=seqlens, block_table=table, causal=True,
                                          return_softmax_lse=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(k_cache.clone(), v_cache.clone())  # warm-up: kernels compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = step(k_cache, v_cache)

    def bits(x):
        return x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32)

    for _ in range(3):
        seqlens.copy_(new_lengths())
        if paged:
            table.copy_(new_table())
        for x in (q, k, v):
            x.copy_(draw(*x.shape))
        k_before = k_cache.clone()
        k_twin, v_twin = k_cache.clone(), v_cache.clone()
        graph.replay()
        out, lse = step(k_twin, v_twin)
        torch.cuda.synchronize()
        assert not torch.equal(bits(k_cache), bits(k_before)), "the replay appended nothing"
        assert torch.equal(bits(g_out), bits(out)) and torch.equal(bits(g_lse), bits(lse))
        assert torch.equal(bits(k_cache), bits(k_twin)) and torch.equal(bits(v_cache), bits(v_twin))


@pytest.mark.gpu
@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "captured"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_gpu_decode_with_unchecked_bad_values_stays_inside_the_cache(rng, monkeypatch, page_size, capturing):
    """A violated guarantee on the decode kernel (whose calls never read a device length or page
    on the host, in a capture or out of one): lengths past the capacity or below 0 and page ids
    outside the cache read as the nearest valid ones (DecodeParams' bounds): the result is the
    call's on the clamped values, bit for bit, and no access leaves the cache (a CUDA error would
    fail the synchronization)."""
    cupy = _cupy()
    setup = Setup(rng, "float16", seqlens=[10, 20, 30], lnew=0, lq=1, capacity=64, page_size=page_size, heads_q=4,
                  heads_k=2, d=64, dv=64, spare_pages=0, xp=cupy)
    capacity = _capacity(setup, 64)
    arguments = setup.arguments()
    bad_lengths, good_lengths = numpy.array([capacity + 1000, -5, 30]), numpy.array([capacity, 0, 30])
    if page_size is not None:  # every entry a page, but two of sequence 2's
        host = rng.permutation(setup.table.size).reshape(setup.table.shape).astype(numpy.int32)
        good_table = host.copy()
        host[2, 0], host[2, 1] = host.size + 7, -4
        good_table[2, 0], good_table[2, 1] = host.size - 1, 0
    arguments["cache_seqlens"] = cupy.asarray(good_lengths.astype(numpy.int32))
    if page_size is not None:
        arguments["block_table"] = cupy.asarray(good_table)
    want, want_lse = cuflash.attention_with_kvcache(**arguments, causal=True, return_lse=True)
    _no_host_read(monkeypatch, capturing)
    arguments["cache_seqlens"] = cupy.asarray(bad_lengths.astype(numpy.int32))
    if page_size is not None:
        arguments["block_table"] = cupy.asarray(host)
    got, got_lse = cuflash.attention_with_kvcache(**arguments, causal=True, return_lse=True)
    cupy.cuda.Device().synchronize()
    assert _same_bits(got, want) and _same_bits(got_lse, want_lse)
