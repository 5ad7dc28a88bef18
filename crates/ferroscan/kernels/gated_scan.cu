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
// Each element is therefore read once and written once, with no scratch in global memory and
// many loads in flight per thread (a whole segment is loaded before any arithmetic).
//
// Forward also stores, when asked, the state entering every segment ("checkpoints",
// (len/FS_GATED_SEG, states) in acc_t). The backward walks the windows from the end, recomputes
// h of each segment from its checkpoint with the very operations of the forward (so bit-identical
// h), and runs the adjoint recurrence
//   lam[u] = a[u+1]*lam[u+1] + c[u]*gy[u],      lam[len-1] = c*gy + grad_final,
//   dx = lam*b, db = lam*x, da = lam*h[u-1], dc = gy*h[u], dh0 = a[0]*lam[0],
// combining segments through shared memory the same way, right to left.

#include "common.cuh"

#define FS_GATED_WARPS 8
#define FS_GATED_SEG 8  // steps per warp per window; also the checkpoint spacing

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

__device__ __forceinline__ LaneVals splat(storage_t v) {
    LaneVals r;
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i) r.put(i, v);
    return r;
}

struct GatedLane {
    int owned;      // how many of its states exist (the last group may be partial): 0..FS_GATED_LS
    bool vec;       // its states are adjacent at every step and vector-aligned: one access per step
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
    const i64 s = (i64)blockIdx.x * FS_GATED_BLOCK_STATES + (i64)(threadIdx.x % FS_WARP) * FS_GATED_LS;
    const i64 left = l.n_states - s;
    l.owned = left <= 0 ? 0 : (left < FS_GATED_LS ? (int)left : FS_GATED_LS);
    l.state = l.owned > 0 ? s : 0;
    l.vec = lane_vectors_ok(P) && (l.owned == FS_GATED_LS || l.owned == 0);
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

// Where the lane's elements at position u are (`at`, for its states that exist and u < len:
// `inside`), worked out once per position for every tensor. VEC: only state 0's, the lane's
// vector (used only where `l.vec`).
struct Spot {
    bool inside[FS_GATED_LS];
    i64 at[FS_GATED_LS];
};

template <bool VEC, bool DESC>
__device__ __forceinline__ Spot spot_at(const GatedLane& l, i64 u) {
    Spot s;
#pragma unroll
    for (int i = 0; i < (VEC ? 1 : FS_GATED_LS); ++i) {
        s.inside[i] = (VEC ? l.owned == FS_GATED_LS : i < l.owned) && u < l.len;
        s.at[i] = s.inside[i] ? gated_at<DESC>(l, u, i) : 0;
    }
    return s;
}

// The lane's values of `p` at `s` (`fill` where there is no element).
template <bool VEC>
__device__ __forceinline__ LaneVals load_at(const storage_t* p, const Spot& s, storage_t fill) {
    if constexpr (VEC) {
        return s.inside[0] ? *reinterpret_cast<const LaneVals*>(p + s.at[0]) : splat(fill);
    } else {
        LaneVals r;
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) r.put(i, s.inside[i] ? p[s.at[i]] : fill);
        return r;
    }
}

// Stores the lane's values at position u of its existing states; u < len.
template <bool DESC>
__device__ __forceinline__ void store_at(storage_t* p, const GatedLane& l, i64 u, LaneVals v) {
    if (FS_GATED_LS == 1 || l.vec) {
        *reinterpret_cast<LaneVals*>(p + gated_at<DESC>(l, u, 0)) = v;
    } else {
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i)
            if (i < l.owned) p[gated_at<DESC>(l, u, i)] = v.at(i);
    }
}

template <bool HAS_B>
__device__ __forceinline__ acc_t token(acc_t b, acc_t x) { return HAS_B ? b * x : x; }

// Segments keep what they load in the storage type and convert at use: a conversion placed right
// after a prefetching load would wait for it and defeat the prefetch. Accessors take (step k,
// lane state i).

