"""Tests of ``ferroscan.compat.mamba``: mamba_ssm's ``selective_scan_fn`` / ``selective_scan_ref``
signatures and return conventions, values and gradients against the float64 reference of
``test_selective_scan``, packed sequences (``cu_seqlens``), and, where ``mamba_ssm`` is installed
(CUDA), agreement with mamba's own kernel."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from ferroscan.compat import mamba
from test_selective_scan import TOLERANCES, Case, assert_close, make_inputs, reference, upstream

# mamba_ssm.ops.selective_scan_interface.selective_scan_fn, parameter by parameter.
MAMBA_SIGNATURE = [
    ("u", inspect.Parameter.empty),
    ("delta", inspect.Parameter.empty),
    ("A", inspect.Parameter.empty),
    ("B", inspect.Parameter.empty),
    ("C", inspect.Parameter.empty),
    ("D", None),
    ("z", None),
    ("delta_bias", None),
    ("delta_softplus", False),
    ("return_last_state", False),
    ("cu_seqlens", None),
]

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("fn", [mamba.selective_scan_fn, mamba.selective_scan_ref], ids=lambda f: f.__name__)
def test_signature(fn) -> None:
    params = inspect.signature(fn).parameters.values()
    assert [(p.name, p.default) for p in params] == MAMBA_SIGNATURE
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert mamba.__all__ == ["selective_scan_fn", "selective_scan_ref"]


def _positional(inputs: dict) -> list:
    return [inputs[k] for k in ARGS]


@pytest.mark.parametrize("fn", [mamba.selective_scan_fn, mamba.selective_scan_ref], ids=lambda f: f.__name__)
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_return_conventions_and_values(device: str, fn, complex_: bool) -> None:
    case = Case(complex_=complex_, b="var2", c="var1", has_d=True, has_z=True, has_bias=True, softplus=True,
                length=70, last=True)  # fmt: skip
    inputs = make_inputs(case, torch.float32, device, seed=1)
    out = fn(*_positional(inputs), True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == inputs["u"].shape
    out2, last = fn(*_positional(inputs), True, True)
    assert torch.equal(out, out2)
    assert last.shape == (case.batch, case.dim, case.dstate)
    assert last.dtype == (torch.complex64 if complex_ else torch.float32)
    cpu = {k: None if v is None else v.cpu().to(torch.complex128 if v.is_complex() else torch.float64)
           for k, v in inputs.items()}  # fmt: skip
    want, want_last = reference(*_positional(cpu), True)
    assert_close({"out": out, "last": last}, {"out": want, "last": want_last}, torch.float32, fn.__name__)


def test_half_inputs_keep_their_dtype(device: str) -> None:
    case = Case(b="var1", c="var1", has_d=True, has_z=True)
    inputs = make_inputs(case, torch.bfloat16, device, seed=2)
    out, last = mamba.selective_scan_fn(*_positional(inputs), False, True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref = mamba.selective_scan_ref(*_positional(inputs), False)
    torch.testing.assert_close(out, ref, rtol=TOLERANCES[torch.bfloat16][0], atol=TOLERANCES[torch.bfloat16][1])


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_cu_seqlens_restarts_the_state(device: str, complex_: bool) -> None:
    """Packed sequences: the scan of the pack equals the separate scans of its pieces, values and
    gradients, for the kernel and for the plain reference."""
    case = Case(batch=1, complex_=complex_, b="var1", c="const", has_d=True, has_z=True, has_bias=True,
                softplus=True, length=40)  # fmt: skip
    inputs = make_inputs(case, torch.float64, device, seed=3)
    cu = torch.tensor([0, 9, 9, 25, 40], device=device, dtype=torch.int32)
    w = upstream((1, case.dim, case.length), torch.float64, device, 4)

    def run(fn) -> list[torch.Tensor]:  # noqa: ANN001
        leaves = [inputs[k].detach().clone().requires_grad_() for k in ARGS]
        out, last = fn(*leaves, True, True, cu)
        return [out, last, *torch.autograd.grad((out, last), leaves, (w, torch.ones_like(last)))]

    def separately() -> list[torch.Tensor]:
        leaves = [inputs[k].detach().clone().requires_grad_() for k in ARGS]
        u, delta, A, B, C, D, z, bias = leaves
        pieces, last = [], None
        for s, e in [(0, 9), (9, 25), (25, 40)]:
            Bs = B[..., 2 * s : 2 * e] if complex_ else B[..., s:e]
            out, last = mamba.selective_scan_fn(u[..., s:e], delta[..., s:e], A, Bs, C, D, z[..., s:e], bias, True,
                                                True)  # fmt: skip
            pieces.append(out)
        out = torch.cat(pieces, -1)
        return [out, last, *torch.autograd.grad((out, last), leaves, (w, torch.ones_like(last)))]

    want = separately()
    for fn in (mamba.selective_scan_fn, mamba.selective_scan_ref):
        for got, expected in zip(run(fn), want):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_bad_cu_seqlens() -> None:
    case = Case(batch=1, length=10)
    inputs = make_inputs(case, torch.float32, "cpu", seed=5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba.selective_scan_fn(*_positional(inputs), cu_seqlens=torch.tensor([0, 4, 3, 10]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba.selective_scan_fn(*_positional(inputs), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        mamba.selective_scan_fn(*_positional(inputs), cu_seqlens=[0, 10])


HAVE_MAMBA = importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_MAMBA, reason="mamba_ssm is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_agrees_with_mamba_ssm(dtype: torch.dtype, complex_: bool) -> None:
    """The same call through mamba_ssm's CUDA kernel and through ferroscan.compat.mamba."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn

    case = Case(batch=2, dim=8, length=300, dstate=16, complex_=complex_, b="var1", c="var1", has_d=True,
                has_z=True, has_bias=True, softplus=True)  # fmt: skip
    inputs = make_inputs(case, dtype, "cuda", seed=6)
    rtol, atol = TOLERANCES[dtype]
    ours = mamba.selective_scan_fn(*_positional(inputs), True)
    theirs = mamba_fn(*_positional(inputs), True)
    torch.testing.assert_close(ours, theirs, rtol=2 * rtol, atol=2 * atol)
