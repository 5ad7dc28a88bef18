// Gated scan, fused: h[u] = a[u]*h[u-1] + b[u]*x[u], y[u] = c[u]*h[u], forward and a
// memory-lean backward that recomputes h instead of reading it.
//
// Positions u are scan positions: the physical time index is t = DESC ? len-1-u : u, so one
// kernel serves both directions (DESC = the user's `reverse`).
//
// Thread mapping: the states of the problem (outer*inner of them, flattened as p*inner + q) are
// cut into groups of FS_GATED_BLOCK_STATES, one group per block and FS_GATED_LANE_STATES adjacent
// states per lane, so every load of a warp reads consecutive inner indices (coalesced when inner
// is at least the group; one vector access per lane when the lane's states are adjacent and
// aligned, scalar accesses otherwise). The block's FS_GATED_WARPS warps split the time axis: a
// window of FS_GATED_WARPS*FS_GATED_SEG steps is read at once, warp w owning segment w. Each
// warp reduces its segment to an affine map of the state, the maps meet
// in shared memory, and every warp folds the maps before its own into the block's running state.
// A cluster build (FS_GATED_CLUSTER > 1) gives a group a cluster of blocks instead, whose warps
// split a window between them (block r owning segments r*FS_GATED_WARPS onwards) and write
// their maps into every block's shared memory: one group then runs on several multiprocessors.
// Each element is therefore read once and written once, with no scratch in global memory and
// many loads in flight per thread (a whole segment is loaded before any arithmetic). The staged
// build (FS_GATED_STAGES > 0) has the forward copy the next window into shared memory
// asynchronously instead of loading it into registers (`StagedWindows`).
//
// Forward also stores, when asked, the state entering every segment ("checkpoints",
// (len/FS_GATED_SEG, states) in acc_t). The backward walks the windows from the end, recomputes
// h of each segment from its checkpoint with the very operations of the forward (so bit-identical
// h), and runs the adjoint recurrence
//   lam[u] = a[u+1]*lam[u+1] + c[u]*gy[u],      lam[len-1] = c*gy + grad_final,
//   dx = lam*b, db = lam*x, da = lam*h[u-1], dc = gy*h[u], dh0 = a[0]*lam[0],
// combining segments through shared memory the same way, right to left.

#include "common.cuh"

// Warps per block: 4, 8 or 16, one build each (`KernelSource`s in src/cuda/compile.rs; the
// launcher picks a build per pass and shape, see `warps` in src/cuda/gated_scan.rs).
#ifndef FS_GATED_WARPS
#define FS_GATED_WARPS 8
#endif
#define FS_GATED_SEG 8  // steps per warp per window; also the checkpoint spacing

// Blocks per group, as one thread-block cluster (sm_90 and newer; `GATED_SCAN_CLUSTER_SOURCE` in
// src/cuda/compile.rs): for problems with fewer groups than half the multiprocessors, whose time axes would
// otherwise run on part of the GPU only.
#ifndef FS_GATED_CLUSTER
#define FS_GATED_CLUSTER 1
#endif
#define FS_GATED_SEGMENTS (FS_GATED_CLUSTER * FS_GATED_WARPS)  // segments per window

// States per lane. With 16-bit storage one state per lane makes a warp's access 64 bytes, half a
// 128-byte line, and leaves the memory system under-used; two adjacent states per lane make it a
// full line (one 32-bit access per lane). The launcher mirrors this value (`lane_states` in
// src/cuda/gated_scan.rs). Defined from outside only by the host emulation tests, which force 2 in
// float64 to check this path.
#ifndef FS_GATED_LANE_STATES
#if FS_DTYPE == 0 || FS_DTYPE == 1
#define FS_GATED_LANE_STATES 2
#else
#define FS_GATED_LANE_STATES 1
#endif
#endif
#define FS_GATED_LS FS_GATED_LANE_STATES
#define FS_GATED_BLOCK_STATES (FS_WARP * FS_GATED_LS)  // states per block

// Mirrored by `GatedParams` in src/cuda/gated_scan.rs; keep the two in the same order.
struct GatedParams {
    const storage_t* x;
    const storage_t* a;
    const storage_t* b;           // null when absent (means 1): kernels are specialized on it
    const storage_t* c;           // null when absent (means 1)
    const storage_t* initial;     // h0 (null: zeros)
    const storage_t* grad_y;      // backward
    const storage_t* grad_final;  // backward (null: zeros)
    const storage_t* hidden;      // backward with a stored h (the plain scan): h instead of checkpoints
    storage_t* y;                 // forward
    storage_t* final_out;         // forward: h after the last step (null: skipped)
    acc_t* checkpoints;           // forward writes (null: skipped), backward reads
    storage_t* grad_x;            // backward outputs...
    storage_t* grad_a;
    storage_t* grad_b;            // (only with b)
    storage_t* grad_c;            // (only with c)
    storage_t* grad_initial;      // (null: skipped)
    i64 outer, len, inner;
};

