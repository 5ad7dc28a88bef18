r"""The CUDA first-order scan's rows kernels (``kernels/scan.cu``, time innermost), run on the CPU
under the host emulation of CUDA (``tests/cuda_emulation/cuda_host_shim.h``; see
``test_selective_cuda_emulated.py``), against a float64 loop written here.

``scan_harness.cpp`` launches a pass as ``src/cuda/scan.rs`` does: the single-pass look-back
kernels for rows cut into chunks (a block per chunk of 16 tiles of 32 lanes x 4 items in float64:
2048 steps, 4 warps of 4 tiles each), and the one-warp-per-row kernels. The emulator runs blocks
one after another in ``blockIdx`` order, so a chunk's predecessors are complete when it looks back
(the waiting itself only runs on a GPU). A build with ``FS_LOOKBACK_PUBLISH_STATE=0`` publishes
only chunk 0's end state, so every look-back folds aggregates back through several windows of 32
chunks to the row's start; it also cuts chunks as other dtypes do (forward 2 warps of 8 tiles,
backward 8 warps of 2 tiles, as the 16-bit types' backward).

Not checked here: memory ordering between multiprocessors (the emulator runs one thread at a
time; fences do nothing), the 16-bit and float32 specializations, timing; the ``cuda`` tests and
benchmarks cover those on a GPU.
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

CHUNK = 2048  # float64 look-back chunk: FS_LOOKBACK_CHUNK_TILES (16) x 32 lanes x FS_ITEMS (4)


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The harness as the GPU runs float64 (True), and with only chunk 0 publishing its end state
    and other cuts of a chunk over warps (False)."""
    out = tmp_path_factory.mktemp("cuda_emulation_scan")
    binaries = {}
    for publish in (True, False):
        defines = {"FS_DTYPE": 3, "FS_LOOKBACK_PUBLISH_STATE": int(publish)}
        if not publish:
            defines.update(FS_LOOKBACK_WARPS_FWD=2, FS_LOOKBACK_WARPS_BWD=8)
        binaries[publish] = build(out, f"scan_p{int(publish)}", source("scan.cu", defines, "scan_harness.cpp"))
    return binaries


@dataclass(frozen=True)
class Case:
    outer: int = 2
    length: int = 1024
    reverse: bool = False
    initial: bool = True
    grad_final: bool = True
    lookback: bool = True
    publish_state: bool = True  # False: the FS_LOOKBACK_PUBLISH_STATE=0 build
    chunk_tiles: Optional[int] = None  # tiles per look-back chunk, if not the kernel's maximum
    misalign: Optional[str] = None  # a tensor placed one element off a vector boundary
    repeat: int = 1  # launches on the same scratch (reset before each, as the launcher does)
    row_lanes: int = 32  # apply kernels: lanes per row (16 or 8: a warp serves 2 or 4 rows)


def _inputs(case: Case, seed: int) -> dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape, state = (case.outer, case.length), (case.outer,)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    # Gates of both signs with magnitudes in [0.9, 1): products shrink slowly, so that states
    # carried across many chunks still matter.
    gates = (0.9 + 0.1 * torch.rand(*shape, generator=gen, dtype=torch.float64)) * torch.sign(randn(*shape) + 1.5)
    return {
        "a": gates,
        "x": randn(*shape),
        "initial": randn(*state) if case.initial else None,
        "grad_h": randn(*shape),
        "grad_final": randn(*state) if case.grad_final else None,
    }


def _reference(x: dict, reverse: bool) -> dict[str, torch.Tensor]:
    """h[t] = a[t]*h[t-1] + x[t] step by step (rows at once), and the gradients of
    <h, grad_h> + <final, grad_final> by autograd through the loop."""
    leaves = {k: x[k].clone().requires_grad_() for k in ("a", "x", "initial") if x[k] is not None}
    outer, length = x["x"].shape
    h = leaves.get("initial", torch.zeros(outer, dtype=torch.float64))
    hs: list[Optional[torch.Tensor]] = [None] * length
    for u in range(length):
        t = length - 1 - u if reverse else u
        h = leaves["a"][:, t] * h + leaves["x"][:, t]
        hs[t] = h
    hidden = torch.stack(hs, 1)
    loss = (hidden * x["grad_h"]).sum()
    if x["grad_final"] is not None:
        loss = loss + (h * x["grad_final"]).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return {"h": hidden.detach(), "final": h.detach(), **{f"grad_{k}": g for k, g in grads.items()}}


