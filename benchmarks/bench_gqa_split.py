"""How many query heads a GQA dK/dV block should take: the backward timed with each split forced.

Under GQA a dK/dV block accumulates ``heads_per_block`` query heads of its key/value head on chip.
Where the kernels add a split group's slices into sums (every dK/dV family, unless
deterministic or packed: plan._adds_dkdv) plan._heads_per_block_adding picks it from a model of
the SMs' load; else plan._heads_per_block does (the whole group unless too few blocks fill the
GPU) and the partial dK/dV are summed after the launch (plan._sum_to). ``--deterministic`` times the second path
where the first would run. This sweep times
``attention_backward`` with the rule's pick ("auto") and with every divisor of the group forced,
for Hkv = Hq (MHA, the reference), Hq / 2, Hq / 8 and 1, dense and causal, and the partial sum
alone. It is the data behind the rule (benchmarks/NOTES.md, session 22).

    python benchmarks/bench_gqa_split.py [--dtype bf16] [--headdim 128] [--seqlen 4096] [--batch 2] [--heads 16]

CUDA events, median of --repeats after a warm-up; writes benchmarks/results/<UTC>_<gpu>_gqa_split.json
and prints a Markdown table (backward ms; x MHA = against the same call with Hkv = Hq).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(records.NUMPY_DTYPES))
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deterministic", action="store_true", help="the backward's deterministic path")
    parser.add_argument("--out", type=Path, default=records.RESULTS_DIR)
    args = parser.parse_args(argv)

    import cupy
    import ml_dtypes  # noqa: F401  (bfloat16 for NumPy and CuPy)
    import numpy

    import cuflash
    from cuflash._gpu import plan

    dtype = numpy.dtype(records.NUMPY_DTYPES[args.dtype])
    b, h, length, d = args.batch, args.heads, args.seqlen, args.headdim
    rng = numpy.random.default_rng(0)

    def draw(*shape):
        return cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32).astype(dtype))

    rules = {name: getattr(plan, name) for name in ("_heads_per_block", "_heads_per_block_adding")}
    rows, sums = [], []
    q, dout = draw(b, h, length, d), draw(b, h, length, d)
    try:
        for causal in (False, True):
            mha_ms = None
            for hkv in sorted({h, h // 2, h // 8, 1}, reverse=True):
                k, v = draw(b, hkv, length, d), draw(b, hkv, length, d)
                group = h // hkv
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                for forced in [None] + [n for n in range(1, group + 1) if group % n == 0]:
                    picks = []

                    def spy(rule, n=forced, picks=picks):  # the rule's pick, or the forced one
                        def pick(*rule_args, **rule_kwargs):
                            picks.append(rule(*rule_args, **rule_kwargs) if n is None else n)
                            return picks[-1]
                        return pick

                    for name, rule in rules.items():
                        setattr(plan, name, spy(rule))
                    plan.forget()
                    ms = records.timed_ms(cupy, lambda: cuflash.attention_backward(
                        dout, q, k, v, out, lse, causal=causal, deterministic=args.deterministic), args.repeats)
                    mha_ms = ms if hkv == h and forced is None else mha_ms
                    rows.append({"causal": causal, "Hq": h, "Hkv": hkv, "heads_per_block": forced or "auto",
                                 "auto": picks[0] if forced is None and picks else None,
                                 "bwd_ms": ms, "vs_mha": ms / mha_ms})
                    print(rows[-1], file=sys.stderr, flush=True)
    finally:
        for name, rule in rules.items():
            setattr(plan, name, rule)
        plan.forget()
    grad = draw(b, h, length, d)
    for parts in sorted(n for n in {2, 4, 8, h} if 2 <= n <= h and h % n == 0):
        shape = (b, h // parts, length, d)
        sums.append({"parts": parts, "ms": records.timed_ms(
            cupy, lambda: plan._sum_to(grad, shape, parts, numpy.dtype(numpy.float32), grad.dtype), args.repeats)})

    print("| causal | Hq/Hkv | heads per block | bwd ms | x MHA |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        pick = f"auto ({r['auto']})" if r["heads_per_block"] == "auto" else r["heads_per_block"]
        print(f"| {'yes' if r['causal'] else 'no'} | {r['Hq']}/{r['Hkv']} | {pick} | {r['bwd_ms']:.3f} | {r['vs_mha']:.2f} |")
    print("\n| partial sums | ms |\n| --- | --- |\n" + "\n".join(f"| {s['parts']} | {s['ms']:.3f} |" for s in sums))
    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    record = {"sweep": "gqa_split", "device": gpu, "cuflash": cuflash.__version__, "cupy": cupy.__version__,
              **records.source_commit(), "date_utc": records.now_utc(), "config": vars(args), "rows": rows,
              "partial_sums": sums}
    path = records.write(record, records.record_path(args.out, record["date_utc"], gpu, "gqa_split"))
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
