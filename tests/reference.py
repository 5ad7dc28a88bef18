r"""Reference implementations of the first-order scan, written plainly, for the tests.

:func:`scan_ref` is the definition itself: a Python loop over time of

.. math::

    h_t = a_t h_{t-1} + x_t \quad (\text{reversed: } h_t = a_t h_{t+1} + x_t),
    \qquad h_{-1} = h_0 \ (\text{zeros unless } \texttt{initial}),

run in float64 (by default) and differentiable by autograd, so the same function gives the
expected values *and* the expected gradients (``torch.autograd.grad`` through the loop on
float64 copies of the very inputs the library saw).

:func:`scan_ref_blocked` computes the same thing in blocks (a loop over the steps of a block,
vectorised over blocks, then a loop over blocks to carry the state), so that sequences of
10^5..10^6 steps are affordable on a GPU; it is itself checked against :func:`scan_ref`.

:func:`magnitude` runs the recurrence on ``|a|``, ``|x|`` and ``|h_0|``: ``H_t >= |h_t|`` and
``H_t`` bounds every partial sum that any evaluation order of the scan forms, which is what
rounding-error bounds are proportional to.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pytest
import torch

F64 = torch.float64

#: Unit roundoff (half an ulp of 1.0, round to nearest) of each format.
UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def _state_shape(shape: torch.Size, dim: int) -> list[int]:
    return [s for d, s in enumerate(shape) if d != dim]


def scan_ref(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    *,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[torch.Tensor] = None,
    dtype: torch.dtype = F64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, h_final)`` of the scan along ``dim``, by a sequential loop in ``dtype``.

    ``gates`` may have any shape that broadcasts to ``tokens``. ``h_final`` is the state after
    the last step scanned (``initial``, or zeros, when the length is 0). Differentiable with
    respect to every input that requires grad.
    """
    x = tokens.to(dtype)
    a = gates.to(dtype).expand(x.shape)
    dim = dim % x.dim()
    length = x.shape[dim]
    if initial is None:
        h = torch.zeros(_state_shape(x.shape, dim), dtype=dtype, device=x.device)
    else:
        h = initial.to(dtype)
    a_steps, x_steps = a.unbind(dim), x.unbind(dim)
    states: list[torch.Tensor] = [h] * length
    for t in reversed(range(length)) if reverse else range(length):
        h = a_steps[t] * h + x_steps[t]
        states[t] = h
    hidden = torch.stack(states, dim=dim) if length else x * 0
    return hidden, h


