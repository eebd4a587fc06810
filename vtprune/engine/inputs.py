"""Turning user inputs (images, prompt strings) into token ids and pixel values.

Prompts are tokenized exactly as transformers' LlavaProcessor does it: each `<image>`
placeholder is expanded to one image token per visual token and the whole string goes through
the tokenizer once, so the ids match the reference token for token.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import VtpruneError

IMAGE_TOKEN = "<image>"


def format_prompt(question: str) -> str:
    """The LLaVA-1.5 conversation template for one question about one image."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def load_image(image, index: int = 0):
    """A PIL image (RGB) from a PIL image or a file path, or a VtpruneError naming the problem."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise VtpruneError(f"image {index}: file not found: {path}")
        if os.path.isdir(path):
            raise VtpruneError(f"image {index}: {path} is a directory, not an image file")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except UnidentifiedImageError:
            raise VtpruneError(f"image {index}: {path} is not an image (PIL cannot identify it)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise VtpruneError(f"image {index}: {path} is not a readable image ({e})") from None
    raise VtpruneError(f"image {index}: expected a PIL image or a file path, got {type(image).__name__}")


def _image_count(entry) -> int:
    """How many images one prompt's entry gives: None -> 0, a list/tuple -> its length, else 1."""
    if entry is None:
        return 0
    return len(entry) if isinstance(entry, (list, tuple)) else 1


def check_pairs(images: Sequence, prompts: Sequence[str]) -> list[int]:
    """One entry of `images` per prompt, holding as many images as the prompt has `<image>`
    placeholders: an image (one), a list of images (several, in placeholder order, as
    transformers' LlavaProcessor pairs them) or None (a text-only prompt). Returns the counts."""
    if len(images) != len(prompts):
        raise VtpruneError(f"got {len(images)} images and {len(prompts)} prompts: give one image per prompt")
    if not prompts:
        raise VtpruneError("no prompts given")
    counts = []
    for i, (entry, p) in enumerate(zip(images, prompts)):
        if not isinstance(p, str):
            raise VtpruneError(f"prompt {i}: expected a string, got {type(p).__name__}")
        n, given = p.count(IMAGE_TOKEN), _image_count(entry)
        if n != given:
            if n == 0:
                raise VtpruneError(f"prompt {i} has no '{IMAGE_TOKEN}' placeholder but {given} image"
                                   f"{'s' if given > 1 else ''}: each image needs one (e.g. "
                                   f"vtprune.format_prompt(question)); give None as the image of a text-only prompt")
            raise VtpruneError(f"prompt {i} has {n} '{IMAGE_TOKEN}' placeholder{'s' if n > 1 else ''} but "
                               f"{given or 'no'} image{'s' if given != 1 else ''}: give one image per placeholder "
                               f"(a list of {n} for several, in order)")
        counts.append(n)
    return counts


def prompt_images(entry, count: int) -> list:
    """One prompt's entry of `images` as a list of `count` images (check_pairs has checked it)."""
    if count == 0:
        return []
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


class PromptEncoder:
    """Tokenizes prompts, expanding `<image>` to `num_visual_tokens` image tokens.

    `model_image_token` is the id the model's embedding expects at image positions; when the
    tokenizer's own id differs (an engine built with `from_config` and a stand-in tokenizer),
    ids are remapped."""

    def __init__(self, tokenizer, num_visual_tokens: int, model_image_token: int):
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.model_image_token = model_image_token
        tok_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tok_id is None or tok_id == tokenizer.unk_token_id:
            raise VtpruneError(f"the tokenizer has no '{IMAGE_TOKEN}' token")
        self.tokenizer_image_token = tok_id

    def encode(self, prompt: str) -> list[int]:
        text = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_visual_tokens)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        t, m = self.tokenizer_image_token, self.model_image_token
        if t != m:
            ids = [m if i == t else i for i in ids]
        return ids

    def continuation(self, prompt: str, text: str, prompt_ids: list[int] | None = None) -> list[int]:
        """The tokens of `text` as they follow `prompt`: the tail of the joint tokenization when the
        prompt's own tokens are its prefix (so boundary merges match what generation produces),
        else `text` tokenized alone."""
        prompt_ids = self.encode(prompt) if prompt_ids is None else prompt_ids
        joint = self.encode(prompt + text)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.tokenizer)
        return self.tokenizer.decode([i for i in ids if i < n], skip_special_tokens=True)
