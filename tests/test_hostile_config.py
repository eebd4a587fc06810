"""Hostile model directories, config.json values, pruning YAML, training settings and checkpoints:
each is refused with one error that names the key or the file and the reason; no loader ever
reaches an unpickler (a static check of the package, benchmarks and main.py, and behavioural
ones)."""
import ast
import copy
import json
import os
import pickle
import re
import shutil
import struct
import sys

import pytest
import torch
import yaml
from conftest import make_image
from hostile import ROOT, assert_cli_error, can_drop_privileges, cli, run
from safetensors.torch import load_file, save_file

from vtprune import CheckpointError, LlavaEngine, VtpruneError
from vtprune.engine.config import LlavaModelConfig
from vtprune.pruning import PruningConfig

ASSET = os.path.join(ROOT, "vtprune", "assets", "synthvqa-llava")
with open(os.path.join(ASSET, "config.json"), encoding="utf-8") as _f:
    BASE = json.load(_f)
DEL = object()


def edited(config: dict, key: str, value) -> dict:
    """A deep copy of `config` with the dotted `key` set to `value` (DEL: removed)."""
    out = copy.deepcopy(config)
    d, *path = out, *key.split(".")
    for k in path[:-1]:
        d = d[k]
    if value is DEL:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return out


# --------------------------------------------------------------------------- config.json values
NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [
    ("text_config.num_attention_heads", "32", 'text_config.num_attention_heads must be a positive integer, got "32"'),
    ("text_config.num_attention_heads", True, "text_config.num_attention_heads must be a positive integer, got true"),
    ("text_config.num_attention_heads", 4.0, "text_config.num_attention_heads must be a positive integer, got 4.0"),
    ("text_config.num_attention_heads", 0, "text_config.num_attention_heads must be a positive integer, got 0"),
    ("text_config.num_attention_heads", 3,
     "text_config.num_attention_heads (3) must be a multiple of num_key_value_heads (4)"),
    ("text_config.num_key_value_heads", -4, "text_config.num_key_value_heads must be a positive integer, got -4"),
    ("text_config.hidden_size", 128.5, "text_config.hidden_size must be a positive integer, got 128.5"),
    ("text_config.head_dim", 31, "text_config.head_dim must be even (RoPE rotates pairs of dimensions), got 31"),
    ("text_config.vocab_size", 2**40, "text_config.vocab_size must be at most 2147483647, got 1099511627776"),
    ("text_config.intermediate_size", [352], "text_config.intermediate_size must be a positive integer, got [352]"),
    ("text_config.num_hidden_layers", False, "text_config.num_hidden_layers must be a positive integer, got false"),
    ("text_config.max_position_embeddings", -5,
     "text_config.max_position_embeddings must be a positive integer, got -5"),
    ("text_config.rms_norm_eps", 0, "text_config.rms_norm_eps must be a finite number > 0, got 0"),
    ("text_config.rms_norm_eps", NAN, "text_config.rms_norm_eps must be a finite number > 0, got NaN"),
    ("text_config.rope_parameters", [1], "text_config.rope_parameters must be a mapping, got a list [1]"),
    ("text_config.rope_parameters", {"rope_theta": -1.0, "rope_type": "default"},
     "text_config.rope_parameters.rope_theta must be a finite number > 0, got -1.0"),
    ("text_config.rope_parameters", {"rope_theta": INF},
     "text_config.rope_parameters.rope_theta must be a finite number > 0, got Infinity"),
    ("text_config.rope_parameters", {"rope_type": "linear", "factor": 2.0},
     "text_config.rope_parameters.rope_type 'linear' is not supported (only 'default')"),
    ("text_config.eos_token_id", "2", 'text_config.eos_token_id must be a token id in [0, 384) or a list of them, '
                                      'got "2"'),
    ("text_config.eos_token_id", [2, True], "text_config.eos_token_id must be a token id in [0, 384) or a list of "
                                            "them, got [2, true]"),
    ("text_config.eos_token_id", 384, "text_config.eos_token_id must be a token id in [0, 384) or a list of them, "
                                      "got 384"),
    ("text_config.hidden_act", "swish", "text_config.hidden_act must be one of 'gelu', 'gelu_new', "
                                        "'gelu_pytorch_tanh', 'quick_gelu', 'relu', 'silu', got \"swish\""),
    ("text_config.attention_bias", 1, "text_config.attention_bias must be true or false, got 1"),
    ("text_config.model_type", "mistral", "text_config.model_type is 'mistral', only 'llama' is supported"),
    ("text_config", [1], "text_config must be a mapping, got a list [1]"),
    ("vision_config", "clip", 'vision_config must be a mapping, got a string "clip"'),
    ("vision_config", DEL, "missing key 'vision_config' ('vision_config' and 'text_config' must both be present)"),
    ("vision_config.image_size", 337,
     "vision_config.image_size (337) must be a multiple of vision_config.patch_size (14)"),
    ("vision_config.patch_size", 0, "vision_config.patch_size must be a positive integer, got 0"),
    ("vision_config.num_attention_heads", 3,
     "vision_config.hidden_size (128) must be a multiple of vision_config.num_attention_heads (3)"),
    ("vision_config.num_channels", 1, "vision_config.num_channels must be 3 (images are converted to RGB), got 1"),
    ("vision_config.layer_norm_eps", -1e-5, "vision_config.layer_norm_eps must be a finite number > 0, got -1e-05"),
    ("vision_feature_layer", ["-1"], 'vision_feature_layer must be a layer index or a non-empty list of them, '
                                     'got ["-1"]'),
    ("vision_feature_layer", True, "vision_feature_layer must be a layer index or a non-empty list of them, "
                                   "got true"),
    ("vision_feature_layer", [], "vision_feature_layer must be a layer index or a non-empty list of them, got []"),
    ("vision_feature_layer", -6, "vision_feature_layer -6 is out of range for 4 vision layers (hidden states -5..4)"),
    ("vision_feature_select_strategy", "cls",
     "vision_feature_select_strategy must be one of 'default', 'full', got \"cls\""),
    ("image_token_index", 384, "image_token_index 384 is outside the vocabulary (text_config.vocab_size = 384)"),
    ("image_token_index", "383", 'image_token_index must be an integer >= 0, got "383"'),
    ("projector_hidden_act", 7, "projector_hidden_act must be one of 'gelu', 'gelu_new', 'gelu_pytorch_tanh', "
                                "'quick_gelu', 'relu', 'silu', got 7"),
    ("multimodal_projector_bias", "yes", 'multimodal_projector_bias must be true or false, got "yes"'),
    ("model_type", "llava_next", "model_type is 'llava_next', only 'llava' (LLaVA-1.5) is supported"),
]


