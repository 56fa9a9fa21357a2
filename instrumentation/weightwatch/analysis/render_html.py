"""A self-contained HTML report: inline SVG plots generated here, no scripts, no network.

Plots: the timeline of updates split into queue and rpc, the distributions of queue and rpc,
checkpoint waits, the generation in-flight load and, when the run has weight syncs, each sync as a
stacked bar of its phases (pause, transfer, resume; the slowest server's) with the server that held it up. Large runs are downsampled per plot (the worst
update of each bucket is kept, so stalls never disappear).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightwatch.analysis import rules
from weightwatch.analysis.report import Report
from weightwatch.catalogue import PHASES

MAX_BARS = 600
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 900, 260, 60, 30, 14, 12
COLORS = {"queue": "#e4572e", "rpc": "#2e86ab", "wait": "#8e6c8a", "inflight": "#3b8b5a", "thr": "#222",
          "pause": "#f2a541", "transfer": "#2e86ab", "resume": "#3b8b5a"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:g}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _axes(ymax: float, ylabel: str, xlabel: str) -> list[str]:
    out = [f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#999"/>',
           f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#999"/>']
    for i in range(5):
        v = ymax * i / 4
        y = H - PAD_B - (H - PAD_B - PAD_T) * i / 4
        out.append(f'<line x1="{PAD_L - 4}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(v)}</text>')
    out.append(f'<text x="14" y="{PAD_T + (H - PAD_B - PAD_T) / 2:.0f}" font-size="11" transform="rotate(-90 14 '
               f'{PAD_T + (H - PAD_B - PAD_T) / 2:.0f})" text-anchor="middle">{_e(ylabel)}</text>')
    out.append(f'<text x="{(PAD_L + W - PAD_R) / 2:.0f}" y="{H - 6}" font-size="11" text-anchor="middle">{_e(xlabel)}</text>')
    return out


def _svg(plot_id: str, title: str, body: list[str]) -> str:
    return (f'<figure><figcaption>{_e(title)}</figcaption><svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_e(title)}">' + "".join(body) + "</svg></figure>")


def _empty(plot_id: str, title: str, why: str) -> str:
    return _svg(plot_id, title, [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="13" fill="#777">{_e(why)}</text>'])


def _bucket(items: Sequence[Any], key) -> list[Any]:  # type: ignore[no-untyped-def]
    """At most MAX_BARS items, keeping the worst (largest key) of each bucket."""
    if len(items) <= MAX_BARS:
        return list(items)
    size = len(items) / MAX_BARS
    return [max(items[int(i * size): max(int(i * size) + 1, int((i + 1) * size))], key=key) for i in range(MAX_BARS)]


def timeline(report: Report) -> str:
    q_all, r_all = report.updates.column("queue_ms"), report.updates.column("rpc_ms")
    rows = [j for j, (q, r) in enumerate(zip(q_all, r_all, strict=False)) if q is not None or r is not None]
    title = "Weight updates over time: queue (red) and rpc (blue) per update, ms; dashed line = 300 ms queue threshold"
    if not rows:
        return _empty("plot-timeline", title, "no update with queue or rpc time")
    shown = [report.updates[j] for j in _bucket(rows, key=lambda j: (q_all[j] or 0) + (r_all[j] or 0))]
    ups = rows
    ymax = _nice_max(max(max((u.queue_ms or 0) + (u.rpc_ms or 0) for u in shown), rules.QUEUE_THRESHOLD_MS * 1.1))
    body = _axes(ymax, "ms", f"updates in time order ({len(ups):,}" + (f", worst of each of {len(shown)} buckets)" if len(shown) < len(ups) else ")"))
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bw = plot_w / len(shown)
    for i, u in enumerate(shown):
        x = PAD_L + i * bw
        q, r = max(0.0, u.queue_ms or 0.0), max(0.0, u.rpc_ms or 0.0)
        hq, hr = plot_h * q / ymax, plot_h * r / ymax
        tip = f"{u.server or '?'} {u.tid}: queue {_fmt(u.queue_ms)} ms, rpc {_fmt(u.rpc_ms)} ms, {u.signature}"
        body.append(f'<g><title>{_e(tip)}</title>'
                    f'<rect class="bar-rpc" x="{x:.2f}" y="{H - PAD_B - hr:.2f}" width="{max(bw * 0.85, 0.5):.2f}" height="{hr:.2f}" fill="{COLORS["rpc"]}"/>'
                    f'<rect class="bar-queue" x="{x:.2f}" y="{H - PAD_B - hr - hq:.2f}" width="{max(bw * 0.85, 0.5):.2f}" height="{hq:.2f}" fill="{COLORS["queue"]}"/></g>')
    y = H - PAD_B - plot_h * rules.QUEUE_THRESHOLD_MS / ymax
    body.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="{COLORS["thr"]}" stroke-dasharray="5,4"/>')
    return _svg("plot-timeline", title, body)


def histogram(plot_id: str, title: str, series: dict[str, list[float]]) -> str:
    vals = [v for xs in series.values() for v in xs if v is not None and v > 0]
    if not vals:
        return _empty(plot_id, title, "no values")
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)) + 1e-9)
    hi = max(hi, lo + 1)
    nb = 8 * (hi - lo)
    edges = [10 ** (lo + (hi - lo) * i / nb) for i in range(nb + 1)]
    counts = {}
    for name, xs in series.items():
        c = [0] * nb
        for v in xs:
            if v is None or v <= 0:
                continue
            i = min(nb - 1, max(0, int((math.log10(v) - lo) / (hi - lo) * nb)))
            c[i] += 1
        counts[name] = c
    ymax = _nice_max(max(max(c) for c in counts.values()))
    body = _axes(ymax, "updates", "ms (log scale)")
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bw = plot_w / nb
    for k, (name, c) in enumerate(counts.items()):
        for i, n in enumerate(c):
            if not n:
                continue
            h = plot_h * n / ymax
            x = PAD_L + i * bw + k * bw / len(counts)
            body.append(f'<rect class="hist-{name}" x="{x:.2f}" y="{H - PAD_B - h:.2f}" width="{bw / len(counts) * 0.9:.2f}" height="{h:.2f}" '
                        f'fill="{COLORS.get(name, "#555")}" fill-opacity="0.85"><title>{_e(name)} {_fmt(edges[i])}-{_fmt(edges[i + 1])} ms: {n}</title></rect>')
    for p in range(lo, hi + 1):
        x = PAD_L + plot_w * (p - lo) / (hi - lo)
        body.append(f'<text x="{x:.1f}" y="{H - PAD_B + 13}" font-size="10" text-anchor="middle">{_fmt(10.0 ** p)}</text>')
    return _svg(plot_id, title, body)


def bars(plot_id: str, title: str, values: list[float], color: str, ylabel: str, xlabel: str, threshold: float | None = None) -> str:
    if not values:
        return _empty(plot_id, title, "no events")
    idx = list(range(len(values)))
    shown = _bucket(idx, key=lambda i: values[i])
    ymax = _nice_max(max(max(values[i] for i in shown), (threshold or 0) * 1.1))
    body = _axes(ymax, ylabel, xlabel)
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bw = plot_w / len(shown)
    for k, i in enumerate(shown):
        h = plot_h * max(0.0, values[i]) / ymax
        body.append(f'<rect class="bar" x="{PAD_L + k * bw:.2f}" y="{H - PAD_B - h:.2f}" width="{max(bw * 0.85, 0.5):.2f}" height="{h:.2f}" '
                    f'fill="{color}"><title>#{i + 1}: {_fmt(values[i])}</title></rect>')
    if threshold is not None:
        y = H - PAD_B - plot_h * threshold / ymax
        body.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="{COLORS["thr"]}" stroke-dasharray="5,4"/>')
    return _svg(plot_id, title, body)


def sync_timeline(report: Report) -> str:
    """One stacked bar per sync: pause, transfer, resume (slowest server each); a failed sync is outlined in red."""
    f = report.syncs.frame
    title = ("Weight syncs over time: pause (orange), transfer (blue), resume (green) per sync, ms (slowest server per phase); "
             f"dashed line = {_fmt(rules.PAUSE_SLOW_MS)} ms pause/resume threshold")
    rows = f.select("tid", "step", "pause_ms", "transfer_ms", "resume_ms", "signature", "held_by_server", "held_by_phase").rows(named=True)
    if not rows:
        return _empty("plot-sync-timeline", title, "no weight syncs")
    total = [sum((r[f"{ph}_ms"] or 0.0) for ph in PHASES) for r in rows]
    shown = _bucket(list(range(len(rows))), key=lambda i: total[i])
    ymax = _nice_max(max(max(total[i] for i in shown), rules.PAUSE_SLOW_MS * 1.1))
    body = _axes(ymax, "ms", f"syncs in time order ({len(rows):,}" + (f", worst of each of {len(shown)} buckets)" if len(shown) < len(rows) else ")"))
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bw = plot_w / len(shown)
    for k, i in enumerate(shown):
        r = rows[i]
        x, y = PAD_L + k * bw, H - PAD_B
        tip = (f"step {r['step']} trace {r['tid']}: " + ", ".join(f"{ph} {_fmt(r[f'{ph}_ms'])} ms" for ph in PHASES)
               + f"; {r['signature']}" + (f"; held up by {r['held_by_server']} ({r['held_by_phase']})" if r["held_by_server"] else ""))
        parts = [f"<g class=\"sync\"><title>{_e(tip)}</title>"]
        for ph in PHASES:
            h = plot_h * max(0.0, r[f"{ph}_ms"] or 0.0) / ymax
            y -= h
            parts.append(f'<rect class="phase-{ph}" x="{x:.2f}" y="{y:.2f}" width="{max(bw * 0.85, 0.5):.2f}" height="{h:.2f}" fill="{COLORS[ph]}"/>')
        if r["signature"] != rules.HEALTHY:
            parts.append(f'<rect class="sync-flag" x="{x:.2f}" y="{H - PAD_B + 2:.2f}" width="{max(bw * 0.85, 0.5):.2f}" height="4" fill="{COLORS["queue"]}"/>')
        body.append("".join(parts) + "</g>")
    yt = H - PAD_B - plot_h * rules.PAUSE_SLOW_MS / ymax
    body.append(f'<line x1="{PAD_L}" y1="{yt:.1f}" x2="{W - PAD_R}" y2="{yt:.1f}" stroke="{COLORS["thr"]}" stroke-dasharray="5,4"/>')
    return _svg("plot-sync-timeline", title, body)


def _phase_table(report: Report) -> str:
    t = report.syncs.phase_table()
    head = "<tr><th>phase (ms)</th><th>server</th><th>count</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>"
    rows = []
    for ph in PHASES:
        s = t["per_sync"][ph]
        if s["count"]:
            rows.append(f"<tr><td>{ph}</td><td>slowest server</td><td>{s['count']:,}</td>" + "".join(f"<td>{_fmt(s[k])}</td>" for k in ("p50", "p95", "p99", "max")) + "</tr>")
        for srv, phases in t["per_server"].items():
            s = phases.get(ph)
            if s and s["count"]:
                rows.append(f"<tr><td>{ph}</td><td>{_e(srv)}</td><td>{s['count']:,}</td>" + "".join(f"<td>{_fmt(s[k])}</td>" for k in ("p50", "p95", "p99", "max")) + "</tr>")
    return f"<table class=\"phases\"><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _stats_table(report: Report) -> str:
    rows = []
    for m, s in report.measures.items():
        if s["count"]:
            rows.append(f"<tr><td>{_e(m)}</td><td>{s['count']:,}</td>" + "".join(f"<td>{_fmt(s[k])}</td>" for k in ("mean", "stddev", "p50", "p95", "p99", "max")) + "</tr>")
    return ("<table><thead><tr><th>measure (ms)</th><th>count</th><th>mean</th><th>stddev</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def _slowest_table(report: Report) -> str:
    rows = []
    for u in report.slowest:
        rows.append(f"<tr><td>{_e(u.server or '?')}</td><td>{_fmt(u.wall_ms)}</td><td>{_fmt(u.queue_ms)}</td><td>{_fmt(u.rpc_ms)}</td>"
                    f"<td>{_fmt(u.ckpt_wait_ms)}</td><td>{_e(u.signature)}</td><td>{_e(u.diagnosis().rule)}</td><td><code>{_e(u.tid)}</code></td></tr>")
    return ("<table><thead><tr><th>server</th><th>wall</th><th>queue</th><th>rpc</th><th>ckpt wait</th><th>signature</th><th>rule</th><th>trace</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def _compare_block(c: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(ch['name'])}</td><td>{'n/a' if ch['ok'] is None else ('ok' if ch['ok'] else 'FAIL')}</td>"
                   f"<td>{_fmt(ch['value'])}</td><td>{_e(ch['limit'])}</td></tr>" for ch in c["checks"])
    return (f"<h2>Fix validation: {'validated' if c['validated'] else 'NOT validated'}</h2>"
            f"<table><thead><tr><th>check</th><th>result</th><th>value</th><th>tolerance</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(report: Report, *, compare: dict[str, Any] | None = None, before: Report | None = None) -> str:
    v = report.verdict
    waits = list(report.series.get("waits", []))
    gen = report.series.get("gen")
    inflight = [float(x) for x in gen["inflight"].to_list()] if gen is not None else []
    queue = report.updates.values("queue_ms")
    rpc = report.updates.values("rpc_ms")
    plots = [
        timeline(report),
        histogram("plot-distributions", "Distributions of queue (red) and rpc (blue) time per update", {"queue": queue, "rpc": rpc}),
        bars("plot-ckpt-wait", "Checkpoint wait per step, ms (dashed = 1 s: checkpoint I/O slow)", waits, COLORS["wait"], "ms",
             "checkpoint waits in order", rules.CKPT_WAIT_SLOW_MS),
        bars("plot-inflight", "Generation load: requests in flight at the end of each batch", inflight, COLORS["inflight"], "requests",
             "generation batches in order"),
    ]
    if len(report.syncs):
        plots.insert(0, sync_timeline(report))
    if before is not None:
        bq = before.updates.values("queue_ms")
        plots.append(histogram("plot-compare", "Queue time before (red) and after (blue) the fix", {"queue": bq, "rpc": queue}))
    css = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:960px}"
           "table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
           "td:first-child,th:first-child{text-align:left}figure{margin:18px 0}figcaption{font-weight:600;margin-bottom:4px}"
           ".verdict{font-size:18px;padding:8px 12px;border-radius:6px;background:#f3f3f3}"
           ".healthy{border-left:6px solid #3b8b5a}.bad{border-left:6px solid #e4572e}code{font-size:11px}")
    cls = "healthy" if v.signature == rules.HEALTHY else "bad"
    counts = ", ".join(f"{_e(s)} {n}" for s, n in v.counts.items() if n)
    parse = report.parse
    skipped = "".join(f"<li>{n:,} {_e(r)}</li>" for r, n in parse["rejected"].items())
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>weightwatch analyze</title>"
        f"<style>{css}</style></head><body><h1>weightwatch analyze</h1>"
        f"<p class=\"verdict {cls}\" id=\"verdict\"><b>{_e(v.signature)}</b>: {_e(v.rule)}<br><small>{counts}; "
        f"{report.queue_breaches} update(s) over the {rules.QUEUE_THRESHOLD_MS:.0f} ms queue threshold</small></p>"
        + (_compare_block(compare) if compare else "")
        + f"<p>{len(report.inputs)} input(s), {parse['lines']:,} lines, {parse['events']:,} events, {parse['rejected_total']:,} lines skipped</p>"
        + (f"<ul>{skipped}</ul>" if skipped else "")
        + (("<h2>Weight syncs by phase</h2>" + _phase_table(report)) if len(report.syncs) else "")
        + "<h2>Per update</h2>" + _stats_table(report)
        + "".join(plots)
        + "<h2>Slowest updates</h2>" + _slowest_table(report)
        + "</body></html>\n"
    )


def write_html(report: Report, path: Path, **kwargs: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render_html(report, **kwargs), encoding="utf-8")
