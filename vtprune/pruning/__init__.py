"""Two-stage visual-token pruning (learned merge + in-decoder pruner heads) and the baseline
policies (FastV, PyramidDrop, VisionZip-style, random) in the same engine."""
from .config import POLICIES, PruningConfig
from .modules import PrunerHead, PruningModules, TokenMerger
from .plan import PruningPlan, build_plan

__all__ = ["PruningConfig", "POLICIES", "TokenMerger", "PrunerHead", "PruningModules", "PruningPlan", "build_plan"]
