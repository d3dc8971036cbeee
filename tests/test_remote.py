"""Shards read over HTTP from a real server on 127.0.0.1 that returns errors and drops
connections mid-body (`tests.flaky_http`): retries, exact batches and resume, the cache, the
manifest fetched once, and the refusals a user meets."""

import hashlib
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from configs.schema import SamplerConfig, ShardConfig
from sharding import remote
from sharding.batch import collate
from sharding.pack import pack
from sharding.reader import MissingShardsError, ShardReader, open_shards
from sharding.remote import Fetch, RemoteReadError, RemoteStream, ShardCache
from tests.flaky_http import Faults, serve

FAST = Fetch(retries=12, wait_s=0.001)


@pytest.fixture(scope="module")
def packed(small_corpus, tmp_path_factory):
    from tests.tiny import tiny_model

    root, _ = small_corpus
    base = tmp_path_factory.mktemp("served")
    cfg = ShardConfig(samples_per_shard=3, target_frames=2, workers=1, seed=3)
    pack(root / "train.csv", root / "videos", base / "train", cfg)
    tok = tiny_model(tmp_path_factory.mktemp("tok"))[1]
    return base, tok


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks far smaller than a shard, so faults land inside shards."""
    monkeypatch.setattr(remote, "CHUNK_BYTES", 2048)


def _reader(shards, tok, fetch=FAST, rank=0, world=1):
    reader = ShardReader(
        shards.urls,
        shards.counts,
        batch_size=2,
        collate=partial(collate, tokenizer=tok, image_size=32, max_text_len=8),
        sampler=SamplerConfig("hns", buffer=16),
        rank=rank,
        world=world,
        seed=5,
        checksums=shards.checksums,
        sizes=shards.sizes,
        fetch=fetch,
    )
    return reader


def _keys(reader, epoch=0, start=0, workers=1):
    reader.set_position(epoch, start, workers)
    got = []
    for batch, info in DataLoader(
        reader, batch_size=None, num_workers=workers if workers > 1 else 0
    ):
        got.append((info.keys, batch["query_frames"].sum().item(), dict(info.stats)))
    return got


def test_a_stream_reads_every_byte_through_errors_and_dropped_connections(tmp_path, small_chunks):
    data = os.urandom(100_000)
    (tmp_path / "blob").write_bytes(data)
    with serve(tmp_path, Faults(error=0.2, drop=0.2, seed=1)) as (url, faults):
        stream = RemoteStream(f"{url}/blob", len(data), FAST)
        got, sizes = [], [1, 511, 4096, 7, 30_000, 100_000]
        while piece := stream.read(sizes[len(got) % len(sizes)]):
            got.append(piece)
        assert b"".join(got) == data
        assert faults.injected["error"] > 3 and faults.injected["drop"] > 3
        # every chunk once, plus one request per injected fault
        assert faults.requests["/blob"] == -(-len(data) // 2048) + sum(faults.injected.values())


def test_a_missing_file_is_not_retried_and_a_failing_server_is_given_up_on(tmp_path):
    (tmp_path / "blob").write_bytes(b"x" * 10)
    with serve(tmp_path) as (url, faults):
        with pytest.raises(FileNotFoundError):
            remote.fetch_bytes(f"{url}/nothing", FAST)
        assert faults.requests["/nothing"] == 1
    with serve(tmp_path, Faults(error=1.0)) as (url, faults):
        with pytest.raises(RemoteReadError, match=r"/blob: failed 4 times, last: .*503"):
            remote.fetch_bytes(f"{url}/blob", Fetch(retries=4, wait_s=0.001))
        assert faults.requests["/blob"] == 4
    with serve(tmp_path, Faults(error=1.0, status=403)) as (url, faults):
        with pytest.raises(Exception, match="403"):
            remote.fetch_bytes(f"{url}/blob", FAST)
        assert faults.requests["/blob"] == 1  # forbidden stays forbidden


def test_a_size_request_that_fails_is_retried_and_a_forbidden_manifest_is_one_error(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "blob").write_bytes(data)
    # fsspec asks HEAD, then GET, and reports both failing as FileNotFoundError: a 503 behind
    # it is retried like any other transient error
    with serve(tmp_path, Faults(fail_first=2)) as (url, faults):
        assert RemoteStream(f"{url}/blob", None, FAST).read() == data
        assert faults.requests["HEAD /blob"] >= 2 and faults.injected["error"] == 2
    with serve(tmp_path, Faults(error=1.0, status=403)) as (url, faults):
        with pytest.raises(RemoteReadError, match=r"/blob: .*403"):
            remote.read_json(f"{url}/blob", FAST)
        assert faults.requests["/blob"] == 1


def test_a_cache_that_cannot_be_written_streams_instead(packed, tmp_path, monkeypatch, caplog):
    base, _ = packed
    shards = open_shards(base / "train")
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    want = Path(shards.urls[0]).read_bytes()
    with serve(base / "train") as (url, _):
        shard = f"{url}/{Path(shards.urls[0]).name}"
        args = (shard, shards.sizes[0], shards.checksums[0])
        cache = Fetch(retries=3, wait_s=0.001, cache_dir=str(blocked), cache_bytes=1 << 30)
        assert remote.open_remote(*args, cache).read() == want
        assert "reading" in caplog.text and "over the network" in caplog.text

        real_open = open

        class FullDisk:
            def __init__(self, path):
                self.file = real_open(path, "wb")

            def write(self, data):
                raise OSError(28, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        def filling(path, mode="r", *a, **k):
            return FullDisk(path) if mode == "wb" else real_open(path, mode, *a, **k)

        monkeypatch.setattr(remote, "open", filling, raising=False)
        full = replace(cache, cache_dir=str(tmp_path / "full"))
        assert remote.open_remote(*args, full).read() == want
        assert not list((tmp_path / "full").iterdir())  # no partial copy left behind


def test_a_cached_copy_that_no_longer_parses_is_dropped(packed, tmp_path):
    from sharding.reader import read_shard

    base, _ = packed
    shards = open_shards(base / "train")
    whole = Fetch(retries=3, wait_s=0.001, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 30)
    with serve(base / "train") as (url, _):
        shard = f"{url}/{Path(shards.urls[0]).name}"
        kw = dict(sha256=shards.checksums[0], size=shards.sizes[0], fetch=whole)
        assert list(read_shard(shard, **kw))
        (cached,) = (tmp_path / "c").glob("*.tar")
        cached.write_bytes(os.urandom(shards.sizes[0]))  # same size: looked up as intact
        errors = []
        list(read_shard(shard, on_error=lambda u, e: errors.append(e), **kw))
        assert errors and not cached.exists()  # read once, counted, not served again


def test_back_off_doubles_from_the_first_wait(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    (tmp_path / "blob").write_bytes(b"x")
    with serve(tmp_path, Faults(error=1.0)) as (url, _):
        with pytest.raises(RemoteReadError):
            remote.fetch_bytes(f"{url}/blob", Fetch(retries=5, wait_s=2.0))
    assert len(waits) == 4
    for n, wait in enumerate(waits):  # 2, 4, 8, 16 s, each jittered by 0.5x to 1.5x
        assert 2.0 * 2**n * 0.5 <= wait <= 2.0 * 2**n * 1.5


def test_batches_over_a_flaky_server_are_the_local_ones_and_resume_exactly(packed, small_chunks):
    base, tok = packed
    local = _keys(_reader(open_shards(base / "train"), tok))
    local_workers = _keys(_reader(open_shards(base / "train"), tok), workers=2)
    with serve(base, Faults(error=0.15, drop=0.15, seed=2)) as (url, faults):
        shards = open_shards(f"{url}/train", FAST)
        assert shards.manifest == open_shards(base / "train").manifest
        assert faults.requests["/train/manifest.json"] >= 1
        flaky = _keys(_reader(shards, tok))
        resumed = _keys(_reader(shards, tok), start=3)
        # two loader workers (forked processes) read over the network too
        workers = _keys(_reader(shards, tok), workers=2)
        assert faults.injected["drop"] > 10 and faults.injected["error"] > 10
    assert [k for k, _, _ in flaky] == [k for k, _, _ in local] and len(local) > 5
    assert [s for _, s, _ in flaky] == [s for _, s, _ in local]  # the same decoded pixels
    assert flaky[-1][2]["corrupt_shards"] == 0 and flaky[-1][2]["checksum_mismatch"] == 0
    assert [k for k, _, _ in resumed] == [k for k, _, _ in local[3:]]
    assert [k for k, _, _ in workers] == [k for k, _, _ in local_workers]


def test_a_shard_the_server_keeps_failing_is_skipped_and_counted(packed, small_chunks):
    base, tok = packed
    local = open_shards(base / "train")
    with serve(base) as (url, _):
        shards = open_shards(f"{url}/train", FAST)
    gone = shards.urls[0]  # the server went away: every read fails after its attempts
    reader = _reader(shards, tok, Fetch(retries=2, wait_s=0.001))
    reader.urls = [gone if i == 0 else u for i, u in enumerate(local.urls)]
    got = _keys(reader)
    assert got[-1][2]["corrupt_shards"] >= 1 and got[-1][2]["resampled"] >= 1
    assert len(got) == len(_keys(_reader(local, tok)))  # the rank's batch count is kept


def test_the_cache_serves_shards_read_once_stays_bounded_and_drops_a_changed_copy(packed, tmp_path):
    base, tok = packed
    local = open_shards(base / "train")
    sizes = sorted(local.sizes)
    cache_dir = tmp_path / "cache"
    with serve(base, Faults(drop=0.2, seed=3)) as (url, faults):
        shards = open_shards(f"{url}/train", FAST)
        whole = Fetch(retries=12, wait_s=0.001, cache_dir=str(cache_dir), cache_bytes=1 << 30)
        first = _keys(_reader(shards, tok, whole))
        served = sum(n for p, n in faults.requests.items() if p.endswith(".tar"))
        again = _keys(_reader(shards, tok, whole))
        assert sum(n for p, n in faults.requests.items() if p.endswith(".tar")) == served
        assert [k for k, _, _ in again] == [k for k, _, _ in first]
        cached = sorted(cache_dir.glob("*.tar"))
        assert len(cached) == len(shards.urls)
        for path in cached:  # each kept copy is the manifest's bytes
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            assert path.name.startswith(sha[:16])

        # a copy changed on disk: counted when read, dropped, downloaded again next time
        victim = cached[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        cache = ShardCache(cache_dir, 1 << 30)
        idx = next(
            i for i, u in enumerate(shards.urls) if cache.path(u, shards.checksums[i]) == victim
        )
        reader = _reader(shards, tok, whole)
        reader.set_position(0, 0, 1)
        counts = remote_counts(reader, idx)
        assert counts == 1 and not victim.exists()

        # bounded: room for two of the smaller shards; the newest stays, older ones leave
        small = Fetch(
            retries=12,
            wait_s=0.001,
            cache_dir=str(tmp_path / "small"),
            cache_bytes=2 * sizes[0] + 1,
        )
        _keys(_reader(shards, tok, small))
        kept = list((tmp_path / "small").glob("*.tar"))
        assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= small.cache_bytes
        assert not list((tmp_path / "small").glob(".*.part"))


def remote_counts(reader, idx) -> int:
    """Read shard `idx` alone through the reader's own path; the checksum mismatches seen."""
    from sharding.reader import read_shard

    mismatches = []
    list(
        read_shard(
            reader.urls[idx],
            on_error=lambda u, e: pytest.fail(f"{u}: {e}"),
            sha256=reader.checksums[idx],
            on_mismatch=mismatches.append,
            size=reader.sizes[idx],
            fetch=reader.fetch,
        )
    )
    return len(mismatches)


