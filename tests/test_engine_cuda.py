"""The engine on a GPU: CUDA-graph decode against eager decode and against the CPU engine.
Skipped where no GPU is visible."""
import pytest
import torch
from conftest import make_image

from vtprune import LlavaEngine, format_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
PROMPTS = [format_prompt("What is in the image?"), format_prompt("Describe the picture in one sentence, please.")]


def test_cuda_fp32_matches_cpu_and_graph_matches_eager(tiny_dir, engine):
    gpu = LlavaEngine.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32)
    ims = [make_image(1), make_image(2)]
    torch.testing.assert_close(gpu.next_token_logits(ims, PROMPTS).cpu(), engine.next_token_logits(ims, PROMPTS),
                               atol=1e-3, rtol=1e-4)
    cpu_ids = [r.token_ids for r in engine.generate(ims, PROMPTS, max_new_tokens=24)]
    graph = [r.token_ids for r in gpu.generate(ims, PROMPTS, max_new_tokens=24)]
    eager = [r.token_ids for r in gpu.generate(ims, PROMPTS, max_new_tokens=24, use_cuda_graph=False)]
    assert graph == eager == cpu_ids
    again = [r.token_ids for r in gpu.generate(ims, PROMPTS, max_new_tokens=24)]  # replay of the kept graph
    assert again == graph


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_graph_equals_eager(tiny_dir, dtype):
    gpu = LlavaEngine.from_pretrained(tiny_dir, device="cuda", dtype=dtype)
    ims = [make_image(3), make_image(4)]
    graph = [r.token_ids for r in gpu.generate(ims, PROMPTS, max_new_tokens=20)]
    eager = [r.token_ids for r in gpu.generate(ims, PROMPTS, max_new_tokens=20, use_cuda_graph=False)]
    assert graph == eager
    sampled = [gpu.generate(ims, PROMPTS, max_new_tokens=10, temperature=0.8, seed=1)[0].token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("cfg", [
    dict(target_merge_tokens=288, pruning_layers=[1, 2, 3], layer_keep_tokens=[200, 150, 100], pruner_d_internal=64),
    dict(target_merge_tokens=288, pruning_layers=[1, 2, 3], layer_keep_tokens=[200, 150, 100], pruner_d_internal=64,
         keep_mode="threshold"),
    dict(policy="fastv", budget=400),
    dict(policy="pdrop", budget=200),
    dict(policy="visionzip", budget=64),
])
def test_pruned_graph_equals_eager_and_cpu(tiny_dir, cfg):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu = LlavaEngine.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32, pruning=cfg)
        cpu = LlavaEngine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, pruning=cfg)
    if gpu.plan.modules is not None:  # same head weights on both
        cpu.plan.modules.load_state_dict({k: v.cpu() for k, v in gpu.plan.modules.state_dict().items()})
    ims = [make_image(5), make_image(6)]
    graph = gpu.generate(ims, PROMPTS, max_new_tokens=16)
    eager = gpu.generate(ims, PROMPTS, max_new_tokens=16, use_cuda_graph=False)
    assert [r.token_ids for r in graph] == [r.token_ids for r in eager]
    assert [r.stats["visual_tokens_per_layer"] for r in graph] == [r.stats["visual_tokens_per_layer"] for r in eager]
    if cfg.get("keep_mode") != "threshold":  # threshold decisions may flip on float noise
        assert [r.token_ids for r in graph] == [r.token_ids for r in cpu.generate(ims, PROMPTS, max_new_tokens=16)]


def test_shared_prefix_on_gpu(tiny_dir, engine):
    gpu = LlavaEngine.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32)
    im = make_image(7)
    prompts = PROMPTS + [format_prompt("Is it red?")]
    shared = [r.token_ids for r in gpu.generate([im, im, im], prompts, max_new_tokens=12)]
    assert shared == [r.token_ids for r in engine.generate([im, im, im], prompts, max_new_tokens=12)]
