"""The log grammar: round trips, rejections with reasons, and property tests."""

from __future__ import annotations

import logging
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightwatch import events
from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY
from weightwatch.events import Event, Rejected, format_event, normalize, parse_line

_token = st.text(alphabet=string.ascii_letters + string.digits + "/:._-?&=%", min_size=1, max_size=30).filter(lambda s: not s.startswith("="))
_tid = st.text(alphabet=string.hexdigits.lower(), min_size=1, max_size=32)
_float = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
_int = st.integers(min_value=-(2**40), max_value=2**40)


def _value(kind: str):
    return {"str": _token, "int": _int, "float": _float}[kind]


@st.composite
def event_fields(draw, key: str):
    spec = EVENTS_BY_KEY[key]
    return {k: draw(_value(kind)) for k, kind in spec.fields}


# Junk a logger may put before the tag: timestamps, levels, module paths, ANSI colours; no '[' so it
# cannot forge a tag of its own.
_prefix = st.text(alphabet=string.ascii_letters + string.digits + " |:.-_\x1b;", max_size=60).map(
    lambda s: s.replace("\x1b", "\x1b[32m")
)


@pytest.mark.parametrize("key", [e.key for e in EVENTS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_event_round_trips(key: str, data) -> None:
    fields = data.draw(event_fields(key))
    tid = data.draw(_tid) if EVENTS_BY_KEY[key].has_tid else None
    line = format_event(key, tid, **fields)
    prefix = data.draw(_prefix)
    parsed = parse_line(prefix + line)
    assert isinstance(parsed, Event), parsed
    assert parsed.key == key
    assert parsed.tid == tid
    assert parsed.fields == {k: normalize(k, v) for k, v in fields.items()}
    # a second round trip is exact
    assert format_event(key, tid, **parsed.fields) == line


@settings(max_examples=100, deadline=None)
@given(extra_key=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), extra_val=_token, data=st.data())
def test_extra_and_reordered_keys_are_accepted(extra_key: str, extra_val: str, data) -> None:
    key = "weights.client.done"
    spec = EVENTS_BY_KEY[key]
    if extra_key in dict(spec.fields):
        extra_key = "x_" + extra_key
    fields = data.draw(event_fields(key))
    order = data.draw(st.permutations([k for k, _ in spec.fields]))
    body = " ".join(f"{k}={events._fmt_value(k, fields[k])}" for k in order)
    line = f"2026-11-26 12:00:00.123 | INFO | prime_rl.orchestrator:42 - [weights][abc123] client.done {extra_key}={extra_val} {body}"
    parsed = parse_line(line)
    assert isinstance(parsed, Event), parsed
    assert parsed[extra_key] == extra_val
    assert parsed["wall_ms"] == normalize("wall_ms", fields["wall_ms"])


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[weights] client.send url=u op=o t=1", "without [TID]"),
        ("[weights][t1] client.send url=u op=o", "missing t"),
        ("[weights][t1] client.sent url=u op=o t=1", "unknown event"),
        ("[weights][t1] client.done wall_ms=abc rpc_ms=1 queue_ms=1", "wall_ms='abc' is not a float"),
        ("[ckpt] write.done step=1.5 write_ms=3", "step='1.5' is not an int"),
        ("[ckpt] wait.done target_step=3", "missing wait_ms"),
        ("[gen]", "without an event name"),
        ("[gen] batch.done completions=1 dur_ms=inf inflight=2", "not a float"),
        ("[rollout] trunc_pct=1 current_step=2 ckpt_step=1", "missing staleness"),
    ],
)
def test_malformed_lines_are_rejected_with_a_reason(line: str, reason: str) -> None:
    parsed = parse_line("INFO " + line)
    assert isinstance(parsed, Rejected)
    assert reason in parsed.reason
    assert parsed.line.endswith(line)


@settings(max_examples=200, deadline=None)
@given(junk=st.text(max_size=200))
def test_parser_never_raises_on_junk(junk: str) -> None:
    result = parse_line(junk)
    assert result is None or isinstance(result, (Event, Rejected))


def test_lines_without_a_tag_are_not_events() -> None:
    assert parse_line("step 3 loss=0.25") is None
    assert parse_line("[other] x=1") is None
    assert list(events.parse_lines(["nothing", "[ckpt] wait.start target_step=4"])) == [Event("ckpt.wait.start", None, {"target_step": 4})]


def test_unknown_values_parse_as_none() -> None:
    line = format_event("weights.client.done", "abc", wall_ms=12.5, rpc_ms=None, queue_ms=None)
    assert "rpc_ms=na" in line
    parsed = parse_line(line)
    assert isinstance(parsed, Event)
    assert parsed["rpc_ms"] is None and parsed["wall_ms"] == 12.5


def test_format_refuses_what_it_could_not_parse_back() -> None:
    with pytest.raises(ValueError, match="missing"):
        format_event("ckpt.write.done", step=1)
    with pytest.raises(ValueError, match="trace id"):
        format_event("weights.rpc.start", None, op="x", t=1.0)
    with pytest.raises(ValueError, match="whitespace"):
        format_event("weights.server.recv", "t", path="a b", t=1.0)
    with pytest.raises(ValueError, match="unknown event"):
        format_event("weights.nope")


def test_emit_logs_on_the_role_logger_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    line = events.emit("ckpt.write.done", step=3, write_ms=12.25)
    assert line == "[ckpt] write.done step=3 write_ms=12.25"
    assert any(r.name == "weightwatch.trainer" and r.getMessage() == line for r in caplog.records)
    assert events.emit("ckpt.write.done", step=3) is None  # missing field: dropped with a warning
    assert any("dropped event" in r.getMessage() for r in caplog.records)


def test_the_grammar_and_the_analyzer_import_without_the_opentelemetry_sdk() -> None:
    import subprocess
    import sys

    code = ("import sys, weightwatch.events, weightwatch.analysis, weightwatch.analysis.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
