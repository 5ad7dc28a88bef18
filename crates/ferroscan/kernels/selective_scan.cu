// Selective scan (Mamba's S6), forward and backward. The maths and the buffer layouts are those of
// src/selective.rs; the launch plan (grid, channel tiles, configurations, scratch) is in
// src/cuda/selective_scan.rs.
//
// Compiled once per number kind, pass and configuration, by the prefix the launcher's sources add:
//   FS_SEL_COMPLEX 0|1   real or complex A, B, C and states (complex as interleaved (re, im))
//   FS_SEL_PASS    0|1   forward kernels, or backward kernels with their two reductions
//   FS_SEL_CONFIGS       the configuration (P, S) (see the end of the file)
//
// Thread mapping (both passes). A block of 128 threads owns one batch element b and a tile of
// `ct` consecutive channels, all in one group of every variable B/C (so B/C are staged once per
// block in shared memory for all its channels). Thread `tid` serves channel c = tid / P of the tile
// and states n = (tid % P)·S + s, s < S, of it (P lanes per channel, P·S >= N; states past N are
// zero and stay zero). Threads with c >= ct (or past dim) are idle: they read zeros, take part in
// every shuffle and barrier, and write nothing. Each block walks the whole time axis, carrying
// its states in registers.
//
// Forward, per chunk of T steps: stage Δ = softplus(delta + bias), u, z and variable B/C in shared
// memory (loads coalesced along whichever axis has unit stride), run the steps (one exp2 per state
// and step), reduce y over the P lanes of a channel (a reduce-scatter over groups of steps, so
// every lane gets one finished y), write `out` coalesced. The state entering every 16th step is
// saved (the checkpoints) when the backward will run.
//
// Backward, per 16-step segment from the last: stage the segment's Δ, u, dout·silu(z) and
// dout·silu'(z); from the segment's checkpoint rebuild the states of a window of TS steps in
// registers (TS = 64 / (S·parts): windows are walked last first, their starting states found by a
// forward sweep through the earlier windows), then run the adjoint recurrence backwards through the
// window. Per-(channel, step) sums over states (∂u, ∂Δ, y for ∂z) are reduce-scattered over the P
// lanes; per-(step, state) sums over channels (∂B, ∂C when variable) are parked per channel in
// shared memory, summed over the block's channels in a fixed order every few steps, and written per
// tile to scratch, which `selective_reduce_bc` sums over the tiles of a group in tile order. Per-channel
// parameter gradients (∂A, ∂D, ∂delta_bias, constant ∂B/∂C) accumulate in registers, go to scratch
// per (batch, channel), and `selective_reduce_params` sums them over the batch in order. No
// atomics anywhere: the gradients are bit-identical from run to run.

#include "common.cuh"

#ifndef FS_SEL_COMPLEX
#error "FS_SEL_COMPLEX must be defined (0 real, 1 complex)"
#endif
#ifndef FS_SEL_PASS
#error "FS_SEL_PASS must be defined (0 forward, 1 backward)"
#endif

#define FS_SEL_THREADS 128
#define FS_SEL_CK 16                  // CHECKPOINT_STEPS in src/selective.rs
#ifndef FS_SEL_SMEM
#define FS_SEL_SMEM (48 * 1024)  // static shared memory per block (host emulation may raise it)
#endif
#define FS_SEL_HREGS 64               // registers per thread for a backward window's states
#define FS_SEL_PARTS (FS_SEL_COMPLEX ? 2 : 1)
// Resident blocks per multiprocessor the compiler must allow (__launch_bounds__), which caps the
// registers per thread; and whether the forward loads the next chunk during the current one.
#ifndef FS_SEL_FWD_MIN_BLOCKS
#define FS_SEL_FWD_MIN_BLOCKS 3
#endif
#ifndef FS_SEL_BWD_MIN_BLOCKS
#define FS_SEL_BWD_MIN_BLOCKS (FS_SEL_COMPLEX ? 2 : 3)  // complex states need more registers
#endif
// selective_carry keeps no states or gradients: one block more fits in its registers without
// spilling (except the N > 128 configurations, a few bytes) and hides more of its latency.
#ifndef FS_SEL_CARRY_MIN_BLOCKS
#define FS_SEL_CARRY_MIN_BLOCKS (FS_SEL_COMPLEX ? 3 : 4)
#endif
// Step groups of the forward unrolled together, so that one group's exp2s and shared-memory loads
// overlap the previous group's y reduction (H100, N = 16, float32: (4,1536,8192) forward 0.648 ->
// 0.625-0.630 ms). Only where registers allow it without spilling (see fwd_steps).
#ifndef FS_SEL_FWD_GROUP_UNROLL
#define FS_SEL_FWD_GROUP_UNROLL 2
#endif
#ifndef FS_SEL_FWD_PREFETCH
#define FS_SEL_FWD_PREFETCH 1
#endif
#define FS_SEL_LOG2E 1.4426950408889634
#define FS_SEL_LN2 0.6931471805599453
#define FS_SEL_SOFTPLUS_THRESHOLD 20.0f

// Element strides of a tensor, outermost axis first (passed by value: no local-memory copies).
template <int R>
struct Strides {
    i64 s[R];
};

// Mirrored by `SelectiveParams` in src/cuda/selective_scan.rs; keep the two in the same order.
struct SelParams {
    const storage_t* u;
    const storage_t* delta;
    const storage_t* z;           // may be null
    const storage_t* dout;        // backward
    const acc_t* A;               // (dim, N)
    const acc_t* D;               // (dim,), may be null
    const acc_t* bias;            // (dim,), may be null
    const acc_t* initial;         // (batch, dim, N), may be null
    const acc_t* grad_last;       // backward, may be null
    const acc_t* b_const;         // (dim, N) when B is constant, else null
    const storage_t* b_var;       // (batch, G, N, L·parts) when B is variable, else null
    const acc_t* c_const;
    const storage_t* c_var;
    storage_t* out;               // forward (batch, dim, L)
    acc_t* last;                  // forward, may be null
    acc_t* ckpt;                  // forward: written when non-null; backward: read
    storage_t* du;                // backward outputs (batch, dim, L)
    storage_t* ddelta;
    storage_t* dz;                // may be null
    acc_t* dinitial;              // may be null
    acc_t* part_params;           // (batch, chunks, dim, 3·N·parts + 2)
    acc_t* part_b;                // (batch, tiles, N, L·parts) when B is variable
    acc_t* part_c;
    acc_t* part_carry;            // backward over chunks: (batch, carry pieces, dim, N·parts + 1)
    i64 batch, dim, len, dstate, n_ck;
    i64 chunks, chunk_cks;        // backward: time chunks, checkpoints (16-step segments) per chunk
    i64 carry_pieces;             // backward over chunks: selective_carry's pieces per row (passed, not
                                  // derived: the 64-bit division cost the chunked backward spills)
    Strides<3> u_s, delta_s, z_s, dout_s;
    Strides<4> b_s, c_s;
    i64 b_groups, c_groups;       // 0 when constant
    i64 ct, tiles;                // channels per tile, tiles per batch element (dim = tiles·ct, rounded up)
    int softplus;
    int carry_split;              // backward over chunks: selective_carry's pieces per time chunk
};
static_assert(sizeof(SelParams) == 456, "SelParams must match SelectiveParams in src/cuda/selective_scan.rs");

// Mirrored by `SelectiveReduceParams` in src/cuda/selective_scan.rs.
struct SelReduceParams {
    const acc_t* src;             // part_params, or part_b / part_c
    acc_t* da;
    acc_t* db;                    // constant B's gradient, may be null
    acc_t* dc;
    acc_t* dd;                    // may be null
    acc_t* dbias;                 // may be null
    storage_t* dvar;              // variable B/C's gradient (batch, G, N, L·parts)
    i64 batch, dim, len, dstate, groups, tiles, ct;
};
static_assert(sizeof(SelReduceParams) == 112, "SelReduceParams must match SelectiveReduceParams");

// ---------------------------------------------------------------------------------------------
// Real or complex numbers
// ---------------------------------------------------------------------------------------------

