"""The bridge to the Rust core (``ferroscan._native``): addresses, streams and scratch buffers.

Everything here takes tensors that are already validated and C-contiguous."""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch

from . import _native
from ._checks import DTYPE_NAMES

# Lets the Rust core find NVRTC in this interpreter's site-packages (nvidia-cuda-nvrtc wheel).
os.environ.setdefault("FERROSCAN_PYTHON", sys.executable)


def address(t: Optional[torch.Tensor]) -> int:
    """The tensor's data address, or 0 for an absent optional."""
    return 0 if t is None else t.data_ptr()


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES[t.dtype]


def _current_stream_python(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


# The raw-handle query that torch.compile's generated code uses: no Stream object, no device
# normalization (about 10 us less per call on a slow host, which counts for short sequences).
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_python)


def cuda_stream(t: torch.Tensor) -> int:
    """PyTorch's current stream on the tensor's device: kernels queue behind the caller's work."""
    return _current_raw_stream(t.get_device())


@functools.lru_cache(maxsize=4096)
def _scratch_bytes(device_index: int, dtype: str, shape: tuple[int, int, int]) -> int:
    return _native.cuda_scan_scratch_bytes(device_index, dtype, shape)


def scratch_buffer(t: torch.Tensor, nbytes: int) -> tuple[Optional[torch.Tensor], int]:
    """``nbytes`` of scratch on ``t``'s device from PyTorch's caching allocator (whose blocks are
    512-byte aligned), or None when nothing is needed."""
    if nbytes == 0:
        return None, 0
    return torch.empty(nbytes, dtype=torch.uint8, device=t.device), nbytes


def cuda_scratch(t: torch.Tensor, shape: tuple[int, int, int]) -> tuple[Optional[torch.Tensor], int]:
    """A scratch buffer from PyTorch's caching allocator for a scan of ``shape`` (None if unneeded)."""
    return scratch_buffer(t, _scratch_bytes(t.device.index, dtype_name(t), shape))
