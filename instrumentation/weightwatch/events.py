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
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

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


# --------------------------------------------------------------------------- bulk parsing
#
# The analyzer reads gigabytes of logs. ``scan_bytes`` parses a whole block of lines at C speed where
# it can and agrees with ``parse_line`` on every line: same events, same fields, same rejection reasons.
# One bytes regex finds the first tag of every line; the high-volume events written in canonical
# order (as ``format_event`` writes them) are matched field by field in that same pass, everything
# else goes through the general token loop.

_BTAG = re.compile(rb"\[(?:weights|ckpt|gen|rollout)\]")
_BANSI = re.compile(_ANSI.pattern.encode())
# Bytes that str.split() treats as whitespace but bytes.split() does not (besides non-ASCII).
_STR_ONLY_SPACE = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")
#: The events matched field by field in the regex pass (the bulk of any run's log).
FAST_EVENTS = ("weights.client.done", "weights.client.send", "gen.batch.done")
#: A raw event as ``scan_bytes`` yields it: (key, tid, values in the spec's field order, extra fields or None).
RawEvent = tuple[str, "str | None", tuple[Any, ...], "dict[str, str] | None"]


def _fields_pattern(key: str) -> bytes:
    return b" ".join(re.escape(k.encode()) + rb"=([^\s=]+)" for k, _ in EVENTS_BY_KEY[key].fields)


# Groups: 0 tid of client.done/client.send (one group: the tid is scanned once), 1-3 client.done fields,
# 4-6 client.send fields, 7-9 gen batch.done fields, 10 tag / 11 [tid] of any other event, 12 the rest of the line.
_BLINE = re.compile(
    rb"\[(?:weights\]\[([^\]\s]+)\] client\.(?:done " + _fields_pattern("weights.client.done")
    + rb"|send " + _fields_pattern("weights.client.send")
    + rb")|gen\] batch\.done " + _fields_pattern("gen.batch.done")
    + rb"|(weights|ckpt|gen|rollout)\](\[[^\]\s]*\])?)([^\n]*)"
)
assert FAST_EVENTS == ("weights.client.done", "weights.client.send", "gen.batch.done") and _BLINE.groups == 13
_FAST_GROUPS = [(k, EVENTS_BY_KEY[k].has_tid, len(EVENTS_BY_KEY[k].fields)) for k in FAST_EVENTS]


def _bytes_float(raw: bytes) -> Any:
    if raw == b"na":
        return None
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


_BCONVERT = {"str": bytes.decode, "int": int, "float": _bytes_float}
# tag -> event name -> (key, has_tid, {field bytes: (index, field name, converter, kind)}, required field names)
_BSPECS: dict[bytes, dict[bytes, tuple[str, bool, dict[bytes, tuple[int, str, Any, str]], tuple[str, ...]]]] = {}
for _e in EVENTS:
    _BSPECS.setdefault(_e.tag.encode(), {})[_e.name.encode()] = (
        _e.key,
        _e.has_tid,
        {k.encode(): (i, k, _BCONVERT[kind], kind) for i, (k, kind) in enumerate(_e.fields)},
        tuple(k for k, _ in _e.fields),
    )
_FAST_CONVERTERS: list[tuple[Any, ...]] = [tuple(_BCONVERT[kind] for _, kind in EVENTS_BY_KEY[k].fields) for k in FAST_EVENTS]


def _extras(rest: bytes, known: Container[bytes], extra: dict[str, str] | None) -> dict[str, str] | None:
    """Unknown ``key=value`` tokens after an event's fields (known keys repeated later are ignored)."""
    for tok in rest.split():
        k, sep, v = tok.partition(b"=")
        if not sep or not k or k in known:
            continue
        if extra is None:
            extra = {}
        ks = k.decode()
        if ks not in extra:
            extra[ks] = v.decode()
    return extra


