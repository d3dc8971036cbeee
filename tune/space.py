"""The sweep file: a base training config, fixed overrides, the search space, the scheduler and
the trials' resources. Everything is checked here, before Ray starts: every space key and
every value it can take is run through the training config's own validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from configs.schema import ConfigError, load_config

DISTRIBUTIONS = {
    "choice": "list",
    "grid": "list",
    "uniform": "range",
    "loguniform": "range",
    "randint": "range",
}
SCHEDULERS = ("asha", "fifo")
METRICS_PREFIX = ("recall_at_", "meanR")


@dataclass
class Scheduler:
    kind: str = "asha"
    grace_period: int = 1  # evaluations before a trial can be stopped
    reduction_factor: int = 2
    max_t: int = 100  # evaluations


@dataclass
class Resources:
    ranks: int = 1  # DeepSpeed ranks per trial
    cpus_per_rank: float = 1
    gpus_per_rank: float = 0


@dataclass
class Sweep:
    base: str  # training config every trial starts from
    name: str = "sweep"
    overrides: dict = field(default_factory=dict)  # fixed for every trial
    space: dict = field(
        default_factory=dict
    )  # key -> {choice|grid|uniform|loguniform|randint: ...}
    num_samples: int = 1
    metric: str = "recall_at_1"  # a validation metric as MLflow names it
    mode: str = "max"
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 0  # 0 = as many as the declared CPUs allow
    max_failures: int = 1  # retries of a failed trial, from its last checkpoint
    seed: int = 0
    synthetic: bool = False  # launch/tune.py first builds the synthetic corpus and shards


def _values(key: str, spec) -> list:
    """The values a space entry can take that the config must accept (ranges: both ends)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"space key '{key}': must be one mapping like {{choice: [...]}}")
    ((kind, arg),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"space key '{key}': unknown distribution {kind!r}; one of {sorted(DISTRIBUTIONS)}"
        )
    if DISTRIBUTIONS[kind] == "list":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"space key '{key}': {kind} needs a non-empty list")
        return arg
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(v, int | float) for v in arg)
        and arg[0] < arg[1]
    ):
        raise ConfigError(f"space key '{key}': {kind} needs [low, high] with low < high")
    if kind == "loguniform" and arg[0] <= 0:
        raise ConfigError(f"space key '{key}': loguniform needs low > 0")
    return [arg[0], arg[1] - 1] if kind == "randint" else arg


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def overrides_of(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file; `overrides` (key=value) change sweep settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.merge(
            OmegaConf.structured(Sweep(base="")),
            OmegaConf.load(path),
            OmegaConf.from_dotlist(list(overrides)),
        )
        sweep: Sweep = OmegaConf.to_object(raw)
    except Exception as err:  # OmegaConf names the key
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    base = Path(sweep.base)
    if not base.is_absolute():  # relative to the repository (configs/...), else to the sweep file
        root = Path(__file__).resolve().parent.parent
        base = root / base if (root / base).is_file() else path.parent / base
    sweep.base = str(base)
    sweep.overrides = _flat(sweep.overrides)  # `overrides.train.max_steps=9` nests: flatten it
    check(sweep)
    return sweep


def check(sweep: Sweep) -> None:
    fixed = overrides_of(sweep.overrides)
    try:
        load_config(sweep.base, fixed)
    except ConfigError as err:
        raise ConfigError(f"sweep base/overrides: {err}") from None
    if not sweep.space:
        raise ConfigError("sweep key 'space': empty; name at least one setting to explore")
    for key, spec in sweep.space.items():
        for value in _values(key, spec):
            try:
                load_config(sweep.base, fixed + [f"{key}={value}"])
            except ConfigError as err:
                raise ConfigError(f"space key '{key}' value {value!r}: {err}") from None
    if sweep.scheduler.kind not in SCHEDULERS:
        raise ConfigError(
            f"sweep key 'scheduler.kind': {sweep.scheduler.kind!r} not one of {SCHEDULERS}"
        )
    if sweep.mode not in ("max", "min"):
        raise ConfigError(f"sweep key 'mode': {sweep.mode!r} not max or min")
    if not sweep.metric.startswith(METRICS_PREFIX):
        raise ConfigError(
            f"sweep key 'metric': {sweep.metric!r} is not a validation metric (recall_at_K, meanR3, meanR4)"
        )
    for key in ("num_samples", "resources.ranks"):
        value = OmegaConf.select(OmegaConf.structured(sweep), key)
        if value < 1:
            raise ConfigError(f"sweep key '{key}': must be >= 1, got {value}")
    cfg = load_config(sweep.base, fixed)
    if not cfg.train.eval_every:
        raise ConfigError(
            "sweep: train.eval_every must be > 0 so trials report recall while they run"
        )


def ray_space(sweep: Sweep) -> dict:
    """The Tune param_space: flat dotted config keys -> Tune distributions."""
    from ray import tune

    space = {}
    for key, spec in sweep.space.items():
        ((kind, arg),) = spec.items()
        if kind == "grid":
            space[key] = tune.grid_search(list(arg))
        elif kind == "choice":
            space[key] = tune.choice(list(arg))
        else:
            space[key] = getattr(tune, kind)(*arg)
    return space
