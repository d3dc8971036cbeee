"""One evaluation job, as `launch/eval.py` and `launch/demo.py` run it: with the exported model and
the MLflow tracker they give, run a protocol (split across ranks when launched with several),
then on rank 0 write the results JSON, the optional report and explanations, and log everything
(into a new run tagged with the checkpoint and the training run it came from, or an existing run
given by id)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.text import tokenize
from data.video import to_model_input
from data.video_benchmarks import EGOCVR_TEXTS
from eval import protocols, video_protocols
from eval.coverage import DROPPED, write_dropped
from eval.protocols import (
    CIRR_GALLERIES,
    CIRR_SUBSET_CREDITS,
    FASHIONIQ_GALLERIES,
    PROTOCOLS,
    EvalSettings,
    Evaluation,
)
from eval.search import IndexSpec, retrieve, topk_agreement
from eval.video_protocols import TFCOVR_GALLERIES
from sharding.batch import Task, device_of, to_device

log = logging.getLogger(__name__)


@dataclass
class EvalJob:
    protocol: str
    checkpoint: str  # an exported model directory, or a training out_dir holding export/
    data: str  # shard dir (webvid-covr) or the benchmark's root directory
    out_dir: str = "eval_out"
    split: str = "val"
    # CIRR images / CIRCO image directory / TF-CoVR and EgoCVR clips, when not under data
    image_root: str | None = None
    categories: tuple = protocols.FASHIONIQ_CATEGORIES
    reduce: str | None = None  # default: the model's own setting (CIRR: max)
    fashioniq_gallery: str = "covr"  # covr: the candidate removed from its ranking; clip4cir: kept
    # split: the split file's images; folder: every image of their folder (CoVR's val numbers)
    cirr_gallery: str = "split"
    # hard: Recall_subset credits target_hard; soft: the best target_soft score (CoVR)
    cirr_subset_credit: str = "hard"
    # image benchmarks: evaluate the images that exist, reported as a subset (eval.coverage)
    subset: bool = False
    # edit tokens: None = the protocol's (the reference's test scripts: 64; dense-webvid-covr 128)
    text_len: int | None = None
    circo_text: str = "relative"  # protocols.CIRCO_TEXTS
    tfcovr_gallery: str = "rows"  # video_protocols.TFCOVR_GALLERIES
    egocvr_text: str = "instruction"  # data.video_benchmarks.EGOCVR_TEXTS
    index: IndexSpec = field(default_factory=IndexSpec)
    batch_size: int = 64
    report: int = 0  # queries in the qualitative report (0: none)
    report_k: int = 5
    report_queries: list[str] | None = None  # chosen query ids instead of random ones
    explain: int = 0  # queries explained with attention maps
    tracking_uri: str | None = None
    experiment: str = "covr-eval"
    run_id: str | None = None  # log into this run (e.g. the training run) instead of a new one
    progress: bool = True

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; one of {PROTOCOLS}")
        # before any model is loaded
        protocols.check_choice("fashioniq_gallery", self.fashioniq_gallery, FASHIONIQ_GALLERIES)
        protocols.check_choice("cirr_gallery", self.cirr_gallery, CIRR_GALLERIES)
        protocols.check_choice("cirr_subset_credit", self.cirr_subset_credit, CIRR_SUBSET_CREDITS)
        protocols.check_choice("circo_text", self.circo_text, protocols.CIRCO_TEXTS)
        protocols.check_choice("tfcovr_gallery", self.tfcovr_gallery, TFCOVR_GALLERIES)
        if self.egocvr_text not in EGOCVR_TEXTS:
            raise ValueError(f"unknown egocvr_text {self.egocvr_text!r}; one of {EGOCVR_TEXTS}")
        if self.text_len is None:
            self.text_len = protocols.TEXT_LEN.get(self.protocol, protocols.EVAL_TEXT_LEN)


def resolve_checkpoint(path: str | Path) -> Path:
    """An exported model directory (itself or a run's export/); a file is a released checkpoint,
    read onto the recipe's model by `launch/eval.py`."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path, path / "export"):
        if (candidate / "covr_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no exported CoVR model (covr_config.json) here or in export/")


def job_reduce(job: EvalJob, model) -> str:
    """The similarity reduction: the job's, else max for CIRR (the reference's rule), else the
    model's own."""
    return job.reduce or ("max" if job.protocol == "cirr" else model.cfg.reduce)


def run_protocol(job: EvalJob, model, tok, rank: int = 0, world: int = 1) -> Evaluation:
    reduce = job_reduce(job, model)
    s = EvalSettings(
        reduce=reduce,
        batch_size=job.batch_size,
        index=job.index,
        rank=rank,
        world=world,
        progress=job.progress,
        fashioniq_gallery=job.fashioniq_gallery,
        cirr_gallery=job.cirr_gallery,
        cirr_subset_credit=job.cirr_subset_credit,
        subset=job.subset,
        text_len=job.text_len,
        circo_text=job.circo_text,
    )
    if job.protocol in ("webvid-covr", "dense-webvid-covr"):
        evaluation = protocols.webvid_covr(model, tok, job.data, s)
        evaluation.protocol = job.protocol
        return evaluation
    if job.protocol == "tfcovr":
        return video_protocols.tfcovr(
            model, tok, job.data, job.split, job.image_root, s, job.tfcovr_gallery
        )
    if job.protocol == "egocvr":
        return video_protocols.egocvr(model, tok, job.data, job.image_root, s, job.egocvr_text)
    if job.protocol == "cirr":
        return protocols.cirr(model, tok, job.data, job.split, job.image_root, job.out_dir, s)
    if job.protocol == "fashioniq":
        return protocols.fashioniq(model, tok, job.data, job.categories, job.split, s)
    return protocols.circo(model, tok, job.data, job.split, job.image_root, job.out_dir, s)


def combiner_weights(model, tok, evaluation: Evaluation, limit: int = 256) -> np.ndarray | None:
    """The `mlp` combiner's (fusion, image, text) weights on up to `limit` queries."""
    if model.cfg.combiner != "mlp":
        return None
    size = model.hf.config.vision_config.image_size
    n = min(limit, len(evaluation.edits))
    frames = torch.stack([to_model_input(evaluation.images.query(i)[None], size) for i in range(n)])
    text = tokenize(tok, evaluation.edits[:n], model.cfg.max_text_len, model.cfg.edit_words)
    inputs = to_device((frames, text.input_ids, text.attention_mask), device_of(model))
    with torch.no_grad():
        weights = model(Task.COMPOSE, *inputs).combiner_weights
    return weights.float().cpu().numpy()


def explain_queries(
    model, tok, evaluation: Evaluation, queries: list[int], out_dir: Path, reduce: str
):
    """One PNG per query, explaining its score against the ground truth (or the top-1)."""
    from eval.explain import explain, save_explanation

    size = model.hf.config.vision_config.image_size
    position = {g: n for n, g in enumerate(evaluation.gallery_ids)}
    files = []
    for i in queries:
        frame = evaluation.images.query(i)
        target = evaluation.shown_target(i) or evaluation.top_ids[i][0]
        expl = explain(
            model,
            tok,
            to_model_input(frame[None], size)[0],
            evaluation.edits[i],
            evaluation.gallery_emb[position[target]],
            reduce,
        )
        files.append(
            save_explanation(expl, frame, evaluation.edits[i], out_dir / f"explain_{i}.png")
        )
        np.savez(
            out_dir / f"explain_{i}.npz",
            **{k: v for k, v in asdict(expl).items() if k != "words"},
            words=np.array(expl.words),
        )
        files.append(out_dir / f"explain_{i}.npz")
    return files


def approximate_search_loss(evaluation: Evaluation, job: EvalJob, reduce: str) -> dict:
    """How much of the exact top-10 an IVF / HNSW index (with `max`: its shortlist by token
    means, re-ranked) finds (reported with its results)."""
    exact = retrieve(evaluation.query_emb, evaluation.gallery_emb, 10, reduce)[1]
    approx = retrieve(evaluation.query_emb, evaluation.gallery_emb, 10, reduce, spec=job.index)[1]
    return {f"search_{job.index.kind}_top10_agreement": topk_agreement(exact, approx, 10)}


def evaluate(job: EvalJob, model, tok, tracker, rank: int = 0, world: int = 1) -> dict | None:
    """Run `job` with a loaded model (`train.export.load_exported`, placed on the device it is to
    run on: every input follows it) on this rank of `world`;
    rank 0 returns the results dict (also written to out_dir/results.json) and logs it through
    `tracker` (a `train.tracking.Tracker`, owned by the caller, who finishes it)."""
    model_dir = resolve_checkpoint(job.checkpoint)
    model.eval()
    evaluation = run_protocol(job, model, tok, rank, world)
    if rank != 0:
        return None
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reduce = job_reduce(job, model)
    coverage = evaluation.coverage
    metrics = {**evaluation.metrics, **coverage.metrics()}
    if job.index.kind != "flat":
        metrics.update(approximate_search_loss(evaluation, job, reduce))
    files = list(evaluation.files)
    if coverage.subset:
        files.append(write_dropped(coverage, out))
        log.warning("%s (dropped ones: %s)", coverage.line(), out / DROPPED)
    if job.report:
        files += protocols_report(job, model, tok, evaluation, out / "report")
    if job.explain:
        from eval.report import pick_queries

        chosen = pick_queries(evaluation, job.explain, seed=1)
        files += explain_queries(model, tok, evaluation, chosen, out / "explain", reduce)
    source = model_dir.parent / "summary.json"
    train_run = json.loads(source.read_text()).get("mlflow_run_id") if source.is_file() else None
    result = {
        "protocol": job.protocol,
        "split": job.split,
        "checkpoint": str(model_dir),
        "metrics": metrics,
        "subset": coverage.subset,
        "coverage": coverage.summary(),
        "gallery_size": len(evaluation.gallery_ids),
        "queries": len(evaluation.query_ids),
        "reduce": reduce,
        "index": asdict(job.index),
        "conventions": evaluation.conventions,
        "files": [str(f) for f in files],
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if job.run_id is None:  # keyed by protocol: one run may hold several (--protocol all)
        tracker.log_params(
            {
                "checkpoint": str(model_dir),
                "index": job.index.kind,
                **{
                    f"eval.{job.protocol}.{k}": v
                    for k, v in {
                        "split": job.split,
                        "reduce": reduce,
                        **evaluation.conventions,
                    }.items()
                },
            }
        )
    tracker.set_tags(
        {
            "covr.checkpoint": str(model_dir),
            "covr.train_run_id": train_run or "",
            f"covr.subset.{job.protocol}": str(coverage.subset).lower(),
            # the run's tag: true when any protocol in it was scored on a subset
            **({"covr.subset": "true"} if coverage.subset else {}),
        }
    )
    # a subset's numbers never share a name with a full split's
    split = f"{job.split}-subset" if coverage.subset else job.split
    tracker.log_metrics({f"{job.protocol}/{split}/{k}": v for k, v in metrics.items()}, 0)
    tracker.log_artifact(out / "results.json", f"eval/{job.protocol}")
    for f in files:
        tracker.log_artifact(f, f"eval/{job.protocol}/{Path(f).parent.name}")
    return result


def protocols_report(job: EvalJob, model, tok, evaluation: Evaluation, out_dir: Path) -> list[Path]:
    from eval.report import write_report

    weights = combiner_weights(model, tok, evaluation)
    return write_report(
        evaluation, out_dir, job.report, job.report_k, job.report_queries, combiner_weights=weights
    )


# what `--protocol all`'s table shows of each protocol (all metrics are in its results.json)
HEADLINE = {
    "webvid-covr": ("R@1", "R@5", "R@10", "R@50"),
    "dense-webvid-covr": ("R@1", "R@5", "R@10", "R@50"),
    "cirr": ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"),
    "fashioniq": ("average/R@10", "average/R@50"),
    "circo": ("mAP@5", "mAP@10", "mAP@25", "mAP@50"),
    "tfcovr": ("mAP@5", "mAP@10", "mAP@25", "mAP@50"),
    "egocvr": ("global_R@1", "global_R@5", "global_R@10", "local_R@1", "local_R@2", "local_R@3"),
}


def write_table(
    results: list[dict], out_dir: str | Path, absent: dict | None = None, failed: dict | None = None
) -> Path:
    """One Markdown table of every protocol's headline numbers ("results.md"), beside a JSON
    list of the full results (`results.json`); `absent`: {protocol: where it was looked for};
    `failed`: {protocol: the error's one line}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| protocol | split | queries | gallery | metrics |", "|---|---|---|---|---|"]
    for r in results:
        shown = [k for k in HEADLINE.get(r["protocol"], ()) if k in r["metrics"]]
        cells = ", ".join(f"{k} {r['metrics'][k]:.2f}" for k in shown) or "(submission files)"
        subset = " (subset)" if r["subset"] else ""
        lines.append(
            f"| {r['protocol']} | {r['split']}{subset} | {r['queries']} | {r['gallery_size']} "
            f"| {cells} |"
        )
    if absent:
        lines += [
            "",
            "Not evaluated (no data): " + ", ".join(f"{p} ({w})" for p, w in absent.items()),
        ]
    for protocol, cause in (failed or {}).items():
        lines += ["", f"FAILED {protocol}: {cause}"]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
