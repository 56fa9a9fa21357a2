"""`weightwatch analyze`: joins, diagnoses, statistics, robustness and exit status on fixture runs."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightwatch.analysis import analyze_paths, rules, sources
from weightwatch.analysis.rules import diagnose
from weightwatch.analysis.stats import percentile, summarize
from weightwatch.cli import main

FIX = Path(__file__).parent / "fixtures" / "logs"
SIGNATURES = ["healthy", "front_end_queue", "engine_reload_slow", "checkpoint_io_slow"]


@pytest.mark.parametrize("signature", SIGNATURES)
def test_each_fixture_run_gets_its_diagnosis(signature: str) -> None:
    report = analyze_paths([FIX / signature])
    assert report.verdict.signature == signature
    assert len(report.updates) == 12
    assert all(u.signature == signature for u in report.updates)
    assert all(u.missing == () for u in report.updates)  # client and server halves joined
    d = report.to_dict()
    assert d["verdict"]["counts"][signature] == 12
    assert d["checkpoints"]["writes"] == 12 and d["checkpoints"]["waits"] == 12
    assert all(u["ckpt_wait_ms"] is not None and u["ckpt_step"] is not None for u in d["updates"])


def test_rules_name_the_largest_part_over_its_threshold() -> None:
    assert diagnose(3300, 230, 100).signature == "front_end_queue"
    assert "queue_ms 3,300 > 300" in diagnose(3300, 230, 100).rule
    assert diagnose(40, 2500, None).signature == "engine_reload_slow"
    assert diagnose(20, 100, 4000).signature == "checkpoint_io_slow"
    assert diagnose(20, 100, 900).signature == "healthy"
    both = diagnose(5000, 2500, None)
    assert both.signature == "front_end_queue" and both.also == ("engine_reload_slow",)
    assert diagnose(None, None, None).signature == "healthy"
    assert diagnose(rules.QUEUE_THRESHOLD_MS, 0, 0).signature == "healthy"  # the threshold itself is not a breach


def test_mixed_run_joins_across_files_and_names_missing_halves() -> None:
    report = analyze_paths([FIX / "mixed"])
    d = report.to_dict(updates_limit=-1)
    # 10 steps x 2 servers, plus one update without its server half and one without its client half
    assert d["updates_summary"]["count"] == 22
    assert d["updates_summary"]["complete"] == 20
    by_tid = {u["trace_id"]: u for u in d["updates"]}
    client_only = by_tid["feedfacefeedfacefeedfacefeedface"]
    assert client_only["missing"] == ["server.recv", "rpc.start", "rpc.done"] and client_only["wall_ms"] == 210.0
    server_only = by_tid["0badc0de0badc0de0badc0de0badc0de"]
    assert server_only["missing"] == ["client.send", "client.done", "rpc.start", "rpc.done"]
    complete = [u for u in d["updates"] if not u["missing"]]
    assert {u["server"] for u in complete} == {"10.0.0.1:8000", "10.0.0.2:8000"}
    for u in complete:  # server.recv - client.send is the queue the fixture put in (minus the 0.5 ms answer)
        assert u["recv_delay_ms"] == pytest.approx(u["queue_ms"] - 0.5, abs=0.01)
        assert u["recv_delay_clock_skew_sensitive"] is True
        assert u["server_rpc_ms"] == pytest.approx(u["rpc_ms"])
    assert report.verdict.signature == "front_end_queue"


def test_malformed_lines_are_skipped_and_counted_with_reasons() -> None:
    d = analyze_paths([FIX / "mixed"]).to_dict()
    rej = d["parse"]["rejected"]
    assert rej == {
        "weights.client.done: wall_ms is not a float": 1,
        "weights.client.done: missing queue_ms": 1,
        "gen.batch.done: dur_ms is not a float": 1,
        "unknown event": 1,
        "weights.client.send without [TID]": 1,
    }
    assert d["parse"]["rejected_total"] == 5
    assert any("wall_ms=fast" in line for line in d["parse"]["rejected_samples"]["weights.client.done: wall_ms is not a float"])


def test_line_order_and_file_order_do_not_matter(tmp_path: Path) -> None:
    src = (FIX / "front_end_queue")
    lines = [line for f in sorted(src.glob("*.log")) for line in f.read_text().splitlines()]
    server = [x for x in lines if "server.recv" in x or "rpc." in x]
    rest = [x for x in lines if x not in server]
    (tmp_path / "b.log").write_text("\n".join(reversed(server)) + "\n")  # server lines first, reversed
    (tmp_path / "a.log").write_text("\n".join(rest) + "\n")
    a = analyze_paths([src]).to_dict(updates_limit=-1)
    b = analyze_paths([tmp_path / "b.log", tmp_path / "a.log"]).to_dict(updates_limit=-1)
    assert a["measures"] == b["measures"]
    assert [u["trace_id"] for u in a["updates"]] == [u["trace_id"] for u in b["updates"]]
    assert b["updates_summary"]["complete"] == 12


def test_statistics_match_reference_implementations() -> None:
    report = analyze_paths([FIX / "engine_reload_slow"])
    rpc = sorted(u.rpc_ms for u in report.updates)
    s = report.measures["rpc_ms"]
    assert s["count"] == 12
    assert s["mean"] == pytest.approx(statistics.fmean(rpc))
    assert s["stddev"] == pytest.approx(statistics.stdev(rpc))
    assert s["p50"] == pytest.approx(statistics.median(rpc))
    assert s["max"] == max(rpc)
    assert s["p99"] == pytest.approx(statistics.quantiles(rpc, n=100, method="inclusive")[98])


@settings(max_examples=100, deadline=None)
@given(xs=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200))
def test_percentiles_are_monotone_and_bounded(xs: list[float]) -> None:
    s = summarize(xs)
    assert s["min"] <= s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
    assert s["max"] == max(xs) and s["count"] == len(xs)
    assert percentile(sorted(xs), 50) == pytest.approx(statistics.median(xs), rel=1e-9, abs=1e-9)


def test_numpy_and_pure_python_statistics_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from weightwatch.analysis import stats

    xs = [random.Random(1).lognormvariate(3, 1) for _ in range(20_000)]
    fast = stats.summarize(xs)
    monkeypatch.setattr(stats, "_np", None)
    slow = stats.summarize(xs)
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], rel=1e-9), k


def test_block_by_block_reading_gives_the_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "orchestrator.log"
    with big.open("w") as fh:
        for _ in range(30):
            fh.write((FIX / "mixed" / "orchestrator.log").read_text())
    one = analyze_paths([big]).to_dict(updates_limit=-1)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    many = analyze_paths([big]).to_dict(updates_limit=-1)
    assert one == many
    assert one["parse"]["rejected_total"] == 150


def test_updates_split_across_blocks_are_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends and dones on both sides of a block boundary are joined."""
    text = (FIX / "front_end_queue" / "orchestrator.log").read_text()
    big = tmp_path / "orchestrator.log"
    with big.open("w") as fh:
        for k in range(40):  # unique trace ids per copy
            fh.write(re.sub(r"\[weights\]\[([0-9a-f]{30})[0-9a-f]{2}\]", lambda m, k=k: f"[weights][{m.group(1)}{k:02d}]", text))
    one = analyze_paths([big]).to_dict(updates_limit=-1)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 3000)  # a few lines per block: many updates straddle a boundary
    many = analyze_paths([big]).to_dict(updates_limit=-1)
    assert one["updates_summary"]["count"] == many["updates_summary"]["count"] == 40 * 12
    assert one == many
    assert all(u["wall_ms"] is not None and u["t"] is not None for u in many["updates"])
    parts = sources.read_inputs(sources.expand([str(big)]))
    assert len(parts[0].blocks["weights.client.done"]) > 10  # many blocks were read, and joined as one stream


