"""Everything a GPU can check, in one command, with a report: ``make gpu-check REPORT=dir``.

    python3 tools/gpu_check.py --report DIR [--quick] [--budget SECONDS]

Made for a lent GPU machine (an H200 with 16 cores, no network, at most 10 minutes a
command, at most 8 files brought back): the whole run fits in the overall budget (520 s,
360 with --quick), and DIR ends up holding three files, report.md, report.json and
logs.tar.gz (every step's whole log and the JSON the scripts wrote). Steps, in order,
each with its own timeout; the timeouts add up to at most the budget:

  environment  torch, CUDA, triton, nvcc, compute-sanitizer, the GPU
  test-deps    pytest and hypothesis; installed from ./wheelhouse (``make wheelhouse``) when
               missing, never from an index: the GPU machines have no network
  build        ganops against the installed torch, CUDA kernels for the visible GPU's
               architecture, every core (pip install --no-build-isolation --no-deps -e .);
               the launch-check test extension is not built (its tests run on CPUs, in CI)
  python-only  only when the build failed: the package installed without compiled ops, so
               the Triton checks still run
  tests        only what the CPU CI cannot run: pytest --gpu-only (tests/conftest.py: the
               CUDA and multi-GPU tests), with -n <cores> where pytest-xdist imports and a
               per-test timeout where pytest-timeout imports; one line per test in the log
               as it ends, so a cut-short run still names every test that ran
  graphs       tools/graph_check.py: every registered op captured in a CUDA graph and
               replayed against eager, and one whole WGAN-GP critic + generator step
  sanitizer    compute-sanitizer memcheck, racecheck and synccheck over
               tools/sanitize_ops.py, instrumenting ganops's kernels only (--kernel-name
               kns=ganops). A machine whose sandbox refuses the sanitizer ("Device not
               supported", then error 999) is reported "unavailable on this machine"
  benchmarks   python -m benchmarks.run --device cuda: CUDA events, L2 flushed, GB/s
               against the device's copy bandwidth, torch eager and torch.compile

When the build fails the Triton checks still run: the tests and graphs on the Triton
backend, which needs no build; the sanitizer (CUDA kernels only) is skipped. report.md,
report.json and logs.tar.gz are rewritten after every step (and name the step running),
so a run cut short still leaves a report; SIGTERM, SIGINT or SIGHUP to this script ends
the running step's whole process group first. Without a GPU the steps that need one are
skipped, each saying why, and the GPU scripts still run to their own skip. Exits 0 when
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
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DEPS = ("pytest", "hypothesis")
# Seconds, for a 16-core H200 machine. The steps' timeouts, the environment probe's reserve
# and the archive's add up to at most the budget (tests/test_gpu_check.py holds them to it),
# so no step is skipped for want of time unless one before it overran its estimate. The
# full budget leaves a lent machine's 10-minute command a minute for its start and copies.
FULL_BUDGET, QUICK_BUDGET = 520, 360
RESERVE = 20
TIMEOUTS = {"test-deps": 20, "build": 150, "python-only": 15, "tests": 125, "tests-quick": 45, "graphs": 50,
            "sanitizer memcheck": 35, "sanitizer racecheck": 25, "sanitizer synccheck": 20, "benchmarks": 60}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
STEPS = {False: ("test-deps", "build", "python-only", "tests", "graphs",
                 *(f"sanitizer {t}" for t in SANITIZER_TOOLS), "benchmarks"),
         True: ("test-deps", "build", "python-only", "tests-quick", *(f"sanitizer {t}" for t in SANITIZER_TOOLS))}
# One test longer than this is stuck (a hang, a deadlock): it fails and the rest go on.
PER_TEST_TIMEOUT = 60
# A step is not started with less than this left: it could not finish.
MIN_START = 10
OUTPUT_TAIL = 4000
# compute-sanitizer refusing the device (some sandboxes): not a finding about ganops.
SANITIZER_UNAVAILABLE = re.compile(r"Device not supported|error 999|cudaErrorUnknown|CUDA error: unknown error")
ARCHIVE = "logs.tar.gz"
# Every status a step ends with that is not a failure.
NOT_FAILED = ("passed", "skipped", "unavailable")


def planned_seconds(quick: bool) -> float:
    """What the steps of a run may take at most, the reserve included: within the budget."""
    return RESERVE + sum(TIMEOUTS[name] for name in STEPS[quick])


@dataclasses.dataclass
class Step:
    name: str
    status: str  # passed, failed, timed out, skipped, unavailable, running
    seconds: float = 0.0
    detail: str = ""
    command: str = ""
    data: dict = dataclasses.field(default_factory=dict)
    output_tail: str = ""


class Report:
    """Holds the steps and rewrites report.json, report.md and the log archive after every
    change. The logs themselves are written in a folder of their own (``logs``), outside
    the report folder, which so holds three files whatever the number of steps."""

    def __init__(self, directory: str, quick: bool, budget: float):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.logs = tempfile.mkdtemp(prefix="ganops-gpu-check-logs-")
        self.quick, self.budget = quick, budget
        self.started = time.monotonic()
        self.started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.steps: list[Step] = []
        self.environment: dict = {}
        # For every command after test-deps: where the test dependencies were installed.
        self.extra_env: dict = {}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def log_path(self, name: str) -> str:
        return os.path.join(self.logs, name)

    def add(self, step: Step) -> Step:
        self.steps = [s for s in self.steps if s.name != step.name] + [step]
        self.write()
        return step

    def ok(self) -> bool:
        return all(s.status in NOT_FAILED for s in self.steps)

    def write(self) -> None:
        doc = {"started": self.started_at, "quick": self.quick, "budget_s": self.budget,
               "elapsed_s": round(time.monotonic() - self.started, 1), "ok": self.ok(),
               "environment": self.environment, "logs": ARCHIVE,
               "steps": [dataclasses.asdict(s) for s in self.steps]}
        _write_atomic(os.path.join(self.directory, "report.json"), json.dumps(doc, indent=1))
        _write_atomic(os.path.join(self.directory, "report.md"), self.markdown(doc))
        self.archive()

    def archive(self) -> None:
        """Every log and JSON of the run so far, as one file of the report folder."""
        tmp = os.path.join(self.directory, ARCHIVE + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for name in sorted(os.listdir(self.logs)):
                tar.add(os.path.join(self.logs, name), arcname=f"logs/{name}")
        os.replace(tmp, os.path.join(self.directory, ARCHIVE))

    def markdown(self, doc: dict) -> str:
        env = self.environment
        lines = [f"# ganops gpu-check{' --quick' if self.quick else ''}", "",
                 f"Started {doc['started']}, {doc['elapsed_s']} s of a {self.budget:g} s budget. "
                 f"Result: **{'all that ran passed' if doc['ok'] else 'FAILURES'}**. "
                 f"Whole logs: {ARCHIVE}.", ""]
        if env:
            lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]
        lines += ["| step | outcome | seconds | detail |", "|---|---|---|---|"]
        for s in self.steps:
            detail = s.detail.replace("|", "\\|").replace("\n", "; ")
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {detail} |")
        skipped = [s for s in self.steps if s.status in ("skipped", "unavailable")]
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
# outside (the GPU session's own time limit), so no nvcc, pytest worker or sanitizer
# target outlives it.
_running: subprocess.Popen | None = None


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (pytest-xdist's workers, ninja's nvcc),
    SIGKILL to what is left after a moment."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader has gone; its children may not have: the group is killed all the same.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _stop(report: Report, signum, _frame) -> None:
    if _running is not None:
        _end_group(_running)
    for step in report.steps:
        if step.status == "running":
            step.status, step.detail = "timed out", f"stopped from outside (signal {signum}) while running"
    report.write()
    sys.exit(1)


def run_command(report: Report, name: str, cmd: list[str], timeout: float, env: dict | None = None,
                log: str | None = None) -> Step:
    """Runs one step's command in its own process group with a timeout cut to the budget
    left; its whole output goes to the log <log or name>.log (in the archive), its tail
    into the report."""
    timeout = min(timeout, report.remaining())
    if timeout < MIN_START:
        return report.add(Step(name, "skipped", detail=f"the {report.budget:g} s budget is spent"))
    shown = " ".join(cmd)
    report.add(Step(name, "running", command=shown, detail=f"started, timeout {timeout:.0f} s"))
    log_name = re.sub(r"[^\w.-]+", "-", log or name) + ".log"
    log_path = report.log_path(log_name)
    t0 = time.monotonic()
    global _running
    with open(log_path, "w") as out:
        proc = _running = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **report.extra_env, **(env or {})},
                                           start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        # Also after a normal exit: a child it left behind (a pytest-xdist worker) goes too.
        _end_group(proc)
        _running = None
    seconds = time.monotonic() - t0
    with open(log_path, errors="replace") as f:
        tail = f.read()[-OUTPUT_TAIL:]
    if rc is None:
        status, detail = "timed out", f"killed after {timeout:.0f} s"
    else:
        status, detail = ("passed" if rc == 0 else "failed"), f"exit status {rc}"
    return Step(name, status, seconds, f"{detail}; log: {log_name}", shown, output_tail=tail)
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
    env = {"GANOPS_BUILD_CUDA": "1", "GANOPS_LAUNCH_CHECKS": "0", "TORCH_CUDA_ARCH_LIST": capability,
           "MAX_JOBS": str(os.cpu_count() or 1)}
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
                                "'extension_loaded', 'extension_error', 'cuda_kernels_loaded', 'cuda_kernels_error', "
                                "'available_backends')}))"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        info = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else {}
        step.data["build_info"] = info
        if not (info.get("extension_loaded") and info.get("cuda_kernels_loaded")):
            step.status = "failed"
            step.detail += f"; the CUDA kernels do not load: {info or check.stderr[-500:]}"
    report.add(step)
    if step.status != "passed":
        # The Triton backend needs no compiled code: the package installed without its
        # extensions (seconds) lets the Triton checks run all the same.
        fallback = run_command(report, "python-only", cmd, TIMEOUTS["python-only"], {"GANOPS_EXTENSIONS": "0"})
        fallback.detail = "the build failed: ganops installed without its compiled ops (GANOPS_EXTENSIONS=0), " \
                          "for the Triton checks; " + fallback.detail
        report.add(fallback)
    return step


def _junit_summary(path: str) -> dict:
    """Counts and the commonest skip reasons from pytest's JUnit XML."""
    if not os.path.exists(path):
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # pytest killed while writing it
        return {}
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


