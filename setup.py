"""Build for ganops: the extension modules ``ganops._C`` (the C++ CPU kernels),
``ganops._C_cuda`` (the CUDA kernels) and, for the test suite only, ``ganops._C_launch_checks``.

Every module is built on LibTorch's stable ABI (torch/csrc/stable, torch/headeronly) with
TORCH_TARGET_VERSION = 2.11, and on CPython's limited API (abi3, 3.10): one build loads beside
every torch from 2.11 on (and before 3) and every CPython from 3.10 on. They register kernels
only; each op's schema is defined once, by the registry (ganops/_library.py). ganops._C needs
no CUDA, so it serves a CPU-only torch; ganops._C_cuda is loaded only beside a torch built for
the CUDA major version it was compiled with (ganops/_ext.py).

The C++ CPU kernels are always compiled. The CUDA kernels are compiled whenever a CUDA
toolkit whose major version matches torch's is found, with or without a visible GPU.

Work splits are written once, in the Triton kernels: a module-level dict literal
``WORK_SPLIT = {"CHUNK_SIZE": 16384, ...}`` in triton_kernels/<op>.py. This file reads every
triton_kernels/*.py with ``ast`` (no import: triton may be absent at build time) and passes
each entry to the C++ and CUDA compilers as ``-DGANOPS_<OP>_<NAME>=<value>``, OP being the
file's stem upper-cased (GANOPS_GRADIENT_PENALTY_CHUNK_SIZE); csrc/<op>/<op>.h binds it to its
constant and stops with an #error if it is missing. A new op's split needs its Triton file only.

``ganops._C_launch_checks`` holds the launch checks (csrc/<op>/<op>_launch_check.cpp, test
ops that replay each CUDA launch on the CPU, see csrc/include/ganops/launch_emulation.h): they
are not part of the library, so ``make wheel`` (GANOPS_LAUNCH_CHECKS=0) leaves them out, and
tests/conftest.py loads them where they were built.

Environment variables:
  GANOPS_BUILD_CUDA      1: require the CUDA kernels; 0: skip them; unset: build them if a
                         matching toolkit is found; force: build them even when nvcc's CUDA
                         major version differs from torch's (e.g. nvcc 13 against a torch
                         built for CUDA 12), with a warning: the result may not load or run.
  GANOPS_LAUNCH_CHECKS   0: do not build the test-only extension ganops._C_launch_checks
                         (the wheel, gpu-check's build); otherwise it is built.
  GANOPS_EXTENSIONS      0: no compiled extension at all, the torch and Triton backends only
                         (gpu-check's fallback when the build fails). Default 1.
  GANOPS_LOCAL_VERSION   1: the version carries a local tag naming the CUDA major version its
                         kernels were built for (0.1.0+cu13), or +cpu without them: the wheel's
                         name. Either way the package requires torch >= 2.11, < 3.
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.0;9.0+PTX". Default: the visible GPUs'
                         architectures, or "9.0+PTX" when none is visible.
  MAX_JOBS               parallel compile jobs (ninja). Default: one per 4 GiB of memory,
                         at most the number of cores.
  CUDA_HOME              the CUDA toolkit. Default: /usr/local/cuda, then nvcc on PATH.
"""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST_WITHOUT_GPU = "9.0+PTX"


