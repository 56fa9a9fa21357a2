"""Offline analysis of a run: read logs and span files, join each admin call, split each sync, name the bottleneck.

    from weightwatch.analysis import analyze_paths
    report = analyze_paths(["runs/demo"])
    print(report.verdict.signature, report.to_dict()["measures"]["queue_ms"]["p99"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from weightwatch.analysis.join import Update
from weightwatch.analysis.report import SCHEMA_VERSION, Report, Verdict, build_report
from weightwatch.analysis.sources import InputError, expand, read_inputs

__all__ = ["SCHEMA_VERSION", "InputError", "Report", "Update", "Verdict", "analyze_paths"]


def analyze_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    slowest: int = 10,
    model_size: str | None = None,
    async_level: int | None = None,
    jobs: int | None = None,
) -> Report:
    """Analyze files, directories, ``-`` (stdin) or ``.gz`` files. Raises InputError for unreadable inputs."""
    inputs = expand([str(p) for p in paths])
    sources = read_inputs(inputs, jobs=jobs)
    return build_report(sources, slowest=slowest, model_size=model_size, async_level=async_level)
