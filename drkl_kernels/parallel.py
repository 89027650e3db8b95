"""Vocabulary-parallel losses over ``torch.distributed`` (SPEC §8).

With a process group of W ranks, rank r holds the contiguous shard ``[start_r, start_r + V_r)``
of every row's vocabulary (rank order; the V_r may differ, e.g. with vocabulary padding).
A call is the kernel contract of ``record`` with one collective between its two phases:

1. ``partial`` over the shard: the ``[rows, WIDTH]`` record of each row (global token ids);
2. **one** ``all_gather_single`` of those records plus one check row, ``[rows + 1, WIDTH]``,
   into ``[W, rows + 1, WIDTH]``;
3. ``record.merge`` in rank order on every rank: the same bits everywhere, hence bitwise the
   same loss on every rank, and the same on every run;
4. ``finish`` over the shard: the loss rows, the entropy rows and the shard's gradient, scaled
   for the reduction. Backward only multiplies that gradient by the upstream gradient
   (``autograd.FusedDivergence``): no collective, no host synchronisation.

Payload: each rank sends ``(rows + 1) * WIDTH`` values of the records' dtype, i.e. 44 bytes per
row (float32; 88 for float64 logits) and one 44-byte check row per call, and receives W times
that. Megatron's vocabulary-parallel cross-entropy all-reduces 3 floats per row three times;
the records carry what a KL needs (both sides' maxima and sums, the accumulator, the pivot and
the top with global ids) in a single round trip.

Offsets. ``start_r`` is the sum of the shard sizes of the ranks before r. The sizes are
gathered (one ``all_gather_single`` of one int64 per rank, and one host synchronisation to read
them) the first time a group is used with a given local shard size, and cached per (group,
local shard size); every later call uses the cache and synchronises nothing. So the first call
costs one more collective; all ranks must change their shard size together (a rank that alone
misses the cache would wait in a collective the others do not join).

Checks. On the host, without synchronising: the group is a ``ProcessGroup`` that holds this
rank, and global token ids fit the records (V < 2**24 for float32 records). On the device, for
free with the same collective: the check row carries this rank's shard layout,
a hash of the options (divergence, gamma, temperature, transforms, reduction, ignore_index,
whether there is a target, whether entropy is wanted) and two exact integer hashes of the
targets, and the ``num_items_in_batch`` value; when the ranks disagree on any of them (targets
that differ across ranks, a different temperature on one rank, ...) every rank's loss,
entropy and gradient become NaN instead of silently differing. What cannot be checked without
a host synchronisation or a second collective: different row counts (or record dtypes) across
ranks break the collective itself (gloo aborts with "Received data size doesn't match expected
size"; NCCL may hang), and a per-row upstream gradient (``reduction="none"``) that differs
across ranks is applied as given, since backward exchanges nothing.
"""

from __future__ import annotations

import weakref
import zlib

import torch
import torch.distributed as dist

from . import record
from .problem import Problem
from .record import WIDTH, Field

# Check row: which slot holds what (values exact in float32).
_OPTIONS_LO, _OPTIONS_HI, _TARGET_1, _TARGET_2, _START, _LOCAL, _TOTAL, _NUM_ITEMS = range(8)
_SAME_ON_EVERY_RANK = [_OPTIONS_LO, _OPTIONS_HI, _TARGET_1, _TARGET_2, _TOTAL, _NUM_ITEMS]
# Two primes below 2**24 and odd multipliers for the target hashes (integer arithmetic, exact).
_HASHES = ((16777213, 40503), (16777199, 2654435))
# Record fields a failed check sets to NaN (the token ids stay: kernels index with them).
_POISONED = [f for f in record.Field if f not in (Field.TOP, Field.PIV)]
_EXACT_IDS = 2**24  # float32 holds every integer id below this

_sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> {local size: (start, total)}


