"""Atomic checkpoint writer: a reader never sees half a checkpoint.

Layout under ``root``::

    root/step_N/model.safetensors   (+ config/tokenizer files copied from ``extra_files``)
    root/step_N/STABLE              written last; its presence means the directory is complete

Order of operations (why each step exists):

1. write everything into ``root/.tmp-step_N-<random>/`` (same filesystem, so the rename is atomic);
2. fsync every file and the temporary directory (the data is on disk before it gets its final name);
3. rename to ``root/step_N`` and fsync ``root`` (the name is durable);
4. write ``STABLE`` (fsync file and directory) last: pollers such as the orchestrator wait for it;
5. delete all but the newest ``keep_last`` stable checkpoints.

Each write records the ``ckpt.write`` span, the ``[ckpt] write.done`` event and the trainer metrics
``rl_checkpoint_write_seconds``, ``rl_checkpoint_bytes`` and ``rl_trainer_step``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weightwatch import event_metrics, telemetry
from weightwatch.contracts import STABLE_MARKER, STEP_DIR_RE, TMP_STEP_PREFIX, WEIGHTS_FILE, step_dir

_log = logging.getLogger("weightwatch.trainer")

_STEP_DIR = STEP_DIR_RE
_TMP_PREFIX = TMP_STEP_PREFIX


def is_stable(path: str | os.PathLike[str]) -> bool:
    """True when the checkpoint directory is complete (its STABLE marker exists)."""
    return (Path(path) / STABLE_MARKER).is_file()


def stable_steps(root: str | os.PathLike[str]) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and is_stable(entry):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_stable(root: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """The newest complete checkpoint as ``(step, path)``, or None."""
    steps = stable_steps(root)
    return (steps[-1], step_dir(root, steps[-1])) if steps else None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems (and Windows) cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _to_tensors(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate and prepare tensors for safetensors: ('pt' | 'np', name -> contiguous CPU tensor).

    Tied weights (two names sharing storage, like embed_tokens and lm_head) are cloned, because
    safetensors refuses shared storage.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("state_dict must be a non-empty mapping of name -> tensor")
    bad = [k for k in state_dict if not isinstance(k, str) or not k]
    if bad:
        raise ValueError(f"state_dict keys must be non-empty strings, got {bad[:3]!r}")
    values = list(state_dict.values())
    kinds = {type(v).__module__.split(".")[0] for v in values}
    if kinds == {"torch"}:
        import torch

        out: dict[str, Any] = {}
        seen: set[tuple[int, int]] = set()
        for name, t in state_dict.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] is {type(t).__name__}, not a tensor")
            t = t.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset())) if t.numel() else (id(t), 0)
            t = t.clone() if key in seen else t.contiguous()
            seen.add(key)
            out[name] = t
        return "pt", out
    if kinds == {"numpy"}:
        import numpy as np

        out = {}
        for name, a in state_dict.items():
            if not isinstance(a, np.ndarray):
                raise ValueError(f"state_dict[{name!r}] is {type(a).__name__}, not an array")
            out[name] = np.ascontiguousarray(a)
        return "np", out
    names = sorted({type(v).__name__ for v in values})
    raise ValueError(f"state_dict values must all be torch tensors or all numpy arrays, got {', '.join(names)}")


class CheckpointWriter:
    """Writes ``root/step_N`` atomically and keeps the newest ``keep_last``.

    Two lines in a training loop::

        writer = CheckpointWriter("/ckpts", keep_last=3)
        writer.write(step, model.state_dict(), extra_files=[cfg_dir / "config.json"])

    ``inject_delay_ms`` is a demo switch: it sleeps that long after the rename and before the STABLE
    marker, inside the write span, so the orchestrator's checkpoint wait grows like on a slow filesystem.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int = 3,
        *,
        inject_delay_ms: float = 0.0,
        metadata: Mapping[str, str] | None = None,
    ):
        if int(keep_last) < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if inject_delay_ms < 0:
            raise ValueError(f"inject_delay_ms must be >= 0, got {inject_delay_ms}")
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self.inject_delay_ms = float(inject_delay_ms)
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    # ------------------------------------------------------------------ public

    def write(self, step: int, state_dict: Mapping[str, Any], extra_files: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """Write checkpoint ``step``; returns ``root/step_N`` once it is marked STABLE.

        Bad input (negative step, non-tensor values, a missing extra file) raises ValueError before
        anything is touched; an I/O error removes the temporary directory and re-raises. Existing
        checkpoints are never lost on failure.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        kind, tensors = _to_tensors(state_dict)
        extras = [Path(p) for p in extra_files]
        for p in extras:
            if not p.is_file():
                raise ValueError(f"extra file {p} does not exist or is not a file")
            if p.name in (WEIGHTS_FILE, STABLE_MARKER):
                raise ValueError(f"extra file {p} would overwrite {p.name}")

        tele = telemetry.get()
        start = time.perf_counter()
        with tele.tracer("weightwatch.trainer").start_as_current_span("ckpt.write") as span:
            span.set_attribute("rl.step", step)
            final = self._write_atomically(step, kind, tensors, extras)
            nbytes = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
            span.set_attribute("rl.bytes", nbytes)
            write_s = time.perf_counter() - start
            span.set_attribute("rl.write_ms", round(write_s * 1000, 3))
            # the write histogram, rl_checkpoint_bytes and rl_trainer_step come from the event's table
            event_metrics.emit("ckpt.write.done", None, step=step, write_ms=write_s * 1000, bytes=nbytes, path=str(final).replace(" ", "%20"))
        self._prune()
        return final

    # ------------------------------------------------------------------ internals

    def _write_atomically(self, step: int, kind: str, tensors: dict[str, Any], extras: list[Path]) -> Path:
        tmp = self.root / f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
        final = step_dir(self.root, step)
        tmp.mkdir()
        try:
            weights = tmp / WEIGHTS_FILE
            if kind == "pt":
                from safetensors.torch import save_file
            else:
                from safetensors.numpy import save_file  # type: ignore[assignment]
            save_file(tensors, str(weights), metadata=self.metadata)
            for src in extras:
                shutil.copyfile(src, tmp / src.name)
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            if final.exists():
                # Rewriting a step (a restarted trainer): move the old one aside first, then drop it.
                old = self.root / f"{_TMP_PREFIX}{step}-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.inject_delay_ms > 0:
            time.sleep(self.inject_delay_ms / 1000.0)
        marker = final / STABLE_MARKER
        with open(marker, "w", encoding="utf-8") as fh:
            json.dump({"step": step, "t": time.time(), "files": sorted(p.name for p in final.iterdir() if p.name != STABLE_MARKER)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(final)
        return final

    def _prune(self) -> None:
        """Delete the oldest complete checkpoints beyond keep_last (never incomplete ones in progress)."""
        try:
            steps = stable_steps(self.root)
            for old in steps[: max(0, len(steps) - self.keep_last)]:
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)
        except OSError:
            _log.warning("weightwatch: pruning old checkpoints under %s failed", self.root, exc_info=True)

    def _remove_stale_temporaries(self) -> None:
        """A crash mid-write leaves a temporary directory; it was never visible as step_N, so drop it."""
        for entry in self.root.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
