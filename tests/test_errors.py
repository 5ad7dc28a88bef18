"""Bad inputs to :func:`ferroscan.scan`: each raises the documented exception type, with a
message that names the offending argument. NaN and Inf are values, not errors."""

from __future__ import annotations

import re

import ferroscan
import numpy as np
import pytest
import torch


def _ok(shape: tuple[int, ...] = (2, 3, 8), dtype: torch.dtype = torch.float32, device: str = "cpu"):  # noqa: ANN202
    gates = torch.full(shape, 0.9, dtype=dtype, device=device)
    tokens = torch.ones(shape, dtype=dtype, device=device)
    return gates, tokens


def _raises(exc: type[Exception], arg: str):  # noqa: ANN202
    """``pytest.raises`` that also wants ``arg`` named as a word in the message."""
    return pytest.raises(exc, match=rf"\b{re.escape(arg)}\b")


# --- shapes ------------------------------------------------------------------------------------


def test_shape_mismatch() -> None:
    gates, _ = _ok((2, 3, 8))
    _, tokens = _ok((2, 3, 9))
    with _raises(ValueError, "gates"):
        ferroscan.scan(gates, tokens)


def test_gates_larger_than_tokens() -> None:
    """Gates broadcast to tokens, never the other way round."""
    gates, _ = _ok((2, 3, 8))
    _, tokens = _ok((3, 8))
    with _raises(ValueError, "gates"):
        ferroscan.scan(gates, tokens)


def test_gates_not_broadcastable() -> None:
    gates, _ = _ok((2, 1))
    _, tokens = _ok((2, 3, 8))
    with _raises(ValueError, "gates"):
        ferroscan.scan(gates, tokens)


def test_zero_dim_tokens() -> None:
    with _raises(ValueError, "tokens"):
        ferroscan.scan(torch.tensor(0.5), torch.tensor(1.0))


def test_zero_dim_numpy_tokens() -> None:
    """Like a 0-d tensor: a 0-d array has no time axis (it must not become shape (1,))."""
    with _raises(ValueError, "tokens"):
        ferroscan.scan(np.array(0.5), np.array(1.0))


# --- dtypes ------------------------------------------------------------------------------------


def test_dtype_mismatch() -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "gates"):
        ferroscan.scan(gates.double(), tokens)


def test_half_dtype_mismatch() -> None:
    gates, tokens = _ok(dtype=torch.float16)
    with _raises(TypeError, "gates"):
        ferroscan.scan(gates.bfloat16(), tokens)


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128],
    ids=str,
)
def test_unsupported_tokens_dtype(dtype: torch.dtype) -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "tokens"):
        ferroscan.scan(gates.to(dtype), tokens.to(dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_unsupported_gates_dtype(dtype: torch.dtype) -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "gates"):
        ferroscan.scan(gates.to(dtype), tokens)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64], ids=lambda d: d.__name__)
def test_unsupported_numpy_dtype(dtype: type) -> None:
    with _raises(TypeError, "tokens"):
        ferroscan.scan(np.full((2, 4), 0.5), np.ones((2, 4), dtype=dtype))


# --- types -------------------------------------------------------------------------------------


def test_non_tensor_tokens() -> None:
    gates, _ = _ok((4,))
    with _raises(TypeError, "tokens"):
        ferroscan.scan(gates, [1.0, 2.0, 3.0, 4.0])


def test_non_tensor_gates() -> None:
    _, tokens = _ok((4,))
    with _raises(TypeError, "gates"):
        ferroscan.scan(0.5, tokens)


def test_numpy_mixed_with_tensor() -> None:
    """A NumPy array beside a torch tensor: the tensor argument is named."""
    _, tokens = _ok((2, 4))
    with _raises(TypeError, "tokens"):
        ferroscan.scan(np.full((2, 4), 0.5, dtype=np.float32), tokens)


def test_non_tensor_initial() -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "initial"):
        ferroscan.scan(gates, tokens, initial=[[0.0] * 3] * 2)


# --- dim ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, -4, 100])
def test_dim_out_of_range(dim: int) -> None:
    gates, tokens = _ok((2, 3, 8))
    with _raises(ValueError, "dim"):
        ferroscan.scan(gates, tokens, dim=dim)


