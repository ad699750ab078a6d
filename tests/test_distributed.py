"""Ring attention (cuflash.distributed) on the CPU: N in-process ranks over the loopback
communicator, against single-process attention on the gathered sequence (float64, NumPy backend)."""
from __future__ import annotations

import ctypes
import os
import threading
import types

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
    # (an absolute bound too: the merge's log-sum-exp rounds at the size of its terms, not of a
    # result that happens to fall near 0 — one draw gave lse -5.0e-5, off by 7e-17)
    numpy.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-12, atol=1e-13)
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


class _FakeNccl:
    """A stand-in for ``cupy.cuda.nccl`` over threads (one rank each) and host memory: a group's
    sends and receives run at ``groupEnd`` (every send posted, then every receive filled, as NCCL
    starts a group's operations together); a send or receive outside a group fails (with real NCCL
    the ring's blocking send-to-next on every rank would deadlock). Each thread logs its calls."""

    NCCL_UINT8, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = "uint8", "float32", "float64", "sum"

    def __init__(self, size):
        self.barrier = threading.Barrier(size, timeout=60)
        self.mailbox, self.lock, self.local = {}, threading.Lock(), threading.local()

    def calls(self):
        if not hasattr(self.local, "calls"):
            self.local.calls, self.local.pending = [], None
        return self.local.calls

    def groupStart(self):  # noqa: N802 - NCCL's spelling
        self.calls().append(("groupStart",))
        assert self.local.pending is None, "nested group"
        self.local.pending = []

    def groupEnd(self):  # noqa: N802
        self.calls().append(("groupEnd",))
        pending, self.local.pending = self.local.pending, None
        with self.lock:
            for op, rank, address, count, peer in pending:
                if op == "send":
                    self.mailbox.setdefault((rank, peer), []).append(ctypes.string_at(address, count))
        self.barrier.wait()
        for op, rank, address, count, peer in pending:
            if op == "recv":
                with self.lock:
                    data = self.mailbox[(peer, rank)].pop(0)
                assert len(data) == count, f"rank {rank} expects {count} bytes from {peer}, got {len(data)}"
                ctypes.memmove(address, data, count)
        self.barrier.wait()


class _FakeCommunicator:
    """The members of cupy.cuda.nccl.NcclCommunicator that NcclComm calls, over a _FakeNccl."""

    def __init__(self, nccl, rank, size):
        self.nccl, self.rank, self.world = nccl, rank, size

    def rank_id(self):
        return self.rank

    def size(self):
        return self.world

    def _post(self, op, address, count, datatype, peer, stream):
        self.nccl.calls().append((op, count, datatype, peer, stream))
        assert self.nccl.local.pending is not None, f"{op} outside groupStart/groupEnd: the ring can deadlock"
        self.nccl.local.pending.append((op, self.rank, address, count, peer))

    def send(self, address, count, datatype, peer, stream):
        self._post("send", address, count, datatype, peer, stream)

    def recv(self, address, count, datatype, peer, stream):
        self._post("recv", address, count, datatype, peer, stream)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
        self.nccl.calls().append(("allReduce", count, datatype, op, stream))
        assert self.nccl.local.pending is None and op == "sum"
        dtype = numpy.dtype(datatype)
        mailbox, barrier = self.nccl.mailbox, self.nccl.barrier
        mailbox[("sum", self.rank)] = numpy.frombuffer(ctypes.string_at(sendbuf, count * dtype.itemsize), dtype)
        barrier.wait()
        total = sum(mailbox[("sum", r)] for r in range(self.world))
        ctypes.memmove(recvbuf, total.tobytes(), total.nbytes)
        barrier.wait()
        mailbox.pop(("sum", self.rank))


