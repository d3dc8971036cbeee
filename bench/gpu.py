"""One command for a lent GPU: what the full-size CoVR-2 model does on one device, and FAISS there.

    python bench/gpu.py [--out gpu.json] [--peak-tflops 989] [--budget-s 540] [key=value ...]
    python bench/gpu.py --size tiny --device cpu     # CI: the same code paths, in seconds

Sections (the JSON is rewritten after each; one that would not finish within the time budget
is skipped and listed under "skipped"): training with packed embeddings, with frames, the largest
batch with embeddings, FAISS, the largest batch with frames. What they measure:

1. training: the CoVR-2 recipe (configs/covr2_blip2.yaml: EVA ViT-g/14 at 364 px, frozen; BERT-base
   Q-Former, 32 query tokens; video + caption HN-NCE) from random weights, bf16, DeepSpeed ZeRO-2
   on one device, the engine from `train.engine.build_engine` and the project's DeepSpeed config;
   targets from embedded shards (what `launch/embed_targets.py` writes) and from 15 frames. Reported:
   samples/s, peak memory (torch.cuda.max_memory_allocated), model FLOPs per sample counted by
   torch.utils.flop_counter over one forward+backward on the real shapes (activation
   recomputation not counted), and MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s;
2. FAISS: a 1M x 256 gallery, exact and IVF search (indexes built by eval.search) on the CPU and
   the GPU, each against an exact torch search (top-10 agreement, largest score difference; for
   IVF its recall), the GPU's IVF also against the CPU's; on `--device cpu` the CPU side only,
   still checked against the torch reference;
3. the largest per-device batch that fits, per target kind (`largest_batch`: doubling, then
   bisecting on out-of-memory); with `--chunk-size N ...` also with packed embeddings and
   `train.chunk_size=N` (the gradient cache: the batch's loss in one piece, its activations one
   chunk at a time), per N.

Trailing `key=value` arguments override the config (as in launch/train.py), e.g.
`deepspeed.activation_checkpointing=false`. The batches are synthetic and already on the device:
this measures the model step, not the data loader. A section that fails is recorded under
"errors" and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from configs import load_config  # noqa: E402
from data.tokenizer import build_vocab_tokenizer  # noqa: E402
from train.engine import (  # noqa: E402
    build_engine,
    deepspeed_config,
    enable_activation_checkpointing,
    init_distributed,
)
from train.gradcache import chunked_backward  # noqa: E402
from train.models import build_model  # noqa: E402
from train.objective import COVR, covr_loss  # noqa: E402
from train.optim import build_optimizer  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "covr2_blip2.yaml"
BASE = ["model.pretrained=null", "deepspeed.precision=bf16", "deepspeed.zero_stage=2"]
SIZES = {  # overrides on top of the CoVR-2 config; `full` is the config itself
    "full": [],
    "tiny": [
        "model.vision.hidden_size=32",
        "model.vision.layers=2",
        "model.vision.heads=2",
        "model.vision.intermediate_size=64",
        "model.vision.image_size=32",
        "model.vision.patch_size=8",
        "model.text.hidden_size=32",
        "model.text.layers=2",
        "model.text.heads=2",
        "model.text.intermediate_size=64",
        "model.text.cross_attention_frequency=1",
        "model.text.max_position_embeddings=64",
        "model.num_query_tokens=4",
        "model.embed_dim=16",
        "model.max_text_len=12",
        "train.batch_size=8",
    ],
}
BERT_VOCAB = 30522  # the Q-Former's word embeddings (bert-base-uncased)
TARGETS = ("embeddings", "frames")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. First match of
# all the substrings in the upper-cased device name wins, so the specific names come first.
PEAK_BF16_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H200", "NVL"), 835.0),
    (("GH200",), 989.4),
    (("H200",), 989.4),
    (("H100",), 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),  # SXM4 and PCIe alike
    (("L40S",), 362.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, None when unknown (MFU is then not reported)."""
    name = device_name.upper()
    for parts, value in PEAK_BF16_TFLOPS:
        if all(p in name for p in parts):
            return value
    return None


