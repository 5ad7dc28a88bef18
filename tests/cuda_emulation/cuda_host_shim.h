// Runs CUDA kernel sources on the CPU, for tests on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) of one OS thread; blocks run one after the
// other (the blocks of a thread-block cluster together, as one set of fibers). The scheduler runs
// the fibers round-robin, alternating ascending and descending thread order between rounds, so that
// a read of shared memory not ordered by a barrier after the write it needs returns stale data (and
// fails a test) whichever thread comes first. `__shared__` variables become `static` (one block at
// a time, each starting with them filled with 0x7f bytes, so that a read before the block's first
// write sees garbage), `__syncthreads()` waits until every thread of the block has arrived, and the
// `__shfl_*_sync` functions exchange values through a per-warp buffer once all 32 lanes have
// arrived (`__ballot_sync` likewise). A barrier or shuffle that not every thread reaches (a
// divergence bug) is reported as a deadlock instead of hanging. Global memory is plain host memory
// seen by one OS thread, so `volatile` accesses are plain ones, `__threadfence()` does nothing and
// atomics are plain read-modify-writes; `__nanosleep` yields to the other threads of the block (a
// thread spinning on a flag that another warp of its block sets lets that warp run) and aborts a
// spin that never ends.
//
// Clusters: `cluster_barrier()` and an mbarrier wait stand for a barrier of every thread of the
// cluster. A cluster's blocks share the one (static) copy of each `__shared__` variable and
// `send_map` to any block writes that copy, so this emulates kernels whose blocks keep identical
// copies of their shared data (each block sending its part into every block's copy), as the
// gated scan's cluster build does; it cannot tell a write sent to one block only from one sent to
// all.
//
// Asynchronous copies (`copy_async`) fill their destination with NaN bytes when issued and are
// made at the thread's `copy_async_wait` that completes their group, so a read of the destination
// between the two (before the wait, or by a thread still reading the data the copy replaces)
// returns NaN; their addresses must be aligned to their size, as on a GPU. Dynamic shared memory (`FS_DYNAMIC_SHARED`) is one static buffer, filled with
// NaN bytes before every block (so a read of something never copied is caught too).
//
// Only what ferroscan's kernels use is provided, for FS_DTYPE = 3 (float64: no inline PTX).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared variables live in one section, which every block (cluster) starts with filled
// with a byte pattern: a read before the block's first write returns garbage, as on a GPU.
#define __shared__ static __attribute__((section("fs_emu_shared")))
extern "C" unsigned char __start_fs_emu_shared[], __stop_fs_emu_shared[];
__shared__ __attribute__((used)) unsigned char fs_emu_shared_anchor;  // the section exists in every kernel
#define FS_HOST_EMULATION 1

using std::isfinite;
using std::isinf;
using std::max;
using std::min;
using std::signbit;

