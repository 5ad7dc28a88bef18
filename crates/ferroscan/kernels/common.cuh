// Shared by every ferroscan kernel. Header-free: NVRTC ships no cuda_fp16.h / cuda_bf16.h,
// so half types are stored as raw 16-bit words and converted here.
//
// The including kernel is compiled with FS_DTYPE set: 0 float16, 1 bfloat16, 2 float32, 3 float64.
// Half types are storage only: arithmetic happens in acc_t (float; double for float64).

#pragma once

#define FS_FULL_MASK 0xffffffffu
#define FS_WARP 32

#if FS_DTYPE == 0 || FS_DTYPE == 1
typedef unsigned short storage_t;
typedef float acc_t;
#elif FS_DTYPE == 2
typedef float storage_t;
typedef float acc_t;
#elif FS_DTYPE == 3
typedef double storage_t;
typedef double acc_t;
#else
#error "FS_DTYPE must be 0 (f16), 1 (bf16), 2 (f32) or 3 (f64)"
#endif

typedef long long i64;

__device__ __forceinline__ acc_t to_acc(storage_t v) {
#if FS_DTYPE == 0
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#elif FS_DTYPE == 1
    return __uint_as_float(((unsigned)v) << 16);
#else
    return v;
#endif
}

__device__ __forceinline__ storage_t from_acc(acc_t v) {
#if FS_DTYPE == 0
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#elif FS_DTYPE == 1
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    return v;
#endif
}

#if FS_DTYPE == 0 || FS_DTYPE == 1
// Two values rounded to the 16-bit type in one conversion, `lo` in the low half: the same
// round-to-nearest-even as `from_acc` on each.
__device__ __forceinline__ unsigned pack_pair(acc_t lo, acc_t hi) {
    unsigned r;
#if FS_DTYPE == 0
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
#endif

// An affine map s -> a*s + b: what a stretch of a linear recurrence does to its incoming state.
struct AffineMap {
    acc_t a, b;
};

__device__ __forceinline__ AffineMap identity_map() { return AffineMap{acc_t(1), acc_t(0)}; }

// a * s where `a` is a product of gates. When that product underflowed to zero, an infinite s
// stays infinite (signed), as a step-by-step loop keeps it: the exact product is not zero.
__device__ __forceinline__ acc_t scale_by_product(acc_t a, acc_t s) {
    return (a == acc_t(0) && isinf(s)) ? (signbit(a) ? -s : s) : a * s;
}

// The map that applies `first`, then `then`.
__device__ __forceinline__ AffineMap compose(AffineMap first, AffineMap then) {
    return AffineMap{then.a * first.a, scale_by_product(then.a, first.b) + then.b};
}

// The map `m` followed by one step with a real gate `g`: plain arithmetic, as a loop does it.
__device__ __forceinline__ AffineMap then_step(AffineMap m, acc_t g, acc_t x) {
    return AffineMap{g * m.a, g * m.b + x};
}

__device__ __forceinline__ acc_t apply(AffineMap m, acc_t s) { return scale_by_product(m.a, s) + m.b; }

// Thread-block clusters (sm_90 and newer): the blocks of a cluster run at the same time and can
// write each other's shared memory. Only builds that need them use these (their kernel sources
// declare sm_90 as their oldest architecture); the host emulation provides its own. Maps are
// sent with st.async, whose bytes an mbarrier of the receiving block counts: the receiver waits
// on its own barrier and nobody waits on a fence (a release fence at cluster scope also waits for
// the sender's outstanding global stores).
#if !defined(FS_HOST_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// This block's rank in its cluster.
__device__ __forceinline__ unsigned cluster_block_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Every thread of every block of the cluster waits here for all the others (with release and
// acquire: what each wrote before is visible to all after).
__device__ __forceinline__ void cluster_barrier() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ unsigned shared_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// The address of this block's shared variable at `p` in block `rank` of the cluster.
__device__ __forceinline__ unsigned cluster_shared_address(const void* p, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(shared_address(p)), "r"(rank));
    return r;
}

// An mbarrier expecting `arrivals` arrivals per phase; other blocks may use it after
// `mbarrier_init_fence` and a cluster barrier.
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// One arrival on `bar`, whose current phase then also waits for `bytes` bytes of st.async.
__device__ __forceinline__ void mbarrier_arrive_expecting(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
}

// Waits until the phase of `bar` with parity `parity` has completed (its writes are then visible).
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    const unsigned addr = shared_address(bar);
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n\t.reg .pred complete;\n\t"
            "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, complete;\n\t}"
            : "=r"(done)
            : "r"(addr), "r"(parity)
            : "memory");
    }
}

