// First-order scan h[t] = a[t]*h[t-1] + x[t], forward and backward, one kernel family.
//
// Both passes are the recurrence s[u] = gate[u]*s[u-1] + token[u] over a "scan position" u that
// maps to the physical time index t = DESC ? len-1-u : u:
//   forward : gate = a, token = x, s = h, started from h0;           DESC = reverse
//   backward: gate = a one position earlier (1 at u = 0), token = dL/dh, s = g = dL/dx,
//             started from dL/dh_final; dL/da = g * h_before, dL/dh0 = a[first step] * g;
//             DESC = !reverse (the backward runs against the forward).
//
// Long sequences are cut into chunks along u. With several chunks a reduce launch stores each
// chunk's affine map s -> A*s + B, and the apply launch folds the maps of the chunks before
// its own (no extra launch) to find its incoming state, then rescans its chunk.
//
// Two thread mappings:
//   rows    (inner == 1): one warp per (row, chunk); a lane owns K consecutive positions of a
//           32*K tile, scans them serially in registers, then the warp scans the lanes' maps.
//   strided (inner  > 1): one thread per (outer, inner, chunk); consecutive threads own
//           consecutive inner indices, so every load and store of a warp is coalesced.

#include "common.cuh"

// Items per lane per tile: 32 bytes of storage (two 16-byte vectors).
#define FS_ITEMS (32 / (int)sizeof(storage_t))
#define FS_ROWS_WARPS 4
#define FS_STRIDED_THREADS 256
#define FS_STRIDED_UNROLL 8

// Mirrored by `ScanParams` in src/cuda/scan.rs; keep the two in the same order.
struct ScanParams {
    const storage_t* gates;      // a
    const storage_t* tokens;     // forward: x;  backward: dL/dh
    const storage_t* initial;    // forward: h0; backward: dL/dh_final   (may be null: zeros)
    const storage_t* aux;        // backward: h (forward output)
    const storage_t* aux_state;  // backward: h0                          (may be null: zeros)
    storage_t* out0;             // forward: h;  backward: dL/da
    storage_t* out1;             // backward: dL/dx
    storage_t* final_out;        // forward: h_final; backward: dL/dh0     (may be null: skipped)
    acc_t* maps;                 // (outer, n_chunks, inner) pairs (A, B); only with n_chunks > 1
    i64 outer, len, inner, chunk_len, n_chunks;
};

template <bool DESC>
__device__ __forceinline__ i64 phys(i64 u, i64 len) { return DESC ? len - 1 - u : u; }

// v[k] = element at scan position u0 + k, or `fill` at and past `limit`.
template <bool VEC, bool DESC>
__device__ __forceinline__ void load_run(const storage_t* row, i64 len, i64 limit, i64 u0,
                                         acc_t (&v)[FS_ITEMS], acc_t fill) {
    constexpr int K = FS_ITEMS;
    if (VEC && u0 + K <= limit) {
        Run<K> r;
        r.load(row + (DESC ? len - u0 - K : u0));
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = r.get(DESC ? K - 1 - k : k);
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = (u0 + k < limit) ? to_acc(row[phys<DESC>(u0 + k, len)]) : fill;
    }
}

template <bool VEC, bool DESC>
__device__ __forceinline__ void store_run(storage_t* row, i64 len, i64 limit, i64 u0, const acc_t (&v)[FS_ITEMS]) {
    constexpr int K = FS_ITEMS;
    if (VEC && u0 + K <= limit) {
        Run<K> r;
#pragma unroll
        for (int i = 0; i < Run<K>::WORDS; ++i) r.w[i] = 0;
#pragma unroll
        for (int k = 0; k < K; ++k) r.set(DESC ? K - 1 - k : k, v[k]);
        r.store(row + (DESC ? len - u0 - K : u0));
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k)
            if (u0 + k < limit) row[phys<DESC>(u0 + k, len)] = from_acc(v[k]);
    }
}

