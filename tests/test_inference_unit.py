"""Unit tests of the inference side without vLLM: middleware (real uvicorn on 127.0.0.1), weight-dir and
checkpoint validation, settings, and the launcher's command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import weightwatch
from conftest import free_port
from weightwatch.inference import checkpoint as ckpt
from weightwatch.inference.admin import AdminError, validate_weight_dir
from weightwatch.inference.config import ConfigError, InferenceConfig
from weightwatch.inference.middleware import (
    SCOPE_LANE,
    SCOPE_RECV_WALL,
    SCOPE_TRACE_ID,
    FirstByteMiddleware,
    trace_id_from_traceparent,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TID}-00f067aa0ba902b7-01"


# --------------------------------------------------------------------------- a real server for the middleware


class _Server:
    """uvicorn in a thread on a free port (the middleware must be tested on a real HTTP stack)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def inference_telemetry(telemetry_reset):
    return weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)


def _gauge(tele, lane: str) -> float:
    return tele.registry.get_sample_value("rl_http_inflight_requests", {"lane": lane})


def _app(release: threading.Event, entered: threading.Event):
    async def stream(request: Request):
        async def body():
            yield b"first;"
            # Waits until the client has seen the first chunk: a buffering middleware never lets that happen.
            released = await asyncio.to_thread(release.wait, 10)
            yield b"second" if released else b"timeout"

        return StreamingResponse(body(), media_type="text/plain")

    async def admin(request: Request):
        entered.set()
        await asyncio.to_thread(release.wait, 10)
        s = request.scope
        return JSONResponse({"recv_t": s[SCOPE_RECV_WALL], "tid": s[SCOPE_TRACE_ID], "lane": s[SCOPE_LANE]})

    async def plain(request: Request):
        s = request.scope
        return JSONResponse({"recv_t": s[SCOPE_RECV_WALL], "tid": s[SCOPE_TRACE_ID], "lane": s[SCOPE_LANE]})

    app = Starlette(routes=[Route("/stream", stream), Route("/update_weights", admin, methods=["POST"]), Route("/health", plain)])
    return FirstByteMiddleware(app, admin_paths={"/update_weights"}, quiet_paths={"/health"})


def test_streaming_passes_through_unbuffered(inference_telemetry):
    release, entered = threading.Event(), threading.Event()
    with _Server(_app(release, entered)) as url, httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{url}/stream") as resp:
            chunks = resp.iter_raw()
            first = next(chunks)
            assert first == b"first;"
            release.set()
            rest = b"".join(chunks)
    assert rest == b"second"


def test_first_byte_and_event_carry_the_traceparent_trace_id(inference_telemetry, caplog):
    release, entered = threading.Event(), threading.Event()
    release.set()
    caplog.set_level(logging.INFO, logger="weightwatch")
    with _Server(_app(release, entered)) as url, httpx.Client(timeout=15) as client:
        before = time.time()
        body = client.post(f"{url}/update_weights", headers={"traceparent": TRACEPARENT}).json()
        after = time.time()
        untraced = client.post(f"{url}/update_weights").json()
        quiet = client.get(f"{url}/health", headers={"traceparent": TRACEPARENT}).json()
        generation = client.get(f"{url}/stream", headers={"traceparent": TRACEPARENT})
    assert generation.status_code == 200
    assert before <= body["recv_t"] <= after
    assert body["tid"] == TID and body["lane"] == "admin"
    assert untraced["tid"] is None
    assert quiet["lane"] == "inference"
    recv = [weightwatch.events.parse_line(r.getMessage()) for r in caplog.records if "server.recv" in r.getMessage()]
    assert len(recv) == 1, "one event: the traced admin request (untraced, quiet and generation paths emit none)"
    assert recv[0].tid == TID and recv[0]["path"] == "/update_weights"
    assert recv[0]["t"] == pytest.approx(body["recv_t"], abs=1e-3)


