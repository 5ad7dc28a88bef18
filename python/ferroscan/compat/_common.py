"""Argument handling shared by the compatibility modules (the peers' calling conventions)."""

from __future__ import annotations

import torch


def prepare(
    gates: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Check shapes and bring ``gates`` and ``tokens`` to one (promoted) dtype.

    Returns the converted pair and the result dtype (that of ``tokens``).
    """
    if not isinstance(gates, torch.Tensor) or not isinstance(tokens, torch.Tensor):
        raise TypeError("gates and tokens must be torch.Tensor")
    if gates.shape != tokens.shape:
        raise ValueError(
            f"gates and tokens must have the same shape, got {tuple(gates.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    if tokens.dim() == 0:
        raise ValueError("gates and tokens need at least one (time) axis, the last one")
    out_dtype = tokens.dtype
    if gates.dtype != tokens.dtype:
        common = torch.promote_types(gates.dtype, tokens.dtype)
        gates, tokens = gates.to(common), tokens.to(common)
    return gates, tokens, out_dtype
