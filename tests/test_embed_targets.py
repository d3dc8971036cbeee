"""The embed step: targets (frames and captions) embedded once by the frozen starting model into
the shards, read back by training; resumable; refused when from another model."""

import io
import json
import os
from functools import partial

import numpy as np
import pytest
import torch

from configs import load_config
from configs.schema import LossConfig, ShardConfig
from sharding import format as fmt
from sharding.batch import Task, collate
from sharding.embed import EmbedError, check_embedded, embed_dir
from sharding.manifest import read_manifest
from sharding.pack import pack
from sharding.reader import ShardReader, iter_records, shard_urls
from sharding.writer import ShardMismatch

SHARDS = ShardConfig(samples_per_shard=4, target_frames=3, workers=1, seed=2)


def tiny_overrides(tokenizer) -> list[str]:
    return [
        f"model.tokenizer={tokenizer}",
        "model.num_query_tokens=4",
        "model.embed_dim=16",
        "model.max_text_len=12",
        "model.vision.hidden_size=32",
        "model.vision.layers=1",
        "model.vision.heads=2",
        "model.vision.intermediate_size=64",
        "model.vision.image_size=32",
        "model.vision.patch_size=8",
        "model.text.hidden_size=32",
        "model.text.layers=1",
        "model.text.heads=2",
        "model.text.intermediate_size=64",
        "model.text.cross_attention_frequency=1",
        "model.text.max_position_embeddings=64",
    ]


@pytest.fixture(scope="module")
def packed(small_corpus, tmp_path_factory):
    root, _ = small_corpus
    base = tmp_path_factory.mktemp("embed")
    for split in ("train", "val"):
        pack(root / f"{split}.csv", root / "videos", base / "shards" / split, SHARDS)
    return root, base


@pytest.fixture(scope="module")
def embedded(packed):
    from train.embedder import embed_targets

    root, base = packed
    cfg = load_config(None, tiny_overrides(root / "tokenizer"))
    manifests = embed_targets(cfg, base / "shards", base / "emb")
    return cfg, base, manifests


def _records(shard_dir):
    return list(iter_records(shard_urls(shard_dir, read_manifest(shard_dir))[0]))


def _starting_model(cfg):
    from train.loop import build_model_and_tokenizer

    torch.manual_seed(cfg.train.seed)  # as training builds it
    return build_model_and_tokenizer(cfg)


def test_targets_and_captions_are_the_frozen_starting_models(embedded):
    from data.text import tokenize
    from data.video import to_model_input

    cfg, base, manifests = embedded
    model, tok = _starting_model(cfg)
    model.eval()
    assert set(manifests) == {"train", "val"}
    for split in ("train", "val"):
        source, out = _records(base / "shards" / split), _records(base / "emb" / split)
        assert [r["__key__"] for r in out] == [r["__key__"] for r in source]
        manifest = manifests[split]
        assert manifest["embedded"]["fingerprint"] == model.target_fingerprint()
        assert (
            manifest["totals"]["samples"]
            == read_manifest(base / "shards" / split)["totals"]["samples"]
        )
        for src, rec in zip(source, out):
            meta = fmt.record_meta(rec)
            assert meta == fmt.record_meta(src) and fmt.target_jpegs(rec) == []
            assert fmt.target_picture(rec) == fmt.target_picture(src)  # kept for reports
            for j in range(len(meta["triplets"])):  # query frames byte for byte
                assert fmt.query_jpegs(rec, j) == fmt.query_jpegs(src, j)
            target = fmt.decode_npy(rec[fmt.EMBEDDINGS])
            assert target.dtype == np.float16 and target.shape == (3, 4, 16)
            frames = to_model_input(fmt.decode_frames(fmt.target_jpegs(src)), 32)
            with torch.no_grad():
                want = model(Task.ENCODE_TARGET_FRAMES, frames).numpy()
                text = tokenize(tok, [t["txt2"] for t in meta["triplets"]], cfg.model.max_text_len)
                captions = model(Task.ENCODE_CAPTION, text.input_ids, text.attention_mask).numpy()
            assert np.abs(target.astype(np.float32) - want).max() < 2e-3
            got = fmt.decode_npy(rec[fmt.CAPTIONS]).astype(np.float32)
            assert got.shape == captions.shape and np.abs(got - captions).max() < 2e-3


