r"""Selective scan: the state-space recurrence of Mamba (S6).

For each batch element :math:`b` and channel :math:`d`, with :math:`N` states per channel:

.. math::

    \Delta_t &= \operatorname{softplus}(\delta_t + \beta_d) \quad
        (\text{or } \delta_t + \beta_d \text{ without } \texttt{delta\_softplus}),

    h_t &= \exp(\Delta_t A_d) \odot h_{t-1} + \Delta_t\, u_t\, B_t, \qquad h_{-1} = h_0,

    y_t &= f \cdot \operatorname{Re}\Big(\sum_n C_{t,n} h_{t,n}\Big) + D_d\, u_t, \qquad
    \text{out}_t = y_t \cdot \operatorname{silu}(z_t),

with :math:`f = 1` for real and :math:`f = 2` for complex :math:`A` (as Mamba does), and
:math:`B_t, C_t` either constant per channel or shared by the channels of a group.

Gradients, with :math:`g_t` the gradient reaching :math:`h_t`, :math:`\bar g^y_t` the one
reaching :math:`y_t` and :math:`a_t = \exp(\Delta_t A)` (complex values follow PyTorch's
convention :math:`\partial L/\partial\mathrm{re} + i\,\partial L/\partial\mathrm{im}`):

.. math::

    g_t &= f \bar g^y_t \overline{C_t} + \overline{a_{t+1}}\, g_{t+1}, \qquad
    \partial C_t = f \bar g^y_t \overline{h_t}, \qquad \partial B_t = \Delta_t u_t g_t,

    \partial A &= \sum_t \Delta_t w_t,\ \ w_t = \overline{a_t}\, g_t \overline{h_{t-1}}, \qquad
    \partial\Delta_t = u_t \operatorname{Re}(\overline{B_t} g_t) + \operatorname{Re}(\overline{A} w_t),

    \partial u_t &= D \bar g^y_t + \Delta_t \operatorname{Re}(\overline{B_t} g_t), \qquad
    \partial h_0 = \overline{a_0}\, g_0.

The forward saves the state every ``SELECTIVE_CHECKPOINT_STEPS`` (16) steps when a gradient
will be needed; the backward rebuilds the states in between instead of storing them all.
Gradients that sum over rows (``A``, ``D``, ``delta_bias``, constant ``B``/``C``, and
variable ``B``/``C`` over a group's channels) are summed in a fixed order: bit-identical
from run to run.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend, _native
from .._checks import check_same_device, check_shape, check_tensor
from ._dispatch import needs_custom_op, once_differentiable_fast

Tensor = torch.Tensor

#: Steps between the states the forward saves for the backward (the Rust core's constant).
CHECKPOINT_STEPS: int = _native.SELECTIVE_CHECKPOINT_STEPS

_WEIGHT_DTYPE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL_OF = {c: r for r, c in _COMPLEX_OF.items()}

# ---------------------------------------------------------------------------------------------
# Custom ops. Inputs as validated by `selective_scan`: u, delta, z (batch, dim, L) any strides;
# A (dim, N) real or complex; B, C constant (dim, N) of A's dtype or variable
# (batch, G, N, L·parts) real of u's dtype (complex pairs interleaved along the last axis);
# D, delta_bias (dim,); initial (batch, dim, N) of A's dtype. Absent optional outputs are
# empty tensors (custom ops return tensors only).
# ---------------------------------------------------------------------------------------------


def _checkpoint_count(length: int) -> int:
    return (length + CHECKPOINT_STEPS - 1) // CHECKPOINT_STEPS


def _problem(u: Tensor, A: Tensor, delta_softplus: bool) -> tuple[int, int, int, int, bool, bool]:
    batch, dim, length = u.shape
    return int(batch), int(dim), int(length), int(A.shape[1]), A.is_complex(), bool(delta_softplus)


def _seq(t: Optional[Tensor]) -> tuple[int, tuple[int, int, int]]:
    if t is None:
        return 0, (0, 0, 0)
    s = t.stride()
    return t.data_ptr(), (s[0], s[1], s[2])


def _bc(t: Tensor) -> tuple[int, int, tuple[int, int, int, int]]:
    if t.dim() == 2:
        return t.data_ptr(), 0, (0, 0, 0, 0)
    s = t.stride()
    return t.data_ptr(), int(t.shape[1]), (s[0], s[1], s[2], s[3])


def _forward_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    delta_softplus: bool,
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the forward on the Rust core (CPU or CUDA): ``(out, last_state, checkpoints)``."""
    problem = _problem(u, A, delta_softplus)
    batch, dim, length, dstate = problem[:4]
    A, D, delta_bias, initial = (None if t is None else t.contiguous() for t in (A, D, delta_bias, initial))
    B, C = (t.contiguous() if t.dim() == 2 else t for t in (B, C))
    out = u.new_empty((batch, dim, length))
    last = A.new_empty((batch, dim, dstate))
    checkpoints = A.new_empty((batch, dim, _checkpoint_count(length), dstate) if save_checkpoints else (0,))
    a = _backend.address
    args = (
        _backend.dtype_name(u), problem, _seq(u), _seq(delta), a(A), _bc(B), _bc(C), a(D), _seq(z),
        a(delta_bias), a(initial), a(out), a(last), a(checkpoints) if save_checkpoints else 0,
    )  # fmt: skip
    if u.is_cuda:
        _native.cuda_selective_scan_forward(u.device.index, _backend.cuda_stream(u), *args)
    else:
        _native.cpu_selective_scan_forward(*args)
    return out, last, checkpoints


