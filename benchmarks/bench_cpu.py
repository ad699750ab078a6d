"""The CPU backend against dense NumPy attention (idle and loaded), and against torch's CPU SDPA.

``--sweep load`` (the default): for each shape, cuflash's NumPy backend (``cuflash.attention`` on
NumPy arrays, the blocked online-softmax algorithm) and the dense formula (``softmax(q k^T *
scale) v`` in NumPy, which materialises the L x L scores), each timed (best of --repeats) and
measured for peak memory (tracemalloc: NumPy's allocations), once with the machine idle and once
while --busy processes spin on the CPU (default: one per core). The question it answers: does the
blocked backend stay within 2x of dense NumPy when other work competes for the cores, with O(L)
memory?

``--sweep peers``: cuflash's NumPy backend against torch's ``scaled_dot_product_attention`` on CPU
tensors (its own flash kernel; torch limited to cuflash's thread count), forward and
forward+backward, float32 and float64, on the same inputs: long rows, batches of short rows, and
a triangle-attention pair bias with its gradient (torch: a float ``attn_mask`` that requires
grad). Each row's outputs are checked against each other before it is timed.

    python benchmarks/bench_cpu.py [--sweep load|peers] [--repeats 3] [--busy N]

Writes benchmarks/results/<UTC>_<cpu>_cpu.json (or ``_cpu_peers.json``) and prints a Markdown
table. No GPU needed.
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


# (lead axes..., L, D, causal, bias): the peers sweep's cases
PEER_CASES = [((1, 8), 2048, 64, False, False), ((1, 8), 2048, 64, True, False), ((8, 4), 512, 128, False, False),
              ((64, 8), 128, 32, False, False), ((256, 4), 64, 32, False, False),
              ((1, 128, 4), 128, 32, False, True)]  # the last: triangle attention, bias (1, 1, 4, L, L) with grad


def run_peers(repeats: int) -> list[dict]:
    """cuflash (NumPy) against torch's CPU SDPA: forward and forward+backward times, per case and dtype."""
    import numpy
    import torch

    import cuflash
    from cuflash import _cpu

    torch.set_num_threads(_cpu._threads())  # the same cores for both
    rows = []
    for dtype in (numpy.float32, numpy.float64):
        for lead, length, d, causal, with_bias in PEER_CASES:
            rng = numpy.random.default_rng(0)
            q, k, v, dout = (rng.standard_normal(lead + (length, d)).astype(dtype) for _ in range(4))
            bias = rng.standard_normal((1,) * (len(lead) - 1) + (lead[-1], length, length)).astype(dtype) if with_bias else None
            tq, tk, tv, tbias = (None if x is None else torch.from_numpy(x).requires_grad_() for x in (q, k, v, bias))
            tdout = torch.from_numpy(dout)

            def ours_forward():
                return cuflash.attention(q, k, v, causal=causal, bias=bias, return_lse=True)

            out, lse = ours_forward()

            def ours_backward():
                return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, bias=bias)

            def torch_forward(grad=False):
                with torch.set_grad_enabled(grad):
                    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tbias, is_causal=causal)

            def torch_forward_backward():
                inputs = (tq, tk, tv) + (() if tbias is None else (tbias,))
                return torch.autograd.grad(torch_forward(True), inputs, tdout)

            theirs = torch_forward_backward()
            for mine, peer in zip((out,) + ours_backward(), (torch_forward().numpy(),) + tuple(g.numpy() for g in theirs)):
                tolerance = 1e-3 if dtype == numpy.float32 else 1e-9
                error = numpy.abs(mine - peer).max() / max(numpy.abs(peer).max(), 1e-30)
                assert error < tolerance, f"{lead, length, d, causal, with_bias}: cuflash and torch differ by {error:.2e}"
            forward, _ = measure(ours_forward, repeats)
            backward, _ = measure(ours_backward, repeats)
            peer_forward, _ = measure(torch_forward, repeats)
            peer_both, _ = measure(torch_forward_backward, repeats)
            row = {"dtype": numpy.dtype(dtype).name, "shape": list(lead) + [length, d], "causal": causal, "bias": with_bias,
                   "cuflash_forward_s": forward, "cuflash_forward_backward_s": forward + backward,
                   "torch_forward_s": peer_forward, "torch_forward_backward_s": peer_both}
            rows.append(row)
            print(f"  {row['dtype']} {tuple(row['shape'])} causal={causal} bias={with_bias}: forward {forward * 1e3:.1f} / "
                  f"{peer_forward * 1e3:.1f} ms, fwd+bwd {(forward + backward) * 1e3:.1f} / {peer_both * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    return rows


def peers_main(args) -> int:
    import numpy
    import torch

    import cuflash
    from cuflash import _cpu

    result = {"sweep": "cpu_peers", "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": _cpu._threads(), "numpy": numpy.__version__, "torch": torch.__version__,
              "cuflash": cuflash.__version__, **records.source_commit(), "date_utc": records.now_utc(),
              "rows": run_peers(args.repeats)}
    path = records.write(result, records.record_path(args.out, result["date_utc"], f"{result['device']}-{os.cpu_count()}cpu",
                                                     "cpu_peers"))
    print("| dtype | shape (..., L, D) | causal | bias (grad) | forward ms: cuflash / torch | fwd+bwd ms: cuflash / torch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in result["rows"]:
        print(f"| {row['dtype']} | {tuple(row['shape'])} | {'yes' if row['causal'] else 'no'} | {'yes' if row['bias'] else 'no'} | "
              f"{row['cuflash_forward_s'] * 1e3:.1f} / {row['torch_forward_s'] * 1e3:.1f} "
              f"({row['torch_forward_s'] / row['cuflash_forward_s']:.2f}x) | "
              f"{row['cuflash_forward_backward_s'] * 1e3:.1f} / {row['torch_forward_backward_s'] * 1e3:.1f} "
              f"({row['torch_forward_backward_s'] / row['cuflash_forward_backward_s']:.2f}x) |")
    print(f"\n(x: torch's time over cuflash's; {result['threads']} threads each)\nrecorded {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=("load", "peers"), default="load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes while loaded")
    parser.add_argument("--out", type=Path, default=records.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.sweep == "peers":
        return peers_main(args)
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
