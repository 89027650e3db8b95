"""The float64 truth itself: its explicit RKL gradient (``truth._rkl_grad``) against autograd through
a plain float64 formula, and the regime it exists for."""

import pytest
import torch

from . import truth
from .helpers import generator


def plain(kind, z, u, t, temperature, gamma=0.5):
    """Per-row loss in float64 by the textbook formulas (autograd differentiates it)."""
    s, r = z / temperature, u / temperature
    if kind == "rkl":
        ls, lr = torch.log_softmax(s, -1), torch.log_softmax(r, -1)
        return (ls.exp() * (ls - lr)).sum(-1)
    hit = torch.nn.functional.one_hot(t, z.shape[-1]).bool()
    q_t, p_t = torch.softmax(s, -1)[hit], torch.softmax(r, -1)[hit]
    binary = q_t * torch.log(q_t / p_t) + (1 - q_t) * torch.log((1 - q_t) / (1 - p_t))
    lse = lambda x: torch.logsumexp(x.masked_fill(hit, -torch.inf), -1, keepdim=True)  # noqa: E731
    ls, lr = torch.where(hit, 0.0, s - lse(s)), torch.where(hit, 0.0, r - lse(r))
    return binary + gamma * torch.where(hit, 0.0, ls.exp() * (ls - lr)).sum(-1)


@pytest.mark.parametrize("kind", ["rkl", "drkl"])
def test_explicit_gradient_is_autograds(kind):
    gen = generator("truth", kind)
    z = torch.randn(16, 300, generator=gen, dtype=torch.float64) * 3
    u = 0.6 * z + torch.randn(16, 300, generator=gen, dtype=torch.float64) * 2
    t = torch.randint(0, 300, (16,), generator=gen)
    loss, grad = truth.loss_and_grad(kind, z, u, t, temperature=1.7, reduction="none")
    zz = z.clone().requires_grad_(True)
    want = plain(kind, zz, u, t, 1.7)
    (want_grad,) = torch.autograd.grad(want.sum(), zz)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0.0)
    assert ((grad - want_grad).norm(dim=-1) / want_grad.norm(dim=-1)).max() < 1e-12


def test_gaps_that_agree_exactly_give_exactly_zero():
    """bf16 logits of 1e4 at tau = 20 (seed 5106's row): the student puts its mass on two tokens
    whose logit gap is the teacher's too, and none elsewhere, so q = p on them and the gradient is
    exactly 0. Dividing by tau before subtracting leaves ~1e-17 of rounding in autograd's value."""
    z = torch.tensor([[11712.0, 11904.0, -1e4, -1e4, -1e4]], dtype=torch.float64)  # q = 0 beyond token 1
    u = torch.tensor([[9536.0, 9728.0, 10944.0, 9536.0, 9024.0]], dtype=torch.float64)  # gap -192 on both sides
    grad = truth.loss_and_grad("rkl", z, u, None, temperature=20.0, reduction="none")[1]
    assert torch.equal(grad, torch.zeros_like(grad))
    zz = z.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(plain("rkl", zz, u, None, 20.0).sum(), zz)
    assert autograd.norm() > 1e-20  # what the explicit form avoids
