"""The machinery of :mod:`ferroscan.distributed` (context parallelism), shared by its operations.

An operation describes one rank's slice as a :class:`Recurrence` (how to run the slice from a
given state, and the slice's multiplier :math:`P`); :func:`run` checks the arguments across ranks
and runs the forward of the method described in :mod:`ferroscan.distributed`, through
:class:`_ContextParallel` (one autograd node per rank) when anything is differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ._checks import DTYPE_NAMES, check_tensor
from .ops._dispatch import once_differentiable_fast

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# The recurrence as one rank sees it, and the group
# ---------------------------------------------------------------------------------------------

#: Callable running one rank's slice: ``(inputs, state) -> (output, end_state)``, differentiable
#: in the inputs and the state (``state=None`` means zeros, or no ``initial``).
RunSlice = Callable[[Sequence[Optional[Tensor]], Optional[Tensor]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Recurrence:
    """One operation on one rank's slice: what the context-parallel machinery needs of it."""

    name: str  #: public name, for messages ("ferroscan.distributed.scan")
    code: int  #: operation id exchanged in the descriptor
    flags: int  #: options that must agree across ranks (bit field)
    state_arg: str  #: how messages name the state's shape
    state_shape: tuple[int, ...]
    state_dtype: torch.dtype  #: dtype the local op takes its incoming state in
    fold_dtype: torch.dtype  #: dtype of the transfers, the folds and the communication
    final_dtype: torch.dtype  #: dtype of the returned final state
    device: torch.device
    length: int  #: local slice length (reported, not checked)
    run: RunSlice
    multiplier: Callable[[Sequence[Optional[Tensor]]], Tensor]  #: P, shaped like the state


@dataclass(frozen=True)
class _Group:
    """A process group seen from this rank, with the scan order of its ranks."""

    group: dist.ProcessGroup
    rank: int
    world: int
    reverse: bool

    @property
    def order(self) -> list[int]:
        """Group ranks in scan order (the rank holding the first step scanned first)."""
        return list(range(self.world - 1, -1, -1)) if self.reverse else list(range(self.world))

    @property
    def pos(self) -> int:
        """This rank's position in scan order."""
        return self.world - 1 - self.rank if self.reverse else self.rank


def _resolve_group(group: Optional[dist.ProcessGroup], reverse: object, name: str) -> _Group:
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    if not dist.is_available():
        raise RuntimeError(f"{name} needs torch.distributed, which this PyTorch build does not include")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{name} needs torch.distributed to be initialized: call torch.distributed.init_process_group(...) "
            "on every rank first (backend 'nccl' for CUDA tensors, 'gloo' for CPU tensors)"
        )
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to non-members
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group passed")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group passed")
    return _Group(group, rank, dist.get_world_size(group), reverse)


def _gather(grp: _Group, tensor: Tensor) -> list[Tensor]:
    """``tensor`` of every rank, in scan order (one ``all_gather``)."""
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(grp.world)]
    dist.all_gather(out, tensor, group=grp.group)
    return [out[r] for r in grp.order]


def _affine(mul: Tensor, carry: Tensor, add: Tensor) -> Tensor:
    """``mul * carry + add``, where ``carry == 0`` gives ``add`` exactly (as a scan from a zero
    state does) even when ``mul`` is infinite."""
    return torch.where(carry == 0, add, torch.addcmul(add, mul, carry))


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    """What the backward needs: the local autograd graph kept from the forward, its leaves, and
    the multipliers of all ranks (scan order)."""

    out: Tensor
    end: Tensor
    leaves: list[Optional[Tensor]]
    initial_leaf: Optional[Tensor]
    state_leaf: Optional[Tensor]
    multipliers: list[Tensor]


def _leaf(t: Optional[Tensor], build: bool) -> Optional[Tensor]:
    return None if t is None else t.detach().requires_grad_(build and t.requires_grad)


