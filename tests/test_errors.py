"""Bad input: every SPEC §5 case raises the named error, and the inputs are left bitwise unchanged."""

import pytest
import torch

import drkl_kernels as dk

from .helpers import BACKENDS, DEVICE, generator, logits_pair


def _inputs():
    z, u = logits_pair(3, 11, torch.float32, generator("errors"))
    return z.requires_grad_(True), u, torch.tensor([1, -100, 10], device=DEVICE)


CASES = {
    "student not a tensor": (lambda z, u, t: dict(student_logits=z.tolist()), TypeError, "student_logits"),
    "integer student": (lambda z, u, t: dict(student_logits=z.detach().long()), TypeError, "student_logits"),
    "integer teacher": (lambda z, u, t: dict(teacher_logits=u.long()), TypeError, "teacher_logits"),
    "0-dim logits": (lambda z, u, t: dict(student_logits=z[0, 0], teacher_logits=u[0, 0], target=None), ValueError, "student_logits"),
    "shape mismatch": (lambda z, u, t: dict(teacher_logits=u[:, :10]), ValueError, "same shape"),
    "device mismatch": (lambda z, u, t: dict(teacher_logits=u.to("meta")), ValueError, "same device"),
    "teacher needs grad": (lambda z, u, t: dict(teacher_logits=u.clone().requires_grad_(True)), ValueError, "detach"),
    "empty vocabulary": (lambda z, u, t: dict(student_logits=z[:, :0], teacher_logits=u[:, :0]), ValueError, "V == 0"),
    "float target": (lambda z, u, t: dict(target=t.float()), TypeError, "target"),
    "target shape": (lambda z, u, t: dict(target=t[:2]), ValueError, "target"),
    "target too large": (lambda z, u, t: dict(target=torch.tensor([1, 2, 11])), ValueError, "target"),
    "negative target": (lambda z, u, t: dict(target=torch.tensor([1, -1, 0])), ValueError, "target"),
    "zero temperature": (lambda z, u, t: dict(temperature=0.0), ValueError, "temperature"),
    "negative temperature": (lambda z, u, t: dict(temperature=-1.0), ValueError, "temperature"),
    "infinite temperature": (lambda z, u, t: dict(temperature=float("inf")), ValueError, "temperature"),
    "NaN temperature": (lambda z, u, t: dict(temperature=float("nan")), ValueError, "temperature"),
    "string temperature": (lambda z, u, t: dict(temperature="1"), TypeError, "temperature"),
    "negative gamma": (lambda z, u, t: dict(gamma=-0.1), ValueError, "gamma"),
    "NaN gamma": (lambda z, u, t: dict(gamma=float("nan")), ValueError, "gamma"),
    "infinite gamma": (lambda z, u, t: dict(gamma=float("inf")), ValueError, "gamma"),
    "unknown reduction": (lambda z, u, t: dict(reduction="avg"), ValueError, "reduction"),
    "unknown backend": (lambda z, u, t: dict(backend="numpy"), ValueError, "backend"),
    "float ignore_index": (lambda z, u, t: dict(ignore_index=-100.0), TypeError, "ignore_index"),
}
if not torch.cuda.is_available():
    CASES["backend not here"] = (lambda z, u, t: dict(backend="cuda"), ValueError, "available")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, backend):
    z, u, t = _inputs()
    make, error, words = CASES[case]
    snapshot = [x.detach().clone() for x in (z, u, t)]
    kwargs = dict(student_logits=z, teacher_logits=u, target=t, backend=backend)
    kwargs.update(make(z, u, t))
    with pytest.raises(error, match=words):
        dk.drkl_loss(**kwargs)
    for before, after in zip(snapshot, (z, u, t)):
        assert torch.equal(before, after.detach())
    assert z.grad is None


@pytest.mark.parametrize("fn", [dk.rkl_loss, dk.fkl_loss])
def test_kl_losses_validate_too(fn):
    z, u, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        fn(z, u, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        fn(z, u[:2])


def test_modules_match_functions():
    z, u, t = _inputs()
    assert torch.equal(dk.DRKLLoss(gamma=2.0, backend="reference")(z, u, t), dk.drkl_loss(z, u, t, gamma=2.0, backend="reference"))
    assert torch.equal(dk.RKLLoss(temperature=2.0)(z, u), dk.rkl_loss(z, u, temperature=2.0))
    assert torch.equal(dk.FKLLoss(reduction="sum")(z, u, t), dk.fkl_loss(z, u, t, reduction="sum"))
    assert "gamma=2.0" in repr(dk.DRKLLoss(gamma=2.0))


def test_available_backends():
    names = dk.available_backends()
    assert "reference" in names and "triton" in names and "cpu" in names
    assert set(names) <= {"reference", "triton", "cpu", "cuda"}
