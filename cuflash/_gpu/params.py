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
