"""soft_merge: Triton forward/backward (interpreter without a GPU) against the reference."""
import pytest
import torch

from vtprune.kernels import soft_merge
from vtprune.kernels._triton import use_triton
from vtprune.kernels.soft_merge import soft_merge_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEV)),
                                  reason="needs triton (GPU) or TRITON_INTERPRET=1")


def inputs(B, N, M, D, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_()  # noqa: E731
    return make(B, N, D), make(B, N, d), make(B, M, d)


def run(fn, x, k, q, tau, grad):
    out = fn(x, k, q, tau)
    out.backward(grad)
    grads = [t.grad.clone() for t in (x, k, q)]
    for t in (x, k, q):
        t.grad = None
    return out.detach(), grads


@needs_triton
@pytest.mark.parametrize("B,N,M,D,d", [(2, 1, 1, 3, 4), (2, 7, 3, 5, 8), (3, 7, 7, 70, 20), (1, 577, 288, 33, 16),
                                       (1, 1000, 100, 65, 64)])
def test_forward_and_gradients_match_reference(B, N, M, D, d):
    x, k, q = inputs(B, N, M, D, d, seed=N)
    grad = torch.randn(B, M, D, generator=torch.Generator().manual_seed(1)).to(DEV)
    out, grads = run(soft_merge, x, k, q, 0.7, grad)
    rout, rgrads = run(soft_merge_reference, x, k, q, 0.7, grad)
    torch.testing.assert_close(out, rout, atol=2e-6, rtol=1e-5)
    for name, a, b in zip(("x", "keys", "queries"), grads, rgrads):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4, msg=name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_the_reference_own(dtype):
    """Both compute from the same 16-bit inputs; each is compared with an fp32 computation on those
    inputs, and the kernel may be off by at most ~2x what the reference loses (plus a floor)."""
    x, k, q = inputs(2, 40, 12, 24, 16, dtype=dtype)
    exact = soft_merge_reference(x.float(), k.float(), q.float(), 0.5)
    ours = soft_merge(x, k, q, 0.5).float()
    ref_err = (soft_merge_reference(x, k, q, 0.5).float() - exact).abs().max().item()
    err = (ours - exact).abs().max().item()
    assert ref_err > 0 and err <= 2 * ref_err + 1e-3, (err, ref_err)
    ours.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, k, q))


@needs_triton
def test_non_contiguous_inputs():
    x, k, q = inputs(2, 30, 10, 12, 8)
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    qt = q.detach()[:, ::1].expand(2, 10, 8)
    assert not xt.is_contiguous()
    torch.testing.assert_close(soft_merge(xt, k.detach(), qt, 1.0), soft_merge_reference(x, k, q, 1.0).detach(),
                               atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("B,N,M,d", [(2, 7, 3, 8), (1, 577, 288, 16)])
def test_sizes_match_reference_and_count_every_token_once(B, N, M, d):
    """sizes = the merge weights' column sums: the kernel's equal the reference's, each token's
    weights sum to 1 so the sizes add up to N, and the merged output is unchanged."""
    x, k, q = inputs(B, N, M, 9, d, seed=N + 1)
    out, sizes = soft_merge(x, k, q, 0.3, return_sizes=True)
    rout, rsizes = soft_merge_reference(x, k, q, 0.3, return_sizes=True)
    assert sizes.shape == (B, M) and sizes.dtype == torch.float32 and not sizes.requires_grad
    torch.testing.assert_close(sizes, rsizes, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sizes.sum(1), torch.full((B,), float(N), device=DEV), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out, soft_merge(x, k, q, 0.3))
    out.sum().backward()  # the sizes output does not get in the way of the gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: soft_merge_reference(a, b, c, 0.8), (x, k, q))


def test_reference_is_a_weighted_mean():
    """With one centre every token has weight 1: the merge is the mean (up to the 1e-6 in the denominator)."""
    x = torch.randn(2, 9, 4)
    out = soft_merge_reference(x, torch.randn(2, 9, 3), torch.randn(2, 1, 3), 1.0)
    torch.testing.assert_close(out[:, 0], x.mean(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((2, 5, 4), (2, 5, 3), (2, 6, 3)), {}, r"need 1 <= M <= N"),
    (((2, 5, 4), (2, 4, 3), (2, 2, 3)), {}, r"keys must be \[B, N, d\] = \[2, 5, d\]"),
    (((2, 5, 4), (2, 5, 3), (2, 2, 2)), {}, r"queries must be \[B, M, d\] = \[2, M, 3\]"),
    (((2, 5, 4), (2, 5, 3), (2, 2, 3)), {"tau": -1.0}, "tau must be > 0"),
    (((5, 4), (2, 5, 3), (2, 2, 3)), {}, "x must be a 3-d tensor"),
])
def test_errors(shapes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_merge(*(torch.randn(*s) for s in shapes), **kwargs)
