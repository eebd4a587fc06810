"""Hostile inputs to the kernels' public ops (issue 16).

- Bad arguments: one VtpruneError (a ValueError) whose message names the op and the argument,
  the same on every path.
- Documented edge cases (+-inf, NaN, ties, -0.0, huge and tiny values, empty dimensions, strides,
  mixed dtypes) give the documented results on the reference path and on the Triton path (the
  interpreter without a GPU, compiled Triton with one), gradients included.
- Hypothesis fuzzes gumbel_topk and soft_merge on both paths against their references
  (derandomized, so CI sees the same examples every run).

"reference" forces the PyTorch reference inside the public op (use_triton patched to False);
"triton" leaves the dispatch alone (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
For compaction the two paths are the compiled ops (csrc/) and the reference.
"""
import contextlib
import importlib
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vtprune.errors import VtpruneError
from vtprune.kernels import compaction as C
from vtprune.kernels import gumbel_topk, soft_merge
from vtprune.kernels._triton import use_triton

GT = importlib.import_module("vtprune.kernels.gumbel_topk")  # the package attribute is the function
SM = importlib.import_module("vtprune.kernels.soft_merge")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = use_triton(torch.empty(0, device=DEV))
PATHS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton (GPU) or "
                                                                                          "TRITON_INTERPRET=1"))]
