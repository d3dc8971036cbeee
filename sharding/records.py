"""Records to pack, from annotation sources: WebVid-CoVR triplets (one record per target video,
or per triplet) and CIRR triplets (images as single frames). A record is a plain dict:
{"key", "target", "target_id", "triplets": [{"row", "pth1", "txt1", "txt2", "edit", "scores",
"group", optional "targets": every valid target id when the query has several}, ...]}, plus "target_file" / "query_file" where a media path is not derived from a name.
In `target` epoch mode a record holds every triplet of one target video (the reader draws one
per epoch, the reference recipe); in `triplet` mode one triplet per record."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

from data.webvid_covr import Triplet

log = logging.getLogger(__name__)


def masked_caption_group(txt1: str, txt2: str) -> str:
    """The target caption with the word(s) that differ from the query caption masked: triplets
    of one-word variants of a caption share it (they are each other's hardest negatives)."""
    a, b = txt1.lower().split(), txt2.lower().split()
    if len(a) != len(b):
        return " ".join(b)
    return " ".join("_" if x != y else y for x, y in zip(a, b))


def unique_rows(rows: list[Triplet]) -> list[tuple[int, Triplet]]:
    """(row, triplet) of the first copy of each (pth1, pth2, edit); the copies after it are
    counted and named in one warning (a duplicate would be a record holding every copy, and a
    batch of positives of one target)."""
    seen, kept, copies = set(), [], []
    for row, t in enumerate(rows):
        key = (t.pth1, t.pth2, t.edit)
        if key in seen:
            copies.append(row)
            continue
        seen.add(key)
        kept.append((row, t))
    if copies:
        shown = ", ".join(map(str, copies[:10])) + (" ..." if len(copies) > 10 else "")
        log.warning(
            "%d duplicate row(s) (same pth1, pth2 and edit) packed once: rows %s (0-based, as "
            "the manifest numbers rows)",
            len(copies),
            shown,
        )
    return kept


def build_records(rows: list[Triplet], epoch: str) -> list[dict]:
    """Deterministic records (sorted by key) from annotation rows, each triplet once
    (`unique_rows`; a triplet's `row` stays its row in the file)."""
    unique = unique_rows(rows)
    target_ids = {p: i for i, p in enumerate(sorted({t.pth2 for _, t in unique}))}
    # every valid target of a query: the targets of all triplets sharing its video and edit
    valid = defaultdict(set)
    for _, t in unique:
        valid[(t.pth1, t.edit)].add(target_ids[t.pth2])

    def triplet(row: int, t: Triplet) -> dict:
        return {
            "row": row,
            "pth1": t.pth1,
            "txt1": t.txt1,
            "txt2": t.txt2,
            "edit": t.edit,
            "scores": t.scores,
            # without captions (Dense-WebVid-CoVR's test file, CC-CoIR): the target alone
            "group": masked_caption_group(t.txt1, t.txt2) if t.txt2 else t.pth2,
            **({"description": t.description} if t.description else {}),
            # only where there are several (records of single-target data stay as they were)
            **({"targets": sorted(v)} if len(v := valid[(t.pth1, t.edit)]) > 1 else {}),
        }

    if epoch == "triplet":
        return [
            {
                "key": f"r{row:09d}",
                "target": t.pth2,
                "target_id": target_ids[t.pth2],
                "triplets": [triplet(row, t)],
            }
            for row, t in unique
        ]
    if epoch != "target":
        raise ValueError(f"unknown shards.epoch {epoch!r} (target or triplet)")
    by_target: dict[str, list[dict]] = defaultdict(list)
    for row, t in unique:
        by_target[t.pth2].append(triplet(row, t))
    return [
        {"key": f"v{target_ids[p]:09d}", "target": p, "target_id": target_ids[p], "triplets": trips}
        for p, trips in sorted(by_target.items(), key=lambda kv: target_ids[kv[0]])
    ]


def image_file(root: Path, name: str, listed: dict[Path, set[str]]) -> str:
    """CC-CoIR's `pth` names a CC3M image `<root>/<pth>.jpg` (or `.png`); the `.jpg` path when
    neither exists (then skipped as missing) or when it would leave the root (then refused).
    `listed`: folder -> its file names, filled once per folder (one listing instead of a stat
    per image: 3M images on a network file system)."""
    path = root / name
    if (names := listed.get(path.parent)) is None:
        names = listed[path.parent] = (
            set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        )
    for suffix in (".jpg", ".png"):
        if f"{path.name}{suffix}" in names:
            return f"{path}{suffix}"
    return f"{path}.jpg"


def image_records(rows: list[Triplet], image_root: str | Path, epoch: str) -> list[dict]:
    """Records of image triplets (CC-CoIR): as `build_records`, each image a one-frame video."""
    root, listed = Path(image_root), {}
    records = build_records(rows, epoch)
    for record in records:
        record["target_file"] = image_file(root, record["target"], listed)
        for t in record["triplets"]:
            t["query_file"] = image_file(root, t["pth1"], listed)
    return records


def cirr_records(root: str | Path, split: str, image_root: str | Path | None = None) -> list[dict]:
    """CIRR triplets as records (one per query): the reference and target images as single
    frames, the modification text as the edit, the image set as the sampler group."""
    from data.benchmarks import read_cirr

    queries, gallery = read_cirr(root, split, image_root)
    ids = {name: i for i, name in enumerate(sorted(gallery))}
    records = []
    for q in queries:
        if q.target is None:
            raise ValueError(f"CIRR {split} has no targets: pack the train or val split")
        triplet = {
            "row": int(q.query_id),
            "pth1": q.reference,
            "txt1": "",
            "txt2": "",
            "edit": q.caption,
            "scores": [],
            "group": f"set{q.extra['set_id']}",
            "query_file": str(gallery[q.reference]),
        }
        records.append(
            {
                "key": f"c{int(q.query_id):09d}",
                "target": q.target,
                "target_id": ids[q.target],
                "target_file": str(gallery[q.target]),
                "triplets": [triplet],
            }
        )
    return records
