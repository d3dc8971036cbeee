import json

import pytest

from data.benchmarks import (
    BenchmarkFormatError,
    check_images,
    read_circo,
    read_cirr,
    read_fashioniq,
)
from tests.conftest import CIRR_ROOT


def test_real_cirr_val_and_test():
    queries, gallery = read_cirr(CIRR_ROOT, "val")
    assert len(queries) == 4181 and len(gallery) == 2297
    q = queries[0]
    assert q.query_id == "12060" and q.target == "dev-1028-1-img1"
    assert len(q.subset) == 6 and q.reference in q.subset
    assert all(q.target in gallery and q.reference in gallery for q in queries)
    test_queries, test_gallery = read_cirr(CIRR_ROOT, "test1")
    assert len(test_queries) == 4148 and all(t.target is None for t in test_queries)
    assert gallery["dev-244-0-img0"].name == "dev-244-0-img0.png"


def test_missing_images_are_one_error_with_count():
    _, gallery = read_cirr(CIRR_ROOT, "val", image_root="/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"2297 of 2297 image\(s\) missing"):
        check_images(gallery)


def test_fashioniq_reader(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    entries = [{"candidate": "B1", "target": "B2", "captions": ["is red.", "has long sleeves"]}]
    (tmp_path / "captions" / "cap.dress.val.json").write_text(json.dumps(entries))
    (tmp_path / "image_splits" / "split.dress.val.json").write_text(json.dumps(["B1", "B2", "B3"]))
    queries, gallery = read_fashioniq(tmp_path, "dress")
    assert queries[0].caption == "is red and has long sleeves"
    assert (queries[0].reference, queries[0].target) == ("B1", "B2")
    assert sorted(gallery) == ["B1", "B2", "B3"] and gallery["B3"].name == "B3.png"
    with pytest.raises(ValueError, match="unknown FashionIQ category"):
        read_fashioniq(tmp_path, "shoes")


def test_circo_reader_and_bad_entry(tmp_path):
    (tmp_path / "annotations").mkdir()
    images = tmp_path / "imgs"
    images.mkdir()
    for i in (5, 17, 23):
        (images / f"{i:012d}.jpg").write_bytes(b"")
    entry = {
        "id": 0,
        "reference_img_id": 5,
        "target_img_id": 17,
        "gt_img_ids": [17, 23],
        "relative_caption": "has two dogs",
        "shared_concept": "dog",
    }
    (tmp_path / "annotations" / "val.json").write_text(json.dumps([entry]))
    queries, gallery = read_circo(tmp_path, "val", image_dir=images)
    assert sorted(gallery) == ["17", "23", "5"]
    assert queries[0].targets == ["17", "23"] and queries[0].reference == "5"
    (tmp_path / "annotations" / "val.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(BenchmarkFormatError, match=r"val.json: entry 0 lacks"):
        read_circo(tmp_path, "val", image_dir=images)
