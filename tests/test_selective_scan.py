r"""Values and gradients of :func:`ferroscan.selective_scan` against a float64 reference.

The reference (:func:`reference`) is the definition written plainly: a Python loop over time of

.. math::

    h_t = \exp(\Delta_t A) h_{t-1} + \Delta_t u_t B_t, \qquad
    y_t = f\,\mathrm{Re}\Big(\sum_n C_{t,n} h_{t,n}\Big) + D u_t, \qquad
    \text{out}_t = y_t \operatorname{silu}(z_t),

in float64 (complex128 for complex ``A``), vectorized over batch, channels and states. Its
gradients are autograd's through that loop, on float64 copies of exactly the (rounded) inputs
ferroscan saw, with the same upstream gradients.

Tolerances are mamba_ssm's own test tolerances (``tests/ops/test_selective_scan.py``), used for
the outputs *and* every gradient (mamba loosens several gradients by 2-10x; we do not):
float32 ``rtol=6e-4, atol=2e-3``; float16 ``3e-3, 5e-3``; bfloat16 ``3e-2, 5e-2``; float64
``1e-10, 1e-10``. An element passes when ``|ours - ref| <= atol + rtol * |ref|``.

Every test runs on every device of the ``device`` fixture (CPU, and CUDA where there is one).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Optional

import ferroscan
import pytest
import torch
import torch.nn.functional as F

F64 = torch.float64
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
    torch.float64: (1e-10, 1e-10),
}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def _per_step(M: torch.Tensor, dim: int, length: int, complex_: bool):  # noqa: ANN202
    """``t -> (batch or 1, dim, N)``: B or C as channel ``d`` sees it at step ``t``."""
    if M.dim() == 2:
        m = M[None]
        return lambda t: m
    if M.dim() == 3:
        M = M[:, None]
    if complex_ and not M.is_complex():  # Mamba's layout: (re, im) of step t at 2t, 2t+1
        M = torch.view_as_complex(M.unflatten(-1, (length, 2)).contiguous())
    M = M.repeat_interleave(dim // M.shape[1], dim=1)  # channel d uses group d // (dim // G)
    return lambda t: M[..., t]


def reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, last_state)`` by a loop over time, in the inputs' (float64/complex128) dtypes."""
    batch, dim, length = u.shape
    complex_ = A.is_complex()
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    B_at, C_at = _per_step(B, dim, length, complex_), _per_step(C, dim, length, complex_)
    h = initial_state if initial_state is not None else torch.zeros(batch, dim, A.shape[1], dtype=A.dtype)
    ys = []
    for t in range(length):
        step = dt[:, :, t, None]
        h = torch.exp(step * A) * h + step * u[:, :, t, None] * B_at(t)
        y = (C_at(t) * h).sum(-1)
        ys.append(2 * y.real if complex_ else y)
    y = torch.stack(ys, -1) if ys else u * 0
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 4
    length: int = 7
    dstate: int = 3
    complex_: bool = False
    b: str = "const"  # "const", "var1" (3-d, one group) or "var2" (4-d, two groups)
    c: str = "const"
    has_d: bool = False
    has_z: bool = False
    has_bias: bool = False
    softplus: bool = False
    initial: bool = False
    last: bool = False


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int) -> dict[str, Optional[torch.Tensor]]:
    """Inputs rounded to ``dtype`` (weights float32/float64, or complex) on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    weight = F64 if dtype == F64 else torch.float32
    cweight = torch.complex128 if dtype == F64 else torch.complex64
    batch, dim, length, n = case.batch, case.dim, case.length, case.dstate

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=F64)

    def bc(kind: str) -> torch.Tensor:
        if kind == "const":
            value = torch.complex(randn(dim, n), randn(dim, n)) if case.complex_ else randn(dim, n)
            return value.to(cweight if case.complex_ else weight)
        parts = 2 if case.complex_ else 1
        shape = (batch, n, length * parts) if kind == "var1" else (batch, 2, n, length * parts)
        return randn(*shape).to(dtype)

    if case.complex_:
        A = torch.complex(-0.5 * rand(dim, n) - 0.05, 2 * rand(dim, n) - 1).to(cweight)
    else:
        A = (-0.5 * rand(dim, n) - 0.05).to(weight)
    inputs = {
        "u": randn(batch, dim, length).to(dtype),
        "delta": (0.5 * rand(batch, dim, length) + (0.0 if case.softplus else 0.05)).to(dtype),
        "A": A,
        "B": bc(case.b),
        "C": bc(case.c),
        "D": randn(dim).to(weight) if case.has_d else None,
        "z": randn(batch, dim, length).to(dtype) if case.has_z else None,
        "delta_bias": (0.5 * rand(dim)).to(weight) if case.has_bias else None,
        "initial_state": None,
    }
    if case.initial:
        state = torch.complex(randn(batch, dim, n), randn(batch, dim, n)) if case.complex_ else randn(batch, dim, n)
        inputs["initial_state"] = state.to(A.dtype)
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def upstream(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """A random upstream gradient, exactly representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        value = torch.complex(*torch.randn(2, *shape, generator=gen, dtype=F64))
    else:
        value = torch.randn(*shape, generator=gen, dtype=F64)
    return value.to(dtype).to(device)


