"""The analyzer's one bulk reader: a block of log bytes -> one polars frame of typed events.

The grammar is ``weightwatch.events``: its pattern text (tags, head, fields, numbers, whitespace, ANSI) is
compiled here by polars' regex engine and applied column-wise, so every line is parsed as ``parse_line``
parses it (the property tests hold the two together) without a Python call per line. Why polars: see
docs/analyze.md ("The engine"), measured against pyarrow compute, DuckDB and ``re`` over ``mmap``.

Output columns: ``seq`` (line number in the block), ``key``, ``tid``, then one typed column per field in
``COLUMNS``: each event's required fields and the extra fields the analyzer reads (``EXTRAS``); a column
an event does not have is null. Lines with a tag that break the grammar come back as ``Rejected``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from weightwatch import events
from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY

#: Extra ``key=value`` fields the analyzer reads, per event, with their kind (what the emitters write).
EXTRAS: dict[str, dict[str, str]] = {
    "weights.client.send": {"step": "int", "budget_s": "float"},
    "weights.client.done": {"server_ms": "float", "pool_wait_ms": "float", "status": "int", "ok": "int", "attempts": "int",
                            "op": "str", "url": "str", "server": "str", "step": "int"},
    "weights.sync.start": {},
    "weights.sync.done": {},
    "rollout": {"async_level": "int"},
}
_DTYPE = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}


def _columns() -> dict[str, str]:
    out: dict[str, str] = {}
    for e in EVENTS:
        for name, kind in (*e.fields, *EXTRAS.get(e.key, {}).items()):
            if out.setdefault(name, kind) != kind:
                raise TypeError(f"field {name} is {out[name]} in one event and {kind} in another")
    return out


#: Every field column of the frame and its kind.
COLUMNS: dict[str, str] = _columns()
SCHEMA: dict[str, Any] = {"seq": pl.Int64, "key": pl.String, "tid": pl.String, **{k: _DTYPE[v] for k, v in COLUMNS.items()}}

_TAG_ANY = re.sub(r"\((?!\?)", "(?:", events.TAG_PATTERN)  # the tag and its [TID], no capture group
_GLUED = r"\[rollout\](?:\[[^\]" + events.WHITESPACE + "]*\\])?[^" + events.WHITESPACE + "]"
_CUT = "^.*?(" + _TAG_ANY + ")"
_VALID = {"float": "^(?:" + events.FLOAT_PATTERN + "|" + events.UNKNOWN + ")$", "int": "^" + events.INT_PATTERN + "$"}


@dataclass
class Block:
    """One block's events (per event key, a frame of ``seq``, ``key``, ``tid`` and that event's columns), its
    rejected lines and its line count."""

    frames: dict[str, pl.DataFrame]
    rejected: list[tuple[int, events.Rejected]] = field(default_factory=list)  # (seq, why)
    lines: int = 0

    @property
    def frame(self) -> pl.DataFrame:
        """Every event of the block in one frame (SCHEMA), in line order."""
        return conformed(list(self.frames.values()))


def conform(f: pl.DataFrame) -> pl.DataFrame:
    """A frame with every SCHEMA column (null where its event has no such field)."""
    return f.select([pl.col(c).cast(t) if c in f.columns else pl.lit(None, dtype=t).alias(c) for c, t in SCHEMA.items()])


def conformed(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat([conform(f) for f in frames], how="vertical").sort("seq") if frames else empty_frame()


def empty_frame() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def _lines(data: bytes) -> pl.Series:
    """The block's lines as a polars string column without copying the bytes (newline kept at each end)."""
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    ends = nl + 1
    if not len(data) or data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    offsets = np.zeros(len(ends) + 1, dtype=np.int64 if len(data) >= 2**31 else np.int32)
    offsets[1:] = ends
    kind = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    arr = pa.Array.from_buffers(kind, len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:  # not UTF-8: decode with replacement, as a text reader with errors="replace" would
        return _lines(data.decode("utf-8", "replace").encode())
    return pl.Series("line", arr)


def _rewrite(df: pl.DataFrame, where: pl.Series, expr: pl.Expr, keep: bool = False) -> pl.DataFrame:
    """Apply ``expr`` to the line of the rows ``where`` says (few, or none: the costly patterns run on those only).

    ``keep``: remember the line as it was (column ``orig``), so a rejected line is reported as written.
    """
    if not where.any():
        return df
    changed = df.filter(where)
    if keep:
        changed = changed.with_columns(pl.col("line").alias("orig"))
    return pl.concat([df.filter(~where), changed.with_columns(expr.alias("line"))], how="diagonal").sort("seq")


def scan(data: bytes) -> Block:
    """Parse a block of ``\\n``-separated lines (any prefixes, ANSI colours, extra fields, roles interleaved)."""
    n_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    if b"[" not in data:
        return Block({}, [], n_lines)
    df = pl.DataFrame({"line": _lines(data)}).with_row_index("seq").with_columns(pl.col("seq").cast(pl.Int64))
    line = pl.col("line")
    if b"\x1b" in data:
        df = _rewrite(df, df["line"].str.contains("\x1b", literal=True), line.str.replace_all(events.ANSI_PATTERN, ""))
    df = df.with_columns(line.str.extract(events.TAG_NAME_PATTERN, 1).alias("tag")).filter(pl.col("tag").is_not_null())
    # "=" before the first tag, or a [rollout] glued to its first field: rewrite the line to start at its tag
    eq, at = df["line"].str.find("=", literal=True), df["line"].str.find(events.TAG_NAME_PATTERN)
    cut = (eq < at).fill_null(False)
    if b"[rollout]" in data:
        cut = cut | ((df["tag"] == "rollout") & df["line"].str.contains(_GLUED))
    df = _rewrite(df, cut, line.str.replace(_CUT, "$1 "), keep=True)
    if "orig" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("orig"))
    parts = []
    for (tag,), part in df.partition_by("tag", as_dict=True).items():
        head = line.str.extract_groups(events.head_pattern(str(tag)))
        parts.append(part.with_columns(head.struct.field("tid"), head.struct.field("name")))
    if not parts:
        return Block({}, [], n_lines)
    df = pl.concat(parts)
    is_field = pl.col("name").str.contains("=", literal=True) | (pl.col("name") == "")
    key = (pl.when((pl.col("tag") == "rollout") & is_field).then(pl.lit("rollout"))
           .otherwise(pl.concat_str([pl.col("tag"), pl.lit("."), pl.col("name")])))
    df = df.with_columns(key.alias("key"))
    rejected: list[tuple[int, events.Rejected]] = []
    valid = pl.col("key").is_in(list(EVENTS_BY_KEY))
    for seq, tag, name, text, orig in df.filter(~valid).select("seq", "tag", "name", "line", "orig").iter_rows():
        reason = f"[{tag}] without an event name" if name == "" else f"unknown event [{tag}] {name}"
        rejected.append((seq, events.Rejected(reason, _text(orig or text))))
    frames: dict[str, pl.DataFrame] = {}
    for (key_,), part in df.filter(valid).partition_by("key", as_dict=True).items():
        frame, bad = _fields(str(key_), part)
        if frame.height:
            frames[str(key_)] = frame
        rejected.extend(bad)
    if not frames:
        return Block({}, rejected, n_lines)
    return Block(frames, rejected, n_lines)


