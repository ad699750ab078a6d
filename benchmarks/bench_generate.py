"""A real model decoding: prefill a prompt, then greedy decoding token by token over transformers'
KV cache, cuflash (via cuflash.hf) against torch SDPA's backends, in one process on one model.

The model is bench_model.py's (a Llama-like transformers model from a config, random weights, no
download; ``--family``, ``--mha``/``--kv-heads`` as there); only the attention implementation
changes between backends (``sdpa`` is torch's own choice, ``sdpa_flash``/``sdpa_cudnn``/
``sdpa_efficient`` pinned by ``sdpa_kernel``). Each backend, for each ``BATCHxPROMPT`` shape:

* ``prefill_ms``: the prompt's forward into a fresh ``DynamicCache`` (``--cache static``: a
  ``StaticCache`` of the prompt and the new tokens) (``use_cache=True``,
  ``logits_to_keep=1``), median of ``--repeats`` (in each of ``--rounds``: the backends run in
  turn, round after round, and the medians are over all rounds' runs: an in-process A/B);
* ``decode_ms_per_token``: ``--new-tokens`` steps of one token per sequence (the argmax of the
  last logits fed back, the cache growing by one key each step), wall time from the first step's
  launch to the device's end of the last, divided by the steps: a decoding loop is host-bound at
  small batches, so this counts the host path of every layer's attention call (and the rest of
  the model's) as a serving loop without CUDA graphs pays it; median as the prefill's;
* ``decode_gpu_ms_per_token``: the same loop's span in CUDA events (on the CPU: equal to the wall
  time); a wall time far above it means the host, not the GPU, sets the pace;
* ``tokens_per_s``: batch x new tokens over the decode time; ``first_run_s``: wall time of the
  backend's first prefill + decode (kernel compilation or cache loading, plans);
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` over one prefill + decode (reset before);
* correctness against the reference backend (``sdpa``): ``logits_rel_diff``, the prefill's last
  logits (max abs difference over max abs), and ``same_tokens``: how many of the greedy tokens
  equal the reference's before the first difference (random weights give near-ties, so a late
  divergence in bf16 is rounding, not an error; an early one with a large logits difference is).

Every decode step of cuflash is one ``cuflash.torch.attention`` call with one query row per
sequence over the whole cache (transformers' cache concatenates the keys; the attention is
causal bottom-right, i.e. every cached key), GQA straight through. ``cuflash.hf.COUNTS`` must
show the calls were cuflash's (``attention_calls_cuflash``), not fallbacks; ``decode_kernel_calls``
counts those that ran on the decode kernel (few query rows a kv head: cuflash/_gpu/decode.py's
``dense_reason``). Backend ``cuflash_flash_only`` is cuflash with that routing off: the A/B in one
process.

Every timed run decodes the same prompt, so its cache lengths are the ones the run before met:
cuflash replays the plans kept for them (one per signature, cuflash/_gpu/plan.py's ``PLANS``).
``--fresh-plans`` drops the kept plans before every run, so each step's first call plans its new
length as a generation of unseen lengths would (a serving loop's prompts and lengths vary).

    python benchmarks/bench_generate.py [--shapes 1x1024,8x1024] [--new-tokens 128] [--backends ...]
    python benchmarks/bench_generate.py --device cpu --tiny      # a smoke test, no GPU

Writes benchmarks/results/<UTC>_<device>_generate.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    SDPA_PINNED, Clock, attention_backends, build_model, collect_environment, compiled_afresh, failure, max_abs_diff,
    model_config, parse_shape, token_ids)
from benchmarks.model_families import FAMILIES  # noqa: E402

DEFAULT_BACKENDS = ("sdpa", "cuflash", "sdpa_flash", "sdpa_cudnn")
# cuflash with its few-row dense calls kept off the decode kernel (decode.DENSE_MAX_ROWS at 0):
# the A/B of that routing inside one process (host timings move between processes).
CUFLASH_FLASH_ONLY = "cuflash_flash_only"
ALLOWED = ("sdpa", "cuflash", CUFLASH_FLASH_ONLY, *SDPA_PINNED)


def decode_loop(torch, model, ids, new_tokens: int, clock: Clock, new_cache, step=None):
    """Prefill ``ids`` into a fresh cache, then ``new_tokens`` greedy steps, each through ``step``
    (the model's forward compiled, given each step's cache_position as generate gives it; default:
    the model). Returns (prefill ms, decode wall ms, decode span ms on the device, the prefill's last
    logits, the tokens (B, n))."""
    cache = new_cache(model, ids.shape[1] + new_tokens)
    clock.sync()
    start = clock.mark()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    end = clock.mark()
    clock.sync()
    prefill_ms = clock.elapsed_ms(start, end)
    logits = out.logits[:, -1].float()
    token = logits.argmax(-1, keepdim=True)
    tokens = [token]
    position = torch.tensor([ids.shape[1] - 1], device=ids.device)  # (the prompt's last; outside the timing)
    wall = time.perf_counter()
    start = clock.mark()
    for _ in range(new_tokens):
        if step is None:
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
        else:
            position = position + 1  # (on the device, as generate advances it: no host copy per step)
            out = step(token, past_key_values=out.past_key_values, use_cache=True, cache_position=position)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    end = clock.mark()
    clock.sync()
    wall_ms = (time.perf_counter() - wall) * 1e3
    return prefill_ms, wall_ms, clock.elapsed_ms(start, end), logits, torch.cat(tokens[:new_tokens], dim=1)


@contextlib.contextmanager
def decode_kernel_routing(backend: str, cuda: bool):
    """Yields a list that counts the launches of dense calls on the decode kernel; for
    CUFLASH_FLASH_ONLY none is routed there. Kept plans and their families are dropped on entry
    and exit (a plan kept for a signature replays its kernel whatever the routing)."""
    launched = []
    if not cuda:
        yield launched
        return
    from cuflash._gpu import decode

    limit, launch = decode.DENSE_MAX_ROWS, decode.DenseDecodePlan.launch

    def counted(self, *args, **kwargs):
        launched.append(1)
        return launch(self, *args, **kwargs)

    drop_kept_plans()
    decode.DenseDecodePlan.launch = counted
    if backend == CUFLASH_FLASH_ONLY:
        decode.DENSE_MAX_ROWS = 0
    try:
        yield launched
    finally:
        decode.DENSE_MAX_ROWS, decode.DenseDecodePlan.launch = limit, launch
        drop_kept_plans()


def drop_kept_plans():
    """Forget cuflash's kept plans and their families (not its compiled kernels): the next call of
    each signature plans it again."""
    from cuflash._gpu import plan

    plan.PLANS.clear()
    plan.FAMILIES.clear()


def cache_factory(transformers, kind: str):
    """``(model, capacity) -> a fresh cache``: transformers' DynamicCache, or a StaticCache of
    ``capacity`` positions."""
    if kind == "static":
        return lambda model, capacity: transformers.StaticCache(config=model.config, max_cache_len=capacity)
    return lambda model, capacity: transformers.DynamicCache()


def run_backend(ctx, backend: str, ids) -> dict:
    torch, model, args, hf, clock = ctx["torch"], ctx["model"], ctx["args"], ctx["hf"], ctx["clock"]
    implementation = ctx["backends"][backend][0]
    model.set_attn_implementation(implementation)
    hf.reset_counts()
    pinned = SDPA_PINNED.get(backend)
    if pinned is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        within = sdpa_kernel([getattr(SDPBackend, pinned)])
    else:
        within = contextlib.nullcontext()
    result: dict = {"status": "ok"}
    step = None
    if args.compile is not None:
        step = compiled_afresh(torch, model.forward, args.compile_backend, mode=args.compile, fullgraph=True)
    with within, torch.inference_mode(), decode_kernel_routing(backend, ctx["cuda"]) as decode_launches:
        first = time.perf_counter()
        decode_loop(torch, model, ids, args.new_tokens, clock, ctx["new_cache"], step)
        result["first_run_s"] = time.perf_counter() - first
        runs = []
        for _ in range(args.repeats):
            if ctx["cuda"]:
                torch.cuda.reset_peak_memory_stats()
                if args.fresh_plans:
                    drop_kept_plans()
            runs.append(decode_loop(torch, model, ids, args.new_tokens, clock, ctx["new_cache"], step))
    prefill, wall, span = ([run[i] for run in runs] for i in range(3))
    result.update(timings(prefill, wall, span, ids.shape[0], args.new_tokens))
    if ctx["cuda"]:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["attention_calls_cuflash"] = hf.COUNTS["cuflash"]
    result["decode_kernel_calls"] = len(decode_launches)
    result["attention_calls_fallback"] = hf.COUNTS["fallback"]
    result["fallback_reasons"] = dict(hf.COUNTS["fallback_reasons"])
    logits, tokens = runs[-1][3], runs[-1][4]
    reference = ctx["reference"]
    if backend == args.backends[0]:
        reference.update(logits=logits, tokens=tokens)
    result["logits_rel_diff"] = max_abs_diff(logits, reference["logits"]) / max(
        float(reference["logits"].abs().max()), 1e-30)
    same = (tokens == reference["tokens"]).all(dim=0).long()
    result["same_tokens"] = int(same.cumprod(0).sum())
    result["correct"] = result["logits_rel_diff"] <= ctx["bound"] and (
        not backend.startswith("cuflash") or result["attention_calls_fallback"] == 0)
    return result


def merge_rounds(results: list[dict], batch: int, new_tokens: int) -> dict:
    """One backend's result over ``--rounds`` (each a run_backend's): the medians over every
    round's timed runs, correct only if every round was, ``first_run_s`` the first round's; a
    failed round's result where one failed."""
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        return failed[0]
    merged = dict(results[0], rounds=len(results), correct=all(r["correct"] for r in results),
                  decode_kernel_calls=sum(r["decode_kernel_calls"] for r in results))
    merged.update(timings(*([x for r in results for x in r[name]]
                            for name in ("prefill_ms_all", "decode_ms_all", "decode_gpu_ms_all")), batch, new_tokens))
    return merged


