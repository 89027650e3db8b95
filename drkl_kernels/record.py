"""The kernel contract: the per-row record of a slice of the vocabulary, and its merge.

Every backend computes a loss in two phases, which the single-device path fuses into one
launch (the record then never leaves the chip):

1. **partial**: over a contiguous slice ``[start, start + Vs)`` of the vocabulary, one
   streaming pass with O(1) state per row writes the row's ``Record``;
2. **finish**: from the record of the whole row (the slices' records merged in rank order),
   the loss, the student's entropy, and the gradient of the slice (one more pass over it).

Sides. ``x`` is the side whose distribution weights the expectation (the student for RKL and
DRKL, the teacher for FKL), ``y`` the other. Values are transformed logits (``Transform``) in
logit units; the temperature only scales differences (``inv_tau = 1 / tau``), so that logits of
1e4 at tau = 0.05 stay exact in float32. ``shift(m)`` is ``m``, or 0 when ``m = -inf`` (a side
with no mass).

Tokens. Each row is split around a pivot t (``Pivot``: the label, or the first argmax of the
student for RKL, of the teacher for FKL and for DRKL without a target). For RKL and DRKL the
most probable student token k among the others (the *top*: the first index of the largest
``x_j``, j != t, when it is above -inf) is held out of the x-side sums too, and the
accumulator of differences is taken relative to it: ``d_j - d_k = ((x_j - x_k) - (y_j - y_k)) /
tau`` from raw differences. Then ``d_k - N = -ACC / (S_X + 1)`` and every gradient term
``d_j - N = (d_j - d_k) + (d_k - N)`` is formed without the cancellation that ``d_j - E[d]``
suffers where k holds most of the tail (confident rows, huge logits), and the top's own
gradient is the general formula at ``d_k - d_k = 0``: the rows sum to zero with no second
reduction. FKL needs no top.

Fields (``Field``; float32, float64 for float64 logits; token ids are global and stored exactly
as floats, which holds for vocabularies below 2**24; -1 means none):

    M_X    max of x_j over j != t (with a top: x_k); -inf when there is none
    S_X    sum of e_j = exp((x_j - shift(M_X)) / tau) over j != t, k
    M_Y    max of y_j over j != t (the top included)
    S_Y    sum of exp((y_j - shift(M_Y)) / tau) over j != t
    ACC    RKL, DRKL: sum of e_j ((x_j - x_k) - (y_j - y_k)) / tau over j != t, k (0 with no top);
           FKL: sum of e_j ((x_j - shift(M_X)) - (y_j - shift(M_Y))) / tau over j != t
           (a term with e_j = 0 is 0)
    ENT    the student's sum of f_j (s_j - shift) / tau over its terms f_j: the S_X terms for RKL
           and DRKL (the top's term is 0), the S_Y terms for FKL; used for the entropy only
    TOP    k, or -1                  TOP_Y  y_k
    PIV    t, or -1 (the slice does not hold the label)      PIV_Z, PIV_U  student and teacher at t

Merge. Records fold in rank order; two records combine symmetrically, bit for bit, so every
rank (and every lane of a butterfly) ends with the same bits: (1) pivots: the holder of the
label; or the larger key (the student's logit for RKL, the teacher's otherwise), ties to the
smaller index, a real token over none; the losing token becomes an ordinary one; (2) sums
raised to the common maxima and added; (3) tops: the larger x, ties to the smaller index; the
loser's x-side terms (its top's included) join the winner's sums, re-referenced to its top; (4) the pivot's loser joins as a one-token record. The
maths header ``csrc/drkl_math.h`` and the Triton kernel implement the same steps; this module
is the torch implementation, used by the reference and to merge records across ranks.
"""

from __future__ import annotations

import enum

import torch

from .problem import Divergence, Pivot

NEG_INF = float("-inf")


class Field(enum.IntEnum):
    M_X = 0
    S_X = 1
    M_Y = 2
    S_Y = 3
    ACC = 4
    ENT = 5
    TOP = 6
    TOP_Y = 7
    PIV = 8
    PIV_Z = 9
    PIV_U = 10


WIDTH = len(Field)


def has_top(divergence: Divergence) -> bool:
    """Whether the divergence holds the student's top token out of the sums (RKL, DRKL)."""
    return divergence != Divergence.FKL


def shift(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == NEG_INF, torch.zeros_like(m), m)


