"""The shard record format, in one place: packing writes it, the reader, evaluation and reports
read it through these functions.

A record is one WebDataset sample, one tar member per field (readable by any WebDataset reader):
  KEY.json          {"target", "target_id", "triplets": [{"row", "pth1", "txt1", "txt2", "edit",
                     "scores", "group"}, ...]}
  KEY.t00.jpg ...   target frames (`data.video.centre_indices`; `.png` when packed lossless), or
  KEY.target.npy    (Ft, Q, D) float16 target frame embeddings of the frozen starting model
                    (`embedded_record`, written by the embed step, launch/embed_targets.py)
  KEY.caption.npy   (T, D) float16 embeddings of each triplet's target caption (txt2), likewise
  KEY.thumb.jpg     with those: the target's middle frame, kept for reports (`target_picture`)
  KEY.q000_0.jpg    query frame(s) of triplet 0 (`q{triplet}_{frame}`; `.png` likewise)

`decode_rgb` is the one image decoder (JPEG or PNG bytes from a record, or an image file).
"""

from __future__ import annotations

import io
import json
from itertools import count
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "covr-webdataset/1"
META = "json"
EMBEDDINGS = "target.npy"
CAPTIONS = "caption.npy"
THUMB = "thumb.jpg"
THUMB_PNG = "thumb.png"
FRAME_EXTENSIONS = {"jpeg": "jpg", "png": "png"}  # ShardConfig.frame_format -> member suffix


class ImageDecodeError(ValueError):
    """Bytes or a file that do not decode to an image."""


class RecordError(ValueError):
    """A record that is not in the format: metadata that does not decode or lacks its keys,
    frames missing, an embedding member that does not load. The message names shard and key."""


def target_member(frame: int, ext: str = "jpg") -> str:
    return f"t{frame:02d}.{ext}"


def query_member(triplet: int, frame: int, ext: str = "jpg") -> str:
    return f"q{triplet:03d}_{frame}.{ext}"


def _present(record: dict, member, *index) -> str | None:
    """The record's member for `index` in whichever frame format it was packed, or None."""
    for ext in FRAME_EXTENSIONS.values():
        if member(*index, ext) in record:
            return member(*index, ext)
    return None


def record_key(member: str) -> str:
    """The record a tar member belongs to: `KEY.t00.jpg` -> `KEY`."""
    return member.split(".", 1)[0]


# --- encoding ----------------------------------------------------------------------------------


def encode_image(
    frame: np.ndarray, size: int = 0, quality: int = 90, frame_format: str = "jpeg"
) -> bytes:
    """uint8 (H, W, 3) -> JPEG (at `quality`) or PNG bytes, resized to (size, size) first when
    size > 0 (PIL bicubic, as the reference's torchvision Resize on PIL images)."""
    image = Image.fromarray(np.ascontiguousarray(frame))
    if size:
        image = image.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    if frame_format == "png":
        image.save(buf, format="PNG", compress_level=1)  # lossless either way; 1 is fastest
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def encode_record(
    key: str,
    meta: dict,
    target: np.ndarray,
    queries: list[np.ndarray],
    size: int = 0,
    quality: int = 90,
    frame_format: str = "jpeg",
) -> dict:
    """A WebDataset sample. `target`: (Ft, H, W, 3) uint8 frames; `queries[j]`: the
    (Fq, H, W, 3) frames of `meta["triplets"][j]`; `frame_format` jpeg or png."""
    ext = FRAME_EXTENSIONS[frame_format]
    sample = {"__key__": key}
    for f, frame in enumerate(target):
        sample[target_member(f, ext)] = encode_image(frame, size, quality, frame_format)
    for j, frames in enumerate(queries):
        for f, frame in enumerate(frames):
            sample[query_member(j, f, ext)] = encode_image(frame, size, quality, frame_format)
    sample[META] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample


