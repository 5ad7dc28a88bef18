"""``python -m ferroscan.bench selective``: Mamba's selective scan against the roofline and mamba_ssm.

Cases ``(batch, dim, L, N)`` = (8,1536,2048,16), (4,1536,8192,16), (2,4096,4096,16), as Mamba-1
runs it: variable ``B``/``C`` with one group, ``D``, ``z``, ``delta_bias``, softplus; float32 and
bfloat16 inputs (float32 weights).

Bytes (the one place they are counted). With ``M = batch·dim·L`` sequence elements and
``V = batch·G·N·L`` elements of ``B`` (and as many of ``C``), all of ``s`` bytes:
  forward   (4·M + 2·V)·s   read u, delta, z, B, C; write out
  backward  (7·M + 4·V)·s   read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC
The weights (``A``, ``D``, ``delta_bias``: ``dim·N`` and ``dim`` values) are too small to count,
and so is anything an implementation chooses to save between the passes (ferroscan's
checkpoints, mamba's chunk states): the roofline is what the operation itself must move. The
roofline kernel is a PyTorch copy moving the same number of bytes, timed in the same process.

Forward is timed under ``torch.no_grad()`` (inference: nothing saved for a backward);
forward+backward through autograd with every input requiring a gradient. mamba_ssm, when
importable, is timed the same way in a child process. Without it the table still shows
``TARGETS``: the speed-ups the project aims at over mamba's CUDA kernel, with mamba's times measured
on an H100 for reference.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import ferroscan

from . import common
from .common import Result, peer_available
from .timing import median_ms

PEERS = ("mamba_ssm",)

#: mamba_ssm's CUDA kernel on an H100 (fwd ms, fwd+bwd ms) for each case, and the speed-ups
#: wanted over it: forward >= 3x, forward+backward >= 2x.
MAMBA_H100_MS = {
    "float32 (8,1536,2048,16)": (0.888, 2.93),
    "float32 (4,1536,8192,16)": (1.935, 6.10),
    "float32 (2,4096,4096,16)": (1.198, 4.00),
    "bfloat16 (8,1536,2048,16)": (0.440, 2.29),
    "bfloat16 (4,1536,8192,16)": (1.029, 4.77),
    "bfloat16 (2,4096,4096,16)": (0.597, 3.08),
}
TARGETS = {"fwd": 3.0, "fwd_bwd": 2.0}


@dataclass
class Case:
    """One problem: ``(batch, dim, L)`` sequences with ``N`` states, Mamba-1's options on."""

    batch: int
    dim: int
    length: int
    dstate: int
    dtype: str
    groups: int = 1

    @property
    def name(self) -> str:
        return f"{self.dtype} ({self.batch},{self.dim},{self.length},{self.dstate})"


def selective_bytes(case: Case) -> dict[str, int]:
    """Bytes each pass must move (see the module docstring)."""
    s = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    m = case.batch * case.dim * case.length
    v = case.batch * case.groups * case.dstate * case.length
    fwd, bwd = (4 * m + 2 * v) * s, (7 * m + 4 * v) * s
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def gpu_cases(quick: bool, dtypes: list[str]) -> list[Case]:
    shapes = [(8, 1536, 2048, 16)] if quick else [(8, 1536, 2048, 16), (4, 1536, 8192, 16), (2, 4096, 4096, 16)]
    return [Case(*shape, dtype) for dtype in dtypes for shape in shapes]


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """Mamba-like inputs: A = -(1..N) per channel, softplus'd delta around 0.05..0.2."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    b, d, n, length, g = case.batch, case.dim, case.dstate, case.length, case.groups

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dt, generator=gen)

    return {
        "u": randn(b, d, length),
        "delta": (randn(b, d, length) * 0.5 - 2.0).to(dtype),
        "A": -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1),
        "B": randn(b, g, n, length),
        "C": randn(b, g, n, length),
        "D": randn(d, dt=torch.float32),
        "z": randn(b, d, length),
        "delta_bias": torch.rand(d, device=device, dtype=torch.float32, generator=gen) - 3.0,
    }


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def call(fn: object, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """``fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)``: Mamba-1's call."""
    return fn(*(x[k] for k in ORDER), delta_softplus=True)


