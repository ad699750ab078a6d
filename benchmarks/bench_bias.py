"""Additive bias and boolean masks (issue 15): cuflash against torch SDPA and FlexAttention.

Issue 15's performance goals, on the shapes scientific models use a bias or mask at. Per point,
every implementation runs on the same inputs in one process; the forward (no grad) and the
forward + backward (grads of q, k, v and of the bias) are timed, with the peak memory each adds:

1. ``triangle`` (AlphaFold triangle attention): q, k, v (1, N, 4, N, 32), pair bias (1, 1, 4, N, N)
   shared by the N rows, requiring grad; N 256, 384; bf16, fp32. Goal: cuflash >= 2x
   sdpa_efficient and >= 1x flex (time ratio peer / cuflash), fwd and fwd+bwd.
2. ``swin`` (windows): q (64 images, 64 windows, 4, 49, 32), bias (1, 4, 49, 49) requiring grad,
   mask (64, 1, 49, 49) broadcast over the images (per window a random row and column split the
   7 x 7 tokens into up to four regions, shifted-window style); bf16, fp32. Goals as 1.
3. ``padding``: B 8, H 16, L 4096, D 128, bf16, key-padding mask (B, 1, 1, L) hiding the last 25%
   of the keys, against the same queries on the 3072 real keys without a mask. Goal: padded /
   unpadded time <= 1.05.
4. ``keybias``: B 2, H 16, L 4096, D 128, bf16, a learnable per-key bias (B, 1, 1, L) in fp32
   requiring grad: few dbias entries, each a sum over heads x queries. cuflash against itself
   with the bias fixed (the gradient's cost), sdpa_efficient and flex, goals as 1.
5. ``headdim``: D 16, 24, 32, 48, bf16, no bias, B x L = 16k, L 512-4096, H 16. Goal: >= 1x the
   fastest correct of sdpa_flash / sdpa_efficient (a backend that refuses a D is recorded so).

``cuflash`` = cuflash.torch.attention(q, k, v, bias=, mask=) with autograd (``cuflash_det``:
deterministic=True). ``sdpa_*``: torch SDPA under sdpa_kernel([one backend]) on 4-D views, the
float attn_mask built from the bias on every call (1: q as (N, 4, N, 32), bias expanded to
(N, 4, N, N); 2: windows folded into heads, q as (64, 256, 49, 32), attn_mask = bias + the mask's
0/-inf as (1, 256, 49, 49)). ``flex``: FlexAttention under torch.compile, a score_mod adding the
captured bias (-inf where masked); what it cannot run is ``unsupported`` with torch's message.

Correctness, one call each: out, dq, dk, dv, dbias against a float64 autograd reference (whole
batch in 1-2, batch 0 heads 0-1 in 3-4), rel err = max |x - ref| / max |ref| within harness.py's
tolerances; out and dbias also against cuflash's (``vs_cuflash``). Time: record.timed_ms (CUDA
events, median of --repeats, each call alone, host path included) and record.streamed_ms (calls
back to back: the device's time when the host keeps ahead). Peak: torch.cuda.max_memory_allocated (cuflash.torch
allocates from torch's pool) plus CuPy's pool growth, as bench_memory.py.

    python -m benchmarks.bench_bias [--quick] [--sweeps triangle,swin,padding,keybias,headdim] [--dtype bf16,fp32] [--out DIR]

Writes <out>/<UTC>_<gpu>_bias.json, prints Markdown tables; exits 1 if a cuflash call failed or
missed the check. ``--device cpu``: tiny sizes on the CPU backend, a smoke test of this script.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness, tables  # noqa: E402  (import neither torch nor CuPy)
from benchmarks.tables import cell  # noqa: E402
from benchmarks import record as records  # noqa: E402

SWEEPS = ("triangle", "swin", "padding", "keybias", "headdim")
NAMES = ("out", "dq", "dk", "dv", "dbias")
SIZES = {  # full sweep, --quick, --device cpu
    "full": {"triangle_n": (256, 384), "swin_images": 64, "pad_shape": (8, 16, 4096, 128),
             "keybias_shape": (2, 16, 4096, 128), "hd_dims": (16, 24, 32, 48), "hd_lens": (512, 1024, 2048, 4096), "hd_tokens": 16384, "hd_heads": 16,
             "dtypes": "bf16,fp32", "repeats": 10},
    "quick": {"triangle_n": (256,), "swin_images": 8, "pad_shape": (2, 16, 4096, 128),
              "keybias_shape": (2, 16, 4096, 128), "hd_dims": (16, 48), "hd_lens": (1024,), "hd_tokens": 16384, "hd_heads": 16,
              "dtypes": "bf16", "repeats": 3},
    "cpu": {"triangle_n": (24,), "swin_images": 1, "pad_shape": (1, 2, 256, 32),
            "keybias_shape": (2, 2, 256, 32), "hd_dims": (16, 24), "hd_lens": (64,), "hd_tokens": 128, "hd_heads": 2,
            "dtypes": "bf16,fp32", "repeats": 2},
}
WINDOWS, WINDOW_SIDE, SWIN_HEADS, SMALL_D, TRIANGLE_HEADS = 64, 7, 4, 32, 4


class Harness:
    """Where the calls run: libraries, inputs, timing, peak memory, failures (harness.py's helpers
    on CUDA; a wall clock and no memory reading on the CPU)."""

    def __init__(self, device: str, repeats: int):
        self.device, self.repeats, self.libs, self.cupy = device, repeats, None, None
        if device == "cuda":
            self.libs = harness.load_libraries()  # SystemExit without a GPU
            if self.libs.torch is None:
                raise SystemExit(f"bench_bias: needs torch with CUDA ({self.libs.torch_note})")
            self.cupy = self.libs.cupy
        import torch

        import cuflash.torch as ct

        self.torch, self.ct = torch, ct
        self.generator = torch.Generator(device=device).manual_seed(0)

    def randn(self, shape, dtype: str):
        return self.torch.randn(shape, generator=self.generator, device=self.device,
                                dtype=getattr(self.torch, records.NUMPY_DTYPES[dtype]))

    def sync(self) -> None:
        if self.cupy is not None:
            self.torch.cuda.synchronize()

    def time(self, call) -> float:
        """A lone call from an idle device, host path included (median)."""
        if self.cupy is not None:
            return records.timed_ms(self.cupy, call, self.repeats)
        return statistics.median(wall_ms(call) for _ in range(self.repeats))

    def streamed(self, call) -> float:
        """Per call of calls issued back to back: the device's time when the host keeps ahead."""
        if self.cupy is not None:
            return records.streamed_ms(self.cupy, call, self.repeats)
        return statistics.fmean(wall_ms(call) for _ in range(self.repeats))

    def peak(self, call) -> int | None:
        """Bytes ``call`` adds above what is allocated before it: torch's peak plus the growth of
        CuPy's pool (emptied before), as bench_memory.measure_peak reads them."""
        if self.cupy is None:
            return None
        torch, pool = self.torch, self.cupy.get_default_memory_pool()
        self.release()
        torch.cuda.reset_peak_memory_stats()
        before, pool_before = torch.cuda.memory_allocated(), pool.total_bytes()
        result = call()
        self.sync()
        del result
        return int(torch.cuda.max_memory_allocated() - before + pool.total_bytes() - pool_before)

    def release(self) -> None:
        if self.libs is not None:
            harness.release_memory(self.libs)
        gc.collect()

    def failure(self, exc: BaseException, warned: list) -> dict:
        if self.libs is not None:
            status, note = harness.classify_failure(exc, self.libs, warned)
        else:
            status, note = "error", f"{type(exc).__name__}: {(str(exc).strip() or ' ').splitlines()[0]}"[:300]
        return {"status": status, "note": note}


