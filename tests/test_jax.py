"""cuflash.jax: cuflash on JAX arrays through DLPack, forward and jax.grad; skipped without JAX.

CPU arrays run the NumPy backend (and must equal cuflash on the same NumPy arrays, bit for bit);
GPU arrays (marked gpu) run the kernels and come back as JAX arrays on the same GPU.
"""
from __future__ import annotations

import os
import re

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


def test_under_jit_the_results_and_gradients_are_the_eager_ones(cpu, randn):
    """Under jax.jit attention runs as an XLA custom call into cuflash (the NumPy backend for CPU
    arrays): out, lse and jax.grad into q, k, v are bit for bit the eager call's, and a second
    execution reuses the trace."""
    q, k, v, dout = randn(2, 4, 9, 8), randn(2, 2, 11, 8), randn(2, 2, 11, 6), randn(2, 4, 9, 6)
    options = dict(causal=True, window=(4, -1), scale=0.3)
    forward = jax.jit(lambda q, k, v: cj.attention(q, k, v, return_lse=True, **options))
    for _ in range(2):
        out, lse = forward(*_on(cpu, q, k, v))
        expected_out, expected_lse = cuflash.attention(q, k, v, return_lse=True, **options)
        numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
        numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cj.attention(q, k, v, **options) * dout), argnums=(0, 1, 2)))(
        *_on(cpu, q, k, v))
    expected = cuflash.attention_backward(dout, q, k, v, expected_out, expected_lse, **options)
    for got, want in zip(grads, expected):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)


def test_under_jit_bias_mask_and_sinks_take_their_gradients(cpu, randn, rng):
    """Traced bias, mask, sinks and ALiBi slopes: out and the cotangents of q, k, v, sinks and bias
    (the slopes and the mask carry none) equal the eager NumPy call's, bit for bit."""
    q, k, v, dout = randn(3, 2, 7, 8), randn(3, 2, 9, 8), randn(3, 2, 9, 8), randn(3, 2, 7, 8)
    bias, sinks, slopes = randn(1, 2, 7, 9), randn(2), numpy.array([0.1, 0.3], numpy.float32)
    mask = rng.random((3, 1, 1, 9)) > 0.3

    def attend(q, k, v, sinks, bias, slopes, mask):
        return cj.attention(q, k, v, sinks=sinks, bias=bias, alibi_slopes=slopes, mask=mask, causal=True, softcap=3.0)

    operands = _on(cpu, q, k, v, sinks, bias, slopes, mask)
    out, vjp = jax.vjp(jax.jit(attend), *operands)
    grads = jax.jit(vjp)(jax.device_put(dout, cpu))
    options = dict(sinks=sinks, bias=bias, alibi_slopes=slopes, mask=mask, causal=True, softcap=3.0)
    expected_out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dq, dk, dv, dbias, dsinks = cuflash.attention_backward(dout, q, k, v, expected_out, lse, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    for got, want in zip(grads[:5], (dq, dk, dv, dsinks, dbias)):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)


@pytest.mark.parametrize("fallback", [False, True], ids=["custom-call", "pure-callback"])
def test_under_vmap_the_batch_is_one_call_and_equals_each_items(cpu, randn, monkeypatch, fallback):
    """vmap over a leading axis: one call for the whole batch, forward and backward (the unbatched
    operands broadcast by cuflash, not copied), arrays of different ranks lined up on the batch
    axis (a bias and sinks of lower rank than q, K/V shared by every item, GQA); out and the
    gradients (the shared operands' summed over the items) equal the items' own."""
    from cuflash import _api, _xla

    if fallback:
        monkeypatch.setattr(_xla, "available", lambda jax: False)
    calls = []
    real = _api.attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(_api, "attention", spy)
    n = 3
    q, bias, dout = randn(n, 2, 4, 5, 8), randn(n, 4, 5, 7), randn(n, 2, 4, 5, 8)
    k, v, sinks = randn(2, 2, 7, 8), randn(2, 2, 7, 8), randn(4)
    options = dict(causal=True, scale=0.4)

    def attend(q, k, v, sinks, bias):
        return cj.attention(q, k, v, sinks=sinks, bias=bias, **options)

    in_axes = (0, None, None, None, 0)
    arrays = _on(cpu, q, k, v, sinks, bias)
    out = jax.jit(jax.vmap(attend, in_axes=in_axes))(*arrays)
    assert calls == [(n, 2, 4, 5, 8)]  # one forward for the batch
    for i in range(n):
        numpy.testing.assert_array_equal(numpy.asarray(out[i]), numpy.asarray(attend(*_on(cpu, q[i], k, v, sinks, bias[i]))))

    def loss(q, k, v, sinks, bias):
        return jnp.sum(jax.vmap(attend, in_axes=in_axes)(q, k, v, sinks, bias) * dout)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*arrays)
    items = [jax.grad(lambda *x: jnp.sum(attend(*x) * dout[i]), argnums=(0, 1, 2, 3, 4))(*_on(cpu, q[i], k, v, sinks,
                                                                                            bias[i]))
             for i in range(n)]
    for index, name in enumerate(("q", "k", "v", "sinks", "bias")):
        per_item = [numpy.asarray(item[index]) for item in items]
        expected = numpy.stack(per_item) if in_axes[index] == 0 else numpy.sum(per_item, axis=0)
        numpy.testing.assert_allclose(numpy.asarray(grads[index]), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(softcap=-2.0), ValueError, "softcap must be a finite number > 0"),
    (dict(window=(3, 2), causal=True), ValueError, "window right must be 0 or -1 with causal"),
    (dict(k_shape=(1, 3, 4, 8)), ValueError, "heads"),
], ids=["softcap", "causal-window", "heads"])
def test_under_jit_misuse_is_refused_when_traced(cpu, randn, kwargs, error, match):
    """The eager checks run at trace time, on the operands' shapes and dtypes: a ValueError naming
    the argument, before anything is computed."""
    k_shape = kwargs.pop("k_shape", (1, 2, 4, 8))
    q, k = _on(cpu, randn(1, 2, 4, 8), randn(*k_shape))
    with pytest.raises(error, match=match):
        jax.jit(lambda q, k: cj.attention(q, k, k, **kwargs))(q, k)


