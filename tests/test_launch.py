import subprocess
import sys
import time

import pytest

from data.webvid_covr import read_annotations
from tests.conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "launch").glob("*.py") if not p.name.startswith("_"))


def run(*args, check=True):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_launch_script_answers_help(script):
    assert "usage" in run(script, "--help").stdout


def test_prepare_synth_then_filter(tmp_path):
    out = tmp_path / "corpus"
    run(
        ROOT / "launch/prepare.py",
        "synth",
        "--out",
        out,
        "--videos",
        30,
        "--seed",
        3,
        "data.synth.size=32",
        "data.synth.frames=8",
    )
    assert len(list((out / "videos").rglob("*.mp4"))) == 30
    train = read_annotations(out / "train.csv")
    proc = run(
        ROOT / "launch/prepare.py",
        "filter",
        "--annotations",
        out / "train.csv",
        "--metadata",
        out / "metadata.jsonl",
        "--out",
        tmp_path / "kept.csv",
    )
    kept = read_annotations(tmp_path / "kept.csv")
    assert 0 < len(kept) <= len(train)
    assert f"kept {len(kept)} / {len(train)} triplets" in proc.stdout


def test_prepare_mine_from_caption_table(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        '1,u,PT1S,d,"A dog, on grass"\n2,u,PT1S,d,"A cat, on grass"\n3,u,PT1S,d,Sunset\n'
    )
    run(
        ROOT / "launch/prepare.py",
        "mine",
        "--captions",
        table,
        "--out",
        tmp_path,
        "data.mining.val_fraction=0",
        "data.mining.test_fraction=0",
    )
    rows = read_annotations(tmp_path / "train.csv")
    assert {(r.pth1, r.pth2) for r in rows} == {("d/1", "d/2"), ("d/2", "d/1")}


def test_bad_override_is_one_clear_error(tmp_path):
    proc = run(
        ROOT / "launch/prepare.py", "synth", "--out", tmp_path, "data.synth.vidoes=3", check=False
    )
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "data.synth.vidoes" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- expected errors: one line on stderr, exit 2, no traceback, before any heavy import ------

TINY_SHARDS_CONFIG = "shards: {{dir: {shards}}}\nmodel: {{tokenizer: {tok}}}\n"


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def shard_tree(tmp_path):
    """A config whose shard dirs hold a manifest (listing one present shard) and a tokenizer."""
    for split in ("train", "val"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "covr-000000.tar").write_bytes(b"")
        (tmp_path / "shards" / split / "manifest.json").write_text(
            '{"shards": [{"name": "covr-000000", "samples": 1}]}'
        )
    (tmp_path / "tok").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY_SHARDS_CONFIG.format(shards=tmp_path / "shards", tok=tmp_path / "tok"))
    return path


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("train.log_every=0", "train.log_every"),
        ("train.epochs=0", "train.epochs"),
        ("train.max_steps=-5", "train.max_steps"),
        ("train.eval_every=-1", "train.eval_every"),
        ("queue.momentum=2", "queue.momentum"),
        ("deepspeed.timeout_s=0", "deepspeed.timeout_s"),
    ],
)
def test_train_refuses_a_bad_value_before_anything_starts(shard_tree, override, key):
    start = time.perf_counter()
    proc = run(ROOT / "launch/train.py", "--config", shard_tree, override, check=False)
    one_line_error(proc, "config error", f"key '{key}'")
    assert time.perf_counter() - start < 10  # no torch / deepspeed start-up before the check


