"""The kernel contract (``record``): the statistics of vocabulary slices, merged in rank order,
give what the single-device launch gives, on every backend, in one process."""

import pytest
import torch

from drkl_kernels import backends, record
from drkl_kernels.problem import Divergence, validate

from .helpers import BACKENDS, assert_loss_close, generator, labels, logits_pair

KINDS = {"drkl": Divergence.DRKL, "rkl": Divergence.RKL, "fkl": Divergence.FKL}


def _problem(kind, z, u, target, **kw):
    return validate(KINDS[kind], z, u, target, temperature=kw.pop("temperature", 1.0), ignore_index=-100,
                    reduction="none", inplace_backward=False, gamma=0.5, return_entropy=True, **kw)  # fmt: skip


def split(kind, backend, z, u, target, cuts, **kw):
    """Loss rows, entropy rows and gradient from the slices between ``cuts``, merged in rank order."""
    kernels = backends.kernels(backend)
    bounds = [0, *cuts, z.shape[-1]]
    shards = [_problem(kind, z[:, a:b], u[:, a:b], target, vocab_start=a, vocab_total=z.shape[-1], **kw)
              for a, b in zip(bounds, bounds[1:])]  # fmt: skip
    records = torch.stack([kernels.partial(p) for p in shards])
    assert records.shape == (len(shards), z.shape[0], record.WIDTH)
    merged = record.merge(records, shards[0].divergence, shards[0].pivot, 1.0 / shards[0].temperature)
    outs = [kernels.finish(p, merged, True) for p in shards]
    for loss, entropy, _ in outs[1:]:  # every slice computes bitwise the same row values
        assert torch.equal(loss, outs[0][0]) and torch.equal(entropy, outs[0][1])
    return outs[0][0], outs[0][1], torch.cat([g for _, _, g in outs], -1)


CASES = {
    "random": dict(),
    "confident": dict(confident=True),
    "ties on the cuts": dict(ties=True),
    "-inf slices": dict(neg_inf=True),
    "huge logits, tau 0.05": dict(scale=3e3, temperature=0.05),
}


@pytest.mark.interpreted_cases(4)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_slices_merge_to_the_whole_row(kind, case, with_target, backend):
    opts = dict(CASES[case])
    gen = generator("split", kind, case, with_target)
    vocab, rows = 1000, 6
    z, u = logits_pair(rows, vocab, torch.float32, gen, scale=opts.pop("scale", 2.0))
    cuts = [250, 251, 600]  # slices of 250, 1, 349 and 400 tokens
    if opts.pop("confident", False):
        z[1, 600] = z[1].max() + 30  # a row whose argmax and top sit on a cut
        u[1, 250] = u[1].max() + 25
    if opts.pop("ties", False):
        z[2, [249, 250, 600]] = u[2, [249, 250, 600]] = 50.0  # equal maxima on both sides of the cuts
    if opts.pop("neg_inf", False):
        z[3, 251:600] = u[3, 251:600] = float("-inf")  # a whole slice without mass
    target = labels(rows, vocab, gen) if with_target else None
    if target is not None:
        target[0] = 250  # a label alone in its slice
    whole = _problem(kind, z, u, target, **opts)
    want_loss, want_entropy, want_grad = backends.kernels(backend).forward(whole, True)
    loss, entropy, grad = split(kind, backend, z, u, target, cuts, **opts)
    assert_loss_close(loss, want_loss.double().cpu())
    assert_loss_close(entropy, want_entropy.double().cpu())
    err = (grad.double() - want_grad.double()).norm(dim=-1)
    assert (err <= 1e-5 * want_grad.double().norm(dim=-1) + 1e-30).all(), err


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_is_symmetric_and_deterministic(kind):
    """Merging a with b gives the bits of merging b with a (butterfly reductions rely on it)."""
    gen = generator("merge-symmetric", kind)
    z, u = logits_pair(8, 300, torch.float32, gen)
    z[:, 100] = z[:, 200] = 40.0  # tied maxima in different slices
    shards = [_problem(kind, z[:, a:b], u[:, a:b], None, vocab_start=a, vocab_total=300)
              for a, b in ((0, 150), (150, 300))]  # fmt: skip
    ref = backends.kernels("reference")
    a, b = (ref.partial(p) for p in shards)
    div, piv, inv = shards[0].divergence, shards[0].pivot, 1.0
    ab, ba = record.merge(torch.stack([a, b]), div, piv, inv), record.merge(torch.stack([b, a]), div, piv, inv)
    assert torch.equal(ab, ba)
    assert torch.equal(ab, record.merge(torch.stack([a, b]), div, piv, inv))