// The values of a lane's states at one position, in memory order (state 0 first), so that a
// vector access moves them at once. Two 16-bit values stay packed in one 32-bit register until
// used: a segment and its prefetch unpacked would take twice the registers.
#if FS_GATED_LS == 2 && (FS_DTYPE == 0 || FS_DTYPE == 1)
struct LaneVals {
    unsigned w;
    __device__ __forceinline__ storage_t at(int i) const { return (storage_t)(i ? w >> 16 : w & 0xffffu); }
    __device__ __forceinline__ void put(int i, storage_t v) {
        w = i ? (w & 0xffffu) | ((unsigned)v << 16) : (w & 0xffff0000u) | (unsigned)v;
    }
};
#else
struct alignas(FS_GATED_LS * sizeof(storage_t)) LaneVals {
    storage_t v[FS_GATED_LS];
    __device__ __forceinline__ storage_t at(int i) const { return v[i]; }
    __device__ __forceinline__ void put(int i, storage_t x) { v[i] = x; }
};
#endif
static_assert(sizeof(LaneVals) == FS_GATED_LS * sizeof(storage_t), "a lane's values are one vector");

// The lane's values rounded from accumulator values (two 16-bit values in one conversion).
__device__ __forceinline__ LaneVals rounded(const acc_t (&v)[FS_GATED_LS]) {
    LaneVals r;
#if FS_GATED_LS == 2 && (FS_DTYPE == 0 || FS_DTYPE == 1)
    r.w = pack_pair(v[0], v[1]);
#else
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i) r.put(i, from_acc(v[i]));
#endif
    return r;
}

__device__ __forceinline__ LaneVals splat(storage_t v) {
    LaneVals r;
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i) r.put(i, v);
    return r;
}

struct GatedLane {
    int owned;      // how many of its states exist (the last group may be partial): 0..FS_GATED_LS
    bool vec;       // its states are adjacent at every step and vector-aligned: one access per step
    // Every group's states are one run of a row of every input, aligned to 16 bytes: the same
    // answer for the whole grid. The staged build then copies a warp's rows in 16-byte pieces.
    bool rows_whole;
    i64 state;      // its first state, p*inner + q (the others follow)
    i64 base[FS_GATED_LS];  // element (p, 0, q) of each state
    i64 n_states, len, inner;  // copies of P's, kept in registers
};

// Whether every lane's states are adjacent in memory with vector-aligned addresses in every
// tensor: the same answer for the whole grid (so no divergence), true with one state per lane.
// With `inner` a multiple of the lane's states, a group starts at a multiple of them within one
// row, so its elements are adjacent and, given aligned base pointers, aligned.
__device__ __forceinline__ bool lane_vectors_ok(const GatedParams& P) {
    if (FS_GATED_LS == 1) return true;
    const unsigned long long any = (unsigned long long)P.x | (unsigned long long)P.a |
        (unsigned long long)P.b | (unsigned long long)P.c | (unsigned long long)P.grad_y |
        (unsigned long long)P.hidden | (unsigned long long)P.y | (unsigned long long)P.grad_x |
        (unsigned long long)P.grad_a | (unsigned long long)P.grad_b | (unsigned long long)P.grad_c;
    return P.inner % FS_GATED_LS == 0 && any % sizeof(LaneVals) == 0;
}

__device__ __forceinline__ GatedLane gated_lane(const GatedParams& P) {
    GatedLane l;
    l.n_states = P.outer * P.inner;
    l.len = P.len;
    l.inner = P.inner;
    const i64 group = (i64)(blockIdx.x / FS_GATED_CLUSTER);
    const i64 s = group * FS_GATED_BLOCK_STATES + (i64)(threadIdx.x % FS_WARP) * FS_GATED_LS;
    const i64 left = l.n_states - s;
    l.owned = left <= 0 ? 0 : (left < FS_GATED_LS ? (int)left : FS_GATED_LS);
    l.state = l.owned > 0 ? s : 0;
    l.vec = lane_vectors_ok(P) && (l.owned == FS_GATED_LS || l.owned == 0);
    const unsigned long long inputs = (unsigned long long)P.x | (unsigned long long)P.a |
        (unsigned long long)P.b | (unsigned long long)P.c;
    l.rows_whole = P.inner % FS_GATED_BLOCK_STATES == 0 && inputs % 16 == 0;
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i) {
        const i64 si = l.state + (i < l.owned ? i : 0);
        const i64 p = si / P.inner, q = si % P.inner;
        l.base[i] = p * P.len * P.inner + q;
    }
    return l;
}

template <bool DESC>
__device__ __forceinline__ i64 gated_at(const GatedLane& l, i64 u, int i) {
    return l.base[i] + (DESC ? l.len - 1 - u : u) * l.inner;
}

// Where the lane's elements are at one position, moved one position at a time: every tensor has
// the same (outer, len, inner) layout, so one cursor serves all of them, and a step is an add
// (the per-position multiplies and bound checks of 64-bit indices cost more instructions than
// the arithmetic of the scan itself in 16-bit types).
template <bool DESC>
struct Cursor {
    i64 at[FS_GATED_LS];
    i64 step;
    __device__ __forceinline__ Cursor(const GatedLane& l, i64 u) {
        step = DESC ? -l.inner : l.inner;
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) at[i] = gated_at<DESC>(l, u, i);
    }
    __device__ __forceinline__ void next() {
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) at[i] += step;
    }
    __device__ __forceinline__ void prev() {
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) at[i] -= step;
    }
};

// How many of the SEG positions from u0 on are inside the sequence (0 when none).
__device__ __forceinline__ int positions_inside(const GatedLane& l, i64 u0, int seg) {
    const i64 left = l.len - u0;
    return left <= 0 ? 0 : (left < seg ? (int)left : seg);
}

// How a lane reaches a segment's elements: FULL, one vector per position with no checks (the lane
// owns all its states, `l.vec`, and the whole segment is inside the sequence: every segment but
// the edges); VECTOR, one vector per position where inside; SCALAR, element by element.
enum Reach { FULL, VECTOR, SCALAR };

