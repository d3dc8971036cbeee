"""WebVid-CoVR annotations in their published CSV format.

Columns: pth1, pth2, txt1, txt2, edit, scores, sim_txt. `pth*` are "<page_dir>/<videoid>"
without extension; `scores` is a Python list literal of per-target-frame floats. Only pth1,
pth2 and edit are required (all that Dense-WebVid-CoVR's public test-split code reads, and
CC-CoIR's); a file without txt1, txt2 or scores is read with one warning saying what follows.
An optional `description` (or ECDE's `caption`) column describes the query video.
"""

from __future__ import annotations

import ast
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data.paths import UnsafePathError, inside

log = logging.getLogger(__name__)

COLUMNS = ("pth1", "pth2", "txt1", "txt2", "edit", "scores", "sim_txt")
REQUIRED = ("pth1", "pth2", "edit")
WITHOUT = {  # an optional column's absence, and what follows from it
    "txt1": "no query captions",
    "txt2": "no target captions (no caption term, no masked-caption groups)",
    "scores": "uniform pooling of the target frames",
}


class AnnotationError(ValueError):
    """A malformed annotation file or row; the message names the file and line."""


def csv_table(path: Path, f) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Header and (line, row) pairs of an open CSV file, `line` where the row starts. A
    structural CSV error (an oversized field, typically a quote left open that swallows the lines
    after it) is an `AnnotationError` naming file:line of the row where it starts. The field
    limit stays csv's 128 KiB: no caption comes near it, a larger limit would only let a quote
    left open merge more rows."""
    reader = csv.DictReader(f)

    def unreadable(line: int, err: csv.Error) -> AnnotationError:
        return AnnotationError(
            f"{path}:{line}: unreadable CSV from this line ({err}; a quote left open?)"
        )

    try:
        header = list(reader.fieldnames or [])
    except csv.Error as err:
        raise unreadable(1, err) from None

    def rows():
        last = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise unreadable(last + 1, err) from None
            yield last + 1, row
            last = reader.line_num

    return header, rows()


class MissingVideosError(FileNotFoundError):
    """Videos a split cannot do without (the test split) are absent, refused or unreadable."""

    def __init__(self, split: str, missing: list[str]):
        self.missing = missing
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        super().__init__(
            f"{split}: {len(missing)} video(s) missing, unreadable or outside the video root "
            f"(this split keeps every query; `launch/shard.py pack --subset` packs the ones "
            f"that exist, evaluated and reported as a subset): {shown}"
        )


@dataclass
class Triplet:
    pth1: str
    pth2: str
    txt1: str
    txt2: str
    edit: str
    scores: list[float] = field(default_factory=list)
    sim_txt: float | None = None
    # optional `description` (or ECDE's `caption`) column: a description of the query video,
    # reaching the query as `model.description` says
    description: str = ""


@dataclass
class ReadReport:
    rows: int = 0
    malformed: list[str] = field(default_factory=list)  # "file:line: reason"


def _parse_scores(text: str) -> list[float]:
    text = text.strip()
    if not text:
        return []
    value = ast.literal_eval(text)
    if isinstance(value, int | float):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"scores is not a list: {text[:40]!r}")
    return [float(v) for v in value]


def _parse_row(row: dict[str, str | None]) -> Triplet:
    if None in row.values():
        raise ValueError("too few fields")
    for col in ("pth1", "pth2", "edit"):
        if not row[col].strip():
            raise ValueError(f"empty column {col!r}")
    sim = (row.get("sim_txt") or "").strip()
    return Triplet(
        pth1=row["pth1"].strip(),
        pth2=row["pth2"].strip(),
        txt1=row.get("txt1") or "",
        txt2=row.get("txt2") or "",
        edit=row["edit"],
        scores=_parse_scores(row.get("scores") or ""),
        sim_txt=float(sim) if sim else None,
        # ECDE's CSVs (whose code Dense-WebVid-CoVR's builds on) name it `caption`
        description=(row.get("description") or row.get("caption") or "").strip(),
    )


def read_annotations(
    csv_path: str | Path,
    lenient: bool = False,
    report: ReadReport | None = None,
) -> list[Triplet]:
    """Rows of a WebVid-CoVR CSV (or of its layout with only the required columns: CC-CoIR,
    Dense-WebVid-CoVR). A malformed row raises `AnnotationError` naming file and line; with
    `lenient=True` it is skipped and listed in `report.malformed` (and logged)."""
    csv_path = Path(csv_path)
    report = report if report is not None else ReadReport()
    if not csv_path.is_file():
        raise AnnotationError(f"annotation file not found: {csv_path}")
    rows: list[Triplet] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is accepted
        header, table = csv_table(csv_path, f)
        absent = [c for c in REQUIRED if c not in header]
        if absent:
            raise AnnotationError(f"{csv_path}:1: missing column(s) {absent}; header is {header}")
        if without := [f"{c}: {why}" for c, why in WITHOUT.items() if c not in header]:
            log.warning("%s has no column %s", csv_path, "; ".join(without))
        for line, row in table:
            try:
                if None in row:  # more fields than the header
                    raise ValueError("too many fields")
                rows.append(_parse_row(row))
            except (ValueError, SyntaxError) as err:
                where = f"{csv_path}:{line}: {err}"
                if not lenient:
                    raise AnnotationError(f"malformed row at {where}") from None
                report.malformed.append(where)
    report.rows = len(rows)
    if report.malformed:
        log.warning("%s: skipped %d malformed row(s)", csv_path, len(report.malformed))
    return rows


def write_annotations(csv_path: str | Path, triplets: list[Triplet]) -> None:
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for t in triplets:
            sim = "" if t.sim_txt is None else repr(float(t.sim_txt))
            scores = "[" + ", ".join(repr(float(s)) for s in t.scores) + "]"
            writer.writerow([t.pth1, t.pth2, t.txt1, t.txt2, t.edit, scores, sim])


def split_of(csv_path: str | Path) -> str:
    """train / val / test as an annotation file's name says (`test.csv`,
    `webvid8m-covr_test.csv`), else ""."""
    stem = Path(csv_path).stem.lower()
    for split in ("train", "val", "test"):
        if stem == split or stem.endswith((f"_{split}", f"-{split}", f".{split}")):
            return split
    return ""


def video_path(video_root: str | Path, pth: str) -> Path:
    """`<video_root>/<pth>.mp4`; `UnsafePathError` when `pth` is absolute or leaves the root."""
    return inside(video_root, f"{pth}.mp4")


def drop_missing_videos(
    triplets: list[Triplet], video_root: str | Path, split: str
) -> tuple[list[Triplet], int]:
    """Keep rows whose two videos exist inside the root. For `split == "test"` a missing (or
    refused: outside the root) video is an error listing every path; otherwise rows are dropped
    and the count returned (and logged)."""
    exists: dict[str, bool] = {}

    def present(pth: str) -> bool:
        if pth not in exists:
            try:
                exists[pth] = video_path(video_root, pth).is_file()
            except UnsafePathError:
                exists[pth] = False
        return exists[pth]

    def shown(pth: str) -> str:
        try:
            return str(video_path(video_root, pth))
        except UnsafePathError as err:
            return str(err)

    kept = [t for t in triplets if present(t.pth1) and present(t.pth2)]
    dropped = len(triplets) - len(kept)
    if dropped and split == "test":
        missing = sorted(shown(p) for p, ok in exists.items() if not ok)
        raise MissingVideosError(split, missing)
    if dropped:
        log.warning(
            "%s: dropped %d of %d triplet(s) with a missing video", split, dropped, len(triplets)
        )
    return kept, dropped
