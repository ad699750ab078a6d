"""What every benchmark's JSON record shares: the commit it measured, strict JSON, its file name.

Every sweep (``bench.py`` and the standalone ``bench_*.py``) imports this module; it imports none
of them. A copy of the tree (a lent GPU machine's) may carry no ``.git``, or a stale one: a commit
the caller names in ``CUFLASH_COMMIT`` wins over what git says.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def use_checkout() -> None:
    """Import cuflash (and ``benchmarks``) from this checkout, installed or not."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def command_output(*command: str, cwd: Path | None = None) -> str | None:
    """A command's stripped stdout, or None if it is missing, fails or takes over 10 s."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> dict:
    """``git_commit``, ``git_commit_source`` ("CUFLASH_COMMIT", "git" or None) and ``git_dirty``
    (uncommitted changes, when git answered)."""
    commit = os.environ.get("CUFLASH_COMMIT", "").strip() or None
    source = "CUFLASH_COMMIT" if commit else None
    if commit is None:
        commit = command_output("git", "rev-parse", "HEAD", cwd=REPO_ROOT)
        source = "git" if commit else None
    status = command_output("git", "status", "--porcelain", cwd=REPO_ROOT) if source == "git" else None
    return {"git_commit": commit or "unknown", "git_commit_source": source,
            "git_dirty": bool(status) if source == "git" else None}


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-device"


def json_safe(value):
    """Strict JSON: non-finite floats become null, paths strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def record_path(out_dir: Path, date_utc: str, device: str, sweep: str = "") -> Path:
    """``<out_dir>/<UTC date>_<device>[_<sweep>].json`` (the directory is created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.fromisoformat(date_utc)
    return out_dir / f"{date:%Y%m%dT%H%M%SZ}_{slug(device)}{'_' + sweep if sweep else ''}.json"


def write(record: dict, path: Path) -> Path:
    path.write_text(json.dumps(json_safe(record), indent=1) + "\n")
    return path


def log_result(tag: str, shape: str, backend: str, result: dict) -> None:
    """One backend's result at one shape on stderr as it lands (its per-run lists, ``*_all``, left out)."""
    print(f"[{tag}] {shape} {backend}: " + json.dumps(json_safe({k: v for k, v in result.items()
                                                              if not k.endswith("_all")})),
          file=sys.stderr, flush=True)


def run_rows(record: dict, path: Path, save, rows) -> Path:
    """A sweep's driver: ``rows()`` measures, appending rows to ``record["rows"]`` and calling
    ``save()`` after each result; an interrupt (Ctrl-C, or the SIGINT gpu_check.sh's timeout sends)
    ends it early and keeps what was measured (``record["interrupted"]``). Then the record is
    saved and its table printed. Returns the record's path."""
    try:
        rows()
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
        record["interrupted"] = True
    save()
    print(record["table"])
    print(f"\nwrote {path}")
    return path


def timed_ms(cupy, call, repeats: int) -> float:
    """Median milliseconds of ``call()`` over ``repeats`` runs after one warm-up, each timed alone
    between CUDA events on CuPy's current stream."""
    import statistics

    call()
    cupy.cuda.Device().synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(samples)


def streamed_ms(cupy, call, calls: int) -> float:
    """Milliseconds per call of ``calls`` calls issued back to back between two CUDA events: the
    host's work overlaps the kernels' (the device's time per call when the host keeps ahead),
    where timed_ms counts a lone call from an idle device, host path included."""
    return streamed(cupy, call, calls)[1]


def streamed(cupy, call, calls: int) -> tuple[float, float]:
    """(host ms, device ms) per call of ``calls`` calls issued back to back: the host's wall time
    to issue them (no wait in between, one synchronization after) and the device's span from
    the first call's start to the last one's end (CUDA events on CuPy's current stream). Equal
    figures mean the device waited for the host (host-bound: the host figure is the call's
    cost); a larger device span, that the host kept ahead."""
    import time

    call()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    began = time.perf_counter()
    start.record()
    for _ in range(calls):
        call()
    stop.record()
    host_s = time.perf_counter() - began
    stop.synchronize()
    return host_s * 1e3 / calls, cupy.cuda.get_elapsed_time(start, stop) / calls


# Short dtype names of the sweeps' command lines.
NUMPY_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
