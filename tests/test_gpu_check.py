"""tools/gpu_check.py: its report, timeouts and budget, and a whole run in its no-GPU mode
(what it can run runs, the rest is skipped with a reason, exit 0). The GPU steps themselves
only run on a GPU machine (`make gpu-check`)."""

import importlib
import json
import os
import subprocess
import sys
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
    for name in ("build", "tests", "sanitizer", "graphs", "benchmarks"):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"], name
        assert "no GPU visible" in steps[name]["detail"], steps[name]
    # The GPU scripts ran to their own skip: they import cleanly without a GPU.
    assert "skipped: no CUDA GPU visible" in steps["sanitizer"]["output_tail"]
    assert "skipped: no CUDA GPU visible" in steps["graphs"]["output_tail"]
    assert json.loads((tmp_path / "graphs.json").read_text())["skipped"] == "no CUDA GPU visible"
    md = (tmp_path / "report.md").read_text()
    assert "## Skipped, and why" in md and "- **benchmarks**: no GPU visible" in md


@pytest.fixture
def gpu_workloads():
    yield from _tool("gpu_workloads")


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_the_gpu_workloads_run_and_reset_on_cpu(gpu_workloads, backend):
    """The sanitizer's and the graph check's calls, run on CPU tensors: a GPU session (a few
    minutes, rarely lent) must not be the first to find a wrong argument in them. Each call
    from its reset state gives the same outputs twice, which the graph check relies on."""
    reason = __import__("ganops")._backend.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)
    calls = gpu_workloads.workloads("cpu", backend)
    names = " ".join(w.name for w in calls)
    for op in ("spectral_normalize", "spectral_norm module", "interpolate", "gradient_norm_penalty",
               "gradient_penalty", "r1_penalty", "minibatch_similarity gradgrad", "get_total_norm",
               "clip_grad_norm_", "clip_grads_with_norm_", "grad_norm"):
        assert op in names, op
    for w in calls:
        w.reset()
        first = [t.detach().clone() for t in w.run()]
        w.reset()
        second = w.run()
        assert first and all(t.isfinite().all() for t in first), w.name
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), w.name


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
