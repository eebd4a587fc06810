"""In-flight batching (engine/scheduler.py): per-row KV cache rows, greedy answers equal to the
static batch and to one-at-a-time generation, the pruning-aware row budget."""
import os

import pytest
import torch
from conftest import make_image

from vtprune.engine.kv_cache import KVCache, layout, row_bytes
from vtprune.engine.scheduler import rows_for_budget

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vtprune", "assets",
                     "synthvqa-llava")


def test_per_row_steps_and_inserted_rows():
    c = KVCache(3, 2, 1, 2, prompt_capacity=4, max_new_tokens=3, dtype=torch.float32, device="cpu")
    src = KVCache(2, 2, 1, 2, prompt_capacity=3, max_new_tokens=0, dtype=torch.float32, device="cpu")
    for layer in range(2):
        src.write_prefill(layer, torch.full((2, 1, 3, 2), 7.0 + layer), torch.full((2, 1, 3, 2), -1.0))
    src.set_lengths(torch.tensor([3, 1]))
    c.set_lengths(torch.tensor([4, 4, 4]))
    c.insert_rows(torch.tensor([2, 0]), src)  # src row 0 -> row 2, src row 1 -> row 0
    assert c.lengths[0].tolist() == [1, 4, 3]
    assert c.k[1][2, 0, :3].eq(8.0).all() and c.k[1][0, 0, :3].eq(8.0).all() and c.k[1][1].eq(0).all()
    m = c.decode_masks(torch.tensor([0, 2, 1]))[0][:, 0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 0]]
    k = torch.arange(6, dtype=torch.float32).view(3, 1, 1, 2)
    keys, _ = c.write_decode(0, torch.tensor([0, 2, 1]), k, k)
    assert keys[0, 0, 4].tolist() == [0, 1] and keys[1, 0, 6].tolist() == [2, 3] and keys[2, 0, 5].tolist() == [4, 5]
    with pytest.raises(ValueError, match="prompt slots"):
        KVCache(1, 2, 1, 2, 2, 3, torch.float32, "cpu").insert_rows(torch.tensor([0]), src.__class__(
            1, 2, 1, 2, 3, 0, torch.float32, "cpu"))


def _engine_requests(n, seed=0):
    ims = [make_image(seed + i % 3, 60, 60) for i in range(n)]
    prompts = [f"USER: <image>\nWhat is it?{' really' * (i % 4)} ASSISTANT:" for i in range(n)]
    return ims, prompts


def test_tiny_model_inflight_equals_static_and_alone(small_engine, monkeypatch):
    """Rows end at different steps (an EOS id the random model often writes) and are refilled:
    every request's ids equal the static batch's and its own alone."""
    ims, prompts = _engine_requests(9)
    static = small_engine.generate(ims, prompts, max_new_tokens=10)
    common = max({t for r in static for t in r.token_ids[1:]}, key=lambda t: sum(t in r.token_ids for r in static))
    monkeypatch.setattr(small_engine, "eos_token_ids", (common,))
    static = small_engine.generate(ims, prompts, max_new_tokens=10)
    alone = [small_engine.generate([im], [p], max_new_tokens=10)[0] for im, p in zip(ims, prompts)]
    sched = small_engine.inflight(max_new_tokens=10, prefill_batch=2, max_rows=3)
    from vtprune.engine.scheduler import Item

    items = [Item(i, im, p, len(small_engine.prompts.encode(p))) for i, (im, p) in enumerate(zip(ims, prompts))]
    got = {k: ids for k, ids, _ in sched.run(items)}
    lengths = {len(r.token_ids) for r in static}
    assert len(lengths) > 1  # a mix of short and long rows
    assert [got[i] for i in range(9)] == [r.token_ids for r in static] == [r.token_ids for r in alone]
    assert sched.rows == 3 and max(n for _, n in sched.rows_in_flight) == 3
    # 9 requests through 3 rows: decode steps are fewer than three static batches of 3 would take
    static_steps = sum(max(len(static[j].token_ids) for j in range(i, i + 3)) - 1 for i in range(0, 9, 3))
    assert len(sched.rows_in_flight) <= static_steps


def _synthvqa(n_images):
    from vtprune.engine.inputs import format_prompt
    from vtprune.quality.synthvqa import sample

    ims, prompts = [], []
    for i in range(n_images):
        img, _, qs, _ = sample(5, i)
        for q in qs[:2]:
            ims.append(img)
            prompts.append(format_prompt(q["question"]))
        ims.append(img)
        prompts.append(format_prompt("Describe the image."))
    return ims, prompts


