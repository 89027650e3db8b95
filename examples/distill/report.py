"""The study's outputs: mean ± std over seeds as a markdown table and JSON, and two figures.

``results.json`` holds every number (the machine, the settings, the teacher, each run's metrics
and curves, the summary); ``report.md`` the table; ``fidelity_diversity.png`` one marker per
objective with error bars (std over seeds) on four fidelity/diversity planes, the teacher as a
dashed line; ``training_curves.png`` the training objective and the held-out probe over steps.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

FIDELITY = [
    ("perplexity", "held-out ppl"),
    ("fkl", "FKL(p‖q)"),
    ("rkl", "RKL(q‖p)"),
    ("top1_agreement", "top-1 agree"),
    ("ece", "ECE"),
]
DIVERSITY = [
    ("sample_entropy", "sample entropy"),
    ("top1_share", "top-1 share"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("distinct_3", "distinct-3"),
    ("self_bleu", "self-BLEU"),
]
TEACHER = "teacher"


def machine(m: dict) -> str:
    """The machine of ``results["machine"]`` in words."""
    threads = f"{m['threads']} torch thread{'s' * (m['threads'] > 1)}"
    return f"{m['cpu']} ({m['cores']} cores, {threads}, no GPU), Python {m['python']}, torch {m['torch']}"


def _stats(values: list[float]) -> list:
    """``[mean, std, n]``, the sample std (0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)]


def summarize(runs: list[dict], teacher_runs: list[dict]) -> dict:
    """``{label: {metric: [mean, std, n]}}`` over seeds, the teacher last."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["objective"], []).append(run["metrics"])
    groups[TEACHER] = [run["metrics"] for run in teacher_runs]
    return {label: {key: _stats([m[key] for m in ms]) for key in ms[0]} for label, ms in groups.items()}


def paired(runs: list[dict], reference: str = "RKL") -> dict:
    """``{label: {metric: [mean, std, n]}}`` of the per-seed difference ``label - reference``: the
    runs of a seed share the start and the batches, so this removes the spread between seeds."""
    by_key = {(run["objective"], run["seed"]): run["metrics"] for run in runs}
    seeds = sorted({run["seed"] for run in runs})
    labels = [label for label in dict.fromkeys(run["objective"] for run in runs) if label != reference]
    return {
        label: {
            key: _stats([by_key[(label, seed)][key] - by_key[(reference, seed)][key] for seed in seeds])
            for key in by_key[(reference, seeds[0])]
        }
        for label in labels
    }


def table(summary: dict, signed: bool = False) -> str:
    """Markdown: one row per objective and one for the teacher (its fidelity to itself left out);
    ``signed`` for a table of differences."""
    columns = FIDELITY + DIVERSITY
    lines = ["| objective | " + " | ".join(name for _, name in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, metrics in summary.items():
        cells = []
        for key, _ in columns:
            if label == TEACHER and key in ("fkl", "rkl", "top1_agreement"):
                cells.append("—")
            else:
                mean, std, _ = metrics[key]
                digits = 1 if key == "perplexity" else 3
                cells.append(f"{mean:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    """Write results.json, report.md and the two figures into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = results["summary"]
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    s, t, m = results["settings"], results["teacher"], results["machine"]
    seeds = len(s["seeds"])
    teacher_time = (
        " (the teacher loaded from the cache)" if t["cached"] else f", {t['train_s']:.0f} s of it training the teacher"
    )
    setup = (
        f"Teacher: {t['description']}, {t['parameters']:,} parameters, held-out perplexity "
        f"{t['heldout_perplexity']:.1f}. Students: {s['student']}, {results['student_parameters']:,} parameters; "
        f"{s['warmup_steps']} CE warm-up steps, then {s['student_steps']} steps of {s['batch']} windows of "
        f"{s['context']} tokens per objective; {seeds} seed{'s' * (seeds > 1)}. Fidelity on {s['eval_tokens']:,} "
        f"held-out tokens; diversity on {s['prompts']} prompts × {s['per_prompt']} samples × {s['length']} tokens "
        "at temperature 1."
    )
    lines = [
        f"# Distillation study ({m['date']})",
        "",
        (
            f"`{results['command']}` on {machine(m)}: wall time {results['wall_s']:.0f} s{teacher_time}; "
            f"CPU time {results['cpu_s']:.0f} s."
        ),
        "",
        setup,
        "",
        "Mean ± std over seeds:",
        "",
        table(summary),
        "",
        f"Difference from RKL under the same seed (same start, same batches), mean ± std over {seeds} seeds:",
        "",
        table(results["paired"], signed=True),
        "",
        "![fidelity against diversity](fidelity_diversity.png)",
        "![training curves](training_curves.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    _plot_tradeoff(summary, out / "fidelity_diversity.png")
    _plot_curves(results["runs"], results["teacher"]["probe"], out / "training_curves.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels) -> dict:
    palette = ["#7f7f7f", "#1f77b4", "#d62728", "#f2b134", "#2ca02c", "#17becf", "#9467bd", "#8c564b"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _plot_tradeoff(summary: dict, path: Path) -> None:
    plt = _pyplot()
    planes = [
        ("fkl", "sample_entropy", "← closer to the teacher (held-out FKL)", "entropy of samples (nats) →"),
        ("top1_agreement", "distinct_2", "top-1 agreement with the teacher →", "distinct-2 of samples →"),
        (
            "rkl",
            "top1_share",
            "← closer to the teacher (held-out RKL)",
            "top-1 probability on samples (over-confidence)",
        ),
        ("perplexity", "self_bleu", "← held-out perplexity", "self-BLEU of samples (lower = more diverse)"),
    ]
    students = [label for label in summary if label != TEACHER]
    colors = _colors(students)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (x, y, xlabel, ylabel) in zip(axes.flat, planes):
        for label in students:
            (mx, sx, _), (my, sy, _) = summary[label][x], summary[label][y]
            ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", ms=7, capsize=3, color=colors[label], label=label)
        ax.axhline(summary[TEACHER][y][0], color="black", ls="--", lw=1, label="teacher")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Fidelity (x) against diversity (y), mean ± std over seeds; dashed: the teacher's own samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(runs: list[dict], teacher_probe: dict, path: Path) -> None:
    plt = _pyplot()
    by_label: dict[str, list[dict]] = {}
    for run in runs:
        by_label.setdefault(run["objective"], []).append(run["curve"])
    colors = _colors(by_label)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        ("perplexity", "held-out probe perplexity", axes[0, 1]),
        ("fkl", "held-out probe FKL(p‖q)", axes[1, 0]),
        ("entropy", "held-out probe entropy H(q)", axes[1, 1]),
    ]
    for label, curves in by_label.items():
        loss = [statistics.fmean(c["loss"][i] for c in curves) for i in range(len(curves[0]["loss"]))]
        window = max(1, len(loss) // 50)
        smooth = [statistics.fmean(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
        axes[0, 0].plot(range(1, len(loss) + 1), smooth, color=colors[label], label=label)
        steps = curves[0]["probe_step"]
        for key, _, ax in panels:
            values = [[c["probe"][i][key] for c in curves] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.plot(steps, mean, color=colors[label], label=label)
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=colors[label],
                alpha=0.2,
            )
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_title("training objective (each its own units; running mean)")
    for key, title, ax in panels:
        if key in teacher_probe:
            ax.axhline(teacher_probe[key], color="black", ls="--", lw=1, label="teacher")
        ax.set_title(title)
        ax.set_yscale("log" if key in ("perplexity", "fkl") else "linear")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    fig.suptitle("Training: mean over seeds (bands: ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