@pytest.mark.parametrize("key,value,message", CONFIG_CASES,
                         ids=[f"{k}={json.dumps(v) if v is not DEL else 'deleted'}"[:60] for k, v, _ in CONFIG_CASES])
def test_config_json_values_are_checked_with_the_key_named(key, value, message):
    with pytest.raises(CheckpointError) as e:
        LlavaModelConfig.from_any(edited(BASE, key, value))
    assert str(e.value) == "config: " + message


def test_config_json_that_is_valid_loads_and_defaults_fill_in():
    """The shipped config and the 7B architecture pass; optional keys that are absent or null take
    transformers' defaults (head_dim = hidden / heads)."""
    from vtprune.model_configs import llava_1_5_7b_config

    cfg = LlavaModelConfig.from_any(edited(edited(BASE, "text_config.head_dim", DEL),
                                           "vision_feature_select_strategy", None))
    assert (cfg.text.head_dim, cfg.select_strategy, cfg.text.eos_token_id) == (32, "default", (2,))
    big = LlavaModelConfig.from_any(llava_1_5_7b_config())
    assert (big.text.head_dim, big.num_visual_tokens, big.vision_feature_layers) == (128, 576, (-2,))


# llava-hf/llava-1.5-7b-hf's config.json as published on the hub (transformers 4.36 wrote it): its
# text_config leaves hidden_size, heads and layers to LlamaConfig's defaults
HUB_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_hub_config_json_with_keys_left_to_transformers_defaults():
    from vtprune.model_configs import llava_1_5_7b_config

    assert LlavaModelConfig.from_any(HUB_7B) == LlavaModelConfig.from_any(llava_1_5_7b_config())


def test_defaults_are_those_of_the_installed_transformers():
    from transformers import CLIPVisionConfig, LlamaConfig

    from vtprune.engine.config import TEXT_DEFAULTS, VISION_DEFAULTS

    text, vision = LlamaConfig(), CLIPVisionConfig()
    theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", None))
    assert {k: theta if k == "rope_theta" else getattr(text, k) for k in TEXT_DEFAULTS} == TEXT_DEFAULTS
    assert {k: getattr(vision, k) for k in VISION_DEFAULTS} == VISION_DEFAULTS


