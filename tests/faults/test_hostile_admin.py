"""Fault 4, hostile admin input: no 5xx from bad input, no engine restart, generation and admin keep going.

On the real ``weightwatch serve`` (faults_server) while a separate load process streams completions:
schemathesis, driven by the admin operations of the server's own /openapi.json (positive and negative
cases), on the main port and on the admin lane (the lane serves no schema of its own: the same operations
are used against it); path tricks on weight_dir (``..``, symlinks out of the weights root, loops, very long
names, NUL, non-strings, corrupt and mismatched checkpoints); oversized bodies (declared and chunked); and a
slowloris of 120 slow connections on the lane while a second admin caller and generation must get through.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from faults.support import make_checkpoint, read_ticks, window_rate
from weightwatch.contracts import ADMIN_PATHS, UPDATE_PATH
from weightwatch.orchestrator import AdminClient, AdminTimeouts

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' (schemathesis)")

pytestmark = [pytest.mark.faults, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 20  # per operation, mode and port
SLOW_CLIENTS = 120
SLOW_SECONDS = 20.0
#: The body weightwatch's admin routes read (contracts; FastAPI cannot see it: the routes take the raw Request).
UPDATE_BODY_SCHEMA = {"type": "object", "properties": {"weight_dir": {"type": "string"}}, "required": ["weight_dir"]}


def _engine_pids(server) -> set[int]:  # type: ignore[no-untyped-def]
    out = set()
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _admin_schema(base_url: str) -> tuple[dict[str, Any], list[str]]:
    """The admin operations of the server's /openapi.json; request bodies the schema lacks come from the contract."""
    doc = httpx.get(base_url + "/openapi.json", timeout=120).json()
    paths = {p: v for p, v in doc["paths"].items() if p in ADMIN_PATHS}
    added = []
    for path, ops in paths.items():
        for method, op in ops.items():
            if method == "post" and path == UPDATE_PATH and "requestBody" not in op:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": UPDATE_BODY_SCHEMA}}}
                added.append(f"{method.upper()} {path}")
    return {**doc, "paths": paths}, added


def _fuzz(schema_doc: dict[str, Any], bases: dict[str, str], token: str) -> dict[str, dict[int, int]]:
    """Run schemathesis' generated cases against each base URL; status counts per base."""
    schema = schemathesis.openapi.from_dict(schema_doc)
    statuses: dict[str, dict[int, int]] = {name: {} for name in bases}
    rng = random.Random(4)
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception:  # noqa: BLE001 - an operation without anything to negate
                continue
            for name, base in bases.items():
                _fuzz_one(strategy, name, base, token, rng, statuses[name])
    return statuses


def _fuzz_one(strategy, name: str, base: str, token: str, rng: random.Random, counts: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case) -> None:  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {token}"} if rng.random() < 0.7 else {}
        resp = case.call(base_url=base, headers=headers, timeout=120)
        counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, f"{name} {case.method} {case.path} body={case.body!r:.300}: {resp.status_code} {resp.text[:300]}"

    try:
        run()
    except Unsatisfiable:
        pass  # negative mode of an operation without parameters or body: nothing to make invalid


def _path_tricks(root: Path, tiny_model: Path, tmp: Path) -> list[tuple[str, Any]]:
    outside = tmp / "outside"
    outside.mkdir()
    (root / "link_out").symlink_to(tiny_model, target_is_directory=True)
    (root / "link_up").symlink_to(root.parent, target_is_directory=True)
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "mismatch").mkdir()
    save_file({"not.a.layer": np.zeros((3, 3), dtype=np.float32)}, str(root / "mismatch" / "model.safetensors"))
    good = make_checkpoint(tiny_model, root, 0)
    rel_out = os.path.relpath(tiny_model, root)
    return [
        ("..", {"weight_dir": ".."}),
        ("root/..", {"weight_dir": str(root / "..")}),
        ("root/../../etc", {"weight_dir": str(root / ".." / ".." / "etc")}),
        ("root/<relative way out to a real model>", {"weight_dir": str(root / rel_out)}),
        ("symlink to a real model outside the root", {"weight_dir": str(root / "link_out")}),
        ("symlink to the root's parent", {"weight_dir": str(root / "link_up" / "weights")}),
        ("symlink loop", {"weight_dir": str(root / "loop_a")}),
        ("a file, not a directory", {"weight_dir": str(good / "model.safetensors")}),
        ("directory without safetensors", {"weight_dir": str(root / "empty")}),
        ("corrupt safetensors", {"weight_dir": str(root / "junk")}),
        ("safetensors of another model", {"weight_dir": str(root / "mismatch")}),
        ("5,000-character name", {"weight_dir": "a" * 5000}),
        ("300-character component", {"weight_dir": str(root / ("b" * 300))}),
        ("path over PATH_MAX", {"weight_dir": str(root) + "/x" * 3000}),
        ("NUL byte", {"weight_dir": str(good) + "\x00/../../etc"}),
        ("~", {"weight_dir": "~"}),
        ("~root", {"weight_dir": "~root/.ssh"}),
        ("percent-encoded ..", {"weight_dir": str(root / "%2e%2e")}),
        ("empty string", {"weight_dir": ""}),
        ("whitespace", {"weight_dir": "   "}),
        ("number", {"weight_dir": 7}),
        ("null", {"weight_dir": None}),
        ("list", {"weight_dir": [str(good)]}),
        ("object", {"weight_dir": {"path": str(good)}}),
        ("no weight_dir", {"path": str(good)}),
        ("top-level list", [str(good)]),
        ("outside directory that exists", {"weight_dir": str(outside)}),
    ]


