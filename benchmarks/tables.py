"""Tables and plots of the throughput sweeps' rows (bench.py, bench_report.py).

Importing this module needs neither torch nor CuPy; plots need matplotlib.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import record as records
from benchmarks.harness import CUFLASH, FLEX

STATUS_CELL = {"unsupported": "unsup", "skipped": "skip", "oom": "oom", "error": "ERROR"}


def cell(value, spec=".3f") -> str:
    """A table cell: value formatted by spec, or "-" for a value not measured."""
    return "-" if value is None else format(value, spec)


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
