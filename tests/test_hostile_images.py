"""Hostile images: special files, decompression bombs, file-system errors, bad argument types, every
PIL mode against an independent conversion, extreme aspect ratios (memory and pixels), and parity
with transformers' image processor (LlavaProcessor's) on ordinary images."""
import colorsys
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hostile import ROOT, assert_cli_error, can_drop_privileges, cli, run
from vtprune.demo import ASSET_MODEL
from vtprune.engine.inputs import MAX_IMAGE_PIXELS, load_image
from vtprune.errors import VtpruneError


@pytest.fixture(scope="module")
def processor():
    """The embedded model's image processor as transformers loads it (CLIPImageProcessorPil without
    torchvision: shortest edge 336, bicubic, centre crop 336x336)."""
    from transformers import AutoImageProcessor

    from vtprune.engine.runtime import quiet_transformers

    with quiet_transformers():
        return AutoImageProcessor.from_pretrained(ASSET_MODEL, local_files_only=True)


def pixels(processor, im):
    return processor(images=[im], return_tensors="np")["pixel_values"][0]


def levels(processor, a, b):
    """|a - b| of two pixel_values arrays in grey levels (undoing the normalisation)."""
    return np.abs(a - b) * np.array(processor.image_std, dtype=np.float64)[:, None, None] * 255


def rgb(im) -> np.ndarray:
    out = load_image(im)
    assert out.mode == "RGB" and out.size == im.size
    return np.asarray(out).astype(np.int64)


def noise(shape, seed=0, high=256, dtype=np.uint8):
    return np.random.RandomState(seed).randint(0, high, shape).astype(dtype)


def child(code: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], timeout=60, **kw)


# ------------------------------------------------------------------ special files, bombs, limits
def test_fifo_is_refused_without_opening_it(tmp_path):
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors = []

    def load():
        try:
            load_image(str(fifo), 3)
        except VtpruneError as e:
            errors.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=20)
    if t.is_alive():  # blocked in open(): a writer releases it, and the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image blocked on a FIFO")
    assert errors == [f"image 3: {fifo}: is a FIFO (named pipe), not a regular file; refused (it could block forever)"]


def test_device_is_refused():
    with pytest.raises(VtpruneError, match=r"^image 0: /dev/zero: is a device, not a regular file$"):
        load_image("/dev/zero")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # 20000 x 5000 one-bit pixels compress to 12 KB; 1e8 pixels > the limit (89,478,485)
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 5000)).save(path)
    assert os.path.getsize(path) < 20000
    with pytest.raises(VtpruneError) as e:
        load_image(str(path), 2)
    assert str(e.value) == (f"image 2: {path} is 20000x5000 = 100000000 pixels, more than the limit of "
                            f"{MAX_IMAGE_PIXELS} (refused as a possible decompression bomb)")


