// Every inline PTX instruction of cuflash, in one header, grouped by what it does.
//
// Kernels call these small wrappers instead of writing asm themselves, so the whole project's
// PTX can be reviewed in one place. Sections:
//   1. Shared memory: addresses, the launch's dynamic size, plain 16-byte stores
//   2. Asynchronous copies (cp.async, sm_80+): global -> shared, zero-filling, groups
//   3. Tensor-core fragments: ldmatrix (sm_75+), mma.sync m16n8k16 f16/bf16 and m16n8k8 tf32 -> f32 (sm_80+)
//   4. Conversions: two floats -> one packed f16x2 / bf16x2 register; float -> tf32
//   5. Fast math: ex2.approx, tanh.approx
// Other kernels add their own sections (e.g. DMMA for float64, wgmma, the bulk tensor copy
// engine) at the end.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {
namespace ptx {

// --------------------------------------------------------------------- 1. shared memory

// A generic pointer to shared memory as the 32-bit address that shared-space instructions take.
__device__ __forceinline__ unsigned smem_addr(const void* ptr) {
    return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

// Bytes of dynamic shared memory this launch was given (the launch's sharedMem argument).
__device__ __forceinline__ unsigned dynamic_smem_size() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

// blockIdx.x read through asm volatile: the compiler cannot reuse an earlier read, so values
// derived from it are recomputed where needed instead of held in registers across a loop.
__device__ __forceinline__ int block_index_x() {
    int x;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
    return x;
}

// blockIdx.y, read the same way.
__device__ __forceinline__ int block_index_y() {
    int y;
    asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(y));
    return y;
}

__device__ __forceinline__ void st_shared_v4(unsigned addr, unsigned a, unsigned b, unsigned c, unsigned d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

__device__ __forceinline__ void st_shared_b32(unsigned addr, unsigned value) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_shared_v2(unsigned addr, unsigned a, unsigned b) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};" ::"r"(addr), "r"(a), "r"(b) : "memory");
}

__device__ __forceinline__ unsigned ld_shared_b32(unsigned addr) {
    unsigned v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

__device__ __forceinline__ uint2 ld_shared_v2(unsigned addr) {
    uint2 v;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
    return v;
}

__device__ __forceinline__ uint4 ld_shared_v4(unsigned addr) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}

// --------------------------------------------------------------------- 2. cp.async (sm_80+)

// Copy 16 bytes global -> shared without passing through registers. `src_bytes` (0..16) bytes
// are read and the rest of the 16 are zero-filled: src_bytes = 0 reads nothing and writes zeros.
// Both addresses must be 16-byte aligned. .cg caches in L2 only: K/V tiles are streamed once
// per block, and other blocks of the same head find them in L2.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int src_bytes = 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