// The reach of a segment with `inside` of its FS_GATED_SEG positions inside the sequence.
__device__ __forceinline__ Reach reach_of(const GatedLane& l, int inside) {
    if (FS_GATED_LS != 1 && !l.vec) return SCALAR;
    return (inside == FS_GATED_SEG && l.owned == FS_GATED_LS) ? FULL : VECTOR;
}

// The lane's values of `p` at the cursor (`fill` where there is no element: past the sequence,
// `live` false, or a state the lane does not own).
template <Reach R, bool DESC>
__device__ __forceinline__ LaneVals load_at(const storage_t* p, const GatedLane& l, const Cursor<DESC>& c,
                                            bool live, storage_t fill) {
    if constexpr (R == FULL) {
        return *reinterpret_cast<const LaneVals*>(p + c.at[0]);
    } else if constexpr (R == VECTOR) {
        return (live && l.owned == FS_GATED_LS) ? *reinterpret_cast<const LaneVals*>(p + c.at[0]) : splat(fill);
    } else {
        LaneVals r;
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) r.put(i, (live && i < l.owned) ? p[c.at[i]] : fill);
        return r;
    }
}

// Stores the lane's values at the cursor, of its existing states; the position is inside.
template <Reach R, bool DESC>
__device__ __forceinline__ void store_at(storage_t* p, const GatedLane& l, const Cursor<DESC>& c, LaneVals v) {
    if (R != SCALAR) {
        *reinterpret_cast<LaneVals*>(p + c.at[0]) = v;
    } else {
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i)
            if (i < l.owned) p[c.at[i]] = v.at(i);
    }
}

template <bool HAS_B>
__device__ __forceinline__ acc_t token(acc_t b, acc_t x) { return HAS_B ? b * x : x; }

// Segments keep what they load in the storage type and convert at use: a conversion placed right
// after a prefetching load would wait for it and defeat the prefetch. Accessors take (step k,
// lane state i).

// Where a forward segment's values live. `RegisterSlots`: in registers, loaded one window ahead
// by plain loads. `SharedSlots` (the staged build, FS_GATED_STAGES > 0): in a stage of shared
// memory, filled by asynchronous copies FS_GATED_STAGES - 1 windows ahead that hold no registers
// while in flight (the registers cap how far ahead plain loads can go); a warp's values for one
// (step, tensor) are its 32 lanes' in a row, so its reads hit 32 different banks.
template <int TENSORS>
struct RegisterSlots {
    static constexpr bool ASYNC = false;
    LaneVals v[FS_GATED_SEG][TENSORS];
    __device__ __forceinline__ LaneVals& at(int k, int t) { return v[k][t]; }
    __device__ __forceinline__ const LaneVals& at(int k, int t) const { return v[k][t]; }
};

template <int TENSORS>
struct SharedSlots {
    static constexpr bool ASYNC = true;
    static constexpr int WARP_VALUES = FS_GATED_SEG * TENSORS * FS_WARP;  // one warp's segment
    LaneVals* lane;  // this lane's value of step 0, tensor 0
    __device__ __forceinline__ LaneVals& at(int k, int t) const { return lane[(k * TENSORS + t) * FS_WARP]; }
};

// What a forward segment reads: gates, inputs and gates b, c (1, 0, 1, 1 past the end), tensors
// A, X, then B and C where present.
template <bool DESC, bool HAS_B, bool HAS_C, template <int> class Slots>
struct ForwardSegment {
    static constexpr int TENSORS = 2 + HAS_B + HAS_C, A = 0, X = 1, B = 2, C = 2 + HAS_B;
    Slots<TENSORS> s;

    // Value (k, t) from `p` at the cursor; asynchronously where the slots allow and the access is
    // a whole aligned vector.
    template <Reach R>
    __device__ __forceinline__ void fill(int k, int t, const storage_t* p, const GatedLane& l, const Cursor<DESC>& c,
                                         bool live, storage_t missing) {
        if constexpr (Slots<TENSORS>::ASYNC && R == FULL)
            copy_async(&s.at(k, t), reinterpret_cast<const LaneVals*>(p + c.at[0]));
        else
            s.at(k, t) = load_at<R>(p, l, c, live, missing);
    }

    // The staged build's copy of a segment inside the sequence whose rows are whole
    // (`GatedLane::rows_whole`): the warp's lanes copy its FS_GATED_SEG * TENSORS rows of 32
    // lanes' values in 16-byte pieces, each lane some of every row (a quarter of the copies of
    // one value per lane for 4-byte values). The lanes read each other's pieces, after their
    // waits and a warp barrier.
    __device__ __forceinline__ void copy_rows(const GatedParams& P, const GatedLane& l, i64 u0) {
        constexpr int ROW_BYTES = FS_WARP * (int)sizeof(LaneVals), PIECES_PER_ROW = ROW_BYTES / 16;
        constexpr int PIECES = FS_GATED_SEG * TENSORS * PIECES_PER_ROW, ELEMENTS_PER_PIECE = 16 / sizeof(storage_t);
        static_assert(PIECES % FS_WARP == 0, "every lane copies as many pieces");
        const int lane = (int)threadIdx.x % FS_WARP;
        const i64 first = Cursor<DESC>(l, u0).at[0] - (i64)lane * FS_GATED_LS;  // lane 0's element
        const i64 step = DESC ? -l.inner : l.inner;
        char* rows = reinterpret_cast<char*>(&s.at(0, 0) - lane);
#pragma unroll
        for (int m = 0; m < PIECES / FS_WARP; ++m) {
            const int piece = m * FS_WARP + lane, row = piece / PIECES_PER_ROW, k = row / TENSORS, t = row % TENSORS;
            const storage_t* tensor = t == A ? P.a : t == X ? P.x : (HAS_B && t == B) ? P.b : P.c;
            const int at_row = piece % PIECES_PER_ROW;
            copy_async(reinterpret_cast<uint4*>(rows + row * ROW_BYTES + at_row * 16),
                       reinterpret_cast<const uint4*>(tensor + first + k * step + at_row * ELEMENTS_PER_PIECE));
        }
    }

