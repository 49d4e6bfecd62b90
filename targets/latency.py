"""Latency and memory measurement shared by every target.

Latency: :func:`measure_latency` calls a zero-argument function ``warmup``
times untimed (first runs pay for allocation, kernel selection and caches),
then ``runs`` times, each timed with :func:`time.perf_counter`, and reports
median, p90, mean and min in milliseconds. Median and p90 rather than the mean
because a single scheduler hiccup on a shared CPU skews the mean.

Memory, two figures with different meanings:

* :func:`peak_rss_mb` is the *whole process's* lifetime peak resident set
  (``getrusage(RUSAGE_SELF).ru_maxrss``). In a pipeline process that also
  holds torch, the dataset and other targets, it says little about one
  target; it is cheap and always available.
* :func:`runtime_peak_memory` measures one ONNX or TFLite model in a fresh
  child process that imports only numpy and its runtime (onnxruntime or
  ai_edge_litert): ``VmHWM`` (peak RSS) after the
  imports is the baseline, and the peak after creating the session and
  running it is the total; the difference is what loading and running that
  model costs (weights, arena, intermediate tensors). This is the figure to
  compare between targets. It costs one interpreter start (~1 s).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_latency", "peak_rss_mb", "runtime_peak_memory", "onnx_peak_memory"]


def measure_latency(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 30) -> dict[str, float | int]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed calls.

    Returns:
        ``{"median_ms", "p90_ms", "mean_ms", "min_ms", "runs", "warmup"}``.
        p90 uses linear interpolation between order statistics, so it is
        never below the median.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "runs": int(runs),
        "warmup": int(max(0, warmup)),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (lifetime peak, all of it)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return float(rss) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


# The child reads VmHWM (peak RSS) from /proc where it exists; elsewhere it
# falls back to ru_maxrss, which is the same figure. It imports only numpy and
# the runtime under test, so the baseline is that runtime's import cost.
_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np

    def hwm_mb():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)

    args = json.loads(sys.argv[1])
    if args["kind"] == "onnx":
        import onnxruntime as ort
        base = hwm_mb()
        so = ort.SessionOptions()
        so.intra_op_num_threads = args["threads"]
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(args["path"], so, providers=["CPUExecutionProvider"])
        x = np.zeros(args["shape"], dtype=np.float32)
        name = sess.get_inputs()[0].name
        run = lambda: sess.run(None, {name: x})
    else:
        from ai_edge_litert.interpreter import Interpreter
        base = hwm_mb()
        it = Interpreter(model_path=args["path"], num_threads=args["threads"])
        runner = it.get_signature_runner()
        (name, detail), = runner.get_input_details().items()
        x = np.zeros(args["shape"], dtype=detail["dtype"])
        run = lambda: runner(**{name: x})
    for _ in range(args["runs"]):
        run()
    peak = hwm_mb()
    print(json.dumps({"baseline_mb": base, "peak_rss_mb": peak}))
    """
)

_RUNTIME_IMPORT = {"onnx": "numpy+onnxruntime", "tflite": "numpy+ai_edge_litert"}


def runtime_peak_memory(
    kind: str,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    threads: int = 1,
    runs: int = 3,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Peak memory of loading and running one model file, in a fresh child process.

    Args:
        kind: ``onnx`` (ONNX Runtime) or ``tflite`` (LiteRT interpreter).

    Returns:
        ``{"peak_rss_mb", "baseline_mb", "model_mb", "method"}``: the child's
        peak RSS, its peak after importing numpy and the runtime, and their
        difference (the model's own cost); or ``{"error": ...}`` if the child
        failed, so a memory probe never fails a validation.
    """
    if kind not in _RUNTIME_IMPORT:
        raise ValueError(f"kind must be one of {sorted(_RUNTIME_IMPORT)}, got {kind!r}")
    args = json.dumps(
        {
            "kind": kind,
            "path": str(path),
            "shape": [int(s) for s in input_shape],
            "threads": int(threads),
            "runs": int(runs),
        }
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"memory probe failed: {e}", "method": "subprocess"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe exited with {proc.returncode}: {tail[0]}", "method": "subprocess"}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "memory probe printed no result", "method": "subprocess"}
    return {
        "peak_rss_mb": round(float(res["peak_rss_mb"]), 2),
        "baseline_mb": round(float(res["baseline_mb"]), 2),
        "model_mb": round(float(res["peak_rss_mb"]) - float(res["baseline_mb"]), 2),
        "method": f"child process VmHWM: after {_RUNTIME_IMPORT[kind]} import vs after loading + runs",
    }


def onnx_peak_memory(
    path: str | Path, input_shape: Sequence[int], *, threads: int = 1, runs: int = 3, timeout_s: float = 120.0
) -> dict[str, Any]:
    """:func:`runtime_peak_memory` for an ONNX file (ONNX Runtime)."""
    return runtime_peak_memory("onnx", path, input_shape, threads=threads, runs=runs, timeout_s=timeout_s)
