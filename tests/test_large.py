r"""More than 2^31 elements on CUDA: 64-bit indexing in the forward and backward kernels.

Each case holds bfloat16 tensors of ``N > 2^31`` elements (4.3 GB each): gates, tokens, h,
the upstream gradient and the two input gradients, about ``6 * 2N`` bytes in all. A full
float64 reference of such a scan is not needed to check it: with gates in [0.5, 1) the state
forgets its past geometrically, so a *window* of ``W`` steps is recomputed in float64 from the
state ferroscan itself produced ``WARM`` steps before it. Whatever error that starting state
carries is multiplied by the product of ``WARM`` gates (about ``e^{-0.3 WARM}``; the test
asserts it is below 1e-30), so the window's reference is exact to float64 precision.

Windows: the start, the middle and the end of every sequence, the end covering the elements
past flat index 2^31. The backward pass (the reverse scan of the upstream gradient) is checked
the same way, with its warm-up after the window, and so are h_final and d/dinitial.

Tolerance, as in test_scan.check_half: the same window loop run in float32 from the same
state gives ``err32``, float32 accumulation's error on these inputs; ours may be
``2 * err32 + u_bf16 * |ref|`` (one rounding to bfloat16) ``+ tiny``.
"""

from __future__ import annotations

from typing import Optional

import ferroscan
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.large]

BF16 = torch.bfloat16
F64 = torch.float64
F32 = torch.float32
U_BF16 = 2.0**-8
W = 1024  # steps checked per window
WARM = 2048  # steps recomputed before (forward) or after (backward) each window

CASES = [
    # (shape, dim, reverse): 4 rows of 2^29 + 17 steps, time innermost ("rows" kernels)
    pytest.param((4, 2**29 + 17), -1, False, id="4x(2^29+17)-fwd"),
    # one sequence longer than 2^31: time indices themselves past 2^31
    pytest.param((2**31 + 64,), 0, True, id="(2^31+64)-rev"),
    # time first, 4 channels innermost ("strided" kernels)
    pytest.param((2**29 + 17, 4), 0, False, id="(2^29+17)x4-dim0-fwd"),
]


def _need_bytes(numel: int) -> int:
    """gates, tokens, h, upstream gradient, d/dgates, d/dtokens in bfloat16, plus 2 GiB slack."""
    return 6 * 2 * numel + 2 * 2**30


def _take(row: torch.Tensor, lo: int, hi: int, reverse: bool, fill: float) -> torch.Tensor:
    """Elements of the 1-d ``row`` at scan positions ``lo..hi-1`` (position ``p`` is index ``p``,
    or ``L-1-p`` when reversed), as float64 in scan order; ``fill`` outside ``0..L-1``."""
    length = row.shape[0]
    n_before = min(max(0, -lo), hi - lo)
    n_after = min(max(0, hi - length), hi - lo - n_before)
    lo_c, hi_c = lo + n_before, hi - n_after
    if not reverse:
        part = row[lo_c:hi_c]
    else:
        part = row[length - hi_c : length - lo_c].flip(0)
    before = torch.full((n_before,), fill, dtype=F64, device=row.device)
    after = torch.full((n_after,), fill, dtype=F64, device=row.device)
    return torch.cat([before, part.to(F64), after])


def _loop(a: torch.Tensor, x: torch.Tensor, s0: torch.Tensor, backward: bool, dtype: torch.dtype) -> torch.Tensor:
    """Sequential loop over the last axis of ``(windows, T)`` inputs from states ``s0``,
    ascending (or descending when ``backward``), in ``dtype``."""
    a, x, s = a.to(dtype), x.to(dtype), s0.to(dtype)
    steps = a.shape[-1]
    out: list[Optional[torch.Tensor]] = [None] * steps
    for t in reversed(range(steps)) if backward else range(steps):
        s = a[:, t] * s + x[:, t]
        out[t] = s
    return torch.stack(out, -1)


