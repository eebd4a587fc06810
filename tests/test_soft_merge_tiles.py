"""soft_merge's tiles (issue 18): the key dim read BK columns at a time and dkeys / dqueries
computed BKO columns per program. Widths of several tiles and a ragged last one, against the
reference (the Triton interpreter without a GPU, the kernels on one)."""
import pytest
import torch

from vtprune.kernels import soft_merge
from vtprune.kernels._triton import use_triton
from vtprune.kernels.soft_merge import soft_merge_reference, tiles

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not use_triton(torch.empty(0, device=DEV)), reason="needs triton (GPU) or TRITON_INTERPRET=1")
@pytest.mark.parametrize("d", [515, 150])  # the design's 512 + 3 locality columns; 150 = 2 BKO tiles + a ragged one
def test_key_dim_wider_than_a_tile(d):
    t = tiles(torch.float32, DEV == "cuda")
    assert d > t["BKO"] and d % t["BK"]  # several key tiles, the last one partial
    g = torch.Generator().manual_seed(d)
    x, k, q = (torch.randn(*s, generator=g).to(DEV).requires_grad_() for s in ((2, 40, 24), (2, 40, d), (2, 12, d)))
    grad = torch.randn(2, 12, 24, generator=g).to(DEV)
    outs = []
    for fn in (soft_merge, soft_merge_reference):
        out = fn(x, k, q, 0.5)
        out.backward(grad)
        outs.append((out.detach(), [t_.grad.clone() for t_ in (x, k, q)]))
        for t_ in (x, k, q):
            t_.grad = None
    (o, gs), (ro, rgs) = outs
    torch.testing.assert_close(o, ro, atol=2e-6, rtol=1e-5)
    for name, a, b in zip(("x", "keys", "queries"), gs, rgs):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4, msg=name)
