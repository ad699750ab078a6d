"""``precision=``: how float32 products may be computed ("highest", the default; "ieee"; "tf32").

Every entry point takes it (attention, attention_backward, attention_vjp, attention_varlen and
its backward, attention_with_kvcache, cuflash.torch.attention, cuflash.jax); float32 accepts all
three, the other dtypes None or "highest" only; anything else is a TypeError/ValueError naming
``precision`` before anything runs. Today every value computes float32 exactly (the CPU backend
always does; the GPU's float32 kernels are FFMA: "tf32" permits TF32, it does not require it),
so the results are bitwise equal across values; the GPU test holds "ieee" and "tf32" to that.
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (numpy.dtype("bfloat16"))
import numpy
import pytest

import cuflash

PRECISIONS = [None, "highest", "ieee", "tf32"]


def _arrays(rng, dtype="float32", xp=numpy):
    shapes = ((2, 4, 37, 16), (2, 2, 53, 16), (2, 2, 53, 16), (2, 4, 37, 16))
    return [xp.asarray(rng.standard_normal(s).astype(numpy.dtype(dtype))) for s in shapes]


def _calls(q, k, v, dout, precision):
    """Every entry point's result for one precision (values as NumPy arrays, in a fixed order)."""
    xp = cuflash._varlen._array_module(q)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, precision=precision)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, precision=precision)
    vjp_out, vjp = cuflash.attention_vjp(q, k, v, causal=True, precision=precision)
    packed = [x[0].transpose(1, 0, 2) for x in (q, k, v, dout)]  # batch 0 as one packed sequence
    packed = [xp.ascontiguousarray(x) for x in packed]
    cu_q = xp.asarray(numpy.array([0, 20, q.shape[2]], numpy.int32))
    cu_k = xp.asarray(numpy.array([0, 30, k.shape[2]], numpy.int32))
    pout, plse = cuflash.attention_varlen(*packed[:3], cu_q, cu_k, causal=True, return_lse=True, precision=precision)
    pgrads = cuflash.attention_varlen_backward(packed[3], *packed[:3], pout, plse, cu_q, cu_k, causal=True,
                                               precision=precision)
    cache = [xp.ascontiguousarray(x) for x in (k, v)]
    kv_out = cuflash.attention_with_kvcache(q, *cache, causal=True, precision=precision)
    results = [out, lse, *grads, vjp_out, *vjp(dout), pout, plse, *pgrads, kv_out]
    return [x if isinstance(x, numpy.ndarray) else x.get() for x in results]


def test_every_precision_of_float32_gives_the_same_bits_on_the_cpu(rng):
    q, k, v, dout = _arrays(rng)
    expected = _calls(q, k, v, dout, None)
    for precision in PRECISIONS[1:]:
        for name, got, want in zip(range(len(expected)), _calls(q, k, v, dout, precision), expected):
            assert got.tobytes() == want.tobytes(), f"result {name} differs under precision={precision!r}"


@pytest.mark.parametrize("precision, error, match", [
    (1, TypeError, r"precision must be None or one of 'highest', 'ieee', 'tf32', got int"),
    (True, TypeError, r"precision must be None or one of 'highest', 'ieee', 'tf32', got bool"),
    (b"ieee", TypeError, r"got bytes"),
    ("float32", ValueError, r"precision must be one of 'highest', 'ieee', 'tf32' \(or None\), got 'float32'"),
    ("HIGHEST", ValueError, r"got 'HIGHEST'"),
])
def test_bad_precisions_are_refused_naming_the_argument(rng, precision, error, match):
    q, k, v, dout = _arrays(rng)
    out = numpy.full((2, 4, 37, 16), 7.0, numpy.float32)
    with pytest.raises(error, match=match):
        cuflash.attention(q, k, v, out=out, precision=precision)
    assert (out == 7.0).all()
    lse = numpy.zeros((2, 4, 37), numpy.float32)
    with pytest.raises(error, match=match):
        cuflash.attention_backward(dout, q, k, v, out, lse, precision=precision)
    with pytest.raises(error, match=match):
        cuflash.attention_vjp(q, k, v, precision=precision)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_dtypes_take_highest_only(rng, dtype):
    q, k, v, dout = _arrays(rng, dtype)
    reference = cuflash.attention(q, k, v)
    for precision in (None, "highest"):
        assert cuflash.attention(q, k, v, precision=precision).tobytes() == reference.tobytes()
    for precision in ("ieee", "tf32"):
        match = rf"precision='{precision}' applies to float32 inputs; {dtype} inputs take None or 'highest'"
        with pytest.raises(ValueError, match=match):
            cuflash.attention(q, k, v, precision=precision)
        cache = [numpy.ascontiguousarray(x) for x in (k, v)]
        with pytest.raises(ValueError, match=match):
            cuflash.attention_with_kvcache(q, *cache, precision=precision)


def test_the_torch_and_jax_adapters_take_precision(rng):
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    q, k, v, dout = _arrays(rng)
    want = cuflash.attention(q, k, v, causal=True)
    leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    out = ct.attention(*leaves, causal=True, precision="ieee")
    assert out.detach().numpy().tobytes() == want.tobytes()
    out.backward(torch.from_numpy(dout))
    want_grads = cuflash.attention_backward(dout, q, k, v, *cuflash.attention(q, k, v, causal=True, return_lse=True),
                                            causal=True)
    for leaf, grad in zip(leaves, want_grads):
        assert leaf.grad.numpy().tobytes() == grad.tobytes()
    with pytest.raises(ValueError, match="precision='tf32' applies to float32 inputs; bfloat16 inputs"):
        ct.attention(*(x.detach().to(torch.bfloat16) for x in leaves), precision="tf32")
    with pytest.raises(TypeError, match="precision must be None or one of"):
        ct.attention(*leaves, precision=3)
    compiled = torch.compile(lambda q, k, v: ct.attention(q, k, v, causal=True, precision="tf32"), fullgraph=True)
    assert compiled(*(x.detach() for x in leaves)).numpy().tobytes() == want.tobytes()

    jax = pytest.importorskip("jax")
    import cuflash.jax as cj

    out = cj.attention(*(jax.numpy.asarray(x) for x in (q, k, v)), causal=True, precision="ieee")
    assert numpy.asarray(out).tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="precision must be one of"):
        cj.attention(*(jax.numpy.asarray(x) for x in (q, k, v)), precision="fast")


@pytest.mark.gpu
def test_gpu_float32_precisions_run_todays_exact_kernels(rng):
    """On the GPU, "ieee" and "tf32" are today's FFMA kernels: bitwise equal to "highest" on every
    entry point, full path and replay alike (a replayed plan of one precision never answers a
    refused value: "fast" still raises after "highest" was planned)."""
    cupy = pytest.importorskip("cupy")
    q, k, v, dout = _arrays(rng, xp=cupy)
    expected = _calls(q, k, v, dout, "highest")
    for precision in PRECISIONS:
        for _ in range(2):  # the second call replays the plans the first made
            for name, got, want in zip(range(len(expected)), _calls(q, k, v, dout, precision), expected):
                assert got.tobytes() == want.tobytes(), f"result {name} differs under precision={precision!r}"
    with pytest.raises(ValueError, match="precision must be one of"):
        cuflash.attention(q, k, v, causal=True, return_lse=True, precision="fast")
