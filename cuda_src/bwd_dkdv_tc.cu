// Backward attention on tensor cores, over key tiles: dK, dV (and dQ by fp32 atomics).
// FlashAttention-2's backward with recomputation, on mma.sync: float16 / bfloat16 on m16n8k16,
// float32 under precision="tf32" on m16n8k8 TF32 (tile_tc.cuh's Arith, as fwd_tc.cu).
//
// One block owns kBlockN keys of one key/value head and a group of heads_per_block query heads
// that read it (attention rows bh0 + g, bh0 = blockIdx.x * heads_per_block; GQA): K_j, V_j stay in
// shared memory, dK_j and dV_j accumulate in fp32 registers over every head of the group, and
// the steps (g, i) -- head g, query tile i that sees a key of the block; heads outer -- stream
// Q_i, dO_i, lse_i, delta_i of head g through shared memory (kStages deep, cp.async, straight
// across head boundaries). dK_j, dV_j are written once, as the group's (params.cuh):
//
//   S    = Q_i K_j^T                          recompute the scores
//   P    = exp2(S * scale_log2 - lse_i log2 e)  (0 where masked, for rows past Lq or lse = -inf)
//   dP   = dO_i V_j^T
//   dS   = P o (dP - delta_i)                 delta_i = rowsum(dO_i o O_i), from bwd_delta
//                                             (dropout: dP o Z / q here, P o Z / q in dV: dropout.cuh)
//   dV_j += P^T dO_i
//   dK_j += dS^T Q_i
//   dQ_i += dS K_j                            fp32 atomics into dq_accum (when non-null)
//   dK_j *= scale                             (once, at the end; dQ's scale is bwd_dq_convert's)
//
// Three warp grids, one per kind of product, each as square as the registers allow so that a
// fragment read from shared memory feeds several independent MMAs (every operand but K_j / V_j
// is read once per query tile and per warp that needs it; at 8 warps per SM the kernel waits on
// instruction latency more than on bandwidth, so fewer loads and more MMAs in flight both pay):
//   S, dP    (queries x keys): 2 x kWarps/2 warps, each kSRows x kSCols
//   dK, dV   (keys x dims):    kWarps/2 x 2 warps, each kKVRows x kKVCols, accumulated all along
//   dQ       (queries x dims): units of kDqRows x 32, round robin over the warps
// P and dS cross from the first grid to the others through shared memory, in the element type,
// as (queries x keys) tiles: ldmatrix.trans reads them back as P^T / dS^T (the A operands of
// dV, dK) and plain ldmatrix as dS (the A operand of dQ); on TF32, 32-bit loads do (tile_tc.cuh's
// k8 reads, as the B operands whose k index runs along rows). Two barriers per query tile: one
// before the tile is read (it landed; the previous tile's readers of P / dS are done), one
// between writing P / dS and reading them.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bwd_tc.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "score_mod.cuh"
#include "tile_tc.cuh"

