"""Fused linear losses against the float64 truth computed from the same hidden/weight/bias values
(logits in float64, then ``truth.loss_and_grad``, chained to d hidden, d weight and d bias), and
the fused path's costs: matmuls per chunk, determinism, and peak memory.

Every test runs on every backend, the interpreted Triton kernels on a few of its cases per session
(``interpreted_cases``, drawn with the seed): the chunk loop around the kernel is the same Python
code for every backend, which the cpu and reference backends run on every case, and each
interpreted chunk costs about a second."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import drkl_kernels as dk

from . import truth
from .helpers import BACKENDS, DEVICE, DTYPES, GRAD_FLOOR, GRAD_TOL, assert_loss_close, generator, labels

KINDS = ["drkl", "rkl", "fkl"]
FUSED = {"drkl": dk.fused_linear_drkl_loss, "rkl": dk.fused_linear_rkl_loss, "fkl": dk.fused_linear_fkl_loss}
LOGITS = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}


@dataclasses.dataclass
class Heads:
    """Both models' last hidden states, LM heads and biases."""

    hs: torch.Tensor
    ws: torch.Tensor
    bs: torch.Tensor | None
    ht: torch.Tensor
    wt: torch.Tensor
    bt: torch.Tensor | None

    def to(self, **dtypes) -> Heads:
        """A copy with some tensors in other dtypes, e.g. ``to(hs=torch.bfloat16)``."""
        return Heads(
            **{k: None if v is None else v.to(dtypes.get(k, v.dtype)) for k, v in dataclasses.asdict(self).items()}
        )

    def truth(self, kind, target, **kw):
        """Float64 (loss, d hidden, d weight, d bias[, entropy]) from these very values."""
        z = _logits(self.hs, self.ws, self.bs)
        u = _logits(self.ht, self.wt, self.bt)
        out = truth.loss_and_grad(kind, z, u, None if target is None else target.cpu(), **kw)
        g = out[1].reshape(-1, z.shape[-1])
        hs = self.hs.double().cpu().reshape(-1, self.hs.shape[-1])
        grads = ((g @ self.ws.double().cpu()).reshape(self.hs.shape), g.T @ hs, g.sum(0))
        return (out[0], *grads, *out[2:])


def _logits(h, w, b):
    z = h.double().cpu() @ w.double().cpu().T
    return z if b is None else z + b.double().cpu()


def make_heads(rows, h_s, h_t, vocab, gen, *, dtype=torch.float32, bias=True, lead=None, scale=1.0, exact=False):
    """Student and teacher heads whose logits correlate (the teacher's hidden states extend the
    student's, its head extends the student's head), as in distillation.

    ``exact``: hidden states are integers in [-256, 256] times ``scale`` (a power of two) and
    heads multiples of 1/256 in [-1, 1], so every matmul is exact in float32 (at most 8 + 8 bits
    per product, sums of at most 2^23 units) and in every storage dtype: the logits reach
    ``scale`` * ~3000 and the only error left is the loss kernel's.
    """
    assert h_t > h_s and (h_t <= 128 or not exact)  # exact: sums of at most 128 * 2^16 units
    if exact:
        hs = torch.randint(-256, 257, (rows, h_s), generator=gen).double() * scale
        ws = torch.randint(-256, 257, (vocab, h_s), generator=gen).double() / 256
        extra_h = torch.randint(-256, 257, (rows, h_t - h_s), generator=gen).double() * scale
        extra_w = torch.randint(-256, 257, (vocab, h_t - h_s), generator=gen).double() / 256
        bs = torch.randint(-256, 257, (vocab,), generator=gen).double() * scale / 64 if bias else None
        bt = torch.randint(-256, 257, (vocab,), generator=gen).double() * scale / 64 if bias else None
    else:
        hs = torch.randn(rows, h_s, generator=gen, dtype=torch.float64) * scale
        ws = torch.randn(vocab, h_s, generator=gen, dtype=torch.float64) * 2 / h_s**0.5
        extra_h = torch.randn(rows, h_t - h_s, generator=gen, dtype=torch.float64) * scale
        extra_w = torch.randn(vocab, h_t - h_s, generator=gen, dtype=torch.float64) * 1.6 / (h_t - h_s) ** 0.5
        bs = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if bias else None
        bt = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    ht, wt = torch.cat([hs, extra_h], 1), torch.cat([ws, extra_w], 1)
    shape = lambda h: h if lead is None else h.reshape(*lead, h.shape[-1])
    put = lambda t: None if t is None else t.to(dtype).to(DEVICE)
    return Heads(put(shape(hs)), put(ws), put(bs), put(shape(ht)), put(wt), put(bt))


