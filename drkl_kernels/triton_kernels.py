"""Triton backend: one kernel skeleton; the divergence, the phase and the options are
compile-time switches. One program per row.

Values. Each side's logits are transformed on load, in every pass (``Transform``):
``v = scale * x``, then ``cap * tanh(v / cap)`` when the side has a soft cap (tanh as
``1 - 2e / (1 + e)``, ``e = exp(-2|w|)``, and below |w| = 0.9 as an odd minimax polynomial, so
small arguments stay exact). The student's gradient is chained through ``scale * 4e / (1 + e)^2``
(``scale * sech^2``, no ``1 - tanh^2`` cancellation).

Stream pass: the record of ``record.py`` over the slice, O(1) state per row, in blocks of up to
4096 tokens (8 per thread). Let x be the side that weights the expectation (student for RKL and
DRKL, teacher for FKL), y the other. The pivot t (the label, or the running first argmax of the
pivot side) is left out of every sum. For RKL and DRKL the *top* k (first index of the largest
x_j, j != t) is held out of the x sums and

    S_X = sum e_j,  e_j = exp((x_j - x_k) / tau),  ACC = sum e_j ((x_j - x_k) - (y_j - y_k)) / tau,
    ENT = sum e_j (x_j - x_k) / tau                   over j != t, k

FKL needs no top: S_X and ACC relative to the maxima of both sides, ENT over the S_Y terms.
M_Y and S_Y run over j != t (the top included). Each block's record (its own top and sums) is
merged into the running one as ``record._merge_tails`` merges slices: the better top stays and
the loser's sums and its top's own term are re-referenced to it (scaled by exp((x_l - x_k) /
tau), ACC's differences moved by d_l - d_k); a pivot that a block overtakes joins as a one-token
record. Block reductions: max with index (pivot, top) and its payload, max of y, four sums.
Differences are taken in logit units before the 1/tau scaling, so logits of 1e4 at tau = 0.05
stay exact in float32.

Finish (``reference.finish``): the top back in, d_k - N = -ACC / (S_X + 1); with
a = Ls'_x - x_t / tau, log x_t = -softplus(a), log(1 - x_t) = -softplus(-a) (1 - x_t never
formed); DRKL = B + gamma N, RKL = B + (1 - q_t) N, FKL = B + (1 - p_t) N; the student's entropy
H = q_t softplus(a_q) + (1 - q_t)(softplus(-a_q) + log S_q - ENT / S_q).

Gradient pass: re-reads the slice and writes, for RKL and DRKL,

    g_j = qh_j (w ((x_j - x_k) - (y_j - y_k)) / tau + K),   K = w (d_k - N) - g_t,

w = gamma (DRKL) or 1 - q_t (RKL), g_t = q_t (1 - q_t)(gap [- N]) at the pivot; nothing cancels
where k holds most of the tail and the rows sum to zero with no second reduction. FKL:
g_j = (1 - q_t) qh_j - (1 - p_t) ph_j through expm1 where the two nearly cancel. Times the
transform's slope, 1/tau and the "mean" scale; in the student's dtype, into a new buffer or
into the student logits. Labels outside ``[0, vocab_total)`` make the row NaN (never read).

Phases (``Phase``): FUSED (``forward``: stream, finish and gradient in one launch; the record
never leaves the chip), PARTIAL (``partial``: the stream pass over the slice ``[vocab_start,
+V)``, writes the ``[rows, record.WIDTH]`` float32 record with global token ids), FINISH
(``finish``: reads the merged record, writes loss and entropy rows and the slice's gradient).

Traffic per element, bf16 inputs: 4 bytes for the loss (or a partial record); 10 bytes for
loss + gradient (student and teacher read twice, the gradient written once); 6 bytes for
FINISH's gradient. Ignored rows read nothing. Memory: the gradient (none in place), a float32
loss (and entropy) per row, ``4 * WIDTH`` bytes per row for a record. Nothing synchronises the
host. Under ``TRITON_INTERPRET=1`` bf16 is converted through its bits (``BF16_BY_HAND``): the
interpreter truncates float32 -> bf16 instead of rounding to nearest even, and mangles subnormals
both ways; on a GPU the switch is off and the conversions are the hardware's.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import record
from .problem import Divergence, Pivot, Problem
from .reduction import mean_grad_scale


class Phase(enum.IntEnum):
    """What one launch computes (compile-time switch)."""

    FUSED = 0  # stream, finish and gradient: the single-device forward
    PARTIAL = 1  # the record of a slice
    FINISH = 2  # loss, entropy and the slice's gradient from a merged record


FKL: tl.constexpr = tl.constexpr(int(Divergence.FKL))
RKL: tl.constexpr = tl.constexpr(int(Divergence.RKL))
DRKL: tl.constexpr = tl.constexpr(int(Divergence.DRKL))
LABEL: tl.constexpr = tl.constexpr(int(Pivot.LABEL))
STUDENT_ARGMAX: tl.constexpr = tl.constexpr(int(Pivot.STUDENT_ARGMAX))
FUSED: tl.constexpr = tl.constexpr(int(Phase.FUSED))
PARTIAL: tl.constexpr = tl.constexpr(int(Phase.PARTIAL))
FINISH: tl.constexpr = tl.constexpr(int(Phase.FINISH))
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
F_M_X: tl.constexpr = tl.constexpr(int(record.Field.M_X))
F_S_X: tl.constexpr = tl.constexpr(int(record.Field.S_X))
F_M_Y: tl.constexpr = tl.constexpr(int(record.Field.M_Y))
F_S_Y: tl.constexpr = tl.constexpr(int(record.Field.S_Y))
F_ACC: tl.constexpr = tl.constexpr(int(record.Field.ACC))
F_ENT: tl.constexpr = tl.constexpr(int(record.Field.ENT))
F_TOP: tl.constexpr = tl.constexpr(int(record.Field.TOP))
F_TOP_Y: tl.constexpr = tl.constexpr(int(record.Field.TOP_Y))
F_PIV: tl.constexpr = tl.constexpr(int(record.Field.PIV))
F_PIV_Z: tl.constexpr = tl.constexpr(int(record.Field.PIV_Z))
F_PIV_U: tl.constexpr = tl.constexpr(int(record.Field.PIV_U))
WIDTH: tl.constexpr = tl.constexpr(record.WIDTH)


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
def _shift(m):
    """A running maximum as a finite reference: 0 for -inf (a side with no mass)."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _tanh(w):
    """tanh(w) for w >= 0 to about float32 rounding (Triton has no portable tanh). Below 0.9,
    w + w s P(s) with s = w^2 and P the weighted minimax fit of (tanh(w) - w) / (w s) of degree 6
    (1.1e-9 relative); above, 1 - 2e / (1 + e) with e = exp(-2w) <= 0.17. (1 - e) / (1 + e) alone
    would lose the digits of small w."""
    s = w * w
    p = -0.0004554526707857623 * s + 0.0025826473316389043
    p = p * s - 0.008264520989701804
    p = p * s + 0.0216635297149987
    p = p * s - 0.05392929789632227
    p = p * s + 0.1333297821297786
    p = p * s - 0.33333322261005444
    e = tl.exp(-2.0 * w)
    return tl.where(w < 0.9, w + w * (s * p), 1.0 - 2.0 * e / (1.0 + e))