// cp_async_16 of all 16 bytes, for streams that read every byte of long runs (decode_tc's K/V):
// no zero-fill operand (with one, ptxas computes 16 - src_bytes into every copy's address: ~8
// instructions each, and a decode tile is ~16 copies against ~30 other instructions per thread),
// and .L2::128B: the L2 fetches the copy's whole 128-byte line from HBM at once, rather than
// each 32-byte sector on the request that first touches it.
__device__ __forceinline__ void cp_async_16_line(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// Close the group of cp.async issued by this thread since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Wait until at most `kPending` of this thread's committed groups are still in flight.
// Other threads' copies become visible only after a barrier that follows the wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// --------------------------------------------------------------------- 3. tensor cores

// ldmatrix .x4: four 8x8 matrices of 16-bit elements. Lanes 8i..8i+7 give the row addresses
// (16 bytes each) of matrix i; every lane receives, in register i, the two elements of matrix i
// at row lane/4, columns 2*(lane%4) and 2*(lane%4)+1 (.trans: of the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A B + D with A 16x16 (row-major), B 16x8 (column-major), D 16x8 fp32.
// Fragments, with g = lane/4 and t = lane%4 (each 16-bit register holds a pair of columns):
//   A: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 8+2t..)  a3 (g+8, 8+2t..)
//   B: b0 (k = 2t..2t+1, n = g)  b1 (k = 8+2t.., n = g)
//   D: d0, d1 (g, 2t), (g, 2t+1)  d2, d3 (g+8, 2t), (g+8, 2t+1)
// The D layout of two adjacent n-tiles, packed pairwise to 16 bits, is exactly an A fragment:
// the FlashAttention-2 trick that feeds P = softmax(S) to the next MMA straight from registers.
template <typename Element>
struct Mma16816;

template <>
struct Mma16816<__half> {
    __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <>
struct Mma16816<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    Mma16816<Element>::run(d, a, b0, b1);
}

// D = A B + D with A 16x8 (row-major), B 8x8 (column-major), D 16x8 fp32, on TF32 operands:
// 32-bit registers of which the MMA reads sign, exponent and the top 10 mantissa bits.
//   A: a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)     B: b0 (k = t, n = g)  b1 (k = t+4, n = g)
//   D: as m16n8k16's.
// With 4-byte elements, an 8x8 ldmatrix matrix is 8 rows of 4 elements and hands lane
// (row lane/4, column lane%4) in one register: the A (and the row-major-n B) fragments load
// with the same lane addresses and byte offsets as the 16-bit kernels' k16 fragments.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same with C = 0: D = A B (3xTF32 sums each step's products in a fresh fragment, tile_tc.cuh).
__device__ __forceinline__ void mma_1688_tf32_zero(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// --------------------------------------------------------------------- 4. conversions

// Round two floats to the 16-bit type and pack them: `lo` in bits 0..15, `hi` in 16..31
// (the lower column of a fragment pair lives in the low half). cvt puts its first source high.
template <typename Element>
__device__ __forceinline__ unsigned pack2(float lo, float hi);

template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// x rounded to TF32 (nearest, ties away from zero; NaN and infinities kept), as the register an
// mma .tf32 operand takes (the low 13 bits zero). Not volatile: equal conversions may be shared.
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// --------------------------------------------------------------------- 5. fast math

// 2^x on the special-function unit (max relative error ~2^-22; ex2(-inf) = +0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh(x) on the special-function unit (sm_75+; max relative error 2^-10.987, tanh(+-inf) = +-1).
__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace ptx
}  // namespace cuflash

// ===================================================================== 6. fwd_simt (fp32 / fp64)
// Added by the exact-kernel work; only used by cuda_src/fwd_simt.cu.
namespace cuflash {
namespace ptx {

// Copy one element of kBytes (4 or 8) global -> shared without passing through registers,
// zero-filling when !valid (src-size 0: nothing is read). Element-sized copies need only the
// element's own alignment, so rows of any stride and transposed destinations both work.
// .ca: small copies must use the L1-allocating form.
template <int kBytes>
__device__ __forceinline__ void cp_async_elem(void* dst, const void* src, bool valid) {
    static_assert(kBytes == 4 || kBytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes),
                 "r"(valid ? kBytes : 0)
                 : "memory");
}

}  // namespace ptx
}  // namespace cuflash

// ===================================================================== 7. bwd_tc (fp16 / bf16 backward)
// Added by the backward tensor-core work; used by cuda_src/bwd_dkdv_tc.cu and score_mod.cuh (BiasGrad).
namespace cuflash {
namespace ptx {

// *addr += value where `pred` holds: a predicated red.global.add.f32 (an atomicAdd under an `if`
// compiles to a branch around it: three more instructions a RED in bwd_dkdv_wgmma_x3's dQ^T).
__device__ __forceinline__ void red_add_f32_if(bool pred, float* addr, float value) {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t@p red.global.add.f32 [%1], %2;\n\t}" ::"r"(int(pred)),
                 "l"(addr), "f"(value)
                 : "memory");
}

