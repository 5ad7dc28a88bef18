// Host harness for the rows kernels of kernels/scan.cu under cuda_host_shim.h: appended to the
// kernel source (compiled with FS_DTYPE 3), it runs one pass the way src/cuda/scan.rs launches
// it. Usage: `harness DIR` (see harness_io.h). Parameters: outer, len, reverse, pass (0 forward,
// 1 backward), lookback (1: chunks of `chunk_tiles` tiles, default FS_LOOKBACK_CHUNK_TILES, on the
// look-back kernels; 0: the apply kernels, `row_lanes` (32, 16 or 8) lanes per row), want_final (forward),
// want_grad_initial (backward), repeat N (launch N times, setting every bit of the counter and
// the records before each, as the launcher does), and misalign_NAME 1 to place tensor NAME
// one element off a vector boundary (the launcher then picks the scalar kernels, as it does for a
// length that is not a multiple of FS_ITEMS). A look-back that waited on a record nobody writes
// would never return: blocks run one after another here.

#include <cstring>

#include "harness_io.h"

namespace harness {

using Kernel = void (*)(ScanParams);

Kernel pick(bool bwd, bool lookback, bool rev, bool vec, long long lanes) {
#define FS_HARNESS_APPLY(PASS, R, W) \
    if (lanes == W) return vec ? scan_rows_##PASS##_apply_r##R##_vec_w##W : scan_rows_##PASS##_apply_r##R##_w##W;
#define FS_HARNESS_PICK(PASS, R)                                                                      \
    if (lookback) return vec ? scan_rows_##PASS##_lookback_r##R##_vec : scan_rows_##PASS##_lookback_r##R; \
    FS_HARNESS_APPLY(PASS, R, 8)                                                                      \
    FS_HARNESS_APPLY(PASS, R, 16)                                                                     \
    FS_HARNESS_APPLY(PASS, R, 32)                                                                     \
    return nullptr;
    if (!bwd && !rev) { FS_HARNESS_PICK(fwd, 0) }
    if (!bwd && rev) { FS_HARNESS_PICK(fwd, 1) }
    if (bwd && !rev) { FS_HARNESS_PICK(bwd, 0) }
    FS_HARNESS_PICK(bwd, 1)
}

}  // namespace harness

int main(int argc, char** argv) {
    using namespace harness;
    if (argc != 2) return 2;
    read_params(argv[1]);
    const long long outer = get("outer"), len = get("len"), pass = get("pass");
    const bool rev = get("reverse") != 0, lookback = get("lookback") != 0, bwd = pass != 0;
    const long long numel = outer * len;
    const long long chunk_len = lookback ? get_or("chunk_tiles", FS_LOOKBACK_CHUNK_TILES) * FS_ROWS_TILE
                                         : (len + FS_ROWS_TILE - 1) / FS_ROWS_TILE * FS_ROWS_TILE;
    const long long n_chunks = (len + chunk_len - 1) / chunk_len;
    bool aligned = true;
    for (const auto& [key, value] : cfg) aligned = aligned && !(key.rfind("misalign_", 0) == 0 && value);
    const bool vec = len % FS_ITEMS == 0 && aligned;

    const Input a("a"), x("x"), initial("initial"), grad_h("grad_h"), grad_final("grad_final"), hidden("hidden");
    Buffer out0(bwd ? "grad_a" : "h", numel), out1("grad_x", bwd ? numel : 0),
        final_out("final", get_or(bwd ? "want_grad_initial" : "want_final", 0) ? outer : 0);
    const long long records = outer * n_chunks;
    unsigned long long ticket = 0;
    std::vector<double> maps(4 * records);

    ScanParams P{};
    P.gates = a.ptr();
    if (bwd) {
        P.tokens = grad_h.ptr();
        P.initial = grad_final.ptr();
        P.aux = hidden.ptr();
        P.aux_state = initial.ptr();
        P.out1 = out1.data;
    } else {
        P.tokens = x.ptr();
        P.initial = initial.ptr();
    }
    P.out0 = out0.data;
    P.final_out = final_out.n ? final_out.data : nullptr;
    // As the launcher: rows of one chunk get no scratch (the kernel must not touch it).
    const bool scratch = lookback && n_chunks > 1;
    P.maps = scratch ? maps.data() : nullptr;
    P.ticket = scratch ? &ticket : nullptr;
    P.outer = outer;
    P.len = len;
    P.inner = 1;
    P.chunk_len = chunk_len;
    P.n_chunks = n_chunks;
    // One block per look-back chunk; otherwise a warp per 32 / row_lanes rows.
    const long long lanes = get_or("row_lanes", 32), rows_per_block = FS_ROWS_WARPS * (FS_WARP / lanes);
    const unsigned grid = (unsigned)(lookback ? outer * n_chunks : (outer + rows_per_block - 1) / rows_per_block);
    const Kernel kernel = pick(bwd, lookback, rev, vec, lanes);
    if (!kernel) return 2;
    for (long long i = 0; i < get_or("repeat", 1); ++i) {
        ticket = ~0ull;
        std::memset(maps.data(), 0xff, maps.size() * sizeof(double));
        emu::launch(kernel, P, grid, (lookback ? FS_LOOKBACK_WARPS(bwd) : FS_ROWS_WARPS) * FS_WARP);
    }
    save(bwd ? "grad_a" : "h", out0.values());
    save("grad_x", out1.values());
    save(bwd ? "grad_initial" : "final", final_out.values());
    return 0;
}
