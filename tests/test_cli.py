"""``python -m cuflash``: its commands, its answers to unknown or bad arguments, and what
``warmup`` prepares (checked by recording the Variants it would compile; no compiler runs)."""
from __future__ import annotations

import pytest

from cuflash import __main__ as cli
from cuflash import __version__


def test_version_and_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cuflash {__version__}"
    assert cli.main(["--help"]) == 0
    assert "warmup" in capsys.readouterr().out


@pytest.mark.parametrize("argument", ["bogus", "--bogus", "self-check"])
def test_unknown_arguments_are_refused_not_run(argument, capsys):
    assert cli.main([argument]) == 2
    err = capsys.readouterr().err
    assert repr(argument) in err and "--help" in err


@pytest.fixture
def warmed(monkeypatch):
    """The Variants warmup hands to the compiler, as (variant, device) jobs."""
    from cuflash._gpu import kernels

    jobs = []
    monkeypatch.setattr(kernels, "warm", lambda job: jobs.append(job) or f"{job[0]}: recorded")
    monkeypatch.setattr(cli, "gpu_devices", lambda: [])
    return jobs


def test_warmup_prepares_forward_and_backward_kernels(warmed):
    assert cli.main(["warmup", "--dtype", "float16", "--head-dim", "64", "--mask", "causal",
                     "--arch", "80", "--jobs", "1"]) == 0
    kernels = {variant.kernel for variant, _ in warmed}
    assert {"fwd_tc", "bwd_delta", "bwd_dkdv_tc", "bwd_dq_tc", "bwd_dq_convert"} <= kernels
    assert all(variant.has_window for variant, _ in warmed if variant.kernel in ("fwd_tc", "bwd_dkdv_tc"))


def test_warmup_forward_only_and_dense(warmed):
    assert cli.main(["warmup", "--dtype", "float32", "--head-dim", "128", "--mask", "dense",
                     "--arch", "90a", "--jobs", "1", "--forward-only"]) == 0
    # "highest": 3xTF32 on Hopper's warpgroup MMAs (long rows), FFMA (short rows)
    assert {variant.kernel for variant, _ in warmed} == {"fwd_wgmma", "fwd_simt"}
    assert not any(variant.has_window for variant, _ in warmed)


def test_warmup_prepares_the_float32_precisions_asked_for(warmed):
    assert cli.main(["warmup", "--dtype", "float32,bfloat16", "--head-dim", "64", "--mask", "dense",
                     "--arch", "90a", "--jobs", "1", "--forward-only", "--precision", "highest,tf32"]) == 0
    forward = {(variant.kernel, variant.dtype, variant.precision) for variant, _ in warmed}
    assert ("fwd_wgmma", "float32", "highest") in forward  # "highest": 3xTF32 on tensor cores (long rows)
    assert ("fwd_simt", "float32", None) in forward  # and FFMA (short rows)
    assert ("fwd_tc", "float32", "tf32") in forward  # "tf32": TF32 tensor cores
    assert not any(variant.precision for variant, _ in warmed if variant.dtype == "bfloat16")


def test_warmup_prepares_the_modifier_and_dropout_forms_when_asked(warmed):
    """--mods adds the score modifiers' form (softcap, ALiBi, bias, mask), --dropout the dropout
    form, forward and backward, each what the dispatcher selects for such a call; neither by
    default."""
    from cuflash._gpu import tiles

    arguments = ["warmup", "--dtype", "bfloat16,float64", "--head-dim", "64", "--mask", "causal", "--arch", "90a",
                 "--jobs", "1"]
    assert cli.main(arguments) == 0
    assert not any(variant.score_mods or variant.dropout for variant, _ in warmed)
    warmed.clear()
    assert cli.main(arguments + ["--mods", "--dropout"]) == 0
    prepared = {variant for variant, _ in warmed}
    for dtype in ("bfloat16", "float64"):
        for dropout in (False, True):
            assert tiles.select(dtype, 64, 64, True, "90a", score_mods=True, dropout=dropout) in prepared
            backward = tiles.select_backward(dtype, 64, 64, True, "90a", True, dropout=dropout)
            assert {backward.dkdv, backward.dq} <= prepared
    assert any(variant.dropout for variant in prepared) and any(variant.score_mods and not variant.dropout
                                                                for variant in prepared)
    warmed.clear()
    assert cli.main(arguments + ["--dropout", "--forward-only"]) == 0
    assert {variant.kernel.split("_")[0] for variant, _ in warmed} == {"fwd"}
    assert any(variant.dropout for variant, _ in warmed)


def _inference(jobs):
    """(kernel or function, dtype, extra) of the inference kernels among the recorded jobs."""
    out = set()
    for spec, _ in jobs:
        function = getattr(spec, "function", None)  # (a HelperKernel: decode_combine's stem is decode_tc too)
        if function in ("decode_combine", "kvcache_append", "merge_attention"):
            out.add((function, spec.dtype, None))
        elif function is None and spec.kernel == "decode_tc":
            out.add(("decode_tc", spec.dtype, (spec.head_dim, spec.warps_m)))
    return out


def test_warmup_prepares_the_inference_kernels_when_asked(warmed):
    assert cli.main(["warmup", "--dtype", "bfloat16,float32", "--head-dim", "64,128", "--mask", "dense",
                     "--arch", "90a", "--jobs", "1", "--forward-only", "--inference"]) == 0
    assert _inference(warmed) == (
        {("decode_tc", "bfloat16", (d, w)) for d in (64, 128) for w in (1, 2, 4)}
        | {("decode_combine", "bfloat16", None), ("merge_attention", "bfloat16", None),
           ("merge_attention", "float32", None),
           ("kvcache_append", "float16", None),  # bfloat16's bits: the 2-byte instantiation
           ("kvcache_append", "float32", None)})
    assert {spec.arch for spec, _ in warmed} == {"90a"}
    warmed.clear()
    assert cli.main(["warmup", "--dtype", "float16", "--head-dim", "64", "--arch", "80", "--jobs", "1"]) == 0
    assert not _inference(warmed)  # (not without --inference)


def test_warmup_all_includes_every_inference_kernel(warmed):
    assert cli.main(["warmup", "--all", "--arch", "80", "--jobs", "1"]) == 0
    kernels = _inference(warmed)
    assert {("decode_tc", dtype, (d, w)) for dtype in ("float16", "bfloat16") for d in (64, 128)
            for w in (1, 2, 4)} <= kernels
    assert {("merge_attention", dtype, None) for dtype in ("float16", "bfloat16", "float32", "float64")} <= kernels
    assert {("kvcache_append", dtype, None) for dtype in ("float16", "float32", "float64")} <= kernels
    assert len(warmed) == len({spec for spec, _ in warmed})  # each once


@pytest.mark.parametrize("arguments, named", [
    (["--dtype", "foo"], "--dtype"),
    (["--head-dim", "300"], "--head-dim"),
    (["--head-dim", "x"], "--head-dim"),
    (["--mask", "sliding"], "--mask"),
    (["--precision", "fast"], "--precision"),
])
def test_warmup_says_what_is_wrong(warmed, arguments, named):
    with pytest.raises(SystemExit) as error:
        cli.main(["warmup", "--arch", "80", "--jobs", "1", *arguments])
    assert named in str(error.value) and not warmed


def test_bench_outside_a_checkout_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "cuflash" / "__main__.py"))
    assert cli.main(["bench", "--quick"]) == 2
    assert "checkout" in capsys.readouterr().err
