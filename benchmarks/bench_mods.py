"""What the score modifiers cost: softcap, ALiBi and sinks against the same call without them.

Each modifier (and all three together) is timed beside the plain call on the same inputs, forward
and backward separately: the ratio modified / plain is the modifier's cost (issue 14's goal: at
most 1.10 for each, bf16 d128 at 4k and 16k tokens). The modified calls run the kScoreMods
Variants (cuda_src/score_mod.cuh), the plain ones the folded-scale kernels.

    python benchmarks/bench_mods.py [--dtype bf16,fp16] [--headdim 128] [--seqlen 4096,16384]

Times per call: the device's (--repeats calls back to back between CUDA events, the host's path
overlapped: what the modifier costs on the GPU) and a lone call's (median of --repeats, each
from an idle device between CUDA events: the host path included). Writes
benchmarks/results/<UTC>_<gpu>_mods.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402



def modifiers(cupy, heads: int) -> dict:
    """The timed configurations: none, each modifier alone, all three (Gemma-2's cap of 50, ALiBi's
    geometric slopes, gpt-oss-like sinks)."""
    slopes = cupy.asarray([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=cupy.float32)
    sinks = cupy.linspace(-1, 1, heads, dtype=cupy.float32)
    return {"plain": {}, "softcap": {"softcap": 50.0}, "alibi": {"alibi_slopes": slopes},
            "sinks": {"sinks": sinks}, "all": {"softcap": 50.0, "alibi_slopes": slopes, "sinks": sinks}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--headdim", default="128")
    parser.add_argument("--seqlen", default="4096,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="batch x seqlen")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--causal", default="false,true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    import cupy
    import ml_dtypes  # noqa: F401
    import numpy

    import cuflash

    rows = []
    for name in args.dtype.split(","):
        dtype = numpy.dtype(records.NUMPY_DTYPES[name])
        for d in map(int, args.headdim.split(",")):
            for L in map(int, args.seqlen.split(",")):
                for causal in (c.strip().lower() == "true" for c in args.causal.split(",")):
                    b, h = max(1, args.tokens // L), args.heads
                    flops = 4 * b * h * L * L * d * (0.5 if causal else 1.0)
                    rng = numpy.random.default_rng(0)
                    q, k, v, dout = (cupy.asarray(rng.standard_normal((b, h, L, d), dtype=numpy.float32).astype(dtype))
                                     for _ in range(4))
                    base = {}
                    for label, mods in modifiers(cupy, h).items():
                        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **mods)
                        calls = {"fwd": lambda: cuflash.attention(q, k, v, causal=causal, return_lse=True, **mods),
                                 "bwd": lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                                           **mods)}
                        # device: calls back to back (the host's path overlapped, the modifier's
                        # cost on the GPU); lone: one call from an idle device, host path included.
                        times = {f"{kind}_{how}": timer(cupy, call, args.repeats) for kind, call in calls.items()
                                 for how, timer in (("ms", records.streamed_ms), ("lone_ms", records.timed_ms))}
                        base = base or times
                        row = {"dtype": name, "D": d, "L": L, "B": b, "H": h, "causal": causal, "mods": label,
                               **times, "fwd_tflops": flops / times["fwd_ms"] / 1e9,
                               "bwd_tflops": 2.5 * flops / times["bwd_ms"] / 1e9,
                               **{f"{key}_vs_plain": times[key] / base[key] for key in times}}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)

    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    record = {"sweep": "mods", "device": gpu, "cuflash": cuflash.__version__, "cupy": cupy.__version__,
              **records.source_commit(), "date_utc": records.now_utc(), "config": vars(args), "rows": rows}
    path = records.write(record, records.record_path(args.out, record["date_utc"], gpu, "mods"))
    print("| dtype | D | L | causal | modifiers | fwd TF/s | fwd time vs plain | bwd TF/s | bwd time vs plain "
          "| lone call vs plain, fwd / bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['D']} | {r['L']} | {'yes' if r['causal'] else 'no'} | {r['mods']} "
              f"| {r['fwd_tflops']:.0f} | {r['fwd_ms_vs_plain']:.3f} | {r['bwd_tflops']:.0f} | {r['bwd_ms_vs_plain']:.3f} "
              f"| {r['fwd_lone_ms_vs_plain']:.3f} / {r['bwd_lone_ms_vs_plain']:.3f} |")
    print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
