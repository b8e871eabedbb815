"""Where a decode step's time goes on the GPU: the offloaded executor's timeline mode, and its summary.

The profile mode (executor.py) serialises every copy and compute call to time it alone, which says how much work a
step holds but not why the overlapped step is longer than its busiest resource (OPT-66B on the H200: 2.58 s
against 2.17 s of host-to-device copies and 1.48 s of compute, benchmarks/RESULTS.md). The timeline mode changes
nothing in the schedule: it records a host timestamp and CUDA events around every copy job and compute call, and
after the step maps them onto one clock (GPU times relative to an event recorded right after the step's start
synchronisation; host times relative to that moment).

`summarize` then splits, per stream, the step into busy time and idle gaps, and names each gap's cause:
- compute stream, before a call can start: the host had not issued it yet ("host"), or the unit's weights / the
  batch's hidden states had not arrived ("weights", "act"); whichever came last. The KV cache is waited for inside
  the call, after the projections: "busy_waiting_cache" bounds how much of the busy time waited for it;
- a copy stream, before a job starts: the host issued it late ("host"), else it waited for an event (the compute
  it must follow, a store it reads: "dependency").
A gap's cause is the latest of the candidate times, within `tol` seconds (the host-to-GPU dispatch latency).

Pure Python on plain floats (seconds), so it is tested without a GPU.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Job:
    """One copy job: its stream ("h2d", "h2d_side", "d2h"), bytes, host issue time and GPU start / end."""

    stream: str
    nbytes: int
    host: float
    start: float
    end: float


@dataclass
class Call:
    """One compute call (unit, GPU batch): host times when its issue began and ended, GPU end, and the GPU times
    its inputs arrived: `deps`, waited for before its first kernel ("weights", "act"), and `inner`, waited for
    after some of its kernels ("cache": the attention follows the q / k / v projection); absent when resident."""

    unit: int
    batch: int
    host: float
    host_end: float
    end: float
    deps: dict[str, float] = field(default_factory=dict)
    inner: dict[str, float] = field(default_factory=dict)


def _cause(candidates: dict[str, float], start: float, tol: float, default: str) -> str:
    """The candidate whose time is latest and reaches `start` (within tol), else `default`."""
    name, t = max(candidates.items(), key=lambda kv: kv[1], default=(default, float("-inf")))
    return name if t >= start - tol else default


def summarize(calls: list[Call], jobs: list[Job], tol: float = 1e-4) -> dict:
    """Seconds per cause (see the module docstring) for one step; calls in issue order (the compute stream's)."""
    end = max([c.end for c in calls] + [j.end for j in jobs], default=0.0)
    out: dict = {"gpu_step_s": end, "host_issue_s": max((c.host_end for c in calls), default=0.0)}
    comp = defaultdict(float)
    prev = 0.0
    host_bound = 0
    for c in calls:
        ready = {"host": c.host, **c.deps}
        start = min(max([prev, *ready.values()]), max(c.end, prev))  # clock skew never makes a call start after its end
        if start > prev:
            comp["idle_" + _cause(ready, start, tol, "other")] += start - prev
        comp["busy"] += max(0.0, c.end - start)
        for name, t in c.inner.items():  # at most this much of the busy time waited for it
            comp["busy_waiting_" + name] += max(0.0, min(t, c.end) - start)
        host_bound += c.end <= c.host_end + tol  # the GPU finished as soon as the host had issued the call
        prev = max(prev, c.end)
    comp["tail"] = max(0.0, end - prev)
    out["compute"] = dict(comp, calls=len(calls), host_bound_calls=host_bound)
    if calls:
        out["host_per_call_s"] = sum(c.host_end - c.host for c in calls) / len(calls)
    by_stream: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        by_stream[j.stream].append(j)
    for name, js in sorted(by_stream.items()):
        s = defaultdict(float)
        prev = 0.0
        for j in sorted(js, key=lambda j: j.start):
            if j.start > prev:
                s["idle_" + _cause({"host": j.host}, j.start, tol, "dependency")] += j.start - prev
            s["busy"] += max(0.0, j.end - max(j.start, prev))
            prev = max(prev, j.end)
        s["tail"] = max(0.0, end - prev)
        out[name] = dict(s, jobs=len(js), bytes=sum(j.nbytes for j in js))
    return out


def merge(steps: list[dict]) -> dict:
    """Mean over steps of every number in `summarize`'s output (nested one level)."""
    if not steps:
        return {}
    out: dict = {}
    keys = {k for s in steps for k in s}
    for k in sorted(keys):
        vals = [s[k] for s in steps if k in s]
        if isinstance(vals[0], dict):
            sub = {kk for v in vals for kk in v}
            out[k] = {kk: sum(v.get(kk, 0.0) for v in vals) / len(steps) for kk in sorted(sub)}
        else:
            out[k] = sum(vals) / len(vals)
    return out


def format_summary(m: dict) -> list[str]:
    """Lines for bench_offload: per stream, busy and idle seconds by cause, per step."""
    lines = [f"gpu step {m.get('gpu_step_s', 0):.3f} s, host done issuing at {m.get('host_issue_s', 0):.3f} s"]
    if "host_per_call_s" in m:
        lines[0] += f", host {1e3 * m['host_per_call_s']:.2f} ms per call"
    for name in ("compute", "h2d", "h2d_side", "d2h"):
        s = m.get(name)
        if not s:
            continue
        idle = ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(s.items()) if k.startswith("idle_") and v > 0)
        waits = [f"{k[13:]} <= {v:.3f}" for k, v in sorted(s.items()) if k.startswith("busy_waiting_") and v > 0]
        extra = f", {s['host_bound_calls']:.0f} of {s['calls']:.0f} calls host-bound" if name == "compute" else ""
        extra += f", {s['bytes'] / 1e9:.2f} GB in {s['jobs']:.0f} jobs" if "jobs" in s else ""
        busy = f"busy {s['busy']:.3f} s" + (f" (waiting for {', '.join(waits)})" if waits else "")
        lines.append(f"{name:>9}: {busy}, idle [{idle or '-'}], tail {s['tail']:.3f} s{extra}")
    return lines