def test_under_jit_cuflash_is_a_custom_call_in_the_program(cpu, randn):
    """The jitted program calls cuflash's FFI target (cuflash._xla) forward and backward: no host
    callback, and so on a GPU no copy to the host."""
    q, k, v = randn(1, 2, 5, 4), randn(1, 2, 7, 4), randn(1, 2, 7, 4)
    loss = jax.grad(lambda q, k, v: jnp.sum(cj.attention(q, k, v, causal=True)), argnums=(0, 1, 2))
    for function in (lambda q, k, v: cj.attention(q, k, v, causal=True), loss):
        program = jax.jit(function).lower(*_on(cpu, q, k, v)).as_text()
        assert set(re.findall(r"custom_call @(\w+)", program)) == {"cuflash_callback"}


def test_without_the_custom_call_jit_falls_back_to_a_host_callback(cpu, randn, monkeypatch):
    """A JAX whose FFI cannot take cuflash's target gets the pure_callback path, same results."""
    from cuflash import _xla

    monkeypatch.setattr(_xla, "available", lambda jax: False)
    q, k, v, dout = randn(2, 3, 6, 5), randn(2, 3, 9, 5), randn(2, 3, 9, 5), randn(2, 3, 6, 5)
    out, lse = jax.jit(lambda q, k, v: cj.attention(q, k, v, causal=True, return_lse=True))(*_on(cpu, q, k, v))
    expected_out, expected_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cj.attention(q, k, v, causal=True) * dout), argnums=(0, 1, 2)))(
        *_on(cpu, q, k, v))
    for got, want in zip(grads, cuflash.attention_backward(dout, q, k, v, expected_out, expected_lse, causal=True)):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)


