"""gumbel_topk: differentiable top-k selection with Gumbel noise, in one Triton kernel.

    indices, mask, soft = gumbel_topk(logits [B, N], k, tau=1.0, noise=True, seed=None)

- perturbed = logits + g, g = -log(-log(u)), u from Triton's counter-based Philox generator at
  offset row * N + col (same seed -> same noise; no noise with noise=False). The reference path
  (CPU without the interpreter, float64, N > 4096) draws g from torch's generator instead.
- mask [B, N]: 1 at the k largest perturbed values of each row (ties: the lower index wins).
- indices [B, max k]: the selected positions in ascending order (spatial order kept); rows with
  a smaller per-row k are padded with -1.
- soft [B, N] = sigmoid((perturbed - theta) / tau), theta the midpoint between the k-th and
  (k+1)-th largest perturbed value of the row.
- Gradient (straight-through): downstream uses mask + soft - soft.detach(), so
  d/dlogits = (grad_mask + grad_soft) * soft * (1 - soft) / tau, theta held constant.

Edge cases, the same on every path (reference, Triton interpreter, compiled Triton: the kernel
sanitizes them with tl.where instead of relying on how the hardware propagates NaN):
- -inf logits rank below every finite one: chosen only when a row has fewer than k finite ones,
  among themselves by index. +inf logits rank above every finite one.
- A "hard" row, where the k-th or the (k+1)-th value is infinite or there is no (k+1)-th value
  (k = N): soft equals the mask exactly and the gradient of that row is 0 (finite; no NaN from
  inf - inf). E.g. k = N gives soft = mask = 1; [+inf, -inf] with k = 1 gives soft = [1, 0].
- NaN logits: refused (VtpruneError naming the first row) when validate=True, the default.
  With validate=False (no host sync) a NaN ranks as -inf, and its gradient is 0.
- -0.0 equals +0.0 (ties by index). Huge or tiny finite values need no care: theta is taken as
  0.5 kth + 0.5 next (no overflow), and sigmoid saturates to exactly 0 or 1 in fp32.
- B = 0 gives empty outputs ([0, k] indices; [0, 0] for a per-row k) with a working backward.
- Refused (VtpruneError naming the argument): logits that are not a 2-d floating tensor (lists,
  numpy arrays, integer or bool tensors), N = 0, k outside 1..N (per-row k: an int32/int64 [B]
  tensor on logits' device with every value in 1..N), tau outside [1e-30, 1e30] (NaN, inf, <= 0,
  non-numbers), seed not None or an int in [0, 2**64), noise or validate not a bool.
- Non-contiguous and expanded (stride-0) logits work on every path (the kernel takes strides).

The kernel (one program per row, N <= 4096) draws the noise, builds order-preserving 64-bit
keys (float bits << 32 | reversed index, so equal values rank by index), sorts them once, takes
the k-th key as the threshold, and writes mask, soft and the compacted indices (a cumsum gives
each kept token its output slot): one launch for everything, where the unfused PyTorch version
needs noise + topk + sort (its H200 time: the perf anchors in README "Benchmarks").
"""
from __future__ import annotations

import torch

from ..errors import VtpruneError
from . import _checks as check
from ._triton import HAVE_TRITON, next_pow2, use_triton