@pytest.mark.parametrize("dim", [1.0, "1", True, None], ids=repr)
def test_dim_not_an_int(dim: object) -> None:
    gates, tokens = _ok((2, 3, 8))
    with _raises(TypeError, "dim"):
        ferroscan.scan(gates, tokens, dim=dim)


def test_reverse_not_a_bool() -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "reverse"):
        ferroscan.scan(gates, tokens, reverse=1)


# --- initial -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dim"), [((2, 8), -1), ((2, 3, 1), -1), ((3, 2), -1), ((2, 3), 1)])
def test_initial_wrong_shape(shape: tuple[int, ...], dim: int) -> None:
    """tokens (2, 3, 8): initial must be (2, 3) for dim=-1 and (2, 8) for dim=1."""
    gates, tokens = _ok((2, 3, 8))
    with _raises(ValueError, "initial"):
        ferroscan.scan(gates, tokens, dim=dim, initial=torch.zeros(shape))


def test_initial_wrong_dtype() -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "initial"):
        ferroscan.scan(gates, tokens, initial=torch.zeros(2, 3, dtype=torch.float64))


def test_initial_integer_dtype() -> None:
    gates, tokens = _ok()
    with _raises(TypeError, "initial"):
        ferroscan.scan(gates, tokens, initial=torch.zeros(2, 3, dtype=torch.int64))


def test_numpy_initial_wrong_shape() -> None:
    with _raises(ValueError, "initial"):
        ferroscan.scan(np.full((2, 4), 0.5), np.ones((2, 4)), initial=np.zeros(4))


# --- devices -----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_gates_on_other_device() -> None:
    gates, tokens = _ok()
    with _raises(ValueError, "gates"):
        ferroscan.scan(gates.cuda(), tokens)


@pytest.mark.cuda
def test_tokens_on_other_device() -> None:
    gates, tokens = _ok()
    with pytest.raises(ValueError, match=r"\bgates\b.*\btokens\b|\btokens\b.*\bgates\b"):
        ferroscan.scan(gates, tokens.cuda())


@pytest.mark.cuda
def test_initial_on_other_device() -> None:
    gates, tokens = _ok(device="cuda")
    with _raises(ValueError, "initial"):
        ferroscan.scan(gates, tokens, initial=torch.zeros(2, 3))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_different_gpus() -> None:
    gates, tokens = _ok(device="cuda:0")
    with _raises(ValueError, "gates"):
        ferroscan.scan(gates.to("cuda:1"), tokens)
    with _raises(ValueError, "initial"):
        ferroscan.scan(gates, tokens, initial=torch.zeros(2, 3, device="cuda:1"))


@pytest.mark.cuda
def test_numpy_with_cuda_tensor() -> None:
    _, tokens = _ok(device="cuda")
    with _raises(TypeError, "tokens"):
        ferroscan.scan(np.full((2, 3, 8), 0.5, dtype=np.float32), tokens)


# --- NaN and Inf are values --------------------------------------------------------------------


def test_nan_inf_do_not_raise(device: str) -> None:
    gates, tokens = _ok(device=device)
    gates[0, 0, 3] = float("nan")
    tokens[1, 2, 5] = float("inf")
    tokens[1, 1, 0] = -float("inf")
    initial = torch.tensor([[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 2.0]], device=device)
    h, hf = ferroscan.scan(gates, tokens, initial=initial, return_final=True)
    assert h[0, 0].isnan().all() and h[1, 0].isposinf().all() and h[1, 1].isneginf().all()
    assert h[1, 2, 5:].isposinf().all() and h[1, 2, :5].isfinite().all()
    assert h[0, 1:].isfinite().all() and hf[0, 1:].isfinite().all()
    g = gates.clone().requires_grad_()
    ferroscan.scan(g, tokens, initial=initial).sum().backward()
    assert g.grad is not None and g.grad.shape == gates.shape


def test_numpy_nan_inf_do_not_raise() -> None:
    tokens = np.ones((2, 6))
    tokens[0, 2] = np.nan
    tokens[1, 3] = np.inf
    h = ferroscan.scan(np.full((2, 6), 0.5), tokens)
    assert np.isnan(h[0, 2:]).all() and np.isfinite(h[0, :2]).all() and np.isposinf(h[1, 3:]).all()
