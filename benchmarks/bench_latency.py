"""First-call latency of cuflash in a new process: with an empty kernel cache, and with a filled one.

cuflash compiles its kernels at run time (NVRTC through ``cupy.RawModule``) on the first call
of each kernel and CuPy keeps the result in its disk cache (``CUPY_CACHE_DIR``). What a user
waits for on the first call therefore depends on that cache. For each (dtype, D, causal) this
module starts two fresh Python processes on one new, empty temporary cache directory:

* ``cold``:   the cache is empty, so the first forward and the first backward compile their
  kernels (and CuPy's own helper kernels) before running;
* ``cached``: a second process on the same, now filled, directory: the first calls load the
  compiled kernels from disk.

Each process reports the import of cupy and cuflash, the wall time of the first
``cuflash.attention`` call and of the first ``cuflash.attention_backward`` call (each ended by a
device synchronization), and of a second call of each (the warm steady state, for scale). Inputs
are created and synchronized before the clock starts, so the CUDA context and the input
generation are not counted. The driver's own JIT cache (``CUDA_CACHE_PATH``) also points into
the temporary directory, so no cache from an earlier run can help the cold process.
Called from ``bench.py --latency``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CHILD_TIMEOUT_S = 300  # a cold process compiles a forward and a backward kernel family
NUMPY_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
TIMED_CALLS = ("import_s", "first_fwd_s", "warm_fwd_s", "first_bwd_s", "warm_bwd_s", "first_step_s", "warm_step_s")

# The child runs this with the repository root first on sys.path; it must not import
# benchmarks.bench (nor torch): only what a user's process would load.
CHILD_CODE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_latency import first_calls
print(json.dumps(first_calls(json.loads(sys.argv[2]))))
"""


def first_calls(spec: dict) -> dict:
    """In the child: seconds for the import, the first and a second forward and backward."""
    begin = time.perf_counter()
    import cupy
    import numpy

    import cuflash
    timings = {"import_s": time.perf_counter() - begin}

    if spec["dtype"] == "bf16":
        import ml_dtypes

        dtype = numpy.dtype(ml_dtypes.bfloat16)
    else:
        dtype = numpy.dtype(NUMPY_DTYPES[spec["dtype"]])
    shape = (1, spec["heads"], spec["seqlen"], spec["headdim"])
    rng = numpy.random.default_rng(0)
    # Generated on the host: device-side generation would compile CuPy kernels into the cache
    # before the clock starts and hide part of a cold start.
    q, k, v, dout = (cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32).astype(dtype))
                     for _ in range(4))
    cupy.cuda.Device().synchronize()

    def timed(call):
        start = time.perf_counter()
        result = call()
        cupy.cuda.Device().synchronize()
        return time.perf_counter() - start, result

    causal = spec["causal"]
    if spec.get("step"):
        # The first training step: forward and backward together, as attention_vjp (and a torch
        # forward on inputs that require grad) runs them: the backward's kernels compile in the
        # background while the forward's compile and run.
        def step():
            _, vjp = cuflash.attention_vjp(q, k, v, causal=causal)
            return vjp(dout)

        timings["first_step_s"], _ = timed(step)
        timings["warm_step_s"], _ = timed(step)
        return {"status": "ok", **timings}
    timings["first_fwd_s"], _ = timed(lambda: cuflash.attention(q, k, v, causal=causal))
    timings["warm_fwd_s"], _ = timed(lambda: cuflash.attention(q, k, v, causal=causal))
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    timings["first_bwd_s"], _ = timed(
        lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal))
    timings["warm_bwd_s"], _ = timed(
        lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal))
    return {"status": "ok", **timings}


def run_child(spec: dict, cache_dir: Path) -> dict:
    """One fresh process on cache_dir; its timings, or status and note when it failed."""
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache_dir / "cupy"),
               CUDA_CACHE_PATH=str(cache_dir / "nv"))
    command = [sys.executable, "-c", CHILD_CODE, str(REPO_ROOT), json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"no answer within {CHILD_TIMEOUT_S} s"}
    answer = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not answer:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        note = lines[-1] if lines else f"exit status {done.returncode}"
        status = "unsupported" if "NotImplementedError" in note else "error"
        return {"status": status, "note": note[:300]}
    return json.loads(answer[-1])


def latency_specs(args: argparse.Namespace) -> list[dict]:
    specs = []
    for dtype in args.dtype:
        for headdim in args.headdim:
            if args.hidden % headdim:
                raise SystemExit(f"--hidden {args.hidden} is not a multiple of D={headdim}")
            for causal in args.causal:
                specs.append({"dtype": dtype, "headdim": headdim, "causal": causal,
                              "seqlen": args.latency_seqlen, "batch": 1,
                              "heads": args.hidden // headdim})
    return specs


def run_latency_sweep(args: argparse.Namespace) -> tuple[list, bool, str, dict]:
    """Rows (one per dtype, D, causal), interrupted, the table, extra record fields."""
    rows: list[dict] = []
    try:
        for spec in latency_specs(args):
            print(f"[latency] {spec}", file=sys.stderr, flush=True)
            results = {}
            for step in (False, True):  # separate first calls, then a first fwd+bwd step
                cache_dir = Path(tempfile.mkdtemp(prefix="cuflash-latency-"))
                try:
                    for process in ("cold", "cached"):
                        results.setdefault(process, {}).update(run_child({**spec, "step": step}, cache_dir))
                finally:
                    shutil.rmtree(cache_dir, ignore_errors=True)
            rows.append({**spec, **results})
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
        return rows, True, format_latency_table(rows), {"implementations": ["cuflash"]}
    return rows, False, format_latency_table(rows), {"implementations": ["cuflash"]}


def _seconds(result: dict, key: str) -> str:
    if result.get("status") != "ok":
        return {"unsupported": "unsup", "error": "ERROR"}.get(result.get("status"), "?")
    value = result.get(key)
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def latency_columns() -> list[tuple[str, str, str]]:
    """(header, process, key) of the table's timing columns."""
    return [("cold import", "cold", "import_s"), ("cold 1st fwd", "cold", "first_fwd_s"),
            ("cold 1st bwd", "cold", "first_bwd_s"), ("cached import", "cached", "import_s"),
            ("cached 1st fwd", "cached", "first_fwd_s"),
            ("cached 1st bwd", "cached", "first_bwd_s"), ("warm fwd", "cached", "warm_fwd_s"),
            ("warm bwd", "cached", "warm_bwd_s"), ("cold 1st step", "cold", "first_step_s"),
            ("cached 1st step", "cached", "first_step_s")]


def format_latency_table(rows: list[dict]) -> str:
    if not rows:
        return "no points measured"
    columns = latency_columns()
    headers = ["dtype", "D", "causal", "L", "H", *(c[0] for c in columns)]
    lines = [[row["dtype"], str(row["headdim"]), "yes" if row["causal"] else "no",
              str(row["seqlen"]), str(row["heads"]),
              *(_seconds(row[process], key) for _, process, key in columns)] for row in rows]
    widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(headers)]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    out = [render(headers), render(["-" * w for w in widths]), *(render(l) for l in lines), "",
           "Wall time in a new process, B=1: cold = empty kernel cache (run-time compilation), "
           "cached = a second process on the filled cache; warm = a second call in that process."]
    for row in rows:
        for process in ("cold", "cached"):
            if row[process].get("status") != "ok":
                out.append(f"  {row['dtype']} d={row['headdim']} {process}: "
                           f"{row[process]['status']}: {row[process].get('note', '')}")
    return "\n".join(out)
