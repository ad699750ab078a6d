"""Tile candidates of the fp16/bf16 forward (fwd_tc, or fwd_wgmma for candidates written "wg<tile>")
against torch SDPA FLASH_ATTENTION, one process.

For each case (FA2 paper shapes: B*L = 16384 tokens, H*D = 2048), times SDPA-FA2 and cuflash with
each (block_m, block_n, warps, stages) candidate forced into tiles._TC_TABLE, on the same inputs
(torch tensors seen by CuPy zero-copy), CUDA events, median of --reps after warm-up. Each cuflash
output is compared with SDPA's (a fast wrong kernel shows up as a large error).

    python benchmarks/dev_fwd_tc.py --cands "128:128,32,4,2;wg128,128,8,2" --seqlen 1k,4k,16k
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cands", required=True, help="d:m,n,w,s;m,n,w,s|d:... candidates per head dim")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--seqlen", default="1k,4k,16k")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed region")
    ap.add_argument("--old-src", default="", help="cuda_src copies, comma-separated: time the first candidate with each too")
    ap.add_argument("--old-cand", default="", help="the candidate for the --old-src copies (default: the first), e.g. wg128,128,8,2")
    args = ap.parse_args()

    import cupy
    import ml_dtypes  # bfloat16 for NumPy / CuPy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash._gpu import kernels, plan, tiles

    new_src = kernels.source_dir()

    def use_source(path) -> None:
        kernels.source_dir = lambda: Path(path)
        kernels.source_digest.cache_clear()
        plan.forget()

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    cands = {}
    for part in args.cands.split("|"):
        d, rest = part.split(":")
        cands[int(d)] = [(c.startswith("wg"),) + tuple(int(x) for x in c.removeprefix("wg").split(",")) for c in rest.split(";")]
    seqlens = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.seqlen.split(",")]

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(args.inner):  # back to back: host overhead hides behind the GPU
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / args.inner)
        return statistics.median(times)

    rows = []
    for dname in args.dtype.split(","):
        dt = dtypes[dname]
        for d, clist in cands.items():
            for causal in (c == "1" for c in args.causal.split(",")):
                for L in seqlens:
                    B, H = 16384 // L, 2048 // d
                    torch.manual_seed(0)
                    q, k, v = (torch.randn(B, H, L, d, device="cuda", dtype=dt) for _ in range(3))
                    flops = 4 * B * H * L * L * d * (0.5 if causal else 1.0)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        t_ref = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    # Zero-copy views through int16 (torch and CuPy spell bfloat16 differently).
                    cdt = ml_dtypes.bfloat16 if dt == torch.bfloat16 else cupy.float16
                    cq, ck, cv = (cupy.asarray(x.view(torch.int16)).view(cdt) for x in (q, k, v))
                    line = [f"{dname} d{d} {'causal' if causal else 'dense '} L{L:>5}", f"sdpa {flops / t_ref / 1e9:6.1f}"]
                    olds = [x for x in args.old_src.split(",") if x]
                    old_cand = clist[0]
                    if args.old_cand:
                        old_cand = (args.old_cand.startswith("wg"),) + tuple(int(x) for x in args.old_cand.removeprefix("wg").split(","))
                    for tag, cand in [(o, old_cand) for o in olds] + [("", c) for c in clist]:
                        use_source(tag or new_src)
                        tag = Path(tag).name + ":" if tag else ""
                        wgmma, cand = cand[0], cand[1:]
                        tiles._FWD_WGMMA_TABLE.pop(d, None)
                        if wgmma:
                            tiles._FWD_WGMMA_TABLE[d] = ((math.inf, cand),)
                        else:
                            tiles._TC_TABLE[d] = (cand,)
                        out = cuflash.attention(cq, ck, cv, causal=causal)
                        err = float((torch.as_tensor(out.view(cupy.int16), device="cuda").view(dt).float() - ref.float()).abs().max())
                        t = timed(lambda: cuflash.attention(cq, ck, cv, causal=causal))
                        line.append(f"{tag}{'wg' if wgmma else ''}{cand[0]}x{cand[1]}w{cand[2]}s{cand[3]} {flops / t / 1e9:6.1f} ({t_ref / t:4.2f}x, err {err:.1e})")
                    print(" | ".join(line), flush=True)
                    rows.append(line)
                    del q, k, v, cq, ck, cv, ref
    print("\nSUMMARY (TFLOP/s, ratio vs sdpa_flash)")
    for line in rows:
        print(" | ".join(line))


if __name__ == "__main__":
    main()
