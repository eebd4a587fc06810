"""Turning user inputs (images, prompt strings) into token ids and pixel values.

Images (`load_image`) are read from regular files only (a FIFO or a device is refused from `stat`,
before any open), in a few raster formats, up to MAX_IMAGE_PIXELS pixels (checked on the header,
before decoding); every PIL mode is converted to RGB as `to_rgb` documents, and an image too
elongated for the processor's full-size resize is resized and cropped on its crop only
(`fit_to_processor`). Every problem is a VtpruneError "image <index>: <path> ...: <reason>".

Prompts are tokenized exactly as transformers' LlavaProcessor does it: each `<image>`
placeholder is expanded to one image token per visual token and the whole string goes through
the tokenizer once, so the ids match the reference token for token.

`PreparedBatch` is what LlavaEngine.prepare makes of them: the ids and pixel values on the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import VtpruneError
from ..files import fs_error, open_binary

IMAGE_TOKEN = "<image>"


def format_prompt(question: str) -> str:
    """The LLaVA-1.5 conversation template for one question about one image."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# An image of more pixels than this is refused, from the file's header before any pixel is
# decoded: PIL's own warning threshold (Image.MAX_IMAGE_PIXELS, 89,478,485 = 0.25 GiB of 24-bit
# pixels). Loading and preprocessing a 9400x9400 image (88.4 M pixels) grew the peak RSS by 0.6 GB
# (RGB PNG) to 1.35 GB (RGBA PNG: the composite over white holds three RGBA copies).
MAX_IMAGE_PIXELS = 89_478_485

# Image files are decoded by these PIL plugins only: raster formats that Pillow decodes itself.
# (JPEG includes MPO). EPS (PIL runs Ghostscript on it) and the rarer plugins are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "ICO", "JPEG2000")

# An image whose shortest-edge resize covers at most this many times the centre crop's area (an
# aspect ratio up to 16:1 for a square crop) goes to the image processor as it is: the pixels are
# LlavaProcessor's by construction. A more elongated one is resized and cropped here, to the crop
# only (see `_resize_crop`): LlavaProcessor's resize of a 1x2000 image to 336x672000 pixels before
# its crop peaked at 2.5 GB.
_PROCESSOR_MAX_AREA_RATIO = 16


