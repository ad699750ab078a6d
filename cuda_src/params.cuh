// The one argument every cuflash attention kernel takes: a plain struct passed by value.
//
// Python mirrors this layout field for field as a NumPy structured dtype with natural
// alignment (cuflash/_gpu/params.py); tests/test_pipeline.py compiles static_asserts on
// every offset, so the two can never drift apart.
//
// Indexing. The output has leading axes (batch..., heads); the kernel grid's x axis runs
// over batch_size * num_heads "rows of attention" and y over query tiles. Each input's
// leading axes are described by strides in ELEMENTS over the output's leading shape:
// a broadcast axis has stride 0, so NumPy broadcasting and MQA cost no copies. GQA reads
// key/value head h / kv_group. Only the last axis of q, k, v, o must have stride 1.
// Every offset is 64-bit: B*H*L*D may pass 2^31.
#pragma once

#include "ptx.cuh"  // ptx::TensorMap (FwdTmaParams)

#define CUFLASH_MAX_BATCH_DIMS 4

namespace cuflash {

// n / d for 0 <= n < 2^31 by a multiply, an add and a shift: integer division is ~20
// instructions on the GPU, and a short row's block spent a sixth of its own on the handful that
// place it (Swin's 49-key windows, H200). The host picks mul and shift (params.fast_divisor):
// with l = ceil(log2 d), mul = floor(2^32 (2^l - d) / d) + 1 and n / d = (umulhi(n, mul) + n) >> l
// (Granlund and Montgomery's round-up multiplier 2^32 + mul, whose 33rd bit is the add; the sum
// stays below 2^32 for n < 2^31). d = 1 is mul = 1, l = 0: no special case.
struct FastDivisor {
    unsigned mul, shift;

    __device__ __forceinline__ int div(int n) const {
        const unsigned u = static_cast<unsigned>(n);
        return static_cast<int>((__umulhi(u, mul) + u) >> shift);
    }
};

struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    void* lse;  // float for 16/32-bit inputs, double for float64; always contiguous (..., Lq)

    // Leading batch axes (outermost first) of the output, padded with size 1 / stride 0.
    long long q_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long k_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long v_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long o_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long lse_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long q_head_stride, k_head_stride, v_head_stride, o_head_stride, lse_head_stride;
    long long q_row_stride, k_row_stride, v_row_stride, o_row_stride;

    int batch_shape[CUFLASH_MAX_BATCH_DIMS];
    int num_heads;   // query heads: the output's axis -3, or 1
    int kv_group;    // query heads per key/value head (GQA); 1 otherwise
    int seqlen_q, seqlen_k;
    int head_dim, head_dim_v;  // D of q/k and Dv of v/o; the kernel's tile may be wider

    // Masking: key j is visible to query i iff 0 <= j < seqlen_k and
    //   (window_left  < 0 || j >= i + diag_offset - window_left) &&
    //   (window_right < 0 || j <= i + diag_offset + window_right).
    // diag_offset is seqlen_k - seqlen_q for bottom-right alignment, 0 for top-left;
    // causal is window_right = 0.
    int window_left, window_right, diag_offset;
    int heads_per_section;  // launch order of the forward's blocks (schedule.cuh); >= 1

    double scale;        // softmax scale, exact for the float64 kernel
    float scale_log2;    // scale * log2(e): exp(s*scale - m) == exp2(s*scale_log2 - m')
    int diag_bottom_right;  // packed batches: 1 when each sequence's diag is its Lk - Lq, 0 top-left

    // Score modifiers (score_mod.cuh), read only by the Variants compiled with kScoreMods:
    // softcap > 0 caps the scaled score (0: none); alibi_slopes and sinks hold one value per
    // attention row bh (the output's leading axes flattened, C order), float for 16/32-bit
    // inputs and double for float64, or are null.
    double softcap;
    const void* alibi_slopes;
    const void* sinks;

    // Packed variable-length batches (flash-attn's varlen layout), null for every other call.
    // The output's last batch axis is then the sequence b, with batch strides 0: sequence b owns
    // rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of each head of q, o and lse, and key rows
    // [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v, of which it uses the first seqused_k[b]
    // when seqused_k is given. seqlen_q/k count the packed rows (the whole batch's), the grid
    // covers the longest sequence, and BatchIndex (below) turns b into offsets and lengths.
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    const int* seqused_k;

