"""Tile shapes: the one place that chooses the kernel Variants for a problem.

Each kernel family (one ``cuda_src/<kernel>.cu``) has one ``KernelSpec``: the dtypes and archs
it serves, its candidate tiles in order of preference, the dynamic shared memory a tile needs
(the mirror of the kernel's own ``<kernel>_smem_bytes``, which the kernel checks at entry and
tests/test_pipeline.py compares for every Variant) and any further constraint of its
static_asserts. ``KernelSpec.variant`` is the one select: the first candidate
that fits the arch's shared memory. On top of the specs:

- ``select``: the forward's Variant, from the families that serve a dtype, in order of
  preference (``FORWARD``: wgmma before mma.sync on Hopper, DMMA before SIMT for float64);
- ``select_backward``: the backward's four (``BACKWARD``);
- ``all_variants``: every Variant either can return for an arch (CI compiles each for sm_80 and
  sm_90a and checks that ptxas reports no spills);
- ``shared_memory_bytes``: a Variant's dynamic shared memory, from its family's spec.

The tables and comments below are the per-family data: measured choices (benchmarks/NOTES.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

from .._spec import PRECISIONS
from .variant import Variant

# Head-dim buckets of every family: D and Dv are zero-padded up to the next one.
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
TC_HEAD_DIMS = SIMT_HEAD_DIMS = HEAD_DIMS  # (the names earlier code and scripts use)
MAX_HEAD_DIM = HEAD_DIMS[-1]

TC_DTYPES = ("float16", "bfloat16")
SIMT_DTYPES = ("float32", "float64")
DMMA_DTYPES = ("float64",)
DTYPES = TC_DTYPES + SIMT_DTYPES

Tile = tuple[int, int, int, int]  # block_m, block_n, warps, stages


def bucket(width: int, buckets: tuple[int, ...] = HEAD_DIMS) -> int:
    for b in buckets:
        if width <= b:
            return b
    raise ValueError(f"head dim {width} exceeds the supported maximum {buckets[-1]}")


# Largest dynamic shared memory one block may opt into, by arch.
_SMEM_LIMIT = {"80": 166912, "87": 166912, "90": 232448, "90a": 232448, "100": 232448, "100a": 232448}
_SMEM_LIMIT_DEFAULT = 101376  # sm_86, sm_89, sm_120: 99 KB


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel family: what it serves and how its tile is chosen.

    ``candidates(dtype, head_dim, arch, visible_keys)`` lists tiles best first (empty: the family
    does not serve that bucket or arch); ``shared_memory(dtype, head_dim, block_m, block_n,
    stages)`` is the kernel's dynamic shared memory; ``tile_ok(block_m, block_n, warps)`` the
    kernel's static_asserts on the tile; ``masked`` whether the family has a masked form
    (the memory-bound prep kernels never mask) and score modifiers (softcap, bias, ALiBi, mask:
    the masked form compiled with kScoreMods, at the tile of long rows whatever the mask).
    """

    kernel: str
    dtypes: tuple[str, ...]
    candidates: Callable[[str, int, str, float], tuple[Tile, ...]]
    shared_memory: Callable[[str, int, int, int, int], int]
    tile_ok: Callable[[int, int, int], bool] = lambda block_m, block_n, warps: True
    masked: bool = True
    # (dtype, head-dim bucket) -> the tile of the kScoreMods form where the first candidate's
    # spills (the modifiers' registers on top of the masked form's), else None.
    modifier_tile: Callable[[str, int], Tile | None] = lambda dtype, head_dim: None
    # The kScoreMods form's bias and mask tiles per pipeline stage (dtype, head_dim, block_m,
    # block_n) -> bytes, for families that stage them in shared memory (score_mod.cuh's
    # ScorePlaneStage); None: the planes are read from global memory.
    score_planes: Callable[[str, int, int, int], int] | None = None
    # The float32 precisions (_spec.PRECISIONS) the family computes on TF32 tensor cores (the
    # others: the next family, FFMA); a float32 Variant of such a family carries its precision.
    # Empty: float32 in FFMA, whatever the precision.
    tf32_precisions: tuple[str, ...] = ()
    # float32 under precision="highest" on TF32 tensor cores (3xTF32, tile_tc.cuh's tf32x3; the
    # family lists "highest" in tf32_precisions): (head-dim bucket, arch) -> candidate tiles, best
    # first; none: the next family (FFMA). Calls with short rows or dropout take the next family,
    # and so do calls with score modifiers unless ``split_mods``.
    split_tf32_candidates: Callable[[int, str], tuple[Tile, ...]] = lambda head_dim, arch: ()
    # Whether the float32 "highest" form has a kScoreMods form (softcap, bias, ALiBi, mask on the
    # float32 scores after the 3xTF32 product, as the FFMA kernels apply them).
    split_mods: bool = False
    # Whether the float32 "highest" form serves causal and windowed calls too (else: the next family).
    split_window: bool = True
    # The 3xTF32 form's shared memory (head_dim, block_m, block_n, stages) -> bytes where it is not
    # ``shared_memory``'s for float32 (fwd_wgmma: every operand's lo tiles beside its hi ones).
    split_shared_memory: Callable[[int, int, int, int], int] | None = None
    # The masked form's candidates where they differ from ``candidates`` (same signature), else None.
    masked_candidates: Callable[[str, int, str, float], tuple[Tile, ...]] | None = None
    # The family reads its inputs through tensor maps (TMA): the plan takes it only for calls
    # whose layout the maps describe (plan._tensor_maps), else the next family.
    tma: bool = False
    # The head dim a bucket's Variant is compiled for: the bucket itself, or a wider one whose
    # loads zero-fill the extra columns (a family built on whole 64-column panels).
    compiled_width: Callable[[int], int] = lambda bucket: bucket
    # A dK/dV family that sums a bias's gradient over the queries per key in its kScoreMods form
    # (BwdParams::dbias_keys) where the bias is broadcast over the queries (plan._sums_dbias_by_key).
    sums_dbias_by_key: bool = False
    # (dtype, head-dim bucket) -> whether the dK/dV family stores dQ itself where one block holds
    # every key of its rows (BwdParams::dq_direct, plan._stores_dq): no dq_accum, no conversion.
    stores_dq: Callable[[str, int], bool] = lambda dtype, head_dim: False
    # head-dim bucket -> whether the dK/dV family's kScoreMods form adds dS into a shared bias
    # plane's sums (BwdParams::dbias_planes, plan._SharedBiasAdds; score_mod.cuh's BiasGrad kAdds).
    adds_dbias: Callable[[int], bool] = lambda head_dim: True
    # (dtype, head-dim bucket) -> the tile for short rows (plan.py: every sequence's queries and
    # keys at most SHORT_ROWS), where the long rows' tile would leave most of each block idle
    # (Swin's 49-token windows in 128 x 128 blocks: 15% of the scores real), else None.
    short_tile: Callable[[str, int], Tile | None] = lambda dtype, head_dim: None
    # Whether the family's kernels drop probabilities (their kDropout form, dropout.cuh); a call
    # with dropout takes the next family that does (the memory-bound prep kernels, which never
    # see P, serve every call).
    drops: bool = False
    # The head-dim buckets of a family that drops whose dropout form it has (None: every bucket);
    # a call with dropout at another bucket takes the next family (a form that would spill).
    dropout_head_dims: tuple[int, ...] | None = None
    # (dtype, head-dim bucket) -> the tile of the dropout form where the kScoreMods form's spills
    # with the keep mask's registers added, else None.
    dropout_tile: Callable[[str, int], Tile | None] = lambda dtype, head_dim: None

    def variant(self, dtype: str, head_dim: int, has_window: bool, arch: str,
                visible_keys: float = math.inf, score_mods: bool = False,
                precision: str = "highest", short: bool = False, dropout: bool = False) -> Variant | None:
        """The first candidate that fits ``arch``, as a Variant; None if none does. ``short``:
        the call's rows are short (``short_tile``); ``dropout``: the call drops probabilities (the
        kScoreMods form with dropout compiled in)."""
        if dtype not in self.dtypes or (dropout and self.masked and not (
                self.drops and (self.dropout_head_dims is None or head_dim in self.dropout_head_dims))):
            return None
        dropout = dropout and self.masked
        tf32 = dtype == "float32" and bool(self.tf32_precisions)
        if tf32 and precision not in self.tf32_precisions:
            return None
        split = tf32 and precision == "highest"  # 3xTF32
        if split and (dropout or short or (score_mods and not self.split_mods) or
                      (has_window and not self.split_window)):
            return None
        score_mods = (score_mods or dropout) and self.masked
        if score_mods:  # one Variant per bucket: the tile of long rows, the masked form
            has_window, visible_keys = True, math.inf
        limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
        head_dim = self.compiled_width(head_dim)
        masked_form = has_window and self.masked and self.masked_candidates is not None
        if split:
            candidates = self.split_tf32_candidates(head_dim, arch)
        else:
            candidates = (self.masked_candidates if masked_form else self.candidates)(dtype, head_dim, arch, visible_keys)
        if score_mods and self.modifier_tile(dtype, head_dim) is not None:
            candidates = (self.modifier_tile(dtype, head_dim),) + tuple(candidates)
        if short and self.short_tile(dtype, head_dim) is not None:
            candidates = (self.short_tile(dtype, head_dim),) + tuple(candidates)
        if dropout and self.dropout_tile(dtype, head_dim) is not None:  # (before the short tile too)
            candidates = (self.dropout_tile(dtype, head_dim),) + tuple(candidates)
        for block_m, block_n, warps, stages in candidates:
            shared_mem = self._shared_memory(dtype, head_dim, block_m, block_n, stages, score_mods, split)
            if self.tile_ok(block_m, block_n, warps) and shared_mem <= limit:
                return Variant(self.kernel, dtype, head_dim, block_m, block_n, warps, stages,
                               has_window and self.masked, arch, shared_mem, score_mods, precision if tf32 else None,
                               dropout)
        return None

    def shared_memory_bytes(self, variant: Variant) -> int:
        return self._shared_memory(variant.dtype, variant.head_dim, variant.block_m, variant.block_n, variant.stages,
                                   variant.score_mods, variant.precision == "highest")

    def _shared_memory(self, dtype: str, head_dim: int, block_m: int, block_n: int, stages: int,
                       score_mods: bool, split: bool = False) -> int:
        if split and self.split_shared_memory is not None:  # (its modifiers stage no planes)
            return self.split_shared_memory(head_dim, block_m, block_n, stages)
        planes = self.score_planes(dtype, head_dim, block_m, block_n) if score_mods and self.score_planes else 0
        return self.shared_memory(dtype, head_dim, block_m, block_n, stages) + stages * planes


