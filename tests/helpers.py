"""Shared test helpers: input makers, the backends under test, and the SPEC §6 tolerances."""

from __future__ import annotations

import json
import os
import random
import zlib

import torch

import drkl_kernels as dk

from . import truth

SEED = int(os.environ.get("DRKL_TEST_SEED", random.SystemRandom().randrange(2**31)))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LOSSES = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}

# Every backend this machine must test; a missing one fails its tests rather than vanishing.
BACKENDS = ["reference", "triton"] + (["cuda"] if torch.cuda.is_available() else ["cpu"])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def generator(*key) -> torch.Generator:
    """A CPU generator seeded from the session seed and a per-test key (fresh inputs each session)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED,) + key).encode()) + SEED)


def logits_pair(rows, vocab, dtype, gen, *, scale=2.0, lead=None):
    """Student and teacher logits; the teacher is correlated with the student, as in distillation."""
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    u = 0.6 * z + 0.8 * scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    shape = (rows, vocab) if lead is None else (*lead, vocab)
    return z.reshape(shape).to(dtype).to(DEVICE), u.reshape(shape).to(dtype).to(DEVICE)


def labels(rows, vocab, gen, *, ignored=0.25, lead=None):
    """Random labels with about ``ignored`` of the rows (never all of them, unless rows == 0) set to -100."""
    t = torch.randint(0, vocab, (rows,), generator=gen)
    drop = torch.rand(rows, generator=gen) < ignored
    drop[0] = False
    t[drop] = -100
    return t.reshape(lead if lead is not None else (rows,)).to(DEVICE)


def run(kind, backend, student, teacher, target, *, reduction="mean", upstream=None, inplace=False, **kw):
    """Loss and student gradient through the public API; checks the inputs were not written to."""
    z = student.clone().requires_grad_(True)
    z_before, u_before = student.clone(), teacher.clone()
    t_before = None if target is None else target.clone()
    loss = LOSSES[kind](z, teacher, target, backend=backend, reduction=reduction, inplace_backward=inplace, **kw)
    assert loss.dtype == torch.float32
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    assert torch.equal(teacher, u_before), "teacher_logits were modified"
    assert target is None or torch.equal(target, t_before), "target was modified"
    if not inplace:
        assert torch.equal(z.detach(), z_before), "student_logits were modified"
    assert z.grad.dtype == student.dtype and z.grad.shape == student.shape
    return loss.detach(), z.grad


def assert_loss_close(got, want) -> tuple[float, float]:
    """|got - want| <= max(1e-5 |want|, 1e-6) elementwise. Returns the worst error as a fraction of
    that tolerance, and the worst relative error over losses of magnitude 0.1 or more."""
    got, want = got.double().cpu(), want.double()
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = torch.clamp(1e-5 * want.abs(), min=1e-6)
    err = (got - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), f"loss error {err[bad].max().item():.3g} > tol; got {got[bad][:4].tolist()} want {want[bad][:4].tolist()}"
    if not err.numel():
        return 0.0, 0.0
    sizable = want.abs() >= 0.1  # where the relative tolerance is the binding one
    rel = (err[sizable] / want.abs()[sizable]).max().item() if sizable.any() else 0.0
    return (err / tol).max().item(), rel


# Below these magnitudes a gradient element cannot be stored: float32 arithmetic flushes
# subnormals on GPUs (bf16 shares its range), and float16 rounds in steps of 2**-24.
GRAD_FLOOR = {torch.float32: 2.0**-126, torch.bfloat16: 2.0**-126, torch.float16: 2.0**-24}


def assert_grad_close(got, want, dtype) -> tuple[float, float]:
    """Norm-wise relative error <= GRAD_TOL, allowing what the storage dtype cannot represent.
    Returns the error as a fraction of the allowance, and the plain norm-wise relative error
    (0 when the gradient is too small for the storage dtype to make that meaningful)."""
    got, want = got.double().cpu(), want.double()
    assert torch.isfinite(got).all(), "non-finite gradient"
    err = (got - want).norm().item()
    allowed = GRAD_TOL[dtype] * want.norm().item() + GRAD_FLOOR[dtype] * want.numel() ** 0.5
    assert err <= allowed, f"gradient error {err:.3g} > {allowed:.3g} (rel. {err / max(want.norm().item(), 1e-300):.3g}, {dtype})"
    norm = want.norm().item()
    representable = GRAD_TOL[dtype] * norm > GRAD_FLOOR[dtype] * want.numel() ** 0.5
    return (err / allowed if allowed else 0.0), (err / norm if representable else 0.0)


def check(kind, backend, student, teacher, target, *, reduction="mean", upstream=None, inplace=False, **kw):
    """Parity of one backend with the float64 truth, loss and gradient.

    With DRKL_ERROR_LOG set, appends one JSON line per check to that file: the backend, dtype,
    and the loss and gradient errors as fractions of their SPEC §6 tolerances.
    """
    loss, grad = run(kind, backend, student, teacher, target, reduction=reduction, upstream=upstream, inplace=inplace, **kw)
    want_loss, want_grad = truth.loss_and_grad(
        kind, student.cpu(), teacher.cpu(), None if target is None else target.cpu(),
        reduction=reduction, upstream=None if upstream is None else upstream.cpu(), **kw,
    )  # fmt: skip
    loss_err = assert_loss_close(loss, want_loss)
    grad_err = assert_grad_close(grad, want_grad, student.dtype)
    if os.environ.get("DRKL_ERROR_LOG"):
        with open(os.environ["DRKL_ERROR_LOG"], "a") as f:
            f.write(json.dumps({"backend": backend, "dtype": str(student.dtype).removeprefix("torch."), "kind": kind,
                                "loss": loss_err[0], "loss_rel": loss_err[1], "grad": grad_err[0],
                                "grad_rel": grad_err[1], "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")  # fmt: skip
