"""Evaluate an exported CoVR model on a benchmark protocol; results as JSON, logged to MLflow.

  python launch/eval.py --protocol webvid-covr --checkpoint runs/demo/train --data runs/demo/shards/test
  python launch/eval.py --protocol cirr --checkpoint EXPORT --data CIRR_ROOT --split val --report 8
  deepspeed --num_accelerators 2 launch/eval.py --protocol webvid-covr --checkpoint runs/demo/train --data runs/demo/shards/test
      (under deepspeed each rank embeds its share of the items)

Protocols: webvid-covr (DATA = a split's shard dir; the split is the dir's name), cirr (DATA =
root with captions/, image_splits/, img_raw/), fashioniq (root with captions/, image_splits/,
images/), circo (root with annotations/ and the COCO unlabeled images). Test splits write the
submission files. CHECKPOINT is an export/ dir or a training run dir holding one, or a released
CoVR / CoVR-2 checkpoint file (LAVIS .pth, Lightning / Fabric .ckpt), then read onto the model
that --config and key=value overrides describe (docs/DATASETS.md has one command per benchmark):

  python launch/eval.py --protocol cirr --checkpoint covr2.ckpt --config configs/covr2_blip2.yaml model.pretrained=BLIP2_DIR --data CIRR_ROOT
"""

import argparse
import json
import os
import sys
from pathlib import Path

import _bootstrap

# eval.protocols.PROTOCOLS (tested)
PROTOCOLS = ("webvid-covr", "dense-webvid-covr", "cirr", "fashioniq", "circo", "tfcovr", "egocvr")
# --protocol all: where each benchmark sits under --data, and the split it is evaluated on
ALL = {
    "webvid-covr": ("webvid-covr/test", "test"),
    "dense-webvid-covr": ("dense-webvid-covr/test", "test"),
    "cirr": ("cirr", "val"),
    "fashioniq": ("fashioniq", "val"),
    "circo": ("circo", "val"),
    "tfcovr": ("tfcovr", "test"),
    "egocvr": ("egocvr", "test"),
}
INDEX_KINDS = ("flat", "ivf", "hnsw")  # eval.search.INDEX_KINDS (tested)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--protocol",
        required=True,
        choices=(*PROTOCOLS, "all"),
        help="all: every benchmark found under --data (DATA/webvid-covr/test, "
        "DATA/dense-webvid-covr/test, DATA/cirr, DATA/fashioniq, DATA/circo, DATA/tfcovr, "
        "DATA/egocvr), one table",
    )
    p.add_argument(
        "--checkpoint", required=True, help="exported model dir (or a run dir with export/)"
    )
    p.add_argument("--data", required=True, help="shard dir or benchmark root")
    p.add_argument(
        "--split",
        default=None,
        help="val | test (CIRR: test1); default: webvid-covr the shard dir's name, else val",
    )
    p.add_argument(
        "--out",
        default=None,
        help="directory for results.json, reports, submissions (default runs/eval/PROTOCOL-SPLIT)",
    )
    p.add_argument(
        "--image-root", default=None, help="images or clips when not in the benchmark's layout"
    )
    p.add_argument("--categories", default="dress,shirt,toptee", help="FashionIQ categories")
    p.add_argument("--reduce", choices=("mean", "max"), default=None)
    p.add_argument(
        "--fashioniq-gallery",
        choices=("covr", "clip4cir"),
        default="covr",
        help="covr: the candidate image removed from its ranking; clip4cir: kept",
    )
    p.add_argument(
        "--cirr-gallery",
        choices=("split", "folder"),
        default="split",
        help="split: the split file's images; folder: every image of their folder (CoVR's val)",
    )
    p.add_argument(
        "--cirr-subset-credit",
        choices=("hard", "soft"),
        default="hard",
        help="Recall_subset credit: hard: target_hard; soft: best target_soft score (CoVR's)",
    )
    p.add_argument(
        "--circo-text",
        choices=("relative", "concept"),
        default="relative",
        help="CIRCO query text: relative: the relative caption (CoVR); concept: 'find "
        "{shared_concept} but {relative_caption}' (MagicLens)",
    )
    p.add_argument(
        "--tfcovr-gallery",
        choices=("rows", "unique"),
        default="rows",
        help="TF-CoVR gallery: rows: one item per test row, repeats kept (official); unique",
    )
    p.add_argument(
        "--egocvr-text",
        choices=("instruction", "modified_captions"),
        default="instruction",
        help="EgoCVR query text column",
    )
    p.add_argument(
        "--subset",
        action="store_true",
        help="image benchmarks: evaluate the images that exist (default: a missing one is an "
        "error); results carry their coverage, are tagged subset, dropped ones listed",
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="edit tokens (longest padding; default the protocol's: the reference's test "
        "scripts' 64, dense-webvid-covr 128); edits are cleaned to the model's model.edit_words",
    )
    p.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default="flat",
        help="flat: exact search; ivf / hnsw: approximate, agreement reported",
    )
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--gpu-index", action="store_true", help="search on the GPU (faiss-gpu)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--report", type=int, default=0, help="queries in the qualitative report")
    p.add_argument("--report-queries", default=None, help="comma-separated query ids to report")
    p.add_argument("--explain", type=int, default=0, help="queries to explain with attention maps")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="covr-eval")
    p.add_argument("--run-id", default=None, help="log into this MLflow run instead of a new one")
    p.add_argument(
        "--config", default=None, help="a checkpoint file's model: the recipe it was trained with"
    )
    return _bootstrap.launched(p)