def _general(data: bytes, tag: bytes, tid_br: bytes, rest: bytes, cursor: list[int]) -> RawEvent | Rejected:
    """The token loop of ``parse_line`` on bytes, for a line the fast alternatives did not take."""
    names = _BSPECS[tag]
    toks = rest.split()
    if b"" in names and (not toks or b"=" in toks[0]):
        spec = names[b""]
    else:
        if not toks:
            return _reject(data, tag, tid_br, rest, cursor, f"[{tag.decode()}] without an event name")
        found = names.get(toks[0])
        if found is None:
            return _reject(data, tag, tid_br, rest, cursor, f"unknown event [{tag.decode()}] {toks[0].decode()}")
        spec = found
        toks = toks[1:]
    key, has_tid, types, required = spec
    tid = tid_br[1:-1].decode() if tid_br else None
    if has_tid and not tid:
        return _reject(data, tag, tid_br, rest, cursor, f"{key} without [TID]")
    values: list[Any] = [_MISSING] * len(required)
    extra: dict[str, str] | None = None
    for tok in toks:
        k, sep, v = tok.partition(b"=")
        if not sep or not k:
            continue
        ent = types.get(k)
        if ent is None:
            if extra is None:
                extra = {}
            ks = k.decode()
            if ks not in extra:
                extra[ks] = v.decode()
            continue
        i, name, conv, kind = ent
        if values[i] is not _MISSING:
            continue
        try:
            values[i] = conv(v)
        except ValueError:
            return _reject(data, tag, tid_br, rest, cursor, f"{key}: {name}={v.decode()!r} is not {'an' if kind == 'int' else 'a'} {kind}")
    missing = [required[i] for i, v in enumerate(values) if v is _MISSING]
    if missing:
        return _reject(data, tag, tid_br, rest, cursor, f"{key}: missing {', '.join(missing)}")
    return (key, tid if has_tid else None, tuple(values), extra)


_MISSING = object()
_SPACE_BYTES = frozenset(b" \t\r\x0b\x0c")


def _reject(data: bytes, tag: bytes, tid_br: bytes, rest: bytes, cursor: list[int], reason: str) -> Rejected:
    """Rejected with the whole line: the first line from the cursor whose first tag starts this match."""
    needle = b"[" + tag + b"]" + tid_br + rest
    pos = data.find(needle, cursor[0])
    while pos >= 0:
        line_start = data.rfind(b"\n", 0, pos) + 1
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        if end == pos + len(needle) and _BTAG.search(data, line_start, pos) is None:
            cursor[0] = end
            return Rejected(reason, data[line_start:end].decode())
        pos = data.find(needle, pos + 1)
    return Rejected(reason, needle.decode())  # not reached for a match of _BLINE


_KNOWN_FAST: list[frozenset[bytes]] = [frozenset(f.encode() for f, _ in EVENTS_BY_KEY[k].fields) for k in FAST_EVENTS]


def _one(m: tuple[bytes, ...], data: bytes, cursor: list[int]) -> RawEvent | Rejected:
    """One ``_BLINE`` match: the fast alternatives' fields, or the general token loop."""
    tag, tid_br, rest = m[10], m[11], m[12]
    if tag:
        return _general(data, tag, tid_br, rest, cursor)
    i = 0 if m[1] else 1 if m[4] else 2
    key, has_tid, _n = _FAST_GROUPS[i]
    tid = m[0] if i < 2 else b""
    raw = m[1:4] if i == 0 else m[4:7] if i == 1 else m[7:10]
    if not rest or rest[0] in _SPACE_BYTES:  # a value glued to more text is the token loop's call
        conv = _FAST_CONVERTERS[i]
        try:
            values = (conv[0](raw[0]), conv[1](raw[1]), conv[2](raw[2]))
            extra = _extras(rest, _KNOWN_FAST[i], None) if rest and not rest.isspace() else None
            return (key, tid.decode() if tid else None, values, extra)
        except ValueError:
            pass
    spec = EVENTS_BY_KEY[key]
    full = b" " + spec.name.encode() + b"".join(b" " + k.encode() + b"=" + v for (k, _), v in zip(spec.fields, raw, strict=False)) + rest
    return _general(data, spec.tag.encode(), b"[" + tid + b"]" if tid else b"", full, cursor)


