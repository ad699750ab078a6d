"""The bulk tensor copy engine's building blocks (the Hopper issue's first step): tensor-map specs
(cuflash/_gpu/tma.py) checked against the driver's rules on the host, ptx.cuh's section-10
wrappers (mbarrier, cp.async.bulk.tensor, elect, setmaxnreg) assembled by ptxas for sm_90a, and
on an sm_90 GPU a box copied by the engine, read back: the box's elements, zeros past the
tensor's end, the 128-byte swizzle tc::Sw128Tile assumes, (B, L, H, D) views read in place and a
map re-pointed at another tensor.
"""
from __future__ import annotations

import importlib.util

import numpy
import pytest

from cuflash._gpu import kernels, tma
from cuflash._gpu.tma import TensorMapSpec

PROBE = r"""
#include "ptx.cuh"

struct TmaProbe {
    cuflash::ptx::TensorMap map;
    float* out;
    int c[4];  // the box's coordinates, innermost first
    unsigned bytes;
};

// One box of the tensor `map` describes, at p.c, copied by the engine into shared memory (at a
// 1024-byte boundary: the 128-byte swizzle's pattern follows the address bits) and from there,
// word by word, to `out`.
extern "C" __global__ void __launch_bounds__(128, 1) tma_probe(const __grid_constant__ TmaProbe p) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ __align__(8) unsigned long long barrier;
    const unsigned base = cuflash::ptx::smem_addr(smem), box = (base + 1023u) & ~1023u;
    const unsigned bar = cuflash::ptx::smem_addr(&barrier);
    if (threadIdx.x == 0) cuflash::ptx::mbarrier_init(bar, 1);
    __syncthreads();
    if (threadIdx.x < 32 && cuflash::ptx::elect_one()) {
        cuflash::ptx::tma_prefetch_map(p.map);
        cuflash::ptx::mbarrier_arrive_expect_tx(bar, p.bytes);
        cuflash::ptx::tma_load_4d(box, p.map, bar, p.c[0], p.c[1], p.c[2], p.c[3]);
    }
    cuflash::ptx::mbarrier_wait(bar, 0);
    const float* landed = reinterpret_cast<const float*>(smem + (box - base));
    for (unsigned i = threadIdx.x; i < p.bytes / 4; i += blockDim.x) p.out[i] = landed[i];
}

// Only assembled (test_the_wrappers_assemble_for_hopper): every wrapper once.
extern "C" __global__ void __launch_bounds__(256, 1) tma_wrappers(const __grid_constant__ TmaProbe p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) unsigned long long barrier;
    const unsigned box = cuflash::ptx::smem_addr(smem), bar = cuflash::ptx::smem_addr(&barrier);
    if (threadIdx.x == 0) cuflash::ptx::mbarrier_init(bar, 2);
    __syncthreads();
    if (threadIdx.x >= 128) {
        cuflash::ptx::setmaxnreg_dec<40>();
        if (threadIdx.x == 128) {
            cuflash::ptx::mbarrier_arrive_expect_tx(bar, p.bytes);
            cuflash::ptx::tma_load_2d(box, p.map, bar, p.c[0], p.c[1]);
            cuflash::ptx::tma_load_3d(box, p.map, bar, p.c[0], p.c[1], p.c[2]);
        }
    } else {
        cuflash::ptx::setmaxnreg_inc<232>();
        if (threadIdx.x == 0) cuflash::ptx::mbarrier_arrive(bar);
        cuflash::ptx::mbarrier_wait(bar, 0);
        p.out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
    }
}
"""

# The NumPy mirror of struct TmaProbe: the map's alignas(64) pads the struct to 192 bytes.
PROBE_DTYPE = numpy.dtype({"names": ["map", "out", "c", "bytes"],
                           "formats": [(numpy.uint8, tma.MAP_BYTES), numpy.uint64, (numpy.int32, 4), numpy.uint32],
                           "offsets": [0, 128, 136, 152], "itemsize": 192})


# --------------------------------------------------------------------------- specs (no GPU)

