"""tools/gpu_check.py: its report, timeouts and budget, and a whole run in its no-GPU mode
(what it can run runs, the rest is skipped with a reason, exit 0). The GPU steps themselves
only run on a GPU machine (`make gpu-check`)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(TOOLS, "gpu_check.py")),
                                reason="tools/ is not beside the tests (an installed package is tested)")


def _tool(name: str):
    """tools/<name>.py imported as a module, for the length of a test."""
    sys.path.insert(0, TOOLS)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(TOOLS)


@pytest.fixture
def gpu_check():
    yield from _tool("gpu_check")


def test_a_step_past_its_timeout_is_killed_and_reported(gpu_check, tmp_path):
    report = gpu_check.Report(str(tmp_path), quick=False, budget=60)
    step = report.add(gpu_check.run_command(report, "sleepy", [sys.executable, "-c", "import time; time.sleep(30)"],
                                            timeout=11))
    assert step.status == "timed out" and 11 <= step.seconds < 25
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["ok"] is False and doc["steps"][0]["status"] == "timed out"
    assert "| sleepy | timed out |" in (tmp_path / "report.md").read_text()


def test_the_report_names_the_running_step_before_it_ends(gpu_check, tmp_path):
    """A run killed from outside (the machine's own time limit) still leaves a report."""
    report = gpu_check.Report(str(tmp_path), quick=True, budget=60)
    code = ("import json, sys; d = json.load(open(sys.argv[1])); "
            "print([s['status'] for s in d['steps'] if s['name'] == 'peek'])")
    step = gpu_check.run_command(report, "peek", [sys.executable, "-c", code, str(tmp_path / "report.json")], 60)
    assert step.status == "passed" and "['running']" in step.output_tail


def test_a_step_is_not_started_once_the_budget_is_spent(gpu_check, tmp_path):
    report = gpu_check.Report(str(tmp_path), quick=False, budget=gpu_check.MIN_START - 1)
    step = gpu_check.run_command(report, "late", [sys.executable, "-c", "pass"], 60)
    assert step.status == "skipped" and "budget is spent" in step.detail


def test_junit_summary_counts_and_skip_reasons(gpu_check, tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs a GPU"/></testcase>'
        '<testcase classname="t" name="d"><skipped message="needs a GPU"/></testcase>'
        '</testsuite></testsuites>')
    summary = gpu_check._junit_summary(str(xml))
    assert summary["counts"] == {"tests": 4, "failures": 1, "errors": 0, "skipped": 2, "passed": 1}
    assert summary["skip_reasons"] == [("needs a GPU", 2)] and summary["failed"] == ["t::b"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: `make gpu-check` runs the real thing")
def test_without_a_gpu_it_runs_what_it_can_and_says_what_it_skipped(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "gpu_check.py"), "--report", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "report.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["ok"] and steps["environment"]["status"] == "passed"
    assert steps["environment"]["detail"].startswith("GPU: none visible")
    assert list(steps) == ["environment", "test-deps", "build", "tests", "graphs", "sanitizer", "benchmarks"]
    for name in ("build", "tests", "sanitizer", "graphs", "benchmarks"):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"], name
        assert "no GPU visible" in steps[name]["detail"], steps[name]
    # The GPU scripts ran to their own skip: they import cleanly without a GPU.
    assert "skipped: no CUDA GPU visible" in steps["sanitizer"]["output_tail"]
    assert "skipped: no CUDA GPU visible" in steps["graphs"]["output_tail"]
    md = (tmp_path / "report.md").read_text()
    assert "## Skipped, and why" in md and "- **benchmarks**: no GPU visible" in md
    # Three files come back from a lent machine (at most 8 may): the logs are one archive.
    assert sorted(os.listdir(tmp_path)) == ["logs.tar.gz", "report.json", "report.md"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        names = tar.getnames()
        graphs = json.load(tar.extractfile("logs/graphs.json"))
    assert graphs["skipped"] == "no CUDA GPU visible"
    assert {"logs/graphs.log", "logs/sanitizer-script.log"} <= set(names), names


def test_the_step_budgets_add_up_within_the_overall_budget(gpu_check):
    """Every step can use its whole timeout and the run still ends within the budget, which
    leaves a lent machine's 10-minute command time for its start and the copies back."""
    for quick, budget in ((False, gpu_check.FULL_BUDGET), (True, gpu_check.QUICK_BUDGET)):
        assert set(gpu_check.STEPS[quick]) <= set(gpu_check.TIMEOUTS)
        assert gpu_check.planned_seconds(quick) <= budget, (quick, gpu_check.planned_seconds(quick), budget)
    assert gpu_check.FULL_BUDGET <= 9 * 60


def _recording(gpu_check, monkeypatch, failing=()):
    """run_command replaced by one that records the commands and passes (fails for the
    step names in ``failing``)."""
    commands = []

    def record(report, name, cmd, timeout, env=None, log=None):
        commands.append((name, cmd, env or {}))
        return gpu_check.Step(name, "failed" if name in failing else "passed", detail="exit status 0")
    monkeypatch.setattr(gpu_check, "run_command", record)
    monkeypatch.setattr(gpu_check, "_importable", lambda python, module, env: True)
    return commands


def test_on_a_gpu_the_tests_are_the_gpu_only_ones_in_parallel_with_a_timeout(gpu_check, monkeypatch, tmp_path):
    commands = _recording(gpu_check, monkeypatch)
    report = gpu_check.Report(str(tmp_path), quick=False, budget=600)
    gpu_check.step_tests(report, sys.executable, has_gpu=True, missing=[], triton_only=False)
    (name, cmd, _), = commands
    assert name == "tests" and "--gpu-only" in cmd and "-v" in cmd and "-k" not in cmd
    assert cmd[cmd.index("-n") + 1] == str(os.cpu_count()) and f"--timeout={gpu_check.PER_TEST_TIMEOUT}" in cmd


def test_a_failed_build_still_runs_the_triton_checks(gpu_check, monkeypatch, tmp_path):
    commands = _recording(gpu_check, monkeypatch, failing=("build",))
    report = gpu_check.Report(str(tmp_path), quick=False, budget=600)
    gpu_check.step_build(report, sys.executable, "9.0")
    (build, _, build_env), (fallback, fallback_cmd, fallback_env) = commands
    assert (build, fallback) == ("build", "python-only") and build_env["GANOPS_LAUNCH_CHECKS"] == "0"
    assert fallback_env == {"GANOPS_EXTENSIONS": "0"} and fallback_cmd[-2:] == ["-e", "."]
    commands.clear()
    gpu_check.step_tests(report, sys.executable, has_gpu=True, missing=[], triton_only=True)
    gpu_check.step_graphs(report, sys.executable, has_gpu=True, triton_only=True)
    gpu_check.step_sanitizer(report, sys.executable, has_gpu=True, sanitizer="/bin/true", built=False)
    tests, graphs, sanitizer = (cmd for _, cmd, _ in commands)
    assert tests[tests.index("-k") + 1] == "triton" and "--gpu-only" in tests
    assert graphs[graphs.index("--backends") + 1] == "triton"
    assert sanitizer[1].endswith("sanitize_ops.py")  # the script alone, to its skip
    steps = {s.name: s for s in report.steps}
    assert steps["sanitizer"].status == "skipped" and "the build failed" in steps["sanitizer"].detail
    assert "Triton" in steps["tests"].detail and "Triton" in steps["graphs"].detail


def test_a_sanitizer_the_machine_refuses_is_unavailable_not_a_failure(gpu_check, tmp_path):
    """Some lent machines' sandboxes refuse compute-sanitizer: "Device not supported", then
    error 999 at the first allocation. A stand-in sanitizer prints just that."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\necho '========= Device not supported'\n"
                    "echo 'RuntimeError: CUDA error: unknown error (error 999)'\nexit 1\n")
    fake.chmod(0o755)
    report = gpu_check.Report(str(tmp_path / "report"), quick=False, budget=600)
    gpu_check.step_sanitizer(report, sys.executable, has_gpu=True, sanitizer=str(fake), built=True)
    steps = {s.name: s for s in report.steps}
    assert [s for s in steps if s.startswith("sanitizer")] == [f"sanitizer {t}" for t in gpu_check.SANITIZER_TOOLS]
    assert all(s.status == "unavailable" and "unavailable on this machine" in s.detail
               for n, s in steps.items() if n.startswith("sanitizer")), steps
    assert "kns=ganops" in steps["sanitizer memcheck"].command
    assert report.ok()


def test_the_log_names_every_test_that_ended(gpu_check, tmp_path):
    """pytest -v's lines, with and without xdist's worker prefix: a run cut short (no JUnit
    XML) still reports its failures by name."""
    log = tmp_path / "tests.log"
    log.write_text("[gw0] [ 10%] PASSED tests/test_a.py::test_x[cuda-cpp]\n"
                   "[gw1] [ 20%] FAILED tests/test_a.py::test_y[cuda-triton]\n"
                   "tests/test_b.py::test_z SKIPPED (needs two CUDA GPUs)\n"
                   "collecting ... \n")
    summary = gpu_check._log_summary(str(log))
    assert summary["ended"] == 3 and summary["failed"] == ["tests/test_a.py::test_y[cuda-triton]"]
    assert summary["counts"] == {"PASSED": 1, "FAILED": 1, "ERROR": 0, "SKIPPED": 1}


def test_gpu_only_keeps_the_tests_a_cpu_cannot_run(tmp_path):
    """pytest --gpu-only selects the CUDA-parametrized and GPU-requiring tests, not the
    launch checks (CUDA launches emulated on the CPU) nor the CPU cases."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--gpu-only", "tests/test_minibatch_discrimination.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert selected and all("cuda" in line.lower() for line in selected), selected
    assert not any("launch_check" in line or "cpu-" in line for line in selected), selected


@pytest.fixture
def gpu_workloads():
    yield from _tool("gpu_workloads")


def test_every_registered_op_has_a_gpu_workload(gpu_workloads):
    """The sanitizer's and the graph check's calls are derived from the registry: a new op
    is covered by declaring it (with examples), with no edit of tools/."""
    ganops = __import__("ganops")
    calls = gpu_workloads.workloads("cpu", "torch")
    covered = {w.op for w in calls}
    missing = [name for name in ganops._library.REGISTRY if name not in covered]
    assert not missing, f"registered ops with no GPU workload (declare examples in their hub): {missing}"
    names = " ".join(w.name for w in calls)
    for api in ("spectral_norm module", "gradient_penalty", "r1_penalty"):
        assert api in names, api
    # Every dtype's kernels are instantiated apart; the sanitizer sees each once.
    sanitized = gpu_workloads.workloads("cpu", "torch", gpu_workloads.ALL_DTYPES)
    for dtype in ("float16", "bfloat16", "float64"):
        assert {w.op for w in sanitized if w.name.endswith(dtype)} == set(ganops._library.REGISTRY), dtype


# Not triton: its calls are the same registered ops on the same examples, which the contract
# suite already runs under the interpreter (minutes here, for the large clip examples).
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_the_gpu_workloads_run_and_reset_on_cpu(gpu_workloads, backend):
    """The sanitizer's and the graph check's calls, run on CPU tensors: a GPU session (a few
    minutes, rarely lent) must not be the first to find a wrong argument in them. Each call
    from its reset state gives the same outputs twice, which the graph check relies on."""
    ganops = __import__("ganops")
    reason = ganops._backend.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)
    for w in gpu_workloads.workloads("cpu", backend):
        w.reset()
        first = [t.detach().clone() for t in w.run()]
        w.reset()
        second = w.run()
        assert first, w.name
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), w.name


def test_an_op_workload_restores_mutated_arguments_and_differentiates(gpu_workloads):
    """A workload of an in-place op restores what it changes before each call, and one of an
    op with a backward returns the gradients of its inputs."""
    ganops = __import__("ganops")
    scale = ganops._library.REGISTRY["multi_tensor_scale_"]
    grads = [torch.full((3,), 2.0), torch.full((2,), -4.0)]
    w = gpu_workloads.op_workload(scale, "torch", "cpu", "scale", (grads, torch.tensor(8.0), 1.0))
    for _ in range(2):
        w.reset()
        out = w.run()
        assert torch.allclose(out[0], torch.full((3,), 0.25), rtol=1e-5) and len(out) == 2
    interpolate = ganops._library.REGISTRY["interpolate"]
    real, fake = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3, requires_grad=True)
    alpha = torch.tensor([0.25, 0.5], requires_grad=True)
    outs = gpu_workloads.op_workload(interpolate, "torch", "cpu", "interp", (real, fake, alpha)).run()
    assert len(outs) == 4 and outs[1].shape == real.shape and outs[3].shape == alpha.shape


