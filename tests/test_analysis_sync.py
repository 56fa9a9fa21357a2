"""`weightwatch analyze` on the weight sync of today (pause -> transfer -> resume), seed-era logs, named checkpoints.

The logs are made with the project's formatter (tests/fixtures/logs/make_fixtures.py and format_event here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightwatch.analysis import analyze_paths, rules
from weightwatch.cli import main
from weightwatch.events import format_event

FIX = Path(__file__).parent / "fixtures" / "logs"
PRE = "2026-12-03 12:00:00,000 INFO weightwatch.orchestrator "


@pytest.mark.parametrize(("run", "signature"), [
    ("sync_healthy", "healthy"), ("sync_pause_slow", "pause_slow"), ("sync_straggler", "straggler"), ("sync_hung", "hung"),
    ("sync_version_skew", "version_skew"),
])
def test_each_sync_fixture_gets_its_verdict(run: str, signature: str) -> None:
    report = analyze_paths([FIX / run])
    assert report.verdict.signature == signature, report.verdict
    assert len(report.syncs) == 6
    counts = report.syncs.counts()
    assert all(v == 0 for k, v in counts.items() if k != signature and not (run == "sync_hung" and k == "version_skew"))
    assert (counts.get(signature, 0) > 0) == (signature != "healthy")


def test_straggler_names_the_server_and_the_phase() -> None:
    d = analyze_paths([FIX / "sync_straggler"]).to_dict()["syncs"]
    assert d["by_signature"]["straggler"] == 6
    for s in d["slowest"]:
        assert s["straggler_server"] == "10.0.0.2:8000" and s["straggler_phase"] == "transfer"
        assert s["held_by_server"] == "10.0.0.2:8000" and s["straggler_gap_ms"] >= rules.STRAGGLER_MIN_GAP_MS
    per_server = d["phases"]["per_server"]
    assert per_server["10.0.0.2:8000"]["transfer"]["p50"] > 2 * per_server["10.0.0.1:8000"]["transfer"]["p50"]
    assert set(d["phases"]["per_sync"]) == {"pause", "transfer", "resume"}


def _sync(tid: str, step: int, phases: dict[str, dict[str, float]], *, done: bool = True, ok: dict[str, int] | None = None) -> list[str]:
    """One sync's lines; phases[op][server] = wall ms (a missing server in an op: sent, never answered)."""
    t = 1_795_000_000.0 + step * 100
    servers = sorted({s for v in phases.values() for s in v} | {s for s in (ok or {})})
    out = [PRE + format_event("weights.sync.start", tid, step=step, servers=len(servers), t=t)]
    for op in ("pause", "update_weights", "resume"):
        for srv in servers:
            url = f"http://{srv}/{op}"
            out.append(PRE + format_event("weights.client.send", tid, url=url, op=op, t=t, attempt=1, pool="dedicated", step=step, budget_s=10.0))
            if srv in phases.get(op, {}):
                wall = phases[op][srv]
                good = (ok or {}).get(srv, 1) if op == "update_weights" else 1
                out.append(PRE + format_event("weights.client.done", tid, wall_ms=wall, rpc_ms=1.0, queue_ms=1.0, server_ms=wall - 1, status=200 if good else 500,
                                              ok=good, attempts=1, op=op, url=url, step=step))
        t += max(phases.get(op, {"x": 0.0}).values()) / 1000
    if done:
        out.append(PRE + format_event("weights.sync.done", tid, step=step, wall_ms=1.0, pause_ms=1.0, transfer_ms=1.0, resume_ms=1.0, ok=1))
    return out


def _run(tmp_path: Path, *syncs: list[str]):  # type: ignore[no-untyped-def]
    p = tmp_path / "orchestrator.log"
    p.write_text("\n".join(line for s in syncs for line in s) + "\n")
    return analyze_paths([p])


def _sigs(report) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    return {r["tid"]: r["signatures"] for r in report.syncs.frame.select("tid", "signatures").iter_rows(named=True)}


OK2 = {"pause": {"a:1": 20.0, "b:1": 25.0}, "update_weights": {"a:1": 200.0, "b:1": 210.0}, "resume": {"a:1": 10.0, "b:1": 12.0}}