def _scan_ascii(data: bytes) -> Iterator[RawEvent | Rejected]:
    """The fast path: ``data`` is ASCII without the separators only str.split() knows."""
    cursor = [0]  # where to look for the next rejected line
    for m in _BLINE.findall(data):
        yield _one(m, data, cursor)


@dataclass(slots=True)
class Columns:
    """A block parsed column-wise: each FAST_EVENTS key as parallel lists, everything else as items.

    ``seq`` numbers count every event and rejected line of the block in line order, so
    ``sorted(columns.items())`` is exactly what ``scan_bytes`` yields for the same block.
    """

    count: int = 0
    # key -> (seqs, tids or None, one list per field in the spec's order, extra fields per event or None)
    fast: dict[str, tuple[list[int], list[str] | None, list[list[Any]], list[dict[str, str] | None] | None]] = field(default_factory=dict)
    other: list[tuple[int, RawEvent | Rejected]] = field(default_factory=list)

    def items(self) -> Iterator[tuple[int, RawEvent | Rejected]]:
        """(seq, item) for every item, fast ones rebuilt as RawEvents; unordered."""
        for key, (seqs, tids, cols, extras) in self.fast.items():
            ts = tids if tids is not None else [None] * len(seqs)
            xs = extras if extras is not None else [None] * len(seqs)
            for seq, tid, x, *values in zip(seqs, ts, xs, *cols, strict=True):
                yield seq, (key, tid, tuple(values), x)
        yield from self.other


def _column(raw: Sequence[bytes], kind: str) -> list[Any] | None:
    """Convert a column at C speed; None when some value needs the per-line path (it is then invalid)."""
    try:
        if kind == "str":
            uniq = dict.fromkeys(raw)
            if len(uniq) * 4 <= len(raw):  # few distinct values (op, url): decode each once, share the str
                table = {k: k.decode() for k in uniq}
                return list(map(table.__getitem__, raw))
            return list(map(bytes.decode, raw))
        if kind == "int":
            return list(map(int, raw))
        vals = list(map(float, raw))
        if math.isfinite(sum(vals)):
            return vals
    except ValueError:
        pass
    if kind == "float":  # "na" (honestly unknown) is valid; anything else goes back to the token loop
        try:
            return [_bytes_float(v) for v in raw]
        except ValueError:
            return None
    return None


def scan_columns(data: bytes) -> Columns:
    """Parse a block of ``\\n``-separated lines into Columns; agrees with ``parse_line`` on each line.

    The common lines (FAST_EVENTS in canonical order, no extra fields) never reach Python one by one:
    one regex pass, a transpose, and C-level conversions. Analyzing a 1 GB log depends on it.
    """
    out = Columns()
    if b"\x1b" in data:
        data = _BANSI.sub(b"", data)
    if not data.isascii() or any(c in data for c in _STR_ONLY_SPACE):
        for seq, item in enumerate(scan_bytes(data)):
            out.other.append((seq, item))
        out.count = len(out.other)
        return out
    rows = _BLINE.findall(data)
    n = out.count = len(rows)
    if not n:
        return out
    cols = list(zip(*rows, strict=True))
    special = set(compress(range(n), cols[10]))  # tags the fast alternatives did not take
    extra_rows: dict[int, bytes] = {}  # fast rows with text after the fields (extra key=value pairs)
    for i in compress(range(n), cols[12]):
        rest = rows[i][12]
        if rest[0] not in _SPACE_BYTES:
            special.add(i)  # a value glued to more text: the token loop's call
        elif not rest.isspace():
            extra_rows[i] = rest
    firsts = ((0, 1, 0), (1, 4, 0), (2, 7, None))  # (fast group, first field column, tid column)
    for g, fcol, tcol in firsts:
        key = FAST_EVENTS[g]
        spec = EVENTS_BY_KEY[key]
        mask: Sequence[Any] = cols[fcol]
        if special:
            mask = list(map(bool, mask))
            for i in special:
                mask[i] = False
        seqs = list(compress(range(n), mask))
        if not seqs:
            continue
        converted = [_column(list(compress(cols[fcol + j], mask)), kind) for j, (_, kind) in enumerate(spec.fields)]
        if any(c is None for c in converted):
            special.update(seqs)  # some value is bad: let the token loop find which and why
            continue
        tids = list(map(bytes.decode, compress(cols[tcol], mask))) if tcol is not None else None
        extras = None
        if extra_rows:
            known = _KNOWN_FAST[g]
            extras = [_extras(extra_rows[i], known, None) if i in extra_rows else None for i in seqs]
        out.fast[key] = (seqs, tids, converted, extras)  # type: ignore[assignment]
    if special:
        cursor = [0]
        for i in sorted(special):
            out.other.append((i, _one(rows[i], data, cursor)))
    return out


