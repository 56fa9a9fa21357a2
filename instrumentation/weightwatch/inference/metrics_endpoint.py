"""``GET /metrics`` with content negotiation, replacing vLLM's text-only route of the same path.

vLLM 0.32 serves its registry through prometheus-fastapi-instrumentator, which always answers in the
classic text format, so exemplars (trace ids on histogram buckets) never reach Prometheus. This route
serves the same registry (vLLM's ``get_prometheus_registry()``: the default one, or a multiprocess
collector when ``PROMETHEUS_MULTIPROC_DIR`` is set) and answers OpenMetrics, exemplars included,
when the scraper asks for it, as Prometheus does.

prometheus-client 0.26's OpenMetrics writer, with its default ``escaping=underscores``, rewrites the
sample names ``vllm:x`` to ``vllm_x`` but leaves ``# TYPE vllm:x``, which breaks the family; names
with colons are valid classic names, so this route writes them unescaped (``allow-utf-8``, which only
quotes names outside the classic character set; vLLM and weightwatch have none).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response


def _registry() -> Any:
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()
    except Exception:  # noqa: BLE001 - outside vLLM (unit tests), the default registry
        import prometheus_client

        return prometheus_client.REGISTRY


OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def choose_encoder(accept: str) -> tuple[Callable[[Any], bytes], str]:
    """OpenMetrics (with exemplars) when the scraper accepts it, else the classic text format."""
    from prometheus_client import exposition, openmetrics

    if any(part.split(";")[0].strip() == "application/openmetrics-text" for part in accept.split(",")):
        return partial(openmetrics.exposition.generate_latest, escaping=openmetrics.exposition.ALLOWUTF8), OPENMETRICS_CONTENT_TYPE
    return exposition.generate_latest, exposition.CONTENT_TYPE_PLAIN_0_0_4


def build_metrics_router(path: str = "/metrics") -> APIRouter:
    router = APIRouter()

    # A plain def: FastAPI runs it in its thread pool, so a large scrape never stalls the event loop.
    @router.get(path, include_in_schema=False)
    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(content=encoder(_registry()), headers={"Content-Type": content_type})

    return router