    // Additive bias and boolean mask (score_mod.cuh), or null: one element per (attention row bh,
    // query i, key j), at score_rows[2 bh] (bias) and score_rows[2 bh + 1] (mask) + i * row
    // stride + j * col stride, in elements (the host flattens any strides over the leading axes,
    // broadcasting included, into the per-row offsets: a broadcast axis costs no copy). bias is
    // in the kernels' score type (float, double for float64); mask holds bools (1 byte, nonzero
    // = the key is visible). A row/column stride times Lq/Lk stays below 2^31. Never with a
    // packed batch.
    const void* bias;
    const unsigned char* mask;
    const long long* score_rows;
    int bias_row_stride, bias_col_stride, mask_row_stride, mask_col_stride;
    // Per attention row bh, or null: a key-padding mask's cut, its last visible key + 1, past
    // which no query sees a key: the row's Lk is cut there (BatchIndex) and the key tiles past
    // it are never loaded. Stored as the cut itself when every key before it is visible (the cut
    // alone is the row's mask: a plain Variant can run the row), else as ~cut. The same for every
    // head a dK/dV block walks. key_rows (KeyRows): which of those rows this launch takes
    // (takes_row); another launch takes the others.
    const int* key_bounds;
    int key_rows;
    // The launch's query tiles per attention row (the grid's y of a launch with one block per
    // tile): fwd_wgmma_ws's blocks walk the rows' tiles (schedule.cuh's TileWalk) whatever grid
    // it is launched with; the other kernels read their grid.
    int query_tiles;
    // Attention dropout (dropout.cuh): a probability is kept iff its 16-bit Philox draw keyed by
    // dropout_seed is >= dropout_threshold (0: no dropout), a kept one times dropout_scale.
    unsigned dropout_threshold;
    double dropout_scale;
    unsigned long long dropout_seed;

    // batch_shape[d], num_heads and kv_group as divisors (FastDivisor; the host sets all three
    // with the shapes: params.set_row_shape).
    FastDivisor batch_div[CUFLASH_MAX_BATCH_DIMS];
    FastDivisor heads_div, kv_group_div;

    // A 2-D mask's tile spans (mask.cuh's MaskTiles; cuda_src/mask_tiles.cu computes them per
    // call), or null: per mask plane, over 64 x 64 tiles of (queries, keys), mask_tile_rows spans
    // of key tiles (one per row group) then mask_tile_cols spans of query tiles (one per key
    // group), two ints each; mask_tile_planes[bh] is the plane of attention row bh. Read only
    // by the score-modifier Variants.
    const int* mask_spans;
    const int* mask_tile_planes;
    int mask_tile_rows, mask_tile_cols;
};

enum KeyRows : int { kAllKeyRows = 0, kPrefixKeyRows = 1, kOtherKeyRows = 2 };

// The warp-specialized forward's argument (fwd_wgmma_ws.cu): FwdParams plus tensor maps of q,
// k and v for the bulk tensor copy engine (ptx.cuh section 10; cuflash/_gpu/tma.py encodes
// them per call). Each map is 4-d, innermost first: (head dim, rows, heads, batch), the batch
// axes merged into one (the host takes this kernel only where they merge); k's and v's heads
// are the key/value heads, so a query head h reads head h / kv_group. Passed as a
// __grid_constant__: the maps stay in the parameter space, where the copy engine reads them.
struct FwdTmaParams {
    FwdParams fwd;
    ptx::TensorMap q_map, k_map, v_map;
};

