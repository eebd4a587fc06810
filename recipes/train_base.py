"""Train the small SynthVQA LLaVA from scratch (the project's embedded default model).

Architecture (LLaVA-1.5 family at toy size, saved in the llava-hf layout so transformers'
LlavaForConditionalGeneration loads it as well as the engine): a CLIP-style ViT, 336 px images in
14 px patches -> 576 visual tokens (4 layers, width 128, 2-D sin-cos initial position embeddings,
features of the last layer), the 2-layer GELU projector, a Llama decoder (6 layers, width 128,
4 heads), and a BPE tokenizer learned from the task's words.

Two stages, both on an endless stream of generated images (synthvqa.sample with the train seed;
the test split's seed is never seen):
  A  the vision tower alone, with dense labels: for each patch, the colour and the shape of the
     object under its centre (or background), whether an object's centre lies in it, and its
     column (left/right questions compare the x of two objects). Dense targets teach a
     from-scratch ViT in minutes what image-text pairs alone would take hours for (the tower's
     measured accuracy, and a smaller tower's: README "Measured quality", step 1).
  B  the whole model on VQA (and captions): cross-entropy on the answer tokens, ~20 questions per
     image packed behind one copy of it (Examples); the vision tower keeps learning at a lower
     rate, with stage A's dense loss alongside.

    python recipes/train_base.py --out models/synthvqa-llava [--steps-a 800 --steps-b 1500]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from vtprune.engine.config import LlavaModelConfig  # noqa: E402
from vtprune.engine.inputs import PromptEncoder, format_prompt  # noqa: E402
from vtprune.engine.runtime import quiet_transformers  # noqa: E402
from vtprune.engine.tokenizer import build_tokenizer  # noqa: E402
from vtprune.engine.weights import checkpoint_files, read_tensors, safetensors_header  # noqa: E402
from vtprune.errors import CheckpointError, VtpruneError  # noqa: E402
from vtprune.files import check_dir, make_output_dir  # noqa: E402
from vtprune.quality import synthvqa as sv  # noqa: E402
from vtprune.quality.synthvqa import COLOURS, NUMBERS, SHAPES, _a  # noqa: E402
from vtprune.validate import check_int, check_number  # noqa: E402

PATCH = 14
GRID = sv.IMAGE_SIZE // PATCH  # 24
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=sv.IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


def init_vision_positions(vision) -> None:
    """2-D sin-cos position embeddings (as MAE) instead of random ones: a from-scratch ViT must
    learn which patches are neighbours before it can tell a square from a circle (the shape of a
    3-4 patch object is spread over its edge patches); the embedding stays learnable."""
    emb = vision.embeddings.position_embedding.weight
    d = emb.shape[1]
    q = d // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    y, x = torch.meshgrid(torch.arange(GRID, dtype=torch.float32), torch.arange(GRID, dtype=torch.float32), indexing="ij")
    ox, oy = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    with torch.no_grad():
        emb.zero_()
        emb[1:, : 4 * q] = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], 1)


def pixels(images) -> torch.Tensor:
    """What CLIPImageProcessor gives for 336x336 RGB images (resize and crop are no-ops)."""
    import numpy as np

    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def patch_labels(objs) -> torch.Tensor:
    """[3, 24, 24] int64: colour id (0 = background), shape id (0 = background), centre flag."""
    maps = []
    for key, ids in (("colour", list(sv.COLOURS)), ("shape", list(sv.SHAPES))):
        im = Image.new("L", (sv.IMAGE_SIZE, sv.IMAGE_SIZE), 0)
        d = ImageDraw.Draw(im)
        for o in objs:
            sv.draw_object(d, o, fill=1 + ids.index(getattr(o, key)), outline=None)
        a = torch.tensor(list(im.getdata()), dtype=torch.long).view(sv.IMAGE_SIZE, sv.IMAGE_SIZE)
        maps.append(a[PATCH // 2::PATCH, PATCH // 2::PATCH])
    centre = torch.zeros(GRID, GRID, dtype=torch.long)
    for o in objs:
        centre[o.y // PATCH, o.x // PATCH] = 1
    return torch.stack([*maps, centre])


def _optimizer_step(opt, params, loss, lr: float) -> None:
    """One clipped AdamW step at `lr` (times each parameter group's "scale", default 1)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


NC, NS = 1 + len(sv.COLOURS), 1 + len(sv.SHAPES)  # classes with background (0)


def dense_head(d: int) -> torch.nn.Linear:
    """Per-patch logits: colour (NC), shape (NS), object centre (2), column (GRID)."""
    return torch.nn.Linear(d, NC + NS + 2 + GRID)


def dense_loss(head, feats: torch.Tensor, y: torch.Tensor):
    """feats [B, 576, d], y [B, 3, 24, 24] (patch_labels) -> (loss, object-patch colour acc,
    object-patch shape acc)."""
    out = head(feats).float()
    B = len(y)
    yc, ys, yz = (y[:, i].reshape(B, -1) for i in range(3))
    columns = torch.arange(GRID * GRID)[None, :] % GRID  # left/right questions need x in the features
    # background patches outnumber object patches ~10:1; weigh objects up
    wc, ws = torch.ones(NC), torch.ones(NS)
    wc[0] = ws[0] = 0.2
    loss = (F.cross_entropy(out[..., :NC].flatten(0, 1), yc.flatten(), weight=wc)
            + F.cross_entropy(out[..., NC:NC + NS].flatten(0, 1), ys.flatten(), weight=ws)
            + F.cross_entropy(out[..., NC + NS:NC + NS + 2].flatten(0, 1), yz.flatten(), weight=torch.tensor([0.05, 1.0]))
            + 0.5 * F.cross_entropy(out[..., NC + NS + 2:].flatten(0, 1), columns.expand(B, -1).flatten()))
    with torch.no_grad():  # object patches only (background is ~90% of them and easy)
        obj = ys.flatten() > 0
        acc_c = (out[..., :NC].argmax(-1).flatten() == yc.flatten())[obj].float().mean().item()
        acc_s = (out[..., NC:NC + NS].argmax(-1).flatten() == ys.flatten())[obj].float().mean().item()
    return loss, acc_c, acc_s


def _mean(rows, k: int) -> float:
    return round(sum(r[k] for r in rows) / len(rows), 3)


def stage_a(model, steps: int, batch: int, seed: int, log, head=None) -> torch.nn.Linear:
    """Train the vision tower on dense patch labels; returns the label head (stage B keeps using it)."""
    vision = model.model.vision_tower
    head = dense_head(vision.config.hidden_size) if head is None else head
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    t0 = time.time()
    hits: list[tuple[float, float]] = []
    for step in range(steps):
        ims, labels = [], []
        for j in range(batch):
            img, objs, _, _ = sv.sample(seed, 10_000_000 + step * batch + j)
            ims.append(img)
            labels.append(patch_labels(objs))
        feats = vision(pixel_values=pixels(ims), output_hidden_states=True).hidden_states[-1][:, 1:]
        loss, acc_c, acc_s = dense_loss(head, feats, torch.stack(labels))
        _optimizer_step(opt, params, loss, _lr(step, steps, 2e-3))
        hits.append((acc_c, acc_s))
        if step % 50 == 0 or step == steps - 1:
            recent = hits[-50:]  # a mean over the last 50 batches: one batch of 16 images is noisy
            log({"stage": "A", "step": step, "loss": round(float(loss), 4), "object_patch_colour_acc": _mean(recent, 0),
                 "object_patch_shape_acc": _mean(recent, 1), "s": round(time.time() - t0, 1)})
    return head


def training_questions(objs, rng: random.Random, left_right_pairs: int = 8) -> list[tuple[str, str]]:
    """Every question of the test split's kinds that the image answers (the test split asks one or
    two of them per image): colour of each shape that occurs once, shape of each colour that occurs
    once, counts of the present colours and of one absent colour, existence of each object and of
    as many absent look-alikes (same colour or same shape), left/right for up to `left_right_pairs`
    ordered pairs."""
    shapes, colours = [o.shape for o in objs], [o.colour for o in objs]
    qa = [(f"What colour is the {o.shape}?", o.colour) for o in objs if shapes.count(o.shape) == 1]
    qa += [(f"What shape is the {o.colour} object?", o.shape) for o in objs if colours.count(o.colour) == 1]
    absent = [c for c in COLOURS if c not in colours]
    for c in sorted(set(colours)) + rng.sample(absent, min(1, len(absent))):
        qa.append((f"How many {c} objects are there?", NUMBERS[colours.count(c)]))
    present = {(o.colour, o.shape) for o in objs}
    lookalikes = sorted({p for o in objs for p in [(o.colour, s) for s in SHAPES] + [(c, o.shape) for c in COLOURS]}
                        - present)
    qa += [(f"Is there {_a(o.name)}?", "yes") for o in objs]
    qa += [(f"Is there {_a(c + ' ' + s)}?", "no") for c, s in rng.sample(lookalikes, min(len(objs), len(lookalikes)))]
    pairs = [(p, q) for p in objs for q in objs if p is not q and abs(p.x - q.x) >= 30]
    # left/right is the hardest kind (two lookups and a comparison: 35% after 750 steps with 4 pairs
    # per image while shape was at 100%), so it gets up to 8 pairs
    for p, q in rng.sample(pairs, min(left_right_pairs, len(pairs))):
        qa.append((f"Is the {p.name} left or right of the {q.name}?", "left" if p.x < q.x else "right"))
    return qa


class Examples:
    """Training rows for the stream `seed`, one image per row with many questions behind it:

        <s>USER: <image>\n | Q1 ASSISTANT: A1</s> | Q2 ASSISTANT: A2</s> | ...

    The 576 image tokens dominate a row's cost, so one row carries ~20 answers. Each turn sees the
    shared prefix (through the image) and itself only -- a block mask, and position ids that restart
    after the prefix -- so every turn is exactly the single-question prompt the engine builds and no
    answer can be read off another turn. (A plain multi-turn conversation gave ~6 answers per row
    and let later answers lean on earlier ones.)"""

    def __init__(self, tokenizer, image_token: int, caption_rate: float = 1.0, left_right_pairs: int = 8):
        self.left_right_pairs = left_right_pairs
        self.tok = tokenizer
        self.enc = PromptEncoder(tokenizer, GRID * GRID, image_token)
        self.caption_rate = caption_rate

    def turns(self, qa: list[tuple[str, str]]) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
        """-> (shared prefix ids, [(turn ids, turn labels)]) with labels -100 outside the answers;
        prefix + turn ids == the engine's prompt for that question + the answer's tokens + EOS."""
        full = []
        for q, a in qa:
            prompt = format_prompt(q)
            p = self.enc.encode(prompt)
            full.append((p, self.enc.continuation(prompt, " " + a.strip(), p) + [self.tok.eos_token_id]))
        n = min(len(p) for p, _ in full)
        while any(p[:n] != full[0][0][:n] for p, _ in full):
            n -= 1
        prefix = full[0][0][:n]
        return prefix, [(p[n:] + ans, [-100] * (len(p) - n) + ans) for p, ans in full]

    def batch(self, seed: int, start: int, n: int, background_keep: float = 1.0):
        """Images start..start+n-1 of `seed` -> (pixels, ids [n, T], attention mask [n, 1, T, T]
        bool, position ids [n, T], labels [n, T], patch labels [n, 3, 24, 24]).
        background_keep < 1: each background visual token is hidden from every query with
        probability 1 - background_keep (object tokens and their one-patch margin always stay)."""
        rng = random.Random(seed * 7 + start)
        g = torch.Generator().manual_seed(seed * 7 + start)
        ims, rows, dense = [], [], []
        for j in range(n):
            img, objs, _, cap = sv.sample(seed, start + j)
            ims.append(img)
            qa = training_questions(objs, rng, self.left_right_pairs)
            if rng.random() < self.caption_rate:
                qa.append(("Describe the image.", cap))
            rng.shuffle(qa)
            dense.append(patch_labels(objs))
            obj = dense[-1][0] > 0
            obj = F.max_pool2d(obj[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
            rows.append((self.turns(qa), obj.flatten()))
        T = max(len(pre) + sum(len(t) for t, _ in turns) for (pre, turns), _ in rows)
        ids = torch.full((n, T), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        pos = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, 1, T, T, dtype=torch.bool)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for i, ((pre, turns), obj) in enumerate(rows):
            P = len(pre)
            ids[i, :P] = torch.tensor(pre)
            pos[i, :P] = torch.arange(P)
            mask[i, 0, :P, :P] = causal[:P, :P]
            at = P
            for t, lab in turns:
                e = at + len(t)
                ids[i, at:e] = torch.tensor(t)
                labels[i, at:e] = torch.tensor(lab)
                pos[i, at:e] = torch.arange(P, P + len(t))
                mask[i, 0, at:e, :P] = True
                mask[i, 0, at:e, at:e] = causal[: len(t), : len(t)]
                at = e
            mask[i, 0, at:, at:] = torch.eye(T - at, dtype=torch.bool)  # padding sees itself (no NaN rows)
            if background_keep < 1.0:
                vis = (ids[i, :P] == self.enc.model_image_token).nonzero()[:, 0]
                hide = vis[~(obj | (torch.rand(len(vis), generator=g) < background_keep))]
                mask[i, 0, :, hide] = False
                mask[i, 0, hide, hide] = True
        return pixels(ims), ids, mask, pos, labels, torch.stack(dense)


def stage_b(model, head, examples: Examples, steps: int, batch: int, seed: int, log, lr: float = 1e-3,
            vision_lr: float = 3e-4, dense_weight: float = 0.5, save_every: int = 0, checkpoint=None,
            first_image: int = 0, curriculum: float = 0.5, stop_after: int | None = None) -> None:
    """VQA answers (cross-entropy) for the projector and decoder; the vision tower keeps learning
    at a lower rate from the answers and from stage A's dense labels (its shape features were the
    bottleneck: ~55% object-patch shape accuracy after stage A in the 2-layer-ViT run)."""
    vision = model.model.vision_tower
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    groups = [{"params": rest, "scale": 1.0},
              {"params": list(vision.parameters()) + list(head.parameters()), "scale": vision_lr / lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    feats = {}
    hook = vision.register_forward_hook(lambda m, i, o: feats.update(last=o.hidden_states[-1][:, 1:]))
    t0 = time.time()
    hits: list[tuple[float, float]] = []
    end = min(steps, stop_after or steps)
    for step in range(end):
        # Curriculum: the answer's few object tokens are hard to find among 576 at first (the
        # attention gradient toward them is diluted ~1/576); background tokens start mostly hidden
        # (5% shown) and are all shown from `curriculum` of the steps on (0: no curriculum).
        # (Without it the model did not ground its answers: README "Measured quality", step 1.)
        background_keep = min(1.0, 0.05 + 0.95 * step / (curriculum * steps)) if curriculum > 0 else 1.0
        px, ids, mask, pos, labels, y = examples.batch(seed, first_image + step * batch, batch, background_keep)
        # bf16 autocast: the CPU's AMX units make a step faster (README "Measured quality", step 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=px)
            logits = out.logits[:, :-1].float()
            vqa = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            dense, _, acc_s = dense_loss(head, feats.pop("last"), y)
        _optimizer_step(opt, params, vqa + dense_weight * dense, _lr(step, steps, lr, warmup=100))
        with torch.no_grad():  # the first token of every answer (it carries the answer for most questions)
            tgt = labels[:, 1:]
            starts = (tgt != -100) & (labels[:, :-1] == -100)
            hits.append(((logits.argmax(-1)[starts] == tgt[starts]).float().mean().item(), acc_s))
        if step % 25 == 0 or step == end - 1:
            recent = hits[-25:]
            log({"stage": "B", "step": step, "loss": round(float(vqa), 4), "answer_first_token_acc": _mean(recent, 0),
                 "object_patch_shape_acc": _mean(recent, 1), "background_keep": round(background_keep, 3),
                 "s": round(time.time() - t0, 1)})
        if checkpoint is not None and save_every and (step + 1) % save_every == 0 and step + 1 < end:
            checkpoint(step + 1)
    hook.remove()


def save(model, tokenizer, out: str, meta: dict) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor


    os.makedirs(out, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)
        ip = CLIPImageProcessor(size={"shortest_edge": sv.IMAGE_SIZE},
                                crop_size={"height": sv.IMAGE_SIZE, "width": sv.IMAGE_SIZE},
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       image_token="<image>").save_pretrained(out)
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def load_init_model(path: str):
    """The model of `--init-from`: a directory this script saved. Checked first with the engine's
    own readers (config.json, safetensors headers, shard names), then loaded by transformers from
    safetensors only (`use_safetensors=True`: a directory holding only pytorch_model.bin is refused,
    never unpickled), from local files, without remote code."""
    try:
        path = check_dir(path, "--init-from model directory")
    except VtpruneError as e:
        raise CheckpointError(str(e)) from None
    LlavaModelConfig.from_any(path)
    for f in checkpoint_files(path):
        safetensors_header(f, "checkpoint file")
    from transformers import LlavaForConditionalGeneration

    try:
        with quiet_transformers():
            return LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                                 trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--init-from {path}: {' '.join(str(e).split())}") from None


def load_prefixed(module, prefix: str, state: dict, path: str) -> None:
    """module's tensors from `state` (keys `prefix` + name), every name and shape checked."""
    expected = module.state_dict()
    got = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for k in expected:
        if k not in got:
            raise CheckpointError(f"{path}: missing tensor '{prefix}{k}'")
        if tuple(got[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: tensor '{prefix}{k}' has shape {list(got[k].shape)}, expected "
                                  f"{list(expected[k].shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor '{prefix}{extra[0]}'")
    module.load_state_dict(got)


def _check_args(a) -> None:
    for key, lo in (("steps_a", 0), ("steps_b", 1), ("batch_a", 1), ("batch_b", 1), ("first_image", 0),
                    ("left_right_pairs", 0), ("save_every", 0), ("seed", 0)):
        check_int(getattr(a, key), "--" + key.replace("_", "-"), lo, 2**63 - 1)
    for key in ("stop_after", "threads"):
        if getattr(a, key) is not None:
            check_int(getattr(a, key), "--" + key.replace("_", "-"), 1)
    check_number(a.lr_b, "--lr-b", 0, lo_open=True, want="a number > 0")
    check_number(a.curriculum, "--curriculum", 0, 1, want="a fraction in [0, 1]")


def main(argv=None) -> int:


    try:
        return _main(argv)
    except VtpruneError as e:
        print(f"train_base: error: {e}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the SynthVQA LLaVA from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--steps-a", type=int, default=1000)
    p.add_argument("--steps-b", type=int, default=1500)
    p.add_argument("--batch-a", type=int, default=16)
    p.add_argument("--batch-b", type=int, default=8)
    p.add_argument("--lr-b", type=float, default=1e-3)
    p.add_argument("--vision-from", default=None,
                   help="a stage_a.safetensors from an earlier run: start from its vision tower and label head "
                        "(then --steps-a more stage-A steps, 0 to go straight to stage B)")
    p.add_argument("--init-from", default=None,
                   help="a model directory this script saved: continue stage B from its weights (with --steps-a 0; "
                        "the label head comes from its dense_head.safetensors or stage_a.safetensors)")
    p.add_argument("--first-image", type=int, default=0,
                   help="stage B's first image in the training stream (a continued run starts past the images seen)")
    p.add_argument("--curriculum", type=float, default=0.5,
                   help="fraction of stage B over which hidden background tokens come back (0: none hidden)")
    p.add_argument("--left-right-pairs", type=int, default=8, help="left/right questions per image in stage B (at most)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end stage B after N steps (the learning-rate schedule still spans --steps-b)")
    p.add_argument("--save-every", type=int, default=250, help="save the model every N stage-B steps (and at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    _check_args(a)
    # every input is checked before the tokenizer is learnt and anything is written
    model = load_init_model(a.init_from).train() if a.init_from else None
    head_file = None
    if a.init_from:
        heads = [os.path.join(a.init_from, f) for f in ("dense_head.safetensors", "stage_a.safetensors")]
        head_file = next((f for f in heads if os.path.lexists(f)), None)
        if head_file is None:
            raise CheckpointError(f"--init-from {a.init_from}: no dense_head.safetensors or stage_a.safetensors "
                                  f"(the label head this script saves next to the model)")
        head_state = read_tensors(head_file, "label head")
    vision_state = read_tensors(a.vision_from, "--vision-from") if a.vision_from else None
    make_output_dir(a.out, "--out")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = build_tokenizer(384, sv.vocabulary_text())
    if model is None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration(build_config(tok)).train()
    log_path = os.path.join(a.out, "base_training_log.jsonl")
    logf = open(log_path, "w", encoding="utf-8")

    def log(rec):
        print(json.dumps(rec), flush=True)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    t = time.time()
    from safetensors.torch import save_file

    def prefixed(prefix: str, module) -> dict:
        return {prefix + k: v.contiguous() for k, v in module.state_dict().items()}

    vision = model.model.vision_tower
    head = dense_head(vision.config.hidden_size)
    if a.init_from:
        load_prefixed(head, "head.", head_state, head_file)
    else:
        init_vision_positions(vision)
    if a.vision_from:
        load_prefixed(vision, "vision.", vision_state, a.vision_from)
        load_prefixed(head, "head.", vision_state, a.vision_from)
    if a.steps_a:
        head = stage_a(model, a.steps_a, a.batch_a, sv.SPLIT_SEEDS["train"], log, head)
        save_file({**prefixed("vision.", vision), **prefixed("head.", head)}, os.path.join(a.out, "stage_a.safetensors"))
    meta = {"command": "python recipes/train_base.py " + " ".join(argv or []), "args": vars(a),
            "torch": torch.__version__}

    def checkpoint(step: int) -> None:
        model.eval()
        save(model, tok, a.out, {**meta, "stage_b_steps_done": step, "seconds": round(time.time() - t, 1)})
        save_file(prefixed("head.", head), os.path.join(a.out, "dense_head.safetensors"))
        model.train()

    stage_b(model, head, Examples(tok, model.config.image_token_index, left_right_pairs=a.left_right_pairs),
            a.steps_b, a.batch_b,
            sv.SPLIT_SEEDS["train"], log, a.lr_b, save_every=a.save_every, checkpoint=checkpoint,
            first_image=a.first_image, curriculum=a.curriculum, stop_after=a.stop_after)
    checkpoint(min(a.steps_b, a.stop_after or a.steps_b))
    logf.close()
    print(f"saved {a.out} ({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
