"""Triton backend: one kernel skeleton, the divergence a compile-time switch.

One program per row makes two passes over vocabulary blocks.

1. Streaming pass (online softmax, O(1) state). Each row is split around a
   pivot token t (``Pivot``: the label, or a running argmax). Let x be the
   side that weights the expectation (student for RKL and DRKL, teacher for
   FKL) and y the other. Over the tokens j != t, in raw-logit units with
   running maxima m_x and m_y:

       S_x = sum_j exp((x_j - m_x) / tau)          S_y likewise
       A   = sum_j exp((x_j - m_x) / tau) * ((x_j - m_x) - (y_j - m_y)) / tau

   so N = KL(xh || yh) = A / S_x - log S_x + log S_y over the renormalised
   non-pivot distributions (SPEC §2). A running argmax leaves the block's
   best slot out of the sums and folds the previous best back in when it is
   overtaken (no extra pass). Differences are taken in raw units before the
   1/tau scaling, so logits of 1e4 with tau = 0.05 stay exact in float32.
2. From the pivot values: log x_t = -softplus(a), log(1 - x_t) = -softplus(-a)
   with a = Ls'_x - x_t (never 1 - x_t), the binary KL B, and

       DRKL = B + gamma * N      RKL = B + (1 - q_t) N      FKL = B + (1 - p_t) N

3. Gradient pass, in the same launch when the student needs a gradient: it
   re-reads the row and writes dL/dz (SPEC §3, regrouped around t so that
   confident rows stay exact), times 1/n_valid for "mean", in the student
   dtype, into a new buffer or into the student logits.

Traffic per element, bf16: loss alone 4 bytes; loss + gradient 10 bytes
(student and teacher read twice, gradient written once). Memory: the gradient
(none in place) and one float32 loss per row. Nothing synchronises the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .problem import Divergence, Pivot, Problem
from .reduction import mean_grad_scale

FKL: tl.constexpr = tl.constexpr(int(Divergence.FKL))
DRKL: tl.constexpr = tl.constexpr(int(Divergence.DRKL))
LABEL: tl.constexpr = tl.constexpr(int(Pivot.LABEL))
STUDENT_ARGMAX: tl.constexpr = tl.constexpr(int(Pivot.STUDENT_ARGMAX))


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], exact for tiny x (Goldberg's trick; Triton has no portable log1p)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 for |x| < 1, exact for tiny x (Kahan's trick; Triton has no portable expm1)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, (u - 1.0) * (x / tl.log(u)))


@triton.jit
def _exp_diff(x, y, log_ratio):
    """y - x given log(y / x), through expm1 where the two nearly cancel."""
    return tl.where(tl.abs(log_ratio) < 0.5, x * _expm1(log_ratio), y - x)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow or cancellation in either tail."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _binary_log_ratios(a, b, gap):
    """d_t = softplus(b) - softplus(a) and d_n = softplus(-b) - softplus(-a) given gap = b - a.

    With softplus(x) = max(x, 0) + log1p(exp(-|x|)), the max parts cancel into +-gap when a and b
    share a sign, so d_t - d_n = gap exactly and neither is a difference of two ~log V values.
    """
    tails = _log1p(tl.exp(-tl.abs(b))) - _log1p(tl.exp(-tl.abs(a)))
    d_t = tl.where((a > 0) & (b > 0), gap, tl.maximum(b, 0.0) - tl.maximum(a, 0.0)) + tails
    d_n = tl.where((a < 0) & (b < 0), -gap, tl.maximum(-b, 0.0) - tl.maximum(-a, 0.0)) + tails
    return d_t, d_n


@triton.jit
def _weighted(a, d):
    """a * d, with a == 0 terms exactly 0 (so -inf logits give 0, never NaN; a NaN stays NaN)."""
    return tl.where(a == 0, 0.0, a * d)


@triton.jit
def _online_update(m_x, s_x, m_y, s_y, acc, x, y, inv_tau):
    """Fold one block of raw logits into the running row state (see module docstring)."""
    new_m_x = tl.maximum(m_x, tl.max(x, 0))
    new_m_y = tl.maximum(m_y, tl.max(y, 0))
    # Shifts must be finite: an all -inf prefix has max -inf and shift 0.
    shift_x = tl.where(new_m_x == float("-inf"), 0.0, new_m_x)
    shift_y = tl.where(new_m_y == float("-inf"), 0.0, new_m_y)
    old_x = tl.where(m_x == float("-inf"), 0.0, m_x)
    old_y = tl.where(m_y == float("-inf"), 0.0, m_y)
    alpha_x = tl.exp((m_x - shift_x) * inv_tau)
    alpha_y = tl.exp((m_y - shift_y) * inv_tau)
    dx = (x - shift_x) * inv_tau
    dy = (y - shift_y) * inv_tau
    e_x = tl.exp(dx)
    # Re-reference the old A to the new maxima, then add the block's terms.
    moved = ((old_x - shift_x) - (old_y - shift_y)) * inv_tau
    acc = alpha_x * (acc + s_x * moved) + tl.sum(_weighted(e_x, dx - dy), 0)
    s_x = alpha_x * s_x + tl.sum(e_x, 0)
    s_y = alpha_y * s_y + tl.sum(tl.exp(dy), 0)
    return new_m_x, s_x, new_m_y, s_y, acc


@triton.jit
def divergence_kernel(
    z_ptr, u_ptr, t_ptr, loss_ptr, g_ptr, scale_ptr,
    z_stride, u_stride, g_stride, V, inv_tau, gamma, ignore_index,
    DIVERGENCE: tl.constexpr, PIVOT: tl.constexpr, HAS_LABEL: tl.constexpr,
    WRITE_GRAD: tl.constexpr, MEAN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Loss (and gradient) of one row: ``z`` student, ``u`` teacher logits, raw."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    u_row = u_ptr + row * u_stride
    g_row = g_ptr + row * g_stride
    lanes = tl.arange(0, BLOCK)

    counted = True
    poison = 0.0  # NaN for a label outside [0, V): never read out of bounds, never silent
    if HAS_LABEL:
        label = tl.load(t_ptr + row)
        counted = label != ignore_index
        in_range = (label >= 0) & (label < V)
        poison = tl.where(in_range, 0.0, float("nan"))
        if PIVOT == LABEL:
            t = tl.where(in_range, label, 0).to(tl.int32)

    if counted:
        m_x = float("-inf")
        m_y = float("-inf")
        s_x = 0.0
        s_y = 0.0
        acc = 0.0
        if PIVOT != LABEL:
            t = tl.full([], -1, tl.int32)
            z_t = tl.full([], float("-inf"), tl.float32)
            u_t = tl.full([], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            u = tl.load(u_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            if PIVOT == LABEL:
                z = tl.where(offs == t, float("-inf"), z)
                u = tl.where(offs == t, float("-inf"), u)
            else:
                if PIVOT == STUDENT_ARGMAX:
                    blk_best = tl.max(z, 0)
                    blk_t = start + tl.argmax(z, 0)
                    overtaken = (blk_best > z_t) | (t < 0)
                else:
                    blk_best = tl.max(u, 0)
                    blk_t = start + tl.argmax(u, 0)
                    overtaken = (blk_best > u_t) | (t < 0)
                blk_z = tl.sum(tl.where(offs == blk_t, z, 0.0), 0)
                blk_u = tl.sum(tl.where(offs == blk_t, u, 0.0), 0)
                # The new best leaves the sums; the old best takes its slot.
                swap = offs == tl.where(overtaken, blk_t, -1)
                z = tl.where(swap, z_t, z)
                u = tl.where(swap, u_t, u)
                t = tl.where(overtaken, blk_t, t)
                z_t = tl.where(overtaken, blk_z, z_t)
                u_t = tl.where(overtaken, blk_u, u_t)
            if DIVERGENCE == FKL:
                m_x, s_x, m_y, s_y, acc = _online_update(m_x, s_x, m_y, s_y, acc, u, z, inv_tau)
            else:
                m_x, s_x, m_y, s_y, acc = _online_update(m_x, s_x, m_y, s_y, acc, z, u, inv_tau)
        if PIVOT == LABEL:
            z_t = tl.load(z_row + t).to(tl.float32)
            u_t = tl.load(u_row + t).to(tl.float32)

        # Pivot split of the weighted side x and the other side y.
        if DIVERGENCE == FKL:
            x_t = u_t
            y_t = z_t
        else:
            x_t = z_t
            y_t = u_t
        log_sx = tl.log(s_x)
        log_sy = tl.log(s_y)
        mean_d = acc / s_x  # E_xh[d], d_j = ((x_j - m_x) - (y_j - m_y)) / tau
        tail = tl.where(s_x == 0, 0.0, mean_d + tl.log(s_y / s_x))  # N, without cancelling log S terms
        a = (m_x - x_t) * inv_tau + log_sx  # Ls'_x - x_t / tau: log x_t = -softplus(a)
        b = (m_y - y_t) * inv_tau + log_sy
        gap = ((m_y - y_t) - (m_x - x_t)) * inv_tau + tl.log(s_y / s_x)  # b - a
        d_t, d_n = _binary_log_ratios(a, b, gap)  # log(x_t / y_t), log((1 - x_t) / (1 - y_t))
        px_t = tl.exp(-_softplus(a))
        px_n = tl.exp(-_softplus(-a))
        if DIVERGENCE == DRKL:
            w = gamma
        else:
            w = px_n
        loss = _weighted(px_t, d_t) + _weighted(px_n, d_n) + w * tail + poison
        tl.store(loss_ptr + row, loss)

        if WRITE_GRAD:
            scale = inv_tau
            if MEAN_SCALE:
                scale = scale * tl.load(scale_ptr)
            if DIVERGENCE == FKL:
                py_t = tl.exp(-_softplus(b))
                py_n = tl.exp(-_softplus(-b))
                # q_t - p_t, from whichever of (q_t, p_t) and (1 - q_t, 1 - p_t) is smaller
                g_t = tl.where(px_t + py_t < 1.0, _exp_diff(px_t, py_t, -d_t), -_exp_diff(px_n, py_n, -d_n))
                # (1 - q_t) qh_j / ((1 - p_t) ph_j) = exp(rho - d_j)
                rho = tl.log(s_x / s_y) - d_n
            else:
                # c of SPEC §3 (d_t - d_n = gap); for RKL the (1 - q_t) weight adds -q_t (1 - q_t) N
                g_t = _weighted(px_t * px_n, gap)
                if DIVERGENCE != DRKL:
                    g_t -= px_t * px_n * tail
            # An empty side has no shift (its terms are all 0).
            shift_x = tl.where(s_x == 0, 0.0, m_x)
            shift_y = tl.where(s_y == 0, 0.0, m_y)
            log_sx = tl.where(s_x == 0, 0.0, log_sx)
            log_sy = tl.where(s_y == 0, 0.0, log_sy)
            # Rows of the gradient sum to zero. When one non-pivot student token holds at
            # least half of the tail (there q_j (d_j - N) cancels), its gradient is
            # rewritten at the end as minus the sum over the others; its own value never
            # enters that sum.
            top = tl.full([], -1, tl.int32)
            top_z = tl.full([], float("-inf"), tl.float32)
            top_g = 0.0
            others = 0.0
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                u = tl.load(u_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                if DIVERGENCE == FKL:
                    dx = (u - shift_x) * inv_tau
                    dy = (z - shift_y) * inv_tau
                    ph = tl.exp(dx - log_sx)
                    # (1 - q_t) qh_j - (1 - p_t) ph_j
                    g = _exp_diff(px_n * ph, py_n * tl.exp(dy - log_sy), rho - (dx - dy))
                else:
                    dx = (z - shift_x) * inv_tau
                    dy = (u - shift_y) * inv_tau
                    # qh_j (w (d_j - N) - g_t): rows sum to -g_t, so the pivot closes them
                    g = _weighted(tl.exp(dx - log_sx), w * ((dx - dy) - mean_d) - g_t)
                g = tl.where(offs == t, g_t, g) + poison
                g = tl.where(offs < V, g, 0.0)
                z = tl.where(offs == t, float("-inf"), z)
                blk_z = tl.max(z, 0)
                blk_top = start + tl.argmax(z, 0)
                blk_g = tl.sum(tl.where(offs == blk_top, g, 0.0), 0)
                rest = tl.sum(tl.where(offs == blk_top, 0.0, g), 0)
                better = blk_z > top_z
                others += tl.where(better, tl.where(top >= 0, top_g, 0.0), blk_g) + rest
                top_g = tl.where(better, blk_g, top_g)
                top = tl.where(better, blk_top, top)
                top_z = tl.where(better, blk_z, top_z)
                tl.store(g_row + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=offs < V)
            if DIVERGENCE == FKL:
                top_p = tl.exp((top_z - shift_y) * inv_tau - log_sy)
            else:
                top_p = tl.exp((top_z - shift_x) * inv_tau - log_sx)
            tl.store(g_row + top, (-others * scale).to(g_ptr.dtype.element_ty), mask=top_p >= 0.5)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                offs = start + lanes
                tl.store(g_row + offs, tl.zeros([BLOCK], g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def scale_rows_kernel(g_ptr, g_stride, V, w_ptr, w_stride, BLOCK: tl.constexpr):
    """g[row] *= w[row * w_stride] in place (w_stride = 0: one scalar); a weight of exactly 1 touches nothing."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row * w_stride).to(tl.float32)
    if w != 1.0:
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            g = tl.load(g_row + offs, mask=offs < V).to(tl.float32)
            tl.store(g_row + offs, (g * w).to(g_ptr.dtype.element_ty), mask=offs < V)