// The backward's argument: the forward's tensors and options, plus the gradients.
//   dout: dO, strided like o.                      delta: rowsum(dO * O), laid out like lse.
//   dq:   dQ in the input dtype (the deterministic dq kernel writes it), strided.
//   dq_accum: dQ / scale accumulated in fp32 (fp64 for float64) with atomics by the dk/dv
//         kernel when non-null: contiguous (bh, Lq, head_dim), zeroed by the host.
//   dk, dv: dK, dV of a group of heads_per_block consecutive query heads (heads_per_block
//         divides kv_group, or is 1: the group shares one key/value head), summed over the
//         group on chip by one dK/dV block; strided over the output's leading axes like o, but
//         with a head axis of num_heads / heads_per_block. What is left of GQA and
//         broadcasting is summed by the host afterwards. With dkv_adds (every dK/dV kernel):
//         sums of the whole group in the accumulation type (fp32; fp64 for float64), a head
//         axis of num_heads / kv_group, zeroed by the host, which each block adds its slice's
//         dK * scale and dV into (bwd_wgmma.cuh's add_dk_dv, bwd_dkdv_tc's add_rows,
//         bwd_simt.cuh's store_or_add).
//   heads_per_block: the query heads one dK/dV block accumulates; its grid is
//         (num_rows / heads_per_block, key tiles). The other backward kernels run per row.
//   dkv_adds: 1 when the blocks of a split group add into shared sums (above), else 0.
struct BwdParams {
    FwdParams fwd;
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    void* dq_accum;
    void* delta;
    void* dbias;  // with a bias whose gradient is wanted: dS of every score (score_mod.cuh's BiasGrad), else null
    long long dout_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long dq_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long dk_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long dv_batch_stride[CUFLASH_MAX_BATCH_DIMS];
    long long dout_head_stride, dq_head_stride, dk_head_stride, dv_head_stride;
    long long dout_row_stride, dq_row_stride, dk_row_stride, dv_row_stride;
    int heads_per_block;  // >= 1, divides kv_group (or 1)
    int dkv_adds;         // 0 or 1 (above)
    // bwd_dbias_tc (the bias's gradient summed on chip): the attention rows of every bias plane,
    // dbias_rows_per_plane of them a plane, plane after plane; each plane's rows cut into
    // dbias_chunks chunks of dbias_chunk_rows; the chunks' partial sums, (chunks, planes, Lq, Lk)
    // in fp32, into dbias_sum. Unused (0) by every other kernel.
    int dbias_chunks;
    void* dbias_sum;
    const int* dbias_rows;
    int dbias_rows_per_plane, dbias_chunk_rows;
    // bwd_dkdv_wgmma_ws, for a bias broadcast over the queries whose gradient is wanted (then dbias
    // is null): dS summed over each attention row's queries per key, fp32 (rows, Lk), zeroed by the
    // host (a block that sees no query stores nothing). Null for every other call and kernel.
    float* dbias_keys;
    // With a bias shared by several attention rows whose gradient is wanted, outside deterministic
    // mode: the bias plane (its entry over the leading axes, C order) each attention row reads,
    // (rows,); dbias then holds the planes' sums (planes, Lq, Lk) in the accumulation type,
    // zeroed by the host, and the blocks add dS into them (score_mod.cuh's BiasGrad). Else null.
    const int* dbias_planes;
    // The divisor of a query head's dk / dv head: kv_group with dkv_adds, else heads_per_block
    // (set with them: params.set_dkv_group).
    FastDivisor dkv_group_div;
    // 1: the dK/dV kernel stores dQ * scale into dq itself (dq_accum null, no conversion pass):
    // the host sets it only where one block sees every key of its rows and visits every query
    // tile (one key tile, no window, no key cut, no packed batch), so each dQ row is whole there.
    int dq_direct;
};

// The warp-specialized dK/dV kernel's argument (bwd_dkdv_wgmma_ws.cu): BwdParams plus tensor
// maps of q, k, v and dout, as FwdTmaParams' (4-d: head dim, rows, heads, batch).
struct BwdTmaParams {
    BwdParams bwd;
    ptx::TensorMap q_map, k_map, v_map, dout_map;
};

// Where attention row `bh` (batch..., head) sits: its head and batch coordinates, decoded once
// (integer division is slow on the GPU), then turned into an element offset per tensor.
struct BatchCoords {
    int head;
    int batch[CUFLASH_MAX_BATCH_DIMS];

