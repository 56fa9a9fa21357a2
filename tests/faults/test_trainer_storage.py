"""Fault 5, trainer storage: the disk fills during a checkpoint write, and the trainer is SIGKILLed mid-write.

The full disk is a real tmpfs mounted for the test (``mount -t tmpfs -o size=...,nr_inodes=...``), filled
for real: by the weights file, by an extra file, and (inodes used up) at the STABLE marker. The kill is a
real SIGKILL of a child process running the CheckpointWriter, at three points of a write. Meanwhile the
orchestrator's own ``wait_for_checkpoint`` polls for the step being written and must never return it
until a later, complete write marks it STABLE.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import require
from weightwatch.contracts import STABLE_MARKER, TMP_STEP_PREFIX, WEIGHTS_FILE
from weightwatch.orchestrator.checkpoint_wait import CheckpointWaitTimeout, wait_for_checkpoint_sync
from weightwatch.trainer import CheckpointWriteError, CheckpointWriter, is_stable, latest_stable

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _state(seed: int, nbytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(nbytes // 8), "b": np.full(16, float(seed))}


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _leftovers(root: Path) -> list[str]:
    """Names under root that are neither a stable step_N nor expected: temporaries, unmarked step dirs."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_STEP_PREFIX) or (p.name.startswith("step_") and not is_stable(p)))