def _check_member(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised (init_process_group)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("process_group does not contain this rank (new_group returned NON_GROUP_MEMBER here)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("process_group does not contain this rank")


def _layout(group, local: int, device: torch.device) -> tuple[int, int]:
    """(start of this rank's shard, total vocabulary): gathered once per (group, local size)."""
    known = _sizes.setdefault(group, {})
    if local not in known:
        world = dist.get_world_size(group)
        sizes = torch.empty(world, dtype=torch.int64, device=device)
        dist.all_gather_single(sizes, torch.tensor([local], dtype=torch.int64, device=device), group=group)
        sizes = sizes.tolist()  # the one host synchronisation, once per (group, local size)
        rank = dist.get_rank(group)
        known[local] = (sum(sizes[:rank]), sum(sizes))
    return known[local]


class Shard:
    """This rank's place in a vocabulary-parallel call: its group, its shard's start and the total V."""

    def __init__(self, group, start: int, total: int):
        self.group, self.start, self.total = group, start, total

    @property
    def slice(self) -> dict:
        """The keywords of ``problem.validate`` that describe the shard."""
        return {"vocab_start": self.start, "vocab_total": self.total}


def shard(process_group, student_logits) -> Shard | None:
    """The shard of ``student_logits`` in ``process_group``; None without a group, for a group of
    one (the single-device path) and for logits ``problem.validate`` will reject. Raises for a
    group that is not usable here."""
    if process_group is None:
        return None
    _check_member(process_group)
    if (
        dist.get_world_size(process_group) == 1
        or not isinstance(student_logits, torch.Tensor)
        or student_logits.dim() == 0
    ):
        return None
    local = student_logits.shape[-1]
    start, total = _layout(process_group, local, student_logits.device)
    if total == 0:
        raise ValueError("student_logits has an empty vocabulary dimension on every rank of process_group (V == 0)")
    if total >= _EXACT_IDS and student_logits.dtype != torch.float64:
        raise ValueError(f"a vocabulary of {total} tokens split over process_group is too large: the exchanged "
                         f"records hold token ids as float32, exact below {_EXACT_IDS}")  # fmt: skip
    return Shard(process_group, start, total)


def _options_hash(p: Problem) -> int:
    key = (int(p.divergence), int(p.pivot), p.gamma, p.temperature, p.ignore_index, p.reduction,
           p.student_transform, p.teacher_transform, p.return_entropy, p.target is None, p.num_items is None)  # fmt: skip
    return zlib.crc32(repr(key).encode())


def _target_hashes(p: Problem, dtype: torch.dtype) -> torch.Tensor:
    """Two position-weighted sums of the targets modulo primes below 2**24 (exact as floats)."""
    if p.target is None:
        return torch.zeros(2, dtype=dtype, device=p.student.device)
    t = p.target.long()
    pos = torch.arange(t.numel(), device=t.device)
    out = [((t.remainder(m) * (pos * k + 1).remainder(m)).remainder(m)).sum().remainder(m) for m, k in _HASHES]
    return torch.stack(out).to(dtype)


def check_row(p: Problem, dtype: torch.dtype) -> torch.Tensor:
    """The ``[WIDTH]`` row each rank appends to its records (see the module's "Checks")."""
    h = _options_hash(p)
    row = torch.tensor([h & 0xFFFF, h >> 16, 0, 0, p.vocab_start, p.vocab, p.vocab_total] + [0] * (WIDTH - 7),
                       dtype=dtype, device=p.student.device)  # fmt: skip
    row[_TARGET_1 : _TARGET_2 + 1] = _target_hashes(p, dtype)
    if p.num_items is not None:
        row[_NUM_ITEMS] = p.num_items.to(dtype)
    return row


def disagree(checks: torch.Tensor) -> torch.Tensor:
    """``[W, WIDTH]`` check rows -> a 0-dim bool, True when the ranks' calls do not fit together."""
    same = (checks[:, _SAME_ON_EVERY_RANK] == checks[0, _SAME_ON_EVERY_RANK]).all()
    local = checks[:, _LOCAL]
    contiguous = (checks[:, _START] == torch.cumsum(local, 0) - local).all() & (checks[0, _TOTAL] == local.sum())
    return ~(same & contiguous)


def exchange(records: torch.Tensor, check: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The one collective: ``[rows, WIDTH]`` records and the ``[WIDTH]`` check row of every rank
    -> ``[W, rows, WIDTH]`` records in rank order and ``[W, WIDTH]`` check rows."""
    rows = records.shape[0]
    mine = torch.cat([records, check.unsqueeze(0)])
    world = dist.get_world_size(group)
    gathered = torch.empty((world * (rows + 1), WIDTH), dtype=mine.dtype, device=mine.device)
    dist.all_gather_single(gathered, mine, group=group)  # concatenated (gloo has no stacked form)
    gathered = gathered.view(world, rows + 1, WIDTH)
    return gathered[:, :rows], gathered[:, rows]


class Sharded:
    """A backend's kernels over one shard of a vocabulary-parallel group: ``forward`` is partial,
    one collective, merge and finish (``autograd.launch`` calls it; backward is the backend's own
    ``scale_grad_`` and exchanges nothing)."""

    def __init__(self, kernels, shard: Shard):
        self.backend, self.shard = kernels, shard

    def forward(self, p: Problem, want_grad: bool):
        records = self.backend.partial(p)
        gathered, checks = exchange(records, check_row(p, records.dtype), self.shard.group)
        merged = record.merge(gathered, p.divergence, p.pivot, 1.0 / p.temperature)
        bad = disagree(checks)
        nan = torch.where(bad, float("nan"), 0.0).to(merged.dtype)
        fields = torch.zeros(WIDTH, dtype=torch.bool, device=merged.device)
        fields[_POISONED] = True
        merged = merged + torch.where(fields, nan, 0.0)  # NaN in the statistics where the ranks disagree
        loss, entropy, grad = self.backend.finish(p, merged, want_grad)
        loss = loss + nan.to(loss.dtype)
        if entropy is not None:
            entropy = entropy + nan.to(entropy.dtype)
        # The kernels' gradient is in the student's dtype; the reference's stays in its compute dtype until
        # autograd casts it to the student's after backward's scaling, so it is rounded once, as without a group.
        return loss, entropy, grad