def test_nccl_comm_runs_the_ring_in_grouped_byte_sends_over_a_fake_nccl(rng, monkeypatch):
    """NcclComm's logic without NCCL: a fake cupy.cuda.nccl moving host bytes between thread ranks.
    The ring over NcclComm gives bitwise what it gives over LoopbackComm; every block travels as raw
    bytes (NCCL_UINT8, count = nbytes) to rank + 1 and from rank - 1, all of a tuple's sends and
    receives inside one group, K/V and the dK/dV accumulators as separate exchanges (the backward
    starts K/V before its pairs and dK/dV after them); dsinks is one allReduce (NCCL_SUM) in its
    own dtype."""
    world_size, layout = 3, "zigzag"
    fake = _FakeNccl(world_size)
    monkeypatch.setattr(distributed, "_nccl_module", lambda: fake)
    q, dout = (rng.standard_normal((1, 4, 24, 8)) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, 24, 8)) for _ in range(2))
    options = dict(causal=True, sinks=rng.standard_normal(4))

    def ring(comm):
        mine = [distributed.shard(x, world_size, comm.rank, layout=layout) for x in (q, k, v, dout)]
        out, lse = distributed.ring_attention(*mine[:3], comm=comm, layout=layout, return_lse=True, **options)
        grads = distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, layout=layout,
                                                    deterministic=True, **options)
        return (out, lse) + grads

    def over_nccl(loopback):
        comm = distributed.NcclComm(_FakeCommunicator(fake, loopback.rank, world_size), loopback.rank, world_size)
        return ring(comm), fake.calls()

    want = distributed.LoopbackComm.run(world_size, ring)
    got = distributed.LoopbackComm.run(world_size, over_nccl)
    for rank in range(world_size):
        for a, b in zip(got[rank][0], want[rank]):
            numpy.testing.assert_array_equal(a, b)
        calls = got[rank][1]
        block = k.nbytes // world_size  # a shard of k (or v, or a float64 dK/dV accumulator) in bytes
        send = ("send", block, "uint8", (rank + 1) % world_size, 0)
        recv = ("recv", block, "uint8", (rank - 1) % world_size, 0)
        pair = [("groupStart",)] + [send, recv] * 2 + [("groupEnd",)]  # (k, v), or (dK, dV) in float64
        # forward: W - 1 passes of (k, v); backward: per step (k, v) sent ahead but at the last step,
        # then (dK, dV) after the step's pairs; then dsinks summed
        backward = [*(pair * 2) * (world_size - 1), *pair]
        assert calls == [*pair * (world_size - 1), *backward, ("allReduce", 4, "float64", "sum", 0)]