MAX_TRITON_N = 4096
_U_MIN, _U_MAX = 1e-20, 0.99999988  # keep u inside (0, 1): -log(-log(u)) stays finite

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gumbel(seed, offsets):
        u = tl.rand(seed, offsets)
        u = tl.minimum(tl.maximum(u, 1e-20), 0.99999988)
        return -tl.log(-tl.log(u))

    @triton.jit
    def _gumbel_noise_kernel(out_ptr, N, seed, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + row * N + offs, _gumbel(seed, row * N + offs), mask=offs < N)

    @triton.jit
    def _gumbel_topk_kernel(logits_ptr, stride_b, stride_n, k_ptr, idx_ptr, mask_ptr, soft_ptr,
                            N, KMAX, seed, inv_tau, NOISE: tl.constexpr, PER_ROW_K: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < N
        x = tl.load(logits_ptr + row * stride_b + offs * stride_n, mask=valid, other=float("-inf"))
        x = x.to(tl.float32)
        if NOISE:
            x = x + _gumbel(seed, row * N + offs)
        x = tl.where(x != x, float("-inf"), x)  # NaN (validate=False) ranks as -inf, as in the reference
        x = x + 0.0  # -0.0 -> +0.0, so equal values have equal keys
        if PER_ROW_K:
            k = tl.load(k_ptr + row).to(tl.int32)
        else:
            k = KMAX
        # Order-preserving integer image of the float, then the index in the low 32 bits
        # (reversed, so that among equal values the lower index has the larger key).
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32
        key = key | (BLOCK - 1 - offs).to(tl.int64)
        lowest = -9223372036854775807 - 1
        key = tl.where(valid, key, lowest)
        ranked = tl.sort(key, descending=True)
        kth_key = tl.max(tl.where(offs == k - 1, ranked, lowest), axis=0)
        sel = (key >= kth_key) & valid
        kth = tl.min(tl.where(sel, x, float("inf")), axis=0)
        nxt = tl.max(tl.where(sel | (offs >= N), float("-inf"), x), axis=0)
        # A hard row (kth = +inf, next = -inf, or k = N so that next = -inf): soft = mask. Testing
        # kth and next, not theta, because theta = inf - inf would be NaN (and min/max of NaN
        # differ between the interpreter and compiled code).
        hard = (tl.abs(kth) == float("inf")) | (tl.abs(nxt) == float("inf"))
        theta = 0.5 * tl.where(hard, 0.0, kth) + 0.5 * tl.where(hard, 0.0, nxt)
        z = (x - theta) * inv_tau
        # sigmoid(z) without overflow: exp of -|z| only (exactly 0 and 1 at z = -inf / +inf)
        e = tl.exp(-tl.abs(z))
        soft = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        soft = tl.where(hard, sel.to(tl.float32), soft)
        slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row * KMAX + slot, offs.to(tl.int64), mask=sel)
        tl.store(idx_ptr + row * KMAX + offs, tl.full([BLOCK], -1, tl.int64), mask=(offs >= k) & (offs < KMAX))
        tl.store(mask_ptr + row * N + offs, sel.to(tl.float32), mask=valid)
        tl.store(soft_ptr + row * N + offs, soft, mask=valid)


# ----------------------------------------------------------------------------- noise
def gumbel_noise(shape, seed: int | None, device, triton_path: bool) -> torch.Tensor:
    """The noise gumbel_topk adds for this seed: the kernel's own generator on the Triton path,
    torch's generator (seeded, or the default one when seed is None) on the reference path."""
    B, N = shape
    if triton_path:
        out = torch.empty(B, N, dtype=torch.float32, device=device)
        _gumbel_noise_kernel[(B,)](out, N, _resolve_seed(seed), BLOCK=next_pow2(N))
        return out
    gen = None if seed is None else torch.Generator(device).manual_seed(seed)
    u = torch.rand(B, N, generator=gen, device=device).clamp_(_U_MIN, _U_MAX)
    return -torch.log(-torch.log(u))


def _resolve_seed(seed: int | None) -> int:
    if seed is None:  # from torch's default CPU generator: torch.manual_seed makes runs repeatable
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int(seed) % (2**31 - 1)


# ----------------------------------------------------------------------------- reference
def gumbel_topk_reference(logits: torch.Tensor, k: torch.Tensor, kmax: int, tau: float = 1.0,
                          gumbel: torch.Tensor | None = None):
    """Plain PyTorch, same semantics; `gumbel` is the noise to add (None: no noise).
    Differentiable through autograd with the straight-through gradient."""
    B, N = logits.shape
    p = logits.float() + (gumbel if gumbel is not None else 0.0)
    p = torch.where(p.isnan(), float("-inf"), p) + 0.0  # NaN ranks as -inf; -0.0 -> +0.0
    order = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices  # ties: lower index first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=p.device).expand(B, N))
    k = k.to(p.device).long()
    sel = rank < k[:, None]
    pd = p.detach()
    kth = torch.where(sel, pd, float("inf")).amin(-1)
    nxt = torch.where(sel, float("-inf"), pd).amax(-1)
    hard = ~(kth.isfinite() & nxt.isfinite())  # the kernel's test (kth = +inf, next = -inf, k = N)
    theta = torch.where(hard, 0.0, 0.5 * kth + 0.5 * nxt)
    z = (p - theta[:, None]) / tau
    soft = torch.where(hard[:, None], sel.float(), torch.sigmoid(z))
    mask = sel.float() + (soft - soft.detach())  # exactly 0/1 forward, soft's gradient backward
    slots = torch.where(sel, torch.arange(N, device=p.device), N).sort(-1).values[:, :kmax]
    indices = torch.where(slots == N, -1, slots)
    return indices, mask.to(logits.dtype), soft.to(logits.dtype)


