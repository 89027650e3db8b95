"""Distil a tiny causal LM whose LM head is split over the vocabulary, with DRKL over torch.distributed.

    torchrun --nproc_per_node=2 examples/vocab_parallel_distill.py [--steps 8] [--vocab 999] [--backend auto]

Each rank holds the whole (replicated) trunk of a student and of a frozen teacher, and a contiguous
shard of each LM head (rank order; with an odd vocabulary the shards differ in size). Per step every
rank computes its ``[rows, V_r]`` logits of both models, and ``drkl_loss(..., process_group=group)``
returns the same loss on every rank and the gradient of the rank's shard, after one all_gather of 44
bytes per row. The trunk's hidden states feed every shard, so their gradient is the sum of the
ranks' partial gradients: one all_reduce in backward (Megatron's ``copy_to_tensor_model_parallel_region``).
The script counts the collectives of each step and the bytes they carry, and checks that every rank
got the same loss. gloo on CPUs, NCCL on GPUs (one per rank).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import drkl_kernels as dk


class Traffic(TorchDispatchMode):
    """Bytes this rank hands to each kind of collective while active (c10d operators)."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            op = func.__name__.split(".")[0]
            sent = args[1] if op == "_allgather_base_" else args[0][0]  # (output, input), else ([tensor], ...)
            name = {"_allgather_base_": "all_gather", "allreduce_": "all_reduce"}.get(op, op)
            self.bytes[name] = self.bytes.get(name, 0) + sent.numel() * sent.element_size()
        return func(*args, **(kwargs or {}))


class ReduceHiddenGrad(torch.autograd.Function):
    """Identity forward; backward sums the ranks' partial gradients of the replicated hidden states."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedLM(nn.Module):
    """Embedding, one causal transformer layer (replicated), and this rank's rows of the LM head."""

    def __init__(self, vocab: int, hidden: int, start: int, stop: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)  # the same whole model on every rank; each keeps its head shard
        self.embed = nn.Embedding(vocab, hidden)
        self.layer = nn.TransformerEncoderLayer(hidden, nhead=4, dim_feedforward=4 * hidden, batch_first=True)
        self.head = nn.Parameter(nn.Linear(hidden, vocab, bias=False).weight.detach()[start:stop].clone())

    def forward(self, tokens: torch.Tensor, group) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        h = self.layer(self.embed(tokens), src_mask=mask, is_causal=True)
        return ReduceHiddenGrad.apply(h, group) @ self.head.T  # [batch, seq, V_r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=999)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cpu", "cuda"])
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    bounds = [args.vocab * r // world for r in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]

    student = ShardedLM(args.vocab, args.hidden, start, stop, seed=0).to(device)
    teacher = ShardedLM(args.vocab, 2 * args.hidden, start, stop, seed=1).to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(2)  # the same batches on every rank
    rows = args.batch * args.seq
    if rank == 0:
        print(f"{world} ranks ({'nccl' if cuda else 'gloo'}), vocabulary {args.vocab} split as "
              f"{[b - a for a, b in zip(bounds, bounds[1:])]}, {rows} rows per step")  # fmt: skip
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=data).to(device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with Traffic() as traffic:
            with torch.no_grad():
                teacher_logits = teacher(inputs, group)
            loss = dk.drkl_loss(
                student(inputs, group), teacher_logits, labels, gamma=0.5, process_group=group, backend=args.backend
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        spread = torch.stack([loss.detach(), -loss.detach()])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)  # outside the count: max and -min of the loss
        same = bool(spread[0] == -spread[1])
        if rank == 0:
            moved = ", ".join(f"{k} {v:,} B" for k, v in traffic.bytes.items())
            print(f"step {step}: loss {loss.item():.6f} (bitwise the same on every rank: {same}); "
                  f"sent by this rank: {moved}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
