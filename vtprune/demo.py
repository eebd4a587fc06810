"""The embedded default model and the demo inputs used by `python main.py`.

The default is the small SynthVQA LLaVA shipped in vtprune/assets/synthvqa-llava (trained by this
project with recipes/train_base.py, see README "Measured quality"), with its two-stage
pruning heads next to it. If the package was installed without its assets, a random model of the
same shape is built locally instead (answers are then noise; main.py says so).
"""
from __future__ import annotations

import os
import shutil

from .quality import synthvqa as sv
from .tiny_model import build_tiny_llava

ASSET_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "synthvqa-llava")
ASSET_PRUNING = os.path.join(ASSET_MODEL, "pruning_201.yaml")
DEFAULT_MODEL_NAME = "tiny-llava-random-v1"
DEMO_QUESTIONS = [
    "What colour is the circle?",
    "How many objects are in the image?",
    "Is the square left or right of the triangle?",
    "Describe the image in one sentence.",
]


def cache_dir() -> str:
    return os.environ.get("VTPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vtprune"))


def has_trained_default() -> bool:
    return os.path.isfile(os.path.join(ASSET_MODEL, "model.safetensors"))


def default_model_dir() -> str:
    """The shipped SynthVQA model, or (without assets) a random one built once into the cache."""
    if has_trained_default():
        return ASSET_MODEL
    return random_model_dir()


def default_pruning() -> str | None:
    """The shipped model's trained two-stage config, if present: 201.0 visual tokens per decoder
    layer on average instead of 576, 65.1% fewer (benchmarks/results/synthvqa_quality_*.json)."""
    return ASSET_PRUNING if has_trained_default() and os.path.isfile(ASSET_PRUNING) else None


def random_model_dir() -> str:
    """A small random LLaVA of the LLaVA-1.5 shape, built (a few seconds, once) when missing."""
    path = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        tmp = path + f".tmp{os.getpid()}"
        build_tiny_llava(tmp, seed=0, vision_hidden=64, text_hidden=128, text_layers=4, vision_layers=4)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.rename(tmp, path)  # atomic: a concurrent or interrupted build never leaves half a model
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_examples(n: int = 5):
    """n SynthVQA test-split images with one question each (types rotated, the last a caption):
    [(PIL image, question, expected answer)]."""
    out = []
    kinds = list(sv.QUESTION_TYPES)
    for i in range(n):
        img, _, qs, cap = sv.sample(sv.SPLIT_SEEDS["test"], 10_000 + i)
        if i == n - 1:
            out.append((img, "Describe the image.", cap))
            continue
        want = kinds[i % len(kinds)]
        q = next((q for q in qs if q["type"] == want), qs[0])
        out.append((img, q["question"], q["answer"]))
    return out


def demo_image(seed: int, size: int = 336):
    """A SynthVQA-style image (deterministic per seed), resized when size != 336."""
    img = sv.sample(sv.SPLIT_SEEDS["test"], 20_000 + seed)[0]
    return img if size == sv.IMAGE_SIZE else img.resize((size, size))
