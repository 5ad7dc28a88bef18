r"""Drop-in replacement for ``mamba_ssm.ops.selective_scan_interface``'s selective scan.

``mamba_ssm`` (state-spaces/mamba) exposes Mamba's selective scan as

.. code-block:: python

    selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, cu_seqlens=None)
    selective_scan_ref(...)   # the same signature, in plain PyTorch

computing, per batch element and channel,

.. math::

    \Delta_t = \operatorname{softplus}(\delta_t + \beta)\ (\text{if delta\_softplus}), \quad
    h_t = e^{\Delta_t A} h_{t-1} + \Delta_t u_t B_t, \quad
    y_t = C_t \cdot h_t + D u_t, \quad \text{out}_t = y_t\,\operatorname{silu}(z_t),

and returning ``out`` (the dtype of ``u``), or ``(out, last_state)`` with ``last_state`` the
``(batch, dim, dstate)`` state after the last step (float32, or complex64 for complex ``A``).
This module provides both functions with the same signatures, defaults and return conventions::

    from ferroscan.compat.mamba import selective_scan_fn   # was: from mamba_ssm.ops.selective_scan_interface import ...

Tensor conventions (Mamba's): ``u, delta, z``: ``(batch, dim, L)``; ``A``: ``(dim, N)`` float32 or
complex64; ``B, C``: constant ``(dim, N)`` (A's dtype) or variable ``(batch, N, L)`` /
``(batch, G, N, L)`` of u's dtype, channel ``d`` using group ``d // (dim // G)``; for complex
``A`` a variable ``B``/``C`` is real with last axis ``2L`` holding ``(re, im)`` of each step;
``D, delta_bias``: ``(dim,)`` float32; ``cu_seqlens``: cumulative sequence boundaries
``[0, l_1, l_1 + l_2, ..., L]`` of packed sequences, at which the state restarts from zero.

Beyond ``mamba_ssm``:

* runs on the CPU too (multithreaded), and float64 inputs work (with float64/complex128 weights);
* the gradient of ``last_state`` is propagated (mamba ignores it), and is exact for constant
  ``B`` as well;
* any ``L`` and ``N`` (mamba: ``N <= 256``); ``u``, ``delta``, ``z`` and variable ``B``/``C`` may
  have any strides (e.g. channels-last views) without a copy;
* deterministic backward (mamba's uses floating-point atomics for some gradients);
* a complex-typed variable ``B``/``C`` ``(batch, [G,] N, L)`` is accepted besides the real
  interleaved layout.

Differences: ``cu_seqlens`` is handled by running each packed segment separately (a Python loop
over segments, each a full ferroscan call) rather than in one kernel; :func:`ferroscan.selective_scan`
also takes an ``initial_state``, which this signature has no place for.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

import ferroscan

__all__ = ["selective_scan_fn", "selective_scan_ref"]

Tensor = torch.Tensor


def _segments(cu_seqlens: object, length: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` from cumulative boundaries; ValueError unless they are valid."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise TypeError("cu_seqlens must be a 1-d integer tensor of cumulative sequence lengths, or None")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != length or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to L = {length}; got {bounds}")
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _time_slice(t: Optional[Tensor], start: int, end: int, interleaved: bool) -> Optional[Tensor]:
    """``t[..., start:end]`` along time (the last axis; its pairs for interleaved complex)."""
    if t is None:
        return None
    return t[..., 2 * start : 2 * end] if interleaved else t[..., start:end]


def selective_scan_fn(
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
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Mamba's selective scan with ``mamba_ssm``'s signature, on ferroscan.

    .. math::

        h_t = e^{\Delta_t A} h_{t-1} + \Delta_t u_t B_t, \qquad
        \text{out}_t = (C_t \cdot h_t + D u_t)\, \operatorname{silu}(z_t)

    Returns ``out`` (u's dtype), or ``(out, last_state)`` when ``return_last_state`` (the state
    after step ``L-1``: ``(batch, dim, N)``, float32 or complex64). With ``cu_seqlens`` the state
    restarts from zero at every inner boundary. See the module docstring for shapes and dtypes.
    """
    if cu_seqlens is None:
        return ferroscan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    length = u.shape[-1]
    pieces = []
    last = None
    def piece(M: Tensor, start: int, end: int) -> Tensor:
        interleaved = A.is_complex() and not M.is_complex()
        return M if M.dim() == 2 else _time_slice(M, start, end, interleaved)

    for start, end in _segments(cu_seqlens, length):
        B_s, C_s = piece(B, start, end), piece(C, start, end)
        out, last = ferroscan.selective_scan(
            u[..., start:end], delta[..., start:end], A, B_s, C_s, D, _time_slice(z, start, end, False),
            delta_bias, delta_softplus, True,
        )  # fmt: skip
        pieces.append(out)
    out = torch.cat(pieces, dim=-1)
    return (out, last) if return_last_state else out


def selective_scan_ref(
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
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""The selective scan in plain PyTorch (a loop over time), for checking and for devices
    ferroscan does not run on; the same signature and results as :func:`selective_scan_fn`.

    Computes in float32 (float64 for float64 inputs; complex for complex ``A``), differentiable
    by autograd, and returns ``out`` in u's dtype.
    """
    real = torch.float64 if u.dtype == torch.float64 else torch.float32
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    complex_ = A.is_complex()
    batch, dim, length = u.shape
    x_u = u.to(real)
    dt = delta.to(real)
    if delta_bias is not None:
        dt = dt + delta_bias.to(real)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    weights = A.to(cplx if complex_ else real)

    def per_step(M: Tensor):  # noqa: ANN202
        """B or C as a function of the step: ``(batch or 1, dim, N)``."""
        if M.dim() == 2:
            m = M.to(weights.dtype)[None]
            return lambda t: m
        M = M[:, None] if M.dim() == 3 else M
        if complex_ and not M.is_complex():
            M = torch.view_as_complex(M.to(real).unflatten(-1, (length, 2)).contiguous())
        M = M.to(weights.dtype).repeat_interleave(dim // M.shape[1], dim=1)
        return lambda t: M[..., t]

    B_at, C_at = per_step(B), per_step(C)
    restarts = set() if cu_seqlens is None else {start for start, _ in _segments(cu_seqlens, length)[1:]}
    h = torch.zeros(batch, dim, A.shape[1], dtype=weights.dtype, device=u.device)
    ys = []
    for t in range(length):
        if t in restarts:
            h = torch.zeros_like(h)
        step = dt[:, :, t, None]
        h = torch.exp(step * weights) * h + step * x_u[:, :, t, None] * B_at(t)
        y = (C_at(t) * h).sum(-1)
        ys.append(2 * y.real if complex_ else y)
    y = torch.stack(ys, dim=-1) if ys else x_u * 0
    if D is not None:
        y = y + D.to(real)[:, None] * x_u
    if z is not None:
        y = y * F.silu(z.to(real))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
