r"""First-order linear scan.

.. math::

    h_t = a_t \, h_{t-1} + x_t, \qquad h_{-1} = h_0

(reversed: :math:`h_t = a_t h_{t+1} + x_t`, :math:`h_L = h_0`). Gradients, with
:math:`g_t = \partial\mathcal{L}/\partial x_t` the total gradient reaching :math:`h_t`:

.. math::

    g_t = \bar g_t + a_{t+1} g_{t+1}, \quad g_{L-1} = \bar g_{L-1} + \bar g_{\text{final}}, \qquad
    \frac{\partial\mathcal{L}}{\partial a_t} = g_t h_{t-1}, \qquad
    \frac{\partial\mathcal{L}}{\partial h_0} = a_0 g_0,

where :math:`\bar g` are the incoming gradients of :math:`h` — one reverse scan, fused into a
single kernel pass on CUDA.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .. import _backend, _native
from .._checks import (
    broadcast_to_like,
    check_has_time_axis,
    check_same_kind,
    check_state,
    check_tensor,
    normalize_dim,
)
from ._dispatch import needs_custom_op, once_differentiable_fast
from ._layout import ScanLayout, laid_out_like

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Custom ops on C-contiguous (outer, len, inner) tensors; states are (outer, inner).
# ---------------------------------------------------------------------------------------------


def _shape3(t: Tensor) -> tuple[int, int, int]:
    outer, length, inner = t.shape
    return int(outer), int(length), int(inner)


def _forward_impl(gates: Tensor, tokens: Tensor, initial: Optional[Tensor], reverse: bool,
                  shape: tuple[int, int, int], final: Optional[Tensor]) -> Tensor:  # fmt: skip
    """Runs the forward on the Rust core (CPU or CUDA) and returns ``h``, laid out like ``tokens``.

    ``gates`` and ``tokens`` (and ``initial``, ``final``: ``(outer, inner)``) have storage that is
    C-contiguous as ``shape = (outer, len, inner)``, whatever their logical shape (a permuted view
    of a contiguous tensor qualifies); ``final`` (may be None: not written) receives the state
    after the last step."""
    hidden = torch.empty_like(tokens)
    dtype = _backend.dtype_name(tokens)
    a = _backend.address
    if tokens.is_cuda:
        scratch, scratch_bytes = _backend.cuda_scratch(tokens, shape)
        _native.cuda_scan_forward(
            tokens.get_device(), _backend.cuda_stream(tokens), dtype, shape, reverse,
            a(gates), a(tokens), a(initial), a(hidden), a(final), a(scratch), scratch_bytes,
        )  # fmt: skip
    else:
        _native.cpu_scan_forward(dtype, shape, reverse, a(gates), a(tokens), a(initial), a(hidden), a(final))
    return hidden


@torch.library.custom_op("ferroscan::scan_fwd", mutates_args=())
def _scan_fwd(gates: Tensor, tokens: Tensor, initial: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor]:
    shape = _shape3(tokens)
    final = tokens.new_empty((shape[0], shape[2]))
    return _forward_impl(gates, tokens, initial, reverse, shape, final), final


@_scan_fwd.register_fake
def _scan_fwd_fake(gates: Tensor, tokens: Tensor, initial: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(tokens), tokens.new_empty((tokens.shape[0], tokens.shape[2]))


def _backward_impl(
    gates: Tensor,
    hidden: Tensor,
    initial: Optional[Tensor],
    grad_hidden: Tensor,
    grad_final: Optional[Tensor],
    reverse: bool,
    shape: tuple[int, int, int],
    grad_initial: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Runs the fused backward on the Rust core: returns ``(dL/da, dL/dx)`` laid out like
    ``hidden`` and writes ``dL/dh0`` into ``grad_initial`` when given. Storage rules as for
    :func:`_forward_impl` (``grad_hidden`` is laid out like ``hidden``)."""
    grad_gates = torch.empty_like(hidden)
    grad_tokens = torch.empty_like(hidden)
    dtype = _backend.dtype_name(hidden)
    a = _backend.address
    if hidden.is_cuda:
        scratch, scratch_bytes = _backend.cuda_scratch(hidden, shape)
        _native.cuda_scan_backward(
            hidden.get_device(), _backend.cuda_stream(hidden), dtype, shape, reverse,
            a(gates), a(hidden), a(initial), a(grad_hidden), a(grad_final),
            a(grad_gates), a(grad_tokens), a(grad_initial), a(scratch), scratch_bytes,
        )  # fmt: skip
    else:
        _native.cpu_scan_backward(
            dtype, shape, reverse, a(gates), a(hidden), a(initial), a(grad_hidden), a(grad_final),
            a(grad_gates), a(grad_tokens), a(grad_initial),
        )  # fmt: skip
    return grad_gates, grad_tokens


