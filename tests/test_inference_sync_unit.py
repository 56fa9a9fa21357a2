"""Unit tests of the sync routes without vLLM: argument parsing, fault-injection settings, and the handlers on a
real HTTP stack (uvicorn on 127.0.0.1) with an engine made of coroutines the test controls.

vLLM's own behaviour (pause holding streams, update_info reaching its weight-transfer engine) is covered by
test_inference_sync_vllm.py.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

import weightwatch
from test_inference_unit import _Server
from weightwatch.contracts import ADMIN_PATHS, IS_PAUSED_PATH, LIVENESS_PATH
from weightwatch.inference import serve_cli
from weightwatch.inference.admin import AdminError, AdminService, EngineCalls, build_router, lora_fields, pause_arguments, update_info_of
from weightwatch.inference.config import ConfigError, InferenceConfig, parse_inject_delays, parse_inject_fail
from weightwatch.inference.middleware import FirstByteMiddleware

TOKEN = "s3cret"


# --------------------------------------------------------------------------- parsing


def test_pause_arguments_default_to_prime_rl_and_query_wins():
    assert pause_arguments({}, {}) == ("keep", False)
    assert pause_arguments({"mode": "abort", "clear_cache": "true"}, {}) == ("abort", True)
    assert pause_arguments({}, {"mode": "wait", "clear_cache": True}) == ("wait", True)
    assert pause_arguments({"mode": "keep"}, {"mode": "abort"}) == ("keep", False)
    for query, body, reason in [
        ({"mode": "sideways"}, {}, "mode must be one of keep, wait, abort"),
        ({}, {"mode": 3}, "mode must be one of"),
        ({"clear_cache": "perhaps"}, {}, "clear_cache must be true or false"),
        ({}, {"clear_cache": 1}, "clear_cache must be true or false"),
    ]:
        with pytest.raises(AdminError) as err:
            pause_arguments(query, body)
        assert err.value.status == 400 and reason in err.value.reason


def test_update_info_shape_and_lora_fields(tmp_path):
    assert update_info_of({"update_info": {"names": ["a"]}}) == {"names": ["a"]}
    assert update_info_of({"update_info": [{"a": 1}, {"a": 2}]}) == [{"a": 1}, {"a": 2}]
    for body in ({"update_info": "x"}, {"update_info": []}, {"update_info": [1]}, {"update_info": {}, "weight_dir": "d"}):
        with pytest.raises(AdminError) as err:
            update_info_of(body)
        assert err.value.status == 400

    inside = tmp_path / "root" / "adapter"
    inside.mkdir(parents=True)
    root = (tmp_path / "root").resolve()
    got = lora_fields({"lora_name": "p", "lora_path": str(inside), "load_inplace": False}, root)
    assert got == {"lora_name": "p", "lora_path": str(inside.resolve()), "load_inplace": True, "is_3d_lora_weight": False}
    assert lora_fields({"lora_name": "p", "lora_path": "org/adapter"}, None)["lora_path"] == "org/adapter"
    for body, reason in [
        ({"lora_name": "p"}, "lora_path"),
        ({"lora_name": "", "lora_path": str(inside)}, "lora_name"),
        ({"lora_name": "p", "lora_path": str(tmp_path)}, "outside the weights root"),
        ({"lora_name": "p", "lora_path": str(tmp_path / "nope")}, "does not exist"),
        ({"lora_name": "p", "lora_path": str(inside), "rank": 8}, "unknown fields"),
    ]:
        with pytest.raises(AdminError) as err:
            lora_fields(body, root)
        assert err.value.status == 400 and reason in err.value.reason, body


def test_inject_specs_parse_and_bad_ones_are_config_errors():
    assert parse_inject_delays("pause=1500, update_weights=20000") == {"pause": 1500.0, "update_weights": 20000.0}
    assert parse_inject_delays("") == {}
    assert parse_inject_fail("update_weights,resume") == frozenset({"update_weights", "resume"})
    for spec, reason in [
        ("pause", "is not OP=MS"),
        ("pause=soon", "is not a number"),
        ("pause=-1", ">= 0"),
        ("pause=inf", "finite"),
        ("paws=10", "unknown op 'paws'"),
        ("pause=1,pause=2", "given twice"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            parse_inject_delays(spec)
    with pytest.raises(ConfigError, match="unknown op 'reboot'"):
        parse_inject_fail("pause,reboot")


def test_config_reads_the_sync_settings():
    config = InferenceConfig.from_env(
        {
            "WEIGHTWATCH_INJECT_DELAY_MS": "pause=5",
            "WEIGHTWATCH_INJECT_FAIL": "resume",
            "WEIGHTWATCH_INJECT_RPC_DELAY_MS": "7",
            "WEIGHTWATCH_UPDATE_METHOD": "update_weights_from_path",
            "WEIGHTWATCH_LIVENESS_TIMEOUT_S": "2.5",
        }
    )
    assert config.delay_ms("pause") == 5 and config.delay_ms("resume") == 0
    assert config.delay_ms("update_weights") == 7 and config.delay_ms("reload_weights") == 7, "the old variable still works"
    assert config.inject_fail == {"resume"} and config.liveness_timeout_s == 2.5
    assert config.update_call("/w/step_3") == ("update_weights_from_path", ("/w/step_3",), {})
    assert InferenceConfig().update_call("/w/step_3") == ("reload_weights", (), {"weights_path": "/w/step_3"})
    assert (
        InferenceConfig.from_env({"WEIGHTWATCH_INJECT_DELAY_MS": "update_weights=3", "WEIGHTWATCH_INJECT_RPC_DELAY_MS": "7"}).delay_ms(
            "update_weights"
        )
        == 3
    )
    for env, reason in [
        ({"WEIGHTWATCH_INJECT_DELAY_MS": "pause=x"}, "not a number"),
        ({"WEIGHTWATCH_INJECT_FAIL": "nap"}, "unknown op"),
        ({"WEIGHTWATCH_UPDATE_METHOD": "rm -rf"}, "not a method name"),
        ({"WEIGHTWATCH_LIVENESS_TIMEOUT_S": "0"}, "> 0"),
        ({"WEIGHTWATCH_LIVENESS_TIMEOUT_S": "soon"}, "not a number"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            InferenceConfig.from_env(env)


def test_serve_flags_set_the_same_variables_and_refuse_bad_specs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tmp_path), "--inject-delay", "pause=1500", "--inject-delay", "update_weights=20000", "--inject-fail", "resume",
         "--update-method", "update_weights_from_path"]
    )  # fmt: skip
    _, env = serve_cli.build_command(args, {})
    assert env["WEIGHTWATCH_INJECT_DELAY_MS"] == "pause=1500,update_weights=20000"
    assert env["WEIGHTWATCH_INJECT_FAIL"] == "resume"
    assert env["WEIGHTWATCH_UPDATE_METHOD"] == "update_weights_from_path"
    bad = parser.parse_args(["--model", str(tmp_path), "--inject-delay", "pause=later", "--dry-run"])
    assert serve_cli.run(bad) == 2
    assert "--inject-delay" in capsys.readouterr().err
    bad_env = parser.parse_args(["--model", str(tmp_path), "--dry-run"])
    import os

    os.environ["WEIGHTWATCH_INJECT_FAIL"] = "nap"
    try:
        assert serve_cli.run(bad_env) == 2
    finally:
        del os.environ["WEIGHTWATCH_INJECT_FAIL"]
    assert "WEIGHTWATCH_INJECT_FAIL" in capsys.readouterr().err


# --------------------------------------------------------------------------- handlers on a real HTTP stack


class FakeEngine:
    """An engine of coroutines the test controls: records calls, can hang or fail on demand."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.paused = False
        self.fail: dict[str, Exception] = {}
        self.hang = threading.Event()  # set: ping hangs until released
        self.release = threading.Event()
        self.inflight = 3

    async def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise self.fail.pop(name)

    def calls_obj(self) -> EngineCalls:
        async def rpc(method, kwargs, args=()):
            self.calls.append(("rpc", method, tuple(args), dict(kwargs)))
            await self._maybe_fail("rpc")

        async def ping(mode=None):
            self.calls.append(("ping",))
            if self.hang.is_set():
                await asyncio.to_thread(self.release.wait, 30)
            await self._maybe_fail("ping")
            return self.paused

        async def pause(mode, clear_cache):
            self.calls.append(("pause", mode, clear_cache))
            await self._maybe_fail("pause")
            self.paused = True

        async def resume():
            self.calls.append(("resume",))
            await self._maybe_fail("resume")
            self.paused = False

        async def is_paused():
            return self.paused

        async def update_info(info):
            self.calls.append(("update_info", info))

        return EngineCalls(
            collective_rpc=rpc, ping=ping, pause=pause, resume=resume, is_paused=is_paused, update_info=update_info,
            lora_enabled=lambda: False, inflight=lambda: self.inflight,
        )  # fmt: skip


