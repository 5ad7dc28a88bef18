// Host harness for kernels/gated_scan.cu under cuda_host_shim.h: appended to the kernel source
// (compiled with FS_DTYPE 3 and FS_GATED_LANE_STATES set), it runs one pass on the block kernels
// the way src/cuda/gated_scan.rs launches them (a block of FS_GATED_WARPS warps per group of
// FS_GATED_BLOCK_STATES states; a cluster of FS_GATED_CLUSTER such blocks in the cluster build). Usage: `harness DIR` (see harness_io.h). Parameters: outer, len,
// inner, reverse, pass (0 gated forward, 1 gated backward, 2 the plain scan's backward from its
// stored h), want_final / want_checkpoints (forward), want_grad_initial (backward), and
// misalign_NAME 1 to place tensor NAME one element off a vector boundary.

#include "harness_io.h"

namespace harness {

using Kernel = void (*)(GatedParams);

Kernel pick(long long pass, bool rev, bool hb, bool hc) {
    if (pass == 2) return rev ? scan_blocks_bwd_r1 : scan_blocks_bwd_r0;
#define FS_HARNESS_K(R, B, C)                    \
    if (rev == R && hb == B && hc == C)          \
        return pass ? gated_bwd_r##R##_b##B##_c##C \
                    : gated_fwd_r##R##_b##B##_c##C;
    FS_HARNESS_K(0, 0, 0)
    FS_HARNESS_K(0, 0, 1)
    FS_HARNESS_K(0, 1, 0)
    FS_HARNESS_K(0, 1, 1)
    FS_HARNESS_K(1, 0, 0)
    FS_HARNESS_K(1, 0, 1)
    FS_HARNESS_K(1, 1, 0)
    FS_HARNESS_K(1, 1, 1)
    throw std::runtime_error("no kernel for this configuration");
}

}  // namespace harness

int main(int argc, char** argv) {
    using namespace harness;
    if (argc != 2) return 2;
    read_params(argv[1]);
    const long long outer = get("outer"), len = get("len"), inner = get("inner"), pass = get("pass");
    const bool rev = get("reverse") != 0;
    const long long states = outer * inner, numel = outer * len * inner;
    const long long segments = (len + FS_GATED_SEG - 1) / FS_GATED_SEG;
    const Input x("x"), a("a"), b("b"), c("c"), initial("initial"), grad_y("grad_y"), grad_final("grad_final"),
        hidden("hidden"), checkpoints("checkpoints");
    GatedParams P{};
    P.x = x.ptr();
    P.a = a.ptr();
    P.b = b.ptr();
    P.c = c.ptr();
    P.initial = initial.ptr();
    P.grad_y = grad_y.ptr();
    P.grad_final = grad_final.ptr();
    P.hidden = hidden.ptr();
    P.checkpoints = checkpoints.ptr();
    P.outer = outer;
    P.len = len;
    P.inner = inner;
    const Kernel kernel = pick(pass, rev, b.present(), c.present());
    const unsigned groups = (unsigned)((states + FS_GATED_BLOCK_STATES - 1) / FS_GATED_BLOCK_STATES);
    const unsigned grid = groups * FS_GATED_CLUSTER;
    const unsigned block = FS_GATED_WARPS * FS_WARP;
    if (pass == 0) {
        Buffer y("y", numel), final_out("final", get_or("want_final", 0) ? states : 0),
            ckpt("checkpoints_out", get_or("want_checkpoints", 0) ? segments * states : 0);
        P.y = y.data;
        P.final_out = final_out.n ? final_out.data : nullptr;
        P.checkpoints = ckpt.n ? ckpt.data : nullptr;
        emu::launch(kernel, P, grid, block, FS_GATED_CLUSTER);
        save("y", y.values());
        save("final", final_out.values());
        save("checkpoints_out", ckpt.values());
    } else {
        Buffer gx("grad_x", numel), ga("grad_a", numel), gb("grad_b", b.present() ? numel : 0),
            gc("grad_c", c.present() ? numel : 0), gi("grad_initial", get_or("want_grad_initial", 0) ? states : 0);
        P.grad_x = gx.data;
        P.grad_a = ga.data;
        P.grad_b = gb.n ? gb.data : nullptr;
        P.grad_c = gc.n ? gc.data : nullptr;
        P.grad_initial = gi.n ? gi.data : nullptr;
        emu::launch(kernel, P, grid, block, FS_GATED_CLUSTER);
        save("grad_x", gx.values());
        save("grad_a", ga.values());
        save("grad_b", gb.values());
        save("grad_c", gc.values());
        save("grad_initial", gi.values());
    }
    return 0;
}
