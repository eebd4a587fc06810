"""The built-in pruning policies, through the interface of policy.py, and the registry's lookups.

  two_stage  the learned method: the TokenMerger merges N vision tokens into target_merge_tokens
             (original RoPE positions kept, proportional attention), PrunerHead keep logits at
             each of pruning_layers (top-k, or threshold: ragged rows)
  fastv      after layer K = 2 of 32 (FastV's default; the same relative depth on other models, at
             least 1), ranked by the last token's attention at layer K-1
  pdrop      at L/4, L/2, 3L/4 with one keep ratio, ranked by the last instruction token's
             attention at the layer before (PyramidDrop)
  dart       at FastV's layer K: a few pivots (largest key norms at layer K-1), then the visual
             tokens least similar (cosine) to the pivots (DART, Wen et al. 2025: duplication,
             not importance; needs no attention map, so it suits fused attention)
  visionzip  dominant tokens by CLS attention + contextual tokens merged from the rest (budget)
  divprune   the budget tokens with the largest minimum pairwise cosine distance among the
             projected tokens, by the greedy max-min algorithm (DivPrune, Alvar et al. CVPR 2025)
  random     budget tokens drawn uniformly (seeded, reproducible)
Pre-decoder baselines feed fewer tokens at contiguous positions, as their published code does.
Attention scores come from one query row against the keys (a probe on the layer's q and k), never
from materialised attention matrices.
"""
from __future__ import annotations

import importlib.metadata
import math

import torch
import torch.nn.functional as F

from ..errors import VtpruneError
from .policy import REGISTRY, DropPoint, LayerInput, PruningPolicy, Schedule, VisualInput, VisualTokens, register_policy
from .tokens import pack, question_mask, unpack

ENTRY_POINT_GROUP = "vtprune.policies"


# ----------------------------------------------------------------------------- schedules
def fastv_layer(L: int) -> int:
    """FastV prunes after layer 2 of 32: the same relative depth, at least 1, below L."""
    return min(max(1, round(2 * L / 32)), L - 1)


def one_drop_schedule(name: str, n: int, L: int, budget: int) -> Schedule:
    """Every token up to layer K = fastv_layer(L), then `keep` solved for the layer average."""
    K = fastv_layer(L)
    keep = round((L * budget - K * n) / (L - K))
    if keep < 1:
        raise VtpruneError(f"pruning config: 'budget' {budget} is too small for {name}: the first {K} layer"
                           f"{'s' if K > 1 else ''} alone hold {K * n / L:.0f} visual tokens per layer on average")
    return Schedule(n, [DropPoint(K, min(keep, n))])


def pyramid_schedule(n: int, L: int, budget: int) -> Schedule:
    """Stages at L/4, L/2, 3L/4 keep n * lam^s; the layer average n (1 + lam + lam^2 + lam^3) / 4
    is solved for the budget by bisection."""
    layers = sorted({max(1, round(L * f)) for f in (0.25, 0.5, 0.75)})
    floor = (n * layers[0] + (L - layers[0])) / L  # every later stage down to one token
    if floor > budget + 1:  # within a token of the budget is as close as rounding gets anyway
        raise VtpruneError(f"pruning config: 'budget' {budget} is too small for pdrop: its first {layers[0]} of {L} "
                           f"layers alone hold {n * layers[0] / L:.0f} visual tokens per layer on average")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        bounds = [0] + layers + [L]
        avg = sum(n * lam ** s * (bounds[s + 1] - bounds[s]) for s in range(len(bounds) - 1)) / L
        lo, hi = (lam, hi) if avg < budget else (lo, lam)
    keeps = [max(1, round(n * lam ** (s + 1))) for s in range(len(layers))]
    return Schedule(n, [DropPoint(layer, k) for layer, k in zip(layers, keeps)])


# ----------------------------------------------------------------------------- probes
def last_token_attention(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T]: the last prompt token's attention over the keys, averaged over heads (q [B, H, T,
    Dh], k [B, Hkv, T, Dh]; -inf logits beyond each row's length)."""
    B, H, T, Dh = q.shape
    qi = q[torch.arange(B, device=q.device), :, lengths - 1]  # [B, H, Dh]: the last prompt token
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.einsum("bhd,bhtd->bht", qi.float(), k.float()) / math.sqrt(Dh)
    valid = torch.arange(T, device=q.device)[None, None, :] < lengths[:, None, None]
    return s.masked_fill(~valid, float("-inf")).softmax(-1).mean(1)


def key_norms(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T]: each token's key L2 norm averaged over KV heads (RoPE rotates pairs of
    coordinates, so the norm is the un-rotated key's)."""
    return k.float().norm(dim=-1).mean(1)


