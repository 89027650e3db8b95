"""Shared test helpers: input makers, the backends under test, and the SPEC §6 tolerances."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import zlib

import torch

import drkl_kernels as dk
from drkl_kernels import backends

from . import truth

SEED = int(os.environ.get("DRKL_TEST_SEED", random.SystemRandom().randrange(2**31)))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LOSSES = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}

# Every backend this machine must test; a missing one fails its tests rather than vanishing.
BACKENDS = ["reference", "triton"] + (["cuda"] if torch.cuda.is_available() else ["cpu"])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the Triton interpreter (no GPU) the tests with many Triton cases run a few of them, drawn with
# the session seed (conftest's ``interpreted_cases``, ``test_parallel``); DRKL_TEST_ALL_INTERPRETED=1 runs them all.
INTERPRETED_SUBSETS = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("DRKL_TEST_ALL_INTERPRETED") != "1"


def generator(*key) -> torch.Generator:
    """A CPU generator seeded from the session seed and a per-test key (fresh inputs each session)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED,) + key).encode()) + SEED)


def logits_pair(rows, vocab, dtype, gen, *, scale=2.0, lead=None):
    """Student and teacher logits; the teacher is correlated with the student, as in distillation."""
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    u = 0.6 * z + 0.8 * scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    shape = (rows, vocab) if lead is None else (*lead, vocab)
    return z.reshape(shape).to(dtype).to(DEVICE), u.reshape(shape).to(dtype).to(DEVICE)


