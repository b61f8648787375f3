"""`sparse_decode(vals, idx, W_dec)`: the TopK / BatchTopK SAE decode as a gather of the active decoder rows.

A TopK code keeps `k` of `d_sae` latents per token, so the reconstruction is a weighted sum of `k`
decoder rows, `out[b] = Σ_j vals[b,j] · W_dec[idx[b,j]]`, not a dense `acts @ W_dec`. Two layouts:

- fixed k (TopK): `vals, idx: [n k]`, `offsets=None`;
- ragged (BatchTopK training): `vals, idx: [nnz]` 1-D and `offsets: [n]`, the start of each row's run,
  as `F.embedding_bag` takes them (the last run ends at `nnz`; an empty run decodes to zeros).

No bias is added (callers add `b_dec`). The reference is `F.embedding_bag(mode='sum',
per_sample_weights=vals.to(W_dec.dtype))`, which is what `headscope.sae.topk` always used. Like
`embedding_bag`, the op does not check that `idx` lies in `[0, d_sae)` nor that `offsets` is
nondecreasing: both are the caller's job. `embedding_bag` also refuses `offsets[0] != 0`; the Triton
path ignores entries before `offsets[0]` (checking would cost a host sync).

The Triton forward is a gather-FMA: each program owns a block of tokens x a block of `d` columns and
loops over the tokens' entries, accumulating in fp32 (fp64 for an fp64 `W_dec`); the output has
`W_dec`'s dtype. The backward has two parts. `grad_vals[b,j] = <g[b], W_dec[idx[b,j]]>` is a gather-dot on the
forward's grid (partial dots over column blocks, added with `tl.atomic_add`), so only the selected
rows of `W_dec` are read. `grad_W_dec[r] = Σ vals·g[row]` over the entries that picked latent `r` is
the same decode transposed: the entries are sorted by latent (one `sort` of `n·k` indices) and the
forward kernel runs in its ragged form with `g` in the place of `W_dec`, one run per latent. Each row of
the gradient is then written once, in a fixed order (deterministic, no atomics, no zeroing pass); rows
nobody picked are written as zeros, as `embedding_bag`'s dense `[d_sae d]` gradient has them. (An
atomic scatter of `vals·g` into an fp32 buffer, the first version, needs `n·k·d` atomics: 537M at the bench
size below; see bench/results/kernels_h200.md.) `idx` and `offsets` get no gradient.

Roofline
--------
FLOPs: `2·n·k·d` against `2·n·d_sae·d` for the dense decode, a ratio of `d_sae / k`: 144x for a
SmolLM2 SAE (d 576, d_sae 4608 = 8x, k 32), 1024x for a 65,536-latent SAE with k 64.

Bytes: the gathered rows, `n·k·d·bytes` read from L2 or HBM (a row picked by several tokens in
flight is served from L2), plus `n·k·(4+8)` for vals and idx and `n·d·bytes` for the output. At
arithmetic intensity `2·n·k·d / (n·k·d·4) = 0.5` FLOP/byte (fp32) the op is memory-bound by three
orders of magnitude (the H200 balance point is ~16 FLOP/byte for fp32 FMA, ~180 for bf16 dot).

H200 floor (~4.3 TB/s), n = 4096 tokens:
- d 576, d_sae 9216, k 32, fp32: gathers 302 MB -> 70 us if every gather went to HBM; the whole
  `W_dec` is only 21 MB and stays in the 60 MB L2, so the true floor is the output and L2
  bandwidth, ~10-20 us. Dense fp32: 43 GFLOP -> 0.65 ms at 67 TFLOP/s.
- d 2048, d_sae 32768, k 64, fp32: gathers 2.1 GB -> 0.50 ms from HBM, or `W_dec` once
  (268 MB) + output (34 MB) -> 70 us if every row were read from HBM only once; the truth lies in
  between (each row is picked by n·k/d_sae = 8 tokens on average). Dense: 550 GFLOP -> 8.2 ms at
  67 TFLOP/s fp32 (0.7 ms at 790 TFLOP/s bf16 tensor cores), plus the dense `[n d_sae]` code
  (537 MB fp32) that has to be written and read.
- bf16 `W_dec` halves the gathered bytes.
The backward reads the gathered rows again (for `grad_vals`), gathers `n·k` rows of `g` (`n·d`, mostly
from L2) and writes the dense `[d_sae d]` gradient once (268 MB in fp32 at the second size: 62 us).
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from . import has_triton, pick

__all__ = ["sparse_decode", "sparse_decode_reference"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def _check(vals, idx, W_dec, offsets):
    if not (isinstance(W_dec, Tensor) and W_dec.ndim == 2 and W_dec.dtype in _FLOATS):
        raise ValueError(f"sparse_decode wants W_dec [d_sae d] floating, got {tuple(getattr(W_dec, 'shape', ()))} {getattr(W_dec, 'dtype', type(W_dec))}")
    if vals.shape != idx.shape:
        raise ValueError(f"sparse_decode wants vals and idx of the same shape, got vals {tuple(vals.shape)} and idx {tuple(idx.shape)}")
    if not vals.is_floating_point(): raise ValueError(f"sparse_decode wants floating vals, got {vals.dtype}")
    if idx.dtype not in (torch.int32, torch.int64): raise ValueError(f"sparse_decode wants int32 or int64 idx, got {idx.dtype}")
    if offsets is None:
        if vals.ndim != 2: raise ValueError(f"sparse_decode without offsets wants vals, idx [n k], got {tuple(vals.shape)}")
    else:
        if vals.ndim != 1 or offsets.ndim != 1:
            raise ValueError(f"sparse_decode with offsets wants vals, idx [nnz] and offsets [n] (1-D), got vals {tuple(vals.shape)} and offsets {tuple(offsets.shape)}")
        if offsets.dtype not in (torch.int32, torch.int64): raise ValueError(f"sparse_decode wants int32 or int64 offsets, got {offsets.dtype}")

def sparse_decode_reference(vals:Tensor,                 # [n k] activations, or [nnz] with `offsets`
                            idx:Tensor,                  # same shape as `vals`: latent indices into `W_dec`'s rows
                            W_dec:Tensor,                # [d_sae d] decoder
                            offsets:Tensor|None=None,    # [n] start of each row's run in `vals`/`idx` (ragged form)
                           )->Tensor:                    # [n d] Σ_j vals_j W_dec[idx_j] per row, in W_dec's dtype
    "Pure-torch reference: `F.embedding_bag` in sum mode with `vals` as per-sample weights"
    _check(vals, idx, W_dec, offsets)
    return F.embedding_bag(idx, W_dec, offsets, mode='sum', per_sample_weights=vals.to(W_dec.dtype))

def sparse_decode(vals:Tensor,                 # [n k] activations, or [nnz] with `offsets`
                  idx:Tensor,                  # same shape as `vals`: latent indices into `W_dec`'s rows
                  W_dec:Tensor,                # [d_sae d] decoder
                  offsets:Tensor|None=None,    # [n] start of each row's run (ragged form)
                  force:str|None=None,         # None (automatic), 'triton' or 'torch'
                 )->Tensor:                    # [n d]
    "`Σ_j vals_j W_dec[idx_j]` per row: Triton on CUDA, the embedding_bag reference elsewhere (see `headscope.kernels.pick`)"
    return pick("sparse_decode", vals, idx, W_dec, offsets, force=force)(vals, idx, W_dec, offsets)

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _runs(rn, N, off_ptr, stride_o, NNZ, K, stride_vn, stride_vk, stride_in, stride_ik, stride_gn, stride_gk,
              RAGGED: tl.constexpr):
        # per token row: its run length and where its entries start in vals, idx and the grad_vals buffer
        rmask = rn < N
        if RAGGED:
            s = tl.load(off_ptr + rn * stride_o, mask=rmask, other=0).to(tl.int64)
            e = tl.load(off_ptr + (rn + 1) * stride_o, mask=(rn + 1) < N, other=NNZ).to(tl.int64)
            ln = tl.where(rmask, e - s, 0)
            return ln, tl.max(ln, 0), s * stride_vk, s * stride_ik, s * stride_gk
        else:
            r = rn.to(tl.int64)
            ln = tl.where(rmask, K, 0)
            return ln, K, r * stride_vn, r * stride_in, r * stride_gn

    @triton.jit
    def _fwd_kernel(vals_ptr, idx_ptr, off_ptr, w_ptr, out_ptr, N, D, NNZ, K,
                    stride_vn, stride_vk, stride_in, stride_ik, stride_o, stride_wr, stride_wd, stride_on, stride_od,
                    RAGGED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = rd < D
        ln, L, vb, ib, _gb = _runs(rn, N, off_ptr, stride_o, NNZ, K, stride_vn, stride_vk, stride_in, stride_ik, 0, 0, RAGGED)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        for j in range(0, L):
            m = j < ln
            i = tl.load(idx_ptr + ib + j * stride_ik, mask=m, other=0).to(tl.int64)
            v = tl.load(vals_ptr + vb + j * stride_vk, mask=m, other=0.0).to(ACC)
            w = tl.load(w_ptr + i[:, None] * stride_wr + rd[None, :] * stride_wd, mask=m[:, None] & dmask[None, :], other=0.0)
            acc += v[:, None] * w.to(ACC)   # upcast: bf16 arithmetic is wrong under the interpreter
        omask = (rn[:, None] < N) & dmask[None, :]
        tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_on + rd[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _gvals_kernel(idx_ptr, off_ptr, w_ptr, g_ptr, gv_ptr, N, D, NNZ, K,
                      stride_in, stride_ik, stride_o, stride_wr, stride_wd, stride_gn, stride_gd, stride_gvn, stride_gvk,
                      RAGGED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # same grid as the forward: the g tile is loaded once, then each entry j adds its partial dot
        # <g[b, cols], W[i, cols]> over this column block to grad_vals[b, j] (atomics across column blocks)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = rd < D
        ln, L, ib, _ib, gvb = _runs(rn, N, off_ptr, stride_o, NNZ, K, stride_in, stride_ik, stride_in, stride_ik,
                                    stride_gvn, stride_gvk, RAGGED)
        gmask = (rn[:, None] < N) & dmask[None, :]
        g = tl.load(g_ptr + rn[:, None].to(tl.int64) * stride_gn + rd[None, :] * stride_gd, mask=gmask, other=0.0).to(ACC)
        for j in range(0, L):
            m = j < ln
            i = tl.load(idx_ptr + ib + j * stride_ik, mask=m, other=0).to(tl.int64)
            w = tl.load(w_ptr + i[:, None] * stride_wr + rd[None, :] * stride_wd, mask=m[:, None] & dmask[None, :], other=0.0).to(ACC)
            tl.atomic_add(gv_ptr + gvb + j * stride_gvk, tl.sum(g * w, 1), mask=m)

    def _pow2_at_least_16(n): return n >= 16 and (n & (n - 1)) == 0

    def _acc(W_dec): return torch.float64 if W_dec.dtype == torch.float64 else torch.float32
    def _tl(dt): return tl.float64 if dt == torch.float64 else tl.float32

    def _blocks(D, block_n, block_d):
        if block_d is None: block_d = min(max(triton.next_power_of_2(D), 16), 128)
        assert _pow2_at_least_16(block_n) and _pow2_at_least_16(block_d), f"BLOCK sizes must be powers of two >= 16, got {block_n}, {block_d}"
        return block_n, block_d

    def _layout(vals, idx, offsets):
        "n, nnz, K and the (row, entry) strides of vals and idx for either form"
        if offsets is None:
            n, k = vals.shape
            return n, n * k, k, vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1), 0
        return offsets.shape[0], vals.shape[0], 0, 0, vals.stride(0), 0, idx.stride(0), offsets.stride(0)

    def _launch_fwd(vals:Tensor, idx:Tensor, W_dec:Tensor, offsets:Tensor|None=None, block_n:int=16, block_d:int|None=None,
                    num_warps:int=4)->Tensor:
        "Launch `_fwd_kernel` on a grid of [block_n tokens, block_d columns] tiles (powers of two >= 16)"
        _check(vals, idx, W_dec, offsets)
        D = W_dec.shape[1]
        block_n, block_d = _blocks(D, block_n, block_d)
        n, nnz, K, svn, svk, sin, sik, so = _layout(vals, idx, offsets)
        out = torch.empty(n, D, dtype=W_dec.dtype, device=W_dec.device)
        if out.numel() == 0: return out
        grid = (triton.cdiv(n, block_n), triton.cdiv(D, block_d))
        _fwd_kernel[grid](vals, idx, offsets if offsets is not None else idx, W_dec, out, n, D, nnz, K,
                          svn, svk, sin, sik, so, W_dec.stride(0), W_dec.stride(1), out.stride(0), out.stride(1),
                          RAGGED=offsets is not None, ACC=_tl(_acc(W_dec)), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
        return out

    def _launch_bwd(g:Tensor, vals:Tensor, idx:Tensor, W_dec:Tensor, offsets:Tensor|None, need_gv:bool, need_gw:bool,
                    block_n:int=16, block_d:int|None=None, num_warps:int=4):
        "grad_vals (vals' shape and dtype) and grad_W_dec (dense [d_sae d], W_dec's dtype), or None where not needed"
        D, acc = W_dec.shape[1], _acc(W_dec)
        n, nnz, K, svn, svk, sin, sik, so = _layout(vals, idx, offsets)
        gv = gw = None
        if need_gv:   # <g[b], W_dec[idx[b,j]]>: a gather-dot on the forward's grid
            block_n, block_d = _blocks(D, block_n, block_d)
            gv = torch.zeros(vals.shape, dtype=acc, device=vals.device)
            if n and D and nnz:
                gvs = (gv.stride(0), gv.stride(1)) if offsets is None else (0, gv.stride(0))
                _gvals_kernel[(triton.cdiv(n, block_n), triton.cdiv(D, block_d))](
                    idx, offsets if offsets is not None else idx, W_dec, g, gv, n, D, nnz, K,
                    sin, sik, so, W_dec.stride(0), W_dec.stride(1), g.stride(0), g.stride(1), *gvs,
                    RAGGED=offsets is not None, ACC=_tl(acc), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
            gv = gv.to(vals.dtype)
        if need_gw:   # grad_W_dec[r] = Σ over the entries that picked latent r of vals·g[row]: the same decode, transposed
            flat = idx.reshape(-1)
            if offsets is None: rows = torch.arange(n, device=idx.device).repeat_interleave(K)
            else: rows = torch.searchsorted(offsets, torch.arange(nnz, device=idx.device, dtype=offsets.dtype), right=True) - 1
            v = vals.reshape(-1)
            if offsets is not None:   # entries before offsets[0] belong to no row (the forward ignores them too)
                v, rows = torch.where(rows >= 0, v, 0), rows.clamp_min(0)
            flat, order = flat.sort()                                  # group the entries by latent
            starts = torch.searchsorted(flat, torch.arange(W_dec.shape[0], device=idx.device, dtype=flat.dtype))
            gw = _launch_fwd(v[order], rows[order], g.to(W_dec.dtype), starts, block_n, block_d, num_warps)
        return gv, gw

    class _SparseDecode(torch.autograd.Function):
        @staticmethod
        def forward(ctx, vals, idx, W_dec, offsets):
            ctx.save_for_backward(vals, idx, W_dec, offsets)
            ctx.ragged = offsets is not None
            return _launch_fwd(vals, idx, W_dec, offsets)

        @staticmethod
        def backward(ctx, g):
            vals, idx, W_dec, offsets = ctx.saved_tensors
            gv, gw = _launch_bwd(g, vals, idx, W_dec, offsets if ctx.ragged else None,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[2])
            return gv, None, gw, None

    def sparse_decode_triton(vals:Tensor,               # [n k] activations, or [nnz] with `offsets`
                             idx:Tensor,                # same shape as `vals`
                             W_dec:Tensor,              # [d_sae d]
                             offsets:Tensor|None=None,  # [n] run starts (ragged form)
                            )->Tensor:                  # [n d] in W_dec's dtype
        "Triton version of `sparse_decode_reference`, same signature, differentiable in `vals` and `W_dec`"
        _check(vals, idx, W_dec, offsets)
        return _SparseDecode.apply(vals, idx, W_dec, offsets)

    __all__ += ["sparse_decode_triton"]
