"""Reports: the records under a directory as tables (Markdown, LaTeX) and plots (PNG, PDF), with the paper's
claims (results/reference/paper_claims.csv) beside them and labelled as claims.

    fapool-report RESULTS_DIR [--out DIR] [--baseline tp8_pp2] [--fa-pool fa_pool]

Measured and projected records are never mixed: every table keeps `source` as a key and every ratio
is taken between two rows of the same source. Nor are unlike runs averaged together: any config field that
differs between records of the same row (batch size, hardware, model, dtype, a pool setting...) becomes a
key of that table too, and the table says which fields split its rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from harness.collect import collect  # noqa: E402
from harness.measure import PHASES, TIMELINE_FIELDS  # noqa: E402
from harness.strategies import family_of  # noqa: E402
from harness.serving.report import plot_serving, serving_table  # noqa: E402

CLAIMS = Path(__file__).resolve().parent.parent / "results" / "reference" / "paper_claims.csv"
KEY = ["source", "strategy", "seq_len"]
# fields that say where or how a sweep ran, not what it measured (`source` already tells measured/projected)
NOT_SPLIT = ("config.results_dir", "config.resume", "config.plan", "config.fail_on_error", "config.check_reference",
             "config.launcher.timeout_s", "config.launcher.partition", "config.launcher.account", "config.launcher.qos",
             "config.launcher.folder", "config.launcher.wait", "config.launcher.setup", "config.launcher.max_requeues",
             "config.launcher.time_min", "config.launcher.mem_gb", "config.launcher.name", "config.launcher.kind",
             "config.launcher.constraint", "config.launcher.cpus_per_task")


def split_fields(d: pd.DataFrame, keys: list[str]) -> list[str]:
    """Config fields with several values among records that share `keys`: averaging over them would mix unlike
    runs, so they become keys too. Fields fixed by the keys (a strategy's tp, say) do not split anything."""
    if d.empty:
        return []
    out = []
    for c in sorted(c for c in d.columns if c.startswith("config.") and c not in keys and c not in NOT_SPLIT
                    and not c.startswith("config.fault.")):
        values = d[c].astype(str)
        if values.groupby([d[k].astype(str) for k in keys]).nunique().max() > 1:
            out.append(c)
    return out


def _split_note(t: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    t.attrs["split_by"] = [f.removeprefix("config.") for f in fields]
    return t


def load_claims(path: Path = CLAIMS) -> pd.DataFrame:
    return pd.read_csv(path)


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The ok static-batch runs (trace replays have tables of their own: harness/serving/report.py)."""
    if df.empty:
        return df
    trace = df["config.workload.kind"].eq("trace") if "config.workload.kind" in df else False
    d = df[(df["status"] == "ok") & ~trace].copy()
    d["strategy"] = d["config.strategy.name"]
    d["kind"] = d["config.strategy.kind"]
    d["family"] = d["kind"].map(family_of)  # reference | baseline | offload (harness/strategies/spec.py)
    return d


def pick(d: pd.DataFrame, wanted: str | None, column: str, value: str) -> str | None:
    """`wanted` if a strategy of that name ran with d[column] == value (its kind or family), else the first such
    strategy by name."""
    names = sorted(d.loc[d[column] == value, "strategy"].unique()) if not d.empty else []
    if wanted in names:
        return wanted
    return names[0] if names else None


def _mean_by(d, keys, cols):
    """Means of `cols` per `keys`, and per every config field that would otherwise be averaged over."""
    cols = [c for c in cols if c in d]
    extra = split_fields(d, keys)
    grouped = d.assign(**{c: d[c].astype(str) for c in extra})
    return _split_note(grouped.groupby(keys + extra, dropna=False)[cols].mean().reset_index(), extra)


def _shared(fields) -> list[str]:
    """Of the splitting fields, those that two strategies can share (not a strategy's own settings)."""
    return [c for c in fields if not c.startswith("config.strategy.")]


def paper_layout(df: pd.DataFrame, claims: pd.DataFrame, baseline: str | None = None, fa_pool: str | None = None) -> pd.DataFrame:
    """Per source and length: baseline and FA Pool TPOT and TPS, their ratios, and the paper's claims."""
    d = ok_runs(df)
    if d.empty:
        return pd.DataFrame()
    base, fa = pick(d, baseline or "tp8_pp2", "kind", "static"), pick(d, fa_pool or "fa_pool", "family", "offload")
    if not base or not fa:
        return pd.DataFrame()
    m = _mean_by(d[d["strategy"].isin([base, fa])], KEY, ["metrics.mean_tpot_ms", "metrics.tps", "metrics.decode_tps"])
    split = ["config." + c for c in m.attrs["split_by"]]
    on = ["source", "seq_len"] + _shared(split)
    b = m[m["strategy"] == base].drop(columns="strategy")
    f = m[m["strategy"] == fa].drop(columns="strategy")
    t = pd.merge(b, f, on=on, suffixes=("_base", "_fa"))
    t.insert(2, "baseline", base)
    t.insert(3, "fa_pool", fa)
    t["tpot_speedup"] = t["metrics.mean_tpot_ms_base"] / t["metrics.mean_tpot_ms_fa"]
    t["tps_speedup"] = t["metrics.tps_fa"] / t["metrics.tps_base"]
    t["decode_tps_speedup"] = t["metrics.decode_tps_fa"] / t["metrics.decode_tps_base"]
    c = claims.set_index("claim_id")["value"]
    for col, prefix in (("claim_tpot_base_ms", "tpot_base_"), ("claim_tpot_fa_ms", "tpot_fapool_"),
                        ("claim_tpot_speedup", "tpot_speedup_"), ("claim_tps_base", "tps_base_"),
                        ("claim_tps_fa", "tps_fapool_"), ("claim_tps_speedup", "tps_speedup_")):
        t[col] = [c.get(f"{prefix}{int(L)}") if pd.notna(L) else None for L in t["seq_len"]]
    t = t.rename(columns={"metrics.mean_tpot_ms_base": "tpot_base_ms", "metrics.mean_tpot_ms_fa": "tpot_fa_ms",
                          "metrics.tps_base": "tps_base", "metrics.tps_fa": "tps_fa",
                          "metrics.decode_tps_base": "decode_tps_base", "metrics.decode_tps_fa": "decode_tps_fa"})
    return _split_note(t, split)


def static_vs_fapool(df: pd.DataFrame, fa_pool: str | None = None) -> pd.DataFrame:
    """Every static TP x PP and DCP strategy (the `static` column; `family` says which) against FA Pool, per source
    and length: TPOT and TPS ratios."""
    d = ok_runs(df)
    fa = pick(d, fa_pool or "fa_pool", "family", "offload") if not d.empty else None
    if not fa:
        return pd.DataFrame()
    m = _mean_by(d[d["family"].isin(["baseline", "offload"])], KEY, ["metrics.mean_tpot_ms", "metrics.tps", "metrics.num_gpus"])
    split = ["config." + c for c in m.attrs["split_by"]]
    family = dict(zip(d["strategy"], d["kind"]))  # shown per row: which baseline kind
    statics = set(d.loc[d["family"] == "baseline", "strategy"])
    s, f = m[m["strategy"].isin(statics)], m[m["strategy"] == fa]
    t = pd.merge(s, f, on=["source", "seq_len"] + _shared(split), suffixes=("_s", "_f"))
    if t.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"source": t["source"], "seq_len": t["seq_len"], **{c.removeprefix("config."): t[c] for c in _shared(split)},
                        "static": t["strategy_s"], "family": t["strategy_s"].map(family),
                        "static_gpus": t["metrics.num_gpus_s"], "fa_pool": fa,
                        "fa_pool_gpus": t["metrics.num_gpus_f"], "static_tpot_ms": t["metrics.mean_tpot_ms_s"],
                        "fa_pool_tpot_ms": t["metrics.mean_tpot_ms_f"],
                        "tpot_speedup": t["metrics.mean_tpot_ms_s"] / t["metrics.mean_tpot_ms_f"],
                        "tps_speedup": t["metrics.tps_f"] / t["metrics.tps_s"].where(t["metrics.tps_s"] != 0)})
    return _split_note(out, split)


def iso_gpu(df: pd.DataFrame) -> pd.DataFrame:
    """Strategies that use the same number of GPUs, side by side with per-GPU metrics."""
    d = ok_runs(df)
    if d.empty:
        return pd.DataFrame()
    m = _mean_by(d, ["source", "metrics.num_gpus", "seq_len", "strategy"],
                 ["metrics.mean_tpot_ms", "metrics.tps", "metrics.tps_per_gpu", "metrics.decode_tps"])
    split = ["config." + c for c in m.attrs["split_by"]]
    m["decode_tps_per_gpu"] = m["metrics.decode_tps"] / m["metrics.num_gpus"]
    same = ["source", "metrics.num_gpus", "seq_len"] + _shared(split)
    counts = m.groupby(same, dropna=False)["strategy"].transform("nunique")
    return _split_note(m[counts >= 2].sort_values(same + ["strategy"]).reset_index(drop=True), split)


def _role_rows(df: pd.DataFrame, section: str):
    """(run, role, splitting fields of the run) for every ok run and every role with a `<section>.<role>.*` value."""
    d = ok_runs(df)
    split = split_fields(d, KEY)
    for _, r in d.iterrows():
        roles = {c.split(".")[1] for c in d.columns if c.startswith(section + ".") and pd.notna(r[c])}
        for role in sorted(roles):
            yield r, role, {c.removeprefix("config."): str(r[c]) for c in split}


def memory_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = [{"source": r["source"], "strategy": r["strategy"], "seq_len": r["seq_len"], **split, "role": role,
             "peak_gb": r[f"memory.{role}.peak_bytes_max"] / 1e9, "how": r.get(f"memory.{role}.source")}
            for r, role, split in _role_rows(df, "memory") if pd.notna(r.get(f"memory.{role}.peak_bytes_max"))]
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    split = [c for c in out.columns if c not in ("source", "strategy", "seq_len", "role", "how", "peak_gb")]
    keys = ["source", "strategy", "seq_len", *split, "role", "how"]
    out = out.groupby(keys, dropna=False)["peak_gb"].max().reset_index()
    out.attrs["split_by"] = split
    return out


def _per_role_table(df: pd.DataFrame, section: str, fields, missing=None) -> pd.DataFrame:
    """One row per run kind and role: the mean of `<section>.<role>.<field>` over like runs."""
    rows = [{"source": r["source"], "strategy": r["strategy"], "seq_len": r["seq_len"], **split, "role": role,
             **{f: r.get(f"{section}.{role}.{f}", missing) for f in fields}}
            for r, role, split in _role_rows(df, section)]
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    split = [c for c in out.columns if c not in ("source", "strategy", "seq_len", "role", *fields)]
    out = out.groupby(["source", "strategy", "seq_len", *split, "role"], dropna=False).mean().reset_index()
    out.attrs["split_by"] = split
    return out


def breakdown_table(df: pd.DataFrame) -> pd.DataFrame:
    """The phase timers' fractions of each role's time (the instrumented pass)."""
    return _per_role_table(df, "breakdown", PHASES, missing=0.0)


def timeline_table(df: pd.DataFrame) -> pd.DataFrame:
    """Where a decode step goes on each role's GPU, ms per step (the profiled pass: runs with profile=true)."""
    return _per_role_table(df, "timeline", TIMELINE_FIELDS)


def swept(df: pd.DataFrame, field: str) -> pd.DataFrame:
    """FA Pool runs by a swept field (pool size, threshold): TPOT and TPS per source and length."""
    d = ok_runs(df)
    if d.empty or field not in d:
        return pd.DataFrame()
    d = d[d["family"] == "offload"]
    m = _mean_by(d, ["source", "seq_len", field], ["metrics.mean_tpot_ms", "metrics.decode_tps", "pool_utilization_mean"])
    return m.sort_values(["source", "seq_len", field]).reset_index(drop=True)


# -- plots ---------------------------------------------------------------------------------------------------
def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    fig.tight_layout()
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths


def _log_axes(ax, xlabel: str, ylabel: str, title: str, xbase: int = 10):
    """Both axes logarithmic, labelled, with a legend."""
    ax.set_xscale("log", base=xbase)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _empty(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} in these results", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


PAPER_HARDWARE = "A100 80GB"  # the paper's setup, where every claim in paper_claims.csv comes from


def hardware_note(d: pd.DataFrame) -> str:
    """Which hardware each source's points are of, beside the claims' (a CPU run next to A100 claims is not a
    comparison of absolute numbers)."""
    if d.empty or "config.hardware.name" not in d:
        return f"paper claims: {PAPER_HARDWARE}"
    ours = "; ".join(f"{source} on {', '.join(sorted(g['config.hardware.name'].astype(str).unique()))}"
                     for source, g in d.groupby("source"))
    return f"this harness: {ours}; paper claims: {PAPER_HARDWARE}"


def length_label(n) -> str:
    """A sequence length in short form: 512, 2K, 16K (whole multiples of 1024), else the number."""
    n = float(n)
    return f"{int(n) // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:g}"


def _line_by_strategy(ax, d, x, y, label_fmt="{strategy} ({source})"):
    for (source, strategy), g in d.groupby(["source", "strategy"]):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker="o" if source == "measured" else "s",
                linestyle="-" if source == "measured" else "--", label=label_fmt.format(strategy=strategy, source=source))