// Base-2 exp and log: exact in float64, else the hardware's approximations (flushing subnormals).
#if FS_DTYPE == 3
__device__ __forceinline__ acc_t fexp2(acc_t x) { return exp2(x); }
__device__ __forceinline__ acc_t flog2(acc_t x) { return log2(x); }
#else
__device__ __forceinline__ acc_t fexp2(acc_t x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ acc_t flog2(acc_t x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// 1 / (1 + e^-x), with the hardware's approximate exp2 and division outside float64 (relative
// error a few ulp; a large negative x gives 0, not NaN).
__device__ __forceinline__ acc_t sigmoid_(acc_t x) {
#if FS_DTYPE == 3
    return acc_t(1) / (acc_t(1) + exp(-x));
#else
    return __fdividef(1.0f, 1.0f + fexp2(-x * (float)FS_SEL_LOG2E));
#endif
}

#if FS_SEL_COMPLEX
struct num_t {
    acc_t re, im;
};
__device__ __forceinline__ num_t nmake(acc_t re, acc_t im) { return num_t{re, im}; }
__device__ __forceinline__ num_t nzero() { return num_t{0, 0}; }
__device__ __forceinline__ num_t nadd(num_t a, num_t b) { return num_t{a.re + b.re, a.im + b.im}; }
__device__ __forceinline__ num_t nmul(num_t a, num_t b) {
    return num_t{a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
__device__ __forceinline__ num_t nscale(num_t a, acc_t w) { return num_t{a.re * w, a.im * w}; }
__device__ __forceinline__ num_t nconj(num_t a) { return num_t{a.re, -a.im}; }
__device__ __forceinline__ acc_t nre(num_t a) { return a.re; }
__device__ __forceinline__ acc_t npart(num_t a, int part) { return part ? a.im : a.re; }
// `a2` holds A with its real part times log2(e): exp(Δ·A) = 2^(Δ·re) · (cos(Δ·im) + i sin(Δ·im)).
__device__ __forceinline__ num_t ndecay(acc_t dt, num_t a2) {
    const acc_t m = fexp2(dt * a2.re);
    acc_t s, c;
#if FS_DTYPE == 3
    sincos(dt * a2.im, &s, &c);
#else
    sincosf(dt * a2.im, &s, &c);
#endif
    return num_t{m * c, m * s};
}
__device__ __forceinline__ num_t nlog2_scaled(num_t a) { return num_t{a.re * acc_t(FS_SEL_LOG2E), a.im}; }
#define FS_SEL_OUT_FACTOR acc_t(2)
#else
typedef acc_t num_t;
__device__ __forceinline__ num_t nmake(acc_t re, acc_t) { return re; }
__device__ __forceinline__ num_t nzero() { return 0; }
__device__ __forceinline__ num_t nadd(num_t a, num_t b) { return a + b; }
__device__ __forceinline__ num_t nmul(num_t a, num_t b) { return a * b; }
__device__ __forceinline__ num_t nscale(num_t a, acc_t w) { return a * w; }
__device__ __forceinline__ num_t nconj(num_t a) { return a; }
__device__ __forceinline__ acc_t nre(num_t a) { return a; }
__device__ __forceinline__ acc_t npart(num_t a, int) { return a; }
__device__ __forceinline__ num_t ndecay(acc_t dt, num_t a2) { return fexp2(dt * a2); }
__device__ __forceinline__ num_t nlog2_scaled(num_t a) { return a * acc_t(FS_SEL_LOG2E); }
#define FS_SEL_OUT_FACTOR acc_t(1)
#endif

// Number k of an interleaved buffer of acc_t.
__device__ __forceinline__ num_t nload(const acc_t* p, i64 k) {
#if FS_SEL_COMPLEX
    return num_t{p[2 * k], p[2 * k + 1]};
#else
    return p[k];
#endif
}
__device__ __forceinline__ void nstore(acc_t* p, i64 k, num_t v) {
#if FS_SEL_COMPLEX
    p[2 * k] = v.re;
    p[2 * k + 1] = v.im;
#else
    p[k] = v;
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp reduce-scatter
// ---------------------------------------------------------------------------------------------

// One level per lane bit D = LO, 2·LO, ..., HI/2. While the vector is longer than one value, a
// lane keeps the half its bit selects and adds its partner's copy of that half; after that the
// single value is summed with the partner's. Returns the offset of the kept values.
template <int LEN, int D, int HI, int M>
__device__ __forceinline__ int rs_levels(acc_t (&v)[M], int lane) {
    if constexpr (D >= HI) {
        return 0;
    } else if constexpr (LEN > 1) {
        constexpr int H = LEN / 2;
        const bool upper = (lane & D) != 0;
#pragma unroll
        for (int i = 0; i < H; ++i) {
            const acc_t send = upper ? v[i] : v[i + H];
            const acc_t keep = upper ? v[i + H] : v[i];
            v[i] = keep + __shfl_xor_sync(FS_FULL_MASK, send, D);
        }
        return (upper ? H : 0) + rs_levels<H, 2 * D, HI, M>(v, lane);
    } else {
        v[0] += __shfl_xor_sync(FS_FULL_MASK, v[0], D);
        return rs_levels<1, 2 * D, HI, M>(v, lane);
    }
}

// Reduce-scatter of the M values of each lane over the HI/LO lanes whose indices differ only in
// bits LO..HI/2 (powers of two, HI <= 32): afterwards v[0..RsCount) of a lane are the sums over
// those lanes of the original entries [off, off + RsCount), off being returned. When M is smaller
// than the lane count, the lanes whose bits above LO·M are not all zero hold duplicates.
template <int LO, int HI, int M>
__device__ __forceinline__ int reduce_scatter(acc_t (&v)[M], int lane) {
    return rs_levels<M, LO, HI, M>(v, lane);
}

// Which channel of the block's tile, and which part of its states, thread `tid` serves. The P lanes
// of a channel sit FS_WARP/P apart in the warp, so the eight lanes of a quarter-warp serve eight
// channels at the same states: their 16-byte loads of B and C share one address, a broadcast.
// With a channel's lanes adjacent instead, a quarter-warp reads four addresses, and a warp-wide
// LDS.128 of that pattern costs the multiprocessor about 4.1 cycles against 2.6 (H100
// microbenchmark): B and C loads are as many per state-step as the exp2s, so that is the forward's
// second bottleneck. The reductions over a channel's lanes run over lane bits STRIDE..FS_WARP/2.
template <int P>
struct ChannelLanes {
    static_assert(P <= FS_WARP && FS_WARP % P == 0, "a channel's lanes within one warp");
    static constexpr int STRIDE = FS_WARP / P;  // lane distance between a channel's lanes
    static __device__ __forceinline__ int channel(int tid) { return tid / FS_WARP * STRIDE + tid % STRIDE; }
    static __device__ __forceinline__ int part(int tid) { return tid % FS_WARP / STRIDE; }
};

template <int M, int LANES>
struct RsCount {
    static constexpr int value = M >= LANES ? M / LANES : 1;
};

// ---------------------------------------------------------------------------------------------
// Staging into shared memory
// ---------------------------------------------------------------------------------------------
//
// Every tile goes through registers: a thread first issues all of its loads of a tile (slots
// independent of each other, so they are in flight together), and stores them to shared memory
// later. Loading element by element into shared memory would serialize one global-memory latency
// per element; loading one chunk ahead hides the latency behind the previous chunk's arithmetic.

// threadIdx.x read afresh where it is used: the tiles' slot positions derive from it, and as
// loop-invariant values the compiler would keep all of them (dozens per tile) in registers across
// the chunk loop instead of recomputing them with a few integer instructions.
__device__ __forceinline__ int fresh_tid() {
#ifdef __CUDA_ARCH__
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
    return tid;
#else
    return threadIdx.x;  // host emulation
#endif
}

// Rows and steps of a tile starting at channel c0 and step t0 that lie inside the tensor.
__device__ __forceinline__ int tile_rows(i64 c0, i64 ct, i64 dim) { return (int)min(ct, dim - c0); }
template <int T>
__device__ __forceinline__ int tile_steps(i64 t0, i64 len) { return (int)min((i64)T, len - t0); }

// Storage elements per 16-byte vector: the consecutive steps one vector load or store moves.
#define FS_SEL_VEC (16 / (int)sizeof(storage_t))

// Whether every run of FS_SEL_VEC elements starting at a multiple of FS_SEL_VEC along the last
// axis of a tensor at p is one aligned 16-byte vector: unit stride there, the other strides
// multiples of the vector, and p aligned.
template <int R>
__device__ __forceinline__ bool vector_ready(const storage_t* p, const Strides<R>& st) {
    bool ok = st.s[R - 1] == 1 && reinterpret_cast<unsigned long long>(p) % 16 == 0;
#pragma unroll
    for (int k = 0; k < R - 1; ++k) ok = ok && st.s[k] % FS_SEL_VEC == 0;
    return ok;
}

template <int R>
__device__ __forceinline__ bool same_strides(const Strides<R>& a, const Strides<R>& b) {
    bool same = true;
#pragma unroll
    for (int k = 0; k < R; ++k) same = same && a.s[k] == b.s[k];
    return same;
}

// W 32-bit words (1, 2 or 4) as one global-memory access: a 4-, 8- or 16-byte vector.
template <int W>
__device__ __forceinline__ void load_words(unsigned* w, const storage_t* p) {
    static_assert(W == 1 || W == 2 || W == 4, "4-, 8- or 16-byte vectors");
    if constexpr (W == 4) {
        const uint4 x = *reinterpret_cast<const uint4*>(p);
        w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
    } else if constexpr (W == 2) {
        const uint2 x = *reinterpret_cast<const uint2*>(p);
        w[0] = x.x, w[1] = x.y;
    } else {
        w[0] = *reinterpret_cast<const unsigned*>(p);
    }
}
// The store spelled out as one vector store: as a plain assignment, NVVM split it into scalar
// stores in kernels where it sits among shared-memory reads.
template <int W>
__device__ __forceinline__ void store_words(storage_t* p, const unsigned* w) {
    static_assert(W == 1 || W == 2 || W == 4, "4-, 8- or 16-byte vectors");
    if constexpr (W == 4)
        __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
    else if constexpr (W == 2)
        __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    else
        __stwb(reinterpret_cast<unsigned*>(p), w[0]);
}

// Where this thread's vector slots of whole tiles start, found once per block: an element
// offset from a tensor's start, at step 0 (a tile at step t0 starts t0·parts values further). It
// is the same for every tensor with the strides it was made for, so one offset (two registers)
// serves all of them; `ready` has the bits of the tensors that take it. Recomputing the 64-bit
// addresses from the strides took a few dozen integer instructions per tile and chunk.
template <int R>
struct VectorCursor {
    i64 off;
    Strides<R> st;   // the strides the offset was made for (read where it is made, not kept)
    bool usable;     // the tiles can go as vectors at all (whole rows; B/C: a state below N)
    unsigned ready;

    // The tensor of bit `bit` (at p with strides s) takes the cursor when `also` holds too.
    __device__ __forceinline__ void take(unsigned bit, const storage_t* p, const Strides<R>& s, bool also = true) {
        if (usable && also && p && same_strides(s, st) && vector_ready(p, s)) ready |= bit;
    }
};

// A thread's register share of a staged tile: KS scalar slots (a value per word, two words in
// float64), or KV vector slots of V values packed as loaded (V·size / 4 words each), in the same
// words: a tile uses one layout at a time.
template <int KS, int KV, int V = FS_SEL_VEC>
struct SlotWords {
    static constexpr int WPS = sizeof(storage_t) > 4 ? 2 : 1;
    static constexpr int WPV = V * (int)sizeof(storage_t) / 4;  // words per vector
    static constexpr int NW = KS * WPS > KV * WPV ? KS * WPS : KV * WPV;
    unsigned w[NW];

    // Scalar slot i: one value per word for the 16-bit types (unpacked), else as packed.
    __device__ __forceinline__ void set(int i, storage_t x) {
#if FS_DTYPE == 0 || FS_DTYPE == 1
        w[i] = x;
#else
        pack_value(w, i, x);
#endif
    }
    __device__ __forceinline__ acc_t get(int i) const {
#if FS_DTYPE == 0 || FS_DTYPE == 1
        return to_acc((storage_t)w[i]);
#else
        return unpack_value(w, i);
#endif
    }
    __device__ __forceinline__ void load_vector(int i, const storage_t* p) { load_words<WPV>(w + WPV * i, p); }
    __device__ __forceinline__ void zero_vector(int i) {
#pragma unroll
        for (int k = 0; k < WPV; ++k) w[WPV * i + k] = 0;
    }
    // Value j of vector slot i.
    __device__ __forceinline__ acc_t vget(int i, int j) const { return unpack_value(w, i * V + j); }
};

// Writes v[0..V), rounded to storage, as the vector at p.
template <int V>
__device__ __forceinline__ void store_vector(storage_t* p, const acc_t* v) {
    constexpr int W = V * (int)sizeof(storage_t) / 4;
    unsigned w[W];
#pragma unroll
    for (int j = 0; j < V; ++j) pack_value(w, j, v[j]);
    store_words<W>(p, w);
}

// V consecutive values of a shared-memory row (or of global scratch, in `selective_reduce_bc`),
// moved as one: 128-bit accesses, or one 64-bit access for a run of 8 bytes (the address must be
// a multiple of the run's size in bytes, or of 16).
template <int V>
struct alignas(V * sizeof(acc_t) == 8 ? 8 : 16) AccRun {
    static_assert(V * sizeof(acc_t) == 8 || V * sizeof(acc_t) % 16 == 0, "a run is 8 bytes or whole 16-byte vectors");
    acc_t x[V];
};
template <int V>
__device__ __forceinline__ AccRun<V> lds_run(const acc_t* p) {
    return *reinterpret_cast<const AccRun<V>*>(p);
}

// Row length (in values) of the (channel, step) tiles staged in shared memory for T steps: 4 times
// an odd number, so that a row's runs of 4 are 16-byte aligned and the 8 channels of a warp (4
// lanes or more each, reading one step) hit distinct banks.
template <int T>
struct StagedRow {
    static_assert(T % 8 == 0, "T + 4 is an odd multiple of 4");
    static constexpr int value = T + 4;
};

// Whether slot i of this thread (element tid + i·THREADS of COUNT) exists: only the last slot of a
// thread can fall past COUNT.
template <int COUNT>
__device__ __forceinline__ bool slot_exists(int i) {
    constexpr int SLOTS = (COUNT + FS_SEL_THREADS - 1) / FS_SEL_THREADS;
    return COUNT % FS_SEL_THREADS == 0 || i < SLOTS - 1 || (int)fresh_tid() + i * FS_SEL_THREADS < COUNT;
}

// How a thread's slots of a tile are laid out.
enum TileMode { TILE_TIME = 0, TILE_CHANNELS = 1, TILE_VECTORS = 2 };

// A ROWS x T tile of a (batch, dim, time) tensor held in registers, its slots laid out one of three
// ways (consecutive threads always on the axis of unit stride):
//  - TILE_VECTORS (whole tiles of a vector_ready tensor): vector slot i is the V steps from
//    (c + i·DCV, t), one load of 16 bytes, or of V values when each thread has fewer: the 16-bit
//    backward's 32 x 16 tiles go as one 8-byte vector per thread (as scalars they took four loads
//    and a dozen integer instructions each);
//  - TILE_TIME / TILE_CHANNELS: scalar slot i is element e = tid + i·THREADS of the tile; because
//    T and ROWS divide THREADS, it sits at (c + i·dc, t + i·dt) for per-thread origins (c, t) and
//    constant steps (dc, dt), so one running pointer serves all slots with 32-bit offsets the
//    compiler folds.
// Values are zero outside the tensor (channel c >= ct or past dim, step past len). Full tiles skip
// the bounds checks.
template <int ROWS, int T>
struct TileRegs {
    static_assert(FS_SEL_THREADS % T == 0 && FS_SEL_THREADS % ROWS == 0, "slots evenly spaced");
    static constexpr int E = ROWS * T;
    static constexpr int K = (E + FS_SEL_THREADS - 1) / FS_SEL_THREADS;  // scalar slots
    static constexpr int PER_THREAD = E / FS_SEL_THREADS;
    static constexpr int V = PER_THREAD < 2 || PER_THREAD >= FS_SEL_VEC ? FS_SEL_VEC : PER_THREAD;
    static constexpr int RV = T / V;                                      // vectors per row
    static_assert(T % V == 0 && FS_SEL_THREADS % RV == 0, "whole vectors, evenly spaced");
    static constexpr int KV = (E / V + FS_SEL_THREADS - 1) / FS_SEL_THREADS;  // vector slots
    static constexpr int DCV = FS_SEL_THREADS / RV;                       // channels between vector slots
    // Vectors only where every thread has whole vector slots: smaller tiles would need more
    // registers for them than for scalars.
    static constexpr bool VECTORS = (E / V) % FS_SEL_THREADS == 0;
    SlotWords<K, VECTORS ? KV : 0, V> r;
    int mode;

    __device__ __forceinline__ void origin(int& c, int& t, int& dc, int& dt) const {
        const unsigned e = fresh_tid();
        const bool time_fast = mode == TILE_TIME;
        c = time_fast ? e / T : e % ROWS;
        t = time_fast ? e % T : e / ROWS;
        dc = time_fast ? FS_SEL_THREADS / T : 0;
        dt = time_fast ? 0 : FS_SEL_THREADS / ROWS;
    }
    // Whether scalar / vector slot i of this thread lies in the tile.
    static __device__ __forceinline__ bool exists(int i) { return slot_exists<E>(i); }
    static __device__ __forceinline__ bool vexists(int i) { return slot_exists<E / V>(i); }
    // Where vector slot 0 of this thread starts (slot i is DCV·i channels further).
    static __device__ __forceinline__ void vorigin(int& c, int& t) {
        c = (int)fresh_tid() / RV;
        t = (int)fresh_tid() % RV * V;
    }
    // The cursor of tiles of rows c0.. of batch element b, for tensors with strides st: vectors
    // when the tiles have all ROWS rows.
    static __device__ __forceinline__ VectorCursor<3> cursor(Strides<3> st, i64 b, i64 c0, i64 ct, i64 dim) {
        int c, t;
        vorigin(c, t);
        return {b * st.s[0] + (c0 + c) * st.s[1] + t, st, VECTORS && tile_rows(c0, ct, dim) == ROWS, 0u};
    }
    // Vector slots from p (this thread's slot 0), channels `step` values apart.
    __device__ __forceinline__ void load_vectors(const storage_t* p, i64 step) {
        mode = TILE_VECTORS;
#pragma unroll
        for (int i = 0; i < KV; ++i, p += step) r.load_vector(i, p);
    }
    // Loads the tile at step t0: as vectors from the block's cursor when the tensor takes it
    // (`vec`, cursor offset `off`) and the tile is whole; as vectors from its own offset when it
    // does not (other strides) but could; else scalar slots.
    __device__ __forceinline__ void load(bool vec, i64 off, const storage_t* src, Strides<3> st, i64 b, i64 c0,
                                         i64 ct, i64 dim, i64 t0, i64 len) {
        if constexpr (VECTORS) {
            if (vec && t0 + T <= len) return load_vectors(src + off + t0, DCV * st.s[1]);
        }
        const int rows = tile_rows(c0, ct, dim), steps = tile_steps<T>(t0, len);
        const bool full = rows == ROWS && steps == T;
        if constexpr (VECTORS) {
            if (!vec && full && vector_ready(src, st))
                return load_vectors(src + cursor(st, b, c0, ct, dim).off + t0, DCV * st.s[1]);
        }
        mode = st.s[2] == 1 || st.s[1] != 1 ? TILE_TIME : TILE_CHANNELS;
        int c, t, dc, dt;
        origin(c, t, dc, dt);
        const storage_t* p = src + b * st.s[0] + (c0 + c) * st.s[1] + (t0 + t) * st.s[2];
        const i64 step = dc * st.s[1] + dt * st.s[2];
        if (full) {
#pragma unroll
            for (int i = 0; i < K; ++i, p += step) r.set(i, exists(i) ? *p : storage_t(0));
        } else {
#pragma unroll
            for (int i = 0; i < K; ++i, p += step)
                r.set(i, exists(i) && c + i * dc < rows && t + i * dt < steps ? *p : storage_t(0));
        }
    }
    // Calls f(c, t, value, inside) for every element of the tile.
    template <class F>
    __device__ __forceinline__ void each(i64 c0, i64 ct, i64 dim, i64 t0, i64 len, F f) const {
        if constexpr (VECTORS) {
            if (mode == TILE_VECTORS) {
                int c, t;
                vorigin(c, t);
#pragma unroll
                for (int i = 0; i < KV; ++i)
#pragma unroll
                    for (int j = 0; j < V; ++j) f(c + i * DCV, t + j, r.vget(i, j), true);
                return;
            }
        }
        int c, t, dc, dt;
        origin(c, t, dc, dt);
        const int rows = tile_rows(c0, ct, dim), steps = tile_steps<T>(t0, len);
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const int ci = c + i * dc, ti = t + i * dt;
            if (exists(i)) f(ci, ti, r.get(i), ci < rows && ti < steps);
        }
    }
    // Stores the tile to dst[c·ROW + t] as transform(c, value), and zero outside the tensor;
    // vector slots as 128-bit stores (ROW a multiple of 4 keeps them aligned).
    template <int ROW, class F>
    __device__ __forceinline__ void stage(acc_t* dst, i64 c0, i64 ct, i64 dim, i64 t0, i64 len, F transform) const {
        static_assert(ROW % 4 == 0, "aligned rows");
        if constexpr (VECTORS) {
            if (mode == TILE_VECTORS) {
                int c, t;
                vorigin(c, t);
#pragma unroll
                for (int i = 0; i < KV; ++i) {
                    const int ci = c + i * DCV;
                    AccRun<V> run;
#pragma unroll
                    for (int j = 0; j < V; ++j) run.x[j] = transform(ci, r.vget(i, j));
                    *reinterpret_cast<AccRun<V>*>(dst + ci * ROW + t) = run;
                }
                return;
            }
        }
        each(c0, ct, dim, t0, len,
             [&](int ci, int ti, acc_t x, bool in) { dst[ci * ROW + ti] = in ? transform(ci, x) : acc_t(0); });
    }
};

// Writes a ROWS x T tile of a contiguous (batch, dim, L) output whose element (b, c0, t0) is
// dst[0]: value(c, t) for every element inside (rows x steps of it). Consecutive threads go along
// time; a whole tile of an output whose rows start on vector boundaries goes out as vectors of
// the tile's V steps, else element by element.
template <int ROWS, int T, class F>
__device__ __forceinline__ void write_tile(storage_t* dst, i64 L, int rows, int steps, F value) {
    using Tile = TileRegs<ROWS, T>;
    constexpr int V = Tile::V;
    if (rows == ROWS && steps == T && L % V == 0 &&
        reinterpret_cast<unsigned long long>(dst) % (V * sizeof(storage_t)) == 0) {
        int c, t;
        Tile::vorigin(c, t);
        storage_t* p = dst + c * L + t;
#pragma unroll
        for (int i = 0; i < Tile::KV; ++i) {
            if (!Tile::vexists(i)) continue;
            acc_t x[V];
#pragma unroll
            for (int j = 0; j < V; ++j) x[j] = value(c + i * Tile::DCV, t + j);
            store_vector<V>(p + i * Tile::DCV * L, x);
        }
        return;
    }
    constexpr int DC = FS_SEL_THREADS / T;
    const int c = (int)fresh_tid() / T, t = (int)fresh_tid() % T;
    storage_t* p = dst + c * L + t;
#pragma unroll
    for (int i = 0; i < Tile::K; ++i) {
        const int ci = c + i * DC;
        if (Tile::exists(i) && ci < rows && t < steps) p[i * DC * L] = from_acc(value(ci, t));
    }
}

// Steps t0..t0+T of a variable B/C (group g of batch b) in registers, stored to shared memory as
// dst[(t·NP + n)·parts + part]; zeros past N or past len. Slots as TileRegs', the rows being states
// and the columns (step, part) pairs: 16-byte vectors along time for whole chunks of a
// vector_ready tensor (see vslot); else scalar slots along time (the usual layout: slot i is
// (n + i·DN, step and part fixed)), or along states (the general slot formula).
template <int NP, int T>
struct BcRegs {
    static constexpr int PT = FS_SEL_PARTS;
    static constexpr int E = NP * T * PT;
    static constexpr int K = (E + FS_SEL_THREADS - 1) / FS_SEL_THREADS;
    static constexpr int DN = FS_SEL_THREADS / (T * PT);  // time-fast: states between slots
    static_assert(FS_SEL_THREADS % (T * PT) == 0 && E % FS_SEL_THREADS == 0, "time-fast slots evenly spaced");
    static constexpr int V = FS_SEL_VEC;
    static_assert((T * PT) % V == 0, "whole vectors");
    static constexpr int KV = (E / V + FS_SEL_THREADS - 1) / FS_SEL_THREADS;
    // Vectors where they fill whole warps: a few more registers than scalars when they do not
    // fill every thread, but staging scalars along time would cost 8-way bank conflicts.
    static constexpr bool VECTORS = (E / V) % FS_WARP == 0;
    SlotWords<K, VECTORS ? KV : 0> r;
    int mode;

    static __device__ __forceinline__ bool vexists(int i) { return slot_exists<E / V>(i); }

    // Vector slot i as its state n and first (step, part) column tp. Consecutive threads take
    // consecutive states (then the next vector of each): their scattered stores to shared memory
    // then fall on distinct banks, which consecutive columns of one state would not.
    static __device__ __forceinline__ void vslot(int i, int& n, int& tp) {
        const int e = (int)fresh_tid() + i * FS_SEL_THREADS;
        n = e % NP;
        tp = e / NP * V;
    }

    // Scalar slot i as (n, t, part), consecutive threads on the axis of unit stride.
    __device__ __forceinline__ bool slot(int i, int& n, int& t, int& part) const {
        const int e = fresh_tid() + i * FS_SEL_THREADS;
        int tp;
        if (mode == TILE_TIME) {
            n = e / (T * PT);
            tp = e % (T * PT);
        } else {
            n = e % NP;
            tp = e / NP;
        }
        t = tp / PT;
        part = tp % PT;
        return e < E;
    }
    // Vector slot i lies THREADS / NP · V columns after slot 0, at the same state, when NP divides
    // the block (so one cursor serves every slot).
    static constexpr bool CURSOR = VECTORS && FS_SEL_THREADS % NP == 0;
    static constexpr int VSTEP = FS_SEL_THREADS / NP * V;

    // The cursor of group g of batch element b, for tensors with strides st: vectors when this
    // thread's state is below N. Threads past N load without a cursor, which gives them zero
    // vectors in the same slots (the block's slots must cover the tile in one layout).
    static __device__ __forceinline__ VectorCursor<4> cursor(Strides<4> st, i64 b, i64 g, i64 n_states) {
        int n, tp;
        vslot(0, n, tp);
        return {b * st.s[0] + g * st.s[1] + n * st.s[2] + tp, st, CURSOR && n < n_states, 0u};
    }
    __device__ __forceinline__ void load(bool vec, i64 off, const storage_t* src, Strides<4> st, i64 b, i64 g,
                                         i64 n_states, i64 t0, i64 len) {
        if constexpr (CURSOR) {
            if (vec && t0 + T <= len) {
                mode = TILE_VECTORS;
                const storage_t* p = src + off + t0 * PT;
#pragma unroll
                for (int i = 0; i < KV; ++i) {
                    if (vexists(i))
                        r.load_vector(i, p + i * VSTEP);
                    else
                        r.zero_vector(i);
                }
                return;
            }
        }
        load(src, st, b, g, n_states, t0, len);
    }
    // Without a cursor: a tile loaded once, or a thread or tensor that does not take the cursor.
    __device__ __forceinline__ void load(const storage_t* src, Strides<4> st, i64 b, i64 g, i64 n_states, i64 t0,
                                         i64 len) {
        const storage_t* base = src + b * st.s[0] + g * st.s[1];
        const int states = (int)n_states;
        if constexpr (VECTORS) {
            if (t0 + T <= len && vector_ready(src, st)) {
                mode = TILE_VECTORS;
                const storage_t* p = base + t0 * PT;
#pragma unroll
                for (int i = 0; i < KV; ++i) {
                    int n, tp;
                    vslot(i, n, tp);
                    if (n < states && vexists(i))
                        r.load_vector(i, p + n * st.s[2] + tp);
                    else
                        r.zero_vector(i);
                }
                return;
            }
        }
        mode = st.s[3] == 1 || st.s[2] != 1 ? TILE_TIME : TILE_CHANNELS;
        if (mode == TILE_TIME) {
            int n, t, part;
            slot(0, n, t, part);
            const bool step_in = t0 + t < len;
            const storage_t* p = base + n * st.s[2] + ((t0 + t) * PT + part) * st.s[3];
            const i64 step = DN * st.s[2];
#pragma unroll
            for (int i = 0; i < K; ++i, p += step) r.set(i, step_in && n + i * DN < states ? *p : storage_t(0));
            return;
        }
#pragma unroll
        for (int i = 0; i < K; ++i) {
            int n, t, part;
            const bool in = slot(i, n, t, part) && n < n_states && t0 + t < len;
            r.set(i, in ? base[n * st.s[2] + ((t0 + t) * PT + part) * st.s[3]] : storage_t(0));
        }
    }
    __device__ __forceinline__ void store(acc_t* dst) const {
        if constexpr (VECTORS) {
            if (mode == TILE_VECTORS) {
#pragma unroll
                for (int i = 0; i < KV; ++i) {
                    int n, tp;
                    vslot(i, n, tp);
                    if (!vexists(i)) continue;
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        const int t = (tp + j) / PT, part = (tp + j) % PT;
                        dst[(t * NP + n) * PT + part] = r.vget(i, j);
                    }
                }
                return;
            }
        }
        if (mode == TILE_TIME) {
            int n, t, part;
            slot(0, n, t, part);
            acc_t* q = dst + (t * NP + n) * PT + part;
#pragma unroll
            for (int i = 0; i < K; ++i) q[i * DN * PT] = r.get(i);
            return;
        }
#pragma unroll
        for (int i = 0; i < K; ++i) {
            int n, t, part;
            if (slot(i, n, t, part)) dst[(t * NP + n) * PT + part] = r.get(i);
        }
    }
};

// Stages steps t0..t0+T of a variable B/C right away (no load ahead).
template <int NP, int T>
__device__ __forceinline__ void stage_bc(const storage_t* src, Strides<4> st, i64 b, i64 g, i64 n_states,
                                         i64 t0, i64 len, acc_t* dst) {
    BcRegs<NP, T> r;
    r.load(src, st, b, g, n_states, t0, len);
    r.store(dst);
}

// Number n of step t of a staged B/C tile.
template <int NP>
__device__ __forceinline__ num_t bc_at(const acc_t* s, int t, int n) {
#if FS_SEL_COMPLEX
    return num_t{s[2 * (t * NP + n)], s[2 * (t * NP + n) + 1]};
#else
    return s[t * NP + n];
#endif
}

// B (or C) of lane l's S states at step t: from the staged tile when variable (`var` non-null),
// with 16-byte shared-memory loads where the values fill them, else the constant weights.
template <int NP, int S, bool VAR>
__device__ __forceinline__ void lane_bc_of(const acc_t* tile, int t, int l, const num_t (&constant)[S], num_t (&out)[S]) {
    constexpr int PT = FS_SEL_PARTS, M = S * PT;
    if constexpr (!VAR) {
#pragma unroll
        for (int s = 0; s < S; ++s) out[s] = constant[s];
#if FS_DTYPE != 3
    } else if constexpr (M % 4 == 0 && NP % 4 == 0) {
        acc_t r[M];
        const float4* v = reinterpret_cast<const float4*>(tile + (t * NP + l * S) * PT);
#pragma unroll
        for (int q = 0; q < M / 4; ++q) {
            const float4 x = v[q];
            r[4 * q] = x.x;
            r[4 * q + 1] = x.y;
            r[4 * q + 2] = x.z;
            r[4 * q + 3] = x.w;
        }
#pragma unroll
        for (int s = 0; s < S; ++s) out[s] = nmake(r[s * PT], PT == 2 ? r[s * PT + PT - 1] : acc_t(0));
#endif
    } else {
#pragma unroll
        for (int s = 0; s < S; ++s) out[s] = bc_at<NP>(tile, t, l * S + s);
    }
}

// As lane_bc_of, variable or constant as `var` says.
template <int NP, int S>
__device__ __forceinline__ void lane_bc(bool var, const acc_t* tile, int t, int l, const num_t (&constant)[S],
                                        num_t (&out)[S]) {
    if (var)
        lane_bc_of<NP, S, true>(tile, t, l, constant, out);
    else
        lane_bc_of<NP, S, false>(tile, t, l, constant, out);
}

// log(1 + e^r), r past the threshold as is (as mamba). Outside float64, with e = e^r from the
// hardware's approximate exp2: below e = 1/16, where 1 + e would round away e's low bits, the
// series e - e²/2 + ... - e⁶/6 (relative error under (1/16)⁶/7 ≈ 1e-8); above, log2(1 + e)·ln 2.
// Both are computed and one is selected: no branches per element.
__device__ __forceinline__ acc_t softplus_(acc_t r) {
#if FS_DTYPE == 3
    return r > acc_t(FS_SEL_SOFTPLUS_THRESHOLD) ? r : log1p(exp(r));
#else
    const float e = fexp2(fminf(r, FS_SEL_SOFTPLUS_THRESHOLD) * (float)FS_SEL_LOG2E);
    float q = -1.0f / 6.0f;
    q = fmaf(q, e, 1.0f / 5.0f);
    q = fmaf(q, e, -1.0f / 4.0f);
    q = fmaf(q, e, 1.0f / 3.0f);
    q = fmaf(q, e, -1.0f / 2.0f);
    q = fmaf(q, e, 1.0f);
    const float p = e < 0.0625f ? q * e : flog2(1.0f + e) * (float)FS_SEL_LN2;
    return r > FS_SEL_SOFTPLUS_THRESHOLD ? r : p;
#endif
}

// 1 - e^-x for x >= 0: softplus'(r) = sigmoid(r) from Δ = softplus(r) (1 past the threshold,
// where Δ = r). Outside float64: below x = 1/16 the series x - x²/2 + ... + x⁵/120 (relative error
// under (1/16)⁵/720 ≈ 1e-9), where 1 - e^-x would cancel; above, 1 - 2^(-x·log2 e). Both computed,
// one selected (expm1 cost a few dozen instructions with branches).
__device__ __forceinline__ acc_t one_minus_exp_neg(acc_t x) {
#if FS_DTYPE == 3
    return -expm1(-x);
#else
    float q = 1.0f / 120.0f;
    q = fmaf(q, x, -1.0f / 24.0f);
    q = fmaf(q, x, 1.0f / 6.0f);
    q = fmaf(q, x, -1.0f / 2.0f);
    q = fmaf(q, x, 1.0f);
    return x < 0.0625f ? q * x : 1.0f - fexp2(-x * (float)FS_SEL_LOG2E);
#endif
}

// Δ = delta + bias of a tile in registers (softplus'd when asked) to s_dt, rows ROW apart; zero
// outside the tensor. The softplus choice is made once per tile, not per element.
template <int ROW, int ROWS, int T>
__device__ __forceinline__ void stage_delta(const TileRegs<ROWS, T>& r, const SelParams& Q, const acc_t* s_bias,
                                            acc_t* s_dt, i64 c0, i64 t0) {
    if (Q.softplus)
        r.template stage<ROW>(s_dt, c0, Q.ct, Q.dim, t0, Q.len,
                              [&](int cc, acc_t v) { return softplus_(v + s_bias[cc]); });
    else
        r.template stage<ROW>(s_dt, c0, Q.ct, Q.dim, t0, Q.len, [&](int cc, acc_t v) { return v + s_bias[cc]; });
}

// A tile in registers to shared memory as it is (zeros outside the tensor).
template <int ROW, int ROWS, int T>
__device__ __forceinline__ void stage_plain(const TileRegs<ROWS, T>& r, const SelParams& Q, acc_t* dst, i64 c0,
                                            i64 t0) {
    r.template stage<ROW>(dst, c0, Q.ct, Q.dim, t0, Q.len, [](int, acc_t v) { return v; });
}

// delta_bias of the block's channels to s_bias (zero past the tile or dim, or without a bias).
template <int ROWS>
__device__ __forceinline__ void stage_bias(const SelParams& Q, i64 c0, acc_t* s_bias) {
    for (int cc = threadIdx.x; cc < ROWS; cc += FS_SEL_THREADS)
        s_bias[cc] = (Q.bias && cc < Q.ct && c0 + cc < Q.dim) ? Q.bias[c0 + cc] : acc_t(0);
}

// The per-thread constants of a channel's states: A (and A with log2(e) folded in), constant
// B and C (zeros when variable or past N).
template <int S>
struct Weights {
    num_t a[S], a2[S], b[S], c[S];
    __device__ __forceinline__ void load(const SelParams& Q, i64 d, int lane_in_channel, bool active) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const i64 n = (i64)lane_in_channel * S + s;
            const bool ok = active && n < Q.dstate;
            a[s] = ok ? nload(Q.A, d * Q.dstate + n) : nzero();
            a2[s] = nlog2_scaled(a[s]);
            b[s] = (ok && Q.b_const) ? nload(Q.b_const, d * Q.dstate + n) : nzero();
            c[s] = (ok && Q.c_const) ? nload(Q.c_const, d * Q.dstate + n) : nzero();
        }
    }
};

// The vector cursors of a block's tiles: one for the (batch, dim, time) tensors with u's strides
// (bits CURSOR_DELTA..CURSOR_Z of `tiles`), one for variable B and C with B's (bits of `bc`).
enum CursorBit : unsigned { CURSOR_DELTA = 1, CURSOR_U = 2, CURSOR_DOUT = 4, CURSOR_Z = 8, CURSOR_B = 1, CURSOR_C = 2 };
struct BlockCursors {
    i64 tile_off, bc_off;
    unsigned tiles, bc;
};
template <class Tile, class Bc>
__device__ __forceinline__ BlockCursors block_cursors(const SelParams& Q, i64 b, i64 c0, i64 gb, i64 gc) {
    VectorCursor<3> kt = Tile::cursor(Q.u_s, b, c0, Q.ct, Q.dim);
    kt.take(CURSOR_DELTA, Q.delta, Q.delta_s);
    kt.take(CURSOR_U, Q.u, Q.u_s);
    kt.take(CURSOR_DOUT, Q.dout, Q.dout_s);
    kt.take(CURSOR_Z, Q.z, Q.z_s);
    VectorCursor<4> kbc = Bc::cursor(Q.b_s, b, gb, Q.dstate);
    kbc.take(CURSOR_B, Q.b_var, Q.b_s);
    kbc.take(CURSOR_C, Q.c_var, Q.c_s, gc == gb);
    return {kt.off, kbc.off, kt.ready, kbc.ready};
}

// ---------------------------------------------------------------------------------------------
// Shared-memory plans (bytes must stay within FS_SEL_SMEM; the launcher only picks configurations
// that fit: see `max_dstate` in src/cuda/selective_scan.rs)
// ---------------------------------------------------------------------------------------------

#define FS_SEL_FWD_BYTES(P, S, T) \
    ((3 * (FS_SEL_THREADS / (P)) * ((T) + 4) + (FS_SEL_THREADS / (P)) + 2 * (T) * (P) * (S) * FS_SEL_PARTS) * (int)sizeof(acc_t))

template <int P, int S>
struct FwdPlan {
    static constexpr int T = FS_SEL_FWD_BYTES(P, S, 64) <= FS_SEL_SMEM   ? 64
                             : FS_SEL_FWD_BYTES(P, S, 32) <= FS_SEL_SMEM ? 32
                             : FS_SEL_FWD_BYTES(P, S, 16) <= FS_SEL_SMEM ? 16
                                                                         : 8;
    static constexpr bool fits = FS_SEL_FWD_BYTES(P, S, T) <= FS_SEL_SMEM;
};

#define FS_SEL_TS(S) (FS_SEL_HREGS / ((S) * FS_SEL_PARTS) < FS_SEL_CK ? FS_SEL_HREGS / ((S) * FS_SEL_PARTS) : FS_SEL_CK)
#define FS_SEL_BWD_BYTES(P, S, TR)                                                                        \
    ((4 * (FS_SEL_THREADS / (P)) * (FS_SEL_CK + 4) + (FS_SEL_THREADS / (P)) + 2 * FS_SEL_TS(S) * (P) * (S) * FS_SEL_PARTS +         \
      (FS_SEL_CK / FS_SEL_TS(S) > 1 ? FS_SEL_CK / FS_SEL_TS(S) - 1 : 1) * FS_SEL_THREADS * (S) * FS_SEL_PARTS + \
      (TR) * 2 * FS_SEL_THREADS * (S) * FS_SEL_PARTS) *                                                \
         (int)sizeof(acc_t) +                                                                             \
     16 /* first_segment, aligned */)

template <int P, int S>
struct BwdPlan {
    static constexpr int TS = FS_SEL_TS(S);              // steps per window
    static constexpr int R = FS_SEL_CK / TS;             // windows per segment
    static constexpr int G = P < TS ? (P < 8 ? P : 8) : (TS < 8 ? TS : 8);  // steps per ∂u/∂Δ reduction
    static constexpr int TR = FS_SEL_BWD_BYTES(P, S, 16) <= FS_SEL_SMEM && TS >= 16  ? 16
                              : FS_SEL_BWD_BYTES(P, S, 8) <= FS_SEL_SMEM && TS >= 8 ? 8
                              : FS_SEL_BWD_BYTES(P, S, 4) <= FS_SEL_SMEM && TS >= 4 ? 4
                              : FS_SEL_BWD_BYTES(P, S, 2) <= FS_SEL_SMEM && TS >= 2 ? 2
                                                                                   : 1;
    static constexpr bool fits = FS_SEL_BWD_BYTES(P, S, TR) <= FS_SEL_SMEM;
};

#if FS_SEL_PASS == 0
// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The T steps of a forward chunk staged in shared memory (Δ in s_dt, u in s_u, variable B/C in
// s_b/s_c), with B and C variable (VB, VC) or constant fixed at compile time: no per-step selection.
// Leaves y + D·u of each step in s_dt. `ck` is this thread's first checkpoint slot (null when none
// are saved); checkpoints fall on the starts of KS-step stretches.
template <int P, int S, int T, int ROW, bool VB, bool VC>
__device__ __forceinline__ void fwd_steps(const SelParams& Q, const Weights<S>& w, num_t (&h)[S], acc_t* s_dt,
                                          const acc_t* s_u, const acc_t* s_b, const acc_t* s_c, int c, int l, int lane,
                                          acc_t* ck, i64 t0, int steps, acc_t d_skip) {
    constexpr int NP = P * S;
    constexpr int G = P < 8 ? P : 8;  // steps per y reduction over the channel's lanes
    constexpr int KS = T < FS_SEL_CK ? T : FS_SEL_CK;
    static_assert(T % KS == 0 && KS % G == 0 && FS_SEL_CK % KS == 0, "chunk of whole groups; checkpoints on stretch starts");
    const int n_own = (int)min((i64)S, Q.dstate - (i64)l * S);  // this lane's states below N
    // Wider states (8 per lane, complex, float64) would spill with two groups in flight.
    constexpr int GROUP_UNROLL = S * FS_SEL_PARTS <= 4 && FS_DTYPE != 3 ? FS_SEL_FWD_GROUP_UNROLL : 1;
#pragma unroll 1
    for (int k0 = 0; k0 < T; k0 += KS) {
        if (ck && (t0 + k0) % FS_SEL_CK == 0 && k0 < steps) {
            const i64 base = (t0 + k0) / FS_SEL_CK * Q.dstate;
#pragma unroll
            for (int s = 0; s < S; ++s)
                if (s < n_own) nstore(ck, base + s, h[s]);
        }
#pragma unroll GROUP_UNROLL
        for (int k = k0; k < k0 + KS; k += G) {
            acc_t yv[G];
            const AccRun<G> dts = lds_run<G>(s_dt + c * ROW + k), us = lds_run<G>(s_u + c * ROW + k);
            // B and C of this lane's states from the group's first step: the steps' addresses are
            // then constant offsets from one register.
            const int lane_group = (k * NP + l * S) * FS_SEL_PARTS;
            const acc_t *b_lane = s_b + lane_group, *c_lane = s_c + lane_group;
#pragma unroll
            for (int j = 0; j < G; ++j) {
                const acc_t dt = dts.x[j];
                const acc_t du = dt * us.x[j];
                num_t bv[S], cv[S];
                lane_bc_of<NP, S, VB>(b_lane, j, 0, w.b, bv);
                lane_bc_of<NP, S, VC>(c_lane, j, 0, w.c, cv);
                acc_t y = 0;
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    h[s] = nadd(nmul(ndecay(dt, w.a2[s]), h[s]), nscale(bv[s], du));
                    y += nre(nmul(cv[s], h[s]));
                }
                yv[j] = y;
            }
            // Every lane of the channel has read Δ of these steps (their y depend on it): the lane
            // that finishes step t may overwrite Δ[t] with y[t].
            const int off = reduce_scatter<ChannelLanes<P>::STRIDE, FS_WARP, G>(yv, lane);
            if (l < G) {
                const int t = k + off;
                s_dt[c * ROW + t] = yv[0] * FS_SEL_OUT_FACTOR + d_skip * s_u[c * ROW + t];
            }
        }
    }
}

