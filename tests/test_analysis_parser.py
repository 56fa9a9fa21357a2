"""The bulk parsers (events.scan_bytes, events.scan_columns) agree with parse_line on every line."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY
from weightwatch.events import (
    FAST_EVENTS,
    Event,
    Rejected,
    format_event,
    parse_bytes,
    parse_line,
    raw_to_event,
    scan_arrays,
    scan_bytes,
    scan_columns,
)

_token = st.text(alphabet=string.ascii_letters + string.digits + "/:._-", min_size=1, max_size=20)
_float = st.one_of(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False), st.none())
_int = st.integers(min_value=-(2**31), max_value=2**31)
_prefix = st.sampled_from([
    "", "2026-11-26 12:00:00.123 | INFO     | prime_rl.orchestrator:update:42 - ", "INFO weightwatch.inference ",
    "[2026-11-26 12:00:00] \x1b[32mINFO\x1b[0m trainer: ", "orchestrator-1  | ", "\x1b[1m", "x=1 ",
])


@st.composite
def event_line(draw) -> str:
    spec = draw(st.sampled_from(EVENTS))
    fields = {}
    for k, kind in spec.fields:
        fields[k] = draw({"str": _token, "int": _int, "float": _float}[kind])
    if draw(st.booleans()):
        fields[draw(st.sampled_from(["server", "step", "x_extra", "url"]))] = draw(_token)
    line = format_event(spec.key, draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=32)) if spec.has_tid else None, **fields)
    return draw(_prefix) + line


def _mutate(line: str, how: int, other: str) -> str:
    """What real logs do to lines: cut them, glue two together, damage values, add noise."""
    if how == 0:
        return line
    if how == 1:
        return line[: len(line) * 2 // 3]  # truncated
    if how == 2:
        return line[: len(line) // 2] + other  # interleaved writes
    if how == 3:
        return line.replace("=", "=x", 1)  # a bad value
    if how == 4:
        return line.replace(" ", "  ")  # odd spacing
    if how == 5:
        return line + " trailing free text k=v=w"
    if how == 6:
        return line.replace("ms=", "ms=inf", 1)
    if how == 7:
        return line + "\r"  # CRLF logs
    if how == 8:
        return line.replace("[weights]", "[weights][]", 1)
    return line.replace(" ", " \u00e9 ", 1)  # non-ASCII: the careful path


lines_strategy = st.lists(
    st.tuples(event_line(), st.integers(0, 9), event_line()).map(lambda t: _mutate(t[0], t[1], t[2]))
    | st.text(alphabet=string.printable, max_size=80)
    | st.sampled_from(["", "step 3 loss=0.1", "[gen]", "[ckpt] write.done", "[weights][t] client.done wall_ms=1 rpc_ms=2 queue_ms=3=4"]),
    max_size=40,
)


def _expected(block: str) -> list[Event | Rejected]:
    return [r for line in block.split("\n") if (r := parse_line(line)) is not None]


@settings(max_examples=300, deadline=None)
@given(lines=lines_strategy)
def test_scan_bytes_agrees_with_parse_line(lines: list[str]) -> None:
    block = "\n".join(lines)
    assert list(parse_bytes(block.encode())) == _expected(block)


@settings(max_examples=300, deadline=None)
@given(lines=lines_strategy)
def test_scan_columns_agrees_with_parse_line(lines: list[str]) -> None:
    block = "\n".join(lines)
    cols = scan_columns(block.encode())
    got = [item if isinstance(item, Rejected) else raw_to_event(item) for _seq, item in sorted(cols.items(), key=lambda x: x[0])]
    assert got == _expected(block)
    assert cols.count == len(got)
    assert sorted(seq for seq, _ in cols.items()) == list(range(cols.count))


def test_fast_lines_take_the_column_path() -> None:
    """Canonical lines of the high-volume events never go through the per-line loop."""
    lines = [format_event(k, "ab12" if EVENTS_BY_KEY[k].has_tid else None, **{f: 1 if kind == "int" else (1.5 if kind == "float" else "x")
                                                                               for f, kind in EVENTS_BY_KEY[k].fields}) for k in FAST_EVENTS]
    cols = scan_columns(("PREFIX - " + "\nPREFIX - ".join(lines * 50)).encode())
    assert cols.other == []
    assert {k: len(v[0]) for k, v in cols.fast.items()} == dict.fromkeys(FAST_EVENTS, 50)


def test_rejected_lines_keep_the_whole_line_and_reason() -> None:
    block = b"a\nPFX [weights][t] client.done wall_ms=1 rpc_ms=2 queue_ms=3=4\nPFX [weights][t] client.done wall_ms=1 rpc_ms=2 queue_ms=3"
    got = list(scan_bytes(block))
    assert isinstance(got[0], Rejected)
    assert got[0].line == "PFX [weights][t] client.done wall_ms=1 rpc_ms=2 queue_ms=3=4"
    assert "queue_ms='3=4' is not a float" in got[0].reason
    assert got[1] == ("weights.client.done", "t", (1.0, 2.0, 3.0), None)


def test_unknown_values_survive_the_column_path() -> None:
    cols = scan_columns(b"[weights][t] client.done wall_ms=10 rpc_ms=na queue_ms=na\n")
    assert cols.fast["weights.client.done"][2] == [[10.0], [None], [None]]
    extra = scan_columns(b"[weights][t] client.done wall_ms=1 rpc_ms=2 queue_ms=3 url=http://h:1/u server_ms=2.5\n")
    assert extra.other == [] and extra.fast["weights.client.done"][3] == [{"url": "http://h:1/u", "server_ms": "2.5"}]


@settings(max_examples=300, deadline=None)
@given(lines=lines_strategy)
def test_scan_arrays_agrees_with_parse_line(lines: list[str]) -> None:
    block = "\n".join(lines)
    cols = scan_arrays(block.encode())
    if cols is None:  # the careful path's blocks (non-ASCII, ANSI, NUL): scan_columns handles them
        assert any(c in block for c in "\x1b\x00\x1c\x1d\x1e\x1f") or not block.isascii()
        return
    got = [item if isinstance(item, Rejected) else raw_to_event(item) for _seq, item in sorted(cols.items(), key=lambda x: x[0])]
    assert got == _expected(block)
    assert cols.count == len(got)
    assert sorted(seq for seq, _ in cols.items()) == list(range(cols.count))


def test_scan_arrays_takes_canonical_lines_as_arrays() -> None:
    lines = [format_event(k, "ab12" if EVENTS_BY_KEY[k].has_tid else None, **{f: 1 if kind == "int" else (1.5 if kind == "float" else "x")
                                                                               for f, kind in EVENTS_BY_KEY[k].fields}) for k in FAST_EVENTS]
    lines.append("[weights][cd34] client.done wall_ms=10 rpc_ms=na queue_ms=na")
    lines.append("[weights][ef56] client.done wall_ms=1 rpc_ms=2 queue_ms=3 server_ms=2.5")  # extras: the token loop
    lines.append("[gen] batch.done completions=99999999999999999999999 dur_ms=1 inflight=2")  # beyond int64: the token loop
    cols = scan_arrays(("PREFIX - " + "\nPREFIX - ".join(lines)).encode())
    assert cols is not None
    assert {k: len(v[0]) for k, v in cols.fast.items()} == {"weights.client.done": 2, "weights.client.send": 1, "gen.batch.done": 1}
    assert [seq for seq, _ in cols.other] == [4, 5]
    assert cols.other[0][1][3] == {"server_ms": "2.5"} and cols.other[1][1][2][0] == 99999999999999999999999
    done = cols.fast["weights.client.done"]
    assert done[1] == [b"ab12", b"cd34"] and done[2][1][1] != done[2][1][1]  # na is NaN
    assert scan_arrays("x \u00e9 [gen] batch.done completions=1 dur_ms=1 inflight=1".encode()) is None