def test_thresholds_come_from_the_catalogue(tmp_path: Path) -> None:
    just_under = {**OK2, "pause": {"a:1": rules.PAUSE_SLOW_MS, "b:1": rules.PAUSE_SLOW_MS - 1}}
    over = {**OK2, "pause": {"a:1": rules.PAUSE_SLOW_MS + 1, "b:1": rules.PAUSE_SLOW_MS + 1}}
    resume = {**OK2, "resume": {"a:1": rules.RESUME_SLOW_MS + 5, "b:1": rules.RESUME_SLOW_MS + 5}}
    rep = _run(tmp_path, _sync("s1", 1, OK2), _sync("s2", 2, just_under), _sync("s3", 3, over), _sync("s4", 4, resume))
    assert _sigs(rep) == {"s1": [], "s2": [], "s3": ["pause_slow"], "s4": ["resume_slow"]}
    assert rep.syncs.frame.filter(rep.syncs.frame["tid"] == "s3")["pause_ms"].item() == rules.PAUSE_SLOW_MS + 1


def test_straggler_needs_both_the_ratio_and_the_gap(tmp_path: Path) -> None:
    gap = rules.STRAGGLER_MIN_GAP_MS
    ratio_only = {**OK2, "update_weights": {"a:1": 100.0, "b:1": 100.0 + gap - 1}}  # 2x+ but under the gap
    gap_only = {**OK2, "update_weights": {"a:1": 2000.0, "b:1": 2000.0 + gap + 1}}  # the gap but not 2x
    both = {**OK2, "update_weights": {"a:1": 200.0, "b:1": max(2 * 200.0, 200.0 + gap)}}
    three = {**OK2, "update_weights": {"a:1": 200.0, "b:1": 210.0, "c:1": 1500.0}}
    rep = _run(tmp_path, _sync("r", 1, ratio_only), _sync("g", 2, gap_only), _sync("b", 3, both), _sync("c", 4, three))
    assert _sigs(rep) == {"r": [], "g": [], "b": ["straggler"], "c": ["straggler"]}
    row = rep.syncs.frame.filter(rep.syncs.frame["tid"] == "c").row(0, named=True)
    assert row["straggler_server"] == "c:1" and row["straggler_phase"] == "transfer" and row["held_by_server"] == "c:1"


def test_hung_call_past_its_budget_fraction_and_sync_without_done(tmp_path: Path) -> None:
    open_call = {**OK2, "update_weights": {"a:1": 200.0}}  # b:1 sent its update and never got an answer
    later = [PRE + format_event("weights.client.send", "probe", url="http://a:1/liveness", op="liveness", t=1_795_000_000.0 + 500)]
    rep = _run(tmp_path, _sync("h", 1, open_call, done=False), later)
    assert _sigs(rep)["h"][0] == "hung"
    calls = rep.syncs.open_calls.to_dicts()
    assert [(c["server"], c["op"]) for c in calls] == [("b:1", "update_weights")]
    assert calls[0]["past_budget_fraction"] is True and calls[0]["in_flight_s"] > rules.HUNG_BUDGET_FRACTION * 10.0
    # a sync that simply has no sync.done (the log ends) is hung too
    rep = _run(tmp_path, _sync("n", 1, OK2, done=False))
    assert _sigs(rep) == {"n": ["hung"]}
    assert rep.verdict.signature == "hung"


def test_open_call_within_its_budget_is_listed_not_hung(tmp_path: Path) -> None:
    open_call = {**OK2, "update_weights": {"a:1": 200.0}}
    rep = _run(tmp_path, _sync("o", 1, open_call, done=True))
    calls = rep.syncs.open_calls.to_dicts()
    assert calls and calls[0]["past_budget_fraction"] is False
    assert "hung" not in _sigs(rep)["o"]
    assert "version_skew" in _sigs(rep)["o"]  # b:1 never got step 1


def test_version_skew_after_a_failed_transfer_and_its_recovery(tmp_path: Path) -> None:
    rep = _run(tmp_path, _sync("v1", 1, OK2), _sync("v2", 2, OK2, ok={"b:1": 0}), _sync("v3", 3, OK2))
    assert _sigs(rep) == {"v1": [], "v2": ["version_skew"], "v3": []}
    row = rep.syncs.frame.filter(rep.syncs.frame["tid"] == "v2").row(0, named=True)
    assert row["behind"] == ["b:1"]
    assert {v["server"]: v["step"] for v in row["versions"]} == {"a:1": 2, "b:1": 1}