def default_split(protocol: str, data: str) -> str:
    """A webvid-covr shard dir is named after its split (shards/test): label results by it.
    TF-CoVR and EgoCVR: test."""
    name = Path(data).name
    if protocol in ("webvid-covr", "dense-webvid-covr") and name in ("train", "val", "test"):
        return name
    return "test" if protocol in ("tfcovr", "egocvr") else "val"


def present_benchmarks(root: str) -> dict[str, tuple[str, str]]:
    """`--protocol all`: {protocol: (data, split)} for each benchmark found under `root`."""
    found = {}
    for protocol, (sub, split) in ALL.items():
        data = Path(root) / sub
        shards = protocol.endswith("webvid-covr")
        if (data / "manifest.json").is_file() if shards else data.is_dir():
            found[protocol] = (str(data), split)
    if not found:
        raise FileNotFoundError(
            f"--protocol all: no benchmark under {root} (looked for "
            + ", ".join(sub for sub, _ in ALL.values())
            + ")"
        )
    return found


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    cfg = None
    if Path(a.checkpoint).is_file():  # a released checkpoint: the model from the recipe
        from configs import load_config

        overrides = [*a.overrides, f"model.lavis_checkpoint={Path(a.checkpoint).resolve()}"]
        cfg = load_config(a.config, overrides)
        _bootstrap.preflight(cfg, splits=())  # the model's files, before torch is imported
    elif a.overrides or a.config:
        raise ValueError(
            f"--config and key=value overrides describe a checkpoint file's model; "
            f"{a.checkpoint} is an export, which carries its own"
        )
    _bootstrap.setup_logging()
    from eval.run import EvalJob
    from eval.search import IndexSpec

    chosen = a.report_queries.split(",") if a.report_queries else None
    if a.protocol == "all":
        if a.split or a.image_root:
            raise ValueError(
                "--split and --image-root name one benchmark's data; --protocol all finds "
                f"each benchmark under --data ({', '.join(sub for sub, _ in ALL.values())})"
            )
        benchmarks = present_benchmarks(a.data)
        out = Path(a.out or "runs/eval/all")
    else:
        split = a.split or default_split(a.protocol, a.data)
        benchmarks = {a.protocol: (a.data, split)}
    jobs = [
        EvalJob(
            protocol=protocol,
            checkpoint=a.checkpoint,
            data=data,
            out_dir=str(out / f"{protocol}-{split}")
            if a.protocol == "all"
            else a.out or f"runs/eval/{protocol}-{split}",
            split=split,
            image_root=a.image_root if a.protocol != "all" else None,
            categories=tuple(a.categories.split(",")),
            reduce=a.reduce,
            fashioniq_gallery=a.fashioniq_gallery,
            cirr_gallery=a.cirr_gallery,
            cirr_subset_credit=a.cirr_subset_credit,
            circo_text=a.circo_text,
            tfcovr_gallery=a.tfcovr_gallery,
            egocvr_text=a.egocvr_text,
            subset=a.subset,
            text_len=a.text_tokens,
            index=IndexSpec(a.index, nprobe=a.nprobe, gpu=a.gpu_index),
            batch_size=a.batch_size,
            report=a.report or len(chosen or []),
            report_queries=chosen,
            explain=a.explain,
            tracking_uri=a.tracking_uri,
            experiment=a.experiment,
            run_id=a.run_id,
        )
        for protocol, (data, split) in benchmarks.items()
    ]
    if a.protocol != "all":
        results, _ = run(jobs, cfg)
        if results is not None:
            print(json.dumps(results[0], indent=1))
        return 0
    from eval.run import write_table

    results, failed = run(jobs, cfg, keep_going=True)
    if results is None:
        return 2 if failed else 0
    absent = [p for p in ALL if p not in benchmarks]
    where = {p: str(Path(a.data) / ALL[p][0]) for p in absent}
    table = write_table(results, out, where, failed)
    print(table.read_text() + f"(written to {table})")
    return 2 if failed else 0  # a requeue or CI script sees that a benchmark did not score


