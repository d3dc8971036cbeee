"""WebVid-style caption tables and per-video metadata.

Caption table: the WebVid results CSV (`videoid, contentUrl, duration, page_dir, name`), where
`name` is the caption and the video file is `<video_root>/<page_dir>/<videoid>.mp4`.
Metadata: JSON lines, one object per video with `videoid`, `author` (`{"accountsId": ...}` or
null) and `categories` (list of strings), as in WebVid's CleanVid map.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from data.webvid_covr import AnnotationError, csv_table

CAPTION_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")


@dataclass
class CaptionedVideo:
    videoid: str
    page_dir: str
    caption: str

    @property
    def pth(self) -> str:
        return f"{self.page_dir}/{self.videoid}"


@dataclass
class VideoMeta:
    author: str | None = None
    categories: list[str] = field(default_factory=list)


def read_caption_table(path: str | Path) -> list[CaptionedVideo]:
    """Rows of a caption table; a malformed file or row is an `AnnotationError` naming
    file:line (a UTF-8 byte order mark is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption table not found: {path}")
    out = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        header, table = csv_table(path, f)
        absent = [c for c in ("videoid", "page_dir", "name") if c not in header]
        if absent:
            raise AnnotationError(f"{path}:1: caption table lacks column(s) {absent}")
        for line, row in table:
            if not row.get("videoid") or row.get("name") is None:
                raise AnnotationError(f"{path}:{line}: row without videoid or name")
            out.append(CaptionedVideo(row["videoid"], row["page_dir"] or "", row["name"]))
    return out


def write_caption_table(
    path: str | Path, videos: list[CaptionedVideo], duration: str = "PT00H00M02S"
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CAPTION_COLUMNS)
        for v in videos:
            w.writerow([v.videoid, f"{v.pth}.mp4", duration, v.page_dir, v.caption])


def _author(record: dict) -> str | None:
    author = record.get("author")
    if isinstance(author, dict):
        author = author.get("accountsId")
    if author is None:
        author = record.get("author.accountsId")
    return None if author in (None, "") else str(author)


def read_metadata(path: str | Path) -> dict[str, VideoMeta]:
    """videoid -> VideoMeta from JSON lines (nested `author.accountsId` or the flat key)."""
    path = Path(path)
    meta: dict[str, VideoMeta] = {}
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                vid = str(record["videoid"])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{path}:{line_no}: bad metadata record ({err})") from None
            cats = record.get("categories") or []
            meta[vid] = VideoMeta(_author(record), [str(c) for c in cats])
    return meta
