"""The run-time kernel pipeline, checked without a GPU.

Every Variant the dispatcher can select compiles with NVRTC for sm_80 and sm_90a, and ptxas
reports no spills; the params struct matches its NumPy mirror byte for byte; editing any file
under cuda_src/ changes the compile options (so CuPy's disk cache can never serve a stale
kernel); Hopper gets the arch-specific target.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil

import numpy
import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from cuflash._gpu import kernels, params, tiles  # noqa: E402

ARCHS = ("80", "90a")


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return bool(kernels.cuda_include_dirs())
    except Exception:
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC or the CUDA headers are not installed")


def _compile(variant):
    build = kernels.compile_offline(variant)
    return variant, build.registers, build.spill_bytes, build.stack_bytes, len(build.cubin), build.wgmma_serialized


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_every_selectable_variant_compiles_without_spills(arch):
    """Every Variant compiles, without spills, and (Hopper) without ptxas serializing its wgmma
    pipeline: a Variant that held too many registers live across its wgmmas got a wait after
    each of them and no spill to show it (benchmarks/NOTES.md, session 55: 0.68x)."""
    variants = tiles.all_variants(arch)
    assert variants, "the dispatcher must offer kernels for every arch"
    assert {v.dtype for v in variants} == set(tiles.DTYPES)
    workers = max(1, min(len(variants), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_compile, variants))
    report = "\n".join(f"{v}: {r} regs, {s} B spilled, {st} B stack{', wgmma serialized' if ser else ''}"
                       for v, r, s, st, _, ser in results)
    print(report)
    for variant, registers, spilled, stack, cubin_size, serialized in results:
        assert cubin_size > 0
        assert 0 < registers <= 255, f"{variant}: {registers} registers"
        assert spilled == 0, f"{variant} spills {spilled} bytes:\n{report}"
        assert not serialized, f"{variant}: ptxas serialized its wgmma pipeline (C7511):\n{report}"


@needs_nvrtc
def test_selected_variants_cover_every_dtype_and_head_dim():
    for arch in ARCHS:
        offered = set(tiles.all_variants(arch))
        for dtype in tiles.DTYPES:
            for d in (1, 3, 32, 59, 64, 80, 96, 111, 128, 160, 192, 256):
                for dv in (d, 1, 256):
                    for has_window in (False, True):
                        v = tiles.select(dtype, d, dv, has_window, arch)
                        assert v in offered
                        assert v.head_dim >= max(d, dv)
                        assert v.arch == arch


@needs_nvrtc
def test_fallback_variants_of_small_shared_memory_parts_compile_without_spills():
    """Where a 99 KB part has no tile of the preferred family (float64 d >= 224: no fwd_dmma
    tile fits), select falls back to fwd_simt; compile those too (all_variants("80"/"90a") never
    reach them)."""
    variants = {tiles.select("float64", d, d, w, "86") for d in (224, 256) for w in (False, True)}
    assert {v.kernel for v in variants} == {"fwd_simt"}
    for variant in variants:
        build = kernels.compile_offline(variant)
        assert 0 < build.registers <= 255 and build.spill_bytes == 0, f"{variant}: {build.log}"


def test_head_dim_above_maximum_is_rejected():
    with pytest.raises(ValueError, match="head dim"):
        tiles.select("float16", tiles.MAX_HEAD_DIM + 1, 64, False, "80")


def _ptx_stored_constants(source: str, options) -> dict[int, int]:
    """Compile ``source`` to PTX and read the constants it stores into ``out[i]`` (long long)."""
    import re

    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, "probe.cu", (), ())
    try:
        nvrtc.compileProgram(prog, options)
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    constants = dict(re.findall(r"mov\.u64\s+(%rd\d+),\s*(\d+);", ptx))
    stored = {}
    for offset, value in re.findall(r"st\.global\.u64\s+\[%rd\d+(?:\+(\d+))?\],\s*(%rd\d+|\d+);", ptx):
        stored[int(offset or 0) // 8] = int(constants.get(value, value))
    return stored


@needs_nvrtc
@pytest.mark.parametrize("struct,dtype", [
    ("cuflash::FwdParams", params.FWD_PARAMS_DTYPE),
    ("cuflash::BwdParams", params.BWD_PARAMS_DTYPE),
    ("cuflash::FwdTmaParams", params.FWD_TMA_PARAMS_DTYPE),
    ("cuflash::BwdTmaParams", params.BWD_TMA_PARAMS_DTYPE),
], ids=["fwd", "bwd", "fwd_tma", "bwd_tma"])
def test_params_struct_matches_numpy_mirror(struct, dtype):
    """Compile a probe that stores sizeof and every field offset; read the constants from PTX."""
    variant = tiles.select("float32", 32, 32, False, "80")
    stored = _ptx_stored_constants(params.layout_probe_source(struct, dtype),
                                   kernels.compile_options(variant) + ("-arch=compute_80",))
    expected = {0: dtype.itemsize}
    expected.update({i: dtype.fields[name][1] for i, name in enumerate(dtype.names, start=1)})
    assert stored == expected


def _divisor_cases():
    """Divisors: every one up to 4096, powers of two and their neighbours, and large primes."""
    big = [2 ** e + o for e in range(12, 31) for o in (-1, 0, 1)] + [2 ** 31 - 1, 1_000_003, 2_147_483_629]
    return list(range(1, 4097)) + big


def test_fast_divisor_matches_integer_division():
    """params.fast_divisor's (mul, shift) give n // d as params.cuh's FastDivisor computes it,
    ((n * mul >> 32) + n) >> shift in 32-bit unsigned arithmetic, for dividends up to 2^31 - 1:
    at 0, around multiples near both ends of the range, and at random."""
    rng = numpy.random.default_rng()
    for d in _divisor_cases():
        mul, shift = params.fast_divisor(d)
        assert 0 < mul < 2 ** 32 and 0 <= shift < 32
        last = (2 ** 31 - 1) // d  # the largest quotient
        k = numpy.concatenate([numpy.arange(0, 4), numpy.arange(max(last - 3, 0), last + 2),
                               rng.integers(0, last + 1, 16)]).astype(object)
        n = numpy.concatenate([(k[:, None] * d + numpy.array([-1, 0, 1], dtype=object)).ravel(),
                               rng.integers(0, 2 ** 31, 64).astype(object), [2 ** 31 - 1]])
        n = n[(n >= 0) & (n < 2 ** 31)]
        high_plus_n = (n * mul >> 32) + n
        assert (high_plus_n < 2 ** 32).all(), d  # (the device's 32-bit sum does not wrap)
        assert (high_plus_n >> shift == n // d).all(), d


@pytest.mark.parametrize("d", [0, -3, 2 ** 31])
def test_fast_divisor_rejects_divisors_outside_its_range(d):
    with pytest.raises(ValueError, match="divisor"):
        params.fast_divisor(d)


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_every_variants_shared_memory_is_the_kernels_own(arch):
    """tiles.py's shared memory per Variant equals the kernel's own formula
    (``<kernel>_smem_bytes<Element, D, M, N, stages>()`` in its .cu, with kScoreMods after them
    for families that stage bias and mask tiles), read from a probe's PTX."""
    by_kernel: dict[str, list] = {}
    for variant in tiles.all_variants(arch):
        by_kernel.setdefault(variant.kernel, []).append(variant)
    for kernel, variants in sorted(by_kernel.items()):
        if kernel in ("bwd_delta", "bwd_dq_convert"):  # memory-bound, no shared memory
            assert all(v.shared_mem == 0 for v in variants)
            continue
        lines = ['extern "C" __global__ void cuflash_smem_probe(long long* out) {']
        for i, v in enumerate(variants):
            args = (v.element_type, v.head_dim, v.block_m, v.block_n, v.stages)
            if tiles.SPECS[kernel].score_planes is not None:  # the modifier form's staged bias/mask tiles
                args += ("true" if v.score_mods else "false",)
            lines.append(f"    out[{i}] = (long long)cuflash::{kernel}_smem_bytes<{', '.join(map(str, args))}>();")
        source = kernels.kernel_source(variants[0]) + "\n" + "\n".join(lines) + "\n}\n"
        options = kernels.compile_options(variants[0]) + (f"-arch=compute_{arch}", "--device-as-default-execution-space")
        stored = _ptx_stored_constants(source, options)
        assert stored == {i: v.shared_mem for i, v in enumerate(variants)}, kernel


