"""The gloo group of ``tests/test_parallel.py``: ``python -m tests.parallel_worker CASES OUT`` spawns
four ranks (``torch.multiprocessing``) that run every case of the file ``CASES`` and write their
results to the folder ``OUT``; test_parallel queues it in the background at collection.

Four ranks; groups of 1 (rank 0), 2 (ranks 0-1), 3 (ranks 0-2) and 4 (the world). Each case names its
group size; its members run the loss on their shard twice (forward and backward), counting
the collectives of the second run; the ranks write what they got to ``out/rank<r>.pt`` and
the parent compares. An exception in a case is recorded as that case's result, so one
failing backend does not hide the others.
"""

from __future__ import annotations

import datetime
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import drkl_kernels as dk

from . import triton_interpreter

LOSSES = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}
MODULES = {"drkl": dk.DRKLLoss, "rkl": dk.RKLLoss, "fkl": dk.FKLLoss}
FUSED = {"drkl": dk.fused_linear_drkl_loss, "rkl": dk.fused_linear_rkl_loss, "fkl": dk.fused_linear_fkl_loss}


class Collectives(TorchDispatchMode):
    """Counts the c10d collectives (``c10d.*`` operators) dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "c10d"
        return func(*args, **(kwargs or {}))


def call(case: dict, rank: int, group, **override) -> dict:
    """Loss, entropy and gradient of this rank's shard; forward and backward collectives counted."""
    a, b = case["bounds"][rank], case["bounds"][rank + 1]
    z = case["student"][:, a:b].clone().requires_grad_(True)
    u = case["teacher"][:, a:b].clone()
    target = override.pop("target", case["target"])
    kw = {**case["options"], "backend": case["backend"], **override}
    with Collectives() as fwd:
        if case.get("module"):
            out = MODULES[case["kind"]](process_group=group, **kw)(z, u, target)
        else:
            out = LOSSES[case["kind"]](z, u, target, process_group=group, **kw)
    loss, entropy = out if kw.get("return_entropy") else (out, None)
    with Collectives() as bwd:
        loss.backward(case["upstream"])
    return {"loss": loss.detach(), "entropy": entropy, "grad": z.grad, "fwd": fwd.count, "bwd": bwd.count}


def call_fused(case: dict, rank: int, group) -> dict:
    """A fused linear loss over this rank's rows of both heads (and biases), the hidden states
    whole: loss, entropy and (d hidden, d W shard, d bias shard); collectives counted."""
    a, b = case["bounds"][rank], case["bounds"][rank + 1]
    heads, frozen = case["heads"], case.get("frozen", ())
    hs, ws, bs = (heads[n] if n == "hs" else heads[n][a:b] for n in ("hs", "ws", "bs"))
    hs, ws, bs = (t.clone().requires_grad_(n not in frozen) for n, t in zip(("hs", "ws", "bs"), (hs, ws, bs)))
    kw = {**case["options"], "backend": case["backend"]}
    with Collectives() as fwd:
        out = FUSED[case["kind"]](hs, ws, heads["ht"], heads["wt"][a:b], case["target"], student_bias=bs,
                                  teacher_bias=heads["bt"][a:b], process_group=group, **kw)  # fmt: skip
    loss, entropy = out if kw.get("return_entropy") else (out, None)
    with Collectives() as bwd:
        loss.backward(case["upstream"])
    grads = tuple(t.grad for t in (hs, ws, bs))
    return {"loss": loss.detach(), "entropy": entropy, "grad": grads, "fwd": fwd.count, "bwd": bwd.count}


def run(rank: int, world: int, init: str, cases_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    triton_interpreter.install()  # as in the parent session (conftest)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), 4: dist.group.WORLD}
    fresh = dist.new_group([0, 1])  # never used before: its first call gathers the shard sizes
    results = {}
    for case in torch.load(cases_path, weights_only=False):
        w = case["world"]
        if rank >= w:
            continue
        group = fresh if case.get("fresh_group") else groups[w]
        try:
            override = case.get("rank_options", {}).get(rank, {})
            one = (lambda: call_fused(case, rank, group)) if case.get("heads") else (lambda: call(case, rank, group, **override))
            results[case["key"]] = [one() for _ in range(case.get("runs", 2))]
        except Exception:
            results[case["key"]] = traceback.format_exc()
    for w in (2, 3):
        if rank < w:
            continue
        name = f"outside the group of {w}"
        try:
            dk.drkl_loss(torch.zeros(2, 3), torch.zeros(2, 3), process_group=groups[w])
            results[name] = "no error"
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    try:
        dk.rkl_loss(torch.zeros(2, 3), torch.zeros(2, 3), process_group="group")
        results["not a group"] = "no error"
    except Exception as err:
        results["not a group"] = f"{type(err).__name__}: {err}"
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


WORLD = 4


def main(cases_path: str, out_dir: str) -> None:
    """Runs every case on a group of WORLD ranks (raises if a rank fails outside its cases)."""
    mp.spawn(run, args=(WORLD, f"file://{out_dir}/store", cases_path, out_dir), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