    template <Reach R>
    __device__ __forceinline__ void load_as(const GatedParams& P, const GatedLane& l, i64 u0, int inside) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
        if constexpr (Slots<TENSORS>::ASYNC) {
            if (l.rows_whole && inside == FS_GATED_SEG) return copy_rows(P, l, u0);
        }
        Cursor<DESC> at(l, u0);
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k, at.next()) {
            const bool live = k < inside;
            fill<R>(k, A, P.a, l, at, live, one);
            fill<R>(k, X, P.x, l, at, live, zero);
            if (HAS_B) fill<R>(k, B, P.b, l, at, live, one);
            if (HAS_C) fill<R>(k, C, P.c, l, at, live, one);
        }
    }
    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        const int inside = positions_inside(l, u0, FS_GATED_SEG);
        switch (reach_of(l, inside)) {
            case FULL: load_as<FULL>(P, l, u0, inside); break;
            case VECTOR: load_as<VECTOR>(P, l, u0, inside); break;
            default: load_as<SCALAR>(P, l, u0, inside);
        }
    }
    __device__ __forceinline__ acc_t value(int k, int t, int i) const { return to_acc(s.at(k, t).at(i)); }
    __device__ __forceinline__ acc_t g(int k, int i) const { return value(k, A, i); }
    __device__ __forceinline__ acc_t tok(int k, int i) const {
        return HAS_B ? value(k, B, i) * value(k, X, i) : value(k, X, i);
    }
    __device__ __forceinline__ acc_t out(int k, int i, acc_t h) const { return HAS_C ? value(k, C, i) * h : h; }

    // Steps the segment's `inside` positions from `h` (the state entering it; left as the state
    // after its last position) and stores y.
    template <Reach R>
    __device__ __forceinline__ void emit(const GatedParams& P, const GatedLane& l, i64 u0, int inside,
                                         acc_t (&h)[FS_GATED_LS]) const {
        Cursor<DESC> at(l, u0);
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k, at.next()) {
            if (R != FULL && k >= inside) break;
            acc_t y[FS_GATED_LS];
#pragma unroll
            for (int i = 0; i < FS_GATED_LS; ++i) {
                h[i] = g(k, i) * h[i] + tok(k, i);
                y[i] = out(k, i, h[i]);
            }
            store_at<R>(P.y, l, at, rounded(y));
        }
    }
};

// What a backward segment reads: the forward's inputs, dL/dy, the gate one step past the segment,
// and the state entering the segment (its checkpoint). STORED_H (the plain scan, whose forward
// output is h): h itself instead of x, and h one step before the segment instead of a checkpoint.
template <bool DESC, bool HAS_B, bool HAS_C, bool STORED_H>
struct BackwardSegment {
    LaneVals ra[FS_GATED_SEG], rx[FS_GATED_SEG], rb[FS_GATED_SEG], rc[FS_GATED_SEG], rgy[FS_GATED_SEG];
    LaneVals ra_next, rh_before;
    acc_t checkpoint[FS_GATED_LS];
    static_assert(!STORED_H || (!HAS_B && !HAS_C), "a stored h comes from the plain scan");

