"""Fault injection on small corpora (issue 14, data and packing): paths that leave their root,
a test split with holes, skip counts, inputs fixed after a failed pack, bad records and shards
under the training reader, odd CSV files, and a packing parent killed with SIGKILL."""

import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from configs.schema import SamplerConfig, ShardConfig
from data.benchmarks import BenchmarkFormatError, read_circo, read_cirr, read_fashioniq
from data.captions import read_caption_table
from data.paths import UnsafePathError, check_inside, inside
from data.webvid_covr import (
    COLUMNS,
    AnnotationError,
    MissingVideosError,
    Triplet,
    drop_missing_videos,
    read_annotations,
    write_annotations,
)
from sharding.batch import collate
from sharding.manifest import MANIFEST, read_manifest
from sharding.pack import pack, pack_records
from sharding.reader import MissingShardsError, ShardReader, iter_records, shard_urls
from tests.conftest import CIRR_ROOT, ROOT

CFG = ShardConfig(samples_per_shard=3, target_frames=3, workers=1, seed=3)


@pytest.fixture
def corpus(small_corpus, tmp_path):
    """A private copy of the corpus' CSVs and videos (tests delete and break files)."""
    root, _ = small_corpus
    shutil.copytree(root / "videos", tmp_path / "videos")
    for split in ("train", "val", "test"):
        shutil.copy(root / f"{split}.csv", tmp_path / f"{split}.csv")
    return tmp_path


def _video(root: Path, pth: str) -> Path:
    return root / "videos" / f"{pth}.mp4"


# --- media paths stay inside their root ---------------------------------------------------------


def test_inside_refuses_absolute_and_climbing_names(tmp_path):
    assert inside(tmp_path, "a/b.mp4") == tmp_path / "a" / "b.mp4"
    assert inside(tmp_path, "./a/../b.mp4") == tmp_path / "b.mp4"
    for bad in ("../x.mp4", "a/../../x.mp4", "/etc/passwd", "..", "", "a\0b"):
        with pytest.raises(UnsafePathError):
            inside(tmp_path, bad)
    assert check_inside(tmp_path, tmp_path / "a" / "b.png") == tmp_path / "a" / "b.png"
    for bad in (tmp_path.parent / "x.png", tmp_path / ".." / "x.png", tmp_path, "/etc/passwd"):
        with pytest.raises(UnsafePathError):
            check_inside(tmp_path, bad)


def test_webvid_paths_outside_the_video_root_are_refused_counted_and_named(corpus, tmp_path):
    rows = read_annotations(corpus / "train.csv")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(_video(corpus, rows[0].pth1), outside / "secret.mp4")  # readable, but not ours
    climbing = os.path.relpath(outside / "secret", corpus / "videos")  # ../outside/secret
    # two rows of targets with other triplets (only the triplet is lost), one other row
    shared = [i for i, t in enumerate(rows) if sum(u.pth2 == t.pth2 for u in rows) > 1]
    a = shared[0]
    b = next(i for i in shared if rows[i].pth2 != rows[a].pth2)
    c = next(i for i in range(len(rows)) if i not in (a, b))
    bad = [
        replace(rows[a], pth1=climbing),  # query climbs out: that triplet is lost
        replace(rows[b], pth1=str(outside / "secret")),  # absolute query path
        replace(rows[c], pth2=climbing),  # target climbs out: its record is lost
    ]
    rest = [t for i, t in enumerate(rows) if i not in (a, b, c)]
    write_annotations(corpus / "bad_train.csv", bad + rest)
    manifest = pack(corpus / "bad_train.csv", corpus / "videos", tmp_path / "out", CFG)
    refused = [s for s in manifest["skipped"] if "outside" in s["reason"]]
    assert sorted(s["video"] for s in refused) == sorted(
        [climbing, str(outside / "secret"), climbing]
    )
    assert manifest["totals"]["skipped_records"] == 1
    assert manifest["totals"]["skipped_triplets"] == 3
    assert manifest["totals"]["triplets"] == len(rows) - 3
    packed = {
        t["pth1"]
        for r in iter_records(shard_urls(tmp_path / "out", manifest)[0])
        for t in json.loads(r["json"])["triplets"]
    }
    assert not {climbing, str(outside / "secret")} & packed
    # before packing, the annotation-level check drops them in train and refuses them in test
    kept, dropped = drop_missing_videos(bad, corpus / "videos", "train")
    assert kept == [] and dropped == 3
    with pytest.raises(MissingVideosError, match="outside"):
        drop_missing_videos(bad, corpus / "videos", "test")
    # a test split refuses them before packing anything
    write_annotations(corpus / "bad_test.csv", bad)
    with pytest.raises(MissingVideosError, match="outside") as err:
        pack(corpus / "bad_test.csv", corpus / "videos", tmp_path / "test_out", CFG, split="test")
    assert len(err.value.missing) == 2  # two distinct names: climbing, absolute
    assert not list((tmp_path / "test_out").glob("*"))


