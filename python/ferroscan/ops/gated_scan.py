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
from ._dispatch import needs_custom_op, once_differentiable_fast
from ._layout import ScanLayout, laid_out_like
from .scan import scan

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Fused CUDA custom ops on C-contiguous (outer, len, inner) tensors; states are (outer, inner).
# Absent optional outputs are returned as empty tensors (custom ops return no None).
# ---------------------------------------------------------------------------------------------


def _checkpoint_shape(shape: tuple[int, int, int]) -> tuple[int, int]:
    outer, length, inner = shape
    spacing = _native.GATED_CHECKPOINT_SPACING
    return (length + spacing - 1) // spacing, outer * inner


def _checkpoint_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shape3(x: Tensor) -> tuple[int, int, int]:
    return (x.shape[0], x.shape[1], x.shape[2])


def _fused_forward_impl(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool, shape: tuple[int, int, int], final: Optional[Tensor],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Runs the fused forward kernel: returns ``(y, checkpoints)``, ``y`` laid out like ``x``, and
    writes the final state into ``final`` when given.

    The inputs' storage (``initial``, ``final``: ``(outer, inner)``) is C-contiguous as
    ``shape = (outer, len, inner)``, whatever their logical shape (a permuted view qualifies)."""
    y = torch.empty_like(x)
    if save_checkpoints:
        checkpoints = torch.empty(_checkpoint_shape(shape), dtype=_checkpoint_dtype(x), device=x.device)
    else:
        checkpoints = x.new_empty(0, dtype=_checkpoint_dtype(x))
    p = _backend.address
    _native.cuda_gated_scan_forward(
        x.get_device(), _backend.cuda_stream(x), _backend.dtype_name(x), shape, reverse,
        p(x), p(a), p(b), p(c), p(initial), p(y), p(final), p(checkpoints) if save_checkpoints else 0,
    )  # fmt: skip
    return y, checkpoints


@torch.library.custom_op("ferroscan::gated_scan_fwd", mutates_args=())
def _gated_fwd(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    final = x.new_empty((x.shape[0], x.shape[2]))
    y, checkpoints = _fused_forward_impl(x, a, b, c, initial, reverse, save_checkpoints, _shape3(x), final)
    return y, final, checkpoints


@_gated_fwd.register_fake
def _gated_fwd_fake(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor],
    reverse: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    shape = _checkpoint_shape(_shape3(x)) if save_checkpoints else (0,)
    checkpoints = x.new_empty(shape, dtype=_checkpoint_dtype(x))
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2])), checkpoints


def _fused_backward_impl(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], checkpoints: Tensor,
    grad_y: Tensor, grad_final: Optional[Tensor], reverse: bool, shape: tuple[int, int, int],
    grad_initial: Optional[Tensor],
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """Runs the recomputing backward kernel: ``(dx, da, db, dc)`` laid out like ``x`` (``db``,
    ``dc``: None without ``b``, ``c``), and ``dh0`` into ``grad_initial`` when given. Storage
    rules as for :func:`_fused_forward_impl` (``grad_y`` is laid out like ``x``)."""
    grad_x, grad_a = torch.empty_like(x), torch.empty_like(x)
    grad_b = None if b is None else torch.empty_like(x)
    grad_c = None if c is None else torch.empty_like(x)
    p = _backend.address
    _native.cuda_gated_scan_backward(
        x.get_device(), _backend.cuda_stream(x), _backend.dtype_name(x), shape, reverse,
        p(x), p(a), p(b), p(c), p(checkpoints), p(grad_y), p(grad_final),
        p(grad_x), p(grad_a), p(grad_b), p(grad_c), p(grad_initial),
    )  # fmt: skip
    return grad_x, grad_a, grad_b, grad_c


@torch.library.custom_op("ferroscan::gated_scan_bwd", mutates_args=())
def _gated_bwd(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], checkpoints: Tensor,
    grad_y: Tensor, grad_final: Optional[Tensor], reverse: bool, want_initial: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    grad_initial = x.new_empty((x.shape[0], x.shape[2]) if want_initial else 0)
    gx, ga, gb, gc = _fused_backward_impl(
        x, a, b, c, checkpoints, grad_y, grad_final, reverse, _shape3(x), grad_initial if want_initial else None
    )
    # Absent gradients as empty tensors (a custom op returns no None), each its own: outputs
    # must not alias one another.
    return gx, ga, x.new_empty(0) if gb is None else gb, x.new_empty(0) if gc is None else gc, grad_initial


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


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Optional[Tensor], grad_final: Optional[Tensor],
              _grad_checkpoints: Optional[Tensor]) -> tuple:  # fmt: skip
    x, a, b, c, checkpoints = ctx.saved_tensors
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    grad_final = None if grad_final is None else grad_final.contiguous()
    gx, ga, gb, gc, gh0 = _gated_bwd(x, a, b, c, checkpoints, grad_y, grad_final, ctx.reverse, ctx.want_initial)
    return (
        gx, ga, gb if b is not None else None, gc if c is not None else None,
        gh0 if ctx.want_initial else None, None, None,
    )  # fmt: skip


_gated_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGated(torch.autograd.Function):
    """The custom ops' kernels for plain eager mode, without the dispatcher's cost and without
    reshaping views (each a node in the backward graph): with ``layout.in_place`` the kernels
    take the caller's tensors as they are (see :class:`ferroscan.ops.scan._EagerScan`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, a: Tensor, b: Optional[Tensor],
                c: Optional[Tensor], initial: Optional[Tensor], reverse: bool, layout: ScanLayout,
                return_final: bool) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
        final = layout.new_state(x) if return_final else None
        y, checkpoints = _fused_forward_impl(
            x, a, b, c, layout.flatten_state(initial), reverse, True, layout.shape3, final
        )
        ctx.save_for_backward(x, a, b, c, checkpoints)
        ctx.reverse, ctx.layout, ctx.want_initial = reverse, layout, initial is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @once_differentiable_fast
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Optional[Tensor],
                 grad_final: Optional[Tensor]) -> tuple:  # fmt: skip
        x, a, b, c, checkpoints = ctx.saved_tensors
        layout: ScanLayout = ctx.layout
        grad_y = torch.zeros_like(x) if grad_y is None else laid_out_like(grad_y, x)
        grad_initial = layout.new_state(x) if ctx.want_initial else None
        gx, ga, gb, gc = _fused_backward_impl(
            x, a, b, c, checkpoints, grad_y, layout.flatten_state(grad_final), ctx.reverse, layout.shape3, grad_initial
        )
        return gx, ga, gb, gc, grad_initial, None, None, None