template <int P, int S>
__device__ __forceinline__ void selective_fwd(const SelParams& Q) {
    using Plan = FwdPlan<P, S>;
    static_assert(Plan::fits, "forward shared memory over budget");
    constexpr int T = Plan::T;
    constexpr int ROWS = FS_SEL_THREADS / P;
    constexpr int NP = P * S;
    constexpr int ROW = StagedRow<T>::value;
    alignas(16) __shared__ acc_t s_dt[ROWS * ROW];  // Δ, then y before the gate
    alignas(16) __shared__ acc_t s_u[ROWS * ROW];
    alignas(16) __shared__ acc_t s_z[ROWS * ROW];
    alignas(16) __shared__ acc_t s_b[T * NP * FS_SEL_PARTS];
    alignas(16) __shared__ acc_t s_c[T * NP * FS_SEL_PARTS];
    __shared__ acc_t s_bias[ROWS];

    const int tid = threadIdx.x, lane = tid % FS_WARP;
    const int c = ChannelLanes<P>::channel(tid), l = ChannelLanes<P>::part(tid);
    const i64 b = blockIdx.x / Q.tiles, c0 = (blockIdx.x % Q.tiles) * Q.ct;
    const i64 d = c0 + c;
    const bool active = c < Q.ct && d < Q.dim;
    const i64 N = Q.dstate, L = Q.len, row = b * Q.dim + d;
    const i64 gb = Q.b_groups ? c0 / (Q.dim / Q.b_groups) : 0;
    const i64 gc = Q.c_groups ? c0 / (Q.dim / Q.c_groups) : 0;

    Weights<S> w;
    w.load(Q, d, l, active);
    num_t h[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const i64 n = (i64)l * S + s;
        h[s] = (active && n < N && Q.initial) ? nload(Q.initial, row * N + n) : nzero();
    }
    const acc_t d_skip = (active && Q.D) ? Q.D[d] : acc_t(0);
    acc_t* ck = (Q.ckpt && active) ? Q.ckpt + (row * Q.n_ck * N + l * S) * FS_SEL_PARTS : nullptr;

    stage_bias<ROWS>(Q, c0, s_bias);
    // Variable B and C go through registers a chunk ahead only while they take few of them (the
    // wide configurations would spill); otherwise they are staged when their chunk starts.
    constexpr bool PREFETCH_BC = FS_SEL_FWD_PREFETCH && BcRegs<NP, T>::K <= 16;
    using Tile = TileRegs<ROWS, T>;
    using Bc = BcRegs<NP, T>;
    const BlockCursors cursors = block_cursors<Tile, Bc>(Q, b, c0, gb, gc);
    Tile r_dt, r_u, r_z;
    Bc r_b, r_c;
    auto fetch = [&](i64 t0) {
        r_dt.load(cursors.tiles & CURSOR_DELTA, cursors.tile_off, Q.delta, Q.delta_s, b, c0, Q.ct, Q.dim, t0, L);
        r_u.load(cursors.tiles & CURSOR_U, cursors.tile_off, Q.u, Q.u_s, b, c0, Q.ct, Q.dim, t0, L);
        if (Q.z) r_z.load(cursors.tiles & CURSOR_Z, cursors.tile_off, Q.z, Q.z_s, b, c0, Q.ct, Q.dim, t0, L);
        if constexpr (PREFETCH_BC) {
            if (Q.b_var) r_b.load(cursors.bc & CURSOR_B, cursors.bc_off, Q.b_var, Q.b_s, b, gb, N, t0, L);
            if (Q.c_var) r_c.load(cursors.bc & CURSOR_C, cursors.bc_off, Q.c_var, Q.c_s, b, gc, N, t0, L);
        }
    };
    if (FS_SEL_FWD_PREFETCH) fetch(0);

    for (i64 t0 = 0; t0 < L; t0 += T) {
        if (!FS_SEL_FWD_PREFETCH) fetch(t0);
        __syncthreads();  // s_bias written; the previous chunk's output read from shared memory
        stage_delta<ROW>(r_dt, Q, s_bias, s_dt, c0, t0);
        stage_plain<ROW>(r_u, Q, s_u, c0, t0);
        if (Q.z) stage_plain<ROW>(r_z, Q, s_z, c0, t0);
        if constexpr (PREFETCH_BC) {
            if (Q.b_var) r_b.store(s_b);
            if (Q.c_var) r_c.store(s_c);
        } else {
            if (Q.b_var) stage_bc<NP, T>(Q.b_var, Q.b_s, b, gb, N, t0, L, s_b);
            if (Q.c_var) stage_bc<NP, T>(Q.c_var, Q.c_s, b, gc, N, t0, L, s_c);
        }
        __syncthreads();
        if (FS_SEL_FWD_PREFETCH && t0 + T < L) fetch(t0 + T);  // in flight while this chunk is computed

        // The steps, with B and C variable or constant fixed at compile time.
        const int steps = tile_steps<T>(t0, L);
#define FS_SEL_FWD_STEPS(VB, VC) \
    fwd_steps<P, S, T, ROW, VB, VC>(Q, w, h, s_dt, s_u, s_b, s_c, c, l, lane, ck, t0, steps, d_skip)
        if (Q.b_var) {
            if (Q.c_var) FS_SEL_FWD_STEPS(true, true);
            else FS_SEL_FWD_STEPS(true, false);
        } else {
            if (Q.c_var) FS_SEL_FWD_STEPS(false, true);
            else FS_SEL_FWD_STEPS(false, false);
        }
#undef FS_SEL_FWD_STEPS
        __syncthreads();

        storage_t* dst = Q.out + (b * Q.dim + c0) * L + t0;
        const int rows = tile_rows(c0, Q.ct, Q.dim);
        if (Q.z)
            write_tile<ROWS, T>(dst, L, rows, steps, [&](int cc, int t) {
                const acc_t y = s_dt[cc * ROW + t], zz = s_z[cc * ROW + t];
                return y * (zz * sigmoid_(zz));
            });
        else
            write_tile<ROWS, T>(dst, L, rows, steps, [&](int cc, int t) { return s_dt[cc * ROW + t]; });
    }
    if (Q.last && active) {
#pragma unroll
        for (int s = 0; s < S; ++s)
            if ((i64)l * S + s < N) nstore(Q.last, row * N + l * S + s, h[s]);
    }
}