def test_bomb_beyond_pils_own_error_threshold_and_a_huge_header_with_no_data(tmp_path):
    # 40000 x 5000: beyond 2 x PIL's MAX_IMAGE_PIXELS, where Image.open itself raises
    bomb = tmp_path / "big.png"
    Image.new("1", (40000, 5000)).save(bomb)
    with pytest.raises(VtpruneError, match=r"^image 0: .*big.png has more pixels than the limit of 89478485 \(refused "
                       r"as a possible decompression bomb; PIL: Image size \(200000000 pixels\) exceeds"):
        load_image(str(bomb))
    # within the limit, but the header's 4000 x 4000 pixels are followed by 200 bytes of data
    Image.new("RGB", (4000, 4000)).save(tmp_path / "full.png")
    (tmp_path / "short.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(VtpruneError) as e:
        load_image(str(tmp_path / "short.png"))
    assert str(e.value) == f"image 0: {tmp_path / 'short.png'} is not a readable image (image file is truncated)"


def test_pil_objects_without_pixels_or_too_large_are_refused():
    with pytest.raises(VtpruneError, match=r"^image 4: has no pixels \(0x5\)$"):
        load_image(Image.new("RGB", (0, 5)), 4)
    big = Image.new("L", (1, 1))
    big._size = (10000, 10000)  # what a header would claim; no 100 MB allocation in the test
    with pytest.raises(VtpruneError, match=r"^image 0: is 10000x10000 = 100000000 pixels, more than the limit"):
        load_image(big)
    closed = Image.new("RGB", (4, 4))
    closed.close()
    with pytest.raises(VtpruneError, match=r"^image 0: the PIL image cannot be read \(ValueError: Operation on closed image\)$"):
        load_image(closed)


# ------------------------------------------------------------------ file-system errors and paths
def _fs_cases(tmp_path):
    d = tmp_path
    (d / "dir.png").mkdir()
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("not an image\n")
    os.symlink(d / "loop.png", d / "loop.png")
    os.symlink(d / "missing.png", d / "dangling.png")
    (d / "file").write_text("x")
    Image.fromarray(noise((64, 64, 3))).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    (d / "x.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto\n")
    return {
        "directory": (str(d / "dir.png"), f"image 1: {d}/dir.png: is a directory"),
        "missing": (str(d / "none.png"), f"image 1: file not found: {d}/none.png"),
        "dangling symlink": (str(d / "dangling.png"),
                             f"image 1: a symbolic link to a file that does not exist: {d}/dangling.png"),
        "symlink loop": (str(d / "loop.png"),
                         f"image 1: {d}/loop.png: too many levels of symbolic links (a symlink loop)"),
        "parent is a file": (str(d / "file" / "a.png"), f"image 1: {d}/file/a.png: a parent of it is not a directory"),
        "empty file": (str(d / "empty.png"), f"image 1: {d}/empty.png is an empty file (0 bytes), not an image"),
        "text file": (str(d / "notes.png"), f"image 1: {d}/notes.png is not an image (PIL cannot identify it as one of "),
        "EPS (Ghostscript)": (str(d / "x.eps"), f"image 1: {d}/x.eps is not an image (PIL cannot identify it"),
        "truncated PNG": (str(d / "cut.png"), f"image 1: {d}/cut.png is not a readable image ("),
        "NUL in the path": (str(d) + "/a\x00b.png", f"image 1: {str(d) + '/a' + chr(0) + 'b.png'!r}: the path contains a NUL byte"),
        "empty path": ("", "image 1: empty path"),
    }


FS_CASES = ["directory", "missing", "dangling symlink", "symlink loop", "parent is a file", "empty file",
            "text file", "EPS (Ghostscript)", "truncated PNG", "NUL in the path", "empty path"]


@pytest.mark.parametrize("case", FS_CASES)
def test_file_system_errors_are_one_message_naming_the_path(tmp_path, case):
    path, expected = _fs_cases(tmp_path)[case]
    with pytest.raises(VtpruneError) as e:
        load_image(path, 1)
    msg = str(e.value)
    assert msg.startswith(expected) and "\n" not in msg, msg


@pytest.mark.parametrize("value, expected", [
    (b"/tmp/a.png", "got bytes (encoded image data: open it with PIL.Image.open(io.BytesIO(data))"),
    (3, "got int"),
    (None, "got NoneType"),
    (np.zeros((4, 4, 3), np.uint8), "got ndarray (an array: PIL.Image.fromarray(array))"),
])
def test_values_that_are_not_images_or_paths(value, expected):
    with pytest.raises(VtpruneError) as e:
        load_image(value, 2)
    assert str(e.value) == "image 2: expected a PIL image or a file path (str or os.PathLike), " + expected + (
        "; a bytes path: os.fsdecode(path))" if isinstance(value, bytes) else "")


@pytest.mark.skipif(not can_drop_privileges(), reason="needs a non-root user or setpriv")
def test_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    os.chmod(path, 0)
    r = child("from vtprune.engine.inputs import load_image\n"
              f"try:\n    load_image({str(path)!r})\nexcept ValueError as e:\n    print(e)\n", unprivileged=True)
    assert r.stdout.strip() == f"image 0: {path}: permission denied", r.stderr


def test_cli_generate_with_a_fifo_image_fails_at_once(tmp_path, small_dir):
    fifo = tmp_path / "cam.png"
    os.mkfifo(fifo)
    r = cli("generate", "--model", small_dir, "--image", fifo, "--prompt", "what?", "--max-new-tokens", "2")
    assert_cli_error(r, str(fifo), "is a FIFO")


# ------------------------------------------------------------------ modes
def _composite(c, a):
    """The colour c with alpha a over white, rounded: transformers' convert_to_rgb."""
    c, a = np.asarray(c, np.int64), np.asarray(a, np.int64)
    return np.floor((c * a + 255 * (255 - a)) / 255 + 0.5)


def test_16_bit_grey_png_scales_by_257_from_a_file_and_as_an_object(tmp_path):
    # the case: PIL's own I;16 -> RGB clips at 255 (mean error 125 grey levels)
    a = noise((50, 70), seed=1, high=65536, dtype=np.uint16)
    a[0, :6] = [0, 128, 129, 255, 65407, 65535]
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    expected = np.floor(a / 257 + 0.5)[..., None].repeat(3, 2)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
        assert (rgb(opened) == expected).all()
    assert (np.asarray(load_image(str(path))) == expected).all()
    assert list(expected[0, :6, 0]) == [0, 0, 1, 1, 255, 255]
    big_endian = Image.frombytes("I;16B", (70, 50), a.astype(">u2").tobytes())
    assert (rgb(big_endian) == expected).all()
    # a 16-bit transparency key is composited over white
    keyed = Image.fromarray(a)
    keyed.info["transparency"] = int(a[1, 1])
    assert (rgb(keyed) == np.where((a == a[1, 1])[..., None], 255, expected)).all()


def test_mode_I_is_16_bit_data_and_out_of_range_is_refused():
    a = noise((20, 30), seed=2, high=65536).astype(np.int32)
    assert (rgb(Image.fromarray(a)) == np.floor(a / 257 + 0.5)[..., None]).all()
    with pytest.raises(VtpruneError, match=r"^image 0: mode I pixels range over -1\.\.7; they are read as 16-bit"):
        load_image(Image.fromarray(np.array([[-1, 7]], np.int32)))


def test_mode_F_is_0_to_1_or_0_to_255_and_other_ranges_are_refused():
    unit = np.random.RandomState(3).rand(20, 30).astype(np.float32)
    assert (rgb(Image.fromarray(unit)) == np.floor(unit.astype(np.float64) * 255 + 0.5)[..., None]).all()
    grey = (unit * 255).astype(np.float32)
    grey[0, 0] = 200.0  # a pixel above 1: the image is read as 0..255
    assert (rgb(Image.fromarray(grey)) == np.floor(grey.astype(np.float64) + 0.5)[..., None]).all()
    with pytest.raises(VtpruneError, match=r"^image 0: mode F pixels range over \[-0\.5, 3\]; expected \[0, 1\]"):
        load_image(Image.fromarray(np.array([[-0.5, 3.0]], np.float32)))
    with pytest.raises(VtpruneError, match=r"^image 0: mode F pixels include NaN or infinity$"):
        load_image(Image.fromarray(np.array([[0.5, np.nan]], np.float32)))


def _alpha_cases():
    c = noise((24, 32, 3), seed=4)
    a = noise((24, 32), seed=5)
    a[0, :3] = [0, 255, 128]
    pal = noise((256, 3), seed=6)
    idx = noise((24, 32), seed=7)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal.flatten().tolist())
    trns = noise((256,), seed=8)
    p_alpha = p.copy()
    p_alpha.info["transparency"] = trns.tobytes()
    p_key = p.copy()
    p_key.info["transparency"] = int(idx[2, 2])
    l_key = Image.fromarray(c[..., 0], "L")
    l_key.info["transparency"] = int(c[3, 3, 0])
    rgb_key = Image.fromarray(c, "RGB")
    rgb_key.info["transparency"] = tuple(int(v) for v in c[4, 4])
    pa = Image.merge("PA", (p, Image.fromarray(a, "L")))
    return {
        "RGBA": (Image.fromarray(np.dstack([c, a]), "RGBA"), _composite(c, a[..., None])),
        "LA": (Image.fromarray(np.dstack([c[..., 0], a]), "LA"), _composite(c[..., :1], a[..., None]).repeat(3, 2)),
        "P with per-entry alpha": (p_alpha, _composite(pal[idx], trns[idx][..., None])),
        "P with a transparent index": (p_key, np.where((idx == idx[2, 2])[..., None], 255, pal[idx])),
        "PA": (pa, _composite(pal[idx], a[..., None])),
        "L with a transparency key": (l_key, np.where((c[..., :1] == c[3, 3, 0]), 255, c[..., :1]).repeat(3, 2)),
        "RGB with a transparency key": (rgb_key, np.where((c == c[4, 4]).all(2, keepdims=True), 255, c)),
    }


