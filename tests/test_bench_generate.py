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
                                "--backends", "sdpa,cuflash", "--out-dir", str(tmp_path)])
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
    assert "| cuflash |" in record["table"]


def test_backends_must_include_the_reference():
    from benchmarks import bench_generate

    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--backends", "cuflash"])
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--backends", "sdpa,bogus"])
    args = bench_generate.parse_args(["--backends", "cuflash,sdpa", "--tiny"])
    assert args.backends == ["sdpa", "cuflash"] and args.shapes == [(2, 32)] and args.new_tokens == 8
