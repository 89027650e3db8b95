"""Vocabulary-parallel losses (SPEC §8) over gloo on the CPU: one spawned group of four ranks runs
every case (``parallel_worker``; queued at collection in the background, ``group``); this process compares each rank's loss and gradient shard with
the single-process run of the same backend on the whole rows and with the float64 truth.

Groups of W = 2 (even shards), 3 (uneven) and 4 (one shard of a single token); inputs with a label
and argmaxes on shard boundaries, maxima tied across a boundary, confident rows, -inf on whole
shards, ignored rows; every divergence, target given and None, fp32 and bf16 (four option sets,
one per dtype and target mode: every reduction, entropy, num_items_in_batch, transforms).
The interpreted Triton kernels run one of these cases per W, drawn with the session seed
(``interpreted``, ``INTERPRETED_SUBSETS``; over CI runs the seed draws every one): each launch costs about a second in the
interpreter, and the kernels' slice statistics are tested in one process by ``test_split``.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import pytest
import torch

import drkl_kernels as dk

from . import background, parallel_worker, truth
from .helpers import (BACKENDS, GRAD_FLOOR, GRAD_TOL, INTERPRETED_SUBSETS, LOSSES, SEED, assert_loss_close, generator,
                      labels, logits_pair)
from .test_fused_linear import Heads, assert_chained_grad_close, make_heads

WORLD = parallel_worker.WORLD
ROOT = Path(__file__).resolve().parents[1]
VOCAB, ROWS = 160, 12
BOUNDS = {2: [0, 80, 160], 3: [0, 64, 105, 160], 4: [0, 50, 51, 111, 160]}
OPTIONS = {  # (dtype, with a target) -> an option set
    ("fp32", True): ("mean, entropy", dict(reduction="mean", return_entropy=True)),
    ("fp32", False): ("sum, tau 2", dict(reduction="sum", temperature=2.0)),
    ("bf16", True): ("none, tau 0.5, softcaps",
                     dict(reduction="none", temperature=0.5, student_softcap=20.0, teacher_softcap=25.0, return_entropy=True)),
    ("bf16", False): ("num_items, scale", dict(reduction="mean", num_items_in_batch=7, teacher_logit_scale=0.5, return_entropy=True)),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIMEOUT_S = 600  # a loaded machine; gloo's own timeout is 120 s per collective


def inputs(world: int, dtype: torch.dtype, with_target: bool, key) -> tuple:
    """Student, teacher and target of the whole rows, with the hard rows placed on ``world``'s shards."""
    gen = generator("parallel", world, key)
    z, u = (x.cpu() for x in logits_pair(ROWS, VOCAB, torch.float64, gen))
    t = labels(ROWS, VOCAB, gen).cpu()
    first, last = BOUNDS[world][1], BOUNDS[world][-2]  # the first tokens of the second and of the last shard
    t[0] = first  # a label on a boundary (alone in its shard when W = 4)
    t[1] = first - 1  # a label ending a shard; the argmaxes start shards
    z[1, first], u[1, last] = z[1].max() + 3, u[1].max() + 3
    z[2, [first - 1, first]] = 12.0  # maxima tied across a boundary: the first index wins
    u[2, [first - 1, first]] = u[2].max() + 0.5
    t[3] = VOCAB - 1  # confident and right: q_t rounds to 1 in float32
    z[3, VOCAB - 1] += 40
    u[3, VOCAB - 1] += 40
    z[4, first], u[4, 7], t[4] = z[4].max() + 30, u[4].max() + 25, 7  # confident on a boundary, and wrong
    nxt = BOUNDS[world][2]
    z[5, first:nxt] = u[5, first:nxt] = float("-inf")  # a whole shard without mass
    t[5] = 3
    z[6, :last] = u[6, :last] = float("-inf")  # mass in the last shard only
    t[6] = last + 1
    t[7] = -100
    return z.to(dtype), u.to(dtype), t if with_target else None


def interpreted(world: int) -> tuple | None:
    """The one (divergence, dtype, with a target) case of group size ``world`` that the interpreted
    Triton kernels run this session; None where Triton is compiled (every case runs)."""
    if not INTERPRETED_SUBSETS:
        return None
    draws = [(kind, dtype, with_target) for kind in LOSSES for dtype in DTYPES for with_target in (True, False)]
    return random.Random(f"{SEED}-parallel-{world}").choice(draws)


