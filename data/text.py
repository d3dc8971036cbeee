"""Text cleaning before tokenising, as the reference does it for every edit and caption
(lucas-ventura/CoVR src/data/utils.py `pre_caption`): lower case; each of . ! " ( ) * # : ; ~
becomes a space; runs of whitespace collapse to one space; stripped; cut to `max_words` words.
The reference's datasets all pass max_words=30 (webvid_covr.py, cirr.py, fashioniq.py, circo.py,
embs.py); the function's own default of 50 is never used."""

from __future__ import annotations

import re

MAX_WORDS = 30
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = MAX_WORDS) -> str:
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tokenize(
    tokenizer,
    texts: list[str],
    max_length: int,
    max_words: int = MAX_WORDS,
    padding: str = "max_length",
):
    """Cleaned texts, truncated on the right to `max_length` tokens and padded to it (the
    reference's training tokenisation) or, with padding="longest", to the longest text (its test
    scripts, with max_length 64)."""
    return tokenizer(
        [pre_caption(t, max_words) for t in texts],
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
