r"""Values and gradients of :func:`ferroscan.gated_scan` against a float64 reference loop.

The recurrence is

.. math::

    h_t = a_t h_{t-1} + b_t x_t \quad (\text{reverse: } a_t h_{t+1} + b_t x_t), \qquad
    y_t = c_t h_t, \qquad h_{-1} = h_0 \ (\text{zeros unless } \texttt{initial}),

with ``b`` and ``c`` equal to 1 when left out. :func:`gated_ref` below is that definition as a
plain Python loop over time, run in float64 on the very (already rounded) inputs the library saw;
autograd through the loop, with the same random upstream gradients, gives the expected gradients
of ``x``, ``a``, ``b``, ``c`` and ``initial``. Every case runs on every device of the ``device``
fixture (the CUDA case is marked ``cuda``).

Error bounds, float32 and float64 inputs (:func:`check_gated`). With :math:`H` the recurrence run
on :math:`|a|, |b||x|, |h_0|` (so :math:`|h_t| \le H_t`, and :math:`H` bounds every partial sum
of any evaluation order) and :math:`K = \mathrm{scan}(|a|, H)` the step-weighted magnitude of
:func:`reference.error_weights`, a sequential loop in a format of unit :math:`u` is within
:math:`2uK_t` of :math:`h_t`; the product :math:`b_t x_t` and the output product
:math:`c_t h_t` add one rounding each (at most :math:`u H_t`, :math:`u |c_t| H_t`). We allow
twice all that, :math:`(4u_w + 4u_{64})\,|c|(K + H)` for ``y`` with :math:`u_w` the unit of the
format ferroscan computes in, and the same magnitudes' own gradients (autograd through the
magnitude loops, weighted by the upstream gradients' magnitudes) for the gradients; a result
rounded to a coarser format at the end (``out_dtype``) adds :math:`u_\mathrm{out}|\mathrm{ref}|`.

Half-precision inputs (:func:`check_half`): ferroscan computes them in float32. The tolerance is
derived like in ``tests/test_scan.py``: twice the largest error of the same reference loop run
in float32 on the same rounded inputs, plus one rounding of the result to its own format, plus
the format's smallest normal number as an absolute floor.
"""

from __future__ import annotations

import itertools
from typing import Optional

import ferroscan
import pytest
import torch
from reference import UNIT, assert_within

F64 = torch.float64
F32 = torch.float32
F16 = torch.float16
BF16 = torch.bfloat16
HALF = (F16, BF16)

Tensor = torch.Tensor
NAMES = ("x", "a", "b", "c", "initial")

# Layouts: name -> (shape for a length L, time axis).
LAYOUTS = {
    "BLD-dim1": (lambda n: (2, n, 3), 1),
    "BDL-dim-1": (lambda n: (2, 3, n), -1),
    "rank2-dim1": (lambda n: (3, n), 1),
    "rank4-dim1": (lambda n: (2, n, 2, 2), 1),
}
LENGTHS = [1, 7, 64, 257, 1000]

# (reverse, with initial, return_final, which of b / c are given)
GATES = ["none", "b", "c", "bc"]
MODES = list(itertools.product([False, True], [False, True], [False, True], GATES))


def mode_id(mode: tuple) -> str:
    reverse, initial, final, bc = mode
    return f"{'rev' if reverse else 'fwd'}{'-init' if initial else ''}{'-final' if final else ''}-{bc}"


# ---------------------------------------------------------------------------------------------
# The reference and the inputs
# ---------------------------------------------------------------------------------------------


def state_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    dim = dim % len(shape)
    return tuple(s for d, s in enumerate(shape) if d != dim)


