"""The CUDA kernels' partition and merge logic, run on the CPU by the host model (``tests/cuda_model.cpp``).

The model compiles the kernels' own loops and merges (``csrc/drkl_partition.h``, ``csrc/drkl_math.h``)
and runs every thread, warp butterfly, block tree and cluster tree of a launch lane by lane. Over many
thread, block and cluster shapes, vocabulary sizes from 1 to 256000, every divergence and pivot, the
nine dtype pairs and the hard regimes, its outputs must match the CPU kernels and the float64 truth,
and every lane must hold the same bits wherever the device code relies on it. Where the summation
order is the CPU kernels' (the gradient pass from a given record) the results are equal.
"""

import dataclasses
import functools
import itertools

import pytest
import torch

from drkl_kernels import compiled_kernels, record
from drkl_kernels.problem import Divergence, validate

from . import cuda_model, truth
from .helpers import assert_grad_close, assert_loss_close, generator, labels, logits_pair, rounding_slack

DTYPE_PAIRS = list(itertools.product([torch.float32, torch.bfloat16, torch.float16], repeat=2))
KINDS = {"drkl": (Divergence.DRKL, True), "drkl-no-label": (Divergence.DRKL, False), "rkl": (Divergence.RKL, False),
         "fkl": (Divergence.FKL, False)}  # fmt: skip
VOCABS = [1, 4095, 4096, 4099, 50257, 151937, 256000]
REGIMES = ["random", "-inf halves", "ties across tiles and ranks", "logits of 3e4, tau 0.05", "transforms",
           "ignored and out-of-range labels", "confident rows"]  # fmt: skip
ROWS = 3


def shapes(vocab: int) -> list[tuple[int, int, int]]:
    """(kernel, threads, ranks): the two-pass kernel as launched and with other thread counts; the
    single-pass kernel with clusters of 1 to 16 CTAs (powers of two as launched, and others)."""
    two_pass = [(2, 32 if vocab <= 2048 else 512, 1), (2, 64, 1), (2, 256, 1)]
    return two_pass + [(1, 256, r) for r in (1, 2, 3, 4, 7, 8, 16)] + [(1, 64, 5)]


def case_count() -> int:
    """Modelled launches of test_model_matches_cpu_and_truth."""
    return sum(len(shapes(v)) * 2 for v in VOCABS) * len(KINDS)


