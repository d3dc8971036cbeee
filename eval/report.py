"""Qualitative reports of an `Evaluation`: what the model retrieves, as a PNG grid and a small
static HTML page, plus a recall@K bar plot, the `mlp` combiner's weight histogram and, for a
few queries, attention explanations. Everything is written under one directory, which the
caller logs to MLflow as artifacts."""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from eval.protocols import Evaluation  # noqa: E402


def pick_queries(
    evaluation: Evaluation, n: int, seed: int = 0, chosen: list[str] | None = None
) -> list[int]:
    """Positions of the `chosen` query ids, else `n` random queries (seeded)."""
    if chosen:
        where = {q: i for i, q in enumerate(evaluation.query_ids)}
        unknown = [q for q in chosen if q not in where]
        if unknown:
            raise KeyError(f"query id(s) not in the {evaluation.protocol} split: {unknown}")
        return [where[q] for q in chosen]
    n = min(n, len(evaluation.query_ids))
    return sorted(random.Random(seed).sample(range(len(evaluation.query_ids)), n))


def retrieval_grid(evaluation: Evaluation, queries: list[int], k: int, path: Path) -> Path:
    """Rows: query frame + edit, the top-k (ground truth framed green), the ground truth."""
    cols = k + 2
    fig, axes = plt.subplots(
        len(queries), cols, figsize=(1.9 * cols, 2.2 * len(queries)), squeeze=False
    )
    for row, i in zip(axes, queries):
        gt = set(evaluation.positives[i])
        row[0].imshow(evaluation.images.query(i))
        row[0].set_title("\n".join(_wrap(evaluation.edits[i], 28)), fontsize=7)
        for j, g in enumerate(evaluation.ranking_of(i, k)):
            ax = row[j + 1]
            ax.imshow(evaluation.images.gallery(g))
            ax.set_title(f"{j + 1}. {evaluation.top_scores[i][j]:.3f}", fontsize=7)
            if g in gt:
                for side in ax.spines.values():
                    side.set_edgecolor("limegreen")
                    side.set_linewidth(4)
        target = evaluation.shown_target(i)
        if target is not None:
            row[-1].imshow(evaluation.images.gallery(target))
            row[-1].set_title("ground truth", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def retrieval_html(evaluation: Evaluation, queries: list[int], k: int, out_dir: Path) -> Path:
    """index.html with thumbnails under images/: one table row per query (query, top-k, ground
    truth)."""
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)

    def thumb(name: str, pixels: np.ndarray) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        Image.fromarray(pixels).save(images / f"{safe}.png")
        return f"images/{safe}.png"

    rows = []
    for i in queries:
        gt = set(evaluation.positives[i])
        cells = [
            f'<td><img src="{thumb(f"query{i}", evaluation.images.query(i))}"><br>'
            f"<b>{html.escape(evaluation.edits[i])}</b><br><small>{html.escape(evaluation.query_ids[i])}</small></td>"
        ]
        for j, g in enumerate(evaluation.ranking_of(i, k)):
            style = ' class="gt"' if g in gt else ""
            cells.append(
                f'<td{style}><img src="{thumb(f"g_{g}", evaluation.images.gallery(g))}"><br>'
                f"{j + 1}. {html.escape(g)}<br>{evaluation.top_scores[i][j]:.3f}</td>"
            )
        target = evaluation.shown_target(i)
        if target is not None:
            cells.append(
                f'<td class="gt"><img src="{thumb(f"g_{target}", evaluation.images.gallery(target))}">'
                f"<br>ground truth<br>{html.escape(target)}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = (
        "<!doctype html><meta charset='utf-8'><title>CoVR retrievals</title>"
        "<style>img{width:112px}td{font:11px sans-serif;vertical-align:top;padding:3px}"
        ".gt{outline:4px solid limegreen}</style>"
        f"<h2>{html.escape(evaluation.protocol)}: top-{k} retrievals</h2>"
        f"<p>{html.escape(json.dumps({m: round(v, 2) for m, v in evaluation.metrics.items()}))}</p>"
        "<table>" + "".join(rows) + "</table>"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def recall_plot(metrics: dict, path: Path) -> Path:
    names = [m for m in metrics if "R@" in m or "mAP@" in m or "Rsubset@" in m]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names)), 3))
    bars = ax.bar(names, [metrics[m] for m in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)  # the numbers, not only the bars
    ax.set_ylabel("percent")
    ax.set_ylim(0, 110)  # room for the label of a bar at 100
    ax.set_yticks(range(0, 101, 20))
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def combiner_histogram(weights: np.ndarray, path: Path) -> Path:
    """Distribution of the `mlp` combiner's (fusion, image, text) weights over queries."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for col, name in enumerate(("fusion", "image", "text")):
        ax.hist(weights[:, col], bins=30, range=(0, 1), alpha=0.6, label=name)
    ax.set_xlabel("combiner weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(
    evaluation: Evaluation,
    out_dir,
    n: int = 8,
    k: int = 5,
    chosen=None,
    seed: int = 0,
    combiner_weights: np.ndarray | None = None,
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = pick_queries(evaluation, n, seed, chosen)
    files = [
        retrieval_grid(evaluation, queries, k, out_dir / "retrievals.png"),
        retrieval_html(evaluation, queries, k, out_dir),
        out_dir / "images",  # the page's thumbnails
    ]
    if evaluation.metrics:
        files.append(recall_plot(evaluation.metrics, out_dir / "recall.png"))
    if combiner_weights is not None:
        files.append(combiner_histogram(combiner_weights, out_dir / "combiner_weights.png"))
    return files