@pytest.fixture
def tele(telemetry_reset):
    return weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)


def _serve(service: AdminService, engine: EngineCalls):
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(build_router(service, lambda: engine))
    return _Server(FirstByteMiddleware(app, admin_paths=ADMIN_PATHS))


def _model(tmp_path: Path) -> str:
    model = tmp_path / "model"
    model.mkdir()
    return str(model)


def test_pause_resume_state_metrics_and_paused_ms(tele, tmp_path):
    fake = FakeEngine()
    service = AdminService(InferenceConfig(admin_token=TOKEN), _model(tmp_path))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sample = tele.registry.get_sample_value
    assert sample("rl_engine_paused") == 0.0, "the gauge exists before any pause"
    with _serve(service, fake.calls_obj()) as url, httpx.Client(base_url=url, headers=auth, timeout=15) as client:
        r = client.post("/resume")
        assert r.status_code == 200 and r.json()["paused_ms"] is None and r.json()["op"] == "resume"
        r = client.post("/pause", params={"mode": "abort", "clear_cache": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body == {**body, "status": "ok", "op": "pause", "paused": True, "inflight": 3, "mode": "abort", "clear_cache": True}
        assert "rpc;dur=" in r.headers["server-timing"] and "server;dur=" in r.headers["server-timing"]
        assert sample("rl_engine_paused") == 1.0
        assert sample("rl_engine_pause_inflight_requests_count") == 1 and sample("rl_engine_pause_inflight_requests_sum") == 3
        assert client.post("/pause").json()["already_paused"] is True
        assert sample("rl_engine_pause_inflight_requests_count") == 1, "a repeated pause is not a new pause"
        assert client.get(IS_PAUSED_PATH).json()["is_paused"] is True
        r = client.post("/resume")
        assert r.status_code == 200 and r.json()["paused_ms"] > 0
        assert sample("rl_engine_paused") == 0.0 and sample("rl_engine_paused_seconds_count") == 1
        assert fake.calls[:2] == [("resume",), ("pause", "abort", True)] and fake.calls[2] == ("pause", "keep", False)
        for op in ("pause", "resume", "is_paused"):
            assert sample("rl_admin_server_seconds_count", {"op": op}) >= 1
            assert sample("rl_admin_rpc_seconds_count", {"op": op}) >= 1

        # Engine failure: 5xx with the cause, the state stays what the engine says, the server keeps serving.
        fake.fail["pause"] = RuntimeError("scheduler on fire")
        r = client.post("/pause")
        assert r.status_code == 500 and "engine pause_generation failed: RuntimeError: scheduler on fire" in r.json()["error"]
        assert sample("rl_engine_paused") == 0.0
        assert client.get(LIVENESS_PATH).status_code == 200

        # update_info goes to the engine's own call; the weight_dir shape takes the configured method.
        r = client.post("/update_weights", json={"update_info": {"names": ["w"]}})
        assert r.status_code == 200 and r.json()["shape"] == "update_info" and fake.calls[-1] == ("update_info", {"names": ["w"]})
        r = client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tmp_path)})
        assert r.status_code == 400 and "LoRA is not enabled" in r.json()["error"]
        for path in sorted(ADMIN_PATHS):
            method = "GET" if path in (IS_PAUSED_PATH, LIVENESS_PATH) else "POST"
            assert httpx.request(method, f"{url}{path}", timeout=15).status_code == 401, path


