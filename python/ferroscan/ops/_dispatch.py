"""When an operation goes through its torch.library custom op rather than the eager fast path."""

from __future__ import annotations

from typing import Iterable

import torch


def needs_custom_op(tensors: Iterable[torch.Tensor]) -> bool:
    """True while tracing (torch.compile / export) or for tensor subclasses (fake, functional):
    they must see the registered op. Plain eager tensors skip the dispatcher's Python overhead
    (tens of microseconds per call, which dominate short sequences)."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)