@functools.cache
def cases() -> list[dict]:
    out = []
    for world in BOUNDS:
        for kind in LOSSES:
            for dtype in DTYPES:
                for with_target in (True, False):
                    opt, options = OPTIONS[dtype, with_target]
                    key = f"W{world}-{kind}-{dtype}-{'target' if with_target else 'no target'}-{opt}"
                    z, u, t = inputs(world, DTYPES[dtype], with_target, key)
                    gen = generator("upstream", key)
                    upstream = (torch.rand(ROWS, generator=gen, dtype=torch.float64).float() + 0.5
                                if options["reduction"] == "none" else torch.tensor(0.7))  # fmt: skip
                    for backend in BACKENDS:
                        if backend != "triton" or interpreted(world) in (None, (kind, dtype, with_target)):
                            out.append(dict(key=f"{key}-{backend}", world=world, kind=kind, backend=backend, student=z,
                                            teacher=u, target=t, bounds=BOUNDS[world], options=options, upstream=upstream))  # fmt: skip
    base = dict(kind="drkl", bounds=BOUNDS[3], options=dict(reduction="mean"), upstream=torch.tensor(1.0), world=3)
    z, u, t = inputs(3, torch.float32, True, "special")
    for backend in BACKENDS:  # ranks that disagree: every rank's loss and gradient become NaN
        other = t.clone()
        other[8] = (int(t[8]) + 1) % VOCAB
        out.append(dict(base, key=f"targets differ-{backend}", backend=backend, student=z, teacher=u, target=t,
                        rank_options={1: dict(target=other)}, runs=1))  # fmt: skip
    out.append(dict(base, key="temperature differs", backend="reference", student=z, teacher=u, target=t,
                    rank_options={2: dict(temperature=1.5)}, runs=1))  # fmt: skip
    out.append(dict(base, key="module form", backend="reference", student=z, teacher=u, target=t, module=True,
                    options=dict(gamma=0.3, reduction="sum")))  # fmt: skip
    out.append(dict(base, key="group of one", backend="reference", student=z, teacher=u, target=t, world=1,
                    bounds=[0, VOCAB]))  # fmt: skip
    out.append(dict(base, key="fresh group", backend="reference", student=z, teacher=u, target=t, world=2,
                    bounds=BOUNDS[2], fresh_group=True))  # fmt: skip
    return out + fused_cases()


# Fused linear losses over vocabulary-sharded heads: (key, W, kind, backends, options, frozen parts, dtype).
FUSED_ROWS, FUSED_CHUNK = 12, 5  # three chunks, the last one short
F32, BF16 = torch.float32, torch.bfloat16
FUSED_CASES = [
    ("mean, entropy, d hidden all-reduced", 3, "drkl", BACKENDS, dict(reduction="mean", return_entropy=True), (), F32),
    ("sum, tau 2, softcap", 3, "rkl", ("reference", "cpu"), dict(reduction="sum", temperature=2.0, student_softcap=8.0), (), F32),
    ("num_items, no target", 3, "fkl", ("reference", "cpu"), dict(num_items_in_batch=9, target=None), (), F32),
    ("bf16: d hidden summed in float32", 4, "rkl", ("reference", "cpu"), dict(reduction="mean"), (), BF16),
    ("none, trainable head: backward runs the chunks again", 2, "drkl", ("reference", "cpu"), dict(reduction="none"), (), F32),
    ("none, trainable bias only: backward runs the chunks again", 2, "fkl", ("cpu",), dict(reduction="none"), ("ws",), F32),
    ("none, frozen head, d hidden not reduced", 2, "rkl", ("cpu",),
     dict(reduction="none", reduce_hidden_grad=False), ("ws", "bs"), F32),
    ("shards of one token", 4, "drkl", ("cpu",), dict(reduction="mean"), (), F32),
]  # fmt: skip