def gated_ref(
    x: Tensor,
    a: Tensor,
    b: Optional[Tensor],
    c: Optional[Tensor],
    *,
    dim: int,
    reverse: bool = False,
    initial: Optional[Tensor] = None,
    dtype: torch.dtype = F64,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, h_final, h)`` by a Python loop over time in ``dtype``; differentiable.

    ``a``, ``b`` and ``c`` may be any shape that broadcasts to ``x``; None ``b`` / ``c`` mean 1.
    """
    x = x.to(dtype)
    dim = dim % x.dim()
    a = a.to(dtype).expand(x.shape)
    b = None if b is None else b.to(dtype).expand(x.shape)
    c = None if c is None else c.to(dtype).expand(x.shape)
    h = torch.zeros(state_shape(tuple(x.shape), dim), dtype=dtype, device=x.device) if initial is None else initial
    h = h.to(dtype)
    xs, as_ = x.unbind(dim), a.unbind(dim)
    bs = None if b is None else b.unbind(dim)
    length = x.shape[dim]
    states: list[Tensor] = [h] * length
    for t in reversed(range(length)) if reverse else range(length):
        token = xs[t] if bs is None else bs[t] * xs[t]
        h = as_[t] * h + token
        states[t] = h
    hidden = torch.stack(states, dim) if length else x * 0
    y = hidden if c is None else c * hidden
    return y, h, hidden


def make_inputs(
    shape: tuple[int, ...],
    dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    *,
    bc: str = "bc",
    initial: bool = False,
    shapes: Optional[dict[str, tuple[int, ...]]] = None,
) -> dict[str, Optional[Tensor]]:
    """Inputs rounded to ``dtype`` on ``device``: gates ``a`` uniform in [0.5, 1), ``b`` and ``c``
    uniform in [-1.5, 1.5), ``x`` and ``initial`` standard normal. ``shapes`` overrides the shape
    of ``a`` / ``b`` / ``c`` (broadcast operands)."""
    shapes = shapes or {}
    gen = torch.Generator().manual_seed(seed)
    vals: dict[str, Optional[Tensor]] = {
        "x": torch.randn(shape, generator=gen, dtype=F64),
        "a": 0.5 + 0.5 * torch.rand(shapes.get("a", shape), generator=gen, dtype=F64),
        "b": 3 * torch.rand(shapes.get("b", shape), generator=gen, dtype=F64) - 1.5 if "b" in bc else None,
        "c": 3 * torch.rand(shapes.get("c", shape), generator=gen, dtype=F64) - 1.5 if "c" in bc else None,
        "initial": torch.randn(state_shape(shape, dim), generator=gen, dtype=F64) if initial else None,
    }
    return {k: None if v is None else v.to(dtype).to(device) for k, v in vals.items()}


def upstream(shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
    """A random upstream gradient, exactly representable in ``like``'s dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).to(like.dtype).to(like.device)