def scan_bytes(data: bytes) -> Iterator[RawEvent | Rejected]:
    """Parse a block of ``\\n``-separated lines; agrees with ``parse_line`` on each line.

    Yields RawEvent tuples (an Event's parts, cheaper in bulk) and Rejected, in line order.
    Non-UTF-8 bytes decode with replacement, as a text reader with ``errors="replace"`` would.
    """
    if b"\x1b" in data:
        data = _BANSI.sub(b"", data)
    if data.isascii() and not any(c in data for c in _STR_ONLY_SPACE):
        yield from _scan_ascii(data)
        return
    for line in data.decode("utf-8", "replace").split("\n"):
        result = parse_line(line)
        if result is None:
            continue
        if isinstance(result, Rejected):
            yield result
            continue
        names = [k for k, _ in EVENTS_BY_KEY[result.key].fields]
        extra = {k: v for k, v in result.fields.items() if k not in names} or None
        yield (result.key, result.tid, tuple(result.fields[k] for k in names), extra)


def raw_to_event(raw: RawEvent) -> Event:
    """The Event a RawEvent stands for (fields in canonical order, then extras as found)."""
    key, tid, values, extra = raw
    fields = dict(zip((k for k, _ in EVENTS_BY_KEY[key].fields), values, strict=False))
    if extra:
        for k, v in extra.items():
            fields.setdefault(k, v)
    return Event(key, tid, fields)


def parse_bytes(data: bytes) -> Iterator[Event | Rejected]:
    """``scan_bytes`` yielding Events: the bulk equivalent of ``parse_lines(data.split(b"\\n"))``."""
    for item in scan_bytes(data):
        yield item if isinstance(item, Rejected) else raw_to_event(item)


# --------------------------------------------------------------------------- columnar parsing with numpy
#
# ``scan_arrays`` is ``scan_columns`` for the analyzer's hot path: the same single regex pass, but the
# FAST_EVENTS lines written exactly as ``format_event`` writes them without extra fields become numpy
# columns (float64 with NaN for ``na``, int64, and bytes arrays for trace ids and strings) with no
# Python object per value. Lines with extra fields, odd values or anything else go through ``_one``
# (the token loop), so the result still agrees with ``parse_line`` line by line.


