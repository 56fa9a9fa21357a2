"""The catalogue: the contract's metrics are all there, well-formed, and printable for people and machines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from weightwatch import catalogue
from weightwatch.cli import main

# The metric names of the contract in shared/ARCHITECTURE.md.
CONTRACT = {
    "rl_weight_update_wall_seconds", "rl_weight_update_queue_seconds", "rl_weight_update_rpc_seconds",
    "rl_weight_update_pool_wait_seconds", "rl_weight_update_last_queue_seconds", "rl_weight_update_failures_total",
    "rl_weight_update_last_success_timestamp_seconds", "rl_checkpoint_wait_seconds", "rl_generation_batch_seconds",
    "rl_generation_inflight_requests", "rl_rollout_truncated_ratio", "rl_rollout_staleness_steps", "rl_orchestrator_step",
    "rl_checkpoint_step", "rl_async_level", "rl_checkpoint_write_seconds", "rl_checkpoint_bytes", "rl_trainer_step",
    "rl_admin_server_seconds", "rl_admin_rpc_seconds", "rl_http_inflight_requests", "rl_event_loop_lag_seconds",
}


def test_contract_metrics_are_catalogued() -> None:
    assert CONTRACT <= set(catalogue.METRICS_BY_NAME)


def test_metric_specs_are_well_formed() -> None:
    for m in catalogue.METRICS:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", m.name), m.name
        assert m.help
        if m.type == "histogram" and m.unit == "seconds":
            assert m.name.endswith("_seconds") and m.buckets
            assert m.buckets[0] == 0.001 and m.buckets[-1] == 600.0  # 1 ms to 10 min
            assert list(m.buckets) == sorted(m.buckets)
        elif m.type == "histogram":  # a count (requests held at a pause): named for its unit, count buckets
            assert m.name.endswith("_" + m.unit) and m.buckets == catalogue.COUNT_BUCKETS
        if m.type == "counter":
            assert m.name.endswith("_total")
    assert catalogue.METRICS_BY_NAME["rl_weight_update_queue_seconds"].labels == ("op", "server")
    assert catalogue.METRICS_BY_NAME["rl_http_inflight_requests"].labels == ("lane",)


def test_catalogue_json_lists_every_metric_with_its_fields(capsys) -> None:
    assert main(["catalogue", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in data["metrics"]}
    assert set(by_name) == set(catalogue.METRICS_BY_NAME)
    for m in by_name.values():
        assert set(m) >= {"name", "type", "unit", "labels", "help"}
    assert {s["name"] for s in data["spans"]} >= {"weights.update", "engine.rpc", "ckpt.write", "ckpt.wait", "gen.batch"}
    assert {e["key"] for e in data["events"]} == {e.key for e in catalogue.EVENTS}


def test_catalogue_table_from_the_installed_command() -> None:
    out = subprocess.run([sys.executable, "-m", "weightwatch", "catalogue"], capture_output=True, text=True, check=True).stdout
    for name in CONTRACT:
        assert name in out
    assert "[weights][TID] client.done" in out
