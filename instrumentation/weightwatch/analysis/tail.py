"""Follow log files as they grow and turn their events into the catalogue's Prometheus metrics.

For jobs that print the event lines but never imported weightwatch (or run it without a metrics
port): point ``weightwatch tail`` at their logs and scrape it instead. Each event becomes metrics through
``weightwatch.event_metrics``, the table the live emitters record through, so the two cannot disagree
(a ``client.done ... ok=0`` is a failure here too); the age of admin calls still in flight is computed
at scrape time from their ``client.send``. Files are followed by name,
like ``tail -F``: a rotation (rename, then a new file) is noticed by inode and the old file is read to
its end first; a truncation in place (copytruncate) is noticed by size, or, when the file grew past our
position again before we looked, by the last bytes we read no longer being there; reading restarts at 0.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from prometheus_client import CollectorRegistry

from weightwatch.contracts import op_of_path
from weightwatch.event_metrics import EventRecorder
from weightwatch.events import Event, Rejected, parse_line
from weightwatch.telemetry import Metrics

_log = logging.getLogger("weightwatch.tail")
#: Longest line kept while waiting for its newline; longer ones are cut (and then rejected or ignored).
MAX_LINE = 1 << 20


class Follower:
    """One file followed by name across rotation and truncation; yields complete lines."""

    def __init__(self, path: str, from_start: bool = False):
        self.path = path
        self._fh: BinaryIO | None = None
        self._ino: tuple[int, int] | None = None
        self._pos = 0
        self._buf = b""
        self._seen = b""  # the last bytes read, to recognise the same file content at the same offset
        self._from_start = from_start
        self.rotations = 0
        self.truncations = 0
        self._open(initial=True)

    def _open(self, initial: bool = False) -> bool:
        try:
            fh = open(self.path, "rb")
        except OSError:
            return False
        st = os.fstat(fh.fileno())
        self._fh, self._ino = fh, (st.st_dev, st.st_ino)
        self._pos = st.st_size if (initial and not self._from_start) else 0
        self._seen = b""
        if self._pos:
            fh.seek(max(0, self._pos - 64))
            self._seen = fh.read(self._pos - fh.tell())
        fh.seek(self._pos)
        return True

    def _read_all(self) -> list[bytes]:
        assert self._fh is not None
        lines: list[bytes] = []
        while True:
            chunk = self._fh.read(1 << 16)
            if not chunk:
                break
            self._pos += len(chunk)
            self._seen = (self._seen + chunk)[-64:]
            data = self._buf + chunk
            parts = data.split(b"\n")
            self._buf = parts.pop()
            if len(self._buf) > MAX_LINE:
                self._buf = self._buf[-MAX_LINE:]
            lines.extend(parts)
        return lines

    def poll(self) -> list[bytes]:
        """New complete lines since the last poll."""
        if self._fh is None:
            return self._read_all() if self._open() else []
        if self._rewritten():
            self.truncations += 1
            self._fh.seek(0)
            self._pos, self._buf, self._seen = 0, b"", b""
        lines = self._read_all()
        try:
            st = os.stat(self.path)
        except OSError:
            return lines  # rotated away and not recreated yet: keep the old file open
        if (st.st_dev, st.st_ino) != self._ino:
            lines += self._read_all()  # the rest of the rotated file, then the new one from its start
            if self._buf:
                lines.append(self._buf)
                self._buf = b""
            self._fh.close()
            self._fh = None
            self.rotations += 1
            if self._open():
                lines += self._read_all()
        elif st.st_size < self._pos:  # truncated in place
            self.truncations += 1
            self._fh.seek(0)
            self._pos, self._buf, self._seen = 0, b"", b""
            lines += self._read_all()
        return lines

    def _rewritten(self) -> bool:
        """Truncated and written again past our position since the last poll?"""
        assert self._fh is not None
        if not self._seen:
            return False
        try:
            got = os.pread(self._fh.fileno(), len(self._seen), self._pos - len(self._seen))
        except OSError:
            return False
        return got != self._seen

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class TailStats:
    lines: int = 0
    events: int = 0
    rejected: int = 0


class EventMetrics:
    """Parsed lines -> the catalogue's metrics, through the same table the live emitters use (event_metrics)."""

    def __init__(self, registry: CollectorRegistry):
        self.metrics = Metrics(registry)
        self.recorder = EventRecorder(self.metrics)
        self.stats = TailStats()

    def line(self, raw: bytes) -> None:
        self.stats.lines += 1
        text = raw.decode("utf-8", "replace")
        result = parse_line(text)
        if result is None:
            return
        if isinstance(result, Rejected):
            self.stats.rejected += 1
            _log.debug("skipped line (%s): %s", result.reason, result.line[:200])
            return
        self.stats.events += 1
        try:
            self.event(result)
        except Exception:  # noqa: BLE001 - one odd event must not stop the tail
            _log.warning("weightwatch tail: cannot record %s", result.key, exc_info=True)

    def event(self, e: Event) -> None:
        fields = e.fields
        if e.key == "weights.client.send" and not fields.get("op"):
            fields = {**fields, "op": op_of_path(str(fields.get("url") or ""))}  # seed-era line: the op is the URL's
        self.recorder.record(e.key, e.tid, fields)


class Tailer:
    """Follow files and feed EventMetrics until stopped."""

    def __init__(self, paths: Sequence[str], registry: CollectorRegistry, *, from_start: bool = False, interval: float = 0.25):
        self.followers = [Follower(p, from_start=from_start) for p in paths]
        self.events = EventMetrics(registry)
        self.interval = interval
        self._stop = threading.Event()

    def poll_once(self) -> int:
        n = 0
        for f in self.followers:
            try:
                lines = f.poll()
            except OSError:
                _log.warning("weightwatch tail: cannot read %s", f.path, exc_info=True)
                continue
            for line in lines:
                self.events.line(line)
            n += len(lines)
        return n

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)
        self.poll_once()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for f in self.followers:
            f.close()