def test_a_contiguous_array_and_a_strided_view_give_their_specs():
    spec = TensorMapSpec.of((2, 3, 100, 32), (3 * 100 * 32 * 4, 100 * 32 * 4, 32 * 4, 4), "float32", (1, 1, 64, 32))
    assert (spec.dims, spec.strides, spec.box) == ((32, 100, 3, 2), (128, 12800, 38400), (32, 64, 1, 1))
    assert spec.box_bytes == 64 * 32 * 4
    # (B, L, H, D) storage seen as (B, H, L, D): the head stride is below the row stride
    view = TensorMapSpec.of((2, 4, 50, 64), (50 * 4 * 64 * 2, 64 * 2, 4 * 64 * 2, 2), "bfloat16", (1, 1, 64, 64), 128)
    assert (view.dims, view.strides, view.swizzle) == ((64, 50, 4, 2), (512, 128, 25600), 128)
    # a length-1 axis is never stepped: its stride need not be a multiple of 16 bytes
    assert TensorMapSpec.of((1, 40, 8), (4, 32, 4), "float32", (1, 8, 8)).strides == (32, 16)


@pytest.mark.parametrize("make, match", [
    (lambda: TensorMapSpec.of((5, 3), (12, 4), "float32", (1, 4)), "multiples of 16 bytes"),
    (lambda: TensorMapSpec.of((5, 8), (32, 8), "float32", (1, 8)), "innermost axis must be contiguous"),
    (lambda: TensorMapSpec("float32", (8, 5), (32,), (2, 5)), "inner extent must be a multiple of 16"),
    (lambda: TensorMapSpec("float32", (64, 5), (256,), (64, 5), 128), "128-byte swizzle takes boxes of at most 128"),
    (lambda: TensorMapSpec("float32", (64, 5), (256,), (32, 300)), r"box sizes must be in \[1, 256\]"),
    (lambda: TensorMapSpec("float32", (4,) * 6, (16,) * 5, (4,) * 6), "1 to 5 axes"),
    (lambda: TensorMapSpec("int8", (16, 2), (16,), (16, 1)), "dtype must be one of"),
    (lambda: TensorMapSpec("float16", (64, 2), (128,), (64, 2), 48), "swizzle must be one of"),
    (lambda: TensorMapSpec("float16", (64, 2), (128, 128), (64, 2)), "needs 2 box sizes and 1 strides"),
])
def test_layouts_the_engine_cannot_read_are_refused_on_the_host(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_misaligned_address_is_refused_before_the_driver():
    spec = TensorMapSpec("float32", (32, 10), (128,), (32, 8))
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma.encode(spec, 0x1008)
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma.replace_address(bytes(tma.MAP_BYTES), 0x1004)




needs_nvrtc = pytest.mark.skipif(importlib.util.find_spec("cupy_backends") is None, reason="needs CuPy's NVRTC")


def _options(arch: str) -> tuple[str, ...]:
    """The kernels' include paths (as kernels.compile_options) and the target."""
    return ("-std=c++17", f"-I{kernels.source_dir()}", *(f"-I{d}" for d in kernels.cuda_include_dirs()),
            f"-arch=sm_{arch}")


@needs_nvrtc
def test_the_probe_struct_matches_its_mirror():
    """sizeof and offsets of struct TmaProbe as the compiler lays it out (params.py's layout probe)."""
    from test_pipeline import _ptx_stored_constants

    from cuflash._gpu import params

    source = PROBE.split("// One box")[0] + params.layout_probe_source("TmaProbe", PROBE_DTYPE)
    stored = _ptx_stored_constants(source, _options("90a")[:-1] + ("-arch=compute_90a",))
    expected = {0: PROBE_DTYPE.itemsize}
    expected.update({i: PROBE_DTYPE.fields[name][1] for i, name in enumerate(PROBE_DTYPE.names, start=1)})
    assert stored == expected


@needs_nvrtc
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_the_wrappers_assemble_for_hopper(arch):
    """Section 10 assembles to machine code for sm_90a (ptxas checks every instruction's form),
    and still compiles for sm_80, where the wrappers trap."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(PROBE, "tma_probe.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, _options(arch) + ("-Xptxas=-v",))
        except nvrtc.NVRTCError as error:
            raise AssertionError(nvrtc.getProgramLog(prog)) from error
        cubin = nvrtc.getCUBIN(prog)
        log = nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    assert cubin[:4] == b"\x7fELF"
    assert "spill" not in log or " 0 bytes spill" in log
    if arch == "90a":
        assert "C7508" not in log, "ptxas ignored setmaxnreg"


# --------------------------------------------------------------------------- on an sm_90 GPU

def _hopper():
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0 or cupy.cuda.Device().compute_capability < "90":
        pytest.skip("needs a GPU of compute capability 9.0 or later")
    return cupy


def _copy_box(cupy, encoded: bytes, coords, spec: TensorMapSpec):
    from cupy_backends.cuda.api import driver

    module = cupy.RawModule(code=PROBE, options=_options("90a"))  # beside CuPy's own -arch (kernels._build)
    function = module.get_function("tma_probe")
    function.max_dynamic_shared_size_bytes = spec.box_bytes + 1024
    out = cupy.full(spec.box_bytes // 4, numpy.nan, dtype=cupy.float32)
    params = numpy.zeros(1, dtype=PROBE_DTYPE)
    params["map"][0] = numpy.frombuffer(encoded, dtype=numpy.uint8)
    params["out"], params["c"][0], params["bytes"] = out.data.ptr, coords, spec.box_bytes
    argv = numpy.array([params.ctypes.data], dtype=numpy.uint64)
    driver.launchKernel(function.kernel.ptr, 1, 1, 1, 128, 1, 1, spec.box_bytes + 1024,
                        cupy.cuda.get_current_stream().ptr, argv.ctypes.data, 0)
    cupy.cuda.get_current_stream().synchronize()
    return out.get()


def _expected_box(host, coords, box):
    """host[b, h, rows, cols] of the box at coords (innermost first), zeros past the ends."""
    c0, c1, c2, c3 = coords
    out = numpy.zeros(box[::-1], dtype=host.dtype)
    part = host[c3: c3 + box[3], c2: c2 + box[2], c1: c1 + box[1], c0: c0 + box[0]]
    out[tuple(slice(0, n) for n in part.shape)] = part
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BHLD", "BLHD view"])
def test_the_engine_copies_a_box_and_zero_fills_past_the_end(rng, layout):
    cupy = _hopper()
    host = rng.standard_normal((2, 3, 100, 32)).astype(numpy.float32)
    array = cupy.asarray(host)
    if layout == "BLHD view":
        array = cupy.ascontiguousarray(array.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    box = (32, 64, 1, 1)  # innermost first: 32 columns, 64 rows, one head, one batch
    spec = TensorMapSpec.of(array.shape, array.strides, "float32", box[::-1])
    coords = (0, 80, 1, 1)  # rows 80..143 of head 1, batch 1: 20 real rows, then zeros
    got = _copy_box(cupy, tma.encode(spec, array.data.ptr), coords, spec)
    numpy.testing.assert_array_equal(got.reshape(64, 32), _expected_box(host, coords, box)[0, 0])


@pytest.mark.gpu
def test_the_128_byte_swizzle_is_the_one_sw128tile_assumes(rng):
    """With a 128-byte swizzle, the 16-byte chunk c of box row r lands at chunk c ^ (r % 8) of
    that row (tile_tc.cuh's Sw128Tile layout, which the wgmma descriptors read)."""
    cupy = _hopper()
    host = rng.standard_normal((1, 1, 64, 32)).astype(numpy.float32)  # rows of 128 bytes
    array = cupy.asarray(host)
    spec = TensorMapSpec.of(array.shape, array.strides, "float32", (1, 1, 64, 32), swizzle=128)
    got = _copy_box(cupy, tma.encode(spec, array.data.ptr), (0, 0, 0, 0), spec).reshape(64, 8, 4)
    rows = host[0, 0].reshape(64, 8, 4)
    for r in range(64):
        for c in range(8):
            numpy.testing.assert_array_equal(got[r, c ^ (r % 8)], rows[r, c])


@pytest.mark.gpu
def test_a_map_re_pointed_at_another_tensor_reads_it(rng):
    cupy = _hopper()
    first, second = (cupy.asarray(rng.standard_normal((1, 2, 64, 32)).astype(numpy.float32)) for _ in range(2))
    spec = TensorMapSpec.of(first.shape, first.strides, "float32", (1, 1, 64, 32))
    encoded = tma.encode(spec, first.data.ptr)
    moved = tma.replace_address(encoded, second.data.ptr)
    assert moved != encoded
    got = _copy_box(cupy, moved, (0, 0, 1, 0), spec)
    numpy.testing.assert_array_equal(got.reshape(64, 32), second.get()[0, 1])
