"""compute-sanitizer over every kernel family: memcheck, racecheck, synccheck and initcheck.

Each case (``CASES`` below: a dict) is one forward and, unless it says otherwise, one backward
of cuflash on the GPU, with its result checked against the CPU backend. The driver runs every
case once without a sanitizer (which also compiles every kernel into CuPy's disk cache, so no
NVRTC runs under a tool), then, for each tool, every case in its own child process::

    compute-sanitizer --tool TOOL --error-exitcode 1 python benchmarks/sanitize.py --child CASE

and writes ``DIR/sanitize.json`` (errors and hazards per tool and case, exit codes, the child's
own verdict and the kernels it loaded, times, the logs' paths, the first reports of any failure,
and ``coverage``: the cuda_src/ kernels some case loaded and those none did) and
``DIR/logs/<tool>/<case>.log``, also packed as ``DIR/logs.tar.gz``. Before the cases, each
tool runs once on a planted bug of its kind (an out-of-bounds write, a shared-memory race, a
divergent barrier, a read of unwritten memory) and must report it: proof that the tool works on
this machine, so that "0 errors" means something (a runtime where compute-sanitizer answers
"Device not supported", such as gVisor, stops the run with that message). Each child reports the
kernels it loaded: where one hands shared memory to other warps through mbarriers
(``MBARRIER_HANDOFF_KERNELS``) and racecheck reports hazards on a correct mbarrier ring
(``MBARRIER_PROBE``, asked then), that case is "unjudged" by racecheck if racecheck reported
anything on it (a clean report judges: the blind spot only adds reports). The exit status is 0
when every tool found its planted bug and reports 0 errors on every case it judges, and every
child computed the right answer.

    python benchmarks/sanitize.py --out DIR [--tools memcheck,racecheck,synccheck,initcheck]
                                  [--quick] [--cases REGEX] [--jobs N] [--timeout S]
    python benchmarks/sanitize.py --list [--quick]          # the cases, no GPU needed

The children run with CuPy's memory pool off (``cupy.cuda.set_allocator(None)``): every array
is its own cudaMalloc, so memcheck sees an access past the end of any of them (inside a pool
chunk it would land in another array's memory unnoticed) and initcheck sees fresh memory.

Adding a case for a new feature: append a dict to ``CASES`` (or a line to ``_feature_cases``).
Keys (all but ``name`` optional):

- ``dtype``: float16, bfloat16, float32, float64;
- ``q``, ``k``, ``v``: shapes ``(..., L, D)`` (``v`` defaults to k's shape);
- ``layout``: "bhld" (as given) or "blhd": the arrays are made ``(B, L, H, D)`` and passed as
  transposed views (strided, no copy);
- ``options``: keyword arguments of ``cuflash.attention`` / ``attention_backward`` (causal,
  window, scale, softcap, precision; ``alibi_slopes``/``sinks`` given as "heads" draw one value
  per head; ``bias`` and ``mask`` given as a shape draw a float bias / a boolean mask of that
  shape, a mask whose name ends in "padding" keeps a prefix of keys per batch row);
- ``backward`` (True), ``deterministic`` (False);
- ``api``: "dense", "varlen" (``lengths_q``/``lengths_k``: packed sequences), "merge"
  (merge_attention of two halves of the keys) or "kvcache" (attention_with_kvcache: ``heads``,
  ``d``, ``lq``, ``lmax``, ``seqlens``, ``lnew``, ``page_size`` (None: contiguous),
  ``num_splits``; the caches after the append are compared too);
- ``tolerance``: the error allowed relative to the result's size, when not the dtype's
  (``TOLERANCE``; e.g. precision="tf32");
- ``dbias_on_chip``: a shared bias's gradient summed on chip (bwd_dbias_tc) at any size
  (plan.ON_CHIP_DBIAS_MIN_BYTES set to 0 in the child);
- ``dkv_split``: a GQA group's query heads per dK/dV block, forced in the child
  (plan._heads_per_block and _heads_per_block_adding return it): unless ``deterministic``, the
  blocks of a split group add into sums in the accumulation type (bwd_wgmma.cuh's add_dk_dv,
  bwd_dkdv_tc's add_rows, bwd_simt.cuh's store_or_add);
- ``quick``: part of ``--quick``;

A case whose feature the GPU path does not take yet (NotImplementedError, or an API that is
missing) reports "unsupported" and counts as no error: it starts being sanitized the day the
feature lands.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# Extra command-line options per tool (the defaults are what each tool checks by default).
TOOL_OPTIONS = {
    "memcheck": ("--check-device-heap", "yes"),
    "racecheck": ("--racecheck-report", "all"),
    "synccheck": (),
    "initcheck": (),
}
CHILD_EXIT_MISMATCH = 3  # the child computed a wrong result (the sanitizer's own error exit is 1)
CHILD_EXIT_CRASH = 2
RESULT_TAG = "SANITIZE_RESULT "

# --- the cases ---------------------------------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32", "float64")
ODD = dict(q=(1, 2, 97, 59), k=(1, 2, 1025, 59))  # Lq = 97, Lk = 1025, D = 59
MASKS = {
    "dense": {},
    "causal": {"causal": True},
    "window": {"window": (64, 16)},
    "causal-window": {"causal": True, "window": (200, 0)},
}


def _core_cases() -> list[dict]:
    cases = []
    for dtype in DTYPES:
        for mask, options in MASKS.items():
            cases.append(dict(name=f"odd-{dtype}-{mask}", dtype=dtype, **ODD, options=options,
                              quick=mask == "causal"))
        cases.append(dict(name=f"lq-gt-lk-{dtype}-causal", dtype=dtype, q=(1, 2, 300, 64), k=(1, 2, 97, 64),
                          options={"causal": True}, quick=dtype == "float32"))
        cases.append(dict(name=f"gqa-{dtype}-causal", dtype=dtype, q=(2, 8, 130, 64), k=(2, 2, 130, 64),
                          options={"causal": True}, quick=dtype == "float16"))
        cases.append(dict(name=f"deterministic-{dtype}-window", dtype=dtype, q=(1, 4, 200, 64), k=(1, 4, 260, 64),
                          options={"window": (32, 32)}, deterministic=True, quick=dtype == "bfloat16"))
    # Head dims across the tile buckets, the Hopper wgmma kernels (d64, d128 in 16-bit) and D != Dv.
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            cases.append(dict(name=f"wgmma-{dtype}-d{d}-causal", dtype=dtype, q=(1, 2, 320, d), k=(1, 2, 320, d),
                              options={"causal": True}, quick=(dtype, d) == ("bfloat16", 128)))
    cases += [
        dict(name="d256-float16", dtype="float16", q=(1, 2, 150, 256), k=(1, 2, 150, 256), options={"causal": True}),
        dict(name="d256-float32", dtype="float32", q=(1, 1, 70, 256), k=(1, 1, 90, 256)),
        dict(name="d256-float64", dtype="float64", q=(1, 1, 70, 256), k=(1, 1, 90, 256), options={"causal": True}),
        dict(name="d1-float32", dtype="float32", q=(1, 2, 33, 1), k=(1, 2, 45, 1)),
        dict(name="d-ne-dv-bfloat16", dtype="bfloat16", q=(1, 2, 100, 64), k=(1, 2, 130, 64), v=(1, 2, 130, 24),
             options={"causal": True}),
        dict(name="mqa-float32", dtype="float32", q=(2, 4, 97, 40), k=(2, 1, 110, 40), options={"window": (20, 0)}),
        dict(name="batch-broadcast-float64", dtype="float64", q=(3, 2, 50, 32), k=(1, 2, 60, 32)),
        # a split GQA group's dK/dV added by the FFMA and DMMA kernels into fp32 / fp64 sums
        dict(name="split-adds-float32-d40-gqa", dtype="float32", q=(2, 8, 97, 40), k=(2, 2, 150, 40),
             options={"causal": True}, dkv_split=1),
        dict(name="split-adds-float64-d64-gqa", dtype="float64", q=(2, 8, 97, 64), k=(2, 2, 150, 64),
             options={"window": (30, 10)}, dkv_split=2),
        dict(name="blhd-views-float16", dtype="float16", q=(2, 3, 97, 64), k=(2, 3, 131, 64), layout="blhd",
             options={"causal": True}, quick=True),
        dict(name="top-left-float32", dtype="float32", q=(1, 2, 97, 32), k=(1, 2, 150, 32),
             options={"causal": "top_left"}),
        dict(name="empty-keys-float16", dtype="float16", q=(1, 2, 40, 64), k=(1, 2, 0, 64)),
        dict(name="forward-only-float32", dtype="float32", q=(1, 2, 1, 64), k=(1, 2, 1025, 64), backward=False),
    ]
    return cases


def _feature_cases() -> list[dict]:
    """Features that land one after another: each case reports "unsupported" until it does."""
    return [
        dict(name="varlen-float16-causal", dtype="float16", api="varlen", heads=(4, 2), d=64,
             lengths_q=[97, 1, 0, 300], lengths_k=[97, 5, 3, 1025], options={"causal": True}, quick=True),
        dict(name="varlen-float32-window", dtype="float32", api="varlen", heads=(2, 2), d=59,
             lengths_q=[50, 7], lengths_k=[80, 7], options={"window": (16, 4)}),
        dict(name="softcap-bfloat16", dtype="bfloat16", **ODD, options={"causal": True, "softcap": 30.0}),
        dict(name="alibi-float16", dtype="float16", q=(1, 4, 97, 64), k=(1, 4, 200, 64),
             options={"causal": True, "alibi_slopes": "heads"}),
        dict(name="sinks-float32", dtype="float32", q=(1, 4, 97, 64), k=(1, 4, 200, 64),
             options={"window": (50, 0), "sinks": "heads"}),
        dict(name="merge-float16", dtype="float16", api="merge", q=(1, 2, 97, 64), k=(1, 2, 1025, 64),
             backward=False),
        # bias and mask: the d32 staged tiles (fwd_tc, bwd_dkdv_tc), dbias (bias_grad.cu), a
        # key-padding mask's cut (key_bounds.cu), the SIMT/DMMA and wider forms
        dict(name="pair-bias-bfloat16-d32", dtype="bfloat16", q=(2, 4, 97, 32), k=(2, 4, 97, 32),
             options={"bias": (1, 4, 97, 97), "mask": (2, 1, 97, 97)}, quick=True),
        dict(name="key-padding-float16-gqa", dtype="float16", q=(2, 4, 130, 64), k=(2, 2, 200, 64),
             options={"causal": True, "mask": "key padding"}),
        dict(name="bias-float32-window", dtype="float32", q=(1, 2, 97, 59), k=(1, 2, 150, 59),
             options={"window": (40, 8), "bias": (97, 150)}),
        dict(name="bias-mask-float64", dtype="float64", q=(2, 2, 61, 40), k=(2, 2, 77, 40),
             options={"bias": (2, 1, 1, 77), "mask": (1, 2, 61, 77)}),
        # float32 "highest" forward in 3xTF32 (Element tc::tf32x3, up to d64: fwd_wgmma on Hopper,
        # fwd_tc elsewhere, where the rows are long enough), GQA, a window
        dict(name="3xtf32-float32-gqa-window", dtype="float32", q=(2, 4, 97, 33), k=(2, 2, 200, 33),
             options={"window": (40, 8)}, quick=True),
        # ... and Hopper's d128 bucket (one warpgroup a block, Q's tiles read by S's MMAs), Lq != Lk,
        # a negative scale (Q negated as it is split)
        dict(name="3xtf32-float32-d80-gqa-window", dtype="float32", q=(2, 4, 97, 80), k=(2, 2, 200, 80),
             options={"window": (50, 10)}, backward=False),
        dict(name="3xtf32-float32-d111-causal", dtype="float32", q=(1, 2, 150, 111), k=(1, 2, 97, 111),
             options={"causal": True, "scale": -0.25}),
        # ... with score modifiers (the masked form's kScoreMods on Hopper): a pair bias and a mask
        # read from global memory at d32, softcap (the library's tanh) and ALiBi at d128
        dict(name="3xtf32-float32-d32-pair-bias", dtype="float32", q=(2, 4, 97, 32), k=(2, 4, 130, 32),
             options={"bias": (1, 4, 97, 130), "mask": (2, 1, 97, 130)}, backward=False),
        dict(name="3xtf32-float32-d128-softcap-alibi", dtype="float32", q=(1, 2, 150, 128), k=(1, 2, 97, 128),
             options={"causal": True, "softcap": 20.0, "alibi_slopes": "heads"}, backward=False),
        # float32 "highest" backward in 3xTF32 on Hopper (bwd_dkdv_wgmma_x3: two warpgroups, the
        # staging tile and the step slots), GQA, a window, dQ by REDs (deterministic-float32-window
        # runs it without dQ)
        dict(name="3xtf32-float32-backward-d64-gqa", dtype="float32", q=(2, 4, 97, 64), k=(2, 2, 200, 64),
             options={"window": (50, 10)}),
        # ... and the dense d33-64 one in bf16x6 (bwd_dkdv_wgmma_x6: three piece tiles an operand,
        # the staging tiles, dS^T's tiles read by both warpgroups), GQA, Lq != Lk both ways
        dict(name="bf16x6-float32-backward-d64-gqa", dtype="float32", q=(2, 4, 97, 64), k=(2, 2, 200, 64)),
        dict(name="bf16x6-float32-backward-d40", dtype="float32", q=(1, 2, 200, 40), k=(1, 2, 97, 40)),
        # ... and d97-128's (bwd_dkdv_wgmma_x6h: two warpgroups, each one half of D, Q and dO through
        # registers, dS stored transposed), GQA with a window, d111 causal with Lq != Lk
        dict(name="bf16x6-float32-backward-d128-gqa", dtype="float32", q=(2, 4, 97, 128), k=(2, 2, 200, 128),
             options={"window": (50, 10)}),
        dict(name="bf16x6-float32-backward-d111-causal", dtype="float32", q=(1, 2, 150, 111), k=(1, 2, 97, 111),
             options={"causal": True}),
        # the deterministic dQ in bf16x6 at d33-64 (bwd_dq_wgmma_x6: a key tile split once into three
        # pieces, two slots), GQA with Lq > Lk, and causal with Lq < Lk
        dict(name="bf16x6-float32-deterministic-d40-gqa", dtype="float32", q=(2, 4, 200, 40), k=(2, 2, 97, 40),
             deterministic=True),
        dict(name="bf16x6-float32-deterministic-d64-causal", dtype="float32", q=(1, 2, 97, 64), k=(1, 2, 150, 64),
             options={"causal": True}, deterministic=True),
        dict(name="bf16x6-float32-deterministic-d111-window", dtype="float32", q=(1, 4, 150, 111), k=(1, 2, 97, 111),
             options={"window": (40, 3)}, deterministic=True),
        dict(name="3xtf32-float32-backward-d27-causal", dtype="float32", q=(1, 3, 150, 27), k=(1, 3, 97, 27),
             options={"causal": True}),
        # float32 on TF32 tensor cores (fwd_tc's tf32 Element), plain and with modifiers
        dict(name="tf32-float32-odd", dtype="float32", **ODD, options={"causal": True, "precision": "tf32"},
             tolerance=2e-2, quick=True),
        dict(name="tf32-float32-bias-d32", dtype="float32", q=(1, 4, 70, 32), k=(1, 2, 90, 32),
             options={"precision": "tf32", "bias": (4, 70, 90), "softcap": 20.0, "sinks": "heads"}, tolerance=2e-2),
        # d128 GQA windowed, and its 32-key modifier tile with Lq > Lk (fwd_tc's TF32 Variants on
        # every arch: session 48 added them for a one-product fwd_wgmma form, since removed)
        dict(name="tf32-float32-d128-gqa-window", dtype="float32", q=(2, 4, 97, 111), k=(2, 2, 200, 111),
             options={"precision": "tf32", "window": (40, 3)}, tolerance=2e-2, backward=False),
        dict(name="tf32-float32-d128-mods", dtype="float32", q=(1, 2, 200, 128), k=(1, 2, 97, 128),
             options={"precision": "tf32", "causal": True, "softcap": 20.0, "alibi_slopes": "heads"}, tolerance=2e-2,
             backward=False),
        # a shared bias's gradient summed on chip (bwd_dbias_tc.cu), and the float32 backward on TF32
        dict(name="dbias-on-chip-bfloat16-d32", dtype="bfloat16", q=(6, 2, 97, 32), k=(6, 2, 130, 32),
             options={"bias": (1, 2, 97, 130), "mask": (6, 1, 97, 130), "causal": True}, dbias_on_chip=True,
             quick=True),
        dict(name="dbias-on-chip-float16-d128-gqa", dtype="float16", q=(3, 4, 70, 128), k=(3, 2, 90, 128),
             options={"bias": (3, 1, 70, 90), "softcap": 10.0, "window": (30, 5)}, dbias_on_chip=True),
        dict(name="tf32-float32-backward-d96", dtype="float32", q=(2, 3, 77, 96), k=(2, 1, 123, 96),
             options={"precision": "tf32", "window": (40, 3)}, deterministic=True, tolerance=2e-2),
        # the float64 backward on the fp64 tensor cores (bwd_dkdv_dmma: 16 keys per warp at d32 with
        # modifiers; bwd_dq_dmma: an odd head dim, Lq > Lk, a window)
        dict(name="dmma-backward-float64-d32-gqa", dtype="float64", q=(2, 4, 97, 32), k=(2, 2, 300, 32),
             options={"causal": True, "softcap": 5.0, "alibi_slopes": "heads"}),
        dict(name="dmma-backward-float64-d111-window", dtype="float64", q=(1, 2, 150, 111), k=(1, 2, 97, 111),
             options={"window": (40, 3)}, deterministic=True),
        # bwd_dkdv_dmma's column slices (d192-d256: two warps on each 8 keys share the block's
        # tiles; the first slice's warps alone store dS for dQ and the bias's gradient)
        dict(name="dmma-backward-float64-d250-slices", dtype="float64", q=(1, 4, 70, 250), k=(1, 2, 90, 250),
             options={"causal": True, "bias": (4, 70, 90)}),
        # the warp-specialized Hopper forward (fwd_wgmma_ws.cu: TMA producer, mbarrier rings,
        # named-barrier ping-pong): three consumers at d64, GQA with a mask at d128, modifiers at
        # d256, a packed batch at d192 (elsewhere these run fwd_wgmma / fwd_tc)
        dict(name="ws-bfloat16-d64-dense", dtype="bfloat16", q=(2, 2, 300, 64), k=(2, 2, 1100, 64), backward=False,
             quick=True),
        dict(name="ws-float16-d128-gqa-causal", dtype="float16", q=(2, 4, 200, 128), k=(2, 2, 333, 128),
             options={"causal": True, "sinks": "heads"}, backward=False),
        dict(name="ws-bfloat16-d256-mods", dtype="bfloat16", q=(1, 2, 130, 256), k=(1, 2, 257, 256),
             options={"softcap": 20.0, "alibi_slopes": "heads", "window": (100, 0)}, backward=False),
        dict(name="ws-bfloat16-d192-varlen", dtype="bfloat16", api="varlen", lengths_q=[130, 0, 1, 200],
             lengths_k=[200, 7, 150, 0], heads=(4, 2), d=192, backward=False),
        # persistent blocks (more tiles than SMs: each block walks several, its two Q buffers and
        # rings reused tile after tile), with sinks and GQA
        dict(name="ws-persistent-bfloat16-d128-gqa-causal", dtype="bfloat16", q=(4, 64, 256, 128),
             k=(4, 8, 256, 128), options={"causal": True, "sinks": "heads"}, backward=False),
        # the warp-specialized dK/dV backward (bwd_dkdv_wgmma_ws.cu: TMA K/V once, Q/dO per step,
        # a warp for lse/delta): GQA causal at d128, a packed batch at d64 (keys past each
        # sequence's end zeroed in shared memory)
        dict(name="ws-bwd-bfloat16-d128-gqa-causal", dtype="bfloat16", q=(2, 4, 200, 128), k=(2, 2, 333, 128),
             options={"causal": True}),
        dict(name="ws-bwd-float16-d64-varlen", dtype="float16", api="varlen", lengths_q=[130, 0, 1, 200],
             lengths_k=[200, 7, 150, 0], heads=(4, 2), d=64),
        # a split GQA group's dK/dV added into fp32 sums (add_dk_dv): staged rows and the copy
        # engine's bulk adds at d128 (the TMA kernel), REDs at an odd width with the maps' twin
        dict(name="ws-bwd-bfloat16-d128-gqa-split-adds", dtype="bfloat16", q=(2, 8, 200, 128), k=(2, 2, 333, 128),
             options={"causal": True}, dkv_split=1),
        dict(name="bwd-float16-d59-mqa-split-adds", dtype="float16", q=(2, 4, 97, 59), k=(2, 1, 257, 59),
             options={"window": (33, 47)}, dkv_split=2),
        # a bias in the score MMA's accumulator (tc::bias_into_scores): fwd_tc / bwd_dkdv_tc from the
        # staged tiles with ALiBi and a mask beside it, bwd_dq_tc (deterministic) and bwd_dkdv_tc at
        # d96 from global memory; a query-broadcast bias's gradient summed per key in
        # bwd_dkdv_wgmma_ws (BwdParams::dbias_keys: shuffles, one store per key)
        dict(name="bias-in-s-bfloat16-d32-alibi-mask", dtype="bfloat16", q=(2, 4, 97, 32), k=(2, 2, 130, 32),
             options={"bias": (1, 4, 97, 130), "mask": (2, 1, 1, 130), "alibi_slopes": "heads", "causal": True},
             deterministic=True),
        dict(name="bias-in-s-float16-d96", dtype="float16", q=(2, 3, 97, 96), k=(2, 3, 200, 96),
             options={"bias": (3, 97, 200), "window": (60, 20)}, deterministic=True),
        dict(name="ws-bwd-bfloat16-d128-key-bias-sums", dtype="bfloat16", q=(2, 4, 200, 128), k=(2, 2, 333, 128),
             options={"bias": (2, 1, 1, 333), "causal": True}),
        # a shared bias plane's gradient by atomic adds (BwdParams::dbias_planes, the default
        # backward): bwd_dkdv_tc's pairs from dS (odd Lk: element by element at the end) and its
        # softcapped bodies, bwd_dkdv_wgmma_ws's per-score adds
        dict(name="bias-adds-float16-d32-softcap-mask", dtype="float16", q=(3, 2, 97, 32), k=(3, 2, 131, 32),
             options={"bias": (1, 2, 97, 131), "mask": (3, 1, 97, 131), "softcap": 20.0}),
        dict(name="ws-bwd-bfloat16-d128-pair-bias-adds", dtype="bfloat16", q=(2, 4, 200, 128), k=(2, 4, 334, 128),
             options={"bias": (4, 200, 334), "causal": True}),
        # short rows (every key in one key tile): bwd_dkdv_tc stores dQ itself (BwdParams::dq_direct),
        # Swin's windows with a shared bias, a mask and GQA; odd Lq and D != Dv
        dict(name="short-rows-dq-bfloat16-d32-bias-mask-gqa", dtype="bfloat16", q=(3, 4, 49, 32), k=(3, 2, 49, 32),
             options={"bias": (1, 4, 49, 49), "mask": (3, 1, 49, 49)}),
        dict(name="short-rows-dq-float16-d96", dtype="float16", q=(2, 3, 97, 96), k=(2, 3, 120, 96)),
        # the split-KV decode kernel (decode_tc.cu + decode_combine) over contiguous and paged caches
        dict(name="decode-bfloat16-paged", dtype="bfloat16", api="kvcache", heads=(8, 2), d=128, lq=1, lmax=320,
             seqlens=[0, 100, 257], lnew=1, page_size=64, num_splits=3, quick=True),
        dict(name="decode-float16-contiguous", dtype="float16", api="kvcache", heads=(4, 4), d=64, lq=5, lmax=1100,
             seqlens=[1000, 33], lnew=5, page_size=None, num_splits=0),
        dict(name="kvcache-float32-paged", dtype="float32", api="kvcache", heads=(4, 1), d=59, lq=3, lmax=96,
             seqlens=[20, 70], lnew=2, page_size=16, num_splits=1),
        # dense calls of a few query rows a head, routed to the decode kernel (decode.dense_reason);
        # their backward runs on the dense kernels from the routed out and lse
        dict(name="dense-decode-bfloat16-gqa-causal", dtype="bfloat16", q=(2, 8, 4, 128), k=(2, 2, 1100, 128),
             options={"causal": True}, quick=True),
        dict(name="dense-decode-float16-mqa-softcap-sinks", dtype="float16", q=(1, 8, 1, 64), k=(1, 1, 777, 64),
             options={"softcap": 20.0, "sinks": "heads"}),
        # attention dropout (the kDropout forms, dropout.cuh; the CPU backend draws the same keep
        # mask, so the check is exact): mma.sync with GQA and the atomic dQ, the Hopper forms where
        # they take the call (d128, contiguous), the FFMA forms (float32 "ieee", float64), a packed
        # batch (each sequence's rows of the mask)
        dict(name="dropout-bfloat16-d64-gqa-causal", dtype="bfloat16", q=(2, 4, 200, 64), k=(2, 2, 333, 64),
             options={"causal": True, "dropout_p": 0.2, "dropout_seed": 2**63 + 12345}, quick=True),
        dict(name="dropout-float16-d128-softcap", dtype="float16", q=(2, 4, 256, 128), k=(2, 4, 300, 128),
             options={"softcap": 30.0, "dropout_p": 0.1, "dropout_seed": 7}, deterministic=True),
        dict(name="dropout-float32-ieee-d59-window", dtype="float32", q=(1, 2, 97, 59), k=(1, 2, 150, 59),
             options={"precision": "ieee", "window": (40, 8), "dropout_p": 0.3, "dropout_seed": 99}),
        dict(name="dropout-float64-d40-bias", dtype="float64", q=(2, 2, 61, 40), k=(2, 2, 77, 40),
             options={"bias": (2, 1, 1, 77), "dropout_p": 0.25, "dropout_seed": 5}, deterministic=True),
        dict(name="dropout-varlen-bfloat16", dtype="bfloat16", api="varlen", heads=(4, 2), d=64,
             lengths_q=[97, 1, 0, 300], lengths_k=[97, 5, 3, 1025],
             options={"causal": True, "dropout_p": 0.15, "dropout_seed": 11}),
    ]


CASES: list[dict] = _core_cases() + _feature_cases()


CASE_KEYS = {"name", "dtype", "q", "k", "v", "layout", "options", "backward", "deterministic", "api", "quick",
             "heads", "d", "lengths_q", "lengths_k", "tolerance", "lq", "lmax", "seqlens", "lnew", "page_size",
             "num_splits", "dbias_on_chip", "dkv_split"}


def check_case(case: dict) -> None:
    """A case dict as the module docstring describes it (a typo in a key would silently test less)."""
    unknown = set(case) - CASE_KEYS
    if unknown:
        raise ValueError(f"case {case.get('name')!r}: unknown keys {sorted(unknown)}")
    if case.get("dtype") not in DTYPES:
        raise ValueError(f"case {case.get('name')!r}: dtype must be one of {DTYPES}")
    api = case.get("api", "dense")
    needed = {"dense": ("q", "k"), "merge": ("q", "k"), "varlen": ("heads", "d", "lengths_q", "lengths_k"),
              "kvcache": ("heads", "d", "lq", "lmax", "seqlens", "lnew", "page_size", "num_splits")}[api]
    missing = [key for key in needed if key not in case]
    if missing:
        raise ValueError(f"case {case['name']!r} ({api}): missing {missing}")
    if case.get("layout", "bhld") not in ("bhld", "blhd"):
        raise ValueError(f"case {case['name']!r}: layout must be 'bhld' or 'blhd'")


def select_cases(quick: bool, pattern: str | None) -> list[dict]:
    for case in CASES:
        check_case(case)
    cases = [c for c in CASES if c.get("quick")] if quick else list(CASES)
    if pattern:
        cases = [c for c in cases if re.search(pattern, c["name"])]
    names = [c["name"] for c in CASES]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"duplicate case names: {sorted(duplicates)}")
    return cases


def case_by_name(name: str) -> dict:
    for case in CASES:
        if case["name"] == name:
            return case
    raise SystemExit(f"no case named {name!r}; --list shows them")


# --- the child: one case, on the GPU ----------------------------------------------------------------

TOLERANCE = {"float16": 2e-2, "bfloat16": 8e-2, "float32": 1e-4, "float64": 1e-9}


def run_case(case: dict) -> dict:
    """Run ``case`` on the GPU and check it against the CPU backend; the verdict as a dict."""
    import numpy

    import cupy
    import cuflash

    cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: see the module docstring
    cupy.cuda.set_pinned_memory_allocator(None)
    if case["dtype"] == "bfloat16":
        import ml_dtypes

        dtype = numpy.dtype(ml_dtypes.bfloat16)
    else:
        dtype = numpy.dtype(case["dtype"])
    rng = numpy.random.default_rng(sum(map(ord, case["name"])))
    api = case.get("api", "dense")
    if case.get("dbias_on_chip"):
        from cuflash._gpu import plan

        plan.ON_CHIP_DBIAS_MIN_BYTES = 0
    if case.get("dkv_split"):
        from cuflash._gpu import plan

        plan._heads_per_block = plan._heads_per_block_adding = lambda group, rows, tiles, **_: case["dkv_split"]
    try:
        if api == "varlen":
            results, expected = _run_varlen(case, rng, dtype, cupy, cuflash)
        elif api == "merge":
            results, expected = _run_merge(case, rng, dtype, cupy, cuflash)
        elif api == "kvcache":
            results, expected = _run_kvcache(case, rng, dtype, cupy, cuflash)
        else:
            results, expected = _run_dense(case, rng, dtype, cupy, cuflash)
    except NotImplementedError as error:
        return {"status": "unsupported", "detail": str(error)[:300]}
    except AttributeError as error:
        if "cuflash" in str(error):  # an entry point that does not exist yet
            return {"status": "unsupported", "detail": str(error)[:300]}
        raise
    cupy.cuda.Device().synchronize()
    worst = {}
    tolerance = case.get("tolerance", TOLERANCE[case["dtype"]])
    for name, (got, want) in zip(_result_names(case), zip(results, expected)):
        if got is None:
            continue
        got = cupy.asnumpy(got).astype(numpy.float64)
        want = numpy.asarray(want, numpy.float64)
        if got.shape != want.shape:
            return {"status": "mismatch", "detail": f"{name}: shape {got.shape}, expected {want.shape}"}
        same_inf = numpy.array_equal(numpy.isinf(got), numpy.isinf(want)) and (got[numpy.isinf(got)] ==
                                                                                  want[numpy.isinf(want)]).all()
        finite = numpy.isfinite(want)
        if numpy.isnan(got).any() or not same_inf:
            return {"status": "mismatch", "detail": f"{name}: NaN or infinities where the CPU backend has none"}
        error = float(numpy.abs(got[finite] - want[finite]).max(initial=0.0))
        size = max(1.0, float(numpy.abs(want[finite]).max(initial=0.0)))
        worst[name] = error / size
        if error > tolerance * size:
            return {"status": "mismatch", "detail": f"{name}: max error {error:.3e} (size {size:.3e})",
                    "errors": worst}
    return {"status": "ok", "errors": worst}


def _draw(rng, shape, dtype):
    import numpy

    return rng.standard_normal(shape).astype(numpy.float32).astype(dtype)


def _result_names(case) -> tuple[str, ...]:
    """The names of a case's results, in the order its runner returns them."""
    api = case.get("api", "dense")
    if api == "kvcache":
        return ("out", "k_cache", "v_cache")
    if api == "merge" or not case.get("backward", True):
        return ("out", "lse")
    options = case.get("options", {})
    return ("out", "lse", "dq", "dk", "dv") + (("dbias",) if "bias" in options else ()) + (
        ("dsinks",) if "sinks" in options else ())


