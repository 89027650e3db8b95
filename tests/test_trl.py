"""TRL adapters against TRL's own code (skipped without the ``trl`` extra; CI installs it)."""

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
pytest.importorskip("trl", reason="the trl extra is not installed (pip install 'drkl-kernels[trl]')")

from trl.experimental.gkd import GKDTrainer  # noqa: E402

from drkl_kernels.integrations import trl as dk_trl  # noqa: E402

from . import truth  # noqa: E402
from .helpers import BACKENDS, DEVICE, assert_grad_close, assert_loss_close, generator, labels, logits_pair  # noqa: E402

# (our reduction arguments, whether labels are passed): every reduction path of TRL's function
GKD_CASES = {
    "batchmean": ({"reduction": "batchmean"}, True),
    "batchmean without labels": ({"reduction": "batchmean"}, False),
    "sum": ({"reduction": "sum"}, True),
    "mean": ({"reduction": "mean"}, True),
    "num_items_in_batch": ({"num_items_in_batch": torch.tensor(13)}, True),
}


def _loss_and_grad(fn, z, u, target, **kw):
    zz = z.clone().requires_grad_(True)
    loss = fn(zz, u, target, **kw)
    loss.sum().backward()
    return loss.detach(), zz.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GKD_CASES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gkd_loss_equals_trl(beta, case, backend):
    """Forward KL (beta=0) and reverse KL (beta=1) equal TRL's generalized_jsd_loss, run in float64 on
    the same values, within SPEC §6: loss and gradient."""
    gen = generator("gkd", beta, case)
    z, u = logits_pair(8, 1000, torch.float32, gen, lead=(2, 4))
    target = labels(8, 1000, gen, lead=(2, 4)) if GKD_CASES[case][1] else None
    kw = {"beta": beta, "temperature": 1.7, **GKD_CASES[case][0]}
    want, want_grad = _loss_and_grad(GKDTrainer.generalized_jsd_loss, z.double(), u.double(), target, **kw)
    got, got_grad = _loss_and_grad(dk_trl.generalized_jsd_loss, z, u, target, backend=backend, **kw)
    assert_loss_close(got, want)
    assert_grad_close(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gkd_per_token_equals_trl(beta, backend):
    """reduction="none": per token, TRL's per-entry values summed over the vocabulary; 0 where ignored."""
    gen = generator("gkd-none", beta)
    z, u = logits_pair(6, 700, torch.float32, gen, lead=(2, 3))
    target = labels(6, 700, gen, lead=(2, 3))
    want = GKDTrainer.generalized_jsd_loss(z.double(), u.double(), target, beta=beta, reduction="none").sum(-1)
    got = dk_trl.generalized_jsd_loss(z, u, target, beta=beta, reduction="none", backend=backend)
    assert got.shape == target.shape
    assert_loss_close(got[target != -100], want)
    assert torch.equal(got[target == -100], torch.zeros_like(got[target == -100]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labelled", [True, False])
def test_gkd_drkl(labelled, backend):
    """loss_type="drkl": DRKL with the labels as targets (the teacher's argmax without), against the float64 truth."""
    gen = generator("gkd-drkl", labelled)
    z, u = logits_pair(6, 900, torch.float32, gen, lead=(2, 3))
    target = labels(6, 900, gen, lead=(2, 3)) if labelled else None
    got, got_grad = _loss_and_grad(dk_trl.generalized_jsd_loss, z, u, target, beta=0.5, temperature=0.8,
                                   loss_type="drkl", gamma=0.3, backend=backend)  # fmt: skip
    want, want_grad = truth.loss_and_grad("drkl", z.cpu(), u.cpu(), None if target is None else target.cpu(),
                                          gamma=0.3, temperature=0.8)  # fmt: skip
    if target is None:  # TRL's "batchmean" without labels divides the sum by the batch size
        want, want_grad = want * 3, want_grad * 3
    assert_loss_close(got, want)
    assert_grad_close(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.5}, "generalized JSD"),
        ({"loss_type": "jsd"}, "loss_type"),
        ({"reduction": "elementwise"}, "reduction"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, r"labels\[:, 1:\]"),
    ],
)
def test_gkd_bad_input(kwargs, match):
    z, u = logits_pair(6, 50, torch.float32, generator("gkd-bad"), lead=(2, 3))
    with pytest.raises(ValueError, match=match):
        dk_trl.generalized_jsd_loss(z, u, **{"labels": None, "beta": 1.0, **kwargs})


def test_gkd_trainer_takes_the_drop_in():
    """The documented subclass swaps TRL's loss for this package's (same call as GKDTrainer.compute_loss makes)."""
    import functools

    class DRKLGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(functools.partial(dk_trl.generalized_jsd_loss, loss_type="drkl"))

    z, u = logits_pair(6, 80, torch.float32, generator("gkd-subclass"), lead=(2, 3))
    target = labels(6, 80, generator("gkd-subclass-labels"), lead=(2, 3))
    got = DRKLGKDTrainer.generalized_jsd_loss(student_logits=z, teacher_logits=u, labels=target, beta=0.5,
                                              num_items_in_batch=None)  # fmt: skip
    assert torch.equal(got, dk_trl.generalized_jsd_loss(z, u, target, loss_type="drkl").to(DEVICE))
