"""Interleaved A/B timing of the providers, for machines whose speed drifts (shared CI-class VMs).

pytest-benchmark times one provider after another, so a machine that slows down for a minute -- the 2-core VM this
project's CPU figures come from drifts by +-25% -- can flip a 15% comparison. Here every round times each provider
once, back to back, and the speed-up is computed per round (reference time / provider time in that round) before
taking the median over rounds: slow drift cancels. Within a round each provider first runs ``--settle`` untimed
calls (default 1), so its timed call finds the caches and the allocator in the state its own calls leave (glibc
hands freed multi-MB buffers back to the OS, so which allocations page-fault depends on the calls before), not in
the state of the provider timed before it.

    python -m bench.interleaved                                  # fwdbwd N32-C64-16x16-K4 float32 on CPU
    python -m bench.interleaved --mode fwd --n 8 --rounds 50 --providers reference,dynconv,extension
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastblock.backends import device_from_text
from fastblock.train.cli import number_arg

from .providers import MODES, Shape, make_call, provider_status


def run(shape: Shape, mode: str, providers: list[str], rounds: int, device: str, dtype: torch.dtype,
        settle: int = 1) -> dict:
    calls = {p: make_call(p, shape, mode, dtype, device, copies=2) for p in providers}
    for call in calls.values():  # warm-up: builds, compiles, allocator
        for _ in range(3):
            call()
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p, call in calls.items():
            for _ in range(settle):  # untimed: the timed call then runs in the caches and malloc state it leaves
                call()
            t0 = time.perf_counter()
            call()
            times[p].append(time.perf_counter() - t0)
    ref = times[providers[0]]
    return {p: {"median_ms": statistics.median(t) * 1e3,
                "ratios": sorted(r / x for r, x in zip(ref, t, strict=True))} for p, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="fwdbwd")
    ap.add_argument("--n", type=number_arg(int, 1), default=32)
    ap.add_argument("--c", type=number_arg(int, 1), default=64)
    ap.add_argument("--hw", type=number_arg(int, 1), default=16)
    ap.add_argument("--k", type=number_arg(int, 1), default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default="reference,dynconv,extension",
                    help="comma-separated; the first is the baseline of the ratios (default: %(default)s)")
    ap.add_argument("--rounds", type=number_arg(int, 1), default=30)
    ap.add_argument("--settle", type=number_arg(int, 0), default=1,
                    help="untimed calls of a provider before its timed call in each round (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        device_from_text(args.device)
    except ValueError as exc:
        ap.error(f"argument --device: {exc}")
    providers = [p for p in args.providers.split(",") if p]
    for p in providers:
        ok, why = provider_status(p, args.device)
        if not ok:
            ap.error(f"provider {p} is not available on {args.device}: {why}")
    shape = Shape(args.n, args.c, args.hw, args.k)
    res = run(shape, args.mode, providers, args.rounds, args.device, getattr(torch, args.dtype), args.settle)
    print(f"{args.mode} {shape} {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
          f"{args.rounds} interleaved rounds (settle {args.settle}); speed-up vs {providers[0]} per round: "
          "median [10th-90th percentile]")
    for p, r in res.items():
        q = r["ratios"]
        lo, hi = q[len(q) // 10], q[(len(q) * 9) // 10]
        print(f"  {p:10s} {r['median_ms']:9.3f} ms   {statistics.median(q):5.2f}x  [{lo:.2f}-{hi:.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