def confident(heads: Heads, target, rows) -> None:
    """Makes ``rows`` confident: the student's hidden state points along its head's target row."""
    flat = heads.hs.view(-1, heads.hs.shape[-1])
    for i in rows:
        flat[i] = torch.sign(heads.ws[target.view(-1)[i]]) * flat.abs().max()


def run_fused(kind, backend, heads: Heads, target, *, upstream=None, frozen=(), **kw):
    """Loss (and entropy) and the student's gradients through the public API; checks that no
    input was written to. ``frozen``: student tensors that do not require grad."""
    leaves = {}
    for name in ("hs", "ws", "bs"):
        t = getattr(heads, name)
        leaves[name] = None if t is None else t.clone().requires_grad_(name not in frozen)
    before = [None if t is None else t.clone() for t in (*dataclasses.astuple(heads), target)]
    out = FUSED[kind](leaves["hs"], leaves["ws"], heads.ht, heads.wt, target, student_bias=leaves["bs"],
                      teacher_bias=heads.bt, backend=backend, **kw)  # fmt: skip
    loss, entropy = out if kw.get("return_entropy") else (out, None)
    assert loss.dtype == torch.float32
    if entropy is not None:
        assert entropy.shape == loss.shape and not entropy.requires_grad
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    after = [*dataclasses.astuple(heads), target]
    for b, a in zip(before, after):
        assert b is None or torch.equal(a, b), "an input was modified"
    for name, leaf in leaves.items():
        if leaf is not None:
            if name in frozen:
                assert leaf.grad is None
            else:
                assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
    grads = [None if t is None else t.grad for t in leaves.values()]
    return (loss.detach(), *grads, entropy)


