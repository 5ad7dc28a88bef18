"""ferroscan: fast, differentiable linear recurrences ("parallel scans") for PyTorch.

Operations:
    scan(gates, tokens, *, dim=-1, reverse=False, initial=None, return_final=False)
        h[t] = gates[t] * h[t-1] + tokens[t]

CUDA tensors run on ferroscan's CUDA kernels (compiled at first use by NVRTC, then cached);
CPU tensors and NumPy arrays on its multithreaded CPU backend.
"""

from . import _native
from .ops.scan import scan

__version__ = _native.__version__
__all__ = ["scan", "__version__"]
