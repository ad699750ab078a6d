"""Attention dropout's keep mask: one pure function of (seed, row, query, key), shared by every
backend and every kernel tiling.

``dropout_p`` drops each probability of ``P = softmax(S)`` independently: ``out = (P o Z / q) V``
with ``Z`` the keep mask and ``q`` the keep probability; the row sums (and so ``lse``) are those
of the undropped ``P``, as in FlashAttention-2 and torch. The backward recomputes ``Z`` from the
same seed: ``dV = (P o Z / q)^T dO``, ``dS = P o (Z o dP / q - delta)`` with ``delta =
rowsum(dO o O)`` unchanged.

The keep decision of attention row ``r`` (the flat index over the output's leading axes, heads
last), query ``i`` and key ``j`` is a 16-bit draw of Philox4x32-10 (Salmon et al., SC'11):

    words = philox4x32_10(counter = (j // 8, i, r mod 2^32, r div 2^32), key = (seed mod 2^32, seed div 2^32))
    draw  = 16-bit half (j mod 2) of words[(j mod 8) // 2]      (the low half for even j)
    keep  = draw >= threshold,   threshold = round(dropout_p * 2^16) (at most 2^16 - 1)

so one Philox call decides eight consecutive keys of one query row. The keep probability is then
exactly ``q = 1 - threshold / 2^16`` and kept values are scaled by ``1 / q``: the dropped output is
an unbiased estimate of the undropped one (the dropout rate realised differs from ``dropout_p`` by
at most 2^-17). The GPU kernels (cuda_src/dropout.cuh) compute the same function, so the CPU
backend is their exact reference.
"""
from __future__ import annotations

import numpy

# Philox4x32's multipliers and Weyl key increments (Salmon et al., Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

KEYS_PER_DRAW = 8  # one Philox call: four 32-bit words, two 16-bit draws each
_LOW32 = numpy.uint64(0xFFFFFFFF)


def check_replay_seed(made_with_seed: bool, dropout_seed) -> None:
    """A kept plan replays with a seed exactly when it was made for a dropping call: the plan keys
    keep dropping and plain calls apart, and the planning call passes its problem's seed, so a
    caller that forgets the seed (or passes one to a plain plan) fails here, not silently."""
    if made_with_seed != (dropout_seed is not None):
        raise RuntimeError("cuflash: a plan replayed with" + ("out" if dropout_seed is None else "") +
                           " a dropout seed it was " + ("" if dropout_seed is None else "not ") + "made for")


def threshold(dropout_p: float) -> int:
    """The 16-bit draw below which a probability is dropped."""
    return min(int(round(dropout_p * 65536.0)), 65535)


def keep_scale(dropout_p: float) -> float:
    """1 / q, q the keep probability the threshold realises."""
    return 65536.0 / (65536 - threshold(dropout_p))


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 over broadcast uint64 arrays holding 32-bit counters; returns 4 words (uint64
    arrays of 32-bit values)."""
    c0, c1, c2, c3 = (numpy.asarray(c, dtype=numpy.uint64) for c in (c0, c1, c2, c3))
    m0, m1 = numpy.uint64(PHILOX_M0), numpy.uint64(PHILOX_M1)
    shift = numpy.uint64(32)
    for round_index in range(PHILOX_ROUNDS):
        key0 = numpy.uint64((k0 + round_index * PHILOX_W0) & 0xFFFFFFFF)
        key1 = numpy.uint64((k1 + round_index * PHILOX_W1) & 0xFFFFFFFF)
        product0 = m0 * c0  # exact: both factors < 2^32
        product1 = m1 * c2
        c0, c1, c2, c3 = ((product1 >> shift) ^ c1 ^ key0, product1 & _LOW32,
                          (product0 >> shift) ^ c3 ^ key1, product0 & _LOW32)
    return c0, c1, c2, c3


def draws(seed: int, rows, queries, keys):
    """The 16-bit draws (uint64 array) of (row, query, key) index arrays, which broadcast."""
    rows, queries, keys = (numpy.asarray(x, dtype=numpy.uint64) for x in (rows, queries, keys))
    seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
    words = philox4x32_10(keys >> numpy.uint64(3), queries, rows & _LOW32, rows >> numpy.uint64(32), seed_lo, seed_hi)
    word_index = (keys >> numpy.uint64(1)) & numpy.uint64(3)
    word = numpy.choose(word_index.astype(numpy.intp), numpy.broadcast_arrays(*words))
    half = (keys & numpy.uint64(1)) * numpy.uint64(16)
    return (word >> half) & numpy.uint64(0xFFFF)


def keep_mask(seed: int, dropout_p: float, rows, queries, keys):
    """The keep decisions (bool array) of (row, query, key) index arrays, which broadcast."""
    return draws(seed, rows, queries, keys) >= numpy.uint64(threshold(dropout_p))


def keep_block(seed: int, dropout_p: float, rows, queries: slice, keys: slice):
    """The keep decisions of a block: attention rows ``rows`` (an integer array of any shape: the
    flat row indices), queries and keys as slices; shape ``rows.shape + (queries, keys)``. One
    Philox call per eight keys (the groups the keys' slice touches), as the definition groups them."""
    rows = numpy.asarray(rows, dtype=numpy.uint64)[..., None, None]
    first, last = keys.start // KEYS_PER_DRAW, -(-keys.stop // KEYS_PER_DRAW)
    groups = numpy.arange(first, last, dtype=numpy.uint64)[None, :]
    query_index = numpy.arange(queries.start, queries.stop, dtype=numpy.uint64)[:, None]
    words = philox4x32_10(groups, query_index, rows & _LOW32, rows >> numpy.uint64(32), seed & 0xFFFFFFFF, seed >> 32)
    words = numpy.stack(numpy.broadcast_arrays(*words), axis=-1)  # (..., queries, groups, 4)
    halves = numpy.stack((words & numpy.uint64(0xFFFF), words >> numpy.uint64(16)), axis=-1)  # keys 2w, 2w + 1
    drawn = halves.reshape(halves.shape[:-3] + (-1,))  # (..., queries, groups * 8), key first * 8 first
    offset = keys.start - first * KEYS_PER_DRAW
    return drawn[..., offset:offset + keys.stop - keys.start] >= numpy.uint64(threshold(dropout_p))
