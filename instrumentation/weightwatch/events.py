"""The text log grammar of weightwatch: formatting and parsing live together so they cannot drift.

A line carries a tag anywhere (logger prefixes and ANSI colours are fine)::

    [weights][TID] client.send url=URL op=OP t=T
    [ckpt] wait.done target_step=N wait_ms=X
    [rollout] trunc_pct=X current_step=N ckpt_step=N staleness=N

Required fields are typed (int, float, str); unknown ``key=value`` fields are kept as strings;
a float field may be ``na`` when it is honestly unknown (a server without weightwatch reports no rpc_ms).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY, EventSpec

#: Marker for a value that is unknown (for example rpc_ms from a server without weightwatch).
UNKNOWN = "na"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_TAG = re.compile(r"\[(weights|ckpt|gen|rollout)\](?:\[([^\]\s]*)\])?")
_TAGS_WITH_NAMES = {e.tag: {x.name for x in EVENTS if x.tag == e.tag} for e in EVENTS}
_FIELD_TYPES: dict[str, dict[str, str]] = {e.key: dict(e.fields) for e in EVENTS}

_log = logging.getLogger("weightwatch.events")


@dataclass(frozen=True, slots=True)
class Event:
    """One parsed event. ``fields`` holds typed required fields plus extra keys as strings."""

    key: str
    tid: str | None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1] if "." in self.key else ""

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line that carries an event tag but does not follow the grammar, with the reason."""

    reason: str
    line: str


def _fmt_value(key: str, value: Any) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return UNKNOWN
        return repr(round(value, 3 if key.endswith("_ms") else 6))
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"value of {key!r} must be non-empty and without whitespace: {text!r}")
    return text


def normalize(key: str, value: Any) -> Any:
    """The value a field takes after a format/parse round trip (floats are rounded)."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not math.isfinite(value):
            return None
        return round(value, 3 if key.endswith("_ms") else 6)
    return value


def format_event(key: str, tid: str | None = None, **fields: Any) -> str:
    """Render one event line. Required fields come first in canonical order, then extras.

    Raises ValueError for an unknown event, a missing required field or a missing TID.
    """
    spec = EVENTS_BY_KEY.get(key)
    if spec is None:
        raise ValueError(f"unknown event {key!r}")
    missing = [k for k, _ in spec.fields if k not in fields]
    if missing:
        raise ValueError(f"event {key} is missing {', '.join(missing)}")
    if spec.has_tid:
        if not tid or any(c.isspace() or c == "]" for c in tid):
            raise ValueError(f"event {key} needs a trace id without whitespace, got {tid!r}")
        head = f"[{spec.tag}][{tid}] {spec.name}"
    else:
        head = f"[{spec.tag}] {spec.name}" if spec.name else f"[{spec.tag}]"
    ordered = [k for k, _ in spec.fields] + [k for k in fields if k not in _FIELD_TYPES[key]]
    parts = [head] + [f"{k}={_fmt_value(k, fields[k])}" for k in ordered]
    return " ".join(parts)


def _convert(kind: str, raw: str) -> Any:
    if kind == "str":
        return raw
    if raw == UNKNOWN and kind == "float":
        return None
    if kind == "int":
        return int(raw)
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def parse_line(line: str) -> Event | Rejected | None:
    """Parse one log line: an Event, a Rejected with the reason, or None when no tag is present."""
    if "[" not in line:
        return None
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    m = _TAG.search(line)
    if m is None:
        return None
    tag, tid = m.group(1), m.group(2)
    rest = line[m.end():].split()
    names = _TAGS_WITH_NAMES[tag]
    if "" in names and (not rest or "=" in rest[0]):
        name = ""
    else:
        if not rest:
            return Rejected(f"[{tag}] without an event name", line)
        name = rest[0]
        rest = rest[1:]
        if name not in names:
            return Rejected(f"unknown event [{tag}] {name}", line)
    key = f"{tag}.{name}" if name else tag
    spec: EventSpec = EVENTS_BY_KEY[key]
    if spec.has_tid and not tid:
        return Rejected(f"{key} without [TID]", line)
    types = _FIELD_TYPES[key]
    fields: dict[str, Any] = {}
    for token in rest:
        k, sep, v = token.partition("=")
        if not sep or not k:
            continue  # free text after the fields (logger suffixes) is not ours to judge
        kind = types.get(k)
        if kind is None:
            fields.setdefault(k, v)
            continue
        if k in fields:
            continue  # first occurrence wins
        try:
            fields[k] = _convert(kind, v)
        except ValueError:
            return Rejected(f"{key}: {k}={v!r} is not {'an' if kind == 'int' else 'a'} {kind}", line)
    missing = [k for k in types if k not in fields]
    if missing:
        return Rejected(f"{key}: missing {', '.join(missing)}", line)
    return Event(key, tid if spec.has_tid else None, fields)


def parse_lines(lines: Iterable[str]) -> Iterator[Event | Rejected]:
    """Parse many lines, skipping those without a tag."""
    for line in lines:
        result = parse_line(line)
        if result is not None:
            yield result


def logger_for(role: str) -> logging.Logger:
    """The named logger a role emits on, so users' own log setups (loguru bridges, JSON) apply."""
    return logging.getLogger(f"weightwatch.{role}")


def emit(key: str, tid: str | None = None, *, logger: logging.Logger | None = None, **fields: Any) -> str | None:
    """Log one event at INFO on the role's logger. Never raises: telemetry must not break the host."""
    try:
        line = format_event(key, tid, **fields)
        (logger or logger_for(EVENTS_BY_KEY[key].role)).info(line)
        return line
    except Exception as exc:  # noqa: BLE001 - a bad event must not crash training
        _log.warning("weightwatch: dropped event %s: %s", key, exc)
        return None
