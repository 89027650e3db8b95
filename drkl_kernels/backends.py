"""Backend registry: what runs here, and what ``backend="auto"`` picks (SPEC §4).

A kernel backend is a module with ``forward(problem, want_grad)``, returning
per-row losses and the reduction-scaled gradient, and ``scale_grad_(grad,
upstream)``; ``"reference"`` is PyTorch with its own autograd function.

"auto": CUDA tensors use the compiled CUDA kernels if they are built (or
buildable), else Triton; CPU tensors use the compiled CPU kernels if built
(or buildable), else Triton under ``TRITON_INTERPRET=1``, else the reference.
A compiled backend that fails to build makes "auto" fall back with a
one-time warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import extension

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


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
    """Backends usable on this machine (for at least one device); nothing is built by asking."""
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
            return _compiled_or_fallback("cuda", device, "triton" if _why_not("triton", device) is None else "reference")
        fallback = "triton" if triton_interpreted() else "reference"
        return _compiled_or_fallback("cpu", device, fallback) if device.type == "cpu" else fallback
    reason = _why_not(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is not available here ({reason}); available: {available_backends()}")
    return backend


def kernels(name: str):
    """The kernel module of a concrete backend other than "reference"."""
    if name == "triton":
        return _triton()
    from . import compiled_kernels

    return compiled_kernels