def check_fused(kind, backend, heads: Heads, target, *, reduction="mean", upstream=None, frozen=(), **kw):
    """Parity of one call with the float64 truth: loss (SPEC §6), each gradient norm-wise in its
    storage dtype. With DRKL_ERROR_LOG set, appends one JSON line per gradient (``bench.accuracy``)."""
    got = run_fused(kind, backend, heads, target, reduction=reduction, upstream=upstream, frozen=frozen, **kw)
    kw.pop("chunk_rows", None)
    kw.pop("accum_dtype", None)
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = heads.truth(kind, target, reduction=reduction, upstream=None if upstream is None else upstream.cpu(), **kw)
    loss_err = assert_loss_close(got[0], want[0])
    if kw.get("return_entropy"):
        assert_loss_close(got[4], want[4])
    # g = dL/dz is float32: its elements below float32's normal range are lost (SPEC §6's exemption),
    # and the matmuls carry that loss into each gradient: |error| <= 2^-126 sqrt(N V) |other factor|.
    lost = GRAD_FLOOR[torch.float32] * (heads.hs[..., 0].numel() * heads.ws.shape[0]) ** 0.5
    factors = (heads.ws.double().norm(), heads.hs.double().norm(), heads.hs[..., 0].numel() ** 0.5)
    for name, g, w, t, factor in zip(("hs", "ws", "bs"), got[1:4], want[1:4], (heads.hs, heads.ws, heads.bs), factors):
        if t is None or name in frozen:
            continue
        grad_err = assert_chained_grad_close(g, w, t.dtype, lost * float(factor))
        if os.environ.get("DRKL_ERROR_LOG"):
            with open(os.environ["DRKL_ERROR_LOG"], "a") as f:
                f.write(json.dumps({"backend": f"{backend} (fused linear)", "dtype": str(t.dtype).removeprefix("torch."),
                                    "kind": kind, "tensor": name, "loss": loss_err[0], "loss_rel": loss_err[1],
                                    "grad": grad_err[0], "grad_rel": grad_err[1],
                                    "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")  # fmt: skip
    return got


def assert_chained_grad_close(got, want, dtype, lost: float) -> tuple[float, float]:
    """Norm-wise relative error <= GRAD_TOL of the storage dtype, plus what that dtype cannot hold
    (``helpers.assert_grad_close``'s rule) and ``lost``, what float32 could not hold in g. Returns
    the error as a fraction of the allowance and the plain norm-wise relative error."""
    got, want = got.double().cpu(), want.double()
    assert torch.isfinite(got).all(), "non-finite gradient"
    err, norm = (got - want).norm().item(), want.norm().item()
    unrepresentable = GRAD_FLOOR[dtype] * want.numel() ** 0.5 + lost
    allowed = GRAD_TOL[dtype] * norm + unrepresentable
    assert err <= allowed, f"gradient error {err:.3g} > {allowed:.3g} (rel. {err / max(norm, 1e-300):.3g}, {dtype})"
    return (err / allowed if allowed else 0.0), (err / norm if GRAD_TOL[dtype] * norm > unrepresentable else 0.0)


@pytest.mark.interpreted_cases(3)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_parity(kind, dtype, backend):
    """37 rows in chunks of 8 (the last one short), biases, ignored rows, H_s != H_t."""
    gen = generator("fused-parity", kind, dtype)
    heads = make_heads(37, 48, 72, 1531, gen, dtype=DTYPES[dtype])
    check_fused(kind, backend, heads, labels(37, 1531, gen), chunk_rows=8)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_and_confident_rows(kind, dtype, backend):
    """Exact matmuls with logits of magnitude ~1e4 (hidden states scaled by 8), and rows where the
    student is confident in its target (q_t rounds to 1 in float32)."""
    gen = generator("fused-huge", kind, dtype)
    heads = make_heads(21, 48, 64, 2003, gen, dtype=DTYPES[dtype], scale=8.0, exact=True)
    target = labels(21, 2003, gen)
    confident(heads, target, [0, 5, 6])
    check_fused(kind, backend, heads, target, reduction="none", chunk_rows=4)
    check_fused(kind, backend, heads, None, chunk_rows=6, temperature=0.5)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("softcap", "temperature"), [(30.0, 1.0), (50.0, 0.5), (30.0, 2.0), (50.0, 2.0)])
@pytest.mark.parametrize("kind", KINDS)
def test_softcap_and_temperature(kind, softcap, temperature, backend):
    """Soft caps 30 and 50 on logits that saturate them, logit scales, temperatures 0.5 and 2."""
    gen = generator("fused-softcap", kind, softcap, temperature)
    heads = make_heads(19, 40, 56, 1777, gen, scale=0.125, exact=True)  # logits ~ +-100
    check_fused(kind, backend, heads, labels(19, 1777, gen), chunk_rows=5, temperature=temperature,
                student_logit_scale=1.5, teacher_logit_scale=0.75, student_softcap=softcap, teacher_softcap=softcap * 0.8)  # fmt: skip


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_without_cap(kind, backend):
    gen = generator("fused-temperature", kind)
    heads = make_heads(13, 32, 40, 999, gen, bias=False)
    check_fused(kind, backend, heads, labels(13, 999, gen), chunk_rows=3, temperature=2.0)
    check_fused(kind, backend, heads, labels(13, 999, gen), reduction="sum", temperature=0.5)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_three_d_inputs(kind, backend):
    """[B, T, H] hidden states and a [B, T] target; reduction "none" keeps [B, T]."""
    gen = generator("fused-3d", kind)
    heads = make_heads(12, 24, 40, 700, gen, lead=(3, 4))
    target = labels(12, 700, gen, lead=(3, 4))
    loss = check_fused(kind, backend, heads, target, reduction="none", chunk_rows=5)[0]
    assert loss.shape == (3, 4)
    check_fused(kind, backend, heads, target, chunk_rows=5, return_entropy=True)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows(kind, backend):
    gen = generator("fused-zero", kind)
    heads = make_heads(0, 16, 24, 300, gen, lead=(0, 5))
    target = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    for reduction in ("mean", "sum"):
        loss, dh, dw, db, _ = check_fused(kind, backend, heads, target, reduction=reduction)
        assert loss.item() == 0.0 and dh.shape == (0, 5, 16)
        assert not dw.any() and not db.any()
    assert check_fused(kind, backend, heads, target, reduction="none")[0].shape == (0, 5)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_rows_ignored(kind, backend):
    """ "mean" over no rows is 0 with zero gradients, however the rows are chunked."""
    gen = generator("fused-ignored", kind)
    heads = make_heads(10, 16, 24, 400, gen)
    target = torch.full((10,), -100, device=DEVICE)
    loss, dh, dw, db, _ = check_fused(kind, backend, heads, target, chunk_rows=3)
    assert loss.item() == 0.0 and not dh.any() and not dw.any() and not db.any()


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_num_items_in_batch(kind, as_tensor, backend):
    """The whole call's sum over num_items_in_batch (an int or a 0-dim device tensor), not per chunk."""
    gen = generator("fused-num-items", kind, as_tensor)
    heads = make_heads(17, 24, 32, 600, gen)
    n = torch.tensor(41, device=DEVICE) if as_tensor else 41
    check_fused(kind, backend, heads, labels(17, 600, gen), chunk_rows=4, num_items_in_batch=n, return_entropy=True)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "frozen", [("ws", "bs"), ("hs",), ("bs",)], ids=["frozen-head", "frozen-hidden", "frozen-bias"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parts(kind, frozen, backend):
    gen = generator("fused-frozen", kind, frozen)
    heads = make_heads(15, 24, 32, 500, gen)
    check_fused(kind, backend, heads, labels(15, 500, gen), chunk_rows=4, frozen=frozen)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_upstream(kind, backend):
    """A scalar upstream gradient (mean, sum); one per row for "none", with a trainable head (the
    loop runs again in backward) and with a frozen one (d hidden scaled row by row)."""
    gen = generator("fused-upstream", kind)
    heads = make_heads(14, 24, 32, 800, gen, lead=(2, 7))
    target = labels(14, 800, gen, lead=(2, 7))
    check_fused(kind, backend, heads, target, chunk_rows=4, upstream=torch.tensor(-2.5, device=DEVICE))
    check_fused(kind, backend, heads, target, reduction="sum", upstream=torch.tensor(0.3, device=DEVICE))
    weight = torch.randn(2, 7, generator=gen).to(DEVICE)
    weight[0, 1] = weight[1, 2] = 1.0
    weight[1, 0] = 0.0
    for frozen in ((), ("ws", "bs")):
        check_fused(kind, backend, heads, target, reduction="none", chunk_rows=3, upstream=weight, frozen=frozen)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        {"hs": torch.bfloat16, "ht": torch.bfloat16},
        {"ws": torch.bfloat16, "bs": torch.bfloat16},
        {"hs": torch.float16, "wt": torch.bfloat16},
    ],
    ids=["bf16-hidden-fp32-heads", "fp32-hidden-bf16-head", "fp16-hidden-bf16-teacher-head"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_dtypes(kind, dtypes, backend):
    """Each model's matmul runs in the wider of its hidden and head dtypes; each gradient comes back
    in its tensor's dtype, within that dtype's tolerance."""
    gen = generator("fused-mixed", kind, tuple(dtypes))
    heads = make_heads(11, 32, 40, 900, gen).to(**dtypes)
    check_fused(kind, backend, heads, labels(11, 900, gen), chunk_rows=4)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_weight_dtype_accumulation(kind, backend):
    """accum_dtype = the head's dtype (bf16): d W still within bf16's tolerance."""
    gen = generator("fused-accum", kind)
    heads = make_heads(16, 32, 40, 700, gen, dtype=torch.bfloat16)
    check_fused(kind, backend, heads, labels(16, 700, gen), chunk_rows=4, accum_dtype=torch.bfloat16)


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_entropy(kind, backend):
    gen = generator("fused-entropy", kind)
    heads = make_heads(9, 24, 32, 500, gen, scale=3.0)
    check_fused(kind, backend, heads, labels(9, 500, gen), reduction="none", chunk_rows=2, return_entropy=True,
                student_softcap=20.0)  # fmt: skip


@pytest.mark.interpreted_cases(1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_deterministic_for_a_chunk_size(dtype, backend):
    gen = generator("fused-determinism", dtype)
    heads = make_heads(29, 48, 64, 3001, gen, dtype=DTYPES[dtype])
    target = labels(29, 3001, gen)
    first = run_fused("drkl", backend, heads, target, chunk_rows=7, reduction="none")
    second = run_fused("drkl", backend, heads, target, chunk_rows=7, reduction="none")
    for a, b in zip(first[:4], second[:4]):
        assert torch.equal(a, b)


class MatmulCount(TorchDispatchMode):
    """Counts the matmuls (mm, addmm and their in-place / out= forms) run under it."""

    MATMULS = frozenset({"mm", "addmm", "addmm_"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name.split("::")[-1] in self.MATMULS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("frozen", "reduction", "forward", "backward"),
    [
        ((), "mean", 4, 0),
        (("ws", "bs"), "mean", 3, 0),
        (("hs",), "sum", 3, 0),
        ((), "none", 2, 4),
        (("ws", "bs"), "none", 3, 0),
    ],
)
def test_matmuls_per_chunk(frozen, reduction, forward, backward):
    """Four matmuls per chunk (two projections, d hidden, d W), none recomputed in backward; no
    d W matmul for a frozen head; reduction="none" with a trainable head recomputes in backward."""
    gen = generator("fused-matmuls")
    heads = make_heads(10, 16, 24, 200, gen)
    leaves = {k: getattr(heads, k).clone().requires_grad_(k not in frozen) for k in ("hs", "ws", "bs")}
    with MatmulCount() as fwd:
        loss = dk.fused_linear_drkl_loss(leaves["hs"], leaves["ws"], heads.ht, heads.wt, labels(10, 200, gen),
                                         student_bias=leaves["bs"], teacher_bias=heads.bt, chunk_rows=3,
                                         reduction=reduction, backend="reference")  # fmt: skip
    with MatmulCount() as bwd:
        loss.backward(torch.full_like(loss, 0.5))
    assert (fwd.count, bwd.count) == (4 * forward, 4 * backward)


def test_one_backward_per_forward():
    gen = generator("fused-twice")
    heads = make_heads(6, 16, 24, 100, gen)
    hs = heads.hs.clone().requires_grad_(True)
    loss = dk.fused_linear_rkl_loss(hs, heads.ws, heads.ht, heads.wt, backend="reference")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize(("dtype", "chunks"), [(torch.float32, 4), (torch.bfloat16, 7)])
def test_default_chunk_rows_from_the_head_size(dtype, chunks):
    """chunk_rows=None: both float32 logits chunks take the bytes of the student's head, H_s // 2
    rows for a float32 head, H_s // 4 for a bf16 one (70 rows in chunks of 20 or 10)."""
    gen = generator("fused-default-chunk")
    heads = make_heads(70, 40, 48, 300, gen).to(ws=dtype)
    leaves = {k: getattr(heads, k).clone().requires_grad_(True) for k in ("hs", "ws", "bs")}
    with MatmulCount() as default:
        dk.fused_linear_fkl_loss(
            leaves["hs"], leaves["ws"], heads.ht, heads.wt, student_bias=leaves["bs"], backend="reference"
        )
    assert default.count == 4 * chunks


class PeakMemory:
    """Peak bytes allocated above what existed before, and the largest single allocation, over a
    region: on a GPU from the caching allocator's statistics, on the CPU from the profiler's record
    of every allocation and free through torch's allocator (ATen's and the extension's)."""

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            self.largest = None
            return
        self.prof.__exit__(*exc)
        sizes = sorted(
            (e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        live = self.peak = self.largest = 0
        for _, nbytes in sizes:
            live += nbytes
            self.peak, self.largest = max(self.peak, live), max(self.largest, nbytes)


MEMORY_BACKENDS = [b for b in BACKENDS if b != "reference" and not (b == "triton" and DEVICE == "cpu")]


def _memory_case():
    gen = generator("fused-memory")
    rows, hidden, vocab = 256, 32, 20_000  # default chunk: 16 rows, a 16th of the logits
    heads = make_heads(rows, hidden, hidden + 8, vocab, gen)
    leaves = {k: getattr(heads, k).clone().requires_grad_(True) for k in ("hs", "ws", "bs")}
    grads = sum(t.numel() * t.element_size() for t in leaves.values())
    chunk_rows = hidden // 2
    # + per-row and per-token buffers (losses; the [V] validation probe and chunk sum of g for
    # d bias) and the chunk's hidden states: well under one chunk of logits
    allowed = grads + 2 * chunk_rows * vocab * 4 + 16 * (rows + vocab) + 8 * chunk_rows * hidden
    return heads, leaves, labels(rows, vocab, gen), allowed, rows * vocab * 4


@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
def test_peak_memory(backend):
    """Peak memory above the inputs: the gradients plus one chunk of logits per model, and no
    allocation as large as a [rows, V] float32 tensor (SPEC §7). The reference backend allocates
    several [chunk, V] temporaries per chunk, and Triton's interpreter copies through numpy, so
    neither is measured."""
    heads, leaves, target, allowed, full = _memory_case()
    with PeakMemory() as mem:
        loss = dk.fused_linear_drkl_loss(leaves["hs"], leaves["ws"], heads.ht, heads.wt, target,
                                         student_bias=leaves["bs"], teacher_bias=heads.bt, backend=backend)  # fmt: skip
        loss.backward(torch.tensor(0.5, device=DEVICE))
    assert mem.peak <= allowed, f"peak {mem.peak} B above the inputs > {allowed} B"
    assert mem.largest is None or mem.largest < full


def test_peak_memory_meter_sees_full_logits():
    """The meter of test_peak_memory fails the dense path, which holds [rows, V] logits."""
    heads, leaves, target, allowed, full = _memory_case()
    with PeakMemory() as mem:
        z = leaves["hs"] @ leaves["ws"].T + leaves["bs"]
        u = heads.ht @ heads.wt.T + heads.bt
        dk.drkl_loss(z, u, target, backend=MEMORY_BACKENDS[0]).backward()
    assert mem.peak > allowed
    assert mem.largest is None or mem.largest >= full


def test_modules_match_functions():
    gen = generator("fused-modules")
    heads = make_heads(8, 16, 24, 100, gen)
    args = (heads.hs, heads.ws, heads.ht, heads.wt, labels(8, 100, gen))
    for module, fn, kw in ((dk.FusedLinearDRKLLoss(gamma=2.0, chunk_rows=3), dk.fused_linear_drkl_loss, {"gamma": 2.0, "chunk_rows": 3}),
                           (dk.FusedLinearRKLLoss(temperature=2.0), dk.fused_linear_rkl_loss, {"temperature": 2.0}),
                           (dk.FusedLinearFKLLoss(reduction="sum"), dk.fused_linear_fkl_loss, {"reduction": "sum"})):  # fmt: skip
        assert torch.equal(module(*args, student_bias=heads.bs), fn(*args, student_bias=heads.bs, **kw))
    assert "gamma=2.0" in repr(dk.FusedLinearDRKLLoss(gamma=2.0))


def test_matches_logits_api():
    """The fused loss is the logits API applied to the projected logits (same backend, same options)."""
    gen = generator("fused-vs-logits")
    heads = make_heads(12, 32, 40, 640, gen)
    target = labels(12, 640, gen)
    kw = {
        "temperature": 1.3,
        "student_softcap": 30.0,
        "num_items_in_batch": 20,
        "return_entropy": True,
        "backend": "reference",
    }
    fused = dk.fused_linear_drkl_loss(heads.hs, heads.ws, heads.ht, heads.wt, target, student_bias=heads.bs,
                                      teacher_bias=heads.bt, **kw)  # fmt: skip
    dense = dk.drkl_loss(heads.hs @ heads.ws.T + heads.bs, heads.ht @ heads.wt.T + heads.bt, target, **kw)
    for a, b in zip(fused, dense):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _bad_inputs():
    heads = make_heads(4, 8, 12, 10, generator("fused-errors"))
    hs, ws = heads.hs.clone().requires_grad_(True), heads.ws.clone().requires_grad_(True)
    return {"student_hidden": hs, "student_weight": ws, "teacher_hidden": heads.ht, "teacher_weight": heads.wt,
                "target": torch.tensor([1, -100, 9, 0], device=DEVICE), "student_bias": heads.bs, "teacher_bias": heads.bt}  # fmt: skip


BAD = {
    "hidden not a tensor": (lambda a: {"student_hidden": a["student_hidden"].tolist()}, TypeError, "student_hidden"),
    "integer hidden": (lambda a: {"student_hidden": a["student_hidden"].detach().long()}, TypeError, "student_hidden"),
    "0-dim hidden": (lambda a: {"student_hidden": a["student_hidden"][0, 0]}, ValueError, "student_hidden"),
    "float8 head": (
        lambda a: {"teacher_weight": a["teacher_weight"].to(torch.float8_e4m3fn)},
        TypeError,
        "teacher_weight",
    ),
    "1-D head": (lambda a: {"student_weight": a["student_weight"][0]}, ValueError, "student_weight"),
    "head H mismatch": (lambda a: {"teacher_weight": a["teacher_weight"][:, :8]}, ValueError, "teacher_weight"),
    "vocabulary mismatch": (
        lambda a: {"teacher_weight": a["teacher_weight"][:9], "teacher_bias": None},
        ValueError,
        "vocabulary",
    ),
    "empty vocabulary": (
        lambda a: {"student_weight": a["student_weight"][:0], "student_bias": None},
        ValueError,
        "V == 0",
    ),
    "rows mismatch": (lambda a: {"teacher_hidden": a["teacher_hidden"][:3]}, ValueError, "leading shape"),
    "bias shape": (lambda a: {"student_bias": a["student_bias"][:5]}, ValueError, "student_bias"),
    "bias 2-D": (lambda a: {"teacher_bias": a["teacher_bias"][None]}, ValueError, "teacher_bias"),
    "device mismatch": (lambda a: {"teacher_weight": a["teacher_weight"].to("meta")}, ValueError, "device"),
    "teacher hidden needs grad": (
        lambda a: {"teacher_hidden": a["teacher_hidden"].clone().requires_grad_(True)},
        ValueError,
        "detach",
    ),
    "teacher head needs grad": (
        lambda a: {"teacher_weight": a["teacher_weight"].clone().requires_grad_(True)},
        ValueError,
        "detach",
    ),
    "teacher bias needs grad": (
        lambda a: {"teacher_bias": a["teacher_bias"].clone().requires_grad_(True)},
        ValueError,
        "detach",
    ),
    "zero chunk_rows": (lambda a: {"chunk_rows": 0}, ValueError, "chunk_rows"),
    "float chunk_rows": (lambda a: {"chunk_rows": 2.5}, TypeError, "chunk_rows"),
    "bool chunk_rows": (lambda a: {"chunk_rows": True}, TypeError, "chunk_rows"),
    "fp16 accumulator": (lambda a: {"accum_dtype": torch.float16}, ValueError, "accum_dtype"),
    "target shape": (lambda a: {"target": a["target"][:3]}, ValueError, "target"),
    "float target": (lambda a: {"target": a["target"].float()}, TypeError, "target"),
    "target too large": (lambda a: {"target": torch.tensor([1, 2, 10, 0])}, ValueError, "target"),
    "zero temperature": (lambda a: {"temperature": 0.0}, ValueError, "temperature"),
    "negative cap": (lambda a: {"student_softcap": -30.0}, ValueError, "student_softcap"),
    "NaN scale": (lambda a: {"teacher_logit_scale": float("nan")}, ValueError, "teacher_logit_scale"),
    "num_items with sum": (lambda a: {"num_items_in_batch": 3, "reduction": "sum"}, ValueError, "num_items_in_batch"),
    "unknown reduction": (lambda a: {"reduction": "avg"}, ValueError, "reduction"),
    "unknown backend": (lambda a: {"backend": "numpy"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    """Each bad argument raises an error naming it; no input is written to, no gradient appears."""
    original = _bad_inputs()
    snapshot = {k: v.detach().clone() for k, v in original.items()}
    make, error, words = BAD[case]
    args = {**original, **make(original)}
    with pytest.raises(error, match=words):
        dk.fused_linear_drkl_loss(**args)
    for k, before in snapshot.items():
        assert torch.equal(before, original[k].detach())
    assert original["student_hidden"].grad is None and original["student_weight"].grad is None


def test_readme_before_after():
    """The README's before/after example on tiny random Llama models (student H = 32, teacher H = 48):
    the fused linear loss and its gradients equal the logits path's."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from . import tiny_models

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Fused linear: from hidden states and LM heads", 1)[1]
    before, after = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1).split("\n# after:")
    student, teacher = tiny_models.causal_lm("llama", 32), tiny_models.causal_lm("llama", 48, seed=1, head_scale=4.0)
    batch = tiny_models.batch(generator("fused-readme"))
    results = []
    for code in (before + "\nloss.backward()\n", "#" + after):
        student.zero_grad()
        scope = {"dk": dk, "torch": torch, "student": student, "teacher": teacher, "input_ids": batch["input_ids"],
                 "mask": batch["attention_mask"], "labels": batch["labels"]}  # fmt: skip
        exec(code, scope)  # noqa: S102 (the README's own example)
        results.append((scope["loss"].detach(), *(p.grad.clone() for p in student.parameters())))
    assert len(results[0]) == len(list(student.parameters())) + 1
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
