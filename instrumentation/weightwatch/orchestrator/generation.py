"""Generation batches and rollout hygiene of the orchestrator.

* ``GenerationTracker``: times each batch (``gen.batch`` span, ``[gen]`` events,
  ``rl_generation_batch_seconds``) and keeps ``rl_generation_inflight_requests`` true with a
  context manager around each request, so a dashboard shows the load admin calls compete with.
* ``record_rollout``: per step, the truncation ratio and the staleness (current step minus the step
  of the weights that generated the rollouts) next to ``async_level``, so an alert can compare them.

Both never raise into the training loop for telemetry reasons; bad numbers are logged and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from weightwatch import event_metrics, telemetry

_log = logging.getLogger("weightwatch.orchestrator")


class Batch:
    """One generation batch; use as ``with``/``async with``. ``completions`` counts finished requests.

    Requests finished through the tracker while the batch is open count automatically; set
    ``batch.completions`` yourself when your code counts them another way.
    """

    def __init__(self, tracker: GenerationTracker, target_batch: int, attributes: dict[str, Any] | None = None):
        self.tracker = tracker
        self.target_batch = int(target_batch)
        self.completions = 0
        self.dur_ms: float | None = None
        self._attributes = attributes or {}
        self._span: trace.Span | None = None
        self._token: object | None = None
        self._t0 = 0.0

    def __enter__(self) -> Batch:
        tracer = telemetry.get().tracer("weightwatch.orchestrator")
        self._span = tracer.start_span("gen.batch", attributes={"rl.target_batch": self.target_batch, **self._attributes})
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        self._t0 = time.perf_counter()
        self.tracker._open(self)
        event_metrics.emit("gen.batch.start", inflight=self.tracker.inflight, target_batch=self.target_batch)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.dur_ms = (time.perf_counter() - self._t0) * 1000.0
        self.tracker._close(self)
        inflight = self.tracker.inflight
        span = self._span
        try:
            event_metrics.emit("gen.batch.done", completions=self.completions, dur_ms=self.dur_ms, inflight=inflight)
            if span is not None:
                span.set_attribute("rl.completions", self.completions)
                span.set_attribute("rl.inflight", inflight)
                span.set_attribute("rl.dur_ms", round(self.dur_ms, 3))
                if exc is not None:
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        finally:
            if self._token is not None:
                try:
                    otel_context.detach(self._token)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - exited in another context; the span still ends
                    pass
            if span is not None:
                span.end()

    async def __aenter__(self) -> Batch:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)


class GenerationTracker:
    """In-flight requests and batch timing of one orchestrator (thread-safe; one per process is typical)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._open_batches: list[Batch] = []

    @property
    def inflight(self) -> int:
        return self._inflight

    def batch(self, target_batch: int, **attributes: Any) -> Batch:
        """A context manager timing one batch of ``target_batch`` requests."""
        if not isinstance(target_batch, int) or target_batch < 0:
            raise ValueError(f"target_batch must be an int >= 0, got {target_batch!r}")
        return Batch(self, target_batch, {f"rl.{k}": v for k, v in attributes.items()})

    @contextmanager
    def request(self) -> Iterator[None]:
        """Wrap one generation request (works inside ``async`` code too): in-flight gauge up, then down.

        A request that ends without an exception counts as a completion of every open batch.
        """
        self._add(1)
        ok = False
        try:
            yield
            ok = True
        finally:
            self._add(-1, completed=ok)

    def _add(self, delta: int, completed: bool = False) -> None:
        with self._lock:
            self._inflight += delta
            value = self._inflight
            if completed:
                for b in self._open_batches:
                    b.completions += 1
        telemetry.get().metrics.set("rl_generation_inflight_requests", value)

    def _open(self, batch: Batch) -> None:
        with self._lock:
            self._open_batches.append(batch)

    def _close(self, batch: Batch) -> None:
        with self._lock:
            if batch in self._open_batches:
                self._open_batches.remove(batch)


@dataclass(frozen=True)
class RolloutStats:
    """What ``record_rollout`` recorded for one step."""

    step: int
    ckpt_step: int
    truncated_ratio: float | None
    staleness: int
    async_level: int | None

    @property
    def too_stale(self) -> bool:
        return self.async_level is not None and self.staleness > self.async_level


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def record_rollout(step: int, ckpt_step: int, truncated: int, total: int, async_level: int | None = None) -> RolloutStats | None:
    """Record one step's rollout hygiene: gauges, the ``[rollout]`` event; returns what was recorded.

    ``truncated`` of ``total`` completions hit max_tokens. Bad input is logged (with the reason) and
    returns None instead of raising: telemetry must never stop a training run.
    """
    try:
        step_i, ckpt_i = _as_int("step", step), _as_int("ckpt_step", ckpt_step)
        trunc_i, total_i = _as_int("truncated", truncated), _as_int("total", total)
        level = None if async_level is None else _as_int("async_level", async_level)
        if trunc_i > total_i:
            raise ValueError(f"truncated ({trunc_i}) > total ({total_i})")
    except ValueError as exc:
        _log.warning("weightwatch: record_rollout ignored bad input: %s", exc)
        return None
    ratio = trunc_i / total_i if total_i else None  # no completions: the ratio is unknown, not 0
    staleness = step_i - ckpt_i
    extra: dict[str, Any] = {"truncated": trunc_i, "total": total_i}
    if level is not None:
        extra["async_level"] = level
    event_metrics.emit(  # the gauges (truncation, staleness, steps, async level) come from the event's table
        "rollout", trunc_pct=None if ratio is None else ratio * 100.0, current_step=step_i, ckpt_step=ckpt_i, staleness=staleness, **extra
    )
    stats = RolloutStats(step_i, ckpt_i, ratio, staleness, level)
    if stats.too_stale:
        _log.warning("weightwatch: step %d uses weights of step %d: staleness %d > async_level %d", step_i, ckpt_i, staleness, level)
    elif staleness < 0:
        _log.warning("weightwatch: step %d reports ckpt_step %d from the future (staleness %d)", step_i, ckpt_i, staleness)
    return stats
