"""The atomic checkpoint writer: layout, atomicity seen by a concurrent reader, pruning, bad input, telemetry."""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file

import weightwatch
from conftest import free_port
from weightwatch import events
from weightwatch.trainer import STABLE_MARKER, WEIGHTS_FILE, CheckpointWriter, is_stable, latest_stable, stable_steps


def _state(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(n, n, generator=g), "b.bias": torch.randn(n, generator=g)}


def test_write_layout_and_round_trip(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama"}')
    writer = CheckpointWriter(tmp_path / "ckpts")
    state = _state(1)
    out = writer.write(3, state, extra_files=[cfg])
    assert out == tmp_path / "ckpts" / "step_3"
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, "config.json", STABLE_MARKER])
    loaded = load_file(out / WEIGHTS_FILE)
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])
    marker = json.loads((out / STABLE_MARKER).read_text())
    assert marker["step"] == 3 and WEIGHTS_FILE in marker["files"]
    assert latest_stable(tmp_path / "ckpts") == (3, out)
    # no temporary directory is left behind
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["step_3"]


def test_keep_last_prunes_oldest(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=2)
    for step in range(5):
        writer.write(step, _state(step))
    assert stable_steps(tmp_path) == [3, 4]
    assert not (tmp_path / "step_2").exists()


def test_tied_weights_are_saved(tmp_path):
    emb = torch.randn(10, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb}  # shared storage, like tied embeddings
    out = CheckpointWriter(tmp_path).write(0, state)
    loaded = load_file(out / WEIGHTS_FILE)
    assert torch.equal(loaded["lm_head.weight"], emb) and torch.equal(loaded["model.embed_tokens.weight"], emb)


def test_model_state_dict_with_non_contiguous_tensor(tmp_path):
    t = torch.randn(8, 6).t()  # a transposed view is not contiguous
    assert not t.is_contiguous()
    out = CheckpointWriter(tmp_path).write(1, {"w": t})
    assert torch.equal(load_file(out / WEIGHTS_FILE)["w"], t)


@pytest.mark.parametrize(
    ("step", "state", "message"),
    [
        (-1, {"w": torch.zeros(1)}, "non-negative"),
        ("3", {"w": torch.zeros(1)}, "non-negative"),
        (True, {"w": torch.zeros(1)}, "non-negative"),
        (1, {}, "non-empty"),
        (1, {"w": [1, 2, 3]}, "torch tensors or all numpy"),
        (1, {"w": torch.zeros(1), "v": "x"}, "torch tensors or all numpy"),
    ],
)
def test_bad_input_is_refused_and_loses_nothing(tmp_path, step, state, message):
    writer = CheckpointWriter(tmp_path)
    writer.write(0, _state())
    with pytest.raises(ValueError, match=message):
        writer.write(step, state)
    assert stable_steps(tmp_path) == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["step_0"]


def test_missing_extra_file_is_refused(tmp_path):
    writer = CheckpointWriter(tmp_path / "c")
    with pytest.raises(ValueError, match="does not exist"):
        writer.write(0, _state(), extra_files=[tmp_path / "nope.json"])
    assert list((tmp_path / "c").iterdir()) == []


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointWriter(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="inject_delay_ms"):
        CheckpointWriter(tmp_path, inject_delay_ms=-1)


