r"""Tests of the drop-in module :mod:`ferroscan.compat.quick_ssm`.

``quick_ssm.scan(x, a, b, c, *, block_l=256, checkpoint=True, tile_b=None, tile_d=None,
backend="auto", out_dtype=None)`` returns ``y`` of

.. math::

    h_t = a_t h_{t-1} + b_t x_t, \qquad y_t = c_t h_t, \qquad h_{-1} = 0,

for ``(B, L, D)`` tensors with time on axis 1, in ``out_dtype`` (default ``x.dtype``), and is
differentiable in ``x``, ``a``, ``b``, ``c``. :func:`quick_ref` below is that definition as a
plain float64 Python loop, run on the very (already rounded) inputs; autograd through it gives the
expected gradients. Every case runs on every device of the ``device`` fixture.

Error bounds: with :math:`H` the recurrence on :math:`|a|, |b||x|` (:math:`|h_t| \le H_t`) and
:math:`K = \mathrm{scan}(|a|, H)` the step-weighted magnitude, a sequential loop of unit
:math:`u` is within :math:`2uK_t` of :math:`h_t`, and the products :math:`b x`, :math:`c h` add
a rounding each; we allow :math:`(4u_w + 4u_{64})|c|(K + H)` (:math:`u_w` the unit of the
format the scan is computed in: float32 for half inputs), the same magnitudes' gradients for
the gradients, plus one rounding :math:`u_\mathrm{res}|\mathrm{ref}|` of a result returned in a
format coarser than the one it was computed in.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from ferroscan.compat import quick_ssm
from reference import UNIT, assert_within

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
Tensor = torch.Tensor
NAMES = ("x", "a", "b", "c")


def quick_ref(x: Tensor, a: Tensor, b: Optional[Tensor], c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(y, h)`` of quick_ssm's recurrence by a loop over axis 1, in float64; differentiable.
    ``a``, ``b``, ``c`` broadcast to ``x``; None ``b`` / ``c`` mean 1."""
    x = x.to(F64)
    a = a.to(F64).expand(x.shape)
    b = torch.ones_like(x) if b is None else b.to(F64).expand(x.shape)
    c = torch.ones_like(x) if c is None else c.to(F64).expand(x.shape)
    h = torch.zeros_like(x.select(1, 0)) if x.shape[1] else None
    states = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + b[:, t] * x[:, t]
        states.append(h)
    hidden = torch.stack(states, 1) if states else x * 0
    return c * hidden, hidden


def make_inputs(
    shape: tuple[int, ...], dtypes: dict[str, torch.dtype], device: str, seed: int, *, bc: str = "bc"
) -> dict[str, Optional[Tensor]]:
    """``a`` uniform in [0.5, 1), ``b``, ``c`` uniform in [-1.5, 1.5), ``x`` standard normal; each
    rounded to ``dtypes[name]``."""
    gen = torch.Generator().manual_seed(seed)
    vals = {
        "x": torch.randn(shape, generator=gen, dtype=F64),
        "a": 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64),
        "b": 3 * torch.rand(shape, generator=gen, dtype=F64) - 1.5,
        "c": 3 * torch.rand(shape, generator=gen, dtype=F64) - 1.5,
    }
    out: dict[str, Optional[Tensor]] = {}
    for k, v in vals.items():
        out[k] = None if (k in "bc" and k not in bc) else v.to(dtypes[k]).to(device)
    return out


def check(
    inputs: dict[str, Optional[Tensor]],
    *,
    seed: int,
    what: str,
    out_dtype: Optional[torch.dtype] = None,
    **knobs: object,
) -> None:
    """quick_ssm.scan's y and gradients against :func:`quick_ref`, within the module's bound."""
    present = {k: v for k, v in inputs.items() if v is not None}
    ls = {k: v.detach().clone().requires_grad_() for k, v in present.items()}
    y = quick_ssm.scan(ls["x"], ls["a"], ls.get("b"), ls.get("c"), out_dtype=out_dtype, **knobs)
    x = present["x"]
    y_dtype = out_dtype or x.dtype
    assert isinstance(y, Tensor) and y.shape == x.shape and y.dtype == y_dtype and y.device == x.device
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(tuple(x.shape), generator=gen, dtype=F64).to(y_dtype).to(x.device)
    grads = dict(zip(ls, torch.autograd.grad(y, list(ls.values()), w)))
    for k, g in grads.items():
        assert g.shape == present[k].shape and g.dtype == present[k].dtype, f"gradient of {k}"

    refs = {k: v.detach().to(F64).requires_grad_() for k, v in present.items()}
    y_ref, _ = quick_ref(refs["x"], refs["a"], refs.get("b"), refs.get("c"))
    ref_grads = dict(zip(refs, torch.autograd.grad(y_ref, list(refs.values()), w.to(F64))))

    mags = {k: v.detach().to(F64).abs().requires_grad_() for k, v in present.items()}
    with torch.enable_grad():
        _, big_h = quick_ref(mags["x"], mags["a"], mags.get("b"), None)
        _, big_k = quick_ref(big_h, mags["a"], None, None)
        weight_y = big_k + big_h
        if "c" in mags:
            weight_y = mags["c"] * weight_y
        weights = dict(zip(mags, torch.autograd.grad((w.to(F64).abs() * weight_y).sum(), list(mags.values()))))

    common = x.dtype
    for v in present.values():
        common = torch.promote_types(common, v.dtype)
    work = F32 if common in (F16, BF16) else common
    factor = 4 * UNIT[work] + 4 * UNIT[F64]

    def bound(weight: Tensor, ref: Tensor, result: torch.dtype) -> Tensor:
        rounding = UNIT[result] if UNIT[result] > UNIT[work] else 0.0
        return factor * weight + rounding * ref.abs() + torch.finfo(result).tiny

    assert_within(y, y_ref, bound(weight_y.detach(), y_ref, y_dtype), f"{what}: y")
    for k in grads:
        g_dtype = present[k].dtype
        assert_within(grads[k], ref_grads[k], bound(weights[k], ref_grads[k], g_dtype), f"{what}: d/d{k}")


