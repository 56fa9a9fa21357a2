"""The demo's run directory and the rollout hand-over between orchestrator and trainer.

One directory holds everything a run produced, so ``weightwatch analyze RUN`` and ``weightwatch tail``
read it as is::

    RUN/{orchestrator,trainer,inference}.log          text logs with the event lines
    RUN/{orchestrator,trainer,inference}.spans.jsonl  finished spans (telemetry.JsonLinesSpanExporter)
    RUN/{orchestrator,trainer,inference}.out          each process's stdout/stderr (vLLM's own output)
    RUN/weights/step_N/                               checkpoints: model.safetensors, config, tokenizer, STABLE
    RUN/rollouts/step_N.jsonl                         completions of orchestrator step N, for trainer step N+1
    RUN/demo.json                                     the settings of the run
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("inference", "trainer", "orchestrator")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> RunLayout:
        layout = cls(Path(root).resolve())
        layout.weights.mkdir(parents=True, exist_ok=True)
        layout.rollouts.mkdir(parents=True, exist_ok=True)
        return layout

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    def log(self, role: str) -> Path:
        return self.root / f"{role}.log"

    def spans(self, role: str) -> Path:
        return self.root / f"{role}.spans.jsonl"

    def out(self, role: str) -> Path:
        return self.root / f"{role}.out"

    def rollout_file(self, step: int) -> Path:
        return self.rollouts / f"step_{int(step)}.jsonl"

    @property
    def settings(self) -> Path:
        return self.root / "demo.json"


def write_rollouts(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a rollout file atomically (temporary name, then rename): the trainer never reads half a batch."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def read_rollouts(path: Path) -> list[dict[str, Any]]:
    """Read a rollout file; lines that are not JSON objects are skipped (hand-edited files stay usable)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