def test_train_preflight_names_a_missing_manifest_and_missing_shards(shard_tree, tmp_path):
    proc = run(
        ROOT / "launch/train.py",
        "--config",
        shard_tree,
        f"shards.dir={tmp_path / 'no'}",
        check=False,
    )
    one_line_error(proc, "key 'shards.dir'", "manifest.json")
    (tmp_path / "shards" / "val" / "covr-000000.tar").unlink()
    proc = run(ROOT / "launch/train.py", "--config", shard_tree, check=False)
    one_line_error(proc, "1 of 1 shards missing", "covr-000000.tar")
    proc = run(
        ROOT / "launch/train.py", "--config", shard_tree, "train.init_from=/no/export", check=False
    )
    one_line_error(proc, "key 'train.init_from'")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch_size: [1, 2\noptim: {lr: 1}\n")
    line = one_line_error(run(ROOT / "launch/train.py", "--config", bad, check=False))
    assert line.startswith(f"config error: {bad}:4: YAML syntax error")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: x.yaml\nspace: {a: [1\n")
    one_line_error(run(ROOT / "launch/tune.py", "--config", sweep, check=False), f"{sweep}:")


def test_shard_verify_of_a_missing_dir_is_one_line(tmp_path):
    proc = run(ROOT / "launch/shard.py", "verify", tmp_path / "missing", check=False)
    one_line_error(proc, "error: no manifest.json in", "missing")


def test_bad_annotations_and_missing_checkpoint_are_one_line(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("pth1,pth2,txt1,txt2,edit,scores,sim_txt\na,b,x,y,z,notalist,\n")
    proc = run(
        ROOT / "launch/prepare.py",
        "filter",
        "--annotations",
        csv,
        "--metadata",
        tmp_path / "m.jsonl",
        "--out",
        tmp_path / "k.csv",
        check=False,
    )
    one_line_error(proc, "annotation error", "a.csv")
    proc = run(
        ROOT / "launch/eval.py",
        "--protocol",
        "webvid-covr",
        "--checkpoint",
        tmp_path / "none",
        "--data",
        tmp_path,
        check=False,
    )
    one_line_error(proc, "no exported CoVR model")


def test_our_error_classes_are_expected_and_one_line(monkeypatch, capsys):
    sys.path.append(str(ROOT / "launch"))  # after the packages: launch/eval.py is not eval
    import _bootstrap

    from configs import ConfigError
    from data.benchmarks import BenchmarkFormatError
    from data.webvid_covr import AnnotationError, MissingVideosError
    from sharding.reader import ShardURLError
    from train.lavis import CheckpointMappingError

    errors = [
        ConfigError("key 'x'"),
        AnnotationError("f.csv:3: bad"),
        BenchmarkFormatError("b"),
        MissingVideosError("test", ["v/1.mp4", "v/2.mp4"]),
        ShardURLError("pipe:"),
        CheckpointMappingError("a\nb"),
        FileNotFoundError("no such file"),
    ]
    for err in errors:
        assert _bootstrap.expected(err), err
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert _bootstrap.fail(err) == 2
        out = capsys.readouterr().err
        assert out.count("\n") == 1 and str(err).splitlines()[0] in out
    assert "missing videos error" in _bootstrap.label(errors[3]) + ""
    for err in (ZeroDivisionError("bug"), KeyError("k"), RuntimeError("x")):
        assert not _bootstrap.expected(err)  # a bug keeps its traceback


def test_eval_launcher_choices_match_the_library():
    sys.path.append(str(ROOT / "launch"))  # after the packages: launch/eval.py is not eval
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_launcher", ROOT / "launch/eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from eval.protocols import PROTOCOLS
    from eval.search import INDEX_KINDS

    assert tuple(module.PROTOCOLS) == tuple(PROTOCOLS)
    assert tuple(module.INDEX_KINDS) == tuple(INDEX_KINDS)
    assert module.default_split("webvid-covr", "runs/demo/shards/test") == "test"
    assert module.default_split("cirr", "CIRR/test") == "val"
    from data.video_benchmarks import EGOCVR_TEXTS
    from eval.protocols import CIRCO_TEXTS, CIRR_GALLERIES, CIRR_SUBSET_CREDITS, FASHIONIQ_GALLERIES
    from eval.video_protocols import TFCOVR_GALLERIES

    actions = {a.dest: a for a in module.parser()._actions}
    for dest, library in (
        ("cirr_gallery", CIRR_GALLERIES),
        ("cirr_subset_credit", CIRR_SUBSET_CREDITS),
        ("fashioniq_gallery", FASHIONIQ_GALLERIES),
        ("circo_text", CIRCO_TEXTS),
        ("tfcovr_gallery", TFCOVR_GALLERIES),
        ("egocvr_text", EGOCVR_TEXTS),
    ):
        assert tuple(actions[dest].choices) == tuple(library), dest
    args = module.parser().parse_args(
        ["--protocol", "cirr", "--checkpoint", "c", "--data", "d", "--cirr-gallery", "folder"]
    )
    assert (args.cirr_gallery, args.cirr_subset_credit) == ("folder", "hard")
