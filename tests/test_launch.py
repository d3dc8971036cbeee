import subprocess
import sys

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
    run(ROOT / "launch/prepare.py", "synth", "--out", out, "--videos", 30, "--seed", 3,
        "data.synth.size=32", "data.synth.frames=8")  # fmt: skip
    assert len(list((out / "videos").rglob("*.mp4"))) == 30
    train = read_annotations(out / "train.csv")
    proc = run(ROOT / "launch/prepare.py", "filter", "--annotations", out / "train.csv",
               "--metadata", out / "metadata.jsonl", "--out", tmp_path / "kept.csv")  # fmt: skip
    kept = read_annotations(tmp_path / "kept.csv")
    assert 0 < len(kept) <= len(train)
    assert f"kept {len(kept)} / {len(train)} triplets" in proc.stdout


def test_prepare_mine_from_caption_table(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        '1,u,PT1S,d,"A dog, on grass"\n2,u,PT1S,d,"A cat, on grass"\n3,u,PT1S,d,Sunset\n'
    )
    run(ROOT / "launch/prepare.py", "mine", "--captions", table, "--out", tmp_path,
        "data.mining.val_fraction=0", "data.mining.test_fraction=0")  # fmt: skip
    rows = read_annotations(tmp_path / "train.csv")
    assert {(r.pth1, r.pth2) for r in rows} == {("d/1", "d/2"), ("d/2", "d/1")}


def test_bad_override_is_one_clear_error(tmp_path):
    proc = run(ROOT / "launch/prepare.py", "synth", "--out", tmp_path, "data.synth.vidoes=3",
               check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "data.synth.vidoes" in proc.stderr
    assert "Traceback" not in proc.stderr
