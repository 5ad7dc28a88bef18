"""The main job: scan a realistic problem on CUDA (or the CPU when no GPU is present), check the
answer against a float64 reference, and print throughput.

    python -m ferroscan.demo                     # (8, 1536, 4096) float32 on CUDA, else (8, 256, 4096) on CPU
    python -m ferroscan.demo --device cpu --shape 4 64 100000 --dtype bfloat16

Throughput counts the bytes the operation must move: forward 3 tensor-passes (read a, read x,
write h), backward 5 (read a, h, dL/dh; write dL/da, dL/dx).
"""

from __future__ import annotations

import argparse

import torch

import ferroscan
from ferroscan.bench.timing import median_ms


def reference_scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """h[t] = a[t] h[t-1] + x[t] along the last axis, sequentially in float64."""
    a, x = gates.double(), tokens.double()
    h = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    out = torch.empty_like(x)
    for t in range(x.shape[-1]):
        h = a[..., t] * h + x[..., t]
        out[..., t] = h
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "D", "L"), default=None)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default="float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.shape or ((8, 1536, 4096) if device.type == "cuda" else (8, 256, 4096)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"ferroscan {ferroscan.__version__}: scan of {shape} {args.dtype} on {name}")

    gen = torch.Generator(device="cpu").manual_seed(0)
    gates = (0.9 + 0.1 * torch.rand(shape, generator=gen)).to(device=device, dtype=dtype)
    tokens = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    # Correctness: a slice of the problem (16 rows, at most 4096 steps: the reference is a Python
    # loop) against the float64 reference, values and gradients.
    steps = min(shape[-1], 4096)
    rows = gates.reshape(-1, shape[-1])[:16, :steps], tokens.reshape(-1, shape[-1])[:16, :steps]
    a_chk = rows[0].detach().clone().requires_grad_(True)
    x_chk = rows[1].detach().clone().requires_grad_(True)
    h = ferroscan.scan(a_chk, x_chk)
    weight = torch.randn(h.shape, generator=gen).to(device)
    (h.double() * weight).sum().backward()
    a_ref = rows[0].detach().double().requires_grad_(True)
    x_ref = rows[1].detach().double().requires_grad_(True)
    (reference_scan(a_ref, x_ref) * weight).sum().backward()
    ref = reference_scan(rows[0], rows[1])
    errors = {
        "h": ((h.double() - ref).abs().max() / ref.abs().max()).item(),
        "dL/da": ((a_chk.grad.double() - a_ref.grad).abs().max() / a_ref.grad.abs().max()).item(),
        "dL/dx": ((x_chk.grad.double() - x_ref.grad).abs().max() / x_ref.grad.abs().max()).item(),
    }
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    ok = all(e <= tolerance for e in errors.values())
    print("check vs float64 reference (max error / max |ref|): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + f"  -> {'OK' if ok else 'MISMATCH'} (tolerance {tolerance:g})")

    # Throughput.
    numel, size = tokens.numel(), tokens.element_size()
    fwd_ms = median_ms(lambda: ferroscan.scan(gates, tokens), device)
    a_g = gates.detach().requires_grad_(True)
    x_g = tokens.detach().requires_grad_(True)
    grad = torch.randn_like(tokens)
    # autograd.grad, not .backward(): accumulating into .grad would add elementwise kernels.
    fwd_bwd_ms = median_ms(lambda: torch.autograd.grad(ferroscan.scan(a_g, x_g), (a_g, x_g), grad), device)
    print(f"forward          {fwd_ms:9.3f} ms  {3 * numel * size / fwd_ms / 1e6:8.1f} GB/s")
    print(f"forward+backward {fwd_bwd_ms:9.3f} ms  {8 * numel * size / fwd_bwd_ms / 1e6:8.1f} GB/s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
