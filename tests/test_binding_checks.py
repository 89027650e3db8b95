"""The binding refuses gradients the kernels could not write safely (issue 8, defect 7): rows that
overlap (a zero or short row stride, in place too), and memory shared with the teacher or, unless
it is the student itself, with the student. Nothing is written when it refuses."""

import pytest
import torch

from drkl_kernels import extension

V = 64


def call(student, teacher, grad):
    loss = torch.empty(student.shape[0])
    extension.load().forward(student, teacher, None, loss, None, grad, None, None, 2, 1, 0, 1.0, 0.5, 1.0, 0.0, 1.0,
                             0.0, -100, 0, V)  # fmt: skip


def logits(rows=3, cols=V):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(8))


CASES = {
    "zero row stride": (lambda z, u: (z, u, logits(1).expand(3, V)), "rows overlap"),
    "short row stride": (lambda z, u: (z, u, logits(1, 3 * V)[0, : 2 * V + V // 2].as_strided((3, V), (V // 2, 1))),
                         "rows overlap"),  # fmt: skip
    "in place, zero row stride": (lambda z, u: ((s := logits(1).expand(3, V)), u, s), "rows overlap"),
    "the teacher": (lambda z, u: (z, u, u), "teacher_logits"),
    "part of the teacher": (lambda z, u: (z, (b := logits(3, V + 1))[:, :V], b[:, 1:]), "teacher_logits"),
    "part of the student": (lambda z, u: ((b := logits(3, V + 1))[:, :V], u, b[:, 1:]), "student_logits"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsafe_gradients_are_refused(case):
    make, words = CASES[case]
    student, teacher, grad = make(logits(), logits())
    before = [t.clone() for t in (student, teacher, grad)]
    with pytest.raises(ValueError, match=words):
        call(student, teacher, grad)
    for b, t in zip(before, (student, teacher, grad)):
        assert torch.equal(b, t)


def test_in_place_gradient_is_accepted():
    student, teacher = logits(), logits()
    call(student, teacher, student)
    assert torch.isfinite(student).all()
