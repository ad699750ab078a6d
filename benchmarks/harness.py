"""The machinery every GPU sweep shares: what an implementation is (cuflash, torch SDPA's
backends, FlexAttention, naive CuPy), the libraries and environment, the inputs (one allocation,
seen by torch and CuPy alike), the fp64 reference on a few heads, timing with CUDA events, and
running a list of configurations. bench.py (training and decode shapes), bench_memory.py and
bench_bias.py build on it; tables.py turns its rows into tables and plots.

Importing this module needs neither torch nor CuPy (they load in ``load_libraries``).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable

from benchmarks import record as records

# ----------------------------------------------------------------------------------------------
# Implementations, shapes and tolerances
# ----------------------------------------------------------------------------------------------

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}

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


def head_errors(libs: Libraries, got_per_head: list, exact_per_head: list) -> tuple:
    """(max abs error, max error relative to max|ref|) of one output over the checked heads:
    got_per_head and exact_per_head are (Lq or Lk, D) slices, CuPy arrays or torch tensors,
    the references fp64. (None, None) where an error is not finite."""
    cupy = libs.cupy
    max_abs, max_rel = 0.0, 0.0
    for got, exact in zip(got_per_head, exact_per_head):
        error = float(cupy.abs(to_cupy(libs, got).astype(cupy.float64) - exact).max())
        magnitude = float(cupy.abs(exact).max()) or 1.0
        if not math.isfinite(error):
            return None, None
        max_abs, max_rel = max(max_abs, error), max(max_rel, error / magnitude)
    return max_abs, max_rel


def compare_to_reference(case: Case, outputs: dict, reference: dict[str, list]) -> dict:
    """Max abs error, and max error relative to max|ref|, over the checked heads and outputs;
    the same per output in abs_err_by_output and rel_err_by_output."""
    config, heads = case.config, checked_heads(case.config)
    by_output = {name: head_errors(case.libs, [to_cupy(case.libs, outputs[name])[b, h] for b, h in heads],
                                   exact_per_head)
                 for name, exact_per_head in reference.items()}
    per_output = {"abs_err_by_output": {name: e[0] for name, e in by_output.items()},
                  "rel_err_by_output": {name: e[1] for name, e in by_output.items()}}
    if any(e[0] is None for e in by_output.values()):
        return {"max_abs_err": None, "rel_err": None, "correct": False, **per_output}
    max_abs = max(e[0] for e in by_output.values())
    max_rel = max(e[1] for e in by_output.values())
    bound = (BWD_TOLERANCE if config.has_backward else FWD_TOLERANCE)[config.dtype]
    return {"max_abs_err": max_abs, "rel_err": max_rel, "correct": max_rel <= bound, **per_output}


# ----------------------------------------------------------------------------------------------
# Implementations. Each preparer takes a Case and returns run(i) -> {output name: array}, which
# performs config.mode on input copy i; it raises NotRun when the implementation cannot run.
# ----------------------------------------------------------------------------------------------


class NotRun(Exception):
    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note


Runner = Callable[[int], dict]


def prepare_cuflash(case: Case, precision: str | None = None) -> Runner:
    """cuflash.attention (and attention_backward); precision= passed only when given."""
    cuflash, config, copies = case.libs.cuflash, case.config, case.copies
    if cuflash is None:
        raise NotRun("skipped", case.libs.cuflash_note)
    kwargs = {"scale": config.scale, "causal": config.causal}
    if precision is not None:
        kwargs["precision"] = precision
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


def prepare_flex(case: Case, score_mod: Callable | None = None) -> Runner:
    """FlexAttention under torch.compile, compiled for this shape here (forward and, when the
    mode has one, backward), so that the timing sees only compiled kernels. The compile time is
    returned as run.compile_s. Causal is a block mask, bottom-right aligned like cuflash's.
    score_mod: FlexAttention's, on the scaled score (bench_mods.py's softcap and ALiBi); it is
    compiled into the kernels with the shape."""
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
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=config.scale)

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


def bench_implementation(name: str, case: Case, reference: dict, policy: TimingPolicy,
                         prepare: Callable[[Case], Runner] | None = None) -> dict:
    """Check one implementation against the reference, then time it. Never raises for a
    failing implementation: the failure becomes the result's status and note. prepare:
    the implementation's preparer when it is not PREPARERS[name]."""
    warned: list = []
    run = outputs = None
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            run = (prepare or PREPARERS[name])(case)  # may already call the kernels (bwd saves a fwd)
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


@dataclasses.dataclass(frozen=True)
class SweepHooks:
    """What a sweep built on run_sweep changes: preparers by implementation name (in place of
    PREPARERS'), extra(case, reference) -> fields added to each row (computed after the
    reference, before the implementations), summary(results) -> the row's comparison fields,
    and a deadline (time.monotonic()) after which no new point starts."""

    preparers: dict = dataclasses.field(default_factory=dict)
    extra: Callable[[Case, dict], dict] | None = None
    summary: Callable[[dict], dict] = summarize
    deadline: float | None = None


def bench_config(config: Config, implementations: list[str], libs: Libraries,
                 policy: TimingPolicy, max_scores_bytes: float, l2_bytes: int,
                 progress: Callable[[str], None], hooks: SweepHooks = SweepHooks()) -> dict:
    n_copies = input_copy_count(config, l2_bytes)
    case = Case(config, make_inputs(config, libs, n_copies), libs, max_scores_bytes)
    reference = compute_reference(case)
    extra = hooks.extra(case, reference) if hooks.extra else {}
    results = {}
    for name in implementations:
        progress(name)
        results[name] = bench_implementation(name, case, reference, policy,
                                             hooks.preparers.get(name))
    del case, reference
    release_memory(libs)
    return {**config.as_dict(), "input_copies": n_copies, **extra, "results": results,
            **hooks.summary(results)}


def run_sweep(configs: list[Config], implementations: list[str], libs: Libraries,
              policy: TimingPolicy, max_scores_bytes: float, l2_bytes: int,
              hooks: SweepHooks = SweepHooks()) -> tuple[list, bool]:
    """Rows for every config (up to hooks.deadline: fewer rows than configs then); on Ctrl-C
    the rows so far and interrupted=True."""
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
            if hooks.deadline is not None and time.monotonic() >= hooks.deadline:
                print(f"time budget spent: {len(configs) - index} of {len(configs)} points not run",
                      file=sys.stderr)
                break
            if bar is not None:
                bar.set_description(config.label)
                def progress(name: str) -> None:
                    bar.set_postfix_str(name)
            else:
                print(f"[{index + 1}/{len(configs)}] {config.label}", file=sys.stderr, flush=True)
                def progress(name: str) -> None:
                    pass
            rows.append(bench_config(config, implementations, libs, policy, max_scores_bytes,
                                     l2_bytes, progress, hooks))
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
        return rows, True
    finally:
        if bar is not None:
            bar.close()
    return rows, False
