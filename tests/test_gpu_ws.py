"""The warp-specialized Hopper forward (cuda_src/fwd_wgmma_ws.cu): tensor maps, the producer's
rings and the consumers' ping-pong, against the float64 reference.

16-bit calls at head dims 33-256 on compute capability 9.0 take it (widths between panels run the
next multiple of 64, the maps zero-filling the rest; d64: rows that see enough keys); these tests check that they do, that calls whose layout tensor maps cannot describe fall
back to fwd_wgmma with the same results, and that a replayed plan re-points its maps at the new
call's tensors. Marked gpu; skipped without one (and without Hopper where the kernel is meant).
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (registers numpy.dtype("bfloat16"))
import numpy
import pytest

from reference import score_mods_ref
from test_gpu_backward import check_backward
from test_gpu_forward import _check, _inputs
from tolerance import assert_close

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

import cuflash  # noqa: E402
from cuflash._gpu import plan  # noqa: E402


@pytest.fixture(autouse=True)
def _hopper_only():
    """fwd_wgmma_ws is Hopper's (sm_90a); asked at run time, never at collection (no GPU there)."""
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("fwd_wgmma_ws runs on compute capability 9.0 only")


@pytest.fixture
def map_calls(monkeypatch):
    """The calls that built tensor maps (the TMA kernel ran), as (q, k, v) shapes."""
    calls = []
    real = plan._with_tensor_maps

    def spy(struct, specs, arrays):
        calls.append(tuple(x.shape for x in arrays))
        return real(struct, specs, arrays)

    monkeypatch.setattr(plan, "_with_tensor_maps", spy)
    plan.forget()  # a cached plan would skip the full path
    return calls