def test_training_reads_them_and_the_loss_is_the_frame_loss(embedded):
    from train.objective import covr_loss

    cfg, base, _ = embedded
    model, tok = _starting_model(cfg)
    model.eval()  # no dropout: the two batches must give the same loss
    batch_of = partial(collate, tokenizer=tok, image_size=32, max_text_len=cfg.model.max_text_len)

    def batch(split_dir):
        samples = [fmt.decode_sample(fmt.raw_triplet(r, 0)) for r in _records(split_dir)[:6]]
        return batch_of(samples)

    frames, emb = batch(base / "shards" / "train"), batch(base / "emb" / "train")
    assert "target_frames" in frames and "target_embeddings" in emb
    assert emb["caption_embeddings"].shape == (6, 16)
    loss_cfg = LossConfig(video_weight=0.5, caption_weight=0.5)
    loss_frames, m_frames = covr_loss(model, frames, loss_cfg)
    loss_emb, m_emb = covr_loss(model, emb, loss_cfg)
    assert abs(loss_frames.item() - loss_emb.item()) < 2e-3
    assert abs(m_frames["loss_caption"].item() - m_emb["loss_caption"].item()) < 2e-3
    loss_emb.backward()  # the query side learns; nothing on the target side has a gradient
    assert any(p.grad is not None for p in model.hf.qformer.parameters())
    assert all(p.grad is None for p in model.frozen_target.parameters())
    # the training reader streams the embedded records
    urls, counts = shard_urls(base / "emb" / "train", read_manifest(base / "emb" / "train"))
    reader = ShardReader(urls, counts, batch_size=4, collate=batch_of)
    first, _ = next(iter(reader))
    assert first["target_embeddings"].shape == (4, 3, 4, 16) and "caption_embeddings" in first


def test_embeddings_from_another_model_or_for_a_trained_target_encoder_are_refused(embedded):
    from train.loop import build_model_and_tokenizer

    cfg, base, manifests = embedded
    torch.manual_seed(cfg.train.seed + 1)  # other starting weights
    other, _ = build_model_and_tokenizer(cfg)
    with pytest.raises(ValueError, match="from another model"):
        check_embedded(manifests["train"], base / "emb" / "train", other)
    trained = load_config(
        None, tiny_overrides(cfg.model.tokenizer) + ["model.train_target_encoder=true"]
    )
    model, _ = _starting_model(trained)
    with pytest.raises(ValueError, match="train_target_encoder=true needs the target frames"):
        check_embedded(manifests["train"], base / "emb" / "train", model)
    with pytest.raises(EmbedError, match="already embedded"):
        embed_dir(base / "emb" / "train", base / "twice", _FakeEncoder())


class _FakeEncoder:
    """Deterministic, cheap, and counts its calls."""

    info: dict = {}

    def __init__(self, fingerprint="fake"):
        self.fingerprint, self.frame_calls = fingerprint, 0

    def frames(self, frames):
        self.frame_calls += 1
        return np.broadcast_to(frames.mean((1, 2))[:, None, :], (len(frames), 2, 3)).astype(
            np.float16
        )

    def captions(self, texts):
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float16)


def test_finished_shards_are_skipped_and_a_killed_shard_is_redone(packed, tmp_path):
    _, base = packed
    src, out = base / "shards" / "train", tmp_path / "emb"
    first = embed_dir(src, out, _FakeEncoder(), frames_per_batch=1)
    names = [s["name"] for s in first["shards"]]
    assert len(names) >= 3
    mtimes = {n: (out / f"{n}.tar").stat().st_mtime_ns for n in names}
    # a kill while shard 1 was written: no stats file, a partial .tmp
    (out / f"{names[1]}.stats.json").unlink()
    (out / f"{names[1]}.tar").unlink()
    (out / f"{names[1]}.tar.tmp").write_bytes(b"partial")
    again = _FakeEncoder()
    second = embed_dir(src, out, again, frames_per_batch=1)
    assert again.frame_calls == first["shards"][1]["samples"]  # only shard 1's records
    assert second["shards"] == first["shards"] and not (out / f"{names[1]}.tar.tmp").exists()
    assert all((out / f"{n}.tar").stat().st_mtime_ns == mtimes[n] for n in names if n != names[1])
    nothing = _FakeEncoder()
    embed_dir(src, out, nothing)
    assert nothing.frame_calls == 0
    with pytest.raises(ShardMismatch, match="other inputs, settings or model"):
        embed_dir(src, out, _FakeEncoder("other"))


def test_two_ranks_split_the_shards(packed, tmp_path):
    _, base = packed
    src, out = base / "shards" / "train", tmp_path / "emb"
    encoders = [_FakeEncoder(), _FakeEncoder()]
    results = {}
    # rank 1 first, then rank 0 with a gather that hands it rank 1's shards
    results[1] = embed_dir(src, out, encoders[1], rank=1, world=2, gather=lambda mine: [None, mine])
    assert results[1] is None
    done_1 = json.loads(json.dumps(sorted(p.name for p in out.glob("*.stats.json"))))
    n = len(read_manifest(src)["shards"])
    assert len(done_1) == n // 2  # shards 1, 3, ...
    stats_1 = {
        p.name.removesuffix(".stats.json"): json.loads(p.read_text())
        for p in out.glob("*.stats.json")
    }
    from sharding.writer import ShardStats

    manifest = embed_dir(
        src,
        out,
        encoders[0],
        rank=0,
        world=2,
        gather=lambda mine: [mine, {k: ShardStats(**v) for k, v in stats_1.items()}],
    )
    assert [s["name"] for s in manifest["shards"]] == [
        s["name"] for s in read_manifest(src)["shards"]
    ]
    reference = embed_dir(src, tmp_path / "one", _FakeEncoder())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert np.load(io.BytesIO(_records(out)[0][fmt.EMBEDDINGS])).shape == (3, 2, 3)


