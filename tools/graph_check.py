"""CUDA graphs: every ganops op captured and replayed against eager, then one whole WGAN-GP
critic + generator step with capturable Adam. That no op reads the device on the host is
then shown, not claimed: a host sync fails the capture.

    python tools/graph_check.py [--json PATH] [--backends cpp,triton] [--steps N]

For each backend that can serve CUDA tensors: each workload of tools/gpu_workloads.py (every
registered op on each of its float32 examples, forward and backward, and the public calls
that compose them) is
warmed up on a side stream, captured, and replayed from the same reset state as an eager
call; outputs must agree (bit-identical is reported separately, it is not required: cuBLAS
and cuDNN may pick other algorithms inside a capture). The training step: two identical
trainers, one captured once and replayed N times, one stepped eagerly N times (after the
same warm-up steps); losses, parameters and the spectral-norm vectors must agree.
Without a GPU it says so and exits 0. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ganops  # noqa: E402
from gpu_workloads import WganGpTrainer, no_gpu_reason, workloads  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
# The whole step compounds rounding over several steps of Adam.
STEP_RTOL, STEP_ATOL = 1e-4, 1e-5
WARMUP = 3


def _compare(graph_out, eager_out, rtol, atol) -> dict:
    worst, identical = 0.0, True
    for a, b in zip(graph_out, eager_out, strict=True):
        a64, b64 = a.detach().double(), b.detach().double()
        identical = identical and torch.equal(a, b)
        if not torch.equal(a64.isnan(), b64.isnan()):
            return {"ok": False, "max_error": float("nan"), "bit_identical": False, "why": "NaNs differ"}
        finite = ~b64.isnan()
        if finite.any():
            diff = (a64[finite] - b64[finite]).abs()
            worst = max(worst, diff.max().item())
            if (diff > atol + rtol * b64[finite].abs()).any():
                return {"ok": False, "max_error": worst, "bit_identical": False, "why": "values differ"}
    return {"ok": True, "max_error": worst, "bit_identical": identical}


def _warm_up(fn, reset, times=WARMUP):
    """Runs on a side stream, as capture requires: lazy initialisation (cuBLAS handles,
    Triton compilation, autograd's buffers) happens here, not inside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def check_workload(w) -> dict:
    _warm_up(w.run, w.reset)
    w.reset()
    eager = [t.detach().clone() for t in w.run()]
    w.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = w.run()
    # Capture records but does not run: the replay must recompute from the reset state.
    for t in static_out:
        if t.is_floating_point():
            t.detach().zero_()
    w.reset()
    graph.replay()
    torch.cuda.synchronize()
    return _compare(static_out, eager, RTOL, ATOL)


def check_training_step(backend: str, steps: int) -> dict:
    captured, eager = WganGpTrainer("cuda", backend), WganGpTrainer("cuda", backend)
    _warm_up(captured.step, lambda: None)
    for _ in range(WARMUP):
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = captured.step()
    losses_graph, losses_eager = [], []
    for _ in range(steps):
        graph.replay()
        losses_graph.extend(t.clone() for t in static_losses)
        losses_eager.extend(eager.step())
    torch.cuda.synchronize()
    result = _compare(losses_graph + captured.state(), losses_eager + eager.state(), STEP_RTOL, STEP_ATOL)
    result["steps"] = steps
    return result


def _outcome(r: dict) -> str:
    if not r["ok"]:
        return r["why"]
    return "bit-identical" if r["bit_identical"] else f"max error {r['max_error']:.2e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--backends", default="cpp,triton")
    parser.add_argument("--steps", type=int, default=5, help="replays of the whole training step")
    args = parser.parse_args(argv)
    results = {"skipped": None, "workloads": [], "training_step": []}

    def finish(code):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return code

    reason = no_gpu_reason()
    if reason:
        results["skipped"] = reason
        print(f"skipped: {reason}")
        return finish(0)
    failures = 0
    for backend in args.backends.split(","):
        why = ganops._backend.unavailable_reason(backend, "cuda")
        if why:
            print(f"{backend}: skipped: {why}")
            results["workloads"].append({"backend": backend, "skipped": why})
            continue
        for w in workloads("cuda", backend):
            t0 = time.perf_counter()
            try:
                r = check_workload(w)
            except Exception as exc:  # a failed capture is a finding, not a crash of the check
                r = {"ok": False, "why": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
            r.update(backend=backend, name=w.name, seconds=round(time.perf_counter() - t0, 3))
            results["workloads"].append(r)
            failures += not r["ok"]
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {backend:<6} {w.name}: {_outcome(r)}", flush=True)
        try:
            r = check_training_step(backend, args.steps)
        except Exception as exc:
            r = {"ok": False, "why": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
        r["backend"] = backend
        results["training_step"].append(r)
        failures += not r["ok"]
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {backend:<6} WGAN-GP critic+generator step captured, "
              f"{args.steps} replays against eager: {_outcome(r)}", flush=True)
    results["failures"] = failures
    return finish(1 if failures else 0)


if __name__ == "__main__":
    sys.exit(main())