# --------------------------------------------------------------------------- fwd_tc (mma.sync)
# float16 / bfloat16 on m16n8k16 tensor cores, every arch.

# Per head-dim bucket, candidate (block_m, block_n, warps, stages), best first; the first whose
# shared memory fits the arch is taken. A warp owns block_m / warps query rows (16 or 32): 32
# rows per warp halves the shared-memory reads per MMA (each K/V fragment feeds two m-tiles;
# +10% at d=128 on H100) but doubles the accumulator registers, so d <= 128 uses 32 rows per
# warp with a key tile small enough for ptxas to allocate without spilling (255 registers),
# and wider heads 16 rows per warp. The last candidates keep every bucket runnable on 99 KB
# parts (sm_86, sm_89, sm_120). Every choice compiles spill-free for sm_80 and sm_90a.
# Measured on H100: benchmarks/NOTES.md.

_TC_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((128, 64, 4, 2),),
    64: ((128, 64, 4, 2),),
    96: ((128, 32, 4, 2), (64, 64, 4, 2)),
    128: ((128, 32, 4, 2), (64, 64, 4, 2)),
    160: ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
    192: ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
    224: ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
    256: ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
}


# float32 under precision="tf32" (tile_tc.cuh's Arith<tf32>): the same kernel with 4-byte elements
# on m16n8k8 TF32 tensor cores, so rows take twice the shared memory. Candidates best first, as
# _TC_TABLE; measured on the H200 (benchmarks/NOTES.md, session 12). "highest" takes the same
# kernel in 3xTF32 where _TF32X3_TABLE has a tile (below), "ieee" always FFMA (fwd_simt).
# H200, bf16-shaped sweep (B x L = 16k, L 4k, TFLOP/s dense / causal): d32 128x64 124 / 116
# (128x32 121 / 113, 64x64 100 / 95); d64 128x64 146 / 135 (128x32 139 / 125, 64x32 111 / 107);
# d128 128x32 121 / 107 (64x32 96 / 92, 64x64 75 / 71, 128x32 w8 100 / 91); d256 64x16 80 / 75
# (64x32 77 / 72, 128x32 w8 35 / 34). 32 rows per warp where the registers allow (<= 255, no
# spill): each K/V fragment feeds two m16 tiles.
_TF32_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((128, 64, 4, 2), (128, 32, 4, 2)),
    64: ((128, 64, 4, 2), (128, 32, 4, 2)),
    96: ((128, 32, 4, 2), (64, 32, 4, 2)),
    128: ((128, 32, 4, 2), (64, 32, 4, 2)),
    160: ((64, 16, 4, 2),),
    192: ((64, 16, 4, 2),),
    224: ((64, 16, 4, 2),),
    256: ((64, 16, 4, 2),),
}
# d32: 16 rows per warp (239 registers at 32, two blocks per SM); d64: 128x64 with a bias's reads
# spills 64 bytes on sm_80; d256: 128x64 spills 8 bytes on sm_90a since the bias/mask-only
# combinations (score_mod.cuh). TF32 d32: 32 rows per warp spills 8 bytes on sm_80.
# float32 under precision="highest": 3xTF32 (tile_tc.cuh's tf32x3): three MMAs per TF32 step,
# each operand split into hi and lo fragments by every warp that reads it, so the kernel is bound
# by those splits and the steps' FADDs rather than by the tensor cores (mma.sync TF32 peaks at
# ~320 TFLOP/s on the H200). H200, B x L = 16k, L 1k/4k, TFLOP/s dense / causal (benchmarks/NOTES.md
# session 29): d32 128x64 42-46 / 36-44 (64x64 37-39; FFMA 32 / 26-30), d64 128x32 44-45 / 32-40
# (64x32 39-40; FFMA 36-37 / 30-35). d96 and d128 (64x32: 30-33 against FFMA's 31-34, once the
# split keeps infinities) and d160-d256 (19-21 against 33-35) stay on FFMA, as do short rows
# (the FFMA kernels' short-row tiles) and calls with score modifiers.
# Tiles: the largest without spills; on sm_80 (and parts other than sm_90) d32 128x64 and d64
# 128x32 spill in the windowed form (112 and 68 bytes), so 64 rows there.
_TF32X3_TABLE = {32: ((128, 64, 4, 2),), 64: ((128, 32, 4, 2),)}
_TF32X3_TABLE_SM80 = {32: ((64, 64, 4, 2),), 64: ((64, 32, 4, 2),)}


def _tf32x3_candidates(head_dim: int, arch: str) -> tuple[Tile, ...]:
    return (_TF32X3_TABLE if arch in ("90", "90a") else _TF32X3_TABLE_SM80).get(head_dim, ())


_TC_MODIFIER_TILES = {32: (64, 64, 4, 2), 64: (128, 32, 4, 2), 256: (128, 32, 8, 2)}
_TF32_MODIFIER_TILES = {32: (64, 64, 4, 2)}

# The dropout forms' tiles where the kScoreMods tile spills with the keep mask's registers
# (offline ptxas, session 41, spilled: float16 on sm_80 d32 64x64 4 bytes and 128x64 12, d64 and
# d128 128x32 12 and 8; dK/dV 16-bit on sm_90a d64 128x128 52, d128 64x128 156-208, the d32 short
# tile 4 on sm_80; dQ on sm_90a float16 d32 8, TF32 d128 20), 16-bit ("tc") or TF32 ("tf32"):
# fewer rows or keys a warp, none spilling (KernelSpec.dropout_tile).
_DROPOUT_TILES = {
    "fwd_tc": {("tc", 32): (128, 32, 4, 2), ("tc", 64): (64, 64, 4, 2), ("tc", 128): (64, 64, 4, 2)},
    "bwd_dkdv_tc": {("tc", 32): (64, 128, 8, 2), ("tc", 64): (64, 64, 8, 2), ("tc", 128): (64, 64, 8, 2)},
    "bwd_dq_tc": {("tc", 32): (64, 32, 4, 2), ("tf32", 128): (64, 32, 4, 2)},
}


def _dropout_tile(kernel: str):
    return lambda dtype, d: _DROPOUT_TILES[kernel].get(("tf32" if dtype == "float32" else "tc", d))


def _score_plane_bytes(dtype: str, head_dim: int, block_m: int, block_n: int) -> int:
    """Mirror of score_mod.cuh's ScorePlaneStage::kBytes where stages_score_planes holds (the
    head-dim bucket 32): a bias tile in the score type (float32, float64 for float64), rows padded
    by 32 bytes, and a mask tile of bytes, rows padded by 16."""
    if head_dim > 32:
        return 0
    item = 8 if dtype == "float64" else 4
    return block_m * (block_n * item + 32) + block_m * (block_n + 16)


def _smem_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int, units: int = 1) -> int:
    """Mirror of fwd_tc.cu's kSmemBytes: a Q tile and `stages` (K tile, V tile) pairs of elements
    of `units` 16-bit units (2 for float32), each row padded by one 16-byte chunk (tile_tc.cuh's
    SmemTile)."""
    return (block_m + stages * 2 * block_n) * _tc_pitch(head_dim * units)


# --------------------------------------------------------------------------- fwd_wgmma (Hopper)

# fwd_wgmma (Hopper, sm_90a only): the same forward on warpgroup MMAs, one warpgroup per 64 query
# rows. (block_m, block_n, warps, stages) per head-dim bucket; other buckets and archs run fwd_tc.
# Shared memory: Q, then `stages` K tiles and `stages` V tiles (separate rings) in the 128-byte
# swizzled layout (no padding), 1 KB for alignment; 2 stages give each copy one loop step to land.
# Per bucket: (most mean visible keys per query row, tile) rows, the first that covers the call.
# Measured on H100 (benchmarks/NOTES.md, bf16 B*L = 16k): d128 128 x 128 keys 1.04-1.34x
# sdpa_flash (64 keys -3..-14%); d64 128 x 64 keys 1.03-1.23x (128 keys 0.85-1.09x); two blocks
# per SM at d64 (50 KB each, <= 128 registers). Short rows at d128 (causal L <= 1.5k: 768 keys
# on average): 64 x 64 tiles, two blocks per SM (82 KB, 188 registers), so one block's prologue
# and epilogue hide behind the other's MMAs: causal 1k 0.99 -> 1.04x, 512 0.91 -> 0.97x, but
# 0.90x of 128 x 128 from causal 4k on.
_FWD_WGMMA_TABLE: dict[int, tuple[tuple[float, tuple[int, int, int, int]], ...]] = {
    64: ((math.inf, (128, 64, 8, 2)),),
    128: ((768, (64, 64, 4, 2)), (math.inf, (128, 128, 8, 2))),
}


