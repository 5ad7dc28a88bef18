"""ferroscan.nn.GatedSSM: shapes and dtypes, gradients, the scan against a plain loop, training."""

from __future__ import annotations

import ferroscan
import pytest
import torch
import torch.nn.functional as F
from ferroscan.nn import GatedSSM


def test_importable_from_package():
    assert ferroscan.nn.GatedSSM is GatedSSM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_shape_and_dtype(dtype):
    torch.manual_seed(0)
    layer = GatedSSM(12, 20, dtype=dtype)
    u = torch.randn(3, 7, 12, dtype=dtype)
    out = layer(u)
    assert out.shape == u.shape
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert layer.d_state == 20
    assert GatedSSM(12, expand=1.5).d_state == 18


def test_rejects_bad_input():
    layer = GatedSSM(8)
    with pytest.raises(ValueError):
        layer(torch.randn(2, 5, 9))
    with pytest.raises(ValueError):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError):
        GatedSSM(8, forget_init=(0.9, 0.5))


def test_forget_init_range():
    layer = GatedSSM(4, 16, forget_init=(0.6, 0.95))
    a = torch.sigmoid(layer.forget_proj.bias.detach().double())
    assert a.min().item() == pytest.approx(0.6, rel=1e-5)
    assert a.max().item() == pytest.approx(0.95, rel=1e-5)
    assert (a.diff() > 0).all()


def test_backward_all_parameters_get_finite_gradients():
    torch.manual_seed(1)
    layer = GatedSSM(10, 16)
    u = torch.randn(2, 9, 10, requires_grad=True)
    layer(u).square().sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _loop_reference(layer: GatedSSM, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's math written out from its weights, with a Python loop over time."""
    w_a, beta_a = layer.forget_proj.weight, layer.forget_proj.bias
    w_x, w_b, w_g, w_v = layer.in_proj.weight.chunk(4, dim=0)
    normed = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight
    h = u.new_zeros(u.shape[0], layer.d_state)
    ys = []
    for t in range(u.shape[1]):
        n = normed[:, t]
        a = torch.sigmoid(n @ w_a.T + beta_a)
        b = torch.sigmoid(n @ w_b.T)
        x = n @ w_x.T
        c = F.silu(n @ w_g.T) * (n @ w_v.T)
        h = a * h + b * x
        ys.append(c * h)
    y = torch.stack(ys, dim=1)
    out = u + y @ layer.out_proj.weight.T + layer.out_proj.bias
    return y, out


def test_matches_loop_reference_float64():
    torch.manual_seed(2)
    layer = GatedSSM(6, 11, dtype=torch.float64)
    with torch.no_grad():  # non-trivial norm weights, so the reference checks them too
        layer.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(3, 17, 6, dtype=torch.float64, requires_grad=True)

    x, a, b, c = layer.scan_inputs(u)
    y = ferroscan.gated_scan(x, a, b, c, dim=1)
    y_ref, out_ref = _loop_reference(layer, u)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)

    out = layer(u)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)

    # Gradients through the layer agree with those through the loop.
    g = torch.randn_like(out)
    params = [u, *layer.parameters()]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(out_ref, params, g)
    for name, gv, wv in zip(["u", *(n for n, _ in layer.named_parameters())], got, want):
        torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-10, msg=name)


def test_causal():
    torch.manual_seed(3)
    layer = GatedSSM(5, 8, dtype=torch.float64)
    u = torch.randn(2, 12, 5, dtype=torch.float64)
    v = u.clone()
    v[:, 7:] += torch.randn_like(v[:, 7:])
    with torch.no_grad():
        torch.testing.assert_close(layer(u)[:, :7], layer(v)[:, :7])


def test_training_reduces_loss_on_fixed_batch():
    torch.manual_seed(4)
    vocab, d = 6, 16
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, d), GatedSSM(d, 32), GatedSSM(d, 32), torch.nn.Linear(d, vocab)
    )
    tokens = torch.randint(0, vocab, (8, 12))
    targets = torch.roll(tokens, 1, dims=1)  # predict the previous token
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = loss_fn().item()
    assert last < 0.7 * first, (first, last)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(5)
    layer = GatedSSM(8, 16, dtype=torch.float64)
    u = torch.randn(2, 33, 8, dtype=torch.float64)
    want = layer(u)
    got = layer.to("cuda")(u.to("cuda")).cpu()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
