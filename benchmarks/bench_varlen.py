"""Packed variable-length batches (issue 16): cuflash varlen against dense cuflash and padded SDPA.

cuflash's varlen calls against the dense call at the mean length and against torch SDPA on the
same batch padded to the longest sequence with a mask.

Per head dim D, L and causal: sequence lengths drawn uniformly from [L/8, L] (seeded by L, so the
same batch for every D) until --tokens are reached, the last one cut to the remainder (dropped if
that is under L/8); Hq query heads, Hk = Hq (MHA) and Hq/4 (GQA) key/value heads. Timed (CUDA
events, median of --repeats after two warm-up calls, on the legacy default stream CuPy and torch share):
- cuflash (CuPy): ``attention_varlen`` (with lse) and ``attention_varlen_backward`` alone;
- dense: ``cuflash.attention`` / ``attention_backward`` on (B', Hq, Lmean, D), B' Lmean ~ the tokens;
- ``cuflash.torch.flash_attn_varlen_func``: forward, backward alone (retain_graph), forward + backward;
- torch SDPA on (B, Hq, Lpad, D), Lpad = the longest length rounded up to 16 (the alignment torch's
  EFFICIENT kernel wants for its mask), with a boolean (B, 1, Lpad, Lpad) mask: key padding, and the
  lower triangle when causal (``is_causal`` cannot join ``attn_mask``); FLASH, EFFICIENT and CUDNN
  each alone under ``sdpa_kernel`` (FLASH takes no mask; MATH is not tried); per direction the
  fastest that runs and agrees with cuflash counts. GQA: k and v repeated to Hq heads beforehand
  (as transformers' ``repeat_kv``).

Throughput counts only real query-key pairs: FLOPs = 4 Hq D sum_b pairs_b, pairs_b = L_b^2, or
L_b (L_b + 1) / 2 causal (the dense call's likewise), x2.5 backward, x3.5 forward + backward. Goal:
varlen / dense >= 0.9 and cuflash / SDPA >= 1.5, forward and backward; a cell missing it ends in '!'.

Correctness, once per point: the varlen output against one ``cuflash.attention`` per sequence,
against the torch path's and against SDPA's real rows. err = max |x - ref| / max(1, |ref|) (the
absolute error, relative where |ref| > 1, where bf16's step exceeds 2e-2); above --tol the point is
marked and the script exits 1 (after printing and saving).

    python benchmarks/bench_varlen.py [--quick] [--no-torch] [--headdim 64,128] [--seqlen 1024,4096,16384]

Writes benchmarks/results/<UTC>_<gpu>_varlen.json (--out-dir) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
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

from benchmarks import record as records  # noqa: E402

TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def draw_lengths(numpy, L: int, tokens: int, seed: int) -> list[int]:
    """Lengths uniform in [L/8, L] until ``tokens``; the last cut to the remainder, or dropped if
    that is under L/8 (the total then falls short by less than L/8)."""
    rng, low, lengths = numpy.random.default_rng([seed, L]), max(1, L // 8), []
    while sum(lengths) < tokens:
        n, rest = int(rng.integers(low, L, endpoint=True)), tokens - sum(lengths)
        if n >= rest:
            lengths += [rest] if rest >= low else []
            break
        lengths.append(n)
    return lengths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(TOLERANCE))
    parser.add_argument("--headdim", default=None, help="head dims (64,128; --quick: 128)")
    parser.add_argument("--seqlen", default=None, help="longest length L of the draw (1024,4096,16384; --quick: 4096)")
    parser.add_argument("--causal", default="false,true")
    parser.add_argument("--tokens", type=int, default=16384, help="total tokens of the packed batch")
    parser.add_argument("--heads", type=int, default=16, help="query heads Hq")
    parser.add_argument("--kv-heads", default=None, help="key/value heads (Hq and Hq/4; --quick: Hq)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tol", type=float, default=None, help="correctness bound (bf16 2e-2, fp16 5e-3)")
    parser.add_argument("--quick", action="store_true", help="one D (128), one L (4096), MHA only")
    parser.add_argument("--no-torch", action="store_true", help="cuflash's CuPy API only (no torch paths, no SDPA)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    args.headdim = args.headdim or ("128" if args.quick else "64,128")
    args.seqlen = args.seqlen or ("4096" if args.quick else "1024,4096,16384")
    args.kv_heads = args.kv_heads or (str(args.heads) if args.quick else f"{args.heads},{max(1, args.heads // 4)}")
    args.tol = args.tol if args.tol is not None else TOLERANCE[args.dtype]

    import cupy
    import ml_dtypes  # noqa: F401  (numpy's bfloat16)
    import numpy

    import cuflash

    torch = None
    if not args.no_torch:
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel

            import cuflash.torch as ctorch
        except ImportError as error:
            print(f"no torch paths: {error}", file=sys.stderr)
            torch = None
    np_dtype = numpy.dtype(records.NUMPY_DTYPES[args.dtype])
    hq = args.heads

    def timed(call) -> float:
        call()  # a second warm-up after timed_ms's own: kernels compiled, pools grown
        return records.timed_ms(cupy, call, args.repeats)

    def host_us(call, calls: int = 20) -> float:
        """Median wall time of the Python call alone (the device idle before it), in us: the events
        above count it too where it exceeds the kernels' time (short sequences)."""
        samples = []
        for _ in range(calls):
            cupy.cuda.Device().synchronize()
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e6)
        cupy.cuda.Device().synchronize()
        return statistics.median(samples)

    def as_f32(x):
        if x.dtype == numpy.float16:
            return x.astype(cupy.float32)
        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)  # bfloat16: its bits

    def error(x, ref) -> float:
        x, ref = as_f32(x), as_f32(ref)
        return float((cupy.abs(x - ref) / cupy.maximum(cupy.abs(ref), 1.0)).max()) if x.size else 0.0

    def normal(rng, shape):
        """(CuPy array, torch tensor or None) of one standard normal input: torch allocates it when
        present, CuPy sees the same memory through cupy.from_dlpack."""
        host = rng.standard_normal(shape, dtype=numpy.float32)
        if torch is None:
            return cupy.asarray(host.astype(np_dtype)), None
        tensor = torch.from_numpy(host).to("cuda", getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype]))
        return cupy.from_dlpack(tensor), tensor

    def torch_times(forward, inputs, grad_out) -> tuple:
        """A torch forward's output (detached) and its fwd, bwd alone and fwd+bwd medians."""
        out = forward()
        times = {"fwd_ms": timed(forward),
                 "bwd_ms": timed(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)),
                 "fwd_bwd_ms": timed(lambda: torch.autograd.grad(forward(), inputs, grad_out))}
        return out.detach(), times

    rows, failures = [], []
    for d in map(int, args.headdim.split(",")):
        for L in map(int, args.seqlen.split(",")):
            lengths = draw_lengths(numpy, L, args.tokens, args.seed)
            cu = numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int32)
            total, nseq, lmax = int(cu[-1]), len(lengths), max(lengths)
            lmean = round(total / nseq)
            dense_b = max(1, round(total / lmean))
            cu_c = cupy.asarray(cu)
            for hk in map(int, args.kv_heads.split(",")):
                rng = numpy.random.default_rng(args.seed)
                (q, tq), (k, tk), (v, tv), (dout, tdout) = (normal(rng, (total, h, d)) for h in (hq, hk, hk, hq))
                dense = [normal(rng, (dense_b, h, lmean, d))[0] for h in (hq, hk, hk, hq)]
                for causal in (c.strip().lower() == "true" for c in args.causal.split(",")):
                    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
                    dense_pairs = dense_b * (lmean * (lmean + 1) // 2 if causal else lmean * lmean)
                    flops, dense_flops = 4 * hq * d * pairs, 4 * hq * d * dense_pairs
                    r = {"dtype": args.dtype, "D": d, "L": L, "causal": causal, "Hq": hq, "Hk": hk, "lengths": lengths,
                         "total": total, "seqs": nseq, "Lmean": lmean, "Lmax": lmax, "dense_B": dense_b,
                         "pairs": pairs, "flops_fwd": flops, "dense_pairs": dense_pairs, "errors": {}}
                    vk = dict(max_seqlen_q=lmax, max_seqlen_k=lmax, causal=causal)

                    # cuflash, CuPy API: correctness against one dense call per sequence, then timing
                    out, lse = cuflash.attention_varlen(q, k, v, cu_c, cu_c, return_lse=True, **vk)
                    r["errors"]["per_sequence"] = max(error(
                        out[s:e].transpose(1, 0, 2),
                        cuflash.attention(*(x[s:e].transpose(1, 0, 2) for x in (q, k, v)), causal=causal))
                        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()))
                    r["fwd_ms"] = timed(lambda: cuflash.attention_varlen(q, k, v, cu_c, cu_c, return_lse=True, **vk))
                    r["bwd_ms"] = timed(lambda: cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_c, cu_c,
                                                                                  **vk))
                    d_out, d_lse = cuflash.attention(*dense[:3], causal=causal, return_lse=True)
                    r["dense_fwd_ms"] = timed(lambda: cuflash.attention(*dense[:3], causal=causal, return_lse=True))
                    r["dense_bwd_ms"] = timed(lambda: cuflash.attention_backward(dense[3], *dense[:3], d_out, d_lse,
                                                                                 causal=causal))
                    # Back to back (host overlapped): the kernels' time once the host keeps ahead.
                    r["streamed_ms"] = {name: records.streamed_ms(cupy, call, 3 * args.repeats) for name, call in (
                        ("fwd", lambda: cuflash.attention_varlen(q, k, v, cu_c, cu_c, return_lse=True, **vk)),
                        ("bwd", lambda: cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_c, cu_c, **vk)),
                        ("dense_fwd", lambda: cuflash.attention(*dense[:3], causal=causal, return_lse=True)),
                        ("dense_bwd", lambda: cuflash.attention_backward(dense[3], *dense[:3], d_out, d_lse,
                                                                         causal=causal)))}
                    streamed = r["streamed_ms"]
                    r["streamed_fwd_vs_dense"] = (flops / streamed["fwd"]) / (dense_flops / streamed["dense_fwd"])
                    r["streamed_bwd_vs_dense"] = (flops / streamed["bwd"]) / (dense_flops / streamed["dense_bwd"])
                    r["host_us"] = {name: host_us(call) for name, call in (
                        ("fwd", lambda: cuflash.attention_varlen(q, k, v, cu_c, cu_c, return_lse=True, **vk)),
                        ("bwd", lambda: cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_c, cu_c, **vk)),
                        ("dense_fwd", lambda: cuflash.attention(*dense[:3], causal=causal, return_lse=True)))}
                    r["fwd_tflops"], r["bwd_tflops"] = flops / r["fwd_ms"] / 1e9, 2.5 * flops / r["bwd_ms"] / 1e9
                    r["dense_fwd_tflops"] = dense_flops / r["dense_fwd_ms"] / 1e9
                    r["dense_bwd_tflops"] = 2.5 * dense_flops / r["dense_bwd_ms"] / 1e9
                    r["fwd_vs_dense"] = r["fwd_tflops"] / r["dense_fwd_tflops"]
                    r["bwd_vs_dense"] = r["bwd_tflops"] / r["dense_bwd_tflops"]

                    if torch is not None:
                        # cuflash through torch (flash-attn's signature), autograd
                        cu_t = torch.from_numpy(cu).to("cuda")
                        leaves = tuple(t.detach().requires_grad_() for t in (tq, tk, tv))
                        t_out, r["torch_varlen"] = torch_times(
                            lambda: ctorch.flash_attn_varlen_func(*leaves, cu_t, cu_t, lmax, lmax, causal=causal),
                            leaves, tdout)
                        r["errors"]["torch_varlen"] = error(out, cupy.from_dlpack(t_out))
                        r["torch_fwd_bwd_tflops"] = 3.5 * flops / r["torch_varlen"]["fwd_bwd_ms"] / 1e9

                        # torch SDPA on the padded batch with a boolean mask
                        lpad = -(-lmax // 16) * 16
                        valid = (torch.arange(lpad, device="cuda")[None, :]
                                 < torch.tensor(lengths, device="cuda")[:, None])  # (B, Lpad) real rows

                        def padded(t, heads):  # packed (total, H, D) -> (B, H, Lpad, D), zeros past each length
                            p = t.new_zeros(nseq, lpad, t.shape[1], d)
                            p[valid] = t
                            return p.transpose(1, 2).repeat_interleave(hq // heads, dim=1).contiguous()

                        pq, pk, pv = (padded(t, t.shape[1]).requires_grad_() for t in (tq, tk, tv))
                        pdout = padded(tdout, hq)
                        mask = valid[:, None, None, :].expand(nseq, 1, lpad, lpad)
                        if causal:
                            mask = mask & torch.ones(lpad, lpad, dtype=torch.bool, device="cuda").tril()
                        mask = mask.contiguous()
                        r["Lpad"], r["sdpa"] = lpad, {}
                        for backend in SDPA_BACKENDS:
                            def sdpa(backend=backend):
                                with sdpa_kernel([getattr(SDPBackend, backend)]), warnings.catch_warnings():
                                    warnings.simplefilter("ignore")  # the reasons a backend declines
                                    return torch.nn.functional.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)
                            try:
                                s_out, result = torch_times(sdpa, (pq, pk, pv), pdout)
                                real = s_out.transpose(1, 2)[valid]  # (total, Hq, D): the real rows
                                result["err"] = error(out, cupy.from_dlpack(real.contiguous()))
                                result["correct"] = result["err"] <= args.tol
                            except Exception as failure:  # declined the mask, out of memory, ...
                                result = {"note": f"{type(failure).__name__}: {failure}"[:160]}
                            r["sdpa"][backend.split("_")[0].lower()] = result
                            torch.cuda.empty_cache()
                        ran = {name: s for name, s in r["sdpa"].items() if "fwd_ms" in s}
                        if ran:
                            r["errors"]["sdpa"] = min(s["err"] for s in ran.values())
                        agreeing = {name: s for name, s in ran.items() if s["correct"]}
                        for key, ours in (("fwd_ms", r["fwd_ms"]), ("bwd_ms", r["bwd_ms"]),
                                          ("fwd_bwd_ms", r["torch_varlen"]["fwd_bwd_ms"])):
                            if agreeing:
                                name = min(agreeing, key=lambda n: agreeing[n][key])
                                r[f"sdpa_{key}"], r[f"sdpa_{key[:-3]}_backend"] = agreeing[name][key], name
                                r[f"{key[:-3]}_vs_sdpa"] = agreeing[name][key] / ours
                    r["max_err"] = max(r["errors"].values())
                    r["correct"] = r["max_err"] <= args.tol
                    if not r["correct"]:
                        failures.append(f"D={d} L={L} causal={causal} Hk={hk}: errors {r['errors']} > {args.tol}")
                    rows.append(r)
                    print(json.dumps({key: value for key, value in r.items() if key != "lengths"}), file=sys.stderr,
                          flush=True)

    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    record = {"sweep": "varlen", "device": gpu, "cuflash": cuflash.__version__, "cupy": cupy.__version__,
              "torch": torch.__version__ if torch is not None else None, **records.source_commit(),
              "date_utc": records.now_utc(), "config": vars(args), "rows": rows, "failures": failures}
    path = records.write(record, records.record_path(args.out_dir, record["date_utc"], gpu, "varlen"))

    def cell(r, key, goal, digits=2):
        if key not in r:
            return "-"
        return f"{r[key]:.{digits}f}{'!' if goal is not None and r[key] < goal else ''}"

    print(f"{args.dtype}, {args.tokens} tokens, lengths uniform in [L/8, L]; TF/s over real query-key pairs; "
          "each call timed alone from an idle device (host path included); streamed: calls back to back, "
          "the host overlapped; host us: the Python call alone; "
          "x sdpa = SDPA time / cuflash time (padded batch, boolean mask, fastest agreeing backend); "
          "'!' misses the goal (vs dense >= 0.9, x sdpa >= 1.5)\n")
    print("| D | L | causal | Hq/Hk | seqs | Lmean/Lmax | fwd TF/s | fwd vs dense | fwd x sdpa | bwd TF/s "
          "| bwd vs dense | bwd x sdpa | torch fwd+bwd TF/s | fwd+bwd x sdpa | sdpa backend f/b "
          "| streamed fwd/bwd vs dense | host us fwd/bwd/dense | err |")
    print("| --- " * 18 + "|")
    for r in rows:
        host = "/".join(f"{r['host_us'][name]:.0f}" for name in ("fwd", "bwd", "dense_fwd"))
        backends = f"{r.get('sdpa_fwd_backend', '-')}/{r.get('sdpa_bwd_backend', '-')}"
        print(f"| {r['D']} | {r['L']} | {'yes' if r['causal'] else 'no'} | {r['Hq']}/{r['Hk']} | {r['seqs']} "
              f"| {r['Lmean']}/{r['Lmax']} | {r['fwd_tflops']:.0f} | {cell(r, 'fwd_vs_dense', 0.9)} "
              f"| {cell(r, 'fwd_vs_sdpa', 1.5)} | {r['bwd_tflops']:.0f} | {cell(r, 'bwd_vs_dense', 0.9)} "
              f"| {cell(r, 'bwd_vs_sdpa', 1.5)} | {cell(r, 'torch_fwd_bwd_tflops', None, 0)} "
              f"| {cell(r, 'fwd_bwd_vs_sdpa', 1.5)} | {backends} "
              f"| {cell(r, 'streamed_fwd_vs_dense', 0.9)}/{cell(r, 'streamed_bwd_vs_dense', 0.9)} | {host} "
              f"| {r['max_err']:.1e}{'' if r['correct'] else ' FAIL'} |")
    print(f"\nrecorded {path}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
