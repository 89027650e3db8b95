"""Bad input: every SPEC §5 case raises the named error, and the inputs are left bitwise unchanged."""

import dataclasses

import pytest
import torch

import drkl_kernels as dk
from drkl_kernels import api, backends
from drkl_kernels.problem import Divergence, validate

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
    "float target": (lambda z, u, t: dict(target=t.float()), TypeError, "target must be an int64 or int32"),
    "target shape": (lambda z, u, t: dict(target=t[:2]), ValueError, "target must have the leading shape"),
    "target device": (lambda z, u, t: dict(target=t.to("meta")), ValueError, "target must be on the logits' device"),
    "zero temperature": (lambda z, u, t: dict(temperature=0.0), ValueError, "temperature"),
    "negative temperature": (lambda z, u, t: dict(temperature=-1.0), ValueError, "temperature"),
    "infinite temperature": (lambda z, u, t: dict(temperature=float("inf")), ValueError, "temperature"),
    "NaN temperature": (lambda z, u, t: dict(temperature=float("nan")), ValueError, "temperature"),
    "string temperature": (lambda z, u, t: dict(temperature="1"), TypeError, "temperature"),
    "negative gamma": (lambda z, u, t: dict(gamma=-0.1), ValueError, "gamma"),
    "NaN gamma": (lambda z, u, t: dict(gamma=float("nan")), ValueError, "gamma"),
    "infinite gamma": (lambda z, u, t: dict(gamma=float("inf")), ValueError, "gamma"),
    "unknown reduction": (lambda z, u, t: dict(reduction="avg"), ValueError, "reduction"),
    "float ignore_index": (lambda z, u, t: dict(ignore_index=-100.0), TypeError, "ignore_index"),
    "in place into a copy": (lambda z, u, t: dict(student_logits=z.t().contiguous().t(), inplace_backward=True), ValueError, "inplace_backward=True .* copy"),
    "in place into overlapping rows": (lambda z, u, t: dict(student_logits=z[:1].expand(3, 11), inplace_backward=True), ValueError, "inplace_backward=True .* overlap"),
    # raised by the backend choice, which follows validation
    "unknown backend": (lambda z, u, t: dict(backend="numpy"), ValueError, "backend"),
    "backend not here": (lambda z, u, t: dict(backend="cpu" if DEVICE == "cuda" else "cuda"), ValueError, "not available here"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, monkeypatch):
    """Validation runs before a backend is chosen, so once per case covers every backend."""
    z, u, t = _inputs()
    make, error, words = CASES[case]
    snapshot = [x.detach().clone() for x in (z, u, t)]
    kwargs = dict(student_logits=z, teacher_logits=u, target=t, backend="auto")
    kwargs.update(make(z, u, t))
    if "backend" not in case:
        monkeypatch.setattr(api.backends, "resolve", _no_backend_before_validation)
    with pytest.raises(error, match=words):
        dk.drkl_loss(**kwargs)
    for before, after in zip(snapshot, (z, u, t)):
        assert torch.equal(before, after.detach())
    assert z.grad is None


def _no_backend_before_validation(*args):
    raise AssertionError("a backend was chosen before validation failed")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("bad", [11, -1])
def test_target_out_of_range(bad, device):
    """A target on the logits' device outside [0, V): a CPU target is rejected eagerly, naming
    the value and the range; a CUDA one (checking it would stall the host) makes its row NaN."""
    z, u, _ = _inputs()
    z, u = z.detach().to(device), u.to(device)
    target = torch.tensor([1, bad, -100], device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match=rf"target holds {bad}, outside \[0, 11\) and not ignore_index=-100"):
            dk.drkl_loss(z, u, target)
    else:
        loss = dk.drkl_loss(z, u, target, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["DRKL", "RKL", "FKL"])
def test_out_of_range_target_makes_its_row_nan(kind, backend):
    """The kernels' side of a device target outside [0, V) (the GPU branch of validation, run here
    on every backend by handing the kernels such a target): NaN loss and gradient for that row,
    the other rows as with an in-range target."""
    z, u, _ = _inputs()
    p = validate(Divergence[kind], z.detach(), u, torch.tensor([0, 0, 5], device=DEVICE), gamma=0.5, temperature=1.0,
                 ignore_index=-100, reduction="none", inplace_backward=False)  # fmt: skip
    want_loss, _, want_grad = backends.kernels(backend).forward(p, True)
    p = dataclasses.replace(p, target=torch.tensor([11, -1, 5], device=DEVICE))
    loss, _, grad = backends.kernels(backend).forward(p, True)
    assert torch.isnan(loss[:2]).all() and torch.isnan(grad[:2]).all()
    assert torch.equal(loss[2], want_loss[2]) and torch.equal(grad[2], want_grad[2])


@pytest.mark.parametrize("fn", [dk.rkl_loss, dk.fkl_loss])
def test_kl_losses_validate_too(fn):
    z, u, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        fn(z, u, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        fn(z, u[:2])


def test_modules_match_functions():
    z, u, t = _inputs()
    assert torch.equal(
        dk.DRKLLoss(gamma=2.0, backend="reference")(z, u, t), dk.drkl_loss(z, u, t, gamma=2.0, backend="reference")
    )
    assert torch.equal(dk.RKLLoss(temperature=2.0)(z, u), dk.rkl_loss(z, u, temperature=2.0))
    assert torch.equal(dk.FKLLoss(reduction="sum")(z, u, t), dk.fkl_loss(z, u, t, reduction="sum"))
    assert "gamma=2.0" in repr(dk.DRKLLoss(gamma=2.0))


def test_available_backends():
    names = dk.available_backends()
    assert "reference" in names and "triton" in names and "cpu" in names
    assert set(names) <= {"reference", "triton", "cpu", "cuda"}
