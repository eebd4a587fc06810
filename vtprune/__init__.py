"""vtprune: a fast, exact LLaVA-1.5 inference engine with learned visual-token pruning."""
from .engine import GenerationResult, LlavaEngine, format_prompt
from .errors import CheckpointError, VtpruneError

__version__ = "0.1.0"
__all__ = ["LlavaEngine", "GenerationResult", "format_prompt", "VtpruneError", "CheckpointError", "__version__"]
