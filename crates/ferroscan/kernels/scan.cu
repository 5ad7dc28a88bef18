// First-order scan h[t] = a[t]*h[t-1] + x[t], forward and backward, one kernel family.
//
// Both passes are the recurrence s[u] = gate[u]*s[u-1] + token[u] over a "scan position" u that
// maps to the physical time index t = DESC ? len-1-u : u:
//   forward : gate = a, token = x, s = h, started from h0;           DESC = reverse
//   backward: gate = a one position earlier (1 at u = 0), token = dL/dh, s = g = dL/dx,
//             started from dL/dh_final; dL/da = g * h_before, dL/dh0 = a[first step] * g;
//             DESC = !reverse (the backward runs against the forward).
//
// Two thread mappings:
//   rows    (inner == 1): a lane owns K consecutive positions of a 32*K tile, scans them serially
//           in registers, then the warp scans the lanes' maps. Enough rows to fill the GPU: one
//           warp walks a whole row (`apply` kernels; short rows: a segment of 8 or 16 lanes
//           each). Fewer rows: a block per chunk of a row (`lookback` kernels; also rows
//           of one chunk longer than a tile, which need no look-back); rows of several
//           chunks run a single-pass decoupled look-back (Merrill & Garland 2016). A block owns
//           one chunk of FS_LOOKBACK_CHUNK_TILES tiles, each of its warps a span of them. A
//           block takes a ticket from a counter in scratch: its work item in chunk-major order
//           (row = item % outer, chunk = item / outer), so a chunk only waits on chunks with
//           smaller items, which are already running (forward progress whatever the
//           scheduling). The warps load their spans into registers (every input element is read
//           once) and combine their maps in shared memory; warp 0 publishes the chunk's
//           affine map s -> A*s + B, folds its predecessors' published maps back to the nearest
//           one that published its end state (before chunk 0: the row's initial state),
//           publishes its own end state S = A*s_in + B, and shares s_in; each warp then rescans
//           its registers from the state entering its span. A record (A, B, S, unused) in acc_t
//           per (row, chunk) starts with every bit set, a pattern no published word has, so a
//           reader polls the values themselves: no flags and no fences, one memory round trip
//           per poll. One fill sets every bit of the counter and the records before each launch
//           (`ScratchLayout` in src/cuda/scan.rs), so a block's item is its ticket plus one
//           (rows of one chunk take their block index and have no scratch). The end state is a
//           value, not a map: the initial state is known.
//   strided (inner  > 1): one thread per (outer, inner, chunk); consecutive threads own
//           consecutive inner indices, so every load and store of a warp is coalesced. With
//           several chunks a reduce launch stores each chunk's map (A, B), and the apply launch
//           folds the maps of the chunks before its own to find its incoming state, then
//           rescans its chunk (inputs read twice).

#include "common.cuh"

// Items per lane per tile: 32 bytes of storage (two 16-byte vectors).
#define FS_ITEMS (32 / (int)sizeof(storage_t))
#define FS_ROWS_TILE (FS_WARP * FS_ITEMS)
#define FS_ROWS_WARPS 4
// One-warp-per-row kernels: issue the next tile's loads before scanning the current one. H100
// forward, (8,1536,L): float32 93% -> 95% of the roofline at L = 2048 and 8192; 16-bit types
// lose (95% -> 89%: their tiles take twice the registers, the backward 165), so not for them.
#ifndef FS_ROWS_PREFETCH
#define FS_ROWS_PREFETCH (sizeof(storage_t) >= 4)
#endif
// A look-back chunk is FS_LOOKBACK_CHUNK_TILES tiles (4096 steps in float32, 8192 in 16-bit
// types), split over the warps of a block, all held in registers. A bigger chunk spreads the
// look-back's fixed latency over more bytes; registers bound it. The forward and the backward
// may cut a chunk differently (the backward holds three inputs, the forward two). H100,
// (1,16,2^24), % of the roofline, forward / forward+backward, warps x tiles: float32 4x4 91/92
// (8x2 88/90); bfloat16 4x4 87/77, 8x2 83/87, 4x2 (4096-step chunks) 80/84. Mirrored by
// `lookback_chunk_tiles` and `lookback_warps` in src/cuda/scan.rs, which also read overrides
// from FERROSCAN_KERNEL_DEFINES, so that `FS_LOOKBACK_WARPS_BWD=N` there changes both.
#ifndef FS_LOOKBACK_CHUNK_TILES
#define FS_LOOKBACK_CHUNK_TILES 16
#endif
#ifndef FS_LOOKBACK_WARPS_FWD
#define FS_LOOKBACK_WARPS_FWD 4
#endif
#ifndef FS_LOOKBACK_WARPS_BWD
#define FS_LOOKBACK_WARPS_BWD (sizeof(storage_t) >= 4 ? 4 : 8)
#endif
#define FS_LOOKBACK_WARPS(BWD) ((BWD) ? FS_LOOKBACK_WARPS_BWD : FS_LOOKBACK_WARPS_FWD)
// Tiles per warp (a warp's span is at most that many; the last warps' spans may be shorter).
#define FS_LOOKBACK_TILES(BWD) ((FS_LOOKBACK_CHUNK_TILES + FS_LOOKBACK_WARPS(BWD) - 1) / FS_LOOKBACK_WARPS(BWD))
// Back-off between polls of a predecessor's record.
#define FS_LOOKBACK_SLEEP_NS 32
// 0: only chunk 0 publishes an end state, so every look-back folds maps back to the row's start
// (emulation tests use it to cover look-backs of several windows).
#ifndef FS_LOOKBACK_PUBLISH_STATE
#define FS_LOOKBACK_PUBLISH_STATE 1
#endif
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
    acc_t* maps;                 // strided, n_chunks > 1: (outer, n_chunks, inner) pairs (A, B);
                                 // look-back: (outer, n_chunks) records (A, B, S, unused),
                                 // every bit set at launch (unpublished)
    unsigned long long* ticket;  // look-back: the ticket counter, every bit set at launch
    i64 outer, len, inner, chunk_len, n_chunks;
};

