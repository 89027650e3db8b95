"""The benchmark report: ``python -m bench [--device cuda|cpu] [--suite logits fused] [--out DIR] [--readme]``.

For every case (divergence x shape x dtype x loss-only / loss+gradient) and every runner
(our backends, the reference, torch.compile of the reference, Liger-Kernel) it measures the
median time with its interquartile range and the peak memory above the inputs, and prints:
bytes per element by design (SPEC §7) and the achieved GB/s, on a GPU the % of the bandwidth
floor against a device-to-device copy measured in the same run, and the speed-up and memory
ratio against the reference measured in the same run. A runner that cannot run says why
("n/a: ..."); none disappears. Writes results.json (every number, the machine, versions,
date) and PNG plots of time and memory against V into DIR; ``--readme`` rewrites the
README's benchmark section from that JSON. The ``fused`` suite (``bench/fused.py``) measures the
fused linear losses against the dense baseline, TRL's chunked divergence and Liger-Kernel's fused
linear JSD, with its own table and README section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

import drkl_kernels as dk

from . import fused
from .cases import PEERS, RUNNERS, Case, matrix
from .measure import gpu_copy_bandwidth, measure_cpu, measure_gpu

ROOT = Path(__file__).resolve().parents[1]
README_MARKERS = {"logits": ("<!-- bench:start -->", "<!-- bench:end -->"),
                  "fused": ("<!-- bench-fused:start -->", "<!-- bench-fused:end -->")}  # fmt: skip


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm=f"{props.major}.{props.minor}", cuda=torch.version.cuda)  # fmt: skip
    return info


def run(device: str, cases: list[Case], runners: list[str], budget_s: float, deadline: float = float("inf")) -> list[dict]:
    rows = []
    for case in cases:
        for r in RUNNERS:
            if r.name not in runners:
                continue
            entry = {"case": case.__dict__, "runner": r.name, "peer": r.name in PEERS,
                     "design_bytes": None, "status": "ok"}  # fmt: skip
            reason = r.why_not(device, case)
            if reason is None and time.monotonic() > deadline:
                reason = "skipped: the run's time limit (--deadline) was spent"
            if reason is None:
                entry["design_bytes"] = r.design_bytes(device, case)
                try:
                    entry.update(measure_gpu(r.name, case, budget_s) if device == "cuda" else measure_cpu(r.name, case, budget_s))
                except torch.cuda.OutOfMemoryError:
                    entry["status"] = "n/a: out of GPU memory"
                    torch.cuda.empty_cache()
                except Exception as err:  # a failing peer is reported, not hidden
                    entry["status"] = f"n/a: failed ({type(err).__name__}: {err})"[:300]
            else:
                entry["status"] = f"n/a: {reason}"
            rows.append(entry)
            print(_line(entry), flush=True)
    return rows


def _line(e: dict) -> str:
    c = Case(**e["case"])
    if e["status"] != "ok":
        return f"{c.label:<44} {e['runner']:<26} {e['status']}"
    return f"{c.label:<44} {e['runner']:<26} {e['median_ms']:>10.3f} ms  peak {e['peak_bytes'] / 2**20:>9.1f} MiB"


def derive(rows: list[dict], copy_gbps: float | None) -> None:
    """Adds GB/s, % of the bandwidth floor, and ratios against the reference of the same case."""
    ref = {json.dumps(e["case"], sort_keys=True): e for e in rows if e["runner"] == "reference" and e["status"] == "ok"}
    for e in rows:
        if e["status"] != "ok":
            continue
        c = Case(**e["case"])
        seconds = e["median_ms"] * 1e-3
        e["gbps"] = (e["design_bytes"] or c.floor_bytes()) * c.elements / seconds / 1e9
        if copy_gbps:
            e["floor_pct"] = 100 * (c.floor_bytes() * c.elements / (copy_gbps * 1e9)) / seconds
        base = ref.get(json.dumps(e["case"], sort_keys=True))
        if base is not None:
            e["speedup_vs_reference"] = base["median_ms"] / e["median_ms"]
            e["memory_vs_reference"] = e["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None


def table(rows: list[dict], gpu: bool) -> str:
    """Markdown table of every row."""
    head = ["case", "runner", "median ms (IQR)", "B/elem", "GB/s"] + (["% floor"] if gpu else []) + [
        "peak MiB", "speed-up vs ref", "memory vs ref"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        c = Case(**e["case"])
        if e["status"] != "ok":
            out.append(f"| {c.label} | {e['runner']} | {e['status']} |" + " |" * (len(head) - 3))
            continue
        design = f"{e['design_bytes']:g}" if e["design_bytes"] else f"({c.floor_bytes()} floor)"
        cells = [c.label, e["runner"], f"{e['median_ms']:.3f} ({e['q1_ms']:.3f}-{e['q3_ms']:.3f})", design,
                 f"{e['gbps']:.1f}"]  # fmt: skip
        if gpu:
            cells.append(f"{e.get('floor_pct', 0):.0f}%")
        mem = e.get("memory_vs_reference")
        cells += [f"{e['peak_bytes'] / 2**20:.1f}", f"{e.get('speedup_vs_reference', float('nan')):.2f}x",
                  "-" if mem is None else f"{mem:.3f}"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], out: Path) -> list[str]:
    """Time and peak memory against V, per dtype, for DRKL loss + gradient at the row count of the V sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ok = [e for e in rows if e["status"] == "ok" and e["case"]["divergence"] == "drkl" and e["case"]["backward"]]
    for dtype in sorted({e["case"]["dtype"] for e in ok}):
        mine = [e for e in ok if e["case"]["dtype"] == dtype]
        counts = {r: len({e["case"]["vocab"] for e in mine if e["case"]["rows"] == r}) for r in {e["case"]["rows"] for e in mine}}
        rows_ = max(counts, key=lambda r: (counts[r], r))
        pts = [e for e in mine if e["case"]["rows"] == rows_]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in dict.fromkeys(e["runner"] for e in pts):
            series = sorted((e["case"]["vocab"], e["median_ms"], e["peak_bytes"] / 2**20) for e in pts if e["runner"] == name)
            vs = [s[0] for s in series]
            axes[0].plot(vs, [s[1] for s in series], marker="o", label=name)
            axes[1].plot(vs, [s[2] for s in series], marker="o", label=name)
        axes[0].set(xlabel="vocabulary V", ylabel="median ms (log)", yscale="log", title=f"DRKL loss+grad, {rows_} rows, {dtype}: time")
        axes[1].set(xlabel="vocabulary V", ylabel="peak MiB above inputs", title="peak memory")
        for ax in axes:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"drkl_{dtype}_vs_vocab.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def summary(rows: list[dict]) -> str:
    """The README's table: loss + gradient, one line per case, one column per runner that ran
    (median ms, speed-up against the reference, peak MiB above the inputs), then why the others did not."""
    done = [e for e in rows if e["case"]["backward"]]
    names = list(dict.fromkeys(e["runner"] for e in done if e["status"] == "ok"))
    cases = list(dict.fromkeys(json.dumps(e["case"]) for e in done))
    out = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in cases:
        cells = {e["runner"]: e for e in done if json.dumps(e["case"]) == key}
        line = [Case(**json.loads(key)).label.removesuffix(" loss+grad")]
        for name in names:
            e = cells.get(name)
            if e is None or e["status"] != "ok":
                line.append("n/a")
            else:
                pct = f", {e['floor_pct']:.0f}% floor" if "floor_pct" in e else ""
                line.append(f"{e['median_ms']:.1f} ms ({e.get('speedup_vs_reference', float('nan')):.1f}x{pct}), "
                            f"{e['peak_bytes'] / 2**20:.0f} MiB")  # fmt: skip
        out.append("| " + " | ".join(line) + " |")
    reasons: dict[str, list[str]] = {}
    for e in done:
        if e["status"] != "ok" and e["runner"] not in reasons.setdefault(e["status"][5:], []):
            reasons[e["status"][5:]].append(e["runner"])
    if reasons:
        out += ["", "Not measured: " + "; ".join(f"{', '.join(f'`{r}`' for r in rs)}: {why}" for why, rs in reasons.items()) + "."]
    return "\n".join(out)


