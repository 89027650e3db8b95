"""Float64 ground truth, written independently of the package (SPEC §1-§3).

Everything is computed in float64 from the very values a kernel reads
(bf16/fp16 inputs upcast exactly), in log space so that no probability
underflows; zero-probability terms contribute 0.

The gradient is autograd's, in float64, with one correction: each loss is
invariant to adding a constant to a row of logits, so each gradient row sums
to zero. Where one token dominates a distribution, autograd's value there is
a difference of nearly equal numbers (q_k (D_k - E[D]) with q_k ~ 1), which
even float64 can lose entirely when the row's gradient is ~1e-30; the truth
takes that element as minus the sum of the others instead. DRKL applies it
to its two terms separately: the binary term at the target, the non-target
term at its most probable token.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _lsm(x):
    return x - torch.logsumexp(x, -1, keepdim=True)


def _softplus(x):
    """log(1 + exp(x)) in float64, exact in both tails, with the derivative sigmoid(x) everywhere
    (a form through |x| would give autograd's derivative 0 at x == 0, i.e. at exact ties)."""
    return torch.logaddexp(torch.zeros_like(x), x)


def _kl(log_a, log_b):
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)


def _rkl_grad(zt, ut, temperature, keep=None):
    """d KL(q || p) / d zt per row, for q = softmax(zt / tau) and p = softmax(ut / tau) over the
    tokens in ``keep``: q_j (w_j - E_q[w]) / tau with w = s - r, the log-sum-exps cancelling. Each
    w_j is formed from exact float64 differences to the student's most probable token m before its
    one rounding, ((zt_j - zt_m) - (ut_j - ut_m)) / tau, so that two tokens whose logit differences
    agree on both sides (w_j = w_m, e.g. bf16 logits of 1e4 at tau = 20) give exactly w_j = 0, where
    autograd through log-softmaxes of zt / tau would leave ~1e-13 of rounding in a row whose whole
    gradient can be ~1e-30."""
    zt, ut = zt.detach(), ut.detach()
    if keep is not None:
        zt, ut = zt.masked_fill(~keep, NEG_INF), ut.masked_fill(~keep, NEG_INF)
    q = _lsm(zt / temperature).exp()
    q = torch.where(q > 0, q, 0.0)  # (and 0 for a row with no tokens, whose log-softmax is NaN)
    m = zt.argmax(-1, keepdim=True)
    w = torch.where(q > 0, ((zt - zt.gather(-1, m)) - (ut - ut.gather(-1, m))) / temperature, 0.0)
    return q * (w - (q * w).sum(-1, keepdim=True)) / temperature


def _terms(kind, zt, ut, t, gamma, temperature):
    """Per-row loss pieces [(rows, weight, token whose gradient closes the row, explicit d rows / d zt
    or None for autograd's)]."""
    s, r = zt / temperature, ut / temperature
    if kind == "rkl":
        return [(_kl(_lsm(s), _lsm(r)), 1.0, s.argmax(-1), _rkl_grad(zt, ut, temperature))]
    if kind == "fkl":
        return [(_kl(_lsm(r), _lsm(s)), 1.0, s.argmax(-1), None)]
    hit = torch.nn.functional.one_hot(t, s.shape[-1]).bool()
    s_nt, r_nt = s.masked_fill(hit, NEG_INF), r.masked_fill(hit, NEG_INF)
    has_tail = (s_nt > NEG_INF).any(-1)
    # (rows without student tail mass take their log-sum-exp over zeros, then -inf: no NaN in autograd)
    ls_nt = torch.logsumexp(s_nt.masked_fill(~has_tail[:, None], 0.0), -1).masked_fill(~has_tail, NEG_INF)
    lr_nt = torch.logsumexp(r_nt, -1)
    # log q_t = -softplus(Ls' - s_t), log(1 - q_t) = -softplus(s_t - Ls'): both exact when q_t ~ 1 or ~ 0
    gap_q, gap_p = (s[hit] - ls_nt).unsqueeze(-1), (r[hit] - lr_nt).unsqueeze(-1)
    binary = _kl(-_softplus(torch.cat([-gap_q, gap_q], -1)), -_softplus(torch.cat([-gap_p, gap_p], -1)))
    tail = torch.zeros(s.shape[0], dtype=s.dtype)
    if has_tail.any():
        tail[has_tail] = _kl(_lsm(s_nt[has_tail]), _lsm(r_nt[has_tail]))
    tail_grad = _rkl_grad(zt, ut, temperature, ~hit & has_tail[:, None])
    return [(binary, 1.0, t, None), (tail.detach(), gamma, s_nt.detach().argmax(-1), tail_grad)]


