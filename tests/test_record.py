"""The kernel contract field by field, on every kernel backend: ``partial`` writes the reference's
record (transformed values, global token ids, the top held out); the logit transform is exact to
float32 rounding for small and for saturated arguments, value and slope; int32 targets."""

import pytest
import torch

from drkl_kernels import backends, reference
from drkl_kernels.problem import Divergence, validate
from drkl_kernels.record import Field

from . import truth
from .helpers import BACKENDS, DEVICE, GRAD_TOL, LOSSES, generator, labels, logits_pair

KINDS = {"drkl": Divergence.DRKL, "rkl": Divergence.RKL, "fkl": Divergence.FKL}
KERNELS = [b for b in BACKENDS if b != "reference"]
IDS = (Field.TOP, Field.PIV)
VALUES = (Field.M_X, Field.M_Y, Field.TOP_Y, Field.PIV_Z, Field.PIV_U)


def _problem(kind, z, u, target, **kw):
    return validate(KINDS[kind], z, u, target, temperature=kw.pop("temperature", 1.0), ignore_index=-100,
                    reduction=kw.pop("reduction", "none"), inplace_backward=False, gamma=0.5, **kw)  # fmt: skip


@pytest.mark.interpreted_cases(4)
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_partial_writes_the_reference_record(kind, with_target, capped, backend):
    """Records of slices (one holding only -inf, one a single token) against ``reference.partial``
    on the rows that count (an ignored row's record is unspecified)."""
    gen = generator("record", kind, with_target, capped)
    vocab, rows = 1000, 5
    z, u = logits_pair(rows, vocab, torch.float32, gen, scale=8.0 if capped else 2.0)
    z[1, 600] = z[1].max() + 30  # confident: a top that holds nearly all of the tail
    z[2, 300:700] = u[2, 300:700] = float("-inf")
    target = labels(rows, vocab, gen) if with_target else None
    kw = dict(student_softcap=30.0, teacher_softcap=20.0, student_logit_scale=1.5) if capped else {}
    for a, b in ((0, 300), (300, 301), (301, 700), (700, 1000)):
        p = _problem(kind, z[:, a:b], u[:, a:b], target, vocab_start=a, vocab_total=vocab, temperature=0.7, **kw)
        got, want = backends.kernels(backend).partial(p).double().cpu(), reference.partial(p).double().cpu()
        rows_that_count = slice(None) if target is None else (target != -100).cpu()
        got, want = got[rows_that_count], want[rows_that_count]
        for f in IDS:
            assert torch.equal(got[:, f], want[:, f]), (a, b, f.name)
        for f in VALUES:
            torch.testing.assert_close(got[:, f], want[:, f], rtol=1e-6 if capped else 0.0, atol=0.0, msg=f.name)
        for f in (Field.S_X, Field.S_Y):
            torch.testing.assert_close(got[:, f], want[:, f], rtol=1e-5, atol=1e-30, msg=f.name)
        for f in (Field.ACC, Field.ENT):  # signed sums of terms up to |d| ~ 40 times S_X
            torch.testing.assert_close(got[:, f], want[:, f], rtol=1e-5, atol=1e-4 * (1 + want[:, Field.S_X].max().item()),
                                       msg=f.name)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_value_is_exact_for_small_and_saturated_arguments(backend):
    """T(x) = c tanh(s x / c) for |s x / c| from 1e-8 to 30, read back from the records' pivot values
    (row i's label is token i): within a few float32 roundings of the float64 value. tanh as
    (1 - e) / (1 + e) alone loses all digits below |s x / c| ~ 1e-4."""
    mags = torch.logspace(-7, 3, 32, dtype=torch.float64)
    row = torch.cat([mags, -mags]).float()
    z = row.expand(row.numel(), -1).contiguous().to(DEVICE)
    target = torch.arange(row.numel(), device=DEVICE)
    p = _problem("drkl", z, z, target, student_softcap=30.0, teacher_softcap=5.0, student_logit_scale=1.5,
                 teacher_logit_scale=0.25)  # fmt: skip
    rec = backends.kernels(backend).partial(p).double().cpu()
    for field, scale, cap in ((Field.PIV_Z, 1.5, 30.0), (Field.PIV_U, 0.25, 5.0)):
        want, _ = truth.transform(row.double(), scale, cap)
        err = ((rec[:, field] - want).abs() / want.abs()).max().item()
        assert err <= 1e-6, (field.name, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_softcap_slope_survives_saturation(kind, backend):
    """The gradient is chained through T'(x) = s sech^2(s x / c) elementwise, also where tanh rounds to
    1 and 1 - tanh^2 would be 0: the capped gradient equals the uncapped gradient at the float64
    T(x), times the float64 T'(x), token by token."""
    gen = generator("slope", kind)
    z, u = logits_pair(3, 500, torch.float32, gen)
    z[:, :60] = torch.linspace(150.0, 450.0, 60)  # s x / c from 7.5 to 22.5: tanh is 1.0 in float32
    target = labels(3, 500, gen, ignored=0.0)
    cap = dict(student_softcap=30.0, student_logit_scale=1.5)
    t_z, slope = truth.transform(z.double().cpu(), 1.5, 30.0)
    grads = []
    for student, kw in ((z, cap), (t_z.float().to(DEVICE), {})):
        zz = student.clone().requires_grad_(True)
        LOSSES[kind](zz, u, target, backend=backend, reduction="sum", temperature=2.0, **kw).backward()
        grads.append(zz.grad.double().cpu())
    want = grads[1] * slope
    torch.testing.assert_close(grads[0], want, rtol=1e-3, atol=1e-6 * want.abs().max().item())
    assert (want[:, :60].abs() > 1e-30).all()  # the saturated tokens' gradients are tiny but representable
    # Token by token: 1e-3 of the element, plus SPEC §6's float32 allowance of the uncapped gradient
    # (relative to its row's scale) carried through the element's slope, which covers the tokens whose
    # factor d_j - E[d] cancels. A flushed slope (0 for 1e-3 of the element) still fails.
    allowance = 1e-3 * want.abs() + GRAD_TOL[torch.float32] * slope * grads[1].abs().amax(-1, keepdim=True)
    over = ((grads[0] - want).abs() > allowance)[:, :60]
    assert not over.any(), (grads[0][:, :60][over], want[:, :60][over])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_int32_targets(kind, backend):
    """int32 targets give bitwise what int64 targets give (labels, ignored rows, the mean's count)."""
    gen = generator("int32", kind)
    z, u = logits_pair(5, 3001, torch.bfloat16, gen)
    target = labels(5, 3001, gen)
    out = []
    for t in (target, target.int()):
        zz = z.clone().requires_grad_(True)
        loss, entropy = LOSSES[kind](zz, u, t, backend=backend, return_entropy=True)
        loss.backward()
        out.append((loss, entropy, zz.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)