def test_the_wgan_gp_step_is_reproducible_on_cpu(gpu_workloads):
    """Two trainers from one seed step alike (the graph check compares a captured one with an
    eager one), and steps change the parameters and the spectral-norm vectors: all but the
    critic's last bias (the Wasserstein loss's gradient in it cancels) and its one-element
    u (a unit vector of length 1 stays 1)."""
    a, b = gpu_workloads.WganGpTrainer("cpu", "torch"), gpu_workloads.WganGpTrainer("cpu", "torch")
    before = [t.clone() for t in a.state()]
    for _ in range(2):
        losses_a, losses_b = a.step(), b.step()
        assert all(torch.equal(x, y) for x, y in zip(losses_a, losses_b))
    assert all(torch.equal(x, y) for x, y in zip(a.state(), b.state()))
    unchanged = [tuple(x.shape) for x, y in zip(before, a.state()) if torch.equal(x, y)]
    assert unchanged == [(1,), (1,)]


def test_stopped_from_outside_it_ends_the_step_and_leaves_a_report(tmp_path):
    """The GPU session's own limit may stop the driver: the step running is ended with it
    and the report says so."""
    code = (f"import sys, time; sys.path.insert(0, {TOOLS!r}); import gpu_check as g, signal\n"
            f"r = g.Report({str(tmp_path)!r}, quick=True, budget=120)\n"
            "signal.signal(signal.SIGTERM, lambda n, f: g._stop(r, n, f))\n"
            "g.run_command(r, 'long', [sys.executable, '-c', 'import time; time.sleep(60)'], 100)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    report = tmp_path / "report.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (report.exists() and '"running"' in report.read_text()):
        time.sleep(0.2)
    proc.terminate()
    assert proc.wait(timeout=30) == 1
    step = json.loads(report.read_text())["steps"][0]
    assert step["status"] == "timed out" and "stopped from outside" in step["detail"]


def test_stopped_from_outside_it_ends_the_steps_whole_process_group(tmp_path):
    """A step's children (pytest-xdist's workers, ninja's nvcc) go with it."""
    pid_file = tmp_path / "grandchild.pid"
    step_cmd = ("import subprocess, sys, time; "
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    code = (f"import sys; sys.path.insert(0, {TOOLS!r}); import gpu_check as g, signal\n"
            f"r = g.Report({str(tmp_path / 'report')!r}, quick=True, budget=200)\n"
            "signal.signal(signal.SIGINT, lambda n, f: g._stop(r, n, f))\n"
            f"g.run_command(r, 'long', [sys.executable, '-c', {step_cmd!r}], 150)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.2)
    grandchild = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.2)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie awaiting its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
