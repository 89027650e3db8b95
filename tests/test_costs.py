"""SPEC §7 as tests, for every fused backend: no host synchronisation, no ``[rows, V]``
intermediate (every student/teacher dtype pair read as it is), the gradient in the forward
launch, and a backward that leaves the gradient alone when the upstream gradient is exactly 1."""

import contextlib

import pytest
import torch

from drkl_kernels import api

from . import truth
from .helpers import (
    BACKENDS,
    DEVICE,
    DTYPES,
    INT_OF_SIZE,
    LOSSES,
    assert_grad_close,
    check,
    generator,
    labels,
    logits_pair,
    same_layout,
)
from .recording import Recording

KINDS = ["drkl", "rkl", "fkl"]
FUSED = [b for b in BACKENDS if b != "reference"]
ROWS, VOCAB = 8, 1031


@contextlib.contextmanager
def recording(backend, monkeypatch):
    """A Recording of the loss calls; validation's eager range check of a CPU target (no device
    involved) is left out of it."""
    rec = Recording(backend)
    if DEVICE == "cpu":
        monkeypatch.setattr(api, "validate", rec.unrecorded(api.validate))
    sync_debug = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
    with rec:
        if sync_debug is not None:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield rec
        finally:
            if sync_debug is not None:
                torch.cuda.set_sync_debug_mode(sync_debug)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_no_host_synchronisation(kind, backend, monkeypatch):
    """Forward with and without gradient, in place or not, every reduction, scalar and per-row
    upstream gradients: no op that waits for the device."""
    gen = generator("sync", kind)
    z, u = logits_pair(6, 700, torch.bfloat16, gen)
    target = labels(6, 700, gen)
    leaf, in_place = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    with recording(backend, monkeypatch) as rec:
        LOSSES[kind](leaf, u, target, backend=backend).backward()
        LOSSES[kind](leaf, u, target, backend=backend, reduction="sum").backward(torch.tensor(2.5, device=DEVICE))
        rows = LOSSES[kind](in_place, u, target, backend=backend, reduction="none", inplace_backward=True)
        rows.backward(torch.linspace(0.5, 1.5, 6, device=DEVICE))
        with torch.no_grad():
            LOSSES[kind](leaf, u, None, backend=backend)
    assert rec.syncs == [], rec.syncs
    assert len(rec.launches) >= 4, rec.launches


@pytest.mark.parametrize("backend", FUSED)
def test_no_host_synchronisation_with_options(backend, monkeypatch):
    """The student's entropy and a device tensor as num_items_in_batch stay on the device too."""
    gen = generator("sync options")
    z, u = logits_pair(6, 700, torch.float32, gen)
    target = labels(6, 700, gen)
    with recording(backend, monkeypatch) as rec:
        loss, _ = LOSSES["drkl"](z.clone().requires_grad_(True), u, target, backend=backend, return_entropy=True,
                                       num_items_in_batch=torch.tensor(9, device=DEVICE))  # fmt: skip
        loss.backward()
    assert rec.syncs == [], rec.syncs


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("case", "dtype"), [("gradient", "fp32"), ("in place", "bf16"), ("loss only", "fp32"),
                                             ("rows of a wider buffer", "fp16")])  # fmt: skip
@pytest.mark.parametrize("kind", KINDS)
def test_memory_is_the_gradient_and_per_row_buffers(kind, case, dtype, backend, monkeypatch):
    """Peak memory above the inputs: the gradient (none in place or without gradient) plus O(rows)."""
    gen = generator("memory", kind, case)
    z, u = logits_pair(ROWS, VOCAB + 3, DTYPES[dtype], gen)
    if case == "rows of a wider buffer":
        z, u = z[:, :VOCAB], u[:, :VOCAB]
    else:
        z, u = z[:, :VOCAB].contiguous(), u[:, :VOCAB].contiguous()
    target = labels(ROWS, VOCAB, gen)
    leaf = same_layout(z).requires_grad_(case != "loss only")
    with recording(backend, monkeypatch) as rec:
        loss = LOSSES[kind](leaf, u, target, backend=backend, inplace_backward=case == "in place")
        if leaf.requires_grad:
            torch.autograd.grad(loss, leaf)
    rec.assert_gradient_and_rows_only(
        z.numel() * z.element_size() if case in ("gradient", "rows of a wider buffer") else 0, ROWS
    )


