r"""The CUDA selective-scan kernels, run on the CPU under a host emulation of CUDA, against
ferroscan's CPU backend (itself checked against the float64 reference in test_selective_scan).

``tests/cuda_emulation/cuda_host_shim.h`` turns each CUDA thread of a block into a fiber:
``__shared__`` memory, ``__syncthreads()`` and the warp shuffles behave as on a GPU for code
free of data races; threads are scheduled in alternating ascending and descending order, so a
missing barrier shows up as stale shared memory, and a barrier or full-warp shuffle that not every
thread reaches aborts as a deadlock. ``kernels/selective_scan.cu`` is compiled with it by g++ in
float64 (the same source the GPU runs, minus the float32 ``ex2.approx`` and half conversions),
with a shared-memory budget
of 96 KiB so that the float64 kernels use the same plans (chunk and window lengths) as the float32
ones do within 48 KiB. ``selective_harness.cpp`` launches the passes the way
``src/cuda/selective_scan.rs`` does, for explicit configurations (lanes x states per channel,
channels per tile), including over-provisioned lanes, partial tiles and idle threads.

This checks the kernels' indexing, staging, reductions, synchronization and the backward's
recomputation without a GPU. It does not check timing, the float32 fast exp2, or the launcher's
Rust code (whose planning functions have unit tests); the ``cuda`` tests do that on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from emulation import GXX, assert_close, build, read, source
from emulation import run as run_harness
from ferroscan.ops import selective_scan as ops

THREADS = 128  # FS_SEL_THREADS

pytestmark = pytest.mark.skipif(GXX is None, reason="the CUDA host emulation needs g++ (C++20)")


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[bool, bool], Path]:
    """The four harness binaries (real/complex x forward/backward), built once per session."""
    out = tmp_path_factory.mktemp("cuda_emulation")
    binaries = {}
    for complex_ in (False, True):
        for backward in (False, True):
            # A shared-memory budget of 96 KiB gives float64 the plans float32 gets in 48 KiB.
            defines = {"FS_DTYPE": 3, "FS_SEL_SMEM": "(96 * 1024)", "FS_SEL_COMPLEX": int(complex_),
                       "FS_SEL_PASS": int(backward)}  # fmt: skip
            text = source("selective_scan.cu", defines, "selective_harness.cpp")
            name = f"selective_{'c' if complex_ else 'r'}{'b' if backward else 'f'}"
            binaries[(complex_, backward)] = build(out, name, text)
    return binaries


@dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 8
    length: int = 37
    dstate: int = 16
    complex_: bool = False
    b_groups: int = 0  # 0: constant B
    c_groups: int = 0
    has_d: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    initial: bool = True
    grad_last: bool = True
    channels_last: bool = False  # u, delta, z, dout as transposed (batch, L, dim) storage
    delta_dim_major: bool = False  # delta stored (dim, batch, L), as Mamba's rearranged dt_proj output
    b_time_major: bool = False  # a variable B stored as (batch, G, L·parts, N)
    lanes: Optional[int] = None  # P; default: the launcher's choice
    states: Optional[int] = None
    ct: Optional[int] = None  # channels per tile; default: the launcher's choice
    chunks: int = 1  # backward time chunks (``BackwardPlan``; the launcher cuts few, long rows)
    carry_split: int = 1  # selective_carry's pieces per chunk (a divisor of the chunk's segments)


def plan(case: Case) -> tuple[int, int, int, int]:
    """``(P, S, ct, tiles)``: the launcher's plan (``SelectiveConfig``, ``TilePlan``) for a
    problem with many channels unless the case fixes them (with few channels the launcher spreads
    N <= 16 states over 8 lanes: the P8-S2 cases cover that kernel)."""
    n = case.dstate
    if n <= 128:
        lanes, states = max(4, 1 << max(0, math.ceil(n / 4) - 1).bit_length()), 4
    else:
        lanes, states = 32, 8
    lanes, states = case.lanes or lanes, case.states or states
    most = THREADS // lanes
    span = 0
    for g in (case.b_groups, case.c_groups):
        if g:
            span = math.gcd(span, case.dim // g)
    ct = case.ct or (most if span == 0 else max(r for r in range(1, min(most, span) + 1) if span % r == 0))
    return lanes, states, ct, -(-case.dim // ct)


def chunking(case: Case) -> dict[str, int]:
    """The backward's time chunks as ``BackwardPlan`` cuts them: whole 16-step segments, every
    chunk but the last of equal length, none empty."""
    segments = -(-case.length // 16)
    per_chunk = max(1, -(-segments // case.chunks))
    assert per_chunk % case.carry_split == 0, "a chunk ends on a carry piece's end"
    return {"chunks": max(1, -(-segments // per_chunk)), "chunk_cks": per_chunk, "carry_split": case.carry_split}


def _inputs(case: Case, seed: int) -> dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    batch, dim, length, n = case.batch, case.dim, case.length, case.dstate
    parts = 2 if case.complex_ else 1
    cdt = torch.complex128 if case.complex_ else f64

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=f64)

    def weights(*shape: int) -> torch.Tensor:
        return torch.complex(randn(*shape), randn(*shape)) if case.complex_ else randn(*shape)

    def seq() -> torch.Tensor:
        t = randn(batch, dim, length)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if case.channels_last else t

    def bc(groups: int) -> torch.Tensor:
        if not groups:
            return weights(dim, n)
        t = randn(batch, groups, n, length * parts)
        return t.transpose(2, 3).contiguous().transpose(2, 3) if case.b_time_major else t

    rand = torch.rand(dim, n, generator=gen, dtype=f64)
    A = torch.complex(-0.5 * rand - 0.05, 2 * torch.rand(dim, n, generator=gen, dtype=f64) - 1) if case.complex_ \
        else -0.5 * rand - 0.05  # fmt: skip
    delta = 0.5 * torch.rand(batch, dim, length, generator=gen, dtype=f64) + (0.0 if case.softplus else 0.05)
    if case.channels_last:
        delta = delta.transpose(1, 2).contiguous().transpose(1, 2)
    if case.delta_dim_major:  # other strides than u's: delta does not share u's vector cursor
        delta = delta.transpose(0, 1).contiguous().transpose(0, 1)
    return {
        "u": seq(),
        "delta": delta,
        "A": A,
        "B": bc(case.b_groups),
        "C": bc(case.c_groups),
        "D": randn(dim) if case.has_d else None,
        "z": seq() if case.has_z else None,
        "delta_bias": 0.5 * torch.rand(dim, generator=gen, dtype=f64) if case.has_bias else None,
        "initial": weights(batch, dim, n).to(cdt) if case.initial else None,
        "grad_out": seq(),
        "grad_last": weights(batch, dim, n).to(cdt) if case.grad_last else None,
    }


def _storage(t: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """The float64 memory of ``t`` (a permuted view of a dense tensor) and its strides in it."""
    if t.is_complex():
        t = torch.view_as_real(t.contiguous()).flatten()
        return t.numpy(), ()
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    dense = t.permute(order).contiguous()
    return dense.flatten().numpy(), tuple(t.stride())


def _write(folder: Path, name: str, t: Optional[torch.Tensor], params: dict, stride_key: str = "") -> None:
    if t is None:
        return
    data, strides = _storage(t)
    data.astype(np.float64).tofile(folder / f"{name}.bin")
    for k, s in enumerate(strides if stride_key else ()):
        params[f"{stride_key}_s{k}"] = s


def _flat(t: Optional[torch.Tensor]) -> np.ndarray:
    if t is None:
        return np.zeros(0)
    t = t.detach().contiguous()
    return (torch.view_as_real(t) if t.is_complex() else t).flatten().numpy()


def run(case: Case, emulators: dict, folder: Path, seed: int = 0) -> None:
    x = _inputs(case, seed)
    lanes, states, ct, tiles = plan(case)
    params = {
        "batch": case.batch, "dim": case.dim, "len": case.length, "dstate": case.dstate,
        "softplus": int(case.softplus), "P": lanes, "S": states, "ct": ct, "tiles": tiles,
        "b_groups": case.b_groups, "c_groups": case.c_groups, **chunking(case),
    }  # fmt: skip
    for name in ("u", "delta", "z", "grad_out"):
        _write(folder, "dout" if name == "grad_out" else name, x[name], params, "dout" if name == "grad_out" else name)
    for key in ("u_s", "delta_s", "z_s", "dout_s"):
        for k in range(3):
            params.setdefault(f"{key}{k}", 0)
    _write(folder, "A", x["A"], params)
    _write(folder, "D", x["D"], params)
    _write(folder, "bias", x["delta_bias"], params)
    _write(folder, "initial", x["initial"], params)
    _write(folder, "grad_last", x["grad_last"], params)
    for which, groups in (("b", case.b_groups), ("c", case.c_groups)):
        tensor = x[which.upper()]
        _write(folder, f"{which}_{'var' if groups else 'const'}", tensor, params, which if groups else "")
        for k in range(4):
            params.setdefault(f"{which}_s{k}", 0)
    (folder / "params.txt").write_text("".join(f"{k} {v}\n" for k, v in params.items()))

    # The CPU backend on the same inputs (4-d variable B/C, as the ops take them).
    B, C = x["B"], x["C"]
    out, last, ckpt = ops._forward_impl(x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"],
                                        x["initial"], case.softplus, True)  # fmt: skip
    run_harness(emulators[(case.complex_, False)], folder)
    assert_close(read(folder, "out"), _flat(out), "out")
    assert_close(read(folder, "last"), _flat(last), "last state")
    assert_close(read(folder, "ckpt_out"), _flat(ckpt), "checkpoints")

    read(folder, "ckpt_out").tofile(folder / "ckpt.bin")  # the backward reads the emulated forward's
    grads = ops._backward_impl(x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], x["initial"],
                               x["grad_out"], x["grad_last"], ckpt, case.softplus)  # fmt: skip
    run_harness(emulators[(case.complex_, True)], folder)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dinitial")
    present = (True, True, True, True, True, case.has_d, case.has_z, case.has_bias, case.initial)
    for name, want, there in zip(names, grads, present):
        if there:
            assert_close(read(folder, name), _flat(want), name)


CASES = {
    "real-N16-varB2-varC1": Case(b_groups=2, c_groups=1),
    "real-N16-constant-channels-last": Case(channels_last=True, length=40),
    "real-N16-variable-time-major-B": Case(b_groups=1, c_groups=1, b_time_major=True, has_z=False, softplus=False),
    "real-N5-padded-states": Case(dstate=5, b_groups=1, has_d=False, has_bias=False, initial=False),
    "real-N16-overprovisioned-P16": Case(lanes=16, b_groups=2, c_groups=2, length=21),
    "real-N40-groups-of-4": Case(dim=12, dstate=40, b_groups=3, c_groups=1, length=30),
    "real-N16-odd-partial-tile": Case(dim=7, ct=3, length=16, grad_last=False),
    "real-N200-P32-S8": Case(batch=1, dim=3, dstate=200, b_groups=1, length=20),
    "real-N100-P32-S4": Case(batch=1, dim=5, dstate=100, c_groups=1, length=19),
    "real-N16-P8-S2": Case(lanes=8, states=2, b_groups=2, c_groups=1, length=37),
    "real-N16-P8-S2-channels-last": Case(lanes=8, states=2, b_groups=1, c_groups=1, channels_last=True, length=50),
    "real-N12-P8-S2-constant": Case(dstate=12, lanes=8, states=2, length=23),
    "complex-N16-P8-S2": Case(complex_=True, lanes=8, states=2, b_groups=1, c_groups=1, length=21),
    "real-N16-full-tiles": Case(dim=32, length=150, b_groups=1, c_groups=1),  # whole tiles: 16-byte vectors
    "complex-N16-full-tiles": Case(complex_=True, dim=32, length=128, b_groups=1, c_groups=2),  # 16-byte vectors
    "real-N16-full-tiles-channels-last": Case(dim=32, length=130, b_groups=1, c_groups=2, channels_last=True),
    "real-N16-full-tiles-delta-dim-major": Case(dim=32, length=150, b_groups=1, c_groups=1, delta_dim_major=True),
    "real-L1": Case(length=1, b_groups=1, c_groups=1),
    "real-L0": Case(length=0, b_groups=1),
    "complex-N16-varB1-varC2": Case(complex_=True, b_groups=1, c_groups=2, length=35),
    "complex-N5-constant-channels-last": Case(complex_=True, dstate=5, channels_last=True, softplus=False, length=18),
    "complex-N64-P16": Case(complex_=True, batch=1, dim=4, dstate=64, b_groups=1, c_groups=1, length=17),
    "complex-N100-P32": Case(complex_=True, batch=1, dim=2, dstate=100, c_groups=1, length=9),
    # Backward in time chunks: phase-A records, composed adjoints, per-chunk parameter partials.
    "real-N16-time-chunks": Case(b_groups=2, c_groups=1, length=100, chunks=3),  # 7 segments: 3+3+1
    # 10 segments in chunks of 3 (3+3+3+1), phase A over pieces of one segment each.
    "real-N16-time-chunks-constant-BC": Case(dim=32, length=150, chunks=4, carry_split=3, grad_last=False),
    # 19 segments in chunks of 10, phase A over pieces of 5 (5+5+5+4: the last piece short).
    "real-N16-time-chunks-carry-pieces": Case(b_groups=1, c_groups=1, length=300, chunks=2, carry_split=2),
    "real-N16-time-chunks-P8-S2": Case(lanes=8, states=2, b_groups=1, c_groups=1, length=70, chunks=5),
    "real-N200-time-chunks": Case(batch=1, dim=3, dstate=200, b_groups=1, c_groups=1, length=40, chunks=2),
    "complex-N16-time-chunks": Case(complex_=True, b_groups=1, c_groups=2, length=67, chunks=2),
    "complex-N16-time-chunks-carry-pieces": Case(
        complex_=True, b_groups=1, c_groups=1, length=200, chunks=2, carry_split=7
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernels_match_cpu(emulators: dict, tmp_path: Path, name: str) -> None:
    run(CASES[name], emulators, tmp_path, seed=len(name))