#define FS_SEL_FWD_KERNEL(P, S)                                                                     \
    extern "C" __global__ void __launch_bounds__(FS_SEL_THREADS, FS_SEL_FWD_MIN_BLOCKS) selective_fwd_p##P##_s##S(const SelParams Q) { \
        selective_fwd<P, S>(Q);                                                                      \
    }
#endif  // FS_SEL_PASS == 0

#if FS_SEL_PASS == 1
// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// The backward's shared memory, declared once per kernel (each instantiation of selective_bwd
// declaring its own would multiply the block's footprint).
template <int P, int S>
struct BwdShared {
    using Plan = BwdPlan<P, S>;
    static constexpr int ROWS = FS_SEL_THREADS / P, NP = P * S, PT = FS_SEL_PARTS, ROW = StagedRow<FS_SEL_CK>::value;
    alignas(16) acc_t dt[ROW * ROWS];  // Δ, then ∂(delta + bias)
    alignas(16) acc_t u[ROW * ROWS];   // u, then ∂u
    alignas(16) acc_t g[ROW * ROWS];   // ∂y = dout·silu(z)
    alignas(16) acc_t q[ROW * ROWS];   // dout·silu'(z), then ∂z
    alignas(16) acc_t b[Plan::TS * NP * PT];
    alignas(16) acc_t c[Plan::TS * NP * PT];
    acc_t slot[(Plan::R > 1 ? Plan::R - 1 : 1) * FS_SEL_THREADS * S * PT];
    alignas(16) acc_t red[Plan::TR * 2 * ROWS * NP * PT];  // [step][∂B or ∂C][channel][state, part]
    acc_t bias[ROWS];
    i64 first_segment;  // of the block's time chunk (read from here, it costs no register in the loop)
};

