"""soft_merge: merge N tokens into M centres by a temperature softmax, flash-attention style.

    merged = soft_merge(x [B, N, D], keys [B, N, d], queries [B, M, d], tau=1.0)   # [B, M, D]

    A[b, n, :] = softmax_m(keys[b, n] . queries[b, m] / (sqrt(d) * tau))   each token spreads
                                                                          itself over the centres
    merged[b, m] = sum_n A[b, n, m] x[b, n] / (sum_n A[b, n, m] + 1e-6)   a normalised weighted mean

soft_merge(..., return_sizes=True) also returns sizes[b, m] = sum_n A[b, n, m] ([B, M] fp32, no
gradient): how many tokens each merged token stands for (proportional attention adds log(size)
to its attention logits, see PruningPlan). The kernel computes these column sums anyway.

The [B, N, M] matrix A is never written to memory. Forward: pass 1 keeps a running max and
sum of exponentials over the centres for each token (its log-sum-exp, [B, N]); pass 2
recomputes A tile by tile and accumulates A^T x and the column sums per block of centres.
Backward (c = column sum + 1e-6, dP = dmerged / c, dc = -sum_D dmerged * merged / c):
    dx[n]   = sum_m A[n, m] dP[m]
    dA[n,m] = x[n] . dP[m] + dc[m],  dS = A * (dA - delta),  delta[n] = x[n] . dx[n] + sum_m A[n, m] dc[m]
    dkeys   = scale * dS Q,   dqueries = scale * dS^T K
in three kernels (dx and the A.dc part of delta; dkeys; dqueries), again without storing A.
Accumulation is fp32 throughout; 16-bit inputs feed tensor-core dots, fp32 inputs exact ones.

Edge cases, the same on every path (reference, Triton interpreter, compiled Triton), handled in
the public op before and after the dispatch, so that no path relies on how its hardware
propagates NaN:
- keys and queries are used in x's dtype (cast if they differ; their gradients come back in
  their own dtypes). float64 and key widths d > 256 always take the reference.
- A batch row b whose x[b], keys[b] or queries[b] holds any NaN or +-inf gives merged[b] and
  sizes[b] entirely NaN, and zero gradients to that row's inputs; the other rows are computed
  as usual (the row's inputs are replaced by zeros before the kernels run). Without this, a
  +inf score would be NaN on one path and could be a finite number on another.
- The domain of finite inputs is fp32's range: the scores keys . queries / (sqrt(d) tau) and the
  sums N * max|x| must stay below 3.4e38. Beyond it fp32 overflows (inf / NaN) and the paths may
  overflow in different places; nothing checks for it.
- B = 0 gives empty outputs ([0, M, D], sizes [0, M]) with a working backward.
- Non-contiguous and expanded (stride-0) inputs work on every path (made contiguous for the
  kernels).
- Refused (VtpruneError naming the argument): x, keys or queries that are not 3-d floating
  tensors (lists, numpy arrays, integer or bool tensors), tensors on different devices, shapes
  that do not fit ([B, N, D], [B, N, d], [B, M, d]), D = 0 or d = 0, M outside 1..N (so also
  N = 0), tau outside [1e-30, 1e30] (NaN, inf, <= 0, non-numbers), return_sizes not a bool.
"""
from __future__ import annotations

import math

import torch

from ..errors import VtpruneError
from . import _checks as check
from ._triton import HAVE_TRITON, INTERPRET, use_triton