INF, NAN = float("inf"), float("nan")
EPS, TINY = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
_FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# VTPRUNE_FUZZ_SCALE=N runs N times the examples, freshly random (not derandomized) each run.
_SCALE = int(os.environ.get("VTPRUNE_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    """Reproducible (derandomized, no example database) and bounded: the interpreter is slow."""
    return settings(_FUZZ, max_examples=examples * _SCALE, derandomize=_SCALE == 1)


# z = (p - theta) / tau overflows to +-inf on purpose for huge logits or tiny tau (sigmoid then
# saturates to exactly 0 or 1); numpy, which runs the interpreter, warns about it.
saturating = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@contextlib.contextmanager
def on_path(path: str):
    if path == "reference":
        with mock.patch.object(GT, "use_triton", lambda t: False), mock.patch.object(SM, "use_triton",
                                                                                      lambda t: False):
            yield
    else:
        yield


def both_paths():
    return ["reference", "triton"] if TRITON else ["reference"]


def raises(fn, *needles):
    """fn() raises VtpruneError whose message holds every needle."""
    with pytest.raises(VtpruneError) as e:
        fn()
    msg = str(e.value)
    assert all(n in msg for n in needles), (msg, needles)
    assert isinstance(e.value, ValueError)


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype, device=DEV)


# ============================================================================ argument errors
L = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
GUMBEL_ERRORS = {
    "logits-list": (([[0.1, 0.2]], 1), {}, ["gumbel_topk: logits must be a [B, N] torch.Tensor", "got list"]),
    "logits-numpy": ((np.zeros((2, 5), np.float32), 1), {}, ["logits must be a [B, N] torch.Tensor", "ndarray"]),
    "logits-1d": ((torch.randn(5), 1), {}, ["logits must be a [B, N] tensor", "shape [5]"]),
    "logits-3d": ((torch.randn(1, 2, 5), 1), {}, ["logits must be a [B, N] tensor", "shape [1, 2, 5]"]),
    "logits-int": ((torch.ones(2, 5, dtype=torch.long), 1), {}, ["logits must be float32, bfloat16", "torch.int64"]),
    "logits-bool": ((torch.ones(2, 5, dtype=torch.bool), 1), {}, ["logits must be float32", "torch.bool"]),
    "logits-N0": ((torch.zeros(2, 0), 1), {}, ["logits has no columns (N = 0)"]),
    "k-0": ((L, 0), {}, ["k must be an int in 1..N = 1..5", "int 0"]),
    "k-too-big": ((L, 6), {}, ["k must be an int in 1..N = 1..5", "int 6"]),
    "k-negative": ((L, -1), {}, ["k must be an int in 1..N", "int -1"]),
    "k-bool": ((L, True), {}, ["k must be an int", "bool True"]),
    "k-float": ((L, 2.0), {}, ["k must be an int", "float 2.0"]),
    "k-str": ((L, "2"), {}, ["k must be an int", "str '2'"]),
    "k-rows-shape": ((L, torch.tensor([1, 2, 3])), {}, ["per-row k must be an integer tensor [B] = [2]", "shape [3]"]),
    "k-rows-2d": ((L, torch.ones(2, 1, dtype=torch.long)), {}, ["per-row k must be", "shape [2, 1]"]),
    "k-rows-float": ((L, torch.tensor([1.0, 2.0])), {}, ["per-row k must be an integer tensor", "float32"]),
    "k-rows-0": ((L, torch.tensor([0, 2])), {}, ["every k must be in 1..N = 1..5", "values in 0..2"]),
    "k-rows-too-big": ((L, torch.tensor([1, 6])), {}, ["every k must be in 1..N = 1..5", "values in 1..6"]),
    "k-rows-device": ((L, torch.ones(2, dtype=torch.long, device="meta")), {},
                      ["logits, k must be on one device", "k on meta"]),
    "tau-0": ((L, 2), {"tau": 0.0}, ["tau must be > 0, got 0.0"]),
    "tau-negative": ((L, 2), {"tau": -1.0}, ["tau must be > 0, got -1.0"]),
    "tau-nan": ((L, 2), {"tau": NAN}, ["tau must be > 0, got nan"]),
    "tau-inf": ((L, 2), {"tau": INF}, ["tau must be > 0 and finite, within [1e-30, 1e+30]", "got inf"]),
    "tau-denormal": ((L, 2), {"tau": 1e-39}, ["tau must be > 0 and finite", "got 1e-39"]),
    "tau-str": ((L, 2), {"tau": "1"}, ["tau must be a number > 0", "str '1'"]),
    "tau-bool": ((L, 2), {"tau": True}, ["tau must be a number", "bool True"]),
    "tau-tensor": ((L, 2), {"tau": torch.tensor(1.0)}, ["tau must be a number", "tensor of shape []"]),
    "seed-str": ((L, 2), {"seed": "3"}, ["seed must be None or an int in [0, 2**64)", "str '3'"]),
    "seed-float": ((L, 2), {"seed": 3.0}, ["seed must be None or an int", "float 3.0"]),
    "seed-negative": ((L, 2), {"seed": -1}, ["seed must be None or an int in [0, 2**64)", "int -1"]),
    "seed-2**64": ((L, 2), {"seed": 2**64}, ["seed must be None or an int", str(2**64)]),
    "seed-bool": ((L, 2), {"seed": True}, ["seed must be None or an int", "bool True"]),
    "noise-str": ((L, 2), {"noise": "no"}, ["noise must be True or False", "str 'no'"]),
    "validate-int": ((L, 2), {"validate": 1}, ["validate must be True or False", "int 1"]),
    "nan-logits": ((torch.tensor([[0.0, 1.0], [1.0, NAN]]), 1), {}, ["logits contain NaN (first in row 1)"]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(GUMBEL_ERRORS))
def test_gumbel_topk_argument_errors(case, path):
    args, kwargs, needles = GUMBEL_ERRORS[case]
    with on_path(path):
        raises(lambda: gumbel_topk(*args, **kwargs), "gumbel_topk: ", *needles)


X, K, Q = torch.randn(2, 5, 4), torch.randn(2, 5, 3), torch.randn(2, 2, 3)
MERGE_ERRORS = {
    "x-list": ((X.tolist(), K, Q), {}, ["x must be a 3-d torch.Tensor [B, N, D]", "got list"]),
    "keys-numpy": ((X, K.numpy(), Q), {}, ["keys must be a 3-d torch.Tensor [B, N, d]", "ndarray"]),
    "queries-tuple": ((X, K, (1.0, 2.0)), {}, ["queries must be a 3-d torch.Tensor [B, M, d]", "tuple"]),
    "x-2d": ((X[0], K, Q), {}, ["x must be a 3-d tensor [B, N, D]", "shape [5, 4]"]),
    "keys-4d": ((X, K[None], Q), {}, ["keys must be a 3-d tensor [B, N, d]", "shape [1, 2, 5, 3]"]),
    "x-int": ((X.long(), K, Q), {}, ["x must be float32, bfloat16, float16 or float64", "torch.int64"]),
    "keys-int": ((X, K.int(), Q), {}, ["keys must be float32", "torch.int32"]),
    "queries-bool": ((X, K, Q > 0), {}, ["queries must be float32", "torch.bool"]),
    "D-0": ((X[..., :0], K, Q), {}, ["x has an empty feature dimension (D = 0)"]),
    "d-0": ((X, K[..., :0], Q[..., :0]), {}, ["empty key dimension (d = 0)"]),
    "N-0": ((X[:, :0], K[:, :0], Q[:, :1]), {}, ["need 1 <= M <= N", "M = 1", "N = 0"]),
    "M-0": ((X, K, Q[:, :0]), {}, ["need 1 <= M <= N", "M = 0"]),
    "M-above-N": ((X, K, torch.randn(2, 6, 3)), {}, ["need 1 <= M <= N", "M = 6", "N = 5"]),
    "keys-batch": ((X, torch.randn(3, 5, 3), Q), {}, ["keys must be [B, N, d] = [2, 5, d]", "(3, 5, 3)"]),
    "keys-N": ((X, K[:, :4], Q), {}, ["keys must be [B, N, d] = [2, 5, d]", "(2, 4, 3)"]),
    "queries-d": ((X, K, torch.randn(2, 2, 2)), {}, ["queries must be [B, M, d] = [2, M, 3]", "(2, 2, 2)"]),
    "device": ((X, K, Q.to("meta")), {}, ["x, keys, queries must be on one device", "queries on meta"]),
    "tau-0": ((X, K, Q), {"tau": 0}, ["tau must be > 0, got 0.0"]),
    "tau-nan": ((X, K, Q), {"tau": NAN}, ["tau must be > 0, got nan"]),
    "tau-huge": ((X, K, Q), {"tau": 1e31}, ["tau must be > 0 and finite, within [1e-30, 1e+30]", "1e+31"]),
    "tau-str": ((X, K, Q), {"tau": "0.5"}, ["tau must be a number", "str '0.5'"]),
    "return_sizes-str": ((X, K, Q), {"return_sizes": "yes"}, ["return_sizes must be True or False", "str 'yes'"]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(MERGE_ERRORS))
def test_soft_merge_argument_errors(case, path):
    args, kwargs, needles = MERGE_ERRORS[case]
    with on_path(path):
        raises(lambda: soft_merge(*args, **kwargs), "soft_merge: ", *needles)


SRC, IDX, LEN = torch.randn(2, 10, 4), torch.tensor([[0, 3, 5], [1, 2, 0]]), torch.tensor([3, 2])
KV = torch.randn(2, 2, 10, 4)
OUT = torch.empty(2, 2, 3, 4)
GATHER_ERRORS = {
    "src-list": ((SRC.tolist(), IDX, LEN), ["src must be a [B, T] or [B, T, ...] torch.Tensor", "got list"]),
    "src-1d": ((SRC[0, :, 0], IDX, LEN), ["src must be a [B, T] or [B, T, ...] tensor", "shape [10]"]),
    "idx-list": ((SRC, IDX.tolist(), LEN), ["idx must be a 2-d torch.Tensor [B, K]", "got list"]),
    "idx-float": ((SRC, IDX.float(), LEN), ["idx must be an int32 or int64 tensor", "torch.float32"]),
    "idx-int16": ((SRC, IDX.short(), LEN), ["idx must be an int32 or int64 tensor", "torch.int16"]),
    "idx-1d": ((SRC, IDX[0], LEN), ["idx must be a 2-d tensor [B, K]", "shape [3]"]),
    "idx-batch": ((SRC, torch.zeros(3, 3, dtype=torch.long), LEN), ["idx must be [B, K] and lengths [B] with B = 2",
                                                                    "(3, 3)"]),
    "lengths-2d": ((SRC, IDX, LEN[None]), ["lengths must be a 1-d tensor [B]", "shape [1, 2]"]),
    "lengths-float": ((SRC, IDX, LEN.float()), ["lengths must be an int32 or int64 tensor", "torch.float32"]),
    "lengths-numpy": ((SRC, IDX, LEN.numpy()), ["lengths must be a 1-d torch.Tensor [B]", "ndarray"]),
    "lengths-device": ((SRC, IDX, LEN.to("meta")), ["lengths (on meta) must be on the data's device cpu"]),
    "idx-range": ((SRC, torch.tensor([[0, 3, 10], [1, 2, 0]]), LEN), ["idx[0, 2] = 10 is out of range [0, 10)"]),
    "lengths-range": ((SRC, IDX, torch.tensor([3, 4])), ["lengths[1] = 4 is outside [0, K = 3]"]),
}
KV_ERRORS = {
    "k_caches-tensor": ((KV, [KV], IDX, LEN, [OUT], [OUT.clone()]),
                        ["k_caches must be a list or tuple of tensors (one per layer)",
                         "tensor of shape [2, 2, 10, 4]"]),
    "v_caches-item": (([KV], [[1.0]], IDX, LEN, [OUT], [OUT.clone()]),
                      ["v_caches[0] must be a 4-d torch.Tensor [B, H, T, Dh]", "list"]),
    "list-lengths": (([KV, KV], [KV], IDX, LEN, [OUT], [OUT.clone()]),
                     ["k_caches, v_caches, k_out and v_out must have the same length", "got 2, 1, 1, 1"]),
    "cache-3d": (([KV[0]], [KV[0]], IDX, LEN, [OUT], [OUT.clone()]),
                 ["k_caches[0] must be a 4-d tensor [B, H, T, Dh]", "shape [2, 10, 4]"]),
    "v-shape": (([KV], [KV[:, :, :9]], IDX, LEN, [OUT], [OUT.clone()]),
                ["v_caches[0] must match k_caches[0]", "shape [2, 2, 9, 4]"]),
    "v-dtype": (([KV], [KV.bfloat16()], IDX, LEN, [OUT], [OUT.clone()]),
                ["v_caches[0] must match k_caches[0]", "bfloat16"]),
    "k_out-short": (([KV], [KV], IDX, LEN, [OUT[:, :, :2]], [OUT[:, :, :2].clone()]),
                    ["k_out[0] must be [B, H, >= K, Dh] = [2, 2, >= 3, 4]", "[2, 2, 2, 4]"]),
    "v_out-dtype": (([KV], [KV], IDX, LEN, [OUT], [OUT.half()]),
                    ["v_out[0] must be float32 (the caches' dtype)", "float16"]),
    "idx-float": (([KV], [KV], IDX.float(), LEN, [OUT], [OUT.clone()]),
                  ["compact_kv: idx must be an int32 or int64 tensor", "torch.float32"]),
    "out-is-cache": (([KV], [KV.clone()], IDX, LEN, [KV[:, :, :3]], [OUT.clone()]),
                     ["k_out[0] overlaps k_caches[0] in memory"]),
    "outs-shared": (([KV], [KV], IDX, LEN, [OUT], [OUT]), ["overlaps", "k_out[0]", "v_out[0]"]),
    "no-layers-bad-idx": (([], [], IDX.tolist(), LEN, [], []), ["compact_kv: idx must be a 2-d torch.Tensor"]),
    "validate-str": (([KV], [KV], IDX, LEN, [OUT], [OUT.clone()], "no"), ["validate must be True or False"]),
}


@contextlib.contextmanager
def compaction_path(path: str):
    if path == "reference":
        with mock.patch.object(C, "_HAVE_OPS", False), mock.patch.object(C, "_HAVE_CUDA_OPS", False):
            yield
    else:
        if not C._HAVE_OPS:
            pytest.skip("the compiled ops are not built here")
        yield


COMPACTION_PATHS = ["reference", "compiled"]


@pytest.mark.parametrize("path", COMPACTION_PATHS)
@pytest.mark.parametrize("case", [f"gather-{c}" for c in GATHER_ERRORS] + [f"kv-{c}" for c in KV_ERRORS])
def test_compaction_argument_errors(case, path):
    kind, name = case.split("-", 1)
    args, needles = (GATHER_ERRORS if kind == "gather" else KV_ERRORS)[name]
    fn = C.gather_tokens if kind == "gather" else C.compact_kv
    with compaction_path(path):
        raises(lambda: fn(*args), f"{fn.__name__}: ", *needles)


# ============================================================================ gumbel_topk edges
def sig(v):
    return torch.sigmoid(torch.tensor(v, dtype=torch.float32)).item()


# row, k, kwargs, indices, mask, soft (tau = 1, no noise)
GUMBEL_EDGES = {
    "all-+inf-k=N": ([INF, INF, INF], 3, {}, [0, 1, 2], [1, 1, 1], [1, 1, 1]),
    "+inf-and--inf": ([INF, -INF], 1, {}, [0], [1, 0], [1, 0]),
    "+inf-tie-at-k": ([INF, 2.0, INF], 1, {}, [0], [1, 0, 0], [1, 0, 0]),
    "+inf-selected-finite-theta": ([INF, 1.0, 0.0], 2, {}, [0, 1], [1, 1, 0], [1, sig(0.5), sig(-0.5)]),
    "all--inf": ([-INF] * 4, 2, {}, [0, 1], [1, 1, 0, 0], [1, 1, 0, 0]),
    "-inf-needed": ([-INF, 3.0, -INF, 1.0], 3, {}, [0, 1, 3], [1, 1, 0, 1], [1, 1, 0, 1]),
    "nan-as--inf": ([NAN, 1.0, 2.0], 2, {"validate": False}, [1, 2], [0, 1, 1], [0, 1, 1]),
    "nan-ties-by-index": ([NAN, NAN, 0.0], 2, {"validate": False}, [0, 2], [1, 0, 1], [1, 0, 1]),
    "ties": ([1.0, 1.0, 1.0, 1.0], 2, {}, [0, 1], [1, 1, 0, 0], [0.5] * 4),
    "minus-zero": ([-0.0, 0.0], 1, {}, [0], [1, 0], [0.5, 0.5]),
    "huge": ([3e38, -3e38], 1, {}, [0], [1, 0], [1, 0]),
    "denormal": ([1e-45, 0.0], 1, {}, [0], [1, 0], [0.5, 0.5]),
    "tiny-tau": ([1.0, 0.0, 2.0], 2, {"tau": 1e-30}, [0, 2], [1, 0, 1], [1, 0, 1]),
    "huge-tau": ([1.0, 0.0, 2.0], 2, {"tau": 1e30}, [0, 2], [1, 0, 1], [0.5, 0.5, 0.5]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(GUMBEL_EDGES))
def test_gumbel_topk_edge_values(case, path):
    """Documented results, gradients finite (0 on hard rows: k = N or an infinite value at the
    threshold, where soft is the mask)."""
    row, k, kwargs, idx, mask, soft = GUMBEL_EDGES[case]
    logits = t(row).requires_grad_()
    with on_path(path):
        i, m, s = gumbel_topk(logits, k, noise=False, **kwargs)
    assert i.tolist() == [idx] and m.tolist() == [mask]
    torch.testing.assert_close(s, t(soft), atol=4 * EPS, rtol=0)
    w = torch.arange(1.0, len(row) + 1, device=DEV)
    (m * w + s * w).sum().backward()
    g = logits.grad[0]
    assert torch.isfinite(g).all()
    s_ = torch.tensor(soft, device=DEV)
    torch.testing.assert_close(g, 2 * w * s_ * (1 - s_) / kwargs.get("tau", 1.0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_gumbel_topk_empty_batch(path):
    logits = torch.zeros(0, 7, device=DEV, requires_grad=True)
    with on_path(path):
        i, m, s = gumbel_topk(logits, 3)
        i2, m2, s2 = gumbel_topk(logits, torch.zeros(0, dtype=torch.long, device=DEV), noise=False)
    assert i.shape == (0, 3) and i2.shape == (0, 0) and m.shape == s.shape == m2.shape == (0, 7)
    (m.sum() + s.sum() + m2.sum()).backward()
    assert logits.grad.shape == (0, 7)


@pytest.mark.parametrize("path", PATHS)
def test_gumbel_topk_strided_and_expanded_logits(path):
    base = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)).to(DEV)
    cases = [base[::2, ::3], base.t()[:9, :4].t(), base[2, :17].expand(3, 17)]
    with on_path(path):
        for logits in cases:
            assert not logits.is_contiguous()
            (i, m, s), (ci, cm, cs) = (gumbel_topk(v, 4, noise=False) for v in (logits, logits.contiguous()))
            assert torch.equal(i, ci) and torch.equal(m, cm)
            torch.testing.assert_close(s, cs, atol=4 * EPS, rtol=0)  # sigmoid's vector / scalar code


@pytest.mark.parametrize("path", PATHS)
def test_gumbel_topk_16_bit_infinities(path):
    """fp16 overflows to inf on the cast: the kernel and the reference read the same inf."""
    logits = t([7e4, 1.0, -7e4, 0.0], dtype=torch.float16)
    assert torch.isinf(logits).sum() == 2
    with on_path(path):
        i, m, s = gumbel_topk(logits, 3, noise=False)
    assert i.tolist() == [[0, 1, 3]] and s.dtype == torch.float16 and s.tolist() == [[1, 1, 0, 1]]


def graph_nodes(t: torch.Tensor) -> set:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return seen


def test_the_two_paths_are_different_code():
    """So that their agreement below means something."""
    logits = torch.randn(2, 6, device=DEV, requires_grad=True)
    x = torch.randn(1, 4, 3, device=DEV, requires_grad=True)
    kernels = {"GumbelTopKFunctionBackward", "SoftMergeFunctionBackward"}
    for path in both_paths():
        with on_path(path):
            nodes = graph_nodes(gumbel_topk(logits, 2)[1]) | graph_nodes(soft_merge(x, x, x[:, :2]))
        assert (nodes & kernels) == (kernels if path == "triton" else set()), (path, nodes)


# ============================================================================ soft_merge edges
def merge_inputs(B=3, N=7, M=3, D=5, d=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(DEV, dtype) for s in ((B, N, D), (B, N, d), (B, M, d))]


def merge_run(x, k, q, tau=0.7, grad=None):
    leaves = [v.detach().clone().requires_grad_() for v in (x, k, q)]
    out, sizes = soft_merge(*leaves, tau=tau, return_sizes=True)
    if grad is None:
        grad = torch.ones_like(out)
    torch.where(torch.isnan(out), 0.0, out * grad).sum().backward()
    return out.detach(), sizes, [v.grad for v in leaves]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where,value", [("x", INF), ("x", -INF), ("x", NAN), ("keys", INF), ("keys", NAN),
                                         ("queries", -INF), ("queries", NAN)])
def test_soft_merge_non_finite_rows(where, value, path):
    """A row holding NaN or +-inf: merged and sizes all NaN, its gradients exactly 0; the other
    rows as if it were not there."""
    x, k, q = merge_inputs()
    clean = [v[[0, 2]] for v in (x, k, q)]
    {"x": x, "keys": k, "queries": q}[where][1, 1, 2] = value
    with on_path(path):
        out, sizes, grads = merge_run(x, k, q)
        cout, csizes, cgrads = merge_run(*clean)
    assert torch.isnan(out[1]).all() and torch.isnan(sizes[1]).all()
    assert all(gr[1].eq(0).all() for gr in grads)
    # the same rows in a batch of 2: equal up to the batched matmul's blocking (values ~1, N = 7)
    tol = dict(atol=32 * EPS, rtol=8 * EPS)
    torch.testing.assert_close(out[[0, 2]], cout, **tol)
    torch.testing.assert_close(sizes[[0, 2]], csizes, **tol)
    for gr, cg in zip(grads, cgrads):
        torch.testing.assert_close(gr[[0, 2]], cg, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_soft_merge_empty_batch(path):
    x, k, q = (torch.zeros(0, n, c, device=DEV, requires_grad=True) for n, c in ((6, 5), (6, 4), (2, 4)))
    with on_path(path):
        out, sizes = soft_merge(x, k, q, return_sizes=True)
    assert out.shape == (0, 2, 5) and sizes.shape == (0, 2)
    out.sum().backward()
    assert x.grad.shape == (0, 6, 5) and q.grad.shape == (0, 2, 4)


@pytest.mark.parametrize("path", PATHS)
def test_soft_merge_strided_expanded_and_mixed_dtypes(path):
    """Any strides work; keys and queries of other dtypes are used in x's dtype, and their
    gradients come back in their own."""
    x, k, q = merge_inputs(B=2, N=9, M=4, D=6, d=5, seed=1)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    qe = q[:1].expand(2, 4, 5)
    kb, qd = k.to(torch.bfloat16), q.double()
    tol = dict(atol=32 * EPS, rtol=8 * EPS)  # layouts may change the matmul's blocking (values ~1, N = 9)
    with on_path(path):
        expect = soft_merge(x, k, q[:1].repeat(2, 1, 1))
        torch.testing.assert_close(soft_merge(xt, k, qe), expect, **tol)
        leaves = [v.clone().requires_grad_() for v in (x, kb, qd)]
        out = soft_merge(*leaves)
        torch.testing.assert_close(out, soft_merge(x, kb.float(), qd.float()), **tol)
    out.sum().backward()
    assert [v.grad.dtype for v in leaves] == [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("path", PATHS)
def test_soft_merge_ties_give_the_mean(path):
    """Equal queries (ties): every token spreads evenly, each centre is the mean of x."""
    x, k, q = merge_inputs(B=2, N=6, M=3, D=4, d=4, seed=2)
    q = q[:, :1].expand(2, 3, 4)
    with on_path(path):
        out, sizes = soft_merge(x, k, q, return_sizes=True)
    torch.testing.assert_close(sizes, torch.full((2, 3), 2.0, device=DEV), atol=8 * EPS, rtol=0)
    mean = x.mean(1, keepdim=True).expand(2, 3, 4) * (2.0 / (2.0 + 1e-6))
    torch.testing.assert_close(out, mean, atol=16 * EPS * x.abs().max().item(), rtol=0)


# ============================================================================ compaction edges
def naive_gather(src, idx, lengths):
    out = torch.zeros((src.shape[0], idx.shape[1], *src.shape[2:]), dtype=src.dtype)
    for b in range(src.shape[0]):
        for j in range(int(lengths[b])):
            out[b, j] = src[b, int(idx[b, j])]
    return out


@pytest.mark.parametrize("path", COMPACTION_PATHS)
def test_compact_kv_any_layout_on_every_path(path):
    """Caches whose last axis is strided, layers with different strides, strided outputs: the
    compiled launch cannot take them, so they run the reference; same results either way."""
    g = torch.Generator().manual_seed(3)
    B, H, T, Dh, K = 2, 3, 11, 4, 5
    k0 = torch.randn(B, H, Dh, T, generator=g).transpose(2, 3)          # stride(3) = T
    k1 = torch.randn(B, H, T + 4, Dh, generator=g)[:, :, 2:2 + T]        # other strides
    v0, v1 = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, T, Dh, generator=g)
    outs = [torch.full((B, H, Dh, K + 2), 7.0).transpose(2, 3) for _ in range(4)]
    idx, lengths = torch.tensor([[0, 2, 3, 9, 10], [4, 6, 0, 0, 0]]), torch.tensor([5, 2])
    with compaction_path(path):
        C.compact_kv([k0, k1], [v0, v1], idx, lengths, outs[:2], outs[2:])
        for src, dst in zip([k0, k1, v0, v1], outs):
            assert torch.equal(dst[:, :, :K], naive_gather(src.transpose(1, 2), idx, lengths).transpose(1, 2))
            assert dst[:, :, K:].eq(7.0).all()
        assert torch.equal(C.gather_tokens(k0[:, 0], idx, lengths), naive_gather(k0[:, 0], idx, lengths))


@pytest.mark.parametrize("path", COMPACTION_PATHS)
def test_compaction_empty_dimensions(path):
    with compaction_path(path):
        assert C.gather_tokens(torch.zeros(0, 5, 3), torch.zeros(0, 2, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long)).shape == (0, 2, 3)
        assert C.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 0, dtype=torch.int32),
                               torch.zeros(2, dtype=torch.int32)).shape == (2, 0, 3)
        out = C.gather_tokens(torch.zeros(2, 0, 3), torch.zeros(2, 4, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, 4, 3) and out.eq(0).all()
        C.compact_kv([], [], IDX, LEN, [], [])  # no layers: nothing to do
        kv = torch.randn(2, 2, 10, 4)
        out = torch.full((2, 2, 0, 4), 7.0)
        C.compact_kv([kv], [kv], torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long), [out],
                     [out.clone()])  # K = 0; the same cache as K and V is fine (sources may share)


# ============================================================================ fuzzing
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, INF, -INF, NAN, 3.0e38, -3.0e38, 1e-45, -1e-45, 1.1754944e-38, 1e30, -1e30]


def values(special=SPECIAL, bound=None):
    """fp32 numbers: special values, small integers (ties), ordinary floats, and any fp32 number
    (within +-bound if given; NaN and inf only if `special` has them)."""
    wide = (st.floats(-bound, bound, width=32) if bound else
            st.floats(width=32, allow_nan=any(v != v for v in special),
                      allow_infinity=any(math.isinf(v) for v in special)))
    return st.one_of(st.sampled_from(special), st.integers(-3, 3).map(float), st.floats(-1e4, 1e4, width=32), wide)


TAUS = st.one_of(st.sampled_from([1e-30, 1e-3, 0.37, 1.0, 7.0, 1e30]), st.floats(1e-3, 1e3))


def select_oracle(row: list[float], k: int) -> list[int]:
    """The documented selection, from scratch: NaN ranks as -inf, -0.0 as 0.0, ties by index."""
    key = [(-INF if v != v else v + 0.0) for v in row]
    return sorted(sorted(range(len(row)), key=lambda j: (-key[j], j))[:k])


@st.composite
def gumbel_case(draw):
    B, N = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    logits = draw(st.lists(values(), min_size=B * N, max_size=B * N))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    per_row = draw(st.booleans())
    k = draw(st.lists(st.integers(1, N), min_size=B, max_size=B)) if per_row else draw(st.integers(1, N))
    tau = draw(TAUS)
    if dtype == torch.float16:  # gradients ~ 1 / tau are returned in fp16 (max 65504)
        tau = max(tau, 1e-3)
    return torch.tensor(logits).view(B, N).to(dtype), k, tau, draw(st.integers(0, 2**64 - 1))


def gumbel_run(logits, k, tau, noise, seed, w):
    leaf = logits.to(DEV).requires_grad_()
    kk = torch.tensor(k, device=DEV) if isinstance(k, list) else k
    i, m, s = gumbel_topk(leaf, kk, tau=tau, noise=noise, seed=seed, validate=False)
    ((m.float() * w[0]).sum() + (s.float() * w[1]).sum()).backward()
    return i, m, s, leaf.grad


def assert_gumbel_close(a, b, logits, w, tau):
    """indices and mask exact; soft within a few fp32 ulps (the paths compute z = (p - theta) / tau
    and (p - theta) * (1 / tau): 2 ulps of z move sigmoid by <= 0.23 * 2 eps), plus one rounding
    of the 16-bit output; gradients likewise, relative to their scale |w| / tau."""
    ia, ma, sa, ga = a
    ib, mb, sb, gb = b
    assert torch.equal(ia, ib) and torch.equal(ma, mb)
    out_eps = torch.finfo(logits.dtype).eps if logits.dtype != torch.float32 else 0.0
    assert (sa.float() - sb.float()).abs().max().item() <= 4 * EPS + out_eps
    scale = (w[0] + w[1]).abs() / tau
    tol = scale * 8 * EPS + gb.float().abs() * 2 * out_eps + scale * 1e-30
    assert ((ga.float() - gb.float()).abs() <= tol).all(), ((ga - gb).abs().max(), tol.min())


def check_gumbel_invariants(out, logits, k, noise_free=True):
    i, m, s, g = out
    B, N = logits.shape
    ks = k if isinstance(k, list) else [k] * B
    assert m.sum(-1).tolist() == ks
    for b in range(B):
        kept = i[b, :ks[b]].tolist()
        assert i[b, ks[b]:].eq(-1).all() and m[b, kept].eq(1).all()
        if noise_free:
            assert kept == select_oracle(logits[b].float().tolist(), ks[b])
    assert torch.isfinite(s).all() and ((s >= 0) & (s <= 1)).all() and torch.isfinite(g).all()


@saturating
@fuzz(40)
@given(case=gumbel_case(), data=st.data())
def test_fuzz_gumbel_topk_without_noise(case, data):
    logits, k, tau, _ = case
    B, N = logits.shape
    w = [torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=B * N, max_size=B * N)),
                      device=DEV).view(B, N) for _ in range(2)]
    outs = {}
    for path in both_paths():
        with on_path(path):
            outs[path] = gumbel_run(logits, k, tau, False, None, w)
        check_gumbel_invariants(outs[path], logits, k)
    if TRITON:
        assert_gumbel_close(outs["triton"], outs["reference"], logits, w, tau)
    if torch.isnan(logits).any():  # the default validate=True refuses it, on every path
        for path in both_paths():
            with on_path(path):
                raises(lambda: gumbel_topk(logits.to(DEV), k if isinstance(k, int) else torch.tensor(k, device=DEV),
                                           noise=False), "logits contain NaN")


@saturating
@fuzz(20)
@given(case=gumbel_case())
def test_fuzz_gumbel_topk_with_seeded_noise(case):
    """noise=True, fixed seed: each path equals the reference function given that path's noise
    (the kernel's Philox on the Triton path, torch's generator on the reference path)."""
    logits, k, tau, seed = case
    B, N = logits.shape
    w = [torch.ones(B, N, device=DEV), torch.full((B, N), 0.5, device=DEV)]
    kt = torch.tensor(k if isinstance(k, list) else [k] * B, device=DEV)
    for path in both_paths():
        noise = GT.gumbel_noise((B, N), seed, DEV, triton_path=path == "triton")
        leaf = logits.to(DEV).requires_grad_()
        expect = GT.gumbel_topk_reference(leaf, kt, int(kt.max()), tau, noise)
        (expect[1].float() * w[0] + expect[2].float() * w[1]).sum().backward()
        with on_path(path):
            got = gumbel_run(logits, k, tau, True, seed, w)
        check_gumbel_invariants(got, logits, k, noise_free=False)
        p = logits.to(DEV).float() + noise
        for b in range(B):
            assert got[0][b, :kt[b]].tolist() == select_oracle(p[b].tolist(), int(kt[b]))
        assert_gumbel_close(got, (*expect, leaf.grad), logits, w, tau)


BIG = float(np.float32(1e30))  # fp32 values up to 1e30: N * max|x| stays far below fp32 max (3.4e38)
FINITE_X = [0.0, -0.0, 1.0, -1.0, 1e-45, 1.1754944e-38, BIG, -BIG, 1e-30]


@st.composite
def merge_case(draw):
    B, N, D, d = draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 9)), draw(st.integers(1, 8))
    M = draw(st.integers(1, N))
    x = draw(st.lists(values(FINITE_X, bound=BIG), min_size=B * N * D, max_size=B * N * D))
    # keys and queries bounded (|q . k| <= 4 d), ties and zeros likely: the scores stay in range
    kq = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0]), st.floats(-2, 2, width=32))
    keys = draw(st.lists(kq, min_size=B * N * d, max_size=B * N * d))
    queries = draw(st.lists(kq, min_size=B * M * d, max_size=B * M * d))
    ts = [torch.tensor(v).view(B, n, c) for v, n, c in ((x, N, D), (keys, N, d), (queries, M, d))]
    # now and then a non-finite value in one row (that row must come out NaN)
    if draw(st.integers(0, 3)) == 0:
        which, val = draw(st.integers(0, 2)), draw(st.sampled_from([INF, -INF, NAN]))
        b = draw(st.integers(0, B - 1))
        flat = ts[which][b].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = val
    return ts, draw(st.floats(0.1, 10.0)), draw(st.lists(st.floats(-2, 2), min_size=B * M * D, max_size=B * M * D))


def merge_grad_tolerances(xs, ks, qs, grad, tau, smax):
    """Elementwise bounds for the fp32 gradients, from the float64 quantities of the backward
    (module docstring of soft_merge): dx = A dP is a sum of M terms; dS = A (dA - delta) cancels
    (exactly, for M = 1), so its error scales with the magnitudes |x| . |dP| + |dc| + |delta|
    that enter it, not with its value; dkeys / dqueries sum dS against |q| / |k|. Each term also
    carries the weights' relative error from the scores, (d + 2) eps * smax. Underflow: fp32
    rounds with |error| <= eps |v| + 2**-149, i.e. eps (|v| + TINY): TINY is added to every
    magnitude (a subnormal upstream gradient over c, times x = 1e30, is off by ~1e-15)."""
    B, N, D = xs.shape
    M, d = qs.shape[1], ks.shape[2]
    scale = 1.0 / (math.sqrt(d) * tau)
    a = (torch.einsum("bnd,bmd->bnm", ks, qs) * scale).softmax(-1)
    c = a.sum(1) + 1e-6
    merged = torch.einsum("bnm,bnD->bmD", a, xs) / c[..., None]
    a = a + TINY
    dp = (grad / c[..., None]).abs() + TINY
    dc = (grad.abs() * merged.abs()).sum(-1) / c + TINY
    dx = torch.einsum("bnm,bmD->bnD", a, dp) + TINY
    delta = (xs.abs() * dx).sum(-1) + torch.einsum("bnm,bm->bn", a, dc) + TINY
    e = a * (torch.einsum("bnD,bmD->bnm", xs.abs() + TINY, dp) + dc[:, None, :] + delta[:, :, None])
    soft_err = ((d + 2) * smax)[:, None, None]
    floor = 64 * 2.0**-149  # the last rounding of each output
    tol_x = 2 * EPS * (M + 4 + soft_err) * dx + floor
    terms = 2 * EPS * (D + M + d + 4 + soft_err) * scale
    tol_k = terms * torch.einsum("bnm,bmd->bnd", e, qs.abs()) + floor
    tol_q = terms * torch.einsum("bnm,bnd->bmd", e, ks.abs()) + floor
    return tol_x, tol_k, tol_q


def _case(x, k, q, tau, g):
    return ([torch.tensor(x), torch.tensor(k), torch.tensor(q)], tau, g)


@fuzz(30)
@given(case=merge_case())
# found by a VTPRUNE_FUZZ_SCALE=8 run: N = M = 1, where dS = A (dA - delta) is 0 by cancellation
@example(case=_case([[[0, 0, 0, -2, 0, 0, 0, 0, 0]], [[0, 0, -3660.1, 0, -3, 0, 0, -3, 0]]], [[[0.0] * 7]] * 2,
                    [[[0.0] * 7], [[0.0] * 6 + [-1.0]]], 0.5, [0.0] * 11 + [0.02, 0.0, 1.2265564, 0.0, 0.0, 1e-6, 0.0]))
# and a subnormal upstream gradient (1e-45 / c rounds coarsely) times x = -1e30, next to a NaN row
@example(case=_case([[[0, 0], [0, 0], [-1e30, 0]], [[INF, 0], [0, 0], [0, 0]]], [[[0.0] * 4] * 3] * 2,
                    [[[0.0] * 4, [0.0, 0, 0, 2]], [[0.0] * 4] * 2], 1.0, [1.4735e-45] + [0.0] * 7))
def test_fuzz_soft_merge(case):
    """Both paths against float64, each within 2x a first-order fp32 error bound: outputs (scores
    off by (d + 2) eps |q||k| / (sqrt(d) tau), weighted sums by (N + 4) eps, x's magnitude carries
    it) and gradients (merge_grad_tolerances). 750 fresh random examples used at most 0.18 of the
    gradients' bound and 0.06 of the outputs'. Non-finite rows: NaN, zero gradients, every path."""
    (x, k, q), tau, g = case
    B, N, D = x.shape
    M, d = q.shape[1], k.shape[2]
    grad = torch.tensor(g).view(B, M, D).to(DEV)
    x, k, q = x.to(DEV), k.to(DEV), q.to(DEV)
    bad = ~torch.stack([v.isfinite().flatten(1).all(1) for v in (x, k, q)]).all(0)
    ok = ~bad
    runs = {}
    for path in both_paths():
        with on_path(path):
            runs[path] = merge_run(x, k, q, tau, grad)
    xs, ks, qs = (v[ok].double().requires_grad_() for v in (x, k, q))
    exact, exact_sizes = SM.soft_merge_reference(xs, ks, qs, tau, return_sizes=True)
    (exact * grad[ok].double()).sum().backward()
    exact_grads = [xs.grad, ks.grad, qs.grad]
    smax = torch.einsum("bnd,bmd->bnm", ks.abs(), qs.abs()).flatten(1).amax(1) / (math.sqrt(d) * tau)
    xmax = xs.abs().flatten(1).amax(1)
    cmin = (exact_sizes.double() + 1e-6).amin(1)
    subnormal = 4 * N * 2.0**-149 / cmin  # products that underflow lose up to half a subnormal each
    tol = (2 * EPS * xmax * ((d + 2) * smax + N + 4) + subnormal)[:, None, None]
    size_tol = (2 * EPS * N * ((d + 2) * smax + N + 4))[:, None]
    grad_tols = merge_grad_tolerances(*(v.detach() for v in (xs, ks, qs)), grad[ok].double(), tau, smax)
    for path, (out, sizes, grads) in runs.items():
        assert torch.isnan(out[bad]).all() and torch.isnan(sizes[bad]).all(), path
        assert all(gr[bad].eq(0).all() for gr in grads), path
        assert ((out[ok].double() - exact).abs() <= tol).all(), (path, (out[ok].double() - exact).abs().max(), tol)
        assert ((sizes[ok].double() - exact_sizes.double()).abs() <= size_tol).all(), path
        for name, gr, e, gt in zip(("x", "keys", "queries"), grads, exact_grads, grad_tols):
            assert torch.isfinite(gr).all(), (path, name)
            err = (gr[ok].double() - e).abs()
            assert (err <= gt).all(), (path, name, err.max().item(), (err / gt).max().item())
