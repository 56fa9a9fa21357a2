"""The terminal report: verdict first, then the numbers that back it."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from weightwatch.analysis import rules
from weightwatch.analysis.report import Report
from weightwatch.catalogue import PHASES

_MEASURE_NOTES = {"recv_delay_ms": "server.recv - client.send: clock-skew sensitive across hosts"}


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def _stats_row(name: str, s: dict[str, Any]) -> str:
    return (f"  {name:<16} {s['count']:>9,} {_ms(s['mean']):>9} {_ms(s['stddev']):>9} {_ms(s['p50']):>9} "
            f"{_ms(s['p95']):>9} {_ms(s['p99']):>9} {_ms(s['max']):>9}")


def _syncs(d: Report) -> list[str]:
    """The weight syncs: signatures, the phase table, the slowest syncs and who held them up, hung calls, skew."""
    sy = d.syncs
    if not len(sy):
        return []
    info = sy.to_dict(slowest=d.options.get("slowest") or 10)
    out = ["", f"WEIGHT SYNCS: {info['count']:,} ({info['count'] - info['complete']:,} without sync.done)"]
    counts = ", ".join(f"{k} {v}" for k, v in info["by_signature"].items() if v)
    out.append(f"  syncs by signature: {counts or 'none'}")
    out.append(f"  {'phase (ms)':<10} {'server':<22} {'count':>7} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}")
    table = info["phases"]
    for ph in PHASES:
        rows = [("slowest server", table["per_sync"][ph])] + [(srv, v[ph]) for srv, v in table["per_server"].items() if ph in v]
        for who, s in rows:
            if s["count"]:
                out.append(f"  {ph:<10} {who[:22]:<22} {s['count']:>7,} {_ms(s['p50']):>9} {_ms(s['p95']):>9} {_ms(s['p99']):>9} {_ms(s['max']):>9}")
    if info["slowest"]:
        out.append(f"  slowest syncs:  {'step':>6} {'pause':>8} {'transfer':>9} {'resume':>8}  held up by / signature")
        for x in info["slowest"]:
            held = f"{x['held_by_server']} ({x['held_by_phase']} {_ms(x['held_by_ms'])} ms)" if x["held_by_server"] else "-"
            out.append(f"                  {x['step'] if x['step'] is not None else '-':>6} {_ms(x['pause_ms']):>8} {_ms(x['transfer_ms']):>9} "
                       f"{_ms(x['resume_ms']):>8}  {held}; {','.join(x['signatures']) or 'healthy'}  trace {x['trace_id']}")
    for h in info["open_calls"][:10]:
        budget = f" of a {h['budget_s']:.0f} s budget" if h["budget_s"] else " (budget unknown)"
        flight = f"in flight {h['in_flight_s']:.1f} s" if h["in_flight_s"] is not None else "in flight"
        state = "HUNG" if h["past_budget_fraction"] is not False else "OPEN"
        out.append(f"  {state}: {h['op']} on {h['server']} step {h['step']} sent, never answered; {flight}{budget} "
                   f"when the log ends, trace {h['trace_id']}")
    for x in info["version_skew"][:10]:
        vs = ", ".join(f"{v['server']}={v['step']}" for v in (x["versions"] or []))
        out.append(f"  VERSION SKEW after step {x['step']}: {', '.join(x['behind'])} behind ({vs}), trace {x['trace_id']}")
    return out


def render(report: Report) -> str:
    d = report
    out: list[str] = []
    v = d.verdict
    counts = ", ".join(f"{s} {c}" for s, c in v.counts.items() if c and s in rules.SIGNATURES)
    sync_counts = ", ".join(f"{s} {c}" for s, c in v.counts.items() if c and s in rules.SYNC_SIGNATURES)
    out.append(f"VERDICT: {v.signature}  ({v.rule})")
    if counts:
        out.append(f"  updates by signature: {counts}")
    if sync_counts:
        out.append(f"  syncs by signature: {sync_counts}")
    out.append(f"  updates over the {_ms(rules.QUEUE_THRESHOLD_MS)} ms queue threshold: {d.queue_breaches}")
    us = d.updates_summary
    out.append("")
    out.append(f"INPUT: {len(d.inputs)} file(s), {d.parse['lines']:,} lines, {d.parse['events']:,} events, "
               f"{d.parse['rejected_total']:,} lines skipped")
    for reason, n in list(d.parse["rejected"].items())[:8]:
        out.append(f"  skipped {n:>7,}  {reason}")
    out.append("")
    out.append(f"WEIGHT UPDATES: {us['count']:,} ({us['incomplete']:,} with a missing half)")
    out.append(f"  {'measure (ms)':<16} {'count':>9} {'mean':>9} {'stddev':>9} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}")
    for m, s in d.measures.items():
        if s["count"]:
            out.append(_stats_row(m, s))
    if d.measures.get("recv_delay_ms", {}).get("count"):
        out.append(f"  note: recv_delay_ms = {_MEASURE_NOTES['recv_delay_ms']}")
    missing = us["missing_events"]
    if missing:
        out.append("  missing events: " + ", ".join(f"{k} in {n:,}" for k, n in sorted(missing.items())))
    if us["never_done_total"]:
        out.append(f"  sent and never answered: {us['never_done_total']:,}")
        for nd in us["never_done"][:10]:
            out.append(f"    {_when(nd['t']):<12} {str(nd['server'] or '?'):<22} op {nd['op']} step {nd['step'] if nd['step'] is not None else '-'}"
                       f"  trace {nd['trace_id']}")
    out.extend(_syncs(d))
    if d.slowest:
        out.append("")
        out.append(f"SLOWEST {len(d.slowest)}:")
        out.append(f"  {'start (UTC)':<12} {'server':<22} {'wall':>8} {'queue':>8} {'rpc':>8} {'ckpt':>7}  signature / rule")
        for u in d.slowest:
            diag = u.diagnosis()
            out.append(f"  {_when(u.start):<12} {str(u.server or '?')[:22]:<22} {_ms(u.wall_ms):>8} {_ms(u.queue_ms):>8} "
                       f"{_ms(u.rpc_ms):>8} {_ms(u.ckpt_wait_ms):>7}  {u.signature}: {diag.rule}")
            extra = []
            if u.missing:
                extra.append("missing " + ", ".join(u.missing))
            if u.around:
                gen = "; ".join(f"{g['position']} {_ms(g['dur_ms'])} ms x{g['completions']} inflight {g['inflight']}" for g in u.around)
                extra.append("generation: " + gen)
            for e in extra:
                out.append(f"  {'':<12} {e}")
            out.append(f"  {'':<12} trace {u.tid}")
    c = d.checkpoints
    if c["writes"] or c["waits"]:
        out.append("")
        out.append(f"CHECKPOINTS: {c['writes']} written, {c['waits']} waited for ({c['slow_waits']} waits over {_ms(rules.CKPT_WAIT_SLOW_MS)} ms)")
        out.append(f"  {'measure (ms)':<16} {'count':>9} {'mean':>9} {'stddev':>9} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}")
        for m in ("write_ms", "wait_ms"):
            if c[m]["count"]:
                out.append(_stats_row(m, c[m]))
        if c["slow"]:
            out.append(f"  slow waits:  {'step':>6} {'wait ms':>9} {'write ms':>9}  cause")
            for w in c["slow"][:20]:
                out.append(f"               {w['step'] if w['step'] is not None else '-':>6} {_ms(w['wait_ms']):>9} {_ms(w['write_ms']):>9}  {w['cause']}")
    g = d.generation
    if g["batches"]:
        out.append("")
        thr = g["throughput_completions_per_s"]
        out.append(f"GENERATION: {g['batches']:,} batches, {g['completions']:,} completions, "
                   f"{thr:.1f} completions/s of batch time" if thr else f"GENERATION: {g['batches']:,} batches")
        out.append(_stats_row("batch_dur_ms", g["batch_dur_ms"]))
        out.append(_stats_row("inflight", g["inflight"]))
    r = d.rollout
    if r["steps"]:
        out.append("")
        lvl = r["async_level"]
        out.append(f"ROLLOUT HYGIENE: {r['steps']} steps, truncation mean {r['trunc_pct']['mean']:.2f}% max {r['trunc_pct']['max']:.2f}%"
                   f"{' (over ' + str(rules.TRUNCATION_WARN_PCT) + '%: WARN)' if r['truncation_warn'] else ''}; staleness max "
                   f"{r['staleness']['max']}" + (f", async_level {lvl}: {r['steps_over_async_level']} steps over" if lvl is not None
                                                 else " (async_level unknown: pass --async-level)"))
    if d.baseline:
        b = d.baseline
        out.append("")
        out.append(f"BASELINE {b['model_size']} ({b['percentile']}): {'OK' if b['ok'] else 'OVER'}")
        for ch in b["checks"]:
            state = "n/a" if ch["ok"] is None else ("ok" if ch["ok"] else "OVER")
            out.append(f"  {ch['measure']:<10} {_ms(ch['value_ms']):>9} < {_ms(ch['limit_ms']):>7}  {state}")
    return "\n".join(out) + "\n"