template <bool BWD, bool DESC, bool VEC, bool REDUCE>
__device__ __forceinline__ void scan_rows(const ScanParams& P) {
    constexpr int K = FS_ITEMS;
    constexpr int TILE = FS_WARP * K;
    const int lane = threadIdx.x % FS_WARP;
    const i64 item = (i64)blockIdx.x * FS_ROWS_WARPS + threadIdx.x / FS_WARP;
    if (item >= P.outer * P.n_chunks) return;
    const i64 row = item / P.n_chunks, chunk = item % P.n_chunks;
    if (REDUCE && chunk == P.n_chunks - 1) return;  // nobody reads the last chunk's map
    const i64 len = P.len;
    const i64 u_begin = chunk * P.chunk_len;
    const i64 u_end = min(len, u_begin + P.chunk_len);
    const i64 base = row * len;
    const storage_t* gates = P.gates + base;
    const storage_t* tokens = P.tokens + base;

    acc_t state = 0;
    AffineMap total = identity_map();
    if (!REDUCE) {
        state = P.initial ? to_acc(P.initial[row]) : acc_t(0);
        for (i64 j0 = 0; j0 < chunk; j0 += FS_WARP) {
            AffineMap m = identity_map();
            if (j0 + lane < chunk) {
                const acc_t* mp = P.maps + 2 * (row * P.n_chunks + j0 + lane);
                m = AffineMap{mp[0], mp[1]};
            }
            state = apply(shfl_map(warp_inclusive_scan(m, lane), FS_WARP - 1), state);
        }
    }
    acc_t gate_before = (BWD && u_begin > 0) ? to_acc(gates[phys<DESC>(u_begin - 1, len)]) : acc_t(1);
    const acc_t h_initial = (BWD && P.aux_state) ? to_acc(P.aux_state[row]) : acc_t(0);

    for (i64 tile = u_begin; tile < u_end; tile += TILE) {
        const i64 u0 = tile + (i64)lane * K;
        acc_t g[K], x[K];
        load_run<VEC, DESC>(gates, len, u_end, u0, g, acc_t(1));
        load_run<VEC, DESC>(tokens, len, u_end, u0, x, acc_t(0));
        if (BWD) {  // the gate at position u is a at position u-1
            const acc_t last = g[K - 1];
            const acc_t from_left = __shfl_up_sync(FS_FULL_MASK, last, 1);
            const acc_t tile_last = __shfl_sync(FS_FULL_MASK, last, FS_WARP - 1);
#pragma unroll
            for (int k = K - 1; k > 0; --k) g[k] = (u0 + k < u_end) ? g[k - 1] : acc_t(1);
            g[0] = (u0 < u_end) ? (lane == 0 ? gate_before : from_left) : acc_t(1);
            gate_before = tile_last;
        }
        AffineMap m = identity_map();
#pragma unroll
        for (int k = 0; k < K; ++k) m = then_step(m, g[k], x[k]);
        const AffineMap inclusive = warp_inclusive_scan(m, lane);
        const AffineMap tile_map = shfl_map(inclusive, FS_WARP - 1);
        if (REDUCE) {
            total = compose(total, tile_map);
            continue;
        }
        AffineMap before = AffineMap{__shfl_up_sync(FS_FULL_MASK, inclusive.a, 1),
                                     __shfl_up_sync(FS_FULL_MASK, inclusive.b, 1)};
        if (lane == 0) before = identity_map();
        acc_t s = apply(before, state);
        state = apply(tile_map, state);
        if (!BWD) {
            acc_t h[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                s = g[k] * s + x[k];
                h[k] = s;
            }
            store_run<VEC, DESC>(P.out0 + base, len, u_end, u0, h);
        } else {
            // h_before(u) = h at position u+1 (h0 past the end).
            acc_t h[K];
            load_run<VEC, DESC>(P.aux + base, len, u_end, u0, h, acc_t(0));
            const acc_t from_right = __shfl_down_sync(FS_FULL_MASK, h[0], 1);
            const i64 after = u0 + K;
            acc_t h_after = from_right;
            if (after >= len) h_after = h_initial;
            else if (lane == FS_WARP - 1) h_after = to_acc(P.aux[base + phys<DESC>(after, len)]);
            acc_t grad_a[K], grad_x[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const acc_t h_before = (k + 1 < K) ? ((u0 + k + 1 < len) ? h[k + 1] : h_initial) : h_after;
                s = g[k] * s + x[k];
                grad_x[k] = s;
                grad_a[k] = s * h_before;
            }
            store_run<VEC, DESC>(P.out0 + base, len, u_end, u0, grad_a);
            store_run<VEC, DESC>(P.out1 + base, len, u_end, u0, grad_x);
        }
    }
    if (REDUCE) {
        if (lane == 0) {
            acc_t* mp = P.maps + 2 * (row * P.n_chunks + chunk);
            mp[0] = total.a;
            mp[1] = total.b;
        }
        return;
    }
    if (chunk == P.n_chunks - 1 && lane == 0 && P.final_out) {
        const acc_t f = BWD ? to_acc(gates[phys<DESC>(len - 1, len)]) * state : state;
        P.final_out[row] = from_acc(f);
    }
}

template <bool BWD, bool DESC, bool REDUCE>
__device__ __forceinline__ void scan_strided(const ScanParams& P) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 inner = P.inner, len = P.len;
    if (idx >= P.outer * inner * P.n_chunks) return;
    const i64 q = idx % inner;
    const i64 p = (idx / inner) % P.outer;
    const i64 chunk = idx / inner / P.outer;
    if (REDUCE && chunk == P.n_chunks - 1) return;
    const i64 u_begin = chunk * P.chunk_len;
    const i64 u_end = min(len, u_begin + P.chunk_len);
    const i64 base = p * len * inner + q;
    const i64 state_at = p * inner + q;