template <bool DESC>
__device__ __forceinline__ i64 phys(i64 u, i64 len) { return DESC ? len - 1 - u : u; }

// r = the K elements from scan position u0 on, as stored (element k at run_at<DESC>(r, k)), or
// `fill` at and past `limit`.
template <bool VEC, bool DESC>
__device__ __forceinline__ void load_run(const storage_t* row, i64 len, i64 limit, i64 u0, Run<FS_ITEMS>& r,
                                         acc_t fill) {
    constexpr int K = FS_ITEMS;
    if (VEC && u0 + K <= limit) {
        r.load(row + (DESC ? len - u0 - K : u0));
    } else {
#pragma unroll
        for (int i = 0; i < Run<K>::WORDS; ++i) r.w[i] = 0;
#pragma unroll
        for (int k = 0; k < K; ++k)
            r.set(DESC ? K - 1 - k : k, (u0 + k < limit) ? to_acc(row[phys<DESC>(u0 + k, len)]) : fill);
    }
}

// Element k, in scan order, of a run that load_run filled.
template <bool DESC>
__device__ __forceinline__ acc_t run_at(const Run<FS_ITEMS>& r, int k) {
    return r.get(DESC ? FS_ITEMS - 1 - k : k);
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

// One tile of the rows mapping, in registers: a lane's K positions starting at u0, up to u_end
// (the end of the warp's chunk). The inputs stay as stored until used (16-bit types two to a
// register: half the registers of converted values, so a look-back block holds more tiles).
struct RowTile {
    i64 u0;
    Run<FS_ITEMS> g, x;  // gates and tokens
    Run<FS_ITEMS> h;     // backward: h
    acc_t g_first;       // backward: the gate of position u0, a at the position before (shift_gates)
    acc_t h_next;        // backward: h at the position after the lane's last (read by lane 31
                         //   only; the others take it from lane + 1)
    AffineMap inclusive; // the map of the tile's lanes 0..lane (after scan_tile)
};

// Tiles of W < 32 lanes: a warp serves 32 / W short rows, each on a segment of W consecutive
// lanes; `lane` stays the lane in the warp, `lane & (W - 1)` is the one in the segment, and
// `lane | (W - 1)` the segment's last.
template <int W>
__device__ __forceinline__ bool segment_first(int lane) { return (lane & (W - 1)) == 0; }
template <int W>
__device__ __forceinline__ bool segment_last(int lane) { return (lane & (W - 1)) == W - 1; }

// Issues the loads of a tile (no shuffles, so a warp can have several tiles' loads in flight).
template <bool BWD, bool DESC, bool VEC, int W = FS_WARP>
__device__ __forceinline__ void load_tile(const ScanParams& P, i64 base, i64 u_end, i64 u0, int lane, RowTile& t) {
    const i64 len = P.len;
    t.u0 = u0;
    load_run<VEC, DESC>(P.gates + base, len, u_end, u0, t.g, acc_t(1));
    load_run<VEC, DESC>(P.tokens + base, len, u_end, u0, t.x, acc_t(0));
    if (BWD) {  // h_before(u) = h at position u+1 (h0 past the end)
        load_run<VEC, DESC>(P.aux + base, len, u_end, u0, t.h, acc_t(0));
        const i64 after = u0 + FS_ITEMS;
        t.h_next = (segment_last<W>(lane) && u0 < u_end && after < len) ? to_acc(P.aux[base + phys<DESC>(after, len)])
                                                                        : acc_t(0);
    }
}

// Backward: the gate at position u is a at position u-1; `gate_before` is the gate of the
// position before the tile, and becomes the tile's last.
template <bool BWD, bool DESC, int W = FS_WARP>
__device__ __forceinline__ void shift_gates(RowTile& t, int lane, acc_t& gate_before) {
    if (!BWD) return;
    const acc_t last = run_at<DESC>(t.g, FS_ITEMS - 1);
    const acc_t from_left = __shfl_up_sync(FS_FULL_MASK, last, 1);
    const acc_t tile_last = __shfl_sync(FS_FULL_MASK, last, lane | (W - 1));
    t.g_first = segment_first<W>(lane) ? gate_before : from_left;
    gate_before = tile_last;
}

// The gate of the step at the lane's position u0 + k (1 at and past u_end).
template <bool BWD, bool DESC>
__device__ __forceinline__ acc_t tile_gate(const RowTile& t, int k, i64 u_end) {
    if (!BWD) return run_at<DESC>(t.g, k);  // loaded as 1 past u_end
    return (t.u0 + k < u_end) ? (k == 0 ? t.g_first : run_at<DESC>(t.g, k - 1)) : acc_t(1);
}

// Scans a loaded tile: sets each lane's inclusive map and returns the whole tile's map.
template <bool BWD, bool DESC, int W = FS_WARP>
__device__ __forceinline__ AffineMap scan_tile(RowTile& t, i64 u_end, int lane, acc_t& gate_before) {
    shift_gates<BWD, DESC, W>(t, lane, gate_before);
    AffineMap m = identity_map();
#pragma unroll
    for (int k = 0; k < FS_ITEMS; ++k) m = then_step(m, tile_gate<BWD, DESC>(t, k, u_end), run_at<DESC>(t.x, k));
    t.inclusive = warp_inclusive_scan<W>(m, lane & (W - 1));
    return shfl_map(t.inclusive, lane | (W - 1));
}

// Rescans a scanned tile from `state`, the state entering it, and stores its outputs.
template <bool BWD, bool DESC, bool VEC, int W = FS_WARP>
__device__ __forceinline__ void store_tile(const ScanParams& P, i64 base, i64 u_end, int lane, acc_t state,
                                           const RowTile& t, acc_t h_initial) {
    constexpr int K = FS_ITEMS;
    const i64 len = P.len, u0 = t.u0;
    AffineMap before = AffineMap{__shfl_up_sync(FS_FULL_MASK, t.inclusive.a, 1),
                                 __shfl_up_sync(FS_FULL_MASK, t.inclusive.b, 1)};
    if (segment_first<W>(lane)) before = identity_map();
    acc_t s = apply(before, state);
    if (!BWD) {
        acc_t h[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            s = tile_gate<BWD, DESC>(t, k, u_end) * s + run_at<DESC>(t.x, k);
            h[k] = s;
        }
        store_run<VEC, DESC>(P.out0 + base, len, u_end, u0, h);
    } else {
        const acc_t from_right = __shfl_down_sync(FS_FULL_MASK, run_at<DESC>(t.h, 0), 1);
        const acc_t h_after = (u0 + K >= len) ? h_initial : segment_last<W>(lane) ? t.h_next : from_right;
        acc_t grad_a[K], grad_x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const acc_t h_before =
                (k + 1 < K) ? ((u0 + k + 1 < len) ? run_at<DESC>(t.h, k + 1) : h_initial) : h_after;
            s = tile_gate<BWD, DESC>(t, k, u_end) * s + run_at<DESC>(t.x, k);
            grad_x[k] = s;
            grad_a[k] = s * h_before;
        }
        store_run<VEC, DESC>(P.out0 + base, len, u_end, u0, grad_a);
        store_run<VEC, DESC>(P.out1 + base, len, u_end, u0, grad_x);
    }
}

