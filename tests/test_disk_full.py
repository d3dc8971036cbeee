"""The disk fills during a checkpoint write: one line naming the full disk, the previous
checkpoint intact, the partial one removed, and DeepSpeed's `latest` (which its zero_to_fp32.py
reads) never naming a checkpoint without its COMPLETE marker."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.multirank import run_ranks


def _save_until_it_fails(rank, world, out_dir, fault):
    import torch

    from tests.test_checkpoint import _engine, _step
    from train.checkpoint import CheckpointError, save_checkpoint
    from train.engine import init_distributed

    init_distributed(60)
    out = Path(out_dir)
    engine = _engine(out / "model")
    ckpt = out / "ckpt"
    _step(engine, 0)
    save_checkpoint(engine, ckpt, 1, shared={"a": 1}, own={"r": rank}, keep=3)
    _step(engine, 1)
    if fault == "injected":  # the second file written fails as PyTorch's writer does
        real, calls = torch.save, []

        def save(obj, f, *a, **k):
            calls.append(f)
            if len(calls) == 2:
                Path(f).write_bytes(b"\0" * 100)
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:603] . unexpected pos 12608 vs 12512"
                )
            return real(obj, f, *a, **k)

        torch.save = save
    else:  # a real full disk: ballast leaves less than a checkpoint free
        free = shutil.disk_usage(ckpt).free
        size = sum(p.stat().st_size for p in (ckpt / "step00000001").rglob("*") if p.is_file())
        with (ckpt / "ballast").open("wb") as f:
            f.write(b"\0" * max(0, free - size // 2))
    try:
        save_checkpoint(engine, ckpt, 2, shared={"a": 2}, own={"r": rank}, keep=3)
        result = {"error": None}
    except CheckpointError as err:
        result = {"error": str(err)}
    (out / "result.json").write_text(json.dumps(result))


def _check(out: Path) -> str:
    from train.checkpoint import newest_intact

    error = json.loads((out / "result.json").read_text())["error"]
    assert error and "the disk is full" in error and "step00000001 is intact" in error
    assert "\n" not in error
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step00000001"
    assert not (ckpt / "step00000002").exists()  # the partial one, removed
    assert newest_intact(ckpt) == "step00000001"
    return error


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_latest_stays(tmp_path):
    run_ranks(_save_until_it_fails, 1, (str(tmp_path), "injected"))
    assert "unexpected pos" in _check(tmp_path)  # what PyTorch said, kept at the end


def test_on_a_real_full_file_system(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", mount], check=False)
    if done.returncode != 0:
        pytest.skip("no permission to mount a small file system here (the injected test runs)")
    try:
        os.makedirs(mount / "model")
        run_ranks(_save_until_it_fails, 1, (str(mount), "real"))
        error = _check(mount)
        assert errno.errorcode[errno.ENOSPC] in error or "No space left" in error or "pos" in error
    finally:
        subprocess.run(["umount", mount], check=False)
