// Tiles of 16-bit elements for the tensor-core kernels: their shared-memory layout and the
// copies between global and shared memory, with zero padding and bounds checks.
//
// Global tensors are row-major with a unit column stride and a row stride in elements. Copies
// move 16-byte chunks (8 elements); nothing outside [0, rows) x [0, cols) is read or written.
#pragma once
#include "dropout.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"

namespace cuflash {
namespace tc {

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ---- The arithmetic of an Element (a tensor-core Variant's first template argument).
//
// float16 / bfloat16 multiply on m16n8k16 tensor cores. `tf32` (precision="tf32", an opt-in)
// is float32 stored as float and multiplied on m16n8k8 TF32 tensor cores, each operand rounded
// to TF32 (10 mantissa bits: about 2^-11 relative per product) and summed in fp32.
// In shared memory a float is two 16-bit units: tiles, loaders and stores take widths and
// strides in those units. A k8 step of 4-byte elements has exactly the byte geometry of a k16
// step of 2-byte ones (two 16-byte chunks), so fragments load with the same lane addresses.
//
// `tf32x3` (precision="highest" on tensor cores) is float32 stored the same way and multiplied
// as three TF32 products ("3xTF32"): each operand splits into x = hi + lo, hi = x rounded to TF32
// and lo = (x - hi) rounded to TF32, and a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi. The terms
// dropped (a_lo b_lo and lo's rounding) are ~2^-22 |a b| against float32's 2^-24 per product:
// below the sums' rounding on ordinary inputs, several times a plain float32 implementation's
// error on scores of ~1e3 whose near-ties decide P (benchmarks/NOTES.md, session 29).
// The tensor cores truncate as they accumulate (benchmarks/NOTES.md, session 12: in place, P V's
// error grew with the row's length, 10x float32's), so each step's three products are summed in
// a fresh fragment and added to the accumulator by FADD, which rounds to nearest.
struct tf32 {};
struct tf32x3 {};

template <typename Element>
struct Arith {  // float16, bfloat16
    using Storage = unsigned short;
    using Mma = Element;                                // the operand type of one MMA instruction
    static constexpr int kProducts = 1;                 // MMAs per product of two operands
    static constexpr int kUnits = 1;                    // 16-bit units per element
    static constexpr int kK = 16;                       // the k of one MMA step
    static constexpr unsigned kSignBits = 0x80008000u;  // the sign bits of a 32-bit word's elements
    using AFragment = unsigned[4];                      // an A operand of one MMA step
};

// An operand fragment of R registers: float values rounded to TF32, as the MMA reads them.
// `Like<S>`: the fragment type of the other operand (B beside A).
template <int R>
struct Tf32Fragment {
    template <int S>
    using Like = Tf32Fragment<S>;
    unsigned r[R];

    __device__ __forceinline__ void set(int i, float x) { r[i] = ptx::to_tf32(x); }
    __device__ __forceinline__ void round(const unsigned (&raw)[R]) {
#pragma unroll
        for (int i = 0; i < R; ++i) set(i, __uint_as_float(raw[i]));
    }
};

// x's bits rounded to TF32 (to nearest, ties away from zero: + half of the dropped bits' unit,
// then the 13 low bits cleared). Infinities stay; a float within 2^-11 of FLT_MAX rounds to
// infinity, as cvt.rna does. Two integer ops where cvt.rna takes four (its NaN test: a NaN's
// payload here is kept in the top mantissa bits, or the NaN becomes an infinity of its sign).
__device__ __forceinline__ unsigned tf32_bits(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }

// x split into 3xTF32's hi and lo halves (tf32x3 above). A non-finite x (and a float so close
// to FLT_MAX that hi would round to infinity) is hi = 0, lo = x: its products are then lo's
// alone, so x times a finite nonzero operand is an infinity of the right sign and times 0 is
// NaN, as in float32 (hi = x would meet the other operand's lo, often 0: NaN for P = 1).
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    const unsigned rounded = tf32_bits(x);
    const float rest = x - __uint_as_float(rounded);  // exact for finite x; NaN or +-inf otherwise
    const bool finite = fabsf(rest) < __int_as_float(0x7f800000);
    hi = finite ? rounded : 0u;
    lo = finite ? tf32_bits(rest) : __float_as_uint(x);
}

// A 3xTF32 operand fragment: hi and lo registers (split_tf32).
template <int R>
struct Tf32x3Fragment {
    template <int S>
    using Like = Tf32x3Fragment<S>;
    unsigned hi[R], lo[R];

    __device__ __forceinline__ void set(int i, float x) { split_tf32(x, hi[i], lo[i]); }
    __device__ __forceinline__ void round(const unsigned (&raw)[R]) {
#pragma unroll
        for (int i = 0; i < R; ++i) set(i, __uint_as_float(raw[i]));
    }
};

// bf16x6: float32 "highest" on bfloat16 tensor cores (bwd_dkdv_wgmma_x6.cu). Each operand is
// three bfloat16 pieces, x = x0 + x1 + x2, each rounded to nearest from what the ones before left
// (to within 2^-27 |x|: finer than float32's own rounding; bfloat16 has float32's exponent
// range), and a product is six MMAs (wgmma_x6_products: the three dropped terms x1 y2, x2 y1,
// x2 y2 are below 2^-26 |x y|, where 3xTF32 drops ~2^-22). Six bfloat16 MMAs take the time of
// three TF32 ones, but bfloat16 operands may be MN-major: no transposed copies (V^T, Q^T, dO^T,
// K^T), and the pieces take 6 bytes a float where hi and lo take 8.
struct bf16x6 {};

// Two floats split into bf16x6's pieces, two at a time as the MMAs read them (p[i]: piece i of
// x in the low half, of y in the high half; cvt.rn.bf16x2). A non-finite value (and one so close
// to FLT_MAX that its first piece would round to infinity) is pieces 0, 0 and its top 16 bits:
// a piece 2 meets only the other operand's piece 0 (wgmma_x6_products), so its products are
// those of float32 (an infinity times a finite nonzero value, NaN times 0), as split_tf32's lo.
__device__ __forceinline__ void split_bf16x3(float x, float y, unsigned (&p)[3]) {
    float rest_x = x, rest_y = y;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        p[i] = ptx::pack2<__nv_bfloat16>(rest_x, rest_y);
        rest_x -= __uint_as_float(p[i] << 16);
        rest_y -= __uint_as_float(p[i] & 0xffff0000u);
    }
    // A finite value's rest stays finite; a non-finite one's is NaN from the first subtraction.
    const bool finite_x = fabsf(rest_x) < __int_as_float(0x7f800000);
    const bool finite_y = fabsf(rest_y) < __int_as_float(0x7f800000);
    if (!(finite_x && finite_y)) {
        const unsigned keep = (finite_x ? 0x0000ffffu : 0u) | (finite_y ? 0xffff0000u : 0u);
        const unsigned top = (__float_as_uint(x) >> 16) | (__float_as_uint(y) & 0xffff0000u);
        p[0] &= keep;
        p[1] &= keep;
        p[2] = (p[2] & keep) | (top & ~keep);
    }
}

// c += a b for one m16n8k8 step, b's registers i and i + 1: one TF32 MMA, or 3xTF32's three
// into a fresh fragment (small terms first), then added by FADD (tf32x3 above).
template <int R>
__device__ __forceinline__ void mma_k8(float (&c)[4], const Tf32Fragment<4>& a, const Tf32Fragment<R>& b, int i) {
    ptx::mma_1688_tf32(c, a.r, b.r[i], b.r[i + 1]);
}
template <int R>
__device__ __forceinline__ void mma_k8(float (&c)[4], const Tf32x3Fragment<4>& a, const Tf32x3Fragment<R>& b, int i) {
    float step[4];
    ptx::mma_1688_tf32_zero(step, a.lo, b.hi[i], b.hi[i + 1]);
    ptx::mma_1688_tf32(step, a.hi, b.lo[i], b.lo[i + 1]);
    ptx::mma_1688_tf32(step, a.hi, b.hi[i], b.hi[i + 1]);
#pragma unroll
    for (int e = 0; e < 4; ++e) c[e] += step[e];
}

template <>
struct Arith<tf32> {
    using Storage = float;
    using Mma = tf32;
    static constexpr int kProducts = 1;
    static constexpr int kUnits = 2;
    static constexpr int kK = 8;
    static constexpr unsigned kSignBits = 0x80000000u;
    using AFragment = Tf32Fragment<4>;
};
template <>
struct Arith<tf32x3> : Arith<tf32> {
    using AFragment = Tf32x3Fragment<4>;
    static constexpr int kProducts = 3;  // lo hi + hi lo + hi hi
};

// An A fragment of one MMA step from shared memory by ldmatrix_x4 at the lane's address: as
// stored for 16-bit elements, rounded to TF32 for float32 (a TF32 k8 step has the byte geometry
// of a 16-bit k16 step, so the lane addresses are the same).
__device__ __forceinline__ void load_a(unsigned addr, unsigned (&a)[4]) { ptx::ldmatrix_x4(addr, a); }
template <template <int> class Fragment>
__device__ __forceinline__ void load_a(unsigned addr, Fragment<4>& a) {
    unsigned raw[4];
    ptx::ldmatrix_x4(addr, raw);
    a.round(raw);
}

// This lane's pair of an accumulator's n8 tile nt, columns 8 nt + 2t and 8 nt + 2t + 1 of `row`
// (t = lane % 4), into a shared Tile in the element's format: two 16-bit values packed into 4
// bytes, or two floats (TF32 Variants store float32) into 8.
template <typename Element, typename Tile>
__device__ __forceinline__ void store_pair(unsigned smem, int row, int nt, int lane, float lo, float hi) {
    if constexpr (Arith<Element>::kUnits == 2)
        ptx::st_shared_v2(smem + Tile::offset(row, 2 * nt) + 8 * (lane % 4), __float_as_uint(lo), __float_as_uint(hi));
    else
        ptx::st_shared_b32(smem + Tile::offset(row, nt) + 4 * (lane % 4), ptx::pack2<Element>(lo, hi));
}

// kRows x kCols 16-bit elements, row-major in 16-byte chunks.
// The row pitch is kCols/8 + 1 chunks: an odd pitch puts the same chunk of any 8 consecutive rows
// into 8 different 16-byte bank groups, so ldmatrix (one chunk from each of 8 rows) and
// row-wise 16-byte copies run without bank conflicts, for every head-dim bucket, at the price
// of one chunk per row.
template <int kRows, int kCols>
struct SmemTile {
    static_assert(kCols % 16 == 0, "tile width must be a multiple of 16 elements");
    static constexpr int kChunks = kCols / 8;
    static constexpr int kPitch = kChunks + 1;  // kChunks is even: the pitch is odd
    static constexpr int kBytes = kRows * kPitch * 16;

