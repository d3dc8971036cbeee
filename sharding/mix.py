"""Training on several shard sets at once, with weights (`shards.mix`: CoVR-2 trains its image
models on CC-CoIR beside WebVid-CoVR).

An epoch keeps the length of all sources together (L records), and source s gets the quota
round(L * w_s / sum w) (largest remainders, so the quotas sum to L). Its shards are taken in
an order drawn from (seed, epoch, source), cycled when the quota exceeds the source (weight
above its natural share: records repeat, in different epochs' orders) and the last shard taken
is cut to what the quota still needs. The epoch's shard list is therefore a function of (seed,
epoch) alone, and the reader treats it as it treats one source's shards: the same layout over
ranks and workers, the same positions, the same exact resume on any number of ranks.

Target ids and sampler groups are made distinct across sources (a source's ids start at 0), so
two sources' targets are never taken for one another in a batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

TARGET_ID_STRIDE = 1 << 40  # source s's target ids become s * stride + id


@dataclass
class Source:
    name: str
    urls: list[str]
    counts: list[int]
    weight: float
    checksums: list[str] | None = None  # the manifest's, per shard (checked, cache keys)
    sizes: list[int] | None = None  # bytes per shard (remote reads)


@dataclass
class EpochShards:
    urls: list[str]
    counts: list[int]
    source: list[int]  # the source index of each shard
    quotas: list[int]  # records per source this epoch
    checksums: list[str | None]
    sizes: list[int | None]


def quotas(sources: list[Source], length: int) -> list[int]:
    """Records per source, proportional to the weights, summing to `length`."""
    total = sum(s.weight for s in sources)
    exact = [length * s.weight / total for s in sources]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(sources)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: length - sum(out)]:
        out[i] += 1
    return out


def epoch_shards(sources: list[Source], epoch: int, seed) -> EpochShards:
    length = sum(sum(s.counts) for s in sources)
    want = quotas(sources, length)
    urls, counts, owner, checksums, sizes = [], [], [], [], []
    for index, (source, quota) in enumerate(zip(sources, want)):
        rng = random.Random(f"{seed}-{epoch}-mix-{index}")
        order: list[int] = []
        while quota > 0:
            if not order:
                order = list(range(len(source.urls)))
                rng.shuffle(order)
            shard = order.pop()
            n = min(source.counts[shard], quota)
            if n:
                urls.append(source.urls[shard])
                counts.append(n)
                owner.append(index)
                checksums.append(source.checksums[shard] if source.checksums else None)
                sizes.append(source.sizes[shard] if source.sizes else None)
            quota -= n
    return EpochShards(urls, counts, owner, want, checksums, sizes)


def check_sources(sources: list[Source]) -> None:
    if not sources:
        raise ValueError("shards.mix: no source")
    for s in sources:
        if not s.weight > 0:
            raise ValueError(f"shards.mix: source {s.name} has weight {s.weight}; must be > 0")
        if not sum(s.counts):
            raise ValueError(f"shards.mix: source {s.name} holds no record")
