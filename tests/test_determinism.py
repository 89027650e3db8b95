"""Results are deterministic: the same inputs give bitwise the same loss and gradient."""

import pytest
import torch

from .helpers import BACKENDS, DTYPES, generator, labels, logits_pair, run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["drkl", "rkl", "fkl"])
def test_bitwise_repeatable(kind, dtype, backend):
    gen = generator("determinism", kind, dtype)
    z, u = logits_pair(4, 12_345, DTYPES[dtype], gen)
    target = labels(4, 12_345, gen)
    first = run(kind, backend, z, u, target, reduction="none")
    second = run(kind, backend, z, u, target, reduction="none")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
