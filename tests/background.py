"""The test session's background builds: started at a lower priority in a session of their own, and
killed with every process of that session (the compilers they start: cicc, ptxas; ninja's c++,
which ninja puts in process groups of their own)."""

from __future__ import annotations

import os
import signal
import subprocess


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """``cmd`` under ``nice -n 10``, in a new session (``popen``: Popen's other arguments)."""
    return subprocess.Popen(["nice", "-n", "10", *cmd], start_new_session=True, **popen)


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