def scan_ref_blocked(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    *,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[torch.Tensor] = None,
    dtype: torch.dtype = F64,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`scan_ref`, for long sequences: O(L / block + block) Python steps.

    The time axis is cut into blocks of ``block`` steps. A loop over the steps of a block scans
    every block at once from a zero state (``local``) and keeps the running product of its gates
    (``prod``); a loop over blocks then carries the state, and ``h = local + prod * carry_in``.
    A reversed scan is the forward scan of the flipped sequence, flipped back. Differentiable.
    """
    x = tokens.to(dtype)
    a = gates.to(dtype).expand(x.shape)
    dim = dim % x.dim()
    length = x.shape[dim]
    x, a = x.movedim(dim, -1), a.movedim(dim, -1)
    if reverse:
        x, a = x.flip(-1), a.flip(-1)
    rows = x.shape[:-1]
    h0 = torch.zeros(rows, dtype=dtype, device=x.device) if initial is None else initial.to(dtype)
    if length == 0:
        return tokens.to(dtype).clone(), h0
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    # Padding with a = 1, x = 0 after the end keeps the state unchanged: it is the final state.
    a = torch.cat([a, a.new_ones((*rows, pad))], -1).reshape(*rows, n_blocks, block)
    x = torch.cat([x, x.new_zeros((*rows, pad))], -1).reshape(*rows, n_blocks, block)
    local_h = torch.zeros((*rows, n_blocks), dtype=dtype, device=x.device)
    prod = torch.ones_like(local_h)
    locals_, prods = [], []
    for s in range(block):
        local_h = a[..., s] * local_h + x[..., s]
        prod = prod * a[..., s]
        locals_.append(local_h)
        prods.append(prod)
    local_all, prod_all = torch.stack(locals_, -1), torch.stack(prods, -1)
    carry, carries = h0, []
    for k in range(n_blocks):
        carries.append(carry)
        carry = prod_all[..., k, -1] * carry + local_all[..., k, -1]
    h = local_all + prod_all * torch.stack(carries, -1)[..., None]
    h = h.reshape(*rows, n_blocks * block)[..., :length]
    if reverse:
        h = h.flip(-1)
    return h.movedim(-1, dim), carry


def magnitude(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    *,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[torch.Tensor] = None,
    blocked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, H_final)``: the float64 scan of ``|a|``, ``|x|``, ``|h_0|`` (no autograd)."""
    fn = scan_ref_blocked if blocked else scan_ref
    with torch.no_grad():
        return fn(
            gates.to(F64).abs(),
            tokens.to(F64).abs(),
            dim=dim,
            reverse=reverse,
            initial=None if initial is None else initial.to(F64).abs(),
        )


def error_weights(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    *,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[torch.Tensor] = None,
    grad_hidden: Optional[torch.Tensor] = None,
    grad_final: Optional[torch.Tensor] = None,
    blocked: bool = False,
    views: Optional[Callable] = None,
) -> dict[str, torch.Tensor]:
    r"""Magnitudes that first-order rounding-error bounds of the scan are proportional to.

    With :math:`P_{j,t} = \prod_{j<k\le t} |a_k|`, a sequential loop rounds the term
    :math:`P_{j,t} x_j` of :math:`h_t` at most :math:`2(t-j+1)` times (a multiply and an add per
    step), so its error is at most :math:`2u\,K_t` with the *step-weighted* magnitude

    .. math:: K_t = \sum_j (t-j+1) P_{j,t} |x_j|  \;(+\,(t+2) P_{-1,t} |h_0|),

    which is itself a scan: :math:`K = \mathrm{scan}(|a|, H)` from :math:`|h_0|`, where
    :math:`H = \mathrm{scan}(|a|, |x|)` from :math:`|h_0|` bounds :math:`|h|`. Unlike the
    classical :math:`2uT\,H_t`, this does not grow with the length when the gates decay.

    The backward pass is the reverse scan of the upstream gradients, so the same weights for the
    gradients come from autograd on the same magnitudes: ``dK_<name>`` is the gradient of
    :math:`\sum |w| K + |w_f| K_f` and ``dH_<name>`` that of :math:`\sum |w| H + |w_f| H_f` with
    respect to ``|gates|``, ``|tokens|``, ``|initial|`` (``w``, ``w_f`` the upstream gradients).
    For the gates, :math:`\partial/\partial a_t = g_t h_{t-1}` and ``dK_gates`` is exactly
    :math:`K^g_t H_{t-1} + G_t K_{t-1}`, the first-order error of that product of two computed
    values; ``dH_gates`` is :math:`G_t H_{t-1}`, the scale of its own rounding.

    Returns float64 tensors ``H``, ``H_final``, ``K``, ``K_final`` and, when ``grad_hidden`` is
    given, ``dH_*`` and ``dK_*`` for ``gates``, ``tokens`` and (if given) ``initial``. With
    ``views``, the scan runs on ``views(gates, tokens, initial)`` (e.g. an ``expand``) and the
    gradients are those of the tensors passed in.
    """
    fn = scan_ref_blocked if blocked else scan_ref
    leaves = {"gates": gates, "tokens": tokens}
    if initial is not None:
        leaves["initial"] = initial
    leaves = {k: v.detach().to(F64).abs().requires_grad_(grad_hidden is not None) for k, v in leaves.items()}
    with torch.enable_grad():
        mag_a, mag_x, mag_h0 = leaves["gates"], leaves["tokens"], leaves.get("initial")
        if views is not None:
            mag_a, mag_x, mag_h0 = views(mag_a, mag_x, mag_h0)
        big_h, big_hf = fn(mag_a, mag_x, dim=dim, reverse=reverse, initial=mag_h0)
        big_k, big_kf = fn(mag_a, big_h, dim=dim, reverse=reverse, initial=mag_h0)
    out = {"H": big_h.detach(), "H_final": big_hf.detach(), "K": big_k.detach(), "K_final": big_kf.detach()}
    if grad_hidden is not None:
        w = grad_hidden.detach().to(F64).abs()
        wf = None if grad_final is None else grad_final.detach().to(F64).abs()
        names = list(leaves)
        for prefix, (val, fin) in {"dH_": (big_h, big_hf), "dK_": (big_k, big_kf)}.items():
            outputs, weights = [val], [w]
            if wf is not None:
                outputs.append(fin)
                weights.append(wf)
            grads = torch.autograd.grad(
                outputs, [leaves[n] for n in names], weights, retain_graph=True, allow_unused=True
            )
            out.update({prefix + n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)})
    return out


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str) -> None:
    """Asserts ``|actual - expected| <= bound`` elementwise; NaN anywhere fails.

    ``bound`` broadcasts against ``expected``. The message gives the worst error/bound ratio and
    the first offending element.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    got = actual.detach().to(F64)
    want = expected.detach().to(device=got.device, dtype=F64)
    limit = torch.as_tensor(bound, dtype=F64, device=got.device).expand(want.shape)
    err = (got - want).abs()
    bad = ~(err <= limit)  # also catches NaN
    if bad.any():
        ratio = (err / limit).nan_to_num(nan=math.inf).max().item()
        index = tuple(int(i) for i in bad.nonzero()[0])
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements exceed the bound; "
            f"worst error/bound = {ratio:.3g}; first at {index}: got {got[index].item():.9g}, "
            f"want {want[index].item():.9g}, bound {limit[index].item():.3g}"
        )
