r"""Drop-in replacement for the ``fpscan`` package, built on :func:`ferroscan.scan`.

``fpscan`` ("first-order parallel scan", PyPI ``fpscan``) solves the linear
recurrence along the last axis of ``(batch, dim, seqlen)`` tensors

.. math::

    y_t = a_t \, y_{t-1} + x_t, \qquad y_{-1} = 0,

with ``a`` called ``gates`` and ``x`` called ``tokens``.  Its public API is

* ``pscan(gates, tokens)``: differentiable, returns ``y`` (it is ``PScan.apply``);
* ``scan_forward(gates, tokens, reverse=False, out=None)``: forward only; writes the
  result into ``out`` when one is given (a new tensor like ``tokens`` otherwise) and
  returns that tensor;
* ``PScan``: the ``torch.autograd.Function``; ``PScan.apply(gates, tokens)``.

This module reproduces those names, signatures and conventions on top of
:func:`ferroscan.scan` (``dim=-1``), without the peer's restrictions:

* ``seqlen`` may be any length (the peer needs a power of two between 32 and 65536);
* inputs (and ``out``) may have any strides (the peer needs contiguous tensors);
* inputs may have any number of leading axes, ``(..., seqlen)``;
* float64 is accepted as well as float32, float16 and bfloat16, and gates and
  tokens may differ in dtype (computed in the promoted dtype; results have the
  dtype of ``tokens``);
* CPU tensors work as well as CUDA tensors.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import ferroscan

from ..ops._dispatch import once_differentiable_fast
from ._common import prepare

__all__ = ["pscan", "scan_forward", "PScan"]


def scan_forward(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    reverse: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Forward-only first-order scan along the last axis (no autograd graph).

    With ``a = gates`` and ``x = tokens``, computes

    .. math::

        y_t = a_t \, y_{t-1} + x_t, \quad y_{-1} = 0 \qquad (\text{reverse=False}),

        y_t = a_t \, y_{t+1} + x_t, \quad y_T = 0 \qquad (\text{reverse=True}).

    Same signature and conventions as ``fpscan.scan_forward``: when ``out`` is
    given, the result is written into it in place and ``out`` itself is returned;
    otherwise a new tensor with the shape and dtype of ``tokens`` is returned.
    The result never requires grad.

    Lifted restrictions: any ``seqlen`` (not only powers of two in
    ``[32, 65536]``), any strides for the inputs and for ``out``, any
    ``(..., seqlen)`` shape, float64, CPU tensors, mixed gate/token dtypes.  The
    scan is computed before anything is written, so ``out`` may alias ``gates`` or
    ``tokens`` (an in-place scan).  ``out`` must have the shape of ``tokens``; its
    dtype and device may differ (the result is converted as by ``Tensor.copy_``).

    Args:
        gates: ``a``, shape ``(..., seqlen)``.
        tokens: ``x``, same shape as ``gates``.
        reverse: scan from the end of the sequence towards its start.
        out: optional destination tensor, same shape as ``tokens``.

    Returns:
        ``out`` when given, else a new tensor holding ``y``.
    """
    with torch.no_grad():
        gates, tokens, out_dtype = prepare(gates, tokens)
        if out is not None and out.shape != tokens.shape:
            raise ValueError(
                f"out must have the shape of tokens {tuple(tokens.shape)}, got {tuple(out.shape)}"
            )
        result = ferroscan.scan(gates, tokens, dim=-1, reverse=reverse)
        if out is None:
            return result.to(out_dtype)
        out.copy_(result)
    return out


class PScan(torch.autograd.Function):
    r"""Autograd function of the first-order scan along the last axis.

    ``PScan.apply(gates, tokens)`` returns :math:`y` with
    :math:`y_t = a_t y_{t-1} + x_t`, :math:`y_{-1} = 0` (``a = gates``,
    ``x = tokens``), exactly like ``fpscan.PScan.apply``.  The backward pass is a
    padded reverse scan: with :math:`g_t = \partial L / \partial y_t`,

    .. math::

        \frac{\partial L}{\partial x_t} = \beta_t, \quad
        \beta_t = a_{t+1} \beta_{t+1} + g_t, \quad \beta_T = 0;
        \qquad
        \frac{\partial L}{\partial a_t} = \beta_t \, y_{t-1}, \quad y_{-1} = 0.

    Both passes run :func:`ferroscan.scan`, so none of the peer's length,
    contiguity, rank, dtype or device restrictions apply.  Only first derivatives
    are provided (a second backward raises rather than returning wrong values).
    """

    @staticmethod
    def forward(ctx: Any, gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Compute ``y`` and save ``(gates, y)`` for the backward pass."""
        gates_dtype = gates.dtype if isinstance(gates, torch.Tensor) else None
        gates, tokens, out_dtype = prepare(gates, tokens)
        ctx.input_dtypes = (gates_dtype, out_dtype)
        states = ferroscan.scan(gates, tokens, dim=-1)
        ctx.save_for_backward(gates, states)
        return states.to(out_dtype)

    @staticmethod
    @once_differentiable_fast
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Return ``(dL/d gates, dL/d tokens)`` from ``dL/dy`` by a reverse scan."""
        gates, states = ctx.saved_tensors
        gates_dtype, tokens_dtype = ctx.input_dtypes
        need_gates, need_tokens = ctx.needs_input_grad[:2]
        if not (need_gates or need_tokens):
            return None, None

        # beta_t = a_{t+1} beta_{t+1} + g_t: a reverse scan whose gates are shifted
        # one step towards the start; the last gate multiplies beta_T = 0, so its
        # value is irrelevant (1 is used, as the peer does).
        shifted_gates = torch.ones_like(gates)
        shifted_gates[..., :-1] = gates[..., 1:]
        grad_output = grad_output.to(states.dtype)
        grad_tokens = ferroscan.scan(shifted_gates, grad_output, dim=-1, reverse=True)

        grad_gates = None
        if need_gates:
            previous = torch.zeros_like(states)
            previous[..., 1:] = states[..., :-1]
            grad_gates = (previous * grad_tokens).to(gates_dtype)
        return grad_gates, (grad_tokens.to(tokens_dtype) if need_tokens else None)


def pscan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    r"""Differentiable first-order scan along the last axis: ``PScan.apply(gates, tokens)``.

    Returns :math:`y` with :math:`y_t = a_t y_{t-1} + x_t` and :math:`y_{-1} = 0`,
    where ``a = gates`` and ``x = tokens`` have shape ``(..., seqlen)`` (``fpscan``
    itself needs contiguous ``(batch, dim, seqlen)`` CUDA tensors with a
    power-of-two ``seqlen`` in ``[32, 65536]``; none of that is required here).
    The result has the shape and dtype of ``tokens``.
    """
    return PScan.apply(gates, tokens)
