"""torch.compile: the custom ops pass ``torch.library.opcheck``; a step calling any public loss
compiles with ``fullgraph=True`` (a graph break is an error) and matches eager mode."""

import pytest
import torch

import drkl_kernels as dk
from drkl_kernels import ops
from drkl_kernels.problem import Divergence, validate

from .helpers import BACKENDS, DEVICE, generator, labels, logits_pair

FUSED = [b for b in BACKENDS if b != "reference"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own graphs (parametrised cases share code objects), on one intra-op
    thread: the tests compare two runs of the same float32 maths to 1e-6, and with two threads ATen
    sometimes sums the reference's rows in another order on a process's first call than on later
    ones (2 of 10 processes here: 5e-6 relative on the entropy of bf16 logits with a soft cap;
    ``test_compiled_options_match_eager[reference]`` failed that way in a run of this file alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def compiler(backend: str) -> str:
    """inductor where it is the path users compile on this machine: the cpu backend (and "auto",
    which picks it) in ``test_compiled_losses_match_eager``, whose op is opaque to inductor while it
    generates C++ for the code around it; the tiny model's step and the README's snippet also compile
    with inductor. aot_eager for the reference and triton backends: dynamo (fullgraph) and
    AOTAutograd trace the same graph, but here inductor would generate and compile C++ for the
    reference's plain torch maths (80 s of the suite) and, around interpreted Triton kernels, for a
    path no GPU takes (50 s)."""
    return "aot_eager" if backend in ("reference", "triton") else "inductor"


def tracer(backend: str) -> str:
    """The torch.compile backend of the tests of options, dynamic shapes and checks: aot_eager (dynamo
    with fullgraph, then AOTAutograd's joint forward and backward graph) for the fused backends, whose
    custom ops and autograd wrapper AOTAutograd must trace; dynamo alone ("eager": fullgraph capture
    and fake-tensor propagation) for the reference, plain torch operations whose joint graph
    ``test_compiled_losses_match_eager`` already traces through AOTAutograd (AOTAutograd is half of
    the reference's 10 s in these tests)."""
    return "eager" if backend == "reference" else "aot_eager"


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("reduction", "entropy"), [("mean", False), ("none", True)])
def test_opcheck(backend, reduction, entropy):
    """Schema, fake tensors and AOT dispatch (dynamic shapes) of both ops. They have no autograd formula
    of their own: ``autograd.FusedDivergence`` calls them, and torch.compile traces it."""
    gen = generator("opcheck", backend, reduction)
    z, u = logits_pair(5, 300, torch.float32, gen)
    target = labels(5, 300, gen)
    num_items = torch.tensor(7.0, device=DEVICE) if reduction == "mean" else None
    p = validate(Divergence.DRKL, z, u, target, gamma=0.7, temperature=1.3, ignore_index=-100,
                 reduction=reduction, inplace_backward=False, num_items_in_batch=num_items, return_entropy=entropy,
                 student_softcap=30.0 if entropy else None)  # fmt: skip
    torch.library.opcheck(ops.divergence, ops.arguments(p, backend, want_grad=True))
    torch.library.opcheck(ops.divergence, ops.arguments(p, backend, want_grad=False))
    grad = torch.randn(5, 300, generator=gen).to(DEVICE)
    upstream = torch.randn(5, generator=gen).to(DEVICE) if reduction == "none" else torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(ops.scale_grad_, (grad, upstream, backend))


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_compiled_losses_match_eager(backend):
    """Every public loss, each reduction, in one compiled step (``compiler``): no graph break, same values and gradient."""
    gen = generator("compiled", backend)
    z, u = logits_pair(6, 500, torch.float32, gen, lead=(2, 3))
    target = labels(6, 500, gen, lead=(2, 3))
    weight = torch.randn(2, 3, generator=gen).to(DEVICE)

    def step(z, u, target):
        a = dk.drkl_loss(z, u, target, gamma=0.7, temperature=1.5, backend=backend)
        b = dk.rkl_loss(z, u, target, reduction="sum", backend=backend)
        c = dk.FKLLoss(reduction="none", backend=backend)(z, u, target)
        return a, b, c, a + 0.1 * b + (c * weight).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler(backend))
    results = []
    for fn in (step, compiled):
        zz = z.clone().requires_grad_(True)
        *losses, total = fn(zz, u, target)
        total.backward()
        results.append((losses, zz.grad))
    (want, want_grad), (got, got_grad) = results
    for g, w in zip(got, want):
        close(g, w)
    close(got_grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_fused_linear_losses_match_eager(backend):
    """The fused linear losses in one compiled step (aot_eager: the same custom op as above, between
    matmuls, where inductor's C++ cost 13 s of the suite's CPU-bound run; chunks that do not divide the
    rows, a trainable head and bias, reduction "none" that reruns the loop in backward): no graph
    break, same values and gradients to the hidden states, the head and the bias."""
    gen = generator("compiled fused linear", backend)
    hs, ws, bs = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((2, 7, 24), (300, 24), (300,)))
    ht, wt = torch.randn(2, 7, 40, generator=gen).to(DEVICE), torch.randn(300, 40, generator=gen).to(DEVICE)
    target = labels(14, 300, gen, lead=(2, 7))

    def step(hs, ws, bs):
        a = dk.fused_linear_drkl_loss(hs, ws, ht, wt, target, student_bias=bs, gamma=0.7, chunk_rows=5,
                                      student_softcap=30.0, backend=backend)  # fmt: skip
        b = dk.fused_linear_fkl_loss(hs, ws, ht, wt, None, reduction="none", chunk_rows=4, backend=backend)
        return a, b, a + (b * torch.linspace(0.5, 1.5, 7, device=DEVICE)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
        *losses, total = fn(*leaves)
        total.backward()
        results.append((losses, [t.grad for t in leaves]))
    (want, want_grads), (got, got_grads) = results
    for g, w in zip(got + got_grads, want + want_grads):
        close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_options_match_eager(backend):
    """Entropy, a tensor num_items_in_batch, logit scale and soft-cap, bf16 logits, target=None, no grad."""
    gen = generator("compiled-options", backend)
    z, u = logits_pair(8, 700, torch.bfloat16, gen, lead=(2, 4))
    target = labels(8, 700, gen, lead=(2, 4))
    num_items = torch.tensor(11, device=DEVICE)
    kw = dict(backend=backend, return_entropy=True, student_softcap=20.0, teacher_logit_scale=0.8)

    def step(z, u, target):
        loss, entropy = dk.drkl_loss(z, u, target, num_items_in_batch=num_items, **kw)
        rows, row_entropy = dk.fkl_loss(z, u, None, reduction="none", **kw)
        with torch.no_grad():
            frozen = dk.rkl_loss(z, u, target, backend=backend)
        return loss, entropy, rows, row_entropy, frozen, loss + rows.mean()

    compiled = torch.compile(step, fullgraph=True, backend=tracer(backend))
    results = []
    for fn in (step, compiled):
        zz = z.clone().requires_grad_(True)
        *outputs, total = fn(zz, u, target)
        total.backward()
        results.append((outputs, zz.grad))
    (want, want_grad), (got, got_grad) = results
    for g, w in zip(got, want):
        close(g, w)
    assert not any(t.requires_grad for t in (got[1], got[3], got[4]))
    close(got_grad.float(), want_grad.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_and_scalars(backend):
    """dynamic=True: one graph serves other row counts and num_items_in_batch (symbolic ints and floats pass
    the argument checks), each call equal to eager mode. (The kernels' float options, e.g. the temperature,
    are operator arguments: a new value compiles a new graph.)"""
    from torch._dynamo.utils import counters

    def step(z, u, target, num_items, temperature):
        return dk.drkl_loss(z, u, target, backend=backend, temperature=temperature, num_items_in_batch=num_items)

    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend=tracer(backend), dynamic=True)
    for rows in (7, 4, 9):
        gen = generator("dynamic", backend, rows)
        z, u = logits_pair(rows, 300, torch.float32, gen)
        target = labels(rows, 300, gen)
        zz = z.clone().requires_grad_(True)
        loss = compiled(zz, u, target, rows + 2, 1.5)
        loss.backward()
        close(loss, step(z, u, target, rows + 2, 1.5))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_backward_is_out_of_place_under_compile(backend):
    """inplace_backward=True compiles (the gradient gets its own buffer) and the logits are not written."""
    gen = generator("compiled-inplace", backend)
    z, u = logits_pair(4, 400, torch.float32, gen)
    target = labels(4, 400, gen)
    zz = z.clone().requires_grad_(True)
    dk.rkl_loss(zz, u, target, backend=backend).backward()

    compiled = torch.compile(lambda z: dk.rkl_loss(z * 1.0, u, target, backend=backend, inplace_backward=True),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    zc = z.clone().requires_grad_(True)
    compiled(zc).backward()
    assert torch.equal(zc.detach(), z)
    close(zc.grad, zz.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_checks(backend):
    """Under compile, a shape error still raises at trace time (with fullgraph=True, Dynamo reports the
    ValueError inside its own error); a target out of range is not read on the host (no graph break)
    and makes its row NaN, never a silent value."""
    z, u = logits_pair(3, 50, torch.float32, generator("compiled-checks"))
    compiled = torch.compile(lambda z, u, t: dk.drkl_loss(z, u, t, backend=backend, reduction="none"),
                             fullgraph=True, backend=tracer(backend))  # fmt: skip
    rows = compiled(z, u, torch.tensor([3, 50, -100], device=DEVICE))
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and rows[2] == 0
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="target must have the leading shape"):
        compiled(z, u, torch.tensor([1, 2], device=DEVICE))


def test_compiled_training_step_of_a_tiny_model():
    """A compiled step of a tiny model (student embedding + LM head against a frozen teacher): two SGD steps
    give the same losses and weights as eager mode."""
    gen = generator("tiny-model")
    vocab, hidden = 97, 16
    tokens = torch.randint(0, vocab, (2, 9), generator=gen).to(DEVICE)
    targets = labels(18, vocab, gen, lead=(2, 9))
    teacher_logits = torch.randn(2, 9, vocab, generator=gen).to(DEVICE) * 3

    def make_student():
        torch.manual_seed(1234)
        return torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab)).to(DEVICE)

    def loss_fn(student, tokens):
        return dk.drkl_loss(student(tokens), teacher_logits, targets, gamma=0.5)

    runs = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        student = make_student()
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = fn(student, tokens)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), [p.detach() for p in student.parameters()]))
    (want, want_params), (got, got_params) = runs
    close(got, want)
    assert got[1] < got[0]
    for g, w in zip(got_params, want_params):
        close(g, w)
