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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY, EventSpec
from weightwatch.contracts import op_of_path

#: Marker for a value that is unknown (for example rpc_ms from a server without weightwatch).
UNKNOWN = "na"

# The grammar's pieces as plain pattern text: ``parse_line`` compiles them with ``re``, the analyzer's bulk
# reader (weightwatch.analysis.scan) hands the same text to its columnar regex engine, so they cannot drift.
#: Whitespace between tokens: Unicode White_Space, spelled out (engines disagree on what ``\s`` means).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_WS = f"[{WHITESPACE}]"
_NOT_WS = f"[^{WHITESPACE}]"
TAGS = tuple(dict.fromkeys(e.tag for e in EVENTS))
#: An event tag, optionally followed by ``[TID]`` (group 1: the TID); the first one in a line is the line's event.
TAG_PATTERN = r"\[(?:" + "|".join(TAGS) + r")\](?:\[([^\]" + WHITESPACE + r"]*)\])?"
#: The first tag's name (group 1).
TAG_NAME_PATTERN = r"\[(" + "|".join(TAGS) + r")\]"


def head_pattern(tag: str) -> str:
    """The head after the first ``[tag]`` of a line: its ``[TID]`` (group ``tid``, absent when there is none) and the
    first token after them (group ``name``: the event name, or a field of [rollout])."""
    return r"\[" + tag + r"\](?:\[(?P<tid>[^\]" + WHITESPACE + r"]*)\])?" + _WS + "*(?P<name>" + _NOT_WS + "*)"


#: ANSI colour and cursor sequences (stripped before anything else).
ANSI_PATTERN = r"\x1b\[[0-9;?]*[ -/]*[@-~]"
#: Numbers as the grammar accepts them: decimal, ASCII digits, no underscores, no inf/nan words.
FLOAT_PATTERN = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
INT_PATTERN = r"[+-]?[0-9]{1,18}"


def field_pattern(name: str) -> str:
    """The first ``name=VALUE`` token after the head (group 1: VALUE), for a line that starts at its tag."""
    return _WS + re.escape(name) + "=(" + _NOT_WS + "*)"


_ANSI = re.compile(ANSI_PATTERN)
_TAG = re.compile(TAG_PATTERN)
_TOKENS = re.compile(_WS + "+")
_FLOAT = re.compile(FLOAT_PATTERN)
_INT = re.compile(INT_PATTERN)
_TAGS_WITH_NAMES = {e.tag: {x.name for x in EVENTS if x.tag == e.tag} for e in EVENTS}
_FIELD_TYPES: dict[str, dict[str, str]] = {e.key: dict(e.fields) for e in EVENTS}


def op_of_url(url: str) -> str:
    """The admin op a URL calls: seed-era ``client.send`` lines carry no ``op=``, only the URL."""
    try:
        path = urlsplit(url).path
    except ValueError:
        path = url
    return op_of_path(path or url)


#: Fields a line may leave out because they follow from another field: event key -> field -> (source field, how).
DERIVED: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {"weights.client.send": {"op": ("url", op_of_url)}}

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
    if text.split() != [text]:  # empty, or holds whitespace (str.split splits on exactly what isspace() names)
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
        if not tid or "]" in tid or tid.split() != [tid]:
            raise ValueError(f"event {key} needs a trace id without whitespace, got {tid!r}")
        head = f"[{spec.tag}][{tid}] {spec.name}"
    else:
        head = f"[{spec.tag}] {spec.name}" if spec.name else f"[{spec.tag}]"
    ordered = [k for k, _ in spec.fields] + [k for k in fields if k not in _FIELD_TYPES[key]]
    parts = [head] + [f"{k}={_fmt_value(k, fields[k])}" for k in ordered]
    return " ".join(parts)


def convert(kind: str, raw: str) -> Any:
    """A field's value from its text: ``str`` as is, ``int``/``float`` by the grammar's patterns (``na``: an unknown float).

    Raises ValueError for text the grammar does not accept as that kind.
    """
    if kind == "str":
        return raw
    if kind == "float":
        if raw == UNKNOWN:
            return None
        if _FLOAT.fullmatch(raw):
            value = float(raw)
            if math.isfinite(value):
                return value
        raise ValueError(f"{raw!r} is not a finite decimal number")
    if _INT.fullmatch(raw):
        return int(raw)
    raise ValueError(f"{raw!r} is not a decimal integer")


def kind_article(kind: str) -> str:
    return "an" if kind == "int" else "a"


def parse_line(line: str) -> Event | Rejected | None:
    """Parse one log line: an Event, a Rejected with the reason, or None when no tag is present."""
    if "[" not in line:
        return None
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    m = _TAG.search(line)
    if m is None:
        return None
    tag, tid = line[m.start() + 1: line.index("]", m.start())], m.group(1)
    rest = [t for t in _TOKENS.split(line[m.end():]) if t]
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
            fields[k] = convert(kind, v)
        except ValueError:
            return Rejected(f"{key}: {k}={v!r} is not {kind_article(kind)} {kind}", line)
    for k, (source, how) in DERIVED.get(key, {}).items():
        if k not in fields and isinstance(fields.get(source), str):
            fields[k] = how(fields[source])
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
