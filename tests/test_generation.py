"""Decoding-loop behaviour: sampling, stopping, cache reuse, stats."""
import pytest
import torch
from conftest import make_image

from vtprune import format_prompt
from vtprune.engine.sampling import sample_next

P = format_prompt("Describe the picture in one sentence.")


def test_seeded_sampling_is_reproducible_and_seed_dependent(small_engine):
    ims, ps = [make_image(1), make_image(2)], [P, P]
    a = small_engine.generate(ims, ps, max_new_tokens=16, temperature=1.0, seed=123)
    b = small_engine.generate(ims, ps, max_new_tokens=16, temperature=1.0, seed=123)
    c = small_engine.generate(ims, ps, max_new_tokens=16, temperature=1.0, seed=124)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = small_engine.generate(ims, ps, max_new_tokens=16)
    tiny_p = small_engine.generate(ims, ps, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5)
    assert [r.token_ids for r in tiny_p] == [r.token_ids for r in greedy]  # top_p -> 0 keeps only the argmax


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.7, g) for _ in range(2000)])
    counts = torch.bincount(draws.flatten(), minlength=4).float() / 2000
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.7: only the first two survive
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.05
    draws = torch.stack([sample_next(logits, 1.0, 0.85, g) for _ in range(500)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_eos_ends_a_row_and_is_kept_in_token_ids(small_engine):
    im = make_image(3)
    full = small_engine.generate([im], [P], max_new_tokens=12)[0].token_ids
    k = next(j for j in range(3, 12) if full[j] not in full[:j])  # first occurrence at j
    saved = small_engine.eos_token_ids
    small_engine.eos_token_ids = (full[k],)
    try:
        out = small_engine.generate([im, make_image(4)], [P, P], max_new_tokens=12)
    finally:
        small_engine.eos_token_ids = saved
    assert out[0].token_ids == full[: k + 1]
    assert out[0].stats["generated_tokens"] == k + 1


def test_stop_string_cuts_text_and_tokens(small_engine):
    im = make_image(5)
    full = small_engine.generate([im], [P], max_new_tokens=16)[0]
    text = small_engine.prompts.decode(full.token_ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip() and text.index(stop) > 0
    out = small_engine.generate([im], [P], max_new_tokens=16, stop=[stop])[0]
    assert out.text == text[: text.index(stop)].strip()
    assert stop in small_engine.prompts.decode(out.token_ids)
    assert stop not in small_engine.prompts.decode(out.token_ids[:-1])
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_max_new_tokens_one_and_cache_reuse_across_shapes(small_engine):
    im = make_image(6)
    one = small_engine.generate([im], [P], max_new_tokens=1)[0]
    assert len(one.token_ids) == 1 and one.stats["decode_s"] >= 0
    a = small_engine.generate([im], [P], max_new_tokens=10)[0].token_ids
    small_engine.generate([im] * 3, [format_prompt("Hi")] * 3, max_new_tokens=100)  # another cache shape
    b = small_engine.generate([im], [P], max_new_tokens=10)[0].token_ids
    assert a == b and a[0] == one.token_ids[0]


def test_stats_fields(small_engine):
    r = small_engine.generate([make_image(7)], [P], max_new_tokens=4)[0]
    assert set(r.stats) >= {"prompt_tokens", "visual_tokens", "generated_tokens", "time_to_first_token_s", "decode_s"}
    assert r.stats["prompt_tokens"] == len(small_engine.prompts.encode(P))
    assert r.stats["visual_tokens"] == 36


def test_image_paths_and_single_prompt(small_engine, tmp_path):
    im = make_image(8)
    im.save(tmp_path / "a.png")
    by_path = small_engine.generate(str(tmp_path / "a.png"), P, max_new_tokens=6)
    by_pil = small_engine.generate([im], [P], max_new_tokens=6)
    assert by_path[0].token_ids == by_pil[0].token_ids


def test_kv_cache_masks():
    from vtprune.engine.kv_cache import KVCache

    c = KVCache(2, 3, 1, 4, prompt_capacity=5, max_new_tokens=3, dtype=torch.float32, device="cpu", segments=[2])
    tensors = list(c.lengths)
    c.set_lengths(torch.tensor([2, 5]))
    m = c.decode_masks(torch.tensor([1]))
    assert len(m) == 3 and m[0] is m[1] and m[0] is not m[2]  # one mask per segment
    assert m[0][:, 0, 0].int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
    assert torch.equal(m[0], m[2])
    c.set_lengths(torch.tensor([1, 1]), layers=[2])  # e.g. a pruned layer holds fewer tokens
    m = c.decode_masks(torch.tensor([0]))
    assert m[0][0, 0, 0, :3].tolist() == [True, True, False]
    assert m[2][1, 0, 0, :3].tolist() == [True, False, False]
    assert all(a is b for a, b in zip(tensors, c.lengths))  # written in place: a CUDA graph keeps seeing them
    with pytest.raises(ValueError, match="do not start a cache segment"):
        c.set_lengths(torch.tensor([1, 1]), layers=[1, 2])
    with pytest.raises(ValueError, match="prompt capacity"):
        c.write_prefill(0, torch.zeros(2, 1, 6, 4), torch.zeros(2, 1, 6, 4))


def test_prompts_about_one_image_share_its_vision_pass(small_engine, monkeypatch, tmp_path):
    im = make_image(11)
    im.save(tmp_path / "a.png")
    other = make_image(12)
    prompts = [P, format_prompt("What colour?"), format_prompt("How many?"), P]
    images = [im, im, str(tmp_path / "a.png"), other]
    batch = small_engine.prepare(images, prompts)
    assert batch.pixel_values.shape[0] == 3 and batch.image_index.tolist() == [0, 0, 1, 2]
    seen = []
    real = small_engine.model.vision.forward
    monkeypatch.setattr(small_engine.model.vision, "forward", lambda px, probe=None: seen.append(px.shape[0]) or
                        real(px, probe))
    shared = small_engine.generate(images, prompts, max_new_tokens=6)
    assert seen == [3]
    monkeypatch.undo()
    for i, r in enumerate(shared):
        assert r.token_ids == small_engine.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].token_ids