def test_explicit_record_files_outside_the_media_root_are_refused(corpus, tmp_path):
    """Records naming their files (CIRR images) get the same check at packing time."""
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), "red").save(media / f"{name}.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    trip = {"row": 0, "pth1": "a", "txt1": "", "txt2": "", "edit": "e", "scores": [], "group": "g"}
    records = [
        {
            "key": "c0",
            "target": "b",
            "target_id": 0,
            "target_file": str(media / "b.png"),
            "triplets": [{**trip, "query_file": str(media / "a.png")}],
        },
        {
            "key": "c1",
            "target": "b",
            "target_id": 0,
            "target_file": str(media / "b.png"),
            "triplets": [{**trip, "row": 1, "query_file": str(media / ".." / "secret.png")}],
        },
        {
            "key": "c2",
            "target": "s",
            "target_id": 1,
            "target_file": str(tmp_path / "secret.png"),
            "triplets": [{**trip, "row": 2, "query_file": str(media / "a.png")}],
        },
    ]
    manifest = pack_records(records, "fp", tmp_path, media, tmp_path / "out", CFG)
    assert manifest["totals"]["samples"] == 1
    assert manifest["totals"]["skipped_records"] == 2
    assert manifest["totals"]["skipped_triplets"] == 2
    lost = [s for s in manifest["skipped"] if s.get("rows") != []]
    assert len(lost) == 2 and all("outside" in s["reason"] for s in lost)
    # the target whose only query was refused is listed too (a gallery item lost with it)
    assert [s["video"] for s in manifest["skipped"] if s.get("rows") == []] == ["b"]


def test_benchmark_images_outside_their_root_are_one_error(tmp_path):
    cirr = tmp_path / "cirr"
    shutil.copytree(CIRR_ROOT, cirr)
    split_file = cirr / "image_splits" / "split.rc2.val.json"
    names = json.loads(split_file.read_text())
    first, second = list(names)[:2]
    names[first], names[second] = "../../../etc/passwd", "/etc/hostname"
    split_file.write_text(json.dumps(names))
    with pytest.raises(BenchmarkFormatError, match="2 image path") as err:
        read_cirr(cirr, "val")
    assert first in str(err.value) and "/etc/hostname" in str(err.value)

    fiq = tmp_path / "fiq"
    (fiq / "captions").mkdir(parents=True)
    (fiq / "image_splits").mkdir()
    entries = [{"candidate": "B1", "target": "B2", "captions": ["is red", "is long"]}]
    (fiq / "captions" / "cap.dress.val.json").write_text(json.dumps(entries))
    (fiq / "image_splits" / "split.dress.val.json").write_text(json.dumps(["B1", "../../B2"]))
    with pytest.raises(BenchmarkFormatError, match="1 image path"):
        read_fashioniq(fiq, "dress")

    circo = tmp_path / "circo"
    (circo / "annotations").mkdir(parents=True)
    (circo / "imgs").mkdir()
    entry = {"id": 0, "reference_img_id": "../../etc/passwd", "relative_caption": "x"}
    (circo / "annotations" / "val.json").write_text(json.dumps([entry]))
    with pytest.raises(BenchmarkFormatError, match="entry 0 has an image id that is not a number"):
        read_circo(circo, "val", image_dir=circo / "imgs")


def _stats_naming(shard_dir: Path, manifest: dict, videos: set[str]) -> set[str]:
    """The stats files of the shards whose records name one of `videos` (target or query)."""
    naming = set()
    for url in shard_urls(shard_dir, manifest)[0]:
        for record in iter_records([url]):
            meta = json.loads(record["json"])
            if videos & {meta["target"], *(t["pth1"] for t in meta["triplets"])}:
                naming.add(Path(url).name.replace(".tar", ".stats.json"))
    return naming


# --- a test split keeps every query; train and val skip and count -------------------------------


def test_test_split_with_missing_videos_is_an_error_listing_them(corpus, tmp_path):
    rows = read_annotations(corpus / "test.csv")
    victims = sorted({rows[0].pth1, rows[1].pth2, rows[2].pth1})
    for pth in victims:
        _video(corpus, pth).unlink()
    with pytest.raises(MissingVideosError) as err:
        pack(corpus / "test.csv", corpus / "videos", tmp_path / "test", CFG)  # split from the name
    assert sorted(err.value.missing) == sorted(
        f"{_video(corpus, p)}: file not found" for p in victims
    )
    assert not (tmp_path / "test" / MANIFEST).exists()
    # the same holes in val are skipped and counted
    write_annotations(corpus / "val_like.csv", rows)
    manifest = pack(corpus / "val_like.csv", corpus / "videos", tmp_path / "val", CFG, split="val")
    assert manifest["split"] == "val"
    lost = sum(t.pth1 in victims or t.pth2 in victims for t in rows)
    assert lost >= 3 and manifest["totals"]["skipped_triplets"] == lost
    assert manifest["totals"]["triplets"] == len(rows) - lost


def test_undecodable_test_video_fails_the_pack_and_is_repacked_once_fixed(corpus, tmp_path):
    rows = read_annotations(corpus / "test.csv")
    victim = _video(corpus, rows[0].pth2)
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])  # truncated: present, but does not decode
    out = tmp_path / "test"
    with pytest.raises(MissingVideosError) as err:
        pack(corpus / "test.csv", corpus / "videos", out, CFG)
    assert len(err.value.missing) == 1 and str(victim) in err.value.missing[0]
    assert not (out / MANIFEST).exists()
    shards_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}
    victim.write_bytes(good)  # fixed: its shard is packed again, the others are kept
    manifest = pack(corpus / "test.csv", corpus / "videos", out, CFG)
    assert manifest["totals"]["triplets"] == len(rows) and manifest["skipped"] == []
    changed = {n for n, t in shards_before.items() if (out / n).stat().st_mtime_ns != t}
    clean = pack(corpus / "test.csv", corpus / "videos", tmp_path / "clean", CFG)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in clean["shards"]]
    naming = _stats_naming(out, manifest, {rows[0].pth2})
    assert changed == naming and len(naming) < len(shards_before)