def test_a_failure_inside_the_custom_call_reaches_the_caller(cpu, randn, monkeypatch):
    """An error raised while XLA runs the call (not at trace time) fails the jitted call with its
    message; it neither crashes the process nor leaves garbage in the result."""
    from cuflash import _api

    q = randn(1, 1, 3, 4)

    def broken(*args, **kwargs):
        raise ValueError("planted failure")

    monkeypatch.setattr(_api, "attention", broken)
    with pytest.raises(Exception, match="planted failure"):
        jax.block_until_ready(jax.jit(lambda q: cj.attention(q, q, q, scale=0.37))(*_on(cpu, q)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_under_jit_on_the_gpu_the_kernels_run_on_xlas_buffers(dtype_name, gpu, randn, monkeypatch):
    """jax.jit on GPU arrays: the custom call hands cuflash CuPy views of XLA's buffers (no host
    copy); out, lse and the gradients equal the eager GPU call's bit for bit, on the GPU."""
    import cupy

    from cuflash import _api

    seen = []
    real = _api.attention

    def spy(q, *args, **kwargs):
        seen.append(type(q))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(_api, "attention", spy)
    dtype = jnp.dtype(dtype_name)
    q, k, v, dout = (randn(2, 4, n, 64).astype(dtype) for n in (97, 200, 200, 97))
    options = dict(causal=True, window=(50, -1))
    jq, jk, jv, jdout = _on(gpu, q, k, v, dout)
    out, lse = jax.jit(lambda q, k, v: cj.attention(q, k, v, return_lse=True, **options))(jq, jk, jv)
    assert cupy.ndarray in seen and out.devices() == {gpu}
    eager_out, eager_lse = cj.attention(jq, jk, jv, return_lse=True, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), numpy.asarray(eager_out))
    numpy.testing.assert_array_equal(numpy.asarray(lse), numpy.asarray(eager_lse))

    def loss(q, k, v):
        return jnp.sum((cj.attention(q, k, v, deterministic=True, **options) * jdout).astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jq, jk, jv)
    eager = jax.grad(loss, argnums=(0, 1, 2))(jq, jk, jv)
    for got, want in zip(grads, eager):
        assert got.devices() == {gpu}
        numpy.testing.assert_array_equal(numpy.asarray(got), numpy.asarray(want))


@pytest.mark.gpu
def test_under_jit_and_vmap_on_the_gpu_one_call_serves_the_batch(gpu, randn):
    """vmap of a jitted attention over GPU arrays (K/V shared by the items): the items' results
    and gradients, computed by one batched custom call on the GPU."""
    n = 4
    q, dout = randn(n, 2, 4, 97, 64).astype(jnp.bfloat16), randn(n, 2, 4, 97, 64).astype(jnp.bfloat16)
    k, v = (randn(2, 2, 130, 64).astype(jnp.bfloat16) for _ in range(2))
    jq, jk, jv, jdout = _on(gpu, q, k, v, dout)

    def attend(q, k, v):
        return cj.attention(q, k, v, causal=True, deterministic=True)

    out = jax.jit(jax.vmap(attend, in_axes=(0, None, None)))(jq, jk, jv)
    assert out.devices() == {gpu}
    for i in range(n):
        numpy.testing.assert_array_equal(numpy.asarray(out[i]), numpy.asarray(attend(jq[i], jk, jv)))

    def loss(q, k, v):
        return jnp.sum((jax.vmap(attend, in_axes=(0, None, None))(q, k, v) * jdout).astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jq, jk, jv)
    items = [jax.grad(lambda q, k, v: jnp.sum((attend(q, k, v) * jdout[i]).astype(jnp.float32)), argnums=(0, 1, 2))(
        jq[i], jk, jv) for i in range(n)]
    numpy.testing.assert_array_equal(numpy.asarray(grads[0]), numpy.stack([numpy.asarray(g[0]) for g in items]))
    for index in (1, 2):  # shared K/V: the items' gradients summed (by JAX, in float32 here: bf16 sums differ)
        expected = numpy.sum([numpy.asarray(g[index]).astype(numpy.float32) for g in items], axis=0)
        numpy.testing.assert_allclose(numpy.asarray(grads[index]).astype(numpy.float32), expected, rtol=2e-2, atol=2e-2)


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


def test_bias_and_mask_with_the_gradient_into_bias_on_cpu(cpu, randn, rng):
    """AlphaFold-style pair bias (broadcast over the batch), a key-padding mask that leaves one row
    nothing, and sinks: out and every cotangent (q, k, v, sinks, bias) equal to cuflash's on the
    NumPy arrays; jax.grad of a loss into bias alone too."""
    q, k, v, dout = randn(3, 2, 7, 8), randn(3, 2, 9, 8), randn(3, 2, 9, 8), randn(3, 2, 7, 8)
    bias, sinks = randn(1, 2, 7, 9), randn(2)
    mask = rng.random((3, 1, 1, 9)) > 0.3
    mask[0, 0, 0, :] = False  # sequence 0 sees no key: out 0, lse the sink, zero gradients
    options = dict(causal=True, softcap=3.0)
    jq, jk, jv, jbias, jsinks, jdout = _on(cpu, q, k, v, bias, sinks, dout)
    jmask = jax.device_put(mask, cpu)
    out, vjp = jax.vjp(lambda q, k, v, s, b: cj.attention(q, k, v, sinks=s, bias=b, mask=jmask, **options),
                       jq, jk, jv, jsinks, jbias)
    grads = vjp(jdout)
    expected_out, lse = cuflash.attention(q, k, v, sinks=sinks, bias=bias, mask=mask, return_lse=True, **options)
    dq, dk, dv, dbias, dsinks = cuflash.attention_backward(dout, q, k, v, expected_out, lse, sinks=sinks, bias=bias,
                                                           mask=mask, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    assert len(grads) == 5
    for got, want in zip(grads, (dq, dk, dv, dsinks, dbias)):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)
    assert not numpy.asarray(out)[0].any()
    dbias_alone = jax.grad(lambda b: jnp.sum(cj.attention(jq, jk, jv, bias=b, mask=jmask, **options) * jdout))(jbias)
    out_alone, lse_alone = cuflash.attention(q, k, v, bias=bias, mask=mask, return_lse=True, **options)
    expected = cuflash.attention_backward(dout, q, k, v, out_alone, lse_alone, bias=bias, mask=mask, **options)
    numpy.testing.assert_array_equal(numpy.asarray(dbias_alone), expected[3])


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
    replacements = {name: jax.device_put(value, cpu) for name, value in replacements.items()}  # beside q, k, v
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


# --- attention_varlen: packed sequences --------------------------------------------------------

VARLEN_LENGTHS_Q = [5, 0, 1, 9, 4]
VARLEN_LENGTHS_K = [7, 3, 1, 6, 0]


def _varlen_inputs(randn, dtype=numpy.float32, heads_q=4, heads_k=2, d=8, dv=6):
    cu_q = numpy.concatenate([[0], numpy.cumsum(VARLEN_LENGTHS_Q)]).astype(numpy.int32)
    cu_k = numpy.concatenate([[0], numpy.cumsum(VARLEN_LENGTHS_K)]).astype(numpy.int32)
    q = randn(int(cu_q[-1]), heads_q, d, dtype=dtype)
    k, v = randn(int(cu_k[-1]), heads_k, d, dtype=dtype), randn(int(cu_k[-1]), heads_k, dv, dtype=dtype)
    return q, k, v, cu_q, cu_k


VARLEN_OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "top_left_window": {"causal": "top_left", "window": (2, 0), "scale": 0.3},
    "window_softcap": {"window": (1, 2), "softcap": 2.0},
    "alibi_per_sequence_sinks": {"causal": True, "alibi_slopes": "per-sequence", "sinks": True},
    "alibi_sinks_seqused": {"alibi_slopes": "per-head", "sinks": True, "seqused_k": True},
}


def _varlen_arrays(options, rng, dtype):
    """The options with their arrays drawn: ALiBi slopes (Hq,) or (B, Hq), sinks (Hq,), seqused_k."""
    options = dict(options)
    batch = len(VARLEN_LENGTHS_Q)
    if options.get("alibi_slopes") == "per-sequence":
        options["alibi_slopes"] = numpy.abs(rng.standard_normal((batch, 4))).astype(dtype)
    elif options.get("alibi_slopes") == "per-head":
        options["alibi_slopes"] = numpy.abs(rng.standard_normal(4)).astype(dtype)
    if options.get("sinks"):
        options["sinks"] = rng.standard_normal(4).astype(dtype)
    if options.get("seqused_k"):
        options["seqused_k"] = numpy.array([min(n, 3) for n in VARLEN_LENGTHS_K], numpy.int32)
    return options