    __device__ __forceinline__ static constexpr unsigned offset(int row, int chunk) {
        return static_cast<unsigned>((row * kPitch + chunk) * 16);
    }
};

// kRows x kCols 16-bit elements in the layout wgmma reads without padding (ptx.cuh section 9):
// panels of 64 columns, each kRows rows of 128 bytes; inside every 8-row, 1024-byte atom the
// 16-byte chunk c of row r is stored at chunk c ^ (r % 8). The XOR spreads the same chunk of 8
// consecutive rows over all 32 banks, as the padding of SmemTile does, so 16-byte copies and
// stmatrix run without bank conflicts. The tile must start on a 1024-byte boundary.
template <int kRows, int kCols>
struct Sw128Tile {
    static_assert(kCols % 64 == 0 && kRows % 8 == 0, "whole 64-column panels of whole 8-row atoms");
    static constexpr int kChunks = kCols / 8;
    static constexpr int kPanelBytes = kRows * 128;
    static constexpr int kBytes = kPanelBytes * (kCols / 64);

    __device__ __forceinline__ static constexpr unsigned offset(int row, int chunk) {
        return static_cast<unsigned>((chunk / 8) * kPanelBytes + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
    }

    // wgmma descriptors of an operand that starts at shared address `addr` inside this tile
    // (ptx::sw128_desc): K-major, the tile's rows are the operand's M/N index (a k16 step is
    // +32 bytes, a panel every 4 steps); MN-major, its rows are the k index (a k16 step is +16
    // rows, 2048 bytes; N or M beyond 64 columns continue in the next panel). Built once per
    // operand from a 32-bit address (the other fields are constants); later k-steps advance it
    // (ptx::desc_advance).
    __device__ __forceinline__ static unsigned long long k_major(unsigned addr) { return ptx::sw128_desc(addr, 16, 1024); }
    __device__ __forceinline__ static unsigned long long mn_major(unsigned addr) {
        return ptx::sw128_desc(addr, kPanelBytes, 1024);
    }
    // Byte offset of k16 step kk of a K-major operand.
    __device__ __forceinline__ static constexpr unsigned k_step(int kk) { return (kk / 4) * kPanelBytes + (kk % 4) * 32; }
};

// C = A B^T over kKSteps k16 steps (the scores of the wgmma kernels: S = Q K^T, S^T = K Q^T), A
// and B K-major in 128-byte swizzled tiles (ATile, BTile) from shared addresses a and b: one
// wgmma of N = 8 kNTiles per step, the first overwriting C (nothing of its old value stays live),
// or with kOntoC adding to what C holds (C += A B^T: a bias loaded into C, bias_into_scores).
// Issued only: the caller commits and waits.
template <typename Element, int kKSteps, typename ATile, typename BTile, bool kOntoC = false, int kNTiles>
__device__ __forceinline__ void wgmma_a_bt(float (&c)[kNTiles][4], unsigned a, unsigned b) {
    const unsigned long long desc_a = ATile::k_major(a), desc_b = BTile::k_major(b);
    ptx::Wgmma<8 * kNTiles>::template ss<Element, 0, 0, kOntoC>(c, desc_a, desc_b);
#pragma unroll
    for (int kk = 1; kk < kKSteps; ++kk)
        ptx::Wgmma<8 * kNTiles>::template ss<Element, 0, 0>(c, ptx::desc_advance(desc_a, ATile::k_step(kk)),
                                                             ptx::desc_advance(desc_b, BTile::k_step(kk)));
}

// 3xTF32's C = A B^T (tf32x3 above) on TF32 wgmma: the order of its products, written once.
// product(kk, a_lo, b_lo) issues k8 step kk's product of A's (a_lo: lo, else hi) half and B's,
// all into C: first every step's small products, A_lo B_hi and A_hi B_lo, then the A_hi B_hi
// ones. The tensor cores truncate C at each step's accumulation (tf32x3 above): while C holds
// only the small terms (~2^-11 of the result) that loses nothing of weight, and the large steps
// then truncate once each, as a plain TF32 product would; interleaved, every small term would be
// added to the large running sum and lose up to an ulp of it. Every product accumulates into C:
// the caller zeroes C first (before its wgmma_fence).
template <int kKSteps, typename Product>
__device__ __forceinline__ void wgmma_x3_products(Product product) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
        product(kk, true, false);
        product(kk, false, true);
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) product(kk, false, false);
}

// bf16x6's product C += A B (bf16x6 above) over kKSteps k16 steps: product(kk, i, j) issues step
// kk of A's piece i times B's piece j, for (i, j) = (2, 0), (1, 1), (0, 2), then (1, 0), (0, 1),
// then (0, 0), each over every step: small terms first, for wgmma_x3_products's reason. Every
// product accumulates into C: the caller zeroes C first (before its wgmma_fence).
template <int kKSteps, typename Product>
__device__ __forceinline__ void wgmma_x6_products(Product product) {
#pragma unroll
    for (int o = 0; o < 6; ++o) {
        const int i = o < 3 ? 2 - o : (o < 5 ? 4 - o : 0), j = o < 3 ? o : (o < 5 ? o - 3 : 0);
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) product(kk, i, j);
    }
}

// bf16x6's C += A B with A and B in shared memory, each three piece tiles kBytes apart (ATile,
// BTile), K-major or (kTransA, kTransB) MN-major: a k16 step is Tile::k_step along a K-major row,
// 16 rows (2048 bytes) down an MN-major tile. The caller zeroes C, fences and commits. The tiles
// by their descriptors (da, db: piece 0's, of that major-ness), for a caller that keeps one
// across its loop (ptxas does not hoist them: bwd_dkdv_wgmma_x6h's K and V), or by address.
template <int kKSteps, typename ATile, typename BTile, int kTransA, int kTransB, int kNTiles>
__device__ __forceinline__ void wgmma_ss_x6_desc(float (&c)[kNTiles][4], unsigned long long da, unsigned long long db) {
    wgmma_x6_products<kKSteps>([&](int kk, int i, int j) {
        ptx::Wgmma<8 * kNTiles>::template ss<__nv_bfloat16, kTransA, kTransB>(
            c, ptx::desc_advance(da, i * ATile::kBytes + (kTransA ? kk * 2048 : ATile::k_step(kk))),
            ptx::desc_advance(db, j * BTile::kBytes + (kTransB ? kk * 2048 : BTile::k_step(kk))));
    });
}
template <int kKSteps, typename ATile, typename BTile, int kTransA, int kTransB, int kNTiles>
__device__ __forceinline__ void wgmma_ss_x6(float (&c)[kNTiles][4], unsigned a, unsigned b) {
    wgmma_ss_x6_desc<kKSteps, ATile, BTile, kTransA, kTransB>(c, kTransA ? ATile::mn_major(a) : ATile::k_major(a),
                                                              kTransB ? BTile::mn_major(b) : BTile::k_major(b));
}

// ... and with A in registers (a[kk][i]: k16 step kk of piece i, pack_a_x3), B in shared memory
// as wgmma_ss_x6's.
template <int kKSteps, typename BTile, int kTransB, int kNTiles>
__device__ __forceinline__ void wgmma_rs_x6_desc(float (&c)[kNTiles][4], const unsigned (&a)[kKSteps][3][4],
                                                 unsigned long long db) {
    wgmma_x6_products<kKSteps>([&](int kk, int i, int j) {
        ptx::Wgmma<8 * kNTiles>::template rs<__nv_bfloat16, kTransB>(
            c, a[kk][i], ptx::desc_advance(db, j * BTile::kBytes + (kTransB ? kk * 2048 : BTile::k_step(kk))));
    });
}
template <int kKSteps, typename BTile, int kTransB, int kNTiles>
__device__ __forceinline__ void wgmma_rs_x6(float (&c)[kNTiles][4], const unsigned (&a)[kKSteps][3][4], unsigned b) {
    wgmma_rs_x6_desc<kKSteps, BTile, kTransB>(c, a, kTransB ? BTile::mn_major(b) : BTile::k_major(b));
}