def test_a_stale_partial_download_is_cleared(tmp_path):
    cache = ShardCache(tmp_path, 1 << 20)
    old = tmp_path / ".abc-covr-000000.tar.1-deadbeef.part"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * remote.STALE_PART_S,) * 2)
    fresh = tmp_path / ".abc-covr-000001.tar.2-deadbeef.part"
    fresh.write_bytes(b"x")
    cache.evict()
    assert not old.exists() and fresh.exists()


def test_a_remote_directory_missing_shards_or_a_manifest_is_named(packed, tmp_path):
    import shutil

    base, _ = packed
    served = tmp_path / "served"
    shutil.copytree(base / "train", served / "train")
    name = sorted((served / "train").glob("*.tar"))[1].name
    (served / "train" / name).unlink()
    with serve(served) as (url, _):
        with pytest.raises(MissingShardsError, match=f"1 shard.*{name} missing"):
            open_shards(f"{url}/train", FAST)
        with pytest.raises(FileNotFoundError, match=f"no manifest.json in {url}/nowhere"):
            open_shards(f"{url}/nowhere", FAST)


def test_preflight_reads_a_remote_manifest_and_names_a_missing_one(packed, tmp_path):
    import shutil
    import sys

    from configs.schema import Config
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "launch"))
    from _bootstrap import PreflightError, preflight

    base, _ = packed
    shutil.copytree(base / "train", tmp_path / "train")
    cfg = Config()
    with serve(tmp_path, Faults(error=0.3, seed=4)) as (url, _):
        cfg.shards.dir, cfg.shards.retry_wait_s = url, 0.001
        cfg.shards.retries = 12
        preflight(cfg, splits=("train",))  # passes through the injected errors
        with pytest.raises(PreflightError, match=f"shards.dir.*no {url}/val/manifest.json"):
            preflight(cfg, splits=("train", "val"))