# ----------------------------------------------------------------------------- the learned method
@register_policy("two_stage")
class TwoStage(PruningPolicy):
    needs_budget = False
    keeps_positions = True

    @property
    def question_aware(self) -> bool:
        return self.cfg.merger_type == "question_aware"

    @property
    def proportional_attention(self) -> bool:
        return bool(self.cfg.proportional_attention)

    def schedule(self, n, L):
        c = self.cfg
        keeps = [None] * len(c.pruning_layers) if c.keep_mode == "threshold" else c.layer_keep_tokens
        return Schedule(min(c.target_merge_tokens, n), [DropPoint(layer, k) for layer, k in zip(c.pruning_layers, keeps)])

    def select_visual(self, inp: VisualInput) -> VisualTokens:
        c, batch = self.cfg, inp.batch
        feats = inp.vision_features()
        question, valid = None, None
        if c.merger_type == "question_aware":
            qmask = question_mask(batch.input_ids, inp.image_token, batch.lengths)
            question, valid = pack(inp.model.decoder.embed_tokens(batch.input_ids), qmask)
        tau = c.temperature_min if inp.tau is None else inp.tau
        feats, sources, logits, sizes = self.modules.merger(feats, tau, question, valid, noise=inp.noise, seed=inp.seed)
        return VisualTokens(inp.project(feats), sources, sizes, logits)

    def score(self, inp: LayerInput) -> torch.Tensor:
        head = self.modules.pruners[str(inp.layer)]
        vx, vvalid = pack(inp.hidden, inp.visual)
        qx, qvalid = pack(inp.hidden, inp.question)
        logits = head(vx, qx, qvalid, vvalid).masked_fill(~vvalid, float("-inf"))
        return unpack(logits, inp.visual, inp.visual.shape[1])

    def extra_flops(self) -> int:
        c, m = self.cfg, self.mcfg
        di, d = c.pruner_d_internal, m.text.hidden_size
        d_in = m.vision.hidden_size * len(m.vision_feature_layers)
        n, sched = m.num_visual_tokens, self.schedule(m.num_visual_tokens, m.text.num_layers)
        extra = n * (3 * d_in * di + 2 * di * di)  # merger projections + importance MLP
        return extra + len(sched.drop_points) * sched.visual_in_sequence * (2 * d * di + 6 * di * di)  # pruner heads


# ----------------------------------------------------------------------------- in-decoder baselines
@register_policy("fastv")
class FastV(PruningPolicy):
    def schedule(self, n, L):
        return one_drop_schedule("fastv", n, L, self.cfg.budget)

    def probe(self, q, k, lengths):
        return last_token_attention(q, k, lengths)

    def score(self, inp):
        return inp.probe


@register_policy("pdrop")
class PyramidDrop(FastV):
    def schedule(self, n, L):
        return pyramid_schedule(n, L, self.cfg.budget)


@register_policy("dart")
class Dart(PruningPolicy):
    """Pivots: the `pivots` visual tokens with the largest key norms at layer K-1 (the keys the
    tokens last went through; DART's default is 8 pivots for LLaVA-1.5). Every other visual token
    is scored by its duplication, its largest cosine similarity to a pivot over the hidden states
    entering layer K; the keep set is the pivots plus the least duplicated tokens."""
    pivots = 8

    def schedule(self, n, L):
        return one_drop_schedule("dart", n, L, self.cfg.budget)

    def probe(self, q, k, lengths):
        return key_norms(q, k, lengths)

    def score(self, inp):
        return dart_scores(inp.hidden, inp.probe, inp.visual, min(self.pivots, inp.keep or self.pivots))


def dart_scores(hidden: torch.Tensor, norms: torch.Tensor, visual: torch.Tensor, pivots: int) -> torch.Tensor:
    """[B, T] scores (higher is kept first): pivots 3, every other visual token 1 - duplication in
    [0, 2] (duplication: its largest cosine similarity to a pivot), non-visual tokens -inf."""
    p = min(pivots, int(visual.sum(1).min()))
    piv = norms.float().masked_fill(~visual, float("-inf")).topk(p, dim=1).indices  # [B, p]
    h = F.normalize(hidden.float(), dim=-1)
    hp = h.gather(1, piv[..., None].expand(-1, -1, h.shape[-1]))  # [B, p, D]
    dup = (h @ hp.transpose(1, 2)).amax(-1)  # [B, T]
    scores = (1.0 - dup).scatter(1, piv, 3.0)
    return scores.masked_fill(~visual, float("-inf"))


# ----------------------------------------------------------------------------- pre-decoder baselines
@register_policy("visionzip")
class VisionZip(PruningPolicy):
    def schedule(self, n, L):
        return Schedule(self.cfg.budget, [])

    def select_visual(self, inp):
        cls_attn = {}
        feats = inp.vision_features(probe=lambda q, k: cls_attn.update(a=cls_attention(q, k)))
        a = cls_attn["a"] if inp.batch.image_index is None else cls_attn["a"][inp.batch.image_index]
        return VisualTokens(inp.project(visionzip_tokens(feats, a, inp.count)))


