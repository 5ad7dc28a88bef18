// Host harness for kernels/selective_scan.cu under cuda_host_shim.h: appended to the kernel source
// (compiled with FS_DTYPE 3, FS_SEL_COMPLEX and FS_SEL_PASS set), it runs one pass the way
// src/cuda/selective_scan.rs launches it. Usage: `harness DIR`, where DIR holds `params.txt`
// ("key value" lines) and the float64 tensors as raw `NAME.bin` files; results are written there.

#include "harness_io.h"

namespace harness {

using Kernel = void (*)(SelParams);

Kernel pick(long long P, long long S) {
#if FS_SEL_PASS == 0
#define FS_HARNESS_K(p, s) \
    if (P == p && S == s) return selective_fwd_p##p##_s##s;
#else
#define FS_HARNESS_K(p, s) \
    if (P == p && S == s) return selective_bwd_p##p##_s##s;
#endif
    FS_SEL_CONFIGS(FS_HARNESS_K)
    throw std::runtime_error("no kernel for this configuration");
}

#if FS_SEL_PASS == 1
// The backward kernel over time chunks, and its phase A.
Kernel pick_chunked(long long P, long long S) {
#define FS_HARNESS_CH(p, s) \
    if (P == p && S == s) return selective_bwd_chunked_p##p##_s##s;
    FS_SEL_CONFIGS(FS_HARNESS_CH)
    throw std::runtime_error("no chunked kernel for this configuration");
}
Kernel pick_carry(long long P, long long S) {
#define FS_HARNESS_C(p, s) \
    if (P == p && S == s) return selective_carry_p##p##_s##s;
    FS_SEL_CONFIGS(FS_HARNESS_C)
    throw std::runtime_error("no carry kernel for this configuration");
}
#endif

}  // namespace harness

int main(int argc, char** argv) {
    using namespace harness;
    if (argc != 2) return 2;
    read_params(argv[1]);
    const long long batch = get("batch"), dim = get("dim"), len = get("len"), N = get("dstate");
    const long long parts = FS_SEL_PARTS, n_ck = (len + FS_SEL_CK - 1) / FS_SEL_CK;
    const long long state = batch * dim * N * parts, seq = batch * dim * len;
    std::vector<double> u = load("u"), delta = load("delta"), z = load("z"), dout = load("dout");
    std::vector<double> A = load("A"), D = load("D"), bias = load("bias"), initial = load("initial");
    std::vector<double> grad_last = load("grad_last"), ckpt = load("ckpt");
    std::vector<double> b_const = load("b_const"), b_var = load("b_var"), c_const = load("c_const"),
                        c_var = load("c_var");
    SelParams Q{};
    Q.u = ptr(u);
    Q.delta = ptr(delta);
    Q.z = ptr(z);
    Q.dout = ptr(dout);
    Q.A = ptr(A);
    Q.D = ptr(D);
    Q.bias = ptr(bias);
    Q.initial = ptr(initial);
    Q.grad_last = ptr(grad_last);
    Q.b_const = ptr(b_const);
    Q.b_var = ptr(b_var);
    Q.c_const = ptr(c_const);
    Q.c_var = ptr(c_var);
    Q.batch = batch;
    Q.dim = dim;
    Q.len = len;
    Q.dstate = N;
    Q.n_ck = n_ck;
    const char* seqs[4] = {"u", "delta", "z", "dout"};
    Strides<3>* seq_strides[4] = {&Q.u_s, &Q.delta_s, &Q.z_s, &Q.dout_s};
    for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 3; ++k) seq_strides[i]->s[k] = cfg[std::string(seqs[i]) + "_s" + std::to_string(k)];
    for (int k = 0; k < 4; ++k) {
        Q.b_s.s[k] = cfg["b_s" + std::to_string(k)];
        Q.c_s.s[k] = cfg["c_s" + std::to_string(k)];
    }
    Q.b_groups = get("b_groups");
    Q.c_groups = get("c_groups");
    Q.ct = get("ct");
    Q.tiles = get("tiles");
    Q.softplus = (int)get("softplus");
    const Kernel kernel = pick(get("P"), get("S"));
    const unsigned grid = (unsigned)(batch * Q.tiles);
