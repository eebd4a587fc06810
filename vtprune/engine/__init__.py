"""The inference engine: model, weight loading, KV cache, decoding loop, public API."""
from .engine import GenerationResult, LlavaEngine
from .inputs import format_prompt

__all__ = ["LlavaEngine", "GenerationResult", "format_prompt"]
