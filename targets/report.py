"""The run report: ``report.json`` (the summary as given) and ``report.md``.

Summary schema (build it with :func:`summary_skeleton`, then fill it in;
unknown keys are kept in ``report.json`` and ignored by the markdown)::

    {
      "run": str,                      # run name (runs/<run>/)
      "dataset": str,                  # e.g. "synthetic", "nyud"
      "tasks": [                       # in model output order
        {"name": str, "channels": int, "metric": str, "higher_is_better": bool}
      ],                               # plain task names are accepted too
      "created": str,                  # ISO 8601 UTC
      "stages": [                      # one per model stage, in pipeline order
        {"stage": str,                 # "teacher" | "student" | "pruned" | "qat" ...
         "model": str,                 # registry name
         "params": int | None,
         "macs": int | None,           # per image at the validation size
         "train_time_s": float | None,
         "metrics": {task: {metric: float}},   # optional, PyTorch on val
         "delta_m_%": float | None,            # optional, vs the first stage
         "artifact_hash": str | None}          # optional
      ],
      "targets": [                     # one per target, any order
        # a validate_runtime() result, or export_failed_entry(), or any dict
        # with at least "target" and "status"; status is one of
        #   "passed" | "failed_validation" | "export_failed" | "not_run"
        {"target": str, "precision": str, "status": str, "reasons": [str],
         "metrics": {task: {metric: float}}, "metrics_pytorch": {...},
         "delta": {...}, "parity": {task: {figure: float}},
         "latency": {"median_ms", "p90_ms", "mean_ms", "min_ms", "runs",
                     "warmup", "threads", "batch", "input_size"},
         "threads": int, "size_mb": float, "peak_rss_mb": float,
         "macs": int | None, "n_images": int}
      ],
      "versions": {package: version},  # edgemt.io.tool_versions()
      "not_executed": [str],           # what this host could not run, and why
      "notes": [str]                   # free text, rendered as a list
    }

Values may be ``None`` (rendered as ``-``). Both files are written atomically.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgemt.io import atomic_path, tool_versions, write_json
from edgemt.tasks import TASKS, Task

__all__ = [
    "STATUSES",
    "summary_skeleton",
    "export_failed_entry",
    "render_markdown",
    "write_report",
    "benchmark_table",
]

STATUSES = ("passed", "failed_validation", "export_failed", "not_run")
_STATUS_TEXT = {
    "passed": "passed",
    "failed_validation": "exported, failed validation",
    "export_failed": "export failed",
    "not_run": "exported, not run here",
}
# The parity figure shown per task in the target table.
_PARITY_FIG = {
    "semseg": "agreement",
    "human_parts": "agreement",
    "saliency": "agreement",
    "depth": "rel_err",
    "normals": "mean_deg",
    "edge": "boundary_f",
}


def summary_skeleton(run: str, dataset: str, tasks: Sequence[Task | str]) -> dict[str, Any]:
    """An empty summary with every key of the schema (see the module docstring)."""
    entries = []
    for t in tasks:
        task = TASKS[t] if isinstance(t, str) else t
        entries.append(
            {
                "name": task.name,
                "channels": task.channels,
                "metric": task.metric,
                "higher_is_better": task.higher_is_better,
            }
        )
    return {
        "run": run,
        "dataset": dataset,
        "tasks": entries,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stages": [],
        "targets": [],
        "versions": tool_versions(),
        "not_executed": [],
        "notes": [],
    }


def export_failed_entry(target: str, precision: str, reason: str) -> dict[str, Any]:
    """A target row for an artifact that could not be exported."""
    return {"target": target, "precision": precision, "status": "export_failed", "reasons": [reason]}


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _fmt_count(v: Any) -> str:
    """Params/MACs with an SI suffix (1.2M, 3.4G)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return _fmt(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _task_entries(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in summary.get("tasks", []):
        if isinstance(t, str):
            task = TASKS.get(t)
            out.append(
                {
                    "name": t,
                    "metric": task.metric if task else "",
                    "higher_is_better": task.higher_is_better if task else True,
                }
            )
        else:
            out.append(dict(t))
    return out


def _metric(metrics: Any, task: str, key: str) -> Any:
    if not isinstance(metrics, Mapping):
        return None
    return (metrics.get(task) or {}).get(key)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The human-readable report of a summary."""
    tasks = _task_entries(summary)
    names = [t["name"] for t in tasks]
    lines = [f"# EdgeMT report: {_fmt(summary.get('run', ''))}", ""]
    lines += [f"- Dataset: {_fmt(summary.get('dataset'))}"]
    lines += [f"- Tasks: {', '.join(names) if names else '-'}"]
    if summary.get("created"):
        lines += [f"- Created: {summary['created']}"]
    lines.append("")

    lines += ["## Stages", ""]
    stages = summary.get("stages") or []
    if stages:
        rows = []
        for s in stages:
            rows.append(
                [
                    _fmt(s.get("stage")),
                    _fmt(s.get("model")),
                    _fmt_count(s.get("params")),
                    _fmt_count(s.get("macs")),
                    _fmt(s.get("train_time_s"), 4),
                ]
                + [_fmt(_metric(s.get("metrics"), t["name"], t["metric"])) for t in tasks]
                + [_fmt(s.get("delta_m_%"), 3)]
            )
        header = ["stage", "model", "params", "MACs", "train time (s)"] + [f"{t['name']} {t['metric']}" for t in tasks]
        header.append(f"Δm % vs {_fmt(stages[0].get('stage'))}")
        lines += _table(header, rows)
    else:
        lines.append("No model stages recorded.")
    lines.append("")

    lines += ["## Targets", ""]
    targets = summary.get("targets") or []
    if targets:
        header = ["target", "status", "deploy form", "size MB", "peak mem MB"]
        for t in tasks:
            arrow = "↑" if t.get("higher_is_better", True) else "↓"
            header.append(f"{t['name']} {t['metric']}{arrow} (PyTorch / runtime)")
        header += [f"{n} parity {_PARITY_FIG[n]}" for n in names if n in _PARITY_FIG]
        header += ["latency median / p90 ms", "threads"]
        rows = []
        for r in targets:
            row = [
                _fmt(r.get("target")),
                _STATUS_TEXT.get(r.get("status", ""), _fmt(r.get("status"))),
                _fmt(r.get("deploy_form")),
                _fmt(r.get("size_mb")),
                _fmt(r.get("peak_rss_mb")),
            ]
            for t in tasks:
                pt = _metric(r.get("metrics_pytorch"), t["name"], t["metric"])
                rt = _metric(r.get("metrics"), t["name"], t["metric"])
                row.append("-" if pt is None and rt is None else f"{_fmt(pt)} / {_fmt(rt)}")
            for n in names:
                if n in _PARITY_FIG:
                    row.append(_fmt(_metric(r.get("parity"), n, _PARITY_FIG[n]), 5))
            lat = r.get("latency") or {}
            row.append("-" if not lat else f"{_fmt(lat.get('median_ms'))} / {_fmt(lat.get('p90_ms'))}")
            row.append(_fmt(r.get("threads", lat.get("threads"))))
            rows.append(row)
        lines += _table(header, rows)
        lines.append("")
        lines.append(
            "Parity compares each artifact with the PyTorch model it came from: argmax agreement (fraction of pixels), "
            "depth mean relative error, normals mean angle (degrees), edge boundary F of one thresholded map against the other. "
            "Peak memory is the runtime's own peak RSS measured in a fresh process where the target offers it, "
            "else the whole validation process's peak."
        )
        noted = [r for r in targets if r.get("notes") or r.get("deploy_form_note") or r.get("quantization_source")]
        if noted:
            lines += ["", "### Target notes", ""]
            for r in noted:
                notes = [r["deploy_form_note"]] if r.get("deploy_form_note") else []
                notes += [f"quantization: {r['quantization_source']}"] if r.get("quantization_source") else []
                if r.get("parity_reference", "").startswith("the fake-quantized"):
                    notes.append(f"parity and metric deltas against {r['parity_reference']}")
                for note in notes + list(r.get("notes") or []):
                    lines.append(f"- **{_fmt(r.get('target'))}**: {_fmt(note)}")
        failed = [r for r in targets if r.get("status") != "passed" and r.get("reasons")]
        if failed:
            lines += ["", "### Reasons", ""]
            for r in failed:
                for reason in r["reasons"]:
                    lines.append(
                        f"- **{_fmt(r.get('target'))}** ({_STATUS_TEXT.get(r.get('status', ''), r.get('status'))}): {_fmt(reason)}"
                    )
    else:
        lines.append("No targets were exported.")
    lines.append("")

    notes = summary.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {_fmt(n)}" for n in notes] + [""]

    lines += ["## What was not executed here", ""]
    not_exec = summary.get("not_executed") or []
    lines += [f"- {_fmt(n)}" for n in not_exec] if not_exec else ["Everything listed above was executed on this host."]
    lines.append("")

    lines += ["## Versions", ""]
    versions = summary.get("versions") or {}
    lines += (
        _table(["package", "version"], [[_fmt(k), _fmt(v)] for k, v in sorted(versions.items())]) if versions else ["-"]
    )
    lines.append("")
    return "\n".join(lines)


def write_report(
    report_dir: str | Path, summary: Mapping[str, Any], figures: Sequence[tuple[str, bytes]] | None = None
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and, given figures (caption, PNG bytes), the
    self-contained ``report.html`` into ``report_dir``; returns their paths."""
    report_dir = Path(report_dir)
    paths = {"json": report_dir / "report.json", "md": report_dir / "report.md"}
    # Render first so that a rendering error leaves no file half-updated.
    md = render_markdown(summary)
    page = None
    if figures is not None:
        from edgemt.targets.report_html import render_html

        page = render_html(md, figures)
        paths["html"] = report_dir / "report.html"
    write_json(paths["json"], summary)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(md)
    if page is not None:
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(page)
    return paths


def benchmark_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task | str]) -> str:
    """One plain-text line per target: status, size, each task's metric, parity and latency."""
    entries = (
        _task_entries({"tasks": list(tasks)})
        if tasks and isinstance(tasks[0], str)
        else [{"name": t.name, "metric": t.metric, "higher_is_better": t.higher_is_better} for t in tasks]
    )
    header = ["target", "status", "form", "size MB"]
    header += [f"{t['name']} {t['metric']}" for t in entries]
    header += [f"{t['name']} parity" for t in entries if t["name"] in _PARITY_FIG]
    header += ["median ms", "p90 ms", "threads"]
    body = []
    for r in rows:
        lat = r.get("latency") or {}
        line = [
            _fmt(r.get("target")),
            _STATUS_TEXT.get(r.get("status", ""), _fmt(r.get("status"))),
            _fmt(r.get("deploy_form")),
            _fmt(r.get("size_mb")),
        ]
        line += [_fmt(_metric(r.get("metrics"), t["name"], t["metric"])) for t in entries]
        line += [
            _fmt(_metric(r.get("parity"), t["name"], _PARITY_FIG[t["name"]]), 4)
            for t in entries
            if t["name"] in _PARITY_FIG
        ]
        line += [_fmt(lat.get("median_ms")), _fmt(lat.get("p90_ms")), _fmt(r.get("threads", lat.get("threads")))]
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    for r in rows:
        for reason in r.get("reasons") or []:
            out.append(f"{r.get('target')}: {reason}")
    return "\n".join(out)
