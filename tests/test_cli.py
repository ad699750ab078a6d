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
    assert {variant.kernel for variant, _ in warmed} == {"fwd_simt"}
    assert not any(variant.has_window for variant, _ in warmed)


def test_warmup_prepares_the_float32_precisions_asked_for(warmed):
    assert cli.main(["warmup", "--dtype", "float32,bfloat16", "--head-dim", "64", "--mask", "dense",
                     "--arch", "90a", "--jobs", "1", "--forward-only", "--precision", "highest,tf32"]) == 0
    forward = {(variant.kernel, variant.dtype, variant.precision) for variant, _ in warmed}
    assert ("fwd_tc", "float32", "highest") in forward  # "highest": 3xTF32 on tensor cores (long rows)
    assert ("fwd_simt", "float32", None) in forward  # and FFMA (short rows, score modifiers)
    assert ("fwd_tc", "float32", "tf32") in forward  # "tf32": TF32 tensor cores
    assert not any(variant.precision for variant, _ in warmed if variant.dtype == "bfloat16")


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
