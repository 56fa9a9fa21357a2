"""wait_for_checkpoint against a real trainer thread writing to a real directory tree."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

import weightwatch
from weightwatch import events
from weightwatch.orchestrator import CheckpointWaitTimeout, wait_for_checkpoint, wait_for_checkpoint_sync
from weightwatch.orchestrator.checkpoint_wait import find_trainer_root


def write_checkpoint(root: Path, step: int, delay: float = 0.0) -> threading.Thread:
    """A trainer thread: after ``delay`` writes step_N/model.safetensors, then the STABLE marker last."""

    def work() -> None:
        time.sleep(delay)
        d = root / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
        time.sleep(0.05)
        (d / "STABLE").write_text("")

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


@pytest.fixture
def tele(telemetry_reset, tmp_path):
    return weightwatch.setup("orch-test", role="orchestrator", span_file=tmp_path / "spans.jsonl")


def ckpt_events(caplog) -> list[events.Event]:
    out = [events.parse_line(r.getMessage()) for r in caplog.records if r.name == "weightwatch.orchestrator"]
    return [e for e in out if isinstance(e, events.Event) and e.tag == "ckpt"]


def test_waits_for_a_trainer_that_writes_late(tele, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    root = tmp_path / "weights"
    trainer = write_checkpoint(root, 4, delay=0.6)
    path = asyncio.run(wait_for_checkpoint(root, 4, timeout=20, poll_interval=0.05))
    trainer.join()
    assert path == root / "step_4" and (path / "STABLE").exists()
    evs = ckpt_events(caplog)
    assert [e.key for e in evs] == ["ckpt.wait.start", "ckpt.wait.done"]
    assert evs[0]["target_step"] == 4 and evs[1]["target_step"] == 4
    assert evs[1]["wait_ms"] >= 600  # it cannot have found the marker before the trainer wrote it
    assert tele.registry.get_sample_value("rl_checkpoint_wait_seconds_count") == 1
    assert tele.registry.get_sample_value("rl_checkpoint_wait_seconds_sum") == pytest.approx(evs[1]["wait_ms"] / 1000, abs=1e-3)
    tele.force_flush()
    span = [json.loads(l) for l in tele.span_file.read_text().splitlines() if '"ckpt.wait"' in l][0]
    assert span["attributes"]["rl.step"] == 4 and span["attributes"]["rl.wait_ms"] == pytest.approx(evs[1]["wait_ms"], abs=1e-2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_marker_already_there_and_directory_without_marker(tele, tmp_path) -> None:
    root = tmp_path / "w"
    write_checkpoint(root, 1).join()
    assert wait_for_checkpoint_sync(root, 1, timeout=5, poll_interval=0.01) == root / "step_1"
    (root / "step_2").mkdir()  # the trainer started writing step 2 but never marked it
    with pytest.raises(CheckpointWaitTimeout, match="not marked it STABLE"):
        wait_for_checkpoint_sync(root, 2, timeout=0.3, poll_interval=0.05)
    assert tele.registry.get_sample_value("rl_checkpoint_wait_seconds_count") == 2


def test_wrong_path_warns_once_with_both_paths_and_times_out_clearly(tele, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    run = tmp_path / "run"
    trainer_root, polled = run / "weights", run / "checkpoints"  # the classic mistake
    write_checkpoint(trainer_root, 7).join()
    write_checkpoint(trainer_root, 8, delay=0.2)

    async def go() -> None:
        with pytest.raises(CheckpointWaitTimeout) as info:
            await wait_for_checkpoint(polled, 8, timeout=1.5, poll_interval=0.05)
        err = info.value
        assert isinstance(err, TimeoutError)
        assert err.candidate == trainer_root and err.step_dir == polled / "step_8"
        assert str(polled) in str(err) and str(trainer_root) in str(err) and "does not exist" in str(err)
        with pytest.raises(CheckpointWaitTimeout):
            await wait_for_checkpoint(polled, 9, timeout=0.3, poll_interval=0.05)

    asyncio.run(go())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "write elsewhere" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(polled) in warnings[0] and str(trainer_root) in warnings[0]
    evs = ckpt_events(caplog)
    assert [e.key for e in evs] == ["ckpt.wait.start", "ckpt.wait.start"]  # no wait.done for a wait that never ended


def test_finished_runs_next_door_are_not_a_wrong_path(tmp_path) -> None:
    old_run, current = tmp_path / "run1" / "weights", tmp_path / "run2" / "weights"
    write_checkpoint(old_run, 900).join()
    past = time.time() - 3600
    for p in (old_run / "step_900", old_run):
        os.utime(p, (past, past))
    current.mkdir(parents=True)
    assert find_trainer_root(current) is None
    write_checkpoint(current, 1).join()
    assert find_trainer_root(current) is None
    # a trainer writing run1 *now* while we poll run2 is the mistake
    write_checkpoint(old_run, 901).join()
    assert find_trainer_root(current) == (old_run, 901)


def test_missing_root_with_nothing_around_says_so(tele, tmp_path) -> None:
    with pytest.raises(CheckpointWaitTimeout, match="does not exist") as info:
        wait_for_checkpoint_sync(tmp_path / "a" / "b" / "nope", 1, timeout=0.2, poll_interval=0.05)
    assert info.value.candidate is None and "wrong path" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(timeout=None), dict(timeout=float("inf")), dict(timeout=0), dict(timeout=1, poll_interval=0), dict(timeout=1, poll_interval=5)],
)
def test_bad_timeouts_are_refused(tmp_path, kwargs) -> None:
    with pytest.raises(ValueError):
        wait_for_checkpoint_sync(tmp_path, 1, **kwargs)


def test_a_busy_parallel_run_next_door_is_not_a_wrong_path(tmp_path) -> None:
    mine, other = tmp_path / "run1" / "weights", tmp_path / "run2" / "weights"
    write_checkpoint(mine, 3).join()
    past = time.time() - 60
    os.utime(mine / "step_3", (past, past))
    write_checkpoint(other, 2).join()  # newer on disk, but behind the step we wait for
    assert find_trainer_root(mine, target_step=4) is None
    write_checkpoint(other, 4).join()  # the step we wait for appeared there and not here
    assert find_trainer_root(mine, target_step=4) == (other, 4)


def test_a_busy_run_next_door_far_from_the_target_is_not_a_wrong_path(tmp_path) -> None:
    # Another run (a cousin directory) wrote step_1 just now; we wait for step 4 under a root the trainer
    # has not created yet. That is not evidence of a wrong path.
    write_checkpoint(tmp_path / "other_run" / "weights", 1).join()
    mine = tmp_path / "my_run" / "weights"
    assert find_trainer_root(mine, target_step=4) is None
    assert find_trainer_root(mine, target_step=2) == (tmp_path / "other_run" / "weights", 1)
