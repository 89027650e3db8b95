"""Backend registry: what runs here, and what ``backend="auto"`` picks (SPEC §4).

A kernel backend is an object with ``forward(problem, want_grad)`` returning
per-row float32 losses and the reduction-scaled gradient, and
``scale_grad_(grad, upstream)``; ``"reference"`` is autograd over PyTorch.
"""

from __future__ import annotations

import functools

import torch

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


def _triton_runs_on(device: torch.device) -> str | None:
    """None when the Triton backend can run tensors of ``device``, else why not."""
    if _triton() is None:
        return "triton is not installed"
    if triton_interpreted() or (device.type == "cuda" and torch.cuda.is_available()):
        return None
    return f"triton runs {device.type} tensors only under TRITON_INTERPRET=1 (CUDA tensors need a GPU)"


def available_backends() -> list[str]:
    """Backends usable on this machine (for at least one device)."""
    names = ["reference"]
    if _triton() is not None and (triton_interpreted() or torch.cuda.is_available()):
        names.append("triton")
    return names


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; errors name what is available."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" or triton_interpreted():
            return "triton" if _triton_runs_on(device) is None else "reference"
        return "reference"
    if backend == "triton":
        reason = _triton_runs_on(device)
        if reason is not None:
            raise ValueError(f"backend 'triton' is not available here ({reason}); available: {available_backends()}")
    elif backend != "reference":
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    return backend


def kernels(name: str):
    """The kernel module of a concrete backend other than "reference"."""
    return _triton()
