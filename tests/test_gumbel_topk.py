"""gumbel_topk: the Triton kernel (under TRITON_INTERPRET=1 without a GPU) against the reference."""
import pytest
import torch

from vtprune.kernels import gumbel_topk
from vtprune.kernels._triton import use_triton
from vtprune.kernels.gumbel_topk import gumbel_noise, gumbel_topk_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEV)),
                                reason="needs triton (GPU) or TRITON_INTERPRET=1")


def ref(logits, k, seed=None, noise=True, tau=1.0):
    B, N = logits.shape
    kt = k if isinstance(k, torch.Tensor) else torch.full((B,), k)
    g = gumbel_noise((B, N), seed, logits.device, triton_path=True) if noise else None
    return gumbel_topk_reference(logits, kt.to(logits.device), int(kt.max()), tau, g)


def assert_same(out, expect, soft_atol=1e-6):
    assert torch.equal(out[0], expect[0])
    assert torch.equal(out[1], expect[1])
    torch.testing.assert_close(out[2].float(), expect[2].float(), atol=soft_atol, rtol=0)


@pytest.mark.parametrize("B,N,k", [(3, 1, 1), (4, 7, 1), (4, 7, 7), (3, 7, 3), (2, 577, 288), (1, 1000, 999)])
@pytest.mark.parametrize("noise", [True, False])
def test_matches_reference(B, N, k, noise):
    if N > 100 and not noise:
        pytest.skip("large sizes once (the interpreter sorts slowly)")
    g = torch.Generator().manual_seed(N + k)
    logits = torch.randn(B, N, generator=g).to(DEV)
    out = gumbel_topk(logits, k, tau=0.5, noise=noise, seed=11)
    assert out[0].shape == (B, k) and out[1].shape == (B, N) and out[2].shape == (B, N)
    assert (out[0][:, 1:] > out[0][:, :-1]).all()  # ascending positions
    assert out[1].sum(-1).eq(k).all()
    assert_same(out, ref(logits, k, seed=11, noise=noise, tau=0.5))


def test_per_row_k_pads_with_minus_one():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).to(DEV)
    k = torch.tensor([1, 3, 7])
    idx, mask, soft = out = gumbel_topk(logits, k, noise=False)
    assert idx.shape == (3, 7)
    assert idx[0, 1:].eq(-1).all() and idx[1, 3:].eq(-1).all() and torch.equal(idx[2].cpu(), torch.arange(7))
    assert mask.sum(-1).tolist() == [1, 3, 7]
    assert idx[0, 0] == logits[0].argmax()
    assert soft[2].eq(1).all()  # k = N: theta = -inf
    assert_same(out, ref(logits, k, noise=False))
    big = torch.randn(2, 577, generator=torch.Generator().manual_seed(2)).to(DEV)
    assert_same(gumbel_topk(big, torch.tensor([5, 300]), seed=3), ref(big, torch.tensor([5, 300]), seed=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    out = gumbel_topk(logits, 9, seed=4)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_same(out, ref(logits, 9, seed=4), soft_atol=4e-3)  # soft is returned rounded to 16 bits


def test_non_contiguous_logits():
    big = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)).to(DEV)
    logits = big[::2, ::2]
    assert not logits.is_contiguous()
    assert_same(gumbel_topk(logits, 6, seed=1), ref(logits.contiguous(), 6, seed=1))


def test_ties_lower_index_wins_and_minus_inf_chosen_last():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, -0.0], [float("-inf"), 3.0, float("-inf"), 1.0, float("-inf"), -1.0]])
    idx, mask, soft = gumbel_topk(x.to(DEV), 2, noise=False)
    assert idx.tolist() == [[1, 2], [1, 3]]
    idx, mask, soft = gumbel_topk(x.to(DEV), 4, noise=False)
    assert idx.tolist() == [[0, 1, 2, 4], [0, 1, 3, 5]]  # -inf only once finite ones run out, lower index first
    assert torch.isfinite(soft).all()
    idx, _, _ = gumbel_topk(x[:1].to(DEV), 5, noise=False)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]  # 0.0 at index 3 before -0.0 at index 5