// ∂B and ∂C of TR steps from t (global step), parked in `red` as [step][∂B or ∂C][channel][state,
// part] by every channel of the block: summed over the channels in a fixed order (runs of 4
// values; with fewer runs than threads, SPLIT threads share a run's channels and add their sums
// by shuffles) and written to this tile's slots of part_b / part_c.
template <int P, int S, int TR>
__device__ __forceinline__ void sum_parked_bc(const SelParams& Q, const acc_t* red, i64 b, i64 tile, i64 t) {
    constexpr int PT = FS_SEL_PARTS, ROWS = FS_SEL_THREADS / P, W = P * S * PT;  // values per channel
    constexpr int RUNS = TR * 2 * W / 4;
    constexpr int SPLIT = RUNS >= FS_SEL_THREADS ? 1 : FS_SEL_THREADS / RUNS;
    static_assert(W % 4 == 0 && ROWS % SPLIT == 0 && SPLIT <= FS_WARP, "whole runs, channels split evenly");
    const int tid = fresh_tid();
    for (int e = tid / SPLIT; e < RUNS; e += FS_SEL_THREADS / SPLIT) {
        const int share = tid % SPLIT;
        const int row = e / (W / 4), q = e % (W / 4) * 4;  // row = step·2 + which
        // Share k takes channels k, k + SPLIT, ...: the threads of a run then read neighbouring
        // channels, on distinct banks.
        const acc_t* src = red + (row * ROWS + share) * W + q;
        // Even and odd channels in two sums, added last: half the dependent chain of additions.
        constexpr int CH = ROWS / SPLIT;
        AccRun<4> sum = lds_run<4>(src), odd;
#pragma unroll
        for (int k = 0; k < 4; ++k) odd.x[k] = 0;
#pragma unroll
        for (int cc = 1; cc < CH; ++cc) {
            const AccRun<4> x = lds_run<4>(src + cc * SPLIT * W);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (cc % 2) odd.x[k] += x.x[k];
                else sum.x[k] += x.x[k];
            }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) sum.x[k] += odd.x[k];
#pragma unroll
        for (int d = 1; d < SPLIT; d <<= 1)
#pragma unroll
            for (int k = 0; k < 4; ++k) sum.x[k] += __shfl_xor_sync(FS_FULL_MASK, sum.x[k], d);
        const i64 tg = t + row / 2;
        acc_t* dst = row % 2 ? Q.part_c : Q.part_b;
        if (share != 0 || !dst || tg >= Q.len) continue;
        // Value k of the run is state q/PT + k/PT, part k%PT (q is a multiple of 4, so of PT). The
        // pointer steps from state to state: no 64-bit index products per value.
        const i64 span = Q.len * PT;
        const int states = (int)min((i64)(4 / PT), Q.dstate - q / PT);
        acc_t* out = dst + ((b * Q.tiles + tile) * Q.dstate + q / PT) * span + tg * PT;
#pragma unroll
        for (int k = 0; k < 4; k += PT, out += span) {
            if (k / PT >= states) break;
#pragma unroll
            for (int part = 0; part < PT; ++part) out[part] = sum.x[k + part];
        }
    }
}

