"""The reference recipe's settings: per-epoch cosine, global batch, the shipped recipe files."""

import pytest
import torch

from configs.schema import ConfigError, OptimConfig, load_config, per_rank_batch_size
from train.optim import build_scheduler, cosine_epoch_factor


def test_cosine_epoch_gives_the_reference_factors():
    # the reference (src/tools/scheduler.py CosineSchedule, called at each epoch start, 5 epochs)
    expected = [1.0, 0.905, 0.655, 0.345, 0.095]
    assert [round(cosine_epoch_factor(e * 7, 7, 5), 3) for e in range(5)] == expected
    assert cosine_epoch_factor(6, 7, 5) == 1.0 and cosine_epoch_factor(8, 7, 5) == pytest.approx(
        0.9045, abs=1e-4
    )


def test_cosine_epoch_scheduler_steps_the_lr_once_per_epoch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-5)
    sched = build_scheduler(
        opt, OptimConfig(lr=2e-5, schedule="cosine_epoch"), total_steps=15, steps_per_epoch=3
    )
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = [lrs[i : i + 3] for i in range(0, 15, 3)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant inside an epoch
    assert [round(e[0] / 2e-5, 3) for e in per_epoch] == [1.0, 0.905, 0.655, 0.345, 0.095]
    with pytest.raises(ValueError, match="steps per epoch"):
        build_scheduler(opt, OptimConfig(schedule="cosine_epoch"), total_steps=15)


def test_global_batch_is_split_over_ranks_and_accumulation():
    cfg = load_config(None, ["train.global_batch_size=512", "train.grad_accum=2"])
    assert per_rank_batch_size(cfg, world=8) == 32
    assert (
        per_rank_batch_size(load_config(None, ["train.batch_size=7"]), world=3) == 7
    )  # unset: per rank
    with pytest.raises(
        ConfigError, match="train.global_batch_size.*512.*world size 3.*grad_accum 2"
    ):
        per_rank_batch_size(cfg, world=3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(None, ["train.global_batch_size=-1"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=linear"])


# the reference's values (lucas-ventura/CoVR configs; docs/RECIPES.md), checked on the files
SHARED = {  # both recipes
    "model.freeze_vision": True,
    "model.train_target_encoder": False,
    "optim.weight_decay": 0.05,
    "optim.schedule": "cosine_epoch",
    "optim.warmup_steps": 0,
    "optim.grad_clip": 0.0,
    "train.epochs": 5,
    "train.seed": 1234,
    "loss.temperature": 0.07,
    "loss.alpha": 1.0,
    "loss.beta": 0.5,
    "queue.size": 0,
    "shards.epoch": "target",
    "shards.target_frames": 15,
    "model.frame_score_temperature": 0.1,
}
REFERENCE = {
    "covr2_blip2.yaml": {
        **SHARED,
        "model.arch": "blip2",
        "model.vision.image_size": 364,
        "model.max_text_len": 32,
        "model.caption_words": 50,
        "model.caption_tokens": 0,
        "model.vision_drop_path": 0.0,  # LAVIS's EVA ViT: none, and kept in eval mode
        "model.num_query_tokens": 32,
        "optim.lr": 2e-05,
        "train.global_batch_size": 512,
        "loss.video_weight": 0.5,
        "loss.caption_weight": 0.5,
    },
    "covr_blip.yaml": {
        **SHARED,
        "model.arch": "blip",
        "model.vision.image_size": 384,
        "model.max_text_len": 35,
        "model.vision_drop_path": 0.1,
        "optim.lr": 1e-05,
        "train.global_batch_size": 1024,
        "loss.video_weight": 1.0,
        "loss.caption_weight": 0.0,
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_recipes_state_the_reference_settings(name):
    from omegaconf import OmegaConf

    from configs.schema import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / name)
    for key, value in REFERENCE[name].items():
        assert OmegaConf.select(OmegaConf.structured(cfg), key) == pytest.approx(value), key
    assert "coco" in cfg.model.pretrained  # the COCO-finetuned retrieval weights
    for world in (8, 16, 32):  # one to four 8-GPU nodes
        assert per_rank_batch_size(cfg, world) * world == cfg.train.global_batch_size
    if name == "covr2_blip2.yaml":
        assert cfg.model.pretrained.endswith("blip2-itm-vit-g-coco")
