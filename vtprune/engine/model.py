"""LLaVA-1.5 in one file: CLIP vision tower, 2-layer projector, Llama decoder.

The math follows transformers' `LlavaForConditionalGeneration` operation for operation
(same casts, same RoPE table, same RMSNorm) so fp32 logits agree to ~1e-5; the structure is
the engine's own: the decoder reads and writes a `KVCache` laid out for batched, ragged,
CUDA-graph-friendly decoding (see kv_cache.py), and the vision tower runs only the encoder
layers that `vision_feature_layer` needs (LLaVA-1.5 uses layer -2, so 23 of CLIP's 24).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import LlavaModelConfig, TextConfig, VisionConfig
from .kv_cache import KVCache

_ACTIVATIONS = {  # keyed by config.ACTIVATIONS (tests/test_layout.py checks they agree)
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}' (supported: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------- vision tower
class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, probe=None) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if probe is not None:
            probe(q, k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, probe=None):
        x = x + self.self_attn(self.layer_norm1(x), probe)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(B, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    """CLIP ViT returning the hidden states LLaVA selects ([B, patches(+1), D * len(layers)])."""

    def __init__(self, cfg: LlavaModelConfig):
        super().__init__()
        self.feature_layers = cfg.vision_feature_layers
        self.num_vision_layers = cfg.vision.num_layers
        self.drop_cls = cfg.select_strategy == "default"
        self.embeddings = CLIPEmbeddings(cfg.vision)
        self.pre_layrnorm = nn.LayerNorm(cfg.vision.hidden_size, eps=cfg.vision.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPLayer(cfg.vision) for _ in range(cfg.vision_layers_needed))

    def forward(self, pixel_values: torch.Tensor, probe=None) -> torch.Tensor:
        """`probe(q, k)` sees the last layer's attention inputs (VisionZip's CLS attention)."""
        hidden = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for i, layer in enumerate(self.layers):
            hidden.append(layer(hidden[-1], probe if i == len(self.layers) - 1 else None))
        n = self.num_vision_layers
        feats = [hidden[i if i >= 0 else n + 1 + i] for i in self.feature_layers]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


class Projector(nn.Module):
    def __init__(self, cfg: LlavaModelConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        d = cfg.text.hidden_size
        self.act = activation(cfg.projector_act)
        self.linear_1 = nn.Linear(d_in, d, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary (per-row, possibly non-contiguous) position ids, as transformers
    computes them: fp32 angles, cast to the activation dtype afterwards. `forward` computes them
    for any positions (prefill, training); `lookup` gathers them from a table built once
    (`build_table`) for the positions a decode step can have: one index op per step instead of
    the seven (float, mul, cat, cos, sin, two casts) of recomputing them. Table rows are computed by
    the same formula, and on CPU (AVX-512) they were bit-identical to the recomputed values for
    every position 0..8191 at head dims 16, 32 and 128.
    Both return (cos, sin_signed): sin_signed is sin with its first half negated, the form
    apply_rope's roll needs."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.table: torch.Tensor | None = None  # [positions, 2, Dh]: cos, sin_signed

    def _inv_freq(self, device=None):
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exponent)

    def reset_parameters(self, device):  # buffers built on the meta device need real values
        self.inv_freq = self._inv_freq(device)
        self.table = None

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, device=sin.device)
        sign[:half] = -1.0  # exact: only the sign bit changes
        return emb.cos().to(dtype), (sin * sign).to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        return self._cos_sin(positions, dtype)

    def build_table(self, num_positions: int, dtype: torch.dtype) -> None:
        cos, sin = self._cos_sin(torch.arange(num_positions, device=self.inv_freq.device), dtype)
        self.table = torch.stack([cos, sin], dim=1)  # [P, 2, Dh]: one gather per step fetches both

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin_signed) of `positions` from the table (forward's values; no bounds check on a
        GPU: positions must be < the table's length, which the engine guarantees)."""
        if self.table is None or self.table.dtype != dtype:
            return self._cos_sin(positions, dtype)
        rows = self.table[positions]  # [B, T, 2, Dh]
        return rows[..., 0, :], rows[..., 1, :]