// *addr += (a, b) as one vector reduction in L2 (sm_90+: red.global.add.v2.f32); addr must be
// 8-byte aligned. No return value: a fire-and-forget RED, like atomicAdd whose result is unused.
__device__ __forceinline__ void red_add_v2_f32(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(addr, a);
    atomicAdd(addr + 1, b);
#endif
}

// stmatrix .x4 (sm_90+): the inverse of ldmatrix_x4. Lanes 8i..8i+7 give the row addresses
// (16 bytes each) of matrix i; every lane's register i holds the two elements of matrix i at
// row lane/4, columns 2*(lane%4), 2*(lane%4)+1: an mma accumulator pair, once packed, so four
// 8x8 accumulator tiles leave in one instruction instead of four 4-byte stores per lane.
// kTrans: each 8x8 matrix stored transposed (lane l's row address: row l % 8 of the stored,
// transposed matrix l / 8).
template <bool kTrans = false>
__device__ __forceinline__ void stmatrix_x4(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kTrans)
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0),
                     "r"(r1), "r"(r2), "r"(r3)
                     : "memory");
    else
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
                     "r"(r2), "r"(r3)
                     : "memory");
#else
    __trap();  // callers test kHasStMatrix first
#endif
}

}  // namespace ptx
}  // namespace cuflash

// ===================================================================== 8. fwd_dmma (fp64 tensor cores)
// Added by the float64 DMMA forward; used by cuda_src/fwd_dmma.cu.
namespace cuflash {
namespace ptx {

// D = A B + D on the fp64 tensor cores (DMMA, sm_80+), A 8x4 row-major, B 4x8 column-major,
// D 8x8; every product and sum is an IEEE fp64 fused multiply-add (no reduced precision).
// Fragments, with g = lane / 4 and t = lane % 4:
//   A: a (row g, k = t)     B: b (k = t, col g)     D: d0, d1 (row g, cols 2t and 2t + 1)
// Not volatile: it has no side effects, so the compiler may schedule it freely.
__device__ __forceinline__ void dmma_884(double (&d)[2], double a, double b) {
    asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};"
        : "+d"(d[0]), "+d"(d[1])
        : "d"(a), "d"(b));
}

// Two row tiles (top: rows 0..7, bottom: rows 8..15) times two k-steps of dmma_884 at once:
//   top += a_top0 b0 + a_top1 b1,   bottom += a_bot0 b0 + a_bot1 b1
// with each operand in dmma_884's layout (a_*0 / b0 the first k-step, a_*1 / b1 the second).
// That is exactly mma.m16n8k8 .f64 (A: a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);
// B: b0 (t, g) b1 (t+4, g); D: (g, 2t..) then (g+8, 2t..)), which sm_90 adds: one instruction
// for four, and Hopper's DMMA rate is reached only with the larger shapes. Elsewhere: four
// m8n8k4, the same products in the same layout.
__device__ __forceinline__ void dmma_1688(double (&top)[2], double (&bottom)[2], double a_top0, double a_bot0,
                                          double a_top1, double a_bot1, double b0, double b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+d"(top[0]), "+d"(top[1]), "+d"(bottom[0]), "+d"(bottom[1])
        : "d"(a_top0), "d"(a_bot0), "d"(a_top1), "d"(a_bot1), "d"(b0), "d"(b1));
#else
    dmma_884(top, a_top0, b0);
    dmma_884(bottom, a_bot0, b0);
    dmma_884(top, a_top1, b1);
    dmma_884(bottom, a_bot1, b1);
#endif
}

}  // namespace ptx
}  // namespace cuflash

