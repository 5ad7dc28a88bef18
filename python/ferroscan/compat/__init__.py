r"""Drop-in stand-ins for other first-order scan packages, built on :func:`ferroscan.scan`.

Each module mirrors a peer package's public names, signatures and return
conventions for the recurrence :math:`h_t = a_t h_{t-1} + b_t` (time on the last
axis, :math:`h_{-1} = 0`), while lifting the peer's restrictions (power-of-two or
bounded lengths, contiguity, fixed rank, dtype and CUDA-only limits):

* :mod:`ferroscan.compat.accelerated_scan`: for ``accelerated-scan``
  (``accelerated_scan.warp`` / ``.scalar`` / ``.triton``): ``scan(gates, tokens)``,
  ``scan_forward(gates, tokens, reverse=False)``, and the namespaces ``warp``,
  ``scalar`` and ``triton``.
* :mod:`ferroscan.compat.fpscan`: for ``fpscan``: ``pscan(gates, tokens)``,
  ``scan_forward(gates, tokens, reverse=False, out=None)`` and the autograd
  function ``PScan``.

The submodules are imported lazily, on first attribute access or explicit import;
they need nothing beyond :mod:`torch` and :mod:`ferroscan`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["accelerated_scan", "fpscan"]


def __getattr__(name: str) -> ModuleType:
    """Import ``ferroscan.compat.<name>`` on first access."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the lazily importable submodules along with the module's globals."""
    return sorted(set(globals()) | set(__all__))
