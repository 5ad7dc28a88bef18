"""``python -m ferroscan.bench gated``: the fused gated scan against the roofline.

Bytes (the one place they are counted; N elements of s bytes each, checkpoints are float32, one
per state every ``GATED_CHECKPOINT_SPACING`` = 8 steps, i.e. N/8 values of 4 bytes):
  forward, inference      5·N·s            read x, a, b, c; write y
  forward, for training   5·N·s + N/2      ... and write the checkpoints
  backward                9·N·s + N/2      read x, a, b, c, dL/dy and the checkpoints;
                                           write dL/dx, dL/da, dL/db, dL/dc
(the backward also reads a[t+1] at each 8-step segment's end: 1/8 of a, from L2 in practice,
not counted). The roofline is the time of those bytes at the bandwidth of a plain PyTorch
elementwise kernel measured in the same process (``torch.add(a, x, out=h)``: 2 reads and 1 write
of the same numel and dtype), so % of roofline = (bytes / bandwidth) / our time.

Also reported: the composed implementation (``scan`` on b·x, then c·h, autograd; what
``gated_scan`` runs on CPU) and the peak memory of forward+backward beyond the inputs, next to
what the outputs, gradients and checkpoints alone need.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import ferroscan
from ferroscan.ops.gated_scan import _composed

from .timing import median_ms

# quick_ssm's figures from the issue (H100, ms forward / forward+backward), for reference only.
QUICK_SSM_MS = {
    ("float32", 8, 2048, 1536): (10.3, 42.7),
    ("float32", 4, 8192, 1536): (20.4, 84.6),
    ("bfloat16", 8, 2048, 1536): (10.5, 43.8),
    ("bfloat16", 4, 8192, 1536): (20.9, 86.2),
}


def gated_bytes(numel: int, elem_bytes: int) -> dict[str, float]:
    """Bytes each pass must move (see the module docstring)."""
    checkpoints = numel / 8 * 4
    return {
        "fwd": 5 * numel * elem_bytes,
        "fwd_train": 5 * numel * elem_bytes + checkpoints,
        "bwd": 9 * numel * elem_bytes + checkpoints,
    }


@dataclass
class Case:
    batch: int
    length: int
    channels: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.dtype} ({self.batch},{self.length},{self.channels})"


@dataclass
class Result:
    case: str
    fwd_ms: float
    fwd_bwd_ms: float
    roof_fwd_ms: float
    roof_fwd_bwd_ms: float
    composed_fwd_ms: float
    composed_fwd_bwd_ms: float
    peak_mib: float
    needed_mib: float


def measure(case: Case, device: torch.device) -> Result:
    dtype = getattr(torch, case.dtype)
    shape = (case.batch, case.length, case.channels)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)
    a = torch.empty(shape, device=device, dtype=dtype).uniform_(0.9, 1.0, generator=gen)
    b = torch.empty(shape, device=device, dtype=dtype).uniform_(-1, 1, generator=gen)
    c = torch.empty(shape, device=device, dtype=dtype).uniform_(-1, 1, generator=gen)
    grad = torch.randn_like(x)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, c)]

    def fused_fwd_bwd() -> None:
        torch.autograd.grad(ferroscan.gated_scan(*leaves), leaves, grad)

    def composed_fwd_bwd() -> None:
        y = _composed(*leaves, 1, False, None, False, None)
        torch.autograd.grad(y, leaves, grad)

    fwd = median_ms(lambda: ferroscan.gated_scan(x, a, b, c), device)
    both = median_ms(fused_fwd_bwd, device)
    composed_fwd = median_ms(lambda: _composed(x, a, b, c, 1, False, None, False, None), device)
    composed_both = median_ms(composed_fwd_bwd, device)

    out = torch.empty_like(x)
    add_ms = median_ms(lambda: torch.add(a, x, out=out), device)
    bandwidth = 3 * x.numel() * x.element_size() / add_ms  # bytes per ms
    nbytes = gated_bytes(x.numel(), x.element_size())

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fused_fwd_bwd()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    needed = 5 * x.numel() * x.element_size() + x.numel() / 8 * 4  # y, 4 gradients, checkpoints
    return Result(
        case.name, fwd, both, nbytes["fwd"] / bandwidth, (nbytes["fwd_train"] + nbytes["bwd"]) / bandwidth,
        composed_fwd, composed_both, peak / 2**20, needed / 2**20,
    )  # fmt: skip


def table(results: list[Result], cases: list[Case]) -> str:
    head = (
        "| case | fwd ms | fwd % roof | fwd+bwd ms | fwd+bwd % roof | composed fwd / fwd+bwd ms | "
        "quick_ssm fwd / fwd+bwd ms (issue) | peak MiB (outputs+grads+checkpoints MiB) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r, case in zip(results, cases):
        quick = QUICK_SSM_MS.get((case.dtype, case.batch, case.length, case.channels))
        quick_text = f"{quick[0]} / {quick[1]}" if quick else "n/a"
        lines.append(
            f"| {r.case} | {r.fwd_ms:.3f} | {100 * r.roof_fwd_ms / r.fwd_ms:.0f}% | {r.fwd_bwd_ms:.3f} | "
            f"{100 * r.roof_fwd_bwd_ms / r.fwd_bwd_ms:.0f}% | {r.composed_fwd_ms:.3f} / {r.composed_fwd_bwd_ms:.3f} | "
            f"{quick_text} | {r.peak_mib:.0f} ({r.needed_mib:.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferroscan.bench gated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the gated benchmark measures the fused CUDA kernels: it needs a CUDA device")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    print(f"ferroscan {ferroscan.__version__} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    cases = [Case(b, n, d, dt) for dt in args.dtypes for (b, n, d) in [(8, 2048, 1536), (4, 8192, 1536)]]
    results = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name}", flush=True)
        results.append(measure(case, device))
        torch.cuda.empty_cache()
    text = table(results, cases)
    print(text)
    (args.out / "gated.md").write_text(text + "\n")
    (args.out / "gated.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
