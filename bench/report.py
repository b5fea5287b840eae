"""Turn a pytest-benchmark JSON into a table and a plot.

    pytest bench/ --benchmark-json bench/out/cpu.json
    python -m bench.report bench/out/cpu.json [--markdown] [--plot bench/out/speedup.png]

Per group (mode, shape, dtype): median time per provider, speed-up against the eager reference, achieved
TFLOP/s (one aggregated convolution) and GB/s (inputs read and outputs written once) with their fraction of the
device's measured peaks, and peak memory on GPUs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load_rows(path: str) -> tuple[list[dict], dict]:
    with open(path) as fh:
        data = json.load(fh)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        median = b["stats"]["median"]
        rows.append({
            "group": b.get("group") or "", "provider": info.get("provider", b["name"]), "median_s": median,
            "tflops": info["flops"] / median / 1e12 if info.get("flops") else None,
            "gbs": info["bytes"] / median / 1e9 if info.get("bytes") else None,
            "peak_tflops": info.get("peak_tflops"), "peak_gbs": info.get("peak_gbs"),
            "mem_mb": info["peak_mem_bytes"] / 2 ** 20 if info.get("peak_mem_bytes") else None,
            "images_per_s": info.get("images_per_s"),
        })
    return rows, data.get("machine_info", {})


def with_speedups(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for members in groups.values():
        ref = next((r["median_s"] for r in members if r["provider"] == "reference"), None)
        for r in members:
            r["speedup"] = ref / r["median_s"] if ref else None
    return dict(sorted(groups.items()))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(groups: dict[str, list[dict]], markdown: bool) -> str:
    head = ["group", "provider", "median ms", "vs reference", "TFLOP/s (% peak)", "GB/s (% peak)", "peak MiB / img/s"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{head[0]:32s} {head[1]:10s} {head[2]:>10s} {head[3]:>12s} {head[4]:>18s} {head[5]:>16s} "
                     f"{head[6]:>9s}")
    for group, members in groups.items():
        for r in sorted(members, key=lambda r: r["median_s"]):
            tf = _fmt(r["tflops"], ".2f") + (f" ({100 * r['tflops'] / r['peak_tflops']:.0f}%)"
                                             if r["tflops"] and r["peak_tflops"] else "")
            gb = _fmt(r["gbs"], ".1f") + (f" ({100 * r['gbs'] / r['peak_gbs']:.0f}%)"
                                          if r["gbs"] and r["peak_gbs"] else "")
            cells = [group, r["provider"], _fmt(r["median_s"] * 1e3, ".3f"),
                     _fmt(r["speedup"], ".2f") + "x" if r["speedup"] else "-", tf, gb,
                     _fmt(r["mem_mb"], ".0f") if r["images_per_s"] is None else f"{r['images_per_s']:.0f} img/s"]
            if markdown:
                lines.append("| " + " | ".join(cells) + " |")
            else:
                lines.append(f"{cells[0]:32s} {cells[1]:10s} {cells[2]:>10s} {cells[3]:>12s} {cells[4]:>18s} "
                             f"{cells[5]:>16s} {cells[6]:>9s}")
    return "\n".join(lines)


def plot(groups: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    providers = sorted({r["provider"] for m in groups.values() for r in m} - {"reference"})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        vals = [next((r["speedup"] or 0 for r in groups[g] if r["provider"] == prov), 0) for g in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=prov)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up vs eager reference (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--plot", metavar="PNG", help="write a speed-up bar chart")
    args = parser.parse_args(argv)
    try:
        rows, machine = load_rows(args.json)
    except OSError as exc:
        parser.error(f"{args.json}: {exc.strerror}")
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not pytest-benchmark's
        parser.error(f"{args.json}: not a pytest-benchmark JSON file ({type(exc).__name__}: {exc})")
    if not rows:
        print("no benchmarks in", args.json, file=sys.stderr)
        return 1
    groups = with_speedups(rows)
    print(f"device: {machine.get('device')}  torch {machine.get('torch')}  triton {machine.get('triton')}  "
          f"threads {machine.get('threads')}")
    print(table(groups, args.markdown))
    if args.plot:
        plot(groups, args.plot, f"fastblock on {machine.get('device')}")
        print("plot written to", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
