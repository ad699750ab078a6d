// Attention dropout's keep mask (cuflash/_dropout.py holds the definition and the CPU reference).
//
// The probability of attention row bh, query i, key j is kept iff its 16-bit draw is at least
// FwdParams::dropout_threshold; a kept one is multiplied by dropout_scale (1 / the keep
// probability). The draws of eight consecutive keys j = 8g .. 8g + 7 of one query come from one
// Philox4x32-10 call, counter (g, i, bh low, bh high), key dropout_seed: key j takes the 16-bit
// half j % 2 (low first) of word (j % 8) / 2. A pure function of (seed, bh, i, j): every kernel,
// whatever its tiling and register layout, and the CPU backend drop the same probabilities.
//
// The forward drops P after its row sums (l_i, hence lse, stay undropped) and before P V; the
// backward drops dP = dO V^T before dS = P o (dP - delta), and P before dV = P^T dO. A threshold
// of 0 keeps everything: the kernels skip the step then (one uniform branch per tile). Only the
// dropout Variants compile it (template flag kDropout: the kScoreMods form with dropout, one
// Variant per bucket, at a tile whose registers allow it: tiles.py's dropout_tile), so no other
// Variant's registers move. The fragments' keep bits: tile_tc.cuh's DropBits (and
// DropBitsTransposed for Hopper's dK/dV kernels, whose scores are S^T) and simt_tile.cuh's.
#pragma once
#include "params.cuh"

namespace cuflash {

// Philox4x32-10 (Salmon et al., SC'11): ten rounds of two 32 x 32 -> 64-bit products, the key
// bumped by the Weyl constants between rounds.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}

// One attention row's keep mask.
struct Dropout {
    unsigned threshold;  // 0: nothing is dropped
    unsigned seed_lo, seed_hi, row_lo, row_hi;

    __device__ __forceinline__ Dropout(const FwdParams& p, long long bh)
        : threshold(p.dropout_threshold),
          seed_lo(static_cast<unsigned>(p.dropout_seed)), seed_hi(static_cast<unsigned>(p.dropout_seed >> 32)),
          row_lo(static_cast<unsigned>(bh)), row_hi(static_cast<unsigned>(static_cast<unsigned long long>(bh) >> 32)) {}

    // The draws of query i's keys 8g .. 8g + 7 (g = key / 8): four words, two draws each.
    __device__ __forceinline__ uint4 draws(int query, int key) const {
        return philox4x32_10(make_uint4(static_cast<unsigned>(key) >> 3, static_cast<unsigned>(query), row_lo, row_hi),
                             seed_lo, seed_hi);
    }
    // The keep bits of a call's eight keys: bit j is key 8g + j's (word j / 2, half j % 2).
    // (ptxas makes it eight compares and one P2R: cheaper to exchange than the words.)
    __device__ __forceinline__ unsigned keep_byte(const uint4& words) const {
        const unsigned w[4] = {words.x, words.y, words.z, words.w};
        unsigned byte = 0u;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            byte |= (static_cast<unsigned>((w[i] & 0xFFFFu) >= threshold) << (2 * i)) |
                    (static_cast<unsigned>((w[i] >> 16) >= threshold) << (2 * i + 1));
        return byte;
    }
    // The draw of key j from its group's words (words[(j % 8) / 2], half j % 2).
    static __device__ __forceinline__ unsigned draw_of(const uint4& words, int key) {
        const int w = (key >> 1) & 3;
        const unsigned word = w == 0 ? words.x : w == 1 ? words.y : w == 2 ? words.z : words.w;
        return (key & 1) ? word >> 16 : word & 0xFFFFu;
    }
};

}  // namespace cuflash