def test_the_step_travels_with_each_update_and_joins_its_checkpoint(tmp_path: Path) -> None:
    """The wait for step 7 is logged after the sync of step 6 started: joined by step, not by order."""
    lines = [PRE + format_event("ckpt.wait.done", target_step=6, wait_ms=100.0)]
    sync6 = _sync("s6", 6, OK2)
    lines += sync6[:3] + [PRE + format_event("ckpt.wait.done", target_step=7, wait_ms=2500.0)] + sync6[3:] + _sync("s7", 7, OK2)
    rep = _run(tmp_path, lines)
    by = {(u.tid, u.op, u.server): (u.step, u.ckpt_step, u.ckpt_wait_ms) for u in rep.updates}
    assert by[("s6", "update_weights", "a:1")] == (6, 6, 100.0)
    assert by[("s7", "pause", "b:1")] == (7, 7, 2500.0)
    assert all(u.signature == "checkpoint_io_slow" for u in rep.updates if u.tid == "s7")


def test_seed_lines_parse_and_the_update_never_answered_is_reported() -> None:
    d = analyze_paths([FIX / "seed"]).to_dict(updates_limit=-1)
    assert d["parse"]["rejected_total"] == 0
    assert d["updates_summary"]["count"] == 6
    assert {u["op"] for u in d["updates"]} == {"update_weights"}
    nd = d["updates_summary"]["never_done"]
    assert len(nd) == 1 and nd[0]["server"] == "h:8001" and len(nd[0]["trace_id"]) == 6
    assert d["updates_summary"]["missing_events"]["client.done"] == 1


def test_slow_checkpoint_waits_are_named_with_step_write_and_cause(capsys: pytest.CaptureFixture[str]) -> None:
    c = analyze_paths([FIX / "ckpt_named"]).to_dict()["checkpoints"]
    assert c["slow"] == [
        {"step": 3, "wait_ms": 4200.0, "write_ms": 4000.0, "cause": rules.CKPT_CAUSE_SLOW_WRITE},
        {"step": 5, "wait_ms": 5400.0, "write_ms": 300.0, "cause": rules.CKPT_CAUSE_NOT_THE_WRITE},
    ]
    alone = analyze_paths([FIX / "ckpt_named" / "orchestrator.log"]).to_dict()["checkpoints"]["slow"]
    assert [w["cause"] for w in alone] == [rules.CKPT_CAUSE_UNKNOWN] * 2  # no trainer log given
    main(["analyze", str(FIX / "ckpt_named")])
    out = capsys.readouterr().out
    assert "5     5,400       300  wait far longer than the write" in out


def test_text_json_and_compare_on_syncs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIX / "sync_straggler")]) == 0  # exit status: queue breaches only, as before
    out = capsys.readouterr().out
    assert out.startswith("VERDICT: straggler") and "WEIGHT SYNCS: 6" in out and "held up by" in out
    assert main(["analyze", str(FIX / "sync_hung"), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verdict"]["signature"] == "hung" and d["syncs"]["open_calls"][0]["server"] == "10.0.0.2:8000"
    assert main(["analyze", "--compare", str(FIX / "sync_pause_slow"), str(FIX / "sync_healthy"), "--format", "json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["validated"] is True and c["phases"]["pause"]["p95"]["after"] < rules.PAUSE_SLOW_MS < c["phases"]["pause"]["p95"]["before"]
    assert main(["analyze", "--compare", str(FIX / "sync_healthy"), str(FIX / "sync_straggler")]) == 3
    out = capsys.readouterr().out
    assert "[FAIL] transfer phase p95 not slower" in out and "[FAIL] no sync signature after the fix" in out


def test_signature_expression_agrees_with_diagnose() -> None:
    import itertools

    import polars as pl

    vals = [None, 0.0, 100.0, rules.QUEUE_THRESHOLD_MS, 301.0, 1500.0, 2000.0, 2500.0, 5000.0]
    rows = list(itertools.product(vals, vals, vals))
    f = pl.DataFrame(rows, schema={"queue_ms": pl.Float64, "rpc_ms": pl.Float64, "ckpt_wait_ms": pl.Float64}, orient="row")
    got = f.select(rules.signature_expr()).to_series().to_list()
    assert got == [rules.diagnose(*r).signature for r in rows]
