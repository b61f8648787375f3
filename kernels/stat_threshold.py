"""`stat_topk(x, k)`: an approximate top-k from each row's mean and standard deviation, in one linear pass.

Spark Transformer (Jiang et al., 2025) replaces the sort/select of an exact top-k by a threshold: if a
row of `d` values were Gaussian, the `k`-th largest would sit near the `(1 - k/d)` quantile,

    θ = μ + σ · Φ⁻¹(1 − k/d)          μ, σ: the row's mean and population standard deviation (over d),

so keeping `x > θ` keeps about `k` values. `Φ⁻¹` is computed once on the host
(`statistics.NormalDist().inv_cdf`), never in the kernel. Two outputs:

- hard (default): `values = x · 1[x > θ]` (the kept values, as they are);
- soft: `values = max(x − θ, 0)` (Spark's soft-thresholding: the kept values shifted down by θ).

Both return `theta: [...]` (fp32, one per row) too; `values` has x's shape and dtype. The gradient flows to x
only: θ is treated as a constant (a stop-gradient, as in Spark's straight-through use), so both modes give
`dx = g · 1[x > θ]`. The count kept is `k` on average only for Gaussian rows, and it varies from row to row; how far it is
off on real SAE pre-activations (heavier tails) is measured in bench/results/stat_topk_recall.md. See bench/results/stat_topk_recall.md.

Use in a TopK SAE (an optional activation): `vals, _ = stat_topk(h, k); acts = vals.relu()` on the
pre-activations `h: [... d_sae]` (any leading dims), or `stat_topk(h, k, soft=True)[0]` (already >= 0 when θ >= 0;
take `.relu()` anyway, as θ can be negative).

Statistics: the kernel streams the row in tiles of `BLOCK_D`, computes each tile's mean and sum of squared
deviations (two passes over the tile in registers), and merges the tiles with Chan et al.'s parallel update,
so it does not suffer the cancellation of a one-pass `Σx² − (Σx)²/d` in fp32 when |μ| ≫ σ.

Roofline (n = 4096 rows, d = 16384, i.e. 67.1 M elements; H200: ~4.3 TB/s copy bandwidth, ~67 TFLOP/s fp32):
- The floor is 1 read + 1 write of n·d elements: 8 B/element in fp32 (537 MB: 0.125 ms), 4 B/element in bf16
  (268 MB: 0.062 ms). fp32 rows up to 16384 are read once into registers (one tile); 2-byte rows (and wider rows)
  are streamed in tiles and read twice, statistics then values; the second read of a row should mostly hit L2
  (each program's row, 8-64 KB, was just read; inferred from the times below, within 1.2x of the 1-read floor,
  not from counters), so HBM sees about 1 read + 1 write. The tiles were picked by a sweep on
  an H200 (`bench/bench_kernel_stat_topk.py --sweep`).
- About 8 FLOPs per element (the tile mean, the deviation, its square, the compare and select): ~0.5 GFLOP,
  8 µs of fp32 FMA throughput, so the kernel is memory-bound by ~15x.
- Measurements (H200: the kernel against the floor, the torch reference and `torch.topk` + scatter; the
  backward) are in bench/results/kernels_h200.md and bench_kernel_stat_topk_h200.txt.
"""
import statistics
import torch
from torch import Tensor
from . import has_triton, pick

__all__ = ["stat_topk", "stat_topk_reference", "gaussian_quantile"]

def gaussian_quantile(k:int, d:int)->float:
    "`Φ⁻¹(1 − k/d)`: the standard-normal quantile above which a fraction `k/d` of a Gaussian row lies"
    return statistics.NormalDist().inv_cdf(1 - k / d)