def weighted(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """a * d with a == 0 terms exactly 0 (-inf logits give 0, never NaN; NaN stays NaN)."""
    return torch.where(a == 0, torch.zeros_like(a), a * d)


def _columns(r: torch.Tensor) -> dict[Field, torch.Tensor]:
    return {f: r[..., f] for f in Field}


def _stack(c: dict[Field, torch.Tensor]) -> torch.Tensor:
    return torch.stack([c[f] for f in Field], -1)


def _raise(c: dict, m_x: torch.Tensor, m_y: torch.Tensor, inv_tau: float) -> dict:
    """FKL: the sums of ``c`` re-referenced to maxima ``(m_x, m_y)`` at least its own."""
    sx, sy = shift(m_x), shift(m_y)
    ax, ay = torch.exp((c[Field.M_X] - sx) * inv_tau), torch.exp((c[Field.M_Y] - sy) * inv_tau)
    moved_x, moved_y = (shift(c[Field.M_X]) - sx) * inv_tau, (shift(c[Field.M_Y]) - sy) * inv_tau
    out = dict(c)
    out[Field.ACC] = ax * (c[Field.ACC] + c[Field.S_X] * (moved_x - moved_y))
    out[Field.ENT] = ay * (c[Field.ENT] + c[Field.S_Y] * moved_y)
    out[Field.S_X], out[Field.S_Y] = ax * c[Field.S_X], ay * c[Field.S_Y]
    out[Field.M_X], out[Field.M_Y] = m_x, m_y
    return out


def _first(key_a, idx_a, key_b, idx_b) -> torch.Tensor:
    """Where token a beats token b: a real one over none, the larger key, ties to the smaller index."""
    return (idx_a >= 0) & ((idx_b < 0) | (key_a > key_b) | ((key_a == key_b) & (idx_a < idx_b)))


def _merge_tails(a: dict, b: dict, divergence: Divergence, inv_tau: float) -> dict:
    """Steps (2) and (3): the sums of two records at common maxima, and the tops' contest."""
    m_y = torch.maximum(a[Field.M_Y], b[Field.M_Y])
    if not has_top(divergence):
        m_x = torch.maximum(a[Field.M_X], b[Field.M_X])
        ra, rb = _raise(a, m_x, m_y, inv_tau), _raise(b, m_x, m_y, inv_tau)
        out = dict(ra)
        for f in (Field.S_X, Field.S_Y, Field.ACC, Field.ENT):
            out[f] = ra[f] + rb[f]
        return out
    # The winner's top stays; the loser's terms (its top's included) are re-referenced to it:
    # scaled by exp((x_l - x_k) / tau), and ACC's differences moved by delta = d_l - d_k.
    a_wins = _first(a[Field.M_X], a[Field.TOP], b[Field.M_X], b[Field.TOP])
    win = {f: torch.where(a_wins, a[f], b[f]) for f in Field}
    lose = {f: torch.where(a_wins, b[f], a[f]) for f in Field}
    out = dict(win)
    sy = shift(m_y)
    out[Field.M_Y] = m_y
    out[Field.S_Y] = (torch.exp((a[Field.M_Y] - sy) * inv_tau) * a[Field.S_Y]
                      + torch.exp((b[Field.M_Y] - sy) * inv_tau) * b[Field.S_Y])  # fmt: skip
    x_k = shift(win[Field.M_X])
    terms = lose[Field.S_X] + (lose[Field.TOP] >= 0).to(x_k.dtype)
    scale = torch.exp((lose[Field.M_X] - x_k) * inv_tau)
    moved = (lose[Field.M_X] - x_k) * inv_tau
    delta = ((lose[Field.M_X] - x_k) - (lose[Field.TOP_Y] - win[Field.TOP_Y])) * inv_tau
    out[Field.S_X] = win[Field.S_X] + scale * terms
    out[Field.ACC] = win[Field.ACC] + weighted(scale, lose[Field.ACC] + weighted(terms, delta))
    out[Field.ENT] = win[Field.ENT] + weighted(scale, lose[Field.ENT] + weighted(terms, moved))
    return out


def token(idx: torch.Tensor, z: torch.Tensor, u: torch.Tensor, divergence: Divergence, inv_tau: float) -> dict:
    """The record of one token (student logit z, teacher logit u) at ``idx`` (-1: no token, an empty record)."""
    present = idx >= 0
    x, y = (u, z) if divergence == Divergence.FKL else (z, u)
    x = torch.where(present, x, NEG_INF)
    y = torch.where(present, y, NEG_INF)
    one = lambda v: (v > NEG_INF).to(v.dtype)  # noqa: E731
    zero = torch.zeros_like(x)
    c = {Field.M_X: x, Field.M_Y: y, Field.S_Y: one(y), Field.ENT: zero}
    c[Field.PIV], c[Field.PIV_Z], c[Field.PIV_U] = -torch.ones_like(x), zero, zero
    if has_top(divergence):
        real = present & (x > NEG_INF)
        c[Field.S_X], c[Field.ACC] = zero, zero
        c[Field.TOP], c[Field.TOP_Y] = torch.where(real, idx.to(x.dtype), -1.0), y
    else:
        c[Field.S_X] = one(x)
        c[Field.ACC] = weighted(c[Field.S_X], ((x - shift(x)) - (y - shift(y))) * inv_tau)
        c[Field.TOP], c[Field.TOP_Y] = -torch.ones_like(x), zero
    return c


def _merge_two(a: dict, b: dict, divergence: Divergence, pivot: Pivot, inv_tau: float) -> dict:
    if pivot == Pivot.LABEL:
        a_wins = a[Field.PIV] >= 0
        loser = None
    else:
        key = Field.PIV_Z if pivot == Pivot.STUDENT_ARGMAX else Field.PIV_U
        a_wins = _first(a[key], a[Field.PIV], b[key], b[Field.PIV])
        loser = {f: torch.where(a_wins, b[f], a[f]) for f in (Field.PIV, Field.PIV_Z, Field.PIV_U)}
    out = _merge_tails(a, b, divergence, inv_tau)
    for f in (Field.PIV, Field.PIV_Z, Field.PIV_U):
        out[f] = torch.where(a_wins, a[f], b[f])
    if loser is not None:
        single = token(loser[Field.PIV], loser[Field.PIV_Z], loser[Field.PIV_U], divergence, inv_tau)
        pivots = {f: out[f] for f in (Field.PIV, Field.PIV_Z, Field.PIV_U)}
        out = {**_merge_tails(out, single, divergence, inv_tau), **pivots}
    return out


def merge(records: torch.Tensor, divergence: Divergence, pivot: Pivot, inv_tau: float) -> torch.Tensor:
    """``[W, rows, WIDTH]`` records of the W slices of each row, in rank order -> ``[rows, WIDTH]``.

    Deterministic: the same records give the same bits on every rank and every run."""
    out = _columns(records[0])
    for r in range(1, records.shape[0]):
        out = _merge_two(out, _columns(records[r]), divergence, pivot, inv_tau)
    return _stack(out)
