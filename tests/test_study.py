"""The distillation study (examples/distill_study.py) in its quick mode: outputs exist, every loss is
finite and decreases, the metrics are in range, and a rerun of four of the objectives on the cached
data and teacher gives the same numbers. Nothing here checks which loss wins. Both runs are one background job (``runs``),
queued at collection; the tests run at the end of the session."""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from . import background

for _module in ("tokenizers", "tqdm", "matplotlib"):
    pytest.importorskip(_module, reason=f"the study extra is not installed ({_module}): pip install -e '.[study]'")

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {"CE (labels)", "FKL", "RKL", "DRKL γ=0.25", "DRKL γ=0.5", "DRKL γ=1"}
OUTPUTS = ("results.json", "report.md", "fidelity_diversity.png", "training_curves.png")
RERUN_GAMMAS = (0.5,)  # the rerun: CE, FKL, RKL and DRKL γ=0.5


def quick(out: Path, cache: Path, *more: str) -> list[str]:
    options = ["--quick", "--threads", "1", "--out", str(out), "--cache-dir", str(cache), *more]
    return [sys.executable, "examples/distill_study.py", *options]


@functools.cache
def runs() -> tuple[background.Job, Path]:
    """(job, its folder): the study's quick mode, then a rerun of four of its six objectives
    (RERUN_GAMMAS) on the first run's cached data and teacher, one after the other in one background
    job (``background``) queued at collection."""
    base = background.scratch("drkl-study-")
    first = shlex.join(quick(base / "out", base / "cache"))
    again = shlex.join(quick(base / "again", base / "cache", "--gammas", *map(str, RERUN_GAMMAS)))
    return background.JOBS.submit(["sh", "-c", f"{first} && {again}"], stdout=base / "log", cwd=ROOT), base


pytestmark = pytest.mark.background(start=runs)


@pytest.fixture(scope="module")
def study() -> tuple[Path, dict]:
    """(the job's folder, the first run's results.json)"""
    job, base = runs()
    job.succeed(timeout=1200)
    return base, json.loads((base / "out" / "results.json").read_text())


def test_outputs_exist(study):
    base, results = study
    for name in OUTPUTS:
        assert (base / "out" / name).stat().st_size > 0, name
    assert {run["objective"] for run in results["runs"]} == OBJECTIVES
    assert set(results["summary"]) == OBJECTIVES | {"teacher"}
    assert "| DRKL γ=0.5 |" in (base / "out" / "report.md").read_text()


def _decreases(losses: list[float]) -> bool:
    k = max(1, len(losses) // 5)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_losses_finite_and_decreasing(study):
    _, results = study
    assert all(map(math.isfinite, results["teacher"]["losses"])) and _decreases(results["teacher"]["losses"])
    for run in results["runs"]:
        losses = run["curve"]["loss"]
        assert len(losses) == results["settings"]["student_steps"], run["objective"]
        assert all(map(math.isfinite, losses)), run["objective"]
        assert _decreases(losses), (run["objective"], losses)
        probes = run["curve"]["probe"]
        assert probes[-1]["perplexity"] < probes[0]["perplexity"], run["objective"]


def test_metrics_in_range(study):
    _, results = study
    log_v = math.log(results["data"]["vocab"])
    ranges = {
        "perplexity": (1.0, results["data"]["vocab"] * 10.0),
        "fkl": (0.0, 50.0),
        "rkl": (0.0, 50.0),
        "top1_agreement": (0.0, 1.0),
        "ece": (0.0, 1.0),
        "entropy": (0.0, log_v),
        "sample_entropy": (0.0, log_v),
        "top1_share": (0.0, 1.0),
        "distinct_1": (0.0, 1.0),
        "distinct_2": (0.0, 1.0),
        "distinct_3": (0.0, 1.0),
        "self_bleu": (0.0, 1.0),
    }
    for run in results["runs"] + results["teacher_runs"]:
        who = run.get("objective", "teacher")
        assert set(run["metrics"]) == set(ranges), who
        for key, (low, high) in ranges.items():
            value = run["metrics"][key]
            assert math.isfinite(value) and low - 1e-6 <= value <= high + 1e-6, (who, key, value)
    teacher = results["teacher_runs"][0]["metrics"]
    assert teacher["fkl"] == pytest.approx(0.0, abs=1e-5) and teacher["top1_agreement"] > 0.99  # against itself


def test_rerun_is_deterministic(study):
    base, results = study
    again = json.loads((base / "again" / "results.json").read_text())
    assert again["teacher"]["cached"] and not results["teacher"]["cached"]
    first = {r["objective"]: r for r in results["runs"]}
    assert {r["objective"] for r in again["runs"]} == OBJECTIVES - {"DRKL γ=0.25", "DRKL γ=1"}
    for run in again["runs"]:  # each objective's run depends on the seed only, not on the others run beside it
        assert run["metrics"] == first[run["objective"]]["metrics"], run["objective"]
        assert run["curve"]["loss"] == first[run["objective"]]["curve"]["loss"], run["objective"]
