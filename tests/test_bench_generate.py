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

    path = bench_generate.main(["--device", "cpu", "--tiny", "--new-tokens", "3", "--repeats", "1", "--rounds", "2",
                                "--backends", "sdpa,cuflash,cuflash_flash_only", "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["sweep"] == "generate" and record["new_tokens"] == 3
    (row,) = record["rows"]
    sdpa, ours = row["results"]["sdpa"], row["results"]["cuflash"]
    assert sdpa["status"] == "ok" and ours["status"] == "ok", (sdpa, ours)
    layers = record["model_config"]["num_hidden_layers"]
    # in each of 2 rounds: first run + 1 repeat, each a prefill and 3 steps, every layer
    assert ours["attention_calls_cuflash"] == 2 * (1 + 3) * layers and ours["attention_calls_fallback"] == 0
    assert ours["rounds"] == 2 and len(ours["decode_ms_all"]) == len(ours["prefill_ms_all"]) == 2
    assert ours["same_tokens"] == 3 and ours["correct"] and ours["logits_rel_diff"] <= 1e-4
    assert ours["decode_ms_per_token"] > 0 and ours["tokens_per_s"] > 0
    assert ours["decode_kernel_calls"] == 0  # (the CPU backend has no decode kernel)
    assert row["results"]["cuflash_flash_only"]["correct"]
    assert "| cuflash |" in record["table"] and "| cuflash_flash_only |" in record["table"]


def test_a_static_cache_generation_on_the_cpu_routes_through_cuflash_and_matches_sdpa(tmp_path):
    """--cache static: transformers' StaticCache, each step's mask hiding the slots not yet filled;
    every attention call cuflash's (none falls back), the greedy tokens SDPA's."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import bench_generate

    path = bench_generate.main(["--device", "cpu", "--tiny", "--new-tokens", "3", "--repeats", "1", "--cache", "static",
                                "--backends", "sdpa,cuflash", "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["cache"] == "static" and "static cache" in record["loop"]
    ours = record["rows"][0]["results"]["cuflash"]
    layers = record["model_config"]["num_hidden_layers"]
    # the first run and one repeat, each a prefill and 3 steps, every layer
    assert ours["attention_calls_cuflash"] == 2 * (1 + 3) * layers and ours["attention_calls_fallback"] == 0
    assert ours["same_tokens"] == 3 and ours["correct"]


def test_compiled_static_cache_decoding_on_the_cpu_matches_sdpa(tmp_path):
    """--compile: the decode steps through the forward compiled whole (here through aot_eager),
    transformers' fast-generation recipe over a StaticCache; cuflash's ops in the graph (only the
    eager prefill's calls are counted), no fallback, SDPA's greedy tokens; --compile without a
    static cache is refused."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import bench_generate

    path = bench_generate.main(["--device", "cpu", "--tiny", "--new-tokens", "3", "--repeats", "1", "--cache", "static",
                                "--compile", "default", "--compile-backend", "aot_eager", "--backends", "sdpa,cuflash",
                                "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["compile"] == "aot_eager default" and "compiled" in record["table"]
    ours = record["rows"][0]["results"]["cuflash"]
    layers = record["model_config"]["num_hidden_layers"]
    assert ours["attention_calls_cuflash"] == 2 * layers and ours["attention_calls_fallback"] == 0  # two prefills
    assert ours["same_tokens"] == 3 and ours["correct"]
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--compile", "default"])


def test_the_flash_only_backend_turns_the_decode_kernel_routing_off_and_back(monkeypatch):
    pytest.importorskip("cupy")
    from benchmarks import bench_generate
    from cuflash._gpu import decode, plan

    ran = []
    monkeypatch.setattr(decode.DenseDecodePlan, "launch", lambda self, *args: ran.append(args))
    limit, launch = decode.DENSE_MAX_ROWS, decode.DenseDecodePlan.launch
    for backend, within in (("cuflash", limit), (bench_generate.CUFLASH_FLASH_ONLY, 0)):
        monkeypatch.setitem(plan.PLANS, "stale", object())  # a plan kept under the other routing
        monkeypatch.setitem(plan.FAMILIES, "stale", object())  # and a family that would plan its like
        with bench_generate.decode_kernel_routing(backend, cuda=True) as launched:
            assert decode.DENSE_MAX_ROWS == within and "stale" not in plan.PLANS and "stale" not in plan.FAMILIES
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


def test_rounds_merge_into_medians_over_every_run():
    from benchmarks import bench_generate

    def run(prefill, wall, span, correct=True, calls=5):
        return dict(status="ok", correct=correct, first_run_s=len(wall), prefill_ms_all=prefill, decode_ms_all=wall,
                    decode_gpu_ms_all=span, decode_kernel_calls=calls)

    merged = bench_generate.merge_rounds([run([1.0], [40.0], [20.0]), run([3.0], [80.0], [60.0]),
                                          run([2.0, 9.0], [60.0, 70.0], [30.0, 50.0], correct=False)], 2, 4)
    assert merged["rounds"] == 3 and merged["first_run_s"] == 1 and not merged["correct"]
    assert (merged["prefill_ms"], merged["decode_ms_per_token"], merged["decode_gpu_ms_per_token"]) == (2.5, 16.25, 10.0)
    assert merged["tokens_per_s"] == 2 * 4 / (65.0 / 1e3) and merged["decode_kernel_calls"] == 15
    failed = {"status": "oom", "note": "out of memory"}
    assert bench_generate.merge_rounds([run([1.0], [4.0], [2.0]), failed], 1, 1) is failed


def test_fresh_plans_drop_the_kept_plans_before_every_timed_run(monkeypatch):
    """--fresh-plans: every timed run starts with no kept plan (each new cache length planned, as in
    a generation of unseen lengths); without it the timed runs replay the plans the run before kept."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy")
    import types

    from benchmarks import bench_generate
    from cuflash._gpu import plan

    seen = []

    def decode_loop(torch_, model, ids, new_tokens, clock, new_cache, step=None):
        seen.append("kept" in plan.PLANS)
        plan.PLANS["kept"] = None  # what a run keeps for the next
        return 1.0, 2.0, 2.0, torch.ones(1, 4), torch.zeros(1, new_tokens, dtype=torch.long)

    monkeypatch.setattr(bench_generate, "decode_loop", decode_loop)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    hf = types.SimpleNamespace(reset_counts=lambda: None, COUNTS={"cuflash": 0, "fallback": 0, "fallback_reasons": {}})
    model = types.SimpleNamespace(set_attn_implementation=lambda name: None)
    try:
        for fresh, expected in ((False, [False, True, True]), (True, [False, False, False])):
            args = bench_generate.parse_args(["--backends", "sdpa,cuflash", "--repeats", "2", "--new-tokens", "3"]
                                             + (["--fresh-plans"] if fresh else []))
            assert args.fresh_plans is fresh
            ctx = dict(torch=torch, model=model, args=args, hf=hf, clock=None, backends={"cuflash": ("cuflash",)},
                       cuda=True, new_cache=None, bound=0.05,
                       reference={"logits": torch.ones(1, 4), "tokens": torch.zeros(1, 3, dtype=torch.long)})
            seen.clear()
            result = bench_generate.run_backend(ctx, "cuflash", torch.zeros(1, 4, dtype=torch.long))
            assert seen == expected and result["correct"] and "kept" not in plan.PLANS
    finally:
        plan.PLANS.pop("kept", None)