// The row's last state, as `final_out` wants it (backward: dL/dh0 = a[first step] * g).
template <bool BWD, bool DESC, int W = FS_WARP>
__device__ __forceinline__ void store_final(const ScanParams& P, i64 row, int lane, acc_t state) {
    if (!segment_first<W>(lane) || !P.final_out) return;
    const acc_t f = BWD ? to_acc(P.gates[row * P.len + phys<DESC>(P.len - 1, P.len)]) * state : state;
    P.final_out[row] = from_acc(f);
}

// Rows mapping, one chunk per row (n_chunks == 1): a warp walks its row tile by tile; or, for
// rows of at most W * FS_ITEMS steps, W < 32 lanes walk each of the warp's 32 / W rows (a row of
// 128 16-bit steps would leave three quarters of a 32-lane tile empty).
template <bool BWD, bool DESC, bool VEC, int W>
__device__ __forceinline__ void scan_rows(const ScanParams& P) {
    constexpr int TILE = W * FS_ITEMS;
    const int lane = threadIdx.x % FS_WARP;
    const i64 first_row = ((i64)blockIdx.x * FS_ROWS_WARPS + threadIdx.x / FS_WARP) * (FS_WARP / W);
    if (first_row >= P.outer) return;  // the whole warp
    const i64 row = first_row + lane / W;
    // A segment past the last row takes part in the shuffles with an empty row.
    const bool active = row < P.outer;
    const i64 len = P.len, limit = active ? len : 0, base = active ? row * len : 0;
    acc_t state = (active && P.initial) ? to_acc(P.initial[row]) : acc_t(0);
    acc_t gate_before = acc_t(1);
    const acc_t h_initial = (BWD && active && P.aux_state) ? to_acc(P.aux_state[row]) : acc_t(0);
    const i64 lane_start = (i64)(lane & (W - 1)) * FS_ITEMS;
    // FS_ROWS_PREFETCH: the next tile's loads are issued before this tile is scanned and stored,
    // so a warp keeps two tiles of loads in flight.
    RowTile t;
    load_tile<BWD, DESC, VEC, W>(P, base, limit, lane_start, lane, t);
    for (i64 tile = 0; tile < len; tile += TILE) {
        RowTile next;
        const bool more = tile + TILE < len;
        if (FS_ROWS_PREFETCH && more) load_tile<BWD, DESC, VEC, W>(P, base, limit, tile + TILE + lane_start, lane, next);
        const AffineMap tile_map = scan_tile<BWD, DESC, W>(t, limit, lane, gate_before);
        store_tile<BWD, DESC, VEC, W>(P, base, limit, lane, state, t, h_initial);
        state = apply(tile_map, state);
        if (!more) break;
        if (!FS_ROWS_PREFETCH) load_tile<BWD, DESC, VEC, W>(P, base, limit, tile + TILE + lane_start, lane, next);
        t = next;
    }
    if (active) store_final<BWD, DESC, W>(P, row, lane, state);
}

