r"""The CUDA gated-scan block kernels (``kernels/gated_scan.cu``), run on the CPU under the host
emulation of CUDA (``tests/cuda_emulation/cuda_host_shim.h``; see
``test_selective_cuda_emulated.py``), against a float64 loop written here.

The kernels are compiled by g++ in float64 with ``FS_GATED_LANE_STATES`` forced, mostly to 2 (and
``FS_GATED_WARPS`` to each of the launcher's builds of 4, 8 and 16 warps per block, and the
cluster build's clusters of four blocks of 4 warps, ``FS_GATED_CLUSTER``, and the staged build's
forward, which copies windows ahead into shared memory asynchronously, ``FS_GATED_STAGES``): on
a GPU two states per lane is what 16-bit types run (one vector access per lane when a lane's two
states are adjacent and aligned, scalar accesses otherwise), and float64 would otherwise get 1.
``gated_harness.cpp`` launches a pass as ``src/cuda/gated_scan.rs`` does. Each case checks the
forward (``y``, final state, checkpoints), the backward that recomputes ``h`` from those
checkpoints, and the plain scan's backward from a stored ``h`` (``scan_blocks_bwd``), on shapes
that exercise partial blocks, odd ``inner`` (a lane's states in two rows), misaligned tensors,
several windows of time, both directions and every optional input.

Not checked here: the 16-bit packing of two values in one register, timing, and the launcher's
Rust (its states-per-block rule has a unit test); the ``cuda`` tests cover those on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from emulation import GXX, assert_close, build, read, run, source, write, write_params

pytestmark = pytest.mark.skipif(GXX is None, reason="the CUDA host emulation needs g++ (C++20)")

SPACING = 8  # FS_GATED_SEG: steps between checkpoints


# (states per lane, warps per block, blocks per cluster, forward stages in shared memory, 0 for
# none): the builds the cases below use.
Build = tuple[int, int, int, int]
BUILDS: list[Build] = [
    (1, 8, 1, 0),
    (2, 8, 1, 0),
    (2, 4, 1, 0),
    (1, 16, 1, 0),
    (2, 4, 4, 0),
    (2, 16, 1, 2),
    (2, 4, 1, 3),
    (1, 8, 1, 2),
]


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> dict[Build, Path]:
    """The harness for each of ``BUILDS``, built once per session."""
    out = tmp_path_factory.mktemp("cuda_emulation_gated")

    def text(states: int, warps: int, cluster: int, stages: int) -> str:
        defines = {
            "FS_DTYPE": 3,
            "FS_GATED_LANE_STATES": states,
            "FS_GATED_WARPS": warps,
            "FS_GATED_CLUSTER": cluster,
            "FS_GATED_STAGES": stages,
        }
        return source("gated_scan.cu", defines, "gated_harness.cpp")

    return {b: build(out, "gated_ls{}_w{}_c{}_s{}".format(*b), text(*b)) for b in BUILDS}


@dataclass(frozen=True)
class Case:
    outer: int = 2
    length: int = 37
    inner: int = 40
    reverse: bool = False
    has_b: bool = True
    has_c: bool = True
    initial: bool = True
    grad_final: bool = True
    misalign: Optional[str] = None  # a tensor the harness places one element off a vector boundary
    lane_states: int = 2
    warps: int = 8  # per block (a build of gated_scan.cu each; the launcher picks 4, 8 or 16)
    cluster: int = 1  # blocks per group (the cluster build: 4)
    stages: int = 0  # the staged forward's stages of shared memory (0: loads into registers)


def _inputs(case: Case, seed: int) -> dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape, state = (case.outer, case.length, case.inner), (case.outer, case.inner)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    # Gates of both signs with magnitudes below 1, so that h stays of order 1 over the sequence.
    gates = (0.4 + 0.6 * torch.rand(*shape, generator=gen, dtype=torch.float64)) * torch.sign(randn(*shape) + 1.5)
    return {
        "x": randn(*shape),
        "a": gates,
        "b": randn(*shape) if case.has_b else None,
        "c": randn(*shape) if case.has_c else None,
        "initial": randn(*state) if case.initial else None,
        "grad_y": randn(*shape),
        "grad_final": randn(*state) if case.grad_final else None,
    }


def _reference(x: dict, reverse: bool, gated: bool) -> dict[str, Optional[torch.Tensor]]:
    """Forward (y, final, checkpoints in (segments, outer*inner)) by a step-by-step loop, and
    the gradients of <y, grad_y> + <final, grad_final> by autograd through it. ``gated=False``:
    the plain scan (b and c ignored)."""
    names = ("x", "a", "b", "c", "initial") if gated else ("x", "a", "initial")
    leaves = {k: x[k].clone().requires_grad_() for k in names if x[k] is not None}
    outer, length, inner = x["x"].shape
    h = leaves.get("initial", torch.zeros(outer, inner, dtype=torch.float64))
    ys: list[Optional[torch.Tensor]] = [None] * length
    checkpoints = []
    for u in range(length):
        t = length - 1 - u if reverse else u
        if u % SPACING == 0:
            checkpoints.append(h.detach().flatten())
        token = leaves["b"][:, t] * leaves["x"][:, t] if "b" in leaves else leaves["x"][:, t]
        h = leaves["a"][:, t] * h + token
        ys[t] = leaves["c"][:, t] * h if "c" in leaves else h
    y = torch.stack(ys, 1) if length else torch.zeros(outer, 0, inner, dtype=torch.float64)
    loss = (y * x["grad_y"]).sum()
    if x["grad_final"] is not None:
        loss = loss + (h * x["grad_final"]).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return {
        "y": y.detach(),
        "final": h.detach(),
        "checkpoints": torch.stack(checkpoints) if checkpoints else torch.zeros(0, dtype=torch.float64),
        **{f"grad_{k}": g for k, g in grads.items()},
    }


def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().contiguous().flatten().numpy()


def run_case(case: Case, emulators: dict[Build, Path], folder: Path, seed: int) -> None:
    exe = emulators[(case.lane_states, case.warps, case.cluster, case.stages)]
    x = _inputs(case, seed)
    base = {"outer": case.outer, "len": case.length, "inner": case.inner, "reverse": int(case.reverse)}
    if case.misalign:
        base[f"misalign_{case.misalign}"] = 1

    def fresh(sub: str) -> Path:
        d = folder / sub
        d.mkdir()
        return d

    # Forward, with the final state and the checkpoints.
    want = _reference(x, case.reverse, gated=True)
    fwd = fresh("fwd")
    write_params(fwd, {**base, "pass": 0, "want_final": 1, "want_checkpoints": 1})
    for name in ("x", "a", "b", "c", "initial"):
        write(fwd, name, _np(x[name]))
    run(exe, fwd)
    assert_close(read(fwd, "y"), _np(want["y"]), "y")
    assert_close(read(fwd, "final"), _np(want["final"]), "final state")
    assert_close(read(fwd, "checkpoints_out"), _np(want["checkpoints"]), "checkpoints")

    # Backward, recomputing h from the emulated forward's checkpoints.
    bwd = fresh("bwd")
    write_params(bwd, {**base, "pass": 1, "want_grad_initial": int(case.initial)})
    for name in ("x", "a", "b", "c", "grad_y", "grad_final"):
        write(bwd, name, _np(x[name]))
    write(bwd, "checkpoints", read(fwd, "checkpoints_out"))
    run(exe, bwd)
    for name in ("x", "a", "b", "c", "initial"):
        if x[name] is not None:
            assert_close(read(bwd, f"grad_{name}"), _np(want[f"grad_{name}"]), f"grad_{name}")

    # The plain scan's backward from its stored h (b, c unused).
    plain = _reference(x, case.reverse, gated=False)
    sbw = fresh("scan_bwd")
    write_params(sbw, {**base, "pass": 2, "want_grad_initial": int(case.initial)})
    for name in ("a", "grad_y", "grad_final", "initial"):
        write(sbw, name, _np(x[name]))
    write(sbw, "hidden", _np(plain["y"]))
    run(exe, sbw)
    for name in ("x", "a", "initial"):
        if x[name] is not None:
            assert_close(read(sbw, f"grad_{name}"), _np(plain[f"grad_{name}"]), f"plain scan grad_{name}")


CASES = {
    # inner a multiple of 64: whole vector groups, one block per 64 states
    "inner64-two-windows": Case(outer=2, length=130, inner=64),
    "inner64-reverse-no-bc": Case(outer=3, length=71, inner=64, reverse=True, has_b=False, has_c=False),
    # inner even but not a multiple of 64 (or 32): groups span rows, a partial last block
    "inner40-b-only": Case(outer=3, length=37, inner=40, has_c=False),
    "inner96-c-only-reverse": Case(outer=1, length=64, inner=96, reverse=True, has_b=False, grad_final=False),
    "inner2-many-rows": Case(outer=45, length=23, inner=2, initial=False),
    # odd inner: a lane's two states can sit in two rows, scalar accesses
    "inner33-odd": Case(outer=3, length=50, inner=33),
    "inner7-odd-reverse": Case(outer=5, length=9, inner=7, reverse=True, grad_final=False),
    "inner1": Case(outer=37, length=17, inner=1, has_b=False),
    "inner65-odd-partial-pair": Case(outer=1, length=66, inner=65, initial=False, grad_final=False),
    # aligned shape, one misaligned tensor: every access falls back to scalar
    "misaligned-a": Case(outer=2, length=40, inner=64, misalign="a"),
    "misaligned-output-reverse": Case(outer=2, length=20, inner=32, reverse=True, misalign="y"),
    "misaligned-grad": Case(outer=1, length=24, inner=64, misalign="grad_x"),
    "misaligned-hidden": Case(outer=1, length=24, inner=64, has_b=False, has_c=False, misalign="hidden"),
    # short sequences: fewer steps than a segment or a window
    "len1": Case(outer=2, length=1, inner=64),
    "len8-reverse": Case(outer=2, length=8, inner=48, reverse=True),
    # one state per lane (what float32 and float64 run on a GPU)
    "one-per-lane": Case(outer=2, length=70, inner=40, lane_states=1),
    "one-per-lane-odd-reverse": Case(outer=3, length=19, inner=33, reverse=True, has_c=False, lane_states=1),
    # blocks of 4 and 16 warps (windows of 32 and 128 steps)
    "four-warps": Case(outer=2, length=75, inner=40, warps=4),
    "four-warps-reverse-odd": Case(outer=3, length=41, inner=33, reverse=True, has_b=False, warps=4),
    "sixteen-warps-one-per-lane": Case(outer=2, length=300, inner=40, lane_states=1, warps=16),
    # clusters of four blocks of 4 warps per group (windows of 128 steps split between the blocks)
    "cluster-several-windows": Case(outer=2, length=300, inner=64, warps=4, cluster=4),
    "cluster-reverse-partial-group": Case(outer=3, length=150, inner=40, reverse=True, has_b=False, warps=4, cluster=4),
    "cluster-short-odd": Case(outer=2, length=20, inner=33, has_c=False, warps=4, cluster=4),
    "cluster-misaligned": Case(outer=1, length=129, inner=64, misalign="b", warps=4, cluster=4),
    # the staged forward: windows copied ahead into shared memory (window 32 steps with 4 warps;
    # inner 64 with two states per lane: whole rows)
    "staged-as-launched": Case(outer=2, length=300, inner=128, warps=16, stages=2),  # the GPU's build
    "staged-many-windows": Case(outer=2, length=300, inner=64, warps=4, stages=3),
    "staged-reverse-partial": Case(outer=3, length=70, inner=40, reverse=True, has_b=False, warps=4, stages=3),
    "staged-fewer-windows-than-stages": Case(outer=2, length=30, inner=64, has_c=False, warps=4, stages=3),
    "staged-misaligned-odd": Case(outer=2, length=100, inner=33, misalign="x", warps=4, stages=3),
    "staged-one-per-lane-two-stages": Case(outer=2, length=200, inner=40, lane_states=1, stages=2),
    # whole rows (inner a multiple of the group): the warp copies its rows in 16-byte pieces
    "staged-whole-rows-one-per-lane": Case(outer=2, length=150, inner=64, reverse=True, lane_states=1, stages=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_gated_kernels_match_a_loop(emulators: dict[Build, Path], tmp_path: Path, name: str) -> None:
    run_case(CASES[name], emulators, tmp_path, seed=len(name))