def test_inflight_is_counted_per_lane(inference_telemetry):
    release, entered = threading.Event(), threading.Event()
    with _Server(_app(release, entered)) as url, httpx.Client(timeout=15) as client:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=client.post(f"{url}/update_weights")))
        t.start()
        assert entered.wait(10)
        assert _gauge(inference_telemetry, "admin") == 1
        assert _gauge(inference_telemetry, "inference") == 0
        release.set()
        t.join(10)
        assert result["r"].status_code == 200
    assert _gauge(inference_telemetry, "admin") == 0


def test_lane_override_and_bad_lane(inference_telemetry):
    with pytest.raises(ValueError):
        FirstByteMiddleware(lambda *a: None, lane="gpu")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, TID),
        (TRACEPARENT.upper().replace("00-", "00-", 1), TID),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-xyz-00f067aa0ba902b7-01", None),
        ("ff-" + TID + "-00f067aa0ba902b7-01", None),
        ("", None),
        (None, None),
        (b"00-" + TID.encode() + b"-00f067aa0ba902b7-01", TID),
    ],
)
def test_trace_id_from_traceparent(header, expected):
    assert trace_id_from_traceparent(header) == expected


# --------------------------------------------------------------------------- weight dirs and checkpoints


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], truncate: int = 0) -> None:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * max(0, offset - truncate))


MODEL = {"w": ("F32", [4, 2]), "b": ("F32", [2])}


def test_weight_dir_must_be_inside_the_root_with_safetensors(tmp_path):
    root = tmp_path / "root"
    good = root / "step_1"
    good.mkdir(parents=True)
    _write_safetensors(good / "model.safetensors", MODEL)
    empty = root / "empty"
    empty.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    _write_safetensors(outside / "model.safetensors", MODEL)
    (root / "escape").symlink_to(outside)

    assert validate_weight_dir(str(good), root.resolve()) == good.resolve()
    cases = {
        str(outside): "outside the weights root",
        str(root / "escape"): "outside the weights root",
        str(root / "step_1" / ".." / ".." / "outside"): "outside the weights root",
        str(empty): "no *.safetensors",
        str(root / "missing"): "does not exist",
        str(good / "model.safetensors"): "not a directory",
        "": "non-empty string",
    }
    for raw, reason in cases.items():
        with pytest.raises(AdminError) as err:
            validate_weight_dir(raw, root.resolve())
        assert err.value.status == 400 and reason in err.value.reason, raw
    with pytest.raises(AdminError):
        validate_weight_dir(123, root.resolve())


def test_checkpoint_checks_names_shapes_and_truncation(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    _write_safetensors(served / "model.safetensors", MODEL)
    expected = ckpt.describe(served)

    def check(tensors, truncate=0):
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        _write_safetensors(d / "model.safetensors", tensors, truncate)
        ckpt.check_compatible(ckpt.describe(d), expected)

    check(MODEL)  # the same layout passes
    check({"w": ("BF16", [4, 2]), "b": ("F16", [2])})  # other float dtypes pass (vLLM casts)
    for tensors, truncate, reason in [
        ({"w": ("F32", [4, 3]), "b": ("F32", [2])}, 0, "shape mismatch: w is [4, 3], expected [4, 2]"),
        ({"w": ("F32", [4, 2])}, 0, "missing tensors the served model needs: b"),
        ({**MODEL, "extra": ("F32", [1])}, 0, "does not have: extra"),
        ({"w": ("I64", [4, 2]), "b": ("F32", [2])}, 0, "non-float tensors: w (I64)"),
        (MODEL, 3, "beyond the end of the file"),
    ]:
        with pytest.raises(
            ckpt.CheckpointError, match=reason.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
        ):
            check(tensors, truncate)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ckpt.CheckpointError, match="does not fit the file"):
        ckpt.describe(garbage)


# --------------------------------------------------------------------------- settings and launcher