EPS = 1e-6
MAX_TRITON_KEY_DIM = 8192  # keys/queries are read BK columns at a time (tiles()): only the loop grows

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scores(K, Q, b, n, m, n_ok, m_ok, N, M, DK, scale, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                IEEE: tl.constexpr):
        """[BN, BM] tile of keys . queries * scale, the key dim read BK columns at a time (a whole
        d = 512 row of keys and of queries held at once spilled registers, compile_check)."""
        s = tl.zeros([BN, BM], tl.float32)
        for k0 in range(0, DK, BK):
            dk = k0 + tl.arange(0, BK)
            dk_ok = dk < DK
            k = tl.load(K + (b * N + n)[:, None] * DK + dk[None, :], mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
            q = tl.load(Q + (b * M + m)[:, None] * DK + dk[None, :], mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
            if IEEE:
                s += tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                s += tl.dot(k, tl.trans(q))
        return s * scale

    @triton.jit
    def _lse_kernel(K, Q, LSE, N, M, DK, scale, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    IEEE: tl.constexpr):
        b = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < N
        m_i = tl.full([BN], float("-inf"), tl.float32)
        l_i = tl.zeros([BN], tl.float32)
        for m0 in range(0, M, BM):
            m = m0 + tl.arange(0, BM)
            s = _scores(K, Q, b, n, m, n_ok, m < M, N, M, DK, scale, BN, BM, BK, IEEE)
            s = tl.where((m < M)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(LSE + b * N + n, m_i + tl.log(l_i), mask=n_ok)

    @triton.jit
    def _merge_kernel(X, K, Q, LSE, OUT, DEN, N, M, D, DK, scale, BN: tl.constexpr, BM: tl.constexpr,
                      BD: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        m_ok, d_ok = m < M, d < D
        acc = tl.zeros([BM, BD], tl.float32)
        den = tl.zeros([BM], tl.float32)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < N
            s = _scores(K, Q, b, n, m, n_ok, m_ok, N, M, DK, scale, BN, BM, BK, IEEE)
            lse = tl.load(LSE + b * N + n, mask=n_ok, other=0.0)
            a = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            x = tl.load(X + (b * N + n)[:, None] * D + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(a), x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a.to(x.dtype)), x)
            den += tl.sum(a, axis=0)
        out = acc / (den[:, None] + 1e-6)
        tl.store(OUT + (b * M + m)[:, None] * D + d[None, :], out, mask=m_ok[:, None] & d_ok[None, :])
        if tl.program_id(2) == 0:
            tl.store(DEN + b * M + m, den, mask=m_ok)

    @triton.jit
    def _bwd_dx_kernel(K, Q, LSE, DP, DC, DX, DELTA2, N, M, D, DK, scale, BN: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        n_ok, d_ok = n < N, d < D
        lse = tl.load(LSE + b * N + n, mask=n_ok, other=0.0)
        acc = tl.zeros([BN, BD], tl.float32)
        adc = tl.zeros([BN], tl.float32)
        for m0 in range(0, M, BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            s = _scores(K, Q, b, n, m, n_ok, m_ok, N, M, DK, scale, BN, BM, BK, IEEE)
            a = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.load(DP + (b * M + m)[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.dot(a, dp, input_precision=PREC)
            dc = tl.load(DC + b * M + m, mask=m_ok, other=0.0)
            adc += tl.sum(a * dc[None, :], axis=1)
        tl.store(DX + (b * N + n)[:, None] * D + d[None, :], acc, mask=n_ok[:, None] & d_ok[None, :])
        if tl.program_id(2) == 0:
            tl.store(DELTA2 + b * N + n, adc, mask=n_ok)

    @triton.jit
    def _ds_tile(X, DP, DC, DELTA, b, n, m, n_ok, m_ok, a, N, M, D, BD: tl.constexpr, PREC: tl.constexpr):
        """dS for one [BN, BM] tile: A * (x_n . dP_m + dc_m - delta_n)."""
        da = tl.zeros(a.shape, tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            d_ok = d < D
            x = tl.load(X + (b * N + n)[:, None] * D + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            dp = tl.load(DP + (b * M + m)[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            da += tl.dot(x.to(tl.float32), tl.trans(dp), input_precision=PREC)
        dc = tl.load(DC + b * M + m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + b * N + n, mask=n_ok, other=0.0)
        return a * (da + dc[None, :] - delta[:, None])

    @triton.jit
    def _bwd_dk_kernel(X, K, Q, LSE, DP, DC, DELTA, DKEYS, N, M, D, DK, scale, BN: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BKO: tl.constexpr, IEEE: tl.constexpr,
                       PREC: tl.constexpr):
        """dkeys[n, dk] for one block of BN tokens and BKO key columns (program axis 2): holding all
        d = 512 columns' accumulator and queries at once spilled registers (compile_check)."""
        b = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        dk = tl.program_id(2) * BKO + tl.arange(0, BKO)
        n_ok, dk_ok = n < N, dk < DK
        lse = tl.load(LSE + b * N + n, mask=n_ok, other=0.0)
        acc = tl.zeros([BN, BKO], tl.float32)
        for m0 in range(0, M, BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            s = _scores(K, Q, b, n, m, n_ok, m_ok, N, M, DK, scale, BN, BM, BK, IEEE)
            a = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            ds = _ds_tile(X, DP, DC, DELTA, b, n, m, n_ok, m_ok, a, N, M, D, BD, PREC)
            q = tl.load(Q + (b * M + m)[:, None] * DK + dk[None, :], mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
            acc += tl.dot(ds, q.to(tl.float32), input_precision=PREC)
        tl.store(DKEYS + (b * N + n)[:, None] * DK + dk[None, :], acc * scale, mask=n_ok[:, None] & dk_ok[None, :])

    @triton.jit
    def _bwd_dq_kernel(X, K, Q, LSE, DP, DC, DELTA, DQUERIES, N, M, D, DK, scale, BN: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BKO: tl.constexpr, IEEE: tl.constexpr,
                       PREC: tl.constexpr):
        """dqueries[m, dk] for one block of BM centres and BKO key columns (program axis 2)."""
        b = tl.program_id(0)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        dk = tl.program_id(2) * BKO + tl.arange(0, BKO)
        m_ok, dk_ok = m < M, dk < DK
        acc = tl.zeros([BM, BKO], tl.float32)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < N
            s = _scores(K, Q, b, n, m, n_ok, m_ok, N, M, DK, scale, BN, BM, BK, IEEE)
            lse = tl.load(LSE + b * N + n, mask=n_ok, other=0.0)
            a = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            ds = _ds_tile(X, DP, DC, DELTA, b, n, m, n_ok, m_ok, a, N, M, D, BD, PREC)
            k = tl.load(K + (b * N + n)[:, None] * DK + dk[None, :], mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
            acc += tl.dot(tl.trans(ds), k.to(tl.float32), input_precision=PREC)
        tl.store(DQUERIES + (b * M + m)[:, None] * DK + dk[None, :], acc * scale, mask=m_ok[:, None] & dk_ok[None, :])


# ----------------------------------------------------------------------------- reference
def soft_merge_reference(x: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor, tau: float = 1.0,
                         return_sizes: bool = False):
    """Plain PyTorch (fp32 or wider inside, output in x's dtype); differentiable by autograd
    (the sizes are returned detached, as the kernel's are)."""
    d = keys.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    s = torch.einsum("bnd,bmd->bnm", keys.to(acc), queries.to(acc)) / (math.sqrt(d) * tau)
    a = s.softmax(dim=-1)
    num = torch.einsum("bnm,bnD->bmD", a, x.to(acc))
    col = a.sum(dim=1)
    out = (num / (col[..., None] + EPS)).to(x.dtype)
    return (out, col.detach().float()) if return_sizes else out


# ----------------------------------------------------------------------------- autograd
def tiles(dtype: torch.dtype, on_gpu: bool = True) -> dict:
    """Block sizes and dot precision of every soft_merge kernel for activations of this dtype.

    BN tokens x BM centres per score tile; BD columns of x / dP per step (BDM: the merge's output
    columns per program); BK key columns per step of the score loop; BKO key columns of dkeys /
    dqueries per program. Chosen with compile_check at the 7B design's shapes (N 576, M 288,
    D 1024, d 512) for sm_90 and sm_80, with Triton 3.9 and 3.6: no spills in any dtype (16-bit:
    64-184 registers). Holding a whole d = 512 key row per token (the first version) spilled up to
    50 KB per thread in fp32 and 0.5 KB in the 16-bit backward. fp32 dots run on CUDA cores
    (input_precision="ieee"): with 4 warps, Triton 3.6's ptxas spilled 4-20 bytes in one of the
    three backward kernels at every tile tried; 8 warps and BK 16 spill nowhere (56-114 registers).
    IEEE: exact fp32 dots (fp32 inputs, and every input under the interpreter, whose bf16
    arithmetic is unreliable); otherwise 16-bit operands on tensor cores, fp32 accumulation."""
    ieee = dtype == torch.float32 or (INTERPRET and not on_gpu)
    if dtype == torch.float32:
        t = dict(BN=32, BM=32, BD=32, BDM=64, BK=16, BKO=64, num_warps=8)
    else:
        t = dict(BN=32, BM=32, BD=64, BDM=128, BK=64, BKO=128, num_warps=4)
    # the backward's dots: fp32 inputs exact, 16-bit inputs TF32 (their own rounding is coarser)
    return dict(t, IEEE=ieee, PREC="ieee" if dtype == torch.float32 else "tf32")


class SoftMergeFunction(torch.autograd.Function):
    """Triton forward and backward (fp32 accumulation), shared by engine and training."""

    @staticmethod
    def forward(ctx, x, keys, queries, tau: float):
        x, keys, queries = x.contiguous(), keys.contiguous(), queries.contiguous()
        B, N, D = x.shape
        M, DK = queries.shape[1], keys.shape[2]
        scale = 1.0 / (math.sqrt(DK) * tau)
        t = tiles(x.dtype, x.is_cuda)
        lse = torch.empty(B, N, dtype=torch.float32, device=x.device)
        out = torch.empty(B, M, D, dtype=torch.float32, device=x.device)
        den = torch.empty(B, M, dtype=torch.float32, device=x.device)
        _lse_kernel[(B, triton.cdiv(N, t["BN"]))](keys, queries, lse, N, M, DK, scale, BN=t["BN"], BM=t["BM"],
                                                  BK=t["BK"], IEEE=t["IEEE"], num_warps=t["num_warps"])
        _merge_kernel[(B, triton.cdiv(M, t["BM"]), triton.cdiv(D, t["BDM"]))](
            x, keys, queries, lse, out, den, N, M, D, DK, scale, BN=t["BN"], BM=t["BM"], BD=t["BDM"], BK=t["BK"],
            IEEE=t["IEEE"], num_warps=t["num_warps"])
        ctx.save_for_backward(x, keys, queries, lse, out, den)
        ctx.scale = scale
        sizes = den.clone()
        ctx.mark_non_differentiable(sizes)
        return out.to(x.dtype), sizes

    @staticmethod
    def backward(ctx, grad_out, _grad_sizes):
        x, keys, queries, lse, out, den = ctx.saved_tensors
        B, N, D = x.shape
        M, DK = queries.shape[1], keys.shape[2]
        t = tiles(x.dtype, x.is_cuda)
        common = dict(BN=t["BN"], BM=t["BM"], BD=t["BD"], BK=t["BK"], IEEE=t["IEEE"], PREC=t["PREC"],
                      num_warps=t["num_warps"])
        c = den + EPS
        dp = (grad_out.float() / c[..., None]).contiguous()
        dc = (-(grad_out.float() * out).sum(-1) / c).contiguous()
        dx = torch.empty(B, N, D, dtype=torch.float32, device=x.device)
        delta2 = torch.empty(B, N, dtype=torch.float32, device=x.device)
        _bwd_dx_kernel[(B, triton.cdiv(N, t["BN"]), triton.cdiv(D, t["BD"]))](keys, queries, lse, dp, dc, dx, delta2,
                                                                             N, M, D, DK, ctx.scale, **common)
        delta = ((x.float() * dx).sum(-1) + delta2).contiguous()
        dkeys = torch.empty(B, N, DK, dtype=torch.float32, device=x.device)
        dqueries = torch.empty(B, M, DK, dtype=torch.float32, device=x.device)
        _bwd_dk_kernel[(B, triton.cdiv(N, t["BN"]), triton.cdiv(DK, t["BKO"]))](
            x, keys, queries, lse, dp, dc, delta, dkeys, N, M, D, DK, ctx.scale, BKO=t["BKO"], **common)
        _bwd_dq_kernel[(B, triton.cdiv(M, t["BM"]), triton.cdiv(DK, t["BKO"]))](
            x, keys, queries, lse, dp, dc, delta, dqueries, N, M, D, DK, ctx.scale, BKO=t["BKO"], **common)
        return dx.to(x.dtype), dkeys.to(keys.dtype), dqueries.to(queries.dtype), None


# ----------------------------------------------------------------------------- public op
def soft_merge(x: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor, tau: float = 1.0,
               return_sizes: bool = False):
    """See the module docstring: merged [B, M, D], or (merged, sizes [B, M]) with return_sizes."""
    op = "soft_merge"
    for name, t, shape in (("x", x, "[B, N, D]"), ("keys", keys, "[B, N, d]"), ("queries", queries, "[B, M, d]")):
        check.tensor(op, name, t, "3-d", shape, ndim=3)
        check.floating(op, name, t)
    check.same_device(op, x=x, keys=keys, queries=queries)
    B, N, D = x.shape
    if keys.shape[:2] != (B, N):
        raise VtpruneError(f"{op}: keys must be [B, N, d] = [{B}, {N}, d], got {tuple(keys.shape)}")
    if queries.shape[0] != B or queries.shape[2] != keys.shape[2]:
        raise VtpruneError(f"{op}: queries must be [B, M, d] = [{B}, M, {keys.shape[2]}], got {tuple(queries.shape)}")
    M, d = queries.shape[1], keys.shape[2]
    if D == 0:
        raise VtpruneError(f"{op}: x has an empty feature dimension (D = 0), got {tuple(x.shape)}")
    if d == 0:
        raise VtpruneError(f"{op}: keys and queries have an empty key dimension (d = 0): the scores "
                           f"q . k / sqrt(d) are undefined")
    if not 1 <= M <= N:
        raise VtpruneError(f"{op}: need 1 <= M <= N, got M = {M} (queries) and N = {N} (x, keys)")
    tau = check.tau(op, tau)
    return_sizes = check.flag(op, "return_sizes", return_sizes)
    keys, queries = keys.to(x.dtype), queries.to(x.dtype)
    # Rows holding NaN / inf: zero inputs in, NaN out (module docstring). torch.where passes no
    # gradient to the replaced entries, so that row's gradients are exactly 0.
    bad = ~torch.stack([t.isfinite().flatten(1).all(1) for t in (x, keys, queries)]).all(0)  # [B], no sync
    x, keys, queries = (torch.where(bad[:, None, None], 0.0, t) for t in (x, keys, queries))
    if B and use_triton(x) and x.dtype != torch.float64 and d <= MAX_TRITON_KEY_DIM:
        out, sizes = SoftMergeFunction.apply(x, keys, queries, tau)
    else:  # B = 0 too: empty tensors that keep the graph
        out, sizes = soft_merge_reference(x, keys, queries, tau, return_sizes=True)
    out = torch.where(bad[:, None, None], float("nan"), out)
    sizes = torch.where(bad[:, None], float("nan"), sizes)
    return (out, sizes) if return_sizes else out
