"""``python -m ferroscan.bench scan``: the first-order scan against the roofline and its peers.

Bytes (the one place they are counted; N elements of s bytes each):
  forward  3·N·s  read a, read x, write h
  backward 5·N·s  read a, h, dL/dh; write dL/da, dL/dx
The roofline kernels move exactly these: forward ``torch.add(a, x, out=h)``; backward
``torch.add(a, h, out=ga)`` then ``gx.copy_(g)``.
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

PEERS = ("accelerated_scan.warp", "accelerated_scan.scalar")


def scan_bytes(numel: int, elem_bytes: int) -> dict[str, int]:
    """Bytes each pass must move (see the module docstring)."""
    return {"fwd": 3 * numel * elem_bytes, "bwd": 5 * numel * elem_bytes, "fwd_bwd": 8 * numel * elem_bytes}


@dataclass
class Case:
    """One problem: ``(B, D, L)`` with the time axis last, or channels-last ``(B, L, D)``."""

    batch: int
    channels: int
    length: int
    dtype: str
    channels_last: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.channels_last:
            return (self.batch, self.length, self.channels)
        return (self.batch, self.channels, self.length)

    @property
    def dim(self) -> int:
        return 1 if self.channels_last else -1

    @property
    def name(self) -> str:
        b, d, n = self.shape
        return f"{self.dtype} ({b},{d},{n}){' dim=1' if self.channels_last else ''}"


def gpu_cases(quick: bool, dtypes: list[str]) -> list[Case]:
    cases = []
    for dtype in dtypes:
        lengths = [128, 512, 2048, 8192] if quick else [2**k for k in range(7, 17)] + [1000, 3000, 100000]
        cases += [Case(8, 1536, n, dtype) for n in sorted(lengths)]
        cases += [Case(2, 256, 4096, dtype)] + ([] if quick else [Case(2, 256, 65536, dtype)])
        cases += [Case(1, 64, 2**20, dtype), Case(1, 16, 2**24, dtype)] + ([] if quick else [Case(4, 1, 2**26, dtype)])
        cases += [Case(8, 1536, n, dtype, channels_last=True) for n in ([2048] if quick else [2048, 32768])]
    return cases


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    gates = torch.empty(case.shape, device=device, dtype=dtype).uniform_(0.9, 1.0, generator=gen)
    tokens = torch.empty(case.shape, device=device, dtype=dtype).normal_(generator=gen)
    return gates, tokens


def measure(case: Case, device: torch.device) -> Result:
    gates, tokens = make_inputs(case, device)
    fwd = median_ms(lambda: ferroscan.scan(gates, tokens, dim=case.dim), device)
    a, x = gates.clone().requires_grad_(True), tokens.clone().requires_grad_(True)
    grad = torch.randn_like(tokens)

    def fwd_bwd() -> None:
        torch.autograd.grad(ferroscan.scan(a, x, dim=case.dim), (a, x), grad)

    both = median_ms(fwd_bwd, device)
    out1, out2 = torch.empty_like(tokens), torch.empty_like(tokens)
    roof_fwd = median_ms(lambda: torch.add(gates, tokens, out=out1), device)

    def roof_bwd() -> None:
        torch.add(gates, tokens, out=out1)
        out2.copy_(grad)

    roof_bwd_ms = median_ms(roof_bwd, device)
    return Result(case, fwd, both, roof_fwd, roof_fwd + roof_bwd_ms)


# --- peers, each in a child process --------------------------------------------------------------

PEER_SCRIPT = r"""
import json, sys, importlib, torch, ferroscan
from ferroscan.bench.scan import Case, make_inputs
from ferroscan.bench.timing import median_ms
peer = importlib.import_module(sys.argv[1])
dev = torch.device("cuda")
for line in sys.stdin:
    case = Case(**json.loads(line))
    out = {"case": case.name}
    try:
        g, x = make_inputs(case, dev)
        if case.channels_last:   # the peers only take (B, D, L): transpose in and out, as their users must
            t = lambda v: v.transpose(1, 2).contiguous()
            call = lambda g, x: t(peer.scan(t(g), t(x)))
        else:
            call = lambda g, x: peer.scan(g.contiguous(), x.contiguous())
        h = call(g, x)
        ref = ferroscan.scan(g.float(), x.float(), dim=case.dim)
        err = ((h.float() - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-3 if case.dtype == "float32" else 5e-2
        out["fwd_ms"] = median_ms(lambda: call(g, x), dev)
        a, xr = g.clone().requires_grad_(True), x.clone().requires_grad_(True)
        gr = torch.randn_like(x)
        out["fwd_bwd_ms"] = median_ms(lambda: torch.autograd.grad(call(a, xr), (a, xr), gr), dev)
        out["status"] = "ok" if err <= tol else f"wrong (rel err {err:.1e})"
        torch.cuda.synchronize()
    except Exception as e:  # a peer's own restriction, reported as such
        out["status"] = "unsupported: " + str(e).splitlines()[0][:80]
        torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
"""


# --- reporting -----------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    def fwd_bytes(r: Result) -> int:
        numel = r.case.batch * r.case.channels * r.case.length
        return scan_bytes(numel, torch.empty((), dtype=getattr(torch, r.case.dtype)).element_size())["fwd"]

    return common.table(results, fwd_bytes)


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    paths = []
    for dtype in sorted({r.case.dtype for r in results}):
        family = sorted(
            (r for r in results
             if r.case.dtype == dtype and r.case.shape[:2] == (8, 1536) and not r.case.channels_last),
            key=lambda r: r.case.length,
        )
        if len(family) < 2:
            continue
        lengths = [r.case.length for r in family]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        ax1.plot(lengths, [r.fwd_ms for r in family], "o-", label="ferroscan fwd")
        ax1.plot(lengths, [r.fwd_bwd_ms for r in family], "s-", label="ferroscan fwd+bwd")
        ax1.plot(lengths, [r.roof_fwd_ms for r in family], "k--", label="roofline fwd")
        ax1.plot(lengths, [r.roof_fwd_bwd_ms for r in family], "k:", label="roofline fwd+bwd")
        for peer in PEERS:
            pts = [(r.case.length, r.peers[peer]["fwd_ms"]) for r in family
                   if r.peers.get(peer, {}).get("status") == "ok"]
            if pts:
                ax1.plot(*zip(*pts), "x-", alpha=0.7, label=f"{peer} fwd")
        ax1.set(xscale="log", yscale="log", xlabel="L", ylabel="ms (median)", title=f"latency, (8, 1536, L) {dtype}")
        ax1.legend(fontsize=8)
        ax2.plot(lengths, [100 * r.roof_fwd_ms / r.fwd_ms for r in family], "o-", label="fwd")
        ax2.plot(lengths, [100 * r.roof_fwd_bwd_ms / r.fwd_bwd_ms for r in family], "s-", label="fwd+bwd")
        ax2.axhline(100, color="k", ls="--", lw=0.8)
        ax2.set(xscale="log", xlabel="L", ylabel="% of roofline", title="share of the memory roofline", ylim=(0, 110))
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"scan_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def cpu_main(out_dir: Path) -> int:
    """CPU: ferroscan against torch.cumsum of the same tensor (the same memory traffic class)."""
    device = torch.device("cpu")
    rows = []
    for case in [Case(8, 1536, 4096, "float32"), Case(8, 1536, 4096, "float32", channels_last=True)]:
        gates, tokens = make_inputs(case, device)
        ours = median_ms(lambda g=gates, x=tokens, d=case.dim: ferroscan.scan(g, x, dim=d), device)
        cumsum = median_ms(lambda x=tokens, d=case.dim: torch.cumsum(x, dim=d), device)
        rows.append({"case": case.name, "ferroscan_ms": ours, "cumsum_ms": cumsum, "ratio": ours / cumsum})
    print(f"CPU: {torch.get_num_threads()} threads")
    print("| case | ferroscan ms | torch.cumsum ms | ferroscan / cumsum |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ferroscan_ms']:.1f} | {r['cumsum_ms']:.1f} | {r['ratio']:.2f} |")
    (out_dir / "scan_cpu.json").write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferroscan.bench scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset that fits in a few minutes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        return cpu_main(args.out)

    cases = gpu_cases(args.quick, args.dtypes)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    device = torch.device("cuda")
    print(f"ferroscan {ferroscan.__version__} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results: list[Result] = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name}", flush=True)
        results.append(measure(case, device))
        torch.cuda.empty_cache()
    peers: list[str] = [] if args.no_peers else [p for p in PEERS if peer_available(p)]
    for peer in peers:
        print(f"peer {peer}: {len(cases)} cases in child processes", flush=True)
        by_case = common.run_peer(PEER_SCRIPT, peer, cases)
        for r in results:
            if r.case.name in by_case:
                r.peers[peer] = by_case[r.case.name]
    if not peers and not args.no_peers:
        print("no peer importable (pip install accelerated-scan to compare)")
    text = table(results)
    print(text)
    (args.out / "scan.md").write_text(text + "\n")
    (args.out / "scan.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    for path in plot(results, args.out):
        print(f"plot: {path}")
    return 0
