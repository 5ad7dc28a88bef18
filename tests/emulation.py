"""What the CUDA-emulation tests share: splicing a kernel source with the host shim and a harness,
building it with g++, and exchanging float64 tensors and parameters with the harness binary
(``tests/cuda_emulation/harness_io.h`` is the C++ side)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "crates" / "ferroscan" / "kernels"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
GXX = shutil.which("g++")


def source(kernel: str, defines: dict[str, object], harness: str) -> str:
    """``kernels/<kernel>`` with ``common.cuh`` spliced in (as the NVRTC loader does), preceded by
    the host shim and ``#define``s, followed by ``cuda_emulation/<harness>``."""
    common = (KERNELS / "common.cuh").read_text().replace("#pragma once", "")
    text = (KERNELS / kernel).read_text().replace('#include "common.cuh"', common)
    prefix = f'#include "{EMULATION / "cuda_host_shim.h"}"\n'
    prefix += "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return prefix + text + (EMULATION / harness).read_text()


def build(folder: Path, name: str, text: str) -> Path:
    """Compiles ``text`` with g++ into ``folder`` (the name carries a hash of the text)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    cpp, exe = folder / f"{name}_{digest}.cpp", folder / f"{name}_{digest}"
    cpp.write_text(text)
    # A misaligned vector access works on x86 but faults on a GPU: the sanitizer makes it fail here.
    checks = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
    subprocess.run([GXX, "-std=c++20", "-O1", "-w", *checks, "-I", str(EMULATION), "-o", exe, cpp], check=True)
    return exe


def write_params(folder: Path, params: dict[str, int]) -> None:
    (folder / "params.txt").write_text("".join(f"{k} {v}\n" for k, v in params.items()))


def write(folder: Path, name: str, values: Optional[np.ndarray]) -> None:
    """Writes ``values`` (absent: no file, which the harness reads as an absent tensor)."""
    if values is not None:
        np.ascontiguousarray(values, dtype=np.float64).tofile(folder / f"{name}.bin")


def read(folder: Path, name: str) -> np.ndarray:
    return np.fromfile(folder / f"{name}.bin", dtype=np.float64)


def run(exe: Path, folder: Path, timeout: float = 600) -> None:
    """Runs the harness on ``folder``; a run past ``timeout`` seconds (a hang) raises."""
    subprocess.run([str(exe), str(folder)], check=True, timeout=timeout)


def assert_close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-10) -> None:
    """``got`` equals ``want`` up to float64 rounding, relative to ``want``'s largest magnitude."""
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-300)
    err = np.abs(got - want)
    assert np.all(err <= rtol * scale + rtol * np.abs(want)), (
        f"{what}: max |err| {err.max():.3g} (scale {scale:.3g}) at {int(err.argmax())}"
    )
