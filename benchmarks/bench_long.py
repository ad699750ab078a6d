"""One million tokens on one GPU (issue 19): causal attention at B = 1, H = 8, L = 2^20, bf16.

For each head dim (64, 128): cuflash.torch.attention forward and backward (autograd), torch
SDPA's CUDNN and FLASH backends beside it on the same tensors. Each is timed (CUDA events, the
median of --repeats) with its peak memory above the inputs (torch.cuda.max_memory_allocated:
cuflash's torch path allocates from torch's caching allocator, so the number is comparable).
Sampled query rows are checked against a float64 reference computed row by row (out and dq of
row i from its i + 1 keys: no L x L buffer anywhere, here or in the kernels).

    python benchmarks/bench_long.py [--length 1048576] [--headdim 64,128] [--repeats 2] [--out DIR]

Writes <UTC>_<gpu>_long.json under --out and prints a Markdown table. FLOPs count
4 * H * L^2 * D * 0.5 (causal), x2.5 for the backward.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402


def sampled_rows_reference(q, k, v, dout, rows):
    """Float64 out and dq of query rows ``rows`` (causal, Lq = Lk), one row at a time: row i
    attends keys [0, i]; dq_i = scale * sum_j p_ij (dout_i . v_j - delta_i) k_j, delta_i = dout_i . out_i.
    Tensors (L, H, D) float64 on the GPU; returns {row: (out (H, D), dq (H, D))}."""
    import torch

    scale = q.shape[-1] ** -0.5
    result = {}
    for i in rows:
        keys, values = k[: i + 1], v[: i + 1]                       # (i+1, H, D)
        scores = torch.einsum("hd,jhd->hj", q[i], keys) * scale
        p = torch.softmax(scores, dim=-1)                           # (H, i+1)
        out = torch.einsum("hj,jhd->hd", p, values)
        dp = torch.einsum("hd,jhd->hj", dout[i], values)
        delta = (dout[i] * out).sum(-1, keepdim=True)
        dq = torch.einsum("hj,jhd->hd", p * (dp - delta), keys) * scale
        result[i] = (out, dq)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2**20)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", default="64,128")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-torch-sdpa", action="store_true", help="cuflash only")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    import cuflash.torch as ct

    L, H = args.length, args.heads
    rows_checked = sorted({0, 1, L // 3, L // 2 + 7, L - 2, L - 1})
    results = []
    device = torch.cuda.get_device_name()
    record = {"sweep": "long", "device": device, "cuflash": cuflash.__version__, "torch": torch.__version__,
              **records.source_commit(), "date_utc": records.now_utc(), "config": vars(args), "rows": results,
              "rows_checked": rows_checked}
    path = records.record_path(args.out, record["date_utc"], device, "long")

    def timed(step):
        samples = []
        for _ in range(args.repeats + 1):  # the first: warm-up (compiles)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        return statistics.median(samples[1:])

    for d in map(int, args.headdim.split(",")):
        generator = torch.Generator(device="cuda").manual_seed(d)
        q, k, v, dout = (torch.randn(1, H, L, d, device="cuda", dtype=torch.bfloat16, generator=generator)
                         for _ in range(4))
        flops = 4 * H * L * L * d * 0.5
        exact = [x[0].transpose(0, 1).double() for x in (q, k, v, dout)]  # (L, H, D) float64, 4 x 2 GiB at d 128
        reference = sampled_rows_reference(*exact, rows_checked)
        del exact
        contenders = [("cuflash", lambda a, b, c: ct.attention(a, b, c, causal=True), None)]
        if not args.no_torch_sdpa:
            contenders += [(name, lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), backend)
                           for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                                                 ("sdpa-flash", SDPBackend.FLASH_ATTENTION))]
        for name, attend, backend in contenders:
            row = {"name": name, "D": d, "L": L, "H": H}
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    out = None

                    def forward():
                        nonlocal out
                        out = attend(*leaves)

                    def backward():
                        for leaf in leaves:
                            leaf.grad = None
                        out.backward(dout, retain_graph=True)

                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    forward()
                    backward()
                    torch.cuda.synchronize()
                    row["peak_gib_above_inputs"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    row["fwd_ms"] = timed(forward)
                    row["bwd_ms"] = timed(backward)
                    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                    row["bwd_tflops"] = 2.5 * flops / row["bwd_ms"] / 1e9
                    # Relative to the largest sampled reference value of each quantity: row 0 sees one
                    # key, so its dq is exactly 0 and a per-row denominator would divide rounding by 0.
                    scales = {key: max(ref[index].abs().max().item() for ref in reference.values())
                              for index, key in enumerate(("out", "dq"))}
                    errors = {"out": 0.0, "dq": 0.0}
                    for i, (ref_out, ref_dq) in reference.items():
                        for key, got, ref in (("out", out[0, :, i], ref_out), ("dq", leaves[0].grad[0, :, i], ref_dq)):
                            error = (got.double() - ref).abs().max().item() / max(scales[key], 1e-30)
                            errors[key] = max(errors[key], error)
                    row["sampled_relative_error"] = errors
                    row["correct"] = errors["out"] < 2e-2 and errors["dq"] < 5e-2
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # a backend that declines the shape
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            finally:
                out = None
                for leaf in leaves:
                    leaf.grad = None
                torch.cuda.empty_cache()
            results.append(row)
            print(row, flush=True)
            records.write(record, path)  # after every row: a run cut short keeps what it measured
        q = k = v = dout = None  # the next head dim's tensors take their memory
        torch.cuda.empty_cache()

    print(f"\nbf16, causal, B=1, H={H}, L={L}; peak: memory above the inputs during fwd+bwd\n")
    print("| D | who | fwd ms | fwd TF/s | bwd ms | bwd TF/s | peak GiB | sampled rel. error out/dq |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['D']} | {r['name']} | - | - | - | - | - | {r['error'][:60]} |")
            continue
        e = r["sampled_relative_error"]
        print(f"| {r['D']} | {r['name']} | {r['fwd_ms']:.0f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.0f} | "
              f"{r['bwd_tflops']:.0f} | {r['peak_gib_above_inputs']:.2f} | {e['out']:.1e}/{e['dq']:.1e}"
              f"{'' if r['correct'] else ' FAIL'} |")
    print(f"\nrecorded {path}")
    return 0 if all(r.get("correct", True) for r in results if r["name"] == "cuflash") else 1


if __name__ == "__main__":
    sys.exit(main())
