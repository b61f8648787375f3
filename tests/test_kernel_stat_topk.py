"""headscope.kernels.stat_threshold: the Gaussian-quantile threshold, Triton vs the torch reference vs float64.

Triton runs on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest.py) and on CUDA when there is one."""
import statistics
import pytest, torch

import headscope.kernels as K
from headscope.kernels import pick, force_backend
from headscope.kernels.stat_threshold import stat_topk, stat_topk_reference, gaussian_quantile

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 7), (5, 37), (33, 130), (2, 3, 50)]
triton_ok = pytest.mark.skipif(not K.HAS_TRITON or not (K.interpreting() or torch.cuda.is_available()),
                               reason="needs triton and either TRITON_INTERPRET=1 or a CUDA device")

def _rand(*shape, seed=0, scale=1., shift=0.):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).float().to(DEV)

def _theta64(x, k):
    "θ in float64, written out from the definition: mean + population std · Φ⁻¹(1 − k/d)"
    x64, d = x.double(), x.shape[-1]
    mu = x64.sum(-1) / d
    sd = ((x64 - mu[..., None]) ** 2).sum(-1).div(d).sqrt()
    return mu + sd * statistics.NormalDist().inv_cdf(1 - k / d)

def _expected(x, theta, soft):
    "Values from a given θ, in float64"
    x64, t = x.double(), theta.double()[..., None]
    return (x64 - t).clamp_min(0) if soft else torch.where(x64 > t, x64, 0.)

def _assert_close_to(x, vals, theta, ref_theta, soft, atol):
    "θ within `atol` of `ref_theta`; values exactly (up to fp32 rounding) those of the returned θ; same mask as ref_theta away from it"
    assert vals.shape == x.shape and vals.dtype == x.dtype and theta.shape == x.shape[:-1] and theta.dtype == torch.float32
    torch.testing.assert_close(theta.double(), ref_theta.double(), rtol=0, atol=atol)
    tol = 1e-6 if x.dtype == torch.float32 else 2**-7                        # bf16: one ulp (rounded twice)
    torch.testing.assert_close(vals.double(), _expected(x.float(), theta, soft).to(x.dtype).double(), rtol=tol, atol=1e-6)
    far = (x.double() - ref_theta.double()[..., None]).abs() > 4 * atol       # the mask can only differ next to θ
    assert torch.equal((vals != 0)[far], (x.double() > ref_theta.double()[..., None])[far])

