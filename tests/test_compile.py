"""ferroscan under the PyTorch 2 stack: ``torch.compile(fullgraph=True)``, the custom ops'
registrations (``torch.library.opcheck``) and ``torch.export``.

``ferroscan.scan`` is a thin Python function around the custom op ``ferroscan::scan_fwd``
(autograd: ``ferroscan::scan_bwd``), which takes C-contiguous ``(outer, len, inner)`` tensors
and an optional ``(outer, inner)`` initial state and returns ``(hidden, final)``.
"""

from __future__ import annotations

import shutil
from typing import Optional

import ferroscan
import pytest
import torch

F32 = torch.float32
F64 = torch.float64

# Inductor's CPU code generation needs a C++ compiler; without one, only the other backends run.
HAVE_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _inputs(shape: tuple[int, ...], dim: int, device: str, dtype: torch.dtype = F32, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    gates = (0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=F64)).to(dtype).to(device)
    tokens = torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(device)
    state = [s for d, s in enumerate(shape) if d != dim % len(shape)]
    initial = torch.randn(state, generator=gen, dtype=F64).to(dtype).to(device)
    return gates, tokens, initial


def model(gates: torch.Tensor, tokens: torch.Tensor, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A small block around the scan: ops before and after it, both outputs used."""
    h, h_final = ferroscan.scan(torch.sigmoid(gates), tokens * 2, dim=1, initial=initial, return_final=True)
    return (h.tanh() * tokens).sum(dim=-1), h_final * 3


def _backends() -> list:
    inductor = pytest.param(
        "inductor", marks=pytest.mark.skipif(not HAVE_CXX, reason="inductor on CPU needs a C++ compiler")
    )
    return ["aot_eager", inductor]


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", _backends())
def test_compile_fullgraph_matches_eager(device: str, backend: str) -> None:
    """Values and gradients of the compiled block equal eager ones (reverse too)."""
    torch._dynamo.reset()
    gates, tokens, initial = _inputs((2, 50, 3), 1, device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)

    eager_in, comp_in = _leaves(gates, tokens, initial), _leaves(gates, tokens, initial)
    eager_out, comp_out = model(*eager_in), compiled(*comp_in)
    for e, c in zip(eager_out, comp_out):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    w = [torch.randn_like(o) for o in eager_out]
    eager_grads = torch.autograd.grad(eager_out, eager_in, w)
    comp_grads = torch.autograd.grad(comp_out, comp_in, w)
    for name, e, c in zip(("gates", "tokens", "initial"), eager_grads, comp_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=f"d/d{name}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_compile_scan_outputs_bitwise(device: str, reverse: bool) -> None:
    """The op's own outputs are the same numbers compiled and eager, and so are its gradients."""
    torch._dynamo.reset()

    def fn(g: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor]):  # noqa: ANN202
        return ferroscan.scan(g, x, dim=-1, reverse=reverse, initial=h0, return_final=True)

    gates, tokens, initial = _inputs((3, 4, 300), -1, device, seed=1)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for h0 in (initial, None):
        e_in = _leaves(gates, tokens) + ([] if h0 is None else _leaves(h0))
        c_in = _leaves(gates, tokens) + ([] if h0 is None else _leaves(h0))
        e_out = fn(e_in[0], e_in[1], e_in[2] if h0 is not None else None)
        c_out = compiled(c_in[0], c_in[1], c_in[2] if h0 is not None else None)
        assert torch.equal(e_out[0], c_out[0]) and torch.equal(e_out[1], c_out[1])
        w = [torch.ones_like(o) for o in e_out]
        for e, c in zip(torch.autograd.grad(e_out, e_in, w), torch.autograd.grad(c_out, c_in, w)):
            assert torch.equal(e, c)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic=True"])