// With a gate z: dout·silu(z) (∂y) to s_g over the staged dout, and dout·silu'(z) to s_q (times
// y later, for ∂z).
template <int ROW, int ROWS>
__device__ __forceinline__ void stage_gated_dout(const TileRegs<ROWS, FS_SEL_CK>& r_z, const SelParams& Q, acc_t* s_g,
                                                 acc_t* s_q, i64 c0, i64 t0) {
    r_z.each(c0, Q.ct, Q.dim, t0, Q.len, [&](int cc, int t, acc_t zz, bool) {
        const acc_t sg = sigmoid_(zz), g = s_g[cc * ROW + t];
        s_q[cc * ROW + t] = g * sg * (acc_t(1) + zz * (acc_t(1) - sg));
        s_g[cc * ROW + t] = g * zz * sg;
    });
}

// The time chunk of a backward block (blockIdx.x = (b·tiles + tile)·chunks + chunk; 0 unless
// CHUNKED); and the first and last 16-step segment (checkpoint) of chunk k.
template <bool CHUNKED>
__device__ __forceinline__ i64 block_chunk(const SelParams& Q) {
    return CHUNKED ? blockIdx.x % (unsigned)Q.chunks : 0;
}
__device__ __forceinline__ i64 chunk_first_segment(const SelParams& Q, i64 k) { return k * Q.chunk_cks; }
__device__ __forceinline__ i64 chunk_last_segment(const SelParams& Q, i64 k) {
    return min((k + 1) * Q.chunk_cks, Q.n_ck) - 1;
}

// Phase A walks pieces of chunk_cks / carry_split segments, a block each: the chunks alone are
// few blocks (the rows are few), each a long serial walk, and left the pass latency-bound. Piece
// j covers segments [j·piece_cks, (j+1)·piece_cks), the last one fewer; a chunk ends on a piece's
// end. Where the phase-A record of piece `piece` of row (b, d) starts: N·parts adjoint values, then
// the piece's Σ Δ.
__device__ __forceinline__ i64 piece_cks(const SelParams& Q) { return Q.chunk_cks / Q.carry_split; }
__device__ __forceinline__ acc_t* carry_record(const SelParams& Q, i64 b, i64 piece, i64 d) {
    return Q.part_carry + ((b * Q.carry_pieces + piece) * Q.dim + d) * (Q.dstate * FS_SEL_PARTS + 1);
}

// The adjoint ∂L/∂h entering the last step of time chunk `chunk` of row (b, d), lane l's states,
// from `carry` holding ∂L/∂h[L-1]: carried back through the pieces j after the chunk, last first,
// each by its phase-A record (its own contribution a_j from a zero adjoint after it, and Σ Δ_j):
// c <- a_j + conj(exp(A·Σ Δ_j))·c, exp(A·Σ Δ_j) being the product of the piece's decays.
template <int S>
__device__ __forceinline__ void chunk_start_adjoint(const SelParams& Q, const Weights<S>& w, i64 b, i64 d, int l,
                                                    i64 chunk, num_t (&carry)[S]) {
    const i64 N = Q.dstate;
#pragma unroll 1
    for (i64 j = Q.carry_pieces - 1; j >= (chunk + 1) * Q.carry_split; --j) {
        const acc_t* rec = carry_record(Q, b, j, d);
        const acc_t dt_sum = rec[N * FS_SEL_PARTS];
#pragma unroll
        for (int s = 0; s < S; ++s)
            if ((i64)l * S + s < N)
                carry[s] = nadd(nload(rec, (i64)l * S + s), nmul(nconj(ndecay(dt_sum, w.a2[s])), carry[s]));
    }
}

// Phase A of a backward cut into time chunks (Q.chunks > 1: rows too few to fill the GPU): for
// every carry piece after the first chunk, of every row, the adjoint entering the piece's first
// step from its own steps alone (zero after its last) and its Σ Δ, to the row's record in
// part_carry. Each backward block then starts its chunk from the records of the pieces after it
// (chunk_start_adjoint) instead of waiting for their blocks. It needs Δ, dout·silu(z) and C only:
// no states, no gradients, and only the shared memory to stage them (more blocks fit). VAR_C: C
// variable, fixed at compile time.
template <int P, int S>
struct CarryShared {
    static constexpr int ROWS = FS_SEL_THREADS / P, NP = P * S, PT = FS_SEL_PARTS, ROW = StagedRow<FS_SEL_CK>::value;
    alignas(16) acc_t dt[ROW * ROWS];  // Δ
    alignas(16) acc_t g[ROW * ROWS];   // ∂y = dout·silu(z)
    alignas(16) acc_t q[ROW * ROWS];   // dout·silu'(z) (stage_gated_dout writes it; unused here)
    alignas(16) acc_t c[BwdPlan<P, S>::TS * NP * PT];
    acc_t bias[ROWS];
};

template <int P, int S, bool VAR_C>
__device__ __forceinline__ void selective_carry(const SelParams& Q, CarryShared<P, S>& sm) {
    using Plan = BwdPlan<P, S>;
    constexpr int TS = Plan::TS, R = Plan::R;
    constexpr int ROWS = FS_SEL_THREADS / P, NP = P * S, ROW = CarryShared<P, S>::ROW;
    const int tid = threadIdx.x, c = tid / P, l = tid % P;
    const i64 later = Q.carry_pieces - Q.carry_split;  // the pieces with a record: all after chunk 0
    const i64 piece = Q.carry_split + blockIdx.x % later, bt = blockIdx.x / later;
    const i64 b = bt / Q.tiles, tile = bt % Q.tiles, c0 = tile * Q.ct, d = c0 + c;
    const bool active = c < Q.ct && d < Q.dim;
    const i64 N = Q.dstate, L = Q.len;
    const i64 gb = Q.b_groups ? c0 / (Q.dim / Q.b_groups) : 0;
    const i64 gc = Q.c_groups ? c0 / (Q.dim / Q.c_groups) : 0;
    const bool vc = VAR_C || Q.c_var;

    Weights<S> w;
    w.load(Q, d, l, active);
    num_t carry[S];
#pragma unroll
    for (int s = 0; s < S; ++s) carry[s] = nzero();
    acc_t dt_sum = 0;
    stage_bias<ROWS>(Q, c0, sm.bias);

    using Tile = TileRegs<ROWS, FS_SEL_CK>;
    using Bc = BcRegs<NP, TS>;
    const BlockCursors cursors = block_cursors<Tile, Bc>(Q, b, c0, gb, gc);
    Tile r_dt, r_g, r_z;
    Bc r_c;
    auto fetch = [&](i64 seg) {  // one segment ahead, as in the backward
        const i64 ts0 = seg * FS_SEL_CK;
        r_dt.load(cursors.tiles & CURSOR_DELTA, cursors.tile_off, Q.delta, Q.delta_s, b, c0, Q.ct, Q.dim, ts0, L);
        r_g.load(cursors.tiles & CURSOR_DOUT, cursors.tile_off, Q.dout, Q.dout_s, b, c0, Q.ct, Q.dim, ts0, L);
        if (Q.z) r_z.load(cursors.tiles & CURSOR_Z, cursors.tile_off, Q.z, Q.z_s, b, c0, Q.ct, Q.dim, ts0, L);
        if constexpr (R == 1) {
            if (vc) r_c.load(cursors.bc & CURSOR_C, cursors.bc_off, Q.c_var, Q.c_s, b, gc, N, ts0, L);
        }
    };
    const i64 first = piece * piece_cks(Q), last = min(first + piece_cks(Q), Q.n_ck) - 1;
    if (last >= first) fetch(last);
#pragma unroll 1
    for (i64 seg = last; seg >= first; --seg) {
        const i64 ts0 = seg * FS_SEL_CK;
        __syncthreads();  // s_bias written; the previous segment is done with the staged tiles
        stage_delta<ROW>(r_dt, Q, sm.bias, sm.dt, c0, ts0);
        stage_plain<ROW>(r_g, Q, sm.g, c0, ts0);
        if constexpr (R == 1) {
            if (vc) r_c.store(sm.c);
        }
        if (Q.z) {
            __syncthreads();
            stage_gated_dout<ROW>(r_z, Q, sm.g, sm.q, c0, ts0);
        }
        if (seg > first) fetch(seg - 1);
#pragma unroll 1
        for (int win = R - 1; win >= 0; --win) {
            if constexpr (R > 1) {
                __syncthreads();
                if (vc) stage_bc<NP, TS>(Q.c_var, Q.c_s, b, gc, N, ts0 + win * TS, L, sm.c);
            }
            __syncthreads();
#pragma unroll
            for (int j = TS - 1; j >= 0; --j) {
                const int t = win * TS + j;
                const acc_t dt = sm.dt[c * ROW + t], gy = sm.g[c * ROW + t] * FS_SEL_OUT_FACTOR;
                num_t cv[S];
                lane_bc<NP, S>(vc, sm.c, j, l, w.c, cv);
#pragma unroll
                for (int s = 0; s < S; ++s)
                    carry[s] = nmul(nconj(ndecay(dt, w.a2[s])), nadd(nscale(nconj(cv[s]), gy), carry[s]));
                dt_sum += dt;  // (zero past len: Δ is staged as zero outside the tensor)
            }
        }
    }
    if (!active) return;
    acc_t* rec = carry_record(Q, b, piece, d);
#pragma unroll
    for (int s = 0; s < S; ++s)
        if ((i64)l * S + s < N) nstore(rec, (i64)l * S + s, carry[s]);
    if (l == 0) rec[N * FS_SEL_PARTS] = dt_sum;
}

