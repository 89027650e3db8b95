"""The test session's background jobs, the child processes of the tests marked ``background`` (the
nvcc builds of ``cuda_build``, the just-in-time build of ``test_extension``, the distillation study
of ``test_study``, the GPU compiles of ``test_triton_gpu_compile``): queued at collection, and run
one at a time at the lowest priority while the tests run, on the core the tests leave idle; two at
a time once a test waits for one (the other tests are done: conftest runs the marked tests last).

One at a time because the builds slow each other down: the four nvcc builds took 194 CPU seconds
one after another here and 265 three at a time, on 2 cores.

Each build runs in a session of its own, so that it is killed with every process it started
(cicc, ptxas; ninja's c++, which ninja puts in process groups of their own). A new session is
also a new scheduling group where the kernel groups by session (Linux's ``sched_autogroup``, on in
this machine's kernel): the CPU is then shared *between sessions* first, and a process's nice value
only ranks it inside its own. So each build's session gets nice 19 as well: five builds in five
sessions of nice 0 took five sixths of the 2 cores from the tests (``test_compile``: 30 s alone,
121 s beside them)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """``cmd`` under ``nice -n 19``, in a new session whose scheduling group, where the kernel has
    one, also has nice 19 (``popen``: Popen's other arguments)."""
    proc = subprocess.Popen(["nice", "-n", "19", *cmd], start_new_session=True, **popen)
    try:  # the child called setsid() before exec, and Popen returns after exec: its group is its own
        with open(f"/proc/{proc.pid}/autogroup", "w") as group:
            group.write("19")
    except OSError:  # no autogroups (another kernel or OS): the process's nice value is what counts
        pass
    return proc


def kill(proc: subprocess.Popen) -> None:
    """Kills ``proc`` and every process of its session, then reaps it."""
    members = [proc.pid]
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == proc.pid:
                    members.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


class Job:
    """A queued command: ``wait`` returns its exit status (-9 if the session stopped it first)."""

    def __init__(self, queue: Queue, cmd: list[str], stdout: Path, stderr: Path | None, popen: dict):
        self.queue, self.cmd, self.stdout, self.stderr, self.popen = queue, cmd, stdout, stderr, popen
        self.returncode: int | None = None
        self._done = threading.Event()

    def wait(self, timeout: float) -> int:
        self.queue.tests_waiting()
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return self.returncode

    def succeed(self, timeout: float) -> None:
        """Waits, and fails the calling test with the tail of the job's errors (or output) unless it exited 0."""
        if self.wait(timeout) != 0:
            log = (self.stderr or self.stdout).read_text()[-4000:]
            raise AssertionError(f"{self.cmd} exited {self.returncode}:\n{log}")


class Queue:
    """Runs its jobs in order, one at a time until a test waits for one, then two at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[Job] = []
        self._running: dict[Job, subprocess.Popen | None] = {}
        self._width, self._stopped = 1, False

    def submit(self, cmd: list[str], stdout: Path, stderr: Path | None = None, **popen) -> Job:
        """Queues ``cmd`` (``start``): its output goes to the file ``stdout``, its errors to ``stderr``
        or, without one, to ``stdout`` too; ``popen``: Popen's other arguments (cwd, env, ...)."""
        job = Job(self, cmd, stdout, stderr, popen)
        with self._lock:
            self._pending.append(job)
        self._pump()
        return job

    def tests_waiting(self) -> None:
        with self._lock:
            self._width = 2
        self._pump()

    def _pump(self) -> None:
        with self._lock:
            while self._pending and len(self._running) < self._width and not self._stopped:
                job = self._pending.pop(0)
                self._running[job] = None
                threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _run(self, job: Job) -> None:
        try:
            with open(job.stdout, "w") as out, open(job.stderr or os.devnull, "w") as err:
                with self._lock:
                    proc = None if self._stopped else start(
                        job.cmd, stdout=out, stderr=err if job.stderr else subprocess.STDOUT, **job.popen)  # fmt: skip
                    self._running[job] = proc
            job.returncode = proc.wait() if proc is not None else -signal.SIGKILL
        except OSError as error:  # it could not start: its output says why, and its test fails on it
            with open(job.stdout, "a") as out:
                out.write(f"background: could not start {job.cmd}: {error}\n")
            job.returncode = 127
        finally:  # whatever happened, the job ends: nothing waits on it for ever
            with self._lock:
                self._running.pop(job, None)
            job._done.set()
            self._pump()

    def stop(self) -> None:
        """Kills the running jobs and drops the queued ones."""
        with self._lock:
            self._stopped = True
            pending, self._pending = self._pending, []
            running = [proc for proc in self._running.values() if proc is not None]
        for proc in running:
            kill(proc)
        for job in pending:
            job.returncode = -signal.SIGKILL
            job._done.set()


JOBS = Queue()  # the session's jobs; conftest stops it at the end of the session


def scratch(prefix: str) -> Path:
    """A new folder for a job's files, removed when the session's process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
