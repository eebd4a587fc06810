"""Two-stage pruning and the baseline policies inside the engine (small model: 36 visual tokens,
4 decoder layers; kernels under the Triton interpreter without a GPU)."""
import warnings

import pytest
import torch
from conftest import make_image
from masked_reference import masked_prefill

from vtprune import LlavaEngine, VtpruneError, format_prompt
from vtprune.pruning import PruningConfig
from vtprune.pruning.weights import save_pruning_weights

QUESTIONS = ["What is it?", "Describe the picture in one sentence, please.", "How many objects?"]
PROMPTS = [format_prompt(q) for q in QUESTIONS]
IMAGES = [make_image(30 + i) for i in range(3)]
SMALL = dict(target_merge_tokens=18, merge_ratio=0.5, pruning_layers=[1, 2, 3], layer_keep_tokens=[12, 8, 4],
             pruner_d_internal=32, pruner_num_heads=4)


def engine_with(small_dir, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised heads
        return LlavaEngine.from_pretrained(small_dir, pruning=cfg)


def test_keep_everything_equals_no_pruning(small_dir, small_engine):
    keep_all = engine_with(small_dir, **dict(SMALL, target_merge_tokens=36, merge_ratio=1.0,
                                             layer_keep_tokens=[36, 36, 36]))
    torch.testing.assert_close(keep_all.next_token_logits(IMAGES, PROMPTS),
                               small_engine.next_token_logits(IMAGES, PROMPTS), atol=1e-6, rtol=0)
    a = keep_all.generate(IMAGES, PROMPTS, max_new_tokens=12)
    b = small_engine.generate(IMAGES, PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].stats["prefill_flops_unpruned"] == b[0].stats["prefill_flops_unpruned"] == b[0].stats["prefill_flops"]
    assert a[0].stats["prefill_flops"] > b[0].stats["prefill_flops"]  # the heads still run and are counted


POLICIES = [
    ("two_stage", SMALL),
    ("two_stage question_aware", dict(SMALL, merger_type="question_aware")),
    ("two_stage threshold", dict(SMALL, keep_mode="threshold", keep_threshold=0.5)),
    ("fastv", dict(policy="fastv", budget=24)),
    ("pdrop", dict(policy="pdrop", budget=16)),
    ("visionzip", dict(policy="visionzip", budget=9)),
    ("random", dict(policy="random", budget=9)),
    ("dart", dict(policy="dart", budget=24)),
    ("divprune", dict(policy="divprune", budget=9)),
]


@pytest.mark.parametrize("name,cfg", POLICIES, ids=[p[0] for p in POLICIES])
def test_batched_equals_one_by_one(small_dir, name, cfg):
    engine = engine_with(small_dir, **cfg)
    batched = engine.generate(IMAGES, PROMPTS, max_new_tokens=8)
    for im, p, r in zip(IMAGES, PROMPTS, batched):
        alone = engine.generate([im], [p], max_new_tokens=8)[0]
        assert r.token_ids == alone.token_ids, name
        assert r.stats["visual_tokens_per_layer"] == alone.stats["visual_tokens_per_layer"]
    logits = engine.next_token_logits(IMAGES, PROMPTS)
    for i in range(3):
        torch.testing.assert_close(logits[i], engine.next_token_logits(IMAGES[i:i + 1], PROMPTS[i:i + 1])[0],
                                   atol=1e-5, rtol=1e-5)


def test_two_stage_token_counts_caches_and_flops(small_dir):
    engine = engine_with(small_dir, **SMALL)
    rs = engine.generate(IMAGES, PROMPTS, max_new_tokens=4)
    n_text = [len(engine.prompts.encode(p)) - 18 for p in PROMPTS]
    for r, t in zip(rs, n_text):
        assert r.stats["visual_tokens"] == 18
        assert r.stats["visual_tokens_per_layer"] == [18, 12, 8, 4]
        assert r.stats["tokens_per_layer"] == [t + v for v in (18, 12, 8, 4)]
        assert r.stats["prefill_flops"] < r.stats["prefill_flops_unpruned"]
    _, cache, _, _ = engine._decode_state
    lengths = [cache.lengths[i].tolist() for i in range(4)]
    assert lengths == [[t + v for t in n_text] for v in (18, 12, 8, 4)]
    # each layer's buffer holds only what survives to it (capacity rounded up to 64 slots)
    T = max(n_text) + 18
    assert cache.prompt_capacity == [-(-c // 64) * 64 for c in (T, T - 6, T - 10, T - 14)]


def test_cache_lengths_are_updated_in_place_for_graph_replay(small_dir):
    """A CUDA graph is captured before the prefill sets the lengths: the prefill must write into
    the tensors the cache had at capture time, for every pruning segment."""
    engine = engine_with(small_dir, **SMALL)
    batch = engine.prepare(IMAGES, PROMPTS, 4)
    cache, _ = engine._decoder_state(batch, 4, use_cuda_graph=True)
    before = [t for t in cache.lengths]
    with torch.inference_mode():
        engine.plan.prefill(engine.model, batch, cache)
    assert all(a is b for a, b in zip(before, cache.lengths))
    n_text = [len(engine.prompts.encode(p)) - 18 for p in PROMPTS]
    assert [cache.lengths[i].tolist() for i in range(4)] == [[t + v for t in n_text] for v in (18, 12, 8, 4)]


def test_threshold_mode_is_ragged(small_dir):
    engine = engine_with(small_dir, **dict(SMALL, keep_mode="threshold", keep_threshold=0.5))
    g = torch.Generator().manual_seed(0)
    for head in engine.plan.modules.pruners.values():  # decisive keep probabilities (fresh heads sit near 0.5)
        head.mlp[-1].weight.copy_(torch.randn(head.mlp[-1].weight.shape, generator=g) * 3)
    rs = engine.generate(IMAGES, PROMPTS, max_new_tokens=2)
    per_layer = [r.stats["visual_tokens_per_layer"] for r in rs]
    for row in per_layer:
        assert row[0] == 18 and all(1 <= b <= a for a, b in zip(row, row[1:]))
    assert len({tuple(r) for r in per_layer}) > 1  # rows keep different numbers of tokens


@pytest.mark.parametrize("name,cfg", [POLICIES[i] for i in (0, 2, 3, 4, 7)],
                         ids=["two_stage", "threshold", "fastv", "pdrop", "dart"])
def test_masked_forward_equals_dropping_forward(small_dir, name, cfg):
    """Training masks dropped tokens' keys instead of dropping them; with the same (hard)
    decisions and the original positions, the last-token logits agree."""
    engine = engine_with(small_dir, **cfg)
    batch = engine.prepare(IMAGES, PROMPTS)
    with torch.inference_mode():
        dropped, trace = engine.plan.prefill(engine.model, batch, None)
        masked = masked_prefill(engine.model, engine.plan, batch, trace.kept)
    assert trace.kept  # something was dropped
    torch.testing.assert_close(masked, dropped, atol=1e-4, rtol=1e-5)


def test_positions_are_the_original_ones(small_dir):
    engine = engine_with(small_dir, **SMALL)
    batch = engine.prepare(IMAGES, PROMPTS)
    with torch.inference_mode():
        _, trace = engine.plan.prefill(engine.model, batch, None)
    prev = None
    for layer, (pos, lengths) in sorted(trace.kept.items()):
        for b in range(3):
            p = pos[b, : lengths[b]]
            assert (p[1:] > p[:-1]).all() and p[-1] == batch.lengths[b] - 1  # ascending, last token kept
            if prev is not None:
                assert set(p.tolist()) <= set(prev[b])
        prev = [pos[b, : lengths[b]].tolist() for b in range(3)]


def test_merge_keeps_the_original_rope_positions(small_dir, small_engine):
    """A 36 -> 18 merge gives what the full-length prompt gives with each merged token in its
    centre's slot and the other image slots masked out: merged tokens keep their original RoPE
    positions, the question keeps its own, and decoding continues after the full prompt's end."""
    cfg = dict(SMALL, layer_keep_tokens=[18, 18, 18])  # merge only
    engine = engine_with(small_dir, **cfg)
    plan, model = engine.plan, engine.model
    assert plan.position_offset == 36 - 18
    batch = engine.prepare(IMAGES, PROMPTS)
    full = small_engine.prepare(IMAGES, PROMPTS)
    with torch.inference_mode():
        logits, _ = plan.prefill(model, batch, None)
        vt = plan.visual_tokens(model, batch)
        feats, centres, sizes = vt.features, vt.sources, vt.sizes
        pos = plan.positions(batch.input_ids, centres)
        img = model.cfg.image_token_index
        B, T = full.input_ids.shape
        start = (full.input_ids == img).long().argmax(1)
        slots = start[:, None] + centres
        assert (pos.gather(1, (batch.input_ids == img).long().argmax(1)[:, None] + torch.arange(18)[None]) == slots).all()
        assert (pos[torch.arange(B), batch.lengths - 1] == full.lengths - 1).all()
        x = model.embed(full.input_ids, torch.zeros(B, 36, feats.shape[-1]))
        x[torch.arange(B)[:, None], slots] = feats
        logmask = torch.zeros(B, T).masked_fill(full.input_ids == img, float("-inf"))
        logmask[torch.arange(B)[:, None], slots] = sizes.log()  # proportional attention (the default)
        h = model.decoder(x, torch.arange(T).expand(B, T), key_logmasks={i: logmask for i in range(model.cfg.text.num_layers)})
        ref = model.decoder.logits(h[torch.arange(B), full.lengths - 1])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)
    engine.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=2)
    assert int(engine._decode_state[3][0]) == int(full.lengths[0])  # the first new token's position


@pytest.mark.parametrize("policy,budget", [("fastv", 24), ("fastv", 30), ("pdrop", 16), ("pdrop", 9),
                                           ("visionzip", 9), ("random", 20)])
def test_baselines_honour_their_budget(small_dir, policy, budget):
    engine = engine_with(small_dir, policy=policy, budget=budget)
    r = engine.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=2)[0]
    per_layer = r.stats["visual_tokens_per_layer"]
    avg = sum(per_layer) / len(per_layer)
    assert abs(avg - budget) <= 1.0, (per_layer, budget)
    assert r.stats["prefill_flops"] < r.stats["prefill_flops_unpruned"]


