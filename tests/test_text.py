"""The reference's text cleaning (`pre_caption`) before every tokenisation."""

import numpy as np
import torch
from PIL import Image

from data.text import MAX_WORDS, pre_caption, tokenize
from tests.tiny import tiny_model


def test_pre_caption_hand_computed_cases():
    assert pre_caption("Make it RED!") == "make it red"
    assert (
        pre_caption('Change "the" (blue) * #circle: to; a~square.')
        == "change the blue circle to a square"
    )
    assert pre_caption("  a\t\tb   c \n") == "a b c"  # whitespace runs collapse, ends stripped
    assert pre_caption("it's a dog, isn't it?") == "it's a dog, isn't it?"  # only the listed marks
    assert pre_caption("a.b") == "a b"
    long = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(long).split() == [f"w{i}" for i in range(MAX_WORDS)] and MAX_WORDS == 30
    assert pre_caption(long, max_words=5) == "w0 w1 w2 w3 w4"


class Recording:
    """A tokenizer that remembers the texts it was given."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.tok(texts, **kwargs)


def test_training_batches_tokenise_cleaned_edits_and_captions(tmp_path):
    from sharding.batch import collate

    _, tok = tiny_model(tmp_path)
    rec = Recording(tok)
    frame = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    samples = [
        {
            "query_frames": frame,
            "target_frames": frame,
            "edit": "Make it RED!!",
            "scores": [],
            "target_id": 0,
            "caption": "A red (moving) circle.",
        }
    ]
    batch = collate(samples, rec, image_size=32, max_text_len=8)
    assert rec.seen == ["make it red", "a red moving circle"]
    assert torch.equal(batch["input_ids"], tokenize(tok, ["make it red"], 8).input_ids)


def test_benchmark_queries_tokenise_cleaned_edits(tmp_path):
    from eval.embed import embed_image_queries

    model, tok = tiny_model(tmp_path)
    model.eval()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref.png")
    rec = Recording(tok)
    out = embed_image_queries(
        model, rec, [tmp_path / "ref.png"], ["Replace the circle; with a SQUARE."]
    )
    assert rec.seen == ["replace the circle with a square"] and out.shape[0] == 1


def test_tokenize_pads_and_truncates_on_the_right(tmp_path):
    from data.tokenizer import load_tokenizer

    _, tok = tiny_model(tmp_path)
    tok.truncation_side = "left"  # a saved tokenizer may carry left truncation
    tok.save_pretrained(tmp_path / "left")
    tok = load_tokenizer(tmp_path / "left")
    enc = tokenize(tok, ["Make it red blue green circle square"], max_length=5)
    assert tok.convert_ids_to_tokens(enc.input_ids[0].tolist()) == [
        "[CLS]",
        "make",
        "it",
        "red",
        "[SEP]",
    ]
    enc = tokenize(tok, ["make it red"], max_length=8)
    assert enc.attention_mask[0].tolist() == [1] * 5 + [0] * 3  # padded to max_length
