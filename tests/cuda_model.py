"""The host model of the CUDA kernels (``tests/cuda_model.cpp``), built once and called through ctypes.

``run(p, phase, want_grad, kernel, threads, ranks)`` is ``compiled_kernels._call`` for the model:
it fills ``drkl_args`` (``csrc/drkl_launch.h``) from a validated ``Problem`` and returns the loss,
entropy, gradient and record rows the kernel would write, with the lane merges counted and the
lanes that ended with other bits than their group (``mismatches``, 0 where the device code needs
identical state).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from drkl_kernels import extension
from drkl_kernels.problem import Problem
from drkl_kernels.reduction import mean_grad_scale

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "cuda_model.cpp", *(ROOT / "csrc" / n for n in ("drkl_math.h", "drkl_partition.h", "drkl_launch.h"))]
FUSED, PARTIAL, FINISH = 0, 1, 2
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("student", "teacher", "target", "loss", "entropy", "grad", "record", "mean_scale")]
    _fields_ += [(n, ctypes.c_int64) for n in ("rows", "vocab", "student_stride", "teacher_stride", "grad_stride", "vocab_start", "vocab_total")]
    _fields_ += [(n, ctypes.c_int32) for n in ("student_dtype", "teacher_dtype", "target_is_int64", "divergence", "pivot", "phase")]
    _fields_ += [(n, ctypes.c_double) for n in ("inv_tau", "gamma", "student_scale", "student_softcap", "teacher_scale", "teacher_softcap")]
    _fields_ += [("ignore_index", ctypes.c_int64), ("num_threads", ctypes.c_int32), ("cuda_passes", ctypes.c_int32)]


class Shape(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_int32), ("threads", ctypes.c_int32), ("ranks", ctypes.c_int32), ("unused", ctypes.c_int32),
                ("merges", ctypes.c_int64), ("mismatches", ctypes.c_int64)]  # fmt: skip


@functools.cache
def library() -> ctypes.CDLL:
    """The model, compiled with the CPU kernels' flags (cached by the sources' hash and the flags)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + repr(extension.CXX_FLAGS).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"drkl_cuda_model_{digest}.so"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.so")
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", *extension.CXX_FLAGS, "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
               str(SOURCES[0]), "-o", str(tmp)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))
    lib.drkl_model_forward.argtypes = [ctypes.POINTER(Args), ctypes.POINTER(Shape)]
    lib.drkl_model_bank_conflicts.argtypes = [ctypes.c_int32, ctypes.c_int32]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(p: Problem, phase: int, want_grad: bool, *, kernel: int, threads: int, ranks: int = 1,
        record: torch.Tensor | None = None):  # fmt: skip
    """(loss, entropy, grad, record, shape) of one modelled launch over the problem ``p``."""
    f32 = dict(dtype=torch.float32)
    rows = p.rows
    loss = torch.full((rows,), float("nan"), **f32) if phase != PARTIAL else None
    entropy = torch.full((rows,), float("nan"), **f32) if phase != PARTIAL and p.return_entropy else None
    grad = None
    if want_grad:
        grad = p.student if p.inplace_backward else torch.full_like(p.student, float("nan"))
    if phase == PARTIAL:
        record = torch.full((rows, 11), float("nan"), **f32)
    scale = mean_grad_scale(p).to(torch.float32).reshape(1) if want_grad and p.reduction == "mean" else None
    target = None if p.target is None else p.target.contiguous()
    s, t = p.student_transform, p.teacher_transform
    a = Args(
        _ptr(p.student), _ptr(p.teacher), _ptr(target), _ptr(loss), _ptr(entropy), _ptr(grad), _ptr(record), _ptr(scale),
        rows, p.vocab, p.student.stride(0), p.teacher.stride(0), 0 if grad is None else grad.stride(0),
        p.vocab_start, p.vocab_total, DTYPES[p.student.dtype], DTYPES[p.teacher.dtype],
        int(target is not None and target.dtype == torch.int64), int(p.divergence), int(p.pivot), phase,
        1.0 / p.temperature, p.gamma, s.scale, s.softcap or 0.0, t.scale, t.softcap or 0.0, p.ignore_index, 1, 0,
    )  # fmt: skip
    shape = Shape(kernel, threads, ranks, 0, 0, 0)
    rc = library().drkl_model_forward(ctypes.byref(a), ctypes.byref(shape))
    assert rc == 0, f"the model refused the call ({rc})"
    return loss, entropy, grad, record, shape