# --------------------------------------------------------------------------- model directory files
def _copy(small_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(small_dir, out)
    return out


def _write(path, data: bytes):
    os.remove(path)
    path.write_bytes(data)


def _replace_with_dir(path):
    os.remove(path)
    os.mkdir(path)


def _replace_with_fifo(path):
    os.remove(path)
    os.mkfifo(path)


def _replace_with_loop(path):
    os.remove(path)
    os.symlink(path, path)


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _truncate(path):
    data = path.read_bytes()
    _write(path, data[: len(data) // 2])


def _bad_header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    _write(path, data[:8] + b"{" * n + data[8 + n:])


def _int_tensor(path):
    sd = load_file(str(path))
    key = sorted(sd)[0]
    sd[key] = sd[key].to(torch.int64)
    save_file(sd, str(path))


def _index(weight_map):
    def edit(d):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return edit


def _vocab_below_tokenizer(d):
    _edit_json(d / "config.json", lambda c: (c["text_config"].update(vocab_size=500), c.update(image_token_index=400)))


DIR_CASES = [
    ("config_not_utf8", lambda d: _write(d / "config.json", b'{"model_type": "\xff"}'),
     "config.json {d}/config.json: not UTF-8 text (byte 0xff on line 1)"),
    ("config_not_json", lambda d: _write(d / "config.json", b'{"model_type": '),
     "config.json {d}/config.json: not valid JSON (Expecting value at line 1, column 16)"),
    ("config_is_a_directory", lambda d: _replace_with_dir(d / "config.json"),
     "config.json {d}/config.json: is a directory"),
    ("config_symlink_loop", lambda d: _replace_with_loop(d / "config.json"),
     "config.json {d}/config.json: too many levels of symbolic links (a symlink loop)"),
    ("config_is_a_list", lambda d: _write(d / "config.json", b"[1]"),
     "config.json {d}/config.json: expected a LlavaConfig or a JSON object, got a list"),
    ("config_key_in_file", lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(
        num_attention_heads="32")),
     'config.json {d}/config.json: text_config.num_attention_heads must be a positive integer, got "32"'),
    ("generation_config_not_json", lambda d: _write(d / "generation_config.json", b"eos: 2"),
     "generation_config.json {d}/generation_config.json: not valid JSON (Expecting value at line 1, column 1)"),
    ("generation_config_eos_string", lambda d: _edit_json(d / "generation_config.json",
                                                          lambda c: c.update(eos_token_id="2")),
     'generation_config.json {d}/generation_config.json: eos_token_id must be a token id in [0, 512) or a list of '
     'them, got "2"'),
    ("tokenizer_config_not_utf8", lambda d: _write(d / "tokenizer_config.json", b'{\n"x": "\xfe"}'),
     "tokenizer_config.json {d}/tokenizer_config.json: not UTF-8 text (byte 0xfe on line 2)"),
    ("tokenizer_config_auto_map", lambda d: _edit_json(d / "tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})),
     "tokenizer_config.json {d}/tokenizer_config.json: 'auto_map' names custom code, which is never run"),
    ("tokenizer_json_fifo", lambda d: _replace_with_fifo(d / "tokenizer.json"),
     "tokenizer.json {d}/tokenizer.json: is a FIFO (named pipe), not a regular file"),
    ("processor_config_directory", lambda d: _replace_with_dir(d / "processor_config.json"),
     "processor_config.json {d}/processor_config.json: is a directory"),
    ("processor_crop_size", lambda d: _edit_json(d / "processor_config.json", lambda c: c["image_processor"].update(
        crop_size={"height": 42, "width": 42})),
     "{d}: the image processor makes images of shape [3, 42, 42], the vision tower needs [3, 84, 84]"),
    ("tokenizer_beyond_vocab", _vocab_below_tokenizer,
     "{d}: the tokenizer has 512 tokens, more than text_config.vocab_size (500) in config.json"),
    ("weights_directory", lambda d: _replace_with_dir(d / "model.safetensors"),
     "checkpoint file {d}/model.safetensors: is a directory"),
    ("weights_fifo", lambda d: _replace_with_fifo(d / "model.safetensors"),
     "checkpoint file {d}/model.safetensors: is a FIFO (named pipe), not a regular file"),
    ("weights_truncated", lambda d: _truncate(d / "model.safetensors"), "lies outside the file"),
    ("weights_empty", lambda d: _write(d / "model.safetensors", b""),
     "checkpoint file {d}/model.safetensors: cannot read it as safetensors (0 bytes, too short for a header)"),
    ("weights_bad_header", lambda d: _bad_header(d / "model.safetensors"),
     "checkpoint file {d}/model.safetensors: cannot read it as safetensors (its header is not JSON)"),
    ("weights_int_dtype", lambda d: _int_tensor(d / "model.safetensors"),
     "has dtype I64; weights must be floating point (F64, F32, F16, BF16)"),
    ("index_escapes_dir", _index({"lm_head.weight": "../../etc/x.safetensors"}),
     'safetensors index {d}/model.safetensors.index.json: shard name "../../etc/x.safetensors" leaves the model '
     'directory (refused)'),
    ("index_absolute_path", _index({"lm_head.weight": "/etc/x.safetensors"}),
     'shard name "/etc/x.safetensors" leaves the model directory (refused)'),
    ("index_not_safetensors", _index({"lm_head.weight": "pytorch_model.bin"}),
     'shard name "pytorch_model.bin" is not a .safetensors file (only safetensors are loaded)'),
    ("index_missing_shard", _index({"lm_head.weight": "model-00002-of-00002.safetensors"}),
     "checkpoint shard missing: {d}/model-00002-of-00002.safetensors"),
    ("index_weight_map_list", _index(["model.safetensors"]),
     'safetensors index {d}/model.safetensors.index.json: expected a non-empty "weight_map" object'),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in DIR_CASES], ids=[c[0] for c in DIR_CASES])
def test_model_directory_files_are_one_error_naming_the_file(small_dir, tmp_path, edit, message):
    d = _copy(small_dir, tmp_path)
    edit(d)
    with pytest.raises(CheckpointError) as e:
        LlavaEngine.from_pretrained(d)
    msg = str(e.value)
    assert message.format(d=d) in msg and "\n" not in msg, msg


def test_model_directory_that_is_a_symlink_loop(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(CheckpointError, match=r"model directory .*loop: too many levels of symbolic links"):
        LlavaEngine.from_pretrained(tmp_path / "loop")


@pytest.mark.skipif(not can_drop_privileges(), reason="needs a non-root user or setpriv")
@pytest.mark.parametrize("name,what", [("config.json", "config.json"), ("model.safetensors", "checkpoint file")])
def test_cli_unreadable_model_file_is_permission_denied(small_dir, tmp_path, name, what):
    d = _copy(small_dir, tmp_path)
    os.chmod(d / name, 0)
    make_image(0, 84, 84).save(tmp_path / "a.png")
    r = cli("generate", "--model", d, "--image", tmp_path / "a.png", "--prompt", "hi", unprivileged=True)
    assert_cli_error(r, f"{what} {d}/{name}: permission denied")


# --------------------------------------------------------------------------- pruning YAML
YAML_CASES = [
    ("policy: magic", "'policy' must be one of two_stage, fastv, pdrop, dart, visionzip, divprune, random, got \"magic\""),
    ("policy: fastv\nbudget: true", "'budget' must be a positive integer for policy 'fastv', got true"),
    ("policy: fastv\nbudget: '100'", "'budget' must be a positive integer for policy 'fastv', got \"100\""),
    ("policy: pdrop\nbudget: 0", "'budget' must be a positive integer for policy 'pdrop', got 0"),
    ("policy: random\nbudget: 100.0", "'budget' must be a positive integer for policy 'random', got 100.0"),
    ("budget: many", "'budget' must be a positive integer (or null), got \"many\""),
    ("merge_ratio: 1.5", "'merge_ratio' must be in (0, 1], got 1.5"),
    ("merge_ratio: .nan", "'merge_ratio' must be in (0, 1], got NaN"),
    ("merge_ratio: '0.5'", "'merge_ratio' must be in (0, 1], got \"0.5\""),
    ("target_merge_tokens: 0", "'target_merge_tokens' must be a positive integer, got 0"),
    ("pruning_layers: [true, 2, 3]", "'pruning_layers' must be a list of decoder layer indices (integers), got "
                                     "[true, 2, 3]"),
    ("pruning_layers: [10, 10, 31]", "'pruning_layers' must be strictly increasing (distinct layers, in order), "
                                     "got [10, 10, 31]"),
    ("pruning_layers: 10", "'pruning_layers' must be a list of decoder layer indices (integers), got 10"),
    ("layer_keep_tokens: [200, 150]", "'layer_keep_tokens' must be one positive integer per pruning layer (3), got "
                                      "[200, 150]"),
    ("layer_keep_tokens: [200, 250, 100]", "'layer_keep_tokens' must not increase from layer to layer, got "
                                           "[200, 250, 100]"),
    ("keep_threshold: 1.5", "'keep_threshold' must be in (0, 1), got 1.5"),
    ("keep_threshold: .nan", "'keep_threshold' must be in (0, 1), got NaN"),
    ("pruner_num_heads: 0", "'pruner_num_heads' must be a positive integer, got 0"),
    ("pruner_d_internal: 510", "'pruner_d_internal' must be a positive multiple of pruner_num_heads (4), got 510"),
    ("temperature: 0", "'temperature' must be a number > 0, got 0"),
    ("temperature: .nan", "'temperature' must be a number > 0, got NaN"),
    ("temperature_min: 2.0", "'temperature_min' must be in (0, temperature = 1], got 2.0"),
    ("temperature_anneal_rate: 1.5", "'temperature_anneal_rate' must be in (0, 1], got 1.5"),
    ("adv_loss_weight: .nan", "'adv_loss_weight' must be a number >= 0, got NaN"),
    ("task_loss_weight: .inf", "'task_loss_weight' must be a number >= 0, got Infinity"),
    ("merge_sparsity_weight: -1.0e-4", "'merge_sparsity_weight' must be a number >= 0, got -0.0001"),
    ("proportional_attention: 'yes'", "'proportional_attention' must be true or false, got \"yes\""),
    ("optimizers: [token_merger]", "'optimizers' must be a mapping (token_merger, layer_pruners, discriminator -> "
                                   "{lr: ...}), got a list"),
    ("optimizers: {generator: {lr: 1.0e-4}}", "'optimizers' has unknown entry \"generator\" (token_merger, "
                                               "layer_pruners, discriminator)"),
    ("optimizers: {1: {lr: 1.0e-4}}", "'optimizers' has unknown entry 1 (token_merger, layer_pruners, "
                                      "discriminator)"),
    ("optimizers: {token_merger: {lr: .nan}}", "'optimizers.token_merger.lr' must be a number > 0, got NaN"),
    ("optimizers: {token_merger: {lr: 0}}", "'optimizers.token_merger.lr' must be a number > 0, got 0"),
    ("optimizers: {token_merger: {lr: [1.0e-4]}}", "'optimizers.token_merger.lr' must be a number > 0, got "
                                                   "[0.0001]"),
    ("optimizers: {token_merger: 1.0e-4}", "'optimizers.token_merger' must be a mapping such as {lr: 1.0e-4}, got "
                                           "0.0001"),
    ("optimizers: {discriminator: {lr: 1.0e-4, weight_decay: 0.1}}",
     "'optimizers.discriminator' has unknown key \"weight_decay\" (only 'lr' is read)"),
    ("weights: 5", "'weights' must be the path of a .safetensors file (or null), got 5"),
    ("1: x", "key 1 is not a string (keys are names such as 'policy')"),
]


@pytest.mark.parametrize("text,message", YAML_CASES, ids=[t.split(":")[0] + "-" + str(i) for i, (t, _) in
                                                          enumerate(YAML_CASES)])
def test_pruning_yaml_values_are_checked_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text + "\n")
    with pytest.raises(VtpruneError) as e:
        PruningConfig.from_yaml(path)
    assert str(e.value) == f"pruning config {path}: {message}"


def test_pruning_yaml_numbers_pyyaml_reads_as_strings():
    """PyYAML reads 1e-4 as a string: such exponent strings are numbers, partial optimizers keep the
    other entries' defaults."""
    cfg = PruningConfig.from_dict(yaml.safe_load("merge_sparsity_weight: 1e-4\noptimizers: {token_merger: {lr: 3e-4}}"))
    assert cfg.merge_sparsity_weight == 1e-4
    assert cfg.optimizers == {"token_merger": {"lr": 3e-4}, "layer_pruners": {"lr": 2e-5},
                              "discriminator": {"lr": 5e-4}}


PRUNING_FILE_CASES = [
    ("top_level_list", b"- policy\n- fastv\n",
     "expected a mapping of keys (policy: ..., merge_ratio: ...), got a list"),
    ("top_level_scalar", b"42\n", "expected a mapping of keys (policy: ..., merge_ratio: ...), got an integer"),
    ("not_utf8", b"policy: two_stage\nmerger_type: \xff\n", "not UTF-8 text (byte 0xff on line 2)"),
    ("python_tag", b"policy: !!python/object/apply:os.system ['touch pwned']\n",
     "not valid YAML (could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("weights_missing", b"weights: heads.safetensors\n", "'weights': pruning weights {d}/heads.safetensors: not found"),
    ("weights_not_safetensors", b"weights: p.yaml\n", "'weights': pruning weights {d}/p.yaml: cannot read it as "
                                                       "safetensors"),
]


@pytest.mark.parametrize("data,message", [c[1:] for c in PRUNING_FILE_CASES], ids=[c[0] for c in PRUNING_FILE_CASES])
def test_pruning_yaml_files(tmp_path, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    with pytest.raises(VtpruneError) as e:
        PruningConfig.from_yaml(path)
    msg = str(e.value)
    assert msg.startswith(f"pruning config {path}: ") and message.format(d=tmp_path) in msg and "\n" not in msg, msg
    assert not (tmp_path / "pwned").exists()


def test_pruning_weights_shape_mismatch_is_named(tmp_path):
    from vtprune.pruning.modules import PruningModules
    from vtprune.pruning.weights import load_pruning_weights, save_pruning_weights

    cfg = PruningConfig.scaled_for(36, 4, pruner_d_internal=32)
    save_pruning_weights(PruningModules(cfg, 32, 64), str(tmp_path / "h.safetensors"))
    other = PruningModules(PruningConfig.scaled_for(36, 4, pruner_d_internal=16), 32, 64)
    with pytest.raises(CheckpointError) as e:
        load_pruning_weights(other, str(tmp_path / "h.safetensors"))
    assert str(e.value) == (f"pruning weights {tmp_path}/h.safetensors: tensor 'merger.importance.1.bias' has "
                            f"shape [32], expected [16] for this config")


# --------------------------------------------------------------------------- training settings
def _settings(tmp_path, **kw):
    from vtprune.training import TrainSettings

    base = dict(model=str(tmp_path / "model"), config=str(tmp_path / "cfg.yaml"), data=str(tmp_path / "d.jsonl"),
                out=str(tmp_path / "run"), progress=False)
    return TrainSettings(**{**base, **kw})


SETTINGS_CASES = [
    (dict(steps=0), "steps (--steps) must be a positive integer, got 0"),
    (dict(steps=True), "steps (--steps) must be a positive integer, got true"),
    (dict(epochs=float("nan")), "epochs (--epochs) must be a number > 0, got NaN"),
    (dict(epochs=float("inf")), "epochs (--epochs) must be a number > 0, got Infinity"),
    (dict(batch_size="4"), 'batch_size (--batch-size) must be a positive integer, got "4"'),
    (dict(save_every=0), "save_every (--save-every) must be a positive integer, got 0"),
    (dict(seed=2**64), "seed (--seed) must be at most 9223372036854775807, got 18446744073709551616"),
    (dict(seed=-1), "seed (--seed) must be an integer >= 0, got -1"),
    (dict(adv_loss="wasserstein"), "adv_loss (--adv-loss) must be one of 'non_saturating', 'hinge', got "
                                   "\"wasserstein\""),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a number >= 0 (0: no clipping), got NaN"),
]


@pytest.mark.parametrize("kw,message", SETTINGS_CASES, ids=[next(iter(k)) + "-" + str(i) for i, (k, _) in
                                                            enumerate(SETTINGS_CASES)])
def test_train_settings_are_checked_with_the_setting_named(tmp_path, kw, message):
    from vtprune.training import Trainer

    with pytest.raises(VtpruneError) as e:
        Trainer(_settings(tmp_path, **kw))
    assert str(e.value) == message


def test_huge_seed_gives_a_data_order(tmp_path):
    """The per-epoch order seeds torch with seed * 7777 + epoch modulo 2**63: the largest seed works."""
    from vtprune.training.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.settings, t.data = _settings(tmp_path, seed=2**63 - 1), list(range(5))
    assert sorted(t._perm(3).tolist()) == [0, 1, 2, 3, 4]


def _run_files(tmp_path):
    make_image(0, 90, 80).save(tmp_path / "img0.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "img0.png", "question": "Q?", "answer": "A."}) + "\n")
    with open(tmp_path / "cfg.yaml", "w") as f:
        yaml.safe_dump(PruningConfig.scaled_for(36, 4, pruner_d_internal=32).to_dict(), f)


RUN_CASES = [
    ("out_under_a_file", dict(out="d.jsonl/run"), False,
     "training run directory (--out) {d}/d.jsonl/run: a parent of it ({d}/d.jsonl) is a file, not a directory"),
    ("out_is_a_file", dict(out="d.jsonl"), False,
     "training run directory (--out) {d}/d.jsonl: exists and is not a directory"),
    ("resume_without_checkpoint", dict(), True,
     "--resume: no checkpoint in {d}/run (expected {d}/run/checkpoint/state.json)"),
    ("state_not_json", dict(state=b'{"step": 3,'), True,
     "training checkpoint {d}/run/checkpoint/state.json: not valid JSON (Expecting property name enclosed in "
     "double quotes at line 1, column 12)"),
    ("state_not_utf8", dict(state=b'{"step": "\xff"}'), False,
     "training checkpoint {d}/run/checkpoint/state.json: not UTF-8 text (byte 0xff on line 1)"),
    ("state_step_string", dict(state=b'{"step": "3", "settings": {}, "optimizers": {}}'), True,
     "training checkpoint {d}/run/checkpoint/state.json: 'step' must be an integer >= 0, got \"3\" (a corrupt "
     "checkpoint: restore it, or start a new run in another --out)"),
    ("state_optimizers_list", dict(state=b'{"step": 3, "settings": {}, "optimizers": []}'), True,
     "training checkpoint {d}/run/checkpoint/state.json: 'optimizers' must be a JSON object, got []"),
]


@pytest.mark.parametrize("kw,resume,message", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_train_run_directory_and_checkpoint_state(tmp_path, kw, resume, message):
    """Refused before the model loads (the model path here does not even exist)."""
    from vtprune.training import Trainer

    _run_files(tmp_path)
    kw = dict(kw)
    if "state" in kw:
        (tmp_path / "run" / "checkpoint").mkdir(parents=True)
        (tmp_path / "run" / "checkpoint" / "state.json").write_bytes(kw.pop("state"))
    if "out" in kw:
        kw["out"] = str(tmp_path / kw["out"])
    with pytest.raises(VtpruneError) as e:
        Trainer(_settings(tmp_path, steps=2, **kw), resume=resume)
    assert str(e.value).startswith(message.format(d=tmp_path)), str(e.value)


def _saved_checkpoint(tmp_path):
    from vtprune.pruning.modules import PruningModules
    from vtprune.training.checkpoint import save_checkpoint
    from vtprune.training.discriminator import Discriminator

    cfg = PruningConfig.scaled_for(36, 4, pruner_d_internal=16)

    def build():
        torch.manual_seed(0)
        m, disc = PruningModules(cfg, 32, 64), Discriminator(64, 2, d=8)
        opts = {"token_merger": torch.optim.AdamW(m.merger.parameters()),
                "layer_pruners": torch.optim.AdamW(m.pruners.parameters()),
                "discriminator": torch.optim.AdamW(disc.parameters())}
        return m, disc, opts

    m, disc, opts = build()
    for p in list(m.parameters()) + list(disc.parameters()):
        p.grad = torch.ones_like(p)
    for o in opts.values():
        o.step()
    save_checkpoint(str(tmp_path), 1, m, disc, opts, {"steps": 2})
    return build, opts


def _edit_tensors(path, fn):
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


CKPT_CASES = [
    ("optimizer_moment_shape", "optimizers.safetensors",
     lambda sd: sd.update({"discriminator.0.exp_avg": torch.zeros(3)}),
     "tensor 'discriminator.0.exp_avg' has shape [3], its parameter [64]"),
    ("optimizer_key_names_no_parameter", "optimizers.safetensors",
     lambda sd: sd.update({"token_merger.999.exp_avg": torch.zeros(1)}),
     "tensor 'token_merger.999.exp_avg' names no parameter of optimizer 'token_merger'"),
    ("optimizer_of_no_run", "optimizers.safetensors", lambda sd: sd.update({"generator.0.exp_avg": torch.zeros(1)}),
     "tensor 'generator.0.exp_avg' belongs to no optimizer of this run"),
    ("discriminator_shape", "discriminator.safetensors", lambda sd: sd.update({"mlp.3.bias": torch.zeros(2)}),
     "checkpoint discriminator {d}/checkpoint/discriminator.safetensors: tensor 'mlp.3.bias' has shape [2], "
     "expected [1] for this config"),
]


@pytest.mark.parametrize("file,edit,message", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES])
def test_corrupt_checkpoint_tensors_are_named(tmp_path, file, edit, message):
    from vtprune.training.checkpoint import load_checkpoint

    build, _ = _saved_checkpoint(tmp_path)
    _edit_tensors(tmp_path / "checkpoint" / file, edit)
    m, disc, opts = build()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path), m, disc, opts)
    assert message.format(d=tmp_path) in str(e.value), str(e.value)


def test_checkpoint_round_trip_restores_the_optimizers(tmp_path):
    from vtprune.training.checkpoint import load_checkpoint

    build, saved = _saved_checkpoint(tmp_path)
    m, disc, opts = build()
    assert load_checkpoint(str(tmp_path), m, disc, opts) == 1
    for name, opt in opts.items():
        want, got = saved[name].state_dict(), opt.state_dict()
        assert want["param_groups"] == got["param_groups"] and want["state"].keys() == got["state"].keys()
        for pid, fields in want["state"].items():
            assert fields.keys() == got["state"][pid].keys()
            assert all(torch.equal(fields[k], got["state"][pid][k]) for k in fields), (name, pid)


# --------------------------------------------------------------------------- security
SCANNED = ["vtprune", "benchmarks", "recipes", "main.py"]
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pandas"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
               "UnsafeLoader", "FullLoader"}
OWN_LOADERS = {"LlavaEngine", "cls"}  # vtprune's own from_pretrained: safetensors only (engine/weights.py)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[str]:
    """Every way the source could unpickle or run a model's code: torch.load, pickle-family imports,
    yaml.load & co. (anything but safe_load), np.load(allow_pickle=True), torch.hub, and a
    transformers from_pretrained without use_safetensors=True (model classes; transformers falls
    back to .bin pickles), local_files_only=True and trust_remote_code=False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in UNPICKLERS:
                found.append(f"{where}: from {mod} import")
            if mod in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from {mod} import load")
            if mod == "yaml" and any(a.name in UNSAFE_YAML for a in node.names):
                found.append(f"{where}: from yaml import an unsafe loader")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name in ("torch.load", "torch.serialization.load", "torch.hub.load",
                        "torch.hub.load_state_dict_from_url"):
                found.append(f"{where}: {name}")
            if name.startswith("yaml.") and node.attr in UNSAFE_YAML:
                found.append(f"{where}: {name}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") \
                    and _kw(node, "allow_pickle") is not False and any(k.arg == "allow_pickle" for k in node.keywords):
                found.append(f"{where}: {name}(allow_pickle=...)")
            if any(k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append(f"{where}: trust_remote_code not False")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                owner = _dotted(node.func.value).split(".")[-1]
                if owner in OWN_LOADERS:
                    continue
                if any(k.arg is None for k in node.keywords):
                    found.append(f"{where}: {owner}.from_pretrained(**kwargs) hides its options")
                    continue
                need = {"local_files_only": True, "trust_remote_code": False}
                if not re.search(r"Tokenizer|Processor|FeatureExtractor", owner):
                    need["use_safetensors"] = True
                for k, v in need.items():
                    if _kw(node, k) is not v:
                        found.append(f"{where}: {owner}.from_pretrained without {k}={v}")
    return found


def _scanned_files():
    for top in SCANNED:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield path
        for dirpath, _, files in os.walk(path):
            yield from (os.path.join(dirpath, f) for f in sorted(files) if f.endswith((".py", ".sh")))


def test_no_loader_can_unpickle_or_run_model_code():
    files = list(_scanned_files())
    assert len(files) > 30 and os.path.join(ROOT, "recipes", "train_base.py") in files
    found = []
    for path in files:
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, ROOT)
        if path.endswith(".sh"):  # inline python in scripts: a plain text check
            found += [f"{rel}: {m}" for m in re.findall(r"torch\.load|pickle|yaml\.(?:unsafe_|full_)?load\(", text)]
        else:
            found += unsafe_loads(text, rel)
    assert found == []


@pytest.mark.parametrize("snippet", [
    "import torch\nsd = torch.load('w.bin')",
    "from torch import load",
    "import pickle",
    "from joblib import load",
    "import yaml\nyaml.load(open('c.yaml'), Loader=yaml.Loader)",
    "import yaml\nyaml.full_load('x: 1')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "from transformers import LlavaForConditionalGeneration as M\nM.from_pretrained(p)",
    "M.from_pretrained(p, local_files_only=True, trust_remote_code=False)",
    "AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=True)",
    "AutoModel.from_pretrained(p, **kw)",
])
def test_the_static_check_finds_unsafe_loads(snippet):
    assert unsafe_loads(snippet), snippet


def test_the_static_check_passes_safe_loads():
    safe = ("import yaml\nyaml.safe_load('x: 1')\nimport numpy as np\nnp.load('a.npy')\n"
            "M.from_pretrained(p, use_safetensors=True, local_files_only=True, trust_remote_code=False)\n"
            "AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)\n"
            "LlavaEngine.from_pretrained(p)\n")
    assert unsafe_loads(safe) == []


class _Payload:
    """Unpickling this writes a file: proof that something unpickled the model."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only_dir(tmp_path):
    d = tmp_path / "bin_model"
    d.mkdir()
    shutil.copy(os.path.join(ASSET, "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(tmp_path / "unpickled"))))
    return d


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a loader reached the unpickler")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_train_base_init_from_refuses_a_pickle_only_directory(tmp_path, no_unpickling):
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    from train_base import load_init_model

    d = _pickle_only_dir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_init_model(str(d))
    assert str(e.value) == (f"no model*.safetensors files in {d} (found pickle files, which are never loaded: "
                            f"convert them to safetensors)")
    assert not (tmp_path / "unpickled").exists()


def test_transformers_is_called_so_that_it_cannot_fall_back_to_pickles(tmp_path, no_unpickling):
    """The options load_init_model passes make transformers itself refuse the .bin (without
    use_safetensors=True it would reach torch.load: the `no_unpickling` guard would fire)."""
    from transformers import LlavaForConditionalGeneration

    d = _pickle_only_dir(tmp_path)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        LlavaForConditionalGeneration.from_pretrained(str(d), use_safetensors=True, local_files_only=True,
                                                      trust_remote_code=False)
    with pytest.raises(AssertionError, match="unpickler"):  # the guard is real: the old call reached it
        LlavaForConditionalGeneration.from_pretrained(str(d), local_files_only=True)
    assert not (tmp_path / "unpickled").exists()


def test_engine_refuses_a_pickle_only_directory(tmp_path, no_unpickling):
    d = _pickle_only_dir(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(os.path.join(ASSET, f), d / f)
    with pytest.raises(CheckpointError, match="no model.*safetensors files in .*found pickle files"):
        LlavaEngine.from_pretrained(d)
    assert not (tmp_path / "unpickled").exists()


# --------------------------------------------------------------------------- command lines
def test_cli_bad_config_json_and_bad_yaml_are_one_line(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path)
    _edit_json(d / "config.json", lambda c: c["text_config"].update(num_attention_heads=True))
    make_image(0, 84, 84).save(tmp_path / "a.png")
    r = cli("generate", "--model", d, "--image", tmp_path / "a.png", "--prompt", "hi")
    assert_cli_error(r, f"config.json {d}/config.json: text_config.num_attention_heads must be a positive integer, "
                        f"got true")
    _run_files(tmp_path)
    (tmp_path / "bad.yaml").write_text("optimizers: {token_merger: {lr: .nan}}\n")
    r = cli("train", "--model", small_dir, "--config", tmp_path / "bad.yaml", "--data", tmp_path / "d.jsonl",
            "--out", tmp_path / "run", "--no-progress")
    assert_cli_error(r, f"pruning config {tmp_path}/bad.yaml: 'optimizers.token_merger.lr' must be a number > 0, "
                        f"got NaN")
    assert not (tmp_path / "run").exists()


def test_cli_train_base_init_from_pickles_is_one_line(tmp_path):
    d = _pickle_only_dir(tmp_path)
    r = run([sys.executable, os.path.join(ROOT, "recipes", "train_base.py"), "--out", str(tmp_path / "out"), "--init-from", str(d),
             "--steps-a", "0"])
    assert_cli_error(r, f"train_base: error: no model*.safetensors files in {d} (found pickle files")
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out").exists()