def _text(line: str) -> str:
    return line[:-1] if line.endswith("\n") else line


def _typed(raw: pl.Series, kind: str) -> pl.Series:
    """A raw text column as the grammar's values: None where the text is not of that kind (or is ``na``)."""
    if kind == "str":
        return raw
    ok = (raw.str.contains(_VALID[kind]) & (raw != events.UNKNOWN)).fill_null(False)
    value = pl.col("raw").cast(_DTYPE[kind], strict=False)
    if kind == "float":  # a valid spelling that overflows to infinity is not a finite number
        value = pl.when(value.is_finite()).then(value)
    frame = pl.DataFrame({"raw": raw, "ok": ok})
    return frame.select(pl.when(pl.col("ok")).then(value).alias(raw.name)).to_series()


def _fields(key: str, part: pl.DataFrame) -> tuple[pl.DataFrame, list[tuple[int, events.Rejected]]]:
    """Extract, check and type the fields of one event's lines; the lines that break the grammar are Rejected."""
    spec = EVENTS_BY_KEY[key]
    required = dict(spec.fields)
    extras = {k: v for k, v in EXTRAS.get(key, {}).items() if k not in required}
    raw = part.with_columns([pl.col("line").str.extract(events.field_pattern(k), 1).alias(k) for k in (*required, *extras)])
    for k, (source, how) in events.DERIVED.get(key, {}).items():
        lacking = raw.filter(pl.col(k).is_null() & pl.col(source).is_not_null())[source].unique().to_list()
        if lacking:
            table = {u: how(u) for u in lacking}
            raw = raw.with_columns(pl.coalesce(pl.col(k), pl.col(source).replace_strict(table, default=None)).alias(k))
    typed = {k: _typed(raw[k], kind) for k, kind in (*required.items(), *extras.items())}
    bad = pl.Series([False] * len(raw))
    if spec.has_tid:
        bad = bad | raw["tid"].is_null() | (raw["tid"] == "")
    for k, kind in required.items():
        bad = bad | raw[k].is_null()
        if kind != "str":
            invalid = raw[k].is_not_null() & typed[k].is_null()
            if kind == "float":
                invalid = invalid & (raw[k] != events.UNKNOWN)
            bad = bad | invalid
    bad = bad.fill_null(True)
    rejected = [_reason(key, row) for row in raw.filter(bad).iter_rows(named=True)] if bad.any() else []
    good = pl.DataFrame([raw["seq"], raw["tid"] if spec.has_tid else pl.Series("tid", [None] * len(raw), dtype=pl.String),
                         *(typed[k].alias(k) for k in (*required, *extras))]).with_columns(pl.lit(key).alias("key"))
    return good.filter(~bad), rejected


def _reason(key: str, row: dict[str, Any]) -> tuple[int, events.Rejected]:
    """The grammar's wording of why one line was rejected (the first bad field in line order, else what is missing)."""
    spec = EVENTS_BY_KEY[key]
    line = _text(row["orig"] or row["line"])
    if spec.has_tid and not row["tid"]:
        return row["seq"], events.Rejected(f"{key} without [TID]", line)
    bad: list[tuple[int, str]] = []
    for k, kind in spec.fields:
        v = row[k]
        if v is None or kind == "str":
            continue
        try:
            events.convert(kind, v)
        except ValueError:
            m = re.search(events.field_pattern(k), row["line"])
            bad.append((m.start() if m else 0, f"{key}: {k}={v!r} is not {events.kind_article(kind)} {kind}"))
    if bad:
        return row["seq"], events.Rejected(min(bad)[1], line)
    missing = [k for k, _ in spec.fields if row[k] is None]
    return row["seq"], events.Rejected(f"{key}: missing {', '.join(missing)}", line)
