"""The reference: plain PyTorch, and the single source of truth for the semantics.

Per row, with s = T_s(z) / tau, r = T_t(u) / tau (T the side's logit transform),
q = softmax(s), p = softmax(r) (SPEC §1):

    FKL  = sum_i p_i (log p_i - log q_i)
    RKL  = sum_i q_i (log q_i - log p_i)
    DRKL = KL([q_t, 1-q_t] || [p_t, 1-p_t]) + gamma * KL(qh || ph)

where qh, ph are renormalised over the tokens other than the target t. All three come
from one split around a pivot token t (``record``):

    KL(a || b) = KL([a_t, 1-a_t] || [b_t, 1-b_t]) + (1 - a_t) KL(ah || bh)

holds for any t; RKL splits around the student's argmax, FKL around the teacher's,
DRKL around its target with gamma in place of (1 - a_t). With a = Ls'_x - x_t (Ls' the
log-sum-exp over the other tokens), log a_t = -softplus(a) and log(1 - a_t) =
-softplus(-a), so rows where a_t rounds to 1 stay exact (1 - a_t is never formed). The
tail KL is E_xh[d] + log(S_y / S_x) with d_j = ((x_j - max x) - (y_j - max y)) / tau,
differences taken before the temperature: no difference of two log-sum-exps. Terms with
zero probability contribute 0; a side with no mass off the pivot (V == 1) has tail KL 0.
The student's entropy is H(q) = q_t softplus(a_q) + (1 - q_t) (softplus(-a_q) + H(qh)).

The computation is the kernels' (``record``'s two phases), vectorised over rows:
``partial`` writes the record of a slice of the vocabulary, ``finish`` turns the merged
record into the loss, the entropy and the gradient of the slice (SPEC §3, regrouped around
the pivot, times the transform's derivative). Compute is float32 (float64 for float64
input). Cost: a handful of [rows, V] temporaries in the compute dtype, which is what the
fused kernels avoid. Through the public API the reference computes the gradient in
backward, from the saved logits, so ``torch.autograd.gradcheck`` and repeated backward
passes work; ``inplace_backward`` is ignored here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import record
from .autograd import reduced
from .problem import Divergence, Pivot, Problem, Transform
from .record import NEG_INF, Field, shift, weighted
from .reduction import mean_grad_scale


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def transform(logits: torch.Tensor, t: Transform, dtype: torch.dtype) -> torch.Tensor:
    """T(x) = softcap * tanh(scale * x / softcap) (or scale * x), in ``dtype``."""
    x = logits.detach().to(dtype)
    if t.scale != 1.0:
        x = x * t.scale
    return x if t.softcap is None else t.softcap * torch.tanh(x / t.softcap)


def transform_grad(logits: torch.Tensor, t: Transform, dtype: torch.dtype) -> torch.Tensor | float:
    """dT/dx = scale * (1 - tanh^2(scale * x / softcap)), with 1 - tanh^2 formed without cancelling."""
    if t.softcap is None:
        return t.scale
    y = (logits.detach().to(dtype) * t.scale / t.softcap).abs()
    e = torch.exp(-2 * y)
    return t.scale * 4 * e / (1 + e) ** 2


def _sides(p: Problem):
    """(z, u, x, y) transformed, in the compute dtype; x weights the expectation."""
    dtype = compute_dtype(p.student)
    z = transform(p.student, p.student_transform, dtype)
    u = transform(p.teacher, p.teacher_transform, dtype)
    return (z, u, u, z) if p.divergence == Divergence.FKL else (z, u, z, u)


def _counted(p: Problem) -> torch.Tensor | None:
    return None if p.target is None else (p.target != p.ignore_index)


def partial(p: Problem) -> torch.Tensor:
    """``[rows, WIDTH]`` records of the slice ``[vocab_start, vocab_start + V)`` held by ``p`` (``record``)."""
    start = p.vocab_start
    z, u, x, y = _sides(p)
    rows, vs = z.shape
    inv = 1.0 / p.temperature
    idx_dtype = z.dtype
    if p.pivot == Pivot.LABEL:
        local = p.target.long() - start
        held = (local >= 0) & (local < vs) & (p.target != p.ignore_index)
        local = torch.where(held, local, 0)
    elif vs:
        key = z if p.pivot == Pivot.STUDENT_ARGMAX else u
        local = key.argmax(-1)
        held = torch.ones(rows, dtype=torch.bool, device=z.device)
    else:
        local = torch.zeros(rows, dtype=torch.long, device=z.device)
        held = torch.zeros(rows, dtype=torch.bool, device=z.device)
    at = local.unsqueeze(-1)
    c = {
        Field.PIV: torch.where(held, (local + start).to(idx_dtype), -1.0),
        Field.PIV_Z: torch.where(held, z.gather(-1, at).squeeze(-1) if vs else 0.0, 0.0),
        Field.PIV_U: torch.where(held, u.gather(-1, at).squeeze(-1) if vs else 0.0, 0.0),
    }
    pivot_mask = torch.zeros_like(z, dtype=torch.bool)
    if vs:
        pivot_mask.scatter_(-1, at, held.unsqueeze(-1))
    x, y = x.masked_fill(pivot_mask, NEG_INF), y.masked_fill(pivot_mask, NEG_INF)
    m_x = x.amax(-1) if vs else torch.full((rows,), NEG_INF, dtype=idx_dtype, device=z.device)
    m_y = y.amax(-1) if vs else m_x.clone()
    dx, dy = x - shift(m_x).unsqueeze(-1), y - shift(m_y).unsqueeze(-1)
    e_x, e_y = torch.exp(dx * inv), torch.exp(dy * inv)
    if record.has_top(p.divergence):
        top = x.argmax(-1) if vs else torch.zeros(rows, dtype=torch.long, device=z.device)
        real = m_x > NEG_INF
        c[Field.TOP] = torch.where(real, (top + start).to(idx_dtype), -1.0)
        c[Field.TOP_Y] = torch.where(real, y.gather(-1, top.unsqueeze(-1)).squeeze(-1) if vs else 0.0, 0.0)
        top_mask = torch.zeros_like(pivot_mask)
        if vs:
            top_mask.scatter_(-1, top.unsqueeze(-1), real.unsqueeze(-1))
        e_x = e_x.masked_fill(top_mask, 0.0)
        dy = y - c[Field.TOP_Y].unsqueeze(-1)  # differences relative to the top: (x_j - x_k) - (y_j - y_k)
    else:
        c[Field.TOP], c[Field.TOP_Y] = torch.full_like(m_x, -1.0), torch.zeros_like(m_x)
    c[Field.M_X], c[Field.M_Y] = m_x, m_y
    c[Field.S_X], c[Field.S_Y] = e_x.sum(-1), e_y.sum(-1)
    c[Field.ACC] = weighted(e_x, (dx - dy) * inv).sum(-1)
    e_s, d_s = (e_y, dy) if p.divergence == Divergence.FKL else (e_x, dx)
    c[Field.ENT] = weighted(e_s, d_s * inv).sum(-1)
    return record._stack(c)


def _log1p_exp_neg_abs(v: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(-v.abs()))


def _exp_diff(x: torch.Tensor, y: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """y - x given log(y / x), through expm1 where the two nearly cancel."""
    return torch.where(log_ratio.abs() < 0.5, x * torch.expm1(log_ratio), y - x)


def finish(p: Problem, merged: torch.Tensor, want_grad: bool):
    """Loss rows, entropy rows (or None) and, if ``want_grad``, the reduction-scaled gradient of
    the slice held by ``p``, in the compute dtype, from the whole row's record ``merged``."""
    start, vocab = p.vocab_start, p.vocab_total
    inv = 1.0 / p.temperature
    c = record._columns(merged)
    m_x, s_x, m_y, s_y, acc = (c[f] for f in (Field.M_X, Field.S_X, Field.M_Y, Field.S_Y, Field.ACC))
    dt = merged.dtype
    closure = record.has_top(p.divergence)
    if closure:  # the top back in: e_k = 1 (M_X is x_k); ACC is sum e_j (d_j - d_k) over the others
        has_k = c[Field.TOP] >= 0
        s_x = s_x + has_k.to(dt)
        dk_n = torch.where(has_k, -acc / s_x, 0.0)  # d_k - N
        d_k = torch.where(has_k, (shift(m_y) - c[Field.TOP_Y]) * inv, 0.0)
        acc = torch.where(has_k, (d_k - dk_n) * s_x, 0.0)  # E[d] S_X
    x_t, y_t = (c[Field.PIV_U], c[Field.PIV_Z]) if p.divergence == Divergence.FKL else (c[Field.PIV_Z], c[Field.PIV_U])
    log_sx, log_sy, ratio = torch.log(s_x), torch.log(s_y), torch.log(s_y / s_x)
    mean_d = acc / s_x
    tail = torch.where(s_x == 0, 0.0, mean_d + ratio)  # N = KL(xh || yh)
    a = (m_x - x_t) * inv + log_sx  # Ls'_x - x_t / tau
    b = (m_y - y_t) * inv + log_sy
    gap = ((m_y - y_t) - (m_x - x_t)) * inv + ratio  # b - a, without cancelling log S terms
    # d_t = softplus(b) - softplus(a), d_n = softplus(-b) - softplus(-a): the max(., 0) parts cancel
    # into +-gap when a and b share a sign, so d_t - d_n = gap exactly.
    tails = _log1p_exp_neg_abs(b) - _log1p_exp_neg_abs(a)
    d_t = torch.where((a > 0) & (b > 0), gap, b.clamp(min=0) - a.clamp(min=0)) + tails
    d_n = torch.where((a < 0) & (b < 0), -gap, (-b).clamp(min=0) - (-a).clamp(min=0)) + tails
    px_t, px_n = torch.exp(-F.softplus(a)), torch.exp(-F.softplus(-a))
    w = torch.full_like(px_n, p.gamma) if p.divergence == Divergence.DRKL else px_n
    loss = weighted(px_t, d_t) + weighted(px_n, d_n) + w * tail

    counted = _counted(p)
    poison = torch.zeros_like(loss)
    if p.target is not None:
        bad = counted & ((p.target < 0) | (p.target >= vocab))
        poison = torch.where(bad, math.nan, 0.0).to(dt)
    zero = lambda v: v if counted is None else torch.where(counted, v, 0.0)  # noqa: E731
    loss = zero(loss + poison)

    entropy = None
    if p.return_entropy:
        a_q, s_q = (b, s_y) if p.divergence == Divergence.FKL else (a, s_x)
        h_tail = torch.where(s_q == 0, 0.0, torch.log(s_q) - c[Field.ENT] / s_q)
        q_t, q_n = torch.exp(-F.softplus(a_q)), torch.exp(-F.softplus(-a_q))
        entropy = zero(weighted(q_t, F.softplus(a_q)) + weighted(q_n, F.softplus(-a_q) + h_tail) + poison)
    if not want_grad:
        return loss, entropy, None

    z, u, x, y = _sides(p)
    sx, sy = torch.where(s_x == 0, 0.0, m_x).unsqueeze(-1), torch.where(s_y == 0, 0.0, m_y).unsqueeze(-1)
    lsx = torch.where(s_x == 0, 0.0, log_sx).unsqueeze(-1)
    lsy = torch.where(s_y == 0, 0.0, log_sy).unsqueeze(-1)
    col = lambda v: v.unsqueeze(-1)  # noqa: E731
    if p.divergence == Divergence.FKL:
        d = ((x - sx) - (y - sy)) * inv
        py_t, py_n = torch.exp(-F.softplus(b)), torch.exp(-F.softplus(-b))
        g_t = torch.where(px_t + py_t < 1, _exp_diff(px_t, py_t, -d_t), -_exp_diff(px_n, py_n, -d_n))
        rho = torch.log(s_x / s_y) - d_n  # log of (1-q_t) qh_j / ((1-p_t) ph_j), less d_j
        ph, qh = torch.exp((x - sx) * inv - lsx), torch.exp((y - sy) * inv - lsy)
        g = _exp_diff(col(px_n) * ph, col(py_n) * qh, col(rho) - d)
    else:
        # Around the top k (x_k = M_X): d_j - N = (d_j - d_k) + (d_k - N), the first from raw
        # differences, the second from the other tokens' sums; nothing cancels when k dominates.
        if p.divergence == Divergence.RKL:  # q_t (1 - q_t) (gap - N), gap - N = (d_t - d_k) + (d_k - N)
            d_tk = ((x_t - m_x) - (y_t - c[Field.TOP_Y])) * inv
            gap = torch.where(has_k, d_tk + dk_n, gap)
        g_t = weighted(px_t * px_n, gap)
        dd = ((x - sx) - (y - col(torch.where(has_k, c[Field.TOP_Y], 0.0)))) * inv
        g = weighted(torch.exp((x - sx) * inv - lsx), col(w) * dd + col(w * dk_n - g_t))
    positions = torch.arange(start, start + p.vocab, device=z.device, dtype=dt)
    g = torch.where(positions == col(c[Field.PIV]), col(g_t), g)
    g = g + col(poison)
    scale = inv * (mean_grad_scale(p).to(dt) if p.reduction == "mean" else 1.0)
    g = g * transform_grad(p.student, p.student_transform, dt) * scale
    if counted is not None:
        g = torch.where(col(counted), g, 0.0)
    return loss, entropy, g


def forward(p: Problem, want_grad: bool):
    """The single-device computation: the whole row as one slice. Returns (loss rows, entropy
    rows or None, reduction-scaled gradient or None), like the kernel backends' ``forward``."""
    loss, entropy, grad = finish(p, partial(p), want_grad)
    return loss, entropy, None if grad is None else grad.to(p.student.dtype)


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad *= upstream in place (``upstream`` a scalar or one value per row)."""
    grad.mul_((upstream if upstream.dim() == 0 else upstream.reshape(-1, 1)).to(grad.dtype))


class ReferenceDivergence(torch.autograd.Function):
    """Loss (and entropy) in forward; the gradient in backward, recomputed from the saved logits."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, p: Problem):
        ctx.p = p
        loss, entropy, _ = forward(p, False)
        return reduced(ctx, p, loss, entropy)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        p = ctx.p
        _, _, grad = finish(p, partial(p), True)
        weight = grad_loss.reshape(-1, 1) if p.reduction == "none" else grad_loss
        return (grad * weight.to(grad.dtype)).to(p.student.dtype), None


def reference_loss(p: Problem):
    """The loss (and entropy) of a validated problem; differentiable when the student requires grad."""
    return ReferenceDivergence.apply(p.student, p)
