"""The reference: plain PyTorch, and the single source of truth for the semantics.

Per row, with s = z / tau, r = u / tau, q = softmax(s), p = softmax(r) (SPEC §1):

    FKL  = sum_i p_i (log p_i - log q_i)
    RKL  = sum_i q_i (log q_i - log p_i)
    DRKL = KL([q_t, 1-q_t] || [p_t, 1-p_t]) + gamma * KL(qh || ph)

where qh, ph are renormalised over the tokens other than the target t. All
three are computed from one split around a pivot token t (``Split``):

    KL(a || b) = KL([a_t, 1-a_t] || [b_t, 1-b_t]) + (1 - a_t) KL(ah || bh)

holds for any t; RKL splits around the student's argmax, FKL around the
teacher's, DRKL around its target with gamma in place of (1 - a_t). With
Ls' the log-sum-exp over the other tokens, log a_t = -softplus(Ls' - a_t) and
log(1 - a_t) = -softplus(a_t - Ls'), so rows where a_t rounds to 1 stay
exact (1 - a_t is never formed). The tail KL is E_ah[d] + log(S_b / S_a)
with d_j = (a_j - max a) - (b_j - max b): no difference of two log-sum-exps.
Terms with zero probability contribute 0; a side with no mass off the pivot
(V == 1, say) has tail KL 0.

The gradient is SPEC §3's, regrouped around the pivot (see ``grad_rows``)
and computed in backward from the saved logits, so double backward and
``torch.autograd.gradcheck`` work. Compute is float32 (float64 for float64
input). Cost: a handful of [rows, V] temporaries in the compute dtype, which
is what the fused kernels avoid. ``inplace_backward`` is ignored here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import Divergence, Problem
from .reduction import reduce_rows, valid_count

NEG_INF = float("-inf")


def _weighted(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """a * d with a == 0 terms exactly 0 (-inf logits give 0, never NaN; NaN stays NaN)."""
    return torch.where(a == 0, torch.zeros_like(a), a * d)


def _exp_diff(x: torch.Tensor, y: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """y - x given log(y / x), through expm1 where the two nearly cancel."""
    return torch.where(log_ratio.abs() < 0.5, x * torch.expm1(log_ratio), y - x)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - rowmax) / temperature in the compute dtype: softmax ignores the shift, and
    shifting before scaling keeps float32 exact for logits of 1e4 with temperature 0.05."""
    x = logits.detach()
    x = x if x.dtype == torch.float64 else x.float()
    return (x - _finite_or_zero(x.amax(-1, keepdim=True))) / temperature


