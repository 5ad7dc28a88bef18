"""``python -m ferroscan.bench distributed``: weak scaling of context parallelism.

    python -m ferroscan.bench distributed --ranks 1 2 4 8                    # CUDA + NCCL, one GPU per rank
    python -m ferroscan.bench distributed --device cpu --ranks 1 2 --length 4096 --channels 64

The per-rank problem is fixed (``(B, D, L)`` per rank for ``scan``, ``(B, L, D)`` for
``gated_scan``) and the number of ranks grows, so the whole sequence is ``ranks x L`` long. Each
group of ranks runs in its own spawned processes (NCCL on CUDA, gloo on CPU); every rank times
exactly the same number of forward and forward+backward calls (a barrier, untimed, before each),
and the table reports the slowest rank's median. One rank is the single-device operation (no
communication); weak-scaling efficiency = time(1 rank) / time(R ranks).

Bytes communicated per rank (the one place they are counted; ``S`` = state elements per rank =
B x D, ``s`` = bytes of the transfer dtype: 4 for float16/bfloat16/float32, 8 for float64):
  forward   one all_gather of the stacked (P, E):          sends 2·S·s, receives 2·S·s·(R-1)
  backward  one all_gather of the stacked (B, d final):    sends 2·S·s, receives 2·S·s·(R-1)
  validate  (off here unless --validate) one more all_gather forward of DESCRIPTOR_LEN int64.
What the wire carries depends on NCCL's/gloo's algorithm (a ring moves (R-1)/R of the gathered
buffer through every link); these are the payloads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import ferroscan
import ferroscan.distributed as fd

from .timing import fixed_reps_ms


def comm_bytes(world: int, state_numel: int, elem_bytes: int) -> dict[str, int]:
    """Bytes each rank contributes to (``*_sent``) and receives from (``*_received``) the one
    ``all_gather`` of each pass: the stacked pair (P, E) forward, (B, grad of the final state)
    backward, each ``2 * state_numel`` elements of the transfer dtype."""
    payload = 2 * state_numel * elem_bytes
    return {
        "fwd_sent": payload,
        "fwd_received": (world - 1) * payload,
        "bwd_sent": payload,
        "bwd_received": (world - 1) * payload,
    }


def transfer_elem_bytes(dtype: torch.dtype) -> int:
    """The transfer dtype's size: float32 for half types, else the input dtype."""
    return 8 if dtype == torch.float64 else 4


@dataclass
class Config:
    op: str
    batch: int
    channels: int
    length: int  #: per rank
    dtype: str
    device: str
    warmup: int
    reps: int
    validate: bool
    timeout_s: int


@dataclass
class Row:
    ranks: int
    total_length: int
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_sent: int = 0
    fwd_received: int = 0
    bwd_sent: int = 0
    bwd_received: int = 0
    note: str = ""


def _inputs(cfg: Config, device: torch.device, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(gates, tokens, dim)`` of this rank's slice."""
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    dtype = getattr(torch, cfg.dtype)
    shape, dim = ((cfg.batch, cfg.channels, cfg.length), -1)
    if cfg.op == "gated_scan":
        shape, dim = (cfg.batch, cfg.length, cfg.channels), 1
    gates = torch.empty(shape, device=device, dtype=dtype).uniform_(0.9, 1.0, generator=gen)
    tokens = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)
    return gates, tokens, dim