def _find_cuda_home():
    """CUDA_HOME must be set before torch.utils.cpp_extension is imported: left alone, torch
    guesses it from nvcc's path (/usr/local/cuda/bin/nvcc -> /usr/local) and linking fails."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _default_max_jobs():
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc on torch headers peaks near 3-4 GiB per job.
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("MAX_JOBS", _default_max_jobs())

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _decide_cuda():
    """Returns (build_cuda, reason)."""
    forced = os.environ.get("GANOPS_BUILD_CUDA")
    if forced not in (None, "", "0", "1", "force"):
        raise SystemExit(f"GANOPS_BUILD_CUDA must be 0, 1 or force, got {forced!r}")
    if forced == "0":
        return False, "GANOPS_BUILD_CUDA=0"
    problem = None
    mismatch = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        nvcc = _nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if nvcc is None:
            problem = f"could not run {cuda_home}/bin/nvcc --version"
        elif nvcc[0] != torch_major:
            mismatch = (f"nvcc {nvcc[0]}.{nvcc[1]} at {cuda_home} does not match the CUDA "
                        f"{torch.version.cuda} torch was built with")
    if problem is None and mismatch is not None and forced == "force":
        # The escape hatch: torch's headers compile with a newer nvcc, but the kernels then
        # need the newer CUDA runtime beside torch's older one; say so loudly.
        print(f"WARNING: GANOPS_BUILD_CUDA=force: building the CUDA kernels although {mismatch}. "
              f"The extension may fail to load or to run on this torch; do not ship it.",
              file=sys.stderr)
        return True, f"forced (GANOPS_BUILD_CUDA=force) although {mismatch}"
    problem = problem or mismatch
    if problem is None:
        return True, "CUDA toolkit found"
    if forced in ("1", "force"):
        raise SystemExit(f"GANOPS_BUILD_CUDA={forced} but the CUDA kernels cannot be built: {problem}")
    return False, problem


build_cuda, cuda_reason = _decide_cuda()
if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST_WITHOUT_GPU
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native (visible GPUs)") if build_cuda else ""


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _env_switch(name, default):
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# Found by glob, so a new op touches no build file: csrc/<op>/<op>_cpu.cpp go into ganops._C,
# <op>_cuda.cu into ganops._C_cuda, <op>_launch_check.cpp into ganops._C_launch_checks.
cpu_sources = ["csrc/ganops.cpp"] + _sources("csrc/*/*_cpu.cpp")
cuda_sources = ["csrc/ganops_cuda.cpp"] + _sources("csrc/*/*_cuda.cu")
launch_check_sources = ["csrc/ganops_launch_checks.cpp"] + _sources("csrc/*/*_launch_check.cpp")
build_extensions = _env_switch("GANOPS_EXTENSIONS", "1")
build_launch_checks = build_extensions and _env_switch("GANOPS_LAUNCH_CHECKS", "1")


def _work_split_definitions():
    """-DGANOPS_<OP>_<NAME>=<value> for every entry of each triton_kernels/<op>.py's WORK_SPLIT."""
    definitions = []
    for path in sorted(glob.glob(os.path.join(ROOT, "triton_kernels", "*.py"))):
        with open(path, encoding="utf-8") as f:
            module = ast.parse(f.read(), filename=path)
        op = os.path.splitext(os.path.basename(path))[0].upper()
        for node in module.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            if not (isinstance(target, ast.Name) and target.id == "WORK_SPLIT"):
                continue
            try:
                split = ast.literal_eval(node.value)
            except ValueError:
                split = None
            if not isinstance(split, dict):
                raise SystemExit(f"{path}: WORK_SPLIT must be a dict literal of names to integers")
            for name, value in split.items():
                if not (isinstance(name, str) and name.isidentifier() and type(value) is int):
                    raise SystemExit(f"{path}: WORK_SPLIT entry {name!r}: {value!r} must map a name to an integer")
                definitions.append(f"-DGANOPS_{op}_{name}={value}")
    return definitions


work_split_flags = _work_split_definitions()

# The oldest torch the modules load beside: TORCH_TARGET_VERSION makes any stable API newer
# than it a compile error, so the binary calls nothing an older torch lacks. torch.utils'
# py_limited_api adds -DPy_LIMITED_API for the CPython the module targets (3.10 on).
MIN_TORCH = "2.11"
STABLE_ABI_FLAGS = ["-DTORCH_TARGET_VERSION=0x020b000000000000"]
# The CPU kernels parallelise with torch's own thread pool (torch::stable::parallel_for), so
# no OpenMP here.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"] + STABLE_ABI_FLAGS + work_split_flags
include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]


def _cpu_extension(name, sources):
    return CppExtension(name, sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                        py_limited_api=True)


extensions = []
if build_extensions:
    extensions.append(_cpu_extension("ganops._C", cpu_sources))
if build_extensions and build_cuda:
    # USE_CUDA: the C shim declares its CUDA functions (the current stream, CUDA errors) under it.
    nvcc_flags = (["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-DUSE_CUDA"] + STABLE_ABI_FLAGS
                  + work_split_flags)
    extensions.append(CUDAExtension("ganops._C_cuda", cuda_sources, include_dirs=include_dirs,
                                    extra_compile_args={"cxx": cxx_flags + ["-DUSE_CUDA"], "nvcc": nvcc_flags},
                                    py_limited_api=True))
