"""GQA and MQA against MHA: what sharing key/value heads costs cuflash's forward + backward.

The same call is timed with Hkv = Hq (MHA), Hq / 2, Hq / 8 (GQA) and 1 (MQA): the FLOPs are
those of Hq query heads in every case (4 B Hq L^2 D, x0.5 causal, x3.5 fwd+bwd), so TFLOP/s compare
directly and the ratio GQA / MHA is the cost of the key/value sharing. The backward's dK/dV of a
key/value head are accumulated over its query heads inside the dK/dV kernel, so the ratio should
stay near 1. torch SDPA's default backend with ``enable_gqa=True`` is timed beside it where torch
is available (same inputs, same process).

    python benchmarks/bench_gqa.py [--dtype bf16,fp16,fp32,fp64] [--headdim 64,128] [--seqlen 4096]

CUDA events, median of --repeats after a warm-up; writes benchmarks/results/<UTC>_<gpu>_gqa.json
and prints a Markdown table.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16,fp16,fp32,fp64")
    parser.add_argument("--headdim", default="64,128")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--causal", default="true,false")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    import cupy
    import ml_dtypes  # noqa: F401
    import numpy

    import cuflash

    try:
        import torch
    except ImportError:
        torch = None

    rows = []
    kv_heads = sorted({args.heads, args.heads // 2, args.heads // 8, 1}, reverse=True)
    for name in args.dtype.split(","):
        dtype = numpy.dtype(records.NUMPY_DTYPES[name])
        for d in map(int, args.headdim.split(",")):
            for causal in (c.strip().lower() == "true" for c in args.causal.split(",")):
                b, h, L = args.batch, args.heads, args.seqlen
                if dtype.itemsize == 8:  # fp64 runs ~20x slower: a shorter sequence, same shape
                    L = min(L, 2048)
                flops = 4 * b * h * L * L * d * (0.5 if causal else 1.0) * 3.5
                rng = numpy.random.default_rng(0)
                q = cupy.asarray(rng.standard_normal((b, h, L, d), dtype=numpy.float32).astype(dtype))
                dout = cupy.asarray(rng.standard_normal((b, h, L, d), dtype=numpy.float32).astype(dtype))
                base = None
                for hkv in kv_heads:
                    k, v = (cupy.asarray(rng.standard_normal((b, hkv, L, d), dtype=numpy.float32).astype(dtype))
                            for _ in range(2))

                    def step():
                        out, vjp = cuflash.attention_vjp(q, k, v, causal=causal)
                        vjp(dout)

                    ms = records.timed_ms(cupy, step, args.repeats)
                    row = {"dtype": name, "D": d, "causal": causal, "L": L, "B": b, "Hq": h, "Hkv": hkv,
                           "cuflash_ms": ms, "cuflash_tflops": flops / ms / 1e9}
                    base = row["cuflash_tflops"] if hkv == h else base
                    row["vs_mha"] = row["cuflash_tflops"] / base
                    if torch is not None and name in ("bf16", "fp16"):
                        tq, tk, tv, tdout = (torch.from_dlpack(x).requires_grad_(x is not dout) for x in (q, k, v, dout))

                        def sdpa_step():
                            out = torch.nn.functional.scaled_dot_product_attention(
                                tq, tk, tv, is_causal=causal, enable_gqa=hkv != h)
                            torch.autograd.grad(out, (tq, tk, tv), tdout)

                        try:
                            sdpa_ms = records.timed_ms(cupy, sdpa_step, args.repeats)
                            row["sdpa_tflops"] = flops / sdpa_ms / 1e9
                        except RuntimeError as error:
                            row["sdpa_note"] = str(error)[:120]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)

    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    record = {"sweep": "gqa", "device": gpu, "cuflash": cuflash.__version__, "cupy": cupy.__version__,
              **records.source_commit(), "date_utc": records.now_utc(), "config": vars(args), "rows": rows}
    path = records.write(record, records.record_path(args.out, record["date_utc"], gpu, "gqa"))
    print("| dtype | D | causal | L | Hq/Hkv | cuflash fwd+bwd TF/s | vs MHA | sdpa (default) TF/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sdpa = f"{r['sdpa_tflops']:.0f}" if "sdpa_tflops" in r else "-"
        print(f"| {r['dtype']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['L']} | {r['Hq']}/{r['Hkv']} "
              f"| {r['cuflash_tflops']:.1f} | {r['vs_mha']:.3f} | {sdpa} |")
    print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