def _check(x, k, soft):
    if not isinstance(x, Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise ValueError(f"stat_topk wants a floating tensor x [... d], got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}")
    d = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < d:
        raise ValueError(f"stat_topk needs an int k with 0 < k < d; got k={k!r} for x {tuple(x.shape)} (d={d})")
    if not isinstance(soft, bool): raise ValueError(f"soft must be True or False, not {soft!r}")

def stat_topk_reference(x:Tensor,          # [... d] (e.g. SAE pre-activations [batch pos d_sae])
                        k:int,             # the nominal number kept per row, 0 < k < d
                        soft:bool=False,   # False: x·1[x>θ]; True: max(x−θ, 0)
                       )->tuple[Tensor,Tensor]: # values [... d] in x's dtype, theta [...] fp32
    "Pure-torch reference: θ = mean + std·Φ⁻¹(1−k/d) per row (population std, fp32 or float64), then threshold; θ is stop-gradient"
    _check(x, k, soft)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))   # fp32 arithmetic, float64 kept as it is
    var, mu = torch.var_mean(xf.detach(), dim=-1, correction=0)
    theta = mu + var.sqrt() * gaussian_quantile(k, x.shape[-1])
    t = theta.unsqueeze(-1)
    vals = (xf - t).clamp_min(0) if soft else xf * (xf > t)
    return vals.to(x.dtype), theta.float()

