"""float32 and float64 attention (issue 20): cuflash's precisions against torch SDPA, speed and accuracy.

Per point (dtype x head dim D x causal x L, forward and forward + backward timed separately), every
implementation runs on the same inputs in one process, on one CUDA stream, timed with CUDA events
(harness.py: input copies rotated past L2, warm-up, calibrated repeat count, median):

* ``cuflash_highest``  ``cuflash.attention(..., precision="highest")``: float32-accurate (the
                       forward in 3xTF32 on tensor cores up to d64, on Hopper d128 too, and
                       on Hopper the backward up to d64 (dK/dV, and the deterministic dQ);
                       FFMA elsewhere; float64: the float64 kernels, its only precision)
* ``cuflash_tf32``     ... ``precision="tf32"``: one TF32 product (float32 only)
* ``cuflash_ieee``     ... ``precision="ieee"``: the FFMA kernels (float32 only)
* ``sdpa_efficient``   torch SDPA under ``sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])``
* ``sdpa_math``        ... ``SDPBackend.MATH``: L x L scores in memory, so only where they fit
                       (``--max-scores-gb``); torch's float32 matmuls without TF32

fwd+bwd = ``cuflash.attention(return_lse=True)`` + ``cuflash.attention_backward``; torch: the
forward on inputs requiring grad, then ``torch.autograd.grad(out, (q, k, v), dout)`` (what
``out.backward(dout)`` computes, without accumulating into ``.grad``). Shapes: B x L = --tokens
(16384), H x D = --hidden (2048), layout (B, H, L, D), standard-normal inputs, scale 1/sqrt(D).
FLOPs = 4 B H L^2 D, x0.5 causal, x3.5 fwd+bwd. The tables give TFLOP/s per implementation and
each cuflash precision's speed over sdpa_efficient's (and cuflash_highest's over sdpa_math's).

Accuracy, per point and output (out; dq, dk, dv): max |x - ref| / max |ref| over two (batch, head)
slices (the first and the last) against a float64 reference of those slices (harness.py's, on the
GPU), for every implementation, and for a plain float32 implementation on the same slices (torch
float32 matmul, softmax, matmul and autograd, TF32 off) as the baseline; float64 points feed it
their inputs rounded to float32. '!' = outside harness.py's loose bound for the dtype.

    python benchmarks/bench_precision.py --quick        # D 64/128, L 4k, non-causal: ~1-2 min on an H200
    python benchmarks/bench_precision.py                # D 32-256 x L 1k/4k/16k x causal x fp32/fp64
    python benchmarks/bench_precision.py --headdim 128 --seqlen 16k --causal true --dtype float32 --forward-only

Writes benchmarks/results/<UTC>_<gpu>_precision.json (--out-dir) and prints Markdown tables.
``--max-seconds``: no point starts after that many seconds (a started one finishes); the record
lists the points left out. Importing this module needs neither torch nor CuPy (``--help`` works
anywhere); running it needs a GPU, CuPy and torch with CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness, tables  # noqa: E402  (import neither torch nor CuPy)
from benchmarks import record as records  # noqa: E402

PRECISIONS = ("highest", "tf32", "ieee")
CUFLASH_IMPLS = tuple(f"cuflash_{p}" for p in PRECISIONS)
IMPLEMENTATIONS = (*CUFLASH_IMPLS, "sdpa_efficient", "sdpa_math")
EFFICIENT, MATH = "sdpa_efficient", "sdpa_math"
BASELINE = "plain_fp32"
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "float64": "fp64", "fp64": "fp64"}
MODES = ("fwd", "fwd+bwd")

# Options left unset on the command line take --quick's value (with --quick), else the sweep's.
SWEEP = {"dtype": ["fp32", "fp64"], "headdim": [32, 64, 128, 256], "seqlen": [1024, 4096, 16384],
         "causal": [False, True], "repeats": 10, "min_time_ms": 100.0, "max_seconds": None}
QUICK = {"headdim": [64, 128], "seqlen": [4096], "causal": [False], "repeats": 5, "min_time_ms": 30.0,
         "max_seconds": 120.0}
# The MATH backend's L x L matrices (harness.materialized_scores_bytes' estimate) may take this
# much: an H200 has 141 GB, the inputs take a few.
DEFAULT_MAX_SCORES_GB = 64.0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def length(text: str) -> int:
    """``4096``, ``4k`` -> 4096."""
    match = re.fullmatch(r"(\d+)([kK]?)", text)
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) << (10 if match.group(2) else 0)


# How the items of the list options read (given as comma-separated text).
ITEMS = {"dtype": DTYPE_NAMES.__getitem__, "headdim": int, "seqlen": length,
         "causal": lambda text: {"true": True, "yes": True, "false": False, "no": False}[text.lower()]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_precision.py", description=__doc__.split("\n")[0],
        epilog="Lists are comma separated. Defaults in brackets are --quick's.")
    parser.add_argument("--dtype", help="float32, float64 (default: both)")
    parser.add_argument("--headdim", help="D (default: 32,64,128,256 [64,128])")
    parser.add_argument("--seqlen", help="L, each dividing --tokens (default: 1k,4k,16k [4k])")
    parser.add_argument("--causal", help="false, true (default: both [false])")
    parser.add_argument("--forward-only", action="store_true", help="time the forward only (no fwd+bwd points)")
    parser.add_argument("--quick", action="store_true",
                        help="D 64,128, L 4k, non-causal, fp32 and fp64, fwd and fwd+bwd, --repeats 5, "
                        "--min-time-ms 30, --max-seconds 120: about 1-2 minutes on an H200 with kernels cached")
    parser.add_argument("--tokens", type=int, default=16384, help="B * L (default: 16384)")
    parser.add_argument("--hidden", type=int, default=2048, help="H * D (default: 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="minimum timed calls per point (10 [5])")
    parser.add_argument("--min-time-ms", type=float, default=None,
                        help="minimum timed GPU time per implementation and point (100 [30])")
    parser.add_argument("--max-repeats", type=int, default=1000, help="cap on timed calls (1000)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="wall-clock budget: no point starts after it (none [120])")
    parser.add_argument("--max-scores-gb", type=float, default=DEFAULT_MAX_SCORES_GB,
                        help=f"skip sdpa_math where its L x L matrices need more ({DEFAULT_MAX_SCORES_GB:g}; "
                        "0: never run it)")
    parser.add_argument("--out-dir", type=Path, default=records.RESULTS_DIR,
                        help="where the JSON goes (benchmarks/results/)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, lists parsed and unset options filled (from QUICK under --quick, else SWEEP)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, convert in ITEMS.items():
        text = getattr(args, key)
        try:
            setattr(args, key, None if text is None else [convert(x.strip()) for x in text.split(",") if x.strip()])
        except (KeyError, ValueError):
            parser.error(f"--{key}: cannot read {text!r}")
    for key, value in {**SWEEP, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mode = ["fwd"] if args.forward_only else list(MODES)
    return args


def configs(args: argparse.Namespace) -> list:
    """The points, shortest L first (a --max-seconds cut drops the longest), each shape's
    dtypes and modes together."""
    points = []
    for seqlen, headdim, causal, mode, dtype in itertools.product(
            args.seqlen, args.headdim, args.causal, args.mode, args.dtype):
        if args.tokens % seqlen or args.hidden % headdim:
            raise SystemExit(f"bench_precision: L={seqlen} must divide --tokens {args.tokens} and "
                             f"D={headdim} --hidden {args.hidden}")
        points.append(harness.Config(mode, dtype, headdim, causal, seqlen, seqlen,
                                     batch=args.tokens // seqlen, heads=args.hidden // headdim))
    return points


# ----------------------------------------------------------------------------------------------
# Implementations, baseline, ratios
# ----------------------------------------------------------------------------------------------


def cuflash_preparer(precision: str):
    """harness.prepare_cuflash with precision=; the first call (kernel compile or cache load
    included) is timed once as the runner's compile_s (never part of the timing)."""
    def prepare(case: harness.Case) -> harness.Runner:
        if case.config.dtype != "fp32" and precision != "highest":
            raise harness.NotRun("skipped", f"precision={precision!r} applies to float32 only")
        begin = time.perf_counter()
        run = harness.prepare_cuflash(case, precision)
        run(0)
        case.libs.cupy.cuda.get_current_stream().synchronize()
        run.compile_s = time.perf_counter() - begin
        return run
    return prepare