def test_pruning_weights_round_trip_and_random_init_warns(small_dir, tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        a = LlavaEngine.from_pretrained(small_dir, pruning=SMALL)
    path = tmp_path / "pruning.safetensors"
    save_pruning_weights(a.plan.modules, str(path))
    yaml_path = tmp_path / "p.yaml"
    lines = [f"{k}: {v}" for k, v in SMALL.items()] + ["weights: pruning.safetensors", "merger_type: simple"]
    yaml_path.write_text("\n".join(lines) + "\n")
    torch.manual_seed(123)  # a different random init would change the outputs; loaded weights must not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = LlavaEngine.from_pretrained(small_dir, pruning=str(yaml_path))
    assert torch.equal(a.next_token_logits(IMAGES, PROMPTS), b.next_token_logits(IMAGES, PROMPTS))
    bad = dict(SMALL, pruner_d_internal=64, weights=str(path))
    with pytest.raises(VtpruneError, match="has shape"):
        LlavaEngine.from_pretrained(small_dir, pruning=bad)


def test_default_yaml_loads_and_checks_against_the_7b_shape():
    cfg = PruningConfig.from_yaml("configs/vision_token_pruning.yaml")
    assert cfg.pruning_layers == [10, 20, 31] and cfg.target_merge_tokens == 288 and cfg.merge_sparsity_weight == 1e-4
    cfg.check_against_model(576, 32)


@pytest.mark.parametrize("cfg,match", [
    (dict(unknown_key=1), "unknown key 'unknown_key'"),
    (dict(pruning_layers=[10, 5, 20]), "'pruning_layers' must be strictly increasing"),
    (dict(pruning_layers=[0, 5, 20]), "'pruning_layers' must be >= 1"),
    (dict(merge_ratio=1.5), r"'merge_ratio' must be in \(0, 1\]"),
    (dict(merge_ratio=0.0), r"'merge_ratio' must be in \(0, 1\]"),
    (dict(layer_keep_tokens=[200, 150]), "'layer_keep_tokens' must be one positive integer per pruning layer"),
    (dict(layer_keep_tokens=[100, 150, 200]), "'layer_keep_tokens' must not increase"),
    (dict(merger_type="fancy"), "'merger_type' must be"),
    (dict(policy="fastv"), "'budget' must be a positive integer for policy 'fastv'"),
    (dict(policy="magic"), "'policy' must be one of"),
    (dict(optimizers={"token_merger": {"lr": -1}}), r"'optimizers.token_merger.lr' must be a number > 0"),
    (dict(temperature_min=2.0), "'temperature_min' must be in"),
    (dict(merge_locality=-1.0), "'merge_locality' must be a number >= 0"),
    (dict(merge_locality=True), "'merge_locality' must be a number >= 0"),
    (dict(selection_logit_scale=-1.0), "'selection_logit_scale' must be a number >= 0"),
    (dict(selection_logit_scale=[3]), "'selection_logit_scale' must be a number >= 0"),
    (dict(mask_gradient="both"), "'mask_gradient' must be 'logit' or 'value'"),
    (dict(task_loss_average="sentence"), "'task_loss_average' must be 'token' or 'example'"),
    (dict(lr_schedule="linear"), "'lr_schedule' must be 'constant' or 'cosine'"),
    (dict(ema_decay=1.0), r"'ema_decay' must be in \[0, 1\)"),
    (dict(ema_decay="0.9x"), r"'ema_decay' must be in \[0, 1\)"),
    (dict(noise_off_fraction=1.5), r"'noise_off_fraction' must be in \[0, 1\]"),
])
def test_bad_configs_name_the_key(cfg, match):
    with pytest.raises(VtpruneError, match=match):
        PruningConfig.from_dict(cfg)


@pytest.mark.parametrize("cfg,match", [
    (dict(SMALL, target_merge_tokens=40, merge_ratio=1.0), "'target_merge_tokens' is 40, more than the model's 36"),
    (dict(SMALL, merge_ratio=0.8), "'merge_ratio' 0.8 of 36 visual tokens is 28.8, inconsistent"),
    (dict(SMALL, pruning_layers=[1, 2, 4]), r"'pruning_layers' \[1, 2, 4\] has a layer outside the decoder's 0..3"),
    (dict(SMALL, layer_keep_tokens=[20, 8, 4]), "'layer_keep_tokens' starts at 20, more than the 18 merged"),
    (dict(policy="visionzip", budget=99), "'budget' is 99, more than the model's 36"),
])
def test_configs_checked_against_the_model(small_dir, cfg, match):
    with pytest.raises(VtpruneError, match=match):
        engine_with(small_dir, **cfg)


def test_yaml_errors(tmp_path, small_dir):
    with pytest.raises(VtpruneError, match=r"pruning config .*none\.yaml: not found"):
        LlavaEngine.from_pretrained(small_dir, pruning=str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("policy: [unclosed\n")
    with pytest.raises(VtpruneError, match="not valid YAML"):
        PruningConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "e.yaml").write_text("merge_sparsity_weight: 1e-4\npruning_layers: [1, 2, 3]\n")
    assert PruningConfig.from_yaml(tmp_path / "e.yaml").merge_sparsity_weight == 1e-4  # YAML's '1e-4' string


@pytest.mark.parametrize("name,cfg", [("none", None)] + [POLICIES[i] for i in (0, 1, 2, 3, 4, 5, 7, 8)],
                         ids=["none", "two_stage", "question_aware", "threshold", "fastv", "pdrop", "visionzip",
                              "dart", "divprune"])
def test_shared_image_prefix_gives_the_same_answers(small_dir, small_engine, name, cfg):
    """Three questions about one image and one about another: the prefix runs once per image
    (engine/shared_prefix.py) and the answers equal those of an unshared prefill."""
    engine = small_engine if cfg is None else engine_with(small_dir, **cfg)
    im, other = make_image(50), make_image(51)
    images = [im, im, other, im]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], format_prompt("Is it red?")]
    try:
        engine.share_prefix = True
        shared = engine.generate(images, prompts, max_new_tokens=8)
        logits_shared = engine.next_token_logits(images, prompts)
        engine.share_prefix = False
        plain = engine.generate(images, prompts, max_new_tokens=8)
        logits_plain = engine.next_token_logits(images, prompts)
    finally:
        engine.share_prefix = True
    torch.testing.assert_close(logits_shared, logits_plain, atol=1e-4, rtol=1e-4)
    if name != "threshold":  # threshold decisions may flip on float noise near the cut
        assert [r.token_ids for r in shared] == [r.token_ids for r in plain]
    assert [r.stats["tokens_per_layer"] for r in shared] == [r.stats["tokens_per_layer"] for r in plain] \
        or name == "threshold"


