r"""Neural-network layers built on ferroscan's operations.

:class:`GatedSSM` is a gated linear-recurrent ("SSM") block: the baseline gated SSM of Birdie
as packaged in ``quick_ssm.layers.SSM``, here running on :func:`ferroscan.gated_scan`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops.gated_scan import gated_scan

Tensor = torch.Tensor

__all__ = ["GatedSSM"]


class GatedSSM(nn.Module):
    r"""Pre-norm gated SSM block with a residual connection: ``(B, L, d_model) -> (B, L, d_model)``.

    With :math:`u_t` the input at step :math:`t` and :math:`\hat u_t = \mathrm{RMSNorm}(u_t)`,
    every channel :math:`i < d_\text{state}` of the state runs its own scalar recurrence:

    .. math::

        a_t &= \sigma(W_a \hat u_t + \beta_a)                  && \text{forget gate, in } (0, 1) \\
        b_t &= \sigma(W_b \hat u_t)                            && \text{input gate} \\
        x_t &= W_x \hat u_t                                    && \text{input} \\
        c_t &= \mathrm{SiLU}(W_g \hat u_t) \odot (W_v \hat u_t) && \text{output gate (SwiGLU)} \\
        h_t &= a_t \odot h_{t-1} + b_t \odot x_t, \quad h_{-1} = 0 \\
        y_t &= c_t \odot h_t \\
        \mathrm{out}_t &= u_t + W_o y_t + \beta_o

    The recurrence and the output gating are one :func:`ferroscan.gated_scan` call (``h`` and
    ``y`` along ``dim=1``), so the layer is causal: ``out_t`` depends on ``u_0 .. u_t`` only. This
    is the structure of ``quick_ssm.layers.SSM`` (its ``A_proj`` / ``D_proj`` / ``B_proj`` /
    ``C_proj_a``, ``C_proj_b`` / ``out_proj`` are :math:`W_a` / :math:`W_b` / :math:`W_x` /
    :math:`W_g, W_v` / :math:`W_o`), with the five input projections fused into one matrix
    multiply.

    Args:
        d_model: width of the input and the output.
        d_state: number of recurrent channels; default ``round(expand * d_model)``.
        expand: ``d_state / d_model`` when ``d_state`` is not given.
        bias: give the output projection a bias :math:`\beta_o` (the forget gate always has its
            bias :math:`\beta_a`; the other input projections have none, as in ``quick_ssm``).
        eps: epsilon of the RMSNorm.
        forget_init: range ``(lo, hi)``, ``0 < lo <= hi < 1``, over which the forget gates'
            biases are spread at initialization: channel ``i`` starts with
            :math:`\sigma(\beta_{a,i})` log-uniformly spaced between ``lo`` and ``hi`` in
            :math:`1 - a`, so the channels start with memory spans from :math:`1/(1-lo)` to
            :math:`1/(1-hi)` steps. ``None`` keeps PyTorch's default ``Linear`` init.
        dtype, device: of the parameters.

    Half-precision inputs (float16 / bfloat16) are scanned in float32 by
    :func:`ferroscan.gated_scan`, and its output returned in the input's dtype.
    """

    def __init__(
        self,
        d_model: int,
        d_state: Optional[int] = None,
        *,
        expand: float = 1.0,
        bias: bool = True,
        eps: float = 1e-5,
        forget_init: Optional[tuple[float, float]] = (0.5, 0.99),
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be positive, got {d_model}")
        if d_state is None:
            d_state = max(1, int(round(expand * d_model)))
        if d_state < 1:
            raise ValueError(f"d_state must be positive, got {d_state}")
        if forget_init is not None:
            lo, hi = forget_init
            if not 0.0 < lo <= hi < 1.0:
                raise ValueError(f"forget_init must satisfy 0 < lo <= hi < 1, got {forget_init}")
        factory = {"dtype": dtype, "device": device}
        self.d_model = d_model
        self.d_state = d_state
        self.forget_init = forget_init
        self.norm = nn.RMSNorm(d_model, eps=eps, **factory)
        # Forget gate (with bias) and, fused, input / input gate / SwiGLU pair (without).
        self.forget_proj = nn.Linear(d_model, d_state, bias=True, **factory)
        self.in_proj = nn.Linear(d_model, 4 * d_state, bias=False, **factory)
        self.out_proj = nn.Linear(d_state, d_model, bias=bias, **factory)
        self._init_forget_bias()

    @torch.no_grad()
    def _init_forget_bias(self) -> None:
        if self.forget_init is None:
            return
        lo, hi = self.forget_init
        # 1 - a log-uniformly spaced from 1 - lo down to 1 - hi; bias = logit(a).
        log_one_minus = torch.linspace(math.log1p(-lo), math.log1p(-hi), self.d_state, dtype=torch.float64)
        a = -torch.expm1(log_one_minus)
        bias = torch.log(a) - torch.log1p(-a)
        self.forget_proj.bias.copy_(bias.to(self.forget_proj.bias.dtype))

    def reset_parameters(self) -> None:
        """Re-initializes every parameter (PyTorch's defaults, then the forget-gate biases)."""
        self.norm.reset_parameters()
        self.forget_proj.reset_parameters()
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self._init_forget_bias()

    def scan_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The recurrence's operands ``(x, a, b, c)``, each ``(B, L, d_state)``, for input ``u``."""
        normed = self.norm(u)
        a = torch.sigmoid(self.forget_proj(normed))
        x, b, gate, value = self.in_proj(normed).chunk(4, dim=-1)
        return x, a, torch.sigmoid(b), F.silu(gate) * value

    def forward(self, u: Tensor) -> Tensor:
        """``u``: ``(B, L, d_model)``; returns ``u + W_o y + beta_o``, same shape and dtype."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (B, L, {self.d_model}), got {tuple(u.shape)}")
        x, a, b, c = self.scan_inputs(u)
        y = gated_scan(x, a, b, c, dim=1)
        return u + self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, forget_init={self.forget_init}"