def test_gzip_stdin_and_directory_inputs(tmp_path: Path) -> None:
    src = FIX / "healthy"
    gz = tmp_path / "orchestrator.log.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write((src / "orchestrator.log").read_text())
    from_gz = analyze_paths([gz, src / "inference.log"]).to_dict()
    from_dir = analyze_paths([src]).to_dict()
    assert from_gz["measures"] == from_dir["measures"]
    out = subprocess.run([sys.executable, "-m", "weightwatch", "analyze", "-", "--format", "json"],
                         input=(src / "orchestrator.log").read_bytes(), capture_output=True, check=True)
    d = json.loads(out.stdout)
    assert d["updates_summary"]["count"] == 12 and d["measures"]["queue_ms"] == from_dir["measures"]["queue_ms"]


def test_span_files_alone_give_the_updates() -> None:
    report = analyze_paths([FIX / "spans_only"])
    assert len(report.updates) == 8
    assert report.verdict.signature == "healthy"
    assert report.parse["rejected"] == {"span line is not a span: JSONDecodeError": 1}
    assert report.generation["batches"] == 8 and report.checkpoints["waits"] == 8
    assert all(u.ckpt_wait_ms is not None for u in report.updates)


def test_spans_fill_what_logs_lack(tmp_path: Path) -> None:
    """Orchestrator log lines plus a span file of the same run: no double counting."""
    shutil.copy(FIX / "healthy" / "orchestrator.log", tmp_path / "orchestrator.log")
    shutil.copy(FIX / "spans_only" / "orchestrator.spans.jsonl", tmp_path / "orchestrator.spans.jsonl")
    report = analyze_paths([tmp_path])
    assert len(report.updates) == 12 + 8  # different runs: nothing shared, nothing lost


