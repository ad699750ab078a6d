// Every inline PTX instruction of cuflash, in one header, grouped by what it does.
//
// Kernels call these small wrappers instead of writing asm themselves, so the whole project's
// PTX can be reviewed in one place. Sections:
//   1. Shared memory: addresses, the launch's dynamic size, plain 16-byte stores
//   2. Asynchronous copies (cp.async, sm_80+): global -> shared, zero-filling, groups
//   3. Tensor-core fragments: ldmatrix (sm_75+) and mma.sync m16n8k16 f16/bf16 -> f32 (sm_80+)
//   4. Conversions: two floats -> one packed f16x2 / bf16x2 register
//   5. Fast math: ex2.approx
// Other kernels add their own sections (e.g. DMMA for float64) at the end.
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

// --------------------------------------------------------------------- 5. fast math

// 2^x on the special-function unit (max relative error ~2^-22; ex2(-inf) = +0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
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
// Added by the backward tensor-core work; used by cuda_src/bwd_dkdv_tc.cu.
namespace cuflash {
namespace ptx {

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
__device__ __forceinline__ void stmatrix_x4(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
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
