"""SynthVQA: a procedural visual question answering set whose answers depend on a small region.

Each 336x336 image holds 3-5 coloured shapes (about 3-4 patches of 14 px across) on a cluttered
background (muted lines, dots and blocks), and comes with questions whose answer depends on the
object(s) the question names:

  colour      What colour is the <shape>?                       -> red       (shape unique in the image)
  shape       What shape is the <colour> object?                 -> circle    (colour unique)
  count       How many <colour> objects are there?               -> two       (0-3)
  exists      Is there a <colour> <shape>?                       -> yes / no  (a "no" shares colour or shape)
  left_right  Is the <c1> <s1> left or right of the <c2> <s2>?   -> left / right
  caption     Describe the image.                                -> A red circle, a blue square and a green diamond.
              (objects named left to right; scored with BLEU, the others with exact match)

    python -m vtprune.quality.synthvqa --out data/synthvqa             # train / val / test, JSONL + PNG
    python -m vtprune.quality.synthvqa --out data/fresh --seed 7       # fresh splits, reproducibly

Splits come from different seeds (train 1, val 2, test 3: the splits the embedded model was
trained, selected and measured on); image i of a split is a function of (seed, i) only, so
`sample(seed, i)` regenerates any of them (the base-model training draws an endless stream this
way without writing it to disk). `--seed N` draws other splits (`split_seed`), disjoint from those
and from the base model's training stream.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..errors import VtpruneError
from ..files import make_output_dir, os_error_reason

IMAGE_SIZE = 336
COLOURS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 84, 222), "yellow": (236, 200, 30),
           "purple": (145, 55, 190), "orange": (246, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("colour", "shape", "count", "exists", "left_right")
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
# Image i of stream s is drawn by random.Random(s * _STRIDE + i), so streams s and s' share images
# only at indices >= _STRIDE apart. The base-model trainer (recipes/train_base.py) drew stream 1 at indices
# 0-14000 (stage B) and 10_000_000 + 0-12800 (stage A: 800 steps x 16), which stream 11 meets at
# its index 30 and on: consecutive small seeds are not fresh. --seed N uses streams from
# _FRESH_BASE on (Random seeds >= 1e12), far from every stream the shipped model has seen.
_STRIDE = 1_000_003
_FRESH_BASE = 1_000_000
MAX_SEED = 2**32 - 1


@dataclass
class Obj:
    colour: str
    shape: str
    x: int      # centre
    y: int
    size: int   # bounding box side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """Muted texture: greyish lines, dots and blocks (saturation kept low so shapes stand out)."""
    def muted():
        g = rng.randint(95, 200)
        return tuple(max(0, min(255, g + rng.randint(-18, 18))) for _ in range(3))
    for _ in range(rng.randint(10, 18)):
        x, y = rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE)
        w, h = rng.randint(8, 60), rng.randint(8, 60)
        draw.rectangle([x, y, x + w, y + h], fill=muted())
    for _ in range(rng.randint(25, 45)):
        pts = [(rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE)) for _ in range(2)]
        draw.line(pts, fill=muted(), width=rng.randint(1, 3))
    for _ in range(rng.randint(60, 120)):
        x, y, r = rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE), rng.randint(1, 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=muted())


def draw_object(draw: ImageDraw.ImageDraw, o: Obj, fill=None, outline=(20, 20, 20)) -> None:
    """Draw `o` (default: its colour, dark outline). The base-model trainer draws its patch label
    maps with the same geometry (fill = a class id, no outline)."""
    h = o.size // 2
    box = [o.x - h, o.y - h, o.x + h, o.y + h]
    fill = COLOURS[o.colour] if fill is None else fill
    style = dict(fill=fill, outline=outline, width=2) if outline is not None else dict(fill=fill)
    if o.shape == "circle":
        draw.ellipse(box, **style)
    elif o.shape == "square":
        draw.rectangle(box, **style)
    elif o.shape == "triangle":
        draw.polygon([(o.x, o.y - h), (o.x + h, o.y + h), (o.x - h, o.y + h)], **style)
    else:  # diamond
        draw.polygon([(o.x, o.y - h), (o.x + h, o.y), (o.x, o.y + h), (o.x - h, o.y)], **style)


def _objects(rng: random.Random) -> list[Obj]:
    n = rng.randint(3, 5)
    objs: list[Obj] = []
    pairs = set()
    while len(objs) < n:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) in pairs:
            continue
        size = rng.randint(42, 56)
        for _ in range(100):
            x, y = rng.randint(size, IMAGE_SIZE - size), rng.randint(size, IMAGE_SIZE - size)
            if all(max(abs(x - o.x), abs(y - o.y)) > (size + o.size) // 2 + 10 for o in objs):
                objs.append(Obj(colour, shape, x, y, size))
                pairs.add((colour, shape))
                break
        else:
            break  # no room left: fewer objects
    return objs


def caption(objs: list[Obj]) -> str:
    names = [_a(o.name) for o in sorted(objs, key=lambda o: o.x)]
    text = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return text[0].upper() + text[1:] + "."


def _questions(objs: list[Obj], rng: random.Random) -> list[dict]:
    """Every question type that this image can answer unambiguously, one instance each."""
    out = []
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        out.append({"type": "colour", "question": f"What colour is the {o.shape}?", "answer": o.colour})
    unique_colour = [o for o in objs if colours.count(o.colour) == 1]
    if unique_colour:
        o = rng.choice(unique_colour)
        out.append({"type": "shape", "question": f"What shape is the {o.colour} object?", "answer": o.shape})
    c = rng.choice(list(COLOURS)) if rng.random() < 0.25 else rng.choice(colours)
    out.append({"type": "count", "question": f"How many {c} objects are there?", "answer": NUMBERS[colours.count(c)]})
    if rng.random() < 0.5:
        o = rng.choice(objs)
        out.append({"type": "exists", "question": f"Is there {_a(o.name)}?", "answer": "yes"})
    else:
        present = {(o.colour, o.shape) for o in objs}
        o = rng.choice(objs)  # share the colour or the shape of a present object
        cands = [(o.colour, s) for s in SHAPES] + [(c2, o.shape) for c2 in COLOURS]
        cands = [p for p in cands if p not in present]
        colour, shape = rng.choice(cands)
        out.append({"type": "exists", "question": f"Is there {_a(colour + ' ' + shape)}?", "answer": "no"})
    pairs = [(a, b) for a in objs for b in objs if a is not b and abs(a.x - b.x) >= 30]
    if pairs:
        a, b = rng.choice(pairs)
        out.append({"type": "left_right", "question": f"Is the {a.name} left or right of the {b.name}?",
                    "answer": "left" if a.x < b.x else "right"})
    return out


def split_seed(split: str, seed: int | None = None) -> int:
    """The stream a split is drawn from: SPLIT_SEEDS[split] without `seed` (the shipped splits),
    else one stream per (seed, split), 0 <= seed <= MAX_SEED, distinct for every pair and from
    every stream below _FRESH_BASE."""
    if split not in SPLIT_SEEDS:
        raise VtpruneError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    if seed is None:
        return SPLIT_SEEDS[split]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise VtpruneError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return _FRESH_BASE + len(SPLIT_SEEDS) * seed + list(SPLIT_SEEDS).index(split)


def sample(seed: int, index: int):
    """Image `index` of the stream `seed`: (PIL image, objects, questions, caption)."""
    rng = random.Random(seed * _STRIDE + index)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randint(140, 190) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng)
    objs = _objects(rng)
    for o in objs:
        draw_object(draw, o)
    return img, objs, _questions(objs, rng), caption(objs)


def write_split(out_dir: str, split: str, n_images: int, seed: int | None = None, questions_per_image: int = 2,
                with_captions: bool = True, progress: bool = True) -> str:
    """Write `n_images` images of `split` and their questions to out_dir/{split}.jsonl (+ PNGs under
    out_dir/{split}/). Each image gets `questions_per_image` of its questions (types rotated so the
    split is balanced) and, with_captions, a caption record. `seed`: the stream to draw from
    (default SPLIT_SEEDS[split]; `split_seed(split, N)` for fresh splits). Returns the JSONL path."""
    seed = SPLIT_SEEDS[split] if seed is None else seed
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    it = range(n_images)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"synthvqa {split}", unit="img")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in it:
            img, _, qs, cap = sample(seed, i)
            name = f"{split}/{i:06d}.png"
            img.save(os.path.join(out_dir, name))
            want = [QUESTION_TYPES[(i * questions_per_image + j) % len(QUESTION_TYPES)]
                    for j in range(questions_per_image)]
            chosen = [q for q in qs if q["type"] in want] or qs[:1]
            for j, q in enumerate(chosen[:questions_per_image]):
                f.write(json.dumps({"id": f"{split}-{i}-{j}", "image": name, **q}) + "\n")
            if with_captions:
                f.write(json.dumps({"id": f"{split}-{i}-caption", "image": name, "type": "caption",
                                    "question": "Describe the image.", "answer": cap}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def vocabulary_text() -> str:
    """Every word the task uses (to train a tokenizer that gives each word one token)."""
    words = [*COLOURS, *SHAPES, *NUMBERS, "yes", "no", "left", "right", "a", "and", "is", "the", "of",
             "What", "colour", "shape", "object", "How", "many", "objects", "are", "there", "Is", "or",
             "Describe", "image", "A", "an", "An", "USER", "ASSISTANT"]
    lines = []
    rng = random.Random(0)
    for i in range(400):
        _, objs, qs, cap = sample(99, i) if i < 60 else (None, None, [], "")
        for q in qs:
            lines.append(f"USER: <image>\n{q['question']} ASSISTANT: {q['answer']}")
        if cap:
            lines.append(cap)
        if i >= 60:
            lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return "\n".join(lines)


def main(argv=None) -> int:
    prog = "python -m vtprune.quality.synthvqa"
    p = argparse.ArgumentParser(prog=prog,
                                description="write the SynthVQA splits (JSONL + PNG)")
    p.add_argument("--out", required=True, help="directory for SPLIT.jsonl and SPLIT/NNNNNN.png")
    p.add_argument("--train", type=int, default=2000, help="training images (0: none)")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--test", type=int, default=500, help="test images")
    p.add_argument("--questions-per-image", type=int, default=2)
    p.add_argument("--seed", type=int, default=None,
                   help=f"0-{MAX_SEED}: fresh splits (each split's images change; the same seed gives the "
                        f"same files), disjoint from the default ones and from the base model's training "
                        f"stream; default: the shipped splits (train 1, val 2, test 3)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        counts = (("train", a.train), ("val", a.val), ("test", a.test))
        for split, n in counts:
            if n < 0:
                raise VtpruneError(f"--{split} must be >= 0 images, got {n}")
        if a.questions_per_image < 0:
            raise VtpruneError(f"--questions-per-image must be >= 0, got {a.questions_per_image}")
        if a.seed is not None and not 0 <= a.seed <= MAX_SEED:
            raise VtpruneError(f"--seed must be from 0 to {MAX_SEED}, got {a.seed}")
        if all(n == 0 for _, n in counts):
            raise VtpruneError("nothing to write: --train, --val and --test are all 0")
        seeds = {split: split_seed(split, a.seed) for split, _ in counts}
        make_output_dir(a.out, "output directory")
        todo = [(split, n) for split, n in counts if n > 0]
        for split, _ in todo:  # before writing anything
            images, jsonl = os.path.join(a.out, split), os.path.join(a.out, f"{split}.jsonl")
            if os.path.lexists(images) and not os.path.isdir(images):
                raise VtpruneError(f"output directory {images}: exists and is not a directory")
            if os.path.isdir(jsonl):
                raise VtpruneError(f"output file {jsonl}: is a directory")
        for split, n in todo:
            path = write_split(a.out, split, n, seed=seeds[split], questions_per_image=a.questions_per_image,
                               progress=not a.no_progress)
            print(f"{path}: {n} image{'s' if n > 1 else ''} (stream {seeds[split]})")
    except VtpruneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filling up while writing
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{os_error_reason(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