// What a forward segment reads: gates, inputs and gates b, c (1, 0, 1, 1 past the end).
template <bool DESC, bool HAS_B, bool HAS_C>
struct ForwardSegment {
    LaneVals ra[FS_GATED_SEG], rx[FS_GATED_SEG], rb[FS_GATED_SEG], rc[FS_GATED_SEG];

    template <bool VEC>
    __device__ __forceinline__ void load_as(const GatedParams& P, const GatedLane& l, i64 u0) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k) {
            const Spot at = spot_at<VEC, DESC>(l, u0 + k);
            ra[k] = load_at<VEC>(P.a, at, one);
            rx[k] = load_at<VEC>(P.x, at, zero);
            if (HAS_B) rb[k] = load_at<VEC>(P.b, at, one);
            if (HAS_C) rc[k] = load_at<VEC>(P.c, at, one);
        }
    }
    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        if (FS_GATED_LS == 1 || l.vec) load_as<true>(P, l, u0);
        else load_as<false>(P, l, u0);
    }
    __device__ __forceinline__ acc_t g(int k, int i) const { return to_acc(ra[k].at(i)); }
    __device__ __forceinline__ acc_t tok(int k, int i) const {
        return HAS_B ? to_acc(rb[k].at(i)) * to_acc(rx[k].at(i)) : to_acc(rx[k].at(i));
    }
    __device__ __forceinline__ acc_t out(int k, int i, acc_t h) const { return HAS_C ? to_acc(rc[k].at(i)) * h : h; }
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

    template <bool VEC>
    __device__ __forceinline__ void load_as(const GatedParams& P, const GatedLane& l, i64 u0) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k) {
            const Spot at = spot_at<VEC, DESC>(l, u0 + k);
            ra[k] = load_at<VEC>(P.a, at, one);
            rx[k] = load_at<VEC>(STORED_H ? P.hidden : P.x, at, zero);
            if (HAS_B) rb[k] = load_at<VEC>(P.b, at, one);
            if (HAS_C) rc[k] = load_at<VEC>(P.c, at, one);
            rgy[k] = load_at<VEC>(P.grad_y, at, zero);
        }
        ra_next = load_at<VEC>(P.a, spot_at<VEC, DESC>(l, u0 + FS_GATED_SEG), one);
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
        if (STORED_H && live && u0 > 0) rh_before = load_at<VEC>(P.hidden, spot_at<VEC, DESC>(l, u0 - 1), zero);
    }
    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        if (FS_GATED_LS == 1 || l.vec) load_as<true>(P, l, u0);
        else load_as<false>(P, l, u0);
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
};

// Both passes load the next window's segment before working on the current one (software
// pipelining), so loads stay in flight across the block's synchronization and the stores.
// A lane's states are independent recurrences: every step below runs once per lane state i.

template <bool DESC, bool HAS_B, bool HAS_C>
__device__ __forceinline__ void gated_forward(const GatedParams& P) {
    __shared__ AffineMap maps[2][FS_GATED_WARPS][FS_GATED_LS][FS_WARP];
    constexpr i64 WINDOW = FS_GATED_WARPS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, warp = threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = l.len;
    acc_t carry[FS_GATED_LS];
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i)
        carry[i] = (i < l.owned && P.initial) ? to_acc(P.initial[l.state + i]) : acc_t(0);
    ForwardSegment<DESC, HAS_B, HAS_C> cur, next;
    cur.load(P, l, (i64)warp * FS_GATED_SEG);
    int buf = 0;
    for (i64 w0 = 0; w0 < len; w0 += WINDOW, buf ^= 1) {
        const i64 u0 = w0 + (i64)warp * FS_GATED_SEG;
        const bool more = w0 + WINDOW < len;
        if (more) next.load(P, l, u0 + WINDOW);
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            AffineMap m = identity_map();
#pragma unroll
            for (int k = 0; k < FS_GATED_SEG; ++k) m = then_step(m, cur.g(k, i), cur.tok(k, i));
            maps[buf][warp][i][lane] = m;
        }
        __syncthreads();
        acc_t h[FS_GATED_LS];
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            h[i] = carry[i];
#pragma unroll
            for (int j = 0; j < FS_GATED_WARPS; ++j) {
                const acc_t after = apply(maps[buf][j][i][lane], carry[i]);
                if (j == warp) h[i] = carry[i];
                carry[i] = after;
            }
        }
        if (u0 < len && l.owned > 0) {
            if (P.checkpoints) {
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i)
                    if (i < l.owned) P.checkpoints[(u0 / FS_GATED_SEG) * l.n_states + l.state + i] = h[i];
            }
