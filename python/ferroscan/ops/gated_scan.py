r"""Gated linear scan (the recurrence of gated SSM layers).

.. math::

    h_t = a_t \, h_{t-1} + b_t \, x_t, \qquad y_t = c_t \, h_t, \qquad h_{-1} = h_0

Gradients, with :math:`\lambda_t = \partial\mathcal{L}/\partial h_t` (total) and :math:`\bar y`
the incoming gradient of :math:`y`:

.. math::

    \lambda_t = c_t \bar y_t + a_{t+1} \lambda_{t+1}, \quad
    \lambda_{L-1} = c_{L-1} \bar y_{L-1} + \bar h_{\text{final}}, \qquad
    \bar x_t = \lambda_t b_t, \ \bar b_t = \lambda_t x_t, \ \bar a_t = \lambda_t h_{t-1}, \
    \bar c_t = \bar y_t h_t, \ \bar h_0 = a_0 \lambda_0 .

Two implementations, chosen per call:

* **fused** (CUDA, time axis not innermost in memory, e.g. the default ``(B, L, D)``, and ``y``
  in the input dtype): one kernel reads ``x, a, b, c`` and writes ``y``. With gradients it also
  stores the state entering every ``GATED_CHECKPOINT_SPACING`` steps (float32), and the backward
  is one kernel that recomputes :math:`h` from those checkpoints, reading ``x, a, b, c,`` and
  :math:`\bar y` and writing the four gradients: :math:`h` is never stored.
* **composed** (everything else: CPU, time-last CUDA layouts, another ``out_dtype``):
  :func:`ferroscan.scan` on :math:`b \odot x`, then :math:`c \odot h`, differentiated by autograd
  (half types in float32). Correct everywhere, but it materializes :math:`b \odot x` and :math:`h`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from .. import _backend, _native
from .._checks import (
    DTYPE_NAMES,
    broadcast_to_like,
    check_has_time_axis,
    check_same_kind,
    check_state,
    check_tensor,
    normalize_dim,
)
from ._dispatch import needs_custom_op
from ._layout import ScanLayout
from .scan import scan

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Fused CUDA custom ops on C-contiguous (outer, len, inner) tensors; states are (outer, inner).
# Absent optional outputs are returned as empty tensors (custom ops return no None).
# ---------------------------------------------------------------------------------------------


def _checkpoint_shape(x: Tensor) -> tuple[int, int]:
    outer, length, inner = x.shape
    spacing = _native.GATED_CHECKPOINT_SPACING
    return (length + spacing - 1) // spacing, outer * inner


def _checkpoint_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fused_forward_impl(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Runs the fused forward kernel: returns ``(y, h_final, checkpoints)``."""
    y = torch.empty_like(x)
    final = x.new_empty((x.shape[0], x.shape[2]))
    shape = (x.shape[0], x.shape[1], x.shape[2])
    if save_checkpoints:
        checkpoints = torch.empty(_checkpoint_shape(x), dtype=_checkpoint_dtype(x), device=x.device)
    else:
        checkpoints = x.new_empty(0, dtype=_checkpoint_dtype(x))
    p = _backend.address
    _native.cuda_gated_scan_forward(
        x.device.index, _backend.cuda_stream(x), _backend.dtype_name(x), shape, reverse,
        p(x), p(a), p(b), p(c), p(initial), p(y), p(final), p(checkpoints) if save_checkpoints else 0,
    )  # fmt: skip
    return y, final, checkpoints


@torch.library.custom_op("ferroscan::gated_scan_fwd", mutates_args=())
def _gated_fwd(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _fused_forward_impl(x, a, b, c, initial, reverse, save_checkpoints)


@_gated_fwd.register_fake
def _gated_fwd_fake(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    shape = _checkpoint_shape(x) if save_checkpoints else (0,)
    checkpoints = x.new_empty(shape, dtype=_checkpoint_dtype(x))
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2])), checkpoints


