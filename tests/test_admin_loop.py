"""The admin client's private loop thread: runs coroutines from any loop, keeps the caller's span as
parent, and lowers the GIL switch interval only while admin calls are in flight."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from weightwatch.orchestrator.admin_loop import ADMIN_SWITCH_INTERVAL_S, AdminLoop, FastSwitching


@pytest.fixture
def default_interval():
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(saved)


def test_fast_switching_nests_and_restores(default_interval):
    sw = FastSwitching(0.001)
    with sw:
        assert sys.getswitchinterval() == pytest.approx(0.001)
        with sw:
            assert sys.getswitchinterval() == pytest.approx(0.001)
        assert sys.getswitchinterval() == pytest.approx(0.001)  # the outer call is still in flight
    assert sys.getswitchinterval() == pytest.approx(default_interval)


def test_fast_switching_never_raises_the_interval_nor_undoes_another_change(default_interval):
    sys.setswitchinterval(0.0005)
    with FastSwitching(0.001):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == pytest.approx(0.0005)

    sys.setswitchinterval(default_interval)
    with FastSwitching(0.001):
        sys.setswitchinterval(0.002)  # the host changed it meanwhile: its choice stays
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_admin_loop_runs_on_its_thread_with_the_callers_span_and_fast_switching(default_interval):
    loop = AdminLoop()
    tracer = TracerProvider().get_tracer("t")
    seen: dict[str, object] = {}

    async def call() -> str:
        seen["thread"] = threading.current_thread().name
        seen["interval"] = sys.getswitchinterval()
        seen["span"] = trace.get_current_span().get_span_context().span_id
        return "done"

    async def main() -> str:
        with tracer.start_as_current_span("weights.update") as span:
            seen["parent"] = span.get_span_context().span_id
            return await loop.run(call())

    try:
        assert asyncio.run(main()) == "done"
    finally:
        loop.close()
    assert seen["thread"] == "weightwatch-admin-loop"
    assert seen["span"] == seen["parent"]
    assert seen["interval"] == pytest.approx(ADMIN_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == pytest.approx(default_interval)


def test_switch_interval_can_be_left_alone(default_interval):
    loop = AdminLoop(switch_interval=None)

    async def call() -> float:
        return sys.getswitchinterval()

    try:
        assert asyncio.run(loop.run(call())) == pytest.approx(default_interval)
    finally:
        loop.close()
