"""Ray Tune sweep of CoVR trainings, every trial a real deepspeed job and an MLflow child run.

  python launch/tune.py --config configs/tune/demo.yaml [--out DIR] [--address RAY] [key=value ...]
  python launch/tune.py --config configs/tune/demo.yaml --out DIR --resume   (after the driver died)

The sweep file names a base training config, fixed overrides, the search space, the metric
(validation recall), the scheduler (ASHA) and each trial's resources; it is checked before Ray
starts. `--address` joins a running Ray cluster instead of starting a local one. Writes
DIR/sweep.json (tracking URI, parent run id, one entry per trial) and prints the ranked table.
"""

import argparse
import json
from pathlib import Path

import _bootstrap


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (configs/tune/...)")
    p.add_argument(
        "--out", default="runs/tune-demo", help="sweep directory (default runs/tune-demo)"
    )
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: sqlite in --out)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --out whose driver died: finished trials kept, the others "
        "go on from their checkpoints, the same MLflow parent run",
    )
    p.add_argument("overrides", nargs="*", help="key=value sweep settings (e.g. num_samples=2)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import yaml

    from configs import ConfigError, load_config
    from configs.schema import yaml_error
    from tune.space import check, load_sweep, overrides_of

    out = Path(a.out).resolve()
    try:
        sweep = load_sweep(a.config, a.overrides)
        if sweep.synthetic:  # the data lives under the sweep directory
            sweep.overrides.update(
                {
                    "data.root": str(out / "corpus"),
                    "shards.dir": str(out / "shards"),
                    "model.tokenizer": str(out / "corpus" / "tokenizer"),
                }
            )
            check(sweep)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error(a.config, err)) from None
    if not sweep.synthetic:  # the base config's shards exist before Ray starts
        _bootstrap.preflight(load_config(sweep.base, overrides_of(sweep.overrides)))
    _bootstrap.setup_logging()
    if sweep.synthetic and not a.resume:  # a resumed sweep has its corpus and shards
        from data.corpus import build_synthetic
        from sharding.pack import pack_splits

        cfg = load_config(sweep.base, overrides_of(sweep.overrides))
        print(f"synthetic corpus and shards -> {out}", flush=True)
        build_synthetic(cfg.data.root, cfg.data.synth, cfg.data.mining)
        pack_splits(cfg.data.root, cfg.shards.dir, cfg.shards)

    from train.tracking import where_to_look
    from tune.sweep import run_sweep

    summary = run_sweep(sweep, out, a.address, a.tracking_uri, resume=a.resume)
    print("\n" + summary["table"])
    print(f"\nbest: {json.dumps(summary['best'])}")
    print(where_to_look("parent run", summary["parent_run_id"], summary["mlflow_tracking_uri"]))
    print(f"wrote {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    _bootstrap.run(main)