def test_skips_count_records_and_triplets_apart_and_fixed_videos_are_repacked(corpus, tmp_path):
    rows = read_annotations(corpus / "train.csv")
    per_target: dict[str, list[Triplet]] = {}
    for t in rows:
        per_target.setdefault(t.pth2, []).append(t)
    target = max(per_target, key=lambda p: len(per_target[p]))  # a target with several triplets
    query = next(t.pth1 for t in rows if t.pth2 != target and t.pth1 != target)
    gone = {target, query}
    moved = tmp_path / "moved"
    moved.mkdir()
    for pth in gone:
        shutil.move(_video(corpus, pth), moved / Path(pth).name)
    # a record is lost with its target, or when every query of it is lost
    lost_records = [
        p for p, ts in per_target.items() if p in gone or all(t.pth1 in gone for t in ts)
    ]
    lost_triplets = [t for t in rows if t.pth1 in gone or t.pth2 in gone]
    assert len(lost_records) < len(lost_triplets)  # the two counts differ
    out = tmp_path / "out"
    manifest = pack(corpus / "train.csv", corpus / "videos", out, CFG)
    totals = manifest["totals"]
    assert totals["skipped_records"] == len(lost_records)
    assert totals["skipped_triplets"] == len(lost_triplets)
    assert totals["triplets"] == len(rows) - totals["skipped_triplets"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}
    for pth in gone:  # the videos come back: their shards are packed again
        shutil.move(moved / Path(pth).name, _video(corpus, pth))
    again = pack(corpus / "train.csv", corpus / "videos", out, CFG)
    assert again["totals"]["skipped_records"] == again["totals"]["skipped_triplets"] == 0
    assert again["totals"]["triplets"] == len(rows)
    repacked = {n for n, t in stamps.items() if (out / n).stat().st_mtime_ns != t}
    naming = _stats_naming(out, again, gone)  # only the shards that name the two videos
    assert repacked == naming and len(naming) < len(stamps)
    clean = pack(corpus / "train.csv", corpus / "videos", tmp_path / "clean", CFG)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in clean["shards"]]


