"""End-to-end demo on the synthetic corpus: python launch/demo.py [--out DIR] [key=value ...]

Stages so far: generate the corpus (real mp4 files) and mine train/val/test triplets.
Packing, training and evaluation join as their packages land (see docs/ARCHITECTURE.md).
"""

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (repository root first on sys.path)

from configs import ConfigError, load_config
from configs.schema import CONFIG_DIR


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        cfg = load_config(args.config, [f"data.root={out / 'corpus'}", *args.overrides])
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")

    from data.corpus import build_synthetic

    print(f"[1/1] synthetic corpus -> {cfg.data.root}")
    summary = build_synthetic(cfg.data.root, cfg.data.synth, cfg.data.mining, progress=True)
    print(json.dumps(summary, indent=2))
    (out / "results.json").write_text(json.dumps({"data": summary}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
