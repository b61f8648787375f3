"""headscope.kernels.sae_decode: the SAE decode as a gather of k decoder rows, Triton vs the embedding_bag reference.

Triton runs on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest.py) and on CUDA when there is one."""
import pytest, torch

import headscope.kernels as K
from headscope.kernels import pick, force_backend, backend_for
from headscope.kernels.sae_decode import sparse_decode, sparse_decode_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)   # fp32: the atomics add partial sums in any order
triton_ok = pytest.mark.skipif(not K.HAS_TRITON or not (K.interpreting() or torch.cuda.is_available()),
                               reason="needs triton and either TRITON_INTERPRET=1 or a CUDA device")
# (n tokens, k per token, d_sae, d): not powers of two, not multiples of the tiles; 130 > 128 spans two column tiles
SHAPES = [(1, 1, 7, 7), (5, 3, 37, 37), (33, 5, 130, 37), (7, 4, 50, 130)]

def _fixed(n, k, d_sae, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(n, k, generator=g, dtype=torch.float64)
    idx = torch.randint(0, d_sae, (n, k), generator=g)
    if n > 1 and k > 1: idx[0, 1] = idx[0, 0]; idx[1, 0] = idx[0, 0]   # repeats within a row and across rows
    W = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    return vals.to(DEV, dtype), idx.to(DEV), W.to(DEV, dtype)

def _ragged(n, d_sae, d, seed=0, dtype=torch.float32, max_len=8):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (n,), generator=g)
    lens[n // 2] = 0                                                  # an empty run decodes to zeros
    offsets = torch.cumsum(lens, 0) - lens
    nnz = int(lens.sum())
    vals = torch.randn(nnz, generator=g, dtype=torch.float64)
    idx = torch.randint(0, d_sae, (nnz,), generator=g)
    W = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    return vals.to(DEV, dtype), idx.to(DEV), W.to(DEV, dtype), offsets.to(DEV)

def _dense64(vals, idx, W, offsets=None):
    "Independent float64 decode: scatter the code into a dense [n d_sae] tensor, then a matmul"
    if offsets is None: rows = torch.arange(vals.shape[0], device=vals.device)[:, None].expand_as(idx)
    else: rows = torch.searchsorted(offsets, torch.arange(vals.shape[0], device=vals.device), right=True) - 1
    n = vals.shape[0] if offsets is None else offsets.shape[0]
    acts = torch.zeros(n, W.shape[0], dtype=torch.float64, device=W.device)
    acts.index_put_((rows.reshape(-1), idx.reshape(-1)), vals.double().reshape(-1), accumulate=True)
    return acts @ W.double()

def _grads(fn, vals, idx, W, offsets, gy):
    v, w = vals.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    y = fn(v, idx, w, offsets)
    gv, gw = torch.autograd.grad((y * gy).sum(), (v, w))
    return y.detach(), gv, gw

# --- the reference is the specification: check it against float64 --------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_float64(shape):
    vals, idx, W = _fixed(*shape, dtype=torch.float64)
    torch.testing.assert_close(sparse_decode_reference(vals, idx, W), _dense64(vals, idx, W), rtol=1e-12, atol=1e-12)
    # gradients: d/dvals = <g, W[idx]>, d/dW[r] = Σ over entries picking r of vals·g
    gy = torch.randn(shape[0], shape[3], dtype=torch.float64, device=DEV)
    _, gv, gw = _grads(sparse_decode_reference, vals, idx, W, None, gy)
    torch.testing.assert_close(gv, (W[idx] * gy[:, None]).sum(-1), rtol=1e-12, atol=1e-12)
    gw64 = torch.zeros_like(W).index_add_(0, idx.reshape(-1), (vals[..., None] * gy[:, None]).reshape(-1, shape[3]))
    torch.testing.assert_close(gw, gw64, rtol=1e-12, atol=1e-12)

def test_reference_ragged_matches_float64():
    vals, idx, W, off = _ragged(9, 40, 13, dtype=torch.float64)
    y = sparse_decode_reference(vals, idx, W, off)
    torch.testing.assert_close(y, _dense64(vals, idx, W, off), rtol=1e-12, atol=1e-12)
    assert (y[4] == 0).all()

# --- Triton vs reference -------------------------------------------------------------------------

@triton_ok
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape):
    vals, idx, W = _fixed(*shape)
    assert pick("sparse_decode", vals, idx, W, force="triton") is K.sparse_decode_triton
    gy = torch.randn(shape[0], shape[3], device=DEV)
    yt, gvt, gwt = _grads(lambda *a: sparse_decode(*a, force="triton"), vals, idx, W, None, gy)
    yr, gvr, gwr = _grads(sparse_decode_reference, vals, idx, W, None, gy)
    torch.testing.assert_close(yt, yr, **TOL)
    torch.testing.assert_close(gvt, gvr, **TOL)
    torch.testing.assert_close(gwt, gwr, **TOL)
    untouched = torch.ones(shape[2], dtype=torch.bool, device=DEV); untouched[idx.reshape(-1)] = False
    assert (gwt[untouched] == 0).all()   # rows nobody picked get exactly zero