@pytest.mark.parametrize("case", VARLEN_OPTIONS)
def test_varlen_on_cpu_equals_the_numpy_packed_call(case, cpu, randn, rng):
    """Forward and jax.vjp equal cuflash.attention_varlen and its backward on the same NumPy
    arrays, bit for bit (float32, GQA, empty sequences, Lq_b > Lk_b and < both ways)."""
    q, k, v, cu_q, cu_k = _varlen_inputs(randn)
    options = _varlen_arrays(VARLEN_OPTIONS[case], rng, numpy.float32)
    sinks = options.pop("sinks", None)
    jax_options = {name: _on(cpu, value)[0] if isinstance(value, numpy.ndarray) else value
                   for name, value in options.items()}
    jq, jk, jv, jcu_q, jcu_k = _on(cpu, q, k, v, cu_q, cu_k)
    out, lse = cj.attention_varlen(jq, jk, jv, jcu_q, jcu_k, sinks=None if sinks is None else _on(cpu, sinks)[0],
                                   return_lse=True, **jax_options)
    expected_out, expected_lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True,
                                                          **options)
    assert out.devices() == {cpu} and out.shape == (q.shape[0], 4, 6) and lse.shape == (4, q.shape[0])
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)

    dout = randn(*expected_out.shape)
    if sinks is None:
        primal, vjp = jax.vjp(lambda q, k, v: cj.attention_varlen(q, k, v, jcu_q, jcu_k, **jax_options), jq, jk, jv)
    else:
        primal, vjp = jax.vjp(lambda q, k, v, s: cj.attention_varlen(q, k, v, jcu_q, jcu_k, sinks=s, **jax_options),
                              jq, jk, jv, _on(cpu, sinks)[0])
    numpy.testing.assert_array_equal(numpy.asarray(primal), expected_out)
    grads = vjp(_on(cpu, dout)[0])
    expected = cuflash.attention_varlen_backward(dout, q, k, v, expected_out, expected_lse, cu_q, cu_k, sinks=sinks,
                                                 **options)
    assert len(grads) == len(expected) == (3 if sinks is None else 4)
    for got, want in zip(grads, expected):
        assert got.devices() == {cpu}
        numpy.testing.assert_array_equal(numpy.asarray(got), want)


def _jnp_sequence_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None,
                            sinks=None):
    """One sequence's attention in jax.numpy, float64, differentiable by jax itself: q (Lq, Hq, D),
    k (Lk, Hk, D), v (Lk, Hk, Dv) in the packed layout; cuflash's semantics (bottom-right causal
    and windows unless "top_left", ALiBi on the same diagonal, softcap before ALiBi, sinks a
    value-less logit per head, a row that sees nothing gives 0)."""
    seqlen_q, heads_q, d = q.shape
    seqlen_k, heads_k = k.shape[:2]
    k, v = jnp.repeat(k, heads_q // heads_k, axis=1), jnp.repeat(v, heads_q // heads_k, axis=1)
    scale = d ** -0.5 if scale is None else scale
    s = jnp.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    rows = jnp.arange(seqlen_q)[:, None] + (0 if causal == "top_left" else seqlen_k - seqlen_q)
    cols = jnp.arange(seqlen_k)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes[:, None, None] * jnp.abs(rows - cols)
    visible = jnp.ones((seqlen_q, seqlen_k), bool)
    if causal:
        visible &= cols <= rows
    if window is not None:
        if window[0] >= 0:
            visible &= cols >= rows - window[0]
        if window[1] >= 0:
            visible &= cols <= rows + window[1]
    s = jnp.where(visible, s, -jnp.inf)
    sink = jnp.full((heads_q, seqlen_q, 1), -jnp.inf) if sinks is None else \
        jnp.broadcast_to(sinks[:, None, None], (heads_q, seqlen_q, 1))
    logits = jnp.concatenate([s, sink], axis=-1)
    top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0))
    total = e.sum(axis=-1, keepdims=True)
    p = e[..., :seqlen_k] / jnp.where(total > 0, total, 1)
    return jnp.einsum("hqk,khd->qhd", p, v)


@pytest.mark.parametrize("case", VARLEN_OPTIONS)
def test_varlen_grad_in_float64_against_jax_numpy_per_sequence(case, cpu, randn, rng):
    """jax.grad through cuflash.jax.attention_varlen equals jax.grad through a jax.numpy
    attention applied to each sequence alone (float64, x64 enabled for the test only)."""
    with jax.enable_x64(True):
        q, k, v, cu_q, cu_k = _varlen_inputs(randn, dtype=numpy.float64)
        options = _varlen_arrays(VARLEN_OPTIONS[case], rng, numpy.float64)
        sinks = options.pop("sinks", numpy.zeros(0))  # empty: no sinks (the loss still takes four arrays)
        seqused = options.pop("seqused_k", None)
        dout = rng.standard_normal((q.shape[0], 4, 6))
        jq, jk, jv, jsinks, jdout, jcu_q, jcu_k = _on(cpu, q, k, v, sinks, dout, cu_q, cu_k)
        jax_options = {name: _on(cpu, value)[0] if isinstance(value, numpy.ndarray) else value
                       for name, value in options.items()}
        jseqused = None if seqused is None else _on(cpu, seqused)[0]

        def ours(q, k, v, sinks):
            out = cj.attention_varlen(q, k, v, jcu_q, jcu_k, seqused_k=jseqused, max_seqlen_q=9,
                                      max_seqlen_k=numpy.int64(7), sinks=sinks if sinks.size else None, **jax_options)
            return jnp.sum(out * jdout), out

        def reference(q, k, v, sinks):
            slopes = jax_options.get("alibi_slopes")
            outs = []
            for b in range(len(VARLEN_LENGTHS_Q)):
                used = VARLEN_LENGTHS_K[b] if seqused is None else int(seqused[b])
                rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b]) + used)
                per_sequence = dict(jax_options, alibi_slopes=None if slopes is None else
                                    (slopes[b] if slopes.ndim == 2 else slopes))
                outs.append(_jnp_sequence_attention(q[rows], k[keys], v[keys], sinks=sinks if sinks.size else None,
                                                    **per_sequence))
            out = jnp.concatenate(outs)
            return jnp.sum(out * jdout), out

        (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3), has_aux=True)(jq, jk, jv, jsinks)
        (_, expected_out), expected = jax.value_and_grad(reference, argnums=(0, 1, 2, 3), has_aux=True)(
            jq, jk, jv, jsinks)
        assert out.dtype == jnp.float64
        numpy.testing.assert_allclose(numpy.asarray(out), numpy.asarray(expected_out), rtol=1e-12, atol=1e-13)
        for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, expected):
            assert got.shape == want.shape, name
            numpy.testing.assert_allclose(numpy.asarray(got), numpy.asarray(want), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cu_seqlens_q="numpy"), TypeError, "cu_seqlens_q must be a jax.Array"),
    (dict(cu_seqlens_k="floats"), TypeError, "cu_seqlens_k must be a 1-D int32 array, got 1-D float32"),
    (dict(cu_seqlens_q="short"), ValueError, "cu_seqlens_k must have 2 entries, got 3"),
    (dict(seqused_k="numpy"), TypeError, "seqused_k must be a jax.Array"),
    (dict(seqused_k="too-many"), ValueError, "seqused_k must be between 0 and each sequence's key count"),
    (dict(max_seqlen_q=3), ValueError, r"max_seqlen_q = 3 is smaller than the longest sequence \(4\)"),
    (dict(max_seqlen_k=2.0), TypeError, "max_seqlen_k must be an int"),
    (dict(window=(3, 2), causal=True), ValueError, "window right must be 0 or -1 with causal"),
    (dict(alibi_slopes="numpy"), TypeError, "alibi_slopes must be a jax.Array"),
    (dict(sinks="shape"), ValueError, "sinks must broadcast"),
    (dict(deterministic=1), TypeError, "deterministic must be a bool, got int"),
    (dict(return_lse="no"), TypeError, "return_lse must be a bool, got str"),
], ids=["cu-numpy", "cu-float", "cu-short", "seqused-numpy", "seqused-values", "hint-small", "hint-float",
        "causal-window", "alibi-numpy", "sinks-shape", "deterministic", "return-lse"])
