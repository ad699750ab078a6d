"""Tile shapes: the one place that chooses a kernel Variant for a problem.

``select`` maps (dtype, head dims, mask kind, arch, and the mean number of keys a query row
sees) to a Variant; ``all_variants`` lists every
Variant ``select`` can return for an arch (CI compiles each for sm_80 and sm_90a and checks
ptxas reports no spills); ``shared_memory_bytes`` is the dynamic shared memory each kernel
expects, which the kernel also checks at entry.

Two kernels: ``fwd_tc`` (float16 / bfloat16, tensor cores) and ``fwd_simt`` (float32 /
float64, exact). Each has its own ``_select_*`` / ``_variants_*`` / ``_smem_*`` below; the
public functions only dispatch on dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .kernels import Variant

# Head-dim tiles of the tensor-core kernel: D and Dv are zero-padded up to the next one.
TC_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
# Head-dim tiles of the exact fp32/fp64 kernel.
SIMT_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
MAX_HEAD_DIM = 256

def bucket(width: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if width <= b:
            return b
    raise ValueError(f"head dim {width} exceeds the supported maximum {buckets[-1]}")


# --------------------------------------------------------------------------- dispatch
# Exact float32/float64 inputs go to the SIMT kernel (fwd_simt); 16-bit inputs to the
# tensor-core kernel. The tensor-core functions (_select_tc, _tc_variants, _smem_tc) belong to
# the tensor-core work; the SIMT ones (_select_simt, _simt_variants, _smem_simt) below.

SIMT_DTYPES = ("float32", "float64")


def select(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str,
           visible_keys: float = math.inf) -> Variant:
    """The forward's Variant. ``visible_keys``: mean keys per query row under the mask (plan.py);
    short rows (short causal sequences, narrow windows) may take smaller tiles."""
    if dtype in DMMA_DTYPES:  # float64 on the fp64 tensor cores where a tile fits, else fwd_simt
        variant = _select_dmma(dtype, head_dim, head_dim_v, has_window, arch)
        if variant is not None:
            return variant
    if dtype in SIMT_DTYPES:
        return _select_simt(dtype, head_dim, head_dim_v, has_window, arch)
    return _select_tc(dtype, head_dim, head_dim_v, has_window, arch, visible_keys)


class BackwardVariants(NamedTuple):
    """The backward's kernels, in launch order: delta, then dkdv, then dq or dq_convert."""

    delta: Variant       # delta = rowsum(dO o O); zeroes dq_accum on the atomic path
    dkdv: Variant        # dK, dV over key tiles (and dQ by atomics into dq_accum)
    dq: Variant          # deterministic dQ over query tiles
    dq_convert: Variant  # dQ = scale * dq_accum in the input type (atomic path)


def select_backward(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str) -> BackwardVariants:
    """The backward's kernels for one problem (one path for every dtype)."""
    if dtype in SIMT_DTYPES:
        return _select_bwd_simt(dtype, head_dim, head_dim_v, has_window, arch)
    return _select_bwd_tc(dtype, head_dim, head_dim_v, has_window, arch)


def all_variants(arch: str) -> list[Variant]:
    return list(dict.fromkeys(
        _tc_variants(arch) + _simt_variants(arch) + _dmma_variants(arch) + _bwd_tc_variants(arch) + _bwd_simt_variants(arch)
    ))


def shared_memory_bytes(variant: Variant) -> int:
    return _SMEM_BY_KERNEL[variant.kernel](variant)


# --------------------------------------------------------------------------- tensor cores

# Per head-dim bucket, candidate (block_m, block_n, warps, stages), best first; the first whose
# shared memory fits the arch is taken. A warp owns block_m / warps query rows (16 or 32): 32
# rows per warp halves the shared-memory reads per MMA (each K/V fragment feeds two m-tiles;
# +10% at d=128 on H100) but doubles the accumulator registers, so d <= 128 uses 32 rows per
# warp with a key tile small enough for ptxas to allocate without spilling (255 registers),
# and wider heads 16 rows per warp. The last candidates keep every bucket runnable on 99 KB
# parts (sm_86, sm_89, sm_120). Every choice compiles spill-free for sm_80 and sm_90a.
# Measured on H100: benchmarks/NOTES.md.
TC_DTYPES = ("float16", "bfloat16")

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