ALPHA = ["RGBA", "LA", "P with per-entry alpha", "P with a transparent index", "PA", "L with a transparency key",
         "RGB with a transparency key"]


@pytest.mark.parametrize("case", ALPHA)
def test_transparency_is_composited_over_white_like_llava_processor(case, processor):
    im, expected = _alpha_cases()[case]
    assert (rgb(im) == expected).all()
    # the same pixel values as LlavaProcessor given the original image (its convert_to_rgb)
    assert (pixels(processor, load_image(im)) == pixels(processor, im)).all()


def test_premultiplied_alpha_is_composited_not_dropped():
    # RGBa holds c*a/255: over white that is c*a/255 + 255 - a. LlavaProcessor drops the alpha here
    # (PIL's RGBa -> RGB unpremultiplies), which is wrong; PIL's unpremultiply rounds: +-1 level
    c, a = noise((16, 16, 3), seed=9), noise((16, 16, 1), seed=10)
    a[a < 16] = 16  # nearly transparent pixels lose their colour to the premultiplication
    pre = np.floor(c.astype(np.int64) * a / 255 + 0.5)
    got = rgb(Image.fromarray(np.dstack([pre, a]).astype(np.uint8), "RGBa"))
    assert np.abs(got - (pre + 255 - a)).max() <= 1