@triton_ok
@pytest.mark.parametrize("n,d_sae,d", [(9, 40, 13), (37, 130, 130)])
def test_triton_ragged_matches_reference(n, d_sae, d):
    vals, idx, W, off = _ragged(n, d_sae, d, seed=n)
    gy = torch.randn(n, d, device=DEV)
    with force_backend("triton"): yt, gvt, gwt = _grads(sparse_decode, vals, idx, W, off, gy)
    yr, gvr, gwr = _grads(sparse_decode_reference, vals, idx, W, off, gy)
    torch.testing.assert_close(yt, yr, **TOL)
    torch.testing.assert_close(gvt, gvr, **TOL)
    torch.testing.assert_close(gwt, gwr, **TOL)
    assert (yt[n // 2] == 0).all()

@triton_ok
def test_triton_float64_and_strides():
    "fp64 W_dec accumulates in fp64; transposed (non-contiguous) vals, idx and W_dec views are read through their strides"
    vals, idx, W = _fixed(6, 5, 45, 21, seed=3, dtype=torch.float64)
    vt, it, Wt = vals.t().contiguous().t(), idx.t().contiguous().t(), W.t().contiguous().t()
    assert not vt.is_contiguous() and not Wt.is_contiguous()
    gy = torch.randn(6, 21, dtype=torch.float64, device=DEV).t().contiguous().t()
    yt, gvt, gwt = _grads(lambda *a: sparse_decode(*a, force="triton"), vt, it, Wt, None, gy)
    yr, gvr, gwr = _grads(sparse_decode_reference, vals, idx, W, None, gy)
    for a, b in [(yt, yr), (gvt, gvr), (gwt, gwr)]:
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

@triton_ok
def test_triton_bf16_weights():
    "bf16 W_dec is upcast to fp32 inside the kernel; the output is bf16, close to a float64 decode of the same bf16 numbers"
    vals, idx, W = _fixed(11, 4, 70, 33, seed=4)
    Wb, vb = W.bfloat16(), vals.bfloat16()
    y = sparse_decode(vb, idx, Wb, force="triton")
    assert y.dtype == torch.bfloat16
    y64 = _dense64(vb, idx, Wb)
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=1e-2)            # one bf16 rounding of the output
    torch.testing.assert_close(sparse_decode_reference(vb, idx, Wb).double(), y64, rtol=2e-2, atol=2e-2)
    v, w = vb.clone().requires_grad_(), Wb.clone().requires_grad_()
    sparse_decode(v, idx, w, force="triton").float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(v.grad.double(), Wb.double()[idx].sum(-1), rtol=1e-2, atol=1e-2)

@triton_ok
def test_triton_partial_grads_and_empty():
    vals, idx, W = _fixed(5, 3, 37, 37, seed=5)
    w = W.clone().requires_grad_()                                   # W_dec only (vals are a constant code)
    sparse_decode(vals, idx, w, force="triton").sum().backward()
    torch.testing.assert_close(w.grad, torch.zeros_like(W).index_add_(0, idx.reshape(-1), vals.reshape(-1, 1).expand(-1, 37)), **TOL)
    v = vals.clone().requires_grad_()                                # vals only (a frozen decoder)
    sparse_decode(v, idx, W, force="triton").sum().backward()
    torch.testing.assert_close(v.grad, W[idx].sum(-1), **TOL)
    test_shape = sparse_decode(vals[:0], idx[:0], W, force="triton").shape
    assert test_shape == (0, 37)
    off = torch.zeros(3, dtype=torch.long, device=DEV)               # three empty runs
    e = torch.zeros(0, device=DEV)
    assert torch.equal(sparse_decode(e, idx.reshape(-1)[:0], W, off, force="triton"), torch.zeros(3, 37, device=DEV))

# --- errors and dispatch --------------------------------------------------------------------------

def test_bad_input_errors():
    vals, idx, W = torch.randn(4, 3), torch.randint(0, 10, (4, 3)), torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"same shape, got vals \(4, 3\) and idx \(4, 2\)"): sparse_decode(vals, idx[:, :2], W)
    with pytest.raises(ValueError, match="int32 or int64 idx, got torch.float32"): sparse_decode(vals, idx.float(), W)
    with pytest.raises(ValueError, match=r"W_dec \[d_sae d\] floating, got \(10,\)"): sparse_decode(vals, idx, W[:, 0])
    with pytest.raises(ValueError, match=r"without offsets wants vals, idx \[n k\], got \(12,\)"): sparse_decode(vals.reshape(-1), idx.reshape(-1), W)
    with pytest.raises(ValueError, match=r"offsets \[n\] \(1-D\), got vals \(4, 3\)"): sparse_decode(vals, idx, W, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="int32 or int64 offsets"): sparse_decode(vals.reshape(-1), idx.reshape(-1), W, torch.tensor([0., 3.]))
    with pytest.raises(ValueError, match="floating vals"): sparse_decode(idx, idx, W)

