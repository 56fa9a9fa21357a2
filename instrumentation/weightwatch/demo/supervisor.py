"""Start the demo's processes and stop every one of them, including their children, with no orphans.

Each child runs in its own session (so its process group id is its pid and a terminal Ctrl-C reaches
only the demo, which then stops the children in order). Stopping a child means: SIGTERM to its whole
group (vLLM's engine core lives in the API server's group), wait up to a timeout, then SIGKILL the
group. On Linux each child also gets PR_SET_PDEATHSIG, so even a SIGKILLed demo takes them down.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_log = logging.getLogger("weightwatch.demo")
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the mask is inherited across exec: clear it
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (non-zombie) process, from /proc (empty where /proc is missing)."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X"):
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid``."""
    return [pid for pid, (_pp, pg) in _proc_table().items() if pg == pgid]


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children that started sessions of their own included)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (pp, _pg) in table.items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive_pids(pids: list[int]) -> list[int]:
    table = _proc_table()
    return [p for p in pids if p in table]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    out_path: Path
    _out: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The end of the child's output, for error messages."""
        try:
            text = self.out_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Owns the children; ``stop_all`` is idempotent and safe to call from a signal path."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], out_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Child:
        out = open(out_path, "ab")
        # Block Ctrl-C/SIGTERM while starting, so a signal cannot land between fork and bookkeeping
        # (a child we do not know about is a child we cannot stop).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True, preexec_fn=_child_setup,
            )
            child = Child(name, popen, out_path, out)
            self.children.append(child)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return child

    def stop(self, child: Child, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the child's group, wait up to ``timeout``, then kill what is left. Returns the exit code."""
        pgid = child.pid
        # Remember the whole tree now: a child may put its own children in another session
        # (``weightwatch serve`` does, for vLLM), and once the parent is gone they are reparented.
        tree = descendants(child.pid)
        if child.alive() or group_members(pgid):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not child.alive() and not group_members(pgid) and not alive_pids(tree):
                    break
                time.sleep(0.1)
            else:
                _log.warning("%s did not stop within %.0f s; killing its process group", child.name, timeout)
        # Kill stragglers: the leader may have exited and left workers behind.
        for _ in range(5):
            left = alive_pids(tree) + group_members(pgid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        try:
            code = child.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if child._out is not None:
            child._out.close()
            child._out = None
        return code

    def stop_all(self, timeout: float = 20.0) -> dict[str, int | None]:
        """Stop children in reverse start order (the load first, the server last)."""
        codes = {}
        for child in reversed(self.children):
            codes[child.name] = self.stop(child, timeout)
        return codes

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)