# float32 under precision="highest" (tc::tf32x3, 3xTF32: three TF32 wgmma per product, Q and K
# split into hi and lo tiles where they land, V transposed on its way to shared memory: TF32
# wgmma reads K-major operands only): d32 and d64, one block of two warpgroups per SM (227-244
# registers: Q's fragments live in them), a K ring of 3 (each K tile split a step before S reads
# it; fwd_wgmma.cu); d64: 32 keys a tile (64 spilled 64-116 bytes at 255 registers, session 48).
# d96 (65-96, since session 58: d128's tiles, 169 KB, 237-245 registers; H100 61-67 TFLOP/s,
# 1.64-1.80x SDPA EFFICIENT, 3 stages no faster) and d128 (97-128): one warpgroup of 64 query
# rows a block, 32-key tiles, a K ring of 2: Q, K and V^T in hi and lo fill 225 KB, and S reads
# Q's tiles from shared memory (its fragments, 128 registers, do not fit beside acc and P V's
# fresh tile: 249 registers without them); H100 session 52: 34.0-41.1 TFLOP/s, 1.27-1.35x FFMA,
# 0.86-0.92x SDPA EFFICIENT (L 1k-16k, dense and causal). Since session 55 a second warpgroup beside it (8 warps: fwd_wgmma's
# kSplitter) does the copies, K's splits and V's transposes (H100: 49-53 -> 58-66 TFLOP/s, 1.2-1.3x;
# 1.31-1.42x SDPA EFFICIENT); session 56 its split loads a batch of chunks before their stores
# (TileLoader::split): 58-64 -> 66-71 TFLOP/s (H100, L 1k-4k, dense and causal). Score
# modifiers: the masked form's kScoreMods at every bucket (split_mods; session 58, H200: 1.37-2.18x
# the FFMA forward); dropout: FFMA. B x L = 16k, H16, forward (benchmarks/NOTES.md):
# session 48 (H100) 1.3-1.75x fwd_tc's 3xTF32 (d64 4k dense 6.10 -> 4.47 ms, causal 4.16 ->
# 2.38; d32 4k 3.25 -> 2.42); session 49 (H200) the K split ahead and V^T's staging loads in
# place 1.10-1.15x more (d64 4k dense 4.55 -> 4.13 ms, d32 1k 0.71 -> 0.62); session 50 (H100) V
# by cp.async 1.01-1.04x, then Q's fragments in registers (S's MMAs read only K from shared
# memory) 1.15-1.21x at d64 (4k dense 4.04 -> 3.37 ms, 81 TFLOP/s), 1.00-1.04x at d32. 64-row
# blocks, two a SM, were 0.90-0.95x (session 49); S two tiles ahead of P V 0.96-0.98x (session
# 50). One TF32 product on the same kernel ran at 0.6-0.8x fwd_tc's mma.sync (its transposes
# and splits outweigh its MMAs): precision="tf32" stays on fwd_tc.
_FWD_WGMMA_TF32X3_TABLE: dict[int, tuple[int, int, int, int]] = {32: (128, 64, 8, 3), 64: (128, 32, 8, 3),
                                                                 96: (64, 32, 8, 2), 128: (64, 32, 8, 2)}


def _smem_fwd_wgmma_bytes(head_dim: int, block_m: int, block_n: int, stages: int, units: int = 1,
                          halves: int = 1) -> int:
    """Mirror of fwd_wgmma.cu's kSmemBytes (elements of `units` 16-bit units: 2 for float32; each
    tile in `halves`: 2 under 3xTF32, hi and lo, whose V ring is two V^T slots beside two staging
    tiles of V's floats)."""
    kv_tiles, staging_tiles = (stages + 2, 2) if halves == 2 else (2 * stages, 0)
    return 1024 + 2 * units * head_dim * (halves * (block_m + kv_tiles * block_n) + staging_tiles * block_n)


def _hopper_tf32x3_candidates(table: dict[int, Tile]) -> Callable[[int, str], tuple[Tile, ...]]:
    """A 3xTF32 family's split_tf32_candidates: its table's tile for the bucket, on sm_90a only."""
    return lambda head_dim, arch: (table[head_dim],) if arch == "90a" and head_dim in table else ()


def _hopper_tf32x3_spec(kernel: str, table: dict[int, Tile], shared_memory: Callable[[int, int, int, int], int],
                        window: bool = True, compiled_width: Callable[[int], int] = lambda bucket: bucket) -> KernelSpec:
    """A family that serves float32 "highest" only, on Hopper's tensor cores (the 3xTF32 and
    bf16x6 backward kernels): its table's tile per bucket, its shared memory by the tile;
    ``window``: causal and windowed calls too; ``compiled_width``: KernelSpec's."""
    return KernelSpec(kernel, ("float32",), lambda dtype, d, arch, keys: (), _by_tile(shared_memory),
                      tf32_precisions=("highest",), split_tf32_candidates=_hopper_tf32x3_candidates(table),
                      split_shared_memory=shared_memory, split_window=window, compiled_width=compiled_width)


def _fwd_wgmma_candidates(dtype: str, head_dim: int, arch: str, visible_keys: float) -> tuple[Tile, ...]:
    """16-bit tiles (float32 runs only 3xTF32 here: _FWD_WGMMA_TF32X3_TABLE)."""
    rows = _FWD_WGMMA_TABLE.get(head_dim, ()) if arch == "90a" else ()
    return tuple(tile for most_keys, tile in rows if visible_keys <= most_keys)[:1]


# fwd_wgmma_ws (Hopper, sm_90a only): fwd_wgmma's loop on consumer warpgroups of 64 query rows
# beside a producer warpgroup that loads Q, K and V through the bulk tensor copy engine
# (block_m / 64 consumers, 4 warps each, plus 4 producer warps); score modifiers as fwd_wgmma's
# (the masked form's tile). Shared memory: fwd_wgmma's tiles plus the rings' mbarriers.
# Measured on the H200 (benchmarks/NOTES.md, session 14, B*L = 16k, TFLOP/s):
# - d128 128 x 128 beats fwd_wgmma at every length, short causal rows included (fp16 512: 213 vs
#   207; 1k 312 vs 270; 16k dense 578 vs 424); 128 x 64 s3 lost (332-486).
# - d64: three consumers, 192 x 128, from 1k dense on (332-484 vs 318-366; 128 x 128: 307-407;
#   192 x 64: 294-416; 128 x 64 s3 lost everywhere), but short causal rows (1k: 186-204 vs 231)
#   keep fwd_wgmma's 128 x 64 (two blocks per SM).
# - d192 / d256 128 x 64 (128 x 128 does not fit): bf16 1k-16k 502-598 / 568-671 against fwd_tc's
#   223-252 / 250-278 (s3 at d192: within 3%, not taken).
# The buckets between (96, 160, 224) run the next width (_ws_width): 25-33% of the columns zeros,
# still ahead of fwd_tc at its own width (bf16 1k-16k, d96: 250-465 vs 196-287; d160: 316-508 vs
# 179-246).
_FWD_WGMMA_WS_TABLE: dict[int, tuple[tuple[float, tuple[int, int, int, int]], ...]] = {
    64: ((768, ()), (math.inf, (192, 128, 16, 2))),
    128: ((math.inf, (128, 128, 12, 2)),),
    192: ((math.inf, (128, 64, 12, 2)),),
    256: ((math.inf, (128, 64, 12, 2)),),
}
# The masked form: d64 192 x 128 spills 136 bytes at three consumers' 160 registers (the mask's
# code on top); two consumers at 240 registers do not. 128 x 128 causal: 2k 278 vs fwd_wgmma 286,
# 4k 334 vs 322, 16k 400 vs 360.
_FWD_WGMMA_WS_MASKED_TABLE = {**_FWD_WGMMA_WS_TABLE, 64: ((1024, ()), (math.inf, (128, 128, 12, 2)))}


def persistent(variant) -> bool:
    """Whether ``variant``'s blocks walk several tiles each (launched with at most one block per
    SM: plan._launch_of). Mirror of fwd_wgmma_ws.cu's fwd_ws_persistent: fwd_wgmma_ws up to d192
    (at d256 the walk's state spills beside O)."""
    return variant.kernel == "fwd_wgmma_ws" and variant.head_dim <= 192