def run(jobs, cfg=None, keep_going: bool = False) -> tuple[list[dict] | None, dict[str, str]]:
    """This rank's part of `jobs` (one protocol each): processes, the model (exported, or built
    from `cfg` with a released checkpoint), loaded once, and one MLflow run around
    `eval.run.evaluate` for all of them (metric names carry the protocol and split). Returns
    the results (rank 0; else None) and {protocol: error line} for those that failed:
    `keep_going` scores the other benchmarks when one's data is broken; the error of one job
    alone is raised."""
    from eval.run import evaluate, resolve_checkpoint
    from train.engine import init_distributed, model_device
    from train.export import load_exported
    from train.loop import build_model_and_tokenizer
    from train.tracking import Tracker, default_uri

    first = jobs[0]
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world, _ = init_distributed(1800)
    if cfg is None:
        model, tok = load_exported(resolve_checkpoint(first.checkpoint))
    else:
        model, tok = build_model_and_tokenizer(cfg)
    model.to(model_device())  # this rank's GPU, where there is one
    out = first.out_dir if len(jobs) == 1 else str(Path(first.out_dir).parent)
    tracker = Tracker(
        first.tracking_uri or default_uri(out),
        first.experiment,
        out,
        f"eval-{first.protocol}-{first.split}" if len(jobs) == 1 else "eval-all",
        run_id=first.run_id,
        enabled=rank == 0,
    )
    results, failed, status = [], {}, "FAILED"
    try:
        for job in jobs:
            try:
                results.append(evaluate(job, model, tok, tracker, rank, world))
            except Exception as err:
                if not keep_going or not _bootstrap.expected(err):
                    raise
                failed[job.protocol] = f"{_bootstrap.label(err)}: {_bootstrap.one_line(err)}"
                print(f"FAILED {job.protocol}: {failed[job.protocol]}", file=sys.stderr)
        if failed:
            tracker.set_tags({f"covr.failed.{p}": cause for p, cause in failed.items()})
        status = "FAILED" if failed and not results else "FINISHED"
    finally:
        if first.run_id is None:
            tracker.finish(status)
        else:
            tracker.flush_buffer()
    return (results if rank == 0 else None), failed


if __name__ == "__main__":
    # eval's own checks (unknown query ids, FashionIQ categories) raise KeyError / ValueError
    _bootstrap.run(main, also=(ValueError, KeyError))
