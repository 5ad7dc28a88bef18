r"""Drop-in replacement for the ``accelerated-scan`` package, built on :func:`ferroscan.scan`.

``accelerated-scan`` (PyPI ``accelerated-scan``, module ``accelerated_scan``) solves
the first-order linear recurrence along the last axis of ``(B, C, T)`` tensors

.. math::

    x_t = a_t \, x_{t-1} + b_t, \qquad x_{-1} = 0,

with ``a`` called ``gates`` (``forget`` in its Triton module) and ``b`` called
``tokens`` (``inputs``).  Its public entry points are

* ``accelerated_scan.warp.scan(gates, tokens)``: differentiable, returns ``x``;
* ``accelerated_scan.warp.scan_forward(gates, tokens, reverse=False)``: forward only,
  allocates and returns a new tensor (it takes no ``out`` argument);
* ``accelerated_scan.scalar.scan(forget, inputs)`` (named ``accelerated_scan.triton``
  before version 0.2): differentiable, the same recurrence.

This module provides :func:`scan` and :func:`scan_forward` at module level with the
``warp`` signatures and return conventions, plus the namespaces :data:`warp`,
:data:`scalar` and :data:`triton` so that ``warp.scan(...)``/``scalar.scan(...)``
calls (keyword names included) keep working.  Every function here calls
:func:`ferroscan.scan` along ``dim=-1`` and lifts the peer's restrictions:

* ``T`` may be any length (the warp kernel needs a power of two between 32 and
  65536; the Triton kernel needs no power of two, but still ``(B, C, T)``);
* inputs may have any strides (the peer asserts contiguity);
* inputs may have any number of leading axes, ``(..., T)``, not only ``(B, C, T)``;
* float64 is accepted as well as float32, float16 and bfloat16, and gates and
  tokens may differ in dtype (they are computed in the promoted dtype; the result
  has the dtype of ``tokens``, as the peer's ``zeros_like(tokens)`` output does);
* CPU tensors work as well as CUDA tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import ferroscan

from ._common import prepare

__all__ = ["scan", "scan_forward", "warp", "scalar", "triton"]


def scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    r"""Differentiable first-order scan along the last axis.

    Computes, for every index of the leading axes,

    .. math::

        x_t = a_t \, x_{t-1} + b_t \quad (t = 0, \dots, T-1), \qquad x_{-1} = 0,

    where ``a = gates`` and ``b = tokens``.  Gradients flow to both inputs:
    with :math:`g_t = \partial L / \partial x_t`, the token gradient is the reverse
    scan :math:`\beta_t = g_t + a_{t+1} \beta_{t+1}` (:math:`\beta_T = 0`) and the
    gate gradient is :math:`\beta_t \, x_{t-1}`.

    Same signature and result as ``accelerated_scan.warp.scan``, without its
    restrictions: ``T`` needs not be a power of two nor lie in ``[32, 65536]``,
    inputs need not be contiguous nor 3-D (any ``(..., T)``), float64 and CPU
    tensors are accepted, and mixed input dtypes are promoted.

    Args:
        gates: ``a``, shape ``(..., T)`` (typically ``(B, C, T)``).
        tokens: ``b``, same shape as ``gates``.

    Returns:
        ``x``, same shape as ``tokens`` and of the dtype of ``tokens``.
    """
    gates, tokens, out_dtype = prepare(gates, tokens)
    states = ferroscan.scan(gates, tokens, dim=-1)
    return states.to(out_dtype)


def scan_forward(gates: torch.Tensor, tokens: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    r"""Forward-only first-order scan along the last axis (no autograd graph).

    With ``a = gates`` and ``b = tokens``, computes

    .. math::

        x_t = a_t \, x_{t-1} + b_t, \quad x_{-1} = 0 \qquad (\text{reverse=False}),

        x_t = a_t \, x_{t+1} + b_t, \quad x_T = 0 \qquad (\text{reverse=True}).

    Same signature and result as ``accelerated_scan.warp.scan_forward``: a new
    tensor is returned (there is no ``out`` argument) and it never requires grad.
    Lifted restrictions: any length ``T`` (not only powers of two in
    ``[32, 65536]``), any strides, any ``(..., T)`` shape, float64, CPU tensors,
    and gates/tokens of different dtypes.

    Args:
        gates: ``a``, shape ``(..., T)``.
        tokens: ``b``, same shape as ``gates``.
        reverse: scan from the end of the sequence towards its start.

    Returns:
        ``x``, same shape as ``tokens`` and of the dtype of ``tokens``.
    """
    with torch.no_grad():
        gates, tokens, out_dtype = prepare(gates, tokens)
        states = ferroscan.scan(gates, tokens, dim=-1, reverse=reverse)
        return states.to(out_dtype)


def _scalar_scan(forget: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    r"""Differentiable scan with ``accelerated_scan.scalar.scan``'s argument names.

    Computes :math:`x_t = f_t \, x_{t-1} + i_t` with :math:`x_{-1} = 0` along the
    last axis, where ``f = forget`` and ``i = inputs``; see :func:`scan`.  The
    peer's contiguity and ``(B, C, T)`` requirements are lifted, as are its dtype
    and device limits.
    """
    return scan(forget, inputs)


_scalar_scan.__name__ = _scalar_scan.__qualname__ = "scan"

#: Stand-in for ``accelerated_scan.warp``: ``warp.scan(gates, tokens)`` and
#: ``warp.scan_forward(gates, tokens, reverse=False)``.
warp = SimpleNamespace(scan=scan, scan_forward=scan_forward)

#: Stand-in for ``accelerated_scan.scalar``: ``scalar.scan(forget, inputs)``.
scalar = SimpleNamespace(scan=_scalar_scan)

#: Stand-in for ``accelerated_scan.triton`` (the pre-0.2 name of ``scalar``).
triton = scalar