def test_varlen_errors_name_the_argument(cpu, randn, kwargs, error, match):
    q, k, v = _on(cpu, randn(6, 4, 8), randn(7, 2, 8), randn(7, 2, 8))
    arguments = dict(cu_seqlens_q=numpy.array([0, 4, 6], numpy.int32), cu_seqlens_k=numpy.array([0, 3, 7], numpy.int32))
    replacements = {"numpy": numpy.ones(4, numpy.float32), "floats": numpy.array([0, 3, 7], numpy.float32),
                    "short": numpy.array([0, 6], numpy.int32), "too-many": numpy.array([4, 4], numpy.int32),
                    "shape": numpy.ones(3, numpy.float32)}
    for name, value in kwargs.items():
        value = replacements.get(value, value) if isinstance(value, str) and name != "causal" else value
        arguments[name] = value
    numpy_arguments = {"cu_seqlens_q", "cu_seqlens_k", "seqused_k", "alibi_slopes", "sinks"}
    for name in numpy_arguments & arguments.keys():
        if not (kwargs.get(name) == "numpy"):
            arguments[name] = _on(cpu, arguments[name])[0]
    with pytest.raises(error, match=match):
        cj.attention_varlen(q, k, v, arguments.pop("cu_seqlens_q"), arguments.pop("cu_seqlens_k"), **arguments)


def test_varlen_under_jit_needs_int_hints_and_names_the_argument(cpu, randn):
    q = _on(cpu, randn(6, 2, 8))[0]
    cu = _on(cpu, numpy.array([0, 2, 6], numpy.int32))[0]
    with pytest.raises(TypeError, match="q is a JAX tracer: .* with max_seqlen_q and max_seqlen_k given as ints"):
        jax.jit(lambda q: cj.attention_varlen(q, q, q, cu, cu))(q)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int under jax.jit"):
        jax.jit(lambda cu: cj.attention_varlen(q, q, q, cu, cu))(cu)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int under jax.jit"):
        jax.jit(lambda cu: cj.attention_varlen(q, q, q, cu, cu, max_seqlen_q=4))(cu)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D int32 array"):
        jax.jit(lambda cu: cj.attention_varlen(q, q, q, cu, cu.astype(jnp.float32), max_seqlen_q=4,
                                               max_seqlen_k=4))(cu)
    with pytest.raises(ValueError, match="cu_seqlens_k must have 3 entries"):
        jax.jit(lambda cu: cj.attention_varlen(q, q, q, cu, cu[:2], max_seqlen_q=4, max_seqlen_k=4))(cu)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a jax.Array, got NoneType"):
        cj.attention_varlen(q, q, q, cu, None)


