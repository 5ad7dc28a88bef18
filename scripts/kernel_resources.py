"""Registers, spills and shared memory of every kernel of a source, as ptxas reports them.

Compiles with NVRTC (no GPU needed) the way ``src/cuda/compile.rs`` does, adding
``--ptxas-options=-v``; for tuning occupancy without a device run.

    .venv/bin/python scripts/kernel_resources.py selective_scan.cu --dtype float32 \
        [--define FS_SEL_COMPLEX=0 --define FS_SEL_PASS=0] [--arch 90] [--filter fwd] [--sass out.sass]

``--sass`` also writes the disassembly, for counting the instructions of a hot loop (needs
``pip install nvidia-cuda-nvdisasm``).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "crates" / "ferroscan" / "kernels"
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}  # FS_DTYPE, common.cuh


# Where NVIDIA's PyPI wheels (nvidia-cuda-nvrtc, nvidia-cuda-nvdisasm) put their files.
NVIDIA_WHEELS = Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "nvidia" / "*"


def load_nvrtc() -> ctypes.CDLL:
    found = glob.glob(str(NVIDIA_WHEELS / "lib" / "libnvrtc.so.*"))
    if not found:
        sys.exit("libnvrtc not found: pip install nvidia-cuda-nvrtc==13.0.88")
    lib = Path(sorted(found)[0])
    for builtins in lib.parent.glob("libnvrtc-builtins.so*"):  # NVRTC opens it by name later
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(lib))


def compile_log(text: str, options: list[str], cubin_path: Path | None = None) -> str:
    nvrtc = load_nvrtc()
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"kernel.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if status:
        sys.exit(log.value.decode())
    if cubin_path is not None:
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        cubin_path.write_bytes(cubin.raw)
    return log.value.decode()


def write_sass(cubin: Path, out: Path) -> None:
    """Disassembles ``cubin`` into ``out`` with nvdisasm (PyPI ``nvidia-cuda-nvdisasm``)."""
    found = glob.glob(
        str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "nvidia" / "*" / "bin" / "nvdisasm")
    )
    if not found:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    out.write_text(subprocess.run([found[0], "-c", str(cubin)], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="file name in crates/ferroscan/kernels")
    parser.add_argument("--dtype", choices=list(DTYPE_CODES), default="float32")
    parser.add_argument("--arch", default="90")
    parser.add_argument("--define", action="append", default=[], help="NAME=VALUE, prepended as #define")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--sass", type=Path, help="also write the disassembly (SASS) of every kernel here")
    args = parser.parse_args()
    common = (KERNELS / "common.cuh").read_text().replace("#pragma once", "")
    text = (KERNELS / args.source).read_text().replace('#include "common.cuh"', common)
    defines = "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in args.define)
    options = [
        f"--gpu-architecture=sm_{args.arch}",
        "--std=c++17",
        f"-DFS_DTYPE={DTYPE_CODES[args.dtype]}",
        "--ptxas-options=-v",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin" if args.sass else None
        log = compile_log(defines + text, options, cubin)
        if cubin is not None:
            write_sass(cubin, args.sass)
    kernel = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel and args.filter in kernel:
            spills = re.findall(r"(\d+) bytes spill (stores|loads)", log.split(kernel, 2)[-1])[:2]
            smem = re.search(r"(\d+) bytes smem", line)
            print(
                f"{kernel:40s} regs {m.group(1):>4}  smem {smem.group(1) if smem else 0:>6}  "
                f"spill {'/'.join(s[0] for s in spills) or '0/0'}"
            )


if __name__ == "__main__":
    main()
