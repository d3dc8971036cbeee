"""The CoVR objective for one batch: embeddings, global negatives, the queue, HN-NCE.

Batch (`sharding/batch.py`): query_frames (B, Fq, 3, H, W); input_ids / attention_mask (edit text);
target_frames (B, Ft, 3, H, W) or target_embeddings (B, Ft, Q, D); target_scores (B, Ft), NaN
where missing; target_mask (B, Ft) bool; target_ids (B,) int; optional caption_input_ids /
caption_attention_mask (the target caption, for the CoVR-2 caption term) and, from embedded
shards, caption_embeddings (B, D) (its frozen embedding, precomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from configs.schema import LossConfig
from eval.similarity import similarity
from sharding.batch import Task, query_inputs
from train.distributed import gather, gather_with_grad
from train.losses import hn_nce, hn_nce_from_similarity
from train.models import CoVRModel, pool_frames
from train.queue import MomentumEncoder, TargetQueue


def _target(model: CoVRModel, batch: dict) -> torch.Tensor:
    source = batch.get("target_embeddings")
    if source is None:
        source = batch["target_frames"]
    return model(Task.ENCODE_TARGET, source, batch.get("target_scores"), batch.get("target_mask"))


def covr_embed(
    model: CoVRModel,
    batch: dict,
    loss_cfg: LossConfig,
    momentum: MomentumEncoder | None = None,
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's embeddings that the CoVR loss compares, row i = sample i, in fp32 (also under
    bf16): `query` and `target` tokens (their means under reduce=mean), `caption` with the
    caption term, `combiner_weights` for the mlp combiner. With `momentum`, also
    `queue_entries`: the EMA encoder's view of the targets (no gradient). `keys`: compute only
    the target / caption among them (None: all); the query side is always computed."""
    want = lambda key: keys is None or key in keys  # noqa: E731
    composed = model(Task.COMPOSE, *query_inputs(batch))
    query, weights = composed.query, composed.combiner_weights
    out = {"query": query.float()}
    if want("target"):
        out["target"] = _target(model, batch).float()
    if model.cfg.reduce == "mean":  # mean similarity is bilinear: reduce before gathering
        out = {k: v.mean(1, keepdim=True) for k, v in out.items()}  # (Q x less traffic)
    if loss_cfg.caption_weight > 0 and want("caption"):  # the target's caption: a target
        caption = batch.get("caption_embeddings")  # embedded shards: precomputed, frozen
        if caption is None or model.cfg.train_target_encoder:
            caption = model(
                Task.ENCODE_CAPTION, batch["caption_input_ids"], batch["caption_attention_mask"]
            )
        out["caption"] = caption.to(query.device).float()
    if weights is not None:
        out["combiner_weights"] = weights
    if momentum is not None:  # trainable target encoder: the queue gets the EMA encoder's view
        out["queue_entries"] = _momentum_targets(model, batch, momentum)
    return out


@torch.no_grad()
def _momentum_targets(model: CoVRModel, batch: dict, momentum: MomentumEncoder) -> torch.Tensor:
    b, f = batch["target_frames"].shape[:2]
    frames = momentum.encode_target_frames(batch["target_frames"].flatten(0, 1))
    frames = frames.view(b, f, *frames.shape[1:])
    queued = pool_frames(
        frames,
        batch.get("target_scores"),
        batch.get("target_mask"),
        model.cfg.frame_score_temperature,
    )
    return queued.mean(1, keepdim=True) if model.cfg.reduce == "mean" else queued


