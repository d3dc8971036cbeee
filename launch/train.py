"""Train a CoVR model with DeepSpeed.

  deepspeed --num_accelerators 2 launch/train.py --config configs/demo.yaml [key=value ...]
  deepspeed --hostfile hosts launch/train.py --config configs/covr2_blip2.yaml model.pretrained=BLIP2_DIR shards.dir=shards
  python launch/train.py --config configs/demo.yaml train.max_steps=20   (one process, no launcher)

One process per rank (the deepspeed launcher starts them); every rank reads the same config.
Without a launcher the process is a world of one. Settings and the shard manifests are checked
before anything heavy starts. `train.resume=auto` (default) continues from the newest intact
checkpoint in train.out_dir, on any number of ranks; settings that change the training must
match the checkpoint's (else exit 2 naming the keys); `train.resume=none` starts over, moving
the directory's checkpoints aside (checkpoints.replaced-<time>).

SIGTERM, SIGUSR1 or Ctrl-C (preemption: SLURM `--signal=USR1@120`, Kubernetes' SIGTERM) stop the
job at the next optimizer step with a checkpoint: every rank exits 75, rank 0 writes
train.out_dir/stopped.json, and the same command resumes. A second Ctrl-C stops at once.
"""

import argparse
import json
import sys

import _bootstrap


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    return _bootstrap.launched(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from configs import load_config

    cfg = load_config(args.config, args.overrides)
    _bootstrap.preflight(cfg)  # before torch and deepspeed are imported
    from train.resume import check_before_start

    check_before_start(cfg)  # a checkpoint trained with other settings: refused, keys named
    _bootstrap.setup_logging()

    from train.loop import train
    from train.stop import EXIT_STOPPED, Stopped, StopRequest

    try:  # the signals stay caught to the process's end (a signal after training: exit 0)
        summary = train(cfg, StopRequest().install())
    except Stopped as stopped:  # a signal: checkpoint saved at a step boundary
        if _bootstrap.rank() == 0:
            print(stopped, file=sys.stderr)
        _bootstrap.leave_process_group()
        return EXIT_STOPPED
    if summary is not None and _bootstrap.rank() == 0:  # rank 0 speaks for the job
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    _bootstrap.run(main)