    template <Reach R>
    __device__ __forceinline__ void load_as(const GatedParams& P, const GatedLane& l, i64 u0, int inside) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
        Cursor<DESC> at(l, u0);
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k, at.next()) {
            const bool live = k < inside;
            ra[k] = load_at<R>(P.a, l, at, live, one);
            rx[k] = load_at<R>(STORED_H ? P.hidden : P.x, l, at, live, zero);
            if (HAS_B) rb[k] = load_at<R>(P.b, l, at, live, one);
            if (HAS_C) rc[k] = load_at<R>(P.c, l, at, live, one);
            rgy[k] = load_at<R>(P.grad_y, l, at, live, zero);
        }
        // One past the segment: inside for FULL only when the sequence goes on.
        ra_next = load_at<R == FULL ? VECTOR : R>(P.a, l, at, FS_GATED_SEG < inside, one);
        const bool live = u0 < l.len;
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            if (!STORED_H) {
                const bool has = live && i < l.owned;
                checkpoint[i] = has ? P.checkpoints[(u0 / FS_GATED_SEG) * l.n_states + l.state + i] : acc_t(0);
            } else if (!(live && u0 > 0)) {
                const bool has = live && i < l.owned && P.initial;
                rh_before.put(i, has ? P.initial[l.state + i] : zero);
            }
        }
        if (STORED_H && live && u0 > 0)
            rh_before = load_at<R == FULL ? VECTOR : R>(P.hidden, l, Cursor<DESC>(l, u0 - 1), true, zero);
    }
    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        // inside counts the gate one past the segment too
        const int inside = positions_inside(l, u0, FS_GATED_SEG + 1);
        switch (reach_of(l, inside < FS_GATED_SEG ? inside : FS_GATED_SEG)) {
            case FULL: load_as<FULL>(P, l, u0, inside); break;
            case VECTOR: load_as<VECTOR>(P, l, u0, inside); break;
            default: load_as<SCALAR>(P, l, u0, inside);
        }
    }
    __device__ __forceinline__ acc_t g(int k, int i) const { return to_acc(ra[k].at(i)); }
    // The adjoint's gate at position k: a one step later.
    __device__ __forceinline__ acc_t g_after(int k, int i) const {
        return to_acc(k + 1 < FS_GATED_SEG ? ra[k + 1].at(i) : ra_next.at(i));
    }
    __device__ __forceinline__ acc_t x(int k, int i) const { return to_acc(rx[k].at(i)); }
    __device__ __forceinline__ acc_t b(int k, int i) const { return HAS_B ? to_acc(rb[k].at(i)) : acc_t(1); }
    __device__ __forceinline__ acc_t gy(int k, int i) const { return to_acc(rgy[k].at(i)); }
    __device__ __forceinline__ acc_t tok(int k, int i) const { return HAS_C ? to_acc(rc[k].at(i)) * gy(k, i) : gy(k, i); }
    __device__ __forceinline__ acc_t h_in(int i) const { return STORED_H ? to_acc(rh_before.at(i)) : checkpoint[i]; }

    // Steps the adjoint back through the segment from `lam` (entering its right end; left as lam
    // at its first position) and stores the gradients of its `inside` positions, given its h.
    template <Reach R>
    __device__ __forceinline__ void emit(const GatedParams& P, const GatedLane& l, i64 u0, int inside,
                                         const acc_t (&h)[FS_GATED_SEG][FS_GATED_LS], acc_t (&lam)[FS_GATED_LS]) const {
        Cursor<DESC> at(l, u0 + FS_GATED_SEG - 1);
#pragma unroll
        for (int k = FS_GATED_SEG - 1; k >= 0; --k, at.prev()) {
#pragma unroll
            for (int i = 0; i < FS_GATED_LS; ++i) lam[i] = g_after(k, i) * lam[i] + tok(k, i);
            if (R != FULL && k >= inside) continue;
            acc_t gx[FS_GATED_LS], ga[FS_GATED_LS], gb[FS_GATED_LS], gc[FS_GATED_LS];
#pragma unroll
            for (int i = 0; i < FS_GATED_LS; ++i) {
                const acc_t h_before = k > 0 ? h[k - 1][i] : h_in(i);
                gx[i] = HAS_B ? lam[i] * b(k, i) : lam[i];
                ga[i] = lam[i] * h_before;
                gb[i] = HAS_B ? lam[i] * x(k, i) : acc_t(0);
                gc[i] = HAS_C ? gy(k, i) * h[k][i] : acc_t(0);
            }
            store_at<R>(P.grad_x, l, at, rounded(gx));
            store_at<R>(P.grad_a, l, at, rounded(ga));
            if (HAS_B) store_at<R>(P.grad_b, l, at, rounded(gb));
            if (HAS_C) store_at<R>(P.grad_c, l, at, rounded(gc));
        }
    }
};

// One window's segment maps, per lane state and lane, as every block of the group holds them.
typedef AffineMap WindowMaps[FS_GATED_SEGMENTS][FS_GATED_LS][FS_WARP];

// The first segment of every window that this block's warps own.
__device__ __forceinline__ int first_segment() {
#if FS_GATED_CLUSTER > 1
    return (int)cluster_block_rank() * FS_GATED_WARPS;
#else
    return 0;
#endif
}

// How a window's segment maps reach every warp of the group, double-buffered (window n uses
// buffer n % 2): within a block, shared memory and a block barrier; in the cluster build, every
// warp sends its maps into every block's buffer with st.async, and a block waits on its own
// mbarrier for the bytes of the whole window. Buffer reuse is safe either way: a warp writes
// window n+2's maps only after window n+1's are complete, which every warp sends only after it
// has read window n's.
struct WindowExchange {
    WindowMaps maps[2];
#if FS_GATED_CLUSTER > 1
    unsigned long long received[2];  // mbarriers, one per buffer
#endif

    // Before the first window, by every thread.
    __device__ __forceinline__ void start() {
#if FS_GATED_CLUSTER > 1
        if (threadIdx.x == 0) {
            mbarrier_init(&received[0], 1);
            mbarrier_init(&received[1], 1);
            mbarrier_init_fence();
        }
        cluster_barrier();  // every block's barriers are ready before anyone sends
#endif
    }

    // Gives window n's map of segment `seg`, lane state i, to every block of the group.
    __device__ __forceinline__ void publish(i64 n, int seg, int i, int lane, AffineMap m) {
        const int buf = (int)(n & 1);
#if FS_GATED_CLUSTER > 1
        if (threadIdx.x == 0 && i == 0)
            mbarrier_arrive_expecting(&received[buf], sizeof(WindowMaps));
#pragma unroll
        for (unsigned r = 0; r < FS_GATED_CLUSTER; ++r) send_map(&maps[buf][seg][i][lane], &received[buf], r, m);
#else
        maps[buf][seg][i][lane] = m;
#endif
    }

