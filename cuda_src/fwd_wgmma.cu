// Forward attention for float16 / bfloat16 on Hopper (sm_90a), and float32 under
// precision="highest" in 3xTF32 (Element tc::tf32x3, tile_tc.cuh's Arith): FlashAttention-2's
// algorithm (fwd_tc.cu) on warpgroup MMAs.
//
//   O = softmax(Q K^T * scale) V,   lse = log(sum_j exp(Q K_j^T * scale))   (per query row)
//
// A block of kBlockM / 64 warpgroups owns kBlockM query rows of one (batch..., head); warpgroup g
// owns rows [64g, 64g + 64), one wgmma M (float32 at d128: and one more that only copies and
// splits K and V, kSplitter below). Q's tile is read once; K and V stream through shared
// memory in tiles of kBlockN keys, each through its own ring of kStages slots (cp.async), in the
// 128-byte swizzled layout wgmma reads directly (tc::Sw128Tile). Per key tile j and warpgroup:
//
//   S    = Q_g K_j^T                       wgmma, A = Q_g (shared; float32 to d64: registers),
//                                          B = K_j (shared, K-major), fp32
//   online softmax: m_i, l_i, P            (softmax_tc.cuh: a warp's 16 rows are its m16 tile)
//   acc  = alpha * acc + P V_j             wgmma, A = P (registers), B = V_j (shared, MN-major;
//                                          float32: K-major V_j^T, below)
//   O = acc / l_i,  lse = m_i + log l_i    (once, at the end)
//
// The steps are software-pipelined one tile deep (the loop's comment): the softmax of tile j+1
// runs while the tensor cores compute P_j V_j. The dropout form (kDropout: the kScoreMods form
// with dropout.cuh's keep mask) drops P_{j+1} there too, after its row sums.
// The accumulator layout of wgmma is, warp by warp, that of mma.sync m16n8: the softmax, the
// masking and the P packing are fwd_tc's, with one m16 tile per warp.
// D and Dv are zero-padded to kHeadDim by the loads; keys >= Lk and queries >= Lq are zero rows.
// float32 (kTf32) multiplies in 3xTF32: every operand in two TF32 halves (tile_tc.cuh's tf32x3),
// Q, K and V^T as hi and lo tiles side by side (twice the shared memory), P and (from the
// prologue's end on, up to d64) Q_g as two fragments each.
// TF32 reads K-major operands only, so V_j cannot be read as it is stored: it is copied into a
// staging tile two steps ahead (tc::KeysMajorLoader, with K's copies), and the step before the
// one that reads it, once its own MMAs are issued and its softmax done (kSplitter: meanwhile, by
// the copying warpgroup), stores it transposed (V_j^T: keys along the rows) into one of two slots
// that take the place of the V ring; the next step's barrier publishes it. S's three products accumulate in the MMA, small ones first
// (tc::wgmma_x3_products), and so do each tile's P V, in a fresh accumulator that is added to acc by
// FADD (the tensor cores truncate as they accumulate: over a whole row in place, P V's error
// grew with its length, 10x float32's; tile_tc.cuh). Score modifiers (the kScoreMods form) act on
// S once its products are summed, in float32 as the FFMA kernels do (softcap with the library's
// tanh: score_mod.cuh's kFastTanh); dropout is left to those kernels.
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
// Q, kStages K tiles and kStages V tiles (float32: two V^T slots), swizzled rows without
// padding, of kUnits 16-bit units an element, each twice under 3xTF32 (hi and lo), plus float32's
// two V staging tiles (one tile's floats each), plus 1024 bytes to align the swizzle atoms.
template <typename Element>
constexpr int fwd_wgmma_v_slots(int stages) {
    return tc::Arith<Element>::kProducts == 3 ? 2 : stages;
}
template <typename Element>
constexpr int fwd_wgmma_v_staging_tiles() {
    return tc::Arith<Element>::kProducts == 3 ? 2 : 0;
}
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr unsigned fwd_wgmma_smem_bytes() {
    using Arith = tc::Arith<Element>;
    return 1024 + 2 * Arith::kUnits * kHeadDim *
                      ((Arith::kProducts == 3 ? 2 : 1) * (kBlockM + (kStages + fwd_wgmma_v_slots<Element>(kStages)) * kBlockN) +
                       fwd_wgmma_v_staging_tiles<Element>() * kBlockN);
}