def fused_cases() -> list[dict]:
    out = []
    for name, world, kind, backends, options, frozen, dtype in FUSED_CASES:
        key = f"fused-W{world}-{kind}-{name}"
        gen = generator("parallel fused", key)
        heads = make_heads(FUSED_ROWS, 16, 24, VOCAB, gen, dtype=dtype)
        target = labels(FUSED_ROWS, VOCAB, gen).cpu()
        target[0], target[1] = BOUNDS[world][1], BOUNDS[world][1] - 1  # labels at a shard boundary
        options = {**options, "chunk_rows": FUSED_CHUNK}
        target = options.pop("target", target)
        upstream = (torch.rand(FUSED_ROWS, generator=gen, dtype=torch.float64).float() + 0.5
                    if options.get("reduction") == "none" else torch.tensor(0.7))  # fmt: skip
        for backend in backends:
            if backend in BACKENDS:
                out.append(dict(key=f"{key}-{backend}", world=world, kind=kind, backend=backend, bounds=BOUNDS[world],
                                heads={k: v.cpu() for k, v in vars(heads).items()}, target=target,
                                options=options, frozen=frozen, upstream=upstream))  # fmt: skip
    return out


@functools.cache
def group() -> tuple[background.Job, Path]:
    """(job, its folder): every case, saved, and the group that runs them (``parallel_worker``),
    queued at collection in the background (``background``)."""
    base = background.scratch("drkl-parallel-")
    torch.save(cases(), base / "cases.pt")
    cmd = [sys.executable, "-m", "tests.parallel_worker", str(base / "cases.pt"), str(base)]
    return background.JOBS.submit(cmd, stdout=base / "log", cwd=ROOT), base


pytestmark = pytest.mark.background(start=group)


