"""Trace workloads: the Mooncake and Azure readers, windows, re-timing, re-sizing, and every bad input's message."""
import json

import numpy as np
import pytest

from harness.traces import TraceConfig, TraceError, load_trace, prompt_tokens

MOONCAKE = "results/reference/traces/mooncake_conversation_sample.jsonl"
AZURE = "results/reference/traces/azure_conv_sample.csv"


def write_mooncake(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_samples_load_with_their_lengths():
    m = load_trace(TraceConfig(path=MOONCAKE))
    assert len(m) == 300 and m.arrival_s[0] == 0 and np.all(np.diff(m.arrival_s) >= 0)
    first = json.loads(open(MOONCAKE).readline())
    assert (m.prompt_len[0], m.output_len[0]) == (first["input_length"], first["output_length"])
    assert m.hash_ids[0] == first["hash_ids"]  # kept, not used
    a = load_trace(TraceConfig(path=AZURE, format="azure"))
    assert len(a) == 300 and (a.prompt_len[0], a.output_len[0]) == (374, 44)
    assert a.arrival_s[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)


def test_window_time_range_scales_and_rates():
    full = load_trace(TraceConfig(path=MOONCAKE))
    assert len(load_trace(TraceConfig(path=MOONCAKE, first_n=10))) == 10
    ranged = load_trace(TraceConfig(path=MOONCAKE, start_s=30, end_s=60))
    raw = np.array([json.loads(line)["timestamp"] / 1e3 for line in open(MOONCAKE)])
    assert len(ranged) == int(((raw >= 30) & (raw < 60)).sum()) and ranged.arrival_s[0] == 0
    half = load_trace(TraceConfig(path=MOONCAKE, time_scale=0.5))
    assert half.arrival_s[-1] == pytest.approx(full.arrival_s[-1] / 2)
    rated = load_trace(TraceConfig(path=MOONCAKE, rate=10.0))
    assert (len(rated) - 1) / rated.arrival_s[-1] == pytest.approx(10.0)
    scaled = load_trace(TraceConfig(path=MOONCAKE, length_scale=0.5, output_scale=0.25))
    assert scaled.prompt_len[0] == round(full.prompt_len[0] * 0.5) and scaled.output_len[0] == round(full.output_len[0] / 4)
    poisson = load_trace(TraceConfig(path=MOONCAKE, arrival="poisson", rate=4.0, seed=3))
    assert poisson.arrival_s[-1] / (len(poisson) - 1) == pytest.approx(0.25, rel=0.2)
    again = load_trace(TraceConfig(path=MOONCAKE, arrival="poisson", rate=4.0, seed=3))
    assert np.array_equal(poisson.arrival_s, again.arrival_s)
    closed = load_trace(TraceConfig(path=MOONCAKE, arrival="closed", concurrency=4))
    assert not closed.arrival_s.any()


def test_max_context_refuses_or_clips_and_counts():
    full = load_trace(TraceConfig(path=MOONCAKE))
    over = int((full.prompt_len + full.output_len > 16384).sum())
    assert over > 0
    refused = load_trace(TraceConfig(path=MOONCAKE, max_context=16384))
    assert refused.refused_over_context == over and len(refused) == len(full) - over
    clipped = load_trace(TraceConfig(path=MOONCAKE, max_context=16384, over_context="clip"))
    assert clipped.clipped_over_context == over and len(clipped) == len(full)
    assert (clipped.prompt_len + clipped.output_len).max() <= 16384 and clipped.prompt_len.min() >= 1


def test_prompts_are_seeded_per_request():
    a, b = prompt_tokens(0, 5, 100, 512), prompt_tokens(0, 5, 100, 512)
    assert np.array_equal(a, b) and not np.array_equal(a, prompt_tokens(0, 6, 100, 512))
    assert a.min() >= 0 and a.max() < 512 and len(a) == 100


@pytest.mark.parametrize("rows,message", [
    ('{"timestamp": 0, "input_length": 5, "output_length": 2}\nnot json\n', ":2: not a JSON object"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 2}\n', ":1: input_length=0 must be a whole number >= 1"),
    ('{"timestamp": 0, "input_length": 5, "output_length": -3}\n', ":1: output_length=-3 must be a whole number >= 1"),
    ('{"timestamp": 0, "input_length": 5}\n', ":1: no field 'output_length'"),
    ('{"timestamp": 10, "input_length": 5, "output_length": 2}\n{"timestamp": 5, "input_length": 5, "output_length": 2}\n',
     ":2: timestamp goes back in time"),
    ("", "no requests in the file"),
])
def test_bad_mooncake_input_names_file_and_line(tmp_path, rows, message):
    path = tmp_path / "t.jsonl"
    path.write_text(rows)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_trace(TraceConfig(path=str(path)))
    assert str(path) in str(e.value)


def test_unsorted_can_be_sorted(tmp_path):
    path = write_mooncake(tmp_path / "t.jsonl", [{"timestamp": 10, "input_length": 5, "output_length": 2},
                                                 {"timestamp": 5, "input_length": 7, "output_length": 2}])
    r = load_trace(TraceConfig(path=path, unsorted="sort"))
    assert list(r.prompt_len) == [7, 5] and list(r.source_line) == [2, 1]


def test_bad_azure_input(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,2\nyesterday,3,4\n")
    with pytest.raises(TraceError, match=r"a.csv:3: TIMESTAMP='yesterday'"):
        load_trace(TraceConfig(path=str(path), format="azure"))
    path.write_text("time,in,out\n")
    with pytest.raises(TraceError, match="header must be TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_trace(TraceConfig(path=str(path), format="azure"))


def test_missing_file_and_empty_window_and_bad_fields(tmp_path):
    with pytest.raises(TraceError, match=r"workload.trace.path='nope.jsonl': no such file"):
        load_trace(TraceConfig(path="nope.jsonl"))
    with pytest.raises(TraceError, match="the window .* holds no request"):
        load_trace(TraceConfig(path=MOONCAKE, start_s=10**6))
    with pytest.raises(TraceError, match="workload.trace.arrival=poisson needs workload.trace.rate > 0"):
        TraceConfig(arrival="poisson")
    with pytest.raises(TraceError, match="workload.trace.format='parquet'"):
        TraceConfig(format="parquet")
    with pytest.raises(TraceError, match="every request of the window exceeds workload.trace.max_context=2"):
        load_trace(TraceConfig(path=MOONCAKE, max_context=2))


def test_a_recorded_trace_is_found_by_name_or_its_first_requests_in_the_sample(tmp_path, monkeypatch):
    """A committed record names the trace file where it ran; elsewhere the file is found by its name in the
    project's trace folders, or, for a window of the full trace's first requests, in the shipped sample, whose
    lines are those; a window the sample cannot hold is an error naming where it looked."""
    from harness import traces

    kept = tmp_path / "kept"
    kept.mkdir()
    monkeypatch.setattr(traces, "TRACE_DIRS", (str(tmp_path / "empty"), str(kept)))
    elsewhere = "/nowhere/.traces/" + traces.FULL_TRACE_NAME
    small = traces.recorded_trace(TraceConfig(path=elsewhere, first_n=32, rate=4.0))
    assert small.path == str(traces.PROJECT_ROOT / traces.SAMPLE_PATH) and small.rate == 4.0
    assert len(load_trace(small)) == 32
    with pytest.raises(TraceError, match="nor is mooncake_conversation_trace.jsonl in the project's .*kept"):
        traces.recorded_trace(TraceConfig(path=elsewhere, first_n=600))
    with pytest.raises(TraceError, match="nowhere"):
        traces.recorded_trace(TraceConfig(path=elsewhere, first_n=32, start_s=5.0))  # not the first requests
    (kept / traces.FULL_TRACE_NAME).write_text((traces.PROJECT_ROOT / traces.SAMPLE_PATH).read_text())
    found = traces.recorded_trace(TraceConfig(path=elsewhere, first_n=600))
    assert found.path == str((kept / traces.FULL_TRACE_NAME).resolve())
    here = TraceConfig(path=traces.SAMPLE_PATH, first_n=600)
    assert traces.recorded_trace(here) is here  # a path that exists is kept


def test_the_shipped_sample_is_the_full_traces_first_lines():
    from harness import traces

    full = next((traces.PROJECT_ROOT / d / traces.FULL_TRACE_NAME for d in traces.TRACE_DIRS
                 if (traces.PROJECT_ROOT / d / traces.FULL_TRACE_NAME).is_file()), None)
    if full is None:
        pytest.skip("the full Mooncake conversation trace is not in the project's trace folders")
    sample = (traces.PROJECT_ROOT / traces.SAMPLE_PATH).read_text().splitlines()
    assert len(sample) == traces.SAMPLE_REQUESTS
    with open(full) as f:
        assert [next(f).rstrip("\n") for _ in range(traces.SAMPLE_REQUESTS)] == sample