def test_injected_delay_and_failure_and_liveness_timeout(tele, tmp_path):
    fake = FakeEngine()
    config = InferenceConfig(inject_delay_ms={"pause": 300.0}, inject_fail=frozenset({"resume", "update_weights"}), liveness_timeout_s=0.5)
    step = tmp_path / "step_1"
    step.mkdir()
    from test_inference_unit import MODEL, _write_safetensors

    _write_safetensors(step / "model.safetensors", MODEL)
    service = AdminService(config, _model(tmp_path))
    with _serve(service, fake.calls_obj()) as url, httpx.Client(base_url=url, timeout=15) as client:
        r = client.post("/pause")
        assert r.status_code == 200 and r.json()["rpc_ms"] >= 250.0, (
            "the delay is inside the engine call (asyncio timers may fire a hair early)"
        )
        r = client.post("/resume")
        assert r.status_code == 500 and "injected failure of resume" in r.json()["error"]
        assert fake.calls == [("pause", "keep", False)], "an injected failure never reaches the engine"
        assert tele.registry.get_sample_value("rl_engine_paused") == 1.0, "still paused: the resume failed"
        r = client.post("/update_weights", json={"weight_dir": str(step)})
        assert r.status_code == 500 and "injected failure of update_weights" in r.json()["error"]
        assert r.json()["restored_weights"] == service.last_good and len(fake.calls) == 1, "no restore: the engine was never touched"

        fake.hang.set()
        r = client.get(LIVENESS_PATH)
        assert r.status_code == 503 and r.json()["error"] == "engine_unresponsive"
        assert r.json()["server_ms"] >= 450.0
        fake.release.set()
        fake.hang.clear()
        fake.fail["ping"] = RuntimeError("EngineCore died")
        assert client.get(LIVENESS_PATH).json()["error"] == "engine_unresponsive"
        assert client.get(LIVENESS_PATH).status_code == 200


def test_update_method_of_a_worker_extension_gets_the_directory_positionally(tele, tmp_path):
    from test_inference_unit import MODEL, _write_safetensors

    step = tmp_path / "step_2"
    step.mkdir()
    _write_safetensors(step / "model.safetensors", MODEL)
    fake = FakeEngine()
    service = AdminService(InferenceConfig(update_method="update_weights_from_path"), _model(tmp_path))
    with _serve(service, fake.calls_obj()) as url:
        r = httpx.post(f"{url}/update_weights", json={"weight_dir": str(step)}, timeout=15)
        assert r.status_code == 200 and r.json()["method"] == "update_weights_from_path"
        assert fake.calls == [("rpc", "update_weights_from_path", (str(step.resolve()),), {})]
        r = httpx.post(f"{url}/reload_weights", timeout=15)  # the model's own weights: always vLLM's reload_weights
        assert r.status_code == 200 and fake.calls[-1][:2] == ("rpc", "reload_weights")
