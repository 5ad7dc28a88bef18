"""What every benchmark shares: the result record, the markdown table, and peers timed in child
processes (so that a peer that faults is reported, not fatal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Result:
    """Timings of one case (medians, ms); ``peers`` maps a peer to its child process's record
    (``status`` "ok" with ``fwd_ms``/``fwd_bwd_ms``, or why not)."""

    case: Any
    fwd_ms: float
    fwd_bwd_ms: float
    roof_fwd_ms: float
    roof_fwd_bwd_ms: float
    peers: dict[str, dict] = field(default_factory=dict)


def table(results: list[Result], fwd_bytes: Callable[[Result], int]) -> str:
    """A markdown table: ours, the share of the roofline, the best peer and the speed-up over it."""
    head = (
        "| case | fwd ms | fwd GB/s | fwd % roof | fwd+bwd ms | fwd+bwd % roof | best peer fwd ms | "
        "best peer fwd+bwd ms | speed-up fwd / fwd+bwd | peer notes |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ok = {p: v for p, v in r.peers.items() if v.get("status") == "ok"}
        best_f = min((v["fwd_ms"] for v in ok.values()), default=None)
        best_b = min((v["fwd_bwd_ms"] for v in ok.values()), default=None)
        speed = (
            f"{best_f / r.fwd_ms:.2f}x / {best_b / r.fwd_bwd_ms:.2f}x" if best_f and best_b else "n/a"
        )
        notes = "; ".join(f"{p.split('.')[-1]}: {v['status']}" for p, v in r.peers.items() if v.get("status") != "ok")
        lines.append(
            f"| {r.case.name} | {r.fwd_ms:.4f} | {fwd_bytes(r) / r.fwd_ms / 1e6:.0f} | "
            f"{100 * r.roof_fwd_ms / r.fwd_ms:.0f}% | {r.fwd_bwd_ms:.4f} | "
            f"{100 * r.roof_fwd_bwd_ms / r.fwd_bwd_ms:.0f}% | "
            f"{best_f if best_f is None else f'{best_f:.4f}'} | {best_b if best_b is None else f'{best_b:.4f}'} | "
            f"{speed} | {notes} |"
        )
    return "\n".join(lines)


def run_peer(script: str, peer: str, cases: list) -> dict[str, dict]:
    """Runs ``script`` (``python -c script peer``; it reads one JSON case per stdin line and prints
    one JSON record with the case's ``name`` under ``"case"`` per line) until every case has a
    record; a crash is recorded against the case it died on and the rest are resumed."""
    results: dict[str, dict] = {}
    pending = list(cases)
    while pending:
        proc = subprocess.run(
            [sys.executable, "-c", script, peer],
            input="\n".join(json.dumps(asdict(c)) for c in pending) + "\n",
            capture_output=True,
            text=True,
            env=os.environ,
        )
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for row in done:
            results[row["case"]] = row
        pending = pending[len(done) :]
        if proc.returncode != 0 and pending:
            if not done and "ModuleNotFoundError" in proc.stderr:
                return {}
            crashed = pending.pop(0)
            last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
            results[crashed.name] = {"case": crashed.name, "status": "crashed: " + last[0][:100]}
        elif proc.returncode == 0:
            break
    return results


def peer_available(peer: str) -> bool:
    """Whether ``import peer`` works in a fresh interpreter."""
    probe = subprocess.run([sys.executable, "-c", f"import {peer}"], capture_output=True)
    return probe.returncode == 0
