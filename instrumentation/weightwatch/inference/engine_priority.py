"""Give vLLM's engine processes a lower CPU priority than the API server that holds the admin lane.

Measured on a 2-core host with 256 streams (docs/inference.md): vLLM's EngineCore and worker processes
are always runnable, because between steps they spin on their shared-memory queues (``sched_yield``
for up to a second after each message). The API server then waits on the run queue for almost half of
the time it wants the CPU, and an admin request that reaches the lane waits with it. At a higher nice
value the spinning processes still take every cycle nobody else wants, but the API server runs as soon
as it has work, and the admin tail shortens. It costs tokens/s (the engine loses the CPU to the API
server and everything else on the host), so it is opt-in (``--engine-nice``); docs/inference.md has both
sides measured.

Only ever lowers priority (a larger nice value), which needs no privileges; never touches the API
server's own threads.
"""

from __future__ import annotations

import logging
import os

_log = logging.getLogger("weightwatch.inference")

MAX_NICE = 19


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children, grandchildren, ...), from /proc; empty where /proc is missing."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return sorted(out)


def lower_priority(pid: int, nice: int) -> int:
    """Raise every thread of process ``pid`` to at least ``nice``; returns how many threads changed."""
    changed = 0
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            # Linux keeps a nice value per thread; PRIO_PROCESS with a thread id sets that thread's.
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:  # the thread ended, or another user's process: leave it
            continue
    return changed


def lower_engine_priority(nice: int, parent: int | None = None) -> list[int]:
    """Renice every process below ``parent`` (default: this API server) to ``nice``; returns their pids."""
    if nice <= 0:
        return []
    nice = min(nice, MAX_NICE)
    pids = descendants(os.getpid() if parent is None else parent)
    for p in pids:
        lower_priority(p, nice)
    _log.info("weightwatch: engine processes %s at nice %d (the API server and admin lane keep theirs)", pids, nice)
    return pids
