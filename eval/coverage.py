"""How much of a split an evaluation saw. WebVid's hosting has lost many test videos and image
benchmarks arrive with holes, so a split is evaluated whole (the default: a missing file is an
error) or, when asked (`subset`), on what exists: then every result carries its coverage
(queries and gallery items kept / total) and the list of what was dropped and why, and is
tagged as a subset so it is never read as a full-split number.

- `image_subset`: image benchmarks: drops the missing gallery images and every query whose
  reference, target(s) or CIRR image-set member is among them.
- `shard_coverage`: WebVid-CoVR shards: totals from the manifest's `source_counts`, what was
  lost from its `skipped` (packing with `--subset`, or a train/val split's skips).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.benchmarks import CompositionQuery, check_images

DROPPED = "dropped.json"


@dataclass
class Coverage:
    queries_kept: int
    queries_total: int
    gallery_kept: int
    gallery_total: int
    # {"query" | "item", "reason", ...}: each query and gallery item left out
    dropped_queries: list[dict] = field(default_factory=list)
    dropped_gallery: list[dict] = field(default_factory=list)

    @property
    def subset(self) -> bool:
        return self.queries_kept < self.queries_total or self.gallery_kept < self.gallery_total

    def metrics(self) -> dict:
        """Percentages, reported beside the recalls."""
        return {
            "queries_coverage": 100.0 * self.queries_kept / max(1, self.queries_total),
            "gallery_coverage": 100.0 * self.gallery_kept / max(1, self.gallery_total),
        }

    def summary(self) -> dict:
        return {
            "subset": self.subset,
            "queries": f"{self.queries_kept}/{self.queries_total}",
            "gallery": f"{self.gallery_kept}/{self.gallery_total}",
            **self.metrics(),
        }

    def line(self) -> str:
        m = self.metrics()
        return (
            f"SUBSET: {self.queries_kept:,} of {self.queries_total:,} queries "
            f"({m['queries_coverage']:.1f}%), {self.gallery_kept:,} of {self.gallery_total:,} "
            f"gallery items ({m['gallery_coverage']:.1f}%): not comparable with full-split numbers"
        )

    def __add__(self, other: Coverage) -> Coverage:  # FashionIQ: summed over categories
        return Coverage(
            self.queries_kept + other.queries_kept,
            self.queries_total + other.queries_total,
            self.gallery_kept + other.gallery_kept,
            self.gallery_total + other.gallery_total,
            self.dropped_queries + other.dropped_queries,
            self.dropped_gallery + other.dropped_gallery,
        )


def full(queries: int, gallery: int) -> Coverage:
    return Coverage(queries, queries, gallery, gallery)


def write_dropped(coverage: Coverage, out_dir: str | Path) -> Path:
    path = Path(out_dir) / DROPPED
    body = {"queries": coverage.dropped_queries, "gallery": coverage.dropped_gallery}
    path.write_text(json.dumps(body, indent=1))
    return path


def image_subset(
    queries: list[CompositionQuery], gallery: dict[str, Path], subset: bool
) -> tuple[list[CompositionQuery], dict[str, Path], Coverage]:
    """The queries and gallery to evaluate: all of them (a missing image is an error naming
    them, unless `subset`), or those whose images exist."""
    if not subset:
        check_images(gallery, hint="--subset evaluates the images that exist, as a subset")
        return queries, gallery, full(len(queries), len(gallery))
    absent = {g for g, p in gallery.items() if not Path(p).is_file()}
    kept_gallery = {g: p for g, p in gallery.items() if g not in absent}
    kept, dropped = [], []
    for q in queries:
        needed = [q.reference, *([q.target] if q.target else []), *q.targets, *q.subset]
        lost = sorted({g for g in needed if g in absent})
        if lost:
            dropped.append({"query": q.query_id, "reason": f"image(s) missing: {', '.join(lost)}"})
        else:
            kept.append(q)
    if not kept:
        raise FileNotFoundError(f"no query left: {len(absent)} of {len(gallery)} images missing")
    coverage = Coverage(
        len(kept),
        len(queries),
        len(kept_gallery),
        len(gallery),
        dropped,
        [{"item": g, "reason": f"{gallery[g]}: file not found"} for g in sorted(absent)],
    )
    return kept, kept_gallery, coverage


def shard_coverage(manifest: dict, queries_kept: int, gallery_kept: int) -> Coverage:
    """A WebVid-CoVR split's coverage (one query per target: totals are the annotations'
    distinct targets); manifests written before `source_counts` count packed + lost records."""
    totals = manifest.get("totals", {})
    counts = manifest.get("source_counts") or {
        "targets": totals.get("samples", 0) + totals.get("skipped_records", 0)
    }
    dropped_queries, dropped_gallery = [], []
    for item in manifest.get("skipped", []):
        if "row" in item:
            dropped_queries.append(
                {"query": f"row {item['row']}", "video": item["video"], "reason": item["reason"]}
            )
            continue
        dropped_gallery.append({"item": item["video"], "reason": item["reason"]})
        for row in item.get("rows", []):
            dropped_queries.append(
                {"query": f"row {row}", "video": item["video"], "reason": item["reason"]}
            )
    total = counts["targets"]
    return Coverage(queries_kept, total, gallery_kept, total, dropped_queries, dropped_gallery)