    // Waits until every map of window n is in this block's buffer, and returns the buffer.
    __device__ __forceinline__ const WindowMaps& wait(i64 n) {
        const int buf = (int)(n & 1);
#if FS_GATED_CLUSTER > 1
        mbarrier_wait(&received[buf], (unsigned)((n >> 1) & 1));
#else
        __syncthreads();
#endif
        return maps[buf];
    }

    // After the last window, by every thread: no block leaves while others may still write to it.
    __device__ __forceinline__ void finish() {
#if FS_GATED_CLUSTER > 1
        cluster_barrier();
#endif
    }
};

// Runs `carry` through the maps of one window's segments, in the pass's order (segment 0 first;
// RIGHT_TO_LEFT: the last first), and returns the value entering segment `seg`. Plain
// multiply-adds first; only where the result is not finite does it go again with
// `apply`, which keeps an infinite state infinite through a product of gates that underflowed to
// zero (a non-finite value anywhere on the way leaves the result non-finite, so nothing else can
// differ).
template <bool RIGHT_TO_LEFT>
__device__ __forceinline__ acc_t enter_segment(const WindowMaps& maps, int i, int lane, int seg, acc_t& carry) {
    constexpr int N = FS_GATED_SEGMENTS;
    acc_t s = carry, mine = carry;
#pragma unroll
    for (int n = 0; n < N; ++n) {
        const int j = RIGHT_TO_LEFT ? N - 1 - n : n;
        const AffineMap m = maps[j][i][lane];
        if (j == seg) mine = s;
        s = m.a * s + m.b;
    }
    if (!isfinite(s)) {
        s = carry;
        for (int n = 0; n < N; ++n) {
            const int j = RIGHT_TO_LEFT ? N - 1 - n : n;
            if (j == seg) mine = s;
            s = apply(maps[j][i][lane], s);
        }
    }
    carry = s;
    return mine;
}

// Both passes load the next window's segment before working on the current one (software
// pipelining), so loads stay in flight across the block's synchronization and the stores.
// A lane's states are independent recurrences: every step below runs once per lane state i.

// The forward's segments window after window, loaded ahead into registers: the segment of the
// next window while the current one is worked on.
template <bool DESC, bool HAS_B, bool HAS_C>
struct RegisterWindows {
    using Segment = ForwardSegment<DESC, HAS_B, HAS_C, RegisterSlots>;
    Segment cur, next;
    bool has_next = false;

    // Before the first window, whose segment of this warp starts at u0.
    __device__ __forceinline__ void begin(const GatedParams& P, const GatedLane& l, i64 u0) { cur.load(P, l, u0); }
    // At the start of window n, from position w0, whose segment of this warp starts at u0;
    // returns it.
    __device__ __forceinline__ const Segment& enter(const GatedParams& P, const GatedLane& l, i64, i64 w0, i64 u0) {
        constexpr i64 WINDOW = FS_GATED_SEGMENTS * FS_GATED_SEG;
        has_next = w0 + WINDOW < l.len;
        if (has_next) next.load(P, l, u0 + WINDOW);
        return cur;
    }
    // After the window.
    __device__ __forceinline__ void leave() {
        if (has_next) cur = next;
    }
};

// The staged build's windows: FS_GATED_STAGES stages of shared memory, window n in stage
// n % FS_GATED_STAGES, copied FS_GATED_STAGES - 1 windows ahead. A warp copies and reads only its
// own segments, so its lanes' waits and warp barriers order them and the block needs no barrier
// for them.
#ifndef FS_GATED_STAGES
#define FS_GATED_STAGES 0
#endif
#if FS_GATED_STAGES > 0
#if FS_GATED_STAGES < 2 || FS_GATED_CLUSTER > 1
#error "the staged build has two stages or more and one block per group"
#endif
template <bool DESC, bool HAS_B, bool HAS_C>
struct StagedWindows {
    using Segment = ForwardSegment<DESC, HAS_B, HAS_C, SharedSlots>;
    using Slots = SharedSlots<Segment::TENSORS>;
    // Bytes of dynamic shared memory the kernel takes: mirrored by `staged_shared_bytes` in
    // src/cuda/gated_scan.rs.
    static constexpr int STAGE_VALUES = FS_GATED_WARPS * Slots::WARP_VALUES;
    LaneVals* lane_stage0;  // this lane's values in stage 0

    __device__ __forceinline__ explicit StagedWindows(LaneVals* stages) {
        lane_stage0 = stages + (threadIdx.x / FS_WARP) * Slots::WARP_VALUES + threadIdx.x % FS_WARP;
    }
    __device__ __forceinline__ Segment in_stage_of(i64 window) const {
        return Segment{Slots{lane_stage0 + (window % FS_GATED_STAGES) * STAGE_VALUES}};
    }
    // Starts the copies of the windows before the last stage's (each a group, empty past the end).
    __device__ __forceinline__ void begin(const GatedParams& P, const GatedLane& l, i64 u0) {
        constexpr i64 WINDOW = FS_GATED_SEGMENTS * FS_GATED_SEG;
#pragma unroll
        for (int j = 0; j + 1 < FS_GATED_STAGES; ++j) {
            if (j * WINDOW < l.len) in_stage_of(j).load(P, l, u0 + j * WINDOW);
            copy_async_commit();
        }
    }
    __device__ __forceinline__ Segment enter(const GatedParams& P, const GatedLane& l, i64 n, i64 w0, i64 u0) {
        constexpr i64 AHEAD = (FS_GATED_STAGES - 1) * FS_GATED_SEGMENTS * FS_GATED_SEG;
        __syncwarp();  // the warp is done reading the stage refilled here (the previous window's)
        if (w0 + AHEAD < l.len) in_stage_of(n + FS_GATED_STAGES - 1).load(P, l, u0 + AHEAD);
        copy_async_commit();
        copy_async_wait<FS_GATED_STAGES - 1>();  // this lane's copies of this window are complete,
        __syncwarp();                            // and so are the other lanes'
        return in_stage_of(n);
    }
    __device__ __forceinline__ void leave() {}
};
#endif