def _ws_width(bucket: int) -> int:
    """fwd_wgmma_ws's width for a bucket: whole 64-column panels (96 -> 128, 160 -> 192, 224 ->
    256: the maps zero-fill the columns past D). Bucket 32 stays 32 (no table: half of a d64
    tile would be zeros; fwd_tc runs it)."""
    return bucket if bucket <= 32 else -(-bucket // 64) * 64


def _smem_fwd_wgmma_ws_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of fwd_wgmma_ws.cu's kSmemBytes: two Q tiles where they fit in 227 KB (the next
    tile's Q lands during this one's epilogue), else one; the K/V rings; the mbarriers."""
    def smem_bytes(q_buffers: int) -> int:
        return 1024 + 2 * head_dim * (q_buffers * block_m + 2 * stages * block_n) + 8 * (2 * q_buffers + 4 * stages)

    return smem_bytes(2) if smem_bytes(2) <= 227 * 1024 else smem_bytes(1)


def _fwd_wgmma_ws_candidates(table):
    def candidates(dtype: str, head_dim: int, arch: str, visible_keys: float) -> tuple[Tile, ...]:
        rows = table.get(head_dim, ()) if arch == "90a" else ()
        tile = next((tile for most_keys, tile in rows if visible_keys <= most_keys), ())
        return (tile,) if tile else ()  # (): short rows run fwd_wgmma
    return candidates


# --------------------------------------------------------------------------- fwd_simt (fp32/fp64)
# fwd_simt: a block of `warps` warps owns block_m query rows, two row groups of 16 lanes per
# warp, so a lane holds TM = block_m / (2 warps) rows, TN = block_n / 16 keys of S and
# TD = head_dim / 16 output columns. Registers grow with TM * TD (the accumulator) and
# TM * TN (the S tile); shared memory holds Q^T, K, V and P^T tiles, each row padded by
# 16 bytes. Candidates are in order of preference; the first that fits the arch's shared
# memory is taken (the large tiles are for sm_80 / sm_90, the small ones keep every head dim
# runnable on 99 KB parts).

_SIMT_ITEMSIZE = {"float32": 4, "float64": 8}

_SIMT_FALLBACK = ((64, 32, 8), (32, 32, 8), (16, 32, 8), (16, 16, 8), (8, 16, 4))


def _simt_candidates(dtype: str, head_dim: int) -> tuple[tuple[int, int, int], ...]:
    """(block_m, block_n, warps) in order of preference for one head-dim bucket."""
    if dtype == "float32":
        # 8 x 4 micro-tiles for d <= 64 (32 + 32 accumulators); 4 x 4 with up to 4 x 16 above.
        first = ((128, 64, 8), (64, 64, 8)) if head_dim <= 64 else ((64, 64, 8),)
    else:
        # Doubles take two registers: 4 x 4 micro-tiles, fewer keys per tile as d grows.
        if head_dim <= 64:
            first = ((64, 32, 8), (64, 64, 8))
        elif head_dim <= 128:
            first = ((64, 32, 8),)
        else:
            first = ((32, 32, 8),)
    return tuple(dict.fromkeys(first + _SIMT_FALLBACK))


# Short rows (SHORT_ROWS, plan._short_rows): float32's 128-row (forward, dQ) or 128-key (dK/dV)
# tiles would hold 49 real rows of a Swin window (38% of their FFMA work); 64 hold 77%, at half
# the registers of S per lane. The three FFMA families take this tile in buckets 32 and 64.
_SIMT_SHORT_TILES = {32: (64, 64, 8, 1), 64: (64, 64, 8, 1)}


def _simt_short_tile(dtype: str, head_dim: int) -> Tile | None:
    return _SIMT_SHORT_TILES.get(head_dim) if dtype == "float32" else None


def _smem_simt_bytes(dtype: str, head_dim: int, block_m: int, block_n: int) -> int:
    item = _SIMT_ITEMSIZE[dtype]
    pad = 16 // item
    ld_q, ld_kv = block_m + pad, head_dim + pad
    # Qt [d][m]  K [n][d]  V [n][d]  Pt [n][m]
    return item * (head_dim * ld_q + 2 * block_n * ld_kv + block_n * ld_q)


# --------------------------------------------------------------------------- fwd_dmma (fp64 tensor cores)
# fwd_dmma: float64 on mma.sync m8n8k4 .f64 (sm_80+). A block of `warps` warps owns block_m
# query rows, block_m / warps per warp (8 or 16: one or two 8-row MMA tiles), each warp every
# key of the tile and every output column. Per lane: 2 * (rows / 8) * (block_n / 8) doubles of
# S and 2 * (rows / 8) * (head_dim / 8) of acc, so d <= 128 takes 16 rows per warp (fewer keys
# as d grows) and wider heads 8. Shared memory: Q, K, V tiles row-major, rows of head_dim + 2
# doubles. Candidates (block_m, block_n, warps) best first; the first that fits the arch's
# shared memory is taken; where none fits (float64 d >= 224 on 99 KB parts) fwd_simt runs.
# Every candidate compiles spill-free for sm_80 and sm_90a (162-254 registers, 1 block min).
_DMMA_TABLE: dict[int, tuple[tuple[int, int, int], ...]] = {
    32: ((64, 64, 4),),
    64: ((64, 64, 4),),   # 99 KB: two blocks (8 warps) per H100 SM
    96: ((64, 32, 4),),
    128: ((64, 16, 4),),  # 128x32 w8 spills on sm_90a with m16n8k8 (255 regs + 92 B)
    160: ((32, 32, 4), (32, 16, 4)),
    192: ((32, 32, 4), (32, 16, 4)),
    224: ((32, 32, 4), (32, 16, 4)),
    256: ((32, 32, 4), (32, 16, 4)),
}


def _smem_dmma_bytes(head_dim: int, block_m: int, block_n: int) -> int:
    """Mirror of fwd_dmma.cu's kSmemBytes: Qs [m][d + 2], Ks and Vs [n][d + 2] doubles."""
    return 8 * (block_m + 2 * block_n) * (head_dim + 2)


# --------------------------------------------------------------------------- backward, tensor cores
# bwd_dkdv_tc: a block owns block_n keys and streams block_m queries through `stages` (Q, dO)
# slots; its warps (an even count) tile S / dP as 2 x warps/2 (queries x keys), dK / dV as
# warps/2 x 2 (keys x dims), so block_m / 2 and 2 * block_n / warps are multiples of 16; dK and
# dV hold 2 * block_n * head_dim / threads fp32 registers per thread (<= 128 keeps them beside
# S and dP). Shared memory: K, V, P, dS, and per stage Q, dO and 2 * block_m floats (lse, delta).
# bwd_dq_tc (deterministic dQ): as fwd_tc, a block owns block_m queries (16 rows per warp),
# Q and dO resident, K and V streamed in `stages` slots.
# Candidates (block_m, block_n, warps, stages), best first; the first that fits the arch's
# shared memory is taken; the last ones keep every bucket runnable on 99 KB parts.
_BWD_DKDV_TC_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2)),
    64: ((128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2)),
    96: ((64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)),
    128: ((64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)),
    160: ((64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 2, 2)),
    192: ((64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 2, 2)),
    224: ((64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 2, 2)),
    256: ((64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 2, 2)),
}
# Short rows (every sequence at most SHORT_ROWS queries and keys: windowed vision attention,
# small molecules, pair rows of short proteins): one 64 x 64 tile of 4 warps holds a whole
# sequence, where 128 x 128 of 8 warps (133-165 KB: one block per SM) computes 4x the scores
# and waits on one block's latency per SM.
SHORT_ROWS = 64
_BWD_DKDV_TC_SHORT_TILES = {32: (64, 64, 4, 2)}
_BWD_DQ_TC_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 64, 4, 2),),
    64: ((64, 64, 4, 2),),
    96: ((64, 64, 4, 2),),
    128: ((64, 64, 4, 2), (64, 32, 4, 2)),
    160: ((64, 32, 4, 2), (32, 32, 2, 2)),
    192: ((64, 32, 4, 2), (32, 32, 2, 2)),
    224: ((64, 32, 4, 2), (32, 16, 2, 2)),
    256: ((64, 32, 4, 2), (32, 32, 2, 2)),
}


# float32 under precision="tf32": the same kernels with 4-byte elements (tile_tc.cuh's Arith), so
# every row, P and dS included, takes twice the shared memory and the tiles shrink. Candidates
# best first; those that do not fit the arch fall through to the FFMA kernels (bwd_*_simt).
# Heads above 192 (and 160-192 on 99-163 KB parts) stay on FFMA: the tiles that fit hold dK and
# dV of 4 warps (128 registers) and spill (d224/d256 32 x 32: 8-92 bytes; dQ d224 32 x 32 1.1 KB).
# H200 measurements: benchmarks/NOTES.md (session 13).
_TF32_BWD_DKDV_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 128, 8, 2), (64, 64, 8, 2)),
    64: ((64, 128, 8, 2), (64, 64, 8, 2)),
    96: ((64, 64, 8, 2), (32, 64, 8, 2)),
    128: ((32, 64, 8, 2), (32, 32, 4, 2)),
    160: ((32, 64, 8, 2),),
    192: ((32, 64, 8, 2),),
}
_TF32_BWD_DQ_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 64, 4, 2),),
    64: ((64, 64, 4, 2),),
    96: ((64, 64, 4, 2), (64, 32, 4, 2)),
    128: ((64, 64, 4, 2), (64, 32, 4, 2)),
    160: ((64, 32, 4, 2), (32, 32, 2, 2)),
    192: ((64, 32, 4, 2),),
}


def _tc_table(table_16bit, table_tf32):
    """Candidates of a tensor-core family: its float32 (TF32) table or its 16-bit one."""
    return lambda dtype, head_dim, arch, visible_keys: tuple(
        (table_tf32 if dtype == "float32" else table_16bit).get(head_dim, ()))


def _units(dtype: str) -> int:
    """16-bit units per element in the tensor-core kernels' shared tiles (tile_tc.cuh's Arith)."""
    return 2 if dtype == "float32" else 1


def _tc_pitch(width: int) -> int:
    """Bytes per row of a 16-bit SmemTile of `width` columns (one padding chunk)."""
    return (width // 8 + 1) * 16


def _smem_bwd_dkdv_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int, units: int = 1) -> int:
    """Mirror of bwd_dkdv_tc.cu's kSmemBytes (elements of `units` 16-bit units)."""
    kv = 2 * block_n * _tc_pitch(head_dim * units)
    p_ds = 2 * block_m * _tc_pitch(block_n * units)
    stage = 2 * block_m * _tc_pitch(head_dim * units) + 2 * block_m * 4
    return kv + p_ds + stages * stage


# bwd_dbias_tc (a bias's gradient summed on chip over the rows that share its plane, instead of
# a (rows, Lq, Lk) dS buffer): one (Lq x Lk) tile of one plane per block, the rows streamed
# through `stages` stages of Q, dO, lse, delta, K, V (4 stages measured no faster than 2 on the
# H200). 16-bit, head dims up to 128; 32 keys a tile (64 spill: S, dP and the sum at 16 rows per
# warp); wider heads and the FFMA dtypes keep the dS buffer.
_BWD_DBIAS_TC_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 32, 4, 2),),
    64: ((64, 32, 4, 2),),
    96: ((64, 16, 4, 2),),  # 64 x 32 spills 48 bytes on sm_80
    128: ((64, 32, 4, 2),),
}


def _smem_bwd_dbias_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dbias_tc.cu's bwd_dbias_tc_smem_bytes: the bias tile, then per stage Q, dO,
    lse and delta, K, V."""
    return block_m * block_n * 4 + stages * (2 * (block_m + block_n) * _tc_pitch(head_dim) + 2 * block_m * 4)


def _smem_bwd_dq_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int, units: int = 1) -> int:
    """Mirror of bwd_dq_tc.cu's kSmemBytes: Q, dO and `stages` (K, V) pairs."""
    return (2 * block_m + stages * 2 * block_n) * _tc_pitch(head_dim * units)