    __device__ __forceinline__ BatchCoords(const FwdParams& p, int bh) {
        int rest = p.heads_div.div(bh);
        head = bh - rest * p.num_heads;
#pragma unroll
        for (int d = CUFLASH_MAX_BATCH_DIMS - 1; d >= 0; --d) {
            const int outer = p.batch_div[d].div(rest);
            batch[d] = rest - outer * p.batch_shape[d];
            rest = outer;
        }
    }

    __device__ __forceinline__ long long offset(const long long (&batch_stride)[CUFLASH_MAX_BATCH_DIMS],
                                                long long head_stride, int head_index) const {
        long long off = head_index * head_stride;
#pragma unroll
        for (int d = 0; d < CUFLASH_MAX_BATCH_DIMS; ++d) off += batch[d] * batch_stride[d];
        return off;
    }
};

// Sequence b of a packed batch (FwdParams::cu_seqlens_q non-null): its first query and key rows
// and its lengths, read from the prefix sums.
struct PackedSequence {
    int q0, k0, seqlen_q, seqlen_k;

    __device__ __forceinline__ PackedSequence(const FwdParams& p, const BatchCoords& c) {
        const int b = c.batch[CUFLASH_MAX_BATCH_DIMS - 1];
        q0 = p.cu_seqlens_q[b];
        k0 = p.cu_seqlens_k[b];
        seqlen_q = p.cu_seqlens_q[b + 1] - q0;
        seqlen_k = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - k0;
    }
};

// Where attention row `bh` starts in the tensor maps' coordinates (FwdTmaParams, BwdTmaParams:
// head dim, row, head, batch): its query head, the batch coordinate and its first query and key
// rows. A packed batch's maps span all its tokens (batch 0 of 1): sequence b starts at rows
// cu_seqlens_q[b], cu_seqlens_k[b] of them. Key/value heads are head / kv_group.
struct MapOrigin {
    int head, batch, q0, k0;

    __device__ __forceinline__ MapOrigin(const FwdParams& p, int bh) {
        const BatchCoords coords(p, bh);
        head = coords.head;
        batch = coords.batch[CUFLASH_MAX_BATCH_DIMS - 1];
        q0 = k0 = 0;
        if (p.cu_seqlens_q != nullptr) {
            const PackedSequence seq(p, coords);
            q0 = seq.q0;
            k0 = seq.k0;
            batch = 0;
        }
    }
};

// Attention row `bh`'s sequence: its offsets inside the forward's tensors (key/value rows of GQA
// belong to kv head = head / kv_group), its lengths and its mask diagonal. The kernels read a
// sequence's Lq, Lk and diagonal here and nowhere else: a packed batch changes only this
// constructor (and the kernels return at once from tiles past their sequence's end: covers()).
struct BatchIndex {
    long long q, k, v, o, lse;
    int seqlen_q, seqlen_k, diag;
    int row;  // the attention row bh (a 2-D mask's tile spans are per row: mask.cuh)

    BatchIndex() = default;  // (starts_block fills one in place)
    __device__ __forceinline__ BatchIndex(const FwdParams& p, int bh) : BatchIndex(p, BatchCoords(p, bh), bh) {}

    // Lk: the call's, or a key-padding mask's cut (FwdParams::key_bounds); the diagonal stays
    // the call's either way.
    __device__ __forceinline__ BatchIndex(const FwdParams& p, const BatchCoords& c, int bh)
        : seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k), diag(p.diag_offset), row(bh) {
        const int kv_head = p.kv_group_div.div(c.head);
        q = c.offset(p.q_batch_stride, p.q_head_stride, c.head);
        k = c.offset(p.k_batch_stride, p.k_head_stride, kv_head);
        v = c.offset(p.v_batch_stride, p.v_head_stride, kv_head);
        o = c.offset(p.o_batch_stride, p.o_head_stride, c.head);
        lse = c.offset(p.lse_batch_stride, p.lse_head_stride, c.head);
        if (p.cu_seqlens_q != nullptr) {
            const PackedSequence s(p, c);
            seqlen_q = s.seqlen_q;
            seqlen_k = s.seqlen_k;
            diag = p.diag_bottom_right ? s.seqlen_k - s.seqlen_q : 0;
            q += s.q0 * p.q_row_stride;
            k += s.k0 * p.k_row_stride;
            v += s.k0 * p.v_row_stride;
            o += s.q0 * p.o_row_stride;
            lse += s.q0;
        }
        if (p.key_bounds != nullptr) cut_keys(p, bh);
    }

    // A key-padding mask's cut (FwdParams::key_bounds); the diagonal stays the call's.
    __device__ __forceinline__ void cut_keys(const FwdParams& p, int bh) {
        const int bound = p.key_bounds[bh];
        seqlen_k = min(seqlen_k, bound >= 0 ? bound : ~bound);
    }

    // Whether the tile starting at query row m0 (or key row n0, for seqlen_k) holds rows of this
    // sequence: a packed batch's grid covers its longest sequence, and a shorter one's blocks past
    // its end have nothing to do. Always true for every other call.
    __device__ __forceinline__ bool has_query_row(int m0) const { return m0 < seqlen_q; }
    __device__ __forceinline__ bool has_key_row(int n0) const { return n0 < seqlen_k; }
};

