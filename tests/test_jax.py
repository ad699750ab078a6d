"""cuflash.jax: cuflash on JAX arrays through DLPack, forward and jax.grad; skipped without JAX.

CPU arrays run the NumPy backend (and must equal cuflash on the same NumPy arrays, bit for bit);
GPU arrays (marked gpu) run the kernels and come back as JAX arrays on the same GPU.
"""
from __future__ import annotations

import os

import numpy
import pytest

# JAX grabs 75% of GPU memory on first use unless told not to; CuPy and torch share the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import cuflash  # noqa: E402
import cuflash.jax as cj  # noqa: E402
from reference import attention_backward_magnitudes, attention_backward_ref, attention_ref  # noqa: E402
from tolerance import assert_close  # noqa: E402


def _devices(platform):
    try:
        return jax.devices(platform)
    except RuntimeError:  # no backend of that platform
        return []


@pytest.fixture
def cpu():
    return _devices("cpu")[0]


@pytest.fixture
def gpu():
    devices = _devices("gpu")
    if not devices:
        pytest.skip("JAX has no GPU device")
    return devices[0]


def _on(device, *arrays):
    return [jax.device_put(x, device) for x in arrays]


def test_cpu_arrays_run_the_numpy_backend(cpu, randn):
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 11, 8), randn(2, 2, 11, 6)
    out, lse = cj.attention(*_on(cpu, q, k, v), causal=True, window=(4, -1), return_lse=True)
    assert isinstance(out, jax.Array) and out.devices() == {cpu} and out.dtype == jnp.float32
    expected_out, expected_lse = cuflash.attention(q, k, v, causal=True, window=(4, -1), return_lse=True)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)


def test_bfloat16_survives_on_cpu(cpu, randn):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q = randn(1, 2, 7, 8, dtype=ml_dtypes.bfloat16)
    out = cj.attention(*_on(cpu, q, q, q))
    assert out.dtype == jnp.bfloat16
    numpy.testing.assert_array_equal(numpy.asarray(out), cuflash.attention(q, q, q))


def test_grad_through_custom_vjp_on_cpu(cpu, randn):
    q, k, v = randn(2, 4, 6, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 8)
    dout = randn(2, 4, 6, 8)
    options = dict(causal=True, scale=0.4)

    def loss(q, k, v):
        return jnp.sum(cj.attention(q, k, v, **options) * dout)

    grads = jax.grad(loss, argnums=(0, 1, 2))(*_on(cpu, q, k, v))
    expected = attention_backward_ref(dout, q, k, v, **options)
    magnitudes = attention_backward_magnitudes(dout, q, k, v, **options)
    for name, grad, reference, magnitude in zip("qkv", grads, expected, magnitudes):
        assert_close(numpy.asarray(grad), reference, dtype=numpy.float32, magnitude=magnitude, kind="grad",
                     name=f"d{name}")


