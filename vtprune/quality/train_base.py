"""Train the small SynthVQA LLaVA from scratch (the project's embedded default model).

Architecture (LLaVA-1.5 family at toy size, saved in the llava-hf layout so transformers'
LlavaForConditionalGeneration loads it as well as the engine): a CLIP-style ViT, 336 px images in
14 px patches -> 576 visual tokens (2 layers, width 64, features of the last layer), the 2-layer
GELU projector, a Llama decoder (6 layers, width 128, 4 heads), and a BPE tokenizer learned from
the task's words.

Two stages, both on an endless stream of generated images (synthvqa.sample with the train seed;
the test split's seed is never seen):
  A  the vision tower alone, with dense labels: for each patch, the colour and the shape of the
     object under its centre (or background), whether an object's centre lies in it, and its
     column (left/right questions compare the x of two objects). Dense
     targets teach a from-scratch ViT in minutes what image-text pairs alone would take hours for.
  B  the whole model on VQA (and captions), cross-entropy on the answer tokens; the vision tower
     stays frozen, the projector and the decoder learn.

    python -m vtprune.quality.train_base --out models/synthvqa-llava [--steps-a 300 --steps-b 1500]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import synthvqa as sv

PATCH = 14
GRID = sv.IMAGE_SIZE // PATCH  # 24
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=sv.IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


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
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def stage_a(model, steps: int, batch: int, seed: int, log) -> None:
    vision = model.model.vision_tower
    d = vision.config.hidden_size
    head = torch.nn.Linear(d, 1 + len(sv.COLOURS) + 1 + len(sv.SHAPES) + 2 + GRID)
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    nc, ns = 1 + len(sv.COLOURS), 1 + len(sv.SHAPES)
    t0 = time.time()
    for step in range(steps):
        ims, labels = [], []
        for j in range(batch):
            img, objs, _, _ = sv.sample(seed, 10_000_000 + step * batch + j)
            ims.append(img)
            labels.append(patch_labels(objs))
        y = torch.stack(labels)  # [B, 3, 24, 24]
        feats = vision(pixel_values=pixels(ims), output_hidden_states=True).hidden_states[-1][:, 1:]
        out = head(feats)  # [B, 576, nc + ns + 2]
        yc, ys, yz = (y[:, i].reshape(len(ims), -1) for i in range(3))
        columns = torch.arange(GRID * GRID)[None, :] % GRID  # left/right questions need x in the features
        # background patches outnumber object patches ~10:1; weigh objects up
        wc = torch.ones(nc)
        wc[0] = 0.2
        ws = torch.ones(ns)
        ws[0] = 0.2
        loss = (F.cross_entropy(out[..., :nc].flatten(0, 1), yc.flatten(), weight=wc)
                + F.cross_entropy(out[..., nc:nc + ns].flatten(0, 1), ys.flatten(), weight=ws)
                + F.cross_entropy(out[..., nc + ns:nc + ns + 2].flatten(0, 1), yz.flatten(), weight=torch.tensor([0.05, 1.0]))
                + 0.5 * F.cross_entropy(out[..., nc + ns + 2:].flatten(0, 1), columns.expand(len(ims), -1).flatten()))
        _optimizer_step(opt, params, loss, _lr(step, steps, 2e-3))
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                obj = ys.flatten() > 0
                acc_c = (out[..., :nc].argmax(-1).flatten() == yc.flatten())[obj].float().mean()
                acc_s = (out[..., nc:nc + ns].argmax(-1).flatten() == ys.flatten())[obj].float().mean()
            log({"stage": "A", "step": step, "loss": round(float(loss), 4), "object_patch_colour_acc": round(float(acc_c), 3),
                 "object_patch_shape_acc": round(float(acc_s), 3), "s": round(time.time() - t0, 1)})


class Examples:
    """Training rows for the stream `seed`: each image with all of its questions and its caption
    as turns of one conversation, in random order (LLaVA-1.5's multi-turn format):
        <s>USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...
    The 576 image tokens dominate a row's cost, so packing ~6 answers behind one image gives ~6x
    the supervision per forward pass; the first turn is exactly the single-question prompt."""

    def __init__(self, tokenizer, image_token: int, caption_rate: float = 0.5):
        from ..engine.inputs import PromptEncoder
        from ..training.forward import BatchBuilder

        self.tok = tokenizer
        self.enc = PromptEncoder(tokenizer, GRID * GRID, image_token)
        self.builder = BatchBuilder(tokenizer, None, image_token, GRID * GRID, GRID * GRID,
                                    tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.caption_rate = caption_rate

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """-> (ids, labels) with labels -100 outside the answers."""
        from ..engine.inputs import format_prompt

        ids, labels = [], []
        for k, (q, a) in enumerate(turns):
            if k == 0:
                prompt = format_prompt(q)
                p = self.enc.encode(prompt)
                ans = self.builder.answer_ids(prompt, a, p)
            else:
                p = list(self.tok(f"USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"])
                ans = list(self.tok(" " + a.strip(), add_special_tokens=False)["input_ids"]) + [self.tok.eos_token_id]
            ids += p + ans
            labels += [-100] * len(p) + ans
        return ids, labels

    def batch(self, seed: int, start: int, n: int, background_keep: float = 1.0):
        """background_keep < 1: each background visual token is hidden (attention mask 0, its
        position kept) with probability 1 - background_keep; object tokens always stay."""
        rng = random.Random(seed * 7 + start)
        ims, rows, objects = [], [], []
        for j in range(n):
            img, objs, qs, cap = sv.sample(seed, start + j)
            ims.append(img)
            obj = patch_labels(objs)[0] > 0
            # one patch of margin: the shapes' edges and outlines
            obj = F.max_pool2d(obj[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
            objects.append(obj.flatten())
            turns = [(q["question"], q["answer"]) for q in qs]
            if rng.random() < self.caption_rate:
                turns.append(("Describe the image.", cap))
            rng.shuffle(turns)
            rows.append(self.conversation(turns))
        T = max(len(i) for i, _ in rows)
        ids = torch.full((n, T), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        g = torch.Generator().manual_seed(seed * 7 + start)
        for i, (row, lab) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(row)] = 1
            if background_keep < 1.0:
                vis = (ids[i] == self.enc.model_image_token).nonzero()[:, 0]
                keep = objects[i] | (torch.rand(len(vis), generator=g) < background_keep)
                mask[i, vis[~keep]] = 0
        return pixels(ims), ids, mask, labels


def stage_b(model, examples: Examples, steps: int, batch: int, seed: int, log, lr: float = 1e-3) -> None:
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    t0 = time.time()
    for step in range(steps):
        # Curriculum: the answer's few object tokens are hard to find among 576 at first (the
        # attention gradient toward them is diluted ~1/576); background tokens start mostly hidden
        # (5% shown) and are all shown from 60% of the steps on. (Without it: no grounding after
        # 600 steps, loss at the answer-prior level; dev box 2026-11-26.)
        background_keep = min(1.0, 0.05 + 0.95 * step / (0.6 * steps))
        px, ids, mask, labels = examples.batch(seed, step * batch, batch, background_keep)
        # bf16 autocast: the CPU's AMX units (measured 1.1 vs 1.4 s per step of 16 on the 2-core dev box)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        _optimizer_step(opt, params, loss, _lr(step, steps, lr, warmup=100))
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():
                tgt = labels[:, 1:]
                first = (tgt != -100).long().argmax(1)  # each row's first answer token
                r = torch.arange(len(tgt))
                acc = (logits[r, first].argmax(-1) == tgt[r, first]).float().mean()
            log({"stage": "B", "step": step, "loss": round(float(loss), 4), "first_answer_token_acc": round(float(acc), 3),
                 "background_keep": round(background_keep, 3), "s": round(time.time() - t0, 1)})


def save(model, tokenizer, out: str, meta: dict) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    from ..engine.engine import _quiet_transformers

    os.makedirs(out, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(out)
        ip = CLIPImageProcessor(size={"shortest_edge": sv.IMAGE_SIZE},
                                crop_size={"height": sv.IMAGE_SIZE, "width": sv.IMAGE_SIZE},
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       image_token="<image>").save_pretrained(out)
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def main(argv=None) -> int:
    from transformers import LlavaForConditionalGeneration

    from ..tiny_model import build_tokenizer

    p = argparse.ArgumentParser(description="train the SynthVQA LLaVA from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--steps-a", type=int, default=300)
    p.add_argument("--steps-b", type=int, default=1500)
    p.add_argument("--batch-a", type=int, default=16)
    p.add_argument("--batch-b", type=int, default=16)
    p.add_argument("--lr-b", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = build_tokenizer(384, sv.vocabulary_text())
    model = LlavaForConditionalGeneration(build_config(tok)).train()
    os.makedirs(a.out, exist_ok=True)
    log_path = os.path.join(a.out, "base_training_log.jsonl")
    logf = open(log_path, "w", encoding="utf-8")

    def log(rec):
        print(json.dumps(rec), flush=True)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    t = time.time()
    stage_a(model, a.steps_a, a.batch_a, sv.SPLIT_SEEDS["train"], log)
    stage_b(model, Examples(tok, model.config.image_token_index), a.steps_b, a.batch_b, sv.SPLIT_SEEDS["train"], log,
            a.lr_b)
    model.eval()
    save(model, tok, a.out, {"command": "python -m vtprune.quality.train_base " + " ".join(argv or []),
                             "args": vars(a), "seconds": round(time.time() - t, 1), "torch": torch.__version__})
    logf.close()
    print(f"saved {a.out} ({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
