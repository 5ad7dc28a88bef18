"""Argument validation shared by every ferroscan operation: one place for dtype rules and
messages, so each bad input raises the same clear exception whichever op receives it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

#: Element types the kernels support, with the names the Rust core uses.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def check_tensor(value: object, arg: str) -> torch.Tensor:
    """Returns ``value`` if it is a tensor with a supported floating dtype, else raises TypeError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in DTYPE_NAMES:
        raise TypeError(
            f"{arg} has dtype {value.dtype}; expected one of float16, bfloat16, float32, float64 "
            "(integer, bool and complex tensors are not supported)"
        )
    return value


def check_same_device(ref: torch.Tensor, ref_arg: str, other: torch.Tensor, arg: str) -> None:
    """Raises ValueError unless ``other`` is on ``ref``'s device."""
    if other.device != ref.device:
        raise ValueError(
            f"{arg} is on {other.device} but {ref_arg} is on {ref.device}; move them to one device"
        )


def check_same_kind(ref: torch.Tensor, ref_arg: str, other: torch.Tensor, arg: str) -> None:
    """Raises TypeError/ValueError unless ``other`` shares ``ref``'s dtype and device."""
    if other.dtype != ref.dtype:
        raise TypeError(f"{arg} has dtype {other.dtype} but {ref_arg} has {ref.dtype}; they must match")
    check_same_device(ref, ref_arg, other, arg)


def check_shape(value: torch.Tensor, arg: str, expected: Sequence[int]) -> None:
    """Raises ValueError unless ``value`` has exactly the shape ``expected``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{arg} has shape {tuple(value.shape)}; expected {tuple(expected)}")


def normalize_dim(dim: int, ndim: int, arg: str = "dim") -> int:
    """Maps a possibly negative axis to ``0..ndim-1``; ValueError when out of range."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{arg} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{arg}={dim} is out of range for a tensor of rank {ndim} (expected {-ndim}..{ndim - 1})")
    return dim % ndim


def check_state(
    state: Optional[torch.Tensor], arg: str, expected_shape: Sequence[int], like: torch.Tensor, like_arg: str
) -> Optional[torch.Tensor]:
    """Validates an optional per-step state (e.g. ``initial``) against the expected shape."""
    if state is None:
        return None
    check_tensor(state, arg)
    check_same_kind(like, like_arg, state, arg)
    if tuple(state.shape) != tuple(expected_shape):
        raise ValueError(
            f"{arg} has shape {tuple(state.shape)}; expected {tuple(expected_shape)} "
            f"(the shape of {like_arg} without the time axis)"
        )
    return state


def broadcast_to_like(value: torch.Tensor, arg: str, like: torch.Tensor, like_arg: str) -> torch.Tensor:
    """``value`` expanded to ``like``'s shape (a view); ValueError naming ``arg`` unless its shape
    equals ``like``'s or broadcasts to it without growing it."""
    if value.shape == like.shape:
        return value
    try:
        fits = torch.broadcast_shapes(value.shape, like.shape) == like.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{arg} has shape {tuple(value.shape)} but {like_arg} has {tuple(like.shape)}; "
            f"{arg} must have the shape of {like_arg} or broadcast to it"
        )
    return value.expand(like.shape)


def check_has_time_axis(value: torch.Tensor, arg: str) -> None:
    """ValueError unless ``value`` has at least one dimension."""
    if value.dim() == 0:
        raise ValueError(f"{arg} must have at least one dimension (the time axis); got a 0-d tensor")