def _options(case, rng, dtype, lead, q_len, k_len, cupy):
    """The case's options with their arrays drawn: "heads" per-head values, a bias (float32 for
    16-bit inputs) or a mask of the given shape, a key-padding mask ("... padding": batch row b
    keeps a prefix of the keys, at least one): (GPU options, CPU options)."""
    import numpy

    gpu, cpu = {}, {}
    for key, value in case.get("options", {}).items():
        host = None
        if value == "heads":
            host = (rng.uniform(0.05, 0.5, lead[-1:]) if key == "alibi_slopes"
                    else rng.standard_normal(lead[-1:])).astype(dtype)
        elif key == "bias":
            host = rng.standard_normal(value).astype(numpy.float32 if dtype.itemsize == 2 else dtype)
        elif key == "mask" and isinstance(value, str) and value.endswith("padding"):
            kept = rng.integers(1, k_len + 1, lead[0])
            host = (numpy.arange(k_len) < kept[:, None]).reshape(lead[0], 1, 1, k_len)
        elif key == "mask":
            host = rng.random(value) > 0.25
        if host is None:
            gpu[key] = cpu[key] = value
        else:
            gpu[key], cpu[key] = cupy.asarray(host), host
    return gpu, cpu


def _run_dense(case, rng, dtype, cupy, cuflash):
    q_shape, k_shape = case["q"], case["k"]
    v_shape = case.get("v", k_shape)
    host = [_draw(rng, s, dtype) for s in (q_shape, k_shape, v_shape)]
    lead = tuple(max(a, b) for a, b in zip(q_shape[:-2], k_shape[:-2]))
    out_shape = lead + (q_shape[-2], v_shape[-1])
    dout_host = _draw(rng, out_shape, dtype)
    if case.get("layout") == "blhd":  # (B, L, H, D) memory, passed as (B, H, L, D) views
        device = [cupy.asarray(numpy_swap(x)).transpose(0, 2, 1, 3) for x in host]
    else:
        device = [cupy.asarray(x) for x in host]
    gpu_opts, cpu_opts = _options(case, rng, dtype, lead, q_shape[-2], k_shape[-2], cupy)
    deterministic = bool(case.get("deterministic", False))
    out, lse = cuflash.attention(*device, return_lse=True, **gpu_opts)
    want_out, want_lse = cuflash.attention(*host, return_lse=True, **cpu_opts)
    results, expected = [out, lse], [want_out, want_lse]
    if case.get("backward", True):
        grads = cuflash.attention_backward(cupy.asarray(dout_host), *device, out, lse, deterministic=deterministic,
                                           **gpu_opts)
        want = cuflash.attention_backward(dout_host, *host, want_out, want_lse, **cpu_opts)
        results += list(grads)
        expected += list(want)
    return results, expected


