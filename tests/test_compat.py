r"""Tests of the drop-in modules ``ferroscan.compat.accelerated_scan`` and ``ferroscan.compat.fpscan``.

Every result is compared with a float64 reference written plainly below: a Python
loop over time of :math:`h_t = a_t h_{t-1} + b_t` (or :math:`a_t h_{t+1} + b_t` in
reverse) on the very same (already rounded) inputs.  Gradients of the
differentiable entry points are compared with autograd through that loop.

Tests run on CPU always and on CUDA too when ``torch.cuda.is_available()``; the
CUDA cases carry the ``cuda`` marker.

Error bounds (see :func:`_eps`): let :math:`H` be the same recurrence run on
:math:`|a|` and :math:`|b|` (so :math:`|h_t| \le H_t`).  A sequential loop in a
floating-point format of unit roundoff :math:`u` performs one multiplication and
one addition per step, so every term :math:`(\prod a)\, b` reaching :math:`h_t`
accumulates at most :math:`2T` roundings and, to first order,
:math:`|\hat h_t - h_t| \le 2 T u H_t`.  A parallel or chunked scan reorders the
same products and sums; we allow it twice the sequential bound,
:math:`4 T u_c H_t`, where :math:`u_c` is the unit of the accumulation format
(float32 for float32, float16 and bfloat16, float64 for float64).  A
half-precision result is then rounded once more to its own format, adding
:math:`u_\mathrm{out} |\hat h_t| \le u_\mathrm{out} (1 + 4 T u_c) H_t`.  The
bfloat16 test also checks that an actual float32 sequential loop on the same
rounded inputs stays within :math:`2 T u_{32} H_t`, so the bfloat16 tolerance is
at least twice that loop's error plus the bfloat16 output rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from ferroscan.compat import accelerated_scan as acc
from ferroscan.compat import fpscan
from reference import assert_within

F64 = torch.float64

# Unit roundoff (half an ulp of 1.0, round to nearest) of each format.
UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_CUDA], id="cuda")]

ScanFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The differentiable entry points, each called the way the peer package is called.
DIFFERENTIABLE: dict[str, ScanFn] = {
    "acc.scan": acc.scan,
    "acc.warp.scan": lambda g, x: acc.warp.scan(gates=g, tokens=x),
    "acc.scalar.scan": lambda g, x: acc.scalar.scan(forget=g, inputs=x),
    "acc.triton.scan": acc.triton.scan,
    "fpscan.pscan": fpscan.pscan,
    "fpscan.PScan.apply": fpscan.PScan.apply,
}
FORWARD_ONLY = {"acc.scan_forward": acc.scan_forward, "fpscan.scan_forward": fpscan.scan_forward}


# ----------------------------------------------------------------------------------
# Reference and error bounds
# ----------------------------------------------------------------------------------


def ref_scan(
    gates: torch.Tensor, tokens: torch.Tensor, reverse: bool = False, dtype: torch.dtype = F64
) -> torch.Tensor:
    """Plain loop over the last axis: ``h[t] = gates[t] * h[t -/+ 1] + tokens[t]``, ``h = 0`` outside.

    Runs in ``dtype`` (float64 by default) and is differentiable through autograd.
    """
    a, b = gates.to(dtype), tokens.to(dtype)
    length = b.shape[-1]
    h = torch.zeros_like(b[..., 0])
    states: list[torch.Tensor] = [h] * length
    for t in reversed(range(length)) if reverse else range(length):
        h = a[..., t] * h + b[..., t]
        states[t] = h
    return torch.stack(states, dim=-1)


def _eps(length: int, dtype: torch.dtype) -> float:
    """Relative bound ``eps``: ``|computed - exact| <= eps * H`` for a scan of ``length`` steps.

    Twice the first-order bound of a sequential loop in the accumulation format
    (``2 * length`` roundings of unit ``u_c``), plus one rounding of the result to
    ``dtype``; see the module docstring.
    """
    u_c = UNIT[F64] if dtype == F64 else UNIT[torch.float32]
    accumulation = 2 * (2 * length * u_c)
    return accumulation + UNIT[dtype] * (1 + accumulation)


def make_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    seed: int,
    gates: str = "decay",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(gates, tokens)`` rounded to ``dtype``, on ``device``.

    ``gates="decay"``: uniform in [0.5, 1); ``"signed"``: uniform in [-1, 1) with a
    quarter of them exactly zero.  Tokens are standard normal.
    """
    gen = torch.Generator().manual_seed(seed)
    if gates == "decay":
        a = 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64)
    else:
        a = 2 * torch.rand(shape, generator=gen, dtype=F64) - 1
        a = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.25, torch.zeros_like(a), a)
    b = torch.randn(shape, generator=gen, dtype=F64)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def check_values_and_grads(
    fn: ScanFn, gates: torch.Tensor, tokens: torch.Tensor, seed: int, what: str
) -> None:
    """Compare ``fn(gates, tokens)`` and its gradients with the float64 loop."""
    dtype, length = tokens.dtype, tokens.shape[-1]
    eps = _eps(length, dtype)
    g = gates.detach().clone().requires_grad_()
    x = tokens.detach().clone().requires_grad_()
    out = fn(g, x)
    assert out.dtype == dtype and out.device == tokens.device
    weight = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    weight = weight.to(dtype).to(tokens.device)  # the upstream gradient, exactly representable
    grad_g, grad_x = torch.autograd.grad(out, (g, x), weight)
    assert grad_g.dtype == gates.dtype and grad_x.dtype == dtype

    g64 = gates.detach().to("cpu", F64).requires_grad_()
    x64 = tokens.detach().to("cpu", F64).requires_grad_()
    ref = ref_scan(g64, x64)
    ref_g, ref_x = torch.autograd.grad(ref, (g64, x64), weight.to("cpu", F64))

    # Magnitudes: the same computations on |a|, |b| and |upstream gradient|.
    abs_g = g64.detach().abs().requires_grad_()
    abs_x = x64.detach().abs().requires_grad_()
    magnitude = ref_scan(abs_g, abs_x)
    mag_g, mag_x = torch.autograd.grad(magnitude, (abs_g, abs_x), weight.to("cpu", F64).abs())

    assert_within(out, ref.detach(), eps * magnitude.detach(), f"{what} values")
    # dL/db is a reverse scan of the same length: same relative bound.
    assert_within(grad_x, ref_x, eps * mag_x, f"{what} d/dtokens")
    # dL/da_t = beta_t * h_{t-1}: product of two values within eps of exact, then rounded:
    # |err| <= ((2 + eps) eps + u_out (1 + eps)^2) |beta_t| |h_{t-1}| (magnitudes).
    eps_g = (2 + eps) * eps + UNIT[grad_g.dtype] * (1 + eps) ** 2
    assert_within(grad_g, ref_g, eps_g * mag_g, f"{what} d/dgates")


