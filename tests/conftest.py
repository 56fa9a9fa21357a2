"""Shared test fixtures.

Real components (vLLM, Prometheus, Alertmanager, Chromium) are required, not mocked. Outside CI a
missing one skips its tests; with WEIGHTWATCH_REQUIRE_REAL set (CI=true does it through
scripts/test.sh) a missing one fails them.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Session fixtures that start real vLLM servers (tiny_model, vllm_server, plain_vllm_server) live in
# tests/vllm_fixtures.py so every test module shares one server per session.
pytest_plugins = ["vllm_fixtures"]

REQUIRE_REAL = os.environ.get("WEIGHTWATCH_REQUIRE_REAL", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    """Skip (locally) or fail (CI) when a real component is missing."""
    if condition:
        return
    if REQUIRE_REAL:
        pytest.fail(f"required real component missing: {what}", pytrace=False)
    pytest.skip(f"missing real component: {what}")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"binary {name!r} on PATH (apt-get install prometheus prometheus-alertmanager chromium)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def telemetry_reset():
    """Tear weightwatch's per-process telemetry down after a test that calls setup()."""
    import weightwatch

    weightwatch.shutdown()
    yield
    weightwatch.shutdown()