@torch.library.custom_op("ferroscan::selective_scan_fwd", mutates_args=())
def _selective_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    delta_softplus: bool,
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial, delta_softplus, save_checkpoints)


@_selective_fwd.register_fake
def _selective_fwd_fake(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    delta_softplus: bool,
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, dim, length = u.shape
    dstate = A.shape[1]
    shape = (batch, dim, _checkpoint_count(length), dstate) if save_checkpoints else (0,)
    return u.new_empty((batch, dim, length)), A.new_empty((batch, dim, dstate)), A.new_empty(shape)


def _backward_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    grad_out: Tensor,
    grad_last: Optional[Tensor],
    checkpoints: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Runs the backward on the Rust core (CPU or CUDA): the gradients of every input (empty
    when absent)."""
    problem = _problem(u, A, delta_softplus)
    batch, dim, length, dstate = problem[:4]
    if checkpoints.numel() != batch * dim * _checkpoint_count(length) * dstate:
        raise RuntimeError("selective_scan backward: the forward did not save its checkpoints")
    A, D, delta_bias, initial, grad_last, checkpoints = (
        None if t is None else t.contiguous() for t in (A, D, delta_bias, initial, grad_last, checkpoints)
    )
    B, C = (t.contiguous() if t.dim() == 2 else t for t in (B, C))
    grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_initial = _gradient_buffers(
        u, A, B, C, D, z, delta_bias, initial
    )
    a = _backend.address

    def opt(t: Tensor, present: Optional[Tensor]) -> int:
        return 0 if present is None else a(t)

    dtype = _backend.dtype_name(u)
    args = (
        dtype, problem, _seq(u), _seq(delta), a(A), _bc(B), _bc(C), a(D), _seq(z),
        a(delta_bias), a(initial), _seq(grad_out), a(grad_last), a(checkpoints),
        a(grad_u), a(grad_delta), a(grad_A), a(grad_B), a(grad_C), opt(grad_D, D), opt(grad_z, z),
        opt(grad_bias, delta_bias), opt(grad_initial, initial),
    )  # fmt: skip
    if u.is_cuda:
        groups = [0 if t.dim() == 2 else int(t.shape[1]) for t in (B, C)]
        nbytes = _native.cuda_selective_scratch_bytes(u.device.index, dtype, problem, *groups)
        scratch, nbytes = _backend.scratch_buffer(u, nbytes)
        _native.cuda_selective_scan_backward(u.device.index, _backend.cuda_stream(u), *args, a(scratch), nbytes)
    else:
        _native.cpu_selective_scan_backward(*args)
    return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_initial


@torch.library.custom_op("ferroscan::selective_scan_bwd", mutates_args=())
def _selective_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    grad_out: Tensor,
    grad_last: Optional[Tensor],
    checkpoints: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(
        u, delta, A, B, C, D, z, delta_bias, initial, grad_out, grad_last, checkpoints, delta_softplus
    )


def _gradient_buffers(u: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      delta_bias: Optional[Tensor], initial: Optional[Tensor]) -> tuple[Tensor, ...]:  # fmt: skip
    """Uninitialized gradients of every input, C-contiguous; a distinct empty tensor for each
    absent one (the outputs of a custom op must not alias each other)."""

    def like(t: Optional[Tensor]) -> Tensor:
        return u.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (
        u.new_empty(u.shape), u.new_empty(u.shape), like(A), like(B), like(C), like(D),
        u.new_empty((0,)) if z is None else u.new_empty(u.shape), like(delta_bias), like(initial),
    )  # fmt: skip


@_selective_bwd.register_fake
def _selective_bwd_fake(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial: Optional[Tensor],
    grad_out: Tensor,
    grad_last: Optional[Tensor],
    checkpoints: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _gradient_buffers(u, A, B, C, D, z, delta_bias, initial)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    *tensors, delta_softplus, _save = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.delta_softplus = delta_softplus
    # Unused outputs (usually the last state) arrive as None instead of zero-filled tensors.
    ctx.set_materialize_grads(False)


def _gradients(ctx: torch.autograd.function.FunctionCtx, grad_out: Optional[Tensor],
               grad_last: Optional[Tensor], backward_op: object) -> tuple:  # fmt: skip
    *tensors, checkpoints = ctx.saved_tensors
    u = tensors[0]
    if grad_out is None:
        grad_out = u.new_zeros(u.shape)
    grads = backward_op(*tensors, grad_out, grad_last, checkpoints, ctx.delta_softplus)
    return (*(None if t is None else g for g, t in zip(grads, tensors)), None, None)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Optional[Tensor],
              grad_last: Optional[Tensor], _grad_checkpoints: Optional[Tensor]) -> tuple:  # fmt: skip
    return _gradients(ctx, grad_out, grad_last, _selective_bwd)


_selective_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerSelectiveScan(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch cost in eager
    mode."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, *args: object) -> tuple[Tensor, Tensor, Tensor]:
        outputs = _forward_impl(*args)
        _setup_context(ctx, args, outputs)
        ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    @once_differentiable_fast
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Optional[Tensor],
                 grad_last: Optional[Tensor], _grad_checkpoints: Optional[Tensor]) -> tuple:  # fmt: skip
        return _gradients(ctx, grad_out, grad_last, _backward_impl)


def _run_forward(*args: object) -> tuple[Tensor, Tensor, Tensor]:
    """The custom op when tracing (torch.compile/export, fake or subclass tensors); in plain
    eager mode the same implementation without the dispatcher's overhead."""
    tensors = [t for t in args if isinstance(t, Tensor)]
    if needs_custom_op(tensors):
        return torch.ops.ferroscan.selective_scan_fwd(*args)
    if args[-1]:  # save_checkpoints: a gradient is wanted
        return _EagerSelectiveScan.apply(*args)
    return _forward_impl(*args)


# ---------------------------------------------------------------------------------------------
# Public function: validation and the Mamba conventions.
# ---------------------------------------------------------------------------------------------


def _check_weight(value: Optional[Tensor], arg: str, dtype: torch.dtype, shape: tuple[int, ...],
                  u: Tensor, what: str) -> Optional[Tensor]:  # fmt: skip
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor or None, got {type(value).__name__}")
    check_same_device(u, "u", value, arg)
    if value.dtype != dtype:
        raise TypeError(f"{arg} has dtype {value.dtype}; expected {dtype} ({what})")
    check_shape(value, arg, shape)
    return value


def _check_bc(value: object, arg: str, u: Tensor, A: Tensor) -> Tensor:
    """``B``/``C`` as the ops take them: constant ``(dim, N)`` of A's dtype, or variable
    ``(batch, G, N, L·parts)`` real of u's dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    check_same_device(u, "u", value, arg)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    if value.dim() == 2:
        if value.dtype != A.dtype:
            raise TypeError(
                f"{arg} is constant (2-d) with dtype {value.dtype}; a constant {arg} must have A's dtype {A.dtype}"
            )
        check_shape(value, arg, (dim, dstate))
        return value
    if value.dim() not in (3, 4):
        raise ValueError(
            f"{arg} must be constant (dim, N) or variable (batch, N, L) / (batch, G, N, L); "
            f"got a {value.dim()}-d tensor of shape {tuple(value.shape)}"
        )
    if value.dim() == 3:
        value = value.unsqueeze(1)
    if A.is_complex():
        if value.is_complex():  # (batch, G, N, L) complex: the interleaved real layout, as a view
            if _REAL_OF.get(value.dtype) != u.dtype:
                raise TypeError(
                    f"{arg} is variable with dtype {value.dtype}; a complex variable {arg} must be the complex "
                    f"dtype of u's {u.dtype} (or pass the real (batch, G, N, 2L) layout)"
                )
            value = torch.view_as_real(value).flatten(-2)
        expected_last, layout = 2 * length, "(batch, G, N, 2L) with (re, im) pairs interleaved along the last axis"
    else:
        expected_last, layout = length, "(batch, G, N, L)"
    if value.dtype != u.dtype:
        raise TypeError(f"{arg} is variable with dtype {value.dtype}; a variable {arg} must have u's dtype {u.dtype}")
    groups = value.shape[1]
    if value.shape[0] != batch or value.shape[2] != dstate or value.shape[3] != expected_last or groups < 1:
        raise ValueError(
            f"{arg} has shape {tuple(value.shape)} (as 4-d); expected {layout} = "
            f"({batch}, G, {dstate}, {expected_last})"
        )
    if dim % groups != 0:
        raise ValueError(f"{arg} has {groups} groups, which do not divide dim = {dim}")
    return value


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Mamba's selective scan (S6), with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    .. math::

        \Delta_t = \operatorname{softplus}(\delta_t + \beta)\ (\text{if } \texttt{delta\_softplus}),
        \quad h_t = e^{\Delta_t A} h_{t-1} + \Delta_t u_t B_t,
        \quad y_t = C_t \cdot h_t + D u_t, \quad \text{out}_t = y_t \operatorname{silu}(z_t)

    (for complex ``A``, :math:`y_t = 2\operatorname{Re}(\sum_n C_{t,n} h_{t,n}) + D u_t`).

    Args:
        u: ``(batch, dim, L)``, float16 / bfloat16 / float32 / float64; any strides (e.g. a
            channels-last ``(batch, L, dim)`` tensor transposed) run without a copy.
        delta: ``(batch, dim, L)``, u's dtype, any strides.
        A: ``(dim, N)``, float32 (float64 for float64 inputs) or its complex dtype.
        B: constant ``(dim, N)`` of A's dtype, or variable ``(batch, N, L)`` / ``(batch, G, N, L)``
            of u's dtype, where channel ``d`` uses group ``d // (dim // G)``. For complex ``A`` a
            variable ``B`` is real with last axis ``2L`` holding ``(re, im)`` of each step (Mamba's
            layout), or complex ``(batch, [G,] N, L)``.
        C: like ``B``.
        D: ``(dim,)`` skip weights, A's real dtype.
        z: ``(batch, dim, L)`` gate, u's dtype, any strides.
        delta_bias: ``(dim,)``, A's real dtype.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return :math:`h_{L-1}`, ``(batch, dim, N)`` of A's dtype.
        initial_state: :math:`h_{-1}`, ``(batch, dim, N)`` of A's dtype; zeros when None.

    Returns:
        ``out`` (``(batch, dim, L)``, C-contiguous, dtype of ``delta``), or ``(out, last_state)``.

    Every input is differentiable, the initial and last states included (the last state's
    gradient is exact for constant ``B`` too). Backward gradients are deterministic. Half types
    are storage only: everything accumulates in float32. Any ``L >= 0`` and ``N >= 1`` work.

    CPU tensors run on the multithreaded Rust backend; CUDA tensors on ferroscan's CUDA kernels
    (``N <= 256`` real / ``128`` complex; half that for float64), compiled on first use.
    """
    check_tensor(u, "u")
    check_tensor(delta, "delta")
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L); got shape {tuple(u.shape)}")
    check_same_device(u, "u", delta, "delta")
    if delta.dtype != u.dtype:
        raise TypeError(f"delta has dtype {delta.dtype} but u has {u.dtype}; they must match")
    check_shape(delta, "delta", tuple(u.shape))
    batch, dim, length = u.shape
    weight = _WEIGHT_DTYPE[u.dtype]
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    check_same_device(u, "u", A, "A")
    if A.dtype not in (weight, _COMPLEX_OF[weight]):
        raise TypeError(f"A has dtype {A.dtype}; expected {weight} or {_COMPLEX_OF[weight]} for u of dtype {u.dtype}")
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) = ({dim}, N) with N >= 1; got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    B = _check_bc(B, "B", u, A)
    C = _check_bc(C, "C", u, A)
    D = _check_weight(D, "D", weight, (dim,), u, "the real weight dtype")
    delta_bias = _check_weight(delta_bias, "delta_bias", weight, (dim,), u, "the real weight dtype")
    initial_state = _check_weight(initial_state, "initial_state", A.dtype, (batch, dim, dstate), u, "A's dtype")
    if z is not None:
        check_tensor(z, "z")
        check_same_device(u, "u", z, "z")
        if z.dtype != u.dtype:
            raise TypeError(f"z has dtype {z.dtype} but u has {u.dtype}; they must match")
        check_shape(z, "z", tuple(u.shape))
    for flag, arg in ((delta_softplus, "delta_softplus"), (return_last_state, "return_last_state")):
        if not isinstance(flag, bool):
            raise TypeError(f"{arg} must be a bool, got {type(flag).__name__}")

    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out, last, _ = _run_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, wants_grad)
    return (out, last) if return_last_state else out