__device__ __forceinline__ acc_t load_volatile(const acc_t* p) { return *(const volatile acc_t*)p; }

// Look-back records start with every bit set (the launcher fills them with 0xff bytes): a NaN
// pattern that `publishable` keeps out of published values, so each word tells by itself whether
// it has been written. A reader needs no flag, and no fence between a flag and the values.
__device__ __forceinline__ bool unpublished(acc_t v) {
#if FS_DTYPE == 3
    return (__double2hiint(v) & __double2loint(v)) == -1;
#else
    return __float_as_uint(v) == 0xFFFFFFFFu;
#endif
}
// The all-ones NaN becomes its negation, another NaN.
__device__ __forceinline__ acc_t publishable(acc_t v) { return unpublished(v) ? -v : v; }

// Lane 0 publishes a chunk's map (A, B) in words 0 and 1 of its record.
__device__ __forceinline__ void publish_map(const ScanParams& P, i64 record, int lane, AffineMap map) {
    if (lane != 0) return;
    volatile acc_t* r = P.maps + 4 * record;
    r[0] = publishable(map.a);
    r[1] = publishable(map.b);
}

// Lane 0 publishes the state at a chunk's end in word 2 of its record.
__device__ __forceinline__ void publish_state(const ScanParams& P, i64 record, int lane, acc_t end_state) {
    if (lane == 0) *(volatile acc_t*)(P.maps + 4 * record + 2) = publishable(end_state);
}

