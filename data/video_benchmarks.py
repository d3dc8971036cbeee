"""Video benchmarks with several targets per query (docs/PROTOCOLS.md): their annotation files
read into `CompositionQuery` rows (reference and targets are clip ids) and the clips' paths.

- TF-CoVR (fine-grained edits from FineGym and FineDiving): `{split}_finegd.csv` with
  query_id, query_video, target_video, modification, target_videos_ids (a Python list
  literal). The gallery is one item per row, its `target_video`, repeats kept, as the official
  test builds it.
- EgoCVR (egocentric): `egocvr_annotations_gallery.csv` (video_clip_id, target_clip_ids,
  instruction, modified_captions, ..., global_idx, local_idx: row positions in
  `egocvr_data.csv`, whose clip_name column names the clips) and `egocvr_data.csv`.
"""

from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass
from pathlib import Path

from data.benchmarks import BenchmarkFormatError, CompositionQuery
from data.text import pre_caption

TFCOVR_COLUMNS = ("query_id", "query_video", "target_video", "modification", "target_videos_ids")
TFCOVR_WORDS = 30  # the official test cleans modifications to 30 words
EGOCVR_COLUMNS = ("video_clip_id", "target_clip_ids", "instruction", "global_idx", "local_idx")
EGOCVR_TEXTS = ("instruction", "modified_captions")

# TF-CoVR writes the half-step counts of its edits ("2.5 twists") as words; other numbers stay
_WHOLE = ("one", "two", "three", "four", "five", "six", "seven")
NUMBER_WORDS = {
    0.5: "half",
    **{float(n): w for n, w in enumerate(_WHOLE, 1)},
    **{n + 0.5: f"{w} and a half" for n, w in enumerate(_WHOLE[:-1], 1)},
}
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")


def numbers_as_words(text: str) -> str:
    """0.5, 1, 1.5, ..., 7 (also written 1.0) as words, as TF-CoVR's queries are written."""
    return _NUMBER.sub(lambda m: NUMBER_WORDS.get(float(m.group(0)), m.group(0)), text)


@dataclass
class VideoBenchmark:
    """Queries, the gallery (clip ids; TF-CoVR's keeps repeats) and every clip's file."""

    queries: list[CompositionQuery]
    gallery: list[str]
    clips: dict[str, Path]


def _rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in required if c not in (reader.fieldnames or [])]
        if absent:
            raise BenchmarkFormatError(f"{path}: no column(s) {absent} (has {reader.fieldnames})")
        return [(line, row) for line, row in enumerate(reader, 2)]


