"""Tokenizers. Real runs load the BERT tokenizer that ships with the model directory; offline
runs on the synthetic corpus build a BERT word-piece tokenizer whose vocabulary is the corpus's
words (so the same `BertTokenizerFast` class and ids layout are used either way)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import WordPiece as WordPieceDecoder
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "[DEC]"]


# BERT's special tokens by role, as transformers tokenizers name them
TOKEN_ROLES = {
    "unk_token": "[UNK]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def build_vocab_tokenizer(texts: Iterable[str], out_dir: str | Path) -> PreTrainedTokenizerFast:
    """BERT-style tokenizer (lower-casing, BERT pre-tokenizer, [CLS] x [SEP]) whose word-piece
    vocabulary is the words of `texts`; saved to out_dir in the transformers format."""
    split = BertPreTokenizer().pre_tokenize_str
    words = sorted({w for text in texts for w, _ in split(text.lower())} - set(SPECIAL))
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    core = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = BertNormalizer(lowercase=True)
    core.pre_tokenizer = BertPreTokenizer()
    core.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    core.decoder = WordPieceDecoder()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, **TOKEN_ROLES, additional_special_tokens=["[ENC]", "[DEC]"]
    )
    tok.save_pretrained(out_dir)
    return tok


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be read; names it."""


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:  # no or damaged tokenizer files
        reason = str(err).splitlines()[0][:200]
        raise TokenizerError(f"{path}: not a readable tokenizer directory ({reason})") from None
    # as the reference's init_tokenizer: bert-base-uncased + [DEC] (bos) + [ENC], in that order,
    # so a bare BERT vocabulary gives [DEC] 30522 and [ENC] 30523, the ids the weights expect
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():  # BLIP's image-grounded encoder token
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.truncation_side = "right"  # the reference truncates on the right (a saved config may not)
    return tok
