"""The pruning-policy interface: a method registered from outside the package runs batched, with
KV compaction and correct stats; DART and DivPrune against plain reference implementations; the
registry's and the interface's errors (small model: 36 visual tokens, 4 decoder layers)."""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_image
from masked_reference import masked_prefill

from vtprune import LlavaEngine, VtpruneError, format_prompt
from vtprune.pruning import (DropPoint, PruningConfig, PruningPolicy, Schedule, VisualTokens, get_policy,
                             policy_names, register_policy)
from vtprune.pruning.policies import dart_scores, max_min_diverse
from vtprune.pruning.policy import REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module", autouse=True)
def norm_policy():
    """examples/norm_policy.py imported as a user's module would be (it registers 'norm'), and
    unregistered afterwards so that other tests see the built-ins only."""
    sys.path.insert(0, EXAMPLES)
    try:
        yield importlib.import_module("norm_policy")
    finally:
        REGISTRY.pop("norm", None)
        sys.modules.pop("norm_policy", None)
        sys.path.remove(EXAMPLES)

QUESTIONS = ["What is it?", "Describe the picture in one sentence, please.", "How many objects?"]
PROMPTS = [format_prompt(q) for q in QUESTIONS]
IMAGES = [make_image(60 + i) for i in range(3)]


def engine_with(small_dir, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlavaEngine.from_pretrained(small_dir, pruning=cfg)


# ----------------------------------------------------------------------------- an outside policy
def test_outside_policy_is_registered_and_listed(norm_policy):
    assert get_policy("norm") is norm_policy.NormPolicy
    assert "norm" in policy_names() and policy_names()[:7] == ["two_stage", "fastv", "pdrop", "dart", "visionzip",
                                                                "divprune", "random"]


def test_outside_policy_runs_batched_with_compaction_and_stats(small_dir, monkeypatch):
    monkeypatch.setattr("vtprune.engine.kv_cache.SLOT_ROUND", 1)  # exact capacities: compaction is visible
    engine = engine_with(small_dir, policy="norm", budget=12)  # 18 tokens in layers 0-1, 6 in layers 2-3
    assert engine.plan.visual_tokens_per_layer() == [18, 18, 6, 6]
    batched = engine.generate(IMAGES, PROMPTS, max_new_tokens=6)
    n_text = [len(engine.prompts.encode(p)) - 18 for p in PROMPTS]
    for r, t, im, p in zip(batched, n_text, IMAGES, PROMPTS):
        assert r.stats["visual_tokens_per_layer"] == [18, 18, 6, 6]
        assert r.stats["tokens_per_layer"] == [t + 18, t + 18, t + 6, t + 6]
        assert r.stats["prefill_flops"] < r.stats["prefill_flops_unpruned"]
        assert engine.generate([im], [p], max_new_tokens=6)[0].token_ids == r.token_ids  # batch-invariant
    # the caches of layers 2 and 3 hold only the kept tokens
    batch = engine.prepare(IMAGES, PROMPTS, 6)
    cache, _ = engine._decoder_state(batch, 6, use_cuda_graph=False)
    model, plan = engine.model, engine.plan
    with torch.inference_mode():
        logits, trace = plan.prefill(model, batch, cache)
        T = batch.input_ids.shape[1]
        assert cache.prompt_capacity == [T, T, T - 12, T - 12]
        assert [cache.lengths[i].tolist() for i in range(4)] == [[t + v for t in n_text] for v in (18, 18, 6, 6)]
        # the decision is the policy's: the 6 visual tokens with the largest hidden norm entering layer 2
        vt = plan.visual_tokens(model, batch)
        x = model.decoder(model.embed(batch.input_ids, vt.features), plan.positions(batch.input_ids, None),
                          layers=range(2))
        visual = batch.input_ids == engine.cfg.image_token_index
        want = x.float().norm(dim=-1).masked_fill(~visual, -1).topk(6, dim=1).indices.sort(1).values
        idx, lengths = trace.kept[2]
        for b in range(3):
            kept = idx[b, : lengths[b]]
            assert kept[visual[b, kept]].tolist() == want[b].tolist()
        # dropping and compacting gives what masking the dropped keys gives (training's forward)
        torch.testing.assert_close(logits, masked_prefill(model, plan, batch, trace.kept), atol=1e-4, rtol=1e-5)


def test_outside_policy_from_the_cli_and_yaml(small_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([EXAMPLES, ROOT]), TRITON_INTERPRET="1")
    image = tmp_path / "im.png"
    make_image(61).save(image)
    (tmp_path / "norm.yaml").write_text("policy: norm\nbudget: 12\n")
    base = [sys.executable, "-m", "vtprune", "generate", "--model", small_dir, "--image", str(image),
            "--prompt", "What is it?", "--max-new-tokens", "3"]
    r = subprocess.run(base + ["--policy-module", "norm_policy", "--pruning", str(tmp_path / "norm.yaml")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "visual tokens per layer: 18 x2, 6 x2" in r.stdout
    r = subprocess.run(base + ["--policy-module", "no_such_policy_module", "--policy", "norm", "--budget", "12"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("vtprune: error: --policy-module no_such_policy_module: cannot import it")
    r = subprocess.run(base + ["--policy", "norm", "--budget", "12"], env=env, capture_output=True, text=True,
                       timeout=300)  # not imported: not registered
    assert r.returncode != 0 and "'policy' must be one of two_stage, fastv" in r.stderr and "got \"norm\"" in r.stderr


# ----------------------------------------------------------------------------- the interface's errors
def _register_broken(name, **methods):
    cls = type(name, (PruningPolicy,), methods)
    register_policy(name, cls)
    return cls


@pytest.fixture
def clean_registry():
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def test_a_policy_s_bad_output_is_a_named_error(small_dir, clean_registry):
    _register_broken("late", schedule=lambda self, n, L: Schedule(n, [DropPoint(L, 3)]))
    with pytest.raises(VtpruneError, match=r"policy 'late': schedule: drop layers \[4\] must ascend, each in 1\.\.3"):
        engine_with(small_dir, policy="late", budget=3)
    _register_broken("wide", schedule=lambda self, n, L: Schedule(n, []),
                     select_visual=lambda self, inp: VisualTokens(inp.project(inp.vision_features())[:, :5]))
    engine = engine_with(small_dir, policy="wide", budget=3)
    with pytest.raises(VtpruneError, match=r"select_visual returned features of shape \(1, 5, \d+\), expected \(1, 36,"):
        engine.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=1)
    _register_broken("flat", schedule=lambda self, n, L: Schedule(n, [DropPoint(1, 3)]),
                     score=lambda self, inp: inp.hidden.norm(dim=-1)[0])
    engine = engine_with(small_dir, policy="flat", budget=3)
    with pytest.raises(VtpruneError, match=r"'flat': score at layer 1 returned \(\d+,\), expected a \[B, T\]"):
        engine.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=1)


def test_registry_errors(clean_registry, monkeypatch):
    with pytest.raises(VtpruneError, match="is not a PruningPolicy subclass"):
        register_policy("thing", object)
    with pytest.raises(VtpruneError, match="must be an identifier"):
        register_policy("two words", PruningPolicy)
    with pytest.raises(VtpruneError, match=r"unknown pruning policy 'nope' \(registered: two_stage, fastv, pdrop"):
        get_policy("nope")
    with pytest.raises(VtpruneError, match=r"'policy' must be one of two_stage, .*, got \"nope\""):
        PruningConfig(policy="nope", budget=3).check()

    class EP:  # an entry point another package declares under "vtprune.policies"
        name, value = "plugged", "their_pkg.policy:Plugged"

        def load(self):
            return type("Plugged", (PruningPolicy,), {})

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [EP()] if group == "vtprune.policies" else [])
    assert get_policy("plugged").__name__ == "Plugged" and "plugged" in policy_names()


# ----------------------------------------------------------------------------- DART
def _dart_reference(hidden, norms, visual, pivots):
    B, T, _ = hidden.shape
    out = torch.full((B, T), float("-inf"))
    for b in range(B):
        vis = [t for t in range(T) if visual[b, t]]
        piv = sorted(vis, key=lambda t: -float(norms[b, t]))[:pivots]
        for t in vis:
            sims = [float(torch.nn.functional.cosine_similarity(hidden[b, t], hidden[b, p], dim=0)) for p in piv]
            out[b, t] = 3.0 if t in piv else 1.0 - max(sims)
    return out


def test_dart_scores_match_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 23, 16, generator=g)
    norms = torch.rand(3, 23, generator=g)
    visual = torch.zeros(3, 23, dtype=torch.bool)
    visual[:, 4:17] = True
    visual[1, 15:] = False  # rows with different numbers of visual tokens
    got = dart_scores(hidden, norms, visual, pivots=4)
    torch.testing.assert_close(got, _dart_reference(hidden, norms, visual, 4), atol=1e-5, rtol=0)
    # a duplicate of a pivot is the first to go, a token orthogonal to every pivot the last
    piv = norms.masked_fill(~visual, -1).topk(4, dim=1).indices
    hidden[0, 16] = hidden[0, piv[0, 0]] * 2.0
    s = dart_scores(hidden, norms, visual, pivots=4)[0]
    others = [t for t in range(4, 17) if t not in piv[0].tolist()]
    assert min(others, key=lambda t: float(s[t])) == 16


def test_dart_in_the_engine_keeps_pivots_and_is_batch_invariant(small_dir):
    engine = engine_with(small_dir, policy="dart", budget=24)  # all 36 tokens in layer 0, then 20
    assert engine.plan.drop_points == [DropPoint(1, 20)]
    rs = engine.generate(IMAGES, PROMPTS, max_new_tokens=6)
    for r, im, p in zip(rs, IMAGES, PROMPTS):
        assert r.stats["visual_tokens_per_layer"] == [36, 20, 20, 20]
        assert engine.generate([im], [p], max_new_tokens=6)[0].token_ids == r.token_ids
    with pytest.raises(VtpruneError, match="'budget' 8 is too small for dart: the first 1 layer alone hold 9"):
        engine_with(small_dir, policy="dart", budget=8)


# ----------------------------------------------------------------------------- DivPrune
def _greedy_reference(x, k):
    out = []
    for row in x:
        f = torch.nn.functional.normalize(row.double(), dim=-1)
        d = 1 - f @ f.T
        N = len(row)
        first = max(range(N), key=lambda i: min(float(d[i, j]) for j in range(N) if j != i))
        chosen = [first]
        while len(chosen) < k:
            rest = [i for i in range(N) if i not in chosen]
            chosen.append(max(rest, key=lambda i: min(float(d[i, j]) for j in chosen)))
        out.append(sorted(chosen))
    return out


def test_divprune_greedy_matches_a_loop_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 29, 12, generator=g)
    for k in (1, 2, 7, 29):
        assert max_min_diverse(x, k).tolist() == _greedy_reference(x, k)
    # duplicates are never both chosen while distinct tokens remain
    base = torch.randn(1, 6, 12, generator=g)
    dup = torch.cat([base, base * 3.0, base], 1)  # 18 tokens, 6 directions
    idx = max_min_diverse(dup, 6)[0]
    assert len({int(i) % 6 for i in idx}) == 6


def test_divprune_in_the_engine(small_dir):
    engine = engine_with(small_dir, policy="divprune", budget=9)
    batched = engine.generate(IMAGES, PROMPTS, max_new_tokens=6)
    with torch.inference_mode():
        feats = engine.model.projector(engine.model.vision(engine.prepare(IMAGES, PROMPTS).pixel_values))
    want = max_min_diverse(feats, 9)
    batch = engine.prepare(IMAGES, PROMPTS)
    with torch.inference_mode():
        vt = engine.plan.visual_tokens(engine.model, batch)
    torch.testing.assert_close(vt.features, feats.gather(1, want[..., None].expand(-1, -1, feats.shape[-1])))
    for r, im, p in zip(batched, IMAGES, PROMPTS):
        assert r.stats["visual_tokens_per_layer"] == [9] * 4
        assert engine.generate([im], [p], max_new_tokens=6)[0].token_ids == r.token_ids