def test_modes_without_alpha_match_the_standard_formulas():
    c = noise((16, 24, 4), seed=11)
    # CMYK: (255 - c)(255 - k) / 255, rounded (no ICC profile: none is given)
    cmyk = np.floor((255 - c[..., :3].astype(np.int64)) * (255 - c[..., 3:]) / 255 + 0.5)
    assert (rgb(Image.fromarray(c, "CMYK")) == cmyk).all()
    # 1-bit: 0 or 255
    bits = Image.fromarray(c[..., 0] > 127)
    assert bits.mode == "1" and (rgb(bits) == np.where(c[..., :1] > 127, 255, 0)).all()
    # L and P: the grey level / the palette entry
    assert (rgb(Image.fromarray(c[..., 0], "L")) == c[..., :1]).all()
    p = Image.fromarray(c[..., 0], "P")
    pal = noise((256, 3), seed=12)
    p.putpalette(pal.flatten().tolist())
    assert (rgb(p) == pal[c[..., 0]]).all()
    # RGBX: the padding byte is dropped
    assert (rgb(Image.fromarray(c, "RGBX")) == c[..., :3]).all()
    # HSV: colorsys.hsv_to_rgb, rounded
    hsv = c[..., :3]
    ref = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv]) * 255
    assert (rgb(Image.fromarray(hsv, "HSV")) == np.floor(ref + 0.5)).all()
    # YCbCr (JPEG, full range BT.601): PIL's fixed-point tables are within one level of the formula
    y, cb, cr = (hsv[..., i].astype(np.float64) for i in range(3))
    ref = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], -1)
    assert np.abs(rgb(Image.fromarray(hsv, "YCbCr")) - np.clip(np.floor(ref + 0.5), 0, 255)).max() <= 1
    # LAB (CIELab D50 -> sRGB, littlecms): greys a = b = 0 give sRGB grey with Y = ((L* + 16) / 116)^3
    lstar = np.arange(0, 256, 17, dtype=np.uint8)
    lab = Image.fromarray(np.stack([lstar, 0 * lstar, 0 * lstar], -1)[None], "LAB")
    yy = ((lstar / 255 * 100 + 16) / 116) ** 3
    yy = np.where(yy > 0.008856, yy, (lstar / 255 * 100) / 903.3)
    srgb = np.where(yy <= 0.0031308, 12.92 * yy, 1.055 * yy ** (1 / 2.4) - 0.055) * 255
    assert np.abs(rgb(lab)[0] - np.floor(srgb + 0.5)[:, None]).max() <= 1