# ----------------------------------------------------------------------------- autograd
class GumbelTopKFunction(torch.autograd.Function):
    """The Triton forward and the straight-through backward, shared by engine and training."""

    @staticmethod
    def forward(ctx, logits, k, kmax: int, tau: float, noise: bool, seed: int | None):
        """k: a [B] int64 tensor (per-row counts) or None (every row keeps kmax)."""
        B, N = logits.shape
        dev = logits.device
        idx = torch.empty(B, kmax, dtype=torch.long, device=dev)
        mask = torch.empty(B, N, dtype=torch.float32, device=dev)
        soft = torch.empty(B, N, dtype=torch.float32, device=dev)
        BLOCK = next_pow2(N)
        # 8 warps from BLOCK 1024 (the merger's N = 576): with 4, Triton 3.9's ptxas spilled 4 bytes for
        # sm_80 in the noisy (training) variant; 8 spill nowhere (64-80 registers, compile_check)
        _gumbel_topk_kernel[(B,)](logits, logits.stride(0), logits.stride(1), idx if k is None else k, idx, mask,
                                  soft, N, kmax, _resolve_seed(seed) if noise else 0, 1.0 / tau, NOISE=noise,
                                  PER_ROW_K=k is not None, BLOCK=BLOCK, num_warps=8 if BLOCK >= 1024 else 4)
        ctx.save_for_backward(soft)
        ctx.tau = tau
        ctx.mark_non_differentiable(idx)
        return idx, mask.to(logits.dtype), soft.to(logits.dtype)

    @staticmethod
    def backward(ctx, _grad_idx, grad_mask, grad_soft):
        (soft,) = ctx.saved_tensors
        g = torch.zeros_like(soft)
        if grad_mask is not None:
            g = g + grad_mask.float()
        if grad_soft is not None:
            g = g + grad_soft.float()
        grad = g * soft * (1.0 - soft) / ctx.tau
        return grad.to(grad_mask.dtype if grad_mask is not None else grad_soft.dtype), None, None, None, None, None


# ----------------------------------------------------------------------------- public op
def gumbel_topk(logits: torch.Tensor, k, tau: float = 1.0, noise: bool = True, seed: int | None = None,
                validate: bool = True):
    """See the module docstring. `validate=False` skips the NaN check (a host sync on a GPU); a
    per-row k tensor costs one sync for its range check either way."""
    op = "gumbel_topk"
    check.tensor(op, "logits", logits, "[B, N]", ndim=2)
    check.floating(op, "logits", logits)
    B, N = logits.shape
    if N < 1:
        raise VtpruneError(f"{op}: logits has no columns (N = 0): there is nothing to select")
    tau = check.tau(op, tau)
    noise = check.flag(op, "noise", noise)
    validate = check.flag(op, "validate", validate)
    seed = check.seed(op, seed)
    if isinstance(k, torch.Tensor):
        if k.dim() != 1 or k.shape[0] != B or k.dtype not in check.INDEX_DTYPES:
            raise VtpruneError(f"{op}: per-row k must be an integer tensor [B] = [{B}] (int32 or int64), got "
                               f"{check.describe(k)}")
        check.same_device(op, logits=logits, k=k)
        lo, hi = (int(v) for v in torch.stack([k.min(), k.max()]).tolist()) if B else (1, 0)
        if lo < 1 or hi > N:
            raise VtpruneError(f"{op}: every k must be in 1..N = 1..{N}, got values in {lo}..{hi}")
        k_t, kmax = k.long(), hi  # B = 0: indices [0, 0]
    else:
        kv = check.integer(k)
        if kv is None or not 1 <= kv <= N:
            raise VtpruneError(f"{op}: k must be an int in 1..N = 1..{N}, got {check.describe(k)}")
        k_t, kmax = None, kv  # a scalar k goes to the kernel as is: no extra launch
    if validate and B and torch.isnan(logits).any():
        row = int(torch.isnan(logits).any(-1).nonzero()[0, 0])
        raise VtpruneError(f"{op}: logits contain NaN (first in row {row}); validate=False ranks NaN as -inf")
    # B = 0 takes the reference on every path: empty outputs that still connect to the graph
    if B and use_triton(logits) and N <= MAX_TRITON_N and logits.dtype != torch.float64:
        return GumbelTopKFunction.apply(logits, k_t, kmax, tau, noise, seed)
    g = gumbel_noise((B, N), seed, logits.device, triton_path=False) if noise else None
    if k_t is None:
        k_t = torch.full((B,), kmax, dtype=torch.long, device=logits.device)
    return gumbel_topk_reference(logits, k_t, kmax, tau, g)