def test_io_failure_mid_write_cleans_up_and_keeps_previous(tmp_path, monkeypatch):
    writer = CheckpointWriter(tmp_path / "c", keep_last=3)
    writer.write(0, _state())
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")

    def disk_full(src, dst, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("weightwatch.trainer.writer.shutil.copyfile", disk_full)
    with pytest.raises(OSError, match="No space"):
        writer.write(1, _state(1), extra_files=[extra])
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["step_0"]
    assert is_stable(tmp_path / "c" / "step_0")


def test_stale_temporaries_from_a_crash_are_removed(tmp_path):
    (tmp_path / ".tmp-step_7-deadbeef").mkdir()
    (tmp_path / ".tmp-step_7-deadbeef" / WEIGHTS_FILE).write_bytes(b"half")
    CheckpointWriter(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_step_replaces_it(tmp_path):
    writer = CheckpointWriter(tmp_path)
    writer.write(2, {"w": torch.zeros(3)})
    writer.write(2, {"w": torch.ones(3)})
    assert torch.equal(load_file(tmp_path / "step_2" / WEIGHTS_FILE)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"]


def test_concurrent_reader_never_sees_half_a_checkpoint(tmp_path):
    """A poller that loads any STABLE checkpoint must always find complete, matching weights."""
    root = tmp_path / "ckpts"
    writer = CheckpointWriter(root, keep_last=2)
    expected = {step: _state(step, n=256) for step in range(12)}
    stop = threading.Event()
    seen: set[int] = set()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for entry in list(root.iterdir()) if root.exists() else []:
                if not entry.name.startswith("step_"):
                    continue
                step = int(entry.name.split("_")[1])
                try:
                    if not is_stable(entry):
                        # visible without a marker is allowed only after the rename: the weights are complete
                        names = set(os.listdir(entry))
                        if names and WEIGHTS_FILE not in names:
                            problems.append(f"step_{step} visible without weights: {names}")
                        continue
                    loaded = load_file(entry / WEIGHTS_FILE)
                except FileNotFoundError:
                    continue  # pruned between listing and reading
                if not all(torch.equal(loaded[k], expected[step][k]) for k in expected[step]):
                    problems.append(f"step_{step} content differs")
                seen.add(step)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for step, state in expected.items():
            writer.write(step, state)
    finally:
        stop.set()
        t.join(10)
    assert not problems, problems[:3]
    assert seen, "the reader never saw a checkpoint"


def test_slow_write_switch_delays_the_marker(tmp_path, telemetry_reset, caplog):
    caplog.set_level("INFO", logger="weightwatch")
    writer = CheckpointWriter(tmp_path, inject_delay_ms=300)
    seen_unmarked = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            d = tmp_path / "step_0"
            if d.exists() and not is_stable(d) and (d / WEIGHTS_FILE).exists():
                seen_unmarked.set()
                return

    t = threading.Thread(target=watch)
    t.start()
    writer.write(0, _state())
    done.set()
    t.join(5)
    assert seen_unmarked.is_set(), "the directory should be visible, unmarked, during the injected delay"
    ev = [e for e in events.parse_lines(r.getMessage() for r in caplog.records) if isinstance(e, events.Event)]
    assert ev and ev[-1].key == "ckpt.write.done" and ev[-1]["write_ms"] >= 300


def test_telemetry_event_span_and_metrics(tmp_path, telemetry_reset):
    port = free_port()
    tele = weightwatch.setup(
        "test-trainer", role="trainer", metrics_port=port, metrics_addr="127.0.0.1",
        span_file=tmp_path / "trainer.spans.jsonl", log_file=tmp_path / "trainer.log",
    )
    writer = CheckpointWriter(tmp_path / "ckpts")
    out = writer.write(5, _state(n=32))
    size = sum(p.stat().st_size for p in out.iterdir())
    tele.force_flush()

    lines = (tmp_path / "trainer.log").read_text().splitlines()
    parsed = [e for e in events.parse_lines(lines) if isinstance(e, events.Event)]
    assert [e.key for e in parsed] == ["ckpt.write.done"]
    assert parsed[0]["step"] == 5 and parsed[0]["write_ms"] > 0
    assert int(parsed[0]["bytes"]) == size

    spans = [json.loads(x) for x in (tmp_path / "trainer.spans.jsonl").read_text().splitlines()]
    ckpt = [s for s in spans if s["name"] == "ckpt.write"]
    assert len(ckpt) == 1 and ckpt[0]["attributes"]["rl.step"] == 5 and ckpt[0]["attributes"]["rl.bytes"] == size

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert "rl_checkpoint_write_seconds_count 1.0" in text
    assert f"rl_checkpoint_bytes {float(size)}" in text
    assert "rl_trainer_step 5.0" in text
    # the write histogram carries the span's trace id as exemplar
    assert f'trace_id="{ckpt[0]["trace_id"]}"' in text