def test_dispatch():
    vals, idx, W = torch.randn(4, 3), torch.randint(0, 10, (4, 3)), torch.randn(10, 6)
    assert pick("sparse_decode", vals, idx, W) is sparse_decode_reference        # CPU tensors: the reference
    assert backend_for(vals, idx, W, None, force="torch") == "torch"
    y = sparse_decode(vals, idx, W)
    assert torch.equal(y, torch.nn.functional.embedding_bag(idx, W, mode='sum', per_sample_weights=vals))
    if torch.cuda.is_available() and K.HAS_TRITON:
        assert pick("sparse_decode", vals.cuda(), idx.cuda(), W.cuda()) is K.sparse_decode_triton

@triton_ok
def test_launcher_refuses_small_or_odd_tiles():
    from headscope.kernels.sae_decode import _launch_fwd
    vals, idx, W = _fixed(4, 2, 10, 20)
    for bn, bd in [(8, 32), (16, 24), (16, 8)]:
        with pytest.raises(AssertionError, match="powers of two >= 16"): _launch_fwd(vals, idx, W, block_n=bn, block_d=bd)
    torch.testing.assert_close(_launch_fwd(vals, idx, W, block_n=16, block_d=16), sparse_decode_reference(vals, idx, W), **TOL)

# --- the SAE trainer's path -----------------------------------------------------------------------

@triton_ok
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sae_loss_triton_equals_torch(arch):
    "TopK/BatchTopK `loss` (MSE + AuxK, sparse decode) and its gradients are the same through the Triton kernel"
    from headscope.sae.core import make_sae
    sae = make_sae(arch, 37, 130, k=5, seed=0).to(DEV)
    x = torch.randn(9, 37, generator=torch.Generator().manual_seed(0)).to(DEV)
    dead = torch.arange(130, device=DEV) % 4 == 0                       # AuxK decodes too
    res = {}
    for backend in ("triton", "torch"):
        sae.zero_grad()
        with force_backend(backend): l = sae.loss(x, dead=dead)
        l["total"].backward()
        res[backend] = ({k: v.detach() for k, v in l.items()}, {n: p.grad.clone() for n, p in sae.named_parameters()})
    assert res["torch"][0]["aux"] > 0
    torch.testing.assert_close(res["triton"][0], res["torch"][0], **TOL)
    torch.testing.assert_close(res["triton"][1], res["torch"][1], **TOL)