# --- the training reader survives bad records and vanished shards -------------------------------


@pytest.fixture(scope="module")
def train_shards(small_corpus, tmp_path_factory):
    root, _ = small_corpus
    out = tmp_path_factory.mktemp("shards")
    return out, pack(root / "train.csv", root / "videos", out, CFG)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.tiny import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tok"))[1]


def _readers(shard_dir, tok, world=2):
    urls, counts = shard_urls(shard_dir, read_manifest(shard_dir))
    fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
    readers = [
        ShardReader(
            urls,
            counts,
            batch_size=2,
            collate=fn,
            sampler=SamplerConfig("random", buffer=4),
            rank=r,
            world=world,
            seed=5,
        )
        for r in range(world)
    ]
    for reader in readers:
        reader.set_position(0, 0, 1)
    return readers


def _rewrite_member(shard: Path, edit) -> None:
    """Rewrite a shard's tar with `edit(name, data) -> data | None` (None drops the member)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            data = edit(m.name, data)
            if data is not None:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def _repair_manifest(shard_dir: Path) -> None:
    """Record the rewritten shards' sizes, as a (buggy) packer that wrote them would have."""
    manifest = read_manifest(shard_dir)
    for s in manifest["shards"]:
        s["bytes"] = (shard_dir / f"{s['name']}.tar").stat().st_size
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))


def test_bad_records_are_skipped_counted_and_named_with_equal_batches(
    train_shards, tok, tmp_path, caplog
):
    src, manifest = train_shards
    shard_dir = tmp_path / "shards"
    shutil.copytree(src, shard_dir)
    bad_shard = shard_dir / f"{manifest['shards'][1]['name']}.tar"
    keys = sorted({n.split(".")[0] for n in tarfile.open(bad_shard).getnames()})
    assert len(keys) == 3

    def edit(name, data):
        key, field = name.split(".", 1)
        if field == "json" and key == keys[0]:
            return b'{"target": "x", "triplets": [oops'  # does not decode
        if field == "json" and key == keys[1]:
            meta = json.loads(data)
            del meta["triplets"][0]["edit"]  # a triplet without its keys
            return json.dumps(meta).encode()
        if field == "json" and key == keys[2]:
            return None  # no metadata at all
        return data

    _rewrite_member(bad_shard, edit)
    _repair_manifest(shard_dir)
    clean = [len(list(r)) for r in _readers(src, tok)]
    with caplog.at_level(logging.WARNING, logger="sharding.reader"):
        batches = [list(r) for r in _readers(shard_dir, tok)]
    assert [len(b) for b in batches] == clean and clean[0] == clean[1] > 0
    stats = [b[-1][1].stats for b in batches]
    assert sum(s["malformed"] for s in stats) == 3  # each read once: every rank its own range
    assert sum(s["resampled"] for s in stats) >= 3
    assert bad_shard.name in caplog.text and "malformed record" in caplog.text
    # evaluation, which must see every record, stops with the shard and key named
    from sharding import format as fmt

    with pytest.raises(fmt.RecordError, match=rf"{bad_shard.name}: record {keys[0]}"):
        for record in iter_records([str(bad_shard)]):
            fmt.record_meta(record)


