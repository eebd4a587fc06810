"""The project's stand-in tokenizer: a byte-level BPE trained on a fixed English snippet.

It encodes any text (byte-level), and `<s>`, `</s>`, `<unk>`, `<pad>` and `<image>` are special
tokens, `<image>` with the last id. `LlavaEngine.from_config` uses it when no tokenizer is given
(benchmarks on random weights) and tiny_model.py saves it into the tiny checkpoints.
"""
from __future__ import annotations

import functools

_CORPUS = """\
USER: What is in the image? ASSISTANT: The image shows a red circle and a blue square on a grey
background. What colour is the triangle? The triangle is green. How many objects are there? There
are three objects. Is the yellow star left or right of the purple square? It is to the left.
A cat sits on a wooden table next to a cup of coffee. Two people walk along the beach at sunset.
Describe the picture in one sentence. A small dog plays with a ball in the park while children watch.
The quick brown fox jumps over the lazy dog. Answer the question using a single word or phrase.
Yes. No. One. Two. Three. Four. Five. Left. Right. Top. Bottom. Circle. Square. Triangle. Star.
"""
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, corpus: str = _CORPUS) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    tok.add_special_tokens([IMAGE_TOKEN])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512, corpus: str | None = None):
    """A fast tokenizer (transformers PreTrainedTokenizerFast); `<image>` gets the last id.
    `corpus`: the text its BPE merges are learned from (default: a fixed English snippet)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(vocab_size, corpus or _CORPUS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=[IMAGE_TOKEN])


