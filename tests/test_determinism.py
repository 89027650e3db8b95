"""Results are deterministic: the same inputs give bitwise the same loss and gradient."""

import pytest
import torch

from .helpers import BACKENDS, DTYPES, generator, labels, logits_pair, run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["drkl", "rkl", "fkl"])
def test_bitwise_repeatable(kind, dtype, backend):
    gen = generator("determinism", kind, dtype)
    z, u = logits_pair(3, 9001, DTYPES[dtype], gen)  # more than one vocabulary block of every backend
    target = labels(3, 9001, gen)
    first = run(kind, backend, z, u, target, reduction="none")
    second = run(kind, backend, z, u, target, reduction="none")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("kind", ["drkl", "rkl", "fkl"])
def test_threads_do_not_change_the_bits(kind, backend):
    """The CPU backends give the same bits on one thread and on several (the CPU kernels split rows
    over OpenMP threads; the test session itself runs on half the cores while the builds use the
    others, see conftest)."""
    gen = generator("threads", kind)
    z, u = logits_pair(9, 5003, torch.float32, gen)
    target = labels(9, 5003, gen)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            out.append(run(kind, backend, z, u, target, reduction="none"))
    finally:
        torch.set_num_threads(before)
    for other in out[1:]:
        assert torch.equal(out[0][0], other[0]) and torch.equal(out[0][1], other[1])
