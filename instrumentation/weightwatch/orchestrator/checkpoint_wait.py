"""Waiting for the trainer's checkpoint: poll ``ROOT/step_N/STABLE``, time it, and catch the wrong path.

The trainer writes ``step_N/`` and the ``STABLE`` marker last, so the marker means "complete". A
long wait is the checkpoint-I/O signature; a wait that never ends is often an orchestrator polling a
directory the trainer never writes to (relative path, other run dir, ``weights/`` vs ``checkpoints/``).
The waiter looks next to the polled root for step directories and warns once, naming both paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from weightwatch import event_metrics, events, telemetry
from weightwatch.contracts import STABLE_MARKER, STEP_DIR_RE, step_dir

_log = logging.getLogger("weightwatch.orchestrator")

STEP_DIR = STEP_DIR_RE
#: How often (at most) the waiter looks around for a root the trainer does write to.
WRONG_PATH_CHECK_INTERVAL_S = 1.0
#: Directories scanned per level when looking for the trainer's real root (bounds the cost on big trees).
MAX_SCAN_ENTRIES = 200
#: A step dir written within this many seconds counts as "a trainer is writing here now".
RECENT_WRITE_S = 600.0

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


class CheckpointWaitTimeout(TimeoutError):
    """The STABLE marker did not appear in time. ``candidate`` is where step dirs were found instead, if anywhere."""

    def __init__(self, message: str, *, step_dir: Path, waited_s: float, candidate: Path | None):
        super().__init__(message)
        self.step_dir, self.waited_s, self.candidate = step_dir, waited_s, candidate


def _newest_step(root: Path) -> tuple[int, float] | None:
    """(N, mtime) of the most recently modified ``root/step_N`` directory, or None (missing or no step dirs)."""
    best: tuple[int, float] | None = None
    try:
        with os.scandir(root) as it:
            for i, entry in enumerate(it):
                if i >= 10 * MAX_SCAN_ENTRIES:
                    break
                m = STEP_DIR.match(entry.name)
                if m and entry.is_dir():
                    item = (int(m.group(1)), entry.stat().st_mtime)
                    if best is None or (item[1], item[0]) > (best[1], best[0]):
                        best = item
    except OSError:
        return None
    return best


def _subdirs(path: Path) -> list[Path]:
    out: list[Path] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if len(out) >= MAX_SCAN_ENTRIES:
                    break
                if entry.is_dir() and not STEP_DIR.match(entry.name) and not entry.name.startswith("."):
                    out.append(Path(entry.path))
    except OSError:
        pass
    return out


def find_trainer_root(root: Path, *, target_step: int | None = None, now: float | None = None) -> tuple[Path, int] | None:
    """A directory near ``root`` where a trainer is writing step dirs while ``root`` gets none, with its newest step.

    Looks at ``root``'s children, its siblings and their children (run/weights vs run/checkpoints), and
    its cousins (run1/weights vs run2/weights).
    A candidate counts only when its newest step dir is recent (``RECENT_WRITE_S``) and newer than
    anything under ``root``, so finished runs lying next to the current one do not raise false alarms;
    the candidate must also be near ``target_step`` (reached it when ``root`` has step dirs, at most one
    step short when it has none): a parallel run next door that is merely busy is not evidence.
    """
    root = root.absolute()
    now = time.time() if now is None else now
    own = _newest_step(root)
    floor = max(now - RECENT_WRITE_S, own[1] if own else float("-inf"))
    candidates: list[Path] = list(_subdirs(root))
    parent = root.parent
    if parent != root:
        siblings = [p for p in _subdirs(parent) if p != root]
        candidates += siblings
        for s in siblings[:50]:
            candidates += _subdirs(s)[:20]
        grandparent = parent.parent
        if grandparent != parent:
            for aunt in [p for p in _subdirs(grandparent) if p != parent][:50]:
                candidates += _subdirs(aunt)[:20]
    best: tuple[Path, int, float] | None = None
    for c in candidates:
        found = _newest_step(c)
        if found is None or found[1] <= floor:
            continue
        if target_step is not None and found[0] < (target_step if own is not None else target_step - 1):
            continue  # a run next door that is not (yet) near the step we wait for is no evidence
        if best is None or found[1] > best[2]:
            best = (c, found[0], found[1])
    return (best[0], best[1]) if best else None


@dataclass
class _Waiter:
    """The polling state shared by the async and the sync wait."""

    root: Path
    step: int
    timeout: float
    poll_interval: float

    def __post_init__(self) -> None:
        for name in ("timeout", "poll_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < float("inf")):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.poll_interval > self.timeout:
            raise ValueError(f"poll_interval ({self.poll_interval:g}s) must not exceed timeout ({self.timeout:g}s)")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"step must be an int >= 0, got {self.step!r}")
        self.target = step_dir(self.root, self.step)
        self.marker = self.target / STABLE_MARKER
        self.t0 = time.perf_counter()
        self._last_check = float("-inf")
        self.candidate: tuple[Path, int] | None = None

    def poll(self) -> bool:
        """One look: True when the marker exists. Also checks for the wrong path now and then."""
        if self.marker.is_file():
            return True
        now = time.perf_counter()
        if now - self._last_check >= WRONG_PATH_CHECK_INTERVAL_S:
            self._last_check = now
            self._check_wrong_path()
        return False

    def _check_wrong_path(self) -> None:
        found = find_trainer_root(self.root, target_step=self.step)
        if found is None:
            return
        self.candidate = found
        key = (str(self.root.absolute()), str(found[0]))
        with _warned_lock:
            if key in _warned:
                return
            _warned.add(key)
        own = _newest_step(self.root)
        polled = (
            f"{self.root.absolute()} ("
            + ("does not exist" if not self.root.exists() else "has no step_* directories" if own is None else f"newest step_{own[0]}")
            + ")"
        )
        _log.warning(
            "weightwatch: waiting for %s but the trainer seems to write elsewhere: polling %s, while %s has step_%d. "
            "Check the checkpoint path the orchestrator and the trainer are given.",
            self.marker,
            polled,
            found[0],
            found[1],
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def expired(self) -> bool:
        return self.elapsed() >= self.timeout

    def timeout_error(self) -> CheckpointWaitTimeout:
        waited = self.elapsed()
        msg = f"checkpoint step {self.step} not ready after {waited:.1f}s (timeout {self.timeout:g}s): {self.marker} does not exist"
        if not self.root.exists():
            msg += f"; the root {self.root.absolute()} does not exist"
        elif self.target.exists():
            msg += f"; {self.target} exists but the trainer has not marked it {STABLE_MARKER} (still writing, or it crashed)"
        else:
            own = _newest_step(self.root)
            msg += f"; newest under the root is {'step_' + str(own[0]) if own is not None else 'nothing'}"
        self._check_wrong_path()
        if self.candidate is not None:
            msg += f"; step directories found at {self.candidate[0]} (newest step_{self.candidate[1]}): wrong path?"
        return CheckpointWaitTimeout(msg, step_dir=self.target, waited_s=waited, candidate=self.candidate[0] if self.candidate else None)


def _span(waiter: _Waiter):  # type: ignore[no-untyped-def]
    return (
        telemetry.get()
        .tracer("weightwatch.orchestrator")
        .start_as_current_span("ckpt.wait", attributes={"rl.step": waiter.step, "rl.ckpt_dir": str(waiter.target)})
    )


def _started(waiter: _Waiter) -> None:
    events.emit("ckpt.wait.start", target_step=waiter.step, path=quote(str(waiter.target.absolute())))


def _found(waiter: _Waiter, span: trace.Span) -> Path:
    wait_ms = waiter.elapsed() * 1000.0
    span.set_attribute("rl.wait_ms", round(wait_ms, 3))
    event_metrics.emit("ckpt.wait.done", target_step=waiter.step, wait_ms=wait_ms)  # and rl_checkpoint_wait_seconds
    return waiter.target


def _timed_out(waiter: _Waiter, span: trace.Span) -> CheckpointWaitTimeout:
    err = waiter.timeout_error()
    span.set_attribute("rl.wait_ms", round(err.waited_s * 1000.0, 3))
    # The time is real even though the marker never came: it is the worst case of a slow checkpoint.
    telemetry.get().metrics.observe("rl_checkpoint_wait_seconds", err.waited_s)
    span.set_status(Status(StatusCode.ERROR, str(err)))
    _log.warning("weightwatch: %s", err)
    return err


async def wait_for_checkpoint(ckpt_root: str | os.PathLike[str], step: int, *, timeout: float, poll_interval: float = 0.5) -> Path:
    """Wait until ``ckpt_root/step_N/STABLE`` exists; return ``step_N``'s path.

    Raises CheckpointWaitTimeout (a TimeoutError) after ``timeout`` seconds, saying what it found.
    File checks run in a worker thread, so a slow shared filesystem never stalls the event loop.
    """
    waiter = _Waiter(Path(ckpt_root), step, timeout, poll_interval)
    with _span(waiter) as span:
        _started(waiter)
        while True:
            if await asyncio.to_thread(waiter.poll):
                return _found(waiter, span)
            if waiter.expired():
                raise _timed_out(waiter, span)
            await asyncio.sleep(min(waiter.poll_interval, max(0.0, waiter.timeout - waiter.elapsed())))


def wait_for_checkpoint_sync(ckpt_root: str | os.PathLike[str], step: int, *, timeout: float, poll_interval: float = 0.5) -> Path:
    """The blocking twin of ``wait_for_checkpoint`` for orchestrators without an event loop."""
    waiter = _Waiter(Path(ckpt_root), step, timeout, poll_interval)
    with _span(waiter) as span:
        _started(waiter)
        while True:
            if waiter.poll():
                return _found(waiter, span)
            if waiter.expired():
                raise _timed_out(waiter, span)
            time.sleep(min(waiter.poll_interval, max(0.0, waiter.timeout - waiter.elapsed())))
