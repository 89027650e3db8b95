"""The core imports without the optional extras; an adapter imported without its extra says which to install.

One child process in which the extras cannot be imported checks both (``probe``, queued at collection
in the background): the core's first loss, then each adapter's import error, as JSON lines."""

import functools
import json
import sys
from pathlib import Path

import pytest

from . import background

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys
sys.modules.update(dict.fromkeys(['trl', 'transformers', 'accelerate']))  # importing them raises ImportError
import importlib, json, torch
import drkl_kernels as dk
z = torch.randn(2, 5)
print(json.dumps({"loss": float(dk.rkl_loss(z, z))}))
for module in ("trl", "hf"):
    try:
        importlib.import_module(f"drkl_kernels.integrations.{module}")
        print(json.dumps({module: None}))
    except ImportError as err:
        print(json.dumps({module: str(err)}))
"""


@functools.cache
def probe() -> tuple[background.Job, Path]:
    """(job, its folder): ``PROBE`` in a child process."""
    base = background.scratch("drkl-extras-")
    cmd = [sys.executable, "-c", PROBE]
    return background.JOBS.submit(cmd, stdout=base / "stdout", stderr=base / "stderr", cwd=ROOT), base


pytestmark = pytest.mark.background(start=probe)


def results() -> dict:
    job, base = probe()
    job.succeed(timeout=300)
    out = {}
    for line in (base / "stdout").read_text().splitlines():
        out.update(json.loads(line))
    return out


def test_core_imports_without_the_extras():
    assert abs(results()["loss"]) <= 1e-6  # KL(p || p) = 0 within SPEC §6's absolute loss error


@pytest.mark.parametrize("module", ["trl", "hf"])
def test_adapter_import_error_names_the_extra(module):
    message = results()[module]
    assert message is not None, f"drkl_kernels.integrations.{module} imported without its extra"
    assert f"pip install 'drkl-kernels[{module}]'" in message, message
