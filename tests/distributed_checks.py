r"""Checks of :mod:`ferroscan.distributed` run inside spawned process groups (imported by the
spawned workers and by ``test_distributed.py``).

Every *problem* check follows one recipe. All ranks build the same full-length inputs from a
seed (float64 values rounded to the case's dtype). On each rank:

* the **single-process result** on the concatenated sequence: the single-device operation
  (``ferroscan.scan`` / ``gated_scan`` / ``selective_scan``) on the full inputs, in float64 on the
  rounded values (the reference) and in the case's dtype (to size the tolerance), with the loss
  :math:`\sum_r \langle y_r, w_r\rangle + \langle h_\text{final}, \sum_r \bar w_r\rangle`;
* the **distributed result**: this rank's slice of every time-sharded input (uneven lengths,
  some empty), the replicated inputs as they are, the distributed op, the loss
  :math:`\langle y_r, w_r\rangle + \langle h_\text{final}, \bar w_r\rangle` and its backward.
  Gradients of sharded inputs are compared slice by slice; gradients of replicated inputs
  (``initial``, shared gates, ``A``, ``D``...) are all-reduced (summed over ranks) first, which is
  the documented convention.

Tolerance: with :math:`e_1` the single-process error (its own dtype against float64) relative to
the largest reference magnitude, the distributed error must be within
:math:`\max(4 e_1, 64 L u)` (float32/float64, :math:`u` the unit roundoff, :math:`L` the total
length) or :math:`\max(4 e_1, 8u)` (half types, computed in float32 and rounded once), relative to
that magnitude. A missing cross-rank term makes an error of order one.

The selective-scan checks use ``ferroscan.selective_scan`` when it exists (skipped otherwise);
the ``standin`` ones replace it, for that check only, by :func:`selective_ref` (a plain float64
loop written here) to test the distributed wiring of that operation today.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import ferroscan
import ferroscan.distributed as fd
import torch
import torch.distributed as dist
import torch.nn.functional as F

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
UNIT = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, torch.float16: 2.0**-11}
Tensor = torch.Tensor

#: Slice lengths per rank, by group size (uneven; the empty-slice checks use EMPTY).
LENGTHS = {1: [9], 2: [5, 9], 3: [6, 1, 4]}
EMPTY = {2: [0, 7], 3: [6, 0, 5]}


class Skip(Exception):
    """Raised by a check that cannot run here (the reason is reported as a pytest skip)."""


class Mismatch(AssertionError):
    """A result differs from the expected one, found after all of a check's collectives (so the
    ranks are still in step and the next check may run)."""


@dataclass
class Ctx:
    """What a check sees: this rank, the group size, the device and the default group."""

    rank: int
    world: int
    device: torch.device


# ---------------------------------------------------------------------------------------------
# A plain selective-scan loop (Mamba's S6), float64-capable: the stand-in for the local op
# ---------------------------------------------------------------------------------------------


def _per_step(m: Tensor, t: int, batch: int, channels: int) -> Tensor:
    """B or C at step t as (batch, dim, N): time-invariant (dim, N), (batch, N, L) or (batch, G, N, L)."""
    if m.dim() == 2:
        return m[None].expand(batch, *m.shape)
    if m.dim() == 3:
        return m[:, None, :, t].expand(batch, channels, m.shape[1])
    return m[:, :, :, t].repeat_interleave(channels // m.shape[1], dim=1)


def selective_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False, *, initial_state=None):  # fmt: skip
    r""":math:`h_t = \exp(\Delta_t A) h_{t-1} + \Delta_t B_t u_t`, :math:`y_t = C_t \cdot h_t + D u_t`,
    times :math:`\mathrm{silu}(z_t)`, as a loop over time (differentiable by autograd)."""
    step = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        step = F.softplus(step)
    batch, channels, length = u.shape
    h = u.new_zeros(batch, channels, A.shape[1]) if initial_state is None else initial_state.to(u.dtype)
    ys = []
    for t in range(length):
        dt = step[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * _per_step(B, t, batch, channels) * u[:, :, t, None]
        ys.append((h * _per_step(C, t, batch, channels)).sum(-1))
    y = torch.stack(ys, -1) if length else u * 0
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


@contextlib.contextmanager
def selective_standin() -> Iterator[None]:
    """``ferroscan.selective_scan`` replaced by :func:`selective_ref` inside the block."""
    missing = object()
    old = getattr(ferroscan, "selective_scan", missing)
    ferroscan.selective_scan = selective_ref
    try:
        yield
    finally:
        if old is missing:
            del ferroscan.selective_scan
        else:
            ferroscan.selective_scan = old


def selective_available() -> bool:
    return hasattr(ferroscan, "selective_scan")


# ---------------------------------------------------------------------------------------------
# Problems: full inputs, which of them are sharded, and how to call the op
# ---------------------------------------------------------------------------------------------

#: ``call(inputs, group)``: the single-device op when ``group`` is None, else the distributed one;
#: returns ``(y, final or None)``.
Call = Callable[[dict, Optional[dist.ProcessGroup]], tuple]


@dataclass
class Problem:
    full: dict[str, Optional[Tensor]]
    time_axis: dict[str, Optional[int]]  #: axis sharded over ranks; None: replicated input
    out_axis: int
    call: Call
    has_final: bool = True
    lengths: Optional[list[int]] = None
    frozen: set[str] = field(default_factory=set)  #: inputs that do not require grad


def _rand(gen: torch.Generator, shape: tuple, kind: str) -> Tensor:
    if kind == "gate":
        return 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64)
    if kind == "neg":
        return -(0.5 + torch.rand(shape, generator=gen, dtype=F64))
    if kind == "step":
        return 0.05 + 0.45 * torch.rand(shape, generator=gen, dtype=F64)
    return torch.randn(shape, generator=gen, dtype=F64)


def _inputs(specs: dict[str, tuple[tuple, str]], dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: _rand(gen, shape, kind).to(dtype).to(device) for k, (shape, kind) in specs.items()}


def scan_problem(ctx: Ctx, dtype: torch.dtype, reverse: bool, *, layout: str = "BDL", initial: bool = True,
                 final: bool = True, shared_gates: bool = False, lengths: Optional[list[int]] = None,
                 validate: bool = True) -> Problem:  # fmt: skip
    lengths = lengths or LENGTHS[ctx.world]
    n = sum(lengths)
    shape, dim = ((2, 3, n), -1) if layout == "BDL" else ((n, 2, 3), 0)
    state = (2, 3)
    gate_shape = ((1, 3, 1) if layout == "BDL" else (1, 1, 3)) if shared_gates else shape
    specs = {"gates": (gate_shape, "gate"), "tokens": (shape, "normal")}
    if initial:
        specs["initial"] = (state, "normal")
    full = _inputs(specs, dtype, ctx.device, seed=11 + ctx.world)
    axis = dim % 3
    time_axis = {"gates": None if shared_gates else axis, "tokens": axis, "initial": None}

    def call(inp: dict, group: Optional[dist.ProcessGroup]) -> tuple:
        kw = dict(dim=dim, reverse=reverse, initial=inp.get("initial"), return_final=final)
        if group is None:
            out = ferroscan.scan(inp["gates"], inp["tokens"], **kw)
        else:
            out = fd.scan(inp["gates"], inp["tokens"], group=group, validate=validate, **kw)
        return out if final else (out, None)

    return Problem(full, time_axis, axis, call, has_final=final, lengths=lengths)


def gated_problem(ctx: Ctx, dtype: torch.dtype, reverse: bool, *, layout: str = "BLD", shared_c: bool = False,
                  no_b: bool = False, lengths: Optional[list[int]] = None,
                  out_dtype: Optional[torch.dtype] = None) -> Problem:  # fmt: skip
    lengths = lengths or LENGTHS[ctx.world]
    n = sum(lengths)
    shape, dim = ((2, n, 3), 1) if layout == "BLD" else ((2, 3, n), -1)
    specs = {"x": (shape, "normal"), "a": (shape, "gate")}
    if not no_b:
        specs["b"] = (shape, "normal")
    specs["c"] = ((1, 1, 3) if shared_c else shape, "normal")
    specs["initial"] = ((2, 3), "normal")
    full = _inputs(specs, dtype, ctx.device, seed=23 + ctx.world)
    axis = dim % 3
    time_axis = {"x": axis, "a": axis, "b": axis, "c": None if shared_c else axis, "initial": None}

    def call(inp: dict, group: Optional[dist.ProcessGroup]) -> tuple:
        args = (inp["x"], inp["a"], inp.get("b"), inp["c"])
        kw = dict(dim=dim, reverse=reverse, initial=inp["initial"], return_final=True, out_dtype=out_dtype)
        if group is None:
            return ferroscan.gated_scan(*args, **kw)
        return fd.gated_scan(*args, group=group, **kw)

    return Problem(full, time_axis, axis, call, lengths=lengths)


def selective_problem(ctx: Ctx, dtype: torch.dtype, *, variable: str = "BL", softplus: bool = True,
                      lengths: Optional[list[int]] = None) -> Problem:  # fmt: skip
    """``variable``: ``"BL"`` B/C of shape (batch, N, L); ``"BGL"`` grouped (batch, G, N, L);
    ``"const"`` time-invariant (dim, N), replicated."""
    lengths = lengths or LENGTHS[ctx.world]
    n, batch, channels, state_n = sum(lengths), 2, 4, 3
    seq = (batch, channels, n)
    bc = {"BL": (batch, state_n, n), "BGL": (batch, 2, state_n, n), "const": (channels, state_n)}[variable]
    specs = {
        "u": (seq, "normal"),
        "delta": (seq, "normal" if softplus else "step"),
        "A": ((channels, state_n), "neg"),
        "B": (bc, "normal"),
        "C": (bc, "normal"),
        "D": ((channels,), "normal"),
        "z": (seq, "normal"),
        "delta_bias": ((channels,), "normal"),
        "initial_state": ((batch, channels, state_n), "normal"),
    }
    full = _inputs(specs, dtype, ctx.device, seed=37 + ctx.world)
    bc_axis = None if variable == "const" else len(bc) - 1
    time_axis = {"u": 2, "delta": 2, "z": 2, "B": bc_axis, "C": bc_axis}
    time_axis.update({k: None for k in ("A", "D", "delta_bias", "initial_state")})

    def call(inp: dict, group: Optional[dist.ProcessGroup]) -> tuple:
        args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        kw = dict(delta_softplus=softplus, return_last_state=True, initial_state=inp["initial_state"])
        if group is None:
            return ferroscan.selective_scan(*args, **kw)
        return fd.selective_scan(*args, group=group, **kw)

    return Problem(full, time_axis, 2, call, lengths=lengths)


# ---------------------------------------------------------------------------------------------
# Running a problem and comparing
# ---------------------------------------------------------------------------------------------


def _slice(t: Tensor, axis: int, start: int, length: int) -> Tensor:
    return t.narrow(axis, start, length)


def _upstream(shape: tuple, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(device)


def _single(p: Problem, dtype: torch.dtype, w: Tensor, wf: Optional[Tensor]) -> dict[str, Tensor]:
    """Single-process values and gradients on the full sequence, computed in ``dtype``."""
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_(k not in p.frozen)
              for k, v in p.full.items()}  # fmt: skip
    out, final = p.call(leaves, None)
    loss = (out.to(F64) * w.to(F64)).sum()
    if p.has_final:
        loss = loss + (final.to(F64) * wf.to(F64)).sum()
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    res = {"y": out.detach(), **{"grad_" + k: g for k, g in zip(names, grads)}}
    if p.has_final:
        res["final"] = final.detach()
    return res


def run_problem(ctx: Ctx, p: Problem, dtype: torch.dtype, group: Optional[dist.ProcessGroup] = None) -> None:
    """Distributed values and gradients against the single-process ones (AssertionError if not)."""
    world = ctx.world if group is None else dist.get_world_size(group)
    rank = ctx.rank if group is None else dist.get_rank(group)
    lengths = p.lengths or LENGTHS[world]
    start, length, total = sum(lengths[:rank]), lengths[rank], sum(lengths)
    # Upstream gradients (the same on every rank): one for y, one per rank for the final state.
    with torch.no_grad():
        y0, final0 = p.call(dict(p.full), None)
    w = _upstream(tuple(y0.shape), y0.dtype, ctx.device, 101)
    wfs = []
    if p.has_final:
        wfs = [_upstream(tuple(final0.shape), final0.dtype, ctx.device, 200 + r) for r in range(world)]
    ref = _single(p, F64, w, sum(wf.to(F64) for wf in wfs) if wfs else None)
    same = _single(p, dtype, w, sum(wfs) if wfs else None) if dtype != F64 else ref

    local = {}
    for k, v in p.full.items():
        if v is None:
            local[k] = None
            continue
        axis = p.time_axis.get(k)
        t = v if axis is None else _slice(v, axis, start, length)
        local[k] = t.detach().clone().requires_grad_(k not in p.frozen)
    out, final = p.call(local, dist.group.WORLD if group is None else group)
    loss = (out.to(F64) * _slice(w, p.out_axis, start, length).to(F64)).sum()
    if p.has_final:
        loss = loss + (final.to(F64) * wfs[rank].to(F64)).sum()
    loss.backward()
    got = {"y": out.detach()}
    if p.has_final:
        got["final"] = final.detach()
    for k, v in local.items():
        if v is None or not v.requires_grad:
            continue
        g = torch.zeros_like(v) if v.grad is None else v.grad
        if p.time_axis.get(k) is None:
            g = g.clone()
            dist.all_reduce(g, group=group)  # replicated input: the sum over ranks is the gradient
        got["grad_" + k] = g

    unit = UNIT[dtype]
    floor = 8 * unit if dtype in (BF16, torch.float16) else 64 * total * unit
    problems = []
    for key, want in ref.items():
        if key not in got:
            if key.startswith("grad_") and p.full[key[5:]] is not None and key[5:] in p.frozen:
                continue
            problems.append(f"{key}: missing from the distributed run")
            continue
        name = key[5:] if key.startswith("grad_") else None
        sharded = key == "y" or (name is not None and p.time_axis.get(name) is not None)
        axis = p.out_axis if key == "y" else (p.time_axis.get(name) if name else None)
        scale = want.abs().max().item() or 1.0
        single_err = (same[key].to(F64) - want).abs().max().item() / scale if want.numel() else 0.0
        tol = max(4 * single_err, floor)
        mine, expected = got[key].to(F64), _slice(want, axis, start, length) if sharded else want
        if tuple(mine.shape) != tuple(expected.shape):
            problems.append(f"{key}: shape {tuple(mine.shape)}, expected {tuple(expected.shape)}")
            continue
        if got[key].dtype != same[key].dtype:
            problems.append(f"{key}: dtype {got[key].dtype}, expected {same[key].dtype} (the single-device op's)")
        err = (mine - expected).abs().max().item() / scale if mine.numel() else 0.0
        if not err <= tol:
            problems.append(f"{key}: relative error {err:.3g} > tolerance {tol:.3g} (single-process {single_err:.3g})")
    if problems:
        raise Mismatch(f"rank {rank}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Non-problem checks: communication volume, conventions, errors
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def counted_all_gathers() -> Iterator[list[int]]:
    """Counts ``torch.distributed.all_gather`` calls: yields a list that receives the bytes each
    call contributes from this rank."""
    calls: list[int] = []
    original = dist.all_gather

    def counting(tensor_list: list, tensor: Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = counting
    try:
        yield calls
    finally:
        dist.all_gather = original


def check_communication(ctx: Ctx) -> None:
    """One all_gather forward and one backward, of the sizes the benchmark's formula gives."""
    from ferroscan.bench.distributed import comm_bytes

    p = scan_problem(ctx, F32, False)
    n = LENGTHS[ctx.world][ctx.rank]
    a = p.full["gates"].narrow(2, sum(LENGTHS[ctx.world][: ctx.rank]), n).clone().requires_grad_()
    x = p.full["tokens"].narrow(2, sum(LENGTHS[ctx.world][: ctx.rank]), n).clone().requires_grad_()
    expected = comm_bytes(ctx.world, state_numel=6, elem_bytes=4)
    for validate in (False, True):
        with counted_all_gathers() as calls:
            h = fd.scan(a, x, validate=validate)
        want = ([fd.DESCRIPTOR_LEN * 8] if validate else []) + [expected["fwd_sent"]]
        assert calls == want, f"validate={validate}: forward all_gathers contributed {calls} bytes, expected {want}"
        with counted_all_gathers() as calls:
            h.sum().backward()
        assert calls == [expected["bwd_sent"]], f"backward all_gathers contributed {calls}, expected one of " \
            f"{expected['bwd_sent']}"  # fmt: skip


