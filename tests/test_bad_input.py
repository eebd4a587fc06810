"""Every kind of bad input gets one clear error that names the problem."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_image
from hostile import assert_cli_error, error_lines
from safetensors.torch import load_file, save_file

from vtprune import CheckpointError, LlavaEngine, VtpruneError, format_prompt

P = format_prompt("What is it?")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_with(small_dir, tmp_path, edit):
    out = tmp_path / "m"
    shutil.copytree(small_dir, out)
    sd = load_file(os.path.join(small_dir, "model.safetensors"))
    edit(sd)
    save_file(sd, str(out / "model.safetensors"))
    return out


def test_missing_or_unreadable_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory .*nope: not found"):
        LlavaEngine.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: is not a directory"):
        LlavaEngine.from_pretrained(tmp_path / "file")
    with pytest.raises(CheckpointError, match="config.json not found"):
        LlavaEngine.from_pretrained(tmp_path)


def test_no_safetensors_and_pickles_refused(small_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(small_dir, out)
    os.remove(out / "model.safetensors")
    (out / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="no model.*safetensors.*pickle"):
        LlavaEngine.from_pretrained(out)


def test_missing_tensor_is_named(small_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    out = _copy_with(small_dir, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensor 'decoder\.layers\.1\.mlp\.up_proj\.weight'"):
        LlavaEngine.from_pretrained(out)


def test_wrong_shape_is_named(small_dir, tmp_path):
    key = "multi_modal_projector.linear_1.weight"

    def edit(sd):
        sd[key] = torch.zeros(3, 3)
    out = _copy_with(small_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear_1\.weight' has shape \[3, 3\]"):
        LlavaEngine.from_pretrained(out)


def test_corrupt_safetensors(small_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(small_dir, out)
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        LlavaEngine.from_pretrained(out)


def test_unsupported_config(small_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(small_dir, out)
    cfg = json.load(open(out / "config.json"))
    cfg["text_config"]["model_type"] = "mistral"
    json.dump(cfg, open(out / "config.json", "w"))
    with pytest.raises(CheckpointError, match="text_config.model_type is 'mistral'"):
        LlavaEngine.from_pretrained(out)


def test_images(small_engine, tmp_path):
    with pytest.raises(VtpruneError, match="image 0: file not found"):
        small_engine.generate([str(tmp_path / "none.png")], [P])
    (tmp_path / "bad.png").write_text("this is text")
    with pytest.raises(VtpruneError, match="image 0: .*bad.png is not an image"):
        small_engine.generate([str(tmp_path / "bad.png")], [P])
    good = make_image(0)
    good.save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(VtpruneError, match="image 1: .*trunc.png"):
        small_engine.generate([good, str(tmp_path / "trunc.png")], [P, P])
    with pytest.raises(VtpruneError, match="expected a PIL image or a file path"):
        small_engine.generate([42], [P])


def test_prompts(small_engine):
    im = make_image(0)
    with pytest.raises(VtpruneError, match="prompt 0 has no '<image>'"):
        small_engine.generate([im], ["no placeholder"])
    with pytest.raises(VtpruneError, match="prompt 1 has 2 '<image>'"):
        small_engine.generate([im, im], [P, "<image><image> two"])
    with pytest.raises(VtpruneError, match="2 images and 1 prompts"):
        small_engine.generate([im, im], [P])
    with pytest.raises(VtpruneError, match="longer than the model's context"):
        small_engine.next_token_logits([im], [format_prompt("word " * 3000)])
    with pytest.raises(VtpruneError, match="max_new_tokens <= "):
        small_engine.generate([im], [P], max_new_tokens=2040)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop": [""]}, r"stop\[0\] is an empty string"),
])
def test_generation_arguments(small_engine, kwargs, match):
    with pytest.raises(VtpruneError, match=match):
        small_engine.generate([make_image(0)], [P], **kwargs)


def test_dtype_and_device(small_dir):
    with pytest.raises(VtpruneError, match="unsupported dtype"):
        LlavaEngine.from_pretrained(small_dir, dtype=torch.int8)
    with pytest.raises(VtpruneError, match="unsupported dtype"):
        LlavaEngine.from_pretrained(small_dir, dtype="float64")
    with pytest.raises(VtpruneError, match="unsupported device"):
        LlavaEngine.from_pretrained(small_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(VtpruneError, match="CUDA is not available"):
            LlavaEngine.from_pretrained(small_dir, device="cuda")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vtprune", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_errors_are_one_line_without_traceback(small_dir, tmp_path):
    im = tmp_path / "a.png"
    make_image(0).save(im)
    cases = [
        (["--model", str(tmp_path / "nope"), "--image", str(im), "--prompt", "hi"], "nope: not found"),
        (["--model", small_dir, "--image", str(tmp_path / "x.png"), "--prompt", "hi"], "x.png: not found"),
        (["--model", small_dir, "--image", str(im), "--prompt", "a", "--prompt", "b"], "1 --image and 2 --prompt"),
        (["--model", small_dir, "--image", str(im), "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--model", small_dir, "--image", str(im), "--prompt", "hi", "--dtype", "int4"], "unsupported dtype"),
        (["--model", small_dir, "--image", str(im), "--prompt", "<image> <image>"], "has 2 '<image>'"),
    ]
    for args, match in cases:
        r = _cli("generate", *args)
        assert_cli_error(r, match)
        # one line of ours: torch's CUDA build may print its own warning first (no GPU)
        lines = error_lines(r)
        assert len(lines) == 1 and lines[0].startswith("vtprune: error:") and match in lines[0], r.stderr


def test_cli_generate_prints_answer_and_stats(small_dir, small_engine, tmp_path):
    im = tmp_path / "a.png"
    make_image(0).save(im)
    r = _cli("generate", "--model", small_dir, "--image", str(im), "--prompt", "What is it?",
             "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = small_engine.generate([str(im)], [P], max_new_tokens=5)[0]
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["stats"]["visual_tokens"] == 36
    r = _cli("generate", "--model", small_dir, "--image", str(im), "--prompt", "What is it?", "--max-new-tokens", "3")
    assert r.returncode == 0 and "36 visual" in r.stdout