def _check_size(size, index: int, where: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise VtpruneError(f"image {index}: {where}has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise VtpruneError(f"image {index}: {where}is {w}x{h} = {w * h} pixels, more than the limit of "
                           f"{MAX_IMAGE_PIXELS} (refused as a possible decompression bomb)")


def _path_of(image, index: int) -> str:
    if isinstance(image, os.PathLike):
        try:
            image = os.fspath(image)
        except TypeError as e:
            raise VtpruneError(f"image {index}: {type(image).__name__} is not a usable path ({e})") from None
    if isinstance(image, bytes):
        raise VtpruneError(f"image {index}: expected a PIL image or a file path (str or os.PathLike), got bytes "
                           f"(encoded image data: open it with PIL.Image.open(io.BytesIO(data)); a bytes "
                           f"path: os.fsdecode(path))")
    if not isinstance(image, str):
        hint = " (an array: PIL.Image.fromarray(array))" if hasattr(image, "__array__") else ""
        raise VtpruneError(f"image {index}: expected a PIL image or a file path (str or os.PathLike), "
                           f"got {type(image).__name__}{hint}")
    if not image:
        raise VtpruneError(f"image {index}: empty path")
    return image


def _formats() -> list[str]:
    """IMAGE_FORMATS that this PIL can decode."""
    from PIL import Image

    Image.init()  # registers every plugin (WEBP, TIFF, ... are not registered up front)
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _open_file(path: str, index: int):
    """The decoded first frame of the image file at `path` (a PIL image, any mode)."""
    import struct
    import warnings
    import zlib

    from PIL import Image, UnidentifiedImageError

    what = f"image {index}:"
    try:
        os.stat(path)
    except FileNotFoundError:
        gone = "file not found" if not os.path.islink(path) else "a symbolic link to a file that does not exist"
        raise VtpruneError(f"image {index}: {gone}: {path}") from None
    except (OSError, ValueError):
        pass  # open_binary names the reason
    # a FIFO or a device is refused from stat, before any open (opening a FIFO blocks forever)
    f = open_binary(path, what)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise VtpruneError(f"image {index}: {path} is an empty file (0 bytes), not an image")
        try:
            with warnings.catch_warnings():
                # PIL warns above its own limit: ours is checked on the header's size below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f, formats=_formats())
                _check_size(im.size, index, f"{path} ")
                im.load()  # the first frame of an animation or a multi-page file
                return im
        except VtpruneError:
            raise
        except Image.DecompressionBombError as e:
            raise VtpruneError(f"image {index}: {path} has more pixels than the limit of {MAX_IMAGE_PIXELS} "
                               f"(refused as a possible decompression bomb; PIL: {e})") from None
        except UnidentifiedImageError:
            raise VtpruneError(f"image {index}: {path} is not an image (PIL cannot identify it as one of "
                               f"{', '.join(_formats())})") from None
        except MemoryError:
            raise VtpruneError(f"image {index}: {path}: not enough memory to decode it") from None
        except OSError as e:
            if e.errno is not None:  # the file system's error, not the decoder's
                raise fs_error(what, path, e) from None
            raise VtpruneError(f"image {index}: {path} is not a readable image ({e})") from None
        # what PIL's decoders raise on malformed data
        except (SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                zlib.error) as e:
            raise VtpruneError(f"image {index}: {path} is not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(im, index: int = 0, where: str = ""):
    """An RGB image with the pixels a correct conversion of `im` gives (a new image unless `im` is
    already plain RGB):

    - transparency (an alpha band, a palette with alpha, a transparency key: LA, PA, RGBA, P, L or RGB
      with "transparency") is composited over white, as transformers' `convert_to_rgb` does:
      round((c*a + 255*(255 - a)) / 255); premultiplied La / RGBa are unpremultiplied first;
    - I;16, I;16L, I;16B, I;16N (16-bit grey) and I (32-bit, read as 16-bit data: 0..65535, other
      values refused) become 8 bits as round(v / 257) (PIL's own conversion clips at 255);
    - F (float): [0, 1] when every pixel lies in [0, 1] (transformers' rule for float arrays), else
      0..255 when every pixel lies there; other ranges, NaN and infinities are refused;
    - 1, L, P, RGBX, CMYK (naive: (255-c)(255-k)/255, no ICC profile), YCbCr (JPEG's full range),
      HSV and LAB (PIL's CIELab via littlecms) use PIL's conversion, as LlavaProcessor does.
    ICC profiles and EXIF orientation are not applied (neither LlavaProcessor nor LLaVA's training
    applies them)."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    try:
        if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
            a = np.asarray(im)
            key = im.info.get("transparency")
            if mode == "F":
                grey = _float_to_8bit(a, index, where)
            else:
                if mode == "I":
                    lo, hi = int(a.min()), int(a.max())
                    if lo < 0 or hi > 65535:
                        raise VtpruneError(f"image {index}: {where}mode I pixels range over {lo}..{hi}; they are "
                                           f"read as 16-bit data (0..65535): convert the image to 8 bits first")
                lut = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
                grey = lut[a.astype(np.uint16, copy=False)]
            if isinstance(key, (int, float)) and not isinstance(key, bool):
                grey = np.where(a == key, np.uint8(255), grey)  # transparent: composited over white
            return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
        if mode in ("La", "RGBa"):
            im = im.convert(mode.upper())
        if im.has_transparency_data:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        out = im.convert("RGB")
        out.info.pop("transparency", None)
        return out
    except VtpruneError:
        raise
    except ValueError as e:  # a mode PIL cannot convert
        raise VtpruneError(f"image {index}: {where}mode {mode} cannot be converted to RGB ({e})") from None


def _float_to_8bit(a, index: int, where: str):
    import numpy as np

    if not np.isfinite(a).all():
        raise VtpruneError(f"image {index}: {where}mode F pixels include NaN or infinity")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        a = a * np.float32(255.0)
    elif not (lo >= 0.0 and hi <= 255.0):
        raise VtpruneError(f"image {index}: {where}mode F pixels range over [{lo:g}, {hi:g}]; expected [0, 1] "
                           f"(or 0..255)")
    return np.floor(a + np.float32(0.5)).astype(np.uint8)


def load_image(image, index: int = 0, processor=None):
    """An RGB PIL image from a PIL image or a file path (see `to_rgb` for the conversion of every
    mode), or a VtpruneError naming the image (`index`), the path and the problem.

    Files must be regular files (FIFOs and devices are refused before any open) in one of
    IMAGE_FORMATS, with at most MAX_IMAGE_PIXELS pixels; the first frame of an animation is used.
    With the engine's image `processor`, an image elongated beyond 16:1 comes back already resized
    and cropped to the processor's crop (the same pixels, without the full-size resize)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        where = ""
        _check_size(image.size, index, where)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise VtpruneError(f"image {index}: the PIL image cannot be read ({type(e).__name__}: {e})") from None
    else:
        path = _path_of(image, index)
        image, where = _open_file(path, index), f"{path} "
    rgb = to_rgb(image, index, where)
    return rgb if processor is None else fit_to_processor(rgb, processor, index, where)


def _field(d, key):
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(width, height) after the shortest-edge resize, as transformers' get_resize_output_image_size
    computes it."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def fit_to_processor(im, processor, index: int = 0, where: str = ""):
    """`im` (RGB), or, when the processor's shortest-edge resize of it would exceed 16 times the area
    of its centre crop, the processor's resize and crop of it computed on the crop only (PIL
    processors: LlavaProcessor's CLIPImageProcessor). A processor that resizes otherwise (to a fixed
    size, or bounded by a longest edge) gets `im` unchanged: its memory is bounded already. One that
    resizes by the shortest edge in a way not reproduced here (the torchvision backend, NEAREST, no
    centre crop, a crop larger than the resize) gets such an image refused."""
    from PIL import Image

    size = getattr(processor, "size", None)
    short = _field(size, "shortest_edge")
    if (not getattr(processor, "do_resize", False) or not isinstance(short, int) or short <= 0
            or any(_field(size, k) for k in ("longest_edge", "height", "width", "max_height", "max_width"))):
        return im
    crop = getattr(processor, "crop_size", None)
    ch, cw = _field(crop, "height"), _field(crop, "width")
    cropped = (getattr(processor, "do_center_crop", False)
               and all(isinstance(v, int) and v > 0 for v in (ch, cw)))
    if not cropped:
        ch = cw = short
    w, h = im.size
    nw, nh = _resized_size(w, h, short)
    if nw * nh <= _PROCESSOR_MAX_AREA_RATIO * ch * cw:
        return im
    resample = getattr(processor, "resample", None)
    convolution = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS,
                   Image.Resampling.BOX, Image.Resampling.HAMMING)
    if (not cropped or getattr(processor, "backend", "pil") != "pil" or resample not in convolution
            or nw < cw or nh < ch):
        ratio = max(w, h) / min(w, h)
        raise VtpruneError(f"image {index}: {where}is {w}x{h} (aspect ratio {ratio:.0f}:1): this image processor "
                           f"would resize it to {nw}x{nh} pixels before its {cw}x{ch} crop; refused (at most "
                           f"{_PROCESSOR_MAX_AREA_RATIO}:1 with it)")
    return _resize_crop(im, nw, nh, ch, cw, Image.Resampling(resample))


_SUPPORT = {"BOX": 0.5, "BILINEAR": 1.0, "HAMMING": 1.0, "BICUBIC": 2.0, "LANCZOS": 3.0}
_vertical_first_rule = None


def _pil_vertical_first(w: int, h: int, nw: int, nh: int) -> bool:
    """Whether this PIL resizes w x h to nw x nh vertical pass first. Pillow 13 does when the height
    shrinks by more than twice as many pixels as the width (Resample.c: ImagingResampleInner);
    earlier Pillows always go horizontal first. Which one is installed is found once by a probe."""
    global _vertical_first_rule
    if _vertical_first_rule is None:
        import numpy as np
        from PIL import Image

        probe = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 6, 3), dtype=np.uint8))
        b = Image.Resampling.BICUBIC
        full = np.asarray(probe.resize((5, 10), b))
        vh = np.asarray(probe.resize((6, 10), b).resize((5, 10), b))
        _vertical_first_rule = bool((full == vh).all())
    return _vertical_first_rule and 0 < h - nh and h - nh > 2 * (w - nw)