def check_no_grad(ctx: Ctx) -> None:
    """Under no_grad: the same values, nothing requires grad."""
    p = scan_problem(ctx, F64, True)
    lengths = LENGTHS[ctx.world]
    start, n = sum(lengths[: ctx.rank]), lengths[ctx.rank]
    a, x, h0 = p.full["gates"], p.full["tokens"], p.full["initial"]
    want, want_final = ferroscan.scan(a, x, reverse=True, initial=h0, return_final=True)
    with torch.no_grad():
        h, final = fd.scan(a.narrow(2, start, n).requires_grad_(), x.narrow(2, start, n), reverse=True,
                           initial=h0, return_final=True)  # fmt: skip
    assert not h.requires_grad and not final.requires_grad
    torch.testing.assert_close(h, want.narrow(2, start, n), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-12, atol=1e-12)


def check_initial_only_on_start(ctx: Ctx) -> None:
    """Only the starting rank's ``initial`` requires grad (the others pass None, and their data
    does not require grad): their outputs still require grad, the backward still runs on every
    rank, and the gradient of ``initial`` (on the starting rank) is the single-device one."""
    p = scan_problem(ctx, F64, False)
    lengths = LENGTHS[ctx.world]
    start, n = sum(lengths[: ctx.rank]), lengths[ctx.rank]
    a, x, h0 = (p.full[k] for k in ("gates", "tokens", "initial"))
    h0_full = h0.clone().requires_grad_()
    h_full, f_full = ferroscan.scan(a, x, initial=h0_full, return_final=True)
    w = _upstream(tuple(h_full.shape), F64, ctx.device, 5)
    wf = [_upstream((2, 3), F64, ctx.device, 6 + r) for r in range(ctx.world)]
    (want,) = torch.autograd.grad((h_full * w).sum() + (f_full * sum(wf)).sum(), [h0_full])
    mine = h0.clone().requires_grad_() if ctx.rank == 0 else None
    h, f = fd.scan(a.narrow(2, start, n), x.narrow(2, start, n), initial=mine, return_final=True)
    assert h.requires_grad and f.requires_grad, "outputs must require grad on every rank"
    ((h * w.narrow(2, start, n)).sum() + (f * wf[ctx.rank]).sum()).backward()
    if ctx.rank == 0:
        torch.testing.assert_close(mine.grad, want, rtol=1e-12, atol=1e-12)


