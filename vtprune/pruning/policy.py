"""The pruning-policy interface: what a method decides, and nothing of how the engine carries it out.

A policy acts in up to two places; the engine's pruned prefill (pruning/plan.py) does the rest
(batching, RoPE positions, the KV caches that only ever hold kept tokens, per-layer stats):

  before the decoder   `select_visual(VisualInput) -> VisualTokens`: the image run each row feeds
                       the decoder (selected or merged tokens, in the decoder's width).
  before a layer l     `score(LayerInput) -> [B, T]`: a score per token of the rows entering
                       layer l; the engine keeps every text token and the `keep` best-scoring
                       visual tokens (or, with keep None, those whose sigmoid(score) passes the
                       config's keep_threshold). `probe(q, k, lengths)` (optional) sees the
                       queries and keys of layer l - 1; what it returns is LayerInput.probe.

`schedule(n, L)` says where: the visual tokens in the sequence after stage 0 and the drop points,
solved so that the average of visual tokens over the L decoder layers is the config's `budget`
(the usual unit for comparing these methods).

A new method is a subclass registered by name; the YAML's `policy:` key, `--policy` and
`vtprune eval --compare` then find it (another package can also declare it under the
`vtprune.policies` entry-point group) (README: "Adding a pruning method"):

    from vtprune.pruning import PruningPolicy, Schedule, DropPoint, register_policy

    @register_policy("mine")
    class Mine(PruningPolicy):
        def schedule(self, n, L):
            return Schedule(n, [DropPoint(L // 2, self.cfg.budget)])
        def score(self, inp):
            return inp.hidden.float().norm(dim=-1)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.generate import vision_features
from ..errors import VtpruneError


@dataclass
class DropPoint:
    layer: int        # tokens are dropped before this decoder layer
    keep: int | None  # visual tokens kept per row (None: threshold mode, a per-row count)


@dataclass
class Schedule:
    visual_in_sequence: int                       # visual tokens per row after stage 0
    drop_points: list = field(default_factory=list)  # DropPoint, ascending layers


@dataclass
class VisualTokens:
    features: torch.Tensor               # [B, M, D] in the decoder's width (projected)
    sources: torch.Tensor | None = None  # [B, M] ascending index into the full run each stands for
    sizes: torch.Tensor | None = None    # [B, M] how many tokens each stands for (merges)
    logits: torch.Tensor | None = None   # [B, N] a learned policy's selection logits (training reads them)


class VisualInput:
    """What stage 0 sees: the model, the prompt batch (lengths: the prompts', up to the end of the
    question) and lazily computed vision features. The trainer passes the features it already has
    and its options for a learned stage 0: the temperature `tau` (None: the config's inference
    temperature), Gumbel `noise` and its `seed`."""

    def __init__(self, model, batch, count: int, image_token: int, features=None, tau=None, noise=False, seed=None):
        self.model, self.batch, self.count, self.image_token = model, batch, count, image_token
        self._features, self.tau, self.noise, self.seed = features, tau, noise, seed

    def vision_features(self, probe=None) -> torch.Tensor:
        """[B, N, Dv] vision-tower features of each row's image (before the projector). `probe(q,
        k)` sees the tower's last attention layer (one image per distinct picture in the batch:
        index it with `batch.image_index` when that is not None)."""
        if self._features is None or probe is not None:
            self._features = vision_features(self.model, self.batch, probe=probe)
        return self._features

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.projector(feats)


@dataclass
class LayerInput:
    """What a layer decision sees, for the rows entering decoder layer `layer` (padded to T)."""
    layer: int
    keep: int | None
    hidden: torch.Tensor       # [B, T, D] the residual stream entering the layer
    visual: torch.Tensor       # [B, T] bool: visual tokens (within each row's length)
    question: torch.Tensor     # [B, T] bool: question tokens
    lengths: torch.Tensor      # [B] tokens per row
    probe: object = None       # what probe() returned at layer - 1, or None


class PruningPolicy:
    """Base class: no stage 0 (every visual token goes in) and no drop points."""
    name = "policy"  # set by register_policy
    #: the config needs `budget` (every policy but two_stage, whose YAML gives its schedule)
    needs_budget = True
    #: stage 0 depends on the prompt's text: rows about one image cannot share their first layers
    question_aware = False
    #: the tokens of stage 0 keep their full-run RoPE positions (VisualTokens.sources), and the
    #: text after them its place, instead of contiguous positions
    keeps_positions = False
    #: the merges' sizes are added to attention logits as log(size) (proportional attention)
    proportional_attention = False

    def __init__(self, cfg, model_cfg, modules=None):
        self.cfg, self.mcfg, self.modules = cfg, model_cfg, modules

    def schedule(self, n: int, L: int) -> Schedule:
        return Schedule(n, [])

    def select_visual(self, inp: VisualInput) -> VisualTokens:
        return VisualTokens(inp.project(inp.vision_features()))

    def score(self, inp: LayerInput) -> torch.Tensor:
        raise NotImplementedError(f"policy '{self.name}' has drop points but no score()")

    probe = None  # or a method probe(q, k, lengths) -> anything, run at layer l - 1 of each drop

    def extra_flops(self) -> int:
        """Multiply-accumulates of the policy's own modules per image (0 for training-free ones)."""
        return 0


# name -> class; the built-ins (policies.py) and any outside method add themselves here, and
# policies.get_policy / policy_names read it (with the entry points other packages declare)
REGISTRY: dict[str, type] = {}


def register_policy(name: str, cls: type | None = None):
    """Register `cls` under `name` (usable as a decorator). Re-registering a name replaces it."""
    if not isinstance(name, str) or not name.isidentifier():
        raise VtpruneError(f"policy name {name!r} must be an identifier (letters, digits, underscores)")

    def add(c):
        if not (isinstance(c, type) and issubclass(c, PruningPolicy)):
            raise VtpruneError(f"policy '{name}': {c!r} is not a PruningPolicy subclass")
        c.name = name
        REGISTRY[name] = c
        return c
    return add if cls is None else add(cls)
