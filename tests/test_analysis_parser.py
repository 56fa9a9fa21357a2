"""The analyzer's bulk reader (analysis.scan) parses every line as the grammar's parse_line does (the oracle)."""

from __future__ import annotations

import gzip
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightwatch import events
from weightwatch.analysis import scan
from weightwatch.catalogue import EVENTS, EVENTS_BY_KEY
from weightwatch.events import Event, Rejected, format_event, parse_line

PREFIXES = st.sampled_from([
    "", "2026-12-03 11:50:24,123 INFO weightwatch.orchestrator ", "2026-11-26 12:06:44.000 | INFO     | prime_rl.orchestrator:88 - ",
    "[2026-11-26 12:00:01] \x1b[32mINFO\x1b[0m trainer: ", "orchestrator-1  | ", "x=1 y=[2] ", "\x1b[1m[weights]\x1b[0m ", "é ünïcode → ",
])
VALUES = st.one_of(
    st.integers(-10**6, 10**12).map(str), st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["na", "", "inf", "nan", "1e500", "1_0", "+.5", "1.", "-0", "٣", "abc", "=x", "1]", "[0]", "007"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=6),
)
NAMES = st.sampled_from(sorted({k for e in EVENTS for k, _ in e.fields} | {k for x in scan.EXTRAS.values() for k in x} | {"zz", "k"}))


@st.composite
def lines(draw: Any) -> str:
    """A tagged line: a real event (sometimes broken), or junk around tags, behind some prefix."""
    prefix = draw(PREFIXES)
    kind = draw(st.integers(0, 9))
    if kind <= 5:
        spec = draw(st.sampled_from(EVENTS))
        fields = {k: draw(VALUES) if draw(st.integers(0, 9)) == 0 else _good(draw, t) for k, t in spec.fields}
        if draw(st.booleans()):  # extra fields, as the emitters write them, or junk
            for _ in range(draw(st.integers(1, 6))):
                fields.setdefault(draw(NAMES), draw(VALUES) if draw(st.booleans()) else _good(draw, "float"))
        if draw(st.integers(0, 6)) == 0 and fields:
            fields.pop(draw(st.sampled_from(sorted(fields))))
        tid = draw(st.sampled_from(["abc123", "0af3" * 8, "t"])) if spec.has_tid or draw(st.integers(0, 5)) == 0 else None
        head = f"[{spec.tag}]" + (f"[{tid}]" if tid else "") + draw(st.sampled_from([" ", "", "  ", "\t", "\u2003", "\x1c"]))
        body = (spec.name + " " if spec.name else "") + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        tail = draw(st.sampled_from(["", " free text", " k=v=w", " \r", " [ckpt] write.done step=1 write_ms=2", " \x1b[0m"]))
        return prefix + head + body + tail
    alphabet = st.sampled_from(list("[]= .\t_-xa1\x1b\u2003\x1c") + ["weights", "ckpt", "gen", "rollout", "client.done", "wall_ms",
                                                                    "sync.start", "step", "t", "op", "url", "[weights][a]", "é"])
    return prefix + "".join(draw(st.lists(alphabet, max_size=25)))


def _good(draw: Any, kind: str) -> Any:
    if kind == "int":
        return draw(st.integers(-5, 10**9))
    if kind == "float":
        return draw(st.floats(min_value=0, max_value=1e7, allow_nan=False))
    return draw(st.sampled_from(["http://10.0.0.1:8000/pause", "update_weights", "resume", "/ckpt/step_3"]))


def _text(v: Any) -> str:
    return v if isinstance(v, str) else events._fmt_value("x_ms", v) if isinstance(v, float) else str(v)


def _oracle(line: str) -> Any:
    """What the bulk reader must give for one line, computed by parse_line."""
    r = parse_line(line)
    if r is None or isinstance(r, Rejected):
        return r
    out = {}
    for k, kind in (*EVENTS_BY_KEY[r.key].fields, *scan.EXTRAS.get(r.key, {}).items()):
        v = r.fields.get(k)
        if isinstance(v, str) and kind != "str":
            try:
                v = events.convert(kind, v)
            except ValueError:
                v = None
        out[k] = v
    return (r.key, r.tid, out)


def _bulk(data: bytes) -> dict[int, Any]:
    block = scan.scan(data)
    got: dict[int, Any] = {seq: why for seq, why in block.rejected}
    for row in block.frame.iter_rows(named=True):
        key = row["key"]
        names = [k for k, _ in EVENTS_BY_KEY[key].fields] + list(scan.EXTRAS.get(key, {}))
        assert row["seq"] not in got
        got[row["seq"]] = (key, row["tid"], {k: row[k] for k in names})
    return got


def _same(a: Any, b: Any) -> bool:
    return a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), min_size=1, max_size=40))
def test_bulk_reader_agrees_with_parse_line(batch: list[str]) -> None:
    got = _bulk("\n".join(batch).encode())
    for i, line in enumerate(batch):
        want = _oracle(line)
        assert got.get(i) == want, f"line {i}: {line!r}\n bulk:   {got.get(i)!r}\n oracle: {want!r}"
    assert set(got) <= set(range(len(batch)))


def test_real_shape_lines_are_events_with_their_extras() -> None:
    pre = "2026-12-03 11:50:24,123 INFO weightwatch.orchestrator "
    send = format_event("weights.client.send", "ab" * 16, url="http://10.0.0.1:8000/pause", op="pause", t=1.5, attempt=1, pool="dedicated", step=7)
    done = format_event("weights.client.done", "ab" * 16, wall_ms=12.5, rpc_ms=None, queue_ms=3.25, server_ms=9.25, pool_wait_ms=0.1,
                        status=503, ok=0, attempts=2, op="pause", url="http://10.0.0.1:8000/pause", step=7)
    got = _bulk(f"{pre}{send}\n{pre}{done}\n".encode())
    assert got[0] == _oracle(pre + send) and got[0][2]["step"] == 7 and got[0][2]["op"] == "pause"
    assert got[1][2] == {"wall_ms": 12.5, "rpc_ms": None, "queue_ms": 3.25, "server_ms": 9.25, "pool_wait_ms": 0.1, "status": 503, "ok": 0,
                         "attempts": 2, "op": "pause", "url": "http://10.0.0.1:8000/pause", "server": None, "step": 7}


def test_seed_send_without_op_takes_it_from_the_url() -> None:
    line = "[weights][abc123] client.send url=http://h:8001/update_weights t=1795000000.5"
    ev = parse_line(line)
    assert isinstance(ev, Event) and ev["op"] == "update_weights"
    assert _bulk(line.encode())[0] == ("weights.client.send", "abc123", _oracle(line)[2])
    assert _bulk(b"[weights][x] client.send url=http://h:8001/pause?mode=keep t=1")[0][2]["op"] == "pause"


def test_not_utf8_and_gzip_are_read(tmp_path: Any) -> None:
    from weightwatch.analysis.sources import expand, read_inputs

    good = format_event("weights.client.done", "abc", wall_ms=1.0, rpc_ms=0.5, queue_ms=0.5)
    data = b"\xff\xfe junk [gen] batch.done completions=\xff dur_ms=1 inflight=2\n" + good.encode() + b"\n"
    got = _bulk(data)
    assert isinstance(got[0], Rejected) and "completions" in got[0].reason
    assert got[1] == _oracle(good)
    gz = tmp_path / "orchestrator.log.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(data * 3)
    run = read_inputs(expand([str(gz)]))
    assert run[0].frame.height == 3 and run[0].events == 3 and sum(run[0].rejected.values()) == 3