def readme_section(result: dict, out: Path) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_threads']} threads, no GPU"
    rel = os.path.relpath(out, ROOT)
    lines = [
        f"Measured by `python -m bench --device {m['device']}` on {m['date']}: {where}; torch {m['torch']}, "
        f"triton {m['triton']}. Loss + gradient, median time (speed-up against the reference measured in the same "
        f"run) and peak memory above the inputs; every number (IQR, bytes per element, GB/s, the loss alone) is in "
        f"[`{rel}/`]({rel}/).",
        "",
        summary(result["rows"]),
        "",
    ]
    lines += [f"![{f}]({rel}/{f})" for f in result["plots"]]
    return "\n".join(lines)


def fused_readme_section(result: dict, out: Path) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_threads']} threads, no GPU"
    rel = os.path.relpath(out, ROOT)
    return "\n".join([
        f"Measured by `python -m bench --device {m['device']} --suite fused` on {m['date']}: {where}; torch "
        f"{m['torch']}. Loss + gradients to the student's hidden states and head, median time (interquartile "
        f"range), peak memory above the inputs, share of the time in matmuls, and time and memory as multiples of "
        f"`fused`'s, all runners of a case interleaved in one process; every number is in [`{rel}/`]({rel}/).",
        "",
        fused.table(result["fused_rows"]),
        "",
        "Against issue 9's goals:",
        "",
        fused.goals(result["fused_rows"]),
    ])