def apply_rope(x, cos, sin_signed):
    """x [B, T, heads, Dh] rotated by RoPE: x * cos + rotate_half(x) * sin, where rotate_half(x) =
    cat(-x2, x1) is computed as roll(x) * sin_signed (-x2 * s and x2 * -s are the same float):
    one kernel (roll) instead of three (chunk's neg, cat) and bit-identical to transformers."""
    cos, sin_signed = cos.unsqueeze(2), sin_signed.unsqueeze(2)  # [B, T, 1, Dh] against [B, T, heads, Dh]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=b)
        self.qkv_weight: nn.Parameter | None = None  # fuse(): [Wq; Wk; Wv], one matmul per layer
        self.qkv_bias: nn.Parameter | None = None

    def fuse(self) -> None:
        """Replace q/k/v_proj (checkpoint layout) by one [Wq; Wk; Wv] matrix (gpt-fast's wqkv):
        one GEMM launch instead of three. Each output column is the same dot product as before."""
        if self.qkv_weight is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = nn.Parameter(torch.cat([p.weight for p in projs]), requires_grad=False)
        if projs[0].bias is not None:
            self.qkv_bias = nn.Parameter(torch.cat([p.bias for p in projs]), requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x):
        """[B, T, H + 2 Hkv, Dh]: queries, keys and values side by side, one head per row."""
        B, T, _ = x.shape
        if self.qkv_weight is not None:
            out = F.linear(x, self.qkv_weight, self.qkv_bias)
        else:
            out = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return out.view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, cache: KVCache | None, write_slot, attn_mask, probe=None, key_logmask=None,
                past=None, value_scale=None):
        """Prefill (write_slot None): causal attention over x, K/V stored in cache slots [0, T).
        Decode (write_slot a 1-element LongTensor): K/V written at that slot, then attention
        over the whole cache buffer under `attn_mask` ([B, 1, 1, S] bool).
        `probe(q, k)` sees the rotated queries and keys of a prefill (for attention-score policies);
        `key_logmask` [B, T] is added to every query's logits for those keys in a prefill: -inf hides
        a key (training: masking, not dropping), a finite value biases it (proportional attention);
        or the [B, 1, T, T] mask prefill_key_mask made of it.
        `past` (k, v, lengths): a shared prefix's keys/values [B, Hkv, S, Dh], of which row b's first
        lengths[b] are real; x then continues that prefix (engine/shared_prefix.py).
        `value_scale` [B, T] multiplies each token's value vector (training's straight-through keep
        masks with mask_gradient "value": 1 in the forward, their gradient is the loss's
        sensitivity to the token's content)."""
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self._qkv(x)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)  # queries and keys rotated in one pass
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)
        if value_scale is not None:
            v = v * value_scale[:, None, :, None].to(v.dtype)
        gqa = {"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}
        if write_slot is None:
            if probe is not None:
                probe(q, k)
            if cache is not None:
                cache.write_prefill(self.layer_idx, k, v)
            if past is not None:
                k_p, v_p, plen = past
                S = k_p.shape[2]
                seen = torch.arange(S, device=x.device)[None, :] < plen[:, None]                 # [B, S]
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = torch.cat([seen[:, None, :].expand(B, T, S), causal.expand(B, T, T)], dim=2)[:, None]
                out = F.scaled_dot_product_attention(q, torch.cat([k_p, k], 2), torch.cat([v_p, v], 2),
                                                     attn_mask=mask, **gqa)
            elif key_logmask is None:
                # Right-padded rows need no mask: a real token's causal window holds only real tokens.
                out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **gqa)
            else:
                mask = (key_logmask.to(q.dtype) if key_logmask.dim() == 4 else prefill_key_mask(key_logmask, q.dtype))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        else:
            keys, values = cache.write_decode(self.layer_idx, write_slot, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def prefill_key_mask(key_logmask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, T] additive key bias -> the [B, 1, T, T] causal attention mask of a prefill with it."""
    T = key_logmask.shape[1]
    causal = torch.full((T, T), float("-inf"), device=key_logmask.device, dtype=dtype).triu(1)
    mask = causal + key_logmask.to(dtype)[:, None, None, :]
    # a token always sees itself, so no row of the mask is all -inf (a finite bias on the
    # diagonal, proportional attention's log(size), stays)
    return mask.masked_fill(torch.eye(T, dtype=torch.bool, device=mask.device) & mask.isinf(), 0.0)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, m, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = activation(cfg.hidden_act)
        self.gate_proj, self.up_proj = nn.Linear(d, m, bias=b), nn.Linear(d, m, bias=b)
        self.down_proj = nn.Linear(m, d, bias=b)
        self.gate_up_weight: nn.Parameter | None = None  # fuse(): [W_gate; W_up]
        self.gate_up_bias: nn.Parameter | None = None

    def fuse(self) -> None:
        """One [W_gate; W_up] matrix: one GEMM launch instead of two (gpt-fast's w1/w3)."""
        if self.gate_up_weight is not None:
            return
        g, u = self.gate_proj, self.up_proj
        self.gate_up_weight = nn.Parameter(torch.cat([g.weight, u.weight]), requires_grad=False)
        if g.bias is not None:
            self.gate_up_bias = nn.Parameter(torch.cat([g.bias, u.bias]), requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_weight is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, write_slot=None, attn_mask=None, probe=None, key_logmask=None, past=None,
                value_scale=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, write_slot, attn_mask, probe, key_logmask,
                               past, value_scale)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Llama/Vicuna decoder. `forward` returns final hidden states before the norm; call
    `logits(h)` on just the positions you need (the last token of each row, usually)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x, positions, cache=None, write_slot=None, attn_masks=None, layers=None, probes=None,
                key_logmasks=None, pasts=None, value_scales=None, checkpoint=False):
        """Runs `layers` (default all; a range lets the pruned prefill stop between layers).
        probes / key_logmasks / value_scales: optional {layer index: ...} passed to that layer's
        attention (value_scales: training's straight-through keep masks, see Attention.forward).
        checkpoint: gradient checkpointing, each layer recomputed in the backward pass (training).
        A decode step (write_slot given) reads RoPE from the table built by build_table."""
        cos, sin = (self.rotary(positions, x.dtype) if write_slot is None else self.rotary.lookup(positions, x.dtype))
        masks = {}  # layers given the same key_logmask tensor share one [B, 1, T, T] mask
        for i in range(len(self.layers)) if layers is None else layers:
            km = None if key_logmasks is None else key_logmasks.get(i)
            if km is not None and km.dim() == 2 and write_slot is None:
                if id(km) not in masks:
                    masks[id(km)] = prefill_key_mask(km, x.dtype)
                km = masks[id(km)]
            args = (x, cos, sin, cache, write_slot, None if attn_masks is None else attn_masks[i],
                    None if probes is None else probes.get(i), km, None if pasts is None else pasts[i],
                    None if value_scales is None else value_scales.get(i))
            x = (torch.utils.checkpoint.checkpoint(self.layers[i], *args, use_reentrant=False) if checkpoint
                 else self.layers[i](*args))
        return x

    def logits(self, h):
        return self.lm_head(self.norm(h))


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg)
        self.projector = Projector(cfg)
        self.decoder = Decoder(cfg.text)

    def prepare_inference(self, dtype: torch.dtype) -> None:
        """Once, after the weights are loaded: fused QKV and gate/up matrices in every decoder
        layer, and the RoPE table for every position a decode step can reach (the context, plus
        the visual tokens a merge may skip: merged prompts keep their original positions).
        Idempotent."""
        for layer in self.decoder.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        t = self.decoder.rotary.table
        if t is None or t.dtype != dtype:
            self.decoder.rotary.build_table(self.cfg.text.max_position_embeddings + self.cfg.num_visual_tokens, dtype)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image-token runs replaced by the image features [S, n, D], in
        order (row by row, each row's placeholders left to right, as transformers' masked_scatter
        fills them); None: a text-only batch."""
        x = self.decoder.embed_tokens(input_ids)
        if image_features is None:
            return x
        mask = (input_ids == self.cfg.image_token_index).unsqueeze(-1)
        return x.masked_scatter(mask, image_features.to(x.dtype))