def wall_ms(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def exact(torch, q, k, v, dout, bias=None, mask=None, sample=()) -> dict:
    """Float64 out, dq, dk, dv (and dbias) of the query/key rows ``x[sample]``, with autograd."""
    leaves = [x.detach()[sample].double().requires_grad_() for x in (q, k, v)]
    scores = leaves[0] @ leaves[1].transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_())
        scores = scores + leaves[3]
    if mask is not None:
        scores = scores.masked_fill(~mask[sample], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ leaves[2]
    grads = torch.autograd.grad(out, leaves, dout.detach()[sample].double())
    return dict(zip(NAMES, (out.detach(), *grads)))


def rel_err(x, ref) -> float:
    ref = ref.double()
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def measure(h: Harness, make, leaves, dout, ref, dtype: str, sample, first: dict, keep: bool) -> dict:
    """One implementation (``make()`` returns its forward, out in cuflash's layout): one call checked
    against ``ref`` (and cuflash's ``first`` outputs, or kept as them), then the forward under no_grad
    and forward + backward timed, and the peak memory of each. Never raises."""
    torch, warned = h.torch, []
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # torch says in warnings why a backend refused
            begin = time.perf_counter()
            forward = make()
            out = forward()
            got = dict(zip(NAMES, (out.detach(), *torch.autograd.grad(out, leaves, dout))))
            with torch.no_grad():
                forward()  # FlexAttention compiles this one separately
            h.sync()
            result = {"status": "ok", "first_calls_s": time.perf_counter() - begin, "errors": {}, "vs_cuflash": {}}
            for name, value in got.items():
                result["errors"][name] = rel_err(value[sample], ref[name])
                if not keep and name in first and name in ("out", "dbias"):
                    result["vs_cuflash"][name] = rel_err(value, first[name])
            if keep:
                first.update((name, got[name]) for name in ("out", "dbias") if name in got)
            result["correct"] = all(error <= (harness.FWD_TOLERANCE if name == "out" else harness.BWD_TOLERANCE)[dtype]
                                    for name, error in result["errors"].items())
        out = got = None  # timed outside the warnings' recording: no per-call cost of recording them

        def fwd():
            with torch.no_grad():
                return forward()

        def step():
            return torch.autograd.grad(forward(), leaves, dout)

        result.update(fwd_ms=h.time(fwd), fwd_bwd_ms=h.time(step),
                      fwd_streamed_ms=h.streamed(fwd), fwd_bwd_streamed_ms=h.streamed(step),
                      fwd_peak_bytes=h.peak(fwd), fwd_bwd_peak_bytes=h.peak(step))
    except Exception as exc:  # declined, out of memory, not compiling, not written yet, ...
        result = h.failure(exc, warned)
    out = got = forward = None
    h.release()
    return result


def sdpa(h: Harness, q, k, v, backend: str, shape4, attn_mask=None):
    """SDPA restricted to one backend on 4-D views ``shape4`` of q, k, v; ``attn_mask()`` builds the
    float mask from the leaves on every call (so its gradient reaches the bias)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    function = h.torch.nn.functional.scaled_dot_product_attention

    def forward():
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out = function(q.view(shape4), k.view(shape4), v.view(shape4),
                           attn_mask=None if attn_mask is None else attn_mask())
        return out.view(q.shape)

    return forward


def flex(h: Harness, q, k, v, shape4, score_mod):
    """FlexAttention compiled afresh for this point (harness.prepare_flex's way) on 4-D views."""
    from torch.nn.attention.flex_attention import flex_attention

    if h.device != "cpu":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError("FlexAttention needs triton, which is not installed")
    h.torch._dynamo.reset()
    compiled = h.torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q.view(shape4), k.view(shape4), v.view(shape4), score_mod=score_mod).view(q.shape)


def run_row(h: Harness, row: dict, impls: dict, dout, dtype: str, sample=()) -> dict:
    """row['results'][name] for each name: (make, leaves, reference); cuflash first."""
    first, row["results"] = {}, {}
    for name, (make, leaves, ref) in impls.items():
        print(f"[bias] {row['sweep']} {row['case']} {dtype}: {name}", file=sys.stderr, flush=True)
        result = row["results"][name] = measure(h, make, leaves, dout, ref, dtype, sample, first, name == "cuflash")
        if name == "flex" and result["status"] == "error":  # as harness.prepare_flex: what it cannot compile
            result["status"] = "unsupported"
    return row


TIMES = ("fwd_ms", "fwd_bwd_ms", "fwd_streamed_ms", "fwd_bwd_streamed_ms")


def ratio(results: dict, top: str, bottom: str, **goal) -> dict:
    """Time of ``top`` / time of ``bottom``, fwd and fwd+bwd, lone and streamed (None where either
    did not run)."""
    a, b = results.get(top, {}), results.get(bottom, {})
    return {"what": f"{top} / {bottom}", **goal, **{key[:-3]: a[key] / b[key] if key in a and key in b else None
                                                   for key in TIMES}}


def bias_ratios(row: dict) -> dict:
    row["ratios"] = [ratio(row["results"], "sdpa_efficient", "cuflash", goal_min=2.0),
                     ratio(row["results"], "flex", "cuflash", goal_min=1.0),
                     ratio(row["results"], "cuflash_det", "cuflash")]
    return row


def triangle(h: Harness, size: dict, dtypes: list):
    torch, ct, H, D = h.torch, h.ct, TRIANGLE_HEADS, SMALL_D
    for dtype in dtypes:
        for n in size["triangle_n"]:
            q, k, v, dout = (h.randn((1, n, H, n, D), dtype) for _ in range(4))
            bias = h.randn((1, 1, H, n, n), dtype)
            leaves = tuple(x.requires_grad_() for x in (q, k, v, bias))
            ref, shape4 = exact(torch, q, k, v, dout, bias), (n, H, n, D)
            impls = {
                "cuflash": (lambda: lambda: ct.attention(q, k, v, bias=bias), leaves, ref),
                "cuflash_det": (lambda: lambda: ct.attention(q, k, v, bias=bias, deterministic=True), leaves, ref),
                "sdpa_efficient": (lambda: sdpa(h, q, k, v, "EFFICIENT_ATTENTION", shape4,
                                                lambda: bias.view(1, H, n, n).expand(n, H, n, n)), leaves, ref),
                "flex": (lambda: flex(h, q, k, v, shape4, lambda s, b, hh, i, j: s + bias[0, 0, hh, i, j]),
                         leaves, ref)}
            row = {"sweep": "triangle", "case": f"N={n}", "dtype": dtype, "q_shape": list(q.shape),
                   "bias_shape": list(bias.shape)}
            yield bias_ratios(run_row(h, row, impls, dout, dtype))


def window_mask(torch, windows: int, side: int, generator):
    """(windows, 1, side^2, side^2) bool: per window a random row and column (side = none) split
    the tokens into up to four regions, as Swin's shifted windows at the image's edges."""
    token = torch.arange(side * side)
    cuts = torch.randint(1, side + 1, (2, windows, 1), generator=generator)
    region = (token // side >= cuts[0]).long() * 2 + (token % side >= cuts[1]).long()
    return (region[:, :, None] == region[:, None, :])[:, None]


def swin(h: Harness, size: dict, dtypes: list):
    torch, ct, H, D, T, W = h.torch, h.ct, SWIN_HEADS, SMALL_D, WINDOW_SIDE ** 2, WINDOWS
    images = size["swin_images"]
    mask = window_mask(torch, W, WINDOW_SIDE, torch.Generator().manual_seed(0)).to(h.device)
    for dtype in dtypes:
        q, k, v, dout = (h.randn((images, W, H, T, D), dtype) for _ in range(4))
        bias = h.randn((1, H, T, T), dtype)
        leaves = tuple(x.requires_grad_() for x in (q, k, v, bias))
        ref, shape4 = exact(torch, q, k, v, dout, bias, mask), (images, W * H, T, D)
        neg = torch.zeros(mask.shape, dtype=q.dtype, device=h.device).masked_fill(~mask, float("-inf"))
        impls = {
            "cuflash": (lambda: lambda: ct.attention(q, k, v, bias=bias, mask=mask), leaves, ref),
            "cuflash_det": (lambda: lambda: ct.attention(q, k, v, bias=bias, mask=mask, deterministic=True),
                            leaves, ref),
            "sdpa_efficient": (lambda: sdpa(h, q, k, v, "EFFICIENT_ATTENTION", shape4,
                                            lambda: (bias + neg).view(1, W * H, T, T)), leaves, ref),
            "flex": (lambda: flex(h, q, k, v, shape4, lambda s, b, hh, i, j: torch.where(
                mask[hh // H, 0, i, j], s + bias[0, hh % H, i, j], float("-inf"))), leaves, ref)}
        row = {"sweep": "swin", "case": f"{images}x{W} windows", "dtype": dtype, "q_shape": list(q.shape),
               "bias_shape": list(bias.shape), "mask_shape": list(mask.shape),
               "mask_visible_fraction": float(mask.float().mean())}
        yield bias_ratios(run_row(h, row, impls, dout, dtype))


def padding(h: Harness, size: dict, dtypes: list):
    torch, ct = h.torch, h.ct
    b, hh, n, d = size["pad_shape"]
    keep, sample = n * 3 // 4, (slice(0, 1), slice(0, 2))
    q, k, v, dout = (h.randn((b, hh, n, d), "bf16") for _ in range(4))
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    unpadded = tuple(x.detach()[..., :keep, :].clone().requires_grad_() for x in (k, v))
    mask = (torch.arange(n, device=h.device) < keep).view(1, 1, 1, n).expand(b, 1, 1, n).contiguous()
    impls = {"cuflash": (lambda: lambda: ct.attention(q, k, v, mask=mask), leaves,
                         exact(torch, q, k, v, dout, mask=mask, sample=sample)),
             "cuflash_unpadded": (lambda: lambda: ct.attention(q, *unpadded), (q, *unpadded),
                          exact(torch, q, *unpadded, dout, sample=sample))}
    row = {"sweep": "padding", "case": f"B={b} H={hh} L={n} D={d}, keys {keep}/{n}", "dtype": "bf16",
           "q_shape": list(q.shape), "mask_shape": list(mask.shape), "unpadded_keys": keep}
    row = run_row(h, row, impls, dout, "bf16", sample)
    row["ratios"] = [ratio(row["results"], "cuflash", "cuflash_unpadded", goal_max=1.05)]
    yield row


def keybias(h: Harness, size: dict, dtypes: list):
    """A learnable per-key bias (B, 1, 1, L), float32, over bf16 attention: few dbias entries, each
    summing heads x queries terms (bias_grad.passes cuts that sum in two launches)."""
    torch, ct = h.torch, h.ct
    b, hh, n, d = size["keybias_shape"]
    q, k, v, dout = (h.randn((b, hh, n, d), "bf16") for _ in range(4))
    bias = h.randn((b, 1, 1, n), "fp32")
    leaves = tuple(x.requires_grad_() for x in (q, k, v, bias))
    ref = exact(torch, q, k, v, dout, bias)
    impls = {
        "cuflash": (lambda: lambda: ct.attention(q, k, v, bias=bias), leaves, ref),
        "cuflash_det": (lambda: lambda: ct.attention(q, k, v, bias=bias, deterministic=True), leaves, ref),
        "cuflash_fixed_bias": (lambda: lambda: ct.attention(q, k, v, bias=bias.detach()), leaves[:3], ref),
        "sdpa_efficient": (lambda: sdpa(h, q, k, v, "EFFICIENT_ATTENTION", q.shape,
                                        lambda: bias.to(q.dtype).expand(b, hh, n, n)), leaves, ref),
        "flex": (lambda: flex(h, q, k, v, q.shape, lambda s, bb, hi, i, j: s + bias[bb, 0, 0, j]), leaves, ref)}
    row = {"sweep": "keybias", "case": f"B={b} H={hh} L={n} D={d}", "dtype": "bf16", "q_shape": list(q.shape),
           "bias_shape": list(bias.shape), "bias_dtype": "fp32"}
    row = bias_ratios(run_row(h, row, impls, dout, "bf16"))
    row["ratios"].append(ratio(row["results"], "cuflash", "cuflash_fixed_bias"))
    yield row


def headdim(h: Harness, size: dict, dtypes: list):
    torch, ct, hh, sample = h.torch, h.ct, size["hd_heads"], (slice(0, 1), slice(0, 2))
    for d in size["hd_dims"]:
        for n in size["hd_lens"]:
            b = max(1, size["hd_tokens"] // n)
            q, k, v, dout = (h.randn((b, hh, n, d), "bf16") for _ in range(4))
            leaves = tuple(x.requires_grad_() for x in (q, k, v))
            ref = exact(torch, q, k, v, dout, sample=sample)
            impls = {"cuflash": (lambda: lambda: ct.attention(q, k, v), leaves, ref),
                     **{f"sdpa_{backend.split('_')[0].lower()}": (
                         lambda backend=backend: sdpa(h, q, k, v, backend, q.shape), leaves, ref)
                        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION")}}
            row = run_row(h, {"sweep": "headdim", "case": f"D={d} L={n} B={b} H={hh}", "dtype": "bf16",
                              "q_shape": list(q.shape)}, impls, dout, "bf16", sample)
            results, best = row["results"], {}
            for key in TIMES:  # the fastest peer that ran and agreed, per direction and timing
                timed = {name: r[key] for name, r in results.items() if name != "cuflash" and r.get("correct")}
                best[key[:-3]] = results[min(timed, key=timed.get)][key] / results["cuflash"][key] \
                    if timed and key in results["cuflash"] else None
                row[f"best_peer_{key[:-3]}"] = min(timed, key=timed.get) if timed else None
            row["ratios"] = [{"what": "fastest correct SDPA / cuflash", "goal_min": 1.0, **best}]
            yield row


def format_tables(rows: list) -> str:
    out = ["| sweep | case | dtype | impl | fwd ms | fwd+bwd ms | streamed fwd / fwd+bwd ms | peak MiB fwd / fwd+bwd "
           "| max rel err | note |", "| --- " * 10 + "|"]
    for row in rows:
        for name, r in row["results"].items():
            if r["status"] != "ok":
                out.append(f"| {row['sweep']} | {row['case']} | {row['dtype']} | {name} | - | - | - | - | - "
                           f"| {tables.STATUS_CELL.get(r['status'], r['status'])}: {r['note'][:90]} |")
                continue
            peaks = " / ".join(cell(r[key] / 2**20 if r[key] is not None else None, ".0f")
                               for key in ("fwd_peak_bytes", "fwd_bwd_peak_bytes"))
            streamed = " / ".join(cell(r.get(key)) for key in ("fwd_streamed_ms", "fwd_bwd_streamed_ms"))
            error = max(r["errors"].values())
            out.append(f"| {row['sweep']} | {row['case']} | {row['dtype']} | {name} | {cell(r['fwd_ms'])} "
                       f"| {cell(r['fwd_bwd_ms'])} | {streamed} | {peaks} | {error:.1e}{'' if r['correct'] else ' FAIL'} "
                       f"| {'compile+first ' + cell(r['first_calls_s'], '.1f') + ' s' if name == 'flex' else ''} |")
    out += ["", "time ratios (peer / cuflash = cuflash's speedup; padding: padded / unpadded = its cost), of lone "
            "calls and streamed ones; '!' misses the goal", "",
            "| sweep | case | dtype | ratio | fwd | fwd+bwd | streamed fwd | streamed fwd+bwd | goal |",
            "| --- " * 9 + "|"]
    for row in rows:
        for r in row.get("ratios", []):
            cells = []
            for x in (r["fwd"], r["fwd_bwd"], r.get("fwd_streamed"), r.get("fwd_bwd_streamed")):
                missed = x is not None and (x < r.get("goal_min", 0) or x > r.get("goal_max", float("inf")))
                cells.append(cell(x, ".2f") + ("!" if missed else ""))
            goal = f">= {r['goal_min']}" if "goal_min" in r else f"<= {r['goal_max']}" if "goal_max" in r else ""
            out.append(f"| {row['sweep']} | {row['case']} | {row['dtype']} | {r['what']} | {' | '.join(cells)} "
                       f"| {goal} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes, bf16, 3 repeats (a smoke run)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"any of {','.join(SWEEPS)} (all)")
    parser.add_argument("--dtype", default=None, help="dtypes of triangle and swin (bf16,fp32; --quick: bf16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (10; --quick: 3)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: tiny sizes on the CPU backend, to test this script")
    parser.add_argument("--out", type=Path, default=records.RESULTS_DIR)
    args = parser.parse_args(argv)
    size = SIZES["cpu" if args.device == "cpu" else "quick" if args.quick else "full"]
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    dtypes = [d.strip() for d in (args.dtype or size["dtypes"]).split(",") if d.strip()]
    for bad, allowed, what in ((sweeps, SWEEPS, "sweep"), (dtypes, ("bf16", "fp16", "fp32"), "dtype")):
        if set(bad) - set(allowed):
            parser.error(f"unknown {what}: {', '.join(sorted(set(bad) - set(allowed)))}")
    h = Harness(args.device, args.repeats or size["repeats"])
    if h.libs is not None:
        environment = harness.collect_environment(h.libs)
    else:
        environment = {"device": "cpu", "torch": h.torch.__version__, **records.source_commit(),
                       "date_utc": records.now_utc()}
    rows, interrupted = [], False
    try:
        for sweep in sweeps:
            for row in {"triangle": triangle, "swin": swin, "padding": padding, "keybias": keybias,
                         "headdim": headdim}[sweep](
                    h, size, dtypes):
                rows.append(row)
                print(json.dumps(records.json_safe(row)), file=sys.stderr, flush=True)
                h.release()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
    failures = [f"{row['sweep']} {row['case']} {row['dtype']} {name}: "
                f"{r.get('note') or 'errors ' + json.dumps(r['errors'])}"
                for row in rows for name, r in row["results"].items()
                if name.startswith("cuflash") and not r.get("correct")]
    record = {"sweep": "bias", **environment, "config": vars(args), "sizes": size, "interrupted": interrupted,
              "rows": rows, "failures": failures}
    path = records.write(record, records.record_path(args.out, environment["date_utc"], environment["device"], "bias"))
    print(format_tables(rows))
    print(f"\nrecorded {path}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
