"""The engine calls of the admin ops, made the way vLLM 0.32's own dev-mode routes make them.

vLLM's RL router (``vllm/entrypoints/rl/online/api_router.py``, registered only with VLLM_SERVER_DEV_MODE=1)
calls ``engine_client.pause_generation(mode=, clear_cache=)``, ``resume_generation()``, ``is_paused()`` and, for
``/update_weights {"update_info"}``, ``engine_client.update_weights(request=WeightTransferUpdateRequest(...))``
inside ``weight_operation_metrics().record("update")``; its LoRA route (``vllm/entrypoints/serve/lora``)
calls ``OpenAIServingModels.load_lora_adapter``. weightwatch makes the same calls, so a server with the plugin
behaves like vLLM's own routes, timed and without dev mode. These run on vLLM's main loop; the admin lane
reaches them through ``lane.engine_calls_on``.
"""

from __future__ import annotations

import logging
from typing import Any

from weightwatch.inference.admin import EngineCalls

_log = logging.getLogger("weightwatch.inference")


async def update_weights_info(engine_client: Any, update_info: Any) -> None:
    """vLLM's own ``/update_weights {"update_info"}``: its weight-transfer engine, its metric."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    try:
        from vllm.entrypoints.rl.online.metrics import weight_operation_metrics

        recorder = weight_operation_metrics().record("update")
    except Exception:  # noqa: BLE001 - vLLM's own metric is a nicety; the update is what matters
        _log.debug("weightwatch: vLLM's weight operation metrics unavailable", exc_info=True)
        recorder = None
    if recorder is None:
        await engine_client.update_weights(request=WeightTransferUpdateRequest(update_info=update_info))
        return
    with recorder:
        await engine_client.update_weights(request=WeightTransferUpdateRequest(update_info=update_info))


def lora_enabled(engine_client: Any) -> bool:
    """Whether vLLM was started with ``--enable-lora``."""
    config = getattr(engine_client, "vllm_config", None)
    return getattr(config, "lora_config", None) is not None


async def load_lora_adapter(state: Any, fields: dict[str, Any]) -> tuple[int, str]:
    """vLLM's own loader (``OpenAIServingModels.load_lora_adapter``): (status, text) as its route would answer."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    models = getattr(state, "openai_serving_models", None)
    if models is None:
        return 503, "the server has no model registry (openai_serving_models) to load adapters into"
    response = await models.load_lora_adapter(LoadLoRAAdapterRequest(**fields))
    error = getattr(response, "error", None)
    if error is not None:
        return int(getattr(error, "code", 500) or 500), str(getattr(error, "message", response))
    return 200, str(response)


def unfinished_requests(engine_client: Any) -> int | None:
    """Generation requests vLLM's front end holds (running and waiting); None when the client does not say."""
    processor = getattr(engine_client, "output_processor", None)
    counter = getattr(processor, "get_num_unfinished_requests", None)
    return int(counter()) if counter is not None else None


def main_calls(engine_client: Any, state: Any) -> EngineCalls:
    """EngineCalls for handlers on vLLM's own loop (the main port)."""

    async def rpc(method: str, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> Any:
        return await engine_client.collective_rpc(method, args=tuple(args), kwargs=kwargs)

    async def ping(mode: str | None = None) -> Any:
        return await engine_client.is_paused()

    async def pause(mode: str, clear_cache: bool) -> None:
        await engine_client.pause_generation(mode=mode, clear_cache=clear_cache)

    return EngineCalls(
        collective_rpc=rpc,
        ping=ping,
        pause=pause,
        resume=engine_client.resume_generation,
        is_paused=engine_client.is_paused,
        update_info=lambda info: update_weights_info(engine_client, info),
        load_lora=lambda fields: load_lora_adapter(state, fields),
        lora_enabled=lambda: lora_enabled(engine_client),
        inflight=lambda: unfinished_requests(engine_client),
    )
