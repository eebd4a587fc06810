"""The embedded default model and demo images used by `python main.py`.

No weights can be downloaded, so the default is a small random LLaVA of the LLaVA-1.5 shape
(576 visual tokens from 336x336 images) built locally on first use and cached; its answers are
noise until the quality work ships a trained tiny model here.
"""
from __future__ import annotations

import os

DEFAULT_MODEL_NAME = "tiny-llava-random-v1"
DEMO_QUESTIONS = [
    "What colour is the circle?",
    "How many objects are in the image?",
    "Is the square left or right of the triangle?",
    "Describe the image in one sentence.",
]


def cache_dir() -> str:
    return os.environ.get("VTPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vtprune"))


def default_model_dir() -> str:
    """Path of the embedded default model, building it (a few seconds, once) when missing."""
    from .tiny_model import build_tiny_llava

    path = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        tmp = path + f".tmp{os.getpid()}"
        build_tiny_llava(tmp, seed=0, vision_hidden=64, text_hidden=128, text_layers=4, vision_layers=4)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.rename(tmp, path)  # atomic: a concurrent or interrupted build never leaves half a model
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_image(seed: int, size: int = 336):
    """A grey canvas with a few coloured shapes (deterministic per seed)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    colours = [(220, 40, 40), (40, 90, 220), (40, 180, 60), (240, 200, 40), (150, 60, 190)]
    for _ in range(rng.randint(2, 4)):
        x, y, r = rng.randint(40, size - 40), rng.randint(40, size - 40), rng.randint(15, 35)
        colour = rng.choice(colours)
        kind = rng.choice(["circle", "square", "triangle"])
        if kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif kind == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return img
