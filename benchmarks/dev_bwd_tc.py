"""Dev timing of the tensor-core backward (bwd_delta, bwd_dkdv_tc, bwd_dq_tc / bwd_dq_convert):
the whole cuflash.attention_backward call and each kernel launch (CUDA events around
plan._Plan._run), optionally with extra -D options per config, or with other bwd_dkdv_tc sources
(an earlier version kept outside cuda_src/, compiled against today's headers) for A/B timing.

    python benchmarks/dev_bwd_tc.py [--defines "-DX=1;-DY=2|-DX=2"] [--dkdv-source "|old.cu"] [--d 128] [--L 16384]
"""
from __future__ import annotations

import argparse
import collections
import statistics

import cupy
import numpy

import cuflash
from cuflash._gpu import kernels, plan

parser = argparse.ArgumentParser()
parser.add_argument("--defines", default="", help="';'-separated NVRTC -D options per config, '|' between configs")
parser.add_argument("--d", type=int, default=128)
parser.add_argument("--L", default="16384")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--causal", default="0,1")
parser.add_argument("--dkdv-source", default="", help="'|'-separated bwd_dkdv_tc sources; empty = cuda_src's")
parser.add_argument("--tile", default="", help="block_m,block_n,warps[,stages] of bwd_dkdv_tc for --d (default: tiles.py)")
parser.add_argument("--kernel", default="", help="'tc': bwd_dkdv_tc even where bwd_dkdv_wgmma would run")
args = parser.parse_args()
if args.tile:
    from cuflash._gpu import tiles

    bm, bn, w, *stages = map(int, args.tile.split(","))
    tiles._BWD_DKDV_TC_TABLE[args.d] = ((bm, bn, w, stages[0] if stages else 2),)
    if args.d in tiles._BWD_DKDV_WGMMA_TABLE:
        tiles._BWD_DKDV_WGMMA_TABLE[args.d] = (bm, bn, w, stages[0] if stages else 2)
if args.kernel == "tc":  # the mma.sync kernel on sm_90a too (A/B against wgmma)
    from cuflash._gpu import tiles

    tiles._BWD_DKDV_WGMMA_TABLE.clear()

base_options = kernels.compile_options
base_source = kernels.kernel_source
times = collections.defaultdict(list)
orig_run = plan._Plan._run


def timed_run(self, memory, pointers):
    # One timing per plan: the backward's three launches together (delta, dK/dV, dQ).
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    orig_run(self, memory, pointers)
    stop.record()
    times[type(self).__name__].append((start, stop))


plan._Plan._run = timed_run
import ml_dtypes  # noqa: E402

np_dtype = numpy.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else numpy.dtype(args.dtype)

def source_for(path):
    def kernel_source(variant):
        if path and variant.kernel.startswith("bwd_dkdv_"):
            return open(path).read()
        return base_source(variant)
    return kernel_source


for source, config in ((s, c) for s in args.dkdv_source.split("|") for c in args.defines.split("|")):
    defines = tuple(x for x in config.split(";") if x)
    kernels.compile_options = lambda v, d=defines: base_options(v) + d
    kernels.kernel_source = source_for(source)
    plan.forget()
    for L in map(int, args.L.split(",")):
        for causal in (bool(int(c)) for c in args.causal.split(",")):
            H = 2048 // args.d
            B = max(1, 16384 // L)
            rng = numpy.random.default_rng(0)
            q, k, v, dout = (cupy.asarray(rng.standard_normal((B, H, L, args.d)).astype(np_dtype)) for _ in range(4))
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            flops = 2.5 * 4 * B * H * L * L * args.d * (0.5 if causal else 1.0)
            for det in (False, True):
                for _ in range(2):
                    cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=det)
                times.clear()
                total = []
                for _ in range(10):
                    s, e = cupy.cuda.Event(), cupy.cuda.Event()
                    s.record()
                    cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=det)
                    e.record()
                    e.synchronize()
                    total.append(cupy.cuda.get_elapsed_time(s, e))
                per = {name: statistics.median(cupy.cuda.get_elapsed_time(a, b) for a, b in ev) for name, ev in times.items()}
                t = statistics.median(total)
                print(f"{(source + ' ' + ' '.join(defines)).strip() or 'default':40s} d{args.d} L{L} causal={int(causal)} det={int(det)}: "
                      f"total {t:.3f} ms = {flops / t / 1e9:.0f} TF/s; "
                      + ", ".join(f"{n} {ms:.3f} ms ({flops / ms / 1e9:.0f} TF/s-equiv)" for n, ms in per.items()),
                      flush=True)