def test_nccl_comm_sends_any_dtype_as_bytes_and_keeps_shapes(monkeypatch):
    """bfloat16 (no NCCL type needed), a non-contiguous view (sent as its values, not its buffer)
    and None in one tuple; a world of one returns copies without NCCL; the rank is checked against
    the communicator's and from_cupyx reads a cupyx NCCLBackend's members."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    fake = _FakeNccl(2)
    monkeypatch.setattr(distributed, "_nccl_module", lambda: fake)

    def arrays(rank):
        base = numpy.arange(2 * 6 * 5, dtype=numpy.float32).reshape(2, 6, 5) + 1000 * rank
        return base.astype(ml_dtypes.bfloat16), base[:, ::2, 1:4], None, base.astype(numpy.float64)[0]

    def rank_fn(loopback):
        comm = distributed.NcclComm(_FakeCommunicator(fake, loopback.rank, 2), loopback.rank, 2)
        peer = 1 - loopback.rank
        return comm.sendrecv(arrays(loopback.rank), dest=peer, source=peer), fake.calls()

    results = distributed.LoopbackComm.run(2, rank_fn)
    for rank, (received, calls) in enumerate(results):
        sent = arrays(1 - rank)
        assert received[2] is None
        for got, want in zip(received[:2] + received[3:], sent[:2] + sent[3:]):
            assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
            numpy.testing.assert_array_equal(got, want)
        sizes = [a.nbytes for a in sent if a is not None]
        assert calls == [("groupStart",), *[(op, n, "uint8", 1 - rank, 0) for n in sizes for op in ("send", "recv")],
                         ("groupEnd",)]

    alone = distributed.NcclComm(_FakeCommunicator(fake, 0, 1), 0, 1)
    x = numpy.ones(3)
    (copy,) = alone.sendrecv((x,), dest=0, source=0)
    assert copy is not x and (copy == x).all()
    total = alone.allreduce_sum(numpy.float64(2.0) * x)
    assert (total == 2).all()
    assert fake.calls() == []  # this (main) thread called no NCCL
    with pytest.raises(ValueError, match="rank is 1, not the rank 0"):
        distributed.NcclComm(_FakeCommunicator(fake, 1, 2), 0, 2)
    backend = types.SimpleNamespace(_comm=_FakeCommunicator(fake, 1, 2), rank=1, _n_devices=2)
    comm = distributed.NcclComm.from_cupyx(backend)
    assert (comm.communicator, comm.rank, comm.size) == (backend._comm, 1, 2)


_NCCL_SHAPES = ((1, 4, 2 * 2 * 128, 64), (1, 2, 2 * 2 * 128, 64), (1, 2, 2 * 2 * 128, 64), (1, 4, 2 * 2 * 128, 64))
_NCCL_CASES = [("zigzag", dict(causal=True)), ("contiguous", dict(sinks=True))]  # GQA: 4 query heads, 2 kv heads
_NCCL_DTYPES = ("bfloat16", "float32")


def _nccl_inputs(seed, index, dtype):
    """q, k, v, dout in ``dtype`` (bf16-rounded: what the GPUs and the reference both see) and the
    float32 sinks of case ``index`` (or None): the same draws in every process."""
    from reference import dtype_of  # bfloat16 through ml_dtypes

    rng = numpy.random.default_rng([seed, index, _NCCL_DTYPES.index(dtype)])
    host = [rng.standard_normal(shape).astype(dtype_of(dtype)) for shape in _NCCL_SHAPES]
    heads = _NCCL_SHAPES[0][1]
    sinks = rng.standard_normal(heads).astype(numpy.float32) if _NCCL_CASES[index][1].get("sinks") else None
    return host, sinks


def _nccl_rank(rank, world_size, seed, ids, results):
    """One process of the NCCL test: its own GPU, an NcclComm from rank 0's unique id, the ring
    forward and backward for every case and dtype; float32 NumPy results (bf16 widens exactly)."""
    import traceback

    try:
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the lent machines), before NCCL starts
        import cupy
        from cupy.cuda import nccl

        cupy.cuda.Device(rank).use()
        if rank == 0:
            unique_id = nccl.get_unique_id()
            for _ in range(world_size - 1):
                ids.put(unique_id)
        else:
            unique_id = ids.get(timeout=300)
        comm = distributed.NcclComm.from_unique_id(unique_id, rank, world_size)
        outputs = {}
        for index, (layout, case) in enumerate(_NCCL_CASES):
            for dtype in _NCCL_DTYPES:
                host, sinks = _nccl_inputs(seed, index, dtype)
                options = {key: value for key, value in case.items() if key != "sinks"}
                if sinks is not None:
                    options["sinks"] = cupy.asarray(sinks)
                mine = [distributed.shard(cupy.asarray(x), world_size, rank, layout=layout) for x in host]
                out, lse = distributed.ring_attention(*mine[:3], comm=comm, layout=layout, return_lse=True, **options)
                grads = distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, layout=layout,
                                                            **options)
                outputs[(index, dtype)] = [cupy.asnumpy(x).astype(numpy.float32) for x in (out, lse, *grads)]
        results.put((rank, outputs, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((rank, None, traceback.format_exc()))


def _check_ring_against_attention(results, host, sinks, layout, case, dtype, label):
    """Rank-ordered ring results [out, lse, dq, dk, dv(, dsinks)] against cuflash's CPU backend in
    float64 on the same (rounded) inputs, under tolerance.py's rule: bf16 against the plain bf16
    implementation's error (reference.score_mods_ref, which has sinks), float32 its own rounding."""
    from reference import attention_backward_magnitudes, attention_magnitudes, score_mods_ref
    from tolerance import EPS, assert_close

    exact = [x.astype(numpy.float64) for x in host]
    plain = {key: value for key, value in case.items() if key != "sinks"}
    options = dict(plain, **({} if sinks is None else {"sinks": sinks.astype(numpy.float64)}))
    want_out, want_lse = cuflash.attention(*exact[:3], return_lse=True, **options)
    want_grads = cuflash.attention_backward(exact[3], *exact[:3], want_out, want_lse, **options)
    precision = host[0].dtype
    baseline = (None, None, (None,) * 4)
    if dtype == "bfloat16":
        baseline = score_mods_ref(*host, dtype=precision, **dict(plain, **({} if sinks is None else {"sinks": sinks})))
    out = distributed.unshard([r[0] for r in results], layout=layout)
    lse = distributed.unshard([r[1][..., None] for r in results], layout=layout)[..., 0]
    assert_close(out, want_out, dtype=precision, baseline=baseline[0],
                 magnitude=attention_magnitudes(*exact[:3], **plain), name=f"{label} out")
    assert_close(lse, want_lse, dtype=numpy.float32, baseline=baseline[1], kind="lse", name=f"{label} lse")
    magnitudes = attention_backward_magnitudes(exact[3], *exact[:3], **plain)
    for index, name in enumerate(("dq", "dk", "dv")):
        got = distributed.unshard([r[2 + index] for r in results], layout=layout)
        assert_close(got, want_grads[index], dtype=precision, baseline=baseline[2][index], magnitude=magnitudes[index],
                     kind="grad", name=f"{label} {name}")
    if sinks is not None:
        for r in results[1:]:  # the all-reduce leaves every rank the same dsinks
            numpy.testing.assert_array_equal(r[5], results[0][5])
        # the size of the terms dsinks sums, -exp(sink - lse_i) (dout_i . out_i) over every row i: they
        # cancel to a small sum, while the rounding of out (in q's dtype) errs on each term
        size = numpy.exp(options["sinks"][:, None] - want_lse) * numpy.abs((exact[3] * want_out).sum(-1))
        coarser = max(numpy.dtype(numpy.float32), precision, key=lambda t: EPS[t.name])
        assert_close(results[0][5], want_grads[3], dtype=coarser, baseline=baseline[2][3],
                     magnitude=size.sum(axis=(0, 2)), kind="grad", name=f"{label} dsinks")