def test_config_from_env(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    c = InferenceConfig.from_env(
        {"WEIGHTWATCH_ADMIN_TOKEN_FILE": str(token_file), "WEIGHTWATCH_ADMIN_PORT": "8001", "WEIGHTWATCH_WEIGHTS_ROOT": str(tmp_path)}
    )
    assert c.admin_token == "s3cret" and c.admin_port == 8001 and c.weights_root == tmp_path.resolve()
    assert InferenceConfig.from_env({}).admin_token is None
    assert InferenceConfig.from_env({}).lane_dispatch == "direct"
    assert InferenceConfig.from_env({}).engine_nice == 0  # a user's own `vllm serve` is left alone unless asked
    assert InferenceConfig.from_env({"WEIGHTWATCH_ENGINE_NICE": "7"}).engine_nice == 7
    assert InferenceConfig.from_env({"WEIGHTWATCH_TRACE_EXCLUDE": " /v1/completions "}).trace_exclude == "/v1/completions"
    assert InferenceConfig.from_env({}).trace_generation == "parent"
    assert InferenceConfig.from_env({"WEIGHTWATCH_TRACE_GENERATION": " ALL "}).trace_generation == "all"
    for env in [
        {"WEIGHTWATCH_TRACE_GENERATION": "sometimes"},
        {"WEIGHTWATCH_ADMIN_TOKEN_FILE": str(tmp_path / "nope")},
        {"WEIGHTWATCH_ADMIN_PORT": "eighty"},
        {"WEIGHTWATCH_INJECT_RPC_DELAY_MS": "-5"},
        {"WEIGHTWATCH_LANE_DISPATCH": "sometimes"},
        {"WEIGHTWATCH_ENGINE_NICE": "high"},
        {"WEIGHTWATCH_ENGINE_NICE": "-5"},
        {"WEIGHTWATCH_ENGINE_NICE": "20"},
    ]:
        with pytest.raises(ConfigError):
            InferenceConfig.from_env(env)


def test_serve_command_line(tmp_path):
    from weightwatch.inference import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tmp_path), "--port", "9000", "--weights-root", str(tmp_path), "--", "--max-num-seqs", "8", "--dtype", "bfloat16"]
    )
    cmd, env = serve_cli.build_command(args, {"VLLM_PLUGINS": "other"})
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[-4:] == ["--max-num-seqs", "8", "--dtype", "bfloat16"] and cmd.count("--dtype") == 1
    assert env["VLLM_PLUGINS"] == "other,weightwatch"
    assert env["WEIGHTWATCH_ADMIN_PORT"] == "9001" and env["WEIGHTWATCH_WEIGHTS_ROOT"] == str(tmp_path.resolve())
    args = parser.parse_args(["--model", "m", "--admin-port", "-1"])
    _, env = serve_cli.build_command(args, {"WEIGHTWATCH_ADMIN_PORT": "5"})
    assert "WEIGHTWATCH_ADMIN_PORT" not in env
    # engine priority: the flag wins, then the environment, then the launcher's default
    assert env["WEIGHTWATCH_ENGINE_NICE"] == str(serve_cli.DEFAULT_ENGINE_NICE)
    _, env = serve_cli.build_command(parser.parse_args(["--model", "m"]), {"WEIGHTWATCH_ENGINE_NICE": "3"})
    assert env["WEIGHTWATCH_ENGINE_NICE"] == "3"
    _, env = serve_cli.build_command(parser.parse_args(["--model", "m", "--engine-nice", "0"]), {"WEIGHTWATCH_ENGINE_NICE": "3"})
    assert env["WEIGHTWATCH_ENGINE_NICE"] == "0"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--engine-nice", "20"])
    # generation tracing: the flag wins over the environment, which is passed through untouched otherwise
    _, env = serve_cli.build_command(
        parser.parse_args(["--model", "m", "--trace-generation", "off"]), {"WEIGHTWATCH_TRACE_GENERATION": "all"}
    )
    assert env["WEIGHTWATCH_TRACE_GENERATION"] == "off"
    _, env = serve_cli.build_command(parser.parse_args(["--model", "m"]), {"WEIGHTWATCH_TRACE_GENERATION": "all"})
    assert env["WEIGHTWATCH_TRACE_GENERATION"] == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--trace-generation", "sometimes"])


