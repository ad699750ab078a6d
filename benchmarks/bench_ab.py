"""Same-run A/B of source trees: is a change faster, and by how much, on the same GPU in one call.

A kernel change is judged against the tree it changes, never against numbers from another day:
clocks, the machine lent and its neighbours move timings by 5-10% between calls (NOTES.md,
sessions 20-22). This script times two or more trees in one call, alternating them round after
round (A B C, A B C, ...), each run in its own process (each tree's cuflash, its own kernel cache
key: the sources' digest is in the NVRTC options), and reports per point the median over rounds
and the ratio of every tree to the first.

A tree is a directory holding a cuflash checkout (e.g. ``git archive REV | tar -x -C DIR`` made
before the call: a lent machine's copy may carry no ``.git``), or ``REV`` itself when git can
archive it here.

    python benchmarks/bench_ab.py main=DIR_A change=DIR_B [--rounds 3] [--mods plain,alibi,softcap] [--bwd]
    python benchmarks/bench_ab.py main=REV change=DIR --cases triangle384,swin --headdim '' --bwd

Per point (bf16 by default, H16, B*L = --tokens, D in --headdim, L in --seqlen, dense and causal):
forward device milliseconds (median of --repeats calls, each between CUDA events), and with
--bwd the backward's (attention_backward from the forward's out and lse) for the plain calls.
Modifiers: softcap 30, ALiBi with the geometric slopes 2^(-8 (h + 1) / H). ``--cases`` adds the
bias/mask shapes of issue 15 (``BIAS_CASES``: triangle attention, Swin's windows, a pair bias over
a batch, a per-key bias; a float32 bias, the dtype's inputs), each a point whose ``mod`` is its
name: the forward, and with --bwd the default backward with dbias (the route plan.py picks). Writes
benchmarks/results/<UTC>_<gpu>_ab.json (every round's row, the medians and the ratios) and
prints a Markdown table. ``--child TREE LABEL`` is the per-tree process (internal).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402

MODS = ("plain", "alibi", "softcap")
KEY = ("dtype", "D", "L", "causal", "mod")
# Issue 15's shapes (bench_bias.py's, on CuPy arrays): q's shape, the bias's, and whether a mask
# of Swin's shifted windows (7 x 7 tokens cut into up to four regions per window) comes with it.
BIAS_CASES = {
    "triangle256": ((256, 4, 256, 32), (1, 4, 256, 256), False),
    "triangle384": ((384, 4, 384, 32), (1, 4, 384, 384), False),
    "swin": ((64, 64, 4, 49, 32), (1, 4, 49, 49), True),
    "pair-d128": ((2, 16, 4096, 128), (1, 16, 4096, 4096), False),
    "keybias": ((2, 16, 4096, 128), (2, 1, 1, 4096), False),
}


def parse_tree(spec: str, scratch: Path) -> tuple[str, Path]:
    """``LABEL=DIR`` or ``LABEL=REV`` (or a bare DIR / REV, labelled by itself) -> (label, directory
    holding cuflash/). A revision is archived with git into ``scratch``."""
    label, _, where = spec.partition("=")
    if not where:
        label, where = spec, spec
    path = Path(where)
    if (path / "cuflash").is_dir():
        return label, path.resolve()
    target = scratch / label
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", where], cwd=REPO_ROOT, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"bench_ab: {where!r} is neither a directory holding cuflash/ nor a revision git can archive")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return label, target


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per point: each tree's median over rounds (fwd_ms, bwd_ms where measured) and its ratio to
    the first tree's; a tree with no row at a point is left out of that point."""
    points: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        points.setdefault(tuple(row[k] for k in KEY), {}).setdefault(row["tree"], []).append(row)
    out = []
    for point, by_tree in points.items():
        entry = dict(zip(KEY, point))
        for field in ("fwd_ms", "bwd_ms"):
            medians = {t: statistics.median(r[field] for r in by_tree[t]) for t in labels
                       if t in by_tree and all(field in r for r in by_tree[t])}
            if not medians:
                continue
            base = medians.get(labels[0])
            for t, value in medians.items():
                entry[f"{t}:{field}"] = value
                if base:
                    entry[f"{t}:{field}_ratio"] = value / base
        out.append(entry)
    return out