# bwd_dkdv_wgmma (Hopper, sm_90a only): the same work on warpgroup MMAs. Two warpgroups of 64
# keys (block_n = 128, 8 warps); block_m queries per tile. Per thread dK, dV (2 * head_dim / 2)
# and S^T, dP^T (2 * block_m / 2) fp32 accumulators: 64 x 128 at d128 (255 registers, no spill);
# d64 128-query tiles spill, so 64 there too. Shared memory: K, V, dS^T and per stage Q, dO in
# 128-byte swizzled tiles (no padding), 2 * block_m floats per stage, 1 KB for alignment.
_BWD_DKDV_WGMMA_TABLE: dict[int, tuple[int, int, int, int]] = {
    64: (64, 128, 8, 2),
    128: (64, 128, 8, 2),
}


def _smem_bwd_dkdv_wgmma_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_wgmma.cu's kSmemBytes."""
    tiles = 2 * block_n * head_dim * 2 + block_n * block_m * 2 + stages * 2 * block_m * head_dim * 2
    return 1024 + tiles + stages * 2 * block_m * 4


# bwd_dkdv_wgmma_x3 (Hopper, sm_90a only): float32 under precision="highest" in 3xTF32 (every
# operand in TF32 hi and lo halves; those whose k index is a tensor's rows transposed: Q_i^T,
# dO_i^T, K^T), the d32 and d64 buckets: 64 keys a block, 32-query steps (d32: 64, dQ = dS K
# from the dS and K^T tiles, M = 64 queries, where d64 computes dQ^T), two warpgroups (one multiplies
# by the keys, the other splits and transposes the next step's Q and dO out of a staging tile and
# computes dQ_i^T = K^T dS^T with K^T's fragments in its registers, added by REDs). Shared memory
# 226 KB (K, V, dS and two slots of Q_i, dO_i, Q_i^T, dO_i^T in hi and lo tiles): one block a SM;
# 231-243 registers. H100 session 52, B x L = 16k, H16, backward: 46.7-53.4 TFLOP/s, 1.48-1.63x
# bwd_dkdv_simt's (FFMA); K^T in shared memory and one slot of Q_i, dO_i 1.30-1.42x; one
# warpgroup doing both sides 0.8x. Session 53: d64 53 -> 61 TFLOP/s (1.7-1.9x FFMA; the feeding
# warpgroup's address arithmetic cut), d32 1.6-2.0x FFMA. d128 (no room): bwd_dkdv_wgmma_x6h in bf16x6.
_BWD_DKDV_WGMMA_X3_TABLE: dict[int, tuple[int, int, int, int]] = {32: (64, 64, 8, 1), 64: (32, 64, 8, 1)}


def _smem_bwd_dkdv_wgmma_x3_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_wgmma_x3.cu's kSmemBytes."""
    kv_tiles = 3 if head_dim < 64 else 2  # d32: K^T's tiles too
    floats = 2 * (kv_tiles * block_n * head_dim + 8 * block_m * head_dim + block_m * block_n) + 2 * block_m * head_dim
    return 1024 + 4 * (floats + 2 * 2 * block_m)


# bwd_dkdv_wgmma_x6 (Hopper, sm_90a only): float32 under precision="highest" in bf16x6 (every
# operand in three bfloat16 pieces, six products; tile_tc.cuh's bf16x6), d64: bwd_dkdv_wgmma.cu's
# operand forms (Q_i, dO_i and K read MN-major, no transposed copies), 64 keys a block, 64-query
# steps, two warpgroups (one multiplies, the other splits the next step's Q and dO into pieces and
# computes dQ_i = dS K). Shared memory 202 KB: one block a SM; 247 registers. H100 session 56, B x L
# = 16k, H16, backward: dense 1.05-1.06x bwd_dkdv_wgmma_x3 (d64 L16k 67.2 -> 70.8 TFLOP/s), causal
# 0.92-0.93x (67.2 -> 62.2: not understood yet), so it serves dense calls only; errors against
# float64 0.17-1.43x the FFMA kernels' (dV's 0.27-1.00x).
_BWD_DKDV_WGMMA_X6_TABLE: dict[int, tuple[int, int, int, int]] = {64: (64, 64, 8, 1)}


def _smem_bwd_dkdv_wgmma_x6_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_wgmma_x6.cu's kSmemBytes."""
    pieces = 2 * 3 * (2 * block_n * head_dim + block_n * block_m + 2 * 2 * block_m * head_dim)
    return 1024 + pieces + 4 * (2 * block_m * head_dim + 2 * 2 * block_m)


# bwd_dkdv_wgmma_x6h (Hopper, sm_90a only): float32 "highest" in bf16x6 at d97-128 (the 3xTF32 form
# does not fit): two warpgroups, each one half of the head dim (dK, dV columns, dQ^T rows), S^T and
# dP^T computed by both; 64 keys a block, 32-query steps, Q and dO loaded into registers a step
# ahead (no staging tile), dS stored transposed by stmatrix. Shared memory 216 KB: one block a SM;
# 251-255 registers. H100 session 57, B x L = 16k, H16, backward alone: dense 48.6-54.6 TFLOP/s,
# causal 41.0-53.3, 1.62-1.91x bwd_dkdv_simt's (FFMA) 24.6-28.7; errors against float64 0.32-2.6x
# the FFMA kernels' (the larger ratios where FFMA's own error is small: d120 with a negative scale).
_BWD_DKDV_WGMMA_X6H_TABLE: dict[int, tuple[int, int, int, int]] = {128: (32, 64, 8, 1)}


def _smem_bwd_dkdv_wgmma_x6h_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_wgmma_x6h.cu's kSmemBytes."""
    return 1024 + 2 * 3 * (2 * block_n * head_dim + 2 * 2 * block_m * head_dim + 2 * block_m * block_n) + 4 * 2 * 2 * block_m


# bwd_dq_wgmma_x3 (Hopper, sm_90a only): the deterministic dQ of float32 "highest" in 3xTF32, d32 and d64:
# 64 query rows a block, 32-key steps, two warpgroups (one multiplies: S, dP as SS, dQ += dS K_j
# as RS onto K_j^T; the other splits each key tile out of a staging tile into one of two slots).
# Shared memory: Q_i, dO_i, two slots of K_j, V_j, K_j^T in hi and lo tiles, the staging tile.
# H100 session 53, L 4k B4 H16: the deterministic backward 21.5 -> 16.4 ms (bwd_dq_simt's dQ
# before; FFMA throughout 28.3); d32, session 54: 11.1 -> 7.1 ms.
_BWD_DQ_WGMMA_X3_TABLE: dict[int, tuple[int, int, int, int]] = {32: (64, 32, 8, 1), 64: (64, 32, 8, 1)}


# bwd_dq_wgmma_x6 (Hopper, sm_90a only): the deterministic dQ of float32 "highest" in bf16x6 at d33-64
# and d97-128 (d128: 225 KB, 170-173 registers; H100 session 58: the deterministic d128 backward
# at L 4k 48.97 -> 34.48 ms):
# bwd_dq_wgmma_x3's two warpgroups and steps, K_j read MN-major by dQ's product (no K_j^T), a key tile
# split once into three pieces. Shared memory 113 KB, 103-107 registers. H100 session 57, L 4k B4 H16
# d64: the deterministic backward 14.57 -> 13.73 ms (bwd_dq_wgmma_x3's dQ before); dQ's error at most
# 2.17x a plain float32 implementation's (bwd_dq_wgmma_x3's 2.78x). Two blocks a SM
# (__launch_bounds__(256, 2)): 13.83 ms, no better.
_BWD_DQ_WGMMA_X6_TABLE: dict[int, tuple[int, int, int, int]] = {64: (64, 32, 8, 1), 128: (64, 32, 8, 1)}


def _smem_bwd_dq_wgmma_x6_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dq_wgmma_x6.cu's kSmemBytes."""
    return 1024 + 2 * 3 * (2 * block_m * head_dim + 2 * 2 * block_n * head_dim) + 4 * 2 * block_n * head_dim


def _smem_bwd_dq_wgmma_x3_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dq_wgmma_x3.cu's kSmemBytes."""
    return 1024 + 4 * (2 * (2 * block_m * head_dim + 2 * 3 * block_n * head_dim) + 2 * block_n * head_dim)


# bwd_dkdv_wgmma_ws (Hopper, sm_90a only): bwd_dkdv_wgmma's work on two consumer warpgroups beside
# a producer warpgroup (TMA for K, V, Q_i, dO_i; plain copies of lse_i, delta_i): 12 warps, the
# same tiles. Shared memory: bwd_dkdv_wgmma's, the fp32 dQ buffers of the bulk adds (d128) and the
# mbarriers. Measured (H200 bf16, B*L = 16k, session 16): d128 1.18-1.33x bwd_dkdv_wgmma with the
# bulk adds (0.83-0.84x cuDNN), d64 1.05-1.10x (its REDs). d64 on 128 x 128 tiles: 1.01-1.09x with
# REDs, 0.91-0.97x with bulk adds, so 64 x 128 stays (benchmarks/NOTES.md).
_BWD_DKDV_WGMMA_WS_TABLE: dict[int, tuple[int, int, int, int]] = {
    64: (64, 128, 12, 2),
    128: (64, 128, 12, 2),
}


