"""The background builds (``background``): they run at the lowest priority, also where the kernel
schedules sessions as groups, and are killed with every process they started."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from . import background


def test_background_process_runs_at_the_lowest_priority():
    proc = background.start(["sh", "-c", "nice; cat /proc/self/autogroup 2>/dev/null; true"], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert lines[0] == "19", out
    if Path("/proc/self/autogroup").exists():  # sessions are scheduling groups: the group's own nice value counts
        assert lines[1].split()[-1] == "19", out


def test_background_process_is_killed_with_its_session():
    proc = background.start(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert os.getsid(child) == proc.pid
    background.kill(proc)
    assert proc.returncode == -9
    try:
        os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours to reap: init reaps it
    stat, deadline = Path(f"/proc/{child}/stat"), time.monotonic() + 30  # SIGKILL lands when the child next runs
    while stat.exists() and stat.read_text().split(") ")[1][0] not in "ZX" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX", "the session's other process survived"


def test_queue_runs_one_job_at_a_time_until_a_test_waits_then_two(tmp_path):
    """Jobs in order, one at a time (builds that share 2 cores slow each other down); once a test
    waits for one, the rest of the suite is done, and two run at a time."""
    queue = background.Queue()
    stamp = "date +%s.%N; sleep {}; date +%s.%N"
    try:
        first, second = (queue.submit(["sh", "-c", stamp.format(0.3)], stdout=tmp_path / f"{n}.out") for n in (1, 2))
        while not (tmp_path / "2.out").exists() or not (tmp_path / "2.out").read_text():
            time.sleep(0.01)  # nothing waits on a job yet: the queue stays one at a time
        third, fourth = (queue.submit(["sh", "-c", stamp.format(s)], stdout=tmp_path / f"{n}.out") for n, s in ((3, 2), (4, 0.3)))
        assert [job.wait(timeout=60) for job in (first, second, third, fourth)] == [0, 0, 0, 0]
    finally:
        queue.stop()
    spans = [[float(t) for t in (tmp_path / f"{n}.out").read_text().split()] for n in (1, 2, 3, 4)]
    assert spans[0][1] <= spans[1][0], spans  # one at a time
    assert spans[2][0] < spans[3][1] and spans[3][0] < spans[2][1], spans  # after the first wait: together


def test_queue_stop_kills_the_running_job_and_drops_the_queued(tmp_path):
    queue = background.Queue()
    running = queue.submit(["sh", "-c", "echo started; sleep 60"], stdout=tmp_path / "running.out")
    queued = queue.submit(["sh", "-c", "echo ran"], stdout=tmp_path / "queued.out")
    while "started" not in ((tmp_path / "running.out").read_text() if (tmp_path / "running.out").exists() else ""):
        time.sleep(0.01)
    queue.stop()
    assert running.wait(timeout=10) == -9 and queued.wait(timeout=10) == -9
    assert not (tmp_path / "queued.out").exists()


def test_a_job_that_cannot_start_ends_and_says_why(tmp_path):
    queue = background.Queue()
    job = queue.submit(["true"], stdout=tmp_path / "out", cwd=tmp_path / "missing")
    assert job.wait(timeout=30) == 127
    assert "could not start" in (tmp_path / "out").read_text()
    with pytest.raises(AssertionError, match="exited 127:\n.*could not start"):  # the waiting test fails, saying why
        job.succeed(timeout=30)
    after = queue.submit(["sh", "-c", "echo next"], stdout=tmp_path / "next")  # the queue goes on
    after.succeed(timeout=30)
    assert (tmp_path / "next").read_text() == "next\n"
