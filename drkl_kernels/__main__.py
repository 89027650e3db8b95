"""``python -m drkl_kernels``: DRKL, RKL and FKL with every backend on this machine.

For each divergence and each backend that can run tensors of the chosen device, it
computes loss + gradient on one realistic shape and prints the loss, the error
against the reference backend (loss: relative; gradient: norm-wise relative), and
the median time of loss + backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from . import backends
from .api import drkl_loss, fkl_loss, rkl_loss

LOSSES = {"DRKL": drkl_loss, "RKL": rkl_loss, "FKL": fkl_loss}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _runnable(device: torch.device) -> list[str]:
    names = []
    for name in backends.available_backends():
        try:
            backends.resolve(name, device)
        except ValueError:
            continue
        names.append(name)
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(fn, backend, z, u, target):
    zz = z.detach().requires_grad_(True)
    loss = fn(zz, u, target, backend=backend)
    loss.backward()
    return loss.detach().double(), zz.grad


def _time_ms(fn, backend, z, u, target, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        _sync(z.device)
        start = time.perf_counter()
        _run(fn, backend, z, u, target)
        _sync(z.device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m drkl_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--rows", type=int, default=8192 if cuda else 256, help="batch x sequence rows")
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    args = parser.parse_args(argv)
    # numpy's warnings about masked-out lanes when Triton runs in its CPU interpreter
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.rows, args.vocab)
    z = (2 * torch.randn(shape, generator=gen, device=device)).to(DTYPES[args.dtype])
    u = (0.6 * z.float() + 1.6 * torch.randn(shape, generator=gen, device=device)).to(DTYPES[args.dtype])
    target = torch.randint(0, args.vocab, (args.rows,), generator=gen, device=device)
    target[::7] = -100
    names = _runnable(device)
    print(f"drkl_kernels on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}): "
          f"[{args.rows}, {args.vocab}] {args.dtype}, loss + gradient, reduction=mean, backends {names}")  # fmt: skip
    header = f"{'loss':<5} {'backend':<10} {'value':>14} {'loss err':>10} {'grad err':>10} {'ms':>10}"
    print(header)
    print("-" * len(header))
    for label, fn in LOSSES.items():
        ref_loss, ref_grad = _run(fn, "reference", z, u, target)
        for name in names:
            loss, grad = _run(fn, name, z, u, target)
            loss_err = ((loss - ref_loss).abs() / ref_loss.abs().clamp(min=1e-30)).item()
            grad_err = ((grad.double() - ref_grad.double()).norm() / ref_grad.double().norm()).item()
            ms = _time_ms(fn, name, z, u, target, args.repeats)
            print(f"{label:<5} {name:<10} {loss.item():>14.8f} {loss_err:>10.2e} {grad_err:>10.2e} {ms:>10.2f}")


if __name__ == "__main__":
    main()
