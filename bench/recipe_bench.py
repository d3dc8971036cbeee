"""Compute of the training recipe against the reference's way, side by side in one run:
1. FLOPs per training sample of the full-size recipes (configs/covr2_blip2.yaml: EVA ViT-g/14 at
   364 px + BERT-base Q-Former; configs/covr_blip.yaml: ViT-L/16 at 384 px + BERT-base), counted
   by torch's FlopCounterMode on the real shapes on the meta device (no weights): our training
   step (`train.objective.covr_loss` + backward) on embedded shards (launch/embed_targets.py) and
   on JPEG shards (targets re-encoded by the frozen copy at every step), against the reference's
   way written out from its code (one ViT forward of the query frame, the fusion forward and
   backward, precomputed targets); goal <= 1.1x;
2. measured step time per sample (forward, loss, backward, AdamW) at `base` size on CPU, embedded
   against JPEG-shard targets.

    python bench/recipe_bench.py [--batch-size 16] [--steps 3]
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from configs import load_config  # noqa: E402
from data.tokenizer import build_vocab_tokenizer  # noqa: E402
from tests.tiny import WORDS, tiny_model_config  # noqa: E402
from train.losses import hn_nce  # noqa: E402
from train.models import build_model  # noqa: E402
from train.objective import covr_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"blip2": ROOT / "configs/covr2_blip2.yaml", "blip": ROOT / "configs/covr_blip.yaml"}


def batch_for(model, b: int, frames: int, embedded: bool, device="meta") -> dict:
    """A training batch of the recipe's shapes (`embedded`: what embedded shards give)."""
    c, size = model.cfg, model.hf.config.vision_config.image_size
    q, d = (model.hf.config.num_query_tokens if c.arch == "blip2" else 1), c.embed_dim
    ids = torch.ones(b, c.max_text_len, dtype=torch.long, device=device)
    batch = {
        "query_frames": torch.zeros(b, 1, 3, size, size, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "target_ids": torch.arange(b, device=device),
        "target_scores": torch.zeros(b, frames, device=device),
        "target_mask": torch.ones(b, frames, dtype=torch.bool, device=device),
        "caption_input_ids": ids,
        "caption_attention_mask": torch.ones_like(ids),
    }
    if embedded:
        batch["target_embeddings"] = torch.zeros(b, frames, q, d, device=device)
        batch["caption_embeddings"] = torch.zeros(b, d, device=device)
    else:
        batch["target_frames"] = torch.zeros(b, frames, 3, size, size, device=device)
    return batch


def ours(model, batch, loss_cfg) -> None:
    loss, _ = covr_loss(model, batch, loss_cfg)
    loss.backward()


def reference(model, batch, loss_cfg) -> None:
    """The reference's training step (src/model/blip2/blip2_cir.py, blip/blip_cir.py): the frozen
    ViT on the query frame, the fusion with the edit, HN-NCE against precomputed targets."""
    hf, b = model.hf, batch["input_ids"].shape[0]
    with torch.no_grad():
        image = hf.vision_model(pixel_values=batch["query_frames"][:, 0]).last_hidden_state
    image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
    if model.cfg.arch == "blip2":
        nq = hf.config.num_query_tokens
        embeds = hf.embeddings(
            input_ids=batch["input_ids"], query_embeds=hf.query_tokens.expand(b, -1, -1)
        )
        mask = torch.cat(
            [torch.ones(b, nq, dtype=torch.long, device=image.device), batch["attention_mask"]], 1
        )
        hidden = hf.qformer(
            query_embeds=embeds,
            query_length=nq,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        query = F.normalize(hf.text_projection(hidden[:, :nq]), dim=-1).mean(1)
    else:
        hidden = hf.text_encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        query = F.normalize(hf.text_proj(hidden[:, 0]), dim=-1)
    target = batch["target_embeddings"].mean(1).mean(1)  # the dataset's pooling, then token mean
    c = loss_cfg
    loss = c.video_weight * hn_nce(query, target, c.temperature, c.alpha, c.beta)
    if c.caption_weight > 0:
        loss = loss + c.caption_weight * hn_nce(query, batch["caption_embeddings"], c.temperature)
    loss.backward()


def flops(step, model, batch, loss_cfg) -> float:
    import transformers.masking_utils as masking

    model.zero_grad(set_to_none=True)
    # transformers skips an all-ones mask after reading its values (`.all()`), which meta tensors
    # do not have; the bench's masks are all ones, so answer as it would on real tensors
    skip, masking._ignore_bidirectional_mask_sdpa = (
        masking._ignore_bidirectional_mask_sdpa,
        (lambda *args, **kwargs: True),
    )
    try:
        with FlopCounterMode(display=False) as counter:
            step(model, batch, loss_cfg)
    finally:
        masking._ignore_bidirectional_mask_sdpa = skip
    return counter.get_total_flops()


def full_size(arch: str, tmp: str, b: int = 4) -> dict:
    cfg = load_config(RECIPES[arch])
    tok = build_vocab_tokenizer([WORDS], Path(tmp) / f"tok-{arch}")
    with torch.device("meta"):
        model = build_model(replace(cfg.model, pretrained=None), tok)
    model.train()
    frames = cfg.shards.target_frames
    emb, jpeg = batch_for(model, b, frames, True), batch_for(model, b, frames, False)
    return {
        "ours_embedded": flops(ours, model, emb, cfg.loss) / b,
        "ours_jpeg": flops(ours, model, jpeg, cfg.loss) / b,
        "reference": flops(reference, model, emb, cfg.loss) / b,
    }


def base_step_times(tmp: str, b: int, steps: int) -> dict:
    from bench.train_bench import SIZES

    cfg = replace(tiny_model_config("blip2"), **SIZES["base"])
    tok = build_vocab_tokenizer([WORDS], Path(tmp) / "tok-base")
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    loss_cfg = load_config(RECIPES["blip2"]).loss
    batches = {k: batch_for(model, b, 15, k == "embedded", "cpu") for k in ("embedded", "jpeg")}
    for batch in batches.values():  # a real tokenised edit, not all-ones
        batch["input_ids"] = tok(
            ["replace circle with square"] * b,
            padding="max_length",
            max_length=cfg.max_text_len,
            return_tensors="pt",
        ).input_ids
    best = {k: float("inf") for k in batches}
    for round_ in range(3):  # interleaved rounds, best of each
        for kind in list(batches) if round_ % 2 == 0 else list(batches)[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                ours(model, batches[kind], loss_cfg)
                opt.step()
            best[kind] = min(best[kind], (time.perf_counter() - start) / steps / b)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("blip2", "blip"):
            f = full_size(arch, tmp)
            print(
                f"{arch} full size, GFLOPs per training sample: ours (embedded shards) "
                f"{f['ours_embedded'] / 1e9:,.1f}, ours (JPEG shards) {f['ours_jpeg'] / 1e9:,.1f}, "
                f"reference {f['reference'] / 1e9:,.1f}; ratio embedded / reference "
                f"{f['ours_embedded'] / f['reference']:.3f}, JPEG / reference "
                f"{f['ours_jpeg'] / f['reference']:.2f}",
                flush=True,
            )
        t = base_step_times(tmp, a.batch_size, a.steps)
    print(
        f"base size on CPU, step time per sample (fwd + loss + bwd + AdamW, batch {a.batch_size}): "
        f"embedded {t['embedded'] * 1e3:.1f} ms, JPEG targets {t['jpeg'] * 1e3:.1f} ms, "
        f"ratio {t['jpeg'] / t['embedded']:.2f}"
    )


if __name__ == "__main__":
    main()