// The state entering chunk `chunk` of `row`: the predecessors' maps, 32 chunks per round (lane
// 31 the nearest), folded back to the nearest predecessor with a published end state (or the
// row's initial state, "published" before chunk 0).
__device__ __forceinline__ acc_t look_back(const ScanParams& P, i64 row, i64 chunk, int lane) {
    const i64 first = row * P.n_chunks;
    const acc_t initial = P.initial ? to_acc(P.initial[row]) : acc_t(0);
    AffineMap later = identity_map();  // the chunks between the current window and `chunk`
    for (i64 end = chunk;; end -= FS_WARP) {
        const i64 j = end - FS_WARP + lane;
        const acc_t* r = P.maps + 4 * (first + max(j, (i64)0));  // read only when j >= 0
        acc_t a, b, s;
        bool has_state, has_map;
        for (;;) {  // poll until every chunk of the window has published its map or its end state
            a = (j >= 0) ? load_volatile(r) : acc_t(0);
            b = (j >= 0) ? load_volatile(r + 1) : acc_t(0);
            s = (j >= 0) ? load_volatile(r + 2) : initial;
            has_state = j < 0 || !unpublished(s);
            has_map = !unpublished(a) && !unpublished(b);
            if (__ballot_sync(FS_FULL_MASK, !has_state && !has_map) == 0u) break;
            __nanosleep(FS_LOOKBACK_SLEEP_NS);
        }
        const unsigned with_state = __ballot_sync(FS_FULL_MASK, has_state);
        const int nearest = with_state ? FS_WARP - 1 - __clz((int)with_state) : -1;
        AffineMap m = identity_map();
        if (lane == nearest) {
            m = AffineMap{acc_t(0), s};  // the state at the end of chunk j, whatever came before
        } else if (lane > nearest) {
            m = AffineMap{a, b};
        }
        later = compose(shfl_map(warp_inclusive_scan(m, lane), FS_WARP - 1), later);
        if (with_state) return later.b;
    }
}

