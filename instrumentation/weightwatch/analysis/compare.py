"""Fix validation: two runs of the same workload, before and after a fix such as the admin lane.

A fix is validated when, afterwards, queue p99 is under the 300 ms threshold, the engine reload (rpc p50)
did not move beyond noise, generation throughput did not drop beyond noise and, for runs with weight syncs,
no phase got slower beyond noise (p95 of the slowest server per sync, phase by phase) and no sync signature
is left. Tolerances live in ``rules`` and are documented in docs/analyze.md.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from weightwatch.analysis import rules
from weightwatch.analysis.report import Report
from weightwatch.analysis.stats import summarize
from weightwatch.catalogue import PHASE_OF_OP, PHASES


def _change(before: float | None, after: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"before": before, "after": after, "delta": None, "ratio": None}
    if before is not None and after is not None:
        out["delta"] = after - before
        out["ratio"] = (after / before) if before else None
    return out


def _transfer_rpc(report: Report) -> dict[str, Any]:
    """rpc_ms of the calls that load weights (a seed-era update, or a sync's transfer): the engine reload."""
    f = report.updates.frame
    loads = [op for op, ph in PHASE_OF_OP.items() if ph == "transfer"]
    return summarize(f.filter(pl.col("op").is_null() | pl.col("op").is_in(loads))["rpc_ms"].drop_nulls().to_list())


def compare(before: Report, after: Report) -> dict[str, Any]:
    """The change between two runs and whether the fix is validated (JSON-ready)."""
    qb, qa = before.measures["queue_ms"], after.measures["queue_ms"]
    rb, ra = _transfer_rpc(before), _transfer_rpc(after)
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
    phases: dict[str, Any] = {}
    tb_, ta_ = before.syncs.phase_table()["per_sync"], after.syncs.phase_table()["per_sync"]
    for ph in PHASES:
        phases[ph] = {q: _change(tb_[ph][q], ta_[ph][q]) for q in ("p50", "p95", "p99")}
        b95, a95 = tb_[ph]["p95"], ta_[ph]["p95"]
        if b95 is not None and a95 is not None:
            tol = max(rules.COMPARE_RPC_REL_TOL * b95, rules.COMPARE_RPC_ABS_MS)
            checks.append({"name": f"{ph} phase p95 not slower", "ok": a95 - b95 <= tol, "value": a95 - b95,
                           "limit": f"change <= {tol:.1f} ms (max of {100 * rules.COMPARE_RPC_REL_TOL:.0f}% and {rules.COMPARE_RPC_ABS_MS:.0f} ms)"})
    sb, sa = before.syncs.counts(), after.syncs.counts()
    if len(before.syncs) or len(after.syncs):
        left = {k: v for k, v in sa.items() if v}
        checks.append({"name": "no sync signature after the fix", "ok": not left, "value": sum(left.values()),
                       "limit": "0 syncs with " + "/".join(rules.SYNC_SIGNATURES) + (f" (after: {left})" if left else "")})
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
        "phases": phases,
        "syncs": {"before": len(before.syncs), "after": len(after.syncs), "by_signature": {"before": sb, "after": sa}},
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
    for ph, qs in c.get("phases", {}).items():
        rows += [(f"{ph} phase {q} (slowest server)", ch) for q, ch in qs.items() if ch["before"] is not None or ch["after"] is not None]
    for name, ch in rows:
        ratio = f" (x{ch['ratio']:.2f})" if ch["ratio"] is not None else ""
        lines.append(f"  {name:<32} {_v(ch['before']):>10} {_v(ch['after']):>10} {_v(ch['delta']):>10}{ratio}")
    lines.append("")
    for ch in c["checks"]:
        state = "n/a " if ch["ok"] is None else ("ok  " if ch["ok"] else "FAIL")
        lines.append(f"  [{state}] {ch['name']}: {_v(ch['value'])} ({ch['limit']})")
    return "\n".join(lines) + "\n"
