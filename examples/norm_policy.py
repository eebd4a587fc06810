"""An outside pruning method in 30 lines: every other visual token before the decoder, then, at
the middle layer, the visual tokens with the largest hidden-state norm. Register it by importing
this module (`vtprune eval --policy-module norm_policy --policy norm --budget 100 ...`, with
examples/ on PYTHONPATH) and the engine runs it batched, with KV compaction and per-layer stats."""
from vtprune.errors import VtpruneError
from vtprune.pruning import DropPoint, PruningPolicy, Schedule, VisualTokens, register_policy


@register_policy("norm")
class NormPolicy(PruningPolicy):
    def schedule(self, n, L):
        m, K = n // 2, L // 2  # stage 0 keeps m tokens, layers K and later `keep`
        keep = round((L * self.cfg.budget - K * m) / (L - K))  # so that the layer average is the budget
        if not 1 <= keep <= m:
            raise VtpruneError(f"policy 'norm': budget {self.cfg.budget} is out of reach "
                               f"({K * m / L + (L - K) / L:.0f}..{m})")
        return Schedule(m, [DropPoint(K, keep)])

    def select_visual(self, inp):
        feats = inp.vision_features()[:, ::2]  # [B, n/2, Dv]: every other token
        return VisualTokens(inp.project(feats))

    def score(self, inp):
        # [B, T], one score per token; the engine keeps every text token and the `keep`
        # best-scoring visual ones, and compacts the hidden states and KV caches
        return inp.hidden.float().norm(dim=-1)
