"""Gradients: gradcheck of the reference, upstream gradients, in-place gradients, grad modes."""

import pytest
import torch

import drkl_kernels as dk

from .helpers import BACKENDS, DEVICE, LOSSES, check, generator, labels, logits_pair, run

KINDS = ["drkl", "rkl", "fkl"]


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_reference(kind, with_labels):
    """The reference's analytic gradient (SPEC §3) against finite differences, in float64."""
    gen = generator("gradcheck", kind, with_labels)
    z, u = logits_pair(4, 7, torch.float64, gen)
    z, u = z.cpu(), u.cpu()
    target = labels(4, 7, gen, ignored=0.3).cpu() if with_labels else None
    extra = {"gamma": 1.5} if kind == "drkl" else {}

    def loss(z):
        return LOSSES[kind](z, u, target, backend="reference", reduction="none", temperature=0.7, **extra)

    assert torch.autograd.gradcheck(loss, (z.requires_grad_(True),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_scalar(kind, backend):
    gen = generator("upstream", kind)
    z, u = logits_pair(5, 3000, torch.float32, gen)
    check(kind, backend, z, u, labels(5, 3000, gen), upstream=torch.tensor(-2.5, device=DEVICE))
    check(kind, backend, z, u, labels(5, 3000, gen), reduction="sum", upstream=torch.tensor(0.3, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_per_row(kind, backend):
    """reduction="none" with one upstream value per row, some exactly 1 (the skipped case) and one 0."""
    gen = generator("per-row", kind)
    z, u = logits_pair(6, 3000, torch.bfloat16, gen, lead=(2, 3))
    weight = torch.randn(2, 3, generator=gen).to(DEVICE)
    weight[0, 1] = weight[1, 2] = 1.0
    weight[1, 0] = 0.0
    check(kind, backend, z, u, labels(6, 3000, gen, lead=(2, 3)), reduction="none", upstream=weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_inplace_backward(kind, dtype, backend):
    """The gradient is right, and the fused backends wrote it into the student logits: the
    student's memory is the gradient (``check`` asserts it of the gradient autograd returns; here
    of ``.grad`` after ``.backward()``)."""
    gen = generator("inplace", kind, dtype)
    z, u = logits_pair(4, 5000, dtype, gen)
    target = labels(4, 5000, gen)
    check(kind, backend, z, u, target, upstream=torch.tensor(3.0, device=DEVICE), inplace=True)
    if backend != "reference":
        zz = z.clone().requires_grad_(True)
        LOSSES[kind](zz, u, target, backend=backend, inplace_backward=True).backward()
        assert zz.grad.data_ptr() == zz.data_ptr() and zz.grad.stride() == zz.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_detached(backend):
    """No gradient is computed (or allocated) when none is asked for; the loss is the same."""
    gen = generator("nograd")
    z, u = logits_pair(3, 2000, torch.float32, gen)
    target = labels(3, 2000, gen)
    want = dk.drkl_loss(z, u, target, backend=backend)
    with torch.no_grad():
        assert torch.equal(dk.drkl_loss(z.clone().requires_grad_(True), u, target, backend=backend), want)
    assert not want.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward(backend):
    """Fused backends scale their gradient in place once; the reference recomputes it."""
    z, u = logits_pair(3, 100, torch.float32, generator("twice"))
    zz = z.clone().requires_grad_(True)
    loss = dk.rkl_loss(zz, u, backend=backend)
    loss.backward(retain_graph=True)
    if backend == "reference":
        first = zz.grad.clone()
        loss.backward()
        assert torch.allclose(zz.grad, 2 * first)
    else:
        with pytest.raises(RuntimeError, match="one backward per forward"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_drkl_ignores_the_student_weight_on_the_tail(backend):
    """With q_t == p_t (the teacher's tail is a permutation of the student's), the DRKL gradient at
    the target vanishes, while RKL still pushes z_t up through its (1 - q_t) weight (SPEC §1)."""
    gen = generator("semantics")
    z, _ = logits_pair(4, 50, torch.float32, gen)
    t = torch.tensor([3, 10, 0, 49], device=DEVICE)
    u = z.clone()
    for row in range(4):
        tail = [j for j in range(50) if j != t[row]]
        u[row, tail] = z[row, torch.tensor(tail)[torch.randperm(49, generator=gen)]]
    _, g_drkl = run("drkl", backend, z, u, t, reduction="sum")
    _, g_rkl = run("rkl", backend, z, u, t, reduction="sum")
    rows = torch.arange(4, device=DEVICE)
    assert (g_rkl[rows, t] < -1e-6).all()
    # zero up to the rounding of two sums taken in different orders
    assert (g_drkl[rows, t].abs() < 1e-3 * g_rkl[rows, t].abs()).all()
