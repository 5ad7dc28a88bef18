// Gated scan, fused: h[u] = a[u]*h[u-1] + b[u]*x[u], y[u] = c[u]*h[u], forward and a
// memory-lean backward that recomputes h instead of reading it.
//
// Positions u are scan positions: the physical time index is t = DESC ? len-1-u : u, so one
// kernel serves both directions (DESC = the user's `reverse`).
//
// Thread mapping: the states of the problem (outer*inner of them, flattened as p*inner + q) are
// cut into groups of 32, one group per block and one state per lane, so every load of a warp
// reads 32 consecutive inner indices (coalesced when inner >= 32). The block's FS_GATED_WARPS
// warps split the time axis: a window of FS_GATED_WARPS*FS_GATED_SEG steps is read at once, warp
// w owning segment w. Each warp reduces its segment to an affine map of the state, the maps meet
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

struct GatedLane {
    bool active;    // this lane owns a state (the last group may be partial)
    i64 state;      // p*inner + q
    i64 base;       // element (p, 0, q)
    i64 n_states;
};

__device__ __forceinline__ GatedLane gated_lane(const GatedParams& P) {
    GatedLane l;
    l.n_states = P.outer * P.inner;
    const i64 s = (i64)blockIdx.x * FS_WARP + threadIdx.x % FS_WARP;
    l.active = s < l.n_states;
    l.state = l.active ? s : 0;
    const i64 p = l.state / P.inner, q = l.state % P.inner;
    l.base = p * P.len * P.inner + q;
    return l;
}

template <bool DESC>
__device__ __forceinline__ i64 gated_at(const GatedLane& l, const GatedParams& P, i64 u) {
    return l.base + (DESC ? P.len - 1 - u : u) * P.inner;
}

template <bool HAS_B>
__device__ __forceinline__ acc_t token(acc_t b, acc_t x) { return HAS_B ? b * x : x; }

// Segments keep what they load in the storage type and convert at use: a conversion placed right
// after a prefetching load would wait for it and defeat the prefetch.

// What a forward segment reads: gates, inputs and gates b, c (1, 0, 1, 1 past the end).
template <bool DESC, bool HAS_B, bool HAS_C>
struct ForwardSegment {
    storage_t ra[FS_GATED_SEG], rx[FS_GATED_SEG], rb[FS_GATED_SEG], rc[FS_GATED_SEG];

    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k) {
            const i64 u = u0 + k;
            const bool inside = l.active && u < P.len;
            const i64 at = inside ? gated_at<DESC>(l, P, u) : 0;
            ra[k] = inside ? P.a[at] : one;
            rx[k] = inside ? P.x[at] : zero;
            if (HAS_B) rb[k] = inside ? P.b[at] : one;
            if (HAS_C) rc[k] = inside ? P.c[at] : one;
        }
    }
    __device__ __forceinline__ acc_t g(int k) const { return to_acc(ra[k]); }
    __device__ __forceinline__ acc_t tok(int k) const { return HAS_B ? to_acc(rb[k]) * to_acc(rx[k]) : to_acc(rx[k]); }
    __device__ __forceinline__ acc_t out(int k, acc_t h) const { return HAS_C ? to_acc(rc[k]) * h : h; }
};

// What a backward segment reads: the forward's inputs, dL/dy, the gate one step past the segment,
// and the state entering the segment (its checkpoint). STORED_H (the plain scan, whose forward
// output is h): h itself instead of x, and h one step before the segment instead of a checkpoint.
template <bool DESC, bool HAS_B, bool HAS_C, bool STORED_H>
struct BackwardSegment {
    storage_t ra[FS_GATED_SEG], rx[FS_GATED_SEG], rb[FS_GATED_SEG], rc[FS_GATED_SEG], rgy[FS_GATED_SEG];
    storage_t ra_next, rh_before;
    acc_t checkpoint;
    static_assert(!STORED_H || (!HAS_B && !HAS_C), "a stored h comes from the plain scan");

