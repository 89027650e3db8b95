"""The test session's faster Triton interpreter (``triton_interpreter``) gives Triton's own results,
bit for bit, on every kernel and helper path, and does skip the repeated patching."""

import pytest
import torch

from . import triton_interpreter
from .helpers import LOSSES, generator, labels, logits_pair
from .test_split import split

if not triton_interpreter.installed():
    pytest.skip("Triton runs compiled on this machine: no interpreter to speed up", allow_module_level=True)


def calls(gen):
    """Every kernel (fused, partial and finish through a split, the row scaling) and helper path
    (bf16 by hand, soft-caps, entropy, each pivot: label, teacher's and student's argmax)."""
    z, u = logits_pair(3, 700, torch.bfloat16, gen)
    target = labels(3, 700, gen)
    out = []
    for kind in LOSSES:
        for t in (target, None):
            zz = z.clone().requires_grad_(True)
            loss, entropy = LOSSES[kind](zz, u, t, backend="triton", reduction="none", return_entropy=True,
                                         student_softcap=15.0, temperature=0.7)  # fmt: skip
            loss.backward(torch.linspace(0.5, 2.0, 3))
            out += [loss, entropy, zz.grad]
    return out + list(split("drkl", "triton", z, u, target, [300], student_softcap=15.0))


def test_same_bits_as_tritons_own_interpreter():
    counts = []
    for own in (True, False):
        with triton_interpreter.counting() as count:
            if own:
                with triton_interpreter.triton_own():
                    want = calls(generator("interpreter"))
            else:
                got = calls(generator("interpreter"))
        counts.append(count())
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert counts[1] * 5 < counts[0], counts  # Triton's own patches at every helper call; we, once per launch
