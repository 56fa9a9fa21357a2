"""Fix validation: two runs of the same workload, before and after a fix such as the admin lane.

A fix of the front-end queue is validated when, afterwards, queue p99 is under the 300 ms threshold,
the engine reload (rpc p50) did not move beyond noise, and generation throughput did not drop beyond
noise. Tolerances live in ``rules`` and are documented in docs/analyze.md.
"""

from __future__ import annotations

from typing import Any

from weightwatch.analysis import rules
from weightwatch.analysis.report import Report


def _change(before: float | None, after: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"before": before, "after": after, "delta": None, "ratio": None}
    if before is not None and after is not None:
        out["delta"] = after - before
        out["ratio"] = (after / before) if before else None
    return out


def compare(before: Report, after: Report) -> dict[str, Any]:
    """The change between two runs and whether the fix is validated (JSON-ready)."""
    qb, qa = before.measures["queue_ms"], after.measures["queue_ms"]
    rb, ra = before.measures["rpc_ms"], after.measures["rpc_ms"]
    tb, ta = before.generation["throughput_completions_per_s"], after.generation["throughput_completions_per_s"]
    checks: list[dict[str, Any]] = []
    q99 = qa["p99"]
    checks.append({
        "name": "queue p99 after the fix", "ok": q99 is not None and q99 < rules.COMPARE_QUEUE_P99_MAX_MS,
        "value": q99, "limit": f"< {rules.COMPARE_QUEUE_P99_MAX_MS:.0f} ms",
    })
    if rb["p50"] is not None and ra["p50"] is not None:
        tol = max(rules.COMPARE_RPC_REL_TOL * rb["p50"], rules.COMPARE_RPC_ABS_MS)
        checks.append({
            "name": "rpc p50 stable", "ok": abs(ra["p50"] - rb["p50"]) <= tol, "value": ra["p50"] - rb["p50"],
            "limit": f"|change| <= {tol:.1f} ms (max of {100 * rules.COMPARE_RPC_REL_TOL:.0f}% and {rules.COMPARE_RPC_ABS_MS:.0f} ms)",
        })
    else:
        checks.append({"name": "rpc p50 stable", "ok": None, "value": None, "limit": "rpc_ms not measured in both runs"})
    if tb and ta is not None:
        drop = (tb - ta) / tb
        checks.append({
            "name": "generation throughput kept", "ok": drop <= rules.COMPARE_THROUGHPUT_DROP_TOL, "value": -drop,
            "limit": f"drop <= {100 * rules.COMPARE_THROUGHPUT_DROP_TOL:.0f}%",
        })
    else:
        checks.append({"name": "generation throughput kept", "ok": None, "value": None, "limit": "no [gen] batch.done events in both runs"})
    validated = all(c["ok"] is not False for c in checks) and checks[0]["ok"] is True
    return {
        "schema_version": 1,
        "validated": validated,
        "checks": checks,
        "queue_ms": {"p50": _change(qb["p50"], qa["p50"]), "p99": _change(qb["p99"], qa["p99"])},
        "rpc_ms": {"p50": _change(rb["p50"], ra["p50"]), "p99": _change(rb["p99"], ra["p99"])},
        "wall_ms": {"p50": _change(before.measures["wall_ms"]["p50"], after.measures["wall_ms"]["p50"]),
                    "p99": _change(before.measures["wall_ms"]["p99"], after.measures["wall_ms"]["p99"])},
        "throughput_completions_per_s": _change(tb, ta),
        "updates": {"before": len(before.updates), "after": len(after.updates)},
        "queue_breaches": {"before": before.queue_breaches, "after": after.queue_breaches},
        "verdict": {"before": before.verdict.signature, "after": after.verdict.signature},
        "tolerances": {
            "queue_p99_after_max_ms": rules.COMPARE_QUEUE_P99_MAX_MS, "rpc_rel_tol": rules.COMPARE_RPC_REL_TOL,
            "rpc_abs_ms": rules.COMPARE_RPC_ABS_MS, "throughput_drop_tol": rules.COMPARE_THROUGHPUT_DROP_TOL,
        },
    }


def _v(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}{unit}" if abs(x) >= 100 else f"{x:.1f}{unit}"


def render_compare(c: dict[str, Any]) -> str:
    lines = [f"FIX {'VALIDATED' if c['validated'] else 'NOT VALIDATED'}  (verdict before: {c['verdict']['before']}, "
             f"after: {c['verdict']['after']}; updates {c['updates']['before']} -> {c['updates']['after']})", ""]
    lines.append(f"  {'measure':<32} {'before':>10} {'after':>10} {'change':>10}")
    rows = [("queue_ms p50", c["queue_ms"]["p50"]), ("queue_ms p99", c["queue_ms"]["p99"]), ("rpc_ms p50", c["rpc_ms"]["p50"]),
            ("rpc_ms p99", c["rpc_ms"]["p99"]), ("wall_ms p50", c["wall_ms"]["p50"]), ("wall_ms p99", c["wall_ms"]["p99"]),
            ("throughput (completions/s)", c["throughput_completions_per_s"])]
    for name, ch in rows:
        ratio = f" (x{ch['ratio']:.2f})" if ch["ratio"] is not None else ""
        lines.append(f"  {name:<32} {_v(ch['before']):>10} {_v(ch['after']):>10} {_v(ch['delta']):>10}{ratio}")
    lines.append("")
    for ch in c["checks"]:
        state = "n/a " if ch["ok"] is None else ("ok  " if ch["ok"] else "FAIL")
        lines.append(f"  [{state}] {ch['name']}: {_v(ch['value'])} ({ch['limit']})")
    return "\n".join(lines) + "\n"
