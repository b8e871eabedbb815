"""Host-to-device bandwidth from the offload arena's pinned buffers, against how much is pinned (issue 8).

    python benchmarks/bench_pinned.py                       # GPU: 8, 32 and 64 GiB, both pin methods
    python benchmarks/bench_pinned.py --footprints 8 96     # GiB pinned per row
    python benchmarks/bench_pinned.py --preset cpu          # smoke run: plain memory, tiny sizes

Why: on the H100 box the full-depth OPT-66B decode step moved its 111.8 GB at 37.8 GB/s while a 32 MiB pinned buffer
copies at about 50 GB/s (benchmarks/RESULTS.md, session 9). Each row makes `footprint` GiB of pinned host memory
the way the executor does (`tiers.Arena`, in buffers of the size a weight tensor or KV cache slab takes), with
`--pins` register (cudaHostRegister of prefaulted memory, the default) or alloc (cuMemHostAlloc), then times two
patterns side by side: streaming large copies over every buffer (weights: one layer's matrices each step) and 12 MB
copies at scattered offsets (a GPU batch's KV cache). The cost model's `ctog_bw` comes from a 32 MiB buffer; the
ratio column says how far the footprint moves it. Table to stdout, JSON (card, date, command, rows) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import write_report

GiB = 1 << 30


def stream_gbps(bufs, dst, piece: int, sync) -> float:
    """GB/s of `piece`-byte copies covering every buffer once, issued back to back."""
    sync()
    t, moved = time.perf_counter(), 0
    for b in bufs:
        for off in range(0, b.numel() - piece + 1, piece):
            dst[:piece].copy_(b[off : off + piece], non_blocking=True)
            moved += piece
    sync()
    return moved / (time.perf_counter() - t) / 1e9


def scattered_gbps(bufs, dst, piece: int, copies: int, sync) -> float:
    """GB/s of `copies` copies of `piece` bytes at offsets spread over all buffers (a fixed, prime-strided walk)."""
    sync()
    t = time.perf_counter()
    for i in range(copies):
        b = bufs[i % len(bufs)]
        off = (i * 7919 * piece) % max(1, b.numel() - piece)
        dst[:piece].copy_(b[off : off + piece], non_blocking=True)
    sync()
    return copies * piece / (time.perf_counter() - t) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--footprints", type=float, nargs="+", default=None, help="GiB pinned per row")
    ap.add_argument("--pins", nargs="+", default=["register", "alloc"], help="Arena pin methods to compare")
    ap.add_argument("--buffer-mib", type=int, default=680, help="size of each pinned buffer (a weight matrix)")
    ap.add_argument("--out", default="benchmarks/out/pinned.json")
    args = ap.parse_args()

    import torch

    from reldl.llm.offload.tiers import PIN_METHODS, Arena, DiskPool

    cpu = args.preset == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --preset cpu)", file=sys.stderr)
        return 1
    for pin in args.pins:
        if pin not in PIN_METHODS:
            ap.error(f"--pins: {pin!r} is not one of {', '.join(PIN_METHODS)}")
    dev = torch.device("cpu" if cpu else "cuda")
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    footprints = args.footprints or ([1 / 64, 1 / 32] if cpu else [8, 32, 64])
    buf_bytes = (1 << 20) if cpu else args.buffer_mib << 20
    big, small = (1 << 20, 64 << 10) if cpu else (buf_bytes, 12 << 20)
    dst = torch.empty(max(big, small), dtype=torch.uint8, device=dev)
    # the cost model's reference: a 32 MiB buffer from torch's pinned allocator
    ref_src = torch.empty(32 << 20, dtype=torch.uint8, pin_memory=not cpu)
    ref = stream_gbps([ref_src] * 8, dst, min(32 << 20, dst.numel()) if not cpu else 1 << 20, sync)
    rows = []
    print(f"reference (32 MiB pinned buffer): {ref:.1f} GB/s")
    print(f"{'pin':>9} | {'GiB':>6} | {'pin s':>6} | {'stream GB/s':>11} | {'12 MB scattered GB/s':>20} | stream / ref")
    for gib in footprints:
        for pin in args.pins:
            disk = DiskPool(None)
            arena = Arena(dev, disk, pin)
            n = max(1, int(gib * GiB) // buf_bytes)
            bufs = [arena.alloc("cpu", [((buf_bytes,), torch.uint8)])[0] for _ in range(n)]
            for b in bufs:
                b[:: 1 << 16] = 1  # touched, as placed weights are
            st = stream_gbps(bufs, dst, big, sync)
            sc = scattered_gbps(bufs, dst, small, max(64, 4 * n), sync)
            row = dict(pin=pin, footprint_gib=n * buf_bytes / GiB, buffers=n, pin_s=arena.pin_s, stream_gbps=st)
            row.update(scattered_gbps=sc, reference_gbps=ref, stream_over_reference=st / ref)
            rows.append(row)
            print(
                f"{pin:>9} | {row['footprint_gib']:6.1f} | {arena.pin_s:6.1f} | {st:11.1f} | {sc:20.1f} | "
                f"{st / ref:.2f}"
            )
            del bufs
            arena.close()
            disk.close()
    write_report(args.out, "pinned", rows, preset=args.preset, dtype=torch.uint8, cpu=cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