// 3xTF32's C = A B^T with A in registers, a_step(kk, lo) giving k8 step kk's TF32 fragment of
// A's lo (else hi) half, and B K-major in shared memory (b_lo: its lo half, in a tile of b's
// layout): the two overloads below.
template <int kKSteps, typename BTile, int kNTiles, typename AStep>
__device__ __forceinline__ void wgmma_rs_bt_x3_steps(float (&c)[kNTiles][4], const AStep& a_step, unsigned b,
                                                     unsigned b_lo) {
    const unsigned long long db = BTile::k_major(b), db_lo = BTile::k_major(b_lo);
    wgmma_x3_products<kKSteps>([&](int kk, bool lo_a, bool lo_b) {
        ptx::Wgmma<8 * kNTiles>::template rs<tf32, 0>(c, a_step(kk, lo_a),
                                                        ptx::desc_advance(lo_b ? db_lo : db, BTile::k_step(kk)));
    });
}
// A's fragments as arrays (a, a_lo: every k8 step's, hi and lo, as a_k8_from loads them; B's lo
// half from TileLoader::split).
template <int kKSteps, typename BTile, int kNTiles>
__device__ __forceinline__ void wgmma_rs_bt_x3(float (&c)[kNTiles][4], const unsigned (&a)[kKSteps][4],
                                               const unsigned (&a_lo)[kKSteps][4], unsigned b, unsigned b_lo) {
    wgmma_rs_bt_x3_steps<kKSteps, BTile>(
        c, [&](int kk, bool lo) -> const unsigned(&)[4] { return lo ? a_lo[kk] : a[kk]; }, b, b_lo);
}

// The same with A's fragments as Tf32x3Fragments (hi and lo together, as a_k8_of gives them from
// an accumulator: P^T, dS^T, dS).
template <int kKSteps, typename BTile, int kNTiles>
__device__ __forceinline__ void wgmma_rs_bt_x3(float (&c)[kNTiles][4], const Tf32x3Fragment<4> (&a)[kKSteps], unsigned b,
                                               unsigned b_lo) {
    wgmma_rs_bt_x3_steps<kKSteps, BTile>(
        c, [&](int kk, bool lo) -> const unsigned(&)[4] { return lo ? a[kk].lo : a[kk].hi; }, b, b_lo);
}

// The same with A K-major in shared memory too (a_lo: its lo half in a tile of a's layout), where
// A's fragments would not fit in registers (fwd_wgmma's d128 Q).
template <int kKSteps, typename ATile, typename BTile, int kNTiles>
__device__ __forceinline__ void wgmma_ss_bt_x3(float (&c)[kNTiles][4], unsigned a, unsigned a_lo, unsigned b,
                                               unsigned b_lo) {
    const unsigned long long da = ATile::k_major(a), da_lo = ATile::k_major(a_lo);
    const unsigned long long db = BTile::k_major(b), db_lo = BTile::k_major(b_lo);
    wgmma_x3_products<kKSteps>([&](int kk, bool lo_a, bool lo_b) {
        ptx::Wgmma<8 * kNTiles>::template ss<tf32, 0, 0>(c, ptx::desc_advance(lo_a ? da_lo : da, ATile::k_step(kk)),
                                                           ptx::desc_advance(lo_b ? db_lo : db, BTile::k_step(kk)));
    });
}

// A warp's A fragments of every k8 step of a float32 K-major Sw128Tile (TF32 bits, e.g. a split
// tile's hi or lo half), rows [row0, row0 + 16): wgmma's (and mma.sync m16n8k8's) TF32 A layout
// (rows g and g + 8, k t and t + 4) is ldmatrix_x4's of 16-bit k16 steps (load_a above), lane l
// addressing row row0 + l % 16, chunk 2 kk + l / 16. Conflict-free: the swizzle puts the 8 rows'
// same chunk on 8 distinct 16-byte bank groups.
template <int kKSteps, typename Tile>
__device__ __forceinline__ void a_k8_from(unsigned (&a)[kKSteps][4], unsigned tile, int row0, int lane) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) ptx::ldmatrix_x4(tile + Tile::offset(row0 + lane % 16, 2 * kk + lane / 16), a[kk]);
}

// Copies row tiles of one global tensor (row-major, unit column stride) into shared tiles
// (SmemTile, or any layout with the same kChunks / offset interface such as Sw128Tile),
// by all kThreads threads of the block: one 16-byte cp.async per chunk of 8 elements. Rows
// >= num_rows and columns >= num_cols read as zeros: cp.async's src-size reads only the
// chunk's valid bytes and zero-fills the rest (0 for chunks wholly outside), so a head dim
// that is not a multiple of 8 needs no separate path. cp.async needs 16-byte aligned sources:
// the base and the row stride must be multiples of 16 bytes (`aligned`); the host copies
// tensors that are not (plan.py), and the kernel traps rather than read misaligned.
// Asynchronous: the caller commits the group, waits for it and synchronises before reading.
template <int kRows, int kCols, int kThreads, typename TileLayout = SmemTile<kRows, kCols>>
struct TileLoader {
    using Tile = TileLayout;
    static constexpr int kTotal = kRows * Tile::kChunks;
    static constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
    // Each thread keeps one chunk column and walks rows kThreads / kChunks apart: only where that
    // step divides the rows (384 threads over a 32-chunk row step 12 rows, and 128 / 12 would drop
    // rows 120-127); else chunk i of a thread is chunk tid + i * kThreads of the tile.
    static constexpr bool kColumnWalk =
        kThreads % Tile::kChunks == 0 && kRows % (kThreads / Tile::kChunks) == 0;

    const unsigned short* base;
    long long row_stride;
    int num_cols;

    __device__ __forceinline__ TileLoader(const unsigned short* base_, long long row_stride_, int num_cols_)
        : base(base_), row_stride(row_stride_), num_cols(num_cols_) {}

    // A single row never uses its stride (the host may pass any stride for a length-1 axis).
    __device__ __forceinline__ bool aligned(int num_rows) const {
        return aligned16(base) && (num_rows <= 1 || row_stride % 8 == 0);
    }

    // Rows [row0, row0 + kRows) of the tensor into the tile at `smem`; num_rows = rows that exist.
    __device__ __forceinline__ void load(unsigned smem, int row0, int num_rows, int tid) const {
        const unsigned short* tile = base + row0 * row_stride;
        const int rows_left = num_rows - row0;
        if constexpr (kColumnWalk) {  // (one pointer a thread)
            constexpr int kRowStep = kThreads / Tile::kChunks;
            const int chunk = tid % Tile::kChunks, row_first = tid / Tile::kChunks;
            const int valid_cols = min(max(num_cols - chunk * 8, 0), 8);
            const unsigned short* src = tile + row_first * row_stride + chunk * 8;
            const long long step = kRowStep * row_stride;
#pragma unroll
            for (int i = 0; i < kRows / kRowStep; ++i) {
                const int row = row_first + i * kRowStep;
                const int valid = row < rows_left ? valid_cols : 0;
                // A chunk with nothing to read points at the tile's first row: any valid address.
                ptx::cp_async_16(smem + Tile::offset(row, chunk), valid > 0 ? src : tile, 2 * valid);
                src += step;
            }
        } else {
#pragma unroll
            for (int i = 0; i < kIters; ++i) {
                const int idx = tid + i * kThreads;
                if (kTotal % kThreads == 0 || idx < kTotal) {
                    const int row = idx / Tile::kChunks, chunk = idx % Tile::kChunks;
                    const int valid = row < rows_left ? min(max(num_cols - chunk * 8, 0), 8) : 0;
                    const unsigned short* src = tile + (valid > 0 ? row * row_stride + chunk * 8 : 0);
                    ptx::cp_async_16(smem + Tile::offset(row, chunk), src, 2 * valid);
                }
            }
        }
    }

    // The shared address of this thread's chunk i (< kIters) as `load` copied it (same chunk
    // mapping), and whether the thread has an i-th chunk.
    __device__ __forceinline__ bool chunk_at(unsigned smem, int tid, int i, unsigned& addr) const {
        int row, col;
        const bool has = chunk_index(tid, i, row, col);
        addr = smem + Tile::offset(row, col);
        return has;
    }
    // The same as the tile's (row, chunk).
    __device__ __forceinline__ bool chunk_index(int tid, int i, int& row, int& col) const {
        const int idx = kColumnWalk
                            ? (tid / Tile::kChunks + i * (kThreads / Tile::kChunks)) * Tile::kChunks + tid % Tile::kChunks
                            : tid + i * kThreads;
        row = idx / Tile::kChunks;
        col = idx % Tile::kChunks;
        return kTotal % kThreads == 0 || idx < kTotal;
    }

