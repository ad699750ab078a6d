"""The NumPy mirror of ``struct FwdParams`` in ``cuda_src/params.cuh``.

A structured scalar of this dtype is passed to the kernel by value. ``align=True`` gives C's
natural alignment; tests/test_pipeline.py compiles ``static_assert``s on every offset and on
the size, so the two layouts cannot drift apart silently.
"""
from __future__ import annotations

import numpy

MAX_BATCH_DIMS = 4

# FwdParams::key_rows (params.cuh's KeyRows): which rows of a key-padding mask a launch takes.
ALL_KEY_ROWS, PREFIX_KEY_ROWS, OTHER_KEY_ROWS = 0, 1, 2

_B = (MAX_BATCH_DIMS,)

# params.cuh's FastDivisor: n / d as a multiply-high and a shift (fast_divisor).
FAST_DIVISOR_DTYPE = numpy.dtype([("mul", numpy.uint32), ("shift", numpy.uint32)], align=True)


def fast_divisor(d: int) -> tuple[int, int]:
    """(mul, shift) of FastDivisor for 1 <= d < 2^31: with l = ceil(log2 d), mul = floor(2^32
    (2^l - d) / d) + 1 and shift = l, so that n // d == ((n * mul >> 32) + n) >> shift for
    0 <= n < 2^31 (params.cuh says why)."""
    if not 1 <= d < 2 ** 31:
        raise ValueError(f"cuflash: a divisor must lie in [1, 2^31), got {d}")
    log2 = (d - 1).bit_length()
    return (2 ** 32 * (2 ** log2 - d)) // d + 1, log2


def set_row_shape(fwd, batch_shape, num_heads: int, kv_group: int) -> None:
    """FwdParams' decomposition of an attention row (params.cuh's BatchCoords): the batch shape
    (MAX_BATCH_DIMS entries, outermost first), the query heads and the GQA group, each with its
    FastDivisor."""
    fwd["batch_shape"] = batch_shape
    fwd["num_heads"] = num_heads
    fwd["kv_group"] = kv_group
    for d, size in enumerate(batch_shape):
        fwd["batch_div"][d] = fast_divisor(int(size))
    fwd["heads_div"] = fast_divisor(int(num_heads))
    fwd["kv_group_div"] = fast_divisor(int(kv_group))


def set_dkv_group(bwd, heads_per_block: int, dkv_adds: bool) -> None:
    """BwdParams' dK/dV grouping: heads_per_block query heads per block, whether split groups
    add into shared sums (dkv_adds), and the divisor of a query head's dk / dv head (kv_group
    with adds, else heads_per_block; set_row_shape's kv_group first)."""
    bwd["heads_per_block"] = heads_per_block
    bwd["dkv_adds"] = int(dkv_adds)
    bwd["dkv_group_div"] = fast_divisor(int(bwd["fwd"]["kv_group"]) if dkv_adds else int(heads_per_block))


def field_offset(dtype, name: str) -> int:
    """The byte offset of field ``name`` ("fwd.q" reaches into a nested struct)."""
    offset, fields = 0, dtype
    for part in name.split("."):
        sub, at = fields.fields[part][:2]
        offset, fields = offset + at, sub
    return offset


