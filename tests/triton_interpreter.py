"""A faster Triton interpreter for the test session (``TRITON_INTERPRET=1``, no GPU), with the same
results bit for bit (``test_triton_interpreter.py`` compares them).

Triton 3.9's interpreter patches ``triton.language`` for the interpreter (``_patch_lang``: a walk of
``inspect.getmembers`` over ``tl``, ``tl.tensor`` and ``tl.math``) at every launch *and again at
every call of a ``@triton.jit`` helper inside the kernel*, and it never undoes a helper's patch
before the launch ends. So within one launch, a second patch of the same modules changes nothing;
it was half of the time of each interpreted launch here (a 8 x 5000 DRKL forward and backward:
0.46 s, 0.25 s without). ``install`` skips a helper's patch when every language module the helper
sees was already patched during the current launch; the launch's own patch, its undoing at the end,
and the first patch of any other module are Triton's own."""

from __future__ import annotations

import contextlib
import inspect
import os

import triton.language as tl
from triton.runtime import interpreter

_ORIGINAL_PATCH = interpreter._patch_lang
_ORIGINAL_LAUNCH = interpreter.GridExecutor.__call__
_state = {"launching": False, "patched": set(), "enabled": True, "installed": False, "patches": 0}
_langs: dict = {}  # function -> the language modules its globals see (what _patch_lang patches)


def _langs_of(fn) -> frozenset:
    if fn not in _langs:
        _langs[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
    return _langs[fn]


def _patch_lang(fn):
    key = _langs_of(fn)
    if _state["enabled"] and _state["launching"] and key <= _state["patched"]:
        return interpreter._LangPatchScope()  # already patched in this launch, and not undone since
    _state["patches"] += 1
    scope = _ORIGINAL_PATCH(fn)
    if _state["launching"]:
        _state["patched"] |= key
    return scope


def _launch(self, *args, **kwargs):
    _state["launching"], _state["patched"] = True, set()
    try:
        return _ORIGINAL_LAUNCH(self, *args, **kwargs)
    finally:
        _state["launching"], _state["patched"] = False, set()


def install() -> None:
    """Where this process's Triton is the interpreter (``TRITON_INTERPRET=1``), replaces its
    ``_patch_lang`` (looked up at each call by launches and helpers); elsewhere, nothing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    interpreter._patch_lang = _patch_lang
    interpreter.GridExecutor.__call__ = _launch
    _state["installed"] = True


def installed() -> bool:
    return _state["installed"]


@contextlib.contextmanager
def counting():
    """Yields a function that returns how many of Triton's own patches ran within."""
    start = _state["patches"]
    yield lambda: _state["patches"] - start


@contextlib.contextmanager
def triton_own():
    """Within: every patch is Triton's own (the comparison in ``test_triton_interpreter.py``)."""
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = True
