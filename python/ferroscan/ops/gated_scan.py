r"""Gated linear scan (the recurrence of gated SSM layers).

.. math::

    h_t = a_t \, h_{t-1} + b_t \, x_t, \qquad y_t = c_t \, h_t, \qquad h_{-1} = h_0

Status: this is the unfused implementation — :func:`ferroscan.scan` on :math:`b \odot x`
followed by :math:`c \odot h`, differentiated by autograd — correct on every device, dtype, layout
and option, but it materializes :math:`b \odot x` and :math:`h` (half types in float32). The fused
single-pass CUDA forward and the memory-lean fused backward are not written yet.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._checks import (
    DTYPE_NAMES,
    broadcast_to_like,
    check_has_time_axis,
    check_same_kind,
    check_state,
    check_tensor,
    normalize_dim,
)
from .scan import scan

Tensor = torch.Tensor


def _checked(value: Optional[Tensor], arg: str, x: Tensor) -> Tensor:
    """A gate tensor of ``x``'s dtype and device (TypeError naming ``arg`` otherwise)."""
    if value is None:
        raise TypeError(f"{arg} must be a tensor, got None")
    check_tensor(value, arg)
    check_same_kind(x, "x", value, arg)
    return value


def gated_scan(
    x: Tensor,
    a: Tensor,
    b: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    *,
    dim: int = 1,
    reverse: bool = False,
    initial: Optional[Tensor] = None,
    return_final: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Gated first-order recurrence along axis ``dim`` (default ``(B, L, D)``, ``dim=1``).

    .. math::

        h_t = a_t h_{t-1} + b_t x_t, \qquad y_t = c_t h_t

    (``reverse=True``: :math:`h_t = a_t h_{t+1} + b_t x_t`). ``b`` and ``c`` default to 1.

    Args:
        x: inputs, any rank >= 1, float16 / bfloat16 / float32 / float64, CPU or CUDA.
        a: gates, the shape of ``x`` (or broadcastable to it).
        b: input gates, like ``a``; None means 1.
        c: output gates, like ``a``; None means 1.
        dim: the time axis.
        reverse: scan from the last step to the first.
        initial: :math:`h_0`, shaped like ``x`` without ``dim``; differentiable.
        return_final: also return the last state :math:`h` (not multiplied by ``c``).
        out_dtype: dtype of ``y`` (default: ``x``'s). Half inputs are computed in float32.

    Returns:
        ``y``, or ``(y, h_final)`` with ``return_final``.
    """
    check_tensor(x, "x")
    check_has_time_axis(x, "x")
    gates = broadcast_to_like(_checked(a, "a", x), "a", x, "x")
    in_gates = None if b is None else broadcast_to_like(_checked(b, "b", x), "b", x, "x")
    out_gates = None if c is None else broadcast_to_like(_checked(c, "c", x), "c", x, "x")
    if out_dtype is not None and out_dtype not in DTYPE_NAMES:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64, got {out_dtype}")
    dim = normalize_dim(dim, x.dim())
    state_shape = [s for d, s in enumerate(x.shape) if d != dim]
    initial = check_state(initial, "initial", state_shape, x, "x")
    # Half types are storage only: the products and the scan run in float32.
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    tokens = x.to(work) if in_gates is None else x.to(work) * in_gates.to(work)
    h0 = None if initial is None else initial.to(work)
    out = scan(gates.to(work), tokens, dim=dim, reverse=reverse, initial=h0, return_final=return_final)
    hidden, final = out if return_final else (out, None)
    y = hidden if out_gates is None else hidden * out_gates.to(work)
    y = y.to(out_dtype or x.dtype)
    if return_final:
        return y, final.to(x.dtype)
    return y