def _run_fused(
    x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor], initial: Optional[Tensor], reverse: bool,
    layout: ScanLayout, return_final: bool,
) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """``(y, h_final or None)`` shaped like the inputs, by the fused kernels: the custom op when
    tracing, else the eager path."""
    tensors = [t for t in (x, a, b, c, initial) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flat = layout.flatten
    if needs_custom_op(tensors):
        y, final, _ = torch.ops.ferroscan.gated_scan_fwd(
            flat(x), flat(a), None if b is None else flat(b), None if c is None else flat(c),
            layout.flatten_state(initial), reverse, needs_grad,
        )  # fmt: skip
        return layout.restore(y), layout.restore_state(final)
    if not layout.in_place:  # copies in the logical order; the result is restored below
        x, a, b, c = flat(x), flat(a), None if b is None else flat(b), None if c is None else flat(c)
    if needs_grad:
        y, final = _EagerGated.apply(x, a, b, c, initial, reverse, layout, return_final)
    else:
        final = layout.new_state(x) if return_final else None
        y, _ = _fused_forward_impl(x, a, b, c, layout.flatten_state(initial), reverse, False, layout.shape3, final)
    return (y if layout.in_place else layout.restore(y)), final


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
    layout = ScanLayout(x, dim, *(t for t in (gates, in_gates, out_gates) if t is not None))
    initial = check_state(initial, "initial", layout.state_shape, x, "x")
    if x.is_cuda and layout.shape3[2] > 1 and out_dtype in (None, x.dtype):
        y, final = _run_fused(x, gates, in_gates, out_gates, initial, reverse, layout, return_final)
        return (y, final) if return_final else y
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
