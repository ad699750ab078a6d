"""cuflash.merge_attention (and cuflash.torch.merge_attention): S partial attentions over disjoint
key sets merged into the attention over their union.

The references are real attention problems: the keys of (q, k, v) are split into 1..8 disjoint
parts, cuflash.attention (NumPy backend, in the test's dtype) gives each part's out and lse, and
the merge must equal the float64 dense attention over all the keys (tests/reference.py) within
tests/tolerance.py's rule. Causal problems split the keys into contiguous ranges: a range
[a, b) of Lk keys keeps the union's bottom-right causal mask as ``window=(-1, Lk - b)`` on its
own keys, so rows that see none of a part's keys (lse -inf in that part) come up naturally, and
with Lq > Lk rows that see no key at all.

GPU tests are marked ``gpu`` (skipped without one): the same references on CuPy arrays, every
layout the kernel reads in place or copies, and agreement with the CPU backend. The kernel's
offline NVRTC compile for sm_80 and sm_90a and its argument struct's layout need no GPU.
"""
from __future__ import annotations

import ml_dtypes
import numpy
import pytest

import cuflash
from reference import attention_ref, attention_ref_dtype, dtype_of as _dtype, lse_dtype_of as _lse_dtype, to_numpy
from tolerance import EPS, assert_close

DTYPES = ["float16", "bfloat16", "float32", "float64"]
BF16 = numpy.dtype(ml_dtypes.bfloat16)