def time_both(fn: object, x: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(forward ms under no_grad, forward+backward ms through autograd)."""
    with torch.no_grad():
        fwd = median_ms(lambda: call(fn, x), device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    grad = torch.randn_like(x["u"])
    both = median_ms(lambda: torch.autograd.grad(call(fn, leaves), list(leaves.values()), grad), device)
    return fwd, both


def roofline_ms(nbytes: int, device: torch.device) -> float:
    """A PyTorch copy of ``nbytes / 2`` bytes: it reads and writes ``nbytes`` in all."""
    src = torch.empty(max(nbytes // 8, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device)


def measure(case: Case, device: torch.device) -> Result:
    x = make_inputs(case, device)
    fwd, both = time_both(ferroscan.selective_scan, x, device)
    b = selective_bytes(case)
    roof_fwd, roof_bwd = roofline_ms(b["fwd"], device), roofline_ms(b["bwd"], device)
    return Result(case, fwd, both, roof_fwd, roof_fwd + roof_bwd)


# --- mamba_ssm in a child process ----------------------------------------------------------------

PEER_SCRIPT = r"""
import json, sys, torch, ferroscan
from ferroscan.bench.selective import Case, make_inputs, time_both, call
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
dev = torch.device("cuda")
for line in sys.stdin:
    case = Case(**json.loads(line))
    out = {"case": case.name}
    try:
        x = make_inputs(case, dev)
        ref = call(ferroscan.selective_scan, {k: v.float() if v.is_floating_point() else v for k, v in x.items()})
        err = ((call(selective_scan_fn, x).float() - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-3 if case.dtype == "float32" else 5e-2
        out["fwd_ms"], out["fwd_bwd_ms"] = time_both(selective_scan_fn, x, dev)
        out["status"] = "ok" if err <= tol else f"wrong (rel err {err:.1e})"
        torch.cuda.synchronize()
    except Exception as e:  # the peer's own restriction, reported as such
        out["status"] = "unsupported: " + str(e).splitlines()[0][:80]
        torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
"""


# --- reporting -----------------------------------------------------------------------------------


def targets_table(results: list[Result]) -> str:
    """Our speed-ups over mamba's reference H100 times, against the targets."""
    lines = [
        "| case | mamba fwd ms (H100 ref.) | ours fwd ms | fwd speed-up (target 3x) | mamba fwd+bwd ms | "
        "ours fwd+bwd ms | fwd+bwd speed-up (target 2x) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = MAMBA_H100_MS.get(r.case.name)
        if ref is None:
            continue
        up_f, up_b = ref[0] / r.fwd_ms, ref[1] / r.fwd_bwd_ms
        mark = lambda up, goal: f"{up:.2f}x {'ok' if up >= goal else 'below'}"  # noqa: E731
        lines.append(
            f"| {r.case.name} | {ref[0]:.3f} | {r.fwd_ms:.4f} | {mark(up_f, TARGETS['fwd'])} | {ref[1]:.2f} | "
            f"{r.fwd_bwd_ms:.4f} | {mark(up_b, TARGETS['fwd_bwd'])} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    """Bars per case: ferroscan, the best peer (or mamba's reference), the roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    names = [r.case.name for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, roof, title in ((axes[0], "fwd_ms", "roof_fwd_ms", "forward"),
                                 (axes[1], "fwd_bwd_ms", "roof_fwd_bwd_ms", "forward+backward")):  # fmt: skip
        ours = [getattr(r, key) for r in results]
        peer = []
        for r in results:
            ok = [v[key] for v in r.peers.values() if v.get("status") == "ok"]
            ref = MAMBA_H100_MS.get(r.case.name)
            peer.append(min(ok) if ok else (ref[0 if key == "fwd_ms" else 1] if ref else 0.0))
        xs = range(len(results))
        ax.bar([x - 0.27 for x in xs], ours, 0.27, label="ferroscan")
        ax.bar(xs, peer, 0.27, label="mamba_ssm (measured, else H100 reference)")
        ax.bar([x + 0.27 for x in xs], [getattr(r, roof) for r in results], 0.27, label="roofline", color="k")
        ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=7)
        ax.set(ylabel="ms (median)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "selective.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def cpu_main(out_dir: Path) -> int:
    """CPU: ferroscan against the plain-PyTorch reference loop (compat.mamba.selective_scan_ref)."""
    from ferroscan.compat.mamba import selective_scan_ref

    device = torch.device("cpu")
    rows = []
    for case in [Case(2, 64, 1024, 16, "float32"), Case(1, 256, 4096, 16, "float32")]:
        x = make_inputs(case, device)
        with torch.no_grad():
            ours = median_ms(lambda x=x: call(ferroscan.selective_scan, x), device)
            ref = median_ms(lambda x=x: call(selective_scan_ref, x), device)
        rows.append({"case": case.name, "ferroscan_ms": ours, "torch_loop_ms": ref, "speedup": ref / ours})
    print(f"CPU: {torch.get_num_threads()} threads")
    print("| case | ferroscan ms | PyTorch loop ms | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ferroscan_ms']:.1f} | {r['torch_loop_ms']:.1f} | {r['speedup']:.1f}x |")
    (out_dir / "selective_cpu.json").write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferroscan.bench selective", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the (8, 1536, 2048, 16) case")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        return cpu_main(args.out)

    cases = gpu_cases(args.quick, args.dtypes)
    device = torch.device("cuda")
    print(f"ferroscan {ferroscan.__version__} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results: list[Result] = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name}", flush=True)
        results.append(measure(case, device))
        torch.cuda.empty_cache()
    peers = [] if args.no_peers else [p for p in PEERS if peer_available(p)]
    for peer in peers:
        print(f"peer {peer}: {len(cases)} cases in a child process", flush=True)
        by_case = common.run_peer(PEER_SCRIPT, peer, cases)
        for r in results:
            if r.case.name in by_case:
                r.peers[peer] = by_case[r.case.name]
    if not peers and not args.no_peers:
        print("mamba_ssm is not importable: comparing with its reference H100 times instead")
    text = common.table(results, lambda r: selective_bytes(r.case)["fwd"]) + "\n\n" + targets_table(results)
    print(text)
    (args.out / "selective.md").write_text(text + "\n")
    (args.out / "selective.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    for path in plot(results, args.out):
        print(f"plot: {path}")
    return 0
