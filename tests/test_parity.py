"""Parity of every backend with the float64 truth over the SPEC §6 regimes."""

import pytest
import torch

from . import truth
from .helpers import BACKENDS, DEVICE, DTYPES, LOSSES, check, generator, labels, logits_pair

KINDS = ["drkl", "rkl", "fkl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 2, 7, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_vocab_sizes(kind, vocab, dtype, backend):
    gen = generator("vocab", kind, vocab, dtype)
    z, u = logits_pair(5, vocab, DTYPES[dtype], gen)
    check(kind, backend, z, u, labels(5, vocab, gen), reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_reductions_with_ignored_rows(kind, reduction, backend):
    gen = generator("reduction", kind, reduction)
    z, u = logits_pair(6, 1000, torch.float32, gen, lead=(2, 3))
    check(kind, backend, z, u, labels(6, 1000, gen, ignored=0.5, lead=(2, 3)), reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_rows_ignored(kind, reduction, backend):
    gen = generator("all-ignored", kind, reduction)
    z, u = logits_pair(3, 777, torch.float32, gen)
    target = torch.full((3,), -7, device=DEVICE)
    check(kind, backend, z, u, target, reduction=reduction, ignore_index=-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_rows(backend, reduction):
    z, u = logits_pair(0, 50, torch.float32, generator("empty"))
    check("drkl", backend, z, u, None, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_target_none(kind, dtype, backend):
    """target=None: DRKL uses the teacher argmax, found across several vocabulary blocks."""
    gen = generator("argmax", kind, dtype)
    z, u = logits_pair(4, 20_011, DTYPES[dtype], gen)
    # Row 1: the argmax lies in the last block; row 2: a tie across blocks (the first index wins);
    # row 3: a tie inside one block.
    u[1, -3] = u[1].max() + 1
    u[2, 17] = u[2, 15_000] = u[2].max() + 1
    u[3, 9_000] = u[3, 9_005] = u[3].max() + 1
    check(kind, backend, z, u, None, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_drkl_gamma_temperature(gamma, temperature, backend):
    gen = generator("gamma-tau", gamma, temperature)
    z, u = logits_pair(4, 3001, torch.float32, gen)
    check("drkl", backend, z, u, labels(4, 3001, gen), gamma=gamma, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.05, 20.0])
@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_temperature(kind, temperature, backend):
    gen = generator("tau", kind, temperature)
    z, u = logits_pair(4, 3001, torch.float32, gen)
    check(kind, backend, z, u, labels(4, 3001, gen), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("vocab", "rows", "dtype"), [(50_257, 3, "bf16"), (128_256, 2, "fp32"), (151_937, 2, "bf16")])
@pytest.mark.parametrize("kind", KINDS)
def test_large_vocab(kind, vocab, rows, dtype, backend):
    gen = generator("large", kind, vocab)
    z, u = logits_pair(rows, vocab, DTYPES[dtype], gen)
    check(kind, backend, z, u, labels(rows, vocab, gen, ignored=0.0), reduction="none")


# float16 cannot store the gradient of logits 1e4 apart at temperature 0.05 (it exceeds 65504).
HUGE = [(tau, dtype) for tau in (0.05, 1.0, 20.0) for dtype in DTYPES if (tau, dtype) != (0.05, "fp16")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("temperature", "dtype"), HUGE)
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits(kind, temperature, dtype, backend):
    """Logits of magnitude 1e4: nearly one-hot distributions, where naive float32 loses everything."""
    gen = generator("huge", kind, temperature, dtype)
    z, u = logits_pair(4, 2000, DTYPES[dtype], gen, scale=1e4 / 3)
    z[:, :3] = 1e4  # make some large values exact ties in every dtype
    check(kind, backend, z, u, labels(4, 2000, gen), temperature=temperature, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_confident_rows(kind, dtype, backend):
    """q_t rounds to 1.0 in float32; the teacher is confident on t in half of the rows."""
    gen = generator("confident", kind, dtype)
    z, u = logits_pair(6, 1000, torch.float32, gen, scale=1.0)
    t = torch.randint(0, 1000, (6,), generator=gen).to(DEVICE)
    rows = torch.arange(6, device=DEVICE)
    z[rows, t] = z.max(-1).values + 25
    u[rows[::2], t[::2]] = u.max(-1).values[::2] + 20
    assert (torch.softmax(z.float(), -1)[rows, t] == 1.0).all()
    check(kind, backend, z.to(DTYPES[dtype]), u.to(DTYPES[dtype]), t, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_negative_infinity(kind, dtype, backend):
    """-inf on both sides: shared padding, plus one-sided -inf where the divergence stays finite
    (student-only for RKL/DRKL, teacher-only for FKL); row 3 has no non-target student mass."""
    gen = generator("neginf", kind, dtype)
    vocab = 9000
    z, u = logits_pair(4, vocab, DTYPES[dtype], gen)
    t = torch.tensor([5, 6000, 8999, 2], device=DEVICE)
    z[:, 8000:8500] = u[:, 8000:8500] = float("-inf")  # padded vocabulary
    one_sided = torch.rand(4, vocab, generator=gen).to(DEVICE) < 0.3
    one_sided[torch.arange(4, device=DEVICE), t] = False
    (u if kind == "fkl" else z).masked_fill_(one_sided, float("-inf"))
    if kind != "fkl":
        z[3] = float("-inf")
        z[3, 2] = 1.0
        z[0, 5] = float("-inf")  # the student gives the target no mass
    check(kind, backend, z, u, t, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_strided_rows(backend):
    """bf16 student with a float32 teacher; rows that are slices of a wider buffer (row stride > V)."""
    gen = generator("mixed")
    z, u = logits_pair(5, 4100, torch.float32, gen)
    z, u = z.to(torch.bfloat16)[:, :4000], u[:, :4000]
    assert z.stride(0) == 4100
    check("drkl", backend, z, u, labels(5, 4000, gen))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates(kind, backend):
    z, u = logits_pair(3, 100, torch.float32, generator("nan", kind))
    z[1, 7] = float("nan")
    loss = LOSSES[kind](z, u, None, backend=backend, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    u[0, 3] = float("nan")
    assert torch.isnan(LOSSES[kind](z, u, None, backend=backend)).item()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("kind", KINDS)
def test_float64_logits_are_computed_in_float64(kind, backend):
    """The reference and the CPU kernels compute float64 logits in float64 (loss and gradient)."""
    gen = generator("float64", kind)
    z, u = logits_pair(4, 3001, torch.float64, gen)
    target = labels(4, 3001, gen)
    zz = z.clone().requires_grad_(True)
    loss = LOSSES[kind](zz, u, target, backend=backend, reduction="none")
    loss.sum().backward()
    want_loss, want_grad = truth.loss_and_grad(kind, z.cpu(), u.cpu(), target.cpu(), reduction="none")
    assert loss.dtype == zz.grad.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-12, atol=1e-14)
    assert (zz.grad.cpu() - want_grad).norm() <= 1e-11 * want_grad.norm()