def numpy_swap(x):
    """(B, H, L, D) values laid out as (B, L, H, D) memory."""
    import numpy

    return numpy.ascontiguousarray(x.transpose(0, 2, 1, 3))


def _run_varlen(case, rng, dtype, cupy, cuflash):
    import numpy

    heads_q, heads_k = case["heads"]
    d = case["d"]
    lengths_q, lengths_k = case["lengths_q"], case["lengths_k"]
    host = [_draw(rng, (sum(lengths_q), heads_q, d), dtype), _draw(rng, (sum(lengths_k), heads_k, d), dtype),
            _draw(rng, (sum(lengths_k), heads_k, d), dtype)]
    cu = [numpy.concatenate([[0], numpy.cumsum(n)]).astype(numpy.int32) for n in (lengths_q, lengths_k)]
    dout_host = _draw(rng, host[0].shape, dtype)
    device = [cupy.asarray(x) for x in host + cu]
    options = case.get("options", {})
    out, lse = cuflash.attention_varlen(*device, return_lse=True, **options)
    want_out, want_lse = cuflash.attention_varlen(*host, *cu, return_lse=True, **options)
    results, expected = [out, lse], [want_out, want_lse]
    if case.get("backward", True):
        results += list(cuflash.attention_varlen_backward(cupy.asarray(dout_host), *device[:3], out, lse, *device[3:],
                                                          **options))
        expected += list(cuflash.attention_varlen_backward(dout_host, *host, want_out, want_lse, *cu, **options))
    return results, expected