// BOTH_VAR: B and C variable, fixed at compile time (Mamba's case, which spares it the registers
// and selections of constant weights); otherwise read from Q at run time. CHUNKED (the kernels
// selective_bwd_chunked_*, for Q.chunks > 1): the block takes one time chunk of its rows
// (blockIdx.x = (b·tiles + tile)·chunks + chunk), starting from the adjoint that selective_carry's
// records give, and writes its parameter partials to the chunk's slots. Separate kernels: the
// chunk bookkeeping cost the others 2-3% (H100, float32 and bfloat16, (2,4096,4096) forward+backward).
template <int P, int S, bool BOTH_VAR, bool CHUNKED>
__device__ __forceinline__ void selective_bwd(const SelParams& Q, BwdShared<P, S>& sm) {
    using Plan = BwdPlan<P, S>;
    static_assert(Plan::fits, "backward shared memory over budget");
    constexpr int TS = Plan::TS, R = Plan::R, G = Plan::G, TR = Plan::TR;
    constexpr int ROWS = FS_SEL_THREADS / P;
    constexpr int NP = P * S;
    constexpr int PT = FS_SEL_PARTS;
    constexpr int ROW = BwdShared<P, S>::ROW;
    constexpr int MV = 2 * S * PT;  // ∂B and ∂C values of a thread for one step
    static_assert(TS % G == 0 && TS % TR == 0 && FS_SEL_CK % TS == 0, "window of whole groups");
    acc_t* s_dt = sm.dt;
    acc_t* s_u = sm.u;
    acc_t* s_g = sm.g;
    acc_t* s_q = sm.q;
    acc_t* s_b = sm.b;
    acc_t* s_c = sm.c;
    acc_t* s_slot = sm.slot;
    acc_t* s_red = sm.red;
    acc_t* s_bias = sm.bias;

    const int tid = threadIdx.x, lane = tid % FS_WARP;
    const int c = tid / P, l = tid % P;
    const i64 bt = CHUNKED ? blockIdx.x / Q.chunks : blockIdx.x;
    const i64 b = bt / Q.tiles, tile = bt % Q.tiles, c0 = tile * Q.ct;
    const i64 d = c0 + c;
    const bool active = c < Q.ct && d < Q.dim;
    const i64 N = Q.dstate, L = Q.len, row = b * Q.dim + d;
    const i64 gb = Q.b_groups ? c0 / (Q.dim / Q.b_groups) : 0;
    const i64 gc = Q.c_groups ? c0 / (Q.dim / Q.c_groups) : 0;
    const bool vb = BOTH_VAR || Q.b_var, vc = BOTH_VAR || Q.c_var, var_bc = vb || vc;

    Weights<S> w;
    w.load(Q, d, l, active);
    const acc_t d_skip = (active && Q.D) ? Q.D[d] : acc_t(0);
    num_t carry[S], grad_a[S], grad_b[S], grad_c[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const i64 n = (i64)l * S + s;
        carry[s] = (active && n < N && Q.grad_last) ? nload(Q.grad_last, row * N + n) : nzero();
        grad_a[s] = grad_b[s] = grad_c[s] = nzero();
    }
    if (CHUNKED && active) chunk_start_adjoint<S>(Q, w, b, d, l, block_chunk<CHUNKED>(Q), carry);
    acc_t grad_d = 0, grad_bias = 0;  // this lane's share of the channel's sums

    stage_bias<ROWS>(Q, c0, s_bias);
    // A segment's inputs in registers, loaded one segment ahead (see "Staging" above); B and C with
    // them when the segment is one window.
    num_t r_ck[S];
    using Tile = TileRegs<ROWS, FS_SEL_CK>;
    using Bc = BcRegs<NP, TS>;
    const BlockCursors cursors = block_cursors<Tile, Bc>(Q, b, c0, gb, gc);
    Tile r_dt, r_u, r_g, r_z;
    Bc r_b, r_c;
    const acc_t* ck_lane = Q.ckpt + (row * Q.n_ck * N + l * S) * FS_SEL_PARTS;  // this lane's first state
    auto fetch = [&](i64 seg) {
        const i64 ts0 = seg * FS_SEL_CK;
        r_dt.load(cursors.tiles & CURSOR_DELTA, cursors.tile_off, Q.delta, Q.delta_s, b, c0, Q.ct, Q.dim, ts0, L);
        r_u.load(cursors.tiles & CURSOR_U, cursors.tile_off, Q.u, Q.u_s, b, c0, Q.ct, Q.dim, ts0, L);
        r_g.load(cursors.tiles & CURSOR_DOUT, cursors.tile_off, Q.dout, Q.dout_s, b, c0, Q.ct, Q.dim, ts0, L);
        if (Q.z) r_z.load(cursors.tiles & CURSOR_Z, cursors.tile_off, Q.z, Q.z_s, b, c0, Q.ct, Q.dim, ts0, L);
        if constexpr (R == 1) {
            if (vb) r_b.load(cursors.bc & CURSOR_B, cursors.bc_off, Q.b_var, Q.b_s, b, gb, N, ts0, L);
            if (vc) r_c.load(cursors.bc & CURSOR_C, cursors.bc_off, Q.c_var, Q.c_s, b, gc, N, ts0, L);
        }
        const acc_t* ck_seg = ck_lane + seg * N * FS_SEL_PARTS;
#pragma unroll
        for (int s = 0; s < S; ++s) r_ck[s] = (active && l * S + s < N) ? nload(ck_seg, s) : nzero();
    };
    // The chunk's first segment: 0, or a shared copy that every thread stores (the same value,
    // read before the first barrier) and the loop reads: kept in registers it cost spills, and
    // recomputed a 32-bit division per segment.
    if (CHUNKED) sm.first_segment = chunk_first_segment(Q, block_chunk<CHUNKED>(Q));
    const i64 last = CHUNKED ? chunk_last_segment(Q, block_chunk<CHUNKED>(Q)) : Q.n_ck - 1;
    if (last >= (CHUNKED ? sm.first_segment : 0)) fetch(last);

#pragma unroll 1
    for (i64 seg = last; seg >= (CHUNKED ? sm.first_segment : 0); --seg) {
        const i64 ts0 = seg * FS_SEL_CK;
        __syncthreads();  // s_bias written; the previous segment's results are written out
        stage_delta<ROW>(r_dt, Q, s_bias, s_dt, c0, ts0);
        stage_plain<ROW>(r_u, Q, s_u, c0, ts0);
        stage_plain<ROW>(r_g, Q, s_g, c0, ts0);
        if constexpr (R == 1) {
            if (vb) r_b.store(s_b);
            if (vc) r_c.store(s_c);
        }
        if (Q.z) {
            __syncthreads();  // z's slots may lie on other threads than dout's (other strides)
            stage_gated_dout<ROW>(r_z, Q, s_g, s_q, c0, ts0);
        }
        num_t h_seg[S];
#pragma unroll
        for (int s = 0; s < S; ++s) h_seg[s] = r_ck[s];
        if (seg > (CHUNKED ? sm.first_segment : 0)) fetch(seg - 1);  // in flight while this segment is computed

        // Forward sweep through the first R-1 windows: the states entering windows 1..R-1.
        if constexpr (R > 1) {
            num_t h[S];
#pragma unroll
            for (int s = 0; s < S; ++s) h[s] = h_seg[s];
#pragma unroll 1
            for (int win = 0; win < R - 1; ++win) {
                __syncthreads();  // staged tiles complete; s_b free
                if (vb) stage_bc<NP, TS>(Q.b_var, Q.b_s, b, gb, N, ts0 + win * TS, L, s_b);
                __syncthreads();
#pragma unroll
                for (int j = 0; j < TS; ++j) {
                    const int t = win * TS + j;
                    const acc_t dt = s_dt[c * ROW + t];
                    const acc_t du = dt * s_u[c * ROW + t];
                    num_t bv[S];
                    lane_bc<NP, S>(vb, s_b, j, l, w.b, bv);
#pragma unroll
                    for (int s = 0; s < S; ++s) h[s] = nadd(nmul(ndecay(dt, w.a2[s]), h[s]), nscale(bv[s], du));
                }
#pragma unroll
                for (int s = 0; s < S; ++s) nstore(s_slot, ((i64)win * FS_SEL_THREADS + tid) * S + s, h[s]);
            }
        }

#pragma unroll 1
        for (int win = R - 1; win >= 0; --win) {
            const int tw = win * TS;  // the window's first step in the segment
            __syncthreads();          // staged tiles complete; s_b, s_c free
            if constexpr (R > 1) {  // (a one-window segment has its B and C staged already)
                if (vb) stage_bc<NP, TS>(Q.b_var, Q.b_s, b, gb, N, ts0 + tw, L, s_b);
                if (vc) stage_bc<NP, TS>(Q.c_var, Q.c_s, b, gc, N, ts0 + tw, L, s_c);
            }
            __syncthreads();

            num_t h_start[S];
#pragma unroll
            for (int s = 0; s < S; ++s)
                h_start[s] = win == 0 ? h_seg[s] : nload(s_slot, ((i64)(win - 1) * FS_SEL_THREADS + tid) * S + s);

            // Rebuild the window's states (and y, for ∂z).
            num_t hr[TS][S];
            {
                num_t h[S];
#pragma unroll
                for (int s = 0; s < S; ++s) h[s] = h_start[s];
#pragma unroll
                for (int k = 0; k < TS; k += G) {
                    acc_t yv[G];
                    const AccRun<G> dts = lds_run<G>(s_dt + c * ROW + tw + k), us = lds_run<G>(s_u + c * ROW + tw + k);
#pragma unroll
                    for (int j = 0; j < G; ++j) {
                        const acc_t dt = dts.x[j];
                        const acc_t du = dt * us.x[j];
                        num_t bv[S], cv[S];
                        lane_bc<NP, S>(vb, s_b, k + j, l, w.b, bv);
                        lane_bc<NP, S>(vc, s_c, k + j, l, w.c, cv);
                        acc_t y = 0;
#pragma unroll
                        for (int s = 0; s < S; ++s) {
                            h[s] = nadd(nmul(ndecay(dt, w.a2[s]), h[s]), nscale(bv[s], du));
                            hr[k + j][s] = h[s];
                            y += nre(nmul(cv[s], h[s]));
                        }
                        yv[j] = y;
                    }
                    if (Q.z) {
                        const int off = reduce_scatter<1, P, G>(yv, lane);
                        if (l < G) {
                            const int t = tw + k + off;
                            const acc_t y = yv[0] * FS_SEL_OUT_FACTOR + d_skip * s_u[c * ROW + t];
                            s_q[c * ROW + t] *= y;  // ∂z = dout·silu'(z)·y
                        }
                    }
                }
            }

            // The adjoint recurrence backwards through the window.
#pragma unroll
            for (int k = TS - G; k >= 0; k -= G) {
                acc_t dv[2 * G];  // per step of the group: this lane's ∂u, ∂Δ shares
#pragma unroll
                for (int j = G - 1; j >= 0; --j) {
                    const int jj = k + j, t = tw + jj;
                    const acc_t dt = s_dt[c * ROW + t];
                    const acc_t uu = s_u[c * ROW + t];
                    const acc_t gy = s_g[c * ROW + t] * FS_SEL_OUT_FACTOR;
                    const acc_t du = dt * uu;
                    // ∂u = Δ·Σ re(B̄ g) and ∂Δ = u·Σ re(B̄ g) + Σ re(Ā w): the sums first.
                    acc_t through_b = 0, through_a = 0;
                    acc_t mv[MV];  // this thread's ∂B (first S·parts) and ∂C contributions
                    num_t bvs[S], cvs[S];
                    lane_bc<NP, S>(vb, s_b, jj, l, w.b, bvs);
                    lane_bc<NP, S>(vc, s_c, jj, l, w.c, cvs);
#pragma unroll
                    for (int s = 0; s < S; ++s) {
                        const num_t cv = cvs[s], bv = bvs[s];
                        const num_t g = nadd(nscale(nconj(cv), gy), carry[s]);
                        const num_t hp = jj > 0 ? hr[jj > 0 ? jj - 1 : 0][s] : h_start[s];
                        const num_t gcv = nscale(nconj(hr[jj][s]), gy);
                        const num_t gbv = nscale(g, du);
                        through_b += nre(nmul(nconj(bv), g));
                        carry[s] = nmul(nconj(ndecay(dt, w.a2[s])), g);
                        const num_t wv = nmul(carry[s], nconj(hp));
                        grad_a[s] = nadd(grad_a[s], nscale(wv, dt));
                        through_a += nre(nmul(nconj(w.a[s]), wv));
                        if (!vb) grad_b[s] = nadd(grad_b[s], gbv);
                        if (!vc) grad_c[s] = nadd(grad_c[s], gcv);
#pragma unroll
                        for (int p = 0; p < PT; ++p) {
                            mv[s * PT + p] = npart(gbv, p);
                            mv[S * PT + s * PT + p] = npart(gcv, p);
                        }
                    }
                    dv[2 * j] = dt * through_b;
                    dv[2 * j + 1] = uu * through_b + through_a;
                    if (var_bc) {
                        // Park this thread's values (summed over the block's channels below).
                        acc_t* park = s_red + ((jj % TR * 2) * ROWS + c) * (NP * PT) + l * S * PT;
#pragma unroll
                        for (int which = 0; which < 2; ++which) {
                            if constexpr ((S * PT) % 4 == 0) {
#pragma unroll
                                for (int q = 0; q < S * PT; q += 4) {
                                    AccRun<4> run;
#pragma unroll
                                    for (int k4 = 0; k4 < 4; ++k4) run.x[k4] = mv[which * S * PT + q + k4];
                                    *reinterpret_cast<AccRun<4>*>(park + which * ROWS * NP * PT + q) = run;
                                }
                            } else {
#pragma unroll
                                for (int q = 0; q < S * PT; ++q) park[which * ROWS * NP * PT + q] = mv[which * S * PT + q];
                            }
                        }
                        if (jj % TR == 0) {
                            // Steps jj..jj+TR are parked by every channel: sum them over channels.
                            __syncthreads();
                            sum_parked_bc<P, S, TR>(Q, s_red, b, tile, ts0 + tw + jj);
                            __syncthreads();
                        }
                    }
                }
                // Sum ∂u, ∂Δ over the lanes of the channel; the lane holding a step's value
                // finishes it in shared memory (every lane has read that step already).
                const int off = reduce_scatter<1, P, 2 * G>(dv, lane);
                constexpr int CNT = RsCount<2 * G, P>::value;
                if (l < 2 * G) {
#pragma unroll
                    for (int i = 0; i < CNT; ++i) {
                        const int o = off + i;
                        const int t = tw + k + o / 2;
                        const bool inside = active && ts0 + t < L;
                        if (o % 2 == 0) {
                            const acc_t uu = s_u[c * ROW + t], gy = s_g[c * ROW + t];
                            if (inside) grad_d += gy * uu;
                            s_u[c * ROW + t] = dv[i] + d_skip * gy;
                        } else {
                            const acc_t dt = s_dt[c * ROW + t];
                            const acc_t dr = Q.softplus ? dv[i] * one_minus_exp_neg(dt) : dv[i];
                            if (inside) grad_bias += dr;
                            s_dt[c * ROW + t] = dr;
                        }
                    }
                }
            }
        }
        __syncthreads();
        // The segment's ∂u, ∂delta, ∂z.
        const int rows = tile_rows(c0, Q.ct, Q.dim), steps = tile_steps<FS_SEL_CK>(ts0, L);
        const i64 at = (b * Q.dim + c0) * L + ts0;
        write_tile<ROWS, FS_SEL_CK>(Q.du + at, L, rows, steps, [&](int cc, int t) { return s_u[cc * ROW + t]; });
        write_tile<ROWS, FS_SEL_CK>(Q.ddelta + at, L, rows, steps, [&](int cc, int t) { return s_dt[cc * ROW + t]; });
        if (Q.dz)
            write_tile<ROWS, FS_SEL_CK>(Q.dz + at, L, rows, steps, [&](int cc, int t) { return s_q[cc * ROW + t]; });
    }

    // Per-channel results: ∂h0, and the partial parameter gradients of this (batch, channel).
#pragma unroll
    for (int d2 = 1; d2 < P; d2 <<= 1) {
        grad_d += __shfl_xor_sync(FS_FULL_MASK, grad_d, d2);
        grad_bias += __shfl_xor_sync(FS_FULL_MASK, grad_bias, d2);
    }
    if (active) {
        const i64 slots = 3 * N * PT + 2;
        const i64 chunk = block_chunk<CHUNKED>(Q);
        acc_t* part = Q.part_params + (CHUNKED ? (b * Q.chunks + chunk) * Q.dim + d : row) * slots;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const i64 n = (i64)l * S + s;
            if (n >= N) continue;
            if (Q.dinitial && chunk == 0) nstore(Q.dinitial, row * N + n, carry[s]);
            nstore(part, n, grad_a[s]);
            nstore(part, N + n, grad_b[s]);
            nstore(part, 2 * N + n, grad_c[s]);
        }
        if (l == 0) {
            part[3 * N * PT] = grad_d;
            part[3 * N * PT + 1] = grad_bias;
        }
    }
}