# pytest -v's line per finished test, with or without xdist's "[gw3] " prefix.
_TEST_LINE = re.compile(r"^(?:\[gw\d+\]\s+)?(?:\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+)"
                        r"|^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _log_summary(path: str) -> dict:
    """The tests that ended, from the log's one line per test: what a run cut short (no
    JUnit XML) still says, failures by name."""
    outcomes: dict[str, str] = {}
    with open(path, errors="replace") if os.path.exists(path) else open(os.devnull) as f:
        for line in f:
            m = _TEST_LINE.match(line.strip())
            if m:
                outcome, test = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
                outcomes[test] = outcome
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"ended": len(outcomes), "counts": counts,
            "failed": [t for t, v in outcomes.items() if v in ("FAILED", "ERROR")][:50]}


def _importable(python: str, module: str, env: dict) -> bool:
    return not _missing_modules(python, [module], env)


def step_tests(report: Report, python: str, has_gpu: bool, missing: list[str], triton_only: bool) -> Step:
    name = "tests-quick" if report.quick else "tests"
    if not has_gpu:
        return report.add(Step(name, "skipped", detail="no GPU visible: the CPU suite is `make test`"))
    if "pytest" in missing:
        return report.add(Step(name, "skipped", detail="pytest is missing (see test-deps)"))
    junit = report.log_path("pytest.xml")
    cmd = [python, "-m", "pytest", "tests", "--gpu-only", "-v", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    extras = []
    if _importable(python, "xdist", report.extra_env):
        cmd += ["-n", str(os.cpu_count() or 1)]
        extras.append(f"-n {os.cpu_count()}")
    if _importable(python, "pytest_timeout", report.extra_env):
        cmd += [f"--timeout={PER_TEST_TIMEOUT}"]
        extras.append(f"{PER_TEST_TIMEOUT} s per test")
    keywords = ["triton" if triton_only else None, "cuda" if report.quick else None]
    keywords = [k for k in keywords if k]
    if keywords:
        cmd += ["-k", " and ".join(keywords)]
    step = run_command(report, name, cmd, TIMEOUTS[name])
    if step.status == "skipped":  # the budget was spent
        return step
    notes = list(extras)
    if triton_only:
        notes.append("the build failed: the Triton tests only")
    if missing:
        notes.append(f"{', '.join(missing)} missing: the tests that need it did not run")
    summary = _junit_summary(junit)
    step.data.update(summary)
    if summary:
        c = summary["counts"]
        head = f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
    else:
        ended = _log_summary(report.log_path(f"{name}.log"))
        summary = {"failed": ended["failed"], "skip_reasons": []}
        step.data["ended"] = ended
        head = (f"no JUnit XML; {ended['ended']} tests ended before the stop: "
                + ", ".join(f"{n} {k.lower()}" for k, n in ended["counts"].items()))
    step.detail = "; ".join([head, *notes, step.detail])
    rows = ["| skipped | reason |", "|---|---|"] + [f"| {n} | {r} |" for r, n in summary["skip_reasons"]]
    step.data["markdown"] = "\n".join(rows + ([""] + [f"- FAILED {f}" for f in summary["failed"]]
                                              if summary["failed"] else []))
    return report.add(step)


def step_graphs(report: Report, python: str, has_gpu: bool, triton_only: bool) -> Step:
    """tools/graph_check.py; without a GPU it runs to its own skip (it must import cleanly
    everywhere)."""
    out_json = report.log_path("graphs.json")
    cmd = [python, os.path.join("tools", "graph_check.py"), "--json", out_json]
    if triton_only:
        cmd += ["--backends", "triton"]
    step = run_command(report, "graphs", cmd, TIMEOUTS["graphs"])
    if not has_gpu and step.status == "passed":
        step.status, step.detail = "skipped", "no GPU visible; the script ran to its skip: " + step.detail
    elif triton_only:
        step.detail = "the build failed: the Triton backend only; " + step.detail
    return report.add(step)


def step_sanitizer(report: Report, python: str, has_gpu: bool, sanitizer: str | None, built: bool) -> None:
    script = os.path.join("tools", "sanitize_ops.py")
    env: dict = {}
    if not has_gpu or sanitizer is None or not built:
        why = ("no GPU visible" if not has_gpu else "the build failed: no CUDA kernels to check" if not built
               else "compute-sanitizer not found (CUDA_HOME/bin, PATH)")
        # The script itself still runs, to its own skip: it must import cleanly everywhere.
        step = run_command(report, "sanitizer", [python, script], 60, env, log="sanitizer-script")
        if step.status == "passed":
            step.status = "skipped"
        step.detail = f"{why}; {script} alone: {step.detail}"
        report.add(step)
        return
    # Without the caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is out of bounds for memcheck, not inside a cached block. Only
    # ganops's kernels (namespace ganops) are instrumented: torch's and cuDNN's would take
    # the time.
    env.update(PYTORCH_NO_CUDA_MEMORY_CACHING="1", GANOPS_BACKEND="cpp")
    unavailable = None
    for tool in SANITIZER_TOOLS:
        name = f"sanitizer {tool}"
        if unavailable:
            report.add(Step(name, "unavailable", detail=unavailable))
            continue
        cmd = [sanitizer, f"--tool={tool}", "--kernel-name", "kns=ganops", "--error-exitcode=1",
               "--print-limit=20", python, script]
        step = run_command(report, name, cmd, TIMEOUTS[name], env)
        if step.status != "passed" and SANITIZER_UNAVAILABLE.search(step.output_tail):
            found = SANITIZER_UNAVAILABLE.search(step.output_tail).group(0)
            unavailable = (f"compute-sanitizer unavailable on this machine (\"{found}\": the sandbox refuses "
                           f"the device); not a finding about ganops")
            step.status, step.detail = "unavailable", f"{unavailable}; {step.detail}"
        match = re.search(r"ERROR SUMMARY: (\d+) error", step.output_tail)
        if match:
            step.detail = f"{match.group(1)} errors; " + step.detail
        report.add(step)


def step_benchmarks(report: Report, python: str, has_gpu: bool) -> None:
    if not has_gpu:
        report.add(Step("benchmarks", "skipped", detail="no GPU visible: the CPU benchmarks are `make bench`"))
        return
    out_json = report.log_path("benchmarks.json")
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
    parser.add_argument("--report", required=True, help="folder for report.md, report.json and logs.tar.gz")
    parser.add_argument("--quick", action="store_true", help="build, CUDA tests and sanitizer only")
    parser.add_argument("--budget", type=float, help=f"overall seconds (default {FULL_BUDGET}, --quick {QUICK_BUDGET})")
    parser.add_argument("--python", default=sys.executable, help="the Python (and torch) to build and test with")
    args = parser.parse_args(argv)
    report = Report(args.report, args.quick, args.budget or (QUICK_BUDGET if args.quick else FULL_BUDGET))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, f: _stop(report, n, f))
    try:
        return _run(report, args.python)
    finally:
        shutil.rmtree(report.logs, ignore_errors=True)


