"""The core imports without the optional extras; an adapter imported without its extra says which to install."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDE = "import sys; sys.modules.update(dict.fromkeys(['trl', 'transformers', 'accelerate']));"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_core_imports_without_the_extras():
    out = _python("import drkl_kernels as dk, torch; z = torch.randn(2, 5); print(float(dk.rkl_loss(z, z)))")
    assert out.returncode == 0, out.stderr[-2000:]
    assert abs(float(out.stdout)) <= 1e-6  # KL(p || p) = 0 within SPEC §6's absolute loss error


@pytest.mark.parametrize("module", ["trl", "hf"])
def test_adapter_import_error_names_the_extra(module):
    out = _python(f"import drkl_kernels.integrations.{module}")
    assert out.returncode != 0
    assert f"pip install 'drkl-kernels[{module}]'" in out.stderr, out.stderr[-2000:]
