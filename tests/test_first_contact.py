"""What a new user meets first: `vtprune generate` without --model, fresh SynthVQA splits
(`--seed`), every setting's predictions from `vtprune eval --compare`, and a JIT build that says
what it is doing."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from hostile import assert_cli_error, run
from PIL import Image

from vtprune import cli
from vtprune.quality import synthvqa as sv


# ------------------------------------------------------------------ generate without --model
def _generate_json(capsys, *args):
    rc = cli.main(["generate", *args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [json.loads(x) for x in out.splitlines()], err


def test_generate_without_model_uses_the_embedded_model(tmp_path, capsys):
    from vtprune.demo import demo_examples, has_trained_default
    from vtprune.quality.metrics import exact_match

    if not has_trained_default():
        pytest.skip("this install lacks the embedded model")
    args = []
    examples = demo_examples(5)[:3]  # SynthVQA test images: a colour, a shape and a count question
    for i, (img, question, _) in enumerate(examples):
        img.save(tmp_path / f"{i}.png")
        args += ["--image", str(tmp_path / f"{i}.png"), "--prompt", question]
    got, err = _generate_json(capsys, *args, "--max-new-tokens", "4")
    assert "note:" not in err
    # the trained model answers its task (a random stand-in would not, and would say so)
    assert [exact_match(g["text"], e[2]) for g, e in zip(got, examples)] == [True] * 3, (got, examples)
    assert [g["stats"]["visual_tokens"] for g in got] == [576] * 3


def test_generate_without_model_or_assets_says_a_random_model_answers(small_dir, tmp_path, capsys, monkeypatch):
    import vtprune.demo as demo
    from conftest import make_image

    monkeypatch.setattr(demo, "has_trained_default", lambda: False)
    monkeypatch.setattr(demo, "random_model_dir", lambda: small_dir)  # the stand-in, already built
    png = str(tmp_path / "a.png")
    make_image(0).save(png)
    (got,), err = _generate_json(capsys, "--image", png, "--prompt", "What is it?", "--max-new-tokens", "2")
    assert got["stats"]["visual_tokens"] == 36  # small_dir's 84 px images
    assert err.strip() == (f"vtprune: note: the embedded model's files are missing ({demo.ASSET_MODEL}): a random "
                           f"model answers (noise); pass --model DIR")


# ------------------------------------------------------------------ synthvqa --seed
# sha256 of each split's JSONL and of its first 3 images' RGB bytes, written by the generator before
# --seed existed (the splits the shipped model was trained, selected and measured on).
TODAY = {"train": ("97cd630ce8e2ed0a", "302d55ff5d6b048a"), "val": ("a934e6a014f85842", "08ed059e12fdd9e2"),
         "test": ("5d2205314ca510c6", "3be4444ecbb54d8a")}


def _write(out, *extra) -> int:
    return sv.main(["--out", str(out), "--train", "3", "--val", "3", "--test", "3", "--no-progress", *extra])


def _pixels(out, split):
    return [np.asarray(Image.open(os.path.join(out, split, f"{i:06d}.png")).convert("RGB")) for i in range(3)]


def _files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs}


def test_synthvqa_default_splits_are_unchanged(tmp_path, capsys):
    assert _write(tmp_path) == 0
    for split, (jsonl, pixels) in TODAY.items():
        assert hashlib.sha256(open(tmp_path / f"{split}.jsonl", "rb").read()).hexdigest()[:16] == jsonl, split
        assert hashlib.sha256(b"".join(p.tobytes() for p in _pixels(tmp_path, split))).hexdigest()[:16] == pixels
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / split}.jsonl: 3 images (stream {s})" for split, s in sv.SPLIT_SEEDS.items()]


def test_synthvqa_seed_gives_fresh_reproducible_splits(tmp_path):
    dirs = {name: tmp_path / name for name in ("default", "s5", "s5_again", "s6")}
    assert _write(dirs["default"]) == 0
    assert _write(dirs["s5"], "--seed", "5") == _write(dirs["s5_again"], "--seed", "5") == 0
    assert _write(dirs["s6"], "--seed", "6") == 0
    assert _files(dirs["s5"]) == _files(dirs["s5_again"])  # byte for byte
    for split in sv.SPLIT_SEEDS:
        s5, s6, default = (_pixels(dirs[n], split) for n in ("s5", "s6", "default"))
        for i in range(3):  # every image of every split changes with the seed
            assert not np.array_equal(s5[i], s6[i]) and not np.array_equal(s5[i], default[i]), (split, i)
        recs = [json.loads(x) for x in open(dirs["s5"] / f"{split}.jsonl")]
        assert {r["image"] for r in recs} == {f"{split}/{i:06d}.png" for i in range(3)}
    # one stream per (seed, split), all far from the shipped ones and the base model's training stream
    streams = [sv.split_seed(split, n) for n in (0, 1, 2, sv.MAX_SEED) for split in sv.SPLIT_SEEDS]
    assert len(set(streams)) == len(streams) and min(streams) == 1_000_000
    assert [sv.split_seed(split) for split in sv.SPLIT_SEEDS] == [1, 2, 3]


@pytest.mark.parametrize("args,needle", [
    (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be from 0 to 4294967295, got 4294967296"),
    (["--val", "-2"], "--val must be >= 0 images, got -2"),
    (["--train", "0", "--val", "0", "--test", "0"], "nothing to write: --train, --val and --test are all 0"),
])
def test_synthvqa_bad_arguments_write_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "data"
    assert sv.main(["--out", str(out), "--no-progress", *args]) == 2
    assert capsys.readouterr().err == f"python -m vtprune.quality.synthvqa: error: {needle}\n"
    assert not out.exists()


def test_synthvqa_cli_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run([sys.executable, "-m", "vtprune.quality.synthvqa", "--out", str(tmp_path / "f" / "data")])
    assert_cli_error(r, f"output directory {tmp_path / 'f' / 'data'}: a parent of it is a file")


# ------------------------------------------------------------------ eval --predictions
def test_eval_predictions_never_overwrite_an_input(small_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "a.png", "question": "Q?", "answer": "A"}\n')
    cfg = tmp_path / "p.yaml"
    cfg.write_text("policy: fastv\nbudget: 6\n")
    cases = [(["--predictions", str(data)], f"--predictions file {data} is the --data file"),
             (["--compare", "--pruning", str(cfg), "--predictions", str(cfg)],
              f"--predictions file {cfg} is the --pruning file"),
             (["--compare", "--budget", "6", "--out", str(tmp_path / "r"), "--predictions", str(tmp_path / "r.md")],
              f"--out file {tmp_path / 'r.md'} is the --predictions file")]
    for args, needle in cases:
        assert cli.main(["eval", "--model", small_dir, "--data", str(data), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vtprune: error: {needle}") and err.count("\n") == 1, err
    assert data.read_text() == '{"image": "a.png", "question": "Q?", "answer": "A"}\n'
    assert cfg.read_text() == "policy: fastv\nbudget: 6\n"


# ------------------------------------------------------------------ the JIT build speaks
def test_jit_build_says_when_it_builds(tmp_path, capsys, monkeypatch):
    import torch.utils.cpp_extension as cpp

    from vtprune.kernels import _extension

    calls = []

    def fake_load(name, build_directory, **kw):  # what torch's load leaves behind
        calls.append(build_directory)
        open(os.path.join(build_directory, f"{name}.so"), "wb").close()

    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    _extension._jit_build()
    lines = capsys.readouterr().err.splitlines()
    assert len(calls) == 1 and calls[0].startswith(str(tmp_path / "torch_extensions"))
    assert len(lines) == 2 and lines[0].startswith(f"vtprune: building the compiled ops (") and calls[0] in lines[0]
    assert lines[1].startswith("vtprune: built the compiled ops in ") and lines[1].endswith(" s")
    _extension._jit_build()  # built: ninja only checks, nothing to say
    assert len(calls) == 2 and capsys.readouterr().err == ""
