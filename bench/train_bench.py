"""Objective benchmarks, side by side in one run:
1. step time (forward, HN-NCE, backward, AdamW) with a 65,536-entry hard-negative queue against
   no queue, on a BLIP-2 CoVR model (`tiny`: the unit-test size; `base`: ViT and Q-Former of
   BERT-base width, 4 layers each) with packed (frozen) target embeddings; goal <= 1.15x;
2. forward+backward time per sample of that model.

    python bench/train_bench.py [--size tiny|base] [--steps 30] [--batch-size 64] [--queue 65536]
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from configs.schema import (  # noqa: E402
    LossConfig,  # noqa: E402
    TextSize,
    VisionSize,
)
from data.tokenizer import build_vocab_tokenizer  # noqa: E402
from tests.tiny import WORDS, tiny_model_config  # noqa: E402
from train.models import build_model  # noqa: E402
from train.objective import covr_loss  # noqa: E402
from train.queue import TargetQueue  # noqa: E402

SIZES = {  # tiny: the unit-test model; base: ViT and Q-Former of BERT-base width, 4 layers each
    "tiny": {},
    "base": dict(
        vision=VisionSize(768, 4, 12, 3072, 32, 8),
        text=TextSize(768, 4, 12, 3072, 1, 64),
        num_query_tokens=32,
        embed_dim=256,
    ),
}


def model_and_batch(tmp, size="tiny", batch_size=32):
    torch.manual_seed(0)
    cfg = replace(tiny_model_config("blip2"), **SIZES[size])
    tok = build_vocab_tokenizer([WORDS], Path(tmp) / "tok")
    model = build_model(cfg, tok)
    return model, make_batch(tok, batch_size, cfg.embed_dim, cfg.num_query_tokens)


def make_batch(tok, b, embed_dim, tokens, frames=15):
    enc = tok(
        ["replace circle with square"] * b, padding="max_length", max_length=12, return_tensors="pt"
    )
    return {
        "query_frames": torch.randn(b, 1, 3, 32, 32),
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "target_embeddings": torch.nn.functional.normalize(
            torch.randn(b, frames, tokens, embed_dim), dim=-1
        ),
        "target_scores": torch.rand(b, frames),
        "target_mask": torch.ones(b, frames, dtype=torch.bool),
        "target_ids": torch.randint(0, 10**6, (b,)),
    }


def timed_steps(model, opt, batch, queue, steps) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = covr_loss(model, batch, LossConfig(), queue)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = model_and_batch(tmp, args.size, args.batch_size)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    queue = TargetQueue(args.queue, (1, model.hf.config.image_text_hidden_size))
    while queue.filled < queue.size:  # a full queue: the worst case
        queue.enqueue(
            torch.nn.functional.normalize(
                torch.randn(4096, 1, model.hf.config.image_text_hidden_size), dim=-1
            ),
            torch.arange(4096),
        )
    timed_steps(model, opt, batch, None, 3)  # warm-up
    timed_steps(model, opt, batch, queue, 3)
    plain, queued = [], []
    for _ in range(3):  # interleaved rounds
        plain.append(timed_steps(model, opt, batch, None, args.steps))
        queued.append(timed_steps(model, opt, batch, queue, args.steps))
    p, q = min(plain), min(queued)
    print(
        f"step time: no queue {p * 1e3:.1f} ms, queue {args.queue} {q * 1e3:.1f} ms, ratio {q / p:.3f}"
    )
    print(
        f"forward+backward+AdamW per sample ({args.size} model, batch {args.batch_size}): {p / args.batch_size * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