def test_json_schema_is_stable() -> None:
    d = analyze_paths([FIX / "front_end_queue"], model_size="7b", async_level=2).to_dict()
    assert d["schema_version"] == 1
    assert set(d) == {"schema_version", "verdict", "thresholds", "queue_breaches", "inputs", "parse", "updates_summary", "measures",
                      "slowest", "checkpoints", "generation", "rollout", "baseline", "updates", "updates_truncated", "syncs"}
    assert set(d["measures"]) == {"wall_ms", "queue_ms", "rpc_ms", "server_ms", "pool_wait_ms", "recv_delay_ms"}
    assert set(d["measures"]["queue_ms"]) == {"count", "mean", "stddev", "min", "p50", "p95", "p99", "max"}
    u = d["slowest"][0]
    assert {"trace_id", "server", "wall_ms", "queue_ms", "rpc_ms", "recv_delay_ms", "recv_delay_clock_skew_sensitive", "missing",
            "signature", "rule", "generation_around"} <= set(u)
    assert u["generation_around"] and {"position", "completions", "dur_ms", "inflight"} == set(u["generation_around"][0])
    assert d["baseline"]["model_size"] == "7b" and d["baseline"]["ok"] is False
    assert {c["measure"]: c["ok"] for c in d["baseline"]["checks"]} == {"wall_ms": False, "queue_ms": False, "rpc_ms": True}
    assert d["rollout"]["async_level"] == 2 and d["rollout"]["steps_over_async_level"] == 0 and d["rollout"]["ok"] is True
    json.dumps(d)  # plain data


def test_staleness_over_async_level_is_flagged() -> None:
    d = analyze_paths([FIX / "healthy"], async_level=0).to_dict()
    assert d["rollout"]["steps_over_async_level"] == 12 and d["rollout"]["ok"] is False


def test_exit_status_gates_on_queue_breaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIX / "healthy")]) == 0
    assert main(["analyze", str(FIX / "front_end_queue")]) == 3
    assert main(["analyze", str(FIX / "engine_reload_slow")]) == 0  # slow, but not queued
    out = capsys.readouterr().out
    assert "VERDICT: engine_reload_slow" in out and "rpc_ms" in out


def test_empty_and_bad_input_are_clear_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\njust text\n")
    assert main(["analyze", str(empty)]) == 1
    assert "no weightwatch events found in 2 lines" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.log")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["analyze"]) == 2
    bad_gz = tmp_path / "x.log.gz"
    bad_gz.write_bytes(b"not gzip")
    assert main(["analyze", str(bad_gz)]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert main(["analyze", str(tmp_path / "empty_dir")]) == 1


def test_compare_validates_a_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, after = FIX / "front_end_queue", FIX / "healthy"
    assert main(["analyze", "--compare", str(before), str(after), "--format", "json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["validated"] is True
    assert c["queue_ms"]["p99"]["before"] > 1000 and c["queue_ms"]["p99"]["after"] < 300
    assert [ch["ok"] for ch in c["checks"]] == [True, True, True]
    # the other way round the fix made things worse: not validated
    assert main(["analyze", "--compare", str(after), str(before)]) == 3
    assert "NOT VALIDATED" in capsys.readouterr().out
    # an engine that got slower is not a validated fix even though the queue is fine
    assert main(["analyze", "--compare", str(after), str(FIX / "engine_reload_slow"), "--format", "json"]) == 3
    c = json.loads(capsys.readouterr().out)
    assert {ch["name"]: ch["ok"] for ch in c["checks"]}["rpc p50 stable"] is False


def test_text_report_names_the_slowest_updates(capsys: pytest.CaptureFixture[str]) -> None:
    main(["analyze", str(FIX / "checkpoint_io_slow"), "--slowest", "3", "--model-size", "2b"])
    out = capsys.readouterr().out
    assert out.startswith("VERDICT: checkpoint_io_slow")
    assert out.count("checkpoint_io_slow: checkpoint wait_ms") == 3
    assert "BASELINE 2b (p95): OK" in out
    assert "CHECKPOINTS: 12 written, 12 waited for (12 waits over 1,000 ms)" in out


def test_stddev_is_finite_for_identical_values() -> None:
    s = summarize([5.0] * 20000)
    assert s["stddev"] == 0.0 or math.isclose(s["stddev"], 0.0, abs_tol=1e-9)


def _client_log(path: Path, queues_ms: list[float]) -> Path:
    from weightwatch.events import format_event

    lines = []
    for i, q in enumerate(queues_ms):
        tid = f"{i + 1:032x}"
        lines.append(format_event("weights.client.send", tid, url="http://s:8001/update_weights", op="update_weights", t=1000.0 + i))
        lines.append(format_event("weights.client.done", tid, wall_ms=q + 20.0, rpc_ms=15.0, queue_ms=q))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_outlier_does_not_make_the_run_verdict_but_two_do(tmp_path: Path) -> None:
    one = analyze_paths([_client_log(tmp_path / "one.log", [20.0] * 19 + [450.0])])
    assert one.verdict.signature == "healthy"
    assert "outliers (1 front_end_queue)" in one.verdict.rule
    assert one.verdict.counts["front_end_queue"] == 1
    assert one.queue_breaches == 1  # still counted, and still fails the exit status
    two = analyze_paths([_client_log(tmp_path / "two.log", [20.0] * 18 + [450.0, 500.0])])
    assert two.verdict.signature == "front_end_queue"
    single = analyze_paths([_client_log(tmp_path / "single.log", [450.0])])
    assert single.verdict.signature == "front_end_queue"
