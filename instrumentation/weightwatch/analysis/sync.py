"""The weight sync of today, after the fact: pause -> transfer -> resume on every server, under one trace id.

Each sync is split into phases per server (the wall time of that server's calls of the phase's ops, as the
orchestrator saw them); the sync's phase time is its slowest server's, as ``sync.done`` reports it. The
signatures of the contract (rules.SYNC_SIGNATURES) are named per sync, with the server behind each:

- pause_slow / resume_slow: the phase over rules.PAUSE_SLOW_MS / RESUME_SLOW_MS;
- straggler: one server's phase >= STRAGGLER_RATIO x the median server's and STRAGGLER_MIN_GAP_MS over it
  (the median is the lower median, so with two servers it is the faster one);
- hung: a call sent and never answered, in flight past HUNG_BUDGET_FRACTION of its budget when the budget is
  known (``budget_s=`` on client.send; the end of the log is "now"), or a sync.start with no sync.done;
- version_skew: after the sync, the servers serve different steps (a transfer failed or never finished on some).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from weightwatch.analysis import rules
from weightwatch.analysis.collect import Source
from weightwatch.analysis.stats import summarize
from weightwatch.catalogue import PHASE_OF_OP, PHASES

SYNC_SCHEMA: dict[str, Any] = {
    "client_source": pl.String, "tid": pl.String, "step": pl.Int64, "t": pl.Float64, "servers": pl.Int64, "started": pl.Boolean,
    "done": pl.Boolean, "ok": pl.Int64, "wall_ms": pl.Float64, "pause_ms": pl.Float64, "transfer_ms": pl.Float64, "resume_ms": pl.Float64,
}


@dataclass
class Syncs:
    """Every sync of the run (``frame``, time order), every (sync, server, phase) measured (``phases``) and every
    call of a sync sent and never answered (``open_calls``, with how long it had been in flight when the log ends)."""

    frame: pl.DataFrame
    phases: pl.DataFrame
    open_calls: pl.DataFrame

    def __len__(self) -> int:
        return self.frame.height

    def counts(self) -> dict[str, int]:
        """Syncs showing each signature (a sync may show several)."""
        if not self.frame.height:
            return dict.fromkeys(rules.SYNC_SIGNATURES, 0)
        c = self.frame.select(pl.col("signatures").explode().value_counts()).unnest("signatures")
        got = dict(zip(c["signatures"].to_list(), c["count"].to_list(), strict=True))
        return {s: int(got.get(s, 0)) for s in rules.SYNC_SIGNATURES}

    def phase_table(self) -> dict[str, Any]:
        """p50/p95/p99 of each phase: per sync (the slowest server's), and per server."""
        out: dict[str, Any] = {"per_sync": {}, "per_server": {}}
        for ph in PHASES:
            out["per_sync"][ph] = summarize(self.frame[f"{ph}_ms"].drop_nulls().to_list())
        if self.phases.height:
            for (srv, ph), g in sorted(self.phases.group_by("server", "phase"), key=lambda x: (str(x[0][0]), PHASES.index(x[0][1]))):
                out["per_server"].setdefault(str(srv), {})[ph] = summarize(g["ms"].drop_nulls().to_list())
        return out

    def slowest(self, n: int) -> list[dict[str, Any]]:
        if not self.frame.height or n <= 0:
            return []
        top = self.frame.with_columns(pl.coalesce("wall_ms", pl.sum_horizontal("pause_ms", "transfer_ms", "resume_ms")).alias("_size"))
        return [_plain(r) for r in top.sort("_size", descending=True, nulls_last=True).head(n).drop("_size").iter_rows(named=True)]

    def with_signature(self, sig: str, n: int = 20) -> list[dict[str, Any]]:
        f = self.frame.filter(pl.col("signatures").list.contains(sig))
        return [_plain(r) for r in f.head(n).iter_rows(named=True)]

    def to_dict(self, slowest: int = 10) -> dict[str, Any]:
        return {
            "count": len(self), "complete": int(self.frame["done"].sum()) if len(self) else 0,
            "by_signature": self.counts(), "phases": self.phase_table(), "slowest": self.slowest(slowest),
            "open_calls": [_plain(r) for r in self.open_calls.head(50).iter_rows(named=True)],
            "version_skew": self.with_signature(rules.VERSION_SKEW),
            "thresholds": {"pause_slow_ms": rules.PAUSE_SLOW_MS, "resume_slow_ms": rules.RESUME_SLOW_MS,
                           "straggler_ratio": rules.STRAGGLER_RATIO, "straggler_min_gap_ms": rules.STRAGGLER_MIN_GAP_MS,
                           "hung_budget_fraction": rules.HUNG_BUDGET_FRACTION},
        }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {("trace_id" if k == "tid" else k): v for k, v in row.items() if not k.startswith("_")}


def _events(sources: Sequence[Source], key: str, cols: list[str]) -> pl.DataFrame:
    frames = [s.of(key).select(pl.lit(s.source).alias("client_source"), *cols) for s in sources if s.origin == "log"]
    frames = [f for f in frames if f.height]
    return pl.concat(frames) if frames else pl.DataFrame(schema={"client_source": pl.String, **{c: SYNC_SCHEMA.get(c, pl.Int64) for c in cols}})


def _log_end(sources: Sequence[Source]) -> dict[str, float]:
    """The last time each log speaks of (its "now" for calls still in flight): event times, and answers' arrival."""
    return {s.source: t for s in sources if (t := s.last_time()) is not None}


def find_syncs(calls: pl.DataFrame, sources: Sequence[Source]) -> Syncs:
    """Syncs from the calls (joined updates) and the sync.start / sync.done events."""
    starts = _events(sources, "weights.sync.start", ["seq", "tid", "step", "servers", "t"])
    dones = _events(sources, "weights.sync.done", ["tid", "step", "wall_ms", "pause_ms", "transfer_ms", "resume_ms", "ok"])
    phased = calls.with_columns(pl.col("op").replace_strict(PHASE_OF_OP, default=None).alias("phase")).filter(pl.col("phase").is_not_null())
    sync_tids = pl.concat([starts.select("client_source", "tid"), dones.select("client_source", "tid"),
                           phased.filter(pl.col("op").is_in(["pause", "resume"])).select("client_source", "tid")]).unique()
    empty = Syncs(pl.DataFrame(schema={**SYNC_SCHEMA, "signature": pl.String, "signatures": pl.List(pl.String)}),
                  pl.DataFrame(schema={"client_source": pl.String, "tid": pl.String, "server": pl.String, "phase": pl.String, "ms": pl.Float64}),
                  pl.DataFrame(schema={"client_source": pl.String, "tid": pl.String, "server": pl.String, "op": pl.String, "t": pl.Float64,
                                       "step": pl.Int64, "in_flight_s": pl.Float64, "budget_s": pl.Float64, "past_budget_fraction": pl.Boolean}))
    if not sync_tids.height:
        return empty
    phased = phased.join(sync_tids, on=["client_source", "tid"], how="semi")
    answered = ~pl.col("missing").str.contains("client.done", literal=True)
    # one row per (sync, server, phase): its calls' wall time, whether all were answered and all succeeded
    succeeded = pl.when(pl.col("ok").is_not_null()).then(pl.col("ok") == 1).when(pl.col("status").is_not_null()).then(pl.col("status") < 400).otherwise(answered)
    per = (phased.group_by("client_source", "tid", "server", "phase")
           .agg(pl.col("wall_ms").sum().alias("ms"), answered.all().alias("answered"), (succeeded & answered).all().alias("succeeded"),
                pl.col("t").min(), pl.col("step").drop_nulls().first()))
    per = per.with_columns(pl.when(pl.col("answered")).then(pl.col("ms")).otherwise(None).alias("ms"))
    # the phase of each sync: slowest server, lower median, straggler
    by_phase = (per.filter(pl.col("ms").is_not_null()).sort("ms").group_by("client_source", "tid", "phase")
                .agg(pl.col("ms").max().alias("max"), pl.col("ms").get((pl.len() - 1) // 2).alias("median"),
                     pl.col("server").last().alias("slowest"), pl.len().alias("n")))
    by_phase = by_phase.with_columns(((pl.col("n") >= 2) & (pl.col("max") >= rules.STRAGGLER_RATIO * pl.col("median"))
                                      & (pl.col("max") - pl.col("median") >= rules.STRAGGLER_MIN_GAP_MS)).alias("straggler"))
    wide = by_phase.pivot(on="phase", index=["client_source", "tid"], values="max")
    for ph in PHASES:
        if ph not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(ph))
    wide = wide.select("client_source", "tid", *(pl.col(ph).alias(f"_{ph}") for ph in PHASES))
    strag = (by_phase.filter(pl.col("straggler")).sort("max", descending=True).group_by("client_source", "tid")
             .agg(pl.col("slowest").first().alias("straggler_server"), pl.col("phase").first().alias("straggler_phase"),
                  (pl.col("max") - pl.col("median")).first().alias("straggler_gap_ms")))
    held = (per.filter(pl.col("ms").is_not_null()).sort("ms", descending=True).group_by("client_source", "tid")
            .agg(pl.col("server").first().alias("held_by_server"), pl.col("phase").first().alias("held_by_phase"),
                 pl.col("ms").first().alias("held_by_ms")))
    meta = (per.group_by("client_source", "tid").agg(pl.col("t").min().alias("_t"), pl.col("step").drop_nulls().first().alias("_step"),
                                                      pl.col("server").n_unique().alias("_servers")))
    # hung calls: sent, never answered, past the budget fraction (or no budget known)
    end = _log_end(sources)
    open_calls = (phased.filter(~answered)
                  .with_columns(pl.col("client_source").replace_strict(end, default=None, return_dtype=pl.Float64).alias("_end"))
                  .with_columns((pl.col("_end") - pl.col("t")).alias("in_flight_s")))
    open_calls = open_calls.with_columns((pl.col("in_flight_s") > rules.HUNG_BUDGET_FRACTION * pl.col("budget_s")).alias("past_budget_fraction"))
    # hung: past the budget fraction when the budget is known; any call never answered when it is not
    hung_calls = open_calls.filter(pl.col("budget_s").is_null() | pl.col("past_budget_fraction").fill_null(False))
    open_calls = open_calls.select("client_source", "tid", "server", "op", "t", "step", "in_flight_s", "budget_s", "past_budget_fraction")
    f = (sync_tids.join(starts.unique(["client_source", "tid"], keep="first"), on=["client_source", "tid"], how="left")
         .join(dones.unique(["client_source", "tid"], keep="first").rename({"step": "done_step"}), on=["client_source", "tid"], how="left")
         .join(wide, on=["client_source", "tid"], how="left").join(meta, on=["client_source", "tid"], how="left")
         .join(strag, on=["client_source", "tid"], how="left").join(held, on=["client_source", "tid"], how="left"))
    f = f.with_columns(
        pl.col("seq").is_not_null().alias("started"), pl.col("ok").is_not_null().alias("done"),
        pl.coalesce("step", "done_step", "_step").alias("step"), pl.coalesce("t", "_t").alias("t"),
        pl.coalesce("servers", "_servers").alias("servers"),
        *(pl.coalesce(f"_{ph}", f"{ph}_ms").alias(f"{ph}_ms") for ph in PHASES),
        pl.col("tid").is_in(hung_calls["tid"].implode()).alias("_hung_call"),
    )
    f = f.with_columns(pl.when(pl.col("done")).then(pl.col("wall_ms")).otherwise(None).alias("wall_ms"))
    versions, behind = _versions(f, per)
    f = f.join(behind, on=["client_source", "tid"], how="left").with_columns(pl.col("behind").fill_null([]))
    sigs = pl.concat_list(
        pl.when(pl.col("_hung_call") | (pl.col("started") & ~pl.col("done"))).then(pl.lit([rules.HUNG])).otherwise(pl.lit([], dtype=pl.List(pl.String))),
        pl.when(pl.col("behind").list.len() > 0).then(pl.lit([rules.VERSION_SKEW])).otherwise(pl.lit([], dtype=pl.List(pl.String))),
        pl.when(pl.col("straggler_server").is_not_null()).then(pl.lit([rules.STRAGGLER])).otherwise(pl.lit([], dtype=pl.List(pl.String))),
        pl.when(pl.col("pause_ms") > rules.PAUSE_SLOW_MS).then(pl.lit([rules.PAUSE_SLOW])).otherwise(pl.lit([], dtype=pl.List(pl.String))),
        pl.when(pl.col("resume_ms") > rules.RESUME_SLOW_MS).then(pl.lit([rules.RESUME_SLOW])).otherwise(pl.lit([], dtype=pl.List(pl.String))),
    )
    f = f.with_columns(sigs.alias("signatures")).with_columns(pl.col("signatures").list.first().fill_null(rules.HEALTHY).alias("signature"))
    f = f.join(versions, on=["client_source", "tid"], how="left")
    keep = [*SYNC_SCHEMA, "signature", "signatures", "held_by_server", "held_by_phase", "held_by_ms", "straggler_server", "straggler_phase",
            "straggler_gap_ms", "behind", "versions"]
    f = f.select(keep).sort(["t", "tid"], nulls_last=True)
    return Syncs(f, per.select("client_source", "tid", "server", "phase", "ms"), open_calls)


def _versions(f: pl.DataFrame, per: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The step each server serves after each sync, and the servers left behind (version_skew)."""
    order = f.select("client_source", "tid", "step", "t").sort(["t", "tid"], nulls_last=True).with_row_index("_k")
    transfer = per.filter(pl.col("phase") == "transfer").join(order.select("client_source", "tid", "_k", pl.col("step").alias("_sstep")),
                                                              on=["client_source", "tid"])
    if not transfer.height:
        empty = f.select("client_source", "tid")
        return (empty.with_columns(pl.lit(None, dtype=pl.List(pl.Struct({"server": pl.String, "step": pl.Int64}))).alias("versions")),
                empty.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("behind")))
    first_seen = transfer.group_by("client_source", "server").agg(pl.col("_k").min().alias("_first"))
    grid = order.join(first_seen, on="client_source").filter(pl.col("_k") >= pl.col("_first"))
    got = transfer.select("client_source", "server", "_k", pl.when(pl.col("succeeded") & pl.col("answered")).then(pl.coalesce("_sstep", "step"))
                          .otherwise(None).alias("_v"))
    grid = (grid.join(got, on=["client_source", "server", "_k"], how="left").sort("_k")
            .with_columns(pl.col("_v").forward_fill().over("client_source", "server").alias("version")))
    per_sync = grid.group_by("client_source", "tid").agg(
        pl.struct(pl.col("server"), pl.col("version").alias("step")).alias("versions"),
        pl.col("version").max().alias("_newest"), pl.col("server"), pl.col("version"))
    behind = per_sync.with_columns(
        pl.col("server").list.gather(
            pl.col("version").list.eval((pl.element().is_null() | (pl.element() < pl.element().max())) & pl.element().max().is_not_null())
            .list.eval(pl.element().arg_true())
        ).alias("behind")).select("client_source", "tid", "behind")
    return per_sync.select("client_source", "tid", "versions"), behind
