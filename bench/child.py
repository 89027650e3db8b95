"""One CPU measurement in a fresh process: ``python -m bench.child '<json spec>'``.

Prints one JSON line: median and quartile times (ms) and the peak memory above the inputs.
After one warm-up call (compilation included), the kernel's peak-RSS mark is reset
(/proc/self/clear_refs) and the peak of the next call is read against the resident set
before it. The parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the kernel
instead of staying in malloc's cache, where a later call would reuse them unseen.
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import torch

from .cases import Case, call, inputs, runner
from .measure import time_cpu


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def main() -> None:
    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    case = Case(**spec["case"])
    fn = runner(spec["runner"]).build(case)
    z, u, t = inputs(case, "cpu")
    call(fn, case, z, u, t)  # warm-up: compilation, thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM)
    before = _status_bytes("VmRSS")
    call(fn, case, z, u, t)
    peak = max(0, _status_bytes("VmHWM") - before)
    result = time_cpu(fn, case, z, u, t, spec["budget_s"])
    result["peak_bytes"] = peak
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