def test_compile_new_lengths(device: str, dynamic: Optional[bool]) -> None:
    """One compiled function called with several lengths and batch sizes.

    With the default ``dynamic=None`` the second shape makes Dynamo recompile with symbolic
    sizes ("automatic dynamic shapes"); ``dynamic=True`` does so from the first call. Either way
    ``fullgraph=True`` must hold: ferroscan.scan must trace with symbolic sizes.
    """
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in [(2, 17, 3), (3, 64, 3), (1, 100, 3)]:
        gates, tokens, initial = _inputs(shape, 1, device, seed=shape[1])
        for e, c in zip(model(gates, tokens, initial), compiled(gates, tokens, initial)):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_compile_under_no_grad(device: str) -> None:
    torch._dynamo.reset()
    gates, tokens, initial = _inputs((2, 40, 3), 1, device, seed=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(gates, tokens, initial)
    for e, c in zip(model(gates, tokens, initial), out):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------


def _fwd_samples(device: str) -> list[tuple]:
    samples = []
    for dtype in (F32, F64, torch.bfloat16):
        for outer, length, inner in [(3, 20, 1), (2, 33, 4), (1, 1, 5)]:
            for with_initial in (False, True):
                for reverse in (False, True):
                    gen = torch.Generator().manual_seed(outer * length + inner)
                    g = (0.5 + 0.5 * torch.rand(outer, length, inner, generator=gen)).to(dtype).to(device)
                    x = torch.randn(outer, length, inner, generator=gen).to(dtype).to(device)
                    h0 = torch.randn(outer, inner, generator=gen).to(dtype).to(device) if with_initial else None
                    requires_grad = dtype != torch.bfloat16
                    if requires_grad:
                        g, x = g.requires_grad_(), x.requires_grad_()
                        h0 = None if h0 is None else h0.requires_grad_()
                    samples.append((g, x, h0, reverse))
    return samples


def test_opcheck_scan_fwd(device: str) -> None:
    for args in _fwd_samples(device):
        torch.library.opcheck(torch.ops.ferroscan.scan_fwd.default, args)


def test_opcheck_scan_bwd(device: str) -> None:
    for g, x, h0, reverse in _fwd_samples(device):
        g, x = g.detach(), x.detach()
        h0 = None if h0 is None else h0.detach()
        hidden, _ = torch.ops.ferroscan.scan_fwd(g, x, h0, reverse)
        grad_hidden = torch.randn_like(hidden)
        for grad_final in (None, torch.randn_like(hidden[:, 0, :])):
            args = (g, hidden, h0, grad_hidden, grad_final, reverse)
            torch.library.opcheck(torch.ops.ferroscan.scan_bwd.default, args)


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """A small module whose forward calls ferroscan.scan once."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(channels, channels)
        self.gate = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.sigmoid(self.gate).expand_as(x)
        h, h_final = ferroscan.scan(gates, self.proj(x), dim=1, initial=h0, return_final=True)
        return h, h_final


def _scan_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and "ferroscan" in str(n.target)]


def test_export_keeps_the_op_as_one_node(device: str) -> None:
    block = Block(4).to(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 4, generator=gen).to(device)
    h0 = torch.randn(2, 4, generator=gen).to(device)
    exported = torch.export.export(block, (x, h0))
    nodes = _scan_nodes(exported.graph)
    assert [n.target for n in nodes] == [torch.ops.ferroscan.scan_fwd.default], exported.graph
    for got, want in zip(exported.module()(x, h0), block(x, h0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_dynamic_length(device: str) -> None:
    """An exported program whose time axis is a dynamic dimension runs on other lengths."""
    block = Block(4).to(device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 4, generator=gen).to(device)
    h0 = torch.randn(2, 4, generator=gen).to(device)
    length = torch.export.Dim("length", min=2, max=4096)
    exported = torch.export.export(block, (x, h0), dynamic_shapes={"x": {1: length}, "h0": None})
    assert len(_scan_nodes(exported.graph)) == 1
    x2 = torch.randn(2, 77, 4, generator=gen).to(device)
    for got, want in zip(exported.module()(x2, h0), block(x2, h0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The fused gated scan (CUDA only: elsewhere gated_scan composes ferroscan::scan_fwd)
# ---------------------------------------------------------------------------------------------

def gated_model(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h0: torch.Tensor) -> tuple:
    y, hf = ferroscan.gated_scan(x * 2, torch.sigmoid(a), b, c, dim=1, initial=h0, return_final=True)
    return y.tanh().sum(dim=-1), hf * 3


@pytest.mark.cuda
def test_compile_gated_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    x, a, b, c = (torch.randn(2, 70, 40, generator=gen).cuda() for _ in range(4))
    h0 = torch.randn(2, 40, generator=gen).cuda()
    compiled = torch.compile(gated_model, fullgraph=True, backend="aot_eager")
    eager_in, comp_in = _leaves(x, a, b, c, h0), _leaves(x, a, b, c, h0)
    eager_out, comp_out = gated_model(*eager_in), compiled(*comp_in)
    for e, o in zip(eager_out, comp_out):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    w = [torch.randn_like(o) for o in eager_out]
    eager_grads, comp_grads = torch.autograd.grad(eager_out, eager_in, w), torch.autograd.grad(comp_out, comp_in, w)
    for name, e, o in zip("xabch", eager_grads, comp_grads):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=f"d/d{name}")


@pytest.mark.cuda
def test_opcheck_gated_ops() -> None:
    gen = torch.Generator().manual_seed(8)
    for dtype in (F32, F64):
        for with_b, with_c, with_initial, reverse in [(True, True, True, False), (False, True, False, True),
                                                      (True, False, True, True), (False, False, False, False)]:
            x, a, b, c = (torch.randn(2, 19, 33, generator=gen).to(dtype).cuda() for _ in range(4))
            b, c = (b if with_b else None), (c if with_c else None)
            h0 = torch.randn(2, 33, generator=gen).to(dtype).cuda() if with_initial else None
            torch.library.opcheck(torch.ops.ferroscan.gated_scan_fwd.default, (x, a, b, c, h0, reverse, False))
            fwd_args = (x.requires_grad_(), a, b, c, h0, reverse, True)
            torch.library.opcheck(torch.ops.ferroscan.gated_scan_fwd.default, fwd_args)
            _, _, checkpoints = torch.ops.ferroscan.gated_scan_fwd(x.detach(), a, b, c, h0, reverse, True)
            grad_y = torch.randn_like(x)
            for grad_final in (None, torch.randn(2, 33, dtype=dtype, device="cuda")):
                args = (x.detach(), a, b, c, checkpoints, grad_y, grad_final, reverse, with_initial)
                torch.library.opcheck(torch.ops.ferroscan.gated_scan_bwd.default, args)
