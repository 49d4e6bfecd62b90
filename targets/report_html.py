"""The self-contained HTML report: tables, an accuracy-versus-latency chart and
side-by-side predictions per target, drawn with matplotlib and embedded as
base64 PNGs (one file, no network, opens anywhere).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_latency_png", "predictions_png", "render_html", "colorize"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def accuracy_latency_png(points: Sequence[Mapping[str, Any]]) -> bytes:
    """Scatter of Δm (% vs the teacher) against median latency (ms); one labelled point per entry.

    Each point: ``{"label", "latency_ms", "delta_m", "kind"}`` (kind: "stage" or "target").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker, color in (("stage", "o", "#1f77b4"), ("target", "s", "#d62728")):
        pts = [p for p in points if p.get("kind") == kind and p.get("latency_ms") and p.get("delta_m") is not None]
        if pts:
            ax.scatter(
                [p["latency_ms"] for p in pts],
                [p["delta_m"] for p in pts],
                marker=marker,
                color=color,
                label="PyTorch stage" if kind == "stage" else "exported target",
            )
            for i, p in enumerate(pts):  # alternate above/below so that neighbours do not overprint
                offset = (5, 4) if i % 2 == 0 else (5, -12)
                ax.annotate(p["label"], (p["latency_ms"], p["delta_m"]), textcoords="offset points", xytext=offset)
    lat = [p["latency_ms"] for p in points if p.get("latency_ms")]
    if lat and max(lat) > 4 * min(lat):  # eager PyTorch stages and runtime files sit an order of magnitude apart
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    ax.set_xlabel("latency, median ms (batch 1, stated threads)")
    ax.set_ylabel("Δm vs teacher (%)")
    ax.set_title("Accuracy versus latency")
    ax.grid(alpha=0.3)
    if ax.collections:  # nothing measured (e.g. every target failed): no legend to draw
        ax.legend(loc="best")
    return _png(fig)


def colorize(task: str, pred: np.ndarray) -> np.ndarray:
    """A displayable (H, W[, 3]) image of one task map ``(C, H, W)`` (activated) or a label map ``(H, W)``."""
    import matplotlib

    if pred.ndim == 3 and task in ("semseg", "human_parts", "saliency"):
        pred = pred.argmax(0)
    if pred.ndim == 2 and task in ("semseg", "human_parts", "saliency"):
        cmap = matplotlib.colormaps["tab20"]
        out = cmap((pred % 20) / 19.0)[..., :3]
        out[pred == 255] = 0.0
        return out
    if task == "normals":
        n = pred if pred.shape[0] == 3 else np.zeros((3, *pred.shape[-2:]))
        return np.clip((np.moveaxis(n, 0, -1) + 1) / 2, 0, 1)
    m = pred[0] if pred.ndim == 3 else pred
    m = np.where(m == 255, 0, m).astype(np.float64)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def predictions_png(
    images: np.ndarray,
    preds: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    tasks: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    title: str,
) -> bytes:
    """Rows = scenes; columns = input, then per task its prediction and the ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.35 * n + 0.4), squeeze=False)
    rgb = np.clip(np.moveaxis(images, 1, -1) * np.asarray(std) + np.asarray(mean), 0, 1)
    for i in range(n):
        axes[i, 0].imshow(rgb[i])
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
        for j, t in enumerate(tasks):
            gray = t not in ("semseg", "human_parts", "saliency", "normals")
            for k, (src, name) in enumerate(((preds, "pred"), (labels, "GT"))):
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(colorize(t, src[t][i]), cmap="gray" if gray else None)
                if i == 0:
                    ax.set_title(f"{t} {name}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` as HTML (the report's notes use both)."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table_from_markdown(lines: Sequence[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = rows[0], [r for r in rows[2:]]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.replace(chr(92) + '|', '|'))}</td>" for c in r) + "</tr>")
    return "\n".join(out + ["</tbody></table>"])


def render_html(markdown: str, figures: Sequence[tuple[str, bytes]]) -> str:
    """The report page: the Markdown report's sections (tables as HTML tables) plus the figures."""
    body: list[str] = []
    # The figures go after the tables, before the notes (or at the end).
    figure_html = ["<h2>Figures</h2>"] if figures else []
    figure_html += [
        f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, png in figures
    ]
    placed = False
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            body.append(_table_from_markdown(block))
            continue
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            if not placed and line[3:] in ("Notes", "What was not executed here", "Versions"):
                body += figure_html
                placed = True
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    if not placed:
        body += figure_html
    css = (
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0 16px;font-size:12px}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}"
        "figure{margin:12px 0}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>EdgeMT report</title>"
        f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
