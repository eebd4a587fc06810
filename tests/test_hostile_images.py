"""Hostile images: special files, decompression bombs, file-system errors, every PIL mode, extreme
aspect ratios (memory), and parity with transformers' LlavaProcessor on ordinary images."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from vtprune.engine.inputs import MAX_IMAGE_PIXELS, load_image
from vtprune.errors import VtpruneError


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    # in a child with a timeout: opening a FIFO without a writer would block forever
    code = ("from vtprune.engine.inputs import load_image\n"
            "try:\n    load_image(%r, 3)\nexcept ValueError as e:\n    print(e)\n" % str(fifo))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.stdout.strip() == f"image 3: {fifo}: is a FIFO (named pipe), not a regular file; refused (it could block forever)"


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