def transform(x, scale=1.0, softcap=None):
    """SPEC §4's logit transform in float64, and its derivative (1 - tanh^2 without cancelling)."""
    y = x * scale
    if softcap is None:
        return y, torch.full_like(x, scale)
    e = torch.exp(-2 * (y / softcap).abs())
    return softcap * torch.tanh(y / softcap), scale * 4 * e / (1 + e) ** 2


def _divisor(valid, num_items_in_batch):
    if num_items_in_batch is None:
        return valid.sum().clamp(min=1)
    return torch.as_tensor(num_items_in_batch, dtype=torch.float64).cpu().clamp(min=1)


def loss_and_grad(kind, student, teacher, target, *, reduction="mean", upstream=None, gamma=0.5, temperature=1.0,
                  ignore_index=-100, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                  teacher_softcap=None, num_items_in_batch=None, return_entropy=False, perturb=None):  # fmt: skip
    """Float64 reduced loss of ``kind`` in {"fkl", "rkl", "drkl"} and d(loss * upstream)/d(student);
    with ``return_entropy``, also the student's entropy H(q) reduced like the loss. ``perturb``: a
    pair ``(dz, du)`` (shaped like the logits) added to the transformed logits of each side, to
    measure how a rounding of them moves the result."""
    V = student.shape[-1]
    zt, dzt = transform(student.detach().double().reshape(-1, V), student_logit_scale, student_softcap)
    ut, _ = transform(teacher.detach().double().reshape(-1, V), teacher_logit_scale, teacher_softcap)
    if perturb is not None:
        zt, ut = zt + perturb[0].reshape(-1, V), ut + perturb[1].reshape(-1, V)
    zt = zt.requires_grad_(True)
    s, r = zt / temperature, ut / temperature
    rows = s.shape[0]
    valid = torch.ones(rows, dtype=torch.bool) if target is None else target.reshape(-1) != ignore_index
    if kind == "drkl":
        t = ut.argmax(-1) if target is None else torch.where(valid, target.reshape(-1), 0).long()
    else:
        t = None
    # d(loss * upstream)/d(row loss), per row
    if reduction == "none":
        weight = torch.ones(rows, dtype=torch.float64) if upstream is None else upstream.double().reshape(-1)
    else:
        weight = torch.full((rows,), 1.0 if upstream is None else float(upstream), dtype=torch.float64)
        if reduction == "mean":
            weight = weight / _divisor(valid, num_items_in_batch)
    weight = torch.where(valid, weight, 0.0)

    loss_rows = torch.zeros(rows, dtype=torch.float64)
    grad = torch.zeros_like(zt)
    for piece, factor, close, explicit in _terms(kind, zt, ut, t, gamma, temperature):
        piece = torch.where(valid, piece, torch.zeros_like(piece))
        loss_rows = loss_rows + factor * piece.detach()
        if factor and (explicit is not None or piece.requires_grad):
            if explicit is None:
                (g,) = torch.autograd.grad((piece * weight).sum(), zt, retain_graph=True)
            else:
                g = explicit * weight.unsqueeze(-1)
            k = close.unsqueeze(-1)
            g = g.scatter(-1, k, -g.scatter(-1, k, 0.0).sum(-1, keepdim=True))
            grad = grad + factor * g
    grad = grad * dzt  # the closure holds for the transformed logits; then the chain rule
    reduce = lambda v: _reduce(v, valid, reduction, num_items_in_batch, student.shape[:-1])  # noqa: E731
    out = (reduce(loss_rows), grad.reshape(student.shape))
    if return_entropy:
        ls = _lsm(s.detach())
        q = ls.exp()
        h = -(q * torch.where(q > 0, ls, torch.zeros_like(ls))).sum(-1)
        out += (reduce(torch.where(valid, h, 0.0)),)
    return out


def _reduce(rows, valid, reduction, num_items_in_batch, lead_shape):
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    return total / _divisor(valid, num_items_in_batch) if reduction == "mean" else total
