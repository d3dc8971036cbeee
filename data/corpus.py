"""Corpus-level steps the launch scripts call: mine a caption table into split CSVs, and build
the synthetic corpus end to end (videos, caption table, metadata, mined splits)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from configs.schema import MiningConfig, SynthConfig
from data import mining, synthetic
from data.captions import read_caption_table
from data.mining import EditFn
from data.webvid_covr import write_annotations

SPLITS = ("train", "val", "test")


def mine_to_csv(
    captions_csv: str | Path,
    out_dir: str | Path,
    cfg: MiningConfig,
    edit_fn: EditFn = mining.template_edit,
    scores_fn: mining.ScoresFn | None = None,
    progress: bool = False,
) -> dict:
    """Mine `captions_csv`; write `{train,val,test}.csv` and `mining.json` (stats) to out_dir."""
    out = Path(out_dir)
    start = time.perf_counter()
    videos = read_caption_table(captions_csv)
    result = mining.mine(
        videos,
        max_videos_per_caption=cfg.max_videos_per_caption,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        edit_fn=edit_fn,
        scores_fn=scores_fn,
        progress=progress,
    )
    for split in SPLITS:
        write_annotations(out / f"{split}.csv", result.splits[split])
    stats = dict(result.stats, seconds=round(time.perf_counter() - start, 2))
    (out / "mining.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def build_synthetic(
    out_dir: str | Path, synth: SynthConfig, mine_cfg: MiningConfig, progress: bool = False
) -> dict:
    """Videos + caption table + metadata, then mined train/val/test CSVs. Rerunning keeps the
    videos already written (same seed, same files)."""
    out = Path(out_dir)
    specs = synthetic.write_corpus(
        out,
        videos=synth.videos,
        family_size=synth.family_size,
        frames=synth.frames,
        fps=synth.fps,
        size=synth.size,
        workers=synth.workers,
        seed=synth.seed,
        progress=progress,
    )
    by_pth = {s.pth: s for s in specs}
    stats = mine_to_csv(
        out / "captions.csv",
        out,
        mine_cfg,
        scores_fn=lambda _q, target: synthetic.visibility_scores(by_pth[target]),
        progress=progress,
    )
    write_tokenizer(out)
    return {"videos": len(specs), "families": specs[-1].family + 1, **stats}


def write_tokenizer(corpus_dir: str | Path) -> Path:
    """A word-level BERT tokenizer over the corpus's captions and edits, in `tokenizer/` (the
    offline stand-in for the BERT vocabulary shipped with real model weights)."""
    from data.captions import read_caption_table
    from data.tokenizer import build_vocab_tokenizer
    from data.webvid_covr import read_annotations

    corpus = Path(corpus_dir)
    texts = [v.caption for v in read_caption_table(corpus / "captions.csv")]
    for split in SPLITS:
        texts += [t.edit for t in read_annotations(corpus / f"{split}.csv")]
    texts += list(mining.EDIT_TEMPLATES)
    build_vocab_tokenizer(texts, corpus / "tokenizer")
    return corpus / "tokenizer"