#pragma unroll
            for (int k = 0; k < FS_GATED_SEG; ++k) {
                const i64 u = u0 + k;
                if (u >= len) break;
                LaneVals y;
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i) {
                    h[i] = cur.g(k, i) * h[i] + cur.tok(k, i);
                    y.put(i, from_acc(cur.out(k, i, h[i])));
                }
                store_at<DESC>(P.y, l, u, y);
                if (u == len - 1 && P.final_out) {
#pragma unroll
                    for (int i = 0; i < FS_GATED_LS; ++i)
                        if (i < l.owned) P.final_out[l.state + i] = from_acc(h[i]);
                }
            }
        }
        if (more) cur = next;
    }
}

template <bool DESC, bool HAS_B, bool HAS_C, bool STORED_H>
__device__ __forceinline__ void gated_backward(const GatedParams& P) {
    __shared__ AffineMap maps[2][FS_GATED_WARPS][FS_GATED_LS][FS_WARP];
    constexpr i64 WINDOW = FS_GATED_WARPS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, warp = threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = l.len;
    // lam at the first position right of the current window (grad_final past the end).
    acc_t carry[FS_GATED_LS];
#pragma unroll
    for (int i = 0; i < FS_GATED_LS; ++i)
        carry[i] = (i < l.owned && P.grad_final) ? to_acc(P.grad_final[l.state + i]) : acc_t(0);
    const i64 last_window = (len - 1) / WINDOW * WINDOW;
    BackwardSegment<DESC, HAS_B, HAS_C, STORED_H> cur, next;
    cur.load(P, l, last_window + (i64)warp * FS_GATED_SEG);
    int buf = 0;
    for (i64 w0 = last_window; w0 >= 0; w0 -= WINDOW, buf ^= 1) {
        const i64 u0 = w0 + (i64)warp * FS_GATED_SEG;
        const bool more = w0 > 0;
        if (more) next.load(P, l, u0 - WINDOW);

        // The segment's adjoint map: lam at u0 + FS_GATED_SEG -> lam at u0.
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            AffineMap m = identity_map();
#pragma unroll
            for (int k = FS_GATED_SEG - 1; k >= 0; --k) m = then_step(m, cur.g_after(k, i), cur.tok(k, i));
            maps[buf][warp][i][lane] = m;
        }
        __syncthreads();
        acc_t lam[FS_GATED_LS];
#pragma unroll
        for (int i = 0; i < FS_GATED_LS; ++i) {
            lam[i] = carry[i];
#pragma unroll
            for (int j = FS_GATED_WARPS - 1; j >= 0; --j) {
                const acc_t before = apply(maps[buf][j][i][lane], carry[i]);
                if (j == warp) lam[i] = carry[i];
                carry[i] = before;
            }
        }
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
#pragma unroll
            for (int k = FS_GATED_SEG - 1; k >= 0; --k) {
                const i64 u = u0 + k;
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i) lam[i] = cur.g_after(k, i) * lam[i] + cur.tok(k, i);
                if (u >= len) continue;
                LaneVals gx, ga, gb, gc;
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i) {
                    const acc_t h_before = k > 0 ? h[k - 1][i] : cur.h_in(i);
                    gx.put(i, from_acc(HAS_B ? lam[i] * cur.b(k, i) : lam[i]));
                    ga.put(i, from_acc(lam[i] * h_before));
                    if (HAS_B) gb.put(i, from_acc(lam[i] * cur.x(k, i)));
                    if (HAS_C) gc.put(i, from_acc(cur.gy(k, i) * h[k][i]));
                }
                store_at<DESC>(P.grad_x, l, u, gx);
                store_at<DESC>(P.grad_a, l, u, ga);
                if (HAS_B) store_at<DESC>(P.grad_b, l, u, gb);
                if (HAS_C) store_at<DESC>(P.grad_c, l, u, gc);
            }
            if (u0 == 0 && P.grad_initial) {
#pragma unroll
                for (int i = 0; i < FS_GATED_LS; ++i)
                    if (i < l.owned) P.grad_initial[l.state + i] = from_acc(cur.g(0, i) * lam[i]);
            }
        }
        if (more) cur = next;
    }
}