struct dim3_ {
    unsigned x = 0, y = 0, z = 0;
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
// Write-back vector stores to global memory: on the host, plain stores.
inline void __stwb(uint4* p, uint4 v) { *p = v; }
inline void __stwb(uint2* p, uint2 v) { *p = v; }
inline void __stwb(unsigned* p, unsigned v) { *p = v; }
inline double __hiloint2double(int hi, int lo) {
    uint64_t bits = ((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo;
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
}
inline int __double2loint(double d) {
    uint64_t bits;
    std::memcpy(&bits, &d, 8);
    return (int)(uint32_t)bits;
}
inline int __double2hiint(double d) {
    uint64_t bits;
    std::memcpy(&bits, &d, 8);
    return (int)(uint32_t)(bits >> 32);
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

[[noreturn]] inline void __trap() {
    std::fprintf(stderr, "emulator: __trap()\n");
    std::abort();
}

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 512 * 1024;

struct PendingCopy {
    void* to;
    const void* from;
    size_t bytes;
};

struct Fiber {
    ucontext_t ctx;
    std::vector<PendingCopy> open_copies;                // issued, not yet committed
    std::vector<std::vector<PendingCopy>> copy_groups;  // committed, oldest first
    std::vector<char> stack;
    dim3_ idx;
    dim3_ block;  // blockIdx
    bool done = false;
    long sync_gen = 0;
    long shfl_gen = 0;
    long sleeps = 0;
};

inline ucontext_t g_scheduler;
inline std::vector<Fiber>* g_fibers = nullptr;
inline Fiber* g_current = nullptr;
inline dim3_ g_block_dim;
inline dim3_ g_grid_dim{1, 1, 1};
inline unsigned g_cluster = 1;  // blocks per cluster
inline long g_progress = 0;
inline long g_sleeps = 0;  // pauses of spinning threads, over all launches
constexpr int kMaxCluster = 8;
inline double g_shfl[kMaxCluster * kMaxThreads / 32][2][32];
constexpr size_t kDynamicShared = 1024 * 1024;  // float64 at two states per lane takes 4x a GPU build
alignas(16) inline unsigned char g_dynamic_shared[kDynamicShared];

inline void yield() { swapcontext(&g_current->ctx, &g_scheduler); }

// Waits until every thread of this block (`cluster`: of its cluster) has arrived.
inline void barrier(bool cluster) {
    const long gen = ++g_current->sync_gen;
    for (;;) {
        bool all = true;
        for (auto& f : *g_fibers)
            all = all && (f.sync_gen >= gen || (!cluster && f.block.x != g_current->block.x));
        if (all) break;
        yield();
    }
    ++g_progress;
}

// The fiber's index in the set that runs together (its cluster).
inline size_t slot() { return (size_t)(g_current - g_fibers->data()); }

// Publishes `v` for this lane's next warp exchange, waits for the warp's other lanes, and returns
// the 32 lanes' values (valid until this lane's next exchange).
inline const double* exchange_all(double v) {
    Fiber* f = g_current;
    const int lane = (int)f->idx.x % 32, warp = (int)(slot() / 32);
    const long gen = ++f->shfl_gen;
    g_shfl[warp][gen & 1][lane] = v;
    for (;;) {
        bool all = true;
        for (int l = 0; l < 32; ++l) {
            const size_t i = (size_t)warp * 32 + l;
            all = all && (i >= g_fibers->size() || (*g_fibers)[i].shfl_gen >= gen);
        }
        if (all) break;
        yield();
    }
    ++g_progress;
    return g_shfl[warp][gen & 1];
}

// Publishes `v` for this lane's next shuffle and returns the value of lane `src` (this lane's own
// value when src is outside the warp).
inline double exchange(double v, int src) {
    const double* lanes = exchange_all(v);
    return (src < 0 || src >= 32) ? v : lanes[src];
}

// A spinning thread's pause: lets the other threads of the block run (the warp-wide votes of a
// spin loop count as progress, so a spin that never ends is caught by counting pauses instead).
inline void sleep() {
    ++g_sleeps;
    if (++g_current->sleeps > 10'000'000) {
        std::fprintf(stderr, "emulator: a spin loop did not end\n");
        std::abort();
    }
    yield();
}

struct Trampoline {
    void (*body)(void*);
    void* arg;
};
inline Trampoline g_trampoline;

inline void fiber_main() {
    g_trampoline.body(g_trampoline.arg);
    g_current->done = true;
    ++g_progress;
    swapcontext(&g_current->ctx, &g_scheduler);
}

// Runs `kernel(params)` for every thread of every block of a 1-d grid, in clusters of `cluster`
// blocks (`grid` a multiple of it).
template <class P>
void launch(void (*kernel)(P), P params, unsigned grid, unsigned block, unsigned cluster = 1) {
    if (cluster < 1 || cluster > (unsigned)kMaxCluster || grid % cluster != 0 || block % 32 != 0) {
        std::fprintf(stderr, "emulator: bad launch (grid %u, block %u, cluster %u)\n", grid, block, cluster);
        std::abort();
    }
    struct Call {
        void (*kernel)(P);
        P* params;
    } call{kernel, &params};
    g_trampoline.body = [](void* c) {
        auto* call = static_cast<Call*>(c);
        call->kernel(*call->params);
    };
    g_trampoline.arg = &call;
    const unsigned threads = block * cluster;
    std::vector<Fiber> fibers(threads);
    g_fibers = &fibers;
    g_block_dim = dim3_{block, 1, 1};
    g_grid_dim = dim3_{grid, 1, 1};
    g_cluster = cluster;
    for (unsigned b = 0; b < grid; b += cluster) {
        std::memset(g_dynamic_shared, 0xff, kDynamicShared);
        std::memset(__start_fs_emu_shared, 0x7f, (size_t)(__stop_fs_emu_shared - __start_fs_emu_shared));
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            f = Fiber{};
            f.stack.resize(kStack);
            f.idx = dim3_{t % block, 0, 0};
            f.block = dim3_{b + t / block, 0, 0};
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        for (bool descending = false;; descending = !descending) {
            const long before = g_progress;
            bool all_done = true;
            for (unsigned i = 0; i < threads; ++i) {
                Fiber& f = fibers[descending ? threads - 1 - i : i];
                if (f.done) continue;
                all_done = false;
                g_current = &f;
                swapcontext(&g_scheduler, &f.ctx);
            }
            if (all_done) break;
            if (g_progress == before) {
                std::fprintf(stderr, "emulator: deadlock in block %u (a barrier or shuffle not reached by all)\n", b);
                std::abort();
            }
        }
    }
    g_fibers = nullptr;
}

}  // namespace emu

#define threadIdx (emu::g_current->idx)
#define blockIdx (emu::g_current->block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::barrier(false); }
inline unsigned cluster_block_rank() { return emu::g_current->block.x % emu::g_cluster; }
inline void cluster_barrier() { emu::barrier(true); }
inline void mbarrier_init(unsigned long long* bar, unsigned) { *bar = 0; }
inline void mbarrier_init_fence() {}
inline void mbarrier_arrive_expecting(unsigned long long*, unsigned) {}
// Every thread waits once per phase, so a cluster barrier stands for the phase's completion.
inline void mbarrier_wait(unsigned long long*, unsigned) { emu::barrier(true); }
#define FS_DYNAMIC_SHARED(T, name) T* const name = reinterpret_cast<T*>(emu::g_dynamic_shared)
template <class T>
inline void copy_async(T* to, const T* from) {
    if (reinterpret_cast<uintptr_t>(to) % sizeof(T) || reinterpret_cast<uintptr_t>(from) % sizeof(T)) {
        std::fprintf(stderr, "emulator: copy_async of %zu bytes at a misaligned address\n", sizeof(T));
        std::abort();
    }
    std::memset(static_cast<void*>(to), 0xff, sizeof(T));  // in flight: neither old nor new data
    emu::g_current->open_copies.push_back({to, from, sizeof(T)});
}
inline void copy_async_commit() {
    auto& f = *emu::g_current;
    f.copy_groups.push_back(std::move(f.open_copies));
    f.open_copies.clear();
}
template <int N>
inline void copy_async_wait() {
    auto& groups = emu::g_current->copy_groups;
    while (groups.size() > (size_t)N) {
        for (const auto& c : groups.front()) std::memcpy(c.to, c.from, c.bytes);
        groups.erase(groups.begin());
    }
}
template <class Map>
inline void send_map(const Map* slot, unsigned long long*, unsigned, Map m) { *const_cast<Map*>(slot) = m; }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    const int lane = (int)threadIdx.x % 32;
    return (T)emu::exchange((double)v, lane ^ mask);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return (T)emu::exchange((double)v, src);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, int d) {
    const int lane = (int)threadIdx.x % 32;
    return (T)emu::exchange((double)v, lane >= d ? lane - d : lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
    const double* lanes = emu::exchange_all(predicate ? 1.0 : 0.0);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (lanes[l] != 0.0 ? 1u : 0u) << l;
    return bits;
}
// Every lane of the warp waits here for the others (what each wrote before is then visible).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::exchange_all(0.0); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline void __threadfence() {}
inline void __nanosleep(unsigned) { emu::sleep(); }
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, int d) {
    const int lane = (int)threadIdx.x % 32;
    return (T)emu::exchange((double)v, lane + d < 32 ? lane + d : lane);
}