#define FS_AT(u) (base + phys<DESC>((u), len) * inner)

    acc_t state = 0;
    AffineMap total = identity_map();
    if (!REDUCE) {
        state = P.initial ? to_acc(P.initial[state_at]) : acc_t(0);
        for (i64 j = 0; j < chunk; ++j) {
            const acc_t* mp = P.maps + 2 * ((p * P.n_chunks + j) * inner + q);
            state = apply(AffineMap{mp[0], mp[1]}, state);
        }
    }
    acc_t gate_before = (BWD && u_begin > 0) ? to_acc(P.gates[FS_AT(u_begin - 1)]) : acc_t(1);
    const acc_t h_initial = (BWD && P.aux_state) ? to_acc(P.aux_state[state_at]) : acc_t(0);

    // Steps in blocks of FS_STRIDED_UNROLL: all loads of a block are issued before its serial
    // recurrence, so each thread keeps many independent loads in flight.
    for (i64 u0 = u_begin; u0 < u_end; u0 += FS_STRIDED_UNROLL) {
        acc_t g[FS_STRIDED_UNROLL], x[FS_STRIDED_UNROLL], h_before[FS_STRIDED_UNROLL];
#pragma unroll
        for (int k = 0; k < FS_STRIDED_UNROLL; ++k) {
            const i64 u = u0 + k;
            const bool inside = u < u_end;
            g[k] = inside ? to_acc(P.gates[FS_AT(u)]) : acc_t(1);
            x[k] = inside ? to_acc(P.tokens[FS_AT(u)]) : acc_t(0);
            if (BWD && !REDUCE) h_before[k] = !inside ? acc_t(0) : (u + 1 < len) ? to_acc(P.aux[FS_AT(u + 1)]) : h_initial;
        }
#pragma unroll
        for (int k = 0; k < FS_STRIDED_UNROLL; ++k) {
            const i64 u = u0 + k;
            if (u >= u_end) break;
            acc_t gate = g[k];
            if (BWD) {  // the gate at position u is a at position u-1
                gate = gate_before;
                gate_before = g[k];
            }
            if (REDUCE) {
                total = then_step(total, gate, x[k]);
                continue;
            }
            state = gate * state + x[k];
            if (!BWD) {
                P.out0[FS_AT(u)] = from_acc(state);
            } else {
                P.out0[FS_AT(u)] = from_acc(state * h_before[k]);
                P.out1[FS_AT(u)] = from_acc(state);
            }
        }
    }
    if (REDUCE) {
        acc_t* mp = P.maps + 2 * ((p * P.n_chunks + chunk) * inner + q);
        mp[0] = total.a;
        mp[1] = total.b;
        return;
    }
    if (chunk == P.n_chunks - 1 && P.final_out) {
        const acc_t f = BWD ? to_acc(P.gates[FS_AT(len - 1)]) * state : state;
        P.final_out[state_at] = from_acc(f);
    }
#undef FS_AT
}

// Kernel names: scan_<rows|strided>_<fwd|bwd>_<reduce|apply>_r<reverse>[_vec]; see
// `kernel_name` in src/cuda/scan.rs. `reverse` is the user's flag: the backward scans against it.
#define FS_ROWS_KERNEL(PASS, BWD, PHASE, REDUCE, REV, VEC, SUFFIX)                                   \
    extern "C" __global__ void __launch_bounds__(FS_ROWS_WARPS * FS_WARP)                          \
        scan_rows_##PASS##_##PHASE##_r##REV##SUFFIX(const ScanParams P) {                          \
        scan_rows<BWD, (BWD) != (REV), VEC, REDUCE>(P);                                            \
    }
#define FS_STRIDED_KERNEL(PASS, BWD, PHASE, REDUCE, REV)                                           \
    extern "C" __global__ void __launch_bounds__(FS_STRIDED_THREADS)                               \
        scan_strided_##PASS##_##PHASE##_r##REV(const ScanParams P) {                               \
        scan_strided<BWD, (BWD) != (REV), REDUCE>(P);                                              \
    }
#define FS_ALL_KERNELS(PASS, BWD, PHASE, REDUCE, REV)                                              \
    FS_ROWS_KERNEL(PASS, BWD, PHASE, REDUCE, REV, false, )                                         \
    FS_ROWS_KERNEL(PASS, BWD, PHASE, REDUCE, REV, true, _vec)                                      \
    FS_STRIDED_KERNEL(PASS, BWD, PHASE, REDUCE, REV)

FS_ALL_KERNELS(fwd, false, reduce, true, 0)
FS_ALL_KERNELS(fwd, false, reduce, true, 1)
FS_ALL_KERNELS(fwd, false, apply, false, 0)
FS_ALL_KERNELS(fwd, false, apply, false, 1)
FS_ALL_KERNELS(bwd, true, reduce, true, 0)
FS_ALL_KERNELS(bwd, true, reduce, true, 1)
FS_ALL_KERNELS(bwd, true, apply, false, 0)
FS_ALL_KERNELS(bwd, true, apply, false, 1)