def _id_list(value: str, path: Path, line: int, column: str) -> list[str]:
    """A Python list literal of clip ids (the files' own encoding), read without `eval`."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, list | tuple):
        raise BenchmarkFormatError(f"{path}:{line}: {column} is not a list: {value[:80]!r}")
    return [str(x) for x in parsed]


def _clip_paths(ids, video_dir: Path) -> dict[str, Path]:
    clips = {c: video_dir / f"{c}.mp4" for c in ids}
    missing = sorted(c for c, p in clips.items() if not p.is_file())
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(clips)} clips missing under {video_dir}: "
            + ", ".join(f"{c}.mp4" for c in missing[:5])
        )
    return clips


def read_tfcovr(root: str | Path, split: str = "test", video_dir=None) -> VideoBenchmark:
    """`<root>/annotations/{split}_finegd.csv` (or `<root>/{split}_finegd.csv`); clips
    `<video_dir>/<id>.mp4` (default `<root>/FineGD_videos`)."""
    root = Path(root)
    name = f"{split}_finegd.csv"
    path = next((p for p in (root / "annotations" / name, root / name) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"TF-CoVR: no {name} in {root / 'annotations'} or {root}")
    queries, gallery = [], []
    for line, row in _rows(path, TFCOVR_COLUMNS):
        targets = _id_list(row["target_videos_ids"], path, line, "target_videos_ids")
        if not row["query_video"] or not row["target_video"]:
            raise BenchmarkFormatError(f"{path}:{line}: query_video and target_video are needed")
        gallery.append(row["target_video"])
        queries.append(
            CompositionQuery(
                query_id=row["query_id"],
                reference=row["query_video"],
                caption=pre_caption(numbers_as_words(row["modification"]), TFCOVR_WORDS),
                target=row["target_video"],
                targets=targets,
            )
        )
    if not queries:
        raise BenchmarkFormatError(f"{path}: no queries")
    video_dir = Path(video_dir) if video_dir else root / "FineGD_videos"
    used = {q.reference for q in queries} | set(gallery)
    return VideoBenchmark(queries, gallery, _clip_paths(used, video_dir))


def read_egocvr(root: str | Path, video_dir=None, text: str = "instruction") -> VideoBenchmark:
    """`<root>/egocvr_annotations_gallery.csv` and `<root>/egocvr_data.csv` (also under
    `<root>/annotation/egocvr/`); clips `<video_dir>/<clip>.mp4` (default `<root>/clips`).
    `text`: the query text column, `instruction` (the edit) or `modified_captions` (the query
    clip's caption edited by an LLM: the official script's default). Each query's `subset` is
    its local gallery and `extra["global"]` its global one (clip ids, each once);
    `extra["global_rows"]`, `["local_rows"]`: the same as positions in `gallery` (one item per
    egocvr_data.csv row, as the official script ranks them), `["target_rows"]`: the position
    of each target clip's last row (the one it credits)."""
    if text not in EGOCVR_TEXTS:
        raise ValueError(f"EgoCVR query text must be one of {EGOCVR_TEXTS}, got {text!r}")
    root = Path(root)
    base = next(
        (d for d in (root, root / "annotation" / "egocvr") if (d / "egocvr_data.csv").is_file()),
        None,
    )
    if base is None:
        raise FileNotFoundError(
            f"EgoCVR: no egocvr_data.csv in {root} or {root / 'annotation' / 'egocvr'}"
        )
    names = [r["clip_name"] for _, r in _rows(base / "egocvr_data.csv", ("clip_name",))]
    path = base / "egocvr_annotations_gallery.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: EgoCVR's gallery file (global_idx, local_idx) is downloaded "
            "apart from the repository's annotations (its README)"
        )
    queries, listed = [], []  # listed: each query's (global, local) rows of egocvr_data.csv
    for line, row in _rows(path, (*EGOCVR_COLUMNS, text)):
        galleries, rows = {}, {}
        for column in ("global_idx", "local_idx"):
            try:
                rows[column] = sorted({int(i) for i in _id_list(row[column], path, line, column)})
                if rows[column] and not 0 <= rows[column][0] <= rows[column][-1] < len(names):
                    raise IndexError
            except (ValueError, IndexError):
                raise BenchmarkFormatError(
                    f"{path}:{line}: {column} holds a row that egocvr_data.csv "
                    f"({len(names)} rows) does not have"
                ) from None
            galleries[column] = list(dict.fromkeys(names[i] for i in rows[column]))
        listed.append((rows["global_idx"], rows["local_idx"]))
        targets = _id_list(row["target_clip_ids"], path, line, "target_clip_ids")
        queries.append(
            CompositionQuery(
                query_id=str(line - 2),
                reference=row["video_clip_id"],
                caption=row[text],
                target=targets[0] if targets else None,
                targets=targets,
                subset=galleries["local_idx"],
                extra={"global": galleries["global_idx"]},
            )
        )
    if not queries:
        raise BenchmarkFormatError(f"{path}: no queries")
    # the gallery: every row some query ranks, in file order, a repeated clip once per row (the
    # official script ranks rows and credits a target clip's last row: its index_mapping)
    rows = sorted({r for pair in listed for part in pair for r in part})
    position = {r: p for p, r in enumerate(rows)}
    last_row = {n: r for r, n in enumerate(names)}
    for q, (global_rows, local_rows) in zip(queries, listed):
        q.extra["global_rows"] = [position[r] for r in global_rows]
        q.extra["local_rows"] = [position[r] for r in local_rows]
        q.extra["target_rows"] = [
            position[last_row[t]] for t in q.targets if last_row.get(t) in position
        ]
    used = {q.reference for q in queries} | {names[r] for r in rows}
    video_dir = Path(video_dir) if video_dir else root / "clips"
    return VideoBenchmark(queries, [names[r] for r in rows], _clip_paths(used, video_dir))