namespace cuflash {

// Whether a Variant stages its bias and mask tiles (score_mod.cuh's rule): not with 64-key
// tiles (short rows' tile, tiles.py's short_tile, and the small-memory fallback), whose rows'
// planes are small enough to stay in L1 and whose blocks then fit more per SM (the short tile:
// 49 KB, four by shared memory, three by registers: bwd_dkdv_tc_min_blocks).
template <bool kScoreMods, int kHeadDim, int kBlockN>
constexpr bool bwd_dkdv_tc_stages_planes() {
    return stages_score_planes<kScoreMods, kHeadDim>() && kBlockN >= 128;
}

// The dynamic shared memory of a Variant: the kernel's own formula, which the host's tile table
// (tiles.py) must equal; tests/test_pipeline.py compiles a probe of it for every Variant.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages, bool kScoreMods = false>
constexpr unsigned bwd_dkdv_tc_smem_bytes() {
    // K, V, P and dS, then per stage Q, dO, 2 * kBlockM floats (lse, delta) and, where the Variant
    // stages them (score_mod.cuh), the bias and mask tiles of the stage's queries. Rows of 16-bit
    // units, kUnits per element.
    constexpr int kUnits = tc::Arith<Element>::kUnits;
    return 2 * tc::SmemTile<kBlockN, kHeadDim * kUnits>::kBytes + 2 * tc::SmemTile<kBlockM, kBlockN * kUnits>::kBytes +
           kStages * (2 * tc::SmemTile<kBlockM, kHeadDim * kUnits>::kBytes + 2 * kBlockM * 4 +
                      plane_stage_bytes<bwd_dkdv_tc_stages_planes<kScoreMods, kHeadDim, kBlockN>(), kBlockM, kBlockN>());
}

// Blocks per SM the registers must allow: three for the short rows' 4-warp tile at D = 32 (168
// registers, spill-free offline), else 0, which leaves the bound unset: a 1 is not the same (it
// moves the register heuristic: fwd_tc's d32 128x64 tile took 166 -> 185 registers with it and
// ran 16% slower, H200 2026-12-03).
template <int kHeadDim, int kWarps>
constexpr int bwd_dkdv_tc_min_blocks() {
    return kWarps == 4 && kHeadDim <= 32 ? 3 : 0;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, (bwd_dkdv_tc_min_blocks<kHeadDim, kWarps>())) bwd_dkdv_tc(const BwdParams p) {
    using Arith = tc::Arith<Element>;
    constexpr bool kTf32 = Arith::kUnits == 2;  // float32 on TF32 tensor cores
    constexpr int kUnits = Arith::kUnits;       // 16-bit units per element
    constexpr int kWidth = kHeadDim * kUnits;   // a K/V/Q/dO row's units in shared memory
    using Storage = typename Arith::Storage;
    using Units = const unsigned short*;
    constexpr int kThreads = kWarps * 32;
    constexpr int kSRows = kBlockM / 2, kSCols = kBlockN / (kWarps / 2);          // S, dP grid
    constexpr int kKVRows = kBlockN / (kWarps / 2), kKVCols = kHeadDim / 2;      // dK, dV grid
    constexpr int kDqCols = 32;                                                  // dQ units
    constexpr int kDqRows = (kBlockM / 32) * (kHeadDim / kDqCols) >= kWarps ? 32 : 16;
    constexpr int kDqUnits = (kBlockM / kDqRows) * (kHeadDim / kDqCols);
    constexpr int kSM = kSRows / 16, kSN = kSCols / 8;        // m16 / n8 tiles of a warp's S
    constexpr int kKVM = kKVRows / 16, kKVN = kKVCols / 8;    // ... of a warp's dK and dV
    constexpr int kDqM = kDqRows / 16, kDqN = kDqCols / 8;    // ... of a dQ unit
    constexpr int kKStepsD = kHeadDim / Arith::kK;            // k16 (k8) steps of Q K^T and dO V^T
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kHasStMatrix = !kTf32;                     // stmatrix (of 16-bit elements) exists from sm_90
#else
    constexpr bool kHasStMatrix = false;
#endif
    static_assert(kWarps % 2 == 0 && kSRows % 16 == 0 && kSCols % 16 == 0 && kKVRows % 16 == 0 &&
                      kKVCols % 16 == 0 && kHeadDim % kDqCols == 0,
                  "every warp tile is whole m16 tiles and pairs of n8 tiles");
    static_assert(kThreads >= 2 * kBlockM, "one thread per lse / delta value of a query tile");
    static_assert(kStages >= 2, "the Q/dO pipeline needs at least two stages");

    using KVTile = tc::SmemTile<kBlockN, kWidth>;           // K_j, V_j; they stage dK, dV at the end
    using QTile = tc::SmemTile<kBlockM, kWidth>;            // one Q_i or dO_i
    using PTile = tc::SmemTile<kBlockM, kBlockN * kUnits>;  // P or dS, queries x keys
    constexpr unsigned kStatBytes = 2 * kBlockM * 4;  // lse_i, then delta_i (fp32)
    constexpr bool kStagePlanes = bwd_dkdv_tc_stages_planes<kScoreMods, kHeadDim, kBlockN>();
    using PlaneStage = ScorePlaneStage<float, kBlockM, kBlockN>;  // the stage's bias and mask tiles
    constexpr unsigned kPlanesAt = 2 * QTile::kBytes + kStatBytes;  // their offset in a stage
    constexpr unsigned kStageBytes = kPlanesAt + plane_stage_bytes<kStagePlanes, kBlockM, kBlockN>();
    constexpr unsigned kSmemBytes = bwd_dkdv_tc_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages, kScoreMods>();
    static_assert(kSmemBytes == 2 * KVTile::kBytes + 2 * PTile::kBytes + kStages * kStageBytes, "layout");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    const unsigned k_smem = ptx::smem_addr(smem);
    const unsigned v_smem = k_smem + KVTile::kBytes;
    const unsigned p_smem = v_smem + KVTile::kBytes;
    const unsigned ds_smem = p_smem + PTile::kBytes;
    const unsigned stage_smem = ds_smem + PTile::kBytes;
    unsigned char* const stage_ptr = smem + 2 * KVTile::kBytes + 2 * PTile::kBytes;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int heads = p.heads_per_block;
    const int n0 = blockIdx.y * kBlockN;
    const int s_row = (warp / (kWarps / 2)) * kSRows;    // the warp's queries in S, dP
    const int s_col = (warp % (kWarps / 2)) * kSCols;    // ... and keys
    const int kv_row = (warp / 2) * kKVRows;             // the warp's keys in dK, dV
    const int kv_col = (warp % 2) * kKVCols;             // ... and dims
    const FwdParams& f = p.fwd;

    BwdBatchIndex at;  // the group's first row's
    if (!starts_key_block<Storage, float, kBlockN>(p, blockIdx.x * heads, blockIdx.y, n0, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(f, at);
    const TileRange range = mask.query_tiles(n0, kBlockN, kBlockM, at.seqlen_q);

    const tc::TileLoader<kBlockN, kWidth, kThreads> k_loader(reinterpret_cast<Units>(static_cast<const Storage*>(f.k) + at.k),
                                                              f.k_row_stride * kUnits, f.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kThreads> v_loader(reinterpret_cast<Units>(static_cast<const Storage*>(f.v) + at.v),
                                                              f.v_row_stride * kUnits, f.head_dim_v * kUnits);
    const tc::QueryTileLoader<kBlockM, kWidth, kThreads, QTile, kUnits> qdo_loader(p, at);  // head 0's
    if (!(k_loader.aligned(at.seqlen_k) && v_loader.aligned(at.seqlen_k) && qdo_loader.aligned())) __trap();
    // plan.py lays the bias and mask planes out for staging (every row's, as the first one's).
    if (kStagePlanes && !PlaneStage::aligned(ScoreMod<float, kFastTanh<Element>>::row_planes(f, blockIdx.x * heads), f)) __trap();
    // Step number t = (g, i) into slot t % kStages.
    auto load_qdo = [&](int t, const HeadTileStep& s) {
        const int slot_index = t % kStages;
        const unsigned slot = stage_smem + slot_index * kStageBytes;
        qdo_loader.head(p, s.g).load(slot, slot + QTile::kBytes, stage_ptr + slot_index * kStageBytes + 2 * QTile::kBytes,
                                     s.i, tid);
        if constexpr (kStagePlanes)
            PlaneStage::template load<kThreads>(slot + kPlanesAt, ScoreMod<float, kFastTanh<Element>>::row_planes(f, blockIdx.x * heads + s.g),
                                                f, s.i * kBlockM, n0, tid);
    };

    // ---- Pipeline (tc::start_kv_pipeline): K, V, then one cp.async group per loop step.
    const HeadTileStep first_step =
        tc::start_kv_pipeline<kStages>(k_loader, v_loader, k_smem, v_smem, n0, at.seqlen_k, range, heads, tid, load_qdo);

    // Per-lane ldmatrix addresses (fragment layouts: ptx.cuh, tile_tc.cuh).
    const unsigned q_a_lane = tc::a_lane<QTile>(s_row, lane);   // Q_i, dO_i as A (m = queries, k = dims)
    const unsigned kv_bn_lane = tc::bn_lane<KVTile>(lane);      // K_j, V_j as B (n = keys, k = dims)
    const unsigned q_bt_lane = tc::bt_lane<QTile>(lane);        // Q_i, dO_i as B (k = queries, n = dims)
    const unsigned pt_lane = tc::bn_lane<PTile>(lane);          // P, dS read .trans: A = P^T (m = keys, k = queries)
    const unsigned ds_a_lane = tc::a_lane<PTile>(0, lane);      // dS as A (m = queries, k = keys)
    const unsigned k_bt_lane = tc::bt_lane<KVTile>(lane);       // K_j as B (k = keys, n = dims)
    // TF32 (a k8 step has the byte geometry of a k16 one: Q, dO, K, V as above, rounded): the
    // operands read along their rows by 32-bit loads (tile_tc.cuh), K_j, Q_i and dO_i as B with
    // k = rows, P and dS as transposed A; dS as the A of dQ by 8-byte loads.
    const unsigned kv_rows_lane = tc::k8_rows_lane<KVTile>(lane);
    const unsigned q_rows_lane = tc::k8_rows_lane<QTile>(lane);
    const unsigned p_rows_lane = tc::k8_rows_lane<PTile>(lane);
    const unsigned ds_cols_lane = tc::a_k8_cols_lane<PTile>(lane);

    float dk[kKVM][kKVN][4], dv[kKVM][kKVN][4];
    tc::zero(dk);
    tc::zero(dv);
    // dQ stored here (BwdParams::dq_direct) by 16-bit Variants up to d224: the branch spilled
    // 48-300 bytes at d256 and in TF32 (tiles.py's KernelSpec.stores_dq says where it exists).
    constexpr bool kStoresDq = !kTf32 && kHeadDim <= 224;
    if (!kStoresDq && p.dq_direct) __trap();
    // dq_accum's rows of the group's first head (dq's with dq_direct), kept in shared memory
    // rather than registers (the loop's first barrier publishes it).
    __shared__ long long dq_rows_s;
    if (tid == 0) dq_rows_s = kStoresDq && p.dq_direct ? at.dq : at.dq_accum;

    // C += A^T B over the warp's dK / dV tile (kKVRows keys x kKVCols dims): A^T = P^T or dS^T
    // (the queries x keys tile at a_smem, read transposed), B = dO_i or Q_i (at b_slot).
    auto t_times = [&](float(&c)[kKVM][kKVN][4], unsigned a_smem, unsigned b_slot) {
        // Fully unrolled up to 64 columns per warp; by 2 above (d = 224 spilled fully unrolled).
        constexpr int kSteps = kBlockM / Arith::kK;
        constexpr int kUnroll = kKVN > 8 ? 2 : kSteps;
#pragma unroll kUnroll
        for (int kk = 0; kk < kSteps; ++kk) {
            if constexpr (kTf32) {  // columns c of a float tile are in chunk c / 4
                typename Arith::AFragment a[kKVM];
#pragma unroll
                for (int mt = 0; mt < kKVM; ++mt) tc::at_k8_rows<PTile>(a[mt], a_smem + p_rows_lane, kk * 8, (kv_row + mt * 16) / 4);
                tc::mma_k8_rows<QTile>(c, a, b_slot + q_rows_lane, kk * 8, kv_col / 4);
            } else {
                unsigned a[kKVM][4];
#pragma unroll
                for (int mt = 0; mt < kKVM; ++mt)
                    ptx::ldmatrix_x4_trans(a_smem + pt_lane + PTile::offset(kk * 16, (kv_row + mt * 16) / 8), a[mt]);
                tc::mma_k16<Element, QTile, true>(c, a, b_slot + q_bt_lane, kk * 16, kv_col / 8);
            }
        }
    };
    // The warp's S-grid accumulator as 16-bit pairs into a queries x keys tile: on sm_90 one
    // stmatrix per two n8 tiles of an m16 tile (matrices: rows 0-7 | 8-15 of tile nt, then of
    // nt + 1; lane l addresses row l % 8 of matrix l / 8), else one 4-byte store per pair.
    const unsigned st_lane = PTile::offset(s_row + ((lane / 8) % 2) * 8 + lane % 8, s_col / 8 + lane / 16);
    auto store_s_tile = [&](const float(&c)[kSM][kSN][4], unsigned dst) {
#pragma unroll
        for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
            for (int np = 0; np < kSN / 2; ++np) {
                const float(&lo)[4] = c[mt][2 * np];
                const float(&hi)[4] = c[mt][2 * np + 1];
                if constexpr (kTf32) {  // (row, key 2t, 2t + 1) of each n8 tile: 8 bytes at 32 nt + 8t
                    const unsigned base = dst + PTile::offset(s_row + mt * 16 + lane / 4, (s_col + 16 * np) / 4) + 8 * (lane % 4);
                    ptx::st_shared_v2(base, __float_as_uint(lo[0]), __float_as_uint(lo[1]));
                    ptx::st_shared_v2(base + PTile::offset(8, 0), __float_as_uint(lo[2]), __float_as_uint(lo[3]));
                    ptx::st_shared_v2(base + PTile::offset(0, 2), __float_as_uint(hi[0]), __float_as_uint(hi[1]));
                    ptx::st_shared_v2(base + PTile::offset(8, 2), __float_as_uint(hi[2]), __float_as_uint(hi[3]));
                } else if constexpr (kHasStMatrix) {
                    ptx::stmatrix_x4(dst + st_lane + PTile::offset(mt * 16, 2 * np), ptx::pack2<Element>(lo[0], lo[1]),
                                     ptx::pack2<Element>(lo[2], lo[3]), ptx::pack2<Element>(hi[0], hi[1]),
                                     ptx::pack2<Element>(hi[2], hi[3]));
                } else {
                    const unsigned base = dst + PTile::offset(s_row + mt * 16 + lane / 4, s_col / 8 + 2 * np) + 4 * (lane % 4);
                    ptx::st_shared_b32(base, ptx::pack2<Element>(lo[0], lo[1]));
                    ptx::st_shared_b32(base + PTile::offset(8, 0), ptx::pack2<Element>(lo[2], lo[3]));
                    ptx::st_shared_b32(base + PTile::offset(0, 1), ptx::pack2<Element>(hi[0], hi[1]));
                    ptx::st_shared_b32(base + PTile::offset(8, 1), ptx::pack2<Element>(hi[2], hi[3]));
                }
            }
    };
    const float scale_log2 = f.scale_log2;
    const bool with_dq = p.dq_accum != nullptr || (kStoresDq && p.dq_direct);
    // A bias without softcap goes into S itself (as Hopper's kernels do): each step's S starts as
    // bias / scale (signed: the backward scales S by scale_log2) from the step's staged tile or
    // global memory, and the MMA adds Q_i K_j^T; the plain path then stores its dbias. Not at
    // d256, where the loads cost spills (16-bit on sm_80: 104-120 bytes).
    constexpr bool kBiasInS = kScoreMods && kHeadDim <= 224;
    // The bias's gradient leaves from the finished dS fragment, two keys at a time, and may be
    // added per bias plane (BiasGrad's kAdds), up to d224; d256 stores it score by score from the
    // bodies and never adds (either change spilled 84-140 bytes there on sm_80).
    constexpr bool kDbiasFromDs = kHeadDim <= 224;
    const bool bias_in_s = kBiasInS && tc::bias_goes_into_scores(f);
    const bool capped = f.softcap > 0.0;

    // Query tiles outside [full_first, full_last) cross the window, the keys' end or Lq and take
    // the per-element test (one block-uniform branch). Their bounds wait in shared memory rather
    // than registers (the loop's first barrier publishes them): the head index took their place.
    __shared__ int full_first_s, full_last_s;
    if (tid == 0) {
        full_first_s = range.full_first;
        full_last_s = range.full_last;
    }

    // Steps t = (g, i): every head g of the group over query tiles i in [range.first, range.last).
    for (HeadTileStep step = first_step; step.g < heads; step.advance(range.first, range.last)) {
        const int i = step.i;
        const int t = step.g * (range.last - range.first) + (i - range.first);  // the step's number
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // step t visible to all; everyone is done with the slot reloaded below and with P, dS
        const HeadTileStep ahead = step.after(kStages - 1, range.first, range.last);
        if (ahead.g < heads) load_qdo(t + kStages - 1, ahead);
        ptx::cp_async_commit();
        const bool masked = i < full_first_s || i >= full_last_s;
        const unsigned q_slot = stage_smem + (t % kStages) * kStageBytes;
        const unsigned do_slot = q_slot + QTile::kBytes;
        const float* lse_s = reinterpret_cast<const float*>(stage_ptr + (t % kStages) * kStageBytes + 2 * QTile::kBytes);
        const float* delta_s = lse_s + kBlockM;
        const int m0 = i * kBlockM;

        // Dropout's keep bits of this step (dropout.cuh), drawn before S and dP are live; one
        // Philox chain at a time past d128 (two spilled 164-336 bytes beside dK and dV at d256).
        tc::DropBits<kSM, kSN, kHeadDim <= 128 ? 2 : 1> keep;
        const bool drops = kDropout && f.dropout_threshold;
        if (drops) keep.draw(Dropout(f, ptx::block_index_x() * heads + step.g), m0 + s_row, n0 + s_col, lane);

        // S = Q_i K_j^T, dP = dO_i V_j^T  (kSRows queries x kSCols keys per warp), in one loop:
        // each k-step has 2 x kSM x kSN independent MMAs in flight. Unrolled by 2, not fully:
        // fully unrolled, ptxas hoists every step's fragment loads ahead of the MMAs and spills.
        float s[kSM][kSN][4], dp[kSM][kSN][4];
        if (bias_in_s) {
            const float inv_scale = 1.f / static_cast<float>(f.scale);
            if constexpr (kStagePlanes)
                tc::bias_into_scores(f, PlaneStage::planes(stage_ptr + (t % kStages) * kStageBytes + kPlanesAt, f, m0, n0),
                                     inv_scale, s, m0 + s_row, n0 + s_col, lane);
            else
                tc::bias_into_scores(f, ScoreMod<float>::row_planes(f, ptx::block_index_x() * heads + step.g), inv_scale, s,
                                     m0 + s_row, n0 + s_col, lane);
        } else {
            tc::zero(s);
        }
        tc::zero(dp);
#pragma unroll 2
        for (int kk = 0; kk < kKStepsD; ++kk) {
            typename Arith::AFragment aq[kSM], ado[kSM];
#pragma unroll
            for (int mt = 0; mt < kSM; ++mt) {
                tc::load_a(q_slot + q_a_lane + QTile::offset(mt * 16, kk * 2), aq[mt]);
                tc::load_a(do_slot + q_a_lane + QTile::offset(mt * 16, kk * 2), ado[mt]);
            }
            tc::mma_k16<Element, KVTile, false>(s, aq, k_smem + kv_bn_lane, s_col, kk * 2);
            tc::mma_k16<Element, KVTile, false>(dp, ado, v_smem + kv_bn_lane, s_col, kk * 2);
        }
        // Dropout: dP o Z * scale here, so that dS = P o (Z o dP / q - delta) below whichever path
        // computes it; P o Z * scale for dV before P is stored.
        if (drops) keep.apply(dp, static_cast<float>(f.dropout_scale));

        // P = exp2(S * scale_log2 - lse_i * log2 e): one FFMA and one ex2 per element (tc::lse_log2:
        // a row that sees no key gets P = 0 exactly). With score modifiers (the slope is head
        // g's): P = exp2(x - lse_i * log2 e) of the modified score x in log2 units,
        // and dP becomes (dP - delta_i) o dx / d(scale S) here.
        bool modified = false;
        if constexpr (kScoreMods) {
            // Built at every step (kept through the loop, its registers spill at d32 and d224).
            const int bh = ptx::block_index_x() * heads + step.g;
            ScoreMod<float, kFastTanh<Element>> mod(f, bh, static_cast<float>(f.scale), 1.4426950408889634f, mask.diag);
            mod.bias_in_scores = bias_in_s;
            const BiasGrad<float, kDbiasFromDs> dbias(p, bh);
            float lse2[2 * kSM], delta[2 * kSM];
#pragma unroll
            for (int r = 0; r < 2 * kSM; ++r) {
                lse2[r] = tc::lse_log2(lse_s[s_row + tc::slot_row(r, lane)]);
                delta[r] = delta_s[s_row + tc::slot_row(r, lane)];
            }
            // The bias and mask from this step's staged tiles where the Variant stages them.
            auto p_ds = [&](const auto& row_scores) {
                const auto score = tc::lane_scores(row_scores, m0 + s_row, n0 + s_col, lane);
                tc::for_each(s, dp, m0 + s_row, n0 + s_col, lane, [&](float& x, float& y, int r, int row, int key) {
                    float grad;
                    x = ptx::ex2(score.exponent(score(x, row, key, grad), lse2[r]));
                    y -= delta[r];
                    if ((score.capped || !kDbiasFromDs) && dbias.wanted())  // (else stored from dS below)
                        dbias.store(row, key, x * y, masked && !mask.visible(row, key));
                    if (score.capped) y *= grad;
                });
            };
            if constexpr (kStagePlanes)
                modified = mod.template dispatch<ModBodies::kByCap>(p_ds, PlaneStage::planes(stage_ptr + (t % kStages) * kStageBytes + kPlanesAt, f, m0, n0));
            else
                modified = mod.template dispatch<ModBodies::kByCap>(p_ds);
        }
        if (!modified) {
#pragma unroll
            for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float lse2 = tc::lse_log2(lse_s[s_row + mt * 16 + lane / 4 + 8 * h]);
#pragma unroll
                    for (int nt = 0; nt < kSN; ++nt)
#pragma unroll
                        for (int e = 2 * h; e < 2 * h + 2; ++e) s[mt][nt][e] = ptx::ex2(fmaf(s[mt][nt][e], scale_log2, -lse2));
                }
        }
        // Hidden (query, key) pairs and rows past Lq: P = 0. Masked tiles only, in their own loop,
        // so that the unmasked tiles' loop above carries no index arithmetic.
        if (masked) tc::apply_mask(mask, s, m0 + s_row, n0 + s_col, lane, 0.f, at.seqlen_q);
        // dS = P o (dP - delta_i), in place of dP (already dP - delta_i, scaled, when modified).
#pragma unroll
        for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float delta = modified ? 0.f : delta_s[s_row + mt * 16 + lane / 4 + 8 * h];
#pragma unroll
                for (int nt = 0; nt < kSN; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) dp[mt][nt][e] = s[mt][nt][e] * (dp[mt][nt][e] - delta);
            }
        // Without softcap the bias's gradient is dS itself (hidden pairs hold P = 0), whichever
        // path ran: stored from here, two keys at a time. (With a cap the bodies stored it, before
        // the cap's factor.)
        if (kScoreMods && kDbiasFromDs && !capped) {
            const BiasGrad<float, kDbiasFromDs> dbias(p, ptx::block_index_x() * heads + step.g);
            if (dbias.wanted())
                tc::for_each_pair(dp, m0 + s_row, n0 + s_col, lane,
                                  [&](float a, float b, int row, int key) { dbias.store_pair(row, key, a, b); });
        }
        if (drops) keep.apply(s, static_cast<float>(f.dropout_scale));
        store_s_tile(s, p_smem);
        store_s_tile(dp, ds_smem);
        __syncthreads();  // P, dS visible to all

        // dV_j += P^T dO_i,  dK_j += dS^T Q_i
        t_times(dv, p_smem, do_slot);
        t_times(dk, ds_smem, q_slot);

        if (with_dq) {
            // dQ_i += dS K_j: dS as A (plain ldmatrix), K_j as B through ldmatrix.trans (k = keys).
            // Units of (kDqRows queries x kDqCols columns) over the warps, added to dq_accum with
            // fp32 atomics (unscaled: bwd_dq_convert multiplies by scale), into head g's rows; or,
            // with dq_direct (this block holds every key of its rows), stored times scale into dq.
            // One offset for either route: the bases stay in the parameter space.
            using DqOut = typename tc::StoredAs<Element>::type;
            const long long dq_rows = dq_rows_s + (kStoresDq && p.dq_direct ? HeadStep(p, step.g).dq : HeadStep(p, step.g).dq_accum);
#pragma unroll 1
            for (int u = warp; u < kDqUnits; u += kWarps) {
                const int row0 = (u % (kBlockM / kDqRows)) * kDqRows, chunk = u / (kBlockM / kDqRows);
                float acc[kDqM][kDqN][4];
                tc::zero(acc);
#pragma unroll
                for (int kk = 0; kk < kBlockN / Arith::kK; ++kk) {
                    if constexpr (kTf32) {
                        typename Arith::AFragment a[kDqM];
#pragma unroll
                        for (int mt = 0; mt < kDqM; ++mt) tc::a_k8_cols<PTile>(a[mt], ds_smem + ds_cols_lane, row0 + mt * 16, kk * 2);
                        tc::mma_k8_rows<KVTile>(acc, a, k_smem + kv_rows_lane, kk * 8, chunk * (kDqCols / 4));
                    } else {
                        unsigned a[kDqM][4];
#pragma unroll
                        for (int mt = 0; mt < kDqM; ++mt)
                            ptx::ldmatrix_x4(ds_smem + ds_a_lane + PTile::offset(row0 + mt * 16, kk * 2), a[mt]);
                        tc::mma_k16<Element, KVTile, true>(acc, a, k_smem + k_bt_lane, kk * 16, chunk * (kDqCols / 8));
                    }
                }
#pragma unroll
                for (int mt = 0; mt < kDqM; ++mt) {
                    if (kStoresDq && p.dq_direct)
                        tc::store_rows<DqOut, kDqCols>(static_cast<DqOut*>(p.dq) + dq_rows, p.dq_row_stride, acc[mt],
                                                       m0 + row0 + mt * 16, at.seqlen_q, chunk * kDqCols, f.head_dim, lane,
                                                       static_cast<float>(f.scale));
                    else
                        tc::add_rows<kDqCols>(static_cast<float*>(p.dq_accum) + dq_rows, acc[mt], m0 + row0 + mt * 16,
                                              at.seqlen_q, chunk * kDqCols, f.head_dim, lane);
                }
            }
        }
    }

    // ---- Epilogue: the group's dK_j * scale and dV_j in the input type, staged through the K_j /
    // V_j tiles (after a barrier: other warps may still read them), then stored by the whole
    // block as 16-byte chunks where aligned. Key tiles that no query sees store zeros. A slice of
    // a split GQA group (BwdParams::dkv_adds) adds them into the group's fp32 sums (contiguous rows
    // of D and Dv floats) from the registers instead.
    ptx::cp_async_wait<0>();
    const float scale = static_cast<float>(f.scale);
    if (p.dkv_adds) {
        const BwdBatchIndex out_at(p, ptx::block_index_x() * p.heads_per_block);
        float* const dk_sums = static_cast<float*>(p.dk) + out_at.dk + (long long)n0 * f.head_dim;
        float* const dv_sums = static_cast<float*>(p.dv) + out_at.dv + (long long)n0 * f.head_dim_v;
#pragma unroll
        for (int mt = 0; mt < kKVM; ++mt) {
            tc::add_rows<kKVCols>(dk_sums, dk[mt], kv_row + mt * 16, out_at.seqlen_k - n0, kv_col, f.head_dim, lane, scale);
            tc::add_rows<kKVCols>(dv_sums, dv[mt], kv_row + mt * 16, out_at.seqlen_k - n0, kv_col, f.head_dim_v, lane);
        }
        return;
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kKVM; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int key = kv_row + mt * 16 + lane / 4 + 8 * h;
#pragma unroll
            for (int nt = 0; nt < kKVN; ++nt) {
                const float dk0 = dk[mt][nt][2 * h] * scale, dk1 = dk[mt][nt][2 * h + 1] * scale;
                if constexpr (kTf32) {  // columns kv_col + 8 nt + 2t, +1
                    const unsigned off = KVTile::offset(key, kv_col / 4 + 2 * nt) + 8 * (lane % 4);
                    ptx::st_shared_v2(k_smem + off, __float_as_uint(dk0), __float_as_uint(dk1));
                    ptx::st_shared_v2(v_smem + off, __float_as_uint(dv[mt][nt][2 * h]), __float_as_uint(dv[mt][nt][2 * h + 1]));
                } else {
                    const unsigned off = KVTile::offset(key, kv_col / 8 + nt) + 4 * (lane % 4);
                    ptx::st_shared_b32(k_smem + off, ptx::pack2<Element>(dk0, dk1));
                    ptx::st_shared_b32(v_smem + off, ptx::pack2<Element>(dv[mt][nt][2 * h], dv[mt][nt][2 * h + 1]));
                }
            }
        }
    __syncthreads();
    const BwdBatchIndex out_at(p, ptx::block_index_x() * p.heads_per_block);  // recomputed: not held through the loop
    using Out = unsigned short*;
    tc::store_tile<kBlockN, kWidth, kThreads>(k_smem, reinterpret_cast<Out>(static_cast<Storage*>(p.dk) + out_at.dk + n0 * p.dk_row_stride),
                                              p.dk_row_stride * kUnits, out_at.seqlen_k - n0, f.head_dim * kUnits, tid);
    tc::store_tile<kBlockN, kWidth, kThreads>(v_smem, reinterpret_cast<Out>(static_cast<Storage*>(p.dv) + out_at.dv + n0 * p.dv_row_stride),
                                              p.dv_row_stride * kUnits, out_at.seqlen_k - n0, f.head_dim_v * kUnits, tid);
}

}  // namespace cuflash
