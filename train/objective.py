"""The CoVR objective for one batch: embeddings, global negatives, the queue, HN-NCE.

Batch (DESIGN.md): query_frames (B, Fq, 3, H, W); input_ids / attention_mask (edit text);
target_frames (B, Ft, 3, H, W) or target_embeddings (B, Ft, Q, D); target_scores (B, Ft), NaN
where missing; target_mask (B, Ft) bool; target_ids (B,) int; optional caption_input_ids /
caption_attention_mask (the target caption, for the CoVR-2 caption term).
"""

from __future__ import annotations

import torch

from configs.schema import LossConfig
from eval.similarity import similarity
from train.distributed import gather, gather_with_grad
from train.losses import hn_nce, hn_nce_from_similarity
from train.models import CoVRModel, pool_frames
from train.queue import MomentumEncoder, TargetQueue


def _target(model: CoVRModel, batch: dict) -> torch.Tensor:
    source = batch.get("target_embeddings")
    if source is None:
        source = batch["target_frames"]
    return model("encode_target", source, batch.get("target_scores"), batch.get("target_mask"))


def covr_loss(
    model: CoVRModel,
    batch: dict,
    loss_cfg: LossConfig,
    queue: TargetQueue | None = None,
    momentum: MomentumEncoder | None = None,
) -> tuple[torch.Tensor, dict]:
    """Loss of this rank's batch against the global batch (+ queue); fills the queue after."""
    reduce = model.cfg.reduce
    query, weights = model(
        "compose", batch["query_frames"], batch["input_ids"], batch["attention_mask"]
    )
    query, target = (
        query.float(),
        _target(model, batch).float(),
    )  # the loss in fp32, also under bf16
    if reduce == "mean":  # mean similarity is bilinear: reduce before gathering (Q x less traffic)
        query, target = query.mean(1, keepdim=True), target.mean(1, keepdim=True)
    all_query = gather_with_grad(query)
    all_target = gather_with_grad(target) if target.requires_grad else gather(target)
    all_ids = gather(batch["target_ids"])
    sim = similarity(all_query, all_target, reduce)

    extra = extra_mask = None
    if queue is not None and queue.filled:
        queued, _ = queue.valid()
        # `max` keeps the queue tensor for backward and the enqueue below overwrites it: copy
        # then; `mean` reduces it first, so the large default queue is not copied every step
        extra = similarity(all_query, queued.to(all_query, copy=reduce == "max"), reduce)
        extra_mask = queue.negatives_mask(all_ids)
    c = loss_cfg
    loss = c.video_weight * hn_nce_from_similarity(
        sim, c.temperature, c.alpha, c.beta, extra, extra_mask
    )
    metrics = {"loss_video": loss.detach()}
    if c.caption_weight > 0:
        caption = model(
            "encode_caption", batch["caption_input_ids"], batch["caption_attention_mask"]
        ).float()
        all_caption = gather_with_grad(caption) if caption.requires_grad else gather(caption)
        caption_loss = hn_nce(all_query.mean(1), all_caption, c.temperature, c.alpha, c.beta)
        loss = loss + c.caption_weight * caption_loss
        metrics["loss_caption"] = caption_loss.detach()

    if queue is not None:
        with torch.no_grad():
            if momentum is not None:  # trainable target encoder: queue the EMA encoder's view
                b, f = batch["target_frames"].shape[:2]
                frames = momentum.encode_target_frames(batch["target_frames"].flatten(0, 1))
                frames = frames.view(b, f, *frames.shape[1:])
                queued = pool_frames(
                    frames,
                    batch.get("target_scores"),
                    batch.get("target_mask"),
                    model.cfg.frame_score_temperature,
                )
                if reduce == "mean":
                    queued = queued.mean(1, keepdim=True)
                queued = gather(queued)
            else:
                queued = all_target.detach()
            queue.enqueue(queued, all_ids)
        metrics["queue_filled"] = torch.tensor(float(queue.filled))
    if weights is not None:
        metrics["combiner_weights"] = weights.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def itc_loss(
    model: CoVRModel,
    batch: dict,
    loss_cfg: LossConfig,
    queue: TargetQueue | None = None,
    momentum: MomentumEncoder | None = None,
) -> tuple[torch.Tensor, dict]:
    """Image-text contrastive pretraining (BLIP-2 ITC): target video against its caption, with
    the same HN-NCE and global negatives. For starting from random weights, where the frozen
    or untrained encoders give no meaningful target embeddings yet."""
    text = model("encode_text", batch["caption_input_ids"], batch["caption_attention_mask"]).float()
    video = _target(model, batch).float().mean(1)
    c = loss_cfg
    loss = hn_nce(gather_with_grad(text), gather_with_grad(video), c.temperature, c.alpha, c.beta)
    return loss, {"loss": loss.detach()}
