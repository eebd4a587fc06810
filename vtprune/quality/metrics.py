"""Answer scoring: exact match after normalisation (VQA-style) and corpus BLEU (sacrebleu)."""
from __future__ import annotations

import re

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10", "none": "0", "no one": "0"}
_ARTICLES = {"a", "an", "the"}
_SPELLING = {"color": "colour", "gray": "grey"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, articles dropped, number words as digits, US spellings as
    British: "Two." == "2", "A circle" == "circle", "The color is gray" == "colour is grey"."""
    t = text.lower().strip()
    t = re.sub(r"[^\w\s]", " ", t)
    words = [_SPELLING.get(w, w) for w in t.split() if w not in _ARTICLES]
    words = [_NUMBERS.get(w, w) for w in words]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def bleu(predictions: list[str], references: list[str]) -> float | None:
    """Corpus BLEU (0-100, sacrebleu's defaults); None without captions."""
    if not predictions:
        return None
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)
