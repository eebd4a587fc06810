"""The two forwards of a training step, on the frozen LLaVA.

Full model (the teacher, "real"): the unpruned prompt + answer, no gradient.
Pruned model (the generator, "fake"): the same text with the merged image run (M tokens), where
nothing is physically dropped. The token merger's Gumbel-Top-K picks the merge centres and its
straight-through mask weights the merged tokens (TokenMerger.forward); at each pruning layer the
PrunerHead's keep logits go through gumbel_topk (the kernels' autograd wrapper), the kept set is
the product of every mask so far, and from that layer on its log (0 or -inf) is added to the
attention scores of every query for those keys (an additive log-mask on keys: the decoder's
`key_logmask`; with proportional attention log(size) of each merged token is added there too).
With the same decisions this is exactly the dropping prefill of inference (tests compare the
prefill with the same masked forward, tests/masked_reference.py), and gradients reach every head
through the mask.

Text tokens (question and answer) are the same in both sequences: the task loss compares the
two models' next-token distributions at the answer positions, and the discriminator sees the
mean text-token hidden state at a few layers (`feature_layers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.inputs import PreparedBatch, PromptEncoder, format_prompt, load_image
from ..engine.model import LlavaModel
from ..engine.runtime import quiet_transformers
from ..kernels import gumbel_topk
from ..pruning.config import PruningConfig
from ..pruning.modules import PruningModules
from ..pruning.plan import LayerState, PruningPlan, run_layers
from ..pruning.tokens import pack, question_mask


@dataclass
class Sequences:
    """One tokenization of a batch: prompt + answer + EOS, right-padded."""
    input_ids: torch.Tensor       # [B, T]
    lengths: torch.Tensor         # [B] prompt + answer tokens
    prompt_lengths: torch.Tensor  # [B]


@dataclass
class TrainBatch:
    pixel_values: torch.Tensor    # [B, 3, H, W]
    full: Sequences               # num_visual_tokens image tokens per row
    pruned: Sequences             # target_merge_tokens image tokens per row
    targets: torch.Tensor         # [n] answer token ids, rows concatenated (the same in both)


class BatchBuilder:
    """Examples -> TrainBatch with the engine's own preprocessing (prompt template, tokenizer,
    image processor)."""

    def __init__(self, tokenizer, image_processor, image_token: int, num_visual: int, num_merged: int,
                 eos_id: int, pad_id: int):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.full = PromptEncoder(tokenizer, num_visual, image_token)
        self.pruned = PromptEncoder(tokenizer, num_merged, image_token)
        self.eos_id, self.pad_id = eos_id, pad_id

    def answer_ids(self, prompt: str, answer: str, prompt_ids: list[int]) -> list[int]:
        """The answer's tokens as they follow the prompt (tokenized together where the prompt's
        tokens are a prefix of the joint tokenization, else alone), then EOS."""
        return self.pruned.continuation(prompt, " " + answer.strip(), prompt_ids) + [self.eos_id]

    def _sequences(self, prompts: list[list[int]], answers: list[list[int]]) -> Sequences:
        rows = [p + a for p, a in zip(prompts, answers)]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return Sequences(ids, torch.tensor([len(r) for r in rows]), torch.tensor([len(p) for p in prompts]))

    def build(self, examples, device, dtype) -> TrainBatch:
        prompts = [format_prompt(e.question) for e in examples]
        pruned_p = [self.pruned.encode(p) for p in prompts]
        full_p = [self.full.encode(p) for p in prompts]
        answers = [self.answer_ids(p, e.answer, ids) for p, e, ids in zip(prompts, examples, pruned_p)]
        pil = [load_image(e.image, e.line, self.image_processor) for e in examples]
        with quiet_transformers():
            pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        full, pruned = self._sequences(full_p, answers), self._sequences(pruned_p, answers)
        to = (lambda s: Sequences(*(t.to(device) for t in (s.input_ids, s.lengths, s.prompt_lengths))))
        targets = torch.tensor([t for a in answers for t in a], dtype=torch.long, device=device)
        return TrainBatch(pixels.to(device, dtype), to(full), to(pruned), targets)


def answer_positions(seq: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every position that predicts an answer token, rows concatenated."""
    rows, cols = [], []
    for b, (p, n) in enumerate(zip(seq.prompt_lengths.tolist(), seq.lengths.tolist())):
        rows += [b] * (n - p)
        cols += list(range(p - 1, n - 1))
    dev = seq.input_ids.device
    return torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev)


def _text_mask(seq: Sequences, image_token: int) -> torch.Tensor:
    """[B, T] bool: tokens after the image run (question and answer), within each row."""
    return question_mask(seq.input_ids, image_token, seq.lengths)


def _pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(h.dtype)
    return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float()


def feature_layers(cfg: PruningConfig, num_layers: int) -> list[int]:
    """Decoder layers whose outputs the discriminator sees: each pruning layer and the last."""
    return sorted(set(cfg.pruning_layers) | {num_layers - 1})


@torch.no_grad()
def teacher_forward(model: LlavaModel, batch: TrainBatch, vision_feats: torch.Tensor, layers: list[int]):
    """-> (answer-position logits [n, V], features [B, len(layers), H]) of the unpruned model."""
    seq = batch.full
    x = model.embed(seq.input_ids, model.projector(vision_feats))
    B, T = seq.input_ids.shape
    positions = torch.arange(T, device=x.device).expand(B, T)
    text = _text_mask(seq, model.cfg.image_token_index)
    feats, start = [], 0
    for layer in layers:
        x = model.decoder(x, positions, layers=range(start, layer + 1))
        feats.append(_pooled(x, text))
        start = layer + 1
    if start < model.cfg.text.num_layers:
        x = model.decoder(x, positions, layers=range(start, model.cfg.text.num_layers))
    r, c = answer_positions(seq)
    return model.decoder.logits(x[r, c]), torch.stack(feats, 1)