@needs_nvrtc
def test_the_persistent_forwards_are_the_kernels_own():
    """tiles.persistent (the host launches at most one block per SM, each walking several tiles)
    equals fwd_wgmma_ws.cu's fwd_ws_persistent<D>() for every Variant of the family: a block
    that walks one tile of a grid the host shrank would leave the others uncomputed."""
    variants = [v for v in tiles.all_variants("90a") if v.kernel == "fwd_wgmma_ws"]
    assert any(tiles.persistent(v) for v in variants) and not all(tiles.persistent(v) for v in variants)
    lines = ['extern "C" __global__ void cuflash_persistent_probe(long long* out) {']
    lines += [f"    out[{i}] = cuflash::fwd_ws_persistent<{v.head_dim}>() ? 1 : 2;" for i, v in enumerate(variants)]
    source = kernels.kernel_source(variants[0]) + "\n" + "\n".join(lines) + "\n}\n"
    options = kernels.compile_options(variants[0]) + ("-arch=compute_90a", "--device-as-default-execution-space")
    assert _ptx_stored_constants(source, options) == {i: 1 if tiles.persistent(v) else 2 for i, v in enumerate(variants)}


def test_source_digest_follows_every_header(tmp_path, monkeypatch):
    copy = tmp_path / "cuda_src"
    shutil.copytree(kernels.source_dir(), copy)
    monkeypatch.setattr(kernels, "source_dir", lambda: copy)
    kernels.source_digest.cache_clear()
    try:
        variant = tiles.select("float16", 64, 64, False, "80")
        before_digest, before_opts = kernels.source_digest(), kernels.compile_options(variant)
        header = copy / "mask.cuh"
        header.write_text(header.read_text() + "\n// an edit\n")
        kernels.source_digest.cache_clear()
        after_digest, after_opts = kernels.source_digest(), kernels.compile_options(variant)
        assert before_digest != after_digest
        assert before_opts != after_opts
        assert any(after_digest in o for o in after_opts)
        # The kernel's own source text is unchanged: only the options carry the edit.
        assert kernels.kernel_source(variant) == (copy / f"{variant.kernel}.cu").read_text()
    finally:
        kernels.source_digest.cache_clear()