def _forward(
    rec: Recurrence, grp: _Group, initial: Optional[Tensor], inputs: Sequence[Optional[Tensor]], build: bool
) -> tuple[Tensor, Tensor, Optional[_Graph]]:
    """Steps 1-3 of the method; with ``build`` the local graph for the backward is kept."""
    start = grp.pos == 0
    leaves = [_leaf(t, build) for t in inputs]
    grad_mode = torch.enable_grad() if build else torch.no_grad()
    initial_leaf = _leaf(initial, build) if start else None
    if start:
        multiplier = torch.zeros(rec.state_shape, dtype=rec.fold_dtype, device=rec.device)  # never used
        with grad_mode:
            out, end = rec.run(leaves, initial_leaf)
        end_from_zero = end.detach()
    else:
        with torch.no_grad():
            detached = [None if t is None else t.detach() for t in inputs]
            multiplier = rec.multiplier(detached).to(rec.fold_dtype)
            _, end_from_zero = rec.run(detached, None)
    transfers = _gather(grp, torch.stack([multiplier, end_from_zero.to(rec.fold_dtype)]))
    carry = torch.zeros(rec.state_shape, dtype=rec.fold_dtype, device=rec.device)
    incoming = carry
    for k, transfer in enumerate(transfers):
        if k == grp.pos:
            incoming = carry
        carry = _affine(transfer[0], carry, transfer[1])
    state_leaf = None
    if not start:
        state_leaf = incoming.detach().to(rec.state_dtype).requires_grad_(build)
        with grad_mode:
            out, end = rec.run(leaves, state_leaf)
    final = carry.to(rec.final_dtype)
    if not build:
        return out, final, None
    graph = _Graph(out, end, leaves, initial_leaf, state_leaf, [t[0] for t in transfers])
    return out.detach(), final, graph


def _grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor],
          retain_graph: bool = False) -> list[Optional[Tensor]]:  # fmt: skip
    """``torch.autograd.grad`` over the outputs that are part of the graph (an output that does not
    require grad, e.g. an empty slice's, contributes nothing); None for unreached inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                    retain_graph=retain_graph, allow_unused=True))  # fmt: skip


def _backward(rec: Recurrence, grp: _Group, graph: _Graph, grad_out: Tensor, grad_final: Tensor) -> list:
    """The mirrored backward: gradients for ``initial`` and each input (None where not needed)."""
    start = grp.pos == 0
    zeros = torch.zeros(rec.state_shape, dtype=rec.fold_dtype, device=rec.device)
    if start:
        local = zeros
    else:
        (local,) = _grad([graph.out], [graph.state_leaf], [grad_out], retain_graph=True)
        local = zeros if local is None else local.to(rec.fold_dtype)
    gathered = _gather(grp, torch.stack([local, grad_final.to(rec.fold_dtype)]))
    into_end = zeros
    for pair in gathered:
        into_end = into_end + pair[1]
    for k in range(grp.world - 1, grp.pos, -1):
        into_end = _affine(graph.multipliers[k], into_end, gathered[k][0])
    targets = [graph.initial_leaf, *graph.leaves]
    wanted = [i for i, t in enumerate(targets) if t is not None and t.requires_grad]
    grads: list = [None] * len(targets)
    if wanted:
        found = _grad([graph.out, graph.end], [targets[i] for i in wanted], [grad_out, into_end.to(graph.end.dtype)])
        for i, g in zip(wanted, found):
            grads[i] = torch.zeros_like(targets[i]) if g is None else g
    return grads


class _ContextParallel(torch.autograd.Function):
    """The distributed recurrence as one autograd node per rank (forward and backward each do
    one ``all_gather``). ``anchor`` is an empty tensor requiring grad, passed on a rank whose own
    inputs do not require grad while another rank's do, so that its outputs require grad and
    its backward (a collective) runs."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, rec: Recurrence, grp: _Group,  # type: ignore[override]
                anchor: Optional[Tensor], initial: Optional[Tensor],
                *inputs: Optional[Tensor]) -> tuple[Tensor, Tensor]:  # fmt: skip
        out, final, graph = _forward(rec, grp, initial, inputs, build=True)
        ctx.rec, ctx.grp, ctx.graph = rec, grp, graph
        ctx.initial_requires_grad = initial is not None and initial.requires_grad
        ctx.initial_like = initial
        return out, final

    @staticmethod
    @once_differentiable_fast
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor,  # type: ignore[override]
                 grad_final: Tensor) -> tuple:  # fmt: skip
        graph = ctx.graph
        if graph is None:
            raise RuntimeError(
                f"{ctx.rec.name}: trying to backward through it a second time; its local graph was freed "
                "by the first backward (retain_graph is not supported here)"
            )
        ctx.graph = None
        grad_initial, *grad_inputs = _backward(ctx.rec, ctx.grp, graph, grad_out, grad_final)
        if grad_initial is None and ctx.initial_requires_grad:
            grad_initial = torch.zeros_like(ctx.initial_like)  # not the starting rank: zero by convention
        ctx.initial_like = None
        return (None, None, None, grad_initial, *grad_inputs)


