"""Fused linear losses: DRKL, RKL and FKL from both models' last hidden states and LM heads,
holding only one chunk of rows of logits per model at a time (SPEC §4, §7).

The loop, per chunk of ``chunk_rows`` rows (the maths is the backend's, unchanged):

    z = h_s W_s^T + b_s,  u = h_t W_t^T + b_t    one matmul per model, into a float32 buffer
    backend.forward(chunk)                        loss rows and, written over z, the
                                                  reduction-scaled g = dL/dz (SPEC §3);
                                                  under torch.compile the custom operator
                                                  (``autograd.launch``), g in its own buffer
    d h_s[chunk] = g W_s,  d W_s += g^T h_s,  d b_s += sum_rows g

Four matmuls per chunk, the gradient computed in forward; the logit transform (scale, soft
cap, temperature) is the kernel's. Every chunk divides by the *whole call's* "mean" divisor
(``num_items_in_batch``, or the valid rows of the whole target, counted on the device), so
the chunks' losses and gradients add up to the unchunked ones; nothing synchronises the host.
Backward multiplies the saved gradients by the upstream gradient in place (the backend's
``scale_grad_``: a kernel backend reads an upstream of exactly 1 and touches nothing).

``reduction="none"`` gives every row its own upstream weight u_i, unknown in forward. Rows of
d hidden scale by it. But d W = sum_i u_i g_i^T h_i, and no per-row factor can be applied to
the saved sum_i g_i^T h_i, so when the head or its bias is trainable, forward computes the
loss only and backward runs the loop again with g_i scaled by u_i (six matmuls per chunk
in all, like TRL's chunked divergence); with a frozen head, d hidden is computed in forward
and scaled row by row.

Vocabulary-parallel heads (``process_group``, SPEC §8). Each rank passes the rows ``[V_r, H]`` of
both heads (and biases) for its contiguous vocabulary shard, in rank order, and the same hidden
states, target and options (``chunk_rows`` too: every rank must run the same chunks; and the same
grad mode and ``requires_grad`` of the student's tensors, which decide the collectives). Each chunk's
kernel is the logits path's split: partial over the shard, one ``all_gather`` of 44 bytes per row,
finish (``parallel``), so every rank gets bitwise the same loss. ``d W_r`` and ``d b_r`` are the
shard's own. ``d hidden = sum_r g_r W_r`` is a sum over the shards: with ``reduce_hidden_grad=True``
(default) one ``all_reduce`` of the ``[N, H_s]`` partial sums after the last chunk gives every rank
the whole of it (the partial sums are kept and reduced in float32 for bf16/fp16 hidden states:
``N H_s 4`` bytes); ``reduce_hidden_grad=False`` returns this rank's partial sum, for callers whose
hidden states already pass through Megatron's ``copy_to_tensor_model_parallel_region`` (its backward
all-reduces). Collectives per call: one per chunk, plus that all-reduce; backward exchanges nothing,
except ``reduction="none"`` with a trainable head or bias, which runs the chunks again (with their
collectives). The shard sizes are gathered once per group (``parallel``).

Dtypes. Each model's matmuls run on ``hidden`` and ``weight`` promoted to a common dtype
(bf16 hidden with an fp32 head: fp32; fp32 hidden with a bf16 head: fp32, the head converted
once per call). Logits are always at least float32: on a GPU, bf16/fp16 operands go through
the tensor cores with a float32 output; on a CPU, where torch has no float32-output bf16
matmul, bf16/fp16 heads are converted to float32 once per call. The gradients come back in
the dtypes of hidden, weight and bias; ``d W`` accumulates over the chunks in float32 (or
the head's dtype if wider) unless ``accum_dtype`` is the weight's dtype.

Why float32 logits buffers for bf16 inputs: the loss is defined on ``hidden @ weight.T + bias``
(SPEC §6 tolerances against the float64 product of the same values), and rounding that product
to bf16 moves a logit of magnitude |z| by up to 2^-9 |z| (0.06 at |z| = 30): loss errors far
above SPEC §6's 1e-5 relative tolerance. The matmul accumulates in float32 anyway, so its
float32 output costs no precision step and no extra pass.
The price is memory, 2 c V 4 bytes instead of 2 c V 2, which ``chunk_rows`` sets: the default
below halves c for bf16/fp16 heads, so the buffers take the same bytes as bf16 buffers of the
float32 default would. g is computed in float32 over the student's buffer and rounded once to
the operand dtype for the two gradient matmuls (into the teacher's buffer, free by then).

Memory beyond the inputs (bytes; c = chunk_rows, N rows, V vocabulary, H_s the student's
hidden size, b_x the element size of x):

    gradients    N H_s b_hidden + V H_s b_weight + V b_bias        (what autograd gets back)
    accumulator  V H_s 4 while forward runs, when the head is narrower than float32 and
                 accum_dtype is float32 (with accum_dtype = the head's dtype: none, but each
                 chunk's product is rounded to it before it is added)
    workspace    2 c V 4 (one float32 logits buffer per model) + O(c H + N + V) (the chunk's
                 hidden states in the operand dtype, per-row losses, a [V] row); on a GPU the bf16/fp16
                 copy of g for the gradient matmuls reuses the teacher's buffer
    converted    V H 4 per head converted to float32 (see Dtypes: a bf16/fp16 head on the CPU,
                 or next to float32 hidden states); N H b_hidden per hidden-state tensor whose
                 rows are not one stride apart (e.g. ``hidden[:, :-1]`` of [B, T, H]: one copy)

``chunk_rows=None`` takes the largest c whose two logits buffers fit in the bytes of the
student's head as given (V H_s b_weight, the size of d W): c = max(1, H_s b_weight / (b_z_s +
b_z_t)) with b_z the logits' element size, i.e. H_s / 2 rows for a float32 head and H_s / 4 for a
bf16/fp16 one (float32 logits). Chunks of H_s / 4 to H_s / 2 rows keep the matmuls at full rate
(M >= H_s/4, K = H_s) and the workspace no larger than the weight gradient; fewer rows trade
speed for memory (see the README's table). The ``reference`` backend works the same way but its
per-chunk computation allocates a handful of [c, V] temporaries.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.distributed as dist

from . import backends, ops, parallel
from .autograd import launch, reduced
from .problem import Divergence, Problem, validate
from .reduction import mean_divisor

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_tensor(name: str, t, dims: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if dims is None and t.dim() == 0:
        raise ValueError(f"{name} must have shape [..., H], got a 0-dim tensor")


def _check_head(side: str, hidden, weight, bias) -> None:
    """Types, shapes and dtypes of one model's hidden states, LM head and bias."""
    _check_tensor(f"{side}_hidden", hidden)
    _check_tensor(f"{side}_weight", weight, dims=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight must be [V, H] with H = {side}_hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight has an empty vocabulary dimension (V == 0)")
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{side}_bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_call(student, teacher, chunk_rows, accum_dtype) -> None:
    """What relates the two models, and the fused path's own options."""
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    _check_head("student", hs, ws, bs)
    _check_head("teacher", ht, wt, bt)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must have the same leading shape, got "
            f"{tuple(hs.shape[:-1])} and {tuple(ht.shape[:-1])}"
        )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must have the same vocabulary size V, got {ws.shape[0]} and {wt.shape[0]}"
        )
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")
    for name, t in zip(names, (hs, ws, bs, ht, wt, bt)):
        if t is not None and t.device != hs.device:
            raise ValueError(f"{name} must be on student_hidden's device {hs.device}, got {t.device}")
    for name, t in zip(names[3:], (ht, wt, bt)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad; the loss only differentiates the student: pass {name}.detach()")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)):
        raise TypeError(f"chunk_rows must be an int or None, got {type(chunk_rows).__name__}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if accum_dtype not in (torch.float32, ws.dtype):
        raise ValueError(f"accum_dtype must be torch.float32 or student_weight's dtype {ws.dtype}, got {accum_dtype}")


@dataclasses.dataclass(frozen=True)
class Head:
    """One model's last layer as the chunk loop reads it: ``logits = hidden @ weight.T + bias``."""

    hidden: torch.Tensor  # [N, H] as given
    weight: torch.Tensor  # [V, H] in the operand dtype
    bias: torch.Tensor | None  # [V] in the logits dtype
    operand: torch.dtype  # the dtype the matmuls run in
    logits: torch.dtype  # float32, or float64 for float64 operands

    @classmethod
    def of(cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Head:
        operand = torch.promote_types(hidden.dtype, weight.dtype)
        if not (hidden.is_cuda and operand in LOW_PRECISION):  # float32-output bf16/fp16 matmuls: GPU only
            operand = torch.promote_types(operand, torch.float32)
        logits = torch.promote_types(operand, torch.float32)
        return cls(
            hidden=hidden.detach().reshape(-1, hidden.shape[-1]),
            weight=weight.detach().to(operand),
            bias=None if bias is None else bias.detach().to(logits),
            operand=operand,
            logits=logits,
        )

    def project(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """Writes the logits of ``rows`` into ``out``; returns those rows' hidden states in the operand dtype."""
        h = self.hidden[rows].to(self.operand)
        if out.dtype != self.operand:
            torch.mm(h, self.weight.t(), out_dtype=out.dtype, out=out)
            if self.bias is not None:
                out.add_(self.bias)
        elif self.bias is None:
            torch.mm(h, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, h, self.weight.t(), out=out)
        return h


def _cast(g: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    """``g`` in ``dtype``, written over ``scratch`` (the teacher's logits buffer, free once the kernel
    has run) when the narrower copy fits there."""
    if g.dtype == dtype:
        return g
    if dtype.itemsize > scratch.dtype.itemsize:
        return g.to(dtype)
    return scratch.view(dtype)[:, : g.shape[1]].copy_(g)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one call needs: the two heads, the per-chunk problem template, and what to differentiate."""

    student: Head
    teacher: Head
    template: Problem  # the options, the whole target, and the whole call's "mean" divisor
    hidden_shape: torch.Size  # student_hidden.shape
    hidden_dtype: torch.dtype
    chunk_rows: int
    backend: str  # a concrete backend name
    want_hidden: bool
    want_weight: bool
    want_bias: bool
    weight_dtype: torch.dtype
    bias_dtype: torch.dtype | None
    accum: torch.dtype  # d W accumulator
    shard: parallel.Shard | None = None  # this rank's vocabulary shard of a vocabulary-parallel head
    reduce_hidden: bool = True  # all-reduce d hidden over the shard's group

    @property
    def rows(self) -> int:
        return self.student.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.student.weight.shape[0]

    @property
    def want_grad(self) -> bool:
        return self.want_hidden or self.want_weight or self.want_bias

    @property
    def recompute(self) -> bool:
        """reduction="none" with a trainable head or bias: d W needs each row's upstream weight."""
        return self.template.reduction == "none" and (self.want_weight or self.want_bias)

    def chunk(self, rows: slice, student: torch.Tensor, teacher: torch.Tensor) -> Problem:
        target = self.template.target
        return dataclasses.replace(self.template, student=student, teacher=teacher, lead_shape=student.shape[:-1],
                                   target=None if target is None else target[rows])  # fmt: skip


class StudentGrads:
    """d hidden, d W and d bias as the chunks add to them: ``add`` takes a chunk's g = dL/dz."""

    def __init__(self, plan: Plan):
        s, device = plan.student, plan.student.hidden.device
        self.plan, self.head, self.started = plan, s, False
        vocab, width = plan.vocab, s.hidden.shape[1]
        # with a group, each rank's d hidden is a partial sum: kept (and all-reduced) in at least
        # float32, rounded to the hidden states' dtype once, after the sum
        hidden = plan.hidden_dtype if plan.shard is None else torch.promote_types(plan.hidden_dtype, torch.float32)
        self.hidden = torch.empty(plan.rows, width, dtype=hidden, device=device) if plan.want_hidden else None
        self.weight = torch.empty(vocab, width, dtype=plan.accum, device=device) if plan.want_weight else None
        self.bias = torch.zeros(vocab, dtype=s.logits, device=device) if plan.want_bias else None
        # the d W product runs in the accumulator's dtype when that is the narrower (CPU, bf16 head, accum_dtype bf16)
        self.weight_operand = plan.accum if plan.accum.itemsize < s.operand.itemsize else s.operand

    def add(self, rows: slice, g: torch.Tensor, h: torch.Tensor, scratch: torch.Tensor) -> None:
        """Adds chunk ``rows``: g [n, V] in the logits dtype, h its hidden states in the operand
        dtype; ``scratch``, the teacher's logits buffer, may be overwritten."""
        s = self.head
        if self.bias is not None:
            self.bias.add_(g.sum(0))
        g_op = _cast(g, s.operand, scratch)  # a copy only for bf16/fp16 operands (on a GPU)
        if self.hidden is not None:
            if self.hidden.dtype == s.operand:
                torch.mm(g_op, s.weight, out=self.hidden[rows])
            elif s.operand in LOW_PRECISION:  # bf16/fp16 operands into float32 partial sums, on a GPU
                torch.mm(g_op, s.weight, out_dtype=self.hidden.dtype, out=self.hidden[rows])
            else:
                self.hidden[rows] = g_op @ s.weight
        if self.weight is not None:  # d W (+)= g^T h: the first chunk overwrites (beta = 0), no zero fill
            g_w = g_op if self.weight_operand == s.operand else _cast(g, self.weight_operand, scratch)
            a, b, beta = g_w.t(), h.to(self.weight_operand), float(self.started)
            if a.dtype == self.weight.dtype:
                self.weight.addmm_(a, b, beta=beta)
            else:  # bf16/fp16 operands into a float32 accumulator, on a GPU
                torch.addmm(self.weight, a, b, beta=beta, out_dtype=self.weight.dtype, out=self.weight)
        self.started = True

    def result(self) -> tuple[torch.Tensor | None, ...]:
        """(d hidden, d W, d bias) in the dtypes and shapes of the student's tensors."""
        p = self.plan
        return (
            None if self.hidden is None else self.hidden.view(p.hidden_shape).to(p.hidden_dtype),
            None if self.weight is None else self.weight.to(p.weight_dtype),
            None if self.bias is None else self.bias.to(p.bias_dtype),
        )


def run(plan: Plan, want_grad: bool, upstream: torch.Tensor | None = None):
    """The chunk loop. Returns (loss rows [N], entropy rows or None, (d hidden, d W, d bias) or
    None); ``upstream``: per-row weights to multiply g by before it enters the gradients."""
    s, t, n_rows, step = plan.student, plan.teacher, plan.rows, plan.chunk_rows
    device = s.hidden.device
    width = min(step, n_rows)
    s_buf = torch.empty(width, plan.vocab, dtype=s.logits, device=device)
    t_buf = torch.empty(width, plan.vocab, dtype=t.logits, device=device)
    grads = StudentGrads(plan) if want_grad else None
    losses, entropies = [], []
    for start in range(0, max(n_rows, 1), step):  # rows = 0: one empty chunk
        rows = slice(start, min(start + step, n_rows))
        z, u = s_buf[: rows.stop - rows.start], t_buf[: rows.stop - rows.start]
        h = s.project(rows, z)
        t.project(rows, u)
        loss, entropy, g = launch(plan.chunk(rows, z, u), plan.backend, want_grad, plan.shard)
        losses.append(loss)
        entropies.append(entropy)
        if grads is not None:
            if upstream is not None:
                ops.scale_grad_(g, upstream[rows], plan.backend)
            grads.add(rows, g, h, u)
    entropy_rows = None if entropies[0] is None else torch.cat(entropies)
    if grads is not None and grads.hidden is not None and plan.shard is not None and plan.reduce_hidden:
        dist.all_reduce(grads.hidden, group=plan.shard.group)  # the shards' partial sums g_r W_r
    return torch.cat(losses), entropy_rows, None if grads is None else grads.result()


def _rows_2d(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as the [rows, columns] matrix ``scale_grad_`` takes (a bias gradient is one row)."""
    return grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.view(1, -1)


class FusedLinearDivergence(torch.autograd.Function):
    """Forward runs the chunk loop with gradients (or, when ``plan.recompute``, without);
    backward scales the saved gradients in place (or runs the loop with the per-row upstream).
    The saved gradients are handed to autograd once: a second backward through the same graph
    is refused rather than silently rescaled."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, plan: Plan):
        loss_rows, entropy_rows, grads = run(plan, not plan.recompute)
        ctx.plan, ctx.grads = plan, None if plan.recompute else grads
        return reduced(ctx, plan.template, loss_rows, entropy_rows)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        plan = ctx.plan
        per_row = plan.template.reduction == "none"
        upstream = grad_loss.reshape(-1) if per_row else grad_loss
        if plan.recompute:
            _, _, grads = run(plan, True, upstream=upstream)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "drkl_kernels fused linear losses support one backward per forward (the gradients are computed in forward)"
                )
            for grad in grads:  # per row: only d hidden exists (see the module docstring)
                if grad is not None:
                    ops.scale_grad_(_rows_2d(grad), upstream, plan.backend)
        return (*grads, None)


def default_chunk_rows(student: Head, teacher: Head, weight_dtype: torch.dtype) -> int:
    """The largest chunk whose two logits buffers fit in the bytes of the student's head
    (``weight_dtype``, as given): H_s / 2 rows for a float32 head, H_s / 4 for bf16/fp16."""
    budget = student.hidden.shape[1] * weight_dtype.itemsize
    return max(1, budget // (student.logits.itemsize + teacher.logits.itemsize))


def fused_linear_loss(divergence: Divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                      *, student_bias, teacher_bias, chunk_rows, accum_dtype, backend: str, process_group=None,
                      reduce_hidden_grad: bool = True, **options):  # fmt: skip
    """The public fused linear losses: checks, then the chunk loop (with autograd when the student
    needs a gradient). ``options``: the logits API's keywords (``validate``'s)."""
    _check_call((student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias),
                chunk_rows, accum_dtype)  # fmt: skip
    lead, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    if isinstance(target, torch.Tensor) and target.shape != lead:
        raise ValueError(
            f"target must have the leading shape of the hidden states {tuple(lead)}, got {tuple(target.shape)}"
        )
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    # The options and the whole target are checked by ``validate`` on a broadcast view of one row
    # of logits shaped like the call's (V floats, never read); each chunk gets the same problem over
    # its own rows and logits buffers (and, with a group, the shard's place in the vocabulary).
    rows = lead.numel()
    student = Head.of(student_hidden, student_weight, student_bias)
    teacher = Head.of(teacher_hidden, teacher_weight, teacher_bias)
    probe = torch.empty(1, vocab, dtype=student.logits, device=student_hidden.device)
    probe = probe.expand(rows, vocab).view(*lead, vocab)
    shard = parallel.shard(process_group, probe)
    template = validate(divergence, probe, probe, target, inplace_backward=False, **(shard.slice if shard else {}),
                        **options)  # fmt: skip
    # each chunk's kernel writes g over the student's logits buffer (SPEC §7)
    template = dataclasses.replace(template, inplace_backward=True)
    if template.reduction == "mean":
        template = dataclasses.replace(template, num_items=mean_divisor(template))
    grad = torch.is_grad_enabled()
    plan = Plan(
        student=student,
        teacher=teacher,
        template=template,
        hidden_shape=student_hidden.shape,
        hidden_dtype=student_hidden.dtype,
        chunk_rows=chunk_rows or default_chunk_rows(student, teacher, student_weight.dtype),
        backend=backends.resolve(backend, student_hidden.device),
        want_hidden=grad and student_hidden.requires_grad,
        want_weight=grad and student_weight.requires_grad,
        want_bias=grad and student_bias is not None and student_bias.requires_grad,
        weight_dtype=student_weight.dtype,
        bias_dtype=None if student_bias is None else student_bias.dtype,
        accum=torch.promote_types(accum_dtype, student_weight.dtype),
        shard=shard,
        reduce_hidden=reduce_hidden_grad,
    )
    if plan.want_grad:
        return FusedLinearDivergence.apply(student_hidden, student_weight, student_bias, plan)
    loss_rows, entropy_rows, _ = run(plan, False)
    return reduced(None, template, loss_rows, entropy_rows)
