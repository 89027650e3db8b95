"""Does DRKL help? Distil a small transformer with FKL, RKL and DRKL and measure fidelity against diversity.

A teacher (a causal transformer, random init) is trained with cross-entropy on English text that
ships with Python. For each seed, a smaller student is trained briefly with cross-entropy on the
labels (its warm start: distillation starts from a language model, as in LLM distillation), then,
from that same start and on the same batches, trained with forward KL, reverse KL and DRKL at
several gammas (all through drkl_kernels), and with more cross-entropy as the baseline. Fidelity is
measured on held-out text against the teacher, diversity on samples from fixed prompts. Nothing is
downloaded.

    python examples/distill_study.py            # full study (minutes on 2 CPU cores)
    python examples/distill_study.py --quick    # smoke test (under a minute)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from distill import data, metrics, report
from distill.model import Config, TinyGPT
from distill.train import Objective, Schedule, objectives, train_student, train_teacher
from tqdm import tqdm

import drkl_kernels as dk

ROOT = Path(__file__).resolve().parents[1]
TEACHER_SEED = 1234
WARMUP_SEED = 10_000  # the warm-up's batch order: seed + WARMUP_SEED


@dataclass(frozen=True)
class Settings:
    """Sizes of one mode. Teacher and student share the tokenizer and the context length."""

    corpus: str
    vocab: int
    context: int
    teacher: tuple[int, int, int]  # d_model, layers, heads
    student: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    warmup_steps: int
    teacher_batch: int
    batch: int
    teacher_lr: float
    student_lr: float
    eval_windows: int
    probe_windows: int
    probe_every: int
    prompts: int
    prompt_tokens: int
    per_prompt: int
    length: int
    seeds: list[int] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)


FULL = Settings(
    corpus="topics+docstrings",
    vocab=4096,
    context=64,
    teacher=(128, 4, 4),
    student=(64, 2, 2),
    teacher_steps=800,
    student_steps=250,
    warmup_steps=200,
    teacher_batch=16,
    batch=8,
    teacher_lr=3e-3,
    student_lr=3e-3,
    eval_windows=128,
    probe_windows=8,
    probe_every=30,
    prompts=16,
    prompt_tokens=8,
    per_prompt=4,
    length=48,
    seeds=[0, 1, 2],
    gammas=[0.25, 0.5, 1.0],
)
QUICK = Settings(
    corpus="topics",
    vocab=4096,
    context=32,
    teacher=(64, 1, 2),
    student=(32, 1, 2),
    teacher_steps=60,
    student_steps=30,
    warmup_steps=10,
    teacher_batch=8,
    batch=8,
    teacher_lr=3e-3,
    student_lr=3e-3,
    eval_windows=16,
    probe_windows=4,
    probe_every=10,
    prompts=4,
    prompt_tokens=4,
    per_prompt=2,
    length=12,
    seeds=[0],
    gammas=[0.25, 0.5, 1.0],
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "drkl_kernels" / "distill_study"
    parser = argparse.ArgumentParser(
        prog="python examples/distill_study.py",
        description=__doc__.split("\n\n")[0],
        epilog=f"Full mode: {_describe(FULL)}. Quick mode: {_describe(QUICK)}. Outputs: results.json (every number), "
        "report.md (the table), fidelity_diversity.png, training_curves.png.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps: a smoke test of the pipeline")
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...) per objective [full 3, quick 1]")
    parser.add_argument("--gammas", type=float, nargs="+", help="DRKL gammas [0.25 0.5 1.0]")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        help=f"teacher training steps [full {FULL.teacher_steps}, quick {QUICK.teacher_steps}]",
    )
    parser.add_argument(
        "--student-steps",
        type=int,
        help=f"distillation steps per student [full {FULL.student_steps}, quick {QUICK.student_steps}]",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"CE steps that give every student of a seed its common start before distillation "
        f"(0: start from the random init) [full {FULL.warmup_steps}, quick {QUICK.warmup_steps}]",
    )
    parser.add_argument("--out", type=Path, help="results folder [examples/results/<UTC date>-cpu, or ...-cpu-quick]")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache,
        help="where the docstring text, the tokenizer, the token ids and the trained teacher are kept "
        "(each keyed by a hash of what it was built from; delete it to rebuild) [%(default)s]",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 1) // 2)),
        help="torch intra-op threads; the default, half the cores (at most 8), leaves room for other "
        "work: these matmuls are small, and OpenMP threads that contend for cores slow down "
        "many-fold. Results are bitwise reproducible for a given thread count [%(default)s]",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="processes that run seeds in parallel, each with --threads threads; single-threaded processes do "
        "not slow each other down the way contending OpenMP threads do, so one per seed is the default even on "
        "2 cores. The results do not depend on it [one per seed]",
    )
    return parser.parse_args(argv)


def _describe(s: Settings) -> str:
    return (
        f"corpus {s.corpus}, BPE vocabulary {s.vocab}, context {s.context}; teacher d_model/layers/heads "
        f"{s.teacher}, {s.teacher_steps} steps of {s.teacher_batch} windows; students {s.student}, "
        f"{s.warmup_steps} CE warm-up steps, then {s.student_steps} steps of {s.batch} windows per objective; "
        f"{len(s.seeds)} seed(s); samples {s.prompts} prompts x {s.per_prompt} x {s.length} tokens"
    )


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    date = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backends": dk.available_backends(),
    }


def teacher_model(s: Settings, corpus: data.Corpus, windows: torch.Tensor, cache_dir: Path) -> tuple[TinyGPT, dict]:
    """The teacher, trained once and cached under ``cache_dir`` (keyed by the data and settings)."""
    config = Config(corpus.vocab_size, s.context, *s.teacher, dropout=0.1)
    schedule = Schedule(s.teacher_steps, s.teacher_batch, s.teacher_lr)
    spec = json.dumps([corpus.key, config.as_dict(), asdict(schedule), TEACHER_SEED, torch.__version__])
    path = cache_dir / f"teacher-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.pt"
    torch.manual_seed(TEACHER_SEED)
    model = TinyGPT(config)
    if path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        model.eval()
        return model, {"losses": saved["losses"], "train_s": saved["train_s"], "cached": True}
    start = time.monotonic()
    losses = train_teacher(model, windows, schedule, TEACHER_SEED)
    train_s = time.monotonic() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "losses": losses, "train_s": train_s}, path)
    return model, {"losses": losses, "train_s": train_s, "cached": False}


def seed_runs(s: Settings, seed: int, ref: dict, position: int = 0) -> tuple[list[dict], dict | None]:
    """One seed: a student initialised from the seed, trained with CE on the labels for
    ``warmup_steps`` (its start, shared by every objective), then trained from that start with each
    objective on the same batches, and measured. Returns the runs (with the sampled token ids of
    the first continuation) and the warm-up curve. Self-contained, so seeds can run in parallel."""
    config = Config(ref["weight"].shape[0], s.context, *s.student)
    weight, hidden = ref["weight"], ref["hidden"]

    def probe(model: TinyGPT) -> dict:
        return metrics.fidelity(model, ref["probe_windows"], hidden["probe"], weight)

    def train(model: TinyGPT, objective: Objective, steps: int, order_seed: int, desc: str) -> dict:
        schedule = Schedule(steps, s.batch, s.student_lr)
        return train_student(
            model,
            objective,
            ref["distill_windows"],
            hidden["distill"],
            weight,
            schedule,
            order_seed,
            probe,
            s.probe_every,
            desc,
            position,
        )

    torch.manual_seed(seed)
    start = TinyGPT(config)
    warmup = None
    if s.warmup_steps:
        warmup = {
            "seed": seed,
            "curve": train(start, Objective("ce"), s.warmup_steps, WARMUP_SEED + seed, f"CE warm-up seed {seed}"),
        }
    runs = []
    for objective in objectives(s.gammas):
        student = TinyGPT(config)
        student.load_state_dict(start.state_dict())
        t0 = time.monotonic()
        curve = train(student, objective, s.student_steps, seed, f"{objective.label} seed {seed}")
        train_s = time.monotonic() - t0
        samples = metrics.sample(student, ref["prompts"], s.per_prompt, s.length, seed)
        scores = {
            **metrics.fidelity(student, ref["eval_windows"], hidden["eval"], weight),
            **metrics.diversity(samples, s.per_prompt),
        }
        runs.append(
            {
                "objective": objective.label,
                "kind": objective.kind,
                "gamma": objective.gamma,
                "seed": seed,
                "train_s": train_s,
                "metrics": scores,
                "curve": curve,
                "example": samples["tokens"][0].tolist(),
            }
        )
    return runs, warmup


def _worker_setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def students(s: Settings, ref: dict, jobs: int, threads: int) -> tuple[list[dict], list[dict]]:
    """:func:`seed_runs` for every seed, in ``jobs`` processes (in this one when ``jobs`` is 1);
    the results do not depend on ``jobs``."""
    bar = tqdm(total=len(s.seeds), desc="seeds", unit="seed")
    if jobs == 1:
        done = []
        for seed in s.seeds:
            done.append(seed_runs(s, seed, ref, 1))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_setup, initargs=(threads,)) as pool:
            futures = [pool.submit(seed_runs, s, seed, ref, 1 + i % jobs) for i, seed in enumerate(s.seeds)]
            for _ in as_completed(futures):
                bar.update()
            done = [f.result() for f in futures]
    bar.close()
    return [run for runs, _ in done for run in runs], [warmup for _, warmup in done if warmup]


def reference(s: Settings, corpus: data.Corpus, teacher: TinyGPT) -> dict:
    """The windows every student shares (distillation, held-out evaluation, probe, prompts), the
    teacher's final hidden states on them (computed once: the teacher is frozen) and its head."""
    ref = {
        "distill_windows": data.windows(corpus.train, s.context, limit=max(s.student_steps, s.warmup_steps) * s.batch),
        "eval_windows": data.windows(corpus.heldout, s.context, limit=s.eval_windows),
        "probe_windows": data.windows(corpus.heldout, s.context, limit=s.probe_windows),
        "prompts": data.windows(corpus.heldout, s.context, limit=s.prompts)[:, : s.prompt_tokens],
        "weight": teacher.head_weight,
    }
    ref["hidden"] = {
        name: metrics.hidden_states(teacher, ref[f"{name}_windows"]) for name in ("distill", "eval", "probe")
    }
    return ref


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the seed workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(s: Settings, out: Path, cache_dir: Path, command: str, threads: int, jobs: int) -> dict:
    start, cpu_start = time.monotonic(), _cpu_seconds()
    corpus = data.build(s.corpus, s.vocab, cache_dir)
    teacher, teacher_info = teacher_model(s, corpus, data.windows(corpus.train, s.context), cache_dir)
    teacher.requires_grad_(False)
    ref = reference(s, corpus, teacher)
    teacher_eval = metrics.fidelity(teacher, ref["eval_windows"], ref["hidden"]["eval"], ref["weight"])
    teacher_probe = metrics.fidelity(teacher, ref["probe_windows"], ref["hidden"]["probe"], ref["weight"])
    teacher_runs = []
    for seed in s.seeds:
        samples = metrics.sample(teacher, ref["prompts"], s.per_prompt, s.length, seed)
        teacher_runs.append({"seed": seed, "metrics": {**teacher_eval, **metrics.diversity(samples, s.per_prompt)}})
    runs, warmups = students(s, ref, jobs, threads)
    for run in runs:
        run["example"] = corpus.tokenizer.decode(run["example"])
    student_config = Config(corpus.vocab_size, s.context, *s.student)
    results = {
        "command": command,
        "machine": machine(threads),
        "settings": {
            **asdict(s),
            "student": student_config.describe(),
            "eval_tokens": ref["eval_windows"][:, 1:].numel(),
        },
        "data": {
            "corpus": s.corpus,
            "documents": corpus.documents,
            "characters": corpus.characters,
            "train_tokens": corpus.train.numel(),
            "heldout_tokens": corpus.heldout.numel(),
            "distill_tokens": ref["distill_windows"][:, 1:].numel(),
            "vocab": corpus.vocab_size,
        },
        "teacher": {
            "description": teacher.config.describe(),
            "parameters": teacher.parameter_count(),
            "heldout_perplexity": teacher_eval["perplexity"],
            "train_s": teacher_info["train_s"],
            "cached": teacher_info["cached"],
            "losses": teacher_info["losses"],
            "probe": {k: teacher_probe[k] for k in ("perplexity", "entropy")},
        },
        "student_parameters": TinyGPT(student_config).parameter_count(),
        "warmups": warmups,
        "runs": runs,
        "teacher_runs": teacher_runs,
        "summary": report.summarize(runs, teacher_runs),
        "paired": report.paired(runs),
        "wall_s": time.monotonic() - start,
        "cpu_s": _cpu_seconds() - cpu_start,
    }
    report.write(results, out)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    s = QUICK if args.quick else FULL
    s = replace(
        s,
        seeds=list(range(args.seeds)) if args.seeds else s.seeds,
        gammas=args.gammas or s.gammas,
        teacher_steps=args.teacher_steps or s.teacher_steps,
        student_steps=args.student_steps or s.student_steps,
        warmup_steps=s.warmup_steps if args.warmup_steps is None else args.warmup_steps,
    )
    _worker_setup(args.threads)
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or ROOT / "examples" / "results" / f"{day}-cpu{'-quick' if args.quick else ''}"
    command = "python examples/distill_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = run(s, out, args.cache_dir, command.strip(), args.threads, args.jobs or len(s.seeds))
    print(report.table(results["summary"]))
    print(f"wall time {results['wall_s']:.1f} s; results in {out}")


if __name__ == "__main__":
    main()