@pytest.mark.parametrize("case", ["plain", "causal", "alibi_sinks_seqused"])
def test_varlen_under_jit_equals_the_numpy_packed_call(cpu, randn, case):
    """Under jax.jit the lengths are traced (a custom call, its lengths read when run on the CPU):
    out, lse and the gradients into q, k, v (and sinks) are cuflash's own packed call's on the
    same NumPy arrays, bit for bit."""
    q, k, v, cu_q, cu_k = _varlen_inputs(randn)
    options = dict(VARLEN_OPTIONS[case])
    extra = {}
    if options.pop("sinks", False):
        extra["sinks"] = randn(4)
    if options.pop("alibi_slopes", None) == "per-head":
        extra["alibi_slopes"] = numpy.abs(randn(4))
    if options.pop("seqused_k", False):
        extra["seqused_k"] = numpy.minimum(numpy.diff(cu_k), 2).astype(numpy.int32)
    options.update(max_seqlen_q=int(max(VARLEN_LENGTHS_Q)), max_seqlen_k=int(max(VARLEN_LENGTHS_K)))
    dout = randn(q.shape[0], 4, 6)
    arrays = dict(zip(("q", "k", "v", "cu_q", "cu_k"), _on(cpu, q, k, v, cu_q, cu_k)))
    jextra = {name: _on(cpu, x)[0] for name, x in extra.items()}

    def attend(a, e, **kwargs):  # (a pytree dict comes back from jit in sorted key order)
        return cj.attention_varlen(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], **e, **options, **kwargs)

    out, lse = jax.jit(lambda a, e: attend(a, e, return_lse=True))(arrays, jextra)
    expected_out, expected_lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **extra, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)
    wrt = ("q", "k", "v") + (("sinks",) if "sinks" in extra else ())

    def loss(diff, a, e):
        a = dict(a, **{n: diff[n] for n in ("q", "k", "v")})
        e = dict(e, **({"sinks": diff["sinks"]} if "sinks" in diff else {}))
        return jnp.sum(attend(a, e) * dout)

    grads = jax.jit(jax.grad(loss))({n: arrays[n] if n in arrays else jextra[n] for n in wrt}, arrays, jextra)
    expected = cuflash.attention_varlen_backward(dout, q, k, v, expected_out, expected_lse, cu_q, cu_k, **extra,
                                                 **options)
    for name, want in zip(wrt, expected):
        numpy.testing.assert_array_equal(numpy.asarray(grads[name]), want, err_msg=name)


def test_varlen_deterministic_backward_and_bfloat16_on_cpu(cpu, randn):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v, cu_q, cu_k = _varlen_inputs(randn, dtype=ml_dtypes.bfloat16)
    jq, jk, jv, jcu_q, jcu_k = _on(cpu, q, k, v, cu_q, cu_k)
    out = cj.attention_varlen(jq, jk, jv, jcu_q, jcu_k, causal=True)
    assert out.dtype == jnp.bfloat16
    numpy.testing.assert_array_equal(numpy.asarray(out), cuflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True))

    def loss(q, k, v):
        return jnp.sum(cj.attention_varlen(q, k, v, jcu_q, jcu_k, causal=True, deterministic=True)
                       .astype(jnp.float32) ** 2)

    first, second = (jax.grad(loss, argnums=(0, 1, 2))(jq, jk, jv) for _ in range(2))
    for a, b in zip(first, second):
        assert a.dtype == jnp.bfloat16
        numpy.testing.assert_array_equal(numpy.asarray(a), numpy.asarray(b))


@pytest.mark.gpu
def test_varlen_on_the_gpu(gpu, randn):
    import cupy

    q, k, v, cu_q, cu_k = _varlen_inputs(randn)
    dout = randn(q.shape[0], 4, 6)
    jq, jk, jv, jcu_q, jcu_k, jdout = _on(gpu, q, k, v, cu_q, cu_k, dout)
    out, lse = cj.attention_varlen(jq, jk, jv, jcu_q, jcu_k, causal=True, return_lse=True)
    assert out.devices() == {gpu} and lse.devices() == {gpu}
    expected_out, expected_lse = cuflash.attention_varlen(*(cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)),
                                                          causal=True, return_lse=True)
    numpy.testing.assert_array_equal(numpy.asarray(out), cupy.asnumpy(expected_out))
    grads = jax.grad(lambda q, k, v: jnp.sum(cj.attention_varlen(q, k, v, jcu_q, jcu_k, causal=True) * jdout),
                     argnums=(0, 1, 2))(jq, jk, jv)
    expected = cuflash.attention_varlen_backward(*(cupy.asarray(x) for x in (dout, q, k, v)), expected_out,
                                                 expected_lse, cupy.asarray(cu_q), cupy.asarray(cu_k), causal=True)
    for got, want in zip(grads, expected):
        assert got.devices() == {gpu}
        numpy.testing.assert_array_equal(numpy.asarray(got), cupy.asnumpy(want))


@pytest.mark.gpu
def test_varlen_under_jit_on_the_gpu(gpu, randn):
    """Traced lengths on the GPU (both hints given: trusted, not read): the kernels on XLA's
    buffers, out and the gradients as the eager CuPy call's."""
    import cupy

    q, k, v, cu_q, cu_k = _varlen_inputs(randn)
    dout = randn(q.shape[0], 4, 6)
    hints = dict(max_seqlen_q=int(max(VARLEN_LENGTHS_Q)), max_seqlen_k=int(max(VARLEN_LENGTHS_K)))
    jq, jk, jv, jcu_q, jcu_k, jdout = _on(gpu, q, k, v, cu_q, cu_k, dout)
    attend = jax.jit(lambda q, k, v, cu_q, cu_k: cj.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True,
                                                                     **hints))
    out, lse = attend(jq, jk, jv, jcu_q, jcu_k)
    assert out.devices() == {gpu} and lse.devices() == {gpu}
    arrays = [cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    expected_out, expected_lse = cuflash.attention_varlen(*arrays, causal=True, return_lse=True, **hints)
    numpy.testing.assert_array_equal(numpy.asarray(out), cupy.asnumpy(expected_out))
    numpy.testing.assert_array_equal(numpy.asarray(lse), cupy.asnumpy(expected_lse))
    loss = jax.jit(jax.grad(lambda q, k, v, cu_q, cu_k: jnp.sum(cj.attention_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                                                    **hints) * jdout),
                            argnums=(0, 1, 2)))
    grads = loss(jq, jk, jv, jcu_q, jcu_k)
    expected = cuflash.attention_varlen_backward(cupy.asarray(dout), *arrays[:3], expected_out, expected_lse,
                                                 *arrays[3:], causal=True, **hints)
    for got, want in zip(grads, expected):
        assert got.devices() == {gpu}
        numpy.testing.assert_array_equal(numpy.asarray(got), cupy.asnumpy(want))


# --- attention dropout: a JAX PRNG key as the seed ----------------------------------------------