def test_shared_prefix_runs_the_prefix_once(small_engine, monkeypatch):
    from vtprune.engine import generate, shared_prefix

    calls = []
    real = shared_prefix.prefill_shared_prefix
    spy = (lambda model, batch, x, sharing, stop, cache: calls.append(sharing[2].tolist()) or
           real(model, batch, x, sharing, stop, cache))
    # where it is called from: generate.prefill (imported name) and pruning/plan.py (module attribute)
    monkeypatch.setattr(generate, "prefill_shared_prefix", spy)
    monkeypatch.setattr(shared_prefix, "prefill_shared_prefix", spy)
    im = make_image(52)
    small_engine.next_token_logits([im, im, im], PROMPTS)
    assert calls == [[0]]  # one distinct prefix, computed from row 0


def test_fresh_merger_clusters_by_similarity():
    """An untrained merger scores token-centre pairs by the cosine of tied key/query projections:
    every centre is its own best match, and each merged token is the mean of its cluster."""
    from vtprune.pruning.modules import TokenMerger

    torch.manual_seed(0)
    merger = TokenMerger(PruningConfig(**dict(SMALL, merger_type="simple")), vision_dim=24, text_dim=16)
    feats = torch.randn(2, 36, 24)
    with torch.no_grad():
        merged, centres, _, sizes = merger(feats, tau=1e-5)
        keys = merger._unit(merger.key_proj(feats))
        queries = merger._unit(merger.query_proj(feats.gather(1, centres[..., None].expand(-1, -1, 24))))
    cos = keys @ queries.transpose(1, 2) / 24 ** 0.5  # [B, N, M]
    for b in range(2):
        assert (cos[b, centres[b]].argmax(-1) == torch.arange(centres.shape[1])).all()
        cluster = cos[b].argmax(-1)  # tau -> 0: hard assignment
        for m in range(centres.shape[1]):
            # (a wrong cluster is off by ~1)
            torch.testing.assert_close(merged[b, m], feats[b, cluster == m].mean(0), atol=1e-4, rtol=1e-4)
        # sizes: how many tokens each merged token stands for (proportional attention's log(size))
        torch.testing.assert_close(sizes[b], torch.bincount(cluster, minlength=centres.shape[1]).float(),
                                   atol=1e-3, rtol=0)


