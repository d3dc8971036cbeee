"""Train a CoVR model with DeepSpeed.

  deepspeed [--num_accelerators 2] [--hostfile H] launch/train.py --config configs/X.yaml [key=value ...]

One process per rank (the deepspeed launcher starts them); every rank reads the same config.
`train.resume=auto` (default) continues from the newest complete checkpoint in train.out_dir.
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
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")
    # rank 0 speaks for the job; the other ranks report only warnings and errors
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from train.checkpoint import CheckpointError
    from train.loop import train

    try:
        summary = train(cfg)
    except CheckpointError as err:  # names the file; the launcher then stops the other ranks
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    if summary is not None:  # rank 0 only
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