def table(summary: list[dict], labels: list[str]) -> str:
    head = "| dtype | D | L | causal | mod | " + " | ".join(
        f"{t} fwd ms" + ("" if i == 0 else f" (x {labels[0]})") for i, t in enumerate(labels))
    head += " | " + " | ".join(f"{t} bwd ms" for t in labels) + " |"
    lines = [head, "|" + " --- |" * (5 + 2 * len(labels))]

    def cell(entry, t, field):
        value = entry.get(f"{t}:{field}")
        if value is None:
            return "-"
        ratio = entry.get(f"{t}:{field}_ratio")
        return f"{value:.3f}" if t == labels[0] or ratio is None else f"{value:.3f} ({ratio:.3f})"

    for e in summary:
        lines.append(f"| {e['dtype']} | {e['D']} | {e['L']} | {'yes' if e['causal'] else 'no'} | {e['mod']} | "
                     + " | ".join(cell(e, t, "fwd_ms") for t in labels) + " | "
                     + " | ".join(cell(e, t, "bwd_ms") for t in labels) + " |")
    return "\n".join(lines)


def window_mask(numpy, windows: int, side: int, rng):
    """(windows, 1, side^2, side^2) bool: per window a random row and column (side = none) cut
    the tokens into up to four regions that see only themselves: bench_bias.window_mask's rule
    with NumPy's draws (that one draws with torch, whose recorded Swin rows keep their masks)."""
    token = numpy.arange(side * side)
    cuts = rng.integers(1, side + 1, (2, windows, 1))
    region = (token // side >= cuts[0]).astype(numpy.int64) * 2 + (token % side >= cuts[1])
    return (region[:, :, None] == region[:, None, :])[:, None]


def bias_points(cuflash, cupy, numpy, dtype, args, label):
    """One row per ``--cases`` name: the forward's device ms, and the default backward's with dbias."""
    for name in filter(None, args.cases.split(",")):
        q_shape, bias_shape, windows = BIAS_CASES[name]
        rng = numpy.random.default_rng(0)
        q, k, v, dout = (cupy.asarray(rng.standard_normal(q_shape, dtype=numpy.float32).astype(dtype))
                         for _ in range(4))
        bias = cupy.asarray(rng.standard_normal(bias_shape, dtype=numpy.float32))
        mask = cupy.asarray(window_mask(numpy, q_shape[1], 7, rng)) if windows else None
        row = {"tree": label, "dtype": args.dtype, "D": q_shape[-1], "L": q_shape[-2], "causal": False, "mod": name,
               "fwd_ms": records.timed_ms(cupy, lambda: cuflash.attention(q, k, v, bias=bias, mask=mask),
                                          args.repeats)}
        if args.bwd:
            out, lse = cuflash.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
            row["bwd_ms"] = records.timed_ms(
                cupy, lambda: cuflash.attention_backward(dout, q, k, v, out, lse, bias=bias, mask=mask), args.repeats)
        print(json.dumps(row), flush=True)


def child(tree: Path, label: str, args) -> None:
    """Time every point with the cuflash of ``tree``; one JSON row a point on stdout."""
    sys.path.insert(0, str(tree))
    import cupy
    import ml_dtypes  # noqa: F401  (bfloat16 for NumPy and CuPy)
    import numpy

    import cuflash

    if not str(Path(cuflash.__file__).resolve()).startswith(str(tree)):
        raise SystemExit(f"bench_ab: imported {cuflash.__file__}, not the tree {tree}")
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    print(json.dumps({"device": device.decode() if isinstance(device, bytes) else device}), flush=True)
    dtype = numpy.dtype(records.NUMPY_DTYPES[args.dtype])
    bias_points(cuflash, cupy, numpy, dtype, args, label)
    heads = args.heads
    for d in (int(x) for x in filter(None, args.headdim.split(","))):
        for length in (int(x) for x in args.seqlen.split(",")):
            batch = max(1, args.tokens // length)
            rng = numpy.random.default_rng(0)
            q, k, v = (cupy.asarray(rng.standard_normal((batch, heads, length, d), dtype=numpy.float32).astype(dtype))
                       for _ in range(3))
            for causal in (False, True):
                for mod in args.mods.split(","):
                    options = {}
                    if mod == "alibi":
                        options["alibi_slopes"] = cupy.asarray(2.0 ** (-8.0 * (numpy.arange(heads) + 1) / heads),
                                                               dtype=cupy.float32)
                    elif mod == "softcap":
                        options["softcap"] = 30.0
                    row = {"tree": label, "dtype": args.dtype, "D": d, "L": length, "causal": causal, "mod": mod,
                           "fwd_ms": records.timed_ms(cupy, lambda: cuflash.attention(q, k, v, causal=causal, **options),
                                                      args.repeats)}
                    if args.bwd and mod == "plain":
                        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                        row["bwd_ms"] = records.timed_ms(
                            cupy, lambda: cuflash.attention_backward(q, q, k, v, out, lse, causal=causal), args.repeats)
                    print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="LABEL=DIR or LABEL=REV, the first the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bf16", choices=sorted(records.NUMPY_DTYPES))
    parser.add_argument("--headdim", default="128,64")
    parser.add_argument("--seqlen", default="4096,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="batch x seqlen")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mods", default="plain", help=f"comma-separated, of {', '.join(MODS)}")
    parser.add_argument("--cases", default="", help=f"issue 15's bias shapes, comma-separated, of "
                                                     f"{', '.join(BIAS_CASES)} (none; --headdim '' for these alone)")
    parser.add_argument("--bwd", action="store_true", help="also time the plain calls' backward (and the --cases' "
                                                           "with dbias)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=records.RESULTS_DIR)
    parser.add_argument("--child", nargs=2, metavar=("TREE", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.mods.split(",")) - set(MODS)
    if unknown:
        parser.error(f"--mods takes {', '.join(MODS)}; got {', '.join(sorted(unknown))}")
    unknown = set(filter(None, args.cases.split(","))) - set(BIAS_CASES)
    if unknown:
        parser.error(f"--cases takes {', '.join(BIAS_CASES)}; got {', '.join(sorted(unknown))}")
    if args.child:
        child(Path(args.child[0]), args.child[1], args)
        return 0
    if len(args.trees) < 2:
        parser.error("give at least two trees (LABEL=DIR or LABEL=REV), the first the baseline")
    options = [f"--{name}={getattr(args, name)}" for name in ("dtype", "headdim", "seqlen", "tokens", "heads", "mods",
                                                               "cases", "repeats")] + (["--bwd"] if args.bwd else [])
    rows: list[dict] = []
    device = "gpu"
    with tempfile.TemporaryDirectory() as scratch:
        trees = [parse_tree(spec, Path(scratch)) for spec in args.trees]
        labels = [label for label, _ in trees]
        if len(set(labels)) != len(labels):
            parser.error(f"tree labels must differ: {labels}")
        for round_index in range(args.rounds):
            for label, path in trees:
                done = subprocess.run([sys.executable, __file__, *options, "--child", str(path), label],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    return 1
                for line in done.stdout.splitlines():
                    if line.startswith("{"):
                        row = json.loads(line)
                        if "device" in row:
                            device = row["device"]
                        else:
                            rows.append({**row, "round": round_index})
    summary = summarize(rows, labels)
    print(table(summary, labels))
    record = {"sweep": "ab", "device": device, "date_utc": records.now_utc(), **records.source_commit(),
              "trees": dict(zip(labels, args.trees)), "rounds": args.rounds, "options": options,
              "rows": rows, "summary": summary}
    path = records.write(record, records.record_path(args.out, record["date_utc"], device, "ab"))
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
