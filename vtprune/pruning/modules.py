"""The learned pruning modules: TokenMerger (before the decoder) and PrunerHead (inside it).

TokenMerger (vision-encoder features [B, N, Dv] -> [B, M, Dv]):
  importance = MLP(features [+ cross-attention to the question's token embeddings])   [B, N]
  centres    = gumbel_topk(importance, M)        (noise only while training)
  merged     = soft_merge(features, keys = Wk f, queries = Wq f[centres], tau)
  sizes      = how many tokens each merged token stands for (soft_merge's column sums)
  The merged tokens come out in the centres' spatial order and then pass the projector; with
  proportional_attention the decoder adds log(size) to every attention logit of a merged token.
PrunerHead (hidden states entering a pruning layer):
  visual and question states -> d_internal, multi-head cross-attention (query = visual,
  key/value = question), MLP -> keep logits [B, Nv].
Both call the kernels' public ops (vtprune.kernels), the same autograd Functions training uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VtpruneError
from ..kernels import gumbel_topk, soft_merge
from .config import PruningConfig


class CrossAttention(nn.Module):
    """Multi-head attention from `q_in` [B, Nq, d] to `kv_in` [B, Nk, d] with a key padding mask."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, q_in, kv_in, kv_valid):
        B, Nq, d = q_in.shape
        h = self.heads
        q = self.q(q_in).view(B, Nq, h, d // h).transpose(1, 2)
        k = self.k(kv_in).view(B, -1, h, d // h).transpose(1, 2)
        v = self.v(kv_in).view(B, -1, h, d // h).transpose(1, 2)
        # rows with no question tokens attend to nothing: give them an all-zero context
        has_any = kv_valid.any(-1)
        valid = kv_valid | ~has_any[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = out * has_any[:, None, None, None].to(out.dtype)
        return self.o(out.transpose(1, 2).reshape(B, Nq, d))


class TokenMerger(nn.Module):
    def __init__(self, cfg: PruningConfig, vision_dim: int, text_dim: int):
        super().__init__()
        d = cfg.pruner_d_internal
        self.target = cfg.target_merge_tokens
        self.question_aware = cfg.merger_type == "question_aware"
        self.inp = nn.Linear(vision_dim, d)
        if self.question_aware:
            self.question_proj = nn.Linear(text_dim, d)
            self.cross = CrossAttention(d, cfg.pruner_num_heads)
        self.importance = nn.Sequential(nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.key_proj = nn.Linear(vision_dim, d)
        self.query_proj = nn.Linear(vision_dim, d)
        # Queries start equal to keys and both are length-normalised (_unit), so a token's score
        # for a centre is a cosine: every centre is its own best match and each other token joins
        # the centre it resembles most (clustering). With raw dot products of independent random
        # projections a few long vectors took most tokens and many centres were left with others'
        # features, which training did not undo (README, *Measured quality*: 51% before training).
        self.query_proj.load_state_dict(self.key_proj.state_dict())
        # Spatial locality (merge_locality = lam > 0): a token's score for a centre also falls with
        # their squared distance on the patch grid, (cos - lam |p_n - p_c|^2) / tau with p in units
        # of the grid's side; lam is learned (kept positive as exp(log_locality)). Without it,
        # look-alike tokens far apart merge into one (two red triangles become one token), which
        # costs exactly what needs separate objects: counting and captions listing objects left to
        # right (README, *Pruning*: merge_locality).
        self.log_locality = (nn.Parameter(torch.tensor(math.log(cfg.merge_locality)))
                             if cfg.merge_locality > 0 else None)
        self.logit_scale, self.logit_bias = cfg.selection_logit_scale, selection_bias(cfg)

    def scores(self, feats, question=None, question_valid=None):
        h = self.inp(feats)
        if self.question_aware:
            h = h + self.cross(h, self.question_proj(question), question_valid)
        return standardize_logits(self.importance(h).squeeze(-1).float(), self.logit_scale, self.logit_bias)

    @staticmethod
    def _unit(v, d: int | None = None):
        """Length d**0.25 (d: the kernel's key width, default v's), so that soft_merge's score
        q.k / (sqrt(d) tau) is cos(q, k) / tau."""
        return F.normalize(v, dim=-1) * (v.shape[-1] if d is None else d) ** 0.25

    def keys_queries(self, feats, centres):
        """soft_merge's keys [B, N, d'] and queries [B, M, d'] (d' = d, or d + 3 with locality)."""
        picked = feats.gather(1, centres[..., None].expand(-1, -1, feats.shape[-1]))
        keys, queries = self.key_proj(feats), self.query_proj(picked)
        if self.log_locality is None:
            return self._unit(keys), self._unit(queries)
        B, N, _ = feats.shape
        side = math.isqrt(N)
        if side * side != N:
            raise VtpruneError(f"merge_locality needs a square patch grid, got {N} visual tokens")
        # keys [2 p_n, 1], queries [p_c, -|p_c|^2]: their dot is |p_n|^2 - |p_n - p_c|^2, and |p_n|^2
        # is the same for every centre, so it cancels in the softmax over centres
        idx = torch.arange(N, device=feats.device)
        p = torch.stack([idx // side, idx % side], -1).to(keys.dtype) / side  # [N, 2]
        pc = p[centres]                                                       # [B, M, 2]
        d = keys.shape[-1] + 3  # the kernel's q.k / (sqrt(d) tau) is then (cos - lam dist^2) / tau
        w = d ** 0.25 * self.log_locality.exp().sqrt().to(keys.dtype)
        k_pos = torch.cat([2 * p, torch.ones_like(p[:, :1])], -1).expand(B, N, 3) * w
        q_pos = torch.cat([pc, -(pc * pc).sum(-1, keepdim=True)], -1) * w
        return torch.cat([self._unit(keys, d), k_pos], -1), torch.cat([self._unit(queries, d), q_pos], -1)

    def forward(self, feats, tau: float, question=None, question_valid=None, noise=False, seed=None):
        """-> merged [B, M, Dv], centre indices [B, M] (ascending), importance logits [B, N],
        sizes [B, M] (fp32, no gradient: tokens each merged token stands for, summing to N)."""
        B, N, _ = feats.shape
        logits = self.scores(feats, question, question_valid)
        if self.target >= N:  # merging N tokens into N centres is keeping them
            ones = torch.ones(B, N, device=feats.device)
            return feats, torch.arange(N, device=feats.device).expand(B, N), logits, ones
        centres, mask, _ = gumbel_topk(logits, self.target, tau=tau, noise=noise, seed=seed, validate=False)
        keys, queries = self.keys_queries(feats, centres)
        merged, sizes = soft_merge(feats, keys, queries, tau=tau, return_sizes=True)
        if torch.is_grad_enabled() and logits.requires_grad:
            # Training: the straight-through mask is exactly 1 at every centre, so this changes no
            # value, but its gradient reaches the importance logits (the choice of centres).
            merged = merged * mask.gather(1, centres)[..., None].to(merged.dtype)
        return merged, centres, logits, sizes


def selection_bias(cfg: PruningConfig) -> nn.Parameter | None:
    """standardize_logits' learned offset when cfg.selection_logit_scale > 0, else None (raw logits)."""
    return nn.Parameter(torch.zeros(())) if cfg.selection_logit_scale > 0 else None


def standardize_logits(logits: torch.Tensor, scale: float, bias: torch.Tensor | None,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (logits - row mean) / row std + bias, the statistics over `valid` entries [B, N]
    (all when None); the other entries come back unchanged; bias None: logits unchanged (the
    option is off). Per row and monotonic, so a top-k
    selection is the same as on the raw logits: what changes is training. Unbounded, the keep
    logits grow (Adam's steps grow the scale because it beats training's Gumbel noise), after
    which the noise explores nothing and soft masks' gradient (sigmoid' at tau 0.1) is zero
    everywhere but at the boundary (README, *Pruning*: the spreads measured on SynthVQA)."""
    if bias is None:
        return logits
    x = logits.float()
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, x, 0.0).sum(-1, keepdim=True) / n
    std = ((torch.where(valid, x - mean, 0.0) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    return torch.where(valid, scale * (x - mean) / (std + 1e-6) + bias, x)


def size_bias(sizes: torch.Tensor) -> torch.Tensor:
    """Proportional attention's additive logit bias log(size) for merged tokens' sizes [B, M]."""
    return sizes.float().clamp(min=1e-6).log()


class PrunerHead(nn.Module):
    def __init__(self, cfg: PruningConfig, hidden: int):
        super().__init__()
        d = cfg.pruner_d_internal
        self.norm = nn.LayerNorm(hidden)
        self.visual_proj = nn.Linear(hidden, d)
        self.question_proj = nn.Linear(hidden, d)
        self.cross = CrossAttention(d, cfg.pruner_num_heads)
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.logit_scale, self.logit_bias = cfg.selection_logit_scale, selection_bias(cfg)

    def forward(self, visual, question, question_valid, visual_valid=None):
        """visual [B, Nv, H], question [B, Nq, H], question_valid [B, Nq] -> keep logits [B, Nv]
        (fp32). visual_valid [B, Nv] (bool, optional): the tokens still alive (with
        selection_logit_scale the statistics are taken over these)."""
        v = self.visual_proj(self.norm(visual))
        q = self.question_proj(self.norm(question))
        att = self.cross(v, q, question_valid)
        logits = self.mlp(torch.cat([v, att], dim=-1)).squeeze(-1).float()
        return standardize_logits(logits, self.logit_scale, self.logit_bias, visual_valid)


class PruningModules(nn.Module):
    """Everything the two-stage method learns; saved and loaded as one safetensors file with
    keys merger.* and pruners.<layer>.*."""

    def __init__(self, cfg: PruningConfig, vision_dim: int, text_dim: int):
        super().__init__()
        self.merger = TokenMerger(cfg, vision_dim, text_dim)
        self.pruners = nn.ModuleDict({str(i): PrunerHead(cfg, text_dim) for i in cfg.pruning_layers})

    @classmethod
    def for_model(cls, cfg: PruningConfig, mcfg) -> "PruningModules":
        """The modules for a model's widths (the vision features LLaVA selects, the decoder's
        hidden size), randomly initialised from torch's current seed."""
        return cls(cfg, mcfg.vision.hidden_size * len(mcfg.vision_feature_layers), mcfg.text.hidden_size)