def check_final_identical(ctx: Ctx) -> None:
    """The final state is the same bits on every rank."""
    p = scan_problem(ctx, F32, False)
    lengths = LENGTHS[ctx.world]
    start, n = sum(lengths[: ctx.rank]), lengths[ctx.rank]
    _, final = fd.scan(p.full["gates"].narrow(2, start, n), p.full["tokens"].narrow(2, start, n),
                       initial=p.full["initial"], return_final=True)  # fmt: skip
    finals = [torch.empty_like(final) for _ in range(ctx.world)]
    dist.all_gather(finals, final)
    assert all(torch.equal(f, finals[0]) for f in finals), "final differs between ranks"


def check_subgroup(ctx: Ctx) -> None:
    """group= a subgroup of the last two ranks (positions 0, 1 in it); rank 0 outside it gets a
    ValueError naming group; groups of one rank run the single-device op."""
    members = [ctx.world - 2, ctx.world - 1]
    sub = dist.new_group(members)
    singles, _ = dist.new_subgroups(group_size=1)
    p = scan_problem(ctx, F64, True, lengths=[4, 6])
    if ctx.rank in members:
        run_problem(ctx, p, F64, group=sub)
    else:
        try:
            fd.scan(p.full["gates"], p.full["tokens"], group=sub)
        except ValueError as exc:
            assert "group" in str(exc) and "not a member" in str(exc), str(exc)
        else:
            raise AssertionError("no ValueError for a rank outside group")
    a, x = p.full["gates"], p.full["tokens"]
    got = fd.scan(a, x, group=singles, reverse=True, initial=p.full["initial"])
    want = ferroscan.scan(a, x, reverse=True, initial=p.full["initial"])
    assert torch.equal(got, want), "a group of one rank must give the single-device result"


