"""Calls every CUDA kernel of ganops once for compute-sanitizer:
``compute-sanitizer --tool memcheck --kernel-name kns=ganops python tools/sanitize_ops.py``.

The calls are tools/gpu_workloads.py's, derived from the op registry: every registered op
on each of its examples in float32 and on its first one in every other dtype, forward and
backward (backward and double backward ops are registered ops of their own).

The compiled (cpp) backend only: the sanitizer is for the CUDA kernels; the Triton ones are
checked by the test suite and tools/graph_check.py. Without a GPU, or without ganops' CUDA
kernels, it says so and exits 0: tools/gpu_check.py reports that as a skip.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ganops  # noqa: E402
from gpu_workloads import ALL_DTYPES, no_gpu_reason, workloads  # noqa: E402


def main() -> int:
    reason = no_gpu_reason() or ganops._backend.unavailable_reason("cpp", "cuda")
    if reason:
        print(f"skipped: {reason}")
        return 0
    calls = workloads("cuda", "cpp", ALL_DTYPES)
    for w in calls:
        w.reset()
        out = w.run()
        # Synchronise per call, so an asynchronous error names the call that caused it.
        torch.cuda.synchronize()
        print(f"ok  {w.name}: {len(out)} outputs", flush=True)
    print(f"{len(calls)} workloads ran on {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