# (q shape, k/v shape, options): odd lengths both ways, L = 1, GQA and MQA, masks, head dims
# that pad (40 -> 64, 100 -> 128) and those that do not. d64 rows that see <= 768 keys on
# average run fwd_wgmma's short-row tile (tiles._FWD_WGMMA_WS_TABLE): the d64 cases see more.
CASES = [
    ((2, 4, 200, 64), (2, 4, 997, 64), dict()),
    ((2, 4, 97, 64), (2, 4, 2000, 64), dict(causal=True)),
    ((2, 3, 1, 64), (2, 3, 1025, 64), dict(causal=True)),
    ((1, 3, 1025, 128), (1, 3, 1025, 128), dict(causal=True)),
    ((2, 3, 1, 128), (2, 3, 1, 128), dict(causal=True)),
    ((1, 2, 1, 128), (1, 2, 1025, 128), dict()),
    ((1, 2, 1025, 128), (1, 2, 1, 128), dict(causal="top_left")),
    ((2, 8, 333, 128), (2, 2, 1025, 128), dict(causal=True)),          # GQA 4
    ((1, 6, 300, 64), (1, 1, 1300, 64), dict(window=(-1, 7))),         # MQA
    ((2, 2, 257, 40), (2, 2, 1513, 40), dict(causal=True)),
    ((1, 2, 129, 100), (1, 2, 2049, 100), dict(window=(64, 300))),
    ((3, 2, 1025, 128), (3, 2, 1025, 128), dict(scale=-0.2)),          # negative scale: Q negated
    ((1, 2, 300, 256), (1, 2, 1025, 256), dict(causal=True)),          # P V in two wgmmas of N 128
    ((2, 2, 97, 192), (2, 2, 200, 192), dict()),                       # ... of N 128 and 64
    ((1, 3, 129, 250), (1, 3, 1025, 250), dict(window=(100, 50))),
    ((2, 4, 200, 176), (2, 2, 513, 176), dict(causal="top_left")),     # GQA, 176 -> 192
    ((2, 3, 257, 80), (2, 3, 300, 80), dict(causal=True)),             # 80 -> bucket 96 -> 128
    ((1, 2, 200, 160), (1, 2, 999, 160), dict(window=(50, 50))),       # 160 -> 192
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("q_shape,kv_shape,options", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_plain_calls_run_the_tma_kernel_and_match_the_reference(rng, dtype, q_shape, kv_shape, options, map_calls):
    dev, exact = _inputs(rng, dtype, q_shape, kv_shape, kv_shape)
    _check(dtype, dev, exact, **options)
    assert map_calls, "a plain Hopper call of this head dim should run fwd_wgmma_ws"


# Persistent walks (tiles.persistent: fwd_wgmma_ws up to d192, at most one block per SM): more
# tiles than SMs, so each block takes several, wave after wave in snake order, its Q tiles
# alternating between two buffers and its K/V rings counting on from tile to tile.
PERSISTENT_CASES = [
    ((4, 64, 256, 128), (4, 8, 256, 128), dict(causal=True)),          # GQA 8, 512 tiles
    ((8, 32, 300, 64), (8, 32, 1300, 64), dict()),                     # d64 192-row tiles: 512
    ((2, 48, 200, 192), (2, 48, 333, 192), dict(window=(50, 20))),     # 192 tiles
    ((3, 40, 257, 128), (3, 40, 257, 128), dict(scale=-0.2)),          # each tile's Q negated: 360
    ((2, 96, 130, 128), (2, 96, 1, 128), dict(causal=True)),           # one key: whole tiles see none
    # Lq > Lk bottom-right: a row's first query tiles see no key, its last ones many, so each
    # block's walk mixes tiles without MMAs and tiles with them (the turn cycle runs across both)
    ((2, 64, 700, 128), (2, 64, 300, 128), dict(causal=True)),         # 768 tiles
    # d64 masked: rows must see more than 1024 keys on average, or fwd_wgmma runs them (tiles.py)
    ((2, 32, 2400, 64), (2, 32, 2300, 64), dict(causal=True)),         # 128-row tiles: 1216
]


@pytest.mark.parametrize("q_shape,kv_shape,options", PERSISTENT_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_persistent_blocks_walk_every_tile(rng, q_shape, kv_shape, options, map_calls, monkeypatch):
    dtype = "bfloat16"
    launches = []
    real_launch_of = plan._launch_of

    def spy(variant, *args, **kwargs):
        launch = real_launch_of(variant, *args, **kwargs)
        launches.append((variant, launch))
        return launch

    monkeypatch.setattr(plan, "_launch_of", spy)
    dev, exact = _inputs(rng, dtype, q_shape, kv_shape, kv_shape)
    _check(dtype, dev, exact, **options)
    assert map_calls
    ((variant, launch),) = [(v, x) for v, x in launches if v.kernel == "fwd_wgmma_ws"]
    tiles_total = q_shape[0] * q_shape[1] * launch.query_tiles
    assert plan.tiles.persistent(variant) and launch.grid_x * launch.grid_y < tiles_total


def test_a_persistent_key_padding_split_walks_each_launchs_rows(rng, map_calls):
    """A key-padding mask whose rows are partly plain prefixes: two launches of the same tiles,
    each block skipping the rows the other launch takes (takes_row) as it walks."""
    dtype, d = "bfloat16", 128
    b, h, l_q, l_k = 6, 32, 200, 700
    dev, exact = _inputs(rng, dtype, (b, h, l_q, d), (b, h, l_k, d), (b, h, l_k, d))
    mask = numpy.zeros((b, 1, 1, l_k), dtype=bool)
    for i in range(b):
        mask[i, ..., : 300 + 61 * i] = True
        if i % 2:
            mask[i, ..., 7] = False  # not a prefix: the other launch's row
    out = cuflash.attention(*dev, mask=cupy.asarray(mask))
    ref_out, _ = score_mods_ref(*exact, mask=mask)
    assert map_calls
    assert numpy.abs(cupy.asnumpy(out).astype(numpy.float64) - ref_out).max() < 2e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_replayed_plan_reads_the_new_calls_tensors(rng, dtype, map_calls):
    """The first call builds the plan; later ones of the same signature replay it with their own
    q, k, v (the maps re-pointed): each must match its own reference, bit for bit the full path."""
    shape = (2, 4, 1300, 128)
    results = []
    for _ in range(3):
        dev, exact = _inputs(rng, dtype, shape, shape, shape)
        out, lse = cuflash.attention(*dev, causal=True, return_lse=True)
        ref_out, _ = score_mods_ref(*exact, causal=True)
        assert numpy.abs(cupy.asnumpy(out).astype(numpy.float64) - ref_out).max() < 2e-2
        results.append((dev, cupy.asnumpy(out).tobytes(), cupy.asnumpy(lse).tobytes()))
    assert len(map_calls) == 1, "the second and third calls should replay the first's plan"
    plan.forget()
    for dev, out_bits, lse_bits in results:  # the full path again, on each call's inputs
        out, lse = cuflash.attention(*dev, causal=True, return_lse=True)
        assert cupy.asnumpy(out).tobytes() == out_bits and cupy.asnumpy(lse).tobytes() == lse_bits


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_a_sequence_major_view_runs_the_tma_kernel(rng, dtype, map_calls):
    """(B, L, H, D) storage seen as (B, H, L, D): strided heads and rows, one map each."""
    b, l_q, l_k, h, d = 2, 211, 1600, 4, 64
    host = [rng.standard_normal((b, n, h, d)) for n in (l_q, l_k, l_k)]
    dev = [cupy.asarray(x.astype(numpy.dtype(dtype))).transpose(0, 2, 1, 3) for x in host]
    exact = [cupy.asnumpy(x).astype(numpy.float64) for x in dev]
    _check(dtype, dev, exact, causal=True)
    assert map_calls


def test_sinks_run_on_the_tma_kernel(rng, map_calls):
    dtype = "bfloat16"
    dev, exact = _inputs(rng, dtype, (2, 4, 200, 128), (2, 4, 333, 128), (2, 4, 333, 128))
    sinks = rng.standard_normal(4)
    out, lse = cuflash.attention(*dev, causal=True, sinks=cupy.asarray(sinks.astype(numpy.float32)), return_lse=True)
    ref_out, ref_lse = score_mods_ref(*exact, causal=True, sinks=sinks.astype(numpy.float32).astype(numpy.float64))
    assert map_calls
    assert numpy.abs(cupy.asnumpy(out).astype(numpy.float64) - ref_out).max() < 2e-2
    assert numpy.abs(cupy.asnumpy(lse).astype(numpy.float64) - ref_lse).max() < 1e-3


@pytest.mark.parametrize("case,takes_maps", [("broadcast_batch", False), ("three_batch_axes", False),
                                             ("broadcast_heads", True)])
def test_layouts_the_maps_cannot_describe_fall_back_to_fwd_wgmma(rng, case, takes_maps, map_calls):
    """K/V broadcast over the batch (stride 0) and batch axes that do not merge into one: the plan
    takes fwd_wgmma, with the same exact result. K/V broadcast over the heads is one key/value
    head shared by all (MQA): the maps read it with kv_group = heads."""
    dtype = "float16"
    if case == "broadcast_batch":
        q_shape, kv_shape = (3, 2, 150, 64), (1, 2, 1300, 64)
        dev, exact = _inputs(rng, dtype, q_shape, kv_shape, kv_shape)
        dev[1:] = [cupy.broadcast_to(x, (3,) + x.shape[1:]) for x in dev[1:]]
        exact[1:] = [numpy.broadcast_to(x, (3,) + x.shape[1:]) for x in exact[1:]]
    elif case == "broadcast_heads":
        q_shape, kv_shape = (2, 4, 150, 128), (2, 1, 300, 128)
        dev, exact = _inputs(rng, dtype, q_shape, kv_shape, kv_shape)
        dev[1:] = [cupy.broadcast_to(x, (2, 4) + x.shape[2:]) for x in dev[1:]]
        exact[1:] = [numpy.broadcast_to(x, (2, 4) + x.shape[2:]) for x in exact[1:]]
    else:
        shape = (2, 3, 2, 150, 128)
        base, exact = _inputs(rng, dtype, (2, 5, 2, 150, 128), shape, shape)
        dev = [base[0][:, 1:4], base[1], base[2]]  # q's middle batch axis is a slice: no merge
        exact = [exact[0][:, 1:4], exact[1], exact[2]]
        assert dev[0].shape == shape
    _check(dtype, dev, exact, causal=True)
    assert bool(map_calls) == takes_maps


@pytest.mark.parametrize("d", [128, 256])
def test_keys_past_a_key_padding_cut_never_reach_the_output(rng, d, map_calls):
    """Rows whose mask is a key-padding prefix run with their Lk cut: the maps read the keys past
    the cut as they are (here inf and NaN, which 0 * v would spread), so the kernel zeroes those
    rows of the last V tile. Lengths cut inside a tile and at a tile's end. (At d64 the plain and
    the modifier launch of a key-padding call take different tiles, so neither reads by maps.)"""
    dtype = "bfloat16"
    b, h, l_q, l_k = 3, 2, 130, 1500
    dev, exact = _inputs(rng, dtype, (b, h, l_q, d), (b, h, l_k, d), (b, h, l_k, d))
    lengths = (1000, 1337, 1024)
    mask = numpy.zeros((b, 1, 1, l_k), dtype=bool)
    for i, n in enumerate(lengths):
        mask[i, ..., :n] = True
        dev[1][i, :, n:] = numpy.inf
        dev[2][i, :, n:] = numpy.nan
    out = cuflash.attention(*dev, mask=cupy.asarray(mask))
    ref = [score_mods_ref(exact[0][i:i + 1], exact[1][i:i + 1, :, :n], exact[2][i:i + 1, :, :n])[0]
           for i, n in enumerate(lengths)]
    assert map_calls
    assert numpy.abs(cupy.asnumpy(out).astype(numpy.float64) - numpy.concatenate(ref)).max() < 2e-2


def test_keys_past_seqused_k_never_reach_the_output(rng, map_calls):
    """A packed batch with seqused_k (a KV cache's used prefix): NaN past the used keys."""
    dtype, d, hq, hk = "bfloat16", 128, 4, 2
    lengths_q, capacity, used = [200, 1, 77], [1200, 1300, 700], [999, 1300, 1]
    cu_q, cu_k = (numpy.concatenate([[0], numpy.cumsum(n)]).astype(numpy.int32) for n in (lengths_q, capacity))
    dev, exact = _inputs(rng, dtype, (int(cu_q[-1]), hq, d), (int(cu_k[-1]), hk, d), (int(cu_k[-1]), hk, d))
    for i, n in enumerate(used):
        dev[2][cu_k[i] + n: cu_k[i + 1]] = numpy.nan
    out = cuflash.attention_varlen(*dev, cupy.asarray(cu_q), cupy.asarray(cu_k),
                                   seqused_k=cupy.asarray(numpy.array(used, dtype=numpy.int32)))
    out = cupy.asnumpy(out).astype(numpy.float64)
    assert map_calls
    for i, n in enumerate(used):
        q, k, v = (x[c[i]: c[i] + m].transpose(1, 0, 2)[None]
                   for x, c, m in zip(exact, (cu_q, cu_k, cu_k), (lengths_q[i], n, n)))
        ref_out, _ = score_mods_ref(q, k, v)
        assert numpy.abs(out[cu_q[i]: cu_q[i + 1]] - ref_out[0].transpose(1, 0, 2)).max() < 2e-2, i


@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize("lengths_q,used_k", [((333, 1), (1200, 700)), ((1200, 97), (333, 1025))])
def test_alibi_on_the_tma_kernel_with_keys_past_seqused_k(rng, causal, lengths_q, used_k, map_calls):
    """ALiBi on the TMA kernel over a packed batch with seqused_k: the V rows past each
    sequence's used keys (NaN here) never reach the output, dense, bottom-right and top-left
    causal, Lq < Lk and Lq > Lk; slopes up to ALiBi's largest (2^-1, whose scores move by far more
    than the lazy rescale's 2^8 per key tile) and a zero one; each sequence against its own
    float64 attention under FlashAttention-2's rule (2x a plain bf16 implementation's error)."""
    dtype, d, heads = "bfloat16", 128, 4
    capacity = [n + 100 for n in used_k]
    cu_q, cu_k = (numpy.concatenate([[0], numpy.cumsum(n)]).astype(numpy.int32) for n in (lengths_q, capacity))
    dev, exact = _inputs(rng, dtype, (int(cu_q[-1]), heads, d), (int(cu_k[-1]), heads, d), (int(cu_k[-1]), heads, d))
    for i, n in enumerate(used_k):
        dev[2][cu_k[i] + n: cu_k[i + 1]] = numpy.nan
    slopes = numpy.array([2.0 ** -1, 2.0 ** -3, 2.0 ** -6, 0.0], dtype=numpy.float32)
    out, lse = cuflash.attention_varlen(*dev, cupy.asarray(cu_q), cupy.asarray(cu_k), causal=causal,
                                        alibi_slopes=cupy.asarray(slopes), return_lse=True,
                                        seqused_k=cupy.asarray(numpy.array(used_k, dtype=numpy.int32)))
    assert map_calls
    out, lse = cupy.asnumpy(out).astype(numpy.float64), cupy.asnumpy(lse).astype(numpy.float64)
    for i, n in enumerate(used_k):
        q, k, v = (x[c[i]: c[i] + m].transpose(1, 0, 2)[None]
                   for x, c, m in zip(exact, (cu_q, cu_k, cu_k), (lengths_q[i], n, n)))
        options = dict(causal=causal, alibi_slopes=slopes.astype(numpy.float64))
        ref_out, ref_lse = score_mods_ref(q, k, v, **options)
        base_out, _ = score_mods_ref(q, k, v, dtype=numpy.dtype(dtype), **options)
        got = out[cu_q[i]: cu_q[i + 1]].transpose(1, 0, 2)[None]
        err, base = numpy.abs(got - ref_out).max(), numpy.abs(base_out - ref_out).max()
        assert err <= 2 * base + 1e-3, (i, err, base)
        got_lse, seen = lse[None, :, cu_q[i]: cu_q[i + 1]], numpy.isfinite(ref_lse)  # lse: (Hq, total_q)
        assert numpy.array_equal(numpy.isfinite(got_lse), seen)
        assert numpy.abs(got_lse[seen] - ref_lse[seen]).max() < 1e-3 * max(1.0, numpy.abs(ref_lse[seen]).max())


MOD_CASES = [
    (128, dict(softcap=30.0, alibi="heads", sinks=True, causal=True)),
    (64, dict(softcap=5.0, window=(200, 0))),
    (256, dict(alibi="heads", causal="top_left")),
    (192, dict(bias="heads")),
    (128, dict(mask=True, sinks=True)),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,options", MOD_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_score_modifiers_bias_and_masks_run_on_the_tma_kernel(rng, dtype, d, options, map_calls):
    """Softcap, ALiBi, sinks, a bias and a (non key-padding) mask: the kScoreMods form."""
    b, h, l_q, l_k = 2, 4, 333, 1200
    dev, exact = _inputs(rng, dtype, (b, h, l_q, d), (b, h, l_k, d), (b, h, l_k, d))
    kwargs, ref_kwargs = {}, {}
    for name, value in options.items():
        if name == "alibi":
            slopes = rng.uniform(0.01, 0.2, h).astype(numpy.float32)
            kwargs["alibi_slopes"], ref_kwargs["alibi_slopes"] = cupy.asarray(slopes), slopes.astype(numpy.float64)
        elif name == "sinks":
            sinks = rng.standard_normal(h).astype(numpy.float32)
            kwargs["sinks"], ref_kwargs["sinks"] = cupy.asarray(sinks), sinks.astype(numpy.float64)
        elif name == "bias":
            bias = rng.standard_normal((h, l_q, l_k)).astype(numpy.dtype(dtype))
            kwargs["bias"], ref_kwargs["bias"] = cupy.asarray(bias), bias.astype(numpy.float64)
        elif name == "mask":
            mask = rng.random((l_q, l_k)) < 0.7
            kwargs["mask"], ref_kwargs["mask"] = cupy.asarray(mask), mask
        else:
            kwargs[name] = ref_kwargs[name] = value
    out, lse = cuflash.attention(*dev, return_lse=True, **kwargs)
    ref_out, ref_lse = score_mods_ref(*exact, **ref_kwargs)
    base_out, _ = score_mods_ref(*exact, dtype=numpy.dtype(dtype), **ref_kwargs)
    assert map_calls
    err = numpy.abs(cupy.asnumpy(out).astype(numpy.float64) - ref_out).max()
    base = numpy.abs(base_out - ref_out).max()
    assert err <= 2 * base + 1e-3, (err, base)
    assert numpy.abs(cupy.asnumpy(lse).astype(numpy.float64) - ref_lse).max() < 1e-3 * max(1.0, numpy.abs(ref_lse).max())


@pytest.mark.parametrize("d", [128, 192, 256])
def test_packed_batches_run_on_the_tma_kernel(rng, d, map_calls):
    """A packed batch's maps span all its tokens; each sequence (empty, one token, long) must
    equal its own dense attention, tiles past its end reading the next sequence's rows. (d64's
    causal rows this short run fwd_wgmma: tiles._FWD_WGMMA_WS_MASKED_TABLE.)"""
    dtype = "bfloat16"
    lengths_q, lengths_k = [300, 0, 1, 1025, 77], [1200, 5, 1300, 1100, 0]
    hq, hk = 4, 2
    cu_q, cu_k = (numpy.concatenate([[0], numpy.cumsum(n)]).astype(numpy.int32) for n in (lengths_q, lengths_k))
    dev, exact = _inputs(rng, dtype, (int(cu_q[-1]), hq, d), (int(cu_k[-1]), hk, d), (int(cu_k[-1]), hk, d))
    out, lse = cuflash.attention_varlen(*dev, cupy.asarray(cu_q), cupy.asarray(cu_k), causal=True, return_lse=True)
    out, lse = cupy.asnumpy(out).astype(numpy.float64), cupy.asnumpy(lse)
    assert map_calls
    for i in range(len(lengths_q)):
        rows = slice(cu_q[i], cu_q[i + 1])
        if lengths_q[i] == 0:
            continue
        q, k, v = (x[slice(c[i], c[i + 1])].transpose(1, 0, 2)[None] for x, c in zip(exact, (cu_q, cu_k, cu_k)))
        if lengths_k[i] == 0:
            assert (out[rows] == 0).all() and numpy.isneginf(lse[:, rows]).all()
            continue
        ref_out, ref_lse = score_mods_ref(q, k, v, causal=True)
        assert numpy.abs(out[rows] - ref_out[0].transpose(1, 0, 2)).max() < 2e-2, i
        assert numpy.abs(lse[:, rows] - ref_lse[0]).max() < 1e-3, i


# The warp-specialized dK/dV kernel (bwd_dkdv_wgmma_ws.cu, d64 and d128).
BACKWARD_CASES = [
    ((2, 4, 200, 64), (2, 4, 97, 64), dict()),
    ((1, 2, 1025, 128), (1, 2, 1025, 128), dict(causal=True)),
    ((2, 8, 333, 128), (2, 2, 1025, 128), dict(causal=True)),          # GQA: heads summed on chip
    ((1, 6, 300, 64), (1, 1, 300, 64), dict(window=(64, 7))),          # MQA
    ((2, 2, 97, 100), (2, 2, 1, 100), dict(causal="top_left")),        # one key, 100 -> 128
    ((3, 2, 129, 128), (3, 2, 257, 128), dict(softcap=20.0, causal=True)),
]


@pytest.fixture
def backward_map_calls(monkeypatch):
    """The backward calls that built tensor maps (bwd_dkdv_wgmma_ws ran)."""
    calls = []
    real = plan._with_tensor_maps

    def spy(struct, specs, arrays):
        if struct.dtype == plan.BWD_PARAMS_DTYPE:
            calls.append(tuple(x.shape for x in arrays))
        return real(struct, specs, arrays)

    monkeypatch.setattr(plan, "_with_tensor_maps", spy)
    plan.forget()
    return calls


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("q_shape,kv_shape,options", BACKWARD_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_the_backward_runs_the_tma_dkdv_kernel_and_matches_the_reference(rng, q_shape, kv_shape, options, deterministic,
                                                                         backward_map_calls):
    dtype = "bfloat16"
    dev, exact = _inputs(rng, dtype, q_shape, kv_shape, kv_shape)
    if "softcap" not in options:
        check_backward(rng, dtype, *dev, deterministic=deterministic, **options)
    else:  # check_backward's reference has no modifiers: score_mods_ref under the same rule
        out, lse = cuflash.attention(*dev, return_lse=True, **options)
        dout_host = rng.standard_normal(q_shape).astype(numpy.dtype(dtype))
        grads = cuflash.attention_backward(cupy.asarray(dout_host), *dev, out, lse, deterministic=deterministic,
                                           **options)
        host = (*(x.astype(numpy.dtype(dtype)) for x in exact), dout_host)
        _, _, references = score_mods_ref(*host, **options)
        _, _, baselines = score_mods_ref(*host, dtype=numpy.dtype(dtype), **options)
        for name, grad, reference, baseline in zip(("dq", "dk", "dv"), grads, references, baselines):
            assert_close(cupy.asnumpy(grad), reference, dtype=numpy.dtype(dtype), baseline=baseline, kind="grad",
                         name=name)
    assert backward_map_calls


def test_backward_keys_past_a_packed_sequence_read_as_zeros(rng, backward_map_calls):
    """A packed batch: the key tile past a sequence's end holds the next sequence's keys in the
    maps' view; the kernel zeroes them (dQ would take their K otherwise)."""
    dtype, d, hq, hk = "bfloat16", 128, 4, 2
    lengths_q, lengths_k = [130, 200, 1], [100, 300, 77]
    cu_q, cu_k = (numpy.concatenate([[0], numpy.cumsum(n)]).astype(numpy.int32) for n in (lengths_q, lengths_k))
    dev, exact = _inputs(rng, dtype, (int(cu_q[-1]), hq, d), (int(cu_k[-1]), hk, d), (int(cu_k[-1]), hk, d))
    cu = (cupy.asarray(cu_q), cupy.asarray(cu_k))
    out, lse = cuflash.attention_varlen(*dev, *cu, return_lse=True)
    dout = cupy.asarray(rng.standard_normal(out.shape).astype(numpy.dtype(dtype)))
    dq, dk, dv = (cupy.asnumpy(g).astype(numpy.float64)
                  for g in cuflash.attention_varlen_backward(dout, *dev, out, lse, *cu))
    assert backward_map_calls
    dout_host = cupy.asnumpy(dout).astype(numpy.float64)
    for i in range(len(lengths_q)):
        rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        q, k, v = (x[r].transpose(1, 0, 2)[None] for x, r in zip(exact, (rows_q, rows_k, rows_k)))
        _, _, (rq, rk, rv) = score_mods_ref(q, k, v, dout_host[rows_q].transpose(1, 0, 2)[None])
        for name, got, ref in (("dq", dq[rows_q], rq), ("dk", dk[rows_k], rk), ("dv", dv[rows_k], rv)):
            assert numpy.abs(got - ref[0].transpose(1, 0, 2)).max() < 5e-2 * max(1.0, numpy.abs(ref).max()), (i, name)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_dq_rows_off_16_bytes_take_the_reds(rng, causal, backward_map_calls):
    """dQ leaves bwd_dkdv_wgmma_ws by bulk adds of whole dq_accum rows, which must start on 16
    bytes (D % 4 == 0); D = 62 in rows of 64 (views, so the maps still describe q, k, v) keeps
    the consumers' REDs."""
    dtype, d = "bfloat16", 62
    full = [cupy.asarray(rng.standard_normal(s).astype(numpy.dtype(dtype)))
            for s in ((2, 4, 300, 64), (2, 2, 333, 64), (2, 2, 333, 64))]
    q, k, v = (x[..., :d] for x in full)
    check_backward(rng, dtype, q, k, v, causal=causal)
    assert backward_map_calls