# ----------------------------------------------------------------------------------
# Differentiable entry points: accelerated_scan.scan (+ warp/scalar/triton), fpscan.pscan, PScan
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("length", [1, 7, 100, 257])
def test_differentiable_matches_reference(device: str, api: str, dtype: torch.dtype, length: int) -> None:
    """Values and gradients at non-power-of-two lengths (and 1), float32 and bfloat16."""
    gates, tokens = make_inputs((2, 3, length), dtype, device, seed=length)
    check_values_and_grads(DIFFERENTIABLE[api], gates, tokens, seed=length + 1, what=api)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_differentiable_other_dtypes(device: str, api: str, dtype: torch.dtype) -> None:
    """float64 (which the peers lack) and float16."""
    gates, tokens = make_inputs((2, 3, 45), dtype, device, seed=3)
    check_values_and_grads(DIFFERENTIABLE[api], gates, tokens, seed=4, what=api)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (shape ``(B, C, T)``) in another memory layout or rank."""
    if layout == "time-not-innermost":  # stride(-1) != 1
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "time-stride-2":  # every other element of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "1d":
        return t[0, 0]
    if layout == "4d":
        return t.reshape(1, *t.shape)
    raise AssertionError(layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
@pytest.mark.parametrize("layout", ["time-not-innermost", "time-stride-2", "1d", "4d"])
def test_differentiable_layouts_and_ranks(device: str, api: str, layout: str) -> None:
    """Non-contiguous inputs and ranks other than 3 (the peers require contiguous (B, C, T))."""
    gates, tokens = make_inputs((2, 3, 37), torch.float32, device, seed=5)
    gates, tokens = _layout(gates, layout), _layout(tokens, layout)
    if layout.startswith("time"):
        assert not gates.is_contiguous() and not tokens.is_contiguous()
    check_values_and_grads(DIFFERENTIABLE[api], gates, tokens, seed=6, what=f"{api} {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
def test_differentiable_signed_and_zero_gates(device: str, api: str) -> None:
    """Gates of both signs, a quarter of them exactly zero."""
    gates, tokens = make_inputs((2, 3, 64 + 5), torch.float32, device, seed=7, gates="signed")
    check_values_and_grads(DIFFERENTIABLE[api], gates, tokens, seed=8, what=api)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
def test_differentiable_mixed_dtypes(device: str, api: str) -> None:
    """float32 gates with bfloat16 tokens: result in bfloat16, each gradient in its input's dtype."""
    gates, _ = make_inputs((2, 3, 50), torch.float32, device, seed=9)
    _, tokens = make_inputs((2, 3, 50), torch.bfloat16, device, seed=10)
    check_values_and_grads(DIFFERENTIABLE[api], gates, tokens, seed=11, what=api)


