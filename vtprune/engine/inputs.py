"""Turning user inputs (images, prompt strings) into token ids and pixel values.

Prompts are tokenized exactly as transformers' LlavaProcessor does it: the single `<image>`
placeholder is expanded to one image token per visual token and the whole string goes through
the tokenizer once, so the ids match the reference token for token.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import VtpruneError
from ..files import check_file, fs_error

IMAGE_TOKEN = "<image>"


def format_prompt(question: str) -> str:
    """The LLaVA-1.5 conversation template for one question about one image."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# Decoding more pixels than this is refused before any pixel is decoded (the size comes from the
# file's header): PIL's own warning threshold (Image.MAX_IMAGE_PIXELS, 89,478,485 = 0.25 GiB of
# 24-bit pixels). Decoding and preprocessing an image of this size peaks at about 1.5 GB.
MAX_IMAGE_PIXELS = 89_478_485


def _check_size(size, index: int, where: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise VtpruneError(f"image {index}: {where}has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise VtpruneError(f"image {index}: {where}is {w}x{h} = {w * h} pixels, more than the limit of "
                           f"{MAX_IMAGE_PIXELS} (refused as a possible decompression bomb)")


def load_image(image, index: int = 0):
    """A PIL image (RGB) from a PIL image or a file path, or a VtpruneError naming the problem."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        _check_size(image.size, index, "")
        return image.convert("RGB") if image.mode != "RGB" else image
    if not isinstance(image, (str, os.PathLike)):
        raise VtpruneError(f"image {index}: expected a PIL image or a file path, got {type(image).__name__}")
    path = os.fspath(image)
    if isinstance(path, str) and path and "\x00" not in path and not os.path.lexists(path):
        raise VtpruneError(f"image {index}: file not found: {path}")
    if isinstance(path, str) and os.path.isdir(path):
        raise VtpruneError(f"image {index}: {path} is a directory, not an image file")
    # a FIFO or a device is refused from stat, before any open (opening a FIFO blocks forever)
    path = check_file(path, f"image {index}:")
    try:
        with warnings.catch_warnings():
            # PIL warns above its limit; ours is checked on the header's size just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.size, index, f"{path} ")
                im.load()
                return im.convert("RGB")
    except VtpruneError:
        raise
    except Image.DecompressionBombError as e:
        raise VtpruneError(f"image {index}: {path} has more pixels than the limit of {MAX_IMAGE_PIXELS} "
                           f"(refused as a possible decompression bomb; PIL: {e})") from None
    except UnidentifiedImageError:
        raise VtpruneError(f"image {index}: {path} is not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise fs_error(f"image {index}:", path, e) from None
        raise VtpruneError(f"image {index}: {path} is not a readable image ({e})") from None


def check_pairs(images: Sequence, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise VtpruneError(f"got {len(images)} images and {len(prompts)} prompts: give one image per prompt")
    if not prompts:
        raise VtpruneError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise VtpruneError(f"prompt {i}: expected a string, got {type(p).__name__}")
        n = p.count(IMAGE_TOKEN)
        if n != 1:
            what = "has no" if n == 0 else f"has {n}"
            raise VtpruneError(f"prompt {i} {what} '{IMAGE_TOKEN}' placeholder; exactly one is required "
                               f"(e.g. vtprune.format_prompt(question))")


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