def split_problem(rng, dtype, lead, lq, lk, d, dv, parts, causal):
    """(q, k, v) as float64 copies of the dtype's values, and the parts' (outs, lses) lists from
    cuflash.attention on NumPy over disjoint key sets: contiguous ranges (possibly empty) when
    causal, any sets otherwise."""
    dtype = _dtype(dtype)
    q, k, v = (rng.standard_normal(lead + shape).astype(dtype) for shape in ((lq, d), (lk, d), (lk, dv)))
    if causal:
        cuts = numpy.sort(rng.integers(0, lk + 1, parts - 1))
        bounds = numpy.concatenate([[0], cuts, [lk]])
        keys = [(numpy.arange(a, b), dict(window=(-1, lk - int(b)))) for a, b in zip(bounds, bounds[1:])]
    else:
        owner = rng.integers(0, parts, lk)
        keys = [(numpy.flatnonzero(owner == s), {}) for s in range(parts)]
    outs, lses = [], []
    for index, options in keys:
        out, lse = cuflash.attention(q, k[..., index, :], v[..., index, :], return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
    return [x.astype(numpy.float64) for x in (q, k, v)], outs, lses


def check_against_union(dtype, exact, out, lse, causal):
    """out and lse against the float64 attention over all the keys (tests/tolerance.py)."""
    ref_out, ref_lse = attention_ref(*exact, causal=causal)
    baseline = None
    if dtype in ("float16", "bfloat16"):
        baseline = attention_ref_dtype(*exact, _dtype(dtype), causal=causal)[0]
    assert out.dtype == _dtype(dtype) and lse.dtype == _lse_dtype(dtype)
    assert_close(out, ref_out, dtype=_dtype(dtype), baseline=baseline, kind="out", name="out")
    assert_close(lse, ref_lse, dtype=_lse_dtype(dtype), kind="lse", name="lse")


CASES = {
    # name: (leading axes, Lq, Lk, D, Dv, parts, causal)
    "lq1_dv3": ((), 1, 40, 8, 3, 3, False),
    "lq97_dv59_causal": ((2,), 97, 130, 16, 59, 5, True),
    "dv1_8parts": ((2, 3), 17, 64, 8, 1, 8, False),
    "three_lead_axes_causal": ((2, 2, 2), 9, 33, 4, 8, 2, True),
    "lq_gt_lk_causal_rows_see_nothing": ((3,), 20, 12, 8, 16, 4, True),
    "one_part": ((2,), 33, 50, 32, 32, 1, False),
    "many_parts_causal": ((1, 2), 40, 40, 8, 64, 8, True),
}


def _case_problem(rng, dtype, case):
    lead, lq, lk, d, dv, parts, causal = CASES[case]
    exact, outs, lses = split_problem(rng, dtype, lead, lq, lk, d, dv, parts, causal)
    return exact, outs, lses, causal


# --- CPU: against the float64 union ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_merge_equals_attention_over_the_union(rng, dtype, case):
    exact, outs, lses, causal = _case_problem(rng, dtype, case)
    stacked = numpy.stack(outs), numpy.stack(lses)
    copies = [x.copy() for x in stacked]
    out, lse = cuflash.merge_attention(*stacked)
    check_against_union(dtype, exact, out, lse, causal)
    for before, after in zip(copies, stacked):
        numpy.testing.assert_array_equal(before, after)  # nothing the caller owns is touched


def test_rows_that_see_no_key_give_zero_and_minus_inf(rng):
    # Lq > Lk, bottom-right causal: rows 0..Lq-Lk-1 see no key in any part.
    exact, outs, lses = split_problem(rng, "float32", (2,), 12, 5, 4, 6, 3, True)
    out, lse = cuflash.merge_attention(outs, lses)
    assert (numpy.stack(lses)[:, :, :7] == -numpy.inf).all()
    assert (out[:, :7] == 0).all() and (lse[:, :7] == -numpy.inf).all()
    assert numpy.isfinite(lse[:, 7:]).all()
    # A part that holds no key at all, whatever its out says, does not count.
    garbage = numpy.full_like(outs[0], numpy.nan)
    out2, lse2 = cuflash.merge_attention(outs + [garbage], lses + [numpy.full_like(lses[0], -numpy.inf)])
    numpy.testing.assert_array_equal(out2, out)
    numpy.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences_and_views_equal_the_stacked_arrays(rng, dtype):
    _, outs, lses = split_problem(rng, dtype, (2, 3), 7, 30, 8, 5, 4, False)
    expected = cuflash.merge_attention(numpy.stack(outs), numpy.stack(lses))
    stacked_outs, stacked_lses = numpy.stack(outs), numpy.stack(lses)
    # (S, B, Lq, H, Dv) in memory, passed as a (S, B, H, Lq, Dv) view; reversed parts and rows.
    transposed = numpy.ascontiguousarray(stacked_outs.transpose(0, 1, 3, 2, 4)).transpose(0, 1, 3, 2, 4)
    reversed_outs = stacked_outs[::-1, :, :, ::-1].copy()[::-1, :, :, ::-1]
    reversed_lses = stacked_lses[::-1, :, :, ::-1].copy()[::-1, :, :, ::-1]
    for args in ((outs, lses), (tuple(outs), tuple(lses)), (outs, stacked_lses), (stacked_outs, lses),
                 (transposed, stacked_lses), (reversed_outs, reversed_lses), (list(transposed), lses)):
        out, lse = cuflash.merge_attention(*args)
        numpy.testing.assert_array_equal(out, expected[0])
        numpy.testing.assert_array_equal(lse, expected[1])


def test_one_part_is_the_part_itself(rng):
    out_part = rng.standard_normal((3, 4, 6))
    lse_part = rng.standard_normal((3, 4))
    lse_part[1, 2] = -numpy.inf
    out_part[1, 2] = 0  # as attention gives a row that sees nothing
    out, lse = cuflash.merge_attention([out_part], [lse_part])
    numpy.testing.assert_allclose(out, out_part, rtol=1e-15, atol=0)
    numpy.testing.assert_array_equal(lse, lse_part)


def test_far_apart_lses_neither_overflow_nor_lose_the_large_part(rng):
    outs = rng.standard_normal((2, 3, 4)).astype(numpy.float32)
    lses = numpy.array([[80.0, -80.0, 1e4], [-80.0, 80.0, -1e4]], dtype=numpy.float32)
    out, lse = cuflash.merge_attention(outs, lses)
    numpy.testing.assert_allclose(out, [outs[0, 0], outs[1, 1], outs[0, 2]], rtol=1e-6)
    numpy.testing.assert_allclose(lse, [80.0, 80.0, 1e4], rtol=1e-6)


def test_nan_stays_in_its_row(rng):
    outs = rng.standard_normal((3, 2, 6, 5))
    lses = rng.standard_normal((3, 2, 6))
    clean = cuflash.merge_attention(outs, lses)
    outs[1, 0, 2, 3] = numpy.nan  # one entry of a part's out: that entry of the row
    lses[2, 1, 4] = numpy.nan     # a part's lse: its whole row, out and lse
    out, lse = cuflash.merge_attention(outs, lses)
    nan_out = numpy.zeros(out.shape, bool)
    nan_out[0, 2, 3] = True
    nan_out[1, 4, :] = True
    nan_lse = numpy.zeros(lse.shape, bool)
    nan_lse[1, 4] = True
    numpy.testing.assert_array_equal(numpy.isnan(out), nan_out)
    numpy.testing.assert_array_equal(numpy.isnan(lse), nan_lse)
    numpy.testing.assert_array_equal(out[~nan_out], clean[0][~nan_out])
    numpy.testing.assert_array_equal(lse[~nan_lse], clean[1][~nan_lse])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 5, 0), (3, 0, 2, 4)], ids=["lq0", "dv0", "lead0"])