class _LogMask(torch.autograd.Function):
    """A 0/1 keep mask -> additive attention mask 0/-inf. Backward: d log(m)/dm = 1 at m = 1;
    at m = 0 the attention's own gradient for the (masked) key is 0, so the factor is moot."""

    @staticmethod
    def forward(ctx, m):
        return torch.zeros_like(m).masked_fill(m < 0.5, float("-inf"))

    @staticmethod
    def backward(ctx, g):
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class StudentOutput:
    logits: torch.Tensor              # [n, V] at the answer positions
    features: torch.Tensor            # [B, len(layers), H]
    merge_logits: torch.Tensor        # [B, N] the merger's importance logits
    head_logits: dict                 # {layer: [B, M] keep logits (-inf: dropped earlier)}
    candidates: dict                  # {layer: [B, M] bool, tokens still alive before that layer}
    kept: dict                        # {layer: [B] visual tokens kept from that layer on}


def student_forward(model: LlavaModel, modules: PruningModules, cfg: PruningConfig, batch: TrainBatch,
                    vision_feats: torch.Tensor, tau: float, seed: int | None, layers: list[int],
                    noise: bool = True, gradient_checkpointing: bool = False,
                    plan: PruningPlan | None = None) -> StudentOutput:
    """The pruned model with soft decisions (see the module docstring). `seed` draws the Gumbel
    noise of every stage (stage s uses seed + s). Stage 0 (the merge, its RoPE positions and its
    proportional-attention bias) is the inference plan's own (PruningPlan.visual_tokens,
    positions, key_bias), and so is the per-layer loop (plan.run_layers) in its mask mode: the
    decisions set additive key log-masks instead of dropping tokens. `plan`: the trainer's, built
    once (None: built here)."""
    seq = batch.pruned
    image_token = model.cfg.image_token_index
    B, T = seq.input_ids.shape
    plan = plan if plan is not None else PruningPlan(cfg, model.cfg, modules)
    prompt_q = question_mask(seq.input_ids, image_token, seq.prompt_lengths)
    prompts = PreparedBatch(seq.input_ids, seq.prompt_lengths, batch.pixel_values)  # the question ends the prompt
    vt = plan.visual_tokens(model, prompts, features=vision_feats, tau=tau, noise=noise, seed=seed)
    x = model.embed(seq.input_ids, vt.features)
    dev = x.device
    positions = plan.positions(seq.input_ids, vt.sources)  # merged tokens at their centres' places
    is_visual = seq.input_ids == image_token
    M = vt.features.shape[1]
    vis_pos = is_visual.nonzero()[:, 1].view(B, M)  # every row holds exactly M image tokens
    text = _text_mask(seq, image_token)

    logmask = plan.key_bias(seq.input_ids, vt.sizes, x.dtype)  # + log(size) on merged tokens' keys, or None
    bias = None if logmask is None else logmask.gather(1, vis_pos)
    head_logits, candidates, kept, feats = {}, {}, {}, []
    keeps = dict(zip(cfg.pruning_layers, cfg.layer_keep_tokens))
    alive = torch.ones(B, M, device=dev)

    def mask(layer: int, st: LayerState) -> None:
        """The head's soft keep decision before `layer`: from here on the dropped tokens' keys are
        masked (additive -inf) instead of leaving the sequence."""
        nonlocal alive
        vis_h = st.x.gather(1, vis_pos[..., None].expand(-1, -1, st.x.shape[-1]))
        q_h, q_valid = pack(st.x, prompt_q)
        alive_b = alive > 0.5
        logits = modules.pruners[str(layer)](vis_h, q_h, q_valid, alive_b).masked_fill(~alive_b, float("-inf"))
        k = min(keeps[layer], M)
        _, m, _ = gumbel_topk(logits, k, tau=tau, noise=noise,
                              seed=None if seed is None else seed + 1 + len(head_logits), validate=False)
        head_logits[layer], candidates[layer] = logits, alive_b
        alive = alive * m.float()
        kept[layer] = (alive > 0.5).sum(1)
        if cfg.mask_gradient == "value":
            # the keep masks' gradient through the kept tokens' values (PruningConfig says why)
            vis_lm = _LogMask.apply(alive.detach())
            st.value_scale = torch.ones(B, T, device=dev, dtype=alive.dtype).scatter(1, vis_pos, alive)
        else:
            vis_lm = _LogMask.apply(alive)
        if bias is not None:
            vis_lm = vis_lm + bias
        st.key_logmask = torch.zeros(B, T, device=dev, dtype=vis_lm.dtype).scatter(1, vis_pos, vis_lm)

    feature_at = set(layers)

    def features(segment: range, st: LayerState) -> None:
        if segment[-1] in feature_at:
            feats.append(_pooled(st.x, text))

    state = LayerState(x, positions, logmask)
    run_layers(model, state, dict.fromkeys(keeps, mask), outputs=layers, after_segment=features,
               checkpoint=gradient_checkpointing)
    x = state.x
    r, c = answer_positions(seq)
    return StudentOutput(model.decoder.logits(x[r, c]), torch.stack(feats, 1), vt.logits, head_logits,
                         candidates, kept)
