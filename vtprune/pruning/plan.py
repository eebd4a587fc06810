"""PruningPlan: how a policy prunes, and the pruned prefill that carries it out.

Stage 0 (before the decoder) changes how many image tokens a prompt holds:
  two_stage  the TokenMerger merges N vision tokens into target_merge_tokens
  visionzip  dominant tokens by CLS attention + contextual tokens merged from the rest (budget)
  random     budget tokens drawn uniformly (seeded, reproducible)
Later stages drop visual tokens *inside* the decoder, before a layer l:
  two_stage  PrunerHead keep logits at each of pruning_layers (top-k or threshold: ragged rows)
  fastv      after layer K = 2 of 32 (FastV's default; the same relative depth on other models, at
             least 1), ranked by the last token's attention at layer K-1
  pdrop      at L/4, L/2, 3L/4 with one keep ratio, ranked by the last instruction token's attention
             at the layer before (PyramidDrop)
Attention scores come from one query row against the keys (a probe on the layer's q and k), never
from materialised attention matrices. Dropped tokens leave the residual stream: hidden states and
position ids (original positions kept) are gathered with vtprune.kernels.gather_tokens, and the KV
caches of the pruning layer and later only ever hold kept tokens.

Budgets: `budget` is the average number of visual tokens per decoder layer, the usual unit for
comparing these methods; each baseline's schedule is solved for it (see `_schedule`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..engine.config import LlavaModelConfig
from ..engine.flops import prefill_flops
from ..engine.generate import PreparedBatch, vision_features
from ..engine.model import LlavaModel
from ..errors import VtpruneError
from ..kernels import gather_tokens, gumbel_topk
from .config import PruningConfig
from .modules import PruningModules, size_bias


@dataclass
class DropPoint:
    layer: int        # tokens are dropped before this decoder layer
    keep: int | None  # visual tokens kept per row (None: threshold mode, per-row count)


@dataclass
class PrefillTrace:
    """Per-row token counts entering each decoder layer ([B] tensors, one per layer), and for each
    drop point the prompt indices that survive it ({layer: (indices [B, T'], lengths [B])}; the
    sequence as prefilled, i.e. after any merge)."""
    visual: list
    total: list
    kept: dict


class PruningPlan:
    def __init__(self, cfg: PruningConfig, model_cfg: LlavaModelConfig, modules: PruningModules | None = None):
        self.cfg, self.mcfg, self.modules = cfg, model_cfg, modules
        n, L = model_cfg.num_visual_tokens, model_cfg.text.num_layers
        cfg.check_against_model(n, L)
        self.visual_in_sequence, self.drop_points = self._schedule(n, L)

    # ------------------------------------------------------------------ schedules
    def _schedule(self, n: int, L: int) -> tuple[int, list[DropPoint]]:
        c = self.cfg
        if c.policy == "two_stage":
            m = min(c.target_merge_tokens, n)
            keeps = [None] * len(c.pruning_layers) if c.keep_mode == "threshold" else c.layer_keep_tokens
            return m, [DropPoint(layer, k) for layer, k in zip(c.pruning_layers, keeps)]
        b = c.budget
        if c.policy in ("visionzip", "random"):
            return b, []
        if c.policy == "fastv":
            K = min(max(1, round(2 * L / 32)), L - 1)  # FastV prunes after layer 2 of 32: same relative depth
            keep = round((L * b - K * n) / (L - K))
            if keep < 1:
                raise VtpruneError(f"pruning config: 'budget' {b} is too small for fastv: the first {K} layer{'s' if K > 1 else ''} "
                                   f"alone hold {K * n / L:.0f} visual tokens per layer on average")
            return n, [DropPoint(K, min(keep, n))]
        # pdrop: stages at L/4, L/2, 3L/4 keep n * lam^s; the layer average is n (1 + lam + lam^2 + lam^3) / 4
        layers = sorted({max(1, round(L * f)) for f in (0.25, 0.5, 0.75)})
        floor = (n * layers[0] + (L - layers[0])) / L  # every later stage down to one token
        if floor > b + 1:  # within a token of the budget is as close as rounding gets anyway
            raise VtpruneError(f"pruning config: 'budget' {b} is too small for pdrop: its first {layers[0]} of {L} "
                               f"layers alone hold {n * layers[0] / L:.0f} visual tokens per layer on average")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            lam = (lo + hi) / 2
            bounds = [0] + layers + [L]
            avg = sum(n * lam ** s * (bounds[s + 1] - bounds[s]) for s in range(len(bounds) - 1)) / L
            lo, hi = (lam, hi) if avg < b else (lo, lam)
        keeps = [max(1, round(n * lam ** (s + 1))) for s in range(len(layers))]
        return n, [DropPoint(layer, k) for layer, k in zip(layers, keeps)]

    def visual_tokens_per_layer(self) -> list[int]:
        """Visual tokens entering each decoder layer (top-k schedules; threshold mode: upper bound)."""
        out, vis = [], self.visual_in_sequence
        points = {p.layer: p for p in self.drop_points}
        for layer in range(self.mcfg.text.num_layers):
            p = points.get(layer)
            if p is not None and p.keep is not None:
                vis = min(vis, p.keep)
            out.append(vis)
        return out

    def refusal(self, images: int) -> str | None:
        """Why this plan cannot run a prompt with `images` images, or None when it can. Every
        policy prunes the visual tokens of one image (its schedule and budget are per image run;
        the two-stage heads were trained on one); a prompt without an image has nothing to prune
        and runs unpruned."""
        if images <= 1:
            return None
        return (f"pruning policy '{self.cfg.policy}' prunes the visual tokens of one image per prompt, "
                f"this prompt has {images} (run it unpruned: set_pruning(None))")

    def check_image_counts(self, counts: list[int]) -> None:
        """Refuse a batch this plan cannot prune (VtpruneError naming the first such prompt): a
        prompt with several images, or text-only prompts batched with prompts that have an image."""
        for i, n in enumerate(counts):
            reason = self.refusal(n)
            if reason is not None:
                raise VtpruneError(f"prompt {i}: {reason}")
        if any(counts) and not all(counts):
            i = counts.index(0)
            raise VtpruneError(f"prompt {i} has no image and others have one: with pruning, give text-only "
                               f"prompts in a call of their own (they run unpruned)")

    def capacities(self, T: int) -> list[int]:
        """Prompt slots each layer's KV cache needs for a batch padded to T tokens (an upper bound
        in threshold mode, where counts are only known during the prefill)."""
        caps, cur, vis = [], T, self.visual_in_sequence
        points = {p.layer: p for p in self.drop_points}
        for layer in range(self.mcfg.text.num_layers):
            p = points.get(layer)
            if p is not None and p.keep is not None and p.keep < vis:
                cur, vis = cur - (vis - p.keep), p.keep
            caps.append(cur)
        return caps

    @property
    def position_offset(self) -> int:
        """How far the text after the image sits from its index in the sequence: two-stage merges
        keep the original RoPE positions (each merged token at its centre's place in the 576-token
        run, the text after it where it was), as layer pruning does. The decoder was trained on
        full runs and reads relative positions (the SynthVQA model's left/right accuracy fell from
        85% to 25% with contiguous positions after a 576 -> 230 merge; dev box, 2026-11-27).
        Pre-decoder baselines (VisionZip-style, random) feed fewer tokens at contiguous positions,
        as their published code does."""
        if self.cfg.policy != "two_stage":
            return 0
        return self.mcfg.num_visual_tokens - self.visual_in_sequence

    def positions(self, input_ids: torch.Tensor, sources: torch.Tensor | None) -> torch.Tensor:
        """RoPE positions [B, T] of a prompt batch whose image run holds visual_in_sequence tokens
        taken from `sources` [B, M] (ascending indices into the full run; None: contiguous)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if sources is None or self.position_offset == 0:
            return positions.contiguous()
        return original_positions(input_ids, self.mcfg.image_token_index, sources, self.mcfg.num_visual_tokens)

    @property
    def uses_key_bias(self) -> bool:
        """Proportional attention (ToMe, Bolya et al. 2023): every attention logit of a merged
        token gets + log(size), size = how many tokens it stands for, so that a token merged from
        s similar ones draws the attention those s did. The decoder was trained on full runs; on
        the SynthVQA model a 576 -> 200 merge without it wrote objects twice in captions (BLEU
        57.5 on 40 captions, unpruned 77.8; with it 71.5; QA accuracy 96% either way; dev box,
        2026-11-27)."""
        return (self.cfg.policy == "two_stage" and self.cfg.proportional_attention
                and self.visual_in_sequence < self.mcfg.num_visual_tokens)

    def key_bias(self, input_ids: torch.Tensor, sizes: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """[B, T] additive attention bias of a prompt batch: log(size) at the image slots, 0 at
        text; None when this plan does not use proportional attention."""
        if sizes is None or not self.uses_key_bias:
            return None
        bias = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        bias[input_ids == self.mcfg.image_token_index] = size_bias(sizes).flatten()
        return bias.to(dtype)

    # ------------------------------------------------------------------ stage 0
    def visual_features(self, model: LlavaModel, batch: PreparedBatch, noise: bool = False) -> torch.Tensor:
        """Projected visual tokens [B, visual_in_sequence, D] for the prompt's image slots."""
        return self.visual_features_and_sources(model, batch, noise)[0]

    def visual_features_and_sources(self, model: LlavaModel, batch: PreparedBatch, noise: bool = False):
        """(projected visual tokens [B, visual_in_sequence, D], the full-run index each one stands
        for [B, visual_in_sequence] (two-stage merge centres) or None, the number of tokens each
        one stands for [B, visual_in_sequence] (two-stage merges) or None)."""
        c = self.cfg
        if c.policy == "visionzip":
            cls_attn = {}
            feats = vision_features(model, batch, probe=lambda q, k: cls_attn.update(a=_cls_attention(q, k)))
            a = cls_attn["a"] if batch.image_index is None else cls_attn["a"][batch.image_index]
            return model.projector(_visionzip(feats, a, self.visual_in_sequence, self.mcfg)), None, None
        feats = vision_features(model, batch)
        if c.policy == "random":
            # one random subset (seed 0) for every image: reproducible, and a row's result does
            # not depend on what else is in its batch
            g = torch.Generator(feats.device).manual_seed(0)
            scores = torch.rand(feats.shape[1], generator=g, device=feats.device).expand(feats.shape[:2])
            idx = scores.topk(self.visual_in_sequence, dim=-1).indices.sort(-1).values
            feats = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
        sources = sizes = None
        if c.policy == "two_stage":
            question, valid = None, None
            if c.merger_type == "question_aware":
                qmask = _question_mask(batch.input_ids, self.mcfg.image_token_index, batch.lengths)
                question, valid = _pack(model.decoder.embed_tokens(batch.input_ids), qmask)
            feats, sources, _, sizes = self.modules.merger(feats, c.temperature_min, question, valid, noise=noise)
        return model.projector(feats), sources, sizes

    # ------------------------------------------------------------------ the pruned prefill
    def prefill(self, model: LlavaModel, batch: PreparedBatch, cache, share_prefix: bool = True):
        """Like engine.generate.prefill, dropping visual tokens at each drop point.
        Returns (last-token logits [B, V], PrefillTrace)."""
        from ..engine.shared_prefix import plan_sharing, prefill_shared_prefix

        feats, sources, sizes = self.visual_features_and_sources(model, batch)
        x = model.embed(batch.input_ids, feats)
        B, T = batch.input_ids.shape
        dev = x.device
        lengths = batch.lengths
        positions = self.positions(batch.input_ids, sources)
        bias = self.key_bias(batch.input_ids, sizes, x.dtype)  # proportional attention, or None
        index = torch.arange(T, device=dev).expand(B, T).contiguous()  # what PrefillTrace.kept reports
        is_visual = (batch.input_ids == self.mcfg.image_token_index).long()
        is_question = _question_mask(batch.input_ids, self.mcfg.image_token_index, lengths).long()
        if cache is not None:
            cache.set_lengths(lengths)
            if bias is not None:
                cache.set_key_bias(bias, layers=[0])  # the first segment; later ones at their drops
        L = self.mcfg.text.num_layers
        points = {p.layer: p for p in self.drop_points}
        probes = self._probes(points, lengths)
        vis_count, trace = is_visual.sum(1), PrefillTrace([], [], {})
        start = 0
        # Rows about one image share the layers before the first decision (and before any
        # attention probe); a question-aware merge makes even the image tokens row-specific.
        question_aware = self.cfg.policy == "two_stage" and self.cfg.merger_type == "question_aware"
        sharing = (plan_sharing(batch, self.mcfg.image_token_index)
                   if share_prefix and not question_aware and self.position_offset == 0 else None)
        if sharing is not None:
            stop = min([*points, *probes.hooks, L])
            if stop > 0:
                x = prefill_shared_prefix(model, batch, x, sharing, stop, cache)
                trace.visual += [vis_count] * stop
                trace.total += [lengths] * stop
                start = stop
        for layer in sorted(points) + [L]:
            if start < layer:
                x = model.decoder(x, positions, cache, layers=range(start, layer), probes=probes.hooks,
                                  key_logmasks=None if bias is None else dict.fromkeys(range(start, layer), bias))
            trace.visual += [vis_count] * max(0, layer - start)
            trace.total += [lengths] * max(0, layer - start)
            start = max(start, layer)
            if layer == L:
                break
            keep = self._keep_mask(model, points[layer], x, is_visual, is_question, lengths, probes.scores.get(layer))
            idx, new_len = _keep_indices(keep)
            x = gather_tokens(x, idx, new_len, validate=False)
            positions = gather_tokens(positions, idx, new_len, validate=False)
            index = gather_tokens(index, idx, new_len, validate=False)
            is_visual = gather_tokens(is_visual, idx, new_len, validate=False)
            is_question = gather_tokens(is_question, idx, new_len, validate=False)
            if bias is not None:
                bias = gather_tokens(bias, idx, new_len, validate=False)
            lengths, vis_count = new_len, is_visual.sum(1)
            probes.lengths = lengths
            trace.kept[layer] = (index, lengths)
            if cache is not None:
                cache.set_lengths(lengths, layers=range(layer, L))
                if bias is not None:
                    cache.set_key_bias(bias, layers=[layer])
        last = x[torch.arange(B, device=dev), lengths - 1]
        return model.decoder.logits(last), trace

    def _keep_mask(self, model, point: DropPoint, x, is_visual, is_question, lengths, scores):
        """[B, T] bool: every valid text token, plus the visual tokens this policy keeps."""
        B, T = is_visual.shape
        valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
        vis = is_visual.bool() & valid
        if self.cfg.policy == "two_stage":
            head = self.modules.pruners[str(point.layer)]
            vx, vvalid = _pack(x, vis)
            qx, qvalid = _pack(x, is_question.bool() & valid)
            logits = head(vx, qx, qvalid, vvalid).masked_fill(~vvalid, float("-inf"))
            scores = _unpack(logits, vis, T)
        scores = scores.float().masked_fill(~vis, float("-inf"))
        if point.keep is None:  # threshold: a per-row count; at least one visual token survives
            chosen = vis & (torch.sigmoid(scores) > self.cfg.keep_threshold)
            top1 = torch.zeros_like(vis).scatter_(1, scores.argmax(1, keepdim=True), True) & vis
            chosen = chosen | (top1 & ~chosen.any(1, keepdim=True))
        else:
            k = min(point.keep, int(vis.sum(1).min()))
            _, chosen, _ = gumbel_topk(scores, k, noise=False, validate=False)
            chosen = chosen.bool() & vis
        return (valid & ~vis) | chosen

    def _probes(self, points, lengths):
        """Attention-score probes for fastv/pdrop: at layer l-1, the last prompt token's attention."""
        probes = _Probes(lengths)
        if self.cfg.policy in ("fastv", "pdrop"):
            for layer in points:
                probes.add(layer - 1, layer)
        return probes

    # ------------------------------------------------------------------ FLOPs
    def prefill_flops(self, trace: PrefillTrace, unpruned_lengths: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per row: (prefill FLOPs with this plan, without pruning), see engine/flops.py; the
        two-stage modules add their linear layers' multiply-accumulates."""
        mcfg = self.mcfg
        L, nv = mcfg.text.num_layers, mcfg.num_visual_tokens
        full = [prefill_flops(mcfg, [n] * L, nv) for n in unpruned_lengths.tolist()]
        extra = 0
        if self.cfg.policy == "two_stage":
            di, d = self.cfg.pruner_d_internal, mcfg.text.hidden_size
            d_in = mcfg.vision.hidden_size * len(mcfg.vision_feature_layers)
            extra += nv * (3 * d_in * di + 2 * di * di)                   # merger projections + importance MLP
            extra += len(self.drop_points) * self.visual_in_sequence * (2 * d * di + 6 * di * di)  # pruner heads
        totals = torch.stack(trace.total, 1).tolist()  # [B, L]
        pruned = [prefill_flops(mcfg, row, self.visual_in_sequence, extra) for row in totals]
        return pruned, full


def masked_prefill(model: LlavaModel, plan: PruningPlan, batch: PreparedBatch, kept: dict) -> torch.Tensor:
    """The training-mode forward: no token leaves the sequence; from each drop layer on, the
    keys of tokens dropped there (and earlier) are masked out (additive -inf). `kept` is
    PrefillTrace.kept (or the same structure from hard masks). With the same decisions this
    gives the dropping prefill's last-token logits (tests/test_pruning.py checks it)."""
    feats, sources, sizes = plan.visual_features_and_sources(model, batch)
    x = model.embed(batch.input_ids, feats)
    B, T = batch.input_ids.shape
    positions = plan.positions(batch.input_ids, sources)
    bias = plan.key_bias(batch.input_ids, sizes, torch.float32)
    logmask = torch.zeros(B, T, device=x.device) if bias is None else bias
    key_logmasks = {}
    for layer in range(model.cfg.text.num_layers):
        if layer in kept:
            pos, lengths = kept[layer]
            alive = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
            valid = torch.arange(pos.shape[1], device=x.device)[None, :] < lengths[:, None]
            alive.scatter_(1, torch.where(valid, pos, T), True)
            logmask = logmask.masked_fill(~alive[:, :T], float("-inf"))
        key_logmasks[layer] = logmask
    h = model.decoder(x, positions, key_logmasks=key_logmasks)
    return model.decoder.logits(h[torch.arange(B, device=x.device), batch.lengths - 1])


class _Probes:
    """Hooks computing, at layer l-1, the last prompt token's attention used to prune before l.
    `lengths` is updated by the prefill after every drop (the last token moves)."""

    def __init__(self, lengths):
        self.hooks, self.scores, self.lengths = {}, {}, lengths

    def add(self, at_layer: int, for_layer: int):
        def hook(q, k):
            lengths = self.lengths
            B, H, T, Dh = q.shape
            qi = q[torch.arange(B, device=q.device), :, lengths - 1]  # [B, H, Dh]: the last prompt token
            if k.shape[1] != H:
                k = k.repeat_interleave(H // k.shape[1], dim=1)
            s = torch.einsum("bhd,bhtd->bht", qi.float(), k.float()) / math.sqrt(Dh)
            valid = torch.arange(T, device=q.device)[None, None, :] < lengths[:, None, None]
            self.scores[for_layer] = s.masked_fill(~valid, float("-inf")).softmax(-1).mean(1)
        self.hooks[at_layer] = hook


def original_positions(input_ids: torch.Tensor, image_token: int, sources: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Positions [B, T] for rows whose one image run holds M = sources.shape[1] tokens standing
    for full-run indices `sources` (ascending): the image run starts at s, its token j sits at
    s + sources[j], and every token after the run at its index + (num_visual - M)."""
    B, T = input_ids.shape
    dev = input_ids.device
    M = sources.shape[1]
    start = (input_ids == image_token).long().argmax(1)  # each row's first image token
    idx = torch.arange(T, device=dev)[None, :]
    positions = idx + (idx >= (start + M)[:, None]).long() * (num_visual - M)
    cols = start[:, None] + torch.arange(M, device=dev)[None, :]
    return positions.scatter(1, cols, start[:, None] + sources.to(positions.dtype))


def _question_mask(input_ids, image_token: int, lengths) -> torch.Tensor:
    """Prompt tokens after the image run (the question), within each row's length."""
    img = input_ids == image_token
    after = (img.long().cumsum(1) > 0) & ~img
    T = input_ids.shape[1]
    return after & (torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None])


def _pack(x, mask):
    """Rows' selected positions packed to the front: ([B, max count, D], valid [B, max count])."""
    B, T = mask.shape
    order = torch.where(mask, torch.arange(T, device=mask.device), T).sort(1).values
    n = int(mask.sum(1).max()) if B else 0
    order = order[:, : max(n, 1)]
    valid = order < T
    packed = x.gather(1, order.clamp(max=T - 1)[..., None].expand(-1, -1, x.shape[-1]))
    return packed * valid[..., None].to(packed.dtype), valid


def _unpack(values, mask, T):
    """Inverse of _pack for per-token scalars: [B, n] -> [B, T] (-inf where mask is False)."""
    B = mask.shape[0]
    order = torch.where(mask, torch.arange(T, device=mask.device), T).sort(1).values[:, : values.shape[1]]
    out = torch.full((B, T + 1), float("-inf"), device=values.device, dtype=values.dtype)
    out.scatter_(1, order, values)
    return out[:, :T]


def _keep_indices(keep):
    """Kept positions per row in ascending order and their count (padding entries are 0)."""
    B, T = keep.shape
    idx = torch.where(keep, torch.arange(T, device=keep.device), T).sort(1).values
    counts = keep.sum(1)
    n = int(counts.max())  # one host sync per drop point (prefill only)
    idx = idx[:, :n]
    return torch.where(idx == T, 0, idx), counts


def _cls_attention(q, k):
    """Attention of the CLS token (position 0) over the patch tokens, averaged over heads."""
    s = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float()) / math.sqrt(q.shape[-1])
    return s.softmax(-1).mean(1)[:, 1:]  # [B, patches]


def _visionzip(feats, cls_attn, budget: int, mcfg: LlavaModelConfig):
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
    sim = torch.nn.functional.normalize(rest.float(), dim=-1) @ torch.nn.functional.normalize(anchors.float(), dim=-1).transpose(1, 2)
    assign = torch.nn.functional.one_hot(sim.argmax(-1), anchors.shape[1]).to(rest.dtype)  # [B, R, C]
    ctx = assign.transpose(1, 2) @ rest / assign.sum(1)[..., None].clamp(min=1)
    return torch.cat([dom, ctx], dim=1)


def build_plan(cfg: PruningConfig, model: LlavaModel, device, dtype, seed: int = 0) -> PruningPlan:
    """A plan for `model`, with the two-stage modules loaded from cfg.weights or randomly initialised."""
    modules = None
    if cfg.policy == "two_stage":
        mcfg = model.cfg
        torch.manual_seed(seed)
        modules = PruningModules(cfg, mcfg.vision.hidden_size * len(mcfg.vision_feature_layers),
                                 mcfg.text.hidden_size)
        if cfg.weights:
            from .weights import load_pruning_weights
            load_pruning_weights(modules, cfg.weights)
        else:
            warnings.warn("pruning: no 'weights' file in the config: the token merger and pruner heads are "
                          "randomly initialised (train them with `vtprune train`)", stacklevel=3)
        modules = modules.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return PruningPlan(cfg, model.cfg, modules)
