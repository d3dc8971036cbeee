"""The reference's released target embeddings (one .pth per video, BLIP-2 and BLIP layouts) read
into embedded shards; used only by a model that says so, never mixed with our own."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.schema import ShardConfig
from data.webvid_covr import read_annotations
from sharding import format as fmt
from sharding.embed import EmbedError, check_embedded
from sharding.manifest import read_manifest
from sharding.pack import pack
from sharding.reader import iter_records, shard_urls
from sharding.released import ReleasedFileError, import_released, load_released
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ShardConfig(samples_per_shard=4, target_frames=3, workers=1, seed=2)
FRAMES, TOKENS, DIMS = 15, 4, 16  # the tiny BLIP-2's (Q, D); the reference saves 15 frames


def _released_value(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return F.normalize(torch.randn(FRAMES, TOKENS, DIMS, generator=g), dim=-1)


def _records(shard_dir):
    return list(iter_records(shard_urls(shard_dir, read_manifest(shard_dir))[0]))


@pytest.fixture(scope="module")
def release(small_corpus, tmp_path_factory):
    """Packed train / val / test, and the released files of every target but one train one."""
    root, _ = small_corpus
    base = tmp_path_factory.mktemp("released")
    emb = base / "blip2-vid-embs-large-all"
    texts = set()
    for split in ("train", "val", "test"):
        pack(root / f"{split}.csv", root / "videos", base / "shards" / split, SHARDS)
        for t in read_annotations(root / f"{split}.csv"):
            (emb / t.pth2).parent.mkdir(parents=True, exist_ok=True)
            torch.save(_released_value(t.pth2), emb / f"{t.pth2}.pth")
            texts.add(t.txt2)
    victim = read_annotations(root / "train.csv")[0].pth2
    (emb / f"{victim}.pth").unlink()
    texts = sorted(texts)
    feats = F.normalize(torch.randn(len(texts), DIMS, generator=torch.Generator().manual_seed(1)))
    torch.save({"texts": texts, "feats": feats}, base / "txt2_train.pth")
    return root, base, emb, victim, dict(zip(texts, feats))


def test_released_targets_and_captions_land_in_embedded_shards(release, tmp_path):
    _, base, emb, victim, captions = release
    src = base / "shards" / "train"
    manifest = import_released(src, emb, tmp_path / "train", base / "txt2_train.pth")
    embedded = manifest["embedded"]
    assert embedded["released"] and embedded["layout"] == [TOKENS, DIMS]
    assert embedded["fingerprint"].startswith("released-") and embedded["dir"] == str(emb)
    lost = [s for s in manifest["skipped"] if s["video"] == victim]
    assert len(lost) == 1 and "file not found" in lost[0]["reason"]
    assert manifest["totals"]["samples"] == read_manifest(src)["totals"]["samples"] - 1
    source = {r["__key__"]: r for r in _records(src)}
    for rec in _records(tmp_path / "train"):
        meta = fmt.record_meta(rec)
        target = fmt.decode_npy(rec[fmt.EMBEDDINGS])
        want = _released_value(meta["target"]).numpy()
        assert target.dtype == np.float16 and np.abs(target - want).max() < 1e-3
        got = fmt.decode_npy(rec[fmt.CAPTIONS]).astype(np.float32)
        want = np.stack([captions[t["txt2"]].numpy() for t in meta["triplets"]])
        assert np.abs(got - want).max() < 1e-3
        for j in range(len(meta["triplets"])):  # query frames byte for byte
            assert fmt.query_jpegs(rec, j) == fmt.query_jpegs(source[rec["__key__"]], j)
    again = import_released(src, emb, tmp_path / "train", base / "txt2_train.pth")
    assert again["shards"] == manifest["shards"]  # a rerun keeps the finished shards


def test_released_files_in_every_layout_or_refused(tmp_path):
    torch.save(torch.ones(15, 256), tmp_path / "blip.pth")  # BLIP: projected CLS per frame
    assert load_released(tmp_path / "blip.pth").shape == (15, 1, 256)
    torch.save(torch.ones(15, 32, 256), tmp_path / "blip2.pth")
    assert load_released(tmp_path / "blip2.pth").dtype == np.float16
    bad = {
        "tokens.pth": (torch.ones(2, 577, 1024), "raw ViT tokens"),
        "dict.pth": ({"feats": torch.ones(2, 3)}, "holds dict"),
        "nan.pth": (torch.full((2, 3, 4), float("nan")), "NaN"),
        "flat.pth": (torch.ones(4), "not \\(frames"),
    }
    for name, (value, message) in bad.items():
        torch.save(value, tmp_path / name)
        with pytest.raises(ReleasedFileError, match=message):
            load_released(tmp_path / name)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ReleasedFileError, match="junk.pth: not a released embedding file"):
        load_released(tmp_path / "junk.pth")

    class Runs:  # a pickle that would run code: weights-only loading refuses it
        def __reduce__(self):
            return (print, ("ran",))

    torch.save(Runs(), tmp_path / "code.pth")
    with pytest.raises(ReleasedFileError, match="code.pth"):
        load_released(tmp_path / "code.pth")


def test_a_test_split_missing_a_released_file_is_refused(release, tmp_path):
    root, base, emb, _, _ = release
    victim = read_annotations(root / "test.csv")[0].pth2
    held = tmp_path / "held.pth"
    (emb / f"{victim}.pth").rename(held)
    try:
        with pytest.raises(EmbedError, match="--subset"):
            import_released(base / "shards" / "test", emb, tmp_path / "test")
    finally:
        held.rename(emb / f"{victim}.pth")


def test_models_use_released_targets_only_when_told_and_never_mixed(release, tmp_path):
    _, base, emb, _, _ = release
    import_released(base / "shards" / "val", emb, tmp_path / "val")
    released = read_manifest(tmp_path / "val")
    own = {**released, "embedded": {"source": "x", "fingerprint": "abc"}}
    jpeg = read_manifest(base / "shards" / "val")
    model, _ = tiny_model(tmp_path / "a", "blip2")
    with pytest.raises(EmbedError, match="model.released_targets=true to use them"):
        check_embedded(released, tmp_path / "val", model)
    model.cfg.released_targets = True
    check_embedded(released, tmp_path / "val", model)
    for manifest, held in ((own, "our own target embeddings"), (jpeg, "target frames")):
        with pytest.raises(EmbedError, match=f"holds {held}.*never mixed"):
            check_embedded(manifest, "shards", model)
    blip, _ = tiny_model(tmp_path / "b", "blip", released_targets=True)
    with pytest.raises(EmbedError, match=r"\(4, 16\); this model's targets are \(1, 16\)"):
        check_embedded(released, tmp_path / "val", blip)


def test_launch_shard_import_released_errors_are_one_line(release, tmp_path):
    _, base, _, _, _ = release
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = ["python", "launch/shard.py", "import-released", str(base / "shards" / "val")]
    done = subprocess.run(
        [*cmd, "--embeddings", str(empty), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no .pth file under" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_training_and_evaluation_run_on_released_targets(release, tmp_path):
    """`deepspeed launch/train.py` on released train / val targets with
    model.released_targets=true, its export evaluated on the released test split; the same run
    without the setting, or the export on our own test shards, is refused in one line."""
    from tests.test_embed_targets import tiny_overrides
    from train.network import deepspeed_command

    root, base, emb, _, _ = release
    shards = tmp_path / "shards"
    for split in ("train", "val", "test"):
        import_released(base / "shards" / split, emb, shards / split)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    train = deepspeed_command(
        ROOT / "launch/train.py",
        1,
        "--config",
        cfg_file,
        f"shards.dir={shards}",
        "shards.loader_workers=1",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.epochs=1",
        "eval.ks=[1,5]",
        "deepspeed.zero_stage=0",
        *tiny_overrides(root / "tokenizer"),
    )

    def run(cmd):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    refused = run([*train, f"train.out_dir={tmp_path / 'refused'}"])
    assert refused.returncode == 2
    assert "model.released_targets=true to use them" in refused.stderr
    done = run([*train, f"train.out_dir={tmp_path / 'run'}", "model.released_targets=true"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and "R@1" in summary["val"]
    evaluate = ["python", "launch/eval.py", "--protocol", "webvid-covr", "--checkpoint"]
    evaluate += [str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--data"]
    done = run([*evaluate, str(shards / "test")])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["split"] == "test" and not result["subset"] and "R@1" in result["metrics"]
    mixed = run([*evaluate, str(base / "shards" / "test")])
    assert mixed.returncode == 2 and "never mixed" in mixed.stderr


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_launch_eval_reads_a_released_covr_checkpoint_of_exactly_its_keys(
    small_corpus, tmp_path, arch
):
    """A checkpoint file holding exactly the reference model's keys, evaluated by one command
    with the recipe's config, scores as the same weights exported and evaluated."""
    from configs import load_config
    from tests.test_coverage import _fashioniq_root
    from tests.test_embed_targets import tiny_overrides
    from tests.test_lavis import _reference_state, _write
    from train.export import export_model
    from train.loop import build_model_and_tokenizer

    root, _ = small_corpus
    overrides = [*tiny_overrides(root / "tokenizer"), f"model.arch={arch}"]
    cfg = load_config(None, overrides)
    model, tok = build_model_and_tokenizer(cfg)
    ckpt = tmp_path / "covr.ckpt"
    _write("fabric", _reference_state(cfg.model, len(tok), seed=3), ckpt)
    _fashioniq_root(tmp_path / "fiq")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    cmd = ["python", "launch/eval.py", "--protocol", "fashioniq", "--data", str(tmp_path / "fiq")]
    cmd += ["--categories", "dress,shirt", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]

    def run(*args):
        done = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        return done

    done = run("--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--config", str(cfg_file))
    # the model is the recipe's: here its overrides name the tokenizer and the tiny sizes
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.tokenizer" in done.stderr.strip().splitlines()[-1]
    done = run(
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "a"),
        "--config",
        str(cfg_file),
        *overrides,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{ckpt}: not in the checkpoint, unused by CoVR" in done.stderr  # read onto the model
    from_file = json.loads((tmp_path / "a" / "results.json").read_text())
    assert from_file["checkpoint"] == str(ckpt)
    cfg.model.lavis_checkpoint = str(ckpt)
    loaded, tok = build_model_and_tokenizer(cfg)
    export_model(loaded.state_dict(), loaded.cfg, tok, tmp_path / "export")
    done = run("--checkpoint", str(tmp_path / "export"), "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads((tmp_path / "b" / "results.json").read_text())
    assert from_file["metrics"] == pytest.approx(exported["metrics"])
    other = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "d"), "--config", str(cfg_file)]
    other = run(*other, *overrides, "model.embed_dim=8")  # not the checkpoint's sizes
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "shape" in other.stderr.strip().splitlines()[-1]
    stray = run("--checkpoint", str(tmp_path / "export"), "--out", str(tmp_path / "c"), "x=1")
    assert stray.returncode == 2 and "carries its own" in stray.stderr