@pytest.fixture(scope="module")
def embedded():
    from vtprune import LlavaEngine

    if not os.path.isfile(os.path.join(ASSET, "model.safetensors")):
        pytest.skip("the embedded SynthVQA model is not in this checkout")
    return LlavaEngine.from_pretrained(ASSET, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("pruning", [None, "pruning_201.yaml"])
def test_embedded_model_answers_and_captions_equal_static_and_alone(embedded, pruning, monkeypatch):
    # the merge and top-k through their PyTorch references, not Triton's interpreter (3 minutes
    # instead of seconds; the kernels' own tests compare the two): this test is about scheduling
    monkeypatch.setattr("vtprune.kernels._triton.INTERPRET", False)
    embedded.set_pruning(None if pruning is None else os.path.join(ASSET, pruning))
    try:
        ims, prompts = _synthvqa(3)
        static = embedded.generate(ims, prompts, max_new_tokens=40)
        inflight = embedded.generate_inflight(ims, prompts, max_new_tokens=40, prefill_batch=3, max_rows=4)
        alone = [embedded.generate([im], [p], max_new_tokens=40)[0] for im, p in zip(ims[:3], prompts[:3])]
    finally:
        embedded.set_pruning(None)
    n = [len(r.token_ids) for r in static]
    assert min(n) <= 3 and max(n) >= 15  # one-word answers and captions
    assert [r.token_ids for r in inflight] == [r.token_ids for r in static]
    assert [r.text for r in inflight] == [r.text for r in static]
    assert [r.token_ids for r in alone] == [r.token_ids for r in static[:3]]
    assert [r.stats["tokens_per_layer"] for r in inflight] == [r.stats["tokens_per_layer"] for r in static]
    per_layer = inflight[0].stats["tokens_per_layer"]
    assert (per_layer[-1] < per_layer[0]) == (pruning is not None)  # the pruned prefill did run


def test_row_bytes_is_what_a_cache_row_allocates_and_pruning_admits_more_rows(embedded):
    from vtprune.pruning import PruningConfig, build_plan

    cfg, T, N = embedded.cfg, 600, 32
    plan = build_plan(PruningConfig.load(os.path.join(ASSET, "pruning_201.yaml")), embedded.model, "cpu",
                      torch.float32)
    T2 = T - cfg.num_visual_tokens + plan.visual_in_sequence  # the same prompt after the merge
    t = cfg.text
    for p, n in ((None, T), (plan, T2)):
        P, D = layout(p, n, N, t.num_layers)
        cache = KVCache(3, t.num_layers, t.num_kv_heads, t.head_dim, P, D, torch.float32, "cpu",
                        segments=[d.layer for d in p.drop_points] if p else None, key_bias=p is not None)
        allocated = sum(x.numel() * 4 for x in cache.k + cache.v)
        allocated += sum(cache.key_bias[i].numel() * 4 for i in cache.segment_starts if cache.key_bias[i] is not None)
        assert row_bytes(p, n, N, t, torch.float32, rounded=True) * 3 == allocated
    full, pruned = row_bytes(None, T, N, t, torch.float32), row_bytes(plan, T2, N, t, torch.float32)
    # exact: per layer (capacity + N) x 2 x heads x dim x 4 bytes (+ the merged tokens' key biases)
    caps = plan.capacities(T2)
    bias = sum(caps[i] + N for i in {0, *(d.layer for d in plan.drop_points)}) * 4
    assert pruned == sum(c + N for c in caps) * 2 * t.num_kv_heads * t.head_dim * 4 + bias
    assert full == t.num_layers * (T + N) * 2 * t.num_kv_heads * t.head_dim * 4
    budget = 8 * full
    assert rows_for_budget(budget, full, 1000) == 8
    assert rows_for_budget(budget, pruned, 1000) >= 2 * 8  # a two-stage row holds well under half


def test_the_scheduler_runs_more_rows_of_a_pruned_engine_in_one_budget(embedded):
    budget_gb = 0.05
    T, N = 600, 32
    try:
        full = embedded.inflight(max_new_tokens=N, max_rows=1000, kv_budget_gb=budget_gb)
        rows_full = full.rows_for(T)
        embedded.set_pruning(os.path.join(ASSET, "pruning_201.yaml"))
        pruned = embedded.inflight(max_new_tokens=N, max_rows=1000, kv_budget_gb=budget_gb)
        T2 = T - embedded.cfg.num_visual_tokens + embedded.plan.visual_in_sequence
        rows_pruned = pruned.rows_for(T2)
        per_row = row_bytes(embedded.plan, T2, N, embedded.cfg.text, torch.float32, rounded=True)
    finally:
        embedded.set_pruning(None)
    per_row_full = row_bytes(None, T, N, embedded.cfg.text, torch.float32, rounded=True)
    assert rows_full == int(budget_gb * (1 << 30)) // per_row_full
    assert rows_pruned == int(budget_gb * (1 << 30)) // per_row
    assert rows_pruned > 2 * rows_full


@pytest.mark.parametrize("kw, message", [
    ({"kv_budget_gb": 0}, "--kv-budget-gb must be a number of GB > 0, got 0"),
    ({"kv_budget_gb": float("nan")}, "--kv-budget-gb must be a number of GB > 0, got nan"),
    ({"max_rows": 0}, "--max-rows 0: the number of decode rows must be an integer >= 1"),
    ({"scheduler": "dynamic"}, "--scheduler 'dynamic': use one of inflight, static"),
])
def test_bad_scheduler_settings_are_refused_before_anything_runs(small_engine, kw, message):
    from vtprune.batch import answer_requests
    from vtprune.errors import VtpruneError

    with pytest.raises(VtpruneError) as e:
        answer_requests(small_engine, [], **kw)
    assert str(e.value) == message


def test_a_longer_prompt_waits_for_the_rows_to_drain_and_a_larger_cache(small_engine):
    """A lookahead of one: every longer prompt than the cache holds rebuilds it once the rows are
    done; the answers stay those of the static path."""
    from vtprune.engine.scheduler import Item

    ims, prompts = _engine_requests(6, seed=4)
    prompts = [p.replace("What", "What" + " long" * (3 * i)) for i, p in enumerate(prompts)]  # ascending
    static = small_engine.generate(ims, prompts, max_new_tokens=5)
    sched = small_engine.inflight(max_new_tokens=5, prefill_batch=2, max_rows=2)
    sched.lookahead = 1
    builds = []
    real = sched._build
    sched._build = lambda n: (builds.append(n), real(n))
    items = [Item(i, im, p, len(small_engine.prompts.encode(p))) for i, (im, p) in enumerate(zip(ims, prompts))]
    got = {k: ids for k, ids, _ in sched.run(items)}
    assert [got[i] for i in range(6)] == [r.token_ids for r in static]
    assert builds == sorted(set(builds)) and len(builds) >= 3  # grown, never shrunk, several times
    assert sched.capacity == max(it.tokens for it in items)


def test_stop_strings_end_rows_as_in_the_static_path(small_engine):
    ims, prompts = _engine_requests(6, seed=7)
    free = small_engine.generate(ims, prompts, max_new_tokens=8)
    # a stop string some rows write part way (the text of one of the first row's later tokens)
    stop = next(t for t in (small_engine.prompts.decode([i]).strip() for i in free[0].token_ids[2:]) if t)
    static = small_engine.generate(ims, prompts, max_new_tokens=8, stop=stop)
    inflight = small_engine.generate_inflight(ims, prompts, max_new_tokens=8, stop=stop, prefill_batch=2, max_rows=2)
    assert any(len(r.token_ids) < 8 for r in static)
    assert [(r.token_ids, r.text) for r in inflight] == [(r.token_ids, r.text) for r in static]


def test_sampling_in_flight_is_reproducible_by_seed(small_engine):
    ims, prompts = _engine_requests(4, seed=9)
    kw = dict(max_new_tokens=6, temperature=1.5, prefill_batch=2, max_rows=2)
    a = small_engine.generate_inflight(ims, prompts, seed=3, **kw)
    b = small_engine.generate_inflight(ims, prompts, seed=3, **kw)
    c = small_engine.generate_inflight(ims, prompts, seed=4, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    assert all(len(r.token_ids) == 6 for r in a)


def test_per_request_caps_end_rows_at_their_own_length(small_engine, monkeypatch):
    """generate_inflight with one max_new_tokens per prompt: each answer is the prefix of the
    uncapped greedy answer at its own cap, and the rows freed early are refilled."""
    monkeypatch.setattr(small_engine, "eos_token_ids", ())  # every row runs to its cap
    ims, prompts = _engine_requests(7, seed=4)
    caps = [1, 9, 2, 3, 9, 1, 5]
    full = small_engine.generate(ims, prompts, max_new_tokens=9)
    got = small_engine.generate_inflight(ims, prompts, max_new_tokens=caps, prefill_batch=2, max_rows=3)
    assert [r.token_ids for r in got] == [f.token_ids[:c] for f, c in zip(full, caps)]
    from vtprune import VtpruneError
    with pytest.raises(VtpruneError, match="max_new_tokens: 2 values for 7 prompts"):
        small_engine.generate_inflight(ims, prompts, max_new_tokens=[1, 2])
    with pytest.raises(VtpruneError, match="max_new_tokens"):
        small_engine.generate_inflight(ims, prompts, max_new_tokens=[1, 2, 3, 0, 1, 1, 1])
