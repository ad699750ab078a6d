"""Tensors above 2^31 elements on the GPU (issue 19): every offset the kernels form is 64-bit.

q, k, v, out and every gradient hold more than 2^31 elements (bf16, 4.4 GB each); a narrow causal
window keeps the work small, so the test is about addressing, not speed. Rows and keys whose
element offsets lie beyond 2^31 are checked against the float64 reference of their window,
forward and backward (the atomic and the deterministic dQ), under tolerance.py's rule.
"""
from __future__ import annotations

import numpy
import pytest

from reference import attention_backward_ref, attention_backward_ref_dtype, attention_ref, attention_ref_dtype
from tolerance import assert_close

pytestmark = pytest.mark.gpu

# (B, H, L, D): B*H*L*D = 2.21e9 > 2^31 = 2.15e9; the window keeps each row to 33 keys.
SHAPE = (64, 32, 8448, 128)
LEFT = 32
SPAN = 96  # query rows per checked window slice


def _bf16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


def _random_bf16(cupy, shape, seed):
    """A bf16 GPU array of standard-normal values (float32 draws cut to their upper 16 bits: CuPy
    has no bfloat16 arithmetic), a batch element at a time (no 8.8 GB float32 temporary)."""
    out = cupy.empty(shape, dtype=_bf16())
    bits = out.view(cupy.uint16)
    generator = cupy.random.default_rng(seed)
    for b in range(shape[0]):
        draw = generator.standard_normal(shape[1:], dtype=numpy.float32)
        bits[b] = (draw.view(cupy.uint32) >> 16).astype(cupy.uint16)
    return out


def _slice(x, b, h, rows):
    return x[b, h, rows].get().astype(numpy.float64)


@pytest.mark.parametrize("deterministic", [False, True])
def test_tensors_above_2_31_elements(deterministic):
    cupy = pytest.importorskip("cupy")
    import cuflash

    free = cupy.cuda.Device().mem_info[0]
    element_bytes = 2 * numpy.prod(SHAPE)
    if free < 12 * element_bytes:  # 8 tensors of the shape plus dq_accum (fp32) and slack
        pytest.skip(f"needs {12 * element_bytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    assert numpy.prod(SHAPE) > 2**31
    q, k, v, dout = (_random_bf16(cupy, SHAPE, seed) for seed in range(4))
    window = (LEFT, 0)
    out, lse = cuflash.attention(q, k, v, window=window, causal=True, return_lse=True)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, window=window, causal=True,
                                            deterministic=deterministic)
    cupy.cuda.Device().synchronize()

    length = SHAPE[2]
    # The last head of the last batch element: every element offset there is beyond 2^31.
    b, h = SHAPE[0] - 1, SHAPE[1] - 1
    assert ((b * SHAPE[1] + h) * length) * SHAPE[3] > 2**31
    for start in (LEFT, length // 2, length - SPAN):
        rows = slice(start, start + SPAN)
        keys = slice(start - LEFT, start + SPAN)
        # In the slice, key c is visible to query a iff a <= c <= a + LEFT: bottom-right causal
        # alignment (Lk - Lq = LEFT) with the same left window.
        host = [_slice(x, b, h, s) for x, s in ((q, rows), (k, keys), (v, keys), (dout, rows))]
        ref_out, ref_lse = attention_ref(*host[:3], causal=True, window=window)
        base_out, _ = attention_ref_dtype(*host[:3], _bf16(), causal=True, window=window)
        assert_close(_slice(out, b, h, rows), ref_out, dtype=_bf16(), baseline=base_out, name="out")
        assert_close(lse[b, h, rows].get(), ref_lse, dtype=numpy.float32, baseline=None, kind="lse", name="lse")
        ref_grads = attention_backward_ref(host[3], *host[:3], causal=True, window=window)
        base_grads = attention_backward_ref_dtype(host[3], *host[:3], _bf16(), causal=True, window=window)
        assert_close(_slice(dq, b, h, rows), ref_grads[0], dtype=_bf16(), baseline=base_grads[0], kind="grad",
                     name="dq")
        # dK, dV of the keys whose every query lies in the slice: [start, start + SPAN - LEFT)
        complete = slice(LEFT, SPAN)
        for name, grad, ref, base in (("dk", dk, ref_grads[1], base_grads[1]), ("dv", dv, ref_grads[2], base_grads[2])):
            actual = _slice(grad, b, h, slice(start, start + SPAN - LEFT))
            assert_close(actual, ref[complete], dtype=_bf16(), baseline=base[complete], kind="grad", name=name)
