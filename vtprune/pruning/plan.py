"""PruningPlan: a policy (policy.py, the built-ins in policies.py) attached to a model, and the
pruned prefill that carries its decisions out.

The policy decides; the plan does the rest, the same way for every policy: stage 0's image run
(RoPE positions: the full-run ones for policies that keep them, the proportional-attention bias
for merges), the drop points' top-k or threshold keep sets, and the gathers that take dropped
tokens out of the residual stream (hidden states, positions, bias: vtprune.kernels.gather_tokens)
so that the KV caches of the pruning layer and later only ever hold kept tokens.

Budgets: `budget` is the average number of visual tokens per decoder layer, the usual unit for
comparing these methods; each policy's schedule is solved for it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..engine.config import LlavaModelConfig
from ..engine.flops import prefill_flops
from ..engine.inputs import PreparedBatch
from ..engine.model import LlavaModel
from ..engine.shared_prefix import plan_sharing, prefill_shared_prefix
from ..errors import VtpruneError
from ..kernels import gather_tokens, gumbel_topk
from .config import PruningConfig
from .modules import PruningModules, size_bias
from .policies import get_policy
from .policy import DropPoint, LayerInput, VisualInput, VisualTokens
from .tokens import keep_indices, original_positions, question_mask
from .weights import load_pruning_weights

__all__ = ["PruningPlan", "PrefillTrace", "DropPoint", "LayerState", "build_plan", "run_layers"]


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
        self.policy = get_policy(cfg.policy)(cfg, model_cfg, modules)
        schedule = self.policy.schedule(n, L)
        self.visual_in_sequence, self.drop_points = schedule.visual_in_sequence, list(schedule.drop_points)
        self._check_schedule(n, L)

    def _check_schedule(self, n: int, L: int) -> None:
        """A policy's schedule is its author's code: refuse one the prefill cannot carry out."""
        where = f"pruning policy '{self.cfg.policy}': schedule"
        if not 1 <= self.visual_in_sequence <= n:
            raise VtpruneError(f"{where}: {self.visual_in_sequence} visual tokens in the sequence (1..{n})")
        layers = [p.layer for p in self.drop_points]
        if layers != sorted(set(layers)) or any(not 1 <= l < L for l in layers):
            raise VtpruneError(f"{where}: drop layers {layers} must ascend, each in 1..{L - 1}")
        if any(p.keep is not None and p.keep < 1 for p in self.drop_points):
            raise VtpruneError(f"{where}: every drop point keeps at least one visual token")

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
        """How far the text after the image sits from its index in the sequence. Policies that
        keep positions (two-stage merges) place each stage-0 token at its source's place in the
        full run and the text after it where it was, as layer pruning does: the decoder was
        trained on full runs and reads relative positions (README, *Measured quality*: left/right accuracy
        with contiguous positions). The others feed fewer tokens at contiguous positions."""
        if not self.policy.keeps_positions:
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
        s similar ones draws the attention those s did (README, *Pruning*: without it merged runs
        wrote objects twice in captions)."""
        return bool(self.policy.proportional_attention and self.visual_in_sequence < self.mcfg.num_visual_tokens)

    def key_bias(self, input_ids: torch.Tensor, sizes: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """[B, T] additive attention bias of a prompt batch: log(size) at the image slots, 0 at
        text; None when this plan does not use proportional attention."""
        if sizes is None or not self.uses_key_bias:
            return None
        bias = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        bias[input_ids == self.mcfg.image_token_index] = size_bias(sizes).flatten()
        return bias.to(dtype)

    # ------------------------------------------------------------------ stage 0
    def visual_tokens(self, model: LlavaModel, batch: PreparedBatch, **training) -> VisualTokens:
        """The policy's stage 0: the image run of each row ([B, visual_in_sequence, D] projected
        tokens, with their sources and sizes where the policy gives them), checked. `training`:
        VisualInput's training options (features, tau, noise, seed), for the trainer's forward."""
        inp = VisualInput(model, batch, self.visual_in_sequence, self.mcfg.image_token_index, **training)
        out = self.policy.select_visual(inp)
        f = out.features
        want = (batch.input_ids.shape[0], self.visual_in_sequence, self.mcfg.text.hidden_size)
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != want:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise VtpruneError(f"pruning policy '{self.cfg.policy}': select_visual returned features of shape "
                               f"{got}, expected {want}")
        for name in ("sources", "sizes"):
            t = getattr(out, name)
            if t is not None and tuple(t.shape) != want[:2]:
                raise VtpruneError(f"pruning policy '{self.cfg.policy}': select_visual returned {name} of shape "
                                   f"{tuple(t.shape)}, expected {want[:2]}")
        return out

    # ------------------------------------------------------------------ the pruned prefill
    def prefill(self, model: LlavaModel, batch: PreparedBatch, cache, share_prefix: bool = True):
        """Like engine.generate.prefill, dropping visual tokens at each drop point.
        Returns (last-token logits [B, V], PrefillTrace)."""
        vt = self.visual_tokens(model, batch)
        feats, sources, sizes = vt.features, vt.sources, vt.sizes
        x = model.embed(batch.input_ids, feats)
        B, T = batch.input_ids.shape
        dev = x.device
        lengths = batch.lengths
        positions = self.positions(batch.input_ids, sources)
        bias = self.key_bias(batch.input_ids, sizes, x.dtype)  # proportional attention, or None
        index = torch.arange(T, device=dev).expand(B, T).contiguous()  # what PrefillTrace.kept reports
        is_visual = (batch.input_ids == self.mcfg.image_token_index).long()
        is_question = question_mask(batch.input_ids, self.mcfg.image_token_index, lengths).long()
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
        # probe); a question-aware stage 0 makes even the image tokens row-specific.
        sharing = (plan_sharing(batch, self.mcfg.image_token_index)
                   if share_prefix and not self.policy.question_aware and self.position_offset == 0 else None)
        if sharing is not None:
            stop = min([*points, *probes.hooks, L])
            if stop > 0:
                x = prefill_shared_prefix(model, batch, x, sharing, stop, cache)
                trace.visual += [vis_count] * stop
                trace.total += [lengths] * stop
                start = stop
        state = LayerState(x, positions, bias)

        def drop(layer: int, st: LayerState) -> None:
            """The policy's keep set before `layer`: the other tokens leave the hidden states, the
            positions, the bias and (from this layer on) the KV caches."""
            nonlocal index, is_visual, is_question, lengths, vis_count
            keep = self._keep_mask(model, points[layer], st.x, is_visual, is_question, lengths,
                                   probes.scores.get(layer))
            idx, new_len = keep_indices(keep)
            st.x = gather_tokens(st.x, idx, new_len, validate=False)
            st.positions = gather_tokens(st.positions, idx, new_len, validate=False)
            index = gather_tokens(index, idx, new_len, validate=False)
            is_visual = gather_tokens(is_visual, idx, new_len, validate=False)
            is_question = gather_tokens(is_question, idx, new_len, validate=False)
            if st.key_logmask is not None:
                st.key_logmask = gather_tokens(st.key_logmask, idx, new_len, validate=False)
            lengths, vis_count = new_len, is_visual.sum(1)
            probes.lengths = lengths
            trace.kept[layer] = (index, lengths)
            if cache is not None:
                cache.set_lengths(lengths, layers=range(layer, L))
                if st.key_logmask is not None:
                    cache.set_key_bias(st.key_logmask, layers=[layer])

        def count(layers: range, st: LayerState) -> None:
            trace.visual.extend([vis_count] * len(layers))
            trace.total.extend([lengths] * len(layers))

        run_layers(model, state, dict.fromkeys(points, drop), start=start, cache=cache, probes=probes.hooks,
                   after_segment=count)
        x = state.x
        last = x[torch.arange(B, device=dev), lengths - 1]
        return model.decoder.logits(last), trace

    def _keep_mask(self, model, point: DropPoint, x, is_visual, is_question, lengths, probe):
        """[B, T] bool: every valid text token, plus the visual tokens the policy's scores keep
        (the `keep` best, or those whose sigmoid passes keep_threshold; at least one)."""
        B, T = is_visual.shape
        valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
        vis = is_visual.bool() & valid
        inp = LayerInput(point.layer, point.keep, x, vis, is_question.bool() & valid, lengths, probe)
        scores = self.policy.score(inp)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, T):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise VtpruneError(f"pruning policy '{self.cfg.policy}': score at layer {point.layer} returned {got}, "
                               f"expected a [B, T] = {(B, T)} tensor")
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
        """The policy's probe (if any) at layer l-1 of each drop point l."""
        probes = _Probes(lengths, self.policy.probe)
        if self.policy.probe is not None:
            for layer in points:
                probes.add(layer - 1, layer)
        return probes

    # ------------------------------------------------------------------ FLOPs
    def prefill_flops(self, trace: PrefillTrace, unpruned_lengths: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per row: (prefill FLOPs with this plan, without pruning), see engine/flops.py; a policy's
        own modules add their multiply-accumulates (PruningPolicy.extra_flops)."""
        mcfg = self.mcfg
        L, nv = mcfg.text.num_layers, mcfg.num_visual_tokens
        full = [prefill_flops(mcfg, [n] * L, nv) for n in unpruned_lengths.tolist()]
        extra = self.policy.extra_flops()
        totals = torch.stack(trace.total, 1).tolist()  # [B, L]
        pruned = [prefill_flops(mcfg, row, self.visual_in_sequence, extra) for row in totals]
        return pruned, full


@dataclass
class LayerState:
    """What flows through the decoder between decisions: the residual stream and its RoPE
    positions, the additive key log-mask every query adds for those keys ([B, T]: proportional
    attention's log(size), training's 0/-inf keep masks; None: plain causal attention) and
    training's value scales ([B, T] or None)."""
    x: torch.Tensor
    positions: torch.Tensor
    key_logmask: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None


def run_layers(model: LlavaModel, state: LayerState, decisions: dict, start: int = 0, cache=None, probes=None,
               outputs=(), after_segment=None, checkpoint: bool = False) -> None:
    """The per-layer loop of every pruned forward: the decoder's layers from `start` on, in
    segments that share one key log-mask. Before each layer l in `decisions`, decisions[l](l,
    state) changes the state: inference's drop mode gathers the kept tokens (PruningPlan.prefill),
    training's mask mode sets new key log-masks and value scales (training/forward.py). After each
    segment `after_segment(layers, state)`; a segment ends after every layer in `outputs` (the
    hidden states the trainer's discriminator reads)."""
    L = model.cfg.text.num_layers
    bounds = sorted({*decisions, *(layer + 1 for layer in outputs), L} - set(range(start + 1)))
    for stop in bounds:
        if start in decisions:
            decisions[start](start, state)
        layers = range(start, stop)
        state.x = model.decoder(state.x, state.positions, cache, layers=layers, probes=probes,
                                key_logmasks=None if state.key_logmask is None else dict.fromkeys(layers, state.key_logmask),
                                value_scales=None if state.value_scale is None else dict.fromkeys(layers, state.value_scale),
                                checkpoint=checkpoint)
        if after_segment is not None:
            after_segment(layers, state)
        start = stop


class _Probes:
    """Hooks running the policy's probe at layer l-1 for the decision before l. `lengths` is
    updated by the prefill after every drop (the last token moves)."""

    def __init__(self, lengths, probe):
        self.hooks, self.scores, self.lengths, self.probe = {}, {}, lengths, probe

    def add(self, at_layer: int, for_layer: int):
        def hook(q, k):
            self.scores[for_layer] = self.probe(q, k, self.lengths)
        self.hooks[at_layer] = hook


def build_plan(cfg: PruningConfig, model: LlavaModel, device, dtype, seed: int = 0) -> PruningPlan:
    """A plan for `model`, with the two-stage modules loaded from cfg.weights or randomly initialised."""
    modules = None
    if cfg.policy == "two_stage":
        mcfg = model.cfg
        torch.manual_seed(seed)
        modules = PruningModules.for_model(cfg, mcfg)
        if cfg.weights:
            load_pruning_weights(modules, cfg.weights)
        else:
            warnings.warn("pruning: no 'weights' file in the config: the token merger and pruner heads are "
                          "randomly initialised (train them with `vtprune train`)", stacklevel=3)
        modules = modules.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return PruningPlan(cfg, model.cfg, modules)
