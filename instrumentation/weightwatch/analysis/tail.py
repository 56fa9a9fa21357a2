"""Follow log files as they grow and turn their events into the catalogue's Prometheus metrics.

For jobs that print the event lines but never imported weightwatch (or run it without a metrics
port): point ``weightwatch tail`` at their logs and scrape it instead. Each event becomes metrics through
``weightwatch.event_metrics``, the table the live emitters record through, so the two cannot disagree
(a ``client.done ... ok=0`` is a failure here too); the age of admin calls still in flight is computed
at scrape time from their ``client.send``. Files are followed by name,
like ``tail -F``: a rotation (rename, then a new file) is noticed by inode and the old file is read to
its end first; a truncation in place (copytruncate) is noticed by size, or, when the file grew past our
position again before we looked, by the last bytes we read no longer being there; reading restarts at 0.
What was written between our last read and the truncation lives only in the copy: the copy (a file next
to it named ``NAME.*`` or ``NAME-*`` holding the bytes we read last at the same offset) is read from our
position to its end first, so copytruncate loses no line. A line longer than MAX_LINE is dropped whole
and counted (a cut would let its last megabyte pass for a line of its own).
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
#: Rotated files looked at (newest first) for the copy that copytruncate made.
MAX_COPY_CANDIDATES = 20


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
        self._skipping = False  # inside a line longer than MAX_LINE: drop bytes until its newline
        self.rotations = 0
        self.truncations = 0
        self.overlong = 0  # lines dropped for being longer than MAX_LINE
        self.recovered_from_copy = 0  # lines read from a copytruncate copy
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
        self._skipping = False
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
            lines.extend(self._split(chunk))
        return lines

    def _split(self, chunk: bytes) -> list[bytes]:
        parts = (self._buf + chunk).split(b"\n")
        self._buf = parts.pop()
        if self._skipping and parts:
            parts.pop(0)  # the end of the overlong line
            self._skipping = False
        if len(self._buf) > MAX_LINE:
            self._buf = b""
            if not self._skipping:
                self._skipping = True
                self.overlong += 1
        return parts

    def _from_copy(self) -> list[bytes]:
        """After a truncation: the lines past our position in the copy copytruncate made, if we find it."""
        if not self._seen or self._pos < len(self._seen):
            return []
        directory, name = os.path.split(os.path.abspath(self.path))
        try:
            with os.scandir(directory) as it:
                found = [e for e in it if e.name != name and e.name[: len(name)] == name and e.name[len(name) : len(name) + 1] in (".", "-")]
            found = sorted(found, key=lambda e: e.stat().st_mtime, reverse=True)[:MAX_COPY_CANDIDATES]
        except OSError:
            return []
        for entry in found:
            try:
                with open(entry.path, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if self._ino == (st.st_dev, st.st_ino) or st.st_size < self._pos:
                        continue
                    if os.pread(fh.fileno(), len(self._seen), self._pos - len(self._seen)) != self._seen:
                        continue
                    fh.seek(self._pos)
                    lines: list[bytes] = []
                    while chunk := fh.read(1 << 16):
                        lines.extend(self._split(chunk))
            except OSError:
                continue
            if self._buf:  # the copy ends where the truncation cut: its last line is complete
                lines.append(self._buf)
                self._buf = b""
            self.recovered_from_copy += len(lines)
            return lines
        return []

    def _restart(self) -> list[bytes]:
        """The file was truncated in place: finish from the copy, then read it again from 0."""
        assert self._fh is not None
        self.truncations += 1
        lines = self._from_copy()
        self._fh.seek(0)
        self._pos, self._buf, self._seen, self._skipping = 0, b"", b"", False
        return lines

    def poll(self) -> list[bytes]:
        """New complete lines since the last poll."""
        if self._fh is None:
            return self._read_all() if self._open() else []
        lines = self._restart() if self._rewritten() else []
        lines += self._read_all()
        try:
            st = os.stat(self.path)
        except OSError:
            return lines  # rotated away and not recreated yet: keep the old file open
        if (st.st_dev, st.st_ino) != self._ino:
            lines += self._read_all()  # the rest of the rotated file, then the new one from its start
            if self._buf and not self._skipping:
                lines.append(self._buf)
                self._buf = b""
            self._fh.close()
            self._fh = None
            self.rotations += 1
            if self._open():
                lines += self._read_all()
        elif st.st_size < self._pos:  # truncated in place
            lines += self._restart()
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
            overlong = f.overlong
            try:
                lines = f.poll()
            except OSError:
                _log.warning("weightwatch tail: cannot read %s", f.path, exc_info=True)
                continue
            finally:
                self.events.stats.rejected += f.overlong - overlong
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