// Whether this launch takes attention row bh (FwdParams::key_rows): the kernels return at once
// from a row another launch takes, before anything else (BatchIndex), so that nothing of the
// test stays in registers through their loops.
__device__ __forceinline__ bool takes_row(const FwdParams& p, int bh) {
    return p.key_bounds == nullptr || p.key_rows == kAllKeyRows || (p.key_rows == kPrefixKeyRows) == (p.key_bounds[bh] >= 0);
}

// Rows [covered, seqlen) of a packed sequence longer than the max_seqlen hint its grid was sized
// by: no block computes them, so the block of the grid's last tile (`tile`, of `tiles` tiles of
// `tile_rows`) fills them with NaN, `width` elements per row: a wrong hint shows in the results
// instead of leaving memory as it was. Never true for calls whose grid covers every row (all but
// a packed batch with too small a hint).
template <int kBytes> struct SameSizeBits;
template <> struct SameSizeBits<2> { using type = unsigned short; };
template <> struct SameSizeBits<4> { using type = unsigned int; };
template <> struct SameSizeBits<8> { using type = unsigned long long; };

// Rows [first, last) of `width` elements set to NaN: every bit set, a NaN in each float format,
// stored whole (the atomic path's dq_accum may be added to at the same time).
template <typename T>
__device__ __forceinline__ void fill_nan_rows(T* rows, long long row_stride, int width, int first, int last) {
    using Bits = typename SameSizeBits<sizeof(T)>::type;
    const long long count = static_cast<long long>(last - first) * width;
    for (long long idx = threadIdx.x; idx < count; idx += blockDim.x)
        *reinterpret_cast<Bits*>(rows + (first + idx / width) * row_stride + idx % width) = static_cast<Bits>(~Bits(0));
}

template <typename T>
__device__ __forceinline__ void poison_uncovered_rows(T* rows, long long row_stride, int width, int seqlen, int tile,
                                                      int tiles, int tile_rows) {
    const int covered = tiles * tile_rows;
    if (tile == tiles - 1 && seqlen > covered) fill_nan_rows(rows, row_stride, width, covered, seqlen);
}

// The forward's rows its grid leaves uncovered (poison_uncovered_rows): out and lse.
template <typename Element, typename Stat>
__device__ __forceinline__ void poison_uncovered_output(const FwdParams& p, const BatchIndex& at, int tile,
                                                        int tiles, int tile_rows) {
    poison_uncovered_rows(static_cast<Element*>(p.o) + at.o, p.o_row_stride, p.head_dim_v, at.seqlen_q, tile,
                          tiles, tile_rows);
    poison_uncovered_rows(static_cast<Stat*>(p.lse) + at.lse, 1, 1, at.seqlen_q, tile, tiles, tile_rows);
}