def test_hopper_gets_the_arch_specific_target():
    assert kernels.arch_for_capability(9, 0) == "90a"
    assert kernels.arch_for_capability(8, 0) == "80"
    assert kernels.arch_for_capability(8, 9) == "89"
    assert kernels.arch_for_capability(10, 0) == "100"


def test_kernel_sources_ship_with_the_package():
    src = kernels.source_dir()
    assert (src / "params.cuh").is_file()
    names = {v.kernel for arch in ARCHS for v in tiles.all_variants(arch)}
    for name in names:
        assert (src / f"{name}.cu").is_file()


def test_the_plan_cache_is_bounded_and_safe_across_threads(monkeypatch):
    import threading

    from cuflash._gpu import plan

    monkeypatch.setattr(plan, "PLANS", {})
    monkeypatch.setattr(plan, "_MAX_PLANS", 3)
    for key in range(5):
        plan.remember(key, object())
    assert list(plan.PLANS) == [2, 3, 4]  # the oldest went first
    plan.remember(None, object())
    plan.remember(9, None)
    assert list(plan.PLANS) == [2, 3, 4]

    errors = []

    def fill(offset):
        try:
            for key in range(offset, offset + 2000):
                plan.remember(key, object())
                plan.PLANS.get(key - 1)
        except Exception as error:  # an eviction racing another thread's
            errors.append(error)

    threads = [threading.Thread(target=fill, args=(i * 10000,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(plan.PLANS) == 3


def _tile_counts_by_rows(seqlen_q, seqlen_k, causal, window, block_m, block_n):
    from cuflash import _spec

    problem = _spec.resolve_forward(numpy.zeros((1, seqlen_q, 8)), numpy.zeros((1, seqlen_k, 8)),
                                    numpy.zeros((1, seqlen_k, 8)), causal=causal, window=window)
    counts = []
    for a in range(0, seqlen_k, block_n):
        b = min(a + block_n, seqlen_k)
        counts.append(sum(1 for m in range(0, seqlen_q, block_m)
                          if (lambda lo, hi: lo < min(hi, b) and max(lo, a) < hi)(
                              *problem.key_range(m, min(m + block_m, seqlen_q)))))
    return problem, tuple(counts)


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal, window", [
    (4096, 4096, True, None), (1025, 97, True, None), (97, 1025, True, None), (200, 333, "top_left", None),
    (300, 300, False, (33, 47)), (1, 1025, False, None), (1025, 1, True, None), (97, 200, False, (-1, 5)),
])
def test_query_tiles_per_key_tile_agree_with_the_key_ranges(seqlen_q, seqlen_k, causal, window):
    """plan._query_tiles_per_key_tile (a dK/dV block's steps per head, for the GQA split's cost
    model) against a tile-by-tile walk of _spec's key_range."""
    from cuflash._gpu import plan

    problem, expected = _tile_counts_by_rows(seqlen_q, seqlen_k, causal, window, 64, 128)
    assert plan._query_tiles_per_key_tile(problem, 64, 128) == expected


@pytest.mark.parametrize("group, rows, causal, expected", [
    (8, 32, True, 4),     # GQA 16/2, B2 L4096 causal: whole groups' blocks take 2x the mean SM load
    (8, 32, False, 8),    # dense: 128 whole-group blocks end together, before any split's
    (16, 32, False, 8),   # GQA 16/1 dense: 64 whole-group blocks leave half the SMs idle
    (16, 32, True, 4),
    (2, 32, True, 2),     # GQA 16/8: already balanced
    (8, 512, True, 8),    # many blocks: the mean load decides, whole groups add nothing
    (4, 4, True, 4),      # 128 block-steps in all: the host's time, no sums
])
def test_gqa_slices_added_in_the_kernel_balance_the_sms(monkeypatch, group, rows, causal, expected):
    """plan._heads_per_block_adding on a 132-SM part, L 4096 both ways, 64 x 128 tiles."""
    from cuflash._gpu import plan

    monkeypatch.setattr(kernels, "device_attribute", lambda name: {"MultiProcessorCount": 132}[name])
    problem, _ = _tile_counts_by_rows(4096, 4096, causal, None, 64, 128)
    steps = plan._query_tiles_per_key_tile(problem, 64, 128)
    assert plan._heads_per_block_adding(group, rows, steps) == expected


@pytest.mark.parametrize("resident, causal, group, expected", [
    (1, True, 8, 8),    # one slot per SM: 256 whole-group blocks look as fast as any slice
    (2, True, 8, 4),    # two blocks per SM: the 256 blocks fill half the slots
    (2, True, 16, 4),
    (2, False, 16, 8),  # dense MQA: 128 whole-group blocks on 264 slots
])
def test_gqa_slices_fill_every_resident_block_slot(monkeypatch, resident, causal, group, expected):
    """plan._heads_per_block_adding for a kernel of several blocks per SM (float64 d128 on DMMA,
    16 x 32 tiles, B2 Hq16 L2048 on a 132-SM part): blocks count against sms x resident slots, each
    at 1 / resident of the SM's speed (H200: whole groups 1.37-1.69x the MHA call there, slices
    of 2-8 0.98-1.05x)."""
    from cuflash._gpu import plan

    monkeypatch.setattr(kernels, "device_attribute", lambda name: {"MultiProcessorCount": 132}[name])
    steps = plan._visible_tile_counts(2048, 2048, -1, 0 if causal else -1, 0, 16, 32)
    assert plan._heads_per_block_adding(group, 32, steps, resident=resident) == expected
    asked = []
    assert plan._heads_per_block_adding(group, 32, steps, resident=lambda: asked.append(1) or resident) == expected
    assert asked == [1]


def test_the_split_rule_asks_no_occupancy_of_a_problem_it_keeps_whole(monkeypatch):
    """The occupancy (``resident``, a function: the driver's answer needs the dK/dV kernel
    loaded) is asked only of problems large enough to split; a small one keeps its whole group."""
    from cuflash._gpu import plan

    monkeypatch.setattr(kernels, "device_attribute", lambda name: {"MultiProcessorCount": 132}[name])
    asked = []
    steps = plan._visible_tile_counts(256, 256, -1, 0, 0, 16, 32)
    assert plan._heads_per_block_adding(8, 4, steps, resident=lambda: asked.append(1) or 2) == 8
    assert asked == []


class _HostMemory:
    """NumPy arrays in a plan's memory's place (BackwardPlan.run without a GPU)."""

    @staticmethod
    def empty(shape, dtype, order=None):
        from cuflash import _spec

        return _spec.empty_in_order(numpy.empty, shape, dtype, order)

    @staticmethod
    def zeros(shape, dtype, order=None):
        return numpy.zeros(shape, dtype)

    @staticmethod
    def pointer(array):
        return array.ctypes.data

    @staticmethod
    def narrow(target, source):
        target[...] = source

    @staticmethod
    def stream():
        return 0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_replay_with_split_group_sums_rounds_them_into_the_gradients(monkeypatch, dtype):
    """BackwardPlan.run of a split GQA group whose blocks add into sums in the accumulation type
    (plan._DkvSums: fp32, fp64 for float64), the launches stubbed: the kernels get the zeroed
    sums' pointers for dk and dv (v's part 256 bytes on from k's), and what they add there comes
    back rounded to the dtype, in each gradient's order; sums already in the dtype and in C order
    are returned as they are (no copy)."""
    from cuflash._gpu import params, plan

    dtype = numpy.dtype(dtype)
    accum = numpy.dtype(numpy.float64 if dtype == numpy.float64 else numpy.float32)
    sums = plan._DkvSums((2, 2, 5, 6), (2, 2, 5, 3), accum)
    shapes = {"dq": (2, 4, 7, 6), "dk": (2, 2, 5, 6), "dv": (2, 2, 5, 3)}
    orders = {"dk": (0, 2, 1, 3)}  # (B, L, H, D) in memory, as k's
    replay = plan.BackwardPlan(numpy.zeros((), dtype=params.BWD_PARAMS_DTYPE), (), shapes, dtype,
                               accum, (16, None), orders=orders, dkv_sums=sums)
    rng = numpy.random.default_rng(0)
    added = {name: rng.standard_normal(shapes[name]).astype(accum) for name in ("dk", "dv")}
    at = {}

    def launches(self, memory, pointers, dropout_seed=None):  # the kernels' adds into the sums dk, dv point at
        assert pointers[8] - pointers[7] >= added["dk"].nbytes and (pointers[8] - pointers[7]) % 256 == 0
        for name, pointer in zip(("dk", "dv"), pointers[7:9]):
            size = added[name].size
            c_type = ctypes.c_double if accum == numpy.float64 else ctypes.c_float
            view = numpy.ctypeslib.as_array((c_type * size).from_address(pointer))
            assert not view.any(), "the sums start zeroed"
            view[...] = added[name].reshape(-1)
            at[name] = pointer

    monkeypatch.setattr(plan.BackwardPlan, "_run", launches)
    inputs = [numpy.zeros(1, dtype)] * 6
    dq, dk, dv = replay.run(_HostMemory, *inputs)
    assert dq.shape == shapes["dq"]
    for name, grad in (("dk", dk), ("dv", dv)):
        assert grad.dtype == dtype and grad.shape == shapes[name]
        numpy.testing.assert_array_equal(grad, added[name].astype(dtype))
    assert dk.transpose(0, 2, 1, 3).flags.c_contiguous and dv.flags.c_contiguous
    # dV in C order and the dtype of the sums: the sums themselves; dK (k's order) a copy
    assert (dv.__array_interface__["data"][0] == at["dv"]) == (accum == dtype)
    assert dk.__array_interface__["data"][0] != at["dk"]


@pytest.mark.parametrize("group, rows, key_tiles, expected", [
    (8, 32, 32, 8),     # GQA 16/2, B2 L4096: 128 whole-group blocks fill 9 SMs in 10 of 132: kept whole
    (16, 32, 32, 4),    # GQA 16/1: 64 blocks; splits of 8 give 128 < 132, of 4 give 256
    (2, 32, 32, 2),     # GQA 16/8: 512 blocks
    (1, 32, 32, 1),     # MHA
    (16, 16, 8, 16),    # 128 block-steps in all: the host's time, no partial sums
    (6, 6, 64, 2),      # MQA over 6 heads of one sequence: 64 blocks whole, 128 in threes, 192 in pairs
    (3, 3, 100, 1),     # MQA over 3 heads: 100 blocks whole (under 119), no divisor between: one head each
])
def test_gqa_dkdv_blocks_keep_the_group_while_its_blocks_fill_the_gpu(monkeypatch, group, rows, key_tiles, expected):
    """plan._heads_per_block on a 132-SM part (H200): the whole group while its blocks fill 90%
    of the SMs (a short wave costs less than the partial sums a split needs), else the largest
    divisor of the group that gives a block per SM (measured: benchmarks/NOTES.md, session 22)."""
    from cuflash._gpu import plan

    monkeypatch.setattr(kernels, "device_attribute", lambda name: {"MultiProcessorCount": 132}[name])
    assert plan._heads_per_block(group, rows, key_tiles) == expected


SHORT_RULE = [  # (dtype, head dim, arch, score mods, the short dK/dV kernel and tile, the short dQ kernel and tile)
    ("float16", 32, "90a", False, ("bwd_dkdv_tc", (64, 64, 4)), None),
    ("bfloat16", 24, "80", True, ("bwd_dkdv_tc", (64, 64, 4)), None),
    ("float16", 8, "86", True, ("bwd_dkdv_tc", (64, 64, 4)), None),
    ("bfloat16", 64, "90a", False, None, None),  # Hopper's d64 family keeps its tile
    ("bfloat16", 128, "80", True, None, None),  # no short tile in the bucket
    # FFMA (precision "highest"): dK/dV and the deterministic dQ both take 64 x 64
    ("float32", 32, "90a", False, ("bwd_dkdv_simt", (64, 64, 8)), ("bwd_dq_simt", (64, 64, 8))),
    ("float32", 59, "90a", False, ("bwd_dkdv_simt", (64, 64, 8)), ("bwd_dq_simt", (64, 64, 8))),
    ("float32", 96, "90a", False, ("bwd_dkdv_simt", (64, 64, 8)), ("bwd_dq_simt", (64, 64, 8))),  # (long: bf16x6)
    ("float32", 160, "90a", False, None, None),  # FFMA's wide buckets keep their tile
    ("float64", 32, "90a", True, None, None),  # fp64 tensor cores keep their tiles
]


@pytest.mark.parametrize("dtype, head_dim, arch, mods, short_dkdv, short_dq", SHORT_RULE)
def test_short_rows_take_the_short_dkdv_tile(dtype, head_dim, arch, mods, short_dkdv, short_dq):
    """select_backward(short=True) gives the short rows' dK/dV tile where the bucket has one
    (bwd_dkdv_tc's 64 x 64 of four warps, float32's FFMA 64 x 64 with the deterministic dQ's),
    and the same Variants as without ``short`` elsewhere; all_variants lists them."""
    long_rows = tiles.select_backward(dtype, head_dim, head_dim, True, arch, mods)
    short = tiles.select_backward(dtype, head_dim, head_dim, True, arch, mods, short=True)
    if short_dkdv is None:
        assert short == long_rows
        return
    kernel, tile = short_dkdv
    assert (short.dkdv.kernel, (short.dkdv.block_m, short.dkdv.block_n, short.dkdv.warps)) == (kernel, tile)
    assert short.dkdv != long_rows.dkdv and short.dkdv.score_mods == mods
    assert (short.delta, short.dq_convert) == (long_rows.delta, long_rows.dq_convert)
    if short_dq is None:
        assert short.dq == long_rows.dq
    else:
        kernel, tile = short_dq
        assert (short.dq.kernel, (short.dq.block_m, short.dq.block_n, short.dq.warps)) == (kernel, tile)
    assert short.dkdv in tiles.all_variants(arch)


SHORT_FORWARD_RULE = [  # (dtype, head dim, arch, masked, score mods, the short forward tile)
    ("float32", 32, "90a", False, False, (64, 64, 8)),  # FFMA: 64 rows, not 128
    ("float32", 24, "80", True, True, (64, 64, 8)),
    ("float32", 64, "80", True, False, (64, 64, 8)),
    ("float32", 128, "90a", False, False, None),  # bucket 128 already takes 64 rows
    ("bfloat16", 32, "90a", True, True, None),  # the tensor-core families have no short forward tile
    ("float64", 32, "80", False, False, None),
]


@pytest.mark.parametrize("dtype, head_dim, arch, masked, mods, tile", SHORT_FORWARD_RULE)
def test_short_rows_take_the_short_forward_tile(dtype, head_dim, arch, masked, mods, tile):
    """select(short=True): float32's FFMA forward takes its 64-row tile in buckets 32 and 64 (the
    long rows' 128 would hold a Swin window's 49 rows), "highest" included (its long rows run
    3xTF32 there), every other family the Variant it takes without ``short``; all_variants lists it."""
    ffma = "ieee" if dtype == "float32" else "highest"
    long_rows = tiles.select(dtype, head_dim, head_dim, masked, arch, score_mods=mods, precision=ffma)
    short = tiles.select(dtype, head_dim, head_dim, masked, arch, score_mods=mods, short=True)
    if tile is None:
        assert short == long_rows
        return
    assert short == tiles.select(dtype, head_dim, head_dim, masked, arch, score_mods=mods, short=True, precision=ffma)
    assert (short.kernel, (short.block_m, short.block_n, short.warps)) == ("fwd_simt", tile)
    assert long_rows.kernel == "fwd_simt" and long_rows.block_m == 128 and short.score_mods == mods
    assert short in tiles.all_variants(arch)


@pytest.mark.parametrize("lengths, packed, expected", [((49, 49), None, True), ((64, 1), None, True),
                                                       ((65, 49), None, False), ((49, 200), None, False),
                                                       ((4096, 4096), (64, 33), True), ((100, 100), (65, 64), False)])
def test_short_rows_are_decided_by_the_longest_sequence(lengths, packed, expected):
    """plan._short_rows: every sequence (of a packed batch: the longest) at most SHORT_ROWS
    queries and keys."""
    from types import SimpleNamespace

    from cuflash._gpu import plan

    p = SimpleNamespace(seqlen_q=lengths[0], seqlen_k=lengths[1], packed=None if packed is None else SimpleNamespace(
        max_seqlen_q=packed[0], max_seqlen_k=packed[1]))
    assert plan._short_rows(p) is expected


@pytest.mark.parametrize("arch, kernel, tile32, tile64, tile128", [
    ("90a", "fwd_wgmma", (128, 64), (128, 32), (64, 32)), ("80", "fwd_tc", (64, 64), (64, 32), None),
    ("86", "fwd_tc", (64, 64), (64, 32), None)])
def test_float32_highest_takes_3xtf32_up_to_d64_and_on_hopper_d128(arch, kernel, tile32, tile64, tile128):
    """precision="highest": the forward on tensor cores in 3xTF32 (Element tc::tf32x3: Hopper's
    fwd_wgmma, fwd_tc elsewhere) at head dims up to 64, and on Hopper the d96 and d128 buckets (65-128:
    one warpgroup of query rows a block, Q's hi and lo tiles read from shared memory, and one
    beside it that copies and splits K and V: 8 warps), the tile without spills per arch, score
    modifiers included on Hopper (its masked form's tile); FFMA (fwd_simt) for the other heads,
    short rows, dropout, and score modifiers elsewhere. The backward's
    dK/dV kernel on Hopper's tensor cores at every head dim up to 128 (two warpgroups: dense d33-64
    bwd_dkdv_wgmma_x6 in bf16x6, 64 x 64; else bwd_dkdv_wgmma_x3 in 3xTF32, 64 x 64 to d32, 32 x 64
    at d33-64; d65-128 bwd_dkdv_wgmma_x6h in bf16x6, 32 x 64, each warpgroup one half of the head
    dim), the deterministic dQ kernel there too (64 x 32: bwd_dq_wgmma_x3 in 3xTF32 to d32, else
    bwd_dq_wgmma_x6 in bf16x6), the d96 bucket on the bf16x6 kernels' d128 Variants (whole
    64-column panels), else FFMA; "ieee" always FFMA; "tf32" its own Variants."""
    wide = ((65, tile128), (96, tile128), (97, tile128), (128, tile128)) if tile128 else ()
    for d, tile in ((1, tile32), (32, tile32), (33, tile64), (64, tile64)) + wide:
        for window in (False, True):
            v = tiles.select("float32", d, d, window, arch, precision="highest")
            assert (v.kernel, v.precision, (v.block_m, v.block_n)) == (kernel, "highest", tile), (d, window, v)
            if d > 64:  # (Hopper's d128: the splitting warpgroup beside the multiplying one)
                assert v.warps == 8, v
            assert v.element_type == "cuflash::tc::tf32x3"
            assert tiles.select("float32", d, d, window, arch, precision="ieee").kernel == "fwd_simt"
            assert tiles.select("float32", d, d, window, arch, precision="tf32").element_type == "cuflash::tc::tf32"
    for d in (129, 256) + (() if tile128 else (65, 96, 97, 128)):
        assert tiles.select("float32", d, d, False, arch, precision="highest").kernel == "fwd_simt"
    for d, tile in ((32, tile32), (64, tile64)) + wide:  # score modifiers: the masked form's kScoreMods
        v = tiles.select("float32", d, d, False, arch, score_mods=True, precision="highest")
        if tile128:  # (Hopper's 3xTF32 forward applies them to its float32 scores)
            assert (v.kernel, v.score_mods, v.has_window, (v.block_m, v.block_n)) == (kernel, True, True, tile), v
            assert tiles.select("float32", d, d, False, arch, score_mods=True, precision="highest",
                                dropout=True).kernel == "fwd_simt"  # (dropout: FFMA)
        else:
            assert v.kernel == "fwd_simt", v
    for d in (32, 128):
        assert tiles.select("float32", d, d, False, arch, short=True, precision="highest").kernel == "fwd_simt"
    for d in (1, 32, 33, 64, 65, 96, 97, 128):
        for window in (False, True):
            backward = tiles.select_backward("float32", d, d, window, arch, precision="highest")
            dkdv = (backward.dkdv.kernel, (backward.dkdv.block_m, backward.dkdv.block_n, backward.dkdv.warps))
            if tile128 and d > 64:  # (the d96 bucket runs the d128 Variant: whole 64-column panels)
                assert backward.dkdv.head_dim == 128, backward.dkdv
            hopper = (("bwd_dkdv_wgmma_x3", (64, 64, 8)) if d <= 32 else ("bwd_dkdv_wgmma_x6h", (32, 64, 8)) if d > 64
                      else ("bwd_dkdv_wgmma_x3", (32, 64, 8)) if window else ("bwd_dkdv_wgmma_x6", (64, 64, 8)))
            assert dkdv == hopper if tile128 else dkdv[0] == "bwd_dkdv_simt", dkdv
            dq = ("bwd_dq_simt" if not tile128 else "bwd_dq_wgmma_x3" if d <= 32 else "bwd_dq_wgmma_x6")
            assert (backward.dq.kernel, backward.dq.block_m, backward.dq.block_n) == (
                (dq, 64, 32) if dq != "bwd_dq_simt" else (dq, backward.dq.block_m, backward.dq.block_n)), backward.dq
            assert tiles.select_backward("float32", d, d, window, arch, precision="ieee").dkdv.kernel == "bwd_dkdv_simt"
            assert tiles.select_backward("float32", d, d, window, arch, precision="highest", short=True
                                         ).dkdv.kernel == "bwd_dkdv_simt"
            assert tiles.select_backward("float32", d, d, True, arch, True, precision="highest").dkdv.kernel == "bwd_dkdv_simt"
    for d in (129, 256) + (() if tile128 else (65, 96)):  # (no tensor-core Variant of the backward here)
        backward = tiles.select_backward("float32", d, d, False, arch, precision="highest")
        assert (backward.dkdv.kernel, backward.dq.kernel) == ("bwd_dkdv_simt", "bwd_dq_simt"), (d, backward)
    assert tiles.select("float64", 32, 32, False, arch).precision is None


def test_the_dkdv_kernel_stores_dq_only_where_one_key_tile_holds_every_key():
    """plan._stores_dq (BwdParams::dq_direct): 16-bit bwd_dkdv_tc up to d224, every key within one
    of its key tiles, no window, no key-padding cut, no mask tile spans, no packed batch; and the backward's kernels
    then leave out dQ's conversion (and the deterministic dQ kernel)."""
    from types import SimpleNamespace

    from cuflash._gpu import plan

    def problem(lk, window=False, mask=None, packed=None):
        lq = 49 if mask is None else mask.shape[-2]
        return SimpleNamespace(has_window=window, mask=mask, packed=packed, seqlen_q=lq, seqlen_k=lk)

    def stores(dtype, d, lk, arch="90a", short=False, **options):
        variants = tiles.select_backward(dtype, d, d, options.get("window", False), arch, short=short,
                                         precision="tf32" if dtype == "float32" else "highest")
        return plan._stores_dq(problem(lk, **options), [(variants, None)], lk)

    assert stores("bfloat16", 32, 128) and not stores("bfloat16", 32, 129)  # the d32 128-key tile
    assert stores("float16", 32, 64, short=True) and not stores("float16", 32, 65, short=True)  # 64x64
    assert stores("float16", 96, 128) and stores("bfloat16", 224, 64) and not stores("bfloat16", 224, 65)
    assert not stores("bfloat16", 256, 64)  # d256: compiled out (kStoresDq)
    assert not stores("float32", 32, 64)  # TF32: compiled out
    assert not stores("bfloat16", 64, 64) and stores("bfloat16", 64, 64, arch="80")  # Hopper: wgmma
    assert not stores("bfloat16", 32, 64, window=True)
    assert not stores("bfloat16", 32, 64, mask=numpy.ones((2, 1, 1, 64), dtype=bool))  # a key cut
    assert stores("bfloat16", 32, 64, mask=numpy.ones((2, 1, 49, 64), dtype=bool))  # any other short mask
    assert not stores("bfloat16", 32, 128, mask=numpy.ones((2, 1, 128, 128), dtype=bool))  # tile spans: skipped tiles
    assert not stores("bfloat16", 32, 64, packed=SimpleNamespace(seqused_k=None))
    variants = tiles.select_backward("bfloat16", 32, 32, False, "90a")
    assert plan._backward_kernels(variants, False, True) == [variants.delta, variants.dkdv]
    assert plan._backward_kernels(variants, True, False)[-1] == variants.dq
    assert plan._backward_kernels(variants, False, False)[-1] == variants.dq_convert


def test_every_params_struct_fits_the_launch_arguments():
    """launch_args.ARGS holds the struct of every launch (plans, decode, append, merge, dbias)."""
    from cuflash._gpu import bias_grad, decode, kvcache_append, launch_args, merge

    structs = [params.FWD_PARAMS_DTYPE, params.BWD_PARAMS_DTYPE, params.FWD_TMA_PARAMS_DTYPE,
               params.BWD_TMA_PARAMS_DTYPE, bias_grad.PARAMS_DTYPE, decode.PARAMS_DTYPE, kvcache_append.PARAMS_DTYPE,
               merge.PARAMS_DTYPE]
    assert max(struct.itemsize for struct in structs) <= launch_args.CAPACITY
    assert launch_args.ARGS.bytes.size == launch_args.CAPACITY and launch_args.ARGS.bytes_ptr % 64 == 0