def _run_merge(case, rng, dtype, cupy, cuflash):
    merge = getattr(cuflash, "merge_attention")  # AttributeError until it exists: "unsupported"
    q, k, v = (_draw(rng, s, dtype) for s in (case["q"], case["k"], case["k"]))
    half = k.shape[-2] // 2
    device = [cupy.asarray(x) for x in (q, k, v)]
    parts = [cuflash.attention(device[0], device[1][..., keys, :], device[2][..., keys, :], return_lse=True)
             for keys in (slice(0, half), slice(half, None))]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    want_out, want_lse = cuflash.attention(q, k, v, return_lse=True)
    return [out, lse], [want_out, want_lse]


def _run_kvcache(case, rng, dtype, cupy, cuflash):
    """attention_with_kvcache on the GPU and the CPU backend from the same caches: out, and both
    caches after the in-place append (contiguous, or pages in a shuffled block table)."""
    import numpy

    heads_q, heads_k = case["heads"]
    d, lq, lmax, lnew, page = case["d"], case["lq"], case["lmax"], case["lnew"], case["page_size"]
    seqlens = numpy.array(case["seqlens"], dtype=numpy.int32)
    batch = len(seqlens)
    q = _draw(rng, (batch, heads_q, lq, d), dtype)
    new = [_draw(rng, (batch, heads_k, lnew, d), dtype) for _ in range(2)] if lnew else [None, None]
    if page is None:
        caches = [_draw(rng, (batch, heads_k, lmax, d), dtype) for _ in range(2)]
        table = None
    else:
        per_sequence = -(-lmax // page)
        caches = [_draw(rng, (batch * per_sequence, heads_k, page, d), dtype) for _ in range(2)]
        table = rng.permutation(batch * per_sequence).astype(numpy.int32).reshape(batch, per_sequence)
    options = dict(causal=True, num_splits=case["num_splits"])
    host_caches = [c.copy() for c in caches]  # before either call appends to its caches
    device_caches = [cupy.asarray(c) for c in caches]
    out = cuflash.attention_with_kvcache(
        cupy.asarray(q), *device_caches, k=None if new[0] is None else cupy.asarray(new[0]),
        v=None if new[1] is None else cupy.asarray(new[1]), cache_seqlens=cupy.asarray(seqlens),
        block_table=None if table is None else cupy.asarray(table), **options)
    want = cuflash.attention_with_kvcache(q, *host_caches, k=new[0], v=new[1], cache_seqlens=seqlens,
                                         block_table=table, **options)
    return [out, *device_caches], [want, *host_caches]


# One planted bug per tool: a run that finds it shows the tool works on this machine, so that
# "0 errors" on the cases means something.
PLANTED = {
    "memcheck": r'''extern "C" __global__ void planted(float* x, int n) { x[n + threadIdx.x] = 1.0f; }''',
    # Each thread reads what a thread of the other warp wrote, with no barrier between (a single
    # shared scalar written and read back by its own thread is folded away by the compiler).
    "racecheck": r'''extern "C" __global__ void planted(float* x, int n) {
        __shared__ float s[64]; s[threadIdx.x] = threadIdx.x; x[threadIdx.x] = s[(threadIdx.x + 32) % 64]; }''',
    "synccheck": r'''extern "C" __global__ void planted(float* x, int n) {
        if (threadIdx.x < 16) __syncthreads(); x[threadIdx.x] = 1.0f; }''',
    "initcheck": r'''extern "C" __global__ void planted(float* x, int n) { x[threadIdx.x] = x[n + threadIdx.x] + 1.0f; }''',
}


# Not a bug: a correct two-slot ring handed over through mbarriers, as the warp-specialized
# kernels hand over their plain shared-memory stores (bwd_dkdv_wgmma_ws's lse/delta): a producer
# warp stores and arrives on "full", the consumer warp waits, reads, and releases the slot on
# "empty" (ptx::mbarrier_arrive_warp). A racecheck that reports hazards here does not model
# mbarrier ordering (measured 2026-12-01 on an H200: 744-1700 hazards on this correct ring, as
# many as with the release moved before the read), so it cannot judge a case whose child loaded
# a kernel that hands over its stores so (MBARRIER_HANDOFF_KERNELS, read from the child's
# verdict): such a case is reported as unjudged by racecheck, not as passing or failing. (Session
# 45 took the hazards of two dropout cases on bwd_dkdv_wgmma_ws for a finding: they had not
# been marked by hand, as the other cases on that kernel were.)
MBARRIER_PROBE = "probe-mbarrier-ring"
MBARRIER_HANDOFF_KERNELS = frozenset({"bwd_dkdv_wgmma_ws"})
MBARRIER_RING = r'''
#include "ptx.cuh"
extern "C" __global__ void planted(float* x, int n) {
    using namespace cuflash;
    __shared__ float ring[2][32];
    __shared__ alignas(8) unsigned long long bars[4];  // full[2], empty[2]
    const unsigned full = ptx::smem_addr(&bars[0]), empty = ptx::smem_addr(&bars[2]);
    const int lane = threadIdx.x % 32;
    if (threadIdx.x == 0)
        for (int s = 0; s < 2; ++s) { ptx::mbarrier_init(full + 8 * s, 32); ptx::mbarrier_init(empty + 8 * s, 1); }
    __syncthreads();
    float sum = 0.f;
    for (int t = 0; t < 8; ++t) {
        const int s = t % 2;
        if (threadIdx.x < 32) {
            if (t >= 2) ptx::mbarrier_wait(empty + 8 * s, ((t / 2) & 1) ^ 1);
            ptx::st_shared_b32(ptx::smem_addr(&ring[s][lane]), __float_as_uint(float(t + lane)));
            ptx::mbarrier_arrive(full + 8 * s);
        } else {
            ptx::mbarrier_wait(full + 8 * s, (t / 2) & 1);
            sum += __uint_as_float(ptx::ld_shared_b32(ptx::smem_addr(&ring[s][(lane + 1) % 32])));
            ptx::mbarrier_arrive_warp(empty + 8 * s);
        }
    }
    if (threadIdx.x >= 32) x[lane] = sum;
}'''


def run_mbarrier_ring() -> dict:
    import cupy
    import numpy

    cupy.cuda.set_allocator(None)
    if cupy.cuda.Device().compute_capability < "90":
        return {"status": "unsupported", "detail": "mbarrier waits need compute capability 9.0"}
    options = ("-std=c++17", "-arch=sm_90a", f"-I{REPO_ROOT / 'cuda_src'}")
    kernel = cupy.RawModule(code=MBARRIER_RING, options=options).get_function("planted")
    x = cupy.zeros(32, dtype=cupy.float32)
    kernel((1,), (64,), (x, cupy.int32(32)))
    expected = [sum(t + (lane + 1) % 32 for t in range(8)) for lane in range(32)]
    if not numpy.array_equal(cupy.asnumpy(x), numpy.asarray(expected, dtype=numpy.float32)):
        return {"status": "mismatch", "detail": "the mbarrier ring computed a wrong sum"}
    return {"status": "ok", "detail": "a correct mbarrier ring ran"}


def run_planted(tool: str) -> dict:
    import cupy

    cupy.cuda.set_allocator(None)
    kernel = cupy.RawKernel(PLANTED[tool], "planted")
    n = 64
    x = cupy.empty(2 * n if tool == "initcheck" else n, dtype=cupy.float32)  # initcheck: the upper half unwritten
    kernel((1,), (n,), (x, cupy.int32(n)))
    cupy.cuda.Device().synchronize()
    return {"status": "ok", "detail": f"planted {tool} bug launched"}


def child_main(name: str) -> int:
    planted = name.startswith("planted-") or name == MBARRIER_PROBE
    case = None if planted else case_by_name(name)
    start = time.perf_counter()
    try:
        if name == MBARRIER_PROBE:
            verdict = run_mbarrier_ring()
        else:
            verdict = run_planted(name[len("planted-"):]) if planted else run_case(case)
    except Exception as error:  # reported, and a distinct exit status
        import traceback

        traceback.print_exc()
        verdict = {"status": "crash", "detail": f"{type(error).__name__}: {error}"[:500]}
    if not planted:
        from cuflash._gpu import kernels

        verdict["kernels"] = kernels.loaded()
    verdict["seconds"] = round(time.perf_counter() - start, 3)
    print(RESULT_TAG + json.dumps(verdict), flush=True)
    return {"ok": 0, "unsupported": 0, "mismatch": CHILD_EXIT_MISMATCH}.get(verdict["status"], CHILD_EXIT_CRASH)


# --- the driver --------------------------------------------------------------------------------------

ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s+\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")


def parse_log(text: str) -> dict:
    """What a sanitizer run reported: errors (None: no summary line, the run did not finish),
    racecheck's hazards, and the child's verdict."""
    summary = ERROR_SUMMARY.findall(text)
    parsed = {"errors": int(summary[-1]) if summary else None}
    race = RACECHECK_SUMMARY.findall(text)
    if race:
        hazards, errors, warnings = map(int, race[-1])
        parsed.update(hazards=hazards, race_errors=errors, race_warnings=warnings)
        if parsed["errors"] is None:  # racecheck prints its own summary line and no ERROR SUMMARY
            parsed["errors"] = errors
    parsed["device_refused"] = "Device not supported" in text  # e.g. under gVisor: no sanitizer at all
    verdicts = [line[len(RESULT_TAG):] for line in text.splitlines() if line.startswith(RESULT_TAG)]
    parsed["child"] = json.loads(verdicts[-1]) if verdicts else None
    return parsed


def find_sanitizer(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else []
    candidates.append(shutil.which("compute-sanitizer"))
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "compute-sanitizer"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def child_command(name: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name]


def sanitizer_command(sanitizer: str, tool: str, name: str) -> list[str]:
    return [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "200", *TOOL_OPTIONS[tool],
            *child_command(name)]


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_one(command: list[str], log: Path, timeout: float) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        try:
            rc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO_ROOT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    result = parse_log(text)
    result.update(rc=rc, seconds=round(time.perf_counter() - start, 1), log=str(log))
    if rc != 0 or result["errors"]:
        result["excerpt"] = excerpt(text)
    return result


def excerpt(text: str, limit: int = 60) -> list[str]:
    """The sanitizer's first reports (lines it marks with '=========') and the child's last lines:
    enough to act on when only the JSON comes back."""
    marked = [line for line in text.splitlines() if line.startswith("=========") and line.strip("= ")]
    tail = [line for line in text.splitlines()[-20:] if not line.startswith("=========")]
    return marked[:limit] + ["..."] + tail


def hands_over_by_mbarrier(result: dict) -> bool:
    """Whether the run's child loaded a kernel that hands plain shared-memory stores to other
    warps through mbarriers (MBARRIER_HANDOFF_KERNELS)."""
    return bool(MBARRIER_HANDOFF_KERNELS.intersection((result.get("child") or {}).get("kernels", ())))


def coverage(runs: dict) -> dict:
    """Which of cuda_src/'s kernels (one per .cu file: the families and the helper kernels) the
    runs' children loaded, and which none did: "every kernel family" checked, not assumed."""
    loaded = set()
    for result in runs.values():
        loaded.update((result.get("child") or {}).get("kernels", ()))
    families = {path.stem for path in (REPO_ROOT / "cuda_src").glob("*.cu")}
    return {"loaded": sorted(loaded & families), "never_loaded": sorted(families - loaded)}


def reports(result: dict) -> int:
    """How much the tool reported on a run: its errors, and racecheck's errors and hazards."""
    return (result.get("errors") or 0) + result.get("race_errors", 0) + result.get("hazards", 0)


def unjudged(report: dict, tool: str | None, result: dict) -> bool:
    """A run racecheck cannot judge: its case hands shared memory over through mbarriers, the
    probe showed that this racecheck reports hazards on a correct mbarrier ring, and it reported
    some here. A clean report still judges: not modelling mbarriers only adds reports (fewer
    orderings known), so none means none under the true ordering too."""
    return (tool == "racecheck" and hands_over_by_mbarrier(result)
            and (result.get("rc", 0) != 0 or reports(result) > 0)
            and not report.get("racecheck_models_mbarriers", True))


def failed(result: dict, tool: str | None, unjudged_by_tool: bool = False) -> bool:
    """A wrong or crashed child, or (unless the tool cannot judge the case) a tool's report."""
    child = result.get("child") or {}
    if child.get("status") not in ("ok", "unsupported"):
        return True
    if unjudged_by_tool:
        return False
    if tool is None:
        return result["rc"] != 0
    return result["rc"] != 0 or result["errors"] != 0 or result.get("race_errors", 0) != 0


def environment(sanitizer: str | None) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import record

    info = {"date_utc": record.now_utc(), **record.source_commit(), "python": sys.version.split()[0]}
    info["gpu"] = record.command_output("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader")
    info["sanitizer"] = sanitizer
    info["sanitizer_version"] = record.command_output(sanitizer, "--version") if sanitizer else None
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception as error:  # reported, not fatal: the children will say more
        info["cupy"] = f"not importable: {error}"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Cases and how to add one: see the module docstring.")
    parser.add_argument("--out", type=Path, help="directory for sanitize.json and logs/ (required to run)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--quick", action="store_true", help="a small set of cases (one per kernel family)")
    parser.add_argument("--cases", metavar="REGEX", help="only the cases whose name matches")
    parser.add_argument("--jobs", type=int, default=4, help="children under a sanitizer at once (4)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per child (300)")
    parser.add_argument("--sanitizer", help="path of compute-sanitizer (default: PATH, $CUDA_HOME/bin)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the run without a sanitizer")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return child_main(args.child)
    tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    cases = select_cases(args.quick, args.cases)
    if not cases:
        parser.error("no case selected")
    if args.list:
        for case in cases:
            api = case.get("api")
            shapes = (f"lengths {case['lengths_q']}/{case['lengths_k']}" if api == "varlen"
                      else f"heads {case['heads']} d {case['d']} Lq {case['lq']} cache {case['seqlens']} + "
                           f"{case['lnew']} of {case['lmax']}, pages {case['page_size']}" if api == "kvcache"
                      else f"q {case['q']} k {case['k']}" + (f" v {case['v']}" if "v" in case else ""))
            extras = {k: case[k] for k in ("options", "layout", "deterministic", "backward", "api", "dbias_on_chip",
                                           "dkv_split") if k in case}
            print(f"{case['name']:34s} {case['dtype']:9s} {shapes}  {extras}")
        print(f"{len(cases)} cases x {len(tools)} tools")
        return 0
    sanitizer = find_sanitizer(args.sanitizer)
    if args.dry_run:
        for tool in tools:
            for case in cases:
                print(" ".join(sanitizer_command(sanitizer or "compute-sanitizer", tool, case["name"])))
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --list / --dry-run)")
    if sanitizer is None:
        print("compute-sanitizer not found: pass --sanitizer PATH, or put the CUDA toolkit's bin/ on PATH",
              file=sys.stderr)
        return 2

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(sanitizer), "tools": tools, "quick": args.quick,
              "cases": {c["name"]: c for c in cases}, "warmup": {}, "results": {t: {} for t in tools}}
    path = out / "sanitize.json"

    def save():
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    # Each tool must find its planted bug first: proof that it runs here and that 0 errors means something.
    report["selftest"] = {}
    for tool in tools:
        result = run_one(sanitizer_command(sanitizer, tool, f"planted-{tool}"), out / "logs" / "selftest" /
                         f"{tool}.log", args.timeout)
        report["selftest"][tool] = result
        found = reports(result)
        print(f"selftest {tool:10s} planted bug found: {bool(found)} (errors={result['errors']}, rc={result['rc']})",
              flush=True)
        if result["device_refused"] or result["errors"] is None:
            save()
            print(f"{tool} does not run on this machine (see {result['log']}); a machine whose runtime supports "
                  "compute-sanitizer is needed (gVisor answers 'Device not supported')", file=sys.stderr)
            return 2
        if not found:
            report.setdefault("selftest_missed", []).append(tool)
    save()

    if not args.no_warmup:  # no tool: compiles every kernel once and checks every case
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = {c["name"]: pool.submit(run_one, child_command(c["name"]), out / "logs" / "warmup" /
                                           f"{c['name']}.log", args.timeout) for c in cases}
            for name, future in runs.items():
                report["warmup"][name] = result = future.result()
                child = result.get("child") or {}
                print(f"warmup {name:34s} {child.get('status', 'no verdict')} rc={result['rc']}", flush=True)
        print(f"warmup done in {time.perf_counter() - start:.0f} s", flush=True)
        save()
    # Whether racecheck models mbarriers, asked where a case hands shared memory over through them
    # (the warm-up's children say which kernels they loaded; without a warm-up, asked anyway).
    if "racecheck" in tools and (args.no_warmup or any(map(hands_over_by_mbarrier, report["warmup"].values()))):
        result = run_one(sanitizer_command(sanitizer, "racecheck", MBARRIER_PROBE),
                         out / "logs" / "selftest" / "racecheck-mbarrier-ring.log", args.timeout)
        report["selftest"]["racecheck-mbarrier-ring"] = result
        hazards = reports(result)
        if (result.get("child") or {}).get("status") == "ok":
            report["racecheck_models_mbarriers"] = hazards == 0
        print(f"selftest racecheck on a correct mbarrier ring: {hazards} hazards "
              f"(child {(result.get('child') or {}).get('status', 'no verdict')})", flush=True)
        save()
    for tool in tools:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = {c["name"]: pool.submit(run_one, sanitizer_command(sanitizer, tool, c["name"]),
                                           out / "logs" / tool / f"{c['name']}.log", args.timeout) for c in cases}
            for name, future in runs.items():
                report["results"][tool][name] = result = future.result()
                child = result.get("child") or {}
                race = f" hazards={result['hazards']}" if "hazards" in result else ""
                skip = unjudged(report, tool, result)
                flag = "FAIL" if failed(result, tool, skip) else ("unjudged" if skip else "ok")
                print(f"{tool:10s} {name:34s} {flag:4s} errors={result['errors']}{race} rc={result['rc']} "
                      f"child={child.get('status', 'no verdict')} {result['seconds']} s", flush=True)
        report.setdefault("seconds", {})[tool] = round(time.perf_counter() - start, 1)
        save()

    summary = {}
    for tool in tools:
        results = report["results"][tool]
        skipped = {n for n, r in results.items() if unjudged(report, tool, r)}
        summary[tool] = {
            "errors": sum(r["errors"] or 0 for n, r in results.items() if n not in skipped),
            "failed_cases": sorted(n for n, r in results.items() if failed(r, tool, n in skipped)),
            "unjudged_cases": sorted(skipped),
            "unsupported_cases": sorted(n for n, r in results.items()
                                        if (r.get("child") or {}).get("status") == "unsupported"),
        }
    report["summary"] = summary
    report["warmup_failed"] = sorted(n for n, r in report["warmup"].items() if failed(r, None))
    report["coverage"] = coverage(report["warmup"] or next(iter(report["results"].values()), {}))
    save()
    print(json.dumps(summary, indent=1))
    print(f"kernels loaded by the cases: {len(report['coverage']['loaded'])}; never loaded: "
          f"{', '.join(report['coverage']['never_loaded']) or 'none'}")
    if report.get("selftest_missed"):
        print(f"WARNING: these tools did not find their planted bug: {report['selftest_missed']}")
    archive = shutil.make_archive(str(out / "logs"), "gztar", root_dir=out, base_dir="logs")
    print(f"wrote {path} and {archive}")
    bad = (report["warmup_failed"] or report.get("selftest_missed")
           or any(s["failed_cases"] for s in summary.values()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