    // `chunk(addr)` for the shared address of every chunk this thread copied with `load`, after
    // its own copies have landed (cp.async.wait_group): no barrier needed before, one after.
    template <typename Chunk>
    __device__ __forceinline__ void for_each_chunk(unsigned smem, int tid, const Chunk& chunk) const {
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            unsigned addr;
            if (chunk_at(smem, tid, i, addr)) chunk(addr);
        }
    }

    // 3xTF32: every float this thread copied split (split_tf32), hi in place and lo the same
    // offset into the tile at lo_smem, each XOR `sign` (a negated Q). A batch's loads go before
    // its stores (KeysMajorLoader::for_each_staged says why: chunk by chunk, fwd_wgmma's d128
    // copying warpgroup waited ~12% of its samples at these loads, ncu, session 55); batches of
    // 4 chunks (16 registers: fwd_wgmma's d128, 8 chunks a thread, spilled with all 8 at once).
    __device__ __forceinline__ void split(unsigned smem, unsigned lo_smem, int tid, unsigned sign = 0u) const {
        constexpr int kBatch = kIters < 4 ? kIters : 4;
#pragma unroll
        for (int i0 = 0; i0 < kIters; i0 += kBatch) {
            uint4 v[kBatch];
            unsigned addr;
#pragma unroll
            for (int j = 0; j < kBatch; ++j)
                if (i0 + j < kIters && chunk_at(smem, tid, i0 + j, addr)) v[j] = ptx::ld_shared_v4(addr);
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
                if (!(i0 + j < kIters && chunk_at(smem, tid, i0 + j, addr))) continue;
                const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                unsigned hi[4], lo[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) split_tf32(__uint_as_float(w[e]), hi[e], lo[e]);
                ptx::st_shared_v4(addr, hi[0] ^ sign, hi[1] ^ sign, hi[2] ^ sign, hi[3] ^ sign);
                ptx::st_shared_v4(addr - smem + lo_smem, lo[0] ^ sign, lo[1] ^ sign, lo[2] ^ sign, lo[3] ^ sign);
            }
        }
    }

    // bf16x6: every float this thread copied (a float32 tile: 16-byte chunks of four floats) split
    // into three bfloat16 piece tiles (PieceTile: the same rows, half as wide, kBytes apart from
    // `pieces`), where a chunk of floats is half of a piece's 16-byte chunk.
    template <typename PieceTile>
    __device__ __forceinline__ void split_pieces(unsigned smem, unsigned pieces, int tid) const {
        static_assert(2 * PieceTile::kChunks == Tile::kChunks, "pieces: the float tile's rows in bfloat16");
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            int row, col;
            if (!chunk_index(tid, it, row, col)) continue;
            const uint4 v = ptx::ld_shared_v4(smem + Tile::offset(row, col));
            unsigned lo[3], hi[3];
            split_bf16x3(__uint_as_float(v.x), __uint_as_float(v.y), lo);
            split_bf16x3(__uint_as_float(v.z), __uint_as_float(v.w), hi);
            const unsigned off = PieceTile::offset(row, col / 2) + 8 * (col % 2);
#pragma unroll
            for (int i = 0; i < 3; ++i) ptx::st_shared_v2(pieces + i * PieceTile::kBytes + off, lo[i], hi[i]);
        }
    }

    // Flip the sign of every element this thread copied. kSign: the sign bits of one 32-bit word's
    // elements (Arith::kSignBits).
    template <unsigned kSign>
    __device__ __forceinline__ void negate(unsigned smem, int tid) const {
        for_each_chunk(smem, tid, [](unsigned addr) {
            const uint4 v = ptx::ld_shared_v4(addr);
            ptx::st_shared_v4(addr, v.x ^ kSign, v.y ^ kSign, v.z ^ kSign, v.w ^ kSign);
        });
    }
};

// Row tiles of a float32 tensor whose rows are keys (V) into a shared tile with the keys along
// its rows (tile row = the tensor's column): the K-major B operand TF32 wgmma needs for P V,
// whose k index is the keys (TF32 has no transposed operand form, and neither cp.async nor
// ldmatrix transposes 4-byte elements); the 3xTF32 backward's Q^T, dO^T (rows: queries) and
// K^T the same way (bwd_dkdv_wgmma_x3.cu: `for_each_staged` hands it each staged chunk). In two halves, so that the global loads' latency hides
// behind other work: `copy` by cp.async into a staging tile (16-byte chunks of 4 columns; two
// adjacent threads take a row's two adjacent chunks, whole 32-byte sectors; each thread's
// chunks side by side there, so a warp's copies and reads are 512 contiguous bytes), then, once
// the copies landed, `store` by the same thread into the tile by 32-bit stores (a warp's 32
// stores of one column land on 32 distinct banks). Within every 8 keys the tile holds them in
// a_k8_of's k order (MMA k index t: key 2t; t + 4: key 2t + 1), so that P's accumulator n8 tile
// is the A fragment as it stands. Rows >= num_rows and columns >= num_cols are zeros (cp.async's
// zero fill). The tile: Sw128Tile<kCols, 2 kRows> (widths in 16-bit units); the staging tile:
// kStagingBytes, as many as the tile's.
template <int kRows, int kCols, int kThreads>
struct KeysMajorLoader {
    using Tile = Sw128Tile<kCols, 2 * kRows>;
    static constexpr int kChunks = kCols / 4;  // 16-byte chunks of a tensor row
    static constexpr int kIters = kRows * kChunks / kThreads;
    static constexpr unsigned kStagingBytes = 16u * kRows * kChunks;
    // copy unrolls two chunks at a time, for_each_staged takes them four at a time: fwd_wgmma's
    // d128 tile gives each thread eight, and wholly unrolled, ptxas hoisted their addresses and
    // loads and the kernel spilled (140 bytes at 255 registers, one warpgroup doing everything;
    // with the copying warpgroup, fours: 254 registers, no spills). fwd_wgmma's other tiles have
    // two, the 3xTF32 backward's four.
    static_assert(kChunks % 2 == 0 && kThreads % 2 == 0 && kIters * kThreads == kRows * kChunks,
                  "pairs of chunks, every thread the same number");
    static_assert(kStagingBytes == Tile::kBytes, "the staging tile holds the tile's floats");

    const float* base;
    long long row_stride;
    int num_cols;

    __device__ __forceinline__ KeysMajorLoader(const float* base_, long long row_stride_, int num_cols_)
        : base(base_), row_stride(row_stride_), num_cols(num_cols_) {}

    // Chunk idx = tid + i * kThreads of the staging tile is the tensor's row (idx / 2) % kRows,
    // chunk idx % 2 + 2 (idx / (2 kRows)). With kThreads a multiple of 2 kRows (asserted where
    // the chunks are walked) a thread's chunks lie in one row, kChunkStep chunks apart: its row
    // and first column are worked out once, not per chunk (in bwd_dkdv_wgmma_x3 the per-chunk
    // form was ~300 of warpgroup 1's ~660 instructions between a step's barriers: ncu, session 53).
    static constexpr int kChunkStep = kThreads / kRows;
    __device__ __forceinline__ static int row_of(int tid) { return static_cast<int>(unsigned(tid) / 2u % kRows); }
    __device__ __forceinline__ static int first_col(int tid) {
        return static_cast<int>(4u * (unsigned(tid) % 2u + 2u * (unsigned(tid) / (2u * kRows))));
    }
    __device__ __forceinline__ static unsigned staged_at(int i, int tid) { return 16u * (tid + i * kThreads); }

    // Rows [row0, row0 + kRows) into the staging tile, asynchronously (the caller commits the
    // group); num_rows = rows that exist. The rows must be 16-byte aligned (as TileLoader's).
    __device__ __forceinline__ void copy(unsigned staging, int row0, int num_rows, int tid) const {
        static_assert(kThreads % (2 * kRows) == 0, "a thread's chunks lie in one row");
        const int row = row0 + row_of(tid), col0 = first_col(tid);
        // The columns left in this thread's row from its next chunk on, and that chunk's address,
        // both stepped per chunk (recomputed from the chunk's column, each copy cost ~25
        // instructions of 64-bit arithmetic: ncu, session 54).
        int cols_left = (row < num_rows ? num_cols : 0) - col0;
        const float* src = base + row * row_stride + col0;
#pragma unroll 2
        for (int i = 0; i < kIters; ++i) {
            const int valid = min(max(cols_left, 0), 4);
            // A chunk with nothing to read points at the tensor's first row: any valid address.
            ptx::cp_async_16(staging + staged_at(i, tid), valid > 0 ? src : base, 4 * valid);
            src += 4 * kChunkStep;
            cols_left -= 4 * kChunkStep;
        }
    }

    // The k position of the tensor's row `row` in the tile: a_k8_of's k order within its 8 (MMA
    // k index t: row 2t; t + 4: row 2t + 1).
    __device__ __forceinline__ static int k_position(int row) { return (row & ~7) + (row % 2) * 4 + (row % 8) / 2; }
    // The tile's byte offset of the tensor's element (row, col): tile row col, k_position(row).
    __device__ __forceinline__ static unsigned offset(int row, int col) {
        const int pos = k_position(row);
        return Tile::offset(col, pos / 4) + 4 * (pos % 4);
    }

    // This thread's staged chunks, once its copies landed (cp.async.wait_group; no barrier: no
    // other thread's copies are read), of kTiles staging tiles side by side (tile n at staging +
    // n kStagingBytes: the same rows of several tensors, as Q's and dO's): chunk(n, row, col, v)
    // for tile n's elements (row, col + c) = v[c], c < 4 (rows and columns from the tile's first).
    template <int kTiles, typename Chunk>
    __device__ __forceinline__ void for_each_staged(unsigned staging, int tid, const Chunk& chunk) const {
        static_assert(kThreads % (2 * kRows) == 0, "a thread's chunks lie in one row");
        const int row = row_of(tid), col0 = first_col(tid);
        // A batch's loads (of every tile) are issued before any of its chunk() calls: shared-
        // memory accesses are volatile asm, kept in program order, so a load written after a
        // chunk's stores waited in full where it stood (in bwd_dkdv_wgmma_x3 ~28% of warpgroup
        // 1's samples, and with one batch a tile still ~20% at each tile's first use: ncu,
        // session 54). Four chunks at once a tile (16 registers), or the largest batch that
        // divides them (d96's six: threes).
        constexpr int kBatch = kIters % 4 == 0 ? 4 : kIters % 3 == 0 ? 3 : kIters % 2 == 0 ? 2 : 1;
        static_assert(kIters % kBatch == 0, "whole batches");
#pragma unroll 1
        for (int i0 = 0; i0 < kIters; i0 += kBatch) {
            uint4 w[kTiles][kBatch];
#pragma unroll
            for (int n = 0; n < kTiles; ++n)
#pragma unroll
                for (int j = 0; j < kBatch; ++j)
                    w[n][j] = ptx::ld_shared_v4(staging + n * kStagingBytes + staged_at(i0 + j, tid));
#pragma unroll
            for (int n = 0; n < kTiles; ++n)
#pragma unroll
                for (int j = 0; j < kBatch; ++j) {
                    const float v[4] = {__uint_as_float(w[n][j].x), __uint_as_float(w[n][j].y),
                                        __uint_as_float(w[n][j].z), __uint_as_float(w[n][j].w)};
                    chunk(n, row, col0 + 4 * kChunkStep * (i0 + j), v);
                }
        }
    }