def _oversized(url: str, token: str) -> list[tuple[str, int, float]]:
    """(what, status, seconds) for bodies far over the admin limit."""
    out = []
    h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(timeout=120) as c:
        for mb in (1, 16, 128):
            body = b'{"weight_dir": "' + b"a" * (mb << 20) + b'"}'
            t0 = time.monotonic()
            try:
                status = c.post(url + UPDATE_PATH, content=body, headers=h).status_code
            except httpx.HTTPError:
                status = -1  # the server may close after answering 413 to an unread body: not a 5xx
            out.append((f"{mb} MiB declared", status, time.monotonic() - t0))

        def chunks():  # type: ignore[no-untyped-def]
            yield b'{"weight_dir": "'
            for _ in range(128):
                yield b"a" * (64 << 10)
            yield b'"}'

        t0 = time.monotonic()
        try:
            status = c.post(url + UPDATE_PATH, content=chunks(), headers=h).status_code
        except httpx.HTTPError:
            status = -1
        out.append(("8 MiB chunked (no Content-Length)", status, time.monotonic() - t0))
    return out


class Slowloris:
    """SLOW_CLIENTS connections to host:port, half trickling headers, half trickling a declared body."""

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.sent = 0

    def start(self) -> None:
        for i in range(SLOW_CLIENTS):
            s = socket.create_connection(self.addr, timeout=5)
            if i % 2:
                s.sendall(b"POST /update_weights HTTP/1.1\r\nHost: x\r\n")
            else:
                s.sendall(b"POST /update_weights HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            self.socks.append(s)
        threading.Thread(target=self._trickle, daemon=True).start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            for i, s in enumerate(self.socks):
                try:
                    s.sendall(b"X-a: b\r\n" if i % 2 else b" ")
                    self.sent += 1
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def test_hostile_admin_input(faults_server, tiny_model, tmp_path, reliability) -> None:
    row = reliability
    row.fault = "Hostile admin input"
    row.injected = (
        "schemathesis cases from the server's /openapi.json on the main port and the lane; weight_dir tricks; "
        f"1-128 MiB bodies; {SLOW_CLIENTS} slowloris connections on the lane; 16 streams of load throughout"
    )
    server = faults_server
    assert server.admin_url and server.weights_root and server.admin_token
    root = server.weights_root
    token = server.admin_token
    bases = {"main port": server.base_url, "admin lane": server.admin_url}
    engines_before = _engine_pids(server)
    assert engines_before, "no EngineCore process found under the server"
    ticks = tmp_path / "ticks.txt"
    load = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "bench_inference_load.py"), "--url", server.base_url, "--model", server.model_name,
         "--streams", "16", "--duration", "900", "--warmup", "2", "--max-tokens", "32",
         "--ticks", str(ticks), "--tick-every", "0.5", "--out", str(tmp_path / "load.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    parts: list[tuple[str, float, float]] = []
    try:
        deadline = time.monotonic() + 60
        while not ticks.exists() and time.monotonic() < deadline:
            assert load.poll() is None, load.communicate()[1]
            time.sleep(0.5)

        # A. schemathesis from the server's own OpenAPI description.
        t0 = time.time()
        schema_doc, added = _admin_schema(server.base_url)
        ops = sorted(f"{m.upper()} {p}" for p, v in schema_doc["paths"].items() for m in v)
        assert ops, "the server's /openapi.json lists no admin operation"
        lane_schema = httpx.get(server.admin_url + "/openapi.json", timeout=30).status_code
        statuses = _fuzz(schema_doc, bases, token)
        parts.append(("fuzz", t0, time.time()))
        n_fuzz = sum(sum(v.values()) for v in statuses.values())
        assert all(code < 500 for v in statuses.values() for code in v)
        row.hold(
            f"schemathesis: {n_fuzz} cases on {', '.join(ops)} (positive + negative), no 5xx: "
            + "; ".join(f"{k} {dict(sorted(v.items()))}" for k, v in statuses.items())
        )
        note = f"lane /openapi.json answers {lane_schema}: the main port's description is used for the lane"
        if added:
            note += f"; the description has no request body for {', '.join(added)} (routes read the raw Request), the contract's body schema was added"
        row.hold(note)

        # B. path tricks on weight_dir, both ports.
        t0 = time.time()
        tricks = _path_tricks(root, tiny_model, tmp_path)
        bad: list[str] = []
        h = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=120) as c:
            for name, base in bases.items():
                for what, body in tricks:
                    r = c.post(base + UPDATE_PATH, content=json.dumps(body), headers={**h, "Content-Type": "application/json"})
                    if not 400 <= r.status_code < 500:
                        bad.append(f"{name} {what}: {r.status_code} {r.text[:200]}")
                    elif len(r.content) > 4096:
                        bad.append(f"{name} {what}: {len(r.content)}-byte error answer")
        parts.append(("path tricks", t0, time.time()))
        assert not bad, bad
        row.hold(f"{len(tricks)} weight_dir tricks x 2 ports: all 4xx with a short error (.., symlinks out and loops, 5,000-char names, NUL, corrupt and foreign safetensors)")

        # C. oversized bodies, both ports.
        t0 = time.time()
        big = {name: _oversized(base, token) for name, base in bases.items()}
        parts.append(("oversized bodies", t0, time.time()))
        for name, results in big.items():
            for what, status, _s in results:
                assert status == 413 or status == -1, (name, what, status)
            assert any(status == 413 for _, status, _ in results), (name, results)
        row.hold(
            "oversized bodies (1/16/128 MiB declared, 8 MiB chunked) answered 413 without being read: "
            + "; ".join(f"{n} max {max(s for _, _, s in r):.1f} s" for n, r in big.items())
        )

        # D. slowloris on the lane; a second admin caller and generation must get through.
        ckpt = make_checkpoint(tiny_model, root, 1)
        slow = Slowloris(server.admin_url)
        t0 = time.time()
        slow.start()
        try:
            time.sleep(2.0)

            async def second_caller() -> list[float]:
                walls = []
                async with AdminClient([server.admin_url], timeouts=AdminTimeouts(connect=5, read=60, total=90), token=token) as admin:
                    end = time.monotonic() + SLOW_SECONDS
                    step = 1
                    while time.monotonic() < end:
                        step += 1
                        r = (await admin.update_weights(ckpt, step=step)).servers[0]
                        assert r.ok, r.error
                        walls.append(r.wall_ms)
                        await asyncio.sleep(1.0)
                return walls

            walls = asyncio.run(second_caller())
            still_open = sum(1 for s in slow.socks if s.fileno() != -1)
        finally:
            slow.close()
        parts.append(("slowloris", t0, time.time()))
        assert walls
        row.hold(
            f"slowloris: {SLOW_CLIENTS} slow connections on the lane for {SLOW_SECONDS:.0f} s ({slow.sent} trickles, {still_open} still open); "
            f"a second caller's {len(walls)} updates all ok, wall p50 {sorted(walls)[len(walls) // 2]:.0f} ms, max {max(walls):.0f} ms"
        )
        time.sleep(1.0)
    finally:
        load.terminate()
        try:
            load.wait(30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait(10)

    # After all of it: the engine never restarted, generation kept serving through every part.
    assert server.alive(), server.output_tail()
    assert _engine_pids(server) == engines_before, "the EngineCore process changed: the engine restarted"
    tick_rows = read_ticks(ticks)
    assert tick_rows and tick_rows[-1][2] == 0, f"generation errors: {tick_rows[-1] if tick_rows else None}"
    rates = {what: window_rate(tick_rows, a, b) for what, a, b in parts}
    assert all(r is not None and r > 0 for r in rates.values()), rates
    r = httpx.post(server.admin_url + UPDATE_PATH, json={"weight_dir": str(make_checkpoint(tiny_model, root, 2))}, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    row.times = sum(sum(v.values()) for v in statuses.values()) + 2 * len(tricks) + sum(len(v) for v in big.values()) + SLOW_CLIENTS
    row.hold(
        f"same EngineCore pid(s) {sorted(engines_before)} throughout; 16 streams never errored, tokens/s per part: "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items() if v is not None)
        + "; a valid update afterwards: 200"
    )