@triton.jit
def _load_f32(ptr, offs, mask, BF16_BY_HAND: tl.constexpr):
    """``ptr[offs]`` as float32 (0 where masked). ``BF16_BY_HAND`` (the interpreter, whose bf16
    conversions mangle subnormals) widens bf16 from its bits."""
    if BF16_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, value, mask, BF16_BY_HAND: tl.constexpr):
    """Store float32 values in ``ptr``'s dtype, rounded to nearest even. ``BF16_BY_HAND`` (the
    interpreter, which truncates to bf16) rounds bf16 from the bits, NaN as torch's 0x7FC0."""
    if BF16_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        bits = tl.where(value != value, 0x7FC0, bits).to(tl.uint16)
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, bits, mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load(row_ptr, offs, valid, scale, cap, CAP: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """Transformed logits of one block (-inf where not ``valid``) and the transform's slope.

    T(x) = cap tanh(scale x / cap) (or scale x); T'(x) = scale 4e / (1 + e)^2, e = exp(-2|w|)."""
    v = _load_f32(row_ptr, offs, valid, BF16_BY_HAND) * scale
    slope = scale
    if CAP:
        w = tl.abs(v / cap)
        th = _tanh(w)
        v = cap * tl.where(v < 0, -th, th)
        e = tl.exp(-2.0 * w)
        slope = scale * 4.0 * e / ((1.0 + e) * (1.0 + e))
    return tl.where(valid, v, NEG_INF), slope


@triton.jit
def _merge_top(a_mx, a_sx, a_acc, a_ent, a_k, a_yk, b_mx, b_sx, b_acc, b_ent, b_k, b_yk, inv_tau):
    """RKL, DRKL: the x sums of two records around the better top (``record._merge_tails``, step 3).

    The larger x wins, ties to the smaller id, a real token over none; the loser's terms and its top's
    own term join the winner's sums, scaled by exp((x_l - x_k) / tau), ACC's differences moved by
    d_l - d_k and ENT's by (x_l - x_k) / tau. Returns (M_X, S_X, ACC, ENT, TOP, TOP_Y)."""
    a_wins = (a_k >= 0) & ((b_k < 0) | (a_mx > b_mx) | ((a_mx == b_mx) & (a_k < b_k)))
    w_mx = tl.where(a_wins, a_mx, b_mx)
    w_yk = tl.where(a_wins, a_yk, b_yk)
    l_mx = tl.where(a_wins, b_mx, a_mx)
    l_yk = tl.where(a_wins, b_yk, a_yk)
    terms = tl.where(a_wins, b_sx, a_sx) + tl.where(tl.where(a_wins, b_k, a_k) >= 0, 1.0, 0.0)
    x_k = _shift(w_mx)
    scale = tl.exp((l_mx - x_k) * inv_tau)
    delta = ((l_mx - x_k) - (l_yk - w_yk)) * inv_tau
    moved = (l_mx - x_k) * inv_tau
    s_x = tl.where(a_wins, a_sx, b_sx) + scale * terms
    acc = tl.where(a_wins, a_acc, b_acc) + _weighted(scale, tl.where(a_wins, b_acc, a_acc) + _weighted(terms, delta))
    ent = tl.where(a_wins, a_ent, b_ent) + _weighted(scale, tl.where(a_wins, b_ent, a_ent) + _weighted(terms, moved))
    return w_mx, s_x, acc, ent, tl.where(a_wins, a_k, b_k), w_yk


@triton.jit
def _merge_sum(a_m, a_s, b_m, b_s, inv_tau):
    """Two sums of exp((v - shift(m)) / tau) at their maxima -> at the common maximum."""
    m = tl.maximum(a_m, b_m)
    return m, tl.exp((a_m - _shift(m)) * inv_tau) * a_s + tl.exp((b_m - _shift(m)) * inv_tau) * b_s


@triton.jit
def _merge_fkl(a_mx, a_sx, a_my, a_sy, a_acc, a_ent, b_mx, b_sx, b_my, b_sy, b_acc, b_ent, inv_tau):
    """FKL: two records raised to the common maxima and added (``record._raise``). Returns
    (M_X, S_X, M_Y, S_Y, ACC, ENT); ACC's differences are relative to both maxima, ENT's to M_Y."""
    m_x = tl.maximum(a_mx, b_mx)
    m_y = tl.maximum(a_my, b_my)
    sx = _shift(m_x)
    sy = _shift(m_y)
    a_ax = tl.exp((a_mx - sx) * inv_tau)
    a_ay = tl.exp((a_my - sy) * inv_tau)
    b_ax = tl.exp((b_mx - sx) * inv_tau)
    b_ay = tl.exp((b_my - sy) * inv_tau)
    a_dy = (_shift(a_my) - sy) * inv_tau
    b_dy = (_shift(b_my) - sy) * inv_tau
    acc = a_ax * (a_acc + a_sx * ((_shift(a_mx) - sx) * inv_tau - a_dy))
    acc += b_ax * (b_acc + b_sx * ((_shift(b_mx) - sx) * inv_tau - b_dy))
    ent = a_ay * (a_ent + a_sy * a_dy) + b_ay * (b_ent + b_sy * b_dy)
    return m_x, a_ax * a_sx + b_ax * b_sx, m_y, a_ay * a_sy + b_ay * b_sy, acc, ent


@triton.jit
def _stream(z_row, u_row, V, t, z_scale, z_cap, u_scale, u_cap, inv_tau,
            DIVERGENCE: tl.constexpr, PIVOT: tl.constexpr,
            Z_CAP: tl.constexpr, U_CAP: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The record of local tokens [0, V) (see the module docstring); ``t`` the label's local index
    (-1: none) when PIVOT == LABEL. Each block's record is merged into the running one, then a
    pivot the block overtook joins as a one-token record (``record.token``). Returns the fields in
    ``record.Field`` order, ids local."""
    lanes = tl.arange(0, BLOCK)
    m_x = NEG_INF
    s_x = 0.0
    m_y = NEG_INF
    s_y = 0.0
    acc = 0.0
    ent = 0.0
    top = tl.full([], -1, tl.int32)
    top_y = 0.0
    if PIVOT != LABEL:
        t = tl.full([], -1, tl.int32)
    z_t = NEG_INF
    u_t = NEG_INF
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z, _ = _load(z_row, offs, offs < V, z_scale, z_cap, Z_CAP, BF16_BY_HAND)
        u, _ = _load(u_row, offs, offs < V, u_scale, u_cap, U_CAP, BF16_BY_HAND)
        if PIVOT == LABEL:
            z = tl.where(offs == t, NEG_INF, z)
            u = tl.where(offs == t, NEG_INF, u)
        else:
            # The block's first best key; the pivot it overtakes (none at first) becomes a token.
            if PIVOT == STUDENT_ARGMAX:
                blk_z, lane = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
                blk_u = tl.sum(tl.where(lanes == lane, u, 0.0), 0)
                overtaken = (blk_z > z_t) | (t < 0)
            else:
                blk_u, lane = tl.max(u, 0, return_indices=True, return_indices_tie_break_left=True)
                blk_z = tl.sum(tl.where(lanes == lane, z, 0.0), 0)
                overtaken = (blk_u > u_t) | (t < 0)
            gone = tl.where(overtaken, t, -1)
            gone_z = tl.where(overtaken, z_t, NEG_INF)
            gone_u = tl.where(overtaken, u_t, NEG_INF)
            hidden = lanes == tl.where(overtaken, lane, -1)
            z = tl.where(hidden, NEG_INF, z)
            u = tl.where(hidden, NEG_INF, u)
            t = tl.where(overtaken, start + lane, t)
            z_t = tl.where(overtaken, blk_z, z_t)
            u_t = tl.where(overtaken, blk_u, u_t)
        if DIVERGENCE == FKL:
            x = u
            y = z
        else:
            x = z
            y = u
        b_my = tl.max(y, 0)
        dy = (y - _shift(b_my)) * inv_tau
        f = tl.exp(dy)
        if DIVERGENCE == FKL:
            b_mx = tl.max(x, 0)
            dx = (x - _shift(b_mx)) * inv_tau
            e = tl.exp(dx)
            m_x, s_x, m_y, s_y, acc, ent = _merge_fkl(
                m_x, s_x, m_y, s_y, acc, ent, b_mx, tl.sum(e, 0), b_my, tl.sum(f, 0),
                tl.sum(_weighted(e, dx - dy), 0), tl.sum(_weighted(f, dy), 0), inv_tau)  # fmt: skip
            if PIVOT != LABEL:  # the overtaken pivot: S_X = 1 and ACC = d of its own when x is real
                one_x = tl.where(gone_u > NEG_INF, 1.0, 0.0)
                m_x, s_x, m_y, s_y, acc, ent = _merge_fkl(
                    m_x, s_x, m_y, s_y, acc, ent, gone_u, one_x, gone_z, tl.where(gone_z > NEG_INF, 1.0, 0.0),
                    _weighted(one_x, ((gone_u - _shift(gone_u)) - (gone_z - _shift(gone_z))) * inv_tau), 0.0,
                    inv_tau)  # fmt: skip
        else:
            # The block's top: its first largest x, out of its sums, which are relative to it.
            b_mx, b_lane = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            b_yk = tl.sum(tl.where(lanes == b_lane, y, 0.0), 0)
            real = b_mx > NEG_INF
            e = tl.where(lanes == b_lane, 0.0, tl.exp((x - _shift(b_mx)) * inv_tau))
            m_x, s_x, acc, ent, top, top_y = _merge_top(
                m_x, s_x, acc, ent, top, top_y, b_mx, tl.sum(e, 0),
                tl.sum(_weighted(e, ((x - b_mx) - (y - b_yk)) * inv_tau), 0),
                tl.sum(_weighted(e, (x - _shift(b_mx)) * inv_tau), 0),
                tl.where(real, start + b_lane, -1), tl.where(real, b_yk, 0.0), inv_tau)  # fmt: skip
            m_y, s_y = _merge_sum(m_y, s_y, b_my, tl.sum(f, 0), inv_tau)
            if PIVOT != LABEL:  # the overtaken pivot: a candidate top with no terms of its own
                m_x, s_x, acc, ent, top, top_y = _merge_top(
                    m_x, s_x, acc, ent, top, top_y, gone_z, 0.0, 0.0, 0.0,
                    tl.where(gone_z > NEG_INF, gone, -1), tl.where(gone_z > NEG_INF, gone_u, 0.0), inv_tau)  # fmt: skip
                m_y, s_y = _merge_sum(m_y, s_y, gone_u, tl.where(gone_u > NEG_INF, 1.0, 0.0), inv_tau)
    held = t >= 0
    if PIVOT == LABEL:
        z_t, _ = _load(z_row, tl.where(held, t, 0), held, z_scale, z_cap, Z_CAP, BF16_BY_HAND)
        u_t, _ = _load(u_row, tl.where(held, t, 0), held, u_scale, u_cap, U_CAP, BF16_BY_HAND)
    z_t = tl.where(held, z_t, 0.0)
    u_t = tl.where(held, u_t, 0.0)
    return m_x, s_x, m_y, s_y, acc, ent, top, top_y, t, z_t, u_t


@triton.jit
def divergence_kernel(
    z_ptr, u_ptr, t_ptr, rec_ptr, loss_ptr, ent_ptr, g_ptr, scale_ptr,
    z_stride, u_stride, g_stride, V, vocab_start, vocab_total, inv_tau, gamma, ignore_index,
    z_scale, z_cap, u_scale, u_cap,
    DIVERGENCE: tl.constexpr, PIVOT: tl.constexpr, HAS_LABEL: tl.constexpr, PHASE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, MEAN_SCALE: tl.constexpr, ENTROPY: tl.constexpr,
    Z_CAP: tl.constexpr, U_CAP: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: ``z`` student and ``u`` teacher logits of the slice [vocab_start, +V), raw; ``rec``
    the row's record (written by PARTIAL, read by FINISH)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    u_row = u_ptr + row * u_stride
    rec_row = rec_ptr + row * WIDTH
    lanes = tl.arange(0, BLOCK)

    counted = tl.full([], 1, tl.int1)
    poison = 0.0  # NaN for a label outside [0, vocab_total): never read out of bounds, never silent
    t = tl.full([], -1, tl.int32)
    if HAS_LABEL:
        label = tl.load(t_ptr + row)
        counted = label != ignore_index
        poison = tl.where((label >= 0) & (label < vocab_total), 0.0, float("nan"))
        if PIVOT == LABEL:
            local = label - vocab_start
            t = tl.where(counted & (local >= 0) & (local < V), local, -1).to(tl.int32)

    V_row = tl.where(counted, V, 0)  # an ignored row reads nothing (and streams an empty record)
    if PHASE == FINISH:
        m_x = tl.load(rec_row + F_M_X).to(tl.float32)
        s_x = tl.load(rec_row + F_S_X).to(tl.float32)
        m_y = tl.load(rec_row + F_M_Y).to(tl.float32)
        s_y = tl.load(rec_row + F_S_Y).to(tl.float32)
        acc = tl.load(rec_row + F_ACC).to(tl.float32)
        ent = tl.load(rec_row + F_ENT).to(tl.float32)
        top = tl.load(rec_row + F_TOP).to(tl.float32)
        top_y = tl.load(rec_row + F_TOP_Y).to(tl.float32)
        piv = tl.load(rec_row + F_PIV).to(tl.float32)
        z_t = tl.load(rec_row + F_PIV_Z).to(tl.float32)
        u_t = tl.load(rec_row + F_PIV_U).to(tl.float32)
        # ids are global; -1 stays out of the slice's range
        t = tl.where(piv >= 0, piv.to(tl.int32) - vocab_start, -1)
    else:
        m_x, s_x, m_y, s_y, acc, ent, k, top_y, t, z_t, u_t = _stream(
            z_row, u_row, V_row, t, z_scale, z_cap, u_scale, u_cap, inv_tau,
            DIVERGENCE, PIVOT, Z_CAP, U_CAP, BF16_BY_HAND, BLOCK)  # fmt: skip
        top = tl.where(k >= 0, (k + vocab_start).to(tl.float32), -1.0)
    if PHASE == PARTIAL:
        tl.store(rec_row + F_M_X, m_x)
        tl.store(rec_row + F_S_X, s_x)
        tl.store(rec_row + F_M_Y, m_y)
        tl.store(rec_row + F_S_Y, s_y)
        tl.store(rec_row + F_ACC, acc)
        tl.store(rec_row + F_ENT, ent)
        tl.store(rec_row + F_TOP, top)
        tl.store(rec_row + F_TOP_Y, top_y)
        tl.store(rec_row + F_PIV, tl.where(t >= 0, (t + vocab_start).to(tl.float32), -1.0))
        tl.store(rec_row + F_PIV_Z, z_t)
        tl.store(rec_row + F_PIV_U, u_t)
    else:
        # Finish: the loss and entropy of the row from its record (reference.finish).
        if DIVERGENCE == FKL:
            x_t = u_t
            y_t = z_t
        else:
            x_t = z_t
            y_t = u_t
            has_k = top >= 0
            s_x = s_x + tl.where(has_k, 1.0, 0.0)  # the top back in: e_k = 1 (M_X is x_k)
            dk_n = tl.where(has_k, -acc / s_x, 0.0)  # d_k - N
            d_k = tl.where(has_k, (_shift(m_y) - top_y) * inv_tau, 0.0)
            acc = tl.where(has_k, (d_k - dk_n) * s_x, 0.0)  # E[d] S_X
        log_sx = tl.log(s_x)
        log_sy = tl.log(s_y)
        ratio = tl.log(s_y / s_x)
        tail = tl.where(s_x == 0, 0.0, acc / s_x + ratio)  # N = KL(xh || yh), no log S difference
        a = (m_x - x_t) * inv_tau + log_sx  # Ls'_x - x_t / tau: log x_t = -softplus(a)
        b = (m_y - y_t) * inv_tau + log_sy
        gap = ((m_y - y_t) - (m_x - x_t)) * inv_tau + ratio  # b - a
        d_t, d_n = _binary_log_ratios(a, b, gap)  # log(x_t / y_t), log((1 - x_t) / (1 - y_t))
        px_t = tl.exp(-_softplus(a))
        px_n = tl.exp(-_softplus(-a))
        if DIVERGENCE == DRKL:
            w = gamma
        else:
            w = px_n
        loss = _weighted(px_t, d_t) + _weighted(px_n, d_n) + w * tail + poison
        tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
        if ENTROPY:
            if DIVERGENCE == FKL:
                a_q = b
                s_q = s_y
            else:
                a_q = a
                s_q = s_x
            h_tail = tl.where(s_q == 0, 0.0, tl.log(s_q) - ent / s_q)
            q_t = tl.exp(-_softplus(a_q))
            q_n = tl.exp(-_softplus(-a_q))
            h = _weighted(q_t, _softplus(a_q)) + _weighted(q_n, _softplus(-a_q) + h_tail) + poison
            tl.store(ent_ptr + row, tl.where(counted, h, 0.0))

        if WRITE_GRAD:
            scale = inv_tau
            if MEAN_SCALE:
                scale = scale * tl.load(scale_ptr)
            # An empty side has no shift (its terms are all 0).
            shift_x = tl.where(s_x == 0, 0.0, m_x)
            shift_y = tl.where(s_y == 0, 0.0, m_y)
            log_sx = tl.where(s_x == 0, 0.0, log_sx)
            log_sy = tl.where(s_y == 0, 0.0, log_sy)
            if DIVERGENCE == FKL:
                py_t = tl.exp(-_softplus(b))
                py_n = tl.exp(-_softplus(-b))
                # q_t - p_t, from whichever of (q_t, p_t) and (1 - q_t, 1 - p_t) is smaller
                g_t = tl.where(px_t + py_t < 1.0, _exp_diff(px_t, py_t, -d_t), -_exp_diff(px_n, py_n, -d_n))
                # (1 - q_t) qh_j / ((1 - p_t) ph_j) = exp(rho - d_j)
                rho = tl.log(s_x / s_y) - d_n
            else:
                # Around the top k: d_j - N = (d_j - d_k) + (d_k - N), nothing cancels where k dominates.
                if DIVERGENCE == RKL:  # gap - N = (d_t - d_k) + (d_k - N)
                    gap = tl.where(has_k, ((x_t - m_x) - (y_t - top_y)) * inv_tau + dk_n, gap)
                g_t = _weighted(px_t * px_n, gap)
                y_k = tl.where(has_k, top_y, 0.0)
                k_const = w * dk_n - g_t
            g_row = g_ptr + row * g_stride
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z, slope = _load(z_row, offs, offs < V_row, z_scale, z_cap, Z_CAP, BF16_BY_HAND)
                u, _ = _load(u_row, offs, offs < V_row, u_scale, u_cap, U_CAP, BF16_BY_HAND)
                if DIVERGENCE == FKL:
                    dx = (u - shift_x) * inv_tau
                    dy = (z - shift_y) * inv_tau
                    # (1 - q_t) qh_j - (1 - p_t) ph_j
                    g = _exp_diff(px_n * tl.exp(dx - log_sx), py_n * tl.exp(dy - log_sy), rho - (dx - dy))
                else:
                    dd = ((z - shift_x) - (u - y_k)) * inv_tau
                    g = _weighted(tl.exp((z - shift_x) * inv_tau - log_sx), w * dd + k_const)
                g = (tl.where(offs == t, g_t, g) + poison) * (slope * scale)
                _store(g_row, offs, tl.where(counted, g, 0.0), offs < V, BF16_BY_HAND)


@triton.jit
def scale_rows_kernel(g_ptr, g_stride, V, w_ptr, w_stride, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    """g[row] *= w[row * w_stride] in place (w_stride = 0: one scalar); a weight of exactly 1 touches nothing."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row * w_stride).to(tl.float32)
    if w != 1.0:
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            g = _load_f32(g_row, offs, offs < V, BF16_BY_HAND)
            _store(g_row, offs, g * w, offs < V, BF16_BY_HAND)


BF16_BY_HAND = isinstance(divergence_kernel, InterpretedFunction)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps): blocks of at most 4096 tokens, 8 per thread once the row is long
    enough, so that no V spills registers (``tests/triton_gpu_compile.py`` checks it)."""
    block = min(4096, max(16, triton.next_power_of_2(vocab)))
    return block, max(4, block // 256)


def max_registers(warps: int) -> int:
    """ptxas's register limit: a whole register file for one program (at most 255). Without it,
    ptxas may spill a few bytes to fit two programs per SM (seen on sm_90a under Triton's
    ``--regAllocOptLevel=2``)."""
    return min(255, 65536 // (32 * warps))


def _launch(p: Problem, phase: Phase, rec: torch.Tensor | None, want_grad: bool):
    """One launch of ``phase`` over the rows of ``p``: (loss, entropy, grad) rows, or ``rec`` filled."""
    device = p.student.device
    rows_out = phase != Phase.PARTIAL
    loss = torch.empty(p.rows, dtype=torch.float32, device=device) if rows_out else None
    entropy = torch.empty(p.rows, dtype=torch.float32, device=device) if rows_out and p.return_entropy else None
    grad = None
    if want_grad:
        grad = p.student if p.inplace_backward else torch.empty_like(p.student)
    if p.rows == 0:
        return loss, entropy, grad
    mean_scale = want_grad and p.reduction == "mean"
    block, warps = launch_config(p.vocab)
    any_ = rec if rec is not None else loss  # a stand-in for pointers a variant never reads
    g = grad if want_grad else any_
    zt, ut = p.student_transform, p.teacher_transform
    divergence_kernel[(p.rows,)](
        p.student, p.teacher, p.target if p.target is not None else any_, any_,
        loss if loss is not None else any_, entropy if entropy is not None else any_, g,
        mean_grad_scale(p) if mean_scale else any_,
        p.student.stride(0), p.teacher.stride(0), g.stride(0) if want_grad else 0, p.vocab,
        p.vocab_start, p.vocab_total, 1.0 / p.temperature, p.gamma, p.ignore_index,
        zt.scale, zt.softcap or 1.0, ut.scale, ut.softcap or 1.0,
        DIVERGENCE=int(p.divergence), PIVOT=int(p.pivot), HAS_LABEL=p.target is not None, PHASE=int(phase),
        WRITE_GRAD=want_grad, MEAN_SCALE=mean_scale, ENTROPY=rows_out and p.return_entropy,
        Z_CAP=zt.softcap is not None, U_CAP=ut.softcap is not None, BF16_BY_HAND=BF16_BY_HAND,
        BLOCK=block, num_warps=warps, maxnreg=max_registers(warps),
    )  # fmt: skip
    return loss, entropy, grad


def forward(p: Problem, want_grad: bool):
    """One launch over whole rows: float32 loss rows, float32 entropy rows (or None), and if
    ``want_grad`` dL/dz scaled for the reduction, in the student's dtype."""
    return _launch(p, Phase.FUSED, None, want_grad)


def partial(p: Problem) -> torch.Tensor:
    """``[rows, record.WIDTH]`` float32 records of the slice ``[vocab_start, vocab_start + V)``."""
    rec = torch.empty(p.rows, record.WIDTH, dtype=torch.float32, device=p.student.device)
    _launch(p, Phase.PARTIAL, rec, False)
    return rec


def finish(p: Problem, merged: torch.Tensor, want_grad: bool):
    """``forward``'s outputs for the slice of ``p``, from the merged records of the whole rows."""
    return _launch(p, Phase.FINISH, merged.contiguous(), want_grad)


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad *= upstream, in place, on the device; ``upstream`` is a scalar or one float per row."""
    if grad.shape[0] == 0:
        return
    block, warps = launch_config(grad.shape[1])
    stride = 0 if upstream.dim() == 0 else upstream.stride(0)
    scale_rows_kernel[(grad.shape[0],)](grad, grad.stride(0), grad.shape[1], upstream, stride,
                                        BF16_BY_HAND=BF16_BY_HAND, BLOCK=block, num_warps=warps,
                                        maxnreg=max_registers(warps))  # fmt: skip