def embedded_record(record: dict, target: np.ndarray, captions: np.ndarray | None) -> dict:
    """A read record (field -> bytes) with its target JPEGs replaced by `target` (Ft, Q, D) and
    the triplets' caption embeddings `captions` (T, D) (None: none stored), both stored float16;
    the query frames and the metadata are kept byte for byte."""
    frames = _frame_members(record, target_member)
    sample = {k: v for k, v in record.items() if k not in frames and not k.startswith("__")}
    sample["__key__"] = record["__key__"]
    middle = frames[len(frames) // 2]  # what a report shows of the target, in its own format
    sample[THUMB if middle.endswith(".jpg") else THUMB_PNG] = record[middle]
    sample[EMBEDDINGS] = encode_npy(np.asarray(target, dtype=np.float16))
    if captions is not None:
        sample[CAPTIONS] = encode_npy(np.asarray(captions, dtype=np.float16))
    return sample


# --- decoding ----------------------------------------------------------------------------------


def decode_rgb(source: bytes | str | Path) -> np.ndarray:
    """Encoded image bytes or an image file -> uint8 (H, W, 3)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad data
        raise ImageDecodeError(f"cannot read image: {err}") from None


def decode_frames(blobs: list[bytes]) -> np.ndarray:
    """(N, H, W, 3) uint8 from N encoded frames."""
    return np.stack([decode_rgb(b) for b in blobs])


def decode_npy(blob: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(blob))
    except Exception as err:  # ValueError, OSError, EOFError, pickle refusals, ...
        raise RecordError(f"{EMBEDDINGS} does not load: {err}") from None


_RECORD_TYPES = {"target": str, "target_id": int, "triplets": list}
_TRIPLET_TYPES = {"pth1": str, "txt2": str, "edit": str, "scores": list, "group": str}


def record_meta(record: dict) -> dict:
    """The record's metadata, checked: `RecordError` (naming the shard and the key) when the
    `.json` member is absent or does not decode, a key is missing or of the wrong type, or a
    triplet's query frame or the target's frames/embeddings are absent."""
    where = f"{record.get('__url__', '?')}: record {record.get('__key__', '?')}"
    try:
        meta = json.loads(record[META])
    except KeyError:
        raise RecordError(f"{where}: no .{META} member") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RecordError(f"{where}: .{META} does not decode ({err})") from None
    if not isinstance(meta, dict):
        raise RecordError(f"{where}: .{META} is not an object")
    _check_types(meta, _RECORD_TYPES, where)
    if not meta["triplets"]:
        raise RecordError(f"{where}: no triplet")
    for j, trip in enumerate(meta["triplets"]):
        if not isinstance(trip, dict):
            raise RecordError(f"{where}: triplet {j} is not an object")
        _check_types(trip, _TRIPLET_TYPES, f"{where} triplet {j}")
        if _present(record, query_member, j, 0) is None:
            raise RecordError(f"{where}: no query frame of triplet {j}")
    if _present(record, target_member, 0) is None and EMBEDDINGS not in record:
        raise RecordError(f"{where}: no target frames or embeddings")
    return meta


def _check_types(obj: dict, types: dict, where: str) -> None:
    for key, kind in types.items():
        if key not in obj:
            raise RecordError(f"{where}: no {key!r}")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise RecordError(f"{where}: {key!r} is {type(obj[key]).__name__}, not {kind.__name__}")


def target_jpegs(record: dict) -> list[bytes]:
    """The target's encoded frames in order ([] when the record holds embeddings)."""
    return [record[m] for m in _frame_members(record, target_member)]


def target_picture(record: dict) -> bytes | None:
    """The target's middle frame (encoded): from its frames, or the thumbnail embedded records
    keep."""
    frames = target_jpegs(record)
    return frames[len(frames) // 2] if frames else record.get(THUMB, record.get(THUMB_PNG))


def query_jpegs(record: dict, triplet: int) -> list[bytes]:
    return [record[m] for m in _frame_members(record, lambda f, ext: query_member(triplet, f, ext))]


def _frame_members(record: dict, member) -> list[str]:
    out = []
    for f in count():
        name = _present(record, member, f)
        if name is None:
            return out
        out.append(name)


def raw_triplet(record: dict, j: int, meta: dict | None = None) -> dict:
    """Triplet `j` of a record as a sample whose frames are still encoded (the reader composes
    batches before it decodes)."""
    meta = meta if meta is not None else record_meta(record)
    trip = meta["triplets"][j]
    return {
        "key": record["__key__"],
        "target": meta["target"],
        "target_id": meta["target_id"],
        "pth1": trip["pth1"],
        "edit": trip["edit"],
        "description": trip.get("description", ""),
        "scores": trip["scores"],
        "group": trip["group"],
        "targets": trip.get("targets", []),
        "caption": trip["txt2"],
        "query_jpegs": query_jpegs(record, j),
        "target_jpegs": target_jpegs(record),
        "target_npy": record.get(EMBEDDINGS),
        "caption_npy": record.get(CAPTIONS),  # row j is this triplet's (decoded last)
        "triplet": j,
    }


def decode_sample(raw: dict) -> dict:
    """A `raw_triplet` -> the sample dict `sharding.batch.collate` takes. Raises
    `ImageDecodeError` when a frame does not decode, `RecordError` when embeddings do not load."""
    sample = {
        k: raw[k]
        for k in (
            "edit",
            "scores",
            "target_id",
            "targets",
            "group",
            "caption",
            "key",
            "pth1",
            "target",
        )
    }
    sample["description"] = raw.get("description", "")
    sample["query_frames"] = decode_frames(raw["query_jpegs"])
    if raw.get("target_npy") is not None:
        sample["target_embeddings"] = decode_npy(raw["target_npy"])
    else:
        sample["target_frames"] = decode_frames(raw["target_jpegs"])
    if raw.get("caption_npy") is not None:
        sample["caption_embedding"] = decode_npy(raw["caption_npy"])[raw["triplet"]]
    return sample
