r"""Values and gradients of :func:`ferroscan.scan` against the float64 reference loop.

Every case runs on every device of the ``device`` fixture (CPU, and CUDA where there is one).
Inputs are rounded to the tested dtype first; the reference (:mod:`reference`) then runs in
float64 on exactly those values, and the expected gradients are autograd's gradients through
that loop with the same upstream gradients (random, exactly representable in the dtype).

Error bounds, float32 and float64 (see :func:`reference.error_weights`): a sequential loop in
a format of unit roundoff :math:`u` is within :math:`2u K_t` of the exact :math:`h_t`, where
:math:`K_t = \sum_j (t-j+1) P_{j,t}|x_j|` weighs each term by the number of steps it travels.
A chunked or parallel scan reorders the same products and sums; we allow it twice that,
:math:`4 u_c K_t` (:math:`u_c` the accumulation format's unit), plus :math:`4 u_{64} K_t` for
the reference's own rounding. The gradients get the same treatment through the magnitudes'
own gradients. Half precision uses a bound derived from a float32 loop instead; see
:func:`check_half`.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import ferroscan
import numpy as np
import pytest
import torch
from reference import UNIT, assert_within, error_weights, scan_ref, scan_ref_blocked

F64 = torch.float64
F32 = torch.float32

# (reverse, with initial, return_final): all eight combinations.
MODES = list(itertools.product([False, True], repeat=3))


def mode_id(mode: tuple[bool, bool, bool]) -> str:
    reverse, initial, final = mode
    return f"{'rev' if reverse else 'fwd'}{'-init' if initial else ''}{'-final' if final else ''}"


# Layouts: name -> (shape for a length L, time axis).
LAYOUTS = {
    "1d": (lambda n: (n,), 0),
    "2d-last": (lambda n: (3, n), -1),
    "2d-first": (lambda n: (n, 3), 0),
    "3d-BDL": (lambda n: (2, 3, n), -1),
    "3d-BLD": (lambda n: (2, n, 3), 1),
    "3d-LBD": (lambda n: (n, 2, 3), 0),
    "4d-mid": (lambda n: (2, 2, n, 3), -2),
    "4d-second": (lambda n: (2, n, 2, 2), 1),
}
LENGTHS = [1, 2, 7, 31, 33, 64, 100, 257, 1000, 4097]


# ---------------------------------------------------------------------------------------------
# Inputs and the checks shared by the tests
# ---------------------------------------------------------------------------------------------


def state_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    dim = dim % len(shape)
    return tuple(s for d, s in enumerate(shape) if d != dim)


def make_inputs(
    shape: tuple[int, ...],
    dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    *,
    initial: bool = False,
    gates: str = "decay",
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(gates, tokens, initial)`` rounded to ``dtype`` on ``device``.

    ``gates="decay"``: uniform in [0.5, 1); ``"signed"``: uniform in [-1, 1) with a quarter
    exactly zero. Tokens and the initial state are standard normal.
    """
    gen = torch.Generator().manual_seed(seed)
    if gates == "decay":
        a = 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64)
    else:
        a = 2 * torch.rand(shape, generator=gen, dtype=F64) - 1
        a = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.25, torch.zeros_like(a), a)
    x = torch.randn(shape, generator=gen, dtype=F64)
    h0 = torch.randn(state_shape(shape, dim), generator=gen, dtype=F64) if initial else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(a), cast(x), cast(h0)