def test_empty_axes(rng, dtype, shape):
    outs = rng.standard_normal(shape).astype(_dtype(dtype))
    lses = rng.standard_normal(shape[:-1]).astype(_lse_dtype(dtype))
    out, lse = cuflash.merge_attention(outs, lses)
    assert out.shape == shape[1:] and out.dtype == _dtype(dtype)
    assert lse.shape == shape[1:-1] and lse.dtype == _lse_dtype(dtype)
    expected = numpy.log(numpy.exp(lses.astype(numpy.float64)).sum(axis=0))  # Dv = 0 still has rows
    numpy.testing.assert_allclose(lse, expected, rtol=1e-6, atol=1e-6)


# --- argument errors -------------------------------------------------------------------------


def _arrays(rng, s=3, lead=(2,), lq=5, dv=4, dtype=numpy.float32, lse_dtype=numpy.float32):
    outs = rng.standard_normal((s,) + lead + (lq, dv)).astype(dtype)
    return outs, rng.standard_normal((s,) + lead + (lq,)).astype(lse_dtype)


def _outs(r, **kw):
    return _arrays(r, **kw)[0]


def _lses(r, **kw):
    return _arrays(r, **kw)[1]


ERRORS = {
    # name: (build(rng) -> (outs, lses), exception, message pattern)
    "outs_not_an_array": (
        lambda r: (3, _lses(r)), TypeError,
        r"outs must be an array \(S, \.\.\., Lq, Dv\) or a sequence of S arrays \(\.\.\., Lq, Dv\), got int"),
    "lses_a_string": (
        lambda r: (_outs(r), "lse"), TypeError, r"lses must be an array \(S, \.\.\., Lq\) .* got str"),
    "empty_sequence": (
        lambda r: ([], []), ValueError,
        r"outs must hold at least one partial attention \(S >= 1\), got an empty list"),
    "zero_parts_stacked": (
        lambda r: _arrays(r, s=0), ValueError, r"outs must hold at least one partial attention \(S >= 1\)"),
    "outs_too_few_axes": (
        lambda r: (_outs(r)[:, 0, 0], _lses(r)[:, 0]), ValueError,
        r"outs must have at least 3 dimensions \(S, \.\.\., Lq, Dv\), got shape \(3, 4\)"),
    "outs_integer_dtype": (
        lambda r: (_outs(r).astype(numpy.int32), _lses(r)), TypeError,
        r"outs must have dtype float16, bfloat16, float32 or float64, got int32"),
    "lses_half_for_half_outs": (
        lambda r: _arrays(r, dtype=numpy.float16, lse_dtype=numpy.float16), TypeError,
        r"lses must have dtype float32 for float16 outs .*got float16"),
    "lses_float32_for_float64_outs": (
        lambda r: _arrays(r, dtype=numpy.float64), TypeError,
        r"lses must have dtype float64 for float64 outs .*got float32"),
    "lses_other_lq": (
        lambda r: (_outs(r), _lses(r, lq=6)), ValueError,
        r"the parts of lses must have the shape of those of outs without Dv, \(2, 5\) .*got \(2, 6\)"),
    "lses_other_part_count": (
        lambda r: (_outs(r), _lses(r, s=2)), ValueError,
        r"lses must hold as many parts as outs: outs has S=3, lses has S=2"),
    "parts_of_two_shapes": (
        lambda r: ([_outs(r)[0], _outs(r, lq=6)[0]], list(_lses(r)[:2])), ValueError,
        r"the parts of outs must share one shape: outs\[0\] has \(2, 5, 4\), outs\[1\] has \(2, 6, 4\)"),
    "parts_of_two_dtypes": (
        lambda r: (list(_outs(r)), [_lses(r)[0], _lses(r)[1].astype(numpy.float64), _lses(r)[2]]), TypeError,
        r"the parts of lses must share one dtype: lses\[0\] is float32, lses\[1\] is float64"),
    "a_part_not_an_array": (
        lambda r: ([_outs(r)[0], [[1.0]]], list(_lses(r)[:2])), TypeError,
        r"outs\[1\] must be a numpy.ndarray, a cupy.ndarray or a DLPack array .*got list"),
    "a_part_too_few_axes": (
        lambda r: ([_outs(r)[0, 0, 0]], [_lses(r)[0, 0]]), ValueError,
        r"outs\[0\] must have at least 2 dimensions \(\.\.\., Lq, Dv\), got shape \(4,\)"),
    "lses_part_zero_d": (
        lambda r: ([_outs(r)[0, 0, 0:1]], [numpy.zeros((), numpy.float32)]), ValueError,
        r"lses\[0\] must have at least 1 dimension \(\.\.\., Lq\), got shape \(\)"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_argument_errors_name_the_argument_and_touch_nothing(rng, case):
    build, error, pattern = ERRORS[case]
    outs, lses = build(rng)
    arrays = [x for value in (outs, lses) for x in (value if isinstance(value, (list, tuple)) else [value])
              if isinstance(x, numpy.ndarray)]
    copies = [x.copy() for x in arrays]
    with pytest.raises(error, match=pattern):
        cuflash.merge_attention(outs, lses)
    for before, after in zip(copies, arrays):
        numpy.testing.assert_array_equal(before, after)


# --- the kernel, offline (NVRTC, no GPU) -----------------------------------------------------


@pytest.fixture
def pipeline():
    """tests/test_pipeline.py (its NVRTC check and PTX probe reader); skips where NVRTC or the
    CUDA headers are missing."""
    module = pytest.importorskip("test_pipeline")
    if not module._nvrtc_available():
        pytest.skip("NVRTC or the CUDA headers are not installed")
    return module


@pytest.mark.parametrize("arch", ["80", "90a"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_kernel_compiles_offline_without_spills(pipeline, dtype, arch):
    from cuflash._gpu import kernels, merge

    build = kernels.compile_offline(merge.merge_kernel(dtype, arch))
    assert len(build.cubin) > 0
    assert 0 < build.registers <= 255 and build.spill_bytes == 0 and build.stack_bytes == 0, build.log


def test_merge_params_struct_matches_its_numpy_mirror(pipeline):
    from cuflash._gpu import kernels, merge, params

    spec = merge.merge_kernel("float32", "80")
    source = kernels.kernel_source(spec) + "\n" + params.layout_probe_source("cuflash::MergeParams", merge.PARAMS_DTYPE)
    stored = pipeline._ptx_stored_constants(source, kernels.compile_options(spec) + ("-arch=compute_80",))
    expected = {0: merge.PARAMS_DTYPE.itemsize}
    expected.update({i: merge.PARAMS_DTYPE.fields[name][1] for i, name in enumerate(merge.PARAMS_DTYPE.names, start=1)})
    assert stored == expected


def test_threads_per_row_cover_the_row_within_a_warp():
    from cuflash._gpu import merge

    for dv, lanes in ((0, 1), (1, 1), (16, 1), (17, 2), (64, 4), (128, 8), (256, 16), (512, 32), (1000, 32)):
        assert merge.lanes_for(dv) == lanes


# --- torch (CPU tensors) ---------------------------------------------------------------------


@pytest.fixture
def ct():
    pytest.importorskip("torch")
    import cuflash.torch

    return cuflash.torch


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cpu_equals_numpy(rng, ct, dtype):
    import torch

    _, outs, lses = split_problem(rng, dtype, (2,), 9, 20, 8, 6, 3, True)
    expected = cuflash.merge_attention(outs, lses)

    def tensor(x):
        return torch.from_numpy(x.view(numpy.int16)).view(torch.bfloat16) if x.dtype == BF16 else torch.from_numpy(x)

    for args in (([tensor(x) for x in outs], [tensor(x) for x in lses]),
                 (tensor(numpy.stack(outs)), tensor(numpy.stack(lses)))):
        out, lse = ct.merge_attention(*args)
        assert isinstance(out, torch.Tensor) and out.dtype == args[0][0].dtype and lse.dtype == args[1][0].dtype
        numpy.testing.assert_array_equal(out.float().numpy(), expected[0].astype(numpy.float32))
        numpy.testing.assert_array_equal(lse.numpy(), expected[1])


def test_torch_gradcheck_float64(rng, ct):
    import torch

    outs = torch.from_numpy(rng.standard_normal((3, 2, 5, 4)))
    lses = torch.from_numpy(rng.standard_normal((3, 2, 5)) * 2)
    lses[0, 0, 1] = lses[1, 1, 2] = lses[2, 1, 2] = -numpy.inf  # parts without keys for a row
    stacked = (outs.clone().requires_grad_(), lses.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda o, l: ct.merge_attention(o, l), stacked)
    parts = [t.clone().requires_grad_() for t in (*outs.unbind(0), *lses.unbind(0))]
    assert torch.autograd.gradcheck(lambda *t: ct.merge_attention(list(t[:3]), tuple(t[3:])), parts)


def test_torch_compile_fullgraph_and_its_gradients(rng, ct):
    """merge_attention inside torch.compile (fullgraph: one custom op on the stacked parts, its
    backward in torch operations): the eager results and gradients, stacked and list forms, with
    a row that some parts do not see."""
    import torch
    import torch._dynamo.testing

    outs = torch.from_numpy(rng.standard_normal((3, 2, 5, 4))).requires_grad_()
    raw = rng.standard_normal((3, 2, 5)) * 2
    raw[0, 0, 1] = raw[1, 1, 2] = -numpy.inf
    lses = torch.from_numpy(raw).requires_grad_()
    weights = [torch.from_numpy(rng.standard_normal(shape)) for shape in ((2, 5, 4), (2, 5))]
    torch._dynamo.reset()
    for form in (lambda o, l: ct.merge_attention(o, l),
                 lambda o, l: ct.merge_attention(list(o.unbind(0)), tuple(l.unbind(0)))):
        counter = torch._dynamo.testing.CompileCounter()
        results = []
        for function in (form, torch.compile(form, backend=counter, fullgraph=True)):
            out, lse = function(outs, lses)
            loss = (out * weights[0]).sum() + (lse * weights[1]).sum()
            results.append((out, lse) + torch.autograd.grad(loss, (outs, lses)))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        assert counter.frame_count == 1


def test_torch_backward_of_rows_that_see_nothing_is_zero(rng, ct):
    import torch

    outs = torch.from_numpy(rng.standard_normal((2, 4, 3))).requires_grad_()
    raw = rng.standard_normal((2, 4))
    raw[:, 1] = -numpy.inf
    lses = torch.from_numpy(raw).requires_grad_()
    out, lse = ct.merge_attention(outs, lses)
    assert (out[1] == 0).all() and lse[1] == -numpy.inf
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert torch.isfinite(outs.grad).all() and torch.isfinite(lses.grad).all()
    assert (outs.grad[:, 1] == 0).all() and (lses.grad[:, 1] == 0).all()


def test_torch_argument_errors(rng, ct):
    import torch

    outs = torch.zeros(2, 3, 4)
    lses = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"outs\[1\] must be a torch.Tensor, got ndarray"):
        ct.merge_attention([outs[0], numpy.zeros((3, 4))], lses)
    with pytest.raises(TypeError, match=r"lses must be a torch.Tensor or a list or tuple of them, got float"):
        ct.merge_attention(outs, 1.0)
    with pytest.raises(TypeError, match=r"lses must have dtype float32 for float32 outs .*got float64"):
        ct.merge_attention(outs, lses.double())
    assert (outs == 0).all() and (lses == 0).all()


# --- GPU -------------------------------------------------------------------------------------


def _cupy():
    return pytest.importorskip("cupy")


def _assert_same_result(actual, expected, dtype):
    """GPU against CPU: the same formula, so NaN and infinities in the same places, and finite
    values within a few roundings (exp and log may differ by an ulp or two)."""
    actual, expected = to_numpy(actual).astype(numpy.float64), to_numpy(expected).astype(numpy.float64)
    assert actual.shape == expected.shape
    numpy.testing.assert_array_equal(numpy.isnan(actual), numpy.isnan(expected))
    infinite = numpy.isinf(expected)
    numpy.testing.assert_array_equal(actual[infinite], expected[infinite])
    finite = numpy.isfinite(expected)
    ulps = 2 if dtype in ("float16", "bfloat16") else 64
    bound = ulps * EPS[numpy.dtype(_dtype(dtype)).name] * max(1.0, numpy.abs(expected[finite]).max(initial=0))
    assert numpy.abs(actual[finite] - expected[finite]).max(initial=0) <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gpu_merge_equals_attention_over_the_union(rng, dtype, case):
    cupy = _cupy()
    exact, outs, lses, causal = _case_problem(rng, dtype, case)
    stacked = cupy.asarray(numpy.stack(outs)), cupy.asarray(numpy.stack(lses))
    copies = [x.copy() for x in stacked]
    out, lse = cuflash.merge_attention(*stacked)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray) and out.flags.c_contiguous
    check_against_union(dtype, exact, cupy.asnumpy(out), cupy.asnumpy(lse), causal)
    cpu = cuflash.merge_attention(numpy.stack(outs), numpy.stack(lses))
    _assert_same_result(out, cpu[0], dtype)
    _assert_same_result(lse, cpu[1], _lse_dtype(dtype).name)
    for before, after in zip(copies, stacked):
        assert (before.view(numpy.uint8) == after.view(numpy.uint8)).all()
    # Deterministic: a second run gives the same bits.
    again = cuflash.merge_attention(*stacked)
    assert (again[0].view(numpy.uint8) == out.view(numpy.uint8)).all()
    assert (again[1].view(numpy.uint8) == lse.view(numpy.uint8)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [3, 16, 17, 40])
def test_gpu_layouts(rng, dtype, parts):
    """Every layout: sequences (a pointer table up to 16 parts, stacked copies beyond), stacked
    arrays past the table, transposed and reversed views, a strided last axis, broadcast lses,
    five row axes that do not merge; each equals the CPU backend on the same values."""
    cupy = _cupy()
    outs = rng.standard_normal((parts, 2, 3, 9, 40)).astype(_dtype(dtype))
    lses = (rng.standard_normal((parts, 2, 3, 9)) * 3).astype(_lse_dtype(dtype))
    lses[rng.random(lses.shape) < 0.3] = -numpy.inf
    lses[:, 1, 2, 4] = -numpy.inf
    expected = cuflash.merge_attention(outs, lses)
    d_outs, d_lses = cupy.asarray(outs), cupy.asarray(lses)
    transposed = cupy.ascontiguousarray(d_outs.transpose(0, 3, 1, 2, 4)).transpose(0, 2, 3, 1, 4)
    reversed_outs = cupy.ascontiguousarray(d_outs[::-1, :, ::-1])[::-1, :, ::-1]
    reversed_lses = cupy.ascontiguousarray(d_lses[::-1, :, ::-1])[::-1, :, ::-1]
    strided_last = cupy.repeat(d_outs, 2, axis=-1)[..., ::2]
    forms = [(d_outs, d_lses), (list(d_outs), list(d_lses)), (tuple(d_outs), d_lses), (transposed, d_lses),
             (list(transposed), list(d_lses)), (reversed_outs, reversed_lses), (strided_last, d_lses)]
    for args in forms:
        out, lse = cuflash.merge_attention(*args)
        _assert_same_result(out, expected[0], dtype)
        _assert_same_result(lse, expected[1], _lse_dtype(dtype).name)
    # lses broadcast along the head axis (stride 0), and five row axes that no neighbour merges.
    wide = numpy.broadcast_to(lses[:, :, :1], lses.shape)
    out, lse = cuflash.merge_attention(d_outs, cupy.broadcast_to(d_lses[:, :, :1], lses.shape))
    want = cuflash.merge_attention(outs, numpy.ascontiguousarray(wide))
    _assert_same_result(out, want[0], dtype)
    _assert_same_result(lse, want[1], _lse_dtype(dtype).name)
    five = rng.standard_normal((parts, 2, 3, 2, 3, 5, 4)).astype(_dtype(dtype))
    five_lses = rng.standard_normal((parts, 2, 3, 2, 3, 5)).astype(_lse_dtype(dtype))
    perm = (0, 5, 3, 1, 4, 2, 6)  # in memory (S, Lq, B3, B1, B4, B2, Dv): no two row axes merge
    d_five = cupy.ascontiguousarray(cupy.asarray(five).transpose(perm)).transpose(tuple(numpy.argsort(perm)))
    want = cuflash.merge_attention(five, five_lses)
    out, lse = cuflash.merge_attention(d_five, cupy.asarray(five_lses))
    _assert_same_result(out, want[0], dtype)
    _assert_same_result(lse, want[1], _lse_dtype(dtype).name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nan_empty_rows_and_odd_widths(rng, dtype):
    cupy = _cupy()
    for shape in ((3, 2, 6, 5), (2, 1, 1), (5, 4, 97, 3), (2, 3, 300), (4, 2, 7, 0), (3, 0, 4), (1, 3, 8)):
        outs = rng.standard_normal(shape).astype(_dtype(dtype))
        lses = rng.standard_normal(shape[:-1]).astype(_lse_dtype(dtype))
        if shape[-2] >= 3 and shape[0] >= 2:
            lses[..., 0] = -numpy.inf         # row 0 sees no key in any part: 0 and -inf
            lses[0, ..., 1] = -numpy.inf      # row 1: part 0 has no key for it, and is not read
            outs[0, ..., 1, :] = numpy.nan
            lses[1, ..., 2] = numpy.nan       # row 2: a NaN lse makes the row NaN
            outs[-1, ..., -1, -1:] = numpy.nan  # the last row's last entry: NaN there only
        expected = cuflash.merge_attention(outs, lses)
        out, lse = cuflash.merge_attention(cupy.asarray(outs), cupy.asarray(lses))
        _assert_same_result(out, expected[0], dtype)
        _assert_same_result(lse, expected[1], _lse_dtype(dtype).name)


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream_and_device_of_the_inputs(rng):
    cupy = _cupy()
    outs = rng.standard_normal((4, 2, 64, 32)).astype(numpy.float32)
    lses = rng.standard_normal((4, 2, 64)).astype(numpy.float32)
    expected = cuflash.merge_attention(outs, lses)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        d_outs, d_lses = cupy.asarray(outs), cupy.asarray(lses)
        out, lse = cuflash.merge_attention(d_outs, d_lses)
        host = cupy.asnumpy(out, stream=stream), cupy.asnumpy(lse, stream=stream)
    stream.synchronize()
    _assert_same_result(host[0], expected[0], "float32")
    _assert_same_result(host[1], expected[1], "float32")


@pytest.mark.gpu
def test_gpu_refuses_mixed_kinds(rng):
    cupy = _cupy()
    outs, lses = _arrays(rng)
    with pytest.raises(TypeError, match=r"arrays must all be NumPy \(CPU\) or all CuPy \(GPU\)"):
        cuflash.merge_attention(cupy.asarray(outs), lses)
    with pytest.raises(TypeError, match=r"arrays must all be NumPy \(CPU\) or all CuPy \(GPU\)"):
        cuflash.merge_attention([cupy.asarray(outs[0]), outs[1]], list(lses[:2]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_torch_cuda_tensors(rng, dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import cuflash.torch as ct

    _, outs, lses = split_problem(rng, dtype, (2,), 9, 20, 8, 6, 3, True)
    expected = cuflash.merge_attention(outs, lses)

    def tensor(x):
        host = torch.from_numpy(x.view(numpy.int16)).view(torch.bfloat16) if x.dtype == BF16 else torch.from_numpy(x)
        return host.cuda()

    for args in (([tensor(x) for x in outs], [tensor(x) for x in lses]),
                 (tensor(numpy.stack(outs)), tensor(numpy.stack(lses)))):
        out, lse = ct.merge_attention(*args)
        assert out.is_cuda and lse.is_cuda and out.dtype == args[0][0].dtype
        _assert_same_result(out.float().cpu().numpy(), expected[0].astype(numpy.float32), dtype)
        _assert_same_result(lse.cpu().numpy(), expected[1], _lse_dtype(dtype).name)
        # A CUDA DLPack array straight into cuflash gives CuPy arrays.
        raw_out, raw_lse = cuflash.merge_attention(*(a if isinstance(a, torch.Tensor) else list(a) for a in args))
        _assert_same_result(raw_out, expected[0], dtype)
    if dtype == "float64":
        grads_in = [tensor(numpy.stack(outs)).requires_grad_(), tensor(numpy.stack(lses)).requires_grad_()]
        out, lse = ct.merge_attention(*grads_in)
        (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
        cpu_in = [t.detach().cpu().requires_grad_() for t in grads_in]
        out_c, lse_c = ct.merge_attention(*cpu_in)
        (out_c.sum() + torch.where(torch.isfinite(lse_c), lse_c, 0).sum()).backward()
        for gpu_t, cpu_t in zip(grads_in, cpu_in):
            torch.testing.assert_close(gpu_t.grad.cpu(), cpu_t.grad, rtol=1e-12, atol=1e-12)