def _worker(rank: int, world: int, backend: str, init_file: str, cfg: Config, out_file: str) -> None:
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))  # fmt: skip
    try:
        gates, tokens, dim = _inputs(cfg, device, rank)
        kw = dict(dim=dim, validate=cfg.validate)

        def call(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if cfg.op == "gated_scan":
                return fd.gated_scan(x, a, **kw)
            return fd.scan(a, x, **kw)

        a, x = gates.clone().requires_grad_(), tokens.clone().requires_grad_()
        grad = torch.randn_like(tokens)

        def fwd_bwd() -> None:
            torch.autograd.backward(call(a, x), grad)

        with torch.no_grad():
            fwd = fixed_reps_ms(lambda: call(gates, tokens), device, warmup=cfg.warmup, reps=cfg.reps,
                                before=dist.barrier)  # fmt: skip
        both = fixed_reps_ms(fwd_bwd, device, warmup=cfg.warmup, reps=cfg.reps, before=dist.barrier)
        times = torch.tensor([fwd, both], dtype=torch.float64, device=device)
        gathered = [torch.empty_like(times) for _ in range(world)]
        dist.all_gather(gathered, times)
        if rank == 0:
            per_rank = torch.stack(gathered).cpu()
            Path(out_file).write_text(json.dumps({"fwd_ms": per_rank[:, 0].max().item(),
                                                  "fwd_bwd_ms": per_rank[:, 1].max().item()}))  # fmt: skip
    finally:
        dist.destroy_process_group()


def measure(cfg: Config, world: int) -> Row:
    """Runs one group of ``world`` spawned ranks; the slowest rank's medians."""
    row = Row(world, world * cfg.length)
    elem = transfer_elem_bytes(getattr(torch, cfg.dtype))
    if world > 1:
        row.__dict__.update(comm_bytes(world, cfg.batch * cfg.channels, elem))
        if cfg.validate:
            row.fwd_sent += fd.DESCRIPTOR_LEN * 8
            row.fwd_received += (world - 1) * fd.DESCRIPTOR_LEN * 8
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    if cfg.device == "cuda" and torch.cuda.device_count() < world:
        row.note = f"skipped: needs {world} GPUs, found {torch.cuda.device_count()}"
        return row
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        procs = [ctx.Process(target=_worker, args=(r, world, backend, os.path.join(tmp, "init"), cfg, out_file))
                 for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        deadline = time.monotonic() + cfg.timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
                row.note = "timed out"
        if os.path.exists(out_file):
            row.__dict__.update(json.loads(Path(out_file).read_text()))
        elif not row.note:
            row.note = f"failed (exit codes {[p.exitcode for p in procs]})"
    return row


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def table(cfg: Config, rows: list[Row]) -> str:
    base = next((r for r in rows if r.ranks == 1 and r.fwd_ms), None)
    head = ("| ranks | total L | fwd ms | fwd+bwd ms | efficiency fwd / fwd+bwd | KiB sent per rank fwd / bwd | "
            "KiB received per rank fwd / bwd | note |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.fwd_ms is None:
            lines.append(f"| {r.ranks} | {r.total_length} | | | | | | {r.note} |")
            continue
        eff = f"{base.fwd_ms / r.fwd_ms:.2f} / {base.fwd_bwd_ms / r.fwd_bwd_ms:.2f}" if base else "n/a"
        lines.append(
            f"| {r.ranks} | {r.total_length} | {r.fwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | {eff} | "
            f"{_kib(r.fwd_sent)} / {_kib(r.bwd_sent)} | {_kib(r.fwd_received)} / {_kib(r.bwd_received)} | {r.note} |"
        )
    return "\n".join(lines)


def plot(cfg: Config, rows: list[Row], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    done = [r for r in rows if r.fwd_ms is not None]
    if len(done) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.ranks for r in done], [r.fwd_ms for r in done], "o-", label="forward")
    ax.plot([r.ranks for r in done], [r.fwd_bwd_ms for r in done], "s-", label="forward+backward")
    ax.set(xscale="log", xlabel="ranks", ylabel="ms (slowest rank's median)", ylim=(0, None),
           title=f"weak scaling, {cfg.op} per rank {_problem(cfg)} {cfg.dtype} ({cfg.device})")  # fmt: skip
    ax.set_xticks([r.ranks for r in done], [str(r.ranks) for r in done])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _problem(cfg: Config) -> str:
    if cfg.op == "gated_scan":
        return f"({cfg.batch},{cfg.length},{cfg.channels})"
    return f"({cfg.batch},{cfg.channels},{cfg.length})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferroscan.bench distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cuda = torch.cuda.is_available()
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--op", choices=["scan", "gated_scan"], default="scan")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1536 if cuda else 64)
    parser.add_argument("--length", type=int, default=16384 if cuda else 4096, help="time steps per rank")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--validate", action="store_true", help="time with the cross-rank argument check on")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per group of ranks")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.ranks):
        parser.error("--ranks must be positive")
    cfg = Config(args.op, args.batch, args.channels, args.length, args.dtype, args.device, args.warmup, args.reps,
                 args.validate, args.timeout)  # fmt: skip
    where = torch.cuda.get_device_name(0) if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores, gloo)"
    print(f"ferroscan {ferroscan.__version__}, torch {torch.__version__}, {where}; per rank {cfg.op} "
          f"{_problem(cfg)} {cfg.dtype}, validate={cfg.validate}")  # fmt: skip
    rows = []
    for world in sorted(set(args.ranks)):
        print(f"{world} rank(s)...", flush=True)
        rows.append(measure(cfg, world))
    text = table(cfg, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"distributed_{cfg.op}_{cfg.device}"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]},
                                                      indent=2))  # fmt: skip
    path = plot(cfg, rows, args.out / f"{stem}.png")
    if path:
        print(f"plot: {path}")
    return 0 if all(r.fwd_ms is not None or r.note.startswith("skipped") for r in rows) else 1