def labels(rows, vocab, gen, *, ignored=0.25, lead=None):
    """Random labels with about ``ignored`` of the rows (never all of them, unless rows == 0) set to -100."""
    t = torch.randint(0, vocab, (rows,), generator=gen)
    drop = torch.rand(rows, generator=gen) < ignored
    drop[0] = False
    t[drop] = -100
    return t.reshape(lead if lead is not None else (rows,)).to(DEVICE)


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_layout(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with its sizes, strides and storage offset, in a storage of its own that also
    copies the bytes around the view (so a write outside the view shows)."""
    out = torch.empty(0, dtype=x.dtype, device=x.device)
    return out.set_(x.untyped_storage().clone(), x.storage_offset(), x.size(), x.stride())


def storage_bytes(x: torch.Tensor) -> torch.Tensor:
    """Every byte of the storage under ``x`` (the view and what lies around it)."""
    return torch.empty(0, dtype=torch.uint8, device=x.device).set_(x.untyped_storage())


def run(kind, backend, student, teacher, target, *, reduction="mean", upstream=None, inplace=False, record=None,
        **kw):  # fmt: skip
    """Loss and student gradient through the public API, the student passed in the caller's layout
    (a leaf with the caller's strides). Checks that no input was written to, except the student's
    view with ``inplace`` on a fused backend: there the gradient is that view's memory, with its
    strides, and the bytes around the view are untouched. ``record``: a context (``Recording``)
    entered around the loss call and its backward only."""
    z = same_layout(student).requires_grad_(True)
    z_bytes, u_bytes = storage_bytes(z).clone(), storage_bytes(teacher).clone()
    t_before = None if target is None else target.clone()
    with record if record is not None else contextlib.nullcontext():
        loss = LOSSES[kind](z, teacher, target, backend=backend, reduction=reduction, inplace_backward=inplace, **kw)
        entropy = None
        if kw.get("return_entropy"):
            loss, entropy = loss
        (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss) if upstream is None else upstream)
    if entropy is not None:
        assert entropy.dtype == torch.float32 and entropy.shape == loss.shape and not entropy.requires_grad
    assert loss.dtype == torch.float32
    assert torch.equal(storage_bytes(teacher), u_bytes), "teacher_logits were modified"
    assert target is None or torch.equal(target, t_before), "target was modified"
    assert grad.dtype == student.dtype and grad.shape == student.shape
    if inplace and backends.resolve(backend, z.device) != "reference":
        assert grad.data_ptr() == z.data_ptr() and grad.stride() == z.stride(), (
            "the gradient is not the student's memory"
        )
        written = torch.zeros_like(z_bytes)
        written.view(INT_OF_SIZE[z.element_size()]).as_strided(z.size(), z.stride(), z.storage_offset()).fill_(-1)
        assert torch.equal(storage_bytes(z)[written == 0], z_bytes[written == 0]), "wrote outside the student's view"
    else:
        assert torch.equal(storage_bytes(z), z_bytes), "student_logits were modified"
    if entropy is not None:
        return loss.detach(), grad, entropy
    return loss.detach(), grad


def assert_loss_close(got, want, slack=None) -> tuple[float, float]:
    """|got - want| <= max(1e-5 |want|, 1e-6) elementwise. ``slack``: a callable giving an amount
    added to each element's tolerance (``rounding_slack``), called only when one misses without it.
    Returns the worst error as a fraction of that tolerance, and the worst relative error over
    losses of magnitude 0.1 or more."""
    got, want = got.double().cpu(), want.double()
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = torch.clamp(1e-5 * want.abs(), min=1e-6)
    err = (got - want).abs()
    if slack is not None and (err > tol).any():
        tol = tol + slack().reshape(tol.shape)
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"loss error {err[bad].max().item():.3g} > tol; got {got[bad][:4].tolist()} want {want[bad][:4].tolist()}"
    )
    if not err.numel():
        return 0.0, 0.0
    sizable = want.abs() >= 0.1  # where the relative tolerance is the binding one
    rel = (err[sizable] / want.abs()[sizable]).max().item() if sizable.any() else 0.0
    return (err / tol).max().item(), rel


# Below these magnitudes a gradient element cannot be stored: float32 arithmetic flushes
# subnormals on GPUs (bf16 shares its range), and float16 rounds in steps of 2**-24.
GRAD_FLOOR = {torch.float32: 2.0**-126, torch.bfloat16: 2.0**-126, torch.float16: 2.0**-24}


def rounding_slack(kind, student, teacher, target, *, probes=16, ulps=8.0, **kw):
    """What the float32 rounding of the transformed logits costs the float64 truth: the loss (per
    element of the reduced loss) and the gradient (per row), each ``ulps`` times the RMS over
    ``probes`` draws of ``|L(x + d) - L(x)|`` and ``||g(x + d) - g(x)||``, each side's
    ``d_j`` Gaussian with standard deviation 2^-24 (|x_j - max x| + |x_j| where a scale or soft cap
    transforms x). A float32 kernel holds each token's logit relative to its row's maximum, divided
    by tau, rounded to float32: at least 2^-24 relative to that distance, whichever way it forms it;
    a transformed logit (x scale, cap tanh(x / cap)) is rounded before the shift, relative to its
    magnitude (near cap). Where a row's gradient is a small difference of such terms (two leading
    tokens whose logit gaps nearly agree on both sides: an RKL gradient ~1e-5 from logits ~100),
    no float32 kernel meets SPEC §6's 1e-5 of that row's norm, so the check allows this on top.
    The kernels carry a few such roundings (scale, 1 / cap, tanh, cap, shift, 1 / tau), hence
    ``ulps``; 16 Gaussian probes keep the estimate within a factor of 2 (chi-square, 16 degrees of
    freedom: P < 1e-3). See README, Accuracy."""
    gen = torch.Generator().manual_seed(SEED)
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    args = (kind, student.cpu(), teacher.cpu(), None if target is None else target.cpu())
    vocab = student.shape[-1]

    def spread(x, scale, softcap):
        xt = truth.transform(x.double().reshape(-1, vocab), scale, softcap)[0]
        top = xt.max(-1, keepdim=True).values
        size = torch.where(torch.isfinite(xt) & torch.isfinite(top), (xt - top).abs(), 0.0)
        if softcap is not None or scale != 1.0:
            size = size + torch.where(torch.isfinite(xt), xt.abs(), 0.0)
        return size * 2.0**-24

    dz = spread(args[1], kw.get("student_logit_scale", 1.0), kw.get("student_softcap"))
    du = spread(args[2], kw.get("teacher_logit_scale", 1.0), kw.get("teacher_softcap"))
    base_loss, base = truth.loss_and_grad(*args, **kw)[:2]
    loss_total, total = torch.zeros_like(base_loss), torch.zeros(base.numel() // vocab, dtype=torch.float64)
    for _ in range(probes):
        noise = lambda size: size * torch.randn(size.shape, generator=gen, dtype=torch.float64)  # noqa: E731
        loss, moved = truth.loss_and_grad(*args, perturb=(noise(dz), noise(du)), **kw)[:2]
        loss_total += torch.nan_to_num((loss - base_loss) ** 2, nan=0.0)
        total += torch.nan_to_num((moved - base).reshape(-1, vocab).norm(dim=-1) ** 2, nan=0.0)
    return ulps * (loss_total / probes).sqrt(), ulps * (total / probes).sqrt()


def assert_grad_close(got, want, dtype, tol: float | None = None, slack=None) -> tuple[float, float]:
    """Per row of ``[..., V]`` (so for the whole tensor too): ``||got - want|| <= tol ||want||
    + ||min(|want|, GRAD_FLOOR)||``, the norm-wise relative error of SPEC §6 plus, as the only
    exemption, what the storage dtype cannot hold: each element below GRAD_FLOOR may be lost, and
    an element beyond the dtype's largest finite value (a float16 gradient of 1e5: two tied top
    logits at tau 0.05) must round to that value or to infinity, with its sign, and leaves the norms.
    ``tol`` is SPEC §6's GRAD_TOL unless given. ``slack``: a callable giving a per-row amount added
    to each row's allowance (``rounding_slack``), called only when a row misses without it. Returns the worst row's error as a fraction of its allowance, and the worst norm-wise relative
    error over the rows large enough for the storage dtype to make that meaningful."""
    vocab = want.shape[-1] if want.dim() else 1
    got, want = got.double().cpu().reshape(-1, vocab), want.double().reshape(-1, vocab)
    tol = GRAD_TOL[dtype] if tol is None else tol
    top = torch.finfo(dtype).max
    # stored as the largest value or inf, with its sign: required beyond the range, allowed where
    # an error within the tolerance can cross the largest value's rounding boundary
    rounded = (got.sign() == want.sign()) & (got.abs() >= top)
    beyond = want.abs() > top
    assert (rounded | ~beyond).all(), "a gradient beyond the dtype's range is not stored as its largest value or inf"
    at_edge = rounded & (want.abs() * (1 + tol) >= top)
    got, want = got.masked_fill(at_edge, 0.0), want.masked_fill(at_edge, 0.0)
    assert torch.isfinite(got).all(), "non-finite gradient"
    err, norm = (got - want).norm(dim=-1), want.norm(dim=-1)
    unstorable = want.abs().clamp(max=GRAD_FLOOR[dtype]).norm(dim=-1)
    allowed = tol * norm + unstorable
    if slack is not None and (err > allowed).any():
        allowed = allowed + slack().double().reshape(-1)
    bad = err > allowed
    if bad.any():
        r = int((err - allowed).argmax())
        raise AssertionError(
            f"gradient row {r} of {len(err)}: error {err[r]:.3g} > {allowed[r]:.3g} (row norm {norm[r]:.3g}, "
            f"rel. {err[r] / max(norm[r].item(), 1e-300):.3g}, {dtype}); {int(bad.sum())} rows fail"
        )
    if not len(err):
        return 0.0, 0.0
    fraction = torch.where(allowed > 0, err / allowed, 0.0).max().item()
    meaningful = tol * norm > unstorable
    return fraction, (err[meaningful] / norm[meaningful]).max().item() if meaningful.any() else 0.0


def check(kind, backend, student, teacher, target, *, reduction="mean", upstream=None, inplace=False, record=None,
          grad_tol=None, **kw):  # fmt: skip
    """Parity of one backend with the float64 truth, loss and gradient.

    With DRKL_ERROR_LOG set, appends one JSON line per check to that file: the backend, dtype,
    and the loss and gradient errors as fractions of their SPEC §6 tolerances.
    """
    got = run(kind, backend, student, teacher, target, reduction=reduction, upstream=upstream, inplace=inplace,
              record=record, **kw)  # fmt: skip
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = truth.loss_and_grad(
        kind, student.cpu(), teacher.cpu(), None if target is None else target.cpu(),
        reduction=reduction, upstream=None if upstream is None else upstream.cpu(), **kw,
    )  # fmt: skip
    (loss, grad), (want_loss, want_grad) = got[:2], want[:2]
    if kw.get("return_entropy"):
        assert_loss_close(got[2], want[2])
    slack = functools.cache(lambda: rounding_slack(kind, student, teacher, target, reduction=reduction,
                                                   upstream=upstream, **kw))  # fmt: skip
    loss_err = assert_loss_close(loss, want_loss, lambda: slack()[0])
    grad_err = assert_grad_close(grad, want_grad, student.dtype, grad_tol, lambda: slack()[1])
    if os.environ.get("DRKL_ERROR_LOG"):
        with open(os.environ["DRKL_ERROR_LOG"], "a") as f:
            f.write(json.dumps({"backend": backend, "dtype": str(student.dtype).removeprefix("torch."), "kind": kind,
                                "loss": loss_err[0], "loss_rel": loss_err[1], "grad": grad_err[0],
                                "grad_rel": grad_err[1], "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")  # fmt: skip
