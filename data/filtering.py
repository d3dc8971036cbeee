"""Metadata filter (docs/METHOD.md §1): keep a triplet iff both videos share a
non-null author, or their category lists intersect."""

from __future__ import annotations

from dataclasses import dataclass

from data.captions import VideoMeta
from data.webvid_covr import Triplet


@dataclass
class FilterReport:
    total: int = 0
    kept: int = 0
    same_author: int = 0  # kept rows that pass the author rule
    shared_category: int = 0  # kept rows that pass the category rule
    both: int = 0
    missing_metadata: int = 0  # rows with a video absent from the metadata (dropped)

    def lines(self) -> list[str]:
        pct = 100.0 * self.kept / self.total if self.total else 0.0
        return [
            f"kept {self.kept} / {self.total} triplets ({pct:.1f}%)",
            f"  same author:     {self.same_author}",
            f"  shared category: {self.shared_category}",
            f"  both rules:      {self.both}",
            f"  missing metadata (dropped): {self.missing_metadata}",
        ]


def _videoid(pth: str) -> str:
    return pth.rsplit("/", 1)[-1]


def filter_triplets(
    triplets: list[Triplet],
    metadata: dict[str, VideoMeta],
    by_author: bool = True,
    by_category: bool = True,
) -> tuple[list[Triplet], FilterReport]:
    report = FilterReport(total=len(triplets))
    kept = []
    for t in triplets:
        m1, m2 = metadata.get(_videoid(t.pth1)), metadata.get(_videoid(t.pth2))
        if m1 is None or m2 is None:
            report.missing_metadata += 1
            continue
        author = by_author and m1.author is not None and m1.author == m2.author
        category = by_category and bool(set(m1.categories) & set(m2.categories))
        if author or category:
            kept.append(t)
            report.same_author += author
            report.shared_category += category
            report.both += author and category
    report.kept = len(kept)
    return kept, report
