"""End-to-end demo on the synthetic corpus.

  python launch/demo.py [--out DIR] [key=value ...]

1. generate the corpus (real H.264 mp4 files) and mine train/val/test triplets;
2. pack each split into WebDataset shards;
3. train with `deepspeed` on 2 local ranks (ZeRO-2, CPU/gloo here), tracked in MLflow;
4. evaluate the exported model on the held-out test split and write DIR/results.json.
Settings: configs/demo.yaml (+ key=value overrides).
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import _bootstrap

from configs import load_config
from configs.schema import CONFIG_DIR


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"))
    parser.add_argument("--ranks", type=int, default=2, help="local DeepSpeed ranks (default 2)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out).resolve()
    paths = [
        f"data.root={out / 'corpus'}",
        f"shards.dir={out / 'shards'}",
        f"model.tokenizer={out / 'corpus' / 'tokenizer'}",
        f"train.out_dir={out / 'train'}",
    ]
    overrides = paths + list(args.overrides)
    cfg = load_config(args.config, overrides)  # every setting checked before anything runs
    _bootstrap.setup_logging()
    from train.resume import check_before_start

    check_before_start(cfg)  # a demo in --out trained with other settings: refused, keys named

    from data.corpus import build_synthetic
    from eval.run import EvalJob, evaluate, resolve_checkpoint
    from sharding.pack import pack_splits
    from train.engine import model_device
    from train.export import load_exported
    from train.network import deepspeed_command
    from train.tracking import Tracker, where_to_look

    start = time.perf_counter()
    print(f"[1/4] synthetic corpus -> {cfg.data.root}", flush=True)
    corpus = build_synthetic(cfg.data.root, cfg.data.synth, cfg.data.mining, progress=True)

    print(f"[2/4] shards -> {cfg.shards.dir}", flush=True)
    for split, manifest in pack_splits(
        cfg.data.root, cfg.shards.dir, cfg.shards, progress=True
    ).items():
        print(f"      {split}: {manifest['totals']}", flush=True)

    print(f"[3/4] deepspeed training on {args.ranks} ranks -> {cfg.train.out_dir}", flush=True)
    script = Path(__file__).resolve().parent / "train.py"
    cmd = deepspeed_command(script, args.ranks, "--config", args.config, *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))}
    done = subprocess.run(cmd, env=env)
    if done.returncode:  # the ranks have said why
        return done.returncode
    summary = json.loads((Path(cfg.train.out_dir) / "summary.json").read_text())

    print("[4/4] held-out test evaluation", flush=True)
    job = EvalJob(
        protocol="webvid-covr",
        checkpoint=summary["export"],
        data=str(Path(cfg.shards.dir) / "test"),
        out_dir=str(out / "eval"),
        split="test",
        report=8,
        tracking_uri=summary["mlflow_tracking_uri"],
        experiment=cfg.tracking.experiment,
        run_id=summary["mlflow_run_id"],
    )
    tracker = Tracker(
        summary["mlflow_tracking_uri"],
        cfg.tracking.experiment,
        cfg.train.out_dir,
        run_id=summary["mlflow_run_id"],
    )
    model, tok = load_exported(resolve_checkpoint(job.checkpoint))
    model.to(model_device())
    evaluation = evaluate(job, model, tok, tracker)  # into the training run, report as artifacts
    test = {
        **evaluation["metrics"],
        "gallery_size": evaluation["gallery_size"],
        "queries": evaluation["queries"],
    }
    results = {
        "test": {k: round(test[k], 2) for k in ("R@1", "R@5", "R@10", "R@50")},
        "gallery_size": test["gallery_size"],
        "queries": test["queries"],
        "val": summary["val"],
        "steps": summary["steps"],
        "corpus": corpus,
        "mlflow_tracking_uri": summary["mlflow_tracking_uri"],
        "mlflow_run_id": summary["mlflow_run_id"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    tracker.log_artifact(out / "results.json")
    tracker.finish()

    print(f"\nheld-out test ({test['queries']} queries, gallery of {test['gallery_size']} videos):")
    print(
        "  " + "  ".join(f"{k} {results['test'][k]:6.2f}" for k in ("R@1", "R@5", "R@10", "R@50"))
    )
    print(f"  chance R@1 {100 / test['gallery_size']:.2f}")
    print(where_to_look("run", summary["mlflow_run_id"], summary["mlflow_tracking_uri"]))
    print(f"wrote {out / 'results.json'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    _bootstrap.run(main)
