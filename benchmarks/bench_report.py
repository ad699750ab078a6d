"""Reports from recorded JSON, no GPU needed: results/latest.md, the plots, README's section.

    python benchmarks/bench.py --report benchmarks/results/<run>.json [<other run>.json ...]

writes, for the given records in the given order (any mix of the training, decode, memory and
latency sweeps):

* the PNG plots of each record, next to it (or in ``--out-dir``);
* ``results/latest.md``: per record the environment, the full table (every implementation, the
  ratios, the reasons for cells that are not numbers) and the plots;
* the top-level ``README.md`` between ``<!-- bench:start -->`` and ``<!-- bench:end -->``: the
  same, condensed (training sweeps as one cuflash line per configuration), with the command
  that regenerates it. Only the text between the markers changes; without markers a
  "Benchmarks" section holding them goes in before "Layout of the repository".
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from benchmarks.harness import CUFLASH, FLASH_PEER
from benchmarks.record import REPO_ROOT, RESULTS_DIR as DEFAULT_OUT_DIR
from benchmarks.tables import STATUS_CELL, compile_time_range, failure_reasons, plot
from benchmarks.bench_latency import latency_columns
from benchmarks.bench_memory import peak_cell, seqlen_text, summarize_memory

README = REPO_ROOT / "README.md"
START_MARKER, END_MARKER = "<!-- bench:start -->", "<!-- bench:end -->"
README_ANCHOR = "## Layout of the repository"


def sweep_of(record: dict) -> str:
    return record.get("sweep", "training")  # records from before the sweeps were named


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plots", file=sys.stderr)
        return None
    return plt


def _log2_axis(ax, values: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [seqlen_text(v) for v in values])
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def _finish(fig, axes, implementations: list[str], title: str, path: Path, plt) -> Path:
    legend = {}
    for ax in axes:  # one legend for the figure, in implementation order
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = [name for name in [*implementations, "inputs"] if name in legend]
    fig.legend([legend[n] for n in order], order, loc="lower center", ncol=len(order),
               frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _title(record: dict, what: str) -> str:
    return (f"{what} on {record.get('device', '?')} "
            f"(commit {str(record.get('git_commit', 'unknown'))[:10]})")


def plot_decode(record: dict, stem: str, out_dir: Path) -> list[Path]:
    """K+V GB/s against Lk: a figure per (mode, dtype, causal), a panel per (D, Lq)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows, implementations = record["rows"], record["implementations"]
    written = []
    for mode, dtype, causal in dict.fromkeys((r["mode"], r["dtype"], r["causal"]) for r in rows):
        group = [r for r in rows if (r["mode"], r["dtype"], r["causal"]) == (mode, dtype, causal)]
        headdims = sorted({r["headdim"] for r in group})
        query_rows = sorted({r["seqlen_q"] for r in group})
        fig, axes = plt.subplots(len(headdims), len(query_rows), squeeze=False, sharey=True,
                                 figsize=(4.5 * len(query_rows), 3.8 * len(headdims)))
        for d_index, headdim in enumerate(headdims):
            for q_index, seqlen_q in enumerate(query_rows):
                ax = axes[d_index][q_index]
                panel = sorted((r for r in group if r["headdim"] == headdim
                                and r["seqlen_q"] == seqlen_q), key=lambda r: r["seqlen_k"])
                for color, name in enumerate(implementations):
                    points = [(r["seqlen_k"], r["results"][name]["kv_gbps"]) for r in panel
                              if r["results"].get(name, {}).get("status") == "ok"]
                    if points:
                        ax.plot(*zip(*points), marker="o", label=name, color=f"C{color % 10}",
                                **({"linewidth": 2.5} if name == CUFLASH else {}))
                _log2_axis(ax, [r["seqlen_k"] for r in panel], "KV length Lk")
                ax.set_title(f"D={headdim}, Lq={seqlen_q}")
                ax.set_ylabel("GB/s of K+V read")
                ax.set_ylim(bottom=0)
        causal_text = "causal" if causal else "non-causal"
        path = out_dir / f"{stem}_{mode.replace('+', '-')}_{dtype}_{causal_text}.png"
        written.append(_finish(fig, list(axes.flat), implementations,
                               _title(record, f"decode {mode} {dtype} {causal_text}"), path, plt))
    return written


