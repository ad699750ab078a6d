"""Ring attention (cuflash.distributed) on the CPU: N in-process ranks over the loopback
communicator, against single-process attention on the gathered sequence (float64, NumPy backend)."""
from __future__ import annotations

import numpy
import pytest

import cuflash
from cuflash import distributed

CASES = [
    dict(),
    dict(causal=True),
    dict(window=(5, 3)),
    dict(causal=True, window=(7, 0)),
    dict(causal=True, softcap=2.0, alibi="heads", sinks="heads"),
    dict(window=(-1, 2), sinks="heads"),
]


def _options(rng, heads, case):
    options = {key: value for key, value in case.items() if key not in ("alibi", "sinks")}
    if "alibi" in case:
        options["alibi_slopes"] = numpy.abs(rng.standard_normal(heads))
    if "sinks" in case:
        options["sinks"] = rng.standard_normal(heads)
    return options


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c) or "dense")
def test_ring_attention_equals_attention_on_the_whole_sequence(rng, layout, world_size, case):
    heads, heads_kv, d = 4, 2, 8  # GQA: the ring carries the key/value heads only
    length = 3 * (2 * world_size if layout == "zigzag" else world_size)
    q, dout = (rng.standard_normal((2, heads, length, d)) for _ in range(2))
    k, v = (rng.standard_normal((2, heads_kv, length, d)) for _ in range(2))
    options = _options(rng, heads, case)
    want_out, want_lse = cuflash.attention(q, k, v, return_lse=True, **options)
    want_grads = cuflash.attention_backward(dout, q, k, v, want_out, want_lse, **options)

    def rank(comm):
        mine = [distributed.shard(x, world_size, comm.rank, layout=layout) for x in (q, k, v, dout)]
        out, lse = distributed.ring_attention(*mine[:3], comm=comm, layout=layout, return_lse=True, **options)
        grads = distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, layout=layout,
                                                    deterministic=True, **options)
        return out, lse, grads

    results = distributed.LoopbackComm.run(world_size, rank)
    out = distributed.unshard([r[0] for r in results], layout=layout)
    lse = distributed.unshard([r[1][..., None] for r in results], layout=layout)[..., 0]
    numpy.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    numpy.testing.assert_array_equal(numpy.isinf(lse), numpy.isinf(want_lse))
    finite = numpy.isfinite(want_lse)
    numpy.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-12)
    for index, want in enumerate(want_grads[:3]):
        got = distributed.unshard([r[2][index] for r in results], layout=layout)
        numpy.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg="dq dk dv".split()[index])
    if "sinks" in options:
        for r in results:  # every rank holds the whole dsinks
            numpy.testing.assert_allclose(r[2][3], want_grads[3], rtol=1e-10, atol=1e-12)


def test_shard_and_unshard_are_inverse_and_zigzag_balances_causal_work():
    x = numpy.arange(2 * 16 * 3).reshape(2, 16, 3)
    shards = [distributed.shard(x, 4, r) for r in range(4)]
    assert shards[0][0, :, 0].tolist() == [0, 3, 42, 45]  # rank 0: rows 0-1 and 14-15 (chunks 0 and 7)
    numpy.testing.assert_array_equal(distributed.unshard(shards), x)
    # zigzag: rank r holds chunks r and 2W-1-r, so every rank sees the same number of causal pairs
    work = [sum(a + 1 for a in (r, 7 - r)) for r in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        distributed.shard(x[:, :12], 4, 0)
    with pytest.raises(ValueError, match="layout must be one of"):
        distributed.shard(x, 4, 0, layout="ring")


def test_deterministic_backward_is_bitwise_reproducible(rng):
    q, k, v, dout = (rng.standard_normal((1, 2, 12, 4)).astype(numpy.float32) for _ in range(4))

    def run():
        def rank(comm):
            mine = [distributed.shard(x, 3, comm.rank) for x in (q, k, v, dout)]
            out, lse = distributed.ring_attention(*mine[:3], comm=comm, causal=True, return_lse=True)
            return distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, causal=True,
                                                       deterministic=True)
        return distributed.LoopbackComm.run(3, rank)

    first, second = run(), run()
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            numpy.testing.assert_array_equal(x, y)