    __device__ __forceinline__ void load(const GatedParams& P, const GatedLane& l, i64 u0) {
        const storage_t one = from_acc(acc_t(1)), zero = from_acc(acc_t(0));
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k) {
            const i64 u = u0 + k;
            const bool inside = l.active && u < P.len;
            const i64 at = inside ? gated_at<DESC>(l, P, u) : 0;
            ra[k] = inside ? P.a[at] : one;
            rx[k] = inside ? (STORED_H ? P.hidden[at] : P.x[at]) : zero;
            if (HAS_B) rb[k] = inside ? P.b[at] : one;
            if (HAS_C) rc[k] = inside ? P.c[at] : one;
            rgy[k] = inside ? P.grad_y[at] : zero;
        }
        const i64 u_next = u0 + FS_GATED_SEG;
        ra_next = (l.active && u_next < P.len) ? P.a[gated_at<DESC>(l, P, u_next)] : one;
        const bool live = l.active && u0 < P.len;
        if (!STORED_H) {
            checkpoint = live ? P.checkpoints[(u0 / FS_GATED_SEG) * l.n_states + l.state] : acc_t(0);
        } else if (live && u0 > 0) {
            rh_before = P.hidden[gated_at<DESC>(l, P, u0 - 1)];
        } else {
            rh_before = (live && P.initial) ? P.initial[l.state] : zero;
        }
    }
    __device__ __forceinline__ acc_t g(int k) const { return to_acc(ra[k]); }
    // The adjoint's gate at position k: a one step later.
    __device__ __forceinline__ acc_t g_after(int k) const {
        return to_acc(k + 1 < FS_GATED_SEG ? ra[k + 1] : ra_next);
    }
    __device__ __forceinline__ acc_t x(int k) const { return to_acc(rx[k]); }
    __device__ __forceinline__ acc_t b(int k) const { return HAS_B ? to_acc(rb[k]) : acc_t(1); }
    __device__ __forceinline__ acc_t gy(int k) const { return to_acc(rgy[k]); }
    __device__ __forceinline__ acc_t tok(int k) const { return HAS_C ? to_acc(rc[k]) * gy(k) : gy(k); }
    __device__ __forceinline__ acc_t h_in() const { return STORED_H ? to_acc(rh_before) : checkpoint; }
};

// Both passes load the next window's segment before working on the current one (software
// pipelining), so loads stay in flight across the block's synchronization and the stores.

template <bool DESC, bool HAS_B, bool HAS_C>
__device__ __forceinline__ void gated_forward(const GatedParams& P) {
    __shared__ AffineMap maps[2][FS_GATED_WARPS][FS_WARP];
    constexpr i64 WINDOW = FS_GATED_WARPS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, warp = threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = P.len;
    acc_t carry = (l.active && P.initial) ? to_acc(P.initial[l.state]) : acc_t(0);
    ForwardSegment<DESC, HAS_B, HAS_C> cur, next;
    cur.load(P, l, (i64)warp * FS_GATED_SEG);
    int buf = 0;
    for (i64 w0 = 0; w0 < len; w0 += WINDOW, buf ^= 1) {
        const i64 u0 = w0 + (i64)warp * FS_GATED_SEG;
        const bool more = w0 + WINDOW < len;
        if (more) next.load(P, l, u0 + WINDOW);
        AffineMap m = identity_map();
#pragma unroll
        for (int k = 0; k < FS_GATED_SEG; ++k) m = then_step(m, cur.g(k), cur.tok(k));
        maps[buf][warp][lane] = m;
        __syncthreads();
        acc_t h = carry;
#pragma unroll
        for (int j = 0; j < FS_GATED_WARPS; ++j) {
            const acc_t after = apply(maps[buf][j][lane], carry);
            if (j == warp) h = carry;
            carry = after;
        }
        if (u0 < len && l.active) {
            if (P.checkpoints) P.checkpoints[(u0 / FS_GATED_SEG) * l.n_states + l.state] = h;
#pragma unroll
            for (int k = 0; k < FS_GATED_SEG; ++k) {
                const i64 u = u0 + k;
                if (u >= len) break;
                h = cur.g(k) * h + cur.tok(k);
                P.y[gated_at<DESC>(l, P, u)] = from_acc(cur.out(k, h));
                if (u == len - 1 && P.final_out) P.final_out[l.state] = from_acc(h);
            }
        }
        if (more) cur = next;
    }
}