    // 3xTF32: this thread's staged chunks of kTiles staging tiles (once landed) split into TF32
    // hi and lo halves, tile n's stored transposed into a tile of the loader's (kTransposed: hi
    // at cols[n], lo a Tile further) and as rows of a RowTile (hi at rows[n], lo a RowTile
    // further); the caller fences them for the tensor cores and its barrier publishes them (the
    // 3xTF32 backward's Q^T and dO^T, K^T).
    template <typename RowTile, bool kTransposed, int kTiles>
    __device__ __forceinline__ void split_staged(unsigned staging, int tid, const unsigned (&rows)[kTiles],
                                                 const unsigned (&cols)[kTiles]) const {
        for_each_staged<kTiles>(staging, tid, [&](int n, int row, int col, const float (&v)[4]) {
            unsigned hi[4], lo[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) split_tf32(v[c], hi[c], lo[c]);
            if constexpr (kTransposed) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    ptx::st_shared_b32(cols[n] + offset(row, col + c), hi[c]);
                    ptx::st_shared_b32(cols[n] + Tile::kBytes + offset(row, col + c), lo[c]);
                }
            }
            const unsigned at_row = RowTile::offset(row, col / 4);
            ptx::st_shared_v4(rows[n] + at_row, hi[0], hi[1], hi[2], hi[3]);
            ptx::st_shared_v4(rows[n] + RowTile::kBytes + at_row, lo[0], lo[1], lo[2], lo[3]);
        });
    }
    // One staging tile's.
    template <typename RowTile, bool kTransposed>
    __device__ __forceinline__ void split_staged(unsigned staging, int tid, unsigned rows, unsigned cols) const {
        const unsigned rows_of[1] = {rows}, cols_of[1] = {cols};
        split_staged<RowTile, kTransposed, 1>(staging, tid, rows_of, cols_of);
    }

    // This thread's staged chunks into the tile: put(offset, value) stores each value at its
    // offset in the tile (fwd_wgmma: split into its hi and lo tiles).
    template <typename Put>
    __device__ __forceinline__ void store(unsigned staging, int tid, const Put& put) const {
        for_each_staged<1>(staging, tid, [&](int, int row, int col, const float (&v)[4]) {
#pragma unroll
            for (int c = 0; c < 4; ++c) put(offset(row, col + c), v[c]);
        });
    }
};

// Rows [0, kRows) of a shared tile of width kCols to `gmem`, by kThreads threads (`tid` among
// them: the 32 lanes of a warp, or a whole block), kUnroll iterations at a time: 16-byte stores
// where the chunk is whole and aligned, element stores otherwise (odd widths, unaligned rows).
// Rows >= num_rows and columns >= num_cols are not written. The shared tile is a SmemTile, or
// any layout with its offset(row, chunk) (e.g. kRows rows of a taller Sw128Tile, from its row 0
// at `smem`).
template <int kRows, int kCols, int kThreads, int kUnroll, typename Tile = SmemTile<kRows, kCols>>
__device__ __forceinline__ void store_tile_rows(unsigned smem, unsigned short* gmem, long long row_stride,
                                                int num_rows, int num_cols, int tid) {
    static_assert(Tile::kChunks == kCols / 8, "the tile holds kCols columns");
    constexpr int kTotal = kRows * Tile::kChunks;
#pragma unroll kUnroll
    for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
        const int idx = tid + i * kThreads;
        const int row = idx / Tile::kChunks, chunk = idx % Tile::kChunks, col = chunk * 8;
        if ((kTotal % kThreads == 0 || idx < kTotal) && row < num_rows && col < num_cols) {
            const uint4 v = ptx::ld_shared_v4(smem + Tile::offset(row, chunk));
            unsigned short* dst = gmem + row * row_stride + col;
            if (col + 8 <= num_cols && aligned16(dst)) {
                *reinterpret_cast<uint4*>(dst) = v;
            } else {
                const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if (col + e < num_cols) dst[e] = static_cast<unsigned short>(w[e / 2] >> (16 * (e % 2)));
            }
        }
    }
}

// A warp's rows (fully unrolled: a few iterations).
template <int kRows, int kCols>
__device__ __forceinline__ void store_rows(unsigned smem, unsigned short* gmem, long long row_stride,
                                           int num_rows, int num_cols, int lane) {
    constexpr int kIterations = (kRows * SmemTile<kRows, kCols>::kChunks + 31) / 32;
    store_tile_rows<kRows, kCols, 32, kIterations>(smem, gmem, row_stride, num_rows, num_cols, lane);
}

// A block's tile (unrolled by 4).
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void store_tile(unsigned smem, unsigned short* gmem, long long row_stride, int num_rows,
                                           int num_cols, int tid) {
    store_tile_rows<kRows, kCols, kThreads, 4>(smem, gmem, row_stride, num_rows, num_cols, tid);
}

// ---- mma.sync m16n8k16 fragments (layouts: ptx.cuh). A warp's accumulator tile C is
// float[kMTiles][kNTiles][4]: m16 tiles x n8 tiles x this lane's 4 elements.

// n8 tiles [kFirst, kFirst + kCount) of an accumulator row (float[N][4]), as an accumulator of
// their own: an MMA of N = 8 kCount writes them in place (e.g. one wgmma of N = 128 per 128
// columns of a wider output).
template <int kFirst, int kCount, int N>
__device__ __forceinline__ float (&n_tiles(float (&c)[N][4]))[kCount][4] {
    static_assert(kFirst + kCount <= N, "inside the accumulator");
    return *reinterpret_cast<float(*)[kCount][4]>(&c[kFirst]);
}

// C = 0.
template <int M, int N>
__device__ __forceinline__ void zero(float (&c)[M][N][4]) {
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
        for (int nt = 0; nt < N; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[mt][nt][e] = 0.f;
}
template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[nt][e] = 0.f;
}

// C += step: a product's fresh fragment added to its accumulator by FADD (the products summed
// small first into a zeroed fragment keep the running sum's rounding out of them).
template <int N>
__device__ __forceinline__ void add(float (&c)[N][4], const float (&step)[N][4]) {
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[nt][e] += step[nt][e];
}
// ... two of them in one loop (dV's and dK's: the dK/dV kernels' measured schedule).
template <int N>
__device__ __forceinline__ void add(float (&c)[N][4], const float (&step)[N][4], float (&c2)[N][4],
                                    const float (&step2)[N][4]) {
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            c[nt][e] += step[nt][e];
            c2[nt][e] += step2[nt][e];
        }
}