def leaves(inputs: dict[str, Optional[Tensor]], dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    return {k: v.detach().clone().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items() if v is not None}


def reference_run(
    inputs: dict[str, Optional[Tensor]],
    w: Tensor,
    wf: Optional[Tensor],
    *,
    dim: int,
    reverse: bool,
    dtype: torch.dtype = F64,
) -> dict[str, Tensor]:
    """The reference in ``dtype`` on copies of ``inputs``: ``y``, ``final`` and the gradients by
    input name for upstream gradients ``w`` (of y) and ``wf`` (of h_final, when not None)."""
    ls = leaves(inputs, dtype)
    y, hf, _ = gated_ref(
        ls["x"], ls["a"], ls.get("b"), ls.get("c"), dim=dim, reverse=reverse, initial=ls.get("initial"), dtype=dtype
    )
    outputs, weights = [y], [w.to(dtype)]
    if wf is not None:
        outputs.append(hf)
        weights.append(wf.to(dtype))
    grads = torch.autograd.grad(outputs, list(ls.values()), weights)
    return {"y": y.detach(), "final": hf.detach(), **dict(zip(ls, grads))}


def magnitudes(
    inputs: dict[str, Optional[Tensor]], w: Tensor, wf: Optional[Tensor], *, dim: int, reverse: bool
) -> dict[str, Tensor]:
    """Float64 error weights: ``y`` = :math:`|c|(K+H)`, ``final`` = :math:`K_f + H_f`, and for each
    input the gradient of :math:`\\sum |w||c|(K+H) + \\sum |w_f|(K_f+H_f)` with respect to its
    magnitude (see the module docstring)."""
    ls = {k: v.detach().to(F64).abs().requires_grad_() for k, v in inputs.items() if v is not None}
    with torch.enable_grad():
        _, big_hf, big_h = gated_ref(
            ls["x"], ls["a"], ls.get("b"), None, dim=dim, reverse=reverse, initial=ls.get("initial")
        )
        _, big_kf, big_k = gated_ref(big_h, ls["a"], None, None, dim=dim, reverse=reverse, initial=ls.get("initial"))
        mag_y = big_k + big_h
        if "c" in ls:
            mag_y = ls["c"].expand(mag_y.shape) * mag_y
        mag_f = big_kf + big_hf
        loss = (w.detach().to(F64).abs() * mag_y).sum()
        if wf is not None:
            loss = loss + (wf.detach().to(F64).abs() * mag_f).sum()
        grads = torch.autograd.grad(loss, list(ls.values()))
    return {"y": mag_y.detach(), "final": mag_f.detach(), **dict(zip(ls, grads))}


def run_ours(
    inputs: dict[str, Optional[Tensor]],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[dict[str, Tensor], Tensor, Optional[Tensor]]:
    """ferroscan.gated_scan on leaf copies of ``inputs`` and its gradients by input name for random
    upstream gradients; returns ``(results, w, wf)``. Checks the shapes, dtypes and devices of
    every output and gradient, and that the inputs are left unchanged."""
    before = {k: v.detach().clone() for k, v in inputs.items() if v is not None}
    ls = leaves(inputs)
    x = ls["x"]
    shape, st_shape = tuple(x.shape), state_shape(tuple(x.shape), dim)
    out = ferroscan.gated_scan(
        x, ls["a"], ls.get("b"), ls.get("c"),
        dim=dim, reverse=reverse, initial=ls.get("initial"), return_final=return_final, out_dtype=out_dtype,
    )  # fmt: skip
    y_dtype = out_dtype or x.dtype
    if return_final:
        assert isinstance(out, tuple) and len(out) == 2
        y, hf = out
        assert hf.shape == st_shape and hf.dtype == x.dtype and hf.device == x.device
    else:
        assert isinstance(out, Tensor)
        y, hf = out, None
    assert y.shape == shape and y.dtype == y_dtype and y.device == x.device

    w = upstream(shape, y, seed)
    wf = upstream(st_shape, hf, seed + 1) if return_final else None
    outputs, weights = [y], [w]
    if return_final:
        outputs.append(hf)
        weights.append(wf)
    grads = dict(zip(ls, torch.autograd.grad(outputs, list(ls.values()), weights)))
    for name, g in grads.items():
        src = inputs[name]
        assert g.shape == src.shape and g.dtype == src.dtype and g.device == src.device, f"gradient of {name}"
    for name, old in before.items():
        torch.testing.assert_close(inputs[name], old, rtol=0, atol=0, equal_nan=True, msg=f"{name} was modified")
    return {"y": y.detach(), "final": None if hf is None else hf.detach(), **grads}, w, wf


def _rounding(result: torch.dtype, work: torch.dtype) -> float:
    """Unit of the final rounding of a result computed in ``work`` and returned as ``result``."""
    return UNIT[result] if UNIT[result] > UNIT[work] else 0.0


def check_gated(
    inputs: dict[str, Optional[Tensor]],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    what: str,
    out_dtype: Optional[torch.dtype] = None,
) -> None:
    """float32/float64 inputs: y, h_final and every gradient within the magnitude bound."""
    x = inputs["x"]
    assert x.dtype in (F32, F64)
    ours, w, wf = run_ours(inputs, dim=dim, reverse=reverse, return_final=return_final, seed=seed, out_dtype=out_dtype)
    ref = reference_run(inputs, w, wf, dim=dim, reverse=reverse)
    mags = magnitudes(inputs, w, wf, dim=dim, reverse=reverse)
    u = UNIT[x.dtype]
    factor = 4 * u + 4 * UNIT[F64]
    keys = ["y"] + (["final"] if return_final else []) + [k for k in NAMES if inputs[k] is not None]
    for key in keys:
        result_dtype = (out_dtype or x.dtype) if key == "y" else x.dtype
        bound = factor * mags[key] + _rounding(result_dtype, x.dtype) * ref[key].abs()
        if key in ("a", "b", "c") and inputs[key].numel() < x.numel():  # broadcast: a sum of n terms
            bound = bound * (1 + x.numel() // inputs[key].numel())
        bound = bound + torch.finfo(result_dtype).tiny
        assert_within(ours[key], ref[key], bound, f"{what}: {key}")


def check_half(
    inputs: dict[str, Optional[Tensor]],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    what: str,
    out_dtype: Optional[torch.dtype] = None,
) -> None:
    """float16/bfloat16 inputs: tolerances from a float32 loop on the same rounded inputs.

    For each result (y, h_final, each gradient): ``2 * err32 + u_res * |ref| + tiny(res)``, where
    ``err32`` is the largest error of the reference loop run in float32 (autograd for its
    gradients), ``u_res`` the unit of the result's format when it is coarser than float32 (the
    single rounding of the float32 result), and ``tiny`` its smallest normal number.
    """
    x = inputs["x"]
    assert x.dtype in HALF
    ours, w, wf = run_ours(inputs, dim=dim, reverse=reverse, return_final=return_final, seed=seed, out_dtype=out_dtype)
    ref = reference_run(inputs, w, wf, dim=dim, reverse=reverse)
    loop32 = reference_run(inputs, w, wf, dim=dim, reverse=reverse, dtype=F32)
    keys = ["y"] + (["final"] if return_final else []) + [k for k in NAMES if inputs[k] is not None]
    for key in keys:
        result_dtype = (out_dtype or x.dtype) if key == "y" else x.dtype
        err32 = (loop32[key].to(F64) - ref[key]).abs().max().item() if ref[key].numel() else 0.0
        bound = 2 * err32 + _rounding(result_dtype, F32) * ref[key].abs() + torch.finfo(result_dtype).tiny
        assert_within(ours[key], ref[key], bound, f"{what}: {key} (float32 loop error {err32:.3g})")


def check(inputs: dict[str, Optional[Tensor]], **kwargs: object) -> None:
    (check_half if inputs["x"].dtype in HALF else check_gated)(inputs, **kwargs)


# ---------------------------------------------------------------------------------------------
# Layouts x lengths, and every mode
# ---------------------------------------------------------------------------------------------


def _layout_cases() -> list:
    cases = []
    for i, name in enumerate(LAYOUTS):
        for j, length in enumerate(LENGTHS):
            mode = MODES[(5 * i + 3 * j) % len(MODES)]
            cases.append(pytest.param(name, length, mode, id=f"{name}-L{length}-{mode_id(mode)}"))
    return cases


@pytest.mark.parametrize(("layout", "length", "mode"), _layout_cases())
def test_layouts_lengths(device: str, layout: str, length: int, mode: tuple) -> None:
    """(B, L, D) dim=1, (B, D, L) dim=-1, rank 2 and 4; lengths 1..1000; float32."""
    reverse, with_initial, return_final, bc = mode
    make_shape, dim = LAYOUTS[layout]
    inputs = make_inputs(make_shape(length), dim, F32, device, seed=length, bc=bc, initial=with_initial)
    check(inputs, dim=dim, reverse=reverse, return_final=return_final, seed=length + 1, what=f"{layout} L={length}")


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_modes(device: str, dtype: torch.dtype, mode: tuple) -> None:
    """Every combination of reverse / initial / return_final / b, c given or None; L=33."""
    reverse, with_initial, return_final, bc = mode
    inputs = make_inputs((2, 33, 3), 1, dtype, device, seed=3, bc=bc, initial=with_initial)
    check(inputs, dim=1, reverse=reverse, return_final=return_final, seed=4, what=f"{dtype} {mode_id(mode)}")


@pytest.fixture(params=["auto", "1", "2"], ids=lambda v: f"lanes-{v}")
def half_lane_states(request: pytest.FixtureRequest, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit CUDA kernels with the launcher's choice of states per lane, and with each choice
    forced through FERROSCAN_GATED_LANE_STATES: test shapes are small, so the launcher alone would
    only ever pick one state per lane."""
    if request.param != "auto":
        if device != "cuda":
            pytest.skip("states per lane are a CUDA launch choice")
        monkeypatch.setenv("FERROSCAN_GATED_LANE_STATES", request.param)


@pytest.mark.usefixtures("half_lane_states")
@pytest.mark.parametrize("length", [7, 257, 1000])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_half_precision(device: str, dtype: torch.dtype, length: int) -> None:
    """float16 / bfloat16 values and gradients, both layouts and directions."""
    for i, layout in enumerate(["BLD-dim1", "BDL-dim-1"]):
        make_shape, dim = LAYOUTS[layout]
        reverse = bool(i)
        inputs = make_inputs(make_shape(length), dim, dtype, device, seed=length + i, initial=not reverse)
        check(inputs, dim=dim, reverse=reverse, return_final=True, seed=9, what=f"{dtype} {layout} L={length}")


@pytest.mark.cuda
@pytest.mark.parametrize("warps", ["4", "8", "16"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("bc", ["bc", "none"])
def test_every_warps_build(dtype: torch.dtype, warps: str, bc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each build of 4, 8 and 16 warps per block (FERROSCAN_GATED_WARPS; the launcher picks one
    per pass and shape), with two states per lane in bfloat16: values and gradients over several
    windows of time, a partial last window and a partial last group of states, both directions."""
    monkeypatch.setenv("FERROSCAN_GATED_WARPS", warps)
    if dtype == BF16:
        monkeypatch.setenv("FERROSCAN_GATED_LANE_STATES", "2")
    for reverse in (False, True):
        inputs = make_inputs((3, 301, 40), 1, dtype, "cuda", seed=int(warps) + reverse, bc=bc, initial=True)
        check(inputs, dim=1, reverse=reverse, return_final=True, seed=5, what=f"{dtype} warps={warps} {bc}")


def needs_clusters() -> None:
    """Skips on GPUs without thread-block clusters (before compute capability 9.0)."""
    if torch.cuda.get_device_capability(0) < (9, 0):
        pytest.skip("thread-block clusters need compute capability 9.0")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("bc", ["bc", "b", "none"])
def test_cluster_build(dtype: torch.dtype, bc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster build (FERROSCAN_GATED_CLUSTER=4: a group's windows split between four blocks
    that exchange their maps through distributed shared memory; the launcher picks it when there
    are fewer groups than multiprocessors), forward and backward: values and gradients over
    several 128-step windows, a partial last window, a partial last group, both directions."""
    needs_clusters()
    monkeypatch.setenv("FERROSCAN_GATED_CLUSTER", "4")
    if dtype == BF16:
        monkeypatch.setenv("FERROSCAN_GATED_LANE_STATES", "2")
    for reverse in (False, True):
        inputs = make_inputs((3, 301, 40), 1, dtype, "cuda", seed=31 + reverse, bc=bc, initial=True)
        check(inputs, dim=1, reverse=reverse, return_final=True, seed=7, what=f"{dtype} cluster {bc}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("bc", ["bc", "b", "none"])
@pytest.mark.parametrize("inner", [40, 128])
def test_staged_build(dtype: torch.dtype, bc: str, inner: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged forward (FERROSCAN_GATED_STAGED=1: inputs copied a window ahead into shared
    memory; the launcher picks it for 16-bit forwards of one block per multiprocessor): values
    and gradients over several 128-step windows, a partial last window, both directions; inner
    128 copies whole rows in 16-byte pieces, inner 40 (groups across rows) a value per lane."""
    monkeypatch.setenv("FERROSCAN_GATED_STAGED", "1")
    monkeypatch.setenv("FERROSCAN_GATED_CLUSTER", "1")
    monkeypatch.setenv("FERROSCAN_GATED_LANE_STATES", "2")
    for reverse in (False, True):
        inputs = make_inputs((3, 301, inner), 1, dtype, "cuda", seed=41 + reverse, bc=bc, initial=True)
        check(inputs, dim=1, reverse=reverse, return_final=True, seed=3, what=f"{dtype} staged {bc} inner={inner}")
    # x one element past a vector boundary: element-wise loads instead of copies, the same
    # arithmetic, so the same y bit for bit.
    x, a, b, c = (inputs[k] for k in ("x", "a", "b", "c"))
    misaligned = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(x).copy_(x)
    assert misaligned.data_ptr() % 4 != 0
    with torch.no_grad():
        assert torch.equal(ferroscan.gated_scan(misaligned, a, b, c), ferroscan.gated_scan(x, a, b, c))


@pytest.mark.usefixtures("half_lane_states")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("bc", ["none", "b", "c"])
def test_half_gates_none(device: str, dtype: torch.dtype, bc: str) -> None:
    inputs = make_inputs((2, 64, 3), 1, dtype, device, seed=17, bc=bc, initial=True)
    check(inputs, dim=1, reverse=False, return_final=False, seed=18, what=f"{dtype} {bc}")


OUT_DTYPES = [
    (F32, F64),
    (F32, F16),
    (F32, BF16),
    (F64, F32),
    (F64, F16),
    (F16, F32),
    (BF16, F32),
    (F16, BF16),
    (BF16, F64),
    (F32, F32),
]


@pytest.mark.parametrize(
    ("dtype", "out_dtype"), OUT_DTYPES, ids=[f"{str(a)[6:]}-to-{str(b)[6:]}" for a, b in OUT_DTYPES]
)
def test_out_dtype(device: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """``out_dtype`` sets y's dtype (h_final and the gradients keep the inputs' dtypes)."""
    inputs = make_inputs((2, 40, 3), 1, dtype, device, seed=21, initial=True)
    check(inputs, dim=1, reverse=True, return_final=True, seed=22, out_dtype=out_dtype, what=f"out {out_dtype}")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_broadcast_gates(device: str, dtype: torch.dtype) -> None:
    """``a``, ``b``, ``c`` of shapes that broadcast to ``x``; their gradients are summed."""
    shapes = {"a": (1, 50, 3), "b": (3,), "c": (2, 1, 3)}
    inputs = make_inputs((2, 50, 3), 1, dtype, device, seed=23, initial=True, shapes=shapes)
    check(inputs, dim=1, reverse=False, return_final=True, seed=24, what="broadcast")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_infinity_survives_underflowing_gates(device: str, reverse: bool) -> None:
    """A state that became infinite stays infinite through gates whose product over a stretch
    underflows to zero, as a step-by-step loop keeps it (inf * 1e-6 is inf at every step): the
    CUDA kernels combine stretches of 8 steps and more, whose gate products are 0 here, and must
    not turn 0 * inf into NaN."""
    shape = (2, 300, 40)
    x = torch.zeros(shape, device=device)
    a = torch.full(shape, 1e-6, device=device)
    hit = 5 if not reverse else 294
    x[:, hit] = float("inf")
    y, final = ferroscan.gated_scan(x, a, reverse=reverse, return_final=True)
    after = torch.arange(300, device=device) >= hit if not reverse else torch.arange(300, device=device) <= hit
    assert y[:, after].isposinf().all(), "infinite from the step that received inf on"
    assert torch.equal(y[:, ~after], torch.zeros_like(y[:, ~after])), "zero before it"
    assert final.isposinf().all()


def test_zero_length(device: str) -> None:
    inputs = make_inputs((2, 0, 3), 1, F64, device, seed=25, initial=True)
    y, hf = ferroscan.gated_scan(
        inputs["x"], inputs["a"], inputs["b"], inputs["c"], initial=inputs["initial"], return_final=True
    )
    assert y.shape == (2, 0, 3)
    torch.testing.assert_close(hf, inputs["initial"], rtol=0, atol=0)


def test_none_gates_equal_ones(device: str) -> None:
    """b=None / c=None give the same results as explicit ones (bitwise, float32)."""
    inputs = make_inputs((2, 65, 3), 1, F32, device, seed=26, bc="none", initial=True)
    x, a, h0 = inputs["x"], inputs["a"], inputs["initial"]
    ones = torch.ones_like(x)
    y1, f1 = ferroscan.gated_scan(x, a, initial=h0, return_final=True)
    y2, f2 = ferroscan.gated_scan(x, a, ones, ones, initial=h0, return_final=True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, finite differences)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_final", [False, True], ids=["y", "y+final"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("shape", "dim"), [((2, 6, 3), 1), ((2, 3, 6), -1)], ids=["BLD", "BDL"])
def test_gradcheck(device: str, shape: tuple[int, ...], dim: int, reverse: bool, return_final: bool) -> None:
    """torch.autograd.gradcheck of x, a, b, c and initial together."""
    inputs = make_inputs(shape, dim, F64, device, seed=31, initial=True)
    args = [inputs[k].clone().requires_grad_() for k in NAMES]

    def fn(x: Tensor, a: Tensor, b: Tensor, c: Tensor, h0: Tensor) -> object:
        return ferroscan.gated_scan(x, a, b, c, dim=dim, reverse=reverse, initial=h0, return_final=return_final)

    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bc", ["none", "b", "c"])
def test_gradcheck_gates_none(device: str, bc: str) -> None:
    inputs = make_inputs((2, 5, 2), 1, F64, device, seed=32, bc=bc)
    names = [k for k in NAMES if inputs[k] is not None]
    args = tuple(inputs[k].clone().requires_grad_() for k in names)

    def fn(*tensors: Tensor) -> Tensor:
        kw = dict(zip(names, tensors))
        return ferroscan.gated_scan(kw["x"], kw["a"], kw.get("b"), kw.get("c"))

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_cases() -> list:
    x = (2, 5, 3)
    f64, f32 = {"dtype": F64}, {"dtype": F32}

    def t(shape: tuple[int, ...], **kw: object) -> Tensor:
        return torch.ones(shape, **kw)

    cases = [
        # (id, kwargs for gated_scan, exception, text the message must contain)
        ("x-int", dict(x=t(x, dtype=torch.int64), a=t(x, **f64)), TypeError, "x"),
        ("x-list", dict(x=[1.0, 2.0], a=t((2,), **f64)), TypeError, "x"),
        ("x-complex", dict(x=t(x, dtype=torch.complex128), a=t(x, **f64)), TypeError, "x"),
        ("a-int", dict(x=t(x, **f64), a=t(x, dtype=torch.int32)), TypeError, "a"),
        ("a-bool", dict(x=t(x, **f64), a=t(x, dtype=torch.bool)), TypeError, "a"),
        ("a-dtype", dict(x=t(x, **f64), a=t(x, **f32)), TypeError, "a"),
        ("b-dtype", dict(x=t(x, **f64), a=t(x, **f64), b=t(x, **f32)), TypeError, "b"),
        ("c-dtype", dict(x=t(x, **f64), a=t(x, **f64), c=t(x, dtype=F16)), TypeError, "c"),
        ("b-int", dict(x=t(x, **f64), a=t(x, **f64), b=t(x, dtype=torch.int64)), TypeError, "b"),
        ("c-int", dict(x=t(x, **f64), a=t(x, **f64), c=t(x, dtype=torch.int64)), TypeError, "c"),
        ("initial-dtype", dict(x=t(x, **f64), a=t(x, **f64), initial=t((2, 3), **f32)), TypeError, "initial"),
        ("initial-int", dict(x=t(x, **f64), a=t(x, **f64), initial=t((2, 3), dtype=torch.int64)), TypeError, "initial"),
        ("out_dtype-int", dict(x=t(x, **f64), a=t(x, **f64), out_dtype=torch.int32), TypeError, "out_dtype"),
        ("a-shape", dict(x=t(x, **f64), a=t((2, 4, 3), **f64)), ValueError, "a"),
        ("a-larger", dict(x=t(x, **f64), a=t((4, 2, 5, 3), **f64)), ValueError, "a"),
        ("initial-shape", dict(x=t(x, **f64), a=t(x, **f64), initial=t((2, 5), **f64)), ValueError, "initial"),
        (
            "initial-shape-BDL",
            dict(x=t(x, **f64), a=t(x, **f64), dim=-1, initial=t((2, 3), **f64)),
            ValueError,
            "initial",
        ),
        ("dim-range", dict(x=t(x, **f64), a=t(x, **f64), dim=3), ValueError, "dim"),
    ]
    params = [pytest.param(kw, exc, text, id=name) for name, kw, exc, text in cases]
    # Cases that found validation bugs (fixed); the reasons say what went wrong before.
    bugs = [
        (
            "a-None", dict(x=t(x, **f64), a=None), TypeError, "a",
            "a=None is not checked: AttributeError 'NoneType' object has no attribute 'to'",
        ),
        (
            "b-shape", dict(x=t(x, **f64), a=t(x, **f64), b=t((2, 4, 3), **f64)), ValueError, "b",
            "b's shape is not checked: torch's RuntimeError from x * b, not naming b",
        ),
        (
            "c-shape", dict(x=t(x, **f64), a=t(x, **f64), c=t((2, 4, 3), **f64)), ValueError, "c",
            "c's shape is not checked: torch's RuntimeError from h * c, not naming c",
        ),
        (
            "b-larger", dict(x=t(x, **f64), a=t(x, **f64), b=t((4, 2, 5, 3), **f64)), ValueError, "b",
            "b of shape (4, 2, 5, 3) broadcasts x (2, 5, 3) up and y comes back (4, 2, 5, 3), unlike a",
        ),
        (
            "c-larger", dict(x=t(x, **f64), a=t(x, **f64), c=t((4, 2, 5, 3), **f64)), ValueError, "c",
            "c of shape (4, 2, 5, 3) broadcasts y up to (4, 2, 5, 3), unlike a",
        ),
        (
            "x-0d", dict(x=torch.tensor(1.0, **f64), a=torch.tensor(1.0, **f64)), ValueError, "x",
            "a 0-d x is rejected by the inner scan with a message naming 'tokens', not x",
        ),
    ]  # fmt: skip
    for name, kw, exc, text, _why_it_failed_before in bugs:
        params.append(pytest.param(kw, exc, text, id=name))
    return params


@pytest.mark.parametrize(("kwargs", "exc", "name"), _bad_cases())
def test_bad_inputs(kwargs: dict, exc: type, name: str) -> None:
    """Bad inputs raise TypeError / ValueError whose message names the argument."""
    with pytest.raises(exc) as info:
        ferroscan.gated_scan(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{name} ") or f" {name} " in message or f"{name}=" in message, message


# ---------------------------------------------------------------------------------------------
# The fused CUDA kernels (time axis not innermost): blocks of 32 states, windows of
# 8 warps x 8 steps, checkpoints every 8 steps, the recomputing backward and its memory.
# ---------------------------------------------------------------------------------------------

FUSED_LENGTHS = [1, 8, 9, 63, 64, 65, 130, 700]


@pytest.mark.cuda
@pytest.mark.parametrize("length", FUSED_LENGTHS)
def test_fused_window_and_group_edges(length: int) -> None:
    """Lengths around the 8-step segments and 64-step windows; 40 and 66 states (a partial group
    of 32); every mode in turn."""
    for i, (shape, dim) in enumerate([((2, length, 20), 1), ((1, length, 33, 2), 1), ((3, 11, length), 2)]):
        mode = MODES[(7 * FUSED_LENGTHS.index(length) + 5 * i) % len(MODES)]
        reverse, with_initial, return_final, bc = mode
        inputs = make_inputs(shape, dim, F32, "cuda", seed=length + i, bc=bc, initial=with_initial)
        check(inputs, dim=dim, reverse=reverse, return_final=return_final, seed=length, what=f"{shape} {mode_id(mode)}")


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_fused_gradcheck(reverse: bool) -> None:
    """Finite differences through the fused kernels: 70 steps (two windows), 34 states."""
    inputs = make_inputs((1, 70, 34), 1, F64, "cuda", seed=41, initial=True)
    args = tuple(inputs[k].clone().requires_grad_() for k in NAMES)

    def fn(x: Tensor, a: Tensor, b: Tensor, c: Tensor, h0: Tensor) -> object:
        return ferroscan.gated_scan(x, a, b, c, dim=1, reverse=reverse, initial=h0, return_final=True)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.cuda
def test_fused_backward_is_deterministic() -> None:
    inputs = make_inputs((2, 300, 64), 1, F32, "cuda", seed=43, initial=True)
    ls = leaves(inputs)
    w = upstream((2, 300, 64), inputs["x"], 44)
    runs = []
    for _ in range(2):
        y = ferroscan.gated_scan(ls["x"], ls["a"], ls["b"], ls["c"], initial=ls["initial"])
        runs.append(torch.autograd.grad(y, list(ls.values()), w))
    for name, g1, g2 in zip(ls, *runs):
        assert torch.equal(g1, g2), f"gradient of {name} differs between two runs"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_fused_peak_memory(dtype: torch.dtype) -> None:
    """Forward + backward allocate no more than y, the four gradients and the checkpoints (the
    state every 8 steps, float32) beyond the inputs: h is never stored."""
    batch, length, channels = 4, 4096, 256
    inputs = make_inputs((batch, length, channels), 1, dtype, "cuda", seed=45)
    ls = leaves(inputs)
    w = upstream((batch, length, channels), inputs["x"], 46)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = ferroscan.gated_scan(ls["x"], ls["a"], ls["b"], ls["c"])
    grads = torch.autograd.grad(y, [ls[k] for k in ("x", "a", "b", "c")], w)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    tensor_bytes = y.numel() * y.element_size()
    checkpoint_bytes = -(-length // 8) * batch * channels * 4
    allowed = 5 * tensor_bytes + checkpoint_bytes + 2**20  # y, 4 gradients, checkpoints, 1 MiB slack
    assert len(grads) == 4
    assert peak <= allowed, f"peak {peak / 2**20:.1f} MiB above the {allowed / 2**20:.1f} MiB allowed"
