"""Throughput of the synthetic scene generator (render + write, one worker).

Generates N scenes at a few image sizes with :func:`edgemt.data.synthetic.generate`
(``workers=1``), prints a table of scenes/s and ms/scene, and writes the
figures as JSON (default ``benchmarks/results/synth_throughput.json``).

    python benchmarks/synth_throughput.py [--out PATH] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemt.data.synthetic import generate, render_scene

# (H, W, scenes); the NYUD-v2 size gets fewer scenes.
CASES = ((96, 128, 200), (192, 256, 60), (425, 560, 12))


def bench(h: int, w: int, n: int, root: Path) -> dict[str, float]:
    """Time ``generate`` of ``n`` scenes (train n-1, val 1) at ``h x w`` after a warm-up render."""
    render_scene(np.random.default_rng(0), (h, w))  # warm-up: lazy imports, caches
    start = time.perf_counter()
    generate(root / f"{h}x{w}", max(1, n - 1), 1, size=(h, w), seed=0, progress=False, workers=1)
    dt = time.perf_counter() - start
    return {"height": h, "width": w, "scenes": n, "seconds": dt, "scenes_per_s": n / dt, "ms_per_scene": 1000 * dt / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synth_throughput.json")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the scene counts (e.g. 0.1 for a smoke run)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for h, w, n in CASES:
            rows.append(bench(h, w, max(2, round(n * args.scale)), Path(tmp)))
    print(f"{'size':>10} {'scenes':>7} {'scenes/s':>9} {'ms/scene':>9}")
    for r in rows:
        print(f"{r['height']:>4}x{r['width']:<5} {r['scenes']:>7} {r['scenes_per_s']:>9.1f} {r['ms_per_scene']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "synth_throughput",
        "workers": 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