def upstream(shape: tuple[int, ...], like: torch.Tensor, seed: int) -> torch.Tensor:
    """A random upstream gradient, exactly representable in ``like``'s dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).to(like.dtype).to(like.device)


def leaf(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


Views = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], tuple]


def _no_views(g: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor]) -> tuple:
    return g, x, h0


def reference_run(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    initial: Optional[torch.Tensor],
    w: torch.Tensor,
    wf: Optional[torch.Tensor],
    *,
    dim: int,
    reverse: bool,
    views: Views = _no_views,
    blocked: bool = False,
    dtype: torch.dtype = F64,
) -> dict[str, Optional[torch.Tensor]]:
    """The reference (in ``dtype``) on upcast copies of the inputs: ``h``, ``final`` and the
    gradients (by input name) for upstream gradients ``w`` (of h) and ``wf`` (of h_final)."""
    fn = scan_ref_blocked if blocked else scan_ref
    leaves = {"gates": leaf(gates, dtype), "tokens": leaf(tokens, dtype)}
    if initial is not None:
        leaves["initial"] = leaf(initial, dtype)
    g, x, h0 = views(leaves["gates"], leaves["tokens"], leaves.get("initial"))
    h, hf = fn(g, x, dim=dim, reverse=reverse, initial=h0, dtype=dtype)
    outputs, weights = [h], [w.to(dtype)]
    if wf is not None:
        outputs.append(hf)
        weights.append(wf.to(dtype))
    grads = torch.autograd.grad(outputs, list(leaves.values()), weights)
    return {"h": h.detach(), "final": hf.detach(), **dict(zip(leaves, grads))}


def run_ours(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    initial: Optional[torch.Tensor],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    views: Views = _no_views,
) -> tuple[dict[str, Optional[torch.Tensor]], torch.Tensor, Optional[torch.Tensor]]:
    """ferroscan.scan on ``views`` of leaf copies of the inputs, and its gradients by input name
    for random upstream gradients; returns ``(results, w, wf)``. Checks shapes, dtypes, devices,
    and that the inputs are left unchanged."""
    sources = {"gates": gates, "tokens": tokens}
    if initial is not None:
        sources["initial"] = initial
    before = {k: v.detach().clone() for k, v in sources.items()}
    leaves = {k: leaf(v) for k, v in sources.items()}
    g, x, h0 = views(leaves["gates"], leaves["tokens"], leaves.get("initial"))
    shape, st_shape = tuple(x.shape), state_shape(tuple(x.shape), dim)
    out = ferroscan.scan(g, x, dim=dim, reverse=reverse, initial=h0, return_final=return_final)
    if return_final:
        assert isinstance(out, tuple) and len(out) == 2
        h, hf = out
        assert hf.shape == st_shape and hf.dtype == x.dtype and hf.device == x.device
    else:
        assert isinstance(out, torch.Tensor)
        h, hf = out, None
    assert h.shape == shape and h.dtype == x.dtype and h.device == x.device

    w = upstream(shape, x, seed)
    wf = upstream(st_shape, x, seed + 1) if return_final else None
    outputs, weights = [h], [w]
    if return_final:
        outputs.append(hf)
        weights.append(wf)
    grads = dict(zip(leaves, torch.autograd.grad(outputs, list(leaves.values()), weights)))
    for arg, value in grads.items():
        src = sources[arg]
        assert value.shape == src.shape and value.dtype == src.dtype, f"gradient of {arg}"
    for arg, old in before.items():
        torch.testing.assert_close(sources[arg], old, rtol=0, atol=0, equal_nan=True, msg=f"{arg} was modified")
    return {"h": h.detach(), "final": None if hf is None else hf.detach(), **grads}, w, wf


def check_scan(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    initial: Optional[torch.Tensor],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    what: str,
    blocked: bool = False,
    views: Views = _no_views,
) -> None:
    """float32/float64: values, final state and every gradient within the step-weighted bound.

    ``views`` maps the (leaf) inputs to what ferroscan.scan is called with (non-contiguous or
    stride-0 views); gradients are compared on the leaves.
    """
    dtype = tokens.dtype
    assert dtype in (F32, F64)
    ours, w, wf = run_ours(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=return_final, seed=seed, views=views
    )
    ref = reference_run(gates, tokens, initial, w, wf, dim=dim, reverse=reverse, views=views, blocked=blocked)
    mags = error_weights(
        gates, tokens, dim=dim, reverse=reverse, initial=initial,
        grad_hidden=w, grad_final=wf, blocked=blocked, views=views,
    )  # fmt: skip
    u = UNIT[dtype]
    c = 4 * u + 4 * UNIT[F64]  # twice a sequential loop's bound, ours and the reference's
    tiny = torch.finfo(dtype).tiny
    assert_within(ours["h"], ref["h"], c * mags["K"] + tiny, f"{what}: h")
    if return_final:
        assert_within(ours["final"], ref["final"], c * mags["K_final"] + tiny, f"{what}: h_final")
    assert_within(ours["tokens"], ref["tokens"], c * mags["dK_tokens"] + tiny, f"{what}: d/dtokens")
    # d/dgates = g_t * h_{t-1}: the error of that product of two computed values, its own rounding,
    # and, for gates broadcast over n elements, the rounding of the sum of n terms.
    n_sum = ours["h"].numel() // max(gates.numel(), 1)
    bound_g = c * mags["dK_gates"] + u * n_sum * mags["dH_gates"] + tiny
    assert_within(ours["gates"], ref["gates"], bound_g, f"{what}: d/dgates")
    if initial is not None:
        bound_0 = c * mags["dK_initial"] + u * mags["dH_initial"] + tiny
        assert_within(ours["initial"], ref["initial"], bound_0, f"{what}: d/dinitial")


def check_half(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    initial: Optional[torch.Tensor],
    *,
    dim: int,
    reverse: bool,
    return_final: bool,
    seed: int,
    what: str,
) -> None:
    r"""float16/bfloat16 values and gradients, with tolerances derived from a float32 loop.

    ferroscan reads half inputs, accumulates in float32 and rounds each result once to the
    half format. So we measure what float32 accumulation costs on *these* inputs: the
    reference loop run in float32 on the same rounded inputs (autograd for its gradients),
    against the float64 reference, gives ``err32``, its largest error (per output: h, h_final,
    each gradient). Our error may then be

        2 * err32                  ferroscan reorders the float32 operations; allow twice a
                                   sequential float32 loop's error,
      + u_out * |ref|              the single rounding of the result to the half format
                                   (u_out = 2^-11 for float16, 2^-8 for bfloat16),
      + finfo(half).tiny           an absolute floor for results near the subnormal range,
                                   whose rounding error is absolute, not relative.

    d/dgates is ``g_t * h_{t-1}`` where ``h_{t-1}`` is the *saved output* ``h``, itself
    rounded to the half format (that is the API: h is returned, and saved, in the input
    dtype); that rounding adds one more ``u_out * |ref|``, so its bound has ``2 * u_out``.
    """
    dtype = tokens.dtype
    assert dtype in (torch.float16, torch.bfloat16)
    ours, w, wf = run_ours(gates, tokens, initial, dim=dim, reverse=reverse, return_final=return_final, seed=seed)
    ref = reference_run(gates, tokens, initial, w, wf, dim=dim, reverse=reverse)
    loop32 = reference_run(gates, tokens, initial, w, wf, dim=dim, reverse=reverse, dtype=F32)
    u_out, tiny = UNIT[dtype], torch.finfo(dtype).tiny
    keys = ["h", "tokens", "gates"] + (["final"] if return_final else []) + (["initial"] if initial is not None else [])
    for key in keys:
        err32 = (loop32[key].to(F64) - ref[key]).abs().max().item() if ref[key].numel() else 0.0
        roundings = 2 if key == "gates" else 1
        bound = 2 * err32 + roundings * u_out * ref[key].abs() + tiny
        assert_within(ours[key], ref[key], bound, f"{what}: {key} (float32 loop error {err32:.3g})")


# ---------------------------------------------------------------------------------------------
# Shapes x lengths x modes
# ---------------------------------------------------------------------------------------------


def _shape_cases() -> list:
    cases = []
    for i, name in enumerate(LAYOUTS):
        for j, length in enumerate(LENGTHS):
            mode = MODES[(i + j) % len(MODES)]  # every layout and every length meets every mode
            cases.append(pytest.param(name, length, mode, id=f"{name}-L{length}-{mode_id(mode)}"))
    return cases


@pytest.mark.parametrize(("layout", "length", "mode"), _shape_cases())
def test_shapes_lengths(device: str, layout: str, length: int, mode: tuple[bool, bool, bool]) -> None:
    """Ranks 1-4, time axis first/middle/last, lengths 1..4097; float32 values and gradients."""
    reverse, with_initial, return_final = mode
    make_shape, dim = LAYOUTS[layout]
    shape = make_shape(length)
    gates, tokens, initial = make_inputs(shape, dim, F32, device, seed=length, initial=with_initial)
    check_scan(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=return_final,
        seed=length + 7, what=f"{layout} {shape} dim={dim} {mode_id(mode)}",
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("length", [1, 33, 257])
@pytest.mark.parametrize("layout", ["3d-BDL", "3d-BLD"])
def test_modes(device: str, layout: str, length: int, dtype: torch.dtype, mode: tuple[bool, bool, bool]) -> None:
    """Every combination of reverse / initial / return_final, float32 and float64."""
    reverse, with_initial, return_final = mode
    make_shape, dim = LAYOUTS[layout]
    gates, tokens, initial = make_inputs(make_shape(length), dim, dtype, device, seed=3 * length, initial=with_initial)
    check_scan(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=return_final,
        seed=5, what=f"{layout} L={length} {dtype} {mode_id(mode)}",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", [MODES[3], MODES[7], MODES[6]], ids=mode_id)
@pytest.mark.parametrize("length", [33, 1000])
def test_signed_and_zero_gates(device: str, length: int, mode: tuple[bool, bool, bool], dtype: torch.dtype) -> None:
    """Gates in [-1, 1) with a quarter exactly zero (a zero gate resets the state)."""
    reverse, with_initial, return_final = mode
    gates, tokens, initial = make_inputs(
        (2, length, 3), 1, dtype, device, seed=11, initial=with_initial, gates="signed"
    )
    check_scan(
        gates,
        tokens,
        initial,
        dim=1,
        reverse=reverse,
        return_final=return_final,
        seed=12,
        what="signed gates",
    )


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((512, 7), -1), ((7, 512), 0), ((3, 1, 5), 1), ((1, 1, 9), -1), ((5, 4, 1), -1)],
    ids=["many-rows", "many-columns", "L1-mid", "single-row", "L1-last"],
)
def test_degenerate_extents(device: str, shape: tuple[int, ...], dim: int) -> None:
    """Many short sequences, unit extents around the time axis."""
    gates, tokens, initial = make_inputs(shape, dim, F32, device, seed=13, initial=True)
    for reverse in (False, True):
        check_scan(gates, tokens, initial, dim=dim, reverse=reverse, return_final=True, seed=14, what=f"{shape}")


# ---------------------------------------------------------------------------------------------
# Long sequences (the chunked paths)
# ---------------------------------------------------------------------------------------------

# CPU and CUDA: few rows, so the CPU backend cuts the time axis into chunks.
LONG = [
    pytest.param((2, 70000), -1, False, F32, id="2x70000-fwd-f32"),
    pytest.param((1, 70000, 3), 1, True, F64, id="1x70000x3-dim1-rev-f64"),
]
# CUDA only: longer still.
LONG_CUDA = [
    pytest.param((1, 2**20), -1, False, id="1x2^20-fwd"),
    pytest.param((1, 2**20), -1, True, id="1x2^20-rev"),
    pytest.param((2, 3, 50000), -1, True, id="2x3x50000-rev"),
    pytest.param((2, 50000, 3), 1, False, id="2x50000x3-dim1-fwd"),
    pytest.param((2, 3, 50000), 1, False, id="2x3x50000-dim1-fwd"),
]


@pytest.mark.parametrize(("shape", "dim", "reverse", "dtype"), LONG)
def test_long(device: str, shape: tuple[int, ...], dim: int, reverse: bool, dtype: torch.dtype) -> None:
    """70000 steps, with initial and final (the reference is the blocked loop, checked below)."""
    gates, tokens, initial = make_inputs(shape, dim, dtype, device, seed=21, initial=True)
    check_scan(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=True, seed=22,
        what=f"{shape} dim={dim}", blocked=True,
    )  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize(("shape", "dim", "reverse"), LONG_CUDA)
def test_long_cuda(shape: tuple[int, ...], dim: int, reverse: bool) -> None:
    gates, tokens, initial = make_inputs(shape, dim, F32, "cuda", seed=23, initial=True)
    check_scan(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=True, seed=24,
        what=f"{shape} dim={dim}", blocked=shape[dim] > 5000,
    )  # fmt: skip


def _block_kernel_states() -> int:
    """States (time axis not innermost) enough for the CUDA scan to run on the block kernels of
    ``gated_scan.cu`` (one block of 32 states per multiprocessor at least), plus a partial group."""
    return torch.cuda.get_device_properties(0).multi_processor_count * 32 + 40


@pytest.mark.cuda
@pytest.mark.parametrize("length", [1, 9, 64, 65, 150])
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("cluster", ["auto", "4"])
def test_cuda_block_kernels(length: int, dtype: torch.dtype, cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels-last problems with many states: the windowed block kernels, forward and backward,
    lengths around their 8-step segments and 64-step windows; ``cluster`` "4" forces their
    cluster build (FERROSCAN_GATED_CLUSTER, GPUs of compute capability 9.0 and newer)."""
    if cluster != "auto":
        if torch.cuda.get_device_capability(0) < (9, 0):
            pytest.skip("thread-block clusters need compute capability 9.0")
        monkeypatch.setenv("FERROSCAN_GATED_CLUSTER", cluster)
    reverse, with_initial, return_final = MODES[length % len(MODES)]
    shape = (1, length, _block_kernel_states())
    gates, tokens, initial = make_inputs(shape, 1, dtype, "cuda", seed=26 + length, initial=with_initial)
    checker = check_scan if dtype in (F32, F64) else check_half
    checker(
        gates, tokens, initial, dim=1, reverse=reverse, return_final=return_final, seed=27,
        what=f"{dtype} {shape} {mode_id((reverse, with_initial, return_final))}",
    )  # fmt: skip


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("shape", "dim", "block"), [((3, 1000), -1, 32), ((2, 77, 3), 1, 8), ((5,), 0, 4)])
def test_blocked_reference_matches_loop(shape: tuple[int, ...], dim: int, block: int, reverse: bool) -> None:
    """The blocked reference used for long sequences is the loop, values and gradients."""
    gates, tokens, initial = make_inputs(shape, dim, F64, "cpu", seed=25, initial=True)
    results = []
    for fn in (scan_ref, lambda *a, **k: scan_ref_blocked(*a, block=block, **k)):
        g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
        h, hf = fn(g, x, dim=dim, reverse=reverse, initial=h0)
        grads = torch.autograd.grad((h * upstream(shape, h, 1)).sum() + 2 * hf.sum(), (g, x, h0))
        results.append((h, hf, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Half precision
# ---------------------------------------------------------------------------------------------


def _half_cases() -> list:
    cases = []
    for dtype, name in [(torch.float16, "f16"), (torch.bfloat16, "bf16")]:
        for i, length in enumerate([7, 64, 257, 1000, 4097]):
            for layout in ["3d-BDL", "3d-BLD"]:
                for reverse in (False, True):
                    with_initial, final = [(True, True), (False, True), (True, False)][i % 3]
                    mode = (reverse, with_initial, final)
                    cases.append(
                        pytest.param(dtype, layout, length, mode, id=f"{name}-{layout}-L{length}-{mode_id(mode)}")
                    )
    return cases


@pytest.mark.parametrize(("dtype", "layout", "length", "mode"), _half_cases())
def test_half_precision(
    device: str, dtype: torch.dtype, layout: str, length: int, mode: tuple[bool, bool, bool]
) -> None:
    """float16 / bfloat16 values and gradients, tolerance derived from a float32 loop."""
    reverse, with_initial, return_final = mode
    make_shape, dim = LAYOUTS[layout]
    gates, tokens, initial = make_inputs(make_shape(length), dim, dtype, device, seed=31 + length, initial=with_initial)
    check_half(
        gates, tokens, initial, dim=dim, reverse=reverse, return_final=return_final,
        seed=32, what=f"{dtype} {layout} L={length} {mode_id(mode)}",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_signed_gates(device: str, dtype: torch.dtype) -> None:
    gates, tokens, initial = make_inputs((3, 300), -1, dtype, device, seed=33, initial=True, gates="signed")
    check_half(gates, tokens, initial, dim=-1, reverse=True, return_final=True, seed=34, what=f"{dtype} signed")


# ---------------------------------------------------------------------------------------------
# Memory layouts: non-contiguous views, stride-0 and broadcast gates
# ---------------------------------------------------------------------------------------------


def _wide(t: torch.Tensor, dim: int, step: int = 2) -> torch.Tensor:
    """The same values as ``t``, as a view taking every ``step``-th element of a wider buffer."""
    shape = list(t.shape)
    shape[dim] *= step
    buf = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, step)
    buf[tuple(index)] = t
    return buf[tuple(index)]


def _layout_case(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Views, int]:
    """``(gates, tokens, initial, views, dim)``: compact inputs, and the views of them that
    ferroscan.scan gets in the memory layout ``name``; time length 37."""
    n, b, d = 37, 2, 3
    gates, tokens, initial = make_inputs((b, d, n), -1, F32, device, seed=41, initial=True)
    plain = (gates, tokens, initial)
    if name == "transposed-view":  # (B, L, D) view of (B, D, L) memory, time axis dim=1
        return (*plain, lambda g, x, h: (g.transpose(1, 2), x.transpose(1, 2), h), 1)
    if name == "transposed-tokens-only":  # gates and tokens in different memory orders
        return (*plain, lambda g, x, h: (g.transpose(1, 2).contiguous(), x.transpose(1, 2), h), 1)
    if name == "time-first-view":  # (L, B, D) view, time axis 0 but innermost in memory
        return (*plain, lambda g, x, h: (g.permute(2, 0, 1), x.permute(2, 0, 1), h), 0)
    if name == "time-step-2":  # every other element along time
        return (*plain, lambda g, x, h: (_wide(g, 2), _wide(x, 2), h), -1)
    if name == "channel-step-2":  # every other channel; initial too
        return (*plain, lambda g, x, h: (_wide(g, 1), _wide(x, 1), _wide(h, 1)), -1)
    if name == "sliced-offset":  # a window of larger tensors: storage offset, padded strides
        big_g, big_x, _ = make_inputs((b + 1, d + 2, n + 5), -1, F32, device, seed=42)
        return (big_g, big_x, initial, lambda g, x, h: (g[1:, 1:-1, 2:-3], x[1:, 1:-1, 2:-3], h), -1)
    if name == "initial-transposed":
        return (*plain, lambda g, x, h: (g, x, h.t().contiguous().t()), -1)
    if name == "gates-expanded-channel":  # (D, 1) gates expanded: stride 0 over batch and time
        return (gates[0, :, :1], tokens, initial, lambda g, x, h: (g.expand(b, d, n), x, h), -1)
    if name == "gates-expanded-time":  # (1, 1, L) gates expanded: stride 0 over batch and channel
        return (gates[:1, :1, :], tokens, initial, lambda g, x, h: (g.expand(b, d, n), x, h), -1)
    if name == "gates-broadcast-D1":  # gates of shape (D, 1), broadcast by ferroscan to (B, D, L)
        return (gates[0, :, :1], tokens, initial, _no_views, -1)
    if name == "gates-broadcast-L":  # gates of shape (L,)
        return (gates[0, 0], tokens, initial, _no_views, -1)
    if name == "gates-broadcast-1L1":  # (1, L, 1) gates for (B, L, D) tokens, dim=1
        return (
            gates[:1, :1, :],
            tokens,
            initial,
            lambda g, x, h: (g.transpose(1, 2), x.transpose(1, 2), h),
            1,
        )
    if name == "tokens-expanded":  # stride-0 tokens
        return (gates, tokens[:, :1, :], initial, lambda g, x, h: (g, x.expand(b, d, n), h), -1)
    if name == "4d-permuted":  # time in the middle of a permuted 4-d view
        g4, x4, h4 = make_inputs((2, 3, 4, n), -1, F32, device, seed=43, initial=True)
        return (g4, x4, h4, lambda g, x, h: (g.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), h), 1)
    raise AssertionError(name)


LAYOUT_NAMES = [
    "transposed-view",
    "transposed-tokens-only",
    "time-first-view",
    "time-step-2",
    "channel-step-2",
    "sliced-offset",
    "initial-transposed",
    "gates-expanded-channel",
    "gates-expanded-time",
    "gates-broadcast-D1",
    "gates-broadcast-L",
    "gates-broadcast-1L1",
    "tokens-expanded",
    "4d-permuted",
]
CONTIGUOUS_CASES = {"initial-transposed", "gates-broadcast-D1", "gates-broadcast-L", "gates-broadcast-1L1"}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_memory_layouts(device: str, name: str, reverse: bool) -> None:
    """Non-contiguous views, stride-0 and broadcast gates; gradients land on the compact leaves."""
    gates, tokens, initial, views, dim = _layout_case(name, device)
    g, x, h0 = views(gates, tokens, initial)
    if name not in CONTIGUOUS_CASES:
        assert not (g.is_contiguous() and x.is_contiguous()), "the case must be non-contiguous"
    if name == "initial-transposed":
        assert not h0.is_contiguous()
    check_scan(gates, tokens, initial, dim=dim, reverse=reverse, return_final=True, seed=44, what=name, views=views)


def test_leaf_broadcast_gate_gradient(device: str) -> None:
    """An expanded per-channel gate gets the summed gradient on its (D, 1) leaf."""
    gates, tokens, _ = make_inputs((2, 3, 50), -1, F64, device, seed=45)
    g = gates[0, :, :1].clone().requires_grad_()
    (grad,) = torch.autograd.grad(ferroscan.scan(g.expand(2, 3, 50), tokens).sum(), g)
    g64 = g.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(scan_ref(g64, tokens)[0].sum(), g64)
    assert grad.shape == (3, 1)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_negative_and_positive_dim_agree(device: str) -> None:
    gates, tokens, initial = make_inputs((2, 9, 3, 4), 1, F32, device, seed=46, initial=True)
    a = ferroscan.scan(gates, tokens, dim=1, initial=initial, return_final=True)
    b = ferroscan.scan(gates, tokens, dim=-3, initial=initial, return_final=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic(device: str) -> None:
    """Two runs on the same inputs give bitwise the same values and gradients."""
    gates, tokens, initial = make_inputs((2, 5000, 3), 1, F32, device, seed=47, initial=True)
    runs = []
    for _ in range(2):
        g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
        h, hf = ferroscan.scan(g, x, dim=1, initial=h0, return_final=True)
        runs.append((h, hf, *torch.autograd.grad((h * h).sum() + hf.sum(), (g, x, h0))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Partial gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradient_through_final_only(device: str, reverse: bool) -> None:
    """Only h_final is used: the backward runs with no gradient for h."""
    gates, tokens, initial = make_inputs((2, 3, 40), -1, F64, device, seed=51, initial=True)
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
    _, hf = ferroscan.scan(g, x, reverse=reverse, initial=h0, return_final=True)
    got = torch.autograd.grad(hf.sum(), (g, x, h0))
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
    _, ref_f = scan_ref(g, x, reverse=reverse, initial=h0)
    want = torch.autograd.grad(ref_f.sum(), (g, x, h0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_to_one_input_only(device: str) -> None:
    """Gradients to tokens alone, gates alone, initial alone."""
    gates, tokens, initial = make_inputs((2, 3, 40), -1, F64, device, seed=52, initial=True)
    for which in range(3):
        args = [gates.clone(), tokens.clone(), initial.clone()]
        args[which].requires_grad_()
        h, hf = ferroscan.scan(args[0], args[1], initial=args[2], return_final=True)
        (got,) = torch.autograd.grad((h * h).sum() + hf.sum(), args[which])
        ref_args = [gates.clone(), tokens.clone(), initial.clone()]
        ref_args[which].requires_grad_()
        rh, rf = scan_ref(ref_args[0], ref_args[1], initial=ref_args[2])
        (want,) = torch.autograd.grad((rh * rh).sum() + rf.sum(), ref_args[which])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_create_graph_gives_first_derivatives_and_refuses_second(device: str) -> None:
    """Under ``create_graph=True`` the first derivatives are the plain backward's, bit for bit;
    differentiating them again raises (the kernels have no second derivative) instead of giving
    wrong higher derivatives."""
    gates, tokens, initial = make_inputs((2, 3, 40), -1, F64, device, seed=54, initial=True)
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
    h = ferroscan.scan(g, x, initial=h0)
    loss = (h * h).sum()
    plain = torch.autograd.grad(loss, (g, x, h0), retain_graph=True)
    graphed = torch.autograd.grad(loss, (g, x, h0), create_graph=True)
    for a, b in zip(graphed, plain):
        assert a.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        graphed[0].sum().backward()


def test_no_requires_grad_gives_plain_tensors(device: str) -> None:
    gates, tokens, initial = make_inputs((2, 3, 10), -1, F32, device, seed=53, initial=True)
    h, hf = ferroscan.scan(gates, tokens, initial=initial, return_final=True)
    assert not h.requires_grad and not hf.requires_grad and h.grad_fn is None


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_final", [False, True], ids=["h", "h+final"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck(device: str, reverse: bool, return_final: bool) -> None:
    gates, tokens, initial = make_inputs((2, 5, 3), 1, F64, device, seed=61, initial=True)
    inputs = (leaf(gates), leaf(tokens), leaf(initial))

    def fn(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor):  # noqa: ANN202
        return ferroscan.scan(g, x, dim=1, reverse=reverse, initial=h0, return_final=return_final)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_broadcast_gates(device: str) -> None:
    gates, tokens, initial = make_inputs((2, 4, 6), -1, F64, device, seed=62, initial=True)
    inputs = (leaf(gates[0, :, :1]), leaf(tokens), leaf(initial))

    def fn(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor):  # noqa: ANN202
        return ferroscan.scan(g, x, reverse=True, initial=h0, return_final=True)

    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# No graph, nothing saved, when no gradient is wanted
# ---------------------------------------------------------------------------------------------


def _count_saved(fn) -> tuple[int, object]:  # noqa: ANN001
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return len(packed), out


def test_saved_tensors_only_with_grad(device: str) -> None:
    gates, tokens, initial = make_inputs((2, 3, 50), -1, F32, device, seed=71, initial=True)
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)

    def call():  # noqa: ANN202
        return ferroscan.scan(g, x, initial=h0, return_final=True)

    n_grad, (h, _) = _count_saved(call)
    assert n_grad > 0 and h.requires_grad

    with torch.no_grad():
        n_no_grad, (h, hf) = _count_saved(call)
    assert n_no_grad == 0, f"{n_no_grad} tensors saved for backward under torch.no_grad()"
    assert not h.requires_grad and not hf.requires_grad

    with torch.inference_mode():
        n_inference, (h, hf) = _count_saved(call)
    assert n_inference == 0, f"{n_inference} tensors saved for backward under torch.inference_mode()"
    assert h.is_inference() and hf.is_inference()

    n_plain, _ = _count_saved(lambda: ferroscan.scan(gates, tokens, initial=initial, return_final=True))
    assert n_plain == 0, f"{n_plain} tensors saved although no input requires grad"

    # Values agree with the grad-enabled run.
    with torch.no_grad():
        ref = ferroscan.scan(gates, tokens, initial=initial, return_final=True)
    torch.testing.assert_close(h, ref[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# NumPy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_numpy_in_numpy_out(dtype: type, reverse: bool) -> None:
    rng = np.random.default_rng(81)
    gates = rng.uniform(0.5, 1.0, (2, 30, 3)).astype(dtype)
    tokens = rng.standard_normal((2, 30, 3)).astype(dtype)
    initial = rng.standard_normal((2, 3)).astype(dtype)
    h = ferroscan.scan(gates, tokens, dim=1, reverse=reverse)
    assert isinstance(h, np.ndarray) and h.dtype == dtype and h.shape == tokens.shape
    h2, hf = ferroscan.scan(gates, tokens, dim=1, reverse=reverse, initial=initial, return_final=True)
    assert isinstance(h2, np.ndarray) and isinstance(hf, np.ndarray)
    assert hf.dtype == dtype and hf.shape == (2, 3)

    # The very numbers of the torch path on the same values (which the tests above check against
    # the reference, with derived tolerances) ...
    g, x, h0 = (torch.from_numpy(v) for v in (gates, tokens, initial))
    np.testing.assert_array_equal(h, ferroscan.scan(g, x, dim=1, reverse=reverse).numpy())
    th2, thf = ferroscan.scan(g, x, dim=1, reverse=reverse, initial=h0, return_final=True)
    np.testing.assert_array_equal(h2, th2.numpy())
    np.testing.assert_array_equal(hf, thf.numpy())
    # ... and, as a direct check, the float64 reference within the float64 bound.
    if dtype == np.float64:
        ref_h, ref_f = scan_ref(g, x, dim=1, reverse=reverse, initial=h0)
        weights = error_weights(g, x, dim=1, reverse=reverse, initial=h0)
        c = 8 * UNIT[F64]
        assert_within(torch.from_numpy(h2), ref_h, c * weights["K"], "numpy h")
        assert_within(torch.from_numpy(hf), ref_f, c * weights["K_final"], "numpy h_final")


def test_numpy_non_contiguous_and_broadcast() -> None:
    rng = np.random.default_rng(82)
    gates = rng.uniform(0.5, 1.0, (40, 3))
    tokens = rng.standard_normal((3, 40))
    # Transposed (Fortran-order) gates, reversed (negative-stride) tokens, broadcast (D, 1) gates.
    h = ferroscan.scan(gates.T, tokens[:, ::-1])
    want, _ = scan_ref(torch.from_numpy(gates.T.copy()), torch.from_numpy(tokens[:, ::-1].copy()))
    np.testing.assert_allclose(h, want.numpy(), rtol=1e-12, atol=1e-12)
    per_channel = gates[:3, :1].copy()  # (3, 1)
    h = ferroscan.scan(per_channel, tokens)
    want, _ = scan_ref(torch.from_numpy(per_channel), torch.from_numpy(tokens))
    np.testing.assert_allclose(h, want.numpy(), rtol=1e-12, atol=1e-12)


def test_numpy_rank1_with_scalar_initial() -> None:
    """1-d tokens: the state, and so ``initial`` and ``h_final``, are 0-d, as with tensors."""
    gates, tokens = np.full(5, 0.5), np.ones(5)
    want_h, want_f = ferroscan.scan(
        torch.from_numpy(gates), torch.from_numpy(tokens), initial=torch.tensor(2.0, dtype=F64), return_final=True
    )
    h, hf = ferroscan.scan(gates, tokens, initial=np.array(2.0), return_final=True)
    assert h.shape == (5,) and hf.shape == ()
    np.testing.assert_array_equal(h, want_h.numpy())
    np.testing.assert_array_equal(hf, want_f.numpy())


# PyTorch warns once per process that a read-only array makes a read-only tensor; ferroscan
# never writes to its inputs, so here the warning is noise (reported to the maintainers).
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_numpy_read_only_arrays() -> None:
    """Read-only arrays (e.g. np.broadcast_to, memory maps) are inputs like any other."""
    gates = np.broadcast_to(np.float32(0.5), (2, 6))
    tokens = np.ones((2, 6), dtype=np.float32)
    tokens.setflags(write=False)
    h = ferroscan.scan(gates, tokens)
    np.testing.assert_array_equal(h[0], [1.0, 1.5, 1.75, 1.875, 1.9375, 1.96875])
    assert tokens.flags.writeable is False and (tokens == 1).all()


def test_numpy_empty_time_axis() -> None:
    initial = np.arange(3.0)
    h, hf = ferroscan.scan(np.ones((3, 0)), np.ones((3, 0)), initial=initial, return_final=True)
    assert isinstance(h, np.ndarray) and h.shape == (3, 0)
    np.testing.assert_array_equal(hf, initial)


# ---------------------------------------------------------------------------------------------
# Empty time axis and empty non-time axes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("shape", "dim"), [((0,), 0), ((2, 3, 0), -1), ((2, 0, 3), 1), ((0, 4), 0)])
def test_zero_length(device: str, shape: tuple[int, ...], dim: int, reverse: bool) -> None:
    """L = 0: empty h, h_final is initial (or zeros), and the gradient passes through to initial."""
    gates, tokens, initial = make_inputs(shape, dim, F32, device, seed=91, initial=True)
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
    h, hf = ferroscan.scan(g, x, dim=dim, reverse=reverse, initial=h0, return_final=True)
    assert h.shape == shape and h.dtype == F32 and h.device == tokens.device
    assert hf.shape == state_shape(shape, dim)
    assert torch.equal(hf, initial)
    wf = upstream(state_shape(shape, dim), hf, 92)
    gg, gx, g0 = torch.autograd.grad((h.sum(), hf), (g, x, h0), (torch.ones((), device=h.device), wf))
    assert gg.shape == shape and gx.shape == shape
    assert torch.equal(g0, wf)

    h, hf = ferroscan.scan(gates, tokens, dim=dim, reverse=reverse, return_final=True)
    assert h.shape == shape and torch.equal(hf, torch.zeros(state_shape(shape, dim), device=tokens.device))
    assert ferroscan.scan(gates, tokens, dim=dim).shape == shape


@pytest.mark.parametrize(("shape", "dim"), [((0, 5), -1), ((2, 0, 5), -1), ((3, 5, 0), 1)])
def test_empty_non_time_axes(device: str, shape: tuple[int, ...], dim: int) -> None:
    gates, tokens, initial = make_inputs(shape, dim, F32, device, seed=93, initial=True)
    g, x, h0 = leaf(gates), leaf(tokens), leaf(initial)
    h, hf = ferroscan.scan(g, x, dim=dim, initial=h0, return_final=True)
    assert h.shape == shape and hf.shape == state_shape(shape, dim)
    grads = torch.autograd.grad((h.sum() + hf.sum()), (g, x, h0))
    assert [t.shape for t in grads] == [shape, shape, state_shape(shape, dim)]


# ---------------------------------------------------------------------------------------------
# NaN / Inf pass through
# ---------------------------------------------------------------------------------------------


def _poisoned(shape: tuple[int, int], device: str, positions: tuple[int, int, int, int]):  # noqa: ANN202
    """Rows: 0 clean, 1 NaN token, 2 +Inf token, 3 NaN gate, 4 +Inf then -Inf token (NaN)."""
    gates, tokens, _ = make_inputs(shape, -1, F32, "cpu", seed=95)
    p_nan, p_inf, p_gate, p_ninf = positions
    tokens[1, p_nan] = float("nan")
    tokens[2, p_inf] = float("inf")
    gates[3, p_gate] = float("nan")
    tokens[4, p_inf] = float("inf")
    tokens[4, p_ninf] = -float("inf")
    return gates.to(device), tokens.to(device)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(
    ("length", "positions"),
    [(100, (50, 10, 99, 60)), (70000, (40000, 34999, 35000, 69000)), (4097, (0, 4096, 2048, 3000))],
    ids=["L100", "L70000", "L4097"],
)
def test_nan_inf_pass_through(device: str, length: int, positions: tuple[int, ...], reverse: bool) -> None:
    """A NaN or Inf at step t reaches exactly the steps after it (before it, reversed)."""
    gates, tokens = _poisoned((5, length), device, positions)
    h, hf = ferroscan.scan(gates, tokens, reverse=reverse, return_final=True)
    ref_fn = scan_ref if length <= 5000 else scan_ref_blocked
    ref_h, ref_f = ref_fn(gates, tokens, reverse=reverse)
    t = torch.arange(length, device=device)
    p_nan, p_inf, p_gate, p_ninf = positions

    def reached(p: int) -> torch.Tensor:
        return t <= p if reverse else t >= p

    assert_mask(h[1], h[1].isnan(), reached(p_nan), "row 1, NaN token: NaN")
    assert_mask(h[2], h[2].isposinf(), reached(p_inf), "row 2, +Inf token: +Inf")
    assert_mask(h[3], h[3].isnan(), reached(p_gate), "row 3, NaN gate: NaN")
    assert_mask(h[4], h[4].isnan(), reached(p_inf) & reached(p_ninf), "row 4, +Inf then -Inf token: NaN")
    assert torch.equal(h.isnan(), ref_h.isnan()) and torch.equal(h.isinf(), ref_h.isinf())
    assert torch.equal(hf.isnan(), ref_f.isnan()) and torch.equal(hf.isinf(), ref_f.isinf())
    finite = ref_h.isfinite()
    weights = error_weights(
        gates.nan_to_num(0.5, 0.5), tokens.nan_to_num(0, 0, 0), reverse=reverse, blocked=length > 5000
    )
    bound = (4 * UNIT[F32] + 4 * UNIT[F64]) * weights["K"] + 1e-30
    assert_within(h[finite], ref_h[finite], bound[finite], "finite positions")
    assert h[0].isfinite().all() and hf[0].isfinite()


def assert_mask(values: torch.Tensor, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got == want`` for boolean masks over a 1-d sequence, with the first mismatch reported."""
    wrong = (got != want).nonzero().flatten()
    if wrong.numel():
        i = int(wrong[0])
        pytest.fail(
            f"{what} expected at {int(want.sum())} steps, found at {int(got.sum())}; {wrong.numel()} steps "
            f"differ, the first at t={i} (value {values[i].item()}, expected the mask to be {bool(want[i])})"
        )


@pytest.mark.parametrize("length", [8, 5000])
def test_inf_initial_pass_through(device: str, length: int) -> None:
    """An infinite initial state stays infinite (positive gates, finite tokens), h_final too."""
    gates, tokens, _ = make_inputs((3, length), -1, F32, device, seed=96)
    initial = torch.tensor([float("inf"), 1.0, float("nan")], device=device)
    for reverse in (False, True):
        h, hf = ferroscan.scan(gates, tokens, reverse=reverse, initial=initial, return_final=True)
        assert_mask(
            h[0], h[0].isposinf(), torch.ones(length, dtype=torch.bool, device=device), f"+Inf initial {reverse=}"
        )
        assert h[1].isfinite().all() and h[2].isnan().all()
        assert hf[0].isposinf() and hf[1].isfinite() and hf[2].isnan(), f"h_final {hf.tolist()}"


def test_nan_inf_do_not_raise_in_backward(device: str) -> None:
    gates, tokens = _poisoned((5, 64), device, (3, 4, 5, 6))
    g, x = leaf(gates), leaf(tokens)
    h = ferroscan.scan(g, x)
    gg, gx = torch.autograd.grad(h.sum(), (g, x))
    # Row 0 is clean: its gradients are finite.
    assert gg[0].isfinite().all() and gx[0].isfinite().all()


# ---------------------------------------------------------------------------------------------
# CUDA specifics
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_side_stream() -> None:
    """Runs on the caller's current stream: results are right on a side stream too."""
    gates, tokens, initial = make_inputs((4, 3000), -1, F32, "cuda", seed=101, initial=True)
    want = ferroscan.scan(gates, tokens, initial=initial, return_final=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        g, x = gates * 1, tokens * 1  # produced on the side stream
        got = ferroscan.scan(g, x, initial=initial, return_final=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device() -> None:
    gates, tokens, initial = make_inputs((2, 3, 300), -1, F32, "cuda:1", seed=102, initial=True)
    check_scan(gates, tokens, initial, dim=-1, reverse=True, return_final=True, seed=103, what="cuda:1")
