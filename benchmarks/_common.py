"""Pieces the kernel micro-benchmarks share: a timer, the JSON report (card, date, command, rows), and parsing of
`K=V,...` settings on a command line."""

from __future__ import annotations

import ast
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path


def kernel_device(preset: str, dtype: str) -> tuple | None:
    """(cpu, device, dtype) for a kernel micro-benchmark: ``preset`` 'cpu' is the Triton interpreter in float32
    (TRITON_INTERPRET is set here, so call this before importing reldl.kernels), else CUDA in ``dtype``; None,
    after a message, where no GPU is present."""
    import os

    if preset == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if preset == "cpu":
        return True, "cpu", torch.float32
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --preset cpu)", file=sys.stderr)
        return None
    return False, "cuda", getattr(torch, dtype)


def timer(cpu: bool) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: triton.testing.do_bench's median on the GPU; one warm call, wall clock, on the CPU
    (the Triton interpreter: a smoke run, not a measurement)."""
    if cpu:

        def bench(fn) -> float:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        return bench
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100))


def write_report(out: str, benchmark: str, rows: list[dict], *, preset: str, dtype, cpu: bool) -> None:
    import torch

    card = torch.cuda.get_device_name() if not cpu else f"cpu ({platform.processor() or platform.machine()})"
    report = dict(
        benchmark=benchmark,
        card=card,
        dtype=str(dtype),
        preset=preset,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        torch=torch.__version__,
        rows=rows,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def parse_settings(text: str, what: str) -> dict:
    """'K=V,K2=V2' -> {K: V as a Python literal, else the text}; `what` names the option in the error."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, val = part.partition("=")
        if not sep:
            sys.exit(f"{what} entry {part!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = val.strip()
    return out
