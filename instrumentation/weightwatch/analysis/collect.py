"""The events of one log stream (or span file) as one polars frame, with what was skipped and why.

Every event keeps ``seq``, its line number in its source, so the join can tell what happened before what
within one process's log (checkpoint wait before an update, batches around it).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from weightwatch.analysis import scan
from weightwatch.contracts import op_of_path

#: How many rejected lines are kept verbatim per reason (the rest are only counted).
SAMPLES_PER_REASON = 3
_VALUE_IN_REASON = re.compile(r"=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


def reason_category(reason: str) -> str:
    """A rejection reason without the offending value, so equal problems count together."""
    if reason.startswith("unknown event "):
        return "unknown event"
    return _VALUE_IN_REASON.sub("", reason)


def server_of(url: str) -> str:
    """host:port of a URL (the ``server`` label), or the text itself when it is not a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return parts.netloc or url


def servers_of(urls: pl.Series) -> pl.Series:
    """``server_of`` of a column of URLs (computed once per distinct URL)."""
    uniq = urls.drop_nulls().unique().to_list()
    return urls.replace_strict({u: server_of(u) for u in uniq}, default=None, return_dtype=pl.String)


def ops_of_paths(paths: pl.Series) -> pl.Series:
    uniq = paths.drop_nulls().unique().to_list()
    return paths.replace_strict({u: op_of_path(u) for u in uniq}, default=None, return_dtype=pl.String)


@dataclass
class Source:
    """Events of one source, per event key as polars frames (``seq`` orders them), its lines, what was skipped."""

    source: str
    origin: str = "log"  # "log" or "spans"
    blocks: dict[str, list[pl.DataFrame]] = field(default_factory=dict)
    lines: int = 0
    rejected: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    _of: dict[str, pl.DataFrame] = field(default_factory=dict)

    def reject(self, reason: str, line: str) -> None:
        cat = reason_category(reason)
        self.rejected[cat] += 1
        kept = self.samples.setdefault(cat, [])
        if len(kept) < SAMPLES_PER_REASON:
            kept.append(line[:500])

    def add_frames(self, frames: dict[str, pl.DataFrame], offset: int = 0) -> None:
        for key, f in frames.items():
            self.blocks.setdefault(key, []).append(f.with_columns(pl.col("seq") + offset) if offset else f)
        self._of.clear()

    def add_block(self, data: bytes) -> None:
        """Parse one newline-aligned block that follows what was added so far."""
        block = scan.scan(data)
        for _seq, why in block.rejected:
            self.reject(why.reason, why.line)
        self.add_frames(block.frames, self.lines)
        self.lines += block.lines

    def append(self, later: Source) -> None:
        """Append a later piece of the same stream (a rotated file)."""
        for key, fs in later.blocks.items():
            self.add_frames({key: pl.concat(fs, how="diagonal_relaxed")}, self.lines)
        self.lines += later.lines
        self.rejected.update(later.rejected)
        for cat, lines in later.samples.items():
            kept = self.samples.setdefault(cat, [])
            kept.extend(lines[: max(0, SAMPLES_PER_REASON - len(kept))])

    def of(self, key: str) -> pl.DataFrame:
        """The events of one key in line order, with every SCHEMA column (null where the event has no such field)."""
        got = self._of.get(key)
        if got is None:
            fs = self.blocks.get(key)
            got = scan.conform(pl.concat(fs, how="diagonal_relaxed", rechunk=True)).sort("seq") if fs else scan.empty_frame()
            self._of[key] = got
            if fs:  # the one frame replaces its blocks: a run's events are held once, not twice
                self.blocks[key] = [got]
        return got

    @property
    def frame(self) -> pl.DataFrame:
        """Every event in one frame (SCHEMA), in line order."""
        return scan.conformed([self.of(k) for k in self.blocks])

    @property
    def events(self) -> int:
        return sum(f.height for fs in self.blocks.values() for f in fs)

    def last_time(self) -> float | None:
        """The latest time the source speaks of: event times, and answers' arrival (send time + wall)."""
        best = None
        for key in self.blocks:
            f = self.of(key)
            t = f.select(pl.max_horizontal(pl.col("t").max(), (pl.col("t") + pl.col("wall_ms") / 1000.0).max())).item()
            if t is not None and (best is None or t > best):
                best = float(t)
        return best


