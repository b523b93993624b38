"""Everything a GPU can check, in one command, with a report: ``make gpu-check REPORT=dir``.

    python tools/gpu_check.py --report DIR [--quick] [--budget SECONDS]

Steps, in order, each with its own timeout and all within one overall budget (6 minutes,
3 with --quick, on a 16-core H200):

  environment  torch, CUDA, triton, nvcc, compute-sanitizer, the GPU
  test-deps    pytest and hypothesis; installed from ./wheelhouse (``make wheelhouse``) when
               missing, never from an index: the GPU machines have no network
  build        ganops against the installed torch, CUDA kernels for the visible GPU's
               architecture, every core (pip install --no-build-isolation --no-deps -e .)
  tests        the whole suite on the GPU (CUDA, Triton, the differential suite);
               --quick: only the tests about CUDA (pytest -k cuda)
  sanitizer    compute-sanitizer memcheck, racecheck and synccheck over
               tools/sanitize_ops.py, which calls every CUDA kernel once
  graphs       tools/graph_check.py: every op captured in a CUDA graph and replayed
               against eager, and one whole WGAN-GP critic + generator step (not --quick)
  benchmarks   python -m benchmarks.run --device cuda: CUDA events, L2 flushed, GB/s
               against the device's copy bandwidth, torch eager and torch.compile (not --quick)

report.md and report.json in DIR are rewritten after every step (and name the step
running), so a run cut short still leaves a report. Without a GPU the steps that need one
are skipped, each saying why, and the GPU scripts still run to their own skip. Exits 0 when
every step that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DEPS = ("pytest", "hypothesis")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# Seconds. Estimates for a 16-core H200 machine; the overall budget cuts any step short.
FULL_BUDGET, QUICK_BUDGET = 360, 180
TIMEOUTS = {"test-deps": 60, "build": 150, "tests": 150, "tests-quick": 60, "sanitizer": 60,
            "graphs": 60, "benchmarks": 120}
# A step is not started with less than this left: it could not finish.
MIN_START = 10
OUTPUT_TAIL = 4000


@dataclasses.dataclass
class Step:
    name: str
    status: str  # passed, failed, timed out, skipped, running
    seconds: float = 0.0
    detail: str = ""
    command: str = ""
    data: dict = dataclasses.field(default_factory=dict)
    output_tail: str = ""


class Report:
    """Holds the steps and rewrites report.json and report.md after every change."""

    def __init__(self, directory: str, quick: bool, budget: float):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.quick, self.budget = quick, budget
        self.started = time.monotonic()
        self.started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.steps: list[Step] = []
        self.environment: dict = {}
        # For every command after test-deps: where the test dependencies were installed.
        self.extra_env: dict = {}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def add(self, step: Step) -> Step:
        self.steps = [s for s in self.steps if s.name != step.name] + [step]
        self.write()
        return step

    def ok(self) -> bool:
        return all(s.status in ("passed", "skipped") for s in self.steps)

    def write(self) -> None:
        doc = {"started": self.started_at, "quick": self.quick, "budget_s": self.budget,
               "elapsed_s": round(time.monotonic() - self.started, 1), "ok": self.ok(),
               "environment": self.environment, "steps": [dataclasses.asdict(s) for s in self.steps]}
        _write_atomic(os.path.join(self.directory, "report.json"), json.dumps(doc, indent=1))
        _write_atomic(os.path.join(self.directory, "report.md"), self.markdown(doc))

    def markdown(self, doc: dict) -> str:
        env = self.environment
        lines = [f"# ganops gpu-check{' --quick' if self.quick else ''}", "",
                 f"Started {doc['started']}, {doc['elapsed_s']} s of a {self.budget:g} s budget. "
                 f"Result: **{'all that ran passed' if doc['ok'] else 'FAILURES'}**.", ""]
        if env:
            lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]
        lines += ["| step | outcome | seconds | detail |", "|---|---|---|---|"]
        for s in self.steps:
            detail = s.detail.replace("|", "\\|").replace("\n", "; ")
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {detail} |")
        skipped = [s for s in self.steps if s.status == "skipped"]
        if skipped:
            lines += ["", "## Skipped, and why", ""] + [f"- **{s.name}**: {s.detail}" for s in skipped]
        for s in self.steps:
            if s.data.get("markdown"):
                lines += ["", f"## {s.name}", "", s.data["markdown"]]
        for s in self.steps:
            if s.status in ("failed", "timed out") and s.output_tail:
                lines += ["", f"## {s.name}: output (last {OUTPUT_TAIL} characters)", "",
                          f"`{s.command}`", "", "```", s.output_tail, "```"]
        return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# The step's process group running now, ended with the driver if that is stopped from
# outside (the GPU session's own time limit), so no nvcc or sanitizer outlives it.
_running: subprocess.Popen | None = None


def _stop(report: Report, signum, _frame) -> None:
    if _running is not None and _running.poll() is None:
        os.killpg(_running.pid, signal.SIGKILL)
    for step in report.steps:
        if step.status == "running":
            step.status, step.detail = "timed out", f"stopped from outside (signal {signum}) while running"
    report.write()
    sys.exit(1)


def run_command(report: Report, name: str, cmd: list[str], timeout: float, env: dict | None = None,
                log: str | None = None) -> Step:
    """Runs one step's command with a timeout cut to the budget left; its whole output goes
    to DIR/<log>.log, its tail into the report."""
    timeout = min(timeout, report.remaining())
    if timeout < MIN_START:
        return report.add(Step(name, "skipped", detail=f"the {report.budget:g} s budget is spent"))
    shown = " ".join(cmd)
    report.add(Step(name, "running", command=shown, detail=f"started, timeout {timeout:.0f} s"))
    log_path = os.path.join(report.directory, (log or name) + ".log")
    t0 = time.monotonic()
    global _running
    with open(log_path, "w") as out:
        proc = _running = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **report.extra_env, **(env or {})},
                                           start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The whole process group: nvcc, ninja or compute-sanitizer's target included.
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    seconds = time.monotonic() - t0
    with open(log_path, errors="replace") as f:
        tail = f.read()[-OUTPUT_TAIL:]
    if rc is None:
        status, detail = "timed out", f"killed after {timeout:.0f} s"
    else:
        status, detail = ("passed" if rc == 0 else "failed"), f"exit status {rc}"
    return Step(name, status, seconds, f"{detail}; log: {os.path.basename(log_path)}", shown, output_tail=tail)


def probe_environment(python: str) -> dict:
    """Facts of the machine, from the Python that will build and test."""
    code = (
        "import json, sys, torch\n"
        "d = {'python': f'{sys.executable} ({sys.version.split()[0]})',\n"
        "     'torch': torch.__version__, 'torch CUDA': torch.version.cuda,\n"
        "     'GPU': None, 'compute capability': None, 'GPU memory GiB': None}\n"
        "try:\n"
        "    import triton; d['triton'] = triton.__version__\n"
        "except ImportError:\n"
        "    d['triton'] = None\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update({'GPU': p.name, 'compute capability': f'{p.major}.{p.minor}',\n"
        "              'GPU memory GiB': round(p.total_memory / 2**30, 1)})\n"
        "print(json.dumps(d))\n")
    env = {"python": python, "cores": os.cpu_count(), "machine": platform.node()}
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
        if out.returncode != 0:
            env["torch"] = f"not importable: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
        else:
            env.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["torch"] = f"not importable: {exc}"
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    env["nvcc"] = _version_line([nvcc, "--version"], r"release [\d.]+") if nvcc and os.path.exists(nvcc) else None
    env["compute-sanitizer"] = find_sanitizer(cuda_home)
    return env


def _version_line(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out)
    return match.group(0) if match else out.strip()[:80] or None


def find_sanitizer(cuda_home: str | None) -> str | None:
    candidates = [os.path.join(cuda_home, "bin", "compute-sanitizer")] if cuda_home else []
    candidates.append(shutil.which("compute-sanitizer") or "")
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _missing_modules(python: str, names, env: dict | None = None) -> list[str]:
    code = ("import importlib.util\n"
            f"print(' '.join(n for n in {list(names)!r} if importlib.util.find_spec(n) is None))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, cwd="/",
                         env={**os.environ, **(env or {})})
    return out.stdout.split()


def step_test_deps(report: Report, python: str) -> Step:
    """pytest and hypothesis for the tests. When missing they are installed from
    ./wheelhouse into a folder of their own put on PYTHONPATH, leaving the machine's
    Python as it is (it may not be writable, or be a PEP 668 distribution Python)."""
    missing = _missing_modules(python, TEST_DEPS)
    if not missing:
        return report.add(Step("test-deps", "passed", detail=f"{', '.join(TEST_DEPS)} installed"))
    wheelhouse = os.path.join(ROOT, "wheelhouse")
    if not os.path.isdir(wheelhouse):
        return report.add(Step("test-deps", "skipped",
                               detail=f"{', '.join(missing)} not installed and no ./wheelhouse to install "
                                      f"from (make it with `make wheelhouse` on a machine with an index)",
                               data={"missing": missing}))
    target = os.path.join(ROOT, "build", "gpu-check-deps")
    step = run_command(report, "test-deps", [python, "-m", "pip", "install", "--no-index", "--find-links",
                                             wheelhouse, "--target", target, *missing], TIMEOUTS["test-deps"])
    report.extra_env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))
    still = _missing_modules(python, TEST_DEPS, report.extra_env)
    step.data["missing"] = still
    step.detail = f"installed {', '.join(missing)} from ./wheelhouse into {target}; " + step.detail
    if still:
        step.status, step.detail = "failed", f"still missing after the wheelhouse: {', '.join(still)}; " + step.detail
    return report.add(step)


def step_build(report: Report, python: str, capability: str | None) -> Step:
    if capability is None:
        return report.add(Step("build", "skipped", detail="no GPU visible: nothing to build for; `make build` "
                                                           "compiles the kernels without one"))
    env = {"GANOPS_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": capability, "MAX_JOBS": str(os.cpu_count() or 1)}
    cmd = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    step = run_command(report, "build", cmd, TIMEOUTS["build"], env)
    if step.status == "failed" and "externally-managed-environment" in step.output_tail:
        # A distribution's Python (PEP 668): the machine's own torch is the point, so install
        # beside it anyway; the report says so.
        step = run_command(report, "build", cmd + ["--break-system-packages"], TIMEOUTS["build"], env)
        step.detail += "; with --break-system-packages (PEP 668 Python)"
    step.detail = f"TORCH_CUDA_ARCH_LIST={capability} MAX_JOBS={env['MAX_JOBS']}; " + step.detail
    if step.status == "passed":
        check = subprocess.run([python, "-c", "import ganops, json; i = ganops.build_info(); "
                                "print(json.dumps({k: i[k] for k in ('version', 'torch_version', 'cuda_kernels', "
                                "'extension_loaded', 'extension_error', 'available_backends')}))"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        info = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else {}
        step.data["build_info"] = info
        if not (info.get("extension_loaded") and info.get("cuda_kernels")):
            step.status = "failed"
            step.detail += f"; the CUDA kernels do not load: {info or check.stderr[-500:]}"
    return report.add(step)


def _junit_summary(path: str) -> dict:
    """Counts and the commonest skip reasons from pytest's JUnit XML."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    reasons: dict[str, int] = {}
    failed: list[str] = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(kind)
            if node is not None:
                counts[key] += 1
                if kind == "skipped":
                    reason = (node.get("message") or "").strip()
                    reasons[reason] = reasons.get(reason, 0) + 1
                else:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
                break
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:12]
    return {"counts": counts, "skip_reasons": top, "failed": failed[:50]}