def _key_seed(key):
    """The 64-bit seed cuflash.jax documents for a PRNG key: jax.random.bits(key, (2,), uint32),
    high word first."""
    high, low = (int(w) for w in numpy.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    return high << 32 | low


SEEDS = {"typed-key": lambda: jax.random.key(11), "raw-key": lambda: jax.random.PRNGKey(11),
         "int": lambda: 2**63 + 12345}


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seed_kind", SEEDS)
def test_dropout_takes_a_key_and_drops_as_cuflash_with_its_seed(cpu, randn, seed_kind, traced):
    """out, lse and the gradients into q, k, v, sinks and bias equal cuflash's NumPy call with the
    key's seed, bit for bit, eagerly and under jit (a traced key: a custom-call operand); another
    key drops other elements, and the call differs from the undropped one."""
    q, k, v, dout = randn(2, 4, 9, 8), randn(2, 2, 11, 8), randn(2, 2, 11, 6), randn(2, 4, 9, 6)
    sinks, bias = randn(4), randn(1, 4, 9, 11)
    seed = SEEDS[seed_kind]()
    number = seed if isinstance(seed, int) else _key_seed(seed)
    options = dict(causal=True, softcap=4.0, dropout_p=0.3)

    def attend(q, k, v, sinks, bias, seed, **kwargs):
        return cj.attention(q, k, v, sinks=sinks, bias=bias, dropout_seed=seed, **options, **kwargs)

    def forward(*arrays_and_seed):
        if traced and isinstance(arrays_and_seed[-1], int):  # an int seed: a constant of the trace
            return jax.jit(lambda *a: attend(*a, arrays_and_seed[-1], return_lse=True))(*arrays_and_seed[:-1])
        return (jax.jit if traced else (lambda f: f))(lambda *a: attend(*a, return_lse=True))(*arrays_and_seed)

    arrays = _on(cpu, q, k, v, sinks, bias)
    out, lse = forward(*arrays, seed)
    expected_out, expected_lse = cuflash.attention(q, k, v, sinks=sinks, bias=bias, dropout_seed=number,
                                                   return_lse=True, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)
    assert not numpy.array_equal(expected_out, cuflash.attention(q, k, v, sinks=sinks, bias=bias, causal=True,
                                                                 softcap=4.0))
    other = jax.random.key(12) if not isinstance(seed, int) else 7
    assert not numpy.array_equal(numpy.asarray(forward(*arrays, other)[0]), expected_out)

    def loss(q, k, v, sinks, bias):
        return jnp.sum(attend(q, k, v, sinks, bias, seed) * dout)

    gradient = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    grads = (jax.jit(gradient) if traced else gradient)(*arrays)
    dq, dk, dv, dbias, dsinks = cuflash.attention_backward(dout, q, k, v, expected_out, expected_lse, sinks=sinks,
                                                           bias=bias, dropout_seed=number, **options)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks", "dbias"), grads, (dq, dk, dv, dsinks, dbias)):
        numpy.testing.assert_array_equal(numpy.asarray(got), want, err_msg=name)


@pytest.mark.parametrize("fallback", [False, True], ids=["custom-call", "pure-callback"])
def test_dropout_under_vmap_each_item_drops_as_it_would_alone(cpu, randn, monkeypatch, fallback):
    """vmap over keys (and over q with one shared key): item i is the call on item i alone, forward
    and jax.grad (a dropping call runs item by item: its mask is indexed by the item's own rows)."""
    if fallback:
        monkeypatch.setattr(cj._xla, "available", lambda jax: False)
    q, k, v, dout = randn(3, 2, 5, 8), randn(2, 7, 8), randn(2, 7, 8), randn(3, 2, 5, 8)
    keys = jax.random.split(jax.random.key(3), 3)
    jq, jk, jv, jdout = _on(cpu, q, k, v, dout)

    def attend(q, key):
        return cj.attention(q, jk, jv, dropout_p=0.25, dropout_seed=key)

    batched = jax.jit(jax.vmap(attend))(jq, keys)
    shared = jax.vmap(attend, in_axes=(0, None))(jq, keys[0])
    grads = jax.vmap(jax.grad(lambda q, key, d: jnp.sum(attend(q, key) * d)))(jq, keys, jdout)
    for i in range(3):
        numpy.testing.assert_array_equal(numpy.asarray(batched[i]), numpy.asarray(attend(jq[i], keys[i])))
        numpy.testing.assert_array_equal(numpy.asarray(shared[i]), numpy.asarray(attend(jq[i], keys[0])))
        alone = jax.grad(lambda q: jnp.sum(attend(q, keys[i]) * jdout[i]))(jq[i])
        numpy.testing.assert_array_equal(numpy.asarray(grads[i]), numpy.asarray(alone))
    assert not numpy.array_equal(numpy.asarray(batched[0]), numpy.asarray(attend(jq[0], keys[1])))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
def test_dropout_in_packed_sequences_drops_as_cuflash_with_the_keys_seed(cpu, randn, traced):
    """attention_varlen with a key: out, lse and the gradients into q, k, v equal cuflash's packed
    NumPy call with the key's seed, bit for bit (under jit the key and the lengths are traced)."""
    q, k, v, cu_q, cu_k = _varlen_inputs(randn)
    dout = randn(q.shape[0], 4, 6)
    key = jax.random.key(21)
    options = dict(causal=True, dropout_p=0.2)
    if traced:
        options.update(max_seqlen_q=int(max(VARLEN_LENGTHS_Q)), max_seqlen_k=int(max(VARLEN_LENGTHS_K)))
    jq, jk, jv, jcu_q, jcu_k, jdout = _on(cpu, q, k, v, cu_q, cu_k, dout)

    def attend(q, k, v, cu_q, cu_k, key, **kwargs):
        return cj.attention_varlen(q, k, v, cu_q, cu_k, dropout_seed=key, **options, **kwargs)

    forward = lambda *a: attend(*a, return_lse=True)  # noqa: E731
    out, lse = (jax.jit(forward) if traced else forward)(jq, jk, jv, jcu_q, jcu_k, key)
    expected_out, expected_lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, dropout_seed=_key_seed(key),
                                                          return_lse=True, **options)
    numpy.testing.assert_array_equal(numpy.asarray(out), expected_out)
    numpy.testing.assert_array_equal(numpy.asarray(lse), expected_lse)
    assert not numpy.array_equal(expected_out, cuflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True))
    gradient = jax.grad(lambda q, k, v, *rest: jnp.sum(attend(q, k, v, *rest) * jdout), argnums=(0, 1, 2))
    grads = (jax.jit(gradient) if traced else gradient)(jq, jk, jv, jcu_q, jcu_k, key)
    expected = cuflash.attention_varlen_backward(dout, q, k, v, expected_out, expected_lse, cu_q, cu_k,
                                                 dropout_seed=_key_seed(key), **options)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        numpy.testing.assert_array_equal(numpy.asarray(got), want, err_msg=name)


