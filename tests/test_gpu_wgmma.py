"""The Hopper wgmma building blocks (cuda_src/ptx.cuh section 9, tc::Sw128Tile) on their own.

One warpgroup multiplies D (64 x N) = A (64 x K) B (K x N) through ptx::Wgmma in each operand
form the kernels use: A and B K-major or MN-major in 128-byte swizzled shared tiles, A from
registers, N spanning one or two 64-column panels, and a B that starts inside a panel. A wrong
descriptor field, swizzle or fragment layout shows up here as a wrong product, before it can
hide inside an attention kernel. Exact: small integers in bf16, products summed in fp32.
Needs compute capability 9.0 (sm_90a).
"""
from __future__ import annotations

import numpy
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

K = 128  # two 64-column panels along k for the K-major operands

SOURCE = r"""
#include "ptx.cuh"
#include "tile_tc.cuh"
using namespace cuflash;

template <bool kFirst, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

// Element (r, c) of a row-major tile into its swizzled place (16-bit store).
template <typename Tile>
__device__ void put(unsigned tile, int r, int c, unsigned short x) {
    asm volatile("st.shared.u16 [%0], %1;" ::"r"(tile + Tile::offset(r, c / 8) + 2 * (c % 8)), "h"(x) : "memory");
}

// a: A as M x K (row-major, K contiguous); b: B as N x K when !kTransB, else K x kBCols.
// B's wgmma reads columns [kCol0, kCol0 + N) of its tile (MN-major only).
template <int N, int kTransA, int kTransB, int kRegA, int kCol0>
__global__ void __launch_bounds__(128) wgmma_probe(const unsigned short* a, const unsigned short* b, float* d) {
    constexpr int kK = 128;
    constexpr int kBCols = kTransB ? ((kCol0 + N + 63) / 64) * 64 : kK;  // B tile width
    constexpr int kBRows = kTransB ? kK : N;
    using ATile = typename Pick<kTransA, tc::Sw128Tile<kK, 64>, tc::Sw128Tile<64, kK>>::type;
    using BTile = tc::Sw128Tile<kBRows, kBCols>;
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned base = (ptx::smem_addr(smem) + 1023u) & ~1023u;
    const unsigned a_smem = base, b_smem = base + ATile::kBytes;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    for (int i = tid; i < 64 * kK; i += 128) {
        const int m = i / kK, k = i % kK;
        if (kTransA) put<ATile>(a_smem, k, m, a[i]);
        else put<ATile>(a_smem, m, k, a[i]);
    }
    for (int i = tid; i < kBRows * kBCols; i += 128) put<BTile>(b_smem, i / kBCols, i % kBCols, b[i]);
    ptx::fence_proxy_async_shared();
    __syncthreads();

    const unsigned long long a_desc = kTransA ? ptx::sw128_desc(a_smem, ATile::kPanelBytes, 1024)
                                              : ptx::sw128_desc(a_smem, 16, 1024);
    const unsigned long long b_desc = kTransB ? ptx::sw128_desc(b_smem + (kCol0 / 64) * BTile::kPanelBytes + 2 * (kCol0 % 64),
                                                                BTile::kPanelBytes, 1024)
                                              : ptx::sw128_desc(b_smem, 16, 1024);
    auto k_step = [](int trans, int kk, int panel_bytes) {
        return static_cast<unsigned long long>((trans ? kk * 2048 : (kk / 4) * panel_bytes + (kk % 4) * 32) >> 4);
    };
    float acc[N / 8][4];
    for (int nt = 0; nt < N / 8; ++nt)
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
        if (kRegA) {
            // m16k16 A fragment of this warp's rows 16w..16w+15 (ptx.cuh's mma layout).
            const int g = lane / 4, t = lane % 4, row = 16 * warp + g, col = 16 * kk + 2 * t;
            auto pair = [&](int r, int c) { return a[r * kK + c] | (static_cast<unsigned>(a[r * kK + c + 1]) << 16); };
            const unsigned frag[4] = {pair(row, col), pair(row + 8, col), pair(row, col + 8), pair(row + 8, col + 8)};
            ptx::wgmma_fence();
            ptx::Wgmma<N>::template rs<__nv_bfloat16, kTransB>(acc, frag, b_desc + k_step(kTransB, kk, BTile::kPanelBytes));
        } else {
            ptx::Wgmma<N>::template ss<__nv_bfloat16, kTransA, kTransB>(
                acc, a_desc + k_step(kTransA, kk, ATile::kPanelBytes), b_desc + k_step(kTransB, kk, BTile::kPanelBytes));
        }
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_pin(acc);
    for (int nt = 0; nt < N / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + lane / 4 + 8 * (e / 2), col = 8 * nt + 2 * (lane % 4) + e % 2;
            d[row * N + col] = acc[nt][e];
        }
}
"""

# (N, A MN-major, B MN-major, A from registers, first B column)
FORMS = [
    (64, 0, 0, 0, 0),    # S^T = K Q^T: both K-major
    (128, 0, 0, 0, 0),   # ... with 128 queries
    (64, 1, 1, 0, 0),    # dQ = dS K: both MN-major
    (128, 1, 1, 0, 0),   # ... B across two panels (the leading byte offset)
    (64, 1, 1, 0, 64),   # ... B from the second panel
    (32, 1, 1, 0, 32),   # ... B starting inside a panel
    (64, 0, 1, 1, 0),    # dV += P^T dO: A from registers, B MN-major
    (128, 0, 1, 1, 0),   # ... across two panels
]


def _bf16_bits(x: numpy.ndarray) -> numpy.ndarray:
    """bfloat16 bit patterns of small integers (exact), as uint16."""
    return (x.astype(numpy.float32).view(numpy.uint32) >> 16).astype(numpy.uint16)


@pytest.mark.parametrize("n, trans_a, trans_b, reg_a, col0", FORMS)
def test_wgmma_forms_multiply_exactly(n, trans_a, trans_b, reg_a, col0):
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("wgmma needs compute capability 9.0")
    from cuflash._gpu import kernels

    rng = numpy.random.default_rng(n + 2 * trans_a + 4 * trans_b + 8 * reg_a + col0)
    a = rng.integers(-4, 5, size=(64, K)).astype(numpy.float32)
    b_cols = ((col0 + n + 63) // 64) * 64 if trans_b else K
    b_tile = rng.integers(-4, 5, size=(K, b_cols) if trans_b else (n, K)).astype(numpy.float32)
    b = b_tile[:, col0:col0 + n] if trans_b else b_tile.T  # B as K x N
    expected = a @ b

    name = f"wgmma_probe<{n}, {trans_a}, {trans_b}, {reg_a}, {col0}>"
    module = cupy.RawModule(code=SOURCE, options=kernels.compile_options(None) + ("-arch=sm_90a",),
                            name_expressions=(name,))
    kernel = module.get_function(name)
    smem = 1024 + 2 * 64 * K + 2 * K * max(b_cols, n)
    kernel.max_dynamic_shared_size_bytes = smem
    d = cupy.full((64, n), numpy.nan, dtype=numpy.float32)
    kernel((1,), (128,), (cupy.asarray(_bf16_bits(a)), cupy.asarray(_bf16_bits(b_tile)), d), shared_mem=smem)
    numpy.testing.assert_array_equal(cupy.asnumpy(d), expected)