def _assert_forgotten(warm_gates: torch.Tensor, from_ours: list[bool]) -> None:
    """The windows that start from ferroscan's own state must have forgotten it: the product of
    their warm-up gates, which multiplies any error in that state, is below 1e-30."""
    if any(from_ours):
        weight = warm_gates[torch.tensor(from_ours, device=warm_gates.device)].log().sum(-1).exp().max().item()
        assert weight < 1e-30, f"warm-up too short: the starting state still weighs {weight:.3g}"


def _bound(ours: torch.Tensor, ref: torch.Tensor, loop32: torch.Tensor, extra: Optional[torch.Tensor] = None):  # noqa: ANN202
    err32 = (loop32.to(F64) - ref).abs().max().item()
    bound = 2 * err32 + U_BF16 * ref.abs() + torch.finfo(BF16).tiny
    return bound if extra is None else bound + extra, err32


def _assert_within(ours: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (ours.to(F64) - ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: "
            f"got {ours[i].item():.6g}, want {ref[i].item():.6g}, bound {bound[i].item():.3g}"
        )


def check_windows(
    gates: torch.Tensor,
    tokens: torch.Tensor,
    initial: torch.Tensor,
    h: torch.Tensor,
    h_final: torch.Tensor,
    w: torch.Tensor,
    w_final: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    dim: int,
    reverse: bool,
) -> None:
    """Checks h, h_final and the gradients of ``scan(gates, tokens, dim, reverse, initial)``
    (upstream ``w``, ``w_final``) on windows at the start, middle and end of every sequence."""
    dim = dim % tokens.dim()
    length = tokens.shape[dim]

    def rows(t: torch.Tensor) -> list[torch.Tensor]:
        t = t.movedim(dim, -1)
        return list(t.reshape(-1, length)) if t.dim() > 1 else [t]

    def states(t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.reshape(-1))

    a_rows, x_rows, h_rows, w_rows = rows(gates), rows(tokens), rows(h), rows(w)
    ga_rows, gx_rows = rows(grads[0]), rows(grads[1])
    h0s, hfs, wfs, g0s = states(initial), states(h_final), states(w_final), states(grads[2])
    starts = [0, length // 2 - W // 2, length - W]
    windows = [(r, s) for r in range(len(a_rows)) for s in starts]

    def stack(fn) -> torch.Tensor:  # noqa: ANN001
        return torch.stack([fn(r, s) for r, s in windows])

    # Forward: positions s-WARM .. s+W-1, from ferroscan's state just before (or initial).
    def fwd_start(r: int, s: int) -> torch.Tensor:
        p = s - WARM - 1
        return _take(h_rows[r], p, p + 1, reverse, 0.0)[0] if p >= 0 else h0s[r].to(F64)

    a = stack(lambda r, s: _take(a_rows[r], s - WARM, s + W, reverse, 1.0))
    x = stack(lambda r, s: _take(x_rows[r], s - WARM, s + W, reverse, 0.0))
    s0 = stack(fwd_start)
    ref_h = _loop(a, x, s0, False, F64)
    loop_h = _loop(a, x, s0, False, F32)
    _assert_forgotten(a[:, :WARM], [s - WARM - 1 >= 0 for _, s in windows])
    ours_h = stack(lambda r, s: _take(h_rows[r], s, s + W, reverse, 0.0))
    bound, err32 = _bound(ours_h, ref_h[:, WARM:], loop_h[:, WARM:])
    _assert_within(ours_h, ref_h[:, WARM:], bound, f"h (float32 loop error {err32:.3g})")
    ends = [i for i, (_, s) in enumerate(windows) if s == length - W]
    ours_f = torch.stack([hfs[windows[i][0]] for i in ends])
    bound, _ = _bound(ours_f, ref_h[ends, -1], loop_h[ends, -1])
    _assert_within(ours_f, ref_h[ends, -1], bound, "h_final")

    # Backward: g_p = w_p + a_{p+1} g_{p+1} (scan positions), g_L = w_final; from ferroscan's
    # d/dtokens just after the warm-up that follows the window.
    def bwd_start(r: int, s: int) -> torch.Tensor:
        p = s + W + WARM
        return _take(gx_rows[r], p, p + 1, reverse, 0.0)[0] if p < length else wfs[r].to(F64)

    a_next = stack(lambda r, s: _take(a_rows[r], s + 1, s + W + WARM + 1, reverse, 1.0))
    wx = stack(lambda r, s: _take(w_rows[r], s, s + W + WARM, reverse, 0.0))
    g0 = stack(bwd_start)
    _assert_forgotten(a_next[:, W:], [s + W + WARM < length for _, s in windows])
    ref_g = _loop(a_next, wx, g0, True, F64)[:, :W]
    loop_g = _loop(a_next, wx, g0, True, F32)[:, :W]
    ours_gx = stack(lambda r, s: _take(gx_rows[r], s, s + W, reverse, 0.0))
    bound, err32_g = _bound(ours_gx, ref_g, loop_g)
    _assert_within(ours_gx, ref_g, bound, f"d/dtokens (float32 loop error {err32_g:.3g})")
    # d/dgates_p = g_p * h_{p-1} with ferroscan's own (saved) h, initial before position 0.
    h_prev = stack(
        lambda r, s: (
            torch.cat([h0s[r].to(F64).reshape(1), _take(h_rows[r], 0, W - 1, reverse, 0.0)])
            if s == 0
            else _take(h_rows[r], s - 1, s + W - 1, reverse, 0.0)
        )
    )
    ours_ga = stack(lambda r, s: _take(ga_rows[r], s, s + W, reverse, 0.0))
    ref_ga = ref_g * h_prev
    bound = 2 * err32_g * h_prev.abs() + U_BF16 * ref_ga.abs() + torch.finfo(BF16).tiny
    _assert_within(ours_ga, ref_ga, bound, "d/dgates")
    # d/dinitial = a_0 g_0.
    firsts = [i for i, (_, s) in enumerate(windows) if s == 0]
    ours_g0 = torch.stack([g0s[windows[i][0]] for i in firsts])
    ref_g0 = a[firsts, WARM] * ref_g[firsts, 0]
    bound = 2 * err32_g * a[firsts, WARM] + U_BF16 * ref_g0.abs() + torch.finfo(BF16).tiny
    _assert_within(ours_g0, ref_g0, bound, "d/dinitial")


@pytest.mark.parametrize(("shape", "dim", "reverse"), CASES)
def test_more_than_2_31_elements(shape: tuple[int, ...], dim: int, reverse: bool) -> None:
    numel = 1
    for s in shape:
        numel *= s
    assert numel > 2**31
    need = _need_bytes(numel)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    print(f"shape {shape}: {numel} elements; needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")

    gen = torch.Generator(device="cuda").manual_seed(0)
    state_shape = [s for d, s in enumerate(shape) if d != dim % len(shape)]
    try:
        gates = torch.empty(shape, dtype=BF16, device="cuda").uniform_(0.5, 1.0, generator=gen)
        tokens = torch.empty(shape, dtype=BF16, device="cuda").normal_(generator=gen)
        initial = torch.randn(state_shape, dtype=BF16, device="cuda", generator=gen)
        g, x, h0 = (t.requires_grad_() for t in (gates, tokens, initial))
        h, h_final = ferroscan.scan(g, x, dim=dim, reverse=reverse, initial=h0, return_final=True)
        assert h.shape == shape and h.dtype == BF16 and h_final.shape == tuple(state_shape)
        w = torch.empty(shape, dtype=BF16, device="cuda").normal_(generator=gen)
        w_final = torch.randn(state_shape, dtype=BF16, device="cuda", generator=gen)
        grads = torch.autograd.grad((h, h_final), (g, x, h0), (w, w_final))
        torch.cuda.synchronize()
        with torch.no_grad():
            check_windows(
                gates.detach(), tokens.detach(), initial.detach(), h.detach(), h_final.detach(),
                w, w_final, grads, dim=dim, reverse=reverse,
            )  # fmt: skip
    finally:
        gates = tokens = initial = g = x = h0 = h = h_final = w = w_final = grads = None
        torch.cuda.empty_cache()
