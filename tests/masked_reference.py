"""A masked (nothing dropped) forward with given decisions: what the dropping prefill, its KV
compaction and the decode that reads the compacted caches must agree with."""
import torch

from vtprune.engine.inputs import PreparedBatch
from vtprune.engine.model import LlavaModel
from vtprune.pruning.plan import PruningPlan


def masked_prefill(model: LlavaModel, plan: PruningPlan, batch: PreparedBatch, kept: dict) -> torch.Tensor:
    """The oracle of the pruned prefill: no token leaves the sequence; from each drop layer on,
    the keys of tokens dropped there (and earlier) are masked out (additive -inf), as the
    trainer's forward does. `kept` is PrefillTrace.kept (or the same structure from hard masks).
    With the same decisions this gives the dropping prefill's last-token logits."""
    vt = plan.visual_tokens(model, batch)
    feats, sources, sizes = vt.features, vt.sources, vt.sizes
    x = model.embed(batch.input_ids, feats)
    B, T = batch.input_ids.shape
    positions = plan.positions(batch.input_ids, sources)
    bias = plan.key_bias(batch.input_ids, sizes, torch.float32)
    logmask = torch.zeros(B, T, device=x.device) if bias is None else bias
    key_logmasks = {}
    for layer in range(model.cfg.text.num_layers):
        if layer in kept:
            pos, lengths = kept[layer]
            alive = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
            valid = torch.arange(pos.shape[1], device=x.device)[None, :] < lengths[:, None]
            alive.scatter_(1, torch.where(valid, pos, T), True)
            logmask = logmask.masked_fill(~alive[:, :T], float("-inf"))
        key_logmasks[layer] = logmask
    h = model.decoder(x, positions, key_logmasks=key_logmasks)
    return model.decoder.logits(h[torch.arange(B, device=x.device), batch.lengths - 1])