class Split:
    """KL(softmax(x) || softmax(y)) of scaled logits [rows, V], split around tokens t [rows, 1].

    Per row ([rows, 1]): the tail sums s_x = sum_{j != t} exp(dx_j), s_y likewise, with
    dx = x - max_{j != t} x and dy likewise (-inf at t); ``mean_d`` = E_xh[dx - dy];
    ``tail`` = KL(xh || yh); log x_t and log(1 - x_t) (``lx_t``, ``lx_n``), the same for y,
    and the binary log-ratios ``d_t``, ``d_n``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
        is_t = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, t, True)
        x_nt, y_nt = x.masked_fill(is_t, NEG_INF), y.masked_fill(is_t, NEG_INF)
        shift_x = _finite_or_zero(x_nt.amax(-1, keepdim=True))
        shift_y = _finite_or_zero(y_nt.amax(-1, keepdim=True))
        self.dx, self.dy = x_nt - shift_x, y_nt - shift_y
        e_x = self.dx.exp()
        self.s_x, self.s_y = e_x.sum(-1, keepdim=True), self.dy.exp().sum(-1, keepdim=True)
        self.mean_d = _weighted(e_x, self.dx - self.dy).sum(-1, keepdim=True) / self.s_x
        self.tail = torch.where(self.s_x == 0, 0.0, self.mean_d + torch.log(self.s_y / self.s_x))
        gap_x, gap_y = shift_x - x.gather(-1, t), shift_y - y.gather(-1, t)
        a, b = gap_x + self.s_x.log(), gap_y + self.s_y.log()  # Ls'_x - x_t, Ls'_y - y_t
        self.lx_t, self.lx_n = -F.softplus(a), -F.softplus(-a)
        self.ly_t, self.ly_n = -F.softplus(b), -F.softplus(-b)
        # d_t = log(x_t / y_t), d_n = log((1 - x_t) / (1 - y_t)). With softplus(v) = max(v, 0) +
        # log1p(exp(-|v|)), the max parts cancel into +-(b - a) when a and b share a sign, and
        # b - a is formed without the two log S terms, so d_t - d_n = b - a exactly.
        self.gap = (gap_y - gap_x) + torch.log(self.s_y / self.s_x)
        tails = torch.log1p(torch.exp(-b.abs())) - torch.log1p(torch.exp(-a.abs()))
        self.d_t = torch.where((a > 0) & (b > 0), self.gap, b.clamp(min=0) - a.clamp(min=0)) + tails
        self.d_n = torch.where((a < 0) & (b < 0), -self.gap, (-b).clamp(min=0) - (-a).clamp(min=0)) + tails

    def log_tail_probs(self, side: str) -> torch.Tensor:
        """log xh or log yh over [rows, V] (-inf at t; 0 mass gives -inf, not NaN)."""
        d, s = (self.dx, self.s_x) if side == "x" else (self.dy, self.s_y)
        return d - torch.where(s == 0, 0.0, s.log())


def _pivot(p: Problem, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if p.divergence == Divergence.RKL:
        return s.argmax(-1, keepdim=True)
    if p.divergence == Divergence.FKL or p.target is None:
        return p.teacher.argmax(-1, keepdim=True)
    return torch.where(p.target == p.ignore_index, 0, p.target).long().unsqueeze(-1)


def _split(p: Problem):
    s, r = scaled_logits(p.student, p.temperature), scaled_logits(p.teacher, p.temperature)
    t = _pivot(p, s, r)
    return s, t, Split(r, s, t) if p.divergence == Divergence.FKL else Split(s, r, t)


def _valid(p: Problem) -> torch.Tensor | None:
    return None if p.target is None else (p.target != p.ignore_index)


def loss_rows(p: Problem) -> torch.Tensor:
    """Per-row loss in the compute dtype (0 at ignored rows)."""
    _, _, sp = _split(p)
    x_t, x_n = sp.lx_t.exp(), sp.lx_n.exp()
    weight = p.gamma if p.divergence == Divergence.DRKL else x_n
    rows = (_weighted(x_t, sp.d_t) + _weighted(x_n, sp.d_n) + weight * sp.tail).squeeze(-1)
    valid = _valid(p)
    return rows if valid is None else torch.where(valid, rows, 0.0)


def grad_rows(p: Problem) -> torch.Tensor:
    """d(row loss)/dz for every row, [rows, V] in the compute dtype (0 at ignored rows).

    RKL and DRKL (x = student): g_t = c = q_t (1-q_t) (d_t - d_n), less q_t (1-q_t) N
    for RKL, and g_j = qh_j (w (d_j - N) - g_t) for j != t, w = gamma (DRKL) or
    1 - q_t (RKL); d_j - N is formed as (dx_j - dy_j) - E[dx - dy]. FKL (x = teacher):
    g_t = q_t - p_t from the smaller of (q_t, p_t) and (1 - q_t, 1 - p_t), and
    g_j = (1-q_t) qh_j - (1-p_t) ph_j, through expm1 where the two nearly cancel.
    Each row sums to zero; where one student token holds half the tail or more, its
    entry (which cancels) is taken as minus the sum over the others. All over tau.
    """
    s, t, sp = _split(p)
    x_t, x_n = sp.lx_t.exp(), sp.lx_n.exp()
    if p.divergence == Divergence.FKL:
        y_t, y_n = sp.ly_t.exp(), sp.ly_n.exp()
        g_t = torch.where(x_t + y_t < 1, _exp_diff(x_t, y_t, -sp.d_t), -_exp_diff(x_n, y_n, -sp.d_n))
        ph, tail_probs = sp.log_tail_probs("x").exp(), sp.log_tail_probs("y")
        rho = torch.log(sp.s_x / sp.s_y) - sp.d_n  # log of (1-q_t) qh_j / ((1-p_t) ph_j), less d_j
        g = _exp_diff(x_n * ph, y_n * tail_probs.exp(), rho - (sp.dx - sp.dy))
    else:
        weight = p.gamma if p.divergence == Divergence.DRKL else x_n
        g_t = _weighted(x_t * x_n, sp.gap)
        if p.divergence == Divergence.RKL:
            g_t = g_t - x_t * x_n * sp.tail
        tail_probs = sp.log_tail_probs("x")
        g = _weighted(tail_probs.exp(), weight * ((sp.dx - sp.dy) - sp.mean_d) - g_t)
    g = g.scatter(-1, t, g_t)
    top = s.scatter(-1, t, NEG_INF).argmax(-1, keepdim=True)
    closed = -g.scatter(-1, top, 0.0).sum(-1, keepdim=True)
    dominant = tail_probs.gather(-1, top) >= torch.log(torch.tensor(0.5, dtype=g.dtype))
    g = g.scatter(-1, top, torch.where(dominant, closed, g.gather(-1, top)))
    g = g / p.temperature
    valid = _valid(p)
    return g if valid is None else torch.where(valid.unsqueeze(-1), g, 0.0)


class ReferenceDivergence(torch.autograd.Function):
    """Loss in forward; SPEC §3 gradient in backward, recomputed from the saved logits."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, p: Problem) -> torch.Tensor:
        ctx.p = p
        return reduce_rows(p, loss_rows(p))

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        p = ctx.p
        if p.reduction == "none":
            weight = grad_loss.reshape(-1, 1)
        elif p.reduction == "sum":
            weight = grad_loss
        else:
            weight = grad_loss / valid_count(p).clamp(min=1.0)
        return (grad_rows(p) * weight).to(p.student.dtype), None


def reference_loss(p: Problem) -> torch.Tensor:
    """The loss of a validated problem; differentiable when the student requires grad."""
    return ReferenceDivergence.apply(p.student, p)