def pointer_words(dtype, names) -> numpy.ndarray:
    """Word (8-byte) indices of the pointer fields ``names``."""
    offsets = [field_offset(dtype, name) for name in names]
    assert all(offset % 8 == 0 for offset in offsets)
    return numpy.array([offset // 8 for offset in offsets], dtype=numpy.intp)


FWD_PARAMS_DTYPE = numpy.dtype(
    [
        ("q", numpy.uint64),
        ("k", numpy.uint64),
        ("v", numpy.uint64),
        ("o", numpy.uint64),
        ("lse", numpy.uint64),
        ("q_batch_stride", numpy.int64, _B),
        ("k_batch_stride", numpy.int64, _B),
        ("v_batch_stride", numpy.int64, _B),
        ("o_batch_stride", numpy.int64, _B),
        ("lse_batch_stride", numpy.int64, _B),
        ("q_head_stride", numpy.int64),
        ("k_head_stride", numpy.int64),
        ("v_head_stride", numpy.int64),
        ("o_head_stride", numpy.int64),
        ("lse_head_stride", numpy.int64),
        ("q_row_stride", numpy.int64),
        ("k_row_stride", numpy.int64),
        ("v_row_stride", numpy.int64),
        ("o_row_stride", numpy.int64),
        ("batch_shape", numpy.int32, _B),
        ("num_heads", numpy.int32),
        ("kv_group", numpy.int32),
        ("seqlen_q", numpy.int32),
        ("seqlen_k", numpy.int32),
        ("head_dim", numpy.int32),
        ("head_dim_v", numpy.int32),
        ("window_left", numpy.int32),
        ("window_right", numpy.int32),
        ("diag_offset", numpy.int32),
        ("heads_per_section", numpy.int32),
        ("scale", numpy.float64),
        ("scale_log2", numpy.float32),
        ("diag_bottom_right", numpy.int32),
        ("softcap", numpy.float64),
        ("alibi_slopes", numpy.uint64),
        ("sinks", numpy.uint64),
        ("cu_seqlens_q", numpy.uint64),
        ("cu_seqlens_k", numpy.uint64),
        ("seqused_k", numpy.uint64),
        ("bias", numpy.uint64),
        ("mask", numpy.uint64),
        ("score_rows", numpy.uint64),
        ("bias_row_stride", numpy.int32),
        ("bias_col_stride", numpy.int32),
        ("mask_row_stride", numpy.int32),
        ("mask_col_stride", numpy.int32),
        ("key_bounds", numpy.uint64),
        ("key_rows", numpy.int32),
        ("query_tiles", numpy.int32),
        ("dropout_threshold", numpy.uint32),
        ("dropout_scale", numpy.float64),
        ("dropout_seed", numpy.uint64),
        ("batch_div", FAST_DIVISOR_DTYPE, _B),
        ("heads_div", FAST_DIVISOR_DTYPE),
        ("kv_group_div", FAST_DIVISOR_DTYPE),
        ("mask_spans", numpy.uint64),
        ("mask_tile_planes", numpy.uint64),
        ("mask_tile_rows", numpy.int32),
        ("mask_tile_cols", numpy.int32),
    ],
    align=True,
)


BWD_PARAMS_DTYPE = numpy.dtype(
    [
        ("fwd", FWD_PARAMS_DTYPE),
        ("dout", numpy.uint64),
        ("dq", numpy.uint64),
        ("dk", numpy.uint64),
        ("dv", numpy.uint64),
        ("dq_accum", numpy.uint64),
        ("delta", numpy.uint64),
        ("dbias", numpy.uint64),
        ("dout_batch_stride", numpy.int64, _B),
        ("dq_batch_stride", numpy.int64, _B),
        ("dk_batch_stride", numpy.int64, _B),
        ("dv_batch_stride", numpy.int64, _B),
        ("dout_head_stride", numpy.int64),
        ("dq_head_stride", numpy.int64),
        ("dk_head_stride", numpy.int64),
        ("dv_head_stride", numpy.int64),
        ("dout_row_stride", numpy.int64),
        ("dq_row_stride", numpy.int64),
        ("dk_row_stride", numpy.int64),
        ("dv_row_stride", numpy.int64),
        ("heads_per_block", numpy.int32),
        ("dkv_adds", numpy.int32),
        ("dbias_chunks", numpy.int32),
        ("dbias_sum", numpy.uint64),
        ("dbias_rows", numpy.uint64),
        ("dbias_rows_per_plane", numpy.int32),
        ("dbias_chunk_rows", numpy.int32),
        ("dbias_keys", numpy.uint64),
        ("dbias_planes", numpy.uint64),
        ("dkv_group_div", FAST_DIVISOR_DTYPE),
        ("dq_direct", numpy.int32),
    ],
    align=True,
)


TMA_MAPS = ("q_map", "k_map", "v_map")  # FwdTmaParams' tensor maps, of q, k and v
BWD_TMA_MAPS = TMA_MAPS + ("dout_map",)  # BwdTmaParams'


def _tma_params_dtype(name: str, base: numpy.dtype, maps: tuple[str, ...]) -> numpy.dtype:
    """A struct of ``base`` (field ``name``) then 128-byte tensor maps (ptx::TensorMap,
    alignas(64)), padded to 64 bytes: FwdTmaParams, BwdTmaParams."""
    first = -(-base.itemsize // 64) * 64
    return numpy.dtype({
        "names": [name, *maps],
        "formats": [base] + [(numpy.uint64, (16,))] * len(maps),
        "offsets": [0] + [first + 128 * i for i in range(len(maps))],
        "itemsize": first + 128 * len(maps),
    })


FWD_TMA_PARAMS_DTYPE = _tma_params_dtype("fwd", FWD_PARAMS_DTYPE, TMA_MAPS)

BWD_TMA_PARAMS_DTYPE = _tma_params_dtype("bwd", BWD_PARAMS_DTYPE, BWD_TMA_MAPS)

def layout_probe_source(struct: str = "cuflash::FwdParams", dtype: numpy.dtype = FWD_PARAMS_DTYPE) -> str:
    """A kernel that stores sizeof(struct) and each field's offset, in ``dtype.names`` order.

    NVRTC has no offsetof, so the offsets are taken as pointer differences inside an instance;
    the compiler folds them into constants, and tests read those constants out of the PTX.
    """
    lines = [
        '#include "params.cuh"',
        'extern "C" __global__ void cuflash_layout_probe(long long* out) {',
        f"    {struct} s;",
        f"    out[0] = (long long)sizeof({struct});",
    ]
    for index, name in enumerate(dtype.names, start=1):
        lines.append(f"    out[{index}] = (long long)((const char*)&s.{name} - (const char*)&s);")
    lines.append("}")
    return "\n".join(lines) + "\n"