#define FS_SEL_BWD_KERNEL_AS(NAME, P, S, CHUNKED)                                                   \
    extern "C" __global__ void __launch_bounds__(FS_SEL_THREADS, FS_SEL_BWD_MIN_BLOCKS) NAME(const SelParams Q) { \
        if constexpr (BwdPlan<P, S>::fits) {                                                         \
            __shared__ BwdShared<P, S> sm;                                                           \
            if (Q.b_var && Q.c_var)                                                                  \
                selective_bwd<P, S, true, CHUNKED>(Q, sm);                                           \
            else                                                                                     \
                selective_bwd<P, S, false, CHUNKED>(Q, sm);                                          \
        } else {                                                                                     \
            __trap(); /* not offered by the launcher for this element type */                       \
        }                                                                                            \
    }
#define FS_SEL_BWD_KERNEL(P, S)                                                                     \
    FS_SEL_BWD_KERNEL_AS(selective_bwd_p##P##_s##S, P, S, false)                                    \
    FS_SEL_BWD_KERNEL_AS(selective_bwd_chunked_p##P##_s##S, P, S, true)                             \
    extern "C" __global__ void __launch_bounds__(FS_SEL_THREADS, FS_SEL_CARRY_MIN_BLOCKS) selective_carry_p##P##_s##S(const SelParams Q) { \
        if constexpr (BwdPlan<P, S>::fits) {                                                         \
            __shared__ CarryShared<P, S> sm;                                                         \
            if (Q.c_var)                                                                             \
                selective_carry<P, S, true>(Q, sm);                                                  \
            else                                                                                     \
                selective_carry<P, S, false>(Q, sm);                                                 \
        } else {                                                                                     \
            __trap();                                                                                \
        }                                                                                            \
    }

// ∂A, ∂D, ∂delta_bias and constant ∂B/∂C: one thread per (channel, slot), summing the batch in order
// (R.batch counts batch x time chunks: the partials are laid out (batch, chunk, dim, slots)).
extern "C" __global__ void __launch_bounds__(256) selective_reduce_params(const SelReduceParams R) {
    constexpr int PT = FS_SEL_PARTS;
    const i64 N = R.dstate, slots = 3 * N * PT + 2;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R.dim * slots) return;
    const i64 d = i / slots, k = i % slots;
    acc_t* dst;
    i64 at;
    if (k < N * PT) {
        dst = R.da;
        at = d * N * PT + k;
    } else if (k < 2 * N * PT) {
        dst = R.db;
        at = d * N * PT + k - N * PT;
    } else if (k < 3 * N * PT) {
        dst = R.dc;
        at = d * N * PT + k - 2 * N * PT;
    } else {
        dst = k == 3 * N * PT ? R.dd : R.dbias;
        at = d;
    }
    if (!dst) return;
    acc_t sum = 0;
    for (i64 b = 0; b < R.batch; ++b) sum += R.src[(b * R.dim + d) * slots + k];
    dst[at] = sum;
}

// Variable ∂B or ∂C: each thread sums the tiles of its group in tile order for a run of
// FS_SEL_REDUCE_RUN consecutive values of one (batch, group, state) row: 16-byte loads keep more
// bytes in flight per thread. Rows whose length is not a multiple of the run are summed one value
// at a time.
#define FS_SEL_REDUCE_RUN 4
extern "C" __global__ void __launch_bounds__(256) selective_reduce_bc(const SelReduceParams R) {
    constexpr int PT = FS_SEL_PARTS, V = FS_SEL_REDUCE_RUN;
    const i64 span = R.len * PT, N = R.dstate, rows = R.batch * R.groups * N;
    const i64 per_group = R.dim / R.groups / R.ct, tile_stride = N * span;
    const bool whole_runs = span % V == 0;  // then every run is 16-byte aligned (scratch is aligned)
    const i64 runs = whole_runs ? span / V : span, per_run = whole_runs ? V : 1;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < rows * runs; i += stride) {
        const i64 row = i / runs, tau = i % runs * per_run;
        const i64 n = row % N, g = row / N % R.groups, b = row / N / R.groups;
        const acc_t* src = R.src + ((b * R.tiles + g * per_group) * N + n) * span + tau;
        if (whole_runs) {
            AccRun<V> sum = lds_run<V>(src);
#pragma unroll 8
            for (i64 k = 1; k < per_group; ++k) {
                const AccRun<V> x = lds_run<V>(src + k * tile_stride);
#pragma unroll
                for (int j = 0; j < V; ++j) sum.x[j] += x.x[j];
            }
#pragma unroll
            for (int j = 0; j < V; ++j) R.dvar[row * span + tau + j] = from_acc(sum.x[j]);
        } else {
            acc_t sum = 0;
            for (i64 k = 0; k < per_group; ++k) sum += src[k * tile_stride];
            R.dvar[row * span + tau] = from_acc(sum);
        }
    }
}
#endif  // FS_SEL_PASS == 1

// The configurations (P lanes x S states per channel) the launcher chooses from.
#if FS_SEL_PASS == 0
#define FS_SEL_KERNEL FS_SEL_FWD_KERNEL
#else
#define FS_SEL_KERNEL FS_SEL_BWD_KERNEL
#endif
// The configurations (P, S) to compile. The launcher builds one module per configuration and
// defines FS_SEL_CONFIGS to it (`SELECTIVE_REAL` / `SELECTIVE_COMPLEX` in src/cuda/compile.rs);
// without it (scripts/kernel_resources.py, the CPU emulation), every configuration the launcher
// has, the same lists (a unit test in src/cuda/selective_scan.rs compares them).
#ifndef FS_SEL_CONFIGS
#if FS_SEL_COMPLEX
#define FS_SEL_CONFIGS(X) X(4, 4) X(8, 4) X(16, 4) X(32, 4) X(8, 2)
#else
#define FS_SEL_CONFIGS(X) X(4, 4) X(8, 4) X(16, 4) X(32, 4) X(8, 2) X(32, 8)
#endif
#endif
FS_SEL_CONFIGS(FS_SEL_KERNEL)