@pytest.mark.e2e
def test_two_gloo_ranks_through_the_launcher_and_a_killed_job_resumes(embedded, tmp_path):
    """`deepspeed launch/embed_targets.py` on 2 ranks gives the one-process result; killed after
    some shards and run again, it keeps the finished shards and completes the rest."""
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT
    from train.network import deepspeed_command, start_job

    cfg, base, reference = embedded
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    overrides = tiny_overrides(cfg.model.tokenizer)

    def launch(out, wait=True):
        args = ("--config", cfg_file, "--src", base / "shards", "--out", out)
        args += ("--frames-per-batch", "3", *overrides)
        proc = start_job(deepspeed_command(ROOT / "launch/embed_targets.py", 2, *args), ROOT)
        if wait:
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, log[-3000:]
        return proc

    out = tmp_path / "emb"
    proc = launch(out, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "train").glob("*.stats.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    total = len(reference["train"]["shards"])
    assert 0 < len(done) < total and not (out / "train" / "manifest.json").exists()
    launch(out)
    for split in ("train", "val"):
        manifest = read_manifest(out / split)
        assert [s["name"] for s in manifest["shards"]] == [
            s["name"] for s in reference[split]["shards"]
        ]
        assert manifest["embedded"]["fingerprint"] == reference[split]["embedded"]["fingerprint"]
        for got, want in zip(_records(out / split), _records(base / "emb" / split)):
            assert got["__key__"] == want["__key__"] and got[fmt.CAPTIONS] is not None
            a, b = (fmt.decode_npy(r[fmt.EMBEDDINGS]).astype(np.float32) for r in (got, want))
            assert np.abs(a - b).max() < 1e-3
    kept = [p for p, t in done.items() if p.stat().st_mtime_ns == t]
    assert len(kept) == len(done) < total  # shards finished before the kill were not redone

    # then training reads them (CoVR-2's caption term from the stored embeddings) ...
    train = deepspeed_command(
        ROOT / "launch/train.py",
        1,
        "--config",
        cfg_file,
        f"shards.dir={out}",
        "shards.loader_workers=1",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.epochs=1",
        "loss.video_weight=0.5",
        "loss.caption_weight=0.5",
        "eval.ks=[1,5]",
        "eval.report_queries=2",
        "deepspeed.zero_stage=0",
        *overrides,
    )
    done = subprocess.run(
        [*train, f"train.out_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and "R@1" in summary["val"]
    assert (tmp_path / "run" / "report" / "index.html").is_file()  # targets shown by thumbnail
    # ... and refuse them for another starting model (here: other random weights)
    other = subprocess.run(
        [*train, f"train.out_dir={tmp_path / 'other'}", "train.seed=99"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        other.returncode != 0
        and "target embeddings from another model" in other.stdout + other.stderr
    )


def test_an_undecodable_target_is_skipped_and_counted_or_refused_in_a_test_split(packed, tmp_path):
    from webdataset import TarWriter

    from sharding.reader import read_shard

    _, base = packed
    source = read_manifest(base / "shards" / "train")
    entry = source["shards"][0]
    records = list(read_shard(str(base / "shards" / "train" / f"{entry['name']}.tar")))
    records[0]["t00.jpg"] = b"not a jpeg"
    src = tmp_path / "src"
    src.mkdir()
    with (src / f"{entry['name']}.tar").open("wb") as f:
        writer = TarWriter(f, encoder=False)
        for r in records:
            writer.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})
        writer.close()
    for split in ("train", "test"):
        (src / "manifest.json").write_text(
            json.dumps({**source, "split": split, "shards": [entry]})
        )
        if split == "test":
            with pytest.raises(EmbedError, match="loses nothing"):
                embed_dir(src, tmp_path / split, _FakeEncoder())
            continue
        out = embed_dir(src, tmp_path / split, _FakeEncoder())
        assert out["shards"][0]["samples"] == len(records) - 1
        assert out["totals"]["skipped_records"] == source["totals"]["skipped_records"] + 1
        assert out["skipped"][-1]["key"] == records[0]["__key__"]