// Occupancy. Left alone, ptxas spends registers freely (the forward with two states per lane up to
// ~180, the backwards 150-220) and runs one block of 8 warps per multiprocessor, too few loads in
// flight for a memory-bound kernel. Capped at 128 registers (two blocks) the forwards, the plain
// scan's backward and the one-state-per-lane backwards do not spill (checked with
// scripts/kernel_resources.py). The two-states-per-lane backwards with b or c would spill hundreds
// of bytes under that cap, so they keep the default, and so does float64 (twice the registers
// per value: it would spill).
// FS_GATED_MIN_BLOCKS / FS_GATED_SCAN_BWD_MIN_BLOCKS may be set from outside for tuning
// (FERROSCAN_KERNEL_DEFINES).
#ifndef FS_GATED_MIN_BLOCKS
#define FS_GATED_MIN_BLOCKS 2
#endif
// The plain scan's backward in float32 fits 80 registers without spilling: three blocks
// (measured on the H100, (8,2048,1536) time axis 1 fwd+bwd: 83% of the roofline with two, 95%
// with three; in bfloat16 three blocks spill and fall to 58%).
#ifndef FS_GATED_SCAN_BWD_MIN_BLOCKS
#if FS_DTYPE == 2
#define FS_GATED_SCAN_BWD_MIN_BLOCKS 3
#else
#define FS_GATED_SCAN_BWD_MIN_BLOCKS FS_GATED_MIN_BLOCKS
#endif
#endif
#if FS_DTYPE == 3
#define FS_GATED_BOUNDS_2 __launch_bounds__(FS_GATED_WARPS * FS_WARP)
#define FS_GATED_SCAN_BWD_BOUNDS __launch_bounds__(FS_GATED_WARPS * FS_WARP)
#else
#define FS_GATED_BOUNDS_2 __launch_bounds__(FS_GATED_WARPS * FS_WARP, FS_GATED_MIN_BLOCKS)
#define FS_GATED_SCAN_BWD_BOUNDS __launch_bounds__(FS_GATED_WARPS * FS_WARP, FS_GATED_SCAN_BWD_MIN_BLOCKS)
#endif
#define FS_GATED_BOUNDS_1 __launch_bounds__(FS_GATED_WARPS * FS_WARP)
#define FS_GATED_FWD_BOUNDS FS_GATED_BOUNDS_2
#if FS_GATED_LS == 2
#define FS_GATED_BWD_BOUNDS(HB, HC) FS_GATED_BOUNDS_##HB##HC
#define FS_GATED_BOUNDS_00 FS_GATED_BOUNDS_2
#define FS_GATED_BOUNDS_01 FS_GATED_BOUNDS_1
#define FS_GATED_BOUNDS_10 FS_GATED_BOUNDS_1
#define FS_GATED_BOUNDS_11 FS_GATED_BOUNDS_1
#else
#define FS_GATED_BWD_BOUNDS(HB, HC) FS_GATED_BOUNDS_2
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
