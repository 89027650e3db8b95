"""Test setup: without a GPU the Triton kernels run in the interpreter on the CPU (sped up by
``triton_interpreter``). Tests whose work is a child process are marked ``background(start=f)``:
when such a test is selected, ``f()`` queues its process at collection (``background``: one at a
time, at the lowest priority), and the marked tests run last, so that their processes use the core
the rest of the suite leaves idle (the nvcc builds, the just-in-time build, the gloo group, the
study, the Triton GPU compiles, the extras probe: about 150 CPU seconds here in all)."""

import os
import random
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tests import triton_interpreter  # noqa: E402  (after TRITON_INTERPRET is decided)

triton_interpreter.install()  # under the interpreter: the same bits, about twice as fast


def pytest_report_header(config):
    from tests.helpers import BACKENDS, SEED

    return [f"drkl_kernels: seed {SEED} (set DRKL_TEST_SEED to replay), backends under test {BACKENDS}"]


def pytest_terminal_summary(terminalreporter, exitstatus):
    """The seed again at the end, where a CI log's tail shows it next to any failure."""
    from tests.helpers import SEED

    terminalreporter.write_line(f"drkl_kernels: seed {SEED} (DRKL_TEST_SEED={SEED} replays this run)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "background(start): the test waits for child processes that start() queues in the background "
        "at collection (once per session, whichever marked tests are selected); marked tests run last",
    )
    config.addinivalue_line(
        "markers",
        "interpreted_cases(n): under the Triton interpreter (no GPU), n of the test's backend='triton' cases "
        "run, drawn with the session seed (DRKL_TEST_ALL_INTERPRETED=1 runs them all; a node id on the command line "
        "always runs); the others are deselected",
    )


def _interpreted_subset(config, items: list) -> list:
    """The ``interpreted_cases`` draw: each interpreted launch costs about a second, and the cases of a
    test differ in what the shared Python code does around the kernel, which the cpu and reference
    backends run in full; over CI runs the seed draws every case."""
    from tests.helpers import SEED

    groups: dict = {}
    for item in items:
        marker = item.get_closest_marker("interpreted_cases")
        if marker and getattr(item, "callspec", None) and item.callspec.params.get("backend") == "triton":
            groups.setdefault((item.path, item.originalname), (marker.args[0], []))[1].append(item)
    named = {arg.replace(os.sep, "/") for arg in config.args if "::" in arg}  # asked for by node id: always run
    dropped = set()
    for (_, name), (n, group) in groups.items():
        if len(group) > n:
            keep = random.Random(f"{SEED}-{name}").sample(range(len(group)), n)
            dropped.update(item.nodeid for i, item in enumerate(group) if i not in keep and item.nodeid not in named)
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in dropped])
    return [item for item in items if item.nodeid not in dropped]


def pytest_collection_modifyitems(session, config, items):
    from tests.helpers import INTERPRETED_SUBSETS

    if INTERPRETED_SUBSETS:
        items[:] = _interpreted_subset(config, items)
    late = [item for item in items if item.get_closest_marker("background")]
    items[:] = [item for item in items if not item.get_closest_marker("background")] + late


def pytest_collection_finish(session):
    starts = {}  # in the order of the tests that wait: the queue runs them in that order
    for item in session.items:
        marker = item.get_closest_marker("background")
        if marker:
            starts.setdefault(marker.kwargs["start"], None)
    for start in starts:
        start()
    if starts:  # half the cores for the tests (torch's pool and the CPU kernels' OpenMP), the rest for the jobs
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def pytest_unconfigure(config):
    if "tests.background" in sys.modules:
        sys.modules["tests.background"].JOBS.stop()
