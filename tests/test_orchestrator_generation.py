"""GenerationTracker, record_rollout and the orchestrator loop-lag probe."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

import weightwatch
from weightwatch import events
from weightwatch.orchestrator import GenerationTracker, record_rollout, start_loop_lag_probe


@pytest.fixture
def tele(telemetry_reset, tmp_path):
    return weightwatch.setup("orch-test", role="orchestrator", span_file=tmp_path / "spans.jsonl")


def parsed(caplog, tag: str) -> list[events.Event]:
    out = [events.parse_line(r.getMessage()) for r in caplog.records if r.name == "weightwatch.orchestrator"]
    return [e for e in out if isinstance(e, events.Event) and e.tag == tag]


def test_batch_timing_inflight_and_completions(tele, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    tracker = GenerationTracker()
    peak: list[float] = []

    async def one(i: int) -> None:
        with tracker.request():
            await asyncio.sleep(0.05)
            peak.append(tele.registry.get_sample_value("rl_generation_inflight_requests"))
            if i == 3:
                raise RuntimeError("a failed request is not a completion")

    async def go() -> None:
        async with tracker.batch(target_batch=4, step=2) as batch:
            results = await asyncio.gather(*(one(i) for i in range(4)), return_exceptions=True)
            assert sum(isinstance(r, RuntimeError) for r in results) == 1
        assert batch.completions == 3 and batch.dur_ms >= 50

    asyncio.run(go())
    assert max(peak) == 4
    assert tele.registry.get_sample_value("rl_generation_inflight_requests") == 0 and tracker.inflight == 0
    assert tele.registry.get_sample_value("rl_generation_batch_seconds_count") == 1
    evs = parsed(caplog, "gen")
    assert [e.key for e in evs] == ["gen.batch.start", "gen.batch.done"]
    assert evs[0]["target_batch"] == 4 and evs[0]["inflight"] == 0
    assert evs[1]["completions"] == 3 and evs[1]["dur_ms"] >= 50 and evs[1]["inflight"] == 0
    tele.force_flush()
    span = [json.loads(l) for l in tele.span_file.read_text().splitlines() if '"gen.batch"' in l][0]
    assert span["attributes"]["rl.completions"] == 3 and span["attributes"]["rl.step"] == 2 and span["attributes"]["rl.target_batch"] == 4


def test_batch_counts_completions_set_by_the_caller_and_marks_errors(tele, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    tracker = GenerationTracker()
    with pytest.raises(ValueError, match="boom"), tracker.batch(8) as b:
        b.completions = 5
        raise ValueError("boom")
    done = parsed(caplog, "gen")[-1]
    assert done.key == "gen.batch.done" and done["completions"] == 5
    tele.force_flush()
    span = [json.loads(l) for l in tele.span_file.read_text().splitlines() if '"gen.batch"' in l][0]
    assert span["status"] == "error"
    with pytest.raises(ValueError):
        tracker.batch(-1)


def test_record_rollout_sets_gauges_and_event(tele, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    stats = record_rollout(step=10, ckpt_step=7, truncated=3, total=12, async_level=2)
    assert stats is not None and stats.staleness == 3 and stats.truncated_ratio == 0.25 and stats.too_stale
    g = tele.registry.get_sample_value
    assert g("rl_rollout_truncated_ratio") == 0.25 and g("rl_rollout_staleness_steps") == 3
    assert g("rl_orchestrator_step") == 10 and g("rl_checkpoint_step") == 7 and g("rl_async_level") == 2
    ev = parsed(caplog, "rollout")[0]
    assert (ev["trunc_pct"], ev["current_step"], ev["ckpt_step"], ev["staleness"], ev["async_level"]) == (25.0, 10, 7, 3, "2")
    assert any("staleness 3 > async_level 2" in r.getMessage() for r in caplog.records)


def test_record_rollout_without_completions_reports_unknown_ratio(tele, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    record_rollout(1, 0, 1, 4, 1)
    stats = record_rollout(2, 1, 0, 0, 1)
    assert stats is not None and stats.truncated_ratio is None and not stats.too_stale
    assert tele.registry.get_sample_value("rl_rollout_truncated_ratio") == 0.25  # not overwritten with a made-up 0
    assert parsed(caplog, "rollout")[-1]["trunc_pct"] is None


@pytest.mark.parametrize("args", [(1, 0, 5, 4), (1, -1, 0, 4), (1.5, 0, 0, 4), ("1", 0, 0, 4)])
def test_record_rollout_bad_input_is_logged_not_raised(tele, caplog, args) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    assert record_rollout(*args, async_level=1) is None
    assert any("record_rollout ignored bad input" in r.getMessage() for r in caplog.records)
    assert tele.registry.get_sample_value("rl_orchestrator_step") == 0  # untouched
    assert not parsed(caplog, "rollout")


def test_loop_lag_probe_sees_a_blocked_loop(tele) -> None:
    async def go() -> None:
        task = start_loop_lag_probe(interval=0.02)
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # a callback hogging the loop, as a busy stream parser would
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert tele.registry.get_sample_value("rl_orchestrator_event_loop_lag_seconds_count") >= 3
    assert tele.registry.get_sample_value("rl_orchestrator_event_loop_lag_seconds_sum") >= 0.25
    with pytest.raises(ValueError):
        start_loop_lag_probe(interval=0)
