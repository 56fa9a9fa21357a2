"""Follow log files as they grow and turn their events into the catalogue's Prometheus metrics.

For jobs that print the event lines but never imported weightwatch (or run it without a metrics
port): point ``weightwatch tail`` at their logs and scrape it instead. Files are followed by name,
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
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from prometheus_client import CollectorRegistry

from weightwatch.analysis.collect import server_of
from weightwatch.events import Event, Rejected, parse_line
from weightwatch.telemetry import Metrics

_log = logging.getLogger("weightwatch.tail")
#: Longest line kept while waiting for its newline; longer ones are cut (and then rejected or ignored).
MAX_LINE = 1 << 20
#: Sends remembered while waiting for their client.done (to label it with the server).
MAX_PENDING = 10_000
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
    """Maps parsed events to the catalogue's metrics, as the instrumented processes would record them."""

    def __init__(self, registry: CollectorRegistry):
        self.metrics = Metrics(registry)
        self._pending: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
        self.stats = TailStats()

    def line(self, raw: bytes) -> None:
        self.stats.lines += 1
        result = parse_line(raw.decode("utf-8", "replace"))
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
        m = self.metrics
        k = e.key
        if k == "weights.client.send":
            sends = self._pending.setdefault(e.tid or "", [])
            sends.append((server_of(e["url"]), e["op"]))
            self._pending.move_to_end(e.tid or "")
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        elif k == "weights.client.done":
            server, op = self._label(e)
            labels = {"op": op, "server": server}
            for name, field in (("rl_weight_update_wall_seconds", "wall_ms"), ("rl_weight_update_queue_seconds", "queue_ms"),
                                ("rl_weight_update_rpc_seconds", "rpc_ms")):
                v = e.get(field)
                if v is not None:
                    m.observe(name, v / 1000.0, **labels)
            pool = e.get("pool_wait_ms")
            if pool not in (None, "na"):
                m.observe("rl_weight_update_pool_wait_seconds", float(pool) / 1000.0, **labels)
            if e["queue_ms"] is not None:
                m.set("rl_weight_update_last_queue_seconds", e["queue_ms"] / 1000.0, **labels)
            m.set("rl_weight_update_last_success_timestamp_seconds", time.time(), **labels)
        elif k == "weights.rpc.done":
            if e["rpc_ms"] is not None:
                m.observe("rl_admin_rpc_seconds", e["rpc_ms"] / 1000.0, op=e["op"])
        elif k == "ckpt.wait.done":
            if e["wait_ms"] is not None:
                m.observe("rl_checkpoint_wait_seconds", e["wait_ms"] / 1000.0)
        elif k == "ckpt.write.done":
            if e["write_ms"] is not None:
                m.observe("rl_checkpoint_write_seconds", e["write_ms"] / 1000.0)
            m.set("rl_trainer_step", e["step"])
        elif k == "gen.batch.start":
            m.set("rl_generation_inflight_requests", e["inflight"])
        elif k == "gen.batch.done":
            if e["dur_ms"] is not None:
                m.observe("rl_generation_batch_seconds", e["dur_ms"] / 1000.0)
            m.set("rl_generation_inflight_requests", e["inflight"])
        elif k == "rollout":
            if e["trunc_pct"] is not None:
                m.set("rl_rollout_truncated_ratio", e["trunc_pct"] / 100.0)
            m.set("rl_rollout_staleness_steps", e["staleness"])
            m.set("rl_orchestrator_step", e["current_step"])
            m.set("rl_checkpoint_step", e["ckpt_step"])
            lvl = e.get("async_level")
            if lvl is not None and str(lvl).isdigit():
                m.set("rl_async_level", int(lvl))

    def _label(self, e: Event) -> tuple[str, str]:
        srv = e.get("server") or e.get("url")
        op = e.get("op")
        sends = self._pending.get(e.tid or "")
        if sends:
            pick = next((s for s in sends if srv is None or s[0] == server_of(srv)), sends[0])
            sends.remove(pick)
            if not sends:
                self._pending.pop(e.tid or "", None)
            return pick[0], op or pick[1]
        return (server_of(srv) if srv else "unknown"), (op or "update_weights")


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