def _resize_crop(im, nw: int, nh: int, ch: int, cw: int, resample):
    """PIL's resize of `im` to nw x nh followed by transformers' centre crop to cw x ch, computed
    without the full-size image. PIL resizes in two passes, each row (horizontal pass) or column
    (vertical pass) on its own, so the crop's columns are a horizontal pass over a box, the crop's
    rows a vertical pass over a box, in PIL's order, on the source window the crop reads (its
    filter's support plus a margin). PIL takes the box as float32 and the window's offsets differ
    from the full image's, so a filter weight can differ in its last bits: pixels can differ by one
    grey level, rarely (tests: at most 1 level on at most 0.5% of the values)."""
    from PIL import Image

    w, h = im.size
    left, top = (nw - cw) // 2, (nh - ch) // 2
    sx, sy = w / nw, h / nh
    name = Image.Resampling(resample).name

    def window(start, length, scale, size):  # source range the pass over output [start, start+length) reads
        reach = _SUPPORT[name] * max(scale, 1.0)
        return max(0, int(start * scale - reach) - 2), min(size, int((start + length) * scale + reach) + 3)

    c0, c1 = window(left, cw, sx, w)
    r0, r1 = window(top, ch, sy, h)
    part = im.crop((c0, r0, c1, r1))
    pw, ph = c1 - c0, r1 - r0

    def horizontal(img, rows):
        if nw == w:  # no horizontal pass in PIL either: the crop is whole columns
            return img.crop((left - c0, 0, left - c0 + cw, rows))
        return img.resize((cw, rows), resample, box=(left * sx - c0, 0, (left + cw) * sx - c0, rows))

    def vertical(img, cols):
        if nh == h:
            return img.crop((0, top - r0, cols, top - r0 + ch))
        return img.resize((cols, ch), resample, box=(0, top * sy - r0, cols, (top + ch) * sy - r0))

    if _pil_vertical_first(w, h, nw, nh):
        return horizontal(vertical(part, pw), ch)
    return vertical(horizontal(part, ph), cw)