# ---------------------------------------------------------------------------------------------
# Cross-rank validation
# ---------------------------------------------------------------------------------------------

_MAX_DIMS = 8
#: int64 entries every rank contributes to the validation ``all_gather``.
DESCRIPTOR_LEN = 9 + _MAX_DIMS
_DTYPES = list(DTYPE_NAMES)
_OPS = {1: "scan", 2: "gated_scan", 3: "selective_scan"}
#: What the flags of each op cover (they must agree across ranks).
_FLAG_NAMES = {
    1: "options",
    2: "options",
    3: "delta_softplus, B/C kinds (time-invariant or per step) or D/z/delta_bias presence",
}
_ERROR = 1  #: descriptor status of a rank whose arguments were rejected
_NO_GRAD, _GRAD_OFF_INPUTS, _GRAD = 0, 1, 2  #: grad modes: disabled; enabled, no input needs it; needed


def _descriptor(rec: Optional[Recurrence], reverse: bool, grad_mode: int) -> list[int]:
    """``[status, op, flags, dtype, device type, reverse, grad mode, length, ndim, dims...]`` (a
    state of more than ``_MAX_DIMS`` axes has its trailing ones multiplied into the last slot)."""
    if rec is None:
        return [_ERROR] + [0] * (DESCRIPTOR_LEN - 1)
    shape = list(rec.state_shape)
    dims = shape[: _MAX_DIMS - 1] + ([math.prod(shape[_MAX_DIMS - 1 :])] if len(shape) >= _MAX_DIMS else [])
    dims += [-1] * (_MAX_DIMS - len(dims))
    device = 1 if rec.device.type == "cuda" else 0
    fields = [0, rec.code, rec.flags, _DTYPES.index(rec.fold_dtype), device, int(reverse), grad_mode, rec.length]
    return fields + [len(shape)] + dims


def _state_repr(row: list[int]) -> str:
    ndim, dims = row[8], row[9:]
    shown = [d for d in dims if d >= 0]
    if ndim > _MAX_DIMS:
        return f"({', '.join(map(str, shown[:-1]))}, ...) [{ndim} axes]"
    return "(" + ", ".join(map(str, shown)) + ("," if len(shown) == 1 else "") + ")"


