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


def _fake_cirr(root, extra=("dev-extra.png",)):
    """A 3-image CIRR val split under img_raw/dev, whose folder holds `extra` files too."""
    names = {n: f"./dev/{n}.png" for n in ("dev-0-img0", "dev-0-img1", "dev-1-img0")}
    entry = {
        "pairid": 1,
        "reference": "dev-0-img0",
        "target_hard": "dev-0-img1",
        "target_soft": {"dev-0-img1": 1.0},
        "caption": "make it red",
        "img_set": {"id": 0, "members": list(names)},
    }
    for sub, name, body in (
        ("captions", "cap.rc2.val.json", [entry]),
        ("image_splits", "split.rc2.val.json", names),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps(body))
    (root / "img_raw" / "dev").mkdir(parents=True)
    for name in [f"{n}.png" for n in names] + list(extra):
        (root / "img_raw" / "dev" / name).write_bytes(b"")


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


def test_cirr_folder_gallery_adds_the_other_images_of_the_split_folder(tmp_path):
    _fake_cirr(tmp_path, extra=("dev-extra.png", "dev-more.jpg", "notes.txt"))
    _, split = read_cirr(tmp_path, "val")
    _, folder = read_cirr(tmp_path, "val", gallery="folder")
    assert sorted(split) == ["dev-0-img0", "dev-0-img1", "dev-1-img0"]
    assert sorted(folder) == sorted(split) + ["dev-extra", "dev-more"]  # not notes.txt
    assert folder["dev-extra"] == tmp_path / "img_raw" / "dev" / "dev-extra.png"
    assert all(folder[g] == p for g, p in split.items())
    with pytest.raises(ValueError, match="cirr_gallery"):
        read_cirr(tmp_path, "val", gallery="everything")


def test_cirr_folder_gallery_refuses_two_files_of_one_id(tmp_path):
    _fake_cirr(tmp_path, extra=("dev-1-img0.jpg",))  # beside dev-1-img0.png of the split
    with pytest.raises(BenchmarkFormatError, match="share the id 'dev-1-img0'"):
        read_cirr(tmp_path, "val", gallery="folder")


def test_real_cirr_val_soft_labels_credit_other_images():
    """Why `cirr_subset_credit` matters on the real val annotations: soft labels mark other
    subset members correct, and some queries' target_hard has no soft label at all."""
    queries, _ = read_cirr(CIRR_ROOT, "val")

    def credited_others(q, value, reference_too):
        skip = {q.target} if reference_too else {q.target, q.reference}
        soft = q.extra["target_soft"]
        return any(soft[g] == value for g in set(q.subset) - skip if g in soft)

    assert sum(credited_others(q, 1.0, True) for q in queries) == 37
    assert sum(credited_others(q, 1.0, False) for q in queries) == 22  # the reference never ranks
    assert sum(credited_others(q, 0.5, False) for q in queries) == 41
    assert sum(q.target not in q.extra["target_soft"] for q in queries) == 37


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