def covr_contrast(
    emb: dict[str, torch.Tensor],
    ids: torch.Tensor,
    loss_cfg: LossConfig,
    reduce: str,
    queue: TargetQueue | None = None,
) -> tuple[torch.Tensor, dict]:
    """HN-NCE of this rank's embeddings (`covr_embed`) against the global batch (gathered in
    rank order) and the queue; then the global batch enters the queue. `ids`: this rank's
    target ids (B,), or (B, P) every valid target id of each row, its own first, -1 padded
    (`contrast_ids`): then each is a positive (`train.losses`)."""
    all_query = gather_with_grad(emb["query"])
    target = emb["target"]
    all_target = gather_with_grad(target) if target.requires_grad else gather(target)
    all_valid = gather(ids)
    all_ids = all_valid if all_valid.dim() == 1 else all_valid[:, 0]
    sim = similarity(all_query, all_target, reduce)
    positives = valid_targets(all_valid, all_ids) if all_valid.dim() == 2 else None

    extra = extra_mask = extra_positives = None
    if queue is not None and queue.filled:
        queued, queued_ids = queue.valid()
        # `max` keeps the queue tensor for backward and the enqueue below overwrites it: copy
        # then; `mean` reduces it first, so the large default queue is not copied every step
        extra = similarity(all_query, queued.to(all_query, copy=reduce == "max"), reduce)
        extra_mask = queue.negatives_mask(all_ids)
        if positives is not None:  # the other valid targets (a queued copy of a row's own
            # target stays neither, as with one positive: so the rule reduces to it exactly)
            extra_positives = valid_targets(all_valid[:, 1:], queued_ids.to(all_valid.device))
    c = loss_cfg
    loss = c.video_weight * hn_nce_from_similarity(
        sim,
        c.temperature,
        c.alpha,
        c.beta,
        extra,
        extra_mask,
        c.hn_nce,
        positives,
        extra_positives,
    )
    metrics = {"loss_video": loss.detach()}
    if c.caption_weight > 0:
        caption = emb["caption"]
        all_caption = gather_with_grad(caption) if caption.requires_grad else gather(caption)
        caption_loss = hn_nce(
            all_query.mean(1), all_caption, c.temperature, c.alpha, c.beta, c.hn_nce
        )
        loss = loss + c.caption_weight * caption_loss
        metrics["loss_caption"] = caption_loss.detach()

    if queue is not None:
        entries = emb.get("queue_entries")
        queue.enqueue(all_target.detach() if entries is None else gather(entries), all_ids)
        metrics["queue_filled"] = torch.tensor(float(queue.filled))
    if "combiner_weights" in emb:
        metrics["combiner_weights"] = emb["combiner_weights"].detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def valid_targets(valid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: target `ids[n]` is one of row b's valid target ids (`valid` (B, P), -1
    padded); one (B, N) comparison per column of `valid`, never a (B, N, P) tensor (N is the
    queue's 65,536)."""
    out = torch.zeros(valid.shape[0], ids.shape[0], dtype=torch.bool, device=valid.device)
    for p in range(valid.shape[1]):
        out |= (valid[:, p : p + 1] == ids[None, :]) & (valid[:, p : p + 1] >= 0)
    return out


def contrast_ids(batch: dict, loss_cfg: LossConfig) -> torch.Tensor:
    """What `contrast` is given of the batch's targets: their ids, or with `loss.positives=all`
    every valid target of each row (`sharding.batch.collate`'s `target_positives`)."""
    return batch["target_positives"] if loss_cfg.positives == "all" else batch["target_ids"]


def itc_embed(
    model: CoVRModel,
    batch: dict,
    loss_cfg: LossConfig,
    momentum: MomentumEncoder | None = None,
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The target caption's and (unless `keys` leaves it out) the target video's embeddings."""
    text = model(Task.ENCODE_TEXT, batch["caption_input_ids"], batch["caption_attention_mask"])
    out = {"text": text.float()}
    if keys is None or "video" in keys:
        out["video"] = _target(model, batch).float().mean(1)
    return out


def itc_contrast(
    emb: dict[str, torch.Tensor],
    ids: torch.Tensor,
    loss_cfg: LossConfig,
    reduce: str,
    queue: TargetQueue | None = None,
) -> tuple[torch.Tensor, dict]:
    c, video = loss_cfg, emb["video"]
    all_video = gather_with_grad(video) if video.requires_grad else gather(video)
    loss = hn_nce(
        gather_with_grad(emb["text"]), all_video, c.temperature, c.alpha, c.beta, c.hn_nce
    )
    return loss, {"loss": loss.detach()}


@dataclass(frozen=True)
class Objective:
    """A loss in two halves, so that the gradient cache (`train.gradcache`) can embed a batch in
    chunks and compute the loss once: `embed(model, batch, loss_cfg, momentum, keys)` gives this rank's
    embeddings {name: (B, ...)} (all; or the query side and `keys`); `contrast(embeddings, ids, loss_cfg, reduce, queue)` gives
    (loss, metrics) over the global batch and updates the queue."""

    embed: Callable
    contrast: Callable

    def loss(self, model, batch, loss_cfg, queue=None, momentum=None):
        emb = self.embed(model, batch, loss_cfg, momentum if queue is not None else None)
        return self.contrast(emb, contrast_ids(batch, loss_cfg), loss_cfg, model.cfg.reduce, queue)


COVR = Objective(covr_embed, covr_contrast)
# image-text contrastive pretraining (BLIP-2 ITC): target video against its caption, with the
# same HN-NCE and global negatives; for random weights, where the frozen or untrained encoders
# give no meaningful target embeddings yet
ITC = Objective(itc_embed, itc_contrast)


def covr_loss(
    model: CoVRModel,
    batch: dict,
    loss_cfg: LossConfig,
    queue: TargetQueue | None = None,
    momentum: MomentumEncoder | None = None,
) -> tuple[torch.Tensor, dict]:
    """Loss of this rank's batch against the global batch (+ queue); fills the queue after."""
    return COVR.loss(model, batch, loss_cfg, queue, momentum)


def itc_loss(model, batch, loss_cfg, queue=None, momentum=None) -> tuple[torch.Tensor, dict]:
    return ITC.loss(model, batch, loss_cfg, queue, momentum)