def _agree(grp: _Group, rec: Optional[Recurrence], error: Optional[BaseException], grad_mode: int,
           name: str, device: torch.device) -> bool:  # fmt: skip
    """One ``all_gather`` of every rank's descriptor; raises on every rank if any rank's arguments
    are bad or the ranks disagree. Returns whether any rank differentiates."""
    desc = torch.tensor(_descriptor(None if error else rec, grp.reverse, grad_mode), dtype=torch.int64, device=device)
    rows = [t.tolist() for t in _gather(grp, desc)]
    by_rank = {r: rows[k] for k, r in enumerate(grp.order)}
    failed = [r for r, row in sorted(by_rank.items()) if row[0] == _ERROR]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{name}: rank(s) {failed} of the group rejected their arguments (their own exceptions say why); "
            "every rank stops before exchanging data"
        )
    assert rec is not None
    mine = by_rank[grp.rank]
    for r, row in sorted(by_rank.items()):
        if row[1] != mine[1]:
            raise ValueError(
                f"{name}: rank {r} called ferroscan.distributed.{_OPS.get(row[1], '?')} while rank {grp.rank} "
                f"called {_OPS[mine[1]]}; every rank of the group must call the same operation"
            )
        if row[3] != mine[3]:
            raise TypeError(
                f"{name}: the inputs of rank {r} are {_DTYPES[row[3]]} (or a dtype carried as it) but those of "
                f"rank {grp.rank} are {_DTYPES[mine[3]]}; every rank must pass the same dtypes"
            )
        if row[4] != mine[4]:
            kinds = ("CPU", "CUDA")
            raise ValueError(
                f"{name}: rank {r} has {kinds[row[4]]} tensors but rank {grp.rank} has {kinds[mine[4]]} tensors; "
                "every rank must use the same kind of device"
            )
        if row[5] != mine[5]:
            raise ValueError(
                f"{name}: reverse={bool(row[5])} on rank {r} but reverse={bool(mine[5])} on rank {grp.rank}; "
                "every rank must pass the same reverse"
            )
        if row[8:] != mine[8:]:
            raise ValueError(
                f"{name}: {rec.state_arg} is {_state_repr(row)} on rank {r} but {_state_repr(mine)} on rank "
                f"{grp.rank}; every rank must have the same sizes on all axes except the time axis "
                "(only the slice lengths may differ)"
            )
        if row[2] != mine[2]:
            raise ValueError(f"{name}: rank {r} and rank {grp.rank} pass different {_FLAG_NAMES[mine[1]]}")
    modes = {row[6] for row in rows}
    if _GRAD in modes and _NO_GRAD in modes:
        no_grad = [r for r, row in sorted(by_rank.items()) if row[6] == _NO_GRAD]
        raise RuntimeError(
            f"{name}: rank(s) {no_grad} run with gradients disabled while another rank differentiates; the "
            "backward pass is collective, so every rank must enable gradients (or none)"
        )
    return _GRAD in modes




# ---------------------------------------------------------------------------------------------
# Driver shared by the public functions
# ---------------------------------------------------------------------------------------------


def _grad_mode(tensors: Sequence[Optional[Tensor]]) -> int:
    if not torch.is_grad_enabled():
        return _NO_GRAD
    return _GRAD if any(t is not None and t.requires_grad for t in tensors) else _GRAD_OFF_INPUTS


def _descriptor_device(grp: _Group, rec: Optional[Recurrence]) -> torch.device:
    """Where the descriptor travels, the same backend on every rank whatever its arguments: the
    CPU when the group has gloo (alone or beside NCCL), else this rank's CUDA device."""
    backend = str(dist.get_backend(grp.group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    if rec is not None and rec.device.type == "cuda":
        return rec.device
    return torch.device("cuda", torch.cuda.current_device())


def run(
    name: str,
    group: Optional[dist.ProcessGroup],
    reverse: object,
    validate: object,
    make: Callable[[], tuple[Recurrence, Optional[Tensor], list[Optional[Tensor]]]],
) -> tuple[Tensor, Tensor]:
    """Checks locally (``make`` builds the recurrence or raises), agrees across ranks, runs."""
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    grp = _resolve_group(group, reverse, name)
    rec, error, initial, inputs = None, None, None, []
    try:
        rec, initial, inputs = make()
    except (TypeError, ValueError, NotImplementedError) as exc:
        if not validate or grp.world == 1:
            raise
        error = exc
    if grp.world == 1:
        out, end = rec.run(inputs, initial)
        return out, end.to(rec.final_dtype)
    # initial counts on every rank (not only where it is read): a replicated initial that requires
    # grad makes every rank differentiate, so all of them take part in the backward's collective.
    mode = _grad_mode([*inputs, initial])
    differentiates = mode == _GRAD
    if validate:
        differentiates = _agree(grp, rec, error, mode, name, _descriptor_device(grp, rec))
    assert rec is not None
    if not differentiates:
        out, final, _ = _forward(rec, grp, initial, inputs, build=False)
        return out, final
    anchor = None
    if mode != _GRAD:
        anchor = torch.empty(0, device=rec.device, requires_grad=True)
    return _ContextParallel.apply(rec, grp, anchor, initial, *inputs)


def require_tensor(value: object, arg: str) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    return check_tensor(value, arg)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (which are storage only), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