// f(mt, nt, e, r, row, col) for every element (mt, nt, e) of an M x N fragment: its coordinates
// (row, col) = (row0 + 16 mt + lane / 4 + 8 h, col0 + 8 nt + 2 (lane % 4) + e % 2), h = e / 2,
// and its row slot r = 2 mt + h (this lane holds 2 M rows: per-row values such as lse live in
// arrays indexed by r, which unrolling makes constant). A warp's share of a wgmma accumulator
// has the same layout (M = 1).
template <int M, int N, typename F>
__device__ __forceinline__ void for_each_element(int row0, int col0, int lane, F&& f) {
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
        for (int nt = 0; nt < N; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                f(mt, nt, e, 2 * mt + e / 2, row0 + mt * 16 + lane / 4 + 8 * (e / 2), col0 + nt * 8 + 2 * (lane % 4) + e % 2);
}
// f(a, b, row, col) for every pair of neighbours (a at col, b at col + 1, col even) of C.
template <int M, int N, typename F>
__device__ __forceinline__ void for_each_pair(const float (&c)[M][N][4], int row0, int col0, int lane, F&& f) {
    for_each_element<M, N>(row0, col0, lane, [&](int mt, int nt, int e, int, int row, int col) {
        if (e % 2 == 0) f(c[mt][nt][e], c[mt][nt][e + 1], row, col);
    });
}
// f(x, r, row, col) for every element x of C; f(x, y, r, row, col) over two fragments of one
// shape side by side (S and dP).
template <int M, int N, typename F>
__device__ __forceinline__ void for_each(float (&c)[M][N][4], int row0, int col0, int lane, F&& f) {
    for_each_element<M, N>(row0, col0, lane, [&](int mt, int nt, int e, int r, int row, int col) {
        f(c[mt][nt][e], r, row, col);
    });
}
template <int N, typename F>
__device__ __forceinline__ void for_each(float (&c)[N][4], int row0, int col0, int lane, F&& f) {
    for_each(reinterpret_cast<float(&)[1][N][4]>(c), row0, col0, lane, f);
}
template <int M, int N, typename F>
__device__ __forceinline__ void for_each(float (&c)[M][N][4], float (&d)[M][N][4], int row0, int col0, int lane, F&& f) {
    for_each_element<M, N>(row0, col0, lane, [&](int mt, int nt, int e, int r, int row, int col) {
        f(c[mt][nt][e], d[mt][nt][e], r, row, col);
    });
}

// Mask::visible (mask.cuh) on a fragment of scores at (row0, col0): elements whose key the
// query may not see become `hidden` (-inf for scores, 0 for probabilities); with num_rows,
// rows >= num_rows too (the backward's query tiles that cross Lq). With kSplit, a call without a
// window (Mask::windowed, uniform over the block) tests the end of the keys alone: a windowed
// Variant's per-score edge tests cost ~5 instructions a score (Swin's one key tile, ncu), and
// fwd_tc's Swin forward runs 0.93x with it. Without kSplit one loop does the full test: the
// second loop cost fwd_wgmma registers (d128 218 -> 255) and bwd_dkdv_tc time (Swin 1.11x).
template <bool kSplit, typename MaskT, int M, int N, typename HidesRow>
__device__ __forceinline__ void apply_mask_rows(const MaskT& mask, float (&s)[M][N][4], int row0, int col0, int lane,
                                                float hidden, const HidesRow& hides_row) {
    if (!kSplit || mask.windowed()) {
        for_each(s, row0, col0, lane, [&](float& x, int, int row, int col) {
            if (hides_row(row) || !mask.visible(row, col)) x = hidden;
        });
    } else {
        for_each(s, row0, col0, lane, [&](float& x, int, int row, int col) {
            if (hides_row(row) || col >= mask.seqlen_k) x = hidden;
        });
    }
}
template <bool kSplit = false, typename MaskT, int M, int N>
__device__ __forceinline__ void apply_mask(const MaskT& mask, float (&s)[M][N][4], int row0, int col0, int lane,
                                           float hidden) {
    apply_mask_rows<kSplit>(mask, s, row0, col0, lane, hidden, [](int) { return false; });
}
template <bool kSplit = false, typename MaskT, int M, int N>
__device__ __forceinline__ void apply_mask(const MaskT& mask, float (&s)[M][N][4], int row0, int col0, int lane,
                                           float hidden, int num_rows) {
    apply_mask_rows<kSplit>(mask, s, row0, col0, lane, hidden, [num_rows](int row) { return row >= num_rows; });
}

// Dropout's keep bits (dropout.cuh) of this lane's elements of an M x N fragment whose first
// element is (row0, col0), col0 a multiple of 8: drawn once, applied to one fragment or several
// (the backward's dP, then P). Bit ((2 mt + h) N + nt) 2 + e % 2 is element (mt, nt, e), h = e / 2.
// An n8 tile's row is one Philox call (keys 8g .. 8g + 7), of which lane t of the quad needs keys
// 2t and 2t + 1: with N a multiple of 4 the quad's lanes each make the call of one of four n8
// tiles, compare its eight draws (Dropout::keep_byte) and share the bytes (two shuffles), so every
// call is made once and each draw compared once. The draws run in a loop unrolled kChains times:
// two independent Philox chains in flight hide each other's latency (d64 forward 10% faster than
// one at a time, H200); a kernel with no registers to spare asks for one, and fully unrolled the
// kernels' register counts rose by up to 80 and some spilled. The bits sit in one 64-bit register.
template <int M, int N, int kChains = 2>
struct DropBits {
    static_assert(4 * M * N <= 64, "a lane's keep bits fit one 64-bit register");
    unsigned long long bits;

    __device__ __forceinline__ void draw(const Dropout& dropout, int row0, int col0, int lane) {
        bits = 0ull;
        const int t = lane % 4;
        constexpr int kStep = N % 4 == 0 ? 4 : 1;  // n8 tiles per row step
#pragma unroll (kChains)
        for (int step = 0; step < 2 * M * (N / kStep); ++step) {
            const int rows = step / (N / kStep), nb = (step % (N / kStep)) * kStep;  // rows = 2 mt + h
            const int row = row0 + (rows / 2) * 16 + lane / 4 + 8 * (rows % 2);
            unsigned group;  // two bits per n8 tile nb .. nb + kStep - 1
            if constexpr (kStep == 4) {
                // Byte c of `tiles`: the keep bits of n8 tile nb + c (lane c's call); this lane's
                // keys 2t, 2t + 1 of each (bits 8c + 2t, + 1) then go to bits 2c, 2c + 1: one
                // product adds the four pairs' shifts (24 - 6c, c = 0..3) without carries into
                // the top byte (the other shifted pairs land below bit 24, apart).
                unsigned tiles = dropout.keep_byte(dropout.draws(row, col0 + 8 * (nb + t))) << (8 * t);
                tiles |= __shfl_xor_sync(0xffffffffu, tiles, 1);
                tiles |= __shfl_xor_sync(0xffffffffu, tiles, 2);
                group = (((tiles >> (2 * t)) & 0x03030303u) * 0x01041040u) >> 24;
            } else {
                const int key = col0 + 8 * nb + 2 * t;
                const uint4 words = dropout.draws(row, key);
                group = (Dropout::draw_of(words, key) >= dropout.threshold) |
                        ((Dropout::draw_of(words, key + 1) >= dropout.threshold) << 1);
            }
            bits |= static_cast<unsigned long long>(group) << ((rows * N + nb) * 2);
        }
    }

    // c o Z * scale: kept elements scaled, the others 0 (r = 2 mt + h: for_each_element's row slot).
    __device__ __forceinline__ void apply(float (&c)[M][N][4], float scale) const {
        for_each_element<M, N>(0, 0, 0, [&](int mt, int nt, int e, int r, int, int) {
            c[mt][nt][e] = (bits >> ((r * N + nt) * 2 + e % 2)) & 1ull ? c[mt][nt][e] * scale : 0.f;
        });
    }
};

// DropBits for a fragment of transposed scores (S^T, P^T, dP^T: keys are the rows, queries the
// columns; Hopper's dK/dV kernels), one m16 tile of keys x N n8 tiles of queries, in the 2-D form
// those kernels hold it: element (nt, e) is key key_row + 8 (e / 2), query query0 + 8 nt +
// 2 (lane % 4) + e % 2, its bit ((e / 2) N + nt) 2 + e % 2. A Philox call gives the draws of eight
// keys of one query: the eight lanes that hold those keys (lane / 4 = key % 8, one lane % 4) each
// make one of the eight calls of four n8 tiles (the call of query column (r / 2, r % 2) of
// them, r = lane / 4), compare its draws (Dropout::keep_byte) and share the bytes in three
// shuffles, every call made and every draw compared once. The loop is unrolled by two, as
// DropBits'.
template <int N>
struct DropBitsTransposed {
    static_assert(N % 4 == 0 && 4 * N <= 64, "four n8 tiles a round; a lane's keep bits fit one 64-bit register");
    unsigned long long bits;

    // key_row: this lane's first key (row lane / 4 of a tile whose first key is a multiple of 16).
    __device__ __forceinline__ void draw(const Dropout& dropout, int key_row, int query0, int lane) {
        bits = 0ull;
        const int t = lane % 4, r = lane / 4;
#pragma unroll 2
        for (int step = 0; step < 2 * (N / 4); ++step) {
            const int h = step / (N / 4), nb = (step % (N / 4)) * 4;  // keys 8h.., n8 tiles nb .. nb + 3
            const int query = query0 + 8 * (nb + r / 2) + 2 * t + r % 2;  // this lane's call
            // Byte c (c = 0..3) of `half`: the keep bits of the call made by the lane with
            // lane / 4 = (r & 4) + c and this t: calls 0-3 where r < 4, calls 4-7 where not; the
            // third shuffle swaps the halves across.
            unsigned half = dropout.keep_byte(dropout.draws(query, (key_row & ~7) + 8 * h)) << (8 * (r & 3));
            half |= __shfl_xor_sync(0xffffffffu, half, 4);
            half |= __shfl_xor_sync(0xffffffffu, half, 8);
            const unsigned across = __shfl_xor_sync(0xffffffffu, half, 16);
            const unsigned calls03 = r < 4 ? half : across, calls47 = r < 4 ? across : half;
            // This lane's key is bit r of each byte: bit 8c moves to bit 24 + c under one product
            // (shifts 24 - 7c; the other shifted bits land below bit 24, apart).
            const unsigned group = ((((calls03 >> r) & 0x01010101u) * 0x01020408u) >> 24) |
                                   (((((calls47 >> r) & 0x01010101u) * 0x01020408u) >> 24) << 4);
            bits |= static_cast<unsigned long long>(group) << ((h * N + nb) * 2);
        }
    }

    // c o Z * scale: kept elements scaled, the others 0.
    __device__ __forceinline__ void apply(float (&c)[N][4], float scale) const {
#pragma unroll
        for (int nt = 0; nt < N; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                c[nt][e] = (bits >> (((e / 2) * N + nt) * 2 + e % 2)) & 1ull ? c[nt][e] * scale : 0.f;
    }
};

// The forward's dropout step on P (this lane's elements of an M x N fragment whose first element
// is (row0, col0)): P o Z * scale for P V, in place, for attention row bh of the call; the
// softmax has summed the undropped P into l_i before. Nothing when the call drops nothing.
template <int M, int N>
__device__ __forceinline__ void drop_forward(const FwdParams& p, long long bh, float (&s)[M][N][4], int row0, int col0,
                                             int lane) {
    if (!p.dropout_threshold) return;
    DropBits<M, N> keep;
    keep.draw(Dropout(p, bh), row0, col0, lane);
    keep.apply(s, static_cast<float>(p.dropout_scale));
}

// A RowScores (score_mod.cuh) to be asked for this lane's pairs of a fragment whose first element
// is (row0, col0): its origin is the lane's first pair (PairOrigin: ALiBi's distance per element
// is then an FADD of a constant).
template <typename Scores>
__device__ __forceinline__ auto lane_scores(const Scores& scores, int row0, int col0, int lane) {
    return scores.from(row0 + lane / 4, col0 + 2 * (lane % 4));
}

// Score modifiers (score_mod.cuh's ScoreMod) on a fragment of raw scores S whose first element
// is (row0, col0): with score modifiers, S becomes the modified scores and the softmax's
// multiplier for them is returned (RowScores::multiplier: 1 for scores in log2 units);
// otherwise (no modifier, or sinks alone) S stays raw and the folded scale c is returned.
// `planes`: where the bias and mask are read (a staged tile's); the overload without reads the
// row's planes in global memory.
template <ModBodies kBodies = ModBodies::kAll, typename Mod, int M, int N, typename Planes>
__device__ __forceinline__ float modify_scores(const Mod& mod, float (&s)[M][N][4], int row0, int col0, int lane, float c,
                                               const Planes& planes) {
    float multiplier = c;
    mod.template dispatch<kBodies>([&](const auto& row_scores) {
        const auto score = lane_scores(row_scores, row0, col0, lane);
        for_each(s, row0, col0, lane, [&](float& x, int, int row, int col) {
            float grad;
            x = score(x, row, col, grad);
        });
        multiplier = score.multiplier();
    }, planes);
    return multiplier;
}
template <ModBodies kBodies = ModBodies::kAll, typename Mod, int M, int N>
__device__ __forceinline__ float modify_scores(const Mod& mod, float (&s)[M][N][4], int row0, int col0, int lane, float c) {
    return modify_scores<kBodies>(mod, s, row0, col0, lane, c, mod.planes());
}

// Whether a kernel may add the call's bias to S (S^T) before the softmax by loading it into the
// score MMA's accumulator (bias_into_scores, bias_into_transposed_scores): a bias and no softcap
// (the cap comes before the bias), and a scale whose reciprocal keeps bias / scale finite.
__device__ __forceinline__ bool bias_goes_into_scores(const FwdParams& p) {
    return p.bias != nullptr && !(p.softcap > 0.0) && fabsf(static_cast<float>(p.scale)) >= 0x1p-20f;
}

// The bias of this lane's scores of fragment s (rows row0 + lane / 4 + {0, 8}, keys col0 + 8 nt +
// 2 (lane % 4) + {0, 1}) times ``inv_scale`` (1 / the scale the kernel applies to S), into s: the
// score MMA then accumulates Q K^T onto it (wgmma_a_bt's kOntoC, mma.sync's C), and the scale
// that the softmax (or ScoreMod, bias_in_scores) applies to S returns the bias to its own units,
// so no body reads or adds it per score. ``plane``: the attention row's bias plane in global
// memory. Rows past Lq read row Lq - 1 (never stored); keys past Lk read as 0 (masked). A
// fragment wholly inside Lk of a plane with contiguous keys reads 8-byte pairs.
template <int N>
__device__ __forceinline__ void bias_rows_into_scores(const FwdParams& p, const float* plane, float inv_scale,
                                                      float (&s)[N][4], int row0, int col0, int lane) {
    const int j0 = col0 + 2 * (lane % 4);
    const long long col_stride = p.bias_col_stride;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = min(row0 + lane / 4 + 8 * h, p.seqlen_q - 1);
        const float* at = plane + static_cast<long long>(i) * p.bias_row_stride + j0 * col_stride;
        if (col_stride == 1 && col0 + 8 * N <= p.seqlen_k && (reinterpret_cast<unsigned long long>(at) & 7ull) == 0) {
#pragma unroll
            for (int nt = 0; nt < N; ++nt) {
                const float2 b = __ldg(reinterpret_cast<const float2*>(at + 8 * nt));
                s[nt][2 * h] = b.x * inv_scale;
                s[nt][2 * h + 1] = b.y * inv_scale;
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < N; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    s[nt][2 * h + e] = j0 + 8 * nt + e < p.seqlen_k ? __ldg(at + (8 * nt + e) * col_stride) * inv_scale : 0.f;
        }
    }
}

// The forwards' form (they negate Q for a negative scale: S is scaled by |scale|): the row of
// ``mod`` (fwd_wgmma_ws issues it a tile ahead, into S's registers once P is packed from them).
template <int N, typename Mod>
__device__ __forceinline__ void bias_into_scores(const Mod& mod, float (&s)[N][4], int row0, int col0, int lane) {
    bias_rows_into_scores(mod.params, Mod::row_planes(mod.params, mod.row).bias_at,
                          1.f / fabsf(static_cast<float>(mod.params.scale)), s, row0, col0, lane);
}

// An mma.sync fragment of M m16 tiles (rows row0 + 16 mt + lane / 4 + {0, 8}) from ``planes``: a
// staged tile (StagedPlanes: zero-filled, no bounds test, 8-byte pairs of its padded rows), or
// the row's planes in global memory (GlobalPlanes), one m16 tile at a time as above.
template <int M, int N, typename Planes>
__device__ __forceinline__ void bias_into_scores(const FwdParams& p, const Planes& planes, float inv_scale,
                                                 float (&s)[M][N][4], int row0, int col0, int lane) {
    if constexpr (Planes::kZeroFilled) {
        for_each_element<M, N>(row0, col0, lane, [&](int mt, int nt, int e, int, int row, int col) {
            if (e % 2 == 0) {
                const float2 b = *reinterpret_cast<const float2*>(planes.bias_address(row, col));
                s[mt][nt][e] = b.x * inv_scale;
                s[mt][nt][e + 1] = b.y * inv_scale;
            }
        });
    } else {
#pragma unroll
        for (int mt = 0; mt < M; ++mt) bias_rows_into_scores(p, planes.bias_at, inv_scale, s[mt], row0 + 16 * mt, col0, lane);
    }
}

// The same for the backward's transposed fragment S^T of attention row `row` (bwd_wgmma.cuh: this
// lane's keys key0 + {0, 8} as rows, queries m0 + 8 nt + 2 (lane % 4) + {0, 1} as columns), divided
// by the signed scale (the backward keeps Q's sign and multiplies S by scale_log2); pairs outside
// Lq x Lk read as 0 (their P is masked, or multiplies K's zeroed rows).
template <int N>
__device__ __forceinline__ void bias_into_transposed_scores(const FwdParams& p, int row, float (&st)[N][4], int m0,
                                                            int key0, int lane) {
    const float* plane = ScoreMod<float>::row_planes(p, row).bias_at;
    const float inv_scale = 1.f / static_cast<float>(p.scale);
    const long long row_stride = p.bias_row_stride;
    const int i0 = m0 + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = key0 + 8 * h;
        const float* at = plane + i0 * row_stride + static_cast<long long>(j) * p.bias_col_stride;
        const bool key_inside = j < p.seqlen_k;
#pragma unroll
        for (int nt = 0; nt < N; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                st[nt][2 * h + e] = key_inside && i0 + 8 * nt + e < p.seqlen_q ? __ldg(at + (8 * nt + e) * row_stride) * inv_scale
                                                                             : 0.f;
    }
}

// The Hopper forwards' modify_scores on one key tile (c returned untouched without kScoreMods):
// the loop's tiles take a body per modifier combination (ModBodies::kAll, ALiBi alone in raw
// units); the tile peeled off before the loop (kPeeled) the two general ones (half the code, one
// tile of many).
template <bool kScoreMods, bool kPeeled, typename Mod, int M, int N>
__device__ __forceinline__ float modify_forward_tile(const Mod& mod, float (&s)[M][N][4], int row0, int col0, int lane,
                                                     float c) {
    constexpr ModBodies kBodies = kPeeled ? ModBodies::kByCap : ModBodies::kAll | ModBodies::kRawAlibi;
    if constexpr (kScoreMods) return modify_scores<kBodies>(mod, s, row0, col0, lane, c);
    return c;
}

// The row (relative to row0) of row slot r.
__device__ __forceinline__ int slot_row(int r, int lane) { return (r / 2) * 16 + lane / 4 + 8 * (r % 2); }

// Per-lane ldmatrix_x4 offsets into a Tile, to which the fragment's (row, chunk) offset is added:
//   a_lane:  A operand, m16k16 from rows row0.. (m = rows, k = columns): rows lane%16, chunk lane/16
//   bn_lane: B operand, two n8k16 from rows (n = rows, k = columns; K for Q K^T):
//            (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15)
//   bt_lane: B operand through .trans, k16n16 (k = rows, n = columns; V for P V):
//            (rows 0-7 | 8-15) x (columns 0-7 | 8-15)
template <typename Tile>
__device__ __forceinline__ unsigned a_lane(int row0, int lane) { return Tile::offset(row0 + lane % 16, lane / 16); }
template <typename Tile>
__device__ __forceinline__ unsigned bn_lane(int lane) { return Tile::offset((lane / 16) * 8 + lane % 8, (lane / 8) % 2); }
template <typename Tile>
__device__ __forceinline__ unsigned bt_lane(int lane) { return Tile::offset(((lane / 8) % 2) * 8 + lane % 8, lane / 16); }

// One k16 step of C += A B over every n8 tile of C: C[mt][n] += A[mt] B_n. B's fragments for
// n8 tiles (2 np, 2 np + 1) are one ldmatrix_x4 at b_lane + Tile::offset(...), b_lane from
// bn_lane (kTrans = false: B's rows are the n index, rows row0 + 16 np, chunk chunk0) or
// bt_lane (kTrans = true: B's rows are the k index, rows row0, chunk chunk0 + 2 np).
template <typename Element, typename Tile, bool kTrans, int M, int N>
__device__ __forceinline__ void mma_k16(float (&c)[M][N][4], const unsigned (&a)[M][4], unsigned b_lane, int row0,
                                        int chunk0) {
#pragma unroll
    for (int np = 0; np < N / 2; ++np) {
        unsigned b[4];
        if (kTrans)
            ptx::ldmatrix_x4_trans(b_lane + Tile::offset(row0, chunk0 + np * 2), b);
        else
            ptx::ldmatrix_x4(b_lane + Tile::offset(row0 + np * 16, chunk0), b);
#pragma unroll
        for (int mt = 0; mt < M; ++mt) {
            ptx::mma_16816<Element>(c[mt][2 * np], a[mt], b[0], b[1]);
            ptx::mma_16816<Element>(c[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
    }
}
// The same for one m16 tile (C = float[N][4], A = one fragment).
template <typename Element, typename Tile, bool kTrans, int N>
__device__ __forceinline__ void mma_k16(float (&c)[N][4], const unsigned (&a)[4], unsigned b_lane, int row0,
                                        int chunk0) {
    mma_k16<Element, Tile, kTrans>(reinterpret_cast<float(&)[1][N][4]>(c), reinterpret_cast<const unsigned(&)[1][4]>(a),
                                   b_lane, row0, chunk0);
}

// The A fragment of an m16k16 MMA from two adjacent n8 accumulator tiles (k = 2kk, 2kk+1),
// rounded to 16 bits: the accumulator layout of S / dS is the operand layout of the next MMA.
template <typename Element>
__device__ __forceinline__ void pack_a(const float (&lo)[4], const float (&hi)[4], unsigned (&a)[4]) {
    a[0] = ptx::pack2<Element>(lo[0], lo[1]);
    a[1] = ptx::pack2<Element>(lo[2], lo[3]);
    a[2] = ptx::pack2<Element>(hi[0], hi[1]);
    a[3] = ptx::pack2<Element>(hi[2], hi[3]);
}
// The same in bf16x6's three pieces: a[i] is piece i's fragment.
__device__ __forceinline__ void pack_a_x3(const float (&lo)[4], const float (&hi)[4], unsigned (&a)[3][4]) {
    const float* const halves[2] = {lo, hi};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        unsigned p[3];
        split_bf16x3(halves[r / 2][2 * (r % 2)], halves[r / 2][2 * (r % 2) + 1], p);
#pragma unroll
        for (int i = 0; i < 3; ++i) a[i][r] = p[i];
    }
}

// ---- m16n8k8 TF32 steps (float32 Variants of precision "tf32"; Arith above).

// mma_k16 for TF32 operands: a k8 step has the byte geometry of a k16 step, so the same call
// serves both. Only B's rows as the n index (K for Q K^T): one ldmatrix_x4 at b_lane (bn_lane) +
// Tile::offset(row0 + 16 np, chunk0) gives the B fragments of n8 tiles 2 np, 2 np + 1; P V reads
// V by pv_k8 below.
template <typename Element, typename Tile, bool kTrans, int M, int N, template <int> class Fragment>
__device__ __forceinline__ void mma_k16(float (&c)[M][N][4], const Fragment<4> (&a)[M], unsigned b_lane, int row0,
                                        int chunk0) {
    static_assert(!kTrans, "TF32 operands never go through .trans: ldmatrix transposes 16-bit elements");
#pragma unroll
    for (int np = 0; np < N / 2; ++np) {
        unsigned raw[4];
        ptx::ldmatrix_x4(b_lane + Tile::offset(row0 + np * 16, chunk0), raw);
        Fragment<4> b;
        b.round(raw);
#pragma unroll
        for (int mt = 0; mt < M; ++mt) {
            mma_k8(c[mt][2 * np], a[mt], b, 0);
            mma_k8(c[mt][2 * np + 1], a[mt], b, 2);
        }
    }
}

// ---- TF32 operands read by 32-bit shared loads. ldmatrix's .trans moves 16-bit elements, so an
// operand whose k index runs along a float tile's rows (V for P V, K for dS K, Q and dO for
// dK/dV) and the transposed A operands (P^T, dS^T) are read element by element instead. Their k
// index is taken in the order (0, 2, 4, 6 | 1, 3, 5, 7): MMA k index t holds row 2t and t + 4
// row 2t + 1 (a k8 step's sum does not depend on the order, as long as A and B agree), so that
// a lane's two k rows are adjacent and, as SmemTile's pitch is 4 (mod 8) words for float rows,
// the rows 2t of a load fall in distinct bank octets: no bank conflicts. g = lane / 4, t = lane % 4.

// Per-lane offset of those reads in a Tile of floats: row 2t, float column g.
template <typename Tile>
__device__ __forceinline__ unsigned k8_rows_lane(int lane) {
    return Tile::offset(2 * (lane % 4), (lane / 4) / 4) + 4 * ((lane / 4) % 4);
}

// C += A B over N n8 tiles of C, one k8 step: B's rows are the k index, B[k][n] = tile rows
// row0 + (2t, 2t + 1), float columns from chunk chunk0 + 2 nt (b0 = B[2t][g], b1 = B[2t + 1][g]),
// read at lane_addr (k8_rows_lane + the tile's base). A must take its k index in the same order.
template <typename Tile, int M, int N, typename AFragment>
__device__ __forceinline__ void mma_k8_rows(float (&c)[M][N][4], const AFragment (&a)[M], unsigned lane_addr, int row0,
                                            int chunk0) {
#pragma unroll
    for (int nt = 0; nt < N; ++nt) {
        const unsigned addr = lane_addr + Tile::offset(row0, chunk0 + nt * 2);
        typename AFragment::template Like<2> b;
        b.set(0, __uint_as_float(ptx::ld_shared_b32(addr)));
        b.set(1, __uint_as_float(ptx::ld_shared_b32(addr + Tile::offset(1, 0))));
#pragma unroll
        for (int mt = 0; mt < M; ++mt) mma_k8(c[mt][nt], a[mt], b, 0);
    }
}

// The A fragment (keys in that order) of an accumulator's n8 tile kk, such as P or dS in
// registers: this lane's columns 2t and 2t + 1 of each row are exactly MMA k indices t and
// t + 4, so a0..a3 = c0, c2, c1, c3 and no shuffle is needed.
template <int M, int N, typename AFragment>
__device__ __forceinline__ void a_k8_of(AFragment (&a)[M], const float (&c)[M][N][4], int kk) {
#pragma unroll
    for (int mt = 0; mt < M; ++mt) {
        a[mt].set(0, c[mt][kk][0]);
        a[mt].set(1, c[mt][kk][2]);
        a[mt].set(2, c[mt][kk][1]);
        a[mt].set(3, c[mt][kk][3]);
    }
}

// The A fragment of an m16 tile stored transposed in a Tile of floats (A[m][k] = tile[k][m]: P^T
// and dS^T from queries x keys tiles): tile rows row0 + (2t, 2t + 1), columns from chunk chunk0
// (m = g) and chunk0 + 2 (m = g + 8), read at lane_addr (k8_rows_lane + the tile's base).
template <typename Tile, typename AFragment>
__device__ __forceinline__ void at_k8_rows(AFragment& a, unsigned lane_addr, int row0, int chunk0) {
    const unsigned addr = lane_addr + Tile::offset(row0, chunk0);
    a.set(0, __uint_as_float(ptx::ld_shared_b32(addr)));
    a.set(1, __uint_as_float(ptx::ld_shared_b32(addr + Tile::offset(0, 2))));
    a.set(2, __uint_as_float(ptx::ld_shared_b32(addr + Tile::offset(1, 0))));
    a.set(3, __uint_as_float(ptx::ld_shared_b32(addr + Tile::offset(1, 2))));
}

// The A fragment of an m16 tile of a Tile of floats whose columns are the k index (dS as the A of
// dS K), keys in that order: a0, a2 = tile[row0 + g][2t, 2t + 1] (one 8-byte load), a1, a3 the
// same 8 rows lower, from chunk chunk0, read at lane_addr (a_k8_cols_lane + the tile's base).
template <typename Tile>
__device__ __forceinline__ unsigned a_k8_cols_lane(int lane) {
    return Tile::offset(lane / 4, (lane % 4) / 2) + 8 * (lane % 2);
}
template <typename Tile, typename AFragment>
__device__ __forceinline__ void a_k8_cols(AFragment& a, unsigned lane_addr, int row0, int chunk0) {
    const unsigned addr = lane_addr + Tile::offset(row0, chunk0);
    const uint2 upper = ptx::ld_shared_v2(addr), lower = ptx::ld_shared_v2(addr + Tile::offset(8, 0));
    a.set(0, __uint_as_float(upper.x));
    a.set(1, __uint_as_float(lower.x));
    a.set(2, __uint_as_float(upper.y));
    a.set(3, __uint_as_float(lower.y));
}

// acc += P V over keys [8 kk, 8 kk + 8) on TF32 (Element tf32 or tf32x3): P's n8 tile kk from
// registers, V's rows from v_lane (k8_rows_lane + V's base).
template <typename Element, typename Tile, int M, int NS, int N>
__device__ __forceinline__ void pv_k8(float (&acc)[M][N][4], const float (&p)[M][NS][4], int kk, unsigned v_lane) {
    typename Arith<Element>::AFragment a[M];
    a_k8_of(a, p, kk);
    mma_k8_rows<Tile>(acc, a, v_lane, kk * 8, 0);
}

}  // namespace tc
}  // namespace cuflash