@pytest.mark.parametrize("api", list(DIFFERENTIABLE))
def test_differentiable_gradient_to_one_input_only(api: str) -> None:
    """Only tokens (or only gates) require grad."""
    gates, tokens = make_inputs((2, 3, 20), torch.float32, "cpu", seed=12)
    x = tokens.clone().requires_grad_()
    (gx,) = torch.autograd.grad(DIFFERENTIABLE[api](gates, x).sum(), x)
    x64 = tokens.to(F64).requires_grad_()
    (want_x,) = torch.autograd.grad(ref_scan(gates, x64).sum(), x64)
    torch.testing.assert_close(gx.to(F64), want_x, rtol=1e-5, atol=1e-5)
    g = gates.clone().requires_grad_()
    (gg,) = torch.autograd.grad(DIFFERENTIABLE[api](g, tokens).sum(), g)
    g64 = gates.to(F64).requires_grad_()
    (want_g,) = torch.autograd.grad(ref_scan(g64, tokens).sum(), g64)
    torch.testing.assert_close(gg.to(F64), want_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("api", list(DIFFERENTIABLE) + list(FORWARD_ONLY))
def test_shape_mismatch_raises(api: str) -> None:
    fn = {**DIFFERENTIABLE, **FORWARD_ONLY}[api]
    with pytest.raises(ValueError):
        fn(torch.ones(2, 3, 8), torch.ones(2, 3, 9))


def test_pscan_is_an_autograd_function() -> None:
    assert issubclass(fpscan.PScan, torch.autograd.Function)
    assert fpscan.__all__ == ["pscan", "scan_forward", "PScan"]


# ----------------------------------------------------------------------------------
# Forward-only entry points: accelerated_scan.scan_forward, fpscan.scan_forward
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(FORWARD_ONLY))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("length", [1, 33, 100])
def test_scan_forward_matches_reference(
    device: str, api: str, reverse: bool, dtype: torch.dtype, length: int
) -> None:
    gates, tokens = make_inputs((2, 3, length), dtype, device, seed=20 + length)
    g, x = gates.clone().requires_grad_(), tokens.clone().requires_grad_()
    out = FORWARD_ONLY[api](g, x, reverse=reverse)
    assert out.dtype == dtype and out.device == tokens.device
    assert not out.requires_grad, "scan_forward is forward-only, as in the peers"
    ref = ref_scan(gates, tokens, reverse=reverse)
    magnitude = ref_scan(gates.abs(), tokens.abs(), reverse=reverse)
    assert_within(out, ref, _eps(length, dtype) * magnitude, f"{api} reverse={reverse}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_bf16_bound_dominates_float32_loop(device: str, reverse: bool) -> None:
    """The bfloat16 tolerance is at least twice the error of a float32 loop, plus output rounding.

    Checks the derivation's premise on data: a sequential float32 loop on the same
    rounded inputs stays within ``2 T u32 H``; the bfloat16 tests allow twice
    that plus one bfloat16 rounding.
    """
    length = 257
    gates, tokens = make_inputs((2, 3, length), torch.bfloat16, device, seed=30)
    ref = ref_scan(gates, tokens, reverse=reverse)
    magnitude = ref_scan(gates.abs(), tokens.abs(), reverse=reverse)
    loop32 = ref_scan(gates, tokens, reverse=reverse, dtype=torch.float32)
    assert_within(loop32, ref, 2 * length * UNIT[torch.float32] * magnitude, "float32 loop")
    out = acc.scan_forward(gates, tokens, reverse=reverse)
    assert_within(out, ref, _eps(length, torch.bfloat16) * magnitude, "bf16 scan_forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", list(FORWARD_ONLY))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["time-not-innermost", "time-stride-2", "1d", "4d"])
