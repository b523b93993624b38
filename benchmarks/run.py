"""Runs every op's benchmark: verify against the reference, then time, then report.

    python -m benchmarks.run [--op OP] [--device cpu|cuda|all] [--json PATH] [--no-chart]

Prints one table (op, case, implementation, median, speedup against the reference, and
for memory-bound CUDA cases GB/s and the fraction of the device's copy bandwidth), checks
each case's targets, writes benchmarks/results/results.json and results.png. Exits
non-zero when an implementation disagrees with the reference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time

import torch

import benchmarks
from benchmarks.harness import Case, VerificationError, copy_bandwidth, peak_extra_memory, time_impl, verify

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def bench_modules(only: str | None):
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if n == f"bench_{only}"]
        if not names:
            raise SystemExit(f"no benchmarks/bench_{only}.py")
    return [importlib.import_module(f"benchmarks.{n}") for n in names]


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def run_case(case: Case, copy_gbps: float | None = None) -> dict:
    """Verifies, then times every implementation. ``copy_gbps``: the device's measured copy
    bandwidth, against which memory-bound cases are put."""
    errors = verify(case)
    rows = []
    for impl in [case.reference] + case.impls:
        timing = time_impl(impl, case.device)
        memory = peak_extra_memory(impl, case.device) if case.measure_memory else None
        row = {"impl": impl.label, **timing, "peak_extra_bytes": memory,
               "max_error": errors.get(impl.label, 0.0 if impl is case.reference else None)}
        if case.bytes_moved and case.device.startswith("cuda"):
            row["gbps"] = case.bytes_moved / timing["median"] / 1e9
            row["copy_fraction"] = row["gbps"] / copy_gbps if copy_gbps else None
        rows.append(row)
    ref_median = rows[0]["median"]
    for row in rows:
        row["speedup"] = ref_median / row["median"]
    by_label = {row["impl"]: row for row in rows}
    targets = []
    for target in case.targets:
        best = min(by_label[b]["median"] for b in target.baselines)
        achieved = best / by_label[target.impl]["median"]
        result = {"impl": target.impl, "baselines": list(target.baselines), "required": target.speedup,
                  "achieved": achieved, "met": achieved >= target.speedup}
        if target.memory_fraction is not None:
            mine = by_label[target.impl]["peak_extra_bytes"]
            base = by_label[target.baselines[0]]["peak_extra_bytes"]
            fraction = mine / base if mine is not None and base else None
            result.update(memory_fraction_required=target.memory_fraction, memory_fraction=fraction,
                          met=result["met"] and fraction is not None and fraction <= target.memory_fraction)
        targets.append(result)
    return {"op": case.op, "case": case.name, "device": case.device, "rows": rows, "targets": targets}


def print_result(result: dict) -> None:
    for row in result["rows"]:
        mem = row["peak_extra_bytes"]
        mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else ""
        err = row["max_error"]
        err_s = f"{err:9.2e}" if err is not None else "        -"
        bw_s = ""
        if row.get("gbps"):
            frac = row.get("copy_fraction")
            bw_s = f"  {row['gbps']:7.0f} GB/s" + (f" ({frac * 100:.0f}% of copy)" if frac else "")
        print(f"{result['op']:<26} {result['case']:<30} {row['impl']:<34} {_fmt_time(row['median'])} "
              f"{row['speedup']:7.2f}x  {err_s} {mem_s}{bw_s}", flush=True)
    for t in result["targets"]:
        line = (f"    target: {t['impl']} >= {t['required']:g}x the best of {', '.join(t['baselines'])}: "
                f"{t['achieved']:.2f}x")
        if "memory_fraction_required" in t:
            frac = t["memory_fraction"]
            line += (f"; peak memory {frac * 100:.1f}% of {t['baselines'][0]}'s (<= "
                     f"{t['memory_fraction_required'] * 100:g}%)" if frac is not None else "; memory not measured")
        print(line + ("  MET" if t["met"] else "  NOT MET"), flush=True)


def write_chart(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, impls = [], []
    for r in results:
        labels.append(f"{r['op']}\n{r['case']} ({r['device']})")
        impls.append({row["impl"]: row["speedup"] for row in r["rows"][1:]})
    names = sorted({name for d in impls for name in d})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [d.get(name, 0) for d in impls], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over the reference (log)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title("ganops: speedup over each op's reference, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", help="only this op (bench_<op>.py)")
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--json", help="write the results here (default benchmarks/results/results.json)")
    parser.add_argument("--no-chart", action="store_true", help="no results.png (needs matplotlib)")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no CUDA GPU visible: CUDA cases skipped", flush=True)

    import ganops
    print(f"ganops {ganops.build_info()['version']}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; backends on cpu: {ganops.available_backends('cpu')}", flush=True)
    bandwidth = None
    if "cuda" in devices:
        bandwidth = copy_bandwidth("cuda")
        nominal = bandwidth.get("nominal_gbps")
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth['gbps']:.0f} GB/s"
              + (f" (nominal peak {nominal:.0f} GB/s)" if nominal else ""), flush=True)
    print(f"{'op':<26} {'case':<30} {'implementation':<34} {'median':>11} {'speedup':>8}  {'max err':>9} "
          f"{'peak extra':>13}")
    json_path = args.json or os.path.join(RESULTS_DIR, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if bandwidth else None, "copy_bandwidth": bandwidth}
    results, failures = [], []

    def write_json():
        # After every case: a run cut short (gpu-check's timeout) keeps what it measured.
        with open(json_path, "w") as f:
            json.dump({"meta": {**meta, "failures": failures}, "results": results}, f, indent=1)

    for module in bench_modules(args.op):
        for device in devices:
            for case in module.cases(device):
                try:
                    result = run_case(case, bandwidth["gbps"] if bandwidth else None)
                except VerificationError as exc:
                    print(f"VERIFICATION FAILED: {exc}", flush=True)
                    failures.append(str(exc))
                else:
                    print_result(result)
                    results.append(result)
                write_json()
    write_json()
    print(f"wrote {json_path}")
    if results and not args.no_chart:
        chart = os.path.join(os.path.dirname(os.path.abspath(json_path)), "results.png")
        write_chart(results, chart)
        print(f"wrote {chart}")
    if failures:
        print(f"{len(failures)} case(s) failed verification", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