def _smem_bwd_dkdv_wgmma_ws_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_wgmma_ws.cu's kSmemBytes: bwd_dkdv_wgmma's, fp32 dQ tiles (two above d64, rows of
    head_dim + 8 floats) and the mbarriers."""
    dq_buffers = 2 if head_dim > 64 else 0
    return (_smem_bwd_dkdv_wgmma_bytes(head_dim, block_m, block_n, stages)
            + dq_buffers * block_m * (head_dim + 8) * 4 + 8 * (1 + 2 * stages + 2 * dq_buffers))


# --------------------------------------------------------------------------- backward, exact
# bwd_dkdv_simt (dK, dV and atomic dQ over key tiles) and bwd_dq_simt (deterministic dQ over
# query tiles), cuda_src/bwd_simt.cuh. A block of `warps` warps is 2 * warps row groups of 16
# lanes. dkdv: a lane holds block_n / (2 warps) keys of dK and dV (x head_dim / 16 columns
# each) and a keys x (block_m / 16) tile of S^T and dP^T; dq: block_m / (2 warps) rows of dQ
# (x head_dim / 16) and a rows x (block_n / 16) tile of S and dP. Shared memory holds Q, dO,
# K, V once each as rows of head_dim (+16 bytes), plus P / dS tiles. Candidates in order of
# preference; the first whose shared memory fits the arch is taken.

_BWD_SIMT_FIRST = {
    # (kernel, dtype): ((max head dim, ((block_m, block_n, warps), ...)), ...)
    # fp32 d <= 64: 128 keys per block (8 keys x 4 columns of dK and dV per lane, 250 registers)
    # halve the dQ atomics per FLOP: 31.5 TF/s against 25.3 for 64 x 64 (H100, d64 L4k).
    ("bwd_dkdv_simt", "float32"): ((64, ((64, 128, 8), (64, 64, 8))), (128, ((64, 64, 8),)), (256, ((32, 32, 8),))),
    ("bwd_dkdv_simt", "float64"): ((64, ((32, 64, 8),)), (128, ((32, 32, 8),)), (256, ((16, 16, 8),))),
    ("bwd_dq_simt", "float32"): ((64, ((128, 64, 8),)), (128, ((64, 64, 8),)), (256, ((64, 32, 8),))),
    ("bwd_dq_simt", "float64"): ((64, ((64, 64, 8), (64, 32, 8))), (128, ((32, 32, 8),)), (256, ((16, 32, 8),))),
}
_BWD_SIMT_FALLBACK = ((32, 64, 8), (32, 32, 8), (16, 32, 8), (16, 16, 8), (16, 16, 4), (16, 8, 4), (8, 16, 4))


def _bwd_simt_tile_ok(kernel: str, block_m: int, block_n: int, warps: int) -> bool:
    """The kernels' static_asserts: rows split over 2 * warps row groups, columns over 16 lanes."""
    groups = 2 * warps
    if kernel == "bwd_dkdv_simt":
        return block_n % groups == 0 and block_m % groups == 0 and block_m % 16 == 0
    return block_m % groups == 0 and block_n % 16 == 0


def _smem_bwd_simt_bytes(kernel: str, dtype: str, head_dim: int, block_m: int, block_n: int) -> int:
    """Mirror of the kernels' kSmemBytes."""
    item = _SIMT_ITEMSIZE[dtype]
    pad = 16 // item
    ld_d = head_dim + pad
    if kernel == "bwd_dkdv_simt":
        # Ks, Vs [n][d]  Qs, dOs [m][d]  Ps, dSs [m][n]  dSt [n][m]  lse, delta [m]
        words = 2 * block_n * ld_d + 2 * block_m * ld_d + 2 * block_m * (block_n + pad) + block_n * (block_m + pad)
    else:
        # Qs, dOs [m][d]  Ks, Vs [n][d]  dSt [n][m]  lse, delta [m]
        words = 2 * block_m * ld_d + 2 * block_n * ld_d + block_n * (block_m + pad)
    return item * (words + 2 * block_m)


def _bwd_simt_candidates(kernel: str):
    def candidates(dtype: str, head_dim: int, arch: str, visible_keys: float) -> tuple[Tile, ...]:
        first = next(tiles for d, tiles in _BWD_SIMT_FIRST[(kernel, dtype)] if head_dim <= d)
        return tuple((m, n, w, 1) for m, n, w in dict.fromkeys(first + _BWD_SIMT_FALLBACK))
    return candidates


# --------------------------------------------------------------------------- backward, fp64 tensor cores
# bwd_dkdv_dmma (dK, dV and atomic dQ over key tiles) and bwd_dq_dmma (deterministic dQ over
# query tiles): float64 on mma.sync m8n8k4 .f64 (m16n8k8 on sm_90 where a warp holds an even
# number of 8-row tiles), in fwd_dmma's fragment layout (cuda_src/dmma_tile.cuh). Shared memory:
# row-major tiles, rows of head_dim + 2 doubles (dkdv's dS: block_n + 2).
# dkdv: warp w owns block_n / warps keys (8 or 16: one or two row tiles) of S^T, dP^T, dK and dV
# for every query of the tile; per lane 4 * (keys / 8) * (head_dim / 8) doubles of dK and dV
# beside 4 * (keys / 8) * (block_m / 8) of S^T and dP^T. 16 keys per warp (m16n8k8 on sm_90, and
# each Q / dO fragment feeds two row tiles) fit up to d64; 8 at d96-d160 (d160: 242-255
# registers). 128 keys a block where they fit halve the dQ atomics per FLOP.
# From d192 a warp's dK and dV of every column pass the registers (spills at every tile tried,
# 56-480 bytes), so those tiles split the columns (dkdv_dmma_slices): twice the warps of the 8-key
# row tiles, each pair of warps on the same 8 keys, each adding half of dK's and dV's columns (96,
# 112, 128). The pair shares S^T and dP^T (dkdv_dmma_shares): each warp computes them (over the
# whole head dim) for half of the query tiles and the pair exchanges P^T and dS^T through dS's
# shared tile, so every product is issued once. Where the query tiles do not halve (sm_80 d224,
# 8 x 32: one) the pair splits the products (one warp S^T, the other dP^T) and exchanges them
# whole: issued once too (before, both warps computed both: seven products' MMAs for five). The
# slices share one block's shared tiles: at one block per SM (sm_90a: 174-203 KB)
# that gives 8 warps per SM where a grid axis over the slices would give 4.
# dq: fwd_dmma's split (warp w owns block_m / warps query rows, every key of the tile and every
# column of dQ), 16 rows per warp where the shared memory allows.
# Candidates (block_m, block_n, warps) best first; the first that fits the arch's shared memory
# is taken; none fits (99 KB parts, some buckets): the SIMT kernels run. Every candidate compiles
# spill-free for sm_80 and sm_90a (tests/test_pipeline.py). Measured at d64 only (H200, session
# 14): 1.9-2.1x the DFMA kernels; the other buckets' tiles are chosen from registers alone.
_BWD_DKDV_DMMA_TABLE: dict[int, tuple[tuple[int, int, int], ...]] = {
    32: ((32, 128, 8), (32, 64, 4)),  # 64 x 64 w4 spills 32-56 bytes
    64: ((16, 128, 8), (16, 64, 4)),  # 16 x 128: 165 KB, Hopper only; 32 x 64 w4 spills 72 bytes
    96: ((32, 32, 4), (16, 32, 4)),
    128: ((16, 32, 4),),              # 32 x 32 spills 8 bytes
    160: ((16, 32, 4),),              # 4 warps, one block per SM
    # two column slices (186-255 registers, no spills, sm_80 and sm_90a, with modifiers too):
    192: ((32, 32, 8), (16, 32, 8)),  # 203 KB, Hopper only; 16 x 32: 150 KB
    224: ((16, 32, 8), (8, 32, 8)),   # 174 KB, Hopper only; 8 x 32: 143.5 KB (32 x 32: 235 KB)
    256: ((16, 32, 8), (16, 16, 4)),  # 198 KB, Hopper only; 16 x 16: 131.5 KB (8 x 32: 163.5 KB, over sm_80's 163)
}
_BWD_DQ_DMMA_TABLE: dict[int, tuple[tuple[int, int, int], ...]] = {
    32: ((64, 64, 4),),
    64: ((64, 32, 4),),              # 64 x 64 spills 40-64 bytes
    96: ((64, 32, 4), (64, 16, 4)),
    128: ((64, 16, 4), (32, 32, 4)),  # 64 x 16: 163.5 KB, Hopper only
    160: ((32, 32, 4), (32, 16, 4)),
    192: ((32, 32, 4), (32, 16, 4)),
    224: ((32, 16, 4), (32, 8, 4)),
    256: ((32, 16, 4), (32, 8, 4)),
}


def _smem_bwd_dmma_bytes(kernel: str, head_dim: int, block_m: int, block_n: int) -> int:
    """Mirror of the kernels' *_smem_bytes (doubles)."""
    tiles = 2 * (block_m + block_n) * (head_dim + 2) + 2 * block_m  # Q, dO, K, V; lse, delta
    if kernel == "bwd_dkdv_dmma":
        tiles += block_m * (block_n + 2)  # dS by query row
    return 8 * tiles


def dkdv_dmma_slices(block_n: int, warps: int) -> int:
    """The column slices of a bwd_dkdv_dmma tile: 8 warps / block_n where the block has more warps
    than 8-key row tiles (each slice's warps own every key, and 1 / slices of dK's and dV's
    columns), else 1. Mirror of bwd_dkdv_dmma.cu's bwd_dkdv_dmma_slices."""
    return 8 * warps // block_n if 8 * warps > block_n else 1