def _run(report: Report, python: str) -> int:
    t0 = time.monotonic()
    report.environment = probe_environment(python)
    env = report.environment
    report.add(Step("environment", "passed", time.monotonic() - t0,
                    f"GPU: {env.get('GPU') or 'none visible'}, torch {env.get('torch')}"))
    if str(env.get("torch", "")).startswith("not importable"):
        report.add(Step("build", "skipped", detail=f"torch {env['torch']} for {python}"))
        print(f"gpu-check: torch is {env['torch']}; report in {report.directory}")
        return 0
    has_gpu = env.get("GPU") is not None
    deps = step_test_deps(report, python)
    build = step_build(report, python, env.get("compute capability"))
    # A failed build leaves the Triton backend, which needs none: its checks still run.
    triton_only = has_gpu and build.status != "passed"
    step_tests(report, python, has_gpu, deps.data.get("missing", []), triton_only)
    if report.quick:
        report.add(Step("graphs", "skipped", detail="--quick"))
    else:
        step_graphs(report, python, has_gpu, triton_only)
    step_sanitizer(report, python, has_gpu, env.get("compute-sanitizer"), built=not triton_only)
    if report.quick:
        report.add(Step("benchmarks", "skipped", detail="--quick"))
    else:
        step_benchmarks(report, python, has_gpu)
    report.write()
    print(open(os.path.join(report.directory, "report.md")).read())
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