def _call(fn, inputs: dict, case: Case):  # noqa: ANN001, ANN202
    kwargs = {"initial_state": inputs["initial_state"]} if inputs["initial_state"] is not None else {}
    return fn(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
        inputs["delta_bias"], case.softplus, **kwargs,
    )  # fmt: skip


def run_both(case: Case, dtype: torch.dtype, device: str, seed: int) -> tuple[dict, dict]:
    """ferroscan's and the reference's outputs and gradients, by name."""
    inputs = make_inputs(case, dtype, device, seed)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    ours_in = {k: leaves.get(k) for k in inputs}
    out = ferroscan.selective_scan(
        ours_in["u"], ours_in["delta"], ours_in["A"], ours_in["B"], ours_in["C"], ours_in["D"], ours_in["z"],
        ours_in["delta_bias"], case.softplus, return_last_state=case.last, initial_state=ours_in["initial_state"],
    )  # fmt: skip
    out, last = out if case.last else (out, None)
    assert out.shape == inputs["u"].shape and out.dtype == dtype and out.device == inputs["u"].device
    w = upstream(tuple(out.shape), dtype, device, seed + 1)
    outputs, weights = [out], [w]
    if case.last:
        assert last.shape == (case.batch, case.dim, case.dstate) and last.dtype == inputs["A"].dtype
        w_last = upstream(tuple(last.shape), last.dtype, device, seed + 2)
        outputs.append(last)
        weights.append(w_last)
    grads = torch.autograd.grad(outputs, list(leaves.values()), weights)
    ours = {"out": out, "last": last, **dict(zip(leaves, grads))}
    for name, g in zip(leaves, grads):
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, f"gradient of {name}"

    ref_leaves = {k: v.detach().to("cpu").to(torch.complex128 if v.is_complex() else F64).requires_grad_()
                  for k, v in inputs.items() if v is not None}  # fmt: skip
    ref_out, ref_last = _call(reference, {k: ref_leaves.get(k) for k in inputs}, case)
    ref_outputs, ref_weights = [ref_out], [w.to("cpu").to(F64)]
    if case.last:
        ref_outputs.append(ref_last)
        ref_weights.append(weights[1].to("cpu").to(ref_last.dtype))
    ref_grads = torch.autograd.grad(ref_outputs, list(ref_leaves.values()), ref_weights, allow_unused=True)
    ref_grads = [torch.zeros_like(v) if g is None else g for v, g in zip(ref_leaves.values(), ref_grads)]
    ref = {"out": ref_out, "last": ref_last, **dict(zip(ref_leaves, ref_grads))}
    return ours, ref


