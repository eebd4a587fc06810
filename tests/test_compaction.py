"""Compaction ops (csrc/ops.cpp CPU twin, csrc/compact.cu on GPUs) against the PyTorch reference,
and the reference against a plain loop."""
import pytest
import torch

from vtprune.kernels import compaction as C
from vtprune.kernels._extension import has_cuda_kernels, load_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs a GPU build")


def ragged(B, T, K, g, lengths=None, idx_dtype=torch.int64, device="cpu"):
    """Sorted random kept positions per row, -1 padding after each row's length."""
    if lengths is None:
        lengths = torch.randint(0, min(K, T) + 1, (B,), generator=g)
    idx = torch.full((B, K), -1, dtype=torch.long)
    for b in range(B):
        n = int(lengths[b])
        idx[b, :n] = torch.randperm(T, generator=g)[:n].sort().values
    return idx.to(device, idx_dtype), lengths.to(device)


def naive_gather(src, idx, lengths):
    out = torch.zeros((src.shape[0], idx.shape[1], *src.shape[2:]), dtype=src.dtype)
    for b in range(src.shape[0]):
        for j in range(int(lengths[b])):
            out[b, j] = src[b, int(idx[b, j])]
    return out


def test_extension_is_loaded():
    assert load_ops(), "the C++ ops should build here (CI has a compiler and ninja)"


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 5), (4, 577, 33), (2, 64, 4096)])
def test_reference_matches_a_plain_loop(shape):
    g = torch.Generator().manual_seed(0)
    B, T, D = shape
    src = torch.randn(B, T, D, generator=g)
    idx, lengths = ragged(B, T, max(1, T // 2), g)
    assert torch.equal(C.gather_tokens_reference(src, idx, lengths), naive_gather(src, idx, lengths))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,T,K,D", [(1, 1, 1, 1), (3, 7, 4, 5), (5, 577, 288, 64), (2, 1000, 999, 7)])
def test_gather_tokens_matches_reference(dtype, idx_dtype, B, T, K, D):
    g = torch.Generator().manual_seed(B * T + K)
    src = torch.randn(B, T, D, generator=g).to(dtype)
    idx, lengths = ragged(B, T, K, g, idx_dtype=idx_dtype)
    lengths[0] = K if K <= T else lengths[0]  # a full row
    idx[0, :K] = torch.randperm(T, generator=g)[:K].sort().values.to(idx_dtype)
    out = C.gather_tokens(src, idx, lengths)
    assert out.dtype == dtype and out.shape == (B, K, D)
    assert torch.equal(out, C.gather_tokens_reference(src, idx, lengths))


def test_lengths_zero_and_full_and_position_ids():
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(50).expand(3, 50).contiguous()
    idx, lengths = ragged(3, 50, 20, g, lengths=torch.tensor([0, 20, 7]))
    out = C.gather_tokens(pos, idx, lengths)
    assert out[0].eq(0).all() and torch.equal(out[1], idx[1]) and torch.equal(out[2, :7], idx[2, :7])
    assert out[2, 7:].eq(0).all()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    big = torch.randn(6, 40, 16, generator=g)
    src = big[::2, 5:35]                       # strided batch and token axes
    t_src = torch.randn(3, 8, 30, generator=g).transpose(1, 2)  # [3, 30, 8], rows not contiguous
    for s in (src, t_src):
        idx, lengths = ragged(3, s.shape[1], 12, g)
        idx_nc = torch.stack([idx, idx], dim=2)[..., 0]  # non-contiguous idx view
        assert not idx_nc.is_contiguous()
        assert torch.equal(C.gather_tokens(s, idx_nc, lengths), C.gather_tokens_reference(s, idx, lengths))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_kv_matches_reference_for_many_layers(dtype):
    g = torch.Generator().manual_seed(3)
    L, B, H, T, Dh, K = 5, 3, 4, 37, 16, 21
    ks = [torch.randn(B, H, T, Dh, generator=g).to(dtype) for _ in range(L)]
    vs = [torch.randn(B, H, T, Dh, generator=g).to(dtype) for _ in range(L)]
    idx, lengths = ragged(B, T, K, g, lengths=torch.tensor([K, 0, 9]))
    # destination buffers with room past K (a cache's decode slots): those must stay untouched
    k_out = [torch.full((B, H, K + 6, Dh), 7.0, dtype=dtype) for _ in range(L)]
    v_out = [torch.full((B, H, K + 6, Dh), 7.0, dtype=dtype) for _ in range(L)]
    C.compact_kv(ks, vs, idx, lengths, k_out, v_out)
    for src, dst in zip(ks + vs, k_out + v_out):
        expect = C.gather_tokens_reference(src.transpose(1, 2), idx, lengths).transpose(1, 2)
        assert torch.equal(dst[:, :, :K], expect)
        assert dst[:, :, K:].eq(7.0).all()


def test_compact_kv_from_a_slice_of_a_larger_cache():
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(2, 3, 50, 8, generator=g)
    src = buf[:, :, :30]  # prompt slots of a cache buffer: non-contiguous along T
    idx, lengths = ragged(2, 30, 10, g)
    k_out, v_out = [torch.empty(2, 3, 10, 8)], [torch.empty(2, 3, 10, 8)]
    C.compact_kv([src], [src], idx, lengths, k_out, v_out)
    expect = C.gather_tokens_reference(src.transpose(1, 2), idx, lengths).transpose(1, 2)
    assert torch.equal(k_out[0], expect) and torch.equal(v_out[0], expect)


@pytest.mark.parametrize("bad_idx,bad_len,match", [
    ([[0, 5, 10]], [3], r"idx\[0, 2\] = 10 is out of range \[0, 10\)"),
    ([[-1, 5, 6]], [2], r"idx\[0, 0\] = -1 is out of range"),
    ([[3, 3, 4]], [3], r"idx\[0\] must be strictly ascending, but idx\[0, 1\] = 3 follows 3"),
    ([[0, 1, 2]], [4], r"lengths\[0\] = 4 is outside \[0, K = 3\]"),
])
def test_bad_indices_give_clear_errors(bad_idx, bad_len, match):
    src = torch.randn(1, 10, 4)
    idx, lengths = torch.tensor(bad_idx), torch.tensor(bad_len)
    with pytest.raises(ValueError, match=match):
        C.gather_tokens(src, idx, lengths)
    with pytest.raises(RuntimeError, match=match):  # the compiled op checks on its own too
        torch.ops.vtprune.gather_tokens(src, idx, lengths)
    kv = [torch.randn(1, 2, 10, 4)]
    with pytest.raises(ValueError, match=match):
        C.compact_kv(kv, kv, idx, lengths, [torch.empty(1, 2, 3, 4)], [torch.empty(1, 2, 3, 4)])


def test_bad_shapes_name_the_argument():
    src = torch.randn(2, 10, 4)
    with pytest.raises(RuntimeError, match=r"idx must be \[B, K\] with B = 2"):
        torch.ops.vtprune.gather_tokens(src, torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="idx must be int32 or int64"):
        torch.ops.vtprune.gather_tokens(src, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    kv = [torch.randn(2, 2, 10, 4)]
    with pytest.raises(RuntimeError, match=r"k_out/v_out must be \[B, H, >= K, Dh\]"):
        torch.ops.vtprune.compact_kv(kv, kv, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                     [torch.empty(2, 2, 2, 4)], [torch.empty(2, 2, 2, 4)])
    with pytest.raises(RuntimeError, match="must have the same length"):
        torch.ops.vtprune.compact_kv(kv, kv + kv, torch.zeros(2, 3, dtype=torch.long),
                                     torch.zeros(2, dtype=torch.long), [torch.empty(2, 2, 3, 4)],
                                     [torch.empty(2, 2, 3, 4)])


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    src = torch.randn(3, 20, 8, generator=g)
    idx, lengths = ragged(3, 20, 9, g)
    torch.library.opcheck(torch.ops.vtprune.gather_tokens, (src, idx, lengths))
    ks = [torch.randn(3, 2, 20, 8, generator=g) for _ in range(2)]
    outs = ([torch.empty(3, 2, 9, 8) for _ in range(2)], [torch.empty(3, 2, 9, 8) for _ in range(2)])
    torch.library.opcheck(torch.ops.vtprune.compact_kv, (ks, ks, idx, lengths, *outs))


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [4096, 7, 1])  # 16-byte vectors, then the narrow fallbacks
def test_cuda_gather_tokens(dtype, D):
    g = torch.Generator().manual_seed(6)
    src = torch.randn(8, 577, D, generator=g).to(dtype).cuda()
    idx, lengths = ragged(8, 577, 288, g, device="cuda", idx_dtype=torch.int32)
    assert torch.equal(C.gather_tokens(src, idx, lengths), C.gather_tokens_reference(src, idx, lengths))
    torch.library.opcheck(torch.ops.vtprune.gather_tokens, (src, idx, lengths))


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_compact_kv_all_layers(dtype):
    g = torch.Generator().manual_seed(7)
    L, B, H, T, Dh, K = 70, 4, 8, 100, 128, 61  # > 64 tensors: chunked launches
    ks = [torch.randn(B, H, T, Dh, generator=g).to(dtype).cuda() for _ in range(L)]
    vs = [torch.randn(B, H, T, Dh, generator=g).to(dtype).cuda() for _ in range(L)]
    idx, lengths = ragged(B, T, K, g, device="cuda")
    k_out = [torch.full((B, H, K + 3, Dh), 7.0, dtype=dtype, device="cuda") for _ in range(L)]
    v_out = [torch.full((B, H, K + 3, Dh), 7.0, dtype=dtype, device="cuda") for _ in range(L)]
    C.compact_kv(ks, vs, idx, lengths, k_out, v_out)
    for src, dst in zip(ks + vs, k_out + v_out):
        expect = C.gather_tokens_reference(src.transpose(1, 2), idx, lengths).transpose(1, 2)
        assert torch.equal(dst[:, :, :K], expect) and dst[:, :, K:].eq(7.0).all()


def test_fallback_when_the_extension_cannot_be_built(tmp_path):
    """No prebuilt _C and a failing JIT build: a warning that says why, then the reference path."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib.util, warnings, torch
        import vtprune.kernels._extension as ext
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "vtprune._C" else real_find_spec(name, *a)
        def broken():
            raise RuntimeError("Error building extension 'vtprune_ops': no compiler")
        ext._jit_build = broken
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from vtprune.kernels import compaction as C
        assert not C._HAVE_OPS
        msg = " ".join(str(x.message) for x in w)
        assert "compiled compaction ops unavailable" in msg and "no compiler" in msg, msg
        src = torch.randn(2, 9, 3)
        idx, lengths = torch.tensor([[1, 4, 8], [0, 2, 0]]), torch.tensor([3, 2])
        assert torch.equal(C.gather_tokens(src, idx, lengths), C.gather_tokens_reference(src, idx, lengths))
        print("fallback ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stderr
