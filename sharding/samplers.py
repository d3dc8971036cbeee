"""Batch composition over a sample stream (docs/METHOD.md §4).

Each sampler reads samples (dicts with a `group` key) from any iterable, holds up to `buffer` of
them, and yields lists of exactly `batch_size` samples; a final partial batch is dropped, so a
stream of N samples always gives N // batch_size batches whatever the sampler (ranks stay in step).

- random: uniformly drawn from the buffer.
- hns: whole groups packed together (near-duplicates become in-batch hard negatives).
- fs: at most one sample per group per batch (no in-batch false negatives); when the buffer holds
  too few groups the batch is completed with other samples and counted in `stats["relaxed"]`.
- mix: each batch is FS with probability beta, else HNS.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import get_args, get_type_hints

from configs.schema import SamplerConfig

SAMPLERS = get_args(get_type_hints(SamplerConfig)["kind"])  # the config's choices


class BatchComposer:
    """`cfg`: the sampler's kind, buffer and beta (`sampler.*` of the config)."""

    def __init__(self, cfg: SamplerConfig, batch_size: int, seed: int | str = 0):
        if cfg.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {cfg.kind!r}; one of {SAMPLERS}")
        if cfg.buffer < batch_size:
            raise ValueError(
                f"sampler buffer ({cfg.buffer}) must hold at least one batch ({batch_size})"
            )
        self.kind, self.batch_size, self.buffer, self.beta = (
            cfg.kind,
            batch_size,
            cfg.buffer,
            cfg.beta,
        )
        self.rng = random.Random(seed)
        self.stats = {"batches": 0, "relaxed": 0}

    def __call__(self, samples: Iterable[dict]) -> Iterator[list[dict]]:
        pool: list[dict] = []
        for sample in samples:
            pool.append(sample)
            if len(pool) >= self.buffer:
                yield self._take(pool)
        while len(pool) >= self.batch_size:
            yield self._take(pool)

    def _take(self, pool: list[dict]) -> list[dict]:
        kind = self.kind
        if kind == "mix":
            kind = "fs" if self.rng.random() < self.beta else "hns"
        if kind == "random":
            picks = self.rng.sample(range(len(pool)), self.batch_size)
        elif kind == "hns":
            picks = self._hns(pool)
        else:
            picks = self._fs(pool)
        self.stats["batches"] += 1
        chosen = set(picks)
        batch = [pool[i] for i in picks]
        pool[:] = [s for i, s in enumerate(pool) if i not in chosen]
        return batch

    def _groups(self, pool: list[dict]) -> list[list[int]]:
        groups: dict[object, list[int]] = defaultdict(list)
        for i, s in enumerate(pool):
            groups[s["group"]].append(i)
        order = list(groups.values())
        self.rng.shuffle(order)
        return order

    def _hns(self, pool: list[dict]) -> list[int]:
        picks: list[int] = []
        for members in sorted(self._groups(pool), key=len, reverse=True):
            room = self.batch_size - len(picks)
            if room == 0:
                break
            if len(members) <= room or not picks:
                picks += members[:room]
        if len(picks) < self.batch_size:  # fill with the largest groups that still fit, else split
            rest = [i for i in range(len(pool)) if i not in set(picks)]
            picks += rest[: self.batch_size - len(picks)]
        return picks

    def _fs(self, pool: list[dict]) -> list[int]:
        groups = self._groups(pool)
        picks = [self.rng.choice(members) for members in groups[: self.batch_size]]
        if len(picks) < self.batch_size:
            self.stats["relaxed"] += 1
            taken = set(picks)
            rest = [i for i in range(len(pool)) if i not in taken]
            picks += self.rng.sample(rest, self.batch_size - len(picks))
        return picks