@torch.library.custom_op("ferroscan::scan_bwd", mutates_args=())
def _scan_bwd(
    gates: Tensor,
    hidden: Tensor,
    initial: Optional[Tensor],
    grad_hidden: Tensor,
    grad_final: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    shape = _shape3(hidden)
    grad_initial = hidden.new_empty((shape[0], shape[2]))
    grads = _backward_impl(gates, hidden, initial, grad_hidden, grad_final, reverse, shape, grad_initial)
    return grads[0], grads[1], grad_initial


@_scan_bwd.register_fake
def _scan_bwd_fake(
    gates: Tensor,
    hidden: Tensor,
    initial: Optional[Tensor],
    grad_hidden: Tensor,
    grad_final: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    state = hidden.new_empty((hidden.shape[0], hidden.shape[2]))
    return torch.empty_like(hidden), torch.empty_like(hidden), state


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    gates, _tokens, initial, reverse = inputs
    hidden, _final = output
    ctx.save_for_backward(gates, hidden, initial)
    ctx.reverse = reverse
    # An unused output (usually h_final) then arrives as None, which the kernel reads as zeros,
    # instead of a zero-filled tensor (a launch and an allocation per backward).
    ctx.set_materialize_grads(False)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_hidden: Optional[Tensor],
              grad_final: Optional[Tensor]) -> tuple:  # fmt: skip
    gates, hidden, initial = ctx.saved_tensors
    grad_hidden = torch.zeros_like(hidden) if grad_hidden is None else grad_hidden.contiguous()
    grad_final = None if grad_final is None else grad_final.contiguous()
    grad_gates, grad_tokens, grad_initial = _scan_bwd(gates, hidden, initial, grad_hidden, grad_final, ctx.reverse)
    return grad_gates, grad_tokens, (grad_initial if initial is not None else None), None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """The same kernels as the custom ops, for eager mode without their Python dispatch cost and
    without reshaping views (each a node in the backward graph): with ``layout.in_place`` the
    kernels take the caller's tensors as they are. Tens of microseconds per call, which dominate
    short sequences."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gates: Tensor, tokens: Tensor,
                initial: Optional[Tensor], reverse: bool, layout: ScanLayout,
                return_final: bool) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
        initial_flat = layout.flatten_state(initial)
        final = layout.new_state(tokens) if return_final else None
        hidden = _forward_impl(gates, tokens, initial_flat, reverse, layout.shape3, final)
        ctx.save_for_backward(gates, hidden, initial_flat)
        ctx.reverse, ctx.layout = reverse, layout
        ctx.set_materialize_grads(False)
        return hidden, final

    @staticmethod
    @once_differentiable_fast
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_hidden: Optional[Tensor],
                 grad_final: Optional[Tensor]) -> tuple:  # fmt: skip
        gates, hidden, initial = ctx.saved_tensors
        layout: ScanLayout = ctx.layout
        grad_hidden = torch.zeros_like(hidden) if grad_hidden is None else laid_out_like(grad_hidden, hidden)
        grad_final = layout.flatten_state(grad_final)
        grad_initial = None if initial is None else layout.new_state(hidden)
        grad_gates, grad_tokens = _backward_impl(
            gates, hidden, initial, grad_hidden, grad_final, ctx.reverse, layout.shape3, grad_initial
        )
        return grad_gates, grad_tokens, grad_initial, None, None, None


def _run_forward(gates: Tensor, tokens: Tensor, initial: Optional[Tensor], reverse: bool,
                 layout: ScanLayout, return_final: bool) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """``(h, h_final or None)`` shaped like the inputs. The custom op when tracing
    (torch.compile/export, fake or subclass tensors); in plain eager mode the same kernels
    without the dispatcher's overhead."""
    tensors = (gates, tokens) if initial is None else (gates, tokens, initial)
    if needs_custom_op(tensors):
        hidden, final = torch.ops.ferroscan.scan_fwd(
            layout.flatten(gates), layout.flatten(tokens), layout.flatten_state(initial), reverse
        )
        return layout.restore(hidden), layout.restore_state(final)
    if not layout.in_place:  # copies in the logical order; the result is restored below
        gates, tokens = layout.flatten(gates), layout.flatten(tokens)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        hidden, final = _EagerScan.apply(gates, tokens, initial, reverse, layout, return_final)
    else:
        final = layout.new_state(tokens) if return_final else None
        hidden = _forward_impl(gates, tokens, layout.flatten_state(initial), reverse, layout.shape3, final)
    return (hidden if layout.in_place else layout.restore(hidden)), final

# ---------------------------------------------------------------------------------------------
# Public function: any rank, any time axis, any strides.
# ---------------------------------------------------------------------------------------------


def scan(
    gates: Union[Tensor, np.ndarray],
    tokens: Union[Tensor, np.ndarray],
    *,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[Union[Tensor, np.ndarray]] = None,
    return_final: bool = False,
) -> Union[Tensor, np.ndarray, tuple[Tensor, Tensor], tuple[np.ndarray, np.ndarray]]:
    r"""First-order linear recurrence along axis ``dim``.

    .. math::

        h_t = a_t \, h_{t-1} + x_t, \qquad h_{-1} = h_0 \ (\text{zeros unless } \texttt{initial})

    With ``reverse=True`` the scan runs from the end: :math:`h_t = a_t h_{t+1} + x_t`.

    Args:
        gates: :math:`a`, the same shape as ``tokens`` (or broadcastable to it, e.g. one gate per
            channel via a stride-0 view).
        tokens: :math:`x`, any rank :math:`\ge 1`, float16 / bfloat16 / float32 / float64, on
            CPU or CUDA. A NumPy array (float32/float64) runs on the CPU and returns NumPy.
        dim: the time axis; ``(B, D, L)`` with ``dim=-1`` and ``(B, L, D)`` with ``dim=1`` both
            run without the caller transposing.
        reverse: scan from the last step to the first.
        initial: :math:`h_0`, shaped like ``tokens`` without ``dim``; differentiable.
        return_final: also return the state after the last step scanned (index 0 along ``dim``
            when reversed, otherwise the last index), differentiable.

    Returns:
        ``h`` (the shape of ``tokens``, its dtype), or ``(h, h_final)`` with ``return_final``.

    Half types accumulate in float32. Any length works (``L = 0`` gives empty ``h`` and
    ``h_final = initial``). Non-contiguous inputs whose strides are a permutation of a
    contiguous layout run in place; other layouts are copied once.
    """
    if isinstance(gates, np.ndarray) or isinstance(tokens, np.ndarray) or isinstance(initial, np.ndarray):
        return _scan_numpy(gates, tokens, dim=dim, reverse=reverse, initial=initial, return_final=return_final)
    check_tensor(tokens, "tokens")
    check_tensor(gates, "gates")
    check_same_kind(tokens, "tokens", gates, "gates")
    check_has_time_axis(tokens, "tokens")
    gates = broadcast_to_like(gates, "gates", tokens, "tokens")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    dim = normalize_dim(dim, tokens.dim())
    layout = ScanLayout(tokens, dim, gates)
    if initial is not None:
        initial = check_state(initial, "initial", layout.state_shape, tokens, "tokens")

    hidden, final = _run_forward(gates, tokens, initial, reverse, layout, return_final)
    return (hidden, final) if return_final else hidden


def _scan_numpy(
    gates: object, tokens: object, *, dim: int, reverse: bool, initial: object, return_final: bool
) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """NumPy front end: float arrays in, float arrays out, computed by the CPU backend."""

    def to_tensor(value: object, arg: str) -> Optional[Tensor]:
        if value is None:
            return None
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{arg} must be a numpy.ndarray like the other arguments, got {type(value).__name__}")
        if value.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{arg} has dtype {value.dtype}; expected float16, float32 or float64")
        # A private C-contiguous copy when needed (keeps 0-d arrays 0-d; read-only arrays are
        # copied rather than handed to torch.from_numpy, which warns about them).
        array = np.ascontiguousarray(value).reshape(value.shape)
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array)

    out = scan(
        to_tensor(gates, "gates"),
        to_tensor(tokens, "tokens"),
        dim=dim,
        reverse=reverse,
        initial=to_tensor(initial, "initial"),
        return_final=return_final,
    )
    if return_final:
        return out[0].numpy(), out[1].numpy()
    return out.numpy()
