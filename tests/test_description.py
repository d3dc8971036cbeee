"""model.description="separate": the query video's description as a second text through the
same encoder as the edit (ECDE's design), mixed into the query by `description_weight`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.schema import ConfigError, load_config
from sharding.batch import Task, collate, query_inputs
from tests.tiny import tiny_model
from train.objective import covr_loss

EDITS = ["make it red", "replace circle with square", "change it to blue"]
DESCRIPTIONS = ["a blue circle moving left", "", "a green square moving right with a red circle"]


def _samples(descriptions=DESCRIPTIONS, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "query_frames": rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8),
            "target_frames": rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
            "edit": edit,
            "description": description,
            "scores": [],
            "target_id": i,
        }
        for i, (edit, description) in enumerate(zip(EDITS, descriptions))
    ]


def _collate(samples, tok, description, **kw):
    return collate(samples, tok, 32, 12, description=description, description_tokens=16, **kw)


def test_collate_gives_the_description_its_own_tokens_and_marks_the_absent_ones(tmp_path):
    _, tok = tiny_model(tmp_path)
    batch = _collate(_samples(), tok, "separate")
    ids, mask = batch["description_input_ids"], batch["description_attention_mask"]
    assert ids.shape == mask.shape == (3, 16)  # description_tokens, not max_text_len (12)
    assert mask[0].sum() == 7 and mask[2].sum() == 11  # [CLS] words [SEP], no cut at 12
    assert not mask[1].any()  # no description: an all-zero row
    # the edits are those of the other modes
    plain = _collate(_samples(), tok, "ignore")
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    assert "description_input_ids" not in plain and len(query_inputs(plain)) == 3
    assert len(query_inputs(batch)) == 5


@pytest.mark.parametrize("arch", ["blip2", "blip"])
@pytest.mark.parametrize("combiner", ["fusion", "avg", "mlp", "text"])
def test_the_query_mixes_edit_and_description_encodings_by_the_weight(tmp_path, arch, combiner):
    model, tok = tiny_model(
        tmp_path, arch, combiner=combiner, description="separate", description_weight=0.2
    )
    model.eval()
    batch = _collate(_samples(), tok, "separate")
    ids, mask = batch["description_input_ids"], batch["description_attention_mask"]
    with torch.no_grad():
        edit_only = model(Task.ENCODE_QUERY, *query_inputs(batch)[:3])
        mixed = model(Task.ENCODE_QUERY, *query_inputs(batch))
        if combiner in ("fusion", "text"):  # the mix by hand, from the model's own encoders
            encode = model.encode_fusion if combiner == "fusion" else model.encode_text
            args = (batch["query_frames"],) if combiner == "fusion" else ()
            of_edit = encode(*args, batch["input_ids"], batch["attention_mask"])
            of_description = encode(*args, ids, mask)
            expected = F.normalize(0.8 * of_edit + 0.2 * of_description, dim=-1)
            expected = expected if combiner == "fusion" else expected[:, None]
            assert torch.allclose(mixed[[0, 2]], expected[[0, 2]], atol=1e-5)
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(mixed.shape[:2]), atol=1e-5)
    # a query without a description is the edit's alone; the others move
    assert torch.allclose(mixed[1], edit_only[1], atol=1e-6)
    assert (mixed[[0, 2]] - edit_only[[0, 2]]).abs().max() > 1e-4  # a random tiny model


def test_weight_one_on_the_edit_itself_is_the_edit_only_query(tmp_path):
    """The description goes through exactly the edit's encoder: given the edit as its
    description at weight 1, the query is the edit-only one."""
    model, tok = tiny_model(tmp_path, description="separate", description_weight=1.0)
    model.eval()
    samples = _samples(descriptions=EDITS)
    with torch.no_grad():
        mixed = model(Task.ENCODE_QUERY, *query_inputs(_collate(samples, tok, "separate")))
        plain = model(Task.ENCODE_QUERY, *query_inputs(_collate(samples, tok, "ignore")))
    assert torch.allclose(mixed, plain, atol=1e-5)


def test_training_on_descriptions_reaches_the_loss_and_its_gradients(tmp_path):
    model, tok = tiny_model(tmp_path, description="separate")
    batch = _collate(_samples(), tok, "separate")
    loss, _ = covr_loss(model, batch, load_config(None, []).loss)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_description_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="model.description_weight"):
        load_config(None, ["model.description_weight=1.5"])
    with pytest.raises(ConfigError, match="model.description_tokens.*position embeddings"):
        load_config(None, ["model.description=separate", "model.description_tokens=1000"])
    load_config(None, ["model.description_tokens=1000"])  # not tokenised: not checked
    with pytest.raises(ConfigError, match="model.description"):
        load_config(None, ["model.description=second"])