def test_a_shard_whose_bytes_changed_since_packing_is_named_and_counted(
    train_shards, tok, tmp_path, caplog
):
    """Same size (the start-up check passes), other bytes: read, then named and counted; an
    intact shard read whole is not."""
    src, manifest = train_shards
    shard_dir = tmp_path / "shards"
    shutil.copytree(src, shard_dir)
    changed = shard_dir / f"{manifest['shards'][0]['name']}.tar"
    data = bytearray(changed.read_bytes())
    data[-700] ^= 0xFF  # in the tar's end padding: every record still reads
    changed.write_bytes(bytes(data))
    urls, counts = shard_urls(shard_dir, read_manifest(shard_dir))
    fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
    checksums = [s["sha256"] for s in read_manifest(shard_dir)["shards"]]
    whole = sum(counts)  # one rank and a batch of 1: every shard is read to its end

    def read(checks):
        reader = ShardReader(urls, counts, batch_size=1, collate=fn, seed=5, checksums=checks)
        reader.set_position(0, 0, 1)
        return list(reader)

    with caplog.at_level(logging.WARNING, logger="sharding.reader"):
        batches = read(checksums)
    assert len(batches) == whole and batches[-1][1].stats["checksum_mismatch"] == 1
    assert f"{changed}: its sha256 is not the manifest's" in caplog.text
    (shard_dir / changed.name).write_bytes((src / changed.name).read_bytes())
    assert read(checksums)[-1][1].stats["checksum_mismatch"] == 0  # intact: nothing said