// A forward block's start, after it knows its attention row bh and query tile (its first row m0,
// tile_rows rows a tile): false when it has nothing to do, because the row belongs to the other
// launch of a split key-padding mask (takes_row, checked before BatchIndex is built, so a skipped
// row costs no index arithmetic) or the tile starts past a packed sequence's end. A block with
// work gets the row's BatchIndex in `at` and first poisons the output rows of its row that no
// block covers (Element and Stat: o's and lse's types).
template <typename Element, typename Stat>
__device__ __forceinline__ bool starts_block(const FwdParams& p, int bh, int tile, int m0, int tile_rows, BatchIndex& at) {
    if (!takes_row(p, bh)) return false;
    at = BatchIndex(p, bh);
    if (!at.has_query_row(m0)) return false;
    poison_uncovered_output<Element, Stat>(p, at, tile, gridDim.y, tile_rows);
    return true;
}

// BatchIndex plus the backward's tensors. delta shares lse's layout; dq_accum is contiguous.
// dk, dv are those of the head group of `bh` (head / heads_per_block; with dkv_adds, of its key/
// value head: head / kv_group): only the dK/dV kernels read them, with bh the group's first row.
struct BwdBatchIndex : BatchIndex {
    long long dout, dq, dk, dv, dq_accum;

    BwdBatchIndex() = default;  // (starts_key_block / starts_query_block fill one in place)
    __device__ __forceinline__ BwdBatchIndex(const BwdParams& p, int bh) : BwdBatchIndex(p, BatchCoords(p.fwd, bh), bh) {}

    __device__ __forceinline__ BwdBatchIndex(const BwdParams& p, const BatchCoords& c, int bh) : BatchIndex(p.fwd, c, bh) {
        const int group = p.dkv_group_div.div(c.head);  // dk, dv's head
        dout = c.offset(p.dout_batch_stride, p.dout_head_stride, c.head);
        dq = c.offset(p.dq_batch_stride, p.dq_head_stride, c.head);
        dk = c.offset(p.dk_batch_stride, p.dk_head_stride, group);
        dv = c.offset(p.dv_batch_stride, p.dv_head_stride, group);
        dq_accum = (long long)bh * p.fwd.seqlen_q * p.fwd.head_dim;
        if (p.fwd.cu_seqlens_q != nullptr) {  // (heads, packed rows, head_dim): row q0 of head `head`
            const PackedSequence s(p.fwd, c);
            dout += s.q0 * p.dout_row_stride;
            dq += s.q0 * p.dq_row_stride;
            dk += s.k0 * p.dk_row_stride;
            dv += s.k0 * p.dv_row_stride;
            dq_accum = ((long long)c.head * p.fwd.seqlen_q + s.q0) * p.fwd.head_dim;
        }
    }

    // Row bh + g, for a dK/dV block whose group starts at row bh (HeadStep): the query side
    // moves, k, v, dk, dv stay.
    __device__ __forceinline__ BwdBatchIndex head(const BwdParams& p, int g) const;
};

// How far row bh + g lies from row bh, in elements, for a dK/dV block whose group of
// heads_per_block rows starts at bh: the host keeps a group inside one batch element and one
// kv_group, so the rows share k, v (and dk, dv) and the query side (q, o, lse and delta, dout,
// dq, dq_accum) steps g heads. The one place where the kernels move from head to head. Head
// strides are whole 16-byte chunks (plan.py), so every head is as aligned as the first.
struct HeadStep {
    long long q, o, lse, dout, dq, dq_accum;

    __device__ __forceinline__ HeadStep(const BwdParams& p, int g)
        : q(g * p.fwd.q_head_stride),
          o(g * p.fwd.o_head_stride),
          lse(g * p.fwd.lse_head_stride),
          dout(g * p.dout_head_stride),
          dq(g * p.dq_head_stride),
          dq_accum((long long)g * p.fwd.seqlen_q * p.fwd.head_dim) {}
};

__device__ __forceinline__ BwdBatchIndex BwdBatchIndex::head(const BwdParams& p, int g) const {
    const HeadStep d(p, g);
    BwdBatchIndex r = *this;
    r.q += d.q;
    r.o += d.o;
    r.lse += d.lse;
    r.dout += d.dout;
    r.dq += d.dq;
    r.dq_accum += d.dq_accum;
    return r;
}