def _gather_ranks(processes, results):
    """Start the rank processes and collect {rank: outputs} from ``results`` ((rank, outputs,
    traceback or None) each); a rank's error fails the test with its traceback."""
    for process in processes:
        process.start()
    try:
        gathered = {}
        for _ in processes:
            rank, outputs, error = results.get(timeout=600)
            if error is not None:
                pytest.fail(f"rank {rank} failed:\n{error}")
            gathered[rank] = outputs
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
        return gathered
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()


@pytest.mark.gpu
def test_ring_attention_over_nccl_in_two_processes(rng):
    """NcclComm for real: 2 spawned processes, one GPU each, one NCCL communicator from rank 0's
    unique id; the ring (GQA, 4 query heads over 2 kv heads, 512 tokens, D 64) zigzag causal and
    contiguous with sinks, bf16 and float32, forward and backward (dsinks all-reduced), against
    attention on the whole sequence (cuflash's CPU backend, float64) under tolerance.py's rule."""
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy finds no NCCL library")
    import multiprocessing

    world_size, seed = 2, int(rng.integers(2**62))
    context = multiprocessing.get_context("spawn")
    ids, results = context.Queue(), context.Queue()
    processes = [context.Process(target=_nccl_rank, args=(rank, world_size, seed, ids, results))
                 for rank in range(world_size)]
    gathered = _gather_ranks(processes, results)
    for index, (layout, case) in enumerate(_NCCL_CASES):
        for dtype in _NCCL_DTYPES:
            host, sinks = _nccl_inputs(seed, index, dtype)
            label = f"{layout} {'-'.join(case)} {dtype}"
            _check_ring_against_attention([gathered[r][(index, dtype)] for r in range(world_size)], host, sinks,
                                          layout, case, dtype, label)


def _torch_nccl_rank(rank, world_size, init_file, seed, results):
    """One process of the torch NCCL test: cuflash.torch.distributed.ring_attention on CUDA tensors
    of its own GPU over an NCCL process group, forward (return_lse) and autograd backward, for
    every case and dtype of the CuPy NCCL test; float32 NumPy results as _nccl_rank's."""
    import traceback

    try:
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the lent machines), before NCCL starts
        import torch
        import torch.distributed as dist

        import cuflash.torch as ct

        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                device_id=torch.device("cuda", rank))
        try:
            outputs = {}
            for index, (layout, case) in enumerate(_NCCL_CASES):
                for dtype in _NCCL_DTYPES:
                    host, sinks = _nccl_inputs(seed, index, dtype)
                    options = {key: value for key, value in case.items() if key != "sinks"}
                    tensors = [torch.from_numpy(distributed.shard(x.astype(numpy.float32), world_size, rank,
                                                                  layout=layout)).to(f"cuda:{rank}", getattr(torch, dtype))
                               for x in host]
                    leaves = [t.requires_grad_() for t in tensors[:3]]
                    sink_leaf = (None if sinks is None
                                 else torch.from_numpy(sinks).to(f"cuda:{rank}").requires_grad_())
                    out, lse = ct.distributed.ring_attention(*leaves, sinks=sink_leaf, layout=layout, return_lse=True,
                                                             **options)
                    out.backward(tensors[3])
                    grads = [leaf.grad for leaf in leaves] + ([] if sink_leaf is None else [sink_leaf.grad])
                    outputs[(index, dtype)] = [t.detach().float().cpu().numpy() for t in (out, lse, *grads)]
            results.put((rank, outputs, None))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((rank, None, traceback.format_exc()))


@pytest.mark.gpu
def test_torch_ring_attention_over_nccl_in_two_processes(rng, tmp_path):
    """cuflash.torch.distributed.ring_attention over torch's NCCL process group: 2 spawned
    processes, one GPU each, the cases and inputs of the CuPy NCCL test (GQA, zigzag causal and
    contiguous with sinks, bf16 and float32), out, lse and every gradient (dsinks all-reduced)
    against attention on the whole sequence under tolerance.py's rule."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    if not torch.distributed.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    import torch.multiprocessing as mp

    world_size, seed = 2, int(rng.integers(2**62))
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_torch_nccl_rank, args=(rank, world_size, str(tmp_path / "init"), seed,
                                                                 results)) for rank in range(world_size)]
    gathered = _gather_ranks(processes, results)
    for index, (layout, case) in enumerate(_NCCL_CASES):
        for dtype in _NCCL_DTYPES:
            host, sinks = _nccl_inputs(seed, index, dtype)
            _check_ring_against_attention([gathered[r][(index, dtype)] for r in range(world_size)], host, sinks,
                                          layout, case, dtype, f"torch {layout} {'-'.join(case)} {dtype}")
