"""The float64 backward on the fp64 tensor cores (cuda_src/bwd_dkdv_dmma.cu, bwd_dq_dmma.cu).

Without a GPU: which kernels the dispatcher gives float64 (DMMA where a tile fits, the SIMT ones
elsewhere), and the SIMT fallbacks of 99 KB parts, which no Variant of sm_80 / sm_90a reaches any
more, compile without spills; bwd_dkdv_dmma's column slices (d192-d256): the host's mirror is the
kernel's count, and the warps' slices cover every key and column of dK and dV exactly once; where
a key group's slices share S^T and dP^T (tiles.dkdv_dmma_shares, the kernel's own), each (key,
query) pair is computed by one warp and exchanged only within its group.
On a GPU (marked ``gpu``): the DMMA kernels' edges against the float64 reference under the
repository's tolerance rule (tests/tolerance.py): odd head dims zero-padded to the bucket, one
query or one key, Lq != Lk both ways, GQA (dK/dV summed over the group on chip, and over slices of
it when the group is split), both causal alignments and windows, score modifiers, both dQ paths,
bitwise replay of the deterministic one; the column-sliced buckets (177, 192, 213, 250, 256; D !=
Dv both ways) on the same problems, and query counts that split unevenly over a key group's
shared S^T / dP^T (Lq 1-40); and the SIMT kernels, forced through tiles' tables, on the
same problems (they still run the buckets and parts without a DMMA tile).
"""
from __future__ import annotations

import concurrent.futures
import os

import numpy
import pytest

from reference import attention_backward_magnitudes, attention_backward_ref, score_mods_ref
from tolerance import assert_close

from cuflash._gpu import kernels, tiles

SLICED_BUCKETS = (192, 224, 256)  # bwd_dkdv_dmma's tiles in two column slices; narrower heads in one


def test_float64_backward_runs_on_the_fp64_tensor_cores_where_a_tile_fits():
    for arch in ("80", "90a"):
        for d in tiles.HEAD_DIMS:
            for window, mods in ((False, False), (True, False), (True, True)):
                chosen = tiles.select_backward("float64", d, d, window, arch, mods)
                assert chosen.dkdv.kernel == "bwd_dkdv_dmma"
                assert chosen.dq.kernel == "bwd_dq_dmma"
                assert chosen.dkdv.head_dim == chosen.dq.head_dim == d
                slices = tiles.dkdv_dmma_slices(chosen.dkdv.block_n, chosen.dkdv.warps)
                assert slices == (2 if d in SLICED_BUCKETS else 1)
                # The slices share the block: two warps on each 8 keys.
                if d in SLICED_BUCKETS:
                    assert chosen.dkdv.warps == chosen.dkdv.block_n // 4
    # A 99 KB part: DMMA where its tile fits, else SIMT (d256: nothing fits, as before).
    for d in tiles.HEAD_DIMS[:-1]:
        chosen = tiles.select_backward("float64", d, d, True, "86", True)
        assert chosen.dkdv.kernel in ("bwd_dkdv_dmma", "bwd_dkdv_simt")
        assert chosen.dq.kernel in ("bwd_dq_dmma", "bwd_dq_simt")
        assert max(chosen.dkdv.shared_mem, chosen.dq.shared_mem) <= 101376


def _compile(variant):
    build = kernels.compile_offline(variant)
    return variant, build.registers, build.spill_bytes


def test_float64_backward_fallbacks_of_small_shared_memory_parts_compile_without_spills():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from test_pipeline import _nvrtc_available

    if not _nvrtc_available():
        pytest.skip("NVRTC or the CUDA headers are not installed")
    variants = {v for d in tiles.HEAD_DIMS[:-1] for window, mods in ((False, False), (True, False), (True, True))
                for v in tiles.select_backward("float64", d, d, window, "86", mods)[1:3] if v.kernel.endswith("_simt")}
    assert {v.kernel for v in variants} == {"bwd_dkdv_simt", "bwd_dq_simt"}
    with concurrent.futures.ProcessPoolExecutor(max(1, min(len(variants), os.cpu_count() or 1))) as pool:
        for variant, registers, spilled in pool.map(_compile, sorted(variants, key=str)):
            assert 0 < registers <= 255 and spilled == 0, f"{variant}: {registers} registers, {spilled} bytes spilled"


