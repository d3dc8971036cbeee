"""What every launch script shares, imported first and kept light (no torch):

- the repository root first on sys.path (a script's own folder, launch/, is first by default,
  so `import train` would import launch/train.py);
- `setup_logging`: rank 0 speaks for the job, other ranks log warnings only, and libraries that
  narrate their start-up are turned down at their own loggers;
- `run(main)`: an expected error (bad config, annotations, missing videos, shards, checkpoint
  mapping, a missing input file) is one line on stderr and exit status 2, no traceback
  (COVR_TRACEBACK=1 shows it);
- `preflight(cfg)`: the files a training run reads exist, checked before any heavy import.
"""

import argparse
import logging
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

PACKAGES = ("configs", "data", "sharding", "train", "eval", "tune")  # our own exception classes
QUIET = {
    "faiss.loader": logging.WARNING,  # one INFO line per instruction set tried, failures included
    "alembic": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."  # MLflow's SQLite schema migrations, one line per revision
    "urllib3": logging.WARNING,
    "httpx": logging.WARNING,
    "matplotlib": logging.WARNING,  # "generated new fontManager" on a fresh machine
}
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dri")  # NVIDIA, AMD, Intel drivers


def command_parser(doc: str, config_help: str = "YAML config (default: built-in defaults)"):
    """(parser, subcommands) of a script with subcommands, all reading one `--config`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help=config_help)
    return parser, parser.add_subparsers(dest="command", required=True)


def launched(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` plus what the deepspeed launcher passes each rank (`--local_rank`, unused: the
    environment has it) and the `key=value` config overrides."""
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    level = logging.INFO if rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, floor in QUIET.items():
        logging.getLogger(name).setLevel(max(floor, level))
    # read when transformers / huggingface_hub load: rank 0 keeps transformers' warnings (unused
    # or newly initialised weights), the other ranks would only repeat them; no per-file bars
    if rank() != 0:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # a machine without a GPU driver: DeepSpeed is told it runs on the CPU rather than warning
    # at every start that it "was unable to detect" a GPU (ranks and the launcher inherit this)
    if not any(Path(dev).exists() for dev in GPU_DEVICES):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def expected(err: BaseException) -> bool:
    """An error we raise on purpose about the user's input: a class of this project
    (ConfigError, AnnotationError, MissingVideosError, CheckpointMappingError, ...) or a
    missing input file."""
    top = type(err).__module__.split(".")[0]
    if isinstance(err, FileNotFoundError | PreflightError):
        return True
    return top in PACKAGES and isinstance(err, Exception)


def label(err: BaseException) -> str:
    """ConfigError -> 'config error', MissingVideosError -> 'missing videos error'; a built-in
    error (a missing file) -> 'error'."""
    if type(err).__module__ == "builtins":
        return "error"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", type(err).__name__).lower()


def one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def fail(err: BaseException) -> int:
    where = f"[rank {rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{where}{label(err)}: {one_line(err)}", file=sys.stderr, flush=True)
    return 2


def run(main, also: tuple[type[BaseException], ...] = ()) -> None:
    """`sys.exit(main())`, with expected errors (and those of the classes `also`) reported as
    one line and exit status 2."""
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops at a step boundary)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if not (expected(err) or isinstance(err, also)) or os.environ.get("COVR_TRACEBACK"):
            raise
        code = fail(err)
    if code == 0:
        leave_process_group()
    sys.exit(code)


def leave_process_group() -> None:
    """Ranks that finished leave their process group together. Left to interpreter exit, a gloo
    group was torn down while the other rank was still connected, and both ranks aborted after
    their work was done ("terminate called without an active exception", exit status 250)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PreflightError(ValueError):
    """A file a run needs is missing; raised before any process does real work."""


def preflight(cfg, splits=("train", "val")) -> None:
    """Check what a training run reads before it starts: every split's manifest and every
    shard it lists (remote shards: the manifest), and the model / tokenizer / init paths the
    config names."""
    from sharding.remote import Fetch, is_remote, join, read_json

    for key in ("model.pretrained", "model.lavis_checkpoint", "model.tokenizer", "train.init_from"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not Path(value).exists():
            raise PreflightError(f"key '{key}': {value} does not exist")
    dirs = [(join(cfg.shards.dir, split), "shards.dir", split) for split in splits]
    if "train" in splits and cfg.shards.mix:  # the weighted sources replace <dir>/train
        dirs = [d for d in dirs if d[2] != "train"]
        dirs += [
            (join(m.dir), f"shards.mix[{i}].dir", "train") for i, m in enumerate(cfg.shards.mix)
        ]
    for shard_dir, key, split in dirs:
        manifest = join(shard_dir, "manifest.json")
        try:
            packed = read_json(manifest, Fetch.from_config(cfg.shards))
            names = [entry["name"] for entry in packed["shards"]]
        except FileNotFoundError:
            raise PreflightError(
                f"key '{key}': no {manifest} (pack the {split} split with launch/shard.py pack)"
            ) from None
        except OSError as err:  # a remote manifest that could not be fetched
            raise PreflightError(f"key '{key}': {err}") from None
        except ValueError as err:  # not JSON: names the file
            raise PreflightError(f"{err}: not a shard manifest") from None
        except (KeyError, TypeError) as err:
            raise PreflightError(f"{manifest}: not a shard manifest ({err!r})") from None
        if (
            split == "train"
            and cfg.loss.caption_weight > 0
            and packed.get("source_counts", {}).get("captions") == 0
        ):
            raise PreflightError(
                f"key 'loss.caption_weight': {cfg.loss.caption_weight} needs target captions, "
                f"and {manifest} was packed from annotations without any (no txt2)"
            )
        missing = (
            []
            if is_remote(shard_dir)
            else [n for n in names if not (shard_dir / f"{n}.tar").is_file()]
        )
        if missing:
            raise PreflightError(
                f"{manifest}: {len(missing)} of {len(names)} shards missing: "
                + ", ".join(f"{n}.tar" for n in missing[:5])
            )