def update_readme(section: str, suite: str = "logits") -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    start_marker, end_marker = README_MARKERS[suite]
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    path.write_text(text[:start] + "\n" + section + "\n" + text[end:])


def report_md(result: dict) -> str:
    parts = []
    if result["rows"]:
        parts.append(table(result["rows"], result["machine"]["device"] == "cuda"))
    if result.get("fused_rows"):
        parts.append(fused.table(result["fused_rows"]) + "\n\n" + fused.goals(result["fused_rows"]))
    return "\n\n".join(parts) + "\n"


def _readme(result: dict, out: Path) -> None:
    if result["rows"]:
        update_readme(readme_section(result, out))
    if result.get("fused_rows"):
        update_readme(fused_readme_section(result, out), "fused")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description="drkl_kernels benchmark report")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="folder for results.json and the plots (default bench/results/<date>-<machine>)")
    parser.add_argument("--suite", nargs="+", default=["logits", "fused"], choices=["logits", "fused"],
                        help="the losses from logits, and/or the fused linear losses against their peers")
    parser.add_argument("--runners", nargs="+", default=[r.name for r in RUNNERS], choices=[r.name for r in RUNNERS])
    parser.add_argument("--shapes", nargs="+", help="restrict to ROWSxV shapes, e.g. 8192x128256")
    parser.add_argument("--fused-shapes", nargs="+", metavar="ROWSxHxV",
                        help="fused suite shapes instead of the default ones, e.g. 4096x1024x32000")
    parser.add_argument("--budget", type=float, help="seconds of timed calls per measurement (default GPU 0.5, CPU 3)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after which the remaining measurements are listed as skipped")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's benchmark section from this run")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="measure nothing: redraw DIR's plots and tables (and with --readme the README) from DIR/results.json")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.render / "results.json").read_text())
        result["plots"] = plot(result["rows"], args.render)
        (args.render / "results.json").write_text(json.dumps(result, indent=1))
        (args.render / "report.md").write_text(report_md(result))
        if args.readme:
            _readme(result, args.render)
        return

    device = args.device
    info = machine(device)
    if args.out is None:
        tag = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu") or "cpu").strip("-").lower()
        args.out = ROOT / "bench" / "results" / f"{info['date'][:10]}-{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    cases = matrix(device) if "logits" in args.suite else []
    if args.shapes:
        cases = [c for c in cases if f"{c.rows}x{c.vocab}" in args.shapes]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.fused_shapes] if args.fused_shapes else None
    fused_cases = fused.matrix(device, shapes) if "fused" in args.suite else []
    print(f"drkl_kernels {getattr(dk, '__version__', '')} benchmark on {info.get('gpu') or info['cpu']}: "
          f"{len(cases)} cases x {len(args.runners)} runners, {len(fused_cases)} fused linear cases", flush=True)  # fmt: skip
    start = time.perf_counter()
    copy_gbps = gpu_copy_bandwidth() if device == "cuda" else None
    if copy_gbps:
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    budget = args.budget or (0.5 if device == "cuda" else 3.0)
    deadline = time.monotonic() + args.deadline
    rows = run(device, cases, args.runners, budget, deadline)
    derive(rows, copy_gbps)
    fused_rows = fused.run(device, fused_cases, budget, deadline)
    result = {"machine": info, "copy_gbps": copy_gbps, "seconds": time.perf_counter() - start, "rows": rows,
              "fused_rows": fused_rows}  # fmt: skip
    result["plots"] = plot(rows, args.out)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(report_md(result))
    print()
    print(report_md(result))
    print(f"wrote {args.out} in {result['seconds']:.0f} s", flush=True)
    if args.readme:
        _readme(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