def assert_close(ours: dict, ref: dict, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    for name, value in ours.items():
        if value is None:
            continue
        got = value.detach().to("cpu")
        want = ref[name].detach()
        got = got.to(torch.complex128) if got.is_complex() else got.to(F64)
        err = (got - want).abs()
        bound = atol + rtol * want.abs()
        bad = ~(err <= bound)
        if bad.any():
            i = tuple(int(k) for k in bad.nonzero()[0])
            pytest.fail(
                f"{what}: {name}: {int(bad.sum())} of {bad.numel()} elements beyond atol={atol}, rtol={rtol}; "
                f"worst |err| {err.max().item():.3g}; first at {i}: got {got[i].item()}, want {want[i].item()}"
            )


# ---------------------------------------------------------------------------------------------
# Every combination of the options
# ---------------------------------------------------------------------------------------------

FLAG_CASES = [
    Case(complex_=cx, b=b, c=c, has_d=d, has_z=z, has_bias=bias, softplus=sp, initial=init, last=last)
    for cx, b, c, d, z, bias, sp, init, last in itertools.product(
        [False, True], ["const", "var1", "var2"], ["const", "var1", "var2"], *[[False, True]] * 6
    )
]


def case_id(case: Case) -> str:
    flags = [("cplx", case.complex_), ("D", case.has_d), ("z", case.has_z), ("bias", case.has_bias),
             ("sp", case.softplus), ("h0", case.initial), ("last", case.last)]  # fmt: skip
    return "-".join([f"B{case.b}", f"C{case.c}"] + [name for name, on in flags if on])


@pytest.mark.parametrize("case", FLAG_CASES, ids=case_id)
def test_every_option_float32(device: str, case: Case) -> None:
    ours, ref = run_both(case, torch.float32, device, seed=FLAG_CASES.index(case))
    assert_close(ours, ref, torch.float32, case_id(case))


LENGTH_CASE = Case(batch=1, dim=2, dstate=4, b="var2", c="var1", has_d=True, has_z=True, has_bias=True,
                   softplus=True, initial=True, last=True)  # fmt: skip


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("length", [0, 1, 7, 15, 16, 17, 128, 372, 2048, 4097])
def test_lengths(device: str, length: int, complex_: bool) -> None:
    case = replace(LENGTH_CASE, length=length, complex_=complex_)
    ours, ref = run_both(case, torch.float32, device, seed=length)
    assert_close(ours, ref, torch.float32, f"L={length}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("bc", [("var2", "var1"), ("const", "const")], ids=["variable", "constant"])
def test_dtypes(device: str, dtype: torch.dtype, complex_: bool, bc: tuple[str, str]) -> None:
    case = Case(batch=2, dim=4, length=150, dstate=8, complex_=complex_, b=bc[0], c=bc[1], has_d=True,
                has_z=True, has_bias=True, softplus=True, initial=True, last=True)  # fmt: skip
    ours, ref = run_both(case, dtype, device, seed=3)
    assert_close(ours, ref, dtype, str(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("dstate", [16, 32])
def test_whole_tiles(device: str, dtype: torch.dtype, complex_: bool, dstate: int) -> None:
    """Enough channels for whole channel tiles (4 lanes per channel at N = 16, 8 at N = 32), so
    the CUDA kernels load and store their tiles as vectors (16 bytes, or 8 and 4 in the
    backward's 16-step segments), and a last partial chunk that goes element by element. Rows of
    296 steps start on 16-byte boundaries, as vectors need."""
    case = Case(batch=2, dim=64, length=296, dstate=dstate, complex_=complex_, b="var1", c="var1", has_d=True,
                has_z=True, has_bias=True, softplus=True, initial=True, last=True)  # fmt: skip
    ours, ref = run_both(case, dtype, device, seed=dstate)
    assert_close(ours, ref, dtype, f"{dtype} N={dstate}")


def test_larger_state_and_groups(device: str) -> None:
    """N = 256 states, 8 groups of 4 channels."""
    case = Case(batch=1, dim=32, length=20, dstate=256, b="var2", c="const", has_d=True, softplus=True, last=True)
    inputs_case = case
    ours, ref = run_both(inputs_case, torch.float32, device, seed=11)
    assert_close(ours, ref, torch.float32, "N=256")


# ---------------------------------------------------------------------------------------------
# gradcheck, determinism, layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("bc", [("var2", "var1"), ("const", "const")], ids=["variable", "constant"])
def test_gradcheck_float64(device: str, complex_: bool, bc: tuple[str, str]) -> None:
    case = Case(batch=2, dim=2, length=5, dstate=2, complex_=complex_, b=bc[0], c=bc[1], has_d=True,
                has_z=True, has_bias=True, softplus=True, initial=True)  # fmt: skip
    inputs = make_inputs(case, F64, device, seed=5)
    leaves = [inputs[k].detach().clone().requires_grad_() for k in NAMES]

    def fn(u, delta, A, B, C, D, z, bias, h0):  # noqa: ANN001, ANN202
        return ferroscan.selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=h0)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


CHUNK_CASES = {
    "real-variable-all-flags": Case(batch=2, dim=6, length=300, dstate=16, b="var2", c="var1", has_d=True,
                                    has_z=True, has_bias=True, softplus=True, initial=True, last=True),
    "real-constant-no-z": Case(batch=1, dim=5, length=257, dstate=16, b="const", c="const", has_d=True,
                               has_bias=True, initial=True),
    "real-N40-groups": Case(batch=2, dim=4, length=200, dstate=40, b="var2", c="var2", has_z=True, last=True),
    "complex-variable-constant": Case(batch=2, dim=3, length=230, dstate=8, complex_=True, b="var1", c="const",
                                      has_d=True, has_z=True, softplus=True, initial=True, last=True),
}  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", [2, 5])
@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_backward_time_chunks(monkeypatch: pytest.MonkeyPatch, name: str, chunks: int) -> None:
    """The CUDA backward cut into time chunks (what the launcher does for few, long rows; forced
    here on short ones through its tuning hook): values and every gradient against the reference,
    including the initial state's (the first chunk's adjoint, composed from the later chunks')."""
    monkeypatch.setenv("FERROSCAN_SELECTIVE_CHUNKS", str(chunks))
    ours, ref = run_both(CHUNK_CASES[name], torch.float32, "cuda", seed=chunks)
    assert_close(ours, ref, torch.float32, f"{name}, {chunks} chunks")


@pytest.mark.parametrize("chunks", ["", "3"], ids=["whole", "chunks"])
def test_backward_is_deterministic(device: str, chunks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backward passes give bit-identical gradients (no atomics: fixed-order reductions), also
    with the CUDA backward cut into time chunks."""
    if chunks:
        monkeypatch.setenv("FERROSCAN_SELECTIVE_CHUNKS", chunks)
    case = Case(batch=2, dim=64, length=300, dstate=16, b="var1", c="var1", has_d=True, has_z=True,
                has_bias=True, softplus=True, initial=True, last=True)  # fmt: skip
    inputs = make_inputs(case, torch.float32, device, seed=8)
    w = upstream((case.batch, case.dim, case.length), torch.float32, device, 9)

    def grads() -> list[torch.Tensor]:
        leaves = [inputs[k].detach().clone().requires_grad_() for k in NAMES]
        out, last = ferroscan.selective_scan(*leaves[:8], True, True, initial_state=leaves[8])
        return list(torch.autograd.grad((out, last), leaves, (w, torch.ones_like(last))))

    first, second = grads(), grads()
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"d/d{name} differs between two runs"


def test_channels_last_views_match_contiguous(device: str) -> None:
    """``u``, ``delta``, ``z`` as transposed ``(batch, L, dim)`` tensors and a variable ``B`` as
    a transposed ``(batch, L, N)`` tensor give the contiguous results exactly, gradients too."""
    case = Case(batch=2, dim=8, length=100, dstate=4, b="var1", c="var2", has_d=True, has_z=True,
                has_bias=True, softplus=True, last=True)  # fmt: skip
    inputs = make_inputs(case, torch.float32, device, seed=4)
    w = upstream((case.batch, case.dim, case.length), torch.float32, device, 5)

    def run(layout: str) -> list[torch.Tensor]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
        args = dict(leaves)
        if layout == "channels_last":
            for k in ("u", "delta", "z"):
                args[k] = leaves[k].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                leaves[k] = args[k]
            args["B"] = leaves["B"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
            leaves["B"] = args["B"]
            assert args["u"].stride() == (case.length * case.dim, 1, case.dim)
        out, last = ferroscan.selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"],
                                             args["z"], args["delta_bias"], True, True)  # fmt: skip
        grads = torch.autograd.grad((out, last), list(leaves.values()), (w, torch.ones_like(last)))
        return [out, last, *grads]

    for a, b in zip(run("contiguous"), run("channels_last")):
        assert torch.equal(a, b)


def test_complex_variable_bc_as_complex_tensor(device: str) -> None:
    """A complex-typed variable ``B`` ``(batch, G, N, L)`` is the same as Mamba's interleaved real
    ``(batch, G, N, 2L)`` layout."""
    case = Case(complex_=True, b="var2", c="var1", has_d=True, length=9)
    inputs = make_inputs(case, torch.float32, device, seed=6)
    as_complex = torch.view_as_complex(inputs["B"].unflatten(-1, (case.length, 2)).contiguous())
    args = (inputs["u"], inputs["delta"], inputs["A"])
    want = ferroscan.selective_scan(*args, inputs["B"], inputs["C"], inputs["D"])
    got = ferroscan.selective_scan(*args, as_complex, inputs["C"], inputs["D"])
    assert torch.equal(got, want)


def test_last_state_gradient_with_constant_b(device: str) -> None:
    """The last state alone is differentiable (mamba's last state is not, with constant B)."""
    case = Case(b="const", c="const", length=20, last=True, initial=True)
    inputs = make_inputs(case, torch.float64, device, seed=12)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    _, last = ferroscan.selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                       return_last_state=True, initial_state=leaves["initial_state"])  # fmt: skip
    grads = torch.autograd.grad(last.sum(), list(leaves.values()))
    ref_leaves = {k: v.detach().cpu().requires_grad_() for k, v in inputs.items() if v is not None}
    _, ref_last = reference(ref_leaves["u"], ref_leaves["delta"], ref_leaves["A"], ref_leaves["B"], ref_leaves["C"],
                            initial_state=ref_leaves["initial_state"])  # fmt: skip
    ref_grads = torch.autograd.grad(ref_last.sum(), list(ref_leaves.values()), allow_unused=True)
    ref_grads = [torch.zeros_like(v) if g is None else g for v, g in zip(ref_leaves.values(), ref_grads)]
    for name, g, r in zip(leaves, grads, ref_grads):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-10, msg=f"d last / d{name}")


def test_expanded_upstream_gradient(device: str) -> None:
    """``out.sum().backward()`` hands the backward a stride-0 (expanded) gradient: read in place."""
    case = Case(b="var1", c="const", has_z=True, has_d=True, length=40)
    inputs = make_inputs(case, torch.float32, device, seed=17)
    grads = []
    for expanded in (True, False):
        leaves = [inputs[k].detach().clone().requires_grad_() for k in NAMES[:7]]
        out = ferroscan.selective_scan(*leaves, None, True)
        if expanded:
            out.sum().backward()
        else:
            out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(NAMES, *grads):
        assert torch.equal(a, b), f"d/d{name}"


def test_no_grad_saves_nothing_and_matches(device: str) -> None:
    case = Case(b="var1", c="var2", has_z=True, length=80, last=True)
    inputs = make_inputs(case, torch.float32, device, seed=13)
    with torch.no_grad():
        out, last = _call(lambda *a, **k: ferroscan.selective_scan(*a, return_last_state=True, **k), inputs, case)
    out2, last2 = _call(lambda *a, **k: ferroscan.selective_scan(*a, return_last_state=True, **k), inputs, case)
    assert torch.equal(out, out2) and torch.equal(last, last2)


# ---------------------------------------------------------------------------------------------
# torch.compile and the custom ops
# ---------------------------------------------------------------------------------------------


def _block(u, delta, A, B, C, D, z, bias, h0):  # noqa: ANN001, ANN202
    out, last = ferroscan.selective_scan(u * 2, delta, A, B, C, D, z, bias, True, True, initial_state=h0)
    return out.tanh().sum(1), last * 3


def test_compile_fullgraph_matches_eager(device: str) -> None:
    torch._dynamo.reset()
    case = Case(b="var2", c="var1", has_d=True, has_z=True, has_bias=True, softplus=True, initial=True, length=70)
    inputs = make_inputs(case, torch.float32, device, seed=14)
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    eager_in = [inputs[k].detach().clone().requires_grad_() for k in NAMES]
    comp_in = [inputs[k].detach().clone().requires_grad_() for k in NAMES]
    eager_out, comp_out = _block(*eager_in), compiled(*comp_in)
    for e, c in zip(eager_out, comp_out):
        assert torch.equal(e, c)
    w = [torch.randn_like(o) for o in eager_out]
    eager_grads, comp_grads = torch.autograd.grad(eager_out, eager_in, w), torch.autograd.grad(comp_out, comp_in, w)
    for name, e, c in zip(NAMES, eager_grads, comp_grads):
        assert torch.equal(e, c), f"d/d{name}"


def test_compile_dynamic_lengths(device: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager", dynamic=True)
    for length in (17, 64, 130):
        case = Case(b="var1", c="const", has_d=True, initial=True, length=length)
        inputs = make_inputs(case, torch.float32, device, seed=length)
        args = [inputs[k] for k in NAMES]
        for e, c in zip(_block(*args), compiled(*args)):
            assert torch.equal(e, c)


def test_opcheck(device: str) -> None:
    for case in (
        Case(b="var2", c="var1", has_d=True, has_z=True, has_bias=True, softplus=True, initial=True, length=70),
        Case(complex_=True, b="const", c="var1", length=5),
    ):
        inputs = make_inputs(case, torch.float32, device, seed=15)
        args = [inputs[k] for k in NAMES[:5]]
        args[3] = args[3] if args[3].dim() != 3 else args[3].unsqueeze(1)
        args[4] = args[4] if args[4].dim() != 3 else args[4].unsqueeze(1)
        args += [inputs[k] for k in NAMES[5:]] + [case.softplus]
        grad_args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.ferroscan.selective_scan_fwd.default, (*grad_args, True))
        torch.library.opcheck(torch.ops.ferroscan.selective_scan_fwd.default, (*args, False))
        out, last, checkpoints = torch.ops.ferroscan.selective_scan_fwd(*args, True)
        grad_out = torch.randn_like(out)
        for grad_last in (None, torch.randn_like(last)):
            bwd_args = (*args[:9], grad_out, grad_last, checkpoints, case.softplus)
            torch.library.opcheck(torch.ops.ferroscan.selective_scan_bwd.default, bwd_args)


class _MambaLikeBlock(torch.nn.Module):
    """A projection, then the selective scan with Mamba-1's options, then a sum."""

    def __init__(self, dim: int, dstate: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, dstate + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        u = self.proj(x).transpose(1, 2)  # (batch, dim, L), channels-last in memory
        return ferroscan.selective_scan(u, u.sigmoid(), -self.A_log.exp(), B, C, self.D, u, None, True)


def test_export_keeps_the_op_as_one_node(device: str) -> None:
    block = _MambaLikeBlock(6, 4).to(device)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 30, 6, generator=gen).to(device)
    B, C = torch.randn(2, 4, 30, generator=gen).to(device), torch.randn(2, 4, 30, generator=gen).to(device)
    exported = torch.export.export(block, (x, B, C))
    nodes = [n.target for n in exported.graph.nodes if n.op == "call_function" and "ferroscan" in str(n.target)]
    assert nodes == [torch.ops.ferroscan.selective_scan_fwd.default], exported.graph
    torch.testing.assert_close(exported.module()(x, B, C), block(x, B, C), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear exception naming the argument
# ---------------------------------------------------------------------------------------------


def _good() -> dict:
    return make_inputs(Case(b="var2", c="const", has_d=True, has_z=True, has_bias=True, initial=True), torch.float32,
                       "cpu", seed=0)  # fmt: skip


def _run(inputs: dict, **kwargs: object) -> object:
    return ferroscan.selective_scan(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
        inputs["delta_bias"], initial_state=inputs["initial_state"], **kwargs,
    )  # fmt: skip


BAD = [
    # (argument, replacement as a function of the good inputs, exception)
    ("u", lambda x: x["u"][0], ValueError),
    ("u", lambda x: x["u"].to(torch.int32), TypeError),
    ("u", lambda x: x["u"].tolist(), TypeError),
    ("delta", lambda x: x["delta"][:, :, :-1], ValueError),
    ("delta", lambda x: x["delta"].double(), TypeError),
    ("A", lambda x: x["A"][:-1], ValueError),
    ("A", lambda x: x["A"].double(), TypeError),
    ("A", lambda x: x["A"].bfloat16(), TypeError),
    ("A", lambda x: x["A"][:, :0], ValueError),
    ("B", lambda x: x["B"][..., :-1], ValueError),
    ("B", lambda x: x["B"].double(), TypeError),
    ("B", lambda x: x["B"][None], ValueError),
    ("B", lambda x: torch.randn(2, 3, 3, 7), ValueError),  # 3 groups do not divide dim = 4
    ("B", lambda x: torch.randn(4, 3, dtype=torch.complex64), TypeError),
    ("C", lambda x: x["C"].T, ValueError),
    ("C", lambda x: x["C"].half(), TypeError),
    ("C", lambda x: torch.randn(2, 3, 7, dtype=torch.complex64), TypeError),  # complex C, real A
    ("D", lambda x: x["D"][:-1], ValueError),
    ("D", lambda x: x["D"].double(), TypeError),
    ("z", lambda x: x["z"][:1], ValueError),
    ("z", lambda x: x["z"].half(), TypeError),
    ("delta_bias", lambda x: x["delta_bias"][None], ValueError),
    ("initial_state", lambda x: x["initial_state"][:, :, :-1], ValueError),
    ("initial_state", lambda x: x["initial_state"].to(torch.complex64), TypeError),
]


@pytest.mark.parametrize(("arg", "bad", "exc"), BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_argument(arg: str, bad, exc: type) -> None:  # noqa: ANN001
    inputs = _good()
    inputs[arg] = bad(inputs)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        _run(inputs)


@pytest.mark.parametrize("flag", ["delta_softplus", "return_last_state"])
def test_flags_must_be_bools(flag: str) -> None:
    with pytest.raises(TypeError, match=flag):
        _run(_good(), **{flag: 1})


@pytest.mark.cuda
def test_inputs_on_two_devices() -> None:
    inputs = _good()
    inputs["B"] = inputs["B"].cuda()
    with pytest.raises(ValueError, match=r"\bB\b"):
        _run(inputs)


def test_nan_is_a_value_not_an_error() -> None:
    inputs = _good()
    inputs["u"][0, 1, 3] = float("nan")
    out = _run(inputs)
    assert out[0, 1, 3:].isnan().all() and out[0, 0].isfinite().all() and out[1].isfinite().all()


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements (CUDA, `large`)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.large
def test_more_than_2_31_elements() -> None:
    """(1, 2^15, 2^16 + 8) bfloat16 sequences (2.15e9 elements each): 64-bit indexing in the
    forward and backward kernels. Rows are independent, so the first, a middle and the last three
    channels (the last ones past flat index 2^31) are checked against the float64 reference run on
    those channels alone: ``out`` and the per-row gradients of ``u``, ``delta`` and ``z``."""
    batch, dim, length, n = 1, 2**15, 2**16 + 8, 4
    numel = batch * dim * length
    assert numel > 2**31
    # u, delta, z, out, dout, du, ddelta, dz in bfloat16; checkpoints and per-tile dB/dC partials in
    # float32; 2 GiB slack.
    need = 8 * 2 * numel + 4 * numel * n // 16 + 2 * 4 * batch * (dim // 32) * n * length + 2 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16

    def randn(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    inputs = {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5 - 2,
        "A": -0.5 * torch.rand(dim, n, generator=gen, device="cuda") - 0.05,
        "B": randn(batch, 1, n, length),
        "C": randn(batch, 1, n, length),
        "D": randn(dim, dtype=torch.float32),
        "z": randn(batch, dim, length),
        "delta_bias": torch.rand(dim, generator=gen, device="cuda") * 0.5,
    }
    leaves = {k: inputs[k].requires_grad_() for k in ("u", "delta", "z")}
    out = ferroscan.selective_scan(*(inputs[k] for k in NAMES[:8]), True)
    w = randn(batch, dim, length)
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), w)))
    rows = [0, dim // 2, dim - 3, dim - 2, dim - 1]
    sub = {k: v.detach()[:, rows].cpu().double() if v.dim() == 3 and k != "B" and k != "C" else v.detach().cpu()
           for k, v in inputs.items()}  # fmt: skip
    sub["A"], sub["D"], sub["delta_bias"] = (inputs[k].detach()[rows].cpu().double() for k in ("A", "D", "delta_bias"))
    sub["B"], sub["C"] = inputs["B"].detach().cpu().double(), inputs["C"].detach().cpu().double()
    ref_leaves = {k: sub[k].requires_grad_() for k in ("u", "delta", "z")}
    ref_out, _ = reference(*(sub[k] for k in NAMES[:8]), True)
    ref_grads = torch.autograd.grad(ref_out, list(ref_leaves.values()), w[:, rows].cpu().double())
    ours = {"out": out.detach()[:, rows], **{k: g[:, rows] for k, g in grads.items()}}
    ref = {"out": ref_out.detach(), **dict(zip(ref_leaves, ref_grads))}
    assert_close(ours, ref, bf16, "2^31+ elements")
