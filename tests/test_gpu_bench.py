"""bench/gpu.py: the one-command GPU check. CI runs it at the tiny size on CPU so it cannot rot;
its search, out-of-memory handling and MFU arithmetic are tested on their own."""

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from bench.gpu import attempt, markdown, mfu, peak_tflops, search_largest

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_cpu_run_writes_json_and_table(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--chunk-size",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["peak_tflops"] is None
    assert r["skipped"] == [] and r["errors"] == {}
    emb, frames = r["train"]["embeddings"], r["train"]["frames"]
    for t in (emb, frames):
        assert t["samples_per_s"] > 0 and t["param_dtype"] == "bfloat16"  # DeepSpeed's bf16
        assert t["mfu"] is None and t["peak_memory_gib"] is None  # no peak known on CPU
    # 15 target frames through the vision tower and the Q-Former cost more than packed embeddings
    assert frames["tflop_per_sample"] > 3 * emb["tflop_per_sample"] > 0
    f = r["faiss"]
    assert f["sides"] == ["cpu"] and f["reference"]["device"] == "cpu"
    exact = f["exact"]["cpu"]  # FAISS against an independent torch search: the same neighbours
    assert exact["top10_vs_reference"] >= 99.9 and exact["max_score_diff"] < 1e-4
    assert 50 < f["ivf"]["cpu"]["top10_vs_reference"] < 100  # approximate: some found, not all
    assert set(r["largest_batch"]) == {"embeddings", "frames", "embeddings train.chunk_size=2"}
    for s in r["largest_batch"].values():
        assert s["largest"] >= r["train"][s["targets"]]["batch_size"] and s["tries"]
        assert all(t["fits"] and t["engines_alive"] == 0 for t in s["tries"])  # each try freed
    assert emb["engines_alive"] == frames["engines_alive"] == 0
    assert "| targets | batch | samples/s |" in proc.stdout and "| ivf | cpu |" in proc.stdout


def test_search_doubles_then_bisects_to_the_limit():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 300

    lo, hi = search_largest(fits, 32, 8192)
    assert calls[:5] == [32, 64, 128, 256, 512]
    assert lo <= 300 < hi and hi - lo <= lo // 8
    calls.clear()
    assert search_largest(fits, 512, 8192, known=256)[0] >= 263 and calls[0] == 512
    assert search_largest(lambda b: True, 8, 100) == (64, None)  # capped, no OOM seen
    assert search_largest(lambda b: b <= 5, 32, 100) == (5, 6)  # even the start does not fit


def test_out_of_memory_is_a_failed_try_and_its_tensors_are_freed():
    held = []

    def oom():
        t = torch.empty(1000)
        held.append(weakref.ref(t))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert attempt(oom) is None
    assert held[0]() is None  # nothing (e.g. a kept traceback) holds the failed step's tensors
    assert attempt(lambda: {"ok": 1}) == {"ok": 1}

    def cublas():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")

    assert attempt(cublas) is None

    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # real errors are not swallowed
        attempt(bug)


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_tflops("cpu") is None and peak_tflops("Tesla T4") is None
    assert mfu(1.5e12, 200, 989.4) == pytest.approx(0.3032, abs=1e-4)
    assert mfu(1.5e12, 200, None) is None


def test_markdown_table_of_a_gpu_report():
    train = {
        "targets": "embeddings",
        "batch_size": 256,
        "samples_per_s": 212.5,
        "step_s": 1.2047,
        "peak_memory_gib": 31.25,
        "tflop_per_sample": 1.4207,
        "achieved_tflops": 301.9,
        "mfu": 0.3051,
    }
    fit = {
        "targets": "embeddings",
        "overrides": [],
        "largest": 3072,
        "first_oom": 3584,
        "stopped_by_budget": False,
        "tries": [{}] * 5,
    }
    report = {
        "device": "NVIDIA H100 80GB HBM3",
        "size": "full",
        "peak_tflops": 989.4,
        "versions": {"torch": "2.13.0", "deepspeed": "0.19.8", "faiss": "1.15.1"},
        "train": {"embeddings": train},
        "faiss": {
            "gallery": 1_000_000,
            "dim": 256,
            "queries": 10_000,
            "k": 10,
            "sides": ["cpu", "gpu"],
            "reference": {"device": "cuda", "queries_per_s": 41000.0},
            "exact": {
                side: {
                    "build_s": 0.5,
                    "queries_per_s": qps,
                    "top10_vs_reference": 100.0,
                    "max_score_diff": 2e-6,
                }
                for side, qps in (("cpu", 900.0), ("gpu", 52000.0))
            },
            "ivf": {
                "nlist": 4000,
                "nprobe": 32,
                "cpu": {
                    "build_s": 60.0,
                    "queries_per_s": 8000.0,
                    "top10_vs_reference": 93.5,
                    "max_score_diff": 0.1,
                },
                "gpu": {
                    "build_s": 1.0,
                    "queries_per_s": 90000.0,
                    "top10_vs_reference": 93.4,
                    "max_score_diff": 0.1,
                    "top10_vs_cpu": 99.8,
                },
            },
        },
        "largest_batch": {"embeddings": fit},
        "skipped": ["train/frames"],
    }
    table = markdown(report)
    assert "| embeddings | 256 | 212.5 | 1205 ms | 31.2 GiB | 1.421 | 302 | 30.5% |" in table
    assert "| embeddings | - | 3072 | 3584 | 5 |" in table
    assert "| exact | gpu | 0.50 s | 52,000 | 100.00% | 2.0e-06 |" in table
    assert "| ivf | cpu | 60.00 s | 8,000 | 93.50% | 1.0e-01 |" in table
    assert "GPU against CPU top-10 agreement 99.80%" in table
    assert "Skipped (time budget, or its measurement failed): train/frames" in table