def _smem_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of fwd_tc.cu's kSmemBytes: a Q tile and `stages` (K tile, V tile) pairs of 16-bit
    elements, each row padded by one 16-byte chunk (tile_tc.cuh's SmemTile)."""
    pitch = (head_dim // 8 + 1) * 16
    return (block_m + stages * 2 * block_n) * pitch


def _tc_variant(dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant:
    limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
    for block_m, block_n, warps, stages in _TC_TABLE[head_dim]:
        if _smem_tc_bytes(head_dim, block_m, block_n, stages) <= limit:
            return Variant("fwd_tc", dtype, head_dim, block_m, block_n, warps, stages, has_window, arch)
    raise ValueError(f"no fwd_tc tile for {dtype} d{head_dim} fits sm_{arch}")


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


def _smem_fwd_wgmma_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of fwd_wgmma.cu's kSmemBytes."""
    return 1024 + 2 * head_dim * (block_m + stages * 2 * block_n)


def _smem_fwd_wgmma(variant: Variant) -> int:
    return _smem_fwd_wgmma_bytes(variant.head_dim, variant.block_m, variant.block_n, variant.stages)



def _select_tc(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str,
               visible_keys: float = math.inf) -> Variant:
    if dtype not in TC_DTYPES:
        raise TypeError(f"cuflash: unsupported dtype {dtype}")
    d = bucket(max(head_dim, head_dim_v), TC_HEAD_DIMS)
    rows = _FWD_WGMMA_TABLE.get(d, ()) if arch == "90a" else ()
    tile = next((tile for most_keys, tile in rows if visible_keys <= most_keys), None)
    if tile is not None:
        return Variant("fwd_wgmma", dtype, d, *tile, has_window, arch)
    return _tc_variant(dtype, d, has_window, arch)


def _tc_variants(arch: str) -> list[Variant]:
    return list(dict.fromkeys(
        _select_tc(dtype, d, d, w, arch, keys)
        for dtype in TC_DTYPES
        for d in TC_HEAD_DIMS
        for w in (False, True)
        for keys in (0, math.inf)
    ))


def _smem_tc(variant: Variant) -> int:
    return _smem_tc_bytes(variant.head_dim, variant.block_m, variant.block_n, variant.stages)


# --------------------------------------------------------------------------- SIMT (fp32/fp64)
# fwd_simt: a block of `warps` warps owns block_m query rows, two row groups of 16 lanes per
# warp, so a lane holds TM = block_m / (2 warps) rows, TN = block_n / 16 keys of S and
# TD = head_dim / 16 output columns. Registers grow with TM * TD (the accumulator) and
# TM * TN (the S tile); shared memory holds Q^T, K, V and P^T tiles, each row padded by
# 16 bytes. Candidates are in order of preference; the first that fits the arch's shared
# memory is taken (the large tiles are for sm_80 / sm_90, the small ones keep every head dim
# runnable on 99 KB parts).

_SIMT_ITEMSIZE = {"float32": 4, "float64": 8}

# Largest dynamic shared memory one block may opt into, by arch.
_SMEM_LIMIT = {"80": 166912, "87": 166912, "90": 232448, "90a": 232448, "100": 232448, "100a": 232448}
_SMEM_LIMIT_DEFAULT = 101376  # sm_86, sm_89, sm_120: 99 KB

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


def _smem_simt_bytes(dtype: str, head_dim: int, block_m: int, block_n: int) -> int:
    item = _SIMT_ITEMSIZE[dtype]
    pad = 16 // item
    ld_q, ld_kv = block_m + pad, head_dim + pad
    # Qt [d][m]  K [n][d]  V [n][d]  Pt [n][m]
    return item * (head_dim * ld_q + 2 * block_n * ld_kv + block_n * ld_q)


def _simt_variant(dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant:
    limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
    for block_m, block_n, warps in _simt_candidates(dtype, head_dim):
        if _smem_simt_bytes(dtype, head_dim, block_m, block_n) <= limit:
            return Variant("fwd_simt", dtype, head_dim, block_m, block_n, warps, 1, has_window, arch)
    raise ValueError(f"no fwd_simt tile for {dtype} d{head_dim} fits sm_{arch}")


def _select_simt(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str) -> Variant:
    return _simt_variant(dtype, bucket(max(head_dim, head_dim_v), SIMT_HEAD_DIMS), has_window, arch)


def _simt_variants(arch: str) -> list[Variant]:
    return [
        _simt_variant(dtype, d, w, arch)
        for dtype in SIMT_DTYPES
        for d in SIMT_HEAD_DIMS
        for w in (False, True)
    ]


def _smem_simt(variant: Variant) -> int:
    return _smem_simt_bytes(variant.dtype, variant.head_dim, variant.block_m, variant.block_n)


# --------------------------------------------------------------------------- DMMA (fp64 tensor cores)
# fwd_dmma: float64 on mma.sync m8n8k4 .f64 (sm_80+). A block of `warps` warps owns block_m
# query rows, block_m / warps per warp (8 or 16: one or two 8-row MMA tiles), each warp every
# key of the tile and every output column. Per lane: 2 * (rows / 8) * (block_n / 8) doubles of
# S and 2 * (rows / 8) * (head_dim / 8) of acc, so d <= 128 takes 16 rows per warp (fewer keys
# as d grows) and wider heads 8. Shared memory: Q, K, V tiles row-major, rows of head_dim + 2
# doubles. Candidates (block_m, block_n, warps) best first; the first that fits the arch's
# shared memory is taken; where none fits (float64 d >= 224 on 99 KB parts) fwd_simt runs.
# Every candidate compiles spill-free for sm_80 and sm_90a (162-254 registers, 1 block min).
DMMA_DTYPES = ("float64",)

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


def _dmma_variant(dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant | None:
    limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
    for block_m, block_n, warps in _DMMA_TABLE[head_dim]:
        if _smem_dmma_bytes(head_dim, block_m, block_n) <= limit:
            return Variant("fwd_dmma", dtype, head_dim, block_m, block_n, warps, 1, has_window, arch)
    return None


def _select_dmma(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str) -> Variant | None:
    return _dmma_variant(dtype, bucket(max(head_dim, head_dim_v), SIMT_HEAD_DIMS), has_window, arch)


def _dmma_variants(arch: str) -> list[Variant]:
    out = [_dmma_variant(dtype, d, w, arch) for dtype in DMMA_DTYPES for d in SIMT_HEAD_DIMS for w in (False, True)]
    return [v for v in out if v is not None]


def _smem_dmma(variant: Variant) -> int:
    return _smem_dmma_bytes(variant.head_dim, variant.block_m, variant.block_n)


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


def _tc_pitch(width: int) -> int:
    """Bytes per row of a 16-bit SmemTile of `width` columns (one padding chunk)."""
    return (width // 8 + 1) * 16


def _smem_bwd_dkdv_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dkdv_tc.cu's kSmemBytes."""
    kv = 2 * block_n * _tc_pitch(head_dim)
    p_ds = 2 * block_m * _tc_pitch(block_n)
    stage = 2 * block_m * _tc_pitch(head_dim) + 2 * block_m * 4
    return kv + p_ds + stages * stage


def _smem_bwd_dq_tc_bytes(head_dim: int, block_m: int, block_n: int, stages: int) -> int:
    """Mirror of bwd_dq_tc.cu's kSmemBytes: Q, dO and `stages` (K, V) pairs."""
    return (2 * block_m + stages * 2 * block_n) * _tc_pitch(head_dim)


def _bwd_tc_variant(kernel: str, dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant:
    table, smem = {
        "bwd_dkdv_tc": (_BWD_DKDV_TC_TABLE, _smem_bwd_dkdv_tc_bytes),
        "bwd_dq_tc": (_BWD_DQ_TC_TABLE, _smem_bwd_dq_tc_bytes),
    }[kernel]
    limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
    for block_m, block_n, warps, stages in table[head_dim]:
        if smem(head_dim, block_m, block_n, stages) <= limit:
            return Variant(kernel, dtype, head_dim, block_m, block_n, warps, stages, has_window, arch)
    raise ValueError(f"no {kernel} tile for {dtype} d{head_dim} fits sm_{arch}")


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


def _bwd_dkdv_variant(dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant:
    """bwd_dkdv_wgmma on sm_90a where a tile exists for the bucket, else bwd_dkdv_tc."""
    tile = _BWD_DKDV_WGMMA_TABLE.get(head_dim) if arch == "90a" else None
    if tile is None:
        return _bwd_tc_variant("bwd_dkdv_tc", dtype, head_dim, has_window, arch)
    block_m, block_n, warps, stages = tile
    return Variant("bwd_dkdv_wgmma", dtype, head_dim, block_m, block_n, warps, stages, has_window, arch)


def _select_bwd_tc(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str) -> BackwardVariants:
    if dtype not in TC_DTYPES:
        raise TypeError(f"cuflash: unsupported dtype {dtype}")
    d = bucket(max(head_dim, head_dim_v), TC_HEAD_DIMS)
    return BackwardVariants(
        _bwd_prep_variant("bwd_delta", dtype, d, arch),
        _bwd_dkdv_variant(dtype, d, has_window, arch),
        _bwd_tc_variant("bwd_dq_tc", dtype, d, has_window, arch),
        _bwd_prep_variant("bwd_dq_convert", dtype, d, arch),
    )


def _bwd_tc_variants(arch: str) -> list[Variant]:
    return [
        v
        for dtype in TC_DTYPES
        for d in TC_HEAD_DIMS
        for w in (False, True)
        for v in _select_bwd_tc(dtype, d, d, w, arch)
    ]


def _smem_bwd_dkdv_tc(variant: Variant) -> int:
    return _smem_bwd_dkdv_tc_bytes(variant.head_dim, variant.block_m, variant.block_n, variant.stages)


def _smem_bwd_dkdv_wgmma(variant: Variant) -> int:
    return _smem_bwd_dkdv_wgmma_bytes(variant.head_dim, variant.block_m, variant.block_n, variant.stages)


def _smem_bwd_dq_tc(variant: Variant) -> int:
    return _smem_bwd_dq_tc_bytes(variant.head_dim, variant.block_m, variant.block_n, variant.stages)


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


def _bwd_simt_variant(kernel: str, dtype: str, head_dim: int, has_window: bool, arch: str) -> Variant:
    limit = _SMEM_LIMIT.get(arch, _SMEM_LIMIT_DEFAULT)
    first = next(tiles for d, tiles in _BWD_SIMT_FIRST[(kernel, dtype)] if head_dim <= d)
    for block_m, block_n, warps in dict.fromkeys(first + _BWD_SIMT_FALLBACK):
        if (_bwd_simt_tile_ok(kernel, block_m, block_n, warps)
                and _smem_bwd_simt_bytes(kernel, dtype, head_dim, block_m, block_n) <= limit):
            return Variant(kernel, dtype, head_dim, block_m, block_n, warps, 1, has_window, arch)
    raise ValueError(f"no {kernel} tile for {dtype} d{head_dim} fits the shared memory of sm_{arch}")


def _select_bwd_simt(dtype: str, head_dim: int, head_dim_v: int, has_window: bool, arch: str) -> BackwardVariants:
    d = bucket(max(head_dim, head_dim_v), SIMT_HEAD_DIMS)
    return BackwardVariants(
        _bwd_prep_variant("bwd_delta", dtype, d, arch),
        _bwd_simt_variant("bwd_dkdv_simt", dtype, d, has_window, arch),
        _bwd_simt_variant("bwd_dq_simt", dtype, d, has_window, arch),
        _bwd_prep_variant("bwd_dq_convert", dtype, d, arch),
    )


def _bwd_simt_variants(arch: str) -> list[Variant]:
    out = []
    for dtype in SIMT_DTYPES:
        for d in SIMT_HEAD_DIMS:
            for w in (False, True):
                try:
                    out += _select_bwd_simt(dtype, d, d, w, arch)
                except ValueError:  # float64 d256 on 99 KB parts: no backward tile fits
                    pass
    return out


def _smem_bwd_simt(variant: Variant) -> int:
    return _smem_bwd_simt_bytes(variant.kernel, variant.dtype, variant.head_dim, variant.block_m, variant.block_n)


# --------------------------------------------------------------------------- backward, delta and dQ conversion
# bwd_delta (delta = rowsum(dO o O), dq_accum zeroed) and bwd_dq_convert (dQ = scale * dq_accum
# in the input type), cuda_src/bwd_prep.cuh: memory-bound, every dtype, no shared memory, no
# mask. A block of 4 warps owns block_m = 64 query rows (block_n is unused and set equal);
# the head-dim bucket only bounds the unrolled chunk loop.
_BWD_PREP_TILE = (64, 64, 4, 1)  # block_m, block_n, warps, stages


def _bwd_prep_variant(kernel: str, dtype: str, head_dim: int, arch: str) -> Variant:
    block_m, block_n, warps, stages = _BWD_PREP_TILE
    return Variant(kernel, dtype, head_dim, block_m, block_n, warps, stages, False, arch)


# --------------------------------------------------------------------------- per kernel
_SMEM_BY_KERNEL = {
    "bwd_delta": lambda variant: 0,
    "bwd_dq_convert": lambda variant: 0,
    "fwd_tc": _smem_tc,
    "fwd_wgmma": _smem_fwd_wgmma,
    "fwd_simt": _smem_simt,
    "fwd_dmma": _smem_dmma,
    "bwd_dkdv_tc": _smem_bwd_dkdv_tc,
    "bwd_dkdv_wgmma": _smem_bwd_dkdv_wgmma,
    "bwd_dq_tc": _smem_bwd_dq_tc,
    "bwd_dkdv_simt": _smem_bwd_simt,
    "bwd_dq_simt": _smem_bwd_simt,
}
