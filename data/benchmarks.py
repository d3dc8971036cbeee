"""Annotation readers for the image benchmarks CoVR models are evaluated on (docs/METHOD.md §5).

Each reader returns plain dataclasses plus the gallery as `{image_id: path}`. Image files are
not opened here; `check_images` turns absent files into one error listing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.paths import UnsafePathError, inside

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg")  # what the reference embeds (src/data/embs.py)


class BenchmarkFormatError(ValueError):
    """An annotation file that does not have the benchmark's published structure."""


@dataclass
class CompositionQuery:
    """One query: reference image + modification text -> target(s)."""

    query_id: str
    reference: str
    caption: str
    target: str | None = None  # None on test splits
    targets: list[str] = field(default_factory=list)  # all correct targets (CIRCO)
    subset: list[str] = field(default_factory=list)  # CIRR img_set members
    extra: dict = field(default_factory=dict)


def _load_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM is accepted
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({err})") from None


def _require(entry: dict, keys: tuple[str, ...], path: Path, index: int) -> None:
    absent = [k for k in keys if k not in entry]
    if absent:
        raise BenchmarkFormatError(f"{path}: entry {index} lacks {absent}")


def _gallery(names, path_of, root: Path, source: Path) -> dict[str, Path]:
    """{image id: file inside `root`}; every entry whose file would lie outside it (an absolute
    path, `..`) is refused, all named in one error."""
    gallery, refused = {}, []
    for name in names:
        try:
            gallery[name] = inside(root, path_of(name))
        except UnsafePathError:
            refused.append(f"{name!r} -> {path_of(name)!r}")
    if refused:
        shown = ", ".join(refused[:10]) + (" ..." if len(refused) > 10 else "")
        raise BenchmarkFormatError(
            f"{source}: {len(refused)} image path(s) outside {root}: {shown}"
        )
    return gallery


def check_images(gallery: dict[str, Path], hint: str = "") -> None:
    missing = sorted(str(p) for p in gallery.values() if not Path(p).is_file())
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(gallery)} image(s) missing: {shown}"
            + (f" ({hint})" if hint else "")
        )


def read_cirr(
    root: str | Path,
    split: str = "val",
    image_root: str | Path | None = None,
    gallery: str = "split",
) -> tuple[list[CompositionQuery], dict[str, Path]]:
    """CIRR: `captions/cap.rc2.{split}.json` and `image_splits/split.rc2.{split}.json`.
    Image paths in the split file are relative to `image_root` (default `<root>/img_raw`).
    `gallery`: "split" = the split file's images; "folder" = those plus every other image in
    the folders they lie in (`folder_gallery`)."""
    if gallery not in ("split", "folder"):
        raise ValueError(f"unknown cirr_gallery {gallery!r}; one of ('split', 'folder')")
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root / "img_raw"
    cap_path = root / "captions" / f"cap.rc2.{split}.json"
    split_path = root / "image_splits" / f"split.rc2.{split}.json"
    entries, names = _load_json(cap_path), _load_json(split_path)
    if not isinstance(entries, list) or not isinstance(names, dict):
        raise BenchmarkFormatError(f"{cap_path} must be a list and {split_path} a mapping")
    images = _gallery(names, names.get, image_root, split_path)
    if gallery == "folder":
        images = folder_gallery(images, split_path)
    queries = []
    for i, e in enumerate(entries):
        _require(e, ("pairid", "reference", "caption", "img_set"), cap_path, i)
        target = e.get("target_hard")
        queries.append(
            CompositionQuery(
                query_id=str(e["pairid"]),
                reference=e["reference"],
                caption=e["caption"],
                target=target,
                targets=[target] if target else [],
                subset=list(e["img_set"]["members"]),
                extra={"target_soft": e.get("target_soft", {}), "set_id": e["img_set"]["id"]},
            )
        )
    return queries, images


def folder_gallery(gallery: dict[str, Path], source: Path) -> dict[str, Path]:
    """`gallery` plus every other image file in the folders its files lie in, id = file stem:
    the reference ranks against the embeddings of a whole image folder (for CIRR val it asserts
    8,102 images; the split file lists 2,297)."""
    images, known = dict(gallery), set(gallery.values())
    for folder in sorted({p.parent for p in gallery.values()}):
        found = sorted(folder.iterdir()) if folder.is_dir() else []
        for path in found:
            if path.suffix not in FOLDER_IMAGE_SUFFIXES or path in known:
                continue
            if path.stem in images:  # one id, two files: which one is meant is unknown
                raise BenchmarkFormatError(
                    f"{source}: {path} and {images[path.stem]} share the id {path.stem!r}"
                )
            images[path.stem] = path
    return images


def read_fashioniq(
    root: str | Path, category: str, split: str = "val"
) -> tuple[list[CompositionQuery], dict[str, Path]]:
    """FashionIQ: `captions/cap.{cat}.{split}.json` ({candidate, target, captions: [c1, c2]}),
    `image_splits/split.{cat}.{split}.json` (image ids), images at `images/<id>.png`."""
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; one of {FASHIONIQ_CATEGORIES}")
    root = Path(root)
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    entries = _load_json(cap_path)
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    names = [str(n) for n in _load_json(split_path)]
    gallery = _gallery(names, lambda n: f"{n}.png", root / "images", split_path)
    queries = []
    for i, e in enumerate(entries):
        _require(e, ("candidate", "captions"), cap_path, i)
        caps = [c.strip().rstrip(".") for c in e["captions"]]
        queries.append(
            CompositionQuery(
                query_id=f"{category}-{i}",
                reference=e["candidate"],
                caption=" and ".join(caps),
                target=e.get("target"),
                targets=[e["target"]] if e.get("target") else [],
            )
        )
    return queries, gallery


def read_circo(
    root: str | Path, split: str = "val", image_dir: str | Path | None = None
) -> tuple[list[CompositionQuery], dict[str, Path]]:
    """CIRCO: `annotations/{split}.json` entries {id, reference_img_id, target_img_id,
    gt_img_ids, relative_caption, shared_concept}; the gallery is every image in `image_dir`
    (default `<root>/COCO2017_unlabeled/unlabeled2017`), id = int(file stem)."""
    root = Path(root)
    ann_path = root / "annotations" / f"{split}.json"
    entries = _load_json(ann_path)
    image_dir = (
        Path(image_dir) if image_dir is not None else root / "COCO2017_unlabeled/unlabeled2017"
    )
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CIRCO image directory not found: {image_dir}")
    gallery = {str(int(p.stem)): p for p in sorted(image_dir.glob("*.jpg"))}
    queries = []
    for i, e in enumerate(entries):
        _require(e, ("id", "reference_img_id", "relative_caption"), ann_path, i)
        ids = [e["reference_img_id"], *e.get("gt_img_ids", []), e.get("target_img_id") or 0]
        if not all(isinstance(x, int) or (isinstance(x, str) and x.isdigit()) for x in ids):
            raise BenchmarkFormatError(
                f"{ann_path}: entry {i} has an image id that is not a number"
            )
        gt = [str(int(x)) for x in e.get("gt_img_ids", [])]
        target = e.get("target_img_id")
        queries.append(
            CompositionQuery(
                query_id=str(e["id"]),
                reference=str(int(e["reference_img_id"])),
                caption=e["relative_caption"],
                target=None if target is None else str(int(target)),
                targets=gt,
                extra={"shared_concept": e.get("shared_concept", "")},
            )
        )
    return queries, gallery