@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_float64(shape, soft):
    x = _rand(*shape, seed=1, scale=2., shift=-0.5)
    k = max(1, shape[-1] // 5)
    vals, theta = stat_topk_reference(x, k, soft)
    _assert_close_to(x, vals, theta, _theta64(x, k), soft, atol=1e-5)

def test_gaussian_rows_keep_about_k():
    "On Gaussian rows the expected number kept is k (the definition of the quantile), within sampling noise"
    x, k = _rand(256, 4096, seed=2), 64
    vals, _ = stat_topk_reference(x, k)
    kept = (vals != 0).sum(-1).double()
    assert abs(kept.mean().item() - k) < 2.5, kept.mean()      # std of the mean over 256 rows is ~0.6
    assert gaussian_quantile(k, 4096) == pytest.approx(2.154, abs=1e-3)

def test_bad_input_errors():
    x = torch.randn(4, 10)
    for k in (0, 10, 11, -1):
        with pytest.raises(ValueError, match=r"0 < k < d; got k=.* for x \(4, 10\) \(d=10\)"): stat_topk(x, k)
    for k in (2.0, True, None):
        with pytest.raises(ValueError, match="an int k"): stat_topk(x, k)
    with pytest.raises(ValueError, match=r"floating tensor x \[... d\], got Tensor \(4, 10\) torch.int64"): stat_topk(x.long(), 2)
    with pytest.raises(ValueError, match=r"got Tensor \(\)"): stat_topk(torch.tensor(1.), 1)
    with pytest.raises(ValueError, match="soft must be True or False"): stat_topk(x, 2, soft=1)

def test_dispatch():
    x = torch.randn(3, 20)
    assert pick("stat_topk", x) is stat_topk_reference                     # CPU tensors: the reference
    with force_backend("torch"): assert pick("stat_topk", x) is stat_topk_reference
    v, t = stat_topk(x, 4, force="torch")
    torch.testing.assert_close(t.double(), _theta64(x, 4), rtol=0, atol=1e-5)

def test_package_attribute_is_the_op():
    from headscope.kernels import stat_topk as op
    import headscope.kernels.stat_threshold  # noqa: F401
    assert callable(K.stat_topk) and K.stat_topk is stat_topk and op is stat_topk

@triton_ok
def test_dispatch_triton():
    x = torch.randn(3, 20).to(DEV)
    assert pick("stat_topk", x, force="triton") is K.stat_topk_triton
    with force_backend("triton"): v, t = stat_topk(x, 4)
    torch.testing.assert_close(t.double(), _theta64(x, 4), rtol=0, atol=1e-5)

@triton_ok
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, soft):
    x = _rand(*shape, seed=3, scale=1.5, shift=0.3)
    k = max(1, shape[-1] // 7)
    vals, theta = stat_topk(x, k, soft, force="triton")
    ref_vals, ref_theta = stat_topk_reference(x, k, soft)
    _assert_close_to(x, vals, theta, ref_theta, soft, atol=1e-5)
    _assert_close_to(x, vals, theta, _theta64(x, k), soft, atol=1e-5)

@triton_ok
@pytest.mark.parametrize("tiles", [(1, 16), (2, 32), (4, 64), (16, 16)])
def test_triton_multi_tile_statistics(tiles):
    "Rows longer than a tile: Chan's merge of per-tile statistics, exact enough even when |mean| >> std"
    from headscope.kernels.stat_threshold import _launch_fwd
    block_n, block_d = tiles
    x = _rand(9, 130, seed=4, scale=0.01, shift=1000.)       # a one-pass Σx² − (Σx)²/d in fp32 loses σ entirely here
    ref = _theta64(x, 6)
    for soft in (False, True):
        vals, theta = _launch_fwd(x, 6, soft, block_n=block_n, block_d=block_d)
        assert (theta.double() - ref).abs().max() < 0.02 * 0.01, (theta.double() - ref).abs().max()   # 2% of σ
        _assert_close_to(x, vals, theta, ref, soft, atol=2e-4)
    x = _rand(5, 37, seed=5)
    vals, theta = _launch_fwd(x, 3, False, block_n=block_n, block_d=block_d)
    _assert_close_to(x, vals, theta, _theta64(x, 3), False, atol=1e-5)

@triton_ok
def test_triton_strided_and_empty():
    x = _rand(40, 6, seed=6).t()                          # [6 40], column stride 6
    vals, theta = stat_topk(x, 5, force="triton")
    _assert_close_to(x, vals, theta, _theta64(x, 5), False, atol=1e-5)
    v, t = stat_topk(torch.zeros(0, 3, 9, device=DEV), 2, force="triton")
    assert v.shape == (0, 3, 9) and t.shape == (0, 3)

@triton_ok
def test_triton_bf16():
    "bf16 in: loaded and upcast to fp32 in the kernel, bf16 values out, fp32 θ"
    x = _rand(5, 37, seed=7, scale=3.).bfloat16()
    for soft in (False, True):
        vals, theta = stat_topk(x, 4, soft, force="triton")
        ref_vals, ref_theta = stat_topk_reference(x, 4, soft)
        assert vals.dtype == torch.bfloat16 and theta.dtype == torch.float32
        _assert_close_to(x, vals, theta, _theta64(x, 4), soft, atol=1e-5)
        # the interpreter casts fp32 -> bf16 by truncation (one ulp off), a GPU rounds to nearest like torch
        torch.testing.assert_close(vals, ref_vals, rtol=0 if x.is_cuda else 2**-7, atol=0)

@triton_ok
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 50)], ids=lambda s: "x".join(map(str, s)))
def test_triton_gradients(shape, soft):
    "dx = g·1[x>θ] in both modes (θ stop-gradient), Triton = reference = the formula"
    x0, g = _rand(*shape, seed=8), _rand(*shape, seed=9)
    grads, thetas = {}, {}
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        vals, theta = stat_topk(x, 6, soft, force=backend)
        assert not theta.requires_grad
        vals.backward(g)
        grads[backend], thetas[backend] = x.grad, theta
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=0, atol=0)
    torch.testing.assert_close(grads["triton"], torch.where(x0 > thetas["triton"][..., None], g, 0.), rtol=0, atol=0)
    assert 0 < (grads["triton"] != 0).sum() < x0.numel()

@triton_ok
def test_launcher_refuses_odd_tiles():
    from headscope.kernels.stat_threshold import _launch_fwd, _launch_bwd
    x = torch.randn(4, 20, device=DEV)
    for bn, bd in [(3, 32), (16, 24), (16, 8)]:
        with pytest.raises(AssertionError, match="powers of two"): _launch_fwd(x, 2, False, block_n=bn, block_d=bd)
    with pytest.raises(AssertionError, match="powers of two"): _launch_bwd(x, x, torch.zeros(4, device=DEV), block_n=16, block_d=24)