def dkdv_dmma_shares(block_m: int, block_n: int, warps: int) -> bool:
    """Whether a bwd_dkdv_dmma tile's column slices share S^T and dP^T: each warp of a key group
    computes 1 / slices of the 8-query tiles and the group exchanges P^T and dS^T through shared
    memory (every product issued once); sliced tiles whose query tiles divide among the slices.
    Mirror of bwd_dkdv_dmma.cu's bwd_dkdv_dmma_shares."""
    slices = dkdv_dmma_slices(block_n, warps)
    return slices > 1 and (block_m // 8) % slices == 0


def _bwd_dmma_tile_ok(kernel: str, block_m: int, block_n: int, warps: int) -> bool:
    """The kernels' static_asserts: whole 8-row tiles per warp (keys for dkdv, queries for dq);
    dkdv's column slices (dkdv_dmma_slices) share the warps evenly, and their key groups share S^T
    and dP^T by query tiles (dkdv_dmma_shares) or are pairs (which split them by product). (A
    slice's columns, head_dim / slices, a multiple of 16: the kernel's assert alone; two slices
    divide every bucket.)"""
    if kernel == "bwd_dkdv_dmma":
        slices = dkdv_dmma_slices(block_n, warps)
        return (warps % slices == 0 and block_n % (8 * (warps // slices)) == 0 and block_m % 8 == 0
                and (slices <= 2 or dkdv_dmma_shares(block_m, block_n, warps)))  # S^T, dP^T issued once
    return block_m % (8 * warps) == 0 and block_n % 8 == 0


def _bwd_dmma_spec(kernel: str, table, modifier_tiles) -> KernelSpec:
    return KernelSpec(
        kernel, DMMA_DTYPES,
        lambda dtype, d, arch, keys: tuple((m, n, w, 1) for m, n, w in table.get(d, ())),
        lambda dtype, d, block_m, block_n, stages: _smem_bwd_dmma_bytes(kernel, d, block_m, block_n),
        lambda block_m, block_n, warps: _bwd_dmma_tile_ok(kernel, block_m, block_n, warps),
        modifier_tile=lambda dtype, d: modifier_tiles.get(d))


# --------------------------------------------------------------------------- backward, delta and dQ conversion
# bwd_delta (delta = rowsum(dO o O), dq_accum zeroed) and bwd_dq_convert (dQ = scale * dq_accum
# in the input type), cuda_src/bwd_prep.cuh: memory-bound, every dtype, no shared memory, no
# mask. A block of 4 warps owns block_m = 64 query rows (block_n is unused and set equal);
# the head-dim bucket only bounds the unrolled chunk loop.
_BWD_PREP_TILE = (64, 64, 4, 1)  # block_m, block_n, warps, stages


# --------------------------------------------------------------------------- the specs

def _table(table):
    """Candidates from a {head_dim: (tile, ...)} table."""
    return lambda dtype, head_dim, arch, visible_keys: tuple(table.get(head_dim, ()))


def _by_tile(smem: Callable[..., int]):
    """A shared-memory mirror of (head_dim, block_m, block_n, stages) as a spec's function."""
    return lambda dtype, head_dim, block_m, block_n, stages: smem(head_dim, block_m, block_n, stages)


FWD_TC = KernelSpec("fwd_tc", TC_DTYPES + ("float32",), _tc_table(_TC_TABLE, _TF32_TABLE),
                    lambda dtype, d, block_m, block_n, stages: _smem_tc_bytes(d, block_m, block_n, stages, _units(dtype)),
                    modifier_tile=lambda dtype, d: (_TF32_MODIFIER_TILES if dtype == "float32" else _TC_MODIFIER_TILES).get(d),
                    score_planes=_score_plane_bytes, tf32_precisions=("tf32", "highest"),
                    split_tf32_candidates=_tf32x3_candidates, drops=True, dropout_tile=_dropout_tile("fwd_tc"))
FWD_WGMMA = KernelSpec("fwd_wgmma", TC_DTYPES + ("float32",), _fwd_wgmma_candidates,
                       _by_tile(_smem_fwd_wgmma_bytes),  # 16-bit; float32 is "highest" only: split_shared_memory
                       tf32_precisions=("highest",), split_tf32_candidates=_hopper_tf32x3_candidates(_FWD_WGMMA_TF32X3_TABLE),
                       split_shared_memory=lambda d, block_m, block_n, stages: _smem_fwd_wgmma_bytes(
                           d, block_m, block_n, stages, units=2, halves=2), split_mods=True, drops=True)
FWD_WGMMA_WS = KernelSpec("fwd_wgmma_ws", TC_DTYPES, _fwd_wgmma_ws_candidates(_FWD_WGMMA_WS_TABLE),
                          _by_tile(_smem_fwd_wgmma_ws_bytes), tma=True, drops=True,
                          masked_candidates=_fwd_wgmma_ws_candidates(_FWD_WGMMA_WS_MASKED_TABLE),
                          compiled_width=_ws_width)
FWD_SIMT = KernelSpec(
    "fwd_simt", SIMT_DTYPES,
    lambda dtype, d, arch, keys: tuple((m, n, w, 1) for m, n, w in _simt_candidates(dtype, d)),
    lambda dtype, d, block_m, block_n, stages: _smem_simt_bytes(dtype, d, block_m, block_n),
    short_tile=_simt_short_tile, drops=True)
FWD_DMMA = KernelSpec(
    "fwd_dmma", DMMA_DTYPES,
    lambda dtype, d, arch, keys: tuple((m, n, w, 1) for m, n, w in _DMMA_TABLE[d]),
    lambda dtype, d, block_m, block_n, stages: _smem_dmma_bytes(d, block_m, block_n))
BWD_DKDV_TC = KernelSpec("bwd_dkdv_tc", TC_DTYPES + ("float32",), _tc_table(_BWD_DKDV_TC_TABLE, _TF32_BWD_DKDV_TABLE),
                         lambda dtype, d, block_m, block_n, stages: _smem_bwd_dkdv_tc_bytes(d, block_m, block_n, stages,
                                                                                            _units(dtype)),
                         # 128x128 spills 72 bytes on sm_80; on sm_90a d96 64x128 32 bytes, d256 64x64
                         # 32 bytes (at 255 registers, whatever the per-row bookkeeping)
                         modifier_tile=lambda dtype, d: None if dtype == "float32" else {
                             32: (64, 128, 8, 2), 96: (64, 64, 8, 2), 256: (32, 64, 8, 2)}.get(d),
                         # (64-key tiles read their planes in place: bwd_dkdv_tc_stages_planes)
                         score_planes=lambda dtype, d, block_m, block_n: (
                             _score_plane_bytes(dtype, d, block_m, block_n) if block_n >= 128 else 0),
                         tf32_precisions=("tf32",),
                         short_tile=lambda dtype, d: _BWD_DKDV_TC_SHORT_TILES.get(d) if dtype != "float32" else None,
                         adds_dbias=lambda d: d <= 224,  # (bwd_dkdv_tc.cu's kDbiasFromDs)
                         stores_dq=lambda dtype, d: dtype != "float32" and d <= 224,  # (kStoresDq)
                         drops=True, dropout_tile=_dropout_tile("bwd_dkdv_tc"))
BWD_DKDV_WGMMA = KernelSpec(
    "bwd_dkdv_wgmma", TC_DTYPES,
    lambda dtype, d, arch, keys: (_BWD_DKDV_WGMMA_TABLE[d],) if arch == "90a" and d in _BWD_DKDV_WGMMA_TABLE else (),
    _by_tile(_smem_bwd_dkdv_wgmma_bytes), drops=True)  # Hopper only, d64 and d128: else bwd_dkdv_tc
BWD_DKDV_WGMMA_WS = KernelSpec(
    "bwd_dkdv_wgmma_ws", TC_DTYPES,
    lambda dtype, d, arch, keys: (_BWD_DKDV_WGMMA_WS_TABLE[d],) if arch == "90a" and d in _BWD_DKDV_WGMMA_WS_TABLE else (),
    _by_tile(_smem_bwd_dkdv_wgmma_ws_bytes), tma=True, sums_dbias_by_key=True, drops=True,
    dropout_head_dims=(64,))  # (d128's dropout form spills 126 bytes at the consumers' 240 registers)
BWD_DKDV_WGMMA_X3 = _hopper_tf32x3_spec("bwd_dkdv_wgmma_x3", _BWD_DKDV_WGMMA_X3_TABLE, _smem_bwd_dkdv_wgmma_x3_bytes)
BWD_DKDV_WGMMA_X6 = _hopper_tf32x3_spec("bwd_dkdv_wgmma_x6", _BWD_DKDV_WGMMA_X6_TABLE, _smem_bwd_dkdv_wgmma_x6_bytes,
                                        window=False)  # (causal: 0.92-0.93x bwd_dkdv_wgmma_x3, session 56)
# (bf16x6's piece tiles are whole 64-column panels: the d96 bucket runs the d128 Variant, its
# loads zero-filling the columns past D, as fwd_wgmma_ws's _ws_width: H100 session 58, 1.26-1.45x
# the FFMA kernels at d96.)
BWD_DKDV_WGMMA_X6H = _hopper_tf32x3_spec("bwd_dkdv_wgmma_x6h", _BWD_DKDV_WGMMA_X6H_TABLE, _smem_bwd_dkdv_wgmma_x6h_bytes,
                                         compiled_width=_ws_width)
BWD_DQ_WGMMA_X3 = _hopper_tf32x3_spec("bwd_dq_wgmma_x3", _BWD_DQ_WGMMA_X3_TABLE, _smem_bwd_dq_wgmma_x3_bytes)
BWD_DQ_WGMMA_X6 = _hopper_tf32x3_spec("bwd_dq_wgmma_x6", _BWD_DQ_WGMMA_X6_TABLE, _smem_bwd_dq_wgmma_x6_bytes,
                                      compiled_width=_ws_width)
BWD_DQ_TC = KernelSpec("bwd_dq_tc", TC_DTYPES + ("float32",), _tc_table(_BWD_DQ_TC_TABLE, _TF32_BWD_DQ_TABLE),
                       lambda dtype, d, block_m, block_n, stages: _smem_bwd_dq_tc_bytes(d, block_m, block_n, stages,
                                                                                        _units(dtype)),
                       tf32_precisions=("tf32",), drops=True, dropout_tile=_dropout_tile("bwd_dq_tc"))
BWD_DBIAS_TC = KernelSpec("bwd_dbias_tc", TC_DTYPES, _table(_BWD_DBIAS_TC_TABLE), _by_tile(_smem_bwd_dbias_tc_bytes))
BWD_DKDV_SIMT = KernelSpec(
    "bwd_dkdv_simt", SIMT_DTYPES, _bwd_simt_candidates("bwd_dkdv_simt"),
    lambda dtype, d, block_m, block_n, stages: _smem_bwd_simt_bytes("bwd_dkdv_simt", dtype, d, block_m, block_n),
    lambda block_m, block_n, warps: _bwd_simt_tile_ok("bwd_dkdv_simt", block_m, block_n, warps),
    short_tile=_simt_short_tile, drops=True)
BWD_DQ_SIMT = KernelSpec(
    "bwd_dq_simt", SIMT_DTYPES, _bwd_simt_candidates("bwd_dq_simt"),
    lambda dtype, d, block_m, block_n, stages: _smem_bwd_simt_bytes("bwd_dq_simt", dtype, d, block_m, block_n),
    lambda block_m, block_n, warps: _bwd_simt_tile_ok("bwd_dq_simt", block_m, block_n, warps),
    short_tile=_simt_short_tile, drops=True)
# The kScoreMods forms' tiles where the first candidate's spill (dkdv d64: 24 bytes on sm_90a, 8
# keys per warp instead; d128: 24 bytes on sm_90a; dq d32: 24 bytes on sm_80).
BWD_DKDV_DMMA = _bwd_dmma_spec("bwd_dkdv_dmma", _BWD_DKDV_DMMA_TABLE,
                               {64: (32, 64, 8, 1), 128: (8, 32, 4, 1)})  # column slices from d192
BWD_DQ_DMMA = _bwd_dmma_spec("bwd_dq_dmma", _BWD_DQ_DMMA_TABLE, {32: (64, 32, 4, 1)})
BWD_DELTA = KernelSpec("bwd_delta", DTYPES, lambda *_: (_BWD_PREP_TILE,), lambda *_: 0, masked=False)
BWD_DQ_CONVERT = KernelSpec("bwd_dq_convert", DTYPES, lambda *_: (_BWD_PREP_TILE,), lambda *_: 0, masked=False)

SPECS = {spec.kernel: spec for spec in (FWD_TC, FWD_WGMMA, FWD_WGMMA_WS, FWD_SIMT, FWD_DMMA,
                                        BWD_DKDV_TC, BWD_DKDV_WGMMA, BWD_DKDV_WGMMA_WS, BWD_DKDV_WGMMA_X6,
                                        BWD_DKDV_WGMMA_X6H, BWD_DKDV_WGMMA_X3, BWD_DQ_WGMMA_X6, BWD_DQ_WGMMA_X3,
                                        BWD_DQ_TC, BWD_DBIAS_TC, BWD_DKDV_SIMT, BWD_DQ_SIMT,
                                        BWD_DKDV_DMMA, BWD_DQ_DMMA, BWD_DELTA, BWD_DQ_CONVERT)}

# The families that serve each dtype, in order of preference: the first with a tile for the
# problem's bucket and arch runs it.
FORWARD = {
    "float16": (FWD_WGMMA_WS, FWD_WGMMA, FWD_TC),
    "bfloat16": (FWD_WGMMA_WS, FWD_WGMMA, FWD_TC),
    # TF32 tensor cores under precision="tf32" (mma.sync) and "highest" (3xTF32 up to d64: on
    # Hopper's warpgroup MMAs, else mma.sync; tf32_precisions), else FFMA
    "float32": (FWD_WGMMA, FWD_TC, FWD_SIMT),
    "float64": (FWD_DMMA, FWD_SIMT),  # fp64 tensor cores where a tile fits (not d >= 224 on 99 KB parts)
}
# float32: under "highest" on Hopper bf16x6 or 3xTF32 where a kernel has the bucket (dK/dV: up to
# d64 and d97-128; the deterministic dQ up to d64), TF32 tensor cores under precision="tf32" where
# a tile fits (tf32_precisions), else FFMA;
# float64: the fp64 tensor cores (DMMA) where a tile fits (every bucket on sm_80 and sm_90a; dK/dV
# from d192 in column slices), else DFMA (99 KB parts from d192).
BACKWARD_DKDV = {"float16": (BWD_DKDV_WGMMA_WS, BWD_DKDV_WGMMA, BWD_DKDV_TC),
                 "bfloat16": (BWD_DKDV_WGMMA_WS, BWD_DKDV_WGMMA, BWD_DKDV_TC),
                 "float32": (BWD_DKDV_WGMMA_X6, BWD_DKDV_WGMMA_X6H, BWD_DKDV_WGMMA_X3, BWD_DKDV_TC, BWD_DKDV_SIMT),
                 "float64": (BWD_DKDV_DMMA, BWD_DKDV_SIMT)}
BACKWARD_DQ = {"float16": (BWD_DQ_TC,), "bfloat16": (BWD_DQ_TC,), "float32": (BWD_DQ_WGMMA_X6, BWD_DQ_WGMMA_X3, BWD_DQ_TC, BWD_DQ_SIMT),
               "float64": (BWD_DQ_DMMA, BWD_DQ_SIMT)}


def _first(families, dtype: str, head_dim: int, has_window: bool, arch: str, visible_keys: float = math.inf,
           score_mods: bool = False, precision: str = "highest", tma: bool = True, short: bool = False,
           dropout: bool = False) -> Variant:
    for spec in families:
        if spec.tma and not tma:
            continue
        variant = spec.variant(dtype, head_dim, has_window, arch, visible_keys, score_mods, precision, short, dropout)
        if variant is not None:
            return variant
    raise ValueError(f"no {families[-1].kernel} tile for {dtype} d{head_dim} fits the shared memory of sm_{arch}")


def _families(table: dict, dtype: str):
    if dtype not in table:
        raise TypeError(f"cuflash: unsupported dtype {dtype}")
    return table[dtype]


def select(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str,
           visible_keys: float = math.inf, score_mods: bool = False, precision: str = "highest",
           tma: bool = True, short: bool = False, dropout: bool = False) -> Variant:
    """The forward's Variant. ``visible_keys``: mean keys per query row under the mask (plan.py);
    short rows (short causal sequences, narrow windows) may take smaller tiles. ``score_mods``:
    softcap, a bias, ALiBi or a mask (sinks alone run the plain Variants). ``precision``: float32's
    (_spec.resolve_precision), which decides between TF32 tensor cores and FFMA. ``tma``: whether
    tensor maps can describe the call's layout (plan._tensor_maps); False skips the TMA family.
    ``short``: no sequence longer than SHORT_ROWS, queries or keys (the families' short_tile).
    ``dropout``: the call drops probabilities (families whose kernels do: KernelSpec.drops)."""
    families = _families(FORWARD, dtype)
    return _first(families, dtype, bucket(max(head_dim, head_dim_v)), has_window, arch, visible_keys, score_mods,
                  precision, tma, short, dropout)


class BackwardVariants(NamedTuple):
    """The backward's kernels, in launch order: delta, then dkdv, then dq or dq_convert."""

    delta: Variant       # delta = rowsum(dO o O); zeroes dq_accum on the atomic path
    dkdv: Variant        # dK, dV over key tiles (and dQ by atomics into dq_accum)
    dq: Variant          # deterministic dQ over query tiles
    dq_convert: Variant  # dQ = scale * dq_accum in the input type (atomic path)


def select_backward(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str,
                    score_mods: bool = False, precision: str = "highest", tma: bool = True,
                    short: bool = False, dropout: bool = False) -> BackwardVariants:
    """The backward's kernels for one problem (one path for every dtype; ``precision``, ``tma`` and
    ``dropout`` as select's; ``short``: no sequence longer than SHORT_ROWS, queries or keys)."""
    dkdv_families = _families(BACKWARD_DKDV, dtype)
    d = bucket(max(head_dim, head_dim_v))
    return BackwardVariants(
        _first((BWD_DELTA,), dtype, d, False, arch),
        _first(dkdv_families, dtype, d, has_window, arch, score_mods=score_mods, precision=precision, tma=tma,
               short=short, dropout=dropout),
        _first(BACKWARD_DQ[dtype], dtype, d, has_window, arch, score_mods=score_mods, precision=precision,
               short=short, dropout=dropout),
        _first((BWD_DQ_CONVERT,), dtype, d, False, arch),
    )


def select_dbias(dtype: str, head_dim: int, head_dim_v: int, arch: str, dropout: bool = False) -> Variant | None:
    """The kernel that sums a bias's gradient on chip (bwd_dbias_tc), or None where the dS buffer
    stays (the dtype or head dim has no tile, none fits the arch, or the call drops probabilities:
    the kernel recomputes dS without dropout)."""
    return BWD_DBIAS_TC.variant(dtype, bucket(max(head_dim, head_dim_v)), True, arch, score_mods=True, dropout=dropout)


def precisions_of(dtype: str, wanted=PRECISIONS) -> tuple[str, ...]:
    """The ``precision=`` values among ``wanted`` that select Variants of ``dtype``: float32's
    (they choose between TF32 tensor cores and FFMA); every other dtype has "highest" alone."""
    return tuple(wanted) if dtype == "float32" else ("highest",)


def all_variants(arch: str) -> list[Variant]:
    """Every Variant ``select`` and ``select_backward`` can return for ``arch`` (a bucket with no
    tile that fits the arch, e.g. the float64 d256 backward on 99 KB parts, has none)."""
    out = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for masked, mods in ((False, False), (True, False), (True, True)):
                for keys in (0, math.inf):
                    for precision in precisions_of(dtype):
                        for tma in (True, False):
                            for short in (False, True):
                                out.append(select(dtype, d, d, masked, arch, keys, mods, precision, tma, short))
                for precision in precisions_of(dtype):
                    for tma in (True, False):
                        for short in (False, True):
                            try:
                                out += select_backward(dtype, d, d, masked, arch, mods, precision, tma, short)
                            except ValueError:
                                pass
                if mods and select_dbias(dtype, d, d, arch) is not None:
                    out.append(select_dbias(dtype, d, d, arch))
            for precision in precisions_of(dtype):  # the dropout forms (always masked and modified)
                for tma in (True, False):
                    for short in (False, True):
                        out.append(select(dtype, d, d, True, arch, score_mods=True, precision=precision, tma=tma,
                                          short=short, dropout=True))
                        try:
                            out += select_backward(dtype, d, d, True, arch, True, precision, tma, short, dropout=True)
                        except ValueError:
                            pass
    return list(dict.fromkeys(out))


def shared_memory_bytes(variant: Variant) -> int:
    return SPECS[variant.kernel].shared_memory_bytes(variant)
