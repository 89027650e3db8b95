"""SPEC §4's options: the logit transform (scale, soft-cap), the student's entropy, and
``num_items_in_batch`` as the "mean" divisor, against the float64 truth on every backend."""

import pytest
import torch

import drkl_kernels as dk

from .helpers import BACKENDS, DEVICE, DTYPES, LOSSES, check, generator, labels, logits_pair

KINDS = ["drkl", "rkl", "fkl"]


@pytest.mark.interpreted_cases(6)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("softcap", "temperature"), [(30.0, 1.0), (50.0, 0.5), (30.0, 2.0)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_softcap_and_scale(kind, dtype, softcap, temperature, backend):
    """Gemma-style soft-capping after a logit scale, different per side; logits that saturate the cap
    (``check`` allows the rounding of the capped logits: ``rounding_slack``)."""
    gen = generator("softcap", kind, dtype, softcap, temperature)
    z, u = logits_pair(5, 3001, DTYPES[dtype], gen, scale=8.0)
    z[0, :40] = 400.0  # deep in the saturated range of tanh
    kw = dict(student_logit_scale=1.5, teacher_logit_scale=0.75, student_softcap=softcap,
              teacher_softcap=softcap * 0.8, temperature=temperature)  # fmt: skip
    check(kind, backend, z, u, labels(5, 3001, gen), reduction="none", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_scale_without_cap(kind, backend):
    gen = generator("scale", kind)
    z, u = logits_pair(4, 2000, torch.float32, gen)
    check(kind, backend, z, u, None, student_logit_scale=0.3, teacher_logit_scale=2.5, temperature=0.7)


@pytest.mark.interpreted_cases(6)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_entropy(kind, dtype, reduction, backend):
    """return_entropy=True: H(q) of the student per row, reduced like the loss, on flat, peaked and
    confident rows."""
    gen = generator("entropy", kind, dtype, reduction)
    z, u = logits_pair(6, 2500, DTYPES[dtype], gen)
    z[1] *= 20  # peaked
    z[2, 7] = z[2].max() + 30  # confident: q rounds to one-hot in float32
    z[3] = z[3] * 0.01  # nearly flat: H ~ log V
    check(kind, backend, z, u, labels(6, 2500, gen), reduction=reduction, return_entropy=True, temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_entropy_with_softcap(kind, backend):
    gen = generator("entropy-softcap", kind)
    z, u = logits_pair(4, 1500, torch.float32, gen, scale=10.0)
    check(kind, backend, z, u, labels(4, 1500, gen), reduction="none", return_entropy=True, student_softcap=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_num_items_in_batch(kind, as_tensor, backend):
    """The "mean" divisor replaced by num_items_in_batch (an int, or a 0-dim device tensor)."""
    gen = generator("num-items", kind, as_tensor)
    z, u = logits_pair(6, 1000, torch.float32, gen)
    n = torch.tensor(17, device=DEVICE) if as_tensor else 17
    check(kind, backend, z, u, labels(6, 1000, gen), num_items_in_batch=n, return_entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_has_no_gradient_and_changes_nothing(backend):
    gen = generator("entropy-grad")
    z, u = logits_pair(3, 500, torch.float32, gen)
    t = labels(3, 500, gen)
    zz = z.clone().requires_grad_(True)
    loss, entropy = dk.drkl_loss(zz, u, t, backend=backend, return_entropy=True)
    assert not entropy.requires_grad
    loss.backward()
    zz2 = z.clone().requires_grad_(True)
    dk.drkl_loss(zz2, u, t, backend=backend).backward()
    assert torch.equal(zz.grad, zz2.grad)


BAD = {
    "zero scale": (dict(student_logit_scale=0.0), ValueError, "student_logit_scale"),
    "NaN scale": (dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale"),
    "negative cap": (dict(student_softcap=-30.0), ValueError, "student_softcap"),
    "infinite cap": (dict(teacher_softcap=float("inf")), ValueError, "teacher_softcap"),
    "string cap": (dict(teacher_softcap="30"), TypeError, "teacher_softcap"),
    "num_items with sum": (dict(num_items_in_batch=3, reduction="sum"), ValueError, "num_items_in_batch"),
    "negative num_items": (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    "num_items not a count": (dict(num_items_in_batch="3"), TypeError, "num_items_in_batch"),
    "num_items of two": (dict(num_items_in_batch=torch.tensor([1, 2])), ValueError, "num_items_in_batch"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options(case):
    kwargs, error, words = BAD[case]
    z, u = logits_pair(2, 10, torch.float32, generator("bad-options"))
    with pytest.raises(error, match=words):
        LOSSES["drkl"](z, u, None, **kwargs)
