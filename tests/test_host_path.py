"""The GPU host path without a GPU (tests/fake_gpu.py, in a process of its own): planning, params
structs, kept plans and their replays for dense and packed calls with softcap, ALiBi, sinks and
dropout, every CUDA call a stand-in. Catches what only the GPU suite would otherwise: a planning
call that cannot launch (session 41's kept dropout plans refused their own first launch), a call
that plans again where it should replay, a replay launched with another call's seed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cupy")
pytest.importorskip("ml_dtypes")

REPO = Path(__file__).resolve().parents[1]


def test_calls_plan_once_then_replay_with_their_own_dropout_seed():
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fake_gpu.py")], capture_output=True, text=True,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split("\n")[:-1] == [f"ok {name}" for name in (
        "dense dropout", "dense softcap + ALiBi + dropout", "dense sinks (forward)", "packed plain", "packed softcap",
        "packed ALiBi (B, Hq) + softcap", "packed dropout", "packed ALiBi (Hq,) + softcap + dropout",
        "packed sinks (forward)", "sweep of 52 signatures")]