@register_policy("random")
class Random(PruningPolicy):
    def schedule(self, n, L):
        return Schedule(self.cfg.budget, [])

    def select_visual(self, inp):
        feats = inp.vision_features()
        # one random subset (seed 0) for every image: reproducible, and a row's result does
        # not depend on what else is in its batch
        g = torch.Generator(feats.device).manual_seed(0)
        scores = torch.rand(feats.shape[1], generator=g, device=feats.device).expand(feats.shape[:2])
        idx = scores.topk(inp.count, dim=-1).indices.sort(-1).values
        return VisualTokens(inp.project(feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))))


@register_policy("divprune")
class DivPrune(PruningPolicy):
    def schedule(self, n, L):
        return Schedule(self.cfg.budget, [])

    def select_visual(self, inp):
        x = inp.project(inp.vision_features())
        idx = max_min_diverse(x, inp.count)
        return VisualTokens(x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx)


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] ascending indices of a subset of each row's tokens x [B, N, D] chosen greedily for
    the max-min diversity problem on cosine distance: first the token whose nearest other token is
    farthest, then repeatedly the token farthest from everything chosen so far. k steps of batched
    tensor ops (every row at once), each O(B N)."""
    B, N, _ = x.shape
    k = min(k, N)
    f = F.normalize(x.float(), dim=-1)
    dist = 1.0 - f @ f.transpose(1, 2)  # [B, N, N] cosine distance
    rows = torch.arange(B, device=x.device)
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).amin(-1).argmax(-1)  # [B]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    chosen[rows, first] = True
    nearest = dist[rows, first]  # [B, N] distance to the closest chosen token
    picks = [first]
    for _ in range(k - 1):
        nxt = nearest.masked_fill(chosen, float("-inf")).argmax(-1)
        chosen[rows, nxt] = True
        nearest = torch.minimum(nearest, dist[rows, nxt])
        picks.append(nxt)
    return torch.stack(picks, 1).sort(1).values


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS token (position 0) over the patch tokens, averaged over heads."""
    s = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float()) / math.sqrt(q.shape[-1])
    return s.softmax(-1).mean(1)[:, 1:]  # [B, patches]


def visionzip_tokens(feats: torch.Tensor, cls_attn: torch.Tensor, budget: int) -> torch.Tensor:
    """VisionZip-style: budget * 54/64 dominant tokens by CLS attention, the rest of the budget as
    contextual tokens: evenly spaced anchors among the remaining tokens, every remaining token
    averaged into its most similar anchor (VisionZip's 54 + 10 split for 64 tokens)."""
    B, N, D = feats.shape
    patch = feats[:, -cls_attn.shape[1]:]  # 'full' strategy keeps CLS at 0: rank patches only
    dominant = max(1, round(budget * 54 / 64))
    contextual = budget - dominant
    dom_idx = cls_attn.topk(dominant, dim=-1).indices.sort(-1).values
    dom = patch.gather(1, dom_idx[..., None].expand(-1, -1, D))
    if contextual <= 0:
        return dom
    rest_mask = torch.ones(B, patch.shape[1], dtype=torch.bool, device=feats.device).scatter_(1, dom_idx, False)
    rest_idx = torch.where(rest_mask, torch.arange(patch.shape[1], device=feats.device), patch.shape[1]).sort(1).values
    rest_idx = rest_idx[:, : patch.shape[1] - dominant]
    rest = patch.gather(1, rest_idx[..., None].expand(-1, -1, D))
    step = max(1, rest.shape[1] // contextual)
    anchors = rest[:, ::step][:, :contextual]
    sim = F.normalize(rest.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).transpose(1, 2)
    assign = F.one_hot(sim.argmax(-1), anchors.shape[1]).to(rest.dtype)  # [B, R, C]
    ctx = assign.transpose(1, 2) @ rest / assign.sum(1)[..., None].clamp(min=1)
    return torch.cat([dom, ctx], dim=1)


# ----------------------------------------------------------------------------- the registry's lookups
BUILTIN = ("two_stage", "fastv", "pdrop", "dart", "visionzip", "divprune", "random")
BASELINES = tuple(p for p in BUILTIN if p != "two_stage")  # training-free: what --compare runs at a budget


def _load_entry_points() -> None:
    """Policies other packages declare under [project.entry-points."vtprune.policies"]."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in REGISTRY:
            try:
                register_policy(ep.name, ep.load())
            except Exception as e:  # name the plugin instead of failing somewhere inside it
                raise VtpruneError(f"pruning policy '{ep.name}' (entry point {ep.value}): cannot load: {e}") from None


def policy_names() -> list[str]:
    """Every registered policy: the built-ins, then the others in the order they registered."""
    _load_entry_points()
    return list(BUILTIN) + [n for n in REGISTRY if n not in BUILTIN]


def get_policy(name: str) -> type:
    """The class registered as `name` (VtpruneError listing the registered names if none)."""
    if name not in REGISTRY:
        names = policy_names()
        if name not in REGISTRY:
            raise VtpruneError(f"unknown pruning policy {name!r} (registered: {', '.join(names)})")
    return REGISTRY[name]
