"""setup.py's decisions, read from the metadata it writes (egg_info compiles nothing): the
torch a build requires and the version's tag, and the GANOPS_BUILD_CUDA switch, including its escape hatch past
a CUDA major-version mismatch (shown with a stand-in nvcc reporting another release)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")

pytestmark = pytest.mark.skipif(not os.path.exists(SETUP),
                                reason="setup.py is not beside the tests (an installed package is tested)")


def egg_info(tmp_path, **env):
    """Runs setup.py egg_info into tmp_path; returns (completed process, requires.txt lines)."""
    run_env = {**os.environ, "GANOPS_BUILD_CUDA": "0", **env}
    proc = subprocess.run([sys.executable, SETUP, "-q", "egg_info", "--egg-base", str(tmp_path)],
                          cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    requires = tmp_path / "ganops.egg-info" / "requires.txt"
    lines = requires.read_text().split() if requires.exists() else None
    return proc, lines


def version_of(egg_base) -> str:
    for line in (egg_base / "ganops.egg-info" / "PKG-INFO").read_text().splitlines():
        if line.startswith("Version: "):
            return line.split(": ", 1)[1]
    raise AssertionError("no Version in PKG-INFO")


def torch_specifiers(requires):
    (torch_line,) = [r for r in requires if r.startswith("torch")]
    return set(torch_line[len("torch"):].split(","))


def test_source_build_requires_any_torch_from_2_11_before_3(tmp_path):
    proc, requires = egg_info(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert torch_specifiers(requires) == {">=2.11", "<3"}


def test_local_version_names_the_cuda_major_not_the_torch(tmp_path):
    """The stable ABI lets one build serve every torch from 2.11: a wheel is per CUDA major."""
    proc, requires = egg_info(tmp_path, GANOPS_LOCAL_VERSION="1")
    assert proc.returncode == 0, proc.stderr
    assert torch_specifiers(requires) == {">=2.11", "<3"}
    assert version_of(tmp_path) == "0.1.0+cpu"  # GANOPS_BUILD_CUDA=0: no CUDA kernels


def test_build_cuda_rejects_unknown_values(tmp_path):
    proc, _ = egg_info(tmp_path, GANOPS_BUILD_CUDA="yes")
    assert proc.returncode != 0
    assert "GANOPS_BUILD_CUDA must be 0, 1 or force, got 'yes'" in proc.stderr


@pytest.fixture
def other_nvcc(tmp_path):
    """A CUDA_HOME whose nvcc reports a major version other than torch's."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build: there is no version to mismatch")
    other = int(torch.version.cuda.split(".")[0]) - 1
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.8, V{other}.8.93'\n")
    nvcc.chmod(0o755)
    return str(home), f"{other}.8"


def test_build_cuda_1_refuses_a_mismatched_nvcc(tmp_path, other_nvcc):
    home, release = other_nvcc
    proc, _ = egg_info(tmp_path / "out", CUDA_HOME=home, GANOPS_BUILD_CUDA="1")
    assert proc.returncode != 0
    assert f"nvcc {release} at {home} does not match the CUDA {torch.version.cuda}" in proc.stderr


def test_build_cuda_unset_skips_a_mismatched_nvcc(tmp_path, other_nvcc):
    home, _ = other_nvcc
    env = {k: v for k, v in os.environ.items() if k != "GANOPS_BUILD_CUDA"}
    proc = subprocess.run([sys.executable, SETUP, "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                          env={**env, "CUDA_HOME": home, "GANOPS_LOCAL_VERSION": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert version_of(tmp_path).endswith("cpu")  # built without the CUDA kernels


def test_build_cuda_force_builds_past_the_mismatch_with_a_warning(tmp_path, other_nvcc):
    home, release = other_nvcc
    proc, _ = egg_info(tmp_path, CUDA_HOME=home, GANOPS_BUILD_CUDA="force", GANOPS_LOCAL_VERSION="1")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: GANOPS_BUILD_CUDA=force" in proc.stderr and "do not ship it" in proc.stderr
    # Forced, the CUDA kernels are part of the build: the version tag names torch's CUDA major.
    assert version_of(tmp_path).endswith("+cu" + torch.version.cuda.split(".")[0])
