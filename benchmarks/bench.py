"""Throughput benchmark: cuflash attention against torch SDPA backends, FlexAttention and
standard attention; entry point of the decode, memory and first-call latency sweeps.

For every point of the sweep mode x dtype x head dim x causal x sequence length, each
implementation runs on the same inputs (one allocation, seen by torch as tensors and by CuPy as
zero-copy views), on the same CUDA stream, timed with CUDA events:

* ``cuflash``        ``cuflash.attention`` / ``cuflash.attention_backward``
* ``sdpa_flash``     torch SDPA restricted to ``SDPBackend.FLASH_ATTENTION``
* ``sdpa_cudnn``     ... ``SDPBackend.CUDNN_ATTENTION``
* ``sdpa_efficient`` ... ``SDPBackend.EFFICIENT_ATTENTION``
* ``sdpa_math``      ... ``SDPBackend.MATH`` (materializes the score matrix: small L only)
* ``flex``           ``torch.nn.attention.flex_attention`` under ``torch.compile``, compiled once
                     per shape outside the timing; causal through a block mask
* ``naive_cupy``     standard attention in CuPy: matmul, softmax (fp32 for fp16/bf16), matmul

Shapes follow the FlashAttention-2 paper's benchmark: batch x L = 16384 tokens, hidden 2048,
heads = 2048 // D, layout (B, H, L, D). FLOPs = 4 B H Lq Lk D, x0.5 causal, x2.5 backward,
x3.5 forward+backward. Each output is checked against an fp64 reference on two heads, so a fast
wrong kernel is flagged instead of looking good.

``--decode`` runs the same measurement on decode-like shapes (a few query rows against a long
KV cache) and adds the achieved K+V read bandwidth. ``--memory`` (bench_memory.py) and
``--latency`` (bench_latency.py) are separate sweeps; ``--report`` (bench_report.py) turns
recorded JSON into ``results/latest.md``, plots and the README's Benchmarks section.

Usage (see benchmarks/README.md)::

    python benchmarks/bench.py --quick
    python benchmarks/bench.py --dtype bf16,fp16 --headdim 128 --seqlen 1k,4k,16k
    python benchmarks/bench.py --decode --quick
    python benchmarks/bench.py --memory
    python benchmarks/bench.py --latency
    python benchmarks/bench.py --report benchmarks/results/<file>.json [more.json ...]

Importing this module needs neither torch nor CuPy: ``--help``, ``--plot`` and ``--report`` work
on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    CUFLASH,
    DEFAULT_MAX_SCORES_GB,
    DTYPES,
    FALLBACK_L2_BYTES,
    FLEX,
    MODES,
    PEERS,
    Config,
    Libraries,
    TimingPolicy,
    collect_environment,
    load_libraries,
    run_sweep,
    shared_stream,
)
from benchmarks.tables import format_table, save_results  # noqa: E402

DEFAULT_OUT_DIR = records.RESULTS_DIR

# ----------------------------------------------------------------------------------------------
# What is swept
# ----------------------------------------------------------------------------------------------

DEFAULT_TOKENS = 16384  # batch * seqlen
DEFAULT_HIDDEN = 2048  # heads * headdim
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_HEADDIMS = (64, 128)

# Decode-like shapes: a few query rows (one generated token, or a short speculative draft)
# against a long KV cache. The batch shrinks as the cache grows so that K+V stay a few GB.
DEFAULT_DECODE_SEQLENS_Q = (1, 4, 16)
DEFAULT_DECODE_SEQLENS_K = (4096, 16384, 65536, 131072)
DEFAULT_DECODE_KV_TOKENS = 262144  # batch * Lk: K+V = 2 GiB in bf16 at hidden 2048

# Defaults of the sweep-shaping options, per sweep; --quick overrides only what the command
# line leaves unset. Peers: None means every peer except FlexAttention under --quick, whose
# torch.compile per shape alone would take longer than the quick run's minute.
SWEEP_DEFAULTS = {
    "training": {"mode": ["fwd"], "dtype": list(DTYPES), "headdim": list(DEFAULT_HEADDIMS),
                 "causal": [False, True], "seqlen": list(DEFAULT_SEQLENS)},
    "decode": {"mode": ["fwd"], "dtype": ["bf16", "fp16"], "headdim": list(DEFAULT_HEADDIMS),
               "causal": [False], "decode_lq": list(DEFAULT_DECODE_SEQLENS_Q),
               "decode_lk": list(DEFAULT_DECODE_SEQLENS_K)},
    "memory": {"mode": ["fwd", "bwd"], "dtype": ["bf16"], "headdim": [128], "causal": [False]},
    "latency": {"dtype": ["bf16", "fp16", "fp32"], "headdim": list(DEFAULT_HEADDIMS),
                "causal": [False]},
}
QUICK_DEFAULTS = {
    "training": {"mode": ["fwd"], "dtype": ["bf16"], "headdim": [128, 64],
                 "causal": [False, True], "seqlen": [1024, 4096, 16384]},
    "decode": {"mode": ["fwd"], "dtype": ["bf16"], "headdim": [128], "causal": [False],
               "decode_lq": [1, 16], "decode_lk": [4096, 65536]},
    "memory": {"mode": ["fwd"], "dtype": ["bf16"], "headdim": [128], "causal": [False],
               "memory_cap": 32768},
    "latency": {"dtype": ["bf16"], "headdim": [128], "causal": [False]},
}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _comma_list(convert: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except (ValueError, KeyError) as exc:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}: {exc}") from None

    return parse


def _parse_mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    return text


def _parse_dtype(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    return text


def _parse_causal(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "causal"):
        return True
    if lowered in ("false", "0", "no", "none"):
        return False
    raise ValueError("causal must be true or false")


def _parse_seqlen(text: str) -> int:
    """``512``, ``1k``, ``16K`` -> 512, 1024, 16384."""
    match = re.fullmatch(r"(\d+)([kK]?)", text)
    if not match:
        raise ValueError(f"not a sequence length: {text!r}")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def _parse_peers(text: str) -> list[str]:
    if text in ("all", ""):
        return list(PEERS)
    if text == "none":
        return []
    peers = _comma_list(str)(text)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}, all, none"
        )
    return peers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark cuflash attention against torch SDPA backends and standard "
        "attention (TFLOP/s, CUDA events, fp64-checked outputs).",
        epilog="Lists are comma separated, e.g. --dtype bf16,fp16 --seqlen 1k,4k,16k.",
    )
    # Sweep-shaping options default to None: the sweep (and --quick) decides, see SWEEP_DEFAULTS.
    parser.add_argument("--mode", type=_comma_list(_parse_mode), default=None,
                        help="fwd, bwd, fwd+bwd (default: fwd; --memory: fwd,bwd)")
    parser.add_argument("--dtype", type=_comma_list(_parse_dtype), default=None,
                        help="bf16, fp16, fp32, fp64 (default: all; --decode: bf16,fp16; "
                        "--memory: bf16; --latency: bf16,fp16,fp32)")
    parser.add_argument("--headdim", type=_comma_list(int), default=None,
                        help="head dimensions D (default: 64,128; --memory: 128; 256 works too)")
    parser.add_argument("--causal", type=_comma_list(_parse_causal), default=None,
                        help="false, true (default: both; --decode, --memory, --latency: false)")
    parser.add_argument("--seqlen", type=_comma_list(_parse_seqlen), default=None,
                        help="default: 512,1k,2k,4k,8k,16k")
    parser.add_argument("--peers", type=_parse_peers, default=None,
                        help=f"all, none or a list of {', '.join(PEERS)} (default: all; "
                        f"--quick: all but {FLEX})")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: fwd, bf16, D 128 and 64, L 1k/4k/16k, both causal; "
                        "with --decode/--memory/--latency a small version of that sweep")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"batch * seqlen (default: {DEFAULT_TOKENS})")
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN,
                        help=f"heads * headdim (default: {DEFAULT_HIDDEN})")
    parser.add_argument("--repeats", type=int, default=10,
                        help="minimum timed repeats per point (default: 10)")
    parser.add_argument("--min-time-ms", type=float, default=100.0,
                        help="minimum total timed GPU time per point (default: 100)")
    parser.add_argument("--max-repeats", type=int, default=1000,
                        help="cap on timed repeats per point (default: 1000)")
    parser.add_argument("--max-scores-gb", type=float, default=DEFAULT_MAX_SCORES_GB,
                        help="skip sdpa_math / naive_cupy when their L x L score matrices would "
                        f"need more than this (default: {DEFAULT_MAX_SCORES_GB:g})")

    sweeps = parser.add_mutually_exclusive_group()
    sweeps.add_argument("--decode", action="store_true",
                        help="decode-like shapes: Lq rows against an Lk KV cache; adds K+V GB/s")
    sweeps.add_argument("--memory", action="store_true",
                        help="memory sweep: L doubles from 1k (B=1) until OOM or --memory-cap; "
                        "peak bytes per implementation (bench_memory.py)")
    sweeps.add_argument("--latency", action="store_true",
                        help="first-call latency of cuflash in new processes, with an empty and "
                        "with a filled kernel cache (bench_latency.py)")
    parser.add_argument("--decode-lq", type=_comma_list(_parse_seqlen), default=None,
                        help="--decode query rows (default: 1,4,16)")
    parser.add_argument("--decode-lk", type=_comma_list(_parse_seqlen), default=None,
                        help="--decode KV lengths (default: 4k,16k,64k,128k)")
    parser.add_argument("--decode-kv-tokens", type=_parse_seqlen,
                        default=DEFAULT_DECODE_KV_TOKENS,
                        help="--decode batch * Lk (default: 256k; at least batch 1)")
    parser.add_argument("--memory-cap", type=_parse_seqlen, default=None,
                        help="--memory: longest L tried (default: 256k; --quick: 32k)")
    parser.add_argument("--memory-heads", type=int, default=16,
                        help="--memory: heads (default: 16)")
    parser.add_argument("--latency-seqlen", type=_parse_seqlen, default=4096,
                        help="--latency: L of the first call, B=1, H=hidden/D (default: 4k)")

    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where JSON and PNG go (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    parser.add_argument("--plot", type=Path, default=None, metavar="JSON",
                        help="only regenerate the plots of a recorded JSON, then exit")
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSON",
                        help="no GPU: from recorded JSON files write results/latest.md and the "
                        "plots, and update README.md's Benchmarks section, then exit")
    return parser


def sweep_name(args: argparse.Namespace) -> str:
    return ("decode" if args.decode else "memory" if args.memory
            else "latency" if args.latency else "training")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options the command line left unset from the sweep's (or --quick's) defaults."""
    sweep = sweep_name(args)
    defaults = {**SWEEP_DEFAULTS[sweep], **(QUICK_DEFAULTS[sweep] if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.memory_cap is None:
        args.memory_cap = 262144
    if args.peers is None:
        args.peers = [p for p in PEERS if p != FLEX] if args.quick else list(PEERS)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _head_layouts(args: argparse.Namespace):
    """(mode, dtype, D, causal, heads) of a sweep, in order: heads * D = hidden."""
    for mode, dtype, headdim, causal in itertools.product(args.mode, args.dtype, args.headdim, args.causal):
        if args.hidden % headdim:
            raise SystemExit(f"--hidden {args.hidden} is not a multiple of D={headdim}")
        yield mode, dtype, headdim, causal, args.hidden // headdim


def training_configs(args: argparse.Namespace) -> list[Config]:
    """The FlashAttention-2 training sweep: batch * L = tokens, heads * D = hidden."""
    configs = []
    for mode, dtype, headdim, causal, heads in _head_layouts(args):
        for seqlen in args.seqlen:
            if seqlen > args.tokens or args.tokens % seqlen:
                raise SystemExit(f"--seqlen {seqlen} does not divide --tokens {args.tokens}")
            configs.append(Config(mode, dtype, headdim, causal, seqlen, seqlen,
                                  batch=args.tokens // seqlen, heads=heads))
    return configs


def decode_configs(args: argparse.Namespace) -> list[Config]:
    """Decode-like shapes: Lq query rows against an Lk-long KV cache, heads * D = hidden,
    batch = kv_tokens // Lk (at least 1) so that K+V stay a few GB whatever Lk is."""
    configs = []
    for mode, dtype, headdim, causal, heads in _head_layouts(args):
        for seqlen_q in args.decode_lq:
            for seqlen_k in args.decode_lk:
                configs.append(Config(mode, dtype, headdim, causal, seqlen_q, seqlen_k,
                                      batch=max(1, args.decode_kv_tokens // seqlen_k), heads=heads))
    return configs


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def print_environment(environment: dict, libs: Libraries) -> None:
    print(f"{environment['device']} (sm {environment['compute_capability']}), "
          f"CUDA runtime {environment['cuda_runtime']}, torch {environment['torch']}, "
          f"cupy {environment['cupy']}, cuflash {environment['cuflash']}, "
          f"commit {environment['git_commit'][:10]}", file=sys.stderr)
    for note in (libs.torch_note, libs.cuflash_note):
        if note:
            print(f"note: {note}", file=sys.stderr)


def run_throughput(args: argparse.Namespace, libs: Libraries, environment: dict,
                   decode: bool) -> tuple[list, bool, str, dict]:
    """The training or decode sweep: rows, interrupted, the table, extra record fields."""
    configs = decode_configs(args) if decode else training_configs(args)
    implementations = [CUFLASH, *args.peers]
    policy = TimingPolicy(args.repeats, args.min_time_ms, args.max_repeats)
    l2_bytes = environment["l2_cache_bytes"] or FALLBACK_L2_BYTES
    rows, interrupted = run_sweep(configs, implementations, libs, policy,
                                  args.max_scores_gb * 2**30, l2_bytes)
    table = format_table(rows, implementations, decode=decode)
    return rows, interrupted, table, {"implementations": implementations,
                                      "timing_policy": dataclasses.asdict(policy)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        from benchmarks import bench_report

        return bench_report.write_report(args.report, args.out_dir)
    if args.plot is not None:
        from benchmarks import bench_report

        for path in bench_report.plot_record(args.plot, args.out_dir):
            print(path)
        return 0
    resolve_defaults(args)
    sweep = sweep_name(args)

    libs = load_libraries()
    stream = shared_stream(libs)
    environment = collect_environment(libs)
    print_environment(environment, libs)

    with stream:
        if sweep == "memory":
            from benchmarks import bench_memory

            rows, interrupted, table, extra = bench_memory.run_memory_sweep(args, libs)
        elif sweep == "latency":
            from benchmarks import bench_latency

            rows, interrupted, table, extra = bench_latency.run_latency_sweep(args)
        else:
            rows, interrupted, table, extra = run_throughput(args, libs, environment,
                                                             decode=sweep == "decode")
    print(table)

    if args.no_save or not rows:
        return 130 if interrupted else 0
    record = {**environment, "sweep": sweep, "args": vars(args), **extra,
              "interrupted": interrupted, "rows": rows}
    out_dir = args.out_dir or DEFAULT_OUT_DIR
    json_path = save_results(record, out_dir)
    print(f"results: {json_path}", file=sys.stderr)
    if not args.no_plot:
        from benchmarks import bench_report

        for path in bench_report.plot_record(json_path, out_dir):
            print(f"plot: {path}", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