// ===================================================================== 9. wgmma (sm_90a: Hopper's warpgroup MMA)
// Added by the Hopper backward; used by cuda_src/bwd_dkdv_wgmma.cu. Every instruction here is
// issued by the 128 threads of a warpgroup together (4 consecutive warps, the first a multiple
// of 4). Outside sm_90a (the arch-specific target the dispatcher asks for on compute
// capability 9.0) they compile to a trap: no Variant reaches them there.
//
// D (64 x N, fp32) += A (64 x 16) B (16 x N), A and B 16-bit (or A (64 x 8) B (8 x N) in TF32:
// kIsTf32, below). Warp w of the warpgroup holds rows
// 16w..16w+15 of D exactly as an mma.sync m16n8 accumulator holds its tile, once per n8 tile:
// d[nt][0..1] = (row g, columns 8nt + 2t, +1), d[nt][2..3] = (row g + 8, same), g = lane/4,
// t = lane%4. A from registers has the m16n8k16 A-fragment layout per warp (tc::pack_a turns two
// n8 accumulator tiles into one). Operands in shared memory are described by a 64-bit matrix
// descriptor (below); "transposed" (kTrans = 1) means the operand is stored MN-major (its M or N
// index contiguous), otherwise K-major (its k index contiguous).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CUFLASH_HAS_WGMMA 1
#else
#define CUFLASH_HAS_WGMMA 0
#endif