// Rows mapping, several chunks per row: one chunk per warp, single pass with decoupled look-back.
template <bool BWD, bool DESC, bool VEC>
__device__ __forceinline__ void scan_rows_lookback(const ScanParams& P) {
    constexpr int WARPS = FS_LOOKBACK_WARPS(BWD), T = FS_LOOKBACK_TILES(BWD);
    const int lane = threadIdx.x % FS_WARP, warp = threadIdx.x / FS_WARP;
    // A block's ticket is its chunk-major work item: the block's warps split the chunk into
    // consecutive spans, combine their maps in shared memory, and warp 0 alone looks back.
    // Rows of one chunk wait on nobody: their block index is their item, and they have no
    // scratch (no counter, no records).
    __shared__ i64 block_item;
    __shared__ AffineMap warp_maps[WARPS];
    __shared__ acc_t chunk_state_in;
    if (threadIdx.x == 0)  // the counter starts at 2^64 - 1
        block_item = P.n_chunks == 1 ? (i64)blockIdx.x : (i64)(atomicAdd(P.ticket, 1ull) + 1ull);
    __syncthreads();
    const i64 item = block_item;
    if (item >= P.outer * P.n_chunks) return;  // the whole block
    const i64 row = item % P.outer, chunk = item / P.outer;
    const i64 len = P.len, base = row * len;
    const i64 chunk_begin = chunk * P.chunk_len;
    const i64 chunk_end = min(len, chunk_begin + P.chunk_len);
    // Whole tiles per warp; the launcher's chunk must fit the warps' registers.
    constexpr int STRIDE = WARPS * FS_ROWS_TILE;
    const i64 span = (P.chunk_len + STRIDE - 1) / STRIDE * FS_ROWS_TILE;
    if (span > T * FS_ROWS_TILE) __trap();
    const i64 u_begin = min(chunk_end, chunk_begin + warp * span);
    const i64 u_end = min(chunk_end, u_begin + span);
    const i64 record = row * P.n_chunks + chunk;
    const bool last = chunk == P.n_chunks - 1;

    RowTile t[T];
#pragma unroll
    for (int i = 0; i < T; ++i)
        load_tile<BWD, DESC, VEC>(P, base, u_end, u_begin + i * FS_ROWS_TILE + (i64)lane * FS_ITEMS, lane, t[i]);
    acc_t gate_before = (BWD && u_begin > 0) ? to_acc(P.gates[base + phys<DESC>(u_begin - 1, len)]) : acc_t(1);
    AffineMap tile_map[T], warp_map = identity_map();
#pragma unroll
    for (int i = 0; i < T; ++i) {
        tile_map[i] = scan_tile<BWD, DESC>(t[i], u_end, lane, gate_before);
        warp_map = compose(warp_map, tile_map[i]);
    }
    if (lane == 0) warp_maps[warp] = warp_map;
    __syncthreads();

    if (warp == 0) {
        AffineMap chunk_map = identity_map();
#pragma unroll
        for (int w = 0; w < WARPS; ++w) chunk_map = compose(chunk_map, warp_maps[w]);
        acc_t state_in;
        if (chunk == 0) {
            state_in = P.initial ? to_acc(P.initial[row]) : acc_t(0);
        } else {
            if (!last) publish_map(P, record, lane, chunk_map);
            state_in = look_back(P, row, chunk, lane);
        }
        if (!last && (FS_LOOKBACK_PUBLISH_STATE || chunk == 0))
            publish_state(P, record, lane, apply(chunk_map, state_in));
        if (lane == 0) chunk_state_in = state_in;
    }
    __syncthreads();

    acc_t state = chunk_state_in;
    for (int w = 0; w < warp; ++w) state = apply(warp_maps[w], state);
    const acc_t h_initial = (BWD && P.aux_state) ? to_acc(P.aux_state[row]) : acc_t(0);
#pragma unroll
    for (int i = 0; i < T; ++i) {
        store_tile<BWD, DESC, VEC>(P, base, u_end, lane, state, t[i], h_initial);
        state = apply(tile_map[i], state);
    }
    // The last warp's span ends the chunk (empty spans are identities).
    if (last && warp == WARPS - 1) store_final<BWD, DESC>(P, row, lane, state);
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

// Kernel names: scan_rows_<fwd|bwd>_apply_r<reverse>[_vec]_w<lanes per row: 32, 16, 8>,
// scan_rows_<fwd|bwd>_lookback_r<reverse>[_vec] and
// scan_strided_<fwd|bwd>_<reduce|apply>_r<reverse>; see `kernel_name` in src/cuda/scan.rs.
// `reverse` is the user's flag: the backward scans against it.
#define FS_ROWS_APPLY_KERNEL(PASS, BWD, REV, VEC, SUFFIX, W)                                       \
    extern "C" __global__ void __launch_bounds__(FS_ROWS_WARPS * FS_WARP)                          \
        scan_rows_##PASS##_apply_r##REV##SUFFIX##_w##W(const ScanParams P) {                       \
        scan_rows<BWD, (BWD) != (REV), VEC, W>(P);                                                 \
    }
#define FS_ROWS_KERNELS(PASS, BWD, REV, VEC, SUFFIX)                                              \
    FS_ROWS_APPLY_KERNEL(PASS, BWD, REV, VEC, SUFFIX, 32)                                          \
    FS_ROWS_APPLY_KERNEL(PASS, BWD, REV, VEC, SUFFIX, 16)                                          \
    FS_ROWS_APPLY_KERNEL(PASS, BWD, REV, VEC, SUFFIX, 8)                                           \
    extern "C" __global__ void __launch_bounds__(FS_LOOKBACK_WARPS(BWD) * FS_WARP)                 \
        scan_rows_##PASS##_lookback_r##REV##SUFFIX(const ScanParams P) {                           \
        scan_rows_lookback<BWD, (BWD) != (REV), VEC>(P);                                           \
    }
#define FS_STRIDED_KERNEL(PASS, BWD, PHASE, REDUCE, REV)                                           \
    extern "C" __global__ void __launch_bounds__(FS_STRIDED_THREADS)                               \
        scan_strided_##PASS##_##PHASE##_r##REV(const ScanParams P) {                               \
        scan_strided<BWD, (BWD) != (REV), REDUCE>(P);                                              \
    }
#define FS_ALL_KERNELS(PASS, BWD, REV)                                                             \
    FS_ROWS_KERNELS(PASS, BWD, REV, false, )                                                       \
    FS_ROWS_KERNELS(PASS, BWD, REV, true, _vec)                                                    \
    FS_STRIDED_KERNEL(PASS, BWD, reduce, true, REV)                                                \
    FS_STRIDED_KERNEL(PASS, BWD, apply, false, REV)

FS_ALL_KERNELS(fwd, false, 0)
FS_ALL_KERNELS(fwd, false, 1)
FS_ALL_KERNELS(bwd, true, 0)
FS_ALL_KERNELS(bwd, true, 1)
