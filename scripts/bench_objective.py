"""Benchmark: fipo_lite's O(B*L) Future-KL and loss against the paper's chunked O(B*L^2) algorithm.

Prints a markdown table (fastest wall time over repeats, peak memory, speed-up, relative error),
all ratios measured in this one run on this machine:

    python scripts/bench_objective.py                 # B=8, L in {2048, 8192, 16384, 20480}
    python scripts/bench_objective.py --quick         # small sizes, seconds
    python scripts/bench_objective.py --out results/objective_bench.json

Peak memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, the peak of the bytes held by the
tensors torch allocates (torch.profiler's memory profile: sum of allocations minus frees), which is
what the algorithm itself needs, independent of the allocator's caching.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import fipo_lite
from fipo_lite.future_kl import future_kl_chunked


def make_inputs(B, L, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(B, L, generator=g) * 3).to(device, dtype)
    logp = (old.float().cpu() + torch.randn(B, L, generator=g) * 0.05).to(device, dtype)
    adv = torch.randn(B, 1, generator=g).expand(B, L).contiguous().to(device, dtype)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).to(device)
    return old, logp, adv, mask


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, min_time=0.0):
    """Fastest of `repeats` calls (after one warm-up call): the least noisy estimate on a shared
    machine, as timeit recommends; slower calls measure interference, not the code."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_bytes(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # walk the allocation events in time order and track the running total of live bytes
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def bench_size(B, L, device, repeats, chunk_size, skip_chunked):
    old, logp, adv, mask = make_inputs(B, L, device)
    delta = logp - old
    participants = mask & (delta <= math.log(10.0))
    row = {"B": B, "L": L, "device": device.type}

    fast = lambda: fipo_lite.future_kl(delta, mask, tau=32.0)  # noqa: E731
    row["fkl_ms"] = timed(fast, device, repeats) * 1e3
    row["fkl_peak_mb"] = peak_bytes(fast, device) / 2**20
    if not skip_chunked:
        slow = lambda: future_kl_chunked(delta, participants, tau=32.0, chunk_size=chunk_size)  # noqa: E731
        row["chunked_ms"] = timed(slow, device, max(1, repeats // 5)) * 1e3
        row["chunked_peak_mb"] = peak_bytes(slow, device) / 2**20
        row["fkl_speedup"] = row["chunked_ms"] / row["fkl_ms"]
        row["fkl_rel_err"] = rel_err(fast(), slow())

    def loss_fn(mode, metrics):
        def run():
            x = logp.detach().requires_grad_(True)
            loss, _ = fipo_lite.policy_loss(old, x, adv, mask, mode=mode, compute_metrics=metrics)
            loss.backward()
        return run

    for metrics in (False, True):
        tag = "_metrics" if metrics else ""
        # interleave the two modes so drift in machine load hits both alike
        f_t, d_t = [], []
        for _ in range(3):
            f_t.append(timed(loss_fn("fipo", metrics), device, max(1, repeats // 3)))
            d_t.append(timed(loss_fn("dapo", metrics), device, max(1, repeats // 3)))
        row[f"fipo_loss{tag}_ms"] = min(f_t) * 1e3
        row[f"dapo_loss{tag}_ms"] = min(d_t) * 1e3
        row[f"fipo_over_dapo{tag}"] = row[f"fipo_loss{tag}_ms"] / row[f"dapo_loss{tag}_ms"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", default="2048,8192,16384,20480")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk-size", type=int, default=1024, help="the chunked baseline's K (the paper's Listing 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [256, 1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    repeats = 3 if args.quick else args.repeats
    rows = []
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}", flush=True)
    for L in lengths:
        rows.append(bench_size(args.batch, L, torch.device("cpu"), repeats, args.chunk_size, False))
        print(json.dumps(rows[-1]), flush=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for B, L in ((32, 2048), (32, 20480)):
            rows.append(bench_size(B, L, dev, 50, args.chunk_size, L > 8192 and args.quick))
            print(json.dumps(rows[-1]), flush=True)
    else:
        print("# no CUDA device: GPU rows skipped", flush=True)

    cols = [("B", "B"), ("L", "L"), ("device", "dev"), ("fkl_ms", "future_kl ms"), ("chunked_ms", "chunked ms"),
            ("fkl_speedup", "speed-up"), ("fkl_rel_err", "rel err"), ("fkl_peak_mb", "fkl peak MB"),
            ("chunked_peak_mb", "chunked peak MB"), ("fipo_loss_ms", "FIPO f+b ms"), ("dapo_loss_ms", "DAPO f+b ms"),
            ("fipo_over_dapo", "FIPO/DAPO"), ("fipo_over_dapo_metrics", "FIPO/DAPO (with metrics)")]
    print("\n| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