# --------------------------------------------------------------------------- span files


def _num(x: Any) -> float | None:
    try:
        return None if x is None or x == "na" else float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def spans_to_source(source: str, lines: Iterable[str]) -> Source:
    """Turn telemetry.JsonLinesSpanExporter lines into the events the logs give (same frame, same keys)."""
    p = Source(source, origin="spans")
    rows: list[tuple[float, int, dict[str, Any]]] = []  # (time, order, event row)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        p.lines += 1
        try:
            s = json.loads(line)
            name = s["name"]
            tid = str(s["trace_id"])
            start = int(s["start_time_unix_nano"]) / 1e9
            end = int(s["end_time_unix_nano"]) / 1e9
            a = s.get("attributes") or {}
            if not isinstance(a, dict):
                raise TypeError("attributes is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            p.reject(f"span line is not a span: {type(exc).__name__}", line)
            continue
        dur_ms = (end - start) * 1000.0
        if name == "weights.update.server":
            srv = server_of(str(a.get("rl.server", "?")))
            op = str(a.get("rl.op", "?"))
            step = _int(a.get("rl.step"))
            rows.append((start, i, {"key": "weights.client.send", "tid": tid, "server": srv, "op": op, "t": start, "step": step}))
            wall = _num(a.get("rl.wall_ms"))
            rows.append((end, i, {"key": "weights.client.done", "tid": tid, "wall_ms": wall if wall is not None else dur_ms,
                                  "rpc_ms": _num(a.get("rl.rpc_ms")), "queue_ms": _num(a.get("rl.queue_ms")), "server": srv, "op": op,
                                  "server_ms": _num(a.get("rl.server_ms")), "pool_wait_ms": _num(a.get("rl.pool_wait_ms")), "step": step}))
        elif name == "admin.request":
            path = str(a.get("http.target") or a.get("url.path") or a.get("rl.op") or "?")
            sms = _num(a.get("rl.server_ms"))
            rows.append((start, i, {"key": "weights.server.recv", "tid": tid, "path": path, "t": start,
                                    "server_ms": sms if sms is not None else dur_ms}))
        elif name == "engine.rpc":
            op = str(a.get("rl.op", "?"))
            rows.append((start, i, {"key": "weights.rpc.start", "tid": tid, "op": op, "t": start}))
            rpc = _num(a.get("rl.rpc_ms"))
            rows.append((end, i, {"key": "weights.rpc.done", "tid": tid, "op": op, "t": end, "rpc_ms": rpc if rpc is not None else dur_ms}))
        elif name == "ckpt.wait":
            wait = _num(a.get("rl.wait_ms"))
            rows.append((end, i, {"key": "ckpt.wait.done", "target_step": _int(a.get("rl.step")), "wait_ms": wait if wait is not None else dur_ms}))
        elif name == "ckpt.write":
            rows.append((end, i, {"key": "ckpt.write.done", "step": _int(a.get("rl.step")), "write_ms": dur_ms}))
        elif name == "gen.batch":
            rows.append((end, i, {"key": "gen.batch.done", "completions": _int(a.get("rl.completions")) or 0, "dur_ms": dur_ms,
                                  "inflight": _int(a.get("rl.inflight")) or 0}))
    rows.sort(key=lambda r: (r[0], r[1]))
    if rows:
        data = {c: [r[2].get(c) for r in rows] for c in scan.SCHEMA if c != "seq"}
        data["seq"] = list(range(len(rows)))
        f = pl.DataFrame(data, schema=scan.SCHEMA)
        p.add_frames({str(k): g for (k,), g in f.partition_by("key", as_dict=True).items()})
    return p
