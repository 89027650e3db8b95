"""What a loss call costs besides its arithmetic (SPEC §7), observed on any device.

``Recording(backend)`` (a concrete backend name) is a ``TorchDispatchMode`` that sees every ATen op dispatched in its
block, from Python or from the compiled extension, and wraps the backend's kernel entry points:

- ``syncs``: the ops that make the host wait for the device (``.item()`` and the ``float()``,
  ``bool()`` behind it, ``nonzero``, ``torch.equal``, boolean-mask indexing, copies from a device
  to the CPU, ...). On a CPU tensor they cost nothing, but the same code on a GPU would stall,
  so finding them on the CPU is enough.
- ``peak``: the most bytes held at once by the tensors allocated in the block (a storage that
  no input of the op owns is an allocation; it is released when its storage dies), and
  ``allocations``, each one's op, shape, dtype and size; ``assert_gradient_and_rows_only``
  checks SPEC §7's bound on it.
- ``launches``: one name per call of a kernel entry point: every Triton kernel of
  ``triton_kernels`` (under the interpreter, the launch's own host copies are not recorded:
  they do not exist on a GPU), every function of the compiled module that takes a tensor.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drkl_kernels import backends, extension

# Ops whose result the host must wait for (their output size or value depends on device data).
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "bincount",
}  # fmt: skip
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def is_sync(func, args, kwargs) -> bool:
    """Whether dispatching ``func`` on these arguments would make the host wait for a device."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in MASK_INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype == torch.bool for i in indices)
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
        return dst.type == "cpu" and src.device.type != "cpu"
    return False


class Recording(TorchDispatchMode):
    def __init__(self, backend: str = "reference"):
        super().__init__()
        self.backend = backend
        self.syncs: list[str] = []
        self.allocations: list[tuple[str, tuple, torch.dtype, int]] = []
        self.launches: list[str] = []
        self.peak = 0
        self._live: list[tuple[StorageWeakRef, int, int]] = []  # (storage, data_ptr, bytes)
        self._paused = 0
        self._patches = contextlib.ExitStack()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        if is_sync(func, args, kwargs):
            self.syncs.append(str(func))
        out = func(*args, **kwargs)
        owned = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        self._live = [entry for entry in self._live if not entry[0].expired()]
        live = {ptr for _, ptr, _ in self._live}
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size and ptr not in owned and ptr not in live:
                self._live.append((StorageWeakRef(storage), ptr, size))
                self.allocations.append((str(func), tuple(t.shape), t.dtype, size))
                live.add(ptr)
        self.peak = max(self.peak, sum(size for _, _, size in self._live))
        return out

    def assert_gradient_and_rows_only(self, grad_bytes: int, rows: int) -> None:
        """SPEC §7's memory: at most the gradient (0 in place or without one) plus a few bytes per
        row and a few scalars; any [rows, V] buffer, even of bytes, exceeds it when V >> 64."""
        allowed = grad_bytes + 64 * rows + 1024
        assert self.peak <= allowed, (
            f"peak {self.peak} B > gradient {grad_bytes} B + {allowed - grad_bytes} B for {rows} rows: {self.allocations}"
        )

    def unrecorded(self, fn):
        """``fn`` with the recording paused while it runs."""

        @functools.wraps(fn)
        def call(*args, **kwargs):
            self._paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._paused -= 1

        return call

    def _launching(self, name: str, fn, *, record_inside: bool):
        inner = fn if record_inside else self.unrecorded(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not self._paused:
                self.launches.append(name)
            return inner(*args, **kwargs)

        return call

    def _wrap_entry_points(self) -> None:
        if self.backend == "triton":
            from triton.runtime.jit import KernelInterface

            module = backends.kernels("triton")
            for attr, kernel in vars(module).items():
                if isinstance(kernel, KernelInterface):
                    # kernel[grid](...) calls kernel.run; the interpreter's host copies stay unrecorded
                    kernel.run = self._launching(attr, kernel.run, record_inside=False)
                    self._patches.callback(delattr, kernel, "run")
        elif self.backend in ("cpu", "cuda"):
            compiled = extension.load()
            proxy = _Launches(compiled, self)
            original = extension.load
            extension.load = lambda: proxy
            self._patches.callback(setattr, extension, "load", original)

    def __enter__(self):
        self._wrap_entry_points()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


class _Launches:
    """The compiled module, its functions that take tensors counted as kernel launches (the ops
    they dispatch stay recorded)."""

    def __init__(self, module, recording: Recording):
        self._module, self._recording = module, recording

    def __getattr__(self, attr):
        fn = getattr(self._module, attr)
        launch = self._recording._launching(attr, fn, record_inside=True)

        def call(*args, **kwargs):
            return (launch if _tensors((args, kwargs)) else fn)(*args, **kwargs)

        return call
