r"""Drop-in stand-ins for other scan packages, built on :func:`ferroscan.scan`
(and :func:`ferroscan.gated_scan`, :func:`ferroscan.selective_scan`).

Each module mirrors a peer package's public names, signatures and return
conventions (for the first-order packages, the recurrence :math:`h_t = a_t h_{t-1} + b_t`
with time on the last axis and :math:`h_{-1} = 0`), while lifting the peer's restrictions
(power-of-two or bounded lengths, contiguity, fixed rank, dtype and CUDA-only limits):

* :mod:`ferroscan.compat.accelerated_scan`: for ``accelerated-scan``
  (``accelerated_scan.warp`` / ``.scalar`` / ``.triton``): ``scan(gates, tokens)``,
  ``scan_forward(gates, tokens, reverse=False)``, and the namespaces ``warp``,
  ``scalar`` and ``triton``.
* :mod:`ferroscan.compat.fpscan`: for ``fpscan``: ``pscan(gates, tokens)``,
  ``scan_forward(gates, tokens, reverse=False, out=None)`` and the autograd
  function ``PScan``.
* :mod:`ferroscan.compat.quick_ssm`: for ``quick_ssm``: the gated variant
  ``scan(x, a, b, c, *, block_l=256, checkpoint=True, tile_b=None, tile_d=None,
  backend="auto", out_dtype=None)`` (:math:`h_t = a_t h_{t-1} + b_t x_t`,
  :math:`y_t = c_t h_t`, ``(B, L, D)`` with time on axis 1), built on
  :func:`ferroscan.gated_scan`.
* :mod:`ferroscan.compat.mamba`: for ``mamba_ssm.ops.selective_scan_interface``:
  ``selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
  delta_softplus=False, return_last_state=False, cu_seqlens=None)`` (Mamba's selective scan,
  on :func:`ferroscan.selective_scan`) and the plain-PyTorch ``selective_scan_ref``.

The submodules are imported lazily, on first attribute access or explicit import;
they need nothing beyond :mod:`torch` and :mod:`ferroscan`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["accelerated_scan", "fpscan", "mamba", "quick_ssm"]


def __getattr__(name: str) -> ModuleType:
    """Import ``ferroscan.compat.<name>`` on first access."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the lazily importable submodules along with the module's globals."""
    return sorted(set(globals()) | set(__all__))
