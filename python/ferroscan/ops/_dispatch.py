"""The eager fast path of every operation: when it must go through its torch.library custom op
instead, and the backward wrapper its autograd Functions share."""

from __future__ import annotations

import functools
from typing import Callable, Iterable, TypeVar

import torch
from torch.autograd.function import once_differentiable

Backward = TypeVar("Backward", bound=Callable[..., tuple])


def needs_custom_op(tensors: Iterable[torch.Tensor]) -> bool:
    """True while tracing (torch.compile / export) or for tensor subclasses (fake, functional):
    they must see the registered op. Plain eager tensors skip the dispatcher's Python overhead
    (tens of microseconds per call, which dominate short sequences)."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def once_differentiable_fast(backward: Backward) -> Backward:
    """``torch.autograd.function.once_differentiable`` without its cost where it does nothing.

    A plain backward runs with grad mode off, so ``backward`` records nothing and runs as it
    is; PyTorch's wrapper would still enter ``no_grad`` and check the inputs (about 20 us per
    call on the H100 machine's host, a sixth of a short sequence's forward+backward). Under
    ``create_graph=True`` the call goes through PyTorch's wrapper, whose outputs raise on a
    second backward instead of giving silently wrong higher derivatives."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: object, *grads: object) -> tuple:
        if torch.is_grad_enabled():
            return guarded(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper  # type: ignore[return-value]