namespace cuflash {
namespace ptx {

template <typename Element>
constexpr bool kIsBf16 = false;
template <>
constexpr bool kIsBf16<__nv_bfloat16> = true;
}  // namespace ptx
namespace tc {
struct tf32;    // float32 on TF32 tensor cores (tile_tc.cuh's Arith)
struct tf32x3;  // float32 in split operands (precision "highest")
}  // namespace tc
namespace ptx {
// float32 operands that wgmma reads as TF32 (its top 19 bits: the caller rounds them first). A
// k8 step of 4-byte elements has the byte geometry of a 16-bit k16 step, so the descriptors,
// k-step offsets and A fragments (4 registers a lane) are the same; TF32 takes K-major operands
// only (no transpose field).
template <typename Element>
constexpr bool kIsTf32 = false;
template <>
constexpr bool kIsTf32<tc::tf32> = true;
// float32 under precision "highest" (tile_tc.cuh's tf32x3: split operands, 3xTF32 or bf16x6).
template <typename Element>
constexpr bool kIsTf32x3 = false;
template <>
constexpr bool kIsTf32x3<tc::tf32x3> = true;

// A shared-memory operand stored in 128-byte swizzled panels (tc::Sw128Tile): rows of 64
// 16-bit elements (128 bytes), 8-row atoms of 1024 bytes in which the 16-byte chunk c of row r
// sits at chunk c ^ (r % 8); `addr` (the operand's first element) lies in an atom that starts
// on a 1024-byte boundary, at most 112 bytes into its first row.
//   K-major: rows are the M/N index; a k16 step is +32 bytes along the row (4 per panel).
//            stride_bytes = 1024 (8 rows to the next 8); leading_bytes is unused (16).
//   MN-major: rows are the k index; 64 M/N columns per panel. stride_bytes = 1024 (8 k-rows to
//            the next 8), leading_bytes = the panel size (64 columns to the next 64).
// Fields: start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte
// offset >> 4 in 32-45, base offset 0 (atoms 1024-aligned), swizzle mode 1 (128 B) in 62-63.
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr, unsigned leading_bytes, unsigned stride_bytes) {
    return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>((leading_bytes & 0x3FFFF) >> 4) << 16) |
           (static_cast<unsigned long long>((stride_bytes & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// The descriptor of an operand `bytes` further on in the same tile (a later k16 step): the
// start-address field holds addr >> 4 in bits 0-13 and shared addresses stay below 2^18, so the
// field neither wraps nor carries into the next one. One add to the low word, where rebuilding
// the descriptor from the address costs a mask, a shift and an or (and a move to a uniform
// register) per wgmma; the high word (stride, swizzle) is left as it is, so no 64-bit add.
__device__ __forceinline__ unsigned long long desc_advance(unsigned long long desc, unsigned bytes) {
    unsigned low;
    asm("add.u32 %0, %1, %2;" : "=r"(low) : "r"(static_cast<unsigned>(desc)), "r"(bytes >> 4));
    return (desc & 0xFFFFFFFF00000000ull) | low;
}

// Before the first wgmma that reads registers (A fragments, accumulators) written by other
// instructions since the last wgmma.
__device__ __forceinline__ void wgmma_fence() {
#if CUFLASH_HAS_WGMMA
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#else
    __trap();
#endif
}

// Close the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#if CUFLASH_HAS_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#else
    __trap();
#endif
}

// Wait until at most kPending committed groups are in flight; their registers are then final.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if CUFLASH_HAS_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#else
    __trap();
#endif
}

// Shared memory written by ordinary stores (st.shared, stmatrix, cp.async) that a wgmma reads
// next: each writing thread fences the generic proxy against the async proxy before the barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if CUFLASH_HAS_WGMMA
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#else
    __trap();
#endif
}

// Pin an accumulator element after wgmma_wait: the compiler may not move reads of it above the
// wait (it cannot see that the wgmma writes it asynchronously).
template <int M, int N>
__device__ __forceinline__ void wgmma_pin(float (&d)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}

// One k16 step (TF32: k8), D (+)= A B, N = 32, 64, 96 or 128 (accumulators float[N/8][4]; 96:
// float32's d65-96 forward, whose 128-byte panels hold 32 floats).
//   ss: A and B from shared memory (descriptors); kTransA / kTransB = 1 for MN-major;
//       kAccumulate = false: D = A B, and D is an output only (its old value is not live).
//   rs: D += A B, A from registers (one m16k16 fragment per warp), B from shared memory.
template <int N>
struct Wgmma;

#if CUFLASH_HAS_WGMMA
// The members of every Wgmma<N> specialization, written once: N's operand lists come from the
// CUFLASH_WGMMA_{ACC,SS,RS}<N> macros (asm operand lists cannot be generated by templates).
#define CUFLASH_WGMMA_MEMBERS(N)                                                                                   \
    template <typename Element, int kTransA, int kTransB, bool kAccumulate = true>                                \
    __device__ __forceinline__ static void ss(float (&d)[N / 8][4], unsigned long long desc_a,                     \
                                              unsigned long long desc_b) {                                          \
        static_assert(!kIsTf32<Element> || (kTransA == 0 && kTransB == 0), "TF32 operands are K-major");          \
        if constexpr (kAccumulate && kIsTf32<Element>)                                                              \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_TF32, "", "+f", 1);                                               \
        else if constexpr (kIsTf32<Element>)                                                                        \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_TF32, "", "=f", 0);                                               \
        else if constexpr (kAccumulate && kIsBf16<Element>)                                                         \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_BF16, CUFLASH_WGMMA_SS_TRANS##N, "+f", 1);                        \
        else if constexpr (kAccumulate)                                                                             \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_F16, CUFLASH_WGMMA_SS_TRANS##N, "+f", 1);                         \
        else if constexpr (kIsBf16<Element>)                                                                        \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_BF16, CUFLASH_WGMMA_SS_TRANS##N, "=f", 0);                        \
        else                                                                                                        \
            CUFLASH_WGMMA_SS_ASM(N, CUFLASH_WGMMA_F16, CUFLASH_WGMMA_SS_TRANS##N, "=f", 0);                         \
    }                                                                                                               \
    template <typename Element, int kTransB>                                                                        \
    __device__ __forceinline__ static void rs(float (&d)[N / 8][4], const unsigned (&a)[4],                        \
                                              unsigned long long desc_b) {                                          \
        static_assert(!kIsTf32<Element> || kTransB == 0, "TF32 operands are K-major");                             \
        if constexpr (kIsTf32<Element>)                                                                             \
            CUFLASH_WGMMA_RS_ASM(N, CUFLASH_WGMMA_TF32, "");                                                        \
        else if constexpr (kIsBf16<Element>)                                                                        \
            CUFLASH_WGMMA_RS_ASM(N, CUFLASH_WGMMA_BF16, CUFLASH_WGMMA_RS_TRANS##N);                                 \
        else                                                                                                        \
            CUFLASH_WGMMA_RS_ASM(N, CUFLASH_WGMMA_F16, CUFLASH_WGMMA_RS_TRANS##N);                                  \
    }

// One instruction of each form: shape N, TYPES (below), TRANS (the 16-bit forms' transpose
// operands, "" for TF32), the accumulator's constraint ("+f" accumulating, "=f" overwriting) and
// scale-d (1 accumulating, 0 overwriting).
#define CUFLASH_WGMMA_SS_ASM(N, TYPES, TRANS, ACC, SCALE_D)                                     \
    asm volatile(CUFLASH_WGMMA_SS##N(TYPES, TRANS)                                              \
                 : CUFLASH_WGMMA_ACC##N(ACC)                                                    \
                 : "l"(desc_a), "l"(desc_b), "r"(SCALE_D), "n"(kTransA), "n"(kTransB))
#define CUFLASH_WGMMA_RS_ASM(N, TYPES, TRANS)                                                   \
    asm volatile(CUFLASH_WGMMA_RS##N(TYPES, TRANS)                                              \
                 : CUFLASH_WGMMA_ACC##N("+f")                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1), "n"(kTransB))

// The shape's k and the operand types, and (16-bit only) the transpose operands' places.
#define CUFLASH_WGMMA_F16 "k16.f32.f16.f16"
#define CUFLASH_WGMMA_BF16 "k16.f32.bf16.bf16"
#define CUFLASH_WGMMA_TF32 "k8.f32.tf32.tf32"

#define CUFLASH_WGMMA_ACC32(C) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3])
#define CUFLASH_WGMMA_SS_TRANS32 ", %19, %20"
#define CUFLASH_WGMMA_SS32(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\nwgmma.mma_async.sync.aligned.m64n32" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
    "%16, %17, p, 1, 1" TRANS ";\n}\n"
#define CUFLASH_WGMMA_RS_TRANS32 ", %22"
#define CUFLASH_WGMMA_RS32(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\nwgmma.mma_async.sync.aligned.m64n32" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
    "{%16, %17, %18, %19}, %20, p, 1, 1" TRANS ";\n}\n"

template <>
struct Wgmma<32> {
    CUFLASH_WGMMA_MEMBERS(32)
};

#define CUFLASH_WGMMA_ACC64(C) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3])
#define CUFLASH_WGMMA_SS_TRANS64 ", %35, %36"
#define CUFLASH_WGMMA_SS64(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\nwgmma.mma_async.sync.aligned.m64n64" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
    "%32, %33, p, 1, 1" TRANS ";\n}\n"
#define CUFLASH_WGMMA_RS_TRANS64 ", %38"
#define CUFLASH_WGMMA_RS64(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\nwgmma.mma_async.sync.aligned.m64n64" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
    "{%32, %33, %34, %35}, %36, p, 1, 1" TRANS ";\n}\n"

template <>
struct Wgmma<64> {
    CUFLASH_WGMMA_MEMBERS(64)
};

#define CUFLASH_WGMMA_ACC128(C) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3]), \
    C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), C(d[9][0]), C(d[9][1]), C(d[9][2]), C(d[9][3]), \
    C(d[10][0]), C(d[10][1]), C(d[10][2]), C(d[10][3]), C(d[11][0]), C(d[11][1]), C(d[11][2]), C(d[11][3]), \
    C(d[12][0]), C(d[12][1]), C(d[12][2]), C(d[12][3]), C(d[13][0]), C(d[13][1]), C(d[13][2]), C(d[13][3]), \
    C(d[14][0]), C(d[14][1]), C(d[14][2]), C(d[14][3]), C(d[15][0]), C(d[15][1]), C(d[15][2]), C(d[15][3])
#define CUFLASH_WGMMA_SS_TRANS128 ", %67, %68"
#define CUFLASH_WGMMA_SS128(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\nwgmma.mma_async.sync.aligned.m64n128" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
    "%64, %65, p, 1, 1" TRANS ";\n}\n"
#define CUFLASH_WGMMA_RS_TRANS128 ", %70"
#define CUFLASH_WGMMA_RS128(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\nwgmma.mma_async.sync.aligned.m64n128" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
    "{%64, %65, %66, %67}, %68, p, 1, 1" TRANS ";\n}\n"

template <>
struct Wgmma<128> {
    CUFLASH_WGMMA_MEMBERS(128)
};

#define CUFLASH_WGMMA_ACC96(C) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3]), \
    C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), C(d[9][0]), C(d[9][1]), C(d[9][2]), C(d[9][3]), \
    C(d[10][0]), C(d[10][1]), C(d[10][2]), C(d[10][3]), C(d[11][0]), C(d[11][1]), C(d[11][2]), C(d[11][3])
#define CUFLASH_WGMMA_SS_TRANS96 ", %51, %52"
#define CUFLASH_WGMMA_SS96(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\nwgmma.mma_async.sync.aligned.m64n96" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, " \
    "%48, %49, p, 1, 1" TRANS ";\n}\n"
#define CUFLASH_WGMMA_RS_TRANS96 ", %54"
#define CUFLASH_WGMMA_RS96(TYPES, TRANS) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\nwgmma.mma_async.sync.aligned.m64n96" TYPES " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, " \
    "{%48, %49, %50, %51}, %52, p, 1, 1" TRANS ";\n}\n"

template <>
struct Wgmma<96> {
    CUFLASH_WGMMA_MEMBERS(96)
};

#else
template <int N>
struct Wgmma {
    template <typename Element, int kTransA, int kTransB, bool kAccumulate = true>
    __device__ __forceinline__ static void ss(float (&)[N / 8][4], unsigned long long, unsigned long long) {
        __trap();
    }
    template <typename Element, int kTransB>
    __device__ __forceinline__ static void rs(float (&)[N / 8][4], const unsigned (&)[4], unsigned long long) {
        __trap();
    }
};
#endif

}  // namespace ptx
}  // namespace cuflash

