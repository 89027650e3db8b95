"""pytest-benchmark microbenchmarks of loss + gradient and of the loss alone:
``pytest bench/ --benchmark-only``. The normal test run (``pytest``) does not collect them.

GPU: DRKL at 8192 rows over the vocabularies that matter, bf16 and fp32. CPU: declared
smaller shapes (256 rows, V = 32000 and 128256, fp32) so the run takes minutes. A runner
that cannot run here is skipped with its reason, never dropped silently.
"""

import pytest
import torch

from .cases import RUNNERS, Case, call, inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SHAPES, DTYPES_ = [(8192, v) for v in (32_000, 128_256, 151_936, 256_000)], ("bf16", "fp32")
else:
    SHAPES, DTYPES_ = [(256, 32_000), (256, 128_256)], ("fp32",)
CASES = [Case("drkl", rows, vocab, dtype, backward) for rows, vocab in SHAPES for dtype in DTYPES_ for backward in (True, False)]


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.name.replace(" ", "-"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_drkl(benchmark, monkeypatch, runner, case):
    reason = runner.why_not(DEVICE, case)
    if reason is not None:
        pytest.skip(f"n/a: {reason}")
    for key, value in runner.env.items():
        monkeypatch.setenv(key, value)
    fn = runner.build(case)
    z, u, t = inputs(case, DEVICE)

    def step():
        call(fn, case, z, u, t)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(elements=case.elements, design_bytes_per_element=runner.design_bytes(DEVICE, case),
                                floor_bytes_per_element=case.floor_bytes())  # fmt: skip
    benchmark.pedantic(step, warmup_rounds=2, rounds=10 if DEVICE == "cuda" else 3, iterations=1)
