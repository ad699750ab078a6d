"""The GPU host path without a GPU (tests/fake_gpu.py, in a process of its own): planning, params
structs, kept plans and their replays for dense and packed calls with softcap, ALiBi, sinks, a
bias, a 2-D mask and dropout, for dense calls on the decode kernel (the CuPy API and the torch
adapter) and for kv-cache calls (attention_with_kvcache, flash_attn_with_kvcache), every CUDA call
a stand-in. Catches what only the GPU suite would otherwise: a planning call that cannot launch
(session 41's kept dropout plans refused their own first launch; session 43's mask tile spans
needed a ninth helper argument), a replay that cannot run (session 41's seed passed to the
decode kernel's plans), a call that plans again where it should replay, a replay launched with
another call's seed, a replay whose launches differ from what the full path launches for the
same arrays (kernels, shapes, argument bytes; TMA Variants planned, their maps re-pointed), a
kept plan that launches before refusing a foreign seed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cupy")
pytest.importorskip("ml_dtypes")

REPO = Path(__file__).resolve().parents[1]


def _run(*arguments):
    """fake_gpu.py's lines of output (it fails with the assertion that did not hold)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fake_gpu.py"), *arguments], capture_output=True,
                          text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("\n")[:-1]


def test_calls_plan_once_then_replay_with_their_own_dropout_seed():
    assert _run() == [f"ok {name}" for name in (
        "dense dropout", "dense softcap + ALiBi + dropout", "dense sinks (forward)", "dense bias", "dense 2-D mask",
        "dense bias + 2-D mask + dropout", "packed plain", "packed softcap",
        "packed ALiBi (B, Hq) + softcap", "packed dropout", "packed ALiBi (Hq,) + softcap + dropout",
        "packed sinks (forward)", "replay dense causal", "replay dense softcap + ALiBi, window",
        "replay dense bias + 2-D mask + dropout", "replay dense top-left causal, deterministic",
        "replay packed causal softcap", "kv cache contiguous, device lengths",
        "kv cache contiguous, int length, causal",
        "kv cache contiguous, appended keys, lse", "kv cache paged, device lengths, 4 rows, causal",
        "kv cache paged, appended keys, 5 splits", "kv cache contiguous, softcap + ALiBi + sinks + window",
        "kv cache, a known signature's new int lengths", "kv cache float32 (dense calls)",
        "sweep of 164 signatures",
        "kept plans refuse foreign seeds (BackwardPlan, DenseDecodePlan, ForwardPlan)")]


def test_the_torch_adapters_training_steps_plan_once_then_replay_with_the_seed_each_drew():
    """Dense attention and flash_attn_varlen_func with softcap, ALiBi and dropout on tensors standing
    for CUDA ones: the first step plans, the next replay (forward plan, backward follower), and each
    step's launches carry the seed it drew from torch's generator."""
    pytest.importorskip("torch")
    assert _run("--torch") == ["ok torch attention softcap + ALiBi + dropout",
                               "ok torch flash_attn_varlen_func softcap + ALiBi + dropout",
                               "ok torch attention, a few query rows (decode kernel)",
                               "ok torch flash_attn_with_kvcache, contiguous and paged"]