def test_a_failing_rank_raises_its_own_error():
    def rank(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 failed")
        return distributed.ring_attention(*(numpy.zeros((1, 4, 2)),) * 3, comm=comm)

    with pytest.raises(ValueError, match="rank 1 failed"):
        distributed.LoopbackComm.run(2, rank)


def _torch_rank(rank, world_size, init_file, layout, case, seed, results):
    """One process of the torch.distributed test: gloo over CPU tensors."""
    import torch
    import torch.distributed as dist

    import cuflash.torch as ct

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rng = numpy.random.default_rng(seed)
        q, k, v, dout = (rng.standard_normal(shape) for shape in ((1, 4, 24, 8), (1, 2, 24, 8), (1, 2, 24, 8),
                                                                  (1, 4, 24, 8)))
        sinks = rng.standard_normal(4) if case.get("sinks") else None
        options = {key: value for key, value in case.items() if key != "sinks"}
        leaves = [torch.from_numpy(distributed.shard(x, world_size, rank, layout=layout)).requires_grad_()
                  for x in (q, k, v)]
        sink_leaf = None if sinks is None else torch.from_numpy(sinks).requires_grad_()
        out = ct.distributed.ring_attention(*leaves, sinks=sink_leaf, layout=layout, deterministic=True, **options)
        out.backward(torch.from_numpy(distributed.shard(dout, world_size, rank, layout=layout)))
        grads = [leaf.grad.numpy() for leaf in leaves] + ([] if sink_leaf is None else [sink_leaf.grad.numpy()])
        results.put((rank, out.detach().numpy(), grads))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, layout, case", [
    (2, "zigzag", dict(causal=True, sinks=True)),
    (3, "contiguous", dict(window=(5, 2))),
])
def test_torch_ring_attention_over_gloo_with_autograd(tmp_path, world_size, layout, case):
    """cuflash.torch.distributed.ring_attention in world_size processes over a gloo process group
    (CPU tensors): out and the gradients (q, k, v, sinks) equal single-process attention's."""
    pytest.importorskip("torch")
    import torch.multiprocessing as mp

    seed = 1234
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_torch_rank, args=(rank, world_size, str(tmp_path / "init"), layout, case,
                                                            seed, results)) for rank in range(world_size)]
    for process in processes:
        process.start()
    gathered = dict((rank, (out, grads)) for rank, out, grads in (results.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    rng = numpy.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(shape) for shape in ((1, 4, 24, 8), (1, 2, 24, 8), (1, 2, 24, 8),
                                                              (1, 4, 24, 8)))
    options = {key: value for key, value in case.items() if key != "sinks"}
    if case.get("sinks"):
        options["sinks"] = rng.standard_normal(4)
    want_out, want_lse = cuflash.attention(q, k, v, return_lse=True, **options)
    want_grads = cuflash.attention_backward(dout, q, k, v, want_out, want_lse, **options)
    out = distributed.unshard([gathered[r][0] for r in range(world_size)], layout=layout)
    numpy.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    for index, want in enumerate(want_grads[:3]):
        got = distributed.unshard([gathered[r][1][index] for r in range(world_size)], layout=layout)
        numpy.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if case.get("sinks"):
        for r in range(world_size):
            numpy.testing.assert_allclose(gathered[r][1][3], want_grads[3], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout, case", [("zigzag", dict(causal=True)), ("contiguous", dict(window=(40, 8)))])
def test_ring_attention_on_the_gpu_kernels(rng, dtype, layout, case):
    """The ring over the loopback communicator with CuPy arrays: every chunk pair runs the GPU
    kernels with its global diagonal (params.cuh's diag_offset); against attention on the whole
    sequence on the GPU, under tolerance.py's rule (fp32: its own rounding; bf16: the plain
    same-dtype implementation's error as the baseline)."""
    cupy = pytest.importorskip("cupy")
    import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16"))
    from reference import (attention_backward_magnitudes, attention_backward_ref, attention_backward_ref_dtype,
                           attention_magnitudes, attention_ref, attention_ref_dtype)
    from tolerance import assert_close

    world_size, heads, heads_kv, d, length = 3, 4, 2, 64, 3 * 2 * 64
    host = [rng.standard_normal(shape).astype(numpy.dtype(dtype)) for shape in
            ((1, heads, length, d), (1, heads_kv, length, d), (1, heads_kv, length, d), (1, heads, length, d))]
    gpu = [cupy.asarray(x) for x in host]

    def rank(comm):
        mine = [distributed.shard(x, world_size, comm.rank, layout=layout) for x in gpu]
        out, lse = distributed.ring_attention(*mine[:3], comm=comm, layout=layout, return_lse=True, **case)
        grads = distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, layout=layout, **case)
        return [cupy.asnumpy(x) for x in (out, *grads)]

    results = distributed.LoopbackComm.run(world_size, rank)
    exact = [x.astype(numpy.float64) for x in host]
    baseline_out = attention_ref_dtype(*exact[:3], numpy.dtype(dtype), **case)[0] if dtype == "bfloat16" else None
    baseline_grads = (attention_backward_ref_dtype(exact[3], *exact[:3], numpy.dtype(dtype), **case)
                      if dtype == "bfloat16" else (None,) * 3)
    out = distributed.unshard([r[0] for r in results], layout=layout)
    assert_close(out, attention_ref(*exact[:3], **case)[0], dtype=numpy.dtype(dtype), baseline=baseline_out,
                 magnitude=attention_magnitudes(*exact[:3], **case), name="out")
    magnitudes = attention_backward_magnitudes(exact[3], *exact[:3], **case)
    for index, (name, want) in enumerate(zip(("dq", "dk", "dv"), attention_backward_ref(exact[3], *exact[:3], **case))):
        got = distributed.unshard([r[1 + index] for r in results], layout=layout)
        assert_close(got, want, dtype=numpy.dtype(dtype), baseline=baseline_grads[index], magnitude=magnitudes[index],
                     kind="grad", name=name)