// ===================================================================== 10. The bulk tensor copy engine (TMA, sm_90)
// For the warp-specialized Hopper kernels (the Hopper issue): a producer thread asks the copy
// engine for a box of a tensor described by a tensor map (cuflash/_gpu/tma.py encodes it on the
// host; it reaches the kernel inside its __grid_constant__ params, so its address is in the
// parameter space the engine may read), into shared memory; the copy completes on an mbarrier
// (a 64-bit shared-memory barrier counting arrivals and transaction bytes), which consumers wait
// on by phase parity. Outside sm_90 they compile to a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CUFLASH_HAS_TMA 1
#else
#define CUFLASH_HAS_TMA 0
#endif

namespace cuflash {
namespace ptx {

// The 128-byte CUtensorMap (cuda.h's opaque type: NVRTC has no cuda.h), 64-byte aligned.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// Initialise the mbarrier at shared address `bar` to expect `arrivals` arrivals per phase (one
// thread, before any use), then make the initialisation visible to the copy engine.
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned arrivals) {
#if CUFLASH_HAS_TMA
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#else
    __trap();
#endif
}

// Arrive on `bar` and add `bytes` to the transaction count its current phase waits for (the
// producer, before or after issuing the copies that will complete those bytes).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned bar, unsigned bytes) {
#if CUFLASH_HAS_TMA
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#else
    __trap();
#endif
}