// The dQ rows a grid over query tiles leaves uncovered (poison_uncovered_rows).
template <typename Element, int kBlockM>
__device__ __forceinline__ void poison_uncovered_query_grads(const BwdParams& p, const BwdBatchIndex& at, int tile) {
    poison_uncovered_rows(static_cast<Element*>(p.dq) + at.dq, p.dq_row_stride, p.fwd.head_dim, at.seqlen_q, tile,
                          gridDim.y, kBlockM);
}

// The dK/dV rows a dK/dV grid leaves uncovered (poison_uncovered_rows): its key tiles run along y.
// The atomic path's dQ of that sequence sums over the covered keys only: all of it is NaN too
// (dq_accum of the block's heads, which bwd_dq_convert scales into dQ).
template <typename Element, typename Accum, int kBlockN>
__device__ __forceinline__ void poison_uncovered_key_grads(const BwdParams& p, const BwdBatchIndex& at, int tile) {
    const int covered = gridDim.y * kBlockN;
    if (tile != static_cast<int>(gridDim.y) - 1 || at.seqlen_k <= covered) return;
    fill_nan_rows(static_cast<Element*>(p.dk) + at.dk, p.dk_row_stride, p.fwd.head_dim, covered, at.seqlen_k);
    fill_nan_rows(static_cast<Element*>(p.dv) + at.dv, p.dv_row_stride, p.fwd.head_dim_v, covered, at.seqlen_k);
    if (p.dq_accum == nullptr) return;
    for (int g = 0; g < p.heads_per_block; ++g)
        fill_nan_rows(static_cast<Accum*>(p.dq_accum) + at.dq_accum + HeadStep(p, g).dq_accum, p.fwd.head_dim,
                      p.fwd.head_dim, 0, at.seqlen_q);
}

// The backward blocks' start, as starts_block's: false when the rows belong to the other launch
// of a split key-padding mask or the tile starts past a packed sequence's end; else `at` holds
// row bh's BwdBatchIndex and the gradient rows no block covers are poisoned. A dK/dV block: key
// tile `tile` from key n0 (bh: its head group's first row); a dQ block: query tile `tile` from m0.
template <typename Element, typename Accum, int kBlockN>
__device__ __forceinline__ bool starts_key_block(const BwdParams& p, int bh, int tile, int n0, BwdBatchIndex& at) {
    if (!takes_row(p.fwd, bh)) return false;
    at = BwdBatchIndex(p, bh);
    if (!at.has_key_row(n0)) return false;
    poison_uncovered_key_grads<Element, Accum, kBlockN>(p, at, tile);
    return true;
}
template <typename Element, int kBlockM>
__device__ __forceinline__ bool starts_query_block(const BwdParams& p, int bh, int tile, int m0, BwdBatchIndex& at) {
    if (!takes_row(p.fwd, bh)) return false;
    at = BwdBatchIndex(p, bh);
    if (!at.has_query_row(m0)) return false;
    poison_uncovered_query_grads<Element, kBlockM>(p, at, tile);
    return true;
}

// The walk of a dK/dV block (bwd_dkdv_*.cu) over its steps (g, i): query heads g in
// [0, heads_per_block) outer, query tiles i in [first, last) inner, the same tiles for every
// head (the mask does not depend on the head). One sequence of steps rather than two nested
// loops, so that the Q/dO pipeline prefetches the next head's first tiles while the current
// head's last ones are computed, instead of draining and refilling at every head boundary.
// The order is fixed: dK and dV add their terms in the same order on every run.
struct HeadTileStep {
    int g, i;

    // The first step; past the end (g = heads) when no query tile sees the block's keys.
    __device__ __forceinline__ HeadTileStep(int first, int last, int heads) : g(first < last ? 0 : heads), i(first) {}

    __device__ __forceinline__ void advance(int first, int last) {
        if (++i == last) {
            i = first;
            ++g;
        }
    }

    // The step n >= 0 steps later (a pipeline's prefetch distance: n small, known at compile
    // time). Derived rather than kept in registers: a second live cursor costs spills.
    __device__ __forceinline__ HeadTileStep after(int n, int first, int last) const {
        HeadTileStep s = *this;
#pragma unroll
        for (int k = 0; k < n; ++k) s.advance(first, last);
        return s;
    }
};

}  // namespace cuflash
