"""Shared fixtures: tiny random LLaVA checkpoints in the llava-hf layout, built once per session
with transformers' own classes (nothing is downloaded), and the transformers reference model."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU, the Triton kernels run (on CPU tensors) under Triton's interpreter. The flag is
# read when @triton.jit decorates, so it is set before any vtprune.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_image(seed: int, w: int = 300, h: int = 400) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """576 visual tokens (336 px / 14 px patches), GQA decoder (4 heads, 2 KV heads)."""
    from vtprune.tiny_model import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """A smaller image (84 px -> 36 visual tokens) for tests that need many runs."""
    from vtprune.tiny_model import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("small") / "model"), seed=1, image_size=84)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from vtprune import LlavaEngine

    return LlavaEngine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def small_engine(small_dir):
    from vtprune import LlavaEngine

    return LlavaEngine.from_pretrained(small_dir, device="cpu", dtype=torch.float32)


def load_reference(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                          local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="session")
def reference(tiny_dir):
    return load_reference(tiny_dir)