def _image_count(entry) -> int:
    """How many images one prompt's entry gives: None -> 0, a list/tuple -> its length, else 1."""
    if entry is None:
        return 0
    return len(entry) if isinstance(entry, (list, tuple)) else 1


def check_pairs(images: Sequence, prompts: Sequence[str]) -> list[int]:
    """One entry of `images` per prompt, holding as many images as the prompt has `<image>`
    placeholders: an image (one), a list of images (several, in placeholder order, as
    transformers' LlavaProcessor pairs them) or None (a text-only prompt). Returns the counts."""
    if len(images) != len(prompts):
        raise VtpruneError(f"got {len(images)} images and {len(prompts)} prompts: give one image per prompt")
    if not prompts:
        raise VtpruneError("no prompts given")
    counts = []
    for i, (entry, p) in enumerate(zip(images, prompts)):
        if not isinstance(p, str):
            raise VtpruneError(f"prompt {i}: expected a string, got {type(p).__name__}")
        n, given = p.count(IMAGE_TOKEN), _image_count(entry)
        if n != given:
            if n == 0:
                raise VtpruneError(f"prompt {i} has no '{IMAGE_TOKEN}' placeholder but {given} image"
                                   f"{'s' if given > 1 else ''}: each image needs one (e.g. "
                                   f"vtprune.format_prompt(question)); give None as the image of a text-only prompt")
            raise VtpruneError(f"prompt {i} has {n} '{IMAGE_TOKEN}' placeholder{'s' if n > 1 else ''} but "
                               f"{given or 'no'} image{'s' if given != 1 else ''}: give one image per placeholder "
                               f"(a list of {n} for several, in order)")
        counts.append(n)
    return counts


def prompt_images(entry, count: int) -> list:
    """One prompt's entry of `images` as a list of `count` images (check_pairs has checked it)."""
    if count == 0:
        return []
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


class PromptEncoder:
    """Tokenizes prompts, expanding `<image>` to `num_visual_tokens` image tokens.

    `model_image_token` is the id the model's embedding expects at image positions; when the
    tokenizer's own id differs (an engine built with `from_config` and a stand-in tokenizer),
    ids are remapped."""

    def __init__(self, tokenizer, num_visual_tokens: int, model_image_token: int):
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.model_image_token = model_image_token
        tok_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tok_id is None or tok_id == tokenizer.unk_token_id:
            raise VtpruneError(f"the tokenizer has no '{IMAGE_TOKEN}' token")
        self.tokenizer_image_token = tok_id

    def encode(self, prompt: str) -> list[int]:
        text = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_visual_tokens)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        t, m = self.tokenizer_image_token, self.model_image_token
        if t != m:
            ids = [m if i == t else i for i in ids]
        return ids

    def continuation(self, prompt: str, text: str, prompt_ids: list[int] | None = None) -> list[int]:
        """The tokens of `text` as they follow `prompt`: the tail of the joint tokenization when the
        prompt's own tokens are its prefix (so boundary merges match what generation produces),
        else `text` tokenized alone."""
        prompt_ids = self.encode(prompt) if prompt_ids is None else prompt_ids
        joint = self.encode(prompt + text)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.tokenizer)
        return self.tokenizer.decode([i for i in ids if i < n], skip_special_tokens=True)


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor      # [B, T] int64, right-padded, image tokens expanded
    lengths: torch.Tensor        # [B] int64 on the device: prompt tokens per row
    pixel_values: torch.Tensor | None  # [U, C, H, W]: the batch's distinct images (None: no image at all)
    # [S]: image slot -> its image in pixel_values (None: slot i -> i); slots are the prompts'
    # `<image>` placeholders in order, one per row unless images_per_row says otherwise
    image_index: torch.Tensor | None = None
    images_per_row: tuple[int, ...] | None = None  # None: exactly one image per row
