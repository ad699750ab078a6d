"""What the score modifiers cost (softcap, ALiBi, sinks; and attention dropout), against the plain call and FlexAttention.

Each modifier (and all three together) is timed beside the plain call on the same inputs, forward
and backward separately: the ratio modified / plain is the modifier's cost (issue 14's goal: at
most 1.10 for each, bf16 d128 at 4k and 16k tokens). The modified calls run the kScoreMods
Variants (cuda_src/score_mod.cuh), the plain ones the folded-scale kernels.

The peer, in the same process on the same memory (torch.from_dlpack of cuflash's inputs and
ALiBi slopes): FlexAttention (torch.nn.attention.flex_attention under torch.compile, through
harness.prepare_flex: compiled once per point and modifier, its compile time recorded and kept
out of the timings), each modifier a score_mod on the scaled score s in cuflash's order: softcap
``cap * tanh(s / cap)``, then ALiBi ``s - slope[h] * |i + Lk - Lq - j|`` (the mask's bottom-right
diagonal); causal is its bottom-right block mask. Sinks have no FlexAttention form, so the sinks
and all rows have no flex numbers ("-"). Flex's forward runs under no_grad (cuflash's returns lse
too: one float a row beside out's D values), its backward alone through autograd.grad on a graph
saved once (as cuflash's attention_backward runs from a saved out and lse). Each flex setup is
checked once against cuflash's outputs (out; dq, dk, dv) on the first and last head: max |flex -
cuflash| / max |cuflash| within harness.py's tolerances (bf16: 2e-2 forward, 5e-2 backward); a
miss is printed as MISMATCH, recorded (flex_correct false, the record's flex_mismatches) and
makes the exit status 1. Without torch's CUDA build, triton or FlexAttention (or with --no-flex)
the flex columns are "-" and cuflash runs alone.

    python benchmarks/bench_mods.py [--dtype bf16,fp16] [--headdim 128] [--seqlen 4096,16384] [--mods alibi] [--no-flex]

The dropout row's peers are torch SDPA's backends that drop (FLASH and EFFICIENT, under
sdpa_kernel, on the same memory and rate; each its own mask, so only the times compare): a third
table gives their times and their ratio to cuflash's.

Times per call: the device's (--repeats calls back to back between CUDA events, the host's path
overlapped: what the modifier costs on the GPU) and a lone call's (median of --repeats, each
from an idle device between CUDA events: the host path included), flex's as cuflash's. Writes
benchmarks/results/<UTC>_<gpu>_mods.json (per row cuflash's times and ratios, flex_<time> and
flex_<time>_vs_cuflash / flex_<time>_vs_plain, flex_status, flex_note, flex's compile seconds
and checks) and prints two Markdown tables: the modifiers' cost, then flex beside cuflash.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness, tables  # noqa: E402  (import neither torch nor CuPy)
from benchmarks import record as records  # noqa: E402
from benchmarks.tables import cell  # noqa: E402

# What each timed direction of cuflash returns first, and so what flex's is checked against:
# the forward's (out, lse), the backward's (dq, dk, dv).
CHECKED_OUTPUTS = {"fwd": ("out",), "bwd": ("dq", "dk", "dv")}


def modifiers(cupy, heads: int) -> dict:
    """The timed configurations: none, each modifier alone, all three (Gemma-2's cap of 50, ALiBi's
    geometric slopes, gpt-oss-like sinks); and attention dropout at BERT's rate, 0.1 (the
    kScoreMods Variants with the keep mask drawn in the kernels: cuda_src/dropout.cuh)."""
    slopes = cupy.asarray([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=cupy.float32)
    sinks = cupy.linspace(-1, 1, heads, dtype=cupy.float32)
    return {"plain": {}, "softcap": {"softcap": 50.0}, "alibi": {"alibi_slopes": slopes},
            "sinks": {"sinks": sinks}, "all": {"softcap": 50.0, "alibi_slopes": slopes, "sinks": sinks},
            "dropout": {"dropout_p": 0.1, "dropout_seed": 20261205}}


def flex_score_mod(torch, mods: dict, diagonal: int):
    """modifiers()' keyword arguments as FlexAttention's score_mod, on the scaled score in cuflash's
    order (softcap, then ALiBi from the diagonal i + Lk - Lq = j), or None for the plain call (and
    without torch, where prepare_flex says why flex cannot run)."""
    if "sinks" in mods:
        # A score_mod can only rewrite the scores of real keys, and a block mask only hide them: a
        # sink is one more logit in each row's denominator with no key and no value. Rescaling
        # flex's out by sigmoid(lse - sink) afterwards would be exact but would time torch's
        # elementwise kernels (and a backward through lse) beside flex, not flex.
        raise harness.NotRun("unsupported", "FlexAttention has no sinks (a score_mod cannot add a "
                                            "logit without a key and a value)")
    if "dropout_p" in mods:
        raise harness.NotRun("unsupported", "FlexAttention has no dropout (a score_mod sees scores, not probabilities)")
    cap, slopes = mods.get("softcap"), mods.get("alibi_slopes")
    if torch is None or (cap is None and slopes is None):
        return None
    if slopes is not None:
        slopes = torch.from_dlpack(slopes)  # cuflash's slopes, no copy

    def score_mod(score, batch, head, q_index, kv_index):
        if cap is not None:  # a constant of the trace: no branch in the kernel
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[head] * torch.abs(q_index + diagonal - kv_index)
        return score

    return score_mod


def time_calls(cupy, calls: dict, repeats: int) -> dict:
    """{kind}_ms and {kind}_lone_ms for each call: device (calls back to back, the host's path
    overlapped: the modifier's cost on the GPU) and lone (one call from an idle device, host path
    included)."""
    return {f"{kind}_{how}": timer(cupy, call, repeats) for kind, call in calls.items()
            for how, timer in (("ms", records.streamed_ms), ("lone_ms", records.timed_ms))}


def ratios(top: dict, bottom: dict | None, suffix: str) -> dict:
    """top's times over bottom's, for the times both have (none without a bottom)."""
    return {f"{key}{suffix}": top[key] / bottom[key] for key in top if bottom and key in bottom}


def bench_flex(libs: harness.Libraries, config: harness.Config, inputs: harness.InputCopy, mods: dict,
               cuflash_calls: dict, repeats: int) -> tuple[dict, dict]:
    """FlexAttention with mods as its score_mod, on cuflash's inputs, forward then backward: (its
    times, keyed as time_calls'; the rest of its record: status, note, compile seconds, the check
    of each direction against cuflash's outputs, correct). Never raises: a direction that fails
    ends the measurement with its status and note, what ran before it kept."""
    times, info = {}, {"status": "ok"}
    for kind, names in CHECKED_OUTPUTS.items():
        case = harness.Case(dataclasses.replace(config, mode=kind), [inputs], libs, max_scores_bytes=0.0)
        run = None
        try:
            run = harness.prepare_flex(case, flex_score_mod(libs.torch, mods, config.seqlen_k - config.seqlen_q))
            produced = dict(zip(names, cuflash_calls[kind]()))
            reference = {name: [value[b, h].astype(libs.cupy.float64) for b, h in harness.checked_heads(config)]
                         for name, value in produced.items()}
            info[f"{kind}_check"] = harness.compare_to_reference(case, run(0), reference)
            info[f"{kind}_compile_s"] = run.compile_s
            times.update(time_calls(libs.cupy, {kind: lambda: run(0)}, repeats))
        except Exception as exc:  # no torch or flex, sinks, not compiling, out of memory: recorded
            info["status"], info["note"] = harness.classify_failure(exc, libs, [])
            break
        finally:
            run = produced = None  # flex's saved graph and cuflash's outputs go before the next call
            harness.release_memory(libs)
    checks = [info[f"{kind}_check"]["correct"] for kind in CHECKED_OUTPUTS if f"{kind}_check" in info]
    info["correct"] = all(checks) if checks else None
    return times, info


# torch SDPA's backends that drop (FlashAttention-2 and the memory-efficient kernels), dropout's peers.
SDPA_DROPOUT_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


def bench_sdpa_dropout(libs: harness.Libraries, inputs: harness.InputCopy, causal: bool, rate: float,
                       repeats: int) -> dict:
    """torch SDPA with ``dropout_p=rate`` on cuflash's inputs (the same memory), per backend of
    SDPA_DROPOUT_BACKENDS: ``{backend}_fwd_ms`` (no_grad) and ``{backend}_bwd_ms`` (autograd.grad on
    a graph saved once, as cuflash's backward runs from a saved out and lse), device time per call
    as time_calls' ``_ms``; a backend that refuses the call records ``{backend}_note``. Its own
    mask, not cuflash's: the same statistics, so only the times compare."""
    torch, cupy = libs.torch, libs.cupy
    if torch is None:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    functional = torch.nn.functional
    result = {}
    for name, backend in SDPA_DROPOUT_BACKENDS.items():
        leaves = [x.detach().requires_grad_() for x in (inputs.tq, inputs.tk, inputs.tv)]
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                def forward():
                    with torch.no_grad():
                        return functional.scaled_dot_product_attention(*leaves, dropout_p=rate, is_causal=causal)

                result[f"{name}_fwd_ms"] = records.streamed_ms(cupy, forward, repeats)
                out = functional.scaled_dot_product_attention(*leaves, dropout_p=rate, is_causal=causal)
                result[f"{name}_bwd_ms"] = records.streamed_ms(
                    cupy, lambda: torch.autograd.grad(out, leaves, inputs.tdout, retain_graph=True), repeats)
        except RuntimeError as exc:  # no kernel of this backend for the call
            result[f"{name}_note"] = str(exc).splitlines()[0][:120]
        out = leaves = None
        harness.release_memory(libs)
    return result


def flex_errors(row: dict) -> str:
    """Flex's error relative to cuflash's outputs, forward / backward ("-": not checked)."""
    def error(check: dict | None) -> str:
        return "-" if check is None else "non-finite" if check["rel_err"] is None else f"{check['rel_err']:.1e}"

    return " / ".join(error(row.get(f"flex_{kind}_check")) for kind in CHECKED_OUTPUTS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--headdim", default="128")
    parser.add_argument("--seqlen", default="4096,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="batch x seqlen")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--causal", default="false,true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mods", default="softcap,alibi,sinks,all,dropout",
                        help="the modifiers timed (modifiers()' labels), each beside the plain call")
    parser.add_argument("--no-flex", action="store_true",
                        help="time cuflash alone (FlexAttention compiles each point and modifier: minutes)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    libs = harness.load_libraries()  # SystemExit without a GPU; torch None without its CUDA build
    if libs.cuflash is None:
        raise SystemExit(f"bench_mods: {libs.cuflash_note}")
    cupy, cuflash, torch = libs.cupy, libs.cuflash, libs.torch
    import numpy  # knows bfloat16: load_libraries imported ml_dtypes

    timed = set(args.mods.split(","))
    unknown = timed - set(modifiers(cupy, 1))
    if unknown:
        raise SystemExit(f"bench_mods: no modifiers {sorted(unknown)}: --mods takes {list(modifiers(cupy, 1))[1:]}")
    rows = []
    points = itertools.product(args.dtype.split(","), map(int, args.headdim.split(",")),
                               map(int, args.seqlen.split(",")),
                               (c.strip().lower() == "true" for c in args.causal.split(",")))
    with harness.shared_stream(libs):  # torch's stream: flex's kernels and the CUDA events in order
        for name, d, L, causal in points:
            dtype = numpy.dtype(records.NUMPY_DTYPES[name])
            b, h = max(1, args.tokens // L), args.heads
            flops = 4 * b * h * L * L * d * (0.5 if causal else 1.0)
            rng = numpy.random.default_rng(0)
            q, k, v, dout = (cupy.asarray(rng.standard_normal((b, h, L, d), dtype=numpy.float32).astype(dtype))
                             for _ in range(4))
            views = [torch.from_dlpack(x) for x in (q, k, v, dout)] if torch is not None else []
            inputs = harness.InputCopy(q, k, v, dout, *views)
            config = harness.Config(mode="fwd", dtype=name, headdim=d, causal=causal, seqlen_q=L, seqlen_k=L,
                                    batch=b, heads=h)
            base = flex_base = None
            for label, mods in modifiers(cupy, h).items():
                if label != "plain" and label not in timed:
                    continue
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **mods)
                calls = {"fwd": lambda: cuflash.attention(q, k, v, causal=causal, return_lse=True, **mods),
                         "bwd": lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                                   **mods)}
                times = time_calls(cupy, calls, args.repeats)
                base = base or times
                if args.no_flex:
                    flex_times, flex = {}, {"status": "skipped", "note": "--no-flex", "correct": None}
                else:  # a line first: flex's compiles take the time, and a cut-off run shows where it was
                    print(f"[mods] {name} D={d} L={L} causal={causal} {label}: flex", file=sys.stderr, flush=True)
                    flex_times, flex = bench_flex(libs, config, inputs, mods, calls, args.repeats)
                flex_base = flex_times if flex_base is None else flex_base  # the plain call's, run or not
                peers = (bench_sdpa_dropout(libs, inputs, causal, mods["dropout_p"], args.repeats)
                         if "dropout_p" in mods else {})
                row = {"dtype": name, "D": d, "L": L, "B": b, "H": h, "causal": causal, "mods": label,
                       **times, "fwd_tflops": flops / times["fwd_ms"] / 1e9,
                       "bwd_tflops": 2.5 * flops / times["bwd_ms"] / 1e9, **ratios(times, base, "_vs_plain"),
                       **{f"flex_{key}": value for part in (flex, flex_times, ratios(flex_times, times, "_vs_cuflash"),
                                                            ratios(flex_times, flex_base, "_vs_plain"))
                          for key, value in part.items()}, **peers,
                       **{f"{key}_vs_cuflash": value / times[key.replace(f"{name}_", "", 1).replace("_ms", "") + "_ms"]
                          for name in SDPA_DROPOUT_BACKENDS for key, value in peers.items()
                          if key.startswith(name) and key.endswith("_ms")}}
                rows.append(row)
                print(json.dumps(records.json_safe(row)), file=sys.stderr, flush=True)
            out = lse = inputs = views = None
            harness.release_memory(libs)

    mismatches = [f"{r['dtype']} D={r['D']} L={r['L']} causal={r['causal']} {r['mods']}: flex vs cuflash rel err "
                  f"fwd / bwd {flex_errors(r)}" for r in rows if r["flex_correct"] is False]
    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    record = {"sweep": "mods", "device": gpu, "cuflash": cuflash.__version__, "cupy": cupy.__version__,
              "torch": torch.__version__ if torch is not None else None, "torch_note": libs.torch_note or None,
              **records.source_commit(), "date_utc": records.now_utc(), "config": vars(args), "rows": rows,
              "flex_mismatches": mismatches}
    path = records.write(record, records.record_path(args.out, record["date_utc"], gpu, "mods"))
    print("| dtype | D | L | causal | modifiers | fwd TF/s | fwd time vs plain | bwd TF/s | bwd time vs plain "
          "| lone call vs plain, fwd / bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['D']} | {r['L']} | {'yes' if r['causal'] else 'no'} | {r['mods']} "
              f"| {r['fwd_tflops']:.0f} | {r['fwd_ms_vs_plain']:.3f} | {r['bwd_tflops']:.0f} | {r['bwd_ms_vs_plain']:.3f} "
              f"| {r['fwd_lone_ms_vs_plain']:.3f} / {r['bwd_lone_ms_vs_plain']:.3f} |")
    print("\nFlexAttention on the same inputs, device time per call (flex / cuflash > 1: cuflash is faster; "
          "vs plain: each one's modified call over its own plain call)\n")
    print("| dtype | D | L | causal | modifiers | fwd ms cuflash / flex | flex / cuflash fwd | bwd ms cuflash / flex "
          "| flex / cuflash bwd | vs plain fwd, cuflash / flex | vs plain bwd, cuflash / flex "
          "| flex vs cuflash rel err fwd / bwd | flex note |")
    print("| --- " * 13 + "|")
    for r in rows:
        note = "" if r["flex_status"] == "ok" else \
            f"{tables.STATUS_CELL.get(r['flex_status'], r['flex_status'])}: {r['flex_note'][:90]}"
        print(f"| {r['dtype']} | {r['D']} | {r['L']} | {'yes' if r['causal'] else 'no'} | {r['mods']} "
              + "".join(f"| {cell(r[f'{kind}_ms'])} / {cell(r.get(f'flex_{kind}_ms'))} "
                        f"| {cell(r.get(f'flex_{kind}_ms_vs_cuflash'), '.2f')} " for kind in CHECKED_OUTPUTS)
              + "".join(f"| {r[f'{kind}_ms_vs_plain']:.3f} / {cell(r.get(f'flex_{kind}_ms_vs_plain'))} "
                        for kind in CHECKED_OUTPUTS)
              + f"| {flex_errors(r)}{' MISMATCH' if r['flex_correct'] is False else ''} | {note} |")
    dropped = [r for r in rows if r["mods"] == "dropout"]
    if dropped:
        print("\nDropout against torch SDPA's backends that drop (the same inputs and rate; each its own mask), device "
              "time per call; peer / cuflash > 1: cuflash is faster\n")
        print("| dtype | D | L | causal | cuflash fwd / bwd ms | " + " | ".join(
            f"{name} fwd / bwd ms | {name} / cuflash fwd / bwd" for name in SDPA_DROPOUT_BACKENDS) + " |")
        print("| --- " * (5 + 2 * len(SDPA_DROPOUT_BACKENDS)) + "|")
        for r in dropped:
            cells = "".join(
                f"| {cell(r.get(f'{name}_fwd_ms'))} / {cell(r.get(f'{name}_bwd_ms'))} "
                f"| {cell(r.get(f'{name}_fwd_ms_vs_cuflash'), '.2f')} / {cell(r.get(f'{name}_bwd_ms_vs_cuflash'), '.2f')} "
                for name in SDPA_DROPOUT_BACKENDS)
            print(f"| {r['dtype']} | {r['D']} | {r['L']} | {'yes' if r['causal'] else 'no'} "
                  f"| {r['fwd_ms']:.3f} / {r['bwd_ms']:.3f} {cells}|")
    print(f"\nrecorded {path}")
    for mismatch in mismatches:
        print(f"MISMATCH {mismatch}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