def plot_memory(record: dict, stem: str, out_dir: Path) -> list[Path]:
    """Peak GiB per call against L, a panel per mode; the inputs' size dashed."""
    plt = _pyplot()
    if plt is None:
        return []
    rows, implementations = record["rows"], record["implementations"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), squeeze=False, figsize=(6 * len(modes), 4.5))
    for ax, mode in zip(axes[0], modes):
        panel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["seqlen_q"])
        for color, name in enumerate(implementations):
            points = [(r["seqlen_q"], r["results"][name]["peak_bytes"] / 2**30) for r in panel
                      if r["results"].get(name, {}).get("status") == "ok"]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=f"C{color % 10}",
                        **({"linewidth": 2.5} if name == CUFLASH else {}))
        ax.plot([r["seqlen_q"] for r in panel], [r["input_bytes"] / 2**30 for r in panel],
                linestyle="--", color="gray", label="inputs")
        _log2_axis(ax, [r["seqlen_q"] for r in panel], "sequence length (B=1)")
        ax.set_yscale("log")
        ax.set_ylabel("peak GiB added by one call")
        ax.set_title(f"{mode}, {panel[0]['dtype']}, D={panel[0]['headdim']}, "
                     f"H={panel[0]['heads']}" if panel else mode)
    path = out_dir / f"{stem}.png"  # the stem already ends in _memory
    return [_finish(fig, list(axes.flat), implementations, _title(record, "memory per call"),
                    path, plt)]