def make_inputs(kind: str, vocab: int, regime: str, pair, gen):
    """(problem, problem for the truth, truth keyword arguments, rows poisoned with an out-of-range label)."""
    divergence, with_label = KINDS[kind]
    opts = dict(temperature=1.0)
    huge = regime.startswith("logits of 3e4")
    scale = (3e3 if torch.float16 in pair else 1e4) if huge else 2.0  # float16 holds up to 65504
    z, u = logits_pair(ROWS, vocab, torch.float64, gen, scale=scale)
    if huge:
        opts["temperature"] = 0.05
    if regime == "-inf halves":
        z[0, : vocab // 2] = u[0, : vocab // 2] = float("-inf")  # the label stays in the finite half
        z[1, vocab // 2 + 1 :] = u[1, vocab // 2 + 1 :] = float("-inf")
    if regime == "ties across tiles and ranks":
        for r in range(ROWS):
            at = sorted({(r + 1) * 7 % vocab, vocab // 2, vocab - 1, min(vocab - 1, 8192)})
            z[r, at] = z[r].max() + 3
            u[r, at] = u[r].max() + 3
    if regime == "confident rows":
        z[0, vocab // 3] += 40
        u[1, vocab // 5] += 40
        z[2, vocab - 1] += 40
    if regime == "transforms":
        opts.update(student_logit_scale=1.5, teacher_logit_scale=0.7, student_softcap=30.0, teacher_softcap=20.0)
        if vocab % 2:  # the scale alone on odd vocabularies
            opts.pop("student_softcap"), opts.pop("teacher_softcap")
    target = labels(ROWS, vocab, gen, ignored=0.0) if with_label else None
    if target is not None and regime == "-inf halves":
        target[0], target[1] = max(vocab - 1, 0), 0
    poisoned = torch.zeros(ROWS, dtype=torch.bool)
    if regime == "ignored and out-of-range labels" and target is not None:
        target[1] = -100
        poisoned[2] = True
    if regime == "ignored and out-of-range labels" and target is None:
        target = torch.tensor([0, -100, 0])  # FKL, RKL: the target only masks rows
    zs, us = z.to(pair[0]), u.to(pair[1])
    p = validate(divergence, zs, us, target, ignore_index=-100, reduction="none", inplace_backward=False, gamma=0.5,
                 return_entropy=True, **opts)  # fmt: skip
    if poisoned.any():  # past validation, as a GPU target would be: the kernels return NaN for the row
        bad = p.target.clone()
        bad[poisoned] = vocab + 5
        p = dataclasses.replace(p, target=bad)
    return p, zs, us, target, opts, poisoned


def check_against(got, want, dtype, rows_ok, exact_nan=True, slack=None):
    """Loss, entropy, gradient of ``got`` against ``want`` (loss, entropy, grad) on rows_ok; NaN elsewhere.
    ``slack``: a callable giving (loss, gradient) allowances added where a row misses without them:
    against the float64 truth ``rounding_slack``'s; against the CPU kernels, also their own error."""
    loss, entropy, grad = got
    w_loss, w_entropy, w_grad = want
    loss_slack = None if slack is None else lambda: slack()[0][rows_ok]
    grad_slack = None if slack is None else lambda: slack()[1][rows_ok]
    assert_loss_close(loss[rows_ok], w_loss[rows_ok].double(), loss_slack)
    assert_loss_close(entropy[rows_ok], w_entropy[rows_ok].double())
    assert_grad_close(grad[rows_ok], w_grad[rows_ok].double(), dtype, slack=grad_slack)
    if exact_nan:
        assert loss[~rows_ok].isnan().all() and grad[~rows_ok].isnan().all()


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_model_matches_cpu_and_truth(kind, vocab):
    """Every modelled launch shape: the CPU kernels' results, the float64 truth, identical lanes."""
    index = VOCABS.index(vocab) * len(KINDS) + list(KINDS).index(kind)
    for k in range(2):
        regime = REGIMES[(index + k * 3) % len(REGIMES)]
        pair = DTYPE_PAIRS[(index + k) % len(DTYPE_PAIRS)]
        gen = generator("cuda-model", kind, vocab, k)
        p, zs, us, target, opts, poisoned = make_inputs(kind, vocab, regime, pair, gen)
        cpu = compiled_kernels.forward(p, True)
        ok = ~poisoned
        t_target = None if target is None else target.clone()
        truth_kw = dict(reduction="none", gamma=0.5, return_entropy=True, **opts)
        want_loss, want_grad, want_entropy = truth.loss_and_grad(kind.split("-")[0], zs, us, t_target, **truth_kw)
        slack = functools.cache(lambda: rounding_slack(kind.split("-")[0], zs, us, t_target, **truth_kw))

        def cpu_slack():  # two float32 orders may differ by both their errors: the CPU kernels' own, plus slack
            grad_err = torch.nan_to_num(cpu[2].double() - want_grad, nan=0.0, posinf=0.0, neginf=0.0)
            return (cpu[0].double() - want_loss).abs() + slack()[0], grad_err.norm(dim=-1) + slack()[1]

        launched = shapes(vocab)
        for kernel, threads, ranks in launched:
            loss, entropy, grad, _, shape = cuda_model.run(p, 0, True, kernel=kernel, threads=threads, ranks=ranks)
            where = f"{regime}, {pair}, kernel {kernel}, {threads} threads, {ranks} ranks"
            assert shape.mismatches == 0, f"lanes disagree: {where}"
            assert shape.merges > 0, where
            check_against((loss, entropy, grad), cpu, zs.dtype, ok, slack=functools.cache(cpu_slack))
            if (kernel, threads, ranks) in (launched[0], launched[-2]):  # the float64 truth: the costly check
                check_against((loss, entropy, grad), (want_loss, want_entropy, want_grad), zs.dtype, ok, exact_nan=False,
                              slack=slack)  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_minus_infinity_rows_agree_lane_by_lane(kind):
    """Rows whose pivot side (or both sides) is all -inf, V = 1 included: every lane of every butterfly
    and tree holds the same bits, and the outputs (NaN or not) are the CPU kernels'. A merge that let
    an empty token beat a real one whose key is -inf (issue 8, defect 3) breaks both."""
    divergence, with_label = KINDS[kind]
    for vocab in (1, 2, 33, 4099):
        z, u = logits_pair(4, vocab, torch.float32, generator("all-inf", kind, vocab))
        z[1], u[2] = float("-inf"), float("-inf")
        z[3] = u[3] = float("-inf")
        target = torch.zeros(4, dtype=torch.int64) if with_label else None
        p = validate(divergence, z, u, target, ignore_index=-100, reduction="none", inplace_backward=False, gamma=0.5,
                     return_entropy=True, temperature=1.0)  # fmt: skip
        cpu = compiled_kernels.forward(p, True)
        for kernel, threads, ranks in [(2, 32, 1), (2, 512, 1), (1, 256, 3), (1, 64, 16)]:
            loss, entropy, grad, _, shape = cuda_model.run(p, 0, True, kernel=kernel, threads=threads, ranks=ranks)
            assert shape.mismatches == 0, (vocab, kernel, threads, ranks)
            for got, want in zip((loss, entropy, grad), cpu):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def _slices(kind, z, u, target, cuts):
    divergence, _ = KINDS[kind]
    bounds = [0, *cuts, z.shape[-1]]
    return [validate(divergence, z[:, a:b], u[:, a:b], target, ignore_index=-100, reduction="mean",
                     inplace_backward=False, gamma=0.5, return_entropy=True, temperature=0.7, vocab_start=a,
                     vocab_total=z.shape[-1]) for a, b in zip(bounds, bounds[1:])]  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_partial_and_finish_phases(kind):
    """PARTIAL: the records of vocabulary slices match the CPU kernels' (maxima and held tokens
    exactly); FINISH from a merged record: loss, entropy and gradient equal to the CPU kernels'
    (same record, same per-token order)."""
    gen = generator("cuda-model-phases", kind)
    vocab = 50257
    z, u = logits_pair(ROWS, vocab, torch.bfloat16, gen)
    target = labels(ROWS, vocab, gen) if KINDS[kind][1] else None
    if target is not None:
        target[0] = 20000  # a label at a slice's first token
    shards = _slices(kind, z, u, target, [20000, 20001, 33333])
    exact = [record.Field.M_X, record.Field.M_Y, record.Field.TOP, record.Field.TOP_Y, record.Field.PIV,
             record.Field.PIV_Z, record.Field.PIV_U]  # fmt: skip
    cpu_records = torch.stack([compiled_kernels.partial(p) for p in shards])
    for threads in (512, 64):
        model_records = torch.stack([cuda_model.run(p, 1, False, kernel=2, threads=threads)[3] for p in shards])
        assert torch.equal(model_records[..., exact], cpu_records[..., exact])
        sums = [record.Field.S_X, record.Field.S_Y, record.Field.ENT]
        torch.testing.assert_close(model_records[..., sums], cpu_records[..., sums], rtol=2e-6, atol=1e-30)
        acc, s_x = model_records[..., record.Field.ACC], cpu_records[..., record.Field.S_X]  # d_k - N = -ACC / (S_X + 1)
        assert ((acc - cpu_records[..., record.Field.ACC]).abs() <= 1e-5 * (acc.abs() + s_x + 1)).all()
    p0 = shards[0]
    merged = record.merge(cpu_records, p0.divergence, p0.pivot, 1.0 / p0.temperature)
    for p in shards:
        want = compiled_kernels.finish(p, merged, True)
        for threads in (512, 32):
            loss, entropy, grad, _, _ = cuda_model.run(p, 2, True, kernel=2, threads=threads, record=merged.contiguous())
            assert torch.equal(loss, want[0]) and torch.equal(entropy, want[1]) and torch.equal(grad, want[2])


@pytest.mark.parametrize("pair", DTYPE_PAIRS[:4], ids=str)
def test_rows_aligned_differently(pair):
    """A student view whose rows start at other 16-byte offsets than the teacher's: rows aligned alike
    take the vector path after a scalar head, the others are read token by token; both are right."""
    gen = generator("cuda-model-offsets", str(pair))
    vocab = 4099
    big, u = logits_pair(5, vocab + 3, torch.float64, gen)
    z, u = big[:, 3:].to(pair[0]), u[:, :vocab].contiguous().to(pair[1])
    target = labels(5, vocab, gen, ignored=0.0)
    p = validate(Divergence.DRKL, z, u, target, ignore_index=-100, reduction="sum", inplace_backward=False, gamma=0.5,
                 return_entropy=True, temperature=1.0)  # fmt: skip
    cpu = compiled_kernels.forward(p, True)
    for kernel, threads, ranks in [(2, 512, 1), (1, 256, 4)]:
        loss, entropy, grad, _, shape = cuda_model.run(p, 0, True, kernel=kernel, threads=threads, ranks=ranks)
        assert shape.mismatches == 0
        check_against((loss, entropy, grad), cpu, z.dtype, torch.ones(5, dtype=torch.bool))


def test_in_place_gradient():
    """The gradient written into the student rows (each thread reads its tokens before writing them)."""
    gen = generator("cuda-model-inplace")
    z, u = logits_pair(ROWS, 4099, torch.bfloat16, gen)
    target = labels(ROWS, 4099, gen)
    p = validate(Divergence.DRKL, z, u, target, ignore_index=-100, reduction="mean", inplace_backward=False, gamma=0.5,
                 return_entropy=False, temperature=1.0)  # fmt: skip
    want = compiled_kernels.forward(p, True)
    for kernel, threads, ranks in [(2, 512, 1), (1, 256, 2)]:
        zc = z.clone()
        q = dataclasses.replace(p, student=zc, inplace_backward=True)
        loss, _, grad, _, _ = cuda_model.run(q, 0, True, kernel=kernel, threads=threads, ranks=ranks)
        assert grad.data_ptr() == zc.data_ptr()
        assert_loss_close(loss, want[0].double())
        assert_grad_close(zc, want[2].double(), torch.bfloat16)


@pytest.mark.parametrize("student_bytes,teacher_bytes", [(4, 4), (4, 2), (2, 4), (2, 2)])
def test_shared_memory_pieces_are_free_of_bank_conflicts(student_bytes, teacher_bytes):
    """Every warp-wide load of a piece from shared memory is served without bank conflicts, the float32
    teacher beside a 16-bit student included (issue 8, defect 8)."""
    assert cuda_model.library().drkl_model_bank_conflicts(student_bytes, teacher_bytes) == 1


def test_model_arguments_match_the_c_layout():
    import ctypes

    assert ctypes.sizeof(cuda_model.Args) == cuda_model.library().drkl_model_args_size()
