"""Trainer side: the atomic checkpoint writer (safetensors + STABLE marker) and its timing.

    from weightwatch.trainer import CheckpointWriter
    writer = CheckpointWriter("/ckpts", keep_last=3)
    writer.write(step, model.state_dict(), extra_files=[...])
"""

from weightwatch.trainer.writer import (
    STABLE_MARKER,
    WEIGHTS_FILE,
    CheckpointWriteError,
    CheckpointWriter,
    is_stable,
    latest_stable,
    stable_steps,
    step_dir,
)

__all__ = ["STABLE_MARKER", "WEIGHTS_FILE", "CheckpointWriteError", "CheckpointWriter", "is_stable", "latest_stable", "stable_steps", "step_dir"]