// Writes `m` into the shared variable at `slot` (an address of this block's) of block `rank`,
// counted by that block's mbarrier `bar`.
__device__ __forceinline__ void send_map(const AffineMap* slot, unsigned long long* bar, unsigned rank, AffineMap m) {
    const unsigned to = cluster_shared_address(slot, rank), counter = cluster_shared_address(bar, rank);
#if FS_DTYPE == 3
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f64 [%0], {%1, %2}, [%3];" ::"r"(to),
                 "d"(m.a), "d"(m.b), "r"(counter)
                 : "memory");
#else
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(to),
                 "f"(m.a), "f"(m.b), "r"(counter)
                 : "memory");
#endif
}
#endif

// Copies from global into shared memory that complete in the background (cp.async, sm_80 and
// newer): a thread issues copies, closes them into a group (`copy_async_commit`), and waits until
// at most N of its newest groups are still open (`copy_async_wait<N>`); in flight they hold no
// registers, so a thread can keep several windows of loads outstanding. Only the issuing thread
// may rely on its copies after its wait. Older GPUs copy at once; the host emulation provides
// its own, which copies at the wait.
#ifndef FS_HOST_EMULATION
// Dynamic shared memory, aligned for 16-byte copies whatever T and the static shared memory before it.
#define FS_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
// 16 bytes bypass L1 (.cg): a copy in flight through L1 (.ca, the only kind for 4 and 8 bytes)
// holds L1 space, which a kernel with much shared memory has little of.
template <class T>
__device__ __forceinline__ void copy_async(T* to, const T* from) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16, "cp.async moves 4, 8 or 16 bytes");
    const unsigned shared = (unsigned)__cvta_generic_to_shared(to);
    if constexpr (sizeof(T) == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared), "l"(from) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(shared), "l"(from), "n"((int)sizeof(T))
                     : "memory");
#else
    *to = *from;
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
#endif

// Inclusive scan of maps over the lanes of a warp, lane 0 first.
template <int W = FS_WARP>
__device__ __forceinline__ AffineMap warp_inclusive_scan(AffineMap m, int lane) {
#pragma unroll
    for (int d = 1; d < W; d <<= 1) {
        acc_t pa = __shfl_up_sync(FS_FULL_MASK, m.a, d);
        acc_t pb = __shfl_up_sync(FS_FULL_MASK, m.b, d);
        if (lane >= d) m = compose(AffineMap{pa, pb}, m);
    }
    return m;
}

__device__ __forceinline__ AffineMap shfl_map(AffineMap m, int src_lane) {
    return AffineMap{__shfl_sync(FS_FULL_MASK, m.a, src_lane), __shfl_sync(FS_FULL_MASK, m.b, src_lane)};
}

// Value i of 32-bit words holding storage values packed (two per word for the 16-bit types, two
// words per value for float64), and its rounded replacement; constant indices keep the words in
// registers.
__device__ __forceinline__ acc_t unpack_value(const unsigned* w, int i) {
#if FS_DTYPE == 0 || FS_DTYPE == 1
    return to_acc((storage_t)((w[i / 2] >> (16 * (i % 2))) & 0xffffu));
#elif FS_DTYPE == 2
    return __uint_as_float(w[i]);
#else
    return __hiloint2double((int)w[2 * i + 1], (int)w[2 * i]);
#endif
}
__device__ __forceinline__ void pack_value(unsigned* w, int i, acc_t v) {
#if FS_DTYPE == 0 || FS_DTYPE == 1
    unsigned h = from_acc(v);
    w[i / 2] = (i % 2) ? ((w[i / 2] & 0xffffu) | (h << 16)) : ((w[i / 2] & 0xffff0000u) | h);
#elif FS_DTYPE == 2
    w[i] = __float_as_uint(v);
#else
    w[2 * i] = (unsigned)__double2loint(v);
    w[2 * i + 1] = (unsigned)__double2hiint(v);
#endif
}

// Vectorized access to K consecutive elements held in 32-bit words, constant indices only
// (so the words stay in registers).
template <int K>
struct Run {
    static constexpr int WORDS = K * (int)sizeof(storage_t) / 4;
    static_assert(WORDS % 4 == 0, "a run is a whole number of 16-byte vectors");
    unsigned w[WORDS];

    __device__ __forceinline__ void load(const storage_t* p) {
        const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int i = 0; i < WORDS / 4; ++i) {
            uint4 x = v[i];
            w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
        }
    }
    // To global memory, with the vector store spelled out: as a plain uint4 assignment, NVVM split
    // it into four scalar stores in kernels where it sits among shared-memory reads.
    __device__ __forceinline__ void store(storage_t* p) const {
        uint4* v = reinterpret_cast<uint4*>(p);
#pragma unroll
        for (int i = 0; i < WORDS / 4; ++i) __stwb(v + i, make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]));
    }
    __device__ __forceinline__ acc_t get(int i) const { return unpack_value(w, i); }
    __device__ __forceinline__ void set(int i, acc_t v) { pack_value(w, i, v); }
};