class Poller:
    """The orchestrator's checkpoint wait running in a thread for one step; records what it returned."""

    def __init__(self, root: Path, step: int, timeout: float) -> None:
        self.result: Path | BaseException | None = None
        self.digest_at_return: str | None = None
        self.marker_at_return = False

        def run() -> None:
            try:
                path = wait_for_checkpoint_sync(root, step, timeout=timeout, poll_interval=0.02)
                # What the orchestrator would load right now: it must be complete.
                self.marker_at_return = (path / STABLE_MARKER).is_file()
                self.digest_at_return = _digest(path)
                self.result = path
            except BaseException as exc:  # noqa: BLE001 - recorded for the test
                self.result = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> Path | BaseException | None:
        self._thread.join(timeout)
        return self.result


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs with 64 inodes, mounted for this test only."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=64", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(res.returncode == 0, f"mount -t tmpfs (root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_checkpoint_write(small_tmpfs: Path, tmp_path: Path, reliability) -> None:
    row = reliability
    row.fault = "Trainer disk full during a checkpoint write"
    row.injected = "real 4 MiB / 64-inode tmpfs filled: by the weights file, by an extra file, by inodes at the STABLE marker"
    root = small_tmpfs / "ckpts"
    writer = CheckpointWriter(root, keep_last=5)
    first = writer.write(1, _state(1, 256 << 10))
    kept = _digest(first)
    free_before = os.statvfs(small_tmpfs).f_bfree

    big_extra = tmp_path / "tokenizer.json"  # on the real disk; copying it into the tmpfs overflows it
    big_extra.write_bytes(os.urandom(6 << 20))
    filler_dir = small_tmpfs / "other-files"

    def fill_inodes_leaving(n: int) -> None:
        filler_dir.mkdir(exist_ok=True)
        i = 0
        while os.statvfs(small_tmpfs).f_ffree > n:
            (filler_dir / f"f{i}").touch()
            i += 1

    cases = [
        ("weights file", lambda: None, dict(state=_state(2, 8 << 20))),
        ("extra file", lambda: None, dict(state=_state(2, 256 << 10), extra_files=[big_extra])),
        # tmp dir + weights file fit in the 2 inodes left; the marker's temporary file does not.
        ("STABLE marker", lambda: fill_inodes_leaving(2), dict(state=_state(2, 64 << 10))),
    ]
    errors: list[str] = []
    for where, prepare, kwargs in cases:
        prepare()
        poller = Poller(root, 2, timeout=3.0)
        with pytest.raises(CheckpointWriteError) as info:
            writer.write(2, kwargs["state"], extra_files=kwargs.get("extra_files", ()))
        err = info.value
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC, (where, err.errno, str(err))
        assert "No space left on device" in str(err) and "step 2" in str(err) and str(first) in str(err), str(err)
        errors.append(f"{where}: {err}")
        # Nothing partial is visible; the previous checkpoint is intact, byte for byte.
        assert _leftovers(root) == [], (where, _leftovers(root))
        assert not (root / "step_2").exists(), where
        assert latest_stable(root) == (1, first) and _digest(first) == kept, where
        got = poller.join(10)
        assert isinstance(got, CheckpointWaitTimeout), (where, got)
        shutil.rmtree(filler_dir, ignore_errors=True)
        assert os.statvfs(small_tmpfs).f_bfree == free_before, f"{where}: space not given back"
    row.times = len(cases)
    row.hold(f"{len(cases)}/{len(cases)} writes raised CheckpointWriteError (errno ENOSPC) naming the step, the root and the intact step_1")
    row.hold("no STABLE marker on a partial step, no temporaries left, all space given back (statvfs)")
    row.hold(f"orchestrator wait_for_checkpoint timed out {len(cases)}/{len(cases)} times; it never returned step_2")

    # With room again, the same writer writes step 2 and the waiting orchestrator gets it complete.
    poller = Poller(root, 2, timeout=30.0)
    state = _state(2, 512 << 10)
    final = writer.write(2, state)
    got = poller.join(30)
    assert got == final and poller.marker_at_return and poller.digest_at_return == _digest(final)
    assert np.array_equal(load_file(final / WEIGHTS_FILE)["w"], state["w"])
    assert _digest(first) == kept
    row.hold("after space was freed the next write succeeded and the waiting orchestrator got it complete")
    row.lost.clear()


#: The trainer in a child process: one write of a ~48 MB checkpoint; prints phases as it goes.
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from weightwatch.trainer import CheckpointWriter
    root, step, delay_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = np.random.default_rng(step)
    state = {"w": rng.standard_normal((48 << 20) // 8), "b": np.full(16, float(step))}
    writer = CheckpointWriter(root, keep_last=5, inject_delay_ms=delay_ms)
    print("ready", flush=True)
    writer.write(step, state)
    print("done", flush=True)
    """
)


def _wait_until(predicate, timeout: float, interval: float = 0.001) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _weights_in_temporary(root: Path) -> bool:
    for d in root.glob(f"{TMP_STEP_PREFIX}*"):
        f = d / WEIGHTS_FILE
        try:
            if f.stat().st_size > 0:
                return True
        except OSError:
            pass
    return False


def _unmarked_step(root: Path, step: int) -> bool:
    d = root / f"step_{step}"
    return d.is_dir() and not (d / STABLE_MARKER).exists()


def test_trainer_killed_mid_checkpoint_write(tmp_path: Path, reliability) -> None:
    row = reliability
    row.fault = "Trainer SIGKILLed mid checkpoint write"
    row.injected = "SIGKILL to a child process running CheckpointWriter.write (48 MB): in the temp dir, while weights are written, between rename and STABLE"
    root = tmp_path / "ckpts"
    base = CheckpointWriter(root, keep_last=5).write(1, _state(1, 1 << 20))
    kept = _digest(base)
    # (name, inject_delay_ms, when to kill)
    points = [
        ("temporary directory created", 0.0, lambda: any(root.glob(f"{TMP_STEP_PREFIX}*"))),
        ("weights half written", 0.0, lambda: _weights_in_temporary(root)),
        ("renamed, before STABLE", 3000.0, lambda: _unmarked_step(root, 2)),
    ] * 2
    seen: dict[str, int] = {}
    for name, delay, when in points:
        poller = Poller(root, 2, timeout=60.0)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), "2", str(delay)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            hit = _wait_until(when, 30)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert hit, f"never reached the kill point {name!r}"
        assert child.returncode == -signal.SIGKILL
        seen[name] = seen.get(name, 0) + 1
        # Right after the kill: whatever is on disk, it is not a STABLE step_2, and step_1 is intact.
        assert not is_stable(root / "step_2")
        assert _digest(base) == kept and latest_stable(root) == (1, base)
        leftovers_after_kill = _leftovers(root)
        # The next start of a writer cleans up what the killed one left.
        restarted = CheckpointWriter(root, keep_last=5)
        assert _leftovers(root) == [], (name, leftovers_after_kill, _leftovers(root))
        assert poller.result is None, f"the orchestrator returned {poller.result!r} after a kill at {name!r}"
        # The restarted trainer writes step 2; the orchestrator that has been waiting all along gets it whole.
        state = _state(2, 1 << 20)
        final = restarted.write(2, state)
        got = poller.join(30)
        assert got == final and poller.marker_at_return and poller.digest_at_return == _digest(final), (name, got)
        assert np.array_equal(load_file(final / WEIGHTS_FILE)["w"], state["w"])
        shutil.rmtree(final)  # the next round writes step 2 again from scratch
    row.times = len(points)
    row.hold(f"kills at: {', '.join(f'{k} x{v}' for k, v in seen.items())}")
    row.hold("no STABLE step_2 after any kill; step_1 intact byte for byte every time")
    row.hold("the next CheckpointWriter start removed every temporary and unmarked step_2")
    row.hold(f"orchestrator wait_for_checkpoint returned nothing partial: {len(points)}/{len(points)} waits ended only with the complete rewrite")