def test_remote_settings_are_checked():
    from configs.schema import ConfigError, load_config

    for bad in ("retries=0", "cache_gb=0", "retry_wait_s=-1"):
        with pytest.raises(ConfigError, match=f"key 'shards.{bad.split('=')[0]}'"):
            load_config(None, [f"shards.{bad}"])
    assert Fetch.from_config(ShardConfig(cache_dir="/c", cache_gb=0.5)).cache_bytes == 1 << 29


def test_evaluation_over_a_flaky_server_equals_the_local_one(packed, small_chunks, tmp_path):
    import torch

    from eval.protocols import EvalSettings, webvid_covr
    from tests.tiny import tiny_model

    base, _ = packed
    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path)
    model.eval()
    local = webvid_covr(model, tok, base / "train", EvalSettings(batch_size=4))
    with serve(base, Faults(error=0.05, drop=0.05, seed=5)) as (url, faults):
        with pytest.MonkeyPatch.context() as mp:  # the default retries, without the waits
            mp.setattr(remote.time, "sleep", lambda s: None)
            served = webvid_covr(model, tok, f"{url}/train", EvalSettings(batch_size=4))
        assert sum(faults.injected.values()) > 3
    assert served.metrics == local.metrics and served.top_ids == local.top_ids
    assert served.query_ids == local.query_ids


def test_verify_reads_a_remote_directory_and_names_each_bad_shard(packed, tmp_path, small_chunks):
    import shutil

    from sharding.manifest import verify

    base, _ = packed
    shutil.copytree(base / "train", tmp_path / "train")
    tars = sorted((tmp_path / "train").glob("*.tar"))
    tars[0].unlink()
    data = bytearray(tars[1].read_bytes())
    data[100] ^= 0xFF
    tars[1].write_bytes(bytes(data))
    with serve(tmp_path, Faults(drop=0.2, seed=6)) as (url, _):
        report = verify(f"{url}/train", FAST)
    assert report["ok"] == len(tars) - 2
    problems = {c["shard"]: c["problem"] for c in report["corrupt"]}
    assert problems[tars[0].stem] == "missing"
    assert problems[tars[1].stem].startswith("checksum mismatch")