def stat_topk(x:Tensor,                 # [... d]
              k:int,                    # the nominal number kept per row, 0 < k < d
              soft:bool=False,          # False: x·1[x>θ]; True: max(x−θ, 0)
              force:str|None=None,      # None (automatic), 'triton' or 'torch'
             )->tuple[Tensor,Tensor]:   # values [... d] in x's dtype, theta [...] fp32
    "Statistical top-k: Triton on CUDA, the torch reference elsewhere (see `headscope.kernels.pick`)"
    return pick("stat_topk", x, force=force)(x, k, soft)

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _stat_topk_fwd(x_ptr, out_ptr, theta_ptr, N, D, z,
                       stride_xn, stride_xd, stride_on, stride_od,
                       SOFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
        # one program per BLOCK_N rows; pass 1 gives mean and M2 (Chan's merge of per-tile two-pass stats)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        row_ok = rn < N
        xrow = x_ptr + rn[:, None] * stride_xn
        orow = out_ptr + rn[:, None] * stride_on
        if ONE_TILE:
            # the whole row in registers: 1 read + 1 write
            mask = row_ok[:, None] & (rd[None, :] < D)
            x = tl.load(xrow + rd[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=1) / D
            dev = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(dev * dev, axis=1) / D
            theta = mean + tl.sqrt(var) * z
            keep = x > theta[:, None]
            if SOFT: y = tl.where(keep, x - theta[:, None], 0.0)
            else: y = tl.where(keep, x, 0.0)
            tl.store(orow + rd[None, :] * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            mean = tl.zeros([BLOCK_N], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + rd
                mask = row_ok[:, None] & (cols[None, :] < D)
                x = tl.load(xrow + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
                nb = tl.minimum(D - d0, BLOCK_D) * 1.0              # values in this tile (as fp32)
                na = d0 * 1.0                                      # values before it
                mb = tl.sum(x, axis=1) / nb
                dev = tl.where(mask, x - mb[:, None], 0.0)
                m2b = tl.sum(dev * dev, axis=1)
                delta = mb - mean
                tot = na + nb
                mean = mean + delta * (nb / tot)
                m2 = m2 + m2b + delta * delta * (na * nb / tot)
            theta = mean + tl.sqrt(m2 / D) * z
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + rd
                mask = row_ok[:, None] & (cols[None, :] < D)
                x = tl.load(xrow + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
                keep = x > theta[:, None]
                if SOFT: y = tl.where(keep, x - theta[:, None], 0.0)
                else: y = tl.where(keep, x, 0.0)
                tl.store(orow + cols[None, :] * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(theta_ptr + rn, theta, mask=row_ok)

    @triton.jit
    def _stat_topk_bwd(g_ptr, x_ptr, theta_ptr, dx_ptr, N, D,
                       stride_gn, stride_gd, stride_xn, stride_xd, stride_on, stride_od,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # dx = g · 1[x > θ] (θ is a constant), one [BLOCK_N, BLOCK_D] tile per program
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rn[:, None] < N) & (rd[None, :] < D)
        g = tl.load(g_ptr + rn[:, None] * stride_gn + rd[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        theta = tl.load(theta_ptr + rn, mask=rn < N, other=0.0)
        dx = tl.where(x > theta[:, None], g, 0.0)
        tl.store(dx_ptr + rn[:, None] * stride_on + rd[None, :] * stride_od, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    def _pow2(n): return n >= 1 and (n & (n - 1)) == 0

    def _tiles(D, el, block_n, block_d, max_block_d, num_warps):
        # fp32 rows up to 16384 in one tile (1 read); 2-byte rows in a loop of 2048 (d <= 8192) or 8192-wide tiles,
        # the second read of a row coming from L2: the H200 sweep's choice (bench/results/kernels_h200.md)
        if max_block_d is None: max_block_d = 16384 if el >= 4 else (8192 if D > 8192 else 2048)
        if block_d is None: block_d = min(max(triton.next_power_of_2(D), 16), max_block_d)
        if block_n is None: block_n = max(1, min(16, 2048 // block_d))   # small rows: several per program
        if num_warps is None: num_warps = max(4, min(16, block_n * block_d // 1024)) if el >= 4 else (16 if block_d >= 8192 else 4)
        return block_n, block_d, num_warps

    def _launch_fwd(x2:Tensor, k:int, soft:bool, block_n:int|None=None, block_d:int|None=None,
                    max_block_d:int|None=None, num_warps:int|None=None)->tuple[Tensor,Tensor]:
        "Launch `_stat_topk_fwd` on `x2 [N D]`; tile sizes must be powers of two (BLOCK_D >= 16)"
        N, D = x2.shape
        block_n, block_d, warps = _tiles(D, x2.element_size(), block_n, block_d, max_block_d, num_warps)
        assert _pow2(block_n) and _pow2(block_d) and block_d >= 16, \
            f"tile sizes must be powers of two (BLOCK_D >= 16), got BLOCK_N={block_n}, BLOCK_D={block_d}"
        out = torch.empty_like(x2)
        theta = torch.empty(N, device=x2.device, dtype=torch.float32)
        if N == 0: return out, theta
        _stat_topk_fwd[(triton.cdiv(N, block_n),)](x2, out, theta, N, D, gaussian_quantile(k, D),
                                                   x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
                                                   SOFT=soft, BLOCK_N=block_n, BLOCK_D=block_d,
                                                   ONE_TILE=D <= block_d, num_warps=warps)
        return out, theta

    def _launch_bwd(g:Tensor, x2:Tensor, theta:Tensor, block_n:int=16, block_d:int|None=None)->Tensor:
        N, D = x2.shape
        if block_d is None: block_d = min(max(triton.next_power_of_2(D), 16), 1024)
        assert _pow2(block_n) and _pow2(block_d) and block_d >= 16, \
            f"tile sizes must be powers of two (BLOCK_D >= 16), got BLOCK_N={block_n}, BLOCK_D={block_d}"
        dx = torch.empty_like(x2)
        if N == 0: return dx
        _stat_topk_bwd[(triton.cdiv(N, block_n), triton.cdiv(D, block_d))](
            g, x2, theta, dx, N, D, g.stride(0), g.stride(1), x2.stride(0), x2.stride(1), dx.stride(0), dx.stride(1),
            BLOCK_N=block_n, BLOCK_D=block_d)
        return dx

    class _StatTopK(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x2, k, soft):
            out, theta = _launch_fwd(x2, k, soft)
            ctx.save_for_backward(x2, theta)
            ctx.mark_non_differentiable(theta)
            return out, theta

        @staticmethod
        def backward(ctx, g, _gtheta):
            x2, theta = ctx.saved_tensors
            return _launch_bwd(g, x2, theta), None, None   # θ is stop-gradient: dx = g·1[x>θ] in both modes

    def stat_topk_triton(x:Tensor,         # [... d] on CUDA, or on CPU under TRITON_INTERPRET=1
                         k:int,            # 0 < k < d
                         soft:bool=False,
                        )->tuple[Tensor,Tensor]: # values [... d] in x's dtype, theta [...] fp32
        "Triton version of `stat_topk_reference`, same signature, differentiable in x (θ stop-gradient)"
        _check(x, k, soft)
        out, theta = _StatTopK.apply(x.reshape(-1, x.shape[-1]), k, soft)
        return out.reshape(x.shape), theta.reshape(x.shape[:-1])

    __all__ += ["stat_topk_triton"]
