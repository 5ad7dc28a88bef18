r"""Drop-in replacement for the ``quick_ssm`` package's scan, built on :func:`ferroscan.gated_scan`.

``quick_ssm`` (the Triton gated-SSM scan of the Birdie project) computes, for tensors of shape
``(B, L, D)`` with time on axis 1,

.. math::

    h_t = a_t \, h_{t-1} + b_t \, x_t, \qquad y_t = c_t \, h_t, \qquad h_{-1} = 0,

through ``quick_ssm.scan`` (``quick_ssm.scan_interface.scan``)::

    scan(x, a, b, c, *, block_l=256, checkpoint=True, tile_b=None, tile_d=None,
         backend="auto", out_dtype=None) -> y

It returns ``y`` only (never ``h`` or the final state), shaped like ``x``, in ``out_dtype``
(default: ``x.dtype``), and is differentiable in ``x``, ``a``, ``b`` and ``c``. This module
provides the same function, with the same signature, defaults and return convention.
"""

from __future__ import annotations

from typing import Optional

import torch

import ferroscan

__all__ = ["scan", "BACKENDS"]

#: The values ``quick_ssm.scan`` accepts for ``backend``.
BACKENDS = ("auto", "triton", "torch")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_int(value: object, arg: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "None or an int" if optional else "an int"
        raise TypeError(f"{arg} must be {kind}, got {type(value).__name__}")


def scan(
    x: torch.Tensor,
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    c: Optional[torch.Tensor],
    *,
    block_l: int = 256,
    checkpoint: bool = True,
    tile_b: Optional[int] = None,
    tile_d: Optional[int] = None,
    backend: str = "auto",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    r"""Gated scan along axis 1, with ``quick_ssm.scan``'s signature and results.

    Computes :math:`h_t = a_t h_{t-1} + b_t x_t` from :math:`h_{-1} = 0` and returns
    :math:`y_t = c_t h_t`, time on axis 1 of ``(B, L, D)`` tensors.

    The tuning knobs are accepted for compatibility and validated as ``quick_ssm`` uses them,
    but not needed: ferroscan picks its own blocking, never tiles the batch or feature axes in
    Python, and autograd keeps what the backward pass needs.

    * ``block_l``: a positive int (quick_ssm's Triton time block);
    * ``checkpoint``: a bool (quick_ssm's recompute-in-backward switch);
    * ``tile_b`` / ``tile_d``: None or an int (quick_ssm's batch / feature tiles; a value
      ``<= 0`` or ``>=`` the extent means no tiling there, as in quick_ssm);
    * ``backend``: one of ``"auto"``, ``"triton"``, ``"torch"`` (anything else raises
      ValueError, as quick_ssm does); every choice runs ferroscan, on any device.

    Restrictions of ``quick_ssm`` lifted here:

    * any sequence length ``L`` (quick_ssm's Triton path documents powers of two only);
    * CPU tensors with any ``backend`` (quick_ssm's ``"triton"`` needs CUDA, and its CPU
      ``"torch"`` fallback is a Python loop over batch and time);
    * float64 is computed in float64 (quick_ssm's Triton path computes everything in float32);
    * any strides (quick_ssm copies tiles to contiguous buffers);
    * any rank >= 2, time on axis 1: ``(B, L)``, ``(B, L, D)``, ``(B, L, D1, D2, ...)``;
    * ``a``, ``b``, ``c`` may be any shape that broadcasts to ``x`` (quick_ssm needs all four
      the same shape); ``b`` / ``c`` may be None, meaning 1;
    * ``x``, ``a``, ``b``, ``c`` may differ in dtype: the scan runs in their promoted dtype
      (float16 / bfloat16 in float32), ``y`` has ``out_dtype`` (default ``x.dtype``) and each
      gradient has the dtype of its input.

    For an initial state, the final state or a reverse scan, call :func:`ferroscan.gated_scan`.

    Args:
        x: inputs, ``(B, L, D)`` (any rank >= 2, time on axis 1).
        a: state transition, shape of ``x`` or broadcastable to it.
        b: input gate, like ``a``; None means 1.
        c: output gate, like ``a``; None means 1.
        block_l, checkpoint, tile_b, tile_d, backend: accepted and validated, not needed.
        out_dtype: dtype of ``y``; default ``x.dtype``.

    Returns:
        ``y``, shaped like ``x``, dtype ``out_dtype``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"Unsupported backend {backend!r}; backend must be one of 'auto', 'triton', 'torch'")
    _check_int(block_l, "block_l", optional=False)
    if block_l < 1:
        raise ValueError(f"block_l must be a positive int, got {block_l}")
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {type(checkpoint).__name__}")
    _check_int(tile_b, "tile_b", optional=True)
    _check_int(tile_d, "tile_d", optional=True)

    named = {"x": x, "a": a, "b": b, "c": c}
    for name, value in named.items():
        if value is None and name in ("b", "c"):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOATS:
            raise TypeError(f"{name} has dtype {value.dtype}; expected one of float16, bfloat16, float32, float64")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, L, ...) with time on axis 1; got shape {tuple(x.shape)}")
    for name in ("a", "b", "c"):
        value = named[name]
        if value is None:
            continue
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; move them to one device")
        try:
            fits = torch.broadcast_shapes(value.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but x has {tuple(x.shape)}; {name} must have x's "
                "shape (or broadcast to it)"
            )
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64, got {out_dtype}")

    common = x.dtype
    for value in (a, b, c):
        if value is not None:
            common = torch.promote_types(common, value.dtype)
    x_, a_, b_, c_ = (None if t is None else t.to(common) for t in (x, a, b, c))
    return ferroscan.gated_scan(x_, a_, b_, c_, dim=1, out_dtype=out_dtype or x.dtype)