def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().contiguous().flatten().numpy()


def run_case(case: Case, emulators: dict[bool, Path], folder: Path, seed: int) -> None:
    exe = emulators[case.publish_state]
    x = _inputs(case, seed)
    want = _reference(x, case.reverse)
    base = {"outer": case.outer, "len": case.length, "reverse": int(case.reverse), "lookback": int(case.lookback)}
    base["repeat"] = case.repeat
    base["row_lanes"] = case.row_lanes
    if case.chunk_tiles:
        base["chunk_tiles"] = case.chunk_tiles
    if case.misalign:
        base[f"misalign_{case.misalign}"] = 1

    fwd = folder / "fwd"
    fwd.mkdir()
    write_params(fwd, {**base, "pass": 0, "want_final": 1})
    for name in ("a", "x", "initial"):
        write(fwd, name, _np(x[name]))
    run(exe, fwd)
    assert_close(read(fwd, "h"), _np(want["h"]), "h")
    assert_close(read(fwd, "final"), _np(want["final"]), "final state")

    # The backward from the emulated forward's h.
    bwd = folder / "bwd"
    bwd.mkdir()
    write_params(bwd, {**base, "pass": 1, "want_grad_initial": int(case.initial)})
    for name in ("a", "grad_h", "grad_final", "initial"):
        write(bwd, name, _np(x[name]))
    write(bwd, "hidden", read(fwd, "h"))
    run(exe, bwd)
    for name in ("a", "x", "initial"):
        if x[name] is not None:
            assert_close(read(bwd, f"grad_{name}"), _np(want[f"grad_{name}"]), f"grad_{name}")