def mfu(flops_per_sample: float, samples_per_s: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_sample * samples_per_s / (peak * 1e12)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# --- building one training set-up -------------------------------------------------------------


class Bench:
    """Size, device and the user's overrides; builds engines and batches on demand."""

    def __init__(self, size: str, device: str, overrides: list[str], tmp: str):
        self.size, self.overrides = size, list(overrides)
        self.device = torch.device(device)
        words = WORDS_TINY if size == "tiny" else " ".join(f"w{i}" for i in range(BERT_VOCAB))
        self.tok = build_vocab_tokenizer([words], Path(tmp) / "tok")

    def config(self, overrides=(), batch_size: int | None = None):
        extra = [f"train.batch_size={batch_size}"] if batch_size else []
        return load_config(CONFIG, [*BASE, *SIZES[self.size], *self.overrides, *overrides, *extra])

    @contextlib.contextmanager
    def engine(self, cfg):
        """A fresh engine, destroyed after use: DeepSpeed keeps global references to its modules
        otherwise, and the next try would find this one's memory still taken."""
        torch.manual_seed(cfg.train.seed)
        with self.device:  # weights initialised where they will live (1.2B of them at full size)
            model = build_model(cfg.model, self.tok)
        if cfg.deepspeed.activation_checkpointing:
            enable_activation_checkpointing(model)
        params = model.trainable_parameters()
        engine, _, _ = build_engine(
            model, params, build_optimizer(params, cfg.optim), None, deepspeed_config(cfg)
        )
        try:
            yield engine
        finally:
            engine.destroy()

    def batch(self, cfg, b: int, targets: str) -> dict:
        """A batch of the shapes and dtypes `train.batch.collate` makes (fp32 frames), made on
        the device: the loader's copy (pinned, non-blocking) is not what is measured here."""
        m, s = cfg.model, cfg.model.vision.image_size
        ft, length = cfg.shards.target_frames, m.max_text_len
        with self.device:
            ids = torch.randint(len(self.tok.all_special_ids), len(self.tok), (b, length))
            batch = {
                "query_frames": torch.randn(b, cfg.shards.query_frames, 3, s, s),
                "input_ids": ids,
                "attention_mask": torch.ones(b, length, dtype=torch.long),
                "target_scores": torch.rand(b, ft),
                "target_mask": torch.ones(b, ft, dtype=torch.bool),
                "target_ids": torch.arange(b),
            }
            if targets == "embeddings":
                emb = torch.randn(b, ft, m.num_query_tokens, m.embed_dim)
                batch["target_embeddings"] = torch.nn.functional.normalize(emb, dim=-1)
            else:
                batch["target_frames"] = torch.randn(b, ft, 3, s, s)
            if cfg.loss.caption_weight > 0:
                batch["caption_input_ids"] = ids.roll(1, 0)
                batch["caption_attention_mask"] = torch.ones(b, length, dtype=torch.long)
        return batch


WORDS_TINY = "a red blue green circle square moving left right make it replace with change to"


def train_step(engine, batch, cfg) -> None:
    if cfg.train.chunk_size:  # gradient cache: activations of one chunk at a time
        chunked_backward(engine, batch, COVR, cfg.loss, cfg.train.chunk_size)
    else:
        loss, _ = covr_loss(engine, batch, cfg.loss)
        engine.backward(loss)
    engine.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> dict:
    """Free what the last set-up left (call once its engine is unreachable); report what is
    still held: GiB of device memory and live DeepSpeed engines (both 0 unless something leaks)."""
    gc.collect()
    engines = sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())
    if device.type != "cuda":
        return {"memory_left_gib": None, "engines_alive": engines}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return {
        "memory_left_gib": torch.cuda.memory_allocated(device) / 2**30,
        "engines_alive": engines,
    }


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS / cuDNN workspaces that cannot be allocated surface as plain RuntimeErrors
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
    )


def attempt(run: Callable[[], dict]) -> dict | None:
    """`run()`'s result, or None when it ran out of device memory. Memory is freed after both,
    outside the `except` block (the traceback holds the failed step's tensors until then)."""
    try:
        result = run()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        result = None
    return result