def plain_float32(case: harness.Case, reference: dict) -> dict:
    """The baseline: plain float32 attention (torch matmul / softmax / matmul, autograd for the
    gradients, TF32 off) on the checked slices of the first input copy, and its errors."""
    torch, config, first = case.libs.torch, case.config, case.copies[0]
    got: dict = {name: [] for name in reference}
    for b, h in harness.checked_heads(config):
        q, k, v = (t[b, h].detach().float().requires_grad_() for t in (first.tq, first.tk, first.tv))
        scores = (q @ k.T) * config.scale
        if config.causal:  # bottom-right: query i sees key j <= i + Lk - Lq
            hidden = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(hidden.triu(config.seqlen_k - config.seqlen_q + 1), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        outputs = {"out": out}
        if config.has_backward:
            grads = torch.autograd.grad(out, (q, k, v), first.tdout[b, h].float())
            outputs.update(zip(("dq", "dk", "dv"), grads))
        for name in got:
            got[name].append(outputs[name].detach())
        del scores, out, outputs
    errors = {name: harness.head_errors(case.libs, got[name], reference[name]) for name in reference}
    del got
    harness.release_memory(case.libs)
    return {BASELINE: {"abs_err_by_output": {name: e[0] for name, e in errors.items()},
                       "rel_err_by_output": {name: e[1] for name, e in errors.items()}},
            "reference_max_abs": {name: max(float(abs(x).max()) for x in exact)
                                  for name, exact in reference.items()}}


def speed_ratios(results: dict) -> dict:
    """Each cuflash precision's TFLOP/s over sdpa_efficient's, and cuflash_highest's over
    sdpa_math's, where both ran (whatever their errors: those are in the accuracy table)."""
    def tflops(name: str):
        result = results.get(name, {})
        return result["tflops"] if result.get("status") == "ok" else None

    ours = {name: tflops(name) for name in CUFLASH_IMPLS}
    efficient, math = tflops(EFFICIENT), tflops(MATH)
    return {"vs_sdpa_efficient": {name: t / efficient for name, t in ours.items() if t and efficient},
            "highest_vs_sdpa_math": ours["cuflash_highest"] / math if ours["cuflash_highest"] and math else None}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def error_cell(error, bound: float) -> str:
    return "-" if error is None else f"{error:.1e}" + ("!" if error > bound else "")


def shape_cells(row: dict) -> list:
    return [row["mode"], row["dtype"], str(row["headdim"]), "yes" if row["causal"] else "no",
            str(row["seqlen_q"]), str(row["batch"]), str(row["heads"])]


def point_label(row: dict) -> str:
    return (f"{row['mode']} {row['dtype']} D={row['headdim']} {'causal' if row['causal'] else 'full'} "
            f"L={row['seqlen_q']}")


def markdown(header: list, lines: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def format_tables(rows: list) -> str:
    rows = sorted(rows, key=lambda r: (r["dtype"], r["mode"], r["headdim"], r["causal"], r["seqlen_q"]))
    shape = ["mode", "dtype", "D", "causal", "L", "B", "H"]
    speed = [[*shape_cells(row), *(tables._result_cell(row["results"].get(name)) or "-" for name in IMPLEMENTATIONS),
              *(f"{row['vs_sdpa_efficient'][name]:.2f}x" if name in row["vs_sdpa_efficient"] else "-"
                for name in CUFLASH_IMPLS),
              f"{row['highest_vs_sdpa_math']:.2f}x" if row["highest_vs_sdpa_math"] else "-"]
             for row in rows]
    out = ["TFLOP/s (median of CUDA-event timings; FLOPs = 4*B*H*L^2*D, x0.5 causal, x3.5 fwd+bwd); "
           "'!' = error outside the dtype's bound", "",
           *markdown([*shape, *IMPLEMENTATIONS, *(f"{p} / eff" for p in PRECISIONS), "highest / math"], speed)]

    accuracy = []
    for row in rows:
        bounds = harness.BWD_TOLERANCE if row["mode"] != "fwd" else harness.FWD_TOLERANCE
        for output, magnitude in row["reference_max_abs"].items():
            errors = [row["results"].get(name, {}).get("rel_err_by_output", {}).get(output)
                      for name in IMPLEMENTATIONS]
            accuracy.append([*shape_cells(row)[:5], output, f"{magnitude:.3g}",
                             *(error_cell(e, bounds[row["dtype"]]) for e in errors),
                             error_cell(row[BASELINE]["rel_err_by_output"][output], bounds["fp32"])])
    out += ["", "max |x - ref| / max |ref| against float64 on two (batch, head) slices ('!': outside the dtype's "
            "bound; plain_fp32, torch float32 matmul/softmax with TF32 off on the same slices, against "
            "float32's)", "",
            *markdown([*shape[:5], "output", "max |ref|", *IMPLEMENTATIONS, BASELINE], accuracy)]

    out += ["", *worst_against_baseline(rows)]
    compile_times = {name: [r["results"][name]["compile_s"] for r in rows if "compile_s" in r["results"].get(name, {})]
                     for name in CUFLASH_IMPLS}
    spans = [f"{name} {min(t):.1f}-{max(t):.1f} s" for name, t in compile_times.items() if t]
    if spans:
        out.append(f"first call per point (kernel compile or cache load, outside the timings): {', '.join(spans)}")
    for (name, status, note), count in tables.failure_reasons(rows).items():
        out.append(f"  {name} {status} x{count}: {note}")
    return "\n".join(out)


def worst_against_baseline(rows: list) -> list:
    """Per cuflash precision, its largest error over plain float32's on the same output and
    float32 point."""
    lines = []
    for name in CUFLASH_IMPLS:
        worst = None
        for row in (r for r in rows if r["dtype"] == "fp32"):
            errors = row["results"].get(name, {}).get("rel_err_by_output") or {}
            for output, error in errors.items():
                base = row[BASELINE]["rel_err_by_output"].get(output)
                if error is not None and base:
                    worst = max(worst or (0.0, ""), (error / base, f"{point_label(row)} {output}"))
        if worst:
            lines.append(f"{name}: error at most {worst[0]:.2f}x plain float32's ({worst[1]})")
    return lines


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    points = configs(args)

    libs = harness.load_libraries()  # SystemExit without a GPU or CuPy
    if libs.torch is None:
        raise SystemExit(f"bench_precision: needs torch with CUDA for the peers and the baseline ({libs.torch_note})")
    torch = libs.torch
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        print("note: torch allowed TF32 in float32 matmuls; switched off for sdpa_math and the baseline",
              file=sys.stderr)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    stream = harness.shared_stream(libs)
    environment = harness.collect_environment(libs)
    environment["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    print(f"{environment['device']} (sm {environment['compute_capability']}), torch {environment['torch']}, "
          f"cupy {environment['cupy']}, cuflash {environment['cuflash']}, commit {environment['git_commit'][:10]}, "
          f"{len(points)} points", file=sys.stderr)
    if libs.cuflash_note:
        print(f"note: {libs.cuflash_note}", file=sys.stderr)

    policy = harness.TimingPolicy(args.repeats, args.min_time_ms, args.max_repeats)
    hooks = harness.SweepHooks(
        preparers={f"cuflash_{p}": cuflash_preparer(p) for p in PRECISIONS}, extra=plain_float32,
        summary=speed_ratios, deadline=None if args.max_seconds is None else started + args.max_seconds)
    with stream:
        rows, interrupted = harness.run_sweep(points, list(IMPLEMENTATIONS), libs, policy,
                                              args.max_scores_gb * 2**30,
                                              environment["l2_cache_bytes"] or harness.FALLBACK_L2_BYTES, hooks)
    not_run = [] if interrupted else [config.label for config in points[len(rows):]]
    print(format_tables(rows))
    if not_run:
        print(f"\n{len(not_run)} points not run (--max-seconds {args.max_seconds:g}): " + "; ".join(not_run))
    if not args.no_save and rows:
        record = {**environment, "sweep": "precision", "args": vars(args), "implementations": list(IMPLEMENTATIONS),
                  "timing_policy": dataclasses.asdict(policy), "elapsed_s": time.monotonic() - started,
                  "interrupted": interrupted, "not_run": not_run, "rows": rows}
        print(f"\nrecorded {tables.save_results(record, args.out_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