if build_launch_checks:
    # CPU code only (the launches are emulated); its test ops define their own schemas.
    extensions.append(_cpu_extension("ganops._C_launch_checks", launch_check_sources))



def _local_version_tag():
    """cu13 for a build with CUDA kernels for CUDA 13, cpu without: the wheel serves every
    torch >= 2.11 of that CUDA major, so the torch is not in the name."""
    return ("cu" + torch.version.cuda.split(".")[0]) if build_cuda else "cpu"


def _write_build_info(path):
    info = {
        "version": version,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_kernels": build_cuda and build_extensions,
        "cuda_major": int(torch.version.cuda.split(".")[0]) if build_cuda else None,
        "min_torch": MIN_TORCH,
        "cuda_kernels_reason": cuda_reason,
        "nvcc_version": ".".join(map(str, _nvcc_version(cuda_home))) if build_cuda else None,
        "cuda_arch_list": arch_list,
    }
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time; do not edit."""\n\n')
        f.write(f"BUILD_INFO = {info!r}\n")


class BuildExtensionInTree(BuildExtension.with_options(use_ninja=True)):
    """Keeps object files under build/ in the source tree, one folder per torch and
    architecture list, so a second build (pip makes a fresh temporary directory for every
    install) recompiles only what changed, and a wheel for other architectures or a build
    against another torch (make test TORCH=...) does not throw the development build's
    objects away. Writes the build facts beside the extension it built."""

    def finalize_options(self):
        super().finalize_options()
        arch_tag = re.sub(r"[^0-9A-Za-z]+", "_", arch_list) if build_cuda else "cpu"
        torch_tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
        self.build_temp = os.path.join(ROOT, "build", f"temp-pt{torch_tag}-{arch_tag}")
        # distutils skips an extension whose file is newer than its sources, even when it
        # was linked against another torch; ninja still recompiles only what changed.
        self.force = True

    def run(self):
        super().run()
        package_dir = os.path.dirname(self.get_ext_fullpath("ganops._C"))
        _remove_stale_extensions(package_dir)
        _write_build_info(os.path.join(package_dir, "_build_info.py"))


def _remove_stale_extensions(package_dir):
    """Deletes the compiled modules in package_dir that this build does not make, by file
    name. The output folder outlives a build: pip builds in build/lib of the source tree, so
    an earlier build with other switches (the launch checks of `make test TORCH=...`) would
    otherwise end up in the wheel; and a module of the same name built before the stable ABI
    (_C.cpython-311-x86_64-linux-gnu.so beside the new _C.abi3.so) would be the one Python
    imports, since it tries the interpreter's own suffix before abi3's."""
    made = {_module_file_name(ext) for ext in extensions}
    for path in glob.glob(os.path.join(package_dir, "_C*.so")):
        if os.path.basename(path) not in made:
            os.remove(path)


def _module_file_name(ext):
    """_C.abi3.so for a limited-API module, _C.cpython-311-x86_64-linux-gnu.so otherwise."""
    suffix = ".abi3.so" if getattr(ext, "py_limited_api", False) else sysconfig.get_config_var("EXT_SUFFIX")
    return ext.name.rsplit(".", 1)[-1] + suffix


class BuildPyWithoutStaleExtensions(build_py):
    """Runs even when no extension is built (GANOPS_EXTENSIONS=0), where build_ext does not."""

    def run(self):
        super().run()
        if not self.editable_mode:
            _remove_stale_extensions(os.path.join(self.build_lib, "ganops"))


BASE_VERSION = "0.1.0"

version = BASE_VERSION
if os.environ.get("GANOPS_LOCAL_VERSION", "0") == "1":
    version = f"{BASE_VERSION}+{_local_version_tag()}"
# Dynamic in pyproject.toml: the stable ABI's promise runs to the next major torch.
install_requires = [f"torch>={MIN_TORCH},<3"]

setup(
    version=version,
    install_requires=install_requires,
    packages=["ganops", "ganops.ops", "ganops.nn", "ganops.nn.utils", "ganops.triton_kernels"],
    package_dir={"ganops.triton_kernels": "triton_kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtensionInTree, "build_py": BuildPyWithoutStaleExtensions},
    # abi3: the wheel is tagged cp310-abi3, for every CPython from 3.10 on.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