def timings(prefill: list, wall: list, span: list, batch: int, new_tokens: int) -> dict:
    """The timed runs' figures: every run's prefill, decode wall and decode device ms, and their
    medians (the decode's per token, and as tokens/s)."""
    median_wall = statistics.median(wall)
    return dict(prefill_ms=statistics.median(prefill), decode_ms_per_token=median_wall / new_tokens,
                decode_gpu_ms_per_token=statistics.median(span) / new_tokens,
                tokens_per_s=batch * new_tokens / (median_wall / 1e3),
                prefill_ms_all=prefill, decode_ms_all=wall, decode_gpu_ms_all=span)


def run_guarded(ctx, backend: str, ids) -> dict:
    """run_backend, its failure recorded as bench_model records one (oom, unsupported, error)."""
    try:
        return run_backend(ctx, backend, ids)
    except Exception as error:  # noqa: BLE001 - one backend failing must not stop the others
        return failure(ctx["torch"], error)
    finally:
        if ctx["cuda"]:
            ctx["torch"].cuda.empty_cache()


def format_table(rows: list[dict], new_tokens: int, dtype_name: str, compiled: str | None = None) -> str:
    lines = []
    for row in rows:
        results = row["results"]
        lines += [f"### {row['shape']} (batch {row['batch']}, prompt {row['prompt']}, {new_tokens} new tokens, "
                  f"{dtype_name})", "",
                  "| backend | prefill ms | decode ms/token (wall) | GPU ms/token | tokens/s | first run s | "
                  "peak GiB | logits diff | same tokens | x vs sdpa | decode-kernel calls |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = results.get("sdpa", {}).get("decode_ms_per_token")
        for backend, r in results.items():
            if r.get("status") != "ok":
                lines.append(f"| {backend} | {r.get('status')}: {r.get('note', '')[:80]} |" + " |" * 10)
                continue
            ratio = f"{base / r['decode_ms_per_token']:.2f}" if base else "-"
            flag = "" if r["correct"] else " !"
            lines.append(f"| {backend} | {r['prefill_ms']:.2f} | {r['decode_ms_per_token']:.3f} | "
                         f"{r['decode_gpu_ms_per_token']:.3f} | {r['tokens_per_s']:,.0f} | {r['first_run_s']:.2f} | "
                         f"{r.get('peak_gib', float('nan')):.2f} | {r['logits_rel_diff']:.1e}{flag} | "
                         f"{r['same_tokens']}/{new_tokens} | {ratio} | {r.get('decode_kernel_calls', '-')} |")
        lines.append("")
    lines.append("Decode ms/token: wall time of the greedy loop (host and device) per step; GPU "
                 "ms/token: the same loop's CUDA-event span. x vs sdpa: sdpa's decode time / this one's (> 1: "
                 "faster). Same tokens: greedy tokens equal to sdpa's before the first difference. Decode-kernel "
                 "calls: cuflash's dense calls that ran on the decode kernel (all runs)."
                 + (f" Decode steps compiled (torch.compile of the forward, {compiled}, fullgraph; the prefill "
                    "eager); the first run s holds the compilation; the decode-kernel calls count eager calls only."
                    if compiled else ""))
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model (2 layers, hidden 64), float32; "
                        "default shape 2x32 and 8 new tokens: a smoke test")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--mha", action="store_true", help="16 key/value heads (no GQA)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8; tiny: 2)")
    parser.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")], default=None,
                        help="comma-separated BATCHxPROMPT (default 1x1024,8x1024)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy steps (default 128; tiny: 8)")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, sdpa (the reference) included; default {','.join(DEFAULT_BACKENDS)}, "
                             f"any of {','.join(ALLOWED)}")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend and round (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over the backends in turn (medians over all: an A/B that host-speed drifts "
                             "within the process touch alike)")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="transformers' DynamicCache (grown by a key each step) or StaticCache (allocated for the "
                             "prompt and the new tokens; each step's mask hides the slots not yet filled)")
    parser.add_argument("--compile", choices=("default", "reduce-overhead"), default=None,
                        help="decode steps through torch.compile(model.forward, mode=..., fullgraph=True), "
                             "transformers' fast-generation recipe (reduce-overhead: CUDA graphs); the prefill stays "
                             "eager; needs --cache static; the first run holds the compilation")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend with --compile (the mode applies to inductor; aot_eager for "
                             "a quick check)")
    parser.add_argument("--fresh-plans", action="store_true",
                        help="drop cuflash's kept plans before every timed run (each new cache length planned, as "
                             "in a generation of lengths not seen before)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = [(2, 32)] if args.tiny else [(1, 1024), (8, 1024)]
    if args.new_tokens is None:
        args.new_tokens = 8 if args.tiny else 128
    args.backends = args.backends or list(DEFAULT_BACKENDS)
    unknown = set(args.backends) - set(ALLOWED)
    if unknown or "sdpa" not in args.backends:
        parser.error(f"--backends: {sorted(unknown)} not among {','.join(ALLOWED)}" if unknown
                     else "--backends must include sdpa (the correctness reference)")
    args.backends = ["sdpa"] + [b for b in args.backends if b != "sdpa"]
    if args.new_tokens < 1 or args.repeats < 1 or args.rounds < 1:
        parser.error("--new-tokens, --repeats and --rounds must be at least 1")
    if args.compile is not None and args.cache != "static":
        parser.error("--compile needs --cache static (a DynamicCache grows every step: a recompilation each)")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    import torch
    import transformers

    import cuflash.hf as hf

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_generate: --device cuda but torch sees no CUDA device (use --device cpu --tiny)")
    dtype = torch.float32 if args.tiny or not cuda else torch.bfloat16
    dtype_name = "fp32" if dtype == torch.float32 else "bf16"
    family = FAMILIES[args.family]
    model_args = argparse.Namespace(**vars(args))
    model_args.shapes = [(batch, prompt + args.new_tokens) for batch, prompt in args.shapes]  # (positions)
    config = model_config(model_args)
    model = build_model(torch, transformers, family, config, dtype, args.device).eval()
    clock = Clock(torch, cuda)
    backends = attention_backends(hf, model, hf.register())
    backends[CUFLASH_FLASH_ONLY] = backends["cuflash"]
    ctx = dict(torch=torch, model=model, clock=clock, args=args, hf=hf, backends=backends, cuda=cuda,
               new_cache=cache_factory(transformers, args.cache), reference={},
               bound=0.05 if dtype_name == "bf16" else 1e-4)
    env = collect_environment(torch, args.device)
    record = {"sweep": "generate", **env, "dtype": dtype_name, "family": family.name, "model_config": config,
              "backends": args.backends, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "rounds": args.rounds, "fresh_plans": args.fresh_plans, "cache": args.cache,
              "compile": None if args.compile is None else f"{args.compile_backend} {args.compile}",
              "loop": f"prefill into a {args.cache} cache (logits_to_keep=1), then greedy steps of one token per "
                      "sequence; wall time from the first step to the device's end of the last",
              "rows": []}
    path = records.record_path(args.out_dir, record["date_utc"], record["device"], "generate")
    print(f"[generate] {record['device']} torch {env['torch']} transformers {env['transformers']} {dtype_name} "
          f"{family.name} {config}", file=sys.stderr, flush=True)

    def save():
        record["table"] = format_table(record["rows"], args.new_tokens, dtype_name, record["compile"])
        records.write(record, path)

    def rows():
        for batch, prompt in args.shapes:
            ids = token_ids(torch, config, batch, prompt, args.device)
            row = {"shape": f"{batch}x{prompt}", "batch": batch, "prompt": prompt, "results": {}}
            record["rows"].append(row)
            with torch.inference_mode():  # start-up (CUDA context, cuBLAS, allocator) on no backend's account
                model.set_attn_implementation("sdpa")
                decode_loop(torch, model, ids, 2, clock, ctx["new_cache"])
            ctx["reference"].clear()
            rounds = {backend: [] for backend in args.backends}
            for round_index in range(args.rounds):
                for backend in args.backends:
                    print(f"[generate] {row['shape']} {backend} round {round_index + 1}/{args.rounds}",
                          file=sys.stderr, flush=True)
                    rounds[backend].append(run_guarded(ctx, backend, ids))
                    row["results"][backend] = merge_rounds(rounds[backend], batch, args.new_tokens)
                    save()
            for backend in args.backends:
                records.log_result("generate", row["shape"], backend, row["results"][backend])

    return records.run_rows(record, path, save, rows)

if __name__ == "__main__":
    main()