def test_refuses_tracers_with_a_clear_error(cpu, randn):
    q = _on(cpu, randn(1, 2, 4, 8))[0]
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda q: cj.attention(q, q, q))(q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_gpu_arrays_stay_on_the_gpu(dtype_name, gpu, randn):
    import cupy

    dtype = jnp.dtype(dtype_name)
    q, k, v = (randn(2, 4, 128, 64).astype(dtype) for _ in range(3))
    q_gpu, k_gpu, v_gpu = _on(gpu, q, k, v)
    out = cj.attention(q_gpu, k_gpu, v_gpu, causal=True)
    assert isinstance(out, jax.Array) and out.devices() == {gpu} and out.dtype == dtype
    expected = cuflash.attention(*(cupy.asarray(x) for x in (q, k, v)), causal=True)
    numpy.testing.assert_array_equal(numpy.asarray(out).astype(numpy.float32), cupy.asnumpy(expected).astype(numpy.float32))


@pytest.mark.gpu
def test_grad_on_the_gpu(gpu, randn):
    q, k, v, dout = (randn(1, 4, 96, 64) for _ in range(4))

    def loss(q, k, v):
        return jnp.sum(cj.attention(q, k, v, causal=True) * jax.device_put(dout, gpu))

    grads = jax.grad(loss, argnums=(0, 1, 2))(*_on(gpu, q, k, v))
    expected_out, _ = attention_ref(q, k, v, causal=True)
    assert_close(numpy.asarray(cj.attention(*_on(gpu, q, k, v), causal=True)), expected_out, dtype=numpy.float32)
    expected = attention_backward_ref(dout, q, k, v, causal=True)
    magnitudes = attention_backward_magnitudes(dout, q, k, v, causal=True)
    for name, grad, reference, magnitude in zip("qkv", grads, expected, magnitudes):
        assert grad.devices() == {gpu}
        assert_close(numpy.asarray(grad), reference, dtype=numpy.float32, magnitude=magnitude, kind="grad",
                     name=f"d{name}")


def test_score_modifiers_and_the_gradient_into_sinks_on_cpu(cpu, randn):
    q, k, v, dout = randn(2, 4, 9, 8), randn(2, 2, 11, 8), randn(2, 2, 11, 8), randn(2, 4, 9, 8)
    sinks, slopes = randn(4), numpy.abs(randn(4))
    options = dict(causal=True, softcap=2.0)
    jq, jk, jv, jsinks, jslopes, jdout = _on(cpu, q, k, v, sinks, slopes, dout)
    out, vjp = jax.vjp(lambda q, k, v, s: cj.attention(q, k, v, sinks=s, alibi_slopes=jslopes, **options),
                       jq, jk, jv, jsinks)
    grads = vjp(jdout)
    expected_out, lse = cuflash.attention(q, k, v, sinks=sinks, alibi_slopes=slopes, return_lse=True, **options)
    expected = cuflash.attention_backward(dout, q, k, v, expected_out, lse, sinks=sinks, alibi_slopes=slopes, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    assert len(grads) == 4
    for got, want in zip(grads, expected):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)
    # Without sinks the function still has four inputs; the last cotangent is None.
    _, vjp = jax.vjp(lambda q, k, v: cj.attention(q, k, v, **options), jq, jk, jv)
    assert len(vjp(jdout)) == 3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal="sideways"), ValueError, "causal must be False, True"),
    (dict(window=3), TypeError, "window must be None or a"),
    (dict(window=(3, 2), causal=True), ValueError, "window right must be 0 or -1 with causal"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(softcap=-2.0), ValueError, "softcap must be a finite number > 0"),
    (dict(sinks="ints"), TypeError, "sinks must be a float array"),
    (dict(sinks="shape"), ValueError, "sinks must broadcast"),
    (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes must be a jax.Array"),
], ids=["causal", "window-type", "causal-window", "scale-nan", "softcap", "sinks-int", "sinks-shape", "alibi-list"])
def test_errors_name_the_argument(cpu, randn, kwargs, error, match):
    q, k, v = _on(cpu, randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8))
    replacements = {"ints": jnp.ones(4, jnp.int32), "shape": jnp.ones(3, jnp.float32)}
    kwargs = {key: replacements.get(value, value) if isinstance(value, str) and key == "sinks" else value
              for key, value in kwargs.items()}
    with pytest.raises(error, match=match):
        cj.attention(q, k, v, **kwargs)


def test_bool_options_are_checked_before_anything_runs(cpu, randn):
    """deterministic and return_lse are bools (NumPy bools too), checked at the call, not when
    jax.grad first runs the backward."""
    q = _on(cpu, randn(2, 5, 4))[0]
    out, lse = cj.attention(q, q, q, deterministic=numpy.bool_(True), return_lse=numpy.bool_(True))
    numpy.testing.assert_array_equal(numpy.asarray(out), numpy.asarray(cj.attention(q, q, q)))
    assert lse.shape == (2, 5)
    jax.grad(lambda q: jnp.sum(cj.attention(q, q, q, deterministic=numpy.bool_(False))))(q)
    for name, value in (("deterministic", 1), ("deterministic", None), ("return_lse", "no"), ("return_lse", 0.0)):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got {type(value).__name__}"):
            cj.attention(q, q, q, **{name: value})
