import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from configs.schema import SamplerConfig, ShardConfig
from data.webvid_covr import read_annotations
from sharding.batch import augment, collate
from sharding.manifest import read_manifest, verify
from sharding.pack import pack
from sharding.reader import ShardReader, ShardURLError, iter_records, shard_urls
from sharding.records import masked_caption_group
from sharding.writer import NO_QUERY_LEFT
from tests.conftest import ROOT

CFG = ShardConfig(samples_per_shard=3, target_frames=3, workers=1, seed=3)


@pytest.fixture(scope="module")
def packed(small_corpus, tmp_path_factory):
    root, _ = small_corpus
    out = tmp_path_factory.mktemp("shards")
    manifest = pack(root / "train.csv", root / "videos", out, CFG)
    return root, out, manifest


def _keys(shard_dir):
    urls, _ = shard_urls(shard_dir, read_manifest(shard_dir))
    return [r["__key__"] for r in iter_records(urls)]


def test_group_key_masks_the_edited_word():
    assert masked_caption_group("a red circle", "a blue circle") == "a _ circle"
    assert masked_caption_group("A red circle", "a red square box") == "a red square box"


def _picture_record(tmp_path):
    """A record of three small image files: queries a and b, target c (their pixels too)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 60, 16)[None, :, None]  # smooth pictures of distinct colours
    pictures = {
        n: (rng.integers(0, 190, 3) + ramp + np.zeros((12, 1, 1))).astype(np.uint8) for n in "abc"
    }
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    trips = [
        {
            "row": r,
            "pth1": q,
            "txt1": "x",
            "txt2": "y",
            "edit": f"edit {q}",
            "scores": [0.5],
            "group": "g",
            "query_file": str(tmp_path / f"{q}.png"),
        }
        for r, q in enumerate("ab")
    ]
    record = {
        "key": "v000000007",
        "target": "c",
        "target_id": 7,
        "target_file": str(tmp_path / "c.png"),
        "triplets": trips,
    }
    return record, pictures


def test_a_packed_record_decodes_back_through_the_format(tmp_path):
    import numpy as np

    from sharding import format as fmt
    from sharding.pack import pack_records

    rng = np.random.default_rng(0)
    record, pictures = _picture_record(tmp_path)
    trips = record["triplets"]
    manifest = pack_records([record], "fp", tmp_path, tmp_path, tmp_path / "out", CFG)
    (packed_record,) = iter_records(shard_urls(tmp_path / "out", manifest)[0])
    assert packed_record["__key__"] == "v000000007"
    assert fmt.record_meta(packed_record) == {
        "target": "c",
        "target_id": 7,
        "triplets": [{k: v for k, v in t.items() if k != "query_file"} for t in trips],
    }
    for j, q in enumerate("ab"):
        sample = fmt.decode_sample(fmt.raw_triplet(packed_record, j))
        assert (sample["edit"], sample["pth1"], sample["target_id"]) == (f"edit {q}", q, 7)
        for got, original in (
            (sample["query_frames"], pictures[q]),
            (sample["target_frames"], pictures["c"]),
        ):
            assert got.shape == (1, 12, 16, 3) and got.dtype == np.uint8
            assert np.array_equal(
                got[0], fmt.decode_rgb(fmt.encode_image(original, 0, CFG.jpeg_quality))
            )
            assert np.abs(got[0].astype(int) - original).mean() < 4  # JPEG-close to its own picture
    assert not np.array_equal(
        fmt.decode_rgb(fmt.query_jpegs(packed_record, 0)[0]),
        fmt.decode_rgb(fmt.query_jpegs(packed_record, 1)[0]),
    )
    # embedded: target frames replaced by embeddings, each triplet's caption row; back exactly
    emb = rng.standard_normal((1, 4, 8)).astype(np.float16)
    captions = rng.standard_normal((2, 8)).astype(np.float16)
    sample = fmt.embedded_record(packed_record, emb, captions)
    assert fmt.EMBEDDINGS in sample and not fmt.target_jpegs(sample)
    assert fmt.query_jpegs(sample, 1) == fmt.query_jpegs(packed_record, 1)
    for j in range(2):
        decoded = fmt.decode_sample(fmt.raw_triplet(sample, j))
        assert np.array_equal(decoded["target_embeddings"], emb) and "target_frames" not in decoded
        assert np.array_equal(decoded["caption_embedding"], captions[j])
    # target embeddings without caption embeddings (e.g. released ones): targets still load
    no_captions = {k: v for k, v in sample.items() if k != fmt.CAPTIONS}
    decoded = fmt.decode_sample(fmt.raw_triplet(no_captions, 1))
    assert np.array_equal(decoded["target_embeddings"], emb) and "caption_embedding" not in decoded
    # caption embeddings beside target frames: the frames are still decoded
    frames_and_captions = {**packed_record, fmt.CAPTIONS: fmt.encode_npy(captions)}
    decoded = fmt.decode_sample(fmt.raw_triplet(frames_and_captions, 1))
    assert decoded["target_frames"].shape == (1, 12, 16, 3)
    assert np.array_equal(decoded["caption_embedding"], captions[1])
    with pytest.raises(fmt.ImageDecodeError):
        fmt.decode_rgb(b"not an image")


def test_lossless_bgr_packing_keeps_every_pixel_and_swaps_only_targets(tmp_path):
    import numpy as np

    from sharding import format as fmt
    from sharding.pack import pack_records

    record, pictures = _picture_record(tmp_path)
    cfg = replace(CFG, frame_format="png", target_channels="bgr")
    manifest = pack_records([record], "fp", tmp_path, tmp_path, tmp_path / "out", cfg)
    (packed_record,) = iter_records(shard_urls(tmp_path / "out", manifest)[0])
    assert {"t00.png", "q000_0.png", "q001_0.png"} <= set(packed_record)
    assert not any(k.endswith(".jpg") for k in packed_record)
    sample = fmt.decode_sample(fmt.raw_triplet(packed_record, 1))
    assert np.array_equal(sample["query_frames"][0], pictures["b"])  # exact, RGB
    assert np.array_equal(sample["target_frames"][0], pictures["c"][..., ::-1])  # exact, BGR
    embedded = fmt.embedded_record(packed_record, np.zeros((1, 2, 4)), np.zeros((2, 4)))
    assert fmt.THUMB_PNG in embedded and not fmt.target_jpegs(embedded)
    assert fmt.target_picture(embedded) == packed_record["t00.png"]


def test_pack_manifest_and_verify(packed):
    root, out, manifest = packed
    rows = read_annotations(root / "train.csv")
    targets = {t.pth2 for t in rows}
    assert manifest["totals"]["samples"] == len(targets)  # target mode: one record per target
    assert manifest["totals"]["triplets"] == len(rows)
    assert len(manifest["shards"]) == -(-len(targets) // 3)
    assert manifest["config"]["samples_per_shard"] == 3 and manifest["skipped"] == []
    assert all(s["sha256"] and s["bytes"] > 0 for s in manifest["shards"])
    assert verify(out) == {
        "shards": len(manifest["shards"]),
        "ok": len(manifest["shards"]),
        "corrupt": [],
    }
    # any tar reader sees standard WebDataset members
    first = out / f"{manifest['shards'][0]['name']}.tar"
    names = subprocess.run(
        ["tar", "tf", str(first)], capture_output=True, text=True, check=True
    ).stdout.split()
    key = names[0].split(".")[0]
    assert {f"{key}.json", f"{key}.t00.jpg", f"{key}.t02.jpg", f"{key}.q000_0.jpg"} <= set(names)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == len(targets)


def test_packing_is_deterministic_and_triplet_mode(packed, tmp_path):
    root, out, manifest = packed
    again = pack(root / "train.csv", root / "videos", tmp_path / "again", replace(CFG, workers=2))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    per_triplet = pack(
        root / "train.csv", root / "videos", tmp_path / "trip", replace(CFG, epoch="triplet")
    )
    assert (
        per_triplet["totals"]["samples"]
        == per_triplet["totals"]["triplets"]
        == manifest["totals"]["triplets"]
    )


def test_missing_video_is_skipped_with_its_reason(small_corpus, tmp_path):
    root, _ = small_corpus
    videos = tmp_path / "videos"
    shutil.copytree(root / "videos", videos)
    victim = read_annotations(root / "train.csv")[0].pth1
    (videos / f"{victim}.mp4").unlink()
    manifest = pack(root / "train.csv", videos, tmp_path / "out", CFG)
    assert manifest["totals"]["skipped_triplets"] >= 1
    lost = [s for s in manifest["skipped"] if s["reason"] != NO_QUERY_LEFT]
    assert lost and all(victim in s["video"] and "file not found" in s["reason"] for s in lost)


def test_kill_and_resume_gives_the_same_shards(packed, tmp_path):
    root, _, manifest = packed
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "launch/shard.py"),
        "pack",
        "--annotations",
        str(root / "train.csv"),
        "--video-root",
        str(root / "videos"),
        "--out",
        str(out),
        "shards.samples_per_shard=3",
        "shards.target_frames=3",
        "shards.workers=1",
        "shards.seed=3",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("*.stats.json")))
    assert 2 <= finished < len(manifest["shards"]), "kill came too late to test resuming"
    subprocess.run(cmd, check=True, capture_output=True)
    resumed = read_manifest(out)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert not list(out.glob("*.tmp"))


def test_verify_reports_a_truncated_shard(packed, tmp_path):
    _, out, manifest = packed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / f"{manifest['shards'][1]['name']}.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    report = verify(copy)
    assert report["ok"] == len(manifest["shards"]) - 1
    assert report["corrupt"][0]["shard"] == manifest["shards"][1]["name"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/shard.py"), "verify", str(copy)], capture_output=True
    )
    assert proc.returncode == 1


def _reader(out, tok, rank=0, world=1, batch_size=2, sampler="random", **kw):
    urls, counts = shard_urls(out, read_manifest(out))
    fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
    return ShardReader(
        urls,
        counts,
        batch_size=batch_size,
        collate=fn,
        sampler=SamplerConfig(sampler, buffer=4),
        rank=rank,
        world=world,
        seed=5,
        **kw,
    )


def _epoch(reader, epoch=0, start=0, workers=2, limit=None):
    reader.set_position(epoch, start, workers)
    out = []
    for i, (batch, info) in enumerate(DataLoader(reader, batch_size=None, num_workers=workers)):
        if limit is not None and i >= limit:
            break
        out.append({**batch, "keys": info.keys, "reader_stats": info.stats})
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.tiny import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tok"))[1]


def test_equal_batches_on_every_rank_with_uneven_shards(packed, tok):
    _, out, manifest = packed
    assert len({s["samples"] for s in manifest["shards"]}) > 1  # the last shard is short
    expected = _reader(out, tok, 0, 2)
    expected.set_position(0, 0, 2)
    lengths, seen = [], []
    for rank in range(2):
        batches = _epoch(_reader(out, tok, rank, 2))
        lengths.append(len(batches))
        seen += [k for b in batches for k in b["keys"]]
        assert all(b["query_frames"].shape[0] == 2 for b in batches)
    assert lengths == [expected.batches_per_epoch()] * 2
    assert len(seen) == len(set(seen))  # nothing read twice in an epoch


def _pack_with_ray(root, out):
    import ray

    try:
        return pack(root / "train.csv", root / "videos", out, replace(CFG, workers=2), "ray")
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_pack_with_ray_matches_local(packed, tmp_path):
    from tests.multirank import in_fresh_process

    root, _, manifest = packed
    ray_manifest = in_fresh_process(_pack_with_ray, root, tmp_path / "ray")
    assert [s["sha256"] for s in ray_manifest["shards"]] == [
        s["sha256"] for s in manifest["shards"]
    ]


def test_exact_mid_epoch_resume_two_ranks_two_workers(packed, tok):
    _, out, _ = packed
    for rank in range(2):
        full = [k for b in _epoch(_reader(out, tok, rank, 2, sampler="hns")) for k in b["keys"]]
        first = _epoch(_reader(out, tok, rank, 2, sampler="hns"), limit=3)
        rest = _epoch(_reader(out, tok, rank, 2, sampler="hns"), start=3)
        resumed = [k for b in first + rest for k in b["keys"]]
        assert resumed == full
        assert len(set(resumed)) == len(resumed)


def test_augmentation_is_seeded_per_batch_and_resumes_exactly(packed, tok):
    _, out, _ = packed
    aug = partial(augment, hflip=0.5, shift=2)
    full = _epoch(_reader(out, tok, augment=aug))
    first = _epoch(_reader(out, tok, augment=aug), limit=2)
    rest = _epoch(_reader(out, tok, augment=aug), start=2)
    plain = _epoch(_reader(out, tok))
    assert len(first + rest) == len(full) == len(plain)
    for a, b in zip(full, first + rest):
        assert torch.equal(a["query_frames"], b["query_frames"])
        assert torch.equal(a["target_frames"], b["target_frames"])
    assert any(not torch.equal(a["query_frames"], p["query_frames"]) for a, p in zip(full, plain))


def test_epochs_differ_and_are_deterministic(packed, tok):
    _, out, _ = packed
    a = [k for b in _epoch(_reader(out, tok), epoch=0) for k in b["keys"]]
    b = [k for b in _epoch(_reader(out, tok), epoch=1) for k in b["keys"]]
    assert a == [k for bb in _epoch(_reader(out, tok), epoch=0) for k in bb["keys"]]
    assert a != b


def test_corrupt_shard_is_skipped_counted_and_batches_stay_equal(packed, tok, tmp_path):
    _, out, manifest = packed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / f"{manifest['shards'][0]['name']}.tar"
    reader = _reader(copy, tok, 0, 1)  # cut after the start (at the start it is an error)
    victim.write_bytes(victim.read_bytes()[:5000])
    batches = _epoch(reader, workers=1)
    assert len(batches) == reader.batches_per_epoch()
    stats = batches[-1]["reader_stats"]
    assert stats["corrupt_shards"] >= 1 and stats["resampled"] >= 1


def test_too_many_ranks_is_a_clear_error(packed, tok):
    _, out, manifest = packed
    reader = _reader(out, tok, 0, manifest["totals"]["samples"], batch_size=2)
    reader.set_position(0, 0, 2)
    with pytest.raises(ValueError, match="less than one batch of 2 per rank"):
        reader.batches_per_epoch()


def test_workers_share_whole_batches_and_an_epoch_uses_all_but_the_last_partial_batch(packed, tok):
    _, out, manifest = packed
    total, workers = manifest["totals"]["samples"], 3
    per_rank = total // (2 * 2)  # 2 ranks, batches of 2
    assert per_rank % workers, "the corpus should leave workers with unequal shares"
    seen = []
    for rank in range(2):
        batches = _epoch(_reader(out, tok, rank, 2), workers=workers)
        assert len(batches) == per_rank  # the leftover of a worker's range is no longer lost
        assert [b["reader_stats"]["worker"] for b in batches] == [
            k % workers for k in range(per_rank)
        ]
        seen += [k for b in batches for k in b["keys"]]
        for start in (1, per_rank - 1):  # resumed where the workers' shares differ
            rest = _epoch(_reader(out, tok, rank, 2), start=start, workers=workers)
            assert [k for b in rest for k in b["keys"]] == [
                k for b in batches[start:] for k in b["keys"]
            ]
    assert len(seen) == len(set(seen)) == total - total % 4


def test_pipe_urls_are_refused_unless_enabled(tok):
    with pytest.raises(ShardURLError, match="pipe:"):
        ShardReader(["pipe:cat x.tar"], [1], batch_size=1, collate=lambda s: s)
    with pytest.raises(ShardURLError):
        list(iter_records(["pipe:cat x.tar"]))


def test_evaluation_order_is_fixed(packed):
    _, out, manifest = packed
    keys = _keys(out)
    assert keys == _keys(out)
    first_shard = [
        json.loads(r["json"])["target"]
        for r in iter_records([str(out / f"{manifest['shards'][0]['name']}.tar")])
    ]
    assert len(first_shard) == manifest["shards"][0]["samples"]


def test_kmeans_groups_of_embedded_targets(packed, tmp_path):
    import numpy as np

    from sharding.embed import embed_dir
    from sharding.groups import kmeans_groups, read_groups
    from tests.tiny import tiny_model
    from train.embedder import TargetEncoder

    _, shards, _ = packed
    model, model_tok = tiny_model(tmp_path)
    out = tmp_path / "emb"
    manifest = embed_dir(shards, out, TargetEncoder(model, model_tok))
    records = list(iter_records(shard_urls(out, manifest)[0]))
    emb = np.load(__import__("io").BytesIO(records[0]["target.npy"]))
    assert emb.shape == (3, 4, 16) and emb.dtype == np.float16
    groups = kmeans_groups(out, k=4)
    assert read_groups(out) == groups and len(set(groups.values())) == 4
    assert set(groups) == {json.loads(r["json"])["target_id"] for r in records}
    reader = _reader(out, model_tok, groups=groups)
    batch = _epoch(reader, workers=1)[0]
    assert batch["target_embeddings"].shape[1:] == (3, 4, 16)
    with pytest.raises(ValueError, match="no target embeddings"):
        kmeans_groups(shards, k=4)


def test_fsspec_urls_are_read(packed):
    import fsspec

    _, out, manifest = packed
    name = manifest["shards"][0]["name"]
    with fsspec.open(f"memory://covr/{name}.tar", "wb") as f:
        f.write((out / f"{name}.tar").read_bytes())
    local = [r["__key__"] for r in iter_records([str(out / f"{name}.tar")])]
    assert [r["__key__"] for r in iter_records([f"memory://covr/{name}.tar"])] == local
    assert [r["__key__"] for r in iter_records([f"file://{out / name}.tar"])] == local


def test_cirr_triplets_pack_with_image_set_groups(tmp_path, tok):
    from PIL import Image

    from sharding.pack import pack_cirr
    from tests.conftest import CIRR_ROOT

    entries = json.loads((CIRR_ROOT / "captions/cap.rc2.val.json").read_text())[:24]
    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "captions/cap.rc2.val.json").write_text(json.dumps(entries))
    shutil.copytree(CIRR_ROOT / "image_splits", root / "image_splits")
    names = json.loads((root / "image_splits/split.rc2.val.json").read_text())
    for e in entries:  # generated stand-ins for the images these queries use
        for img in (e["reference"], e["target_hard"]):
            path = root / "img_raw" / names[img]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), (hash(img) % 255, 40, 90)).save(path)
    manifest = pack_cirr(
        root, "val", tmp_path / "shards", replace(CFG, query_frames=1, target_frames=1)
    )
    assert manifest["totals"]["samples"] == 24 and manifest["skipped"] == []
    records = list(iter_records(shard_urls(tmp_path / "shards", manifest)[0]))
    meta = {r["__key__"]: json.loads(r["json"]) for r in records}
    first = meta[f"c{entries[0]['pairid']:09d}"]
    assert first["target"] == entries[0]["target_hard"]
    assert first["triplets"][0]["group"] == f"set{entries[0]['img_set']['id']}"
    assert first["triplets"][0]["edit"] == entries[0]["caption"]
    batch = _epoch(_reader(tmp_path / "shards", tok), workers=1)[0]
    assert batch["target_frames"].shape[1] == 1 and batch["query_frames"].shape[1] == 1


def test_a_buffer_under_eight_batches_is_warned_about(packed, caplog):
    _, out, manifest = packed
    urls, counts = shard_urls(out, manifest)
    for buffer, warned in ((16, True), (32, False)):
        caplog.clear()
        ShardReader(urls, counts, batch_size=4, collate=list, sampler=SamplerConfig(buffer=buffer))
        assert ("sampler.buffer 16 is under 8x the per-rank batch 4" in caplog.text) == warned
