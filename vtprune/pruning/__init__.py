"""Visual-token pruning: the policy interface (policy.py) and its registry, the built-in policies
(the learned two-stage method and the training-free baselines: policies.py), the two-stage modules,
and the plan that runs any policy's decisions in the engine."""
from .config import PruningConfig
from .modules import PrunerHead, PruningModules, TokenMerger
from .plan import PruningPlan, build_plan
from .policies import BASELINES, get_policy, policy_names
from .policy import DropPoint, LayerInput, PruningPolicy, Schedule, VisualInput, VisualTokens, register_policy

__all__ = ["PruningConfig", "TokenMerger", "PrunerHead", "PruningModules", "PruningPlan", "build_plan",
           "PruningPolicy", "Schedule", "DropPoint", "VisualInput", "VisualTokens", "LayerInput",
           "register_policy", "get_policy", "policy_names", "BASELINES"]
