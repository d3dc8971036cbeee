"""Learning check: the composed model against text-only and image-only variants of itself.

Trains the same tiny BLIP-2 CoVR model (random init, everything trainable, CPU) three times on
the synthetic corpus's train split, changing only the combiner (`fusion` = composed, `text`,
`image`), and reports R@1 / R@5 on the held-out test split (gallery = the test targets, the
query's own video removed).

    python bench/ablation.py [--steps 800] [--out runs/ablation]
"""

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from configs.schema import (  # noqa: E402
    LossConfig,
    MiningConfig,
    ModelConfig,
    SamplerConfig,
    SynthConfig,
    TextSize,
    VisionSize,
)
from data.corpus import build_synthetic  # noqa: E402
from data.tokenizer import build_vocab_tokenizer  # noqa: E402
from data.video import load_frames  # noqa: E402
from data.webvid_covr import read_annotations, video_path  # noqa: E402
from eval.metrics import recall_at_k  # noqa: E402
from eval.similarity import similarity  # noqa: E402
from sharding.batch import Task, collate, query_inputs  # noqa: E402
from sharding.records import masked_caption_group  # noqa: E402
from sharding.samplers import BatchComposer  # noqa: E402
from train.models import build_model  # noqa: E402
from train.objective import covr_loss  # noqa: E402

TARGET_FRAMES = 4


def model_config(combiner: str) -> ModelConfig:
    return ModelConfig(
        arch="blip2",
        vision=VisionSize(
            hidden_size=64, layers=2, heads=4, intermediate_size=128, image_size=64, patch_size=8
        ),
        text=TextSize(
            hidden_size=64,
            layers=2,
            heads=4,
            intermediate_size=128,
            cross_attention_frequency=1,
            max_position_embeddings=64,
        ),
        num_query_tokens=8,
        embed_dim=64,
        max_text_len=24,
        freeze_vision=False,
        train_target_encoder=True,
        combiner=combiner,
        target_frames=TARGET_FRAMES,
    )


def load_split_samples(root: Path, split: str, target_index: dict) -> list[dict]:
    cache: dict = {}

    def frames(pth, n):
        if (pth, n) not in cache:
            cache[(pth, n)] = load_frames(video_path(root / "videos", pth), n=n)
        return cache[(pth, n)]

    samples = []
    for t in read_annotations(root / f"{split}.csv"):
        samples.append(
            {
                "query_frames": frames(t.pth1, 1),
                "target_frames": frames(t.pth2, TARGET_FRAMES),
                "edit": t.edit,
                "scores": [],
                "target_id": target_index.setdefault(t.pth2, len(target_index)),
                "pth1": t.pth1,
                "pth2": t.pth2,
                "group": masked_caption_group(t.txt1, t.txt2),
            }
        )
    return samples


@torch.no_grad()
def evaluate(model, samples, tok, cfg) -> dict:
    model.eval()
    queries, targets = [], []
    for i in range(0, len(samples), 64):
        b = collate(samples[i : i + 64], tok, cfg.vision.image_size, cfg.max_text_len)
        queries.append(model(Task.ENCODE_QUERY, *query_inputs(b)))
        targets.append(
            model(Task.ENCODE_TARGET, b["target_frames"], b["target_scores"], b["target_mask"])
        )
    scores = similarity(torch.cat(queries), torch.cat(targets), cfg.reduce)
    for qi, s in enumerate(samples):  # the query's own video is never an answer
        for gi, g in enumerate(samples):
            if g["pth2"] == s["pth1"]:
                scores[qi, gi] = float("-inf")
    model.train()
    return recall_at_k(scores, torch.arange(len(samples)), ks=(1, 5, 10))


def batches(samples: list[dict], batch_size: int, sampler: str, seed: int):
    """Endless batches: the training split reshuffled every pass, composed by `sampler`."""
    rng = random.Random(seed)
    composer = BatchComposer(SamplerConfig(sampler, buffer=8 * batch_size), batch_size, seed=seed)
    while True:
        yield from composer(rng.sample(samples, len(samples)))


def train_variant(combiner, train, test, tok, steps, batch_size, seed, lr, sampler) -> dict:
    cfg = model_config(combiner)
    torch.manual_seed(seed)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for samples in itertools.islice(batches(train, batch_size, sampler, seed), steps):
        batch = collate(samples, tok, cfg.vision.image_size, cfg.max_text_len)
        loss, _ = covr_loss(model, batch, LossConfig(beta=0.5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    result = evaluate(model, test, tok, cfg)
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--sampler", default="mix", help="random | hns | fs | mix")
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", default="composed,composed-mlp,text-only,image-only")
    args = parser.parse_args()
    root = Path(args.out) / "corpus"
    build_synthetic(
        root,
        SynthConfig(videos=args.videos, size=64),
        MiningConfig(val_fraction=0.05, test_fraction=0.2),
    )
    target_index: dict = {}
    train = load_split_samples(root, "train", target_index)
    test = load_split_samples(root, "test", target_index)
    texts = [s["edit"] for s in train + test] + [
        line for line in (root / "captions.csv").read_text().splitlines()
    ]
    tok = build_vocab_tokenizer(texts, Path(args.out) / "tokenizer")
    torch.set_num_threads(2)
    print(f"train {len(train)} triplets, test {len(test)} queries (gallery {len(test)})")
    results = {}
    variants = {
        "composed": "fusion",
        "composed-mlp": "mlp",
        "composed-avg": "avg",
        "text-only": "text",
        "image-only": "image",
    }
    for name in args.variants.split(","):
        results[name] = train_variant(
            variants[name],
            train,
            test,
            tok,
            args.steps,
            args.batch_size,
            args.seed,
            args.lr,
            args.sampler,
        )
        r = results[name]
        print(
            f"{name:>10}: R@1 {r[1]:5.1f}  R@5 {r[5]:5.1f}  R@10 {r[10]:5.1f}  ({r['seconds']:.0f} s)",
            flush=True,
        )
    chance = 100.0 / len(test)
    print(f"chance R@1 {chance:.1f}")


if __name__ == "__main__":
    main()