def same(dtype: torch.dtype) -> dict[str, torch.dtype]:
    return dict.fromkeys(NAMES, dtype)


# ---------------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257, 1000])
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=["f64", "f32", "f16", "bf16"])
def test_values_and_gradients(device: str, dtype: torch.dtype, length: int) -> None:
    """(B, L, D) of any length (quick_ssm's Triton path wants powers of two), every dtype."""
    inputs = make_inputs((2, length, 3), same(dtype), device, seed=length)
    check(inputs, seed=length + 1, what=f"{dtype} L={length}")


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [(F32, F64), (F32, F16), (F32, BF16), (F64, F32), (F16, F32), (BF16, F32), (F16, BF16), (F32, F32)],
    ids=lambda d: str(d)[6:],
)
def test_out_dtype(device: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """y comes back in ``out_dtype``; the gradients in the inputs' dtypes."""
    inputs = make_inputs((2, 50, 3), same(dtype), device, seed=2)
    check(inputs, seed=3, out_dtype=out_dtype, what=f"{dtype} -> {out_dtype}")


def test_default_out_dtype_is_x_dtype(device: str) -> None:
    inputs = make_inputs((2, 9, 3), {"x": F16, "a": F32, "b": F32, "c": F32}, device, seed=4)
    y = quick_ssm.scan(inputs["x"], inputs["a"], inputs["b"], inputs["c"])
    assert y.dtype == F16


@pytest.mark.parametrize(
    "dtypes",
    [{"x": F16, "a": F32, "b": F32, "c": BF16}, {"x": F32, "a": F64, "b": F32, "c": F32}],
    ids=["half-x-f32-gates", "f64-gate"],
)
def test_mixed_dtypes(device: str, dtypes: dict[str, torch.dtype]) -> None:
    """Inputs of different dtypes run in their promoted dtype (quick_ssm's Triton path upcasts to
    float32 too); y is x's dtype, each gradient its input's."""
    check(make_inputs((2, 40, 3), dtypes, device, seed=5), seed=6, what=str(dtypes))


@pytest.mark.parametrize("bc", ["none", "b", "c"])
def test_gates_none(device: str, bc: str) -> None:
    """b / c may be None here (meaning 1); quick_ssm itself requires them."""
    check(make_inputs((2, 33, 3), same(F32), device, seed=7, bc=bc), seed=8, what=bc)


@pytest.mark.parametrize(("shape", "name"), [((3, 45), "rank2"), ((2, 45, 2, 3), "rank4")])
def test_other_ranks(device: str, shape: tuple[int, ...], name: str) -> None:
    """Time stays on axis 1 for ranks other than 3."""
    check(make_inputs(shape, same(F64), device, seed=9), seed=10, what=name)


def test_broadcast_and_strided(device: str) -> None:
    """Broadcast gates and non-contiguous inputs (quick_ssm needs equal, contiguous shapes)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 30, generator=gen, dtype=F64).to(device).transpose(1, 2)  # (2, 30, 3) view
    a = (0.5 + 0.5 * torch.rand(1, 30, 3, generator=gen, dtype=F64)).to(device)
    b = torch.randn(3, generator=gen, dtype=F64).to(device)
    c = torch.randn(2, 1, 3, generator=gen, dtype=F64).to(device)
    ls = [t.clone().requires_grad_() for t in (x, a, b, c)]
    y = quick_ssm.scan(*ls)
    y_ref, _ = quick_ref(x, a, b, c)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: quick_ssm.scan(*t), tuple(ls), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck(device: str) -> None:
    gen = torch.Generator().manual_seed(12)
    shape = (2, 6, 3)
    x, b, c = (torch.randn(shape, generator=gen, dtype=F64).to(device).requires_grad_() for _ in range(3))
    a = (0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64)).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: quick_ssm.scan(*t), (x, a, b, c), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The tuning knobs
# ---------------------------------------------------------------------------------------------

KNOBS = [
    {},
    {"block_l": 16},
    {"block_l": 1},
    {"block_l": 4096},
    {"checkpoint": False},
    {"tile_b": 1, "tile_d": 2},
    {"tile_b": 0, "tile_d": -1},
    {"tile_b": 100, "tile_d": 100},
    {"backend": "torch"},
    {"backend": "triton"},
    {"backend": "auto", "block_l": 512, "checkpoint": True, "tile_b": 2, "tile_d": 512},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()) or "defaults")
def test_knobs_accepted(device: str, knobs: dict) -> None:
    """Every valid setting of the knobs gives the reference result, and exactly the default's."""
    inputs = make_inputs((3, 37, 5), same(F32), device, seed=13)
    check(inputs, seed=14, what=str(knobs), **knobs)
    args = (inputs["x"], inputs["a"], inputs["b"], inputs["c"])
    torch.testing.assert_close(quick_ssm.scan(*args, **knobs), quick_ssm.scan(*args), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("knobs", "exc", "name"),
    [
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"backend": "Triton"}, ValueError, "backend"),
        ({"backend": ""}, ValueError, "backend"),
        ({"backend": None}, ValueError, "backend"),
        ({"block_l": 0}, ValueError, "block_l"),
        ({"block_l": -256}, ValueError, "block_l"),
        ({"block_l": 256.0}, TypeError, "block_l"),
        ({"block_l": None}, TypeError, "block_l"),
        ({"checkpoint": "yes"}, TypeError, "checkpoint"),
        ({"tile_b": 1.5}, TypeError, "tile_b"),
        ({"tile_d": "512"}, TypeError, "tile_d"),
        ({"out_dtype": torch.int32}, TypeError, "out_dtype"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_bad_knobs(device: str, knobs: dict, exc: type, name: str) -> None:
    inputs = make_inputs((2, 8, 3), same(F32), device, seed=15)
    with pytest.raises(exc, match=name):
        quick_ssm.scan(inputs["x"], inputs["a"], inputs["b"], inputs["c"], **knobs)


def _bad_inputs() -> list:
    s = (2, 8, 3)
    f = torch.ones(s)
    return [
        pytest.param(dict(x=f.long(), a=f, b=f, c=f), TypeError, "x", id="x-int"),
        pytest.param(dict(x=f, a=f.int(), b=f, c=f), TypeError, "a", id="a-int"),
        pytest.param(dict(x=f, a=f, b=f.bool(), c=f), TypeError, "b", id="b-bool"),
        pytest.param(dict(x=f, a=f, b=f, c=f.to(torch.complex64)), TypeError, "c", id="c-complex"),
        pytest.param(dict(x=[1.0], a=f, b=f, c=f), TypeError, "x", id="x-list"),
        pytest.param(dict(x=f, a=None, b=f, c=f), TypeError, "a", id="a-None"),
        pytest.param(dict(x=f, a=torch.ones(2, 7, 3), b=f, c=f), ValueError, "a", id="a-shape"),
        pytest.param(dict(x=f, a=f, b=torch.ones(2, 8, 4), c=f), ValueError, "b", id="b-shape"),
        pytest.param(dict(x=f, a=f, b=f, c=torch.ones(4, 2, 8, 3)), ValueError, "c", id="c-larger"),
        pytest.param(dict(x=torch.ones(8), a=torch.ones(8), b=None, c=None), ValueError, "x", id="x-rank1"),
    ]


@pytest.mark.parametrize(("kwargs", "exc", "name"), _bad_inputs())
def test_bad_inputs(kwargs: dict, exc: type, name: str) -> None:
    with pytest.raises(exc) as info:
        quick_ssm.scan(kwargs["x"], kwargs["a"], kwargs["b"], kwargs["c"])
    assert str(info.value).startswith(f"{name} "), str(info.value)


def test_signature_matches_quick_ssm() -> None:
    """x, a, b, c positional; the knobs keyword-only with quick_ssm's defaults."""
    import inspect

    params = inspect.signature(quick_ssm.scan).parameters
    assert list(params)[:4] == list(NAMES)
    assert all(params[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for n in NAMES)
    defaults = {
        "block_l": 256,
        "checkpoint": True,
        "tile_b": None,
        "tile_d": None,
        "backend": "auto",
        "out_dtype": None,
    }
    for name, value in defaults.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == value, name
    assert quick_ssm.BACKENDS == ("auto", "triton", "torch")