def launch_config(vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): blocks of 16 KiB of 16-bit or fp32 logits at most, so no V spills registers."""
    cap = 8192 if dtype.itemsize <= 2 else 4096
    block = min(cap, max(16, triton.next_power_of_2(vocab)))
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def forward(p: Problem, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row float32 losses and, if ``want_grad``, dL/dz scaled for the reduction (1/n_valid for "mean")."""
    loss = torch.empty(p.rows, dtype=torch.float32, device=p.student.device)
    grad = None
    if want_grad:
        grad = p.student if p.inplace_backward else torch.empty_like(p.student)
    if p.rows == 0:
        return loss, grad
    mean_scale = want_grad and p.reduction == "mean"
    block, warps = launch_config(p.vocab, p.student.dtype)
    g = grad if want_grad else loss
    divergence_kernel[(p.rows,)](
        p.student, p.teacher, p.target if p.target is not None else loss, loss, g,
        mean_grad_scale(p) if mean_scale else loss,
        p.student.stride(0), p.teacher.stride(0), g.stride(0), p.vocab,
        1.0 / p.temperature, p.gamma, p.ignore_index,
        DIVERGENCE=int(p.divergence), PIVOT=int(p.pivot), HAS_LABEL=p.target is not None,
        WRITE_GRAD=want_grad,
        MEAN_SCALE=mean_scale, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return loss, grad


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad *= upstream, in place, on the device; ``upstream`` is a scalar or one float per row."""
    if grad.shape[0] == 0:
        return
    block, warps = launch_config(grad.shape[1], grad.dtype)
    stride = 0 if upstream.dim() == 0 else upstream.stride(0)
    scale_rows_kernel[(grad.shape[0],)](grad, grad.stride(0), grad.shape[1], upstream, stride, BLOCK=block, num_warps=warps)
