"""The README's answer table (in its first 40 lines) against the committed result sets each row cites: every number
of the table is recomputed from its source and compared at the precision the README prints, and the setup a row
names (GPU counts, batch, lengths, requests, rates) is checked against the same records."""
import json
import re
import statistics

import pytest

from harness.collect import collect
from harness.report import load_claims, paper_layout
from harness.serving.report import serving_table
from tests.conftest import ROOT

README = ROOT / "README.md"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def answer_rows() -> list[dict]:
    """The first Markdown table of the README's first 40 lines, as dicts by header."""
    lines = README.read_text().splitlines()[:40]
    table = [line for line in lines if line.startswith("|")]
    header = cells(table[0])
    return [dict(zip(header, cells(line))) for line in table[2:]]


def numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def source_path(row: dict):
    """The path in the row's source column (its first code span)."""
    return ROOT / re.search(r"`([^`]+)`", row["source"]).group(1)


def tokens(text: str) -> int:
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def length_range(finding: str) -> tuple[int, int]:
    lo, hi = re.search(r"(\d+K?)-(\d+K?) tokens", finding).groups()
    return tokens(lo), tokens(hi)


def frame(path):
    df, bad = collect(path)
    assert not bad and not df.empty, path
    return df[df["status"] == "ok"]


def tpot(df, strategy) -> dict:
    d = df[df["config.strategy.name"] == strategy]
    return dict(zip(d["seq_len"], d["metrics.mean_tpot_ms"]))


def check_setup(finding: str, df) -> None:
    """GPU counts and the batch size the finding names are those of the records."""
    for n in re.findall(r"\((\d+) GPUs\)", finding):
        assert int(n) in set(df["metrics.num_gpus"]), f"{n} GPUs not in the set: {finding}"
    for n in re.findall(r"batch (\d+)", finding):
        assert set(df["config.workload.batch_size"]) == {int(n)}, finding


def paper_ratio(row, column):
    """min and max of a paper_layout ratio (FA Pool 8+32 over TP8/PP2) over the lengths the finding names."""
    df = frame(source_path(row))
    check_setup(row["finding"], df)
    lo, hi = length_range(row["finding"])
    lay = paper_layout(df, load_claims())
    assert {lo, hi} <= set(lay["seq_len"]), row["finding"]
    v = lay.loc[lay["seq_len"].between(lo, hi), column]
    return [v.min(), v.max()]


def claimed_speedup(row):
    claims = load_claims()
    assert source_path(row) == ROOT / "results" / "reference" / "paper_claims.csv"
    lay = paper_layout(frame(ROOT / "results" / "projected" / "paper_table"), claims)
    lo, hi = length_range(row["finding"])
    v = lay.loc[lay["seq_len"].between(lo, hi), "claim_tpot_speedup"].astype(float)
    assert v.notna().all() and {lo, hi} <= set(lay["seq_len"])
    return [v.min(), v.max()]


def tpot_ratio(numerator, denominator, every_length_faster=False):
    def compute(row):
        df = frame(source_path(row))
        check_setup(row["finding"], df)
        lo, hi = length_range(row["finding"])
        a, b = tpot(df, numerator), tpot(df, denominator)
        lengths = sorted(L for L in set(a) & set(b) if lo <= L <= hi)
        assert lengths[0] == lo and lengths[-1] == hi, row["finding"]
        ratios = [a[L] / b[L] for L in lengths]
        if every_length_faster:  # "at every length": the denominator's TPOT is lower at each one
            assert min(ratios) > 1 and lengths == sorted(set(a) & set(b)), ratios
        return [min(ratios), max(ratios)]

    return compute


def serving(path):
    df = frame(path)
    t = serving_table(df)
    return df, t, t.groupby(["strategy", "GPUs"])[["goodput req/s", "goodput/GPU"]].max()


def check_requests_and_rates(finding, df, rates):
    n = re.search(r"first ([\d,]+) requests", finding).group(1).replace(",", "")
    assert set(df["metrics.requests"]) == {int(n)}, finding
    lo, hi = re.search(r"at ([\d.]+)-([\d.]+) req/s", finding).groups()
    assert (float(lo), float(hi)) == (min(rates), max(rates)), finding