@pytest.fixture(scope="module")
def spawned():
    """Waits for the group; returns (cases by key, results per rank)."""
    job, base = group()
    job.succeed(timeout=TIMEOUT_S)
    results = [torch.load(base / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {c["key"]: c for c in cases()}, results


def _runs(spawned, key) -> list[list[dict]]:
    """Per rank of the case's group, its runs; a case that raised in a rank fails with that traceback."""
    by_key, results = spawned
    out = []
    for rank in range(by_key[key]["world"]):
        got = results[rank][key]
        if isinstance(got, str):
            pytest.fail(f"rank {rank} raised: ...{got[-1200:]}")
        out.append(got)
    return out


def single_process(case: dict):
    """Loss, entropy and gradient of the whole rows through the public API, without a group."""
    z = case["student"].clone().requires_grad_(True)
    kw = {**case["options"], "backend": case["backend"]}
    if case.get("module"):
        out = {"drkl": dk.DRKLLoss, "rkl": dk.RKLLoss, "fkl": dk.FKLLoss}[case["kind"]](**kw)(
            z, case["teacher"], case["target"]
        )
    else:
        out = LOSSES[case["kind"]](z, case["teacher"], case["target"], **kw)
    loss, entropy = out if kw.get("return_entropy") else (out, None)
    loss.backward(case["upstream"])
    return loss.detach(), entropy, z.grad


def want(case: dict):
    """The float64 truth: (loss, gradient, entropy or absent)."""
    kw = {k: v for k, v in case["options"].items() if k != "reduction"}
    return truth.loss_and_grad(case["kind"], case["student"], case["teacher"], case["target"],
                               reduction=case["options"]["reduction"], upstream=case["upstream"], **kw)  # fmt: skip


def assert_gradients(case: dict, shards: list[torch.Tensor], single: torch.Tensor, exact: torch.Tensor) -> None:
    """SPEC §6 norm-wise for every row, the shards gathered against the float64 truth ``exact``; and
    each rank's shard against the slice of the single-process gradient ``single``, within the
    tolerance of the row plus the single-process's own error on the slice (the triangle inequality
    of a shard within SPEC §6 of the truth). Where the single-device maths itself misses SPEC §6 on a
    row (a defect of those maths, tested elsewhere), the shards may miss it by twice as much."""
    dtype, bounds = case["student"].dtype, case["bounds"]
    exact, single = exact.reshape(-1, exact.shape[-1]), single.double().reshape(exact.shape)
    norm = exact.norm(dim=-1)
    floor = GRAD_FLOOR[dtype] * exact.shape[-1] ** 0.5

    def check(err, allowed, what):
        bad = ~(err <= allowed)
        assert not bad.any(), (
            f"{what}: rows {bad.nonzero().flatten().tolist()} errors {err[bad].tolist()} > {allowed[bad].tolist()}"
        )

    for rank, g in enumerate(shards):
        a, b = bounds[rank], bounds[rank + 1]
        assert g.dtype == dtype and g.shape == (*case["student"].shape[:-1], b - a), f"rank {rank}'s gradient"
        assert torch.isfinite(g).all(), f"rank {rank}'s gradient is not finite"
        g = g.double().reshape(-1, b - a)
        own = (single[:, a:b] - exact[:, a:b]).norm(dim=-1)
        check((g - single[:, a:b]).norm(dim=-1), GRAD_TOL[dtype] * norm + own + floor, f"rank {rank}'s shard")
    gathered = torch.cat([g.double().reshape(-1, g.shape[-1]) for g in shards], -1)
    allowed = torch.maximum(GRAD_TOL[dtype] * norm + floor, 2 * (single - exact).norm(dim=-1))
    check((gathered - exact).norm(dim=-1), allowed, "the gathered gradient")


MATRIX = [c["key"] for c in cases() if c["key"][0] == "W"]


@pytest.mark.parametrize("key", MATRIX)
def test_shards_match_the_whole_rows(spawned, key):
    """Bitwise the same loss on every rank and on a second run; within SPEC §6 of the single-process
    run of the same backend and of the float64 truth (``assert_gradients``); one collective in
    forward, none in backward."""
    case = spawned[0][key]
    runs = _runs(spawned, key)
    first = runs[0][0]
    for rank, (one, two) in enumerate(runs):
        assert torch.isfinite(one["loss"]).all(), f"rank {rank}: loss {one['loss']}"
        for name in ("loss", "entropy", "grad"):
            assert (one[name] is None) == (first[name] is None)
            if one[name] is not None:
                assert torch.equal(one[name], two[name]), f"rank {rank}: a second run changed the {name}"
        assert torch.equal(one["loss"], first["loss"]), f"rank {rank}'s loss differs from rank 0's"
        if one["entropy"] is not None:
            assert torch.equal(one["entropy"], first["entropy"]), f"rank {rank}'s entropy differs from rank 0's"
        assert (two["fwd"], two["bwd"]) == (1, 0), (
            f"rank {rank}: collectives forward {two['fwd']}, backward {two['bwd']}"
        )

    loss, entropy, grad = single_process(case)
    exact = want(case)
    assert_loss_close(first["loss"], loss.double())
    assert_loss_close(first["loss"], exact[0])
    if entropy is not None:
        assert_loss_close(first["entropy"], entropy.double())
        assert_loss_close(first["entropy"], exact[2])
    assert_gradients(case, [one["grad"] for one, _ in runs], grad, exact[1])


def test_module_form(spawned):
    case = spawned[0]["module form"]
    runs = _runs(spawned, "module form")
    loss, _, grad = single_process(case)
    assert_loss_close(runs[0][0]["loss"], loss.double())
    assert_gradients(case, [one["grad"] for one, _ in runs], grad, want(case)[1])


def test_group_of_one(spawned):
    """A group of one rank is the single-device path: the same bits, no collective."""
    ((one, two),) = _runs(spawned, "group of one")
    loss, _, grad = single_process(spawned[0]["group of one"])
    assert torch.equal(one["loss"], loss) and torch.equal(one["grad"], grad)
    assert (one["fwd"], one["bwd"], two["fwd"]) == (0, 0, 0)


def test_shard_sizes_are_gathered_once(spawned):
    """The first call on a group gathers the shard sizes (one more collective); later calls do not."""
    for rank, runs in enumerate(_runs(spawned, "fresh group")):
        assert [r["fwd"] for r in runs] == [2, 1], f"rank {rank}"


@pytest.mark.parametrize("key", [f"targets differ-{b}" for b in BACKENDS] + ["temperature differs"])
def test_ranks_that_disagree_get_nan(spawned, key):
    """Targets or options that differ across ranks cannot be seen without a host sync; the check row
    of the same collective turns every rank's loss and the gradients of counted rows into NaN."""
    case = spawned[0][key]
    counted = case["target"] != -100
    for rank, (one,) in enumerate(_runs(spawned, key)):
        assert torch.isnan(one["loss"]).all(), f"rank {rank}: loss {one['loss']}"
        assert torch.isnan(one["grad"][counted]).all(), f"rank {rank}: gradient of counted rows not NaN"


def test_rank_outside_the_group(spawned):
    _, results = spawned
    assert results[3]["outside the group of 3"].startswith("ValueError: process_group does not contain this rank")
    for rank in (2, 3):
        assert results[rank]["outside the group of 2"].startswith("ValueError: process_group does not contain")
    for rank in range(WORLD):
        assert results[rank]["not a group"].startswith(
            "TypeError: process_group must be a torch.distributed ProcessGroup"
        )


def test_without_init_process_group():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        dk.fkl_loss(z, z, process_group=object())


@pytest.mark.parametrize("key", [c["key"] for c in fused_cases()])
def test_fused_linear_over_sharded_heads(spawned, key):
    """Fused linear losses over vocabulary-sharded LM heads: bitwise the same loss on every rank and
    run, within SPEC §6 of the float64 truth of the whole heads; each rank's d W and d bias are the
    truth's rows of its shard; d hidden is the same on every rank and the truth (all-reduced), or
    sums to it over the ranks (``reduce_hidden_grad=False``). Collectives: one per chunk, plus the
    all-reduce of d hidden when it is computed and reduced; backward none, except when it reruns
    the chunks (``reduction="none"`` with a trainable head)."""
    case = spawned[0][key]
    runs = _runs(spawned, key)
    options = case["options"]
    reduce_hidden = options.get("reduce_hidden_grad", True)
    recompute = options.get("reduction") == "none" and not {"ws", "bs"} <= set(case["frozen"])
    chunks = -(-FUSED_ROWS // FUSED_CHUNK)
    first = runs[0][0]
    for rank, (one, two) in enumerate(runs):
        for name in ("loss", "entropy"):
            if one[name] is not None:
                assert torch.equal(one[name], first[name]) and torch.equal(one[name], two[name]), (rank, name)
        for a, b in zip(one["grad"], two["grad"]):
            assert (a is None and b is None) or torch.equal(a, b), f"rank {rank}: a second run changed a gradient"
        if reduce_hidden:
            assert torch.equal(one["grad"][0], first["grad"][0]), f"rank {rank}'s d hidden differs from rank 0's"
        reduced = int(reduce_hidden)
        want_counts = (chunks, chunks + reduced) if recompute else (chunks + reduced, 0)
        assert (two["fwd"], two["bwd"]) == want_counts, f"rank {rank}: collectives {two['fwd']}, {two['bwd']}"

    truth_kw = {k: v for k, v in options.items() if k not in ("chunk_rows", "reduce_hidden_grad")}
    truth_kw.setdefault("reduction", "mean")
    want = Heads(**case["heads"]).truth(case["kind"], case["target"], upstream=case["upstream"], **truth_kw)
    assert_loss_close(first["loss"], want[0])
    if options.get("return_entropy"):
        assert_loss_close(first["entropy"], want[4])
    heads = case["heads"]
    dtype = heads["hs"].dtype
    assert all(one["grad"][0].dtype == dtype for one, _ in runs)
    if reduce_hidden:
        d_hidden = first["grad"][0]
    else:  # the caller's sum of the partial sums, in float64 (as Megatron's all-reduce would, within its dtype)
        d_hidden = sum(one["grad"][0].double() for one, _ in runs)
    lost = GRAD_FLOOR[torch.float32] * (FUSED_ROWS * VOCAB) ** 0.5  # what float32 g cannot hold, as test_fused_linear
    assert_chained_grad_close(d_hidden, want[1], dtype, lost * float(heads["ws"].double().norm()))
    for index, name, factor in ((1, "ws", heads["hs"].double().norm()), (2, "bs", FUSED_ROWS**0.5)):
        if name in case["frozen"]:
            assert all(one["grad"][index] is None for one, _ in runs)
        else:
            shards = torch.cat([one["grad"][index] for one, _ in runs])
            assert shards.dtype == dtype
            assert_chained_grad_close(shards, want[index + 1], dtype, lost * float(factor))


def test_fused_linear_bad_reduce_hidden_grad():
    h, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(TypeError, match="reduce_hidden_grad must be a bool"):
        dk.fused_linear_rkl_loss(h, w, h, w, reduce_hidden_grad="yes")