def test_seeds():
    logits = torch.zeros(4, 30).to(DEV)
    a, b, c = (gumbel_topk(logits, 5, seed=s)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = gumbel_topk(logits, 5)[0]
    torch.manual_seed(0)
    assert torch.equal(d, gumbel_topk(logits, 5)[0])


def _softmax_check(freq, logits, tol):
    expect = torch.softmax(logits, -1)
    assert (freq - expect).abs().max() < tol, (freq, expect)


def test_gumbel_max_property_of_the_kernel_noise():
    """argmax(logits + g) ~ softmax(logits): 20000 draws from the kernel's generator."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    g = gumbel_noise((1, 80000), 7, DEV, triton_path=True).view(20000, 4).cpu()
    freq = torch.bincount((logits + g).argmax(-1), minlength=4).float() / 20000
    _softmax_check(freq, logits, 0.015)  # ~4.5 standard errors
    assert abs(g.mean().item() - 0.5772) < 0.03 and abs(g.var().item() - 1.6449) < 0.08  # Gumbel(0,1) moments


def test_gumbel_max_property_end_to_end():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    idx, _, _ = gumbel_topk(logits.expand(300, 4).contiguous().to(DEV), 1, seed=3)
    _softmax_check(torch.bincount(idx[:, 0].cpu(), minlength=4).float() / 300, logits, 0.11)
    g = gumbel_noise((20000, 4), 5, "cpu", triton_path=False)  # the reference path's noise
    idx, _, _ = gumbel_topk_reference(logits.expand(20000, 4), torch.ones(20000, dtype=torch.long), 1, 1.0, g)
    _softmax_check(torch.bincount(idx[:, 0], minlength=4).float() / 20000, logits, 0.015)


def test_soft_tends_to_mask_as_tau_goes_to_zero():
    logits = (torch.randperm(64, generator=torch.Generator().manual_seed(8)).float() * 0.1).view(2, 32).to(DEV)
    _, mask, soft = gumbel_topk(logits, 10, tau=1e-3, noise=False)
    assert (soft - mask).abs().max() < 1e-6
    _, _, soft_warm = gumbel_topk(logits, 10, tau=1.0, noise=False)
    assert (soft_warm - mask).abs().max() > 0.3


def test_straight_through_gradient():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 33, generator=g).to(DEV).requires_grad_()
    w_mask, w_soft = torch.randn(3, 33, generator=g).to(DEV), torch.randn(3, 33, generator=g).to(DEV)
    _, mask, soft = gumbel_topk(logits, 8, tau=0.7, seed=2)
    ((mask * w_mask).sum() + (soft * w_soft).sum()).backward()
    ours = logits.grad.clone()
    s = soft.detach()
    torch.testing.assert_close(ours, (w_mask + w_soft) * s * (1 - s) / 0.7, atol=1e-6, rtol=1e-5)
    logits.grad = None
    _, rmask, rsoft = ref(logits, 8, seed=2, tau=0.7)
    ((rmask * w_mask).sum() + (rsoft * w_soft).sum()).backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(2, 5), 0), {}, r"k must be an int in 1..N = 1..5"),
    ((torch.randn(2, 5), 6), {}, r"k must be an int in 1..N"),
    ((torch.randn(2, 5), torch.tensor([1, 6])), {}, r"every k must be in 1..N = 1..5"),
    ((torch.randn(2, 5), torch.tensor([1, 2, 3])), {}, r"per-row k must be an integer tensor \[B\] = \[2\]"),
    ((torch.randn(2, 5), 2), {"tau": 0.0}, "tau must be > 0"),
    ((torch.randn(5), 2), {}, r"logits must be a \[B, N\] tensor"),
    ((torch.ones(2, 5, dtype=torch.long), 2), {}, "logits must be float32"),
    ((torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1), {}, r"NaN \(first in row 0\)"),
])
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gumbel_topk(*args, **kwargs)
