# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fapool-bench: analysis of a results directory
#
# Loads every `result.json` under `RESULTS_DIR` (set the environment variable `FAPOOL_RESULTS`, or edit the
# cell below), then shows the tables and plots of `fapool-report` beside the paper's claims.
# Measured and projected records are kept apart by the `source` column; claims are labelled as claims.
# Metric definitions: the top-level README, "Metrics".
#
# Run it from the repository root: `jupyter execute notebooks/analysis.ipynb`. It writes only under `OUT`
# (`FAPOOL_REPORT_OUT`, default `results/notebook/`, git-ignored), never into a committed result set.
# Relative paths in the variables are taken from the repository root.

# %%
import os
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

import harness
from harness.collect import natural_key
from harness.report import load_claims, report

ROOT = Path(harness.__file__).resolve().parent.parent  # the checkout (the kernel runs in notebooks/)
RESULTS_DIR = ROOT / os.environ.get("FAPOOL_RESULTS", "results/projected/paper_table")
OUT = ROOT / os.environ.get("FAPOOL_REPORT_OUT", "results/notebook/report")
r = report(RESULTS_DIR, OUT)
df = r["frame"]
print(f"{len(df)} records from {RESULTS_DIR}; {len(r['bad'])} files skipped")
for path, why in r["bad"]:
    print(f"  skipped {path}: {why}")

# %% [markdown]
# ## The runs

# %%
cols = ["source", "status", "config.strategy.name", "config.workload.name", "seq_len", "metrics.num_gpus",
        "metrics.mean_tpot_ms", "metrics.p99_tpot_ms", "metrics.tps", "metrics.decode_tps"]
display(df[[c for c in cols if c in df]].sort_values(["source", "config.workload.name", "config.strategy.name"],
                                                    key=natural_key))

# %% [markdown]
# ## Baseline vs FA Pool, in the paper's layout (claims beside)

# %%
display(Markdown((OUT / "paper_layout.md").read_text()))
display(Image(OUT / "tpot_vs_length.png"))
display(Image(OUT / "speedup.png"))

# %% [markdown]
# ## Each static strategy vs FA Pool, and equal GPU counts

# %%
display(Markdown((OUT / "static_vs_fapool.md").read_text()))
display(Markdown((OUT / "iso_gpu.md").read_text()))
display(Image(OUT / "tps.png"))
display(Image(OUT / "pareto.png"))

# %% [markdown]
# ## Where the time goes, and memory per role

# %%
display(Markdown((OUT / "breakdown.md").read_text()))
display(Image(OUT / "breakdown.png"))
# runs with profile=true on a GPU: each role's decode step split into compute, NCCL alone and idle
display(Markdown((OUT / "timeline.md").read_text()))
display(Markdown((OUT / "memory.md").read_text()))
display(Image(OUT / "memory.png"))

# %% [markdown]
# ## Pool size, threshold, elasticity

# %%
for name in ("pool_scaling", "threshold_sweep", "elasticity"):
    display(Image(OUT / f"{name}.png"))

# %% [markdown]
# ## Under real traffic: trace replays (serving mode)
#
# Latency against load and goodput against rate, one line per strategy (its GPU count in the label), the
# per-request CDFs, and KV and FA Pool occupancy over a replay. `FAPOOL_SERVING` points at a results directory with
# trace replays (default: the projected paper configurations under the Mooncake trace).

# %%
from harness.serving.report import serving_table  # noqa: E402

SERVING_DIR = ROOT / os.environ.get("FAPOOL_SERVING", "results/projected/serve_paper_a100")
SERVING_OUT = ROOT / os.environ.get("FAPOOL_SERVING_OUT", OUT / "serving")
served = report(SERVING_DIR, SERVING_OUT)["frame"] if SERVING_DIR.is_dir() else pd.DataFrame()
table = serving_table(served)
print(f"{len(table)} trace replays under {SERVING_DIR}")
display(table)
for name in ("latency_vs_load", "goodput_vs_rate", "request_cdfs", "kv_occupancy", "pool_occupancy"):
    if (SERVING_OUT / f"{name}.png").exists():
        display(Image(SERVING_OUT / f"{name}.png"))

# %% [markdown]
# ## The paper's claims as data (with the contradictions noted)

# %%
claims = load_claims()
display(claims[claims["note"].notna()][["claim_id", "section", "value", "unit", "note"]])
