"""The GPU check, in one command of under 8 minutes on an H200:

    python3 bench/gpu_check.py OUT_DIR

1. builds the extension with its CUDA kernels (ahead of time, for sm_90a);
2. runs the parity, gradient, split, determinism and bad-input suites for the cuda and triton
   backends on the GPU (Triton compiled for real) against the float64 truth, then the cuda
   suites again with the two-pass kernel forced (DRKL_CUDA_PASSES=2);
3. when the cuda suites pass, records the GPU's architecture as checked in
   bench/results/cuda_checked.json (GPU, date, commit): from then on backend="auto" picks the
   CUDA kernels on that architecture (drkl_kernels/backends.py), Triton elsewhere;
4. times loss + gradient at [8192, 128256] bf16 (and the rest of that shape's report) for
   every backend and the reference, with achieved GB/s and % of the bandwidth floor.

Everything it prints is also written under OUT_DIR (check.log, parity*.xml, results.json).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_parity.py", "tests/test_gradients.py", "tests/test_identity.py", "tests/test_split.py",
          "tests/test_transform.py", "tests/test_determinism.py", "tests/test_errors.py"]  # fmt: skip
CHECKED = ROOT / "bench" / "results" / "cuda_checked.json"


def record_checked(log) -> None:
    """Add this GPU's architecture to the record of architectures the CUDA kernels passed on."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    checks = json.loads(CHECKED.read_text()) if CHECKED.exists() else {}
    checks[f"sm_{major}{minor}"] = {"gpu": torch.cuda.get_device_name(), "commit": commit or "unknown", "passed": True,
                                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}  # fmt: skip
    CHECKED.write_text(json.dumps(checks, indent=1, sort_keys=True) + "\n")
    print(f"== recorded sm_{major}{minor} as checked in {CHECKED.relative_to(ROOT)}", file=log, flush=True)


def step(title: str, cmd: list[str], log, **env) -> int:
    start = time.perf_counter()
    print(f"== {title}: {' '.join(cmd)}", file=log, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, file=log, flush=True)
    print(f"== {title}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", file=log, flush=True)
    return proc.returncode


class Tee:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        self.file.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        self.file.flush()


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Tee(out / "check.log")
    py = sys.executable
    build = step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], log,
                 TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"), MAX_JOBS="16")  # fmt: skip
    if build != 0:
        return build
    parity = step("parity on the GPU", [py, "-m", "pytest", "-q", "-k", "cuda or triton", f"--junitxml={out / 'parity.xml'}",
                                        *SUITES], log)  # fmt: skip
    two_pass = step("parity of the two-pass CUDA kernel", [py, "-m", "pytest", "-q", "-k", "cuda",
                                                           f"--junitxml={out / 'parity_two_pass.xml'}", *SUITES], log,
                    DRKL_CUDA_PASSES="2")  # fmt: skip
    if parity == 0 and two_pass == 0:
        record_checked(log)
    timing = step("timing", [py, "-m", "bench", "--device", "cuda", "--shapes", "8192x128256", "--out", str(out),
                             "--deadline", "150"], log, PYTHONUNBUFFERED="1")  # fmt: skip
    return parity or two_pass or timing


if __name__ == "__main__":
    sys.exit(main())