@dataclass(slots=True)
class ArrayColumns:
    """A block parsed column-wise into numpy arrays; ``other`` as in Columns.

    ``fast[key] = (seqs int64 array, tids as a list of bytes or None, one column per field in the spec's
    order)``: float fields are float64 arrays (NaN for ``na``), int fields int64 arrays, str fields lists of bytes.
    """

    count: int = 0
    fast: dict[str, tuple[Any, Any, list[Any]]] = field(default_factory=dict)
    other: list[tuple[int, RawEvent | Rejected]] = field(default_factory=list)

    def items(self) -> Iterator[tuple[int, RawEvent | Rejected]]:
        """(seq, item) for every item, array rows rebuilt as RawEvents (Python values); unordered."""
        for key, (seqs, tids, cols) in self.fast.items():
            kinds = [kind for _, kind in EVENTS_BY_KEY[key].fields]
            lists = [_array_values(c, kind) for c, kind in zip(cols, kinds, strict=True)]
            ts = [t.decode() for t in tids] if tids is not None else [None] * len(seqs)
            for seq, tid, *values in zip(seqs.tolist(), ts, *lists, strict=True):
                yield seq, (key, tid, tuple(values), None)
        yield from self.other


def _array_values(a: Any, kind: str) -> list[Any]:
    """An ArrayColumns column as the Python values parse_line gives (str, int, float or None)."""
    if kind == "str":
        return [v.decode() for v in a]
    values = a.tolist()
    if kind == "float":
        return [None if v != v else v for v in values]
    return values


def _plain_decimals(np: Any, raw: Any) -> tuple[Any, Any]:
    """float() of values written as DIGITS.DIGITS (what format_event writes), vectorized; (values, which rows).

    The digits without the dot form an integer below 2**53 and 10**k is exact, so one IEEE division gives
    the correctly rounded value, exactly what float() gives for the decimal string.
    """
    m, w = len(raw), raw.itemsize
    mat = raw.view(np.uint8).reshape(m, w)
    digit = (mat >= 48) & (mat <= 57)
    dot = mat == 46
    pad = mat == 0
    ok = (digit | dot | pad).all(axis=1) & (dot.sum(axis=1) == 1) & digit[:, 0]
    dot_at = dot.argmax(axis=1)
    length = w - pad.sum(axis=1)  # values hold no NUL bytes: padding is only at the end
    frac = length - dot_at - 1
    ok &= (frac >= 1) & (frac <= 22) & (length <= 17)  # at most 16 digits (no int64 overflow), checked below 2**53
    acc = np.zeros(m, dtype=np.int64)
    for j in range(min(w, 17)):
        acc = np.where(digit[:, j], acc * 10 + (mat[:, j].astype(np.int64) - 48), acc)
    ok &= acc < 2**53
    values = acc / (10.0 ** np.where(ok, frac, 0))
    return values, ok


def _convert_array(np: Any, raw: Any, kind: str) -> tuple[Any, Any]:
    """(values, bad mask) of one bytes column; bad rows are left to the token loop."""
    n = len(raw)
    bad = np.zeros(n, dtype=bool)
    if kind == "str":
        return raw, bad
    dtype = np.float64 if kind == "float" else np.int64
    if kind == "float" and n:
        values, done = _plain_decimals(np, raw)
        if done.all():
            return values, bad
        if done.any():
            rest, rest_bad = _convert_array(np, raw[~done], kind)
            values[~done] = rest
            bad[~done] = rest_bad
            return values, bad
    try:
        values = raw.astype(dtype)  # numpy parses with Python's own float()/int() rules
    except (ValueError, OverflowError):
        conv = _bytes_float if kind == "float" else int
        out = []
        for i, v in enumerate(raw.tolist()):
            try:
                x = conv(v)
                if x is None:
                    x = math.nan
                elif kind == "int" and not -(2**63) <= x < 2**63:
                    raise ValueError("out of range")
            except ValueError:
                bad[i] = True
                x = 0
            out.append(x)
        return np.array(out, dtype=dtype), bad
    if kind == "float":
        bad |= ~np.isfinite(values)  # inf and nan are rejected by the token loop (na gave a ValueError above)
    return values, bad


