// Forward attention on tensor cores: FlashAttention-2 with mma.sync, for float16 / bfloat16
// (m16n8k16) and float32 on m16n8k8 TF32 steps: one product under precision="tf32", three
// (3xTF32, float32-accurate) under "highest" (tile_tc.cuh's Arith and fragments).
//
//   O = softmax(Q K^T * scale) V,   lse = log(sum_j exp(Q K_j^T * scale))   (per query row)
//
// One block computes kBlockM query rows of one (batch..., head). Q's tile is read once; K and V
// stream through shared memory in tiles of kBlockN keys, kStages tiles deep (cp.async), and the
// scores S, probabilities P and output accumulator acc live in registers:
//
//   for each key tile j:   S = Q K_j^T                    (mma.sync, fp32)
//                          online softmax: m_i, l_i, P     (fp32, P = exp2(S*c - m_i), one FFMA)
//                          P = P o Z / (1 - p)             (dropout, when asked: dropout.cuh)
//                          acc = alpha * acc + P V_j       (P reused from registers)
//   O = acc / l_i,  lse = m_i + log l_i                    (once, at the end)
//
// Warps split the rows: warp w owns kBlockM / kWarps consecutive rows (kMTiles m16 tiles) and
// reads every K/V tile; no data crosses warps except through the K/V shared tiles.
// D and Dv are zero-padded to kHeadDim by the loads; keys >= Lk and queries >= Lq are zero rows.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "schedule.cuh"
#include "score_mod.cuh"
#include "softmax_tc.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages, bool kScoreMods = false>
constexpr unsigned fwd_tc_smem_bytes() {
    // Q (also O at the end), then kStages (K, V) tile pairs, padded rows of the elements' 16-bit
    // units, each stage with its keys' bias and mask tiles where the Variant stages them
    // (score_mod.cuh).
    constexpr int kWidth = kHeadDim * tc::Arith<Element>::kUnits;
    return tc::SmemTile<kBlockM, kWidth>::kBytes +
           kStages * (2 * tc::SmemTile<kBlockN, kWidth>::kBytes + staged_plane_bytes<kScoreMods, kHeadDim, kBlockM, kBlockN>());
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32) fwd_tc(const FwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr bool kTf32 = Arith::kUnits == 2;  // float32 on TF32 tensor cores (Element tc::tf32 or tc::tf32x3)
    constexpr int kWidth = kHeadDim * Arith::kUnits;  // a row's 16-bit units in shared memory
    constexpr int kThreads = kWarps * 32;
    constexpr int kRowsPerWarp = kBlockM / kWarps;
    constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
    constexpr int kNTilesS = kBlockN / 8;       // n8 tiles of S (keys)
    constexpr int kNTilesO = kHeadDim / 8;      // n8 tiles of acc (value columns)
    constexpr int kKStepsQK = kHeadDim / Arith::kK;  // k16 (k8) steps of Q K^T
    constexpr int kKStepsPV = kBlockN / Arith::kK;   // k16 (k8) steps of P V
    static_assert(kRowsPerWarp % 16 == 0 && kMTiles >= 1, "each warp owns whole m16 tiles");
    static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles are multiples of 16");
    static_assert(kStages >= 2, "the K/V pipeline needs at least two stages");

    // Q fragments stay in registers when they fit beside S and acc; else they are re-read from
    // shared memory (ldmatrix) at every k-step: more shared-memory traffic, fewer registers.
    constexpr int kAccRegs = kMTiles * (kNTilesO + kNTilesS) * 4;
    constexpr int kQRegs = sizeof(typename Arith::AFragment) / 4;  // registers of one Q fragment
    constexpr bool kQInRegisters = kAccRegs + kMTiles * kKStepsQK * kQRegs <= 128;

    using QTile = tc::SmemTile<kBlockM, kWidth>;   // also stages O at the end
    using KVTile = tc::SmemTile<kBlockN, kWidth>;  // one K or V tile
    constexpr bool kStagePlanes = stages_score_planes<kScoreMods, kHeadDim>();
    using PlaneStage = ScorePlaneStage<float, kBlockM, kBlockN>;  // the stage's bias and mask tiles
    constexpr unsigned kStageBytes = 2 * KVTile::kBytes + staged_plane_bytes<kScoreMods, kHeadDim, kBlockM, kBlockN>();
    constexpr unsigned kSmemBytes = fwd_tc_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages, kScoreMods>();
    static_assert(kSmemBytes == QTile::kBytes + kStages * kStageBytes, "Q, then the K/V stages");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned q_smem = ptx::smem_addr(smem);
    const unsigned kv_smem = q_smem + QTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // (batch..., head) and query tile of this block (schedule.cuh); recomputed in the epilogue
    // rather than held through the loop.
    const auto [bh, m_block] = scheduled_block<kHasWindow>(p);
    const int m0 = m_block * kBlockM;
    const int warp_row0 = warp * kRowsPerWarp;

    BatchIndex at;
    if (!starts_block<typename Arith::Storage, float>(p, bh, m_block, m0, kBlockM, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(p, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);
    // Score modifiers (score_mod.cuh); Q is negated below for a negative scale: |scale| here.
    constexpr float kLog2e = 1.4426950408889634f;
    ScoreMod<float, kFastTanh<Element>> mod(p, bh, fabsf(static_cast<float>(p.scale)), kLog2e, mask.diag);
    // A bias without softcap read from global memory goes into S itself: each tile's S starts as
    // bias / |scale| (tc::bias_into_scores) and the MMA adds Q K^T; the bodies then leave it out
    // (ScoreMod::bias_in_scores). 16-bit up to d96: wider, the loads cost spills on sm_80 (d128:
    // 32-80 bytes) or sm_90a (d224), as at TF32 d64. Not from the staged tiles (d32): loaded
    // ahead of the MMA there, the triangle forward took 1.06-1.11x the per-score add's time (H200).
    constexpr bool kBiasInS = kScoreMods && !kStagePlanes && !kTf32 && kHeadDim <= 96;
    mod.bias_in_scores = kBiasInS && tc::bias_goes_into_scores(p);
    const GlobalPlanes<float> row_planes = mod.row_planes(p, bh);  // the bias read into S, the staged tiles' source
    if (kStagePlanes && !PlaneStage::aligned(row_planes, p)) __trap();  // plan.py lays the planes out for staging

    // ---- Pipeline: cp.async groups are committed in order Q, tile first, ..., one per loop step
    // (empty groups too), so "wait until kStages-2 groups are pending" means "tile j has landed".
    // Loaders and stores count in 16-bit units: kUnits per element (a float is two).
    using Units = const unsigned short*;
    using Storage = typename Arith::Storage;
    constexpr int kUnits = Arith::kUnits;
    const tc::TileLoader<kBlockM, kWidth, kThreads> q_loader(reinterpret_cast<Units>(static_cast<const Storage*>(p.q) + at.q),
                                                              p.q_row_stride * kUnits, p.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kThreads> k_loader(reinterpret_cast<Units>(static_cast<const Storage*>(p.k) + at.k),
                                                              p.k_row_stride * kUnits, p.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kThreads> v_loader(reinterpret_cast<Units>(static_cast<const Storage*>(p.v) + at.v),
                                                              p.v_row_stride * kUnits, p.head_dim_v * kUnits);
    // 16-byte copies need 16-byte aligned rows; the host guarantees it (plan.py copies otherwise).
    if (!(q_loader.aligned(at.seqlen_q) && k_loader.aligned(at.seqlen_k) && v_loader.aligned(at.seqlen_k))) __trap();
    auto load_kv = [&](int j) {
        const unsigned slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;
        k_loader.load(slot, j * kBlockN, at.seqlen_k, tid);
        v_loader.load(slot + KVTile::kBytes, j * kBlockN, at.seqlen_k, tid);
        if constexpr (kStagePlanes) PlaneStage::template load<kThreads>(slot + 2 * KVTile::kBytes, row_planes, p, m0, j * kBlockN, tid);
    };
    q_loader.load(q_smem, m0, at.seqlen_q, tid);
    ptx::cp_async_commit();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (range.first + s < range.last) load_kv(range.first + s);
        ptx::cp_async_commit();
    }

    // Per-lane ldmatrix addresses (see ptx.cuh for the fragment layouts). Q (A operand): matrices
    // (rows 0-7 | 8-15) x (cols 0-7 | 8-15) of an m16k16 tile. K (B operand, K rows are the n
    // index): (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15).
    // V (B operand through .trans, V rows are the k index): (keys 0-7 | 8-15) x (dims 0-7 | 8-15);
    // TF32 reads V by 32-bit loads instead (tc::pv_k8). Its k8 steps have the byte geometry of
    // 16-bit k16 steps: the same lane addresses, the fragments rounded to TF32.
    const unsigned q_lane = q_smem + tc::a_lane<QTile>(warp_row0, lane);
    const unsigned k_lane = tc::bn_lane<KVTile>(lane);
    const unsigned v_lane = KVTile::kBytes + (kTf32 ? tc::k8_rows_lane<KVTile>(lane) : tc::bt_lane<KVTile>(lane));
    auto q_fragment = [&](int mt, int kk, typename Arith::AFragment& a) {
        tc::load_a(q_lane + QTile::offset(mt * 16, kk * 2), a);
    };

    // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q is negated in shared memory
    // (exact) so that the softmax sees c = |scale| * log2(e) > 0 and may take row
    // maxima on raw scores. scale = 0 becomes the smallest normal float: S * c flushes to 0 for
    // every finite score (uniform weights) while -inf * c stays -inf.
    const float scale_log2 = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
    if (p.scale_log2 < 0.f) {
        ptx::cp_async_wait<kStages - 1>();  // this thread's Q copies have landed
        q_loader.template negate<Arith::kSignBits>(q_smem, tid);  // published by the first barrier below
    }

    typename Arith::AFragment q_regs[kQInRegisters ? kKStepsQK : 1][kQInRegisters ? kMTiles : 1];
    if (kQInRegisters) {
        ptx::cp_async_wait<kStages - 1>();  // Q's group, not yet the K/V tiles
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int kk = 0; kk < kKStepsQK; ++kk) q_fragment(mt, kk, q_regs[kQInRegisters ? kk : 0][kQInRegisters ? mt : 0]);
    }

    float acc[kMTiles][kNTilesO][4];
    tc::zero(acc);
    tc::OnlineSoftmax<kMTiles> softmax;
    // A sink is the first logit every row has seen.
    if (p.sinks != nullptr) softmax.start_from(mod.sink(p, bh, kLog2e));  // any Variant

    // Key tiles j in [range.first, range.last). Tiles in [full_first, full_last) are seen whole by
    // every row and skip the per-element test; the others cross the window's left edge, the
    // diagonal / right edge or the end of the keys, and are masked. One loop with a per-tile
    // (warp-uniform) branch rather than three loops: one copy of the MMA code keeps ptxas's
    // register allocation spill-free.
    for (int j = range.first; j < range.last; ++j) {
        const bool masked = j < range.full_first || j >= range.full_last;
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // tile j visible to all; everyone is done with the slot reloaded below
        if (j + kStages - 1 < range.last) load_kv(j + kStages - 1);
        ptx::cp_async_commit();
        const unsigned slot = kv_smem + ((j - range.first) % kStages) * kStageBytes;

        // S = Q K_j^T (+ bias / |scale|)
        float s[kMTiles][kNTilesS][4];
        if (kBiasInS && mod.bias_in_scores) {
            tc::bias_into_scores(p, row_planes, 1.f / fabsf(static_cast<float>(p.scale)), s, m0 + warp_row0, j * kBlockN,
                                 lane);
        } else {
            tc::zero(s);
        }
#pragma unroll
        for (int kk = 0; kk < kKStepsQK; ++kk) {
            if constexpr (kQInRegisters) {
                tc::mma_k16<Element, KVTile, false>(s, q_regs[kk], slot + k_lane, 0, kk * 2);
            } else {
                typename Arith::AFragment a[kMTiles];
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) q_fragment(mt, kk, a[mt]);
                tc::mma_k16<Element, KVTile, false>(s, a, slot + k_lane, 0, kk * 2);
            }
        }

        // Score modifiers (score_mod.cuh): the modified scores and their softmax multiplier c;
        // the bias and mask from this stage's tiles where the Variant stages them. (ALiBi alone
        // in raw units for 16-bit inputs: in the TF32 form it spills.)
        constexpr ModBodies kBodies = kTf32 ? ModBodies::kAll : ModBodies::kAll | ModBodies::kRawAlibi;
        float c = scale_log2;
        if constexpr (kStagePlanes) {
            const unsigned char* stage = smem + (slot - q_smem) + 2 * KVTile::kBytes;
            c = tc::modify_scores<kBodies>(mod, s, m0 + warp_row0, j * kBlockN, lane, c,
                                           PlaneStage::planes(stage, p, m0, j * kBlockN));
        } else if constexpr (kScoreMods) {
            c = tc::modify_scores<kBodies>(mod, s, m0 + warp_row0, j * kBlockN, lane, c);
        }

        // -inf where the key is hidden.
        if (masked) tc::apply_mask</*kSplit=*/true>(mask, s, m0 + warp_row0, j * kBlockN, lane, tc::neg_inf());

        softmax.update(s, acc, c);
        // Dropout (dropout.cuh): P o Z * scale for P V; l_i has summed the undropped P. The row
        // index is recomputed rather than held through the loop.
        if constexpr (kDropout)
            tc::drop_forward(p, scheduled_block<kHasWindow>(p).bh, s, m0 + warp_row0, j * kBlockN, lane);

        // acc += P V_j. TF32: one k8 step per n8 tile of P (tc::pv_k8).
        if constexpr (kTf32) {
#pragma unroll
            for (int kk = 0; kk < kKStepsPV; ++kk) tc::pv_k8<Element, KVTile>(acc, s, kk, slot + v_lane);
        } else {
            // 16-bit: P packed to 16 bits; the S layout of n-tiles 2kk, 2kk+1 is P's A fragment.
#pragma unroll
            for (int kk = 0; kk < kKStepsPV; ++kk) {
                unsigned a[kMTiles][4];
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) tc::pack_a<Element>(s[mt][2 * kk], s[mt][2 * kk + 1], a[mt]);
                // Spelled out rather than tc::mma_k16<..., true>: through the helper, NVRTC emits
                // different code for d96 128x32 (this form is the one verified on the GPU).
#pragma unroll
                for (int dp = 0; dp < kNTilesO / 2; ++dp) {
                    unsigned b[4];
                    ptx::ldmatrix_x4_trans(slot + v_lane + KVTile::offset(kk * 16, dp * 2), b);
#pragma unroll
                    for (int mt = 0; mt < kMTiles; ++mt) {
                        ptx::mma_16816<Element>(acc[mt][2 * dp], a[mt], b[0], b[1]);
                        ptx::mma_16816<Element>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
    }

    // ---- Epilogue: O = acc / l_i in the output type, staged through this warp's own Q rows
    // (no other warp reads them) so that global stores are whole 16-byte chunks where aligned.
    float inv_l[kMTiles][2], lse[kMTiles][2];
    softmax.finish(inv_l, lse);
    const BatchIndex out_at(p, scheduled_block<kHasWindow>(p).bh);  // recomputed: not held through the loop
    // A block that saw no key tile never passed the loop's barrier: Q's copies (issued by all
    // threads, into every warp's rows) may still be landing. One barrier settles both cases.
    ptx::cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + mt * 16 + lane / 4 + 8 * h;
#pragma unroll
            for (int nt = 0; nt < kNTilesO; ++nt) {
                if constexpr (kTf32) {  // columns 8 nt + 2t, +1: bytes 32 nt + 8t of the row
                    ptx::st_shared_v2(q_smem + QTile::offset(row, 2 * nt) + 8 * (lane % 4),
                                      __float_as_uint(acc[mt][nt][2 * h] * inv_l[mt][h]),
                                      __float_as_uint(acc[mt][nt][2 * h + 1] * inv_l[mt][h]));
                } else {
                    const unsigned packed = ptx::pack2<Element>(acc[mt][nt][2 * h] * inv_l[mt][h],
                                                                acc[mt][nt][2 * h + 1] * inv_l[mt][h]);
                    ptx::st_shared_b32(q_smem + QTile::offset(row, nt) + 4 * (lane % 4), packed);
                }
            }
            if (lane % 4 == 0 && m0 + row < out_at.seqlen_q)
                static_cast<float*>(p.lse)[out_at.lse + m0 + row] = lse[mt][h];
        }
    __syncwarp();
    tc::store_rows<kRowsPerWarp, kWidth>(q_smem + QTile::offset(warp_row0, 0),
                                         reinterpret_cast<unsigned short*>(static_cast<Storage*>(p.o) + out_at.o) +
                                             (m0 + warp_row0) * p.o_row_stride * kUnits,
                                         p.o_row_stride * kUnits, out_at.seqlen_q - m0 - warp_row0, p.head_dim_v * kUnits,
                                         lane);
}

}  // namespace cuflash