def test_scan_forward_layouts_and_ranks(device: str, api: str, reverse: bool, layout: str) -> None:
    gates, tokens = make_inputs((2, 3, 37), torch.float32, device, seed=31)
    gates, tokens = _layout(gates, layout), _layout(tokens, layout)
    out = FORWARD_ONLY[api](gates, tokens, reverse=reverse)
    ref = ref_scan(gates, tokens, reverse=reverse)
    magnitude = ref_scan(gates.abs(), tokens.abs(), reverse=reverse)
    assert_within(out, ref, _eps(37, torch.float32) * magnitude, f"{api} {layout}")


def test_accelerated_scan_forward_has_no_out_argument() -> None:
    """``accelerated_scan.warp.scan_forward`` takes ``(gates, tokens, reverse=False)`` only."""
    gates, tokens = make_inputs((1, 2, 8), torch.float32, "cpu", seed=32)
    with pytest.raises(TypeError):
        acc.scan_forward(gates, tokens, False, torch.empty_like(tokens))  # type: ignore[call-arg]
    assert acc.warp.scan_forward is acc.scan_forward and acc.warp.scan is acc.scan
    out = acc.scan_forward(gates, tokens)
    assert out.data_ptr() not in (gates.data_ptr(), tokens.data_ptr())


# ----------------------------------------------------------------------------------
# fpscan.scan_forward(..., out=...)
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("out_layout", ["contiguous", "time-not-innermost", "time-stride-2"])
def test_fpscan_out_is_written_and_returned(device: str, reverse: bool, out_layout: str) -> None:
    """``out`` receives the result in place and is the very object returned."""
    length = 70
    gates, tokens = make_inputs((2, 3, length), torch.float32, device, seed=40)
    out = torch.full_like(tokens, math.nan)
    if out_layout != "contiguous":
        out = _layout(out, out_layout)
    before = out.data_ptr()
    result = fpscan.scan_forward(gates, tokens, reverse=reverse, out=out)
    assert result is out and out.data_ptr() == before
    ref = ref_scan(gates, tokens, reverse=reverse)
    magnitude = ref_scan(gates.abs(), tokens.abs(), reverse=reverse)
    assert_within(out, ref, _eps(length, torch.float32) * magnitude, f"out ({out_layout})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("alias", ["tokens", "gates"])
def test_fpscan_out_may_alias_an_input(device: str, reverse: bool, alias: str) -> None:
    """An in-place scan (``out`` is one of the inputs) gives the same values."""
    length = 45
    gates, tokens = make_inputs((2, 3, length), torch.float32, device, seed=41)
    ref = ref_scan(gates, tokens, reverse=reverse)
    magnitude = ref_scan(gates.abs(), tokens.abs(), reverse=reverse)
    g, x = gates.clone(), tokens.clone()
    out = x if alias == "tokens" else g
    result = fpscan.scan_forward(g, x, reverse, out)
    assert result is out
    assert_within(out, ref, _eps(length, torch.float32) * magnitude, f"out aliasing {alias}")


@pytest.mark.parametrize("device", DEVICES)
def test_fpscan_out_of_another_dtype(device: str) -> None:
    """A float64 ``out`` receives the float32 result converted, as by ``copy_``."""
    gates, tokens = make_inputs((2, 3, 40), torch.float32, device, seed=42)
    out = torch.empty(2, 3, 40, dtype=F64, device=device)
    assert fpscan.scan_forward(gates, tokens, out=out) is out
    ref = ref_scan(gates, tokens)
    magnitude = ref_scan(gates.abs(), tokens.abs())
    assert_within(out, ref, _eps(40, torch.float32) * magnitude, "float64 out")


def test_fpscan_out_of_wrong_shape_raises() -> None:
    gates, tokens = make_inputs((2, 3, 16), torch.float32, "cpu", seed=43)
    with pytest.raises(ValueError):
        fpscan.scan_forward(gates, tokens, out=torch.empty(2, 3, 15))


def test_fpscan_out_with_inputs_requiring_grad() -> None:
    """``scan_forward`` records no graph even when the inputs require grad."""
    gates, tokens = make_inputs((2, 3, 16), torch.float32, "cpu", seed=44)
    g, x = gates.requires_grad_(), tokens.requires_grad_()
    out = torch.empty(2, 3, 16)
    assert fpscan.scan_forward(g, x, out=out) is out
    assert not out.requires_grad and out.grad_fn is None


# ----------------------------------------------------------------------------------
# Lengths beyond the peers' 65536 limit
# ----------------------------------------------------------------------------------


def _ref_scan_1d(a: list[float], b: list[float], reverse: bool = False) -> list[float]:
    """Python-float (float64) loop for one long sequence."""
    h, out = 0.0, [0.0] * len(b)
    for t in reversed(range(len(b))) if reverse else range(len(b)):
        h = a[t] * h + b[t]
        out[t] = h
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_length_beyond_peer_limit(device: str) -> None:
    """T = 65536 + 4097 (above the peers' maximum, not a power of two): values and gradients."""
    length = 65536 + 4097
    gen = torch.Generator().manual_seed(50)
    gates = (0.999 + 0.001 * torch.rand(2, length, generator=gen, dtype=F64)).float()
    tokens = torch.randn(2, length, generator=gen, dtype=F64).float()
    weight = torch.randn(2, length, generator=gen, dtype=F64).float()
    eps = _eps(length, torch.float32)

    def rows(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """The float64 loop applied to each row of ``(a, b)``."""
        pairs = zip(a.double().tolist(), b.double().tolist())
        return torch.tensor([_ref_scan_1d(ra, rb, reverse) for ra, rb in pairs], dtype=F64)

    ref, rev = rows(gates, tokens), rows(gates, tokens, reverse=True)
    mag, mag_rev = rows(gates, tokens.abs()), rows(gates, tokens.abs(), reverse=True)  # gates > 0
    # Gradient reference: beta_t = a_{t+1} beta_{t+1} + w_t; dL/da_t = beta_t h_{t-1}.
    shifted = torch.cat([gates.double()[:, 1:], torch.ones(2, 1, dtype=F64)], dim=1)
    beta, beta_mag = rows(shifted, weight, reverse=True), rows(shifted, weight.abs(), reverse=True)
    prev = torch.nn.functional.pad(ref[:, :-1], (1, 0))
    prev_mag = torch.nn.functional.pad(mag[:, :-1], (1, 0))

    g, x = gates.to(device), tokens.to(device)
    assert_within(acc.scan_forward(g, x), ref, eps * mag, "acc.scan_forward long")
    rev_out = fpscan.scan_forward(g, x, reverse=True)
    assert_within(rev_out, rev, eps * mag_rev, "fpscan.scan_forward long reverse")
    for api in ("acc.scan", "fpscan.pscan"):
        gr, xr = g.clone().requires_grad_(), x.clone().requires_grad_()
        out = DIFFERENTIABLE[api](gr, xr)
        assert_within(out, ref, eps * mag, f"{api} long")
        grad_g, grad_x = torch.autograd.grad(out, (gr, xr), weight.to(device))
        assert_within(grad_x, beta, eps * beta_mag, f"{api} long d/dtokens")
        eps_g = (2 + eps) * eps + UNIT[torch.float32] * (1 + eps) ** 2
        assert_within(grad_g, beta * prev, eps_g * beta_mag * prev_mag, f"{api} long d/dgates")