_BV = rb"[^\s=\[\]]+"  # a value the array path takes (anything else is the token loop's call)
_BEOL = rb"(?=[ \t\r\x0b\x0c]*(?:\n|\Z))"  # nothing but spaces after the fields
# Groups: the fields of a canonical client.done / client.send (from the trace id on) / gen batch.done (from the
# first value on), each only when nothing but whitespace follows; or (4) any other tagged line from its tag on.
_BARR = re.compile(
    rb"\[(?:weights\]\[([^\]\s]+\] client\.done wall_ms=" + _BV + rb" rpc_ms=" + _BV + rb" queue_ms=" + _BV + rb")" + _BEOL
    + rb"|weights\]\[([^\]\s]+\] client\.send url=" + _BV + rb" op=" + _BV + rb" t=" + _BV + rb")" + _BEOL
    + rb"|gen\] batch\.done completions=(" + _BV + rb" dur_ms=" + _BV + rb" inflight=" + _BV + rb")" + _BEOL
    + rb"|((?:weights|ckpt|gen|rollout)\][^\n]*))"
)
# Neither trace ids nor values above hold "]" or "=": as spaces they cut each group into fixed columns.
_BSPLIT = bytes.maketrans(b"]=", b"  ")
assert FAST_EVENTS == ("weights.client.done", "weights.client.send", "gen.batch.done")


def scan_arrays(data: bytes) -> ArrayColumns | None:
    """Parse a block into ArrayColumns; agrees with ``parse_line`` on each line (see ``items``).

    One regex pass finds the first tag of every line; a canonical high-volume line comes back as one
    bytes string of its values, and all of them are split into columns by a join, a few replaces and
    one split (C speed), then converted by numpy. None when the block needs the careful path
    (non-ASCII, ANSI colours, NUL bytes): use ``scan_columns``.
    """
    import numpy as np

    if b"\x1b" in data or b"\x00" in data or not data.isascii() or any(c in data for c in _STR_ONLY_SPACE):
        return None
    out = ArrayColumns()
    rows = _BARR.findall(data)
    n = out.count = len(rows)
    if not n:
        return out
    cols = list(zip(*rows, strict=True))
    special = list(compress(range(n), cols[3]))  # other tags, extra fields, odd values: the token loop
    for g in range(3):
        key = FAST_EVENTS[g]
        present = cols[g]
        seqs = np.fromiter(compress(range(n), present), dtype=np.int64)
        m = len(seqs)
        if not m:
            continue
        # "TID] client.done wall_ms=V rpc_ms=V queue_ms=V" -> 9 tokens once "]" and "=" are spaces; "V dur_ms=V inflight=V" -> 5
        tokens = b" ".join(compress(present, present)).translate(_BSPLIT).split(b" ")
        width = 9 if g < 2 else 5
        assert len(tokens) == m * width
        tids = tokens[0::width] if g < 2 else None
        values, bad = [], np.zeros(m, dtype=bool)
        for j, (_name, kind) in zip((4, 6, 8) if g < 2 else (0, 2, 4), EVENTS_BY_KEY[key].fields, strict=True):
            if kind == "str":  # kept as bytes: few distinct values (urls, ops), hashed rather than sorted later
                values.append(tokens[j::width])
                continue
            v, b = _convert_array(np, np.array(tokens[j::width], dtype="S"), kind)
            values.append(v)
            bad |= b
        if bad.any():
            special.extend(seqs[bad].tolist())
            keep = np.flatnonzero(~bad).tolist()
            seqs = seqs[keep]
            values = [v[keep] if isinstance(v, np.ndarray) else list(map(v.__getitem__, keep)) for v in values]
            tids = list(map(tids.__getitem__, keep)) if tids is not None else None
        if len(seqs):
            out.fast[key] = (seqs, tids, values)
    if special:
        cursor = [0]
        for i in sorted(special):
            r = rows[i]
            if r[3]:
                text = b"[" + r[3]
            elif r[0] or r[1]:
                text = b"[weights][" + (r[0] or r[1])
            else:
                text = b"[gen] batch.done completions=" + r[2]
            m_ = _BLINE.match(text)
            assert m_ is not None
            out.other.append((i, _one(m_.groups(b""), data, cursor)))
    return out
