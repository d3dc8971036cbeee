"""Embed every target of packed shards once with the frozen starting model (the reference's
precomputed targets), then train on the output.

  deepspeed --hostfile hosts launch/embed_targets.py --config configs/covr2_blip2.yaml model.pretrained=BLIP2_DIR --src shards --out shards-emb
  python launch/embed_targets.py --config configs/covr_blip.yaml model.pretrained=BLIP_DIR --src shards/val --out shards-emb/val   (one process)
  deepspeed --hostfile hosts launch/train.py --config configs/covr2_blip2.yaml model.pretrained=BLIP2_DIR shards.dir=shards-emb

SRC is one packed split or a folder of them (train/, val/, test/); each is written to the same
name under OUT with target JPEGs replaced by float16 frame embeddings and the target captions by
their embeddings. The model is the one `launch/train.py` builds from the same config and
overrides; training refuses embeddings from another model. Shard i goes to rank i % world (GPUs
when present); a rerun skips finished shards, so a killed job is resumed by running it again.
"""

import argparse
import json
from pathlib import Path

import _bootstrap


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="the training YAML config (model and its weights)")
    p.add_argument("--src", required=True, help="packed shards: one split or a folder of them")
    p.add_argument("--out", required=True, help="where the embedded shards go")
    p.add_argument("--frames-per-batch", type=int, default=256, help="target frames per forward")
    return _bootstrap.launched(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from configs import load_config

    cfg = load_config(args.config, args.overrides)
    _bootstrap.preflight(cfg, splits=())  # the model's files, before torch is imported
    src = Path(args.src)
    if not (src / "manifest.json").is_file() and not list(src.glob("*/manifest.json")):
        raise FileNotFoundError(f"{src}: no manifest.json here or in a subdirectory (pack first)")
    _bootstrap.setup_logging()

    from train.embedder import embed_targets

    manifests = embed_targets(cfg, src, args.out, args.frames_per_batch)
    if manifests is not None:  # rank 0
        print(json.dumps({split: m["totals"] for split, m in manifests.items()}, indent=1))
    return 0


if __name__ == "__main__":
    _bootstrap.run(main)