def test_a_shard_deleted_after_the_start_is_skipped_with_equal_batches(
    train_shards, tok, tmp_path, caplog
):
    src, manifest = train_shards
    shard_dir = tmp_path / "shards"
    shutil.copytree(src, shard_dir)
    readers = _readers(shard_dir, tok)
    clean = [len(list(r)) for r in _readers(src, tok)]
    names = [s["name"] for s in manifest["shards"]]
    for name in names[1:]:  # all but one shard vanish: most slot ranges are entirely gone
        (shard_dir / f"{name}.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="sharding.reader"):
        batches = [list(r) for r in readers]
    assert [len(b) for b in batches] == clean
    assert all(b[-1][1].stats["corrupt_shards"] >= 1 for b in batches)
    assert f"{names[1]}.tar" in caplog.text
    # every batch now comes from the one shard left
    left = {r["__key__"] for r in iter_records([str(shard_dir / f"{names[0]}.tar")])}
    assert {k for b in batches for _, info in b for k in info.keys} <= left


def test_missing_and_resized_shards_are_one_error_before_training(train_shards, tmp_path):
    src, manifest = train_shards
    shard_dir = tmp_path / "shards"
    shutil.copytree(src, shard_dir)
    first, second, third = (shard_dir / f"{s['name']}.tar" for s in manifest["shards"][:3])
    first.unlink()
    third.unlink()
    second.write_bytes(second.read_bytes()[:2048])
    with pytest.raises(MissingShardsError) as err:
        shard_urls(shard_dir, read_manifest(shard_dir))
    assert len(err.value.problems) == 3
    assert f"{first.name} missing" in str(err.value) and f"{third.name} missing" in str(err.value)
    assert f"{second.name} has 2048 bytes" in str(err.value)


# --- CSV files: byte order marks and oversized fields --------------------------------------------


def test_csv_with_a_byte_order_mark_reads_like_without(small_corpus, tmp_path):
    root, _ = small_corpus
    text = (root / "val.csv").read_text(encoding="utf-8")
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    assert (tmp_path / "bom.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_annotations(tmp_path / "bom.csv") == read_annotations(root / "val.csv")
    table = (root / "captions.csv").read_text(encoding="utf-8")
    (tmp_path / "captions.csv").write_text(table, encoding="utf-8-sig")
    assert read_caption_table(tmp_path / "captions.csv") == read_caption_table(
        root / "captions.csv"
    )
    cirr = tmp_path / "cirr"
    shutil.copytree(CIRR_ROOT, cirr)
    for path in (
        cirr / "captions" / "cap.rc2.val.json",
        cirr / "image_splits" / "split.rc2.val.json",
    ):
        path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")
    assert len(read_cirr(cirr, "val")[0]) == len(read_cirr(CIRR_ROOT, "val")[0])


def test_oversized_csv_field_is_an_annotation_error_with_file_and_line(tmp_path):
    good = "a/1,a/2,x,y,make it red,[0.1],0.5\n"
    unclosed = 'a/3,a/4,x,y,"make it blue,[0.2],0.5\n'  # the quote stays open to the end
    path = tmp_path / "open_quote.csv"
    path.write_text(",".join(COLUMNS) + "\n" + good + unclosed + good * 5000)
    for lenient in (False, True):
        with pytest.raises(
            AnnotationError, match=r"open_quote.csv:3: unreadable CSV .*field larger"
        ):
            read_annotations(path, lenient=lenient)
    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerow(["1", "u", "d", "p", "a caption"])
        w.writerow(["2", "u", "d", "p", "x" * 200_000])  # one caption over the field limit
    with pytest.raises(AnnotationError, match=r"captions.csv:3: unreadable CSV"):
        read_caption_table(table)
    with pytest.raises(AnnotationError, match=r"cols.csv:1: caption table lacks"):
        (tmp_path / "cols.csv").write_text("videoid,name\n")
        read_caption_table(tmp_path / "cols.csv")


# --- packing workers die with their parent -------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its new parent reaps it later)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_packing_workers_die_with_a_killed_parent(small_corpus, tmp_path):
    root, _ = small_corpus
    # Reading media sleeps (forked workers inherit the patch), so both workers are busy when the
    # parent is killed.
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from configs.schema import ShardConfig
        from sharding import writer
        from sharding.pack import pack

        def slow_media(path, n):
            time.sleep(120)
            return np.zeros((n, 8, 8, 3), np.uint8)

        writer.load_media = slow_media
        cfg = ShardConfig(samples_per_shard=2, target_frames=2, workers=2)
        pack({str(root / "train.csv")!r}, {str(root / "videos")!r}, {str(tmp_path / "out")!r}, cfg)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = _children(proc.pid)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert len(workers) >= 2, "the pack never started its workers"
        time.sleep(2.0)  # past the workers' initializer, into the sleeping media read
        assert all(_alive(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "packing workers outlived their parent"
    finally:
        for w in _children(proc.pid) + workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_an_undecodable_sample_becomes_a_copy_of_another_row_and_the_info_says_so(
    train_shards, tok, tmp_path
):
    src, manifest = train_shards
    shard_dir = tmp_path / "shards"
    shutil.copytree(src, shard_dir)
    shard = shard_dir / f"{manifest['shards'][0]['name']}.tar"
    bad = sorted({n.split(".")[0] for n in tarfile.open(shard).getnames()})[0]
    _rewrite_member(
        shard,
        lambda name, data: (
            b"not a jpeg" if name.startswith(f"{bad}.") and name.endswith(".jpg") else data
        ),
    )
    _repair_manifest(shard_dir)
    clean = [list(r) for r in _readers(src, tok)]
    damaged = [list(r) for r in _readers(shard_dir, tok)]
    hit = 0
    for clean_rank, damaged_rank in zip(clean, damaged):
        assert len(clean_rank) == len(damaged_rank)
        for (_, c_info), (d_batch, d_info) in zip(clean_rank, damaged_rank):
            assert d_info.drawn == c_info.drawn  # the bad record counts as consumed
            if bad not in c_info.keys:
                assert d_info.keys == c_info.keys
                continue
            hit += 1
            row = c_info.keys.index(bad)
            assert bad not in d_info.keys and d_info.stats["undecodable"] >= 1
            copied = d_info.keys[row]  # the row is a copy of another row of the same batch
            source = [i for i, k in enumerate(d_info.keys) if k == copied and i != row][0]
            assert d_info.positions[row] == d_info.positions[source]
            assert torch.equal(d_batch["query_frames"][row], d_batch["query_frames"][source])
            others = [i for i in range(len(d_info.keys)) if i != row]
            assert [d_info.keys[i] for i in others] == [c_info.keys[i] for i in others]
    assert hit == 1
