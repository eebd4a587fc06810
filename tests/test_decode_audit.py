"""The decode step's audit (benchmarks/audit_decode.py): kernel launches, host syncs and shape
stability of one step, on the 7B architecture (meta tensors) and the tiny model (real values),
and the optional torch.compile'd step (same tokens as eager)."""
import os
import sys

import pytest
import torch

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import audit_decode as A  # noqa: E402


@pytest.fixture(scope="module")
def model_7b():
    from vtprune.model_configs import llava_1_5_7b_config

    return A.build_vtprune(llava_1_5_7b_config(), "meta", torch.bfloat16)


# Per decoder layer: two RMSNorms of 8 ops each (cast to fp32, pow, mean, + eps, rsqrt, mul, cast
# back, * weight: transformers' exact sequence), the fused QKV matmul, RoPE on queries and keys at
# once (x * cos, roll, * sin_signed, +), two index_copy_ into the cache, SDPA, o_proj, residual,
# the fused gate/up matmul, SiLU, *, down_proj, residual: 31. Per step: embedding, positions add,
# the RoPE table gather, the final norm (8) and lm_head: 12, plus the decode masks: 2 per cache
# segment (<=, | or masked_fill). Before the audit's fixes the same step launched 1337 (unpruned)
# and 1357 (two-stage) kernels; transformers' launches 1304.
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("two_stage", [False, True])
def test_7b_decode_step_kernels_syncs_and_shapes(model_7b, batch, two_stage):
    rep = A.audit_steps(*A.vtprune_step(model_7b, batch, two_stage))
    segments = 4 if two_stage else 1  # the design's drops at layers 10, 20, 31
    assert rep["kernels"] == 31 * 32 + 12 + 2 * segments
    assert rep["by_category"]["matmul"] == 2 * 32 + 2 * 32 + 1  # qkv, o, gate_up, down per layer; lm_head
    assert rep["by_category"]["attention"] == 32
    assert rep["syncs"] == []
    assert rep["stable"]


def test_transformers_step_launches_more_and_syncs():
    """On the same (tiny, meta) architecture transformers' step launches more kernels, asks the
    host (its mask code calls bool() on a tensor) and grows its tensors every step."""
    from vtprune.tiny_model import tiny_llava_config

    config = tiny_llava_config()
    ours = A.audit_steps(*A.vtprune_step(A.build_vtprune(config, "meta", torch.bfloat16), 1, False))
    prepare, step, _ = A.transformers_step(config, 1, "meta", torch.bfloat16)
    theirs = A.audit_steps(prepare, step)
    L = config.text_config.num_hidden_layers
    assert ours["kernels"] == 31 * L + 14
    assert theirs["kernels"] > ours["kernels"] + 8 * L  # 3 unfused projections, 2 rotate_half cats + negs
    assert "is_nonzero" in theirs["syncs"] and not theirs["stable"]


def test_tiny_engine_real_values_no_sync_same_shapes(small_engine):
    """Real CPU tensors after a real prefill: no sync inside the step, the same ops and shapes at
    steps 0, 1 and 5; fp32 makes RMSNorm's casts no-ops (4 per layer, 2 in the final norm)."""
    from vtprune.engine.generate import decode_step

    e = small_engine
    batch = e.prepare([make_image(1), make_image(2)], ["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\nHi ASSISTANT:"],
                      8)
    e.release_cache()  # a cache an earlier test made under inference_mode cannot be written here
    cache, _ = e._decoder_state(batch, 8, use_cuda_graph=False)
    e._prefill(batch, cache)
    base = e._decode_state[3]
    step = torch.zeros(1, dtype=torch.long)
    tokens = torch.tensor([5, 7])
    try:
        rep = A.audit_steps(lambda s: step.fill_(s), lambda: decode_step(e.model, cache, tokens, step, base))
    finally:
        e.release_cache()  # the audit's attention stub wrote zeros' consequences into this cache
    L = e.cfg.text.num_layers
    assert rep["syncs"] == [] and rep["stable"]
    assert rep["kernels"] == 27 * L + 10 + 2


def test_audit_sees_syncs_and_changing_shapes():
    n = {"i": 0}
    x = torch.arange(6.0)

    def prepare(s):
        n["i"] = s

    def step():
        y = x[: 3 + n["i"]] * 2  # a shape that changes with the step
        return y.sum().item(), torch.nonzero(y > 2)
    rep = A.audit_steps(prepare, step, stub_attention=False)
    assert rep["syncs"] == ["item", "nonzero"]
    assert not rep["stable"]
    assert rep["by_op"] == {"mul.Tensor": 1, "sum": 1, "gt.Scalar": 1}


def test_rope_table_lookup_equals_the_formula(small_engine):
    rot = small_engine.model.decoder.rotary
    pos = torch.tensor([[0, 1, 575, 620], [3, 4, 5, 6]])
    table, direct = rot.lookup(pos, torch.float32), rot(pos, torch.float32)
    for a, b in zip(table, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # the same formula, another shape
    assert small_engine.model.decoder.layers[0].self_attn.qkv_weight is not None  # fused at load
    assert not hasattr(small_engine.model.decoder.layers[0].self_attn, "q_proj")


def test_compiled_decode_gives_the_eager_tokens(small_engine):
    images, prompts = [make_image(1), make_image(2)], ["USER: <image>\nWhat is this? ASSISTANT:",
                                                       "USER: <image>\nDescribe the picture in detail. ASSISTANT:"]
    eager = small_engine.generate(images, prompts, max_new_tokens=10)
    small_engine.compile_decode = True
    try:
        compiled = small_engine.generate(images, prompts, max_new_tokens=10)
    finally:
        small_engine.compile_decode = False
        small_engine.release_cache()
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert len(set(eager[0].token_ids)) > 3