// Arrive on `bar` (a consumer releasing a stage back to the producer).
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
#if CUFLASH_HAS_TMA
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#else
    __trap();
#endif
}

// One arrival on `bar` for the whole warp, after every lane's reads of the stage: an arrive
// releases only its own thread's accesses, so the warp first synchronizes (__syncwarp orders the
// other lanes' shared-memory reads before lane 0's arrive; racecheck reports the refill of a slot
// whose reads some lane had not finished otherwise).
__device__ __forceinline__ void mbarrier_arrive_warp(unsigned bar) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbarrier_arrive(bar);
}

// Add `bytes` (a multiple of 16) of fp32 values at shared address `src` into global memory at
// `dst` (16-byte aligned), element by element, by the copy engine: the issuing thread moves on at
// once; its copies since the last commit form one bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, unsigned src, unsigned bytes) {
#if CUFLASH_HAS_TMA
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 ::"l"(dst), "r"(src), "r"(bytes) : "memory");
#else
    __trap();
#endif
}

// Close this thread's current bulk group (bulk_reduce_add_f32's copies since the last commit).
__device__ __forceinline__ void bulk_commit_group() {
#if CUFLASH_HAS_TMA
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#else
    __trap();
#endif
}

// Wait until at most kPending of this thread's bulk groups have not finished reading their
// shared-memory source (the source may then be rewritten; the global writes may still be on
// their way).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
#if CUFLASH_HAS_TMA
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
#else
    __trap();