template <bool DESC, bool HAS_B, bool HAS_C>
__device__ __forceinline__ void gated_forward(const GatedParams& P) {
    __shared__ WindowExchange exchange;
    constexpr i64 WINDOW = FS_GATED_SEGMENTS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, seg = first_segment() + (int)threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = l.len;
    acc_t carry[FS_GATED_LS];
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i)
        carry[i] = (i < l.owned && P.initial) ? to_acc(P.initial[l.state + i]) : acc_t(0);
#if FS_GATED_STAGES > 0
    FS_DYNAMIC_SHARED(LaneVals, stages);
    StagedWindows<DESC, HAS_B, HAS_C> windows(stages);
#else
    RegisterWindows<DESC, HAS_B, HAS_C> windows;
#endif
    windows.begin(P, l, (i64)seg * FS_GATED_SEG);
    exchange.start();
    i64 n = 0;  // windows done
    for (i64 w0 = 0; w0 < len; w0 += WINDOW, ++n) {
        const i64 u0 = w0 + (i64)seg * FS_GATED_SEG;
        const auto& cur = windows.enter(P, l, n, w0, u0);
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            AffineMap m = identity_map();
#pragma unroll
            for (int k = 0; k < FS_GATED_SEG; ++k) m = then_step(m, cur.g(k, i), cur.tok(k, i));
            exchange.publish(n, seg, i, lane, m);
        }
        const WindowMaps& maps = exchange.wait(n);
        acc_t h[FS_GATED_LS];
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) h[i] = enter_segment<false>(maps, i, lane, seg, carry[i]);
        if (u0 < len && l.owned > 0) {
            if (P.checkpoints) {
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i)
                    if (i < l.owned) P.checkpoints[(u0 / FS_GATED_SEG) * l.n_states + l.state + i] = h[i];
            }
            const int inside = positions_inside(l, u0, FS_GATED_SEG);
            switch (reach_of(l, inside)) {
                case FULL: cur.template emit<FULL>(P, l, u0, inside, h); break;
                case VECTOR: cur.template emit<VECTOR>(P, l, u0, inside, h); break;
                default: cur.template emit<SCALAR>(P, l, u0, inside, h);
            }
            if (P.final_out && u0 + inside == len) {
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i)
                    if (i < l.owned) P.final_out[l.state + i] = from_acc(h[i]);
            }
        }
        windows.leave();
    }
    exchange.finish();
}

template <bool DESC, bool HAS_B, bool HAS_C, bool STORED_H>
__device__ __forceinline__ void gated_backward(const GatedParams& P) {
    __shared__ WindowExchange exchange;
    constexpr i64 WINDOW = FS_GATED_SEGMENTS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, seg = first_segment() + (int)threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = l.len;
    // lam at the first position right of the current window (grad_final past the end).
    acc_t carry[FS_GATED_LS];
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i)
        carry[i] = (i < l.owned && P.grad_final) ? to_acc(P.grad_final[l.state + i]) : acc_t(0);
    const i64 last_window = (len - 1) / WINDOW * WINDOW;
    BackwardSegment<DESC, HAS_B, HAS_C, STORED_H> cur, next;
    cur.load(P, l, last_window + (i64)seg * FS_GATED_SEG);
    exchange.start();
    i64 n = 0;  // windows done
    for (i64 w0 = last_window; w0 >= 0; w0 -= WINDOW, ++n) {
        const i64 u0 = w0 + (i64)seg * FS_GATED_SEG;
        const bool more = w0 > 0;
        if (more) next.load(P, l, u0 - WINDOW);

        // The segment's adjoint map: lam at u0 + FS_GATED_SEG -> lam at u0.
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            AffineMap m = identity_map();
#pragma unroll
            for (int k = FS_GATED_SEG - 1; k >= 0; --k) m = then_step(m, cur.g_after(k, i), cur.tok(k, i));
            exchange.publish(n, seg, i, lane, m);
        }
        const WindowMaps& maps = exchange.wait(n);
        acc_t lam[FS_GATED_LS];
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) lam[i] = enter_segment<true>(maps, i, lane, seg, carry[i]);
        if (l.owned > 0 && u0 < len) {
            acc_t h[FS_GATED_SEG][FS_GATED_LS];
#pragma unroll
            for (int i = 0; i < FS_GATED_LS; ++i) {
                acc_t s = cur.h_in(i);
#pragma unroll
                for (int k = 0; k < FS_GATED_SEG; ++k) {
                    s = STORED_H ? cur.x(k, i) : cur.g(k, i) * s + token<HAS_B>(cur.b(k, i), cur.x(k, i));
                    h[k][i] = s;
                }
            }
            const int inside = positions_inside(l, u0, FS_GATED_SEG);
            switch (reach_of(l, inside)) {
                case FULL: cur.template emit<FULL>(P, l, u0, inside, h, lam); break;
                case VECTOR: cur.template emit<VECTOR>(P, l, u0, inside, h, lam); break;
                default: cur.template emit<SCALAR>(P, l, u0, inside, h, lam);
            }
            if (u0 == 0 && P.grad_initial) {
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i)
                    if (i < l.owned) P.grad_initial[l.state + i] = from_acc(cur.g(0, i) * lam[i]);
            }
        }
        if (more) cur = next;
    }
    exchange.finish();
}