CASES = {
    # look-back, vector path (length a multiple of FS_ITEMS): whole chunks, a partial last tile,
    # a last chunk whose second tile is empty
    "lookback-4-chunks": Case(outer=2, length=4 * CHUNK),
    "lookback-partial-tile-reverse": Case(outer=3, length=3 * CHUNK + 100, reverse=True),
    "lookback-empty-last-tile": Case(outer=5, length=2 * CHUNK + 40, initial=False),
    "lookback-last-chunk-ends-in-third-warp": Case(outer=3, length=2 * CHUNK + 1100, reverse=True),
    "lookback-last-chunk-ends-in-last-warp": Case(outer=2, length=3 * CHUNK - 9),
    # scalar path: a length that is not a multiple of FS_ITEMS, or a misaligned tensor
    "lookback-scalar": Case(outer=2, length=4 * CHUNK + 1, grad_final=False),
    "lookback-scalar-reverse": Case(outer=4, length=2 * CHUNK + 3, reverse=True, initial=False, grad_final=False),
    "lookback-misaligned-hidden": Case(outer=2, length=3 * CHUNK, misalign="hidden"),
    "lookback-misaligned-x-reverse": Case(outer=1, length=3 * CHUNK, reverse=True, misalign="x"),
    # rows of one chunk (too few rows for a warp each): a block per row, nothing to look back on
    "lookback-single-chunk-rows": Case(outer=3, length=CHUNK - 100),
    "lookback-single-chunk-rows-reverse-scalar": Case(outer=2, length=CHUNK - 3, reverse=True, grad_final=False),
    # one row: every chunk's predecessor is the block before
    "lookback-one-row": Case(outer=1, length=41 * CHUNK + 7),
    "lookback-one-row-reverse": Case(outer=1, length=9 * CHUNK, reverse=True, grad_final=False),
    # rows not a multiple of the block's warps; smaller chunks than the kernel holds
    "lookback-7-rows-one-tile-chunks": Case(outer=7, length=5 * CHUNK // 2 + 9, chunk_tiles=1),
    # several launches on one scratch buffer
    "lookback-repeated": Case(outer=3, length=6 * CHUNK, repeat=3),
    # only chunk 0 publishes its end state: look-backs over several windows of 32 chunks
    "aggregates-only": Case(outer=2, length=40 * CHUNK + 5, publish_state=False),
    "aggregates-only-one-row-reverse": Case(outer=1, length=66 * CHUNK, reverse=True, publish_state=False),
    # one warp per row (enough rows to fill a GPU): vector and scalar paths, a row shorter than a tile
    "single-chunk": Case(outer=3, length=1000, lookback=False),
    "single-chunk-scalar-reverse": Case(outer=5, length=1001, reverse=True, lookback=False, initial=False),
    "single-chunk-short": Case(outer=6, length=5, lookback=False, grad_final=False),
    "single-chunk-misaligned-a": Case(outer=2, length=512, lookback=False, misalign="a"),
    # short rows, several per warp (the last warp's last segments past the last row): one tile
    # of 8 lanes x 4 items, vector and scalar paths; 16 lanes reversed; and rows of several
    # 8-lane tiles (the planner gives such rows 32 lanes, but the segments carry state and the
    # backward's gate from tile to tile like whole warps)
    "short-rows-8-lanes": Case(outer=7, length=32, lookback=False, row_lanes=8),
    "short-rows-8-lanes-scalar-backward-gate": Case(outer=9, length=30, lookback=False, row_lanes=8, initial=False),
    "short-rows-16-lanes-reverse": Case(outer=5, length=64, reverse=True, lookback=False, row_lanes=16),
    "short-rows-8-lanes-several-tiles-reverse": Case(outer=6, length=100, reverse=True, lookback=False, row_lanes=8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_scan_rows_kernels_match_a_loop(emulators: dict[bool, Path], tmp_path: Path, name: str) -> None:
    run_case(CASES[name], emulators, tmp_path, seed=len(name))


def test_emulated_look_back_publishes_the_all_ones_nan(emulators: dict[bool, Path], tmp_path: Path) -> None:
    """A look-back record starts with every bit set, and a reader waits until a word differs. A
    NaN gate with exactly that bit pattern makes chunk 0's map and end state that pattern too (the
    host's arithmetic keeps a NaN operand's payload); publishing it unchanged would leave chunk 1
    waiting forever. The kernels publish another NaN instead: the run ends, the states are NaN
    from that step on in both passes, and equal to the loop's before it."""
    case = Case(outer=2, length=3 * CHUNK, initial=False)
    x = _inputs(case, seed=7)
    all_ones = np.array([0xFFFFFFFFFFFFFFFF], dtype=np.uint64).view(np.float64)[0]
    x["a"][0, CHUNK - 5] = float(all_ones)
    assert np.isnan(x["a"][0, CHUNK - 5].item())
    want = _reference(x, reverse=False)
    base = {"outer": case.outer, "len": case.length, "reverse": 0, "lookback": 1}

    def check(got: np.ndarray, expected: torch.Tensor, what: str) -> None:
        e = _np(expected)
        assert np.array_equal(np.isnan(got), np.isnan(e)), f"{what}: NaN where the loop has none, or the reverse"
        finite = ~np.isnan(e)
        assert finite.any() and not finite.all()
        assert_close(got[finite], e[finite], what)

    fwd = tmp_path / "fwd"
    fwd.mkdir()
    write_params(fwd, {**base, "pass": 0, "want_final": 1})
    for name in ("a", "x"):
        write(fwd, name, _np(x[name]))
    run(emulators[True], fwd, timeout=60)
    check(read(fwd, "h"), want["h"], "h")
    bwd = tmp_path / "bwd"
    bwd.mkdir()
    write_params(bwd, {**base, "pass": 1, "want_grad_initial": 0})
    for name in ("a", "grad_h", "grad_final"):
        write(bwd, name, _np(x[name]))
    write(bwd, "hidden", read(fwd, "h"))
    run(emulators[True], bwd, timeout=60)
    check(read(bwd, "grad_x"), want["grad_x"], "grad_x")