#if FS_SEL_PASS == 0
    std::vector<double> out(seq), last(state), checkpoints(state * n_ck);
    Q.out = ptr(out);
    Q.last = ptr(last);
    Q.ckpt = ptr(checkpoints);
    emu::launch(kernel, Q, grid, FS_SEL_THREADS);
    save("out", out);
    save("last", last);
    save("ckpt_out", checkpoints);
#else
    const long long slots = 3 * N * parts + 2, chunks = get("chunks");
    Q.chunks = chunks;
    Q.chunk_cks = get("chunk_cks");
    Q.carry_split = (int)get("carry_split");
    const long long pieces = (n_ck + Q.chunk_cks / Q.carry_split - 1) / (Q.chunk_cks / Q.carry_split);
    Q.carry_pieces = pieces;
    std::vector<double> du(seq), ddelta(seq), dz(z.empty() ? 0 : seq), dinitial(initial.empty() ? 0 : state);
    std::vector<double> part_params(batch * chunks * dim * slots);
    std::vector<double> part_carry(chunks > 1 ? batch * pieces * dim * (N * parts + 1) : 0);
    const long long per_var = batch * Q.tiles * N * len * parts;
    std::vector<double> part_b(b_var.empty() ? 0 : per_var), part_c(c_var.empty() ? 0 : per_var);
    Q.ckpt = ptr(ckpt);
    Q.du = ptr(du);
    Q.ddelta = ptr(ddelta);
    Q.dz = ptr(dz);
    Q.dinitial = ptr(dinitial);
    Q.part_params = ptr(part_params);
    Q.part_b = ptr(part_b);
    Q.part_c = ptr(part_c);
    Q.part_carry = ptr(part_carry);
    if (chunks > 1) {
        emu::launch(pick_carry(get("P"), get("S")), Q, grid * (unsigned)(pieces - Q.carry_split), FS_SEL_THREADS);
        emu::launch(pick_chunked(get("P"), get("S")), Q, grid * (unsigned)chunks, FS_SEL_THREADS);
    } else {
        emu::launch(kernel, Q, grid, FS_SEL_THREADS);
    }
    std::vector<double> dA(dim * N * parts), dB(b_const.size()), dC(c_const.size());
    std::vector<double> dD(D.empty() ? 0 : dim), dbias(bias.empty() ? 0 : dim);
    SelReduceParams R{};
    R.src = ptr(part_params);
    R.da = ptr(dA);
    R.db = ptr(dB);
    R.dc = ptr(dC);
    R.dd = ptr(dD);
    R.dbias = ptr(dbias);
    R.batch = batch * chunks;  // the partials of every (batch element, time chunk)
    R.dim = dim;
    R.len = len;
    R.dstate = N;
    R.tiles = Q.tiles;
    R.ct = Q.ct;
    const long long work = dim * slots;
    emu::launch(selective_reduce_params, R, (unsigned)((work + 255) / 256), 256);
    std::vector<double> dBv, dCv;
    for (int which = 0; which < 2; ++which) {
        const long long groups = which ? Q.c_groups : Q.b_groups;
        if (!groups) continue;
        std::vector<double>& dst = which ? dCv : dBv;
        dst.assign(batch * groups * N * len * parts, 0.0);
        SelReduceParams Rv = R;
        Rv.src = which ? ptr(part_c) : ptr(part_b);
        Rv.dvar = ptr(dst);
        Rv.groups = groups;
        Rv.batch = batch;
        // Two blocks, fewer threads than runs of values: every thread takes several turns of the
        // kernel's grid-stride loop.
        emu::launch(selective_reduce_bc, Rv, 2u, 256);
    }
    save("du", du);
    save("ddelta", ddelta);
    save("dz", dz);
    save("dinitial", dinitial);
    save("dA", dA);
    save("dB", Q.b_groups ? dBv : dB);
    save("dC", Q.c_groups ? dCv : dC);
    save("dD", dD);
    save("dbias", dbias);
#endif
    return 0;
}