def _dkdv_dmma_variants():
    return [v for arch in ("80", "90a") for v in tiles.all_variants(arch) if v.kernel == "bwd_dkdv_dmma"]


def test_column_slices_are_the_kernels_own():
    """tiles.dkdv_dmma_slices (the host's reading of a tile: _bwd_dmma_tile_ok, the notes) and
    tiles.dkdv_dmma_shares equal bwd_dkdv_dmma.cu's bwd_dkdv_dmma_slices and bwd_dkdv_dmma_shares
    for every Variant, read from a probe's PTX."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from test_pipeline import _nvrtc_available, _ptx_stored_constants

    if not _nvrtc_available():
        pytest.skip("NVRTC or the CUDA headers are not installed")
    variants = _dkdv_dmma_variants()
    lines = ['extern "C" __global__ void cuflash_slices_probe(long long* out) {']
    lines += [f"    out[{i}] = cuflash::bwd_dkdv_dmma_slices({v.block_n}, {v.warps});" for i, v in enumerate(variants)]
    lines += [f"    out[{len(variants) + i}] = "
              f"cuflash::bwd_dkdv_dmma_shares({v.block_m}, {v.block_n}, {v.warps}) ? 7 : 3;" for i, v in enumerate(variants)]
    source = kernels.kernel_source(variants[0]) + "\n" + "\n".join(lines) + "\n}\n"
    options = kernels.compile_options(variants[0]) + ("-arch=compute_90a", "--device-as-default-execution-space")
    expected = {i: tiles.dkdv_dmma_slices(v.block_n, v.warps) for i, v in enumerate(variants)}
    expected.update({len(variants) + i: 7 if tiles.dkdv_dmma_shares(v.block_m, v.block_n, v.warps) else 3
                     for i, v in enumerate(variants)})
    assert _ptx_stored_constants(source, options) == expected


def _owned(variant) -> numpy.ndarray:
    """How many times the warps of a bwd_dkdv_dmma block write each (key, column) of its dK (and
    dV): the kernel's ownership, step by step (warp -> key group and slice; lane (g, t) -> key
    key_row + 8 ki, column c0 + dmma::column(ct, e, t))."""
    slices = tiles.dkdv_dmma_slices(variant.block_n, variant.warps)
    key_warps, cols = variant.warps // slices, variant.head_dim // slices
    keys_per_warp = variant.block_n // key_warps
    count = numpy.zeros((variant.block_n, variant.head_dim), dtype=int)
    for warp in range(variant.warps):
        key_warp, c0 = warp % key_warps, (warp // key_warps) * cols
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for ki in range(keys_per_warp // 8):
                for ct in range(cols // 8):
                    for e in range(2):
                        column = 16 * (ct // 2) + 4 * t + 2 * e + (ct & 1)  # dmma_tile.cuh's column()
                        count[key_warp * keys_per_warp + g + 8 * ki, c0 + column] += 1
    return count


def test_column_slices_write_every_key_and_column_once():
    """Every Variant's warps (sliced or not) cover its block's keys x columns of dK and dV exactly
    once: no column is added twice, none is left out."""
    variants = _dkdv_dmma_variants()
    assert {v.head_dim for v in variants if tiles.dkdv_dmma_slices(v.block_n, v.warps) > 1} == set(SLICED_BUCKETS)
    for v in variants:
        assert tiles._bwd_dmma_tile_ok("bwd_dkdv_dmma", v.block_m, v.block_n, v.warps)
        assert (v.head_dim // tiles.dkdv_dmma_slices(v.block_n, v.warps)) % 16 == 0, v
        assert (_owned(v) == 1).all(), v
    # Tiles whose warps do not share the keys and slices evenly are refused (no Variant is built).
    assert not tiles._bwd_dmma_tile_ok("bwd_dkdv_dmma", 16, 24, 4)
    assert not tiles._bwd_dmma_tile_ok("bwd_dkdv_dmma", 16, 48, 8)


def test_sliced_key_groups_share_scores_and_exchange_them_in_their_own_columns():
    """Where the slices share S^T and dP^T by query tiles (tiles.dkdv_dmma_shares; every sliced
    Variant of sm_90a, all but d224's one-query-tile 8 x 32 of sm_80, whose two slices split the
    products instead), the kernel's split, step by step: each (key,
    query) pair of the block's tile is computed (an element of S^T, dP^T, P, dS, the bias's
    gradient) by exactly one warp; each phase of the exchange (P, then dS) writes every element of
    dSs exactly once, and a warp reads back only its key group's columns, every query row of them,
    all written by its group (whose named barrier, ids 1..15, counts exactly its warps' threads)."""
    variants = _dkdv_dmma_variants()
    sharing = [v for v in variants if tiles.dkdv_dmma_shares(v.block_m, v.block_n, v.warps)]
    assert {(v.arch, v.head_dim) for v in sharing} == {
        (arch, d) for arch in ("80", "90a") for d in SLICED_BUCKETS} - {("80", 224)}
    assert all(tiles.dkdv_dmma_slices(v.block_n, v.warps) == 1 for v in variants
               if v.head_dim not in SLICED_BUCKETS)
    # The sliced tile that shares nothing by queries (one query tile) has two slices, which split
    # the products (S^T, dP^T) instead; the host refuses a tile that could do neither.
    assert all(tiles.dkdv_dmma_slices(v.block_n, v.warps) == 2 and v.block_m == 8 for v in variants
               if v.head_dim in SLICED_BUCKETS and v not in sharing)
    assert not tiles._bwd_dmma_tile_ok("bwd_dkdv_dmma", 8, 16, 8)  # 4 slices, one query tile
    for v in variants:
        if v.head_dim in SLICED_BUCKETS and v not in sharing:  # S^T by slice 0, dP^T by slice 1
            key_warps = v.warps // 2
            keys = v.block_n // key_warps
            products = numpy.zeros((2, v.block_n, v.block_m), dtype=int)
            for warp in range(v.warps):
                products[warp // key_warps, (warp % key_warps) * keys:(warp % key_warps + 1) * keys, :] += 1
            assert (products == 1).all(), v
    for v in sharing:
        slices = tiles.dkdv_dmma_slices(v.block_n, v.warps)
        key_warps, qt = v.warps // slices, v.block_m // 8
        keys_per_warp, qs = v.block_n // key_warps, qt // slices
        computed = numpy.zeros((v.block_n, v.block_m), dtype=int)  # (key, query)
        written = numpy.zeros((v.block_m, v.block_n), dtype=int)   # dSs (query row, key column)
        writer_group = numpy.full((v.block_m, v.block_n), -1)
        barriers: dict[int, set] = {}
        for warp in range(v.warps):
            key_warp, qs0 = warp % key_warps, (warp // key_warps) * 8 * qs
            barriers.setdefault(1 + key_warp, set()).add(warp)
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                key_row = key_warp * keys_per_warp + g
                for ki in range(keys_per_warp // 8):
                    for qi in range(qs):
                        for e in range(2):
                            computed[key_row + 8 * ki, qs0 + 8 * qi + 2 * t + e] += 1
                            written[qs0 + 8 * qi + 2 * t + e, key_row + 8 * ki] += 1
                            writer_group[qs0 + 8 * qi + 2 * t + e, key_row + 8 * ki] = key_warp
        assert (computed == 1).all() and (written == 1).all(), v
        for warp in range(v.warps):  # the reads (from_rows over every query tile)
            key_warp = warp % key_warps
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for ki in range(keys_per_warp // 8):
                    for qi in range(qt):
                        for e in range(2):
                            assert writer_group[8 * qi + 2 * t + e, key_warp * keys_per_warp + g + 8 * ki] == key_warp
        assert max(barriers) <= 15 and all(len(w) == slices for w in barriers.values()), v


# --------------------------------------------------------------------------- GPU


def _cupy():
    return pytest.importorskip("cupy")


def _draw(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


def _check(rng, q_shape, k_shape, dv, *, deterministic, **options):
    """Forward and backward on the GPU (float64), the gradients against the reference."""
    cupy = _cupy()
    import cuflash

    host = _draw(rng, q_shape, k_shape, k_shape[:-1] + (dv,), q_shape[:-1] + (dv,))
    q, k, v, dout = (cupy.asarray(x) for x in host)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
    references = attention_backward_ref(host[3], *host[:3], **options)
    magnitudes = attention_backward_magnitudes(host[3], *host[:3], **options)
    for name, grad, x, reference, magnitude in zip(("dq", "dk", "dv"), grads, (q, k, v), references, magnitudes):
        assert grad.shape == x.shape and grad.dtype == numpy.float64, name
        assert_close(cupy.asnumpy(grad), reference, dtype=numpy.float64, magnitude=magnitude, kind="grad", name=name)
    return grads


EDGE_DIMS = [1, 3, 32, 59, 64, 96, 111, 128, 160, 177, 192, 213, 250, 256]
EDGE_LENGTHS = [(1, 1), (1, 97), (97, 1), (97, 200), (200, 97), (1025, 1024)]
EDGES = [(d, lengths) for d in EDGE_DIMS for lengths in EDGE_LENGTHS
         if lengths[0] < 1024 or d in (1, 64, 111, 250, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,lengths", EDGES, ids=lambda x: f"{x[0]}x{x[1]}" if isinstance(x, tuple) else f"d{x}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_edges_with_gqa(rng, head_dim, lengths, deterministic):
    """GQA 4 / 2 over two batch elements, causal (bottom-right: with Lq > Lk the first rows see no key)."""
    lq, lk = lengths
    _check(rng, (2, 4, lq, head_dim), (2, 2, lk, head_dim), head_dim, deterministic=deterministic, causal=True)


MASKS = [
    {},
    {"causal": "top_left"},
    {"window": (33, 47)},
    {"window": (16, 0), "causal": True},
    {"window": (-1, 5)},
    {"window": (128, -1), "causal": "top_left"},
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 59, 96, 128, 160, 192, 250], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()) or "dense")
@pytest.mark.parametrize("lengths", [(97, 200), (200, 97)], ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_masks(rng, head_dim, mask, lengths, deterministic):
    lq, lk = lengths
    _check(rng, (3, lq, head_dim), (3, lk, head_dim), head_dim + 5 if head_dim < 128 else 100,
           deterministic=deterministic, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_split_gqa_group(rng, head_dim, deterministic):
    """MQA over 16 heads of one sequence: few key/value blocks, so the dK/dV blocks take slices of
    the group, added into fp64 sums by the blocks (plan._heads_per_block_adding) or, when
    deterministic, stored and summed by the host (plan._heads_per_block); d256 in column slices."""
    _check(rng, (1, 16, 2048, head_dim), (1, 1, 2048, head_dim), head_dim, deterministic=deterministic, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(200, 64), (64, 200), (250, 129), (129, 256), (192, 177), (213, 224)],
                         ids=lambda x: f"d{x[0]}-dv{x[1]}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_column_slices_with_unequal_head_dims(rng, dims, deterministic):
    """bwd_dkdv_dmma's column slices (buckets 192-256) where D != Dv: a slice whose columns lie past
    D (dK, dQ) or past Dv (dV) stores none of them, its S^T and dP^T still computed over the whole
    padded width; GQA 6 / 2 with a window."""
    d, dv = dims
    chosen = tiles.select_backward("float64", d, dv, True, "90a").dkdv
    assert tiles.dkdv_dmma_slices(chosen.block_n, chosen.warps) == 2
    _check(rng, (2, 6, 150, d), (2, 2, 211, d), dv, deterministic=deterministic, window=(70, 20))


@pytest.mark.gpu
@pytest.mark.parametrize("lq", [1, 7, 8, 9, 16, 17, 31, 40], ids=lambda n: f"lq{n}")
@pytest.mark.parametrize("head_dim", SLICED_BUCKETS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("mask", [{}, {"causal": True}, {"causal": "top_left"}, {"window": (5, 3)}],
                         ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()) or "dense")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_key_groups_sharing_scores_by_query_halves(rng, lq, head_dim, mask, deterministic):
    """The sliced tiles' key groups split S^T and dP^T by query tiles (tiles.dkdv_dmma_shares):
    query counts that leave a warp's half empty (Lq <= 8 in 16-query tiles, <= 16 in 32) or end
    inside it, masks that hide one half; GQA 4 / 2."""
    _check(rng, (2, 4, lq, head_dim), (2, 2, 70, head_dim), head_dim, deterministic=deterministic, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [(1, 70), (9, 70), (131, 170), (170, 131)], ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("mask", [{}, {"causal": True}, {"window": (40, 10)}],
                         ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()) or "dense")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_key_groups_splitting_the_products(rng, monkeypatch, lengths, mask, deterministic):
    """sm_80's d224 tile (8 x 32 w8: one query tile, so its key groups split S^T and dP^T by
    product, not by queries) forced on this GPU through tiles' table; GQA 4 / 2."""
    from cuflash._gpu import plan

    monkeypatch.setitem(tiles._BWD_DKDV_DMMA_TABLE, 224, ((8, 32, 8),))
    monkeypatch.setattr(plan, "PLANS", {})
    chosen = tiles.select_backward("float64", 224, 224, True, "90a").dkdv
    assert (chosen.block_m, chosen.block_n, chosen.warps) == (8, 32, 8)
    assert not tiles.dkdv_dmma_shares(chosen.block_m, chosen.block_n, chosen.warps)
    lq, lk = lengths
    _check(rng, (2, 4, lq, 224), (2, 2, lk, 224), 224, deterministic=deterministic, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_key_groups_splitting_the_products_with_modifiers(rng, monkeypatch, deterministic):
    """The split by product under softcap, ALiBi, a bias with its gradient (stored by the first
    slice) and a mask: the 8 x 32 w8 tile forced at d224, as above."""
    from cuflash._gpu import plan

    monkeypatch.setitem(tiles._BWD_DKDV_DMMA_TABLE, 224, ((8, 32, 8),))
    monkeypatch.setattr(plan, "PLANS", {})
    _score_modifiers(rng, 224, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 111, 160, 192, 213, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_score_modifiers(rng, head_dim, deterministic):
    """Softcap, ALiBi, a bias (with its gradient) and a mask with GQA and a window (d192-d256: the
    column slices, whose key groups' warps each store their own query tiles' dS into the bias's
    gradient where they share S^T and dP^T, the first slice all of it where they do not)."""
    _score_modifiers(rng, head_dim, deterministic)


def _score_modifiers(rng, head_dim, deterministic):
    cupy = _cupy()
    import cuflash

    heads, lq, lk = 4, 131, 170
    host = _draw(rng, (2, heads, lq, head_dim), (2, 2, lk, head_dim), (2, 2, lk, head_dim), (2, heads, lq, head_dim))
    options = {"softcap": 3.0, "alibi_slopes": rng.uniform(0.01, 0.2, heads), "bias": rng.standard_normal((lq, lk)),
               "mask": rng.uniform(size=(heads, lq, lk)) < 0.8, "window": (90, 10)}
    gpu_options = {key: cupy.asarray(x) if isinstance(x, numpy.ndarray) else x for key, x in options.items()}
    q, k, v, dout = (cupy.asarray(x) for x in host)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **gpu_options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **gpu_options)
    _, _, references = score_mods_ref(*host, **options)
    magnitudes = attention_backward_magnitudes(host[3], *host[:3], window=options["window"]) + (None,)
    assert len(grads) == 4
    for name, grad, reference, magnitude in zip(("dq", "dk", "dv", "dbias"), grads, references, magnitudes):
        assert_close(cupy.asnumpy(grad), reference, dtype=numpy.float64, magnitude=magnitude, kind="grad", name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 177, 224, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("options", [{"causal": True, "softcap": 5.0}, {"window": (100, 40)}],
                         ids=["causal-softcap", "window"])
def test_gpu_deterministic_backward_is_bitwise_reproducible(rng, head_dim, options):
    cupy = _cupy()
    import cuflash

    q, k, v, dout = (cupy.asarray(x) for x in _draw(rng, (2, 4, 300, head_dim), (2, 2, 333, head_dim),
                                                    (2, 2, 333, head_dim), (2, 4, 300, head_dim)))
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)
    for _ in range(10):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)
        for a, b in zip(first, again):
            assert cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [59, 128, 250], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_simt_kernels_still_serve_float64(rng, monkeypatch, head_dim, deterministic):
    """The SIMT backward (parts and buckets without a DMMA tile), forced through tiles' tables."""
    from cuflash._gpu import plan

    monkeypatch.setitem(tiles.BACKWARD_DKDV, "float64", (tiles.BWD_DKDV_SIMT,))
    monkeypatch.setitem(tiles.BACKWARD_DQ, "float64", (tiles.BWD_DQ_SIMT,))
    monkeypatch.setattr(plan, "PLANS", {})
    chosen = tiles.select_backward("float64", head_dim, head_dim, True, "90a")
    assert (chosen.dkdv.kernel, chosen.dq.kernel) == ("bwd_dkdv_simt", "bwd_dq_simt")
    _check(rng, (2, 4, 200, head_dim), (2, 2, 150, head_dim), head_dim, deterministic=deterministic,
           window=(40, 0), causal=True)