def step_tests(report: Report, python: str, has_gpu: bool, missing: list[str]) -> Step:
    if not has_gpu:
        return report.add(Step("tests", "skipped", detail="no GPU visible: the CPU suite is `make test`"))
    if "pytest" in missing:
        return report.add(Step("tests", "skipped", detail="pytest is missing (see test-deps)"))
    junit = os.path.join(report.directory, "pytest.xml")
    cmd = [python, "-m", "pytest", "tests", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if report.quick:
        cmd += ["-k", "cuda"]
    step = run_command(report, "tests", cmd, TIMEOUTS["tests-quick" if report.quick else "tests"])
    if missing:
        step.detail = f"{', '.join(missing)} missing: the tests that need it did not run; " + step.detail
    summary = _junit_summary(junit)
    step.data.update(summary)
    if summary:
        c = summary["counts"]
        step.detail = (f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
                       f"{c['skipped']} skipped; " + step.detail)
        rows = ["| skipped | reason |", "|---|---|"] + [f"| {n} | {r} |" for r, n in summary["skip_reasons"]]
        step.data["markdown"] = "\n".join(rows + ([""] + [f"- FAILED {f}" for f in summary["failed"]]
                                                  if summary["failed"] else []))
    return report.add(step)


def step_script(report: Report, name: str, python: str, script: str, timeout: float,
                extra: list[str] = ()) -> Step:
    """A GPU script of tools/: run as it is (without a GPU it skips by itself, exit 0)."""
    return report.add(run_command(report, name, [python, os.path.join("tools", script), *extra], timeout))


def step_sanitizer(report: Report, python: str, has_gpu: bool, sanitizer: str | None) -> None:
    script = os.path.join("tools", "sanitize_ops.py")
    if not has_gpu or sanitizer is None:
        why = "no GPU visible" if not has_gpu else "compute-sanitizer not found (CUDA_HOME/bin, PATH)"
        # The script itself still runs, to its own skip: it must import cleanly everywhere.
        step = run_command(report, "sanitizer", [python, script], 60, log="sanitizer-script")
        if step.status == "passed":
            step.status = "skipped"
        step.detail = f"{why}; {script} alone: {step.detail}"
        report.add(step)
        return
    # Without the caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is out of bounds for memcheck, not inside a cached block.
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "GANOPS_BACKEND": "cpp"}
    for tool in SANITIZER_TOOLS:
        cmd = [sanitizer, f"--tool={tool}", "--error-exitcode=1", "--print-limit=20", python, script]
        step = run_command(report, f"sanitizer {tool}", cmd, TIMEOUTS["sanitizer"], env,
                           log=f"sanitizer-{tool}")
        match = re.search(r"ERROR SUMMARY: (\d+) error", step.output_tail)
        if match:
            step.detail = f"{match.group(1)} errors; " + step.detail
        report.add(step)


