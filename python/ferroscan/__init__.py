"""ferroscan: fast, differentiable linear recurrences ("parallel scans") for PyTorch.

Operations:
    scan(gates, tokens, *, dim=-1, reverse=False, initial=None, return_final=False)
        h[t] = gates[t] * h[t-1] + tokens[t]
    gated_scan(x, a, b=None, c=None, *, dim=1, reverse=False, initial=None, return_final=False, out_dtype=None)
        h[t] = a[t] * h[t-1] + b[t] * x[t],  y[t] = c[t] * h[t]
    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None)
        Mamba's S6: h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t],  y[t] = C[t] h[t] + D u[t]

Context parallelism (the time axis sharded over the ranks of a torch.distributed group):
    ferroscan.distributed.scan / gated_scan / selective_scan

CUDA tensors run on ferroscan's CUDA kernels (compiled at first use by NVRTC, then cached);
CPU tensors and NumPy arrays on its multithreaded CPU backend.
"""

from . import _native, distributed, nn
from .ops.gated_scan import gated_scan
from .ops.scan import scan
from .ops.selective_scan import selective_scan

__version__ = _native.__version__
__all__ = ["scan", "gated_scan", "selective_scan", "distributed", "nn", "__version__"]