def plot_all(df: pd.DataFrame, claims: pd.DataFrame, out: Path, baseline=None, fa_pool=None) -> list[Path]:
    d = ok_runs(df)
    files = []
    means = _mean_by(d, KEY, ["metrics.mean_tpot_ms", "metrics.tps", "metrics.tps_per_gpu", "metrics.decode_tps",
                              "metrics.num_gpus"]) if not d.empty else pd.DataFrame()
    if not means.empty:
        means["decode_tps_per_gpu"] = means["metrics.decode_tps"] / means["metrics.num_gpus"]

    # TPOT vs length, claims overlaid
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if means.empty:
        _empty(ax, "ok runs")
    else:
        _line_by_strategy(ax, means, "seq_len", "metrics.mean_tpot_ms")
        for strat, marker in (("tp8_pp2", "x"), ("fa_pool", "+")):
            c = claims[(claims["metric"] == "mean_tpot_ms") & (claims["strategy"] == strat)]
            ax.scatter(c["seq_len"], c["value"], marker=marker, s=80, color="k", label=f"paper claim: {strat}")
        _log_axes(ax, "sequence length (prompt tokens, log scale)", "mean TPOT (ms, log scale)",
                  f"TPOT vs sequence length\n{hardware_note(d)}", xbase=2)
        ax.title.set_fontsize(9)
    files += _save(fig, out, "tpot_vs_length")

    # TPS and decode TPS per GPU
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if means.empty:
        _empty(axes[0], "ok runs")
        _empty(axes[1], "ok runs")
    else:
        has_tps = means.dropna(subset=["metrics.tps"])
        if has_tps.empty:
            _empty(axes[0], "runs with TPS (synthetic-KV runs have no TTFT, so no TPS)")
        else:
            _line_by_strategy(axes[0], has_tps, "seq_len", "metrics.tps")
            c = claims[claims["metric"] == "tps"]
            axes[0].scatter(c["seq_len"], c["value"], marker="x", color="k", label="paper claims (tokens/s)")
            axes[0].set_xscale("log", base=2)
            axes[0].set_yscale("log")
            axes[0].set_xlabel("sequence length (tokens, log scale)")
            axes[0].set_ylabel("TPS: (input + output tokens) / e2e s")
            axes[0].set_title(hardware_note(d), fontsize=9)
            axes[0].legend(fontsize=7)
        _line_by_strategy(axes[1], means, "seq_len", "decode_tps_per_gpu")
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("sequence length (tokens, log scale)")
        axes[1].set_ylabel("decode tokens/s per GPU")
        axes[1].legend(fontsize=7)
    files += _save(fig, out, "tps")

    # speedup bars
    lay = paper_layout(df, claims, baseline, fa_pool)
    fig, ax = plt.subplots(figsize=(7, 4))
    if lay.empty:
        _empty(ax, "baseline + FA Pool pairs")
    else:
        labels = [f"{int(L)}\n{s}" for L, s in zip(lay["seq_len"], lay["source"])]
        x = range(len(lay))
        claimed = lay["claim_tpot_speedup"].astype(float)
        ax.bar([i - 0.2 for i in x], lay["tpot_speedup"], width=0.4, label=f"{lay['fa_pool'][0]} vs {lay['baseline'][0]} (this harness)")
        if claimed.notna().any():  # the paper claims speed-ups at its lengths only: a legend entry only with a bar
            ax.bar([i + 0.2 for i in x], claimed, width=0.4, color="lightgray", edgecolor="k", hatch="//",
                   label=f"paper claim ({PAPER_HARDWARE})")
        ax.set_title(hardware_note(d) if claimed.notna().any() else "no paper claim at these lengths", fontsize=9)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_xlabel("sequence length (tokens) / source")
        ax.set_ylabel("TPOT speed-up (baseline TPOT / FA Pool TPOT)")
        ax.legend(fontsize=7)
    files += _save(fig, out, "speedup")

    for field, name, xlabel in (("config.strategy.pool.size", "pool_scaling", "attention pool size (GPUs)"),
                                ("config.strategy.pool.threshold", "threshold_sweep", "threshold (tokens)")):
        s = swept(df, field)
        fig, ax = plt.subplots(figsize=(7, 4))
        if s.empty or s[field].nunique() < 2:
            _empty(ax, f"{name.replace('_', ' ')} sweep")
        else:
            for (source, L), g in s.groupby(["source", "seq_len"]):
                ax.plot(g[field], g["metrics.mean_tpot_ms"], marker="o", label=f"{source}, length {L:g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean TPOT (ms)")
            if name == "pool_scaling":
                ax.axvline(24, color="gray", ls=":", label="paper claim: plateau beyond 24")
            else:
                ax.axvline(4096, color="gray", ls=":", label="paper's threshold 4096")
            ax.legend(fontsize=7)
        files += _save(fig, out, name)

    # overhead breakdown, stacked
    bt = breakdown_table(df)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if bt.empty:
        _empty(ax, "breakdowns")
    else:
        mixed = bt["source"].nunique() > 1  # the source letter only where both kinds are drawn
        labels = [f"{r.strategy}:{r.role} {length_label(r.seq_len)}" + (f" ({r.source[0]})" if mixed else "")
                  for r in bt.itertuples()]
        fig.set_size_inches(max(9, 0.32 * len(bt) + 3), 5)
        bottom = [0.0] * len(bt)
        for p in PHASES:
            ax.bar(range(len(bt)), bt[p], bottom=bottom, label=p)
            bottom = [a + b for a, b in zip(bottom, bt[p])]
        ax.set_xticks(range(len(bt)), labels, fontsize=8, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(bt) - 0.4)
        ax.set_xlabel("strategy:role sequence length")
        ax.set_ylabel("fraction of the role's time")
        ax.set_title("overhead breakdown per role" + (" (m = measured, p = projected)" if mixed else
                                                      f" ({bt['source'].iloc[0]})"))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    files += _save(fig, out, "breakdown")

    mt = memory_table(df)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if mt.empty:
        _empty(ax, "memory figures")
    else:  # pipeline stages shown as one role (their max); one bar group per strategy and role
        mt = mt.assign(role=mt["role"].str.replace(r"^stage\d+$", "stage", regex=True))
        mt["who"] = mt["strategy"] + ":" + mt["role"] + " (" + mt["source"].str[0] + ")"
        piv = mt.pivot_table(index="who", columns="seq_len", values="peak_gb", aggfunc="max")
        piv.plot.bar(ax=ax, width=0.8)
        ax.set_xticklabels(piv.index, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("strategy:role (m = measured, p = projected)")
        ax.set_yscale("log")
        ax.set_ylabel("peak memory per GPU of the role (GB, log)")
        ax.legend(title="sequence length", fontsize=7)
        for role, val in (("base", 65), ("pool", 45)):
            ax.axhline(val, ls=":", color="gray")
            ax.text(len(piv) - 0.5, val, f"paper claim: {role} {val} GB", fontsize=7, ha="right", va="bottom")
    files += _save(fig, out, "memory")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if means.empty:
        _empty(ax, "ok runs")
    else:
        for (source, strategy), g in means.groupby(["source", "strategy"]):
            g = g.sort_values("seq_len")
            pts = ax.plot(g["decode_tps_per_gpu"], g["metrics.mean_tpot_ms"], label=f"{strategy} ({source})",
                          marker="o" if source == "measured" else "s", linestyle=":", linewidth=0.8)
            for i, (L, tps, tpot) in enumerate(zip(g["seq_len"], g["decode_tps_per_gpu"], g["metrics.mean_tpot_ms"])):
                # above and below in turn: neighbouring lengths of one strategy may land on the same spot
                ax.annotate(length_label(L), (tps, tpot), textcoords="offset points", xytext=(4, 3 if i % 2 else -9),
                            fontsize=7, color=pts[0].get_color())
        _log_axes(ax, "decode tokens/s per GPU (log; right is better)", "mean TPOT (ms, log; down is better)",
                  "Pareto: latency vs per-GPU throughput (point labels: sequence length)")
    files += _save(fig, out, "pareto")

    fig, ax = plt.subplots(figsize=(7, 4))
    el = d[d["elasticity"].notna()] if not d.empty and "elasticity" in d else pd.DataFrame()
    if el.empty:
        _empty(ax, "FA Pool elasticity logs")
    else:
        def pooled(text):  # how many sequences went to the pool: show the run with the most going on
            return len({s for e in json.loads(text) for s in e["pool_ranks_per_seq"]})

        r = el.loc[el["elasticity"].map(pooled).idxmax()]
        log = [e for e in json.loads(r["elasticity"]) if e["step"] != "finish"]
        seqs = sorted({s for e in log for s in e["pool_ranks_per_seq"]}, key=int)
        styles = ["-", "--", ":", "-."]
        for i, s in enumerate(seqs):  # whole ranks; sequences with equal counts overlap, told apart by width and dash
            ax.step(range(len(log)), [len(e["pool_ranks_per_seq"].get(s, [])) for e in log], where="post",
                    label=f"seq {s}", linestyle=styles[i % len(styles)], linewidth=max(1.0, 3.5 - 0.8 * i))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2 = ax.twinx()
        ax2.plot(range(len(log)), [e["blocks_held"] for e in log], "k--", label="pool KV blocks held (right axis)")
        ax2.set_ylabel("pool KV blocks held")
        ax2.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("step (0 = prefill)")
        ax.set_ylabel("pool ranks per sequence (0 = on the base)")
        ax.set_title(f"elasticity: {r['strategy']}, {r['config.workload.name']} ({r['source']})")
        ax.legend(fontsize=7, loc="upper left")
    files += _save(fig, out, "elasticity")
    return files


def _write(t: pd.DataFrame, out: Path, name: str, title: str) -> list[Path]:
    md, tex = out / f"{name}.md", out / f"{name}.tex"
    split = t.attrs.get("split_by") or []
    note = (f"Rows are also split by {', '.join(split)}: these differ between the records and are not averaged "
            "over.\n\n") if split else ""
    if t.empty:
        md.write_text(f"# {title}\n\n(no rows: the results hold no runs of this kind)\n")
        tex.write_text(f"% {title}: no rows\n")
    else:
        md.write_text(f"# {title}\n\n{note}" + t.to_markdown(index=False, floatfmt=".4g") + "\n")
        caption = title + (f" (rows also split by {', '.join(split)})" if split else "")
        tex.write_text(t.to_latex(index=False, float_format="%.4g", na_rep="--", caption=caption))
    return [md, tex]


def report(root: str | Path, out: str | Path | None = None, baseline: str | None = None, fa_pool: str | None = None) -> dict:
    root = Path(root)
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df, bad = collect(root)
    claims = load_claims()
    files = []
    if not df.empty:
        df.to_csv(out / "results.csv", index=False)
        df.to_parquet(out / "results.parquet", index=False)
        files += [out / "results.csv", out / "results.parquet"]
    tables = {
        "paper_layout": (paper_layout(df, claims, baseline, fa_pool), "Baseline vs FA Pool per length, beside the paper's claims"),
        "static_vs_fapool": (static_vs_fapool(df, fa_pool), "Each static strategy vs FA Pool"),
        "iso_gpu": (iso_gpu(df), "Equal GPU counts: per-GPU metrics"),
        "memory": (memory_table(df), "Peak memory per GPU role (GB)"),
        "breakdown": (breakdown_table(df), "Overhead breakdown per role (fractions of the role's time)"),
        "timeline": (timeline_table(df), "Where a decode step goes per GPU role, from the profiled pass (ms per "
                                         "step: compute = non-NCCL kernels, NCCL alone, idle)"),
        "pool_scaling": (swept(df, "config.strategy.pool.size"), "FA Pool by pool size"),
        "threshold_sweep": (swept(df, "config.strategy.pool.threshold"), "FA Pool by threshold"),
    }
    tables["serving"] = (serving_table(df), "Trace replays: latency percentiles, throughput and goodput per strategy "
                                            "and load (equal GPU counts together)")
    for name, (t, title) in tables.items():
        files += _write(t, out, name, title)
    files += plot_all(df, claims, out, baseline, fa_pool)
    files += plot_serving(df, out)
    (out / "skipped.txt").write_text("".join(f"{p}: {why}\n" for p, why in bad) or "(none)\n")
    return {"frame": df, "bad": bad, "tables": {k: v[0] for k, v in tables.items()}, "files": files, "out": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--out", default=None, help="where the report goes (default RESULTS_DIR/report)")
    ap.add_argument("--baseline", default=None, help="static strategy of the paper layout (default tp8_pp2, else the first)")
    ap.add_argument("--fa-pool", default=None, help="FA Pool strategy (default fa_pool, else the first)")
    args = ap.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        raise SystemExit(f"fapool-report: {args.results_dir} is not a directory; give the results directory of a run or "
                         f"sweep (e.g. results/sweeps/<time>)")
    r = report(args.results_dir, args.out, args.baseline, args.fa_pool)
    print(f"{len(r['frame'])} records loaded, {len(r['bad'])} skipped")
    for p, why in r["bad"]:
        print(f"  skipped {p}: {why}")
    print((r["out"] / "paper_layout.md").read_text())
    print(f"tables and plots in {r['out']}")


if __name__ == "__main__":
    main()
