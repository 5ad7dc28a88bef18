"""The ``(outer, len, inner)`` view every kernel takes, for a tensor of any rank, time axis and
(permuted) strides: one place that decides how inputs are flattened and outputs restored."""

from __future__ import annotations

from typing import Optional, Union

import torch

Tensor = torch.Tensor


def _memory_order(*tensors: Tensor) -> tuple[list[int], bool]:
    """A permutation under which every tensor is C-contiguous and True, or the identity and
    False (a copy is needed).

    Under ``torch.compile`` sizes and strides may be symbolic and cannot be sorted: there the
    identity is used (a non-contiguous input is copied once)."""
    ref = tensors[0]
    identity = list(range(ref.dim()))
    if all(t.is_contiguous() for t in tensors):
        return identity, True
    if torch.compiler.is_compiling():
        return identity, False
    order = sorted(identity, key=lambda d: (-ref.stride(d), -ref.shape[d]))
    if all(t.permute(order).is_contiguous() for t in tensors):
        return order, True
    return identity, False


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _prod(values: Union[list[int], tuple[int, ...]]) -> int:
    """Product of sizes; stays symbolic under torch.compile/export (no ``int()``)."""
    out = 1
    for v in values:
        out = out * v
    return out


class ScanLayout:
    """How tensors shaped like ``like`` with time axis ``dim`` map to C-contiguous
    ``(outer, len, inner)`` (states: ``(outer, inner)``) and back.

    The memory order of the inputs is kept when all of them share one (e.g. a ``(B, L, D)``
    tensor transposed to ``(B, D, L)`` runs as ``(B, L, D)`` without a copy): then ``in_place``
    is True, the kernels can take the inputs' own storage, and ``torch.empty_like`` of an input
    allocates an output in the same order. Otherwise inputs are copied once to the logical
    order."""

    def __init__(self, like: Tensor, dim: int, *others: Tensor) -> None:
        self.shape = like.shape
        self.dim = dim
        self.order, self.in_place = _memory_order(like, *others)
        self.permuted = self.order != list(range(len(self.shape)))
        memory_shape = [self.shape[d] for d in self.order] if self.permuted else self.shape
        t_pos = self.order.index(dim)
        self.shape3 = (_prod(memory_shape[:t_pos]), memory_shape[t_pos], _prod(memory_shape[t_pos + 1 :]))
        self.memory_shape = memory_shape

    @property
    def state_shape(self) -> list[int]:
        """The state's shape: ``like``'s without the time axis."""
        return [s for d, s in enumerate(self.shape) if d != self.dim]

    @property
    def state_order(self) -> list[int]:
        """The state's axes in memory order, as positions among its own (original-order) axes."""
        state_dims = [d for d in range(len(self.shape)) if d != self.dim]
        return [state_dims.index(d) for d in self.order if d != self.dim]

    def flatten(self, t: Tensor) -> Tensor:
        """``t`` (shaped like ``like``) as a contiguous ``(outer, len, inner)`` tensor."""
        return (t.permute(self.order) if self.permuted else t).contiguous().view(self.shape3)

    def flatten_state(self, s: Optional[Tensor]) -> Optional[Tensor]:
        """A state (``like`` without the time axis) as a contiguous ``(outer, inner)`` tensor."""
        if s is None:
            return None
        outer, _, inner = self.shape3
        return (s.permute(self.state_order) if self.permuted else s).contiguous().view(outer, inner)

    def restore(self, t3: Tensor) -> Tensor:
        """The inverse of :meth:`flatten` (a view)."""
        if not self.permuted:
            return t3.view(self.shape)
        return t3.view(self.memory_shape).permute(_inverse(self.order))

    def new_state(self, like: Tensor) -> Tensor:
        """An uninitialized state (``like`` without the time axis) whose storage is the
        contiguous ``(outer, inner)`` the kernels write."""
        outer, _, inner = self.shape3
        return self.restore_state(like.new_empty((outer, inner)))

    def restore_state(self, s2: Tensor) -> Tensor:
        """The inverse of :meth:`flatten_state` (a view)."""
        if not self.permuted:
            return s2.view(self.state_shape)
        memory_state_shape = [self.state_shape[i] for i in self.state_order]
        return s2.view(memory_state_shape).permute(_inverse(self.state_order))


def laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (``like``'s shape) with ``like``'s strides: itself, or a copy (e.g. an incoming
    gradient for an output that the kernels wrote in an input's memory order)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)