// Occupancy. Left alone, ptxas spends registers freely (the forward with two states per lane up to
// ~180, the backwards 150-240) and runs one block of 8 warps per multiprocessor, too few loads in
// flight for a memory-bound kernel. Capped at 128 registers (e.g. two blocks of 8 warps) the
// forwards, the plain scan's backward and the one-state-per-lane backwards spill nothing or
// little (checked with scripts/kernel_resources.py). The two-states-per-lane backwards with b or
// c would spill hundreds of bytes under that cap, so they keep the default, and so does float64
// (twice the registers per value). `warps` in src/cuda/gated_scan.rs mirrors these caps.
// FS_GATED_MIN_BLOCKS set from outside (FERROSCAN_KERNEL_DEFINES) replaces every cap, for tuning.
// Blocks per multiprocessor that REGS registers per thread leave room for (65536 registers).
#define FS_GATED_BLOCKS_AT(REGS) (65536 / (REGS) / (FS_GATED_WARPS * FS_WARP))
#ifdef FS_GATED_MIN_BLOCKS
#define FS_GATED_CAPPED(REGS) __launch_bounds__(FS_GATED_WARPS * FS_WARP, FS_GATED_MIN_BLOCKS)
#elif FS_DTYPE == 3
#define FS_GATED_CAPPED(REGS) __launch_bounds__(FS_GATED_WARPS * FS_WARP)
#else
#define FS_GATED_CAPPED(REGS) __launch_bounds__(FS_GATED_WARPS * FS_WARP, FS_GATED_BLOCKS_AT(REGS))
#endif
#define FS_GATED_UNCAPPED __launch_bounds__(FS_GATED_WARPS * FS_WARP)
#if FS_GATED_CLUSTER > 1
// The cluster build runs for problems whose blocks fill three per multiprocessor at most: room for
// 168 registers, which the two-state forwards with b and c need not to spill.
#define FS_GATED_FWD_BOUNDS FS_GATED_CAPPED(168)
#else
#define FS_GATED_FWD_BOUNDS FS_GATED_CAPPED(128)
#endif
#if FS_GATED_LS == 2
#define FS_GATED_BWD_BOUNDS(HB, HC) FS_GATED_BWD_BOUNDS_##HB##HC
#define FS_GATED_BWD_BOUNDS_00 FS_GATED_CAPPED(128)
#define FS_GATED_BWD_BOUNDS_01 FS_GATED_UNCAPPED
#define FS_GATED_BWD_BOUNDS_10 FS_GATED_UNCAPPED
#define FS_GATED_BWD_BOUNDS_11 FS_GATED_UNCAPPED
#else
#define FS_GATED_BWD_BOUNDS(HB, HC) FS_GATED_CAPPED(128)
#endif
// The plain scan's backward in float32 fits 80 registers: three blocks of 8 warps (measured on
// the H100, (8,2048,1536) time axis 1 fwd+bwd: 83% of the roofline with two, 95% with three; in
// bfloat16 three blocks spill and fall to 58%).
#if FS_DTYPE == 2
#define FS_GATED_SCAN_BWD_BOUNDS FS_GATED_CAPPED(80)
#else
#define FS_GATED_SCAN_BWD_BOUNDS FS_GATED_CAPPED(128)
#endif

// Kernel names: gated_<fwd|bwd>_r<reverse>_b<has b>_c<has c>, and scan_blocks_bwd_r<reverse>
// (the plain scan's backward from its stored h); see `kernel_name` in src/cuda/gated_scan.rs.
#define FS_GATED_KERNELS(REV, HB, HC)                                                              \
    extern "C" __global__ void FS_GATED_FWD_BOUNDS                                                 \
        gated_fwd_r##REV##_b##HB##_c##HC(const GatedParams P) {                                    \
        gated_forward<(REV) != 0, (HB) != 0, (HC) != 0>(P);                                        \
    }                                                                                              \
    extern "C" __global__ void FS_GATED_BWD_BOUNDS(HB, HC)                                         \
        gated_bwd_r##REV##_b##HB##_c##HC(const GatedParams P) {                                    \
        gated_backward<(REV) != 0, (HB) != 0, (HC) != 0, false>(P);                                \
    }

FS_GATED_KERNELS(0, 0, 0)
FS_GATED_KERNELS(0, 0, 1)
FS_GATED_KERNELS(0, 1, 0)
FS_GATED_KERNELS(0, 1, 1)
FS_GATED_KERNELS(1, 0, 0)
FS_GATED_KERNELS(1, 0, 1)
FS_GATED_KERNELS(1, 1, 0)
FS_GATED_KERNELS(1, 1, 1)

#define FS_SCAN_BLOCKS_BWD(REV)                                                                    \
    extern "C" __global__ void FS_GATED_SCAN_BWD_BOUNDS                                            \
        scan_blocks_bwd_r##REV(const GatedParams P) {                                              \
        gated_backward<(REV) != 0, false, false, true>(P);                                         \
    }
FS_SCAN_BLOCKS_BWD(0)
FS_SCAN_BLOCKS_BWD(1)
