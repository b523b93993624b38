"""The compiled CUDA kernels: no register spills, no stack frames, no local memory.

Read from the built extension with cuobjdump --dump-resource-usage (requirements.txt pins
nvidia-cuda-cuobjdump; Triton bundles one too). No GPU is needed. `make cuda-resources`
runs this file and prints every kernel's registers and shared memory.
"""

import glob
import importlib.util
import os
import re
import subprocess

import pytest

import ganops

# Kernels allowed a stack frame, each (a regular expression on the mangled name) with the
# reason. Every other kernel must have none.
ALLOWED_LOCAL_MEMORY: dict[str, str] = {
    # Spectral norm's dW kernel with 64-bit indices (Index = long, "l"), half/bfloat16, sm_80:
    # ptxas keeps 8 bytes on the stack around the 64-bit division subroutine. The kernel
    # runs only for weights of 2^32 elements or more; below that (every real layer) the
    # uint32_t instantiation, which has no stack, is launched.
    r"grad_weight_kernelIN3c10(4Half|8BFloat16)EflE": "64-bit division call, weights >= 2^32 elements only",
}


def _cuobjdump():
    for package, rel in (("nvidia", "cu13/bin/cuobjdump"), ("triton", "backends/nvidia/bin/cuobjdump")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            path = os.path.join(root, rel)
            if os.access(path, os.X_OK):
                return path
    return None


def _extension_path():
    # ganops._C_cuda, the module of the CUDA kernels ("_C_cuda.abi3.so").
    (path,) = glob.glob(os.path.join(os.path.dirname(ganops.__file__), "_C_cuda.*.so"))
    return path


def resource_usage():
    """{(arch, kernel): {REG, STACK, SHARED, LOCAL, ...}} for every kernel in ganops._C_cuda."""
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", _extension_path()],
                         capture_output=True, text=True, check=True).stdout
    usage, arch = {}, None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            usage[(arch, match.group(1))] = {k: int(v) for k, v in fields.items()}
    return usage


info = ganops.build_info()
pytestmark = [
    pytest.mark.skipif(not info["cuda_kernels"], reason=f"CUDA kernels not built: {info['cuda_kernels_reason']}"),
    pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (pip install nvidia-cuda-cuobjdump)"),
]


def test_every_architecture_in_the_build_is_present():
    archs = {arch for arch, _ in resource_usage()}
    wanted = {"sm_" + a.replace("+PTX", "").replace(".", "") for a in info["cuda_arch_list"].split(";") if a}
    assert wanted <= archs, f"built for {info['cuda_arch_list']} but the extension holds {sorted(archs)}"


def test_no_spills_stack_or_local_memory():
    usage = resource_usage()
    assert usage, "cuobjdump found no kernels"
    offenders = []
    for (arch, kernel), res in sorted(usage.items()):
        print(f"{arch} REG:{res.get('REG')} SHARED:{res.get('SHARED')} STACK:{res.get('STACK')} "
              f"LOCAL:{res.get('LOCAL')} {kernel}")
        allowed = any(re.search(pattern, kernel) for pattern in ALLOWED_LOCAL_MEMORY)
        if (res.get("STACK", 0) or res.get("LOCAL", 0)) and not allowed:
            offenders.append(f"{arch} {kernel}: STACK {res.get('STACK')} LOCAL {res.get('LOCAL')}")
    assert not offenders, "kernels spilling or using local memory:\n" + "\n".join(offenders)