def _expect(exc_type: type, words: list[str], fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc_type as exc:
        missing = [w for w in words if w not in str(exc)]
        assert not missing, f"{exc_type.__name__} message lacks {missing}: {exc}"
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}") from exc
    else:
        raise AssertionError(f"expected {exc_type.__name__}, nothing raised")


def check_errors(ctx: Ctx) -> None:
    """Mismatches across ranks and bad arguments on one rank raise on every rank (no hang)."""
    last = ctx.world - 1
    dev = ctx.device

    def seq(channels: int = 3, n: int = 4, dtype: torch.dtype = F32) -> Tensor:
        return torch.rand(2, channels, n, dtype=dtype, device=dev)

    # state shapes differ (rank 1 has 4 channels)
    x = seq(4 if ctx.rank == 1 else 3)
    _expect(ValueError, ["tokens without its time axis", "(2, 4)", "(2, 3)"], lambda: fd.scan(x, x))
    # dtypes differ
    x = seq(dtype=F64 if ctx.rank == 0 else F32)
    _expect(TypeError, ["float64", "float32"], lambda: fd.scan(x, x))
    # reverse differs
    x = seq()
    _expect(ValueError, ["reverse"], lambda: fd.scan(x, x, reverse=ctx.rank == last))
    # a bad argument on the last rank only: it gets its own error, the others a RuntimeError naming it
    gates = seq(n=5) if ctx.rank == last else x
    if ctx.rank == last:
        _expect(ValueError, ["gates"], lambda: fd.scan(gates, x))
    else:
        _expect(RuntimeError, [f"rank(s) [{last}]", "rejected"], lambda: fd.scan(gates, x))
    # different operations
    x = torch.rand(2, 4, 3, dtype=F32, device=dev)
    call = (lambda: fd.scan(x, x, dim=1)) if ctx.rank == 0 else (lambda: fd.gated_scan(x, x, dim=1))
    _expect(ValueError, ["scan", "gated_scan", "same operation"], call)
    # grad mode differs
    x = seq().requires_grad_(ctx.rank != 0)
    with torch.set_grad_enabled(ctx.rank != 0):
        _expect(RuntimeError, ["gradients disabled", "[0]"], lambda: fd.scan(x, x))
    # backward twice
    x = seq().requires_grad_()
    h = fd.scan(x, x)
    h.sum().backward(retain_graph=True)
    _expect(RuntimeError, ["second time"], lambda: h.sum().backward())
    # local argument errors, raised before any communication when validate=False
    _expect(TypeError, ["validate must be a bool"], lambda: fd.scan(x, x, validate=1))
    _expect(TypeError, ["reverse must be a bool"], lambda: fd.scan(x, x, reverse=1))
    _expect(TypeError, ["tokens must be a torch.Tensor"], lambda: fd.scan(x, [1.0], validate=False))
    _expect(ValueError, ["initial", "expected (2, 3)"], lambda: fd.scan(x, x, initial=x, validate=False))