def _fused_backward_impl(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], checkpoints: Tensor,
    grad_y: Tensor, grad_final: Optional[Tensor], reverse: bool, want_initial: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Runs the recomputing backward kernel: ``(dx, da, db, dc, dh0)`` (empty when not wanted)."""
    grad_x, grad_a = torch.empty_like(x), torch.empty_like(x)
    grad_b = torch.empty_like(x) if b is not None else x.new_empty(0)
    grad_c = torch.empty_like(x) if c is not None else x.new_empty(0)
    grad_initial = x.new_empty((x.shape[0], x.shape[2])) if want_initial else x.new_empty(0)
    shape = (x.shape[0], x.shape[1], x.shape[2])
    p = _backend.address
    _native.cuda_gated_scan_backward(
        x.device.index, _backend.cuda_stream(x), _backend.dtype_name(x), shape, reverse,
        p(x), p(a), p(b), p(c), p(checkpoints), p(grad_y), p(grad_final),
        p(grad_x), p(grad_a), p(grad_b) if b is not None else 0, p(grad_c) if c is not None else 0,
        p(grad_initial) if want_initial else 0,
    )  # fmt: skip
    return grad_x, grad_a, grad_b, grad_c, grad_initial


@torch.library.custom_op("ferroscan::gated_scan_bwd", mutates_args=())
def _gated_bwd(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], checkpoints: Tensor,
    grad_y: Tensor, grad_final: Optional[Tensor], reverse: bool, want_initial: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _fused_backward_impl(x, a, b, c, checkpoints, grad_y, grad_final, reverse, want_initial)


@_gated_bwd.register_fake
def _gated_bwd_fake(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], checkpoints: Tensor,
    grad_y: Tensor, grad_final: Optional[Tensor], reverse: bool, want_initial: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    like = torch.empty_like
    return (
        like(x), like(x), like(x) if b is not None else x.new_empty(0), like(x) if c is not None else x.new_empty(0),
        x.new_empty((x.shape[0], x.shape[2])) if want_initial else x.new_empty(0),
    )  # fmt: skip


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, a, b, c, initial, reverse, _save = inputs
    _y, _final, checkpoints = output
    ctx.save_for_backward(x, a, b, c, checkpoints)
    ctx.reverse = reverse
    ctx.want_initial = initial is not None
    ctx.set_materialize_grads(False)


def _gradients(ctx: torch.autograd.function.FunctionCtx, grad_y: Optional[Tensor],
               grad_final: Optional[Tensor], backward_op: object) -> tuple:  # fmt: skip
    x, a, b, c, checkpoints = ctx.saved_tensors
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    grad_final = None if grad_final is None else grad_final.contiguous()
    gx, ga, gb, gc, gh0 = backward_op(x, a, b, c, checkpoints, grad_y, grad_final, ctx.reverse, ctx.want_initial)
    return (
        gx, ga, gb if b is not None else None, gc if c is not None else None,
        gh0 if ctx.want_initial else None, None, None,
    )  # fmt: skip


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Optional[Tensor], grad_final: Optional[Tensor],
              _grad_checkpoints: Optional[Tensor]) -> tuple:  # fmt: skip
    return _gradients(ctx, grad_y, grad_final, _gated_bwd)


_gated_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGated(torch.autograd.Function):
    """The custom ops' forward and backward for plain eager mode, without the dispatcher's cost."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, a: Tensor, b: Optional[Tensor],
                c: Optional[Tensor], initial: Optional[Tensor], reverse: bool,
                save_checkpoints: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        out = _fused_forward_impl(x, a, b, c, initial, reverse, save_checkpoints)
        _setup_context(ctx, (x, a, b, c, initial, reverse, save_checkpoints), out)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Optional[Tensor], grad_final: Optional[Tensor],
                 _grad_checkpoints: Optional[Tensor]) -> tuple:  # fmt: skip
        return _gradients(ctx, grad_y, grad_final, _fused_backward_impl)


def _run_fused(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor], reverse: bool
) -> tuple[Tensor, Tensor]:
    """``(y, h_final)`` by the fused kernels: the custom op when tracing, else the eager path."""
    tensors = [t for t in (x, a, b, c, initial) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_custom_op(tensors):
        y, final, _ = torch.ops.ferroscan.gated_scan_fwd(x, a, b, c, initial, reverse, needs_grad)
    elif needs_grad:
        y, final, _ = _EagerGated.apply(x, a, b, c, initial, reverse, True)
    else:
        y, final, _ = _fused_forward_impl(x, a, b, c, initial, reverse, False)
    return y, final


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


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
    layout = ScanLayout(x, dim, *(t for t in (gates, in_gates, out_gates) if t is not None))
    if x.is_cuda and layout.shape3[2] > 1 and out_dtype in (None, x.dtype):
        flat = layout.flatten
        y, final = _run_fused(
            flat(x), flat(gates), None if in_gates is None else flat(in_gates),
            None if out_gates is None else flat(out_gates), layout.flatten_state(initial), reverse,
        )  # fmt: skip
        y = layout.restore(y)
        return (y, layout.restore_state(final)) if return_final else y
    return _composed(x, gates, in_gates, out_gates, dim, reverse, initial, return_final, out_dtype)


def _composed(
    x: Tensor, gates: Tensor, in_gates: Optional[Tensor], out_gates: Optional[Tensor], dim: int, reverse: bool,
    initial: Optional[Tensor], return_final: bool, out_dtype: Optional[torch.dtype],
) -> Union[Tensor, tuple[Tensor, Tensor]]:  # fmt: skip
    """The composed implementation: :func:`scan` on :math:`b x`, then :math:`c h` (see module docs)."""
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