# --------------------------------------------------------------------------- admin handler without an engine process


def _admin_app(service, engine):
    from fastapi import FastAPI

    from weightwatch.inference.admin import build_router

    app = FastAPI()
    app.include_router(build_router(service, lambda: engine))
    return FirstByteMiddleware(app, admin_paths={"/update_weights", "/reload_weights"})


def test_second_update_gets_409_while_one_runs_and_engine_errors_restore(inference_telemetry, tmp_path):
    """The engine here is a coroutine we control (vLLM's own behaviour is covered by test_inference_vllm)."""
    from weightwatch.inference.admin import AdminService, EngineCalls

    model = tmp_path / "model"
    model.mkdir()
    _write_safetensors(model / "model.safetensors", MODEL)
    step = tmp_path / "step_1"
    step.mkdir()
    _write_safetensors(step / "model.safetensors", MODEL)
    release, entered = threading.Event(), threading.Event()
    calls: list[str] = []
    fail_next: list[bool] = []

    async def rpc(method, kwargs, args=()):
        calls.append(kwargs["weights_path"])
        if fail_next:
            fail_next.pop()
            raise RuntimeError("Worker failed: disk on fire")
        entered.set()
        await asyncio.to_thread(release.wait, 10)

    service = AdminService(InferenceConfig(weights_root=tmp_path.resolve()), str(model))
    with _Server(_admin_app(service, EngineCalls(collective_rpc=rpc))) as url, httpx.Client(timeout=15) as client:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=client.post(f"{url}/update_weights", json={"weight_dir": str(step)})))
        t.start()
        assert entered.wait(10)
        second = httpx.post(f"{url}/reload_weights", timeout=15)
        assert second.status_code == 409 and "another weight update is running" in second.json()["error"]
        release.set()
        t.join(10)
        assert first["r"].status_code == 200
        assert calls == [str(step)], "the refused request never reached the engine"
        assert service.last_good == str(step)
        # The engine fails the next load: 500 with the cause, and the last good weights are loaded back.
        fail_next.append(True)
        failed = client.post(f"{url}/update_weights", json={"weight_dir": str(step)})
        assert failed.status_code == 500
        assert "disk on fire" in failed.json()["error"] and failed.json()["restored_weights"] == str(step)
        assert calls == [str(step), str(step), str(step)], "one failed load, then the restore"


def test_serve_forwards_sigterm_and_exits_with_the_childs_code(tmp_path):
    """``weightwatch serve`` with a real child process standing in for vLLM's server."""
    import os
    import signal
    import subprocess
    import sys

    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n"
    )
    launcher = (
        "import sys\n"
        "from weightwatch.inference import serve_cli\n"
        f"serve_cli.build_command = lambda args, env: ([sys.executable, '-c', {child!r}], env)\n"
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "serve_cli.add_arguments(parser)\n"
        "sys.exit(serve_cli.run(parser.parse_args(['--model', 'm'])))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 7
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tiny_model_is_complete_offline_and_made_once(tmp_path, monkeypatch):
    from weightwatch.inference import tiny_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tiny_model.make_tiny_model(tmp_path / "m", seed=3)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64 == config["head_dim"]
    assert config["dtype"] == "float32" and config["max_position_embeddings"] == 512
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Once upon a time")["input_ids"]
    assert tok.decode(ids) == "Once upon a time" and max(ids) < config["vocab_size"]
    header = ckpt.describe(out)
    assert header["lm_head.weight"].shape == (config["vocab_size"], 128) and header["lm_head.weight"].dtype == "F32"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert tiny_model.make_tiny_model(out, seed=3) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp, "a complete model is reused, not rewritten"
    (out / tiny_model.MARKER).unlink()  # an interrupted make is redone
    tiny_model.make_tiny_model(out, seed=3)
    assert tiny_model.is_complete(out, 3) and not tiny_model.is_complete(out, 4)
