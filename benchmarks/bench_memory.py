"""Memory sweep: the longest sequence each implementation runs, and its peak memory per call.

For each mode (fwd, bwd by default), L doubles from 1k with batch 1, ``--memory-heads`` heads,
``--headdim`` D and ``--dtype`` (16, 128, bf16 by default) up to ``--memory-cap`` (256k). At
every L each implementation still in the race runs once to warm up (compiles, sets up
workspaces), then once more with its memory measured; an implementation leaves the race at its
first failure (out of memory, unsupported, error), so the last L it passed is the longest it
runs. The sweep ends when none is left or the inputs themselves no longer fit.

Peak bytes = what the measured call adds on top of its inputs (and, for ``bwd``, on top of the
saved forward: out and lse, or torch's graph). Both allocators are read and added up:

* CuPy's default memory pool (cuflash, naive_cupy): ``total_bytes()`` after the call minus
  before it. The pool is emptied (``free_all_blocks``) just before the call and keeps every block
  it took from the device until emptied again, so the growth is the call's high-water mark as
  the device saw it;
* torch's caching allocator (SDPA, FlexAttention): ``max_memory_allocated()`` after the call
  minus ``memory_allocated()`` before it, with the peak statistics reset just before.

Both pools are emptied between implementations and points, so each measurement starts from
the inputs alone. Called from ``bench.py --memory``.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings

from benchmarks.harness import (
    CUFLASH,
    PREPARERS,
    Case,
    Config,
    Libraries,
    classify_failure,
    make_inputs,
    release_memory,
)
from benchmarks.tables import STATUS_CELL

FIRST_SEQLEN = 1024


def memory_configs(args: argparse.Namespace, mode: str) -> list[Config]:
    """Batch 1, L = 1k, 2k, 4k, ... up to the cap, for one mode and the first dtype, D, causal."""
    dtype, headdim, causal = args.dtype[0], args.headdim[0], args.causal[0]
    count = int(math.log2(max(args.memory_cap, FIRST_SEQLEN) // FIRST_SEQLEN)) + 1
    return [Config(mode, dtype, headdim, causal, FIRST_SEQLEN << i, FIRST_SEQLEN << i,
                   batch=1, heads=args.memory_heads) for i in range(count)]


def _synchronize(libs: Libraries) -> None:
    libs.cupy.cuda.get_current_stream().synchronize()
    if libs.torch is not None:
        libs.torch.cuda.synchronize()


def measure_peak(name: str, case: Case) -> dict:
    """One warm-up call, then one call between memory readings (and CUDA events)."""
    libs = case.libs
    cupy, torch = libs.cupy, libs.torch
    pool = cupy.get_default_memory_pool()
    warned: list = []
    run = outputs = None
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            run = PREPARERS[name](case)  # backward modes save their forward here
            outputs = run(0)
            outputs = None
            _synchronize(libs)
            release_memory(libs)  # what the warm-up cached goes back to the device
            cupy_before = pool.total_bytes()
            torch_before = 0
            if torch is not None:
                torch.cuda.reset_peak_memory_stats()
                torch_before = torch.cuda.memory_allocated()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            outputs = run(0)
            end.record()
            end.synchronize()
            _synchronize(libs)
            peak = pool.total_bytes() - cupy_before
            if torch is not None:
                peak += torch.cuda.max_memory_allocated() - torch_before
    except Exception as exc:
        status, note = classify_failure(exc, libs, warned)
        return {"status": status, "note": note}
    finally:
        run = outputs = None
        release_memory(libs)
    return {"status": "ok", "peak_bytes": int(peak), "ms": cupy.cuda.get_elapsed_time(start, end)}


def input_bytes(config: Config) -> int:
    """q, k, v (and dout in the backward modes) of one point."""
    tensors = 4 if config.has_backward else 3
    return tensors * config.batch * config.heads * config.seqlen_q * config.headdim * config.itemsize


def run_memory_sweep(args: argparse.Namespace, libs: Libraries) -> tuple[list, bool, str, dict]:
    """Rows (one per mode and L), interrupted, the table, extra record fields."""
    implementations = [CUFLASH, *args.peers]
    rows: list[dict] = []
    try:
        for mode in args.mode:
            racing = list(implementations)
            for config in memory_configs(args, mode):
                if not racing:
                    break
                print(f"[memory] {config.label}: {', '.join(racing)}", file=sys.stderr, flush=True)
                row = {**config.as_dict(), "input_bytes": input_bytes(config), "results": {}}
                try:
                    copies = make_inputs(config, libs, n_copies=1)
                except Exception as exc:  # the inputs alone no longer fit: everyone stops here
                    status, note = classify_failure(exc, libs, [])
                    row["results"] = {name: {"status": status, "note": f"inputs: {note}"}
                                      for name in racing}
                    rows.append(row)
                    release_memory(libs)
                    break
                # Materializing implementations are not capped here: their out-of-memory is
                # what this sweep is after.
                case = Case(config, copies, libs, max_scores_bytes=math.inf)
                for name in racing:
                    row["results"][name] = measure_peak(name, case)
                del case, copies
                release_memory(libs)
                racing = [name for name in racing if row["results"][name]["status"] == "ok"]
                rows.append(row)
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the points measured so far", file=sys.stderr)
        return rows, True, format_memory_table(rows, implementations), \
            {"implementations": implementations}
    return rows, False, format_memory_table(rows, implementations), \
        {"implementations": implementations,
         "memory_summary": summarize_memory(rows, implementations)}


def seqlen_text(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def summarize_memory(rows: list[dict], implementations: list[str]) -> dict:
    """mode -> implementation -> {largest_seqlen, peak_bytes there, stopped: why it stopped}."""
    summary: dict[str, dict] = {}
    for mode in dict.fromkeys(row["mode"] for row in rows):
        summary[mode] = {}
        for name in implementations:
            largest, peak, stopped = None, None, None
            for row in (r for r in rows if r["mode"] == mode):
                result = row["results"].get(name)
                if result is None:
                    continue
                if result["status"] == "ok":
                    largest, peak = row["seqlen_q"], result["peak_bytes"]
                else:
                    stopped = (f"{result['status']} at {seqlen_text(row['seqlen_q'])}: "
                               f"{result.get('note', '')}")
            if stopped is None and largest is not None:
                stopped = "ran every L tried"
            summary[mode][name] = {"largest_seqlen": largest, "peak_bytes": peak,
                                   "stopped": stopped}
    return summary


def peak_cell(result: dict | None) -> str:
    if result is None:
        return ""
    if result["status"] != "ok":
        return STATUS_CELL.get(result["status"], result["status"])
    return f"{result['peak_bytes'] / 2**30:.3f}"


def format_memory_table(rows: list[dict], implementations: list[str]) -> str:
    """Peak GiB per implementation and L, then the longest L each one ran."""
    if not rows:
        return "no points measured"
    headers = ["mode", "dtype", "D", "causal", "L", "B", "H", "inputs", *implementations]
    lines = [[row["mode"], row["dtype"], str(row["headdim"]), "yes" if row["causal"] else "no",
              seqlen_text(row["seqlen_q"]), str(row["batch"]), str(row["heads"]),
              f"{row['input_bytes'] / 2**30:.3f}",
              *(peak_cell(row["results"].get(name)) for name in implementations)]
             for row in rows]
    widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(headers)]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    out = [render(headers), render(["-" * w for w in widths]), *(render(l) for l in lines), "",
           "GiB a call adds on top of its inputs (bwd: and of the saved forward); inputs = q, k, v "
           "(+ dout) in GiB; empty cell = dropped out at a shorter L."]
    for mode, per_name in summarize_memory(rows, implementations).items():
        out.append(f"longest L, {mode}:")
        for name, entry in per_name.items():
            largest = seqlen_text(entry["largest_seqlen"]) if entry["largest_seqlen"] else "none"
            out.append(f"  {name}: {largest} ({entry['stopped']})")
    return "\n".join(out)