def best_goodput_16(row):
    df, t, best = serving(source_path(row))
    check_requests_and_rates(row["finding"], df, t["offered req/s"])
    assert "16 GPUs" in row["finding"]
    return [best.loc[(s, 16), "goodput req/s"] for s in ("tp8_pp2", "dcp_t8_k8_pp2", "fa_pool")]


def fa_pool_40(row):
    _, _, best = serving(source_path(row))
    assert "(40 GPUs)" in row["finding"]
    return [best.loc[("fa_pool", 40), "goodput req/s"], best.loc[("fa_pool", 40), "goodput/GPU"],
            best.loc[("tp8_pp2", 16), "goodput/GPU"]]


def model_optimism(row):
    from harness.serving.virtual import check_serving

    t = check_serving(source_path(row))
    assert (t["TTFT p99 error"] < 0).all() and (t["TPOT p50 error"] < 0).all()  # "optimistic": below the measured
    ttft, tpot_ = -100 * t["TTFT p99 error"], -100 * t["TPOT p50 error"]
    return [ttft.min(), ttft.max(), tpot_.min(), tpot_.max()]


def model_error(row):
    from harness.serving.virtual import check_serving

    t = check_serving(source_path(row))
    ttft, tpot_ = 100 * t["TTFT p99 error"].abs(), 100 * t["TPOT p50 error"].abs()
    assert (t["within bounds"] == ((tpot_ <= 15) & (ttft <= 25))).all()  # the check's verdict, by its own bounds
    return [ttft.min(), ttft.max(), tpot_.min(), tpot_.max()]


def measured_goodput(row):
    df = frame(source_path(row))
    check_requests_and_rates(row["finding"], df, df["metrics.offered_rate"])
    assert set(df["config.strategy.name"]) == {"reference"} and "reference" in row["finding"]
    return [df["metrics.goodput"].max()]


def graph_replay_vs_alone(row):
    bench = json.loads(source_path(row).read_text())
    return [statistics.median(s["replay / alone"] for s in bench["steps_alone"] if s["kind"] == "decode")]


# (words that pick the row out, how its numbers are computed); every row of the table has exactly one
CHECKS = [
    ("TPOT speed-up at 8K-16K", lambda row: paper_ratio(row, "tpot_speedup")),
    ("FA Pool is slower", lambda row: paper_ratio(row, "tpot_speedup")),
    ("TPS (the prefill", lambda row: paper_ratio(row, "tps_speedup")),
    ("the paper's claimed", claimed_speedup),
    ("TP8/PP4 (32 GPUs) decodes faster than FA Pool 8+32", tpot_ratio("fa_pool", "tp8_pp4", every_length_faster=True)),
    ("equal GPUs", tpot_ratio("fa_pool_iso16", "tp8_pp2")),
    ("best goodput", best_goodput_16),
    ("FA Pool 8+32 (40 GPUs): goodput", fa_pool_40),
    ("how optimistic", model_optimism),
    ("the newest one-GPU replays", model_error),
    ("peak goodput", measured_goodput),
    ("CUDA graph replay", graph_replay_vs_alone),
]


def test_the_answer_table_is_in_the_first_40_lines_and_every_row_is_checked():
    rows = answer_rows()
    picked = [[words for words, _ in CHECKS if words in row["finding"]] for row in rows]
    assert all(len(p) == 1 for p in picked), list(zip([r["finding"] for r in rows], picked))
    assert sorted(p[0] for p in picked) == sorted(words for words, _ in CHECKS)


@pytest.mark.parametrize("words,compute", CHECKS, ids=[w for w, _ in CHECKS])
def test_each_number_of_the_answer_is_what_its_source_gives(words, compute):
    (row,) = [r for r in answer_rows() if words in r["finding"]]
    assert source_path(row).exists(), row["source"]
    quoted, computed = numbers(row["number"]), compute(row)
    assert len(quoted) == len(computed), (row["number"], computed)
    for text, value in zip(quoted, computed):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert f"{value:.{decimals}f}" == text, f"{row['finding']}: README says {text}, {row['source']} gives {value}"

