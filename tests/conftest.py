"""Test setup: without a GPU the Triton kernels run in the interpreter on the CPU (sped up by
``triton_interpreter``). The slow builds are queued in the background (``background``: one at a
time, at the lowest priority) as soon as a test that needs them is selected: the nvcc builds of
``cuda_build`` (about 200 CPU seconds here) and the just-in-time build of ``test_extension.py``
(about 25); the tests that wait for them run last, so the builds use the core the rest of the
suite leaves idle."""

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tests import triton_interpreter  # noqa: E402  (after TRITON_INTERPRET is decided)

triton_interpreter.install()  # under the interpreter: the same bits, about twice as fast

JUST_IN_TIME = pytest.StashKey()


def pytest_report_header(config):
    from tests.helpers import BACKENDS, SEED

    return [f"drkl_kernels: seed {SEED} (set DRKL_TEST_SEED to replay), backends under test {BACKENDS}"]


def pytest_terminal_summary(terminalreporter, exitstatus):
    """The seed again at the end, where a CI log's tail shows it next to any failure."""
    from tests.helpers import SEED

    terminalreporter.write_line(f"drkl_kernels: seed {SEED} (DRKL_TEST_SEED={SEED} replays this run)")


NVCC_TESTS = ("test_cuda_compile.py", "test_cuda_sass.py")
BUILD_TESTS = (*NVCC_TESTS, "test_extension.py")  # run last, after their background builds


def pytest_configure(config):
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
    late = [item for item in items if item.path.name in BUILD_TESTS]
    items[:] = [item for item in items if item.path.name not in BUILD_TESTS] + late


def pytest_collection_finish(session):
    building = False
    if any(item.path.name in NVCC_TESTS for item in session.items):
        from tests import cuda_build

        if cuda_build.NVCC is not None:
            cuda_build.start()
            building = True
    if any(getattr(item, "originalname", "") == "test_just_in_time_build_says_so" for item in session.items):
        from tests.test_extension import start_just_in_time_build

        directory = Path(tempfile.mkdtemp(prefix="drkl-jit-"))
        session.config.stash[JUST_IN_TIME] = (start_just_in_time_build(directory), directory)
        building = True
    if building:  # half the cores for the tests (torch's pool and the CPU kernels' OpenMP), the rest for the builds
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture
def just_in_time_build(pytestconfig):
    """(the build's background job, its directory), queued at collection."""
    return pytestconfig.stash[JUST_IN_TIME]


def pytest_unconfigure(config):
    if "tests.background" in sys.modules:
        sys.modules["tests.background"].BUILDS.stop()
    _, directory = config.stash.get(JUST_IN_TIME, (None, None))
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
