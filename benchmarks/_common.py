"""Shared helpers for the benchmarks: tables, JSON output, timing-budgeted training."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def steps_for_budget(make_trainer, seconds: float, probe: int = 30, warmup: int = 10) -> int:
    """How many steps fit in ``seconds``, timed on real trainer steps (data loading included).

    Two probe runs of ``warmup`` and ``warmup + probe`` steps: their difference
    cancels start-up costs (loader workers, first-call kernel selection).
    ``make_trainer(steps, out_dir)`` builds a fresh Trainer in a scratch directory.
    """
    import tempfile

    def run(steps: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(steps, tmp)
            t0 = time.perf_counter()
            trainer.fit(resume=False)
            return time.perf_counter() - t0

    per_step = max(1e-4, (run(warmup + probe) - run(warmup)) / probe)
    return max(probe, int(seconds / per_step))
