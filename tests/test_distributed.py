r"""Context parallelism (:mod:`ferroscan.distributed`) in real process groups.

Each group size spawns its processes once (gloo on CPU: 2 and 3 ranks; NCCL with one GPU per rank
when 2+ GPUs are present, marked ``cuda``); every check of :data:`distributed_checks.CHECKS` then
runs in that group, in order, and each check is reported here as its own test. What the checks
compare, and with which tolerance, is in ``distributed_checks.py``: values and every gradient
against the single-process result on the concatenated sequence (float64 and float32, forward
and reverse, uneven and empty slices, ``initial`` and the final state, all three operations), the
number and size of the collectives, and the errors raised on every rank for bad arguments.

Process groups are created with a 30 s timeout and the whole group is given a deadline, after
which its processes are terminated: a bug shows as failed tests, never as a hung test run.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import ferroscan
import ferroscan.distributed as fd
import pytest
import torch
import torch.distributed as dist
from distributed_checks import CHECKS, F64, selective_ref, worker

#: Seconds a spawned group may take in all (it needs ~10 s on a 2-core machine).
DEADLINE_S = 240

_results: dict[tuple[str, int], dict] = {}


def _spawn(backend: str, world: int, tmp: Path) -> dict:
    """Runs every check in one group of ``world`` processes; returns per check the row of each
    rank (None where a rank did not report), the exit codes and whether the group overran."""
    ctx = multiprocessing.get_context("spawn")
    names = list(CHECKS)
    procs = [
        ctx.Process(target=worker, args=(r, world, backend, str(tmp / "init"), str(tmp), names), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    overran = [p for p in procs if p.is_alive()]
    for p in overran:
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    rows: dict[str, list] = {name: [None] * world for name in names}
    for r in range(world):
        path = tmp / f"rank{r}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                rows[row["name"]][r] = row
    return {"rows": rows, "exitcodes": [p.exitcode for p in procs], "overran": bool(overran)}


def _check(backend: str, world: int, name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    key = (backend, world)
    if key not in _results:
        _results[key] = _spawn(backend, world, tmp_path_factory.mktemp(f"{backend}{world}"))
    res = _results[key]
    rows = res["rows"][name]
    if all(row is not None and row["status"] == "skip" for row in rows):
        pytest.skip(rows[0]["message"])
    failures = []
    for r, row in enumerate(rows):
        if row is None:
            why = "the group overran its deadline" if res["overran"] else f"exit code {res['exitcodes'][r]}"
            failures.append(f"rank {r}: no result ({why}; an earlier check may have stopped it)")
        elif row["status"] == "fail":
            failures.append(row["message"])
        elif row["status"] == "skip":
            failures.append(f"rank {r} skipped ({row['message']}) but another rank did not")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CHECKS))
def test_gloo(name: str, world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _check("gloo", world, name, tmp_path_factory)


@pytest.mark.cuda
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CHECKS))
def test_nccl(name: str, world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not dist.is_nccl_available():
        pytest.skip("this PyTorch build has no NCCL")
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    _check("nccl", world, name, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Single-process checks
# ---------------------------------------------------------------------------------------------


def test_needs_an_initialized_process_group() -> None:
    assert not dist.is_initialized()
    x = torch.rand(2, 3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.scan(x, x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.gated_scan(x, x)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        fd.scan(x, x, reverse="yes")


def test_selective_ref_is_a_scan() -> None:
    """The stand-in loop against ferroscan.scan: with gates exp(ΔA) and tokens Δ·B·u over the
    (batch, dim, N) states, y = C·h + D·u times silu(z)."""
    gen = torch.Generator().manual_seed(3)
    batch, channels, state_n, n = 2, 4, 3, 7

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    u, delta, z, b, c = r(batch, channels, n), r(batch, channels, n), r(batch, channels, n), r(batch, state_n, n), \
        r(batch, state_n, n)  # fmt: skip
    a, d, bias, h0 = -r(channels, state_n).abs(), r(channels), r(channels), r(batch, channels, state_n)
    y, last = selective_ref(u, delta, a, b, c, d, z, bias, True, True, initial_state=h0)
    step = torch.nn.functional.softplus(delta + bias[:, None])  # (batch, dim, L)
    gates = torch.exp(step[:, :, None, :] * a[None, :, :, None])  # (batch, dim, N, L)
    tokens = step[:, :, None, :] * b[:, None] * u[:, :, None, :]
    h, final = ferroscan.scan(gates, tokens, initial=h0, return_final=True)
    want = ((h * c[:, None]).sum(2) + d[:, None] * u) * torch.nn.functional.silu(z)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, final, rtol=1e-12, atol=1e-12)
