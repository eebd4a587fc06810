"""The engine against transformers' LlavaForConditionalGeneration, the oracle for 'unpruned'."""
import json
import os
import shutil

import pytest
import torch
from conftest import load_reference, make_image
from safetensors.torch import load_file, save_file

from vtprune import LlavaEngine, format_prompt
from vtprune.tiny_model import build_tiny_llava

QUESTIONS = [
    "What is in the image?",
    "Describe the picture in one sentence, mentioning every object you can see in it.",
    "How many?",
    "Is the yellow star left or right of the purple square? Answer with one word.",
]


def ref_last_logits(reference, image, prompt):
    model, proc = reference
    inputs = proc(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def ref_greedy(reference, image, prompt, n):
    model, proc = reference
    inputs = proc(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_next_token_logits_match_transformers(engine, reference):
    images = [make_image(i, 300 + 17 * i, 400 - 23 * i) for i in range(len(QUESTIONS))]
    prompts = [format_prompt(q) for q in QUESTIONS]
    ours = engine.next_token_logits(images, prompts)  # one batch, prompts of different lengths
    assert ours.shape == (len(QUESTIONS), engine.cfg.text.vocab_size)
    for i, (im, p) in enumerate(zip(images, prompts)):
        ref = ref_last_logits(reference, im, p)
        assert ref.abs().max() > 1.0  # logits with real spread, so 1e-4 is a meaningful bound
        assert (ours[i] - ref).abs().max().item() < 1e-4, f"prompt {i}"


def test_greedy_32_tokens_match_transformers_generate(engine, reference):
    images = [make_image(10 + i) for i in range(3)]
    prompts = [format_prompt(q) for q in QUESTIONS[:3]]
    results = engine.generate(images, prompts, max_new_tokens=32)
    for im, p, r in zip(images, prompts, results):
        ref = ref_greedy(reference, im, p, 32)
        eos = engine.eos_token_ids
        if any(t in eos for t in ref):  # transformers pads after EOS; the engine stops there
            ref = ref[: next(j for j, t in enumerate(ref) if t in eos) + 1]
        assert r.token_ids == ref
        assert len(set(ref)) > 3  # not a degenerate repeat of one token
        assert r.stats["generated_tokens"] == len(ref)
        assert r.stats["visual_tokens"] == 576


def test_batch_of_different_lengths_equals_each_alone(small_engine):
    images = [make_image(20 + i) for i in range(4)]
    prompts = [format_prompt(q) for q in QUESTIONS]
    lengths = {len(small_engine.prompts.encode(p)) for p in prompts}
    assert len(lengths) == 4  # the batch really is ragged
    batched = small_engine.generate(images, prompts, max_new_tokens=20)
    for im, p, r in zip(images, prompts, batched):
        alone = small_engine.generate([im], [p], max_new_tokens=20)[0]
        assert r.token_ids == alone.token_ids
        assert r.text == alone.text
    logits_b = small_engine.next_token_logits(images, prompts)
    for i, (im, p) in enumerate(zip(images, prompts)):
        assert torch.allclose(logits_b[i], small_engine.next_token_logits([im], [p])[0], atol=1e-5)


@pytest.mark.parametrize("feature_layer,strategy", [(-1, "default"), (-3, "full"), ([-3, -1], "default"), (1, "full")])
def test_vision_feature_layer_and_strategy_are_honoured(tmp_path, feature_layer, strategy):
    path = build_tiny_llava(str(tmp_path / "m"), seed=3, image_size=56, vision_layers=3,
                            vision_feature_layer=feature_layer, select_strategy=strategy)
    engine = LlavaEngine.from_pretrained(path)
    assert engine.cfg.num_visual_tokens == 16 + (strategy == "full")
    reference = load_reference(path)
    im, p = make_image(5), format_prompt(QUESTIONS[0])
    ref = ref_last_logits(reference, im, p)
    assert (engine.next_token_logits([im], [p])[0] - ref).abs().max() < 1e-4
    # ... and the choice matters: the default layer gives different logits on the same weights
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"] = -2, "default"
    if isinstance(feature_layer, list):
        return  # projector input width depends on the layer count; can't swap on the same weights
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    other = LlavaEngine.from_pretrained(path)
    if strategy == "default":
        assert (other.next_token_logits([im], [p])[0] - ref).abs().max() > 1e-3


HUB_LAYOUT = [  # transformers 5 names -> names in llava-hf/llava-1.5-7b-hf (transformers < 4.52)
    ("vision_tower.", "vision_tower.vision_model."),
]


def _relayout(path, out, rename):
    shutil.copytree(path, out)
    sd = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(out, "model.safetensors"))
    return {rename(k): v for k, v in sd.items()}


def test_all_checkpoint_key_layouts_and_shards_load_identically(engine, tiny_dir, tmp_path):
    im, p = make_image(7), format_prompt(QUESTIONS[1])
    expected = engine.next_token_logits([im], [p])

    hub = _relayout(tiny_dir, tmp_path / "hub", lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    save_file(hub, str(tmp_path / "hub" / "model.safetensors"))

    def v452(k):  # transformers 4.52-4.57 save_pretrained layout
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.", 1)
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.", 1)
        k = k.replace("language_model.model.", "model.language_model.", 1)
        return k.replace("language_model.lm_head.", "lm_head.", 1)
    sd = _relayout(tiny_dir, tmp_path / "v452", v452)
    # sharded with an index, as large checkpoints are saved
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / "v452" / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    json.dump(index, open(tmp_path / "v452" / "model.safetensors.index.json", "w"))

    weights = engine.model.state_dict()
    for d in ("hub", "v452"):
        other = LlavaEngine.from_pretrained(tmp_path / d)
        # Loading is renaming and copying: every tensor must arrive bit-identical.
        loaded = other.model.state_dict()
        assert loaded.keys() == weights.keys(), d
        for k, v in weights.items():
            assert torch.equal(loaded[k], v), f"{d}: {k}"
        # The logits of the same weights are not bit-identical: safetensors maps each file, so a
        # tensor's address depends on the header length (key names), and on AVX-512 the GEMMs
        # round differently at other alignments (measured on an AMD EPYC: 7.2e-7 for the hub
        # layout, 0.0 once the same tensors are copied to 64-byte-aligned storage). 1e-5 is ~20
        # float32 ulps at these logits (|max| 5.3); swapping any two same-shaped weight matrices
        # moves them by 0.16 or more.
        torch.testing.assert_close(other.next_token_logits([im], [p]), expected, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{d}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_twice_transformers_own(tiny_dir, reference, dtype):
    """flash-attention-style calibration: in bf16/fp16 the engine may differ from the fp32 oracle
    by at most ~2x what transformers itself loses in the same dtype."""
    from transformers import LlavaForConditionalGeneration

    im, p = make_image(9), format_prompt(QUESTIONS[0])
    exact = ref_last_logits(reference, im, p)
    ref_lp = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype).eval()
    proc = reference[1]
    inputs = proc(images=[im], text=[p], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref_err = (ref_lp(**inputs).logits[0, -1].float() - exact).abs().max().item()
    ours = LlavaEngine.from_pretrained(tiny_dir, dtype=dtype).next_token_logits([im], [p])[0]
    err = (ours - exact).abs().max().item()
    assert ref_err > 0
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
