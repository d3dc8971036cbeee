"""Every command in the README's fenced blocks and in each launch script's --help is run: in a
workspace shaped like a checkout after the demo (runs/demo/{corpus,shards,train}, the WebVid
CSVs and videos the README names), cheap commands for real and the rest (long trainings, the
demo, sweeps, benchmarks whose data is not here) parsed by the script's own parser with their
config loaded and their shards checked. Also: one process without a launcher trains as a world
of one and listens on 127.0.0.1 only."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from configs.schema import ShardConfig
from sharding.pack import pack
from tests.conftest import CIRR_ROOT, ROOT
from tests.tiny import write_tiny_config

pytestmark = pytest.mark.e2e
SCRIPTS = sorted(p.name for p in (ROOT / "launch").glob("*.py") if not p.name.startswith("_"))


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            commands += [part.strip() for part in line.split("&&") if "launch/" in part]
    return commands


def help_commands(script: str) -> list[str]:
    """Example lines of a script's docstring (its --help), continuation lines joined."""
    spec = importlib.util.spec_from_file_location(f"doc_{script[:-3]}", ROOT / "launch" / script)
    doc = _load(spec).__doc__
    commands = []
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(("python launch/", "deepspeed ")):
            commands.append(stripped)
        elif stripped.startswith("[") and commands and line.startswith("   "):
            commands[-1] += " " + stripped
    return [re.split(r"\s{2,}\(", c)[0] for c in commands]  # drop "   (explanations)"


def _load(spec):
    if str(ROOT / "launch") not in sys.path:
        sys.path.append(str(ROOT / "launch"))  # after the packages: launch/eval.py is not eval
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_command(command: str) -> tuple[str, list[str]]:
    """(script name, its arguments) with optional [...] groups and `...` dropped."""
    tokens, depth, kept = shlex.split(command, comments=True), 0, []
    for tok in tokens:
        opening = depth == 0 and tok.startswith("[")
        depth += tok.count("[") - tok.count("]")
        if not opening and depth == 0 and not tok.endswith("]") and tok != "...":
            kept.append(tok)
    i = next(i for i, t in enumerate(kept) if t.startswith("launch/") and t.endswith(".py"))
    return Path(kept[i]).name, kept[i + 1 :]


def substitute(args: list[str], ws: Path, n: int) -> list[str]:
    """Placeholders -> workspace paths; by the flag they follow where one name means several."""
    demo = "runs/demo"
    names = {
        "EXPORT": f"{demo}/train/export",
        "CIRR_ROOT": str(CIRR_ROOT),
        "FIQ_ROOT": "fiq",
        "CIRCO_ROOT": "circo",
        "CAPTIONS.csv": f"{demo}/corpus/captions.csv",
        "A.csv": f"{demo}/corpus/train.csv",
        "M.jsonl": f"{demo}/corpus/metadata.jsonl",
        "KEPT.csv": f"out{n}/kept.csv",
        "CSV": f"{demo}/corpus/train.csv",
        "K": "2",
        "N": "1",
        "S": "3",
        "H": "hosts",
        "BLIP2_DIR": "weights/blip2",
        "BLIP_DIR": "weights/blip",
    }
    by_flag = {
        "--video-root": "WebVid",
        "--cirr-root": str(CIRR_ROOT),
        "--out": f"out{n}",
        "--image-root": "images",
    }
    out = []
    for prev, tok in zip([None, *args], args):
        if tok == "DIR":
            tok = by_flag.get(prev, f"{demo}/shards/train")  # verify / groups DIR: a shard dir
        key, eq, value = tok.partition("=")
        if eq and not tok.startswith("-"):  # key=PLACEHOLDER
            tok = f"{key}={names.get(value, value)}"
        out.append(names.get(tok, tok))
    return out


