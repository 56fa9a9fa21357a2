"""Admin calls on httpx clients you did not write, measured like AdminClient's (opentelemetry-instrumentation-httpx style).

prime-rl's orchestrator (and most others) has its own ``httpx.AsyncClient`` for ``/pause``, ``/update_weights``
and ``/resume``. ``AdminHTTPXInstrumentor().instrument()`` wraps ``httpx.Client.send`` and
``httpx.AsyncClient.send`` (plain functions with ``__wrapped__``, so ``uninstrument()`` puts the originals
back; wrapt's proxy cost about 4 µs per request here, against well under 1 µs for a plain function);
``instrument_client`` does one client only. A request whose URL path ends with an admin path (``contracts.ADMIN_PATHS``) gets:
a ``weights.update.server`` span (in its sync's phase span), W3C ``traceparent``, the pool wait (httpcore's
``trace`` extension, chained with any the caller set), ``server_ms``/``rpc_ms`` from the answer, the
``client.send``/``client.done`` events and the per-call metrics, written by the same code as AdminClient's
(``admin_record``). The sync's phases are derived from the order of the calls (``sync_phases``).

Every other request (generation) pays one suffix check on its path and nothing else.

What differs from AdminClient: the instrumentor sees HTTP requests, not the caller's retry loop, so each
attempt is its own call (a 503 that the caller retries counts as one failure and then one success);
phase times still run from a server's first call of the phase to its first success.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import types
from collections.abc import Collection
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.trace import SpanKind

from weightwatch import telemetry
from weightwatch.contracts import ADMIN_PATHS, OP_BY_PATH, step_of_dir
from weightwatch.event_metrics import CANCELLED
from weightwatch.orchestrator.admin_record import RECORDED_BY_CALLER, record_done, record_send
from weightwatch.orchestrator.sync_phases import CallInSync, SyncPhases
from weightwatch.orchestrator.timing import PoolWaitProbe

_log = logging.getLogger("weightwatch.orchestrator")

#: Suffixes checked on every request's path (one C-level ``str.endswith`` with a tuple).
_SUFFIXES = tuple(sorted(ADMIN_PATHS, key=len, reverse=True))
_CLIENT_FLAG = "_is_instrumented_by_weightwatch_admin"
_WRAPPER_FLAG = "_weightwatch_admin_wrapper"


def admin_op(path: str) -> str | None:
    """The admin op of a URL path (by suffix), or None for every other request."""
    if not path.endswith(_SUFFIXES):
        return None
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            return OP_BY_PATH[suffix]
    return None


def _raw_path(request: Any) -> str:
    """The request's URL path as sent (percent-encoded; admin paths have no escapes), cheaply.

    ``httpx.URL.path`` decodes on every access (about a microsecond); the parsed reference's path is
    an attribute read. Anything that is not an httpx request gives "" (passed through unrecorded).
    """
    try:
        return request.url._uri_reference.path
    except AttributeError:
        try:
            return request.url.path
        except AttributeError:
            return ""


def _step_of_request(op: str, request: httpx.Request) -> int | None:
    """The step of a transfer: ``step_N`` of its ``weight_dir`` (or of a LoRA adapter's path or name)."""
    if op not in ("update_weights", "load_lora_adapter"):
        return None
    try:
        body = json.loads(request.content or b"null")
    except (ValueError, httpx.RequestNotRead):
        return None
    if not isinstance(body, dict):
        return None
    for key in ("weight_dir", "lora_path", "lora_name"):
        value = body.get(key)
        if isinstance(value, str) and value:
            step = step_of_dir(value.rstrip("/"))
            if step is not None:
                return step
    return None


class _Call:
    """One admin request in flight through an instrumented client."""

    __slots__ = ("op", "url", "server", "label", "place", "span", "tid", "probe", "t0", "budget_s")

    def __init__(self, rec: AdminHTTPXInstrumentor, op: str, request: httpx.Request):
        url = request.url
        self.op = op
        self.label = url.netloc.decode("ascii", "replace")
        self.server = f"{url.scheme}://{self.label}"
        self.url = str(url.copy_with(query=None, fragment=None))
        self.place: CallInSync = rec.phases.on_send(op, self.label, _step_of_request(op, request))
        tracer = rec.tracer()
        self.span = tracer.start_span(
            "weights.update.server",
            context=self.place.context,  # the sync's phase span, or (None) the caller's current span
            kind=SpanKind.CLIENT,
            attributes={"rl.op": op, "rl.server": self.label, "url.full": self.url, "rl.pool": "caller"},
        )
        ctx = self.span.get_span_context()
        self.tid = format(ctx.trace_id, "032x") if ctx.is_valid else telemetry.current_tid()
        timeout = request.extensions.get("timeout")
        self.budget_s = timeout.get("read") if isinstance(timeout, dict) else None
        self.probe = PoolWaitProbe()
        self.t0 = 0.0

    def send(self, request: httpx.Request, is_async: bool) -> None:
        with trace.use_span(self.span, end_on_exit=False):
            propagate.inject(request.headers)
        user_trace = request.extensions.get("trace")
        request.extensions = {**request.extensions, "trace": self.probe.chained_async(user_trace) if is_async else self.probe.chained_sync(user_trace)}
        record_send(
            self.tid, self.url, self.op, attempt=self.place.attempt, step=self.place.step, budget_s=self.budget_s,
            phase=self.place.phase, pool="caller", mode=request.url.params.get("mode"),
        )
        self.probe.start = self.t0 = time.perf_counter()

    def done(self, rec: AdminHTTPXInstrumentor, response: httpx.Response | None, exc: BaseException | None, streamed: bool) -> None:
        wall_ms = (time.perf_counter() - self.t0) * 1000.0
        status = body = None
        headers: Any = {}
        reason = error = None
        if response is not None:
            status, headers = response.status_code, response.headers
            if not streamed:
                try:
                    body = response.json()
                except Exception:  # noqa: BLE001 - not JSON: timings may still be in Server-Timing
                    body = None
            if status >= 500:
                reason, error = "http_5xx", f"HTTP {status} from {self.url}"
            elif status >= 400:
                reason, error = "http_4xx", f"HTTP {status} from {self.url}"
        elif exc is not None:
            if isinstance(exc, httpx.TimeoutException):
                reason = "timeout"
            elif isinstance(exc, httpx.TransportError):
                reason = "transport"
            elif isinstance(exc, BaseException) and not isinstance(exc, Exception):
                reason = CANCELLED
            else:
                reason = "transport"
            error = f"{type(exc).__name__}: {exc}"
        ok = reason is None and status is not None
        phase_ms, finished = rec.phases.on_done(self.place, self.label, ok)
        pool_wait_ms = self.probe.pool_wait_ms(time.perf_counter() if reason in ("timeout", CANCELLED) else None)
        with trace.use_span(self.span, end_on_exit=True):
            record_done(
                self.span, self.tid, server=self.server, label=self.label, url=self.url, op=self.op, status=status, body=body,
                headers=headers, reason=reason, error=error, wall_ms=wall_ms, pool_wait_ms=pool_wait_ms, attempts=self.place.attempt,
                step=self.place.step, phase=self.place.phase, phase_ms=phase_ms,
            )
        if finished is not None:
            rec.phases.finish(finished)


class AdminHTTPXInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``instrument()`` / ``uninstrument()`` for every httpx client; ``instrument_client`` for one.

    Options of ``instrument``: ``tracer_provider`` (default: weightwatch's, ``weightwatch.setup``).
    """

    _tracer_provider: trace.TracerProvider | None = None
    phases: SyncPhases = SyncPhases()

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("httpx >= 0.23",)

    _tracer_cache: tuple[Any, trace.Tracer] | None = None

    def tracer(self) -> trace.Tracer:
        provider = self._tracer_provider or telemetry.get().tracer_provider
        cached = self._tracer_cache
        if cached is not None and cached[0] is provider:  # get_tracer builds a new Tracer each call (~15 µs)
            return cached[1]
        tracer = provider.get_tracer("weightwatch.orchestrator")
        self._tracer_cache = (provider, tracer)
        return tracer

    def _instrument(self, **kwargs: Any) -> None:
        self._configure(kwargs.get("tracer_provider"))
        httpx.AsyncClient.send = self.async_send_wrapper(httpx.AsyncClient.send)  # type: ignore[method-assign]
        httpx.Client.send = self.sync_send_wrapper(httpx.Client.send)  # type: ignore[method-assign]

    def _uninstrument(self, **kwargs: Any) -> None:
        for cls in (httpx.AsyncClient, httpx.Client):
            current = cls.__dict__.get("send")
            if getattr(current, _WRAPPER_FLAG, False):
                cls.send = current.__wrapped__  # type: ignore[method-assign, union-attr]
        self.phases.close_open()

    def _configure(self, tracer_provider: trace.TracerProvider | None) -> None:
        if tracer_provider is not None:
            self._tracer_provider = tracer_provider
        self.phases._tracer_provider = self._tracer_provider

    def instrument_client(self, client: httpx.Client | httpx.AsyncClient, tracer_provider: trace.TracerProvider | None = None) -> None:
        """Instrument this one client (the global ``instrument()`` is not needed)."""
        if getattr(client, _CLIENT_FLAG, False):
            _log.warning("weightwatch: this httpx client is instrumented already")
            return
        self._configure(tracer_provider)

        def class_send(self_: Any, *args: Any, **kwargs: Any) -> Any:
            return type(self_).send(self_, *args, **kwargs)  # looked up per call: the global patch may come and go

        wrapper = self.async_send_wrapper(class_send) if isinstance(client, httpx.AsyncClient) else self.sync_send_wrapper(class_send)
        client.send = types.MethodType(wrapper, client)  # type: ignore[method-assign]
        setattr(client, _CLIENT_FLAG, True)

    def uninstrument_client(self, client: httpx.Client | httpx.AsyncClient) -> None:
        """Take this client's instrumentation off again."""
        if getattr(client, _CLIENT_FLAG, False):
            client.__dict__.pop("send", None)
            setattr(client, _CLIENT_FLAG, False)

    # ------------------------------------------------------------------ the wrappers

    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Call | None, httpx.Request | None]:
        """The recording of an admin request, or (None, request) for every other request."""
        request = args[1]
        op = admin_op(_raw_path(request))
        if op is None or RECORDED_BY_CALLER.get():
            return None, request
        try:
            return _Call(self, op, request), request
        except Exception:  # noqa: BLE001 - never break the caller's request
            _log.warning("weightwatch: cannot record an admin call; sending it unrecorded", exc_info=True)
            return None, request

    def _finish(self, call: _Call, response: httpx.Response | None, exc: BaseException | None, streamed: bool) -> None:
        try:
            call.done(self, response, exc, streamed)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot record the end of an admin call", exc_info=True)

    def async_send_wrapper(self, original: Any) -> Any:
        """``AsyncClient.send`` recording admin requests; every other request costs one path check.

        Not a coroutine itself: a generation request gets the original coroutine back, no frame of ours.
        """
        return self._send_wrapper(original, self._record_async)

    def sync_send_wrapper(self, original: Any) -> Any:
        """``Client.send``, the same for the synchronous client."""
        return self._send_wrapper(original, self._record_sync)

    @staticmethod
    def _send_wrapper(original: Any, record: Any) -> Any:
        @functools.wraps(original)
        def send(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                path = request.url._uri_reference.path
            except AttributeError:
                path = _raw_path(request)
            if not path.endswith(_SUFFIXES):
                return original(client, request, *args, **kwargs)
            return record(original, (client, request, *args), kwargs)

        setattr(send, _WRAPPER_FLAG, True)
        return send

    async def _record_async(self, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call, request = self._start(args, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        assert request is not None
        token = RECORDED_BY_CALLER.set(True)  # a second wrapper (global + per client) lets it through
        try:
            call.send(request, is_async=True)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot prepare an admin call's recording", exc_info=True)
        try:
            response = await wrapped(*args, **kwargs)
        except BaseException as exc:
            self._finish(call, None, exc, False)
            raise
        finally:
            RECORDED_BY_CALLER.reset(token)
        self._finish(call, response, None, bool(kwargs.get("stream", False)))
        return response

    def _record_sync(self, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call, request = self._start(args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        assert request is not None
        token = RECORDED_BY_CALLER.set(True)
        try:
            call.send(request, is_async=False)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot prepare an admin call's recording", exc_info=True)
        try:
            response = wrapped(*args, **kwargs)
        except BaseException as exc:
            self._finish(call, None, exc, False)
            raise
        finally:
            RECORDED_BY_CALLER.reset(token)
        self._finish(call, response, None, bool(kwargs.get("stream", False)))
        return response
