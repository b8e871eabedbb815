"""The cost model's decisions on the cases the plan families exist for."""

from __future__ import annotations

from reldl.planner.cost import Workload, choose, estimate


def _choice(**kw) -> str:
    return choose(estimate(Workload(**kw)))[0].family


def test_duplicates_favour_dl_and_limit_favours_streaming_udf():
    base = dict(function="predict", rows=1e6, flops_per_row=2e6, relation_ok=True)
    assert _choice(**base, distinct=1e3, rows_needed=None) == "dl"  # one forward per distinct input
    assert _choice(**base, distinct=1e6, rows_needed=10) == "udf"  # stops after the first chunk


def test_memory_limit_below_working_set_leaves_relation():
    kw = dict(function="predict", rows=1e5, distinct=1e5, rows_needed=None, flops_per_row=2e6, relation_ok=True)
    kw.update(weight_bytes=3e7, activation_bytes_per_row=5e4)
    assert _choice(**kw) in ("dl", "udf")
    est = {e.family: e for e in estimate(Workload(**kw, memory_limit=2e7))}
    assert not est["dl"].feasible and not est["udf"].feasible and est["relation"].feasible
    assert _choice(**kw, memory_limit=2e7) == "relation"


def test_more_memory_never_makes_a_plan_infeasible():
    kw = dict(function="predict", rows=1e5, distinct=1e5, rows_needed=None, flops_per_row=2e6, relation_ok=True)
    kw.update(weight_bytes=3e7, activation_bytes_per_row=5e4)
    for lo, hi in [(1e7, 1e8), (1e8, 1e10)]:
        a = {e.family: e.feasible for e in estimate(Workload(**kw, memory_limit=lo))}
        b = {e.family: e.feasible for e in estimate(Workload(**kw, memory_limit=hi))}
        assert all(b[f] or not a[f] for f in a)


def test_large_llm_scans_favour_one_dl_batch_over_chunked_udf_calls():
    kw = dict(function="llm_generate", rows=100_000, distinct=100_000, max_tokens=64, device="cuda")
    assert _choice(**kw, rows_needed=None) == "dl"
    assert _choice(**kw, rows_needed=5) == "udf"


def test_llm_has_no_relation_plan():
    fams = {e.family for e in estimate(Workload("llm_generate", 10, 10, None, max_tokens=8))}
    assert fams == {"dl", "udf"}
