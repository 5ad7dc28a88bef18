r"""Context parallelism: one recurrence whose time axis is sharded over the ranks of a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Each rank of ``group`` holds a contiguous slice of the time axis, in rank order (rank 0 the first
steps). :func:`scan`, :func:`gated_scan` and :func:`selective_scan` return on every rank its
slice of the result that the single-device operation gives on the concatenated sequence, and
their gradients are that result's gradients (conventions for replicated inputs below).

Method
------
All three operations are diagonal linear recurrences in a state :math:`h` (shape ``S``):
:math:`h_t = \alpha_t \odot h_{t-1} + \beta_t` with :math:`\alpha_t = a_t` for ``scan`` and
``gated_scan`` and :math:`\alpha_t = \exp(\Delta_t A)` for ``selective_scan``. A slice of steps
therefore maps its incoming state :math:`c` to its end state *affinely*,

.. math::

    h_\text{end} = P \odot c + E, \qquad P = \prod_{t \in \text{slice}} \alpha_t, \qquad
    E = h_\text{end}\big|_{c = 0},

(for ``selective_scan`` :math:`P = \exp(A \sum_t \Delta_t)`, per (batch, dim, N)). The pair
:math:`(P, E)` is the slice's *transfer*. Numbering the ranks in scan order :math:`k = 0..R-1`
(group rank order, reversed when ``reverse=True``):

1. Every rank but the first computes its transfer: :math:`P_k` by a product (or a sum of
   :math:`\Delta`) over its slice, :math:`E_k` by scanning its slice from a zero state. The first
   rank scans its slice from ``initial`` straight away: its result is final, and its
   :math:`E_0` is its true end state (:math:`P_0` is not needed and sent as zeros).
2. **One** ``all_gather`` of the stacked :math:`(P_k, E_k)`: :math:`2|S|` elements per rank,
   independent of the sequence length.
3. Every rank folds the transfers of the ranks before it into its incoming state,
   :math:`c_0 = 0,\ c_{k+1} = P_k \odot c_k + E_k` (where :math:`c_k = 0` exactly this is
   :math:`E_k`, so an infinite :math:`P_k` cannot turn it into NaN), and rescans its slice with
   ``initial`` = :math:`c_k`. Every rank also folds all :math:`R` transfers: :math:`c_R` is the
   final state, the same bits on every rank.

Backward mirrors it in the opposite direction. With :math:`\bar g` the gradient arriving at a
rank's outputs and :math:`u_k = \partial\mathcal{L}/\partial c_{k+1}` the gradient arriving at
the end state of slice :math:`k` from everything after it,

.. math::

    \frac{\partial\mathcal{L}}{\partial c_k} = P_k \odot u_k + B_k, \qquad
    B_k = \frac{\partial\mathcal{L}}{\partial c_k}\Big|_{u_k = 0}, \qquad
    u_{R-1} = \sum_{\text{ranks}} \bar g_\text{final},

because :math:`\partial h_\text{end} / \partial c = \operatorname{diag}(P)`. Every rank but the
first computes :math:`B_k` (a backward pass of its slice with no gradient at its end state);
**one** ``all_gather`` of the stacked :math:`(B_k, \bar g_{\text{final},k})` (:math:`2|S|`
elements per rank); every rank folds :math:`u_k` from the ranks after it and runs the backward of
its slice once more with :math:`u_k` at its end state. That yields the gradients of its inputs,
including every term through the states of later ranks: the global computation is a chain of
slices, and each slice's backward is given the exact gradient at its end. The local graph is kept
from the forward (nothing is recomputed), and :math:`P_k` from the forward's gather.

Cost per call, with :math:`|S|` the state's element count (``scan``/``gated_scan``: the input's
element count divided by its local length; ``selective_scan``: batch x dim x N) and :math:`s` the
bytes of the transfer dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64):

* communication: one ``all_gather`` forward and one backward, each rank contributing
  :math:`2|S|s` bytes and receiving :math:`2(R-1)|S|s`; with ``validate=True`` (the default)
  the forward adds one ``all_gather`` of a descriptor of :data:`DESCRIPTOR_LEN` int64 per rank;
* computation: two local passes forward and two backward (one each on the first rank), plus
  :math:`O(R|S|)` for the folds.

Conventions
-----------
* **Slices** are contiguous and in group rank order; their lengths may differ between ranks (and
  be zero). All other axes must agree across ranks; so must dtypes, devices (CPU or CUDA),
  ``reverse`` and ``delta_softplus``.
* ``initial`` enters where the scan starts: it is read **only on rank 0** (on the last rank with
  ``reverse=True``); elsewhere it may be ``None`` or any tensor of the right shape (ignored).
  The usual case is to pass the same (replicated) tensor on every rank: its gradient arrives on
  the starting rank in full and is zero on the others, so summing over ranks gives the
  single-device gradient.
* **Replicated inputs** (anything not sharded along time: ``selective_scan``'s ``A``, ``D``,
  ``delta_bias`` and time-invariant ``B``/``C``; gates of ``scan``/``gated_scan`` broadcast along
  the time axis): every rank passes the same values and receives, as its gradient, the
  contribution of its own slice, including that slice's effect on every later state. The
  single-device gradient is the sum over ranks — all-reduce it, as data parallelism does (e.g.
  DDP, or ``torch.distributed.all_reduce(p.grad)``).
* ``return_final``: the final state of the whole sequence (the last rank's, or rank 0's when
  reversed), computed by the fold on every rank and identical on all of them (it equals the last
  state of the scan up to rounding). Its gradient is the sum of the gradients every rank sends
  to its copy.
* **The backward is collective.** When any rank differentiates (gradients enabled and some input
  requiring grad), every rank's outputs require grad and every rank must run a backward through
  them (e.g. by including them in its loss), as with DDP. With ``validate=True`` a rank whose
  inputs do not require grad is told by the others; with ``validate=False`` every rank must
  agree by itself.
* **Validation.** With ``validate=True``, every rank first checks its arguments locally and then
  all ranks exchange a small descriptor (argument status, op, dtype, device, ``reverse``, state
  shape, grad mode): a bad argument on one rank, or a mismatch between ranks, raises a clear
  exception on *every* rank instead of a hang (gloo aborts the process on a size mismatch; NCCL
  hangs). This costs one more small collective and, on CUDA, a host synchronization. With
  ``validate=False`` the forward is one collective and never synchronizes the host, but a
  mismatch is undetected (a bad argument still raises locally, and the other ranks then wait for
  the process group's timeout).
* A group of one rank runs the single-device operation (no communication).
* Half types (float16/bfloat16): ``gated_scan`` computes and carries states in float32, like the
  single-device op. ``scan`` takes its state in the input dtype, so each rank's incoming state is
  rounded once to it (the rounding its output gets anyway).
* Double backward is not supported.

Status: values and gradients are tested against the single-process result with the gloo backend
on 2 and 3 CPU processes (``tests/test_distributed.py``). The NCCL path is the same code (its tests
are marked ``cuda`` and need 2+ GPUs) and has not yet been run on a multi-GPU machine.
:func:`selective_scan` needs ``ferroscan.selective_scan``; until it exists, its tests are skipped and
its distributed wiring is tested with a plain float64 stand-in for the local op. Eager mode only
(``torch.compile`` does not trace the collectives).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ._checks import (
    DTYPE_NAMES,
    broadcast_to_like,
    check_has_time_axis,
    check_same_kind,
    check_state,
    normalize_dim,
)
from ._context_parallel import DESCRIPTOR_LEN, Recurrence, require_tensor, run, work_dtype
from .ops.gated_scan import gated_scan as _local_gated_scan
from .ops.scan import scan as _local_scan

Tensor = torch.Tensor

__all__ = ["scan", "gated_scan", "selective_scan", "DESCRIPTOR_LEN"]


# ---------------------------------------------------------------------------------------------
# Public operations
# ---------------------------------------------------------------------------------------------


def scan(
    gates: Tensor,
    tokens: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = -1,
    reverse: bool = False,
    initial: Optional[Tensor] = None,
    return_final: bool = False,
    validate: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r""":func:`ferroscan.scan` with the time axis sharded over the ranks of ``group``.

    .. math::

        h_t = a_t h_{t-1} + x_t \quad (\text{reversed: } h_t = a_t h_{t+1} + x_t)

    over the concatenation of every rank's slice (rank 0 first); returns this rank's slice of
    ``h``. Transfer of a slice: :math:`P = \prod_t a_t`, :math:`E` its end state from zero (see the
    module docstring for the method, the costs and the conventions).

    Args:
        gates: :math:`a`, this rank's slice, the shape of ``tokens`` or broadcastable to it (a gate
            broadcast along the time axis is a replicated input: its gradient here is this
            slice's contribution; sum it over ranks).
        tokens: :math:`x`, this rank's slice; any rank >= 1, float16 / bfloat16 / float32 /
            float64, on CPU (gloo) or CUDA (NCCL). Only the length along ``dim`` may differ
            between ranks.
        group: the process group (default: the world group).
        dim: the time axis.
        reverse: scan from the last step of the last rank to the first step of rank 0.
        initial: :math:`h_0`, shaped like ``tokens`` without ``dim``; read only on the rank where
            the scan starts (rank 0, or the last rank when reversed), ignored elsewhere (may be
            None there); its gradient arrives on that rank.
        return_final: also return the state after the last step of the whole sequence, identical
            on every rank.
        validate: check arguments across ranks first (one extra small collective; see the module
            docstring). ``False``: exactly one collective forward and one backward.

    Returns:
        ``h`` (this rank's slice), or ``(h, h_final)`` with ``return_final``.
    """
    name = "ferroscan.distributed.scan"

    def make() -> tuple[Recurrence, Optional[Tensor], list[Optional[Tensor]]]:
        x = require_tensor(tokens, "tokens")
        a = require_tensor(gates, "gates")
        check_same_kind(x, "tokens", a, "gates")
        check_has_time_axis(x, "tokens")
        broadcast_to_like(a, "gates", x, "tokens")
        axis = normalize_dim(dim, x.dim())
        if not isinstance(return_final, bool):
            raise TypeError(f"return_final must be a bool, got {type(return_final).__name__}")
        state_shape = tuple(s for d, s in enumerate(x.shape) if d != axis)
        h0 = None if initial is None else check_state(require_tensor(initial, "initial"), "initial",
                                                      state_shape, x, "tokens")  # fmt: skip
        fold = work_dtype(x.dtype)

        def run(inp: Sequence[Optional[Tensor]], state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
            return _local_scan(inp[0], inp[1], dim=axis, reverse=reverse, initial=state, return_final=True)

        def multiplier(inp: Sequence[Optional[Tensor]]) -> Tensor:
            return torch.prod(inp[0].expand(inp[1].shape), dim=axis, dtype=fold)

        rec = Recurrence(name, 1, 0, "tokens without its time axis", state_shape, x.dtype, fold, x.dtype,
                          x.device, int(x.shape[axis]), run, multiplier)  # fmt: skip
        return rec, h0, [a, x]

    out, final = run(name, group, reverse, validate, make)
    return (out, final) if return_final else out


def gated_scan(
    x: Tensor,
    a: Tensor,
    b: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 1,
    reverse: bool = False,
    initial: Optional[Tensor] = None,
    return_final: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    validate: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r""":func:`ferroscan.gated_scan` with the time axis sharded over the ranks of ``group``.

    .. math::

        h_t = a_t h_{t-1} + b_t x_t, \qquad y_t = c_t h_t

    over the concatenation of every rank's slice (rank 0 first; ``reverse=True``:
    :math:`h_t = a_t h_{t+1} + b_t x_t`); returns this rank's slice of ``y``. Transfer of a
    slice: :math:`P = \prod_t a_t`, :math:`E` its end state from zero, carried in float32 for half
    inputs (see the module docstring for the method, the costs and the conventions).

    Args:
        x: inputs, this rank's slice (default layout ``(B, L, D)``, ``dim=1``); only the length
            along ``dim`` may differ between ranks.
        a: gates, the shape of ``x`` or broadcastable to it.
        b: input gates, like ``a``; None means 1.
        c: output gates, like ``a``; None means 1. Gates broadcast along the time axis are
            replicated inputs: their gradient here is this slice's contribution (sum over ranks).
        group: the process group (default: the world group).
        dim: the time axis.
        reverse: scan from the last step of the last rank to the first step of rank 0.
        initial: :math:`h_0`, shaped like ``x`` without ``dim``; read only on the rank where the
            scan starts (rank 0, or the last rank when reversed).
        return_final: also return the final state of the whole sequence (not multiplied by
            ``c``), identical on every rank, in ``x``'s dtype.
        out_dtype: dtype of ``y`` (default: ``x``'s).
        validate: check arguments across ranks first (see the module docstring).

    Returns:
        ``y`` (this rank's slice), or ``(y, h_final)`` with ``return_final``.
    """
    name = "ferroscan.distributed.gated_scan"

    def make() -> tuple[Recurrence, Optional[Tensor], list[Optional[Tensor]]]:
        xs = require_tensor(x, "x")
        check_has_time_axis(xs, "x")
        gates = []
        for value, arg in ((a, "a"), (b, "b"), (c, "c")):
            if value is None and arg != "a":
                gates.append(None)
                continue
            if value is None:
                raise TypeError("a must be a tensor, got None")
            require_tensor(value, arg)
            check_same_kind(xs, "x", value, arg)
            broadcast_to_like(value, arg, xs, "x")
            gates.append(value)
        if out_dtype is not None and out_dtype not in DTYPE_NAMES:
            raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64, got {out_dtype}")
        if not isinstance(return_final, bool):
            raise TypeError(f"return_final must be a bool, got {type(return_final).__name__}")
        axis = normalize_dim(dim, xs.dim())
        state_shape = tuple(s for d, s in enumerate(xs.shape) if d != axis)
        h0 = None if initial is None else check_state(require_tensor(initial, "initial"), "initial",
                                                      state_shape, xs, "x")  # fmt: skip
        work = work_dtype(xs.dtype)
        y_dtype = out_dtype or xs.dtype

        def run(inp: Sequence[Optional[Tensor]], state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
            cast = [None if t is None else t.to(work) for t in inp]
            return _local_gated_scan(*cast, dim=axis, reverse=reverse, return_final=True, out_dtype=y_dtype,
                                    initial=None if state is None else state.to(work))  # fmt: skip

        def multiplier(inp: Sequence[Optional[Tensor]]) -> Tensor:
            return torch.prod(inp[1].expand(inp[0].shape), dim=axis, dtype=work)

        rec = Recurrence(name, 2, 0, "x without its time axis", state_shape, work, work, xs.dtype,
                          xs.device, int(xs.shape[axis]), run, multiplier)  # fmt: skip
        return rec, h0, [xs, *gates]

    out, final = run(name, group, reverse, validate, make)
    return (out, final) if return_final else out


def _local_selective_scan() -> Callable:
    """``ferroscan.selective_scan`` (looked up at call time), or NotImplementedError."""
    import ferroscan

    fn = getattr(ferroscan, "selective_scan", None)
    if fn is None:
        raise NotImplementedError(
            "ferroscan.distributed.selective_scan runs ferroscan.selective_scan on each rank's slice, and this "
            "build of ferroscan does not have ferroscan.selective_scan yet"
        )
    return fn


def _optional_vector(value: Optional[Tensor], arg: str, channels: int, u: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    require_tensor(value, arg)
    if tuple(value.shape) != (channels,):
        raise ValueError(f"{arg} has shape {tuple(value.shape)}; expected ({channels},) (one value per channel of u)")
    if value.device != u.device:
        raise ValueError(f"{arg} is on {value.device} but u is on {u.device}; move them to one device")
    return value


def _selective_kind(value: object, arg: str, u: Tensor, state_n: int) -> int:
    """0: time-invariant ``(dim, N)``; 1: ``(batch, N, L)``; 2: grouped ``(batch, G, N, L)``."""
    t = require_tensor(value, arg)
    if t.device != u.device:
        raise ValueError(f"{arg} is on {t.device} but u is on {u.device}; move them to one device")
    batch, channels, length = u.shape
    if t.dim() == 2 and tuple(t.shape) == (channels, state_n):
        return 0
    if t.dim() == 3 and tuple(t.shape) == (batch, state_n, length):
        return 1
    if t.dim() == 4 and (t.shape[0], t.shape[2], t.shape[3]) == (batch, state_n, length) and t.shape[1] > 0 \
            and channels % t.shape[1] == 0:  # fmt: skip
        return 2
    raise ValueError(
        f"{arg} has shape {tuple(t.shape)}; expected ({channels}, {state_n}) (time-invariant, replicated on every "
        f"rank), ({batch}, {state_n}, {length}) or ({batch}, G, {state_n}, {length}) with G dividing {channels} "
        "(this rank's time slice)"
    )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803 (Mamba's names)
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Optional[Tensor] = None,  # noqa: N803
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    validate: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r""":func:`ferroscan.selective_scan` (Mamba's S6) with the time axis sharded over ``group``.

    .. math::

        \Delta_t = \operatorname{softplus}(\delta_t + \text{bias}) \ (\text{or } \delta_t + \text{bias}),
        \quad h_t = \exp(\Delta_t A) \odot h_{t-1} + \Delta_t B_t u_t, \quad
        y_t = (C_t \cdot h_t + D u_t) \cdot \operatorname{silu}(z_t)

    over the concatenation of every rank's slice (rank 0 first); returns this rank's slice of
    ``y``. Transfer of a slice, per (batch, dim, N): :math:`P = \exp(A \sum_t \Delta_t)` and
    :math:`E` its end state from zero (see the module docstring). Each rank runs
    ``ferroscan.selective_scan(..., return_last_state=True, initial_state=...)`` on its slice, so
    that operation must exist (NotImplementedError otherwise) and be differentiable in
    ``initial_state``.

    Args:
        u, delta, z: ``(batch, dim, L)``, this rank's slice (``L`` may differ between ranks).
        A: ``(dim, N)``, replicated. B, C: ``(dim, N)`` (replicated) or this rank's slice of
            ``(batch, N, L)`` / ``(batch, G, N, L)``. D, delta_bias: ``(dim,)``, replicated. The
            gradient of a replicated input is this slice's contribution: sum it over ranks.
        delta_softplus: apply softplus to :math:`\delta + \text{bias}`; must agree across ranks.
        return_last_state: also return the final state ``(batch, dim, N)`` of the whole sequence
            (float32, float64 for float64 inputs), identical on every rank.
        initial_state: ``(batch, dim, N)``, read only on rank 0 (ignored elsewhere).
        group: the process group (default: the world group).
        validate: check arguments across ranks first (see the module docstring).

    Returns:
        ``y`` (this rank's slice), or ``(y, last_state)`` with ``return_last_state``.
    """
    name = "ferroscan.distributed.selective_scan"

    def make() -> tuple[Recurrence, Optional[Tensor], list[Optional[Tensor]]]:
        impl = _local_selective_scan()
        us = require_tensor(u, "u")
        if us.dim() != 3:
            raise ValueError(f"u has shape {tuple(us.shape)}; expected (batch, dim, L), this rank's slice of L")
        batch, channels, length = (int(s) for s in us.shape)
        ds = require_tensor(delta, "delta")
        if ds.shape != us.shape or ds.device != us.device:
            raise ValueError(f"delta has shape {tuple(ds.shape)} on {ds.device}; expected u's, {tuple(us.shape)} "
                             f"on {us.device}")  # fmt: skip
        a_mat = require_tensor(A, "A")
        if a_mat.dim() != 2 or a_mat.shape[0] != channels or a_mat.device != us.device:
            raise ValueError(f"A has shape {tuple(a_mat.shape)} on {a_mat.device}; expected ({channels}, N) on "
                             f"{us.device}")  # fmt: skip
        state_n = int(a_mat.shape[1])
        kind_b = _selective_kind(B, "B", us, state_n)
        kind_c = _selective_kind(C, "C", us, state_n)
        d_vec = _optional_vector(D, "D", channels, us)
        bias = _optional_vector(delta_bias, "delta_bias", channels, us)
        if z is not None:
            require_tensor(z, "z")
            if z.shape != us.shape or z.device != us.device:
                raise ValueError(f"z has shape {tuple(z.shape)} on {z.device}; expected u's, {tuple(us.shape)} "
                                 f"on {us.device}")  # fmt: skip
        for value, arg in ((delta_softplus, "delta_softplus"), (return_last_state, "return_last_state")):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool, got {type(value).__name__}")
        state_shape = (batch, channels, state_n)
        fold = torch.float64 if us.dtype == torch.float64 else torch.float32
        h0 = None
        if initial_state is not None:
            h0 = require_tensor(initial_state, "initial_state")
            if tuple(h0.shape) != state_shape or h0.device != us.device:
                raise ValueError(f"initial_state has shape {tuple(h0.shape)} on {h0.device}; expected "
                                 f"{state_shape} (batch, dim, N) on {us.device}")  # fmt: skip
        flags = int(delta_softplus) | kind_b << 1 | kind_c << 3
        flags |= (d_vec is not None) << 5 | (z is not None) << 6 | (bias is not None) << 7

        def run(inp: Sequence[Optional[Tensor]], state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
            uu, dd, aa, bb, cc, dv, zz, db = inp
            return impl(uu, dd, aa, bb, cc, D=dv, z=zz, delta_bias=db, delta_softplus=delta_softplus,
                        return_last_state=True, initial_state=state)  # fmt: skip

        def multiplier(inp: Sequence[Optional[Tensor]]) -> Tensor:
            step = inp[1].to(fold)
            if inp[7] is not None:
                step = step + inp[7].to(fold)[:, None]
            if delta_softplus:
                step = torch.nn.functional.softplus(step)
            return torch.exp(inp[2].to(fold)[None] * step.sum(-1)[..., None])

        rec = Recurrence(name, 3, flags, "(batch, dim, N) of u and A", state_shape, fold, fold, fold,
                          us.device, length, run, multiplier)  # fmt: skip
        return rec, h0, [us, ds, a_mat, B, C, d_vec, z, bias]

    out, final = run(name, group, False, validate, make)
    return (out, final) if return_last_state else out