def test_merge_locality_adds_the_squared_grid_distance():
    """merge_locality: a token's merge score for a centre is (cos - lam |p_n - p_c|^2) / tau, p on
    the 6 x 6 patch grid in units of its side; with a huge lam every token joins its nearest centre."""
    import torch.nn.functional as F

    from vtprune.pruning.modules import TokenMerger

    torch.manual_seed(1)
    feats = torch.randn(2, 36, 24)
    idx = torch.arange(36)
    grid = torch.stack([idx // 6, idx % 6], -1).float() / 6
    for lam in (3.0, 1e4):
        merger = TokenMerger(PruningConfig(**dict(SMALL, merger_type="simple", merge_locality=lam)), 24, 16)
        with torch.no_grad():
            merged, centres, _, sizes = merger(feats, tau=1e-5)
            cos = F.cosine_similarity(merger.key_proj(feats)[:, :, None],
                                      merger.query_proj(feats.gather(1, centres[..., None].expand(-1, -1, 24)))[:, None],
                                      dim=-1)  # [B, N, M]
        dist2 = ((grid[:, None] - grid[centres][:, None]) ** 2).sum(-1)  # [B, N, M]
        cluster = (cos - lam * dist2).argmax(-1)
        for b in range(2):
            if lam > 100:  # nearest centre (ties broken by the cosine)
                torch.testing.assert_close(dist2[b].gather(1, cluster[b, :, None])[:, 0], dist2[b].min(-1).values)
            for m in range(centres.shape[1]):
                torch.testing.assert_close(merged[b, m], feats[b, cluster[b] == m].mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sizes[b], torch.bincount(cluster[b], minlength=centres.shape[1]).float(),
                                       atol=1e-3, rtol=0)
    # lam is learned: training gradients reach it through the kernel's key/query gradients
    merger = TokenMerger(PruningConfig(**dict(SMALL, merger_type="simple", merge_locality=3.0)), 24, 16)
    merged, *_ = merger(feats, tau=0.5, noise=True, seed=0)
    merged.square().sum().backward()
    assert merger.log_locality.grad is not None and merger.log_locality.grad.abs() > 0
    with pytest.raises(VtpruneError, match="square patch grid, got 35"):
        merger(feats[:, :35], tau=0.5)


def test_standardized_selection_logits():
    """selection_logit_scale s: logits -> s (x - mean) / std + b per row over the valid entries
    (others unchanged): the same ranking as the raw logits, a spread that no weight scale changes."""
    from vtprune.pruning.modules import PrunerHead, TokenMerger, standardize_logits

    torch.manual_seed(2)
    x = torch.randn(3, 11) * 50 + 7
    valid = torch.rand(3, 11) > 0.3
    b = torch.tensor(0.25)
    out = standardize_logits(x, 3.0, b, valid)
    for r in range(3):
        v = x[r, valid[r]]
        torch.testing.assert_close(out[r, valid[r]], 3.0 * (v - v.mean()) / v.std() + 0.25, atol=1e-4, rtol=1e-4)
        assert torch.equal(out[r, ~valid[r]], x[r, ~valid[r]])
        assert torch.equal(out[r, valid[r]].argsort(), v.argsort())
    torch.testing.assert_close(standardize_logits(x, 2.0, b), 2.0 * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True) + b)

    cfg = PruningConfig(**dict(SMALL, merger_type="question_aware", selection_logit_scale=3.0))
    head, merger = PrunerHead(cfg, 16), TokenMerger(cfg, 24, 16)
    visual, question, qvalid = torch.randn(2, 9, 16), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    feats = torch.randn(2, 36, 24)
    with torch.no_grad():
        before = head(visual, question, qvalid), merger.scores(feats, question, qvalid)
        head.mlp[-1].weight.mul_(1000.0)
        merger.importance[-1].weight.mul_(1000.0)
        after = head(visual, question, qvalid), merger.scores(feats, question, qvalid)
    for a, c in zip(before, after):
        assert float(a.std(-1).mean()) == pytest.approx(3.0, rel=1e-3)
        torch.testing.assert_close(a, c, atol=2e-3, rtol=1e-3)  # bias cancels in (x - mean) / std
    # the offsets are learned (threshold mode's calibration via the sparsity loss)
    head(visual, question, qvalid).sigmoid().sum().backward()
    assert head.logit_bias.grad is not None and head.logit_bias.grad.abs() > 0


def test_proportional_attention_counts_a_merged_token_as_its_size(small_engine):
    """A key with bias log(s) draws the attention that s copies of it at the same position would:
    later tokens' outputs agree exactly (the ToMe rule the two-stage merge uses)."""
    model = small_engine.model
    g = torch.Generator().manual_seed(0)
    D = model.cfg.text.hidden_size
    x = torch.randn(1, 6, D, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    bias = torch.zeros(1, 6)
    bias[0, 2] = torch.tensor(3.0).log()
    # the same sequence with token 2 written three times, all at position 2
    dup = torch.cat([x[:, :3], x[:, 2:3], x[:, 2:3], x[:, 3:]], 1)
    dpos = torch.tensor([[0, 1, 2, 2, 2, 3, 4, 5]])
    with torch.no_grad():
        # one layer: after it the copies' hidden states differ (each sees a different causal window)
        h = model.decoder(x, pos, key_logmasks={0: bias}, layers=range(1))
        hd = model.decoder(dup, dpos, layers=range(1))
        without = model.decoder(x, pos, layers=range(1))
    torch.testing.assert_close(h[:, 3:], hd[:, 5:], atol=1e-5, rtol=1e-5)
    assert (without[:, 3:] - hd[:, 5:]).abs().max() > 1e-3  # and the bias is what makes them agree


@pytest.mark.parametrize("proportional", [True, False])
def test_decoding_through_the_cache_matches_the_masked_forward(small_dir, proportional, monkeypatch):
    """Token log-probs of a continuation read through the KV cache (pruned, compacted, with the
    merged tokens' log(size) biases in the decode masks) equal a full recompute of prompt +
    continuation with the same decisions (masked_prefill), one row at a time."""
    from vtprune.engine.inputs import PreparedBatch

    # exact cache capacities (no rounding up), so that each segment of layers holds fewer slots
    monkeypatch.setattr("vtprune.engine.kv_cache.SLOT_ROUND", 1)
    engine = engine_with(small_dir, **dict(SMALL, merger_type="simple", proportional_attention=proportional))
    assert engine.plan.uses_key_bias == proportional
    plan, model = engine.plan, engine.model
    for image, prompt in zip(IMAGES[:2], PROMPTS[:2]):
        cont = " a red circle and a blue square"
        ids = engine.prompts.continuation(prompt, cont)
        (ours, _), = engine.score([image], [prompt], [cont])
        batch = engine.prepare([image], [prompt])
        T = batch.input_ids.shape[1]
        with torch.inference_mode():
            _, trace = plan.prefill(model, batch, None)
            ref = 0.0
            for j, t in enumerate(ids):
                seq = torch.cat([batch.input_ids, torch.tensor([ids[:j]], dtype=torch.long)], 1)
                kept = {layer: (torch.cat([idx[:, : int(n[0])], torch.arange(T, T + j)[None]], 1), n + j)
                        for layer, (idx, n) in trace.kept.items()}
                logits = masked_prefill(model, plan, PreparedBatch(seq, batch.lengths + j, batch.pixel_values), kept)
                ref += float(torch.log_softmax(logits.float(), -1)[0, t])
        assert abs(ours - ref) < 1e-3 * max(1.0, abs(ref)), (ours, ref)
