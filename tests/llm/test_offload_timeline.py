"""timeline.summarize: a step's GPU time split per stream into busy time and idle gaps named by their cause."""

from __future__ import annotations

import pytest

from reldl.llm.offload.timeline import Call, Job, format_summary, merge, summarize


def test_compute_gaps_are_named_by_the_input_that_came_last():
    calls = [
        # issued at 0, weights arrive at 1.0: idle 1.0 for the weights, then busy 1.0
        Call(1, 0, host=0.0, host_end=0.1, end=2.0, deps={"weights": 1.0}),
        # issued late (host at 2.5): idle 0.5 for the host; finishes right after its issue ended -> host-bound
        Call(1, 1, host=2.5, host_end=3.0, end=3.00005, deps={"act": 0.2}),
        # its hidden states arrive at 4.0 (after issue at 3.1): idle 1.0 for "act"; the cache arrives mid-call
        Call(2, 0, host=3.1, host_end=3.2, end=5.0, deps={"weights": 0.5, "act": 4.0}, inner={"cache": 4.5}),
    ]
    s = summarize(calls, [], tol=1e-4)
    c = s["compute"]
    assert c["idle_weights"] == pytest.approx(1.0)
    assert c["idle_host"] == pytest.approx(0.5)
    assert c["idle_act"] == pytest.approx(4.0 - 3.00005)
    assert c["busy"] == pytest.approx(1.0 + 0.50005 + 1.0)
    assert c["busy_waiting_cache"] == pytest.approx(0.5)
    assert c["host_bound_calls"] == 1 and c["calls"] == 3
    assert c["tail"] == 0.0
    assert s["gpu_step_s"] == 5.0 and s["host_issue_s"] == 3.2
    assert s["host_per_call_s"] == pytest.approx((0.1 + 0.5 + 0.1) / 3)


def test_copy_stream_gaps_are_host_or_dependency():
    jobs = [
        Job("h2d", 100, host=0.0, start=0.0, end=1.0),
        Job("h2d", 50, host=0.1, start=1.5, end=2.0),  # issued early, started late: waited for an event
        Job("h2d", 50, host=2.7, start=2.7, end=3.0),  # started as soon as it was issued: the host was late
        Job("d2h", 10, host=0.0, start=0.5, end=0.6),
    ]
    calls = [Call(1, 0, host=0.0, host_end=0.1, end=4.0)]
    s = summarize(calls, jobs, tol=1e-3)
    h = s["h2d"]
    assert h["busy"] == pytest.approx(1.8)
    assert h["idle_dependency"] == pytest.approx(0.5)
    assert h["idle_host"] == pytest.approx(0.7)
    assert h["tail"] == pytest.approx(1.0) and h["jobs"] == 3 and h["bytes"] == 200
    assert s["d2h"]["idle_dependency"] == pytest.approx(0.5) and s["d2h"]["tail"] == pytest.approx(3.4)
    # every second of the step is accounted for, per stream
    for name in ("h2d", "d2h", "compute"):
        parts = {k: v for k, v in s[name].items() if k in ("busy", "tail") or k.startswith("idle_")}
        assert sum(parts.values()) == pytest.approx(s["gpu_step_s"])


def test_overlapping_jobs_are_not_counted_twice():
    jobs = [Job("h2d", 1, host=0.0, start=0.0, end=2.0), Job("h2d", 1, host=0.0, start=1.0, end=3.0)]
    s = summarize([], jobs)
    assert s["h2d"]["busy"] == pytest.approx(3.0)


def test_merge_means_over_steps_and_formats():
    a = summarize([Call(1, 0, 0.0, 0.1, 1.0, {"weights": 0.5})], [Job("h2d", 8, 0.0, 0.0, 0.5)])
    b = summarize([Call(1, 0, 0.0, 0.1, 3.0, {"weights": 1.5})], [Job("h2d", 8, 0.0, 0.0, 1.5)])
    m = merge([a, b])
    assert m["gpu_step_s"] == pytest.approx(2.0)
    assert m["compute"]["idle_weights"] == pytest.approx(1.0)
    text = "\n".join(format_summary(m))
    assert "weights 1.000" in text and "h2d" in text
    assert merge([]) == {}
