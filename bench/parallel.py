"""Vocabulary-parallel benchmark: ``python -m bench.parallel [--help]``.

In one run, per backend: the single-process time of loss + gradient over whole rows
``[rows, V]`` (with all the threads), then the same rows split over a gloo group of W ranks
(``torch.multiprocessing``; each rank holds ``[rows, V / W]`` and gets threads / W threads, so both
use the same cores), and the time of the collective alone (one ``all_gather`` of the records).
A parallel step is timed from a barrier to the end of backward on every rank; its time is the
slowest rank's. The bytes each rank hands to the collective are counted on the c10d operators
(measured) and compared with the design: ``(rows + 1) * WIDTH * 4`` (``drkl_kernels.parallel``).
Writes ``results.json`` and ``report.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from drkl_kernels import backends, record

from .cases import LOSSES as FUNCTIONS
from .cases import Case, call, inputs
from .report import ROOT, machine


class SentBytes(TorchDispatchMode):
    """Bytes this rank hands to c10d collectives while active."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            sent = args[1] if func.__name__.startswith("_allgather_base") else args[0][0]
            self.count, self.bytes = self.count + 1, self.bytes + sent.numel() * sent.element_size()
        return func(*args, **(kwargs or {}))


def _times(step, reps: int, world: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``step``, each started together on every rank."""
    out = []
    for _ in range(reps):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def _rank(rank: int, world: int, spec: dict, out: str) -> None:
    case, backend = Case(**spec["case"]), spec["backend"]
    torch.set_num_threads(max(1, spec["threads"] // world))
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=world)
        group = dist.group.WORLD
    bounds = [case.vocab * r // world for r in range(world + 1)]
    for turn in range(world):  # one rank at a time builds the whole rows and keeps its shard
        if turn == rank:
            z, u, t = inputs(case, "cpu")
            z, u = (x[:, bounds[rank] : bounds[rank + 1]].contiguous() for x in (z, u))
        if world > 1:
            dist.barrier()
    fn = FUNCTIONS[case.divergence]
    step = lambda: call(lambda zz, uu, tt: fn(zz, uu, tt, backend=backend, process_group=group), case, z, u, t)  # noqa: E731
    result = {"rank": rank}
    try:
        with SentBytes() as sent:
            loss = fn(z.detach().requires_grad_(True), u, t, backend=backend, process_group=group)
            loss.backward()
        result.update(loss=loss.item(), collectives_first=sent.count)
        with SentBytes() as sent:
            step()
        result.update(collectives=sent.count, sent_bytes=sent.bytes)
        result["ms"] = _times(step, spec["reps"], world)
        if world > 1:
            mine = torch.empty(case.rows + 1, record.WIDTH)
            gathered = torch.empty(world * (case.rows + 1), record.WIDTH)
            result["collective_ms"] = _times(lambda: dist.all_gather_single(gathered, mine), 20, world)
    except Exception as err:  # reported as the row's status, like bench.report's runners
        result["error"] = f"{type(err).__name__}: {err}"[:300]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


def measure(case: Case, backend: str, world: int, threads: int, reps: int) -> dict:
    """Runs one configuration in fresh processes; returns the slowest rank's per-call times and what rank 0 saw."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "case": case.__dict__,
            "backend": backend,
            "threads": threads,
            "reps": reps,
            "init": f"file://{tmp}/store",
        }
        mp.spawn(_rank, args=(world, spec, tmp), nprocs=world)
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"status": f"n/a: {errors[0]}"}
    per_call = [max(r["ms"][i] for r in ranks) for i in range(reps)]
    out = {"status": "ok", "median_ms": statistics.median(per_call), "ms": per_call, "loss": ranks[0]["loss"],
           "same_loss_on_every_rank": len({r["loss"] for r in ranks}) == 1, "collectives": ranks[0]["collectives"],
           "collectives_first_call": ranks[0]["collectives_first"], "sent_bytes": ranks[0]["sent_bytes"]}  # fmt: skip
    if world > 1:
        out["collective_median_ms"] = statistics.median(max(r["collective_ms"][i] for r in ranks) for i in range(20))
    return out


def report(result: dict) -> str:
    c = Case(**result["case"])
    design = (c.rows + 1) * record.WIDTH * 4
    lines = [
        f"Vocabulary-parallel, {c.label}, gloo on the CPU ({result['machine']['cpu']}, {result['threads']} threads in "
        f"all: the single process uses them all, each of the W = {result['world']} ranks {result['threads'] // result['world']}); "
        f"{result['machine']['date']}, torch {result['machine']['torch']}; load average "
        f"{result['load_average_before'][0]:.1f} before, {result['load_average_after'][0]:.1f} after (a shared machine).",
        "The reference's single-process path computes the gradient again in backward (its autograd recomputes it), "
        "the parallel path once in forward.",
        "",
        f"Bytes each rank hands to the one collective per call: design (rows + 1) x {record.WIDTH} x 4 = {design:,} B "
        f"({design / c.rows:.2f} B per row); receives W times that.",
        "",
        "| backend | single process ms | W ranks ms (slowest rank) | ratio | collective alone ms | collectives per call | "
        "bytes sent per rank (measured) | loss single / parallel |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for backend, row in result["backends"].items():
        one, par = row["single"], row["parallel"]
        if par["status"] != "ok" or one["status"] != "ok":
            why = par["status"] if par["status"] != "ok" else one["status"]
            single = f"{one['median_ms']:.1f}" if one["status"] == "ok" else "n/a"
            lines.append(f"| {backend} | {single} | {why} | | | | | |")
            continue
        lines.append(f"| {backend} | {one['median_ms']:.1f} | {par['median_ms']:.1f} | {par['median_ms'] / one['median_ms']:.2f} | "
                     f"{par['collective_median_ms']:.2f} | {par['collectives']} (first call {par['collectives_first_call']}) | "
                     f"{par['sent_bytes']:,} ({par['sent_bytes'] / c.rows:.2f} per row) | "
                     f"{one['loss']:.6f} / {par['loss']:.6f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--divergence", choices=list(FUNCTIONS), default="drkl")
    parser.add_argument("--world", type=int, default=2, help="ranks of the gloo group (default 2)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads in all (default: torch's)"
    )
    parser.add_argument(
        "--backends", nargs="+", default=[b for b in ("cpu", "reference") if b in backends.available_backends()]
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per configuration, after one warm-up")
    parser.add_argument(
        "--out", type=Path, help="folder for results.json and report.md (default bench/results/<date>-cpu-parallel)"
    )
    args = parser.parse_args(argv)
    case = Case(args.divergence, args.rows, args.vocab, args.dtype, True)
    info = machine("cpu")
    out = args.out or ROOT / "bench" / "results" / f"{info['date'][:10]}-cpu-parallel"
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "case": case.__dict__, "world": args.world, "threads": args.threads, "backends": {},
              "load_average_before": os.getloadavg()}  # fmt: skip
    for backend in args.backends:
        row = {}
        for name, world in (("single", 1), ("parallel", args.world)):
            row[name] = measure(case, backend, world, args.threads, args.reps)
            print(
                f"{case.label} {backend} {name} (W={world}): {row[name].get('median_ms', row[name]['status'])}",
                flush=True,
            )
        result["backends"][backend] = row
    result["load_average_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