template <bool DESC, bool HAS_B, bool HAS_C, bool STORED_H>
__device__ __forceinline__ void gated_backward(const GatedParams& P) {
    __shared__ AffineMap maps[2][FS_GATED_WARPS][FS_WARP];
    constexpr i64 WINDOW = FS_GATED_WARPS * FS_GATED_SEG;
    const int lane = threadIdx.x % FS_WARP, warp = threadIdx.x / FS_WARP;
    const GatedLane l = gated_lane(P);
    const i64 len = P.len;
    // lam at the first position right of the current window (grad_final past the end).
    acc_t carry = (l.active && P.grad_final) ? to_acc(P.grad_final[l.state]) : acc_t(0);
    const i64 last_window = (len - 1) / WINDOW * WINDOW;
    BackwardSegment<DESC, HAS_B, HAS_C, STORED_H> cur, next;
    cur.load(P, l, last_window + (i64)warp * FS_GATED_SEG);
    int buf = 0;
    for (i64 w0 = last_window; w0 >= 0; w0 -= WINDOW, buf ^= 1) {
        const i64 u0 = w0 + (i64)warp * FS_GATED_SEG;
        const bool more = w0 > 0;
        if (more) next.load(P, l, u0 - WINDOW);

        // The segment's adjoint map: lam at u0 + FS_GATED_SEG -> lam at u0.
        AffineMap m = identity_map();
#pragma unroll
        for (int k = FS_GATED_SEG - 1; k >= 0; --k)
            m = then_step(m, cur.g_after(k), cur.tok(k));
        maps[buf][warp][lane] = m;
        __syncthreads();
        acc_t lam = carry;
#pragma unroll
        for (int j = FS_GATED_WARPS - 1; j >= 0; --j) {
            const acc_t before = apply(maps[buf][j][lane], carry);
            if (j == warp) lam = carry;
            carry = before;
        }
        if (l.active && u0 < len) {
            acc_t h[FS_GATED_SEG];
            const acc_t h_in = cur.h_in();
            acc_t s = h_in;
#pragma unroll
            for (int k = 0; k < FS_GATED_SEG; ++k) {
                s = STORED_H ? cur.x(k) : cur.g(k) * s + token<HAS_B>(cur.b(k), cur.x(k));
                h[k] = s;
            }
#pragma unroll
            for (int k = FS_GATED_SEG - 1; k >= 0; --k) {
                const i64 u = u0 + k;
                lam = cur.g_after(k) * lam + cur.tok(k);
                if (u >= len) continue;
                const i64 at = gated_at<DESC>(l, P, u);
                const acc_t h_before = k > 0 ? h[k - 1] : h_in;
                P.grad_x[at] = from_acc(HAS_B ? lam * cur.b(k) : lam);
                P.grad_a[at] = from_acc(lam * h_before);
                if (HAS_B) P.grad_b[at] = from_acc(lam * cur.x(k));
                if (HAS_C) P.grad_c[at] = from_acc(cur.gy(k) * h[k]);
            }
            if (u0 == 0 && P.grad_initial) P.grad_initial[l.state] = from_acc(cur.g(0) * lam);
        }
        if (more) cur = next;
    }
}

// Kernel names: gated_<fwd|bwd>_r<reverse>_b<has b>_c<has c>, and scan_blocks_bwd_r<reverse>
// (the plain scan's backward from its stored h); see `kernel_name` in src/cuda/gated_scan.rs.
#define FS_GATED_KERNELS(REV, HB, HC)                                                              \
    extern "C" __global__ void __launch_bounds__(FS_GATED_WARPS * FS_WARP)                         \
        gated_fwd_r##REV##_b##HB##_c##HC(const GatedParams P) {                                    \
        gated_forward<(REV) != 0, (HB) != 0, (HC) != 0>(P);                                                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FS_GATED_WARPS * FS_WARP)                         \
        gated_bwd_r##REV##_b##HB##_c##HC(const GatedParams P) {                                    \
        gated_backward<(REV) != 0, (HB) != 0, (HC) != 0, false>(P);                                                            \
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
    extern "C" __global__ void __launch_bounds__(FS_GATED_WARPS * FS_WARP)                         \
        scan_blocks_bwd_r##REV(const GatedParams P) {                                              \
        gated_backward<(REV) != 0, false, false, true>(P);                                         \
    }
FS_SCAN_BLOCKS_BWD(0)
FS_SCAN_BLOCKS_BWD(1)
