"""benchmarks/bench_generate.py on the CPU (tiny model): the decoding loop runs every backend on one
model, cuflash's attention calls are cuflash's (no fallback), its greedy tokens equal SDPA's, and
the record holds what the table reports."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_tiny_generation_on_the_cpu_routes_through_cuflash_and_matches_sdpa(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import bench_generate

    path = bench_generate.main(["--device", "cpu", "--tiny", "--new-tokens", "3", "--repeats", "1",
                                "--backends", "sdpa,cuflash,cuflash_flash_only", "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["sweep"] == "generate" and record["new_tokens"] == 3
    (row,) = record["rows"]
    sdpa, ours = row["results"]["sdpa"], row["results"]["cuflash"]
    assert sdpa["status"] == "ok" and ours["status"] == "ok", (sdpa, ours)
    layers = record["model_config"]["num_hidden_layers"]
    # first run + 1 repeat, each a prefill and 3 steps, every layer
    assert ours["attention_calls_cuflash"] == 2 * (1 + 3) * layers and ours["attention_calls_fallback"] == 0
    assert ours["same_tokens"] == 3 and ours["correct"] and ours["logits_rel_diff"] <= 1e-4
    assert ours["decode_ms_per_token"] > 0 and ours["tokens_per_s"] > 0
    assert ours["decode_kernel_calls"] == 0  # (the CPU backend has no decode kernel)
    assert row["results"]["cuflash_flash_only"]["correct"]
    assert "| cuflash |" in record["table"] and "| cuflash_flash_only |" in record["table"]


def test_the_flash_only_backend_turns_the_decode_kernel_routing_off_and_back(monkeypatch):
    pytest.importorskip("cupy")
    from benchmarks import bench_generate
    from cuflash._gpu import decode, plan

    ran = []
    monkeypatch.setattr(decode.DenseDecodePlan, "launch", lambda self, *args: ran.append(args))
    limit, launch = decode.DENSE_MAX_ROWS, decode.DenseDecodePlan.launch
    for backend, within in (("cuflash", limit), (bench_generate.CUFLASH_FLASH_ONLY, 0)):
        monkeypatch.setitem(plan.PLANS, "stale", object())  # a plan kept under the other routing
        with bench_generate.decode_kernel_routing(backend, cuda=True) as launched:
            assert decode.DENSE_MAX_ROWS == within and "stale" not in plan.PLANS
            decode.DenseDecodePlan.launch(None, "memory", "q")
            assert launched == [1] and ran[-1] == ("memory", "q")
        assert decode.DENSE_MAX_ROWS == limit and decode.DenseDecodePlan.launch is launch


def test_backends_must_include_the_reference():
    from benchmarks import bench_generate

    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--backends", "cuflash"])
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--backends", "sdpa,bogus"])
    args = bench_generate.parse_args(["--backends", "cuflash,sdpa", "--tiny"])
    assert args.backends == ["sdpa", "cuflash"] and args.shapes == [(2, 32)] and args.new_tokens == 8
