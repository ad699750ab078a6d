"""Dev script for the exact fp32/fp64 backward (bwd_dkdv_simt, bwd_dq_simt): tile sweep.

Times cuflash.attention_backward with the backward tile table overridden per case (atomic dQ:
the dK/dV kernel alone; deterministic: dK/dV kernel + dQ kernel), checks each result against
the first case's, and times torch SDPA EFFICIENT_ATTENTION's backward on the same inputs.

    python benchmarks/dev_bwd_simt.py [--dtype float32] [--d 64] [--L 4096] [--causal]
"""
from __future__ import annotations

import argparse

import cupy
import numpy

import cuflash
from cuflash._gpu import kernels, plan, tiles


def timeit(fn, reps=10):
    fn()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(numpy.median(times))


def with_options(extra: tuple[str, ...]):
    base = kernels.compile_options.__wrapped__ if hasattr(kernels.compile_options, "__wrapped__") else kernels.compile_options

    def opts(variant):
        return base(variant) + extra
    opts.__wrapped__ = base
    kernels.compile_options = opts
    plan.forget()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dkdv", default="64x64x8,128x64x8,64x128x8,32x64x8")
    ap.add_argument("--dq", default="64x64x8,128x64x8,64x32x8")
    ap.add_argument("--minblocks", default="1,2")
    args = ap.parse_args()
    dtype, d, L = args.dtype, args.d, args.L
    H = 2048 // d
    B = max(1, 16384 // L)
    rng = numpy.random.default_rng(0)
    q, k, v, do = (cupy.asarray(rng.standard_normal((B, H, L, d)).astype(dtype)) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=args.causal, return_lse=True)
    flops = 2.5 * 4 * B * H * L * L * d * (0.5 if args.causal else 1.0)
    print(f"{dtype} d{d} B{B} H{H} L{L} causal={args.causal}")

    key = ("bwd_dkdv_simt", dtype)
    qkey = ("bwd_dq_simt", dtype)
    saved = dict(tiles._BWD_SIMT_FIRST)
    ref = None

    def run(det):
        return cuflash.attention_backward(do, q, k, v, out, lse, causal=args.causal, deterministic=det)

    for mb in args.minblocks.split(","):
        with_options((f"-DCUFLASH_BWD_MIN_BLOCKS={mb}",))
        for tile in args.dkdv.split(","):
            bm, bn, w = map(int, tile.split("x"))
            tiles._BWD_SIMT_FIRST[key] = ((256, ((bm, bn, w),)),)
            try:
                dkdv = tiles.select_backward(dtype, d, d, args.causal, "90a").dkdv
                b = kernels.compile_offline(dataclass_replace(dkdv, arch="90a"), extra_source="")
                regs = f"{b.registers} regs {b.spill_bytes} B spill"
                g = run(False)
                if ref is None:
                    ref = [x.copy() for x in g]
                err = max(float(cupy.abs(a - r).max() / (cupy.abs(r).max() + 1e-30)) for a, r in zip(g, ref))
                ms = timeit(lambda: run(False))
                print(f"  atomic  dkdv {dkdv.block_m}x{dkdv.block_n}w{dkdv.warps} minblocks {mb} ({regs}): "
                      f"{ms:.3f} ms {flops / ms / 1e9:.1f} TF/s  max rel diff {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  atomic  dkdv {tile} minblocks {mb}: FAILED {str(e)[:300]}", flush=True)
        tiles._BWD_SIMT_FIRST.update(saved)
        for tile in args.dq.split(","):
            bm, bn, w = map(int, tile.split("x"))
            tiles._BWD_SIMT_FIRST[qkey] = ((256, ((bm, bn, w),)),)
            try:
                dqv = tiles.select_backward(dtype, d, d, args.causal, "90a").dq
                b = kernels.compile_offline(dataclass_replace(dqv, arch="90a"))
                regs = f"{b.registers} regs {b.spill_bytes} B spill"
                g = run(True)
                err = max(float(cupy.abs(a - r).max() / (cupy.abs(r).max() + 1e-30)) for a, r in zip(g, ref))
                ms = timeit(lambda: run(True))
                print(f"  determ. dq {dqv.block_m}x{dqv.block_n}w{dqv.warps} minblocks {mb} ({regs}): "
                      f"{ms:.3f} ms {flops / ms / 1e9:.1f} TF/s  max rel diff {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  determ. dq {tile} minblocks {mb}: FAILED {str(e)[:300]}", flush=True)
        tiles._BWD_SIMT_FIRST.update(saved)

    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        tq, tk, tv, tdo = (torch.as_tensor(x, device="cuda").requires_grad_(True) for x in (q, k, v, do))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)

            def tb():
                torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True)
            tb()
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ts = []
            for _ in range(10):
                ev[0].record(); tb(); ev[1].record(); torch.cuda.synchronize()
                ts.append(ev[0].elapsed_time(ev[1]))
            ms = float(numpy.median(ts))
            print(f"  torch SDPA EFFICIENT bwd: {ms:.3f} ms {flops / ms / 1e9:.1f} TF/s")
    except Exception as e:  # noqa: BLE001
        print(f"  torch SDPA: {str(e)[:200]}")


def dataclass_replace(variant, **kw):
    import dataclasses
    return dataclasses.replace(variant, **kw)


if __name__ == "__main__":
    main()