def count_flops(bench: Bench, cfg, targets: str, b: int = 4) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted on a plain copy of the
    model in the engine's precision (the same operators and shapes as under DeepSpeed, whose own
    work adds none), without activation recomputation: model FLOPs, the MFU convention."""
    torch.manual_seed(cfg.train.seed)
    with bench.device:
        model = build_model(cfg.model, bench.tok)
    if cfg.deepspeed.precision == "bf16":
        model.bfloat16()
    batch = bench.batch(cfg, b, targets)
    with FlopCounterMode(display=False) as counter:
        loss, _ = covr_loss(model, batch, cfg.loss)
        loss.backward()
    return counter.get_total_flops() / b


def measure(bench: Bench, targets: str, batch_size: int, steps: int, peak: float | None) -> dict:
    """Throughput, peak memory and MFU of training steps at `batch_size`."""
    cfg = bench.config(batch_size=batch_size)
    with bench.engine(cfg) as engine:
        result = _measure(bench, engine, cfg, targets, batch_size, steps)
    release(bench.device)
    flops = count_flops(bench, cfg, targets)  # a second model: only after the engine is gone
    rate = result["samples_per_s"]
    return {
        **result,
        "tflop_per_sample": flops / 1e12,
        "achieved_tflops": flops * rate / 1e12,
        "mfu": mfu(flops, rate, peak),
    }


def _measure(bench, engine, cfg, targets, batch_size, steps) -> dict:
    batch = bench.batch(cfg, batch_size, targets)
    for _ in range(2):  # warm-up: optimizer state, allocator, kernels
        train_step(engine, batch, cfg)
    sync(bench.device)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, batch, cfg)
    sync(bench.device)
    step_s = (time.perf_counter() - start) / steps
    rate = batch_size / step_s
    peak_mem = (
        torch.cuda.max_memory_allocated(bench.device) / 2**30
        if bench.device.type == "cuda"
        else None
    )
    return {
        "targets": targets,
        "batch_size": batch_size,
        "steps": steps,
        "step_s": step_s,
        "samples_per_s": rate,
        "peak_memory_gib": peak_mem,
        "param_dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
    }


def train_section(bench, targets, batch_size, steps, peak) -> dict:
    """`measure`, halving the batch until it fits (the recipe's 256 may not at full size)."""
    requested, start = batch_size, time.perf_counter()
    while batch_size >= 1:
        result = attempt(lambda b=batch_size: measure(bench, targets, b, steps, peak))
        left = release(bench.device)
        if result is not None:
            return {
                **result,
                **left,
                "requested_batch_size": requested,
                "section_s": time.perf_counter() - start,
            }
        batch_size //= 2
    raise RuntimeError(f"{targets}: not even batch 1 fits on {bench.device}")


# --- the largest batch --------------------------------------------------------------------------


def search_largest(
    fits: Callable[[int], bool], start: int, cap: int, known: int = 0, resolution: int = 8
):
    """(largest size that fits, smallest that does not or None): doubling from `start` up to
    `cap`, then bisecting until the gap is at most 1/`resolution` of the fit. `known` is a size
    already known to fit (0: none). Assumes that what fits at b fits at every smaller b."""
    lo, hi, b = known, None, start
    while b <= cap:
        if not fits(b):
            hi = b
            break
        lo, b = b, 2 * b
    if hi is None:
        return lo, None
    while hi - lo > max(1, lo // resolution):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def largest_batch(
    bench: Bench,
    overrides: list[str],
    targets: str,
    known: int,
    cap: int,
    deadline: Deadline,
    s_per_sample: float,
) -> dict:
    """The largest per-device batch whose training steps fit in memory under the config with
    `overrides` (e.g. ["deepspeed.activation_checkpointing=false"]; a chunk-size sweep adds its
    key here), doubling from `known` (a batch that fits, e.g. the measured one) up to `cap`.
    Each try builds a fresh engine and runs two steps (the second with the optimizer state
    allocated: the peak), then frees everything. A try the deadline cannot afford (from
    `s_per_sample`, the measured step time per sample) ends the search as 'stopped'."""
    tries: list[dict] = []
    stopped = False

    def run(b: int) -> dict:
        cfg = bench.config(overrides, batch_size=b)
        with bench.engine(cfg) as engine:
            batch = bench.batch(cfg, b, targets)
            for _ in range(2):
                train_step(engine, batch, cfg)
            sync(bench.device)
        if bench.device.type == "cuda":
            return {"peak_memory_gib": torch.cuda.max_memory_allocated(bench.device) / 2**30}
        return {}

    def fits(b: int) -> bool:
        nonlocal stopped
        if stopped or deadline.left() < 30 + 4 * b * s_per_sample:
            stopped = True
            return False  # treated as a failure so the search ends; reported as 'stopped'
        start_t = time.perf_counter()
        result = attempt(lambda: run(b))
        left = release(bench.device)
        tries.append(
            {
                "batch_size": b,
                "fits": result is not None,
                **(result or {}),
                **left,
                "seconds": time.perf_counter() - start_t,
            }
        )
        return result is not None

    best, first_oom = search_largest(fits, 2 * known, cap, known)
    return {
        "targets": targets,
        "overrides": overrides,
        "largest": best,
        "first_oom": None if stopped else first_oom,
        "cap": cap,
        "stopped_by_budget": stopped,
        "tries": tries,
    }


# --- FAISS ------------------------------------------------------------------------------------


def gallery(n: int, d: int, nq: int, seed: int = 0):
    """Clustered unit vectors (like embeddings: neighbourhoods, not isotropic noise) and queries
    near gallery items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 250), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def reference_topk(x: np.ndarray, q: np.ndarray, k: int, device: str, block: int = 2048):
    """Exact top-k by a torch matrix product in query blocks: the reference every FAISS index is
    checked against (independent of FAISS, so the CPU run's check can fail too)."""
    gallery_t = torch.from_numpy(x).to(device)
    scores, ids = [], []
    for i in range(0, len(q), block):
        s = torch.from_numpy(q[i : i + block]).to(device) @ gallery_t.T
        top = s.topk(k, dim=1)
        scores.append(top.values.cpu().numpy())
        ids.append(top.indices.cpu().numpy())
    return np.concatenate(scores), np.concatenate(ids)


def faiss_section(n: int, d: int, nq: int, k: int, gpu: bool) -> dict:
    """Exact and IVF search, FAISS on the CPU (and on the GPU with `gpu`), each checked against
    the torch reference: top-10 agreement and largest score difference (exact), top-10 recall
    (IVF); the GPU's IVF also against the CPU's (the same trained index, so the same cells)."""
    import faiss

    start = time.perf_counter()

    from eval.search import IndexSpec, build_index, gpu_available, search, topk_agreement

    if gpu and not gpu_available():
        raise RuntimeError("faiss has no GPU: install the [gpu] extra (README, GPU machines)")
    x, q = gallery(n, d, nq)
    sides = ["cpu", "gpu"] if gpu else ["cpu"]
    result = {"gallery": n, "dim": d, "queries": nq, "k": k, "sides": sides}
    (ref_scores, ref_ids), ref_s = _timed(lambda: reference_topk(x, q, k, "cuda" if gpu else "cpu"))
    result["reference"] = {"device": "cuda" if gpu else "cpu", "queries_per_s": nq / ref_s}
    m = min(10, k)

    def measure(index, build_s) -> tuple[dict, np.ndarray, np.ndarray]:
        (scores, ids), search_s = _timed(lambda: search(index, q, k))
        row = {
            "build_s": build_s,
            "queries_per_s": nq / search_s,
            "top10_vs_reference": topk_agreement(ref_ids, ids, m),
            "max_score_diff": float(np.abs(scores - ref_scores).max()),
        }
        return row, scores, ids

    result["exact"] = {}
    for side in sides:
        spec = IndexSpec("flat", gpu=side == "gpu")
        index, build_s = _timed(lambda spec=spec: build_index(x, spec))
        result["exact"][side] = measure(index, build_s)[0]
        del index
    ivf_cpu, build_s = _timed(lambda: build_index(x, IndexSpec("ivf")))
    row, _, cpu_ids = measure(ivf_cpu, build_s)
    result["ivf"] = {"nlist": ivf_cpu.nlist, "nprobe": ivf_cpu.nprobe, "cpu": row}
    if gpu:
        res = faiss.StandardGpuResources()
        ivf_gpu, build_s = _timed(lambda: faiss.index_cpu_to_gpu(res, 0, ivf_cpu))
        ivf_gpu.nprobe = ivf_cpu.nprobe  # the same cells visited on both sides
        row, _, gpu_ids = measure(ivf_gpu, build_s)
        row["top10_vs_cpu"] = topk_agreement(cpu_ids, gpu_ids, m)
        result["ivf"]["gpu"] = row
    result["section_s"] = time.perf_counter() - start
    return result


# --- report -------------------------------------------------------------------------------------


def _fmt(value, spec=".1f", unit="", none="n/a") -> str:
    return none if value is None else format(value, spec) + unit


def markdown(r: dict) -> str:
    """The tables for bench/RESULTS.md."""
    lines = [
        f"Device: {r['device']} ({r['size']} size; peak bf16 {_fmt(r['peak_tflops'], '.0f')} "
        f"TFLOP/s; torch {r['versions']['torch']}, DeepSpeed {r['versions']['deepspeed']}, "
        f"FAISS {r['versions']['faiss']})",
        "",
        "| targets | batch | samples/s | step | peak memory | TFLOP/sample | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in r["train"].values():
        lines.append(
            f"| {t['targets']} | {t['batch_size']} | {t['samples_per_s']:.1f} | {t['step_s'] * 1e3:.0f} ms "
            f"| {_fmt(t['peak_memory_gib'], '.1f', ' GiB')} | {t['tflop_per_sample']:.4g} "
            f"| {t['achieved_tflops']:.3g} | {_fmt(t['mfu'] and 100 * t['mfu'], '.1f', '%')} |"
        )
    if r.get("faiss"):
        f = r["faiss"]
        lines += [
            "",
            f"FAISS, {f['gallery']:,} x {f['dim']} gallery, {f['queries']:,} queries, "
            f"top-{f['k']}, against an exact torch search on {f['reference']['device']} "
            f"({f['reference']['queries_per_s']:,.0f} queries/s):",
            "",
            "| index | on | build | queries/s | top-10 vs reference | max score diff |",
            "|---|---|---|---|---|---|",
        ]
        for kind in ("exact", "ivf"):
            for side in f["sides"]:
                s = f[kind][side]
                lines.append(
                    f"| {kind} | {side} | {s['build_s']:.2f} s | {s['queries_per_s']:,.0f} "
                    f"| {s['top10_vs_reference']:.2f}% | {s['max_score_diff']:.1e} |"
                )
        ivf = f["ivf"]
        gpu_cpu = (
            f", GPU against CPU top-10 agreement {ivf['gpu']['top10_vs_cpu']:.2f}%"
            if "gpu" in ivf
            else ""
        )
        lines.append(f"\nIVF: nlist {ivf['nlist']}, nprobe {ivf['nprobe']}{gpu_cpu}")
    if r.get("largest_batch"):
        lines += [
            "",
            "| targets | overrides | largest batch that fits | first OOM | tries |",
            "|---|---|---|---|---|",
        ]
        for s in r["largest_batch"].values():
            top = f"{s['largest']}" + (
                " (cap)" if s["first_oom"] is None and not s["stopped_by_budget"] else ""
            )
            top += " (budget)" if s["stopped_by_budget"] else ""
            lines.append(
                f"| {s['targets']} | {' '.join(s['overrides']) or '-'} | {top} "
                f"| {_fmt(s['first_oom'], 'd', none='-')} | {len(s['tries'])} |"
            )
    if r["skipped"]:
        lines.append(
            "\nSkipped (time budget, or its measurement failed): " + ", ".join(r["skipped"])
        )
    for name, err in r.get("errors", {}).items():
        lines.append(f"\nFAILED {name}: {err.splitlines()[0]}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (default: table)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting work after this")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per measure")
    parser.add_argument(
        "--frames-batch-size",
        type=int,
        default=16,
        help="batch for targets from frames (15 ViT-g passes per sample)",
    )
    parser.add_argument("--max-batch", type=int, default=8192, help="largest batch tried")
    parser.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also the largest batch with train.chunk_size=N (embeddings)",
    )
    parser.add_argument("--faiss-gallery", type=int, default=1_000_000)
    parser.add_argument("--faiss-queries", type=int, default=10_000)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    deadline, started = Deadline(args.budget_s), time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu (and --size tiny)")

    init_distributed(600)  # the project's start-up: NCCL on a GPU, gloo on CPU
    import deepspeed
    import faiss

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    report = {
        "device": name,
        "size": args.size,
        "peak_tflops": peak,
        "overrides": args.overrides,
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "faiss": faiss.__version__,
        },
        "train": {},
        "faiss": None,
        "largest_batch": {},
        "skipped": [],
        "errors": {},
    }

    def save():
        report["elapsed_s"] = time.perf_counter() - started
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    def guarded(name: str, fn):
        """A failing section is recorded and the next one runs: a lent GPU's minutes are scarce."""
        try:
            return fn()
        except Exception as err:
            traceback.print_exc()
            report["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
            release(torch.device(args.device))
            return None
        finally:
            save()

    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.size, args.device, args.overrides, tmp)
        cfg = bench.config()
        batch_sizes = {"embeddings": cfg.train.batch_size, "frames": args.frames_batch_size}
        if args.size == "tiny":
            batch_sizes["frames"] = min(batch_sizes["frames"], cfg.train.batch_size)
        for targets in TARGETS:
            if deadline.left() < 60:
                report["skipped"].append(f"train/{targets}")
                continue
            result = guarded(
                f"train/{targets}",
                lambda t=targets: train_section(bench, t, batch_sizes[t], args.steps, peak),
            )
            if result is not None:
                report["train"][targets] = result
                print(f"train/{targets}: {result}", flush=True)
        cap = (
            args.max_batch if args.size == "full" else min(args.max_batch, 2 * cfg.train.batch_size)
        )
        faiss_reserve = 150 if args.size == "full" else 0  # IVF training on the CPU takes a while

        def fit(targets: str, until: Deadline, overrides: tuple[str, ...] = ()) -> None:
            """One largest-batch search; a sweep (e.g. over train.chunk_size) calls it per value."""
            key, overrides = " ".join([targets, *overrides]), list(overrides)
            measured = report["train"].get(targets)
            if measured is None:
                return report["skipped"].append(f"largest_batch/{key}")
            s_per_sample = measured["step_s"] / measured["batch_size"]
            result = guarded(
                f"largest_batch/{key}",
                lambda: largest_batch(
                    bench, overrides, targets, measured["batch_size"], cap, until, s_per_sample
                ),
            )
            if result is not None:
                report["largest_batch"][key] = result
                print(f"largest batch/{key}: {result}", flush=True)

        fit("embeddings", Deadline(deadline.left() - faiss_reserve))
        for chunk in args.chunk_size:  # the gradient cache lifts the limit: by how much
            fit(
                "embeddings",
                Deadline(deadline.left() - faiss_reserve),
                (f"train.chunk_size={chunk}",),
            )
        n = args.faiss_gallery if args.size == "full" else min(args.faiss_gallery, 20_000)
        nq = args.faiss_queries if args.size == "full" else min(args.faiss_queries, 500)
        if deadline.left() > 60:
            report["faiss"] = guarded(
                "faiss", lambda: faiss_section(n, 256, nq, 10, gpu=args.device == "cuda")
            )
            print(f"faiss: {report['faiss']}", flush=True)
        else:
            report["skipped"].append("faiss")
        fit("frames", deadline)
    save()
    print("\n" + markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
