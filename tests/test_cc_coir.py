"""CC-CoIR: image triplets mined from CC3M captions, in WebVid-CoVR's CSV layout with `pth` =
`<folder>/<CC3M file name>`; packed with each image as a one-frame video."""

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from configs.schema import ShardConfig
from data.webvid_covr import AnnotationError, read_annotations
from sharding import format as fmt
from sharding.manifest import read_manifest
from sharding.pack import pack
from sharding.reader import iter_records, shard_urls

ROOT = Path(__file__).resolve().parents[1]
CFG = ShardConfig(samples_per_shard=2, target_frames=3, query_frames=1, workers=1, frame_size=16)
SHA = ["5485b84160ccdf4e525f7d2e2cfa8cec2c3d06dc", "0a1b", "ffee", "c0ffee"]


def _image(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (colour, 0, 255 - colour)).save(path)


def _corpus(root: Path) -> Path:
    images = root / "cc3m"
    _image(images / "26" / f"{SHA[0]}.jpg", 10)
    _image(images / "26" / f"{SHA[1]}.png", 90)  # CC3M downloads hold both suffixes
    _image(images / "03" / f"{SHA[2]}.jpg", 170)
    csv = root / "cc-coir_train.csv"
    csv.write_text(
        "pth1,pth2,edit,txt1,txt2\n"
        f'26/{SHA[0]},26/{SHA[1]},"make it red, ""very"" red",a blue car,a red car\n'
        f"26/{SHA[1]},03/{SHA[2]},add a café ☕,a red car,a café\n"
        f"03/{SHA[2]},26/{SHA[0]},remove the cup,a café,a blue car\n"
        f"03/{SHA[3]},26/{SHA[0]},image gone,x,y\n"  # its query image is missing
        f"../outside,26/{SHA[1]},leave the root,x,y\n",
        encoding="utf-8",
    )
    return csv


def test_cc_coir_rows_read_with_quoting_and_unicode_and_bad_rows_name_file_and_line(
    tmp_path, caplog
):
    csv = _corpus(tmp_path)
    with caplog.at_level("WARNING"):
        rows = read_annotations(csv)
    assert rows[0].edit == 'make it red, "very" red' and rows[1].edit == "add a café ☕"
    assert rows[0].pth1 == f"26/{SHA[0]}" and rows[0].scores == []
    # not WebVid-CoVR's full layout: what is absent, and what follows, said once
    (warning,) = [r.getMessage() for r in caplog.records if "has no column" in r.getMessage()]
    assert "scores: uniform pooling of the target frames" in warning and csv.name in warning
    assert "txt1" not in warning and "txt2" not in warning  # this file has captions
    bad = tmp_path / "bad.csv"
    bad.write_text(f"pth1,pth2,edit\n26/{SHA[0]},26/{SHA[1]},ok\n26/{SHA[0]},,no target\n")
    with pytest.raises(AnnotationError, match=r"bad.csv:3: empty column 'pth2'"):
        read_annotations(bad)
    short = tmp_path / "short.csv"
    short.write_text("pth1,edit\na,b\n")
    with pytest.raises(AnnotationError, match=r"short.csv:1: missing column\(s\) \['pth2'\]"):
        read_annotations(short)


def test_cc_coir_packs_images_as_one_frame_videos_missing_ones_counted(tmp_path):
    csv = _corpus(tmp_path)
    cmd = ["python", "launch/shard.py", "pack", "--annotations", str(csv), "--images"]
    cmd += ["--video-root", str(tmp_path / "cc3m"), "--out", str(tmp_path / "shards")]
    cmd += ["shards.samples_per_shard=2", "shards.frame_size=16", "shards.workers=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["split"] == "train" and manifest["totals"]["triplets"] == 3
    reasons = {s["video"]: s["reason"] for s in manifest["skipped"] if "row" in s}
    assert "No such file" in reasons[f"03/{SHA[3]}"] and "outside" in reasons["../outside"]
    records = list(iter_records(shard_urls(tmp_path / "shards", manifest)[0]))
    by_target = {fmt.record_meta(r)["target"]: r for r in records}
    assert set(by_target) == {f"26/{SHA[0]}", f"26/{SHA[1]}", f"03/{SHA[2]}"}
    red = by_target[f"26/{SHA[1]}"]  # the .png image, the query of row 0
    assert len(fmt.target_jpegs(red)) == 1  # one frame, as the reference's images
    target = fmt.decode_rgb(fmt.target_jpegs(red)[0])
    assert target.shape == (16, 16, 3) and abs(int(target[..., 0].mean()) - 90) < 12
    query = fmt.decode_rgb(fmt.query_jpegs(red, 0)[0])
    assert abs(int(query[..., 0].mean()) - 10) < 12
    meta = fmt.record_meta(red)
    assert [t["edit"] for t in meta["triplets"]] == ['make it red, "very" red']
    assert json.loads(json.dumps(meta))  # no local file paths leak into the records
    assert not any("file" in k for t in meta["triplets"] for k in t)
    assert manifest["source_counts"]["triplets"] == 5
    again = pack(csv, tmp_path / "cc3m", tmp_path / "again", CFG, images=True)  # in-process
    assert again["totals"]["triplets"] == 3