def listening(pids) -> list[str]:
    return [
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


@pytest.fixture(scope="module")
def workspace(small_corpus, tmp_path_factory):
    """runs/demo as the demo leaves it (tiny), trained by one process without a launcher while
    its listening sockets are sampled; the raw data the README's commands name."""
    root, _ = small_corpus
    ws = tmp_path_factory.mktemp("ws")
    for name in ("launch", "configs"):
        (ws / name).symlink_to(ROOT / name)
    demo = ws / "runs" / "demo"
    shutil.copytree(root, demo / "corpus", symlinks=True)
    cfg = ShardConfig(samples_per_shard=5, target_frames=3, workers=1, seed=1)
    for split in ("train", "val", "test"):
        pack(root / f"{split}.csv", root / "videos", demo / "shards" / split, replace(cfg))
    (ws / "webvid2m-covr_train.csv").write_text((root / "train.csv").read_text())
    (ws / "webvid8m-covr_val.csv").write_text((root / "val.csv").read_text())
    (ws / "WebVid").symlink_to(root / "videos")
    (ws / "hosts").write_text("localhost slots=1\n")
    (ws / "weights" / "blip2").mkdir(parents=True)  # stands in for the downloaded weights
    (ws / "weights" / "blip").mkdir(parents=True)
    # stands in for launch/embed_targets.py's output (a deepspeed launch: parsed, not run here)
    (ws / "shards-emb").symlink_to(demo / "shards")
    tiny = ws / "tiny.yaml"
    write_tiny_config(tiny, demo / "shards", demo / "corpus" / "tokenizer")

    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    cmd = [
        sys.executable,
        "launch/train.py",
        "--config",
        str(tiny),
        f"train.out_dir={demo / 'train'}",
        "train.max_steps=3",
        "train.ckpt_every=0",
        "eval.report_queries=2",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    while proc.poll() is None:  # sample what the job (and its loader workers) listens on
        try:
            me = psutil.Process(proc.pid)
            seen += listening({me.pid} | {c.pid for c in me.children(recursive=True)})
        except psutil.Error:
            pass
        time.sleep(0.2)
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-4000:]
    return ws, seen, log


def test_one_process_without_launcher_is_a_world_of_one_on_loopback(workspace):
    ws, seen, log = workspace
    summary = json.loads((ws / "runs/demo/train/summary.json").read_text())
    assert summary["steps"] == 3 and (ws / "runs/demo/train/export/covr_config.json").is_file()
    assert "mpi4py" not in log and "MPI environment" not in log  # no MPI discovery
    assert seen and set(seen) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, set(seen)
    assert log.count('"mlflow_run_id"') == 1  # rank 0 prints the summary, once
    assert "faiss.loader" not in log


def test_every_readme_and_help_example_runs(workspace, monkeypatch):
    ws, _, _ = workspace
    from configs import load_config
    from tune.space import load_sweep

    examples = [("README", c) for c in readme_commands()]
    for script in SCRIPTS:
        found = help_commands(script)
        assert found, f"{script} --help shows no example"
        examples += [(f"{script} --help", c) for c in found]
    assert len(examples) >= 20
    monkeypatch.chdir(ws)
    failures = []
    for n, (source, command) in enumerate(examples):
        script, args = split_command(command)
        args = substitute(args, ws, n)
        module = _load(importlib.util.spec_from_file_location(f"ex_{n}", ws / "launch" / script))
        try:
            parsed = module.parser().parse_args(args)
        except SystemExit:
            failures.append(f"{source}: {command}\n  does not parse: {args}")
            continue
        real = command.startswith("python") and (
            script == "prepare.py"
            or (script == "shard.py" and parsed.command in ("pack", "verify"))
            or (script == "eval.py" and parsed.protocol == "webvid-covr")
        )
        if script == "prepare.py" and parsed.command == "synth":
            args += ["--videos", "20", "data.synth.size=32", "data.synth.frames=8"]  # quick
        if script == "shard.py" and parsed.command == "pack":
            args += ["shards.target_frames=3", "shards.workers=1"]
        if real:
            done = subprocess.run(
                [sys.executable, f"launch/{script}", *args],
                cwd=ws,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                failures.append(f"{source}: {command}\n  {done.stderr.strip()[-1500:]}")
            elif script == "eval.py":
                out = Path(parsed.out or f"runs/eval/webvid-covr-{parsed.split or 'test'}")
                results = json.loads((ws / out / "results.json").read_text())
                if results["split"] != Path(parsed.data).name:
                    failures.append(
                        f"{source}: {command}\n  labels {parsed.data} as {results['split']}"
                    )
            continue
        try:  # not run here: its settings load and the files it reads exist
            if script == "train.py":
                __import__("_bootstrap").preflight(load_config(parsed.config, parsed.overrides))
            elif script == "demo.py":
                load_config(parsed.config, parsed.overrides)
            elif script == "embed_targets.py":
                __import__("_bootstrap").preflight(load_config(parsed.config, parsed.overrides), ())
            elif script == "tune.py":
                load_sweep(parsed.config, parsed.overrides)
        except Exception as err:
            failures.append(f"{source}: {command}\n  {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def test_default_eval_output_is_ignored_by_git():
    for path in ("runs/eval/webvid-covr-test/results.json", "eval_out/results.json"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not ignored"


def test_packing_progress_is_labelled_by_split(small_corpus, tmp_path, capsys):
    root, _ = small_corpus
    cfg = ShardConfig(samples_per_shard=50, target_frames=2, workers=1)
    pack(root / "val.csv", root / "videos", tmp_path / "val", cfg, progress=True)
    assert "pack val" in capsys.readouterr().err