#endif
}

// Wait until at most kPending of this thread's bulk groups are incomplete (their global writes
// done).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group() {
#if CUFLASH_HAS_TMA
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
#else
    __trap();
#endif
}

// Wait until the phase of `bar` with parity `phase` (0 or 1) has completed: all its arrivals
// and transaction bytes. try_wait suspends the thread for a while in hardware before it
// returns false, so the loop does not spin hot.
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned phase) {
#if CUFLASH_HAS_TMA
    unsigned done = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred complete;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
            "selp.u32 %0, 1, 0, complete;\n"
            "}"
            : "=r"(done)
            : "r"(bar), "r"(phase)
            : "memory");
    } while (!done);
#else
    __trap();
#endif
}

// Copy the box at coordinates (c0 innermost, ...) of the tensor `map` describes into shared
// memory at `dst` (aligned to 128 bytes; 1024 with a 128-byte swizzle), completing `bar`'s
// transaction bytes. Elements outside the tensor arrive as zeros. Issued by one thread.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const TensorMap& map, unsigned bar, int c0, int c1) {
#if CUFLASH_HAS_TMA
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void tma_load_3d(unsigned dst, const TensorMap& map, unsigned bar, int c0, int c1, int c2) {
#if CUFLASH_HAS_TMA
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void tma_load_4d(unsigned dst, const TensorMap& map, unsigned bar, int c0, int c1, int c2,
                                            int c3) {
#if CUFLASH_HAS_TMA
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
#else
    __trap();
#endif
}

// Bring the tensor map into the constant cache ahead of its first use (the producer, once).
__device__ __forceinline__ void tma_prefetch_map(const TensorMap& map) {
#if CUFLASH_HAS_TMA
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
#else
    __trap();
#endif
}

// True in exactly one lane of the (converged) warp: the producer's one issuing thread.
__device__ __forceinline__ bool elect_one() {
#if CUFLASH_HAS_TMA
    unsigned elected = 0;
    asm volatile(
        "{\n"
        ".reg .pred one;\n"
        "elect.sync _|one, 0xffffffff;\n"
        "selp.u32 %0, 1, 0, one;\n"
        "}"
        : "=r"(elected));
    return elected != 0;
#else
    __trap();
    return false;
#endif
}

// Named barriers (ids 1..15; 0 is __syncthreads'): a subset of the block's warps meets without
// the others, e.g. the consumer warpgroups of a warp-specialized kernel, whose producer warp
// never reaches their barriers. `threads` counts every thread that syncs or arrives, a multiple
// of 32. sync waits; arrive only counts this warp in (a signal to the warps that sync).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Register reallocation between warpgroups (sm_90a): the producer gives registers back, the
// consumers take them. Effective only with a register cap at entry (__launch_bounds__(threads, 1))
// and each warpgroup's role one branch of an if/else (HOPPER.md).
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
#if CUFLASH_HAS_WGMMA
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
#else
    __trap();
#endif
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
#if CUFLASH_HAS_WGMMA
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
#else
    __trap();
#endif
}

}  // namespace ptx
}  // namespace cuflash