def test_first_frame_of_animations_and_no_exif_rotation(tmp_path, processor):
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    red.save(tmp_path / "anim.png", save_all=True, append_images=[blue])
    red.save(tmp_path / "pages.tiff", save_all=True, append_images=[blue])
    for name in ("anim.gif", "anim.png", "pages.tiff"):
        with Image.open(tmp_path / name) as opened:
            assert opened.n_frames == 2
        assert (np.asarray(load_image(str(tmp_path / name))) == [255, 0, 0]).all(), name
    # EXIF orientation 6 (rotate 90 degrees) is not applied, as LlavaProcessor and LLaVA's training
    # pipeline (PIL's open + convert) do not apply it either
    im = Image.fromarray(noise((10, 20, 3), seed=13))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif)
    loaded = load_image(str(tmp_path / "rot.png"))
    assert loaded.size == (20, 10) and (np.asarray(loaded) == np.asarray(im)).all()
    with Image.open(tmp_path / "rot.png") as opened:
        assert opened.getexif()[0x0112] == 6
        assert (pixels(processor, loaded) == pixels(processor, opened)).all()


# ------------------------------------------------------------------ sizes, aspect ratios, memory
@pytest.mark.parametrize("size", [(300, 400), (640, 480), (336, 336), (1000, 200), (200, 1000), (50, 60),
                                  (1, 1), (16, 1)])
def test_ordinary_aspect_ratios_give_llava_processors_pixels_exactly(size, processor, tmp_path):
    w, h = size
    im = Image.fromarray(noise((h, w, 3), seed=w + h))
    im.save(tmp_path / "x.png")
    expected = pixels(processor, im)
    for given in (im, str(tmp_path / "x.png")):
        got = pixels(processor, load_image(given, 0, processor))
        assert got.shape == (3, 336, 336) and (got == expected).all()


# upscaled (1 -> 336 columns), downscaled with PIL's vertical pass first (400x9000 -> 336x7560),
# landscape and portrait, shortest edge above and below 336
@pytest.mark.parametrize("size", [(2, 200), (200, 3), (17, 400), (11, 600), (400, 9000), (1300, 13)])
def test_extreme_aspect_ratios_are_resized_on_the_crop_only(size, processor):
    # beyond 16:1 the crop is computed here on the crop's source window, not by the processor's
    # full-size resize (2x200 -> 336x33600 pixels). PIL takes a resize box in float32, so a filter
    # weight can differ in its last bits: measured at most 1 grey level on at most 0.02% of the values
    # (24 sizes from 1x2000 to 9000x13)
    w, h = size
    im = Image.fromarray(noise((h, w, 3), seed=w * 7 + h))
    fitted = load_image(im, 0, processor)
    assert fitted.size == (336, 336)
    d = levels(processor, pixels(processor, fitted), pixels(processor, im))
    assert d.max() <= 1 + 1e-3 and (d > 1e-3).mean() <= 0.005, (d.max(), (d > 1e-3).mean())