@pytest.mark.interpreted_cases(9)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", DTYPES)
@pytest.mark.parametrize("student", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_dtype_pair_without_a_teacher_copy(kind, student, teacher, backend):
    """All nine {fp32, bf16, fp16} pairs against the truth; the fused backends read the teacher
    as it is (no converted copy: nothing of [rows, V] besides the gradient)."""
    gen = generator("dtype pairs", kind, student, teacher)
    z, u = logits_pair(ROWS, VOCAB, torch.float32, gen)
    z, u = z.to(DTYPES[student]), u.to(DTYPES[teacher])
    rec = Recording(backend)
    check(kind, backend, z, u, labels(ROWS, VOCAB, gen), reduction="none", record=rec)
    if backend in FUSED:
        rec.assert_gradient_and_rows_only(z.numel() * z.element_size(), ROWS)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_in_the_forward_launch(kind, backend):
    """One launch computes loss and gradient: in place, the student holds the gradient as soon as
    forward returns; backward launches at most the scaling; the loss alone is one launch too."""
    gen = generator("one launch", kind)
    z, u = logits_pair(5, 3001, torch.float32, gen)
    target = labels(5, 3001, gen)
    leaf = same_layout(z).requires_grad_(True)
    with Recording(backend) as rec:
        loss = LOSSES[kind](leaf, u, target, backend=backend, inplace_backward=True)
    assert len(rec.launches) == 1, rec.launches
    _, want_grad = truth.loss_and_grad(kind, z.cpu(), u.cpu(), target.cpu())
    assert_grad_close(leaf.detach(), want_grad, z.dtype)
    with Recording(backend) as rec:
        loss.backward()
    assert len(rec.launches) <= 1, rec.launches
    with Recording(backend) as rec, torch.no_grad():
        LOSSES[kind](leaf, u, target, backend=backend)
    assert len(rec.launches) == 1, rec.launches


# Signalling NaNs: any arithmetic on them (even * 1.0) returns a quiet NaN, so a rewrite shows in the bits.
SIGNALLING_NAN = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}


def _poisoned_forward(kind, backend, dtype, reduction):
    """In place, the gradient is the student's memory after forward: poison some of it."""
    gen = generator("upstream one", kind, dtype, reduction)
    z, u = logits_pair(4, 1500, dtype, gen)
    leaf = z.clone().requires_grad_(True)
    loss = LOSSES[kind](leaf, u, labels(4, 1500, gen, ignored=0.0), backend=backend, reduction=reduction,
                        inplace_backward=True)  # fmt: skip
    bits = leaf.detach().view(INT_OF_SIZE[leaf.element_size()])
    bits[:, ::97] = SIGNALLING_NAN[dtype]
    return leaf, loss, bits.clone()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_one_leaves_the_gradient_alone(kind, dtype, backend):
    """Backward with an upstream gradient of exactly 1 writes nothing (not even g * 1); any other
    value rewrites the row (the control: the poisoned bits change). Per-row upstream gradients
    skip exactly the rows whose value is 1."""
    dtype = DTYPES[dtype]
    leaf, loss, before = _poisoned_forward(kind, backend, dtype, "mean")
    (grad,) = torch.autograd.grad(loss, leaf)
    assert grad.data_ptr() == leaf.data_ptr()
    assert torch.equal(grad.view(before.dtype), before), "backward wrote the gradient although the upstream was 1"

    leaf, loss, before = _poisoned_forward(kind, backend, dtype, "none")
    upstream = torch.tensor([1.0, 2.5, 1.0, -0.5], device=DEVICE)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    after = grad.view(before.dtype)
    assert grad.data_ptr() == leaf.data_ptr()
    assert torch.equal(after[[0, 2]], before[[0, 2]]), "rows with upstream 1 were written"
    assert (after[[1, 3], ::97] != before[[1, 3], ::97]).all(), "rows with upstream != 1 were not written"


def test_recording_sees_host_synchronisation():
    """The recording the tests above rely on catches each way of waiting for the device."""
    x = torch.randn(8, device=DEVICE)
    waits = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x[0] > 0),
        "nonzero": lambda: x.nonzero(),
        "equal": lambda: torch.equal(x, x),
        "mask indexing": lambda: x[x > 0],
        "copy to the host": lambda: torch.empty(2, device="meta").cpu(),
    }
    for name, wait in waits.items():
        with Recording() as rec, contextlib.suppress(NotImplementedError):  # meta tensors hold no data to copy
            wait()
        assert rec.syncs, name
    with Recording() as rec:
        (x * 2).sum().clamp(min=1)
    assert rec.syncs == []


@pytest.mark.parametrize("kind", KINDS)
def test_recording_sees_rows_by_vocabulary_buffers(kind):
    """The memory bound above fails on a backend that keeps [rows, V] temporaries (the reference)."""
    gen = generator("memory control", kind)
    z, u = logits_pair(ROWS, VOCAB, torch.float32, gen)
    leaf = z.clone().requires_grad_(True)
    with Recording("reference") as rec:
        torch.autograd.grad(LOSSES[kind](leaf, u, backend="reference"), leaf)
    with pytest.raises(AssertionError, match="peak"):
        rec.assert_gradient_and_rows_only(z.numel() * z.element_size(), ROWS)
