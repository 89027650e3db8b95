"""The decomposition RKL = B + (1 - q_t) N of SPEC §1, through the public API."""

import pytest
import torch

import drkl_kernels as dk

from .helpers import BACKENDS, assert_loss_close, generator, labels, logits_pair


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_rkl_identity(temperature, backend):
    gen = generator("identity", temperature)
    z, u = logits_pair(8, 777, torch.float32, gen, scale=1.5)
    t = labels(8, 777, gen, ignored=0.0)
    kw = dict(temperature=temperature, reduction="none", backend=backend)
    binary = dk.drkl_loss(z, u, t, gamma=0.0, **kw).double()
    tail = dk.drkl_loss(z, u, t, gamma=1.0, **kw).double() - binary
    q_t = torch.softmax(z.double() / temperature, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    assert_loss_close(binary + (1 - q_t) * tail, dk.rkl_loss(z, u, t, **kw).double().cpu())
