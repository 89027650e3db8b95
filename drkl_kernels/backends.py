"""Backend registry: what runs here, and what ``backend="auto"`` picks (SPEC §4).

Every backend is a module with the two phases of the kernel contract (``record``)
and their fusion:

- ``forward(p, want_grad) -> (loss_rows, entropy_rows | None, grad | None)``: one
  launch over whole rows; the gradient is scaled for the reduction (1/n for "mean"),
  in the student's dtype, written into the student when ``p.inplace_backward``;
  entropies only when ``p.return_entropy``;
- ``partial(p) -> records``: ``[rows, record.WIDTH]`` statistics of the slice of the
  vocabulary ``p`` holds (``p.vocab_start``, ``p.vocab_total``);
- ``finish(p, merged, want_grad)``: ``forward``'s outputs for that slice from the
  merged records of the whole rows;
- ``scale_grad_(grad, upstream)``: the backward, in place.

``"reference"`` is PyTorch (``reference.py``); the public API gives it its own
autograd function, which recomputes the gradient in backward.

"auto": CUDA tensors use the compiled CUDA kernels only on the architectures
where they have passed the GPU check (``bench/gpu_check.py`` records them in
``bench/results/cuda_checked.json``; until a GPU has run them none is), else
Triton (else the reference); CPU tensors use the compiled CPU kernels if built
(or buildable), else Triton under ``TRITON_INTERPRET=1``, else the reference.
A compiled backend that fails to build makes "auto" fall back with a
one-time warning. ``backend="cuda"`` runs the CUDA kernels wherever they are
built.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from . import extension

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")
CUDA_CHECKED = Path(__file__).resolve().parent.parent / "bench" / "results" / "cuda_checked.json"


def cuda_checked(capability: tuple[int, int], record: Path | None = None) -> bool:
    """Whether the CUDA kernels have passed the GPU check on an architecture (compute capability),
    as ``bench/gpu_check.py`` records it: ``{"sm_90": {"gpu": ..., "date": ..., "commit": ...,
    "passed": true}, ...}``."""
    try:
        checks = json.loads((record or CUDA_CHECKED).read_text())
    except (OSError, ValueError):
        return False
    entry = checks.get(f"sm_{capability[0]}{capability[1]}") if isinstance(checks, dict) else None
    return isinstance(entry, dict) and entry.get("passed") is True


@functools.cache
def _triton():
    """The Triton kernel module, or None when Triton cannot be imported."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_interpreted() -> bool:
    """True when the Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    kernels = _triton()
    if kernels is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.divergence_kernel, InterpretedFunction)


def _why_not(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run tensors of ``device``, else the reason."""
    if name == "reference":
        return None
    if name == "triton":
        if _triton() is None:
            return "triton is not installed"
        if triton_interpreted() or (device.type == "cuda" and torch.cuda.is_available()):
            return None
        return f"triton runs {device.type} tensors only under TRITON_INTERPRET=1 (CUDA tensors need a GPU)"
    if name == "cpu":
        if device.type != "cpu":
            return f"it runs CPU tensors, not {device.type}"
        return None if extension.available() else "; ".join(extension.missing_tools())
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it runs CUDA tensors on a GPU"
    module = extension.prebuilt()
    if module is not None:
        return None if module.with_cuda() else (
            "drkl_kernels._C was built without its CUDA kernels: rebuild it with a CUDA build of torch and nvcc, "
            "or set DRKL_KERNELS_JIT=1")  # fmt: skip
    if not extension.available() or not extension.cuda_buildable():
        return "the CUDA kernels are not built, and nvcc or a CUDA build of torch is missing"
    return None


def available_backends() -> list[str]:
    """Backends usable on this machine (for at least one device); nothing is built by asking.
    "cuda" is listed wherever its kernels are built, though "auto" picks it only on the
    architectures recorded as checked (``cuda_checked``)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS[1:] if any(_why_not(name, d) is None for d in devices)]


@functools.cache
def _warn_fallback(name: str, reason: str, fallback: str) -> None:
    warnings.warn(f"drkl_kernels: backend '{name}' is unavailable ({reason}); 'auto' uses '{fallback}'", stacklevel=4)


def _compiled_or_fallback(name: str, device: torch.device, fallback: str) -> str:
    reason = _why_not(name, device)
    if reason is None:
        try:
            extension.load()
            return name
        except extension.BuildError as err:
            reason = str(err)
    _warn_fallback(name, reason, fallback)
    return fallback


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; errors name what is available."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            fallback = "triton" if _why_not("triton", device) is None else "reference"
            if not cuda_checked(torch.cuda.get_device_capability(device)):
                return fallback
            return _compiled_or_fallback("cuda", device, fallback)
        fallback = "triton" if triton_interpreted() else "reference"
        return _compiled_or_fallback("cpu", device, fallback) if device.type == "cpu" else fallback
    reason = _why_not(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is not available here ({reason}); available: {available_backends()}")
    return backend


def kernels(name: str):
    """The kernel module of a concrete backend."""
    if name == "triton":
        return _triton()
    if name == "reference":
        from . import reference

        return reference
    from . import compiled_kernels

    return compiled_kernels