// Two blocks per SM where their shared memory fits (one block's softmax, barriers, prologue and
// epilogue hide behind the other's MMAs); with 8 warps ptxas then keeps the kernel within 128
// registers. sm_90: 228 KB of shared memory per SM, 1 KB of it reserved per block. The score
// modifiers' Variants (a bias's and a mask's reads on top of softcap's and ALiBi's arithmetic)
// do not fit 128 registers: one block per SM (d64: 176 registers instead of 68 bytes spilled).
template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kStages>
constexpr int fwd_wgmma_min_blocks() {
    return 2 * (fwd_wgmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>() + 1024) <= 233472 ? 2 : 1;
}

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps, int kStages, bool kHasWindow,
          bool kScoreMods = false, bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32,
                                  (kScoreMods || tc::Arith<Element>::kUnits == 2 ? 1 : fwd_wgmma_min_blocks<Element, kHeadDim, kBlockM, kBlockN, kStages>()))
    fwd_wgmma(const FwdParams p) {
    using Arith = tc::Arith<Element>;
    using Storage = typename Arith::Storage;
    using Mma = typename Arith::Mma;                  // one MMA's operand type
    constexpr bool kTf32 = Arith::kUnits == 2;        // float32, in 3xTF32
    constexpr int kHalves = kTf32 ? 2 : 1;            // tiles per operand: hi (and lo)
    constexpr int kThreads = kWarps * 32;
    constexpr int kWidth = kHeadDim * Arith::kUnits;  // a row's 16-bit units in shared memory
    constexpr int kKStepsQK = kWidth / 16;            // k16 (TF32: k8) steps of Q K^T
    constexpr int kKStepsPV = kBlockN / Arith::kK;    // k steps of P V
    // float32: Q_g's TF32 fragments held in registers (S's MMAs then read only K from shared
    // memory: its SS form stalled on shared memory's throughput; NOTES, sessions 49-50), up to
    // d64: d128's 128 registers do not fit beside acc and P V's fresh tile, so S reads Q_g's
    // tiles there (one warpgroup of query rows a block: Q, K and V^T in hi and lo fill 225 KB).
    constexpr bool kQFragments = kTf32 && kHeadDim <= 64;
    // float32 at d128 (kSplitter: one warpgroup of query rows, a second one beside it): the second
    // warpgroup does the loop's copies, K's splits and V's transposes, which the first did between
    // its MMAs and softmax (two thirds of its instructions at d128), in the same steps and slots
    // (the ring's comment), so the first only multiplies and runs the softmax.
    constexpr bool kSplitter = kTf32 && kWarps == 4 * (kBlockM / 64) + 4;
    constexpr int kMmaWarps = kSplitter ? kWarps - 4 : kWarps;  // the warps that own query rows
    constexpr int kCopyThreads = kSplitter ? 128 : kWarps * 32;  // the threads that copy K and V
    static_assert(kBlockM == 64 * (kMmaWarps / 4) && kWarps % 4 == 0, "one warpgroup per 64 query rows");
    static_assert(!kSplitter || kBlockM == 64, "the splitting warpgroup beside one of query rows");
    static_assert(kWidth % 64 == 0 && (kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128 || (kTf32 && kHeadDim == 96)) &&
                      (kBlockN == 64 || kBlockN == 128 || (kTf32 && kBlockN == 32)),
                  "whole 128-byte panels; wgmma N of 32, 64 or 128 (32 keys: TF32's V^T is one panel)");
    static_assert(kStages >= 2, "K_{t+1} (S) and V_t (P V) are read while K_{t+2}, V_{t+1} land");
    static_assert(!kTf32 || kStages <= 3, "V_{t+1}'s staging copies land by step t's end (the ring's comment)");
    constexpr int kVSlots = fwd_wgmma_v_slots<Element>(kStages);  // float32: two V^T slots (below)
    // (One TF32 product ran at 0.6-0.8x fwd_tc's mma.sync, which serves precision="tf32": the
    // transposes and rounding passes outweigh its MMAs; benchmarks/NOTES.md, session 48.)
    static_assert(Arith::kK == 16 || Arith::kProducts == 3, "16-bit, or float32 in 3xTF32");
    static_assert(!kTf32 || !kDropout, "3xTF32 without dropout (tiles.py: FFMA serves it)");

    using QTile = tc::Sw128Tile<kBlockM, kWidth>;
    using KVTile = tc::Sw128Tile<kBlockN, kWidth>;       // one K or V tile
    using VtLoader = tc::KeysMajorLoader<kBlockN, kHeadDim, kCopyThreads>;  // float32: V_t^T
    using OTile = tc::SmemTile<kBlockM, kWidth>;         // O on its way out (padded rows)
    constexpr unsigned kSmemBytes = fwd_wgmma_smem_bytes<Element, kHeadDim, kBlockM, kBlockN, kStages>();
    constexpr int kVStaging = fwd_wgmma_v_staging_tiles<Element>();  // float32: V's staging tiles
    static_assert(kSmemBytes == 1024 + kHalves * (QTile::kBytes + (kStages + kVSlots) * KVTile::kBytes) +
                                    kVStaging * VtLoader::kStagingBytes, "1024: alignment");
    // O leaves through the K/V rings (float32: from Q's tiles on, which the rings follow)
    static_assert(OTile::kBytes <= (kTf32 ? QTile::kBytes : 0) + (kStages + kVSlots) * KVTile::kBytes, "O's staging fits");
    static_assert(!kTf32 || VtLoader::Tile::kBytes == KVTile::kBytes, "a V^T slot takes a V tile's place");

    extern __shared__ __align__(16) unsigned char smem[];
    if (ptx::dynamic_smem_size() < kSmemBytes) __trap();
    // Swizzle atoms start on 1024-byte boundaries (the descriptors' base offset is 0).
    const unsigned q_smem = ptx::smem_addr(smem) + ((1024u - (ptx::smem_addr(smem) & 1023u)) & 1023u);
    const unsigned kv_smem = q_smem + kHalves * QTile::kBytes;  // (Q's lo tile,) the K ring, the V ring (float32: V's staging tiles)
    constexpr unsigned kLo = KVTile::kBytes;  // float32: a K or V^T slot's lo tile, after its hi tile

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // warpgroup; uniform registers: fwd_wgmma_ws.cu says why
    const auto [bh, m_block] = scheduled_block<kHasWindow>(p);  // schedule.cuh
    const int m0 = m_block * kBlockM;
    const int warp_row0 = group * 64 + (warp % 4) * 16;  // this warp's 16 query rows
    // The roles (kSplitter: warpgroup 0 multiplies, warpgroup 1 copies and splits; else every warp
    // both), and a copying thread's index among the copying threads.
    const bool multiplies = !kSplitter || group == 0, copies = !kSplitter || group == 1;
    const int ctid = kSplitter ? tid - 128 : tid;

    BatchIndex at;
    if (!starts_block<Storage, float>(p, bh, m_block, m0, kBlockM, at)) return;  // params.cuh
    const Mask<kHasWindow, kScoreMods> mask(p, at);
    const TileRange range = mask.tiles(m0, kBlockM, kBlockN);

    // ---- K/V pipeline. K and V have separate rings of kStages slots, tile t in slot
    // (t - first) % kStages of each: step t of the loop below reads K_{t+1} (S) and V_t (P V), so
    // once every warp has passed step t-1 the slots of K_t and V_{t-1} are free, and step t refills
    // them with K_{t+kStages} and V_{t+kStages-1}. That keeps 2 * kStages tiles resident where one
    // ring of (K, V) pairs would need three pairs (t-1 refilling, t, t+1), so kStages = 2 leaves
    // room for two d128 blocks of 64 query rows per SM.
    // cp.async groups, committed in order: {Q, K_first}, then {V_{first+s-1}, K_{first+s}} for
    // s = 1 .. kStages-1, then one per loop step, {V_{t+kStages-1}, K_{t+kStages}} (empty groups
    // too). K_{t+1} and V_t are both in group t+1-first: at step t, "at most kStages-2 groups
    // pending" means both have landed.
    // float32 differs in two ways. V goes through two staging tiles into two V^T slots: V_first
    // with group 0, V_{first+1} with group 1, and V_{t+2} with step t's group; step t stores
    // V_{t+1}^T (into the slot of V_{t-1}^T, whose reader P_{t-1} V_{t-1} finished before step t's
    // barrier) from the staging tile its own thread copied into (refilled by step t+1's copies
    // only after that step's barrier). And each K tile is split at the end of the step before the
    // one that reads it, while the tensor cores work: K_{t+2} at step t, into its slot, which held
    // K_{t+2-kStages}, whose reader S finished before step t's barrier. Step t's end waits until
    // at most kStages-2 groups are pending: K_{t+2} (with step t+2-kStages's group) and V_{t+1}
    // (with step t-1's) have landed when kStages <= 3. (benchmarks/NOTES.md's pipeline_sim.py,
    // sessions 49-50, replays this schedule.)
    // Loaders count in 16-bit units: kUnits per element.
    using Units = const unsigned short*;
    constexpr int kUnits = Arith::kUnits;
    const tc::TileLoader<kBlockM, kWidth, kThreads, QTile> q_loader(
        reinterpret_cast<Units>(static_cast<const Storage*>(p.q) + at.q), p.q_row_stride * kUnits, p.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kCopyThreads, KVTile> k_loader(
        reinterpret_cast<Units>(static_cast<const Storage*>(p.k) + at.k), p.k_row_stride * kUnits, p.head_dim * kUnits);
    const tc::TileLoader<kBlockN, kWidth, kCopyThreads, KVTile> v_loader(
        reinterpret_cast<Units>(static_cast<const Storage*>(p.v) + at.v), p.v_row_stride * kUnits, p.head_dim_v * kUnits);
    const VtLoader vt_loader(static_cast<const float*>(p.v) + at.v, p.v_row_stride, p.head_dim_v);
    // 16-byte aligned rows (the plan's promise); v_loader's check covers V for float32 too.
    if (!(q_loader.aligned(at.seqlen_q) && k_loader.aligned(at.seqlen_k) && v_loader.aligned(at.seqlen_k))) __trap();
    auto k_slot = [&](int t) { return kv_smem + ((t - range.first) % kStages) * kHalves * KVTile::kBytes; };
    auto v_slot = [&](int t) {  // float32: V_t^T's slot
        return kv_smem + (kStages + (t - range.first) % kVSlots) * kHalves * KVTile::kBytes;
    };
    auto v_staging = [&](int t) {  // float32: V_t's staging tile
        return kv_smem + (kStages + kVSlots) * kHalves * KVTile::kBytes + ((t - range.first) % 2) * VtLoader::kStagingBytes;
    };
    auto load_k = [&](int t) {
        if (t < range.last) k_loader.load(k_slot(t), t * kBlockN, at.seqlen_k, ctid);
    };
    auto load_v = [&](int t) {
        if (!kTf32 && t < range.last) v_loader.load(v_slot(t), t * kBlockN, at.seqlen_k, ctid);
    };
    auto copy_v = [&](int t) {  // float32: into its staging tile
        if (kTf32 && t < range.last) vt_loader.copy(v_staging(t), t * kBlockN, at.seqlen_k, ctid);
    };
    // float32 operands are split into TF32 hi and lo halves (tc::split_tf32: rounded to nearest,
    // as fwd_tc's fragments; wgmma itself would drop the low 13 bits) where they land: Q and K
    // by the thread that copied them, after its copies landed and before the barrier that
    // publishes them, hi in place, lo into the lo tile. K_t: once the groups up to its own have
    // landed (the caller's wait).
    auto split_k = [&](int t) {
        if constexpr (kTf32) {
            if (t < range.last) k_loader.split(k_slot(t), k_slot(t) + kLo, ctid);
        }
    };
    // float32: V_t from its staging tile (once the caller's wait says this thread's copies of it
    // landed; the slot's last reader finished before the barrier behind), transposed into its
    // slot, split, fenced for the tensor cores; published by the next barrier.
    auto store_vt = [&](int t) {
        if constexpr (kTf32) {
            if (t >= range.last) return;
            const unsigned slot = v_slot(t);
            vt_loader.store(v_staging(t), ctid, [&](unsigned offset, float x) {
                unsigned hi, lo;
                tc::split_tf32(x, hi, lo);
                ptx::st_shared_b32(slot + offset, hi);
                ptx::st_shared_b32(slot + kLo + offset, lo);
            });
            ptx::fence_proxy_async_shared();
        }
    };
    q_loader.load(q_smem, m0, at.seqlen_q, tid);
    if (copies) {
        load_k(range.first);
        copy_v(range.first);
    }
    ptx::cp_async_commit();
#pragma unroll
    for (int s = 1; s < kStages; ++s) {
        if (copies) {
            load_v(range.first + s - 1);
            load_k(range.first + s);
            if (s == 1) copy_v(range.first + 1);
        }
        ptx::cp_async_commit();
    }

    // softmax(S * scale) with scale < 0 is softmax((-S) * |scale|): Q is negated in shared memory
    // (exact in f16/bf16) so that the softmax sees c = |scale| * log2(e) > 0 (fwd_tc.cu).
    const float scale_log2 = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
    if constexpr (kTf32) {  // Q split (and negated), K_first split, V_first^T stored
        ptx::cp_async_wait<kStages - 1>();  // this thread's copies of group 0 have landed
        q_loader.split(q_smem, q_smem + QTile::kBytes, tid, p.scale_log2 < 0.f ? Arith::kSignBits : 0u);
        if (copies) {
            split_k(range.first);
            store_vt(range.first);  // all three published by the prologue's barrier
        }
    } else if (p.scale_log2 < 0.f) {
        ptx::cp_async_wait<kStages - 1>();  // this thread's Q copies (group 0) have landed
        q_loader.template negate<Arith::kSignBits>(q_smem, tid);  // published by the first barrier below
    }

    // Operand forms (descriptors: tc::Sw128Tile): Q_g and K_t K-major, V_t MN-major (float32: V_t^T
    // K-major).
    const unsigned q_group = q_smem + group * 64 * 128;  // this warpgroup's 64 rows of Q
    // kQFragments: Q_g's TF32 fragments, hi and lo, in registers for the whole loop (after the
    // prologue's barrier).
    unsigned q_hi[kQFragments ? kKStepsQK : 1][4], q_lo[kQFragments ? kKStepsQK : 1][4];
    auto load_q_fragments = [&] {
        if constexpr (kQFragments) {
            tc::a_k8_from<kKStepsQK, QTile>(q_hi, q_smem, warp_row0, lane);
            tc::a_k8_from<kKStepsQK, QTile>(q_lo, q_smem + QTile::kBytes, warp_row0, lane);
        }
    };

    // S = Q_g K_t^T, issued (the first k-step overwrites S; float32: onto start_scores's zeros);
    // the caller commits and waits.
    auto start_scores = [&](float (&s)[kBlockN / 8][4]) {
        if constexpr (kTf32) tc::zero(s);
    };
    auto issue_scores = [&](int t, float (&s)[kBlockN / 8][4]) {
        if constexpr (kQFragments)
            tc::wgmma_rs_bt_x3<kKStepsQK, KVTile>(s, q_hi, q_lo, k_slot(t), k_slot(t) + kLo);
        else if constexpr (kTf32)
            tc::wgmma_ss_bt_x3<kKStepsQK, QTile, KVTile>(s, q_group, q_group + QTile::kBytes, k_slot(t), k_slot(t) + kLo);
        else
            tc::wgmma_a_bt<Mma, kKStepsQK, QTile, KVTile>(s, q_group, k_slot(t));
    };
    // Score modifiers (score_mod.cuh); Q was negated for a negative scale: |scale| here.
    // Softcap and ALiBi turn the scores into log2 units and return the softmax's multiplier 1;
    // otherwise the scale stays folded into the softmax's FFMA.
    constexpr float kLog2e = 1.4426950408889634f;
    const ScoreMod<float, kFastTanh<Element>> mod(p, bh, fabsf(static_cast<float>(p.scale)), kLog2e, mask.diag);
    auto modify = [&](auto peeled, int t, float (&s)[1][kBlockN / 8][4]) {  // (peeled: the first tile's)
        return tc::modify_forward_tile<kScoreMods, decltype(peeled)::value>(mod, s, m0 + warp_row0, t * kBlockN, lane,
                                                                            scale_log2);
    };
    // -inf where the key is hidden, on tiles that cross an edge of the visible region.
    auto mask_scores = [&](int t, float (&s)[1][kBlockN / 8][4]) {
        const bool masked = t < range.full_first || t >= range.full_last;
        if (!masked) return;
        tc::apply_mask(mask, s, m0 + warp_row0, t * kBlockN, lane, tc::neg_inf());
    };
    // Dropout on P_t (after update_stats: l_i sums the undropped P), while P_{t-1} V_{t-1} runs.
    // The row index is recomputed rather than held through the loop.
    auto drop = [&](int t, float (&s)[1][kBlockN / 8][4]) {
        if constexpr (kDropout)
            tc::drop_forward(p, scheduled_block<kHasWindow>(p).bh, s, m0 + warp_row0, t * kBlockN, lane);
    };

    float acc[1][kHeadDim / 8][4];
    tc::zero(acc);
    tc::OnlineSoftmax<1> softmax;
    if (p.sinks != nullptr) softmax.start_from(mod.sink(p, bh, kLog2e));  // any Variant
    float s[1][kBlockN / 8][4];    // scores, then P, of the tile ahead
    // P of the current tile as the A operand of P V: n8 tiles 2kk, 2kk+1 of S packed to 16 bits
    // are P's k16 step kk; float32: n8 tile kk, split, is its k8 step kk (a_k8_of: V^T's key
    // order), the hi halves in p_frag, the lo ones in p_lo.
    unsigned p_frag[kKStepsPV][4], p_lo[kTf32 ? kKStepsPV : 1][4];
    auto pack_p = [&] {
#pragma unroll
        for (int kk = 0; kk < kKStepsPV; ++kk) {
            if constexpr (kTf32) {
                typename Arith::AFragment a[1];
                tc::a_k8_of(a, s, kk);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    p_frag[kk][r] = a[0].hi[r];
                    p_lo[kk][r] = a[0].lo[r];
                }
            } else {
                tc::pack_a<Element>(s[0][2 * kk], s[0][2 * kk + 1], p_frag[kk]);
            }
        }
    };
    // acc += P_t V_t, issued (the caller commits and waits); float32: into pv_tile, zeroed before
    // the step's wgmma_fence, added to acc once landed (land_pv).
    float pv_tile[1][kTf32 ? kHeadDim / 8 : 1][4];
    auto issue_pv = [&](int t) {
        using Wgmma = ptx::Wgmma<kHeadDim>;
        const unsigned vt = v_slot(t);
        if constexpr (kTf32) {
            tc::wgmma_rs_bt_x3<kKStepsPV, typename VtLoader::Tile>(pv_tile[0], p_frag, p_lo, vt, vt + kLo);
        } else {
#pragma unroll
            for (int kk = 0; kk < kKStepsPV; ++kk)
                Wgmma::template rs<Mma, 1>(acc[0], p_frag[kk], KVTile::mn_major(vt + kk * 2048));
        }
    };
    auto start_pv = [&] {
        if constexpr (kTf32) tc::zero(pv_tile);
    };
    // After the wait for P_t V_t: its registers pinned (and float32's added into acc by FADD).
    auto land_pv = [&] {
        if constexpr (kTf32) {
            ptx::wgmma_pin(pv_tile[0]);
#pragma unroll
            for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[0][nt][e] += pv_tile[0][nt][e];
        } else {
            ptx::wgmma_pin(acc[0]);
        }
    };

    // Software pipeline over key tiles t in [range.first, range.last) (FlashAttention-3's
    // intra-warpgroup overlap): while the tensor cores run acc += P_t V_t, the warpgroup computes
    // the softmax of S_{t+1}, whose wgmma was issued just before. acc is rescaled for tile t+1
    // only once P_t V_t has landed:
    //   S_{t+1} = Q K_{t+1}^T          issued first
    //   acc    += P_t V_t              issued second
    //   wait for S_{t+1}; m_i, l_i, P_{t+1} (softmax.update_stats)
    //   wait for P_t V_t; acc *= alpha_{t+1} when the max moved
    // K_{t+1} and V_t must be resident during step t (the rings above); with kStages = 2 the
    // copies issued at step t have one step to land. (float32: S two tiles ahead, issued after
    // P_t V_t with the softmax of S_{t+1} beside both, ran 0.96-0.98x of this; NOTES, session 50.)
    if (range.first < range.last) {
        ptx::cp_async_wait<kStages - 1>();  // group 0: Q and K_first
        ptx::fence_proxy_async_shared();      // this thread's copies (and negated Q), visible to the tensor cores
        __syncthreads();
        if (multiplies) {
            load_q_fragments();
            start_scores(s[0]);
            ptx::wgmma_fence();
            issue_scores(range.first, s[0]);
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();
            ptx::wgmma_pin(s[0]);
            const float c = modify(Flag<true>(), range.first, s);
            mask_scores(range.first, s);
            float alpha[1][2];
            softmax.update_stats(s, c, alpha);  // acc is still 0: nothing to rescale
            drop(range.first, s);
            pack_p();
        }
        if (kTf32 && copies) {
            ptx::cp_async_wait<kStages - 2>();  // K_{first+1} (group 1) has landed
            split_k(range.first + 1);           // published by step first's barrier
        }
    }
    // Every step but the last has a next tile (one straight-line body: ptxas serializes the
    // wgmma when the steps branch around them).
    for (int t = range.first; t + 1 < range.last; ++t) {
        ptx::cp_async_wait<kStages - 2>();  // K_{t+1}, V_t have landed (this thread's copies)
        ptx::fence_proxy_async_shared();    // (float32: waited for at the step before)
        __syncthreads();  // visible to all; everyone is done with K_t and V_{t-1}
        if (copies) {
            load_v(t + kStages - 1);
            load_k(t + kStages);
            copy_v(t + 2);
        }
        ptx::cp_async_commit();

        float alpha[1][2];
        bool moved = false;
        if (multiplies) {
            start_pv();
            start_scores(s[0]);
            ptx::wgmma_fence();  // p_frag, acc (float32: and s) were written by ordinary instructions
            issue_scores(t + 1, s[0]);
            ptx::wgmma_commit();
            issue_pv(t);
            ptx::wgmma_commit();

            ptx::wgmma_wait<1>();  // S_{t+1}
            ptx::wgmma_pin(s[0]);
            const float c = modify(Flag<false>(), t + 1, s);
            mask_scores(t + 1, s);
            moved = softmax.update_stats(s, c, alpha);
            drop(t + 1, s);
        }
        if (kTf32 && copies) {
            ptx::cp_async_wait<1>();  // V_{t+1} (step t-1's group)
            store_vt(t + 1);          // both published by step t+1's barrier
            // K_{t+2} (step t+2-kStages's group: kStages = 2, this step's, whose copies landed
            // while V_{t+1}^T was stored)
            if constexpr (kStages != 3) ptx::cp_async_wait<kStages - 2>();
            split_k(t + 2);
        }
        if (multiplies) {
            ptx::wgmma_wait<0>();  // P_t V_t
            land_pv();
            if (moved) softmax.rescale(acc, alpha);
            pack_p();
        }
    }
    if (range.first < range.last) {
        ptx::cp_async_wait<kStages - 2>();  // V_last, one group behind K_last
        ptx::fence_proxy_async_shared();
        __syncthreads();
        if (multiplies) {
            start_pv();
            ptx::wgmma_fence();
            issue_pv(range.last - 1);
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();
            land_pv();
        }
    }

    // ---- Epilogue: O = acc / l_i in the output type, staged through shared memory as padded
    // rows (after a barrier: other warps may still read K/V), stored by the whole block as
    // 16-byte chunks where aligned.
    const unsigned o_smem = kTf32 ? q_smem : kv_smem;
    float inv_l[1][2], lse[1][2];
    softmax.finish(inv_l, lse);
    const BatchIndex out_at(p, scheduled_block<kHasWindow>(p).bh);  // recomputed: not held through the loop
    ptx::cp_async_wait<0>();
    __syncthreads();
    if (multiplies) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + lane / 4 + 8 * h;
#pragma unroll
            for (int nt = 0; nt < kHeadDim / 8; ++nt)
                tc::store_pair<Element, OTile>(o_smem, row, nt, lane, acc[0][nt][2 * h] * inv_l[0][h],
                                               acc[0][nt][2 * h + 1] * inv_l[0][h]);
            if (lane % 4 == 0 && m0 + row < out_at.seqlen_q)
                static_cast<float*>(p.lse)[out_at.lse + m0 + row] = lse[0][h];
        }
    }
    __syncthreads();
    tc::store_tile<kBlockM, kWidth, kThreads>(
        o_smem, reinterpret_cast<unsigned short*>(static_cast<Storage*>(p.o) + out_at.o + m0 * p.o_row_stride),
        p.o_row_stride * kUnits, out_at.seqlen_q - m0, p.head_dim_v * kUnits, tid);
}

}  // namespace cuflash
