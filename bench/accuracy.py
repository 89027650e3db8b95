"""Worst error against the float64 truth, per backend and dtype: ``python -m bench.accuracy``.

Runs the parity and gradient suites (tests/test_parity.py, tests/test_gradients.py: every
SPEC §6 regime) and the fused linear suite (tests/test_fused_linear.py: rows "<backend> (fused
linear)", one per gradient's storage dtype) with DRKL_ERROR_LOG set and reports, per backend and dtype, the worst
relative loss error (over losses of magnitude >= 0.1, where the relative tolerance binds), the worst norm-wise relative
gradient error, and each worst error as a fraction of its SPEC §6 tolerance (loss:
max(1e-5 |loss|, 1e-6); gradient: 1e-5 / 8e-3 / 1e-3 of the norm in fp32 / bf16 / fp16,
plus what the storage dtype cannot represent); below 1 passes. Extra arguments go to
pytest (e.g. -k cpu).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "errors.jsonl"
        env = {**os.environ, "DRKL_ERROR_LOG": str(log)}
        cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_parity.py", "tests/test_gradients.py",
               "tests/test_fused_linear.py", *sys.argv[1:]]  # fmt: skip
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        keys = ("loss_rel", "loss", "grad_rel", "grad")
        worst = collections.defaultdict(lambda: dict.fromkeys(keys + ("checks",), 0))
        for line in log.read_text().splitlines() if log.exists() else []:
            e = json.loads(line)
            w = worst[(e["backend"], e["dtype"])]
            w.update({k: max(w[k], e[k]) for k in keys}, checks=w["checks"] + 1)
    print("\n| backend | dtype | checks | worst loss rel. err | loss err / tol | worst grad rel. err | grad err / tol |")
    print("|---|---|---|---|---|---|---|")
    for (backend, dtype), w in sorted(worst.items()):
        print(f"| {backend} | {dtype} | {w['checks']} | {w['loss_rel']:.2e} | {w['loss']:.3f} | {w['grad_rel']:.2e} | {w['grad']:.3f} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