def plot_record(json_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The plots of one recorded JSON of any sweep (latency has a table only)."""
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir is not None else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    record = json.loads(json_path.read_text())
    sweep = sweep_of(record)
    if sweep == "training":
        return plot(json_path, out_dir)
    if sweep == "decode":
        return plot_decode(record, json_path.stem, out_dir)
    if sweep == "memory":
        return plot_memory(record, json_path.stem, out_dir)
    return []


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def markdown_table(headers: list[str], lines: list[list[str]], left: int = 1) -> str:
    """A GitHub table; the first `left` columns left-aligned, the others right-aligned."""
    rule = [":---" if c < left else "---:" for c in range(len(headers))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, rule, *lines])


def _cudnn_text(version: int | None) -> str:
    if not version:
        return "none"
    return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"


def environment_line(record: dict) -> str:
    date = str(record.get("date_utc", "?"))[:10]
    commit = str(record.get("git_commit", "unknown"))
    commit = commit[:12] if commit != "unknown" else "unknown"
    return (f"**{record.get('device', '?')}** (sm {record.get('compute_capability', '?')}), "
            f"{date} UTC; driver {record.get('driver_version', '?')}, "
            f"CUDA runtime {record.get('cuda_runtime', '?')}, CuPy {record.get('cupy', '?')}, "
            f"torch {record.get('torch') or 'none'} (cuDNN {_cudnn_text(record.get('cudnn'))}), "
            f"cuflash {record.get('cuflash', '?')} at commit `{commit}`"
            + (" (interrupted run)" if record.get("interrupted") else "") + ".")


def _number_cell(result: dict | None, metric: str, digits: int) -> str:
    if result is None:
        return ""
    if result["status"] != "ok":
        return STATUS_CELL.get(result["status"], result["status"])
    return f"{result[metric]:.{digits}f}" + ("" if result.get("correct", True) else " !")


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _reason_lines(rows: list[dict]) -> list[str]:
    lines = [f"- `{name}` {STATUS_CELL.get(status, status)} ({count} points): {note}"
             for (name, status, note), count in failure_reasons(rows).items()]
    compile_range = compile_time_range(rows)
    if compile_range:
        lines.append(f"- `flex`: torch.compile took {compile_range[0]:.1f}-{compile_range[1]:.1f} s"
                     " per shape, outside the timings.")
    return lines


def _images(paths: list[Path], relative_to: Path) -> list[str]:
    return [f"![{path.stem}]({Path(_relative(path, relative_to)).as_posix()})" for path in paths]


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def throughput_full_table(record: dict, decode: bool) -> str:
    implementations, metric = record["implementations"], "kv_gbps" if decode else "tflops"
    headers = ["mode", "dtype", "D", "causal", *(["Lq", "Lk"] if decode else ["L"]), "B", "H",
               *implementations, *(["cuflash TFLOP/s"] if decode else []),
               "vs best", "best peer", "vs flash"]
    lines = []
    for row in record["rows"]:
        results = row["results"]
        lines.append([row["mode"], row["dtype"], str(row["headdim"]),
                      "yes" if row["causal"] else "no",
                      *([seqlen_text(row["seqlen_q"]), seqlen_text(row["seqlen_k"])] if decode
                        else [seqlen_text(row["seqlen_q"])]),
                      str(row["batch"]), str(row["heads"]),
                      *(_number_cell(results.get(n), metric, 0 if decode else 1)
                        for n in implementations),
                      *([_number_cell(results.get(CUFLASH), "tflops", 1)] if decode else []),
                      _ratio(row["cuflash_vs_best_peer"]), row["best_peer"] or "-",
                      _ratio(row["cuflash_vs_flash"])])
    return markdown_table(headers, lines, left=2)


def training_compact_table(record: dict) -> str:
    """One line per (mode, dtype, D, causal), one column per L: cuflash TFLOP/s and its ratios
    to sdpa_flash and to the fastest correct peer."""
    rows = record["rows"]
    seqlens = sorted({r["seqlen_q"] for r in rows})
    keys = list(dict.fromkeys((r["mode"], r["dtype"], r["headdim"], r["causal"]) for r in rows))
    lines = []
    for mode, dtype, headdim, causal in keys:
        cells = []
        for seqlen in seqlens:
            row = next((r for r in rows if (r["mode"], r["dtype"], r["headdim"], r["causal"],
                                            r["seqlen_q"]) == (mode, dtype, headdim, causal,
                                                               seqlen)), None)
            ours = row["results"].get(CUFLASH) if row else None
            if ours is None:
                cells.append("")
            elif ours["status"] != "ok":
                cells.append(STATUS_CELL.get(ours["status"], ours["status"]))
            else:
                ratios = f"{_ratio(row['cuflash_vs_flash'])}, {_ratio(row['cuflash_vs_best_peer'])}"
                cells.append(f"{ours['tflops']:.0f}" + ("" if ours.get("correct", True) else " !")
                             + f" ({ratios})")
        lines.append([mode, dtype, str(headdim), "yes" if causal else "no", *cells])
    return markdown_table(["mode", "dtype", "D", "causal", *(f"L={seqlen_text(s)}" for s in seqlens)],
                          lines, left=2)


def section_training(record: dict, images: list[str], condensed: bool) -> list[str]:
    out = [f"Batch x L = {record['rows'][0]['batch'] * record['rows'][0]['seqlen_q']}"
           " tokens, hidden 2048, Lq = Lk = L. TFLOP/s = 4·B·H·L²·D (x0.5 causal, x2.5 bwd, "
           "x3.5 fwd+bwd) / median time; every output checked against an fp64 reference."]
    if condensed:
        best = sorted({r["best_peer"] for r in record["rows"] if r["best_peer"]})
        out += ["", "cuflash TFLOP/s; in parentheses its speed relative to "
                    f"`{FLASH_PEER}` (torch SDPA's FlashAttention-2), then to the fastest peer "
                    f"that passed the check ({', '.join(f'`{b}`' for b in best) or 'none'}), "
                    "on the same inputs:", "",
                training_compact_table(record)]
    else:
        out += ["", "TFLOP/s per implementation; `vs best` / `vs flash`: cuflash over the fastest "
                    f"correct peer / over `{FLASH_PEER}`; `!` = outside the loose error bound.", "",
                throughput_full_table(record, decode=False), "", *_reason_lines(record["rows"])]
    return out + ["", *images]


def section_decode(record: dict, images: list[str], condensed: bool) -> list[str]:
    out = ["Lq query rows against an Lk-long KV cache, hidden 2048, batch = "
           f"{record['args'].get('decode_kv_tokens', '?')} // Lk. GB/s = bytes of K+V "
           "(2·B·H·Lk·D·itemsize) / median time: decode is bound by reading the cache.", "",
           throughput_full_table(record, decode=True)]
    if not condensed:
        out += ["", *_reason_lines(record["rows"])]
    return out + ["", *images]


def section_memory(record: dict, images: list[str], condensed: bool) -> list[str]:
    rows, implementations = record["rows"], record["implementations"]
    summary = summarize_memory(rows, implementations)
    out = ["Memory: L doubles from 1k at batch 1 until out of memory or the cap "
           f"({seqlen_text(record['args'].get('memory_cap') or 0)}). Longest L each ran, and the "
           "GiB one call adds on top of its inputs there:", ""]
    lines = []
    for mode, per_name in summary.items():
        for name, entry in per_name.items():
            largest = entry["largest_seqlen"]
            lines.append([mode, name, seqlen_text(largest) if largest else "none",
                          f"{entry['peak_bytes'] / 2**30:.3f}" if entry["peak_bytes"] is not None
                          else "-", entry["stopped"] or "-"])
    out.append(markdown_table(["mode", "implementation", "longest L", "peak GiB there",
                               "stopped by"], lines, left=2))
    if not condensed:
        headers = ["mode", "L", "inputs GiB", *implementations]
        table = [[r["mode"], seqlen_text(r["seqlen_q"]), f"{r['input_bytes'] / 2**30:.3f}",
                  *(peak_cell(r["results"].get(n)) for n in implementations)] for r in rows]
        out += ["", "Peak GiB per call at every L (empty: dropped out at a shorter L):", "",
                markdown_table(headers, table, left=1)]
    return out + ["", *images]


def section_latency(record: dict, images: list[str], condensed: bool) -> list[str]:
    # The columns some row measured (records older than a column lack it).
    columns = [c for c in latency_columns() if any(c[2] in r[c[1]] for r in record["rows"])]

    def cell(result: dict, key: str) -> str:
        if result.get("status") != "ok":
            return STATUS_CELL.get(result.get("status"), "?")
        value = result.get(key)
        if value is None:
            return "-"
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"

    lines = [[r["dtype"], str(r["headdim"]), "yes" if r["causal"] else "no",
              seqlen_text(r["seqlen"]), *(cell(r[process], key) for _, process, key in columns)]
             for r in record["rows"]]
    return ["First-call latency of cuflash in a new process (B=1, H=2048/D): `cold` = empty "
            "kernel cache, so the call compiles its kernels with NVRTC; `cached` = a second new "
            "process on the filled cache; `warm` = a second call in that process.", "",
            markdown_table(["dtype", "D", "causal", "L", *(c[0] for c in columns)], lines, left=1),
            "", *images]


SECTIONS = {"training": section_training, "decode": section_decode,
            "memory": section_memory, "latency": section_latency}
HEADINGS = {"training": "Training shapes", "decode": "Decode", "memory": "Memory",
            "latency": "First-call latency"}


def record_markdown(record: dict, json_path: Path, pngs: list[Path], relative_to: Path,
                    condensed: bool, heading: str) -> str:
    sweep = sweep_of(record)
    link = Path(_relative(json_path, relative_to)).as_posix()
    images = _images(pngs, relative_to)
    if condensed and sweep == "training":  # the README shows bf16; the others are one click away
        shown = [i for i in images if "_bf16" in i] or images
        others = [p for p in pngs if f"![{p.stem}]" not in "".join(shown)]
        images = shown + (["", ("Other plots: " + ", ".join(
            f"[{p.stem.split('_', 2)[-1]}]({Path(_relative(p, relative_to)).as_posix()})"
            for p in others))] if others else [])
    body = SECTIONS[sweep](record, images, condensed)
    title = HEADINGS[sweep]
    if sweep == "training":  # several training records side by side: say which sweep each is
        rows = record["rows"]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
        dims = list(dict.fromkeys(str(r["headdim"]) for r in rows))
        title += f": {', '.join(modes)} · {', '.join(dtypes)} · D {', '.join(dims)}"
    return "\n".join([f"{heading} {title}", "", environment_line(record)
                      + f" Data: [{json_path.name}]({link}).", "", *body]).rstrip() + "\n"


def update_readme(section: str, readme: Path = README) -> None:
    """Replace the text between the markers; add the section before README_ANCHOR if missing."""
    text = readme.read_text()
    block = f"{START_MARKER}\n{section.rstrip()}\n{END_MARKER}"
    if START_MARKER in text and END_MARKER in text:
        text = re.sub(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER),
                      lambda _: block, text, count=1, flags=re.S)
    else:
        new_section = f"## Benchmarks\n\n{block}\n\n"
        if README_ANCHOR in text:
            text = text.replace(README_ANCHOR, new_section + README_ANCHOR, 1)
        else:
            text = text.rstrip() + "\n\n" + new_section
    readme.write_text(text)


def write_report(json_paths: list[Path], out_dir: Path | None = None,
                 readme: Path = README) -> int:
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = out_dir / "latest.md"
    command = "python benchmarks/bench.py --report " + " ".join(
        Path(_relative(p, REPO_ROOT)).as_posix() for p in json_paths)
    full_parts = ["# Latest benchmark results", "",
                  f"Generated from the recorded JSON by `{command}`; method in "
                  f"[benchmarks/README.md]({Path(_relative(REPO_ROOT / 'benchmarks' / 'README.md', out_dir)).as_posix()}).",
                  ""]
    readme_parts = [f"Latest recorded results, regenerated by `{command}` "
                    f"(full tables: [{Path(_relative(latest, readme.parent)).as_posix()}]"
                    f"({Path(_relative(latest, readme.parent)).as_posix()}); method and options: "
                    "[benchmarks/README.md](benchmarks/README.md)).", ""]
    for json_path in map(Path, json_paths):
        record = json.loads(json_path.read_text())
        pngs = plot_record(json_path, out_dir)
        full_parts.append(record_markdown(record, json_path, pngs, out_dir, False, "##"))
        readme_parts.append(record_markdown(record, json_path, pngs, readme.parent, True, "###"))
        for png in pngs:
            print(f"plot: {png}")
    latest.write_text("\n".join(full_parts).rstrip() + "\n")
    print(f"report: {latest}")
    update_readme("\n".join(readme_parts), readme)
    print(f"README section: {readme}")
    return 0