def step_benchmarks(report: Report, python: str, has_gpu: bool) -> None:
    if not has_gpu:
        report.add(Step("benchmarks", "skipped", detail="no GPU visible: the CPU benchmarks are `make bench`"))
        return
    out_json = os.path.join(report.directory, "benchmarks.json")
    step = run_command(report, "benchmarks", [python, "-m", "benchmarks.run", "--device", "cuda",
                                              "--json", out_json, "--no-chart"], TIMEOUTS["benchmarks"])
    if os.path.exists(out_json):
        with open(out_json) as f:
            results = json.load(f)
        step.data["markdown"] = benchmark_table(results)
        step.data["copy_bandwidth"] = results.get("meta", {}).get("copy_bandwidth")
    report.add(step)


def benchmark_table(results: dict) -> str:
    meta = results.get("meta", {})
    bw = meta.get("copy_bandwidth") or {}
    lines = []
    if bw:
        lines.append(f"Device-to-device copy, this run: {bw.get('gbps', 0):.0f} GB/s"
                     + (f"; nominal peak from the device's properties {bw['nominal_gbps']:.0f} GB/s"
                        if bw.get("nominal_gbps") else "") + ".")
        lines.append("")
    lines += ["| op | case | implementation | median | speedup | GB/s | of copy bw |", "|---|---|---|---|---|---|---|"]
    for r in results.get("results", []):
        for row in r["rows"]:
            gbps = row.get("gbps")
            frac = row.get("copy_fraction")
            lines.append(f"| {r['op']} | {r['case']} | {row['impl']} | {row['median'] * 1e6:.1f} us | "
                         f"{row['speedup']:.2f}x | {f'{gbps:.0f}' if gbps else '-'} | "
                         f"{f'{frac * 100:.0f}%' if frac else '-'} |")
    for failure in meta.get("failures", []):
        lines.append(f"\nVERIFICATION FAILED: {failure}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="folder for report.md, report.json and the logs")
    parser.add_argument("--quick", action="store_true", help="build, CUDA tests and sanitizer only")
    parser.add_argument("--budget", type=float, help="overall seconds (default 360, --quick 180)")
    parser.add_argument("--python", default=sys.executable, help="the Python (and torch) to build and test with")
    args = parser.parse_args(argv)
    report = Report(args.report, args.quick, args.budget or (QUICK_BUDGET if args.quick else FULL_BUDGET))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, f: _stop(report, n, f))

    t0 = time.monotonic()
    report.environment = probe_environment(args.python)
    env = report.environment
    report.add(Step("environment", "passed", time.monotonic() - t0,
                    f"GPU: {env.get('GPU') or 'none visible'}, torch {env.get('torch')}"))
    if str(env.get("torch", "")).startswith("not importable"):
        report.add(Step("build", "skipped", detail=f"torch {env['torch']} for {args.python}"))
        print(f"gpu-check: torch is {env['torch']}; report in {report.directory}")
        report.write()
        return 0
    has_gpu = env.get("GPU") is not None
    capability = env.get("compute capability")

    deps = step_test_deps(report, args.python)
    build = step_build(report, args.python, capability)
    if has_gpu and build.status != "passed":
        for name in ("tests", "sanitizer", "graphs", "benchmarks"):
            report.add(Step(name, "skipped", detail="the build failed"))
    else:
        step_tests(report, args.python, has_gpu, deps.data.get("missing", []))
        step_sanitizer(report, args.python, has_gpu, env.get("compute-sanitizer"))
        if report.quick:
            for name in ("graphs", "benchmarks"):
                report.add(Step(name, "skipped", detail="--quick"))
        else:
            graphs = step_script(report, "graphs", args.python, "graph_check.py", TIMEOUTS["graphs"],
                                 ["--json", os.path.join(report.directory, "graphs.json")])
            if not has_gpu and graphs.status == "passed":
                graphs.status, graphs.detail = "skipped", "no GPU visible; the script ran to its skip: " + graphs.detail
                report.add(graphs)
            step_benchmarks(report, args.python, has_gpu)
    report.write()
    print(open(os.path.join(report.directory, "report.md")).read())
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
