"""The CPU backend against dense NumPy attention, on an idle and on a loaded machine.

For each shape: cuflash's NumPy backend (``cuflash.attention`` on NumPy arrays, the blocked
online-softmax algorithm) and the dense formula (``softmax(q k^T * scale) v`` in NumPy, which
materialises the L x L scores), each timed (best of --repeats) and measured for peak memory
(tracemalloc: NumPy's allocations), once with the machine idle and once while --busy processes
spin on the CPU (default: one per core). The question it answers: does the blocked backend stay
within 2x of dense NumPy when other work competes for the cores, with O(L) memory?

    python benchmarks/bench_cpu.py [--repeats 3] [--busy N]

Writes benchmarks/results/<UTC>_<cpu>_cpu.json and prints a Markdown table. No GPU needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402

SHAPES = [(1, 8, 2048, 64), (64, 8, 128, 32), (8, 4, 512, 128)]  # B, H, L, D


def _spin(stop):
    while not stop.is_set():
        pass


def dense(q, k, v, causal):
    import numpy

    s = q @ numpy.swapaxes(k, -1, -2) * (1.0 / numpy.sqrt(q.shape[-1]))
    if causal:
        length = q.shape[-2]
        s = numpy.where(numpy.tril(numpy.ones((length, length), bool)), s, -numpy.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = numpy.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


def measure(call, repeats: int) -> tuple[float, int]:
    """(best wall time in s, peak traced bytes of one call)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return min(times), peak


def run(repeats: int, causal_options) -> list[dict]:
    import numpy

    import cuflash

    rows = []
    rng = numpy.random.default_rng(0)
    for b, h, length, d in SHAPES:
        q, k, v = (rng.standard_normal((b, h, length, d)).astype(numpy.float32) for _ in range(3))
        for causal in causal_options:
            ours_s, ours_bytes = measure(lambda: cuflash.attention(q, k, v, causal=causal), repeats)
            dense_s, dense_bytes = measure(lambda: dense(q, k, v, causal), repeats)
            rows.append({"shape": [b, h, length, d], "causal": causal, "cuflash_s": ours_s, "dense_s": dense_s,
                         "ratio": ours_s / dense_s, "cuflash_peak_bytes": ours_bytes, "dense_peak_bytes": dense_bytes})
            print(f"  {(b, h, length, d)} causal={causal}: cuflash {ours_s * 1e3:.1f} ms, dense {dense_s * 1e3:.1f} ms "
                  f"({ours_s / dense_s:.2f}x), peak {ours_bytes / 2**20:.1f} vs {dense_bytes / 2**20:.1f} MiB",
                  file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes while loaded")
    parser.add_argument("--out", type=Path, default=records.RESULTS_DIR)
    args = parser.parse_args(argv)
    import numpy

    import cuflash

    result = {"sweep": "cpu", "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "numpy": numpy.__version__, "cuflash": cuflash.__version__, "busy": args.busy,
              **records.source_commit(), "date_utc": records.now_utc(), "rows": {}}
    for load in ("idle", "loaded"):
        print(f"[cpu] {load}", file=sys.stderr, flush=True)
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                    for _ in range(args.busy if load == "loaded" else 0)]
        for process in spinners:
            process.start()
        try:
            result["rows"][load] = run(args.repeats, (False, True))
        finally:
            stop.set()
            for process in spinners:
                process.join(timeout=5)
    path = records.write(result, records.record_path(args.out, result["date_utc"], f"{result['device']}-{os.cpu_count()}cpu", "cpu"))
    print(f"| shape (B, H, L, D), float32 | causal | idle: cuflash / dense | loaded ({args.busy} busy): cuflash / dense "
          "| peak MiB cuflash / dense |")
    print("| --- | --- | --- | --- | --- |")
    for idle, loaded in zip(result["rows"]["idle"], result["rows"]["loaded"]):
        print(f"| {tuple(idle['shape'])} | {'yes' if idle['causal'] else 'no'} | "
              f"{idle['cuflash_s'] * 1e3:.0f} / {idle['dense_s'] * 1e3:.0f} ms ({idle['ratio']:.2f}x) | "
              f"{loaded['cuflash_s'] * 1e3:.0f} / {loaded['dense_s'] * 1e3:.0f} ms ({loaded['ratio']:.2f}x) | "
              f"{idle['cuflash_peak_bytes'] / 2**20:.0f} / {idle['dense_peak_bytes'] / 2**20:.0f} |")
    print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
