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
import itertools
import dataclasses
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402

DEFAULT_OUT_DIR = records.RESULTS_DIR

# ----------------------------------------------------------------------------------------------
# What is swept
# ----------------------------------------------------------------------------------------------

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}

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

CUFLASH = "cuflash"
SDPA_BACKENDS = {  # implementation name -> torch.nn.attention.SDPBackend member
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
FLEX = "flex"
NAIVE = "naive_cupy"
PEERS = (*SDPA_BACKENDS, FLEX, NAIVE)
FLASH_PEER = "sdpa_flash"

# Loose bounds on max|x - ref| / max|ref| against the fp64 reference. They catch wrong kernels
# (errors of order 0.1-1), not last-bit differences; fp32 leaves room for TF32 tensor cores.
FWD_TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 2e-3, "fp64": 1e-9}
BWD_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 5e-3, "fp64": 1e-8}

DEFAULT_MAX_SCORES_GB = 8.0  # memory cap for implementations that materialize L x L scores
MIN_INPUT_COPIES = 3  # inputs are rotated among copies so that L2 does not flatter anyone
FALLBACK_L2_BYTES = 60 * 2**20


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


@dataclasses.dataclass(frozen=True)
class Config:
    """One point of the sweep. seqlen_q and seqlen_k are separate for decode-like shapes."""

    mode: str
    dtype: str
    headdim: int
    causal: bool
    seqlen_q: int
    seqlen_k: int
    batch: int
    heads: int

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.headdim)

    @property
    def flops(self) -> float:
        dense = 4.0 * self.batch * self.heads * self.seqlen_q * self.seqlen_k * self.headdim
        return dense * (0.5 if self.causal else 1.0) * FLOP_FACTOR[self.mode]

    @property
    def has_backward(self) -> bool:
        return self.mode != "fwd"

    @property
    def itemsize(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[self.dtype]

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V: what one forward must read at least (decode is bound by it)."""
        return 2 * self.batch * self.heads * self.seqlen_k * self.headdim * self.itemsize

    @property
    def label(self) -> str:
        causal = "causal" if self.causal else "full"
        lengths = (f"L={self.seqlen_q}" if self.seqlen_q == self.seqlen_k
                   else f"Lq={self.seqlen_q} Lk={self.seqlen_k}")
        return f"{self.mode} {self.dtype} d={self.headdim} {causal} {lengths} B={self.batch} H={self.heads}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"flops": self.flops, "kv_bytes": self.kv_bytes}


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
# GPU libraries and environment
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Libraries:
    cupy: Any
    torch: Any  # None when torch is missing or has no CUDA
    torch_note: str
    cuflash: Any  # None when cuflash does not import
    cuflash_note: str


def load_libraries() -> Libraries:
    """Import CuPy (required, with a working GPU), torch and cuflash (optional)."""
    try:
        import cupy
    except ImportError as exc:
        raise SystemExit(f"bench: CuPy is not installed ({exc}); install cupy-cuda12x or "
                         "cupy-cuda13x on a machine with an NVIDIA GPU") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without driver, or no device
        raise SystemExit(f"bench: no CUDA GPU here: the benchmarks need one (CUDA says: {exc})") from None
    if count == 0:
        raise SystemExit("bench: no CUDA GPU found")
    try:  # ml_dtypes makes bfloat16 known to NumPy and CuPy
        import ml_dtypes  # noqa: F401
    except ImportError:
        pass

    # FlexAttention's torch.compile would otherwise start inductor's pool of compile worker
    # processes: they idle beside the timed kernels, and their teardown can hold the process
    # at exit (pytorch/pytorch#162199; seen here after a flex run). One flex shape compiles a
    # handful of kernels, so compiling them in-process costs little.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch, torch_note = None, ""
    try:
        import torch as _torch

        if _torch.cuda.is_available():
            torch = _torch
        else:
            torch_note = "torch has no CUDA device"
    except Exception as exc:  # ImportError, or a broken CUDA install
        torch_note = f"torch unavailable ({type(exc).__name__}: {exc})"

    cuflash, cuflash_note = None, ""
    try:
        import cuflash as _cuflash

        cuflash = _cuflash
    except Exception as exc:
        cuflash_note = f"cuflash does not import ({type(exc).__name__}: {exc})"
    return Libraries(cupy, torch, torch_note, cuflash, cuflash_note)


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def collect_environment(libs: Libraries) -> dict:
    import numpy

    cupy = libs.cupy
    device_id = cupy.cuda.Device().id
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    torch = libs.torch
    source = records.source_commit()
    driver = records.command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                                   f"--id={device_id}")
    return {
        "device": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "sm_count": props["multiProcessorCount"],
        "memory_bytes": props["totalGlobalMem"],
        "l2_cache_bytes": props["l2CacheSize"],
        "driver_version": driver or "unknown",
        "cuda_driver_api": _cuda_version_text(cupy.cuda.runtime.driverGetVersion()),
        "cuda_runtime": _cuda_version_text(cupy.cuda.runtime.runtimeGetVersion()),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cupy": cupy.__version__,
        "torch": torch.__version__ if torch else None,
        "torch_cuda": torch.version.cuda if torch else None,
        "cudnn": torch.backends.cudnn.version() if torch else None,
        "torch_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if torch else None,
        "torch_note": libs.torch_note or None,
        "cuflash": getattr(libs.cuflash, "__version__", "unknown") if libs.cuflash else None,
        "cuflash_path": getattr(libs.cuflash, "__file__", None) if libs.cuflash else None,
        "cuflash_note": libs.cuflash_note or None,
        **source,
        "date_utc": records.now_utc(),
    }


def shared_stream(libs: Libraries):
    """The CuPy stream to run everything on: torch's current stream when torch is there, so
    that torch, cuflash and the CUDA events are ordered on one stream."""
    cupy, torch = libs.cupy, libs.torch
    if torch is None:
        return cupy.cuda.get_current_stream()
    cupy.cuda.Device(torch.cuda.current_device()).use()
    torch_stream = torch.cuda.current_stream()
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)
    with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream)


def release_memory(libs: Libraries) -> None:
    gc.collect()
    libs.cupy.get_default_memory_pool().free_all_blocks()
    if libs.torch is not None:
        libs.torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InputCopy:
    """One set of inputs as CuPy arrays, and as torch tensors of the same memory."""

    q: Any
    k: Any
    v: Any
    dout: Any  # None in forward mode
    tq: Any = None
    tk: Any = None
    tv: Any = None
    tdout: Any = None


@dataclasses.dataclass
class Case:
    """A configuration with its inputs, ready for the implementations."""

    config: Config
    copies: list[InputCopy]
    libs: Libraries
    max_scores_bytes: float


def input_copy_count(config: Config, l2_bytes: int) -> int:
    """Enough copies that one pass over all of them streams at least twice the L2 size."""
    itemsize = config.itemsize
    q_elems = config.batch * config.heads * config.seqlen_q * config.headdim
    kv_elems = config.batch * config.heads * config.seqlen_k * config.headdim
    tensors_q = 4 if config.has_backward else 2  # q, out (+ dout, dq)
    tensors_kv = 4 if config.has_backward else 2  # k, v (+ dk, dv)
    copy_bytes = itemsize * (tensors_q * q_elems + tensors_kv * kv_elems)
    return max(MIN_INPUT_COPIES, math.ceil(2 * l2_bytes / copy_bytes))


def make_inputs(config: Config, libs: Libraries, n_copies: int, seed: int = 0) -> list[InputCopy]:
    """Standard-normal q, k, v (and dout), allocated by torch when available."""
    cupy, torch = libs.cupy, libs.torch
    q_shape = (config.batch, config.heads, config.seqlen_q, config.headdim)
    kv_shape = (config.batch, config.heads, config.seqlen_k, config.headdim)
    shapes = [q_shape, kv_shape, kv_shape] + ([q_shape] if config.has_backward else [])
    copies = []
    if torch is not None:
        dtype = getattr(torch, DTYPES[config.dtype])
        generator = torch.Generator(device="cuda").manual_seed(seed)
        for _ in range(n_copies):
            tensors = [torch.randn(s, device="cuda", dtype=dtype, generator=generator)
                       for s in shapes] + [None] * (4 - len(shapes))
            arrays = [cupy.from_dlpack(t) if t is not None else None for t in tensors]
            copies.append(InputCopy(*arrays, *tensors))
    else:
        import numpy

        dtype = numpy.dtype(DTYPES[config.dtype])
        rng = cupy.random.default_rng(seed)
        for _ in range(n_copies):
            arrays = [rng.standard_normal(s, dtype=cupy.float32).astype(dtype) for s in shapes]
            copies.append(InputCopy(*arrays, *([None] * (4 - len(arrays)))))
    return copies


def to_cupy(libs: Libraries, array: Any) -> Any:
    if isinstance(array, libs.cupy.ndarray):
        return array
    return libs.cupy.from_dlpack(array.detach())  # torch tensor, zero copy


# ----------------------------------------------------------------------------------------------
# Correctness: fp64 reference on a few heads
# ----------------------------------------------------------------------------------------------


def checked_heads(config: Config) -> list[tuple[int, int]]:
    """The (batch, head) pairs compared with the reference: the first and the last."""
    return sorted({(0, 0), (config.batch - 1, config.heads - 1)})


def reference_attention_fp64(cupy, q, k, v, dout, scale: float, causal: bool,
                             chunk: int = 1024) -> dict:
    """Exact attention of one head in fp64, in chunks of query rows to bound memory.

    q (Lq, D), k (Lk, D), v (Lk, Dv), dout (Lq, Dv) or None. Causal is bottom-right aligned:
    query i sees key j iff j <= i + Lk - Lq. Returns out, and dq, dk, dv when dout is given.
    """
    q, k, v = (x.astype(cupy.float64) for x in (q, k, v))
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    result = {"out": cupy.empty((seqlen_q, v.shape[1]), dtype=cupy.float64)}
    if dout is not None:
        dout = dout.astype(cupy.float64)
        result |= {"dq": cupy.empty_like(q), "dk": cupy.zeros_like(k), "dv": cupy.zeros_like(v)}
    key_index = cupy.arange(seqlen_k)[None, :]
    for start in range(0, seqlen_q, chunk):
        rows = slice(start, min(start + chunk, seqlen_q))
        scores = (q[rows] @ k.T) * scale
        if causal:
            query_index = cupy.arange(rows.start, rows.stop)[:, None]
            scores[key_index > query_index + (seqlen_k - seqlen_q)] = -cupy.inf
        row_max = scores.max(axis=1, keepdims=True)
        row_max[~cupy.isfinite(row_max)] = 0.0  # fully masked rows give 0, as in FA2
        probs = cupy.exp(scores - row_max)
        row_sum = probs.sum(axis=1, keepdims=True)
        probs /= cupy.where(row_sum == 0, 1.0, row_sum)
        out = probs @ v
        result["out"][rows] = out
        if dout is not None:
            d_out = dout[rows]
            result["dv"] += probs.T @ d_out
            delta = (d_out * out).sum(axis=1, keepdims=True)
            d_scores = probs * (d_out @ v.T - delta) * scale
            result["dq"][rows] = d_scores @ k
            result["dk"] += d_scores.T @ q[rows]
    return result


def output_names(config: Config) -> tuple[str, ...]:
    return {"fwd": ("out",), "bwd": ("dq", "dk", "dv"),
            "fwd+bwd": ("out", "dq", "dk", "dv")}[config.mode]


def compute_reference(case: Case) -> dict[str, list]:
    """name -> [fp64 array per checked head], for the names the mode produces."""
    cupy, config, first = case.libs.cupy, case.config, case.copies[0]
    reference: dict[str, list] = {name: [] for name in output_names(config)}
    for b, h in checked_heads(config):
        dout = first.dout[b, h] if config.has_backward else None
        exact = reference_attention_fp64(cupy, first.q[b, h], first.k[b, h], first.v[b, h],
                                         dout, config.scale, config.causal)
        for name in reference:
            reference[name].append(exact[name])
    return reference


def compare_to_reference(case: Case, outputs: dict, reference: dict[str, list]) -> dict:
    """Max abs error, and max error relative to max|ref|, over the checked heads and outputs."""
    cupy, config = case.libs.cupy, case.config
    max_abs, max_rel = 0.0, 0.0
    for name, exact_per_head in reference.items():
        got = to_cupy(case.libs, outputs[name])
        for (b, h), exact in zip(checked_heads(config), exact_per_head):
            error = float(cupy.abs(got[b, h].astype(cupy.float64) - exact).max())
            magnitude = float(cupy.abs(exact).max()) or 1.0
            if not math.isfinite(error):
                return {"max_abs_err": None, "rel_err": None, "correct": False}
            max_abs, max_rel = max(max_abs, error), max(max_rel, error / magnitude)
    bound = (BWD_TOLERANCE if config.has_backward else FWD_TOLERANCE)[config.dtype]
    return {"max_abs_err": max_abs, "rel_err": max_rel, "correct": max_rel <= bound}


# ----------------------------------------------------------------------------------------------
# Implementations. Each preparer takes a Case and returns run(i) -> {output name: array}, which
# performs config.mode on input copy i; it raises NotRun when the implementation cannot run.
# ----------------------------------------------------------------------------------------------


class NotRun(Exception):
    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note


Runner = Callable[[int], dict]


def prepare_cuflash(case: Case) -> Runner:
    cuflash, config, copies = case.libs.cuflash, case.config, case.copies
    if cuflash is None:
        raise NotRun("skipped", case.libs.cuflash_note)
    kwargs = {"scale": config.scale, "causal": config.causal}
    if config.mode == "fwd":
        return lambda i: {"out": cuflash.attention(copies[i].q, copies[i].k, copies[i].v,
                                                   **kwargs)}
    backward = getattr(cuflash, "attention_backward", None)
    if backward is None:
        raise NotRun("unsupported", "cuflash.attention_backward does not exist yet")

    def forward_with_lse(c: InputCopy):
        return cuflash.attention(c.q, c.k, c.v, return_lse=True, **kwargs)

    def backward_of(c: InputCopy, out, lse) -> dict:
        dq, dk, dv = backward(c.dout, c.q, c.k, c.v, out, lse, window=None, **kwargs)
        return {"dq": dq, "dk": dk, "dv": dv}

    if config.mode == "bwd":
        saved = [forward_with_lse(c) for c in copies]
        return lambda i: backward_of(copies[i], *saved[i])

    def forward_backward(i: int) -> dict:
        out, lse = forward_with_lse(copies[i])
        return {"out": out, **backward_of(copies[i], out, lse)}

    return forward_backward


def materialized_scores_bytes(config: Config, n_copies: int) -> float:
    """Rough peak memory of an implementation that materializes L x L fp32 score matrices:
    scores, probabilities and a temporary in forward; in backward also the gradient of the
    scores, and the probabilities saved per input copy for backward-only timing."""
    itemsize = 8 if config.dtype == "fp64" else 4
    matrix = config.batch * config.heads * config.seqlen_q * config.seqlen_k * itemsize
    live = {"fwd": 3, "fwd+bwd": 5, "bwd": 4 + n_copies}[config.mode]
    return matrix * live


def check_scores_memory(case: Case) -> None:
    need = materialized_scores_bytes(case.config, len(case.copies))
    if need > case.max_scores_bytes:
        raise NotRun("skipped", f"score matrices need ~{need / 2**30:.0f} GiB "
                                f"(> --max-scores-gb {case.max_scores_bytes / 2**30:g})")


def torch_runner(case: Case, forward: Callable) -> Runner:
    """run(i) for a torch attention forward(q, k, v) -> out: the forward under no_grad, the
    backward alone through torch.autograd.grad on graphs saved once per input copy, or both."""
    torch, config, copies = case.libs.torch, case.config, case.copies
    if config.mode == "fwd":
        def run_forward(i: int) -> dict:
            with torch.no_grad():
                return {"out": forward(copies[i].tq, copies[i].tk, copies[i].tv)}

        return run_forward

    leaves = [tuple(t.detach().requires_grad_() for t in (c.tq, c.tk, c.tv)) for c in copies]

    def gradients(out, i: int, retain_graph: bool) -> dict:
        dq, dk, dv = torch.autograd.grad(out, leaves[i], copies[i].tdout,
                                         retain_graph=retain_graph)
        return {"dq": dq, "dk": dk, "dv": dv}

    if config.mode == "bwd":
        outs = [forward(*leaf) for leaf in leaves]
        return lambda i: gradients(outs[i], i, retain_graph=True)

    def run_forward_backward(i: int) -> dict:
        out = forward(*leaves[i])
        return {"out": out.detach(), **gradients(out, i, retain_graph=False)}

    return run_forward_backward


def prepare_sdpa(backend_name: str, case: Case) -> Runner:
    torch, config = case.libs.torch, case.config
    if torch is None:
        raise NotRun("skipped", case.libs.torch_note or "torch not installed")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        raise NotRun("skipped", "torch too old: no torch.nn.attention.sdpa_kernel") from None
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise NotRun("skipped", f"this torch has no SDPBackend.{backend_name}")
    if backend_name == "MATH":
        check_scores_memory(case)
    if config.causal and config.seqlen_q != config.seqlen_k:
        raise NotRun("unsupported", "torch is_causal is top-left aligned; this benchmark's "
                                    "causal is bottom-right (needs an attn_mask)")
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward(q, k, v):
        with sdpa_kernel([backend]):
            return sdpa(q, k, v, is_causal=config.causal, scale=config.scale)

    return torch_runner(case, forward)


# FlexAttention's block mask is built by evaluating the mask on every (query, key) pair; past
# this many pairs the mask is built under torch.compile instead, which never materializes it.
FLEX_EAGER_MASK_PAIRS = 2**28


def prepare_flex(case: Case) -> Runner:
    """FlexAttention under torch.compile, compiled for this shape here (forward and, when the
    mode has one, backward), so that the timing sees only compiled kernels. The compile time is
    returned as run.compile_s. Causal is a block mask, bottom-right aligned like cuflash's."""
    torch, config = case.libs.torch, case.config
    if torch is None:
        raise NotRun("skipped", case.libs.torch_note or "torch not installed")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        raise NotRun("skipped", f"torch {torch.__version__} has no FlexAttention") from None
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        has_triton = None
    if has_triton is not None and not has_triton():
        raise NotRun("skipped", "FlexAttention needs triton, which is not installed")

    block_mask = None
    if config.causal:
        offset = config.seqlen_k - config.seqlen_q

        def bottom_right_causal(batch, head, q_index, kv_index):
            return kv_index <= q_index + offset

        block_mask = create_block_mask(
            bottom_right_causal, B=None, H=None, Q_LEN=config.seqlen_q,
            KV_LEN=config.seqlen_k, device="cuda",
            _compile=config.seqlen_q * config.seqlen_k > FLEX_EAGER_MASK_PAIRS)
    # One compiled function per shape: a fresh dynamo state, so that neither the recompile
    # limit nor guards from the previous shape change what gets compiled.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)

    def forward(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, scale=config.scale)

    begin = time.perf_counter()
    try:  # bwd mode runs the forwards it saves here already
        run = torch_runner(case, forward)
        run(0)  # compiles the forward (and the backward in the backward modes)
        torch.cuda.synchronize()
    except Exception as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NotRun("unsupported", f"FlexAttention does not compile for this point: "
                                    f"{type(exc).__name__}: {message}"[:300]) from None
    run.compile_s = time.perf_counter() - begin
    return run


def prepare_naive(case: Case) -> Runner:
    """Standard attention: S = QK^T in the input dtype, softmax in fp32 (fp64 for fp64),
    P cast back to the input dtype, O = PV. Backward by the textbook formulas."""
    cupy, config, copies = case.libs.cupy, case.config, case.copies
    check_scores_memory(case)
    softmax_dtype = cupy.float64 if config.dtype == "fp64" else cupy.float32
    causal_bias = None
    if config.causal:
        i = cupy.arange(config.seqlen_q)[:, None]
        j = cupy.arange(config.seqlen_k)[None, :]
        masked = j > i + (config.seqlen_k - config.seqlen_q)
        causal_bias = cupy.where(masked, -cupy.inf, 0.0).astype(softmax_dtype)

    def forward(q, k, v, bias=causal_bias):
        scores = cupy.matmul(q, k.swapaxes(-1, -2)).astype(softmax_dtype, copy=False)
        scores *= config.scale
        if bias is not None:
            scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = cupy.exp(scores, out=scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = cupy.matmul(probs.astype(q.dtype, copy=False), v)
        return out, probs

    def backward(c: InputCopy, out, probs) -> dict:
        dtype = c.q.dtype
        dv = cupy.matmul(probs.astype(dtype, copy=False).swapaxes(-1, -2), c.dout)
        d_scores = cupy.matmul(c.dout, c.v.swapaxes(-1, -2)).astype(softmax_dtype, copy=False)
        delta = (c.dout.astype(softmax_dtype) * out.astype(softmax_dtype)).sum(axis=-1,
                                                                               keepdims=True)
        d_scores -= delta
        d_scores *= probs
        d_scores *= config.scale
        d_scores = d_scores.astype(dtype, copy=False)
        dq = cupy.matmul(d_scores, c.k)
        dk = cupy.matmul(d_scores.swapaxes(-1, -2), c.q)
        return {"dq": dq, "dk": dk, "dv": dv}

    try:  # a few rows first: a dtype CuPy cannot compute in is unsupported, not an error
        tiny = InputCopy(*(x[:1, :1, :8] if x is not None else None
                           for x in (copies[0].q, copies[0].k, copies[0].v, copies[0].dout)))
        probe_out, probe_probs = forward(tiny.q, tiny.k, tiny.v, bias=None)
        if config.has_backward:
            backward(tiny, probe_out, probe_probs)
    except Exception as exc:
        raise NotRun("unsupported", f"CuPy {cupy.__version__} cannot compute standard attention "
                                    f"in {config.dtype}: {type(exc).__name__}: {exc}") from None

    if config.mode == "fwd":
        return lambda i: {"out": forward(copies[i].q, copies[i].k, copies[i].v)[0]}
    if config.mode == "bwd":
        saved = [forward(c.q, c.k, c.v) for c in copies]
        return lambda i: backward(copies[i], *saved[i])

    def run_forward_backward(i: int) -> dict:
        c = copies[i]
        out, probs = forward(c.q, c.k, c.v)
        return {"out": out, **backward(c, out, probs)}

    return run_forward_backward


PREPARERS: dict[str, Callable[[Case], Runner]] = {
    CUFLASH: prepare_cuflash,
    **{name: (lambda case, b=backend: prepare_sdpa(b, case))
       for name, backend in SDPA_BACKENDS.items()},
    FLEX: prepare_flex,
    NAIVE: prepare_naive,
}


def classify_failure(exc: BaseException, libs: Libraries, warned: list) -> tuple[str, str]:
    """(status, note) of an implementation that raised: unsupported, oom or error."""
    if isinstance(exc, NotRun):
        return exc.status, exc.note
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    note = f"{type(exc).__name__}: {message}"
    oom_types = [libs.cupy.cuda.memory.OutOfMemoryError]
    if libs.torch is not None:
        oom_types.append(libs.torch.cuda.OutOfMemoryError)
    if isinstance(exc, tuple(oom_types)):
        return "oom", note[:200]
    if isinstance(exc, NotImplementedError) or "No available kernel" in message:
        reasons = dict.fromkeys(_torch_reason(w) for w in warned)
        reasons.pop("", None)
        if reasons:  # torch explains in warnings why a backend refused
            note = f"{note} | {' | '.join(reasons)}"
        return "unsupported", note[:300]
    return "error", note[:300]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _torch_reason(warning) -> str:
    """The reason in one of torch's 'kernel not used because' warnings, or '' for the
    headers and for backends that sdpa_kernel switched off (not the one being tried)."""
    text = re.sub(r"\s*\(Triggered internally at .*?\)", "", str(warning.message)).strip()
    text = text.splitlines()[0] if text else ""
    if text.endswith("not used because:") or "has been runtime disabled" in text:
        return ""
    return text


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    min_repeats: int = 10
    min_time_ms: float = 100.0
    max_repeats: int = 1000


def measure(cupy, run: Runner, n_copies: int, policy: TimingPolicy) -> dict:
    """Median GPU time of run, between CUDA events on the current stream, cycling the copies.

    Warm-up covers every copy twice; a calibration pass sizes the repeat count to reach both
    policy.min_repeats and policy.min_time_ms, capped at policy.max_repeats.
    """
    stream = cupy.cuda.get_current_stream()
    for i in range(max(3, 2 * n_copies)):
        run(i % n_copies)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for i in range(n_copies):
        run(i)
    end.record(stream)
    end.synchronize()
    estimate_ms = max(cupy.cuda.get_elapsed_time(start, end) / n_copies, 1e-3)
    repeats = max(policy.min_repeats, math.ceil(policy.min_time_ms / estimate_ms))
    repeats = min(repeats, max(policy.max_repeats, policy.min_repeats))
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeats)]
    for r, (begin, finish) in enumerate(events):
        begin.record(stream)
        run(r % n_copies)
        finish.record(stream)
    events[-1][1].synchronize()
    times = sorted(cupy.cuda.get_elapsed_time(b, f) for b, f in events)
    return {"ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "repeats": repeats}


# ----------------------------------------------------------------------------------------------
# Running the sweep
# ----------------------------------------------------------------------------------------------


def bench_implementation(name: str, case: Case, reference: dict, policy: TimingPolicy) -> dict:
    """Check one implementation against the reference, then time it. Never raises for a
    failing implementation: the failure becomes the result's status and note."""
    warned: list = []
    run = outputs = None
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            run = PREPARERS[name](case)  # may already call the kernels (backward saves a forward)
            compile_s = getattr(run, "compile_s", None)  # FlexAttention's torch.compile
            outputs = run(0)
        check = compare_to_reference(case, outputs, reference)
        outputs = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timing = measure(case.libs.cupy, run, len(case.copies), policy)
    except Exception as exc:
        status, note = classify_failure(exc, case.libs, warned)
        return {"status": status, "note": note}
    finally:
        run = outputs = None  # drop saved tensors before the next implementation
        release_memory(case.libs)
    seconds = timing["ms"] * 1e-3
    result = {"status": "ok", "tflops": case.config.flops / seconds / 1e12,
              "kv_gbps": case.config.kv_bytes / seconds / 1e9, **timing, **check}
    if compile_s is not None:
        result["compile_s"] = compile_s
    return result


def summarize(results: dict) -> dict:
    """cuflash's speed relative to the fastest correct peer and to SDPA flash."""
    def speed(name: str) -> float | None:
        r = results.get(name)
        return r["tflops"] if r and r["status"] == "ok" and r["correct"] else None

    peers = {name: speed(name) for name in results if name != CUFLASH}
    peers = {name: tflops for name, tflops in peers.items() if tflops is not None}
    best_peer = max(peers, key=peers.get) if peers else None
    cuflash = results.get(CUFLASH)
    ours = cuflash["tflops"] if cuflash and cuflash["status"] == "ok" else None
    flash = peers.get(FLASH_PEER)
    return {
        "best_peer": best_peer,
        "cuflash_vs_best_peer": ours / peers[best_peer] if ours and best_peer else None,
        "cuflash_vs_flash": ours / flash if ours and flash else None,
    }


def bench_config(config: Config, implementations: list[str], libs: Libraries,
                 policy: TimingPolicy, max_scores_bytes: float, l2_bytes: int,
                 progress: Callable[[str], None]) -> dict:
    n_copies = input_copy_count(config, l2_bytes)
    case = Case(config, make_inputs(config, libs, n_copies), libs, max_scores_bytes)
    reference = compute_reference(case)
    results = {}
    for name in implementations:
        progress(name)
        results[name] = bench_implementation(name, case, reference, policy)
    del case, reference
    release_memory(libs)
    return {**config.as_dict(), "input_copies": n_copies, "results": results,
            **summarize(results)}


def run_sweep(configs: list[Config], implementations: list[str], libs: Libraries,
              policy: TimingPolicy, max_scores_bytes: float, l2_bytes: int) -> tuple[list, bool]:
    """Rows for every config; on Ctrl-C the rows so far and interrupted=True."""
    tqdm = None
    if sys.stderr.isatty():  # a log file gets one plain line per config instead
        try:
            from tqdm import tqdm
        except ImportError:
            pass
    bar = tqdm(total=len(configs), unit="config", dynamic_ncols=True) if tqdm else None
    rows = []
    try:
        for index, config in enumerate(configs):
            if bar is not None:
                bar.set_description(config.label)
                def progress(name: str) -> None:
                    bar.set_postfix_str(name)
            else:
                print(f"[{index + 1}/{len(configs)}] {config.label}", file=sys.stderr, flush=True)
                def progress(name: str) -> None:
                    pass
            rows.append(bench_config(config, implementations, libs, policy, max_scores_bytes,
                                     l2_bytes, progress))
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
        return rows, True
    finally:
        if bar is not None:
            bar.close()
    return rows, False


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

STATUS_CELL = {"unsupported": "unsup", "skipped": "skip", "oom": "oom", "error": "ERROR"}


def _result_cell(result: dict | None, metric: str = "tflops") -> str:
    if result is None:
        return ""
    if result["status"] != "ok":
        return STATUS_CELL.get(result["status"], result["status"])
    precision = 0 if metric == "kv_gbps" else 1
    return f"{result[metric]:.{precision}f}" + ("" if result["correct"] else "!")


def _ratio_cell(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def failure_reasons(rows: list[dict]) -> dict[tuple[str, str, str], int]:
    """(implementation, status, note) -> how many points failed that way."""
    reasons: dict[tuple[str, str, str], int] = {}
    for row in rows:
        for name, result in row["results"].items():
            if result["status"] != "ok":
                key = (name, result["status"], result.get("note", ""))
                reasons[key] = reasons.get(key, 0) + 1
    return reasons


def compile_time_range(rows: list[dict], name: str = FLEX) -> tuple[float, float] | None:
    """Shortest and longest compile time of an implementation over the rows (FlexAttention)."""
    times = [row["results"][name]["compile_s"] for row in rows
             if "compile_s" in row["results"].get(name, {})]
    return (min(times), max(times)) if times else None


def format_table(rows: list[dict], implementations: list[str], decode: bool = False) -> str:
    """Aligned plain-text table: one line per config, TFLOP/s per implementation (decode: K+V
    read GB/s, and cuflash's TFLOP/s), ratios, cuflash's max abs error; then a legend and the
    reasons for cells that are not numbers."""
    metric = "kv_gbps" if decode else "tflops"
    lengths = ["Lq", "Lk"] if decode else ["L"]
    headers = ["mode", "dtype", "D", "causal", *lengths, "B", "H", *implementations,
               *(["cuflash TFLOP/s"] if decode else []),
               "vs best", "best peer", "vs flash", "cuflash err"]
    lines = []
    for row in rows:
        ours = row["results"].get(CUFLASH, {})
        error = ours.get("max_abs_err")
        lines.append([
            row["mode"], row["dtype"], str(row["headdim"]), "yes" if row["causal"] else "no",
            *([str(row["seqlen_q"]), str(row["seqlen_k"])] if decode else [str(row["seqlen_q"])]),
            str(row["batch"]), str(row["heads"]),
            *(_result_cell(row["results"].get(name), metric) for name in implementations),
            *([_result_cell(ours or None)] if decode else []),
            _ratio_cell(row["cuflash_vs_best_peer"]), row["best_peer"] or "-",
            _ratio_cell(row["cuflash_vs_flash"]),
            f"{error:.1e}" + ("" if ours.get("correct") else "!") if error is not None else "-",
        ])
    widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(headers)]
    left_aligned = {0, 1, headers.index("best peer")}

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c in left_aligned else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    out = [render(headers), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    unit = ("GB/s of K+V read (2*B*H*Lk*D*itemsize / time)" if decode else "TFLOP/s")
    out += [
        "",
        f"{unit}, median of CUDA-event timings; FLOPs = 4*B*H*Lq*Lk*D, x0.5 causal, x2.5 bwd, "
        "x3.5 fwd+bwd.",
        "vs best / vs flash: cuflash's speed over the fastest correct peer's / over sdpa_flash's.",
        "'!' = differs from the fp64 reference by more than the loose bound (see JSON rel_err); "
        "unsup / skip / oom / ERROR: reasons below.",
    ]
    compile_range = compile_time_range(rows)
    if compile_range:
        out.append(f"{FLEX}: torch.compile took {compile_range[0]:.1f}-{compile_range[1]:.1f} s "
                   "per shape, outside the timings.")
    for (name, status, note), count in failure_reasons(rows).items():
        out.append(f"  {name} {status} x{count}: {note}")
    return "\n".join(out)


def save_results(result: dict, out_dir: Path) -> Path:
    """Write result as benchmarks/results/<UTC date>_<device>[_<sweep>].json; returns the path."""
    sweep = "" if result.get("sweep", "training") == "training" else result["sweep"]
    return records.write(result, records.record_path(out_dir, result["date_utc"], result["device"], sweep))


def plot(json_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNG plots of a recorded JSON: one figure per (mode, dtype), one panel per (D, causal),
    TFLOP/s against L with one line per implementation; points failing the correctness check
    are marked with a black x. Returns the written paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir is not None else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    record = json.loads(json_path.read_text())
    rows, implementations = record["rows"], record["implementations"]
    written = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in rows):
        group = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
        headdims = sorted({r["headdim"] for r in group})
        causals = sorted({r["causal"] for r in group})
        fig, axes = plt.subplots(len(headdims), len(causals), squeeze=False, sharey="row",
                                 figsize=(5.5 * len(causals), 4 * len(headdims)))
        for (d_index, headdim), (c_index, causal) in (
                (d, c) for d in enumerate(headdims) for c in enumerate(causals)):
            ax = axes[d_index][c_index]
            panel = sorted((r for r in group if r["headdim"] == headdim
                            and r["causal"] == causal), key=lambda r: r["seqlen_q"])
            for color, name in enumerate(implementations):  # same color in every panel
                points = [(r["seqlen_q"], r["results"][name]) for r in panel
                          if r["results"].get(name, {}).get("status") == "ok"]
                if not points:
                    continue
                style = {"linewidth": 2.5} if name == CUFLASH else {}
                ax.plot([p[0] for p in points], [p[1]["tflops"] for p in points],
                        marker="o", label=name, color=f"C{color % 10}", **style)
                wrong = [p for p in points if not p[1].get("correct", True)]
                if wrong:
                    ax.plot([p[0] for p in wrong], [p[1]["tflops"] for p in wrong], "x",
                            color="black", markersize=10, markeredgewidth=2)
            seqlens = [r["seqlen_q"] for r in panel]
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_title(f"D={headdim}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        legend = {}
        for ax in axes.flat:  # one legend for the figure, in implementation order
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        order = [name for name in implementations if name in legend]
        fig.legend([legend[n] for n in order], order, loc="lower center", ncol=len(order),
                   frameon=False)
        fig.suptitle(f"attention {mode} {dtype} on {record.get('device', '?')} "
                     f"(commit {str(record.get('git_commit', 'unknown'))[:10]})")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = out_dir / f"{json_path.stem}_{mode.replace('+', '-')}_{dtype}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


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
    sys.path.insert(0, str(REPO_ROOT))  # benchmark the checkout's cuflash
    # Run as benchmarks.bench, the module that the bench_* modules import: one copy of its
    # classes (Config, NotRun), not one in __main__ and another in benchmarks.bench.
    from benchmarks.bench import main as package_main

    sys.exit(package_main())
