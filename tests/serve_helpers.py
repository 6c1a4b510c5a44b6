"""Starting and stopping `artquant` CLI processes that run Ray, for the serve and Ray Data tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_free_env(**extra: str) -> dict:
    """The test environment without RAY_ADDRESS: each CLI process starts (and stops) its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


def start_cli(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`python -m artquant.cli ARGS` in its own session, so the test can end it and every Ray process it started."""
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "artquant.cli", *args], stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM (the CLI shuts Ray down), then SIGKILL for whatever of its session is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill_session(process)


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the process's session and every process below it, then wait until they are all gone.

    Ray starts some of its processes outside the CLI's session; one of them left running could finish writing a
    file after the "kill", which a test that counts what the killed run wrote would miss."""
    below = descendants(process.pid) if process.poll() is None else []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan is a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Processes below `pid` (Ray's workers run under its raylet), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (rc {process.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")