def test_dropout_misuse_names_the_argument(cpu, randn):
    """A traced rate, a traced integer seed, a missing seed, an array that is not one key, and a
    traced key for a packed call without its hints: TypeErrors naming the argument."""
    q = _on(cpu, randn(2, 5, 4))[0]
    cu = _on(cpu, numpy.array([0, 2, 5], numpy.int32))[0]
    key = jax.random.key(0)
    cases = [
        (lambda: jax.jit(lambda q, p: cj.attention(q, q, q, dropout_p=p, dropout_seed=key))(q, 0.1),
         "dropout_p must be a Python float"),
        (lambda: jax.jit(lambda q, s: cj.attention(q, q, q, dropout_p=0.1, dropout_seed=s))(q, 3),
         "dropout_seed under jax.jit, vmap or grad must be a JAX PRNG key"),
        (lambda: cj.attention(q, q, q, dropout_p=0.1), "dropout_seed is required when dropout_p > 0"),
        (lambda: cj.attention(q, q, q, dropout_p=0.1, dropout_seed=jnp.ones(3, jnp.uint32)),
         "dropout_seed must be one JAX PRNG key or an int"),
        (lambda: cj.attention(q, q, q, dropout_p=0.1, dropout_seed=jax.random.split(key, 2)),
         "dropout_seed must be one JAX PRNG key or an int"),
        (lambda: cj.attention(q, q, q, dropout_p=0.1, dropout_seed=-1), "dropout_seed must be in"),
        (lambda: jax.jit(lambda q, s: cj.attention_varlen(q[0], q[0], q[0], cu, cu, dropout_p=0.1,
                                                          dropout_seed=s))(q, key),
         "dropout_seed is a JAX tracer"),
    ]
    for call, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            call()
    cj.attention(q, q, q, dropout_p=0.1, dropout_seed=jnp.asarray(5))  # a concrete 0-d integer array is an int


@pytest.mark.gpu
def test_dropout_on_the_gpu_drops_as_cupy_with_the_keys_seed(gpu, randn):
    """On a GPU, eagerly and under jit (the key's words read from XLA's buffer on its stream):
    out and the gradients equal cuflash's CuPy call with the key's seed."""
    import cupy

    q, k, v, dout = randn(2, 4, 97, 64), randn(2, 2, 130, 64), randn(2, 2, 130, 64), randn(2, 4, 97, 64)
    key = jax.random.key(5)
    options = dict(causal=True, dropout_p=0.15)
    arrays = [cupy.asarray(x) for x in (q, k, v, dout)]
    expected_out, expected_lse = cuflash.attention(*arrays[:3], dropout_seed=_key_seed(key), return_lse=True,
                                                   **options)
    expected = cuflash.attention_backward(arrays[3], *arrays[:3], expected_out, expected_lse,
                                          dropout_seed=_key_seed(key), **options)
    jq, jk, jv, jdout = _on(gpu, q, k, v, dout)
    key = jax.device_put(key, gpu)
    for run in (lambda f: f, jax.jit):
        out = run(lambda q, k, v, key: cj.attention(q, k, v, dropout_seed=key, **options))(jq, jk, jv, key)
        assert out.devices() == {gpu}
        numpy.testing.assert_array_equal(numpy.asarray(out), cupy.asnumpy(expected_out))
        grads = run(jax.grad(lambda q, k, v, key: jnp.sum(cj.attention(q, k, v, dropout_seed=key, **options) * jdout),
                             argnums=(0, 1, 2)))(jq, jk, jv, key)
        for got, want in zip(grads, expected):
            numpy.testing.assert_array_equal(numpy.asarray(got), cupy.asnumpy(want))


@pytest.mark.parametrize("plugin", [True, False])
def test_the_helper_imports_cupy_ahead_where_jax_has_a_cuda_plugin(tmp_path, plugin):
    """With a CUDA plugin of JAX installed (a stand-in module here), importing cuflash.jax starts
    CuPy's import on the daemon thread cuflash.torch starts (kernels.import_ahead); without one,
    nothing starts."""
    import subprocess
    import sys

    pytest.importorskip("cupy")
    if plugin:
        (tmp_path / "jax_cuda13_plugin.py").write_text("")
    code = ("import sys, threading, cuflash.jax\nfrom cuflash._gpu import kernels\n"
            "thread = kernels._IMPORT_AHEAD\n"
            "assert [t for t in threading.enumerate() if t.name == 'cuflash-import-ahead'] in ([], [thread])\n"
            "thread is None or thread.join(120)\n"
            "print(thread is not None, 'cupy' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(plugin), str(plugin)]