def test_extreme_aspect_ratio_with_another_processor_is_refused():
    class TorchvisionLike:  # the torchvision ("fast") CLIP processor: its resize is not PIL's
        do_resize = do_center_crop = True
        size = {"shortest_edge": 336}
        crop_size = {"height": 336, "width": 336}
        resample = 3
        backend = "torchvision"
    im = Image.new("RGB", (1, 2000))
    with pytest.raises(VtpruneError) as e:
        load_image(im, 5, TorchvisionLike())
    assert str(e.value) == ("image 5: is 1x2000 (aspect ratio 2000:1): this image processor would resize it to "
                            "336x672000 pixels before its 336x336 crop; refused (at most 16:1 with it)")
    assert load_image(Image.new("RGB", (100, 1600)), 5, TorchvisionLike()).size == (100, 1600)

    class FixedSize(TorchvisionLike):  # resizes to 336x336 whatever the aspect: memory is bounded
        size = {"height": 336, "width": 336}
    assert load_image(im, 5, FixedSize()) is im


RSS = """
import resource, sys
import numpy as np
from PIL import Image
from transformers import AutoImageProcessor
from vtprune.demo import ASSET_MODEL
from vtprune.engine.inputs import load_image
p = AutoImageProcessor.from_pretrained(ASSET_MODEL, local_files_only=True)
p(images=[Image.new("RGB", (336, 336))], return_tensors="np")
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = p(images=[load_image(path, 0, p)], return_tensors="np")["pixel_values"]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(x.shape, (after - before) // 1024)
"""


def test_peak_memory_of_a_1x8000_png_is_bounded_by_the_processed_size(tmp_path):
    # measured: 1x2000 grew the peak RSS by 2154 MB and 1x8000 by 8634 MB with the processor's
    # full-size resize (336 x 2688000 pixels); 4 MB each when resized on the crop only
    path = tmp_path / "tall.png"
    Image.fromarray(noise((8000, 1, 3), seed=14)).save(path)
    r = run([sys.executable, "-c", RSS, str(path)], timeout=120)
    shape, grown = r.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 3, 336, 336)" and int(grown) < 64, r.stdout + r.stderr


def test_engine_prepare_gives_the_reference_pixels_for_an_elongated_and_a_hostile_batch(small_engine, small_dir,
                                                                                          tmp_path):
    from transformers import AutoImageProcessor

    from vtprune.engine.runtime import quiet_transformers

    with quiet_transformers():
        ref = AutoImageProcessor.from_pretrained(small_dir, local_files_only=True)
    tall = Image.fromarray(noise((3000, 2, 3), seed=15))  # 84 x 126000 before the crop
    tall.save(tmp_path / "tall.png")
    g16 = Image.fromarray(noise((30, 40), seed=16, high=65536, dtype=np.uint16))
    batch = small_engine.prepare([str(tmp_path / "tall.png"), g16], ["<image> a", "<image> b"])
    want = ref(images=[tall, Image.fromarray(np.floor(np.asarray(g16) / 257 + 0.5).astype(np.uint8)).convert("RGB")],
               return_tensors="pt")["pixel_values"]
    d = levels(ref, batch.pixel_values.numpy(), want.numpy())
    assert batch.pixel_values.shape == (2, 3, 84, 84) and d.max() <= 1 + 1e-3 and (d > 1e-3).mean() <= 0.005
    # a path with a NUL byte is an error naming the image, not a traceback from realpath
    with pytest.raises(VtpruneError, match=r"^image 1: '.*a\\x00b\.png': the path contains a NUL byte$"):
        small_engine.prepare([g16, str(tmp_path) + "/a\x00b.png"], ["<image> a", "<image> b"])
