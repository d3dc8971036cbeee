"""Embed every target of packed shards once with the frozen starting model (the reference's
precomputed targets), then train on the output.

  deepspeed [--num_accelerators N] [--hostfile H] launch/embed_targets.py --config CFG.yaml \
      --src shards --out shards-emb [key=value ...]
  deepspeed launch/train.py --config CFG.yaml shards.dir=shards-emb

SRC is one packed split or a folder of them (train/, val/, test/); each is written to the same
name under OUT with target JPEGs replaced by float16 frame embeddings and the target captions by
their embeddings. The model is the one `launch/train.py` builds from the same config and
overrides; training refuses embeddings from another model. Shard i goes to rank i % world (GPUs
when present); a rerun skips finished shards, so a killed job is resumed by running it again.
"""

import argparse
import json
import logging
import os
import sys

import _bootstrap  # noqa: F401  (repository root first on sys.path)

from configs import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", help="the training YAML config (model and its weights)")
    parser.add_argument("--src", required=True, help="packed shards: one split or a folder of them")
    parser.add_argument("--out", required=True, help="where the embedded shards go")
    parser.add_argument(
        "--frames-per-batch", type=int, default=256, help="target frames per forward"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip

    from sharding.embed import EmbedError
    from train.embedder import embed_targets

    try:
        manifests = embed_targets(cfg, args.src, args.out, args.frames_per_batch)
    except (EmbedError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifests is not None:  # rank 0
        print(json.dumps({split: m["totals"] for split, m in manifests.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