def check_selective_missing(ctx: Ctx) -> None:
    if selective_available():
        raise Skip("ferroscan.selective_scan is available")
    x = torch.rand(2, 4, 3, device=ctx.device)
    a = -torch.rand(4, 2, device=ctx.device)
    _expect(NotImplementedError, ["ferroscan.selective_scan"], lambda: fd.selective_scan(x, x, a, a, a))


# ---------------------------------------------------------------------------------------------
# The list of checks (names are the pytest ids)
# ---------------------------------------------------------------------------------------------


def _problem_check(make: Callable[[Ctx], Problem], dtype: torch.dtype, *, standin: bool = False,
                   needs_selective: bool = False, cuda_only_dtype: bool = False) -> Callable[[Ctx], None]:  # fmt: skip
    def check(ctx: Ctx) -> None:
        if needs_selective and not selective_available():
            raise Skip("ferroscan.selective_scan not available")
        if standin:
            with selective_standin():
                run_problem(ctx, make(ctx), dtype)
        else:
            run_problem(ctx, make(ctx), dtype)

    return check


def _frozen(p: Problem, names: set[str]) -> Problem:
    p.frozen = names
    return p


def _checks() -> dict[str, Callable[[Ctx], None]]:
    checks: dict[str, Callable[[Ctx], None]] = {}
    for dtype, dname in ((F64, "f64"), (F32, "f32")):
        for reverse in (False, True):
            d = "rev" if reverse else "fwd"
            checks[f"scan-{dname}-{d}"] = _problem_check(lambda c, t=dtype, r=reverse: scan_problem(c, t, r), dtype)
            checks[f"scan-{dname}-{d}-LBD"] = _problem_check(
                lambda c, t=dtype, r=reverse: scan_problem(c, t, r, layout="LBD"), dtype)
            checks[f"gated-{dname}-{d}"] = _problem_check(lambda c, t=dtype, r=reverse: gated_problem(c, t, r), dtype)
            checks[f"gated-{dname}-{d}-BDL"] = _problem_check(
                lambda c, t=dtype, r=reverse: gated_problem(c, t, r, layout="BDL", no_b=True), dtype)
    checks["scan-f64-plain-novalidate"] = _problem_check(
        lambda c: scan_problem(c, F64, False, initial=False, final=False, validate=False), F64)
    checks["scan-f64-empty-slice"] = _problem_check(lambda c: scan_problem(c, F64, False, lengths=EMPTY[c.world]), F64)
    checks["scan-f64-rev-empty-slice"] = _problem_check(
        lambda c: scan_problem(c, F64, True, lengths=EMPTY[c.world]), F64)
    checks["scan-f64-initial-only-grad-novalidate"] = _problem_check(
        lambda c: _frozen(scan_problem(c, F64, True, validate=False), {"gates", "tokens"}), F64)
    checks["scan-bf16-fwd"] = _problem_check(lambda c: scan_problem(c, BF16, False), BF16)
    checks["scan-f64-shared-gates"] = _problem_check(lambda c: scan_problem(c, F64, True, shared_gates=True), F64)
    checks["gated-f64-shared-c"] = _problem_check(lambda c: gated_problem(c, F64, False, shared_c=True), F64)
    checks["gated-f64-empty-slice"] = _problem_check(
        lambda c: gated_problem(c, F64, True, lengths=EMPTY[c.world]), F64)
    checks["gated-f32-rev-out-f64"] = _problem_check(lambda c: gated_problem(c, F32, True, out_dtype=F64), F32)
    checks["gated-bf16-fwd"] = _problem_check(lambda c: gated_problem(c, BF16, False), BF16)
    for variable in ("BL", "BGL", "const"):
        for dtype, dname in ((F64, "f64"), (F32, "f32")):
            checks[f"selective-standin-{dname}-{variable}"] = _problem_check(
                lambda c, t=dtype, v=variable: selective_problem(c, t, variable=v), dtype, standin=True)
            checks[f"selective-{dname}-{variable}"] = _problem_check(
                lambda c, t=dtype, v=variable: selective_problem(c, t, variable=v), dtype, needs_selective=True)
    checks["selective-standin-f64-nosoftplus-empty-slice"] = _problem_check(
        lambda c: selective_problem(c, F64, softplus=False, lengths=EMPTY[c.world]), F64, standin=True)
    checks["selective-missing"] = check_selective_missing
    checks["communication"] = check_communication
    checks["no-grad"] = check_no_grad
    checks["initial-only-on-start"] = check_initial_only_on_start
    checks["final-identical"] = check_final_identical
    checks["subgroup"] = check_subgroup
    checks["errors"] = check_errors  # last: a failure here may leave the ranks out of step
    return checks


CHECKS = _checks()


# ---------------------------------------------------------------------------------------------
# The spawned worker
# ---------------------------------------------------------------------------------------------


def worker(rank: int, world: int, backend: str, init_file: str, out_dir: str, names: list[str]) -> None:
    """Runs ``names`` in order on this rank; appends one JSON line per check to
    ``out_dir/rank<r>.jsonl`` (status ok / fail / skip, message)."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    ctx = Ctx(rank, world, device)
    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    stop = False
    try:
        for name in names:
            try:
                CHECKS[name](ctx)
                row = {"name": name, "status": "ok", "message": ""}
            except Skip as exc:
                row = {"name": name, "status": "skip", "message": str(exc)}
            except Mismatch as exc:
                row = {"name": name, "status": "fail", "message": str(exc)}
            except Exception:  # noqa: BLE001  (AssertionError included)
                row = {"name": name, "status": "fail", "message": f"rank {rank}: " + traceback.format_exc()}
                stop = True
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if stop:
                break  # the ranks may be out of step (a collective skipped): stop rather than hang
    finally:
        dist.destroy_process_group()
